"""Randomised trace, diagonal and Frobenius estimators against float64 brute force.

Exact cases (a diagonal matrix with Rademacher probes; Hutch++ on a matrix of rank ≤ m/3),
and elsewhere the estimate within a few standard deviations of the truth, the standard
deviation computed from the known variance of the estimator (a fixed key: deterministic).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_mlp
from pmat_checks import check_eigenpairs, expected_eigsh

from jaxgeom import (
    FIM,
    Hessian,
    LayerCollection,
    PMatDense,
    PMatDiag,
    PMatEye,
    PMatImplicit,
    PMatLowRank,
    PVector,
    estimators,
)
from jaxgeom._compile import donating_jit
from jaxgeom.estimators import (
    hutchinson_diag,
    hutchinson_squared_frobenius,
    hutchinson_trace,
    hutchpp_trace,
    lanczos_eigenvalues,
    lanczos_eigsh,
    lanczos_quadrature,
    lanczos_spectral_density,
    lobpcg_eigsh,
    rademacher_probes,
    restarted_lanczos_eigsh,
    spectral_density_curve,
    spectral_density_on_grid,
    xdiag,
    xtrace,
)

KEY = jax.random.key(0)


@pytest.fixture(scope="module")
def fisher():
    t = make_linen_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)
    return t, F, np.asarray(F.data)


def test_rademacher_probes_are_independent_fair_signs():
    """32 signs from each random word: all ``±1``, ``E[v] = 0`` and ``E[vvᵀ] = I`` within
    their standard errors (``1/√m``), over 70 columns (three words a row, the last one
    cut); another key, other signs."""
    m, d = 20000, 70
    v = np.asarray(rademacher_probes(KEY, (m, d), jnp.float64))
    assert v.shape == (m, d) and set(np.unique(v)) == {-1.0, 1.0}
    assert np.abs(v.mean(axis=0)).max() < 5 / np.sqrt(m)
    np.testing.assert_allclose(v.T @ v / m, np.eye(d), atol=5 / np.sqrt(m))
    other = np.asarray(rademacher_probes(jax.random.key(1), (m, d), jnp.float64))
    assert np.mean(other == v) < 0.52


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


@pytest.mark.parametrize("reorthogonalization", ["full", "partial"])
def test_lanczos_gives_the_whole_spectrum_of_a_low_rank_fisher(fisher, reorthogonalization):
    """``k = d``: the Krylov space (dimension ``rank + 1``) is exhausted, the remaining
    Ritz values are the zero eigenvalues: every eigenvalue, exactly — with the basis
    reorthogonalised at every step or only where it would lose semi-orthogonality."""
    t, F, dense = fisher
    d = len(dense)
    want = np.linalg.eigvalsh(dense)
    assert np.sum(np.abs(want) < 1e-12) > 0  # singular: rank N (C − 1) < d
    got = lanczos_eigenvalues(F, KEY, d, reorthogonalization=reorthogonalization)
    np.testing.assert_allclose(got, want, atol=1e-10 * want.max())


@pytest.mark.parametrize("reorthogonalization", ["full", "partial"])
def test_lanczos_gives_the_whole_spectrum_of_a_damped_low_rank_fisher(fisher,
                                                                       reorthogonalization):
    """``F + λI``: the Krylov space is exhausted after ``rank + 1`` steps, but ``λ`` is the
    eigenvalue left, ``d − rank`` times — the iteration restarts in the basis's complement,
    and ``k = d`` gives every eigenvalue (the rest had been answered as zeros, below
    ``λ_min``); and the identity, exhausted at once, is all ones."""
    _, _, dense = fisher
    d = len(dense)
    damped = dense + 0.5 * np.eye(d)
    got = lanczos_eigenvalues(_matvec(damped), KEY, d, dim=d, dtype=jnp.float64,
                              reorthogonalization=reorthogonalization)
    np.testing.assert_allclose(got, np.linalg.eigvalsh(damped), atol=1e-10 * dense.max())
    ones = lanczos_eigenvalues(_matvec(np.eye(d)), KEY, 8, dim=d, dtype=jnp.float64,
                               reorthogonalization=reorthogonalization)
    np.testing.assert_allclose(ones, np.ones(8), rtol=1e-12)


def test_partial_reorthogonalization_keeps_the_basis_semi_orthogonal(monkeypatch):
    """Simon's partial reorthogonalisation: with a fraction of the passes against the
    basis, the Lanczos vectors stay semi-orthogonal (``|QᵀQ − I| ≤ √ε``), not orthonormal
    to working precision as with a pass at every step, and ``T``'s eigenvalues — the
    Ritz values, the Gauss quadrature's nodes and weights — are those of full
    reorthogonalisation to round-off; ``lanczos_eigsh``'s pairs are eigenpairs, their
    vectors orthonormal and their residual estimates right to ``√ε``; eagerly and under
    ``jit``. Another value is refused by name."""
    from jaxgeom import estimators

    dense, _ = _separated_spectrum()
    d, eps = len(dense), np.finfo(np.float64).eps
    passes = []
    orthogonalised = estimators._orthogonalised

    def counted(blocks, w, rows):
        jax.debug.callback(lambda: passes.append(1))
        return orthogonalised(blocks, w, rows)

    monkeypatch.setattr(estimators, "_orthogonalised", counted)
    products = jax.vmap(_matvec(dense))
    start = jax.random.normal(KEY, (1, d), jnp.float64)
    runs = {}
    for mode in ("full", "partial"):
        passes.clear()
        tridiagonal, blocks, _, _ = jax.block_until_ready(jax.jit(
            lambda s, mode=mode: estimators._lanczos(products, s, 120, return_basis=True,
                                                     partial=mode == "partial"))(start))
        q = np.concatenate([np.asarray(b[0]) for b in blocks])
        runs[mode] = (np.linalg.eigvalsh(tridiagonal[0]), np.abs(q @ q.T - np.eye(120)).max(),
                      len(passes))
    monkeypatch.undo()
    (full, full_loss, full_passes), (partial, loss, partial_passes) = runs.values()
    assert full_passes == 120 and partial_passes < 60  # a pass a step, and the last one
    assert full_loss < 100 * eps < loss <= np.sqrt(eps)
    np.testing.assert_allclose(partial, full, atol=1e-12 * 10.0)
    kw = dict(dim=d, dtype=jnp.float64)
    slq = functools.partial(lanczos_spectral_density, _matvec(dense), KEY, num_steps=60,
                            num_probes=2, **kw)  # the quadratures of two probes at once
    for g, w in zip(slq(reorthogonalization="partial"), slq(), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-11)
    eigsh = functools.partial(lanczos_eigsh, k=3, num_iterations=60, return_residuals=True,
                              reorthogonalization="partial", **kw)
    values, vectors, residuals = eigsh(_matvec(dense), KEY)
    np.testing.assert_allclose(values, [4.0, 6.0, 10.0], rtol=1e-12)
    direct = np.linalg.norm(dense @ vectors - np.asarray(vectors) * np.asarray(values), axis=0)
    # (‖M v − λ v‖ = β |s_k| up to the components the passes removed: ≤ √ε ‖M‖)
    np.testing.assert_allclose(residuals, direct, atol=np.sqrt(eps) * 10.0)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=np.sqrt(eps))
    jitted = jax.jit(lambda key: eigsh(_matvec(dense), key))(KEY)
    for g, w in zip(jitted, (values, np.abs(vectors), residuals), strict=True):
        np.testing.assert_allclose(np.abs(g), w, rtol=1e-8, atol=1e-10)
    for refused in (lambda: lanczos_eigenvalues(_matvec(dense), KEY, 10, **kw,
                                                reorthogonalization="none"),
                    lambda: lanczos_quadrature(_matvec(dense), np.eye(2, d), 10,
                                               reorthogonalization=None),
                    lambda: eigsh(_matvec(dense), KEY, reorthogonalization="selective")):
        with pytest.raises(ValueError, match="reorthogonalization must be one of"):
            refused()


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


def test_lanczos_steps_are_one_loop_of_one_shape(fisher, monkeypatch):
    """Traced, the steps are one ``fori_loop`` whatever their number: the program does not
    grow with the steps (unrolled, it held one product and one reorthogonalisation per
    step, 14–21 s of compilation for 80 steps; a loop per block of 8, 8, 16, … basis rows
    compiled 2–3× longer). Driven from Python (a ``matvec`` called eagerly), every
    step is one compiled update, traced once. A stored matrix called eagerly is one
    compiled program: no step driven from Python, nothing compiled anew at a second
    call."""
    from pmat_checks import compilations

    _, F, dense = fisher

    def equations(n):
        return len(jax.make_jaxpr(lambda M, k: lanczos_eigenvalues(M, k, n))(F, KEY).eqns)

    assert equations(9) == equations(20) == equations(30)
    want = lanczos_eigenvalues(F, KEY, 15)
    traces = []

    def step(*args):
        traces.append(args[2])  # the step index: a tracer, not a Python int
        return estimators._lanczos_step(*args)

    monkeypatch.setattr(estimators, "_lanczos_step_compiled",
                        donating_jit(step, donate_argnums=0))
    got = lanczos_eigenvalues(_matvec(dense), KEY, 15, dim=len(dense), dtype=jnp.float64)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert len(traces) == 1 and isinstance(traces[0], jax.core.Tracer)
    other_key = jax.random.key(1)  # made outside: a first key compiles its seeding
    with compilations() as compiled:
        again = lanczos_eigenvalues(F, other_key, 15)
    assert compiled == [] and len(traces) == 1
    np.testing.assert_allclose(again[-1], want[-1], rtol=1e-8)  # another start, same top


# (call, how each output scales with M: the same probes, Krylov spaces and sketches for 2M)
# with counts used nowhere else in this module, so that the first call below is a first
ONE_PROGRAM_CALLS = {
    "hutchinson_trace": (lambda M, key: hutchinson_trace(M, key, 14), (2,)),
    "hutchinson_diag": (lambda M, key: hutchinson_diag(M, key, 14, distribution="normal"),
                        (2,)),
    "hutchinson_squared_frobenius": (
        lambda M, key: hutchinson_squared_frobenius(M, key, 14), (4,)),
    "hutchpp_trace": (lambda M, key: hutchpp_trace(M, key, 14), (2,)),
    "xtrace": (lambda M, key: xtrace(M, key, 14), (2,)),
    "xdiag": (lambda M, key: xdiag(M, key, 14), (2,)),
    "lanczos_eigenvalues": (lambda M, key: lanczos_eigenvalues(M, key, 14), (2,)),
    "lanczos_eigsh": (lambda M, key: lanczos_eigsh(M, key, 3, num_iterations=13,
                                                   return_residuals=True),
                      (2, None, 2)),  # values, vectors (up to their signs), residuals
    "lanczos_eigsh to a tolerance": (  # stopped inside the program (at a test point)
        lambda M, key: lanczos_eigsh(M, key, 2, num_iterations=40, tol=1e-4,
                                     return_residuals=True), (2, None, 2)),
    "lanczos_spectral_density": (lambda M, key: lanczos_spectral_density(
        M, key, num_steps=7, num_probes=3), (2, 1)),  # nodes, weights
    "lanczos_quadrature": (lambda M, key: lanczos_quadrature(  # start vectors from NumPy
        M, np.eye(3, M.size(0)) + 0.5, 7), (2, 1)),
}


@pytest.mark.parametrize("name", ONE_PROGRAM_CALLS)
def test_estimators_of_a_stored_matrix_called_eagerly_are_one_program(fisher, name):
    """Called eagerly on a stored matrix, an estimator is one compiled program with the
    matrix an argument (op by op, its probes and products were programs of their own):
    the numbers of the same steps run op by op, one compilation for the first call and
    none for another key or another matrix of the same structure."""
    from pmat_checks import compilations

    _, F, _ = fisher
    call, scales = ONE_PROGRAM_CALLS[name]
    with compilations() as first:
        got = call(F, KEY)
    assert first == ["_compiled_call"]
    with jax.disable_jit():  # every step as written, op by op
        want = call(F, KEY)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    key, doubled_F = jax.random.key(3), 2.0 * F
    with compilations() as again:
        doubled = call(doubled_F, key)
    assert again == []
    for g, w, scale in zip(jax.tree.leaves(doubled), jax.tree.leaves(call(F, key)), scales,
                           strict=True):
        if scale is None:
            g, w, scale = np.abs(g), np.abs(w), 1
        np.testing.assert_allclose(g, scale * w, rtol=1e-8, atol=1e-12)


def test_lanczos_eigsh_of_a_stored_matrix_to_any_tolerance(fisher):
    """A stored matrix's ``lanczos_eigsh`` with a ``tol`` gives the pairs of the same
    call on its ``matvec`` (the test driven from Python): ``tol = inf`` stops at the first
    test point, past ``k`` (7 steps, then 15 for ``k = 8``), as one program or as written;
    a ``tol`` that is not a number ``≥ 0`` is refused either way."""
    _, F, dense = fisher
    d = len(dense)
    for k in (2, 8):
        calls = []
        kw = dict(num_iterations=40, tol=np.inf, return_residuals=True)
        got = lanczos_eigsh(F, KEY, k, **kw)
        want = lanczos_eigsh(lambda v, calls=calls: (calls.append(1), jnp.asarray(dense) @ v)[1],
                             KEY, k, dim=d, dtype=jnp.float64, **kw)
        assert len(calls) == (7 if k == 2 else 15)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
        np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-14)
    for tol in (float("nan"), -1.0, np.float64(-1e-3)):
        with pytest.raises(ValueError, match="tol must be a number"):
            lanczos_eigsh(F, KEY, 2, num_iterations=40, tol=tol)


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


# ------------------------------------------------------- Lanczos eigenpairs
def _hessian(t):
    def loss(params, batch):
        x, y = batch
        return -jnp.mean(jax.nn.log_softmax(t.apply_fn(params, x))[jnp.arange(len(y)), y])

    return Hessian(loss, t.params, (t.x, t.y), PMatImplicit)


def test_lanczos_eigsh_with_d_iterations_is_exact(fisher):
    """``n = d`` steps: the Ritz pairs are eigenpairs (up to round-off), for every ``which``;
    the smallest ones of a singular Fisher come from the continued Krylov space (past the
    exhausted one): unit vectors of its null space, not zeros."""
    t, F, dense = fisher
    d = len(dense)
    assert np.sum(np.abs(np.linalg.eigvalsh(dense)) < 1e-12) > 3
    for which in ("LA", "SA", "LM"):
        values, vectors = lanczos_eigsh(F, KEY, 4, which=which, num_iterations=d)
        check_eigenpairs(values, vectors, dense, 4, which, atol=1e-9)
    values, vectors = lanczos_eigsh(F, KEY, d, num_iterations=d)  # every eigenpair
    check_eigenpairs(values, vectors, dense, d, "LA", atol=1e-9)


@pytest.mark.parametrize("n", [6, 12, 40])
def test_lanczos_eigsh_residuals_are_those_of_the_ritz_pairs(fisher, n):
    """``return_residuals``: ``β_n |s_{n,j}|`` is ``‖M vⱼ − λⱼ vⱼ‖`` computed from ``M``
    itself, for pairs far from converged (6 steps), converging, and exact (``n = d``, a
    continued Krylov space); the values and vectors are those without the option."""
    t, F, dense = fisher
    n = min(n, len(dense))
    for which in ("LA", "SA"):
        values, vectors, residuals = lanczos_eigsh(F, KEY, 3, which=which, num_iterations=n,
                                                   return_residuals=True)
        direct = np.linalg.norm(dense @ vectors - np.asarray(vectors) * np.asarray(values),
                                axis=0)
        scale = np.linalg.norm(dense, 2)
        np.testing.assert_allclose(residuals, direct, rtol=1e-6, atol=1e-10 * scale)
        if which == "LA":  # (one program more per call: once is enough)
            plain = lanczos_eigsh(F, KEY, 3, which=which, num_iterations=n)
            np.testing.assert_allclose(values, plain[0], rtol=1e-12)
            np.testing.assert_allclose(vectors, plain[1], atol=1e-12)
    if n == 6:
        assert residuals.max() > 1e-6 * scale  # not converged: the test can tell


def _separated_spectrum(d=300):
    """A symmetric float64 matrix with eigenvalues 4, 6, 10 well apart from the other
    ``d − 3`` (evenly in ``[0, 1]``), and its eigenvectors (columns, ascending)."""
    rng = np.random.default_rng(1)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = np.concatenate([np.linspace(0.0, 1.0, d - 3), [4.0, 6.0, 10.0]])
    dense = (basis * spectrum) @ basis.T
    return (dense + dense.T) / 2, basis


def test_lanczos_eigsh_stops_at_a_tolerance():
    """``tol``: the top three pairs of a separated spectrum converge long before the 200
    steps allowed; the iteration stops at the first test point (7, 15, 23, 31, … steps) where
    every residual is at most ``tol · max|θ|`` — counted products — and the pairs are then
    as accurate as asked."""
    dense, basis = _separated_spectrum()
    d = len(dense)
    products = []

    def matvec(v):
        products.append(1)
        return jnp.asarray(dense) @ v

    kw = dict(num_iterations=200, dim=d, dtype=jnp.float64, return_residuals=True)
    values, vectors, residuals = lanczos_eigsh(matvec, KEY, 3, tol=1e-8, **kw)
    assert len(products) in (7, 15, 23, 31)  # a test point's steps, not the 200 allowed
    assert np.all(residuals <= 1e-8 * 10.0 * (1 + 1e-12))
    direct = np.linalg.norm(dense @ vectors - np.asarray(vectors) * np.asarray(values), axis=0)
    np.testing.assert_allclose(residuals, direct, rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(values, [4.0, 6.0, 10.0], rtol=1e-9)
    steps, products[:] = len(products), []
    loose = lanczos_eigsh(matvec, KEY, 3, tol=1.0, **kw)[2]
    assert len(products) < steps and np.all(loose <= 10.0)  # an earlier test point
    assert np.max(loose) > 1e-8 * 10.0  # and not as accurate
    with pytest.raises(ValueError, match="tol must be a number"):
        lanczos_eigsh(_matvec(dense), KEY, 3, tol=-1.0, dim=d, dtype=jnp.float64)


@pytest.mark.parametrize("tol", [1e-8, None])
def test_lanczos_driven_from_python_compiles_one_step_for_all(tol):
    """A ``matvec`` answering concrete arrays drives the steps from Python: every step is
    one call of one compiled update, each stop test one program, the start, the last step
    and the Ritz pairs one each — not the few dozen operations between them compiled one
    by one (80 programs, 4 s, on a first call of 200 steps), nor a step per block of basis
    rows. The pairs are those of the steps run as written."""
    from pmat_checks import compilations

    dense, _ = _separated_spectrum(120)
    matvec = jax.jit(lambda v: jnp.asarray(dense) @ v)
    kw = dict(which="LA", num_iterations=100, dim=len(dense), dtype=jnp.float64,
              return_residuals=True)
    jax.vmap(matvec)(jnp.zeros((1, len(dense))))  # its program compiled first
    with compilations() as compiled:
        got = lanczos_eigsh(matvec, KEY, 3, tol=tol, **kw)
    tests = 2 if tol else 0  # stopped after 15 steps (tested after 7 and 15), or 100
    assert compiled.count("_lanczos_step") <= 1, compiled
    assert len(compiled) <= tests + 5, compiled  # the probe, start, step, end, pairs
    assert all(name.startswith("_") for name in compiled), str(compiled)  # no lone primitive
    with jax.disable_jit():
        want = lanczos_eigsh(lambda v: jnp.asarray(dense) @ v, KEY, 3, tol=tol, **kw)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.abs(g), np.abs(w), rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("which,tol", [("LA", 1e-8), ("SA", 1e-8), ("LA", 1e-3)])
def test_lanczos_eigsh_stops_at_a_tolerance_under_jit(which, tol):
    """Under ``jit`` the steps past the test where every residual is small enough are
    skipped (``lax.cond``): the products that run — counted on the host — are the eager
    call's, and the pairs and residuals are the eager call's (those of the test that
    stopped, on its own steps' ``T``), not those of all 100 steps (``"SA"`` on the negated
    matrix, whose separated eigenvalues are its smallest). Under ``vmap`` each key stops
    on its own; without ``tol``, or with one never met, all 100 steps run and give the
    pairs of all of them."""
    dense, _ = _separated_spectrum()
    d = len(dense)
    if which == "SA":  # the separated ones at the low end: −10, −6, −4 then [−1, 0]
        dense = -dense
    ran = []

    def counted(v):
        jax.debug.callback(lambda: ran.append(1))
        return jnp.asarray(dense) @ v

    kw = dict(which=which, num_iterations=100, dim=d, dtype=jnp.float64,
              return_residuals=True)
    eager = []
    values, vectors, residuals = lanczos_eigsh(
        lambda v: (eager.append(1), jnp.asarray(dense) @ v)[1], KEY, 3, tol=tol, **kw)
    jitted = jax.jit(lambda key: lanczos_eigsh(counted, key, 3, tol=tol, **kw))(KEY)
    jax.block_until_ready(jitted)
    assert len(ran) == len(eager) < 100
    np.testing.assert_allclose(jitted[0], values, rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(jitted[1] * vectors, axis=0)), 1.0, rtol=1e-10)
    np.testing.assert_allclose(jitted[2], residuals, rtol=1e-6, atol=1e-14)
    expected = {"LA": [4.0, 6.0, 10.0], "SA": [-10.0, -6.0, -4.0]}
    np.testing.assert_allclose(jitted[0], expected[which], rtol=tol)
    full = lanczos_eigsh(_matvec(dense), KEY, 3, **kw)
    assert np.max(full[2]) < np.max(jitted[2])  # all 100 steps: more accurate than asked
    if which != "LA" or tol != 1e-8:
        return
    keys = jax.random.split(KEY, 2)  # under vmap: every step runs, each key's own stop
    mapped = jax.jit(jax.vmap(  # (eager vmap: each operation compiled on its own)
        lambda key: lanczos_eigsh(_matvec(dense), key, 3, tol=tol, **kw)))(keys)
    for i, key in enumerate(keys):
        own = lanczos_eigsh(_matvec(dense), key, 3, tol=tol, **kw)
        np.testing.assert_allclose(mapped[0][i], own[0], rtol=1e-12)
        np.testing.assert_allclose(mapped[2][i], own[2], rtol=1e-6, atol=1e-14)
    ran[:] = []
    every = jax.jit(lambda key: lanczos_eigsh(counted, key, 3, **kw))(KEY)
    jax.block_until_ready(every)
    assert len(ran) == 100  # without tol: every step (the last one's product included)
    np.testing.assert_allclose(every[0], full[0], rtol=1e-12)
    ran[:] = []  # the bottom of the continuum in [0, 1]: far from 1e-12 after 100 steps
    bottom = dict(kw, which="SA")
    never = jax.jit(lambda key: lanczos_eigsh(counted, key, 3, tol=1e-12, **bottom))(KEY)
    jax.block_until_ready(never)
    assert len(ran) == 100  # tested after 7, 15, 23, 31, 47, 63 and 95 steps, never met
    for g, w in zip(never, lanczos_eigsh(_matvec(dense), KEY, 3, **bottom), strict=True):
        np.testing.assert_allclose(np.abs(g), np.abs(w), rtol=1e-10, atol=1e-14)


def test_lanczos_eigsh_converges_on_a_separated_spectrum():
    """A synthetic spectrum with three eigenvalues well apart from the other 297: with 30
    products the top three pairs are exact to ~1e-10 (eigenvalues) and their vectors ``±``
    the true ones; the Ritz values are :func:`lanczos_eigenvalues`' with the same key;
    fewer iterations give coarser estimates, more converge."""
    dense, basis = _separated_spectrum()
    d = len(dense)
    values, vectors = lanczos_eigsh(_matvec(dense), KEY, 3, num_iterations=30, dim=d,
                                    dtype=jnp.float64)
    np.testing.assert_allclose(values, [4.0, 6.0, 10.0], rtol=1e-10)
    overlaps = np.abs(np.sum(np.asarray(vectors) * basis[:, -3:], axis=0))
    np.testing.assert_allclose(overlaps, 1, atol=1e-8)
    residual = np.linalg.norm(dense @ vectors - np.asarray(vectors) * np.asarray(values), axis=0)
    assert residual.max() < 1e-6
    ritz = lanczos_eigenvalues(_matvec(dense), KEY, 30, dim=d, dtype=jnp.float64)
    np.testing.assert_allclose(values, ritz[-3:], rtol=1e-12)
    errors = [np.abs(np.asarray(lanczos_eigsh(_matvec(dense), KEY, 3, num_iterations=n,
                                              dim=d, dtype=jnp.float64)[0])
                     - [4.0, 6.0, 10.0]).max() for n in (4, 8, 16)]
    assert errors[0] > errors[1] > errors[2]
    default = lanczos_eigsh(_matvec(dense), KEY, 3, dim=d, dtype=jnp.float64)  # n = 20
    np.testing.assert_allclose(default[0], [4.0, 6.0, 10.0], rtol=1e-6)


def test_lanczos_eigsh_of_matrix_free_operators_a_hessian_and_under_jit(fisher):
    """A matrix-free Fisher, a stored one and its matvec give the same pairs; an indefinite
    implicit Hessian's largest-magnitude and smallest eigenpairs; ``jit``; the vectors as
    ``PVector``s; :meth:`PMatImplicit.eigsh` names this function."""
    t, F, dense = fisher
    d = len(dense)
    want_values, want_vectors = lanczos_eigsh(F, KEY, 3, num_iterations=16)
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    got = lanczos_eigsh(implicit, KEY, 3, num_iterations=16)
    np.testing.assert_allclose(got[0], want_values, rtol=1e-8)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(got[1]) * want_vectors, axis=0)), 1,
                               atol=1e-8)
    got = lanczos_eigsh(_matvec(dense), KEY, 3, num_iterations=16, dim=d, dtype=jnp.float64)
    np.testing.assert_allclose(got[0], want_values, rtol=1e-10)
    jitted = jax.jit(lambda M, key: lanczos_eigsh(M, key, 3, num_iterations=16))(F, KEY)
    np.testing.assert_allclose(jitted[0], want_values, rtol=1e-10)
    np.testing.assert_allclose(jitted[1], want_vectors, atol=1e-10)
    top = PVector.from_flat(F.layer_collection, want_vectors[:, -1])
    np.testing.assert_allclose(F.vTMv(top), want_values[-1], rtol=1e-8)

    H = _hessian(t)
    hessian = np.asarray(H.to_dense())
    spectrum = np.linalg.eigvalsh(hessian)
    assert spectrum[0] < 0 < spectrum[-1]
    for which in ("LM", "SA"):
        values, vectors = lanczos_eigsh(H, KEY, 2, which=which, num_iterations=d)
        check_eigenpairs(values, vectors, hessian, 2, which, atol=1e-9)
    values, _ = lanczos_eigsh(H, KEY, 2, which="LM", num_iterations=30)
    np.testing.assert_allclose(values, expected_eigsh(hessian, 2, "LM"), rtol=1e-6)
    with pytest.raises(NotImplementedError, match="lanczos_eigsh"):
        implicit.eigsh(3)


@pytest.mark.parametrize("eigsh, options, error, match", [
    (lanczos_eigsh, dict(k=5, num_iterations=4), ValueError, "at most num_iterations"),
    (lanczos_eigsh, dict(k=2, which="largest"), ValueError, "which"),
    (lanczos_eigsh, dict(k=0), ValueError, "k must be an integer"),
    (lanczos_eigsh, dict(k=2, num_iterations="d + 1"), ValueError, "at most d"),
    (lanczos_eigsh, dict(k=2, num_iterations=0), ValueError, "num_iterations"),
    (lanczos_eigsh, dict(k=2, key=0), TypeError, "PRNG key"),
    (restarted_lanczos_eigsh, dict(k=5, ncv=5), ValueError, r"\[1, ncv − 1, the basis size"),
    (restarted_lanczos_eigsh, dict(k=2, ncv="d + 1"), ValueError, "ncv must be at most d"),
    (restarted_lanczos_eigsh, dict(k=2, max_restarts=-1), ValueError,
     "max_restarts must be an integer ≥ 0"),
    (restarted_lanczos_eigsh, dict(k=2, tol=-1e-3), ValueError, "tol must be a number"),
    (restarted_lanczos_eigsh, dict(k=2, tol="1e-3"), ValueError, "tol must be a number"),
    (lanczos_eigsh, dict(k=2, tol=float("nan")), ValueError, "tol must be a number"),
    (restarted_lanczos_eigsh, dict(k=2, which="BE"), ValueError, "which"),
    (restarted_lanczos_eigsh, dict(k=2, key=0), TypeError, "PRNG key"),
])
def test_lanczos_eigsh_refusals(fisher, eigsh, options, error, match):
    t, F, dense = fisher
    options = {name: len(dense) + 1 if value == "d + 1" else value
               for name, value in {"key": KEY, **options}.items()}
    with pytest.raises(error, match=match):
        eigsh(F, **options)
    with pytest.raises(ValueError, match="dim=d"):  # a matvec needs its dimension
        eigsh(lambda v: v, KEY, 2)


@pytest.mark.parametrize("eigsh", ["lanczos", "restarted"])
def test_lanczos_keeps_small_residuals_of_a_large_float32_matrix(eigsh):
    """``d = 10⁵`` in float32, one eigenvalue ``10`` over a bulk in ``[0, 0.1]`` and two
    just above it: once the top pair has converged, each step's genuine residual
    (``≈ 0.03``) is far below ``d ε · max‖M q‖ ≈ 0.12``, the exhaustion threshold that took
    them for round-off (then every step restarted from a random vector: ``0.050`` and
    ``0.079`` for ``0.11`` and ``0.12``, their residuals reported as ``0``). Now the three
    pairs converge, to float32's accuracy."""
    d = 100_000
    spectrum = np.concatenate([np.linspace(0, 0.1, d - 3), [0.11, 0.12, 10.0]])
    diagonal = jnp.asarray(np.random.default_rng(0).permutation(spectrum), jnp.float32)
    kw = dict(dim=d, dtype=jnp.float32, return_residuals=True)
    if eigsh == "lanczos":
        values, vectors, residuals = lanczos_eigsh(lambda v: diagonal * v, KEY, 3,
                                                   num_iterations=60, **kw)
    else:
        values, vectors, residuals = restarted_lanczos_eigsh(
            lambda v: diagonal * v, KEY, 3, ncv=20, tol=1e-5, max_restarts=50, **kw)
    np.testing.assert_allclose(values, [0.11, 0.12, 10.0], rtol=2e-5)
    vectors = np.asarray(vectors, np.float64)
    direct = np.linalg.norm(np.asarray(diagonal, np.float64)[:, None] * vectors
                            - vectors * np.asarray(values, np.float64), axis=0)
    assert direct.max() < 1e-5 * 10.0 and residuals.max() < 1e-5 * 10.0

