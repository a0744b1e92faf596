"""Layers without Kronecker structure: a kernel consumed by two operations (tied embedding,
a dense layer applied twice) and a grouped convolution.

The Kronecker representations refuse them with an error naming the layer, its leaf, the
operations and the fix (``PMatMixed``); ``PMatMixed`` with another representation for that
layer then equals the float64 brute-force reference on its blocks; every representation
that needs no Kronecker structure stays exact on these models.
"""

from __future__ import annotations

import functools
import re

import jax
import numpy as np
import pytest
from models import UNFACTORABLE_TASKS, flat_jacobian, make_linen_mlp
from pmat_checks import TOL, block_mask, reference, vec

from jaxgeom import (
    FIM,
    GramMatrix,
    Jacobian,
    LayerCollection,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatKFAC,
    PMatKFOC,
)
from jaxgeom.pmat.ekfac import PMatEKFAC, PMatEKFACBlockDiag
from jaxgeom.pmat.implicit import PMatImplicit
from jaxgeom.pmat.lowrank import PMatLowRank
from jaxgeom.pmat.mixed import PMatMixed
from jaxgeom.pmat.quasidiag import PMatQuasiDiag

NAMES = sorted(UNFACTORABLE_TASKS)


@functools.cache
def task(name, n=5):
    """The task ``name`` with ``n`` examples (built once per module)."""
    return UNFACTORABLE_TASKS[name][0](n=n)


@pytest.mark.parametrize("name,rep", [
    (name, rep) for name in NAMES
    for rep in (PMatKFAC, PMatKFOC, PMatEKFAC, PMatEKFACBlockDiag, PMatQuasiDiag)
    if not (rep is PMatQuasiDiag and name == "linen_tied_embed")  # no bias: exact, below
])
def test_kronecker_representations_name_the_layer_and_the_fix(name, rep):
    _, layer_id, leaves, ops = UNFACTORABLE_TASKS[name]
    t = task(name)
    rep_name = rep.__name__
    message = ".*".join(re.escape(part) for part in (
        f"{rep_name} cannot represent layer {layer_id!r} ({leaves}; kind", ops,
        f"PMatMixed, mapping={{{layer_id!r}: PMatBlockDiag}}, default={rep_name}"))
    with pytest.raises(ValueError, match=message):
        FIM(t.apply_fn, t.params, t.x, rep)


@pytest.mark.parametrize("name", NAMES)
def test_mixed_with_another_representation_for_the_layer(name):
    """One example: KFAC is exact for the ``T = 1`` dense layers (any number of outputs),
    the layer without Kronecker structure is an exact block, so the Mixed matrix is the
    reference's layer blocks."""
    layer_id = UNFACTORABLE_TASKS[name][1]
    t = task(name, n=1)
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={layer_id: PMatBlockDiag},
            default=PMatKFAC)
    assert type(M.part(layer_id)) is PMatBlockDiag
    others = [lyr.id for lyr in M.layer_collection.layers if lyr.id != layer_id]
    assert all(type(M.part(i)) is PMatKFAC for i in others)
    assert [s.layer_id for s in M.part(others[0]).specs] == others
    exact = reference(t)
    np.testing.assert_allclose(M.to_dense(), np.where(block_mask(M.layer_collection), exact, 0),
                               **TOL)


@pytest.mark.parametrize("name", NAMES)
def test_exact_representations(name):
    """Dense, BlockDiag, Diag (built from captures: the layer's exact per-example
    gradients), LowRank and Implicit need no Kronecker structure and equal the reference;
    the tied embedding has no bias, so its quasi-diagonal is exact too."""
    t = task(name)
    exact = reference(t)

    def build(rep):
        return FIM(t.apply_fn, t.params, t.x, rep, batch_size=3)

    mask = block_mask(build(PMatDiag).layer_collection)
    for rep, want in [(PMatDense, exact), (PMatBlockDiag, np.where(mask, exact, 0)),
                      (PMatDiag, np.diag(np.diag(exact))), (PMatLowRank, exact)]:
        np.testing.assert_allclose(build(rep).to_dense(), want, **TOL, err_msg=rep.__name__)
    v = vec(t.params)
    np.testing.assert_allclose(build(PMatImplicit).mv(v).to_flat(), exact @ v.to_flat(), **TOL)
    if name == "linen_tied_embed":  # no bias: the table's quasi-diagonal block is diagonal
        idx = build(PMatDiag).layer_collection.layer_indices("Embed_0")
        got = build(PMatQuasiDiag).to_dense()[np.ix_(idx, idx)]
        np.testing.assert_allclose(got, np.diag(np.diag(exact[np.ix_(idx, idx)])), **TOL)


def test_a_layout_from_another_function_is_checked_against_the_traced_one():
    """``layer_collection`` discovered on the model, for a function that also applies the
    model at shifted parameters: each kernel and bias is used twice, once not through its
    layer's operation, so no layer is captured as ``A ⊗ G`` (the capture would see one of
    the two uses). The Kronecker representations refuse it with the reason; Dense, Diag,
    the Jacobian and the Gram matrix stay exact."""
    t = make_linen_mlp()

    def twice(params, x):
        shifted = jax.tree_util.tree_map(lambda a: a + 0.1, params)
        return t.apply_fn(params, x) + 2.0 * t.apply_fn(shifted, x)

    layout = LayerCollection.from_model(t.apply_fn, t.params, t.x)
    jac = np.asarray(flat_jacobian(twice, t.params, t.x))  # (N, K, d)
    fisher = np.einsum("nkd,nke->de", jac, jac) / jac.shape[0]
    build = functools.partial(FIM, twice, t.params, t.x, variant="regression",
                              layer_collection=layout)
    with pytest.raises(ValueError, match="uses its kernel outside its operation"):
        build(PMatKFAC)
    np.testing.assert_allclose(build(PMatDense).to_dense(), fisher, **TOL)
    np.testing.assert_allclose(build(PMatDiag).to_dense(), np.diag(np.diag(fisher)), **TOL)
    J = Jacobian(twice, t.params, t.x, layer_collection=layout, batch_size=3)
    np.testing.assert_allclose(J.to_dense(), jac.transpose(1, 0, 2), **TOL)
    G = GramMatrix(twice, t.params, t.x, layer_collection=layout, batch_size=3)
    np.testing.assert_allclose(G.to_dense(), np.einsum("nkd,mld->knlm", jac, jac), **TOL)
