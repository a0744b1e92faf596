"""``PMatImplicit``: ``M = s · (1/N) Σₙ Jₙᵀ Jₙ`` kept as the function, params and data."""

from __future__ import annotations

import dataclasses
import functools
import operator
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import data as data_lib
from jaxgeom._compile import model_jit
from jaxgeom._differentiable import FloatLeaves, tangent_map
from jaxgeom.jacobian import (
    Hashable,
    accumulate,
    check_vector_outputs,
    chunk_outputs,
    forward_mode_ok,
    resolve_mode,
)
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat.base import (
    PMatAbstract,
    check_precision,
    representation,
    stack_of_rows,
    static_field,
)
from jaxgeom.replay import ReplayedFunction
from jaxgeom.restriction import RestrictedFunction, Restriction
from jaxgeom.streaming import (
    ChunkBuilder,
    Stream,
    builder,
    check_flags,
    scaled,
    scan_chunks,
    sum_chunks,
    zeros,
)
from jaxgeom.vector import as_flat, as_rows, product_dtype


def _scan_padded(step: Callable[[Any, data_lib.Chunk], Any], carry: Any, data: Any,
                 batch_size: int) -> tuple[Any, int]:
    """:func:`~jaxgeom.streaming.scan_chunks` with each chunk a :class:`~jaxgeom.data.Chunk`
    (:func:`_scanned_chunk`)."""
    first = (lambda *c: carry(_scanned_chunk(*c))) if callable(carry) else carry
    return scan_chunks(lambda c, *chunk: step(c, _scanned_chunk(*chunk)), first, data,
                       batch_size)


