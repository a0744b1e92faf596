"""Iterative solvers on flat vectors (jit-able, ``lax.while_loop``; driven from Python
when the operator runs eagerly)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


def cg(
    matvec: Callable[[jax.Array], jax.Array],
    b: jax.Array,
    *,
    x0: jax.Array | None = None,
    preconditioner: Callable[[jax.Array], jax.Array] | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
) -> jax.Array:
    """Preconditioned conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite.

    Stops when ``‖A x − b‖ ≤ max(rtol·‖b‖, atol)`` or after ``maxiter`` iterations
    (default ``10 · len(b)``). ``preconditioner(r)`` applies ``P⁻¹`` to a residual
    (e.g. the ``solve`` of a cheap representation of the same matrix).

    Cost: one ``matvec`` (and one preconditioner application) per iteration.

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
    if b.ndim != 1:
        raise ValueError(f"cg solves for one flat vector; got shape {b.shape}")
    check_cg_options(rtol=rtol, atol=atol, maxiter=maxiter, preconditioner=preconditioner)
    maxiter = 10 * b.shape[0] if maxiter is None else int(maxiter)
    if x0 is not None and jnp.shape(x0) != b.shape:  # a (d, 1) x0 broadcast to (d, d)
        raise ValueError(f"cg's x0 must have the right-hand side's shape {b.shape}; got "
                         f"shape {jnp.shape(x0)}")
    x = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
    ax = matvec(x)
    _check_shape(ax, b, "matvec(x)")
    r = b - ax
    # the iterates in the residual's dtype: the operator's and b's promoted (a float32
    # vector against a float64 matrix), so that the loop's state keeps one dtype
    x = x.astype(r.dtype)

    def precondition(r):
        return r if preconditioner is None else preconditioner(r).astype(r.dtype)

    z = precondition(r)
    _check_shape(z, b, "preconditioner(r)")
    if not isinstance(r, jax.core.Tracer) and not isinstance(z, jax.core.Tracer):
        threshold = jnp.maximum(rtol * jnp.linalg.norm(b), atol)
        return _cg_from_python(matvec, precondition, x, r, z, threshold, maxiter)

    def solve(matvec, b):
        """The iterations as a ``lax.while_loop`` from ``x``, for ``b`` (the right-hand
        side, or a cotangent when differentiated in reverse mode)."""
        threshold = jnp.maximum(rtol * jnp.linalg.norm(b), atol)

        def cond(state):
            _, r, _, _, _, k = state
            return (jnp.linalg.norm(r) > threshold) & (k < maxiter)

        def body(state):
            x, r, _, p, rz, k = state
            x, r = _cg_advance(x, r, p, matvec(p), rz)
            z = precondition(r)
            p, rz, _ = _cg_direction(r, z, p, rz)
            return x, r, z, p, rz, k + 1

        r = b - matvec(x)
        z = precondition(r)
        state = jax.lax.while_loop(cond, body, (x, r, z, z, jnp.vdot(r, z), jnp.asarray(0)))
        # a NaN residual stops the loop at once (NaN > threshold is false): NaN, not x
        return jnp.where(jnp.isfinite(jnp.linalg.norm(state[1])), state[0], jnp.nan)

    # differentiable (forward and reverse mode) through the solution of A x = b, not
    # through the iterations: the adjoint system is solved by the same CG (A symmetric)
    return jax.lax.custom_linear_solve(matvec, b.astype(r.dtype), solve, symmetric=True)


def _check_shape(out, b, what):
    if jnp.shape(out) != b.shape:
        raise ValueError(f"cg: {what} must answer a vector of the right-hand side's shape "
                         f"{b.shape}; got shape {jnp.shape(out)}")


def check_cg_options(rtol: float = 1e-5, atol: float = 0.0, maxiter: int | None = None,
                     preconditioner: Callable | None = None) -> None:
    """Refuse options of :func:`cg` out of their domain (a NaN ``rtol`` or a negative
    ``maxiter`` would stop the iterations at once and answer the starting point): ``rtol``
    and ``atol`` finite and ``≥ 0`` (checked where concrete), ``maxiter`` ``None`` or an
    integer ``≥ 0``, ``preconditioner`` ``None`` or a callable.

    Raises:
      ValueError: for a tolerance or ``maxiter`` out of range.
      TypeError: for a preconditioner that is not callable (an array of its diagonal).
    """
    for name, value in (("rtol", rtol), ("atol", atol)):
        if isinstance(value, jax.core.Tracer):
            continue
        number = np.asarray(value)
        if number.shape != () or not np.isfinite(number) or not number >= 0:
            raise ValueError(f"cg's {name} must be a finite number >= 0; got {value!r}")
    if maxiter is not None and (isinstance(maxiter, bool) or not isinstance(
            maxiter, (int, np.integer)) or maxiter < 0):
        raise ValueError(f"cg's maxiter must be None or an integer >= 0; got {maxiter!r}")
    if preconditioner is not None and not callable(preconditioner):
        got = (f"an array of shape {tuple(preconditioner.shape)}"
               if hasattr(preconditioner, "shape") else f"a {type(preconditioner).__name__}")
        raise TypeError(
            f"cg's preconditioner must be a callable r -> P⁻¹ r (in a matrix's solve, also a "
            f"representation); got {got}. For a diagonal preconditioner d: "
            "preconditioner=lambda r: r / d, or PMatDiag(M.layer_collection, d)")


def _cg_from_python(matvec, precondition, x, r, z, threshold, maxiter):
    """:func:`cg`'s iterations for an eager ``matvec``: each one ``matvec``, the
    preconditioner and two compiled updates; the stopping test reads one scalar."""
    p, rz, residual = z, jnp.vdot(r, z), jnp.linalg.norm(r)
    threshold = float(threshold)
    k = 0
    while k < maxiter and float(residual) > threshold:
        x, r = _cg_advance(x, r, p, matvec(p), rz)
        p, rz, residual = _cg_direction(r, precondition(r), p, rz)
        k += 1
    if not np.isfinite(float(residual)):
        raise FloatingPointError(
            f"cg: the residual is not finite after {k} iterations (NaN/inf in the right-hand "
            "side or in the operator's products, e.g. a matrix built from non-finite data)")
    return x


# one CG iteration in two halves (around the preconditioner), shared by the traced loop
# (inlined there) and the one driven from Python (one compiled call each)
@jax.jit
def _cg_advance(x, r, p, ap, rz):
    alpha = rz / jnp.vdot(p, ap)
    return x + alpha * p, r - alpha * ap


@jax.jit
def _cg_direction(r, z, p, rz):
    rz_new = jnp.vdot(r, z)
    return z + (rz_new / rz) * p, rz_new, jnp.linalg.norm(r)
