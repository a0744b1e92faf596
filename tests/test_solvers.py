"""The iterative solvers (``jaxgeom.solvers``): MINRES on indefinite and singular systems,
the truncated Neumann series as the polynomial it is, against float64 brute force; and
both as ``solve`` methods of a matrix-free Fisher, a Hessian and K-FAC."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_mlp
from pmat_checks import compilations, neumann_series

from jaxgeom import (
    FIM,
    LayerCollection,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    cg,
    minres,
    neumann,
    random_pvector,
)
from jaxgeom.hessian import Hessian

REGUL = 1e-3


def symmetric(eigenvalues, seed=0):
    """``Q diag(λ) Qᵀ`` with a random orthogonal ``Q``."""
    q, _ = np.linalg.qr(np.random.RandomState(seed).randn(len(eigenvalues), len(eigenvalues)))
    return (q * np.asarray(eigenvalues)) @ q.T


INDEFINITE = symmetric(np.r_[np.linspace(-3, -0.5, 6), np.linspace(0.5, 4, 14)])
B = np.random.RandomState(1).randn(20)


def product(a):
    a = jnp.asarray(a)
    return lambda x: a @ x


EAGER_AND_JIT = [pytest.param(lambda f, *args: f(*args), id="eager"),
                 pytest.param(lambda f, *args: jax.jit(f)(*args), id="jit")]


@pytest.mark.parametrize("run", EAGER_AND_JIT)
def test_minres_solves_indefinite_systems(run):
    """``A⁻¹ b`` for ``A`` with six negative eigenvalues, from zero and from a warm start,
    with a positive-definite preconditioner; ``maxiter=0`` answers ``x0``; ``atol`` bounds
    the residual it stops at."""
    want = np.linalg.solve(INDEFINITE, B)
    matvec = product(INDEFINITE)
    np.testing.assert_allclose(run(lambda b: minres(matvec, b, rtol=1e-13), B), want,
                               rtol=1e-10)
    jacobi = jnp.asarray(np.abs(np.diag(INDEFINITE)) + 1)
    x = run(lambda b: minres(matvec, b, x0=jnp.ones(20), preconditioner=lambda r: r / jacobi,
                             rtol=1e-13), B)
    np.testing.assert_allclose(x, want, rtol=1e-10)
    np.testing.assert_array_equal(run(lambda b: minres(matvec, b, x0=jnp.ones(20), maxiter=0),
                                      B), np.ones(20))
    x = run(lambda b: minres(matvec, b, rtol=0.0, atol=1e-3), B)
    assert np.linalg.norm(INDEFINITE @ x - B) <= 1e-3
    assert np.linalg.norm(INDEFINITE @ x - B) > 1e-9  # it stopped there, not at the solution


@pytest.mark.parametrize("solver", [cg, minres])
def test_from_zero_every_product_is_an_iteration(solver):
    """From ``x0 = 0`` the residual is ``b``: called eagerly, ``k`` iterations make ``k``
    products (the first made before the loop, to learn the operator's dtype, is the first
    iteration's), none with the zero vector; the iterates are those of the loop under
    ``jit``, and of a start from an explicit ``x0 = 0`` (which multiplies it)."""
    a = symmetric(np.linspace(0.5, 4, 20))
    made = []

    def matvec(x):
        made.append(x)
        return jnp.asarray(a) @ x

    for k in (0, 1, 4):
        made.clear()
        x = solver(matvec, B, maxiter=k)
        assert len(made) == max(k, 1)  # the dtype's product is made even for maxiter=0
        assert all(np.any(np.asarray(v) != 0) for v in made)
        np.testing.assert_allclose(x, jax.jit(lambda b, k=k: solver(product(a), b, maxiter=k))(B),
                                   rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(x, solver(product(a), B, x0=np.zeros(20), maxiter=k),
                                   rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(solver(matvec, B, rtol=1e-13), np.linalg.solve(a, B),
                               rtol=1e-10)


@pytest.mark.parametrize("solver", [cg, minres])
def test_eager_solves_leave_the_callers_arrays_usable(solver):
    """Called eagerly, the iterations update their own state in place (donated buffers):
    ``b``, ``x0``, the preconditioner's arrays and what the operator closes over are
    neither consumed nor changed, and a second solve with them gives the same answer."""
    a = jnp.asarray(symmetric(np.linspace(0.5, 4, 20)))
    b, x0 = jnp.asarray(B), jnp.ones(20)
    diag = jnp.diag(a)
    before = [np.array(t) for t in (a, b, x0, diag)]
    for start in (None, x0):
        first = solver(lambda x: a @ x, b, x0=start, preconditioner=lambda r: r / diag,
                       rtol=1e-13)
        again = solver(lambda x: a @ x, b, x0=start, preconditioner=lambda r: r / diag,
                       rtol=1e-13)
        np.testing.assert_array_equal(first, again)
        for t, saved in zip((a, b, x0, diag), before):
            assert not t.is_deleted()
            np.testing.assert_array_equal(t, saved)
    np.testing.assert_allclose(first, np.linalg.solve(before[0], before[1]), rtol=1e-10)


@pytest.mark.parametrize("run", EAGER_AND_JIT)
@pytest.mark.parametrize("solver", [cg, minres])
def test_a_float32_vector_against_a_float64_operator_is_solved_in_float64(run, solver):
    """The iterates take the operator's and the vector's promoted dtype, from zero as from
    an explicit start."""
    a = symmetric(np.linspace(0.5, 4, 20))
    b32 = jnp.asarray(B, jnp.float32)
    want = np.linalg.solve(a, np.asarray(b32, np.float64))
    for x0 in (None, jnp.zeros(20, jnp.float32)):
        x = run(lambda b, x0=x0: solver(product(a), b, x0=x0, rtol=1e-13), b32)
        assert x.dtype == jnp.float64
        np.testing.assert_allclose(x, want, rtol=1e-10)


@pytest.mark.parametrize("run", EAGER_AND_JIT)
def test_minres_of_a_singular_consistent_system_is_the_pseudo_inverse_solution(run):
    """From ``x0 = 0`` the iterates stay in the range of ``A``: ``A⁺ b``, the minimum-norm
    solution (the answer of LSMR), not one of the others ``A⁺ b + null-space``."""
    a = symmetric(np.r_[np.zeros(5), np.linspace(-2, -0.5, 3), np.linspace(0.5, 3, 12)])
    b = a @ np.random.RandomState(2).randn(20)
    x = run(lambda b: minres(product(a), b, rtol=1e-13), b)
    np.testing.assert_allclose(x, np.linalg.pinv(a, hermitian=True) @ b, atol=1e-12)


def test_minres_derivatives_are_those_of_the_solution():
    """Reverse mode with respect to ``b`` and to the matrix's entries through the
    ``matvec``'s closure: those of ``jnp.linalg.solve`` (``custom_linear_solve``)."""
    def loss(a, b, solve):
        return jnp.sum(jnp.sin(solve(a, b)))

    exact = jax.grad(loss, argnums=(0, 1))(INDEFINITE, B, jnp.linalg.solve)
    got = jax.grad(loss, argnums=(0, 1))(
        INDEFINITE, B, lambda a, b: minres(lambda x: a @ x, b, rtol=1e-13))
    for g, e in zip(got, exact):
        np.testing.assert_allclose(g, e, rtol=1e-8, atol=1e-10)


def test_minres_of_a_non_positive_definite_preconditioner_is_an_error_or_nan():
    """A preconditioner with a negative eigenvalue makes ``rᵀ P⁻¹ r`` negative: its square
    root is NaN, never a wrong answer taken for converged."""
    spd = INDEFINITE @ INDEFINITE
    bad = lambda r: -r  # noqa: E731
    with pytest.raises(FloatingPointError, match="preconditioner that is not positive "
                                                 "definite"):
        minres(product(spd), jnp.asarray(B), preconditioner=bad)
    assert np.isnan(jax.jit(lambda b: minres(product(spd), b, preconditioner=bad))(B)).all()


@pytest.mark.parametrize("run", EAGER_AND_JIT)
def test_neumann_is_its_polynomial_and_converges_to_the_solve(run):
    spd = symmetric(np.linspace(0.5, 4, 20))
    for scale, terms in [(0.2, 1), (0.2, 7), (2 / 4.5, 60)]:
        x = run(lambda b, s=scale, n=terms: neumann(product(spd), b, scale=s, num_terms=n), B)
        np.testing.assert_allclose(x, neumann_series(spd, B, scale, terms), rtol=1e-12)
    # the fastest scale, 2/(λ_max + λ_min): the error shrinks by 7/9 a term
    np.testing.assert_allclose(x, np.linalg.solve(spd, B), rtol=1e-5)


def test_neumann_is_differentiated_as_its_polynomial():
    """With a fixed number of terms the answer is a polynomial of ``A`` applied to ``b``:
    reverse mode through its terms gives that polynomial's derivative (brute force, the
    matrix powers differentiated by JAX), not the inverse's."""
    spd = symmetric(np.linspace(0.5, 4, 20))

    def series(a, b):
        step = jnp.eye(20) - 0.2 * a
        return 0.2 * sum(jnp.linalg.matrix_power(step, j) for j in range(5)) @ b

    def loss(a, b, solve):
        return jnp.sum(jnp.sin(solve(a, b)))

    want = jax.grad(loss, argnums=(0, 1))(spd, B, series)
    got = jax.grad(loss, argnums=(0, 1))(
        spd, B, lambda a, b: neumann(lambda x: a @ x, b, scale=0.2, num_terms=5))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_a_diverging_neumann_series_is_an_error_or_nan():
    """A scale above ``2/λ_max`` or a negative eigenvalue: the last residual is longer than
    ``b``; eagerly an error naming the scale, under ``jit`` NaN."""
    spd = symmetric(np.linspace(0.5, 4, 20))
    for a, scale in [(spd, 0.6), (INDEFINITE, 0.1)]:
        with pytest.raises(ValueError, match="series diverges.*smaller scale"):
            neumann(product(a), jnp.asarray(B), scale=scale, num_terms=50)
        x = jax.jit(lambda b: neumann(product(a), b, scale=scale, num_terms=50))(B)  # noqa: B023
        assert np.isnan(x).all()


@pytest.mark.parametrize("call, match", [
    (lambda: minres(lambda x: x, jnp.ones(3), rtol=float("nan")),
     "minres's rtol must be a finite number >= 0; got nan"),
    (lambda: minres(lambda x: x, jnp.ones(3), maxiter=-2),
     "minres's maxiter must be None or an integer >= 0; got -2"),
    (lambda: minres(lambda x: x[:2], jnp.ones(3)),
     r"minres: matvec\(x\) must answer a vector of the right-hand side's shape \(3,\)"),
    (lambda: minres(lambda x: x, jnp.ones((3, 2))), r"one flat vector; got shape \(3, 2\)"),
    (lambda: neumann(lambda x: x, jnp.ones(3), scale=0.5, num_terms=0),
     "neumann's num_terms must be an integer >= 1; got 0"),
    (lambda: neumann(lambda x: x, jnp.ones(3), scale=-1.0),
     r"neumann's scale must be a finite number > 0 \(below 2/λ_max"),
    (lambda: neumann(lambda x: x, jnp.ones(3), scale=float("inf")), "scale must be a finite"),
])
def test_options_out_of_their_domain_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------------- as solve methods
@pytest.fixture(scope="module")
def mlp():
    """The linen MLP's Fisher, implicit (in chunks of 3) and dense."""
    t = make_linen_mlp()
    implicit = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit, batch_size=3)
    return t, implicit, FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)


