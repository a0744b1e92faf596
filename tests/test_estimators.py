"""Randomised trace, diagonal and Frobenius estimators against float64 brute force.

Exact cases (a diagonal matrix with Rademacher probes; Hutch++ on a matrix of rank ≤ m/3),
and elsewhere the estimate within a few standard deviations of the truth, the standard
deviation computed from the known variance of the estimator (a fixed key: deterministic).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_mlp

from jaxgeom import FIM, Hessian, PMatDense, PMatDiag, PMatImplicit, PMatLowRank
from jaxgeom.estimators import (
    hutchinson_diag,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenvalues,
)

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def fisher():
    t = make_linen_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)
    return t, F, np.asarray(F.data)


def test_rademacher_probes_are_exact_on_a_diagonal(fisher):
    t, F, dense = fisher
    D = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    want = np.asarray(D.data)
    np.testing.assert_allclose(hutchinson_trace(D, KEY, 3), want.sum(), rtol=1e-12)
    np.testing.assert_allclose(hutchinson_diag(D, KEY, 1), want, rtol=1e-12)
    np.testing.assert_allclose(hutchinson_squared_frobenius(D, KEY, 2), np.sum(want**2),
                               rtol=1e-12)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_estimates_are_within_their_standard_deviation(fisher, distribution):
    t, F, dense = fisher
    m = 2000
    fro2, diag2 = np.sum(dense**2), np.sum(np.diag(dense) ** 2)
    rademacher = distribution == "rademacher"
    sd_trace = np.sqrt(2 * (fro2 - diag2 if rademacher else fro2) / m)
    got = hutchinson_trace(F, KEY, m, distribution=distribution)
    assert abs(got - np.trace(dense)) < 4 * sd_trace
    assert abs(got - np.trace(dense)) > 0  # an estimate, not the exact trace

    rows = np.sum(dense**2, axis=1)
    off = rows - np.diag(dense) ** 2
    sd_diag = np.sqrt((off if rademacher else rows + np.diag(dense) ** 2) / m)
    got = np.asarray(hutchinson_diag(F, KEY, m, distribution=distribution))
    assert got.shape == (len(dense),)
    assert np.all(np.abs(got - np.diag(dense)) < 5 * sd_diag + 1e-15)

    sq = dense @ dense  # ‖Mv‖² = vᵀ M² v: Hutchinson on M²
    var = 2 * (np.sum(sq**2) - (np.sum(np.diag(sq) ** 2) if rademacher else 0)) / m
    got = hutchinson_squared_frobenius(F, KEY, m, distribution=distribution)
    assert abs(got - fro2) < 4 * np.sqrt(var)


def test_hutchpp_is_exact_for_a_low_rank_matrix(fisher):
    t, F, dense = fisher
    L = FIM(t.apply_fn, t.params, (t.x, t.y), PMatLowRank)
    r = L.factor.shape[0]
    assert r < len(dense)
    np.testing.assert_allclose(hutchpp_trace(L, KEY, 3 * r + 2), np.trace(dense), rtol=1e-9)
    # fewer sketch probes than the rank: an estimate, far closer than Hutchinson's
    few = 3 * (r // 2)
    error_pp = abs(hutchpp_trace(L, KEY, few) - np.trace(dense))
    errors = [abs(hutchinson_trace(L, k, few) - np.trace(dense))
              for k in jax.random.split(KEY, 20)]
    assert error_pp < np.mean(errors)


def test_matrix_free_operators_and_functions(fisher):
    """A PMatImplicit (one data pass for all probes), a Hessian's and a plain function
    give the dense matrix's estimate with the same probes; all under jit."""
    t, F, dense = fisher
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    want = hutchinson_trace(F, KEY, 30)
    np.testing.assert_allclose(hutchinson_trace(implicit, KEY, 30), want, rtol=1e-10)
    np.testing.assert_allclose(hutchpp_trace(implicit, KEY, 30), hutchpp_trace(F, KEY, 30),
                               rtol=1e-10)
    matvec = lambda v: jnp.asarray(dense) @ v  # noqa: E731
    d = len(dense)
    np.testing.assert_allclose(hutchinson_trace(matvec, KEY, 30, dim=d, dtype=jnp.float64),
                               want, rtol=1e-12)
    jitted = jax.jit(lambda M, k: hutchinson_diag(M, k, 30))(F, KEY)
    np.testing.assert_allclose(jitted, hutchinson_diag(F, KEY, 30), rtol=1e-12)

    def loss(params, batch):
        x, y = batch
        return -jnp.mean(jax.nn.log_softmax(t.apply_fn(params, x))[jnp.arange(len(y)), y])

    H = Hessian(loss, t.params, (t.x, t.y), PMatDense)
    H_implicit = Hessian(loss, t.params, (t.x, t.y), PMatImplicit)
    np.testing.assert_allclose(hutchinson_trace(H_implicit, KEY, 20),
                               hutchinson_trace(H, KEY, 20), rtol=1e-9)


