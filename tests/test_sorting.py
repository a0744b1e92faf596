"""Long sorts through NumPy on a CPU (:mod:`jaxgeom._sorting`), against ``np.sort``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgeom
from jaxgeom import _sorting
from jaxgeom._sorting import SORT_ON_HOST_MIN, sort

ON_CPU = jax.default_backend() == "cpu"


def _host_calls(fn, *args) -> int:
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("pure_callback")


@pytest.mark.parametrize("n", [5, SORT_ON_HOST_MIN - 1, SORT_ON_HOST_MIN, 3 * SORT_ON_HOST_MIN])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_sort_is_numpys_ascending_sort_nan_last(n, dtype):
    """The values of ``np.sort`` (infinities in place, NaN last); through the host from
    ``SORT_ON_HOST_MIN`` elements on, in the program below."""
    x = np.random.default_rng(n).standard_normal(n)
    x[:3] = [np.inf, np.nan, -np.inf]
    x = jnp.asarray(x, dtype)
    got = jax.jit(sort)(x)
    assert got.dtype == x.dtype
    np.testing.assert_array_equal(got, np.sort(np.asarray(x)))
    assert _host_calls(sort, x) == (1 if ON_CPU and n >= SORT_ON_HOST_MIN else 0)


def test_sort_stays_in_the_program_where_host_calls_are_not_made():
    """Inside ``no_host_callbacks`` (``jax.export``) and for dtypes NumPy does not sort as
    XLA (integers, half precision): ``jnp.sort``."""
    x = jnp.asarray(np.random.default_rng(1).standard_normal(SORT_ON_HOST_MIN))
    with jaxgeom.no_host_callbacks():
        assert _host_calls(sort, x) == 0
        np.testing.assert_array_equal(jax.jit(lambda x: sort(x))(x), np.sort(np.asarray(x)))
    for other in (x.astype(jnp.float16), (x * 100).astype(jnp.int32)):
        assert _host_calls(sort, other) == 0
        np.testing.assert_array_equal(sort(other), np.sort(np.asarray(other)))


def test_sort_differentiates_as_jnp_sort():
    """Forward and reverse derivatives: the tangent permuted as the values."""
    n = SORT_ON_HOST_MIN + 5
    x = jnp.asarray(np.random.default_rng(2).standard_normal(n))
    dx = jnp.asarray(np.random.default_rng(3).standard_normal(n))
    weights = jnp.linspace(-1.0, 2.0, n)
    np.testing.assert_array_equal(jax.jvp(sort, (x,), (dx,))[1],
                                  jax.jvp(jnp.sort, (x,), (dx,))[1])
    np.testing.assert_array_equal(jax.grad(lambda x: weights @ sort(x))(x),
                                  jax.grad(lambda x: weights @ jnp.sort(x))(x))


def test_a_vmapped_sort_sorts_each_row():
    rows = jnp.asarray(np.random.default_rng(4).standard_normal((3, SORT_ON_HOST_MIN)))
    np.testing.assert_array_equal(jax.jit(jax.vmap(sort))(rows), np.sort(np.asarray(rows), -1))


def test_a_stack_of_short_rows_is_sorted_row_by_row_through_the_host():
    """``SORT_ON_HOST_MIN`` elements in all, in rows shorter than that: each row sorted
    (the last axis), in one host call."""
    rows = jnp.asarray(np.random.default_rng(5).standard_normal((16, SORT_ON_HOST_MIN // 16)))
    np.testing.assert_array_equal(jax.jit(sort)(rows), np.sort(np.asarray(rows), -1))
    assert _host_calls(sort, rows) == (1 if ON_CPU else 0)


def test_eigvalsh_of_a_kfac_through_the_host_sort(monkeypatch):
    """A representation's ``eigvalsh`` with every sort handed to NumPy: the dense matrix's
    eigenvalues, ascending."""
    from models import make_linen_mlp

    monkeypatch.setattr(_sorting, "SORT_ON_HOST_MIN", 1)
    t = make_linen_mlp()
    F = jaxgeom.FIM(t.apply_fn, t.params, t.x, jaxgeom.PMatKFAC)
    got = jax.jit(lambda F: F.eigvalsh())(F)
    np.testing.assert_allclose(got, np.linalg.eigvalsh(np.asarray(F.to_dense())), atol=1e-10)
    if ON_CPU:
        assert _host_calls(lambda F: F.eigvalsh(), F) >= 1
