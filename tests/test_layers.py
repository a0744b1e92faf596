"""Layer discovery from the jaxpr: exact kinds, leaves, roles, ids and uses per framework.

Each case builds a tiny model, runs :meth:`LayerCollection.from_model` on one example and
compares the whole partition with the expected one: ``{id: (kind, {path: role}, uses)}``.
Discovery only needs shapes and dtypes, so parameters are abstract
(``jax.ShapeDtypeStruct`` from ``eval_shape``): nothing is compiled and the file runs fast.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from jax.flatten_util import ravel_pytree
from models import NNXMLP, LinenCNN, LinenEmbed, LinenLayerNorm, LinenMLP, make_plain_mlp

import jaxgeom as jg
from jaxgeom import LayerCollection

KEY = jax.random.PRNGKey(0)


# ----------------------------------------------------------------------------- helpers
def abstract(tree, dtype=jnp.float64):
    """The shapes of a pytree of arrays, as ``ShapeDtypeStruct`` leaves of ``dtype``."""
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(np.shape(a), dtype), tree)


def describe(layout: LayerCollection) -> dict:
    """``{id: (kind, {leaf path: role}, uses)}`` of a collection."""
    return {
        layer.id: (
            layer.kind,
            {layout.paths[i]: r for i, r in zip(layer.leaves, layer.roles)},
            layer.uses,
        )
        for layer in layout.layers
    }


def discover(apply_fn, params, *args, result=describe):
    """Discover, check the invariants every collection must satisfy, and return
    ``result(layout)`` (the :func:`describe` table by default)."""
    layout = LayerCollection.from_model(apply_fn, params, *args)
    leaves = jax.tree_util.tree_leaves(params)
    assert layout.numel() == sum(int(np.size(x)) for x in leaves)
    for layer in layout.layers:
        assert list(layer.leaves) == sorted(layer.leaves)
        assert len(layer.roles) == len(layer.leaves)
    table = layout.summary()
    for layer in layout.layers:
        assert layer.id in table
        assert str(layout.layer_numel(layer)) in table
    return result(layout)


def dense(
    prefix: str,
    kernel: str = "kernel",
    bias: str | None = "bias",
    kind: str = "dense",
    uses: int = 1,
) -> tuple:
    """Expected entry of a linear layer whose leaves live under ``prefix``."""
    join = (lambda name: f"{prefix}/{name}") if prefix else (lambda name: name)
    roles = {join(kernel): "kernel"}
    if bias is not None:
        roles[join(bias)] = "bias"
    return (kind, roles, uses)


def norm(prefix: str, scale: str = "scale", shift: str | None = "bias") -> tuple:
    roles = {f"{prefix}/{scale}": "scale"}
    if shift is not None:
        roles[f"{prefix}/{shift}"] = "shift"
    return ("norm", roles, 1)


def other(*paths: str, uses: int = 1) -> tuple:
    return ("other", {p: "param" for p in paths}, uses)


def linen(module: nn.Module, x, dtype=jnp.float64, result=describe):
    """Discover the layers of a linen module; extra collections (BatchNorm's batch_stats)
    are closed over, as in ``apply({"params": p, **rest}, x)``."""
    variables = jax.eval_shape(module.init, KEY, x)
    rest = {  # concrete, as they are constants of the model
        k: jax.tree_util.tree_map(lambda a: np.ones(a.shape, a.dtype), v)
        for k, v in variables.items()
        if k != "params"
    }

    def apply_fn(p, x):
        return module.apply({"params": p, **rest}, x)

    return discover(apply_fn, abstract(variables["params"], dtype), x, result=result)


def nnx_model(make, x) -> dict:
    """``make()`` builds the NNX model; params are the pure dict of its ``nnx.Param`` state."""
    graphdef, state = nnx.split(nnx.eval_shape(make), nnx.Param)
    params = abstract(nnx.to_pure_dict(state))
    return discover(lambda p, x: nnx.merge(graphdef, nnx.State(p))(x), params, x)


def equinox(make, x) -> dict:
    """``make()`` builds the Equinox module; it is per-example, so ``apply_fn`` vmaps it."""
    module = eqx.filter_eval_shape(make)
    params, static = eqx.partition(module, lambda a: isinstance(a, jax.ShapeDtypeStruct))
    return discover(lambda p, x: jax.vmap(eqx.combine(p, static))(x), abstract(params), x)


def plain(**shapes) -> dict:
    """Abstract float64 parameters of a plain-``jnp`` model, by name."""
    return {name: jax.ShapeDtypeStruct(shape, jnp.float64) for name, shape in shapes.items()}


# ----------------------------------------------------------------------------- test models
def test_models_of_the_test_suite():
    """The linen / NNX models of ``tests/models.py``, one example each."""
    assert linen(LinenMLP(), np.ones((1, 3))) == {
        "Dense_0": dense("Dense_0"),
        "Dense_1": dense("Dense_1"),
    }
    assert linen(LinenCNN(), np.ones((1, 6, 6, 2))) == {
        "Conv_0": dense("Conv_0", kind="conv"),
        "Conv_1": dense("Conv_1", kind="conv"),
        "Dense_0": dense("Dense_0"),
    }
    assert linen(LinenLayerNorm(), np.ones((1, 4))) == {
        "Dense_0": dense("Dense_0"),
        "LayerNorm_0": norm("LayerNorm_0"),
        "Dense_1": dense("Dense_1"),
    }
    assert linen(LinenEmbed(), np.zeros((1, 4), np.int64)) == {
        "Embed_0": ("embedding", {"Embed_0/embedding": "table"}, 1),
        "Dense_0": dense("Dense_0"),
    }
    assert nnx_model(lambda: NNXMLP(nnx.Rngs(0)), np.ones((1, 3))) == {
        "l1": dense("l1"),
        "l2": dense("l2"),
    }


# ----------------------------------------------------------------------------- flax linen
def test_linen_conv_transpose_and_batchnorm_eval():
    """``transpose_kernel=True`` flips the kernel with ``rev``: still a view of the kernel."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(3, (3, 3), strides=(2, 2), padding="SAME")(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.ConvTranspose(2, (3, 3), strides=(2, 2))(nn.relu(x))
            x = nn.ConvTranspose(2, (2, 3), strides=(2, 1), transpose_kernel=True)(x)
            x = x.reshape(x.shape[0], -1, 2)
            return nn.ConvTranspose(2, (3,), strides=(2,), transpose_kernel=True)(x)  # 1-D

    got = linen(Net(), np.ones((1, 6, 6, 2)))
    assert got == {
        "Conv_0": dense("Conv_0", kind="conv"),
        "BatchNorm_0": norm("BatchNorm_0"),
        **{f"ConvTranspose_{i}": dense(f"ConvTranspose_{i}", kind="conv") for i in range(3)},
    }


def test_linen_dense_general_and_attention():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.DenseGeneral((2, 3), axis=-1)(x)  # kernel (4, 2, 3)
            x = nn.DenseGeneral(4, axis=(-2, -1))(x)  # kernel (2, 3, 4): two contracting dims
            return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(x)

    got = linen(Net(), np.ones((1, 3, 4)))
    mha = "MultiHeadDotProductAttention_0"
    assert got == {
        "DenseGeneral_0": dense("DenseGeneral_0"),
        "DenseGeneral_1": dense("DenseGeneral_1"),
        **{f"{mha}/{p}": dense(f"{mha}/{p}") for p in ("query", "key", "value", "out")},
    }


def test_linen_float32_params_under_x64_and_bf16_compute():
    """Casts inserted by dtype promotion (f32 params, f64 inputs) or by ``dtype=`` are views."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.LayerNorm()(nn.Dense(5)(x))
            return nn.Dense(3, dtype=jnp.bfloat16)(x)

    got = linen(Net(), np.ones((1, 4)), dtype=jnp.float32)
    assert got == {
        "Dense_0": dense("Dense_0"),
        "LayerNorm_0": norm("LayerNorm_0"),
        "Dense_1": dense("Dense_1"),
    }


def test_linen_remat_jit_and_checkpoint():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.remat(nn.Dense)(5)(x)
            return nn.Dense(3)(x)

    module = Net()
    x = np.ones((1, 4))
    params = abstract(jax.eval_shape(module.init, KEY, x)["params"])

    def apply_fn(p, x):
        return module.apply({"params": p}, x)

    # nn.remat names its submodule like the wrapped class (Dense → "CheckpointDense_0").
    expected = {
        "CheckpointDense_0": dense("CheckpointDense_0"),
        "Dense_0": dense("Dense_0"),
    }
    assert discover(apply_fn, params, x) == expected
    assert discover(jax.jit(apply_fn), params, x) == expected
    assert discover(jax.checkpoint(apply_fn), params, x) == expected


def test_linen_scan_shares_one_kernel_over_steps():
    class Cell(nn.Module):
        @nn.compact
        def __call__(self, carry, x):
            h = jnp.tanh(nn.Dense(3)(x) + carry)
            return h, h

    class Net(nn.Module):
        @nn.compact
        def __call__(self, xs):
            scan = nn.scan(
                Cell,
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=1,
                out_axes=1,
            )
            return scan()(jnp.zeros((xs.shape[0], 3)), xs)[1]

    got = linen(Net(), np.ones((1, 4, 3)))
    assert got == {"ScanCell_0/Dense_0": dense("ScanCell_0/Dense_0")}


def test_tied_embedding_is_one_shared_embedding_layer():
    """A table used by a gather and by a dot_general (tied read-out): one layer of the kind
    of its first use, 2 uses, both operations listed; not Kronecker-factorable."""

    class Net(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            embed = nn.Embed(7, 3)
            h = nn.LayerNorm(use_bias=False)(embed(tokens))
            return embed.attend(h)

    layout = linen(Net(), np.zeros((1, 4), np.int32), result=lambda lc: lc)
    assert describe(layout) == {
        "Embed_0": ("embedding", {"Embed_0/embedding": "table"}, 2),
        "LayerNorm_0": norm("LayerNorm_0", shift=None),
    }
    embed, layer_norm = layout.layers
    assert embed.ops == ("gather", "dot_general")
    assert embed.kronecker_obstacle == (
        "its kernel is consumed by 2 operations (gather, dot_general)")
    assert layer_norm.ops == () and layer_norm.kronecker_obstacle is None
    assert "embedding (x2)" in layout.summary()


# ----------------------------------------------------------------------------- nnx
def test_nnx_layers():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(7, 4, rngs=rngs)
            self.conv = nnx.Conv(4, 3, kernel_size=(2,), rngs=rngs)
            self.norm = nnx.LayerNorm(3, rngs=rngs)
            self.head = nnx.Linear(3, 2, rngs=rngs)

        def __call__(self, tokens):
            x = self.norm(self.conv(self.embed(tokens)))
            return self.head(x.mean(axis=1))

    got = nnx_model(lambda: Net(nnx.Rngs(0)), np.zeros((1, 5), np.int32))
    assert got == {
        "embed": ("embedding", {"embed/embedding": "table"}, 1),
        "conv": dense("conv", kind="conv"),
        "norm": norm("norm"),
        "head": dense("head"),
    }


def test_a_prng_key_in_the_params_is_refused_by_name_and_the_nnx_split_of_params_builds():
    """A model holding ``nnx.Rngs`` (dropout) puts a PRNG key in ``nnx.split(model)``'s
    state: refused, naming the leaf and the split that works, which builds the Fisher
    of the same model (the dropout off) as a plain function of its parameters."""
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(3, 4, param_dtype=jnp.float64, rngs=rngs)
            self.dropout = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
            self.head = nnx.Linear(4, 2, param_dtype=jnp.float64, rngs=rngs)

        def __call__(self, x):
            return self.head(self.dropout(jnp.tanh(self.hidden(x))))

    model = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    graphdef, state = nnx.split(model)
    with pytest.raises(ValueError, match=r"'dropout/rngs/.*key.*PRNG key.*nnx.Param"):
        jg.FIM(lambda s, x: nnx.merge(graphdef, s)(x), state, (x,), jg.PMatDiag)
    with pytest.raises(ValueError, match=r"params leaf 'seed' .*PRNG key"):
        LayerCollection.from_params({"w": jnp.ones(3), "seed": jax.random.key(0)})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    fisher = jg.FIM(lambda p, x: nnx.merge(graphdef, p, rest)(x), params, (x,), jg.PMatDense)

    def logits(w, xn):  # the same network as a function of the flat float parameters
        return nnx.merge(graphdef, unravel(w), rest)(xn[None])[0]

    flat, unravel = ravel_pytree(params)
    jac = jax.vmap(jax.jacrev(logits), (None, 0))(flat, x)  # (N, K, d)
    p = jax.nn.softmax(jax.vmap(logits, (None, 0))(flat, x))
    want = jnp.einsum("nki,nk,nkj->ij", jac, p, jac) - jnp.einsum(
        "nki,nk,nl,nlj->ij", jac, p, p, jac)
    np.testing.assert_allclose(fisher.to_dense(), want / len(x), rtol=1e-10, atol=1e-12)


def test_the_layer_table_names_leaves_by_their_path_below_the_layer():
    """An NNX state of ``nnx.Param`` variables has paths ``l1/kernel/value``: the table
    names the leaf ``kernel/value``, not ``value``; a pure dict's ``l1/kernel``: ``kernel``."""
    graphdef, state = nnx.split(NNXMLP(nnx.Rngs(0)), nnx.Param)
    x = np.ones((1, 3))
    wrapped = LayerCollection.from_model(lambda s, x: nnx.merge(graphdef, s)(x), state, x)
    assert "bias/value[5], kernel/value[3, 5]" in wrapped.summary()
    pure = LayerCollection.from_model(lambda s, x: nnx.merge(graphdef, nnx.State(s))(x),
                                      nnx.to_pure_dict(state), x)
    assert "bias[5], kernel[3, 5]" in pure.summary()


# ----------------------------------------------------------------------------- equinox
def test_equinox_layers():
    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        norm: eqx.nn.LayerNorm
        mlp: eqx.nn.MLP

        def __call__(self, x):
            h = self.conv(x).mean(axis=(1, 2))
            return self.mlp(self.norm(h))

    def make():
        k1, k2 = jax.random.split(KEY)
        return Net(
            eqx.nn.Conv2d(2, 3, 3, padding=1, key=k1),
            eqx.nn.LayerNorm(3),
            eqx.nn.MLP(3, 2, width_size=4, depth=1, key=k2),
        )

    got = equinox(make, np.ones((1, 2, 5, 5)))
    assert got == {
        "conv": dense("conv", kernel="weight", kind="conv"),
        "norm": norm("norm", scale="weight", shift="bias"),
        "mlp/layers/0": dense("mlp/layers/0", kernel="weight"),
        "mlp/layers/1": dense("mlp/layers/1", kernel="weight"),
    }
    assert equinox(lambda: eqx.nn.Embedding(5, 3, key=KEY), np.zeros((1,), np.int32)) == {
        "weight": ("embedding", {"weight": "table"}, 1)
    }


# ----------------------------------------------------------------------------- plain jnp
def test_plain_einsum_and_lax_conv():
    params = plain(conv_w=(3, 2, 3, 3), conv_b=(3,), proj_w=(2, 3, 5), proj_b=(5,))

    def apply_fn(p, x):  # x: (N, 2, 6, 6), NCHW / OIHW
        h = jax.lax.conv(x, p["conv_w"], (1, 1), "SAME") + p["conv_b"][None, :, None, None]
        h = h.reshape(x.shape[0], 3, 2, 18).mean(-1)  # (N, 3, 2)
        return jnp.einsum("nij,jik->nk", h, p["proj_w"]) + p["proj_b"]

    got = discover(apply_fn, params, np.ones((1, 2, 6, 6)))
    assert got == {
        "conv_w": dense("", "conv_w", "conv_b", kind="conv"),
        "proj_w": dense("", "proj_w", "proj_b"),
    }


def test_plain_lax_scan_over_time():
    params = plain(w_x=(3, 4), w_h=(4, 4), b=(4,), w_out=(4, 2))

    def apply_fn(p, xs):  # xs: (N, T, 3)
        def step(h, x):
            h = jnp.tanh(x @ p["w_x"] + h @ p["w_h"] + p["b"])
            return h, h

        h, _ = jax.lax.scan(step, jnp.zeros((xs.shape[0], 4)), xs.swapaxes(0, 1))
        return h @ p["w_out"]

    got = discover(apply_fn, params, np.ones((1, 5, 3)))
    # the bias is added to a sum of two linear ops: it belongs to neither
    assert got == {
        "w_x": dense("", "w_x", None),
        "w_h": dense("", "w_h", None),
        "b": other("b"),
        "w_out": dense("", "w_out", None),
    }


def test_unused_shared_and_conflicting_leaves():
    params = plain(w=(3, 3), b=(3,), skip=(3,), unused=(2,), g=(3, 3), t=(3,))

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])  # w: dense, used twice; b: its bias
        h = jnp.tanh(h @ p["w"]) + p["skip"]  # a lone shift: other
        h = h @ (p["g"] / jnp.sqrt(jnp.sum(p["g"] ** 2)))  # weight norm: not a view (2 uses)
        return h * p["t"] + p["t"]  # t as scale and as shift: conflicting roles

    got = discover(apply_fn, params, np.ones((1, 3)))
    assert got == {
        "w": dense("", "w", "b", uses=2),
        "skip": other("skip"),
        "unused": other("unused", uses=0),
        "g": other("g", uses=2),
        "t": other("t", uses=2),
    }


