"""PMatLowRank: storage and every operation against the float64 brute-force Fisher."""

import jax
import jax.numpy as jnp
import models
import numpy as np
import pytest
from models import make_equinox_mlp, make_linen_cnn, make_linen_mlp, reference_fisher
from pmat_checks import check_eigsh, check_products

from jaxgeom import FIM, FIM_MonteCarlo, LayerCollection, SecondMoment, random_pvector
from jaxgeom.pmat import _gram
from jaxgeom.pmat.dense import PMatDense
from jaxgeom.pmat.eye import PMatEye
from jaxgeom.pmat.lowrank import PMatLowRank
from jaxgeom.variants import softmax_cholesky_outputs

TOL = dict(rtol=1e-8, atol=1e-10)
REGUL = 1e-3


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    t = request.param()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatLowRank, batch_size=3)
    return t, F, np.asarray(reference_fisher(t.apply_fn, t.params, t.x))


def vec(t, seed=0):
    return random_pvector(jax.random.PRNGKey(seed), t.params)


def test_storage_is_the_reference(case):
    t, F, ref = case
    n, d = t.x.shape[0], ref.shape[0]
    assert F.factor.shape == (n * (t.num_outputs - 1), d)  # r = N K, softmax K = C - 1
    np.testing.assert_allclose(F.coef, 1 / n)
    np.testing.assert_allclose(F.to_dense(), ref, **TOL)
    assert F.size() == (d, d)


def test_products(case):
    t, F, ref = case
    check_products(F, ref, t.params)


def test_scalars_and_norms(case):
    t, F, ref = case
    eig = np.linalg.eigvalsh(ref)
    np.testing.assert_allclose(F.norm(2), np.abs(eig).max(), **TOL)
    np.testing.assert_allclose(F.norm(-2), 0.0, atol=1e-12)  # r < d: singular
    np.testing.assert_allclose(F.eigvalsh(), eig, atol=1e-12)


def test_eigh_is_thin_and_reconstructs(case):
    t, F, ref = case
    evals, evecs = F.eigh()
    r, d = F.factor.shape
    assert evals.shape == (r,) and evecs.shape == (d, r)
    assert np.all(np.isfinite(evecs))
    np.testing.assert_allclose(evecs.T @ evecs, np.eye(r), atol=1e-12)
    np.testing.assert_allclose((evecs * evals) @ evecs.T, ref, atol=1e-12)
    assert np.all(np.diff(evals) >= 0)


def test_eigsh_from_the_thin_decomposition(case):
    """``k`` eigenpairs without ``d × d``: the thin ones, and the shift's on the complement
    of their span (with ``"SA"`` of a singular Fisher: unit vectors of its null space), a
    shifted matrix's and an indefinite one's (signed weights)."""
    t, F, ref = case
    d = len(ref)
    check_eigsh(F, ref)
    S = F + PMatEye(F.layer_collection, TAU)
    check_eigsh(S, ref + TAU * np.eye(d), k=4)
    check_eigsh(2 * F.pow(2) - F, 2 * ref @ ref - ref)


#: the methods that solve exactly (to a tolerance): the Neumann series is a polynomial,
#: checked as one (pmat_checks.check_solve)
CONVERGED_SOLVES = [m for m in PMatLowRank.SOLVE_METHODS if m != "neumann"]


def _tolerance(method):
    return {"rtol": 1e-13} if method in ("cg", "minres") else {}


@pytest.mark.parametrize("method", CONVERGED_SOLVES)
def test_solve_keeps_the_null_space(case, method):
    t, F, ref = case
    v = vec(t, 2)  # generic: most of v lies in the null space of F
    rhs = F.mv(v) + REGUL * v
    options = _tolerance(method)
    x = F.solve(rhs, REGUL, method=method, **options)
    np.testing.assert_allclose(x.to_flat(), v.to_flat(), rtol=1e-6, atol=1e-7)
    rows = jax.random.normal(jax.random.PRNGKey(3), (2, 3, ref.shape[0]))
    solved = F.solve(rows @ (ref + REGUL * np.eye(len(ref))), REGUL, method=method, **options)
    np.testing.assert_allclose(solved, rows, rtol=1e-5, atol=1e-6)


