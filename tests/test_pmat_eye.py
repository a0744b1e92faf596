"""PMatEye: s·I in closed form, against its dense form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_equinox_mlp, make_linen_mlp, make_plain_mlp
from pmat_checks import (
    REGUL,
    TOL,
    check_all,
    check_promotions,
    check_pytree,
    check_solve,
    flat,
)

from jaxgeom import FIM, LayerCollection, PVector
from jaxgeom.pmat.diag import PMatDiag
from jaxgeom.pmat.eye import PMatEye


@pytest.fixture(scope="module", params=[make_linen_mlp, make_equinox_mlp])
def case(request):
    t = request.param()
    lc = LayerCollection.from_model(t.apply_fn, t.params, t.x[:1])
    return t, PMatEye(lc, 1.7), 1.7 * np.eye(lc.numel())


def test_storage(case):
    t, E, dense = case
    assert E.scaling.shape == () and E.scaling.dtype == jnp.float64
    assert jax.tree_util.tree_leaves(E) == [E.scaling]
    np.testing.assert_allclose(PMatEye(E.layer_collection).to_dense(), np.eye(len(dense)))


def test_operations(case):
    t, E, dense = case
    check_all(E, dense, t.params)


def test_solve(case):
    t, E, dense = case
    check_solve(E, dense, t.params)


def test_negative_scaling(case):
    t, E, dense = case
    N = E * -1.234
    assert isinstance(N, PMatEye)
    np.testing.assert_allclose(N.to_dense(), -1.234 * dense, **TOL)
    np.testing.assert_allclose(N.trace(), -1.234 * np.trace(dense), **TOL)
    np.testing.assert_allclose(N.norm(2), 1.234 * 1.7, **TOL)
    np.testing.assert_allclose(N.norm(-2), 1.234 * 1.7, **TOL)
    np.testing.assert_allclose(N.inv(REGUL).to_dense(), np.linalg.inv(N.to_dense() + REGUL *
                               np.eye(len(dense))), **TOL)


def test_pinv_threshold(case):
    t, E, dense = case
    assert float(PMatEye(E.layer_collection, 1e-3).pinv(atol=10).scaling) == 0.0
    np.testing.assert_allclose(E.pinv(atol=1).scaling, 1 / 1.7, **TOL)
    assert float(PMatEye(E.layer_collection, 0.0).pinv().scaling) == 0.0


def test_combinations(case):
    t, E, dense = case
    a = np.random.default_rng(0).normal(size=dense.shape)
    check_promotions(E, dense, a @ a.T)


def test_under_jit(case):
    t, E, dense = case
    check_pytree(E)
    out = jax.jit(lambda s: PMatEye(E.layer_collection, s).mv(PVector(t.params)))(2.0)
    np.testing.assert_allclose(flat(out), 2 * flat(t.params), **TOL)


def test_not_built_from_data_and_bad_input():
    t = make_plain_mlp()
    with pytest.raises(TypeError, match="construct it directly"):
        FIM(t.apply_fn, t.params, t.x, PMatEye)
    lc = LayerCollection.from_params(t.params)
    E = PMatEye(lc)
    with pytest.raises(NotImplementedError, match="canonical basis.*PMatDense"):
        E.eigh()
    with pytest.raises(NotImplementedError, match="PMatBlockDiag.from_pmat"):
        PMatEye.from_pmat(PMatDiag.from_pmat(E))
    with pytest.raises(ValueError, match="scalar.*PMatDiag"):  # a vector of d entries
        PMatEye(lc, jnp.ones(lc.numel()))


def test_a_power_of_a_singular_or_negative_identity_counts_all_its_eigenvalues(case):
    """``s·I`` has ``d`` eigenvalues ``s``, though it stores one: the refusals count ``d``."""
    t, E, dense = case
    d = len(dense)
    with pytest.raises(ValueError, match=fr"^pow\(-0.5\) of a singular matrix: {d} of its {d} "):
        PMatEye(E.layer_collection, 0.0).pow(-0.5)
    with pytest.raises(ValueError, match=fr"^pow\(-1\) of a singular matrix: {d} of its {d} "):
        PMatEye(E.layer_collection, 1.0).pow(-1, -1.0)
    with pytest.raises(ValueError, match=fr"^pow\(0.5\) of an indefinite matrix: {d} of its {d} "):
        PMatEye(E.layer_collection, -1.0).pow(0.5)


@pytest.mark.parametrize("name", ["PMatImplicit", "PMatKFAC", "PMatLowRank", "PMatQuasiDiag",
                                  "PMatMixed"])
def test_a_product_with_the_identity_on_the_right_is_scaled_not_densified(name):
    """``M @ (sI)`` and ``M.mm(sI)`` are ``s M`` in ``M``'s representation, as ``(sI) @ M``
    is (they had been a ``PMatDense``: for an implicit matrix, the whole ``d × d`` formed)."""
    import jaxgeom

    representation = getattr(jaxgeom, name)
    t = make_plain_mlp()
    M = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    identity = PMatEye(M.layer_collection, 2.5)
    for product in (M @ identity, M.mm(identity)):
        assert type(product) is representation
        np.testing.assert_allclose(product.to_dense(), 2.5 * np.asarray(M.to_dense()),
                                   rtol=1e-12)


def test_an_integer_scaling_takes_the_parameters_dtype(case):
    t, E, _ = case
    for scaling in (2, np.int32(2), jnp.asarray(2)):
        M = PMatEye(E.layer_collection, scaling)
        assert M.dtype == E.layer_collection.dtype
        np.testing.assert_allclose(M.pinv().to_dense(), 0.5 * np.eye(E.layer_collection.numel()))


def test_stacks_reduce_each_member_apart(case):
    """A stack of identities or diagonals (``tree_map(jnp.stack, …)``, a ``vmap``'s output)
    gives each member's trace and norms, not one number over the whole stack; a ``(d, d)``
    matrix given as a diagonal is refused with the fix."""
    t, E, _ = case
    lc = E.layer_collection
    d = lc.numel()
    diag = np.linspace(0.5, 2.0, d)
    stacks = [(PMatEye(lc, jnp.asarray([1.0, 2.0])), np.ones((2, d)) * [[1.0], [2.0]]),
              (PMatDiag(lc, jnp.stack([diag, -3 * diag])), np.stack([diag, -3 * diag]))]
    for M, values in stacks:
        np.testing.assert_allclose(M.trace(), values.sum(-1), rtol=1e-12)
        np.testing.assert_allclose(M.frobenius_norm(), np.linalg.norm(values, axis=-1),
                                   rtol=1e-12)
        np.testing.assert_allclose(M.norm(2), np.abs(values).max(-1), rtol=1e-12)
        np.testing.assert_allclose(M.norm(-2), np.abs(values).min(-1), rtol=1e-12)
        first = jax.tree_util.tree_map(lambda a: a[1], M)
        np.testing.assert_allclose(first.trace(), values[1].sum(), rtol=1e-12)
    with pytest.raises(ValueError, match=r"jnp.diag\(M\).*PMatDense"):
        PMatDiag(lc, jnp.eye(d))
