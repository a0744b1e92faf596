"""Properties every parameter-space representation must satisfy against its own dense matrix.

Each ``check_*`` takes a representation ``M``, the float64 matrix ``dense`` it must equal,
and (where vectors are needed) the ``params`` pytree; shared by the ``test_pmat_*`` files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import memoized, reference_fisher

from jaxgeom import PMatDense, PVector
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.diag import PMatDiag
from jaxgeom.pmat.eye import PMatEye

TOL = dict(rtol=1e-8, atol=1e-10)
REGUL = 1e-3
PINV_RTOL = 1e-6


_reference_jit = jax.jit(reference_fisher.__wrapped__, static_argnums=0)


@memoized
def _reference(apply_fn, params, x):
    out = np.asarray(_reference_jit(apply_fn, params, x))
    out.setflags(write=False)  # shared between tests
    return out


def reference(task) -> np.ndarray:
    """The brute-force float64 Fisher of a task (``reference_fisher``, compiled and computed
    once per task; read-only)."""
    return _reference(task.apply_fn, task.params, task.x)


def block_mask(layer_collection) -> np.ndarray:
    """The ``(d, d)`` boolean mask of the layer blocks (layers' indices may interleave)."""
    d = layer_collection.numel()
    mask = np.zeros((d, d), dtype=bool)
    for layer in layer_collection.layers:
        idx = layer_collection.layer_indices(layer)
        mask[np.ix_(idx, idx)] = True
    return mask


def factor_damped_dense(K, dense, lam, damping, p=-1.0):
    """The float64 brute force of a factor-damped ``(M + λI)^p``: per Kronecker layer the
    power of the dense Kronecker product ``(A + π√λ I) ⊗ (G + √λ/π I)`` (π of Martens &
    Grosse for ``"pi"``, 1 for ``"pi_one"``), the other layers' ``(B + λI)^p``."""
    def power(m):
        e, q = np.linalg.eigh(m)
        return (q * e**p) @ q.T

    expected = np.zeros_like(dense)
    lc = K.layer_collection
    for layer in lc.layers:
        idx = lc.layer_indices(layer)
        if layer.id in {s.layer_id for s in K.specs}:
            A, G = (np.asarray(f) for f in K.kronecker_factors(layer))
            A = np.diag(A) if A.ndim == 1 else A
            pi = (np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
                  if damping == "pi" else 1.0)
            damped = np.kron(G + np.sqrt(lam) / pi * np.eye(len(G)),
                             A + pi * np.sqrt(lam) * np.eye(len(A)))
            order = np.argsort(K._parts.kron_flat[K._index(layer)])
            block = power(damped)[np.ix_(order, order)]
        else:
            block = power(dense[np.ix_(idx, idx)] + lam * np.eye(len(idx)))
        expected[np.ix_(idx, idx)] = block
    return expected


def vec(params, seed=0) -> PVector:
    """A standard normal params-shaped vector (numpy leaves: no compilation)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    rng = np.random.default_rng(seed)
    return PVector(treedef.unflatten([rng.standard_normal(np.shape(x)) for x in leaves]))


def flat(v) -> np.ndarray:
    """The flat numpy form of a PVector or params-shaped pytree."""
    tree = v.tree if isinstance(v, PVector) else v
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def rows(d, seed=1, shape=(2, 3)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape + (d,))


def _products(M, v, r):
    """Products, maps and scalars of ``M``, in one compiled call."""
    fv = jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(v.tree)])
    return dict(
        mv=M.mv(v), mv_tree=M.mv(v.tree), mv_flat=M.mv(fv), matmul=M @ v,
        vTMv=M.vTMv(v), vTMv_tree=M.vTMv(v.tree), v_dot_mv=fv @ M.mv(fv),
        mmap=M.mmap(r), forms=M.mapTMmap(r, reduction="diag"), forms_sum=M.mapTMmap(r),
        subspace=M.quadratic_forms(r[0]),
        diag=M.get_diag(), trace=M.trace(), fro=M.frobenius_norm(), norm=M.norm(),
        norm_fro=M.norm("fro"),
    )


def _functions(M):
    """Spectra, matrix functions and scalar algebra of ``M``, in one compiled call:
    ``M`` goes in as a jit argument and representations come out (they are pytrees)."""
    reps = {
        "inv": M.inv(REGUL), "pinv": M.pinv(rtol=PINV_RTOL), "pinv_default": M.pinv(),
        "square": M**2, "square_mm": M.mm(M),
        "half": M.pow(0.5), "pow_inv": M.pow(-1, REGUL), "left_scaled": 1.23 * M,
        "right_scaled": M * 1.23, "divided": M / 2, "negated": -M,
    }
    return dict(
        reps=reps,
        dense={k: x.to_dense() for k, x in reps.items()},
        half_squared=reps["half"].mm(reps["half"]).to_dense(),
        to_dense=M.to_dense(),
        norm2=M.norm(2), norm_2=M.norm(-2), eigvalsh=M.eigvalsh(),
        slogdet=M.slogdet(REGUL), logdet=M.logdet(REGUL),
    )


_products_jit = jax.jit(_products)
_functions_jit = jax.jit(_functions)


def check_products(M, dense, params):
    """Products (every vector form; the output has the input's form), maps, the diagonal,
    the trace and the Frobenius norm of ``M`` against ``dense`` — what every
    representation, matrix-free ones included, must answer."""
    d = len(dense)
    v = vec(params)
    fv = flat(v)
    r = rows(d)
    out = _products_jit(M, v, r)
    assert M.size() == (d, d) and M.size(0) == d and M.size(1) == d
    assert isinstance(out["mv"], PVector) and out["mv_flat"].shape == fv.shape
    assert jax.tree_util.tree_structure(out["mv_tree"]) == jax.tree_util.tree_structure(params)
    for key in ("mv", "matmul", "mv_tree"):
        np.testing.assert_allclose(flat(out[key]), dense @ fv, **TOL)
    np.testing.assert_allclose(out["mv_flat"], dense @ fv, **TOL)
    np.testing.assert_allclose(out["vTMv"], out["v_dot_mv"], **TOL)
    np.testing.assert_allclose(out["vTMv_tree"], fv @ dense @ fv, **TOL)
    np.testing.assert_allclose(out["mmap"], r @ dense.T, **TOL)
    forms = np.einsum("knd,ed,kne->kn", r, dense, r)
    np.testing.assert_allclose(out["forms"], forms, **TOL)
    np.testing.assert_allclose(out["forms_sum"], forms.sum(0), **TOL)
    np.testing.assert_allclose(out["subspace"], r[0] @ dense @ r[0].T, **TOL)
    np.testing.assert_allclose(out["diag"], np.diag(dense), **TOL)
    np.testing.assert_allclose(out["trace"], np.trace(dense), **TOL)
    np.testing.assert_allclose(out["trace"], np.sum(out["diag"]), **TOL)
    for key in ("fro", "norm", "norm_fro"):
        np.testing.assert_allclose(out[key], np.linalg.norm(dense), **TOL)
    with pytest.raises(ValueError, match="ord"):
        M.norm(3)


def check_all(M, dense, params):
    """:func:`check_products`, then spectra, ``inv``, ``pinv``, ``pow`` and scalar algebra
    of ``M`` against ``dense`` (PSD)."""
    check_products(M, dense, params)
    d = len(dense)
    fv = flat(vec(params))
    out = _functions_jit(M)
    np.testing.assert_allclose(out["to_dense"], dense, **TOL)
    eig = np.linalg.eigvalsh(dense)
    np.testing.assert_allclose(out["norm2"], np.abs(eig).max(), **TOL)
    np.testing.assert_allclose(out["norm_2"], np.abs(eig).min(), atol=1e-10)
    np.testing.assert_allclose(out["eigvalsh"], eig, atol=1e-10)
    sign, logabsdet = np.linalg.slogdet(dense + REGUL * np.eye(d))
    np.testing.assert_allclose(out["slogdet"], (sign, logabsdet), **TOL)
    np.testing.assert_allclose(out["logdet"], logabsdet, **TOL)
    # functions and scalar algebra keep the representation
    assert all(type(x) is type(M) for x in out["reps"].values())
    got = out["dense"]
    shifted = dense + REGUL * np.eye(d)
    np.testing.assert_allclose(got["inv"] @ shifted @ fv, fv, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["inv"], np.linalg.inv(shifted), rtol=1e-6)
    np.testing.assert_allclose(got["pow_inv"], got["inv"], rtol=1e-6, atol=1e-8)
    # an explicit threshold far above round-off: the kept eigenvalues are well determined
    want = np.linalg.pinv(dense, rcond=PINV_RTOL, hermitian=True)
    np.testing.assert_allclose(got["pinv"], want, rtol=1e-6, atol=1e-8 * np.abs(want).max())
    scale = np.abs(dense).max()
    np.testing.assert_allclose(dense @ got["pinv_default"] @ dense, dense, atol=1e-8 * scale)
    np.testing.assert_allclose(got["square"], dense @ dense, **TOL)
    np.testing.assert_allclose(got["square_mm"], dense @ dense, **TOL)
    np.testing.assert_allclose(out["half_squared"], dense, atol=1e-8)
    for key, factor in [("left_scaled", 1.23), ("right_scaled", 1.23), ("divided", 0.5),
                        ("negated", -1)]:
        np.testing.assert_allclose(got[key], factor * dense, **TOL)


#: terms of the Neumann series checked against its brute-force polynomial
NEUMANN_TERMS = 6


def neumann_series(a, b, scale, num_terms):
    """``s Σ_{j<K} (I − s A)ʲ b`` for each row ``b`` (brute force, the terms
    ``(I − s A)ʲ b`` one after the other), NaN where the series diverges: its last term
    ``(I − s A)^{K−1} b`` longer than ``b`` (an indefinite ``A``, a scale above
    ``2/λ_max``)."""
    term = total = np.asarray(b, dtype=np.float64)
    for _ in range(num_terms - 1):
        term = term - scale * term @ a  # A symmetric: rows times A
        total = total + term
    grew = np.linalg.norm(term, axis=-1) > np.linalg.norm(b, axis=-1)
    return np.where(grew[..., None], np.nan, scale * total)


#: the iterative methods every representation inherits from the base class: checked on
#: the stack of rows only (their vector path is CG's, checked on both; fewer loops to
#: compile in every representation's test)
_INHERITED = ("minres", "neumann")


@functools.partial(jax.jit, static_argnames="methods")
def _solve(M, v, r, *, methods):
    out = {}
    for method in methods:
        options = ({"rtol": 1e-12} if method in ("cg", "minres") else
                   {"num_terms": NEUMANN_TERMS} if method == "neumann" else {})
        x = None if method in _INHERITED else M.solve(M.mv(v) + REGUL * v, REGUL,
                                                      method=method, **options)
        out[method] = (x, M.solve(r, REGUL, method=method, **options))
    return out


def check_solve(M, dense, params, methods=None):
    """For each solve method (default: all of ``M.SOLVE_METHODS``), in one compiled call:
    ``solve((M + λ)v, λ) ≈ v`` for a PVector, and row by row for a (2, 3, d) stack (the
    inherited MINRES and Neumann on the stack only); the Neumann series is its polynomial
    of ``M + λI`` with the default scale ``1/(‖M‖_F + λ)`` (NaN where it diverges)."""
    v = vec(params, 2)
    r = rows(len(dense), 3)
    shifted = dense + REGUL * np.eye(len(dense))
    methods = tuple(M.SOLVE_METHODS if methods is None else methods)
    for method, (x, solved) in _solve(M, v, r @ shifted.T, methods=methods).items():
        assert solved.shape == r.shape, method
        if method == "neumann":
            want = neumann_series(shifted, r @ shifted.T, 1 / (np.linalg.norm(dense) + REGUL),
                                  NEUMANN_TERMS)
            np.testing.assert_allclose(solved, want, rtol=1e-8, atol=1e-10)
            continue
        if x is not None:
            assert isinstance(x, PVector), method
            np.testing.assert_allclose(flat(x), flat(v), rtol=1e-6, atol=1e-7, err_msg=method)
        np.testing.assert_allclose(solved, r, rtol=1e-5, atol=1e-6, err_msg=method)


@jax.jit
def _combine(pairs):
    out = []
    for A, B in pairs:
        reps = {"sum": A + B, "difference": A - B, "mm": A.mm(B), "matmul": A @ B}
        out.append((reps, {k: x.to_dense() for k, x in reps.items()}))
    return out


def check_combinations(cases):
    """``A + B``, ``A − B``, ``A.mm(B)`` and ``A @ B`` for each case ``(A, B, a_dense,
    b_dense, (sum_type, product_type))``, in one compiled call: the promoted representations
    and the values."""
    results = _combine([(A, B) for A, B, *_ in cases])
    for (A, B, a, b, (sum_type, product_type)), (reps, got) in zip(cases, results):
        want = {"sum": a + b, "difference": a - b, "mm": a @ b, "matmul": a @ b}
        for key, value in reps.items():
            expected = sum_type if key in ("sum", "difference") else product_type
            assert type(value) is expected, (key, type(A), type(B), type(value))
            np.testing.assert_allclose(got[key], want[key], **TOL, err_msg=key)


#: the promotion order of ``+``, ``-`` and ``mm`` between representations
ORDER = (PMatEye, PMatDiag, PMatBlockDiag, PMatDense)


def check_promotions(M, dense, ref):
    """``M`` combined on both sides with one matrix of each representation of ``ORDER``
    (``0.7·I``, then the diagonal, the layer blocks and the whole of the PSD ``ref``): the
    result is in the higher representation of the two, with the right values."""
    lc = M.layer_collection
    blocks = np.where(block_mask(lc), ref, 0.0)
    others = [
        (PMatEye(lc, 0.7), 0.7 * np.eye(len(ref))),
        (PMatDiag(lc, np.diag(ref)), np.diag(np.diag(ref))),
        (PMatBlockDiag.from_pmat(PMatDense(lc, ref)), blocks),
        (PMatDense(lc, ref), ref),
    ]
    cases = []
    for other, other_dense in others:
        higher = ORDER[max(ORDER.index(type(M)), ORDER.index(type(other)))]
        cases.append((M, other, dense, other_dense, (higher, higher)))
        cases.append((other, M, other_dense, dense, (higher, higher)))
    check_combinations(cases)


def check_pytree(M):
    """``M`` flattens to its arrays and back (static layout in the treedef)."""
    leaves, treedef = jax.tree_util.tree_flatten(M)
    assert leaves and all(isinstance(x, jax.Array) for x in leaves)
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(back) is type(M) and back.layer_collection == M.layer_collection


@contextlib.contextmanager
def compilations():
    """Collect the names of the functions XLA compiles inside the ``with`` block."""
    names: list[str] = []

    class Handler(logging.Handler):
        def emit(self, record):
            found = re.match(r"Compiling jit\((.*?)\) with", record.getMessage())
            if found:
                names.append(found.group(1))

    handler = Handler(logging.DEBUG)
    logger = logging.getLogger("jax")
    logger.addHandler(handler)
    try:
        with jax.log_compiles(True):
            yield names
    finally:
        logger.removeHandler(handler)


def expected_eigsh(dense, k, which, eig=None):
    """The ``k`` eigenvalues ``eigsh(k, which)`` must answer, ascending (NumPy float64;
    ``eig``: ``dense``'s eigenvalues, ascending, when known)."""
    eig = np.linalg.eigvalsh(dense) if eig is None else eig
    if which == "LA":
        return eig[-k:]
    if which == "SA":
        return eig[:k]
    return np.sort(eig[np.argsort(-np.abs(eig), kind="stable")[:k]])


def check_eigenpairs(values, vectors, dense, k, which, atol=1e-10, spectrum=None):
    """``(λ, V)`` are ``k`` eigenpairs of ``dense`` as ``which`` names them: the eigenvalues
    of ``numpy.linalg.eigh`` (ascending), ``V`` orthonormal ``(d, k)`` with a small residual
    ``‖dense V − V diag(λ)‖``, and each vector of an eigenvalue apart from the rest of the
    spectrum ``±`` NumPy's (a repeated one is checked through the residual: any
    orthonormal basis of its eigenspace is right). ``spectrum``: ``numpy.linalg.eigh(dense)``
    when known (with ``None`` for the vectors: only the residuals check them)."""
    values, vectors = np.asarray(values), np.asarray(vectors)
    d = len(dense)
    scale = max(np.abs(dense).max(), 1e-300)
    assert values.shape == (k,) and vectors.shape == (d, k)
    eig, basis = np.linalg.eigh(dense) if spectrum is None else spectrum
    np.testing.assert_allclose(values, expected_eigsh(dense, k, which, eig), atol=atol * scale)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(k), atol=1e-10)
    residual = np.linalg.norm(dense @ vectors - vectors * values, axis=0)
    np.testing.assert_array_less(residual, atol * scale * 10)
    for j, lam in enumerate(values if basis is not None else ()):
        gaps = np.abs(eig - lam)
        nearest = np.argmin(gaps)
        if np.partition(gaps, 1)[1] > 1e-6 * scale:  # a simple, well-separated eigenvalue
            np.testing.assert_allclose(abs(basis[:, nearest] @ vectors[:, j]), 1, atol=1e-6)


def _sub_jaxprs(eqn):
    """The jaxprs in an equation's parameters (``pjit``, ``cond`` branches, ``scan``, …)."""
    from jax.extend.core import ClosedJaxpr, Jaxpr

    for value in eqn.params.values():
        for x in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(x, ClosedJaxpr):
                yield x.jaxpr
            elif isinstance(x, Jaxpr):
                yield x


def _values(jaxpr):
    """``(name, shape)`` of every value a jaxpr computes, nested jaxprs included."""
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            yield eqn.primitive.name, getattr(var.aval, "shape", ())
        for sub in _sub_jaxprs(eqn):
            yield from _values(sub)


def assert_never_dense(fn, d, *args):
    """``fn(*args)`` computes no value of ``d²`` or more entries (no ``d × d`` matrix, not
    even a transient one): every value of its jaxpr, nested ones included, and every
    constant it closes over."""
    closed = jax.make_jaxpr(fn)(*args)
    found = [(name, shape) for name, shape in _values(closed.jaxpr)
             if np.prod(shape, dtype=np.int64) >= d * d]
    found += [("constant", np.shape(c)) for c in closed.consts if np.size(c) >= d * d]
    assert not found, f"values of d² = {d}² entries or more: {found}"


@functools.partial(jax.jit, static_argnames="k")
def _eigsh_all(M, k):
    return {which: M.eigsh(k, which) for which in ("LA", "SA", "LM")}


@functools.partial(jax.jit, static_argnames="ks")
def _eigsh_every(M, ks):
    """Every ``which`` at each ``k < d``; at ``k = d`` (the whole spectrum, ascending, for
    any ``which``) ``"LA"`` alone."""
    d = M.size(0)
    return {(which, k): M.eigsh(k, which) for which in ("LA", "SA", "LM") for k in ks
            if k < d or which == "LA"}


def check_eigsh_without_dense(M, dense, ks):
    """``M.eigsh(k, which)`` for every ``which`` and each ``k`` of ``ks`` (one compiled
    call, :func:`_eigsh_every`) against ``numpy.linalg.eigh`` of ``dense``
    (:func:`check_eigenpairs`), and for the largest ``k < d`` (the same program at every
    ``k``) without a ``d × d`` value (:func:`assert_never_dense`)."""
    d = len(dense)
    spectrum = _spectrum(dense)
    for (which, k), (values, vectors) in _eigsh_every(M, tuple(ks)).items():
        check_eigenpairs(values, vectors, dense, k, which, spectrum=spectrum)
    below = [k for k in ks if k < d]
    for which in ("LA", "SA", "LM") if below else ():  # the program of the largest k
        assert_never_dense(lambda M, which=which: M.eigsh(max(below), which), d, M)


def _spectrum(dense):
    """``numpy.linalg.eigh(dense)``, or past order 1000 its eigenvalues alone and ``None``
    (the vectors are checked through their residuals, :func:`check_eigenpairs`)."""
    return np.linalg.eigh(dense) if len(dense) <= 1000 else (np.linalg.eigvalsh(dense), None)


def check_eigsh(M, dense, k=3, jitted=True):
    """``M.eigsh(k, which)`` for every ``which``, under ``jit`` and eager, against
    ``numpy.linalg.eigh`` of ``dense`` (:func:`check_eigenpairs`); ``jitted=False``: the
    eager call and the refusals only, where :func:`check_eigsh_without_dense` compiles
    every ``which`` already."""
    spectrum = _spectrum(dense)
    for which, (values, vectors) in _eigsh_all(M, k).items() if jitted else ():
        check_eigenpairs(values, vectors, dense, k, which, spectrum=spectrum)
    values, vectors = M.eigsh(k)  # eager: one compiled call
    check_eigenpairs(values, vectors, dense, k, "LA", spectrum=spectrum)
    with pytest.raises(ValueError, match="which"):
        M.eigsh(k, "BE")
    for bad in (0, len(dense) + 1, 2.0):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, d"):
            M.eigsh(bad)
