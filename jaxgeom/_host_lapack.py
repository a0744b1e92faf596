"""LAPACK routines called on the host, through ``ctypes``: what a program hands to a host
callback to run side by side on a CPU's cores (:func:`jaxgeom._lapack.host_side_by_side`).

XLA:CPU runs a program's host callbacks one at a time, and runs the factorisations it
compiles itself (``eigh``, ``cholesky``) one after the other when LAPACK is held to one
thread (two ``eigh`` of 1000² in one program: 124 ms against 67 for one, 2-core AMD EPYC
VM): one callback that takes all of an operation's matrices and deals them into one chain
per core, each chain in a thread of its own, is what runs them at once. The routines are
SciPy's (``scipy.linalg.cython_lapack``, the LAPACK jaxlib's own CPU kernels call),
called through ``ctypes`` with pointers read from SciPy's capsules (as numba and jaxlib
read them): ``ctypes`` lets go of Python's lock while LAPACK runs, SciPy's own wrappers
keep it (bench_mlp's five factors of order 512–785, ``potrf`` and ``potri`` in two chains:
23.7 ms through SciPy's wrappers, 22.7 in one chain; 14.6 ms through ``ctypes``).

Arrays are row-major and LAPACK reads column-major: LAPACK sees ``mᵀ``, which is ``m`` for
a symmetric ``m``, and its column-major lower triangle (``uplo = "L"``) is ``m``'s row-major
upper one; what it writes column-major reads transposed here.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._host_calls import host_calls_allowed

#: the dtypes the host routines take, and LAPACK's letter for each
_PREFIX = {jnp.dtype(jnp.float32): "s", jnp.dtype(jnp.float64): "d"}

_INT_P = ctypes.POINTER(ctypes.c_int)


def may_run(dtype: Any) -> bool:
    """Whether a factorisation of a ``dtype`` matrix traced here may run on the host: a
    float32/float64 matrix, JAX's default backend a CPU, and host callbacks allowed
    (:func:`jaxgeom._host_calls.host_calls_allowed`)."""
    return (jnp.dtype(dtype) in _PREFIX and jax.default_backend() == "cpu"
            and host_calls_allowed())


@functools.cache
def routine(name: str, *argtypes: Any) -> Callable[..., None]:
    """SciPy's LAPACK routine ``name`` (``"spotrf"``, ``"dsyevd"``, …) as a ``ctypes``
    function of ``argtypes`` (Fortran's: every argument by reference), which lets go of
    Python's lock while it runs."""
    from scipy.linalg import cython_lapack

    capsule_name = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(
        ("PyCapsule_GetName", ctypes.pythonapi))
    capsule_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    capsule = cython_lapack.__pyx_capi__[name]
    return ctypes.CFUNCTYPE(None, *argtypes)(capsule_pointer(capsule, capsule_name(capsule)))


def _triangular(name: str, dtype: np.dtype) -> Callable[..., None]:
    """``potrf``/``potri`` of ``dtype``: ``(uplo, n, a, lda, info)``."""
    return routine(_PREFIX[jnp.dtype(dtype)] + name, ctypes.c_char_p, _INT_P,
                   ctypes.c_void_p, _INT_P, _INT_P)


def spd_inverse(m: np.ndarray) -> np.ndarray:
    """``m⁻¹`` of a symmetric positive-definite ``(n, n)`` ``m``, read from its upper
    triangle: a copy factorised by ``potrf`` and inverted in place by ``potri`` (``n³/2``
    multiply-adds), its triangle mirrored in place (:func:`mirror_upper`). All NaN where
    ``m`` is not positive definite (or holds a NaN)."""
    a = np.array(m, order="C")
    n, info = ctypes.c_int(a.shape[0]), ctypes.c_int(0)
    _triangular("potrf", a.dtype)(b"L", ctypes.byref(n), a.ctypes.data, ctypes.byref(n),
                                  ctypes.byref(info))
    if info.value != 0:  # not positive definite (info > 0) or a NaN entry
        return np.full(m.shape, np.nan, m.dtype)
    _triangular("potri", a.dtype)(b"L", ctypes.byref(n), a.ctypes.data, ctypes.byref(n),
                                  ctypes.byref(info))
    return mirror_upper(a)


def eigh(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(λ, Vᵀ)`` of a symmetric ``(n, n)`` ``m``, read from its upper triangle: LAPACK's
    ``syevd`` (divide and conquer, as ``jnp.linalg.eigh`` on a CPU) on a copy, eigenvalues
    ascending; the eigenvectors come back in the *rows* (LAPACK writes them in its
    columns), so that no transposed copy is made here (XLA folds ``.T`` into the products
    that read them). Workspace ``2n² + 6n + 1`` floats and ``5n + 3`` integers,
    ``syevd``'s least with eigenvectors. All NaN where LAPACK fails to converge."""
    return _syevd_of_copy(m, vectors=True)


def eigvalsh(m: np.ndarray) -> np.ndarray:
    """The eigenvalues of a symmetric ``(n, n)`` ``m``, read from its upper triangle,
    ascending: ``syevd`` without eigenvectors (the tridiagonal reduction and its QR
    iteration) on a copy. Workspace ``2n + 1`` floats. All NaN where LAPACK fails to
    converge."""
    return _syevd_of_copy(m, vectors=False)[0]


def _syevd_of_copy(m: np.ndarray, vectors: bool) -> tuple[np.ndarray, np.ndarray]:
    """``syevd`` on a copy of ``m`` with its least workspace: the eigenvalues and the copy
    (the eigenvectors in its rows when ``vectors``), all NaN where it fails."""
    a = np.array(m, order="C")
    order = a.shape[0]
    values = np.empty(order, a.dtype)
    if vectors:
        work, iwork = np.empty(1 + 6 * order + 2 * order * order, a.dtype), np.empty(
            3 + 5 * order, np.intc)
    else:
        work, iwork = np.empty(2 * order + 1, a.dtype), np.empty(1, np.intc)
    n, info = ctypes.c_int(order), ctypes.c_int(0)
    lwork, liwork = ctypes.c_int(work.size), ctypes.c_int(iwork.size)
    _syevd(a.dtype)(b"V" if vectors else b"N", b"L", ctypes.byref(n), a.ctypes.data,
                    ctypes.byref(n), values.ctypes.data, work.ctypes.data,
                    ctypes.byref(lwork), iwork.ctypes.data, ctypes.byref(liwork),
                    ctypes.byref(info))
    if info.value != 0:
        values[:], a[...] = np.nan, np.nan
    return values, a


def _syevd(dtype: np.dtype) -> Callable[..., None]:
    """``syevd`` of ``dtype``: ``(jobz, uplo, n, a, lda, w, work, lwork, iwork, liwork,
    info)``."""
    return routine(_PREFIX[jnp.dtype(dtype)] + "syevd", ctypes.c_char_p, ctypes.c_char_p,
                   _INT_P, ctypes.c_void_p, _INT_P, ctypes.c_void_p, ctypes.c_void_p,
                   _INT_P, ctypes.c_void_p, _INT_P, _INT_P)


#: the panel width of :func:`mirror_upper`: 64 rows of 4-byte entries are 4 cache lines
MIRROR_PANEL = 64


def mirror_upper(u: np.ndarray, panel: int = MIRROR_PANEL) -> np.ndarray:
    """``u`` (square, row-major) with its strict lower triangle overwritten by its upper
    one's transpose, in place; returns ``u``.

    Panel by panel: the rows ``j:j+panel`` left of the diagonal block read from the
    columns ``j:j+panel`` above it, whose lines stay in cache while the panel is written
    (numpy's whole-matrix ``tril(u) + tril(u, -1).T`` strides over all of ``u`` per
    entry written: 3.6 → 0.75 ms at 785², 30 → 5.7 ms at 2049², 142 → 27 ms at 4097²,
    float32, 2-core AMD EPYC VM), then each diagonal block."""
    n = u.shape[0]
    for j in range(0, n, panel):
        block = u[j:j + panel, j:j + panel]
        block[...] = np.triu(block) + np.triu(block, 1).T
        if j:
            u[j:j + panel, :j] = u[:j, j:j + panel].T
    return u
