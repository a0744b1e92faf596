"""Independent LAPACK factorisations side by side (``jaxgeom._lapack``): the schedule chosen
by the cost model, the chains run from threads, the results unchanged, and LAPACK held to
one thread only while the call runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import jaxgeom
from jaxgeom import _lapack
from jaxgeom._lapack import COST_EXPONENT, chains, faster_side_by_side, side_by_side


def order(cost: float) -> float:
    """The order of a matrix of single-threaded ``cost``."""
    return cost ** (1 / COST_EXPONENT)


on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="the thread limit applies to a CPU's LAPACK only")


def test_cost_model_picks_even_splits():
    # bench_mlp's KFAC factors: the 785² is 41% of the work, so two cores finish in ≈ half
    # the time, more than LAPACK's 1.5x on two threads
    assert faster_side_by_side([512, 785, 512, 513, 10, 513], cores=2)
    # one 4097² factor is ≈ all the work: alone on one core it would take 1.5x as long
    assert not faster_side_by_side([32, 28, 32, 289, 64, 289, 10, 4097], cores=2)
    # max(largest, total/cores) · 1.5 ≤ total, at the boundary and just past it
    assert faster_side_by_side([order(2.0), 1.0], cores=2)  # costs 2, 1: 2 · 1.5 ≤ 3
    assert not faster_side_by_side([order(2.1), 1.0], cores=2)
    # nothing to run side by side: one core, or one factorisation
    assert not faster_side_by_side([512, 512], cores=1)
    assert not faster_side_by_side([512], cores=8)
    # more cores: total/cores falls, the largest bounds the schedule
    assert faster_side_by_side([100] * 16, cores=8)


def test_chains_deal_the_costliest_first_to_the_least_loaded(monkeypatch):
    # bench_small's factors: too little work to pay for the threads
    assert chains([64, 33, 64, 65, 10, 65], cores=2) is None
    monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 0)
    # bench_mlp's factors (G, A per layer): the 785² and a 512² against 513², 513², 512², 10²
    assert chains([512, 785, 512, 513, 10, 513], cores=2) == [[1, 2], [3, 5, 0, 4]]
    # costs 3, 5, 3, 4, 3: 5 | 4, then each 3 to the lighter chain (4 + 3, 5 + 3, 7 + 3);
    # the most loaded chain first
    orders = [order(c) for c in (3, 5, 3, 4, 3)]
    assert chains(orders, cores=2) == [[3, 0, 4], [1, 2]]
    # bench_cnn's factors: the 4097² one alone would take 1.5x as long as on two threads
    assert chains([32, 28, 32, 289, 64, 289, 10, 4097], cores=2) is None
    # at the boundary: loads 2 and 1, 2 · 1.5 ≤ 3; just past it
    assert chains([order(2.0), 1.0], cores=2) == [[0], [1]]
    assert chains([order(2.1), 1.0], cores=2) is None
    # nothing to deal: one core, or one factorisation (an empty matrix costs nothing)
    assert chains([512, 512], cores=1) is None
    assert chains([512], cores=8) is None
    assert chains([512, 0], cores=2) is None
    # more cores than factorisations: no empty chains
    assert chains([100, 100], cores=4) == [[0], [1]]
    monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 2 * 100**COST_EXPONENT)
    assert chains([100, 100], cores=2) == [[0], [1]]
    assert chains([100, 99], cores=2) is None


@pytest.mark.parametrize("previous", [1.5, -0.0, np.inf, -np.inf, np.nan])
def test_a_chain_reads_its_inputs_after_the_previous_result_unchanged(previous):
    """``x + 0 · r`` (``r`` made finite): a dependency on ``r``, the values of ``x`` exact."""
    x = jnp.array([1.0, -0.0, 0.0, np.inf, -np.inf, np.nan, 1e-300])
    got = jax.jit(_lapack._after)((jnp.array([previous, 2.0]),), x)
    np.testing.assert_array_equal(got, x)
    assert not np.signbit(got[2])  # +0 stays +0
    ints = jnp.arange(3)
    np.testing.assert_array_equal(jax.jit(_lapack._after)((jnp.array([previous]),), ints), ints)


@pytest.fixture
def small_chains(monkeypatch):
    """Chains for this module's small matrices, on two cores."""
    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 0)


