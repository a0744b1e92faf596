"""Builds from data sharded across devices.

Three ways to spread a build's examples over several devices, and how each one goes:

- **automatic sharding** (GSPMD: arrays placed with a ``NamedSharding`` over a mesh whose
  axes are ``AxisType.Auto``): the builders' compiled steps are partitioned by XLA like
  any jitted function; nothing to do here.
- **explicit sharding** (the default axis type of :func:`jax.make_mesh` in recent JAX:
  the sharding is part of each array's type): the builders cut batches into chunks, pad
  them and ``vmap`` over examples beside unsharded operands, which explicit sharding does
  not define (a slice of a sharded axis, mapped operands sharded differently). A builder
  given such data runs with the mesh's explicit axes made automatic, as
  :func:`jax.sharding.auto_axes` does: the arrays stay where they are, XLA partitions
  the work, and the result comes back replicated on the caller's mesh.
- **manual sharding** (:func:`jax.shard_map`): each device builds from its own shard —
  means over its examples — and the caller combines them (``jax.lax.pmean`` over the
  data axis gives the mean over all examples for every representation whose storage is
  linear in the per-example statistics). This needs ``check_vma=False``: the builders
  replay the model's equations and differentiate per example, and the varying-axes types
  would make every per-example gradient of the replicated parameters a sum over devices.
  Under ``check_vma=True`` the builders raise with this fix.

:func:`accepts_sharded_data` wraps the public builders to do the second and refuse the
third with a clear error. The operations take vectors sharded like FSDP parameters
(:func:`gathered`, called where vectors are read: :func:`jaxgeom.vector.as_flat`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import jax

from jaxgeom import data as data_lib
from jaxgeom._compile import behind_barrier
from jaxgeom._signature import _AVAL_TYPES

_AxisType = getattr(jax.sharding, "AxisType", None)
_SUPPORTED = _AxisType is not None and hasattr(jax.sharding, "use_abstract_mesh")
_SINGLE_DEVICE = jax.sharding.SingleDeviceSharding
_Tracer = jax.core.Tracer

_VARYING_MESSAGE = (
    "{name} was called inside jax.shard_map with check_vma=True on data that varies over "
    "the mesh axes {axes}. jaxgeom's builders replay the model per example, and under "
    "check_vma every per-example gradient of the replicated parameters would be summed "
    "over the devices. Call jax.shard_map(..., check_vma=False): each device then builds "
    "from its own shard, and jax.lax.pmean over {axes} of the result's arrays gives the "
    "mean over all examples."
)


def accepts_sharded_data(builder: Callable | None = None, *,
                         data: tuple[str, ...] = ("data",)) -> Callable:
    """Wrap a builder ``builder(..., params, data, ...)`` so that it accepts data (and
    parameters) sharded over explicit mesh axes, and refuses data varying over
    ``shard_map``'s manual axes under ``check_vma=True`` (module docstring).

    ``data``: the names of the builder's data arguments (a cross kernel reads two data
    sets); ``accepts_sharded_data(data=(...))`` gives the decorator.

    Cost when nothing is sharded: the data's first batch read and one look at the
    placement of the parameters' and the first batch's leaves, ≈ 3 µs a build for a model
    of a few layers (the arguments are read by name, not bound: ``inspect``'s binding
    alone took 5 µs).
    """
    if builder is None:
        return functools.partial(accepts_sharded_data, data=data)
    if not _SUPPORTED:
        return builder
    signature = inspect.signature(builder)
    looked_up = _Positions.of(signature, ("params", *data))

    def call(*args, **kwargs):
        arguments = _Arguments(args, kwargs, looked_up)
        if not all(name in arguments for name in data):  # the builder's own TypeError
            signature.bind(*args, **kwargs)
        looked_at = []
        for name in data:
            first, arguments[name] = data_lib.peek(arguments[name])
            # a list is looked at whole (a few µs a batch); a stream batch by batch as it
            # is read
            looked_at.append(arguments[name] if isinstance(arguments[name], list) else first)
        leaves = _not_on_one_device(jax.tree_util.tree_leaves((arguments.get("params"),
                                                                looked_at)))
        if any(isinstance(leaf, _Tracer) for leaf in leaves):  # inside a trace
            for name in data:  # no build's work on one batch folded at compile time
                if data_lib.is_single_batch(arguments[name]):
                    arguments[name] = behind_barrier(arguments[name])
        mesh, devices = _explicit_mesh(builder.__name__, leaves)
        if mesh is None:
            for name in data:
                arguments[name] = _batches_checked(builder.__name__, arguments[name])
            return builder(*arguments.args, **arguments.kwargs)
        bound = signature.bind(*arguments.args, **arguments.kwargs)
        automatic = mesh.update_axis_types({a: _AxisType.Auto for a in mesh.explicit_axes})
        # the builder's argument leaves -> the caller's: a traced argument returned as is
        # (an EK-FAC refit's eigenbasis) comes back as the very array given, which the
        # checks of a shared basis rely on
        originals: dict[int, tuple[Any, Any]] = {}
        with _mesh_context(automatic, devices):
            for name, value in bound.arguments.items():
                bound.arguments[name] = (_batches_on(automatic, value) if name in data
                                         else _on(automatic, value, originals))
            result = builder(*bound.args, **bound.kwargs)
        with _mesh_context(mesh, devices):
            return jax.tree_util.tree_map(functools.partial(_replicated, originals), result)

    return functools.wraps(builder)(call)


class _Positions(dict):
    """The position of each named argument in a call, where it may be given positionally
    (``NOT_POSITIONAL`` where it may not: keyword only)."""

    NOT_POSITIONAL = float("inf")

    @classmethod
    def of(cls, signature: inspect.Signature, names: tuple[str, ...]) -> _Positions:
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        return cls({name: index if parameter.kind in positional else cls.NOT_POSITIONAL
                    for index, (name, parameter) in enumerate(signature.parameters.items())
                    if name in names})


class _Arguments:
    """A call's ``args`` and ``kwargs``, some arguments read and replaced by name."""

    def __init__(self, args: tuple, kwargs: dict, positions: _Positions):
        self.args, self.kwargs, self._positions = list(args), dict(kwargs), positions

    def __contains__(self, name: str) -> bool:
        return self._positions[name] < len(self.args) or name in self.kwargs

    def __getitem__(self, name: str) -> Any:
        index = self._positions[name]
        return self.args[index] if index < len(self.args) else self.kwargs[name]

    def __setitem__(self, name: str, value: Any) -> None:
        index = self._positions[name]
        if index < len(self.args):
            self.args[index] = value
        else:
            self.kwargs[name] = value

    def get(self, name: str) -> Any:
        return self[name] if name in self._positions and name in self else None


