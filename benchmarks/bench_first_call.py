"""First calls in a new process, with and without JAX's persistent compilation cache.

A notebook restarted or a script run again compiles every build and operation anew.
This script times, each in a fresh process: the setup (the model's parameters and data,
which compile a few small programs too), the first build (``FIM`` of ``--representation``
on the whole data, in chunks of the model's ``batch_size``, or with ``--one-batch`` as one
chunk: ``FIM(apply_fn, params, (x, y), PMat)``, a notebook's call), its compilation time
(``build compile``: the sum of XLA's compilations, whose programs are listed with theirs),
the median of three warm builds after it (``warm build``), then the first eager call of
each of ``--operations`` on it (default ``mv`` and ``solve``; also ``solve_pi``, KFAC's
π-damped solve, ``eigvalsh`` and ``norm2``, the spectral norm). Three processes per model:
``no cache``; ``cache (filling)``, the first run with an empty cache directory; ``cache
(warm)``, the median of ``--repeats`` later runs reading it (``--no-cache``: the first
only). The cache is set as docs/performance.md says (``jax_compilation_cache_dir`` and
``jax_persistent_cache_min_compile_time_secs=0``). A table on stdout and ``--out`` JSON::

    python benchmarks/bench_first_call.py --out first.json
    python benchmarks/bench_first_call.py --models bench_cnn --representation PMatKFAC
    python benchmarks/bench_first_call.py --models bench_small --representation PMatDiag \
        --one-batch --no-cache
    python benchmarks/bench_first_call.py --models bench_small bench_mlp --representation PMatKFAC \
        --operations mv solve solve_pi eigvalsh --no-cache
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from output import write_json

OPERATIONS = ("mv", "solve", "solve_pi", "eigvalsh", "norm2")


def one_process(model: str, representation: str, cache: str | None,
                operations: list[str], one_batch: bool = False) -> dict:
    """Run :func:`child` in a new interpreter; its timings (seconds)."""
    env = dict(os.environ, JAXGEOM_BENCH_ONE_BATCH="1" if one_batch else "")
    if cache:
        env["JAXGEOM_BENCH_CACHE"] = cache
    else:
        env.pop("JAXGEOM_BENCH_CACHE", None)
    proc = subprocess.run([sys.executable, __file__, "--child", model, representation,
                           *operations],
                          env=env, capture_output=True, text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(model: str, representation: str, *operations: str) -> None:
    start = time.perf_counter()
    import jax

    cache = os.environ.get("JAXGEOM_BENCH_CACHE")
    if cache:
        jax.config.update("jax_compilation_cache_dir", cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    import jax.numpy as jnp
    import models
    from bench_fim import CompileCounter

    import jaxgeom

    spec = models.SPECS[model]
    params = models.init_params(spec)
    x, y = (jnp.asarray(a) for a in models.make_data(spec))
    apply_fn = models.make_apply(spec)
    t = {"setup": time.perf_counter() - start}
    counter = CompileCounter()
    start = time.perf_counter()
    chunks = {} if os.environ.get("JAXGEOM_BENCH_ONE_BATCH") else dict(
        batch_size=spec.batch_size)

    def build():
        return jax.block_until_ready(jaxgeom.FIM(apply_fn, params, (x, y),
                                                 getattr(jaxgeom, representation), **chunks))

    F = build()
    t["build"] = time.perf_counter() - start
    compiled = list(counter.compiled)
    t["build compile"] = sum(seconds for _, seconds in compiled)
    t["build programs"] = compiled
    warm = []
    for _ in range(3):
        start = time.perf_counter()
        build()
        warm.append(time.perf_counter() - start)
    t["warm build"] = statistics.median(warm)
    v = jaxgeom.random_pvector(jax.random.key(2), params)
    calls = {"mv": lambda: F.mv(v), "solve": lambda: F.solve(v, 1e-3),
             "solve_pi": lambda: F.solve(v, 1e-3, damping="pi"),
             "eigvalsh": lambda: F.eigvalsh(), "norm2": lambda: F.norm(2)}
    for name in operations or ("mv", "solve"):
        start = time.perf_counter()
        jax.block_until_ready(calls[name]())
        t[name] = time.perf_counter() - start
    print(json.dumps(t))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["bench_mlp", "bench_cnn"])
    parser.add_argument("--representation", default=None,
                        help="default: PMatEKFAC on bench_mlp, PMatKFAC on the others")
    parser.add_argument("--operations", nargs="+", default=["mv", "solve"], choices=OPERATIONS,
                        help="the eager calls timed after the build, in this order")
    parser.add_argument("--repeats", type=int, default=2, help="warm-cache processes")
    parser.add_argument("--one-batch", action="store_true",
                        help="build on the data as one chunk (no batch_size)")
    parser.add_argument("--no-cache", action="store_true",
                        help="only the process without the persistent cache")
    parser.add_argument("--out", default=None, help="write the results as JSON")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(*args.child)
        return {}
    results = dict(command="python benchmarks/bench_first_call.py "
                   + " ".join(sys.argv[1:] if argv is None else argv), cases={})
    rows = ("setup", "build", "build compile", "warm build", *args.operations)
    print(f"{'model':12s}  {'representation':14s}  {'run':16s}  "
          + "  ".join(f"{r:>10s}" for r in rows))
    for model in args.models:
        rep = args.representation or ("PMatEKFAC" if model == "bench_mlp" else "PMatKFAC")
        run = functools.partial(one_process, model, rep, operations=args.operations,
                                one_batch=args.one_batch)
        runs = {"no cache": run(None)}
        warm, size = [], 0
        if not args.no_cache:
            with tempfile.TemporaryDirectory() as cache:
                runs["cache (filling)"] = run(cache)
                warm = [run(cache) for _ in range(args.repeats)]
                runs["cache (warm)"] = {r: statistics.median(w[r] for w in warm) for r in rows}
                size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
        results["cases"][f"{model} {rep}"] = dict(runs=runs, warm_runs=warm, cache_bytes=size)
        for name, t in runs.items():
            print(f"{model:12s}  {rep:14s}  {name:16s}  "
                  + "  ".join(f"{t[r]:9.4f}s" for r in rows))
        print(f"{'':12s}  {'':14s}  first build compiled: " + ", ".join(
            f"{name} {seconds:.3f} s" for name, seconds in runs["no cache"]["build programs"]))
        if not args.no_cache:
            print(f"{'':12s}  {'':14s}  cache: {size / 2**20:.2f} MiB")
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
