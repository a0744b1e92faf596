"""Eigenvalues of batches of arrow blocks (plus a rank one), by bisection on an inertia count.

The quasi-diagonal matrix's neuron blocks (:mod:`.quasidiag`) are

.. math::  M = \\begin{pmatrix} \\mathrm{diag}(D) + \\rho\\, c c^\\top & c \\\\
   c^\\top & \\beta \\end{pmatrix}, \\qquad D, c \\in \\mathbb{R}^a,

an *arrow* when ``ρ = 0`` (as built) and an arrow ``A`` plus the rank one ``ρ ĉĉᵀ``
(``ĉ = (c, 0)``) for an inverse. Their ``a + 1`` eigenvalues need neither the
``(a+1)²`` block nor its ``O(a³)`` ``eigh``: the number of eigenvalues below ``λ``
follows from ``O(a)`` sums (Sylvester's law of inertia), and bisection on that count
finds each eigenvalue in a bracket that contains it.

*The count.* With ``Δ = diag(D − λ)``, ``b = β − λ`` and ``κ = Σᵢ cᵢ² / (Dᵢ − λ)``, the
Schur complement of ``Δ`` in an arrow ``A − λI`` is ``b − κ``, so

.. math:: n_A(λ) = \\#\\{i : D_i < λ\\} + [\\, b - κ < 0 \\,].

For ``ρ ≠ 0``, ``M − λI`` is the Schur complement of ``−1/ρ`` in the bordered matrix
``[[−1/ρ, cᵀ, 0], [c, Δ, c], [0, cᵀ, b]]``; eliminating ``Δ`` from that leaves the
``2 × 2`` matrix ``[[−1/ρ − κ, −κ], [−κ, b − κ]]``, which scaled by ``√|ρ|`` on its
first row and column has the diagonal ``p = −sgn ρ − |ρ|κ``, ``b − κ`` and the determinant
``δ = −sgn ρ · (b − κ + ρκb)``. So ``n_M(λ) = #{Dᵢ < λ} + ν − [ρ ≥ 0]`` (the last term
counts ``−1/ρ < 0``; ``ρ = 0`` taken as ``+0`` gives the arrow's count again), with ``ν``
the number of negative eigenvalues of that ``2 × 2``: ``1`` when ``δ < 0``,
``2·[p < 0]`` when ``δ > 0``, ``[p + b − κ < 0]`` when ``δ = 0``. At a pole ``λ = Dᵢ`` with
``cᵢ ≠ 0`` the sum ``κ`` is ``+∞`` (``Dᵢ − λ = +0``), which gives the count just below
the pole, the right one there; poles with ``cᵢ = 0`` are left out of ``κ``.

*The brackets.* Cauchy's interlacing of ``A`` with its leading block ``diag(D)`` puts the
``k``-th eigenvalue of an arrow between the sorted ``D₍ₖ₎`` and ``D₍ₖ₊₁₎``
(``λ₀ ≥ min(D₍₁₎, β) − ‖c‖``, ``λₐ ≤ max(D₍ₐ₎, β) + ‖c‖`` by Weyl's inequality). A rank
one ``ρ ĉĉᵀ`` moves each eigenvalue of ``A`` at most to the next one, up for ``ρ > 0`` and
down for ``ρ < 0`` (``|ρ| ‖c‖²`` past the last one): the arrow's eigenvalues, found
first, bracket those of ``M``.

*The splits.* A bracket is split at ``0`` when it straddles it, then geometrically while
its ends are more than a factor 2 apart (so that an eigenvalue near the small end of a
bracket over many binades — a Fisher's graded diagonal — is found relative to itself,
not to the bracket's width), then in halves: ``s = nmant + 3 + ⌈log₂(exponent range)⌉``
splits in all (34 in float32, 67 in float64).

*Accuracy.* The count is exact up to the rounding of ``b − κ``. Where that sum does not
cancel, each eigenvalue comes out within a few ulps of itself; where it does (an
eigenvalue far below ``‖M‖`` beside a large pole), within about ``ε ‖M‖``, ``eigh``'s
bound (a graded block's ``eigh`` is often that far off where this is exact). Each block is
first scaled by a power of two to a largest entry in ``[1, 2)`` (exact), so that no square or
bracket overflows for entries up to the largest float.

Cost per layer of ``g`` blocks: ``s · g (a + 1) a`` divisions (twice for
``ρ ≠ 0``) and ``O(g a)`` memory; the ``(a+1)²`` blocks are never formed (``eigh`` of
them: ``g (a + 1)³`` and ``g (a + 1)²`` memory). Each sum over the poles is one fused
reduction (a ``where`` inside it made XLA:CPU write the ``(g, a + 1, a)`` terms out).
Derivatives: the tangents of the eigenvalues are ``vₖᵀ dM vₖ`` with the blocks' ``eigh``
vectors (formed only when differentiated).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxgeom._sorting import sort


@jax.custom_jvp
def arrow_eigvalsh(D: jax.Array, beta: jax.Array, c: jax.Array,
                   rho: jax.Array | None = None) -> jax.Array:
    """The eigenvalues of ``g`` blocks ``[[diag(D) + ρccᵀ, c], [cᵀ, β]]``, ascending per
    block.

    Args:
      D: ``(g, a)``; beta: ``(g,)``; c: ``(g, a)``; rho: ``(g,)`` or ``None`` (``ρ = 0``).

    Returns:
      ``(g, a + 1)``, each row ascending (accuracy: module docstring); NaN for a block
      with a non-finite entry. No block formed.
    """
    e = _overflow_exponent(D, beta, c)
    D, beta, c = jnp.ldexp(D, -e[:, None]), jnp.ldexp(beta, -e), jnp.ldexp(c, -e[:, None])
    poles = sort(D)  # each row
    arrow = _bisect(_arrow_brackets(poles, beta, c), poles, D, beta, c, None)
    if rho is not None:  # ρccᵀ/s = (ρs)(c/s)(c/s)ᵀ
        rho = jnp.ldexp(rho, e)
        arrow = _bisect(_rank_one_brackets(arrow, c, rho), poles, D, beta, c, rho)
    return jnp.ldexp(arrow, e[:, None])


@arrow_eigvalsh.defjvp
def _eigvalsh_jvp(primals, tangents):
    """``dλₖ = vₖᵀ dM vₖ`` with the blocks' ``eigh`` vectors (the value itself by
    bisection)."""
    values = arrow_eigvalsh(*primals)
    matrices, d_matrices = jax.jvp(blocks, primals, tangents)
    _, vectors = jnp.linalg.eigh(matrices)
    return values, jnp.einsum("gik,gij,gjk->gk", vectors, d_matrices, vectors)


def blocks(D: jax.Array, beta: jax.Array, c: jax.Array, rho: jax.Array | None) -> jax.Array:
    """The ``(g, a + 1, a + 1)`` blocks ``[[diag(D) + ρccᵀ, c], [cᵀ, β]]`` (bias last),
    ``g (a + 1)²`` memory: for ``to_dense``, ``eigh`` and derivatives."""
    top = jax.vmap(jnp.diag)(D)
    if rho is not None:
        top += rho[:, None, None] * c[:, :, None] * c[:, None, :]
    top = jnp.concatenate([top, c[:, :, None]], axis=2)
    bottom = jnp.concatenate([c, beta[:, None]], axis=1)[:, None, :]
    return jnp.concatenate([top, bottom], axis=1)


def _overflow_exponent(D, beta, c):
    """Per block, the exponent ``e`` (an integer) such that ``2⁻ᵉ`` brings its largest entry
    into ``[1, 2)`` (0 for a zero or non-finite block): the count's terms ``cᵢ²/(Dᵢ − λ)``
    and the brackets' widths then overflow only within ``2⁻¹²⁶`` (float32) of a pole, and
    the eigenvalues of ``2⁻ᵉM`` times ``2ᵉ`` are those of ``M`` exactly (the floating-point
    grid is the same at every power of two; only entries below ``2^(minexp)·max`` flush).
    ``ldexp``, not a product by ``2⁻ᵉ``: XLA:CPU divides by a reciprocal, and ``exp2``
    rounds."""
    largest = jnp.maximum(jnp.maximum(jnp.abs(D).max(axis=1, initial=0.0),
                                      jnp.abs(c).max(axis=1, initial=0.0)), jnp.abs(beta))
    usable = jnp.isfinite(largest) & (largest > 0)
    return jnp.where(usable, jnp.frexp(largest)[1] - 1, 0)


def _arrow_brackets(poles, beta, c):
    """Per block and eigenvalue ``k``, ``[lo, hi]`` containing the arrow's ``λₖ`` (``poles``:
    ``D`` sorted per block)."""
    reach = jnp.linalg.norm(c, axis=1)
    low = jnp.minimum(poles[:, 0], beta) - reach
    high = jnp.maximum(poles[:, -1], beta) + reach
    lo = jnp.concatenate([low[:, None], poles], axis=1)
    hi = jnp.concatenate([poles, high[:, None]], axis=1)
    return lo, hi


def _rank_one_brackets(arrow, c, rho):
    """Brackets of ``A + ρĉĉᵀ``'s eigenvalues from ``A``'s ascending ``arrow``."""
    reach = (rho * jnp.sum(c**2, axis=1))[:, None]
    up = jnp.concatenate([arrow[:, 1:], arrow[:, -1:] + reach], axis=1)
    down = jnp.concatenate([arrow[:, :1] + reach, arrow[:, :-1]], axis=1)
    rising = (rho >= 0)[:, None]
    return jnp.where(rising, arrow, down), jnp.where(rising, up, arrow)


def _bisect(brackets, sorted_poles, D, beta, c, rho):
    """Split every bracket at :func:`_split` enough times for its ends to be neighbours
    in the floating-point grid, keeping ``λₖ`` in ``[lo, hi]`` by the count
    ``n(mid) > k``; the midpoints (NaN for a block with a non-finite entry)."""
    lo, hi = brackets
    lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
    order = jnp.arange(lo.shape[1])
    # poles with cᵢ = 0 are out of κ: at +∞ their terms are 0 and never 0/0
    poles = jnp.where(c == 0, jnp.inf, D)
    squares = c**2
    info = jnp.finfo(lo.dtype)
    # one split at 0 at most, ⌈log₂(exponent range)⌉ geometric ones, then nmant + 1 halvings
    limit = info.nmant + 3 + int(np.ceil(np.log2(info.maxexp - info.minexp)))

    def halve(_, bracket):
        lo, hi = bracket
        mid = _split(lo, hi, info)
        above = _count(mid, sorted_poles, poles, squares, beta, rho) > order
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = lax.fori_loop(0, limit, halve, (lo, hi))
    bad = ~_finite_blocks(D, beta, c, rho)
    return jnp.where(bad[:, None], jnp.nan, lo + (hi - lo) / 2)


def _split(lo, hi, info):
    """A point inside each ``[lo, hi]``: ``0`` when it lies inside; else, on the side of
    ``0`` the bracket lies, the geometric mean of its ends (the end nearer ``0`` taken at
    least the smallest normal number) when they are more than a factor 2 apart, so that
    brackets over many binades shrink in ratio — an eigenvalue near their small end gets
    relative accuracy, not ``width · 2⁻ⁿᵐᵃⁿᵗ``; the arithmetic midpoint otherwise."""
    arithmetic = lo + (hi - lo) / 2
    positive = lo >= 0
    near = jnp.maximum(jnp.where(positive, lo, -hi), info.tiny)
    far = jnp.where(positive, hi, -lo)
    geometric = jnp.sqrt(near) * jnp.sqrt(far)
    mid = jnp.where(far > 2 * near, jnp.where(positive, geometric, -geometric), arithmetic)
    return jnp.where((lo < 0) & (hi > 0), jnp.zeros_like(lo), mid)


def _finite_blocks(D, beta, c, rho):
    """Per block, whether all its entries are finite (else its eigenvalues are NaN, as
    ``eigh``'s of a non-finite block)."""
    finite = jnp.isfinite(D).all(axis=1) & jnp.isfinite(c).all(axis=1) & jnp.isfinite(beta)
    return finite if rho is None else finite & jnp.isfinite(rho)


def _count(lam, sorted_poles, poles, squares, beta, rho):
    """The number of eigenvalues below each ``lam`` ``(g, m)`` (module docstring)."""
    below = jax.vmap(functools.partial(jnp.searchsorted, side="left"))(sorted_poles, lam)
    kappa = jnp.sum(squares[:, None, :] / (poles[:, None, :] - lam[:, :, None]), axis=-1)
    schur = beta[:, None] - lam - kappa
    if rho is None:
        return below + (schur < 0)
    rho = rho[:, None]
    sign = jnp.where(rho >= 0, 1.0, -1.0).astype(lam.dtype)
    rho_kappa = jnp.where(rho == 0, 0.0, rho * kappa)  # 0·∞ is 0 here
    p = -sign - sign * rho_kappa
    det = -sign * (schur + rho_kappa * (beta[:, None] - lam))
    negatives = jnp.where(det < 0, 1, jnp.where(det > 0, 2 * (p < 0), (p + schur) < 0))
    return below + negatives - (rho >= 0)
