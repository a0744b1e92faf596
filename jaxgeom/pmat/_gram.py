"""Gram matrices ``XᵀX``, the contraction behind every stored representation's build."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

#: ``m`` from which ``gram`` computes only the upper block triangle (below it, the smaller
#: blocked GEMMs and the mirroring copy cost more than the multiplications they save).
SYMMETRIC_FROM = 2048
#: column blocks of the symmetric product: ``B(B+1)/2`` of ``B²`` block products, i.e.
#: 37.5% fewer multiplications with 4.
BLOCKS = 4


#: ``m`` below which :func:`gram` pads a multiple of 64 columns on the CPU (from it the
#: product is compute-bound and the padding gains nothing: bench_mlp's exact KFAC build,
#: whose output gradients are 512 wide, 45.6 ms unpadded against 46.9 ms padded).
UNALIASED_BELOW = 512


def gram(x: jax.Array) -> jax.Array:
    """``Σ_rows x xᵀ`` over every leading axis of ``x``: ``(..., m) → (m, m)``.

    One 2-D GEMM (XLA's CPU dot is several times slower on the unflattened einsum); for
    ``m ≥ SYMMETRIC_FROM`` only the blocks on and above the diagonal of a ``BLOCKS × BLOCKS``
    partition are multiplied and the others mirrored (XLA has no symmetric rank-k update):
    cost ``r m² (B + 1) / (2B)`` for ``r`` rows instead of ``r m²``. On the CPU a width ``m``
    that is a multiple of 64 below ``UNALIASED_BELOW`` (a layer's output gradients: 64,
    128, 256 units) gets one column of zeros first (:func:`_unaliased_gram`).
    """
    x = _rows(x)
    m = x.shape[-1]
    if m % 64 == 0 and m < UNALIASED_BELOW:
        return jax.lax.platform_dependent(x, cpu=_unaliased_gram, default=_plain_gram)
    if m < SYMMETRIC_FROM:
        return _plain_gram(x)
    cols = [x[:, span] for span in _spans(m)]
    upper = {(i, j): cols[i].T @ cols[j] for i in range(BLOCKS) for j in range(i, BLOCKS)}
    return jnp.block([[upper[i, j] if i <= j else upper[j, i].T for j in range(BLOCKS)]
                      for i in range(BLOCKS)])


def _rows(x: jax.Array) -> jax.Array:
    """``x`` ``(..., m)`` as the ``(r, m)`` matrix of its rows (``reshape(-1, m)`` fails for
    ``m = 0``: a ``PMatLowRank`` of no rows, a scaled identity, has an empty factor)."""
    return x.reshape(int(np.prod(x.shape[:-1], dtype=np.int64)), x.shape[-1])


def _plain_gram(x: jax.Array) -> jax.Array:
    return x.T @ x


def _unaliased_gram(x: jax.Array) -> jax.Array:
    """``xᵀx`` through ``[x 0]ᵀ[x 0]``: XLA:CPU's product over the rows of an ``(r, m)``
    matrix whose rows are a multiple of 64 floats long reads its columns at a stride that
    falls on few cache sets; with a zero column appended the ``(m + 1)²`` product runs
    1.2–1.8× faster for ``m`` = 64–384 (2304 rows of 64: 297 → 165 µs), and its top-left
    ``m × m`` block is ``xᵀx``. The padded copy is fused into ``x``'s producer when
    nothing else reads ``x``; otherwise it is one more pass over ``x`` (bench_small: 82 µs
    against the 120 µs saved)."""
    m = x.shape[-1]
    padded = jnp.pad(x, ((0, 0), (0, 1)))
    return (padded.T @ padded)[:m, :m]


#: column blocks of :func:`gram_norm_sq`: ``B(B+1)/2`` of ``B²`` block products, 44% fewer
#: multiplications with 8 (its blocks are only reduced, never stored or mirrored, so more
#: of them cost little: 3.49 → 3.22 s from 4 to 8 for ``r = 10240`` rows of 6922).
NORM_BLOCKS = 8


def gram_norm_sq(x: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``Σ_ab w_a w_b G_ab²`` for the Gram ``G = Σ_rows x xᵀ`` of ``x`` ``(..., m)``
    (``w``: ``(m,)``, signs allowed; without it ``‖G‖_F²``), with ``G`` never formed.

    From ``SYMMETRIC_FROM`` columns, the ``B(B+1)/2`` blocks on and above the diagonal of a
    ``NORM_BLOCKS × NORM_BLOCKS`` partition are multiplied and each reduced at once (the
    ones above the diagonal counted twice): ``r m² (B + 1) / (2B)`` for ``r`` rows. Memory:
    the column blocks (one copy of ``x``) and the block products, never ``m × m``.
    """
    x = _rows(x)
    m = x.shape[-1]

    def form(block, wi, wj):
        squares = block * block
        return jnp.sum(squares) if wi is None else wi @ squares @ wj

    if m < SYMMETRIC_FROM:
        return form(gram(x), weights, weights)
    spans = _spans(m, NORM_BLOCKS)
    cols = [x[:, span] for span in spans]
    parts = [None if weights is None else weights[span] for span in spans]
    total = jnp.zeros((), x.dtype)
    for i in range(NORM_BLOCKS):
        for j in range(i, NORM_BLOCKS):
            term = form(cols[i].T @ cols[j], parts[i], parts[j])
            total = total + (term if i == j else 2 * term)
    return total


def add_upper_gram(total: jax.Array, pieces: Sequence[jax.Array]) -> jax.Array:
    """``total + XᵀX`` on and above the block diagonal, for ``X`` the concatenation of
    ``pieces`` along their last axis (``(..., m_i)``, e.g. a chunk's Jacobian cut at the
    parameter leaves) and ``total`` (donated) a running sum of such terms: the running sum
    of the upper block triangle, which :func:`mean_of_upper_grams` completes once at the
    end. Below ``SYMMETRIC_FROM`` the whole ``XᵀX`` is added (nothing to complete).

    ``X`` is formed once, as its ``B`` column blocks of :func:`_spans` stacked ``(B, r, t)``
    (the last one, narrower, padded in front with zero columns and placed to end at
    ``m``), and a ``fori_loop`` over the ``B(B+1)/2`` pairs ``i ≤ j`` adds each block
    product ``X_iᵀX_j`` into its place of ``total``, updated in place. Memory: one copy of
    ``X`` and one ``t × t`` product: as unrolled block products, XLA kept all of them
    live at once inside a ``jit`` (a scan over chunks: 20 of 1690², 218 MiB beside a 174
    MiB total). Cost as :func:`gram`, without mirroring each chunk's blocks: 28% less time
    than adding them and their transposes for 256 rows of 6922 (the transposed adds are
    strided).
    """
    pieces = [_rows(p) for p in pieces]
    m = sum(p.shape[-1] for p in pieces)
    if m < SYMMETRIC_FROM:
        x = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-1)
        return total + gram(x)
    width, tiles = _upper_tiles(m)
    cols = [_columns(pieces, span) for span in _spans(m)]
    cols[-1] = jnp.pad(cols[-1], ((0, 0), (width - cols[-1].shape[-1], 0)))
    stacked = jnp.stack(cols)

    def add_block(k, total):
        row, col, i, j = (tiles[k, c] for c in range(4))
        block = jax.lax.dynamic_slice(total, (row, col), (width, width))
        return jax.lax.dynamic_update_slice(total, block + stacked[i].T @ stacked[j], (row, col))

    return jax.lax.fori_loop(0, len(tiles), add_block, total)


