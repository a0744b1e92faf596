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
    indefinite (a Hessian away from a minimum) or singular.

    Each iterate minimises ``‖A x − b‖`` over ``x0`` plus the Krylov space
    ``span{r₀, A r₀, …}``, updated by the symmetric Lanczos recurrence and Givens rotations
    (no basis is stored: memory a few vectors). For a singular ``A`` and a consistent
    ``b`` (in ``A``'s range) started from ``x0 = 0`` the iterates stay in that range and
    converge to the minimum-norm solution ``A⁺ b`` — what an LSMR solve gives, with one
    product an iteration instead of two. CG breaks down on indefinite systems
    (``pᵀ A p ≤ 0``); MINRES does not.

    Stops when the residual ``‖A x − b‖`` (with a preconditioner its ``P⁻¹``-norm) is
    ``≤ max(rtol·‖b‖, atol)`` (``‖b‖`` in the same norm) or after ``maxiter`` iterations
    (default ``10 · len(b)``). ``preconditioner(r)`` applies ``P⁻¹``, which must be
    symmetric positive definite (a non-PSD one gives a non-finite residual: an error
    eagerly, NaN under ``jit``).

    For ``b`` outside a singular ``A``'s range (no solution) the residual falls to
    ``‖(I − AA⁺) b‖`` and stays; the iterations go on to ``maxiter`` (a least-squares
    solution, its null-space component arbitrary) unless they grow past round-off
    (:func:`_minres_stalled`), where they stop and answer the last iterate clear of it. A
    stop above the tolerance warns (:func:`cg`).

    Cost: one ``matvec`` and one preconditioner application per iteration, as CG.

    Driven from Python for an eager operator and differentiated as the solution
    ``A⁻¹ b`` (``lax.custom_linear_solve``, ``A`` nonsingular), as :func:`cg`.

    Reference: C. C. Paige and M. A. Saunders, "Solution of sparse indefinite systems of
    linear equations", SIAM J. Numer. Anal. 12 (1975); SciPy's ``minres``.
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
    """Warn (``RuntimeWarning``) of a Krylov solve that stopped above its tolerance: with
    iterates grown past round-off, a singular system without a solution (``stalled``,
    always), or at the default ``maxiter`` (``warns``; a ``maxiter`` of the caller's is a
    budget)."""
    residual, threshold, stalled, k = float(residual), float(threshold), bool(stalled), int(k)
    if not residual > threshold or not (warns or stalled):  # NaN: an error elsewhere
        return
    if stalled:
        what = (f"the iterates grew past what round-off allows after {k} iterations, residual "
                f"{residual:.3g} above the tolerance {threshold:.3g}: the matrix is singular "
                "(or numerically so) and the right-hand side is not in its range, so no "
                "solution exists; answered the last iterate clear of round-off (a "
                "least-squares one, its component in the null space arbitrary). Damp the "
                "system (regul > 0) for a unique solution, or solve on the range "
                "(M.pinv().mv(v))")
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


# --- MINRES (SciPy's ``minres`` without its shift; its residual test, and its test of
# iterates grown past round-off): the Lanczos vectors r1, r2 (unpreconditioned) and
# v = P⁻¹r2/β, the rotation (cs, sn), the last two update directions w, w2, φ̄ the
# residual's norm, ‖T‖_F² of the Lanczos tridiagonal T (‖A‖ estimated by its square
# root), ‖r₀‖ (``beta1``), ‖x‖, the last iterate clear of round-off's growth (``x_best``)
# and whether a step was refused (``broke``)
class _MinresState(NamedTuple):
    x: jax.Array
    r1: jax.Array
    r2: jax.Array
    v: jax.Array
    w: jax.Array
    w2: jax.Array
    alpha: jax.Array
    beta: jax.Array
    old_beta: jax.Array
    dbar: jax.Array
    epsilon: jax.Array
    phibar: jax.Array
    cs: jax.Array
    sn: jax.Array
    tnorm2: jax.Array
    beta1: jax.Array
    xnorm: jax.Array
    x_best: jax.Array
    broke: jax.Array


def _safe_divide(v, beta):
    """``v / β``, zero where ``β = 0`` (before the first step; an invariant Krylov space:
    the exact solution)."""
    return jnp.where(beta > 0, v / jnp.where(beta > 0, beta, 1), 0)


@jax.jit
def _minres_start(x, r, z):
    beta = jnp.sqrt(jnp.vdot(r, z))
    zero = jnp.zeros_like(beta)
    return _MinresState(x=x, r1=r, r2=r, v=_safe_divide(z, beta), w=jnp.zeros_like(x),
                        w2=jnp.zeros_like(x), alpha=zero, beta=beta, old_beta=zero,
                        dbar=zero, epsilon=zero, phibar=beta, cs=-jnp.ones_like(beta),
                        sn=zero, tnorm2=zero, beta1=beta,
                        xnorm=jnp.linalg.norm(x), x_best=x, broke=jnp.zeros_like(beta, bool))


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
def _minres_rotation(s: _MinresState, z) -> dict:
    """``β = (r2ᵀ P⁻¹ r2)^{1/2}``, the previous rotation and the next one applied to the new
    column of the tridiagonal matrix, then the update of ``x``: the changed fields."""
    beta = jnp.sqrt(jnp.vdot(s.r2, z))
    delta = s.cs * s.dbar + s.sn * s.alpha
    gbar = s.sn * s.dbar - s.cs * s.alpha
    eps = jnp.finfo(beta.dtype).eps
    gamma = jnp.maximum(jnp.hypot(gbar, beta), eps)
    cs, sn = gbar / gamma, beta / gamma
    w = (s.v - s.epsilon * s.w2 - delta * s.w) / gamma
    dbar = -s.cs * beta
    # ‖T‖_F² of the tridiagonal: α², and β² below and above it (the first β is ‖r₀‖, not T's)
    tnorm2 = s.tnorm2 + s.alpha**2 + jnp.where(s.old_beta > 0, s.beta**2, 0) + beta**2
    # a step beyond what round-off allows (‖A‖ ‖step‖ ε ≥ ‖r₀‖: a pivot γ of round-off,
    # the Krylov space of an inconsistent b exhausted) is not taken, and stops the solve
    step = cs * s.phibar
    anorm = jnp.sqrt(tnorm2)
    broke = anorm * jnp.abs(step) * jnp.linalg.norm(w) * eps >= s.beta1
    x = jnp.where(broke, s.x, s.x + step * w)
    xnorm = jnp.linalg.norm(x)
    # the last iterate still clear of round-off's growth (‖A‖ ‖x‖ √ε < ‖r₀‖)
    moderate = anorm * xnorm * jnp.sqrt(eps) < s.beta1
    return dict(x=x, v=_safe_divide(z, beta), w=w, beta=beta, dbar=dbar,
                epsilon=s.sn * beta, phibar=jnp.where(broke, s.phibar, sn * s.phibar), cs=cs,
                sn=sn, tnorm2=tnorm2, xnorm=xnorm, x_best=jnp.where(moderate, x, s.x_best),
                broke=broke)


@jax.jit
def _minres_stalled(s: _MinresState):
    """Whether the iterates have left what round-off allows: a step refused (``broke``) or
    ``‖A‖ ‖x‖ ε ≥ ‖r₀‖`` (``‖A‖`` estimated by ``‖T‖_F``). Where ``b`` is not in a singular
    ``A``'s range no ``x`` solves the system: the residual reaches ``‖(I − AA⁺) b‖`` and
    stays, and the iterations then divide round-off by vanishing pivots (``‖x‖`` of 10¹⁶ on
    a 10 × 10 system, its residual 10¹⁴); :func:`_minres_solution` answers the last iterate
    clear of round-off. (SciPy's least-squares test ``‖A r‖ ≤ rtol ‖A‖ ‖r‖`` would stop
    sooner, but it also stops nonsingular systems of condition number above ``1/rtol``,
    far from their solution.)"""
    return (jnp.sqrt(s.tnorm2) * s.xnorm * jnp.finfo(s.xnorm.dtype).eps >= s.beta1) | s.broke


def _minres_solution(s: _MinresState):
    """``x``, or past round-off (:func:`_minres_stalled`) the last iterate clear of it: its
    residual is the least-squares one to round-off, its null-space part moderate."""
    return jnp.where(_minres_stalled(s), s.x_best, s.x)


def _minres_direct(s: _MinresState, z):
    return s._replace(w2=s.w, old_beta=s.beta, **_minres_rotation(s, z))


_MINRES = _KrylovMethod(
    name="minres", start=_minres_start, advance=_minres_advance, direct=_minres_direct,
    vector=lambda s: s.v, residual_norm=lambda s: jnp.abs(s.phibar), rhs_norm=_preconditioned_norm,
    solution=_minres_solution, stalled=_minres_stalled)


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
