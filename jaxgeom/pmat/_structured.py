"""Pieces shared by the structured representations ``PMatEye``, ``PMatDiag``, ``PMatBlockDiag``.

- :class:`CanonicalDiagonal`: the algebra of ``M = diag(λ)``, whose eigenvectors are the
  canonical basis, so that every matrix function acts elementwise on the stored values.
- :func:`structured_mm`: ``A · B`` in the more general of the two structures (the promotion
  order ``Eye < Diag < BlockDiag < Dense`` of ``+``), instead of the generic dense product.
- :class:`MeanOfJacobians`: building from data as ``M = (1/N) Σₙ term(Jₙ)`` (the
  accumulator protocol of :mod:`jaxgeom.jacobian`) from two small class methods.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgeom._reindex import LeafVector
from jaxgeom._sorting import sort
from jaxgeom.layers import LayerCollection, concat_last
from jaxgeom.pmat import _spectral
from jaxgeom.pmat.base import ITERATIVE_SOLVE_METHODS, PMatAbstract, _implements, take
from jaxgeom.pmat.dense import _no_options
from jaxgeom.streaming import mean


class CanonicalDiagonal(PMatAbstract):
    """``M = diag(λ)`` in the canonical basis, stored as ``values`` broadcasting to ``(d,)``.

    ``values`` is the ``(d,)`` diagonal (``PMatDiag``) or one 0-d scaling of the identity
    (``PMatEye``). The eigenvalues are the diagonal entries and the eigenvectors the
    canonical basis, so ``mv``, ``solve``, ``inv``, ``pinv``, ``pow``, ``+``, ``·`` are
    elementwise: cost ``values.size`` (``trace`` and norms too; ``get_diag``/``mv``: ``d``).
    """

    #: ``"default"`` is the closed form ``v / (λ + regul)``.
    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("default", *ITERATIVE_SOLVE_METHODS)
    LEAFWISE_SOLVES: ClassVar[tuple[str, ...]] = ("default",)

    @property
    @abc.abstractmethod
    def _values(self) -> jax.Array:
        """The stored diagonal: ``(d,)`` or a 0-d scalar standing for every entry."""

    @abc.abstractmethod
    def _with(self, values: jax.Array) -> CanonicalDiagonal:
        """The same representation with other values."""

    #: products take a params-shaped vector leaf by leaf (the diagonal's leaf slices are
    #: static): no flat copy of it, 2-5x faster than flattening on XLA:CPU.
    LEAFWISE: ClassVar[bool] = True
    EXACT_EIGENVALUES: ClassVar[bool] = True

    # ------------------------------------------------------------------ primitives
    def _elementwise(self, v, op):
        """``op(λ, v)`` for a flat ``v``; leaf by leaf for a :class:`LeafVector`."""
        values = self._values
        if not isinstance(v, LeafVector):
            return op(values, v)
        edges = v.offsets
        per_leaf = [values[a:b] if values.ndim else values for a, b in zip(edges[:-1], edges[1:])]
        return LeafVector(tuple(op(m, x) for m, x in zip(per_leaf, v.leaves)), edges)

    def _mv(self, v):
        return self._elementwise(v, jnp.multiply)

    def _vTMv(self, v):
        terms = self._elementwise(v, lambda m, x: jnp.vdot(x, m * x))
        return sum(terms.leaves) if isinstance(terms, LeafVector) else terms

    def _solve(self, v, regul, method, **options):
        if method == "default":
            return self._elementwise(v, lambda m, x: x / (m + regul))
        return super()._solve(v, regul, method, **options)

    #: the rank of one matrix's ``values`` (``(d,)``: 1; a scalar: 0); leading axes are a
    #: stack, whose members' traces and norms are reduced apart
    VALUES_RANK: ClassVar[int] = 1

    @property
    def _axes(self) -> tuple[int, ...]:
        return tuple(range(-self.VALUES_RANK, 0))

    @property
    def _multiplicity(self) -> float:
        """How many diagonal entries each stored value stands for (1, or d for a scalar)."""
        return 1.0 if self.VALUES_RANK else float(self.layer_collection.numel())

    def get_diag(self):
        return jnp.broadcast_to(self._values, (self.layer_collection.numel(),))

    def to_dense(self):
        return jnp.diag(self.get_diag())

    def trace(self):
        return jnp.sum(self._values, axis=self._axes) * self._multiplicity

    def frobenius_norm(self):
        return jnp.sqrt(jnp.sum(jnp.abs(self._values) ** 2, axis=self._axes)
                        * self._multiplicity)

    def eigvalsh(self):
        return sort(self.get_diag())

    def _norm(self, ord: Any) -> jax.Array:
        if ord in (2, -2):
            magnitudes = jnp.abs(self._values)
            return (jnp.max if ord == 2 else jnp.min)(magnitudes, axis=self._axes)
        return super()._norm(ord)

    def eigh(self):
        self._unsupported(
            "eigh", "the eigenvectors are the canonical basis: the eigenvalues are get_diag()"
        )

    eigh.unsupported = True  # raises only: not listed among the representations that do

    def _eigsh(self, k, which):
        """``k`` diagonal entries (chosen as ``which`` says) and their canonical basis
        vectors ``eᵢ``: ``O(d log k)``, ``k d`` for the ``(d, k)`` one-hot vectors."""
        values = self.get_diag()
        chosen = _spectral.select(values, k, which)
        return values[chosen], jax.nn.one_hot(chosen, values.shape[0], dtype=values.dtype).T

    # ------------------------------------------------------------------ functions
    def inv(self, regul: Any = 0.0) -> CanonicalDiagonal:
        return self._with(1 / (self._values + regul))

    def pinv(self, atol: Any = None, rtol: Any = None) -> CanonicalDiagonal:
        return self._with(_spectral.pinv(self._values, atol, rtol))

    def pow(self, p: Any, regul: Any = 0.0) -> CanonicalDiagonal:
        return self._with(_spectral.power(self._values, p, regul, int(self._multiplicity)))

    # ------------------------------------------------------------------ algebra
    def mm(self, other: PMatAbstract) -> PMatAbstract:
        return structured_mm(self, other)

    def _mm_same(self, other: CanonicalDiagonal) -> CanonicalDiagonal:
        return self._with(self._values * other._values)

    def _scale(self, s):
        return self._with(self._values * s)

    def _add_same(self, other, sign):
        return self._with(self._values + sign * other._values)

    def _restricted(self, r) -> CanonicalDiagonal:
        """The diagonal's entries ``S`` (``d_S``); a scaling of the identity as it is."""
        values = take(self._values, r.indices, -1) if self.VALUES_RANK else self._values
        return type(self)(r.layer_collection, values)

    @classmethod
    def from_pmat(cls, other: PMatAbstract) -> CanonicalDiagonal:
        """Exact conversion from a representation lower in the promotion order."""
        if isinstance(cls._check_pmat(other), cls):
            return other
        rank = type(other).PROMOTION_RANK
        if rank is not None and rank < cls.PROMOTION_RANK:
            return cls(other.layer_collection, other.get_diag())
        raise NotImplementedError(
            f"{cls.__name__} cannot hold a {type(other).__name__} exactly (its off-diagonal "
            "entries would be dropped); convert to a more general representation "
            "(PMatBlockDiag.from_pmat, PMatDense.from_pmat), or keep only the diagonal on "
            "purpose with PMatDiag(M.layer_collection, M.get_diag())"
        )


