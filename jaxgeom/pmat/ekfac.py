"""``PMatEKFAC``: KFAC's eigenbasis with a refitted diagonal (George et al. 2018).

For a Kronecker layer (see :mod:`jaxgeom.pmat.kfac`) with factors ``A = Q_A Λ_A Q_Aᵀ``
and ``G = Q_G Λ_G Q_Gᵀ``, EKFAC keeps the Kronecker-factored eigenbasis ``Q_A ⊗ Q_G``
and replaces KFAC's eigenvalues ``λ_G ⊗ λ_A`` by a ``(g_l, a_l)`` array ``D``:

.. math::  M_l \\approx (Q_A \\otimes Q_G)\\, \\mathrm{diag}(D)\\, (Q_A \\otimes Q_G)^\\top,
   \\qquad D = \\frac1N \\sum_{n,k} \\big(Q_G^\\top\\, \\mathcal G_{nk}\\, Q_A\\big)^{\\odot 2},

``𝒢ₙₖ = Σ_t gₙₖₜ ãₙₜᵀ`` the ``(g_l, a_l)`` per-example, per-output gradient of the layer
matrix (bias as last input column). ``D`` is the exact diagonal of the exact layer block
in that basis, hence the Frobenius-closest matrix with these eigenvectors: EKFAC is never
further from the exact block than KFAC. Every other layer keeps its exact dense block, as
in KFAC (:class:`PMatEKFACBlockDiag`: with no size limit on those blocks).

Build (``FIM``, ``FIM_MonteCarlo``, ``SecondMoment`` with ``PMatEKFAC``): one pass for the
KFAC factors (``N K B + N Σ T_l (a_l² + K g_l²)``), ``eigh`` of each factor (``Σ a_l³ +
g_l³``; a factor of order ``n`` summed from few rows ``r``, e.g. a wide dense layer's ``A``
from ``N T = r ≤ n/4``, ``≈ 6 n² r`` through its range instead:
:func:`~jaxgeom.pmat.kfac.factor_rank_bounds`), then a second pass refitting ``D``: ``N Σ_l
T_l (a_l² + K g_l²)`` to rotate inputs and output gradients, plus ``N K Σ_l d_l`` through
``((Q_Gᵀg)²)ᵀ((Q_Aᵀa)²)`` when ``T_l = 1`` (no per-example gradient formed) or ``N K Σ_l T_l
d_l`` forming one chunk's rotated per-example gradients when ``T_l > 1`` (memory ``n_c K
max_l d_l``). With ``refit=False`` the diagonal is KFAC's ``λ_G ⊗ λ_A`` (one pass; then
EKFAC == KFAC). The second pass needs the eigenbases of the finished factors, so it cannot
share the first one; it reads the data again (:mod:`jaxgeom.streaming`: a one-shot iterator
is kept as a list of its batches while the first pass reads it — pass a list or a
re-iterable loader to avoid holding it; such a loader must yield the same examples at
each iteration: one that shuffles or augments gives the refit other examples than the
factors, so fix its seed or pass the batches as a list). In a ``PMatMixed``, the refits of
all EKFAC parts share that one second pass.

Refit (pure): :meth:`PMatEKFAC.refit` returns a *new* matrix with the same eigenbases and
``D`` (and the exact blocks of the other layers) re-estimated on new data and/or params;
``SecondMoment(fn, params, data, PMatEKFAC, basis=F)`` refits for any function.

Operations, all through the eigenbasis (never a ``d × d`` matrix but in ``to_dense``):
``mv``/``solve``/``inv``/``pinv``/``pow`` (any real ``p``, exact damping
``(M + λ)^p = (Q_A⊗Q_G)(D + λ)^p(Q_A⊗Q_G)ᵀ``) cost ``Σ d_l (a_l + g_l)`` (and return
EKFACs); ``trace``/Frobenius/``eigvalsh``/``norm(±2)`` ``Σ d_l``; ``get_diag``
``Σ d_l (a_l + g_l)``. A factor factorised through its range (above) is ``D``'s support:
the build's refit is 0 off the range columns of its basis, so the refit pass and every
product rotate by those ``r_l`` columns only (``a_l + g_l`` above becomes ``r_A + r_G``;
:class:`~jaxgeom.pmat.kfac.KronEigen`'s ``ranges``). A refit on new data returns the whole
bases (:meth:`~jaxgeom.pmat.kfac.PMatKFAC.without_rank_bounds`: the same matrix in that
form).

``mm`` with an EKFAC on the same bases (e.g. two powers of one matrix) multiplies the
diagonals; otherwise it is dense. ``M1 ± M2`` on the same bases is
an EKFAC; otherwise (bases differ) the exact layer blocks, a ``PMatBlockDiag`` (as for
KFAC: layers of at most 4096 parameters, else a ``ValueError``); with
another representation, a ``PMatDense``. "The same bases" is decided statically: the same
arrays (as for matrices derived from one another, also inside a ``jit`` trace) or equal
concrete values; two EKFACs entering ``jit`` as separate arguments have distinct tracers
and take the block-diagonal/dense route (same values, less compact).

A factor with a repeated eigenvalue has no one eigenbasis: within that eigenspace ``eigh``
returns any orthonormal basis, and which one moves with rounding (another chunking of the
same data, another machine). The refit ``D`` depends on that choice, so two builds may
differ there by more than rounding (a ConvTranspose's ``A`` with eigenvalues repeated
three times: 2% of the largest entry) while each is the EKFAC of its basis; traces, and
the K-FAC matrix itself, do not depend on it. A factor summed from fewer rows than its
order (``N T_l < a_l``: a wide dense layer's ``A`` from a small batch) has the eigenvalue 0
that many times over: the build's own refit is 0 there, but a :meth:`~PMatEKFAC.refit` on
other data puts weight on that null space's basis vectors, which are ``eigh``'s arbitrary
choice — a preconditioned direction then moves by more than rounding under a rounding-size
change of the parameters the basis was built at. Build the basis from at least ``a_l``
rows (examples × positions) where a refit on other data follows.

Reference: T. George, C. Laurent, X. Bouthillier, N. Ballas, P. Vincent, "Fast
Approximate Natural Gradient Descent in a Kronecker-factored Eigenbasis", NeurIPS 2018.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgeom._serialization import register_dataclass
from jaxgeom.capture import Captured, KroneckerSpec, capture_chunk
from jaxgeom.layers import Layer
from jaxgeom.pmat._gram import gram
from jaxgeom.pmat.base import representation, static_field
from jaxgeom.pmat.kfac import (
    DENSE_BLOCK_LIMIT,
    CaptureBuilder,
    KFACBuilder,
    KronEigen,
    PMatKFAC,
    all_finite,
    augmented_inputs,
    capture_plan,
    check_blocks,
    layer_grads,
    layer_positions,
    other_gradients,
    squared_gradient_sum,
)
from jaxgeom.streaming import Continue, builder, mean


@representation
class PMatEKFAC(PMatKFAC):
    """Eigenvalue-corrected KFAC: per Kronecker layer the eigenbases ``Q_A``, ``Q_G`` of the
    KFAC factors and a ``(g_l, a_l)`` diagonal ``D`` in the basis ``Q_A ⊗ Q_G``; exact dense
    blocks for the other layers; zero between layers (module docstring: definition, costs).

    A :class:`~jaxgeom.pmat.kfac.PMatKFAC` whose layers are all stored in eigenbasis form
    (:class:`~jaxgeom.pmat.kfac.KronEigen`), so the flat order, ``get_block`` and
    ``kronecker_block`` (NNGeometry's ``split_weight_bias``) are KFAC's.

    Build options: those of ``PMatKFAC`` (``kfac_approx``, ``separate_weight_and_bias``,
    ``max_dense_block``), plus
    ``refit`` (default ``True``: refit ``D`` in a second pass) and ``basis`` (an existing
    EKFAC whose eigenbases are kept: only the refit pass runs).

    Example:
      >>> F = FIM(model.apply, variables, (x, y), PMatEKFAC)
      >>> step = F.solve(grads, regul=1e-3)
      >>> F2 = F.refit(model.apply, new_variables, next_batch)   # same bases, new diagonal
    """

    #: its layers are already in eigenbasis form: solves and spectra are products and
    #: element-wise work, compiled with XLA's defaults
    FACTORISING_OPERATIONS: ClassVar[tuple[str, ...]] = ()

    def eigenbasis(self, layer: Layer | str) -> tuple[jax.Array | None, jax.Array, jax.Array]:
        """``(Q_A, Q_G, D)`` of a Kronecker layer: ``(a, a)`` (``None`` for an embedding,
        whose input factor is diagonal), ``(g, g)`` and the ``(g, a)`` diagonal."""
        node = self.factors[self._index(layer)]
        return node.qa, node.qg, node.d

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_kfac(cls, kfac: PMatKFAC) -> PMatEKFAC:
        """The EKFAC of a KFAC before any refit: ``D = λ_G ⊗ λ_A`` (the same matrix).

        The factors' ``eigh`` run side by side on a CPU's cores when that is faster
        (:func:`jaxgeom._lapack.side_by_side`: bench_mlp's EKFAC build 206 → 157 ms on 2
        cores)."""
        if not isinstance(kfac, PMatKFAC):
            raise TypeError(f"{cls.__name__}.from_kfac takes a PMatKFAC, not {type(kfac).__name__}:"
                            f" build FIM(..., PMatKFAC), or FIM(..., {cls.__name__}) directly")
        return cls._in_eigenbases(kfac)

    @classmethod
    def _in_eigenbases(cls, kfac: PMatKFAC, work_follows: bool = False) -> PMatEKFAC:
        """:meth:`from_kfac`, telling the factorisations whether ``work_follows``
        (:func:`jaxgeom._lapack.side_by_side`)."""
        nodes, _ = kfac._eigen(blocks=False, work_follows=work_follows)
        return cls(kfac.layer_collection, kfac.specs, nodes, kfac.blocks)

    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *, mode="auto",
                      kfac_approx="expand", separate_weight_and_bias=False,
                      max_dense_block=None, refit=True, basis: PMatEKFAC | None = None):
        """KFAC factors, their eigendecompositions, then (``refit``) the diagonal refit in a
        second pass (:class:`EKFACBuilder`, then :class:`RefitBuilder`).

        With ``basis`` (an EKFAC for the same parameter layout) only the refit pass runs,
        on ``basis``'s eigenbases. ``max_dense_block`` defaults to KFAC's 4096 (no limit
        for :class:`PMatEKFACBlockDiag`).
        """
        limit = cls._default_block_limit() if max_dense_block is None else max_dense_block
        if basis is None:
            kfac = super().chunk_builder(fn, params, example, aux, layout, mode=mode,
                                         kfac_approx=kfac_approx,
                                         separate_weight_and_bias=separate_weight_and_bias,
                                         max_dense_block=limit)
            return EKFACBuilder(kfac.plan, layout, approx=kfac.approx, separate=kfac.separate,
                                representation=cls, refit=bool(refit))
        if not isinstance(basis, PMatEKFAC) or basis.layer_collection != layout:
            raise ValueError("basis must be a PMatEKFAC for the same parameter layout")

        def check(plan):
            check_blocks(plan, layout, limit, cls.__name__)
            if plan.specs != basis.specs:
                raise ValueError(
                    "the function does not factor the same layers as the basis: "
                    f"{[s.layer_id for s in plan.specs]} vs {[s.layer_id for s in basis.specs]}"
                )

        return RefitBuilder.on(capture_plan(fn, params, example, aux, layout, check), layout,
                               cls, basis.factors)

    @classmethod
    def _default_block_limit(cls) -> float:
        return DENSE_BLOCK_LIMIT

    def refit(self, apply_fn: Callable, params: Any, data: Any, *, key: jax.Array | None = None,
              **kwargs: Any) -> PMatEKFAC:
        """A new EKFAC with these eigenbases and the diagonal refitted on ``data`` at
        ``params`` (both may be new): the exact Fisher, or the Monte-Carlo one when ``key``
        is given. ``kwargs`` go to :func:`jaxgeom.FIM` / :func:`jaxgeom.FIM_MonteCarlo`
        (``variant``, ``trials``, ``batch_size``, …). For any other per-example function use
        ``SecondMoment(fn, params, data, PMatEKFAC, basis=self)``. The exact blocks of the
        non-Kronecker layers are re-estimated in the same pass. Cost: the refit pass of the
        module docstring (one pass, no ``eigh``)."""
        from jaxgeom.metrics import FIM, FIM_MonteCarlo

        if "layer_collection" not in kwargs:
            self._check_refit_params(params)
            kwargs["layer_collection"] = self.layer_collection
        if key is None:
            return FIM(apply_fn, params, data, type(self), basis=self, **kwargs)
        return FIM_MonteCarlo(apply_fn, params, data, type(self), key=key, basis=self, **kwargs)

    def _check_refit_params(self, params: Any) -> None:
        """Refuse params of another layout than the EKFAC's by name (a refit keeps its
        layer collection): for a restricted EKFAC, the restricted function and params."""
        try:
            self.layer_collection.check_params(params)
        except ValueError as error:
            restricted = self.layer_collection.origin is not None
            raise ValueError(
                "refit needs params of this EKFAC's own layout "
                f"({self.layer_collection.numel()} parameters in leaves of shapes "
                f"{list(self.layer_collection.shapes)})" + (
                    "; it is a restriction: refit it on the restricted function and params, "
                    "R = jaxgeom.restriction.restrict(full_layer_collection, ids); "
                    "E.refit(R.apply_fn(apply_fn, params), R.select(params), data), or "
                    "refit the whole EKFAC and restrict the result" if restricted else
                    ": pass the params it was built at, or new values of the same shapes")
            ) from error


@representation
class PMatEKFACBlockDiag(PMatEKFAC):
    """EKFAC for the Kronecker layers (dense, conv, embedding) and the exact
    ``PMatBlockDiag`` block for every other layer, whatever its size (NNGeometry's
    ``PMatEKFACBlockDiag``, for models with BatchNorm/LayerNorm and other layers).

    The same matrix as :class:`PMatEKFAC` — which already keeps exact blocks for the other
    layers — without its ``max_dense_block`` guard (pass ``max_dense_block`` to set one).
    For another representation of the non-Kronecker layers use
    :class:`~jaxgeom.pmat.mixed.PMatMixed`.
    """

    @classmethod
    def _default_block_limit(cls) -> float:
        return math.inf


@builder
class EKFACBuilder(KFACBuilder):
    """The first pass: KFAC's statistics, finalized as KFAC's (the mean factors, traced);
    :meth:`finish` takes their eigenbases (``from_kfac``) and, with ``refit``, asks for a
    second pass through a :class:`RefitBuilder` on them
    (:class:`~jaxgeom.streaming.Continue`)."""

    representation: type = static_field(default=None)
    refit: bool = static_field(default=True)

    @property
    def passes(self) -> int:
        return 2 if self.refit else 1

    def finish(self, kfac, stream):
        # the eigendecompositions: compiled apart, with their own options (side by side)
        # the factors just summed: their bounds are promises (the ranges kept for products)
        basis = self.representation._in_eigenbases(dataclasses.replace(kfac, factors=tuple(
            dataclasses.replace(node, bounds_checked=False) for node in kfac.factors)),
            work_follows=self.refit)
        if not self.refit:
            return basis
        # A layer's per-example gradients lie in its factors' ranges when the factors were
        # summed from the same rows: always with "expand"; with "reduce" only at T = 1 (the
        # factors are Grams of the inputs' means and the output gradients' sums over the
        # positions, whose span is smaller than that of the positions' own rows).
        in_ranges = tuple(self.approx == "expand" or t == 1 for t in layer_positions(self.plan))
        return Continue(RefitBuilder.on(self.plan, self.layout, self.representation,
                                        basis.factors, on_ranges=in_ranges),
                        lambda refitted: refitted)


@builder
class RefitBuilder(CaptureBuilder):
    """The refit pass: per chunk ``Σₙₖ (Q_Gᵀ 𝒢ₙₖ Q_A)²`` per Kronecker layer in the bases
    of ``factors`` (:class:`~jaxgeom.pmat.kfac.KronEigen`, arrays passed to the step) and
    ``Σ JᵀJ`` per other layer; their means are ``D`` and the exact blocks.

    ``input_rotations`` are the bases ``Q_A`` in the form the inputs are rotated with
    (:func:`_input_rotation`), made once by :meth:`on` rather than in every chunk's step.

    ``on_ranges`` (:meth:`on`): the data are those the factors were summed from (EKFAC's
    own build), so the inputs and output gradients lie in the factors' ranges
    (:attr:`~jaxgeom.pmat.kfac.KronEigen.ranges`) and ``D`` is 0 off them: ``factors`` are
    then :class:`_RangeBases`, only the range columns are rotated and refitted (bench_cnn's
    4097-input read-out: 160 of 4097), and the refitted blocks keep the ranges. Otherwise
    (new data or params) ``D`` is refitted on the whole bases, which the result keeps.
    """

    representation: type = static_field(default=None)
    factors: tuple = ()
    input_rotations: tuple = ()

    #: the mean diagonals and blocks (:meth:`finish` puts them on the bases)
    finalizes_traced: ClassVar[bool] = True

    @classmethod
    def on(cls, plan, layout, representation, factors,
           on_ranges: bool | Sequence[bool] = False) -> RefitBuilder:
        """The refit pass of ``plan``'s layers on the eigenbases ``factors`` (``on_ranges``,
        for all layers or per layer: on their range columns, see the class docstring)."""
        if isinstance(on_ranges, bool):
            on_ranges = (on_ranges,) * len(factors)
        columns, rotations = _refit_bases(plan.specs, tuple(factors), tuple(on_ranges))
        bases = tuple(n if c is None else _RangeBases(*c, n) for n, c in zip(factors, columns))
        return cls(plan, layout, representation, bases, rotations)

    def statistics(self, params, batch, mask, offset, aux):
        cap: Captured = capture_chunk(self.plan, params, batch, offset, aux, mask)
        dtype = self.layout.dtype
        diags = []
        for i, (spec, source, g, node, rotation) in enumerate(zip(
                self.plan.specs, cap.sources, layer_grads(cap, dtype), self.factors,
                self.input_rotations)):
            rotated = functools.partial(_rotated_source, spec, self.plan.inputs_from(i),
                                        rotation, dtype)
            diags.append(squared_gradient_sum(source, g @ node.qg, rotated))
        blocks = tuple(gram(b) for b in other_gradients(cap, self.plan, self.layout))
        return (tuple(diags), blocks), all_finite(cap, (diags, [b.diagonal() for b in blocks]))

    def finalize(self, total, stream):
        """The refitted diagonals, whole (:meth:`_RangeBases.values`), and the blocks."""
        diags, blocks = mean(total, stream.n)
        if any(isinstance(b, _RangeBases) for b in self.factors):
            diags = _whole_values(self.factors, diags)
        return diags, blocks

    def finish(self, result, stream):
        """The matrix on the bases as given: the same arrays, not a compiled call's copies
        (a sum of two refits recognises one basis by them)."""
        diags, blocks = result
        nodes = tuple(n.with_values(d) for n, d in zip(self.factors, diags))
        return self.representation(self.layout, self.plan.specs, nodes, blocks)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class _RangeBases:
    """A :class:`~jaxgeom.pmat.kfac.KronEigen`'s range columns ``qa``, ``qg`` (as the refit
    reads a node's bases), and the node itself to rebuild with the refitted block."""

    qa: jax.Array | None
    qg: jax.Array
    node: KronEigen

    def values(self, d_r: jax.Array) -> jax.Array:
        """The node's whole ``d``: ``d_r`` on its ranges, 0 off them."""
        if self.node.ranges == (None, None):
            return d_r
        return jnp.zeros_like(self.node.d).at[-d_r.shape[0]:, -d_r.shape[1]:].set(d_r)

    def with_values(self, d: jax.Array) -> KronEigen:
        """The node with the whole ``d`` of :meth:`values`."""
        node = self.node
        if node.ranges == (None, None):
            return node.with_values(d)
        return dataclasses.replace(node, d=d, zero_off_range=True)


