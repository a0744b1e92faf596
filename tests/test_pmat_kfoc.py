"""PMatKFOC: the alternating passes converge to the Frobenius-optimal Kronecker product of
each exact layer block (the top singular pair of its Van Loan rearrangement, brute force
in float64), never further from it than KFAC, exact where the block is a Kronecker product;
every operation against ``to_dense()``; chunking, Monte Carlo, refusals."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from models import (
    MORE_TASKS,
    make_linen_cnn,
    make_linen_embed,
    make_linen_layernorm,
    make_linen_mlp,
)
from pmat_checks import TOL, check_all, check_pytree, check_solve, reference

from jaxgeom import FIM, FIM_MonteCarlo, PMatEKFAC, PMatKFAC, PMatKFOC, PMatMixed
from jaxgeom.pmat.blockdiag import PMatBlockDiag


def layer_blocks(M, dense):
    """Per Kronecker layer, the ``(g·a, g·a)`` block of ``dense`` in the layer-matrix order
    ``(output, input [, bias])`` of ``kronecker_block``."""
    return [np.asarray(dense)[np.ix_(idx, idx)] for idx in M._parts.kron_flat]


def nearest_kronecker_error(block, g, a):
    """``min ‖B − G ⊗ A‖_F`` by the SVD of the rearrangement ``R(B)[(i,k),(j,l)] =
    B[(i,j),(k,l)]`` (Van Loan & Pitsianis): ``√(‖B‖² − σ₁²)``."""
    rearranged = block.reshape(g, a, g, a).transpose(0, 2, 1, 3).reshape(g * g, a * a)
    top = np.linalg.svd(rearranged, compute_uv=False)[0]
    return np.sqrt(max(np.sum(block**2) - top**2, 0.0))


def errors(M, exact):
    return [np.linalg.norm(np.asarray(M.kronecker_block(spec.layer_id)) - block)
            for spec, block in zip(M.specs, layer_blocks(M, exact))]


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn],
                         ids=lambda make: make.__name__)
def test_converges_to_the_nearest_kronecker_product(make):
    """Dense layers (T = 1) and strided convolutions (T > 1): the error to the exact block
    never grows from KFAC's (0 iterations) and reaches the SVD optimum; the factors stay
    positive semi-definite."""
    t = make()
    exact = reference(t)
    kfac = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    start = FIM(t.apply_fn, t.params, t.x, PMatKFOC, iterations=0)
    np.testing.assert_allclose(start.to_dense(), kfac.to_dense(), **TOL)
    history = [errors(start, exact)]
    for iterations in (1, 2, 4, 30):
        history.append(errors(FIM(t.apply_fn, t.params, t.x, PMatKFOC,
                                  iterations=iterations), exact))
    assert np.all(np.diff(np.asarray(history), axis=0) <= 1e-12)
    F = FIM(t.apply_fn, t.params, t.x, PMatKFOC, iterations=30)
    optimum = [nearest_kronecker_error(block, spec.out_features,
                                       spec.in_features + (spec.bias is not None))
               for spec, block in zip(F.specs, layer_blocks(F, exact))]
    np.testing.assert_allclose(history[-1], optimum, rtol=1e-6)
    assert np.all(np.asarray(history[0]) > np.asarray(optimum) + 1e-4)  # KFAC was not it
    for spec in F.specs:
        A, G = F.kronecker_factors(spec.layer_id)
        assert np.linalg.eigvalsh(A).min() > -1e-12 * np.abs(A).max()
        assert np.linalg.eigvalsh(G).min() > -1e-12 * np.abs(G).max()


@pytest.mark.parametrize("name", sorted(MORE_TASKS))
def test_reaches_the_optimum_on_every_kind_of_layer(name):
    """Transposed convolutions (flipped kernels), a transformer block's projections and
    attention heads over a sequence, NNX and Equinox convolutions, a kernel read at every
    step of a reverse scan: each Kronecker layer's error is its SVD optimum's."""
    t = MORE_TASKS[name]()
    exact = reference(t)
    F = FIM(t.apply_fn, t.params, t.x, PMatKFOC, iterations=40)
    optimum = [nearest_kronecker_error(block, spec.out_features,
                                       spec.in_features + (spec.bias is not None))
               for spec, block in zip(F.specs, layer_blocks(F, exact))]
    scale = max(np.linalg.norm(block) for block in layer_blocks(F, exact))
    # √(‖B‖² − σ₁²) of an exact Kronecker product is round-off: √ε ‖B‖
    np.testing.assert_allclose(errors(F, exact), optimum, rtol=1e-6, atol=1e-7 * scale)


def test_exact_where_the_block_is_a_kronecker_product():
    """One example and one sampled output: ``B = aaᵀ ⊗ ggᵀ`` itself."""
    t = make_linen_mlp(n=1)
    kw = dict(key=jax.random.PRNGKey(0), trials=1)
    F = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatKFOC, **kw)
    exact = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatBlockDiag, **kw)
    np.testing.assert_allclose(F.to_dense(), exact.to_dense(), **TOL)


def test_operations_chunking_and_an_ekfac_of_its_bases():
    """A dense layer, a LayerNorm (its exact block) and another dense layer: every operation
    against the dense matrix; the same matrix from chunks; EKFAC on its eigenbases is the
    same matrix before a refit."""
    t = make_linen_layernorm()
    F = FIM(t.apply_fn, t.params, t.x, PMatKFOC)
    dense = np.asarray(F.to_dense())
    check_all(F, dense, t.params)
    check_solve(F, dense, t.params)
    check_pytree(F)
    assert isinstance(F.inv(1e-2), PMatKFOC)
    chunked = FIM(t.apply_fn, t.params, t.x, PMatKFOC, batch_size=4)
    np.testing.assert_allclose(chunked.to_dense(), dense, **TOL)
    exact_blocks = FIM(t.apply_fn, t.params, t.x, PMatBlockDiag)
    norm_layer = next(layer for layer in F.layer_collection.layers
                      if layer.id not in {spec.layer_id for spec in F.specs})
    np.testing.assert_allclose(F.get_block(norm_layer), exact_blocks.get_block(norm_layer),
                               **TOL)
    np.testing.assert_allclose(PMatEKFAC.from_kfac(F).to_dense(), dense, **TOL)


def test_an_embedding_keeps_a_diagonal_input_factor_at_its_optimum():
    """An embedding over a sequence of token ids: ``A`` stays diagonal, and the alternating
    steps converge to the best such pair — the fixed point of both least-squares steps on
    the brute-force block ``B`` (``(g, V)`` layer-matrix order): ``G = Σ_j B[(·,j),(·,j)]
    a_j / ‖a‖²`` and ``a_j = ⟨B[(·,j),(·,j)], G⟩ / ‖G‖²``; the error never grows from
    KFAC's; the dense layer after it reaches its SVD optimum."""
    t = make_linen_embed()
    exact = reference(t)
    history = [errors(FIM(t.apply_fn, t.params, t.x, PMatKFOC, iterations=i), exact)
               for i in (0, 1, 2, 40)]
    assert np.all(np.diff(np.asarray(history), axis=0) <= 1e-12)
    F = FIM(t.apply_fn, t.params, t.x, PMatKFOC, iterations=40)
    blocks = dict(zip([spec.layer_id for spec in F.specs], layer_blocks(F, exact)))
    a, G = (np.asarray(x) for x in F.kronecker_factors("Embed_0"))
    assert a.ndim == 1 and np.all(a >= 0)
    g, v = G.shape[0], a.shape[0]
    diagonal = np.einsum("ijkj->jik", blocks["Embed_0"].reshape(g, v, g, v))  # (V, g, g)
    np.testing.assert_allclose(G, np.einsum("jik,j->ik", diagonal, a) / np.sum(a**2),
                               rtol=1e-8, atol=1e-14)
    np.testing.assert_allclose(a, np.einsum("jik,ik->j", diagonal, G) / np.sum(G**2),
                               rtol=1e-8, atol=1e-14)
    spec = F.specs[[s.layer_id for s in F.specs].index("Dense_0")]
    np.testing.assert_allclose(history[-1][[s.layer_id for s in F.specs].index("Dense_0")],
                               nearest_kronecker_error(blocks["Dense_0"], spec.out_features,
                                                       spec.in_features + 1), rtol=1e-6)


