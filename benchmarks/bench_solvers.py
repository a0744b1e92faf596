"""jaxgeom's iterative solves (``M.solve(v, regul, method=...)``: conjugate gradient, MINRES,
the Neumann series) on the suite's models, against their products alone and against
SciPy's ``cg``/``minres`` driving the same products.

Per model, on the exact Fisher as a ``PMatImplicit`` (each product one pass over the data),
a ``PMatKFAC`` and a ``PMatDiag`` (products of microseconds: the solver's own work shows),
``n`` iterations of each method for ``n`` in ``--iterations`` (``rtol=0``, ``maxiter=n``;
``num_terms=n + 1``: ``n`` products, with the default ``scale = 1/(‖M‖_F + regul)``
computed once beforehand), called eagerly and under ``jit`` (the matrix an
argument): the first call (compilation included) and the median of ``--repeats`` warm
calls, apart. The **floor** is ``n`` products of ``M`` one after the other
(``bench_estimators.products_floor``, same mode); the table gives each row as a multiple of
it. **SciPy** (where installed): ``scipy.sparse.linalg.cg``/``minres`` with the same
``n`` iterations on a ``LinearOperator`` whose product is ``M.mv`` (eager jaxgeom, a
NumPy copy each way), the per-iteration bookkeeping of a NumPy loop. A table on stdout
and ``--out`` JSON::

    python benchmarks/bench_solvers.py --out solvers.json
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
import numpy as np
from bench_estimators import products_floor
from output import floor_table, timed

REGUL = 1e-3


def solve_call(method: str, n: int, jit: bool):
    def solve(M, v, scale):
        options = ({"num_terms": n + 1, "scale": scale} if method == "neumann"
                   else {"rtol": 0.0, "maxiter": n})
        return M.solve(v, REGUL, method=method, **options)
    return jax.jit(solve) if jit else solve


def scipy_call(method: str, n: int, M, v):
    """SciPy's solver, ``n`` iterations, on ``M.mv`` (eager) as a ``LinearOperator``."""
    from scipy.sparse.linalg import LinearOperator, cg, minres

    d = M.size(0)
    operator = LinearOperator((d, d), matvec=lambda x: np.asarray(
        M.mv(jnp.asarray(x, M.dtype))) + REGUL * x, dtype=np.float32)
    b = np.asarray(v[0])
    solver = {"cg": cg, "minres": minres}[method]
    return lambda: solver(operator, b, rtol=1e-30, maxiter=n)[0]


def run_model(name: str, iterations: list[int], repeats: int) -> dict:
    import jaxgeom

    try:
        import scipy  # noqa: F401
        have_scipy = True
    except ImportError:
        have_scipy = False
        print("scipy not installed: no SciPy rows")
    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    rows: dict = {}
    for rep in (jaxgeom.PMatImplicit, jaxgeom.PMatKFAC, jaxgeom.PMatDiag):
        M = jaxgeom.FIM(apply_fn, params, (x, y), rep, variant="classif_logits",
                        batch_size=spec.batch_size)
        jax.block_until_ready(M)
        v = jax.random.normal(jax.random.key(5), (1, M.size(0)), M.dtype)
        # Neumann's default scale, 1/(‖M‖_F + regul), computed once: the rows time the
        # iterations (a PMatImplicit's Frobenius norm costs (N K)² d, more than the terms)
        scale = 1 / (float(M.frobenius_norm()) + REGUL)
        for n in iterations:
            for jit in (False, True):
                mode = "jit" if jit else "eager"
                rows[f"{rep.__name__} {n} products ({mode}, floor)"] = timed(
                    functools.partial(products_floor(n, jit), M, v), repeats)
                for method in ("cg", "minres", "neumann"):
                    rows[f"{rep.__name__} {method} n={n} ({mode})"] = timed(
                        functools.partial(solve_call(method, n, jit), M, v[0], scale), repeats)
            if have_scipy:
                for method in ("cg", "minres"):
                    rows[f"{rep.__name__} scipy {method} n={n} (eager)"] = timed(
                        scipy_call(method, n, M, v), repeats)
    return rows


def floor_of(row: str, rows: dict) -> dict | None:
    if "floor" in row:
        return None
    rep, rest = row.split(" ", 1)
    n = rest.split("n=")[1].split(" ")[0]
    mode = rest.rsplit("(", 1)[1].rstrip(")")
    return rows.get(f"{rep} {n} products ({mode}, floor)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp"])
    parser.add_argument("--iterations", nargs="+", type=int, default=[20, 100])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return floor_table(args.models, lambda name: run_model(name, args.iterations, args.repeats),
                       floor_of, args.out, width=46)


if __name__ == "__main__":
    main()