# ------------------------------------------------------------ thick-restart Lanczos
def _clustered_spectrum(d=400):
    """A symmetric float64 matrix whose extreme eigenvalues are close to the rest (top:
    1.05, 1.1, 1.2, 1.3, 1.5 over ``d − 10`` evenly in ``[−0.4, 1]``; bottom: −0.6, −0.5,
    −0.45, −0.42, −0.41): 20 Lanczos products leave their Ritz values ``≈ 1e-4`` off."""
    rng = np.random.default_rng(2)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    spectrum = np.concatenate([[-0.6, -0.5, -0.45, -0.42, -0.41], np.linspace(-0.4, 1, d - 10),
                               [1.05, 1.1, 1.2, 1.3, 1.5]])
    dense = (basis * spectrum) @ basis.T
    return (dense + dense.T) / 2


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_restarted_lanczos_eigsh_converges_where_one_basis_does_not(which):
    """With a basis of 20 vectors, one Lanczos cycle (``lanczos_eigsh`` with 20 products)
    leaves the three wanted pairs of a clustered spectrum visibly off; thick restarts with
    the same 21 vectors of memory converge to the eigenpairs of ``eigh`` within ``tol``,
    in at most ``ncv + restarts·(ncv − p)`` counted products. The residuals returned are
    ``‖M vⱼ − λⱼ vⱼ‖`` from ``M`` itself; under ``jit`` (a ``while_loop`` of cycles) the
    same pairs."""
    dense = _clustered_spectrum()
    d, k, ncv = len(dense), 3, 20
    one_cycle = lanczos_eigsh(_matvec(dense), KEY, k, which=which, num_iterations=ncv, dim=d,
                              dtype=jnp.float64)[0]
    assert np.abs(np.asarray(one_cycle) - expected_eigsh(dense, k, which)).max() > 1e-6
    products = []

    def matvec(v):
        products.append(1)
        return jnp.asarray(dense) @ v

    kw = dict(which=which, ncv=ncv, max_restarts=300, tol=1e-10, dim=d, dtype=jnp.float64,
              return_residuals=True)
    values, vectors, residuals = restarted_lanczos_eigsh(matvec, KEY, k, **kw)
    check_eigenpairs(values, vectors, dense, k, which, atol=1e-9)
    direct = np.linalg.norm(dense @ vectors - np.asarray(vectors) * np.asarray(values), axis=0)
    np.testing.assert_allclose(residuals, direct, rtol=1e-4, atol=1e-14)
    assert np.all(residuals <= 1e-10 * 1.5 * (1 + 1e-9))
    kept = k + (ncv - k) // 2
    assert ncv < len(products) < 300 and (len(products) - ncv) % (ncv - kept) == 0
    jitted = jax.jit(lambda key: restarted_lanczos_eigsh(_matvec(dense), key, k, **kw))(KEY)
    np.testing.assert_allclose(jitted[0], values, rtol=1e-12)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(jitted[1]) * vectors, axis=0)), 1,
                               atol=1e-9)


