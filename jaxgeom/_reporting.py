"""Warnings of operations called from Python, also from inside their compiled calls.

An eager operation of a representation runs as one compiled call
(:func:`jaxgeom._dispatch.compiled_when_eager`), inside which the values it would warn of
(a Krylov solve's last residual) are traced. Inside :func:`reporting` — the compiled call
of an operation called from Python, never a user's ``jit`` — such warnings are staged as
host callbacks (``jax.debug.callback``), which warn when the call runs; outside it, traced
values warn of nothing and concrete ones warn at once. A singular matrix
(:func:`warn_if_singular`) warns from concrete values only.

Singular to working precision (:func:`warn_if_singular`): a solve or a negative power of a
matrix whose smallest pivot or eigenvalue (in magnitude, ``+ regul``) is below ``10·ε``
times its largest answers round-off (relative errors of 10% and more; an undamped Fisher of
fewer examples than parameters: entries of ``‖v‖/(ε‖M‖)``, ``10¹⁸`` in float64), as SciPy's
``solve`` warns of (``LinAlgWarning``: ill-conditioned matrix).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax._src import core as jax_core

#: whether traced values are reported when the program runs (:func:`reporting`)
_REPORTING = contextvars.ContextVar("jaxgeom_reporting", default=False)


@contextlib.contextmanager
def reporting() -> Iterator[None]:
    """Inside, traced values are reported through host callbacks when the program runs
    (the compiled call of an eager operation; module docstring)."""
    token = _REPORTING.set(True)
    try:
        yield
    finally:
        _REPORTING.reset(token)


def is_reporting() -> bool:
    """Whether a trace under way is that of an operation called from Python
    (:func:`reporting`)."""
    return _REPORTING.get()


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


def warn_if_singular(magnitudes: jax.Array | Sequence[jax.Array], operation: str, *,
                     stacklevel: int = 3) -> None:
    """Warn (``RuntimeWarning``) that ``operation`` ran on a matrix singular to working
    precision: ``min |p| ≤ c·ε·max |p|`` (:data:`SINGULAR_RATIO`) over the values ``p`` on
    the last axis of ``magnitudes`` (its eigenvalues ``+ regul``, or its factorisation's
    pivots on the eigenvalues' scale, e.g. Cholesky's ``L_ii²``; leading axes a stack of
    matrices; a sequence of such arrays: the blocks of one matrix, one warning for all),
    ``ε`` of their dtype. Concrete values only: traced ones warn of nothing (a host callback
    in the compiled call deadlocked, in a test run, with programs run from threads beside
    it); a compiled function answers the flag (:func:`singular_flag`) to be read after it."""
    arrays = [magnitudes] if isinstance(magnitudes, jax.Array | np.ndarray) else magnitudes
    if any(isinstance(a, jax.core.Tracer) for a in arrays):
        return
    _report_singular(operation, stacklevel + 1, singular_flag(arrays))


def singular_flag(magnitudes: Sequence[jax.Array]) -> jax.Array:
    """Whether any of ``magnitudes`` (:func:`warn_if_singular`'s) is singular to working
    precision: a boolean scalar, traced or not."""
    arrays = [jnp.abs(jnp.asarray(a)) for a in magnitudes if np.shape(a)[-1]]
    if not arrays:
        return jnp.asarray(False)
    return jnp.any(jnp.stack([
        jnp.any(jnp.min(a, axis=-1) <= SINGULAR_RATIO * jnp.finfo(a.dtype).eps
                * jnp.max(a, axis=-1)) for a in arrays]))


def report_singular(operation: str, singular: jax.Array, stacklevel: int = 3) -> None:
    """Warn that ``operation`` ran on a matrix singular to working precision where the flag
    ``singular`` (:func:`singular_flag`, answered by a compiled call) is set."""
    _report_singular(operation, stacklevel + 1, singular)


def _report_singular(operation: str, stacklevel: int, singular) -> None:
    # one message for every matrix (a block-diagonal's blocks): Python's default filter
    # shows it once, not once a block
    if np.any(singular):
        warnings.warn(
            f"{operation} of a matrix singular to working precision: its smallest eigenvalue "
            "or pivot (+ regul) is below 10·ε times its largest, so the answer is round-off "
            "(entries of about ‖v‖/(ε‖M‖)). Damp it (regul > 0: M + regul·I), or use pinv() "
            "for the pseudo-inverse on its range", RuntimeWarning, stacklevel=stacklevel)
