"""PMatKFAC: exact on the cases where KFAC is exact, factors equal to their definition
(brute force, float64), every operation against ``to_dense()``, dampings, jit, chunking."""

from __future__ import annotations

import dataclasses
import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree
from models import (
    MORE_TASKS,
    make_equinox_cnn,
    make_linen_cnn,
    make_linen_conv_transpose,
    make_linen_embed,
    make_linen_layernorm,
    make_linen_mlp,
    make_linen_wide_hidden,
    make_plain_mlp,
)
from pmat_checks import (
    TOL,
    check_all,
    check_combinations,
    check_eigsh,
    check_pytree,
    check_solve,
    factor_damped_dense,
)

import jaxgeom._symmetric as symmetric_module
from jaxgeom import (
    FIM,
    FIM_MonteCarlo,
    PMatDense,
    PMatEKFAC,
    PMatKFOC,
    PMatQuasiDiag,
    SecondMoment,
)
from jaxgeom.pmat import _gram
from jaxgeom.pmat import kfac as kfac_module
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.kfac import Kron, PMatKFAC

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


# ----------------------------------------------------------------------------- separate bias
def kernel_bias_mask(K) -> np.ndarray:
    """``(d, d)``: ``True`` on the kernel–bias entries of each biased Kronecker layer (the
    cross blocks between ``vec(W)`` and ``b``)."""
    d = K.layer_collection.numel()
    mask = np.zeros((d, d), bool)
    for spec, idx in zip(K.specs, K._parts.matrices):  # (g, a [+1]) flat indices
        if spec.bias is not None:
            kernel, bias = idx[:, :-1].ravel(), idx[:, -1]
            mask[np.ix_(kernel, bias)] = mask[np.ix_(bias, kernel)] = True
    return mask


@pytest.mark.parametrize("kfac_approx", ["expand", "reduce"])
@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn, make_linen_layernorm],
                         ids=lambda make: make.__name__)
def test_separate_weight_and_bias_is_the_joint_block_without_its_cross_terms(make, kfac_approx):
    """curvlinops' ``separate_weight_and_bias=True``: per biased layer ``A_w ⊗ G`` on the
    kernel and ``G`` on the bias (``A_bb = 1``), nothing between them — the joint block
    ``A ⊗ G`` with its kernel–bias entries zero. Every operation against that dense matrix."""
    t = make()
    joint = FIM(t.apply_fn, t.params, t.x, PMatKFAC, kfac_approx=kfac_approx)
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC, kfac_approx=kfac_approx,
            separate_weight_and_bias=True)
    for spec in K.specs:
        assert spec.bias is not None
        A, G = K.kronecker_factors(spec.layer_id)
        A_joint, G_joint = joint.kronecker_factors(spec.layer_id)
        np.testing.assert_allclose(G, G_joint, **TOL)
        np.testing.assert_allclose(A[:-1, :-1], A_joint[:-1, :-1], **TOL)
        np.testing.assert_array_equal(A[:-1, -1], 0)
        np.testing.assert_array_equal(A[-1, :-1], 0)
        np.testing.assert_allclose(A[-1, -1], 1.0, **TOL)  # the bias block is G
        assert np.any(np.abs(np.asarray(A_joint[:-1, -1])) > 1e-3)  # there was something
    mask = kernel_bias_mask(K)
    assert mask.any()
    dense = np.where(mask, 0.0, np.asarray(joint.to_dense()))
    np.testing.assert_allclose(K.to_dense(), dense, **TOL)
    check_all(K, dense, t.params)
    check_solve(K, dense, t.params)


def test_separate_weight_and_bias_is_exact_for_one_example_without_the_cross_block():
    """One example, one sampled output: ``A ⊗ G`` is the exact block, so the separated one is
    the exact block with its kernel–bias entries zero."""
    t = make_linen_mlp(n=1)
    kw = dict(key=KEY, trials=1)
    K = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatKFAC, separate_weight_and_bias=True, **kw)
    exact = np.asarray(FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatBlockDiag, **kw).to_dense())
    np.testing.assert_allclose(K.to_dense(), np.where(kernel_bias_mask(K), 0.0, exact), **TOL)


def test_separate_weight_and_bias_is_checked():
    t = make_linen_mlp()
    with pytest.raises(TypeError, match="separate_weight_and_bias must be True or False"):
        FIM(t.apply_fn, t.params, t.x, PMatKFAC, separate_weight_and_bias="yes")


@pytest.mark.parametrize("representation", [PMatKFAC, PMatEKFAC, PMatKFOC, PMatQuasiDiag])
def test_arrays_passed_positionally_in_the_place_of_the_specs_are_refused(representation):
    """``PMatKFAC(layout, factors, blocks)`` took the factors for its (static) specs and
    built a matrix of no Kronecker layer: trace 0, silently. Now a TypeError names the
    fields; by name, the same arrays rebuild the matrix."""
    t = make_linen_mlp()
    F = FIM(t.apply_fn, t.params, t.x, representation)
    fields = {f.name: getattr(F, f.name) for f in dataclasses.fields(F) if f.init}
    arrays = [v for k, v in fields.items() if k not in ("layer_collection", "specs")]
    with pytest.raises(TypeError, match=(
            f"^{representation.__name__}'s specs must be a tuple of KroneckerSpec .*got "
            r"(a tuple of \w+|ArrayImpl)\. Its fields are \(layer_collection, specs, ")):
        representation(F.layer_collection, *arrays)
    by_name = representation(**fields)
    np.testing.assert_allclose(by_name.trace(), F.trace(), rtol=1e-12)
    assert by_name.trace() > 0


