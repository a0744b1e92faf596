"""What a user coming from NNGeometry types: its keyword arguments are refused with what
to do instead (not an error naming the representation's builder)."""

import jax
import numpy as np
import pytest
from models import make_linen_mlp

from jaxgeom import FIM, FIM_MonteCarlo, PMatDiag, SecondMoment
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
