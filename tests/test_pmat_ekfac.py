"""PMatEKFAC / PMatEKFACBlockDiag: equal to KFAC before the refit, the refitted diagonal is
exactly the diagonal of the exact layer block in KFAC's eigenbasis (brute force, float64),
never further from the exact block than KFAC, every operation against ``to_dense()``,
refit with new params/data, jit and chunking."""

from __future__ import annotations

import dataclasses

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
    make_linen_narrow_mlp,
    make_linen_wide_hidden,
    make_linen_wide_mlp,
    make_plain_mlp,
)
from pmat_checks import (
    TOL,
    block_mask,
    check_all,
    check_combinations,
    check_eigsh,
    check_pytree,
    check_solve,
    flat,
    reference,
    vec,
)

from jaxgeom import FIM, FIM_MonteCarlo, PMatDense, PMatKFAC, SecondMoment
from jaxgeom.pmat import _spectral, kfac
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.ekfac import PMatEKFAC, PMatEKFACBlockDiag
from jaxgeom.pmat.kfac import Kron, KronEigen, factor_rank_bounds
from jaxgeom.restriction import restrict

KEY = jax.random.PRNGKey(0)


def exact_kfe_diagonals(E, exact):
    """Per Kronecker layer, ``diag(Qᵀ B Q)`` for the exact block ``B`` (layer-matrix order)
    and ``Q = Q_G ⊗ Q_A``."""
    out = []
    for i, spec in enumerate(E.specs):
        idx = E._parts.kron_flat[i]
        qa, qg, d = (np.asarray(x) if x is not None else None for x in E.eigenbasis(spec.layer_id))
        qa = np.eye(d.shape[1]) if qa is None else qa
        q = np.kron(qg, qa)
        out.append(np.diag(q.T @ exact[np.ix_(idx, idx)] @ q).reshape(d.shape))
    return out


@pytest.mark.parametrize("make", [make_linen_layernorm, make_linen_embed, make_linen_cnn,
                                  *MORE_TASKS.values()], ids=lambda make: make.__name__)
def test_refit_is_the_exact_diagonal_in_the_eigenbasis(make):
    """T = 1 (dense), T > 1 (embedding over a sequence, strided conv with bias, transposed
    convs with flipped kernels, a transformer block, NNX and Equinox convs, a reverse
    scan): KFAC's eigenbasis rotates the float64 brute-force block exactly."""
    t = make()
    exact = reference(t)
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    before = PMatEKFAC.from_kfac(K)  # what FIM(..., PMatEKFAC, refit=False) returns
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, basis=before, batch_size=4)
    np.testing.assert_allclose(before.to_dense(), K.to_dense(), **TOL)  # EKFAC == KFAC
    for i, want in enumerate(exact_kfe_diagonals(E, exact)):
        np.testing.assert_allclose(E.factors[i].d, want, rtol=1e-8, atol=1e-12)
    blocks = np.where(block_mask(E.layer_collection), exact, 0)
    err_e = np.linalg.norm(E.to_dense() - blocks)
    err_k = np.linalg.norm(K.to_dense() - blocks)
    assert err_e <= err_k + 1e-12
    for spec in E.specs:  # also per layer
        b = E.layer_collection.layer_indices(spec.layer_id)
        e_l = np.linalg.norm(E.get_block(spec.layer_id) - exact[np.ix_(b, b)])
        k_l = np.linalg.norm(K.get_block(spec.layer_id) - exact[np.ix_(b, b)])
        assert e_l <= k_l + 1e-12


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("make", [make_linen_cnn, make_linen_embed],
                         ids=lambda make: make.__name__)
