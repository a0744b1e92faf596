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
(``λ₀ ≥ min(D₍₁₎, β) − ‖c‖``, ``λₐ ≤ max(D₍ₐ₎, β) + ‖c‖`` by Weyl's inequality).
Brackets that narrow keep the relative accuracy of eigenvalues far below ``‖M‖`` (a
Fisher's graded diagonal): ``nmant + 3`` halvings reach round-off in every bracket. A
rank one ``ρ ĉĉᵀ`` moves each eigenvalue of ``A`` at most to the next one, up for
``ρ > 0`` and down for ``ρ < 0`` (``|ρ| ‖c‖²`` past the last one): the arrow's eigenvalues,
found first, bracket those of ``M``.

Cost per layer of ``g`` blocks: ``(nmant + 3) · g (a + 1) a`` divisions (twice for
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
from jax import lax


@jax.custom_jvp
def arrow_eigvalsh(D: jax.Array, beta: jax.Array, c: jax.Array,
                   rho: jax.Array | None = None) -> jax.Array:
    """The eigenvalues of ``g`` blocks ``[[diag(D) + ρccᵀ, c], [cᵀ, β]]``, ascending per
    block.

    Args:
      D: ``(g, a)``; beta: ``(g,)``; c: ``(g, a)``; rho: ``(g,)`` or ``None`` (``ρ = 0``).

    Returns:
      ``(g, a + 1)``, each row ascending. Absolute accuracy a few ulps of each bracket's
      ends (module docstring), no block formed.
    """
    arrow = _bisect(_arrow_brackets(D, beta, c), D, beta, c, None)
    if rho is None:
        return arrow
    return _bisect(_rank_one_brackets(arrow, c, rho), D, beta, c, rho)


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


def _arrow_brackets(D, beta, c):
    """Per block and eigenvalue ``k``, ``[lo, hi]`` containing the arrow's ``λₖ``."""
    poles = jnp.sort(D, axis=1)
    reach = jnp.linalg.norm(c, axis=1)
    low = jnp.minimum(poles[:, 0], beta) - reach
    high = jnp.maximum(poles[:, -1], beta) + reach
    lo = jnp.concatenate([low[:, None], poles], axis=1)
    hi = jnp.concatenate([poles, high[:, None]], axis=1)
    return lo, hi


def _rank_one_brackets(arrow, c, rho):
    """Brackets of ``A + ρĉĉᵀ``'s eigenvalues from ``A``'s ascending ``arrow``."""
    reach = (rho * jnp.sum(c**2, axis=1))[:, None]
    up = (jnp.concatenate([arrow[:, 1:], arrow[:, -1:] + reach], axis=1))
    down = (jnp.concatenate([arrow[:, :1] + reach, arrow[:, :-1]], axis=1))
    rising = (rho >= 0)[:, None]
    return jnp.where(rising, arrow, down), jnp.where(rising, up, arrow)


def _bisect(brackets, D, beta, c, rho):
    """Halve every bracket ``nmant + 3`` times, keeping ``λₖ`` in ``[lo, hi]`` by the
    count ``n(mid) > k``; the midpoints."""
    lo, hi = brackets
    lo, hi = jnp.minimum(lo, hi), jnp.maximum(lo, hi)
    order = jnp.arange(lo.shape[1])
    sorted_poles = jnp.sort(D, axis=1)
    # poles with cᵢ = 0 are out of κ: at +∞ their terms are 0 and never 0/0
    poles = jnp.where(c == 0, jnp.inf, D)
    squares = c**2

    def halve(_, bracket):
        lo, hi = bracket
        mid = lo + (hi - lo) / 2
        above = _count(mid, sorted_poles, poles, squares, beta, rho) > order
        return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    halvings = jnp.finfo(lo.dtype).nmant + 3
    lo, hi = lax.fori_loop(0, halvings, halve, (lo, hi))
    return lo + (hi - lo) / 2


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
