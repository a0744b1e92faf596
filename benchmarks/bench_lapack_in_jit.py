"""Factorisations inside your ``jit``: OpenBLAS held to one thread around them, or not.

Inside a trace, where the eager call would run the factorisations in chains, jaxgeom
holds OpenBLAS to one thread from just before the first to just after the last, through
two host callbacks (``jaxgeom._lapack.one_thread_in_trace``), and runs them in one host
call of its own (KFAC's ``eigh``'s: ``jaxgeom.pmat._spectral.host_eighs``; large
factors' inverses: ``jaxgeom._symmetric.spd_inverses``) or in chains in the program
(``_in_chains``: the Cholesky factorisations). This script compiles each row twice in
one process — ``held`` (jaxgeom as it is) and ``as written`` (traced inside
``jaxgeom.no_host_callbacks()``: no hold, no host call, the factorisations as XLA
schedules them, each with OpenBLAS's threads) — and times the two compiled programs in
alternated blocks of ``--repeats`` calls (``--blocks`` of them), each block after an
untimed call. Rows:

- training steps, each one ``jit``: the gradient of the mean cross-entropy, a Fisher
  build and a ``solve`` of the gradient (KFAC with exact and π damping, the exact and the
  Monte-Carlo Fisher; EKFAC) — a loop of steps, as in training, where threads left
  spinning by one step's factorisations slow the next step's build;
- KFAC's operations alone, each call after the same call (``solve`` and ``inv`` with π
  and exact damping, ``eigvalsh``): there the spinning threads of one call help the next.

Medians, and ``as written / held`` (> 1: the hold faster). A table on stdout and
``--out`` JSON::

    python benchmarks/bench_lapack_in_jit.py --models bench_mlp --out lapack-in-jit.json
"""

from __future__ import annotations

import argparse
import functools
import statistics

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
import optax
from output import alternated, run_header, write_json

VARIANTS = ("as written", "held")


def _rows(name: str) -> tuple[dict, tuple]:
    """``row -> fn(params, F, v)`` and its arguments."""
    import jaxgeom as jg

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    key, regul = jax.random.key(3), 1e-3
    F = jg.FIM(apply_fn, params, (x, y), jg.PMatKFAC, batch_size=spec.batch_size)
    v = jg.random_pvector(jax.random.key(2), params)

    def step(representation, fisher="exact", **options):
        def fn(p, F, v):
            del F, v
            grads = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
                apply_fn(p, x), y).mean())(p)
            if fisher == "exact":
                M = jg.FIM(apply_fn, p, (x, y), representation, batch_size=spec.batch_size)
            else:
                M = jg.FIM_MonteCarlo(apply_fn, p, (x, y), representation, key=key,
                                      batch_size=spec.batch_size)
            return M.solve(grads, regul, **options)
        return fn

    rows = {
        "step: KFAC, exact damping": step(jg.PMatKFAC),
        "step: KFAC, π damping": step(jg.PMatKFAC, damping="pi"),
        "step: KFAC MC, π damping": step(jg.PMatKFAC, "monte_carlo", damping="pi"),
        "step: EKFAC": step(jg.PMatEKFAC),
        "KFAC solve, π": lambda p, F, v: F.solve(v, regul, damping="pi"),
        "KFAC inv, π": lambda p, F, v: F.inv(regul, damping="pi"),
        "KFAC solve, exact": lambda p, F, v: F.solve(v, regul),
        "KFAC inv, exact": lambda p, F, v: F.inv(regul),
        "KFAC eigvalsh": lambda p, F, v: F.eigvalsh(),
        "KFAC logdet": lambda p, F, v: F.logdet(regul),
    }
    return rows, (params, F, v)


def _compiled(fn, args, variant: str):
    """``fn`` compiled as jaxgeom traces it (``held``) or without host callbacks (``as
    written``)."""
    import contextlib

    import jaxgeom as jg

    context = jg.no_host_callbacks() if variant == "as written" else contextlib.nullcontext()
    with context:  # a new function each time: traced anew, not taken from JAX's cache
        return jax.jit(lambda *a: fn(*a)).lower(*args).compile()


def run_model(name: str, blocks: int, repeats: int, only: list[str] | None) -> dict:
    rows, args = _rows(name)
    out = {}
    for row, fn in rows.items():
        if only and not any(o in row for o in only):
            continue
        calls = {v: _compiled(fn, args, v) for v in VARIANTS}
        runs = alternated({v: functools.partial(calls[v], *args) for v in VARIANTS},
                          blocks, repeats)
        out[row] = {v: dict(warm_s=statistics.median(r), runs=r) for v, r in runs.items()}
        a, h = (out[row][v]["warm_s"] for v in VARIANTS)
        out[row]["ratio"] = a / h
        print(f"{name:12s}  {row:28s}  {a * 1e3:9.1f} ms  {h * 1e3:9.1f} ms  {a / h:6.2f}",
              flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_mlp"])
    parser.add_argument("--rows", nargs="+", default=None,
                        help="only the rows whose names contain one of these")
    parser.add_argument("--blocks", type=int, default=6, help="alternated blocks per row")
    parser.add_argument("--repeats", type=int, default=5, help="calls per block")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    results = dict(run_header("bench_lapack_in_jit.py", argv), models={})
    print(f"{'model':12s}  {'row':28s}  {'as written':>12s}  {'held':>12s}  written/held")
    for name in args.models:
        results["models"][name] = run_model(name, args.blocks, args.repeats, args.rows)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
