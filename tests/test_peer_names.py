"""What a user coming from NNGeometry or curvlinops types: NNGeometry's keyword arguments
are refused with what to do instead (not an error naming the representation's builder),
and docs/migration.md's recipes give the peers' matrices."""

import jax
import numpy as np
import pytest
from models import make_linen_mlp

from jaxgeom import FIM, FIM_MonteCarlo, PMatDense, PMatDiag, SecondMoment, optim
from jaxgeom.layers import ravel_tree
from jaxgeom.variants import softmax_cholesky_outputs


@pytest.mark.parametrize("name, match", [
    ("function", "SecondMoment"), ("device", "jax.device_put"), ("verbose", "print nothing"),
    ("examples", "third argument"),
])
def test_nngeometry_keywords_say_what_to_do(name, match):
    t = make_linen_mlp()
    with pytest.raises(TypeError, match=f"FIM takes no {name}=.*{match}"):
        FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag, **{name: None})
    with pytest.raises(TypeError, match=f"FIM_MonteCarlo takes no {name}=.*{match}"):
        FIM_MonteCarlo(t.apply_fn, t.params, (t.x, t.y), PMatDiag, key=jax.random.key(0),
                       **{name: None})


def test_the_function_of_nngeometry_is_second_moment():
    """NNGeometry's ``FIM(..., function=f)`` is ``SecondMoment(f, ...)``: with the exact
    softmax square root as ``f`` it is ``FIM`` itself."""
    t = make_linen_mlp()

    def f(params, batch):
        return jax.vmap(softmax_cholesky_outputs)(t.apply_fn(params, batch[0]))

    want = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    got = SecondMoment(f, t.params, (t.x, t.y), PMatDiag)
    np.testing.assert_allclose(got.data, want.data, rtol=1e-10)


def test_the_empirical_fisher_recipe_of_the_migration_guide():
    """docs/migration.md's empirical Fisher (curvlinops' EFLinearOperator with a mean
    loss): ``(1/N) Σₙ ∇ℓₙ∇ℓₙᵀ`` of the per-example cross-entropies, brute force."""
    t = make_linen_mlp()

    def ef(params, batch):
        return optim.per_example_loss("classif_logits", t.apply_fn(params, batch[0]),
                                      batch[1])[:, None]

    got = SecondMoment(ef, t.params, (t.x, t.y), PMatDense)

    def loss(params, x, y):
        return -jax.nn.log_softmax(t.apply_fn(params, x[None])[0])[y]

    grads = jax.vmap(lambda x, y: ravel_tree(jax.grad(loss)(t.params, x, y)))(t.x, t.y)
    np.testing.assert_allclose(got.to_dense(), grads.T @ grads / len(t.x), rtol=1e-10,
                               atol=1e-14)
