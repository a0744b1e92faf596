"""Shared matrix helpers (``jaxgeom.pmat._spectral``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeom.pmat import _spectral


def test_traces_of_many_matrices_in_one_pass(monkeypatch):
    """Orders from 1 to 40 with a padding allowance made small here, so that the diagonals
    form two groups: each trace exact, eager and compiled, in the input's order."""
    monkeypatch.setattr(_spectral, "TRACE_PADDING", 8)
    orders = [3, 1, 23, 40, 8, 5, 16]
    assert _spectral._padding_groups(orders) == [[3, 2, 6, 4], [5, 0, 1]]
    keys = jax.random.split(jax.random.key(0), len(orders))
    matrices = [jax.random.normal(k, (n, n)) for k, n in zip(keys, orders)]
    expected = [np.trace(np.asarray(m)) for m in matrices]
    np.testing.assert_allclose(_spectral.traces(matrices), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(_spectral.traces)(matrices), expected, rtol=1e-12)
    assert _spectral.traces([]).shape == (0,)


def test_diagonals_are_grouped_within_the_padding_allowance():
    pad = _spectral.TRACE_PADDING
    # bench_cnn's KFAC factors: 4097 takes one 289 (3808 padded entries), not the second
    # (7616 > 4675); the other 289 the rest
    lengths = [28, 32, 289, 32, 289, 64, 4097, 10]
    groups = _spectral._padding_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = lengths[group[0]]
        assert all(lengths[i] <= longest for i in group)
        entries = sum(lengths[i] for i in group)
        assert len(group) == 1 or len(group) * longest - entries <= max(pad, entries)
    assert groups == [[6, 2], [4, 5, 1, 3, 0, 7]]
    # an MLP's factors (785 to 10 entries): one group, one kernel
    assert _spectral._padding_groups([785, 512, 513, 512, 513, 10]) == [[0, 2, 4, 1, 3, 5]]


def test_traces_compile_to_one_kernel_a_group():
    matrices = [jnp.ones((n, n)) for n in (785, 512, 513, 10)]
    hlo = jax.jit(_spectral.traces).lower(matrices).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    assert entry.count(" reduce(") + entry.count("fusion(") <= 2  # the reduce, the stack


def test_traces_of_mixed_precisions_and_their_derivatives():
    a = jnp.arange(9.0).reshape(3, 3)
    b = jnp.arange(4.0, dtype=jnp.float32).reshape(2, 2)
    t = _spectral.traces([a, b])
    assert t.dtype == jnp.float64
    np.testing.assert_allclose(t, [12.0, 3.0])

    def loss(a, b):
        ta, tb = _spectral.traces([a, b])
        return ta * tb

    ga, gb = jax.grad(loss, (0, 1))(a, b.astype(jnp.float64))
    np.testing.assert_allclose(ga, 3.0 * np.eye(3))
    np.testing.assert_allclose(gb, 12.0 * np.eye(2))
    _, tangent = jax.jvp(lambda a: _spectral.traces([a, b]), (a,), (jnp.eye(3),))
    np.testing.assert_allclose(tangent, [3.0, 0.0])
    np.testing.assert_allclose(jax.vmap(lambda a: _spectral.trace(a))(jnp.stack([a, 2 * a])),
                               [12.0, 24.0])


def test_sums_of_small_arrays_are_grouped_and_large_ones_reduced_apart(monkeypatch):
    """Arrays of any shapes (a scalar, vectors, matrices, one past the small-array limit):
    each sum exact, eager and compiled; the small ones in one variadic reduction."""
    monkeypatch.setattr(_spectral, "SMALL_SUM", 100)
    shapes = [(3, 4), (), (7,), (20, 10), (5, 5)]
    keys = jax.random.split(jax.random.key(1), len(shapes))
    arrays = [jax.random.normal(k, shape) for k, shape in zip(keys, shapes)]
    expected = [np.sum(np.asarray(a)) for a in arrays]
    np.testing.assert_allclose(_spectral.sums(arrays), expected, rtol=1e-12)
    np.testing.assert_allclose(jax.jit(_spectral.sums)(arrays), expected, rtol=1e-12)
    hlo = jax.jit(_spectral.sums).lower(arrays).compile().as_text()
    variadic = [line for line in hlo.splitlines() if "reduce(" in line and line.count("f64[]") >= 4]
    assert variadic  # the four small arrays reduced together


