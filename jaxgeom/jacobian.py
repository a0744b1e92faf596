"""Per-example Jacobians, streamed over data in chunks.

Everything jaxgeom builds from data is a reduction of per-example Jacobians of a
*per-example function* ``fn(params, example, index, aux) -> (K,)``:

- ``example`` is one example (a pytree without the batch axis);
- ``index`` is the example's position among all examples seen (Monte-Carlo variants
  derive their PRNG key from it, so results do not depend on how data is chunked);
- ``aux`` is a pytree of arrays shared by all examples (covariance factors, keys).

``fn`` must be hashable (it is a static argument of the compiled step): the wrappers in
:mod:`jaxgeom.variants` are frozen dataclasses.

A chunk's Jacobian has shape ``(n, K, d)`` (examples, outputs, parameters, flat order);
the driver :func:`accumulate` (a :class:`JacobianBuilder` streamed by
:func:`jaxgeom.streaming.run`) keeps at most one chunk of it in memory.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxgeom import capture as capture_lib
from jaxgeom import data as data_lib
from jaxgeom._differentiable import FloatLeaves, calls_custom_vjp
from jaxgeom._memory import check_fits
from jaxgeom._signature import abstract, cached, signature
from jaxgeom.layers import LayerCollection, concat_last
from jaxgeom.streaming import ChunkBuilder, builder, run, static_field, tree_finite
from jaxgeom.streaming import check_finite as check_finite  # re-exported

MODES = ("auto", "reverse", "forward")


class Accumulator(Protocol):
    """How a representation reduces per-example Jacobians (hashable: a static argument).

    ``init`` makes the zero state, ``update`` adds one chunk's masked Jacobian
    ``(n, K, d)``, given as its per-leaf column pieces ``(n, K, size_i)`` in the flat leaf
    order (concatenated along the last axis they are the Jacobian: ``concat_last``), with
    ``state`` donated (inside ``jit``); ``finalize`` turns the state and the number of
    examples ``N`` into the representation. An accumulator whose ``collects`` attribute
    is true instead receives in ``finalize`` a list of blocks of Jacobian rows ``(m, d)``
    that, stacked, are all examples' rows in example order (``K`` rows per example:
    ``N K`` in all); with ``output_major`` also true, blocks ``(K, m, d)`` that,
    concatenated along their axis 1, are the ``(K, N, d)`` Jacobian.
    """

    def init(self, dtype: Any) -> Any: ...

    def update(self, state: Any, pieces: list[jax.Array]) -> Any: ...

    def finalize(self, state: Any, n: int) -> Any: ...


def resolve_mode(mode: str, num_params: int, num_outputs: int) -> str:
    """``reverse`` (one backward per output) unless ``forward`` is cheaper (d < K)."""
    if mode not in MODES:
        raise ValueError(f"unknown Jacobian mode {mode!r}; valid modes: {MODES}")
    if mode == "auto":
        return "forward" if num_params < num_outputs else "reverse"
    return mode


def resolve_model_mode(mode: str, fn: Callable, params: Any, example: Any, aux: Any,
                       num_params: int, num_outputs: int) -> str:
    """:func:`resolve_mode` for the per-example function ``fn``: ``"auto"`` stays in reverse
    mode, and ``"forward"`` is refused, when ``fn`` calls a ``jax.custom_vjp`` function
    (:func:`forward_mode_ok`)."""
    resolved = resolve_mode(mode, num_params, num_outputs)
    if resolved == "forward" and not forward_mode_ok(fn, params, example, aux):
        if mode == "forward":
            raise ValueError(
                "mode='forward': the model calls a jax.custom_vjp function, which JAX "
                "differentiates in reverse mode only; use mode='reverse' (or 'auto')")
        return "reverse"
    return resolved


def forward_mode_ok(fn: Callable, params: Any, example: Any, aux: Any) -> bool:
    """Whether JAX can differentiate the per-example ``fn(params, example, index, aux)`` in
    forward mode: no ``jax.custom_vjp`` function in its trace
    (:func:`~jaxgeom._differentiable.calls_custom_vjp`). Traced once per function and
    signature of the arguments; ``example`` has no batch axis."""
    return _forward_mode_ok(fn, signature((params, example, aux)))


@cached(maxsize=64)
def _forward_mode_ok(fn, sig) -> bool:
    params, example, aux = abstract(sig)
    index = jax.ShapeDtypeStruct((), jnp.int32)
    return not calls_custom_vjp(jax.make_jaxpr(fn)(params, example, index, aux).jaxpr)


def example_jacobian(fn: Callable, params: Any, example: Any, index: Any, aux: Any, mode: str):
    """Jacobian ``(K, d)`` and value ``(K,)`` of ``fn`` at one example (zero columns for
    integer or boolean leaves: :mod:`jaxgeom._differentiable`)."""
    floats = FloatLeaves.of(params)

    def with_value(primals):
        out = floats.bind(lambda p: fn(p, example, index, aux))(primals)
        return out, out

    if not floats.indices:  # nothing to differentiate (jacrev/jacfwd of no leaves fail)
        jac, out = [], with_value([])[0]
    else:
        transform = jax.jacrev if mode == "reverse" else jax.jacfwd
        jac, out = transform(with_value, has_aux=True)(floats.primals)
        # each leaf's columns in its dtype, as reverse mode's cotangents are: forward mode's
        # tangents take the outputs' (float32 parameters on float64 inputs: float64)
        jac = [j.astype(jnp.result_type(p)) for j, p in zip(jac, floats.primals)]
    return floats.ravel(jac, out.shape), out


def chunk_jacobian(fn, params, batch, offset, aux, mode):
    """Per-example Jacobians ``(n, K, d)`` and outputs ``(n, K)`` of one chunk."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    indices = offset + jnp.arange(n)
    return jax.vmap(example_jacobian, in_axes=(None, None, 0, 0, None, None))(
        fn, params, batch, indices, aux, mode
    )


