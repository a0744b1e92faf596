"""The eigenvalues of arrow blocks ``[[diag(D) + ρccᵀ, c], [cᵀ, β]]`` by bisection on an
inertia count (``PMatQuasiDiag``'s spectrum) against ``numpy.linalg.eigvalsh`` of the
blocks, in the cases that break a secular equation: dead inputs (``Dᵢ = cᵢ = 0``), tied
poles, ``c = 0``, graded diagonals, indefinite blocks, ``ρ`` of either sign or zero; and
their derivatives against ``eigh``'s."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeom.pmat._arrow import arrow_eigvalsh, blocks

G, A = 6, 9


def _pieces(seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.exponential(size=(G, A))), jnp.asarray(rng.exponential(size=G)),
            jnp.asarray(rng.normal(size=(G, A))), jnp.asarray(rng.normal(size=G)))


def _cases():
    D, beta, c, rho = _pieces()
    dead = (D.at[:, :3].set(0.0), beta, c.at[:, :3].set(0.0))
    tied = (D.at[:, 4].set(D[:, 5]).at[:, 1].set(D[:, 5]), beta, c)
    graded = D * 10.0 ** jnp.linspace(-12, 0, A)
    return {
        "arrow": (D, beta, c, None),
        "indefinite": (D - 1.0, -beta, c, None),
        "dead inputs": (*dead, None),
        "tied poles": (*tied, None),
        "tied poles, one c zero": (tied[0], beta, c.at[:, 5].set(0.0), None),
        "c zero: the diagonal": (D, beta, 0 * c, None),
        "zero blocks": (0 * D, 0 * beta, 0 * c, None),
        "graded": (graded, beta, 1e-3 * c * jnp.sqrt(graded), None),
        "rho of either sign": (D, beta, c, rho),
        "rho zero in some blocks": (D, beta, c, rho.at[:2].set(0.0)),
        "rho, dead inputs": (*dead, rho),
        "rho, tied poles": (*tied, -jnp.abs(rho)),
    }


@pytest.mark.parametrize("name", list(_cases()))
def test_eigenvalues_are_the_blocks(name):
    D, beta, c, rho = _cases()[name]
    want = np.linalg.eigvalsh(np.asarray(blocks(D, beta, c, rho)))
    got = np.asarray(jax.jit(arrow_eigvalsh)(D, beta, c, rho))
    assert got.shape == (G, A + 1)
    scale = np.abs(want).max(axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * scale.max())
    if name == "zero blocks":
        assert not got.any()  # exact zeros: log det is -inf, not a round-off log


def test_inverse_of_an_arrow():
    """An inverse's pieces (``ρ = s`` per neuron, closed form in ``PMatQuasiDiag.inv``):
    its eigenvalues are the reciprocals of the arrow's."""
    D, beta, c, _ = _pieces(1)
    beta = beta + 10.0  # positive definite
    inverse = np.linalg.inv(np.asarray(blocks(D, beta, c, None)))
    c_inv, beta_inv = inverse[:, :-1, -1], inverse[:, -1, -1]
    rho_inv = inverse[:, 0, 1] / (c_inv[:, 0] * c_inv[:, 1])
    D_inv = np.diagonal(inverse[:, :-1, :-1], axis1=1, axis2=2) - rho_inv[:, None] * c_inv**2
    got = arrow_eigvalsh(*map(jnp.asarray, (D_inv, beta_inv, c_inv, rho_inv)))
    want = np.sort(1 / np.asarray(arrow_eigvalsh(D, beta, c)), axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


@pytest.mark.parametrize("with_rho", [False, True])
def test_derivatives_are_eighs(with_rho):
    """``dλₖ = vₖᵀ dM vₖ``: reverse mode, forward mode and ``vmap`` agree with ``eigh``'s."""
    D, beta, c, rho = _pieces(2)
    rho = rho if with_rho else None

    def f(values):
        return jnp.sum(jnp.sin(values))

    ours = jax.grad(lambda *p: f(arrow_eigvalsh(*p, rho)), argnums=(0, 1, 2))(D, beta, c)
    theirs = jax.grad(lambda *p: f(jnp.linalg.eigvalsh(blocks(*p, rho))),
                      argnums=(0, 1, 2))(D, beta, c)
    for x, y in zip(ours, theirs):
        np.testing.assert_allclose(x, y, rtol=1e-9, atol=1e-12)
    tangent = jax.jvp(lambda s: arrow_eigvalsh(s * D, beta, c, rho), (1.0,), (1.0,))[1]
    reference = jax.jvp(lambda s: jnp.linalg.eigvalsh(blocks(s * D, beta, c, rho)),
                        (1.0,), (1.0,))[1]
    np.testing.assert_allclose(tangent, reference, rtol=1e-9, atol=1e-12)
    stacked = jax.vmap(lambda s: arrow_eigvalsh(s * D, beta, c, rho))(jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(stacked[1], arrow_eigvalsh(2 * D, beta, c, rho), rtol=1e-14)


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_relative_accuracy_in_a_bracket_over_many_binades(dtype):
    """Poles ``1`` and ``10¹⁶`` (``c = 0`` on the second): the eigenvalue near ``1`` lies in
    the bracket ``[1, 10¹⁶]``; halved arithmetically, ``nmant + 3`` times, it came out
    ``1.14`` (float64) instead of ``1.0002``. The spectrum is the second pole and the
    ``2 × 2`` block's roots, in closed form."""
    d1, big, c1, beta = 1.0, 1e16 if dtype == jnp.float64 else 1e8, 1e-2, 0.5
    mean, radius = (d1 + beta) / 2, np.hypot((d1 - beta) / 2, c1)
    want = [(d1 * beta - c1**2) / (mean + radius), mean + radius, big]
    got = arrow_eigvalsh(jnp.asarray([[d1, big]], dtype), jnp.asarray([beta], dtype),
                         jnp.asarray([[c1, 0.0]], dtype))
    assert got.dtype == dtype
    np.testing.assert_allclose(got[0], want, rtol=4 * np.finfo(dtype).eps)


def test_a_block_with_a_non_finite_entry_has_nan_eigenvalues():
    """As ``eigh``'s of such a block, and the other blocks unchanged."""
    D, beta, c, rho = _pieces(3)
    bad = D.at[1, 2].set(jnp.nan)
    for r in (None, rho):
        got, want = arrow_eigvalsh(bad, beta, c, r), arrow_eigvalsh(D, beta, c, r)
        assert np.isnan(got[1]).all()
        np.testing.assert_array_equal(np.delete(got, 1, axis=0), np.delete(want, 1, axis=0))
    assert np.isnan(arrow_eigvalsh(D, beta, c, rho.at[4].set(jnp.inf))[4]).all()


@pytest.mark.parametrize("dtype", [jnp.float64, jnp.float32])
def test_scaling_by_a_power_of_two_scales_the_eigenvalues_exactly(dtype):
    """``λ(2ᵏM) = 2ᵏλ(M)`` to the last bit, for ``k`` up to the largest exponent a block's
    entries allow: their squares and the brackets' widths overflowed (NaN and ``±inf``) and
    now every block is brought to a largest entry in ``[1, 2)`` first. (With ``ρ``, scaled
    by ``2⁻ᵏ``, ``k`` stops where ``ρ`` would leave the normal numbers.)"""
    D, beta, c, rho = (x.astype(dtype) for x in _pieces(4))
    info = np.finfo(dtype)
    largest = max(np.abs(np.asarray(x)).max() for x in (D, beta, c))
    top = info.maxexp - 2 - int(np.ceil(np.log2(largest)))
    for r, ks in ((None, (-20, 20, info.maxexp // 2, top)), (rho, (-20, 20, info.maxexp // 2))):
        base = np.asarray(arrow_eigvalsh(D, beta, c, r))
        for k in ks:
            s = dtype(2.0**k)
            scaled = arrow_eigvalsh(D * s, beta * s, c * s, None if r is None else r / s)
            np.testing.assert_array_equal(np.asarray(scaled), base * s, err_msg=f"2^{k}")


def test_entries_near_the_largest_float():
    """Poles at ``∓3·10³⁸`` (float32) with ``c = 0`` are eigenvalues beside ``β = 0``; the
    bracket's width, ``6·10³⁸``, overflowed (eigenvalue ``+inf``). Two couplings of ``10¹⁸``
    to poles ``0`` and ``10⁻³`` (their terms ``c²/(D − λ)`` overflowing with both signs: NaN
    counts) put an eigenvalue at their midpoint ``5·10⁻⁴``, between them by interlacing."""
    f32 = jnp.float32
    got = arrow_eigvalsh(jnp.asarray([[-3e38, 3e38]], f32), jnp.zeros(1, f32),
                         jnp.zeros((1, 2), f32))
    np.testing.assert_array_equal(got[0], np.asarray([-3e38, 0.0, 3e38], np.float32))
    got = arrow_eigvalsh(jnp.asarray([[0.0, 1e-3, 1.0]], f32), jnp.asarray([0.5], f32),
                         jnp.asarray([[1e18, 1e18, 1.0]], f32))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[0, 1:3], [5e-4, 1.0], rtol=1e-6)
    np.testing.assert_allclose(got[0, [0, 3]], [-np.sqrt(2) * 1e18, np.sqrt(2) * 1e18], rtol=1e-6)