def test_trace_of_one_matrix_reads_its_diagonal():
    m = jnp.arange(16.0).reshape(4, 4)
    assert float(_spectral.trace(m)) == 0 + 5 + 10 + 15


def _gram(rows, order, dead=0, seed=0):
    """``Σ xxᵀ`` of ``rows`` Gaussian rows (rank ``rows``), the first ``dead`` coordinates 0."""
    x = np.random.default_rng(seed).standard_normal((rows, order))
    x[:, :dead] = 0
    return x.T @ x


def _assert_eigendecomposition(m, values, vectors, rtol=1e-10):
    n = len(m)
    scale = np.linalg.norm(m, 2)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(m), atol=rtol * scale)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(n), atol=1e-12)
    np.testing.assert_allclose((vectors * values) @ vectors.T, m, atol=rtol * scale)


@pytest.mark.parametrize("rows, order, dead, bound", [
    (6, 151, 0, 6),       # a factor of 6 rows: sketch width 32
    (1, 130, 0, 1),       # rank 1
    (20, 200, 7, 24),     # dead coordinates, a bound above the rank
    (24, 128, 0, 24),     # the rank at the bound, width 32 = order / 4
])
def test_eigh_psd_through_the_range_of_a_low_rank_factor(rows, order, dead, bound):
    """Eigenvalues (ascending, the null space's zeros included), orthonormal eigenvectors
    and ``V diag(λ) Vᵀ = M``, as numpy's ``eigh``, for a Gram matrix of few rows."""
    m = _gram(rows, order, dead)
    assert _spectral.sketch_width(order, bound) == 32
    values, vectors = _spectral.eigh_psd(jnp.asarray(m), bound)
    _assert_eigendecomposition(m, np.asarray(values), np.asarray(vectors))
    assert np.all(np.asarray(values)[:order - 32] == 0)  # the complement is exactly null


def test_eigh_psd_is_a_full_eigh_without_a_useful_bound():
    """No bound, or one whose sketch would be wider than a quarter of the order: LAPACK's
    ``eigh`` of the whole matrix (equal to ``jnp.linalg.eigh``). A bound of at most 3/4 of
    the order still splits the range off: the eigenvalues of the null space before it are
    exactly 0 (LAPACK's round-off there)."""
    m = jnp.asarray(_gram(30, 100))
    assert _spectral.sketch_width(100, 30) is None  # 64 > 100 / 4
    want_values, want_vectors = jnp.linalg.eigh(m)
    for bound, width in ((None, None), (80, None), (30, 30)):
        assert _spectral.range_width(100, bound) == width
        values, vectors = _spectral.eigh_psd(m, bound)
        np.testing.assert_array_equal(vectors, want_vectors)
        if width is None:
            np.testing.assert_array_equal(values, want_values)
        else:
            np.testing.assert_array_equal(values[-width:], want_values[-width:])
            np.testing.assert_array_equal(values[:-width], 0)
            assert np.abs(want_values[:-width]).max() < 1e-10 * want_values[-1]


def test_rank_bounds_round_up_to_the_sketch_width():
    """A bound is widened to the largest with the same sketch width (``rows + margin``
    rounded up to the next multiple of 32); where the sketch does not pay, kept when it
    splits a range off (at most 3/4 of the order), else dropped."""
    margin = _spectral.SKETCH_MARGIN
    assert _spectral.sketch_width(4097, 128) == 160
    assert _spectral.useful_rank_bound(4097, 128) == 160 - margin
    assert _spectral.useful_rank_bound(4097, 152) == 160 - margin
    assert _spectral.useful_rank_bound(4097, 153) == 192 - margin
    assert _spectral.useful_rank_bound(151, 6) == 32 - margin
    assert _spectral.useful_rank_bound(785, 512) == 512  # a full eigh, its range split off
    assert _spectral.useful_rank_bound(513, 512) is None
    assert _spectral.range_width(4097, 152) == 160 and _spectral.range_width(785, 512) == 512
    assert _spectral.sketch_width(4097, None) is None


