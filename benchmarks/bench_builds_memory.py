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

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import models  # noqa: E402
from bench_dense_memory import _measure, _storage_mib  # noqa: E402
from output import cases_main, print_cases  # noqa: E402

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
    print_cases(results, [("storage MiB", "storage_mib", ".1f"),
                          ("scratch MiB", "scratch_mib", ".1f"), ("peak MiB", "peak_mib", ".1f"),
                          ("peak/storage", "peak_over_result", ".2f"),
                          ("first s", "first_s", ".2f"), ("warm s", "warm_s", ".3f")])


def main(argv: list[str] | None = None) -> dict | None:
    return cases_main(__file__, __doc__, CASES, REPEATS, run_case, print_table, argv)


if __name__ == "__main__":
    main()
