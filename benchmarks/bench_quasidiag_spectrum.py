"""``PMatQuasiDiag``'s spectrum: bisection on an inertia count against ``eigh`` of the blocks.

``PMatQuasiDiag.eigvalsh`` (and ``norm(±2)``, ``logdet``, which use it) finds each neuron
block's ``a + 1`` eigenvalues by bisection on an ``O(a)`` inertia count
(``jaxgeom/pmat/_arrow.py``), never forming the ``(a + 1)²`` blocks. This script times it
against what it replaced, a batched ``eigh`` of the formed blocks per layer, both inside
one ``jit`` on the same matrix (built from the model's data, float32), in alternated
blocks of calls, and reads each compiled call's temporary memory from XLA
(``memory_analysis``). A table on stdout and ``--out`` JSON::

    python benchmarks/bench_quasidiag_spectrum.py --models bench_small bench_mlp bench_cnn
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import models  # benchmarks/models.py (run from the repository root or benchmarks/)
from output import alternated, run_header, write_json


def _eigh_of_blocks(Q):
    """The spectrum as computed before the bisection: the blocks formed, one ``eigh`` per
    layer."""
    values = [Q.diag[Q._alone]] + [jnp.linalg.eigvalsh(b).ravel() for b in Q._blocks()]
    return jnp.sort(jnp.concatenate(values))


def run_model(name: str, blocks: int, repeats: int) -> dict:
    import jaxgeom

    spec = models.SPECS[name]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    Q = jaxgeom.FIM(apply_fn, params, (x, y), jaxgeom.PMatQuasiDiag,
                    batch_size=spec.batch_size)
    fns = {"bisection": jax.jit(lambda M: M.eigvalsh()), "eigh": jax.jit(_eigh_of_blocks)}
    out = {}
    for method, fn in fns.items():
        start = time.perf_counter()
        compiled = fn.lower(Q).compile()
        compile_s = time.perf_counter() - start
        start = time.perf_counter()
        values = jax.block_until_ready(fn(Q))
        out[method] = dict(compile_s=compile_s, first_s=time.perf_counter() - start,
                           temp_bytes=compiled.memory_analysis().temp_size_in_bytes)
        out[method]["values"] = values
    difference = jnp.max(jnp.abs(out["bisection"].pop("values") - out["eigh"].pop("values")))
    runs = alternated({m: (lambda f=f: f(Q)) for m, f in fns.items()}, blocks, repeats)
    for method, times in runs.items():
        out[method].update(warm_s=statistics.median(times), runs=times)
    return dict(methods=out, params=Q.layer_collection.numel(),
                max_abs_difference=float(difference),
                spectral_norm=float(Q.norm(2)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_small", "bench_mlp", "bench_cnn"])
    parser.add_argument("--blocks", type=int, default=2, help="alternated blocks per row")
    parser.add_argument("--repeats", type=int, default=2, help="calls per block")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)
    results = dict(run_header("bench_quasidiag_spectrum.py", argv), models={})
    print(f"{'model':12s}  {'method':10s}  {'compile':>9s}  {'warm':>11s}  {'temp MiB':>9s}  "
          f"eigh/bisection  max |Δλ| / ‖M‖")
    for name in args.models:
        res = results["models"][name] = run_model(name, args.blocks, args.repeats)
        m = res["methods"]
        for method, t in m.items():
            ratio = m["eigh"]["warm_s"] / m["bisection"]["warm_s"]
            print(f"{name:12s}  {method:10s}  {t['compile_s']:7.2f} s  "
                  f"{t['warm_s'] * 1e3:8.1f} ms  {t['temp_bytes'] / 2**20:9.1f}  "
                  + (f"{ratio:14.2f}  {res['max_abs_difference'] / res['spectral_norm']:.1e}"
                     if method == "bisection" else ""))
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