def test_own_refit_is_the_exact_diagonal_for_both_approximations(make, kfac_approx):
    """The build's own refit (on the factors' ranges where the per-example gradients lie in
    them) is ``diag(Qᵀ B Q)``: with ``"reduce"`` the factors of a layer applied at ``T > 1``
    positions are Grams of the positions' means and sums, whose ranges do not hold the
    positions' own inputs and output gradients, so it refits on the whole bases."""
    t = make()
    exact = reference(t)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, kfac_approx=kfac_approx, batch_size=4)
    for i, want in enumerate(exact_kfe_diagonals(E, exact)):
        np.testing.assert_allclose(E.factors[i].d, want, rtol=1e-8, atol=1e-12)


def test_a_factor_of_few_rows_is_factorised_on_its_range(monkeypatch):
    """A 151-input dense layer seen on 6 examples: its input factor has rank ≤ 6, and
    EKFAC's build factorises it through its range (:func:`factor_rank_bounds`). Before
    the refit its eigenvalues on the complement are exactly 0 (LAPACK's ``eigh`` gives
    round-off there); the refit is the exact diagonal in that basis, and the matrix is the
    one built on LAPACK's full ``eigh`` (the basis of the null space, where the refit is 0,
    does not matter). A KFAC build carries the same bounds as hints, checked when used."""
    t = make_linen_wide_mlp()
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    assert [(n.rank_bounds, n.bounds_checked) for n in K.factors] == [
        ((24, None), True), ((None, None), True)]
    seen = []  # (examples, bounds) per build

    def spy(plan, approx, n, **options):
        seen.append((n, factor_rank_bounds(plan, approx, n, **options)))
        return seen[-1][1]

    monkeypatch.setattr(kfac, "factor_rank_bounds", spy)
    unfitted = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, refit=False)
    assert seen == [(6, [(24, None), (None, None)])]  # A: 6 rows; the others: full rank
    FIM(t.apply_fn, t.params, t.x[:5], PMatEKFAC, refit=False, batch_size=2)
    assert seen[-1][0] == 6  # the padded last chunk's rows count: the same bounds
    d = np.asarray(unfitted.factors[0].d)  # (g, a) = (6, 151), A of rank ≤ 6: sketch of 32
    assert np.all(d[:, :151 - 32] == 0)
    np.testing.assert_allclose(unfitted.to_dense(), K.to_dense(), **TOL)

    exact = reference(t)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC)
    for i, want in enumerate(exact_kfe_diagonals(E, exact)):
        np.testing.assert_allclose(E.factors[i].d, want, rtol=1e-8, atol=1e-12)
    unbounded = dataclasses.replace(K, factors=tuple(
        dataclasses.replace(n, rank_bounds=(None, None)) for n in K.factors))
    on_full_eigh = FIM(t.apply_fn, t.params, t.x, PMatEKFAC,
                       basis=PMatEKFAC.from_kfac(unbounded))
    scale = np.linalg.norm(np.asarray(K.to_dense()), 2)
    np.testing.assert_allclose(E.to_dense(), on_full_eigh.to_dense(), atol=1e-12 * scale)


@pytest.mark.parametrize("make", [make_linen_cnn, make_linen_narrow_mlp],
                         ids=lambda make: make.__name__)
def test_separate_weight_and_bias_refits_the_exact_diagonal(make):
    """With ``separate_weight_and_bias`` the input factor is the kernel's Gram beside the
    bias's ``1``: one rank more than the joint factor's Gram of ``N`` rows. A 40-input layer
    seen on 6 examples has a factor of rank 7, factorised on a range of that width (no
    sketch at this order): a bound of the joint 6 would drop a direction the per-example
    gradients lie in. EKFAC before its refit is the separated KFAC; the refit is
    ``diag(Qᵀ B Q)`` for the exact block ``B``."""
    t = make()
    exact = reference(t)
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC, separate_weight_and_bias=True)
    unfitted = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, refit=False,
                   separate_weight_and_bias=True)
    np.testing.assert_allclose(unfitted.to_dense(), K.to_dense(), **TOL)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, separate_weight_and_bias=True, batch_size=4)
    for i, want in enumerate(exact_kfe_diagonals(E, exact)):
        np.testing.assert_allclose(E.factors[i].d, want, rtol=1e-8, atol=1e-12)


