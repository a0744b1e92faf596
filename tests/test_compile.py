"""``_compile.model_jit`` and ``_compile.factorisation_jit``: jaxgeom's compiled functions
with their compile options (the steps that run the model: XLA's own convolution kernels
on the CPU; the factorisations: XLA:CPU's quick fusion emitters), top-level or nested in
another ``jit``."""

import re
import subprocess
import sys
from importlib.metadata import version

import chex
import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from pmat_checks import compilations

from jaxgeom import (
    FIM,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    _compile,
    _dispatch,
)
from jaxgeom.layers import LayerCollection


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
    YNNPACK, whether or not XLA's default puts it inside one (jaxlib 0.10.2 does, 0.10.0
    does not)."""
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU compiler option")
    x = jax.ShapeDtypeStruct((16, 16, 16, 32), jnp.float32)
    w = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)

    def step(x, w):
        return jax.grad(lambda w: jnp.sum(_conv(x, w) ** 2))(w)

    plain = jax.jit(step).lower(x, w).compile().as_text()
    model = _compile.model_jit(step).lower(x, w).compile().as_text()
    assert "convolution(" in model and "convolution(" in plain
    assert _convolutions_in_ynn_fusions(model) == 0


@pytest.mark.parametrize("jit", [_compile.model_jit, _compile.factorisation_jit])
def test_jit_top_level_nested_and_transformed(jit):
    """The same numbers as the function, called directly (with the options), inside
    another ``jit`` (without: JAX takes compile options from the outer one only), under
    ``grad`` and ``vmap``, with static and donated arguments."""
    f = jit(lambda x, *, k: jnp.sin(x) * k, static_argnames=("k",))
    x = jnp.linspace(0.0, 1.0, 5)
    np.testing.assert_allclose(f(x, k=2), 2 * np.sin(x), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda x: f(x, k=3) + 1)(x), 3 * np.sin(x) + 1,
                               rtol=1e-12)
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(f(x, k=2)))(x), 2 * np.cos(x),
                               rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(lambda r: f(r, k=2))(jnp.stack([x, -x])),
                               2 * np.sin(np.stack([x, -x])), rtol=1e-12)
    add = jit(lambda total, x: total + x, donate_argnums=0)
    np.testing.assert_allclose(add(jnp.ones(5), x), 1 + x, rtol=1e-12)
    assert f.eval_shape(x, k=2).shape == (5,)


def test_factorisations_compile_with_the_quick_emitters(monkeypatch):
    """A factorisation's options are :data:`FAST_COMPILE` where this jaxlib has the quick
    emitters (0.10; 0.11 removed them: then none), a model step's do not hold it; a
    factorisation compiled with them computes what XLA's default kernels do (a Cholesky
    solve with element-wise work, a reduction and a transpose)."""
    (name, value), = _compile.FAST_COMPILE.items()
    known = _compile._accepted(name, value)
    assert known or tuple(int(p) for p in version("jaxlib").split(".")[:2]) != (0, 10)
    monkeypatch.setenv("XLA_FLAGS", "")  # this suite's conftest sets the option itself
    _compile.compile_options.cache_clear()
    try:
        assert _compile.factorisation_compile_options() == (
            _compile.FAST_COMPILE if known else None)
        assert _compile.model_compile_options() == {
            _compile.CONVOLUTION_OPTION: _compile.CONVOLUTION_VALUE}
    finally:
        _compile.compile_options.cache_clear()

    def work(m, v):
        s = m @ m.T + jnp.eye(m.shape[0])
        w = jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(s), v)
        return jnp.tanh(w) * jnp.sum(m**2, axis=1), jnp.max(jnp.abs(m.T), axis=0)

    rng = np.random.default_rng(0)
    m, v = rng.standard_normal((33, 20)), rng.standard_normal(33)
    ours, default = _compile.factorisation_jit(work)(m, v), jax.jit(work)(m, v)
    for a, b in zip(ours, default):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_eager_operations_compile_as_factorisations_where_listed():
    """An eager operation in a representation's ``FACTORISING_OPERATIONS`` is compiled
    with the factorisations' options (Dense ``solve``, a Cholesky), any other with XLA's
    defaults (Dense ``trace``, Diag ``solve``: element-wise)."""
    layout = LayerCollection.from_params({"w": jnp.zeros(7)})
    a = np.random.default_rng(1).standard_normal((7, 7))
    dense = PMatDense(layout, jnp.asarray(a @ a.T))
    diag = PMatDiag(layout, jnp.asarray(np.diag(a @ a.T)))
    v = {"w": jnp.arange(7.0)}

    def compilations():
        return (_dispatch._compiled_factorisation._cache_size(),
                _dispatch._compiled_call._cache_size())

    before = compilations()
    x = dense.solve(v, 0.5)["w"]
    after_solve = compilations()
    np.testing.assert_allclose(x, np.linalg.solve(a @ a.T + 0.5 * np.eye(7), np.arange(7.0)),
                               rtol=1e-10)
    dense.trace(), diag.solve(v, 0.5)
    after_others = compilations()
    assert after_solve == (before[0] + 1, before[1])
    assert after_others == (after_solve[0], after_solve[1] + 2)
    assert PMatDiag.FACTORISING_OPERATIONS == ()
    assert "solve" in PMatDense.FACTORISING_OPERATIONS


def test_compile_options_defer_to_xla_flags(monkeypatch):
    """An option is left to the user when ``XLA_FLAGS`` sets it."""
    clear = _compile.compile_options.cache_clear
    clear()
    try:
        options = _compile.model_compile_options()
        assert options == {_compile.CONVOLUTION_OPTION: _compile.CONVOLUTION_VALUE}
        clear()
        monkeypatch.setenv("XLA_FLAGS",
                           f"--{_compile.CONVOLUTION_OPTION}=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
        assert _compile.model_compile_options() is None
        clear()
        (name, _), = _compile.FAST_COMPILE.items()
        monkeypatch.setenv("XLA_FLAGS", f"--{name}=true")
        assert _compile.factorisation_compile_options() is None
    finally:
        clear()


def test_own_options_are_checked_in_one_compilation(monkeypatch):
    """Whether this XLA takes jaxgeom's options is asked once for all of them: the
    options of a model step and of a factorisation cost one compilation of an empty
    program between them, not one each."""
    monkeypatch.setenv("XLA_FLAGS", "")  # this suite's conftest sets an option itself
    caches = (_compile.compile_options, _compile._accepted, _compile._compiles_with)

    def clear():
        for cache in caches:
            cache.cache_clear()

    clear()
    try:
        with compilations() as compiled:
            step = _compile.model_compile_options()
            factorisation = _compile.factorisation_compile_options()
        # a jaxlib without one of them (0.11 has no quick emitters) asks each alone after
        everything = _compile._compiles_with(_compile.OWN_OPTIONS)  # cached: not compiled
        assert compiled == ["<lambda>"] * (1 if everything else 1 + len(_compile.OWN_OPTIONS))
        assert step == {_compile.CONVOLUTION_OPTION: _compile.CONVOLUTION_VALUE}
        quick = everything or _compile._compiles_with(tuple(_compile.FAST_COMPILE.items()))
        assert factorisation == (_compile.FAST_COMPILE if quick else None)
    finally:
        clear()


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
    known = (("xla_cpu_scheduler_type", "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"),)
    unknown = (("xla_cpu_no_such_option_in_any_xla", True),)
    options = _compile.model_compile_options(known + unknown)
    assert options == {_compile.CONVOLUTION_OPTION: _compile.CONVOLUTION_VALUE, **dict(known)}


def _shape_names(tree) -> set[str]:
    """``"f64[6,150]"`` for each array leaf of ``tree``, as an HLO module writes shapes."""
    return {f"{jnp.dtype(a.dtype).name.replace('float', 'f')}[{','.join(map(str, a.shape))}]"
            for a in jax.tree_util.tree_leaves(tree)}


def _cosine_vector(params):
    return jax.tree_util.tree_map(lambda p: jnp.cos(jnp.arange(p.size).reshape(p.shape)), params)


def _large_constants(compiled_text: str) -> set[str]:
    """The shapes of the constants of 64 entries or more in an optimised HLO module."""
    shapes = re.findall(r"= (\w+)\[([\d,]*)\]\S* constant\(", compiled_text)
    return {f"{dtype}[{dims}]" for dtype, dims in shapes
            if np.prod([int(d) for d in dims.split(",") if d]) >= 64}


@pytest.mark.parametrize("representation", [PMatKFAC, PMatDiag])
@pytest.mark.parametrize("data", ["closed over", "computed from a constant"])
def test_a_jit_over_constant_data_leaves_the_build_to_run_time(representation, data):
    """XLA evaluates at compile time whatever a program computes from constants alone, at a
    few hundred million multiply-adds a second: a user's ``jit`` closing over its data
    (``jax.jit(lambda p: FIM(f, p, (x, y), PMatKFAC))``) compiled bench_mlp's KFAC in 6.2
    instead of 0.4 s, folding ``aᵀa``. The steps' arguments sit behind a barrier: the data
    (here 6 × 150: a 151² input factor, ``a²`` for the diagonal) are the program's only
    large constants, and the numbers are the eager build's."""
    task = models.make_linen_wide_mlp()
    x, y = task.x, task.y
    scale = 2.0 if data == "computed from a constant" else 1.0

    def build(params):
        return FIM(task.apply_fn, params, (x * scale, y), representation)

    compiled = jax.jit(build).lower(task.params).compile().as_text()
    assert _large_constants(compiled) <= _shape_names(x)
    expected = FIM(task.apply_fn, task.params, (x * scale, y), representation)
    np.testing.assert_allclose(jax.jit(build)(task.params).to_dense(), expected.to_dense(),
                               rtol=1e-10, atol=1e-12)


