"""jaxgeom's matrix-free estimators (``jaxgeom.estimators``) on the suite's models: Lanczos
eigenpairs, stochastic Lanczos quadrature and Hutchinson's trace, against their floor.

Per model, on the exact Fisher as a ``PMatImplicit`` (each product one pass over the data)
and as a ``PMatDiag`` (products of a few microseconds: the estimator's own work shows):

- ``lanczos_eigsh(k=5, n)`` for ``n`` in ``--steps`` (top-5 Ritz pairs of ``n`` steps),
- ``lobpcg_eigsh(k=5, num_iterations=n)`` (LOBPCG: each iteration one block of up to
  15 products),
- ``restarted_lanczos_eigsh(k=5, ncv=20)`` with ``tol=0`` and as many restarts as make
  ``n`` products (thick-restart Lanczos: the memory of 21 vectors for any ``n``),
- ``lanczos_spectral_density(num_steps=n, num_probes=4)``,
- ``hutchinson_trace(num_samples=n)``,

each called eagerly and under ``jit`` (the matrix an argument): the first call
(compilation included) and the median of ``--repeats`` warm calls, apart. The **floor** of
a Lanczos row is its ``n`` products of ``M`` one after the other (``M.mmap`` of one row —
four for SLQ's probes, 15 for LOBPCG's blocks — ``n`` times, eagerly or inside one jitted
``fori_loop``), timed in the same run; the table gives each row's warm time as a multiple
of it, and for the eigenpair rows the largest residual ``‖M vⱼ − λⱼ vⱼ‖ / λ_max`` of the
five pairs (from ``M`` itself, after the timing), so that Lanczos and LOBPCG compare at
their accuracy. Then, eagerly, the same top-5 pairs to a tolerance (``--tol``, relative to
``λ_max``) with a basis of 20 vectors, by ``restarted_lanczos_eigsh`` and by SciPy's
ARPACK ``eigsh`` (implicitly restarted Lanczos, ``ncv=20``, the same ``tol`` — relative to each
``|λⱼ|``, stricter than ours for all but the top pair; its products are ``M.mv`` through
NumPy) when SciPy is installed, and by one cycle of ``lanczos_eigsh`` (at most 100 steps,
stopped at the first block end where the pairs have converged): each row's products
counted (a separate call) and its floor that many products timed, and each of ours
against ARPACK in ``--rounds`` paired rounds (a block of ``--repeats`` calls a side, the
order alternated: ARPACK's time over ours, the median of the rounds' ratios and its 95%
interval — these rows' separate medians, minutes apart, read 0.84× in one run and 1.2×
in another on the same code); then that
``lanczos_eigsh`` under ``jit``, with the ``tol`` (the blocks past the stop skipped) and
without (all 100 steps). ``--steps`` with no number: only these rows to a tolerance. A
table on stdout and ``--out`` JSON.

``--reorthogonalization partial`` runs the one-cycle Lanczos rows (``lanczos_eigsh``, SLQ)
with partial reorthogonalisation (Simon's ω-recurrence) instead of a pass at every step.

``--eager-forms`` times instead the randomised estimators (Hutchinson, Hutch++, XTrace,
XDiag, Lanczos eigenpairs, SLQ) on ``PMatDiag`` and ``PMatKFAC`` op by op, as the one
compiled program an eager call runs, and under ``jit``; each row's floor is its op-by-op
form.

Another revision of jaxgeom runs by putting it first on ``PYTHONPATH`` (e.g. the Lanczos
steps unrolled, before ``d28240d``)::

    python benchmarks/bench_estimators.py --out estimators.json
    git worktree add /tmp/before acc7c3e
    PYTHONPATH=/tmp/before python benchmarks/bench_estimators.py --out before.json
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
from output import floor_table, paired_ratio, timed


def products_floor(n: int, jit: bool):
    """``n`` products of ``M`` one after the other, each on the previous one's result
    (normalised): a Lanczos run's products without its reorthogonalisation."""
    def run(M, v):
        def step(_, v):
            w = M.mmap(v)
            return w / jnp.linalg.norm(w)
        if jit:
            return jax.lax.fori_loop(0, n, step, v)
        for i in range(n):
            v = step(i, v)
        return v
    return jax.jit(run) if jit else run