def test_kfac_eigendecompositions_check_their_rank_hints():
    """A KFAC build's bounds are hints: its exact-damped functions go through the sketch of
    each low-rank factor's range, and a factor the hint does not fit (full rank, as an
    average of builds could be) falls back to the full ``eigh`` — where a promised bound
    would give another matrix."""
    t = make_linen_wide_mlp()
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    dense, v, r = np.asarray(K.to_dense()), vec(t.params), 1e-3
    shifted = dense + r * np.eye(len(dense))
    np.testing.assert_allclose(flat(K.solve(v, r)), np.linalg.solve(shifted, flat(v)), **TOL)
    np.testing.assert_allclose(K.inv(r).to_dense(), np.linalg.inv(shifted), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(K.eigvalsh(), np.linalg.eigvalsh(dense), atol=1e-10)
    a = K.factors[0].A  # 151², rank ≤ 6: the sketch of 32 columns finds the whole range
    assert bool(_spectral._eigh_on_range(a, 32)[2])

    k1, k2 = jax.random.split(KEY)
    x = np.asarray(jax.random.normal(k1, (200, 130)))  # rank 130: the hint 24 is wrong
    y = np.asarray(jax.random.normal(k2, (9, 4)))
    a, g, want = x.T @ x, y.T @ y, np.kron(y.T @ y, x.T @ x)
    hinted = Kron(jax.numpy.asarray(a), jax.numpy.asarray(g), rank_bounds=(24, None),
                  bounds_checked=True)
    np.testing.assert_allclose(hinted.eigen().dense(), want, rtol=1e-9, atol=1e-9)
    promised = dataclasses.replace(hinted, bounds_checked=False)
    assert not np.allclose(promised.eigen().dense(), want, rtol=1e-3)


def test_kron_eigen_on_the_range_of_a_low_rank_factor():
    """``Kron(A, G, rank_bounds=(r, None)).eigen()`` for ``A`` of rank ``r``: the same block
    (``(Q_A ⊗ Q_G) diag(d) (Q_A ⊗ Q_G)ᵀ = A ⊗ G``), orthonormal bases, exactly zero
    eigenvalues on ``A``'s null space."""
    k1, k2 = jax.random.split(KEY)
    x = np.asarray(jax.random.normal(k1, (5, 130)))
    y = np.asarray(jax.random.normal(k2, (9, 4)))
    node = Kron(jax.numpy.asarray(x.T @ x), jax.numpy.asarray(y.T @ y), rank_bounds=(5, None))
    assert node.eigh_orders == (4, 32)
    eigen = node.eigen()
    qa = np.asarray(eigen.qa)
    np.testing.assert_allclose(qa.T @ qa, np.eye(130), atol=1e-12)
    np.testing.assert_allclose(np.asarray(eigen.dense()), np.kron(y.T @ y, x.T @ x),
                               atol=1e-10)
    assert np.all(np.asarray(eigen.d)[:, :130 - 32] == 0)


@pytest.mark.parametrize("fisher", ["exact", "monte_carlo"])
def test_products_rotate_by_the_range_columns_only(fisher):
    """A build keeps which basis columns span each low-rank factor's range (``A`` of both
    layers from 6 rows, ``G`` of the 130-unit layer from ``6 K``), and its refit is 0 off
    them. Every product of the build and of its functions (whose value
    off the ranges is ``f(0)``: ``1/λ`` for a damped inverse) through those columns equals
    the same matrix's on the whole bases (checked on the exact Fisher's build: the
    products do not depend on how ``d`` was found); a refit on the whole bases (the same
    draws for the Monte-Carlo Fisher) finds nothing off the ranges."""
    t = make_linen_wide_hidden()
    if fisher == "exact":
        E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC)
        refit = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, basis=E)
    else:
        key = jax.random.PRNGKey(3)
        E = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatEKFAC, key=key)
        refit = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatEKFAC, key=key, basis=E)
    # A: a sketch's 32 columns (131 inputs, 6 rows), or the bound itself (9 inputs, 6 rows:
    # a full eigh); G: a sketch's 32 (130 outputs, 6 K rows)
    assert [n.ranges for n in E.factors] == [(6, 32), (32, None)]
    assert [n.ranges for n in refit.factors] == [(None, None)] * 2  # new data: whole bases
    full = E.without_rank_bounds()
    assert [n.ranges for n in full.factors] == [(None, None)] * 2
    for node, whole in zip(E.factors, refit.factors):
        (rows, cols), (range_a, range_g) = node.d.shape, node.ranges
        off_range = np.ones((rows, cols), bool)
        off_range[-(range_g or rows):, -(range_a or cols):] = False
        np.testing.assert_array_equal(np.asarray(node.d)[off_range], 0)
        np.testing.assert_allclose(node.d, whole.d, rtol=1e-7, atol=1e-14 * np.abs(whole.d).max())

    r = 1e-2
    inv = E.inv(r)
    if fisher == "monte_carlo":  # eigsh of a damped inverse: constant 1/λ off the ranges
        check_eigsh(inv, np.linalg.inv(np.asarray(E.to_dense()) + r * np.eye(E.size(0))))
        return
    v, half = vec(t.params), E.pow(0.5)
    derived = {"E": E, "inv": inv, "half": half, "damped power": E.pow(-0.5, r),
               "pinv": E.pinv(rtol=1e-6), "scaled": -2.0 * E, "sum": E + inv,
               "product": E.mm(inv)}
    for name, M in derived.items():
        assert isinstance(M, PMatEKFAC) and [n.ranges for n in M.factors] == [
            n.ranges for n in E.factors], name
        dense = np.asarray(M.to_dense())  # through the whole bases and d
        np.testing.assert_allclose(flat(M.mv(v)), dense @ flat(v), **TOL, err_msg=name)
        np.testing.assert_allclose(M.vTMv(v), flat(v) @ dense @ flat(v), **TOL, err_msg=name)
        np.testing.assert_allclose(flat(M.get_diag()), np.diag(dense), **TOL, err_msg=name)
        np.testing.assert_allclose(flat(M.without_rank_bounds().mv(v)), dense @ flat(v), **TOL)
    assert not inv.factors[0].zero_off_range and not half.factors[0].zero_off_range
    assert E.factors[0].zero_off_range and derived["pinv"].factors[0].zero_off_range
    dense = np.asarray(E.to_dense())
    np.testing.assert_allclose(flat(E.solve(v, r)),
                               np.linalg.solve(dense + r * np.eye(len(dense)), flat(v)), **TOL)
    check_solve(E, dense, t.params)
    check_eigsh(E, dense)  # of the stored diagonal on range-factorised bases


