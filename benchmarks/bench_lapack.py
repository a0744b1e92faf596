"""LAPACK factorisations side by side (``jaxgeom/_lapack.py``) against LAPACK's own threads.

jaxgeom runs the independent ``eigh`` of the KFAC factors (EKFAC's build; KFAC's eager
``inv``, ``pinv``, exactly damped ``solve``, ``eigvalsh``) with OpenBLAS held to one
thread, one factorisation per core, when its cost model says that is faster. This script
times each call three ways in one process, in alternated blocks:

- ``lapack threads``: the cost model made to answer "no" (``_lapack.chains``,
  ``_lapack.faster_side_by_side`` and ``_lapack.too_small_for_threads`` patched), so the
  factorisations run one after the other on OpenBLAS's threads;
- ``one call``: EKFAC's factorisations as one compiled call with OpenBLAS on one thread,
  XLA choosing which run at once (``_lapack.side_by_side`` before 2026-12-02's late
  session; the KFAC rows, compiled eager calls, are always run so);
- ``chains``: jaxgeom as it is (EKFAC's factorisations dealt into one chain per core,
  each chain one compiled call run from a thread of its own; too small for that, one
  chain in the calling thread, OpenBLAS on one thread).

Each block starts after a pause (``--pause``, longer than OpenBLAS's threads spin after a
call), so that neither schedule inherits the other's spinning threads; the calls within
a block follow each other, as in a loop of builds. Rows: EKFAC's exact and Monte-Carlo
builds; KFAC's ``inv`` (eager, exact damping), ``solve`` (eager, exact damping),
``eigvalsh``, ``pinv``; and ``inv then mv``: the inverse and one product with it, where
the product pays for threads left spinning. Medians over ``--blocks`` × ``--repeats``
calls; each ratio is the schedule's time over ``chains``'s (> 1: ``chains`` faster). A
table on stdout and ``--out`` JSON::

    python benchmarks/bench_lapack.py --models bench_small bench_mlp --out lapack.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
from output import run_header, write_json


def _rows(name: str) -> dict:
    import jaxgeom

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    bs, key, regul = spec.batch_size, jax.random.key(3), 1e-3
    kfac = jaxgeom.FIM(apply_fn, params, (x, y), jaxgeom.PMatKFAC, batch_size=bs)
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    return {
        "EKFAC build": lambda: jaxgeom.FIM(apply_fn, params, (x, y), jaxgeom.PMatEKFAC,
                                           batch_size=bs),
        "EKFAC build_mc": lambda: jaxgeom.FIM_MonteCarlo(
            apply_fn, params, (x, y), jaxgeom.PMatEKFAC, key=key, trials=1, batch_size=bs),
        "KFAC inv": lambda: kfac.inv(regul),
        "KFAC inv then mv": lambda: kfac.inv(regul).mv(v),
        "KFAC solve": lambda: kfac.solve(v, regul),
        "KFAC eigvalsh": lambda: kfac.eigvalsh(),
        "KFAC pinv": lambda: kfac.pinv(),
    }


def _timed(call, repeats: int) -> list[float]:
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        runs.append(time.perf_counter() - start)
    return runs


def _apply_each(fn, items):
    return [fn(item) for item in items]


@functools.cache
def _compiled_each(fn):
    return jax.jit(functools.partial(_apply_each, fn))


def _one_call(fn, items, orders, *, work_follows=False):
    """``_lapack.side_by_side`` as it was: one compiled call, XLA's schedule."""
    del work_follows
    from jaxgeom import _lapack

    with _lapack.one_thread_when_faster(orders, jax.tree_util.tree_leaves(items)) as limited:
        if limited:
            return jax.block_until_ready(_compiled_each(fn)(items))
    return [fn(item) for item in items]


def run_model(name: str, blocks: int, repeats: int, pause: float) -> dict:
    from jaxgeom import _lapack
    from jaxgeom.pmat import kfac

    saved = (_lapack.chains, _lapack.faster_side_by_side, _lapack.too_small_for_threads,
             kfac.side_by_side)

    def schedule(which: str) -> None:
        chains, faster, too_small, side_by_side = saved
        if which == "lapack threads":
            chains, faster = (lambda orders, cores: None), (lambda sizes, cores: False)
            too_small = lambda sizes: False  # noqa: E731
        elif which == "one call":
            side_by_side = _one_call
        (_lapack.chains, _lapack.faster_side_by_side, _lapack.too_small_for_threads,
         kfac.side_by_side) = (chains, faster, too_small, side_by_side)

    schedules = ("lapack threads", "one call", "chains")
    out = {}
    try:
        for row, call in _rows(name).items():
            runs = {s: [] for s in schedules}
            first = {}
            for which in schedules:
                schedule(which)
                start = time.perf_counter()
                jax.block_until_ready(call())
                first[which] = time.perf_counter() - start
            for _ in range(blocks):
                for which in schedules:
                    schedule(which)
                    time.sleep(pause)
                    runs[which] += _timed(call, repeats)
            out[row] = {s: dict(warm_s=statistics.median(r), first_s=first[s], runs=r)
                        for s, r in runs.items()}
    finally:
        schedule("chains")
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp"])
    parser.add_argument("--blocks", type=int, default=5, help="alternated blocks per row")
    parser.add_argument("--repeats", type=int, default=3, help="calls per block")
    parser.add_argument("--pause", type=float, default=0.3,
                        help="seconds before each block (OpenBLAS's threads spin ≈ 0.1 s)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    results = dict(run_header("bench_lapack.py", argv), models={})
    print(f"{'model':12s}  {'row':18s}  {'lapack threads':>14s}  {'one call':>12s}  "
          f"{'chains':>12s}  threads/chains  one call/chains")
    for name in args.models:
        res = results["models"][name] = run_model(name, args.blocks, args.repeats, args.pause)
        for row, t in res.items():
            a, b, c = (t[s]["warm_s"] for s in ("lapack threads", "one call", "chains"))
            print(f"{name:12s}  {row:18s}  {a * 1e3:11.1f} ms  {b * 1e3:9.1f} ms  "
                  f"{c * 1e3:9.1f} ms  {a / c:14.2f}  {b / c:15.2f}")
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