def test_shared_kernel_with_two_biases_keeps_neither():
    """Each use of a shared kernel adds its own bias: ambiguous, so both biases are other."""
    params = plain(w=(3, 3), b1=(3,), b2=(3,))

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w"] + p["b1"]) @ p["w"] + p["b2"]

    got = discover(apply_fn, params, np.ones((1, 3)))
    assert got == {"w": dense("", "w", None, uses=2), "b1": other("b1"), "b2": other("b2")}


def test_a_bias_is_on_the_features_of_an_output_read_by_the_bias_alone():
    """A leaf added to a linear op's output is its bias only if it lies on the op's feature
    dimensions (a per-position offset of the same size is not) and nothing but that add
    reads the pre-bias output (a skip from ``x @ w`` gives the bias another gradient)."""
    params = plain(w=(4, 3), pos=(3, 1), v=(3, 3), c=(3,), u=(3, 2), e=(2,), k=(3, 2, 2),
                   f=(2, 2))

    def apply_fn(p, x):  # x: (N, T=3, 4)
        h = jnp.tanh(x @ p["w"] + p["pos"])  # pos: (T, 1), one offset per position
        z = h @ p["v"]
        h = jnp.tanh(z + p["c"]) + z  # the pre-bias output read twice
        g = jnp.einsum("ntd,def->ntef", h, p["k"]) + p["f"]  # a 2-D bias on 2 features
        s = jnp.transpose(h @ p["u"], (0, 2, 1)) + p["e"][:, None]  # features moved first
        return jnp.sum(g, axis=(1, 2)) + jnp.sum(s, axis=2)

    got = discover(apply_fn, params, np.ones((1, 3, 4)))
    assert got == {
        "w": dense("", "w", None), "pos": other("pos"),
        "v": dense("", "v", None), "c": other("c"),
        "k": dense("", "k", "f"),
        "u": dense("", "u", "e"),
    }


