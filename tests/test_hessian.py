"""Hessians of a mean loss against ``jax.hessian``, and the Gauss-Newton identity."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import (
    constant_columns,
    make_counted_mlp,
    make_equinox_mlp,
    make_linen_cnn,
    make_linen_mlp,
)
from pmat_checks import block_mask, check_products

from jaxgeom import FIM, PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit, PMatKFAC
from jaxgeom.hessian import Hessian, PMatImplicitHessian

TOL = dict(rtol=1e-8, atol=1e-10)


def cross_entropy(apply_fn):
    """The mean softmax cross-entropy ``loss_fn(params, (x, y))``."""
    def loss_fn(params, batch):
        x, y = batch
        logp = jax.nn.log_softmax(apply_fn(params, x))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    return loss_fn


def reference(loss_fn, params, batch):
    flat0, unravel = jax.flatten_util.ravel_pytree(params)
    return np.asarray(jax.jit(jax.hessian(lambda w: loss_fn(unravel(w), batch)))(flat0))


@functools.lru_cache
def _case(make):
    t = make()
    loss_fn = cross_entropy(t.apply_fn)
    ref = reference(loss_fn, t.params, (t.x, t.y))
    build = functools.partial(Hessian, loss_fn, t.params, (t.x, t.y), vectors_per_pass=16)
    return t, loss_fn, ref, {rep: build(rep) for rep in (PMatDense, PMatBlockDiag, PMatDiag,
                                                           PMatImplicit)}


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    return _case(request.param)


@pytest.fixture(scope="module")
def mlp():
    return _case(make_linen_mlp)


def test_every_representation_equals_jax_hessian(case):
    t, _, ref, H = case
    assert not np.allclose(ref, 0) and np.linalg.eigvalsh(ref).min() < -1e-8  # indefinite
    assert isinstance(H[PMatImplicit], PMatImplicitHessian)
    assert isinstance(H[PMatImplicit], PMatImplicit)
    np.testing.assert_allclose(H[PMatDense].to_dense(), ref, **TOL)
    np.testing.assert_allclose(H[PMatImplicit].to_dense(), ref, **TOL)
    blocks = np.where(block_mask(H[PMatBlockDiag].layer_collection), ref, 0)
    np.testing.assert_allclose(H[PMatBlockDiag].to_dense(), blocks, **TOL)
    np.testing.assert_allclose(H[PMatDiag].get_diag(), np.diag(ref), **TOL)


def test_operations(mlp):
    """The Fisher operations on Hessians (products, maps, diagonal, trace, norms)."""
    t, _, ref, H = mlp
    for rep in (PMatDense, PMatImplicit):
        check_products(H[rep], ref, t.params)
    evals = np.linalg.eigvalsh(ref)
    np.testing.assert_allclose(H[PMatDense].eigvalsh(), evals, atol=1e-10)
    np.testing.assert_allclose(H[PMatBlockDiag].trace(), np.trace(ref), **TOL)
    np.testing.assert_allclose(H[PMatDiag].trace(), np.trace(ref), **TOL)
    # called eagerly, the implicit Hessian's own diagonal (not PMatImplicit's compiled
    # Fisher diagonal, which it inherits the dispatch of)
    np.testing.assert_allclose(H[PMatImplicit].trace(), np.trace(ref), **TOL)
    np.testing.assert_allclose(H[PMatImplicit].get_diag(), np.diag(ref), **TOL)


def test_solves_of_an_indefinite_hessian(mlp):
    t, _, ref, H = mlp
    d = len(ref)
    v = np.random.default_rng(0).standard_normal(d)
    shift = 1.0 - np.linalg.eigvalsh(ref).min()  # makes H + shift·I positive definite
    rhs = (ref + shift * np.eye(d)) @ v
    np.testing.assert_allclose(H[PMatImplicit].solve(rhs, shift, rtol=1e-12), v, rtol=1e-6)
    np.testing.assert_allclose(H[PMatDense].solve(rhs, shift), v, rtol=1e-8)
    # below the smallest eigenvalue: eigh still solves (no positive-definiteness needed)
    rhs = (ref + 1e-3 * np.eye(d)) @ v
    np.testing.assert_allclose(H[PMatDense].solve(rhs, 1e-3, method="eigh"), v, rtol=1e-6)


def test_batches_of_different_sizes_equal_one_batch(mlp):
    """Batches weighted by their sizes: the Hessian of the mean over all examples; padding
    never biases it."""
    t, loss_fn, ref, _ = mlp
    batches = [(t.x[:2], t.y[:2]), (t.x[2:7], t.y[2:7])]
    v = np.random.default_rng(1).standard_normal(len(ref))
    dense = Hessian(loss_fn, t.params, iter(batches), PMatDense, batch_size=4)  # 2 | 4 + 1
    np.testing.assert_allclose(dense.to_dense(), ref, **TOL)
    implicit = Hessian(loss_fn, t.params, (b for b in batches), PMatImplicit)
    for _ in range(2):  # replays a one-shot generator
        np.testing.assert_allclose(implicit.mv(v), ref @ v, **TOL)
    np.testing.assert_allclose(implicit.vTMv(v), v @ ref @ v, **TOL)


def test_hvp_finite_differences(mlp):
    """``H dw ≈ ∇L(w + dw) − ∇L(w)`` (central differences, ``|dw| ~ 1e-5``)."""
    t, loss_fn, _, H = mlp
    rng = np.random.default_rng(2)
    dw = jax.tree_util.tree_map(lambda a: 1e-5 * rng.standard_normal(a.shape), t.params)

    def grad(sign):
        p = jax.tree_util.tree_map(lambda a, b: a + sign * b, t.params, dw)
        return jax.flatten_util.ravel_pytree(jax.grad(loss_fn)(p, (t.x, t.y)))[0]

    diff = (grad(1) - grad(-1)) / 2
    for rep in (PMatDense, PMatImplicit):
        hv = jax.flatten_util.ravel_pytree(H[rep].mv(dw))[0]
        np.testing.assert_allclose(hv, diff, rtol=1e-6, atol=1e-15)


def test_gauss_newton_identity():
    """For a model linear in its parameters with the mean softmax cross-entropy, the
    Hessian is the Fisher (``classif_logits``); for any model, the Hessian of the loss of
    the linearised model (the Gauss-Newton part) is the Fisher."""
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((3, 4)), "b": 0.1 * rng.standard_normal(4)}
    x, y = rng.standard_normal((9, 3)), rng.integers(0, 4, 9)

    def linear(p, x):
        return x @ p["w"] + p["b"]

    t = make_linen_mlp()

    def linearised(p, x):  # f(θ₀) + J(θ₀)(θ − θ₀)
        delta = jax.tree_util.tree_map(jnp.subtract, p, t.params)
        return jax.jvp(lambda q: t.apply_fn(q, x), (t.params,), (delta,))[1] + t.apply_fn(
            t.params, x)

    for apply_fn, p, data, model in [(linear, params, (x, y), linear),
                                     (linearised, t.params, (t.x, t.y), t.apply_fn)]:
        loss_fn = cross_entropy(apply_fn)
        F = FIM(model, p, data, PMatDense)
        v = rng.standard_normal(F.size(0))
        for rep in (PMatDense, PMatImplicit):
            H = Hessian(loss_fn, p, data, rep)
            np.testing.assert_allclose(H.mv(v), F.mv(v), **TOL)
        np.testing.assert_allclose(H.to_dense(), F.to_dense(), **TOL)


def test_under_jit_and_errors(mlp):
    t, loss_fn, ref, _ = mlp
    build = jax.jit(lambda p, b: Hessian(loss_fn, p, b, PMatDiag, batch_size=4))
    np.testing.assert_allclose(build(t.params, (t.x, t.y)).get_diag(), np.diag(ref), **TOL)
    scaled = jax.jit(lambda H: (2 * H).trace())(mlp[3][PMatImplicit])
    np.testing.assert_allclose(scaled, 2 * np.trace(ref), **TOL)
    with pytest.raises(TypeError, match="PMatDense, PMatBlockDiag, PMatDiag, PMatImplicit"):
        Hessian(loss_fn, t.params, (t.x, t.y), PMatKFAC)
    with pytest.raises(ValueError, match="scalar"):
        Hessian(lambda p, b: t.apply_fn(p, b[0]), t.params, (t.x, t.y), PMatDense)
    with pytest.raises(TypeError, match="not from Jacobians"):
        FIM(t.apply_fn, t.params, t.x, PMatImplicitHessian)
    for bad in (True, 2.5, "3", 0):  # a bool was taken for 1 vector a pass
        with pytest.raises(ValueError, match="vectors_per_pass must be a positive integer"):
            Hessian(loss_fn, t.params, (t.x, t.y), PMatDense, vectors_per_pass=bad)



def test_implicit_products_inside_jit_scan_the_unpadded_chunks(mlp):
    """Inside a ``jit`` the implicit Hessian's chunks stay unpadded (a mean loss over padded
    examples would count them): each batch's full chunks are one ``lax.scan``, its
    remainder one step more. ``mv``, ``vTMv`` and a CG ``solve`` as ``jax.hessian``'s, from
    one batch of 7 in chunks of 3 (a remainder of 1) and a list of two batches (5 and 2:
    chunks of 3 and 2, and of 2); the program is the same for 4× the examples."""
    t, loss_fn, ref, _ = mlp
    flat, unravel = jax.flatten_util.ravel_pytree(t.params)
    v = jax.random.normal(jax.random.PRNGKey(5), flat.shape, flat.dtype)
    regul = 1.0 + max(0.0, -np.linalg.eigvalsh(ref).min())  # H + regul·I positive definite

    def products(params, data):
        H = Hessian(loss_fn, params, data, PMatImplicit, batch_size=3)
        mv = jax.flatten_util.ravel_pytree(H.mv(unravel(v)))[0]
        solution = jax.flatten_util.ravel_pytree(H.solve(unravel(v), regul, rtol=1e-12))[0]
        return mv, H.vTMv(unravel(v)), solution

    n = t.x.shape[0]
    for data in ((t.x, t.y), [(t.x[:n - 2], t.y[:n - 2]), (t.x[n - 2:], t.y[n - 2:])]):
        mv, curvature, solution = jax.jit(products)(t.params, data)
        np.testing.assert_allclose(mv, ref @ v, **TOL)
        np.testing.assert_allclose(curvature, v @ ref @ v, **TOL)
        np.testing.assert_allclose(solution, np.linalg.solve(ref + regul * np.eye(len(v)), v),
                                   rtol=1e-7, atol=1e-9)
    more = (jnp.concatenate([t.x] * 4), jnp.concatenate([t.y] * 4))
    programs = [[e.primitive.name for e in jax.make_jaxpr(products)(t.params, d).eqns]
                for d in ((t.x, t.y), more)]
    assert "scan" in str(jax.make_jaxpr(products)(t.params, (t.x, t.y)))
    assert programs[0] == programs[1]


def test_integer_and_boolean_leaves_have_zero_rows_and_columns():
    """Integer and boolean params leaves (a step counter and a mask the loss reads, a counter
    it ignores) are constants, as in the Jacobian-based matrices: every representation is
    ``jax.hessian``'s with zero rows and columns for them (``jax.grad`` refuses them, and
    ``jax.jvp`` would want float0 tangents), the implicit one's products included."""
    t, _, ref, H = _case(make_counted_mlp)
    constant = constant_columns(t.params)
    assert ref.any() and not ref[constant].any() and not ref[:, constant].any()
    np.testing.assert_allclose(H[PMatDense].to_dense(), ref, **TOL)
    np.testing.assert_allclose(H[PMatDiag].get_diag(), np.diag(ref), **TOL)
    blocks = np.where(block_mask(H[PMatBlockDiag].layer_collection), ref, 0)
    np.testing.assert_allclose(H[PMatBlockDiag].to_dense(), blocks, **TOL)
    check_products(H[PMatImplicit], ref, t.params)  # HVPs; vTMv forward-over-forward
    np.testing.assert_allclose(H[PMatImplicit].to_dense(), ref, **TOL)
    v = H[PMatDense].mv(t.params)  # a raw params vector, integer leaves included
    for a, b in zip(jax.tree_util.tree_leaves(H[PMatImplicit].mv(t.params)),
                    jax.tree_util.tree_leaves(v)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
        np.testing.assert_allclose(a, b, **TOL)

def test_a_non_finite_input_names_its_chunk():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (6, 3)).at[4, 1].set(jnp.nan)
    params = {"W": jax.random.normal(keys[1], (3, 4)), "b": jax.random.normal(keys[2], (4,))}

    def loss_fn(p, batch):
        return jnp.mean(jnp.tanh(batch @ p["W"] + p["b"]) ** 2)

    for rep in (PMatDense, PMatDiag, PMatBlockDiag):
        with pytest.raises(FloatingPointError, match=r"loss Hessian for the examples 4\.\.5"):
            Hessian(loss_fn, params, x, rep, batch_size=2)