@representation
class PMatImplicit(ReplayedFunction, PMatAbstract):
    """The matrix ``M = s · (1/N) Σₙ Jₙᵀ Jₙ`` that is never formed.

    ``Jₙ`` is the ``(K, d)`` Jacobian of the per-example function
    ``fn(params, example, index, aux) -> (K,)`` (see :mod:`jaxgeom.jacobian`) at example
    ``n`` of ``data``, ``N`` the number of examples and ``s`` a scalar coefficient
    (``scale``, 1 when built; scalar multiplication changes only it). Every operation
    re-reads the data, chunk by chunk (``batch_size`` examples, the last chunk padded and
    masked), so the data are kept as a list of batches (``NEEDS_REPLAY``: the builders
    materialise a one-shot generator).

    Costs (``N`` examples, ``K`` outputs, ``F``/``B`` one forward/backward pass per example,
    ``C`` chunks):

    - ``mv``: one ``jax.jvp`` and one ``jax.vjp`` of the chunk's batched outputs,
      ``≈ N (2F + B)``, memory O(d) plus one chunk's activations; ``mmap`` vectorises the
      ``jvp``/``vjp`` over its rows; ``vTMv`` needs the ``jvp`` only. Per-example
      Jacobians are never formed.
    - ``solve``: conjugate gradient, one ``mv`` per iteration (``preconditioner``: any
      representation of the same matrix, e.g. a ``PMatDiag``/``PMatBlockDiag``, or a
      callable).
    - ``get_diag``/``trace``: per-example Jacobians streamed through a diagonal reduction,
      ``N K B``, memory ``batch_size · K · d``.
    - ``frobenius_norm``: ``‖M‖_F = |s|/N · (Σ_{chunks i,j} ‖J_i J_jᵀ‖²_F)^{1/2}`` over
      pairs of chunks, each block ``J_i J_jᵀ`` layer by layer as the Gram matrix's
      (:mod:`jaxgeom.gram`: a dense layer by ``(A_i A_jᵀ) ∘ (Γ_i Γ_jᵀ)`` of its captured
      inputs and output gradients, ``(NK)² g_l``; the other parameters by their rows,
      ``(NK)² d_r``); each chunk captured once when the captures fit in one chunk's
      Jacobian, else once per pair; no ``(NK)²`` matrix formed. Of more than 8 chunks
      whose captures are kept, the blocks of 8 groups of consecutive chunks (fewer,
      larger GEMMs; :func:`jaxgeom.gram.gram_norm_sq`).
    - ``to_dense``: streamed ``Σ JₙᵀJₙ`` (``N K B + N K d²``, memory ``d²``).

    Spectral functions (``eigh``, ``eigvalsh``, ``norm(2)``, ``pinv``, ``pow``, ``inv``)
    and ``+``/``-`` are not available: build a ``PMatDense`` (or ``PMatLowRank`` when
    ``N K < d``), or use ``solve(v, regul)``.

    Under ``jax.jit``, ``params``, ``data``, ``aux`` and ``scale`` are traced (pytree
    children); ``fn``, ``batch_size`` and ``mode`` are static. The products' chunk loop is
    one ``lax.scan`` there (:func:`~jaxgeom.streaming.scan_chunks`: the chunk's step traced
    once, memory bounded by ``batch_size`` however many chunks). Called eagerly on data of
    one batch, the products, ``get_diag`` and ``trace`` (:attr:`COMPILED_OPERATIONS`) run
    as one compiled call of that scan each (compiled as a model step: :attr:`RUNS_MODEL`;
    ``get_diag`` and ``trace`` raising on a non-finite chunk after the call), the other
    operations as a Python loop of compiled steps.

    Attributes:
      layer_collection: the parameter layout (static).
      fn: the per-example function (static, hashable).
      params: the parameters at which the Jacobians are taken (integer or boolean leaves
        are constants: zero rows and columns, as in the stored representations).
      data: the list of batches.
      aux: the arrays shared by all examples (``fn``'s last argument).
      scale: the scalar coefficient ``s``.
      batch_size: the chunk size (``None``: one chunk per batch; static).
      mode: ``"auto"``, ``"reverse"`` or ``"forward"`` for the per-example Jacobians of
        ``get_diag``/``trace``/``frobenius_norm``/``to_dense`` (static).
    """

    #: the operations replay the model: their eager calls compile as a model step's
    RUNS_MODEL: ClassVar[bool] = True
    #: compiled when called eagerly (on one batch: :meth:`_compiles_eager_calls`): the
    #: products, one call each whose chunks are the ``lax.scan`` of a ``jit``, two chunks
    #: at once (bench_mlp, 8 chunks: ``mv`` 16.3 → 13.0 ms, ``vTMv`` 8.6 → 6.3 ms, against a
    #: Python loop of compiled chunk steps, one at a time), ``_mv`` among them: an eager
    #: CG's products (its ``solve`` 360 → 291 ms); ``get_diag`` and ``trace`` too, a
    #: diagonal's build over the data, answering its chunks' finiteness flags
    #: (:attr:`CHECKED_OPERATIONS`: a non-finite chunk raises the eager loop's
    #: ``FloatingPointError`` after the call, naming it; bench_mlp's ``trace`` 18.7 →
    #: 15.2 ms, bench_small's 2.27 → 1.79 ms).
    #: ``solve`` too, its CG a ``lax.while_loop`` over that scan (a non-finite residual
    #: answers NaN, which the eager call raises on; a callable preconditioner keeps it a
    #: loop from Python): compiled in less time than the loop's own steps, and faster
    #: (bench_small 20.3 → 12.9 ms; bench_mlp, first call 2.11 → 1.94 s, then 1.29 →
    #: 1.15 s). Not ``frobenius_norm``, whose compiled program (up to 36 pairs
    #: of blocks unrolled) takes longer to compile than its loop of pair steps takes to run
    COMPILED_OPERATIONS: ClassVar[tuple[str, ...]] = ("mv", "_mv", "vTMv", "mmap", "mapTMmap",
                                                      "quadratic_forms", "get_diag", "trace",
                                                      "solve")
    CHECKED_OPERATIONS: ClassVar[dict[str, str]] = {"get_diag": "_diag_with_flags",
                                                    "trace": "_trace_with_flags"}

    # ------------------------------------------------------------------ shapes
    @property
    def dtype(self):
        return self.layer_collection.dtype

    def _compiles_eager_calls(self) -> bool:
        """Whether the eager products compile: on data of one batch (its chunks one scan).
        A list of batches (a loader's, kept) stays a loop of compiled chunk steps: a
        compiled call would hold one scan, or one step, per batch — a program, and a
        compile time, that grow with the number of batches."""
        return len(self.data) == 1

    # ------------------------------------------------------------------ products
    def _mv(self, v):
        return self._mmv(v)  # one row: no eager reshape to (1, d) and back

    def mmap(self, rows: Any) -> jax.Array:
        """``M`` applied to each row of ``(..., d)``: per chunk, one forward pass and one
        ``jvp`` and ``vjp`` per row (vectorised), never the per-example Jacobians."""
        return self._mmv(as_rows(rows, self.layer_collection))

    def _mmv(self, rows: jax.Array) -> jax.Array:
        """``s/N Σ_chunks J_cᵀ (J_c vᵢ)`` for the rows ``vᵢ`` of ``(..., d)`` (a vector
        ``(d,)`` is one row; the rows are flattened inside the compiled steps), each chunk's
        products added to the running sum inside its compiled step (in place, eagerly).

        The sum starts from zeros, not from the first chunk's products: every chunk then
        calls the same compiled step (one compilation, where a first step without a total
        compiled a second program of the same size: bench_small's first ``mv`` 0.3 s)."""
        dtype = product_dtype(rows.dtype, self.layer_collection.dtype)
        total = zeros(rows.shape, dtype)
        if self._scans_chunks(rows):
            total = self._scan(lambda t, chunk: self._chunk_mmv(rows, chunk, t), total)
        else:
            for chunk in self._chunks():
                total = self._chunk_mmv(rows, chunk, total)
        return _scaled_mean(total, self.scale, self.num_examples)

    def vTMv(self, v: Any) -> jax.Array:
        """``s/N Σₙ ‖Jₙ v‖²``: one ``jvp`` per chunk, no ``vjp``."""
        flat, _ = as_flat(v, self.layer_collection)
        return self._mean_over_chunks(lambda chunk: self._chunk_vTMv(flat, chunk), flat)

    def quadratic_forms(self, rows: Any) -> jax.Array:
        """``s/N Σₙ (Jₙ R)ᵀ(Jₙ R)`` for the rows of an ``(m, d)`` stack ``R``: one ``jvp``
        per row per chunk (vectorised, one forward pass), no ``vjp``."""
        rows = stack_of_rows(rows, self.layer_collection)
        forms = self._mean_over_chunks(lambda chunk: self._chunk_forms(rows, chunk), rows)
        return 0.5 * (forms + forms.T)  # symmetric to the last bit, as the generic one

    def _mean_over_chunks(self, part: Callable[[data_lib.Chunk], Any],
                          operand: jax.Array) -> Any:
        """``s/N Σ part(chunk)`` over the chunks: one scan inside a ``jit`` (where
        ``operand``, the vectors, is traced: :meth:`_scans_chunks`), else a loop of the
        chunks' compiled steps."""
        if self._scans_chunks(operand):
            total = self._scanned_sum(part)
        else:
            total = functools.reduce(operator.add, map(part, self._chunks()))
        return _scaled_mean(total, self.scale, self.num_examples)

    def _scan(self, step: Callable[[Any, data_lib.Chunk], Any], carry: Any) -> Any:
        """``carry`` through ``step(carry, chunk)`` over the chunks inside a ``jit``
        (:meth:`_chunk_scan`); ``carry`` may be a function of the first chunk."""
        return self._chunk_scan(step, carry, self.data, self.batch_size)[0]

    def _scanned_sum(self, part: Callable[[data_lib.Chunk], Any]) -> Any:
        """``Σ part(chunk)`` over :meth:`_scan`'s chunks."""
        return sum_chunks(part, self.data, self.batch_size, scan=self._chunk_scan)[0]

    #: how the chunks are scanned inside a ``jit``: padded and masked (a sum over examples
    #: of the masked outputs' products)
    _chunk_scan = staticmethod(_scan_padded)

    # the two per-chunk kernels (the hook of operators other than JᵀJ, e.g. the Hessian)
    def _chunk_mmv(self, rows: jax.Array, chunk: data_lib.Chunk,
                   total: jax.Array | None) -> jax.Array:
        """``total + Σ_{n∈chunk} Jₙᵀ Jₙ vᵢ`` for the rows ``vᵢ`` of ``(..., d)`` (``total``
        of their shape, donated: called eagerly, the sum is updated in place
        instead of a new ``(m, d)`` buffer per chunk, whose allocation and addition cost
        bench_mlp's 15-row products 0.67 s against 0.40 s under ``jit``)."""
        return _chunk_jtjv(total, self.params, rows, chunk.batch, chunk.mask, chunk.offset,
                           self.aux, fn=self.fn, layout=self.layer_collection)

    def _chunk_vTMv(self, v: jax.Array, chunk: data_lib.Chunk) -> jax.Array:
        """``Σ_{n∈chunk} ‖Jₙ v‖²``."""
        return _chunk_jv_sq(self.params, v, chunk.batch, chunk.mask, chunk.offset, self.aux,
                            fn=self.fn, layout=self.layer_collection)

    def _chunk_forms(self, rows: jax.Array, chunk: data_lib.Chunk) -> jax.Array:
        """``Σ_{n∈chunk} (Jₙ R)ᵀ(Jₙ R)`` for the rows of ``R`` (``(m, d)``)."""
        return _chunk_jv_gram(self.params, rows, chunk.batch, chunk.mask, chunk.offset,
                              self.aux, fn=self.fn, layout=self.layer_collection)

    # ------------------------------------------------------------------ streamed views
    def get_diag(self):
        """``s/N Σₙ diag(JₙᵀJₙ)``: ``PMatDiag``'s build streamed over the kept data — from
        the captured layer inputs and output gradients (``N K B``; dense layers
        ``(g²)ᵀ(a²)``, no per-example Jacobian formed)."""
        diag, flags = self._diag_with_flags()
        check_flags(flags)
        return diag

    def _diag_with_flags(self) -> tuple[jax.Array, list]:
        """:meth:`get_diag` and the finiteness flags of the chunks it read, unchecked: what
        its compiled eager call answers (:attr:`CHECKED_OPERATIONS`)."""
        from jaxgeom.pmat.diag import PMatDiag

        diag, flags = PMatDiag._from_jacobians_with_flags(
            self.fn, self.params, self.data, layer_collection=self.layer_collection,
            batch_size=self.batch_size, mode="auto", aux=self.aux)
        return self.scale * diag.data, flags

    def _trace_with_flags(self) -> tuple[jax.Array, list]:
        """:meth:`trace` and the finiteness flags of the chunks it read, unchecked."""
        diag, flags = self._diag_with_flags()
        return jnp.sum(diag), flags

    def to_dense(self):
        """``s/N Σₙ JₙᵀJₙ`` streamed through ``PMatDense``'s reduction (memory ``d²``)."""
        from jaxgeom.pmat.dense import PMatDense

        dense = self._accumulate(PMatDense.accumulator(self.layer_collection)).data
        return scaled(dense, jnp.asarray(self.scale, dense.dtype))

    def frobenius_norm(self):
        """``|s|/N (Σ_{i,j} ‖J_i J_jᵀ‖²_F)^{1/2}`` over chunk pairs, each block ``J_i J_jᵀ``
        layer by layer (:func:`jaxgeom.gram.gram_norm_sq`; class docstring: cost)."""
        from jaxgeom.gram import gram_norm_sq

        return jnp.abs(self.scale) * jnp.sqrt(gram_norm_sq(self)) / self.num_examples

    # ------------------------------------------------------------------ unsupported
    def eigvalsh(self):
        raise NotImplementedError(
            "PMatImplicit does not compute eigenvalues (nor norm(2)/norm(-2)): build a "
            "PMatDense (or a PMatLowRank when N·K < d), e.g. PMatDense.from_pmat(M), or "
            "estimate the extreme eigenvalues from products: "
            "jaxgeom.estimators.lanczos_eigenvalues(M, key, num_iterations) (with their "
            "eigenvectors: jaxgeom.estimators.lanczos_eigsh(M, key, k))"
        )

    def eigsh(self, k: int, which: str = "LA"):
        raise NotImplementedError(
            "PMatImplicit does not compute eigenpairs exactly (M.eigsh): estimate k of them "
            "from products by Lanczos, values, vectors = jaxgeom.estimators.lanczos_eigsh(M, "
            "key, k, which=...) — restarted in bounded memory by "
            "jaxgeom.estimators.restarted_lanczos_eigsh(M, key, k, which=..., ncv=...) — "
            "or by LOBPCG in blocks of products, "
            "jaxgeom.estimators.lobpcg_eigsh(M, key, k), or build a stored matrix "
            "(PMatDense.from_pmat(M), or the same data in PMatKFAC / PMatLowRank, …) whose "
            "eigsh is exact")

    eigsh.unsupported = True  # raises only: not listed among the representations that do

    def slogdet(self, regul: Any = 0.0):
        raise NotImplementedError(
            "PMatImplicit does not compute log-determinants (nor logdet): they need the "
            "whole spectrum. Build a stored matrix (PMatDense.from_pmat(M), or the same data "
            "in PMatLowRank when N·K < d, PMatKFAC, PMatEKFAC, PMatDiag, …), whose slogdet "
            "comes from its eigenvalues, or estimate logdet(M + regul·I) by stochastic Lanczos "
            "quadrature: nodes, weights = jaxgeom.estimators.lanczos_spectral_density(M, key, "
            "num_steps=k, num_probes=m); d * mean(sum(weights * log(nodes + regul), -1))")

    slogdet.unsupported = True  # raises only: not listed among the representations that do

    def __add__(self, other: Any) -> PMatAbstract:
        if not isinstance(other, PMatAbstract):
            return NotImplemented
        raise NotImplementedError(
            "PMatImplicit stores no entries, so it does not support + or -: add the "
            "products (M.mv(v) + A.mv(v)), or make it a stored matrix first: "
            "PMatDense.from_pmat(M) where d² entries fit, or build the same data in the "
            "representation you need (FIM(..., PMatLowRank) when N·K < d, PMatDiag, "
            "PMatKFAC, …), whose sums with the other operand are defined"
        )

    __sub__ = __add__

    # ------------------------------------------------------------------ algebra
    def _scale(self, s):
        return dataclasses.replace(self, scale=self.scale * s)

    def _restricted(self, r: Restriction) -> PMatImplicit:
        """``s/N Σₙ Jₙ,S ᵀ Jₙ,S``: the same data and coefficient replayed through the
        function of the layers' parameters alone (:class:`~jaxgeom.restriction.RestrictedFunction`,
        the others fixed at ``params``), whose Jacobian is the columns ``S`` of ``Jₙ``.
        Nothing is computed (``O(1)``); each product then differentiates the subset's
        leaves only."""
        return dataclasses.replace(self, layer_collection=r.layer_collection,
                                   fn=RestrictedFunction(self.fn, r),
                                   params=r.select(self.params), aux=(self.params, self.aux))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_jacobians(
        cls,
        fn: Callable,
        params: Any,
        data: Any,
        *,
        layer_collection: LayerCollection,
        batch_size: int | None = None,
        mode: str = "auto",
        aux: Any = None,
        **options,
    ) -> PMatImplicit:
        """Store ``fn``, ``params``, the batches of ``data`` (materialised) and ``aux``;
        nothing is computed beyond a shape check of ``fn`` (no pass over the data)."""
        check_precision(cls, params)  # its products sum over examples as the stored builds do
        batches = list(data_lib.iter_batches(data))
        example = data_lib.first_example(batches, batch_size)
        build = cls.chunk_builder(fn, params, example, aux, layer_collection, mode=mode,
                                  **options)
        n = sum(data_lib.num_examples(b) for b in batches)
        return build.finalize((), Stream(n, params, aux, batches, batch_size))

    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *, mode="auto",
                      **options) -> ImplicitBuilder:
        """The :class:`ImplicitBuilder` (in a ``PMatMixed``: the part keeps the data that
        the other parts stream)."""
        if options:
            raise TypeError(f"{cls.__name__} takes no build options; got {sorted(options)}")
        resolve_mode(mode, 1, 1)  # validates the name
        check_vector_outputs(fn, params, example, aux)
        try:
            hash(fn)
        except TypeError:
            fn = Hashable(fn)
        return ImplicitBuilder(cls, fn, layout, mode)

    # ------------------------------------------------------------------ helpers
    def _accumulate(self, accumulator: Any) -> Any:
        return accumulate(self.fn, self.params, self.data, accumulator,
                          batch_size=self.batch_size, mode=self.mode, aux=self.aux,
                          layout=self.layer_collection)