def _spd(key, n):
    x = jax.random.normal(key, (n, n + 3))
    return x @ x.T / n + jnp.eye(n)


def _blas_threads() -> dict[str, int]:
    """The threads of each loaded BLAS library (SciPy's LAPACK, which jaxlib calls, loaded
    first)."""
    import scipy.linalg  # noqa: F401

    return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
            if i["user_api"] == "blas"}


def _blas_threads_during(_):
    """The fewest threads of the loaded BLAS libraries, read while the call runs."""
    return np.int32(min(_blas_threads().values()))


def _eigh_and_threads(matrix):
    threads = jax.pure_callback(_blas_threads_during, jax.ShapeDtypeStruct((), np.int32),
                                matrix)
    return jnp.linalg.eigh(matrix), threads


def _check_eigh(matrices, pairs):
    for m, (evals, evecs) in zip(matrices, pairs):
        np.testing.assert_allclose(evecs * evals @ evecs.T, m, atol=1e-10)
        np.testing.assert_allclose(evals, np.linalg.eigvalsh(np.asarray(m)), atol=1e-10)


def _host_inverse_and_context(m):
    """A host inverse (no lock let go: enough to check the schedule), with the thread it
    ran in and the fewest BLAS threads while it ran."""
    import threading

    return (np.linalg.inv(m), threading.current_thread().name,
            min(_blas_threads().values()))


@pytest.mark.parametrize("cores, chained", [(2, True), (1, False)])
def test_host_side_by_side_runs_chains_from_threads_with_one_lapack_thread(
        monkeypatch, small_chains, cores, chained):
    """On the host (a host callback's body): with chains, one per core, each in its own
    thread, LAPACK held to one thread while they run and given back after; on one core,
    in turn in the calling thread, LAPACK's threads untouched. The results in order."""
    import threading

    monkeypatch.setattr(_lapack, "_cores", lambda: cores)
    keys = jax.random.split(jax.random.key(1), 3)
    matrices = [np.asarray(_spd(k, n)) for k, n in zip(keys, (22, 20, 21))]
    before = _blas_threads()

    results = _lapack.host_side_by_side(_host_inverse_and_context, matrices, [22, 20, 21])

    for m, (inverse, _, _) in zip(matrices, results):
        np.testing.assert_allclose(inverse @ m, np.eye(len(m)), atol=1e-10)
    threads = {thread for _, thread, _ in results}
    if chained:
        assert len(threads) == 2 and threading.current_thread().name in threads
        assert [blas for _, _, blas in results] == [1, 1, 1]
    else:
        assert threads == {threading.current_thread().name}
        assert [blas for _, _, blas in results] == [min(before.values())] * 3
    assert _blas_threads() == before


@on_cpu
def test_side_by_side_runs_chains_from_threads_with_one_lapack_thread(monkeypatch, small_chains):
    import threading

    ran_in = {}

    def run(call, items):
        ran_in[threading.current_thread().name] = len(items)
        return call(items)

    monkeypatch.setattr(_lapack, "_run", run)
    keys = jax.random.split(jax.random.key(0), 3)
    matrices = [_spd(k, n) for k, n in zip(keys, (22, 20, 21))]
    before = _blas_threads()

    results = side_by_side(_eigh_and_threads, matrices, [22, 20, 21])

    assert [int(threads) for _, threads in results] == [1, 1, 1]
    assert _blas_threads() == before  # restored once the call is done
    _check_eigh(matrices, [pair for pair, _ in results])
    # the most loaded chain (20² and 21²) in this thread, the 22² alone in a worker's
    assert ran_in.pop(threading.current_thread().name) == 2
    assert [(name.startswith("jaxgeom-lapack"), n) for name, n in ran_in.items()] == [(True, 1)]