def test_refusals_and_a_mixed_part():
    t = make_linen_mlp()
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="iterations must be an integer >= 0"):
            FIM(t.apply_fn, t.params, t.x, PMatKFOC, iterations=bad)
    with pytest.raises(TypeError, match="kfac_approx"):
        FIM(t.apply_fn, t.params, t.x, PMatKFOC, kfac_approx="reduce")
    t = make_linen_embed()  # a KFOC part beside a KFAC part: the part's factors its own
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"embedding": PMatKFAC},
            default=PMatKFOC, options={PMatKFOC: {"iterations": 30}})
    part = M.part("Dense_0")
    assert isinstance(part, PMatKFOC) and isinstance(M.part("Embed_0"), PMatKFAC)
    whole = FIM(t.apply_fn, t.params, t.x, PMatKFAC)  # the layer-matrix order of Dense_0
    i = [spec.layer_id for spec in whole.specs].index("Dense_0")
    spec, idx = whole.specs[i], whole._parts.kron_flat[i]
    block = np.asarray(reference(t))[np.ix_(idx, idx)]
    error = np.linalg.norm(np.asarray(part.kronecker_block("Dense_0")) - block)
    np.testing.assert_allclose(error, nearest_kronecker_error(block, spec.out_features,
                                                              spec.in_features + 1), rtol=1e-6)


