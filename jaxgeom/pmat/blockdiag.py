"""``PMatBlockDiag``: one dense block per layer, zero between layers."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import _host_lapack
from jaxgeom._lapack import side_by_side
from jaxgeom._memory import check_fits
from jaxgeom._reindex import FlatPartition
from jaxgeom._sorting import sort
from jaxgeom.layers import Layer, LayerCollection
from jaxgeom.pmat import _spectral
from jaxgeom.pmat._gram import add_upper_gram, mean_of_upper_grams
from jaxgeom.pmat._structured import MeanOfJacobians, structured_mm
from jaxgeom.pmat.base import (
    ITERATIVE_SOLVE_METHODS,
    ITERATIVE_SOLVES,
    PMatAbstract,
    check_shape,
    representation,
    static_field,
)
from jaxgeom.pmat.base import take as _take
from jaxgeom.pmat.dense import SMALLER_REPRESENTATIONS, PMatDense
from jaxgeom.restriction import Restriction


@representation
class PMatBlockDiag(MeanOfJacobians, PMatAbstract):
    """The layer-block-diagonal matrix: ``M_ll = (1/N) Σₙ Jₙ,ₗᵀ Jₙ,ₗ`` for each layer ``l``
    (``Jₙ,ₗ`` the columns of the Jacobian on the layer's parameters), zero across layers.

    A layer's flat indices (``layer_collection.layer_indices(layer)``) need not be
    contiguous (e.g. a plain dict ``{"b1", "b2", "w1", "w2"}`` interleaves two layers);
    blocks are in the order of ``layer_collection.layers`` and index the layer's parameters
    in ascending flat order. Every block is a :class:`PMatDense` on its own, so all dense
    operations apply blockwise.

    Build: ``N K B`` for the per-example Jacobians plus ``N K Σ d_l²``; memory ``Σ d_l²``
    plus one chunk of Jacobians (never a ``d × d`` matrix).
    Operations: ``mv`` ``Σ d_l²``; ``solve`` ``Σ d_l³`` (per block: Cholesky by default,
    ``"eigh"``, ``"lstsq"``; or ``"cg"`` on the whole matrix); ``inv``/``pinv``/``pow``/
    ``eigh``/``eigvalsh``/``norm(±2)`` ``Σ d_l³``; ``trace`` ``d``; Frobenius ``Σ d_l²``.
    ``BlockDiag · X`` and ``X · BlockDiag`` stay block-diagonal for ``X`` a ``PMatBlockDiag``,
    ``PMatDiag`` or ``PMatEye``; ``BlockDiag + Diag`` is a ``PMatBlockDiag``,
    ``BlockDiag + Dense`` a ``PMatDense``.

    Attributes:
      layer_collection: the parameter layout (static).
      blocks: a tuple of ``(d_l, d_l)`` arrays, one per layer of ``layer_collection.layers``.
    """

    layer_collection: LayerCollection = static_field()
    blocks: tuple[jax.Array, ...] = dataclasses.field(default=())

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("cholesky", "eigh", "lstsq",
                                                *ITERATIVE_SOLVE_METHODS)
    SOLVE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {"lstsq": ("rcond",),
                                                           **ITERATIVE_SOLVES}
    FACTORISING_OPERATIONS: ClassVar[tuple[str, ...]] = PMatAbstract.FACTORISES
    PROMOTION_RANK: ClassVar[int] = 2

    def __post_init__(self):
        if isinstance(self.blocks, list):
            object.__setattr__(self, "blocks", tuple(self.blocks))
        if not isinstance(self.blocks, tuple):
            return  # pytree internals may pass placeholders
        sizes = _partition(self.layer_collection).sizes
        shapes = tuple(getattr(b, "shape", None) for b in self.blocks)
        if len(shapes) != len(sizes):
            raise ValueError(
                f"PMatBlockDiag needs one (d_l, d_l) block per layer, shapes "
                f"{[(n, n) for n in sizes]}; got {list(shapes)}"
            )
        for i, (shape, n) in enumerate(zip(shapes, sizes)):
            check_shape(f"PMatBlockDiag block {i}", shape, f"({n}, {n})",
                        lambda s, n=n: s == (n, n), 2)

    # ------------------------------------------------------------------ blocks
    @property
    def _parts(self) -> _Partition:
        return _partition(self.layer_collection)

    def _dense_blocks(self) -> list[PMatDense]:
        """Each block as a ``PMatDense`` on a flat layout of its own."""
        return [PMatDense(lc, b) for lc, b in zip(self._parts.layouts, self.blocks)]

    def _blockwise(self, fn: Callable[[PMatDense], jax.Array]) -> PMatBlockDiag:
        """The ``PMatBlockDiag`` whose blocks are ``fn`` of each block (as a ``PMatDense``;
        a refusal of its eigenvalues names its layer)."""
        names = [f"block of layer {layer.id!r}" for layer in self.layer_collection.layers]
        return self._with(_spectral.each_part(names, fn, self._dense_blocks()))

    def get_block(self, layer: Layer | str) -> jax.Array:
        """The ``(d_l, d_l)`` block of a layer (id or :class:`~jaxgeom.layers.Layer`)."""
        layer_id = layer.id if isinstance(layer, Layer) else layer
        ids = [lyr.id for lyr in self.layer_collection.layers]
        if layer_id not in ids:
            raise KeyError(f"no layer {layer_id!r}; layers are {ids}")
        return self.blocks[ids.index(layer_id)]

    # ------------------------------------------------------------------ primitives
    def _mv(self, v):
        parts = self._parts.split(v)
        return self._parts.merge([b @ part for b, part in zip(self.blocks, parts)])

    def to_dense(self):
        return self._parts.flat.block_diagonal(self.blocks)

    def get_diag(self):
        return self._parts.merge([_spectral.diagonal(b) for b in self.blocks])

    def trace(self):
        return jnp.sum(_spectral.traces(list(self.blocks)))

    def frobenius_norm(self):
        return jnp.sqrt(sum(jnp.sum(jnp.abs(b) ** 2) for b in self.blocks))

    def eigvalsh(self):
        """All ``d`` eigenvalues, ascending: each block's (:func:`~jaxgeom.pmat._spectral.
        eigvalsh`, ``Σ d_l³``), side by side on a CPU's cores where that is faster —
        inside a trace, in one host call (:func:`~jaxgeom.pmat._spectral.host_eigvalshs`,
        :func:`~jaxgeom._lapack.side_by_side`) —, then one sort."""
        blocks = list(self.blocks)
        on_host = _spectral.host_eigvalshs if _host_lapack.may_run(self.dtype) else None
        return sort(jnp.concatenate(side_by_side(
            _spectral.eigvalsh, blocks, [b.shape[0] for b in blocks], on_host=on_host)))

    def eigh(self) -> tuple[tuple[jax.Array, jax.Array], ...]:
        """Per-block eigendecompositions: a tuple, in the order of ``layer_collection.layers``,
        of ``(λ ascending (d_l,), V (d_l, d_l))`` with ``M_ll = V diag(λ) Vᵀ``. The
        eigenvectors of block ``l`` live on ``layer_collection.layer_indices(layer)``; use
        ``eigvalsh()`` for all eigenvalues, sorted."""
        return tuple(b.eigh() for b in self._dense_blocks())

    def _eigsh(self, k, which):
        """``k`` eigenpairs among every block's (``Σ d_l³``), each vector written into its
        layer's flat indices (:func:`~jaxgeom.pmat._spectral.eigenpairs_of_pieces`)."""
        layout = self.layer_collection
        pieces = [(layout.layer_indices(layer), e, lambda i, q=q: q[:, i].T)
                  for layer, (e, q) in zip(layout.layers, self.eigh())]
        return _spectral.eigenpairs_of_pieces(pieces, k, which, self.size(0), self.dtype)

    def _solve(self, v, regul, method, **options):
        if method in ITERATIVE_SOLVES:  # on the whole matrix: a preconditioner acts on full vectors
            return super()._solve(v, regul, method, **options)
        parts = self._parts.split(v)
        return self._parts.merge([
            b._solve(part, regul, method, **options)
            for b, part in zip(self._dense_blocks(), parts)
        ])

    # ------------------------------------------------------------------ functions
    def inv(self, regul: Any = 0.0) -> PMatBlockDiag:
        return self._blockwise(lambda b: b.inv(regul).data)

    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatBlockDiag:
        """Pseudo-inverse; the threshold is relative to the largest eigenvalue of the whole
        matrix (as for ``PMatDense``), not of each block."""
        pinv = functools.partial(_spectral.pinv, atol=atol, rtol=rtol)
        return self._with(_spectral.spectral_functions(pinv, self.blocks))

    def pow(self, p: Any, regul: Any = 0.0) -> PMatBlockDiag:
        return self._blockwise(lambda b: b.pow(p, regul).data)

    # ------------------------------------------------------------------ algebra
    def mm(self, other: PMatAbstract) -> PMatAbstract:
        return structured_mm(self, other)

    def _mm_same(self, other: PMatBlockDiag) -> PMatBlockDiag:
        return self._with(tuple(a @ b for a, b in zip(self.blocks, other.blocks)))

    def _scale(self, s):
        return self._with(tuple(b * s for b in self.blocks))

    def _add_same(self, other, sign):
        return self._with(tuple(a + sign * b for a, b in zip(self.blocks, other.blocks)))

    def _with(self, blocks) -> PMatBlockDiag:
        return PMatBlockDiag(self.layer_collection, tuple(blocks))

    def _restricted(self, r: Restriction) -> PMatBlockDiag:
        """The blocks of the layers ``S`` (no copy: the same arrays)."""
        return PMatBlockDiag(r.layer_collection,
                             tuple(self.get_block(layer.id) for layer in r.layer_collection))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pmat(cls, other: PMatAbstract) -> PMatBlockDiag:
        """Exact from ``PMatEye``/``PMatDiag`` (diagonal blocks). From any other
        representation: the layer blocks of ``other.to_dense()`` — a projection that drops
        the entries between layers (exact when ``other`` is block-diagonal over these
        layers); ``+``/``-`` never convert a ``PMatDense`` this way (they promote to dense).
        """
        if isinstance(cls._check_pmat(other), cls):
            return other
        other_rank = type(other).PROMOTION_RANK
        partition = _partition(other.layer_collection)
        if other_rank is not None and other_rank < cls.PROMOTION_RANK:
            blocks = (jnp.diag(part) for part in partition.split(other.get_diag()))
        else:
            dense = other.to_dense()
            blocks = (_take(_take(dense, idx, 0), idx, 1) for idx in partition.indices)
        return cls(other.layer_collection, tuple(blocks))

    @staticmethod
    def _zeros(layer_collection: LayerCollection, dtype) -> tuple[jax.Array, ...]:
        sizes = _partition(layer_collection).sizes
        check_fits("PMatBlockDiag's storage", (sum(n * n for n in sizes),), dtype,
                   SMALLER_REPRESENTATIONS, arrays=len(sizes))
        return tuple(jnp.zeros((n, n), dtype) for n in sizes)

    @classmethod
    def _add_term(cls, layer_collection: LayerCollection, state: tuple,
                  pieces: list[jax.Array]) -> tuple[jax.Array, ...]:
        """Per layer ``Bₗ + Σₙₖ Jₙₖ,ₗᵀ Jₙₖ,ₗ`` for one chunk (``n K d_l²``) from its leaves'
        Jacobian pieces, its upper block triangle added into the (donated) block by
        :func:`~jaxgeom.pmat._gram.add_upper_gram` (completed by :meth:`_mean`): no copy of
        the chunk's Jacobian is cut into layers."""
        return tuple(add_upper_gram(block, [pieces[i] for i in layer.leaves])
                     for block, layer in zip(state, layer_collection.layers))

    @staticmethod
    def _mean(state: tuple, n: int) -> tuple[jax.Array, ...]:
        return mean_of_upper_grams(state, n)


# ----------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True, eq=False)
class _Partition:
    """The flat indices of each layer: split ``(..., d)`` arrays into per-layer parts and
    merge them back, by slices (:class:`~jaxgeom._reindex.FlatPartition`)."""

    indices: tuple[np.ndarray, ...]
    layouts: tuple[LayerCollection, ...]
    flat: FlatPartition

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(len(idx) for idx in self.indices)

    def split(self, x: jax.Array) -> list[jax.Array]:
        return self.flat.split(x)

    def merge(self, parts: list[jax.Array]) -> jax.Array:
        return self.flat.merge(parts)


@functools.lru_cache(maxsize=128)
def _partition(layer_collection: LayerCollection) -> _Partition:
    indices = tuple(layer_collection.layer_indices(layer) for layer in layer_collection.layers)
    dtype = layer_collection.dtype
    layouts = tuple(LayerCollection.from_params(np.zeros(len(idx), dtype)) for idx in indices)
    return _Partition(indices, layouts, FlatPartition.of(indices, layer_collection.numel()))

