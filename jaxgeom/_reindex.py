"""Static re-indexing of flat vectors by slices, reshapes and transposes instead of gathers.

Representations split a flat ``(..., d)`` vector into per-layer pieces (a layer's kernel as
its ``(g, a)`` layer matrix, its bias, the parameters of a group of layers) and merge the
pieces back. The index arrays are static, and almost always regular: a piece is a contiguous
run of the flat axis read in a transposed order (Flax's ``(in, out)`` kernel as the
``(out, in)`` layer matrix; an ``HWIO`` convolution kernel as ``(O, HWI)``), or a few such
runs. XLA:CPU gathers and scatters with a constant index array cost an indexed load per
entry (the 670k parameters of a 784-512-512-10 MLP: 2.2 ms to split, 1.6 ms to merge, as
long as a Kronecker product of its layers' factors takes to apply); slices, reshapes and
transposes fuse into their consumers. :class:`FlatPartition` finds the regular form once,
at trace time, and keeps the gather only for the pieces that have none.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom.layers import concat_last

#: above this many runs a 1-D piece is gathered (one slice per run would unroll)
MAX_RUNS = 64


@dataclasses.dataclass(frozen=True)
class _View:
    """A piece that is the run ``[start, start + n)`` of the flat axis, reshaped to
    ``memory_shape`` (C order) and transposed by ``perm`` into ``shape``."""

    start: int
    memory_shape: tuple[int, ...]
    perm: tuple[int, ...]
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def take(self, x: jax.Array) -> jax.Array:
        lead = x.shape[:-1]
        run = _slice(x, self.start, self.start + self.size)
        run = run.reshape(lead + self.memory_shape)
        k = len(lead)
        run = jnp.transpose(run, tuple(range(k)) + tuple(k + p for p in self.perm))
        return run.reshape(lead + self.shape)

    def segments(self, part: jax.Array) -> list[tuple[int, jax.Array]]:
        """The piece's values back in flat order: one ``(start, (..., n))`` segment."""
        lead = part.shape[: part.ndim - len(self.shape)]
        k = len(lead)
        part = part.reshape(lead + tuple(self.memory_shape[p] for p in self.perm))
        part = jnp.transpose(part, tuple(range(k)) + tuple(k + j for j in _invert(self.perm)))
        return [(self.start, part.reshape(lead + (self.size,)))]


def _invert(perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = i
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class _Runs:
    """A 1-D piece made of a few contiguous runs ``(start, length)``, in piece order."""

    runs: tuple[tuple[int, int], ...]

    def take(self, x: jax.Array) -> jax.Array:
        parts = [_slice(x, s, s + n) for s, n in self.runs]
        return parts[0] if len(parts) == 1 else concat_last(parts)

    def segments(self, part: jax.Array) -> list[tuple[int, jax.Array]]:
        out, offset = [], 0
        for s, n in self.runs:
            out.append((s, jax.lax.slice_in_dim(part, offset, offset + n, axis=-1)))
            offset += n
        return out


@dataclasses.dataclass(frozen=True)
class _Gather:
    """Any other piece: a gather (and, to merge, a scatter through the inverse order)."""

    index: np.ndarray

    def take(self, x: jax.Array) -> jax.Array:
        if isinstance(x, LeafVector):
            x = x.flat()
        return x[..., self.index]


@dataclasses.dataclass(frozen=True)
class LeafVector:
    """A flat ``(d,)`` vector held as its raveled leaves (flat order), never concatenated:
    :class:`FlatPartition` takes its pieces from the leaves and, given ``like=`` one,
    merges back into leaves, so a params-shaped vector goes through a representation's
    product without the two copies of flattening and unflattening.

    Attributes:
      leaves: the raveled leaves.
      offsets: ``(len(leaves) + 1,)`` start of each leaf in the flat order, then ``d``.
    """

    leaves: tuple[jax.Array, ...]
    offsets: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.offsets[-1],)

    @classmethod
    def of(cls, leaves, offsets) -> LeafVector:
        return cls(tuple(jnp.ravel(x) for x in leaves), tuple(int(o) for o in offsets))

    def flat(self) -> jax.Array:
        return concat_last(list(self.leaves))

    def slice(self, start: int, stop: int) -> jax.Array:
        """Entries ``[start, stop)`` of the flat vector (one leaf's slice when they lie in
        one leaf)."""
        return _from_segments(list(zip(self.offsets[:-1], self.leaves)), start, stop)


def _slice(x, start: int, stop: int) -> jax.Array:
    if isinstance(x, LeafVector):
        return x.slice(start, stop)
    return jax.lax.slice_in_dim(x, start, stop, axis=-1)


def _from_segments(segments, start: int, stop: int) -> jax.Array:
    """Entries ``[start, stop)`` of the flat vector tiled by sorted 1-D ``(begin, values)``
    segments."""
    parts = []
    for begin, values in segments:
        end = begin + values.shape[-1]
        if end <= start or begin >= stop:
            continue
        lo, hi = max(start, begin), min(stop, end)
        parts.append(values if (lo, hi) == (begin, end)
                     else jax.lax.slice_in_dim(values, lo - begin, hi - begin, axis=-1))
    return parts[0] if len(parts) == 1 else concat_last(parts)


