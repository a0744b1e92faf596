"""Abstract signatures of pytrees: the keys under which traced work is cached.

A build's tracing work (layer discovery, the capture plan, the shapes of a chunk's
statistics) depends only on the structure of its arguments and the shapes and dtypes of
their leaves, as ``jax.jit``'s own trace cache does. :func:`signature` is that key,
hashable and cheap (microseconds per leaf: no ``jnp.result_type`` lattice walk for
arrays, whose dtype is read directly), and :func:`abstract` turns it back into a pytree
of :class:`jax.ShapeDtypeStruct` to trace with.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Signature = tuple  # (treedef, ((shape, dtype), ...))


#: the concrete array classes met so far: :func:`signature` reads their ``shape`` and
#: ``dtype`` directly, ``isinstance(x, jax.Array)`` being an ABC check (≈ 1 µs a leaf).
#: Filled as they are met, not at import: making an array to learn its class would start
#: JAX's backend when jaxgeom is imported, before the user's ``jax.config`` settings.
_ARRAY_TYPES: set[type] = set()
#: those among them whose ``aval`` is a stored attribute (jaxlib's ``ArrayImpl``): one
#: read of it gives both (``shape`` and ``dtype`` each read it). Other arrays (e.g. PRNG
#: key arrays) compute their ``aval`` at every read.
_AVAL_TYPES: set[type] = set()


def _shape_dtype(x: Any) -> tuple[tuple[int, ...], Any]:
    if isinstance(x, jax.Array):  # canonical dtype already; tracers among them
        _ARRAY_TYPES.add(type(x))
        if type(x).__module__.startswith("jaxlib"):
            _AVAL_TYPES.add(type(x))
        return tuple(x.shape), x.dtype
    if isinstance(x, jax.ShapeDtypeStruct):
        return tuple(x.shape), x.dtype
    if isinstance(x, np.ndarray | np.generic):  # float64 → float32 without x64, as jnp does
        return tuple(x.shape), jax.dtypes.canonicalize_dtype(x.dtype)
    return tuple(np.shape(x)), jnp.result_type(x)  # Python scalars: weak types


@functools.cache
def dtype_is(dtype: Any, kind: Any) -> bool:
    """``jnp.issubdtype(dtype, kind)``, computed once per pair: the argument checks ask it
    per leaf at every build, and it takes ≈ 0.7–0.9 µs a call."""
    return bool(jnp.issubdtype(dtype, kind))


def signature(tree: Any) -> Signature:
    """A pytree's structure and its leaves' shapes and dtypes (hashable)."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    out = []
    for x in leaves:
        kind = type(x)
        if kind in _AVAL_TYPES:
            aval = x.aval
            out.append((aval.shape, aval.dtype))
        elif kind in _ARRAY_TYPES or kind is jax.ShapeDtypeStruct:
            out.append((x.shape, x.dtype))
        else:
            out.append(_shape_dtype(x))
    return treedef, tuple(out)


def abstract(sig: Signature) -> Any:
    """The pytree of :class:`jax.ShapeDtypeStruct` a :func:`signature` describes."""
    treedef, leaves = sig
    return jax.tree_util.tree_unflatten(
        treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])


def cached(maxsize: int) -> Callable[[Callable], Callable]:
    """``functools.lru_cache(maxsize)`` for tracing work keyed on hashable arguments (a
    function, a layout, a :func:`signature`), computed uncached when one is unhashable (a
    per-example function closing over an unhashable object)."""

    def decorate(f: Callable) -> Callable:
        memo = functools.lru_cache(maxsize)(f)

        @functools.wraps(f)
        def call(*key):
            try:
                hash(key)
            except TypeError:
                return f(*key)
            return memo(*key)

        return call

    return decorate