def structured_mm(a: PMatAbstract, b: PMatAbstract) -> PMatAbstract:
    """``a · b`` in the more general representation of the two (the promotion order of ``+``).

    Both are converted to that representation (``from_pmat``, exact upwards) and multiplied
    by its ``_mm_same``; a ``PMatEye`` factor only scales the other one. When the target has
    no structured product (``PMatDense``, or a representation outside the promotion order)
    the product is dense.
    """
    from jaxgeom.pmat.eye import PMatEye

    a._check_compatible(b)
    if isinstance(b, PMatEye) and _implements(type(a), "_scale"):
        return a._scale(b.scaling)
    ranks = (type(a).PROMOTION_RANK, type(b).PROMOTION_RANK)
    target = None if None in ranks else (type(a) if ranks[0] >= ranks[1] else type(b))
    if target is None or not hasattr(target, "_mm_same"):
        return PMatAbstract.mm(a, b)
    return target.from_pmat(a)._mm_same(target.from_pmat(b))


class MeanOfJacobians:
    """Mixin for representations built as ``M = (1/N) Σₙ term(Jₙ)`` with a pytree state.

    The class gives ``_zeros(layer_collection, dtype)`` (the zero state) and
    ``_term(layer_collection, jac)`` (the contribution of one chunk's masked Jacobian
    ``(n, K, d)``) — or overrides ``_add_term`` to add it into the state in place, and then
    ``_mean`` if that state is only part of the sum (BlockDiag's upper block triangles) —,
    and is constructed as ``cls(layer_collection, mean)``.
    """

    @classmethod
    def _add_term(cls, layer_collection: LayerCollection, state: Any,
                  pieces: list[jax.Array]) -> Any:
        """``state + term(jac)`` for the chunk's Jacobian given by leaf (``pieces``, as the
        accumulator receives it); ``state`` is donated (the chunk's compiled step)."""
        term = cls._term(layer_collection, concat_last(pieces))
        return jax.tree_util.tree_map(jnp.add, state, term)

    @staticmethod
    def _mean(state: Any, n: int) -> Any:
        """The mean of the summed state (``state`` donated)."""
        return mean(state, n)

    @classmethod
    def accumulator(cls, layer_collection: LayerCollection, **options) -> MeanAccumulator:
        _no_options(cls, options)
        return MeanAccumulator(layer_collection, cls)


@dataclasses.dataclass(frozen=True)
class MeanAccumulator:
    """The accumulator (:mod:`jaxgeom.jacobian`) of a :class:`MeanOfJacobians`
    representation: sums ``term`` over chunks, then divides by ``N``. Hashable: a static
    argument of the compiled step."""

    layer_collection: LayerCollection
    representation: type

    def init(self, dtype: Any) -> Any:
        return self.representation._zeros(self.layer_collection, dtype)

    def update(self, state: Any, pieces: list[jax.Array]) -> Any:
        return self.representation._add_term(self.layer_collection, state, pieces)

    def finalize(self, state: Any, n: int) -> PMatAbstract:
        return self.representation(self.layer_collection, self.representation._mean(state, n))

