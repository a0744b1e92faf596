"""Independent LAPACK factorisations, side by side on a CPU.

XLA:CPU runs ``eigh``, ``cholesky`` and the other dense factorisations through LAPACK (in
the Linux wheels, the OpenBLAS that SciPy ships), and that LAPACK threads each call on
its own. Two effects of that, measured on a 2-core VM with bench_mlp's six KFAC factors
(785², 513², 513², 512², 512², 10²) before EKFAC's refit:

- *the threads spin after the call*: OpenBLAS's worker threads busy-wait for more work
  (≈ 2²⁸ cycles by default) and take a core from the XLA computation that follows. The
  25 ms KFAC pass after the factors' ``eigh`` took 45 ms; an EKFAC build pays it in its
  refit pass, and a loop of builds in each one's first pass too;
- *one factorisation gains little from a second thread*: the tridiagonal reduction,
  most of an ``eigh``, is memory-bound (785²: 35 ms on two threads, 48 ms on one). Run
  one thread each, two at a time, the six ``eigh`` took 88 ms instead of 107 ms in turn
  on two threads.

:func:`side_by_side` therefore runs a function of independent factorisations as one
compiled call with LAPACK held to one thread, so that XLA runs the factorisations
concurrently, one per core, and no LAPACK thread is left spinning, when that is expected
to be faster: with single-threaded costs ``n³``, the side-by-side schedule takes at least
``max(largest, total / cores)``, and LAPACK's own threads speed one factorisation up by
at most ≈ 1.5× at these sizes (measured on 2 cores, ``eigh``: 1.14× at 512², 1.37× at
785², 1.43× at 1153², 1.51× at 2049², 1.54× at 4097²). So bench_mlp's factors run side by
side; bench_cnn's, a 4097² factor and small ones, keep LAPACK's threads.

The thread limit is ``threadpoolctl``'s, held only while the call runs (the call is
waited for inside it): it applies to every BLAS library loaded in the process, for that
time, and calls from several Python threads take turns holding it. Inside a trace
(``jit``, ``vmap``) and on other backends the function runs as written.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax

#: held while the BLAS libraries are limited: their thread counts are the process's, and a
#: call that began inside another thread's limit would restore that limit, not the default
_LIMITING = threading.RLock()

#: the most LAPACK's own threads were measured to speed up one factorisation (see above)
LAPACK_THREAD_SPEEDUP = 1.5


def side_by_side(fn: Callable[..., Any], sizes: Sequence[int], *args: Any) -> Any:
    """``fn(*args)``, where ``fn`` factorises independent matrices of orders ``sizes``.

    On a CPU, when :func:`faster_side_by_side`: as one compiled call (``jax.jit(fn)``,
    cached on ``fn``) with LAPACK held to one thread while it runs, and waited for.
    Otherwise, and inside a trace, ``fn(*args)`` as written: called eagerly, its
    factorisations run one after the other on LAPACK's threads (one compiled call would
    let XLA start several at once, each with LAPACK's threads: bench_resnet's EKFAC build
    took 2.6 s instead of 2.1 s that way).
    """
    leaves = jax.tree_util.tree_leaves(args)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        return fn(*args)
    with one_thread_when_faster(sizes, leaves) as limited:
        return jax.block_until_ready(jax.jit(fn)(*args)) if limited else fn(*args)


@contextlib.contextmanager
def one_thread_when_faster(sizes: Sequence[int], arrays: Sequence[Any]) -> Iterator[bool]:
    """Hold LAPACK to one thread in the block when ``arrays`` are on a CPU and
    factorisations of orders ``sizes`` are :func:`faster_side_by_side`; yields whether it
    does (the block must then wait for its results before it ends)."""
    if len(sizes) < 2 or not faster_side_by_side(sizes, _cores()) or not _on_cpu(arrays):
        yield False
        return
    with _LIMITING, _blas_threads().limit(limits=1, user_api="blas"):
        yield True


def faster_side_by_side(sizes: Sequence[int], cores: int) -> bool:
    """Whether factorisations of orders ``sizes`` (cost ``n³`` each on one thread) finish
    sooner one per core than in turn on LAPACK's threads: ``max(largest, total / cores)``
    at most ``total /`` :data:`LAPACK_THREAD_SPEEDUP`."""
    costs = [float(n) ** 3 for n in sizes]
    if cores < 2 or len(costs) < 2:
        return False
    total = sum(costs)
    return max(max(costs), total / cores) * LAPACK_THREAD_SPEEDUP <= total


def _on_cpu(leaves: list) -> bool:
    """Whether every array among ``leaves`` lives on a CPU device."""
    return all(d.platform == "cpu" for x in leaves if isinstance(x, jax.Array)
               for d in x.devices())


def _cores() -> int:
    """The cores this process may run on (XLA:CPU sizes its thread pool the same way)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@functools.cache
def _blas_threads():
    """A ``threadpoolctl`` controller of the BLAS libraries loaded in the process, made
    once SciPy's LAPACK, the one jaxlib calls on a CPU, is loaded."""
    import scipy.linalg  # noqa: F401 - loads the LAPACK that jaxlib's CPU kernels call
    import threadpoolctl

    return threadpoolctl.ThreadpoolController()
