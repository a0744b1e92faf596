"""Elastic weight consolidation (Kirkpatrick et al. 2017) with any Fisher representation."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxgeom.pmat.base import PMatAbstract
from jaxgeom.vector import as_flat


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
        called with), a :class:`~jaxgeom.PVector` of one, or its flat ``(d,)`` vector.
      lam: ``λ``, the strength of the penalty (a scalar).

    Returns:
      ``penalty(params) -> scalar``.

    Raises:
      ValueError: if ``params_star`` does not match ``fisher.layer_collection`` (another
        structure, or a leaf of another shape: named by its path), or ``lam`` is not a
        scalar; so does ``penalty(params)`` for ``params`` that do not match. A mismatch
        is never broadcast.

    Example:
      >>> # params_a: the solution of task A, (x_a, y_a) its data; (x_b, y_b) task B's
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
    layout = fisher.layer_collection
    star, _ = as_flat(params_star, layout, "params_star")
    if np.shape(lam) != ():
        raise ValueError(f"lam must be a scalar (the strength λ of the penalty); got shape "
                         f"{np.shape(lam)}: for several tasks, sum one penalty per task")

    def penalty(params: Any) -> jax.Array:
        # checked like params_star: parameters of other leaf shapes (another head) would
        # broadcast against w* into a wrong penalty
        flat, _ = as_flat(params, layout, "params")
        return 0.5 * lam * fisher.vTMv(flat - star)

    return penalty