@on_cpu
def test_small_factorisations_before_more_work_run_here_on_one_lapack_thread(monkeypatch):
    """Too little work for chains (bench_small's factors), with work following (EKFAC's
    refit): one chain in the calling thread, LAPACK held to one thread while it runs (none
    left spinning into that work) and restored once it is done. Without work following,
    as written, on LAPACK's threads."""
    import threading

    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    ran_in = []
    run = _lapack._run

    def recorded(call, items):
        ran_in.append((threading.current_thread().name, len(items)))
        return run(call, items)

    monkeypatch.setattr(_lapack, "_run", recorded)
    orders = [33, 64, 10]
    assert chains(orders, cores=2) is None
    keys = jax.random.split(jax.random.key(6), 3)
    matrices = [_spd(k, n) for k, n in zip(keys, orders)]
    before = _blas_threads()

    results = side_by_side(_eigh_and_threads, matrices, orders, work_follows=True)

    assert [int(threads) for _, threads in results] == [1, 1, 1]
    assert _blas_threads() == before
    assert ran_in == [(threading.current_thread().name, 3)]
    _check_eigh(matrices, [pair for pair, _ in results])
    default = min(before.values())
    results = side_by_side(_eigh_and_threads, matrices, orders)
    assert [int(threads) for _, threads in results] == [default] * 3
    assert len(ran_in) == 1
    _check_eigh(matrices, [pair for pair, _ in results])


@on_cpu
def test_side_by_side_traces_with_the_callers_configuration(small_chains):
    """The chains are traced in the calling thread: a configuration set there for the call
    (here 32-bit integers, the suite's default being 64-bit) holds in the worker's chain."""

    def eigh_and_index(m):
        return jnp.linalg.eigh(m), jnp.argmax(m[0])

    with jax.enable_x64(False):
        matrices = [_spd(jax.random.key(10), 12), _spd(jax.random.key(11), 12)]
        results = side_by_side(eigh_and_index, matrices, [12, 12])
    assert [index.dtype for _, index in results] == [jnp.int32, jnp.int32]
    assert [pair[0].dtype for pair, _ in results] == [jnp.float32, jnp.float32]
    for m, ((evals, _), index) in zip(matrices, results):
        np.testing.assert_allclose(evals, np.linalg.eigvalsh(np.asarray(m, np.float64)),
                                   rtol=1e-5)
        assert index == np.argmax(np.asarray(m)[0])


@on_cpu
def test_uneven_work_keeps_lapack_threads(small_chains):
    matrices = [_spd(jax.random.key(1), 40), _spd(jax.random.key(2), 3)]
    default = min(_blas_threads().values())
    results = side_by_side(_eigh_and_threads, matrices, [40, 3])
    assert [int(threads) for _, threads in results] == [default, default]
    _check_eigh(matrices, [pair for pair, _ in results])


@on_cpu
def test_an_error_in_a_chain_reaches_the_caller_after_every_chain(monkeypatch, small_chains):
    matrices = [_spd(jax.random.key(12), 10), _spd(jax.random.key(13), 10)]
    before = _blas_threads()

    def failing(call, items):
        raise RuntimeError("chain failed")

    monkeypatch.setattr(_lapack, "_run", failing)
    with pytest.raises(RuntimeError, match="chain failed"):
        side_by_side(_eigh_and_threads, matrices, [10, 10])
    assert _blas_threads() == before


def test_inside_a_trace_runs_as_written():
    matrices = [_spd(jax.random.key(3), 6), _spd(jax.random.key(4), 6)]
    evals = jax.jit(lambda ms: side_by_side(_eigh_and_threads, ms, [6, 6])[1][0][0])(
        matrices)
    np.testing.assert_allclose(evals, np.linalg.eigvalsh(np.asarray(matrices[1])), atol=1e-10)


def test_ekfac_from_kfac_is_kfac_in_its_eigenbasis():
    """``from_kfac`` (its ``eigh`` side by side when large enough) gives the same matrix as
    the KFAC, with orthonormal bases that diagonalise each factor."""
    key = jax.random.key(5)
    layout = jaxgeom.LayerCollection.from_params(
        {"a": {"kernel": jnp.zeros((5, 4)), "bias": jnp.zeros(4)},
         "b": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros(3)}})
    x = jax.random.normal(key, (16, 5))

    def apply_fn(p, x):
        return jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"] + p["b"]["bias"]

    params = jax.tree_util.tree_map(
        lambda a: jax.random.normal(jax.random.fold_in(key, a.size), a.shape),
        layout.from_flat(jnp.zeros(layout.numel())))
    kfac = jaxgeom.FIM(apply_fn, params, (x, jnp.zeros(16, int)), jaxgeom.PMatKFAC)
    ekfac = jaxgeom.PMatEKFAC.from_kfac(kfac)
    np.testing.assert_allclose(ekfac.to_dense(), kfac.to_dense(), atol=1e-10)
    for node, factor in zip(ekfac.factors, kfac.factors):
        for q, m in ((node.qa, factor.A), (node.qg, factor.G)):
            np.testing.assert_allclose(q.T @ q, np.eye(q.shape[0]), atol=1e-10)
            rotated = q.T @ m @ q
            np.testing.assert_allclose(rotated, np.diag(np.diag(rotated)), atol=1e-10)


