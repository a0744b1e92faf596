"""The benchmark models, defined identically in Flax (jaxgeom) and PyTorch (NNGeometry).

Each model is a :class:`Spec`: its architecture as a list of layers (``dense``, ``conv``,
``relu``, ``tanh``, ``avgpool``, ``flatten``, residual blocks), the number of examples,
the chunk size and the representations that fit it. From a spec this module builds

- ``flax_model(spec)``: a ``flax.linen`` module; ``init_params`` gives its float32
  parameters (fixed seed);
- ``torch_model(spec, params)``: the same network as a ``torch.nn.Module`` with the
  *same* float32 weights copied over (Dense kernels transposed, conv kernels from HWIO
  to OIHW);
- ``make_data(spec, n)``: synthetic Gaussian inputs and uniform labels (fixed seed), in
  the Flax layout (NHWC for images); ``torch_inputs`` gives the NCHW view.

The Flax network flattens images in NCHW order, so its Dense kernels after a flatten are
those of the PyTorch network (no permutation). ``layer_shapes(spec)`` lists, per
parametrised layer, ``(kind, a, g, T)``: input width (+1 for the bias; ``in·kh·kw + 1``
for a convolution), output width and number of positions — the shapes of the floor GEMMs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

# A layer is a tuple: ("dense", out), ("conv", out), ("relu",), ("tanh",), ("avgpool",),
# ("flatten",), ("res", out) — a residual block relu(x + conv(relu(conv(x)))), out = channels.


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str
    input_shape: tuple[int, ...]  # per example, Flax layout (H, W, C) or (features,)
    layers: tuple[tuple, ...]
    n: int
    batch_size: int
    representations: tuple[str, ...]
    repeats: int | None = None  # default warm repeats for this model (None: --repeats)
    note: str = ""


ALL_SMALL = ("PMatDense", "PMatBlockDiag", "PMatDiag", "PMatKFAC", "PMatEKFAC",
             "PMatQuasiDiag", "PMatLowRank", "PMatImplicit")
STRUCTURED = ("PMatDiag", "PMatKFAC", "PMatEKFAC", "PMatQuasiDiag", "PMatImplicit")

SPECS = {
    "bench_small": Spec(
        "bench_small", (32,), (("dense", 64), ("tanh",), ("dense", 64), ("tanh",),
                               ("dense", 10)),
        n=1024, batch_size=256, representations=ALL_SMALL),
    "bench_mlp": Spec(
        "bench_mlp", (784,), (("dense", 512), ("relu",), ("dense", 512), ("relu",),
                              ("dense", 10)),
        n=512, batch_size=64, representations=STRUCTURED),
    "bench_cnn": Spec(
        "bench_cnn", (32, 32, 3),
        (("conv", 32), ("relu",), ("conv", 32), ("relu",), ("avgpool",), ("conv", 64),
         ("relu",), ("avgpool",), ("flatten",), ("dense", 10)),
        n=128, batch_size=32, representations=STRUCTURED),
    "bench_resnet": Spec(
        "bench_resnet", (32, 32, 3),
        (("conv", 32), ("relu",), ("res", 32), ("avgpool",), ("conv", 64), ("relu",),
         ("res", 64), ("avgpool",), ("conv", 128), ("relu",), ("res", 128), ("avgpool",),
         ("flatten",), ("dense", 512), ("relu",), ("dense", 10)),
        n=64, batch_size=16, representations=STRUCTURED, repeats=2,
        note="a small ResNet without normalisation (1.5 M parameters)"),
}


# ----------------------------------------------------------------------------- shapes


def layer_shapes(spec: Spec) -> list[tuple[str, int, int, int]]:
    """``(kind, a, g, T)`` per parametrised layer, in order (a includes the bias column)."""
    shape = spec.input_shape
    out = []
    for layer in spec.layers:
        kind = layer[0]
        if kind == "dense":
            out.append(("dense", shape[-1] + 1, layer[1], 1))
            shape = (layer[1],)
        elif kind == "conv":
            h, w, c = shape
            out.append(("conv", c * 9 + 1, layer[1], h * w))
            shape = (h, w, layer[1])
        elif kind == "res":
            h, w, c = shape
            out += [("conv", c * 9 + 1, c, h * w)] * 2
        elif kind == "avgpool":
            h, w, c = shape
            shape = (h // 2, w // 2, c)
        elif kind == "flatten":
            shape = (int(np.prod(shape)),)
    return out


def num_params(spec: Spec) -> int:
    return sum((a * g) for _, a, g, _ in layer_shapes(spec))


def activation_floats(spec: Spec) -> int:
    """Per example: Σ over parametrised layers of (input a·T + output g·T) floats."""
    return sum((a - 1) * t + g * t for _, a, g, t in layer_shapes(spec))


# ----------------------------------------------------------------------------- data


def make_data(spec: Spec, n: int | None = None, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    n = spec.n if n is None else n
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, *spec.input_shape), dtype=np.float32)
    y = rng.integers(0, 10, size=(n,)).astype(np.int32)
    return x, y


def torch_inputs(x: np.ndarray) -> np.ndarray:
    """NHWC → NCHW for images, unchanged otherwise."""
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


# ----------------------------------------------------------------------------- flax


def flax_model(spec: Spec):
    import jax
    from flax import linen as nn

    class Res(nn.Module):
        channels: int

        @nn.compact
        def __call__(self, x):
            h = jax.nn.relu(nn.Conv(self.channels, (3, 3), padding=1)(x))
            return jax.nn.relu(x + nn.Conv(self.channels, (3, 3), padding=1)(h))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for layer in spec.layers:
                kind = layer[0]
                if kind == "dense":
                    x = nn.Dense(layer[1])(x)
                elif kind == "conv":
                    x = nn.Conv(layer[1], (3, 3), padding=1)(x)
                elif kind == "res":
                    x = Res(layer[1])(x)
                elif kind == "relu":
                    x = jax.nn.relu(x)
                elif kind == "tanh":
                    x = jax.numpy.tanh(x)
                elif kind == "avgpool":
                    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
                elif kind == "flatten":  # NCHW order, as torch.flatten
                    x = x.transpose(0, 3, 1, 2).reshape(x.shape[0], -1)
            return x

    return Net()


def init_params(spec: Spec, seed: int = 0) -> Any:
    """Float32 Flax parameters (fan-in scaled normal kernels, small random biases)."""
    import jax
    import jax.numpy as jnp

    net = flax_model(spec)
    params = net.init(jax.random.key(seed), jnp.zeros((1, *spec.input_shape)))["params"]
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
    new = []
    for k, leaf in zip(keys, leaves):
        if leaf.ndim == 1:
            new.append(0.1 * jax.random.normal(k, leaf.shape, jnp.float32))
        else:
            fan_in = int(np.prod(leaf.shape[:-1]))
            new.append(jax.random.normal(k, leaf.shape, jnp.float32) * np.sqrt(1.0 / fan_in))
    return jax.tree_util.tree_unflatten(treedef, new)


def make_apply(spec: Spec):
    net = flax_model(spec)

    def apply_fn(params, x):
        return net.apply({"params": params}, x)

    return apply_fn


# ----------------------------------------------------------------------------- torch


def torch_model(spec: Spec, params: Any):
    """The PyTorch network with the weights of ``params`` (Flax) copied over."""
    import torch
    from torch import nn

    counters = {"Dense": 0, "Conv": 0, "Res": 0}

    def take(kind):
        name = f"{kind}_{counters[kind]}"
        counters[kind] += 1
        return name

    def copy_dense(p, out_features):
        lin = nn.Linear(p["kernel"].shape[0], out_features)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.asarray(p["kernel"]).T.copy()))
            lin.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))
        return lin

    def copy_conv(p, out_channels):
        k = np.asarray(p["kernel"])  # (kh, kw, in, out)
        conv = nn.Conv2d(k.shape[2], out_channels, 3, padding=1)
        with torch.no_grad():
            conv.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
            conv.bias.copy_(torch.from_numpy(np.asarray(p["bias"]).copy()))
        return conv

    class Res(nn.Module):
        def __init__(self, p, c):
            super().__init__()
            self.conv1 = copy_conv(p["Conv_0"], c)
            self.conv2 = copy_conv(p["Conv_1"], c)

        def forward(self, x):
            return torch.relu(x + self.conv2(torch.relu(self.conv1(x))))

    mods = []
    for layer in spec.layers:
        kind = layer[0]
        if kind == "dense":
            mods.append(copy_dense(params[take("Dense")], layer[1]))
        elif kind == "conv":
            mods.append(copy_conv(params[take("Conv")], layer[1]))
        elif kind == "res":
            mods.append(Res(params[take("Res")], layer[1]))
        elif kind == "relu":
            mods.append(nn.ReLU())
        elif kind == "tanh":
            mods.append(nn.Tanh())
        elif kind == "avgpool":
            mods.append(nn.AvgPool2d(2))
        elif kind == "flatten":
            mods.append(nn.Flatten())
    return nn.Sequential(*mods).float()
