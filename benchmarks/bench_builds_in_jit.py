"""Builds inside your ``jit``: the chunks as one ``lax.scan``, or one nested step each.

Inside a ``jit``, jaxgeom streams the chunks of data in memory — a build's, and those of
``PMatImplicit``'s products — with ``lax.scan`` (``jaxgeom.streaming.scan_chunks``: the
chunk's step traced once, two chunks an iteration). Eagerly, and before this change inside
a ``jit`` too, each chunk is one call of the chunk's step, which a trace inlines: ``c``
chunks, ``c`` copies. This script compiles
each row both ways in one process — ``scan`` (jaxgeom as it is) and ``unrolled`` (the
scan patched out while the row is traced) — and times the two programs in alternated
blocks of ``--repeats`` calls (``--blocks`` of them, each after an untimed call). It also
reports each program's compile time and the scratch memory XLA plans for it
(``memory_analysis().temp_size_in_bytes``: besides its inputs and outputs).

Rows (each one ``jit``, the data closed over, the chunk size the model's ``batch_size``
or ``--batch-size``):

- ``REP build``, ``REP build_mc``: the exact and the Monte-Carlo Fisher (one trial);
- ``REP step``: a training step's curvature — the gradient of the mean cross-entropy, the
  Monte-Carlo Fisher and its ``solve`` of the gradient (KFAC: π damping);
- ``PMatImplicit mv``, ``vTMv``, ``step (CG, 10 iterations)``: its products, whose chunk
  loop is scanned the same way (``ReplayedFunction.SCANS_CHUNKS``), and a Hessian-free
  step (the gradient, and 10 iterations of conjugate gradient on the exact Fisher);
  ``PFMapImplicit jvp``, ``vjp``: the Jacobian map's products (a vector, all-ones
  cotangents); ``PMatImplicitHessian mv``, ``step (CG, 10 iterations)``: the implicit
  Hessian of the mean cross-entropy (its chunks unpadded, ``streaming.scan_real_chunks``),
  its ``mv`` and a Newton-CG step (damping 1);
- ``GramMatrix``, ``CrossGramMatrix (N/4 × N)``: the empirical NTK and the test × train
  kernel, whose pairs of windows are scanned too (``jaxgeom.gram._scanned_pairs``);
  ``GramMatrix (implicit, N/4)`` (models of at most 10⁵ parameters): by products, its
  windows scanned;
- ``K-FAC …``, ``Diag …``: a step of ``jaxgeom.optim.scale_by_natural_gradient`` (the
  gradient, ``update`` and ``optax.apply_updates``), as in ``bench_optim.py``: K-FAC with
  the Monte-Carlo and the exact Fisher every step, K-FAC π with an EMA and its inverse
  every 10 steps (a step that does not refresh the inverse), Diag with the Monte-Carlo
  Fisher.

Medians, and ``unrolled / scan`` (> 1: the scan faster). A table on stdout and ``--out``
JSON::

    python benchmarks/bench_builds_in_jit.py --models bench_small bench_mlp --out builds-in-jit.json
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from typing import Any

import jax
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
import optax
from output import alternated, run_header, write_json

VARIANTS = ("unrolled", "scan")
REPRESENTATIONS = ("PMatKFAC", "PMatDiag", "PMatQuasiDiag", "PMatEKFAC", "PMatImplicit",
                   "GramMatrix")


def _rows(name: str, representations: list[str], transforms: bool,
          batch_size: int | None = None) -> tuple[dict, Any, dict]:
    """``row -> fn(params, state)``, the parameters, and each transform row's state."""
    import jax.numpy as jnp

    import jaxgeom as jg
    from jaxgeom.optim import scale_by_natural_gradient

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    key, regul = jax.random.key(3), 1e-3
    chunk = {"batch_size": batch_size or spec.batch_size}

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()

    rows = {}
    for rep_name in representations:
        rep = getattr(jg, rep_name)
        if rep is jg.PMatImplicit:  # no build: its products read the chunks
            rows.update(_implicit_rows(apply_fn, params, (x, y), chunk, loss, regul))
            continue
        if rep is jg.GramMatrix:
            rows.update(_gram_rows(apply_fn, params, x, chunk, models.num_params(spec)))
            continue
        solve = {"damping": "pi"} if rep is jg.PMatKFAC else {}
        rows[f"{rep_name} build"] = lambda p, s, rep=rep: jg.FIM(
            apply_fn, p, (x, y), rep, **chunk)
        rows[f"{rep_name} build_mc"] = lambda p, s, rep=rep: jg.FIM_MonteCarlo(
            apply_fn, p, (x, y), rep, key=key, **chunk)
        rows[f"{rep_name} step"] = lambda p, s, rep=rep, solve=solve: jg.FIM_MonteCarlo(
            apply_fn, p, (x, y), rep, key=key, **chunk).solve(jax.grad(loss)(p), regul, **solve)
    states = {}
    if transforms:
        configs = {
            "K-FAC (MC Fisher, every step)": (jg.PMatKFAC, dict(fisher="monte_carlo")),
            "K-FAC (exact Fisher, every step)": (jg.PMatKFAC, {}),
            "K-FAC π, EMA, inverse every 10": (jg.PMatKFAC, dict(
                ema=0.95, inverse_period=10, solve_options={"damping": "pi"})),
            "K-FAC π, MC Fisher, EMA, inverse every 10": (jg.PMatKFAC, dict(
                fisher="monte_carlo", ema=0.95, inverse_period=10,
                solve_options={"damping": "pi"})),
            "Diag (MC Fisher)": (jg.PMatDiag, dict(fisher="monte_carlo")),
        }
        for row, (rep, config) in configs.items():
            tx = scale_by_natural_gradient(rep, damping=1e-3, apply_fn=apply_fn,
                                           example_batch=(x, y), fim_options=chunk, **config)
            # a step that refreshes no cached inverse (count 1)
            states[row] = tx.init(params)._replace(count=jnp.ones((), jnp.int32))

            def step(p, s, tx=tx):
                updates, s = tx.update(jax.grad(loss)(p), s, p, batch=(x, y), key=key)
                return optax.apply_updates(p, updates), s

            rows[row] = step
    return rows, params, states


