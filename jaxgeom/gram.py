"""How the Gram matrix ``G = J Jᵀ`` of a Jacobian map is computed (the empirical NTK).

``G[o, n, o', n'] = Σᵢ J[o,n,i] J[o',n',i]`` is a sum over the parameters, so it splits
into one term per layer. For a dense layer applied once per example (no weight sharing)
the per-example, per-output kernel gradient is the outer product ``gₒₙ aₙᵀ`` of the
layer's output gradient and input (:mod:`jaxgeom.capture`), and its term needs no
Jacobian at all:

.. math::  \\langle g_{on} a_n^\\top, g_{o'n'} a_{n'}^\\top \\rangle
   = (a_n \\cdot a_{n'})\\,(g_{on} \\cdot g_{o'n'}),

the input Gram ``A Aᵀ`` (``N × N``) times, entry by entry, the output-gradient Gram
``Γ Γᵀ`` (``NK × NK``); the bias, whose gradient is ``gₒₙ``, is a column of ones appended
to ``a``. A layer of ``a_l`` inputs and ``g_l`` outputs costs ``N² a_l + (NK)² g_l``
instead of ``(NK)² a_l g_l`` for the product of its Jacobian columns (NNGeometry's
``LinearJacobianFactory.kxy``). Every other leaf (convolutions, whose ``T`` positions
would make the pair sums ``T²`` times longer, embeddings, leaves the capture does not
factor) contributes the product of its per-example gradients, as rows.

The matrix is assembled block by block over pairs of *windows* of examples
(:func:`jaxgeom.data.iter_windows`: ``batch_size`` real examples each, no padding), each
block and its transpose written in place into the donated ``(K, N, K, N)`` result. A
window's factor (its captured inputs and output gradients, and its rows) is computed once
and kept when all windows' factors together are no larger than one window's Jacobian
(``n K d``), else recomputed for each pair it belongs to (two held at a time): memory the
result plus about one window's Jacobian. The same blocks, over the masked chunks and
reduced as they are made, give ``‖J Jᵀ‖_F`` (:func:`gram_norm_sq`: the Frobenius norm of
``PMatImplicit``, ``‖JᵀJ‖_F = ‖J Jᵀ‖_F``) without forming ``G``.

Inside a ``jit`` (data in memory of more than one window) the pairs are one ``lax.scan``
per pair of batches (:func:`_scanned_pairs`) rather than one copy of the block's program
per pair, and the mirrored blocks are copied after all blocks are written
(:func:`_mirrored`); the norm's pairs stay unrolled up to 36 (independent sums, which XLA
runs side by side), those of groups of chunks when there are more (:func:`gram_norm_sq`).

The cross kernel ``K = J_a J_bᵀ`` between two data sets (``(K, M, K, N)``,
:func:`jaxgeom.pfmap.CrossGramMatrix`: test × train for NTK / GP prediction) is the same
loop over every pair of a window of ``a`` and a window of ``b`` (:func:`cross_gram_by_layers`,
none mirrored), or the same rows by products (:func:`cross_gram_implicit`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import data as data_lib
from jaxgeom._compile import donating_jit, model_jit
from jaxgeom._memory import check_fits
from jaxgeom.capture import CapturePlan, capture_chunk, example_gradients, make_plan
from jaxgeom.fspace import FMatDense
from jaxgeom.jacobian import chunk_jacobian, output_count, resolve_model_mode
from jaxgeom.layers import LayerCollection
from jaxgeom.streaming import batch_leaves

if TYPE_CHECKING:
    from jaxgeom.pfmap import PFMapImplicit
    from jaxgeom.replay import ReplayedFunction


class GramFactor(NamedTuple):
    """What one window of ``n`` examples contributes to ``G``, output-major.

    Attributes:
      inputs: per dense layer applied once per example, its inputs ``(n, a_l [+1])``
        (a column of ones appended for the bias).
      grads: per such layer, its output gradients ``(K, n, g_l)``.
      rows: ``(K, n, d_r)``: the per-example gradients of every other parameter, or
        ``None`` when there is none.
    """

    inputs: tuple[jax.Array, ...]
    grads: tuple[jax.Array, ...]
    rows: jax.Array | None


def gram_by_layers(J: ReplayedFunction, keep_bytes: int | None = None) -> FMatDense:
    """``J Jᵀ`` as a ``(K, N, K, N)`` :class:`~jaxgeom.fspace.FMatDense`, layer by layer
    (the module's method; in forward mode from the per-example Jacobians' rows).

    ``keep_bytes``: how much memory the windows' factors may take to be kept, computed
    once each (default: one window's Jacobian, ``n K d`` entries); above it, each is
    recomputed for every pair it belongs to. Cost: one capture (``n K`` backward passes)
    per window, or per pair of windows when the factors are not kept;
    ``(NK)² (Σ g_l + d_r) + N² Σ a_l`` for the products.
    """
    return FMatDense(_assemble(J, None, keep_bytes))


def cross_gram_by_layers(left: ReplayedFunction, right: ReplayedFunction,
                         keep_bytes: int | None = None) -> jax.Array:
    """``J_left J_rightᵀ``, the ``(K, M, K, N)`` kernel between the ``M`` examples of
    ``left`` and the ``N`` of ``right`` (the same function, parameters and layer collection
    on two data sets), layer by layer as :func:`gram_by_layers`: every pair of a left
    window and a right window, none mirrored.

    ``keep_bytes`` applies to each side's factors (so both sides kept take up to twice
    it). The windows of one side are held in turn while the other side's are read against
    each: when only one side's factors are kept, that side is read (each factor computed
    once, ``C_x + C_z`` captures); when neither is, the side with fewer windows is held
    and the other's recomputed, ``C_s (1 + C_l)`` captures for ``C_s ≤ C_l`` windows.
    Products ``(K² M N) (Σ g_l + d_r) + M N Σ a_l``.
    """
    return _assemble(left, right, keep_bytes)


def _zero_gram(k: int, m: int, n: int, dtype) -> jax.Array:
    """The zero ``(K, M, K, N)`` kernel whose blocks are written in place, refused before any
    work when larger than the device's memory (:func:`~jaxgeom._memory.check_fits`)."""
    check_fits("The empirical NTK", (k, m, k, n), dtype,
               "It grows with the square of the examples: compute it on fewer (a subset, or "
               "CrossGramMatrix between a few and the rest), or work with the Jacobian's "
               "products instead (Jacobian(..., PFMapImplicit): jvp, vjp)")
    return jnp.zeros((k, m, k, n), dtype)


