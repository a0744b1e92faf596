"""Layers: the groups of parameter leaves that one linear operation consumes.

A :class:`LayerCollection` is the static description of a parameter pytree that every
jaxgeom object carries: the tree structure, each leaf's path, shape and dtype, the flat
order (that of :func:`jax.flatten_util.ravel_pytree`) and the partition of the leaves
into layers. It is hashable, so representations keep it as static pytree metadata and
cross ``jax.jit`` boundaries.

Layers are discovered by tracing the model to a jaxpr (:meth:`LayerCollection.from_model`),
so the same code serves Flax linen, Flax NNX (``nnx.split`` state), Equinox
(``eqx.partition``) and plain functions. A subset of a model's layers is a sub-collection
(:func:`jaxgeom.restriction.restrict`); sub-collections of one model unite and intersect
(:meth:`LayerCollection.union`, :meth:`LayerCollection.intersection`,
:meth:`LayerCollection.get_common_layers`) in the model's flat order.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("dense", "conv", "norm", "embedding", "other")
"""Layer kinds: ``dense`` (a ``dot_general`` with a kernel), ``conv``
(``conv_general_dilated``), ``norm`` (a normalisation's scale and shift), ``embedding``
(a ``gather`` from a table) and ``other`` (anything else, including unused leaves)."""

KRONECKER_KINDS = ("dense", "conv", "embedding")
"""Kinds of the layers whose kernel (table) a linear operation consumes: the candidates for
a Kronecker-factored block (see :attr:`Layer.kronecker_obstacle`)."""


def path_to_str(path: tuple) -> str:
    """Human-readable ``a/b/0`` form of a pytree key path."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(str(key.name))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:  # pragma: no cover - future key types
            parts.append(str(key))
    return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Layer:
    """One layer: the leaves a linear operation consumes.

    Attributes:
      id: the layer's name, the common path of its leaves (e.g. ``"params/Dense_0"``).
      kind: one of :data:`KINDS`.
      leaves: indices of the layer's leaves in the flat leaf order (ascending).
      roles: the role of each leaf (``"kernel"``, ``"bias"``, ``"scale"``, ``"shift"``,
        ``"table"`` or ``"param"``), aligned with ``leaves``.
      uses: how many operations consume the layer's kernel (``> 1`` means weight sharing
        across operations, e.g. tied embeddings).
      ops: for a dense/conv/embedding layer, the operation behind each use, in program
        order (``"dot_general"``, ``"gather"``, ``"conv_general_dilated"``, or
        ``"conv_general_dilated with feature_group_count=3"`` for a grouped convolution).
        A kernel used by several operations takes the kind of its first use (a tied
        embedding read by a ``gather``, then by a ``dot_general``, is an ``embedding``).
    """

    id: str
    kind: str
    leaves: tuple[int, ...]
    roles: tuple[str, ...] = ()
    uses: int = 1
    ops: tuple[str, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown layer kind {self.kind!r}; valid kinds: {KINDS}")
        if not self.roles:
            object.__setattr__(self, "roles", ("param",) * len(self.leaves))

    @property
    def kronecker_obstacle(self) -> str | None:
        """Why a dense/conv/embedding layer's block is not of the form ``A ⊗ G``, or ``None``.

        The Kronecker-factored representations (KFAC, EKFAC, and the quasi-diagonal's
        per-neuron strips) need the per-example kernel gradient to be one sum of outer
        products ``∇_W z = Σ_t g_t a_tᵀ`` over the positions ``t`` of *one* operation. That
        fails for a kernel consumed by several operations (tied embeddings, a layer applied
        twice: the gradient is a sum over operations with different inputs and output
        gradients) and for a grouped convolution (each group of output channels sees its
        own group of input channels: the kernel is block-structured, not one ``g × a``
        matrix). Other kinds (norms, other leaves) are ``None``: they are not candidates
        and keep exact blocks.
        """
        if self.kind not in KRONECKER_KINDS:
            return None
        if self.uses > 1:
            ops = f" ({', '.join(self.ops)})" if self.ops else ""
            return f"its kernel is consumed by {self.uses} operations{ops}"
        grouped = [op for op in self.ops if _is_grouped(op)]
        if grouped:
            return f"it is a grouped convolution ({grouped[0]})"
        return None


def _check_array_leaves(paths: tuple[str, ...], leaves: list) -> None:
    """Refuse a parameter leaf that is not a number: a PRNG key (``jax.random.key``, which
    ``nnx.split(model)`` returns with the state of a model holding ``nnx.Rngs``) has no
    place in the flat order (integer and boolean leaves are constants, with zero rows)."""
    for path, leaf in zip(paths, leaves):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.extended):
            raise ValueError(
                f"params leaf {path!r} has dtype {dtype} (a PRNG key), not a number: pass the "
                "parameters only and close over the rest in apply_fn; for a Flax NNX model, "
                "split its parameters from its other state, graphdef, params, rest = "
                "nnx.split(model, nnx.Param, ...), apply_fn = lambda p, x: "
                "nnx.merge(graphdef, p, rest)(x)")


@dataclasses.dataclass(frozen=True)
class LayerCollection:
    """Static layout of a parameter pytree, partitioned into layers.

    Attributes:
      treedef: the pytree structure of the parameters.
      paths: the path of each leaf (``a/b/c``), in flat order.
      shapes: the shape of each leaf.
      dtypes: the dtype name of each leaf.
      layers: the layers, ordered by their first leaf; together they cover every leaf
        exactly once.
      origin: for a sub-collection (a subset of a model's layers:
        :func:`jaxgeom.restriction.restrict`, :meth:`union`, :meth:`intersection`), the
        index of each of its leaves among the leaves of the model's whole layout (the
        *root*), ascending; ``None`` for a root layout. What places the leaves of two
        sub-collections of one model in the model's flat order, for :meth:`union`.

    The flat order of every flat vector and of every ``to_dense()`` is the order of
    ``jax.flatten_util.ravel_pytree(params)``: leaves in ``jax.tree_util`` order, each
    raveled row-major.
    """

    treedef: Any
    paths: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    layers: tuple[Layer, ...]
    origin: tuple[int, ...] | None = None

    def __post_init__(self):
        covered = sorted(i for layer in self.layers for i in layer.leaves)
        if covered != list(range(len(self.paths))):
            raise ValueError(
                "the layers of a LayerCollection must cover every parameter leaf exactly once; "
                f"got leaf indices {covered} for {len(self.paths)} leaves"
            )
        ids = [layer.id for layer in self.layers]
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate layer ids in {ids}")
        if self.origin is not None and (
                len(self.origin) != len(self.paths)
                or any(a >= b for a, b in zip(self.origin, self.origin[1:]))):
            raise ValueError(
                f"origin must hold one ascending root leaf index per leaf ({len(self.paths)}); "
                f"got {self.origin}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_params(cls, params: Any, layers: tuple[Layer, ...] | None = None) -> LayerCollection:
        """Layout of ``params``; without ``layers``, leaves are grouped by parent path.

        Grouping by parent path (``Dense_0/kernel`` with ``Dense_0/bias``) is the fallback
        when no model is available to trace; :meth:`from_model` finds the real layers.
        """
        leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(params)
        if not leaves_with_paths:
            raise ValueError("params has no array leaves")
        paths = tuple(path_to_str(p) for p, _ in leaves_with_paths)
        _check_array_leaves(paths, [x for _, x in leaves_with_paths])
        shapes = tuple(tuple(int(s) for s in np.shape(x)) for _, x in leaves_with_paths)
        dtypes = tuple(str(jnp.result_type(x)) for _, x in leaves_with_paths)
        if layers is None:
            layers = _group_by_parent(paths)
        return cls(treedef, paths, shapes, dtypes, tuple(sorted(layers, key=lambda l: l.leaves[0])))

    @classmethod
    def from_model(cls, apply_fn: Callable, params: Any, *args: Any) -> LayerCollection:
        """Discover the layers of ``apply_fn(params, *args)`` by tracing it to a jaxpr.

        ``args`` are example inputs (only their shapes and dtypes matter; one example is
        enough). Works for any function of ``params``: Flax linen ``model.apply`` (with
        params wrapped as the function expects), the state of ``nnx.split``, the array part
        of an Equinox module, or plain ``jnp`` code.
        """
        from jaxgeom._discovery import discover_layers

        layout = cls.from_params(params)
        layers = discover_layers(apply_fn, params, args, layout.paths)
        return cls(layout.treedef, layout.paths, layout.shapes, layout.dtypes, layers)

    # ------------------------------------------------------------------ properties
    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        """Number of scalars in each leaf."""
        return tuple(int(np.prod(s, dtype=np.int64)) for s in self.shapes)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Flat start offset of each leaf (one more entry: the total)."""
        return tuple(int(o) for o in np.concatenate([[0], np.cumsum(self.sizes)]))

    def numel(self) -> int:
        """Total number of parameters ``d``."""
        return self.offsets[-1]

    @functools.cached_property
    def dtype(self):
        """The common dtype of the parameters (the promotion of all leaf dtypes): that of
        flat vectors and of the matrices. Integer or boolean leaves (constants, whose
        derivative is zero: :mod:`jaxgeom._differentiable`) promote to the floating
        leaves' dtype; a layout of such leaves only (a restriction to a step counter) has
        the default floating dtype."""
        floating = [d for d in self.dtypes if jnp.issubdtype(d, jnp.inexact)]
        return jnp.result_type(*floating) if floating else jnp.result_type(float)

    def layer(self, layer_id: str) -> Layer:
        for layer in self.layers:
            if layer.id == layer_id:
                return layer
        raise KeyError(f"no layer {layer_id!r}; layers are {[l.id for l in self.layers]}")

    def layer_slices(self, layer: Layer | str) -> list[tuple[int, int]]:
        """The flat ``(start, stop)`` ranges of a layer's leaves, in flat order."""
        layer = self.layer(layer) if isinstance(layer, str) else layer
        return [(self.offsets[i], self.offsets[i + 1]) for i in layer.leaves]

    def layer_indices(self, layer: Layer | str) -> np.ndarray:
        """The flat indices of a layer's parameters, ascending (a static numpy array)."""
        return np.concatenate([np.arange(a, b) for a, b in self.layer_slices(layer)])

    def layer_numel(self, layer: Layer | str) -> int:
        return sum(b - a for a, b in self.layer_slices(layer))

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    # ------------------------------------------------------------------ vectors
    def to_flat(self, tree: Any) -> jax.Array:
        """Ravel a params-shaped pytree to a flat ``(d,)`` vector (in the flat order)."""
        return ravel_tree(tree)

    def from_flat(self, flat: jax.Array) -> Any:
        """Unravel a flat ``(d,)`` vector (or ``(..., d)`` stack) into a params-shaped pytree."""
        lead = flat.shape[:-1]
        leaves = [
            flat[..., a:b].reshape(lead + shape)
            for a, b, shape in zip(self.offsets[:-1], self.offsets[1:], self.shapes)
        ]
        return jax.tree_util.tree_unflatten(self.treedef, leaves)

    def check_tree(self, tree: Any, what: str = "vector") -> None:
        """Raise a ``ValueError`` naming the leaf path if ``tree`` does not match the params."""
        got, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if treedef != self.treedef:
            got_paths = [path_to_str(p) for p, _ in got]
            missing = [p for p in self.paths if p not in got_paths]
            extra = [p for p in got_paths if p not in self.paths]
            detail = []
            if missing:
                detail.append(f"missing leaves {missing}")
            if extra:
                detail.append(f"unexpected leaves {extra}")
            if not detail:
                detail.append(f"structure {treedef} instead of {self.treedef}")
            raise ValueError(
                f"the {what}'s pytree structure does not match the parameters: "
                + "; ".join(detail)
                + ". Pass a pytree shaped like params, a PVector, or a flat vector of size "
                f"{self.numel()}."
            )
        for (_, leaf), shape, want_path in zip(got, self.shapes, self.paths):
            got_shape = tuple(np.shape(leaf))
            if got_shape != shape:
                stacked = len(got_shape) > len(shape) and got_shape[
                    len(got_shape) - len(shape):] == shape
                raise ValueError(
                    f"the {what}'s leaf {want_path!r} has shape {got_shape}, "
                    f"but the parameter has shape {shape}" + (
                        ". For a stack of vectors (a leading axis on every leaf) use "
                        "jax.vmap, e.g. jax.vmap(M.mv)(stacked)" if stacked else "")
                )

    def check_params(self, params: Any) -> None:
        """Raise a ``ValueError`` if this collection was made for other parameters than
        ``params`` (other leaf shapes, or another number of leaves)."""
        shapes = tuple(tuple(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(params))
        if shapes != tuple(self.shapes):
            count = sum(int(np.prod(s, dtype=np.int64)) for s in shapes)
            raise ValueError(
                f"layer_collection was made for other parameters ({self.numel()} in leaves "
                f"of shapes {list(self.shapes)}) than params ({count} in leaves of shapes "
                f"{list(shapes)}): make it from these params "
                "(LayerCollection.from_model(apply_fn, params, x)), or pass none")

    def difference(self, other: LayerCollection) -> tuple[str, str] | None:
        """The first field in which ``other`` differs from this layout, with the first
        difference in words (for error messages): ``("structure", …)`` (pytree structure or
        leaf paths), ``("shapes", …)``, ``("dtypes", …)`` or ``("layers", …)`` (the grouping
        of the leaves, or the layers' kinds, roles, uses); ``None`` when they are equal."""
        if self.treedef != other.treedef or self.paths != other.paths:
            return "structure", f"pytree structures {self.treedef} and {other.treedef}"
        for name in ("shapes", "dtypes"):
            for path, a, b in zip(self.paths, getattr(self, name), getattr(other, name)):
                if a != b:
                    return name, f"leaf {path!r} of {name[:-1]} {a} and {b}"
        for a, b in zip(self.layers + (None,), other.layers + (None,)):
            if a != b:
                if a is None or b is None or (a.id, a.leaves) != (b.id, b.leaves):
                    return "layers", "layers that group the leaves differently"
                return "layers", (f"layer {a.id!r} of kind {a.kind!r}, roles {a.roles} and "
                                  f"kind {b.kind!r}, roles {b.roles}")
        if self.origin != other.origin:
            return "layers", (f"leaves taken from the model's leaves {self.origin} and "
                              f"{other.origin}")
        return None

    # ------------------------------------------------------------------ subsets of layers
    @property
    def root_leaves(self) -> tuple[int, ...]:
        """The index of each leaf among the root layout's leaves (:attr:`origin`; a root
        layout's own indices)."""
        return self.origin if self.origin is not None else tuple(range(len(self.paths)))

    def _signature(self, layer: Layer) -> tuple:
        """What makes two collections' layers the same layer of one model: kind, roles,
        uses, operations, and each leaf's root index, path, shape and dtype."""
        leaves = tuple((self.root_leaves[i], self.paths[i], self.shapes[i], self.dtypes[i])
                       for i in layer.leaves)
        return layer.id, layer.kind, layer.roles, layer.uses, layer.ops, leaves

    def get_common_layers(self, other: LayerCollection) -> tuple[str, ...]:
        """The ids of the layers that this collection and ``other`` both hold — the same
        layer of one model: same id, kind and roles, leaves of the same root positions,
        paths, shapes and dtypes — in this collection's (the flat) order. NNGeometry's
        ``get_common_layers``. Cost ``O(leaves)``."""
        check_layer_collection(other, "other")
        theirs = {layer.id: other._signature(layer) for layer in other.layers}
        return tuple(layer.id for layer in self.layers
                     if theirs.get(layer.id) == self._signature(layer))

    def intersection(self, other: LayerCollection) -> LayerCollection:
        """The sub-collection of the layers both collections hold
        (:meth:`get_common_layers`), in the flat order: this collection itself when it
        has no other layers, else the sub-collection that
        ``jaxgeom.restriction.restrict(self, ids)`` makes (leaves as one flat list). What
        NNGeometry's ``LayerCollection.merge`` returns. Cost ``O(leaves)``.

        Raises:
          ValueError: when the two have no layer in common.
        """
        common = self.get_common_layers(other)
        if not common:
            raise ValueError(
                f"the two layer collections have no layer in common (layers "
                f"{_ids(self)} and {_ids(other)}): their intersection would be empty")
        if len(common) == len(self.layers):
            return self
        return sub_collection(self, common)

    def union(self, other: LayerCollection) -> LayerCollection:
        """The collection of the layers either holds, in the model's flat order.

        The larger one when it holds every layer of the other (``lc.union(sub) is lc`` for
        a sub-collection of ``lc``). Otherwise both must be sub-collections of one model
        (:func:`jaxgeom.restriction.restrict`), whose :attr:`origin` places their leaves:
        the result is the sub-collection ``restrict(root, ids of both)`` makes (leaves as
        one flat list, ordered by their position in the root). Cost ``O(leaves)``.

        Raises:
          ValueError: when the two are not layer subsets of one model (a layer id held by
            both as different layers, a root leaf claimed by two layers, or a root
            layout that lacks a layer of the other).
        """
        check_layer_collection(other, "other")
        common = set(self.get_common_layers(other))
        if len(common) == len(other.layers):
            return self
        if len(common) == len(self.layers):
            return other
        problem = _union_conflict(self, other, common)
        if problem:
            raise ValueError(
                f"the layer collections (layers {_ids(self)} and {_ids(other)}) are not "
                f"layer subsets of one model: {problem}. Make both with "
                "jaxgeom.restriction.restrict(layer_collection, ids) from the model's "
                "layout")
        leaves = {}
        for lc in (self, other):
            for i, root in enumerate(lc.root_leaves):
                leaves[root] = (lc.paths[i], lc.shapes[i], lc.dtypes[i])
        layers = [(layer, tuple(lc.root_leaves[i] for i in layer.leaves))
                  for lc in (self, other) for layer in lc.layers
                  if lc is self or layer.id not in common]
        return _assembled(leaves, layers)

    # ------------------------------------------------------------------ display
    def summary(self) -> str:
        """A table of the layers: id, kind, leaves with shapes, number of parameters."""
        rows = [("layer", "kind", "leaves", "params")]
        for layer in self.layers:
            leaves = ", ".join(
                f"{_leaf_name(self.paths[i], layer.id)}{list(self.shapes[i])}"
                for i in layer.leaves)
            kind = layer.kind + (f" (x{layer.uses})" if layer.uses > 1 else "")
            if any(_is_grouped(op) for op in layer.ops):
                kind += " (grouped)"
            rows.append((layer.id, kind, leaves, str(self.layer_numel(layer))))
        widths = [max(len(r[c]) for r in rows) for c in range(4)]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.append(f"total: {len(self.layers)} layers, {self.numel()} parameters")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _ids(lc: LayerCollection) -> list[str]:
    return [layer.id for layer in lc.layers]


def _union_conflict(a: LayerCollection, b: LayerCollection, common: set[str]) -> str | None:
    """Why ``a`` and ``b`` (neither holding the other's layers) are not layer subsets of
    one model, or ``None``."""
    for lc in (a, b):
        if lc.origin is None:
            other = b if lc is a else a
            missing = [i for i in _ids(other) if i not in common]
            return (f"the root layout of layers {_ids(lc)} lacks the layers {missing}")
    ids = {layer.id: a._signature(layer) for layer in a.layers}
    for layer in b.layers:
        if layer.id in ids and layer.id not in common:
            return f"layer {layer.id!r} differs between them"
    owner = {root: (layer.id, a.paths[i]) for layer in a.layers for i in layer.leaves
             for root in (a.root_leaves[i],)}
    for layer in b.layers:
        for i in layer.leaves:
            held = owner.get(b.root_leaves[i])
            if held is not None and held != (layer.id, b.paths[i]):
                return (f"root leaf {b.root_leaves[i]} is {held[1]!r} of layer {held[0]!r} "
                        f"in one and {b.paths[i]!r} of layer {layer.id!r} in the other")
    return None


def _assembled(leaves: dict[int, tuple[str, tuple[int, ...], str]],
               layers: Sequence[tuple[Layer, tuple[int, ...]]]) -> LayerCollection:
    """The sub-collection of the root leaves ``leaves`` (``{root index: (path, shape,
    dtype)}``) partitioned into ``layers`` (each with its leaves' root indices): one flat
    list of leaves, ordered by root index, the layers by their first leaf."""
    roots = tuple(sorted(leaves))
    position = {root: k for k, root in enumerate(roots)}
    chosen = sorted((dataclasses.replace(layer, leaves=tuple(position[r] for r in rl))
                     for layer, rl in layers), key=lambda layer: layer.leaves[0])
    return LayerCollection(
        jax.tree_util.tree_structure([0] * len(roots)),
        tuple(leaves[r][0] for r in roots), tuple(leaves[r][1] for r in roots),
        tuple(leaves[r][2] for r in roots), tuple(chosen), origin=roots)


def sub_collection(lc: LayerCollection, layer_ids: Sequence[str]) -> LayerCollection:
    """The sub-collection of the layers ``layer_ids`` of ``lc`` (see :func:`_assembled`);
    its :attr:`~LayerCollection.origin` places it in ``lc``'s root."""
    chosen = [lc.layer(i) for i in layer_ids]
    leaves = {lc.root_leaves[i]: (lc.paths[i], lc.shapes[i], lc.dtypes[i])
              for layer in chosen for i in layer.leaves}
    return _assembled(leaves, [(layer, tuple(lc.root_leaves[i] for i in layer.leaves))
                               for layer in chosen])


def _leaf_name(path: str, layer_id: str) -> str:
    """A leaf's name in its layer's row: its path below the layer (``kernel``; an NNX
    state's ``kernel/value``), else its last part."""
    if path.startswith(layer_id + "/"):
        return path[len(layer_id) + 1:]
    return path.rsplit("/", 1)[-1]


def check_layer_collection(value: Any, what: str = "layer_collection") -> LayerCollection:
    """``value`` if it is a :class:`LayerCollection`; else a ``TypeError`` that names the
    ways to make one (the parameters themselves, passed in its place, are the usual slip).
    """
    if isinstance(value, LayerCollection):
        return value
    counted = (np.ndim(value) == 0 and hasattr(value, "dtype")
               and np.issubdtype(value.dtype, np.integer))
    raise TypeError(
        f"{what} must be a LayerCollection (the parameter layout); got a "
        f"{type(value).__name__}. " + (
            "The representation class was called with a step count, as optax calls a "
            "schedule: under optax.inject_hyperparams pass static_args="
            "jaxgeom.optim.STATIC_ARGS, which keeps the representation, apply_fn and the "
            "periods out of the injected hyperparameters" if counted else
            "Make one from the parameters: "
            "LayerCollection.from_model(apply_fn, params, x) (the layers the model uses) or "
            "LayerCollection.from_params(params) (leaves grouped by parent path), or reuse "
            "a matrix's: M.layer_collection"))


def _is_grouped(op: str) -> bool:
    """Whether an op description (:attr:`Layer.ops`) is a grouped convolution."""
    return "group_count=" in op


def _group_by_parent(paths: tuple[str, ...]) -> tuple[Layer, ...]:
    groups: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        parent = path.rsplit("/", 1)[0] if "/" in path else path
        groups.setdefault(parent, []).append(i)
    return tuple(Layer(id=parent, kind="other", leaves=tuple(ix)) for parent, ix in groups.items())


def ravel_tree(tree: Any) -> jax.Array:
    """The leaves of ``tree`` raveled and concatenated, in leaf order, in their common dtype."""
    leaves = jax.tree_util.tree_leaves(tree)
    dtype = jnp.result_type(*leaves)
    return concat_last([jnp.ravel(x).astype(dtype) for x in leaves])


def concat_last(parts: Sequence[jax.Array]) -> jax.Array:
    """Concatenate arrays ``(..., n_i)`` along their last axis.

    Vectors are concatenated as ``(1, n_i)`` rows: XLA:CPU compiles a 1-D concatenation
    to a loop several times slower (670k floats: 2.2 ms against 0.2 ms), which made the
    flattening of a params-shaped vector cost more than the product it fed.
    """
    if parts[0].ndim == 1:
        return jnp.concatenate([p[None] for p in parts], axis=1)[0]
    return jnp.concatenate(parts, axis=-1)
