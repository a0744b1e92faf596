"""jaxgeom's model steps inside loops: conjugate gradient under ``jit`` and a user's
``lax.scan`` of builds, against the same work at the top level.

XLA:CPU runs a convolution outside its canonical layout through a generic loop nest when
the convolution sits in a loop body (jax#12868), and the convolutions reverse mode makes
are never canonical; jaxgeom writes every step's convolutions in the canonical layout
(``jaxgeom/_convolutions.py``). This script times, per model:

- ``build`` / ``build_mc``: one ``PMatDiag`` exact build and one ``PMatKFAC`` Monte-Carlo
  build called at the top level, and ``scan … /build``: the same build inside a jitted
  ``lax.scan`` of ``--steps`` steps (as in a training loop), per build;
- ``Implicit mv``: one jitted product of ``PMatImplicit``; ``Implicit CG/iter``: its jitted
  conjugate-gradient solve (a ``while_loop`` of products, ``--maxiter`` iterations) and the
  eager one (iterations driven from Python), per iteration.

Medians of ``--repeats`` warm calls, the first call (compilation included) apart; a table
on stdout and ``--out`` JSON. Run it on another revision of jaxgeom by putting that
revision first on ``PYTHONPATH``::

    python benchmarks/bench_loops.py --models bench_cnn --out loops.json
    git worktree add /tmp/before 742fe48
    PYTHONPATH=/tmp/before python benchmarks/bench_loops.py --models bench_cnn
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
from output import timed, write_json


def run_model(name: str, steps: int, maxiter: int, repeats: int) -> dict:
    import jaxgeom

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    bs = spec.batch_size
    key = jax.random.key(3)

    def diag(p):
        return jaxgeom.FIM(apply_fn, p, (x, y), jaxgeom.PMatDiag, variant="classif_logits",
                           batch_size=bs)

    def kfac_mc(p, k=key):
        return jaxgeom.FIM_MonteCarlo(apply_fn, p, (x, y), jaxgeom.PMatKFAC, key=k, trials=1,
                                      batch_size=bs)

    def scanned(build):
        def step(p, k):
            # new parameters at each step (a training loop's), and every array of the
            # representation out of the loop: XLA can neither hoist nor skip any of the work
            return (jax.tree_util.tree_map(lambda a: a * 0.999, p),
                    jax.tree_util.tree_leaves(build(p, k)))
        keys = jax.random.split(key, steps)
        return jax.jit(lambda p: jax.lax.scan(step, p, keys)[1])

    rows: dict = {}
    rows["PMatDiag build"] = timed(lambda: diag(params), repeats)
    scanned_diag = scanned(lambda p, k: diag(p))
    rows[f"PMatDiag scan of {steps} builds"] = timed(lambda: scanned_diag(params), repeats)
    rows["PMatKFAC build_mc"] = timed(lambda: kfac_mc(params), repeats)
    scanned_kfac = scanned(kfac_mc)
    rows[f"PMatKFAC scan of {steps} builds_mc"] = timed(lambda: scanned_kfac(params), repeats)

    F = jaxgeom.FIM(apply_fn, params, (x, y), jaxgeom.PMatImplicit, variant="classif_logits",
                    batch_size=bs)
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    mv = jax.jit(lambda m, v: m.mv(v))
    solve = jax.jit(lambda m, v: m.solve(v, 1e-3, maxiter=maxiter))
    rows["PMatImplicit mv (jit)"] = timed(lambda: mv(F, v), repeats)
    rows[f"PMatImplicit CG, {maxiter} iterations (jit)"] = timed(lambda: solve(F, v), repeats)
    rows[f"PMatImplicit CG, {maxiter} iterations (eager)"] = timed(
        lambda: F.solve(v, 1e-3, maxiter=maxiter), repeats)
    return rows


def per_unit(row: str, steps: int, maxiter: int) -> tuple[int, str]:
    """How many builds or iterations a row's call makes, and the unit's name."""
    if "scan of" in row:
        return steps, "build"
    if "CG," in row:
        return maxiter, "iteration"
    return 1, "call"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_cnn"])
    parser.add_argument("--steps", type=int, default=2, help="builds in the scan")
    parser.add_argument("--maxiter", type=int, default=5, help="CG iterations")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    import jaxgeom

    results = dict(jaxgeom=jaxgeom.__file__, jax=jax.__version__, models={})
    print(f"{'model':12s}  {'row':40s}  {'warm':>10s}  {'per unit':>16s}  {'first':>9s}")
    for name in args.models:
        rows = run_model(name, args.steps, args.maxiter, args.repeats)
        results["models"][name] = rows
        for row, t in rows.items():
            count, unit = per_unit(row, args.steps, args.maxiter)
            print(f"{name:12s}  {row:40s}  {t['warm_s'] * 1e3:8.1f} ms  "
                  f"{t['warm_s'] / count * 1e3:8.1f} ms/{unit:9s} {t['first_s']:7.2f} s")
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