def chunk_outputs(fn, params, batch, offset, aux):
    """The per-example outputs ``(n, K)`` of one chunk."""
    n = jax.tree_util.tree_leaves(batch)[0].shape[0]
    indices = offset + jnp.arange(n)
    return jax.vmap(fn, in_axes=(None, 0, 0, None))(params, batch, indices, aux)


def output_count(fn, params, batch, aux) -> int:
    """K: the number of outputs ``fn`` gives per example (shape-only evaluation)."""
    return example_output_count(fn, params, data_lib.example_shapes(batch), aux)


def example_output_count(fn, params, example, aux) -> int:
    """K for one ``example`` (no batch axis), cached per function and signature of the
    arguments (``jax.eval_shape`` costs about a millisecond even when its trace is cached:
    a tenth of a small model's Monte-Carlo build)."""
    return _output_count(fn, signature((params, example, aux)))


def check_vector_outputs(fn, params, example, aux) -> None:
    """Check that ``fn`` gives a ``(K,)`` vector per example — traced once per function and
    signature, and not at all for the front ends' wrappers (``fn.VECTOR_OUTPUTS``, e.g.
    :class:`~jaxgeom.variants.FisherOutputs`), whose model outputs were checked already."""
    if not getattr(fn, "VECTOR_OUTPUTS", False):
        example_output_count(fn, params, example, aux)


@cached(maxsize=64)
def _output_count(fn, sig) -> int:
    params, example, aux = abstract(sig)
    out = jax.eval_shape(fn, params, example, jax.ShapeDtypeStruct((), jnp.int32), aux)
    if len(out.shape) != 1:
        raise ValueError(
            f"a per-example function must return a vector (K,); got shape {out.shape}"
        )
    return int(out.shape[0])


