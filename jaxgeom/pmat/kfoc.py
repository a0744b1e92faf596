"""``PMatKFOC``: the Frobenius-optimal Kronecker factors (Schnaus et al. 2021; Koroko et al.
2022; curvlinops' ``KFOCLinearOperator``).

For a Kronecker layer (:mod:`.kfac`) with per-example, per-output gradients
``Γₙₖ = Σ_t gₙₖₜ aₙₜᵀ`` (``g_l × a_l``, the bias as a constant-1 input), the exact layer
block is ``B = (1/N) Σₙₖ vec(Γₙₖ) vec(Γₙₖ)ᵀ``. KFAC replaces it by ``A ⊗ G`` from the
inputs' and output gradients' second moments, exact only when the examples' ``aaᵀ`` and
``ggᵀ`` are independent; KFOC takes the Kronecker product nearest to it,

.. math::  (A^\\star, G^\\star) = \\arg\\min_{A, G} \\|B - A \\otimes G\\|_F,

the top singular pair of ``B``'s Van Loan rearrangement ``R(B)`` (Van Loan & Pitsianis
1993), whatever the weight sharing (``T`` positions) — no "expand"/"reduce" choice. It is
found by alternating least squares, which is the power method on ``R(B)``: for fixed ``A``
the best ``G`` is ``R(B) A / ‖A‖²``, and

.. math::  G \\leftarrow \\frac{1}{N\\|A\\|_F^2} \\sum_{n,k} \\Gamma_{nk} A \\Gamma_{nk}^\\top,
   \\qquad A \\leftarrow \\frac{1}{N\\|G\\|_F^2} \\sum_{n,k} \\Gamma_{nk}^\\top G \\Gamma_{nk},

one pass over the data each, from KFAC's factors (the first pass). Each step keeps ``A``
and ``G`` positive semi-definite (sums of ``Γ X Γᵀ`` for a PSD ``X``), and never increases
the error ``‖B − A ⊗ G‖``; the pair converges at the rate of the ratio of ``R(B)``'s two
top singular values, so a few steps suffice from KFAC's start (``iterations``, default 4:
five passes in all). With ``T = 1`` (a dense layer on vectors) ``Γ = g aᵀ`` and the steps
are Grams of the captured rows with per-example weights, ``Σₙ (aₙᵀAaₙ) Σₖ gₙₖgₙₖᵀ`` and
``Σₙ (Σₖ gₙₖᵀGgₙₖ) aₙaₙᵀ``, at the cost of KFAC's factors; with ``T > 1`` each example's
``Γₙₖ`` is formed (``N K T g_l a_l``) and multiplied (``N K g_l a_l (g_l + a_l)``), one
example at a time.

The result is a :class:`~jaxgeom.pmat.kfac.PMatKFAC` in every other respect — the same
storage, operations, dampings and costs; the other layers' exact blocks — so an EKFAC of
its eigenbases is ``PMatEKFAC.from_kfac(F)``. An embedding keeps a diagonal ``A``: its
steps are restricted to diagonal input factors (the best diagonal for a fixed ``G`` is
the diagonal of the best ``A``), and converge to the best such pair
(:func:`_embedding_step_sum`). ``separate_weight_and_bias`` is not offered (the joint
weight–bias block).

References:
  D. Schnaus, J. Lee, R. Triebel, "Kronecker-Factored Optimal Curvature", NeurIPS 2021
  Bayesian Deep Learning workshop;
  A. Koroko et al., "Efficient Approximations of the Fisher Matrix in Neural Networks using
  Kronecker Product Singular Value Decomposition", arXiv:2201.10285, 2022;
  C. F. Van Loan, N. Pitsianis, "Approximation with Kronecker Products", 1993.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxgeom.capture import capture_chunk
from jaxgeom.pmat.base import representation, static_field
from jaxgeom.pmat.kfac import (
    DENSE_BLOCK_LIMIT,
    CaptureBuilder,
    KFACBuilder,
    PMatKFAC,
    all_finite,
    augmented_inputs,
    layer_grads,
)
from jaxgeom.streaming import Continue, builder, mean


@representation
class PMatKFOC(PMatKFAC):
    """The Frobenius-optimal Kronecker factors of each Kronecker layer's exact block, exact
    dense blocks for the other layers, zero between layers (module docstring: definition,
    the alternating passes, costs); a :class:`~jaxgeom.pmat.kfac.PMatKFAC` otherwise.

    Build with ``FIM(..., PMatKFOC)``, ``FIM_MonteCarlo`` or ``SecondMoment``; options:
    ``iterations`` (default 4: alternating steps after KFAC's pass, one pass each; 0 gives
    KFAC's factors), ``max_dense_block`` (as ``PMatKFAC``).

    Example:
      >>> F = FIM(model.apply, params, (x, y), PMatKFOC, iterations=6)
      >>> F.solve(grads, regul=1e-3)
    """

    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *, mode="auto", iterations=4,
                      max_dense_block=DENSE_BLOCK_LIMIT) -> KFOCBuilder:
        """KFAC's pass, then ``iterations`` alternating passes (:class:`KFOCBuilder`)."""
        if (isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral)
                or iterations < 0):
            raise ValueError(f"iterations must be an integer >= 0; got {iterations!r}")
        # through super(): the refusals of a layer name this class and suggest it
        kfac = super().chunk_builder(fn, params, example, aux, layout, mode=mode,
                                     max_dense_block=max_dense_block)
        return KFOCBuilder(kfac.plan, layout, iterations=int(iterations))


