"""Iterative solvers on flat vectors (jit-able, ``lax.while_loop``)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


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
    """
    if b.ndim != 1:
        raise ValueError(f"cg solves for one flat vector; got shape {b.shape}")
    maxiter = 10 * b.shape[0] if maxiter is None else int(maxiter)
    precondition = preconditioner if preconditioner is not None else (lambda r: r)
    x = jnp.zeros_like(b) if x0 is None else jnp.asarray(x0, b.dtype)
    r = b - matvec(x)
    z = precondition(r)
    threshold = jnp.maximum(rtol * jnp.linalg.norm(b), atol)

    def cond(state):
        _, r, _, _, _, k = state
        return (jnp.linalg.norm(r) > threshold) & (k < maxiter)

    def body(state):
        x, r, z, p, rz, k = state
        ap = matvec(p)
        alpha = rz / jnp.vdot(p, ap)
        x = x + alpha * p
        r = r - alpha * ap
        z = precondition(r)
        rz_new = jnp.vdot(r, z)
        p = z + (rz_new / rz) * p
        return x, r, z, p, rz_new, k + 1

    state = (x, r, z, z, jnp.vdot(r, z), jnp.asarray(0))
    return jax.lax.while_loop(cond, body, state)[0]