def test_restarted_lanczos_eigsh_warns_when_it_has_not_converged(fisher):
    """Two restarts are not enough for the clustered spectrum at ``tol = 1e-10``: the pairs
    come back as they are, their residuals above ``tol · max|θ|``, with a warning naming the
    largest (a ``matvec`` driven from Python, a stored matrix as one program); none with
    ``tol = 0`` (every restart asked for; a NumPy scalar is a number too) or once
    converged."""
    import warnings

    dense = _clustered_spectrum()
    d = len(dense)
    options = dict(ncv=20, max_restarts=2, tol=1e-10, return_residuals=True)
    for M, extra in [(_matvec(dense), dict(dim=d, dtype=jnp.float64)),
                     (PMatDense(LayerCollection.from_params({"w": jnp.zeros(d)}),
                                jnp.asarray(dense)), {})]:
        with pytest.warns(RuntimeWarning, match="did not converge in 2 restarts") as caught:
            values, vectors, residuals = restarted_lanczos_eigsh(M, KEY, 3, **options, **extra)
        assert f"{float(np.max(residuals)):.3g}" in str(caught[0].message)
        assert np.max(residuals) > 1e-10 * 1.5
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            restarted_lanczos_eigsh(M, KEY, 3, **{**options, "tol": np.float32(0)}, **extra)
            restarted_lanczos_eigsh(M, KEY, 3, **{**options, "max_restarts": 300}, **extra)


