"""slogdet / logdet of every representation against NumPy's on its float64 dense matrix.

``log det(M + λI)`` is what a Laplace posterior's marginal likelihood needs (laplax,
laplace-torch) and what curvlinops' (E)KFAC operators offer as ``logdet()``.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_cnn, make_linen_layernorm, make_linen_mlp

from jaxgeom import (
    FIM,
    GramMatrix,
    Hessian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
)

REGUL = 1e-2
BUILT = [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC, PMatQuasiDiag, PMatLowRank,
         PMatMixed]


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_linen_layernorm])
def task(request):
    return request.param()


@pytest.mark.parametrize("representation", BUILT, ids=lambda c: c.__name__)
def test_slogdet_is_numpys_of_the_dense_matrix(task, representation):
    M = FIM(task.apply_fn, task.params, (task.x, task.y), representation)
    dense = np.asarray(M.to_dense())
    for regul in (REGUL, 0.3):
        sign, logabs = np.linalg.slogdet(dense + regul * np.eye(len(dense)))
        got_sign, got = M.slogdet(regul)
        assert got_sign == sign  # 1 but for a quasi-diagonal one, which may be indefinite
        np.testing.assert_allclose(got, logabs, rtol=1e-9)
        np.testing.assert_allclose(M.logdet(regul), logabs if sign > 0 else np.nan,
                                   rtol=1e-9)


def test_low_rank_counts_its_null_space(task):
    """``d − r`` zero eigenvalues each give ``log λ``: the determinant lemma's value."""
    M = FIM(task.apply_fn, task.params, (task.x, task.y), PMatLowRank)
    r, d = M.factor.shape
    assert r < d
    gram = np.asarray(M.factor) @ np.asarray(M.factor).T * np.asarray(M.coef)
    lemma = np.linalg.slogdet(np.eye(r) + gram / REGUL)[1] + d * np.log(REGUL)
    np.testing.assert_allclose(M.logdet(REGUL), lemma, rtol=1e-9)


def test_singular_and_indefinite_matrices():
    """A rank-deficient Fisher without damping: ``(0, -inf)``; a negative determinant:
    ``logdet`` is NaN, ``slogdet`` keeps ``log|det|``; a diagonal and an identity in
    closed form."""
    t = make_linen_mlp()
    D = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    lc = D.layer_collection
    d = lc.numel()
    zero = PMatDiag(lc, D.data.at[0].set(0.0))
    assert zero.slogdet() == (0.0, -jnp.inf)
    assert zero.logdet() == -jnp.inf
    negative = PMatDiag(lc, D.data.at[0].set(-1.0))
    sign, logabs = negative.slogdet()
    assert sign == -1
    np.testing.assert_allclose(logabs, np.sum(np.log(np.asarray(D.data[1:]))), rtol=1e-12)
    assert np.isnan(negative.logdet())
    # and so is its derivative (a where's NaN branch had answered 0)
    assert np.isnan(jax.grad(lambda data: PMatDiag(lc, data).logdet())(negative.data)).all()
    np.testing.assert_allclose(jax.grad(lambda data: PMatDiag(lc, data).logdet())(D.data),
                               1 / np.asarray(D.data), rtol=1e-12)
    np.testing.assert_allclose(PMatEye(lc, 2.0).logdet(0.5), d * np.log(2.5), rtol=1e-12)
    np.testing.assert_allclose((3.0 * D).logdet(REGUL),
                               np.sum(np.log(3 * np.asarray(D.data) + REGUL)), rtol=1e-12)


