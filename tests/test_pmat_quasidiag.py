"""PMatQuasiDiag: stored entries equal the exact ones (brute force, float64) and the rest is
zero; operations, the closed-form solve and inverse against ``to_dense()``; jit, chunks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import (
    MORE_TASKS,
    make_linen_cnn,
    make_linen_embed,
    make_linen_layernorm,
    make_linen_mlp,
)
from pmat_checks import (
    REGUL,
    TOL,
    check_combinations,
    check_eigsh,
    check_eigsh_without_dense,
    check_products,
    check_pytree,
    check_solve,
)
from pmat_checks import reference as reference_fisher

from jaxgeom import FIM, PMatDense, PMatDiag
from jaxgeom.pmat.quasidiag import PMatQuasiDiag


def structure(Q) -> np.ndarray:
    """The ``(d, d)`` mask of the stored entries: the diagonal and each neuron's
    weight–bias strip."""
    mask = np.eye(Q.layer_collection.numel(), dtype=bool)
    for idx in Q._indices:
        mask[idx[:, :-1], idx[:, -1:]] = mask[idx[:, -1:], idx[:, :-1]] = True
    return mask


@pytest.fixture(scope="module", params=[make_linen_layernorm, make_linen_cnn, make_linen_embed])
def case(request):
    t = request.param()
    Q = FIM(t.apply_fn, t.params, t.x, PMatQuasiDiag, batch_size=4)
    return t, Q, np.asarray(Q.to_dense())


def test_entries_are_exact(case):
    t, Q, dense = case
    exact = reference_fisher(t)
    mask = structure(Q)
    assert mask.sum() > len(dense) or not Q.specs  # strips present for layers with bias
    np.testing.assert_allclose(dense[mask], exact[mask], rtol=1e-8, atol=1e-12)
    assert not dense[~mask].any()
    np.testing.assert_allclose(dense, dense.T, **TOL)



@pytest.mark.parametrize("make", list(MORE_TASKS.values()), ids=list(MORE_TASKS))
def test_entries_are_exact_more_layers(make):
    """Flipped transposed-convolution kernels, attention projections (kernels ``(in, heads,
    head_dim)``), NNX/Equinox convolutions and a layer reused across scan steps: the stored
    entries are the exact ones, built in chunks of 3 that do not divide the 4 examples."""
    t = make()
    Q = FIM(t.apply_fn, t.params, t.x, PMatQuasiDiag, batch_size=3)
    dense, exact = np.asarray(Q.to_dense()), reference_fisher(t)
    mask = structure(Q)
    np.testing.assert_allclose(dense[mask], exact[mask], rtol=1e-8, atol=1e-12)
    assert not dense[~mask].any()

@jax.jit
def _functions(Q):
    inv = Q.inv(REGUL)
    reps = {"inv": inv, "inv_inv": inv.inv(), "scaled": 1.23 * Q, "negated": -Q,
            "inv_scaled": inv / 2, "sum": Q + 2 * Q}
    return dict(dense={k: x.to_dense() for k, x in reps.items()}, reps=reps,
                eig=Q.eigvalsh(), eig_inv=inv.eigvalsh(), norm2=Q.norm(2), norm_2=Q.norm(-2),
                inv_diag=inv.get_diag(), inv_trace=inv.trace(), inv_fro=inv.frobenius_norm(),
                inv_mv=inv.mv(_vector(Q)), inv_vTMv=inv.vTMv(_vector(Q)),
                inv_solve=inv.solve(_vector(Q), REGUL))


def _vector(Q):
    return jnp.sin(jnp.arange(Q.layer_collection.numel(), dtype=Q.diag.dtype))


def test_operations(case):
    t, Q, dense = case
    check_products(Q, dense, t.params)
    check_solve(Q, dense, t.params)  # "default" (per-neuron Schur complement) and "cg"
    check_pytree(Q)
    out = _functions(Q)
    assert all(type(x) is PMatQuasiDiag for x in out["reps"].values())
    got = out["dense"]
    d = len(dense)
    inv = np.linalg.inv(dense + REGUL * np.eye(d))
    np.testing.assert_allclose(got["inv"], inv, rtol=1e-7, atol=1e-9 * np.abs(inv).max())
    np.testing.assert_allclose(got["inv_inv"], dense + REGUL * np.eye(d), rtol=1e-6, atol=1e-9)
    for key, want in [("scaled", 1.23 * dense), ("negated", -dense), ("sum", 3 * dense),
                      ("inv_scaled", got["inv"] / 2)]:
        np.testing.assert_allclose(got[key], want, **TOL, err_msg=key)
    eig = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(out["eig"], eig, atol=1e-10)
    np.testing.assert_allclose(out["eig_inv"], np.linalg.eigvalsh(got["inv"]), rtol=1e-8)
    np.testing.assert_allclose([out["norm2"], out["norm_2"]], [eig.max(), np.abs(eig).min()],
                               rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(out["inv_diag"], np.diag(got["inv"]), rtol=1e-8)
    np.testing.assert_allclose(out["inv_trace"], np.trace(got["inv"]), rtol=1e-8)
    np.testing.assert_allclose(out["inv_fro"], np.linalg.norm(got["inv"]), rtol=1e-8)
    v = np.asarray(_vector(Q))  # products of an inverse (ρ ≠ 0)
    np.testing.assert_allclose(out["inv_mv"], got["inv"] @ v, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(out["inv_vTMv"], v @ got["inv"] @ v, rtol=1e-8)
    np.testing.assert_allclose(out["inv_solve"],  # the closed-form solve with ρ ≠ 0
                               np.linalg.solve(got["inv"] + REGUL * np.eye(d), v), rtol=1e-7)


def _ks(d):
    """``k`` = 1, a few (several neurons and lone entries) and all ``d``."""
    return sorted({1, min(7, d), d})


def test_eigsh_per_neuron(case):
    """``k`` eigenpairs from the per-neuron ``eigh`` and the lone diagonal entries (none in
    the CNN: every parameter in a neuron block), for every ``which`` and ``k`` up to
    ``d``, against ``numpy.linalg.eigh`` of ``to_dense()`` — also of an inverse (``ρ ≠
    0``: a rank-one weight–weight term per neuron; its ``k`` chosen as ``Q``'s, so a few
    and all) — without any ``d × d`` value."""
    t, Q, dense = case
    assert Q.specs
    check_eigsh(Q, dense, jitted=False)  # eager; every which compiled below
    check_eigsh_without_dense(Q, dense, _ks(len(dense)))
    inv = Q.inv(1e-2)
    assert any(r is not None for r in inv.rho)
    check_eigsh_without_dense(inv, np.asarray(inv.to_dense()), _ks(len(dense))[1:])


def test_layers_of_one_input_width_are_bisected_together():
    """A transformer block's dense layers of one input width (queries, keys, values, the
    MLP's second layer) are one stack of neuron blocks for the bisection (one loop
    compiled, not one a layer): the spectrum and the top pairs of the dense matrix's, also
    of an inverse (``ρ ≠ 0``)."""
    t = MORE_TASKS["linen_transformer"]()
    Q = FIM(t.apply_fn, t.params, t.x, PMatQuasiDiag)
    widths = [D.shape[1] for D, _, _, _ in Q._neurons()]
    assert len(set(widths)) < len(widths)  # some layers share their width
    for M in (Q, Q.inv(1e-2)):
        dense = np.asarray(M.to_dense())
        np.testing.assert_allclose(M.eigvalsh(), np.linalg.eigvalsh(dense),
                                   atol=1e-10 * np.abs(dense).max())
    check_eigsh_without_dense(Q, np.asarray(Q.to_dense()), [7])


def test_eigsh_without_neurons():
    """A QuasiDiag without neuron blocks (restricted to a LayerNorm): its diagonal's
    entries and canonical vectors."""
    t = make_linen_layernorm()
    Q = FIM(t.apply_fn, t.params, t.x, PMatQuasiDiag).restrict("LayerNorm_0")
    assert not Q.specs
    check_eigsh_without_dense(Q, np.asarray(Q.to_dense()), _ks(Q.size(0)))


def test_promotions_and_unsupported(case):
    t, Q, dense = case
    inv = Q.inv(REGUL)
    i = np.asarray(inv.to_dense())
    diag = PMatDiag(Q.layer_collection, np.diag(dense))
    check_combinations([
        (Q, inv, dense, i, (PMatDense, PMatDense)),  # a sum of two ρ terms leaves the family
        (Q, diag, dense, np.diag(np.diag(dense)), (PMatDense, PMatDense)),
    ])
    with pytest.raises(NotImplementedError, match="PMatQuasiDiag does not support pow"):
        Q.pow(0.5)
    with pytest.raises(NotImplementedError, match="pinv"):
        Q.pinv()


def test_chunks_and_jit():
    t = make_linen_layernorm(n=7)
    ref = FIM(t.apply_fn, t.params, t.x, PMatQuasiDiag).to_dense()
    jitted = jax.jit(lambda p, x: FIM(t.apply_fn, p, x, PMatQuasiDiag, batch_size=3))(
        t.params, t.x).to_dense()
    np.testing.assert_allclose(jitted, ref, **TOL)


def test_an_indefinite_quasi_diagonal_is_computed_as_it_is():
    """On 3 examples the MLP's arrow blocks have negative Schur complements ``β − cᵀD⁻¹c``
    (each ``E[g²aᵢ]²/E[g²aᵢ²] ≤ β``, their sum up to ``a β``): the matrix is indefinite.
    Its spectrum, ``slogdet`` (sign −1), ``logdet`` (NaN) and solves below ``|λ_min|`` are
    those of the dense matrix, not of a PSD one; MINRES solves it too."""
    t = make_linen_mlp(n=3)
    Q = FIM(t.apply_fn, t.params, t.x, PMatQuasiDiag)
    dense = np.asarray(Q.to_dense())
    d = len(dense)
    eig = np.linalg.eigvalsh(dense)
    negative = int((eig < 0).sum())
    assert negative > 0
    schur = [np.asarray(beta - np.einsum("...i,...i->...", c, c / D))
             for D, beta, c, _ in Q._neurons()]
    assert sum(int((s < 0).sum()) for s in schur) == negative  # one per negative block
    np.testing.assert_allclose(Q.eigvalsh(), eig, atol=1e-12)
    regul = -(eig[0] + eig[1]) / 2  # one eigenvalue of M + regul·I below 0
    sign, logabsdet = np.linalg.slogdet(dense + regul * np.eye(d))
    assert sign == -1
    np.testing.assert_allclose(Q.slogdet(regul), (sign, logabsdet), rtol=1e-10)
    assert np.isnan(Q.logdet(regul))
    v = _vector(Q)
    want = np.linalg.solve(dense + regul * np.eye(d), np.asarray(v))
    np.testing.assert_allclose(Q.solve(v, regul), want, rtol=1e-8)
    np.testing.assert_allclose(Q.solve(v, regul, method="minres", rtol=1e-12), want,
                               rtol=1e-7)
