"""Independent LAPACK factorisations side by side (``jaxgeom._lapack``): the schedule chosen
by the cost model, the results unchanged, and LAPACK held to one thread only while the
call runs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import jaxgeom
from jaxgeom import _lapack
from jaxgeom._lapack import faster_side_by_side, side_by_side

on_cpu = pytest.mark.skipif(jax.default_backend() != "cpu",
                            reason="the thread limit applies to a CPU's LAPACK only")


def test_cost_model_picks_even_splits():
    # bench_mlp's KFAC factors: 785³ is 47% of Σ n³, so two cores finish in ≈ half the
    # time, more than LAPACK's 1.5x on two threads
    assert faster_side_by_side([512, 785, 512, 513, 10, 513], cores=2)
    # one 4097² factor is ≈ all the work: alone on one core it would take 1.5x as long
    assert not faster_side_by_side([32, 28, 32, 289, 64, 289, 10, 4097], cores=2)
    # max(largest, total/cores) · 1.5 ≤ total, at the boundary and just past it
    assert faster_side_by_side([2.0 ** (1 / 3), 1.0], cores=2)  # costs 2, 1: 2 · 1.5 ≤ 3
    assert not faster_side_by_side([2.1 ** (1 / 3), 1.0], cores=2)
    # nothing to run side by side: one core, or one factorisation
    assert not faster_side_by_side([512, 512], cores=1)
    assert not faster_side_by_side([512], cores=8)
    # more cores: total/cores falls, the largest bounds the schedule
    assert faster_side_by_side([100] * 16, cores=8)


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


def _eighs_and_threads(matrices):
    pairs = [jnp.linalg.eigh(m) for m in matrices]
    threads = jax.pure_callback(_blas_threads_during, jax.ShapeDtypeStruct((), np.int32),
                                matrices[0])
    return pairs, threads


@on_cpu
def test_side_by_side_limits_lapack_threads_while_running(monkeypatch):
    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    keys = jax.random.split(jax.random.key(0), 3)
    matrices = [_spd(k, n) for k, n in zip(keys, (20, 21, 22))]
    before = _blas_threads()

    pairs, threads = side_by_side(_eighs_and_threads, [20, 21, 22], matrices)

    assert int(threads) == 1
    assert _blas_threads() == before  # restored once the call is done
    for m, (evals, evecs) in zip(matrices, pairs):
        np.testing.assert_allclose(evecs * evals @ evecs.T, m, atol=1e-10)
        np.testing.assert_allclose(evals, np.linalg.eigvalsh(np.asarray(m)), atol=1e-10)


@on_cpu
def test_uneven_work_keeps_lapack_threads(monkeypatch):
    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    matrices = [_spd(jax.random.key(1), 40), _spd(jax.random.key(2), 3)]
    default = min(_blas_threads().values())
    _, threads = side_by_side(_eighs_and_threads, [40, 3], matrices)
    assert int(threads) == default


def test_inside_a_trace_runs_as_written():
    matrices = [_spd(jax.random.key(3), 6), _spd(jax.random.key(4), 6)]
    evals = jax.jit(lambda ms: side_by_side(_eighs_and_threads, [6, 6], ms)[0][1][0])(matrices)
    np.testing.assert_allclose(evals, np.linalg.eigvalsh(np.asarray(matrices[1])), atol=1e-10)


def test_ekfac_from_kfac_is_kfac_in_its_eigenbasis():
    """``from_kfac`` (its ``eigh`` side by side) gives the same matrix as the KFAC, with
    orthonormal bases that diagonalise each factor."""
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
    F.solve(v, 0.1, damping="pi")  # Cholesky solves chained G then A: not independent
    F.solve(v, 0.1, method="cg")
    F.norm()
    F.trace()
    assert seen == [orders] * 3


@on_cpu
def test_concurrent_calls_restore_the_default(monkeypatch):
    """Calls from several threads at once each hold the limit in turn, so the thread counts
    the process started with are back once they are done."""
    import concurrent.futures

    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    matrices = [_spd(jax.random.key(8), 30), _spd(jax.random.key(9), 31)]
    before = _blas_threads()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(
            lambda _: side_by_side(_eighs_and_threads, [30, 31], matrices), range(8)))
    assert [int(threads) for _, threads in results] == [1] * 8
    assert _blas_threads() == before