def test_lanczos_gives_the_whole_spectrum_of_a_low_rank_fisher(fisher):
    """``k = d``: the Krylov space (dimension ``rank + 1``) is exhausted, the remaining
    Ritz values are the zero eigenvalues: every eigenvalue, exactly."""
    t, F, dense = fisher
    d = len(dense)
    want = np.linalg.eigvalsh(dense)
    assert np.sum(np.abs(want) < 1e-12) > 0  # singular: rank N (C − 1) < d
    got = lanczos_eigenvalues(F, KEY, d)
    np.testing.assert_allclose(got, want, atol=1e-10 * want.max())


def test_lanczos_extreme_eigenvalues_converge_first(fisher):
    """Few iterations: the largest Ritz value is already the top eigenvalue; all lie in
    ``[λ_min, λ_max]``; a matrix-free Fisher and a function give the same; an indefinite
    Hessian's smallest eigenvalue too."""
    t, F, dense = fisher
    want = np.linalg.eigvalsh(dense)
    got = lanczos_eigenvalues(F, KEY, 12)
    assert got.shape == (12,)
    assert np.all(got <= want[-1] * (1 + 1e-12)) and np.all(got >= -1e-12)
    np.testing.assert_allclose(got[-1], want[-1], rtol=1e-8)
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    np.testing.assert_allclose(lanczos_eigenvalues(implicit, KEY, 12), got, rtol=1e-8,
                               atol=1e-12)
    matvec = lambda v: jnp.asarray(dense) @ v  # noqa: E731
    np.testing.assert_allclose(
        lanczos_eigenvalues(matvec, KEY, 12, dim=len(dense), dtype=jnp.float64), got,
        rtol=1e-10, atol=1e-12)
    jitted = jax.jit(lambda M, k: lanczos_eigenvalues(M, k, 12))(F, KEY)
    np.testing.assert_allclose(jitted, got, rtol=1e-10, atol=1e-12)

    def loss(params, batch):
        x, y = batch
        return -jnp.mean(jax.nn.log_softmax(t.apply_fn(params, x))[jnp.arange(len(y)), y])

    H = Hessian(loss, t.params, (t.x, t.y), PMatImplicit)
    spectrum = np.linalg.eigvalsh(np.asarray(H.to_dense()))
    assert spectrum[0] < 0 < spectrum[-1]
    ritz = lanczos_eigenvalues(H, KEY, 30)
    np.testing.assert_allclose([ritz[0], ritz[-1]], [spectrum[0], spectrum[-1]], rtol=1e-6)
    assert lanczos_eigenvalues(F, KEY, 1).shape == (1,)


def test_refusals(fisher):
    t, F, dense = fisher
    with pytest.raises(ValueError, match="integer ≥ 1"):
        hutchinson_trace(F, KEY, 0)
    with pytest.raises(ValueError, match="≥ 3"):
        hutchpp_trace(F, KEY, 2)
    with pytest.raises(ValueError, match="integer"):
        hutchinson_diag(F, KEY, 10.0)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson_trace(F, KEY, 10, distribution="gaussian")
    with pytest.raises(ValueError, match="dim=d"):
        hutchinson_trace(lambda v: v, KEY, 10)
    with pytest.raises(ValueError, match="dim=3"):
        hutchinson_trace(F, KEY, 10, dim=3)
    with pytest.raises(TypeError, match="PRNG key"):
        hutchinson_trace(F, 0, 10)
    with pytest.raises(TypeError, match="representation"):
        hutchinson_trace(dense, KEY, 10)
    with pytest.raises(ValueError, match="at most d"):
        lanczos_eigenvalues(F, KEY, len(dense) + 1)
    with pytest.raises(ValueError, match="num_iterations"):
        lanczos_eigenvalues(F, KEY, 0)
