"""Operations called eagerly run as one compiled call (``jaxgeom._dispatch``): the same
numbers as the methods as written, no recompilation for new values, and the methods as
written inside a trace."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from pmat_checks import TOL, compilations, flat, vec

from jaxgeom import (
    FIM,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatImplicit,
    PMatKFAC,
    PMatMixed,
    PMatQuasiDiag,
    PVector,
    vector,
)
from jaxgeom._dispatch import _compiled_call, _compiled_factorisation, compiled_when_eager


@functools.cache
def _task():
    """A model of its own (5 → 9 → 3: no other test compiles for its layout)."""
    model = nn.Sequential([nn.Dense(9), nn.tanh, nn.Dense(3)])
    x = jax.random.normal(jax.random.key(0), (6, 5), jnp.float64)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64),
                                    model.init(jax.random.key(1), x)["params"])
    return (lambda p, x: model.apply({"params": p}, x)), params, x


def _fisher(representation):
    apply_fn, params, x = _task()
    return FIM(apply_fn, params, x, representation, variant="classif_logits"), params


def _cache_size():
    return (_compiled_call._cache_size() + _compiled_factorisation._cache_size()
            + vector._flat_norm._cache_size())


def _compilations(call):
    """The compilations of :func:`_compiled_call`, both ways (and of ``PVector.norm``'s), that
    ``call()`` adds, and its result."""
    before = _cache_size()
    out = jax.block_until_ready(call())
    return _cache_size() - before, out


OPERATIONS = {
    "mv": lambda M, v: M.mv(v),
    "vTMv": lambda M, v: M.vTMv(v),
    "solve": lambda M, v: M.solve(v, 0.1),
    "trace": lambda M, v: M.trace(),
    "frobenius_norm": lambda M, v: M.frobenius_norm(),
    "get_diag": lambda M, v: M.get_diag(),
    "to_dense": lambda M, v: M.to_dense(),
    "norm(2)": lambda M, v: M.norm(2),
}


@pytest.mark.parametrize("representation", [PMatDense, PMatDiag, PMatKFAC, PMatQuasiDiag])
def test_eager_operations_compile_once_and_match_the_methods_as_written(representation):
    """Each operation, called eagerly, is one compiled call (a second call with a new
    vector compiles nothing) whose numbers are those of its array operations dispatched
    one by one."""
    M, params = _fisher(representation)
    v, w = vec(params, seed=1), vec(params, seed=2)
    for name, op in OPERATIONS.items():
        first, compiled = _compilations(lambda op=op: op(M, v))
        again, compiled_w = _compilations(lambda op=op: op(M, w))
        assert (first, again) == (1, 0), name
        np.testing.assert_allclose(flat(compiled_w), flat(_as_written(M, op, w)),
                                   rtol=1e-10, atol=1e-12, err_msg=name)
    np.testing.assert_allclose(flat(M.mv(v)), np.asarray(M.to_dense()) @ flat(v), **TOL)


def _as_written(M, op, v):
    """``op(M, v)`` with every operation run as written (no compiled call)."""
    from jaxgeom.pmat.base import PMatAbstract

    original = PMatAbstract._compiles_eager_calls
    PMatAbstract._compiles_eager_calls = lambda self: False
    try:
        before = _cache_size()
        out = op(M, v)
        assert _cache_size() == before
        return out
    finally:
        PMatAbstract._compiles_eager_calls = original


INVERSES = {  # representation-valued operations compiled when eager (new arrays: no identity)
    "PMatKFAC pi": (PMatKFAC, dict(damping="pi")),
    "PMatKFAC pi_one": (PMatKFAC, dict(damping="pi_one")),
    "PMatQuasiDiag": (PMatQuasiDiag, {}),
}


@pytest.mark.parametrize("case", list(INVERSES))
def test_eager_inverses_compile_once_and_match_as_written(case):
    """KFAC's π-damped ``inv`` and QuasiDiag's ``inv`` called eagerly are one compiled
    call each: a new damping value compiles nothing, the matrix is the one computed
    operation by operation, and it applies the solve's inverse (their numbers against
    brute force: ``tests/test_pmat_kfac.py``, ``tests/test_pmat_quasidiag.py``)."""
    representation, options = INVERSES[case]
    M, params = _fisher(representation)
    first, _ = _compilations(lambda: M.inv(0.1, **options))
    again, inverse = _compilations(lambda: M.inv(0.2, **options))
    assert (first, again) == (1, 0)
    assert type(inverse) is representation
    written = _as_written(M, lambda M, regul: M.inv(regul, **options), 0.2)
    np.testing.assert_allclose(inverse.to_dense(), written.to_dense(), rtol=1e-10, atol=1e-12)
    v = vec(params)
    np.testing.assert_allclose(flat(inverse.mv(v)), flat(M.solve(v, 0.2, **options)),
                               rtol=1e-9)


def test_new_python_float_values_are_traced_not_recompiled():
    """A damping schedule of Python floats compiles the solve once; each value gives
    ``(M + λI)⁻¹ v``. Ints are static: a new one compiles (they pick code paths)."""
    M, params = _fisher(PMatDense)
    v = vec(params)
    dense = np.asarray(M.to_dense())
    M.solve(v, 0.5)
    for regul in (0.1, 0.01, 2.0):
        again, x = _compilations(lambda regul=regul: M.solve(v, regul))
        assert again == 0
        np.testing.assert_allclose(flat(x), np.linalg.solve(dense + regul * np.eye(len(dense)),
                                                            flat(v)), rtol=1e-9)
    assert _compilations(lambda: M.solve(v, 3))[0] == 1
    assert _compilations(lambda: M.solve(v, 4))[0] == 1


def test_inside_a_trace_the_method_runs_as_written():
    """Under ``jit``, ``grad`` and ``vmap`` no nested compiled call is made (the trace
    around compiles the method), and the numbers are the matrix's."""
    M, params = _fisher(PMatKFAC)
    v = vec(params)
    dense = np.asarray(M.to_dense())
    jaxpr = str(jax.make_jaxpr(lambda M, v: M.mv(v).tree)(M, v))
    assert "_compiled_call" not in jaxpr
    # the check can fail: with M and v concrete (closed over), the call is compiled
    assert "_compiled_call" in str(jax.make_jaxpr(lambda: M.mv(v).tree)())
    np.testing.assert_allclose(flat(jax.jit(lambda M, v: M.mv(v))(M, v)), dense @ flat(v),
                               **TOL)
    grad = jax.grad(lambda x: M.vTMv(x))(flat(v))
    np.testing.assert_allclose(grad, 2 * dense @ flat(v), **TOL)
    rows = np.stack([flat(v), 2 * flat(v)])
    np.testing.assert_allclose(jax.vmap(M.mv)(rows), rows @ dense.T, **TOL)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Box:
    x: jax.Array

    @compiled_when_eager
    def times(self, factor, note=None):
        return self.x * factor