def _values(base: KronEigen | _RangeBases, d: jax.Array) -> jax.Array:
    """A refitted node's whole ``d`` from the refit's (on the ranges of :class:`_RangeBases`)."""
    return base.values(d) if isinstance(base, _RangeBases) else d


@jax.jit
def _whole_values(factors: tuple, diags: tuple) -> tuple[jax.Array, ...]:
    """:func:`_values` of every refitted node in one compiled call (eagerly, the diagonals
    written back into their whole shapes were five programs to compile at a first streamed
    build, 0.1 s on bench_mlp); inlined in a pass over one chunk."""
    return tuple(_values(b, d) for b, d in zip(factors, diags))


def _bases_of_refit(specs: tuple[KroneckerSpec, ...], factors: tuple, on_ranges: tuple[bool, ...]
                    ) -> tuple[tuple, tuple]:
    """The range columns ``(Q_{A,r}, Q_{G,r})`` of the layers refitted ``on_ranges``
    (``None`` for the others), and every layer's :func:`_input_rotation` of the ``Q_A`` it
    is refitted on."""
    columns = tuple(n._on_ranges()[:2] if r else None for n, r in zip(factors, on_ranges))
    rotations = tuple(_input_rotation(spec, n.qa if c is None else c[0])
                      for spec, n, c in zip(specs, factors, columns))
    return columns, rotations