def mean_of_upper_grams(totals: Any, n: int) -> Any:
    """``total / n`` for each running sum of :func:`add_upper_gram` in the pytree
    ``totals`` (donated), its blocks below the diagonal set to the transposes of those
    above: the symmetric means, in place, in one compiled call (inlined in a ``jit``).

    A ``fori_loop`` over the tiles ``i ≤ j`` of :func:`_upper_tiles` divides each tile's own
    entries (those no earlier tile covers: the last span's tiles overlap the one before),
    then each block above the diagonal is copied, transposed, below it. So XLA:CPU updates
    the matrix in place: a division of the whole matrix beside the mirroring, in one
    program or two inside a ``jit``, copied it (a 6760² Dense built inside a ``jit``:
    174 MiB more), and so did a loop writing each tile and its transpose."""
    return _symmetric_means(totals, n)


@functools.partial(jax.jit, donate_argnums=0)
def _symmetric_means(totals: Any, n: Any) -> Any:
    def symmetric_mean(total):
        m = total.shape[-1]
        if m < SYMMETRIC_FROM:
            return total / n
        width, tiles = _upper_tiles(m)
        offsets = jnp.arange(width)

        def divide_tile(k, total):
            row, col, i, j = (tiles[k, c] for c in range(4))
            tile = jax.lax.dynamic_slice(total, (row, col), (width, width))
            own = ((row + offsets >= i * width)[:, None] & (col + offsets >= j * width)[None, :])
            return jax.lax.dynamic_update_slice(total, jnp.where(own, tile / n, tile), (row, col))

        total = jax.lax.fori_loop(0, len(tiles), divide_tile, total)
        spans = _spans(m)
        for i in range(BLOCKS):
            for j in range(i + 1, BLOCKS):
                total = total.at[spans[j], spans[i]].set(total[spans[i], spans[j]].T)
        return total

    return jax.tree_util.tree_map(symmetric_mean, totals)