@pytest.mark.parametrize("representation", [PMatKFAC, PMatEKFAC])
def test_builds_on_few_and_many_examples_in_one_cond(representation):
    """Builds on 6 and on 40 examples differ in their static hints (the factors' ranks are at
    most ``6 T`` and ``6 K T``): JAX refuses a ``lax.cond`` between them with its
    pytree-structure error, whose text (the hints' ``repr``) names the fix, and
    ``without_rank_bounds()`` gives both one structure, each branch its own matrix."""
    t = make_linen_wide_hidden()
    few = FIM(t.apply_fn, t.params, t.x[:6], representation)
    many = FIM(t.apply_fn, t.params, jax.numpy.concatenate([t.x] * 7)[:40], representation)
    v = vec(t.params)
    pick = jax.jit(lambda first, A, B: jax.lax.cond(first, lambda: A, lambda: B).mv(v))
    with pytest.raises((TypeError, ValueError), match=r"without_rank_bounds\(\)"):
        pick(True, few, many)
    few, many = few.without_rank_bounds(), many.without_rank_bounds()
    for first, M in ((True, few), (False, many)):
        np.testing.assert_allclose(flat(pick(first, few, many)),
                                   np.asarray(M.to_dense()) @ flat(v), **TOL)


# ----------------------------------------------------------------------------- operations
@pytest.fixture(scope="module", params=[make_linen_layernorm, make_linen_embed])
def case(request):
    t = request.param()
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC)
    return t, E, np.asarray(E.to_dense())


