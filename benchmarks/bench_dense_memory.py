"""Peak memory of forming a stored matrix densely: ``to_dense`` per representation and
``PFMapImplicit.to_dense_layer``, each case in its own process.

Usage::

    python benchmarks/bench_dense_memory.py --out results.json      # all cases (~3 min)
    python benchmarks/bench_dense_memory.py --cases PMatEKFAC PMatMixed
    python benchmarks/bench_dense_memory.py --report results.json   # the table of a run

``M.to_dense()`` writes the ``(d, d)`` matrix; whatever it holds besides is overhead (an
extra copy of the result, a ``kron`` of two bases, the blocks stacked before they are
placed). For each representation of ``bench_small`` (float32, ``d = 6922``, the result
183 MiB) the child process builds the matrix (exact Fisher, the spec's chunk size),
calls ``to_dense`` once (compilation), then measures one warm call: its peak resident
memory above the memory before it (the kernel's high-water mark, reset through
``/proc/self/clear_refs``), against the result's size, and the median time of warm calls.
``PMatMixed`` is K-FAC on the first layer and BlockDiag on the others.

``to_dense_layer``: the ``(K, N, d_l)`` columns of ``bench_mlp``'s first layer
(784 → 512, ``d_l = 401920``) from an implicit Jacobian of ``N = 32`` examples, streamed
from that layer's own Jacobian (the whole ``(K, N, d)`` map would be
10 · 32 · 669706 · 4 B = 817 MiB); the peak against the layer's columns (490 MiB).

Peaks are resident-set figures: XLA:CPU's allocator and the Python heap round them, so
ratios within a few percent of each other are the same.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from bench_fim import peak_mb  # noqa: E402
from output import cases_main, print_cases  # noqa: E402

REPRESENTATIONS = ("PMatDense", "PMatBlockDiag", "PMatDiag", "PMatKFAC", "PMatEKFAC",
                   "PMatQuasiDiag", "PMatLowRank", "PMatImplicit", "PMatMixed")
LAYER_CASE = "PFMapImplicit.to_dense_layer"
CASES = REPRESENTATIONS + (LAYER_CASE,)
REPEATS = 5


def _storage_mib(tree) -> float:
    import jax

    return sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(tree)
               if hasattr(a, "dtype")) / 2**20


def _measure(call, result_mib: float, storage_mib: float, repeats: int) -> dict:
    import jax

    start = time.perf_counter()
    jax.block_until_ready(call())
    first = time.perf_counter() - start
    peak = peak_mb(call)
    warm = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(call())
        warm.append(time.perf_counter() - start)
    return dict(first_s=first, warm_s=statistics.median(warm), peak_mib=peak,
                result_mib=result_mib, storage_mib=storage_mib,
                peak_over_result=peak / result_mib)


def run_case(case: str, repeats: int) -> dict:
    import jax.numpy as jnp

    import jaxgeom as jg

    if case == LAYER_CASE:
        spec = models.SPECS["bench_mlp"]
        params = models.init_params(spec)
        x, _ = models.make_data(spec, 32)
        J = jg.Jacobian(models.make_apply(spec), params, jnp.asarray(x), jg.PFMapImplicit,
                        batch_size=8)
        layer = J.layer_collection.layers[0]
        k, n, d_l = 10, 32, J.layer_collection.layer_numel(layer)
        return dict(case=case, model="bench_mlp", layer=layer.id, **_measure(
            lambda: J.to_dense_layer(layer), k * n * d_l * 4 / 2**20, 0.0, repeats))

    spec = models.SPECS["bench_small"]
    params = models.init_params(spec)
    x, y = models.make_data(spec)
    apply_fn = models.make_apply(spec)
    data = (jnp.asarray(x), jnp.asarray(y))
    if case == "PMatMixed":
        M = jg.FIM(apply_fn, params, data, jg.PMatMixed, batch_size=spec.batch_size,
                   mapping={"Dense_0": jg.PMatKFAC}, default=jg.PMatBlockDiag)
    else:
        M = jg.FIM(apply_fn, params, data, getattr(jg, case), batch_size=spec.batch_size)
    d = M.layer_collection.numel()
    storage = 0.0 if case == "PMatImplicit" else _storage_mib(M)
    return dict(case=case, model=spec.name, d=d,
                **_measure(M.to_dense, d * d * 4 / 2**20, storage, repeats))


def print_table(results: dict) -> None:
    print_cases(results, [("result MiB", "result_mib", ".1f"),
                          ("storage MiB", "storage_mib", ".1f"), ("peak MiB", "peak_mib", ".1f"),
                          ("peak/result", "peak_over_result", ".2f"), ("first s", "first_s", ".2f"),
                          ("warm s", "warm_s", ".3f")])


def main(argv: list[str] | None = None) -> dict | None:
    return cases_main(__file__, __doc__, CASES, REPEATS, run_case, print_table, argv)


if __name__ == "__main__":
    main()
