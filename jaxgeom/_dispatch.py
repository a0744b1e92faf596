"""Operations that run as one compiled call when they are called outside a trace.

An operation of a representation (``mv``, ``solve``, ``trace``, …) is a few to a few
hundred small array operations. Called eagerly, from a notebook or a Python loop, JAX
dispatches each of them on its own (≈ 5–20 µs apiece on a CPU, each one a separate pass
over memory that XLA would have fused). On a 2-core CPU, ``PMatDiag.mv`` on a
670k-parameter MLP took 2.0 ms eagerly against 0.17 ms as one compiled call, and
``PMatQuasiDiag.frobenius_norm`` 1.8 against 0.12 ms. :func:`compiled_when_eager` makes
such a method run as one ``jax.jit`` call instead. JAX caches the compilation on the
representation's structure (its type and static layout), the static arguments and the
shapes and dtypes of the traced ones:

- array leaves (``jax.Array``, NumPy arrays, NumPy floating scalars) and Python ``float``
  and ``complex`` numbers are traced, so that new values (a damping schedule, a new
  vector) never recompile;
- every other leaf (``str``, ``int``, ``bool``, ``None``, and their NumPy scalars) is static
  and part of the cache key; with an unhashable one, or a callable (a ``cg`` preconditioner:
  a lambda made anew for each call would compile each time, and the cache would keep what
  it closes over), the method runs eagerly;
- inside a trace (``jit``, ``grad``, ``vmap``: some leaf is a ``Tracer``) the method runs
  as written, compiled with the code around it; staged into a ``jit`` (a leaf is a
  ``DynamicJaxprTracer``), the concrete arrays of the matrix (one the ``jit`` closes over)
  are first put behind ``lax.optimization_barrier``, so that XLA does not evaluate at
  compile time what the method computes from them alone (a low-rank factor's Gram:
  bench_small's ``PMatLowRank`` solve compiled in 27.7 s that way, 6.7 s since).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.interpreters import partial_eval as pe

from jaxgeom._compile import constants_behind_barrier, factorisation_jit, model_jit
from jaxgeom._lapack import (
    one_thread_in_trace,
    one_thread_in_trace_faster,
    one_thread_when_faster,
)
from jaxgeom._reporting import at_top_level, reporting
from jaxgeom.streaming import check_flags

#: the tracers of values staged into a ``jit`` (any tracer where this JAX does not name them)
_StagedTracer = getattr(pe, "DynamicJaxprTracer", jax.core.Tracer)

#: stands in the static leaves for each traced one
_TRACED = object()

#: Python numbers whose values are traced (ints and bools stay static: they pick code paths)
_TRACED_NUMBERS = (float, complex)
#: NumPy scalars that stay static, as Python ints, bools and strings do
_STATIC_NUMPY_SCALARS = (np.integer, np.bool_, np.character)

#: how a leaf takes part in the compiled call, decided by its type
_TRACED_LEAF, _STATIC_LEAF, _EAGER_CALL = range(3)


@functools.cache
def _leaf_kind(leaf_type: type) -> int:
    """``_TRACED_LEAF`` (arrays, NumPy scalars, ``float``, ``complex``), ``_EAGER_CALL`` (a
    ``Tracer``: inside a trace; a callable or an unhashable leaf), else ``_STATIC_LEAF``.

    Decided once per type: ``isinstance`` against ``jax.Array`` (an ABC) costs ≈ 0.5 µs a
    leaf, and the checks leaf by leaf were ≈ 9 µs of an eager call's ≈ 40."""
    if issubclass(leaf_type, jax.core.Tracer):  # before jax.Array: Tracers are Arrays too
        return _EAGER_CALL
    if issubclass(leaf_type, _STATIC_NUMPY_SCALARS):  # options: maxiter, a reduction's name
        return _STATIC_LEAF
    if issubclass(leaf_type, (jax.Array, np.ndarray, np.generic)) or leaf_type in _TRACED_NUMBERS:
        return _TRACED_LEAF
    if any("__call__" in vars(base) for base in leaf_type.__mro__) or leaf_type.__hash__ is None:
        return _EAGER_CALL
    return _STATIC_LEAF


def _split(leaves: list) -> tuple[tuple, list] | None:
    """``(static, traced)``: the leaves with ``_TRACED`` for each traced one, and the traced
    ones; ``None`` when the call must stay eager."""
    static, traced = [], []
    for leaf in leaves:
        kind = _leaf_kind(type(leaf))
        if kind == _TRACED_LEAF:
            static.append(_TRACED)
            traced.append(leaf)
        elif kind == _STATIC_LEAF:
            static.append(leaf)
        else:
            return None
    static = tuple(static)
    return (static, traced) if _hashable(static) else None


def _hashable(static: tuple) -> bool:
    try:
        hash(static)
    except TypeError:
        return False
    return True


