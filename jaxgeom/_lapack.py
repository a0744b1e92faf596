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

A third effect is XLA:CPU's own: a compiled call runs its independent operations on its
thread pool *and* the calling thread, up to one more at once than there are cores, in an
order of its choosing. Compiled as one call on 2 cores, bench_mlp's six ``eigh`` took
47–50 ms in some calls and 63–68 ms in others (the 785² sharing a core with a 512²).

:func:`side_by_side` therefore runs independent factorisations with LAPACK held to one
thread, so that no LAPACK thread is left spinning, and deals them itself into one chain
per core (:func:`chains`: the costliest first, each to the least loaded chain), when that
is expected to be faster: with single-threaded costs ``n^p`` (:func:`cost`), the chains
take as long as the most loaded one, and LAPACK's own threads speed one factorisation up
by at most ≈ 1.5× at these sizes (measured on 2 cores, ``eigh``: 1.14× at 512², 1.37× at
785², 1.43× at 1153², 1.51× at 2049², 1.54× at 4097²). Each chain is one compiled call, traced and
compiled in the calling thread (so that its configuration, ``jax.enable_x64`` and the
like, holds) and run from a thread of its own: bench_mlp's EKFAC builds 103 → 83 ms
(Monte Carlo) and 144 → 130 ms (exact) against one compiled call
(``benchmarks/bench_lapack.py``). bench_cnn's factors, a 4097² one and small ones, keep
LAPACK's threads. In EKFAC's build, factorisations too small to gain from a second core
in any way (bench_small's, 65² and less: :data:`SIDE_BY_SIDE_MIN_COST` in all) run as one
chain on the calling thread, with LAPACK held to one thread: run on LAPACK's threads, they
left one spinning into the refit pass that followed, whose chunks then shared a core with
it (bench_small's EKFAC builds 5.2 → 4.7 ms Monte Carlo, 15.8 → 13.7 ms exact, with the
driver's first pass not waited for, :mod:`jaxgeom.streaming`). Elsewhere (KFAC's eager
``inv``, ``pinv``) they stay on LAPACK's threads, not waited for: waiting cost more there
than the spinning (bench_small's eager ``pinv`` 2.3 against 2.9 ms).

The thread limit is ``threadpoolctl``'s, held only while the call runs (the call is
waited for inside it): it applies to every BLAS library loaded in the process, for that
time, and calls from several Python threads take turns holding it. Inside a trace
(``jit``, ``vmap``) and on other backends the function runs as written.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxgeom._compile import factorisation_jit

#: held while the BLAS libraries are limited: their thread counts are the process's, and a
#: call that began inside another thread's limit would restore that limit, not the default
_LIMITING = threading.RLock()

#: the most LAPACK's own threads were measured to speed up one factorisation (see above)
LAPACK_THREAD_SPEEDUP = 1.5

#: ``p`` of :func:`cost`: one ``eigh`` on one thread took 35.3 ms at 785² and 12.9 ms at
#: 512² (2-core Xeon, float32), ``(785/512)^2.36``; with ``n³`` the chains put the 785²
#: with the 10² and four 512² in the other chain, 5% slower builds than with ``n^2.4``
#: (bench_mlp's EKFAC, Monte Carlo 84 → 78 ms, exact 125 → 118.5 ms)
COST_EXPONENT = 2.4


def cost(order: float) -> float:
    """The single-threaded cost of factorising a matrix of ``order``, in ``n^p`` units."""
    return float(order) ** COST_EXPONENT


#: the least single-threaded cost that :func:`chains` runs side by side: below it the
#: threads' hand-off (≈ 0.4 ms) outweighs the gain (2-core Xeon, four ``eigh`` of order
#: n: 3.0 → 3.4 ms at 128, 11.8 → 8–11.6 ms at 256, 19 → 11.5 ms at 320)
SIDE_BY_SIDE_MIN_COST = 4 * cost(256)


def side_by_side(fn: Callable[[Any], Any], items: Sequence[Any],
                 orders: Sequence[int], *, work_follows: bool = False) -> list[Any]:
    """``[fn(item) for item in items]``, where the calls are independent and ``fn(items[i])``
    factorises a matrix of order ``orders[i]``.

    On a CPU, when the factorisations run faster one per core (:func:`chains`): the items
    dealt into those chains, each chain one compiled call of ``fn`` on its items one after
    another (``jax.jit``, cached on ``fn``; lowered and compiled in this thread), the chains
    run at once from this thread and worker threads with LAPACK held to one thread, and
    waited for.
    When they are all small (below :data:`SIDE_BY_SIDE_MIN_COST` in all) and
    ``work_follows`` (computation that a spinning LAPACK thread would slow is dispatched
    right after: EKFAC's refit pass), one such chain in this thread, LAPACK held to one
    thread, waited for. Otherwise, and inside a trace, the calls as written, eagerly:
    their factorisations run one after the other on LAPACK's threads (one compiled call
    would let XLA start several at once, each with LAPACK's threads: bench_resnet's EKFAC
    build took 2.6 s instead of 2.1 s that way).
    """
    items = list(items)
    leaves = jax.tree_util.tree_leaves(items)
    if any(isinstance(x, jax.core.Tracer) for x in leaves) or not _on_cpu(leaves):
        return [fn(item) for item in items]
    schedule = chains(orders, _cores())
    if schedule is None:
        if not (work_follows and too_small_for_threads(orders)):
            return [fn(item) for item in items]
        with _one_lapack_thread():
            return _run(_each(fn), items)
    parts = [[items[i] for i in chain] for chain in schedule]
    calls = [_each(fn).lower(part).compile() for part in parts]
    with _one_lapack_thread():
        others = [_workers().submit(_run, call, part)
                  for call, part in zip(calls[1:], parts[1:])]
        try:
            first = _run(calls[0], parts[0])
        finally:
            concurrent.futures.wait(others)  # none left running on one LAPACK thread
    results = [None] * len(items)
    for chain, values in zip(schedule, [first] + [future.result() for future in others]):
        for i, value in zip(chain, values):
            results[i] = value
    return results


def chains(orders: Sequence[int], cores: int) -> list[list[int]] | None:
    """Independent factorisations of matrices of ``orders`` dealt into one chain per core, or
    ``None`` when they finish sooner in turn on LAPACK's threads.

    Longest processing time first (Graham 1969): the factorisations by decreasing
    single-threaded :func:`cost`, each to the least loaded chain. The chains finish with the
    most loaded one; in turn, LAPACK's threads take at least ``total /``
    :data:`LAPACK_THREAD_SPEEDUP`. Below :data:`SIDE_BY_SIDE_MIN_COST` in all, ``None``.
    Returns the non-empty chains (positions into ``orders``), the most loaded first."""
    costs = [cost(n) for n in orders]
    if cores < 2 or sum(c > 0 for c in costs) < 2 or sum(costs) < SIDE_BY_SIDE_MIN_COST:
        return None
    loads, dealt = [0.0] * cores, [[] for _ in range(cores)]
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        least = loads.index(min(loads))
        loads[least] += costs[i]
        dealt[least].append(i)
    if max(loads) * LAPACK_THREAD_SPEEDUP > sum(costs):
        return None
    return [dealt[c] for c in sorted(range(cores), key=lambda c: -loads[c]) if dealt[c]]


def _one_after_another(fn: Callable[[Any], Any], items: list) -> list:
    """``[fn(item) for item in items]``, each call after the one before: its inputs read
    through a term of the previous result (``+ 0 · r``, finite ``r``: exact). Independent
    calls, XLA:CPU would run at once (module docstring), and a chain would take more than
    its core."""
    results, previous = [], None
    for item in items:
        if previous is not None:
            item = jax.tree_util.tree_map(functools.partial(_after, previous), item)
        previous = fn(item)
        results.append(previous)
    return results


def _after(previous: Any, x: Any) -> Any:
    """``x``, read after ``previous`` is computed (floating-point ``x``; others as they are)."""
    if not jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        return x
    r = jnp.ravel(jax.tree_util.tree_leaves(previous)[0])[0]
    zero = jnp.where(jnp.isfinite(r), r, 0) * 0
    return x + zero.astype(jnp.result_type(x))


@functools.cache
def _each(fn: Callable[[Any], Any]) -> Any:
    """``jax.jit`` of ``fn`` on each item, one after another (one per ``fn``)."""
    return factorisation_jit(functools.partial(_one_after_another, fn))


def _run(call: Callable[[list], Any], items: list) -> Any:
    return jax.block_until_ready(call(items))


@functools.cache
def _workers() -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run :func:`side_by_side`'s chains besides the calling one."""
    return concurrent.futures.ThreadPoolExecutor(max(_cores() - 1, 1),
                                                 thread_name_prefix="jaxgeom-lapack")


@contextlib.contextmanager
def _one_lapack_thread() -> Iterator[None]:
    """LAPACK (every BLAS library in the process) held to one thread in the block."""
    with _LIMITING, _blas_threads().limit(limits=1, user_api="blas"):
        yield


@contextlib.contextmanager
def one_thread_when_faster(sizes: Sequence[int], arrays: Sequence[Any]) -> Iterator[bool]:
    """Hold LAPACK to one thread in the block when ``arrays`` are on a CPU and
    factorisations of orders ``sizes`` are :func:`faster_side_by_side`; yields whether it
    does (the block must then wait for its results before it ends)."""
    if len(sizes) < 2 or not faster_side_by_side(sizes, _cores()) or not _on_cpu(arrays):
        yield False
        return
    with _one_lapack_thread():
        yield True


def too_small_for_threads(sizes: Sequence[int]) -> bool:
    """Whether factorisations of orders ``sizes`` are too small to gain from a second core
    in any way (:data:`SIDE_BY_SIDE_MIN_COST` in all): LAPACK's threads would only be left
    spinning after them."""
    return sum(cost(n) for n in sizes) < SIDE_BY_SIDE_MIN_COST


def faster_side_by_side(sizes: Sequence[int], cores: int) -> bool:
    """Whether factorisations of orders ``sizes`` (:func:`cost` each on one thread) finish
    sooner one per core than in turn on LAPACK's threads: ``max(largest, total / cores)``
    at most ``total /`` :data:`LAPACK_THREAD_SPEEDUP`."""
    costs = [cost(n) for n in sizes]
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
