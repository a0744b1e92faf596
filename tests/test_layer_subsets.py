"""Layer subsets: ``LayerCollection.union`` / ``intersection`` / ``get_common_layers`` in
the model's flat order (against ``restrict``), and ``+``/``-`` of matrices built on
different layer subsets: a block-diagonal ``PMatMixed`` for disjoint subsets (against the
float64 dense Fisher's blocks), an error naming ``restrict``/``union``/``intersection``
for overlapping ones, whose fix ``M1.restrict(common) + M2.restrict(common)`` is the sum of
the principal sub-matrices."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from models import make_linen_layernorm, make_linen_mlp, make_plain_mlp

from jaxgeom import FIM, LayerCollection, PMatDense, PMatDiag, PMatKFAC
from jaxgeom.pmat.mixed import PMatMixed
from jaxgeom.restriction import restrict

KEY = jax.random.PRNGKey(0)


def _layout(t):
    return LayerCollection.from_model(t.apply_fn, t.params, t.x[:1])


def _build(t, lc, ids, representation):
    """The Fisher of the layers ``ids`` alone, on their sub-collection."""
    r = restrict(lc, ids)
    return FIM(r.apply_fn(t.apply_fn, t.params), r.select(t.params), (t.x, t.y), representation,
               layer_collection=r.layer_collection)


# ----------------------------------------------------------------------------- layouts
def test_union_and_intersection_are_restrictions_in_the_flat_order():
    """Dense_0 + LayerNorm_0 and Dense_1 + LayerNorm_0: the union is the restriction to
    all three (leaves in the model's flat order, whatever the operands' order), the
    intersection the restriction to LayerNorm_0, as NNGeometry's get_common_layers/merge."""
    t = make_linen_layernorm()
    lc = _layout(t)
    a = restrict(lc, ["Dense_0", "LayerNorm_0"]).layer_collection
    b = restrict(lc, ["LayerNorm_0", "Dense_1"]).layer_collection
    every = restrict(lc, ["Dense_0", "Dense_1", "LayerNorm_0"]).layer_collection
    assert a.union(b) == b.union(a) == every
    assert every.paths == lc.paths and every.shapes == lc.shapes
    assert every.origin == tuple(range(len(lc.paths)))
    assert a.get_common_layers(b) == ("LayerNorm_0",)
    assert a.intersection(b) == b.intersection(a) == restrict(lc, "LayerNorm_0").layer_collection
    # the root layout holds every layer: unions with it are it, intersections the subset
    assert lc.union(a) is lc and a.union(lc) is lc
    assert lc.intersection(a) == a and a.intersection(lc) is a
    assert lc.get_common_layers(lc) == tuple(layer.id for layer in lc.layers)
    # a restriction of a restriction is the restriction of the root
    norm = restrict(lc, "LayerNorm_0").layer_collection
    assert restrict(a, "LayerNorm_0").layer_collection == norm
    with pytest.raises(ValueError, match="no layer in common"):
        restrict(lc, "Dense_0").layer_collection.intersection(b)


def test_union_interleaves_leaves_by_their_position_in_the_model():
    """A plain dict's leaves ``b1, b2, w1, w2``: layer ``w1`` holds leaves 0 and 2,
    ``w2`` 1 and 3. The union of the two one-layer subsets interleaves them as the model
    does: its flat vectors are the model's (``R.indices``)."""
    t = make_plain_mlp()
    lc = _layout(t)
    w1, w2 = (restrict(lc, i) for i in ("w1", "w2"))
    union = w2.layer_collection.union(w1.layer_collection)
    both = restrict(lc, ["w1", "w2"])
    assert union == both.layer_collection
    assert union.paths == ("b1", "b2", "w1", "w2")
    assert [layer.leaves for layer in union.layers] == [(0, 2), (1, 3)]
    flat = np.arange(lc.numel(), dtype=float)
    np.testing.assert_array_equal(union.to_flat(both.select(lc.from_flat(flat))), flat)


def test_collections_of_different_models_do_not_unite():
    """Layer subsets of different models: a root layout lacking the other's layers, one
    id for two different layers, one root leaf in two layers."""
    lc, mlp, plain = (_layout(m()) for m in (make_linen_layernorm, make_linen_mlp,
                                               make_plain_mlp))
    with pytest.raises(ValueError, match="not layer subsets of one model.*lacks"):
        lc.union(mlp)
    a = restrict(lc, "Dense_0").layer_collection  # root leaves 0, 1
    b = restrict(lc, "Dense_1").layer_collection
    c = restrict(mlp, "Dense_1").layer_collection  # another Dense_1 (other shapes)
    assert b.get_common_layers(c) == ()  # not the same layer
    with pytest.raises(ValueError, match="layer 'Dense_1' differs"):
        b.union(c)
    with pytest.raises(ValueError, match="root leaf 1 is 'Dense_0/kernel'.*'b2' of layer 'w2'"):
        a.union(restrict(plain, "w2").layer_collection)  # root leaves 1, 3