@builder
class JacobianBuilder(ChunkBuilder):
    """The chunk builder (:mod:`jaxgeom.streaming`) of an :class:`Accumulator`: per chunk,
    the masked per-example Jacobians ``(n, K, d)`` reduced by ``accumulator.update`` from
    its zero state; the chunks' sums add up and ``accumulator.finalize`` makes the result.
    Peak memory: one chunk's Jacobians, ``n K d``.

    An accumulator that ``collects`` keeps every example's rows instead. When the number
    of examples ``N`` is known before the first chunk (in-memory data, ``with_examples``)
    the rows are written, chunk by chunk, into one ``(N K, d)`` buffer updated in place
    inside the chunk's compiled step: in reverse mode each leaf's block of a row is
    computed from the layer inputs and output gradients captured by
    :mod:`jaxgeom.capture` (an outer product for a dense layer) and fused into its write,
    so no chunk-sized intermediate is formed (XLA:CPU pays a page fault per 4 KiB of every
    freshly allocated array: forming, then copying, each chunk's rows cost 3× more than
    writing them in place). Peak memory: the storage plus one chunk's activations. The
    step is compiled for the buffer's shape: data of a new size compile it again.
    Otherwise (iterators) each chunk's rows are kept and concatenated at the end.
    """

    fn: Callable = static_field()
    accumulator: Any = static_field()
    mode: str = static_field()
    layout: LayerCollection = static_field()
    #: K, the number of outputs per example.
    num_outputs: int = static_field()
    #: the number of examples when known before the first chunk (``with_examples``).
    examples: int | None = static_field(default=None)
    #: where the data's last chunk starts, when known (``with_examples``).
    last_offset: int | None = static_field(default=None)

    @classmethod
    def make(cls, fn, params, example, aux, accumulator, mode="auto",
             layout: LayerCollection | None = None) -> JacobianBuilder:
        """The builder for ``example``'s shapes (``mode="auto"`` resolved with ``K``);
        ``layout`` (default: from ``params``) names the layers whose rows are written from
        captured inputs and output gradients."""
        layout = LayerCollection.from_params(params) if layout is None else layout
        num_outputs = example_output_count(fn, params, example, aux)
        resolved = resolve_model_mode(mode, fn, params, example, aux, layout.numel(),
                                      num_outputs)
        return cls(fn, accumulator, resolved, layout, num_outputs)

    @property
    def dtype(self):
        return self.layout.dtype

    @property
    def _collects(self) -> bool:
        return getattr(self.accumulator, "collects", False)

    @property
    def _output_major(self) -> bool:
        """Whether collected rows are laid out ``(K, N, d)`` rather than ``(N K, d)``."""
        return getattr(self.accumulator, "output_major", False)

    @property
    def updates_in_place(self) -> bool:
        return not self._collects or self.examples is not None

    @property
    def needs_static_count(self) -> bool:
        """For kept rows (cut to ``N K`` by :meth:`finalize`)."""
        return self._collects

    @property
    def finalizes_traced(self) -> bool:
        """For kept rows (the buffer is the result). An accumulator's ``finalize`` runs
        apart, in a compiled call of its own that donates the total (a dense Gram's
        division and mirroring: :func:`~jaxgeom.pmat._gram.mean_of_upper_grams`)."""
        return self._collects

    def with_examples(self, n, last_offset=None):
        if not self._collects:
            return self
        return dataclasses.replace(self, examples=int(n), last_offset=last_offset)

    def _overlaps(self, size: int) -> bool:
        """Whether a chunk of ``size`` examples is written over rows already written (the
        data's last chunk, short, placed to end at the buffer's end)."""
        return self.last_offset is None or self.last_offset > max(self.examples, size) - size

    def statistics(self, params, batch, mask, offset, aux):
        if not self._collects:
            return self._accumulate(self.accumulator.init(self.dtype), params, batch, mask,
                                    offset, aux)
        if self.mode == "reverse":  # the captured layers' rows are outer products
            pieces, finite = self._leaf_rows(params, batch, offset, aux)
            jac = concat_last(pieces)
        else:
            jac, out = chunk_jacobian(self.fn, params, batch, offset, aux, self.mode)
            finite = tree_finite((out, jac))
        if self._output_major:
            return jac.transpose(1, 0, 2), finite  # padded examples cut off in ``reduce``
        return jac.reshape(-1, jac.shape[-1]), finite  # padded rows cut off in ``reduce``

    def _accumulate(self, state, params, batch, mask, offset, aux):
        """``accumulator.update(state, masked chunk Jacobian by leaf)`` and whether it was
        finite: in the chunk's step ``state`` is the donated running total, so the
        accumulator adds the chunk's term into it directly (no zero state, no second
        total-sized term). In reverse mode each leaf's rows are computed from the captured
        layer inputs and output gradients (:meth:`_leaf_rows`: an outer product per dense
        layer), which the accumulator's consumer can fuse into its own reads: the chunk's
        Jacobian ``(n, K, d)`` need not exist as one array."""
        pieces, finite = self._leaf_rows(params, batch, offset, aux)
        weights = mask[:, None, None].astype(self.dtype)
        return self.accumulator.update(state, [piece * weights for piece in pieces]), finite

    def init_total(self, params, batch, mask, offset, aux):
        if not self._collects:
            return super().init_total(params, batch, mask, offset, aux)
        rows = max(self.examples, mask.shape[0])  # data smaller than one chunk: padded
        k, d = self.num_outputs, self.layout.numel()
        # every row is written before it is read (:meth:`update`): no initial values needed
        # (uninitialised on GPU/TPU; XLA:CPU has no such allocation and zero-fills)
        shape = (k, rows, d) if self._output_major else (rows * k, d)
        check_fits("The kept Jacobian rows of every example and output", shape, self.dtype,
                   "Keep the rows of fewer examples (a subset of the data), or build what "
                   "reduces them as they stream: a matrix PMatKFAC, PMatEKFAC, PMatDiag, "
                   "PMatQuasiDiag or PMatImplicit, a map PFMapImplicit (no rows kept)")
        return jax.lax.empty(shape, self.dtype)

    def update(self, total, params, batch, mask, offset, aux):
        if not self._collects:
            return self._accumulate(total, params, batch, mask, offset, aux)
        # The chunk's first ``count`` rows are examples ``offset, offset + 1, …``, written
        # from row ``offset``. When the data's last chunk is short and would end past the
        # buffer (:meth:`_overlaps`), every chunk is written at ``begin = min(offset,
        # N - size)``: the inputs are rotated back (cheap: inputs, not rows), the rows at
        # positions already written keep their values (Monte-Carlo draws depend on an
        # example's position), and the others are written in place. Otherwise each chunk's
        # rows are written as they are: a padded chunk's padding rows land where later
        # chunks write (or past ``N``, cut off by ``finalize``), and the select of the
        # kept rows, which XLA:CPU evaluated at a third of the speed of a plain write, is
        # not compiled.
        size = mask.shape[0]
        k = self.num_outputs
        overlaps = self._overlaps(size)
        begin = offset
        if overlaps:
            examples = total.shape[1] if self._output_major else total.shape[0] // k
            begin = jnp.minimum(offset, examples - size)
            shift = offset - begin
            batch = jax.tree_util.tree_map(lambda a: jnp.roll(a, shift, axis=0), batch)
            if self._output_major:  # (K, size, ·) blocks at example ``begin`` of each output
                keep = (jnp.arange(size) < shift)[None, :, None]
            else:  # (size K, ·) rows from row ``begin K``
                keep = (jnp.arange(size * k) < shift * k)[:, None]
        pieces, finite = self._leaf_rows(params, batch, begin, aux)
        column = 0
        for piece in pieces:
            if self._output_major:
                piece = piece.reshape(size, k, -1).transpose(1, 0, 2)
                start = (0, begin, column)
            else:
                piece = piece.reshape(size * k, -1)
                start = (begin * k, column)
            if overlaps:
                piece = jnp.where(keep, jax.lax.dynamic_slice(total, start, piece.shape), piece)
            total = jax.lax.dynamic_update_slice(total, piece, start)
            column += piece.shape[-1]
        return total, finite

    def _leaf_rows(self, params, batch, offset, aux) -> tuple[list[jax.Array], jax.Array]:
        """The chunk's Jacobian rows as one ``(n, K, size_i)`` block per leaf (reverse mode:
        from the captured layer inputs and output gradients) and whether all were finite."""
        if self.mode != "reverse":
            jac, out = chunk_jacobian(self.fn, params, batch, offset, aux, self.mode)
            edges = self.layout.offsets
            pieces = [jac[..., a:b] for a, b in zip(edges[:-1], edges[1:])]
            return pieces, tree_finite((out, jac))
        example = jax.tree_util.tree_map(lambda a: a[0], batch)
        plan = capture_lib.make_plan(self.fn, params, example, aux, self.layout)
        captured = capture_lib.capture_chunk(plan, params, batch, offset, aux)
        pieces = capture_lib.leaf_gradients(plan, self.layout, captured)
        return pieces, capture_lib.all_finite(captured, capture_lib.captured_sums(captured))

    def reduce(self, total, stats, count):
        if not self._collects:
            return super().reduce(total, stats, count)
        if self._output_major:
            return (total or []) + [stats if count == stats.shape[1] else stats[:, :count]]
        rows = count * self.num_outputs
        return (total or []) + [stats if rows == stats.shape[0] else stats[:rows]]

    def finalize(self, total, stream):
        if self._collects and self.examples is not None:  # one buffer, maybe padded
            if self._output_major:
                total = [total if total.shape[1] == stream.n else total[:, :stream.n]]
            else:
                rows = stream.n * self.num_outputs
                total = [total if total.shape[0] == rows else total[:rows]]
        return self.accumulator.finalize(total, stream.n)