def test_operations(case):
    t, E, dense = case
    check_all(E, dense, t.params)  # every function stays an EKFAC (shared eigenbasis)
    check_pytree(E)
    check_eigsh(E, dense)  # the refitted diagonal's entries on the Kronecker eigenbasis
    third = E.pow(1 / 3).mm(E.pow(2 / 3))
    assert type(third) is PMatEKFAC
    np.testing.assert_allclose(third.to_dense(), dense, atol=1e-10)
    np.testing.assert_allclose(E.pow(-0.5, 1e-2).to_dense(), _dense_pow(dense, -0.5, 1e-2),
                               rtol=1e-7, atol=1e-9)
    layer = E.specs[0].layer_id  # no factors to give: the message names what there is
    with pytest.raises(ValueError, match=f"PMatEKFAC stores layer '{layer}'.*kronecker_block"):
        E.kronecker_factors(layer)
    idx = E.layer_collection.layer_indices(E.layer_collection.layer(layer))
    block = dense[np.ix_(idx, idx)]
    order = np.argsort(E._parts.kron_flat[E._index(layer)])
    np.testing.assert_allclose(np.asarray(E.kronecker_block(layer))[np.ix_(order, order)],
                               block, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("g, a", [(3, 20), (20, 3), (5, 6)], ids=["wide", "tall", "square"])
def test_eigenbasis_block_products_in_both_orientations(g, a):
    """``M = (Q_G ⊗ Q_A) diag(d) (Q_G ⊗ Q_A)ᵀ`` on ``vec(V)``, ``V`` ``(g, a)``, and the same
    block on ``Vᵀ`` (a kernel stored input-major): tall matrices are worked on through their
    transpose, and every shape gives the dense block's products."""
    k1, k2, k3, k4 = jax.random.split(KEY, 4)
    qa = np.linalg.qr(np.asarray(jax.random.normal(k1, (a, a))))[0]
    qg = np.linalg.qr(np.asarray(jax.random.normal(k2, (g, g))))[0]
    d = np.asarray(jax.random.uniform(k3, (g, a)))
    v = np.asarray(jax.random.normal(k4, (g, a)))
    q = np.kron(qg, qa)
    dense = (q * d.ravel()) @ q.T
    node = KronEigen(qa, qg, d)
    for block, x, back in ((node, v, lambda y: y), (node.transposed(), v.T, lambda y: y.T)):
        np.testing.assert_allclose(back(block.mv(x)).ravel(), dense @ v.ravel(), rtol=1e-12)
        np.testing.assert_allclose(block.quadratic(x), v.ravel() @ dense @ v.ravel(),
                                   rtol=1e-12)


@pytest.mark.parametrize("ranges, zero_off_range, input_basis", [
    ((None, None), True, True), ((3, 2), True, True), ((3, 2), False, True),
    ((None, None), True, False), ((None, 2), False, False)])
def test_eigenbasis_block_dense(ranges, zero_off_range, input_basis):
    """``dense()`` (block row by block row, on the range columns plus ``c I``) is
    ``(Q_G ⊗ Q_A) diag(d) (Q_G ⊗ Q_A)ᵀ``, ``d`` constant (0, or ``c``) off the ranges;
    ``qa = None`` is the identity."""
    g, a = 5, 7
    k1, k2, k3 = jax.random.split(KEY, 3)
    qa = np.linalg.qr(np.asarray(jax.random.normal(k1, (a, a))))[0] if input_basis else None
    qg = np.linalg.qr(np.asarray(jax.random.normal(k2, (g, g))))[0]
    d = np.asarray(jax.random.uniform(k3, (g, a)))
    range_a, range_g = ranges
    on_range = np.zeros((g, a), bool)
    on_range[-(range_g or g):, -(range_a or a):] = True
    d = np.where(on_range, d, 0.0 if zero_off_range else 0.3)
    q = np.kron(qg, np.eye(a) if qa is None else qa)
    node = KronEigen(qa, qg, d, ranges, zero_off_range)
    np.testing.assert_allclose(node.dense(), (q * d.ravel()) @ q.T, rtol=1e-12, atol=1e-14)


def _dense_pow(dense, p, regul):
    evals, evecs = np.linalg.eigh(dense + regul * np.eye(len(dense)))
    return (evecs * np.maximum(evals, 0) ** p) @ evecs.T


def test_solve(case):
    t, E, dense = case
    check_solve(E, dense, t.params)


def test_an_undamped_solve_of_exact_zero_eigenvalues_is_refused_as_inv_is():
    """An EKFAC of fewer examples than a layer's inputs holds exact zeros off its factors'
    ranges: ``solve(v)`` without damping (``1/0`` there: NaN) is refused by name, as
    ``inv()`` is; damped, it solves; CG (an iterative solve) is not checked."""
    t = make_linen_mlp(n=2)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC)
    v = np.ones(E.size(0))
    with pytest.raises(ValueError, match=r"solve of a singular matrix: \d+ of its .* are 0.*"
                                         r"solve\(v, regul\).*pinv\(\).mv\(v\)"):
        E.solve(v)
    for zero in (np.float64(0.0), jnp.asarray(0.0)):  # a damping the optimizer made an array
        with pytest.raises(ValueError, match=r"solve of a singular matrix"):
            E.solve(v, zero)
    with pytest.raises(ValueError, match=(  # named as called, and where
            r"^inv of a singular matrix: \d+ of the \d+ eigenvalues of its Kronecker block of "
            r"layer '.+' \(\+ regul\) are 0.*inv\(regul\) with regul > 0.*M\.pinv\(\)$")):
        E.inv()
    with pytest.raises(ValueError, match=r"^pow\(-1\) of a singular matrix: .*pow\(p, regul\)"):
        E.pow(-1)
    dense = np.asarray(E.to_dense())
    np.testing.assert_allclose(E.solve(v, 0.1), np.linalg.solve(dense + 0.1 * np.eye(len(v)), v),
                               rtol=1e-8)


