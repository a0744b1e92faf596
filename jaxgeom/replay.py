"""A per-example function together with the parameters and data it is evaluated on.

Matrix-free objects (:class:`~jaxgeom.pmat.implicit.PMatImplicit`,
:class:`~jaxgeom.pfmap.PFMapImplicit`, the implicit Hessian) store no matrix: they replay
``fn`` over ``data`` at every product. This mixin holds what they need and how they read
the data; the classes that use it add the products.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import numpy as np

from jaxgeom import data as data_lib
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat.base import static_field
from jaxgeom.streaming import scans_in_jit


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class ReplayedFunction:
    """Fields of a matrix-free object (a pytree: ``params``, ``data``, ``aux`` and ``scale``
    are children, the rest static).

    Attributes:
      layer_collection: the parameter layout (static).
      fn: the per-example function ``fn(params, example, index, aux) -> (K,)``
        (:mod:`jaxgeom.jacobian`; static).
      params: where ``fn`` is differentiated.
      data: the list of batches ``fn`` is evaluated on (read once per product).
      aux: the arrays shared by all examples (``fn``'s last argument).
      scale: a scalar coefficient (scalar multiplication changes only it).
      batch_size: the chunk size (``None``: one chunk per batch; static).
      mode: ``"auto"``, ``"reverse"`` or ``"forward"`` for per-example Jacobians (static).
    """

    layer_collection: LayerCollection = static_field()
    fn: Callable = static_field(default=None)
    params: Any = None
    data: list = None
    aux: Any = None
    scale: Any = 1.0
    batch_size: int | None = static_field(default=None)
    mode: str = static_field(default="auto")

    #: builders materialise one-shot data as a list, since it is read many times
    NEEDS_REPLAY: ClassVar[bool] = True
    #: whether the products' chunk loops run as one ``lax.scan`` inside a ``jit``
    #: (:func:`~jaxgeom.streaming.scan_chunks`: padded chunks of one shape; the implicit
    #: Hessian's unpadded ones by :func:`~jaxgeom.streaming.scan_real_chunks`)
    SCANS_CHUNKS: ClassVar[bool] = True

    def __post_init__(self) -> None:
        """Keep ``params`` and ``aux`` in containers of their own (the leaves, immutable
        arrays, are shared): the object is frozen, but the containers passed in may not
        be. The state of Flax NNX's ``nnx.split`` holds the model's ``Variable`` objects,
        which ``nnx.Optimizer.update`` (or any ``variable[...] = …``) rebinds in place, so
        that a matrix built before training would otherwise take its products at the
        trained parameters. A tree copy rebuilds every container (``Variable`` objects, dicts),
        as JAX's unflattening does."""
        for name in ("params", "aux"):
            leaves, treedef = jax.tree_util.tree_flatten(getattr(self, name))
            object.__setattr__(self, name, jax.tree_util.tree_unflatten(treedef, leaves))

    def check_shapes(self) -> None:
        """Refuse ``params`` of other shapes than the layer collection's (a state of another
        model restored into this target: it would fail later, far from the cause). Run by
        Flax's ``from_bytes``/``from_state_dict``."""
        got = [tuple(np.shape(leaf)) for leaf in jax.tree_util.tree_leaves(self.params)]
        if got != list(self.layer_collection.shapes):
            raise ValueError(
                f"{type(self).__name__}: params of leaf shapes {got} for a layer collection of "
                f"{list(self.layer_collection.shapes)}. A state of another model? Restore it "
                "into a target built for the same model")

    @property
    def num_examples(self) -> int:
        """``N``, the number of examples in ``data`` (static, from the shapes)."""
        return sum(data_lib.num_examples(batch) for batch in self.data)

    def _chunks(self) -> Iterator[data_lib.Chunk]:
        return data_lib.iter_chunks(self.data, self.batch_size)

    def _scans_chunks(self, *trees: Any) -> bool:
        """Whether a product with ``trees`` reads the chunks by one ``lax.scan``
        (:func:`~jaxgeom.streaming.scans_in_jit`: inside a ``jit``, data of several
        chunks) rather than a loop of :meth:`_chunks`."""
        return self.SCANS_CHUNKS and scans_in_jit(self.data, self.batch_size, self.params,
                                                  self.aux, *trees)
