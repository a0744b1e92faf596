"""One elementwise product, XLA:CPU against PyTorch, on every core and on one.

The sub-millisecond rows the suite has behind NNGeometry are mostly elementwise: a
``PMatDiag``'s ``mv`` is one product of the stored diagonal with the vector (bench_cnn:
69,610 floats, 0.09 ms against NNGeometry's 0.01). This script times that product alone,
``jax.jit(lambda a, b: a * b)`` against ``torch`` tensors' ``a * b``, at sizes from 4 k to
560 k float32 entries, plus bench_cnn's ``PMatDiag.mv`` under ``jit``; each setting in a
process of its own, once with the process on every core and once held to one core
(``os.sched_setaffinity``), so that XLA:CPU's runtime cannot hand parts of a program to
its other threads. Medians over ``--repeats`` warm calls. A table on stdout and ``--out``
JSON::

    python benchmarks/bench_elementwise.py --out elementwise.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from output import run_header, write_json

SIZES = (4_000, 16_000, 32_000, 70_000, 140_000, 560_000)


def _median_us(call, repeats: int) -> float:
    for _ in range(min(100, repeats)):
        call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e6


def _child(repeats: int) -> dict:
    """The timings in this process (its affinity set by the caller)."""
    import jax
    import jax.numpy as jnp

    product = jax.jit(lambda a, b: a * b)
    rows = {}
    for n in SIZES:
        a, b = jnp.ones(n, jnp.float32), jnp.full(n, 2.0, jnp.float32)
        rows[f"jax {n}"] = _median_us(
            lambda a=a, b=b: product(a, b).block_until_ready(), repeats)
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(len(os.sched_getaffinity(0)))
        for n in SIZES:
            a, b = torch.ones(n), torch.full((n,), 2.0)
            rows[f"torch {n}"] = _median_us(lambda a=a, b=b: a * b, repeats)

    import models  # benchmarks/models.py

    import jaxgeom

    spec = models.SPECS["bench_cnn"]
    apply_fn, params = models.make_apply(spec), models.init_params(spec)
    x, y = (jnp.asarray(v) for v in models.make_data(spec))
    D = jaxgeom.FIM(apply_fn, params, (x, y), jaxgeom.PMatDiag, batch_size=spec.batch_size)
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    mv = jax.jit(lambda m, v: m.mv(v))
    rows["bench_cnn PMatDiag.mv"] = _median_us(
        lambda: jax.block_until_ready(mv(D, v)), repeats)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--child", choices=("all", "one"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        if args.child == "one":
            os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        print(json.dumps(_child(args.repeats)))
        return {}
    results = dict(run_header("bench_elementwise.py", argv), cores={})
    for cores in ("all", "one"):
        done = subprocess.run([sys.executable, __file__, "--child", cores,
                               "--repeats", str(args.repeats)],
                              capture_output=True, text=True, check=True)
        results["cores"][cores] = json.loads(done.stdout.strip().splitlines()[-1])
    every, one = results["cores"]["all"], results["cores"]["one"]
    print(f"{'case':24s}  {'every core':>11s}  {'one core':>9s}  {'torch, every':>12s}  "
          f"{'torch, one':>10s}")
    for n in SIZES:
        peer = [f"{c.get(f'torch {n}', float('nan')):9.1f} µs" for c in (every, one)]
        print(f"{f'a * b, {n:,} floats':24s}  {every[f'jax {n}']:8.1f} µs  "
              f"{one[f'jax {n}']:6.1f} µs  {peer[0]:>12s}  {peer[1]:>10s}")
    key = "bench_cnn PMatDiag.mv"
    print(f"{key:24s}  {every[key]:8.1f} µs  {one[key]:6.1f} µs")
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