@on_cpu
def test_kfac_eigendecompositions_in_chains_equal_those_in_turn(monkeypatch, small_chains):
    """KFAC's Kronecker nodes and its exact block (the LayerNorm's), factorised in compiled
    chains from two threads (eager calls), and in one host call (inside a ``jit``), give
    the eigendecompositions computed in turn: the pseudo-inverse (nodes and block) and
    EKFAC's bases."""
    from models import make_linen_layernorm

    t = make_linen_layernorm()
    F = jaxgeom.FIM(t.apply_fn, t.params, (t.x, t.y), jaxgeom.PMatKFAC)
    assert len(F.blocks) == 1 and len(F.factors) == 2
    monkeypatch.setattr(_lapack, "LAPACK_THREAD_SPEEDUP", 1.0)  # the 10² block alone: 1000 > 493
    chain_lengths = []

    def run(call, items):
        chain_lengths.append(len(items))
        return call(items)

    monkeypatch.setattr(_lapack, "_run", run)
    in_chains = F.pinv().to_dense(), jaxgeom.PMatEKFAC.from_kfac(F).to_dense()
    # pinv: the 10² block | the four factors (6², 5², 5², 3²); EKFAC: 6², 5² | 5², 3²
    assert sorted(chain_lengths) == [1, 2, 2, 4]

    def both(F):
        return F.pinv().to_dense(), jaxgeom.PMatEKFAC.from_kfac(F).to_dense()

    on_host = jax.jit(both)(F)
    assert len(chain_lengths) == 4  # no compiled chain: the host calls' own
    if jax.default_backend() == "cpu":  # each: the hold's two callbacks and the eigh's
        assert _host_callbacks(lambda F: both(F), F) == 6
    monkeypatch.setattr(_lapack, "chains", lambda orders, cores: None)
    in_turn = F.pinv().to_dense(), jaxgeom.PMatEKFAC.from_kfac(F).to_dense()
    for got, want in [*zip(in_chains, in_turn), *zip(on_host, in_turn)]:
        np.testing.assert_allclose(got, want, atol=1e-10)
    np.testing.assert_allclose(in_chains[1], F.to_dense(), atol=1e-10)


def _small_kfac():
    key = jax.random.key(6)
    params = {"a": {"kernel": jax.random.normal(key, (5, 4)), "bias": jnp.zeros(4)},
              "b": {"kernel": jax.random.normal(jax.random.fold_in(key, 1), (4, 3)),
                    "bias": jnp.zeros(3)}}
    x = jax.random.normal(jax.random.fold_in(key, 2), (16, 5))

    def apply_fn(p, x):
        return jnp.tanh(x @ p["a"]["kernel"] + p["a"]["bias"]) @ p["b"]["kernel"] + p["b"]["bias"]

    return jaxgeom.FIM(apply_fn, params, (x, jnp.zeros(16, int)), jaxgeom.PMatKFAC), params


def test_eager_calls_that_factorise_ask_for_side_by_side(monkeypatch):
    """A compiled eager call of KFAC passes the orders of the matrices it factorises
    independently (G and A of each layer) to the thread policy; other calls do not."""
    import contextlib

    from jaxgeom import _dispatch

    seen = []

    @contextlib.contextmanager
    def record(orders, arrays):
        seen.append(list(orders))
        yield False

    monkeypatch.setattr(_dispatch, "one_thread_when_faster", record)
    F, params = _small_kfac()
    v = jaxgeom.random_pvector(jax.random.key(7), params)
    orders = [4, 6, 3, 5]  # G then A (bias column included) of each layer

    x = F.solve(v, 0.1)  # exact damping through the eigenbases
    np.testing.assert_allclose(F.mv(x).to_flat() + 0.1 * x.to_flat(), v.to_flat(), atol=1e-10)
    assert seen == [orders]
    np.testing.assert_allclose(F.norm(2), np.max(np.abs(np.linalg.eigvalsh(F.to_dense()))),
                               rtol=1e-10)
    np.testing.assert_allclose(F.eigvalsh(), np.linalg.eigvalsh(F.to_dense()), atol=1e-10)
    assert seen == [orders] * 3
    F.solve(v, 0.1, damping="pi")  # the Cholesky factorisations of G and A
    assert seen == [orders] * 4
    F.solve(v, 0.1, method="cg")
    F.norm()
    F.trace()
    assert seen == [orders] * 4