# ----------------------------------------------------------------------------- matrices
@pytest.fixture(scope="module")
def model():
    t = make_linen_layernorm()
    lc = _layout(t)
    dense = np.asarray(FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense).to_dense())
    return t, lc, dense


def _block(lc, dense, ids, within):
    """The block of the full Fisher on the layers ``ids``, placed at their positions in
    the sub-collection of the layers ``within``: a matrix on ``within``'s flat order."""
    outer = restrict(lc, within).indices
    inner = restrict(lc, ids).indices
    pos = np.searchsorted(outer, inner)
    out = np.zeros((len(outer), len(outer)))
    out[np.ix_(pos, pos)] = dense[np.ix_(inner, inner)]
    return out


@pytest.mark.parametrize("first, second", [(PMatDense, PMatDiag), (PMatKFAC, PMatDense)])
def test_sum_on_disjoint_subsets_is_block_diagonal(model, first, second):
    """``M1 ± M2`` for M1 on Dense_0 and M2 on Dense_1 + LayerNorm_0 (disjoint): the
    ``PMatMixed`` of the two on the union, zero between them; its numbers are the blocks
    of the full float64 Fisher (each part's own approximation for KFAC / Diag)."""
    t, lc, dense = model
    ids1, ids2 = ["Dense_0"], ["Dense_1", "LayerNorm_0"]
    m1, m2 = _build(t, lc, ids1, first), _build(t, lc, ids2, second)
    every = ids1 + ids2
    want1 = _block(lc, dense, ids1, every)
    want2 = _block(lc, dense, ids2, every)
    if first is PMatKFAC:  # KFAC: its own blocks (checked against brute force elsewhere)
        want1 = np.zeros_like(want1)
        pos = np.searchsorted(restrict(lc, every).indices, restrict(lc, ids1).indices)
        want1[np.ix_(pos, pos)] = np.asarray(m1.to_dense())
    else:
        idx = restrict(lc, ids1).indices
        np.testing.assert_allclose(m1.to_dense(), dense[np.ix_(idx, idx)], rtol=1e-10,
                                   atol=1e-12)
    if second is PMatDiag:
        want2 = np.diag(np.diag(want2))
    v = np.asarray(jax.random.normal(KEY, (len(want1),)))
    for total, want in [(m1 + m2, want1 + want2), (m2 + m1, want1 + want2),
                        (m1 - m2, want1 - want2), (m2 - m1, want2 - want1)]:
        assert type(total) is PMatMixed
        assert total.layer_collection == restrict(lc, every).layer_collection
        np.testing.assert_allclose(total.to_dense(), want, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(total.mv(v), want @ v, rtol=1e-10, atol=1e-12)


def test_overlapping_subsets_are_refused_naming_restrict(model):
    """Dense_0 + LayerNorm_0 and Dense_1 + LayerNorm_0 share a layer: no sum, no
    product; the error names the layers and the layouts to build both on. Built on the
    union, as it says, they add up to the full Fisher's blocks."""
    t, lc, dense = model
    ids1, ids2 = ["Dense_0", "LayerNorm_0"], ["Dense_1", "LayerNorm_0"]
    m1, m2 = _build(t, lc, ids1, PMatDense), _build(t, lc, ids2, PMatDense)
    for op in (lambda: m1 + m2, lambda: m1 - m2, lambda: m1 @ m2):
        with pytest.raises(ValueError, match=(
                r"different subsets.*\['Dense_0'\] only in the first, \['Dense_1'\] only in "
                r"the second, \['LayerNorm_0'\] in both.*M1\.restrict\(\['LayerNorm_0'\]\) \+ "
                r"M2\.restrict\(\['LayerNorm_0'\]\).*restrict\(layer_collection, "
                r"\['Dense_0', 'Dense_1', 'LayerNorm_0'\]\).*union.*intersection")):
            op()
    # the fix without a rebuild: both restricted to the common layers (NNGeometry's sum)
    norm = _block(lc, dense, ["LayerNorm_0"], ["LayerNorm_0"])
    for total, want in [(m1.restrict("LayerNorm_0") + m2.restrict("LayerNorm_0"), 2 * norm),
                        (m1.restrict("LayerNorm_0") - m2.restrict("LayerNorm_0"), 0 * norm)]:
        assert type(total) is PMatDense
        np.testing.assert_allclose(total.to_dense(), want, rtol=1e-10, atol=1e-12)
    every = ["Dense_0", "Dense_1", "LayerNorm_0"]
    union = m1.layer_collection.union(m2.layer_collection)
    assert union == restrict(lc, every).layer_collection
    both = _build(t, lc, every, PMatDense)
    np.testing.assert_allclose(both.to_dense(), dense, rtol=1e-10, atol=1e-12)
    common = m1.layer_collection.intersection(m2.layer_collection)
    c1 = _build(t, lc, list(m1.layer_collection.get_common_layers(m2.layer_collection)),
                PMatDense)
    assert c1.layer_collection == common
    np.testing.assert_allclose((c1 + c1).to_dense(), 2 * _block(lc, dense, ["LayerNorm_0"],
                                                                ["LayerNorm_0"]),
                               rtol=1e-10, atol=1e-12)