def test_sums_and_products(case):
    """On shared bases (recognised as the same arrays or equal concrete values) sums and
    products stay EKFACs; otherwise (other bases, or matrices entering ``jit`` as separate
    arguments, whose bases are distinct tracers) they are the exact layer blocks, a
    block-diagonal matrix (with a dense matrix: dense)."""
    t, E, dense = case
    other = FIM(t.apply_fn, t.params, t.x[:3], PMatEKFAC)  # other eigenbases
    o = np.asarray(other.to_dense())
    inv = E.inv(1e-2)
    i = np.asarray(inv.to_dense())
    for got, want in [(E + 2.0 * E, 3 * dense), (E - inv, dense - i), (E.mm(inv), dense @ i),
                      (inv @ E, i @ dense)]:
        assert type(got) is PMatEKFAC
        np.testing.assert_allclose(got.to_dense(), want, **TOL)
    check_combinations([
        (E, inv, dense, i, (PMatBlockDiag, PMatBlockDiag)),
        (E, other, dense, o, (PMatBlockDiag, PMatBlockDiag)),
        (E, PMatDense(E.layer_collection, dense), dense, dense, (PMatDense, PMatDense)),
    ])
    with pytest.raises(ValueError, match="Kronecker factors.*damping=.exact"):
        E.inv(1e-2, damping="pi")


