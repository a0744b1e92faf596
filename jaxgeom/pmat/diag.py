"""``PMatDiag``: the diagonal of the matrix, nothing else."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxgeom.layers import LayerCollection
from jaxgeom.pmat._structured import CanonicalDiagonal, MeanOfJacobians
from jaxgeom.pmat.base import representation, static_field


@representation
class PMatDiag(MeanOfJacobians, CanonicalDiagonal):
    """The diagonal approximation ``M ≈ diag(m)``, ``m_i = (1/N) Σₙₖ (Jₙ)ₖᵢ²`` (flat order).

    Build: ``N K B`` for the per-example Jacobians plus ``N K d`` for the squares; memory
    ``d`` plus one chunk of Jacobians (never a ``d × d`` matrix).
    Operations, all ``d``: ``mv``, ``solve`` (closed form ``v / (m + regul)`` by default,
    or ``"cg"``), ``inv``, ``pinv``, ``pow`` (elementwise on ``m``, which are the
    eigenvalues), ``trace``, ``norm``; ``eigvalsh`` sorts (``d log d``). ``eigh`` is not
    offered: the eigenvectors are the canonical basis and the eigenvalues ``get_diag()``.
    ``Diag · Diag`` and ``Diag · Eye`` stay diagonal; ``Diag + Eye`` is a ``PMatDiag``,
    ``Diag + BlockDiag`` a ``PMatBlockDiag``, ``Diag + Dense`` a ``PMatDense``.

    Attributes:
      layer_collection: the parameter layout (static).
      data: the ``(d,)`` diagonal.

    Example:
      >>> F = FIM(model.apply, params, (x, y), PMatDiag)
      >>> step = F.solve(grads, regul=1e-3)   # (F + 1e-3 I)⁻¹ g, elementwise
    """

    layer_collection: LayerCollection = static_field()
    data: jax.Array = dataclasses.field(default=None)

    PROMOTION_RANK: ClassVar[int] = 1

    def __post_init__(self):
        d = self.layer_collection.numel()
        if self.data is not None and hasattr(self.data, "shape") and self.data.shape != (d,):
            raise ValueError(f"PMatDiag data must have shape ({d},); got {self.data.shape}")

    @property
    def _values(self) -> jax.Array:
        return self.data

    def _with(self, values: jax.Array) -> PMatDiag:
        return PMatDiag(self.layer_collection, values)

    @staticmethod
    def _zeros(layer_collection: LayerCollection, dtype) -> jax.Array:
        return jnp.zeros((layer_collection.numel(),), dtype)

    @staticmethod
    def _term(layer_collection: LayerCollection, jac: jax.Array) -> jax.Array:
        """``Σₙₖ Jₙₖ²`` (elementwise square) of one chunk."""
        return jnp.einsum("nkd,nkd->d", jac, jac)