@builder
class ImplicitBuilder(ChunkBuilder):
    """Nothing to compute per chunk: ``finalize`` stores the function, the parameters,
    ``aux`` and the batches the driver kept (``keeps_data``)."""

    representation: type = static_field()
    fn: Callable = static_field()
    layout: LayerCollection = static_field()
    mode: str = static_field()

    keeps_data = True

    def statistics(self, params, batch, mask, offset, aux):
        return (), True

    def finalize(self, total, stream) -> PMatImplicit:
        scale = np.ones((), self.layout.dtype)  # a host scalar: no eager device call
        return self.representation(self.layout, self.fn, stream.params, list(stream.data),
                                   stream.aux, scale, stream.batch_size, self.mode)


# ----------------------------------------------------------------------------- kernels
@jax.jit
def _scanned_chunk(batch: Any, mask: jax.Array, offset: jax.Array) -> data_lib.Chunk:
    """A chunk of :func:`~jaxgeom.streaming.scan_chunks` (its count of examples traced
    in ``mask``, not known: ``None``)."""
    return data_lib.Chunk(batch, mask, offset, None)


def _scaled_mean(total: jax.Array, scale: jax.Array, n: int) -> jax.Array:
    """``scale · total / n`` in one compiled call after an eager chunk loop (whose running
    total keeps one chunk's products alive, not every chunk's)."""
    return scale * total / n


