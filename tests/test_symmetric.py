"""Symmetric matrices handed to LAPACK as their transpose (``jaxgeom._symmetric``): the
Cholesky factor of the matrix itself, read from its upper triangle, and solves against
float64 references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxgeom
import jaxgeom._symmetric as symmetric_module
from jaxgeom._symmetric import cho_solve, cholesky, spd_inverse, spd_solve, symmetric_solve


def spd(n: int, seed: int = 0, batch: tuple[int, ...] = ()) -> np.ndarray:
    """A well-conditioned symmetric positive-definite ``(*batch, n, n)``."""
    r = np.random.default_rng(seed).standard_normal((*batch, n, 2 * n))
    return r @ np.swapaxes(r, -1, -2) / (2 * n) + 0.1 * np.eye(n)


@pytest.mark.parametrize("n", [1, 5, 40])
def test_cholesky_is_the_lower_factor_of_the_matrix(n):
    m = spd(n)
    factor = np.asarray(jax.jit(cholesky)(jnp.asarray(m)))
    np.testing.assert_allclose(factor, np.linalg.cholesky(m), rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(factor, np.tril(factor))
    np.testing.assert_allclose(factor @ factor.T, m, rtol=1e-12, atol=1e-12)


def test_cholesky_reads_the_upper_triangle_only():
    m = spd(6, seed=1)
    upper_only = np.triu(m) + np.tril(np.full_like(m, 1e3), -1)  # garbage below
    np.testing.assert_allclose(cholesky(jnp.asarray(upper_only)), np.linalg.cholesky(m),
                               rtol=1e-12, atol=1e-12)


def test_cholesky_of_a_batch_is_each_matrix_factor():
    m = spd(7, seed=2, batch=(3,))
    np.testing.assert_allclose(cholesky(jnp.asarray(m)), np.linalg.cholesky(m),
                               rtol=1e-12, atol=1e-12)


def test_cholesky_of_an_indefinite_matrix_is_nan():
    m = spd(4, seed=3)
    m[2, 2] = -1.0
    factor = np.asarray(cholesky(jnp.asarray(m)))
    assert np.isnan(factor[np.tril_indices(4)]).all()
    np.testing.assert_array_equal(factor[np.triu_indices(4, 1)], 0.0)


@pytest.mark.parametrize("rhs_shape", [(30,), (30, 4)])
def test_solves_match_float64_references(rhs_shape):
    m = spd(30, seed=4)
    b = np.random.default_rng(5).standard_normal(rhs_shape)
    expected = np.linalg.solve(m, b)
    np.testing.assert_allclose(jax.jit(spd_solve)(jnp.asarray(m), jnp.asarray(b)), expected,
                               rtol=1e-10, atol=1e-12)
    factor = cholesky(jnp.asarray(m))
    np.testing.assert_allclose(cho_solve(factor, jnp.asarray(b)), expected,
                               rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shift", [3.0, -0.5], ids=["definite", "indefinite"])
def test_symmetric_solve_differentiates_through_the_branch_it_took(shift):
    """``x = m⁻¹ b`` for a positive-definite and an indefinite symmetric ``m`` (the LU
    fallback): the value and the gradients of ``cᵀ x`` in ``m`` and ``b``
    (``-m⁻¹c xᵀ`` and ``m⁻¹c``) match ``jnp.linalg.solve``'s; they were NaN for the
    indefinite one (the Cholesky branch's NaN times zero)."""
    k1, k2, k3 = jax.random.split(jax.random.key(3), 3)
    a = jax.random.normal(k1, (6, 6))
    m = (a + a.T) / 4 + shift * jnp.eye(6)
    assert (np.linalg.eigvalsh(m).min() > 0) == (shift > 0)
    b, c = jax.random.normal(k2, (6,)), jax.random.normal(k3, (6,))

    def objective(solve):
        return lambda m, b: c @ solve(m, b)

    got = jax.grad(objective(symmetric_solve), argnums=(0, 1))(m, b)
    want = jax.grad(objective(jnp.linalg.solve), argnums=(0, 1))(m, b)
    np.testing.assert_allclose(symmetric_solve(m, b), jnp.linalg.solve(m, b), rtol=1e-10)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)
    tangent = jax.jvp(symmetric_solve, (m, b), (jnp.eye(6), b))[1]
    np.testing.assert_allclose(tangent, jax.jvp(jnp.linalg.solve, (m, b), (jnp.eye(6), b))[1],
                               rtol=1e-9, atol=1e-12)


_VMAPPED_SOLVES = """
import jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
from jaxgeom._symmetric import symmetric_solve
n = 400
a = jax.random.normal(jax.random.key(0), (3, n, n))
m = a @ jnp.swapaxes(a, -1, -2) + n * jnp.eye(n)
m = m.at[1].multiply(-1.0)  # one negative definite member: the LU branch
b = jnp.ones((n,))
x = jax.jit(jax.vmap(symmetric_solve, (0, None)))(m, b)
print(float(jnp.abs(jnp.einsum("kij,kj->ki", m, x) - b).max()))
"""


