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

Inside a host callback (:func:`host_side_by_side`: the inverses of
:func:`jaxgeom._symmetric.spd_inverses`, LAPACK's ``potri``, which XLA has not), the same
chains run from Python threads, LAPACK called through ``ctypes`` so that Python's lock is
let go while it runs: XLA runs a program's host callbacks one at a time, so one callback
takes all the matrices and deals them itself.

The thread limit applies to every BLAS library loaded in the process (set through
``threadpoolctl``), held only while the call runs (the call is waited for inside it);
holds are counted, so that those of several threads overlap (:class:`_OneThreadHold`).
Inside a trace (a ``jit``: a KFAC ``solve`` in a training step) the factorisations are
compiled with the code around them, and XLA runs the independent ones at once, each with
LAPACK's threads, which then spin into what follows: there, when the chains would be
faster, host callbacks hold LAPACK to one thread from just before the factorisations to
just after them (:func:`one_thread_in_trace`; bench_mlp, a jitted step of gradient, KFAC
build and exact-damped ``solve``: 204–238 → 146–169 ms; with EKFAC 220–243 → 143–159
ms), and the factorisations run side by side: KFAC's ``eigh``'s in one host call
(:func:`side_by_side`'s ``on_host``), since XLA:CPU runs a program's ready operations on
one thread when 8 or fewer are ready (bench_mlp's six held ``eigh``'s ran one after the
other); the others in chains for XLA's pool. On other backends the function runs as
written.
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
import numpy as np

from jaxgeom._compile import factorisation_jit
from jaxgeom._host_calls import host_calls_allowed, set_in_this_thread

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
                 orders: Sequence[int], *, work_follows: bool = False,
                 on_host: Callable[[list], list] | None = None) -> list[Any]:
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
    thread, waited for. Otherwise the calls as written, eagerly: their factorisations run
    one after the other on LAPACK's threads (one compiled call would let XLA start several
    at once, each with LAPACK's threads: bench_resnet's EKFAC build took 2.6 s instead of
    2.1 s that way).
    Inside a trace (your ``jit``), where the eager call would run chains: given ``on_host``
    (``[fn(item) for item in items]`` in one host call that deals them into chains itself,
    :func:`host_side_by_side`) and where a host call may be made
    (:func:`~jaxgeom._host_calls.host_calls_allowed`), that call, with LAPACK held to one
    thread from before it to after it (:func:`one_thread_in_trace`: the program's own LAPACK
    calls around it, a range sketch's QR, leave no thread spinning); else compiled with the
    code around them, the same chains, each call after the one before (:func:`_in_chains`),
    held the same way, for XLA to run side by side on its pool (bench_mlp's KFAC ``inv`` in
    a ``jit``: 102 → 72 ms, its exact-damped ``solve`` 131 → 95 ms, 2-core Xeon; on a 2-core
    AMD EPYC VM XLA ran two held ``eigh`` of one program one after the other, and the host
    call is what runs them at once: :func:`jaxgeom.pmat._spectral.host_eighs`).
    Otherwise the calls as written. Traced for a compiled eager call that holds LAPACK
    itself (:func:`one_thread_when_faster`), ``on_host`` or the calls as written: chained
    there, KFAC's eager ``eigvalsh`` took 212–222 ms against 188–196 ms.
    """
    items = list(items)
    leaves = jax.tree_util.tree_leaves(items)
    if any(isinstance(x, jax.core.Tracer) for x in leaves):
        schedule = chains(orders, _cores())
        if schedule is None:
            return [fn(item) for item in items]
        if on_host is not None and host_calls_allowed():
            return one_thread_in_trace(on_host, items)
        if getattr(_HELD_HERE, "active", None) == "eagerly":
            return [fn(item) for item in items]
        return one_thread_in_trace(lambda xs: _in_chains(fn, xs, schedule), items)
    if not _on_cpu(leaves):
        return [fn(item) for item in items]
    schedule = chains(orders, _cores())
    if schedule is None:
        if not (work_follows and too_small_for_threads(orders)):
            return [fn(item) for item in items]
        with _one_lapack_thread():
            return _run(_each(fn), items)
    parts = [[items[i] for i in chain] for chain in schedule]
    calls = [_each(fn).lower(part).compile() for part in parts]
    return _chains_at_once([functools.partial(_run, call, part)
                            for call, part in zip(calls, parts)], schedule, _workers())


def host_side_by_side(fn: Callable[[Any], Any], items: Sequence[Any],
                      orders: Sequence[int]) -> list[Any]:
    """``[fn(item) for item in items]`` on the host (in a host callback), where the calls
    are independent, ``fn(items[i])`` factorises a matrix of order ``orders[i]`` and lets
    go of Python's lock while LAPACK runs (LAPACK called through ``ctypes``).

    When they finish sooner one per core (:func:`chains`): LAPACK held to one thread, the
    chains run at once from this thread and worker threads of their own, and waited for;
    no LAPACK thread is left spinning into the computation that follows (module
    docstring). Otherwise in turn, on LAPACK's threads. bench_mlp's five π-damped KFAC
    factors of order 512–785 by ``potrf`` and ``potri``: 14–15 ms in two chains, as in
    turn on LAPACK's two threads, 25 ms in turn on one (2-core AMD EPYC VM)."""
    items = list(items)
    schedule = chains(orders, _cores())
    if schedule is None:
        return [fn(item) for item in items]

    def chain(positions):
        return [fn(items[i]) for i in positions]

    return _chains_at_once([functools.partial(chain, positions) for positions in schedule],
                           schedule, _workers("host-lapack"))


def host_call_side_by_side(fn: Callable[[np.ndarray], Any], ms: Sequence[jax.Array],
                           results: Any) -> Any:
    """``tuple(fn(m) for m in ms)`` of square matrices in one host callback
    (``jax.pure_callback``, ``results`` its ``ShapeDtypeStruct``'s), the calls dealt into
    chains where faster (:func:`host_side_by_side`, ``fn`` factorising a matrix of its
    order and letting go of Python's lock while LAPACK runs). Under ``vmap``, one call a
    stacked element."""
    return jax.pure_callback(functools.partial(_each_on_host, fn), results, *ms,
                             vmap_method="sequential")


def _each_on_host(fn: Callable[[np.ndarray], Any], *ms: np.ndarray) -> tuple:
    ms = [np.asarray(m) for m in ms]
    return tuple(host_side_by_side(fn, ms, [m.shape[0] for m in ms]))


def _chains_at_once(runs: list[Callable[[], list]], schedule: list[list[int]],
                    workers: concurrent.futures.ThreadPoolExecutor) -> list:
    """Each chain's ``runs[c]()`` (its items' results, in the order of ``schedule[c]``) at
    once, the first in this thread and the others in ``workers``, with LAPACK held to one
    thread until all are done; the results in the items' order."""
    with _one_lapack_thread():
        others = [workers.submit(run) for run in runs[1:]]
        try:
            first = runs[0]()
        finally:
            concurrent.futures.wait(others)  # none left running on one LAPACK thread
    results = [None] * sum(len(chain) for chain in schedule)
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
    through a zero made of the previous result (:func:`_after`: exact). Independent
    calls, XLA:CPU would run at once (module docstring), and a chain would take more than
    its core."""
    results, previous = [], None
    for item in items:
        if previous is not None:
            item = _after(previous, item)
        previous = fn(item)
        results.append(previous)
    return results


def _in_chains(fn: Callable[[Any], Any], items: list, schedule: list[list[int]]) -> list:
    """``[fn(item) for item in items]`` traced in the chains of ``schedule``: each chain's
    calls one after another (:func:`_one_after_another`), so that XLA runs at most one
    factorisation a chain at once."""
    results = [None] * len(items)
    for chain in schedule:
        for i, value in zip(chain, _one_after_another(fn, [items[i] for i in chain])):
            results[i] = value
    return results


def _after(previous: Any, x: Any) -> Any:
    """``x``, read after ``previous`` (floating-point) is computed, its values unchanged:
    :func:`_read_after` with a zero made of ``previous``'s first element (``|r · 0|``,
    ``r`` made finite)."""
    r = jnp.ravel(jax.tree_util.tree_leaves(previous)[0])[0]
    return _read_after(jnp.abs(jnp.where(jnp.isfinite(r), r, 0) * 0), x)


@functools.cache
def _each(fn: Callable[[Any], Any]) -> Any:
    """``jax.jit`` of ``fn`` on each item, one after another (one per ``fn``)."""
    return factorisation_jit(functools.partial(_one_after_another, fn))


def _run(call: Callable[[list], Any], items: list) -> Any:
    return jax.block_until_ready(call(items))


@functools.cache
def _workers(kind: str = "lapack") -> concurrent.futures.ThreadPoolExecutor:
    """The threads that run chains besides the calling one: :func:`side_by_side`'s
    (``"lapack"``) and :func:`host_side_by_side`'s (``"host-lapack"``), apart, since a chain
    of the first may run a host call that waits on the second."""
    return concurrent.futures.ThreadPoolExecutor(max(_cores() - 1, 1),
                                                 thread_name_prefix=f"jaxgeom-{kind}")


#: set in a thread while it holds LAPACK to one thread (``"eagerly"``), or traces a
#: function whose run will (``"traced"``, :func:`one_thread_in_trace`): a hold traced
#: there is already held
_HELD_HERE = threading.local()

class _OneThreadHold:
    """LAPACK (every BLAS library in the process) held to one thread while any hold is
    taken, from any thread: the holds are counted, the libraries' thread counts read and
    set to 1 when the count leaves 0, and set back when it returns to 0 (holds of several
    Python threads, and of XLA's threads running a compiled call's host callbacks,
    overlap without one giving back another's limit).

    The counts are set through ``threadpoolctl``'s controllers, but not through its
    policy (3.8) of one controlling Python thread per OpenBLAS, whose limits alone take
    effect: the holds' host callbacks run in XLA's threads, which are not that thread."""

    def __init__(self):
        self._lock = threading.Lock()
        self._count = 0
        self._restore: list[tuple[Any, int]] = []

    def take(self) -> None:
        with self._lock:
            if self._count == 0:
                libraries = _blas_threads().select(user_api="blas").lib_controllers
                self._restore = [(lib, n) for lib in libraries
                                 if (n := lib.get_num_threads()) is not None]
                for lib, _ in self._restore:
                    _set_threads(lib, 1)
            self._count += 1

    def give_back(self) -> None:
        with self._lock:
            self._count -= 1
            if self._count == 0:
                for lib, n in self._restore:
                    _set_threads(lib, n)
                self._restore = []

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Held in the block; a hold traced in it (a compiled eager call's first trace)
        is already held: traced as written."""
        self.take()
        try:
            with set_in_this_thread(_HELD_HERE, "eagerly"):
                yield
        finally:
            self.give_back()


def _set_threads(library: Any, n: int) -> None:
    """Set a BLAS library's thread count, whichever Python thread asks."""
    getattr(library, "_real_set_num_threads", library.set_num_threads)(n)


_ONE_THREAD = _OneThreadHold()


def _one_lapack_thread():
    """LAPACK (every BLAS library in the process) held to one thread in the block."""
    return _ONE_THREAD.held()


def one_thread_in_trace_faster(orders: Sequence[int]) -> bool:
    """Whether independent factorisations of ``orders`` inside a trace should run with
    LAPACK held to one thread (:func:`one_thread_in_trace`): when the eager call would
    run them in chains (:func:`chains`: they split well over the cores and are large
    enough). Small ones keep LAPACK's threads: there the two callbacks cost more than the
    spinning (a training step of gradient, EKFAC build and solve on bench_small, in a
    ``jit``: 9.6 → 10.8 ms held).
    """
    return chains(orders, _cores()) is not None


def one_thread_in_trace(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, traced into the computation around it, with LAPACK held to one thread
    while it runs, when that computation runs on a CPU (JAX's default backend when it is
    traced).

    XLA:CPU runs a compiled call's independent factorisations at once, each with LAPACK's
    own threads, and those threads spin after each call (module docstring). A training step
    of gradient, KFAC build and exact-damped ``solve`` on bench_mlp, in one ``jit``, took
    204–238 ms, 146–169 ms with the ``solve`` held (2-core Xeon).

    Two host callbacks (``jax.pure_callback``) take and give back the hold
    (:class:`_OneThreadHold`): the first once every array of ``args`` is computed, the
    second once every array of the result is. Each is passed one element of each array,
    gradients stopped, and its result, ``0``, is added to the arrays read after it (``fn``'s
    inputs, the result; :func:`_read_after`): data dependencies order the callbacks, and
    keep the second whenever any of the result or of its tangents is used
    (:func:`_released`). ``fn`` may be differentiated, rematerialised, ``vmap``-ed (the
    callbacks then run once per element) and run in loops. A hold traced inside ``fn`` is
    already held: ``fn(*args)`` as written. Costs two callbacks (≈ 20 µs each) and, for a
    result read outside the call, one pass over it; a program with host callbacks cannot be
    serialised (``jax.export``): traced inside
    :func:`~jaxgeom._host_calls.no_host_callbacks`, ``fn(*args)`` as written."""
    if (getattr(_HELD_HERE, "active", None) or not host_calls_allowed()
            or jax.default_backend() != "cpu"):
        return fn(*args)
    _blas_threads()  # the libraries found in this thread, not in XLA's
    args = _read_after(_host_call(_take_hold, args), args)
    with set_in_this_thread(_HELD_HERE, "traced"):
        out = fn(*args)
    if not any(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(out)):
        raise TypeError("one_thread_in_trace: fn must return arrays (they carry the hold's end)")
    return _released(_host_call(_give_back_hold, out), out)


def _take_hold(*_elements: Any) -> np.ndarray:
    _ONE_THREAD.take()
    return np.zeros((), np.int32)


def _give_back_hold(*_elements: Any) -> np.ndarray:
    _ONE_THREAD.give_back()
    return np.zeros((), np.int32)


def _host_call(callback: Callable[..., np.ndarray], tree: Any) -> jax.Array:
    """``callback``'s result (an ``int32`` zero), called on the host once every array of
    ``tree`` is computed (one element of each, gradients stopped)."""
    elements = [jax.lax.stop_gradient(jnp.ravel(x)[:1]) for x in jax.tree_util.tree_leaves(tree)
                if isinstance(x, jax.Array) and x.size]
    return jax.pure_callback(callback, jax.ShapeDtypeStruct((), jnp.int32), *elements,
                             vmap_method="sequential")


@jax.custom_jvp
def _released(zero: jax.Array, tree: Any) -> Any:
    """``tree`` read after the hold's end (:func:`_read_after`), and so are its tangents:
    each multiplied by ``1 − 0.0 · zero`` (exactly 1, which XLA cannot know). A result whose
    primal values go unused — a gradient that needs only the tangents a result's
    derivative computes, e.g. ``∇ Σ λᵢ`` from the eigenvectors alone — would otherwise
    leave the hold's end without a reader: XLA removes a ``pure_callback`` nothing reads,
    and the hold taken before ``fn`` would never be given back (LAPACK left on one thread
    for the rest of the process). Transposed for reverse mode, the product by the
    constant keeps it as a residual of the forward pass, where the hold ends."""
    return _read_after(zero, tree)


@_released.defjvp
def _released_jvp(primals, tangents):
    zero, tree = primals
    _, dtree = tangents
    one = 1 + zero * -0.0  # in floating point: XLA folds an integer 0 · zero to 0

    def after(t):
        if not jnp.issubdtype(t.dtype, jnp.inexact):
            return t  # float0: an integer or boolean result has no tangent
        return t * one.astype(t.dtype)

    return _read_after(zero, tree), jax.tree_util.tree_map(after, dtree)


def _read_after(zero: jax.Array, tree: Any) -> Any:
    """``tree``, each of its arrays read once ``zero`` (a scalar ``0`` or ``+0.0`` that XLA
    cannot know) is computed, its values unchanged: a floating-point ``x + (-0.0 · zero)``
    (``-0.0`` is the additive identity of every ``x``, ``±0`` included), an integer
    ``x + zero``, a boolean ``x ^ (zero != 0)``; XLA fuses each into the array's consumers.
    (``lax.optimization_barrier`` orders nothing here: XLA:CPU removes it before it
    schedules the call.)"""

    def after(x):
        if not isinstance(x, jax.Array):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return x + (zero * -0.0).astype(x.dtype)
        if jnp.issubdtype(x.dtype, jnp.integer):
            return x + zero.astype(x.dtype)
        return x ^ (zero != 0)

    return jax.tree_util.tree_map(after, tree)


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