def test_solve_method_errors(case):
    t, F, _ = case
    with pytest.raises(ValueError, match="valid methods"):
        F.solve(vec(t), REGUL, method="cholesky")
    # a rank-deficient matrix (r = N K < d) undamped: its null space would divide by 0
    for method in ("woodbury", "eigh"):
        with pytest.raises(ValueError, match=r"shift \+ regul ≠ 0.*singular.*pinv"):
            F.solve(vec(t), method=method)
    shifted = F + 0.5 * PMatEye(F.layer_collection)  # full rank: M + 0.5 I
    np.testing.assert_allclose(shifted.solve(shifted.mv(vec(t))).to_flat(), vec(t).to_flat(),
                               rtol=1e-8)


def test_pinv_and_pow(case):
    t, F, ref = case
    evals, evecs = np.linalg.eigh(ref)
    keep = np.abs(evals) > len(ref) * np.finfo(float).eps * np.abs(evals).max()
    ref_pinv = (evecs[:, keep] / evals[keep]) @ evecs[:, keep].T
    pinv = F.pinv()
    assert isinstance(pinv, PMatLowRank)
    np.testing.assert_allclose(pinv.to_dense(), ref_pinv, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(F.pow(-1).to_dense(), pinv.to_dense(), **TOL)
    np.testing.assert_allclose(F.pinv(atol=np.inf).to_dense(), 0.0)
    square = F**2
    assert isinstance(square, PMatLowRank)
    np.testing.assert_allclose(square.to_dense(), ref @ ref, atol=1e-12)
    half = F.pow(0.5).to_dense()
    np.testing.assert_allclose(half @ half, ref, atol=1e-10)
    power = jax.jit(lambda M, p: M.pow(p).to_dense())  # p traced: its sign known at run time
    np.testing.assert_allclose(power(F, 0.5), half, **TOL)
    np.testing.assert_allclose(power(F, -1.0), pinv.to_dense(), **TOL)
    minus_half = F.pow(-0.5).to_dense()
    np.testing.assert_allclose(minus_half @ minus_half, ref_pinv, rtol=1e-6, atol=1e-6)


def test_singular_functions_point_elsewhere(case):
    t, F, _ = case
    with pytest.raises(ValueError, match=r"shift \+ regul.*pinv"):
        F.inv()  # rank ≤ r < d: singular
    with pytest.raises(NotImplementedError, match="identity"):
        F.pow(0)


TAU = 0.37  # a prior precision: N F + τI is a Laplace posterior's precision


def test_a_shifted_matrix_is_exact_everywhere(case):
    """``S = F + τI`` (``F + PMatEye``) stays low-rank with the shift ``τ``: every product,
    spectrum and function against the dense ``F + τI``."""
    t, F, ref = case
    d = len(ref)
    eye = PMatEye(F.layer_collection, TAU)
    S = F + eye
    dense = ref + TAU * np.eye(d)
    assert isinstance(S, PMatLowRank) and S.factor.shape == F.factor.shape
    np.testing.assert_allclose(S.shift, TAU)
    for M, expected in [(eye + F, dense), (F - eye, ref - TAU * np.eye(d)),
                        (S - eye, ref), (2 * S, 2 * dense), (-S, -dense), (S + S, 2 * dense)]:
        assert isinstance(M, PMatLowRank)
        np.testing.assert_allclose(M.to_dense(), expected, **TOL)
    check_products(S, dense, t.params)
    eig = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(S.eigvalsh(), eig, **TOL)
    np.testing.assert_allclose(S.norm(2), eig.max(), **TOL)
    np.testing.assert_allclose(S.norm(-2), TAU, **TOL)  # the d − r eigenvalues outside F's rows
    values, vectors = S.eigh()  # thin: M = V diag(λ) Vᵀ + s (I − V Vᵀ)
    projector = np.asarray(vectors @ vectors.T)
    np.testing.assert_allclose((vectors * values) @ vectors.T + TAU * (np.eye(d) - projector),
                               dense, **TOL)
    np.testing.assert_allclose(S.slogdet(REGUL), np.linalg.slogdet(dense + REGUL * np.eye(d)),
                               **TOL)
    v = vec(t)
    fv = np.asarray(v.to_flat())
    for method in CONVERGED_SOLVES:
        options = _tolerance(method)
        for regul in (0.0, REGUL):
            want = np.linalg.solve(dense + regul * np.eye(d), fv)
            got = S.solve(v, regul, method=method, **options).to_flat()
            np.testing.assert_allclose(got, want, rtol=1e-7, err_msg=method)
    inverse = np.linalg.inv(dense)
    for M, expected in [(S.inv(), inverse), (S.pinv(), inverse), (S.pow(-1), inverse),
                        (S.inv(REGUL), np.linalg.inv(dense + REGUL * np.eye(d))),
                        (S.pow(0), np.eye(d)), (S.pow(2), dense @ dense)]:
        assert isinstance(M, PMatLowRank) and M.factor.shape[0] <= F.factor.shape[0]
        np.testing.assert_allclose(M.to_dense(), expected, rtol=1e-7, atol=1e-9)


def test_damped_inverse_and_square_root_of_a_posterior(case):
    """Laplace with a low-rank GGN: ``Σ = (F + τI)⁻¹`` and ``Σ^{1/2} = (F + τI)^{-1/2}`` (to
    sample ``θ* + Σ^{1/2} z``) in the factor's storage, eagerly and under ``jit``."""
    t, F, ref = case
    d = len(ref)
    w, u = np.linalg.eigh(ref + TAU * np.eye(d))
    covariance = (u / w) @ u.T
    root = (u / np.sqrt(w)) @ u.T
    np.testing.assert_allclose(F.inv(TAU).to_dense(), covariance, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(F.pow(-1, TAU).to_dense(), covariance, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(F.pow(0.5, TAU).to_dense(), (u * np.sqrt(w)) @ u.T, rtol=1e-7,
                               atol=1e-10)
    jitted = jax.jit(lambda M, tau: M.pow(-0.5, tau))(F, TAU)
    for M in (F.pow(-0.5, TAU), jitted):
        assert isinstance(M, PMatLowRank) and M.factor.shape == (min(F.factor.shape), d)
        np.testing.assert_allclose(M.to_dense(), root, rtol=1e-7, atol=1e-10)
        np.testing.assert_allclose(M.shift, TAU ** -0.5, rtol=1e-12)
    z = np.random.default_rng(0).standard_normal(d)
    np.testing.assert_allclose(jitted.mv(z), root @ z, rtol=1e-7, atol=1e-10)


def test_algebra(case):
    t, F, ref = case
    G = F.pow(2)
    for M, expected in [
        (F + G, ref + ref @ ref),
        (F - G, ref - ref @ ref),
        (G - 3 * F, ref @ ref - 3 * ref),
        (1.23 * F, 1.23 * ref),
        (F * -0.5, -0.5 * ref),
        (F / 2, ref / 2),
        (-F, -ref),
    ]:
        assert isinstance(M, PMatLowRank)
        np.testing.assert_allclose(M.to_dense(), expected, atol=1e-12)
    np.testing.assert_allclose((F @ G).to_dense(), ref @ ref @ ref, atol=1e-12)
    assert isinstance(F + PMatDense.from_pmat(G), PMatDense)


def test_signed_weights_everywhere(case):
    """Every operation on an indefinite combination (per-row weights of both signs)."""
    t, F, ref = case
    M = 2 * F.pow(2) - F
    expected = 2 * ref @ ref - ref
    v = vec(t, 4)
    fv = np.asarray(v.to_flat())
    np.testing.assert_allclose(M.mv(fv), expected @ fv, atol=1e-12)
    np.testing.assert_allclose(M.vTMv(fv), fv @ expected @ fv, atol=1e-12)
    np.testing.assert_allclose(M.get_diag(), np.diag(expected), atol=1e-12)
    np.testing.assert_allclose(M.trace(), np.trace(expected), atol=1e-12)
    np.testing.assert_allclose(M.frobenius_norm(), np.linalg.norm(expected), rtol=1e-8)
    np.testing.assert_allclose(M.eigvalsh(), np.linalg.eigvalsh(expected), atol=1e-12)
    np.testing.assert_allclose(M.norm(2), np.abs(np.linalg.eigvalsh(expected)).max(),
                               rtol=1e-8)
    evals, evecs = M.eigh()
    np.testing.assert_allclose((evecs * evals) @ evecs.T, expected, atol=1e-12)
    regul = 0.3
    for method in ("woodbury", "eigh"):
        x = M.solve(expected @ fv + regul * fv, regul, method=method)
        np.testing.assert_allclose(x, fv, rtol=1e-8, atol=1e-9)
    # a fractional power of it is refused under the exponent asked for (was pow(0.5) for
    # pow(-0.5): checked after the inversion)
    for p in (0.5, -0.5):
        with pytest.raises(ValueError, match=rf"pow\({p:g}\) of an indefinite matrix"):
            M.pow(p)


def test_more_rows_than_parameters():
    """r > d: the thin decomposition has d pairs and the matrix is (generically) invertible."""
    t = make_linen_mlp()
    layout = LayerCollection.from_params(t.params)
    d = layout.numel()
    factor = jax.random.normal(jax.random.PRNGKey(0), (d + 9, d))
    coef = jax.random.uniform(jax.random.PRNGKey(1), (d + 9,), minval=-0.2, maxval=1.0)
    M = PMatLowRank(layout, factor, coef)
    dense = np.asarray(factor.T @ (coef[:, None] * factor))
    evals, evecs = M.eigh()
    assert evals.shape == (d,) and evecs.shape == (d, d)
    np.testing.assert_allclose(M.eigvalsh(), np.linalg.eigvalsh(dense), rtol=1e-9, atol=1e-9)
    v = np.asarray(random_pvector(jax.random.PRNGKey(2), t.params).to_flat())
    for method in PMatLowRank.SOLVE_METHODS[:2]:
        np.testing.assert_allclose(M.solve(dense @ v + 0.5 * v, 0.5, method=method), v,
                                   rtol=1e-8, atol=1e-9)
    np.testing.assert_allclose(M.pinv().to_dense(), np.linalg.pinv(dense), rtol=1e-7,
                               atol=1e-9)
    np.testing.assert_allclose(M.frobenius_norm(), np.linalg.norm(dense), rtol=1e-10)


@pytest.mark.parametrize("rows", [7, 40])  # r < d (the r × r Gram) and r > d (M's own)
def test_frobenius_norm_from_upper_gram_blocks(monkeypatch, rows):
    """With the threshold lowered, the norm reduces the upper blocks of the symmetric Gram
    (scalar weight; signed per-row weights on the r × r side) and equals the brute-force
    norm of ``Fᵀ diag(c) F``; per-row weights with ``r > d`` form ``M``."""
    monkeypatch.setattr(_gram, "SYMMETRIC_FROM", 4)
    layout = LayerCollection.from_params({"w": jnp.zeros((4, 5)), "b": jnp.zeros(3)})
    factor = jax.random.normal(jax.random.PRNGKey(0), (rows, 23))
    signed = jax.random.uniform(jax.random.PRNGKey(1), (rows,), minval=-1.0, maxval=1.0)
    for coef in (jnp.asarray(-0.3), signed):
        dense = np.asarray(factor.T @ (jnp.broadcast_to(coef, (rows,))[:, None] * factor))
        np.testing.assert_allclose(PMatLowRank(layout, factor, coef).frobenius_norm(),
                                   np.linalg.norm(dense), rtol=1e-12)


def test_pytree_under_jit(case):
    t, F, ref = case
    v = vec(t, 5)
    out = jax.jit(lambda M, u: M.mv(u))(F, v)
    np.testing.assert_allclose(out.to_flat(), ref @ np.asarray(v.to_flat()), **TOL)
    solved = jax.jit(lambda M, u: M.solve(u, REGUL))(F, F.mv(v) + REGUL * v)
    np.testing.assert_allclose(solved.to_flat(), v.to_flat(), rtol=1e-6, atol=1e-7)
    scaled = jax.jit(lambda M: -2 * M + M)(F)
    assert isinstance(scaled, PMatLowRank)
    np.testing.assert_allclose(scaled.to_dense(), -ref, atol=1e-12)


def test_built_inside_jit():
    t = make_linen_mlp()
    factor = jax.jit(lambda p: FIM(t.apply_fn, p, t.x, PMatLowRank).to_dense())(t.params)
    np.testing.assert_allclose(factor, reference_fisher(t.apply_fn, t.params, t.x), **TOL)


def test_monte_carlo_and_empirical_fisher():
    t = make_linen_mlp()
    key = jax.random.PRNGKey(7)
    mc = [FIM_MonteCarlo(t.apply_fn, t.params, t.x, rep, key=key, trials=2, batch_size=b)
          for rep, b in [(PMatLowRank, 3), (PMatDense, None)]]
    assert mc[0].factor.shape[0] == 2 * t.x.shape[0]
    np.testing.assert_allclose(mc[0].to_dense(), mc[1].to_dense(), **TOL)

    def losses(p, batch):
        x, y = batch
        logp = jax.nn.log_softmax(t.apply_fn(p, x))
        return -jnp.take_along_axis(logp, y[:, None], axis=1)  # (N, 1)

    ef = SecondMoment(losses, t.params, (t.x, t.y), PMatLowRank, batch_size=2)
    grads = jax.vmap(
        lambda x, y: jax.flatten_util.ravel_pytree(
            jax.grad(lambda p: losses(p, (x[None], y[None]))[0, 0])(t.params))[0]
    )(t.x, t.y)
    np.testing.assert_allclose(ef.to_dense(), grads.T @ grads / len(grads), **TOL)
    np.testing.assert_allclose(ef.trace(), np.sum(grads**2) / len(grads), **TOL)


def test_bad_construction():
    t = make_linen_mlp()
    F = FIM(t.apply_fn, t.params, t.x, PMatLowRank)
    with pytest.raises(ValueError, match="factor must have shape"):
        PMatLowRank(F.layer_collection, jnp.zeros((3, 4)), 1.0)
    with pytest.raises(ValueError, match="coef must be a scalar"):
        PMatLowRank(F.layer_collection, F.factor, jnp.ones(2))
    with pytest.raises(TypeError, match="no build options"):
        FIM(t.apply_fn, t.params, t.x, PMatLowRank, rank=3)


@pytest.mark.parametrize("batch_size", [3, 7, 10, None])
def test_factor_rows_are_the_jacobian_rows_in_example_order(batch_size):
    """``F`` stacks each example's ``K`` Jacobian rows, example-major: from one batch (rows
    written into one buffer of ``N K`` rows; the last chunk padded, or one chunk larger
    than the data) and from a list of batches (chunks concatenated)."""
    t = make_linen_mlp()  # N = 7

    def rows(x):
        out = lambda p: softmax_cholesky_outputs(t.apply_fn(p, x[None])[0])  # noqa: E731
        jac = jax.jacrev(out)(t.params)
        return jnp.concatenate([j.reshape(j.shape[0], -1) for j in jax.tree.leaves(jac)], 1)

    expected = jnp.concatenate([rows(x) for x in t.x])
    one_batch = FIM(t.apply_fn, t.params, (t.x, t.y), PMatLowRank, batch_size=batch_size)
    batches = [(t.x[:4], t.y[:4]), (t.x[4:], t.y[4:])]
    two_batches = FIM(t.apply_fn, t.params, batches, PMatLowRank, batch_size=batch_size)
    np.testing.assert_allclose(one_batch.factor, expected, **TOL)
    np.testing.assert_allclose(two_batches.factor, expected, **TOL)


@pytest.mark.parametrize("make", [
    models.make_linen_cnn, models.make_linen_layernorm, models.make_linen_embed,
    models.make_linen_transformer, models.make_linen_conv_transpose,
    models.make_plain_reverse_scan, models.make_linen_tied_embed,
    models.make_linen_grouped_conv, models.make_plain_shared_dense, models.make_equinox_cnn,
])
def test_rows_written_from_captured_layers_are_the_jacobian_rows(make):
    """Data of known size: each chunk's rows are written into the buffer from the captured
    layer inputs and output gradients (outer products, convolution patches, embedding rows;
    other leaves from their exact gradients). From an iterator they are the rows of
    ``vmap(jacrev)``, concatenated. Both, row for row, for every kind of layer."""
    t = make()
    data = (t.x, t.y)
    written = FIM(t.apply_fn, t.params, data, PMatLowRank, batch_size=3)
    streamed = FIM(t.apply_fn, t.params, iter([data]), PMatLowRank, batch_size=3)
    assert written.factor.shape == streamed.factor.shape
    np.testing.assert_allclose(written.factor, streamed.factor, rtol=1e-10, atol=1e-12)


def test_a_damping_below_the_pseudo_inverse_threshold_is_still_inverted():
    """``pow(p < 0, τ)`` of a float32 factor with ``τ`` under ``d·ε·max λ``: ``M + τI`` is
    invertible and ``(M + τI)^p v⊥ = τ^p v⊥`` off the factor's rows. The pseudo-inverse's
    threshold took ``τ`` for round-off and returned the shift 0 (``v⊥ ↦ 0``)."""
    t = make_linen_mlp()
    L32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32),
                                 FIM(t.apply_fn, t.params, t.x, PMatLowRank))
    f = np.asarray(L32.factor, np.float64)
    d = f.shape[1]
    tau = 0.1 * d * np.finfo(np.float32).eps * np.linalg.eigvalsh(f.T @ f / len(f)).max()
    v = np.random.default_rng(0).standard_normal(d)
    v_perp = v - f.T @ np.linalg.lstsq(f.T, v, rcond=None)[0]  # orthogonal to every row
    power = jax.jit(lambda M, p: M.pow(p, tau))
    for p in (-0.5, -1):
        for M in (L32.pow(p, tau), power(L32, p)):  # p concrete, then traced
            np.testing.assert_allclose(M.shift, tau ** p, rtol=1e-5)
            np.testing.assert_allclose(M.mv(v_perp.astype(np.float32)), tau ** p * v_perp,
                                       rtol=1e-4, atol=1e-4 * tau ** p * np.abs(v_perp).max())
    np.testing.assert_allclose(L32.pow(-1, tau).mv(v), L32.inv(tau).mv(v), rtol=1e-5)
    assert L32.pow(-1).shift == 0  # undamped: the pseudo-inverse, as pinv()
    # shifted, with an eigenvalue λ + t exactly 0 (signed weights): no inverse power
    layout = LayerCollection.from_params({"w": jnp.zeros(4)})
    M = PMatLowRank(layout, jnp.eye(2, 4), jnp.asarray([2.0, -1.0]), 1.0)  # 3, 0, 1, 1
    for p in (-1, -0.5):
        with pytest.raises(ValueError, match="singular matrix: 1 of the 2 eigenvalues of its "
                                             "thin eigendecomposition"):
            M.pow(p)
    np.testing.assert_allclose(M.pow(-1, 0.5).to_dense(), np.diag([1 / 3.5, 2, 2 / 3, 2 / 3]),
                               rtol=1e-12)


def test_a_float32_plus_float64_sum_is_float64_either_way():
    """``A32 + B64`` concatenated ``B``'s factor cast to float32: a rounded float32 result
    (``B64 + A32`` was float64), ~4e-8 off the float64 sum instead of ~1e-16."""
    t = make_linen_mlp()
    L = FIM(t.apply_fn, t.params, t.x, PMatLowRank)
    L32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), L)
    f32 = np.asarray(L32.factor, np.float64)  # the float32 matrix, exactly, in float64
    dense32 = f32.T @ (np.asarray(L32.coef, np.float64) * f32)
    ref = dense32 + np.asarray(L.to_dense())
    for total in (L32 + L, L + L32):
        assert total.factor.dtype == jnp.float64
        np.testing.assert_allclose(total.to_dense(), ref, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose((L32 - L).to_dense(), dense32 - np.asarray(L.to_dense()),
                               rtol=1e-10, atol=1e-14)


def test_a_scaled_identity_as_an_empty_factor():
    """``PMatLowRank.from_pmat(x·I)`` is documented as the shift ``x`` of an empty ``0 × d``
    factor: its Woodbury ``solve`` and ``frobenius_norm`` raised ``ZeroDivisionError``
    (``reshape(-1, 0)`` of the empty Gram's rows)."""
    layout = LayerCollection.from_params({"w": jnp.zeros((2, 3)), "b": jnp.zeros(2)})
    d = layout.numel()
    M = PMatLowRank.from_pmat(2.0 * PMatEye(layout))
    assert M.factor.shape == (0, d)
    v = jnp.arange(1.0, d + 1)
    for method in PMatLowRank.SOLVE_METHODS[:2]:
        np.testing.assert_allclose(M.solve(v, 0.5, method=method), v / 2.5, rtol=1e-12)
    np.testing.assert_allclose(M.frobenius_norm(), 2 * np.sqrt(d), rtol=1e-12)
    np.testing.assert_allclose(M.inv(0.5).to_dense(), np.eye(d) / 2.5, rtol=1e-12)


def test_a_state_saved_before_the_shift_restores_unshifted():
    """A Flax state of a ``PMatLowRank`` saved before ``shift`` existed (``factor`` and
    ``coef`` only) restores as the unshifted matrix it was, whatever the target's shift
    (it raised 'has no shift'); a state without its factor is still refused."""
    from flax import serialization

    layout = LayerCollection.from_params({"w": jnp.zeros(4)})
    saved = PMatLowRank(layout, jnp.arange(8.0).reshape(2, 4), jnp.asarray([1.0, -0.5]))
    old = {k: v for k, v in serialization.to_state_dict(saved).items() if k != "shift"}
    target = PMatLowRank(layout, jnp.zeros((2, 4)), jnp.zeros(2), 3.0)
    restored = serialization.from_state_dict(target, old)
    assert float(restored.shift) == 0.0
    np.testing.assert_array_equal(restored.to_dense(), saved.to_dense())
    with pytest.raises(ValueError, match="has no factor"):
        serialization.from_state_dict(target, {"coef": old["coef"]})
    # a state of another class is not taken for an old one: no default scaling for an Eye
    dense = serialization.to_state_dict(PMatDense(layout, jnp.eye(4)))
    with pytest.raises(ValueError, match="PMatEye has no scaling"):
        serialization.from_state_dict(PMatEye(layout, 2.0), dense)
    with pytest.raises(ValueError, match="PMatEye has no scaling"):
        serialization.from_state_dict(PMatEye(layout, 2.0), {})


def test_vmap_in_axes_made_by_tree_map_over_a_stack():
    """``jax.vmap(f, in_axes=(tree_map(lambda _: 0, M),))(M)`` over a stack of shifted
    low-rank matrices (JAX's idiom for the axes of a pytree): the axes' shift ``0`` was
    made an array by ``__post_init__``, and vmap refused the axes (a TypeError)."""
    layout = LayerCollection.from_params({"w": jnp.zeros(4)})
    factors = jnp.ones((3, 2, 4)) * jnp.arange(1.0, 4.0)[:, None, None]
    shifts = jnp.asarray([0.5, -1.0, 2.0])
    stack = jax.vmap(lambda f, s: PMatLowRank(layout, f, 1.0, s))(factors, shifts)
    axes = jax.tree_util.tree_map(lambda _: 0, stack)
    traces = jax.vmap(lambda M: M.trace(), in_axes=(axes,))(stack)
    np.testing.assert_allclose(traces, 8 * np.arange(1.0, 4.0) ** 2 + 4 * shifts, rtol=1e-12)
    assert isinstance(PMatLowRank(layout, factors[0], 1.0, 2).shift, jax.Array)  # still


def test_eigh_solve_differentiates_through_repeated_eigenvalues():
    """Two equal rows of the factor (a duplicated example) tie two thin eigenvalues (and the
    complement's ``d − r`` at the shift): differentiated through ``eigh``'s vectors the
    ``"eigh"`` solve's gradient was off; as a linear solve it is the Woodbury solve's."""
    t = make_linen_mlp()
    layout = LayerCollection.from_params(t.params)
    d = layout.numel()
    rows = jax.random.normal(jax.random.PRNGKey(0), (3, d))
    factor = jnp.concatenate([rows, rows[:1]])
    v, w = (jax.random.normal(jax.random.PRNGKey(k), (d,)) for k in (1, 2))

    def f(factor, method):
        return PMatLowRank(layout, factor, jnp.ones(4)).solve(v, 0.1, method=method) @ w

    np.testing.assert_allclose(jax.grad(f)(factor, "eigh"), jax.grad(f)(factor, "woodbury"),
                               rtol=1e-8, atol=1e-12)
