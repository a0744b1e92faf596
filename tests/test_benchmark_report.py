"""The benchmark report's check against the performance targets (``benchmarks/bench_fim.py``,
:func:`targets`), on a hand-made run whose every figure is known, and the paired timing of
``benchmarks/output.py`` on a clock of known times."""

import importlib.util
import sys
import types
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_fim.py"
#: modules of the tests whose names the script's own modules take while it loads
_SHADOWED = ("models", "output")


@pytest.fixture(scope="module")
def bench_fim():
    """The script as a module, with its own ``models`` (``benchmarks/models.py``) while it
    loads: the tests' ``models`` and ``sys.path`` are put back afterwards."""
    saved_path, saved = list(sys.path), {k: sys.modules.pop(k, None) for k in _SHADOWED}
    try:
        spec = importlib.util.spec_from_file_location("bench_fim", _PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules["bench_fim"] = module  # dataclasses look their module up while made
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved_path
        for name, old in saved.items():
            sys.modules.pop(name, None)
            if old is not None:
                sys.modules[name] = old
    yield module
    sys.modules.pop("bench_fim", None)


def timing(warm):
    return {"warm_s": warm, "first_s": 1.0, "runs": [warm]}


def run(representations, floors, scaling=None):
    return {"models": {"m": {"floors": {k: timing(v) for k, v in floors.items()},
                             "representations": representations,
                             "scaling": scaling or {}}}}


FLOORS = {"forward": 0.010, "forward+backward": 0.030, "K backward": 0.050,
          "kfac_gemms K=9": 0.040, "kfac_gemms K=1": 0.020}


def kfac_case(build, build_mc, mv, ng, kj, peak=10.0, bound=20.0, compiles=(0, ["jit(_window)"])):
    """A KFAC case: jaxgeom's times, NNGeometry's and kfac-jax's ({op: seconds})."""
    res = {"build": dict(timing(build), peak_mb=peak), "build_mc": timing(build_mc),
           "mv": timing(mv), "bound_mb": bound, "compiles_new_params": compiles[0],
           "compiles_short_last_chunk_names": compiles[1],
           "nngeometry": {op: timing(t) for op, t in ng.items()},
           "kfac_jax": {op: timing(t) for op, t in kj.items()}}
    return res


def test_a_run_on_target_reports_nothing_against_it(bench_fim):
    # build floor: fwd + K bwd + kfac_gemms K=9 = 0.1 s; Monte Carlo: 0.03 + 0.02 = 0.05 s
    case = kfac_case(build=0.12, build_mc=0.06, mv=0.002,
                     ng={"build": 0.2, "build_mc": 0.1, "mv": 0.004},
                     kj={"build": 0.13, "build_mc": 0.07})
    lines = bench_fim.targets(run({"PMatKFAC": case}, FLOORS))
    assert lines[0] == "3 timed rows, 3 against a peer, 0 behind one"
    assert all(line.endswith("(none)") for line in lines[1:])


def test_each_missed_target_is_named_with_its_figure(bench_fim):
    case = kfac_case(
        build=0.2,       # 2.0× its 0.1 s floor: above 1.5×
        build_mc=0.06,   # kfac-jax 0.6 s is 12× off the 0.05 s floor, jaxgeom only 10× ahead
        mv=0.0005,       # NNGeometry 0.0004 s: behind, a call under 1 ms
        ng={"build": 0.18, "mv": 0.0004},  # the build 0.9×: behind, a call over 1 ms
        kj={"build_mc": 0.6}, peak=30.0, bound=20.0,
        compiles=(1, ["jit(_window)", "jit(_update)"]))
    scaling = {"PMatKFAC": {"n": {"build": {"peak_mb": 10.0}},
                            "n10": {"build": {"peak_mb": 50.0}, "bound_mb": 20.0}}}
    lines = bench_fim.targets(run({"PMatKFAC": case}, FLOORS, scaling))
    assert lines[0] == "3 timed rows, 3 against a peer, 2 behind one"
    assert lines[1].endswith("1: m PMatKFAC build 0.90 (NNGeometry)")
    assert lines[2].endswith("1: m PMatKFAC mv 0.80 (NNGeometry)")
    assert lines[3].endswith("0 (none)")  # neither row was paired: no interval
    assert lines[4].endswith("0 (none)")  # 12× off, 10× ahead: the 3× rule holds
    assert lines[5].endswith("1: m PMatKFAC build 2.00")
    assert lines[6].endswith("2: m PMatKFAC 30 MiB (bound 20); "
                             "m PMatKFAC at 10 N: 50 MiB (bound 20; 10 at N)")
    assert "m PMatKFAC: 1 for new parameter values" in lines[7]
    assert "jit(_update) for data of a new length" in lines[7]


def test_the_three_times_rule_applies_where_the_peer_is_far_off_the_floor(bench_fim):
    # Monte-Carlo floor 0.05 s: kfac-jax's 0.175 s is 3.5× off it, so jaxgeom must be 3×
    # ahead, and at 0.07 s it is 2.5× ahead; NNGeometry's 0.1 s is 2× off: no rule there
    case = kfac_case(build=0.1, build_mc=0.07, mv=0.002,
                     ng={"build_mc": 0.1}, kj={"build_mc": 0.175})
    short = bench_fim.targets(run({"PMatKFAC": case}, FLOORS))[4]
    assert short.endswith("1: m PMatKFAC build_mc 2.50 (kfac-jax 3.50× its floor)")


def test_curvlinops_is_a_peer_of_the_table_and_of_the_targets(bench_fim):
    """Its figures get their own columns (time, ratio), its rows behind are named, the 3×
    rule holds against it, and the report checks that it held the same matrix."""
    case = kfac_case(build=0.12, build_mc=0.06, mv=0.002, ng={}, kj={})
    case["curvlinops"] = {"build": timing(0.6),  # 6× off the 0.1 s floor, 5× ahead: met
                          "build_mc": timing(0.16),  # 3.2× off the 0.05 s floor, 2.67× ahead
                          "mv": timing(0.0015), "trace_value": 2.0, "vTMv_value": 3.0}
    case.update(trace_value=2.0, vTMv_value=3.3)
    results = run({"PMatKFAC": case}, FLOORS)
    rows, notes = bench_fim.table_rows(results)
    header = rows[0]
    build = next(r for r in rows if r[2] == "build")
    assert build[header.index("curvlinops")] == "600.00 ms"
    assert build[header.index("cl/jg")] == "5.00"
    assert len(set(map(len, rows))) == 1  # the floor rows are as wide as the others
    lines = bench_fim.targets(results)
    assert lines[1].endswith("1: m PMatKFAC mv 0.75 (curvlinops)")
    assert lines[4].endswith("1: m PMatKFAC build_mc 2.67 (curvlinops 3.20× its floor)")
    assert "m PMatKFAC: trace jaxgeom 2, curvlinops 2, rel. diff 0.0e+00 OK" in notes
    assert ("m PMatKFAC: vᵀFv of the same v, jaxgeom 3.3, curvlinops 3, rel. diff 1.0e-01 "
            "MISMATCH") in notes


def paired_case(mv_ratio, interval, mv=0.002):
    """A KFAC case whose ``mv`` was paired against NNGeometry: the paired ratio and the
    interval of its rounds' ratios."""
    case = kfac_case(build=0.1, build_mc=0.05, mv=mv, ng={"mv": mv * mv_ratio}, kj={})
    case["nngeometry"]["paired"] = {"mv": {"ratio": mv_ratio, "interval": list(interval)}}
    return case


def test_rows_behind_whose_rounds_reach_parity_are_named_apart(bench_fim):
    noisy = bench_fim.targets(run({"PMatKFAC": paired_case(0.9, (0.8, 1.05))}, FLOORS))
    assert noisy[1].endswith("1: m PMatKFAC mv 0.90ᵖ (NNGeometry)")  # still behind
    assert noisy[3].endswith("1: m PMatKFAC mv 0.90ᵖ [0.80, 1.05] (NNGeometry)")
    clear = bench_fim.targets(run({"PMatKFAC": paired_case(0.9, (0.8, 0.97))}, FLOORS))
    assert clear[1].endswith("1: m PMatKFAC mv 0.90ᵖ (NNGeometry)")
    assert clear[3].endswith("0 (none)")  # every round behind: behind beyond the noise


def test_median_interval_takes_the_order_statistics_of_its_coverage(bench_fim):
    # n = 10: P(Bin(10, 1/2) <= 1) = 11/1024, so [x_(2), x_(9)] covers 1 - 22/1024 ≈ 97.9%;
    # [x_(3), x_(8)] only 1 - 2·56/1024 ≈ 89.1% < 95%
    values = [7.0, 1.0, 9.0, 3.0, 10.0, 2.0, 5.0, 8.0, 4.0, 6.0]
    low, high, level = bench_fim.median_interval(values)
    assert (low, high) == (2.0, 9.0)
    assert level == pytest.approx(1 - 22 / 1024)
    # asked for less confidence, the interval narrows to [x_(3), x_(8)]
    low, high, level = bench_fim.median_interval(values, level=0.85)
    assert (low, high) == (3.0, 8.0)
    assert level == pytest.approx(1 - 2 * 56 / 1024)
    # n = 4 (the fewest rounds): no interval reaches 95%; [min, max] covers 1 - 2/16
    low, high, level = bench_fim.median_interval([1.1, 0.9, 1.0, 0.95])
    assert (low, high, level) == (0.9, 1.1, pytest.approx(0.875))
    with pytest.raises(ValueError, match="at least one value"):
        bench_fim.median_interval([])


def test_a_run_records_the_environment_that_changes_its_speed(bench_fim, monkeypatch, capsys):
    """The allocator's, the threads' and XLA's variables are kept with a run (and printed
    under its report); others are not."""
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv("JAXGEOM_UNRELATED", "x")
    environment = bench_fim.run_environment()
    assert environment["GLIBC_TUNABLES"] == "glibc.malloc.trim_threshold=1"
    assert environment["OMP_NUM_THREADS"] == "2" and "JAXGEOM_UNRELATED" not in environment
    results = run({}, FLOORS)
    results["settings"] = {"environment": {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}}
    bench_fim.print_report(results)
    assert "Run with GLIBC_TUNABLES=glibc.malloc.trim_threshold=1" in capsys.readouterr().out


@pytest.mark.parametrize("kind, said", [
    ("params", "shaped as the parameters on every side"),
    ("flat", "flat on every side"),
    (None, "the two sides' vectors of different kinds"),  # a run from before --vectors
])
def test_a_report_says_which_vectors_the_operations_took(bench_fim, capsys, kind, said):
    results = run({}, FLOORS)
    if kind is not None:
        results["settings"] = {"vectors": kind}
    bench_fim.print_report(results)
    line = next(line for line in capsys.readouterr().out.splitlines()
                if line.startswith("The operations' vectors: "))
    assert said in line


def test_the_vectors_option_reaches_every_case_process(bench_fim, monkeypatch):
    """``--vectors flat``: each case's command line carries it (and the run's settings
    record it), so that jaxgeom's vector and NNGeometry's are of the same kind."""
    commands = []
    monkeypatch.setattr(bench_fim, "_subprocess",
                        lambda argv, timeout, env: commands.append(argv) or {})
    args = bench_fim.command_line().parse_args(
        ["--quick", "--models", "bench_small", "--representations", "PMatDiag",
         "--vectors", "flat"])
    results = bench_fim.run_all(args)
    assert results["settings"]["vectors"] == "flat"
    assert commands and all(argv[argv.index("--vectors") + 1] == "flat" for argv in commands)


def test_paired_ratio_compares_the_two_calls_round_by_round(monkeypatch):
    """``output.paired_ratio``: each round a block of each call (the order alternated), its
    ratio that of the blocks' medians; the machine's speed drifting from round to round
    (here 1× to 8×) moves both sides' times but not the ratio, 2 in every round."""
    spec = importlib.util.spec_from_file_location("bench_output", _PATH.parent / "output.py")
    output = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(output)
    clock, order, slowdown = [0.0], [], {"value": 1.0}

    def call(name, cost):
        def run():
            order.append(name)
            clock[0] += cost * slowdown["value"]
            if len(order) % 8 == 0:  # a round is 2 blocks of (1 untimed + 3) calls
                slowdown["value"] *= 2 ** 0.25
        return run

    monkeypatch.setattr(output, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    result = output.paired_ratio(call("ours", 1.0), call("theirs", 2.0), rounds=12, repeats=3)
    assert order[:8] == ["ours"] * 4 + ["theirs"] * 4  # round 0: ours first
    assert order[8:16] == ["theirs"] * 4 + ["ours"] * 4  # round 1: reversed
    assert len(result["round_ratios"]) == 12 and result["rounds"] == 12
    assert result["ratio"] == pytest.approx(2.0)
    assert result["interval"] == pytest.approx([2.0, 2.0])
    assert 0.95 <= result["interval_level"] < 1