# ----------------------------------------------------------------------------- more layers
def _layer_inputs(linear, kernel, spec):
    """``(T, a_l [+1])``: a layer's inputs (explicit patches), read off the Jacobian of its
    bias-free output ``linear(kernel)`` (positions first, then output features), which must
    be ``I ⊗ a_tᵀ`` in the layer-matrix order; the bias's constant-1 column appended."""
    jac = jax.jit(jax.jacrev(linear))(kernel).reshape(-1, spec.out_features, *spec.kernel_shape)
    jac = np.asarray(spec.kernel_to_matrix(jac))  # (T, g_l, g_l, a_l)
    a = jac[:, 0, 0]
    np.testing.assert_array_equal(jac, np.einsum("gh,ta->tgha", np.eye(spec.out_features), a))
    return a if spec.bias is None else np.concatenate([a, np.ones((len(a), 1))], axis=1)


def _linen_layer_values(fn, params, x, specs):
    """Brute force through flax's method interception: the gradient of ``fn`` (one example,
    one output) and, per layer id, the layer's inputs ``(T, a_l [+1])`` (its own module
    applied to its recorded input) and ``g_t = ∂fn/∂y_t``, ``(T, g_l)``, the gradient with
    respect to an additive perturbation of its output ``y`` (all in one compiled call)."""
    paths = {tuple(spec.layer_id.split("/")): spec for spec in specs}
    seen, deltas = {}, {}

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        path = context.module.path
        if context.method_name != "__call__" or path not in paths:
            return out
        if path not in seen:  # the first, concrete call: record the layer and its input
            seen[path] = (context.module.clone(parent=None), args[0])
            deltas[path] = jnp.zeros_like(out)
        return out + deltas[path]

    def perturbed(p, new):
        deltas.update(new)
        return fn(p, x)[0, 0]

    with nn.intercept_methods(interceptor):
        fn(params, x)
        grad, grads = jax.jit(jax.grad(perturbed, argnums=(0, 1)))(params, dict(deltas))
    out = {}
    for path, spec in paths.items():
        layer, layer_input = seen[path]
        layer_params = params
        for name in path:
            layer_params = layer_params[name]

        def linear(k, layer=layer, layer_params=layer_params, layer_input=layer_input):
            return layer.apply({"params": {**layer_params, "kernel": k}}, layer_input)

        a = _layer_inputs(linear, layer_params["kernel"], spec)
        out[spec.layer_id] = a, np.asarray(grads[path]).reshape(-1, spec.out_features)
    return grad, out


#: the layers shared over positions (T > 1) of the other models of ``MORE_TASKS``: their
#: output without bias, ``(1, *positions, g_l)``, as a function of the kernel, for ``x``
SHARED_LAYERS = {
    "nnx_cnn": {"conv": lambda k, x: jax.lax.conv_general_dilated(
        x, k, (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))},
    "equinox_cnn": {"conv": lambda k, x: jnp.moveaxis(jax.lax.conv_general_dilated(
        x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=("NCHW", "OIHW", "NCHW")), 1, -1)},
    "plain_reverse_scan": {"w": lambda k, x: x @ k},  # x_t @ w at each of the T = 3 steps
}


