"""Jacobian maps (parameter space → function space) and the function-space builders.

A *PFMap* is the per-example Jacobian ``J[o, n, i] = ∂f_o(x_n) / ∂θ_i`` of ``K`` outputs
over ``N`` examples, a linear map from parameter space (``d``) to function space
(``(K, N)``):

- ``jvp(v)``: ``(J v)[o, n] = Σ_i J[o,n,i] v_i`` → :class:`~jaxgeom.fspace.FVector`;
- ``vjp(f)``: ``(Jᵀ f)_i = Σ_{o,n} J[o,n,i] f[o,n]`` (sums over outputs *and* examples)
  → :class:`~jaxgeom.vector.PVector`;
- ``to_dense()``: the ``(K, N, d)`` array (NNGeometry's layout: outputs, examples,
  parameters in the flat order). Every ``PMat`` accepts a PFMap in ``mmap``,
  ``mapTMmap`` (``reduction="sum"``/``"diag"``/``"full"``) and ``solve`` through it.

:class:`PFMapDense` stores ``J``; :class:`PFMapImplicit` stores only the function, the
parameters and the data, and computes products on demand.

Entry points: :func:`Jacobian` (the map) and :func:`GramMatrix` (the empirical NTK
``J Jᵀ``, an :class:`~jaxgeom.fspace.FMatDense`).
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import data as data_lib
from jaxgeom._compile import model_jit
from jaxgeom._differentiable import FloatLeaves
from jaxgeom._serialization import register_dataclass
from jaxgeom._sharding import accepts_sharded_data
from jaxgeom.fspace import FMatDense, FVector, as_fvector_data
from jaxgeom.gram import (
    centred,
    centred_kernel,
    cross_gram_by_layers,
    cross_gram_implicit,
    gram_by_layers,
    gram_implicit,
)
from jaxgeom.jacobian import (
    Hashable,
    accumulate,
    check_vector_outputs,
    output_count,
    resolve_mode,
)
from jaxgeom.layers import Layer, LayerCollection
from jaxgeom.pmat.base import check_precision, check_shape, static_field
from jaxgeom.pmat.implicit import _jacobian_product, _masked_outputs
from jaxgeom.replay import ReplayedFunction
from jaxgeom.restriction import RestrictedFunction, restrict
from jaxgeom.scaling import ScalarMultiples
from jaxgeom.streaming import scaled, scan_chunks, sum_chunks
from jaxgeom.variants import BatchedFunction, check_one_array, check_outputs
from jaxgeom.vector import PVector, _unravel, as_flat, product_dtype


def _pfmap(cls: type) -> type:
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    return register_dataclass(cls)


class PFMapAbstract(ScalarMultiples, abc.ABC):
    """The common algebra of Jacobian maps; subclasses give ``_jvp_many``/``_vjp_many``
    (stacks of vectors) and ``to_dense``."""

    layer_collection: LayerCollection

    ARRAY_OPERAND_FIX: ClassVar[str] = (
        "J.jvp(v) maps a parameter-space vector, J.vjp(f) a function-space one; to add a "
        "(K, N, d) array, wrap it first: PFMapDense(J.layer_collection, array)")

    @abc.abstractmethod
    def _jvp_many(self, rows: jax.Array) -> jax.Array:
        """``(m, d)`` flat vectors → ``(m, K, N)``."""

    @abc.abstractmethod
    def _vjp_many(self, cotangents: jax.Array) -> jax.Array:
        """``(m, K, N)`` function-space vectors → ``(m, d)`` flat vectors."""

    @abc.abstractmethod
    def to_dense(self) -> jax.Array:
        """The ``(K, N, d)`` Jacobian."""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int, int]:
        """``(K, N, d)``."""

    # ------------------------------------------------------------------ products
    def jvp(self, v: Any) -> FVector:
        """``J v`` (``(K, N)``) for a ``PVector``, params pytree or flat ``(d,)`` vector."""
        flat, _ = as_flat(v, self.layer_collection)
        out = self._jvp_many(flat.reshape(1, -1))  # reshapes: eager indexing is slow
        return FVector(out.reshape(out.shape[1:]))

    def vjp(self, f: Any) -> PVector:
        """``Jᵀ f = Σ_{o,n} f[o,n] J[o,n,:]`` for an ``FVector`` or ``(K, N)`` array."""
        data = as_fvector_data(f, self.shape[:2])
        out = self._vjp_many(data.reshape(1, *data.shape))
        return PVector(_unravel(self.layer_collection, out.reshape(-1)))

    # ------------------------------------------------------------------ views
    def size(self, dim: int | None = None):
        """``(K, N, d)``, or one of them."""
        return self.shape if dim is None else self.shape[dim]

    def to_dense_layer(self, layer: Layer | str) -> jax.Array:
        """The ``(K, N, d_l)`` columns of one layer (its flat indices, ascending)."""
        idx = self.layer_collection.layer_indices(layer)
        return jnp.take(self.to_dense(), idx, axis=-1)

    def iter_by_layer(self) -> Iterator[tuple[Layer, jax.Array]]:
        """``(layer, (K, N, d_l) columns)`` for each layer of the layer collection."""
        dense = self.to_dense()
        for layer in self.layer_collection.layers:
            yield layer, jnp.take(dense, self.layer_collection.layer_indices(layer), axis=-1)

    # ------------------------------------------------------------------ algebra
    def __add__(self, other: Any) -> PFMapAbstract:
        if not isinstance(other, PFMapAbstract):
            return self._array_operand(other, "+")
        return self._combine(other, 1)

    def __sub__(self, other: Any) -> PFMapAbstract:
        if not isinstance(other, PFMapAbstract):
            return self._array_operand(other, "-")
        return self._combine(other, -1)

    @abc.abstractmethod
    def _scale(self, s: Any) -> PFMapAbstract: ...

    def _combine(self, other: PFMapAbstract, sign: int) -> PFMapAbstract:
        """``self + sign·other``; dense unless both are implicit."""
        self._check_compatible(other)
        return PFMapDense(self.layer_collection, self.to_dense() + sign * other.to_dense())

    def _check_compatible(self, other: PFMapAbstract) -> None:
        if other.layer_collection != self.layer_collection or other.shape != self.shape:
            raise ValueError(
                f"cannot combine Jacobian maps of shapes {self.shape} and {other.shape} (or "
                "over different parameter layouts)"
            )

    def __repr__(self) -> str:
        k, n, d = self.shape
        return f"{type(self).__name__}(outputs={k}, examples={n}, d={d})"


@_pfmap
class PFMapDense(PFMapAbstract):
    """The per-example Jacobian stored as a ``(K, N, d)`` array.

    Costs: storage ``K N d``; build ``N K B`` (reverse mode, one backward per output; or
    ``N d F`` forward, whichever is cheaper), streamed in chunks; ``jvp``/``vjp``
    ``K N d``.

    Attributes:
      layer_collection: the parameter layout (static).
      data: ``J[o, n, i]``, shape ``(K, N, d)`` (flat parameter order).
    """

    layer_collection: LayerCollection = static_field()
    data: jax.Array = dataclasses.field(default=None)

    def __post_init__(self):
        d = self.layer_collection.numel()
        check_shape("PFMapDense data", getattr(self.data, "shape", None), f"(K, N, {d})",
                    lambda s: s[-1] == d, 3)

    @property
    def shape(self):
        return tuple(self.data.shape)

    def _jvp_many(self, rows):
        return jnp.einsum("knd,md->mkn", self.data, rows)

    def _vjp_many(self, cotangents):
        return jnp.einsum("knd,mkn->md", self.data, cotangents)

    def to_dense(self):
        return self.data

    def _scale(self, s):
        return PFMapDense(self.layer_collection, self.data * s)

    # ------------------------------------------------------------------ construction
    @classmethod
    @accepts_sharded_data  # PFMapImplicit.to_dense builds one from its stored data
    def from_jacobians(cls, fn, params, data, *, layer_collection, batch_size=None,
                       mode="auto", aux=None) -> PFMapDense:
        """Stream the per-example Jacobians of ``fn`` and stack them (``N K d`` memory)."""
        return accumulate(fn, params, data, _Stack(layer_collection), batch_size=batch_size,
                          mode=mode, aux=aux, layout=layer_collection)


@dataclasses.dataclass(frozen=True)
class _Stack:
    """An accumulator (:mod:`jaxgeom.jacobian`) that keeps every chunk's Jacobian rows,
    written output-major into the ``(K, N, d)`` result (no transposed copy at the end)."""

    layer_collection: LayerCollection
    collects: ClassVar[bool] = True
    output_major: ClassVar[bool] = True

    def init(self, dtype):
        return None

    def finalize(self, chunks, n):
        data = jnp.concatenate(chunks, axis=1) if len(chunks) > 1 else chunks[0]
        return PFMapDense(self.layer_collection, data)


@_pfmap
class PFMapImplicit(ReplayedFunction, PFMapAbstract):
    """The Jacobian map ``s · J`` computed on demand: stores the function, parameters and
    data (as a list of batches), never ``J``.

    ``fn`` is a per-example function ``fn(params, example, index, aux) -> (K,)``
    (:mod:`jaxgeom.jacobian`); ``J[o, n]`` its Jacobian at example ``n``. Data are read in
    chunks of ``batch_size`` examples (the last one padded and masked): eagerly a Python
    loop of compiled steps, inside a ``jit`` one ``lax.scan``
    (:func:`~jaxgeom.streaming.scan_chunks`: memory bounded by ``batch_size``).

    Costs (``F``/``B``: one forward/backward pass per example): ``jvp`` one ``jax.jvp``
    over all data, ``≈ 2 N F``; ``vjp`` one ``jax.vjp``, ``≈ N (F + B)``; memory O(d) plus
    one chunk's activations. Stacks of vectors are vectorised (``vmap``) per chunk.
    ``to_dense`` streams the per-example Jacobians (``N K B``, memory ``K N d``).

    ``A + B`` of two implicit maps over the same examples is implicit (its function sums
    the two, each at its own parameters); with a ``PFMapDense`` it is dense.

    Attributes:
      layer_collection: the parameter layout (static).
      fn: the per-example function (static, hashable).
      params: where the Jacobian is taken (integer or boolean leaves are constants: zero
        columns, as in ``PFMapDense``).
      data: the list of batches.
      aux: the arrays shared by all examples (``fn``'s last argument).
      scale: the scalar ``s``.
      batch_size: the chunk size (static; ``None``: one chunk per batch).
      mode: Jacobian mode of ``to_dense`` (static).
    """



    @property
    def shape(self):
        first = next(self._chunks())
        k = output_count(self.fn, self.params, first.batch, self.aux)
        return (k, self.num_examples, self.layer_collection.numel())

    # ------------------------------------------------------------------ products
    def _jvp_many(self, rows):
        def jvps(batch, mask, offset):
            return _chunk_jvps(self.params, rows, batch, mask, offset, self.aux, fn=self.fn,
                               layout=self.layer_collection)

        if self._scans_chunks(rows):
            # one buffer of every example's products, each chunk written at its offset (a
            # padded chunk's extra rows where the next one writes, or past the end)
            size = int(self.batch_size)

            def empty(*chunk):
                value = jax.eval_shape(jvps, *chunk)
                n = self.num_examples + size
                return jnp.zeros((value.shape[0], n, value.shape[2]), value.dtype)

            def write(buffer, batch, mask, offset):
                return jax.lax.dynamic_update_slice_in_dim(
                    buffer, jvps(batch, mask, offset), offset, axis=1)

            buffer, n = scan_chunks(write, empty, self.data, self.batch_size)
            return _joined([buffer], (n,), self.scale)
        chunks = list(self._chunks())
        parts = [jvps(c.batch, c.mask, c.offset) for c in chunks]
        return _joined(parts, tuple(c.count for c in chunks), self.scale)

    def _vjp_many(self, cotangents):
        """``(m, d)``: ``s Jᵀ fᵢ`` for the ``(m, K, N)`` cotangents ``fᵢ``, chunk by chunk
        (each chunk's cotangents cut by one compiled call, as its examples are)."""
        def vjps(batch, mask, offset):
            cot = _cotangent_window(cotangents, offset, mask.shape[0])
            return _chunk_vjps(self.params, cot, batch, mask, offset, self.aux, fn=self.fn)

        if self._scans_chunks(cotangents):
            total, _ = sum_chunks(vjps, self.data, self.batch_size)
        else:
            total = None
            for c in self._chunks():
                part = vjps(c.batch, c.mask, c.offset)
                total = part if total is None else total + part
        total = self.scale * total
        return total.astype(product_dtype(cotangents.dtype, total.dtype))

    def _vjp_chunk(self, c: data_lib.Chunk, cotangents: jax.Array) -> jax.Array:
        """``(m, d)``: ``s J_cᵀ fᵢ`` for cotangents ``(m, count, K)`` on the examples of ``c``."""
        cot = jnp.pad(cotangents, ((0, 0), (0, c.mask.shape[0] - c.count), (0, 0)))
        return self.scale * _chunk_vjps(self.params, cot, c.batch, c.mask, c.offset, self.aux,
                                        fn=self.fn)

    def to_dense(self):
        dense = PFMapDense.from_jacobians(
            self.fn, self.params, self.data, layer_collection=self.layer_collection,
            batch_size=self.batch_size, mode=self.mode, aux=self.aux,
        )
        return scaled(dense.data, self.scale)

    def to_dense_layer(self, layer):
        """The ``(K, N, d_l)`` columns of one layer, streamed from the Jacobians of the
        layer's own parameters (:mod:`jaxgeom.restriction`): memory ``K N d_l`` plus one
        chunk's, never the whole ``(K, N, d)`` map; cost one pass over the data (``N K``
        backward passes, or ``N d_l`` forward ones, whichever ``mode`` picks)."""
        layer = self.layer_collection.layer(layer) if isinstance(layer, str) else layer
        part = restrict(self.layer_collection, (layer.id,))
        dense = PFMapDense.from_jacobians(
            RestrictedFunction(self.fn, part), part.select(self.params), self.data,
            layer_collection=part.layer_collection, batch_size=self.batch_size,
            mode=self.mode, aux=(self.params, self.aux),
        )
        # in the map's dtype: a layer of integer or boolean leaves alone (zero columns) has
        # the default floating dtype (LayerCollection.dtype)
        return scaled(dense.data.astype(self.layer_collection.dtype), self.scale)

    def iter_by_layer(self):
        """``(layer, (K, N, d_l) columns)`` for each layer, one pass over the data per layer
        (:meth:`to_dense_layer`): memory one layer's columns at a time."""
        for layer in self.layer_collection.layers:
            yield layer, self.to_dense_layer(layer)

    # ------------------------------------------------------------------ algebra
    def _scale(self, s):
        return dataclasses.replace(self, scale=self.scale * s)

    def _combine(self, other, sign):
        if not isinstance(other, PFMapImplicit):
            return super()._combine(other, sign)
        self._check_compatible(other)
        _check_same_data(self.data, other.data)
        delta = jax.tree_util.tree_map(jnp.subtract, other.params, self.params)
        fn = _SumOf(self.fn, other.fn)
        aux = (self.aux, other.aux, delta, self.scale, sign * other.scale)
        return dataclasses.replace(self, fn=fn, aux=aux, scale=jnp.ones_like(self.scale))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_jacobians(cls, fn, params, data, *, layer_collection, batch_size=None,
                       mode="auto", aux=None) -> PFMapImplicit:
        """Store ``fn``, ``params``, the batches of ``data`` and ``aux`` (shape checks only)."""
        resolve_mode(mode, 1, 1)  # validates the name
        batches = list(data_lib.iter_batches(data))
        check_vector_outputs(fn, params, data_lib.first_example(batches, batch_size), aux)
        scale = np.ones((), layer_collection.dtype)
        return cls(layer_collection, fn, params, batches, aux, scale, batch_size, mode)


@dataclasses.dataclass(frozen=True)
class _SumOf:
    """The per-example function ``a·f(θ) + b·g(θ + δ)`` with ``aux = (aux_f, aux_g, δ, a,
    b)``: its Jacobian at ``θ`` is ``a J_f(θ) + b J_g(θ + δ)``."""

    f: Callable
    g: Callable

    def __call__(self, params, example, index, aux):
        aux_f, aux_g, delta, a, b = aux
        shifted = jax.tree_util.tree_map(jnp.add, params, delta)
        return a * self.f(params, example, index, aux_f) + b * self.g(
            shifted, example, index, aux_g
        )


def _check_same_data(a: list, b: list) -> None:
    """Both maps must read the same examples (compared when not traced)."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    same = len(leaves_a) == len(leaves_b) and all(
        x is y or isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer)
        or (np.shape(x) == np.shape(y) and np.array_equal(x, y))
        for x, y in zip(leaves_a, leaves_b)
    )
    if not same:
        raise ValueError(
            "PFMapImplicit maps can only be added when built over the same examples; "
            "convert to PFMapDense (PFMapDense(m.layer_collection, m.to_dense())) otherwise"
        )


# ----------------------------------------------------------------------------- kernels
# The chunk loops of PFMapImplicit run eagerly; the small array work around them is one
# compiled call each (dispatched one operation at a time, eager slices, pads and
# concatenations cost more than the products on a small model).
@functools.partial(jax.jit, static_argnums=1)
def _joined(parts: list, counts: tuple[int, ...], scale: jax.Array) -> jax.Array:
    """``(m, K, N)``: the chunks' ``(m, size, K)`` products without their padding, in order."""
    real = [p[:, :n] for p, n in zip(parts, counts)]
    return scale * jnp.concatenate(real, axis=1).transpose(0, 2, 1)


@functools.partial(jax.jit, static_argnums=2)
def _cotangent_window(cotangents: jax.Array, offset: int, size: int) -> jax.Array:
    """``(m, size, K)``: the cotangents of the ``size`` examples from ``offset`` (past the
    end, the last example's: their outputs are masked out, so they contribute nothing)."""
    examples = offset + jnp.arange(size)
    return jnp.take(cotangents, examples, axis=2, mode="clip").transpose(0, 2, 1)


@model_jit(static_argnames=("fn", "layout"))
def _chunk_jvps(params, rows, batch, mask, offset, aux, *, fn, layout):
    """``(m, n, K)``: ``J_c vᵢ`` of one chunk for the rows ``vᵢ`` of ``(m, d)`` (the entries
    of integer or boolean leaves do not count: :mod:`jaxgeom._differentiable`)."""
    floats = FloatLeaves.of(params)
    outputs = floats.bind(_masked_outputs(fn, batch, mask, offset, aux))
    product = _jacobian_product(fn, params, batch, aux, outputs, floats)
    jv = jax.vmap(lambda row: product(floats.tangents(row)))(rows)
    return jv.astype(product_dtype(rows.dtype, jv.dtype))


@model_jit(static_argnames=("fn",))
def _chunk_vjps(params, cotangents, batch, mask, offset, aux, *, fn):
    """``(m, d)``: ``J_cᵀ fᵢ`` of one chunk for the ``(m, n, K)`` cotangents ``fᵢ`` (zero
    at the places of integer or boolean leaves)."""
    floats = FloatLeaves.of(params)
    outputs, vjp = jax.vjp(floats.bind(_masked_outputs(fn, batch, mask, offset, aux)),
                           floats.primals)
    # cotangents in the outputs' dtype (float64 ones for a float32 model under x64), as
    # jax.vjp requires; the caller casts the result back
    cotangents = cotangents.astype(outputs.dtype)
    return floats.ravel(jax.vmap(vjp)(cotangents)[0], cotangents.shape[:1])


# ----------------------------------------------------------------------------- builders
@dataclasses.dataclass(frozen=True)
class _FlatOutputs:
    """``apply_fn(params, x)`` with the outputs of each example flattened: ``(N, K)``."""

    apply_fn: Callable

    def __call__(self, params, x):
        out = self.apply_fn(params, x)
        check_one_array(out)
        if not out.shape or out.shape[0] != data_lib.num_examples(x):
            check_outputs("regression", tuple(out.shape), data_lib.num_examples(x))
        return out.reshape(out.shape[0], -1)


def _setup(apply_fn, params, data, function, layer_collection, lazy):
    """The per-example function, the data it reads and the layer collection."""
    from jaxgeom.metrics import check_rows, layers_for

    first, data = data_lib.peek(data, require_examples=True)
    if function is None:
        if apply_fn is None:
            raise ValueError("pass apply_fn, or function=fn(params, batch) -> (N, K)")
        batched = _FlatOutputs(Hashable(apply_fn))
        first = data_lib.inputs_of(first)
        data = data_lib.inputs_only(data, materialise=lazy)
    else:
        batched = Hashable(function)
    try:
        check_rows(batched, params, first)
    except Exception as error:
        if function is None:
            data_lib.explain_inputs(error, first)
        raise
    layer_collection = layers_for(batched, params, first, layer_collection)
    if lazy:
        data = list(data_lib.iter_batches(data))
    return BatchedFunction(batched), data, layer_collection


@accepts_sharded_data
def Jacobian(
    apply_fn: Callable | None,
    params: Any,
    data: Any,
    representation: type = PFMapDense,
    *,
    function: Callable | None = None,
    batch_size: int | None = None,
    layer_collection: LayerCollection | None = None,
    mode: str = "auto",
) -> PFMapAbstract:
    """The per-example Jacobian of the raw outputs, ``J[o, n, i] = ∂f_o(x_n)/∂θ_i``.

    Shape ``(K, N, d)`` (NNGeometry's layout): ``K`` outputs per example (outputs
    ``(N, ..., C)`` are flattened to ``K = ∏… · C``, row-major), ``N`` examples, ``d``
    parameters in the flat order. Not scaled (no ``1/N``).

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``, batched (``y`` is not used).
      params: any pytree of arrays. Integer or boolean leaves (a step counter, a mask)
        are constants: their columns of ``J`` are zero.
      data: one batch or an iterable of batches.
      representation: :class:`PFMapDense` (default: stores ``J``, ``N K d``) or
        :class:`PFMapImplicit` (stores nothing; ``jvp``/``vjp`` on demand).
      function: instead of ``apply_fn``'s outputs, differentiate any batched
        ``function(params, batch) -> (N, K)`` (it receives whole batches, ``(x, y)``
        included, and must treat examples independently); ``apply_fn`` may then be None.
      batch_size: chunk size (peak memory ``batch_size · K · d`` while building).
      layer_collection: the parameter layout (per-layer views); discovered by default.
      mode: ``"reverse"``, ``"forward"`` or ``"auto"`` for the per-example Jacobians.

    Example:
      >>> J = Jacobian(model.apply, variables, (x, y))
      >>> J.jvp(v).to_dense().shape     # (K, N)
    """
    if representation not in (PFMapDense, PFMapImplicit):
        raise TypeError(
            f"representation must be PFMapDense or PFMapImplicit; got {representation!r}"
        )
    check_precision(Jacobian, params)  # its products and Grams sum in the parameters' dtype
    lazy = representation is PFMapImplicit
    fn, data, layer_collection = _setup(apply_fn, params, data, function, layer_collection,
                                        lazy)
    return representation.from_jacobians(fn, params, data, layer_collection=layer_collection,
                                         batch_size=batch_size, mode=mode)


GRAM_METHODS = ("jacobian", "implicit")


@accepts_sharded_data
def GramMatrix(
    apply_fn: Callable | None,
    params: Any,
    data: Any,
    representation: type = FMatDense,
    *,
    function: Callable | None = None,
    batch_size: int | None = None,
    method: str = "jacobian",
    layer_collection: LayerCollection | None = None,
    mode: str = "auto",
    centering: bool = False,
) -> FMatDense:
    """The empirical (finite-width) neural tangent kernel of ``apply_fn`` over ``data``.

    .. math::  G[o, n, o', n'] = \\sum_i J[o,n,i]\\, J[o',n',i] = \\langle \\nabla_\\theta
       f_o(x_n), \\nabla_\\theta f_{o'}(x_{n'}) \\rangle,

    multi-output, shape ``(K, N, K, N)``, **not** divided by ``N``. This is NNGeometry's
    ``GramMatrix`` and the empirical NTK of neural-tangents / the functorch recipe
    (``trace_axes=()``, full output blocks); neural-tangents' default
    (``trace_axes=(-1,)``) is the output trace ``Σ_o G[o, n, o, n']``.

    Args are those of :func:`Jacobian`, plus:
      representation: :class:`~jaxgeom.fspace.FMatDense`.
      method: how it is computed, both streamed over chunks of ``batch_size`` examples
        (``C`` chunks):

        - ``"jacobian"`` (default): layer by layer (:mod:`jaxgeom.gram`), over pairs of
          chunks ``i ≤ j``. A dense layer applied once per example contributes
          ``(A_i A_jᵀ) ∘ (Γ_i Γ_jᵀ)`` from its captured inputs ``A`` and output gradients
          ``Γ``, without its Jacobian columns (``N² a_l + (NK)² g_l`` instead of
          ``(NK)² a_l g_l``); every other parameter the product of its per-example
          gradients, ``(NK)² d_r`` (in forward mode, all of them). Each chunk's captures
          are computed once and kept when all of them fit in one chunk's Jacobian
          (``n_c K d``), else once per pair (``N K B (C+1)/2``); memory ``G`` plus about
          one chunk's Jacobian. Inside a ``jax.jit`` the pairs are one ``lax.scan``
          (:func:`jaxgeom.gram._scanned_pairs`): the program, its compile time and its
          scratch memory do not grow with ``C²``.
        - ``"implicit"``: only ``vjp``/``jvp``: per chunk, ``Jᵀ eₒₙ`` for its examples
          (one ``vjp`` per output and example, ``N K B`` in all), then ``J (Jᵀ eₒₙ)`` for
          every such column by a ``jvp`` over all data: ``N K`` jvps of ``≈ 2 N F`` each,
          ``2 (NK) N F`` in all. Memory O(``n_c K d``) for the columns of one chunk, no
          pair of Jacobians; cheaper than ``"jacobian"`` when its ``(NK)² d_r``
          products over the parameters outside dense layers dominate, ``K d_r > 2 F``
          (e.g. a large embedding table: many parameters, few operations). Inside a
          ``jax.jit`` the chunks (windows of real examples) are one ``lax.scan``.
      centering: the Gram matrix of the Jacobian centred over the examples (each output's
        ``J[o, n] − (1/N) Σₘ J[o, m]``): ``C G C`` with ``C = I − 11ᵀ/N`` on both example
        axes (NNGeometry's ``TorchHooksJacobianBackend(centering=True)``); one more pass
        over ``G``, in place.

    Example:
      >>> G = GramMatrix(model.apply, variables, x, batch_size=64)
      >>> alpha = G.solve(targets, regul=1e-3)       # kernel regression on (K, N) targets
    """
    if representation is not FMatDense:
        if not isinstance(representation, type):  # GramMatrix(f, params, x_test, x_train)
            raise TypeError(
                "GramMatrix's fourth argument is the representation (FMatDense); got a "
                f"{type(representation).__name__}. It takes one data set: for the kernel "
                "between two sets, K[o, m, o', n] = ⟨∇f_o(x_m), ∇f_o'(z_n)⟩ (test × train), "
                "call CrossGramMatrix(apply_fn, params, x, z), a (K, M, K, N) array")
        raise TypeError(f"representation must be FMatDense; got {representation!r}")
    if method not in GRAM_METHODS:
        raise ValueError(f"unknown Gram method {method!r}; valid methods: {GRAM_METHODS}")
    if not isinstance(centering, (bool, np.bool_)):
        raise TypeError(f"centering must be True or False; got {centering!r}")
    J = Jacobian(apply_fn, params, data, PFMapImplicit, function=function,
                 batch_size=batch_size, layer_collection=layer_collection, mode=mode)
    G = gram_implicit(J) if method == "implicit" else gram_by_layers(J)
    _check_finite_gram(G.data)
    return centred(G) if centering else G


@accepts_sharded_data(data=("data_left", "data_right"))
def CrossGramMatrix(
    apply_fn: Callable | None,
    params: Any,
    data_left: Any,
    data_right: Any,
    *,
    function: Callable | None = None,
    batch_size: int | None = None,
    method: str = "jacobian",
    layer_collection: LayerCollection | None = None,
    mode: str = "auto",
    centering: bool = False,
) -> jax.Array:
    """The empirical NTK between two data sets: ``M`` examples ``x`` (rows) and ``N``
    examples ``z`` (columns), e.g. test × train.

    .. math::  \\kappa[o, m, o', n] = \\sum_i J_x[o,m,i]\\, J_z[o',n,i] = \\langle \\nabla_\\theta
       f_o(x_m), \\nabla_\\theta f_{o'}(z_n) \\rangle,

    a ``jax.Array`` of shape ``(K, M, K, N)``, **not** divided by anything: the block
    ``G[:, :M, :, M:]`` of :func:`GramMatrix` over both sets concatenated, without its two
    square blocks. ``CrossGramMatrix(f, θ, x, x)`` is ``GramMatrix(f, θ, x).data``.
    Its matrix view is ``kernel.reshape(K·M, K·N)`` (row ``o·M + m``, column ``o'·N + n``,
    as ``FMatDense.to_matrix()``). NTK / GP prediction with the training Gram ``G`` and
    ``(K, N)`` targets ``y``: ``alpha = G.solve(y, regul)``, then the ``(K, M)`` mean
    ``jnp.einsum("ompn,pn->om", kernel, alpha)``.

    Why a function of its own rather than ``GramMatrix(..., other_data=)``: ``GramMatrix``
    returns an :class:`~jaxgeom.fspace.FMatDense`, square and symmetric, whose operations
    (``solve``, ``eigh``, ``logdet``, ``trace``) mean nothing for a rectangular kernel; a
    keyword changing the return type would make every caller check it. And why a plain
    array: what a cross kernel is used for is a contraction with ``(K, N)`` coefficients or
    its reshaped matrix, which an array does directly (and under ``jit``, ``vmap``, on a
    mesh) without a class that would add only ``mv``.

    Args are those of :func:`GramMatrix` (one model, two data sets), plus:
      data_left, data_right: each one batch or an iterable of batches (``y`` is not
        used unless ``function`` reads it); their examples must give the same number of
        outputs ``K``.
      method: ``"jacobian"`` (default): layer by layer (:mod:`jaxgeom.gram`), the block of
        every pair of a left and a right window of ``batch_size`` examples (``C_x C_z``
        blocks, none mirrored), each block ``Σ_l (A_x A_zᵀ) ∘ (Γ_x Γ_zᵀ)`` over dense layers
        plus ``R_x R_zᵀ`` over the other parameters' per-example gradients: products
        ``K² M N (Σ g_l + d_r) + M N Σ a_l``. Each set's captures are kept when they fit in
        one window's Jacobian (``n_c K d``); one side's windows are held in turn and the
        other's read against each: when one set's captures are kept, it is the one read
        (every window captured once), when neither is, the side with fewer windows is
        held and the other's recaptured for each. ``"implicit"``: only
        ``vjp``/``jvp``, per chunk of ``data_left`` the columns ``J_xᵀ eₒₘ`` (``M K``
        backward passes) then ``J_z (J_xᵀ eₒₘ)`` by a ``jvp`` over all of ``data_right``
        (``M K`` jvps of ``≈ 2 N F``, ``2 M K N F`` in all); pass the smaller set left.
        Memory for both: the ``K² M N`` result plus about one window's Jacobian.
      centering: each Jacobian centred over its own examples, ``J_x[o, m] − (1/M) Σ J_x[o,
        ·]`` and ``J_z[o, n] − (1/N) Σ J_z[o, ·]``: ``C_M K C_N`` (so that ``(x, x)`` gives
        ``GramMatrix(..., centering=True)``); one more pass over the kernel, in place.

    The layer collection is discovered on ``data_left`` (or given) and used for both.
    Raises ``FloatingPointError`` naming the examples of either set whose row or column of
    the kernel has no finite entry (checked when not traced: one more pass).

    Example:
      >>> G = GramMatrix(model.apply, variables, x_train, batch_size=64)
      >>> alpha = G.solve(y_train_targets, regul=1e-3)          # (K, N)
      >>> K_star = CrossGramMatrix(model.apply, variables, x_test, x_train, batch_size=64)
      >>> mean = jnp.einsum("ompn,pn->om", K_star, alpha)      # (K, M) predictions
    """
    if method not in GRAM_METHODS:
        raise ValueError(f"unknown Gram method {method!r}; valid methods: {GRAM_METHODS}")
    if not isinstance(centering, (bool, np.bool_)):
        raise TypeError(f"centering must be True or False; got {centering!r}")
    left = Jacobian(apply_fn, params, data_left, PFMapImplicit, function=function,
                    batch_size=batch_size, layer_collection=layer_collection, mode=mode)
    right = Jacobian(apply_fn, params, data_right, PFMapImplicit, function=function,
                     batch_size=batch_size, layer_collection=left.layer_collection, mode=mode)
    kernel = (cross_gram_implicit(left, right) if method == "implicit"
              else cross_gram_by_layers(left, right))
    _check_finite_cross(kernel)
    return centred_kernel(kernel) if centering else kernel


def _check_finite_gram(gram: jax.Array) -> None:
    """Raise ``FloatingPointError`` naming the examples whose entries of the
    ``(K, N, K, N)`` Gram's diagonal ``G[k, n, k, n] = ‖J[k, n]‖²`` are not finite (skipped while
    tracing)."""
    if isinstance(gram, jax.core.Tracer):
        return
    finite = np.asarray(_finite_examples(gram))
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise FloatingPointError(
            f"non-finite model outputs or gradients for the examples {bad[:10].tolist()}"
            f"{' …' if bad.size > 10 else ''}: check the inputs and the parameters (NaN/inf)")


def _check_finite_cross(kernel: jax.Array) -> None:
    """Raise ``FloatingPointError`` when the ``(K, M, K, N)`` cross kernel has non-finite
    entries, naming the examples of each set whose whole row (left) or column (right) is
    not finite: a non-finite example's gradients reach every entry of its row or column, a
    finite one's only where it meets a non-finite one (skipped while tracing)."""
    if isinstance(kernel, jax.core.Tracer):
        return
    k, _, _, n = kernel.shape
    rows, columns = (np.asarray(a) for a in _finite_counts(kernel))
    if (rows == k * k * n).all():
        return
    named = [f"{bad[:10].tolist()}{' …' if bad.size > 10 else ''} of {side}"
             for side, counts in (("data_left", rows), ("data_right", columns))
             for bad in [np.flatnonzero(counts == 0)] if bad.size]
    if not rows.any():  # every row non-finite, so every column: the sets can't be told apart
        where = ("for every example of data_left and of data_right (all of one set's being "
                 "non-finite hides the other's)")
    elif named:
        where = f"for the examples {' and '.join(named)}"
    else:
        where = "in some entries (no example's whole row or column)"
    raise FloatingPointError(
        f"non-finite model outputs or gradients {where}: check the inputs and the "
        "parameters (NaN/inf)")


@jax.jit
def _finite_counts(kernel: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The numbers of finite entries of the ``(K, M, K, N)`` kernel in each left example's
    row (``(M,)``, of ``K² N``) and each right example's column (``(N,)``, of ``K² M``), one
    row at a time: a temporary of one row. (As reductions over the kernel's axes, XLA:CPU
    stored the ``isfinite`` mask or its counts whole, from ⅛ to ½ of the kernel.)"""
    k, m, _, n = kernel.shape

    def row(i, counts):
        rows, columns = counts
        finite = jnp.isfinite(jax.lax.dynamic_slice_in_dim(kernel, i, 1, axis=1))
        return (rows.at[i].set(jnp.sum(finite, dtype=jnp.int32)),
                columns + jnp.sum(finite, axis=(0, 1, 2), dtype=jnp.int32))

    return jax.lax.fori_loop(0, m, row, (jnp.zeros(m, jnp.int32), jnp.zeros(n, jnp.int32)))


@jax.jit
def _finite_examples(gram: jax.Array) -> jax.Array:
    """Per example, whether its diagonal entries ``G[k,n,k,n]`` are finite (read as the
    diagonal of the ``(KN, KN)`` view: the einsum ``"knkn->kn"`` compiled to temporaries
    larger than ``G``)."""
    k, n = gram.shape[:2]
    diagonal = jnp.diagonal(gram.reshape(k * n, k * n)).reshape(k, n)
    return jnp.all(jnp.isfinite(diagonal), axis=0)
