"""EWC penalty: value and gradient against the dense formula, for every stored representation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from models import make_linen_mlp

import jaxgeom as jg
from jaxgeom.ewc import ewc_penalty

REPRESENTATIONS = [
    jg.PMatDiag, jg.PMatBlockDiag, jg.PMatKFAC, jg.PMatEKFAC, jg.PMatDense, jg.PMatImplicit,
]


@pytest.fixture(scope="module")
def task():
    t = make_linen_mlp(n=6)
    moved = jax.tree_util.tree_map(
        lambda p, k: p + 0.1 * jax.random.normal(k, p.shape, p.dtype), t.params,
        jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(t.params),
                                     jax.random.split(jax.random.PRNGKey(0),
                                                      len(jax.tree_util.tree_leaves(t.params)))))
    return t, moved


@pytest.mark.parametrize("rep", REPRESENTATIONS, ids=lambda r: r.__name__)
def test_penalty_value_and_gradient(task, rep):
    t, params = task
    lam = 3.0
    F = jg.FIM(t.apply_fn, t.params, (t.x, t.y), rep)
    dense = F.to_dense()
    penalty = ewc_penalty(F, t.params, lam)
    delta = ravel_pytree(params)[0] - ravel_pytree(t.params)[0]
    value, grad = jax.jit(jax.value_and_grad(penalty))(params)
    np.testing.assert_allclose(value, 0.5 * lam * delta @ dense @ delta, rtol=1e-10)
    np.testing.assert_allclose(ravel_pytree(grad)[0], lam * dense @ delta, rtol=1e-9,
                               atol=1e-12)
    assert penalty(t.params) == 0


def test_penalty_needs_a_representation(task):
    t, _ = task
    with pytest.raises(TypeError, match="representation"):
        ewc_penalty(jnp.eye(3), t.params, 1.0)


def test_params_star_must_match_the_fisher(task):
    """A params_star of other leaf shapes (a 1-output head for a 4-output one) is refused,
    naming the leaf, instead of broadcast; a PVector is accepted."""
    t, params = task
    F = jg.FIM(t.apply_fn, t.params, (t.x, t.y), jg.PMatDiag)
    head = {"kernel": t.params["Dense_1"]["kernel"][:, :1], "bias": t.params["Dense_1"]["bias"][:1]}
    with pytest.raises(ValueError, match=r"params_star's leaf 'Dense_1/bias' has shape \(1,\)"):
        ewc_penalty(F, {**t.params, "Dense_1": head}, 1.0)
    np.testing.assert_allclose(ewc_penalty(F, jg.PVector(t.params), 2.0)(params),
                               ewc_penalty(F, t.params, 2.0)(params), rtol=1e-12)


def test_penalty_params_must_match_the_fisher(task):
    """The penalty's own argument is checked like params_star: parameters of another head
    broadcast against w* used to give a wrong penalty silently (here 1-output leaves
    against a 4-output Fisher)."""
    t, params = task
    F = jg.FIM(t.apply_fn, t.params, (t.x, t.y), jg.PMatDiag)
    penalty = ewc_penalty(F, t.params, 1.0)
    head = {"kernel": params["Dense_1"]["kernel"][:, :1], "bias": params["Dense_1"]["bias"][:1]}
    with pytest.raises(ValueError, match=r"params's leaf 'Dense_1/bias' has shape \(1,\)"):
        penalty({**params, "Dense_1": head})
    with pytest.raises(ValueError, match="params's pytree structure"):
        jax.jit(penalty)({"a": params})


def test_params_star_as_a_flat_vector_and_a_scalar_lam(task):
    """A flat w* (what the structure error's fix offers) is the pytree's; a vector λ
    (one per task) is refused instead of answering a vector penalty."""
    t, params = task
    F = jg.FIM(t.apply_fn, t.params, (t.x, t.y), jg.PMatDense)
    flat = ravel_pytree(t.params)[0]
    np.testing.assert_allclose(ewc_penalty(F, flat, 2.0)(params),
                               ewc_penalty(F, t.params, 2.0)(params), rtol=1e-12)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        ewc_penalty(F, t.params, jnp.ones(2))


def test_penalties_of_several_tasks_add_up(task):
    """Two finished tasks, each its Fisher at its own w*: ½ Σ λ_t (w − w_t*)ᵀ F_t (w − w_t*)
    and its gradient against the dense formula."""
    t, params = task
    star_b = jax.tree_util.tree_map(lambda p: 0.9 * p + 0.05, t.params)
    F_a = jg.FIM(t.apply_fn, t.params, (t.x, t.y), jg.PMatKFAC)
    F_b = jg.FIM(t.apply_fn, star_b, (0.5 * t.x, t.y), jg.PMatDiag)
    pens = [ewc_penalty(F_a, t.params, 3.0), ewc_penalty(F_b, jg.PVector(star_b), 7.0)]
    total = jax.jit(jax.value_and_grad(lambda p: pens[0](p) + pens[1](p)))
    w = ravel_pytree(params)[0]
    da, db = w - ravel_pytree(t.params)[0], w - ravel_pytree(star_b)[0]
    A, B = F_a.to_dense(), F_b.to_dense()
    value, grad = total(params)
    np.testing.assert_allclose(value, 1.5 * da @ A @ da + 3.5 * db @ B @ db, rtol=1e-10)
    np.testing.assert_allclose(ravel_pytree(grad)[0], 3 * A @ da + 7 * B @ db, rtol=1e-9,
                               atol=1e-12)
