"""Whether jaxgeom may put work it traces into host callbacks.

On a CPU some of the work jaxgeom traces into a program runs faster called back on the
host than compiled by XLA: LAPACK routines that XLA has not (``potri``:
:func:`jaxgeom._symmetric.spd_inverses`) or runs one at a time (``syevd``:
:func:`jaxgeom.pmat._spectral.host_eighs`), and long sorts (NumPy's:
:func:`jaxgeom._sorting.sort`). A program with host callbacks cannot be serialised
(``jax.export``) or run where Python cannot be called back: :func:`no_host_callbacks`
keeps them out of what a block traces, in its thread.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

#: ``active`` in a thread inside :func:`no_host_callbacks`
_NO_CALLBACKS = threading.local()


@contextlib.contextmanager
def no_host_callbacks() -> Iterator[None]:
    """Trace no host callbacks in the block (this thread): factorisations inside a ``jit``
    traced here stay in the program and keep OpenBLAS's threads
    (:func:`jaxgeom._lapack.one_thread_in_trace` as written), long sorts stay XLA's.

    For programs that must be free of host callbacks: ``jax.export`` (``serialization of
    host_callbacks is not yet implemented``), or a program run where Python cannot be
    called back. Example::

        with jaxgeom.no_host_callbacks():
            exported = jax.export.export(jax.jit(step))(params, batch)
    """
    with set_in_this_thread(_NO_CALLBACKS):
        yield


@contextlib.contextmanager
def set_in_this_thread(flag: threading.local, value: Any = True) -> Iterator[None]:
    """``flag.active = value`` in the block, in this thread."""
    outer = getattr(flag, "active", None)
    flag.active = value
    try:
        yield
    finally:
        flag.active = outer


def host_calls_allowed() -> bool:
    """Whether work traced here may go to a host callback: not inside
    :func:`no_host_callbacks`. Under a one-thread hold it may: a host call's chains take
    the hold too (holds are counted, :class:`jaxgeom._lapack._OneThreadHold`)."""
    return not getattr(_NO_CALLBACKS, "active", False)