def test_implicit_vTMv_of_a_loss_with_a_custom_vjp():
    """A ``jax.custom_vjp`` has no forward-over-forward derivative: ``vᵀHv`` is then
    ``vᵀ(Hv)`` by one HVP, the same number."""

    @jax.custom_vjp
    def square(z):
        return z**2

    square.defvjp(lambda z: (z**2, z), lambda z, g: (2 * z * g,))
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"W": jax.random.normal(keys[0], (3, 2)), "b": jnp.zeros(2)}
    x, y = jax.random.normal(keys[1], (8, 3)), jax.random.normal(keys[2], (8, 2))

    def loss_fn(p, batch):
        return 0.5 * square(jnp.tanh(batch[0] @ p["W"] + p["b"]) - batch[1]).sum(-1).mean()

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H_ref = jax.hessian(lambda th: loss_fn(unravel(th), (x, y)))(flat)
    v = jax.random.normal(keys[3], flat.shape)
    H = Hessian(loss_fn, params, [(x[:5], y[:5]), (x[5:], y[5:])], PMatImplicit)
    np.testing.assert_allclose(H.vTMv(v), v @ H_ref @ v, rtol=1e-10)
    np.testing.assert_allclose(H.vTMv(v), v @ H_ref @ v, rtol=1e-10)  # the fallback kept


