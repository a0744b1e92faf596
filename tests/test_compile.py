"""``_compile.model_jit``: the compiled steps that run the model, with XLA's own
convolution kernels on the CPU, top-level or nested in another ``jit``."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeom import _compile


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _convolutions_in_ynn_fusions(compiled_text: str) -> int:
    """How many convolutions of an optimised HLO module run inside a YNNPACK fusion."""
    bodies = dict(re.findall(r"^%(\S+) .*?\{\n(.*?)\n\}", compiled_text, re.S | re.M))
    called = re.findall(r"calls=%([\w.\-]+).*__ynn_fusion", compiled_text)
    return sum(bodies.get(name, "").count("convolution(") for name in called)


def test_model_steps_leave_convolutions_to_xla():
    """A float32 convolution (with its gradients) compiled as a model step runs outside
    YNNPACK; compiled by a plain ``jit`` on this jaxlib, it runs inside one."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU compiler option")
    x = jax.ShapeDtypeStruct((16, 16, 16, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)

    def step(x, w):
        return jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2))(w)

    plain = jax.jit(step).lower(x, w).compile().as_text()
    model = _compile.model_jit(step).lower(x, w).compile().as_text()
    assert "convolution(" in model
    assert _convolutions_in_ynn_fusions(plain) > 0  # XLA's default on this jaxlib
    assert _convolutions_in_ynn_fusions(model) == 0


def test_model_jit_top_level_nested_and_transformed():
    """The same numbers as the function, called directly (with the options), inside
    another ``jit`` (without: JAX takes compile options from the outer one only), under
    ``grad`` and ``vmap``, with static and donated arguments."""
    f = _compile.model_jit(lambda x, *, k: jnp.sin(x) * k, static_argnames=("k",))
    x = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(f(x, k=2), 2 * np.sin(x), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda x: f(x, k=3) + 1)(x), 3 * np.sin(x) + 1,
                               rtol=1e-12)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(f(x, k=2)))(x), 2 * np.cos(x),
                               rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(lambda r: f(r, k=2))(jnp.stack([x, -x])),
                               2 * np.sin(np.stack([x, -x])), rtol=1e-12)
    add = _compile.model_jit(lambda total, x: total + x, donate_argnums=0)
    np.testing.assert_allclose(add(jnp.ones(5), x), 1 + x, rtol=1e-12)
    assert f.eval_shape(x, k=2).shape == (5,)


def test_compile_options_defer_to_xla_flags(monkeypatch):
    """The option is left to the user when ``XLA_FLAGS`` sets it."""
    _compile.model_compile_options.cache_clear()
    try:
        options = _compile.model_compile_options()
        assert options == {_compile.CONVOLUTION_OPTION: _compile.CONVOLUTION_VALUE}
        _compile.model_compile_options.cache_clear()
        monkeypatch.setenv("XLA_FLAGS",
                           f"--{_compile.CONVOLUTION_OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
        assert _compile.model_compile_options() is None
    finally:
        _compile.model_compile_options.cache_clear()


def test_importing_jaxgeom_starts_no_backend():
    """``import jaxgeom`` starts no JAX backend (nothing is compiled or computed at import),
    so that the settings a user makes after it (``jax_platforms``,
    ``jax_cpu_enable_async_dispatch``, …) still apply."""
    code = ("import jaxgeom\n"
            "from jax._src import xla_bridge\n"
            "assert not xla_bridge.backends_are_initialized()\n")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
