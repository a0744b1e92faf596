"""PMatKFAC: exact on the cases where KFAC is exact, factors equal to their definition
(brute force, float64), every operation against ``to_dense()``, dampings, jit, chunking."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_embed, make_linen_layernorm, make_linen_mlp, make_plain_mlp
from pmat_checks import TOL, check_all, check_combinations, check_pytree, check_solve

from jaxgeom import FIM, FIM_MonteCarlo, PMatDense, SecondMoment
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.kfac import PMatKFAC

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- exact cases
def _equinox_linear():
    model = eqx.nn.Linear(3, 4, key=KEY)  # weight (out, in)
    params, static = eqx.partition(jax.tree_util.tree_map(
        lambda a: jnp.asarray(a, jnp.float64), model), eqx.is_inexact_array)
    return (lambda p, x: jax.vmap(eqx.combine(p, static))(x)), params


@pytest.mark.parametrize("model", ["plain", "linen", "equinox"])
def test_one_example_one_sample_is_exact(model):
    """``A ⊗ G = (a aᵀ) ⊗ (g gᵀ)`` is the exact block for one example and one output."""
    x = jax.random.normal(KEY, (1, 3))
    if model == "equinox":
        apply_fn, params = _equinox_linear()
    elif model == "linen":
        t = make_linen_mlp(n=1)
        apply_fn, params, x = t.apply_fn, t.params, t.x
    else:
        params = {"w": jax.random.normal(KEY, (3, 4)), "b": jnp.ones(4)}

        def apply_fn(p, x):
            return x @ p["w"] + p["b"]

    kw = dict(key=KEY, trials=1)
    K = FIM_MonteCarlo(apply_fn, params, x, PMatKFAC, **kw)
    B = FIM_MonteCarlo(apply_fn, params, x, PMatBlockDiag, **kw)  # dense for one layer
    np.testing.assert_allclose(K.to_dense(), B.to_dense(), **TOL)
    assert len(K.specs) == len(K.layer_collection.layers)


@pytest.mark.parametrize("make", [make_linen_mlp, make_plain_mlp])
def test_shared_input_mlp_equals_block_diagonal(make):
    """All examples share the same input: the KFAC independence assumption is exact."""
    t = make()
    x = jnp.tile(t.x[:1], (5, 1))
    K = FIM(t.apply_fn, t.params, x, PMatKFAC)
    B = FIM(t.apply_fn, t.params, x, PMatBlockDiag)
    np.testing.assert_allclose(K.to_dense(), B.to_dense(), **TOL)


# ----------------------------------------------------------------------------- definitions


def test_conv_factors_from_explicit_patches():
    """KFC (Grosse & Martens 2016): A = Σ [p,1][p,1]ᵀ/(N·T) over explicit patches,
    G = Σ g gᵀ/N over output locations — for a strided, padded, dilated conv (HWIO)."""
    k1, k2, k3 = jax.random.split(KEY, 3)
    params = {"b": jax.random.normal(k1, (3,)), "w": jax.random.normal(k2, (2, 3, 2, 3)),
              "v": jax.random.normal(k3, (3, 12))}
    conv = dict(window_strides=(2, 1), padding=((1, 0), (1, 1)), rhs_dilation=(1, 2))
    dn = ("NHWC", "HWIO", "NHWC")

    def pre_bias(w, x):
        return jax.lax.conv_general_dilated(x, w, dimension_numbers=dn, **conv)

    def head(p, y):  # y: (N, 2, 2, 3)
        h = jnp.tanh(y + p["b"])
        return jnp.einsum("nhwc,ck->nk", h, p["v"].reshape(3, 4, 3).sum(1))

    def fn(p, x):
        return head(p, pre_bias(p["w"], x))

    x = jax.random.normal(KEY, (4, 4, 4, 2))
    K = SecondMoment(fn, params, x, PMatKFAC, batch_size=3)
    A, G = K.kronecker_factors("w")

    patches = jax.lax.conv_general_dilated_patches(
        x, (2, 3), dimension_numbers=dn, **conv)  # (N, Ho, Wo, C·kh·kw), features (c, h, w)
    n, ho, wo, _ = patches.shape
    p = patches.reshape(n * ho * wo, 2, 2, 3).transpose(0, 2, 3, 1).reshape(n * ho * wo, -1)
    p = np.concatenate([p, np.ones((len(p), 1))], axis=1)  # kernel order (h, w, i), then bias
    np.testing.assert_allclose(A, p.T @ p / (n * ho * wo), **TOL)

    y = pre_bias(params["w"], x)
    g = jax.vmap(jax.jacrev(lambda yn: head(params, yn[None])[0]))(y)  # (N, K, Ho, Wo, 3)
    g = np.asarray(g).reshape(-1, 3)
    np.testing.assert_allclose(G, g.T @ g / n, **TOL)
    assert y.shape[1:3] == (ho, wo)


@pytest.mark.parametrize("approx", ["expand", "reduce"])
def test_sequence_dense_factors(approx):
    """A dense layer over a sequence (weight sharing): Eschenhagen et al. (2023)."""
    params = {"w": jax.random.normal(KEY, (3, 4)), "b": jnp.ones(4) / 2}

    def head(y):  # (N, T, 4) → (N, 2)
        return jnp.tanh(y + params["b"]).sum(axis=1)[:, :2] ** 2

    def fn(p, x):
        return jnp.tanh(x @ p["w"] + p["b"]).sum(axis=1)[:, :2] ** 2

    x = jax.random.normal(KEY, (5, 6, 3))
    A, G = SecondMoment(fn, params, x, PMatKFAC, kfac_approx=approx).kronecker_factors("w")
    a = np.concatenate([x, np.ones((5, 6, 1))], axis=-1)  # (N, T, 4)
    g = np.asarray(jax.vmap(jax.jacrev(lambda yn: head(yn[None])[0]))(x @ params["w"]))
    if approx == "expand":  # A = Σ aaᵀ/(N·T), G = Σ ggᵀ/N
        a_rows, g_rows, t = a.reshape(-1, 4), g.transpose(0, 1, 2, 3).reshape(-1, 4), 6
    else:  # ā = mean_t a, ĝ = Σ_t g
        a_rows, g_rows, t = a.mean(1), g.sum(2).reshape(-1, 4), 1
    np.testing.assert_allclose(A, a_rows.T @ a_rows / (5 * t), **TOL)
    np.testing.assert_allclose(G, g_rows.T @ g_rows / 5, **TOL)


def test_embedding_input_factor_is_diagonal_counts():
    t = make_linen_embed()
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    A, _ = K.kronecker_factors("Embed_0")
    counts = np.bincount(np.asarray(t.x).ravel(), minlength=7)
    np.testing.assert_allclose(A, counts / t.x.size, **TOL)


# ----------------------------------------------------------------------------- operations
@pytest.fixture(scope="module", params=[make_linen_layernorm, make_plain_mlp, make_linen_embed])
def case(request):
    t = request.param()
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    return t, K, np.asarray(K.to_dense())


def test_operations(case):
    t, K, dense = case
    check_all(K, dense, t.params)
    check_pytree(K)
    # layer blocks, factor-wise quantities
    for layer in K.layer_collection.layers:
        idx = K.layer_collection.layer_indices(layer)
        np.testing.assert_allclose(K.get_block(layer), dense[np.ix_(idx, idx)], **TOL)
    np.testing.assert_allclose(K.pow(1 / 3).mm(K.pow(2 / 3)).to_dense(), dense, atol=1e-10)
    np.testing.assert_allclose((K**2).to_dense(), dense @ dense, **TOL)


def test_solve(case):
    t, K, dense = case
    check_solve(K, dense, t.params)  # every method: "eigh" (exact damping), "cg"


def test_pi_damping(case):
    """(A + π√λ I) ⊗ (G + √λ/π I), π = √((tr A/a)/(tr G/g)), exact blocks damped exactly."""
    t, K, dense = case
    lam = 1e-2
    expected = np.zeros_like(dense)
    lc = K.layer_collection
    for layer in lc.layers:
        idx = lc.layer_indices(layer)
        if layer.id in {s.layer_id for s in K.specs}:
            A, G = (np.asarray(f) for f in K.kronecker_factors(layer))
            A = np.diag(A) if A.ndim == 1 else A
            pi = np.sqrt((np.trace(A) / len(A)) / (np.trace(G) / len(G)))
            damped = np.kron(G + np.sqrt(lam) / pi * np.eye(len(G)),
                             A + pi * np.sqrt(lam) * np.eye(len(A)))
            order = np.argsort(K._parts.kron_flat[K._index(layer)])
            block = np.linalg.inv(damped)[np.ix_(order, order)]
        else:
            block = np.linalg.inv(dense[np.ix_(idx, idx)] + lam * np.eye(len(idx)))
        expected[np.ix_(idx, idx)] = block
    inv = K.inv(lam, damping="pi")
    np.testing.assert_allclose(inv.to_dense(), expected, rtol=1e-8, atol=1e-8)
    v = np.asarray(jax.random.normal(KEY, (len(dense),)))
    np.testing.assert_allclose(K.solve(v, lam, damping="pi"), expected @ v, rtol=1e-8)
    np.testing.assert_allclose(K.inv(lam).to_dense(),  # exact damping
                               np.linalg.inv(dense + lam * np.eye(len(dense))), rtol=1e-7)
    with pytest.raises(ValueError, match="damping"):
        K.inv(lam, damping="heuristic")


def test_sum_is_block_diagonal_and_product_factorwise(case):
    t, K, dense = case
    F = PMatDense(K.layer_collection, dense @ dense)
    check_combinations([
        (K, 2.0 * K, dense, 2 * dense, (PMatBlockDiag, PMatKFAC)),
        (K, F, dense, dense @ dense, (PMatDense, PMatDense)),
    ])


# ----------------------------------------------------------------------------- building
def test_chunks_iterables_and_jit():
    t = make_linen_layernorm(n=7)
    ref = FIM(t.apply_fn, t.params, t.x, PMatKFAC).to_dense()
    chunked = FIM(t.apply_fn, t.params, t.x, PMatKFAC, batch_size=3).to_dense()
    batches = [(t.x[:2], t.y[:2]), (t.x[2:], t.y[2:])]
    iterable = FIM(t.apply_fn, t.params, iter(batches), PMatKFAC, batch_size=4).to_dense()
    jitted = jax.jit(lambda p, x: FIM(t.apply_fn, p, x, PMatKFAC))(t.params, t.x).to_dense()
    for got in (chunked, iterable, jitted):
        np.testing.assert_allclose(got, ref, **TOL)


def test_build_errors():
    t = make_linen_layernorm()
    with pytest.raises(TypeError, match="from_jacobians"):
        PMatKFAC.accumulator(None)
    with pytest.raises(ValueError, match="kfac_approx"):
        FIM(t.apply_fn, t.params, t.x, PMatKFAC, kfac_approx="sum")
    with pytest.raises(ValueError, match="LayerNorm_0.*PMatMixed"):
        FIM(t.apply_fn, t.params, t.x, PMatKFAC, max_dense_block=4)
