"""``_convolutions.canonical_convolutions``: every plain convolution in XLA:CPU's canonical
layout (``b01f_01io->b01f``), in loops too, with the same numbers."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_cnn

from jaxgeom import FIM, random_pvector
from jaxgeom._convolutions import canonical_convolutions, canonical_dimension_numbers
from jaxgeom.pmat.implicit import PMatImplicit

CANONICAL_2D = "b01f_01io->b01f"


def _layouts(jitted, *args) -> set[str]:
    """The layouts (``dim_labels``) of the convolutions of a lowered program: what
    jaxgeom emits, before any XLA pass."""
    return set(re.findall(r"dim_labels=([\w>-]+)", jitted.lower(*args).as_text(dialect="hlo")))


def _permuted(a, src: str, dst: str):
    return jnp.transpose(a, [src.index(c) for c in dst])


@pytest.mark.parametrize("numbers", [
    ("NHWC", "HWIO", "NHWC"),   # canonical already
    ("NCHW", "OIHW", "NCHW"),   # PyTorch's
    ("NHWC", "OIHW", "NCHW"),
    ("CHWN", "IOWH", "HNCW"),   # every axis somewhere else
])
def test_same_numbers_and_gradients_in_any_layout(numbers):
    """A strided, padded, dilated convolution and its input and kernel gradients (the
    transposed convolutions reverse mode makes) equal the original's."""
    x = jax.random.normal(jax.random.key(0), (3, 9, 11, 4))   # NHWC
    w = jax.random.normal(jax.random.key(1), (3, 2, 4, 5))    # HWIO
    lhs, rhs, out = numbers

    def loss(x, w):
        y = jax.lax.conv_general_dilated(
            _permuted(x, "NHWC", lhs), _permuted(w, "HWIO", rhs), (2, 1), [(1, 2), (0, 1)],
            lhs_dilation=(1, 2), rhs_dilation=(2, 1), dimension_numbers=numbers)
        return jnp.sum(jnp.tanh(y) * jnp.cos(jnp.arange(y.size).reshape(y.shape)))

    grads = jax.value_and_grad(loss, argnums=(0, 1))
    expected = jax.jit(grads)(x, w)
    rewritten = jax.jit(canonical_convolutions(grads))
    for got, want in zip(jax.tree_util.tree_leaves(rewritten(x, w)),
                         jax.tree_util.tree_leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert _layouts(rewritten, x, w) == {CANONICAL_2D}


def test_one_and_three_spatial_dimensions():
    numbers_1d = ("NCW", "OIW", "NCW")
    x1, w1 = jnp.cos(jnp.arange(2 * 3 * 8.0)).reshape(2, 3, 8), jnp.ones((4, 3, 3))
    f1 = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
        x1, w, (1,), "SAME", dimension_numbers=numbers_1d) ** 2))
    np.testing.assert_allclose(jax.jit(canonical_convolutions(f1))(w1), f1(w1), rtol=1e-12)
    assert _layouts(jax.jit(canonical_convolutions(f1)), w1) == {"b0f_0io->b0f"}

    numbers_3d = ("NCDHW", "OIDHW", "NCDHW")
    x3 = jnp.sin(jnp.arange(2 * 2 * 4 * 5 * 3.0)).reshape(2, 2, 4, 5, 3)
    w3 = jnp.ones((3, 2, 2, 2, 2))
    f3 = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
        x3, w, (1, 1, 1), "VALID", dimension_numbers=numbers_3d) ** 2))
    np.testing.assert_allclose(jax.jit(canonical_convolutions(f3))(w3), f3(w3), rtol=1e-12)
    assert _layouts(jax.jit(canonical_convolutions(f3)), w3) == {"b012f_012io->b012f"}
    assert tuple(canonical_dimension_numbers(3)) == ((0, 4, 1, 2, 3), (4, 3, 0, 1, 2),
                                                     (0, 4, 1, 2, 3))


