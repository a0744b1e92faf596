"""Warnings of operations called from Python, also from inside their compiled calls.

An eager operation of a representation runs as one compiled call
(:func:`jaxgeom._dispatch.compiled_when_eager`), inside which the values it would warn of
(a Krylov solve's last residual, a factorisation's pivots) are traced.
:func:`report_when_run` defers such a warning: concrete values report at once; traced
ones, inside :func:`reporting` — the trace of an operation's compiled call from Python,
never a user's ``jit`` — are answered by the call beside its result (:class:`Deferred`)
and reported after it from their values; anywhere else (a user's ``jit``, or a ``vmap``
or loop body inside the call, whose values cannot leave it) they report nothing. No host
callback: one in a compiled call deadlocked the test suite once (the program's callback
waiting for the GIL, held by threads waiting to run programs of their own), and one
cannot be exported (``jax.export``).

Singular to working precision (:func:`warn_if_singular`): a solve or a negative power of a
matrix whose smallest pivot or eigenvalue (in magnitude, ``+ regul``) is below ``10·ε``
times its largest answers round-off (relative errors of 10% and more; an undamped Fisher of
fewer examples than parameters: entries of ``‖v‖/(ε‖M‖)``, ``10¹⁸`` in float64), as SciPy's
``solve`` warns of (``LinAlgWarning``: ill-conditioned matrix).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core
from jax.extend import core as jex_core

#: the reports of the trace under way (:func:`reporting`), or None
_COLLECTOR = contextvars.ContextVar("jaxgeom_reports", default=None)


@jax.tree_util.register_pytree_node_class
class Deferred:
    """A warning deferred until its values are known: ``report(*values)``.
    A pytree whose leaves are the (traced) ``values`` and whose static part is ``report``,
    so that a compiled call answers it beside its result."""

    def __init__(self, report: Callable[..., None], values: Sequence[Any]):
        self.report, self.values = report, tuple(values)

    def tree_flatten(self):
        return self.values, self.report

    @classmethod
    def tree_unflatten(cls, report, values):
        return cls(report, values)

    def run(self) -> None:
        """Report from the (now concrete) values."""
        self.report(*self.values)


#: the directories of jaxgeom and JAX: frames of files under them are the libraries' own
#: (an eager operation's concrete values reach a warning through JAX's transformations),
#: and contextlib's (a warning on leaving jaxgeom's context managers)
_LIBRARY_DIRS = (*(os.path.dirname(os.path.abspath(module.__file__)) + os.sep
                   for module in (sys.modules[__package__], jax)), contextlib.__file__)


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first caller outside jaxgeom
    and JAX (the user's line, however deep in the libraries the warning is raised)."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_LIBRARY_DIRS):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


class _Collector:
    """The reports deferred in one trace (that of an operation's compiled call)."""

    def __init__(self):
        self.trace = _trace_state()
        self.deferred: list[Deferred] = []
        #: the flags of each operation's singular matrices (one warning for all)
        self.singular: dict[str, list[jax.Array]] = {}

    def singular_reports(self) -> list[Deferred]:
        """One deferred warning per operation, for any of its matrices singular."""
        return [Deferred(_Singular(operation), (functools.reduce(jnp.logical_or, flags),))
                for operation, flags in self.singular.items()]

    def here(self) -> bool:
        """Whether the trace under way is the collector's own (not a ``vmap``, loop or
        branch traced inside it, whose values cannot leave their trace)."""
        return self.trace is not None and _trace_state() == self.trace


def _trace_state() -> Any:
    """An opaque token of the trace under way (equal for the same trace), or None where this
    JAX does not offer one."""
    get = getattr(jex_core, "get_opaque_trace_state", None)
    try:
        return get(convention="jaxgeom") if get is not None else None
    except (AssertionError, TypeError):
        return None


@contextlib.contextmanager
def reporting() -> Iterator[list[Deferred]]:
    """Inside (the trace of an eager operation's compiled call), the traced values of
    :func:`report_when_run` at this trace are collected into the list yielded, for the call
    to answer beside its result (module docstring)."""
    collector = _Collector()
    token = _COLLECTOR.set(collector)
    try:
        yield collector.deferred
        collector.deferred.extend(collector.singular_reports())
    finally:
        _COLLECTOR.reset(token)


def collects_here() -> bool:
    """Whether :func:`report_when_run` of traced values at the trace under way reports them
    (inside :func:`reporting`, at its own trace)."""
    collector = _COLLECTOR.get()
    return collector is not None and collector.here()


def report_when_run(report: Callable[..., None], *values: Any) -> None:
    """``report(*values)`` once the values are known: at once when they are
    concrete; traced inside :func:`reporting` at its trace, after the compiled call, from
    the values it answers; else (a user's ``jit``) never. ``report`` must be hashable (a
    function or a :func:`functools.partial` of static arguments)."""
    if not any(isinstance(v, jax.core.Tracer) for v in values):
        report(*values)
    elif collects_here():
        _COLLECTOR.get().deferred.append(Deferred(report, values))


def vmap_reporting(fn: Callable) -> Callable:
    """``jax.vmap(fn)`` whose deferred warnings (:func:`report_when_run` inside ``fn``: a
    batch of right-hand sides solved by CG) are answered by the map and reported for each
    element, where the trace under way collects them (else ``jax.vmap(fn)`` itself)."""
    if not collects_here():
        return jax.vmap(fn)

    def each(*args):
        with reporting() as deferred:  # at the map's own trace
            result = fn(*args)
        return result, tuple(deferred)

    def mapped(*args):
        result, deferred = jax.vmap(each)(*args)
        for report in deferred:
            if isinstance(report.report, _Singular):  # one warning for all the elements
                report_singular_when_run(report.report.operation, jnp.any(report.values[0]))
            else:
                report_when_run(functools.partial(_for_each, report.report), *report.values)
        return result

    return mapped


def _for_each(report: Callable[..., None], *values: Any) -> None:
    """``report`` of each element of mapped ``values`` (leading axis)."""
    for element in zip(*values, strict=True):
        report(*element)


def at_top_level() -> bool:
    """Whether no trace is under way (a call from Python, not from inside a ``jit`` whose
    arguments it does not hold). ``False`` where this JAX cannot tell."""
    clean = getattr(jax_core, "trace_state_clean", None)
    return bool(clean()) if clean is not None else False


#: ``c`` of the test ``min |p| ≤ c·ε·max |p|``: a solve's relative error is about
#: ``cond·ε``, 10% and more beyond it (SciPy's ``LinAlgWarning``: ``rcond < ε``; not
#: ``numpy.linalg.pinv``'s ``n·ε``, which decides a rank: at float32 a damped KFAC layer of
#: 4160 parameters and condition 2000, solved to 5·10⁻⁵, crossed it)
SINGULAR_RATIO = 10


def warn_if_singular(magnitudes: jax.Array | Sequence[jax.Array], operation: str) -> None:
    """Warn (``RuntimeWarning``) that ``operation`` ran on a matrix singular to working
    precision: ``min |p| ≤ c·ε·max |p|`` (:data:`SINGULAR_RATIO`) over the values ``p`` on
    the last axis of ``magnitudes`` (its eigenvalues ``+ regul``, or its factorisation's
    pivots on the eigenvalues' scale, e.g. Cholesky's ``L_ii²``; leading axes a stack of
    matrices; a sequence of such arrays: the blocks of one matrix, one warning for all),
    ``ε`` of their dtype. Concrete values warn at once; traced ones inside an operation's
    compiled call from Python are answered as a flag (:func:`singular_flag`) and warn after
    it (:func:`report_when_run`); inside a user's ``jit`` they warn of nothing."""
    arrays = [magnitudes] if isinstance(magnitudes, jax.Array | np.ndarray) else magnitudes
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        if collects_here():
            report_singular_when_run(operation, singular_flag(arrays))
        return
    report_singular(operation, _compiled_singular_flag(list(arrays)))


def singular_flag(magnitudes: Sequence[jax.Array]) -> jax.Array:
    """Whether any of ``magnitudes`` (:func:`warn_if_singular`'s) is singular to working
    precision: a boolean scalar, traced or not."""
    arrays = [jnp.abs(jnp.asarray(a)) for a in magnitudes if np.shape(a)[-1]]
    if not arrays:
        return jnp.asarray(False)
    return jnp.any(jnp.stack([
        jnp.any(jnp.min(a, axis=-1) <= SINGULAR_RATIO * jnp.finfo(a.dtype).eps
                * jnp.max(a, axis=-1)) for a in arrays]))


#: :func:`singular_flag` of concrete values as one compiled call (eagerly, a dispatch an
#: array operation)
_compiled_singular_flag = jax.jit(singular_flag)

#: the singular flags reported inside :func:`one_singular_report` so far, or None
_SINGULAR_FLAGS = contextvars.ContextVar("jaxgeom_singular_flags", default=None)
#: the name of the operation called, inside :func:`one_singular_report`, or None
_CALLED = contextvars.ContextVar("jaxgeom_called_operation", default=None)


@contextlib.contextmanager
def one_singular_report(operation: Callable[[], str]) -> Iterator[None]:
    """Inside, the singular matrices reported (:func:`report_singular`: a block-diagonal's
    blocks, a Kronecker layer's factors, each decomposed on its own) warn once, on leaving,
    as the operation the user called (``operation()``: ``"inv"``, not the ``"pow(-1)"`` it
    is computed by). Nested: the outermost reports. Nothing on an exception."""
    if _SINGULAR_FLAGS.get() is not None:
        yield
        return
    token, called = _SINGULAR_FLAGS.set([]), _CALLED.set(operation)
    try:
        yield
        flags = _SINGULAR_FLAGS.get()
    finally:
        _SINGULAR_FLAGS.reset(token)
        _CALLED.reset(called)
    if any(np.any(np.asarray(flag)) for flag in flags):
        report_singular(operation(), True)


def called_operation() -> str | None:
    """The operation the user called, inside :func:`one_singular_report` (for the messages
    of the operations it is computed by), else ``None``."""
    operation = _CALLED.get()
    return None if operation is None else operation()


def report_singular(operation: str, singular: jax.Array) -> None:
    """Warn that ``operation`` ran on a matrix singular to working precision where the flag
    ``singular`` (:func:`singular_flag`, answered by a compiled call) is set; inside
    :func:`one_singular_report`, the flag is kept for its one warning."""
    flags = _SINGULAR_FLAGS.get()
    if flags is not None:
        flags.append(singular)
        return
    # read as NumPy's: np.any of a jax.Array dispatches jnp.any, a computation and a wait
    # of its own (≈ 40 µs a warning check on a 2-core CPU)
    if not np.any(np.asarray(singular)):
        return
    if operation in ("logdet", "slogdet"):
        warn(f"{operation} of a matrix singular to working precision: an eigenvalue (+ regul) "
             "is nonzero but below 10·ε times the largest, round-off of a factorisation, "
             "and so is its logarithm (its exact value may be 0: log det = -inf). Damp it "
             "(regul > 0: M + regul·I)")
        return
    warn(
        f"{operation} of a matrix singular to working precision: its smallest eigenvalue "
        "or pivot (+ regul) is below 10·ε times its largest, so the answer is round-off "
        "(entries of about ‖v‖/(ε‖M‖), or NaN where a Cholesky factorisation failed). "
        "Damp it (regul > 0: M + regul·I), or use pinv() for the pseudo-inverse on its "
        "range")


def report_singular_when_run(operation: str, singular: jax.Array) -> None:
    """:func:`report_singular` of a flag (:func:`singular_flag`) once it is known: at once when
    concrete; traced inside :func:`reporting` at its trace, after the compiled call — the
    flags of one operation's matrices answered as one, for one warning —; else never."""
    if not isinstance(singular, jax.core.Tracer):
        report_singular(operation, singular)
    elif collects_here():
        _COLLECTOR.get().singular.setdefault(operation, []).append(singular)


@dataclasses.dataclass(frozen=True)
class _Singular:
    """The deferred report of an operation's singular matrices (hashable, compared by value:
    the static part of a compiled call's answer)."""

    operation: str

    def __call__(self, singular: jax.Array) -> None:
        report_singular(self.operation, singular)
