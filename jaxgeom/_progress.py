"""Progress bars over the chunks of eager builds.

A build streams its data in chunks (:mod:`jaxgeom.streaming`); on a large data set or
model one pass takes minutes. Inside :func:`progress` each eager pass draws a `tqdm
<https://tqdm.github.io>`_ bar counting its examples (``tqdm`` is not a dependency: the
``examples`` extra installs it)::

    with jaxgeom.progress():
        F = jaxgeom.FIM(apply_fn, params, data, jaxgeom.PMatEKFAC, batch_size=256)

The bar advances when a chunk's computation has finished, not when it is handed to XLA
(which returns at once): after dispatching chunk ``i`` the loop waits for chunk ``i − 1``,
so one chunk is always queued behind the running one and the device never idles for the
bar; the cost is a wait per chunk (tens of microseconds on a CPU). Inside a ``jit`` the
chunks are one ``lax.scan`` and nothing is drawn. Under an eager ``grad`` or ``vmap`` the
chunks' results are tracers, which cannot be waited for: the bar counts dispatches.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import jax

from jaxgeom._host_calls import set_in_this_thread

#: ``active``: the description of the bars inside :func:`progress` (this thread)
_ACTIVE = threading.local()


@contextlib.contextmanager
def progress(description: str = "jaxgeom") -> Iterator[None]:
    """Draw a ``tqdm`` bar over the examples of every eager build pass in the block (this
    thread), labelled ``description`` (with ``pass k`` for builders of several passes,
    EKFAC's). Raises ``ImportError`` at once, naming the fix, when ``tqdm`` is not
    installed."""
    try:
        import tqdm  # noqa: F401
    except ImportError as error:
        raise ImportError(
            "jaxgeom.progress() draws its bars with tqdm, which is not installed: "
            "pip install tqdm (or jaxgeom[examples])") from error
    with set_in_this_thread(_ACTIVE, description):
        yield


def active() -> bool:
    """Whether this thread is inside :func:`progress`."""
    return getattr(_ACTIVE, "active", None) is not None


class Bar:
    """One pass's bar: :meth:`finished` the chunk just dispatched (its ``flag``, an array
    the chunk's step returns, and its number of examples); the bar advances by the chunk
    before it, once that chunk's ``flag`` is ready."""

    def __init__(self, total: int | None, description: str):
        import tqdm

        self._bar = tqdm.tqdm(total=total, desc=description, unit="ex")
        self._pending: tuple[Any, int] | None = None

    def finished(self, flag: Any, count: int) -> None:
        self._advance()
        self._pending = (flag, count)

    def close(self) -> None:
        self._advance()
        self._bar.close()

    def _advance(self) -> None:
        if self._pending is None:
            return
        flag, count = self._pending
        if isinstance(flag, jax.Array) and not isinstance(flag, jax.core.Tracer):
            flag.block_until_ready()
        self._bar.update(count)
        self._pending = None


@contextlib.contextmanager
def bar(total: int | None, passes: int = 1, index: int = 0,
        drawing: bool = True) -> Iterator[Bar | None]:
    """A :class:`Bar` of pass ``index`` of ``passes``, ``total`` examples (``None``:
    unknown), when ``drawing`` inside :func:`progress`, else ``None``; closed when the
    block ends, also on an error."""
    description = getattr(_ACTIVE, "active", None)
    if description is None or not drawing:
        yield None
        return
    if passes > 1:
        description = f"{description} (pass {index + 1})"
    drawn = Bar(total, description)
    try:
        yield drawn
    finally:
        drawn.close()
