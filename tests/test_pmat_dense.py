"""PMatDense: the brute-force Fisher itself, and every operation against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_equinox_mlp, make_linen_cnn, make_linen_mlp
from pmat_checks import (
    check_all,
    check_eigsh,
    check_promotions,
    check_pytree,
    check_solve,
    reference,
)

from jaxgeom import FIM, LayerCollection, PMatBlockDiag, PMatDense, PMatEye, solvers
from jaxgeom.pmat import _gram


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    t = request.param()
    return t, FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense, batch_size=3), reference(t)


def test_storage_is_the_reference(case):
    _, F, ref = case
    np.testing.assert_allclose(F.data, ref, rtol=1e-8, atol=1e-10)


def test_operations(case):
    t, F, ref = case
    check_all(F, ref, t.params)
    check_eigsh(F, ref)
    check_solve(F, ref, t.params)
    check_pytree(F)


def test_eigh_reconstructs(case):
    _, F, ref = case
    evals, evecs = F.eigh()
    np.testing.assert_allclose((evecs * evals) @ evecs.T, ref, atol=1e-10)
    np.testing.assert_allclose(evecs.T @ evecs, np.eye(len(ref)), atol=1e-10)


def test_spectrum_from_the_host_eigenvalues(case, monkeypatch):
    """With every matrix's eigenvalues alone from LAPACK on the host (the order threshold
    lowered), ``eigvalsh``, ``logdet`` and ``norm(±2)`` under ``jit`` and a block-diagonal
    one's ``eigvalsh`` are NumPy's float64 of the reference."""
    from jaxgeom.pmat import _spectral

    monkeypatch.setattr(_spectral, "EIGVALSH_ON_HOST_MIN", 1)
    t, F, ref = case
    values = np.linalg.eigvalsh(ref)
    scale = np.abs(values).max()
    np.testing.assert_allclose(jax.jit(lambda F: F.eigvalsh())(F), values, atol=1e-10 * scale)
    np.testing.assert_allclose(jax.jit(lambda F: F.logdet(0.1))(F),
                               np.linalg.slogdet(ref + 0.1 * np.eye(len(ref)))[1], rtol=1e-10)
    np.testing.assert_allclose(jax.jit(lambda F: F.norm(2))(F), scale, rtol=1e-10)
    blocks = FIM(t.apply_fn, t.params, (t.x, t.y), PMatBlockDiag, batch_size=3)
    np.testing.assert_allclose(jax.jit(lambda B: B.eigvalsh())(blocks),
                               np.linalg.eigvalsh(np.asarray(blocks.to_dense())),
                               atol=1e-10 * scale)
    if jax.default_backend() == "cpu":
        program = str(jax.make_jaxpr(lambda F: F.eigvalsh())(F))
        assert "pure_callback" in program


def test_promotions(case):
    _, F, ref = case
    check_promotions(F, ref, ref)


def test_solve_method_errors(case):
    t, F, _ = case
    with pytest.raises(ValueError, match="valid methods"):
        F.solve(F.get_diag(), 1e-3, method="magic")


def test_mismatched_layouts_and_shapes():
    a, b = make_linen_mlp(), make_equinox_mlp()
    Fa = FIM(a.apply_fn, a.params, a.x, PMatDense)
    Fb = FIM(b.apply_fn, b.params, b.x, PMatDense)
    with pytest.raises(ValueError, match="different parameter layouts"):
        Fa + Fb
    with pytest.raises(ValueError, match="shape"):
        PMatDense(Fa.layer_collection, jnp.zeros((3, 3)))


def test_a_layout_mismatch_names_what_differs():
    """Same parameters, other layer kinds (LayerCollection.from_params against the model's
    discovery), or other dtypes: the error names that field and its fix."""
    t = make_linen_mlp()
    F = FIM(t.apply_fn, t.params, t.x, PMatDense)
    with pytest.raises(ValueError, match=r"their layers differ \(layer 'Dense_0' of kind "
                       r"'dense'.*kind 'other'.*layer_collection=M.layer_collection"):
        F + PMatEye(LayerCollection.from_params(t.params), 1e-3)
    p32 = jax.tree_util.tree_map(lambda p: p.astype(jnp.float32), t.params)
    lc32 = LayerCollection.from_model(t.apply_fn, p32, t.x[:1].astype(jnp.float32))
    with pytest.raises(ValueError, match=r"their dtypes differ \(leaf .* float64 and float32"
                       r"\).*parameters of one dtype"):
        F + PMatDense(lc32, F.data.astype(jnp.float32))


@pytest.mark.parametrize("m", [7, 64, 192, _gram.SYMMETRIC_FROM + 3])
def test_gram_is_xtx_also_from_its_upper_blocks(m):
    """The Gram behind every build: ``XᵀX`` of the rows of ``x``; a multiple of 64 columns
    below ``UNALIASED_BELOW`` with a zero column appended on the CPU; from
    ``SYMMETRIC_FROM`` columns only the upper block triangle is multiplied and the rest
    mirrored."""
    x = np.random.default_rng(0).normal(size=(3, 2, m))
    rows = x.reshape(-1, m)
    expected = rows.T @ rows
    for gram in (_gram.gram, jax.jit(_gram.gram)):  # eager, and compiled for the CPU
        np.testing.assert_allclose(gram(jnp.asarray(x)), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(_gram._unaliased_gram(jnp.asarray(rows)), expected,
                               rtol=1e-12, atol=1e-12)
    # the build's in-place updates: a running sum of XᵀX from X's column pieces (a chunk's
    # Jacobian by leaf: uneven, some straddling the column blocks), its upper block
    # triangle added into the donated total chunk after chunk, then completed and averaged
    cuts = sorted({0, 1, 5, m // 3, m // 2 + 3, m})
    add = jax.jit(_gram.add_upper_gram, donate_argnums=0)
    total, expected = jnp.zeros((m, m)), np.zeros((m, m))
    for seed in (1, 2, 3):
        chunk = np.random.default_rng(seed).normal(size=(4, m))
        total = add(total, [jnp.asarray(chunk[:, a:b]) for a, b in zip(cuts[:-1], cuts[1:])])
        expected += chunk.T @ chunk
    np.testing.assert_allclose(_gram.mean_of_upper_grams(total, 3), expected / 3, rtol=1e-12,
                               atol=1e-12)


@pytest.mark.parametrize("m", [7, _gram.SYMMETRIC_FROM + 3])
def test_gram_norm_sq_reduces_the_upper_blocks(m):
    """``Σ_ab w_a w_b (XᵀX)_ab²`` (signed ``w``) and ``‖XᵀX‖_F²``, the Gram never formed:
    from ``SYMMETRIC_FROM`` columns, its blocks above the diagonal counted twice."""
    rng = np.random.default_rng(4)
    x, w = rng.normal(size=(2, 3, m)), rng.uniform(-1, 1, size=m)
    gram = x.reshape(-1, m).T @ x.reshape(-1, m)
    np.testing.assert_allclose(_gram.gram_norm_sq(jnp.asarray(x)), np.sum(gram**2),
                               rtol=1e-12)
    np.testing.assert_allclose(_gram.gram_norm_sq(jnp.asarray(x), jnp.asarray(w)),
                               w @ gram**2 @ w, rtol=1e-12)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag])
def test_builds_sum_upper_block_grams_and_complete_them_once(monkeypatch, representation):
    """With the threshold lowered so that every block's Gram is summed as its upper block
    triangle over the chunks and completed at the end, Dense and BlockDiag builds are the
    matrices built from whole Grams (Dense: the brute-force Fisher)."""
    t = make_linen_mlp()
    whole = FIM(t.apply_fn, t.params, (t.x, t.y), representation, batch_size=3).to_dense()
    monkeypatch.setattr(_gram, "SYMMETRIC_FROM", 4)
    jax.clear_caches()  # the chunk's compiled step and the mean read the threshold when traced
    upper = FIM(t.apply_fn, t.params, (t.x, t.y), representation, batch_size=3).to_dense()
    np.testing.assert_allclose(upper, whole, rtol=1e-12, atol=1e-14)
    if representation is PMatDense:
        np.testing.assert_allclose(upper, reference(t), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("m, rows", [(45, 3), (45, 20), (48, 5)])
def test_accumulate_gram_in_row_blocks(monkeypatch, m, rows):
    """``total + s XᵀX`` of a running total: with few rows of a large total (here any
    total: the threshold lowered), added row block by row block in a loop, the last block
    short when ``ROW_BLOCKS`` does not divide ``m``; with many rows, the symmetric Gram."""
    monkeypatch.setattr(_gram, "IN_PLACE_FROM_BYTES", 0)
    rng = np.random.default_rng(2)
    x, total = rng.normal(size=(rows, m)), rng.normal(size=(m, m))
    add = jax.jit(_gram.accumulate_gram, donate_argnums=0)
    np.testing.assert_allclose(add(jnp.asarray(total), jnp.asarray(x), 0.25),
                               total + 0.25 * x.T @ x, rtol=1e-12, atol=1e-12)


def indefinite(d=6, seed=0):
    """A symmetric indefinite matrix (a Hessian's kind) on a one-layer layout."""
    params = {"a": {"kernel": jnp.zeros((2, 2)), "bias": jnp.zeros(2)}}
    layout = LayerCollection.from_params(params)
    a = np.random.default_rng(seed).standard_normal((d, d))
    return layout, (a + a.T) / 2


@pytest.mark.parametrize("rep", [PMatDense, PMatBlockDiag])
def test_inverse_and_solve_of_an_indefinite_matrix(rep):
    """Cholesky fails on ``M + λI`` indefinite: the LU fallback gives the inverse."""
    layout, m = indefinite()
    M = PMatDense(layout, jnp.asarray(m))
    M = M if rep is PMatDense else PMatBlockDiag.from_pmat(M)
    regul, v = 0.1, np.arange(6.0)
    want = np.linalg.inv(np.asarray(M.to_dense()) + regul * np.eye(6))
    assert np.linalg.eigvalsh(want).min() < 0
    np.testing.assert_allclose(M.inv(regul).to_dense(), want, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(M.solve(v, regul), want @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jax.jit(lambda M, v: M.solve(v, regul))(M, v), want @ v,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("p", [2, 2.0, np.float32(2), jnp.asarray(2.0), jnp.int32(2), -1,
                               jnp.asarray(-1.0)])
def test_integer_powers_of_an_indefinite_matrix_in_any_scalar_type(p):
    """``M^p`` for an integer value ``p``, whatever its type, eager or traced: the signs
    of the eigenvalues kept (not clipped as for a fractional power)."""
    layout, m = indefinite()
    M = PMatDense(layout, jnp.asarray(m))
    want = np.linalg.matrix_power(m, 2) if float(p) == 2 else np.linalg.inv(m)
    np.testing.assert_allclose(M.pow(p).to_dense(), want, rtol=1e-9, atol=1e-10)
    traced = jax.jit(lambda M, p: M.pow(p).to_dense())(M, jnp.asarray(p, jnp.float64))
    np.testing.assert_allclose(traced, want, rtol=1e-9, atol=1e-10)


def test_cg_promotes_a_float32_vector_to_the_matrix_dtype(case):
    t, F, ref = case
    v = np.random.default_rng(1).standard_normal(ref.shape[0])
    want = np.linalg.solve(ref + 0.1 * np.eye(ref.shape[0]), v.astype(np.float32))
    for solve in (F.solve, jax.jit(lambda v, **kw: F.solve(v, **kw), static_argnames="method")):
        x = solve(jnp.asarray(v, jnp.float32), regul=0.1, method="cg", rtol=1e-12)
        assert x.dtype == jnp.float64
        np.testing.assert_allclose(x, want, rtol=1e-8, atol=1e-10)


def test_solve_options_belong_to_their_method(case):
    t, F, ref = case
    v = np.ones(ref.shape[0])
    with pytest.raises(TypeError, match=r"method='cholesky'\) takes no option maxiter"):
        F.solve(v, 0.1, maxiter=5)
    with pytest.raises(TypeError, match="its options: rcond"):
        F.solve(v, 0.1, method="lstsq", rtol=1e-3)
    want = np.linalg.solve(ref + 0.1 * np.eye(ref.shape[0]), v)
    np.testing.assert_allclose(F.solve(v, 0.1, method="lstsq", rcond=None), want, rtol=1e-8)


@pytest.mark.parametrize("options, error, match", [
    ({"rtol": float("nan")}, ValueError, "cg's rtol must be a finite number >= 0; got nan"),
    ({"atol": -1.0}, ValueError, "cg's atol must be a finite number >= 0"),
    ({"maxiter": -1}, ValueError, "cg's maxiter must be None or an integer >= 0; got -1"),
    ({"preconditioner": np.ones(3)}, TypeError,
     r"preconditioner must be a callable.*shape \(3,\).*lambda r: r / d"),
])
def test_cg_options_out_of_their_domain_are_refused(options, error, match):
    """A NaN rtol or a negative maxiter had stopped CG at once and answered zeros."""
    F = PMatDense(LayerCollection.from_params({"w": jnp.zeros(3)}), jnp.eye(3))
    with pytest.raises(error, match=match):
        F.solve(jnp.ones(3), 1.0, method="cg", **options)
    with pytest.raises(error, match=match):  # the solver itself, as jaxgeom.cg
        solvers.cg(lambda x: x, jnp.ones(3), **options)


def test_cg_against_numpy_and_shapes_that_do_not_fit_are_named():
    """x0, preconditioner, maxiter and the tolerances against numpy's solve, eager and
    jitted; an x0 of shape (d, 1) had broadcast ``b - A x0`` into a (d, d) answer, and an
    x0, product or preconditioner of another length failed inside dot_general."""
    rng = np.random.RandomState(0)
    a = rng.randn(6, 6)
    a = a @ a.T + 0.5 * np.eye(6)
    b = rng.randn(6)
    want = np.linalg.solve(a, b)
    matvec = lambda x: jnp.asarray(a) @ x  # noqa: E731
    jacobi = lambda r: r / jnp.asarray(np.diag(a))  # noqa: E731
    for run in (lambda f: f(jnp.asarray(b)), lambda f: jax.jit(f)(jnp.asarray(b))):
        x = run(lambda b: solvers.cg(matvec, b, x0=jnp.ones(6), preconditioner=jacobi,
                                     rtol=1e-13))
        np.testing.assert_allclose(x, want, rtol=1e-10)
        np.testing.assert_array_equal(run(lambda b: solvers.cg(matvec, b, x0=jnp.ones(6),
                                                               maxiter=0)), np.ones(6))
        x = run(lambda b: solvers.cg(matvec, b, rtol=0.0, atol=1e-3))
        assert np.linalg.norm(a @ x - b) <= 1e-3
    with pytest.raises(ValueError, match=r"x0 must have the right-hand side's shape \(6,\); "
                                         r"got shape \(6, 1\)"):
        solvers.cg(matvec, jnp.asarray(b), x0=jnp.ones((6, 1)))
    with pytest.raises(ValueError, match=r"x0 must .* got shape \(3,\)"):
        jax.jit(lambda b: solvers.cg(matvec, b, x0=jnp.ones(3)))(jnp.asarray(b))
    with pytest.raises(ValueError, match=r"preconditioner\(r\) must answer .* got shape \(3,\)"):
        solvers.cg(matvec, jnp.asarray(b), preconditioner=lambda r: r[:3])
    with pytest.raises(ValueError, match=r"matvec\(x\) must answer .* got shape \(6, 6\)"):
        solvers.cg(lambda x: jnp.outer(x, x), jnp.asarray(b))