def _assemble(left: ReplayedFunction, right: ReplayedFunction | None,
              keep_bytes: int | None) -> jax.Array:
    """The window loop shared by :func:`gram_by_layers` (``right=None``: the pairs ``i ≤ j``
    of ``left``'s windows, each block written with its transpose) and
    :func:`cross_gram_by_layers` (every pair of a left and a right window), each block
    written in place into the donated ``(K, M, K, N)`` result. Inside a ``jit``, the same
    pairs by :func:`_scanned_pairs`."""
    k, scale = _outputs_and_scale(left, right)
    if _scans(left, right):
        return _assemble_scanned(left, right, keep_bytes, k, scale)
    rows_only = _rows_only(left, right)
    rows = _Factors(left, list(data_lib.iter_windows(left.data, left.batch_size)), keep_bytes,
                    rows_only)
    symmetric = right is None
    columns = rows if symmetric else _Factors(
        right, list(data_lib.iter_windows(right.data, right.batch_size)), keep_bytes,
        rows_only)
    gram = _zero_gram(k, rows.n, columns.n, left.layer_collection.dtype)
    swap = not symmetric and _holds_columns(rows.kept_all(), columns.kept_all(),
                                            len(rows.parts), len(columns.parts))
    outer, inner = (columns, rows) if swap else (rows, columns)
    for i, held_part in enumerate(outer.parts):
        held = outer[i]
        for j in range(i if symmetric else 0, len(inner.parts)):
            other = held if symmetric and j == i else inner[j]
            (a, b), (pa, pb) = (((other, held), (inner.parts[j], held_part)) if swap
                                else ((held, other), (held_part, inner.parts[j])))
            gram = _write_pair(gram, a, b, pa.offset, pb.offset, scale,
                               mirror=symmetric and j != i)
    return gram


def _outputs_and_scale(left: ReplayedFunction,
                       right: ReplayedFunction | None) -> tuple[int, jax.Array]:
    """``K`` (the same on both sides of a cross kernel, else a ``ValueError``) and the
    kernel's scale, ``s_left s_right`` (``s²`` for ``J Jᵀ``)."""
    dtype = left.layer_collection.dtype
    k = output_count(left.fn, left.params, _first_batch(left), left.aux)
    if right is None:
        return k, jnp.asarray(left.scale, dtype) ** 2
    other = output_count(right.fn, right.params, _first_batch(right), right.aux)
    if other != k:
        raise ValueError(
            f"the two data sets give {k} and {other} outputs per example: a cross kernel "
            "needs the same outputs on both")
    return k, jnp.asarray(left.scale, dtype) * jnp.asarray(right.scale, dtype)


def _first_batch(J: ReplayedFunction) -> Any:
    return next(b for b in J.data if data_lib.num_examples(b))


def _rows_only(left: ReplayedFunction, right: ReplayedFunction | None) -> bool:
    """Whether a cross kernel's two data sets have examples of other shapes, so that a dense
    layer may see one position on one side (its input Gram) and several on the other (its
    gradient rows): both sides then give every layer as rows, which pair up."""
    return right is not None and (_example_signature(_first_batch(left))
                                  != _example_signature(_first_batch(right)))


def _holds_columns(kept_rows: bool, kept_columns: bool, row_windows: int,
                   column_windows: int) -> bool:
    """Whether a cross kernel's loop holds the windows of its columns (the right data): of
    the side whose factors are not kept (each then computed once), else of the side with
    fewer windows."""
    if kept_rows != kept_columns:
        return kept_rows
    return column_windows < row_windows


def _keeps(factor_bytes: int, size: int, J: ReplayedFunction, num_outputs: int,
           keep_bytes: int | None) -> bool:
    """Whether the factors of all of ``J``'s parts are kept: those of ``N`` examples, at
    ``factor_bytes`` for a part of ``size``, take no more than ``keep_bytes`` (default: a
    part's Jacobian, ``size K d`` entries)."""
    return factor_bytes * J.num_examples <= _byte_limit(J, size, num_outputs, keep_bytes) * size


def _byte_limit(J: ReplayedFunction, size: int, num_outputs: int,
                keep_bytes: int | None) -> int:
    """``keep_bytes``, by default the bytes of the Jacobian of a part of ``size`` examples
    (``size K d`` entries): what the kept factors, or a block between two groups of
    chunks, may take."""
    if keep_bytes is not None:
        return keep_bytes
    return size * num_outputs * J.layer_collection.numel() * jnp.dtype(
        J.layer_collection.dtype).itemsize


