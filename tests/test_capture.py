"""Capture of layer inputs and output gradients: per-example gradients rebuilt from the
captured ``(a, g)`` equal those of ``jax.vmap(jax.jacrev(fn))`` exactly (float64), for every
framework and layer type, also under ``jax.jit``, inside ``jit``/``remat``/``scan``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from models import ALL_TASKS, MORE_TASKS, reference_fisher, to_float64

from jaxgeom import FIM, LayerCollection, PMatDense, PMatDiag
from jaxgeom._discovery import scan_counts
from jaxgeom.capture import (
    KroneckerSpec,
    capture,
    capture_chunk,
    example_gradients,
    make_plan,
)
from jaxgeom.jacobian import Hashable
from jaxgeom.variants import FisherOutputs, MonteCarloFisherOutputs

KEY = jax.random.PRNGKey(0)


def reference(fn, params, x, aux=None):
    n = jax.tree_util.tree_leaves(x)[0].shape[0]
    jac = jax.jit(jax.vmap(jax.jacrev(fn), in_axes=(None, 0, 0, None)))(
        params, x, jnp.arange(n), aux)
    return jax.tree_util.tree_leaves(jac)


def check(apply_fn, params, x, expect, *, aux=None, fn=None, jit=False):
    """Rebuild every leaf's per-example gradients from the capture and compare them with
    the brute-force ones; ``expect`` lists the captured layer ids."""
    layout = LayerCollection.from_model(apply_fn, params, jax.tree_util.tree_map(
        lambda a: a[:1], x))
    fn = fn or FisherOutputs(Hashable(apply_fn), "classif_logits")
    if jit:
        example = jax.tree_util.tree_map(lambda a: a[0], x)
        plan = make_plan(fn, params, example, aux, layout)
        got = jax.jit(capture_chunk, static_argnums=0)(plan, params, x, jnp.asarray(0), aux)
    else:
        plan, got = capture(fn, params, x, layer_collection=layout, aux=aux)
    assert sorted(s.layer_id for s in plan.specs) == sorted(expect)
    ref = reference(fn, params, x, aux)
    for spec, a, g in zip(plan.specs, got.inputs, got.grads):
        assert g.ndim == 4 and g.shape[-1] == spec.out_features
        rebuilt = example_gradients(spec, a, g)
        np.testing.assert_allclose(rebuilt["kernel"], ref[spec.kernel], rtol=1e-12, atol=1e-13)
        if spec.bias is not None:
            bias = ref[spec.bias].reshape(rebuilt["bias"].shape)
            np.testing.assert_allclose(rebuilt["bias"], bias, rtol=1e-12, atol=1e-13)
    for i, (a, source) in enumerate(zip(got.inputs, got.sources)):  # inputs from sources
        np.testing.assert_array_equal(jax.vmap(plan.inputs_from(i))(source), a)
    n, k = got.outputs.shape
    other = [ref[i].reshape(n, k, -1) for i in plan.other_leaves]
    if other:
        np.testing.assert_allclose(got.other, np.concatenate(other, axis=2), rtol=1e-12)
    return plan, got


def linen(module, x, seed=0):
    params = to_float64(module.init(jax.random.PRNGKey(seed), x)["params"])
    return (lambda p, x: module.apply({"params": p}, x)), params


# ----------------------------------------------------------------------------- test models
@pytest.mark.parametrize("name", ["linen_embed", "linen_layernorm", "linen_mlp", "plain_mlp"])
def test_models_of_the_suite(name):  # conv, NNX and Equinox models: dedicated tests below
    t = ALL_TASKS[name]()
    kron = [lyr.id for lyr in LayerCollection.from_model(t.apply_fn, t.params, t.x[:1]).layers
            if lyr.kind in ("dense", "conv", "embedding")]
    plan, _ = check(t.apply_fn, t.params, t.x, kron)
    if name == "linen_layernorm":
        assert plan.other_leaves  # the norm's scale and shift: exact gradients


# ----------------------------------------------------------------------------- linen
def test_linen_convolutions_stride_padding_dilation_transposed():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Conv(3, (3, 3), strides=(2, 2), padding=((2, 1), (0, 1)))(x))
            x = nn.tanh(nn.Conv(2, (2, 3), kernel_dilation=(2, 1), padding="SAME")(x))
            x = nn.tanh(nn.ConvTranspose(2, (3, 2), strides=(2, 1), use_bias=False)(x))
            x = nn.Conv(2, (3,), padding="CIRCULAR")(x.reshape(x.shape[0], -1, 2))  # 1-D
            return x.reshape(x.shape[0], -1)[:, :4]

    x = jax.random.normal(KEY, (3, 7, 6, 2))
    apply_fn, params = linen(Net(), x)
    plan, got = check(apply_fn, params, x, ["Conv_0", "Conv_1", "ConvTranspose_0", "Conv_2"])
    # a convolution's source is its padded input (7 + 2 + 1 rows, 6 + 0 + 1 columns), the
    # patches (2 × 3 × 3 features at 4 × 3 locations) are formed from it by their consumer
    first = [s.layer_id for s in plan.specs].index("Conv_0")
    assert got.sources[first].shape == (3, 1, 10, 7, 2)
    assert got.inputs[first].shape == (3, 4 * 3, 2 * 3 * 3)


def test_linen_embed_and_sequence_dense():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            h = nn.Embed(9, 4)(tokens)  # (N, T, 4)
            h = nn.tanh(nn.Dense(5)(h))  # dense over a sequence: weight sharing, T > 1
            return nn.DenseGeneral(3, axis=(-2, -1))(h)  # two contracting dims

    tokens = jax.random.randint(KEY, (4, 5), 0, 9)
    apply_fn, params = linen(Net(), tokens)
    plan, got = check(apply_fn, params, tokens, ["DenseGeneral_0", "Dense_0", "Embed_0"])
    assert got.inputs[1].shape == (4, 5, 4)  # (n, T, a_l)
    assert got.inputs[2].shape == (4, 5)  # row ids
    (spec,) = [s for s in plan.specs if s.layer_id == "DenseGeneral_0"]
    kernel = params["DenseGeneral_0"]["kernel"]  # (5, 5, 3): (in, in, out)
    np.testing.assert_array_equal(spec.kernel_to_matrix(kernel), kernel.reshape(25, 3).T)
    np.testing.assert_array_equal(spec.kernel_from_matrix(spec.kernel_to_matrix(kernel)), kernel)


def test_remat_and_monte_carlo_outputs():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.remat(nn.Dense)(5)(x))

    x = jax.random.normal(KEY, (4, 3))
    apply_fn, params = linen(Net(), x)
    fn = MonteCarloFisherOutputs(Hashable(apply_fn), "classif_logits", 2)
    check(apply_fn, params, x, ["CheckpointDense_0", "Dense_0"], fn=fn, aux=(KEY, None))


# ----------------------------------------------------------------------------- more layers
@pytest.mark.parametrize("name", sorted(MORE_TASKS))
def test_more_layers(name):
    """Transposed convolutions with flipped (``rev``) kernels, 2-D and 1-D; a transformer
    block (attention projections with several contracting/free dims, an MLP over the
    sequence; captured under ``jax.jit``); NNX Linear/Conv; Equinox Linear/Conv2d
    (``(out, in)``/``OIHW`` kernels); a recurrent layer in ``scan(..., reverse=True)``."""
    t = MORE_TASKS[name]()
    layout = LayerCollection.from_model(t.apply_fn, t.params, t.x[:1])
    kron = [lyr.id for lyr in layout.layers if lyr.kind in ("dense", "conv")]
    jit = name == "linen_transformer"
    plan, got = check(jax.jit(t.apply_fn) if jit else t.apply_fn, t.params, t.x, kron, jit=jit)
    if name == "plain_reverse_scan":  # T = 3 scan steps, captured in the order of the steps
        (spec,) = [s for s in plan.specs if s.layer_id == "w"]
        i = plan.specs.index(spec)
        np.testing.assert_array_equal(got.inputs[i], t.x)  # a_t = x_t, (n, T, 3)
    # per-example gradients are formed in the kernel's memory order: Equinox's (out, in) and
    # OIHW kernels are the (g, a) layer matrix, Flax's (in, out) and HWIO its transpose;
    # a transposed convolution's flipped (rev) kernel is neither (reordered)
    orders = {s.layer_id: s.memory_order for s in plan.specs}
    if name == "equinox_cnn":
        assert set(orders.values()) == {"ga"}
    if name in ("nnx_cnn", "linen_transformer"):
        assert "ag" in orders.values()
    if name == "linen_conv_transpose":
        assert None in orders.values()


# ----------------------------------------------------------------------------- plain jnp
def test_plain_mlp_scan_and_lax_conv():
    k = jax.random.split(KEY, 6)
    params = {
        "conv_w": jax.random.normal(k[0], (3, 2, 2, 2)),  # OIHW
        "conv_b": jax.random.normal(k[1], (3,)),
        "w_x": jax.random.normal(k[2], (4, 4)),
        "w_h": jax.random.normal(k[3], (4, 4)) / 2,
        "w_out": jax.random.normal(k[4], (3, 4)),  # (out, in): used as x @ w.T
        "b_out": jax.random.normal(k[5], (3,)),
    }

    def apply_fn(p, x):  # x: (N, 2, 3, 4) NCHW
        h = jax.lax.conv_general_dilated(x, p["conv_w"], (1, 1), "VALID", rhs_dilation=(1, 2))
        h = h + p["conv_b"][None, :, None, None]  # (N, 3, 2, 2)
        xs = jnp.tanh(h).reshape(x.shape[0], 3, 4).swapaxes(0, 1)  # (T=3, N, 4)

        def step(c, xt):
            c = jnp.tanh(xt @ p["w_x"] + c @ p["w_h"])
            return c, None

        c, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 4)), xs)
        return c @ p["w_out"].T + p["b_out"]

    x = jax.random.normal(KEY, (3, 2, 3, 4))
    plan, _ = check(apply_fn, params, x, ["conv_w", "w_h", "w_out", "w_x"])
    (spec,) = [s for s in plan.specs if s.layer_id == "w_out"]  # used transposed: (out, in)
    np.testing.assert_array_equal(spec.kernel_to_matrix(params["w_out"]), params["w_out"])


def _offsets_and_skips(p, x, skip=True):  # x: (N, T=3, 4)
    h = jnp.tanh(x @ p["w"] + p["pos"])  # pos: (T, 1), one offset per position
    z = h @ p["v"]
    h = jnp.tanh(z + p["c"]) + (z if skip else 0)  # the pre-bias output read twice
    g = jnp.einsum("ntd,def->ntef", h, p["k"]) + p["f"]  # a bias on 2 feature dims
    s = jnp.transpose(h @ p["u"], (0, 2, 1)) + p["e"][:, None]  # features moved first
    return jnp.sum(g, axis=(1, 2)) + jnp.sum(s, axis=2)


def test_offsets_that_are_no_bias_keep_exact_gradients():
    """A per-position offset the size of the features, and a bias whose op output is also
    read by a skip, are exact leaves (captured as biases, their gradients had been the
    op output's summed over the wrong axis, or with the skip's share in them)."""
    shapes = dict(w=(4, 3), pos=(3, 1), v=(3, 3), c=(3,), u=(3, 2), e=(2,), k=(3, 2, 2),
                  f=(2, 2))
    keys = jax.random.split(KEY, len(shapes))
    params = {n: jax.random.normal(k, s) / 2 for k, (n, s) in zip(keys, shapes.items())}
    x = jax.random.normal(KEY, (4, 3, 4))
    plan, _ = check(_offsets_and_skips, params, x, ["w", "v", "k", "u"])
    assert {s.layer_id: s.bias is not None for s in plan.specs} == {
        "w": False, "v": False, "k": True, "u": True}
    for representation in (PMatDense, PMatDiag):  # both were wrong
        F = FIM(_offsets_and_skips, params, x, representation).to_dense()
        reference = np.asarray(reference_fisher(_offsets_and_skips, params, x))
        if representation is PMatDiag:
            reference = np.diag(np.diag(reference))
        np.testing.assert_allclose(F, reference, rtol=1e-10, atol=1e-12)
    # a layout found without the skip (c a bias), applied to the function with it: the
    # captured trace's own reads refuse the layer rather than give c the wrong gradient
    layout = LayerCollection.from_model(
        lambda p, x: _offsets_and_skips(p, x, skip=False), params, x[:1])
    fn = FisherOutputs(Hashable(_offsets_and_skips), "classif_logits")
    plan, _ = capture(fn, params, x, layer_collection=layout)
    assert "v" not in {s.layer_id for s in plan.specs}
    ((layer, reason),) = plan.unfactored
    assert layer == "v" and "reads its operation's output" in reason


def test_scan_operands_split_into_consts_carry_and_xs():
    """The scan's operand counts, read from its params (JAX < 0.11) or its flat tree of
    operands (JAX >= 0.11): consts (w, b), carry (h0, c0), xs."""
    def f(w, b, h0, c0, xs):
        def step(hc, x):
            h, c = hc
            return (jnp.tanh(h @ w + x + b), c + h), h
        return jax.lax.scan(step, (h0, c0), xs)

    jaxpr = jax.make_jaxpr(f)(jnp.ones((3, 3)), jnp.ones(3), jnp.ones(3), jnp.ones(3),
                              jnp.ones((4, 3)))
    (eqn,) = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(eqn.invars) == 5
    assert scan_counts(eqn) == (2, 2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(
    "window, strides, padding, lhs_dilation, rhs_dilation",
    [
        ((3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1), (1, 1)),
        ((2, 3), (2, 1), ((0, 1), (2, 0)), (1, 1), (2, 1)),
        ((3, 2), (1, 2), ((1, 2), (0, 0)), (2, 3), (1, 2)),   # transposed-conv input dilation
        ((2, 2), (3, 2), ((-1, 1), (1, -1)), (1, 1), (1, 1)),  # negative padding crops
        ((3,), (2,), ((1, 0),), (2,), (2,)),                   # 1-D
    ],
)
def test_conv_patches_match_lax(window, strides, padding, lhs_dilation, rhs_dilation,
                                channels_last):
    """The captured input rows of a convolution == ``conv_general_dilated_patches`` (the
    identity-kernel convolution) with the features put in the kernel's ascending dimension
    order, one row per output location: for strides, paddings, both dilations, 1-D and
    2-D, channels-first (``OIHW`` kernels) and channels-last (``HWIO``) layouts."""
    from jaxgeom.capture import _conv_patches, _conv_source

    sp = "HW"[: len(window)]
    lhs, rhs = ("N" + sp + "C", sp + "IO") if channels_last else ("NC" + sp, "OI" + sp)
    x_nc = jax.random.normal(jax.random.key(0), (2, 3) + (7,) * len(window))
    x = jnp.moveaxis(x_nc, 1, -1) if channels_last else x_nc
    kernel = jnp.zeros(tuple(dict(O=4, I=3, **dict(zip(sp, window)))[c] for c in rhs))

    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, strides, padding, lhs_dilation,
                                            rhs_dilation, dimension_numbers=(lhs, rhs, lhs))

    (eqn,) = [e for e in jax.make_jaxpr(conv)(x, kernel).jaxpr.eqns
              if e.primitive.name == "conv_general_dilated"]
    got = _conv_patches(eqn, _conv_source(eqn, x))

    patches = jax.lax.conv_general_dilated_patches(
        x_nc, window, strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        precision=jax.lax.Precision.HIGHEST,
    )  # (N, C·prod(window), *out), features (C, window...)
    rows = jnp.moveaxis(patches, 1, -1).reshape(-1, 3, *window)
    kernel_order = np.argsort([rhs.index(c) for c in "I" + sp])  # (I, spatial) ascending
    expected = jnp.transpose(rows, (0, *(1 + kernel_order))).reshape(rows.shape[0], -1)
    np.testing.assert_array_equal(got, expected)


def test_kernel_views_that_repeat_an_entry_are_not_a_reindexing():
    """A layer matrix is the kernel re-indexed one-to-one: a transpose is (its index is
    the permutation), a broadcast that repeats the kernel's entries is not (``None``)."""
    def spec(views, operand_shape):
        return KroneckerSpec("l", "dense", 0, None, (2, 3), views, operand_shape, (0,), (1,))

    kernel = np.arange(6).reshape(2, 3)
    transposed = spec((("transpose", (1, 0)),), (3, 2))
    # the operand is Wᵀ, its free dimension 1 runs over W's rows: the layer matrix is W
    np.testing.assert_array_equal(transposed.index, kernel)
    np.testing.assert_array_equal(transposed.kernel_to_matrix(jnp.asarray(kernel)), kernel)
    repeated = spec((("reshape", (1, 6)), ("broadcast", ((2, 6), (0, 1)))), (2, 6))
    assert repeated.index is None
