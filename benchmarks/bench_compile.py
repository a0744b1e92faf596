"""Compile time and warm time of the operations under each of XLA:CPU's fusion emitters.

jaxgeom compiles the eager operations that factorise (``FACTORISING_OPERATIONS``: the
solves and spectral operations of Dense, BlockDiag, KFAC and LowRank) with XLA:CPU's
direct LLVM fusion emitters (``jaxgeom._compile.FAST_COMPILE``) and everything else with
XLA's default, MLIR-based ones. This script is the evidence for that split, and the way
to re-check it on a new jaxlib: for each (model, representation, operation) it lowers the
operation once (``jax.jit`` with the representation as an argument), compiles it both
ways, and times both executables alternately in the same process (medians of the warm
calls; the ratios are paired). A table on stdout and ``--out`` JSON::

    python benchmarks/bench_compile.py --out compile.json
    python benchmarks/bench_compile.py --models bench_mlp --representations PMatDiag \\
        --operations solve
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import bench_fim
from output import write_json

#: (model, representations) of the default run: every representation on the small MLP,
#: the structured ones on the two larger models
DEFAULT_CASES = {
    "bench_small": ("PMatDense", "PMatBlockDiag", "PMatDiag", "PMatKFAC", "PMatEKFAC",
                    "PMatQuasiDiag", "PMatLowRank"),
    "bench_mlp": ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag"),
    "bench_resnet": ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag"),
}
DEFAULT_OPERATIONS = bench_fim.OPERATIONS
OPERATIONS = (*DEFAULT_OPERATIONS, "eigvalsh")


def _call(op: str, rep: str, F):
    """``(F, v) ↦`` the operation, written as the suite writes it (KFAC's solve π-damped,
    a CG solve's ``maxiter``: :func:`bench_fim._operation`)."""
    if op == "eigvalsh":
        return lambda F, v: F.eigvalsh()
    return bench_fim._operation(op, rep, F)[0]


def compare(F, v, call, budget_s: float = 0.4) -> dict:
    """Compile ``call(F, v)`` (both arguments traced, as in the suite) with XLA's defaults
    and with the fast-compile options; time both executables alternately (at least 12
    calls each, more for fast calls)."""
    import jax

    from jaxgeom._compile import FAST_COMPILE

    lowered = jax.jit(call).lower(F, v)
    out = {}
    executables = {}
    for name, options in (("default", {}), ("fast_compile", FAST_COMPILE)):
        start = time.perf_counter()
        executables[name] = lowered.compile(compiler_options=options)
        out[f"{name}_compile_s"] = time.perf_counter() - start
    for executable in executables.values():
        for _ in range(3):
            jax.block_until_ready(executable(F, v))
    start = time.perf_counter()
    jax.block_until_ready(executables["default"](F, v))
    one = time.perf_counter() - start
    repeats = int(min(200, max(12, budget_s / max(one, 1e-6))))
    runs = {name: [] for name in executables}
    for i in range(repeats):
        order = list(executables) if i % 2 == 0 else list(executables)[::-1]
        for name in order:
            start = time.perf_counter()
            jax.block_until_ready(executables[name](F, v))
            runs[name].append(time.perf_counter() - start)
    for name, times in runs.items():
        out[f"{name}_warm_s"] = statistics.median(times)
    out["repeats"] = repeats
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--representations", nargs="+", default=None)
    parser.add_argument("--operations", nargs="+", default=list(DEFAULT_OPERATIONS),
                        choices=OPERATIONS)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    import jax
    import jax.numpy as jnp
    import models

    import jaxgeom

    results = dict(command="python benchmarks/bench_compile.py "
                   + " ".join(sys.argv[1:] if argv is None else argv),
                   versions=bench_fim.versions(), rows=[])
    print(f"{'model':12s}  {'representation':14s}  {'operation':14s}  {'compile ms':>19s}"
          f"  {'×':>5s}  {'warm ms':>21s}  {'×':>5s}")
    for model in args.models:
        spec = models.SPECS[model]
        params = models.init_params(spec)
        x, y = (jnp.asarray(a) for a in models.make_data(spec))
        apply_fn = models.make_apply(spec)
        v = jaxgeom.random_pvector(jax.random.key(2), params)
        for rep in args.representations or DEFAULT_CASES.get(model, spec.representations):
            F = jaxgeom.FIM(apply_fn, params, (x, y), getattr(jaxgeom, rep),
                            batch_size=spec.batch_size)
            for op in args.operations:
                row = dict(model=model, representation=rep, operation=op,
                           factorising=op in getattr(jaxgeom, rep).FACTORISING_OPERATIONS,
                           **compare(F, v, _call(op, rep, F)))
                results["rows"].append(row)
                c0, c1 = row["default_compile_s"], row["fast_compile_compile_s"]
                w0, w1 = row["default_warm_s"], row["fast_compile_warm_s"]
                print(f"{model:12s}  {rep:14s}  {op:14s}  {1e3 * c0:8.0f} → {1e3 * c1:8.0f}"
                      f"  {c1 / c0:5.2f}  {1e3 * w0:9.3f} → {1e3 * w1:9.3f}  {w1 / w0:5.2f}"
                      + ("  (compiled fast)" if row["factorising"] else ""), flush=True)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