def test_a_loss_whose_examples_interact_is_traced_on_whole_batches():
    """A pairwise loss reshapes its batch into pairs: the layers are discovered on the
    batch as given, not on one example (which has no pair)."""
    keys = jax.random.split(jax.random.PRNGKey(1), 2)
    params = {"w": jax.random.normal(keys[0], (3, 2)), "b": jnp.zeros(2)}
    x = jax.random.normal(keys[1], (8, 3))  # four pairs of consecutive examples

    def pair_loss(p, batch):
        z = jnp.tanh(batch @ p["w"] + p["b"]).reshape(-1, 2, 2)
        return 0.5 * jnp.sum((z[:, 0] - z[:, 1]) ** 2, -1).mean()

    flat, unravel = jax.flatten_util.ravel_pytree(params)
    H_ref = jax.hessian(lambda th: pair_loss(unravel(th), x))(flat)
    for representation in (PMatDense, PMatBlockDiag):
        H = Hessian(pair_loss, params, x, representation)
        expected = H_ref * block_mask(H.layer_collection) if representation is PMatBlockDiag \
            else H_ref
        np.testing.assert_allclose(H.to_dense(), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("representation", [PMatDiag, PMatDense, PMatBlockDiag, PMatImplicit])
def test_eager_grad_and_vmap_of_a_build(representation, recwarn):
    """``jax.grad`` of ``tr H(θ)`` called eagerly equals the jitted one (the chunk step's
    donated running total was consumed by the top-level call before the trace fell back:
    "Array has been deleted"); an eager ``vmap`` of builds warns of no donation."""
    params = {"w": jnp.linspace(-1, 1, 12).reshape(3, 4), "b": jnp.zeros(4)}
    x = jnp.cos(jnp.arange(18.0)).reshape(6, 3)
    y = jnp.arange(6) % 4

    def loss_fn(p, batch):
        x, y = batch
        logp = jax.nn.log_softmax(jnp.tanh(x @ p["w"] + p["b"]))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))

    def trace(p):
        return Hessian(loss_fn, p, (x, y), representation).trace()

    want = jax.jit(jax.grad(trace))(params)
    got = jax.grad(trace)(params)
    for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
    traces = jax.vmap(trace)(jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), params))
    np.testing.assert_allclose(traces[1], trace(jax.tree_util.tree_map(lambda a: 2 * a, params)),
                               rtol=1e-10)
    assert not [w for w in recwarn if "donated" in str(w.message)]


def test_a_fractional_power_of_an_indefinite_hessian_is_refused(mlp):
    """H^½ of an indefinite Hessian is not real: its negative eigenvalues were clipped to 0
    silently (the power of another matrix); shifted above −λ_min it is the float64 one."""
    _, _, ref, H = mlp
    for rep in (PMatDense, PMatBlockDiag, PMatDiag):
        with pytest.raises(ValueError, match=r"pow\(0.5\) of an indefinite matrix.*regul"):
            H[rep].pow(0.5)
        # a negative fractional power too: indefinite, not singular (the message said so)
        with pytest.raises(ValueError, match=r"pow\(-0.5\) of an indefinite matrix"):
            H[rep].pow(-0.5)
    shift = 1e-3 - np.linalg.eigvalsh(ref).min()
    evals, evecs = np.linalg.eigh(ref + shift * np.eye(len(ref)))
    np.testing.assert_allclose(H[PMatDense].pow(0.5, shift).to_dense(),
                               (evecs * np.sqrt(evals)) @ evecs.T, rtol=1e-8, atol=1e-10)
