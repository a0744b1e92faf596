"""LAPACK routines called on the host through ``ctypes`` (:mod:`jaxgeom._host_lapack`),
against NumPy's float64 LAPACK."""

import ctypes
import threading
import time

import numpy as np
import pytest

from jaxgeom import _host_lapack


def spd(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, n + 3))
    return x @ x.T / n + np.eye(n)


def with_garbage_below(m: np.ndarray) -> np.ndarray:
    """``m``'s upper triangle, a large constant below it: what is read must be the upper."""
    return np.triu(m) + np.tril(np.full_like(m, 1e3), -1)


@pytest.mark.parametrize("n, panel", [(1, 4), (4, 4), (5, 4), (11, 4), (130, 64)])
def test_mirror_upper_makes_the_symmetric_matrix_of_the_upper_triangle(n, panel):
    """The host's mirror (panel by panel, in place): ``triu(u) + triu(u, 1)ᵀ`` whatever the
    lower triangle held, for orders below, at and across a panel's width."""
    u = np.random.default_rng(n).standard_normal((n, n))
    expected = np.triu(u) + np.triu(u, 1).T
    mirrored = _host_lapack.mirror_upper(u, panel)
    assert mirrored is u
    np.testing.assert_array_equal(mirrored, expected)


@pytest.mark.parametrize("n", [1, 7, 70])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_spd_inverse_is_the_inverse_of_the_upper_triangle(n, dtype, tol):
    m = spd(n, seed=n)
    inverse = _host_lapack.spd_inverse(with_garbage_below(m).astype(dtype))
    assert inverse.dtype == dtype
    np.testing.assert_allclose(inverse, np.linalg.inv(m), rtol=tol, atol=tol)
    np.testing.assert_array_equal(inverse, inverse.T)
    indefinite = m.astype(dtype)
    indefinite[0, 0] = -1.0
    assert np.isnan(_host_lapack.spd_inverse(indefinite)).all()


@pytest.mark.parametrize("n", [1, 7, 70])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_eigh_is_the_eigendecomposition_of_the_upper_triangle(n, dtype, tol):
    """``(λ, Vᵀ)``: eigenvalues ascending, NumPy's float64 ones; orthonormal eigenvectors in
    the rows, ``m = V diag(λ) Vᵀ``; the input left as it was."""
    m = np.random.default_rng(n).standard_normal((n, n))
    m = m + m.T
    given = with_garbage_below(m).astype(dtype)
    copy = given.copy()
    values, rows = _host_lapack.eigh(given)
    assert values.dtype == rows.dtype == dtype
    np.testing.assert_array_equal(given, copy)
    scale = np.abs(np.linalg.eigvalsh(m)).max()
    np.testing.assert_allclose(values, np.linalg.eigvalsh(m), atol=tol * scale)
    assert np.all(np.diff(values) >= 0)
    v = rows.T.astype(np.float64)
    np.testing.assert_allclose(v.T @ v, np.eye(n), atol=tol)
    np.testing.assert_allclose(v * values @ v.T, m, atol=tol * scale)


def test_eigh_of_a_matrix_with_a_nan_is_nan():
    m = spd(40, seed=3)
    m[3, 5] = m[5, 3] = np.nan
    values, _ = _host_lapack.eigh(m)
    assert np.isnan(values).any()


def _ticks_during(call) -> int:
    """How many times another Python thread ticked (every 0.5 ms) while ``call()`` ran."""
    ticks, done = [], threading.Event()

    def tick():
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.0005)

    ticker = threading.Thread(target=tick)
    ticker.start()
    try:
        time.sleep(0.002)
        start = time.perf_counter()
        call()
        end = time.perf_counter()
    finally:
        done.set()
        ticker.join()
    return sum(start < t < end for t in ticks)


def test_host_lapack_routines_let_go_of_pythons_lock():
    """The host's routines are SciPy's LAPACK called through ``ctypes``, which lets go of
    Python's lock: another Python thread runs while one factorises (``potrf``) or
    eigendecomposes (``syevd``), and the results are right."""
    m = spd(1500, seed=11)
    potrf = _host_lapack._triangular("potrf", m.dtype)
    a, n, info = np.array(m), ctypes.c_int(len(m)), ctypes.c_int(0)

    def by_ctypes():
        potrf(b"L", ctypes.byref(n), a.ctypes.data, ctypes.byref(n), ctypes.byref(info))

    assert _ticks_during(by_ctypes) >= 2
    assert info.value == 0
    np.testing.assert_allclose(np.tril(a.T), np.linalg.cholesky(m), atol=1e-10)
    pair = []
    assert _ticks_during(lambda: pair.extend(_host_lapack.eigh(m[:800, :800]))) >= 2
    np.testing.assert_allclose(pair[0], np.linalg.eigvalsh(m[:800, :800]), rtol=1e-10)


@pytest.mark.parametrize("n", [1, 7, 70])
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_eigvalsh_is_the_spectrum_of_the_upper_triangle(n, dtype, tol):
    """Eigenvalues alone (``syevd`` without eigenvectors): NumPy's float64 ones, ascending,
    the input left as it was."""
    m = np.random.default_rng(n + 1).standard_normal((n, n))
    m = m + m.T
    given = with_garbage_below(m).astype(dtype)
    copy = given.copy()
    values = _host_lapack.eigvalsh(given)
    assert values.dtype == dtype
    np.testing.assert_array_equal(given, copy)
    scale = np.abs(np.linalg.eigvalsh(m)).max()
    np.testing.assert_allclose(values, np.linalg.eigvalsh(m), atol=tol * scale)
