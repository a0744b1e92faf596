"""Capture every Kronecker layer's inputs ``a`` and output gradients ``g``, per example.

The Kronecker-factored representations (KFAC, EKFAC, the quasi-diagonal, fast diagonals)
need, for each layer ``l`` whose kernel ``W`` is consumed by one linear operation
``y = op(W, x)`` (a ``dot_general``, a ``conv_general_dilated`` or the ``gather`` of an
embedding table), the layer input and the gradient of the ``K`` outputs of a per-example
function with respect to the layer's pre-bias output:

.. math::  \\nabla_W z_k = \\sum_t g_{k,t}\\, a_t^\\top, \\qquad
   \\nabla_b z_k = \\sum_t g_{k,t},

where ``t`` runs over the *positions* at which the kernel is applied (sequence steps,
attention heads, convolution output locations, scan iterations; ``T = 1`` for a plain
dense layer on a vector) and ``g_{k,t} = ∂z_k/∂y_t``.

How (REFERENCE.md §4.4, steps 0-4). The per-example function ``fn(params, example, index,
aux) -> (K,)`` of :mod:`jaxgeom.jacobian` is traced once to a jaxpr. The layer analysis
of :mod:`jaxgeom._discovery` (subclassed, not duplicated) locates each linear operation
that consumes a parameter leaf. A small interpreter then re-evaluates the jaxpr, binding
each equation as :func:`jax.core.eval_jaxpr` does, except that at each captured site it
records the layer input and adds a zero *perturbation* to the op's output. One
``jax.vjp`` with respect to the perturbations (and to the leaves of the non-Kronecker
layers), applied to the ``K`` unit cotangents (``vmap``), yields every ``g`` (and the
exact per-example gradients of the small leaves); the whole is ``vmap``-ped over the
examples of a chunk. No hooks and no module registry: Flax linen, NNX, Equinox and plain
``jnp`` models are handled by the same code.

Sub-jaxprs: call-like equations (``jit``, ``remat``, ``closed_call``, ``custom_jvp_call``,
``custom_vjp_call``) that contain a captured site are inlined (a custom derivative rule
around a layer is then replaced by differentiation of its primal body); others are re-bound
unchanged. A site inside ``scan`` is captured by a new ``scan`` whose body takes the
perturbations as extra ``xs`` and returns the captured inputs as extra ``ys``: the scan
iterations become positions (weight sharing over time).

Layouts. ``a`` lists the kernel's *contracting* dimensions and ``g`` its *free* (output)
dimensions, each flattened in the kernel leaf's own dimension order, so that the
per-example kernel gradient is ``KroneckerSpec.kernel_from_matrix(Σ_t g_t a_tᵀ)`` whatever
the framework's layout: Flax ``(in, out)`` / ``HWIO``, Equinox ``(out, in)`` / ``OIHW``,
``DenseGeneral`` kernels with several contracting or free dimensions. For convolutions
``a_t`` is the input patch seen by output location ``t`` (following stride, padding,
dilation and ``lhs_dilation``, i.e. transposed convolutions too; Grosse & Martens 2016).
For embeddings ``a_t`` is the one-hot row selector, stored as the row index (``-1`` when
the gather drops an out-of-range index): the input factor of an embedding is diagonal.
A bias's flat order is assumed to follow the kernel's output features (true of every
framework; the tests check it against ``jax.jacrev``).

Costs per chunk of ``n`` examples: one forward and ``K`` backward passes per example, plus
the memory of the captured inputs (``n Σ_l T_l a_l``; for convolutions the patches,
``kernel-size`` times the layer input) and output gradients (``n K Σ_l T_l g_l``). A
convolution's patches are formed from its padded input (``Captured.sources``) where they are
read: a consumer that reads them one example at a time forms them inside its loop, and the
chunk's patches are never written (under ``jit``, unread captures cost nothing).

References: Martens & Grosse (2015), Grosse & Martens (2016), Eschenhagen et al. (2023);
kfac-jax's perturbation VJP (``tracer.py``) for the capture mechanism.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex
from jax.extend.core import primitives as prims

from jaxgeom._compile import model_jit
from jaxgeom._differentiable import FloatLeaves
from jaxgeom._discovery import (
    _CALL_PRIMITIVES,
    _Analysis,
    _call_body,
    _LeafView,
    bind,
    closed_body,
    scan_counts,
)
from jaxgeom._reindex import is_transposed_block
from jaxgeom._signature import abstract, cached, signature
from jaxgeom.layers import KRONECKER_KINDS, LayerCollection
from jaxgeom.streaming import tree_finite


# ----------------------------------------------------------------------------- layer layout
@dataclasses.dataclass(frozen=True)
class KroneckerSpec:
    """The static layout of one Kronecker layer (hashable).

    The op consumes an *operand* obtained from the kernel leaf through ``views`` (casts
    are dropped; reshapes, transposes, squeezes, reversals, size-1 broadcasts kept), e.g. Equinox's
    ``(out, in)`` weight or a ``x @ W.T`` in plain code. ``in_dims``/``out_dims`` are the
    operand's contracting/free dimensions. The layer matrix is ``(g_l, a_l)``: output
    features (``out_dims`` flattened, ascending) by input features (``in_dims``).

    Attributes:
      layer_id: the layer's id in the :class:`~jaxgeom.layers.LayerCollection`.
      kind: ``"dense"``, ``"conv"`` or ``"embedding"``.
      kernel: flat leaf index of the kernel (weight, table).
      bias: flat leaf index of the bias, or ``None``.
      kernel_shape: the kernel leaf's shape.
      views: the view steps from the leaf to the operand (``(name, argument)`` pairs).
      operand_shape: the operand's shape.
      in_dims: the operand's contracting (input) dimensions, ascending.
      out_dims: the operand's free (output) dimensions, ascending.
    """

    layer_id: str
    kind: str
    kernel: int
    bias: int | None
    kernel_shape: tuple[int, ...]
    views: tuple[tuple[str, Any], ...]
    operand_shape: tuple[int, ...]
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]

    @property
    def in_features(self) -> int:
        """``a_l``: the size of one input (one patch, one embedding row selector)."""
        return math.prod(self.operand_shape[d] for d in self.in_dims)

    @property
    def out_features(self) -> int:
        """``g_l``: the size of one output."""
        return math.prod(self.operand_shape[d] for d in self.out_dims)

    @functools.cached_property
    def index(self) -> np.ndarray | None:
        """``(g_l, a_l)``: the position in the raveled kernel leaf of each layer-matrix
        entry; ``None`` when the views do not make a one-to-one re-indexing."""
        size = math.prod(self.kernel_shape)
        idx = np.arange(size).reshape(self.kernel_shape)
        for name, arg in self.views:
            idx = _VIEW_REPLAY[name](idx, arg)
            if idx is None:
                return None
        if idx.shape != self.operand_shape or not _distinct(idx, size):
            return None
        idx = np.transpose(idx, self.out_dims + self.in_dims)
        return idx.reshape(self.out_features, self.in_features)

    @functools.cached_property
    def _inverse(self) -> np.ndarray:
        return np.argsort(self.index.ravel())

    @functools.cached_property
    def memory_order(self) -> str | None:
        """``"ga"`` when the raveled kernel is the ``(g_l, a_l)`` layer matrix (Equinox's
        ``(out, in)``), ``"ag"`` when it is its transpose (Flax's ``(in, out)``, ``HWIO``),
        else ``None``: per-example gradients formed in that order need no reordering (a
        gather fused into their writes ran at half speed on XLA:CPU)."""
        if self.index is None:
            return None
        if np.array_equal(self.index.ravel(), np.arange(self.index.size)):
            return "ga"
        return "ag" if is_transposed_block(self.index) else None

    def kernel_to_matrix(self, w: jax.Array) -> jax.Array:
        """``(..., *kernel_shape)`` → ``(..., g_l, a_l)`` (output index first)."""
        lead = w.shape[: w.ndim - len(self.kernel_shape)]
        return w.reshape(lead + (-1,))[..., self.index]

    def kernel_from_matrix(self, m: jax.Array) -> jax.Array:
        """``(..., g_l, a_l)`` → ``(..., *kernel_shape)`` (inverse of ``kernel_to_matrix``)."""
        lead = m.shape[:-2]
        return m.reshape(lead + (-1,))[..., self._inverse].reshape(lead + self.kernel_shape)

    def matrix_indices(self, layout: LayerCollection) -> np.ndarray:
        """The flat index of every entry of the ``(g_l, a_l [+1])`` layer matrix: kernel
        entries, then (with a bias) the bias as the last input column (a static array)."""
        idx = self.index + layout.offsets[self.kernel]
        if self.bias is None:
            return idx
        bias = layout.offsets[self.bias] + np.arange(self.out_features)
        return np.concatenate([idx, bias[:, None]], axis=1)


def check_specs(representation: Any) -> None:
    """Refuse a representation whose ``specs`` are not a tuple of :class:`KroneckerSpec`:
    its arrays passed positionally one field early (``PMatKFAC(layout, factors, blocks)``)
    would otherwise build a matrix with no Kronecker layer, silently."""
    specs = representation.specs
    if isinstance(specs, tuple) and all(isinstance(s, KroneckerSpec) for s in specs):
        return
    got = (f"a tuple of {', '.join(sorted({type(s).__name__ for s in specs}))}"
           if isinstance(specs, tuple) else type(specs).__name__)
    fields = ", ".join(f.name for f in dataclasses.fields(representation) if f.init)
    raise TypeError(
        f"{type(representation).__name__}'s specs must be a tuple of KroneckerSpec (one per "
        f"Kronecker layer); got {got}. Its fields are ({fields}): pass them by name, or "
        "derive a matrix from another with dataclasses.replace")


def _replay_broadcast(idx, arg):
    shape, dims = arg
    expanded = idx.reshape([idx.shape[dims.index(d)] if d in dims else 1
                            for d in range(len(shape))])
    return np.broadcast_to(expanded, shape)


_VIEW_REPLAY = {
    "reshape": lambda idx, shape: idx.reshape(shape),
    "transpose": lambda idx, perm: np.transpose(idx, perm),
    "squeeze": lambda idx, dims: np.squeeze(idx, dims),
    "rev": lambda idx, dims: np.flip(idx, dims),
    "broadcast": _replay_broadcast,
    "opaque": lambda idx, arg: None,
}
"""numpy replays of the view steps on an index array (``None``: not a re-indexing)."""

_SAME_VALUES = frozenset({
    prims.convert_element_type_p, prims.copy_p, prims.reduce_precision_p,
    prims.device_put_p, prims.sharding_constraint_p, prims.name_p,
})


def _view_step(eqn) -> tuple[str, Any] | None:
    """The re-indexing a view equation applies (``None``: values unchanged)."""
    prim, params = eqn.primitive, eqn.params
    if prim in _SAME_VALUES:
        return None
    if prim is prims.reshape_p and params.get("dimensions") is None:
        return ("reshape", tuple(params["new_sizes"]))
    if prim is prims.transpose_p:
        return ("transpose", tuple(params["permutation"]))
    if prim is prims.squeeze_p:
        return ("squeeze", tuple(params["dimensions"]))
    if prim is prims.rev_p:  # the flipped kernel of a transposed convolution
        return ("rev", tuple(params["dimensions"]))
    if prim is prims.broadcast_in_dim_p:
        return ("broadcast", (tuple(params["shape"]), tuple(params["broadcast_dimensions"])))
    return ("opaque", None)


# ----------------------------------------------------------------------------- sites
@dataclasses.dataclass(frozen=True)
class _Site:
    """Where a Kronecker layer's op sits and how to read its input and output gradient.

    ``path`` is the equation's index in its jaxpr, preceded by those of its enclosing
    equations; ``layer`` is the layer's position among the captured layers; ``weight`` the
    operand position of the kernel; ``scans`` the number of enclosing ``scan``s.
    """

    layer: int
    eqn: Any
    weight: int
    scans: int

    def inputs(self, invals: Sequence[jax.Array]) -> jax.Array:
        """The captured input of one evaluation: ``(T, a_l)``, or ``(T,)`` row ids."""
        return self.inputs_from(self.source(invals))

    @property
    def _patches_later(self) -> bool:
        return self.eqn.primitive is prims.conv_general_dilated_p and self.scans == 0

    def source(self, invals: Sequence[jax.Array]) -> jax.Array:
        """What the capture keeps of one evaluation: a convolution's padded channels-last
        input (outside a ``scan``), whose patches :meth:`inputs_from` forms; otherwise the
        inputs themselves."""
        prim = self.eqn.primitive
        if self._patches_later:
            return _conv_source(self.eqn, invals[0])
        if prim is prims.dot_general_p:
            return _dot_inputs(self.eqn, invals, self.weight)
        if prim is prims.conv_general_dilated_p:
            return _conv_patches(self.eqn, _conv_source(self.eqn, invals[0]))
        return _gather_inputs(self.eqn, invals)

    def inputs_from(self, source: jax.Array) -> jax.Array:
        """One evaluation's inputs ``(T, a_l)`` from its :meth:`source`."""
        return _conv_patches(self.eqn, source) if self._patches_later else source

    def grads(self, cot: jax.Array) -> jax.Array:
        """The cotangent of the op's output as ``(T, g_l)``."""
        prim = self.eqn.primitive
        params = self.eqn.params
        if prim is prims.dot_general_p:
            (contract, _), w = params["dimension_numbers"], self.weight
            n_free_w = self.eqn.invars[w].aval.ndim - len(contract[w])
            n_free_x = cot.ndim - n_free_w
            out = list(range(n_free_w)) if w == 0 else list(range(n_free_x, cot.ndim))
            pos = [d for d in range(cot.ndim) if d not in out]
        elif prim is prims.conv_general_dilated_p:
            spec = params["dimension_numbers"].out_spec
            out, pos = [spec[1]], [spec[0], *spec[2:]]
        else:
            out = list(params["dimension_numbers"].offset_dims)
            pos = [d for d in range(cot.ndim) if d not in out]
        size = math.prod(cot.shape[d] for d in out)
        return jnp.transpose(cot, pos + out).reshape(-1, size)


def _dot_inputs(eqn, invals, w):
    (contract, _) = eqn.params["dimension_numbers"]
    x = invals[1 - w]
    cw, cx = contract[w], contract[1 - w]
    paired = [c for _, c in sorted(zip(cw, cx))]  # x's contracting dims in kernel order
    free = [d for d in range(x.ndim) if d not in cx]
    size = math.prod(x.shape[d] for d in cx)
    return jnp.transpose(x, free + paired).reshape(-1, size)


def _conv_source(eqn, x: jax.Array) -> jax.Array:
    """A convolution's input as the patches read it: channels-last ``(N, spatial..., C)``,
    padded (and dilated for ``lhs_dilation``)."""
    params = eqn.params
    lhs_spec = params["dimension_numbers"].lhs_spec
    x = jnp.transpose(x, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    config = [(0, 0, 0)] + [(lo, hi, dil - 1) for (lo, hi), dil in
                            zip(params["padding"], params["lhs_dilation"])] + [(0, 0, 0)]
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _conv_patches(eqn, x: jax.Array) -> jax.Array:
    """KFC patches (Grosse & Martens 2016) of a :func:`_conv_source`: one row per output
    location, features in the kernel's ascending (in, spatial) dimension order.

    Built one spatial dimension at a time: the window offsets along that dimension are
    strided slices stacked into a new axis, next to the channel axis on the side the
    kernel's order puts them, so that the patches come out in their final layout when the
    kernel's order is (spatial..., in) (Flax ``HWIO``) or (in, spatial...) (``OIHW``);
    another order costs one transpose. Pure data movement: ``prod(window)`` times the
    input. Stacking a dimension at a time (3 + 3 slices of a 3×3 window, not 9) keeps
    XLA:CPU from materialising each offset's slice and concatenating them apart from the
    patches' consumer: twice as fast on a 3×3 convolution of 32 channels.
    """
    params = eqn.params
    rhs_spec = params["dimension_numbers"].rhs_spec
    rank = len(rhs_spec) - 2
    kernel_shape = eqn.invars[1].aval.shape
    window = [kernel_shape[d] for d in rhs_spec[2:]]
    order = list(np.argsort(rhs_spec[1:]))  # kernel dims (I, spatial...) → ascending
    channels_last = order.index(0) == rank
    # (N, out..., window..., C) or (N, out..., C, window...)
    dims = reversed(range(rank)) if channels_last else range(rank)
    for d in dims:
        stride, dilation = params["window_strides"][d], params["rhs_dilation"][d]
        out = (x.shape[1 + d] - (window[d] - 1) * dilation - 1) // stride + 1
        slices = [jax.lax.slice_in_dim(x, o * dilation, o * dilation + (out - 1) * stride + 1,
                                       stride, axis=1 + d) for o in range(window[d])]
        x = jnp.stack(slices, axis=1 + rank if channels_last else x.ndim)
    if channels_last:  # features (window..., in)
        features = [1 + 2 * rank] + [1 + rank + i for i in range(rank)]
    else:  # features (in, window...)
        features = [1 + rank + i for i in range(rank + 1)]
    patches = jnp.transpose(x, list(range(1 + rank)) + [features[i] for i in order])
    return patches.reshape(-1, math.prod(patches.shape[1 + rank:]))


def _gather_inputs(eqn, invals):
    """Row ids of an embedding lookup (``-1`` where the gather drops the index)."""
    table, indices = invals[0], invals[1]
    dnums = eqn.params["dimension_numbers"]
    (row,) = dnums.start_index_map
    ids = indices[..., 0].reshape(-1)
    rows = table.shape[row]
    if eqn.params["mode"] == jax.lax.GatherScatterMode.CLIP:
        return jnp.clip(ids, 0, rows - 1)
    return jnp.where((ids >= 0) & (ids < rows), ids, -1)


def _is_embedding_gather(eqn) -> bool:
    """Whether a gather selects whole rows along one table axis (``jnp.take``, ``W[ids]``)."""
    dnums = eqn.params["dimension_numbers"]
    table, indices = (v.aval for v in eqn.invars[:2])
    sizes = eqn.params["slice_sizes"]
    if len(dnums.start_index_map) != 1 or dnums.operand_batching_dims:
        return False
    (row,) = dnums.start_index_map
    full = all(s == table.shape[d] for d, s in enumerate(sizes) if d != row)
    return (
        tuple(dnums.collapsed_slice_dims) == (row,)
        and sizes[row] == 1
        and full
        and indices.shape[-1] == 1
    )


# ----------------------------------------------------------------------------- analysis
_OP_PRIMITIVES = (prims.dot_general_p, prims.conv_general_dilated_p)

@dataclasses.dataclass(frozen=True)
class _ChainedView(_LeafView):
    """A leaf view that remembers its view steps from the leaf."""

    views: tuple = ()


class _SiteAnalysis(_Analysis):
    """The layer analysis of :mod:`jaxgeom._discovery`, also recording where each linear
    operation sits (the path of equation indices) so that the interpreter can find it."""

    def __init__(self, leaf_sizes):
        super().__init__(leaf_sizes)
        self.frames: list[tuple[dict[int, int], list[int], bool]] = []
        self.op_sites: dict[int, tuple] = {}  # op index -> (path, eqn, weight, scans)
        self.gather_sites: dict[int, list] = {}  # table leaf -> [(path, eqn, scans)]

    def visit(self, jaxpr, in_marks):
        index = {id(e): i for i, e in enumerate(jaxpr.eqns)}
        self.frames.append((index, [-1], False))
        try:
            return super().visit(jaxpr, in_marks)
        finally:
            self.frames.pop()

    def _view(self, eqn, marks):
        out = super()._view(eqn, marks)
        first = marks[0]
        if isinstance(first, _LeafView) and len(eqn.outvars) == 1:
            step = _view_step(eqn)
            if step is not None:
                out[0] = _ChainedView(first.leaf, out[0].axes,
                                      getattr(first, "views", ()) + (step,))
        return out

    def _path(self) -> tuple[int, ...]:
        return tuple(current[0] for _, current, _ in self.frames)

    def _scans(self) -> int:
        return sum(scan for _, _, scan in self.frames)

    def _equation(self, eqn, marks):
        index, current, _ = self.frames[-1]
        current[0] = index[id(eqn)]
        if eqn.primitive is prims.scan_p:  # the body's frame counts one enclosing scan
            self.frames[-1] = (index, current, True)
        before = len(self.ops)
        try:
            result = super()._equation(eqn, marks)
        finally:
            self.frames[-1] = (index, current, False)
        path, scans = self._path(), self._scans()
        if len(self.ops) > before and eqn.primitive in _OP_PRIMITIVES:
            w = next(k for k, m in enumerate(marks) if isinstance(m, _LeafView))
            views = getattr(marks[w], "views", ())
            self.op_sites[len(self.ops) - 1] = (path, eqn, w, scans, views)
        if eqn.primitive is prims.gather_p and isinstance(marks[0], _LeafView):
            views = getattr(marks[0], "views", ())
            self.gather_sites.setdefault(marks[0].leaf, []).append((path, eqn, 0, scans, views))
        return result


# ----------------------------------------------------------------------------- plan
@dataclasses.dataclass(frozen=True, eq=False)
class CapturePlan:
    """What to capture for a per-example function: built once by :func:`make_plan`.

    Attributes:
      specs: one :class:`KroneckerSpec` per captured layer (in layer-collection order).
      other_leaves: the flat leaf indices of every other layer (exact gradients).
      jaxpr: the traced single-example jaxpr (closed).
      sites: ``{path: _Site}``.
      prefixes: the paths of the equations that enclose a site.
      out_shapes: per captured layer, the shape of its op output (with scan axes first).
      num_leaves: the number of parameter leaves.
      unfactored: ``(layer id, reason)`` for every dense/conv/embedding layer that is not
        captured because its block is not of the form ``A ⊗ G`` (its leaves are in
        ``other_leaves``); the Kronecker representations refuse these
        (:func:`jaxgeom.pmat.kfac.check_factorable`).

    Hashed by identity: a static argument of the compiled capture step.
    """

    specs: tuple[KroneckerSpec, ...]
    other_leaves: tuple[int, ...]
    jaxpr: Any
    sites: dict
    prefixes: frozenset
    out_shapes: tuple[tuple[int, ...], ...]
    num_leaves: int
    unfactored: tuple[tuple[str, str], ...] = ()

    def inputs_from(self, layer: int) -> Callable[[jax.Array], jax.Array]:
        """The map from one example's ``Captured.sources[layer]`` to its ``(T, a_l)``
        inputs (``Captured.inputs[layer]``): a convolution's patches, else the identity."""
        return _sites_in_order(self)[layer].inputs_from


#: whether this JAX has meshes in context (``jax.sharding.get_abstract_mesh``)
_HAS_MESHES = hasattr(jax.sharding, "get_abstract_mesh")


def make_plan(fn: Callable, params: Any, example: Any, aux: Any,
              layout: LayerCollection) -> CapturePlan:
    """Trace ``fn`` on one ``example`` and locate the op of every Kronecker layer.

    A dense/conv/embedding layer that cannot be factored — a
    :attr:`~jaxgeom.layers.Layer.kronecker_obstacle` (several operations, a grouped
    convolution), or a kernel that the traced ``fn`` does not consume through exactly one
    recognised operation on a re-indexing of the kernel — is left to the exact per-example
    gradients (``other_leaves``) and listed, with the reason, in ``plan.unfactored``.

    Plans depend only on ``fn``, ``layout``, the shapes and dtypes of the arguments and the
    mesh in context, and are cached on them: the same plan object (a static argument of the
    compiled capture steps) comes back for new parameter values or new data, so nothing
    recompiles.
    """
    # the mesh in context is part of the key: a plan traced under one mesh (a build on
    # explicitly sharded data runs under the mesh's automatic twin) holds its avals
    mesh = jax.sharding.get_abstract_mesh() if _HAS_MESHES else None
    return _cached_plan(fn, layout, signature((params, example, aux)), mesh)


@cached(maxsize=64)
def _cached_plan(fn, layout, sig, mesh) -> CapturePlan:
    del mesh  # in the key only
    return _build_plan(fn, *abstract(sig), layout)


def _build_plan(fn: Callable, params: Any, example: Any, aux: Any,
                layout: LayerCollection) -> CapturePlan:
    leaves = jax.tree_util.tree_leaves(params)
    index = np.int32(0)  # an abstract value is all make_jaxpr needs: nothing to compile
    closed = jax.make_jaxpr(fn)(params, example, index, aux)
    analysis = _SiteAnalysis([math.prod(v.aval.shape) for v in closed.jaxpr.invars[: len(leaves)]])
    analysis.run(closed.jaxpr)

    by_kernel: dict[int, list] = {}  # kernel leaf -> [(op index or None, site)]
    for op, site in analysis.op_sites.items():
        by_kernel.setdefault(analysis.ops[op].kernel, []).append((op, site))
    for leaf, found in analysis.gather_sites.items():
        by_kernel.setdefault(leaf, []).extend((None, site) for site in found)

    specs, sites, shapes, other, unfactored = [], {}, [], [], []
    for layer in layout.layers:
        roles = dict(zip(layer.roles, layer.leaves))
        kernel = roles.get("kernel", roles.get("table"))
        found = by_kernel.get(kernel, [])
        spec = None
        if layer.kind in KRONECKER_KINDS:
            reason = layer.kronecker_obstacle
            if reason is None and len(found) != 1:
                reason = (f"the traced function consumes its kernel by {len(found)} recognised "
                          "operations instead of one")
            if reason is None:
                op, (path, eqn, w, scans, views) = found[0]
                reason = _other_uses(analysis, kernel, roles.get("bias"), op)
            if reason is None:
                spec = _spec(layer, eqn, w, views, layout.shapes[kernel], roles.get("bias"))
                if spec is None:
                    reason = (f"its {eqn.primitive.name} does not read the kernel as a "
                              "re-indexed matrix (a gather of single entries, or a view "
                              "that repeats entries)")
            if reason is not None:
                unfactored.append((layer.id, reason))
        if spec is None:
            other.extend(layer.leaves)
            continue
        sites[path] = _Site(len(specs), eqn, w, scans)
        specs.append(spec)
        shapes.append(_out_shape(closed.jaxpr, path, eqn))
    prefixes = frozenset(p[:k] for p in sites for k in range(1, len(p)))
    return CapturePlan(tuple(specs), tuple(sorted(other)), closed, sites, prefixes,
                       tuple(shapes), len(leaves), tuple(unfactored))


def _other_uses(analysis: _SiteAnalysis, kernel: int, bias: int | None,
                op: int | None) -> str | None:
    """Why a layer's captured gradients would miss part of its leaves' gradients: the
    traced function also uses its kernel, or its bias, other than through the one
    operation, or reads the operation's output before the bias is added (a layout
    discovered on another function, e.g. a model applied twice, once at shifted
    parameters); ``None`` when it does not."""
    uses = analysis.uses
    if len(uses[kernel]) != 1:
        return ("the traced function also uses its kernel outside its operation "
                f"({', '.join(u.role for u in uses[kernel])})")
    if bias is not None and [(u.role, u.target) for u in uses[bias]] != [("bias", op)]:
        return ("the traced function uses its bias other than once, added to its "
                f"operation's output ({', '.join(u.role for u in uses[bias])})")
    if bias is not None and op is not None and analysis.op_reads[op] != 1:
        return ("the traced function reads its operation's output other than by adding "
                "the bias (the bias's gradient is then not the output's)")
    return None


def _distinct(idx: np.ndarray, size: int) -> bool:
    """Whether the entries of ``idx`` (integers in ``[0, size)``) are all different: one
    pass marking each (``np.unique`` sorts or hashes: 0.1 s for a 784 × 512 kernel)."""
    seen = np.zeros(size, bool)
    seen[idx.ravel()] = True
    return int(np.count_nonzero(seen)) == idx.size


def _spec(layer, eqn, w, views, kernel_shape, bias) -> KroneckerSpec | None:
    """The layer's spec, or ``None`` when its op or kernel views are not Kronecker."""
    operand_shape = tuple(eqn.invars[w].aval.shape)
    prim = eqn.primitive
    if prim is prims.gather_p and not _is_embedding_gather(eqn):
        return None
    if prim is prims.dot_general_p:
        in_dims = tuple(sorted(eqn.params["dimension_numbers"][0][w]))
    elif prim is prims.conv_general_dilated_p:
        in_dims = tuple(sorted(eqn.params["dimension_numbers"].rhs_spec[1:]))
    else:
        in_dims = tuple(eqn.params["dimension_numbers"].start_index_map)
    out_dims = tuple(d for d in range(len(operand_shape)) if d not in in_dims)
    kernel = layer.leaves[layer.roles.index("kernel" if "kernel" in layer.roles else "table")]
    spec = KroneckerSpec(layer.id, layer.kind, kernel, bias, tuple(kernel_shape), tuple(views),
                         operand_shape, in_dims, out_dims)
    return spec if spec.index is not None else None


def _out_shape(jaxpr, path, eqn) -> tuple[int, ...]:
    """The op output's shape, preceded by the lengths of the enclosing scans."""
    lengths = []
    for i in path[:-1]:
        outer = jaxpr.eqns[i]
        if outer.primitive is prims.scan_p:
            lengths.append(outer.params["length"])
            jaxpr = outer.params["jaxpr"].jaxpr
        else:
            jaxpr = _call_body(outer)
    return tuple(lengths) + tuple(eqn.outvars[0].aval.shape)


# ----------------------------------------------------------------------------- interpreter
def _interpret(plan: CapturePlan, jaxpr, consts, args, path, perturb, captured):
    """Evaluate ``jaxpr``, capturing site inputs into ``captured`` and adding ``perturb``."""
    env: dict = {}

    def read(v):
        return v.val if isinstance(v, jex.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for i, eqn in enumerate(jaxpr.eqns):
        here = path + (i,)
        invals = [read(v) for v in eqn.invars]
        site = plan.sites.get(here)
        if site is not None:
            (out,) = bind(eqn, invals)
            captured[site.layer] = site.source(invals)
            outs = [out + perturb[site.layer].astype(out.dtype)]
        elif here in plan.prefixes and eqn.primitive is prims.scan_p:
            outs = _scan(plan, eqn, invals, here, perturb, captured)
        elif here in plan.prefixes and eqn.primitive in _CALL_PRIMITIVES:
            body, body_consts = closed_body(eqn)
            outs = _interpret(plan, body, body_consts, invals, here, perturb, captured)
        else:
            outs = bind(eqn, invals)
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _scan(plan, eqn, invals, here, perturb, captured):
    """Re-emit a ``scan`` whose body captures its sites: perturbations enter as extra
    ``xs`` and captured inputs leave as extra ``ys`` (one row per iteration)."""
    params = eqn.params
    body = params["jaxpr"]
    n_consts, n_carry = scan_counts(eqn)
    inner = sorted({s.layer for p, s in plan.sites.items() if p[: len(here)] == here})
    consts, carry, xs = (invals[:n_consts], invals[n_consts:n_consts + n_carry],
                         invals[n_consts + n_carry:])

    def step(c, x):
        xs_now, pert_now = x
        local_pert = dict(zip(inner, pert_now))
        local_captured: dict = {}
        outs = _interpret(plan, body.jaxpr, body.consts, list(consts) + list(c) + list(xs_now),
                          here, local_pert, local_captured)
        return outs[:n_carry], (outs[n_carry:], [local_captured[j] for j in inner])

    carry_out, (ys, caught) = jax.lax.scan(
        step, list(carry), (list(xs), [perturb[j] for j in inner]),
        length=params["length"], reverse=params["reverse"], unroll=params["unroll"],
    )
    for j, value in zip(inner, caught):
        captured[j] = value.reshape((-1,) + value.shape[2:]) if value.ndim > 1 else value
    return list(carry_out) + list(ys)


# ----------------------------------------------------------------------------- capture
@dataclasses.dataclass(frozen=True)
class Captured:
    """The captured quantities of one chunk of ``n`` examples.

    Attributes:
      outputs: ``(n, K)`` values of the per-example function.
      inputs: per captured layer ``(n, T, a_l)`` inputs (embeddings: ``(n, T)`` row ids).
      grads: per captured layer ``(n, K, T, g_l)`` output gradients.
      other: ``(n, K, d_o)`` per-example gradients of ``plan.other_leaves``, raveled in
        their flat order.
      sources: per captured layer ``(n, ...)``, what each example's ``inputs`` are formed
        from by :meth:`CapturePlan.inputs_from`: a convolution's padded input (its patches
        are ``prod(window)`` times larger), else the inputs themselves. A consumer that
        reads a convolution's patches one example at a time forms them from the source
        inside its loop, in cache, and the chunk's patches are never written (3× faster
        for a 3×3 convolution of 32 channels at 32×32 on a CPU).
    """

    outputs: jax.Array
    inputs: tuple[jax.Array, ...]
    grads: tuple[jax.Array, ...]
    other: jax.Array
    sources: tuple[jax.Array, ...]


jax.tree_util.register_dataclass(
    Captured, data_fields=["outputs", "inputs", "grads", "other", "sources"], meta_fields=[]
)


def all_finite(cap: Captured, checked: Any) -> jax.Array:
    """Whether a chunk's outputs and the captured values behind its statistics are finite.

    ``checked`` (a pytree) is non-finite wherever a captured input or gradient is: the
    captured gradients themselves, or — much cheaper — sums over the chunk of squares of
    every captured value (squared gradients, the diagonals of Gram factors) or of their
    absolute values (:func:`captured_sums`). Such a sum is non-finite exactly when one of
    its terms is (NaN and ±Inf propagate through sums and products, terms multiplied by 0
    stay NaN), and reading it costs a fraction of reading the captures (``K·T`` times
    larger); a sum that overflows reads as non-finite, as the statistic it is. The outputs
    are read too: a variant whose gradients do not depend on them (regression) would
    otherwise hide a broken model.
    """
    return tree_finite((cap.outputs, checked))


def captured_sums(cap: Captured) -> list[jax.Array]:
    """``Σ |x|`` of each captured float array (inputs, gradients, other gradients): what
    :func:`all_finite` reads for a consumer whose statistics are products of the captures
    (a Jacobian's rows ``g aᵀ``) — non-finite where a capture is, without reading the
    products (``K·T·g_l`` times the inputs; reading them kept XLA from fusing a row-writing
    build's products into their writes: 3× slower)."""
    leaves = (*cap.inputs, *cap.grads, cap.other)
    return [jnp.sum(jnp.abs(x)) for x in leaves if jnp.issubdtype(x.dtype, jnp.inexact)]


def _example(plan: CapturePlan, params, example, index, weight, aux) -> Captured:
    leaves = jax.tree_util.tree_leaves(params)
    rest = jax.tree_util.tree_leaves((example, index, aux))
    # the other layers' floating leaves: integer or boolean ones are constants, whose
    # columns of ``other`` are zeros (:mod:`jaxgeom._differentiable`)
    others = FloatLeaves.of([leaves[i] for i in plan.other_leaves])

    def run(perturb, other_floats):
        args = list(leaves)
        for i, leaf in zip(plan.other_leaves, others.merge(other_floats)):
            args[i] = leaf
        captured: dict = {}
        (out,) = _interpret(plan, plan.jaxpr.jaxpr, plan.jaxpr.consts, args + rest, (),
                            dict(enumerate(perturb)), captured)
        return out, tuple(captured[j] for j in range(len(plan.specs)))

    dtype = jnp.result_type(*leaves)
    zeros = [jnp.zeros(s, dtype) for s in plan.out_shapes]
    out, vjp_fn, sources = jax.vjp(run, zeros, others.primals, has_aux=True)
    sites = _sites_in_order(plan)
    inputs = tuple(site.inputs_from(s) for site, s in zip(sites, sources))
    seeds = jnp.eye(out.shape[0], dtype=out.dtype)
    if weight is not None:  # 0 for padding: every captured gradient of the example is 0
        seeds = seeds * weight.astype(out.dtype)
    cot_perturb, cot_other = jax.vmap(vjp_fn)(seeds)
    grads = tuple(_site_grads(site, cot_perturb[site.layer]) for site in sites)
    other = others.ravel(cot_other, out.shape[:1], None if others.indices else out.dtype)
    return Captured(out, inputs, grads, other, sources)


def _sites_in_order(plan: CapturePlan) -> list[_Site]:
    return sorted(plan.sites.values(), key=lambda s: s.layer)


def _site_grads(site: _Site, cot: jax.Array) -> jax.Array:
    """``(K, *scan lengths, *out)`` cotangents → ``(K, T, g_l)`` (scan steps are positions)."""
    fn = site.grads
    for _ in range(site.scans + 1):
        fn = jax.vmap(fn)
    g = fn(cot)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def capture_chunk(plan: CapturePlan, params: Any, batch: Any, offset: Any, aux: Any,
                  mask: jax.Array | None = None) -> Captured:
    """Capture one chunk: ``vmap`` over its examples of the per-example capture.

    With a ``mask`` (``(n,)``, 0 for padding), a masked-out example's backward passes are
    seeded with zeros, so its captured ``grads`` and ``other`` are exactly zero: consumers
    sum them as they are, with no masked copy of the chunk's gradients (its ``inputs`` and
    ``outputs`` are those of the padding row, unmasked).
    """
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    indices = offset + jnp.arange(n)
    in_axes = (None, 0, 0, None if mask is None else 0, None)
    return jax.vmap(functools.partial(_example, plan), in_axes=in_axes)(
        params, batch, indices, mask, aux
    )


_jitted_capture = model_jit(capture_chunk, static_argnums=0)


def capture(fn: Callable, params: Any, batch: Any, *, layer_collection: LayerCollection,
            aux: Any = None, offset: int = 0) -> tuple[CapturePlan, Captured]:
    """Capture the Kronecker layers of ``fn`` on a ``batch`` of examples (convenience).

    Returns the plan (its ``specs`` say which layers were captured and how their kernels
    are laid out) and the :class:`Captured` quantities.
    """
    example = jax.tree_util.tree_map(lambda a: a[0], batch)
    plan = make_plan(fn, params, example, aux, layer_collection)
    return plan, _jitted_capture(plan, params, batch, jnp.asarray(offset), aux)


def example_gradients(spec: KroneckerSpec, inputs: jax.Array, grads: jax.Array) -> dict:
    """Per-example, per-output gradients of a layer's leaves rebuilt from ``(a, g)``:
    ``{"kernel": (n, K, *kernel_shape), "bias": (n, K, g_l)}`` (``Σ_t g aᵀ`` and ``Σ_t g``)."""
    if spec.kind == "embedding":
        inputs = jax.nn.one_hot(inputs, spec.in_features, dtype=grads.dtype)
    inputs = inputs.astype(grads.dtype)
    n, k = grads.shape[:2]
    memory_order = spec.memory_order  # formed in the kernel's own order: no reordering
    if inputs.shape[1] == 1:  # one position: an outer product (XLA fuses it into its consumer)
        g, a = grads[:, :, 0, :], inputs[:, None, 0, :]
        matrix = a[..., :, None] * g[..., None, :] if memory_order == "ag" else (
            g[..., :, None] * a[..., None, :])
    else:
        matrix = jnp.einsum("nktg,nta->nk" + (memory_order or "ga"), grads, inputs)
    kernel = (spec.kernel_from_matrix(matrix) if memory_order is None
              else matrix.reshape((n, k) + spec.kernel_shape))
    out = {"kernel": kernel}
    if spec.bias is not None:
        out["bias"] = grads.sum(axis=2)
    return out


def leaf_gradients(plan: CapturePlan, layout: LayerCollection,
                   captured: Captured) -> list[jax.Array]:
    """The per-example, per-output gradient of every parameter leaf, raveled: one
    ``(n, K, size_i)`` array per leaf, in flat leaf order — the chunk's Jacobian
    ``(n, K, d)`` cut at the leaves (:func:`jaxgeom.layers.concat_last` of the list).

    Captured layers' leaves are outer products of their ``(a, g)`` (:func:`example_gradients`),
    the others slices of ``captured.other``. Left as separate leaves so that a consumer
    writing them into a buffer (``dynamic_update_slice``) gets each product fused into its
    write, with no chunk-sized intermediate.
    """
    n, k = captured.outputs.shape
    pieces: dict[int, jax.Array] = {}
    for spec, inputs, grads in zip(plan.specs, captured.inputs, captured.grads):
        for name, value in example_gradients(spec, inputs, grads).items():
            pieces[getattr(spec, name)] = value.reshape(n, k, -1)
    start = 0
    for leaf in plan.other_leaves:
        size = layout.sizes[leaf]
        pieces[leaf] = captured.other[:, :, start:start + size]
        start += size
    return [pieces[i].astype(layout.dtype) for i in range(plan.num_leaves)]
