"""Elastic weight consolidation (Kirkpatrick et al. 2017) with any Fisher representation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from jaxgeom.pmat.base import PMatAbstract
from jaxgeom.vector import PVector


def ewc_penalty(fisher: PMatAbstract, params_star: Any, lam: float) -> Callable[[Any], jax.Array]:
    """The EWC penalty of a finished task as a differentiable function of the parameters.

    .. math::  R(w) = \\frac{\\lambda}{2} (w - w^*)^\\top F (w - w^*),
       \\qquad \\nabla R(w) = \\lambda F (w - w^*),

    with ``F`` the Fisher of the finished task at its solution ``w*``, in any
    representation (``PMatDiag`` is the original EWC; ``PMatKFAC``/``PMatEKFAC`` keep the
    correlations within layers, Ritter et al. 2018). The quadratic form is the
    representation's ``vTMv``, so its cost is that of one product (``d`` for a diagonal,
    ``Σ d_l (a_l + g_l)`` for K-FAC), and ``jax.grad`` goes through it.

    Use the true Fisher (:func:`jaxgeom.FIM`, or :func:`jaxgeom.FIM_MonteCarlo`), not the
    squared mean gradient: ``F = (1/N) Σₙ E_y[∇log p ∇log pᵀ]``, a mean of squares.

    Args:
      fisher: ``F`` at the end of the finished task.
      params_star: ``w*``, the parameters at the end of the finished task: a pytree of
        the structure and leaf shapes of the Fisher's parameters (those the penalty is
        called with), or a :class:`~jaxgeom.PVector` of one.
      lam: ``λ``, the strength of the penalty.

    Returns:
      ``penalty(params) -> scalar``.

    Raises:
      ValueError: if ``params_star`` does not match ``fisher.layer_collection`` (another
        structure, or a leaf of another shape: named by its path); a mismatch is never
        broadcast.

    Example:
      >>> F = FIM(apply_fn, params_a, (x_a, y_a), PMatKFAC)
      >>> penalty = ewc_penalty(F, params_a, lam=100.0)
      >>> loss_b = lambda p: cross_entropy(apply_fn(p, x_b), y_b) + penalty(p)

    References:
      Kirkpatrick et al., `Overcoming catastrophic forgetting in neural networks
      <https://arxiv.org/abs/1612.00796>`_, 2017.
      Ritter et al., `Online structured Laplace approximations for overcoming catastrophic
      forgetting <https://arxiv.org/abs/1805.07810>`_, 2018.
    """
    if not isinstance(fisher, PMatAbstract):
        raise TypeError(f"fisher must be a jaxgeom representation; got {type(fisher).__name__}")
    if isinstance(params_star, PVector):
        params_star = params_star.tree
    fisher.layer_collection.check_tree(params_star, "params_star")

    def penalty(params: Any) -> jax.Array:
        delta = jax.tree_util.tree_map(lambda w, w0: w - w0, params, params_star)
        return 0.5 * lam * fisher.vTMv(delta)

    return penalty
