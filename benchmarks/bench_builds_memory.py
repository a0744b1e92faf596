"""Peak memory of the dense and block-diagonal builds, called eagerly and inside a ``jit``,
each case in its own process.

Usage::

    python benchmarks/bench_builds_memory.py --out results.json      # all cases (~4 min)
    python benchmarks/bench_builds_memory.py --cases PMatDense:jit
    python benchmarks/bench_builds_memory.py --report results.json   # the table of a run

A build's ``(d, d)`` Gram (bench_small: float32, ``d = 6922``, 183 MiB; BlockDiag's blocks
85 MiB) is a running total updated chunk by chunk, then mirrored and divided. Called
eagerly, each chunk is a compiled step that donates the total; inside your ``jit`` the
chunks are one ``lax.scan`` and XLA plans the whole program's scratch itself. For each
representation, exact (``FIM``) and Monte-Carlo (``FIM_MonteCarlo``, one trial) builds,
the child process builds once (compilation), then measures one warm build: its peak
resident memory above the memory before it (the kernel's high-water mark, reset through
``/proc/self/clear_refs``), against the result's storage, and the median time of warm
builds; inside a ``jit`` also XLA's planned scratch (``memory_analysis().temp_size``).
The target: a peak within 1.5× the storage plus one chunk's activations.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from bench_dense_memory import _measure, _storage_mib  # noqa: E402
from output import in_child, write_json  # noqa: E402

REPRESENTATIONS = ("PMatDense", "PMatBlockDiag")
CASES = tuple(f"{rep}:{builder}:{mode}" for rep in REPRESENTATIONS
              for builder in ("exact", "mc") for mode in ("eager", "jit"))
REPEATS = 3


def run_case(case: str, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import jaxgeom as jg

    rep, builder, mode = case.split(":")
    spec = models.SPECS["bench_small"]
    params = models.init_params(spec)
    x, y = models.make_data(spec)
    apply_fn = models.make_apply(spec)
    data = (jnp.asarray(x), jnp.asarray(y))
    key = jax.random.key(0)

    def build(params, data):
        if builder == "exact":
            return jg.FIM(apply_fn, params, data, getattr(jg, rep), batch_size=spec.batch_size)
        return jg.FIM_MonteCarlo(apply_fn, params, data, getattr(jg, rep), key=key,
                                 batch_size=spec.batch_size)

    scratch = None
    if mode == "jit":
        compiled = jax.jit(build).lower(params, data).compile()
        scratch = compiled.memory_analysis().temp_size_in_bytes / 2**20
        call = lambda: compiled(params, data)  # noqa: E731
    else:
        call = lambda: build(params, data)  # noqa: E731
    storage = _storage_mib(jax.block_until_ready(call()))
    return dict(case=case, model=spec.name, scratch_mib=scratch,
                **_measure(call, storage, storage, repeats))


def print_table(results: dict) -> None:
    print(f"{'case':<28} {'storage MiB':>11} {'scratch MiB':>11} {'peak MiB':>9} "
          f"{'peak/storage':>12} {'first s':>8} {'warm s':>8}")
    for r in results["cases"]:
        if "error" in r:
            print(f"{r['case']:<28} error: {r['error']}")
            continue
        scratch = "" if r["scratch_mib"] is None else f"{r['scratch_mib']:.1f}"
        print(f"{r['case']:<28} {r['storage_mib']:>11.1f} {scratch:>11} {r['peak_mib']:>9.1f} "
              f"{r['peak_over_result']:>11.2f}x {r['first_s']:>8.2f} {r['warm_s']:>8.3f}")


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", help="write the results as JSON here")
    parser.add_argument("--report", help="print the table of a saved run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_case(args.child, args.repeats)))
        return None
    if args.report:
        with open(args.report) as f:
            results = json.load(f)
        print_table(results)
        return results
    from bench_fim import versions

    results = dict(versions=versions(), repeats=args.repeats,
                   cases=[in_child(__file__, case, args.repeats, args.timeout)
                          for case in args.cases])
    print_table(results)
    write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
