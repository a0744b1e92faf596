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

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxgeom import _host_lapack
from jaxgeom._lapack import host_call_side_by_side
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


#: the smallest order whose CPU inverse goes to LAPACK's ``potri`` (:func:`spd_inverse`):
#: below it the host call's copies and fixed cost outweigh what ``potri`` saves (256²:
#: 1.10 ms by the solves, 1.44 ms by ``potri``; 513²: 6.0 and 4.8 ms)
POTRI_MIN_ORDER = 512


def spd_inverse(m: jax.Array) -> jax.Array:
    """``m⁻¹`` of a symmetric positive-definite ``(n, n)`` ``m``, read from its upper
    triangle, exactly symmetric.

    On a CPU (from order :data:`POTRI_MIN_ORDER`) through LAPACK's ``potrf`` and ``potri``
    (SciPy's, the LAPACK jaxlib's own CPU kernels call, in a host callback), ``n³/2``
    multiply-adds; elsewhere, and below that order, the Cholesky factor's two triangular
    solves of the identity (jaxlib has no ``potri``), ``7n³/6``. On a 2-core AMD EPYC VM
    (float32, under ``jit``): 4097² 1027 → 520 ms, 2049² 157 → 70–80 ms, 785² 13.1 → 7–9
    ms, 513² 6.0 → 4.8 ms, with the same errors. The callback copies ``m`` in and the
    inverse out, and fills the upper triangle on the host, panel by panel
    (:func:`jaxgeom._host_lapack.mirror_upper`; on the device, a ``where`` of the result
    and its transpose, XLA fused into the inverse's consumers and compiled a K-FAC
    optimizer step in 6 s instead of 1). Where ``m`` is not positive definite the result
    is all NaN, as the Cholesky solve's. Differentiable: ``d(m⁻¹) = −m⁻¹ dm m⁻¹``. Traced
    inside :func:`jaxgeom.no_host_callbacks`, the solves.

    Shapes ``(n, n) -> (n, n)`` (a batch of matrices: under ``vmap``, one host call each).
    """
    return spd_inverses([m])[0]


def spd_inverses(ms: Sequence[jax.Array]) -> list[jax.Array]:
    """``[spd_inverse(m) for m in ms]``: when one of them is inverted on the host
    (:func:`inverts_on_host`), all of them are, in one host call, side by side on the CPU's
    cores where that is faster (:func:`jaxgeom._lapack.host_side_by_side`: LAPACK held to
    one thread, one chain of matrices per core; its routines called through ``ctypes``,
    which lets go of Python's lock while they run).

    Independent inverses run that way leave no LAPACK thread spinning into the computation
    that follows, and need no one-thread hold around them (:mod:`jaxgeom._lapack`), under
    which host calls are not made: bench_mlp's π-damped KFAC ``inv`` (five factors of
    order 512–785), held, by the solves, 31–40 ms, in one host call 17 ms (2-core AMD
    EPYC VM, ``jit``). The small ones go along, the call's fixed cost shared: bench_resnet's
    eight large factors and 14 small ones (order 10–289) took 128–130 ms all on the host,
    145–189 ms with the small ones by the solves, whose LAPACK threads XLA ran beside the
    host call's."""
    on_host = [m.ndim == 2 and _host_lapack.may_run(m.dtype) for m in ms]
    if not any(h and inverts_on_host(m.shape[0], m.dtype) for m, h in zip(ms, on_host)):
        on_host = [False] * len(ms)
    hosted = iter(_host_inverses(tuple(m for m, h in zip(ms, on_host) if h))
                  if any(on_host) else ())
    return [next(hosted) if h else _inverse_by_solves(m) for m, h in zip(ms, on_host)]


def inverts_on_host(order: int, dtype: Any) -> bool:
    """Whether :func:`spd_inverses`, traced here, inverts an ``(order, order)`` matrix of
    ``dtype`` through LAPACK's ``potri`` on the host (and the others of its call with it)."""
    return order >= POTRI_MIN_ORDER and _host_lapack.may_run(dtype)


@jax.custom_jvp
def _inverse_by_solves(m: jax.Array) -> jax.Array:
    return _symmetrised(cho_solve(cholesky(m), jnp.eye(m.shape[0], dtype=m.dtype)))


@_inverse_by_solves.defjvp
def _inverse_by_solves_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    x = _inverse_by_solves(m)
    return x, -x @ dm @ x


@jax.custom_jvp
def _host_inverses(ms: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    results = tuple(jax.ShapeDtypeStruct(m.shape, m.dtype) for m in ms)
    return tuple(host_call_side_by_side(_host_lapack.spd_inverse, ms, results))


@_host_inverses.defjvp
def _host_inverses_jvp(primals, tangents):
    (ms,), (dms,) = primals, tangents
    xs = _host_inverses(ms)
    return xs, tuple(-x @ dm @ x for x, dm in zip(xs, dms))


def _symmetrised(m: jax.Array) -> jax.Array:
    """``(M + Mᵀ)/2``: an inverse from triangular solves made exactly symmetric, and in
    the row-major layout (LAPACK's is column-major: a K-FAC optimizer state that kept it
    copied every inverse factor twice a step, ≈ 2.5 ms on bench_mlp)."""
    return (m + m.T) / 2


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