def test_higher_order_primitives_make_leaves_other():
    params = plain(w=(3, 3), v=(3, 3), c=(3,), wg=(3, 1, 1))

    @jax.custom_vjp
    def fused(w, x):
        return x @ w

    fused.defvjp(lambda w, x: (x @ w, (w, x)), lambda res, g: (res[1].T @ g, g @ res[0].T))

    def apply_fn(p, x):
        h = fused(p["w"], x)  # custom_vjp: traced through, a dense use
        h = jax.lax.while_loop(lambda c: c[0] < 2, lambda c: (c[0] + 1, c[1] @ p["v"]), (0, h))[1]
        h = jax.lax.cond(h.sum() > 0, lambda h: h + p["c"], lambda h: h, h)  # cond: other
        # depthwise (grouped) conv: a conv layer, but not a single Kronecker product
        return jax.lax.conv_general_dilated(
            h[:, :, None],
            p["wg"],
            (1,),
            "SAME",
            dimension_numbers=("NCH", "OIH", "NCH"),
            feature_group_count=3,
        )

    layout = discover(apply_fn, params, np.ones((1, 3)), result=lambda lc: lc)
    assert describe(layout) == {
        "w": dense("", "w", None),
        "v": other("v"),
        "c": other("c"),
        "wg": dense("", "wg", None, kind="conv"),
    }
    grouped = layout.layer("wg")
    assert grouped.ops == ("conv_general_dilated with feature_group_count=3",)
    assert grouped.kronecker_obstacle == (
        "it is a grouped convolution (conv_general_dilated with feature_group_count=3)")
    assert layout.layer("w").kronecker_obstacle is None
    assert "conv (grouped)" in layout.summary()


