"""``PMatImplicit.frobenius_norm`` as the number of chunks grows: by blocks of groups of
chunks against the blocks of every pair of chunks, eagerly and inside a ``jit``.

``‖M‖_F = |s|/N ‖J Jᵀ‖_F`` sums the squared blocks ``J_i J_jᵀ`` over pairs of parts of the
data (:func:`jaxgeom.gram.gram_norm_sq`). With more than ``NORM_GROUPS`` chunks whose
factors are kept, the parts are groups of consecutive chunks (``grouped``: 8 groups, 36
pairs, fewer where a block of two groups would outgrow one chunk's Jacobian); the
baseline (``pairs``: the same function with ``NORM_GROUPS`` and ``UNROLLED_PAIRS`` out of
reach) sums the ``C(C+1)/2`` blocks of the ``C`` chunks, unrolled inside a ``jit`` — the
code before grouping. For each model and ``batch_size`` (``C = ⌈N / batch_size⌉``), in
one process: the first call of each (trace and compile, with the eager one's steps
compiled afresh for each variant: ``jax.clear_caches()`` between them), then the warm
medians of both, timed in alternated blocks, and their ratio::

    python benchmarks/bench_implicit_norm.py --out implicit_norm.json
    python benchmarks/bench_implicit_norm.py --models bench_mlp --batch-sizes 64 16
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import models  # noqa: E402
from output import alternated, run_header, write_json  # noqa: E402

DEFAULT_BATCH_SIZES = {"bench_small": (256, 64, 32), "bench_mlp": (64, 32, 16)}


@contextlib.contextmanager
def pairs_of_chunks():
    """``gram_norm_sq`` as before grouping: every pair of chunks, unrolled in a ``jit``."""
    from jaxgeom import gram

    saved = gram.NORM_GROUPS, gram.UNROLLED_PAIRS
    gram.NORM_GROUPS = gram.UNROLLED_PAIRS = 10**9
    try:
        yield
    finally:
        gram.NORM_GROUPS, gram.UNROLLED_PAIRS = saved


def case(spec: models.Spec, batch_size: int, blocks: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxgeom

    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    F = jaxgeom.FIM(apply_fn, params, (x, y), jaxgeom.PMatImplicit, batch_size=batch_size)
    jitted = {name: jax.jit(lambda F: F.frobenius_norm()) for name in ("grouped", "pairs")}
    variants = {"grouped": contextlib.nullcontext, "pairs": pairs_of_chunks}
    calls = {}
    for name, context in variants.items():
        for where, call in (("eager", lambda: F.frobenius_norm()),
                            ("jit", lambda name=name: jitted[name](F))):
            def run(call=call, context=context):
                with context():
                    return call()
            calls[f"{where} {name}"] = run
    out = dict(model=spec.name, n=int(x.shape[0]), batch_size=batch_size,
               chunks=-(-int(x.shape[0]) // batch_size), first_s={}, warm_s={})
    values = {}
    for label, run in calls.items():
        if label.startswith("eager"):
            jax.clear_caches()  # the eager steps compiled afresh for each variant
        start = time.perf_counter()
        values[label] = float(jax.block_until_ready(run()))
        out["first_s"][label] = time.perf_counter() - start
    runs = alternated(calls, blocks, repeats)
    for label, times in runs.items():
        out["warm_s"][label] = statistics.median(times)
    out["values"] = values
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_BATCH_SIZES))
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=None)
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    args = parser.parse_args(argv)

    results = dict(run_header("bench_implicit_norm.py", argv), rows=[])
    print(f"{'model':12s} {'chunks':>6s}  {'where':5s}  {'first grouped':>13s}  "
          f"{'first pairs':>11s}  {'warm grouped':>12s}  {'warm pairs':>10s}  "
          f"{'pairs/grouped':>13s}")
    for name in args.models:
        for batch_size in args.batch_sizes or DEFAULT_BATCH_SIZES[name]:
            row = case(models.SPECS[name], batch_size, args.blocks, args.repeats)
            results["rows"].append(row)
            first, warm = row["first_s"], row["warm_s"]
            for where in ("eager", "jit"):
                g, p = f"{where} grouped", f"{where} pairs"
                print(f"{name:12s} {row['chunks']:6d}  {where:5s}  {first[g]:12.2f}s  "
                      f"{first[p]:10.2f}s  {warm[g] * 1e3:10.1f}ms  {warm[p] * 1e3:8.1f}ms  "
                      f"{warm[p] / warm[g]:12.2f}×", flush=True)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
