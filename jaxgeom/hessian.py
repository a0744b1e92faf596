"""Hessians of a mean loss, in the parameter-space representations.

.. math::  H = \\nabla^2_\\theta \\frac1N \\sum_n \\ell_n(\\theta)
   = \\frac1N \\sum_b n_b\\, \\nabla^2_\\theta L_b(\\theta),

where ``loss_fn(params, batch) -> L_b`` is the **mean** loss over the ``n_b`` examples of
a batch (or chunk) ``b``: batches are weighted by their size, so the result is the
Hessian of the mean loss over all ``N`` examples seen, however the data are batched.
(NNGeometry sums the per-batch Hessians of a summed loss instead.) Chunks are never
padded (a padded mean loss would be biased): the last, smaller chunk of a batch costs one
more compilation.

Every product is a Hessian-vector product by forward-over-reverse differentiation
(``jax.linearize`` of ``jax.grad``: one linearisation per chunk, then one tangent
evaluation per vector, ``≈ F + 2B`` per example with ``F``/``B`` one forward/backward
pass). The stored representations apply it to basis vectors, ``vectors_per_pass`` at a
time (``jax.lax.map`` with ``vmap`` inside):

================  ===============================  ============================
representation    build cost (per example)          memory beyond the result
================  ===============================  ============================
``PMatDense``     ``d`` HVPs                        ``vectors_per_pass · d``
``PMatBlockDiag`` ``d`` HVPs (layer ``l``'s ``d_l``  ``vectors_per_pass · d``
                  basis vectors, kept on the block)
``PMatDiag``      ``d`` HVPs (exact diagonal; one   ``vectors_per_pass · d``
                  entry kept per HVP)
``PMatImplicit``  none (``mv``: one HVP per vector  O(d) + one chunk
                  over all data)
================  ===============================  ============================

No structured representation is cheaper to *build* than the dense one for a general
loss: the exact diagonal or layer blocks of a Hessian need one HVP per parameter
(stochastic estimators, e.g. Hutchinson's ``E[v ⊙ Hv]``, are cheaper but not exact).
They save memory (``d`` or ``Σ d_l²`` instead of ``d²``) and the cost of later operations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import data as data_lib
from jaxgeom._compile import model_jit
from jaxgeom._differentiable import FloatLeaves
from jaxgeom._memory import check_fits
from jaxgeom._serialization import register_dataclass
from jaxgeom._sharding import accepts_sharded_data
from jaxgeom.jacobian import Hashable
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat.base import PMatAbstract, check_precision
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.dense import PMatDense
from jaxgeom.pmat.diag import PMatDiag
from jaxgeom.pmat.implicit import PMatImplicit
from jaxgeom.streaming import check_finite, mean, scan_real_chunks, tree_finite
from jaxgeom.vector import product_dtype

#: how each stored representation keeps the columns ``H eᵢ`` (its ``_chunk_hessian`` kind)
_KINDS = {PMatDense: "dense", PMatBlockDiag: "blockdiag", PMatDiag: "diag"}


@accepts_sharded_data
def Hessian(
    loss_fn: Callable,
    params: Any,
    data: Any,
    representation: type[PMatAbstract],
    *,
    batch_size: int | None = None,
    layer_collection: LayerCollection | None = None,
    vectors_per_pass: int = 32,
) -> PMatAbstract:
    """The Hessian of the mean loss over ``data``, in ``representation``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``, the **mean** loss over the batch
        (e.g. ``optax.softmax_cross_entropy_with_integer_labels(apply_fn(p, x), y).mean()``);
        it receives whole batches as ``data`` yields them (``(x, y)``).
      params: any pytree of arrays. Integer or boolean leaves (a step counter, a mask)
        are constants: their rows and columns of ``H`` are zero.
      data: one batch or an iterable of batches (of any sizes).
      representation: ``PMatDense``, ``PMatBlockDiag``, ``PMatDiag`` or ``PMatImplicit``
        (costs in :mod:`jaxgeom.hessian`).
      batch_size: split batches into chunks of at most this many examples (memory of one
        chunk's linearisation); ``None``: one chunk per batch.
      layer_collection: the parameter layout (the blocks of ``PMatBlockDiag``); discovered
        from ``loss_fn`` by default.
      vectors_per_pass: basis vectors vectorised together by the stored representations.

    Returns:
      ``H = (1/N) Σ_b n_b ∇²L_b``. The Hessian may be indefinite: the default ``solve``
      and ``inv`` of ``PMatDense`` and ``PMatBlockDiag`` (Cholesky) fall back to an LU
      solve where ``H + regul·I`` is indefinite (decided on the device); CG (the implicit
      one) needs ``H + regul·I`` positive definite. Works inside ``jax.jit`` on a single
      batch.

    Example:
      >>> H = Hessian(lambda p, b: loss(apply_fn(p, b[0]), b[1]).mean(), params, (x, y),
      ...             PMatDense)
      >>> H.eigvalsh()[-1]       # the sharpness
    """
    first, data = data_lib.peek(data)
    n = data_lib.num_examples(first)
    out = jax.eval_shape(loss_fn, params, first)
    if getattr(out, "shape", None) != ():
        raise ValueError(
            f"loss_fn(params, batch) must return a scalar (the mean loss over the batch); got "
            f"{getattr(out, 'shape', out)} for a batch of {n} examples"
        )
    if (isinstance(vectors_per_pass, bool) or not isinstance(vectors_per_pass, (int, np.integer))
            or vectors_per_pass < 1):
        raise ValueError(f"vectors_per_pass must be a positive integer; got {vectors_per_pass!r}")
    from jaxgeom.metrics import layers_for

    layer_collection = layers_for(loss_fn, params, first, layer_collection, whole_batch=True)
    check_precision(representation, params)
    loss_fn = Hashable(loss_fn)
    if representation is PMatImplicit:
        return PMatImplicitHessian.build(loss_fn, params, data, layer_collection, batch_size)
    if representation not in _KINDS:
        raise TypeError(
            "Hessian representation must be one of PMatDense, PMatBlockDiag, PMatDiag, "
            f"PMatImplicit; got {representation!r}"
        )
    state = stream(loss_fn, params, data, batch_size, layer_collection,
                   _KINDS[representation], int(vectors_per_pass))
    return representation(layer_collection, state)


# ----------------------------------------------------------------------------- streaming
def real_chunks(data: Any, batch_size: int | None):
    """The chunks of ``data`` without their padding (``batch`` cut to ``count`` examples)."""
    for c in data_lib.iter_chunks(data, batch_size):
        if c.count == c.mask.shape[0]:  # a full chunk: nothing to cut (eager slices are slow)
            yield c
            continue
        batch = jax.tree_util.tree_map(lambda a, k=c.count: a[:k], c.batch)
        yield data_lib.Chunk(batch, c.mask[: c.count], c.offset, c.count)


@accepts_sharded_data  # the implicit Hessian's to_dense streams its stored data
def stream(loss_fn, params, data, batch_size, layout, kind, per_pass):
    """``(1/N) Σ_c n_c · state(H_c)`` with ``state`` the ``kind`` of columns kept; raises
    ``FloatingPointError`` naming the chunk's examples if one is not finite."""
    total, n, flags = _zeros(layout, kind), 0, []
    for c in real_chunks(data, batch_size):
        total, finite = _chunk_hessian(total, params, c.batch, c.count, loss_fn=loss_fn,
                                       layout=layout, kind=kind, per_pass=per_pass)
        flags.append((finite, c.offset, c.count))
        n += c.count
    for finite, offset, count in flags:  # read once every chunk is dispatched
        check_finite(finite, offset, count, what="loss Hessian",
                     hint="or the loss (e.g. a log of zero)")
    return mean(total, n)


def _hvp(loss_fn, params, batch, layout) -> Callable[[jax.Array], jax.Array]:
    """Flat ``(d,) ↦ H_b v`` for the batch's mean loss (forward-over-reverse, linearised
    once)."""
    floats = FloatLeaves.of(params)  # integer or boolean leaves: zero rows and columns
    loss = floats.bind(lambda p: loss_fn(p, batch))
    _, linear = jax.linearize(jax.grad(loss), floats.primals)

    def hv(v):
        out = floats.ravel(linear(floats.tangents(v)), v.shape[:-1])
        return out.astype(product_dtype(v.dtype, out.dtype))

    return hv


#: what to build instead of a Hessian whose storage cannot fit (:func:`check_fits`)
_SMALLER_HESSIANS = ("Build it as a PMatDiag (d) or a PMatImplicit (its products, no storage), "
                     "or of a few layers (layer_collection=, jaxgeom.restriction.restrict)")


def _zeros(layout: LayerCollection, kind: str) -> Any:
    """The running total of a ``kind`` of columns kept: zeros of its shapes, refused first
    when larger than the device's memory."""
    d, dtype = layout.numel(), layout.dtype
    if kind == "dense":
        check_fits("The dense Hessian", (d, d), dtype, _SMALLER_HESSIANS)
        return jnp.zeros((d, d), dtype)
    if kind == "diag":
        return jnp.zeros((d,), dtype)
    sizes = [layout.layer_numel(layer) for layer in layout.layers]
    check_fits("The block-diagonal Hessian", (sum(n * n for n in sizes),), dtype,
               _SMALLER_HESSIANS, arrays=len(sizes))
    return tuple(jnp.zeros((n, n), dtype) for n in sizes)


@model_jit(static_argnames=("loss_fn", "layout", "kind", "per_pass"), donate_argnums=0)
def _chunk_hessian(total, params, batch, weight, *, loss_fn, layout, kind, per_pass):
    """``total +`` ``weight ·`` the dense Hessian, its diagonal or its layer blocks, for one
    chunk, and whether they are finite: ``H eᵢ`` for each needed basis vector, ``per_pass``
    at a time, added to the donated ``total`` as rows (``H`` is symmetric) in place — no
    temporary besides ``per_pass`` columns."""
    hvp = _hvp(loss_fn, params, batch, layout)
    d = layout.numel()
    dtype = layout.dtype

    def column(i):
        return hvp(jax.nn.one_hot(i, d, dtype=dtype))

    if kind == "diag":
        diagonal = jax.lax.map(lambda i: column(i)[i], jnp.arange(d),
                               batch_size=min(per_pass, d))
        return total + weight * diagonal, tree_finite(diagonal)
    if kind == "dense":
        return _add_rows(total, np.arange(d), column, weight, per_pass)
    finite = jnp.ones((), bool)
    blocks = []
    for block, layer in zip(total, layout.layers):
        idx = layout.layer_indices(layer)
        block, ok = _add_rows(block, idx, lambda i, idx=idx: column(i)[idx], weight, per_pass)
        blocks.append(block)
        finite = finite & ok
    return tuple(blocks), finite


def _add_rows(total: jax.Array, indices: np.ndarray, row: Callable, weight: Any,
              per_pass: int) -> tuple[jax.Array, jax.Array]:
    """``total[k] += weight · row(indices[k])`` for every ``k``, ``per_pass`` rows at a
    time in place (the last pass shifted back to fit, its rows done already masked), and
    whether every row is finite."""
    m = len(indices)
    p = min(per_pass, m)
    indices = jnp.asarray(indices)

    def one_pass(b, carry):
        total, finite = carry
        start = jnp.minimum(b * p, m - p)
        rows = jax.vmap(row)(jax.lax.dynamic_slice_in_dim(indices, start, p))
        fresh = (start + jnp.arange(p) >= b * p)[:, None]
        old = jax.lax.dynamic_slice_in_dim(total, start, p)
        total = jax.lax.dynamic_update_slice_in_dim(
            total, old + jnp.where(fresh, weight * rows, 0), start, axis=0)
        return total, finite & tree_finite(rows)

    return jax.lax.fori_loop(0, -(-m // p), one_pass, (total, jnp.ones((), bool)))


# ----------------------------------------------------------------------------- implicit
@register_dataclass
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class PMatImplicitHessian(PMatImplicit):
    """The Hessian ``H = (1/N) Σ_b n_b ∇²L_b`` of a mean loss, never formed (a
    :class:`~jaxgeom.pmat.implicit.PMatImplicit` whose per-chunk products are
    Hessian-vector products). Built by ``Hessian(..., PMatImplicit)``.

    ``fn`` holds ``loss_fn(params, batch) -> scalar``; chunks are not padded. Costs:

    - ``mv``/``mmap``: one linearisation of ``∇L_c`` per chunk and one tangent evaluation
      per vector (forward-over-reverse), ``≈ N (F + 2B)`` per vector; memory O(d) plus
      one chunk's linearisation.
    - ``vTMv``: forward-over-forward (``d²/dt² L(θ + t v)``), no backward pass; for a loss
      with a ``jax.custom_vjp`` inside (no forward-over-forward), ``vᵀ(Hv)`` by one HVP.
    - ``solve``: CG, one ``mv`` per iteration. CG needs ``H + regul·I`` positive definite;
      the Hessian of a non-convex loss may be indefinite, in which case pick ``regul``
      above ``-λ_min`` or use a dense representation's ``eigh``/``lstsq`` solves.
    - ``get_diag``/``trace``: ``d`` HVPs per chunk (exact), memory ``d``;
      ``to_dense``/``frobenius_norm``: ``d`` HVPs per chunk, memory ``d²``.
    """

    #: inside a ``jit`` its chunks are unpadded (a mean loss of padded examples would count
    #: them): each batch's full chunks one ``lax.scan``, its remainder one step more
    _chunk_scan = staticmethod(scan_real_chunks)
    #: its products and ``solve`` compile when eager (inherited); its own ``get_diag`` and
    #: ``trace`` stream ``d`` HVPs a chunk from the host (:func:`stream`), which raises on a
    #: non-finite chunk: none of ``PMatImplicit``'s flagged Fisher diagonals
    CHECKED_OPERATIONS: ClassVar[dict[str, str]] = {}

    @classmethod
    def build(cls, loss_fn, params, data, layer_collection, batch_size) -> PMatImplicitHessian:
        batches = list(data_lib.iter_batches(data))
        data_lib.first_example(batches, batch_size)  # checks batch_size, non-empty data
        scale = np.ones((), layer_collection.dtype)
        return cls(layer_collection, loss_fn, params, batches, None, scale, batch_size)

    @classmethod
    def from_jacobians(cls, *args, **kwargs):
        raise TypeError("PMatImplicitHessian is built by Hessian(loss_fn, params, data, "
                        "PMatImplicit), not from Jacobians")

    def _chunks(self):
        return real_chunks(self.data, self.batch_size)

    def _restricted(self, r) -> PMatAbstract:
        """Not offered: the loss ``loss_fn(params, batch)`` has no argument through which
        the other layers' parameters could be held fixed."""
        ids = [layer.id for layer in r.layer_collection]
        raise NotImplementedError(
            "PMatImplicitHessian cannot be restricted to a layer subset: its loss "
            "loss_fn(params, batch) has no argument for the other layers' fixed parameters. "
            f"Build the Hessian of those layers: R = jaxgeom.restriction.restrict("
            f"H.layer_collection, {ids}); Hessian(lambda sub, batch: loss_fn(R.merge(params, "
            "sub), batch), R.select(params), data, PMatImplicit, "
            "layer_collection=R.layer_collection), or restrict a stored Hessian "
            f"(Hessian(..., PMatDense).restrict({ids}))")

    def _chunk_mmv(self, rows, chunk, total):
        return _chunk_hvps(total, self.params, rows, chunk.batch, chunk.count,
                           loss_fn=self.fn, layout=self.layer_collection)

    def _chunk_vTMv(self, v, chunk):
        if self.fn not in _REVERSE_ONLY:
            try:
                return _chunk_curvature(self.params, v, chunk.batch, chunk.count,
                                        loss_fn=self.fn, layout=self.layer_collection)
            except NotImplementedError:  # a custom_vjp in the loss: no forward-over-forward
                _REVERSE_ONLY.add(self.fn)
        hv = _chunk_hvps(None, self.params, v, chunk.batch, chunk.count,
                         loss_fn=self.fn, layout=self.layer_collection)
        return jnp.vdot(v, hv)

    def _chunk_forms(self, rows, chunk):
        hv = _chunk_hvps(None, self.params, rows, chunk.batch, chunk.count,
                         loss_fn=self.fn, layout=self.layer_collection)
        return rows @ hv.T

    def _stream(self, kind: str) -> Any:
        return stream(self.fn, self.params, self.data, self.batch_size, self.layer_collection,
                      kind, 32)

    def get_diag(self):
        """The exact diagonal: ``d`` HVPs per chunk."""
        return self.scale * self._stream("diag")

    def trace(self):
        """``Σ`` of :meth:`get_diag` (not ``PMatImplicit``'s compiled ``trace``, a Fisher
        diagonal's build)."""
        return jnp.sum(self.get_diag())

    def to_dense(self):
        """``d`` HVPs per chunk, memory ``d²``."""
        return self.scale * self._stream("dense")

    def frobenius_norm(self):
        return jnp.linalg.norm(self.to_dense())


@model_jit(static_argnames=("loss_fn", "layout"), donate_argnums=0)
def _chunk_hvps(total, params, rows, batch, weight, *, loss_fn, layout):
    """``total + weight · H_c vᵢ`` for the rows ``vᵢ`` of ``(..., d)`` (``total`` of their
    shape, donated: :meth:`PMatImplicit._chunk_mmv`; ``None`` for a ``vTMv`` of its own)."""
    flat = rows.reshape(-1, rows.shape[-1])
    hv = jax.vmap(_hvp(loss_fn, params, batch, layout))(flat).reshape(rows.shape)
    return _added(total, weight * hv)


def _added(total: jax.Array | None, x: jax.Array) -> jax.Array:
    """``total + x`` (``x`` for ``total = None``)."""
    return x if total is None else total + x


#: losses whose second derivatives need a reverse pass (a ``jax.custom_vjp`` inside: JAX
#: differentiates it in forward mode only once); their ``vTMv`` is ``vᵀ(Hv)``
_REVERSE_ONLY: set = set()


@model_jit(static_argnames=("loss_fn", "layout"))
def _chunk_curvature(params, v, batch, weight, *, loss_fn, layout):
    """``weight · vᵀ H_c v`` as the second directional derivative (forward-over-forward)."""
    floats = FloatLeaves.of(params)  # integer or boolean leaves: constants
    loss = floats.bind(lambda p: loss_fn(p, batch))
    tangent = floats.tangents(v)
    slope = lambda p: jax.jvp(loss, (p,), (tangent,))[1]  # noqa: E731
    return weight * jax.jvp(slope, (floats.primals,), (tangent,))[1]