def test_collisions_fall_back_to_full_paths():
    """Two kernels under one parent (no biases) get their full paths as ids."""
    params = {"block": plain(a=(3, 3), b=(3, 2))}

    def apply_fn(p, x):
        return jnp.tanh(x @ p["block"]["a"]) @ p["block"]["b"]

    got = discover(apply_fn, params, np.ones((1, 3)))
    assert got == {
        "block/a": dense("block", "a", None),
        "block/b": dense("block", "b", None),
    }


def test_params_passed_for_a_layer_collection_are_refused_by_name():
    """The parameters where a LayerCollection is expected: a TypeError naming the fix."""
    t = make_plain_mlp(n=2)
    d = sum(leaf.size for leaf in jax.tree_util.tree_leaves(t.params))
    fix = r"must be a LayerCollection .*got a dict.*LayerCollection.from_model"
    for who, build in [
        ("PMatDense's layer_collection", lambda: jg.PMatDense(t.params, jnp.eye(d))),
        ("PMatEye's layer_collection", lambda: jg.PMatEye(t.params, 1.0)),
        ("layer_collection", lambda: jg.FIM(t.apply_fn, t.params, t.x, jg.PMatDense,
                                            layer_collection=t.params)),
    ]:
        with pytest.raises(TypeError, match=f"^{who} {fix}"):
            build()
