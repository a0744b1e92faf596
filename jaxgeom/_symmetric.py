"""Factorisations of symmetric matrices, handed to LAPACK without a transposed copy.

XLA:CPU factorises through LAPACK, which reads column-major matrices, while JAX's arrays
are row-major: ``jax.scipy.linalg.cho_factor(m, lower=True)`` (or ``jnp.linalg.cholesky``)
first copies ``m`` into column-major order, a strided transpose of ``n²`` elements. On a
2-core Xeon that copy took 105 ms of a 226 ms ``(M + λI)⁻¹ v`` at ``n = 4160``, more than
LAPACK's ``potrf`` (88 ms). A symmetric matrix is its own transpose, so :func:`cholesky`
factorises ``mᵀ``: the same numbers, whose column-major layout is ``m``'s row-major
bytes, so XLA lays the transpose out as a bitcast and copies nothing. Solves
(``M + λI``, ``n = 6922 / 4160 / 2112``) went 751 → 504, 246 → 151 and 42 → 32 ms, with
identical results (``benchmarks/bench_kernels.py``, its "Cholesky solve" rows).

:func:`cholesky` reads one triangle of ``m`` (its upper one), as
``jax.scipy.linalg.cho_factor`` with its default ``lower=False`` does; the callers'
matrices are symmetric by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jaxgeom._reporting import (
    at_top_level,
    collects_here,
    report_singular_when_run,
    singular_flag,
)


def cholesky(m: jax.Array) -> jax.Array:
    """The lower Cholesky factor ``L`` (``m = L Lᵀ``) of a symmetric positive-definite
    ``m``, read from ``m``'s upper triangle.

    Shapes ``(..., n, n) -> (..., n, n)``; cost ``n³/3``. Where ``m`` is not positive
    definite the factor's lower triangle is all NaN (as ``jnp.linalg.cholesky``'s), so that a
    solve with it is NaN.
    """
    return lax.linalg.cholesky(jnp.swapaxes(m, -1, -2), symmetrize_input=False)


def cho_solve(factor: jax.Array, b: jax.Array) -> jax.Array:
    """``(L Lᵀ)⁻¹ b`` for a factor ``L`` of :func:`cholesky`: two triangular solves.

    Shapes ``factor (n, n)``, ``b (n,)`` or ``(n, k)``; cost ``2 n² k``.
    """
    return jax.scipy.linalg.cho_solve((factor, True), b)


def spd_solve(m: jax.Array, b: jax.Array) -> jax.Array:
    """``m⁻¹ b`` for a symmetric positive-definite ``m``: :func:`cholesky` then
    :func:`cho_solve`. Cost ``n³/3 + 2 n² k``."""
    return cho_solve(cholesky(m), b)


def symmetric_solve(m: jax.Array, b: jax.Array, operation: str = "solve") -> jax.Array:
    """``m⁻¹ b`` for a symmetric invertible ``m`` (``(n, n)``; ``b`` ``(n,)`` or ``(n, k)``):
    :func:`spd_solve` when ``m`` is positive definite (a damped Fisher), else an LU solve
    with partial pivoting (an indefinite ``m``: a damped Hessian of a non-convex loss, a
    difference of matrices). Chosen on the device by whether the Cholesky solve came out
    NaN (its factor is NaN where the factorisation failed). Cost ``n³/3 + 2 n² k``, plus
    ``2n³/3 + 2 n² k`` when it falls back.

    Differentiable in ``m`` and ``b`` through ``dx = m⁻¹ (db − dm x)``, solved by the branch
    the value took (differentiating through the ``cond`` multiplied the other branch's NaN
    by zero: NaN gradients for an indefinite ``m``). Called from Python (not traced, or in
    an operation's compiled call: :func:`jaxgeom._reporting.report_singular_when_run`), an
    ``m`` singular to working precision warns (:func:`jaxgeom._reporting.singular_flag` of
    the pivots, read after the call: Cholesky's ``L_ii²``, or the LU's ``|U_ii|``; an
    undamped Fisher of fewer examples than parameters fails Cholesky by round-off and
    answered the LU's ``10¹⁸``).
    """
    if at_top_level() or collects_here():  # called from Python: the flag read after
        x, singular = _compiled_flagged_solve(m, b)
        report_singular_when_run(operation, singular)
        return x
    return _compiled_symmetric_solve(m, b)


@jax.custom_jvp
def _symmetric_solve(m: jax.Array, b: jax.Array) -> jax.Array:
    return _solve_and_branch(m, b)[0]


def _solve_and_branch(m: jax.Array, b: jax.Array
                      ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(m⁻¹ b, whether m was indefinite, whether it is singular to working precision)``."""
    # Only the solution and the pivots cross into the ``cond``: the factor, handed over, was
    # copied from LAPACK's column-major layout to row-major and back (two strided n² passes,
    # +30% on a solve at n = 2112). The LU factorises mᵀ (= m) for the reason above.
    factor = cholesky(m)
    x = cho_solve(factor, b)
    indefinite = jnp.isnan(jnp.ravel(x)[0])
    # The LU factorises a copy of mᵀ made after the Cholesky solve (``+ 0`` read from its
    # result): under ``vmap`` the ``cond`` is a select that runs both branches, and with
    # the LU on mᵀ itself, XLA:CPU's program hung in most runs (a vmapped solve at
    # n = 300–400: 7 of 8; an optimisation barrier did not help). An n² pass beside the LU.
    after = indefinite.astype(m.dtype) * 0

    def lu_solve(_):
        lu, pivots = jax.scipy.linalg.lu_factor(m.T + after)
        return jax.scipy.linalg.lu_solve((lu, pivots), b), jnp.abs(jnp.diagonal(lu))

    x, pivots = lax.cond(indefinite, lu_solve, lambda x: x, (x, jnp.diagonal(factor) ** 2))
    return x, indefinite, singular_flag([pivots])


@_symmetric_solve.defjvp
def _symmetric_solve_jvp(primals, tangents):
    m, b = primals
    dm, db = tangents
    x, indefinite, _ = _solve_and_branch(m, b)
    rhs = db - dm @ x
    # the branch is chosen from the primal values: the tangent stays linear (transposable)
    dx = lax.cond(indefinite, lambda r: jnp.linalg.solve(m.T, r), lambda r: spd_solve(m, r),
                  rhs)
    return x, dx


#: called eagerly (PMatDense.inv), the cond's branches made anew would recompile
_compiled_symmetric_solve = jax.jit(_symmetric_solve)
#: called from Python: the solution and whether ``m`` is singular to working precision
_compiled_flagged_solve = jax.jit(lambda m, b: _solve_and_branch(m, b)[::2])