class _Unhashable:
    __hash__ = None


def test_which_arguments_are_traced_static_or_keep_the_call_eager():
    """Arrays and floats are traced (new values: no compilation), ints are static (a new
    one compiles); an unhashable or callable argument (a function, a class, a partial)
    makes the call eager. The numbers are the same every way."""
    box = _Box(jnp.arange(3.0))
    calls = [
        (lambda: box.times(2.5), 1),
        (lambda: box.times(3.5), 0),
        (lambda: box.times(np.float64(4.0)), 1),  # a strong dtype: another signature
        (lambda: _Box(jnp.ones(3)).times(np.float64(5.0)), 0),
        (lambda: box.times(2), 1),
        (lambda: box.times(2), 0),
        (lambda: box.times(2.5, note="label"), 1),
        (lambda: box.times(2.5, note=_Unhashable()), 0),
        (lambda: box.times(2.5, note=lambda: None), 0),
        (lambda: box.times(2.5, note=int), 0),  # a class: callable
        (lambda: box.times(2.5, note=functools.partial(max, 0)), 0),
        (lambda: box.times(2.5, note=np.int64(7)), 1),  # NumPy ints, bools, strings: static
        (lambda: box.times(2.5, note=np.int64(7)), 0),
        (lambda: box.times(2.5, note=np.str_("diag")), 1),
    ]
    for i, (call, expected) in enumerate(calls):
        count, out = _compilations(call)
        assert count == expected, i
    np.testing.assert_allclose(box.times(2.5, note=_Unhashable()), [0.0, 2.5, 5.0])
    np.testing.assert_allclose(box.times(3), [0.0, 3.0, 6.0])
    assert _Box.times.eager_method(box, 2.0).tolist() == [0.0, 2.0, 4.0]


