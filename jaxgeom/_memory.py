"""Whether an array can fit in a device's memory, checked before any work.

A ``to_dense()`` of a model of a million parameters asks for terabytes. XLA reports the
failed allocation only when the result is read, and on the CPU, read through NumPy's
buffer protocol (``np.asarray``, plotting), the process aborts (``Check failed:
buffer_.IsConcrete()``, jaxlib 0.10) instead of raising. The shape is known before
anything runs: :func:`check_fits` refuses an array larger than the device's whole memory
with a ``MemoryError`` naming the size and the fix. Only the impossible is refused: an
array within the total memory may still fail for want of *free* memory, as XLA says.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np


def memory_bytes(device: jax.Device | None = None) -> int | None:
    """The memory of ``device`` (default: JAX's first device) in bytes: the allocator's
    limit where the device reports one (GPUs, TPUs: ``memory_stats()["bytes_limit"]``),
    else for a CPU the host's physical memory; ``None`` when neither is known."""
    device = jax.devices()[0] if device is None else device
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without statistics: not known
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows)
            return None
    return None


def _bytes_text(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(what: str, shape: tuple[int, ...], dtype, fix: str, *,
               arrays: int = 1, device: jax.Device | None = None) -> None:
    """Raise ``MemoryError`` when an array of ``shape`` and ``dtype`` is larger than the
    whole memory of ``device`` (:func:`memory_bytes`); ``what`` names the array, ``fix``
    says what to do instead. ``arrays > 1``: ``shape`` is the total entries, ``(n,)``, of
    that many arrays (a block-diagonal's blocks)."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    limit = memory_bytes(device)
    if limit is not None and size > limit:
        device = jax.devices()[0] if device is None else device
        held = (f"a {shape} {dtype.name} array" if arrays == 1 else
                f"{arrays} arrays of {math.prod(shape):,} {dtype.name} entries in all")
        raise MemoryError(
            f"{what} would be {held}, {_bytes_text(size)}, more than the "
            f"{_bytes_text(limit)} of memory of {device.platform} device {device.id}. {fix}")
