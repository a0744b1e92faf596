"""LAPACK factorisations side by side (``jaxgeom/_lapack.py``) against LAPACK's own threads.

jaxgeom runs the independent ``eigh`` of the KFAC factors (EKFAC's build; KFAC's eager
``inv``, ``pinv``, exactly damped ``solve``, ``eigvalsh``) with OpenBLAS held to one
thread, one factorisation per core, when its cost model says that is faster. This script
times each call both ways in one process, in alternated blocks:

- ``lapack threads``: the cost model made to answer "no" (``_lapack.faster_side_by_side``
  patched), so the factorisations run one after the other on OpenBLAS's threads, as
  before the change;
- ``side by side``: jaxgeom as it is.

Each block starts after a pause (``--pause``, longer than OpenBLAS's threads spin after a
call), so that neither schedule inherits the other's spinning threads; the calls within
a block follow each other, as in a loop of builds. Rows: EKFAC's exact and Monte-Carlo
builds; KFAC's ``inv`` (eager, exact damping), ``solve`` (eager, exact damping),
``eigvalsh``, ``pinv``; and ``inv then mv``: the inverse and one product with it, where
the product pays for threads left spinning. Medians over ``--blocks`` × ``--repeats``
calls; the ratio is ``lapack threads / side by side`` (> 1: side by side faster). A
table on stdout and ``--out`` JSON::

    python benchmarks/bench_lapack.py --models bench_small bench_mlp --out lapack.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
from output import write_json


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


def run_model(name: str, blocks: int, repeats: int, pause: float) -> dict:
    from jaxgeom import _lapack

    side_by_side = _lapack.faster_side_by_side
    schedules = {"lapack threads": lambda sizes, cores: False, "side by side": side_by_side}
    out = {}
    try:
        for row, call in _rows(name).items():
            runs = {s: [] for s in schedules}
            first = {}
            for schedule, rule in schedules.items():
                _lapack.faster_side_by_side = rule
                start = time.perf_counter()
                jax.block_until_ready(call())
                first[schedule] = time.perf_counter() - start
            for _ in range(blocks):
                for schedule, rule in schedules.items():
                    _lapack.faster_side_by_side = rule
                    time.sleep(pause)
                    runs[schedule] += _timed(call, repeats)
            out[row] = {s: dict(warm_s=statistics.median(r), first_s=first[s], runs=r)
                        for s, r in runs.items()}
    finally:
        _lapack.faster_side_by_side = side_by_side
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
    results = dict(command="python benchmarks/bench_lapack.py " + " ".join(argv or []),
                   machine=dict(cpu_count=os.cpu_count(), processor=platform.processor()),
                   versions=dict(python=platform.python_version(), jax=jax.__version__),
                   models={})
    print(f"{'model':12s}  {'row':18s}  {'lapack threads':>14s}  {'side by side':>12s}  ratio")
    for name in args.models:
        res = results["models"][name] = run_model(name, args.blocks, args.repeats, args.pause)
        for row, t in res.items():
            a, b = t["lapack threads"]["warm_s"], t["side by side"]["warm_s"]
            print(f"{name:12s}  {row:18s}  {a * 1e3:11.1f} ms  {b * 1e3:9.1f} ms  {a / b:5.2f}")
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
