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
import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from jaxgeom.layers import LayerCollection
from jaxgeom.streaming import ChunkBuilder, builder, run, static_field
from jaxgeom.streaming import check_finite as check_finite  # re-exported

MODES = ("auto", "reverse", "forward")


class Accumulator(Protocol):
    """How a representation reduces per-example Jacobians (hashable: a static argument).

    ``init`` makes the zero state, ``update`` adds one chunk's masked Jacobian
    ``(n, K, d)`` (inside ``jit``), ``finalize`` turns the state and the number of
    examples ``N`` into the representation. An accumulator whose ``collects`` attribute
    is true instead receives the list of all chunks' (real) Jacobian rows in ``finalize``.
    """

    def init(self, dtype: Any) -> Any: ...

    def update(self, state: Any, jac: jax.Array) -> Any: ...

    def finalize(self, state: Any, n: int) -> Any: ...


def resolve_mode(mode: str, num_params: int, num_outputs: int) -> str:
    """``reverse`` (one backward per output) unless ``forward`` is cheaper (d < K)."""
    if mode not in MODES:
        raise ValueError(f"unknown Jacobian mode {mode!r}; valid modes: {MODES}")
    if mode == "auto":
        return "forward" if num_params < num_outputs else "reverse"
    return mode


def flatten_jacobian(jac_tree: Any, num_lead: int) -> jax.Array:
    """Concatenate a Jacobian pytree (leaves ``(*lead, *leaf_shape)``) to ``(*lead, d)``."""
    leaves = jax.tree_util.tree_leaves(jac_tree)
    lead = leaves[0].shape[:num_lead]
    return jnp.concatenate([x.reshape(lead + (-1,)) for x in leaves], axis=-1)


def example_jacobian(fn: Callable, params: Any, example: Any, index: Any, aux: Any, mode: str):
    """Jacobian ``(K, d)`` and value ``(K,)`` of ``fn`` at one example."""

    def with_value(p):
        out = fn(p, example, index, aux)
        return out, out

    transform = jax.jacrev if mode == "reverse" else jax.jacfwd
    jac, out = transform(with_value, has_aux=True)(params)
    return flatten_jacobian(jac, 1), out


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
    return example_output_count(fn, params, jax.tree_util.tree_map(lambda a: a[0], batch), aux)


def example_output_count(fn, params, example, aux) -> int:
    """K for one ``example`` (no batch axis)."""
    out = jax.eval_shape(fn, params, example, jnp.zeros((), jnp.int32), aux)
    if len(out.shape) != 1:
        raise ValueError(
            f"a per-example function must return a vector (K,); got shape {out.shape}"
        )
    return int(out.shape[0])


@builder
class JacobianBuilder(ChunkBuilder):
    """The chunk builder (:mod:`jaxgeom.streaming`) of an :class:`Accumulator`: per chunk,
    the masked per-example Jacobians ``(n, K, d)`` reduced by ``accumulator.update`` from
    its zero state (or kept whole, for an accumulator that ``collects``); the chunks' sums
    add up and ``accumulator.finalize`` makes the result. Peak memory: one chunk's
    Jacobians, ``n K d``."""

    fn: Callable = static_field()
    accumulator: Any = static_field()
    mode: str = static_field()
    dtype: Any = static_field()
    #: the number of examples when known before the first chunk (``with_examples``): a
    #: collecting accumulator's rows are then written into one buffer of the final size.
    #: A traced field, so that the compiled chunk step does not depend on it.
    examples: Any = None

    @classmethod
    def make(cls, fn, params, example, aux, accumulator, mode="auto") -> JacobianBuilder:
        """The builder for ``example``'s shapes (``mode="auto"`` resolved with ``K``)."""
        layout = LayerCollection.from_params(params)
        num_outputs = example_output_count(fn, params, example, aux)
        resolved = resolve_mode(mode, layout.numel(), num_outputs)
        return cls(fn, accumulator, resolved, layout.dtype)

    @property
    def _collects(self) -> bool:
        return getattr(self.accumulator, "collects", False)

    @property
    def sums(self) -> bool:
        return not self._collects

    def with_examples(self, n):
        return dataclasses.replace(self, examples=n) if self._collects else self

    def statistics(self, params, batch, mask, offset, aux):
        jac, out = chunk_jacobian(self.fn, params, batch, offset, aux, self.mode)
        finite = jnp.all(jnp.isfinite(out)) & jnp.all(jnp.isfinite(jac))
        if self._collects:  # padded rows are cut off in ``reduce``: no masking pass
            return jac, finite
        jac = jac * mask[:, None, None].astype(jac.dtype)
        return self.accumulator.update(self.accumulator.init(self.dtype), jac), finite

    def reduce(self, total, stats, count):
        if not self._collects:
            return super().reduce(total, stats, count)
        if self.examples is None:  # the size is unknown: keep the chunks
            return (total or []) + [stats if count == stats.shape[0] else stats[:count]]
        if total is None:  # data smaller than one chunk: padded to the chunk
            size = (max(int(self.examples), stats.shape[0]),) + stats.shape[1:]
            total = (jnp.zeros(size, stats.dtype), 0)
        rows, written = total
        return _write_rows(rows, stats, jnp.asarray(written)), written + count

    def finalize(self, total, stream):
        if self._collects and self.examples is not None:  # one buffer, maybe padded
            rows, _ = total
            total = [rows if rows.shape[0] == stream.n else rows[:stream.n]]
        return self.accumulator.finalize(total, stream.n)


@functools.partial(jax.jit, donate_argnums=0)
def _write_rows(rows: jax.Array, chunk: jax.Array, offset: jax.Array) -> jax.Array:
    """A chunk's rows written, in place, at the positions of its examples from ``offset``.

    The last chunk of a batch is the batch's last ``size`` rows rotated so that the new
    examples come first (:func:`jaxgeom.data._window`): it is rotated back and written over
    the last ``size`` rows, keeping the rows already written (examples seen in an earlier
    chunk: their values there may differ, e.g. Monte-Carlo draws keyed by their position
    in the chunk). Its own small compiled function, so that a data set of a new size
    recompiles this, not the chunk's Jacobian step.
    """
    size = chunk.shape[0]
    begin = jnp.minimum(offset, rows.shape[0] - size)
    new = (jnp.arange(size) >= offset - begin).reshape((size,) + (1,) * (chunk.ndim - 1))
    window = jax.lax.dynamic_slice_in_dim(rows, begin, size, axis=0)
    chunk = jnp.where(new, jnp.roll(chunk, offset - begin, axis=0), window)
    return jax.lax.dynamic_update_slice_in_dim(rows, chunk, begin, axis=0)


def accumulate(
    fn: Callable,
    params: Any,
    data: Any,
    accumulator: Accumulator,
    *,
    batch_size: int | None = None,
    mode: str = "auto",
    aux: Any = None,
) -> Any:
    """Reduce the per-example Jacobians of ``fn`` over ``data`` with ``accumulator``
    (one pass of :func:`jaxgeom.streaming.run` through a :class:`JacobianBuilder`).

    One compiled step per chunk shape: with ``batch_size`` set, every chunk (the last one
    padded and masked) has the same shape. Returns ``accumulator.finalize(state, N)``
    with ``N`` the number of examples seen.
    """
    def make(example):
        return JacobianBuilder.make(fn, params, example, aux, accumulator, mode)

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