def regular_form(index: np.ndarray) -> _View | _Runs | None:
    """The slice/reshape/transpose form of a static index array, or ``None``."""
    index = np.asarray(index)
    if index.size == 0:
        return None
    if index.ndim == 1:
        breaks = np.flatnonzero(np.diff(index) != 1) + 1
        if len(breaks) >= MAX_RUNS:
            return None
        starts = np.concatenate([[0], breaks])
        lengths = np.diff(np.concatenate([starts, [index.size]]))
        return _Runs(tuple((int(index[s]), int(n)) for s, n in zip(starts, lengths)))
    return _affine_view(index)


def is_transposed_block(index: np.ndarray) -> bool:
    """Whether a 2-D index array is a contiguous C-ordered block read transposed (a kernel
    stored ``(a, g)`` seen as its ``(g, a)`` layer matrix)."""
    form = regular_form(index)
    return np.ndim(index) == 2 and isinstance(form, _View) and form.perm == (1, 0)


def _affine_view(index: np.ndarray) -> _View | None:
    """``index == start + Σₖ iₖ strideₖ`` with the strides of a C-ordered block, transposed."""
    origin = int(index.flat[0])
    axes = [k for k in range(index.ndim) if index.shape[k] > 1]
    unit = [tuple(int(k == j) for j in range(index.ndim)) for k in range(index.ndim)]
    strides = {k: int(index[unit[k]]) - origin for k in axes}
    memory = sorted(axes, key=lambda k: -strides[k])
    expected = 1
    for k in reversed(memory):
        if strides[k] != expected:
            return None
        expected *= index.shape[k]
    grid = origin + sum(
        np.arange(index.shape[k]).reshape([-1 if j == k else 1 for j in range(index.ndim)])
        * strides[k] for k in axes)
    if not np.array_equal(index, np.broadcast_to(grid, index.shape)):
        return None
    memory_shape = tuple(index.shape[k] for k in memory)
    perm = tuple(memory.index(k) for k in axes)
    return _View(origin, memory_shape, perm, index.shape)


@dataclasses.dataclass(frozen=True, eq=False)
class FlatPartition:
    """Pieces of the flat axis ``[0, d)``, each a static index array of any shape.

    ``split(x)`` gives ``x[..., piece]`` for every piece; ``merge(parts)`` is its inverse,
    the flat ``(..., d)`` array. When every piece has a regular form (:func:`regular_form`)
    merging is one concatenation of the pieces' runs in flat order; otherwise the pieces are
    concatenated and permuted with one gather.

    Attributes:
      pieces: the index arrays; together they hold every flat index once.
      forms: per piece, its regular form or a gather.
      d: the length of the flat axis.
    """

    pieces: tuple[np.ndarray, ...]
    forms: tuple[_View | _Runs | _Gather, ...]
    d: int

    @classmethod
    def of(cls, pieces: Sequence[np.ndarray], d: int | None = None) -> FlatPartition:
        pieces = tuple(np.asarray(p, dtype=np.int64) for p in pieces)
        flat = np.concatenate([p.ravel() for p in pieces]) if pieces else np.zeros(0, int)
        d = flat.size if d is None else d
        if flat.size != d or not np.array_equal(np.sort(flat), np.arange(d)):
            raise ValueError(f"the pieces do not partition the {d} flat indices")
        forms = tuple(regular_form(p) or _Gather(p) for p in pieces)
        return cls(pieces, forms, d)

    @property
    def _gathered(self) -> bool:
        return any(isinstance(f, _Gather) for f in self.forms)

    def split(self, x: jax.Array) -> list[jax.Array]:
        """``x[..., piece]`` for each piece: ``(..., d)`` → ``(..., *piece.shape)``."""
        return [form.take(x) for form in self.forms]

    def merge(self, parts: Sequence[jax.Array], like: object = None):
        """The ``(..., d)`` array whose pieces are ``parts`` (the inverse of :meth:`split`);
        a :class:`LeafVector` with the leaves of ``like`` when ``like`` is one."""
        if self._gathered:
            lead = parts[0].shape[: parts[0].ndim - self.pieces[0].ndim]
            flat = concat_last([p.reshape(lead + (-1,)) for p in parts])[..., self._inverse]
            segments = [(0, flat)]
        else:
            segments = sorted((s for form, part in zip(self.forms, parts)
                               for s in form.segments(part)), key=lambda s: s[0])
        if isinstance(like, LeafVector):
            bounds = like.offsets
            return LeafVector(tuple(_from_segments(segments, a, b)
                                    for a, b in zip(bounds[:-1], bounds[1:])), bounds)
        values = [v for _, v in segments]
        return values[0] if len(values) == 1 else concat_last(values)

    def block_diagonal(self, blocks: Sequence[jax.Array]) -> jax.Array:
        """The ``(d, d)`` matrix holding ``blocks[p]`` on the rows and columns of (1-D)
        piece ``p``, zero elsewhere: ``block_diag`` in the pieces' order, its columns then
        its rows put in flat order by :meth:`merge` (slices that XLA fuses into one pass;
        a scatter by ``np.ix_`` took index constants of twice the blocks' size and peaked
        at 3.9× the result)."""
        dense = jax.scipy.linalg.block_diag(*blocks)
        edges = np.cumsum([0] + [p.size for p in self.pieces])

        def to_flat_order(x):  # on the last axis
            return self.merge([x[..., a:b] for a, b in zip(edges[:-1], edges[1:])])

        return to_flat_order(to_flat_order(dense).T).T

    @property
    def _inverse(self) -> np.ndarray:
        return np.argsort(np.concatenate([p.ravel() for p in self.pieces]))
