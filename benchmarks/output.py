"""Timing calls and writing a benchmark script's results."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def run_header(script: str, argv: list[str] | None) -> dict:
    """The command (``argv``, else this process's arguments), the machine and the versions
    of a script's run, for the head of its JSON."""
    import platform
    import sys

    import jax

    return dict(command=" ".join(["python", f"benchmarks/{script}",
                                  *(sys.argv[1:] if argv is None else argv)]),
                machine=dict(cpu_count=os.cpu_count(), processor=platform.processor()),
                versions=dict(python=platform.python_version(), jax=jax.__version__))


def write_json(results: dict, path: str | None, announce: bool = True) -> None:
    """``results`` as indented JSON at ``path`` (nothing when ``path`` is ``None``),
    written then renamed, so that a run stopped mid-write keeps the previous file whole."""
    if not path:
        return
    with open(f"{path}.tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(f"{path}.tmp", path)
    if announce:
        print(f"wrote {path}")


def timed(call: Callable[[], Any], repeats: int) -> dict:
    """The first call of ``call()`` (compilation included) and the median of ``repeats``
    warm calls, in seconds, each waited for (``jax.block_until_ready``)."""
    import jax

    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        runs.append(time.perf_counter() - start)
    return dict(first_s=first, warm_s=statistics.median(runs), runs=runs)


def alternated(calls: dict[str, Callable[[], Any]], blocks: int, repeats: int
               ) -> dict[str, list[float]]:
    """The warm times, in seconds, of each of ``calls`` (name → ``call()``), timed in
    ``blocks`` alternated blocks of ``repeats`` calls (in order, then in reverse), each
    block after an untimed call (the first after the other's block); each call waited for
    (``jax.block_until_ready``)."""
    import jax

    names = list(calls)
    runs: dict[str, list[float]] = {name: [] for name in names}
    for b in range(blocks):
        for name in names if b % 2 == 0 else names[::-1]:
            call = calls[name]
            jax.block_until_ready(call())
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(call())
                runs[name].append(time.perf_counter() - start)
    return runs


def paired_ratio(ours: Callable[[], Any], theirs: Callable[[], Any], rounds: int,
                 repeats: int) -> dict:
    """The ratio of two calls' warm times, ``theirs / ours``, in ``rounds`` paired rounds:
    each round a block of ``repeats`` calls of each (:func:`alternated`: the order
    reversed every other round), its ratio that of the two blocks' medians; the median of
    the rounds' ratios and its :func:`median_interval`. On a machine whose speed drifts by
    ±20% over minutes, separate medians taken apart move a ratio by as much."""
    runs = alternated({"ours": ours, "theirs": theirs}, rounds, repeats)
    ratios = [statistics.median(runs["theirs"][r * repeats:(r + 1) * repeats])
              / statistics.median(runs["ours"][r * repeats:(r + 1) * repeats])
              for r in range(rounds)]
    low, high, level = median_interval(ratios)
    return dict(ratio=statistics.median(ratios), interval=[low, high], interval_level=level,
                rounds=rounds, calls_per_block=repeats, round_ratios=ratios)


#: the confidence asked of :func:`median_interval` (a row's interval of paired ratios)
INTERVAL_LEVEL = 0.95


def median_interval(values: list[float], level: float = INTERVAL_LEVEL
                    ) -> tuple[float, float, float]:
    """A distribution-free interval for the median of the distribution ``values`` are
    drawn from, and its confidence: the order statistics ``[x_(k), x_(n+1-k)]`` with the
    largest ``k`` whose coverage ``1 - 2 P(Bin(n, 1/2) < k)`` is at least ``level``, or
    ``[min, max]`` (coverage ``1 - 2^(1-n)``) when no ``k`` reaches it (fewer than 6 values
    for 95%). Assumes only that the values are independent draws; applied to paired rounds
    (:func:`paired_ratio`, ``bench_fim.paired``), each round's ratio of the two sides'
    adjacent blocks."""
    x = sorted(values)
    n = len(x)
    if n == 0:
        raise ValueError("median_interval needs at least one value")

    def coverage(k):  # P(x_(k) <= median <= x_(n+1-k)) = 1 - 2 P(Bin(n, 1/2) <= k - 1)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = 1
    while k + 1 <= (n + 1) // 2 and coverage(k + 1) >= level:
        k += 1
    return x[k - 1], x[n - k], coverage(k)


def floor_table(model_names: list[str], run_model: Callable[[str], dict],
                floor_of: Callable[[str, dict], dict | None], out: str | None, *,
                width: int = 66, extra: tuple[str, Callable[[dict], str]] | None = None
                ) -> dict:
    """``run_model(name)`` for each model (its rows: :func:`timed` results), printed as a
    table — each row's warm time, its multiple of ``floor_of(row, rows)`` (a row of the
    same run, or ``None``), its first call, and the ``extra`` column ``(title,
    format(row))`` — and written as JSON to ``out``; returns the results."""
    import jax

    import jaxgeom

    results = dict(jaxgeom=jaxgeom.__file__, jax=jax.__version__, models={})
    title, cell = extra or ("", lambda t: "")
    print(f"{'model':12s}  {'row':{width}s}  {'warm':>10s}  {'× floor':>8s}  {'first':>8s}  "
          f"{title}")
    for name in model_names:
        rows = run_model(name)
        results["models"][name] = rows
        for row, t in rows.items():
            floor = floor_of(row, rows)
            ratio = f"{t['warm_s'] / floor['warm_s']:7.2f}×" if floor else ""
            print(f"{name:12s}  {row:{width}s}  {t['warm_s'] * 1e3:8.2f} ms  {ratio:>8s}  "
                  f"{t['first_s']:6.2f} s  {cell(t)}", flush=True)
    write_json(results, out)
    return results


def in_child(script: str, case: str, repeats: int, timeout: float) -> dict:
    """``script --child CASE --repeats R`` in a new process (its own peak memory): the last
    JSON line it prints, or ``{"case", "error"}``."""
    cmd = [sys.executable, str(Path(script).resolve()), "--child", case,
           "--repeats", str(repeats)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(case=case, error=f"timed out after {timeout:.0f} s")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(case=case, error=f"exit {proc.returncode}: " + " | ".join(tail)[:400])


def print_cases(results: dict, columns: list[tuple[str, str, str]], width: int = 30) -> None:
    """The table of a one-process-per-case script's ``results["cases"]``: a row a case,
    ``columns`` of ``(header, key, format)`` (a missing or ``None`` value left blank)."""
    print(f"{'case':<{width}} " + " ".join(f"{h:>{max(len(h), 8)}}" for h, _, _ in columns))
    for r in results["cases"]:
        if "error" in r:
            print(f"{r['case']:<{width}} error: {r['error']}")
            continue
        cells = [("" if r.get(key) is None else format(r[key], fmt)).rjust(max(len(h), 8))
                 for h, key, fmt in columns]
        print(f"{r['case']:<{width}} " + " ".join(cells))


def cases_main(script: str, doc: str, cases: tuple[str, ...], repeats: int,
               run_case: Callable[[str, int], dict], print_table: Callable[[dict], None],
               argv: list[str] | None = None) -> dict | None:
    """The command line of a script that measures each of ``cases`` in a process of its own
    (:func:`in_child`): ``--cases``, ``--repeats``, ``--timeout``, ``--out``, ``--report``."""
    import argparse

    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=cases, default=list(cases))
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--report", help="print the table of a saved run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args.repeats)))
        return None
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        print_table(results)
        return results
    from bench_fim import versions

    results = dict(versions=versions(), repeats=args.repeats,
                   cases=[in_child(script, case, args.repeats, args.timeout)
                          for case in args.cases])
    print_table(results)
    write_json(results, args.out)
    return results
