"""Iterative solvers of symmetric systems on flat vectors: conjugate gradient (positive
definite), MINRES (indefinite or singular) and the truncated Neumann series (positive
definite, a fixed polynomial of the matrix).

Each is jit-able (a ``lax`` loop) and driven from Python when the operator runs eagerly
(``PMatImplicit``, whose chunk loop calls compiled steps of its own). Every
representation's ``solve(v, regul, method=...)`` offers all three on ``M + regul·I``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._reporting import collects_here, report_when_run, warn

Matvec = Callable[[jax.Array], jax.Array]


def cg(
    matvec: Matvec,
    b: jax.Array,
    *,
    x0: jax.Array | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> jax.Array:
    """Preconditioned conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite.

    Stops when ``‖A x − b‖ ≤ max(rtol·‖b‖, atol)`` or after ``maxiter`` iterations
    (default ``10 · len(b)``). ``preconditioner(r)`` applies ``P⁻¹`` to a residual
    (e.g. the ``solve`` of a cheap representation of the same matrix). Stopped by the
    default ``maxiter`` above the tolerance, an eager solve warns (``RuntimeWarning``), as
    does a representation's eager ``solve`` (:func:`jaxgeom._reporting.reporting`); a
    ``maxiter`` of the caller's is a budget, stopped at quietly.

    Cost: one ``matvec`` (and one preconditioner application) per iteration; from ``x0 =
    None`` the residual is ``b`` (no product with the zero vector), from an ``x0`` one more
    product, ``A x0``.

    Traced (under ``jit``, ``vmap``, … or with an operator that closes over traced arrays)
    the iterations are a ``lax.while_loop``. With an operator that runs eagerly and answers
    concrete arrays (``PMatImplicit``, whose chunk loop calls compiled steps of its own)
    they are driven from Python instead: a ``while_loop`` would trace the operator, its
    chunk loop unrolled into one program, and compile it again at every call (its closures
    are new), ≈ 1.3 s a solve on a 7k-parameter MLP against 0.15 s for the same iterations.
    Traced, the loop runs inside ``lax.custom_linear_solve``: derivatives (``jvp``,
    reverse mode) are those of the solution ``A⁻¹ b``, the adjoint system solved by the
    same CG (``A`` symmetric), not of the iterations.
    """
    return _krylov_solve(_CG, matvec, b, x0, preconditioner, rtol, atol, maxiter)


def minres(
    matvec: Matvec,
    b: jax.Array,
    *,
    x0: jax.Array | None = None,
    preconditioner: Matvec | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> jax.Array:
    """MINRES (Paige & Saunders, 1975) for ``A x = b`` with ``A`` symmetric, possibly
    indefinite (a Hessian away from a minimum) or singular, in its QLP form (Choi, Paige &
    Saunders, 2011).

    Each iterate minimises ``‖A x − b‖`` over ``x0`` plus the Krylov space
    ``span{r₀, A r₀, …}``, updated by the symmetric Lanczos recurrence and Givens rotations
    (no basis is stored: memory a few vectors). MINRES's steps while the tridiagonal's
    condition estimate is below :data:`TRANSFER_CONDITION`; then QLP steps, which rotate
    the triangular factor into a lower triangular ``L`` whose pivots reveal the rank: a
    pivot of round-off (:data:`RANK_RATIOS`) is a direction in ``A``'s null space, left
    out, and the iterations stop. So for a singular ``A``, from ``x0 = 0``, the answer is
    the minimum-norm solution ``A⁺ b`` whether ``b`` is in the range (the solution of
    least norm, what an LSMR solve gives, with one product an iteration instead of two)
    or not (no solution: the least-squares one of least norm, residual ``(I − AA⁺) b``;
    plain MINRES's had an arbitrary null-space part, 7 to 10⁶ times ``‖A⁺ b‖`` on the
    tests' systems). CG breaks down on indefinite systems (``pᵀ A p ≤ 0``); MINRES does
    not.

    Stops when the residual ``‖A x − b‖`` (with a preconditioner its ``P⁻¹``-norm) is
    ``≤ max(rtol·‖b‖, atol)`` (``‖b‖`` in the same norm), at a pivot of round-off, when the
    iterate grows past what round-off allows (``‖A‖ ‖x‖ ε ≥ ‖r₀‖``), or after ``maxiter``
    iterations (default ``10 · len(b)``). ``preconditioner(r)`` applies ``P⁻¹``, which must
    be symmetric positive definite (a non-PSD one gives a non-finite residual: an error
    eagerly, NaN under ``jit``). A stop above the tolerance warns (:func:`cg`).

    Cost: one ``matvec`` and one preconditioner application per iteration, as CG, and
    about a dozen vector updates.

    Driven from Python for an eager operator and differentiated as the solution
    ``A⁻¹ b`` (``lax.custom_linear_solve``, ``A`` nonsingular), as :func:`cg`.

    References: C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of
    linear equations", SIAM J. Numer. Anal. 12 (1975); S.-C. T. Choi, C. C. Paige and
    M. A. Saunders, "MINRES-QLP: a Krylov subspace method for indefinite or singular
    symmetric systems", SIAM J. Sci. Comput. 33 (2011); S.-C. T. Choi and M. A. Saunders,
    "Algorithm 937: MINRES-QLP for symmetric and Hermitian linear equations and
    least-squares problems", ACM TOMS 40 (2014).
    """
    return _krylov_solve(_MINRES, matvec, b, x0, preconditioner, rtol, atol, maxiter)


def neumann(
    matvec: Matvec,
    b: jax.Array,
    *,
    scale: Any,
    num_terms: int = 100,
) -> jax.Array:
    """The truncated Neumann series ``x = s Σ_{j<K} (I − s A)ʲ b ≈ A⁻¹ b``
    (``s = scale``, ``K = num_terms``), for ``A`` symmetric positive definite.

    Computed as Richardson's iteration ``x ← x + s (b − A x)`` from ``x = 0`` (LiSSA's
    recursion with a fixed operator; Agarwal et al., 2017; Koh & Liang, 2017): ``K − 1``
    products. The error is ``(I − s A)ᴷ A⁻¹ b``: the series converges if and only if
    ``0 < s < 2/λ_max(A)`` and ``A ≻ 0``, at the rate ``max |1 − s λ|`` per term
    (``s = 2/(λ_max + λ_min)`` is the fastest). With a fixed ``K`` the answer is a fixed
    polynomial of ``A`` applied to ``b``, a symmetric linear map: differentiated through
    its terms (reverse mode included), jit-able with a static ``num_terms``.

    A diverging series is an error eagerly and NaN under ``jit``: the residuals
    ``r_k = b − A x_k = (I − s A)ᵏ b`` never grow in norm while ``|1 − s λ| ≤ 1`` for every
    eigenvalue ``λ``, so a last residual larger than ``‖b‖`` proves the series diverges.

    Cost: ``K − 1`` products, memory three vectors.
    """
    if b.ndim != 1:
        raise ValueError(f"neumann solves for one flat vector; got shape {b.shape}")
    check_neumann_options(scale=scale, num_terms=num_terms)
    x = jnp.asarray(scale, b.dtype) * b  # the first term: no product
    if num_terms == 1:
        return x
    ax = matvec(x)
    _check_shape("neumann", ax, b, "matvec(x)")
    r = b - ax  # the iterates in its dtype: the operator's and b's promoted
    x, b, s = x.astype(r.dtype), b.astype(r.dtype), jnp.asarray(scale, r.dtype)
    if not _traced(r):
        for _ in range(num_terms - 2):
            x = _richardson_step(x, r, s)
            r = _difference(b, matvec(x))
        x = _richardson_step(x, r, s)
        residual, rhs = float(jnp.linalg.norm(r)), float(jnp.linalg.norm(b))
        if not np.isfinite(residual):
            raise FloatingPointError(
                f"neumann: the residual is not finite after {num_terms - 1} terms (NaN/inf in "
                "the right-hand side or in the operator's products, or a series that "
                "overflowed: a scale far above 2/λ_max)")
        if residual > rhs:
            raise ValueError(
                f"neumann: the series diverges (‖b − A x‖ = {residual:.3g} after "
                f"{num_terms - 1} terms > ‖b‖ = {rhs:.3g}): scale={float(s):.3g} is not below "
                "2/λ_max, or the matrix (with its damping) is not positive definite. Pass a "
                "smaller scale (a matrix's solve defaults to 1/(‖M‖_F + regul)), or use "
                "method='minres' for an indefinite matrix")
        return x

    def term(_, state):
        x, r = state
        x = _richardson_step(x, r, s)
        return x, b - matvec(x)

    x, r = jax.lax.fori_loop(0, num_terms - 2, term, (x, r))
    x = _richardson_step(x, r, s)
    return jnp.where(jnp.linalg.norm(r) <= jnp.linalg.norm(b), x, jnp.nan)


@jax.jit
def _richardson_step(x, r, s):
    return x + s * r


@jax.jit
def _difference(b, ax):
    return b - ax


# ---------------------------------------------------------------------- Krylov methods
class _KrylovMethod(NamedTuple):
    """One Krylov solver as the pieces that :func:`_krylov_solve` drives, under a trace
    (a ``lax.while_loop``) or from Python (each piece a compiled call). An iteration is
    ``advance(state, A · vector(state))``, which answers the state and the residual to
    precondition, then ``direct(state, P⁻¹ r)``; ``residual_norm`` is what stops it."""

    name: str
    start: Callable  # (x, r, z = P⁻¹ r) -> state
    advance: Callable  # (state, product) -> (state, residual)
    direct: Callable  # (state, preconditioned residual) -> state
    vector: Callable  # state -> the vector multiplied next
    residual_norm: Callable  # state -> the norm compared with the threshold
    rhs_norm: Callable  # (b, precondition) -> ‖b‖ in the residual's norm
    solution: Callable  # state -> x
    #: state -> whether to stop above the threshold: no better answer will come
    stalled: Callable = lambda state: False


def _krylov_solve(method: _KrylovMethod, matvec, b, x0, preconditioner, rtol, atol,
                  maxiter):
    name = method.name
    if b.ndim != 1:
        raise ValueError(f"{name} solves for one flat vector; got shape {b.shape}")
    check_cg_options(rtol=rtol, atol=atol, maxiter=maxiter, preconditioner=preconditioner,
                     name=name)
    # a maxiter of the caller's is a budget (a truncated solve): only the default's warns
    warns = maxiter is None
    maxiter = 10 * b.shape[0] if maxiter is None else int(maxiter)
    if x0 is not None and jnp.shape(x0) != b.shape:  # a (d, 1) x0 broadcast to (d, d)
        raise ValueError(f"{name}'s x0 must have the right-hand side's shape {b.shape}; got "
                         f"shape {jnp.shape(x0)}")

    def precondition(r):
        return r if preconditioner is None else preconditioner(r).astype(r.dtype)

    if x0 is None:
        # x = 0, r = b: no product with the zero vector. The first iteration's product,
        # A·vector(start(0, b, P⁻¹b)), made now, tells the operator's dtype and whether it
        # is traced; called eagerly, the iterations start with it.
        z = precondition(b)
        _check_shape(name, z, b, "preconditioner(r)")
        state = method.start(jnp.zeros_like(b), b, z)
        first = matvec(method.vector(state))
        _check_shape(name, first, b, "matvec(x)")
        dtype = jnp.result_type(b, first)
        if not _traced(first) and not _traced(z):
            if dtype != b.dtype:  # a float32 vector against a float64 matrix: in float64
                b = b.astype(dtype)
                z = precondition(b)
                state, first = method.start(jnp.zeros_like(b), b, z), None
            threshold = jnp.maximum(rtol * method.rhs_norm(b, precondition), atol)
            return _krylov_from_python(method, matvec, precondition, state, threshold,
                                       maxiter, rtol, warns, first)
        x, r = None, b.astype(dtype)
    else:
        x = jnp.asarray(x0, b.dtype)
        ax = matvec(x)
        _check_shape(name, ax, b, "matvec(x)")
        r = b - ax
        # the iterates in the residual's dtype: the operator's and b's promoted (a float32
        # vector against a float64 matrix), so that the loop's state keeps one dtype
        x = x.astype(r.dtype)
        z = precondition(r)
        _check_shape(name, z, b, "preconditioner(r)")
        if not _traced(r) and not _traced(z):
            threshold = jnp.maximum(rtol * method.rhs_norm(b.astype(r.dtype), precondition),
                                    atol)
            return _krylov_from_python(method, matvec, precondition, method.start(x, r, z),
                                       threshold, maxiter, rtol, warns)

    def solve(matvec, b):
        """The iterations as a ``lax.while_loop`` from ``x``, for ``b`` (the right-hand
        side, or a cotangent when differentiated in reverse mode)."""
        r = b if x is None else b - matvec(x)
        z = precondition(r)
        threshold = jnp.maximum(rtol * method.rhs_norm(b, precondition), atol)

        def cond(carry):
            state, k = carry
            return ((method.residual_norm(state) > threshold) & (k < maxiter)
                    & jnp.logical_not(method.stalled(state)))

        def body(carry):
            state, k = carry
            state, r = method.advance(state, matvec(method.vector(state)))
            return method.direct(state, precondition(r)), k + 1

        start = method.start(jnp.zeros_like(r) if x is None else x, r, z)
        state, k = jax.lax.while_loop(cond, body, (start, jnp.asarray(0)))
        # a NaN residual stops the loop at once (NaN > threshold is false): NaN, not x
        solution = jnp.where(jnp.isfinite(method.residual_norm(state)),
                             method.solution(state), jnp.nan)
        if not reports:
            return solution
        return solution, (method.residual_norm(state), threshold, method.stalled(state), k)

    # an eager representation's solve (its compiled call): the stop answered beside the
    # solution and reported after the call (``jaxgeom._reporting``)
    reports = collects_here()
    # differentiable (forward and reverse mode) through the solution of A x = b, not
    # through the iterations: the adjoint system is solved by the same method (A symmetric)
    solution = jax.lax.custom_linear_solve(matvec, b.astype(r.dtype), solve, symmetric=True,
                                           has_aux=reports)
    if not reports:
        return solution
    solution, stop = solution
    report_when_run(functools.partial(_report_stop, name, maxiter, warns), *stop)
    return solution


def _krylov_from_python(method: _KrylovMethod, matvec, precondition, state, threshold,
                        maxiter, rtol, warns, first: jax.Array | None = None):
    """:func:`_krylov_solve`'s iterations for an eager ``matvec``: each one ``matvec``, the
    preconditioner and two compiled updates; the stopping test reads the residual's norm
    (and MINRES's :func:`_minres_stalled`). ``first``:
    the first iteration's product, when already made."""
    threshold = float(threshold)
    k = 0
    while (k < maxiter and float(method.residual_norm(state)) > threshold
           and not bool(method.stalled(state))):
        product = first if k == 0 and first is not None else matvec(method.vector(state))
        state, r = method.advance(state, product)
        state = method.direct(state, precondition(r))
        k += 1
    residual = float(method.residual_norm(state))
    if not np.isfinite(residual):
        raise FloatingPointError(non_finite_residual(method.name, f"after {k} iterations"))
    _report_stop(method.name, maxiter, warns, residual, threshold,
                 bool(method.stalled(state)), k)
    return method.solution(state)


def _report_stop(name: str, maxiter: int, warns: bool, residual, threshold, stalled, k
                 ) -> None:
    """Warn (``RuntimeWarning``) of a Krylov solve that stopped above its tolerance: at a
    pivot of round-off or an iterate past round-off, a singular system without a solution
    (``stalled``, always), or at the default ``maxiter`` (``warns``; a ``maxiter`` of the
    caller's is a budget)."""
    residual, threshold, stalled, k = float(residual), float(threshold), bool(stalled), int(k)
    if not residual > threshold or not (warns or stalled):  # NaN: an error elsewhere
        return
    if stalled:
        what = (f"stopped after {k} iterations at a pivot of round-off (or an iterate past "
                f"what round-off allows), residual "
                f"{residual:.3g} above the tolerance {threshold:.3g}: the matrix is singular "
                "(or numerically so) and the right-hand side is not in its range, so no "
                "solution exists; answered the least-squares solution of minimum norm "
                "(A⁺ b, to round-off). Damp the system (regul > 0) for a unique solution")
    else:
        what = (f"not converged in {maxiter} iterations (the default maxiter, 10 d): residual "
                f"{residual:.3g} above the tolerance {threshold:.3g}. Raise maxiter, "
                "precondition, or damp the system (regul > 0)"
                + (" — CG needs a positive definite matrix: for a singular or indefinite one "
                   "use method='minres'" if name == "cg" else
                   " — a residual that stopped falling: the right-hand side may be outside "
                   "the range of a singular matrix (then no solution exists; this is a "
                   "least-squares one)"))
    warn(f"{name}: {what}")




def non_finite_residual(name: str, when: str) -> str:
    """The message of a Krylov solve (``"cg"``, ``"minres"``) whose residual is not finite
    ``when`` (``"after 12 iterations"``; under ``jit`` its solution is NaN instead)."""
    return (f"{name}: the residual is not finite {when} (NaN/inf in the right-hand side or in "
            "the operator's products, e.g. a matrix built from non-finite data"
            + (", or a preconditioner that is not positive definite)" if name == "minres"
               else "; or a singular or indefinite matrix, which CG cannot solve: damp it, "
               "regul > 0, or use method='minres')"))


def _traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _preconditioned_norm(b, precondition):
    """``‖b‖_{P⁻¹} = (bᵀ P⁻¹ b)^{1/2}`` (``‖b‖`` without a preconditioner)."""
    return jnp.sqrt(jnp.abs(jnp.vdot(b, precondition(b))))


# --- conjugate gradient: state (x, r, p, rz = rᵀz, ‖r‖). Each update's compiled call answers
# only what it changes; the vectors it passes on are put back into the state in Python (a
# compiled call's outputs are new buffers: passed through it, they were copied, four
# vectors an iteration)
@jax.jit
def _cg_start(x, r, z):
    return x, r, z, jnp.vdot(r, z), jnp.linalg.norm(r)


@jax.jit
def _cg_step(state, ap):
    """``x + α p`` and ``r − α A p``, ``α = rᵀz / pᵀAp``."""
    x, r, p, rz, _ = state
    alpha = rz / jnp.vdot(p, ap)
    return x + alpha * p, r - alpha * ap


def _cg_advance(state, ap):
    x, r = _cg_step(state, ap)
    return (x, r, *state[2:]), r


@jax.jit
def _cg_turn(state, z):
    """The next direction ``z + (rᵀz / rz) p``, ``rᵀz`` and ``‖r‖``."""
    _, r, p, rz, _ = state
    rz_new = jnp.vdot(r, z)
    return z + (rz_new / rz) * p, rz_new, jnp.linalg.norm(r)


def _cg_direction(state, z):
    return (*state[:2], *_cg_turn(state, z))


_CG = _KrylovMethod(
    name="cg", start=_cg_start, advance=_cg_advance, direct=_cg_direction,
    vector=lambda state: state[2], residual_norm=lambda state: state[4],
    rhs_norm=lambda b, precondition: jnp.linalg.norm(b), solution=lambda state: state[0])


# --- MINRES-QLP (Choi, Paige & Saunders 2011): MINRES's Lanczos process and left
# rotations, and right rotations of the triangular factor (``R Pᵀ = L``, lower triangular)
# that reveal its rank, so that the iterate is the minimum-length least-squares solution
# of the projected problem; MINRES's steps until :data:`TRANSFER_CONDITION` (``qlp``
# false). The vectors: the iterate ``x`` (in QLP steps ``x_{k-2} + w_{k-1} μ_{k-1} + w_k
# μ_k``, ``xl2`` holding ``x0`` and the settled part) and the last two directions ``w``,
# ``wl`` (MINRES's or QLP's); the Lanczos vectors ``r1``, ``r2`` (unpreconditioned) and
# ``v = P⁻¹ r2 / β``. The scalars are
# the published recurrences' (names after them), with ``‖A‖`` (``anorm``) estimated
# from the tridiagonal, the residual's norm ``phi``,
# ``‖r₀‖`` (``beta1``) and the iteration ``k`` (from 1 in :func:`_qlp_direct`).
class _MinresState(NamedTuple):
    xl2: jax.Array
    x: jax.Array
    r1: jax.Array
    r2: jax.Array
    v: jax.Array
    w: jax.Array
    wl: jax.Array
    alpha: jax.Array
    beta: jax.Array
    old_beta: jax.Array
    cs: jax.Array
    sn: jax.Array
    dltan: jax.Array
    eplnn: jax.Array
    gama: jax.Array
    gamal: jax.Array
    gamal2: jax.Array
    tau: jax.Array
    taul: jax.Array
    phi: jax.Array
    cr1: jax.Array
    sr1: jax.Array
    cr2: jax.Array
    sr2: jax.Array
    eta: jax.Array
    etal: jax.Array
    vepln: jax.Array
    veplnl: jax.Array
    ul: jax.Array
    ul2: jax.Array
    ul3: jax.Array
    u: jax.Array
    xl2norm: jax.Array
    xnorm: jax.Array
    anorm: jax.Array
    gmin: jax.Array
    gminl: jax.Array
    #: the last step's ``gamal`` before its final rotation, which a switch to QLP steps
    #: converts MINRES's directions with (the published code's ``gamal_QLP``; its
    #: ``vepln_QLP``, ``gama_QLP``, ``ul_QLP``, ``u_QLP`` are the last step's ``vepln``,
    #: ``gama``, ``ul``, ``u``)
    gamal_q: jax.Array
    beta1: jax.Array
    k: jax.Array
    qlp: jax.Array
    broke: jax.Array


#: a pivot ``|γ| ≤ c · ε · ‖A‖`` of the rank-revealing factor is zero, ``c`` by the
#: dtype's size: the system is singular to working precision along that direction, which
#: the iterate leaves out (the least-squares solution of minimum length), and the
#: iterations stop. Measured on singular systems (spectra to 10⁻⁴ ‖A‖ beside zeros, right-
#: hand sides outside the range) against the pseudo-inverse's solution: in float64 the
#: pivots that round-off leaves in a null direction reach 10²–10³ ε (relative errors 10⁻²
#: at ``c = 1``, 10⁻⁵–10⁻⁶ at ``c = 100``; nonsingular systems keep every eigenvalue above
#: 2·10⁻¹⁴ ‖A‖); in float32 the pivots of eigenvalues of 10⁻⁴ ‖A‖ already come within
#: 10 ε (errors 2·10⁻² at ``c = 1``, 0.2–0.8 at ``c = 10``–``100``, and a nonsingular
#: system of condition 10⁶ cut short).
RANK_RATIOS = {8: 100.0, 4: 1.0}

#: MINRES's steps (cheaper, and in float32 more accurate: a damped system of condition 10³
#: to a relative residual of 2·10⁻⁵ against 1.4·10⁻⁴) until the estimate of the condition
#: number reaches this, or a pivot is round-off; QLP steps after (the published code's
#: ``TranCond``)
TRANSFER_CONDITION = 1e7


def _safe_divide(v, beta):
    """``v / β``, zero where ``β = 0`` (before the first step; an invariant Krylov space:
    the exact solution)."""
    return jnp.where(beta != 0, v / jnp.where(beta != 0, beta, 1), 0)


def _givens(a, b):
    """``(c, s, r)`` with ``r = (a² + b²)^{1/2} ≥ 0`` and ``[c s] [a b]ᵀ = r`` (``(1, 0,
    0)`` for ``a = b = 0``)."""
    r = jnp.hypot(a, b)
    return jnp.where(r > 0, a / jnp.where(r > 0, r, 1), 1), _safe_divide(b, r), r


@jax.jit
def _minres_start(x, r, z):
    beta = jnp.sqrt(jnp.vdot(r, z))
    zero, one = jnp.zeros_like(beta), jnp.ones_like(beta)
    return _MinresState(
        xl2=x, x=x, r1=r, r2=r, v=_safe_divide(z, beta), w=jnp.zeros_like(x),
        wl=jnp.zeros_like(x), alpha=zero, beta=beta, old_beta=zero, cs=-one, sn=zero,
        dltan=zero, eplnn=zero, gama=zero, gamal=zero, gamal2=zero, tau=zero, taul=zero,
        phi=beta, cr1=-one, sr1=zero, cr2=-one, sr2=zero, eta=zero, etal=zero, vepln=zero,
        veplnl=zero, ul=zero, ul2=zero, ul3=zero, u=zero, xl2norm=zero,
        xnorm=jnp.linalg.norm(x), anorm=zero, gmin=zero, gminl=zero, gamal_q=zero,
        beta1=beta,
        k=jnp.zeros((), jnp.int32), qlp=jnp.zeros_like(beta, bool),
        broke=jnp.zeros_like(beta, bool))


# (as CG's, each update's compiled call answers only the fields it changes)
@jax.jit
def _minres_lanczos(s: _MinresState, av):
    """The Lanczos step: ``y = A v − (β/β_old) r1 − (α/β) r2``, and ``α``."""
    y = av - _safe_divide(s.beta, s.old_beta) * s.r1
    alpha = jnp.vdot(s.v, y)
    return y - _safe_divide(alpha, s.beta) * s.r2, alpha


def _minres_advance(s: _MinresState, av):
    y, alpha = _minres_lanczos(s, av)
    return s._replace(r1=s.r2, r2=y, alpha=alpha), y


@jax.jit
def _qlp_direct(s: _MinresState, z) -> dict:
    """``β_{k+1} = (r2ᵀ P⁻¹ r2)^{1/2}``; the left rotations of the tridiagonal's new column
    (MINRES's), the right ones of its triangular factor and the coefficients ``μ`` of the
    directions (forward substitution in ``L``); then the step: MINRES's (``x + τ w``, ``w``
    the triangular factor's direction) while the condition estimate is below
    :data:`TRANSFER_CONDITION`, else QLP's (the last three directions rotated,
    ``x = x_{k-2} + w_{k-1} μ_{k-1} + w_k μ_k``; MINRES's directions converted at the
    switch). A pivot of round-off (:data:`RANK_RATIOS`) or an iterate past what round-off
    allows (``‖A‖ ‖x‖ ε ≥ ‖r₀‖``) leaves its direction out and stops (``broke``). Answers
    the changed fields."""
    k = s.k + 1
    second, third = k > 1, k > 2
    alpha, beta, betal = s.alpha, s.beta, s.old_beta
    betan = jnp.sqrt(jnp.vdot(s.r2, z))
    eps = jnp.finfo(beta.dtype).eps
    # a column's norm in the tridiagonal, ‖A‖'s estimate (β₁ is ‖r₀‖, not one of T's)
    pnorm = jnp.sqrt(jnp.where(third, betal**2, 0) + alpha**2 + betan**2)
    # the previous left rotation, then the current one (MINRES's)
    dbar = s.dltan
    dlta = s.cs * dbar + s.sn * alpha
    dlta_minres = dlta
    gbar = s.sn * dbar - s.cs * alpha
    epln = s.eplnn
    eplnn = s.sn * betan
    dltan = -s.cs * betan
    gamal2, gamal = s.gamal, s.gama
    cs, sn, gama = _givens(gbar, betan)
    # a zero column (an invariant Krylov space on which A is zero: b in A's null space, or
    # A = 0) leaves the residual as it is: the rotation (0, 1), not _givens' (1, 0),
    # whose φ = 0 read as convergence where no solution exists
    cs, sn = jnp.where(gama == 0, 0, cs), jnp.where(gama == 0, 1, sn)
    gama_minres = gama
    taul2, taul = s.taul, s.tau
    tau = cs * s.phi
    phi = sn * s.phi
    # the right rotation P_{k-2,k} of the previous step, then P_{k-1,k}
    veplnl2, etal2, etal = s.veplnl, s.etal, s.eta
    veplnl = jnp.where(third, s.cr2 * s.vepln + s.sr2 * dlta, s.veplnl)
    dlta = jnp.where(third, s.sr2 * s.vepln - s.cr2 * dlta, dlta)
    eta = jnp.where(third, s.sr2 * gama, s.eta)
    gama = jnp.where(third, -s.cr2 * gama, gama)
    cr1, sr1, rotated = _givens(gamal, dlta)
    cr1, sr1 = jnp.where(second, cr1, s.cr1), jnp.where(second, sr1, s.sr1)
    gamal = jnp.where(second, rotated, gamal)
    vepln = jnp.where(second, sr1 * gama, s.vepln)
    gama = jnp.where(second, -cr1 * gama, gama)
    # the coefficients of the directions: forward substitution in L
    ul4, ul3 = s.ul3, s.ul2
    ul2 = jnp.where(third, _safe_divide(taul2 - etal2 * ul4 - veplnl2 * ul3, gamal2), s.ul2)
    ul = jnp.where(second, _safe_divide(taul - etal * ul3 - veplnl * ul2, gamal), s.ul)
    anorm = jnp.maximum(jnp.maximum(s.anorm, pnorm), jnp.maximum(gamal, jnp.abs(gama)))
    xl2norm = jnp.hypot(s.xl2norm, ul2)
    u = _safe_divide(tau - eta * ul2 - vepln * ul, gama)
    xnorm = jnp.sqrt(xl2norm**2 + ul**2 + u**2)
    singular = jnp.abs(gama) <= RANK_RATIOS.get(beta.dtype.itemsize, 1.0) * eps * anorm
    broke = singular | (anorm * xnorm * eps >= s.beta1)
    u = jnp.where(broke, 0, u)
    xnorm = jnp.where(broke, jnp.hypot(xl2norm, ul), xnorm)
    qlp = s.qlp | singular | (second & (s.gmin * TRANSFER_CONDITION <= s.anorm))
    step = jnp.where(broke, 0, tau)

    def minres_step():
        w = _safe_divide(s.v - epln * s.wl - dlta_minres * s.w, gama_minres)
        return s.xl2, s.x + step * w, w, s.w

    def qlp_step():
        # at the switch, MINRES's directions w_{k-2}, w_{k-1} converted (the published
        # code's, with x = x_{k-2} + w_{k-2} μ_{k-2}' + …)
        switch = ~s.qlp
        wl_in = jnp.where(switch & third, s.gamal_q * s.wl + s.vepln * s.w, s.wl)
        w_in = jnp.where(switch & second, s.gama * s.w, s.w)
        xl2_in = jnp.where(switch, s.x - wl_in * s.ul - w_in * s.u, s.xl2)
        # the directions w_{k-2}, w_{k-1}, w_k rotated by P_{k-2,k} and P_{k-1,k} (the
        # first two steps: as the third with P_{k-2,k} the identity's reflection, their
        # older directions being zero)
        cr2, sr2 = jnp.where(third, s.cr2, -1), jnp.where(third, s.sr2, 0)
        wl2 = wl_in * cr2 + s.v * sr2
        turned = wl_in * sr2 - s.v * cr2
        wl = w_in * cr1 + turned * sr1
        w = w_in * sr1 - turned * cr1
        xl2 = xl2_in + wl2 * ul2
        return xl2, xl2 + wl * ul + w * u, w, wl

    # one of the two steps' vector work (both where ``qlp`` is batched, under vmap)
    xl2, x, w, wl = jax.lax.cond(qlp, qlp_step, minres_step)
    # the next right rotation P_{k-1,k+1}
    gamal_q = gamal
    cr2, sr2, gamal = _givens(gamal, eplnn)
    gmin = jnp.where(second, jnp.minimum(jnp.minimum(s.gminl, gamal), jnp.abs(gama)),
                     jnp.abs(gama))
    return dict(
        xl2=xl2, x=x, v=_safe_divide(z, betan), w=w, wl=wl, beta=betan,
        cs=cs, sn=sn, dltan=dltan, eplnn=eplnn, gama=gama, gamal=gamal, gamal2=gamal2,
        tau=tau, taul=taul, phi=phi, cr1=cr1, sr1=sr1, cr2=cr2, sr2=sr2, eta=eta,
        etal=etal, vepln=vepln, veplnl=veplnl, ul=ul, ul2=ul2, ul3=ul3, u=u,
        xl2norm=xl2norm, xnorm=xnorm, anorm=jnp.maximum(anorm, gamal), gmin=gmin,
        gminl=jnp.where(second, s.gmin, gmin), gamal_q=gamal_q, k=k, qlp=qlp,
        broke=broke)


def _minres_stalled(s: _MinresState):
    """Whether the iterations stopped short of the tolerance: a pivot of the rank-revealing
    factor was round-off (the matrix singular to working precision, the right-hand side
    not in its range: the iterate is the least-squares solution of minimum length), or
    the iterate reached ``‖A‖ ‖x‖ ε ≥ ‖r₀‖``."""
    return s.broke


def _minres_direct(s: _MinresState, z):
    return s._replace(old_beta=s.beta, **_qlp_direct(s, z))


_MINRES = _KrylovMethod(
    name="minres", start=_minres_start, advance=_minres_advance, direct=_minres_direct,
    vector=lambda s: s.v, residual_norm=lambda s: jnp.abs(s.phi), rhs_norm=_preconditioned_norm,
    solution=lambda s: s.x, stalled=_minres_stalled)


# ---------------------------------------------------------------------- checks
def _check_shape(name, out, b, what):
    if jnp.shape(out) != b.shape:
        raise ValueError(f"{name}: {what} must answer a vector of the right-hand side's shape "
                         f"{b.shape}; got shape {jnp.shape(out)}")


def check_cg_options(rtol: float = 1e-5, atol: float = 0.0, maxiter: int | None = None,
                     preconditioner: Callable | None = None, *, name: str = "cg") -> None:
    """Refuse options of :func:`cg` (or :func:`minres`, ``name``) out of their domain (a NaN
    ``rtol`` or a negative ``maxiter`` would stop the iterations at once and answer the
    starting point): ``rtol`` and ``atol`` finite and ``≥ 0`` (checked where concrete),
    ``maxiter`` ``None`` or an integer ``≥ 0``, ``preconditioner`` ``None`` or a callable.

    Raises:
      ValueError: for a tolerance or ``maxiter`` out of range.
      TypeError: for a preconditioner that is not callable (an array of its diagonal).
    """
    for option, value in (("rtol", rtol), ("atol", atol)):
        if _traced(value):
            continue
        number = np.asarray(value)
        if number.shape != () or not np.isfinite(number) or not number >= 0:
            raise ValueError(f"{name}'s {option} must be a finite number >= 0; got {value!r}")
    if maxiter is not None and not _is_count(maxiter):
        raise ValueError(f"{name}'s maxiter must be None or an integer >= 0; got {maxiter!r}")
    if preconditioner is not None and not callable(preconditioner):
        got = (f"an array of shape {tuple(preconditioner.shape)}"
               if hasattr(preconditioner, "shape") else f"a {type(preconditioner).__name__}")
        raise TypeError(
            f"{name}'s preconditioner must be a callable r -> P⁻¹ r (in a matrix's solve, "
            f"also a representation); got {got}. For a diagonal preconditioner d: "
            "preconditioner=lambda r: r / d, or PMatDiag(M.layer_collection, d)")


def check_neumann_options(scale: Any = None, num_terms: int = 100) -> None:
    """Refuse options of :func:`neumann` out of their domain: ``num_terms`` an integer
    ``≥ 1`` (static: it is the loop's length), ``scale`` a finite number ``> 0`` where
    concrete (``None`` only in a matrix's ``solve``, where it defaults).

    Raises:
      ValueError: for either out of range.
    """
    if not _is_count(num_terms) or num_terms < 1:
        raise ValueError(f"neumann's num_terms must be an integer >= 1; got {num_terms!r}")
    if scale is None or _traced(scale):
        return
    number = np.asarray(scale)
    if number.shape != () or not np.isfinite(number) or not number > 0:
        raise ValueError(f"neumann's scale must be a finite number > 0 (below 2/λ_max of the "
                         f"matrix); got {scale!r}")


def _is_count(n: Any) -> bool:
    return not isinstance(n, bool) and isinstance(n, (int, np.integer)) and n >= 0