@pytest.mark.parametrize("name", sorted(MORE_TASKS))
def test_more_layers_one_example_one_output(name):
    """One example, one output (a fixed mix of the outputs): for a layer applied once
    (T = 1) KFAC's block is the exact float64 block JᵀJ; for a layer shared over T > 1
    positions (transposed convs with flipped kernels, attention projections and an MLP over
    a sequence, NNX and Equinox convs, a reverse scan) A = Σ_t a_t a_tᵀ/T (bias column) and
    G = Σ_t g_t g_tᵀ, with a_t, g_t by brute force (flax interception for linen models;
    otherwise explicit patches, and g from the exact Jacobian Σ_t g_t a_tᵀ by least squares)."""
    t = MORE_TASKS[name]()
    u = np.random.default_rng(0).standard_normal((t.num_outputs, 1))
    x = t.x[:1]

    def fn(p, x):
        return t.apply_fn(p, x) @ u

    K = SecondMoment(fn, t.params, x, PMatKFAC)
    if name.startswith("linen_"):
        grad, linen = _linen_layer_values(fn, t.params, x, K.specs)
    else:
        grad, linen = jax.jit(jax.grad(lambda p: fn(p, x)[0, 0]))(t.params), {}
    jac = np.asarray(ravel_pytree(grad)[0])  # the flat (d,) Jacobian of the one output
    grads = [np.asarray(a) for a in jax.tree_util.tree_leaves(grad)]
    kernels = jax.tree_util.tree_leaves(t.params)
    shared = set()
    for spec in K.specs:
        if spec.layer_id in linen:
            a, g = linen[spec.layer_id]
        elif spec.layer_id in SHARED_LAYERS[name]:
            linear = SHARED_LAYERS[name][spec.layer_id]
            a = _layer_inputs(lambda k, linear=linear: linear(k, x), kernels[spec.kernel], spec)
            jw = np.asarray(spec.kernel_to_matrix(grads[spec.kernel]))  # Σ_t g_t a_tᵀ
            if spec.bias is not None:
                jw = np.concatenate([jw, grads[spec.bias].reshape(-1, 1)], axis=1)
            assert np.linalg.matrix_rank(a) == len(a)
            g = (jw @ np.linalg.pinv(a)).T
            np.testing.assert_allclose(g.T @ a, jw, **TOL)
        else:
            a = None
        if a is None or len(a) == 1:  # T = 1: the exact block
            idx = K.layer_collection.layer_indices(spec.layer_id)
            np.testing.assert_allclose(K.get_block(spec.layer_id), np.outer(jac[idx], jac[idx]),
                                       **TOL, err_msg=spec.layer_id)
        if a is not None:
            if len(a) > 1:
                shared.add(spec.layer_id)
            A, G = K.kronecker_factors(spec.layer_id)
            np.testing.assert_allclose(A, a.T @ a / len(a), **TOL, err_msg=spec.layer_id)
            np.testing.assert_allclose(G, g.T @ g, **TOL, err_msg=spec.layer_id)
    assert shared


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


def test_eigsh_from_the_factors(case):
    """``k`` eigenpairs from the factors' eigendecompositions — the products ``g_i a_j`` and
    ``kron(q_{G,i}, q_{A,j})`` written into the layer's flat indices — against
    ``numpy.linalg.eigh`` of ``to_dense()``, for every ``which`` (ties among the zero
    eigenvalues with ``"SA"``: any orthonormal basis of the null space); all ``d`` at once;
    a damped inverse (eigenbasis blocks, no factors). The full ``eigh`` is refused, naming
    ``eigsh``."""
    t, K, dense = case
    d = len(dense)
    check_eigsh(K, dense)
    values, vectors = K.eigsh(d)
    np.testing.assert_allclose(values, np.linalg.eigvalsh(dense), atol=1e-12)
    np.testing.assert_allclose(np.asarray(vectors) * np.asarray(values) @ np.asarray(vectors).T,
                               dense, atol=1e-12)
    check_eigsh(K.inv(0.3), np.linalg.inv(dense + 0.3 * np.eye(d)), k=4)
    with pytest.raises(NotImplementedError, match=r"M\.eigsh\(k\)"):
        K.eigh()


def test_solve(case):
    t, K, dense = case
    check_solve(K, dense, t.params)  # every method: "eigh" (exact damping), "cg"


