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

The cross kernel ``K = J_a J_bᵀ`` between two data sets (``(K, M, K, N)``,
:func:`jaxgeom.pfmap.CrossGramMatrix`: test × train for NTK / GP prediction) is the same
loop over every pair of a window of ``a`` and a window of ``b`` (:func:`cross_gram_by_layers`,
none mirrored), or the same rows by products (:func:`cross_gram_implicit`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxgeom import data as data_lib
from jaxgeom._compile import donating_jit, model_jit
from jaxgeom.capture import CapturePlan, capture_chunk, example_gradients, make_plan
from jaxgeom.fspace import FMatDense
from jaxgeom.jacobian import chunk_jacobian, output_count, resolve_mode
from jaxgeom.layers import LayerCollection

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


def _assemble(left: ReplayedFunction, right: ReplayedFunction | None,
              keep_bytes: int | None) -> jax.Array:
    """The window loop shared by :func:`gram_by_layers` (``right=None``: the pairs ``i ≤ j``
    of ``left``'s windows, each block written with its transpose) and
    :func:`cross_gram_by_layers` (every pair of a left and a right window), each block
    written in place into the donated ``(K, M, K, N)`` result."""
    rows = _Factors(left, list(data_lib.iter_windows(left.data, left.batch_size)), keep_bytes)
    dtype = left.layer_collection.dtype
    symmetric = right is None
    if symmetric:
        columns, scale = rows, jnp.asarray(left.scale, dtype) ** 2
    else:
        columns = _Factors(right, list(data_lib.iter_windows(right.data, right.batch_size)),
                           keep_bytes)
        if columns.num_outputs != rows.num_outputs:
            raise ValueError(
                f"the two data sets give {rows.num_outputs} and {columns.num_outputs} outputs "
                "per example: a cross kernel needs the same outputs on both")
        scale = jnp.asarray(left.scale, dtype) * jnp.asarray(right.scale, dtype)
    k = rows.num_outputs
    gram = jnp.zeros((k, rows.n, k, columns.n), dtype)
    swap = False
    if not symmetric:  # hold the windows of the side whose factors are not kept (each
        # computed once), else of the side with fewer windows
        kept_rows, kept_columns = rows.kept_all(), columns.kept_all()
        swap = (kept_rows if kept_rows != kept_columns
                else len(columns.parts) < len(rows.parts))
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


def gram_norm_sq(J: ReplayedFunction, keep_bytes: int | None = None) -> jax.Array:
    """``‖J Jᵀ‖²_F = Σ_{chunks i, j} ‖J_i J_jᵀ‖²_F`` of the unscaled ``J``, from the blocks of
    :func:`gram_block` over the masked chunks (padding contributes zero; no ``(NK)²``
    matrix is formed). For ``M = (s/N) JᵀJ``, ``‖M‖_F = |s|/N · ‖J Jᵀ‖_F``. Cost and
    ``keep_bytes``: :func:`gram_by_layers`'s."""
    chunks = list(J._chunks())
    factors = _Factors(J, chunks, keep_bytes)
    total = 0.0
    for i in range(len(chunks)):
        left = factors[i]
        total += _block_norm_sq(left, left)
        for j in range(i + 1, len(chunks)):
            total += 2 * _block_norm_sq(left, factors[j])
    return total


class _Factors:
    """The :class:`GramFactor` of each of ``parts`` (windows, or masked chunks), computed
    when asked for and kept when all of them fit in ``keep_bytes`` (default: one part's
    Jacobian, ``n K d`` entries): decided on the first one."""

    def __init__(self, J: ReplayedFunction, parts: list, keep_bytes: int | None):
        first = parts[0].batch
        self.num_outputs = output_count(J.fn, J.params, first, J.aux)
        self.parts, self.make = parts, _factor_maker(J, first, self.num_outputs)
        self.n, self.d = J.num_examples, J.layer_collection.numel()
        self.itemsize = jnp.dtype(J.layer_collection.dtype).itemsize
        self.keep_bytes = keep_bytes
        self.kept: list[GramFactor | None] = [None] * len(parts)
        self.keep: bool | None = None
        self.last: tuple[int, GramFactor] | None = None  # the latest one, kept or not

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
            limit = (size * self.num_outputs * self.d * self.itemsize
                     if self.keep_bytes is None else self.keep_bytes)
            self.keep = _factor_bytes(out) * self.n <= limit * size
        if self.keep:
            self.kept[i] = out
        self.last = (i, out)
        return out


def _factor_bytes(f: GramFactor) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(f))


def _factor_maker(J: ReplayedFunction, first: Any, k: int) -> Callable[..., GramFactor]:
    """``(batch, offset, mask) -> GramFactor`` for ``J``'s chunks (captured in reverse
    mode; ``mask``: ``None`` for windows of real examples)."""
    layout = J.layer_collection
    mode = resolve_mode(J.mode, layout.numel(), k)
    if mode == "forward":
        return lambda batch, offset, mask: _rows_factor(
            J.params, batch, offset, J.aux, mask, fn=J.fn, dtype=layout.dtype)
    example = jax.tree_util.tree_map(lambda a: a[0], first)
    plan = make_plan(J.fn, J.params, example, J.aux, layout)
    return lambda batch, offset, mask: _captured_factor(plan, layout, J.params, batch,
                                                        offset, J.aux, mask)


@functools.partial(model_jit, static_argnames=("fn", "dtype"))
def _rows_factor(params, batch, offset, aux, mask, *, fn, dtype) -> GramFactor:
    jac, _ = chunk_jacobian(fn, params, batch, offset, aux, "forward")
    if mask is not None:  # padding: zero rows
        jac = jac * mask[:, None, None].astype(jac.dtype)
    return GramFactor((), (), jac.astype(dtype).transpose(1, 0, 2))


@functools.partial(model_jit, static_argnums=(0, 1))
def _captured_factor(plan: CapturePlan, layout: LayerCollection, params, batch, offset,
                     aux, mask) -> GramFactor:
    cap = capture_chunk(plan, params, batch, offset, aux, mask)  # padding: zero gradients
    dtype = layout.dtype
    n, k = cap.outputs.shape
    inputs, grads, rows = [], [], []
    for spec, a, g in zip(plan.specs, cap.inputs, cap.grads):
        if spec.kind == "dense" and a.shape[1] == 1:  # one position: the input Gram
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
    return jax.lax.dynamic_update_slice(gram, block.transpose(2, 3, 0, 1), (0, column, 0, row))


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
    gram, start = None, 0
    for c in left._chunks():
        units = jnp.eye(c.count * k, dtype=left.layer_collection.dtype).reshape(-1, c.count, k)
        rows = right._jvp_many(left._vjp_chunk(c, units))  # (count·K, K, N)
        if gram is None:
            gram = jnp.zeros((k, m, k, n), rows.dtype)
        gram = _write_rows(gram, rows, start)
        start += c.count
    return gram


@donating_jit(donate_argnums=0)
def _write_rows(gram, rows, start):
    """The rows ``K[o, m, :, :]`` of a chunk's examples ``m`` (``(count·K, K, N)``, indexed
    ``[m, o; o', n]``) written in place: one chunk's rows besides ``K``, not all of them (nor,
    for the square ``J Jᵀ``, its columns and their transpose)."""
    k = gram.shape[0]
    rows = rows.reshape(-1, k, *rows.shape[1:]).transpose(1, 0, 2, 3)
    return jax.lax.dynamic_update_slice(gram, rows, (0, start, 0, 0))
