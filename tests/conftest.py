"""Tests run in float64 on CPU so that brute-force references are exact to ~1e-12.

The test models are tiny, so XLA compilation (hundreds of small programs per file, one per
eager operation and shape), not execution, is what the suite spends its time on. Two
settings that never change what a program computes (beyond rounding) cut it by half:
XLA's optimisation passes off, and the CPU backend's older loop emitters, whose
compilation of small programs is much quicker. The benchmarks and the demo run with the
defaults.
"""

import os
from importlib.metadata import version

_FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false"
# XLA aborts on flags it does not know: set it only on the jaxlib releases checked with it.
if tuple(int(p) for p in version("jaxlib").split(".")[:2]) >= (0, 10) and (
    "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", "")
):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

import jax  # noqa: E402  (after XLA_FLAGS: the backend reads them when it starts)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_disable_most_optimizations", True)
