"""Operations called eagerly, as from a notebook: jaxgeom against NNGeometry, call for call.

Usage::

    python benchmarks/bench_eager.py --out eager.json
    python benchmarks/bench_eager.py --models bench_mlp --representations PMatDiag PMatKFAC

``bench_fim.py`` times jaxgeom's operations inside a ``jax.jit`` (the representation an
argument), as in a training step. This script times them as a user types them in a
notebook, ``F.mv(v)``, against NNGeometry's (which is eager by nature), in the same
process on the same model. For each (model, representation, operation) it prints the
medians of:

- ``op by op``: the operation's array operations dispatched one by one (the methods as
  written: what an eager call cost before operations compiled themselves,
  ``jaxgeom/_dispatch.py``);
- ``eager``: ``F.mv(v)``, one compiled call;
- ``in jit``: ``jax.jit(lambda F, v: F.mv(v))(F, v)``;
- NNGeometry's ``F.mv(v)``,

and the ratios NNGeometry / ``eager`` (``ᵖ``: paired, the two sides timed in alternated
blocks, ``bench_fim.paired``, for calls under 1 s) and ``op by op`` / ``eager``. The
operations are ``bench_fim``'s (KFAC's solve π-damped, as NNGeometry's). Compilation is
not timed (first calls dropped). ``PMatImplicit``'s products, ``get_diag``, ``trace`` and
``solve`` are one compiled call each (the scan of its chunks, compiled as a model step),
their ``op by op`` the loops of compiled chunk steps they ran as before; its
``frobenius_norm`` streams its chunks through compiled steps eagerly, its ``op by op``
its ``eager``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_fim  # noqa: E402
import models  # noqa: E402

CASES = {
    "bench_small": ("PMatDense", "PMatBlockDiag", "PMatDiag", "PMatKFAC", "PMatEKFAC",
                    "PMatQuasiDiag", "PMatLowRank", "PMatImplicit"),
    "bench_mlp": ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag", "PMatImplicit"),
    "bench_cnn": ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag"),
    "bench_resnet": ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag"),
}
#: operations of more than a second on both sides (the compiled call changes nothing there)
SKIP = {("bench_small", "PMatLowRank", "frobenius_norm"), ("bench_small", "PMatLowRank", "solve"),
        ("bench_small", "PMatImplicit", "frobenius_norm"),
        ("bench_mlp", "PMatImplicit", "frobenius_norm"), ("bench_mlp", "PMatImplicit", "solve")}
REPEATS = 5


def _once(fn, repeats):
    """``timed`` for the peer's builds, which this script does not compare: one call."""
    import time

    import jax

    start = time.perf_counter()
    jax.block_until_ready(fn())
    return dict(warm_s=time.perf_counter() - start)


def run_case(model: str, rep: str) -> dict:
    import jax
    import peers

    import jaxgeom

    spec = models.SPECS[model]
    apply_fn, params, x_np, y_np, x, y = bench_fim._setup(spec)
    d = models.num_params(spec)
    F = jaxgeom.FIM(apply_fn, params, (x, y), getattr(jaxgeom, rep), variant="classif_logits",
                    batch_size=spec.batch_size)
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    operations = [op for op in bench_fim.OPERATIONS if (model, rep, op) not in SKIP]
    theirs: dict = {}
    peer = peers.nngeometry_case(spec, params, x_np, y_np, rep, _once, 1, operations,
                                 regul=bench_fim.SOLVE_REGUL, keep=theirs)
    out: dict = dict(model=model, representation=rep, d=d, operations={})
    ours: dict = {}
    for op in operations:
        fn, note = bench_fim._operation(op, rep, F)
        jitted = jax.jit(fn)
        calls = {
            "op_by_op": lambda fn=fn: _op_by_op(fn, F, v),
            "eager": lambda fn=fn: fn(F, v),
            "in_jit": lambda jitted=jitted: jitted(F, v),
        }
        row = {name: bench_fim.timed(call, REPEATS) for name, call in calls.items()}
        if op in theirs and "warm_s" in peer.get(op, {}):  # not a row NNGeometry failed
            row["nngeometry"] = bench_fim.timed(theirs[op], REPEATS)
        if note:
            row["note"] = note
        ours[op] = calls["eager"]
        out["operations"][op] = row
    warm = {op: (row["eager"]["warm_s"], row.get("nngeometry", {}).get("warm_s"))
            for op, row in out["operations"].items()}
    for op, pair in bench_fim.paired(ours, theirs, warm).items():
        out["operations"][op]["paired"] = pair
    if "error" in peer or "skipped" in peer:
        out["nngeometry"] = peer.get("error") or peer.get("skipped")
    return out


def _op_by_op(fn, F, v):
    """``fn(F, v)`` with every operation run as written, its array operations dispatched
    one by one (``_compiles_eager_calls`` patched to say no on the base and on ``F``'s
    class, which may answer for itself: ``PMatImplicit``, whose operations then stream
    their chunks through compiled steps from Python)."""
    from jaxgeom.pmat.base import PMatAbstract

    patched = {cls: vars(cls).get("_compiles_eager_calls") for cls in {PMatAbstract, type(F)}}
    for cls in patched:
        cls._compiles_eager_calls = lambda self: False
    try:
        return fn(F, v)
    finally:
        for cls, original in patched.items():
            if original is None:
                del cls._compiles_eager_calls
            else:
                cls._compiles_eager_calls = original


def _ms(row: dict | None) -> str:
    return "" if not row or "warm_s" not in row else f"{row['warm_s'] * 1e3:.3f}"


def print_table(results: list[dict]) -> None:
    print("| model | representation | op | op by op ms | eager ms | in jit ms | NNGeom ms "
          "| NNG/eager | op by op/eager |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for case in results:
        for op, row in case["operations"].items():
            pair, peer = row.get("paired"), row.get("nngeometry")
            ratio = (f"{pair['ratio']:.2f}ᵖ" if pair else
                     f"{peer['warm_s'] / row['eager']['warm_s']:.2f}" if peer else "")
            speedup = row["op_by_op"]["warm_s"] / row["eager"]["warm_s"]
            print(f"| {case['model']} | {case['representation']} | {op} | "
                  f"{_ms(row['op_by_op'])} | {_ms(row['eager'])} | {_ms(row['in_jit'])} | "
                  f"{_ms(row.get('nngeometry'))} | {ratio} | {speedup:.1f} |")


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--representations", nargs="*", default=None)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--report", default=None, help="print the table of a saved run")
    parser.add_argument("--cpu-sync-dispatch", action="store_true",
                        help="jax_cpu_enable_async_dispatch = False (bench_fim.configure_dispatch)")
    args = parser.parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())["cases"]
        print_table(results)
        return results
    bench_fim.configure_dispatch(args.cpu_sync_dispatch)
    bench_fim.configure_precision()
    results = []
    for model in args.models:
        for rep in CASES[model]:
            if args.representations is None or rep in args.representations:
                results.append(run_case(model, rep))
                print(f"done {model} {rep}", file=sys.stderr, flush=True)
    print_table(results)
    if args.out:
        Path(args.out).write_text(json.dumps(
            dict(versions=bench_fim.versions(), cpu_sync_dispatch=args.cpu_sync_dispatch,
                 cases=results), indent=1))
    return results


if __name__ == "__main__":
    main()