@on_cpu
def test_eager_factorisations_hold_lapack_to_one_thread_when_faster(monkeypatch):
    """The policy of compiled eager calls: one LAPACK thread for factorisations faster
    side by side, LAPACK's threads for one alone or one large one among small ones."""
    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    arrays = [jnp.zeros(2)]
    before = _blas_threads()
    for orders in ([4, 6, 3, 5], [512, 785, 512, 513, 10, 513]):
        with _lapack.one_thread_when_faster(orders, arrays) as limited:
            assert limited and set(_blas_threads().values()) == {1}
        assert _blas_threads() == before
    for orders in ([65], [32, 64, 4097]):
        with _lapack.one_thread_when_faster(orders, arrays) as limited:
            assert not limited and _blas_threads() == before


@on_cpu
def test_concurrent_calls_restore_the_default(small_chains):
    """Calls from several threads at once each hold the limit in turn, so the thread counts
    the process started with are back once they are done."""
    import concurrent.futures

    matrices = [_spd(jax.random.key(8), 30), _spd(jax.random.key(9), 31)]
    before = _blas_threads()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: side_by_side(_eigh_and_threads, matrices, [30, 31]), range(8)))
    assert [int(threads) for result in results for _, threads in result] == [1] * 16
    assert _blas_threads() == before
    for result in results:
        _check_eigh(matrices, [pair for pair, _ in result])


# ------------------------------------------------------------ inside a trace (your jit)


def _host_callbacks(fn, *args) -> int:
    """The host callbacks in ``fn``'s program: the hold's and ``_eigh_and_threads``'s."""
    return str(jax.make_jaxpr(fn)(*args)).count("pure_callback")


@on_cpu
def test_inside_a_trace_factorisations_run_on_one_lapack_thread_when_faster(small_chains):
    """In a ``jit``, factorisations that the eager call would run in chains run with LAPACK
    held to one thread from before the first to after the last (XLA runs them side by
    side), the thread counts restored once the call is done; the results unchanged."""
    matrices = [_spd(jax.random.key(20 + i), n) for i, n in enumerate((22, 20, 21))]
    before = _blas_threads()

    def call(ms):
        return side_by_side(_eigh_and_threads, ms, [22, 20, 21])

    results = jax.jit(call)(matrices)

    assert [int(threads) for _, threads in results] == [1, 1, 1]
    assert _blas_threads() == before and _lapack._ONE_THREAD._count == 0
    _check_eigh(matrices, [pair for pair, _ in results])
    assert _host_callbacks(call, matrices) == 3 + 2  # the reads of the threads, the hold's two


@on_cpu
def test_inside_a_trace_uneven_or_small_work_keeps_lapack_threads():
    """No hold where the eager call would keep LAPACK's threads (one large matrix among
    small ones, or too little work): the program as written, no callbacks added."""
    default = min(_blas_threads().values())
    for orders in ([40, 3], [12, 11]):
        matrices = [_spd(jax.random.key(30 + n), n) for n in orders]

        def call(ms, orders=orders):
            return side_by_side(_eigh_and_threads, ms, orders)

        results = jax.jit(call)(matrices)
        assert [int(threads) for _, threads in results] == [default] * 2
        assert _host_callbacks(call, matrices) == 2
        _check_eigh(matrices, [pair for pair, _ in results])