@pytest.mark.parametrize("damping", ["pi", "pi_one"])
def test_factored_damping(case, damping):
    """``"pi"``: (A + π√λ I) ⊗ (G + √λ/π I), π = √((tr A/a)/(tr G/g)); ``"pi_one"``
    (the formula of NNGeometry's ``use_pi=False``): π = 1, (A + √λ I) ⊗ (G + √λ I); exact
    blocks of the other layers damped exactly. ``inv``, ``pow(-1)``, ``solve`` and
    ``pow(±½)`` against the dense Kronecker products of the damped factors."""
    t, K, dense = case
    lam = 1e-2
    expected = factor_damped_dense(K, dense, lam, damping)
    v = np.asarray(jax.random.normal(KEY, (len(dense),)))
    for inverse in (K.inv(lam, damping=damping), K.pow(-1, lam, damping=damping)):
        assert type(inverse) is PMatKFAC  # still Kronecker-factored
        np.testing.assert_allclose(inverse.to_dense(), expected, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(K.solve(v, lam, damping=damping), expected @ v, rtol=1e-8)
    np.testing.assert_allclose(  # a stack of vectors, solved row by row
        K.solve(np.stack([v, 2 * v]), lam, damping=damping), [expected @ v, 2 * expected @ v],
        rtol=1e-8)
    for p in (-0.5, 0.5):
        np.testing.assert_allclose(K.pow(p, lam, damping=damping).to_dense(),
                                   factor_damped_dense(K, dense, lam, damping, p),
                                   rtol=1e-7, atol=1e-9)
    solve = jax.jit(lambda m, x, r: m.solve(x, r, damping=damping))
    np.testing.assert_allclose(solve(K, v, lam), expected @ v, rtol=1e-8)
    np.testing.assert_allclose(K.inv(lam).to_dense(),  # exact damping
                               np.linalg.inv(dense + lam * np.eye(len(dense))), rtol=1e-7)


def test_pi_one_differs_from_pi_and_from_exact_damping():
    """On factors of unequal scales (π ≠ 1) the three dampings give three matrices, and
    the factored ones over-damp: ``(A + √λ)⊗(G + √λ) ⪰ A⊗G + λI``."""
    t = make_plain_mlp()
    K = 7.0 * FIM(t.apply_fn, t.params, (t.x, t.y), PMatKFAC)  # scales A only: π ≠ 1
    lam = 1e-2
    dense = np.asarray(K.to_dense())
    exact = np.linalg.inv(dense + lam * np.eye(len(dense)))
    inverses = {d: np.asarray(K.inv(lam, damping=d).to_dense()) for d in ("pi", "pi_one")}
    assert not np.allclose(inverses["pi"], inverses["pi_one"], rtol=1e-3)
    for inverse in inverses.values():
        assert not np.allclose(inverse, exact, rtol=1e-3)
        assert np.linalg.eigvalsh(exact - inverse).min() > -1e-10  # inverses: ⪯ the exact one


def test_damping_values_are_checked(case):
    """A damping that is not one of ``DAMPINGS`` is refused by every operation that takes
    it, naming the valid ones (NNGeometry's ``use_pi`` booleans: which name each is)."""
    t, K, dense = case
    v = np.ones(len(dense))
    for call in (lambda d: K.inv(1e-2, damping=d), lambda d: K.pow(-0.5, 1e-2, damping=d),
                 lambda d: K.solve(v, 1e-2, damping=d)):
        with pytest.raises(ValueError, match="damping must be one of.*'pi_one'"):
            call("heuristic")
        with pytest.raises(ValueError, match="use_pi=False's formula is damping='pi_one'"):
            call(False)
    with pytest.raises(TypeError, match="takes no option use_pi"):
        K.solve(v, 1e-2, use_pi=False)
    with pytest.raises(ValueError, match="damping='pi_one' damps each of the Kronecker"):
        K.inv(1e-2).inv(1e-2, damping="pi_one")  # an eigenbasis form has no factors


def test_pi_damping_of_a_zero_block_is_the_damping_alone():
    """A layer that gets no output gradient (the next kernel zero) has G = 0, a zero block,
    and π = √((tr A/a)/(tr G/g)) = ∞, which had made the damped factors singular (NaN).
    The damped block is then λI, the formula's limit: the solve is v/λ there."""
    t = make_plain_mlp()
    params = dict(t.params, w2=jnp.zeros_like(t.params["w2"]))
    K = FIM(t.apply_fn, params, (t.x, t.y), PMatKFAC)
    lam = 1e-2
    v = np.asarray(jax.random.normal(KEY, (K.layer_collection.numel(),)))
    solved = np.asarray(K.solve(v, lam, damping="pi"))
    inverse = np.asarray(K.inv(lam, damping="pi").to_dense())
    assert np.isfinite(solved).all() and np.isfinite(inverse).all()
    np.testing.assert_allclose(inverse @ v, solved, rtol=1e-8)
    first = K.layer_collection.layers[0]
    assert np.trace(K.kronecker_factors(first)[1]) == 0
    idx = K.layer_collection.layer_indices(first)
    np.testing.assert_allclose(solved[idx], v[idx] / lam, rtol=1e-10)
    # π = 1 needs no limit: (A + √λ I) ⊗ (0 + √λ I), as the formula reads
    dense = np.asarray(K.to_dense())
    np.testing.assert_allclose(K.solve(v, lam, damping="pi_one"),
                               factor_damped_dense(K, dense, lam, "pi_one") @ v, rtol=1e-8)


def test_sum_is_block_diagonal_and_product_factorwise(case):
    t, K, dense = case
    F = PMatDense(K.layer_collection, dense @ dense)
    check_combinations([
        (K, 2.0 * K, dense, 2 * dense, (PMatBlockDiag, PMatKFAC)),
        (K, F, dense, dense @ dense, (PMatDense, PMatDense)),
    ])


def test_sums_sharing_a_factor_stay_kronecker(case):
    """``A ⊗ G ± A' ⊗ G'`` with a shared factor is one Kronecker product: ``K + K``,
    ``K − 0.5 K`` and ``2 K + K`` (scaling multiplies ``A``, keeps ``G``) stay KFACs with
    the summed matrix; KFACs on other factors sum to the exact layer blocks."""
    t, K, dense = case
    for got, want in [(K + K, 2 * dense), (K - 0.5 * K, 0.5 * dense),
                      (2.0 * K + K, 3 * dense)]:
        assert type(got) is PMatKFAC
        np.testing.assert_allclose(got.to_dense(), want, **TOL)
    other = FIM(t.apply_fn, t.params, t.x[:3], PMatKFAC)
    total = K + other
    assert type(total) is PMatBlockDiag
    np.testing.assert_allclose(total.to_dense(), dense + np.asarray(other.to_dense()), **TOL)


def test_sum_on_other_factors_refuses_a_huge_block():
    """On other factors the sum needs each layer's exact block: above
    ``SUM_BLOCK_LIMIT`` parameters a layer gets an error naming it, its size and the ways
    out, not an allocation of ``d_l²`` floats."""
    params = {"w": jax.random.normal(KEY, (80, 60)) / 9, "b": jnp.zeros(60)}  # 4860 > 4096

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"] + p["b"])

    x = jax.random.normal(KEY, (4, 80))
    K1 = FIM(apply_fn, params, x, PMatKFAC, variant="regression")
    K2 = FIM(apply_fn, params, 2 * x, PMatKFAC, variant="regression")
    assert type(K1 + K1) is PMatKFAC  # a shared G: no block formed
    with pytest.raises(ValueError, match=r"layer 'w'.*4860².*to_blockdiag\(\)"):
        K1 + K2
    # a product of factors in two forms (a KFAC and an inverse in its eigenbasis) neither,
    # where it would have been a d × d dense matrix
    with pytest.raises(ValueError, match=r"product.*layer 'w'.*4860².*F1.mv\(F2.mv"):
        K1 @ K1.inv(0.1)


def test_product_with_an_inverse_is_the_layer_blocks_product(case):
    """``K · (K + λI)⁻¹``: a Kronecker product times an eigen-form: the exact layer
    blocks' products, block-diagonal, not a dense ``d × d`` matrix."""
    t, K, dense = case
    inverse = K.inv(0.3)
    want = dense @ np.linalg.inv(dense + 0.3 * np.eye(dense.shape[0]))
    for got, expected in [(K @ inverse, want), (inverse @ K, want.T)]:
        assert type(got) is PMatBlockDiag
        np.testing.assert_allclose(got.to_dense(), expected, rtol=1e-8, atol=1e-10)


def test_product_of_two_kfacs_is_exact_and_refuses_to_factorise(case):
    """``K₁K₂``, layer blocks ``A₁A₂ ⊗ G₁G₂`` (at other parameters: factors that do not
    commute, a matrix that is not symmetric): its products, diagonal, trace and norm are
    those of ``D₁D₂``; a solve or a function of it, which would factorise ``A₁A₂`` and
    ``G₁G₂`` as symmetric, is refused. ``K₁K₁`` (the same factors) is symmetric and
    solves."""
    t, K1, dense1 = case
    K2 = FIM(t.apply_fn, jax.tree_util.tree_map(lambda p: 1.5 * p, t.params), t.x, PMatKFAC)
    product = K1 @ K2
    want = dense1 @ np.asarray(K2.to_dense())
    assert np.abs(want - want.T).max() > 1e-3 * np.abs(want).max()  # not symmetric
    v = np.asarray(jax.random.normal(KEY, (len(want),)))
    np.testing.assert_allclose(product.to_dense(), want, **TOL)
    np.testing.assert_allclose(product.mv(v), want @ v, **TOL)
    np.testing.assert_allclose(product.vTMv(v), v @ want @ v, **TOL)
    np.testing.assert_allclose(product.get_diag(), np.diag(want), **TOL)
    np.testing.assert_allclose(product.trace(), np.trace(want), **TOL)
    np.testing.assert_allclose(product.frobenius_norm(), np.linalg.norm(want), **TOL)
    for refused in (lambda: product.solve(v, 0.1), product.eigvalsh,
                    lambda: product.solve(v, 0.1, damping="pi"),
                    lambda: product.inv(0.1, damping="pi"), lambda: product.pow(0.5),
                    lambda: product.pow(-1), lambda: product.logdet(0.1)):
        with pytest.raises(ValueError, match=r"symmetric Kronecker factors.*F2.solve\(F1"):
            refused()
    square = dense1 @ dense1
    np.testing.assert_allclose((K1 @ K1).solve(v, 0.1),
                               np.linalg.solve(square + 0.1 * np.eye(len(v)), v), rtol=1e-7)


@pytest.mark.parametrize("make, input_major", [
    (make_linen_cnn, True),  # HWIO kernels: the blocks are applied to Vᵀ
    (make_equinox_cnn, False),  # OIHW: V is the kernel as stored
    (make_linen_conv_transpose, False),  # a reversed kernel: gathered
])
def test_products_in_every_kernel_layout(make, input_major):
    t = make()
    K = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    assert K._parts.transposed[0] == input_major  # the first convolution
    dense = np.asarray(K.to_dense())
    v = np.asarray(jax.random.normal(KEY, (len(dense),)))
    lam = 1e-2
    damped = np.linalg.solve(dense + lam * np.eye(len(dense)), v)
    np.testing.assert_allclose(K.mv(v), dense @ v, **TOL)
    np.testing.assert_allclose(K.vTMv(v), v @ dense @ v, **TOL)
    np.testing.assert_allclose(K.solve(v, lam), damped, rtol=1e-7)
    np.testing.assert_allclose(K.inv(lam).mv(v), damped, rtol=1e-7)  # eigenbasis blocks
    np.testing.assert_allclose(K.inv(lam).vTMv(v), v @ damped, rtol=1e-7)
    np.testing.assert_allclose(K.solve(v, lam, damping="pi"),
                               K.inv(lam, damping="pi").to_dense() @ v, rtol=1e-7)
    np.testing.assert_allclose((K @ (2.0 * K)).mv(v), 2 * dense @ (dense @ v), **TOL)
    check_eigsh(K, dense)  # the eigenvectors' layer matrices in every kernel layout


@pytest.mark.parametrize("damping", ["pi", "pi_one"])
def test_factor_damped_inverse_of_factors_inverted_on_the_host(damping):
    """Factors of order ≥ ``POTRI_MIN_ORDER`` are inverted by LAPACK's ``potri`` on a CPU,
    every layer's in one host call (side by side where faster); the inverses are the
    damped factors' all the same, against float64's ``np.linalg.inv``, a diagonal ``A``'s
    its reciprocal."""
    big, lam = symmetric_module.POTRI_MIN_ORDER + 1, 1e-2
    keys = jax.random.split(KEY, 5)
    A1, G1, G2, A3, G3 = ((lambda m: m @ m.T / n)(np.asarray(jax.random.normal(k, (n, 2 * n))))
                          for k, n in zip(keys, (big, 3, big, big, 4)))
    nodes = [Kron(A1, G1), Kron(np.linspace(1.0, 2.0, 5), G2), Kron(A3, G3)]

    def inverted(nodes):
        return kfac_module.inverses([n.factor_damped(lam, damping) for n in nodes])

    for node, inverse in zip(nodes, jax.jit(inverted)(nodes)):
        damped = node.factor_damped(lam, damping)
        for got, factor in ((inverse.A, damped.A), (inverse.G, damped.G)):
            factor = np.asarray(factor)
            expected = 1 / factor if factor.ndim == 1 else np.linalg.inv(factor)
            np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)
    program = str(jax.make_jaxpr(inverted)(nodes))
    assert program.count("pure_callback") == (1 if jax.default_backend() == "cpu" else 0)


