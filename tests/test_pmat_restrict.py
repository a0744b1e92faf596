"""``M.restrict(ids)``: the principal sub-matrix ``M[S, S]`` on
``restrict(M.layer_collection, ids).layer_collection``, for every representation, in the
same representation: against the float64 dense matrix's sub-block (and the brute-force
Fisher's for ``PMatDense``), and equal to the representation built on the layers'
restricted function where a build on a layer subset is the sub-matrix; ``PMatMixed``
parts that straddle ``S``; restrictions of restrictions; the generic route; jit; the
refusal of ``PMatImplicitHessian``."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
from models import make_linen_cnn, make_linen_layernorm, make_linen_mlp
from pmat_checks import reference

from jaxgeom import (
    FIM,
    Hessian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
)
from jaxgeom.pmat.base import PMatAbstract
from jaxgeom.pmat.ekfac import PMatEKFAC
from jaxgeom.pmat.eye import PMatEye
from jaxgeom.pmat.mixed import PMatMixed
from jaxgeom.pmat.quasidiag import PMatQuasiDiag
from jaxgeom.restriction import restrict

TOL = dict(rtol=1e-10, atol=1e-12)
MODELS = {"mlp": make_linen_mlp, "cnn": make_linen_cnn, "layernorm": make_linen_layernorm}
#: per model, subsets of fewer layers than the model's (one layer; layers not adjacent in
#: the flat order, listed out of order)
SUBSETS = {"mlp": [["Dense_0"], ["Dense_1"]],
           "cnn": [["Conv_1"], ["Dense_0", "Conv_0"]],
           "layernorm": [["LayerNorm_0"], ["Dense_1", "Dense_0"], ["LayerNorm_0", "Dense_0"]]}
#: the representations built from data, and whether a build on the layers' restricted
#: function is the restriction of the build on the whole model (each is per layer or, for
#: LowRank/Implicit, made of the Jacobian's columns)
BUILT = {PMatDense: True, PMatBlockDiag: True, PMatDiag: True, PMatKFAC: True,
         PMatEKFAC: True, PMatQuasiDiag: True, PMatLowRank: True, PMatImplicit: True,
         PMatMixed: False}
MIXED = {"dense": PMatKFAC, "conv": PMatKFAC}
REPRESENTATIONS = [*BUILT, "eye", "shifted low rank"]


def _data(t):
    return (t.x, t.y)


@functools.cache
def _matrix(name: str, rep) -> PMatAbstract:
    t = MODELS[name]()
    if rep == "eye":
        return PMatEye(_matrix(name, PMatDense).layer_collection, 0.7)
    if rep == "shifted low rank":  # M = Fᵀ diag(c) F + s·I
        low = _matrix(name, PMatLowRank)
        return low + PMatEye(low.layer_collection, 0.3)
    options = dict(mapping=MIXED) if rep is PMatMixed else {}
    return FIM(t.apply_fn, t.params, _data(t), rep, **options)


@pytest.mark.parametrize("rep", REPRESENTATIONS, ids=lambda r: getattr(r, "__name__", r))
@pytest.mark.parametrize("name", sorted(MODELS))
def test_principal_sub_matrix(name, rep):
    """``M.restrict(ids).to_dense() == M.to_dense()[S][:, S]`` in ``M``'s representation
    on the sub-collection (the ids in any order); its products agree."""
    M = _matrix(name, rep)
    dense = np.asarray(M.to_dense())
    lc = M.layer_collection
    for ids in SUBSETS[name]:
        r = restrict(lc, ids)
        sub = M.restrict(ids)
        assert type(sub) is type(M)
        assert sub.layer_collection == r.layer_collection
        assert sub.layer_collection == restrict(lc, ids[::-1]).layer_collection
        want = dense[np.ix_(r.indices, r.indices)]
        np.testing.assert_allclose(sub.to_dense(), want, **TOL, err_msg=str(ids))
        v = np.random.default_rng(0).standard_normal(len(r.indices))
        np.testing.assert_allclose(sub.mv(v), want @ v, **TOL, err_msg=str(ids))
        if rep is PMatDense:  # the brute-force float64 Fisher's sub-block
            ref = reference(MODELS[name]())
            np.testing.assert_allclose(sub.to_dense(), ref[np.ix_(r.indices, r.indices)],
                                       rtol=1e-8, atol=1e-10)
    if rep == "shifted low rank":
        assert M.restrict(SUBSETS[name][0]).shift == M.shift


@pytest.mark.parametrize("rep", [r for r, exact in BUILT.items() if exact],
                         ids=lambda r: r.__name__)
@pytest.mark.parametrize("name", ["cnn", "layernorm"])
def test_restriction_of_the_build_is_the_build_on_the_layers(name, rep):
    """``FIM(...).restrict(ids)`` is ``FIM`` on the layers' restricted function (built on
    ``restrict(lc, ids)``, as a ``PMatMixed`` part is)."""
    t = MODELS[name]()
    M = _matrix(name, rep)
    ids = SUBSETS[name][-1]
    r = restrict(M.layer_collection, ids)
    built = FIM(r.apply_fn(t.apply_fn, t.params), r.select(t.params), _data(t), rep,
                layer_collection=r.layer_collection)
    np.testing.assert_allclose(M.restrict(ids).to_dense(), built.to_dense(), rtol=1e-9,
                               atol=1e-11)


def test_mixed_parts_within_and_straddling():
    """A part within ``S`` is kept as it is (the same object), one that straddles ``S`` is
    restricted, one outside ``S`` dropped."""
    M = FIM(*(lambda t: (t.apply_fn, t.params, _data(t)))(make_linen_layernorm()), PMatMixed,
            mapping={"dense": PMatKFAC, "norm": PMatDiag})
    norm_and_one = M.restrict(["LayerNorm_0", "Dense_1"])
    assert [type(p) for p in norm_and_one.parts] == [PMatKFAC, PMatDiag]
    assert norm_and_one.part("LayerNorm_0") is M.part("LayerNorm_0")
    assert [lyr.id for lyr in norm_and_one.part("Dense_1").layer_collection] == ["Dense_1"]
    both_dense = M.restrict(["Dense_0", "Dense_1"])
    assert both_dense.parts == (M.part("Dense_0"),)
    dense = np.asarray(M.to_dense())
    for sub, ids in [(norm_and_one, ["LayerNorm_0", "Dense_1"]),
                     (both_dense, ["Dense_0", "Dense_1"])]:
        idx = restrict(M.layer_collection, ids).indices
        np.testing.assert_allclose(sub.to_dense(), dense[np.ix_(idx, idx)], **TOL)


def test_whole_chains_and_errors():
    """Every layer: ``M`` itself. A restriction of a restriction is the restriction of
    ``M``. Unknown or repeated ids are refused."""
    M = _matrix("layernorm", PMatKFAC)
    lc = M.layer_collection
    assert M.restrict([layer.id for layer in lc]) is M
    twice = M.restrict(["LayerNorm_0", "Dense_0"]).restrict("Dense_0")
    once = M.restrict("Dense_0")
    assert twice.layer_collection == once.layer_collection
    np.testing.assert_allclose(twice.to_dense(), once.to_dense(), **TOL)
    with pytest.raises(KeyError, match="no layer 'Conv_0'"):
        M.restrict("Conv_0")
    with pytest.raises(ValueError, match="distinct layer ids"):
        M.restrict(["Dense_0", "Dense_0"])


def test_generic_route_and_jit():
    """The base class's route (``M`` applied to the unit vectors of ``S``) gives the same
    sub-matrix as a ``PMatDense``; ``restrict`` works inside ``jax.jit`` (static indices)."""
    for rep in (PMatKFAC, PMatMixed, PMatLowRank):
        M = _matrix("cnn", rep)
        ids = SUBSETS["cnn"][-1]
        r = restrict(M.layer_collection, ids)
        generic = PMatAbstract._restricted(M, r)
        assert type(generic) is PMatDense
        np.testing.assert_allclose(generic.to_dense(), M.restrict(ids).to_dense(), **TOL)
        jitted = jax.jit(lambda m, ids=ids: m.restrict(ids).to_dense())(M)
        np.testing.assert_allclose(jitted, generic.to_dense(), **TOL)


def test_implicit_hessian_is_refused_naming_the_rebuild():
    t = make_linen_mlp()

    def loss(p, batch):
        x, y = batch
        logits = t.apply_fn(p, x)
        return -jax.numpy.mean(jax.nn.log_softmax(logits)[jax.numpy.arange(len(y)), y])

    H = Hessian(loss, t.params, _data(t), PMatImplicit)
    with pytest.raises(NotImplementedError, match=r"Hessian\(lambda sub, batch.*\.restrict"):
        H.restrict("Dense_0")
    dense = Hessian(loss, t.params, _data(t), PMatDense)
    idx = restrict(dense.layer_collection, "Dense_0").indices
    np.testing.assert_allclose(dense.restrict("Dense_0").to_dense(),
                               np.asarray(dense.to_dense())[np.ix_(idx, idx)], **TOL)