def _masked_outputs(fn, batch, mask, offset, aux) -> Callable:
    """``params ↦`` the chunk's ``(n, K)`` outputs, padded rows zeroed."""
    def outputs(params):
        out = chunk_outputs(fn, params, batch, offset, aux)
        return out * mask[:, None].astype(out.dtype)

    return outputs


def _jacobian_product(fn, params, batch, aux, outputs, floats: FloatLeaves) -> Callable:
    """``t ↦ J_c t`` for the chunk's ``outputs`` (a function of the floating leaves):
    ``jax.jvp``, or the transpose of the ``vjp`` for a model with a ``jax.custom_vjp``
    inside (:func:`~jaxgeom._differentiable.tangent_map`)."""
    example = data_lib.example_shapes(batch)
    return tangent_map(outputs, floats.primals, forward_mode_ok(fn, params, example, aux))


@model_jit(static_argnames=("fn", "layout"), donate_argnums=0)
def _chunk_jtjv(total, params, rows, batch, mask, offset, aux, *, fn, layout):
    """``total + J_cᵀ (J_c vᵢ)`` of one chunk for the rows ``vᵢ`` of ``(..., d)`` (``total``
    of their shape, donated): one ``jvp`` and one ``vjp`` per row
    (vectorised), sharing one forward pass (with respect to the floating leaves of
    ``params``; the others' entries are zero)."""
    floats = FloatLeaves.of(params)
    outputs = floats.bind(_masked_outputs(fn, batch, mask, offset, aux))
    flat = rows.reshape(-1, rows.shape[-1])
    product = _jacobian_product(fn, params, batch, aux, outputs, floats)
    jv = jax.vmap(lambda row: product(floats.tangents(row)))(flat)
    _, vjp = jax.vjp(outputs, floats.primals)
    jtjv = floats.ravel(jax.vmap(vjp)(jv)[0], flat.shape[:1]).reshape(rows.shape)
    return total + jtjv.astype(product_dtype(rows.dtype, jtjv.dtype))


