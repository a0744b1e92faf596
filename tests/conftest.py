"""Tests run in float64 on CPU so that brute-force references are exact to ~1e-12."""

import jax

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_platforms", "cpu")