def test_inside_jit_and_from_a_one_shot_iterator():
    """Its passes run under ``jit`` (the build traced once, every pass inside), and over a
    one-shot iterator of batches (kept for the later passes): the same matrix."""
    t = make_linen_mlp()
    eager = np.asarray(FIM(t.apply_fn, t.params, t.x, PMatKFOC).to_dense())
    jitted = jax.jit(lambda p: FIM(t.apply_fn, p, t.x, PMatKFOC).to_dense())(t.params)
    np.testing.assert_allclose(jitted, eager, **TOL)
    batches = iter([(t.x[:3],), (t.x[3:],)])
    np.testing.assert_allclose(FIM(t.apply_fn, t.params, batches, PMatKFOC).to_dense(), eager,
                               **TOL)


def test_exact_solve_differentiates_through_a_factor_with_a_repeated_eigenvalue():
    """A regression Fisher's last-layer KFOC factor ``G`` is ``c·I``: ``eigh``'s derivative
    divides by its eigenvalue gaps (0), and the gradient of an exact-damped solve through the
    build was NaN. Differentiated as a linear solve, it is the central difference's."""
    from jax.flatten_util import ravel_pytree

    t = make_linen_mlp()
    flat, unravel = ravel_pytree(t.params)
    rng = np.random.default_rng(0)
    v, w, u = (jax.numpy.asarray(rng.normal(size=flat.size)) for _ in range(3))
    last = FIM(t.apply_fn, t.params, t.x, PMatKFOC, variant="regression").factors[-1]
    np.testing.assert_allclose(np.linalg.eigvalsh(last.G), last.G[0, 0], rtol=1e-12)

    @jax.jit
    def f(q):
        F = FIM(t.apply_fn, unravel(q), t.x, PMatKFOC, variant="regression")
        return F.solve(v, 0.1) @ w

    h = 1e-6
    central = (f(flat + h * u) - f(flat - h * u)) / (2 * h)
    np.testing.assert_allclose(jax.jvp(f, (flat,), (u,))[1], central, rtol=1e-6)
    np.testing.assert_allclose(jax.grad(f)(flat) @ u, central, rtol=1e-6)
