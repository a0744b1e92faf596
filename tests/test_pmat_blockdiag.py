"""PMatBlockDiag: the layer blocks of the brute-force Fisher, and every operation against its
dense form (including layers whose parameters interleave in the flat order)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import (
    make_equinox_mlp,
    make_linen_cnn,
    make_linen_mlp,
    make_plain_mlp,
    reference_fisher,
)
from pmat_checks import (
    REGUL,
    TOL,
    block_mask,
    check_all,
    check_eigsh,
    check_promotions,
    check_pytree,
    check_solve,
    reference,
)

from jaxgeom import FIM, FIM_MonteCarlo, LayerCollection, PMatDense
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.diag import PMatDiag
from jaxgeom.pmat.eye import PMatEye


@pytest.fixture(
    scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp, make_plain_mlp]
)
def case(request):
    t = request.param()
    B = FIM(t.apply_fn, t.params, (t.x, t.y), PMatBlockDiag, batch_size=3)
    ref = reference(t)
    return t, B, ref, np.where(block_mask(B.layer_collection), ref, 0.0)


def test_blocks_eigenvalues_from_one_host_call_in_chains(case, monkeypatch):
    """Inside a ``jit``, with chains forced for these small blocks, every block's
    eigenvalues come from one host call (LAPACK's ``syevd`` without eigenvectors): sorted,
    the dense block-diagonal matrix's; ``logdet`` and its derivative with respect to the
    blocks through them, NumPy's ``slogdet`` and ``(M + λI)⁻¹``'s blocks. (The CNN's
    blocks, one of them most of the work, are not dealt into chains.)"""
    from jaxgeom import _lapack

    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 0)
    _, B, _, dense = case
    lam = 0.1
    np.testing.assert_allclose(jax.jit(lambda B: B.eigvalsh())(B), np.linalg.eigvalsh(dense),
                               atol=1e-12)
    logdet, tangent = jax.jit(jax.value_and_grad(lambda B: B.logdet(lam)))(B)
    shifted = dense + lam * np.eye(len(dense))
    np.testing.assert_allclose(logdet, np.linalg.slogdet(shifted)[1], rtol=1e-10)
    inverse = np.linalg.inv(shifted)
    lc = B.layer_collection
    for layer, block in zip(lc.layers, tangent.blocks):
        idx = lc.layer_indices(layer)
        np.testing.assert_allclose(block, inverse[np.ix_(idx, idx)], rtol=1e-8, atol=1e-10)
    if jax.default_backend() == "cpu":
        program = str(jax.make_jaxpr(lambda B: B.eigvalsh())(B))
        in_chains = _lapack.chains([b.shape[0] for b in B.blocks], 2) is not None
        assert program.count("<function eigvalsh at") == int(in_chains)  # else each in XLA


def test_storage_is_the_reference_blocks(case):
    t, B, ref, dense = case
    lc = B.layer_collection
    assert len(B.blocks) == len(lc.layers) > 1
    for layer, block in zip(lc.layers, B.blocks):
        idx = lc.layer_indices(layer)
        np.testing.assert_allclose(block, ref[np.ix_(idx, idx)], **TOL)
        assert B.get_block(layer.id) is block and B.get_block(layer) is block
    assert np.all(np.asarray(B.to_dense())[~block_mask(lc)] == 0)


def test_interleaved_layers_are_gathered():
    t = make_plain_mlp()  # leaves b1, b2, w1, w2: each layer's indices are not contiguous
    lc = LayerCollection.from_model(t.apply_fn, t.params, t.x[:1])
    idx = lc.layer_indices(lc.layers[0])
    assert np.any(np.diff(idx) > 1)


def test_operations(case):
    t, B, ref, dense = case
    check_all(B, dense, t.params)
    check_eigsh(B, dense)  # per-block eigh, each vector on its layer's indices


def test_solve(case):
    t, B, ref, dense = case
    check_solve(B, dense, t.params)


def test_eigh_per_block(case):
    t, B, ref, dense = case
    decompositions = B.eigh()
    assert len(decompositions) == len(B.blocks)
    for (evals, evecs), block in zip(decompositions, B.blocks):
        evals, evecs = np.asarray(evals), np.asarray(evecs)
        np.testing.assert_allclose((evecs * evals) @ evecs.T, block, atol=1e-10)
        assert np.all(np.diff(evals) >= 0)


def test_combinations(case):
    t, B, ref, dense = case
    check_promotions(B, dense, ref)


def test_conversions(case):
    t, B, ref, dense = case
    D = PMatDiag(B.layer_collection, np.diag(ref))
    np.testing.assert_allclose(PMatBlockDiag.from_pmat(D).to_dense(), D.to_dense(), **TOL)
    assert PMatBlockDiag.from_pmat(B) is B
    projected = PMatBlockDiag.from_pmat(PMatDense(B.layer_collection, ref))
    np.testing.assert_allclose(projected.to_dense(), dense, **TOL)


def test_under_jit(case):
    t, B, ref, dense = case
    check_pytree(B)
    built = jax.jit(lambda p: FIM(t.apply_fn, p, t.x, PMatBlockDiag))(t.params)
    assert isinstance(built, PMatBlockDiag)
    np.testing.assert_allclose(built.to_dense(), dense, **TOL)


def test_monte_carlo_is_the_dense_blocks():
    t = make_plain_mlp()
    kwargs = dict(key=jax.random.PRNGKey(0), trials=3)
    B = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatBlockDiag, **kwargs)
    F = np.asarray(FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, **kwargs).to_dense())
    np.testing.assert_allclose(B.to_dense(), np.where(block_mask(B.layer_collection), F, 0), **TOL)


def test_bad_input():
    t = make_linen_mlp()
    lc = LayerCollection.from_model(t.apply_fn, t.params, t.x[:1])
    B = PMatBlockDiag.from_pmat(PMatEye(lc, 2.0))
    with pytest.raises(KeyError, match="no layer"):
        B.get_block("nope")
    with pytest.raises(ValueError, match="one \\(d_l, d_l\\) block per layer"):
        PMatBlockDiag(B.layer_collection, B.blocks[:1])
    with pytest.raises(ValueError, match="valid methods"):
        B.solve(B.get_diag(), REGUL, method="default")
    with pytest.raises(TypeError, match="no build options"):
        FIM(t.apply_fn, t.params, t.x, PMatBlockDiag, damping=1.0)


@pytest.mark.parametrize("representation", [PMatBlockDiag, PMatDense])
def test_a_build_inside_a_jit_holds_one_block_product(representation):
    """A wide layer's Gram (2560 parameters: by ``4 × 4`` blocks of 640) is added block by
    block into the running total, and the total is mirrored and divided in place: a build
    compiled inside a ``jit`` (8 chunks) plans scratch for about one block product besides
    its result, where the unrolled block products (twenty a scan iteration) and a second
    copy of the matrix took 2.2× the result. The numbers are the reference's."""
    from jaxgeom.pmat import _gram

    key = jax.random.PRNGKey(3)
    params = {"w1": jax.random.normal(key, (40, 64)) / 8, "w2": jax.random.normal(key, (64, 3))}
    assert params["w1"].size >= _gram.SYMMETRIC_FROM  # the wide layer's Gram by blocks

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"]) @ p["w2"]

    x = jax.random.normal(jax.random.PRNGKey(4), (48, 40))
    build = jax.jit(lambda p, x: FIM(apply_fn, p, x, representation, batch_size=6))
    memory = build.lower(params, x).compile().memory_analysis()
    block_product = (params["w1"].size // _gram.BLOCKS) ** 2 * 8
    assert memory.temp_size_in_bytes <= 1.5 * block_product
    assert memory.temp_size_in_bytes <= 0.1 * memory.output_size_in_bytes

    F = build(params, x)
    dense = np.asarray(reference_fisher(apply_fn, params, x))
    mask = block_mask(F.layer_collection) if representation is PMatBlockDiag else 1
    np.testing.assert_allclose(np.asarray(F.to_dense()), dense * mask, **TOL)