def test_blocks_applied_to_the_transposed_matrix():
    """``node.transposed()`` maps ``Vᵀ`` to ``(M V)ᵀ`` for every kind of layer block."""
    keys = jax.random.split(KEY, 5)
    g, a = 3, 4
    sym = [(lambda m: m @ m.T + np.eye(len(m)))(np.asarray(jax.random.normal(k, (n, n))))
           for k, n in zip(keys[:3], (a, g, a))]
    A, G, A2 = sym
    diag_a = np.abs(np.asarray(jax.random.normal(keys[3], (a,)))) + 1
    V = np.asarray(jax.random.normal(keys[4], (g, a)))
    nodes = [Kron(A, G), Kron(diag_a, G), Kron(A, G).eigen(), Kron(diag_a, G).eigen(),
             Kron(A, G).mm(Kron(A2, G @ G))]
    for node in nodes:
        t = node.transposed()
        np.testing.assert_allclose(t.mv(V.T), node.mv(V).T, **TOL)
        np.testing.assert_allclose(t.quadratic(V.T), np.vdot(V, node.mv(V)), **TOL)
    for node in nodes[:2]:
        np.testing.assert_allclose(node.transposed().solve(V.T), node.solve(V).T, **TOL)
        np.testing.assert_allclose(node.mv(node.solve(V)), V, **TOL)


