"""Every representation × model × variant against the float64 brute-force Fisher.

Each representation stores a projection of the exact matrix ``F``: Dense, LowRank and
Implicit all of it, BlockDiag its layer blocks, Diag its diagonal. For every model of
``tests/models.py`` (Flax linen MLP/CNN/LayerNorm/Embed, NNX, Equinox, plain jnp) and
every variant, the stored matrix must equal that projection, and the operations must agree
with ``to_dense()``.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import ALL_TASKS, make_plain_mlp, reference_fisher

from jaxgeom import (
    FIM,
    FIM_MonteCarlo,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
    random_pvector,
)

REPRESENTATIONS = [PMatDense, PMatBlockDiag, PMatDiag, PMatLowRank, PMatImplicit]
TOL = dict(rtol=1e-8, atol=1e-11)


def project(representation, matrix, layer_collection):
    """The part of ``matrix`` that ``representation`` keeps."""
    matrix = np.asarray(matrix)
    if representation is PMatDiag:
        return np.diag(np.diag(matrix))
    if representation is PMatBlockDiag:
        mask = np.zeros(matrix.shape, bool)
        for layer in layer_collection.layers:
            idx = layer_collection.layer_indices(layer)
            mask[np.ix_(idx, idx)] = True
        return np.where(mask, matrix, 0.0)
    return matrix


@functools.cache
def task_and_reference(name):
    """Each model and its brute-force Fisher, computed once for all representations."""
    t = ALL_TASKS[name]()
    return t, np.asarray(reference_fisher(t.apply_fn, t.params, t.x))


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_every_model(name, representation):
    t, reference = task_and_reference(name)
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation, batch_size=4)
    expected = project(representation, reference, F.layer_collection)
    np.testing.assert_allclose(F.to_dense(), expected, **TOL)
    v = random_pvector(jax.random.PRNGKey(0), t.params)
    fv = np.asarray(v.to_flat())
    np.testing.assert_allclose(F.mv(v).to_flat(), expected @ fv, **TOL)
    np.testing.assert_allclose(F.vTMv(v), fv @ expected @ fv, **TOL)
    np.testing.assert_allclose(F.trace(), np.trace(expected), **TOL)
    np.testing.assert_allclose(F.get_diag(), np.diag(expected), **TOL)
    np.testing.assert_allclose(F.frobenius_norm(), np.linalg.norm(expected), **TOL)
    regul = 1e-2
    solved = F.solve(expected @ fv + regul * fv, regul, **(
        {"rtol": 1e-12} if representation is PMatImplicit else {}))
    np.testing.assert_allclose(solved, fv, rtol=1e-6, atol=1e-8)


def _variant_cases():
    a = jax.random.normal(jax.random.PRNGKey(3), (4, 4))
    return {
        "logits": ("classif_logits", None),
        "binary": ("classif_binary_logits", None),
        "regression": ("regression", None),
        "regression_cov": ("regression", a @ a.T + jnp.eye(4)),
    }


VARIANT_CASES = _variant_cases()
MC_KEY = jax.random.PRNGKey(7)


def _variant_kw(case):
    variant, covariance = VARIANT_CASES[case]
    return dict(variant=variant, covariance=covariance, batch_size=3)


@functools.cache
def _monte_carlo_dense(case):
    """The dense Monte-Carlo Fisher of a variant case (built once for all representations)."""
    t = make_plain_mlp()
    return np.asarray(FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, key=MC_KEY,
                                     trials=2, **_variant_kw(case)).to_dense())


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("case", sorted(VARIANT_CASES))
def test_every_variant(representation, case):
    t = make_plain_mlp()
    kw = _variant_kw(case)
    F = FIM(t.apply_fn, t.params, t.x, representation, **kw)
    ref = reference_fisher(t.apply_fn, t.params, t.x, kw["variant"], kw["covariance"])
    np.testing.assert_allclose(
        F.to_dense(), project(representation, ref, F.layer_collection), **TOL
    )
    mc = FIM_MonteCarlo(t.apply_fn, t.params, t.x, representation, key=MC_KEY, trials=2, **kw)
    np.testing.assert_allclose(
        mc.to_dense(), project(representation, _monte_carlo_dense(case), F.layer_collection),
        **TOL,
    )


@pytest.mark.parametrize("representation", [PMatKFAC, PMatMixed, PMatLowRank, PMatImplicit,
                                            PMatDiag, PMatBlockDiag, PMatDense])
def test_conversion_to_its_own_representation_keeps_the_matrix(representation):
    t = make_plain_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    np.testing.assert_allclose(representation.from_pmat(F).to_dense(), F.to_dense(), **TOL)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC,
                                            PMatEKFAC, PMatQuasiDiag, PMatLowRank,
                                            PMatImplicit, PMatMixed])
def test_a_damping_per_parameter_is_refused_and_the_suggested_sum_solves(representation):
    """``regul`` is the λ of ``M + λI``: a vector is refused by ``solve``, ``inv`` and
    ``pow`` alike (it had been a shape error in most representations and ``diag(λ)`` in
    a few), and the fix the message names, ``M + PMatDiag(λ)``, solves
    ``(M + diag(λ)) x = v`` where the sum has a representation."""
    t = make_plain_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    d = F.layer_collection.numel()
    damping = jnp.linspace(0.1, 1.0, d)
    v = random_pvector(jax.random.key(4), t.params)
    with pytest.raises(ValueError, match="regul must be a scalar.*PMatDiag"):
        F.solve(v, damping)
    for operation in (lambda: F.inv(damping), lambda: F.pow(-1, damping),
                      lambda: F.pow(-1, regul=damping)):
        try:
            operation()
        except NotImplementedError:  # no inv/pow at all
            continue
        except ValueError as error:
            assert "regul must be a scalar" in str(error)
            continue
        raise AssertionError("a vector damping was accepted")
    if representation is PMatImplicit:
        return  # no sum: the message's other fix, CG on the products
    damped = F + PMatDiag(F.layer_collection, damping)
    expected = np.linalg.solve(np.asarray(F.to_dense()) + np.diag(damping), v.to_flat())
    np.testing.assert_allclose(damped.solve(v).to_flat(), expected, rtol=1e-7)
