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


def test_extra_options_taken_when_this_xla_knows_them():
    """``model_compile_options(extra)`` adds the options this XLA compiles with and drops
    one it does not know (no error: an older or newer jaxlib builds as before)."""
    known = tuple(_compile.MEMORY_SCHEDULE.items())
    unknown = (("xla_cpu_no_such_option_in_any_xla", True),)
    options = _compile.model_compile_options(known + unknown)
    assert options == {_compile.CONVOLUTION_OPTION: _compile.CONVOLUTION_VALUE,
                       **_compile.MEMORY_SCHEDULE}


def test_memory_schedule_does_not_keep_independent_products_alive():
    """A running total updated by ten independent block products (a symmetric Gram's upper
    blocks, as the dense build's step): compiled with :data:`MEMORY_SCHEDULE` its
    temporaries hold fewer of the products at once than with XLA's default schedule, for
    the same numbers."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU compiler option")
    blocks = [slice(256 * i, 256 * (i + 1)) for i in range(4)]

    def add_upper_blocks(total, x):
        for i in range(4):
            for j in range(i, 4):
                total = total.at[blocks[i], blocks[j]].add(x[:, blocks[i]].T @ x[:, blocks[j]])
        return total

    args = (jax.ShapeDtypeStruct((1024, 1024), jnp.float32),
            jax.ShapeDtypeStruct((512, 1024), jnp.float32))
    temp = {}
    for name, extra in (("default", None), ("memory", _compile.MEMORY_SCHEDULE)):
        step = _compile.model_jit(add_upper_blocks, donate_argnums=0, compiler_options=extra)
        temp[name] = step.lower(*args).compile().memory_analysis().temp_size_in_bytes
    product = 256 * 256 * 4
    assert temp["memory"] <= temp["default"] - 4 * product
    x = np.random.default_rng(0).standard_normal((512, 1024)).astype(np.float32)
    step = _compile.model_jit(add_upper_blocks, donate_argnums=0,
                              compiler_options=_compile.MEMORY_SCHEDULE)
    upper = np.asarray(step(jnp.zeros((1024, 1024), jnp.float32), jnp.asarray(x)))
    gram = x.astype(np.float64).T @ x
    for i in range(4):
        for j in range(i, 4):
            np.testing.assert_allclose(upper[blocks[i], blocks[j]], gram[blocks[i], blocks[j]],
                                       rtol=1e-4, atol=1e-3)
