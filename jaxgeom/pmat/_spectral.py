"""Matrix functions through eigenvalues, shared by every representation with a spectrum."""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
import numpy as np


def is_integer(p) -> bool:
    return isinstance(p, numbers.Integral) or (isinstance(p, float) and float(p).is_integer())


def power(values: jax.Array, p, regul=0.0) -> jax.Array:
    """``(λ + regul)^p`` of eigenvalues; for non-integer ``p`` the matrix is taken PSD
    and negative round-off eigenvalues are clipped to 0."""
    shifted = values + regul
    if is_integer(p):
        return shifted ** int(p)
    return jnp.maximum(shifted, 0) ** p


def pinv(values: jax.Array, atol=None, rtol=None) -> jax.Array:
    """``1/λ`` for ``|λ| > max(atol, rtol·max|λ|)``, else 0.

    Defaults follow ``numpy.linalg.pinv``: ``rtol = n·eps`` when ``atol`` is not given.
    """
    scale = jnp.max(jnp.abs(values)) if values.size else 0.0
    if rtol is None:
        rtol = 0.0 if atol is not None else values.size * jnp.finfo(values.dtype).eps
    threshold = jnp.maximum(0.0 if atol is None else atol, rtol * scale)
    keep = jnp.abs(values) > threshold
    return jnp.where(keep, 1 / jnp.where(keep, values, 1), 0)


def trace(m: jax.Array) -> jax.Array:
    """``Σᵢ mᵢᵢ`` of a square matrix (the sum of its eigenvalues).

    ``jnp.trace`` compiles on XLA:CPU to a masked pass over the whole matrix, page-faulting
    through a mask as large as ``m`` (a 4097² factor: 43 ms); the diagonal alone costs 0.2 ms.
    """
    return jnp.sum(jnp.diagonal(m))


#: the diagonals' row width in :func:`traces` (a vector register's multiple)
TRACE_ROW = 128


def traces(matrices: list[jax.Array]) -> jax.Array:
    """The ``(L,)`` traces of ``L`` square matrices in one pass over their diagonals.

    Each diagonal, a strided slice of its flattened matrix, is padded to rows of
    :data:`TRACE_ROW`; all rows are summed at once, then added per matrix (a segment sum
    of a few rows). A trace per matrix compiles on XLA:CPU to a gather and a two-stage
    reduction each, every kernel a hand-off between threads.
    """
    if not matrices:
        return jnp.zeros((0,))
    rows, counts = [], []
    for m in matrices:
        n = m.shape[0]
        count = -(-n // TRACE_ROW)
        diagonal = jax.lax.slice(m.reshape(-1), (0,), (m.size,), (n + 1,))
        rows.append(jnp.pad(diagonal, (0, count * TRACE_ROW - n)).reshape(count, TRACE_ROW))
        counts.append(count)
    segments = np.repeat(np.arange(len(matrices)), counts)
    return jax.ops.segment_sum(jnp.concatenate(rows).sum(axis=1), segments,
                               num_segments=len(matrices), indices_are_sorted=True)


def reconstruct(evals: jax.Array, evecs: jax.Array) -> jax.Array:
    """``V diag(λ) Vᵀ`` for the columns ``V`` of ``evecs``."""
    return (evecs * evals) @ evecs.T