def test_a_vmapped_solve_over_a_stack_of_matrices_finishes():
    """Under ``vmap`` the Cholesky-or-LU ``cond`` runs both branches; with the LU on ``mᵀ``
    itself, XLA:CPU's program hung in most runs at ``n`` = 300–400 (a stack of
    ``PMatDense`` solved with ``jax.vmap``). Run in a process of its own, with a limit."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _VMAPPED_SOLVES], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip().splitlines()[-1]) < 1e-10


# the inverse: solves of the identity below POTRI_MIN_ORDER, LAPACK's potri (a host call)
# on a CPU from it; both against float64's inverse
INVERSE_ORDERS = [5, symmetric_module.POTRI_MIN_ORDER + 3]


@pytest.mark.parametrize("n", INVERSE_ORDERS)
@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-4)])
def test_spd_inverse_is_the_inverse_read_from_the_upper_triangle(n, dtype, rtol):
    m = spd(n, seed=3)
    garbage_below = np.triu(m) + np.tril(np.full_like(m, 1e3), -1)
    inverse = np.asarray(jax.jit(spd_inverse)(jnp.asarray(garbage_below, dtype)))
    np.testing.assert_allclose(inverse, np.linalg.inv(m), rtol=rtol, atol=rtol)
    np.testing.assert_array_equal(inverse, inverse.T)  # exactly symmetric


@pytest.mark.parametrize("n", INVERSE_ORDERS)
def test_spd_inverse_of_an_indefinite_matrix_is_nan(n):
    m = spd(n, seed=4)
    m[0, 0] = -1.0
    assert np.isnan(np.asarray(spd_inverse(jnp.asarray(m)))).all()


@pytest.mark.parametrize("n", INVERSE_ORDERS)
def test_spd_inverse_differentiates_as_minus_x_dm_x(n):
    m, dm = spd(n, seed=5), spd(n, seed=6)
    x, dx = jax.jvp(spd_inverse, (jnp.asarray(m),), (jnp.asarray(dm),))
    x_ref = np.linalg.inv(m)
    np.testing.assert_allclose(np.asarray(dx), -x_ref @ dm @ x_ref, rtol=1e-9, atol=1e-9)
    # reverse mode: ∂ tr(C m⁻¹)/∂m = −(m⁻¹ C m⁻¹)ᵀ
    c = np.random.default_rng(7).standard_normal((n, n))
    grad = jax.grad(lambda m: jnp.sum(c * spd_inverse(m)))(jnp.asarray(m))
    np.testing.assert_allclose(np.asarray(grad), -(x_ref @ c.T @ x_ref).T, rtol=1e-8,
                               atol=1e-9)


def test_a_vmapped_spd_inverse_inverts_each_matrix():
    stack = spd(symmetric_module.POTRI_MIN_ORDER, seed=8, batch=(2,))
    inverses = jax.jit(jax.vmap(spd_inverse))(jnp.asarray(stack))
    np.testing.assert_allclose(np.asarray(inverses), np.linalg.inv(stack), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("dtype, rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-4)])
def test_spd_inverses_inverts_each_matrix_all_in_one_host_call_when_one_is_large(dtype, rtol):
    """Matrices below and above POTRI_MIN_ORDER, each read from its upper triangle: all in
    one host call (one chain per core where faster) since one is large, none when none
    is; an indefinite one is all NaN, the others are not."""
    n = symmetric_module.POTRI_MIN_ORDER
    matrices = [spd(order, seed=20 + order) for order in (n + 7, 4, n, n + 1)]
    indefinite = spd(n + 2, seed=30)
    indefinite[0, 0] = -1.0
    given = [np.triu(m) + np.tril(np.full_like(m, 1e3), -1) for m in matrices + [indefinite]]
    args = [jnp.asarray(m, dtype) for m in given]

    inverses = jax.jit(symmetric_module.spd_inverses)(args)

    for m, inverse in zip(matrices, inverses):
        np.testing.assert_allclose(np.asarray(inverse), np.linalg.inv(m), rtol=rtol,
                                   atol=rtol)
        np.testing.assert_array_equal(inverse, inverse.T)
    assert np.isnan(np.asarray(inverses[-1])).all()
    on_cpu = jax.default_backend() == "cpu"
    assert _host_calls(symmetric_module.spd_inverses, args) == (1 if on_cpu else 0)
    assert _host_calls(symmetric_module.spd_inverses, [args[1], args[1]]) == 0


def _host_calls(fn, *args) -> int:
    """The host callbacks in ``fn``'s program, traced anew (a new function: JAX caches a
    function's traces, and the thread's flags are not part of the key)."""
    return str(jax.make_jaxpr(lambda *a: fn(*a))(*args)).count("pure_callback")


def test_spd_inverse_calls_the_host_only_where_callbacks_may_run():
    """``potri`` through a host callback on a CPU from POTRI_MIN_ORDER, under a one-thread
    LAPACK hold too (the host call's chains take it as well, and it is given back); none
    inside ``jaxgeom.no_host_callbacks()`` (``jax.export`` serialises the program), where
    the solves give the same inverse."""
    from jax import export

    from jaxgeom import _lapack

    m = jnp.asarray(spd(symmetric_module.POTRI_MIN_ORDER, seed=9))
    small = m[:5, :5]
    on_cpu = jax.default_backend() == "cpu"
    assert _host_calls(spd_inverse, m) == (1 if on_cpu else 0)
    assert _host_calls(spd_inverse, small) == 0
    with jaxgeom.no_host_callbacks():
        assert _host_calls(spd_inverse, m) == 0
        exported = export.export(jax.jit(spd_inverse))(m)
    np.testing.assert_allclose(np.asarray(exported.call(m)), np.linalg.inv(np.asarray(m)),
                               rtol=1e-10, atol=1e-10)
    with _lapack._one_lapack_thread():
        assert _host_calls(spd_inverse, m) == (1 if on_cpu else 0)
        held = jax.jit(lambda m: spd_inverse(m))(m)
    np.testing.assert_allclose(np.asarray(held), np.linalg.inv(np.asarray(m)), rtol=1e-10,
                               atol=1e-10)
    assert _lapack._ONE_THREAD._count == 0