def test_convolutions_inside_loops_branches_and_checkpoints():
    """The kernel gradient inside ``scan`` (with ``checkpoint`` and ``cond`` in its body)
    and ``lax.map``: XLA leaves such a convolution in reverse mode's layout
    (``f01b_i01o->01bf``, jax#12868, 20–200× slower on the CPU); rewritten, every one is
    canonical and the numbers are the same."""
    x = jax.random.normal(jax.random.key(0), (4, 10, 12, 5))
    w = jax.random.normal(jax.random.key(1), (3, 2, 5, 7))
    grad = jax.grad(lambda w: jnp.sum(jnp.tanh(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))

    def looped(w):
        def body(c, i):
            g = jax.checkpoint(grad)(c * (1 + 0.1 * i))
            g = jax.lax.cond(i > 1, lambda a: 2.0 * a, lambda a: a, g)
            return c + 1e-3 * g, jnp.sum(g)

        final, sums = jax.lax.scan(body, w, jnp.arange(3.0))
        return final, sums, jax.lax.map(lambda s: jnp.sum(grad(w * s)), jnp.arange(1.0, 3.0))

    plain, rewritten = jax.jit(looped), jax.jit(canonical_convolutions(looped))
    assert "f01b_i01o->01bf" in _layouts(plain, w)
    assert _layouts(rewritten, w) == {CANONICAL_2D}
    for got, want in zip(rewritten(w), plain(w)):
        np.testing.assert_allclose(got, want, rtol=1e-11, atol=1e-12)


def test_grouped_convolutions_are_left_alone():
    """A depthwise convolution (``feature_group_count``) and its kernel gradient
    (``batch_group_count``) keep their layout and their numbers."""
    x = jax.random.normal(jax.random.key(0), (2, 4, 7, 7))   # NCHW, 4 channels
    w = jax.random.normal(jax.random.key(1), (4, 1, 3, 3))   # one filter per channel
    grad = jax.grad(lambda w: jnp.sum(jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"),
        feature_group_count=4) ** 2))
    rewritten = jax.jit(canonical_convolutions(grad))
    np.testing.assert_allclose(rewritten(w), grad(w), rtol=1e-12)
    assert _layouts(rewritten, w) == _layouts(jax.jit(grad), w)


def test_static_arguments_pass_through():
    def scaled_conv(x, w, *, scale, numbers):
        return scale * jax.lax.conv_general_dilated(x, w, (1,), "VALID",
                                                    dimension_numbers=numbers)

    f = jax.jit(canonical_convolutions(scaled_conv), static_argnames=("scale", "numbers"))
    x, w = jnp.cos(jnp.arange(12.0)).reshape(1, 2, 6), jnp.ones((3, 2, 2))
    np.testing.assert_allclose(f(x, w, scale=2.0, numbers=("NCW", "OIW", "NCW")),
                               2 * scaled_conv(x, w, scale=1.0, numbers=("NCW", "OIW", "NCW")),
                               rtol=1e-12)


def test_implicit_cg_under_jit_runs_canonical_convolutions():
    """Conjugate gradient on a CNN's ``PMatImplicit`` under ``jit`` is a ``while_loop`` of
    products: every convolution of its program (the model's, its ``jvp``'s and its
    transposes) is canonical, and the solve is the eager one's."""
    if jax.default_backend() != "cpu":
        pytest.skip("the model steps are rewritten for XLA:CPU only")
    t = make_linen_cnn()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=2)
    v = random_pvector(jax.random.PRNGKey(4), t.params)
    solve = jax.jit(lambda F, v: F.solve(v, 1e-3, maxiter=3))
    assert _layouts(solve, F, v) == {CANONICAL_2D}
    np.testing.assert_allclose(solve(F, v).to_flat(), F.solve(v, 1e-3, maxiter=3).to_flat(),
                               rtol=1e-9, atol=1e-12)