def _implicit_rows(apply_fn, params, data, chunk: dict, loss, regul: float) -> dict:
    """``PMatImplicit``'s rows (its ``mv`` and ``vTMv``, a Hessian-free step),
    ``PFMapImplicit``'s (``jvp``, ``vjp``) and the implicit Hessian's (``mv``, a Newton-CG
    step)."""
    import jax.numpy as jnp

    import jaxgeom as jg

    v = jg.random_pvector(jax.random.key(2), params)

    def implicit(p):
        return jg.FIM(apply_fn, p, data, jg.PMatImplicit, **chunk)

    def jacobian(p):
        return jg.Jacobian(apply_fn, p, data, jg.PFMapImplicit, **chunk)

    outputs = jax.eval_shape(apply_fn, params, data[0])  # (N, K)
    cotangents = jnp.ones(outputs.shape[::-1], outputs.dtype)

    def batch_loss(p, batch):
        return optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, batch[0]),
                                                               batch[1]).mean()

    def hessian(p):
        return jg.Hessian(batch_loss, p, data, jg.PMatImplicit, **chunk)

    return {
        "PMatImplicit mv": lambda p, s: implicit(p).mv(v),
        "PMatImplicit vTMv": lambda p, s: implicit(p).vTMv(v),
        "PMatImplicit step (CG, 10 iterations)": lambda p, s: implicit(p).solve(
            jax.grad(loss)(p), regul, maxiter=10),
        "PFMapImplicit jvp": lambda p, s: jacobian(p).jvp(v).data,
        "PFMapImplicit vjp": lambda p, s: jacobian(p).vjp(cotangents),
        "PMatImplicitHessian mv": lambda p, s: hessian(p).mv(v),
        "PMatImplicitHessian step (CG, 10 iterations)": lambda p, s: hessian(p).solve(
            jax.grad(loss)(p), 1.0, maxiter=10),
    }


