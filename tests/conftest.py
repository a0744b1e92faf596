"""Tests run in float64 on CPU so that brute-force references are exact to ~1e-12.

The test models are tiny, so XLA compilation (hundreds of small programs per file, one per
eager operation and shape), not execution, is what the suite spends its time on. Three
settings that never change what a program computes (beyond rounding) cut it by more than
half: XLA's optimisation passes off; the CPU backend's older loop emitters, whose
compilation of small programs is much quicker; and each program's machine code generated
in one piece (XLA splits it into parts compiled on threads of their own: for programs this
small, with two pytest workers on two cores, the split cost a sixth of the suite's time).
The benchmarks and the demo run with the defaults.

Programs recur across modules (the same model's build in several files, after each module
releases its programs, below) and across the two pytest workers: the run shares one
persistent compilation cache, a temporary directory the first process makes and its
workers inherit (``JAXGEOM_TEST_COMPILATION_CACHE``), removed at its end (seven of the
heaviest modules on 2 cores: 194 → 175 s). Programs that compile in under 20 ms are not
written: writing all of them was no quicker (182 s). Set that variable to a directory of
your own to keep the cache between runs.

``JAXGEOM_TEST_PLATFORM=cuda`` (or ``tpu``; a JAX platform name) runs the suite on an
accelerator instead, still in float64 (e.g. ``XLA_PYTHON_CLIENT_PREALLOCATE=false
JAXGEOM_TEST_PLATFORM=cuda pytest -n 4 tests`` on a GPU machine: without preallocation off
each worker would claim 75% of its memory).
"""

import gc
import os
import shutil
import tempfile
from importlib.metadata import version

_FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"
# XLA aborts on flags it does not know: set them only on the jaxlib releases checked with
# them (0.10; 0.11 removed the first, its fusion emitters being the only ones left).
if tuple(int(p) for p in version("jaxlib").split(".")[:2]) == (0, 10) and (
    "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# Two CPU devices for tests/test_sharding.py; everything else runs on the first (default).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=2".strip()
    )

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", os.environ.get("JAXGEOM_TEST_PLATFORM", "cpu"))
jax.config.update("jax_disable_most_optimizations", True)

_CACHE_VARIABLE = "JAXGEOM_TEST_COMPILATION_CACHE"
_OWNED_CACHE = None if _CACHE_VARIABLE in os.environ else tempfile.mkdtemp(prefix="jaxgeom-xla-")
if _OWNED_CACHE is not None:  # the pytest-xdist workers, started later, inherit it
    os.environ[_CACHE_VARIABLE] = _OWNED_CACHE
jax.config.update("jax_compilation_cache_dir", os.environ[_CACHE_VARIABLE])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.02)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
# Tracing allocates millions of short-lived objects: with Python's default thresholds
# (700, 10, 10) the cyclic collector ran about a thousand times per module, 6% of the
# suite's time (1.2 s of 64 against 3.9 s with these); each module's end collects (below).
gc.set_threshold(50_000, 20, 20)


def pytest_unconfigure(config):
    """The run's compilation cache removed by the process that made it."""
    if _OWNED_CACHE is not None:
        shutil.rmtree(_OWNED_CACHE, ignore_errors=True)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Each test module's compiled programs released after it: every XLA:CPU executable
    keeps its machine code mapped, and one pytest worker compiling thousands of them ran
    past the kernel's limit of memory maps (vm.max_map_count, 65530), which crashed a
    later compilation (a segfault in XLA's JIT)."""
    yield
    jax.clear_caches()
    gc.collect()