def test_a_negative_power_of_a_singular_matrix_is_refused_with_the_fixes():
    """``Σ xxᵀ`` of 3 rows in 6 dimensions: ``pow(-1/2)`` would be infinite on the null
    space (it was NaN everywhere after the reconstruction), as ``pow(-1)`` of a diagonal
    with zeros; the damped power and the pseudo-power on the range are what the message
    offers, and both are exact."""
    from jaxgeom import LayerCollection, PMatBlockDiag, PMatDense, PMatDiag

    lc = LayerCollection.from_params({"w": np.zeros(6)})
    m = np.asarray(_gram(3, 6))
    evals, evecs = np.linalg.eigh(m)
    for M in (PMatDense(lc, m), PMatBlockDiag(lc, (m,)),
              PMatDiag(lc, np.array([1.0, 0, 2, 3, 0, 1]))):
        with pytest.raises(ValueError, match=r"pow\(-0.5\) of a singular.*regul > 0.*pinv"):
            M.pow(-0.5)
    with pytest.raises(ValueError, match=r"pow\(-1\) of a singular"):  # exact zeros
        M.pow(-1)
    M = PMatDense(lc, m)
    np.testing.assert_allclose(M.pow(-0.5, 0.1).to_dense(),
                               (evecs / np.sqrt(evals + 0.1)) @ evecs.T, rtol=1e-9)
    keep = evals > 1e-9 * evals.max()
    np.testing.assert_allclose(M.pinv().pow(0.5).to_dense(),
                               (evecs[:, keep] / np.sqrt(evals[keep])) @ evecs[:, keep].T,
                               rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(M.pow(0.5).to_dense() @ M.pow(0.5).to_dense(), m, atol=1e-9)


def _rank_deficient(n=6, rank=3, seed=0):
    """``X Xᵀ`` of rank 3: its zero eigenvalue repeated three times (a singular Fisher)."""
    x = np.random.default_rng(seed).normal(size=(n, rank))
    return jnp.asarray(x @ x.T)


def _directional(f, m, e, h=1e-6):
    return (f(m + h * e) - f(m - h * e)) / (2 * h)


def test_matrix_functions_differentiate_through_repeated_eigenvalues():
    """``d f(M)[E] = V (Φ ∘ VᵀEV) Vᵀ`` (Daleckii–Krein): ``pow(-1, λ)`` and the ``eigh``
    solve have the closed-form derivative ``-(M + λI)⁻¹ E (M + λI)⁻¹`` of the inverse, and
    ``pow(-1/2, λ)`` and ``pinv`` (its rank kept: ``atol`` above the differences' step)
    central differences, where ``eigh``'s own derivative (with
    ``1/(λⱼ − λᵢ)``) gave gradients off by their size, or NaN."""
    from jaxgeom import PMatDense
    from jaxgeom.layers import LayerCollection

    m = _rank_deficient()
    n, regul = m.shape[0], 0.1
    lc = LayerCollection.from_params({"w": jnp.zeros(n)})
    rng = np.random.default_rng(1)
    e = rng.normal(size=(n, n))
    e = jnp.asarray(e + e.T)
    v, w = (jnp.asarray(rng.normal(size=n)) for _ in range(2))
    inverse = jnp.linalg.inv(m + regul * jnp.eye(n))
    want = -w @ inverse @ e @ inverse @ v
    for solve in (lambda M: M.pow(-1, regul).mv(v), lambda M: M.solve(v, regul, method="eigh")):
        f = lambda d, solve=solve: w @ solve(PMatDense(lc, d))  # noqa: E731
        np.testing.assert_allclose(jax.jvp(f, (m,), (e,))[1], want, rtol=1e-9)
        np.testing.assert_allclose(jnp.vdot(jax.grad(f)(m), e), want, rtol=1e-9)
    for function in (lambda M: M.pow(-0.5, regul), lambda M: M.pinv(atol=1e-3)):
        f = lambda d, function=function: w @ function(PMatDense(lc, d)).mv(v)  # noqa: E731
        np.testing.assert_allclose(jax.jvp(f, (m,), (e,))[1], _directional(f, m, e),
                                   rtol=1e-6)


@pytest.mark.parametrize("representation", ["dense", "blockdiag"])
def test_differentiated_exponents_and_thresholds(representation):
    """A power ``p`` or a ``pinv`` threshold that is itself differentiated (``d/dp`` of
    ``vᵀ(M + λI)ᵖv = Σ log(μᵢ) μᵢᵖ (qᵢᵀv)²``; a threshold ``atol = c·‖M‖₂`` as
    ``PMatMixed.pinv`` takes it) is hoisted out of the function of the eigenvalues: inside
    the ``custom_jvp`` it raised ``UnexpectedTracerError``."""
    from jaxgeom import PMatBlockDiag, PMatDense
    from jaxgeom.layers import LayerCollection

    m = _rank_deficient()
    n, regul = m.shape[0], 0.1
    params = {"w": jnp.zeros(n)}
    if representation == "dense":
        build = lambda d: PMatDense(LayerCollection.from_params(params), d)  # noqa: E731
    else:
        build = lambda d: PMatBlockDiag(LayerCollection.from_params(params), (d,))  # noqa: E731
    v = jnp.asarray(np.random.default_rng(2).normal(size=n))
    mu, q = np.linalg.eigh(np.asarray(m) + regul * np.eye(n))
    weights = (q.T @ np.asarray(v)) ** 2
    for p in (0.5, -0.5, 2.0):
        got = jax.grad(lambda p: build(m).pow(p, regul).vTMv(v))(p)
        np.testing.assert_allclose(got, np.sum(np.log(mu) * mu**p * weights), rtol=1e-9)
    # undamped, singular: the null space's eigenvalues (round-off, clipped to 0) add
    # 0ᵖ log 0 = 0 (was NaN: a power of the unclipped values, infinite slopes times the
    # matrix's zero tangent)
    mu, q = np.linalg.eigh(np.asarray(m))
    weights, positive = (q.T @ np.asarray(v)) ** 2, mu > 1e-9 * mu.max()
    for p in (0.5, 1.5):
        got = jax.grad(lambda p: build(m).pow(p).vTMv(v))(p)
        want = np.sum(np.log(mu[positive]) * mu[positive] ** p * weights[positive])
        # a round-off eigenvalue ε > 0 adds εᵖ log ε (≈ 4e-7 at p = ½)
        np.testing.assert_allclose(got, want, rtol=1e-6)

    def thresholded(d):
        M = build(d)
        return M.pinv(atol=1e-6 * M.norm(2), rtol=0.0).vTMv(v)

    e = jnp.asarray(np.random.default_rng(3).normal(size=(n, n)))
    e = (e + e.T) / 2
    np.testing.assert_allclose(jnp.vdot(jax.grad(thresholded)(m), e),
                               _directional(thresholded, m, e), rtol=1e-6)


def test_divided_differences_take_tangents_where_secants_lose_accuracy():
    """Tied and nearly tied eigenvalues take the mean tangent, distant ones the secant."""
    f = lambda x: 1 / (x + 0.1)  # noqa: E731
    w = jnp.array([0.0, 1e-17, 1e-9, 2.0])
    slopes = -1 / (w + 0.1) ** 2
    phi = _spectral._divided_differences(w, f(w), slopes)
    exact = -1 / ((w[:, None] + 0.1) * (w[None, :] + 0.1))  # the secant of 1/(x + 0.1)
    np.testing.assert_allclose(phi, exact, rtol=1e-7)


@pytest.mark.parametrize("order, bound", [(6, None), (130, 3)])
def test_eigenbases_differentiate_over_a_null_space(order, bound):
    """``V diag(1/(λ + 1)) Vᵀ`` from :func:`eigh_psd` of a Gram ``X Xᵀ`` of rank 3 (LAPACK's
    ``eigh``; the sketch of its range with a bound) differentiates as ``(X Xᵀ + I)⁻¹``,
    forward and reverse: ``jnp.linalg.eigh``'s derivative, its ``Vᵀ Ṁ V`` not symmetrised,
    scaled that round-off by ``1/(λⱼ − λᵢ)`` over the null space's near-zero eigenvalues
    (an inverse's gradient off by tens of percent); the sketch had none (``geqrf``)."""
    rng = np.random.default_rng(4)
    x, dx = (jnp.asarray(rng.normal(size=(order, 3))) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=(order, order)))

    def through_eigh(x):
        values, vectors = _spectral.eigh_psd(x @ x.T, bound)
        return jnp.sum(weights * ((vectors / (values + 1)) @ vectors.T))

    def inverse(x):
        return jnp.sum(weights * jnp.linalg.inv(x @ x.T + jnp.eye(order)))

    want = jax.jvp(inverse, (x,), (dx,))[1]
    np.testing.assert_allclose(jax.jvp(through_eigh, (x,), (dx,))[1], want, rtol=1e-9)
    np.testing.assert_allclose(jnp.vdot(jax.grad(through_eigh)(x), dx), want, rtol=1e-9)
    if bound is None:  # a stack of matrices (QuasiDiag's blocks), each its own
        values, vectors = jax.jvp(_spectral.eigh, (jnp.stack([x @ x.T, x @ x.T]),),
                                  (jnp.stack([x @ dx.T + dx @ x.T, jnp.eye(order)]),))[1]
        one = jax.jvp(_spectral.eigh, (x @ x.T,), (x @ dx.T + dx @ x.T,))[1]
        np.testing.assert_allclose(values[0], one[0], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(vectors[0], one[1], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(values[1], np.ones(order), rtol=1e-12)  # Ṁ = I: λ̇ = 1
        np.testing.assert_allclose(vectors[1], 0, atol=1e-12)  # the same eigenvectors


def test_eigenbases_differentiate_through_an_eigenvalue_kept_repeated():
    """``M(t) = c(t) I₃ ⊕ Y(t) Y(t)ᵀ``: the repeated eigenvalue ``c`` moves but never
    splits, so ``V diag(f(λ)) Vᵀ`` differentiates as ``f(M)`` (``jnp.linalg.eigh``'s
    derivative: ``∞ · 0 = NaN``)."""
    rng = np.random.default_rng(5)
    y, dy = (jnp.asarray(rng.normal(size=(3, 3))) for _ in range(2))
    weights = jnp.asarray(rng.normal(size=(6, 6)))

    def matrix(c, y):
        return jax.scipy.linalg.block_diag(c * jnp.eye(3), y @ y.T)

    def through_eigh(c, y):
        values, vectors = _spectral.eigh(matrix(c, y))
        return jnp.sum(weights * ((vectors * jnp.sqrt(values + 1)) @ vectors.T))

    def reference(c, y):  # f(M) block by block: the lower block's eigenvalues distinct
        values, vectors = jnp.linalg.eigh(y @ y.T)
        lower = (vectors * jnp.sqrt(values + 1)) @ vectors.T
        return jnp.sum(weights * jax.scipy.linalg.block_diag(jnp.sqrt(c + 1) * jnp.eye(3),
                                                               lower))

    primals, tangents = (2.0, y), (0.7, dy)
    want = jax.jvp(reference, primals, tangents)[1]
    assert np.isfinite(want)
    np.testing.assert_allclose(jax.jvp(through_eigh, primals, tangents)[1], want, rtol=1e-9)
    gc, gy = jax.grad(through_eigh, argnums=(0, 1))(*primals)
    np.testing.assert_allclose(0.7 * gc + jnp.vdot(gy, dy), want, rtol=1e-9)


# ------------------------------------------------------------ eigh's in one host call


def _symmetric(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, n))
    return x + x.T


def _psd_of_rank(n: int, rank: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, rank))
    return x @ x.T