def _upper_tiles(m: int) -> tuple[int, jax.Array]:
    """The ``B(B+1)/2`` tiles on and above the diagonal of :func:`_spans`'s partition, all
    ``t × t`` (``t`` the spans' width): ``(t, rows)`` with rows ``(row, col, i, j)``, the
    tile's top-left corner and its spans; the last span's tiles end at ``m`` (their first
    ``B t − m`` rows or columns belong to the span before)."""
    spans = _spans(m)
    width = spans[0].stop
    starts = [span.start for span in spans[:-1]] + [m - width]
    tiles = [(starts[i], starts[j], i, j) for i in range(len(spans)) for j in range(i, len(spans))]
    return width, jnp.asarray(np.array(tiles, np.int32))


#: bytes of an ``m × m`` total from which :func:`accumulate_gram` adds row blocks in place
IN_PLACE_FROM_BYTES = 16 * 2**20
#: row blocks of :func:`accumulate_gram`'s loop
ROW_BLOCKS = 8


def accumulate_gram(total: jax.Array, x: jax.Array, scale: Any = 1) -> jax.Array:
    """``total + scale · Σ_rows x xᵀ`` (``x``: ``(..., m)``, ``total``: ``(m, m)``, donated),
    for a running total updated once per chunk.

    XLA:CPU allocates a computation's temporaries afresh at every call, and memory fresh
    from the system costs a page fault per 4 KiB on first touch: the ``m × m`` product of a
    chunk, formed then added, cost ~20 ms of faults for ``m = 4097`` however few its rows
    (a 1-GFLOP product taking 30 ms). For a total of at least ``IN_PLACE_FROM_BYTES`` and
    few rows (``r < m / 4``, where the faults weigh) the product is added ``ROW_BLOCKS``
    row blocks at a time inside a loop (one block's temporary, reused): 35 → 11.5 ms for
    32 rows of 4097. Otherwise ``total + scale · gram(x)`` (the symmetric blocked product).
    """
    x = _rows(x)
    r, m = x.shape
    if m * m * total.dtype.itemsize < IN_PLACE_FROM_BYTES or 4 * r >= m:
        return total + gram(x) * scale
    blocks = min(ROW_BLOCKS, m)
    rows = m // blocks

    def add_rows(start, size, total):
        block = jax.lax.dynamic_slice_in_dim(x, start, size, axis=1).T @ x
        current = jax.lax.dynamic_slice_in_dim(total, start, size, axis=0)
        return jax.lax.dynamic_update_slice_in_dim(total, current + block * scale, start,
                                                   axis=0)

    total = jax.lax.fori_loop(0, blocks, lambda i, t: add_rows(i * rows, rows, t), total)
    rest = m - blocks * rows
    return total if rest == 0 else add_rows(m - rest, rest, total)


def _spans(m: int, blocks: int = BLOCKS) -> list[slice]:
    """The ``blocks`` column spans of the symmetric product: ``⌈m / blocks⌉`` wide, the last
    one what is left (:func:`add_upper_gram` loops over blocks of one shape)."""
    width = -(-m // blocks)
    edges = [min(k * width, m) for k in range(blocks)] + [m]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def _columns(pieces: list[jax.Array], span: slice) -> jax.Array:
    """Columns ``span`` of the concatenation of ``pieces`` (2-D), from the pieces alone."""
    parts, start = [], 0
    for p in pieces:
        stop = start + p.shape[-1]
        lo, hi = max(span.start, start), min(span.stop, stop)
        if lo < hi:
            parts.append(p[:, lo - start:hi - start])
        start = stop
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=-1)