def test_callable_preconditioner_and_implicit_matrices_stay_eager():
    """A ``cg`` preconditioner given as a function, and ``PMatImplicit`` (whose chunk loop
    calls compiled steps of its own), run as written, with the right numbers."""

    class Jacobi:
        __hash__ = None

        def __init__(self, diag):
            self.diag = diag

        def __call__(self, r):
            return r / self.diag

    M, params = _fisher(PMatDense)
    v = vec(params)
    dense = np.asarray(M.to_dense())
    expected = np.linalg.solve(dense + 0.1 * np.eye(len(dense)), flat(v))
    diag = M.get_diag() + 0.1
    for preconditioner in (Jacobi(diag), lambda r: r / diag):
        count, x = _compilations(lambda p=preconditioner: M.solve(
            v, 0.1, method="cg", maxiter=200, rtol=1e-12, preconditioner=p))
        assert count == 0
        np.testing.assert_allclose(flat(x), expected, rtol=1e-8)
    implicit, _ = _fisher(PMatImplicit)
    count, y = _compilations(lambda: implicit.mv(v))
    assert count == 0
    np.testing.assert_allclose(flat(y), dense @ flat(v), **TOL)


def test_pvector_arithmetic_compiles_once_with_the_flat_numbers():
    """``+``, ``-``, scalar ``*``, ``dot``, ``to_flat`` and the norms of ``PVector``s,
    against the flat vectors; new values and new float scalars compile nothing."""
    _, params, _ = _task()
    a, b = vec(params, seed=3), vec(params, seed=4)
    fa, fb = flat(a), flat(b)
    checks = [
        (lambda a, b: (a + b).to_flat(), fa + fb),
        (lambda a, b: (a - b).to_flat(), fa - fb),
        (lambda a, b: (0.3 * a).to_flat(), 0.3 * fa),
        (lambda a, b: a.dot(b), fa @ fb),
        (lambda a, b: a.norm(), np.linalg.norm(fa)),
        (lambda a, b: a.norm(1), np.abs(fa).sum()),
        (lambda a, b: a.norm(np.inf), np.abs(fa).max()),
    ]
    for op, expected in checks:
        np.testing.assert_allclose(op(a, b), expected, rtol=1e-12)
    for op, _ in checks:
        count, _ = _compilations(lambda op=op: op(b, a))
        assert count == 0
    count, scaled = _compilations(lambda: (0.7 * a).to_flat())
    assert count == 0
    np.testing.assert_allclose(scaled, 0.7 * fa, rtol=1e-12)
    assert isinstance(a + b, PVector)
    assert jnp.ndim(a.dot(b)) == 0


def test_options_given_as_floats_or_numpy_scalars_work_eagerly_as_under_jit():
    """A norm's order as a float, a NumPy integer ``maxiter``, a NumPy string reduction:
    options that pick code paths, which had been traced (a ``TracerBoolConversionError``,
    a ``ConcretizationTypeError``) when called eagerly."""
    M, params = _fisher(PMatDense)
    dense = np.asarray(M.to_dense())
    eigenvalues = np.abs(np.linalg.eigvalsh(dense))
    for order, expected in ((2.0, eigenvalues.max()), (np.int64(2), eigenvalues.max()),
                            (jnp.asarray(2), eigenvalues.max()), ("fro", np.linalg.norm(dense))):
        np.testing.assert_allclose(M.norm(order), expected, rtol=1e-9)
    np.testing.assert_allclose(PMatDiag(M.layer_collection, jnp.diag(M.data)).norm(-2.0),
                               np.abs(np.diag(dense)).min(), rtol=1e-12)
    with pytest.raises(ValueError, match="unknown norm ord"):
        M.norm(3.0)
    v = vec(params)
    np.testing.assert_allclose(
        flat(M.solve(v, 0.1, method="cg", maxiter=np.int64(500), rtol=1e-12)),
        np.linalg.solve(dense + 0.1 * np.eye(len(dense)), flat(v)), rtol=1e-8)
    rows = np.stack([flat(v), 2 * flat(v)])[:, None, :]  # (K=2, N=1, d)
    np.testing.assert_allclose(M.mapTMmap(rows, reduction=np.str_("diag")),
                               np.einsum("knd,de,kne->kn", rows, dense, rows), rtol=1e-10)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatMixed])
def test_eager_inv_of_the_factorising_representations_compiles_once(representation):
    """``inv`` (not a compiled operation: its arrays keep their identity) had compiled the
    Cholesky-or-LU ``cond`` afresh at every eager call, 0.3-3 s each."""
    M, params = _fisher(representation)
    M.inv(0.1)
    with compilations() as compiled:
        inverse = M.inv(0.2)
    assert compiled == []
    dense = np.asarray(M.to_dense())
    np.testing.assert_allclose(inverse.to_dense(), np.linalg.inv(dense + 0.2 * np.eye(len(dense))),
                               rtol=1e-8, atol=1e-10)