@pytest.mark.parametrize("on_host", [False, True], ids=["in_program", "on_host"])
@pytest.mark.parametrize("representation, task", [
    (PMatKFAC, "mlp_on_3"), (PMatKFOC, "mlp_on_3"), (PMatKFAC, "wide_hidden")])
def test_eigenbasis_powers_differentiate_through_singular_and_repeated_factors(
        representation, task, on_host, monkeypatch):
    """``∇θ vᵀ(M + λI)⁻¹v`` through ``inv(λ)`` (the factors' eigenbases) and through
    ``solve`` (differentiated as a linear system) is the dense brute force's, and
    ``pow(½, λ)``'s the central difference's, where the factors are singular — ``A``
    summed from fewer rows than its order: LAPACK's ``eigh`` (3 examples) or the sketch of
    its range (6 examples, 131 inputs) — and the regression ``G = I`` repeats one
    eigenvalue; with the ``eigh``'s in the program, and in one host call (chains forced
    for these small factors). Through ``jnp.linalg.eigh``'s derivative the first gradient
    was off by up to 46% (KFAC) or NaN (KFOC: its ``G = c(θ) I``); the sketch had none."""
    if on_host:
        from jaxgeom import _lapack
        monkeypatch.setattr(_lapack, "_cores", lambda: 2)
        monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 0)
    t = make_linen_mlp() if task == "mlp_on_3" else make_linen_wide_hidden()
    x = t.x[:3] if task == "mlp_on_3" else t.x
    flat, unravel = ravel_pytree(t.params)
    rng = np.random.default_rng(0)
    v, u = (jnp.asarray(rng.normal(size=flat.size)) for _ in range(2))
    lam = 0.1

    @jax.jit
    def quadratic_forms(q):
        M = FIM(t.apply_fn, unravel(q), x, representation, variant="regression")
        dense = M.to_dense() + lam * jnp.eye(flat.size)
        return jnp.stack([M.inv(lam).vTMv(v), v @ jnp.linalg.solve(dense, v),
                          M.pow(0.5, lam).vTMv(v), v @ M.solve(v, lam)])

    if jax.default_backend() == "cpu":
        program = str(jax.make_jaxpr(jax.jacrev(quadratic_forms))(flat))
        assert ("<function eigh at" in program) == on_host  # _host_lapack.eigh called back
    through_inverse, brute_force, through_root, through_solve = (
        jax.jacrev(quadratic_forms)(flat) @ u)
    assert np.isfinite(through_inverse)
    np.testing.assert_allclose(through_inverse, brute_force, rtol=1e-7)
    np.testing.assert_allclose(through_solve, brute_force, rtol=1e-7)
    h = 1e-6
    central = (quadratic_forms(flat + h * u) - quadratic_forms(flat - h * u)) / (2 * h)
    np.testing.assert_allclose(through_root, central[2], rtol=1e-6)