def _host_calls(fn, *args) -> int:
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("pure_callback")


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-9), (jnp.float32, 1e-4)])
def test_host_eighs_are_each_matrix_eigendecomposition_in_one_host_call(dtype, tol):
    """Each pair is the eigendecomposition of its matrix's upper triangle (the lower one
    ignored): float64 NumPy's eigenvalues, ascending, orthonormal eigenvectors in the
    columns that give the matrix back; all of them from one host call."""
    matrices = [_symmetric(n, seed=n) for n in (3, 40, 17)]
    given = [jnp.asarray(np.triu(m) + np.tril(np.full_like(m, 1e3), -1), dtype)
             for m in matrices]

    pairs = jax.jit(_spectral.host_eighs)(given)

    for m, (values, vectors) in zip(matrices, pairs):
        scale = np.abs(np.linalg.eigvalsh(m)).max()
        np.testing.assert_allclose(values, np.linalg.eigvalsh(m), atol=tol * scale)
        v = np.asarray(vectors, np.float64)
        np.testing.assert_allclose(v.T @ v, np.eye(len(m)), atol=tol)
        np.testing.assert_allclose(v * np.asarray(values) @ v.T, m, atol=tol * scale)
    assert _host_calls(_spectral.host_eighs, given) == 1


def test_host_eighs_differentiate_as_eigh():
    """Forward and reverse derivatives of ``Σᵢ ⟨Cᵢ, Vᵢ exp(−Λᵢ) Vᵢᵀ⟩`` (independent of the
    eigenvectors' signs) through the host call equal those through :func:`eigh`."""
    matrices = tuple(jnp.asarray(_symmetric(n, seed=10 + n) / n) for n in (6, 9))
    directions = tuple(jnp.asarray(_symmetric(n, seed=20 + n)) for n in (6, 9))
    weights = [jnp.asarray(np.random.default_rng(n).standard_normal((n, n))) for n in (6, 9)]

    def loss(decompose):
        def f(ms):
            return sum(jnp.sum(c * (v * jnp.exp(-w)) @ v.T)
                       for c, (w, v) in zip(weights, decompose(ms)))
        return f

    by_host = loss(lambda ms: _spectral.host_eighs(list(ms)))
    by_eigh = loss(lambda ms: [_spectral.eigh(m) for m in ms])
    np.testing.assert_allclose(jax.jvp(by_host, (matrices,), (directions,))[1],
                               jax.jvp(by_eigh, (matrices,), (directions,))[1], rtol=1e-9)
    for got, want in zip(jax.grad(by_host)(matrices), jax.grad(by_eigh)(matrices)):
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_eighs_psd_are_eigh_psd_with_the_full_ones_in_one_host_call():
    """A low-rank factor with a bound small enough for the range sketch, one whose bound
    only splits its range off (the null space's eigenvalues exactly 0), and one with no
    bound: each as :func:`eigh_psd` alone, the two full ``eigh``'s in one host call."""
    matrices = [jnp.asarray(_psd_of_rank(128, 6, seed=1)), jnp.asarray(_psd_of_rank(20, 5, 2)),
                jnp.asarray(_psd_of_rank(12, 12, 3))]
    bounds = [6, 5, None]
    assert _spectral.sketch_width(128, 6) is not None and _spectral.sketch_width(20, 5) is None

    def decomposed(ms):
        return _spectral.eighs_psd(ms, bounds, [False] * 3)

    pairs = jax.jit(decomposed)(matrices)

    for m, bound, (values, vectors) in zip(matrices, bounds, pairs):
        want_values, want_vectors = _spectral.eigh_psd(m, bound)
        np.testing.assert_allclose(values, want_values, atol=1e-9)
        np.testing.assert_allclose(_spectral.reconstruct(values, vectors), m, atol=1e-9)
    assert np.all(np.asarray(pairs[1][0])[:15] == 0)  # 20 − 5 exact zeros
    assert _host_calls(decomposed, matrices) == 1


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-9), (jnp.float32, 1e-4)])
def test_host_eigvalshs_are_each_matrix_eigenvalues_in_one_host_call(dtype, tol):
    """Each matrix's eigenvalues, of its upper triangle, ascending, as float64 NumPy's;
    all from one host call; the tangents ``vᵢᵀ Ṁ vᵢ`` of each, as
    ``jnp.linalg.eigvalsh``'s."""
    matrices = [_symmetric(n, seed=50 + n) for n in (3, 40, 17)]
    given = [jnp.asarray(np.triu(m) + np.tril(np.full_like(m, 1e3), -1), dtype)
             for m in matrices]

    spectra = jax.jit(_spectral.host_eigvalshs)(given)

    for m, values in zip(matrices, spectra):
        scale = np.abs(np.linalg.eigvalsh(m)).max()
        np.testing.assert_allclose(values, np.linalg.eigvalsh(m), atol=tol * scale)
    assert _host_calls(_spectral.host_eigvalshs, given) == 1
    directions = tuple(jnp.asarray(_symmetric(n, seed=60 + n)) for n in (3, 40, 17))
    exact = tuple(jnp.asarray(m) for m in matrices)
    got = jax.jvp(lambda ms: tuple(_spectral.host_eigvalshs(list(ms))), (exact,), (directions,))
    want = jax.jvp(lambda ms: tuple(jnp.linalg.eigvalsh(m) for m in ms), (exact,),
                   (directions,))
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_eigvalshs_psd_are_eigh_psds_eigenvalues_with_the_full_ones_in_one_host_call():
    """The eigenvalues of :func:`eigh_psd` for a factor the range sketch takes, one whose
    bound only splits its range off (its null space's eigenvalues exactly 0) and one with
    no bound, the two full ones from one host call that computes no eigenvectors; one at a
    time, :func:`eigvalsh_psd` gives the same."""
    matrices = [jnp.asarray(_psd_of_rank(128, 6, seed=4)), jnp.asarray(_psd_of_rank(20, 5, 5)),
                jnp.asarray(_psd_of_rank(12, 12, 6))]
    bounds = [6, 5, None]

    def eigenvalues(ms):
        return _spectral.eigvalshs_psd(ms, bounds, [False] * 3)

    spectra = jax.jit(eigenvalues)(matrices)

    for m, bound, values in zip(matrices, bounds, spectra):
        np.testing.assert_allclose(values, _spectral.eigh_psd(m, bound)[0], atol=1e-9)
        np.testing.assert_allclose(values, _spectral.eigvalsh_psd(m, bound), atol=1e-9)
    assert np.all(np.asarray(spectra[1])[:15] == 0)  # 20 − 5 exact zeros
    program = str(jax.make_jaxpr(eigenvalues)(matrices))
    assert program.count("pure_callback") == 1
    assert "<function eigvalsh at" in program and "<function eigh at" not in program