@on_cpu
@pytest.mark.parametrize("transform", ["grad", "grad_of_linear", "vmap", "checkpoint", "scan"])
def test_a_held_trace_differentiates_batches_and_loops(small_chains, transform):
    """The hold inside ``grad``, ``vmap``, ``checkpoint`` and ``scan``: the numbers of the
    same program without it, LAPACK back to its threads afterwards — also for a gradient
    that needs none of the held result's values (``∇ Σ λᵢ``: the eigenvectors alone),
    whose hold's end XLA once removed, leaving LAPACK on one thread for good."""
    matrices = [_spd(jax.random.key(40 + i), n) for i, n in enumerate((7, 6))]
    outer = (lambda e: e) if transform == "grad_of_linear" else jnp.sin

    def eigenvalues(ms, hold=True):
        def fn(xs):
            return [jnp.linalg.eigvalsh(x) for x in xs]

        out = _lapack.one_thread_in_trace(fn, ms) if hold else fn(ms)
        return sum(jnp.sum(outer(e)) for e in out)

    def transformed(f):
        if transform.startswith("grad"):
            return jax.grad(f)
        if transform == "vmap":
            return jax.vmap(f)
        if transform == "checkpoint":
            return jax.grad(jax.checkpoint(f))
        return lambda ms: jax.lax.scan(lambda c, _: (c + f(ms), None), 0.0, None, length=3)[0]

    args = [jnp.stack([m, 2 * m]) for m in matrices] if transform == "vmap" else matrices
    before = _blas_threads()
    got = jax.jit(transformed(eigenvalues))(args)
    want = jax.jit(transformed(lambda ms: eigenvalues(ms, hold=False)))(args)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-12)
    assert _host_callbacks(transformed(eigenvalues), args) >= 2
    assert _blas_threads() == before and _lapack._ONE_THREAD._count == 0


def test_a_hold_inside_a_held_trace_adds_nothing():
    def inner(xs):
        return [jnp.linalg.eigvalsh(x) for x in xs]

    def outer(xs):
        return _lapack.one_thread_in_trace(lambda ys: _lapack.one_thread_in_trace(inner, ys), xs)

    matrices = [_spd(jax.random.key(50), 5), _spd(jax.random.key(51), 4)]
    assert _host_callbacks(outer, matrices) == (2 if jax.default_backend() == "cpu" else 0)
    with _lapack._one_lapack_thread():  # an eager hold: a call traced in it, as written
        assert _host_callbacks(lambda ms: outer(ms), matrices) == 0
    for got, m in zip(jax.jit(outer)(matrices), matrices):
        np.testing.assert_allclose(got, np.linalg.eigvalsh(np.asarray(m)), atol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.int32, jnp.bool_])