@pytest.mark.parametrize("representation", [PMatKFAC, PMatKFOC])
def test_eigenvalues_alone_from_one_host_call_inside_a_jit(representation, monkeypatch):
    """Inside a ``jit``, with chains forced for these small factors, ``eigvalsh`` takes the
    factors' eigenvalues alone from one host call (LAPACK's ``syevd`` without eigenvectors:
    ``eigvalsh`` called back, never ``eigh``): the dense matrix's eigenvalues; and
    ``∇θ log det(M + λI)`` through them (``λ̇ᵢ = vᵢᵀ Ṁ vᵢ``) is the dense brute force's."""
    from jaxgeom import _lapack
    monkeypatch.setattr(_lapack, "_cores", lambda: 2)
    monkeypatch.setattr(_lapack, "SIDE_BY_SIDE_MIN_COST", 0)
    t = make_linen_mlp()
    flat, unravel = ravel_pytree(t.params)
    lam = 0.1

    def matrix(q):
        return FIM(t.apply_fn, unravel(q), t.x, representation, variant="regression")

    spectrum = jax.jit(lambda q: matrix(q).eigvalsh())
    np.testing.assert_allclose(spectrum(flat), np.linalg.eigvalsh(matrix(flat).to_dense()),
                               atol=1e-12)
    if jax.default_backend() == "cpu":
        program = str(jax.make_jaxpr(spectrum)(flat))
        assert program.count("<function eigvalsh at") == 1
        assert "<function eigh at" not in program
    through_eigenvalues = jax.jit(jax.grad(lambda q: matrix(q).logdet(lam)))(flat)
    brute_force = jax.grad(lambda q: jnp.linalg.slogdet(
        matrix(q).to_dense() + lam * jnp.eye(flat.size))[1])(flat)
    np.testing.assert_allclose(through_eigenvalues, brute_force, rtol=1e-8, atol=1e-10)
    jax.block_until_ready(jax.jit(jax.grad(lambda q: jnp.sum(matrix(q).eigvalsh())))(flat))
    assert _lapack._ONE_THREAD._count == 0  # each hold given back, values read or not


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