def _not_on_one_device(leaves: list) -> list:
    """``leaves`` but the concrete arrays on one device (no mesh, never varying, not
    traced): what the placement checks look at (none, outside traces and meshes)."""
    return [leaf for leaf in leaves
            if not (type(leaf) in _AVAL_TYPES and type(leaf.sharding) is _SINGLE_DEVICE)]


def _explicit_mesh(name: str, leaves: list) -> tuple[Any, Any]:
    """The (abstract) mesh of the first of ``leaves`` (filtered by
    :func:`_not_on_one_device`) placed on a mesh with explicit axes (sharded or
    replicated: sharding-in-types holds for both) and, when that leaf is a concrete array,
    its devices (``(None, None)``: no leaf is); raises on a leaf varying over manual axes
    under ``check_vma``."""
    for leaf in leaves:
        aval = getattr(leaf, "aval", None)
        if aval is None:
            continue
        vma = _varying(aval)
        if vma:
            raise ValueError(_VARYING_MESSAGE.format(name=name, axes=tuple(sorted(vma))))
        mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
        if mesh is not None and not mesh.empty and mesh.explicit_axes:
            concrete = getattr(getattr(leaf, "sharding", None), "mesh", None)
            return mesh, getattr(concrete, "devices", None)
    return None, None


def _varying(aval: Any) -> frozenset:
    """The manual mesh axes ``aval`` varies over (``aval.vma`` in earlier JAX,
    ``aval.manual_axis_type.varying`` since)."""
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return vma or frozenset()


def _mesh_context(mesh: Any, devices: Any) -> Any:
    """Enter ``mesh`` unless it is the caller's: as a concrete mesh on ``devices`` outside
    ``jit`` (computations made of new arrays only, such as a buffer's zeros, are then
    placed on it), as an abstract one while tracing."""
    if jax.sharding.get_abstract_mesh() == mesh:
        return contextlib.nullcontext()
    if devices is not None:
        try:
            return jax.sharding.set_mesh(jax.sharding.Mesh(devices, mesh.axis_names,
                                                           axis_types=mesh.axis_types))
        except ValueError:  # tracing, with a concrete array closed over: refused there
            pass
    return jax.sharding.use_abstract_mesh(mesh)