def _gram_rows(apply_fn, params, x, chunk: dict, d: int) -> dict:
    """The empirical NTK's rows: ``GramMatrix`` (its pairs of windows scanned, ``jaxgeom.
    gram._scanned_pairs``), ``CrossGramMatrix`` of the first quarter of the examples
    against all of them, and, for models of at most 10⁵ parameters, ``GramMatrix`` of the
    first quarter by ``method="implicit"`` (a window's ``n K`` columns of ``d`` at a
    time)."""
    import jaxgeom as jg

    test = x[: x.shape[0] // 4]
    rows = {
        "GramMatrix": lambda p, s: jg.GramMatrix(apply_fn, p, x, **chunk).data,
        "CrossGramMatrix (N/4 × N)": lambda p, s: jg.CrossGramMatrix(apply_fn, p, test, x,
                                                                     **chunk),
    }
    if d <= 10**5:
        rows["GramMatrix (implicit, N/4)"] = lambda p, s: jg.GramMatrix(
            apply_fn, p, test, method="implicit", **chunk).data
    return rows


def _compiled(fn, args, variant: str):
    """``fn`` compiled with the chunks scanned (``scan``) or one nested step each
    (``unrolled``), and its compile time."""
    from jaxgeom import gram, streaming
    from jaxgeom.replay import ReplayedFunction

    saved, saved_pairs = streaming._scans, gram._scans
    if variant == "unrolled":
        streaming._scans = gram._scans = lambda *a: False
        ReplayedFunction.SCANS_CHUNKS = False
    try:  # a new function each time: traced anew, not taken from JAX's cache
        start = time.perf_counter()
        compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()
        return compiled, time.perf_counter() - start
    finally:
        streaming._scans, gram._scans = saved, saved_pairs
        ReplayedFunction.SCANS_CHUNKS = True


def run_model(name: str, representations: list[str], transforms: bool, blocks: int,
              repeats: int, batch_size: int | None = None) -> dict:
    rows, params, states = _rows(name, representations, transforms, batch_size)
    out = {}
    for row, fn in rows.items():
        args = (params, states.get(row))
        calls, record = {}, {}
        for v in VARIANTS:
            calls[v], compile_s = _compiled(fn, args, v)
            scratch = calls[v].memory_analysis()
            record[v] = dict(compile_s=compile_s,
                             temp_bytes=getattr(scratch, "temp_size_in_bytes", None))
        runs = alternated({v: functools.partial(calls[v], *args) for v in VARIANTS},
                          blocks, repeats)
        for v in VARIANTS:
            record[v].update(runs=runs[v], warm_s=statistics.median(runs[v]))
        u, s = (record[v]["warm_s"] for v in VARIANTS)
        out[row] = dict(record, ratio=u / s)
        cu, cs = (record[v]["compile_s"] for v in VARIANTS)
        mu, ms = (record[v]["temp_bytes"] or 0 for v in VARIANTS)
        print(f"{name:12s}  {row:44s}  {u * 1e3:9.2f} ms  {s * 1e3:9.2f} ms  {u / s:6.2f}"
              f"  {cu:6.2f} s  {cs:6.2f} s  {mu / 2**20:8.1f}  {ms / 2**20:8.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp"])
    parser.add_argument("--representations", nargs="+", default=list(REPRESENTATIONS))
    parser.add_argument("--no-transforms", action="store_true",
                        help="only the builds and steps, not the optax transforms' steps")
    parser.add_argument("--blocks", type=int, default=4, help="alternated blocks per row")
    parser.add_argument("--repeats", type=int, default=5, help="calls per block")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the chunk size (default: each model's batch_size)")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    results = dict(run_header("bench_builds_in_jit.py", argv), models={})
    print(f"{'model':12s}  {'row':44s}  {'unrolled':>12s}  {'scan':>12s}  ratio"
          f"  {'compile u':>8s}  {'compile s':>8s}  {'MiB u':>8s}  {'MiB s':>8s}")
    for name in args.models:
        results["models"][name] = run_model(name, args.representations,
                                            not args.no_transforms, args.blocks, args.repeats,
                                            args.batch_size)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