def test_a_jit_over_a_stored_implicit_matrix_leaves_its_products_to_run_time():
    """A ``PMatImplicit`` closed over in a ``jit`` (its parameters and data constants of
    the program) computes its products at run time: its compiled ``mv`` holds no constant
    but the stored parameters and data (a folded forward pass would hold the hidden
    layer's ``6 × 130`` activations; bench_cnn's ``mv`` compiled in 23.9 s that way), for
    the eager product's numbers."""
    task = models.make_linen_wide_hidden()
    F = FIM(task.apply_fn, task.params, (task.x, task.y), PMatImplicit)
    v = _cosine_vector(task.params)
    product = jax.jit(lambda v: F.mv(v))
    stored = _shape_names((task.params, task.x))
    assert _large_constants(product.lower(v).compile().as_text()) <= stored
    chex.assert_trees_all_close(product(v), F.mv(v), rtol=1e-10, atol=1e-12)


def test_a_jit_over_a_stored_matrix_leaves_its_operations_to_run_time():
    """A ``PMatLowRank`` closed over in a ``jit``, solved against the ``jit``'s argument:
    the Gram of its factor is computed at run time (folded, bench_small's 10240 × 6922
    factor compiled in 27.7 against 4.4 s as an argument), the program's only large
    constants are the stored arrays, for the eager solve's numbers."""
    task = models.make_linen_wide_hidden()
    F = FIM(task.apply_fn, task.params, (task.x, task.y), PMatLowRank)
    v = _cosine_vector(task.params)
    solve = jax.jit(lambda v: F.solve(v, 0.1))
    stored = _shape_names(F)
    assert _large_constants(solve.lower(v).compile().as_text()) <= stored
    chex.assert_trees_all_close(solve(v), F.solve(v, 0.1), rtol=1e-10, atol=1e-12)


def test_staged_tells_a_jit_from_an_eager_transform():
    """``staged`` is true for values being staged into a ``jit`` (also under ``grad`` or
    ``vmap`` inside it), false for concrete arrays and for the tracers of an eager
    ``grad`` or ``vmap``."""
    seen = []

    def probe(x):
        seen.append(_compile.staged(x))
        return jnp.sum(x ** 2)

    x = jnp.ones(3)
    probe(x)
    jax.grad(probe)(x)
    jax.vmap(probe)(x[:, None])
    jax.jit(probe)(x)
    jax.jit(jax.grad(probe))(x + 1)
    jax.jit(jax.vmap(probe))(x[:, None] + 1)
    jax.vmap(jax.grad(probe))(x[:, None] + 2)
    assert seen == [False, False, False, True, True, True, False]