def fishers(name: str, representations: tuple[str, ...]):
    """``(class, F)`` for each representation: the exact Fisher of model ``name`` on its
    data, built and waited for."""
    import jaxgeom

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    for rep in representations:
        cls = getattr(jaxgeom, rep)
        yield cls, jax.block_until_ready(jaxgeom.FIM(
            apply_fn, params, (x, y), cls, variant="classif_logits", batch_size=spec.batch_size))


def run_model(name: str, steps: list[int], repeats: int, tol: float, rounds: int,
              reorthogonalization: str = "full") -> dict:
    """The rows of model ``name`` (module docstring): per ``n`` in ``steps`` (none: only
    the rows to a tolerance, :func:`to_tolerance`)."""
    from jaxgeom import estimators

    key = jax.random.key(3)
    rows: dict = {}
    for rep, M in fishers(name, ("PMatImplicit", "PMatDiag")):
        top = float(estimators.lanczos_eigenvalues(M, key, 100)[-1])  # λ_max, to scale
        probes = {r: jax.random.normal(jax.random.key(5), (r, M.size(0)), M.dtype)
                  for r in (1, 4, 15)}
        for n in steps:
            calls = {
                f"lanczos_eigsh k=5 n={n}": lambda M, k, n=n: estimators.lanczos_eigsh(
                    M, k, 5, num_iterations=n, reorthogonalization=reorthogonalization),
                f"restarted_lanczos_eigsh k=5 ncv=20 n={n}": lambda M, k, n=n: (
                    estimators.restarted_lanczos_eigsh(M, k, 5, ncv=20, tol=0,
                                                       max_restarts=(n - 20) // 8)),
                f"lanczos_spectral_density n={n} probes=4": lambda M, k, n=n: (
                    estimators.lanczos_spectral_density(
                        M, k, num_steps=n, num_probes=4,
                        reorthogonalization=reorthogonalization)),
                f"lobpcg_eigsh k=5 n={n}": lambda M, k, n=n: estimators.lobpcg_eigsh(
                    M, k, 5, num_iterations=n),
                f"hutchinson_trace samples={n}": lambda M, k, n=n: estimators.hutchinson_trace(
                    M, k, n),
            }
            for jit in (False, True):
                mode = "jit" if jit else "eager"
                for r, v in probes.items():
                    rows[f"{rep.__name__} {n} products of {r} rows ({mode}, floor)"] = timed(
                        functools.partial(products_floor(n, jit), M, v), repeats)
                for label, fn in calls.items():
                    row = rows[f"{rep.__name__} {label} ({mode})"] = timed(
                        functools.partial(jax.jit(fn) if jit else fn, M, key), repeats)
                    if "eigsh" in label:
                        row["max_relative_residual"] = max_relative_residual(
                            M, fn(M, key), top)
        rows.update(to_tolerance(M, rep.__name__, key, top, tol, repeats, rounds,
                                 reorthogonalization))
    return rows


#: the most steps of the one-cycle ``lanczos_eigsh`` rows to a tolerance
ONE_CYCLE_STEPS = 100


def to_tolerance(M, rep: str, key, top: float, tol: float, repeats: int, rounds: int,
                 reorthogonalization: str = "full") -> dict:
    """The top-5 eigenpairs of ``M`` to residuals ``≤ tol · λ_max``, eagerly:
    ``restarted_lanczos_eigsh`` (20 basis vectors), ``lanczos_eigsh`` (one cycle of at
    most :data:`ONE_CYCLE_STEPS` steps, stopped at a block's end) and SciPy's ARPACK
    (``ncv=20``), each with its counted products and a floor of that many products, and
    each of ours against ARPACK in ``rounds`` paired rounds of ``repeats`` calls a side
    (:func:`~output.paired_ratio`: ARPACK's time over ours, and its interval); then
    ``lanczos_eigsh`` under ``jit`` with that ``tol`` and without (all the steps)."""
    import numpy as np

    from jaxgeom import estimators

    d, rows = M.size(0), {}

    def counted(calls):
        def matvec(v):
            calls.append(1)
            return M.mv(v)
        return matvec

    def ours(matvec=None):
        return estimators.restarted_lanczos_eigsh(
            M if matvec is None else matvec, key, 5, ncv=20, tol=tol, max_restarts=1000,
            dim=None if matvec is None else d, dtype=M.dtype)

    def one_cycle(matvec=None):
        return estimators.lanczos_eigsh(
            M if matvec is None else matvec, key, 5, num_iterations=ONE_CYCLE_STEPS, tol=tol,
            dim=None if matvec is None else d, dtype=M.dtype,
            reorthogonalization=reorthogonalization)

    runs = {"restarted_lanczos_eigsh k=5 ncv=20": ours,
            f"lanczos_eigsh k=5 n≤{ONE_CYCLE_STEPS}": one_cycle}
    try:
        from scipy.sparse.linalg import LinearOperator, eigsh
    except ImportError:
        print("SciPy not installed: no ARPACK rows")
    else:
        def arpack(matvec=None):
            matvec = M.mv if matvec is None else matvec
            operator = LinearOperator((d, d), dtype=np.dtype(M.dtype),
                                      matvec=lambda v: np.asarray(matvec(jnp.asarray(v))))
            start = np.asarray(jax.random.normal(key, (d,), M.dtype))
            values, vectors = eigsh(operator, 5, which="LA", ncv=20, v0=start,
                                    tol=tol, maxiter=1000)
            return jnp.asarray(values), jnp.asarray(vectors)
        runs["scipy ARPACK eigsh k=5 ncv=20"] = arpack
    v = jax.random.normal(jax.random.key(5), (1, d), M.dtype)  # the floors' start vector
    for label, run in runs.items():
        calls: list = []
        run(counted(calls))
        row = rows[f"{rep} {label} tol={tol:g} (eager)"] = timed(run, repeats)
        row["products"] = len(calls)
        row["max_relative_residual"] = max_relative_residual(M, run(), top)
        rows[f"{rep} {len(calls)} products of 1 rows (eager, floor)"] = timed(
            functools.partial(products_floor(len(calls), False), M, v), repeats)
    arpack = runs.get("scipy ARPACK eigsh k=5 ncv=20")
    for label, run in runs.items():  # each of ours against ARPACK in paired rounds
        if arpack is not None and run is not arpack:
            rows[f"{rep} {label} tol={tol:g} (eager)"]["arpack"] = paired_ratio(
                run, arpack, rounds, repeats)
    # under jit (the matrix an argument): the blocks past the stop skipped, the same
    # products as eagerly (tests/test_estimators.py counts them), against all n steps
    steps = rows[f"{rep} lanczos_eigsh k=5 n≤{ONE_CYCLE_STEPS} tol={tol:g} (eager)"]
    for label, stop in ((f"n={ONE_CYCLE_STEPS}", None), (f"n≤{ONE_CYCLE_STEPS} tol={tol:g}", tol)):
        run = jax.jit(functools.partial(estimators.lanczos_eigsh, k=5,
                                        num_iterations=ONE_CYCLE_STEPS, tol=stop,
                                        reorthogonalization=reorthogonalization))
        row = rows[f"{rep} lanczos_eigsh k=5 {label} (jit)"] = timed(
            functools.partial(run, M, key), repeats)
        row["products"] = ONE_CYCLE_STEPS if stop is None else steps["products"]
        row["max_relative_residual"] = max_relative_residual(M, run(M, key), top)
    for n in {steps["products"], ONE_CYCLE_STEPS}:
        rows[f"{rep} {n} products of 1 rows (jit, floor)"] = timed(
            functools.partial(products_floor(n, True), M, v), repeats)
    return rows


#: the estimators timed by ``--eager-forms``: (label, function name, call)
EAGER_FORMS = (
    ("hutchinson_trace m=20", "hutchinson_trace", lambda f, M, k: f(M, k, 20)),
    ("hutchpp_trace m=21", "hutchpp_trace", lambda f, M, k: f(M, k, 21)),
    ("xtrace m=20", "xtrace", lambda f, M, k: f(M, k, 20)),
    ("xdiag m=20", "xdiag", lambda f, M, k: f(M, k, 20)),
    ("lanczos_eigsh k=5 n=20", "lanczos_eigsh", lambda f, M, k: f(M, k, 5, num_iterations=20)),
    ("lanczos_spectral_density n=20 probes=4", "lanczos_spectral_density",
     lambda f, M, k: f(M, k, num_steps=20, num_probes=4)),
)


def run_eager_forms(name: str, repeats: int) -> dict:
    """Each estimator of :data:`EAGER_FORMS` on the exact Fisher as ``PMatDiag`` and
    ``PMatKFAC``, three ways: op by op (the function as written, ``__wrapped__``: its
    probes, products and reductions dispatched one by one), as one compiled program (the
    eager call), and under the caller's ``jit``; the floor of a row is its op-by-op one."""
    from jaxgeom import estimators

    key = jax.random.key(3)
    rows: dict = {}
    for rep, M in fishers(name, ("PMatDiag", "PMatKFAC")):
        for label, function, call in EAGER_FORMS:
            estimator = getattr(estimators, function)
            forms = {"op by op": functools.partial(call, estimator.__wrapped__),
                     "one program": functools.partial(call, estimator),
                     "jit": jax.jit(functools.partial(call, estimator))}
            for form, run in forms.items():
                rows[f"{rep.__name__} {label} ({form})"] = timed(
                    functools.partial(run, M, key), repeats)
    return rows


def op_by_op_floor(row: str, rows: dict) -> dict | None:
    """The floor of an ``--eager-forms`` row: the same estimator op by op."""
    return rows.get(row.rsplit(" (", 1)[0] + " (op by op)")


def max_relative_residual(M, pairs, top: float) -> float:
    """``max_j ‖M vⱼ − λⱼ vⱼ‖ / λ_max`` of eigenpairs ``(λ, V)``, from ``M`` itself."""
    values, vectors = pairs
    products = M.mmap(vectors.T).T
    return float(jnp.max(jnp.linalg.norm(products - vectors * values, axis=0)) / top)


def floor_of(row: str, rows: dict) -> dict | None:
    """The floor of a Lanczos, LOBPCG or ARPACK row: the same number of products (rounds),
    on as many rows (4 for SLQ's probes, 15 for LOBPCG's blocks), same mode."""
    if not any(name in row for name in ("lanczos", "lobpcg", "ARPACK")):
        return None
    rep, rest = row.split(" ", 1)
    n = (rows[row]["products"] if "products" in rows[row]
         else rest.split("n=")[1].split(" ")[0].rstrip(")"))
    mode = rest.rsplit("(", 1)[1].rstrip(")")
    r = 4 if "probes=4" in row else 15 if "lobpcg" in row else 1
    return rows.get(f"{rep} {n} products of {r} rows ({mode}, floor)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp"])
    parser.add_argument("--steps", nargs="*", type=int, default=[20, 60],
                        help="the products of the fixed-length rows (none given: only the "
                             "rows to a tolerance)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tol", type=float, default=1e-3,
                        help="the residual, relative to λ_max, of the rows to a tolerance")
    parser.add_argument("--rounds", type=int, default=15,
                        help="the paired rounds of each row to a tolerance against ARPACK")
    parser.add_argument("--reorthogonalization", choices=("full", "partial"), default="full",
                        help="of the one-cycle Lanczos rows (lanczos_eigsh, SLQ)")
    parser.add_argument("--eager-forms", action="store_true",
                        help="instead: each estimator op by op, as one program and under "
                             "jit, on PMatDiag and PMatKFAC")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.eager_forms:
        return floor_table(args.models, lambda name: run_eager_forms(name, args.repeats),
                           op_by_op_floor, args.out)
    residual = ("residual, products, ARPACK / ours [interval]", lambda t: (
        f"{t['max_relative_residual']:9.1e}" if "max_relative_residual" in t else "")
        + (f"  {t['products']}" if "products" in t else "")
        + (f"  {t['arpack']['ratio']:.2f} [{t['arpack']['interval'][0]:.2f}, "
           f"{t['arpack']['interval'][1]:.2f}]" if "arpack" in t else ""))
    return floor_table(args.models,
                       lambda name: run_model(name, args.steps, args.repeats, args.tol,
                                              args.rounds, args.reorthogonalization),
                       floor_of, args.out, extra=residual)


if __name__ == "__main__":
    main()