@builder
class KFOCBuilder(KFACBuilder):
    """KFAC's pass (the start and the exact blocks), then ``iterations`` passes of
    :class:`KroneckerStepBuilder`, ``G`` first."""

    iterations: int = static_field(default=4)

    finalizes_traced: ClassVar[bool] = False

    @property
    def passes(self) -> int:
        return 1 + self.iterations

    def finalize(self, total, stream):
        kfac = super().finalize(total, stream)

        def assemble(factors: tuple) -> PMatKFOC:
            # the bounds stay true: each step's factor is a sum over the rows of KFAC's
            nodes = tuple(dataclasses.replace(node, A=a, G=g)
                          for node, (a, g) in zip(kfac.factors, factors))
            return PMatKFOC(self.layout, self.plan.specs, nodes, kfac.blocks)

        factors = tuple((node.A, node.G) for node in kfac.factors)
        if self.iterations == 0:
            return assemble(factors)
        return Continue(KroneckerStepBuilder(self.plan, self.layout, factors=factors,
                                             remaining=self.iterations), assemble)


@builder
class KroneckerStepBuilder(CaptureBuilder):
    """One alternating step: per chunk and Kronecker layer ``Σₙₖ Γ A Γᵀ`` (``target="G"``)
    or ``Σₙₖ Γᵀ G Γ`` (``"A"``) for the other factor held (module docstring); ``finalize``
    divides their mean by that factor's squared Frobenius norm, and asks for the next
    step's pass while ``remaining > 1`` (a :class:`~jaxgeom.streaming.Continue` from each
    step's own ``finalize``, so that a ``PMatMixed`` part's restriction wraps every pass).
    Its result: the ``(A, G)`` pairs."""

    factors: tuple = ()
    target: str = static_field(default="G")  # the factor this pass updates
    # steps left, this one included: not static, so that every step of a target shares
    # one compiled step (read by ``finalize`` only, on the concrete builder)
    remaining: int = 1

    def statistics(self, params, batch, mask, offset, aux):
        cap = capture_chunk(self.plan, params, batch, offset, aux, mask)
        dtype = self.layout.dtype
        sums = tuple(
            _embedding_step_sum(a.reshape(a.shape[0], -1), mask, g, held, self.target,
                                spec.in_features)
            if spec.kind == "embedding" else
            _step_sum(augmented_inputs(spec, a, dtype) * mask[:, None, None].astype(dtype), g,
                      held, self.target)
            for spec, a, g, held in zip(self.plan.specs, cap.inputs, layer_grads(cap, dtype),
                                        self._held()))
        return sums, all_finite(cap, [s if s.ndim == 1 else jnp.diagonal(s) for s in sums])

    def _held(self) -> list[jax.Array]:
        return [a if self.target == "G" else g for a, g in self.factors]

    def finalize(self, total, stream) -> tuple:
        out = []
        for (a, g), held, s in zip(self.factors, self._held(), mean(total, stream.n)):
            norm = jnp.sum(held * held)
            new = jnp.where(norm > 0, s / jnp.where(norm > 0, norm, 1), 0)
            out.append((a, new) if self.target == "G" else (new, g))
        if self.remaining == 1:
            return tuple(out)
        return Continue(dataclasses.replace(self, factors=tuple(out), remaining=self.remaining - 1,
                                            target="A" if self.target == "G" else "G"),
                        lambda factors: factors)