#: :func:`_bases_of_refit` in one compiled call: eagerly, the slices' dispatches took 1.4 ms
#: of bench_small's 8 ms Monte-Carlo EKFAC build, and each slice of a new shape was a
#: program to compile at a first build (bench_mlp: two, 40–65 ms apiece)
_refit_bases = jax.jit(_bases_of_refit, static_argnums=(0, 2))


def _input_rotation(spec: KroneckerSpec, qa: jax.Array | None) -> Any:
    """``Q_A`` as :func:`_rotated_inputs` applies it: ``(Q_A[:-1], Q_A[-1])`` where the
    inputs are augmented with a 1 (a layer with a bias), else ``Q_A`` (or ``None``).

    Split once per pass: sliced inside a chunk's step, XLA:CPU copies ``Q_A[:-1]`` at every
    chunk (its fused products cannot read a slice): ``a²`` floats, 0.3–0.6 ms a chunk for
    a 785² basis.
    """
    if qa is None or spec.kind == "embedding" or spec.bias is None:
        return qa
    return qa[:-1], qa[-1]


def _rotated_source(spec: KroneckerSpec, inputs_of: Callable, rotation: Any, dtype,
                    source: jax.Array) -> jax.Array:
    """One example's :func:`_rotated_inputs` from its captured source
    (:attr:`~jaxgeom.capture.Captured.sources`: with ``T > 1``, a convolution's patches are
    formed and rotated one example at a time)."""
    return _rotated_inputs(spec, inputs_of(source), rotation, dtype)


def _rotated_inputs(spec: KroneckerSpec, a: jax.Array, rotation: Any, dtype) -> jax.Array:
    """The augmented inputs ``[a, 1]`` in the eigenbasis ``Q_A`` (``[a, 1] Q_A``, or as they
    are without one), without forming ``[a, 1]``: ``a Q_A[:-1] + Q_A[-1]`` from the split
    ``rotation`` of :func:`_input_rotation`."""
    if isinstance(rotation, tuple):
        rows, last = rotation
        return a.astype(dtype) @ rows + last
    augmented = augmented_inputs(spec, a, dtype)
    return augmented if rotation is None else augmented @ rotation