def test_eager_solves_of_the_matrix_free_fisher_are_the_traced_ones(mlp):
    """Eagerly (one compiled call each on one batch), MINRES and Neumann on the implicit
    Fisher: after ``k`` iterations (terms) the answer of the loop under ``jit``, and the
    next solve with the same options compiles nothing; MINRES converges to the dense
    Cholesky solve; Neumann's default scale is ``1/(‖F‖_F + regul)``."""
    t, F, dense = mlp
    v, w = (random_pvector(jax.random.PRNGKey(s), t.params) for s in (8, 9))
    traced = jax.jit(lambda M, b, m, k: M.solve(b, 0.1, method=m, **dict(k)),
                     static_argnums=(2, 3))
    for method, options in [("minres", (("maxiter", 3),)), ("minres", (("maxiter", 10),)),
                            ("neumann", (("num_terms", 4),))]:
        np.testing.assert_allclose(F.solve(v, 0.1, method=method, **dict(options)).to_flat(),
                                   traced(F, v, method, options).to_flat(), rtol=1e-9,
                                   atol=1e-12)
    F.solve(v, REGUL, method="minres", rtol=1e-6)
    with compilations() as compiled:
        x = F.solve(w, REGUL, method="minres", rtol=1e-12)
    assert compiled == []
    np.testing.assert_allclose(x.to_flat(), dense.solve(w, REGUL).to_flat(), rtol=1e-6,
                               atol=1e-7)
    d = dense.to_dense()
    scale = 1 / (np.linalg.norm(d) + 0.1)
    want = neumann_series(d + 0.1 * np.eye(len(d)), w.to_flat(), scale, 4)
    np.testing.assert_allclose(F.solve(w, 0.1, method="neumann", num_terms=4).to_flat(), want,
                               rtol=1e-9)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_an_eager_krylov_solve_of_a_non_finite_matrix_is_an_error(mlp, method):
    """A compiled eager CG/MINRES solve whose residual is not finite answers NaN (its loop
    stops at once); the eager call raises the loop's error instead, for any
    representation; under ``jit`` the answer stays NaN."""
    t, F, dense = mlp
    broken = PMatDense(dense.layer_collection, dense.to_dense().at[0, 0].set(jnp.nan))
    v = random_pvector(jax.random.PRNGKey(3), t.params)
    with pytest.raises(FloatingPointError, match=rf"{method}: the residual is not finite"):
        broken.solve(v, REGUL, method=method)
    assert np.isnan(jax.jit(lambda M: M.solve(v, REGUL, method=method))(broken).to_flat()).all()
    np.testing.assert_allclose(dense.solve(v, REGUL, method=method, rtol=1e-12).to_flat(),
                               dense.solve(v, REGUL).to_flat(), rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_an_eager_solve_of_a_singular_matrix_warns(method):
    """A representation's eager solve is one compiled call: its CG or MINRES reports a stop
    above the tolerance as the solvers driven from Python do (a ``RuntimeWarning``) —
    here ``v`` outside the range of a rank-3 ``M`` with ``regul = 0``: MINRES at a
    least-squares solution of minimum norm, ``M⁺ v`` (its residual ``(I − MM⁺) v``), CG at
    the default ``maxiter``.
    Inside a ``jit`` the same solve answers the same numbers, without a callback."""
    a = symmetric(np.r_[np.zeros(17), [0.5, 1.0, 2.0]], seed=7)
    layout = LayerCollection.from_params({"w": jnp.zeros(20)})
    M = PMatDense(layout, jnp.asarray(a))
    v = jnp.asarray(B)
    match = "singular" if method == "minres" else "not converged in 200"
    with pytest.warns(RuntimeWarning, match=match) as caught:
        x = np.asarray(M.solve(v, 0.0, method=method))
    assert [w.filename for w in caught] == [__file__]  # the caller's line, not jaxgeom's
    # a batch of right-hand sides (vmapped inside the compiled call): each row reports
    with pytest.warns(RuntimeWarning, match=match) as caught:
        rows = np.asarray(M.solve(jnp.stack([v, 2 * v]), 0.0, method=method))
    assert len([w for w in caught if re.search(match, str(w.message))]) == 2
    if method == "minres":  # CG's iterates on a singular system are round-off (10¹⁸)
        np.testing.assert_allclose(rows, [x, 2 * x], rtol=1e-9, atol=1e-9)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        traced = np.asarray(jax.jit(lambda M, v: M.solve(v, 0.0, method=method))(M, v))
        # the matrix and the vector closed over, concrete: the compiled call inlined into
        # the user's program, without the callback (it broke jax.export, warned every run)
        closed = jax.jit(lambda: M.solve(v, 0.0, method=method))
        assert "callback" not in str(jax.make_jaxpr(closed)())
        np.testing.assert_allclose(np.asarray(closed()), x, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(traced, x, rtol=1e-12, atol=1e-12)
    if method == "minres":  # the least-squares solution of minimum norm (MINRES-QLP's)
        pinv = np.linalg.pinv(a, hermitian=True)
        np.testing.assert_allclose(a @ x, a @ pinv @ B, atol=1e-8)
        np.testing.assert_allclose(x, pinv @ B, atol=1e-6 * np.linalg.norm(pinv @ B))


def test_minres_with_a_representation_as_preconditioner(mlp):
    """A diagonal Fisher (solved with the same damping) preconditions MINRES on the
    matrix-free one: the dense solve, eagerly and under ``jit``."""
    from jaxgeom import PMatDiag

    t, F, dense = mlp
    P = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag)
    w = random_pvector(jax.random.PRNGKey(4), t.params)
    want = dense.solve(w, REGUL).to_flat()

    def solve(M, P, w):
        return M.solve(w, REGUL, method="minres", preconditioner=P, rtol=1e-12)

    for run in (solve, jax.jit(solve)):
        np.testing.assert_allclose(run(F, P, w).to_flat(), want, rtol=1e-6, atol=1e-7)


def test_a_diverging_neumann_solve_names_the_scale(mlp):
    t, F, dense = mlp
    v = random_pvector(jax.random.PRNGKey(1), t.params)
    big = 3 / float(jnp.linalg.eigvalsh(dense.to_dense())[-1])
    for M in (F, dense):  # from Python, and the compiled call's NaN read after it
        with pytest.raises(ValueError, match="diverge.*scale"):
            M.solve(v, REGUL, method="neumann", scale=big, num_terms=40)
    with pytest.raises(TypeError, match=r"method='neumann'\) takes no option rtol"):
        dense.solve(v, REGUL, method="neumann", rtol=1e-3)
    with pytest.raises(ValueError, match="num_terms must be an integer >= 1"):
        dense.solve(v, REGUL, method="neumann", num_terms=0)


def test_minres_solves_an_indefinite_hessian_below_its_smallest_eigenvalue():
    """``H + ρI`` with ``ρ`` too small to make it positive definite: MINRES on the
    matrix-free Hessian solves it as the dense one's ``eigh`` does."""
    t = make_linen_mlp()

    def loss_fn(params, batch):
        x, y = batch
        logp = jax.nn.log_softmax(t.apply_fn(params, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    implicit = Hessian(loss_fn, t.params, (t.x, t.y), PMatImplicit)
    dense = Hessian(loss_fn, t.params, (t.x, t.y), PMatDense).to_dense()
    assert np.linalg.eigvalsh(dense + REGUL * np.eye(len(dense))).min() < -1e-6
    v = np.random.default_rng(0).standard_normal(len(dense))
    rhs = (dense + REGUL * np.eye(len(dense))) @ v
    x = implicit.solve(rhs, REGUL, method="minres", rtol=1e-12)
    np.testing.assert_allclose(x, v, rtol=1e-6, atol=1e-8)


def test_kronecker_dampings_are_not_iterative_solves():
    t = make_linen_mlp()
    K = FIM(t.apply_fn, t.params, (t.x, t.y), PMatKFAC)
    v = np.ones(K.size(0))
    for method in ("minres", "neumann"):
        with pytest.raises(ValueError, match=f"damps each Kronecker factor.*drop "
                                             f"method='{method}'"):
            K.solve(v, 0.1, method=method, damping="pi")


@pytest.mark.parametrize("run", EAGER_AND_JIT)
@pytest.mark.parametrize("spectrum, seed", [
    (np.r_[np.zeros(3), np.linspace(-2, -0.5, 4), np.logspace(-1, 1, 13)], 4),  # grows slowly
    (np.r_[np.zeros(17), [0.5, 1.0, 2.0]], 7),  # a pivot of round-off once the space is spent
])
def test_minres_of_an_inconsistent_singular_system_answers_the_minimum_norm_solution(
        run, spectrum, seed):
    """``b`` with a component in the null space of a singular ``A``: no ``x`` solves it.
    MINRES(-QLP) answers the least-squares solution of minimum norm, ``A⁺ b`` — the
    residual ``(I − AA⁺) b`` — where plain MINRES went on dividing round-off by vanishing
    pivots (``‖x‖ ≈ 10¹⁶``), and then, its iterates past round-off refused, answered one of
    arbitrary null-space part (``‖x‖`` 7 to 10⁶ times ``‖A⁺ b‖``). Eagerly it warns that the
    matrix is singular."""
    a = symmetric(spectrum, seed=seed)
    b = np.random.RandomState(5).randn(20)
    pinv = np.linalg.pinv(a, hermitian=True)
    if run is EAGER_AND_JIT[0].values[0]:
        with pytest.warns(RuntimeWarning, match="singular"):
            x = np.asarray(run(lambda b: minres(product(a), b, rtol=1e-10), b))
    else:
        x = np.asarray(run(lambda b: minres(product(a), b, rtol=1e-10), b))
    np.testing.assert_allclose(x, pinv @ b, rtol=0, atol=1e-4 * np.linalg.norm(pinv @ b))
    np.testing.assert_allclose(a @ x - b, -(b - a @ pinv @ b), rtol=0,
                               atol=1e-4 * np.linalg.norm(b))


@pytest.mark.parametrize("diagonal", [[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
def test_minres_of_a_right_hand_side_in_the_null_space_says_no_solution_exists(diagonal):
    """``A b = 0`` (``b`` in the null space of a singular ``A``; ``A = 0``): the first Lanczos
    column is zero, ``A⁺ b = 0`` is the answer and the residual stays ``‖b‖``. The zero
    column's rotation had been the identity's, which zeroed the residual's estimate: the
    solve reported convergence, without a word, where no solution exists."""
    a = np.diag(diagonal)
    b = jnp.asarray([0.0, 0.0, 1.0, 0.5])
    with pytest.warns(RuntimeWarning, match="singular.*not in its range"):
        x = minres(product(a), b)
    np.testing.assert_array_equal(np.asarray(x), np.zeros(4))
    F = PMatDiag(LayerCollection.from_params({"w": jnp.zeros(4)}), jnp.asarray(diagonal))
    with pytest.warns(RuntimeWarning, match="singular.*not in its range"):
        x = F.solve({"w": b}, 0.0, method="minres")["w"]
    np.testing.assert_array_equal(np.asarray(x), np.zeros(4))


@pytest.mark.parametrize("dtype, regul", [(np.float64, 1e-6), (np.float32, 1e-3)])
def test_minres_solves_a_damped_ill_conditioned_system(dtype, regul):
    """A damped rank-deficient Fisher (``1/k³`` for 100 eigenvalues, 100 zeros, ``+ λI``:
    condition ``1/λ``) is nonsingular: MINRES reaches its tolerance, without a warning
    (a least-squares stopping test, SciPy's ``‖A r‖ ≤ rtol ‖A‖ ‖r‖``, had stopped it at a
    relative residual of 0.9 and called it singular)."""
    spectrum = np.r_[1.0 / np.arange(1, 101) ** 3, np.zeros(100)] + regul
    a = symmetric(spectrum, seed=8).astype(dtype)
    b = np.random.RandomState(9).randn(200).astype(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = np.asarray(minres(product(a), jnp.asarray(b)), np.float64)
    residual = np.linalg.norm(a.astype(np.float64) @ x - b) / np.linalg.norm(b)
    assert residual <= (2e-5 if dtype == np.float64 else 1e-4)


@pytest.mark.parametrize("scale_a, scale_b", [(1e-2, 1.0), (1.0, 1e6), (1e3, 1e-3)])
def test_minres_in_float32_is_scale_invariant(scale_a, scale_b):
    """``(sA) x = t b`` has the solution ``(t/s) x``, whatever ``s`` and ``t``: MINRES's stops
    compare like with like (its estimate of ``‖A‖`` had counted ``‖b‖``, and a float32
    solve with ``‖A‖ = 10⁻²`` stopped at ``x ≈ 0``)."""
    a = symmetric(np.logspace(-3, 0, 60), seed=10)
    b = np.random.RandomState(11).randn(60)
    want = np.linalg.solve(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = minres(product((scale_a * a).astype(np.float32)),
                   jnp.asarray(scale_b * b, jnp.float32))
    np.testing.assert_allclose(np.asarray(x, np.float64) * scale_a / scale_b, want,
                               rtol=0, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize("solver", [cg, minres])
def test_an_eager_solve_that_stops_at_the_default_maxiter_warns(solver):
    """A solve stopped by the default ``maxiter`` (``10 d``) above its tolerance (0 here:
    never reached) answers its last iterate with a ``RuntimeWarning`` that names the
    residual and the fixes; a ``maxiter`` of the caller's is a budget, stopped at quietly."""
    a = symmetric(np.logspace(-1, 1, 20), seed=6)
    with pytest.warns(RuntimeWarning, match=r"not converged in 200 iterations"):
        x = solver(product(a), jnp.asarray(B), rtol=0.0)
    np.testing.assert_allclose(a @ np.asarray(x), B, atol=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = solver(product(a), jnp.asarray(B), maxiter=3)
    assert np.linalg.norm(a @ np.asarray(x) - B) > 1e-3 * np.linalg.norm(B)
