"""``PMatDiag``: the diagonal of the matrix, nothing else."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxgeom.capture import capture_chunk
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat._structured import CanonicalDiagonal, MeanOfJacobians
from jaxgeom.pmat.base import check_shape, representation, static_field
from jaxgeom.pmat.kfac import (
    CaptureBuilder,
    all_finite,
    capture_plan,
    flat_diagonal,
    squared_gradients,
)
from jaxgeom.streaming import builder


@representation
class PMatDiag(MeanOfJacobians, CanonicalDiagonal):
    """The diagonal approximation ``M ≈ diag(m)``, ``m_i = (1/N) Σₙₖ (Jₙ)ₖᵢ²`` (flat order).

    Build (``FIM``, ``FIM_MonteCarlo``, ``SecondMoment``): one streaming pass over the
    captured layer inputs ``a`` and output gradients ``g`` (:mod:`jaxgeom.capture`): for a
    dense layer without weight sharing ``Σ (g²)ᵀ(a²)``, cost ``N K (g_l + a_l g_l)``, no
    per-example gradient formed; with weight sharing (convolutions, sequences) the chunk's
    per-example gradients of that layer; exact per-example gradients for the other leaves.
    Memory ``d`` plus one chunk's captures (never a ``d × d`` matrix, never the chunk's
    full Jacobian). ``PMatDiag.accumulator`` reduces explicit per-example Jacobians instead
    (``Σ J²``), for the generic :func:`jaxgeom.jacobian.accumulate` driver.
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
      >>> F = FIM(model.apply, variables, (x, y), PMatDiag)
      >>> step = F.solve(grads, regul=1e-3)   # (F + 1e-3 I)⁻¹ g, elementwise
    """

    layer_collection: LayerCollection = static_field()
    data: jax.Array = dataclasses.field(default=None)

    PROMOTION_RANK: ClassVar[int] = 1

    def __post_init__(self):
        d = self.layer_collection.numel()
        # leading dimensions are a stack (see check_shape), but a (d, d) array is most
        # likely a matrix meant to be reduced to its diagonal
        if getattr(self.data, "shape", None) == (d, d) and d > 1:
            raise ValueError(
                f"PMatDiag data is the ({d},) diagonal (or a stack of them); got a ({d}, {d}) "
                "matrix: pass jnp.diag(M) for its diagonal, or PMatDense(layer_collection, M) "
                "for the matrix")
        check_shape("PMatDiag data", getattr(self.data, "shape", None), f"({d},)",
                    lambda s: s == (d,), 1)

    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *, mode="auto",
                      **options):
        """``(1/N) Σₙₖ (∂zₙₖ/∂θ)²`` from captured ``(a, g)`` in one streaming pass
        (:class:`DiagBuilder`; ``mode`` is accepted for a uniform signature: the capture
        uses one ``vjp`` per output)."""
        del mode
        if options:
            raise TypeError(f"PMatDiag takes no build options; got {sorted(options)}")
        return DiagBuilder(capture_plan(fn, params, example, aux, layout), layout)

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


@builder
class DiagBuilder(CaptureBuilder):
    """``Σₙₖ J²`` of each masked chunk from its captures, layer by layer
    (:func:`~jaxgeom.pmat.kfac.squared_gradients`); the mean, in the flat order, is the
    diagonal."""

    finalizes_traced: ClassVar[bool] = True

    def statistics(self, params, batch, mask, offset, aux):
        cap = capture_chunk(self.plan, params, batch, offset, aux, mask)
        squares = squared_gradients(cap, self.plan, self.layout)
        return squares, all_finite(cap, squares)

    def finalize(self, total, stream) -> PMatDiag:
        return PMatDiag(self.layout, flat_diagonal(self.plan, self.layout, total, stream.n))