def test_a_value_read_after_the_hold_is_unchanged(dtype):
    """``x + (-0.0 · 0)``: every float exactly, the sign of a zero included; integers and
    booleans as they are."""
    x = jnp.array([1.5, -0.0, 0.0, np.inf, -np.inf, np.nan, 1e-300, -2.0]).astype(dtype)
    got = jax.jit(_lapack._read_after)(jnp.zeros((), jnp.int32), {"x": x, "n": None})["x"]
    np.testing.assert_array_equal(got, x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(np.signbit(got), np.signbit(x))


@on_cpu
def test_holds_are_counted_across_threads():
    """Holds of two threads overlapping: LAPACK stays on one thread until the last is given
    back, then returns to the counts it had before the first."""
    import threading

    before = _blas_threads()
    hold = _lapack._ONE_THREAD
    hold.take()
    other = threading.Thread(target=hold.take)
    other.start()
    other.join()
    assert set(_blas_threads().values()) == {1}
    hold.give_back()
    assert set(_blas_threads().values()) == {1}
    other = threading.Thread(target=hold.give_back)
    other.start()
    other.join()
    assert _blas_threads() == before and hold._count == 0


@on_cpu
def test_a_hold_applies_when_another_python_thread_controls_openblas():
    """threadpoolctl (3.8) lets one Python thread set OpenBLAS's threads and ignores the
    others' limits; the holds run in XLA's threads, and apply from any thread."""
    import threading

    import scipy.linalg  # noqa: F401 - SciPy's OpenBLAS, the one jaxlib calls

    controller = threadpoolctl.ThreadpoolController()
    openblas = [type(lib) for lib in controller.lib_controllers
                if lib.internal_api == "openblas" and hasattr(lib, "clear_controlling_thread")]
    for kind in openblas:  # none controls: the other thread takes control
        kind.clear_controlling_thread(force=True)
    took_control, done = threading.Event(), threading.Event()

    def controlling():
        with controller.limit(limits=2, user_api="blas"):
            took_control.set()
            done.wait(30)

    other = threading.Thread(target=controlling)
    other.start()
    try:
        took_control.wait(30)
        assert all(kind._SHARED_STATE.controlling_thread is other for kind in openblas)
        before = _blas_threads()
        with _lapack._one_lapack_thread():
            assert set(_blas_threads().values()) == {1}
        assert _blas_threads() == before
    finally:
        done.set()
        other.join()
        for kind in openblas:
            kind.clear_controlling_thread(force=True)


@on_cpu
def test_kfac_solve_in_a_jit_runs_side_by_side_and_exact(monkeypatch, small_chains):
    """A KFAC ``solve`` (exact damping) and a π-damped one inside a ``jit`` and under
    ``grad``: held (the hold's two callbacks), the ``eigh``'s in one host call more, the
    numbers of the eager calls, LAPACK's threads back afterwards."""
    F, params = _small_kfac()
    v = jaxgeom.random_pvector(jax.random.key(9), params)
    before = _blas_threads()
    for options, callbacks in (({}, 3), ({"damping": "pi"}, 2)):
        solve = jax.jit(lambda F, v, o=options: F.solve(v, 0.1, **o))
        assert _host_callbacks(lambda F, v, o=options: F.solve(v, 0.1, **o), F, v) == callbacks
        np.testing.assert_allclose(solve(F, v).to_flat(), F.solve(v, 0.1, **options).to_flat(),
                                   rtol=1e-10)

    def quadratic(flat):
        x = F.solve(jaxgeom.PVector.from_flat(params, flat), 0.1)
        return x.dot(x)

    got = jax.jit(jax.grad(quadratic))(v.to_flat())
    dense = F.to_dense()
    inverse = jnp.linalg.inv(dense + 0.1 * jnp.eye(dense.shape[0]))
    np.testing.assert_allclose(got, 2 * inverse.T @ inverse @ v.to_flat(), rtol=1e-8)
    assert _blas_threads() == before and _lapack._ONE_THREAD._count == 0


def test_side_by_side_in_a_trace_hands_the_items_to_on_host_held(small_chains):
    """Inside a trace, where chains are faster, ``on_host`` takes all the items (one host
    call of ``eigh``'s here) between the hold's two callbacks; inside
    ``no_host_callbacks`` the compiled chains, and eagerly the compiled chains too."""
    from jaxgeom.pmat import _spectral

    orders = [20, 21, 22]
    keys = jax.random.split(jax.random.key(70), 3)
    matrices = [_spd(k, n) for k, n in zip(keys, orders)]
    handed = []

    def on_host(ms):
        handed.append(len(ms))
        return _spectral.host_eighs(ms)

    def decomposed(ms):
        return side_by_side(jnp.linalg.eigh, ms, orders, on_host=on_host)

    _check_eigh(matrices, jax.jit(decomposed)(matrices))
    assert handed == [3]
    if jax.default_backend() == "cpu":
        assert _host_callbacks(lambda ms: decomposed(ms), matrices) == 3
    with jaxgeom.no_host_callbacks():
        _check_eigh(matrices, jax.jit(lambda ms: decomposed(ms))(matrices))
        assert _host_callbacks(lambda ms: decomposed(ms), matrices) == 0
    _check_eigh(matrices, decomposed(matrices))
    assert handed == [3, 3]  # the make_jaxpr's trace only
    assert _lapack._ONE_THREAD._count == 0


def test_no_host_callbacks_for_jax_export(small_chains):
    """Inside ``jaxgeom.no_host_callbacks()`` a held trace is traced as written: no host
    callbacks, so that ``jax.export`` serialises it; outside, the callbacks are back."""
    from jax import export

    matrices = [_spd(jax.random.key(60), 20), _spd(jax.random.key(61), 21)]

    def eigenvalues(ms):
        return side_by_side(lambda m: jnp.linalg.eigvalsh(m), ms, [20, 21])

    with jaxgeom.no_host_callbacks():
        assert _host_callbacks(lambda ms: eigenvalues(ms), matrices) == 0
        exported = export.export(jax.jit(lambda ms: eigenvalues(ms)))(matrices)
    for got, m in zip(exported.call(matrices), matrices):
        np.testing.assert_allclose(got, np.linalg.eigvalsh(np.asarray(m)), atol=1e-10)
    held = 2 if jax.default_backend() == "cpu" else 0
    assert _host_callbacks(lambda ms: eigenvalues(ms), matrices) == held