# ----------------------------------------------------------------------------- building
def test_refit_new_params_and_data_is_pure():
    t = make_plain_mlp(n=7)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, refit=False)
    params = jax.tree_util.tree_map(lambda a: 1.1 * a, t.params)
    x = t.x[::-1] * 0.5
    F = E.refit(t.apply_fn, params, iter([x[:4], x[4:]]), batch_size=3)  # chunks, iterator
    assert type(F) is PMatEKFAC and F is not E
    moved = type(t)(t.name, t.apply_fn, params, x, t.y, t.num_outputs)
    for i, want in enumerate(exact_kfe_diagonals(F, reference(moved))):
        np.testing.assert_allclose(F.factors[i].qg, E.factors[i].qg)  # same bases
        np.testing.assert_allclose(F.factors[i].d, want, rtol=1e-8, atol=1e-12)
    jitted = jax.jit(lambda M, p, x: M.refit(t.apply_fn, p, x))(E, params, x)
    np.testing.assert_allclose(jitted.to_dense(), F.to_dense(), **TOL)
    mc = E.refit(t.apply_fn, params, x, key=KEY, trials=2)  # FIM_MonteCarlo
    assert type(mc) is PMatEKFAC and np.isfinite(mc.trace())


def test_refit_of_a_restriction_and_params_of_another_layout():
    """A restricted EKFAC refits on the restricted function and params (the refit of the
    whole restricted); the whole params, or params of other shapes, are refused naming
    the call that works, not the layer_collection the user did not pass."""
    t = make_plain_mlp(n=7)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC)
    first = E.layer_collection.layers[0].id
    part = E.restrict((first,))
    params = jax.tree_util.tree_map(lambda a: 1.1 * a, t.params)
    with pytest.raises(ValueError, match=r"own layout.*restriction.*R\.select\(params\)"):
        part.refit(t.apply_fn, params, t.x)
    R = restrict(E.layer_collection, (first,))
    got = part.refit(R.apply_fn(t.apply_fn, params), R.select(params), t.x)
    want = E.refit(t.apply_fn, params, t.x).restrict((first,))
    np.testing.assert_allclose(got.to_dense(), want.to_dense(), **TOL)
    with pytest.raises(ValueError, match=r"own layout.*params it was built at"):
        E.refit(t.apply_fn, R.select(params), t.x)


def test_chunks_iterators_and_jit():
    t = make_linen_layernorm(n=7)
    ref = FIM(t.apply_fn, t.params, t.x, PMatEKFAC).to_dense()
    one_shot = iter([(t.x[:2],), (t.x[2:],)])  # two passes: materialised
    chunked = FIM(t.apply_fn, t.params, one_shot, PMatEKFAC, batch_size=3).to_dense()
    jitted = jax.jit(lambda p, x: FIM(t.apply_fn, p, x, PMatEKFAC))(t.params, t.x).to_dense()
    for got in (chunked, jitted):
        np.testing.assert_allclose(got, ref, **TOL)


def test_block_diag_variant_and_errors():
    t = make_linen_layernorm()
    with pytest.raises(ValueError, match="LayerNorm_0.*PMatMixed"):
        FIM(t.apply_fn, t.params, t.x, PMatEKFAC, max_dense_block=4)
    B = FIM(t.apply_fn, t.params, t.x, PMatEKFACBlockDiag)
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFAC)
    assert type(B.inv(1e-3)) is PMatEKFACBlockDiag
    np.testing.assert_allclose(B.to_dense(), E.to_dense(), **TOL)
    with pytest.raises(ValueError, match="basis"):
        SecondMoment(lambda p, x: t.apply_fn(p, x), t.params, t.x, PMatEKFAC,
                     basis=FIM(t.apply_fn, t.params, t.x, PMatKFAC))
    with pytest.raises(TypeError, match="PMatEKFAC.from_jacobians"):
        PMatEKFAC.accumulator(None)


def test_from_kfac_takes_a_kfac_only():
    t = make_plain_mlp(n=2)
    with pytest.raises(TypeError, match=r"from_kfac takes a PMatKFAC, not PMatDense.*FIM\("):
        PMatEKFAC.from_kfac(FIM(t.apply_fn, t.params, t.x, PMatDense))