@model_jit(static_argnames=("fn", "layout"))
def _chunk_jv_gram(params, rows, batch, mask, offset, aux, *, fn, layout):
    """``Σ_{n∈c} (Jₙ R)ᵀ(Jₙ R)`` of one chunk for the rows of ``R`` (one ``jvp`` per row,
    vectorised, sharing one forward pass)."""
    floats = FloatLeaves.of(params)
    outputs = floats.bind(_masked_outputs(fn, batch, mask, offset, aux))
    product = _jacobian_product(fn, params, batch, aux, outputs, floats)
    jv = jax.vmap(lambda row: product(floats.tangents(row)))(rows)
    jv = jv.reshape(jv.shape[0], -1).astype(jnp.result_type(jv, rows))
    return jv @ jv.T


@model_jit(static_argnames=("fn", "layout"))
def _chunk_jv_sq(params, v, batch, mask, offset, aux, *, fn, layout):
    """``Σ_{n∈c} ‖Jₙ v‖²`` of one chunk (one ``jvp``)."""
    floats = FloatLeaves.of(params)
    outputs = floats.bind(_masked_outputs(fn, batch, mask, offset, aux))
    jv = _jacobian_product(fn, params, batch, aux, outputs, floats)(floats.tangents(v))
    return jnp.sum(jv.astype(jnp.result_type(jv, v)) ** 2)  # in the vector's dtype, as mv
