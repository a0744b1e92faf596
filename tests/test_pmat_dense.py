"""PMatDense: every operation against numpy on the brute-force Fisher."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_equinox_mlp, make_linen_cnn, make_linen_mlp, reference_fisher

from jaxgeom import FIM, PMatDense, PVector, random_pvector

TOL = dict(rtol=1e-8, atol=1e-10)
REGUL = 1e-3


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    t = request.param()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense, batch_size=3)
    return t, F, np.asarray(reference_fisher(t.apply_fn, t.params, t.x))


def vec(t, seed=0):
    return random_pvector(jax.random.PRNGKey(seed), t.params)


def test_storage_is_the_reference(case):
    t, F, ref = case
    np.testing.assert_allclose(F.to_dense(), ref, **TOL)
    d = ref.shape[0]
    assert F.size() == (d, d) and F.size(0) == d


def test_products(case):
    t, F, ref = case
    v = vec(t)
    fv = np.asarray(v.to_flat())
    out = F.mv(v)
    assert isinstance(out, PVector)
    np.testing.assert_allclose(out.to_flat(), ref @ fv, **TOL)
    tree_out = F.mv(v.tree)
    assert jax.tree_util.tree_structure(tree_out) == jax.tree_util.tree_structure(t.params)
    np.testing.assert_allclose(F.mv(fv), ref @ fv, **TOL)
    np.testing.assert_allclose((F @ v).to_flat(), ref @ fv, **TOL)
    np.testing.assert_allclose(F.vTMv(v), fv @ ref @ fv, **TOL)


def test_maps(case):
    t, F, ref = case
    rows = jax.random.normal(jax.random.PRNGKey(1), (2, 3, ref.shape[0]))
    np.testing.assert_allclose(F.mmap(rows), rows @ ref, **TOL)
    forms = np.einsum("knd,de,kne->kn", rows, ref, rows)
    np.testing.assert_allclose(F.mapTMmap(rows, reduction="diag"), forms, **TOL)
    np.testing.assert_allclose(F.mapTMmap(rows), forms.sum(0), **TOL)
    with pytest.raises(ValueError, match="reduction"):
        F.mapTMmap(rows, reduction="mean")


def test_scalars_and_norms(case):
    t, F, ref = case
    eig = np.linalg.eigvalsh(ref)
    np.testing.assert_allclose(F.trace(), np.trace(ref), **TOL)
    np.testing.assert_allclose(F.get_diag(), np.diag(ref), **TOL)
    np.testing.assert_allclose(F.frobenius_norm(), np.linalg.norm(ref), **TOL)
    np.testing.assert_allclose(F.norm(), np.linalg.norm(ref), **TOL)
    np.testing.assert_allclose(F.norm(2), np.abs(eig).max(), **TOL)
    np.testing.assert_allclose(F.norm(-2), np.abs(eig).min(), atol=1e-10)
    with pytest.raises(ValueError, match="ord"):
        F.norm(3)


@pytest.mark.parametrize("method", PMatDense.SOLVE_METHODS)
def test_solve(case, method):
    t, F, ref = case
    v = vec(t, 2)
    rhs = F.mv(v) + REGUL * v
    options = {"rtol": 1e-12} if method == "cg" else {}
    x = F.solve(rhs, REGUL, method=method, **options)
    np.testing.assert_allclose(x.to_flat(), v.to_flat(), rtol=1e-6, atol=1e-7)
    rows = jax.random.normal(jax.random.PRNGKey(3), (2, 3, ref.shape[0]))
    solved = F.solve(rows @ (ref + REGUL * np.eye(len(ref))), REGUL, method=method, **options)
    np.testing.assert_allclose(solved, rows, rtol=1e-5, atol=1e-6)


def test_solve_method_errors(case):
    t, F, _ = case
    with pytest.raises(ValueError, match="valid methods"):
        F.solve(vec(t), REGUL, method="magic")


def test_inverse_pinv_pow_eigh(case):
    t, F, ref = case
    d = len(ref)
    v = vec(t, 4)
    shifted = ref + REGUL * np.eye(d)
    np.testing.assert_allclose(
        F.inv(REGUL).mv(shifted @ np.asarray(v.to_flat())), v.to_flat(), rtol=1e-6, atol=1e-7
    )
    np.testing.assert_allclose(F.pinv().to_dense(), np.linalg.pinv(ref, hermitian=True),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose((F**2).to_dense(), ref @ ref, **TOL)
    half = F.pow(0.5).to_dense()
    np.testing.assert_allclose(half @ half, ref, atol=1e-8)
    np.testing.assert_allclose(F.pow(-1, REGUL).to_dense(), np.linalg.inv(shifted), rtol=1e-6)
    evals, evecs = F.eigh()
    np.testing.assert_allclose((evecs * evals) @ evecs.T, ref, atol=1e-10)
    np.testing.assert_allclose(F.eigvalsh(), np.linalg.eigvalsh(ref), atol=1e-10)


def test_algebra(case):
    t, F, ref = case
    G = F.pow(2)
    np.testing.assert_allclose((F + G).to_dense(), ref + ref @ ref, **TOL)
    np.testing.assert_allclose((F - G).to_dense(), ref - ref @ ref, **TOL)
    np.testing.assert_allclose((1.23 * F).to_dense(), 1.23 * ref, **TOL)
    np.testing.assert_allclose((F * 1.23).to_dense(), 1.23 * ref, **TOL)
    np.testing.assert_allclose((F / 2).to_dense(), ref / 2, **TOL)
    np.testing.assert_allclose((-F).to_dense(), -ref, **TOL)
    np.testing.assert_allclose(F.mm(G).to_dense(), ref @ ref @ ref, **TOL)
    np.testing.assert_allclose((F @ G).to_dense(), ref @ ref @ ref, **TOL)


def test_pytree_under_jit(case):
    t, F, ref = case
    v = vec(t, 5)
    out = jax.jit(lambda M, u: M.mv(u))(F, v)
    np.testing.assert_allclose(out.to_flat(), ref @ np.asarray(v.to_flat()), **TOL)
    scaled = jax.jit(lambda M: 2 * M)(F)
    assert isinstance(scaled, PMatDense)
    leaves, treedef = jax.tree_util.tree_flatten(F)
    assert len(leaves) == 1 and leaves[0].shape == ref.shape
    assert jax.tree_util.tree_unflatten(treedef, leaves).layer_collection == F.layer_collection


def test_mismatched_layouts_and_shapes():
    a, b = make_linen_mlp(), make_equinox_mlp()
    Fa = FIM(a.apply_fn, a.params, a.x, PMatDense)
    Fb = FIM(b.apply_fn, b.params, b.x, PMatDense)
    with pytest.raises(ValueError, match="different parameter layouts"):
        Fa + Fb
    with pytest.raises(ValueError, match="shape"):
        PMatDense(Fa.layer_collection, jnp.zeros((3, 3)))