def _calling(name: str) -> Callable:
    """A new function ``name(method, treedef, static, traced)``: ``method(self, *args,
    **kwargs)`` from the leaves (JAX caches compilations per function: one function per
    way of compiling the call)."""

    def call(method: Callable, treedef: Any, static: tuple, traced: list,
             reports: bool = False) -> Any:
        values = iter(traced)
        leaves = [next(values) if leaf is _TRACED else leaf for leaf in static]
        self, args, kwargs = jax.tree_util.tree_unflatten(treedef, leaves)
        if not reports:
            return method(self, *args, **kwargs)
        # a call from Python: it warns as an eager one would (a Krylov solve's stop, a
        # singular matrix), from the values it answers beside its result
        with reporting() as deferred:
            result = method(self, *args, **kwargs)
        return result, tuple(deferred)

    call.__name__ = call.__qualname__ = name
    return call


#: the compiled calls take ``reports`` (:func:`jaxgeom._reporting.at_top_level`) as a
#: static argument: a program traced for a call from Python answers its deferred warnings
#: (:class:`jaxgeom._reporting.Deferred`) beside its result, one inlined into a user's
#: ``jit`` answers the result alone
_STATIC = (0, 1, 2, 4)
_compiled_call = jax.jit(_calling("_compiled_call"), static_argnums=_STATIC)
#: for the operations a representation lists in ``FACTORISING_OPERATIONS``: compiled with
#: XLA:CPU's quick fusion emitters (:func:`jaxgeom._compile.factorisation_jit`)
_compiled_factorisation = factorisation_jit(_calling("_compiled_factorisation"),
                                            static_argnums=_STATIC)
#: for a representation whose operations run the model (``RUNS_MODEL``: ``PMatImplicit``'s
#: products replay it chunk by chunk): compiled as a model step is
#: (:func:`jaxgeom._compile.model_jit`: on the CPU, XLA's own convolution kernels)
_compiled_model_call = model_jit(_calling("_compiled_model_call"), static_argnums=_STATIC)


def _compiled_call_for(self: Any, name: str) -> Callable:
    """The compiled call an eager ``self.name(...)`` runs as (:func:`compiled_when_eager`)."""
    if name in getattr(self, "FACTORISING_OPERATIONS", ()):
        return _compiled_factorisation
    return _compiled_model_call if getattr(self, "RUNS_MODEL", False) else _compiled_call


def compiled_when_eager(method: Callable) -> Callable:
    """``method(self, *args, **kwargs)`` as one compiled call when no argument is traced
    (module docstring). ``self`` must be a pytree; when it has a ``_compiles_eager_calls()``
    method answering ``False``, the call stays eager. When the method's name is in its
    ``FACTORISING_OPERATIONS`` the call is compiled as a factorisation
    (:func:`jaxgeom._compile.factorisation_jit`: half the compile time); when its
    ``RUNS_MODEL`` is true, as a model step (:func:`jaxgeom._compile.model_jit`). When it has a
    ``_factorised_orders(name, *args, **kwargs)`` method, the orders of the independent
    matrices that call factorises, the compiled call runs them side by side when faster
    (:func:`jaxgeom._lapack.one_thread_when_faster`). When its ``CHECKED_OPERATIONS`` maps
    the name to another method, the compiled call runs that one, which answers the result
    and the finiteness flags of the chunks it streamed (a build's, dropped inside a trace),
    and the flags are checked here (:func:`jaxgeom.streaming.check_flags`: the eager loop's
    ``FloatingPointError``). The result must be a pytree of arrays. The returned function
    keeps the method's name and docstring, and the method itself as ``eager_method``."""
    name = method.__name__

    @functools.wraps(method)
    def operation(self, *args: Any, **kwargs: Any) -> Any:
        compiles = getattr(self, "_compiles_eager_calls", None)
        if compiles is not None and not compiles():
            return method(self, *args, **kwargs)
        leaves, treedef = jax.tree_util.tree_flatten((self, args, kwargs))
        split = _split(leaves)
        if split is None:
            if any(isinstance(leaf, _StagedTracer) for leaf in leaves):  # inside a jit
                self = constants_behind_barrier(self)  # a matrix the jit closes over
            factorised = getattr(self, "_factorised_orders", None)
            if factorised is not None and any(isinstance(x, jax.core.Tracer) for x in leaves) \
                    and one_thread_in_trace_faster(factorised(name, *args, **kwargs)):
                return one_thread_in_trace(
                    lambda s, a, k: method(s, *a, **k), self, args, kwargs)
            return method(self, *args, **kwargs)
        call = _compiled_call_for(self, name)
        reports = at_top_level()

        def run(fn: Callable) -> Any:
            answer = call(fn, treedef, *split, reports)
            if not reports:
                return answer
            result, deferred = answer
            if deferred:  # the warnings of its values, read once it has run (a wait for
                # the arrays, then reads: device_get's reads waited ≈ 0.1 ms longer)
                jax.block_until_ready(deferred)
                for report in deferred:
                    report.run()
            return result

        flagged = getattr(self, "CHECKED_OPERATIONS", {}).get(name)
        if flagged is not None:  # the result and its chunks' finiteness flags, read here
            result, flags = run(getattr(type(self), flagged))
            check_flags(flags)
            return result
        factorised = getattr(self, "_factorised_orders", None)
        orders = factorised(name, *args, **kwargs) if factorised is not None else ()
        if not orders:
            return run(method)
        with one_thread_when_faster(orders, split[1]) as limited:
            result = run(method)
            return jax.block_until_ready(result) if limited else result

    operation.eager_method = method
    return operation
