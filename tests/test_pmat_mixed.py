"""PMatMixed: equal to its blocks (each part as the representation built on the whole model),
zero between parts; blockwise operations against ``to_dense()``; restriction, errors,
jit and chunking; ``PMatEKFACBlockDiag`` equals the Mixed of EKFAC and BlockDiag."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from models import Task, make_linen_embed, make_linen_layernorm, to_float64
from pmat_checks import TOL, block_mask, check_all, check_combinations, check_solve

from jaxgeom import FIM, PMatBlockDiag, PMatDense, PMatDiag, PMatKFAC
from jaxgeom.pmat.ekfac import PMatEKFAC, PMatEKFACBlockDiag
from jaxgeom.pmat.mixed import PMatMixed, restrict
from jaxgeom.pmat.quasidiag import PMatQuasiDiag

MAPPING = {"dense": PMatKFAC, "conv": PMatKFAC, "norm": PMatBlockDiag, "embedding": PMatDiag}


class ConvLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.Conv(2, (2, 2), strides=(2, 2))(x))
        return nn.Dense(3)(jnp.tanh(x).reshape((x.shape[0], -1)))


def make_conv_layernorm(n=5):
    x = jax.random.normal(jax.random.PRNGKey(8), (n, 4, 4, 2))
    module = ConvLayerNorm()
    params = to_float64(module.init(jax.random.PRNGKey(0), x)["params"])
    return Task("conv_layernorm", lambda p, x: module.apply({"params": p}, x), params, x,
                None, 3)


@pytest.fixture(scope="module", params=[make_linen_layernorm, make_linen_embed,
                                        make_conv_layernorm])
def case(request):
    t = request.param()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping=MAPPING)
    return t, M, np.asarray(M.to_dense())


def test_equals_its_blocks(case):
    t, M, dense = case
    lc = M.layer_collection
    whole = {rep: np.asarray(FIM(t.apply_fn, t.params, t.x, rep).to_dense())
             for rep in {type(p) for p in M.parts}}
    for layer in lc.layers:
        idx = lc.layer_indices(layer)
        want = whole[MAPPING[layer.kind]][np.ix_(idx, idx)]
        np.testing.assert_allclose(dense[np.ix_(idx, idx)], want, **TOL, err_msg=layer.id)
        assert type(M.part(layer)) is MAPPING[layer.kind]
    assert not dense[~block_mask(lc)].any()


def test_operations(case):
    t, M, dense = case
    check_all(M, dense, t.params)
    check_solve(M, dense, t.params)
    check_combinations([
        (M, 2.0 * M, dense, 2 * dense, (PMatMixed, PMatMixed)),
        (M, PMatDense(M.layer_collection, dense), dense, dense, (PMatDense, PMatDense)),
    ])


def test_from_mapping_restriction_and_ekfac_block_diag():
    """Parts built by hand on restricted functions assemble to the same matrix;
    EKFAC on dense/conv + BlockDiag elsewhere == PMatEKFACBlockDiag (restricted capture)."""
    t = make_conv_layernorm()
    lc = FIM(t.apply_fn, t.params, t.x, PMatEKFACBlockDiag).layer_collection
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFACBlockDiag, layer_collection=lc)
    ids = {k: tuple(lyr.id for lyr in lc.layers if (lyr.kind == "norm") == k) for k in (0, 1)}
    parts = []
    for norm, rep in [(0, PMatEKFAC), (1, PMatBlockDiag)]:
        r = restrict(lc, ids[norm])
        parts.append(FIM(r.apply_fn(t.apply_fn, t.params), r.select(t.params), t.x, rep,
                         layer_collection=r.layer_collection))
    M = PMatMixed.from_mapping(lc, parts)
    np.testing.assert_allclose(M.to_dense(), E.to_dense(), **TOL)
    with pytest.raises(ValueError, match="every layer once"):
        PMatMixed.from_mapping(lc, parts[:1])


def test_errors_name_the_part():
    t = make_linen_layernorm()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"Dense_*": PMatQuasiDiag})
    assert [type(p) for p in M.parts] == [PMatQuasiDiag, PMatBlockDiag]
    with pytest.raises(NotImplementedError, match=r"PMatQuasiDiag \(layers \['Dense_0'"):
        M.pow(0.5)
    with pytest.raises(ValueError, match="matches no layer"):
        FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"Conv_*": PMatKFAC})
    with pytest.raises(TypeError, match="representation class"):
        FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"dense": "kfac"})


def test_chunks_iterators_and_jit():
    t = make_linen_layernorm(n=7)
    build = dict(mapping={"dense": PMatKFAC}, default=PMatDiag)
    ref = FIM(t.apply_fn, t.params, t.x, PMatMixed, **build).to_dense()
    one_shot = iter([(t.x[:2],), (t.x[2:],)])  # one pass per part: materialised
    chunked = FIM(t.apply_fn, t.params, one_shot, PMatMixed, batch_size=3, **build)
    jitted = jax.jit(lambda p, x: FIM(t.apply_fn, p, x, PMatMixed, **build))(t.params, t.x)
    for got in (chunked, jitted):
        np.testing.assert_allclose(got.to_dense(), ref, **TOL)