def test_restarted_lanczos_eigsh_without_restarts_is_one_lanczos_cycle(fisher):
    """``max_restarts=0``: the Ritz pairs of ``ncv`` Lanczos steps (``lanczos_eigsh`` with
    ``num_iterations = ncv`` from the same start vector) and their residuals."""
    t, F, dense = fisher
    want = lanczos_eigsh(F, KEY, 3, num_iterations=12, return_residuals=True)
    with pytest.warns(RuntimeWarning, match="did not converge in 0 restarts"):  # 12 steps
        got = restarted_lanczos_eigsh(F, KEY, 3, ncv=12, max_restarts=0,
                                      return_residuals=True)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(got[1]) * want[1], axis=0)), 1,
                               atol=1e-8)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6, atol=1e-12)


def test_restarted_lanczos_eigsh_of_a_fisher_and_a_hessian(fisher):
    """The exact Fisher stored, matrix-free (eager: compiled steps between the chunk
    products) and under ``jit``; an indefinite matrix-free Hessian's largest-magnitude
    and smallest pairs; ``ncv = d`` converges in one cycle, the Fisher's null space
    included (its smallest pairs: a repeated ``0``, reached by continuing the exhausted
    Krylov space)."""
    t, F, dense = fisher
    d = len(dense)
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    for M in (F, implicit):  # "LM" of a PSD matrix: its largest ("LA" under jit, below)
        values, vectors = restarted_lanczos_eigsh(M, KEY, 3, which="LM", ncv=10, tol=1e-12,
                                                  max_restarts=200)
        check_eigenpairs(values, vectors, dense, 3, "LM", atol=1e-9)
    jitted = jax.jit(lambda M, key: restarted_lanczos_eigsh(M, key, 3, ncv=10, tol=1e-12,
                                                            max_restarts=200))(F, KEY)
    check_eigenpairs(*jitted, dense, 3, "LA", atol=1e-9)
    from pmat_checks import compilations

    for M in (F, implicit):  # one program per structure / compiled steps: nothing anew
        with compilations() as compiled:
            values, _ = restarted_lanczos_eigsh(M, jax.random.key(7), 3, which="LM", ncv=10,
                                                tol=np.float64(1e-12), max_restarts=200)
        assert compiled == []
        np.testing.assert_allclose(values, expected_eigsh(dense, 3, "LM"), rtol=1e-9)
    for which in ("LA", "SA"):
        values, vectors = restarted_lanczos_eigsh(F, KEY, 4, which=which, ncv=d,
                                                  max_restarts=0)
        check_eigenpairs(values, vectors, dense, 4, which, atol=1e-9)

    H = _hessian(t)
    hessian = np.asarray(H.to_dense())
    for which in ("LM", "SA"):
        values, vectors = restarted_lanczos_eigsh(H, KEY, 2, which=which, ncv=12, tol=1e-12,
                                                  max_restarts=300)
        check_eigenpairs(values, vectors, hessian, 2, which, atol=1e-9)