def test_factors_added_in_place_by_row_blocks(monkeypatch):
    """A chunk's factor Grams added into the running total row block by row block (the
    route of large factors of few rows: here every factor, the threshold lowered, one
    example per chunk) give the same KFAC as the Grams formed and added."""
    t = make_plain_mlp()
    formed = FIM(t.apply_fn, t.params, t.x, PMatKFAC, batch_size=1)
    monkeypatch.setattr(_gram, "IN_PLACE_FROM_BYTES", 0)
    jax.clear_caches()  # the chunk's compiled step reads the threshold when traced
    in_place = FIM(t.apply_fn, t.params, t.x, PMatKFAC, batch_size=1)
    np.testing.assert_allclose(in_place.to_dense(), formed.to_dense(), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("outputs", [1, 2, 9])
def test_squared_gradient_sums_in_blocks_of_examples(outputs):
    """``Σₙₖ 𝒢ₙₖ²`` and ``Σₙₖ 𝒢ₙₖ ⊙ wₙₖ`` of the per-example gradients ``𝒢ₙₖ = Σ_t gₙₖₜ aₙₜᵀ``
    (6 examples, 5 positions), the inputs formed per example from their sources, against
    the sums of the explicit gradients: with one output per example the gradients of 3
    examples are formed at once, with 2 of 2, with 9 one example at a time."""
    n, t, a_l, g_l = 6, 5, 4, 3
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(outputs), 3)
    sources = jax.random.normal(k1, (n, t, a_l - 1))
    g = jax.random.normal(k2, (n, outputs, t, g_l))
    w = jax.random.normal(k3, (n, outputs, g_l))

    def inputs_of(s):  # the inputs with a bias column
        return jnp.concatenate([s, jnp.ones((t, 1))], axis=1)
    a = jax.vmap(inputs_of)(sources)
    grads = np.einsum("nktg,nta->nkga", g, a)
    squares, weighted = kfac_module.squared_gradient_sum(sources, g, inputs_of, w)
    np.testing.assert_allclose(squares, np.sum(grads**2, axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(weighted, np.einsum("nkga,nkg->ga", grads, w), rtol=1e-12)
    np.testing.assert_allclose(kfac_module.squared_gradient_sum(a, g), squares, rtol=1e-12)


def test_cg_solves_with_exact_damping_only_and_eigh_names_who_can(case):
    t, K, dense = case
    v = np.ones(dense.shape[0])
    for damping in ("pi", "bogus"):
        with pytest.raises(ValueError, match="damping"):
            K.solve(v, 0.1, method="cg", damping=damping)
    with pytest.raises(NotImplementedError,
                       match=r"that do: PMatDense, PMatBlockDiag, PMatLowRank(\n|$)"):
        K.eigh()


@pytest.mark.parametrize("representation", [PMatKFAC, PMatEKFAC])
def test_dtype_is_the_arrays_after_a_cast(representation):
    """``dtype`` was the parameters' dtype whatever the arrays held: a matrix cast with
    ``tree_map`` (or restored from a state of another precision) reported the old one."""
    t = make_linen_mlp()
    F = FIM(t.apply_fn, t.params, t.x, representation)
    assert F.dtype == jnp.float64
    F32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), F)
    assert F32.dtype == jnp.float32 and F32.to_dense().dtype == jnp.float32
    np.testing.assert_allclose(F32.to_dense(), F.to_dense(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("representation", ["PMatKFAC", "PMatEKFAC", "PMatMixed"])
def test_a_float64_damping_of_a_float32_matrix(representation):
    """A float32 matrix solved with a float64 ``regul`` (``np.float64``, what ``np.mean``
    answers): the solve is in float64, as the dense ones' (JAX's promotion), and equals the
    float64 matrix's to float32's accuracy; its linear-solve program had not lowered."""
    import jaxgeom

    t = make_linen_mlp()
    to32 = lambda tree: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), tree)  # noqa: E731
    params, x = to32(t.params), t.x.astype(jnp.float32)
    kw = dict(mapping={"Dense_0": PMatKFAC}) if representation == "PMatMixed" else {}
    build = lambda p, x: FIM(t.apply_fn, p, x, getattr(jaxgeom, representation), **kw)  # noqa: E731
    F32, F64 = build(params, x), build(t.params, t.x)
    v = jax.random.normal(jax.random.PRNGKey(5), (F64.size(0),))
    got = F32.solve(v.astype(jnp.float32), np.float64(1e-2))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, F64.solve(v, 1e-2), rtol=2e-4, atol=2e-4 * np.abs(got).max())


def test_a_damped_power_warns_on_a_layers_whole_spectrum():
    """A layer's eigenvalues are ``λ_G ⊗ λ_A`` (``d``, ``(g, a)``): with ``A``'s spread 10³
    and ``G``'s 10¹⁴, no row of ``d`` spans more than 10³ but the layer spans 10¹⁷, beyond
    ``1/(10·ε)``: ``pow(-1, regul)`` warns (each row checked alone, it did not); with
    ``G``'s spread 10⁶ it is silent."""
    t = make_plain_mlp(n=40)
    F = FIM(t.apply_fn, t.params, t.x, PMatKFAC)

    def spd(n, spread, seed):
        q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
        return jnp.asarray((q * np.geomspace(1.0, 1.0 / spread, n)) @ q.T)

    def with_g_spread(spread):
        factors = tuple(
            Kron(spd(node.A.shape[0], 1e3, 2 * i), spd(node.G.shape[0], spread if i == 0 else 10,
                                                      2 * i + 1))
            for i, node in enumerate(F.factors))
        return dataclasses.replace(F, factors=factors)

    assert min(node.G.shape[0] for node in F.factors[:1]) > 1
    with pytest.warns(RuntimeWarning, match=r"pow\(-1\) of a matrix singular"):
        with_g_spread(1e14).pow(-1, 1e-300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M = with_g_spread(1e6)
        dense = np.asarray(M.to_dense())
        np.testing.assert_allclose(np.asarray(M.pow(-1, 1e-300).to_dense()) @ dense,
                                   np.eye(len(dense)), atol=1e-6)


@pytest.mark.parametrize("name", ["solve", "inv"])
def test_a_factor_damped_solve_of_singular_factors_warns(name):
    """π-damped with ``regul = 0`` the Kronecker factors of fewer examples than their widths
    are singular: their Cholesky factorisations fail and the answer is NaN, which came
    without a word. Called from Python (one compiled call) it warns, once for all the
    factors, at the caller's line; damped it is silent, and the solve and the inverse's
    product agree."""
    t = make_plain_mlp(n=2)
    F = FIM(t.apply_fn, t.params, t.x, PMatKFAC)
    v = np.ones(F.size(0))
    operations = {"solve": lambda regul: F.solve(v, regul, damping="pi"),
                  "inv": lambda regul: F.inv(regul, damping="pi").mv(v)}
    with pytest.warns(RuntimeWarning, match=rf"{name} of a matrix singular.*regul > 0") as w:
        undamped = np.asarray(operations[name](0.0))
    assert [record.filename for record in w] == [__file__]
    assert not np.isfinite(undamped).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(operations[name](0.1), operations["solve"](0.1), rtol=1e-9)
