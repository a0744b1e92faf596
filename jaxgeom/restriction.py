"""Restriction of a model to a subset of its layers.

:func:`restrict` makes, for a subset of layers, the sub-:class:`LayerCollection` of their
leaves (a flat list of leaves, in the flat order, keeping paths, kinds and roles), and
:class:`RestrictedFunction` the per-example function of those leaves alone,
``fn_p(leaves_p, example, index, (params, aux)) = fn(params with leaves_p, example, index,
aux)``. Everything that differentiates a per-example function builds on it unchanged: the
per-example Jacobian, or the capture of layer inputs and output gradients
(:mod:`jaxgeom.capture`), is then taken with respect to the subset's leaves only — the
columns ``J[:, :, indices]`` of the whole Jacobian, computed without the others.

Used by :class:`jaxgeom.pmat.PMatMixed` (each part built on its own layers) and by
:meth:`jaxgeom.pfmap.PFMapImplicit.to_dense_layer` (one layer's columns without the whole
``(K, N, d)`` map).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxgeom.layers import LayerCollection, check_layer_collection, sub_collection


@dataclasses.dataclass(frozen=True)
class Restriction:
    """A subset of the layers of a :class:`LayerCollection`.

    Attributes:
      layer_collection: the sub-collection: one flat *list* of the subset's leaves (in the
        flat order), with the original paths, shapes, kinds and roles, and their positions
        among the model's leaves (:attr:`~jaxgeom.layers.LayerCollection.origin`: a
        restriction of a restriction is the restriction of the model, and two
        restrictions unite and intersect, :meth:`~jaxgeom.layers.LayerCollection.union`,
        :meth:`~jaxgeom.layers.LayerCollection.intersection`).
      leaves: the subset's leaf indices in the full collection (ascending).
      indices: the subset's flat indices in the full flat order (ascending).
    """

    layer_collection: LayerCollection
    leaves: tuple[int, ...]
    indices: np.ndarray = dataclasses.field(compare=False, hash=False)

    def select(self, params: Any) -> list:
        """The sub-parameters (a list of leaves) of a full ``params`` pytree."""
        leaves = jax.tree_util.tree_leaves(params)
        return [leaves[i] for i in self.leaves]

    def merge(self, params: Any, sub: Sequence) -> Any:
        """``params`` with the subset's leaves replaced by ``sub``."""
        leaves, treedef = jax.tree_util.tree_flatten(params)
        for i, x in zip(self.leaves, sub):
            leaves[i] = x
        return treedef.unflatten(leaves)

    def apply_fn(self, apply_fn: Callable, params: Any) -> Callable:
        """``apply_fn`` as a function of the sub-parameters, the others fixed at ``params``
        (to build a part yourself, e.g. ``FIM(R.apply_fn(f, params), R.select(params), …,
        layer_collection=R.layer_collection)``).

        The other parameters are those of ``params`` now: their containers are copied (as
        :class:`~jaxgeom.replay.ReplayedFunction` does), so that a model updated in place
        later (Flax NNX's ``nnx.split`` state holds its ``Variable`` objects) does not move
        them."""
        params = jax.tree_util.tree_map(lambda x: x, params)
        return lambda sub, *args: apply_fn(self.merge(params, sub), *args)


def restrict(layer_collection: LayerCollection,
             layer_ids: str | Sequence[str]) -> Restriction:
    """The :class:`Restriction` of ``layer_collection`` to the layers ``layer_ids`` (one
    id or a sequence of them: ``[layer.id for layer in layer_collection]``). Cached: the
    same subset of the same layout is made once."""
    if isinstance(layer_ids, str):
        layer_ids = (layer_ids,)
    check_layer_collection(layer_collection)
    layer_ids = tuple(layer_ids)
    if not layer_ids or len(set(layer_ids)) != len(layer_ids):
        raise ValueError(f"restrict needs distinct layer ids, at least one; got {layer_ids}")
    return _restrict(layer_collection, layer_ids)


@functools.lru_cache(maxsize=256)
def _restrict(layer_collection: LayerCollection, layer_ids: tuple[str, ...]) -> Restriction:
    lc = layer_collection
    leaves = tuple(sorted(i for layer_id in layer_ids for i in lc.layer(layer_id).leaves))
    indices = np.concatenate([np.arange(lc.offsets[i], lc.offsets[i + 1]) for i in leaves])
    return Restriction(sub_collection(lc, layer_ids), leaves, indices)


@dataclasses.dataclass(frozen=True)
class RestrictedFunction:
    """A per-example function of the sub-parameters: ``aux`` is ``(params, aux)``."""

    fn: Callable
    restriction: Restriction

    def __call__(self, sub, example, index, aux):
        params, inner = aux
        return self.fn(self.restriction.merge(params, sub), example, index, inner)
