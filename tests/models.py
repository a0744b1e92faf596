"""Small models in every supported framework, and float64 brute-force references.

Each ``make_*`` returns a :class:`Task`: ``apply_fn(params, x)`` batched, ``params``, a
batch ``x`` of inputs, integer labels ``y`` and the number of outputs. Models are tiny
(tens to a few hundred parameters) so that dense references are cheap.

Tasks are built once per process (``make_*`` are cached: the same arguments give the same
``Task``, never to be mutated), so that what is compiled for a model (its reference, the
library's per-function caches) is reused by every test of a worker; the brute-force
references of a task's own ``(params, x)`` are computed once too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import nnx


@dataclasses.dataclass
class Task:
    name: str
    apply_fn: Callable
    params: Any
    x: Any
    y: Any
    num_outputs: int


def to_float64(tree):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64), tree)


def _labels(key, n, c):
    return jax.random.randint(key, (n,), 0, c)


# ----------------------------------------------------------------------------- linen
class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(6)(x))
        return nn.Dense(4)(x)


class LinenCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(3, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))(x))
        x = nn.Conv(2, (2, 2), padding="VALID")(x)
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(3)(x)


class LinenLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(5)(x)
        x = nn.LayerNorm()(x)
        return nn.Dense(3)(nn.tanh(x))


class LinenEmbed(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        e = nn.Embed(7, 3)(tokens)  # (N, T, 3)
        return nn.Dense(3)(jnp.tanh(e).mean(axis=1))


def _linen(name, module, x, key, c):
    k1, k2 = jax.random.split(key)
    params = to_float64(module.init(k1, x)["params"])

    def apply_fn(p, x):
        return module.apply({"params": p}, x)

    return Task(name, apply_fn, params, x, _labels(k2, x.shape[0], c), c)


@functools.cache
def make_linen_mlp(seed=0, n=7):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(jax.random.PRNGKey(1), (n, 3))
    return _linen("linen_mlp", LinenMLP(), x, key, 4)


@functools.cache
def make_linen_cnn(seed=0, n=5):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(jax.random.PRNGKey(2), (n, 6, 6, 2))
    return _linen("linen_cnn", LinenCNN(), x, key, 3)


@functools.cache
def make_linen_layernorm(seed=0, n=6):
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(jax.random.PRNGKey(3), (n, 4))
    return _linen("linen_layernorm", LinenLayerNorm(), x, key, 3)


@functools.cache
def make_linen_embed(seed=0, n=6):
    key = jax.random.PRNGKey(seed)
    tokens = jax.random.randint(jax.random.PRNGKey(4), (n, 4), 0, 7)
    return _linen("linen_embed", LinenEmbed(), tokens, key, 3)


@functools.cache
def make_linen_wide_mlp(seed=0, n=6):
    """A 150-input dense layer seen on 6 examples: its KFAC input factor (151², with the
    bias) has rank ≤ 6, small enough for the range-only eigendecomposition
    (:func:`jaxgeom.pmat._spectral.eigh_psd`); the other factors are of full rank."""
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(jax.random.PRNGKey(5), (n, 150))
    return _linen("linen_wide_mlp", LinenMLP(), x, key, 4)


@functools.cache
def make_linen_narrow_mlp(seed=0, n=6):
    """A 40-input dense layer seen on 6 examples: its KFAC input factor (41², with the bias)
    has rank ≤ 6, factorised on a range of that width — no sketch at this order, no margin
    (:func:`jaxgeom.pmat._spectral.range_width`)."""
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(jax.random.PRNGKey(5), (n, 40))
    return _linen("linen_narrow_mlp", LinenMLP(), x, key, 4)


class LinenWideHidden(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Dense(130)(x))
        return nn.Dense(4)(x)


def make_linen_wide_hidden(seed=0, n=6):
    """A 130-unit hidden layer seen on 6 examples: the output-gradient factor ``G`` of the
    first layer (130², from ``6 K`` rows) and the input factor ``A`` of the second (131²,
    from 6 rows) are of low rank, both factorised through their ranges."""
    key = jax.random.PRNGKey(seed)
    x = jax.random.normal(jax.random.PRNGKey(6), (n, 8))
    return _linen("linen_wide_hidden", LinenWideHidden(), x, key, 4)


# ----------------------------------------------------------------------------- nnx
class NNXMLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 5, rngs=rngs)
        self.l2 = nnx.Linear(5, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@functools.cache
def make_nnx_mlp(seed=0, n=7):
    key = jax.random.PRNGKey(seed)
    model = NNXMLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)
    params = to_float64(nnx.to_pure_dict(params))

    def apply_fn(p, x):
        state = nnx.State(p) if not isinstance(p, nnx.State) else p
        return nnx.merge(graphdef, state)(x)

    x = jax.random.normal(jax.random.PRNGKey(5), (n, 3))
    return Task("nnx_mlp", apply_fn, params, x, _labels(key, n, 4), 4)


# ----------------------------------------------------------------------------- equinox
@functools.cache
def make_equinox_mlp(seed=0, n=7):
    key = jax.random.PRNGKey(seed)
    import equinox as eqx

    model = eqx.nn.MLP(3, 4, width_size=5, depth=1, activation=jnp.tanh, key=key)
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x = jax.random.normal(jax.random.PRNGKey(6), (n, 3))
    return Task("equinox_mlp", apply_fn, params, x, _labels(key, n, 4), 4)


# ----------------------------------------------------------------------------- plain
@functools.cache
def make_plain_mlp(seed=0, n=7):
    key = jax.random.PRNGKey(seed)
    k1, k2, k3, k4 = jax.random.split(key, 4)
    params = {
        "w1": jax.random.normal(k1, (3, 5)) / np.sqrt(3),
        "b1": 0.1 * jax.random.normal(k2, (5,)),
        "w2": jax.random.normal(k3, (5, 4)) / np.sqrt(5),
        "b2": 0.1 * jax.random.normal(k4, (4,)),
    }

    def apply_fn(p, x):
        return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    x = jax.random.normal(jax.random.PRNGKey(7), (n, 3))
    return Task("plain_mlp", apply_fn, params, x, _labels(key, n, 4), 4)


@functools.cache
def make_counted_mlp(seed=0, n=7):
    """A plain MLP whose params also hold integer and boolean leaves — a step counter
    (int32) and a hidden-unit mask (bool) that the model reads, and a counter (int32)
    that it ignores — beside a float gain read elementwise (a leaf outside any dense
    layer, whose gradients come with the constants')."""
    key = jax.random.PRNGKey(seed)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    params = {
        "w1": jax.random.normal(k1, (3, 5)) / np.sqrt(3),
        "b1": 0.1 * jax.random.normal(k2, (5,)),
        "gain": 1.0 + 0.1 * jax.random.normal(k5, (5,)),
        "mask": jnp.array([True, True, False, True, True]),
        "step": jnp.array(3, jnp.int32),
        "seen": jnp.array([4, 2], jnp.int32),
        "w2": jax.random.normal(k3, (5, 4)) / np.sqrt(5),
        "b2": 0.1 * jax.random.normal(k4, (4,)),
    }

    def apply_fn(p, x):
        decay = 1.0 / (1.0 + 0.1 * p["step"])
        h = jnp.tanh(x @ p["w1"] + p["b1"]) * p["gain"] * p["mask"] * decay
        return h @ p["w2"] + p["b2"]

    x = jax.random.normal(jax.random.PRNGKey(7), (n, 3))
    return Task("counted_mlp", apply_fn, params, x, _labels(key, n, 4), 4)


def constant_columns(params) -> np.ndarray:
    """The flat indices of the integer and boolean leaves of ``params``."""
    leaves = jax.tree_util.tree_leaves(params)
    sizes = [int(np.size(x)) for x in leaves]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    return np.concatenate([np.arange(a, a + s, dtype=int) for a, s, x in zip(starts, sizes, leaves)
                           if not jnp.issubdtype(jnp.result_type(x), jnp.inexact)])


# ----------------------------------------------------------------------------- more layers
class LinenConvTranspose(nn.Module):
    """Transposed convolutions whose kernel is flipped with ``rev`` (``transpose_kernel``),
    2-D then 1-D, then a dense read-out."""

    @nn.compact
    def __call__(self, x):  # (N, 2, 2, 2)
        x = nn.tanh(nn.ConvTranspose(2, (2, 3), strides=(2, 1), transpose_kernel=True)(x))
        x = x.reshape((x.shape[0], -1, 2))  # (N, 8, 2)
        x = nn.ConvTranspose(2, (3,), strides=(2,), padding="VALID", use_bias=False,
                             transpose_kernel=True)(x)
        return nn.Dense(3)(jnp.tanh(x).mean(axis=1))


class LinenTransformer(nn.Module):
    """A pre-norm transformer block: attention projections, an MLP shared over positions."""

    @nn.compact
    def __call__(self, x):  # (N, T, 4)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(nn.LayerNorm()(x))
        x = x + nn.Dense(4)(nn.gelu(nn.Dense(6)(nn.LayerNorm()(x))))
        return nn.Dense(3)(x.mean(axis=1))


@functools.cache
def make_linen_conv_transpose(seed=0, n=4):
    x = jax.random.normal(jax.random.PRNGKey(12), (n, 2, 2, 2))
    return _linen("linen_conv_transpose", LinenConvTranspose(), x, jax.random.PRNGKey(seed), 3)


@functools.cache
def make_linen_transformer(seed=0, n=4):
    x = jax.random.normal(jax.random.PRNGKey(13), (n, 3, 4))
    return _linen("linen_transformer", LinenTransformer(), x, jax.random.PRNGKey(seed), 3)


class NNXCNN(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(2, 3, kernel_size=(3, 3), strides=2, rngs=rngs)
        self.head = nnx.Linear(12, 3, rngs=rngs)

    def __call__(self, x):  # (N, 4, 4, 2)
        return self.head(jnp.tanh(self.conv(x)).reshape(x.shape[0], -1))


@functools.cache
def make_nnx_cnn(seed=0, n=4):
    graphdef, state = nnx.split(NNXCNN(nnx.Rngs(seed)), nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, nnx.State(p))(x)

    x = jax.random.normal(jax.random.PRNGKey(14), (n, 4, 4, 2))
    return Task("nnx_cnn", apply_fn, to_float64(nnx.to_pure_dict(state)), x,
                _labels(jax.random.PRNGKey(seed), n, 3), 3)


@functools.cache
def make_equinox_cnn(seed=0, n=4):
    import equinox as eqx

    class Net(eqx.Module):
        conv: eqx.nn.Conv2d
        head: eqx.nn.Linear

        def __call__(self, x):  # one example, (C, H, W)
            return self.head(jnp.tanh(self.conv(x)).ravel())

    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    model = Net(eqx.nn.Conv2d(2, 3, 3, stride=2, padding=1, key=k1),
                eqx.nn.Linear(12, 3, key=k2))
    params, static = eqx.partition(to_float64(model), eqx.is_inexact_array)

    def apply_fn(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    x = jax.random.normal(jax.random.PRNGKey(15), (n, 2, 4, 4))
    return Task("equinox_cnn", apply_fn, params, x, _labels(k1, n, 3), 3)


def _hidden_and_readout(seed, n_in, n_hidden, n_out):
    """Plain-dict params — a hidden layer ``w``, ``b`` and a read-out ``v`` — and the key
    the labels are drawn with."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    return {"w": jax.random.normal(k1, (n_in, n_hidden)) / np.sqrt(n_in),
            "b": 0.1 * jax.random.normal(k2, (n_hidden,)),
            "v": jax.random.normal(k3, (n_hidden, n_out))}, k3


@functools.cache
def make_plain_reverse_scan(seed=0, n=4):
    """A recurrent layer run backwards over time (``lax.scan(..., reverse=True)``)."""
    params, k3 = _hidden_and_readout(seed, 3, 4, 2)

    def apply_fn(p, xs):  # (N, T, 3)
        def step(h, x):
            h = jnp.tanh(x @ p["w"] + p["b"] + 0.5 * h)
            return h, h

        _, hs = jax.lax.scan(step, jnp.zeros((xs.shape[0], 4)), xs.swapaxes(0, 1),
                             reverse=True)
        return (hs[0] + 0.3 * hs[-1]) @ p["v"]  # both ends: the order of the steps matters

    x = jax.random.normal(jax.random.PRNGKey(16), (n, 3, 3))
    return Task("plain_reverse_scan", apply_fn, params, x, _labels(k3, n, 2), 2)


MORE_TASKS = {
    "linen_conv_transpose": make_linen_conv_transpose,
    "linen_transformer": make_linen_transformer,
    "nnx_cnn": make_nnx_cnn,
    "equinox_cnn": make_equinox_cnn,
    "plain_reverse_scan": make_plain_reverse_scan,
}
"""Models with every Kronecker layer type beyond those of ``ALL_TASKS``."""


# ----------------------------------------------------------------------------- no Kronecker
class LinenTiedEmbed(nn.Module):
    """A tied embedding: the table is read by a gather and by the read-out dot_general."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 3)
        h = nn.Dense(3)(jnp.tanh(embed(tokens)).mean(axis=1))
        return embed.attend(h)


class LinenGroupedConv(nn.Module):
    """A grouped 1-D convolution (2 groups, with bias), then a dense read-out."""

    @nn.compact
    def __call__(self, x):
        x = nn.tanh(nn.Conv(4, (3,), feature_group_count=2, padding="VALID")(x))
        return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@functools.cache
def make_linen_tied_embed(seed=0, n=5):
    tokens = jax.random.randint(jax.random.PRNGKey(9), (n, 4), 0, 7)
    return _linen("linen_tied_embed", LinenTiedEmbed(), tokens, jax.random.PRNGKey(seed), 7)


@functools.cache
def make_linen_grouped_conv(seed=0, n=5):
    x = jax.random.normal(jax.random.PRNGKey(10), (n, 5, 2))
    return _linen("linen_grouped_conv", LinenGroupedConv(), x, jax.random.PRNGKey(seed), 3)


@functools.cache
def make_plain_shared_dense(seed=0, n=5):
    """One dense layer (``w``, ``b``) applied twice, then a read-out ``v``."""
    params, k3 = _hidden_and_readout(seed, 3, 3, 2)

    def apply_fn(p, x):
        h = jnp.tanh(x @ p["w"] + p["b"])
        return jnp.tanh(h @ p["w"] + p["b"]) @ p["v"]

    x = jax.random.normal(jax.random.PRNGKey(11), (n, 3))
    return Task("plain_shared_dense", apply_fn, params, x, _labels(k3, n, 2), 2)


UNFACTORABLE_TASKS = {
    # name: (make, the layer without Kronecker structure, its leaves, the operations)
    "linen_tied_embed": (make_linen_tied_embed, "Embed_0", "Embed_0/embedding",
                         "2 operations (gather, dot_general)"),
    "linen_grouped_conv": (make_linen_grouped_conv, "Conv_0", "Conv_0/bias, Conv_0/kernel",
                           "conv_general_dilated with feature_group_count=2"),
    "plain_shared_dense": (make_plain_shared_dense, "w", "b, w",
                           "2 operations (dot_general, dot_general)"),
}
"""Models with a dense/conv/embedding layer whose block is not ``A ⊗ G``."""


ALL_TASKS = {
    "linen_mlp": make_linen_mlp,
    "linen_cnn": make_linen_cnn,
    "linen_layernorm": make_linen_layernorm,
    "linen_embed": make_linen_embed,
    "nnx_mlp": make_nnx_mlp,
    "equinox_mlp": make_equinox_mlp,
    "plain_mlp": make_plain_mlp,
}


# ----------------------------------------------------------------------------- references
_MEMO = {}


def memoized(compute):
    """``compute(apply_fn, params, x, *rest)`` computed once per ``apply_fn``, the very
    ``params`` and ``x`` objects (kept alive with the result, so their ids stay unique) and
    hashable ``rest``; other calls (an array among ``rest``, tracers) are computed afresh.
    Results are shared: never modify them in place."""

    @functools.wraps(compute)
    def wrapper(apply_fn, params, x, *rest, **kwargs):
        key = (compute.__name__, apply_fn, id(params), id(x), rest, tuple(kwargs.items()))
        try:
            hash(key)
        except TypeError:  # an array among the options
            return compute(apply_fn, params, x, *rest, **kwargs)
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree_util.tree_leaves((params, x))):
            return compute(apply_fn, params, x, *rest, **kwargs)
        if key not in _MEMO:
            _MEMO[key] = (params, x, compute(apply_fn, params, x, *rest, **kwargs))
        return _MEMO[key][2]

    return wrapper


@memoized
def flat_jacobian(apply_fn, params, x):
    """Brute-force per-example Jacobian ``(N, C, d)`` of the raw outputs (``(N, ..., C)``
    outputs are flattened to ``(N, P·C)``)."""
    flat0, unravel = jax.flatten_util.ravel_pytree(params)

    def per_example(flat, xi):
        out = apply_fn(unravel(flat), jax.tree_util.tree_map(lambda a: a[None], xi))[0]
        return jnp.ravel(out)

    # one program (eagerly, vmap and jacrev ran op by op: a thousand compilations a run)
    return jax.jit(jax.vmap(jax.jacrev(per_example), in_axes=(None, 0)))(flat0, x)


def output_fisher(variant, out, covariance=None):
    """The output-space Fisher ``H_n`` of one example's raw outputs ``out``."""
    if variant in ("classif_logits", "classif_logsoftmax"):
        p = jax.nn.softmax(out)
        return jnp.diag(p) - jnp.outer(p, p)
    if variant == "segmentation_logits":
        blocks = [output_fisher("classif_logits", o) for o in out.reshape(-1, out.shape[-1])]
        return jax.scipy.linalg.block_diag(*blocks)
    if variant == "classif_binary_logits":
        p = jax.nn.sigmoid(jnp.ravel(out))
        return jnp.diag(p * (1 - p))
    c = jnp.size(out)
    if covariance is None:
        return jnp.eye(c)
    cov = jnp.asarray(covariance)
    cov = cov * jnp.eye(c) if cov.ndim == 0 else (jnp.diag(cov) if cov.ndim == 1 else cov)
    return jnp.linalg.inv(cov)


@memoized
def reference_fisher(apply_fn, params, x, variant="classif_logits", covariance=None):
    """``(1/N) Σₙ Jₙᵀ Hₙ Jₙ`` by brute force, ``(d, d)``."""
    jac = flat_jacobian(apply_fn, params, x)
    outs = apply_fn(params, x)
    hs = jnp.stack([output_fisher(variant, o, covariance) for o in outs])
    return jnp.einsum("nkd,nkl,nle->de", jac, hs, jac) / jac.shape[0]