def _on(automatic: Any, tree: Any, originals: dict | None = None) -> Any:
    """``tree``'s arrays typed on the ``automatic`` mesh (their placement unchanged), each
    recorded in ``originals`` (``id`` of the leaf handed to the builder: it and the
    caller's)."""

    def convert(leaf):
        aval = getattr(leaf, "aval", None)
        mesh = getattr(getattr(aval, "sharding", None), "mesh", None)
        converted = leaf
        if not (mesh is None or mesh.empty or mesh == automatic):
            converted = jax.sharding.reshard(leaf, jax.sharding.PartitionSpec())
        if originals is not None and aval is not None:  # the new leaf is kept too: its
            originals[id(converted)] = (converted, leaf)  # id stays its own
        return converted

    return jax.tree_util.tree_map(convert, tree)


def _batches_checked(name: str, data: Any) -> Any:
    """``data`` (a stream whose first batch is not on a mesh with explicit axes) refusing,
    as they are read, later batches that are: the build has started without the mesh."""
    if data_lib.is_single_batch(data) or isinstance(data, list):
        return data

    def check(batch):
        mesh, _ = _explicit_mesh(name, _not_on_one_device(jax.tree_util.tree_leaves(batch)))
        if mesh is not None:
            raise ValueError(
                f"{name}: a batch of the data is placed on a mesh with explicit axes "
                f"{mesh.explicit_axes}, and the first batch is not. Place every batch alike "
                "(jax.device_put each one with the same NamedSharding), or pass the "
                "batches as a list, which is looked at whole before the build."
            )
        return batch

    return map(check, data) if iter(data) is data else _Converted(data, check)


def _batches_on(automatic: Any, data: Any) -> Any:
    """``data`` with every batch's arrays typed on the ``automatic`` mesh, converted as the
    build reads them (a list stays a list: its size is known before reading it)."""
    convert = functools.partial(_on, automatic)
    if data_lib.is_single_batch(data):
        return convert(data)
    if isinstance(data, list):
        return [convert(batch) for batch in data]
    if iter(data) is data:
        return map(convert, data)
    return _Converted(data, convert)


class _Converted:
    """A re-iterable of batches converted as they are read."""

    def __init__(self, data: Iterable, convert: Callable):
        self.data, self.convert = data, convert

    def __iter__(self):
        return map(self.convert, self.data)


def _replicated(originals: dict, leaf: Any) -> Any:
    if getattr(leaf, "aval", None) is None:
        return leaf
    converted, original = originals.get(id(leaf), (None, None))
    # a traced argument handed back (identity is how a trace tells arrays apart; concrete
    # ones compare by value), unless split over an explicit axis: as given
    if (converted is leaf and isinstance(original, jax.core.Tracer)
            and _explicit_sharding(original) is None):
        return original
    return jax.sharding.reshard(leaf, jax.sharding.PartitionSpec())


def gathered(tree: Any) -> tuple[Any, Callable[[Any], Any]]:
    """``(tree, restore)``: ``tree`` with its leaves that are sharded over explicit mesh
    axes gathered onto every device of their mesh, and ``restore``, which puts a tree of
    the same structure back on the original shardings (the identity when no leaf is
    sharded so).

    What the operations do with a vector sharded like FSDP parameters: a product's
    raveling and slicing of such a leaf are not defined under sharding-in-types, and the
    matrix a sharded build returns is replicated; the result comes back sharded as the
    vector was. Cost when nothing is sharded: one look at each leaf's ``aval``, done at
    trace time inside the operations' compiled calls.
    """
    if not _SUPPORTED:
        return tree, _unchanged
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    shardings = [_explicit_sharding(leaf) for leaf in leaves]
    if not any(shardings):
        return tree, _unchanged
    replicated = jax.sharding.PartitionSpec()
    leaves = [leaf if s is None else
              jax.sharding.reshard(leaf, jax.sharding.NamedSharding(s.mesh, replicated))
              for leaf, s in zip(leaves, shardings)]

    def restore(result: Any) -> Any:
        out, out_def = jax.tree_util.tree_flatten(result)
        return jax.tree_util.tree_unflatten(out_def, [
            leaf if s is None else jax.sharding.reshard(leaf, s)
            for leaf, s in zip(out, shardings)])

    return jax.tree_util.tree_unflatten(treedef, leaves), restore


def _unchanged(tree: Any) -> Any:
    return tree


def _explicit_sharding(leaf: Any) -> Any:
    """The sharding of a leaf split over some explicit mesh axis, else ``None``."""
    sharding = getattr(getattr(leaf, "aval", None), "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or mesh.empty:  # the common case first: no mesh
        return None
    explicit = mesh.explicit_axes
    for part in sharding.spec:
        names = part if isinstance(part, tuple) else (part,)
        if any(name in explicit for name in names):
            return sharding
    return None