def test_a_vmapped_host_eighs_decomposes_each_matrix():
    """Under ``vmap`` the host call runs once per batch element (``vmap_method=
    "sequential"``), each pair its matrix's eigendecomposition."""
    stack = jnp.asarray(np.stack([_symmetric(7, seed=s) for s in range(3)]))
    values, vectors = jax.jit(jax.vmap(lambda m: _spectral.host_eighs([m])[0]))(stack)
    for m, w, v in zip(np.asarray(stack), np.asarray(values), np.asarray(vectors)):
        np.testing.assert_allclose(w, np.linalg.eigvalsh(m), atol=1e-10)
        np.testing.assert_allclose(v * w @ v.T, m, atol=1e-10)


@pytest.mark.parametrize("dtype, tol", [(jnp.float64, 1e-9), (jnp.float32, 1e-4)])
def test_eigvalsh_from_the_host_is_numpys_and_differentiates_as_eigh(monkeypatch, dtype, tol):
    """From ``EIGVALSH_ON_HOST_MIN`` on (lowered here), the eigenvalues of the upper
    triangle from one host call, NumPy's float64 values; the tangent ``vᵢᵀ Ṁ vᵢ``, as
    ``jnp.linalg.eigvalsh``'s; below the order, in the program."""
    monkeypatch.setattr(_spectral, "EIGVALSH_ON_HOST_MIN", 8)
    m, dm = _symmetric(12, seed=40), _symmetric(12, seed=41)
    given = jnp.asarray(np.triu(m) + np.tril(np.full_like(m, 1e3), -1), dtype)
    values = jax.jit(_spectral.eigvalsh)(given)
    scale = np.abs(np.linalg.eigvalsh(m)).max()
    np.testing.assert_allclose(values, np.linalg.eigvalsh(m), atol=tol * scale)
    on_cpu = jax.default_backend() == "cpu"
    assert _host_calls(_spectral.eigvalsh, given) == (1 if on_cpu else 0)
    assert _host_calls(_spectral.eigvalsh, given[:7, :7]) == 0
    got = jax.jvp(_spectral.eigvalsh, (jnp.asarray(m),), (jnp.asarray(dm),))
    want = jax.jvp(jnp.linalg.eigvalsh, (jnp.asarray(m),), (jnp.asarray(dm),))
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)
