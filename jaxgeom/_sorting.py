"""Ascending sorts of long vectors: on a CPU, NumPy's sort in a host callback.

XLA:CPU sorts by calling the comparator it compiles, through a function pointer, for
every comparison; NumPy's sort is vectorised. On a 2-core AMD EPYC VM, ``jnp.sort`` of
float32 or float64 vectors under ``jit`` against the same sort by NumPy in a host
callback: 1000 elements 0.11 against 0.10–0.12 ms, 4000 0.56 against 0.15 ms, 64 000
12.4 against 1.6 ms, 1 000 000 241 against 33 ms (7.4–8× from 16 000 on); rows sorted
each, worse: a ``(512, 785)`` stack 47 against 2.0 ms, ``(64, 289)`` 2.0 against 0.15
ms, ``(16, 128)`` 0.15 against 0.10 ms. A KFAC's ``eigvalsh`` sorts all ``d`` products of
its factors' eigenvalues: bench_mlp's 669 706 took 156 ms of its 191.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._host_calls import host_calls_allowed

#: the fewest elements :func:`sort` hands to NumPy (at 1000 in one row the two were even)
SORT_ON_HOST_MIN = 2048

#: the dtypes NumPy sorts as XLA does (NaN last)
_HOST_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64))


def sort(x: jax.Array) -> jax.Array:
    """``jnp.sort(x)`` (ascending along the last axis, NaN last). On a CPU, for float32 or
    float64 of at least :data:`SORT_ON_HOST_MIN` elements in all, NumPy's sort in a host
    callback (not inside :func:`jaxgeom.no_host_callbacks`); there ``-0.0`` and ``+0.0``
    compare equal (``jnp.sort`` puts ``-0.0`` first). Differentiable: the tangent is
    permuted as the values (the permutation from NumPy's ``argsort``). Batched under
    ``vmap`` (one host call for the batch). Cost ``O(n log n)``, one copy of ``x`` to the
    host and one back (on a CPU, in memory)."""
    x = jnp.asarray(x)
    if (x.ndim == 0 or x.size < SORT_ON_HOST_MIN or jnp.dtype(x.dtype) not in _HOST_DTYPES
            or jax.default_backend() != "cpu" or not host_calls_allowed()):
        return jnp.sort(x)
    return _host_sorted(x)


@jax.custom_jvp
def _host_sorted(x: jax.Array) -> jax.Array:
    return _host_call(lambda a: np.sort(a, axis=-1), x, x.dtype)


@_host_sorted.defjvp
def _host_sorted_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    order = _host_call(lambda a: np.argsort(a, axis=-1, kind="stable").astype(np.int32),
                       x, jnp.int32)
    return (jnp.take_along_axis(x, order, axis=-1),
            jnp.take_along_axis(dx, order, axis=-1))


def _host_call(fn, x: jax.Array, dtype) -> jax.Array:
    return jax.pure_callback(fn, jax.ShapeDtypeStruct(x.shape, dtype), x,
                             vmap_method="expand_dims")