def test_round_off_eigenvalues_warn_and_exact_ones_do_not():
    """A Fisher of fewer examples than parameters: its factorisations' zero eigenvalues are
    round-off (``±n·ε·‖M‖``), and so is their logarithm (a finite ``log|det|`` where the
    true one is ``-inf``): called from Python, a warning, named as called. Exact ones do
    not warn: a low-rank matrix's null space (``-inf``), a diagonal's tiny entries (exact
    however small), nor a mixed matrix's diagonal part; damped, nothing. The NTK of more
    outputs than parameters the same."""
    t = make_linen_mlp(n=2)
    singular = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)
    assert np.linalg.matrix_rank(np.asarray(singular.data)) < singular.size(0)
    for call, name in ((lambda M: M.logdet(), "logdet"), (lambda M: M.slogdet(), "slogdet")):
        for M in (singular, FIM(t.apply_fn, t.params, (t.x, t.y), PMatKFAC)):
            with pytest.warns(RuntimeWarning, match=rf"^{name} of a matrix singular to work"):
                call(M)
    D = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    tiny = PMatDiag(D.layer_collection, D.data.at[0].set(1e-30 * D.data.max()))
    mixed = FIM(t.apply_fn, t.params, (t.x, t.y), PMatMixed,
                mapping={"Dense_0": PMatDiag}, default=PMatDense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert FIM(t.apply_fn, t.params, (t.x, t.y), PMatLowRank).logdet() == -jnp.inf
        np.testing.assert_allclose(tiny.logdet(), np.sum(np.log(np.asarray(tiny.data))),
                                   rtol=1e-12)
        singular.logdet(REGUL)
        mixed.restrict("Dense_0").logdet()  # the diagonal part alone
    with pytest.warns(RuntimeWarning, match="^logdet of a matrix singular"):
        mixed.logdet()  # its dense part is singular
    G = GramMatrix(t.apply_fn, t.params, make_linen_mlp(n=20).x)  # K N > d
    with pytest.warns(RuntimeWarning, match="^logdet of a matrix singular to working"):
        G.logdet()


def test_an_indefinite_hessian_has_its_sign():
    t = make_linen_mlp()

    def loss(params, batch):
        x, y = batch
        logits = t.apply_fn(params, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(len(y)), y])

    H = Hessian(loss, t.params, (t.x, t.y), PMatDense)
    sign, logabs = np.linalg.slogdet(np.asarray(H.data) + REGUL * np.eye(H.size(0)))
    got_sign, got = H.slogdet(REGUL)
    assert got_sign == sign
    np.testing.assert_allclose(got, logabs, rtol=1e-9)


def test_under_jit_and_grad_of_the_damping():
    """Compiled with a traced damping; ``d/dλ log det(M + λI) = tr((M + λI)⁻¹)``."""
    t = make_linen_mlp()
    K = FIM(t.apply_fn, t.params, (t.x, t.y), PMatKFAC)
    dense = np.asarray(K.to_dense())
    want = np.linalg.slogdet(dense + REGUL * np.eye(len(dense)))[1]
    np.testing.assert_allclose(jax.jit(lambda M, lam: M.logdet(lam))(K, REGUL), want,
                               rtol=1e-9)
    slope = jax.grad(lambda lam: K.logdet(lam))(REGUL)
    np.testing.assert_allclose(slope, np.trace(np.linalg.inv(dense + REGUL * np.eye(len(dense)))),
                               rtol=1e-8)


def test_refusals():
    t = make_linen_mlp()
    D = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    with pytest.raises(ValueError, match="regul must be a scalar"):
        D.logdet(jnp.ones(3))
    with pytest.raises(ValueError, match="finite"):
        D.slogdet(float("nan"))
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    with pytest.raises(NotImplementedError, match="PMatImplicit does not compute log-det"):
        implicit.logdet(REGUL)


def test_gram_matrix_slogdet_and_gp_marginal_likelihood():
    """``FMatDense`` on its ``(K·N) × (K·N)`` matrix; the GP log marginal likelihood of
    the NTK kernel against NumPy's Gaussian log-density."""
    t = make_linen_mlp()
    G = GramMatrix(t.apply_fn, t.params, t.x)
    m = np.asarray(G.to_matrix())
    sign, logabs = np.linalg.slogdet(m + REGUL * np.eye(len(m)))
    got = G.slogdet(REGUL)
    assert got[0] == sign == 1
    np.testing.assert_allclose(got[1], logabs, rtol=1e-10)
    np.testing.assert_allclose(G.logdet(REGUL), logabs, rtol=1e-10)
    y = np.random.default_rng(0).standard_normal(G.size()[:2])
    loglik = (-0.5 * np.vdot(y, G.solve(y, REGUL)) - 0.5 * G.logdet(REGUL)
              - 0.5 * y.size * np.log(2 * np.pi))
    cov = m + REGUL * np.eye(len(m))
    want = (-0.5 * y.ravel() @ np.linalg.solve(cov, y.ravel()) - 0.5 * logabs
            - 0.5 * len(m) * np.log(2 * np.pi))
    np.testing.assert_allclose(loglik, want, rtol=1e-10)
    with pytest.raises(ValueError, match="regul must be a scalar"):
        G.logdet(jnp.ones(2))
