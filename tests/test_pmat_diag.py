"""PMatDiag: the diagonal of the brute-force Fisher, and every operation against its dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_equinox_mlp, make_linen_cnn, make_linen_mlp
from pmat_checks import (
    REGUL,
    TOL,
    check_all,
    check_eigsh,
    check_promotions,
    check_pytree,
    check_solve,
    reference,
)

from jaxgeom import FIM, FIM_MonteCarlo, LayerCollection, PMatDense
from jaxgeom.pmat.diag import PMatDiag


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    t = request.param()
    D = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag, batch_size=3)
    ref = reference(t)
    return t, D, ref


def test_storage_is_the_reference_diagonal(case):
    t, D, ref = case
    assert D.data.shape == (len(ref),)
    np.testing.assert_allclose(D.data, np.diag(ref), **TOL)
    dense = np.asarray(D.to_dense())
    assert np.all(dense[~np.eye(len(ref), dtype=bool)] == 0)


def test_operations(case):
    t, D, ref = case
    check_all(D, np.diag(np.diag(ref)), t.params)
    check_eigsh(D, np.diag(np.diag(ref)))  # canonical basis vectors


def test_solve(case):
    t, D, ref = case
    check_solve(D, np.diag(np.diag(ref)), t.params)


def test_combinations(case):
    t, D, ref = case
    check_promotions(D, np.diag(np.diag(ref)), ref)


def test_under_jit(case):
    t, D, ref = case
    check_pytree(D)
    built = jax.jit(lambda p: FIM(t.apply_fn, p, t.x, PMatDiag))(t.params)
    assert isinstance(built, PMatDiag)
    np.testing.assert_allclose(built.data, D.data, **TOL)


def test_monte_carlo_is_the_dense_diagonal():
    t = make_linen_mlp()
    kwargs = dict(key=jax.random.PRNGKey(0), trials=3)
    D = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDiag, **kwargs)
    F = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, **kwargs)
    np.testing.assert_allclose(D.data, np.diag(F.to_dense()), **TOL)


def test_unsupported_and_bad_input():
    t = make_linen_mlp()
    lc = LayerCollection.from_params(t.params)
    D = PMatDiag(lc, jnp.linspace(1.0, 2.0, lc.numel()))
    with pytest.raises(NotImplementedError, match="canonical basis.*PMatDense"):
        D.eigh()
    F = PMatDense.from_pmat(D)
    with pytest.raises(NotImplementedError, match="get_diag"):
        PMatDiag.from_pmat(F)
    with pytest.raises(ValueError, match="valid methods"):
        D.solve(D.get_diag(), REGUL, method="cholesky")
    with pytest.raises(ValueError, match="shape"):
        PMatDiag(D.layer_collection, np.zeros(3))
    with pytest.raises(TypeError, match="no build options"):
        FIM(t.apply_fn, t.params, t.x, PMatDiag, damping=1.0)


def test_float32_parameters_and_float64_data_give_a_float32_matrix():
    """A convolution's squared gradients were summed in the dtype of its sources (the
    float64 data) rather than of its float32 inputs: PMatDiag, PMatQuasiDiag and PMatEKFAC
    of a CNN held float64 leaves (MLPs did not), a state of another dtype for optim."""
    from jaxgeom import PMatEKFAC, PMatQuasiDiag

    t = make_linen_cnn()
    p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t.params)
    for representation in (PMatDiag, PMatQuasiDiag, PMatEKFAC):
        M = FIM(t.apply_fn, p32, t.x, representation, batch_size=2)
        assert {str(a.dtype) for a in jax.tree_util.tree_leaves(M)} == {"float32"}
        expected = FIM(t.apply_fn, t.params, t.x, representation).to_dense()
        np.testing.assert_allclose(M.to_dense(), expected, rtol=1e-4, atol=1e-5 * np.abs(
            expected).max())