#: the most pairs of parts whose blocks :func:`gram_norm_sq` sums as an unrolled loop
#: inside a ``jit`` (those of 8 parts): their sums are independent, which XLA:CPU runs
#: side by side on its threads, but the program, and its compile time, grows with their
#: number (bench_small in a ``jit``, unrolled over chunks: 0.6 s to compile for 10
#: pairs, 2.0 s for 136, 5.4 s for 528)
UNROLLED_PAIRS = 36

#: the groups of consecutive chunks whose factors :func:`gram_norm_sq` concatenates, when
#: their blocks fit (:func:`_group_size`)
NORM_GROUPS = 8

#: pairs an iteration of :func:`gram_norm_sq`'s scan (their blocks computed side by side:
#: bench_mlp, 32 chunks, 178 → 154 ms against one pair an iteration)
SCANNED_PAIRS = 4


def gram_norm_sq(J: ReplayedFunction, keep_bytes: int | None = None) -> jax.Array:
    """``‖J Jᵀ‖²_F = Σ_{chunks i, j} ‖J_i J_jᵀ‖²_F`` of the unscaled ``J``, from the blocks of
    :func:`gram_block` over the masked chunks (padding contributes zero; no ``(NK)²``
    matrix is formed). For ``M = (s/N) JᵀJ``, ``‖M‖_F = |s|/N · ‖J Jᵀ‖_F``. Cost and
    ``keep_bytes``: :func:`gram_by_layers`'s.

    When the factors are kept and there are more than :data:`NORM_GROUPS` chunks, the
    blocks are those of groups of consecutive chunks — a group's factor the concatenation
    of its chunks' —, :data:`NORM_GROUPS` of them where a block between two groups is no
    larger than one chunk's Jacobian (``n K d`` entries), else as many as that allows
    (:func:`_group_size`): fewer, larger GEMMs (eagerly, 32 chunks: bench_mlp 181 →
    116 ms, bench_small 107 → 75 ms; benchmarks/bench_implicit_norm.py). Inside a ``jit``
    the pairs are unrolled up to :data:`UNROLLED_PAIRS`; beyond, one ``lax.scan`` over the
    pairs of groups, or of chunks when the factors are not kept (:func:`_scanned_pairs`),
    whose program does not grow with them (32 chunks: compiled in 1.0 s instead of
    5.5–6.1 s, run at 0.97–0.98× the speed of every pair unrolled; 16 chunks: 1.0 s
    instead of 2.0 s, 0.89–0.98×)."""
    if _scans(J, None) and _pair_count(data_lib.chunk_count(J.data, J.batch_size)) > UNROLLED_PAIRS:
        parts = _scanned_parts(J, keep_bytes, masked=True)
        if len(parts) == 1 and parts[0].kept:
            part = parts[0]
            size = _group_size(part.starts.shape[0], part.stacked, J, keep_bytes)
            stacked = _stacked_groups(part.stacked, size)
            groups = jax.tree_util.tree_leaves(stacked)[0].shape[0]
            if _pair_count(groups) <= UNROLLED_PAIRS:
                return _pairs_norm_sq([_indexed(stacked, g) for g in range(groups)])
            parts = [_ScannedParts(np.arange(groups), functools.partial(_indexed, stacked),
                                   True, size * part.size, stacked)]

        def add(total, left, right, row, column):
            weight = jnp.where(row == column, 1.0, 2.0).astype(total.dtype)
            return total + weight * _block_norm_sq(left, right)

        zero = jnp.zeros((), J.layer_collection.dtype)
        return _scanned_pairs(add, zero, parts, parts, upper=True, unroll=SCANNED_PAIRS)
    factors = _Factors(J, list(J._chunks()), keep_bytes)
    if len(factors) > NORM_GROUPS and factors.kept_all():
        size = _group_size(len(factors), factors[0], J, keep_bytes)
        groups = []
        for start in range(0, len(factors), size):
            members = range(start, min(start + size, len(factors)))
            groups.append(_concatenated(tuple(factors[i] for i in members), size))
            factors.release(members)  # the chunks' factors held once: in their group
        return _pairs_norm_sq(groups)
    return _pairs_norm_sq(factors)


def _pair_count(parts: int) -> int:
    return parts * (parts + 1) // 2


def _pairs_norm_sq(factors: Any) -> jax.Array:
    """``Σ_{i ≤ j} (2 − δᵢⱼ) ‖block(i, j)‖²_F`` over the sequence ``factors``, a loop."""
    total = 0.0
    for i in range(len(factors)):
        left = factors[i]
        total += _block_norm_sq(left, left)
        for j in range(i + 1, len(factors)):
            total += 2 * _block_norm_sq(left, factors[j])
    return total


