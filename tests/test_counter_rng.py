"""The counter-based draws of the Monte-Carlo Fisher: JAX's Threefry hash bit for bit, and
uniform/normal draws with the right moments, independent across examples and keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.extend.random import threefry_2x32

from jaxgeom._counter_rng import bits, draw_key, normal, threefry2x32, uniform

KEY = jax.random.key(0)


def test_threefry_is_jax_threefry_bit_for_bit():
    rng = np.random.default_rng(0)
    for _ in range(5):
        key = jnp.asarray(rng.integers(0, 2**32, 2, dtype=np.uint32))
        x0, x1 = (jnp.asarray(rng.integers(0, 2**32, 1000, dtype=np.uint32)) for _ in range(2))
        want = threefry_2x32(key, jnp.concatenate([x0, x1]))
        got = jax.jit(threefry2x32)(key, x0, x1)
        np.testing.assert_array_equal(jnp.concatenate(got), want)


def test_draw_key_reads_a_threefry_key_and_draws_from_any_other():
    typed, raw = jax.random.key(7), jax.random.PRNGKey(7)
    np.testing.assert_array_equal(draw_key(typed), draw_key(raw))
    assert draw_key(typed).dtype == jnp.uint32 and draw_key(typed).shape == (2,)
    # the draws have their own key: not the user's words
    assert not np.array_equal(draw_key(raw), raw)
    rbg = draw_key(jax.random.key(7, impl="rbg"))
    assert rbg.shape == (2,) and rbg.dtype == jnp.uint32
    keys = {tuple(np.asarray(draw_key(jax.random.key(s)))) for s in range(50)}
    assert len(keys) == 50


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_uniform_draws_are_uniform_and_independent_across_examples(dtype):
    n, t = 20_000, 4
    u = jax.vmap(lambda i: uniform(draw_key(KEY), i, (t,), dtype))(jnp.arange(n))
    assert u.shape == (n, t) and u.dtype == dtype
    assert float(u.min()) >= 0 and float(u.max()) < 1
    flat = np.sort(np.asarray(u, np.float64).ravel())
    # Kolmogorov–Smirnov: P(D > 1.63/√m) ≈ 0.01 under uniformity
    ks = np.max(np.abs(flat - np.arange(1, flat.size + 1) / flat.size))
    assert ks < 1.63 / np.sqrt(flat.size)
    # neither consecutive examples nor the draws of one example are correlated (std 1/√n)
    c = np.asarray(u, np.float64) - 0.5
    assert abs(np.mean(c[1:, 0] * c[:-1, 0]) * 12) < 5 / np.sqrt(n)
    assert abs(np.mean(c[:, 0] * c[:, 1]) * 12) < 5 / np.sqrt(n)
    other = jax.vmap(lambda i: uniform(draw_key(jax.random.key(1)), i, (t,), dtype))(jnp.arange(n))
    assert abs(np.mean(c * (np.asarray(other, np.float64) - 0.5)) * 12) < 5 / np.sqrt(n * t)


def test_float64_uniforms_carry_52_random_bits():
    u = np.asarray(uniform(draw_key(KEY), 0, (10_000,), jnp.float64))
    low = (u * 2.0**52).astype(np.int64) & 0xFFFFF  # the bits below float32's 23
    assert len(np.unique(low)) > 9_000


def test_normal_draws_have_standard_moments():
    z = np.asarray(normal(draw_key(KEY), 3, (200_000,), jnp.float64))
    assert np.all(np.isfinite(z))
    m = z.size
    assert abs(z.mean()) < 5 / np.sqrt(m)
    assert abs(z.var() - 1) < 5 * np.sqrt(2 / m)
    assert abs(np.mean(z**4) - 3) < 5 * np.sqrt(96 / m)


def test_bits_of_an_example_do_not_depend_on_how_many_are_drawn():
    few, many = bits(draw_key(KEY), 5, (3,)), bits(draw_key(KEY), 5, (2, 4))
    np.testing.assert_array_equal(few[0], many[0].ravel()[:3])
    assert not np.array_equal(bits(draw_key(KEY), 6, (3,))[0], few[0])


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_uniforms_stay_below_one_and_fill_their_grid(dtype):
    """A float32 uniform rounded to 8 or 11 significant bits reached 1.0 (≈ 1 draw in
    600 in bfloat16), and a normal drawn from it was infinite."""
    key = draw_key(jax.random.key(0))
    u = np.asarray(uniform(key, jnp.uint32(0), (100_000,), dtype).astype(jnp.float32))
    steps = 2 ** jnp.finfo(dtype).nmant
    assert u.min() >= 0 and u.max() < 1
    np.testing.assert_array_equal(np.unique(u), np.arange(steps) / steps)  # every value
    assert abs(u.mean() - (1 - 1 / steps) / 2) < 0.01
    assert np.isfinite(np.asarray(normal(key, jnp.uint32(0), (100_000,), dtype))).all()