def _embedding_step_sum(ids: jax.Array, mask: jax.Array, g: jax.Array, held: jax.Array,
                        target: str, vocabulary: int) -> jax.Array:
    """:func:`_step_sum` of an embedding, whose ``A`` stays diagonal (the alternating
    steps restricted to diagonal ``A``: the best diagonal is the diagonal of the best
    ``A``), from the row ids ``(n, T)`` (negative: none) and output gradients
    ``(n, K, T, g)``. With ``Γ = Σ_t g_t e_{id_t}ᵀ`` and ``Sₜₜ' = [id_t = id_t']``:
    ``Σ Γ diag(A) Γᵀ = Σ_k g_kᵀ (S ⊙ A_id) g_k`` and ``diag(Σ Γᵀ G Γ)_v =
    Σ_{t: id_t = v} Σ_t' Sₜₜ' Σ_k g_ktᵀ G g_kt'`` — ``T² g_l`` an example, no
    ``V``-sized array but the result."""
    valid = (ids >= 0) & (mask[:, None] > 0)
    same = (ids[:, :, None] == ids[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    if target == "G":
        weights = jnp.where(same, held[jnp.clip(ids, 0, vocabulary - 1)][:, :, None], 0)
        return jnp.einsum("nktg,ntu,nkuh->gh", g, weights.astype(g.dtype), g)
    pairs = jnp.einsum("nktg,gh,nkuh->ntu", g, held, g)
    rows = jnp.sum(jnp.where(same, pairs, 0), axis=2)  # (n, T): Σ_t' over equal ids
    return jnp.zeros(vocabulary, rows.dtype).at[jnp.where(valid, ids, vocabulary)].add(
        rows, mode="drop")


def _step_sum(a: jax.Array, g: jax.Array, held: jax.Array, target: str) -> jax.Array:
    """``Σₙₖ Γ A Γᵀ`` (``target="G"``, ``held = A``) or ``Σₙₖ Γᵀ G Γ`` (``"A"``, ``held =
    G``) for ``Γₙₖ = Σ_t gₙₖₜ aₙₜᵀ``, from inputs ``(n, T, a)`` and output gradients
    ``(n, K, T, g)``. ``T = 1``: weighted Grams of the rows; else one example's ``Γ`` at a
    time (``K g a`` memory)."""
    if g.shape[2] == 1:
        a1, g1 = a[:, 0], g[:, :, 0]
        if target == "G":
            weights = jnp.einsum("na,ab,nb->n", a1, held, a1)
            return jnp.einsum("nkg,n,nkh->gh", g1, weights, g1)
        weights = jnp.einsum("nkg,gh,nkh->n", g1, held, g1)
        return jnp.einsum("na,n,nb->ab", a1, weights, a1)

    def add(total, example):
        a_n, g_n = example
        gamma = jnp.einsum("ktg,ta->kga", g_n, a_n)
        if target == "G":
            return total + jnp.einsum("kga,ab,khb->gh", gamma, held, gamma), None
        return total + jnp.einsum("kga,gh,khb->ab", gamma, held, gamma), None

    size = g.shape[-1] if target == "G" else a.shape[-1]
    zero = jnp.zeros((size, size), jnp.result_type(a.dtype, g.dtype))
    return jax.lax.scan(add, zero, (a, g))[0]