def accumulate(
    fn: Callable,
    params: Any,
    data: Any,
    accumulator: Accumulator,
    *,
    batch_size: int | None = None,
    mode: str = "auto",
    aux: Any = None,
    layout: LayerCollection | None = None,
) -> Any:
    """Reduce the per-example Jacobians of ``fn`` over ``data`` with ``accumulator``
    (one pass of :func:`jaxgeom.streaming.run` through a :class:`JacobianBuilder`).

    One compiled step per chunk shape: with ``batch_size`` set, every chunk (the last one
    padded and masked) has the same shape. ``layout``: the model's layers (from
    :func:`jaxgeom.layers.LayerCollection.from_model`), whose rows are then formed from
    their captured inputs and output gradients in reverse mode; without it every leaf's
    rows come from the per-example backward passes (the chunk's whole Jacobian, formed
    and then copied). Returns ``accumulator.finalize(state, N)`` with ``N`` the number of
    examples seen.
    """
    def make(example):
        return JacobianBuilder.make(fn, params, example, aux, accumulator, mode, layout)

    return run(make, params, data, batch_size=batch_size, aux=aux)


@dataclasses.dataclass(frozen=True)
class Hashable:
    """Wrap a callable so it can be a static ``jit`` argument even if it is unhashable
    (falls back to identity)."""

    fn: Callable

    def __hash__(self):
        try:
            return hash(self.fn)
        except TypeError:
            return id(self.fn)

    def __eq__(self, other):
        if not isinstance(other, Hashable):
            return NotImplemented
        if self.fn is other.fn:
            return True
        try:
            return bool(self.fn == other.fn)
        except Exception:  # noqa: BLE001 - comparing arbitrary callables
            return False

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)