# ------------------------------------------------------- stochastic Lanczos quadrature
def _synthetic(d=30, decay=None, seed=0):
    """A symmetric float64 matrix with known eigenvalues (ascending) and a random basis."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    eigenvalues = np.linspace(0.1, 2.0, d) if decay is None else decay ** np.arange(d)[::-1]
    dense = (basis * eigenvalues) @ basis.T
    return (dense + dense.T) / 2, np.sort(eigenvalues), basis


def test_lobpcg_eigsh_against_eigh_and_its_residuals(fisher):
    """The three largest and the three smallest eigenpairs of the Fisher (the smallest a
    repeated 0: any orthonormal basis of the null space), each with the residual
    ``‖M vⱼ − λⱼ vⱼ‖`` computed from ``M`` itself; a stored matrix, its matvec and the
    matrix-free Fisher give the same pairs."""
    t, F, dense = fisher
    d = len(dense)
    for which in ("LA", "SA"):
        values, vectors, residuals = lobpcg_eigsh(F, KEY, 3, which=which, tol=1e-12,
                                                  return_residuals=True)
        check_eigenpairs(values, vectors, dense, 3, which, atol=1e-9)
        direct = np.linalg.norm(dense @ vectors - np.asarray(vectors) * np.asarray(values),
                                axis=0)
        np.testing.assert_allclose(residuals, direct, atol=1e-12)
    want = lobpcg_eigsh(F, KEY, 3, tol=1e-12)
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    for M, options in [(implicit, {}), (_matvec(dense), dict(dim=d, dtype=jnp.float64))]:
        got = lobpcg_eigsh(M, KEY, 3, tol=1e-12, **options)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-9)
        np.testing.assert_allclose(np.abs(np.sum(np.asarray(got[1]) * want[1], axis=0)), 1,
                                   atol=1e-8)


def test_lobpcg_eigsh_converges_on_a_separated_spectrum_to_its_tolerance():
    """The top three of a 300 × 300 spectrum (4, 6, 10 apart from the rest in [0, 1]) to
    round-off within 40 iterations; with ``tol`` each residual at most ``tol · |λ|``, the
    iterations stopped there (not at round-off); two iterations give coarser values."""
    dense, basis = _separated_spectrum()
    options = dict(dim=300, dtype=jnp.float64)
    for tol in (1e-3, 1e-6):
        values, _, residuals = lobpcg_eigsh(_matvec(dense), KEY, 3, num_iterations=40,
                                            tol=tol, return_residuals=True, **options)
        np.testing.assert_array_less(residuals, tol * np.asarray(values))
        assert np.max(np.asarray(residuals) / np.asarray(values)) > tol / 1e3
    values, vectors = lobpcg_eigsh(_matvec(dense), KEY, 3, num_iterations=40, tol=1e-13,
                                   **options)
    np.testing.assert_allclose(values, [4.0, 6.0, 10.0], rtol=1e-10)
    np.testing.assert_allclose(np.abs(np.sum(np.asarray(vectors) * basis[:, -3:], axis=0)), 1,
                               atol=1e-8)
    coarse, _ = lobpcg_eigsh(_matvec(dense), KEY, 3, num_iterations=2, **options)
    assert np.abs(np.asarray(coarse) - [4.0, 6.0, 10.0]).max() > 1e-6


def test_lobpcg_eigsh_of_an_indefinite_hessian_eagerly_and_under_jit(fisher):
    """The implicit Hessian's two smallest (negative) eigenpairs; an eager call of the same
    structure compiles nothing the second time; under ``jit`` the same pairs."""
    from pmat_checks import compilations

    t, F, dense = fisher
    H = _hessian(t)
    hessian = np.asarray(H.to_dense())
    assert np.linalg.eigvalsh(hessian)[0] < 0
    options = dict(which="SA", num_iterations=200, tol=1e-12)
    values, vectors = lobpcg_eigsh(H, KEY, 2, **options)
    check_eigenpairs(values, vectors, hessian, 2, "SA", atol=1e-8)
    with compilations() as compiled:
        again = lobpcg_eigsh(H, jax.random.key(7), 2, **options)
    assert compiled == []
    np.testing.assert_allclose(again[0], values, rtol=1e-8)
    jitted = jax.jit(lambda M: lobpcg_eigsh(M, KEY, 2, **options))(H)
    np.testing.assert_allclose(jitted[0], values, rtol=1e-10)


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_lobpcg_eigsh_of_the_zero_matrix_is_zeros_and_an_orthonormal_block(which):
    """``M = 0`` (a dead network's Fisher): every vector is an eigenvector of ``0``. JAX's
    iterations normalise the exactly zero residuals, which their relative test never
    accepts (0/0: NaN); the pairs are ``0`` and the start block orthonormalised, as a
    representation and as a ``matvec``, eagerly and under ``jit`` — and a matrix with a
    NaN entry stays NaN."""
    d = 12
    zero = PMatDense(LayerCollection.from_params({"w": jnp.zeros(d)}), jnp.zeros((d, d)))
    for M in (zero, _matvec(np.zeros((d, d)))):
        options = {} if M is zero else dict(dim=d, dtype=jnp.float64)
        for values, vectors, residuals in (
                lobpcg_eigsh(M, KEY, 2, which=which, return_residuals=True, **options),
                jax.jit(lambda k, M=M, options=options: lobpcg_eigsh(
                    M, k, 2, which=which, return_residuals=True, **options))(KEY)):
            np.testing.assert_array_equal(values, np.zeros(2))
            np.testing.assert_allclose(vectors.T @ vectors, np.eye(2), atol=1e-12)
            np.testing.assert_array_equal(residuals, np.zeros(2))
    broken = PMatDense(zero.layer_collection, jnp.zeros((d, d)).at[3, 3].set(jnp.nan))
    assert np.all(np.isnan(lobpcg_eigsh(broken, KEY, 2)[0]))


def test_lobpcg_eigsh_refusals(fisher):
    t, F, dense = fisher
    with pytest.raises(ValueError, match=r"needs 5k < d .* k=11 for d=52: use lanczos_eigsh"):
        lobpcg_eigsh(F, KEY, 11)
    with pytest.raises(ValueError, match="'LA' or 'SA'; got 'LM'.*lanczos_eigsh"):
        lobpcg_eigsh(F, KEY, 2, which="LM")
    with pytest.raises(ValueError, match="num_iterations must be an integer ≥ 1; got 0"):
        lobpcg_eigsh(F, KEY, 2, num_iterations=0)
    with pytest.raises(ValueError, match="tol must be a number ≥ 0"):
        lobpcg_eigsh(F, KEY, 2, tol=-1.0)
    with pytest.raises(ValueError, match="k must be an integer ≥ 1"):
        lobpcg_eigsh(F, KEY, 0)


def _matvec(dense):
    return lambda v: jnp.asarray(dense) @ v


def _moments(nodes, weights, powers):
    """``Σⱼ wⱼ θⱼ^p`` per probe, ``(len(powers), m)``."""
    return np.stack([np.sum(weights * nodes**p, axis=-1) for p in powers])


def test_lanczos_quadrature_from_the_identity_is_the_exact_spectral_density(fisher):
    """``k = d`` steps from every ``eᵢ``: per probe the quadrature is exact for every power
    (``Σ w θ^p = eᵢᵀ M^p eᵢ``), so their mean is the spectral measure of ``M`` — the
    moments ``tr(M^p)/d`` and the broadened density of the brute-force eigenvalues."""
    t, F, dense = fisher
    d = len(dense)
    nodes, weights = lanczos_quadrature(F, jnp.eye(d), d)
    assert nodes.shape == weights.shape == (d, d)
    assert np.all(np.asarray(weights) >= 0)
    np.testing.assert_allclose(np.sum(weights, axis=1), 1, rtol=1e-12)
    powers = range(12)
    got = _moments(nodes, weights, powers)
    want = np.stack([np.diag(np.linalg.matrix_power(dense, p)) for p in powers])
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(
        got.mean(axis=1), [np.trace(np.linalg.matrix_power(dense, p)) / d for p in powers],
        rtol=1e-8)

    eigenvalues = np.linalg.eigvalsh(dense)
    sigma = 0.02
    grid = np.linspace(eigenvalues[0] - 6 * sigma, eigenvalues[-1] + 6 * sigma, 3001)
    density = spectral_density_on_grid(nodes, weights, grid, sigma=sigma)
    brute = np.mean(np.exp(-0.5 * ((grid[:, None] - eigenvalues) / sigma) ** 2), axis=1) / (
        sigma * np.sqrt(2 * np.pi))
    np.testing.assert_allclose(density, brute, rtol=1e-7, atol=1e-10 * brute.max())
    np.testing.assert_allclose(np.sum(density) * (grid[1] - grid[0]), 1, rtol=1e-9)


def test_lanczos_quadrature_is_gauss_quadrature_of_degree_2k_minus_1():
    """``k`` steps from any ``v``: ``Σⱼ wⱼ θⱼ^p = vᵀM^p v / vᵀv`` for ``p ≤ 2k − 1`` and
    not beyond (for a PD ``M`` the Gauss rule underestimates ``t^{2k}``); ``k = d`` gives
    the eigenvalues as nodes and the squared components of ``q`` in the eigenbasis as
    weights."""
    dense, eigenvalues, basis = _synthetic()
    d, k = len(dense), 4
    vectors = jax.random.normal(KEY, (3, d), jnp.float64)
    q = np.asarray(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    nodes, weights = lanczos_quadrature(_matvec(dense), vectors, k)
    assert nodes.shape == weights.shape == (3, k)
    got = _moments(nodes, weights, range(2 * k + 1))
    want = np.stack([np.einsum("md,de,me->m", q, np.linalg.matrix_power(dense, p), q)
                     for p in range(2 * k + 1)])
    np.testing.assert_allclose(got[:2 * k], want[:2 * k], rtol=1e-10)
    assert np.all(got[2 * k] < want[2 * k] * (1 - 1e-6))

    nodes, weights = lanczos_quadrature(_matvec(dense), vectors, d)
    np.testing.assert_allclose(nodes, np.broadcast_to(eigenvalues, (3, d)), rtol=1e-10)
    order = np.argsort(np.diag(basis.T @ dense @ basis))
    np.testing.assert_allclose(weights, (q @ basis[:, order]) ** 2, rtol=1e-6, atol=1e-13)


def test_slq_moments_are_unbiased_estimates_of_the_spectral_moments():
    """Random probes: the mean over probes of ``Σ w θ^p`` is within a few standard errors
    of ``tr(M^p)/d`` for ``p ≤ 2k − 1``; Rademacher probes on a diagonal matrix are exact
    (``qᵀ M^p q = tr(M^p)/d`` for ``q = v/√d``)."""
    dense, eigenvalues, _ = _synthetic()
    d, k, m = len(dense), 3, 400
    for distribution in ("rademacher", "normal"):
        nodes, weights = lanczos_spectral_density(
            _matvec(dense), KEY, num_steps=k, num_probes=m, distribution=distribution,
            dim=d, dtype=jnp.float64)
        assert nodes.shape == weights.shape == (m, k)
        got = _moments(nodes, weights, range(1, 2 * k))
        want = [np.sum(eigenvalues**p) / d for p in range(1, 2 * k)]
        error = np.abs(got.mean(axis=1) - want)
        assert np.all(error < 4 * got.std(axis=1) / np.sqrt(m))
        assert np.all(error > 0)  # estimates, not exact

    diagonal = lambda v: jnp.asarray(eigenvalues) * v  # noqa: E731
    nodes, weights = lanczos_spectral_density(diagonal, KEY, num_steps=k, num_probes=5,
                                              dim=d, dtype=jnp.float64)
    got = _moments(nodes, weights, range(2 * k))
    np.testing.assert_allclose(
        got, np.broadcast_to([[np.mean(eigenvalues**p)] for p in range(2 * k)], got.shape),
        rtol=1e-10)


def test_spectral_density_curve_follows_papyan():
    """The grid spans the extreme nodes widened by ``margin`` (or the ``boundaries``
    given), the width is ``h · 2/((k − 1)√(8 ln κ))`` for the half-width ``h`` — curvlinops'
    ``lanczos_approximate_spectrum`` on the nodes rescaled to ``[−1, 1]``, written out
    here — and the density integrates to about 1 (a bump of each end falls partly outside
    a 5% margin); the same under ``jit``."""
    dense, eigenvalues, _ = _synthetic()
    d, k = len(dense), 12
    kw = dict(dim=d, dtype=jnp.float64)
    nodes, weights = lanczos_spectral_density(_matvec(dense), KEY, num_steps=k, num_probes=3,
                                              **kw)
    grid, density = spectral_density_curve(nodes, weights, num_points=400)
    low, high = float(np.min(nodes)), float(np.max(nodes))
    np.testing.assert_allclose([grid[0], grid[-1]],
                               [low - 0.05 * (high - low), high + 0.05 * (high - low)],
                               rtol=1e-12)
    center, half = (grid[0] + grid[-1]) / 2, (grid[-1] - grid[0]) / 2
    sigma = 2 / (k - 1) / np.sqrt(8 * np.log(3.0))  # on [−1, 1]
    unit = (np.asarray(nodes) - center) / half  # curvlinops' normalised nodes
    normalised = np.sum(np.asarray(weights)[..., None] / half * np.exp(
        -0.5 * ((np.linspace(-1, 1, 400) - unit[..., None]) / sigma) ** 2)
        / (sigma * np.sqrt(2 * np.pi)), axis=(0, 1)) / nodes.shape[0]
    np.testing.assert_allclose(density, normalised, rtol=1e-10)
    assert 0.9 < np.trapezoid(density, grid) <= 1.0
    width = eigenvalues[-1] - eigenvalues[0]  # the extreme nodes near the extreme eigenvalues
    np.testing.assert_allclose([low, high], eigenvalues[[0, -1]], atol=1e-2 * width)
    given, _ = spectral_density_curve(nodes, weights, num_points=5, boundaries=(0.0, 4.0),
                                      margin=0.0)
    np.testing.assert_allclose(given, [0, 1, 2, 3, 4])
    jitted = jax.jit(lambda n, w: spectral_density_curve(n, w, num_points=400))(nodes, weights)
    np.testing.assert_allclose(jitted[1], density, rtol=1e-12)
    with pytest.raises(ValueError, match="kappa must be > 1"):
        spectral_density_curve(nodes, weights, kappa=1.0)
    with pytest.raises(ValueError, match="k ≥ 2"):
        spectral_density_curve(nodes[:, :1], weights[:, :1])


@pytest.mark.parametrize("value", [2.5, -3.0, 0.0])
def test_spectral_density_curve_of_a_point_spectrum(value):
    """The nodes of ``s·I`` are all ``s``: the curve is one bump on ``s ± |s|/2`` (``± 1/2``
    at ``s = 0``), widened by the margin, peaked at ``s``, of integral about 1."""
    nodes = jnp.full((2, 6), value)
    weights = jnp.full((2, 6), 1 / 6)
    grid, density = spectral_density_curve(nodes, weights, num_points=401)
    half = abs(value) / 2 if value else 0.5
    np.testing.assert_allclose([grid[0], grid[-1]],
                               [value - 1.1 * half, value + 1.1 * half], atol=1e-12)
    assert np.all(np.isfinite(density))
    np.testing.assert_allclose(grid[np.argmax(density)], value, atol=1e-12)
    np.testing.assert_allclose(np.trapezoid(density, grid), 1.0, atol=1e-6)


def test_slq_of_matrix_free_operators_and_under_jit(fisher):
    """A PMatImplicit Fisher (all probes in one data pass per step), a function and a jitted
    call give the dense Fisher's nodes and weights; the broadened density integrates to 1;
    a Hessian's density has negative nodes."""
    t, F, dense = fisher
    d = len(dense)
    nodes, weights = lanczos_spectral_density(F, KEY, num_steps=8, num_probes=3)
    assert nodes.shape == weights.shape == (3, 8)
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    got = lanczos_spectral_density(implicit, KEY, num_steps=8, num_probes=3)
    np.testing.assert_allclose(got[0], nodes, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(got[1], weights, rtol=1e-6, atol=1e-12)
    got = lanczos_spectral_density(_matvec(dense), KEY, num_steps=8, num_probes=3, dim=d,
                                   dtype=jnp.float64)
    np.testing.assert_allclose(got[0], nodes, rtol=1e-10, atol=1e-13)
    got = jax.jit(lambda M, k: lanczos_spectral_density(M, k, num_steps=8, num_probes=3))(
        F, KEY)
    np.testing.assert_allclose(got[0], nodes, rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(got[1], weights, rtol=1e-8, atol=1e-13)
    sigma = 0.01
    grid = jnp.linspace(nodes.min() - 8 * sigma, nodes.max() + 8 * sigma, 2000)
    density = jax.jit(lambda n, w, g: spectral_density_on_grid(n, w, g, sigma=sigma))(
        nodes, weights, grid)
    assert np.all(np.asarray(density) >= 0)
    np.testing.assert_allclose(np.sum(density) * (grid[1] - grid[0]), 1, rtol=1e-8)

    def loss(params, batch):
        x, y = batch
        return -jnp.mean(jax.nn.log_softmax(t.apply_fn(params, x))[jnp.arange(len(y)), y])

    H = Hessian(loss, t.params, (t.x, t.y), PMatImplicit)
    hessian = np.asarray(H.to_dense())
    spectrum = np.linalg.eigvalsh(hessian)
    nodes, weights = lanczos_spectral_density(H, KEY, num_steps=6, num_probes=2)
    assert np.all(nodes >= spectrum[0] - 1e-8) and np.all(nodes <= spectrum[-1] + 1e-8)
    assert np.min(nodes) < 0 < np.max(nodes)
    q = rademacher_probes(KEY, (2, d), jnp.float64) / np.sqrt(d)  # the probes, normalised
    want = [np.einsum("md,de,me->m", q, np.linalg.matrix_power(hessian, p), q)
            for p in range(1, 12)]
    np.testing.assert_allclose(_moments(nodes, weights, range(1, 12)), want, rtol=1e-7)


def test_slq_estimates_a_log_determinant(fisher):
    """``tr f(M) ≈ d · mean_i Σⱼ wᵢⱼ f(θᵢⱼ)`` with ``f = log(· + λ)`` (Lanczos on
    ``M + λI`` has the nodes ``θ + λ``, the same weights): a matrix-free Fisher's damped
    log-determinant, within a few standard errors of the stored matrix's exact one."""
    t, F, dense = fisher
    d, m, regul = len(dense), 200, 0.05
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    nodes, weights = lanczos_spectral_density(implicit, KEY, num_steps=10, num_probes=m)
    per_probe = d * np.sum(weights * np.log(nodes + regul), axis=1)
    want = F.logdet(regul)
    np.testing.assert_allclose(want, np.sum(np.log(np.linalg.eigvalsh(dense) + regul)),
                               rtol=1e-10)
    assert abs(per_probe.mean() - want) < 4 * per_probe.std() / np.sqrt(m)


# ----------------------------------------------------------------------- XTrace, XDiag
def _xtrace_by_definition(dense, omega, improved):
    """Algorithm 1.2 of Epperly et al.: leave-one-out QR per probe, Hutch++ with the rest."""
    d, s = len(dense), len(omega)
    y = dense @ omega.T
    traces, diags = [], []
    for i in range(s):
        q, _ = np.linalg.qr(np.delete(y, i, axis=1))
        projected = omega[i] - q @ (q.T @ omega[i])
        rest = projected @ dense @ projected
        if improved:
            rest *= (d - s + 1) / (projected @ projected)
        traces.append(np.trace(q.T @ dense @ q) + rest)
        diags.append(np.sum(q * (dense @ q), axis=1) + omega[i] * (dense @ omega[i]
                                                                 - q @ (q.T @ y[:, i])))
    return np.mean(traces), np.mean(diags, axis=0)


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_xtrace_and_xdiag_match_their_definition(fisher, distribution):
    dense, _, _ = _synthetic(decay=0.8)
    d, m = len(dense), 12
    draw = rademacher_probes if distribution == "rademacher" else jax.random.normal
    omega = np.asarray(draw(KEY, (m // 2, d), jnp.float64))
    trace, diag = _xtrace_by_definition(dense, omega, distribution == "normal")
    M = _matvec(dense)
    kw = dict(distribution=distribution, dim=d, dtype=jnp.float64)
    np.testing.assert_allclose(xtrace(M, KEY, m, **kw), trace, rtol=1e-10)
    np.testing.assert_allclose(xdiag(M, KEY, m, **kw), diag, rtol=1e-9, atol=1e-12)


def test_xtrace_and_xdiag_are_exact_below_half_the_rank(fisher):
    """``rank M < m/2``: every leave-one-out sketch spans the range of ``M``; exact for a
    singular (low-rank) Fisher, whose ``R`` factor is singular. Normal probes (the
    rescaled Hutchinson term) are also exact for a multiple of the identity."""
    t, F, dense = fisher
    L = FIM(t.apply_fn, t.params, (t.x, t.y), PMatLowRank)
    r = L.factor.shape[0]
    m = 2 * (r + 1)
    for distribution in ("rademacher", "normal"):
        np.testing.assert_allclose(xtrace(L, KEY, m, distribution=distribution),
                                   np.trace(dense), rtol=1e-9)
        np.testing.assert_allclose(xdiag(F, KEY, m, distribution=distribution),
                                   np.diag(dense), rtol=1e-8, atol=1e-12 * dense.max())
    assert abs(xtrace(L, KEY, m - 4) - np.trace(dense)) > 1e-6  # estimate: rank ≥ m/2
    eye = PMatEye(F.layer_collection, 2.5)
    np.testing.assert_allclose(xtrace(eye, KEY, 6, distribution="normal"), 2.5 * len(dense),
                               rtol=1e-12)


def test_xtrace_is_unbiased_and_beats_hutchinson_on_a_decaying_spectrum():
    """300 keys: the mean XTrace (and XDiag) estimate is within 4 standard errors of the
    truth; for a fast-decaying spectrum, at the same ``m`` products, its mean error is far
    below Hutchinson's and below Hutch++'s."""
    dense, eigenvalues, _ = _synthetic(decay=0.5)
    d, m = len(dense), 12
    M = _matvec(dense)
    keys = jax.random.split(KEY, 300)
    run = lambda f: np.asarray(jax.jit(jax.vmap(  # noqa: E731
        lambda k: f(M, k, m, dim=d, dtype=jnp.float64)))(keys))
    traces = run(xtrace)
    assert abs(traces.mean() - eigenvalues.sum()) < 4 * traces.std() / np.sqrt(len(keys))
    diags = run(xdiag)
    se = diags.std(axis=0) / np.sqrt(len(keys))
    assert np.all(np.abs(diags.mean(axis=0) - np.diag(dense)) < 4.5 * se + 1e-14)

    def error(estimates):
        return np.mean(np.abs(estimates - eigenvalues.sum()))

    assert error(traces) < 0.2 * error(run(hutchinson_trace))
    assert error(traces) < 0.75 * error(run(hutchpp_trace))
    diag_error = lambda e: np.mean(np.linalg.norm(e - np.diag(dense), axis=1))  # noqa: E731
    assert diag_error(diags) < 0.3 * diag_error(run(hutchinson_diag))


def test_xtrace_of_matrix_free_operators_and_under_jit(fisher):
    t, F, dense = fisher
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    want_trace, want_diag = xtrace(F, KEY, 20), xdiag(F, KEY, 20)
    assert want_diag.shape == (len(dense),)
    np.testing.assert_allclose(xtrace(implicit, KEY, 20), want_trace, rtol=1e-9)
    np.testing.assert_allclose(xdiag(implicit, KEY, 20), want_diag, rtol=1e-7, atol=1e-12)
    np.testing.assert_allclose(
        jax.jit(lambda M, k: xtrace(M, k, 20))(F, KEY), want_trace, rtol=1e-10)
    np.testing.assert_allclose(
        jax.jit(lambda M, k: xdiag(M, k, 20))(F, KEY), want_diag, rtol=1e-8, atol=1e-13)

    def loss(params, batch):
        x, y = batch
        return -jnp.mean(jax.nn.log_softmax(t.apply_fn(params, x))[jnp.arange(len(y)), y])

    H = Hessian(loss, t.params, (t.x, t.y), PMatDense)
    H_implicit = Hessian(loss, t.params, (t.x, t.y), PMatImplicit)
    np.testing.assert_allclose(xtrace(H_implicit, KEY, 20), xtrace(H, KEY, 20), rtol=1e-8)


def test_refusals_of_slq_and_xtrace(fisher):
    t, F, dense = fisher
    d = len(dense)
    with pytest.raises(ValueError, match="even"):
        xtrace(F, KEY, 11)
    with pytest.raises(ValueError, match="at most 2·d"):
        xdiag(F, KEY, 2 * d + 2)
    with pytest.raises(ValueError, match="≥ 2"):
        xtrace(F, KEY, 0)
    with pytest.raises(ValueError, match="num_steps must be at most d"):
        lanczos_spectral_density(F, KEY, num_steps=d + 1, num_probes=2)
    with pytest.raises(ValueError, match="num_probes"):
        lanczos_spectral_density(F, KEY, num_steps=3, num_probes=0)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos_quadrature(F, jnp.eye(d), 0)
    with pytest.raises(ValueError, match=r"\(m, d\)"):
        lanczos_quadrature(F, jnp.ones(d), 3)
    with pytest.raises(ValueError, match="3 columns"):
        lanczos_quadrature(F, jnp.ones((2, 3)), 3)
    with pytest.raises(ValueError, match="one shape"):
        spectral_density_on_grid(jnp.ones((2, 3)), jnp.ones((3, 2)), jnp.zeros(4), sigma=1.0)
    with pytest.raises(ValueError, match="sigma"):
        spectral_density_on_grid(jnp.ones(3), jnp.ones(3), jnp.zeros(4), sigma=0.0)


def test_counts_may_be_numpy_integers(fisher):
    """A count or a dimension from a NumPy array (``np.int64``) is an integer as any other:
    the same estimates as Python ints (it was refused by name)."""
    t, F, dense = fisher
    d = len(dense)
    matvec = jax.jit(lambda v: jnp.asarray(dense) @ v)
    np.testing.assert_allclose(hutchinson_trace(matvec, KEY, np.int64(8), dim=np.int64(d)),
                               hutchinson_trace(matvec, KEY, 8, dim=d), rtol=1e-12)
    for M in (F, matvec):
        kw = {} if M is F else dict(dim=d)
        np.testing.assert_allclose(lanczos_eigsh(M, KEY, np.int64(2), **kw)[0],
                                   lanczos_eigsh(M, KEY, 2, **kw)[0], rtol=1e-12)


def test_quadrature_and_density_refuse_what_has_no_meaning(fisher):
    """A zero start vector has no spectral measure (its quadrature was a NaN node of weight
    1), for a stored matrix (one compiled program) and a matvec alike; reversed density
    boundaries are named (the error spoke of a ``sigma`` never passed)."""
    t, F, dense = fisher
    d = len(dense)
    starts = jnp.ones((3, d)).at[1].set(0.0)
    for M, kw in ((F, {}), (lambda v: jnp.asarray(dense) @ v, {})):
        with pytest.raises(ValueError, match=r"nonzero .* rows \[1\] are 0"):
            lanczos_quadrature(M, starts, 3, **kw)
    nodes, weights = lanczos_quadrature(F, jnp.ones((1, d)), 3)
    for reversed_ in ((2.0, 1.0), (jnp.asarray(2.0), jnp.asarray(1.0)), (1.0, 1.0)):
        with pytest.raises(ValueError, match="boundaries must be"):
            spectral_density_curve(nodes, weights, boundaries=reversed_)


def test_a_matvec_of_the_wrong_shape_is_named():
    """A matvec function that does not map ``(d,)`` to ``(d,)`` (a ``dim`` that is not its
    dimension, a function that drops or adds entries) is refused by name, with both shapes
    (JAX's broadcast error, from deep inside an estimator, named neither)."""
    a = jnp.diag(jnp.arange(1.0, 7.0))
    cases = ((lambda v: a @ v, 5, r"failed on a \(5,\) vector \(dim=5\)"),
             (lambda v: (a @ v)[:-1], 6, r"must map a \(6,\) vector .* answered shape \(5,\)"))
    for matvec, dim, match in cases:
        estimators = (lambda m=matvec, d=dim: hutchinson_trace(m, KEY, 4, dim=d),
                      lambda m=matvec, d=dim: lanczos_eigsh(m, KEY, 2, dim=d),
                      lambda m=matvec, d=dim: lanczos_quadrature(m, jnp.ones((1, d)), 2))
        for estimator in estimators:
            with pytest.raises(ValueError, match=match):
                estimator()