def _group_size(count: int, factor: GramFactor, J: ReplayedFunction,
                keep_bytes: int | None) -> int:
    """The chunks of a group of :func:`gram_norm_sq`'s: enough for :data:`NORM_GROUPS`
    groups to cover the ``count`` chunks, fewer if need be so that a block between two
    groups, ``(K · size · n)²`` entries for chunks of ``n`` examples (``factor``: one
    chunk's, or the stacked ones'), takes no more than ``keep_bytes`` (default: one chunk's
    Jacobian, ``n K d`` entries); at least one."""
    k, n = (factor.rows if factor.rows is not None else factor.grads[0]).shape[-3:-1]
    itemsize = jnp.dtype(J.layer_collection.dtype).itemsize
    fits = int((_byte_limit(J, n, k, keep_bytes) / itemsize) ** 0.5) // (k * n)
    return max(1, min(-(-count // NORM_GROUPS), fits))


def _stacked_groups(stacked: GramFactor, size: int) -> GramFactor:
    """The stacked factors of ``C`` chunks (each leaf ``(C, …)``) as those of
    ``⌈C / size⌉`` groups of ``size`` consecutive chunks, the last one completed by zero
    factors (which add nothing to any block): a reshape, one program whatever ``C``."""
    if size == 1:
        return stacked
    count = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    groups = -(-count // size)

    def grouped(x):  # (C, n, a) → (G, size·n, a); (C, K, n, e) → (G, K, size·n, e)
        x = jnp.pad(x, [(0, groups * size - count)] + [(0, 0)] * (x.ndim - 1))
        x = x.reshape(groups, size, *x.shape[1:])
        if x.ndim == 4:
            return x.reshape(groups, size * x.shape[2], x.shape[3])
        x = jnp.moveaxis(x, 1, 2)
        return x.reshape(groups, x.shape[1], size * x.shape[3], x.shape[4])

    return jax.tree_util.tree_map(grouped, stacked)


@functools.partial(jax.jit, static_argnums=1)
def _concatenated(factors: tuple[GramFactor, ...], size: int) -> GramFactor:
    """One factor of the examples of ``factors``, in their order, then zero factors up to
    ``size`` of them (the chunks of a group, the last one completed: every group of one
    shape)."""
    zero = jax.tree_util.tree_map(jnp.zeros_like, factors[0])
    factors = factors + (zero,) * (size - len(factors))

    def join(*leaves):  # inputs (n, a): examples first; grads and rows (K, n, e): second
        return jnp.concatenate(leaves, axis=0 if leaves[0].ndim == 2 else 1)

    return jax.tree_util.tree_map(join, *factors)


class _Factors:
    """The :class:`GramFactor` of each of ``parts`` (windows, or masked chunks), computed
    when asked for and kept when all of them fit in ``keep_bytes`` (default: one part's
    Jacobian, ``n K d`` entries): decided on the first one."""

    def __init__(self, J: ReplayedFunction, parts: list, keep_bytes: int | None,
                 rows_only: bool = False):
        first = parts[0].batch
        self.num_outputs = output_count(J.fn, J.params, first, J.aux)
        self.parts = parts
        self.make = _factor_maker(J, (part.batch for part in parts), self.num_outputs,
                                  rows_only)
        self.J, self.n, self.keep_bytes = J, J.num_examples, keep_bytes
        self.kept: list[GramFactor | None] = [None] * len(parts)
        self.keep: bool | None = None
        self.last: tuple[int, GramFactor] | None = None  # the latest one, kept or not

    def __len__(self) -> int:
        return len(self.parts)

    def release(self, indices: Any) -> None:
        """Drop the factors of the parts ``indices`` (no longer read)."""
        for i in indices:
            self.kept[i] = None
        self.last = None

    def kept_all(self) -> bool:
        """Whether every factor is kept once computed (decided on the first one, computed
        now if need be)."""
        if self.keep is None:
            self[0]
        return self.keep

    def __getitem__(self, i: int) -> GramFactor:
        if self.kept[i] is not None:
            return self.kept[i]
        if self.last is not None and self.last[0] == i:
            return self.last[1]
        part = self.parts[i]
        out = self.make(part.batch, part.offset, getattr(part, "mask", None))
        size = jax.tree_util.tree_leaves(part.batch)[0].shape[0]
        if self.keep is None:  # do all of them fit?
            self.keep = _keeps(_factor_bytes(out), size, self.J, self.num_outputs,
                               self.keep_bytes)
        if self.keep:
            self.kept[i] = out
        self.last = (i, out)
        return out


def _scans(left: ReplayedFunction, right: ReplayedFunction | None) -> bool:
    """Whether the pairs are read by :func:`_scanned_pairs`: inside a ``jit``, data in
    memory of more than one chunk on either side (:meth:`ReplayedFunction._scans_chunks`)."""
    return left._scans_chunks() or (right is not None and right._scans_chunks())


class _ScannedParts(NamedTuple):
    """The windows of one batch, for :func:`_scanned_pairs`.

    Attributes:
      starts: ``(C,)``: where each window starts among all the examples (static).
      factor: the :class:`GramFactor` of window ``i`` (a traced index): read from the
        factors computed once, stacked, when they are kept, else computed from its rows.
      kept: whether they are kept.
      size: the examples of a window.
      stacked: the factors kept, stacked (``None`` when not kept).
    """

    starts: np.ndarray
    factor: Callable[[jax.Array], GramFactor]
    kept: bool
    size: int
    stacked: GramFactor | None = None


def _scanned_parts(J: ReplayedFunction, keep_bytes: int | None, *,
                   masked: bool = False, rows_only: bool = False) -> list[_ScannedParts]:
    """The windows of each batch of ``J.data`` inside a ``jit`` (:func:`_batch_windows`),
    or with ``masked`` its chunks (:func:`_batch_chunks`: for a sum over the pairs, which
    overlapping windows would count twice). Their factors are kept (computed once, by
    ``lax.map``) on :class:`_Factors`' rule: when all of them take no more than
    ``keep_bytes``."""
    first = _first_batch(J)
    k = output_count(J.fn, J.params, first, J.aux)
    make = _factor_maker(J, (b for b in J.data if data_lib.num_examples(b)), k, rows_only)
    parts, keep = [], None
    for starts, size, window, seen in (_batch_chunks if masked else _batch_windows)(J):
        def factor_at(start, window=window):
            return make(*window(start))

        local = jnp.asarray(starts)
        if keep is None:  # do all of them fit? (decided on the first part, as _Factors)
            keep = _keeps(_factor_bytes(jax.eval_shape(factor_at, local[0])), size, J, k,
                          keep_bytes)
        stacked = jax.lax.map(factor_at, local) if keep else None
        if keep:
            factor = functools.partial(_indexed, stacked)
        else:
            factor = functools.partial(lambda f, starts, i: f(starts[i]), factor_at, local)
        parts.append(_ScannedParts(starts + seen, factor, keep, size, stacked))
    return parts


def _batch_windows(J: ReplayedFunction) -> Iterator[tuple[np.ndarray, int, Callable, int]]:
    """For each non-empty batch of ``J.data`` inside a ``jit``: where its windows start in
    it (:func:`data_lib.iter_windows`' windows, static), their size, ``window(start) ->
    (batch, offset, None)`` (the rows cut by ``dynamic_slice``; no mask: real examples
    only) and the examples of the batches before."""
    for n, leaves, treedef, seen in batch_leaves(J.data):
        size = n if J.batch_size is None else min(int(J.batch_size), n)

        def window(start, size=size, leaves=leaves, treedef=treedef, seen=seen):
            rows = [jax.lax.dynamic_slice_in_dim(a, start, size) for a in leaves]
            return jax.tree_util.tree_unflatten(treedef, rows), seen + start, None

        yield np.asarray(data_lib.window_starts(n, size)), size, window, seen


def _batch_chunks(J: ReplayedFunction) -> Iterator[tuple[np.ndarray, int, Callable, int]]:
    """:func:`_batch_windows` of the masked chunks of each batch instead (those of
    :func:`data_lib.iter_chunks`: every ``batch_size`` examples, the last one's missing
    rows masked out): ``chunk(start) -> (batch, offset, mask)``."""
    for n, leaves, treedef, seen in batch_leaves(J.data):
        size = n if J.batch_size is None else int(J.batch_size)

        def chunk(start, n=n, size=size, leaves=leaves, treedef=treedef, seen=seen):
            batch, mask, offset = data_lib.masked_chunk(leaves, treedef, n, seen, start, size)
            return batch, offset, mask

        yield np.arange(0, n, size), size, chunk, seen


def _indexed(stacked: Any, i: jax.Array) -> Any:
    return jax.tree_util.tree_map(lambda x: x[i], stacked)


def _scanned_pairs(step: Callable, carry: Any, rows: list[_ScannedParts],
                   columns: list[_ScannedParts], *, upper: bool, swap: bool = False,
                   unroll: int = 1) -> Any:
    """``carry`` through ``step(carry, left, right, row, column)`` for every pair of a
    window of ``rows`` (its factor ``left``, its start ``row``) and a window of ``columns``,
    as one ``lax.scan`` over the pairs of each pair of batches, held window by held window;
    ``upper``: ``rows`` is ``columns`` and only the pairs ``i ≤ j`` are taken. ``swap``: the
    windows of ``columns`` are held and those of ``rows`` read against them. A factor not
    kept is computed when its window is first held (then carried) and for each pair it is
    read in, as :func:`_assemble` does; ``carry`` itself never passes through a
    ``lax.cond``. ``unroll``: pairs an iteration.

    Unrolled (the eager loop's ``C(C+1)/2`` nested calls for ``C`` windows), the pairs
    inside a ``jit`` were one copy of the block's program per pair: bench_small's Gram of
    1024 examples in windows of 64 compiled in 3.0 s and ran in 1.39 s (0.33 s eagerly),
    with 433 MiB of scratch memory besides its 400 MiB result.
    """
    held_side, read_side = (columns, rows) if swap else (rows, columns)
    for b, held_part in enumerate(held_side):
        for c, read_part in enumerate(read_side):
            if upper and c < b:
                continue
            same = upper and b == c
            held_count, read_count = held_part.starts.shape[0], read_part.starts.shape[0]
            pairs = np.array([(i, j) for i in range(held_count)
                              for j in range(i if same else 0, read_count)])

            def pair(state, ij, held_part=held_part, read_part=read_part, same=same):
                carry, held_index, held = state
                i, j = ij
                if not held_part.kept:  # a newly held window: its factor, carried on
                    held = jax.lax.cond(i == held_index, lambda: held,
                                        lambda: held_part.factor(i))
                else:
                    held = held_part.factor(i)
                if same and not read_part.kept:
                    other = jax.lax.cond(i == j, lambda: held, lambda: read_part.factor(j))
                else:
                    other = read_part.factor(j)
                left, right = (other, held) if swap else (held, other)
                held_start = jnp.asarray(held_part.starts)[i]
                read_start = jnp.asarray(read_part.starts)[j]
                row, column = ((read_start, held_start) if swap else (held_start, read_start))
                carry = step(carry, left, right, row, column)
                return (carry, i, held), None

            first = held_part.factor(jnp.asarray(0))
            state = (carry, jnp.asarray(0), first)
            carry = jax.lax.scan(pair, state, (pairs[:, 0], pairs[:, 1]),
                                 unroll=unroll)[0][0]
    return carry


def _assemble_scanned(left: ReplayedFunction, right: ReplayedFunction | None,
                      keep_bytes: int | None, k: int, scale: jax.Array) -> jax.Array:
    """:func:`_assemble` inside a ``jit``: the same blocks over the same pairs of windows,
    by :func:`_scanned_pairs`; of ``J Jᵀ``, the blocks ``i ≤ j`` first, then each block
    ``i < j`` copied, transposed, to its mirror (:func:`_mirrored`)."""
    rows_only = _rows_only(left, right)
    rows = _scanned_parts(left, keep_bytes, rows_only=rows_only)
    symmetric = right is None
    columns = rows if symmetric else _scanned_parts(right, keep_bytes, rows_only=rows_only)
    swap = not symmetric and _holds_columns(rows[0].kept, columns[0].kept, _count(rows),
                                            _count(columns))

    def write(gram, a, b, row, column):
        return jax.lax.dynamic_update_slice(gram, scale * gram_block(a, b), (0, row, 0, column))

    n = (left if symmetric else right).num_examples
    gram = _zero_gram(k, left.num_examples, n, left.layer_collection.dtype)
    gram = _scanned_pairs(write, gram, rows, columns, upper=symmetric, swap=swap)
    return _mirrored(gram, rows) if symmetric else gram


def _mirrored(gram: jax.Array, parts: list[_ScannedParts]) -> jax.Array:
    """``gram`` with each block of windows ``i < j`` (written) copied, transposed, to
    ``(j, i)`` (:func:`_copy_transposed`, tile by tile): each mirror the exact transpose of
    its block, as the eager loop writes them. Not written with its block in
    :func:`_scanned_pairs`' step: XLA fuses the block's sum of products into both writes,
    and the one reading it transposed took 4× as long (bench_small, windows of 64: 2.1 ms
    against 0.5 ms); nor formed by the transposed products (``gram_block(b, a)``), whose
    last bits differ."""
    k, itemsize = gram.shape[0], gram.dtype.itemsize
    for b, held in enumerate(parts):
        for c, read in enumerate(parts[b:], start=b):
            corners, tile = _tiles(held.size, read.size, k, itemsize)
            reads = np.array([(i + x, j + y) for p, i in enumerate(held.starts)
                              for q, j in enumerate(read.starts) if b < c or p < q
                              for x, y in corners]).reshape(-1, 2)
            if len(reads):
                gram = _copy_transposed(gram, None, reads, reads[:, ::-1], tile)
    return gram


#: the most bytes of a tile of a block copied transposed (:func:`_copy_transposed`): one
#: ``(10, 256, 10, 256)`` float32 block of bench_small's Gram took 34 ms transposed at
#: once, 8 ms in tiles of ``(10, 64, 10, 64)`` (its reads in the cache)
TILE_BYTES = 2**21


def _tiles(n: int, m: int, k: int, itemsize: int) -> tuple[np.ndarray, tuple[int, int]]:
    """The ``(P, 2)`` corners and the shape ``(t_n, t_m)`` of the tiles ``(K, t_n, K, t_m)``
    (of at most :data:`TILE_BYTES`, the last ones overlapping their predecessors) covering
    an ``(K, n, K, m)`` block."""
    side = max(1, int((TILE_BYTES / (k * k * itemsize)) ** 0.5))
    tile = (min(side, n), min(side, m))
    corners = [(x, y) for x in data_lib.window_starts(n, tile[0])
               for y in data_lib.window_starts(m, tile[1])]
    return np.array(corners), tile


def _copy_transposed(gram: jax.Array, source: jax.Array | None, reads: Any, writes: Any,
                     tile: tuple[int, int]) -> jax.Array:
    """``gram`` with, for each ``p``, the ``(K, t_n, K, t_m)`` tile of ``source`` (``None``:
    of ``gram`` itself) at examples ``reads[p]`` written transposed at ``writes[p]``, one
    ``lax.scan`` over the tiles. A block transposed at once reads the source a row of
    examples apart per entry; a tile's reads stay in the cache."""
    k = gram.shape[0]

    def copy(gram, corners):
        (x, y), (u, v) = corners
        part = jax.lax.dynamic_slice(gram if source is None else source, (0, x, 0, y),
                                     (k, tile[0], k, tile[1]))
        return jax.lax.dynamic_update_slice(gram, part.transpose(2, 3, 0, 1), (0, u, 0, v)), None

    return jax.lax.scan(copy, gram, ((reads[:, 0], reads[:, 1]),
                                     (writes[:, 0], writes[:, 1])))[0]


def _count(parts: list[_ScannedParts]) -> int:
    return sum(p.starts.shape[0] for p in parts)


def _factor_bytes(f: GramFactor) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(f))


def _factor_maker(J: ReplayedFunction, batches: Iterable, k: int, rows_only: bool = False
                  ) -> Callable[..., GramFactor]:
    """``(batch, offset, mask) -> GramFactor`` for ``J``'s chunks of ``batches`` (their
    non-empty batches, or windows), captured in reverse mode by one plan made on the first
    one's first example (the others must share its shape); ``mask``: ``None`` for windows
    of real examples. ``rows_only``: every layer as per-example gradient rows (a cross
    kernel between data of two example shapes, whose dense layers may see one position on
    one side and several on the other)."""
    batches = iter(batches)
    first = next(batches)
    layout = J.layer_collection
    example = jax.tree_util.tree_map(lambda a: a[0], first)
    mode = resolve_model_mode(J.mode, J.fn, J.params, example, J.aux, layout.numel(), k)
    if mode == "forward":  # the rows of each chunk's Jacobian: any example shapes
        return lambda batch, offset, mask: _rows_factor(
            J.params, batch, offset, J.aux, mask, fn=J.fn, dtype=layout.dtype)
    _check_one_example_shape(batches, first)
    plan = make_plan(J.fn, J.params, example, J.aux, layout)
    return lambda batch, offset, mask: _captured_factor(plan, layout, rows_only, J.params,
                                                        batch, offset, J.aux, mask)


def _example_signature(batch: Any) -> tuple:
    """The shapes of a batch's leaves without the examples' axis."""
    return tuple(np.shape(a)[1:] for a in jax.tree_util.tree_leaves(batch))


def _check_one_example_shape(batches: Any, first: Any) -> None:
    """Refuse batches whose examples differ in shape from ``first``'s: the layer-by-layer
    factors are captured by one plan, made on one example."""
    want = _example_signature(first)
    for batch in batches:
        got = _example_signature(batch)
        if got != want:
            raise ValueError(
                "GramMatrix/CrossGramMatrix with method='jacobian' (the default) in reverse "
                "mode need the examples of one data set to share one shape (each layer's "
                f"factors are captured on one example); got examples of shapes {list(want)} "
                f"and {list(got)}. Use method='implicit' or mode='forward', or pad the "
                "examples to one shape")


@functools.partial(model_jit, static_argnames=("fn", "dtype"))
def _rows_factor(params, batch, offset, aux, mask, *, fn, dtype) -> GramFactor:
    jac, _ = chunk_jacobian(fn, params, batch, offset, aux, "forward")
    if mask is not None:  # padding: zero rows
        jac = jac * mask[:, None, None].astype(jac.dtype)
    return GramFactor((), (), jac.astype(dtype).transpose(1, 0, 2))


@functools.partial(model_jit, static_argnums=(0, 1, 2))
def _captured_factor(plan: CapturePlan, layout: LayerCollection, rows_only: bool, params,
                     batch, offset, aux, mask) -> GramFactor:
    cap = capture_chunk(plan, params, batch, offset, aux, mask)  # padding: zero gradients
    dtype = layout.dtype
    n, k = cap.outputs.shape
    inputs, grads, rows = [], [], []
    for spec, a, g in zip(plan.specs, cap.inputs, cap.grads):
        if spec.kind == "dense" and a.shape[1] == 1 and not rows_only:  # the input Gram
            a = a[:, 0].astype(dtype)
            if spec.bias is not None:
                a = jnp.concatenate([a, jnp.ones((n, 1), dtype)], axis=1)
            inputs.append(a)
            grads.append(g[:, :, 0].astype(dtype).transpose(1, 0, 2))
        else:
            rows += [v.reshape(n, k, -1) for v in example_gradients(spec, a, g).values()]
    if cap.other.shape[-1]:
        rows.append(cap.other)
    rows = (jnp.concatenate([r.astype(dtype) for r in rows], axis=-1).transpose(1, 0, 2)
            if rows else None)
    return GramFactor(tuple(inputs), tuple(grads), rows)


def gram_block(left: GramFactor, right: GramFactor) -> jax.Array:
    """The ``(K, n, K, m)`` block of ``G`` between two windows' factors."""
    k, n = _output_major(left)
    m = _output_major(right)[1]

    def product(x, y):  # (K, n, e) · (K, m, e) → (K, n, K, m), one GEMM
        return (x.reshape(k * n, -1) @ y.reshape(k * m, -1).T).reshape(k, n, k, m)

    terms = [] if left.rows is None else [product(left.rows, right.rows)]
    for a, g, b, h in zip(left.inputs, left.grads, right.inputs, right.grads):
        terms.append(product(g, h) * (a @ b.T)[None, :, None, :])
    return functools.reduce(jnp.add, terms)


def _output_major(f: GramFactor) -> tuple[int, int]:
    x = f.rows if f.rows is not None else f.grads[0]
    return x.shape[0], x.shape[1]


@jax.jit
def _block_norm_sq(left: GramFactor, right: GramFactor) -> jax.Array:
    return jnp.sum(gram_block(left, right) ** 2)


def _write_pair(gram, left, right, row, column, scale, *, mirror):
    """``gram`` with the block of windows ``(left, right)`` (scaled) written at
    ``(row, column)`` and, when ``mirror``, its transpose at ``(column, row)``, in place."""
    if not mirror:
        return _write_block(gram, left, right, row, column, scale)
    # the block formed by its own call: fused into the two writes, XLA computed its sum of
    # products twice, once in the transpose's order
    return _write_mirrored(gram, _scaled_block(left, right, scale), row, column)


@jax.jit
def _scaled_block(left, right, scale):
    return scale * gram_block(left, right)


@donating_jit(donate_argnums=0)
def _write_block(gram, left, right, row, column, scale):
    return jax.lax.dynamic_update_slice(gram, scale * gram_block(left, right),
                                        (0, row, 0, column))


@donating_jit(donate_argnums=0)
def _write_mirrored(gram, block, row, column):
    gram = jax.lax.dynamic_update_slice(gram, block, (0, row, 0, column))
    k, n, _, m = block.shape
    reads, tile = _tiles(n, m, k, block.dtype.itemsize)
    writes = jnp.asarray(reads[:, ::-1]) + jnp.stack([column, row])
    return _copy_transposed(gram, block, reads, writes, tile)


def centred(G: FMatDense) -> FMatDense:
    """``C G C``, ``C = I − 11ᵀ/N`` on both example axes of ``G`` (``(K, N, K, N)``): the Gram
    matrix of the Jacobian centred over the examples. ``G``'s buffer is reused."""
    return FMatDense(centred_kernel(G.data))


@donating_jit(donate_argnums=0)
def centred_kernel(kernel: jax.Array) -> jax.Array:
    """``C_M K C_N`` for a ``(K, M, K, N)`` kernel ``K = J_a J_bᵀ``, ``C_P = I − 11ᵀ/P``: the
    kernel of the two Jacobians each centred over its own examples (``J_a[o, m] − (1/M)
    Σ_m' J_a[o, m']``, likewise ``J_b``). ``kernel``'s buffer is reused (donated)."""
    rows = jnp.mean(kernel, axis=3, keepdims=True)  # (K, M, K, 1): (K 1/N)[o, m, o']
    columns = jnp.mean(kernel, axis=1, keepdims=True)  # (K, 1, K, N)
    return kernel - rows - columns + jnp.mean(rows, axis=1, keepdims=True)


def gram_implicit(J: PFMapImplicit) -> FMatDense:
    """``J Jᵀ`` by products only: per chunk, the columns ``Jᵀ e₍ₙ,ₒ₎`` for its examples by
    ``vjp`` on that chunk, then ``J (Jᵀ e₍ₙ,ₒ₎)`` by ``jvp`` over all data (cost in
    :func:`jaxgeom.pfmap.GramMatrix`); ``G`` being symmetric, these columns are its rows."""
    return FMatDense(_by_products(J, J))


def cross_gram_implicit(left: PFMapImplicit, right: PFMapImplicit) -> jax.Array:
    """``J_left J_rightᵀ`` (``(K, M, K, N)``) by products only: per chunk of ``left``,
    ``J_leftᵀ e₍ₘ,ₒ₎`` for its examples by ``vjp`` on that chunk (``M K`` backward passes
    in all), then ``J_right (J_leftᵀ e₍ₘ,ₒ₎)``, the rows ``K[o, m, :, :]``, by ``jvp`` over
    all of ``right``'s data (``M K`` jvps of ``≈ 2 N F``). Memory one chunk's ``n_c K``
    columns of ``d`` and their ``(n_c K, K, N)`` products besides the result."""
    return _by_products(left, right)


def _by_products(left: PFMapImplicit, right: PFMapImplicit) -> jax.Array:
    """The rows ``K[o, m, :, :] = J_right (J_leftᵀ e₍ₘ,ₒ₎)`` chunk by chunk of ``left``,
    written in place (shared by :func:`gram_implicit` and :func:`cross_gram_implicit`)."""
    k = left.shape[0]
    if right is not left and right.shape[0] != k:
        raise ValueError(
            f"the two data sets give {k} and {right.shape[0]} outputs per example: a cross "
            "kernel needs the same outputs on both")
    m, n = left.num_examples, right.num_examples
    if _scans(left, right):
        return _by_products_scanned(left, right, k)
    gram, start = None, 0
    for c in left._chunks():
        units = jnp.eye(c.count * k, dtype=left.layer_collection.dtype).reshape(-1, c.count, k)
        rows = right._jvp_many(left._vjp_chunk(c, units))  # (count·K, K, N)
        if gram is None:
            gram = _zero_gram(k, m, n, rows.dtype)
        gram = _write_rows(gram, rows, start)
        start += c.count
    return gram


def _by_products_scanned(left: PFMapImplicit, right: PFMapImplicit, k: int) -> jax.Array:
    """:func:`_by_products` inside a ``jit``: the rows of each window of ``left``'s
    batches (:func:`_batch_windows`: real examples only, the last window overlapping its
    predecessor and writing its rows again) by one ``lax.scan`` over the windows, ``right``'s
    products over its chunks scanned inside (:meth:`PFMapImplicit._jvp_many`). Unrolled,
    the rows of every chunk were held at once (bench_small, windows of 32: 117 / 284 MiB of
    scratch for 256 / 512 examples)."""
    m, n = left.num_examples, right.num_examples
    gram = None
    for starts, size, window, seen in _batch_windows(left):
        units = jnp.eye(size * k, dtype=left.layer_collection.dtype).reshape(-1, size, k)

        def rows_at(start, window=window, size=size, units=units):
            batch, offset, _ = window(start)
            chunk = data_lib.Chunk(batch, np.ones(size), offset, size)
            return right._jvp_many(left._vjp_chunk(chunk, units))  # (size·K, K, N)

        if gram is None:
            rows = jax.eval_shape(rows_at, starts[0])
            gram = _zero_gram(k, m, n, rows.dtype)

        def write(gram, start, rows_at=rows_at, seen=seen):
            return _write_rows(gram, rows_at(start), seen + start), None

        gram = jax.lax.scan(write, gram, jnp.asarray(starts))[0]
    return gram


@donating_jit(donate_argnums=0)
def _write_rows(gram, rows, start):
    """The rows ``K[o, m, :, :]`` of a chunk's examples ``m`` (``(count·K, K, N)``, indexed
    ``[m, o; o', n]``) written in place: one chunk's rows besides ``K``, not all of them (nor,
    for the square ``J Jᵀ``, its columns and their transpose)."""
    k = gram.shape[0]
    rows = rows.reshape(-1, k, *rows.shape[1:]).transpose(1, 0, 2, 3)
    return jax.lax.dynamic_update_slice(gram, rows, (0, start, 0, 0))
