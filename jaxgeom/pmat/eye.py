"""``PMatEye``: a multiple of the identity, ``M = s·I``."""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom.layers import LayerCollection
from jaxgeom.pmat._structured import CanonicalDiagonal
from jaxgeom.pmat.base import PMatAbstract, _implements, representation, static_field


@representation
class PMatEye(CanonicalDiagonal):
    """The scaled identity ``M = s·I`` (``d × d``), stored as one scalar.

    Not built from data: construct it directly, ``PMatEye(layer_collection, scaling)``
    (e.g. ``PMatEye(F.layer_collection, 1e-3)`` for a damping term, ``F + λ·I``).
    Storage ``1``. Operations in closed form: ``trace = d·s``, ``frobenius_norm = √d·|s|``,
    ``norm(±2) = |s|``, ``inv(regul) = 1/(s + regul)``, ``pinv`` (``0`` when ``|s|`` is below
    the threshold), ``pow(p, regul) = (s + regul)^p`` — all ``O(1)``; ``mv``/``solve``:
    ``d``. ``Eye · X = X · Eye = s·X`` keeps ``X``'s representation, and ``Eye + X`` takes
    ``X``'s (``Eye`` is the lowest in the promotion order).

    Attributes:
      layer_collection: the parameter layout (static).
      scaling: ``s``, a 0-d array (a Python number is converted to the parameters' dtype).
    """

    layer_collection: LayerCollection = static_field()
    scaling: jax.Array = dataclasses.field(default=1.0)

    PROMOTION_RANK: ClassVar[int] = 0

    def __post_init__(self):
        dtype = getattr(self.scaling, "dtype", None)
        if isinstance(self.scaling, (numbers.Number, np.ndarray, np.generic)) or (
                dtype is not None and not jnp.issubdtype(dtype, jnp.inexact)):  # jnp ints
            object.__setattr__(
                self, "scaling", jnp.asarray(self.scaling, self.layer_collection.dtype)
            )
        # leading dimensions are a stack (see check_shape), but a (d,) vector is most
        # likely meant as a diagonal
        d = self.layer_collection.numel()
        if getattr(self.scaling, "shape", ()) == (d,) and d > 1:
            raise ValueError(
                f"PMatEye scaling must be a scalar (0-d), or a stack of them; got shape "
                f"({d},), the number of parameters: for a diagonal use PMatDiag"
            )

    VALUES_RANK = 0

    @property
    def _values(self) -> jax.Array:
        return self.scaling

    def _with(self, values: jax.Array) -> PMatEye:
        return PMatEye(self.layer_collection, values)

    def to_dense(self):
        return self.scaling * jnp.eye(self.layer_collection.numel(), dtype=self.scaling.dtype)

    def mm(self, other: PMatAbstract) -> PMatAbstract:
        """``s · other``, in ``other``'s representation when it supports scaling."""
        self._check_compatible(other)
        if _implements(type(other), "_scale"):
            return other._scale(self.scaling)
        return super().mm(other)
