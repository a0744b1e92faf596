"""Natural-gradient preconditioning as optax gradient transformations.

:func:`scale_by_natural_gradient` turns the gradient ``g`` into the preconditioned
direction ``Δ = (F + λI)⁻¹ g`` for a Fisher (or any second moment) ``F`` stored in a
jaxgeom representation that can solve: ``PMatDiag``, ``PMatBlockDiag``, ``PMatKFAC``
(K-FAC), ``PMatEKFAC`` (EK-FAC), ``PMatDense``, or ``PMatImplicit`` (conjugate gradient
on exact Fisher-vector products: Hessian-free / truncated natural gradient). It is an
``optax.GradientTransformationExtraArgs``: the state is a ``NamedTuple`` pytree of fixed
structure, ``update`` is pure and jit-able, and the transform composes with
``optax.chain`` (learning-rate schedules, weight decay, clipping). :func:`natural_gradient`
is the ready-made optimizer ``chain(scale_by_natural_gradient, scale_by_learning_rate)``.

What goes where:

- **constructor** (static, hashable choices): the representation, the Fisher variant and
  estimator, refresh periods, EMA decay, damping (constant, optax schedule or
  :class:`LevenbergMarquardt`), clipping, solver options; ``apply_fn`` and an
  ``example_batch`` when the state must hold the curvature (see below).
- **extra arguments of** ``update`` (change every step): ``batch`` (the current
  ``(x, y)``), ``key`` (PRNG key; required by the Monte-Carlo Fisher), ``apply_fn``
  (overrides the constructor's, e.g. a model bound to this step's dropout key: one mask
  for every example, see docs/conventions.md) and ``value`` (the
  loss at ``params`` on ``batch``, if already computed: saves a forward pass of the
  Levenberg–Marquardt ratio). ``optax.chain`` forwards them to every transform that
  accepts extra arguments.

The state holds the curvature only when it must survive between steps (a refresh period
or an inverse period above 1, or an exponential moving average); ``init(params)`` then
needs the structure of the representation, which it gets by tracing ``apply_fn`` on
``example_batch`` (shapes only; any number of examples). Otherwise the curvature is
estimated at every step on the current batch and the state holds none.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxgeom import data as data_lib
from jaxgeom._counter_rng import check_key
from jaxgeom._differentiable import FloatLeaves, tangent_map
from jaxgeom._sharding import gathered
from jaxgeom.jacobian import Hashable, forward_mode_ok
from jaxgeom.metrics import FIM, FIM_MonteCarlo, SecondMoment, _whitener
from jaxgeom.pmat.base import PMatAbstract
from jaxgeom.pmat.kfac import PMatKFAC
from jaxgeom.pmat.mixed import PMatMixed
from jaxgeom.variants import FisherOutputs, regression_whitener

FISHERS = ("exact", "monte_carlo", "empirical")

#: the coefficients of the step that :func:`scale_by_natural_gradient` can choose by
#: minimising the quadratic model of the loss (``adaptive=``): the learning rate ``α``
#: alone, or ``α`` and the momentum ``μ`` together (Martens & Grosse 2015, §7)
ADAPTIVE = ("learning_rate", "momentum")

#: the arguments of :func:`scale_by_natural_gradient` and :func:`natural_gradient` that
#: ``optax.inject_hyperparams`` must leave alone (``static_args``): callables that are not
#: schedules, and the counts that shape the state
STATIC_ARGS = ("representation", "apply_fn", "loss_fn", "example_batch", "curvature_period",
               "inverse_period", "trials")


class LevenbergMarquardt(NamedTuple):
    """Adaptive (Levenberg–Marquardt) damping (Martens 2010, §4.1; Martens & Grosse 2015, §6.5).

    Every ``period`` steps the transform measures the reduction ratio

    .. math::
      \\rho = \\frac{L(\\theta + u) - L(\\theta)}{g^\\top u + \\tfrac12 u^\\top F u},
      \\qquad u = -\\eta\\,\\Delta,

    of the loss on the current batch against its quadratic model (``F`` the undamped
    curvature, ``η`` the ``learning_rate`` given to the transform), and updates
    ``λ ← decrease·λ`` if ``ρ > upper``, ``λ ← increase·λ`` if ``ρ < lower`` (or ``ρ`` is
    not finite), clipped to ``[min_damping, max_damping]``.

    ``g`` is the update the transform receives: the loss gradient when the transform comes
    first in its chain (as :func:`natural_gradient` builds it). After a transform that
    changes the gradient (``optax.clip_by_global_norm``, weight decay added to it, …) the
    quadratic model, and so ``ρ``, are those of the changed one; clip the natural-gradient
    direction with ``max_norm`` or ``kl_clip`` instead.

    Attributes:
      initial: the damping ``λ`` at step 0, in ``[min_damping, max_damping]``.
      decrease, increase: the multiplicative factors (Martens 2010: 2/3 and 3/2).
      lower, upper: the thresholds on ``ρ``.
      min_damping, max_damping: bounds on ``λ``.
      period: adapt every ``period`` steps (the extra forward passes are paid only then).
    """

    initial: float = 1e-3
    decrease: float = 2 / 3
    increase: float = 3 / 2
    lower: float = 0.25
    upper: float = 0.75
    min_damping: float = 1e-8
    max_damping: float = 1e4
    period: int = 1


def levenberg_marquardt(damping: jax.Array, rho: jax.Array,
                        rule: LevenbergMarquardt) -> jax.Array:
    """The Levenberg–Marquardt damping update for a reduction ratio ``rho`` (see
    :class:`LevenbergMarquardt`)."""
    factor = jnp.where(rho > rule.upper, rule.decrease,
                       jnp.where(rho < rule.lower, rule.increase, 1.0))
    factor = jnp.where(jnp.isfinite(rho), factor, rule.increase)
    return jnp.clip(damping * factor, rule.min_damping, rule.max_damping)


class NaturalGradientState(NamedTuple):
    """State of :func:`scale_by_natural_gradient`.

    Attributes:
      count: the number of updates done (int32).
      curvature: the curvature ``F`` kept between steps (a representation), or ``None``
        when it is re-estimated at every step.
      inverse: the cached ``(F + λI)⁻¹`` (``inverse_period > 1``), or ``None``.
      damping: the damping ``λ`` used by the last update — with ``inverse_period > 1``,
        that of the cached inverse, as of its last recomputation (with
        :class:`LevenbergMarquardt`, the next update's).
      rho: the last measured reduction ratio (NaN before any measurement).
      previous_step: the last step ``δ`` taken (``adaptive="momentum"``: zeros before the
        first), else ``None``.
    """

    count: jax.Array
    curvature: Any
    inverse: Any
    damping: jax.Array
    rho: jax.Array
    previous_step: Any = None


Damping = float | Callable[[jax.Array], jax.Array] | LevenbergMarquardt


def scale_by_natural_gradient(
    representation: type[PMatAbstract],
    *,
    damping: Damping = 1e-3,
    apply_fn: Callable | None = None,
    example_batch: Any = None,
    variant: str = "classif_logits",
    fisher: str = "exact",
    trials: int = 1,
    curvature_period: int = 1,
    inverse_period: int = 1,
    ema: float | None = None,
    learning_rate: float | Callable[[jax.Array], jax.Array] = 1.0,
    max_norm: float | None = None,
    kl_clip: float | None = None,
    loss_fn: Callable | None = None,
    fim_options: dict | None = None,
    solve_options: dict | None = None,
    adaptive: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Precondition the gradient with the damped inverse Fisher (natural gradient).

    .. math::
      \\begin{align*}
      F_t &= \\begin{cases} \\beta F_{t-1} + (1-\\beta)\\,\\hat F(\\theta_t, B_t)
              & t \\equiv 0 \\pmod k \\\\ F_{t-1} & \\text{otherwise} \\end{cases} \\\\
      \\Delta_t &= (F_t + \\lambda_t I)^{-1} g_t \\quad
              \\text{(inverse recomputed every } m \\text{ steps)} \\\\
      \\Delta_t &\\leftarrow \\Delta_t \\min\\Bigl(1,
              \\sqrt{c / (\\eta^2 \\Delta_t^\\top F_t \\Delta_t)}\\Bigr)
              \\quad \\text{(KL clip, optional)}
      \\end{align*}

    ``F̂(θ, B)`` is the Fisher of ``apply_fn`` on the batch ``B`` in ``representation``
    (exact, Monte-Carlo or empirical; :func:`jaxgeom.FIM`), ``β`` the EMA decay (0: no
    averaging; the first estimate is taken as is), ``k = curvature_period``,
    ``m = inverse_period``. The output ``Δ`` is a descent direction to be scaled by
    ``-η`` (as ``optax.scale_by_adam``'s output); :func:`natural_gradient` does that.

    Representations: any that can ``solve(v, regul)``. With ``inverse_period > 1`` the
    cached ``inv(λ)`` is applied between recomputations (``λ`` as of the last
    recomputation, as kfac-jax does), so the representation needs ``inv``
    (``PMatImplicit`` does not). EMA needs ``+`` and scalar ``*`` that keep the
    representation (``PMatDiag``, ``PMatBlockDiag``, ``PMatDense``); ``PMatKFAC`` is
    averaged factor by factor (``A``, ``G`` and the exact blocks), as in K-FAC.
    ``PMatEKFAC`` with ``inverse_period = m > 1`` recomputes its eigenbasis (the K-FAC
    factors, their ``eigh`` and a diagonal fit) at the steps ``t`` with ``t mod m = 0``
    and refits only its diagonal in that basis at the other steps with ``t mod k = 0``
    (George et al. 2018; ``k < m``; ``k`` need not divide ``m``); its EMA
    averages the refitted diagonals within one basis. It caches no inverse: it solves in
    its eigenbasis at the cost of a product.
    ``PMatImplicit`` (truncated CG, Hessian-free) re-reads the current batch at every
    step: it cannot be refreshed less often nor averaged; cap the CG iterations with
    ``solve_options={"maxiter": 20}``.

    **Step chosen by the quadratic model** (``adaptive``; kfac-jax's
    ``use_adaptive_learning_rate`` and ``use_adaptive_momentum``, Martens & Grosse 2015,
    §7). The step is ``δ = αΔ + μδ_{t-1}`` (``δ_{t-1}`` the previous step, 0 at the first)
    with the coefficients that minimise the damped quadratic model of the loss on the
    batch, its curvature the *exact* Fisher ``C`` of ``apply_fn`` on the batch (whatever
    ``representation`` preconditions):

    ::

      min over α, μ of   gᵀδ + ½ δᵀ(C + λI)δ,   δ = αΔ + μp,   p = δ_{t-1}:

      ⎡ Δᵀ(C + λI)Δ   Δᵀ(C + λI)p ⎤ ⎡α⎤     ⎡gᵀΔ⎤
      ⎣ pᵀ(C + λI)Δ   pᵀ(C + λI)p ⎦ ⎣μ⎦ = − ⎣gᵀp⎦ ;

    ``"learning_rate"`` takes ``μ = 0``, ``α = -gᵀΔ / Δᵀ(C + λI)Δ``; ``"momentum"`` solves
    the 2 × 2 system (``α`` alone where ``p = 0`` or ``p ∥ Δ``); a zero gradient (``Δ =
    0``) gives a zero step. With the exact Fisher in
    ``representation`` (``PMatDense``, ``PMatImplicit``), ``α = -1``: ``Δ`` is the model's
    minimiser already. The transform's output is ``-δ``, for
    ``optax.scale_by_learning_rate(1.0)`` after it (``natural_gradient(None, ...)``): the
    step's scale is chosen, so ``learning_rate`` must be 1 and ``kl_clip`` is refused
    (``max_norm`` clips ``Δ`` before the choice). The Levenberg–Marquardt ratio then
    measures ``δ`` against the same exact model (undamped). Cost: the exact Fisher's
    quadratic forms on the batch — one (``"learning_rate"``) or two (``"momentum"``:
    ``Δ`` and ``p``) forward-mode products from one batched call of ``apply_fn``, whose
    forward pass XLA shares with the loss's in the same ``jit`` (no chunking: the batch is
    one training step's); ``"momentum"`` keeps ``δ`` in the state
    (``NaturalGradientState.previous_step``).

    Args:
      representation: the representation class of ``F`` (``PMatKFAC``, ``PMatDiag``, …).
      damping: ``λ``: a float, an optax schedule of the step count, or a
        :class:`LevenbergMarquardt` rule (adaptive damping; needs the loss: ``loss_fn`` or
        the variant's negative log-likelihood, and ``learning_rate``).
      apply_fn: ``apply_fn(params, x) -> outputs``; may instead come at every ``update``.
      example_batch: a batch (shapes only) used by ``init`` to build the state's
        curvature structure when the state holds one (periods > 1 or ``ema``).
      variant: the Fisher variant (:data:`jaxgeom.VARIANTS`); also picks the default
        loss (softmax cross-entropy with integer labels for ``"classif_logits"``).
      fisher: ``"exact"`` (closed-form expectation), ``"monte_carlo"`` (targets sampled
        from the model, ``trials`` per example; pass ``key`` to ``update``) or
        ``"empirical"`` (second moment of per-example loss gradients, needs labels).
      trials: Monte-Carlo samples per example.
      curvature_period: ``k``: estimate the curvature every ``k`` steps.
      inverse_period: ``m``: recompute the cached inverse (EK-FAC: the eigenbasis) every
        ``m`` steps (1: solve at every step with the current ``λ``).
      ema: ``β``, the decay of the moving average of the curvature (``None``: none).
      learning_rate: ``η`` (float or schedule); only used to predict the final step
        ``-ηΔ`` for ``kl_clip`` and the Levenberg–Marquardt ratio.
      max_norm: clip ``‖Δ‖₂`` to this value.
      kl_clip: ``c``: scale ``Δ`` so that ``η² ΔᵀFΔ ≤ c`` (kfac-jax's norm constraint; half
        of it is the predicted KL divergence of the step).
      loss_fn: ``loss_fn(params, batch) -> scalar`` for Levenberg–Marquardt; defaults to
        the mean negative log-likelihood of ``variant`` on ``batch = (x, y)``.
      fim_options: passed to the Fisher builder (``batch_size``, ``kfac_approx``,
        ``covariance``, ``layer_collection``, …). A regression ``covariance`` ``Σ`` also
        weighs the residuals of the losses (``½ rᵀΣ⁻¹r``: the empirical Fisher's and the
        default ``loss_fn``).
      solve_options: passed to ``solve`` (``method``, CG's and MINRES's
        ``maxiter``/``rtol``, the Neumann series' ``num_terms``/``scale``, K-FAC's
        ``damping="exact"|"pi"|"pi_one"``, also used by the cached ``inv``).
      adaptive: ``None`` (the step ``-ηΔ``), ``"learning_rate"`` or ``"momentum"``
        (:data:`ADAPTIVE`): the step's coefficients chosen by the exact quadratic model
        (above).

    Returns:
      An ``optax.GradientTransformationExtraArgs`` with state
      :class:`NaturalGradientState`; ``update(updates, state, params, *, batch, key=None,
      apply_fn=None, value=None)``.

    Raises:
      ValueError: for an option out of its range (``damping < 0``, ``max_norm ≤ 0``, …).

    To change ``damping``, ``learning_rate``, ``ema``, ``max_norm`` or ``kl_clip`` during
    training, wrap the transform in ``optax.inject_hyperparams(...,
    static_args=STATIC_ARGS)`` (:data:`STATIC_ARGS`: the callables, and the counts that
    shape the state) and set ``state.hyperparams[name]``.

    Example:
      >>> tx = optax.chain(
      ...     scale_by_natural_gradient(PMatKFAC, damping=1e-3),
      ...     optax.add_decayed_weights(1e-4),
      ...     optax.scale_by_learning_rate(optax.cosine_decay_schedule(0.1, 1000)))
      >>> state = tx.init(params)
      >>> grads = jax.grad(loss)(params, x, y)
      >>> updates, state = tx.update(grads, state, params, batch=(x, y),
      ...                            apply_fn=model.apply)
      >>> params = optax.apply_updates(params, updates)

    References:
      Amari, `Natural gradient works efficiently in learning
      <https://doi.org/10.1162/089976698300017746>`_, 1998.
      Martens, `Deep learning via Hessian-free optimization
      <https://www.cs.toronto.edu/~jmartens/docs/Deep_HessianFree.pdf>`_, 2010.
      Martens & Grosse, `Optimizing neural networks with Kronecker-factored approximate
      curvature <https://arxiv.org/abs/1503.05671>`_, 2015.
      George et al., `Fast approximate natural gradient descent in a Kronecker-factored
      eigenbasis <https://arxiv.org/abs/1806.03884>`_, 2018.
    """
    if fisher not in FISHERS:
        raise ValueError(f"fisher must be one of {FISHERS}; got {fisher!r}")
    if adaptive is not None and adaptive not in ADAPTIVE:
        raise ValueError(f"adaptive must be None or one of {ADAPTIVE} (the coefficients the "
                         f"quadratic model chooses); got {adaptive!r}")
    if adaptive is not None and (
            kl_clip is not None or callable(learning_rate)
            or (not isinstance(learning_rate, jax.core.Tracer)  # optax.inject_hyperparams
                and (np.asarray(learning_rate).shape != () or float(learning_rate) != 1.0))):
        raise ValueError(
            f"adaptive={adaptive!r} chooses the step's scale by the quadratic model: give "
            "learning_rate=1.0 (natural_gradient(None, ...)) and no kl_clip (max_norm "
            f"clips the direction before the choice); got learning_rate={learning_rate!r}, "
            f"kl_clip={kl_clip!r}")
    _check_static_counts(curvature_period=curvature_period, inverse_period=inverse_period,
                         trials=trials)
    _check_numbers(ema=(ema, lambda v: 0 <= v < 1, "in [0, 1)"),
                   max_norm=(max_norm, lambda v: v > 0, "> 0"),
                   kl_clip=(kl_clip, lambda v: v > 0, "> 0"))
    if isinstance(damping, LevenbergMarquardt):
        _check_levenberg_marquardt(damping)
    elif not callable(damping):
        _check_numbers(damping=(damping, lambda v: v >= 0, ">= 0"))
    replays = getattr(representation, "NEEDS_REPLAY", False)
    holds_curvature = ema is not None or curvature_period > 1 or inverse_period > 1
    if replays and holds_curvature:
        raise ValueError(
            f"{representation.__name__} re-reads the current batch at every step: it cannot "
            "be refreshed every k > 1 steps, averaged (ema) nor inverted (inverse_period > 1)"
        )
    levenberg = isinstance(damping, LevenbergMarquardt)
    default_apply_fn = apply_fn
    fim_options = dict(fim_options or {})
    solve_options = dict(solve_options or {})
    inv_options = {k: v for k, v in solve_options.items() if k == "damping"}

    # EK-FAC (a representation with ``refit``): the inverse period is its eigenbasis
    # period; in between, the curvature refreshes refit the diagonal in the kept basis.
    refits = hasattr(representation, "refit") and inverse_period > 1
    caches_inverse = inverse_period > 1 and not refits

    def estimate(fn, params, batch, key, **options):
        curvature = build(fn, params, batch, key, **{**fim_options, **options})
        # a state holds builds on batches of any size (and an EK-FAC's refits): one structure
        return curvature.without_rank_bounds() if holds_curvature else curvature

    # a regression covariance Σ: the exact and Monte-Carlo builds take it, the losses
    # (empirical Fisher, Levenberg–Marquardt's ratio) weigh their residuals with Σ⁻¹
    covariance = _static(fim_options.get("covariance"))
    if fisher == "empirical":
        fim_options.pop("covariance", None)

    def build(fn, params, batch, key, **options):
        if fisher == "exact":
            return FIM(fn, params, batch, representation, variant=variant, **options)
        if fisher == "monte_carlo":
            check_key(key, "the key of update(..., key=key) (fisher='monte_carlo')")
            return FIM_MonteCarlo(fn, params, batch, representation, key=key,
                                  variant=variant, trials=trials, **options)
        loss = _PerExampleLoss(fn, variant, covariance)
        batch = loss.check_targets(params, batch)
        return SecondMoment(loss, params, batch, representation, **options)

    def initial_damping(dtype):
        value = damping.initial if levenberg else (
            damping(0) if callable(damping) else damping)
        return jnp.asarray(value, dtype)

    def init_fn(params):
        params = _without_variables(params)
        dtype = _float_dtype(params)
        curvature = inverse = None
        if holds_curvature:
            if apply_fn is None or example_batch is None:
                raise ValueError(
                    "this transform keeps the curvature in its state (curvature_period > 1, "
                    "inverse_period > 1 or ema): give apply_fn and example_batch to the "
                    "constructor so that init can build its structure")
            _check_subset(apply_fn, params, example_batch)

            def first(p):
                c = estimate(apply_fn, p, example_batch, jax.random.PRNGKey(0))
                return c, (c.inv(1.0, **inv_options) if caches_inverse else None)

            curvature, inverse = _zeros(jax.eval_shape(first, params), params)
            if ema is not None and not refits:  # EK-FAC's refits share one basis
                jax.eval_shape(lambda a, b: _average(a, b, 0.5), curvature, curvature)
        previous_step = (jax.tree_util.tree_map(jnp.zeros_like, params)
                         if adaptive == "momentum" else None)
        return NaturalGradientState(
            count=jnp.zeros((), jnp.int32), curvature=curvature, inverse=inverse,
            damping=initial_damping(dtype), rho=jnp.full((), jnp.nan, dtype),
            previous_step=previous_step)

    def update_fn(updates, state, params=None, *, batch=None, key=None, apply_fn=None,
                  value=None, **extra_args):
        del extra_args
        fn = apply_fn if apply_fn is not None else default_apply_fn
        if params is None or batch is None or fn is None:
            raise ValueError(
                "scale_by_natural_gradient.update needs params, batch=(x, y) and an apply_fn "
                "(constructor or update(..., apply_fn=...))")
        if (levenberg or adaptive is not None) and not data_lib.is_single_batch(batch):
            what = ("the Levenberg-Marquardt damping measures the loss before and after "
                    "the step" if levenberg else
                    f"adaptive={adaptive!r} minimises the quadratic model of the loss")
            raise ValueError(
                f"{what} on one batch: pass batch=(x, y), not a {type(batch).__name__} of "
                "batches (concatenate them)")
        _check_subset(fn, params, batch)
        count = state.count
        # a constant damping is read from the constructor, not the state: under
        # optax.inject_hyperparams the transform is re-created with the injected value
        lam = state.damping if levenberg else jnp.asarray(
            damping(count) if callable(damping) else damping, state.damping.dtype)

        if holds_curvature:
            def averaged(new):
                if ema is None:
                    return new
                return _average(state.curvature, new, jnp.where(count == 0, 0.0, ema))

            def held(new):
                _check_fits(state.curvature, new)
                return new

            def refresh():
                if not refits:
                    return averaged(held(estimate(fn, params, batch, key)))
                return _cond(  # new eigenbasis (not averaged) or refit diagonal
                    count % inverse_period == 0,
                    lambda: held(estimate(fn, params, batch, key)),
                    lambda: averaged(held(estimate(fn, params, batch, key,
                                                   basis=state.curvature))))

            # every step: no cond (on XLA:CPU a build inside a cond branch cost 3-6 ms more
            # a bench_mlp K-FAC step)
            due = count % curvature_period == 0
            if refits:  # a new eigenbasis every m steps, whether or not k divides m
                due = due | (count % inverse_period == 0)
            curvature = refresh() if curvature_period == 1 else _cond(
                due, refresh, lambda: state.curvature)
        else:
            curvature = estimate(fn, params, batch, key)

        inverse = state.inverse
        if caches_inverse:
            inverse = _cond(count % inverse_period == 0,
                            lambda: curvature.inv(lam, **inv_options),
                            lambda: state.inverse)
            direction = inverse.mv(updates)
        else:
            direction = curvature.solve(updates, lam, **solve_options)
        direction = _cast_like(direction, updates)

        eta = learning_rate(count) if callable(learning_rate) else learning_rate
        if max_norm is not None:
            norm = optax.tree.norm(direction)
            direction = optax.tree.scale(jnp.minimum(1.0, max_norm / norm), direction)
        if kl_clip is not None:
            sq = eta**2 * curvature.vTMv(direction)
            coeff = jnp.where(sq > kl_clip, jnp.sqrt(kl_clip / jnp.maximum(sq, 1e-30)), 1.0)
            direction = optax.tree.scale(coeff, direction)

        previous_step, model_change = state.previous_step, None
        if adaptive is not None:
            forms = functools.partial(_exact_fisher_forms, fn, variant, covariance, params,
                                      data_lib.inputs_of(batch))
            step, model_change = _model_step(forms, updates, direction, lam,
                                             previous_step if adaptive == "momentum" else None)
            direction = optax.tree.scale(-1.0, step)  # for scale_by_learning_rate(1.0)
            if adaptive == "momentum":
                previous_step = _cast_like(step, previous_step)

        rho, new_lam = state.rho, lam
        if caches_inverse and not levenberg:  # the λ of the cached inverse: its recomputation's
            new_lam = jnp.where(count % inverse_period == 0, lam, state.damping)
        if levenberg:
            loss = loss_fn if loss_fn is not None else _MeanLoss(fn, variant, covariance)

            def measure():
                step = optax.tree.scale(-eta, direction)
                before = loss(params, batch) if value is None else value
                after = loss(optax.apply_updates(params, step), batch)
                predicted = model_change if model_change is not None else (
                    _vdot(updates, step) + 0.5 * curvature.vTMv(step))
                return jnp.asarray((after - before) / predicted, state.rho.dtype)

            measured = count % damping.period == 0
            rho = _cond(measured, measure, lambda: state.rho)
            new_lam = jnp.where(measured, levenberg_marquardt(lam, rho, damping), lam)

        new_state = NaturalGradientState(
            count=optax.safe_increment(count),
            curvature=curvature if holds_curvature else None,
            inverse=inverse,
            damping=jnp.asarray(new_lam, state.damping.dtype),
            rho=rho,
            previous_step=previous_step,
        )
        return direction, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _vdot(a: Any, b: Any) -> jax.Array:
    """``⟨a, b⟩`` of two parameter pytrees (leaves split over an explicit mesh axis
    gathered: their inner product is not defined there)."""
    return optax.tree.vdot(gathered(a)[0], gathered(b)[0])


def _exact_fisher_forms(fn: Callable, variant: str, covariance: Any, params: Any, x: Any,
                        vectors: list) -> jax.Array:
    """``(m, m)``: every ``vᵢᵀ C vⱼ`` of the params-shaped ``vectors``, ``C`` the exact
    Fisher of ``fn`` on the batch of inputs ``x`` — the mean of ``(B J vᵢ)·(B J vⱼ)`` over
    its examples (:class:`~jaxgeom.variants.FisherOutputs`), one ``jvp`` per vector from
    one *batched* call of ``fn``: the call the training step's own loss makes, whose
    forward pass XLA then shares (``PMatImplicit.quadratic_forms`` replays the model
    example by example: 3.5 ms more a bench_mlp step). A model with a ``jax.custom_vjp``
    (no forward mode) is differentiated as the transpose of its ``vjp``."""
    floats = FloatLeaves.of(params)
    out_shape = jax.eval_shape(fn, params, x).shape
    whitener = _whitener(variant, covariance, out_shape, params)
    fisher = FisherOutputs(Hashable(fn), variant)
    outputs = floats.bind(lambda p: fisher.of_batch(p, x, whitener))
    # the per-example builders' check, cached per model and signature: no trace per call
    forward = forward_mode_ok(fisher, params, data_lib.example_shapes(x), whitener)
    product = tangent_map(outputs, floats.primals, forward)
    jv = [product(floats.tangents_of(v)) for v in vectors]
    jv = jnp.stack([u.reshape(u.shape[0], -1) for u in jv])  # (m, N, K)
    return jnp.einsum("ink,jnk->ij", jv, jv) / out_shape[0]


def _model_step(forms: Callable[[list], jax.Array], g: Any, direction: Any,
                lam: jax.Array, previous: Any) -> tuple[Any, jax.Array]:
    """The step ``δ = αΔ + μp`` minimising ``gᵀδ + ½δᵀ(C + λI)δ`` (``forms(vectors)``: the
    matrix of their forms under ``C``; ``μ = 0`` where ``previous`` is ``None``, zero, or
    parallel to ``Δ``) and its undamped model change ``gᵀδ + ½δᵀCδ``
    (:func:`scale_by_natural_gradient`, ``adaptive``)."""
    delta = _cast_like(direction, g)
    g_delta, delta_delta = _vdot(g, delta), _vdot(delta, delta)
    if previous is None:
        c_dd = forms([delta])[0, 0]
        alpha = _minimiser(g_delta, c_dd + lam * delta_delta)
        return optax.tree.scale(alpha, delta), alpha * g_delta + 0.5 * alpha**2 * c_dd
    p = _cast_like(previous, g)
    matrix = forms([delta, p])
    c_dd, c_dp, c_pp = matrix[0, 0], matrix[0, 1], matrix[1, 1]
    g_p, delta_p, p_p = _vdot(g, p), _vdot(delta, p), _vdot(p, p)
    a00, a01, a11 = c_dd + lam * delta_delta, c_dp + lam * delta_p, c_pp + lam * p_p
    det = a00 * a11 - a01**2
    # p = 0 (the first step) or p ∥ Δ: the system is singular, α alone
    both = (p_p > 0) & (det > 1e3 * jnp.finfo(det.dtype).eps * a00 * a11)
    safe = jnp.where(both, det, 1.0)
    alpha = jnp.where(both, -(a11 * g_delta - a01 * g_p) / safe, _minimiser(g_delta, a00))
    mu = jnp.where(both, -(a00 * g_p - a01 * g_delta) / safe, 0.0)
    step = jax.tree_util.tree_map(lambda d, q: alpha * d + mu * q, delta, p)
    change = (alpha * g_delta + mu * g_p
              + 0.5 * (alpha**2 * c_dd + 2 * alpha * mu * c_dp + mu**2 * c_pp))
    return step, change


def _minimiser(slope: jax.Array, curvature: jax.Array) -> jax.Array:
    """``-slope / curvature``, the minimiser of ``slope·α + ½ curvature·α²``, and 0 where
    the curvature is not positive: a zero gradient, whose direction ``Δ = (F + λI)⁻¹g`` is
    0 (``0/0``: the step would be NaN and poison the parameters)."""
    positive = curvature > 0
    return jnp.where(positive, -slope / jnp.where(positive, curvature, 1.0), 0.0)


def _cond(predicate: jax.Array, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    """``jax.lax.cond`` under a trace; the branch taken in Python on a concrete predicate
    (an eager ``update``), where ``cond`` would trace and compile both branches — a whole
    build — again at every step: the branches are closures made anew for each step."""
    if isinstance(predicate, jax.core.Tracer):
        return jax.lax.cond(predicate, true_fn, false_fn)
    return true_fn() if bool(predicate) else false_fn()


def natural_gradient(
    learning_rate: float | Callable[[jax.Array], jax.Array] | None,
    representation: type[PMatAbstract],
    **options: Any,
) -> optax.GradientTransformationExtraArgs:
    """Natural-gradient descent: ``θ ← θ − η (F + λI)⁻¹ g``.

    ``optax.chain(scale_by_natural_gradient(representation, learning_rate=η, **options),
    optax.scale_by_learning_rate(η))``; see :func:`scale_by_natural_gradient` for the
    options (damping, refresh periods, EMA, clipping, Fisher estimator) and references.
    With ``PMatKFAC`` this is K-FAC, with ``PMatEKFAC`` EK-FAC, with ``PMatImplicit`` and
    ``solve_options={"maxiter": n}`` truncated Hessian-free (Gauss-Newton) descent.
    ``learning_rate=None`` with ``adaptive="learning_rate"`` or ``"momentum"``: the step's
    coefficients chosen by the quadratic model (kfac-jax's adaptive learning rate and
    momentum), ``η = 1``.

    Example:
      >>> tx = natural_gradient(0.1, PMatKFAC, damping=1e-3, curvature_period=5,
      ...                       inverse_period=5, apply_fn=apply_fn, example_batch=(x, y))
      >>> state = tx.init(params)
      >>> updates, state = tx.update(grads, state, params, batch=(x, y))
      >>> tx = natural_gradient(None, PMatKFAC, adaptive="momentum", apply_fn=apply_fn,
      ...                       damping=optim.LevenbergMarquardt(initial=1.0))
    """
    if learning_rate is None:
        if options.get("adaptive") is None:
            raise ValueError("natural_gradient needs a learning_rate (a float or an optax "
                             "schedule); None is for adaptive='learning_rate' or "
                             "'momentum', whose quadratic model chooses the step's scale")
        learning_rate = 1.0  # the quadratic model chooses the step's scale
    return optax.chain(
        scale_by_natural_gradient(representation, learning_rate=learning_rate, **options),
        optax.scale_by_learning_rate(learning_rate),
    )


# natural_gradient takes scale_by_natural_gradient's options by name: give it their
# signature, so that inspect (optax.inject_hyperparams, IDEs) sees them
natural_gradient.__signature__ = inspect.Signature([
    inspect.Parameter("learning_rate", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    *(parameter for name, parameter
      in inspect.signature(scale_by_natural_gradient).parameters.items()
      if name != "learning_rate"),
])


# ----------------------------------------------------------------------------- helpers
def _check_static_counts(**counts: Any) -> None:
    """Each count must be a concrete positive integer: it shapes the state or the build."""
    for name, value in counts.items():
        if isinstance(value, jax.core.Tracer):
            raise TypeError(
                f"{name} decides the structure of the transform and of its state, so it "
                "must be a concrete int, not a traced value; with optax.inject_hyperparams "
                "pass static_args=jaxgeom.optim.STATIC_ARGS")
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer; got {value!r}")


def _check_numbers(**checks: tuple[Any, Callable[[float], bool], str]) -> None:
    """``name=(value, valid, words)``: a concrete ``value`` must be a finite scalar with
    ``valid(value)``; ``None`` and traced values (``optax.inject_hyperparams``) pass."""
    for name, (value, valid, words) in checks.items():
        if value is None or isinstance(value, jax.core.Tracer):
            continue
        number = np.asarray(value)
        if (number.shape != () or not np.issubdtype(number.dtype, np.number)
                or not np.isfinite(number) or not valid(float(number))):
            raise ValueError(f"{name} must be a finite number {words}; got {value!r}")


def _check_levenberg_marquardt(rule: LevenbergMarquardt) -> None:
    positive = (lambda v: v > 0, "> 0")
    _check_numbers(**{f"LevenbergMarquardt.{name}": (getattr(rule, name), *check)
                      for name, check in (
        ("min_damping", positive),
        ("max_damping", (lambda v: v >= rule.min_damping, ">= min_damping")),
        ("initial", (lambda v: rule.min_damping <= v <= rule.max_damping,
                     "in [min_damping, max_damping]")),
        ("decrease", (lambda v: 0 < v <= 1, "in (0, 1]")),
        ("increase", (lambda v: v >= 1, ">= 1")),
        ("lower", (lambda v: True, "(a threshold on ρ)")),
        ("upper", (lambda v: v >= rule.lower, ">= lower")))})
    _check_static_counts(**{"LevenbergMarquardt.period": rule.period})


def _check_subset(apply_fn: Callable, params: Any, batch: Any) -> None:
    """Under ``optax.masked`` or ``optax.multi_transform`` the transform sees the
    parameters it updates only (the others are ``optax.MaskedNode``): ``apply_fn`` must
    then take that subset. Checked by tracing it once (shapes only) when the parameters
    hold a ``MaskedNode``, so that the failure names the cause."""
    if not _holds(params, optax.MaskedNode):
        return
    try:
        jax.eval_shape(apply_fn, params, data_lib.inputs_of(batch))
    except Exception as error:
        raise TypeError(
            "the natural gradient runs under optax.masked or optax.multi_transform: it sees "
            "only the parameters it updates (the others are optax.MaskedNode), and apply_fn "
            "fails on them. Give it an apply_fn of that subset, which closes over the other "
            "parameters (e.g. apply_fn=lambda p, x: model.apply(merge(p, frozen), x)), or "
            f"run it on all the parameters. apply_fn raised: {error}") from error


def _without_variables(params: Any) -> Any:
    """The parameters with Flax NNX ``Variable`` wrappers replaced by their arrays.

    ``nnx.Optimizer`` initialises its transform with ``nnx.state(model, wrt)`` (leaves
    wrapped in ``nnx.Param``) but updates it with the pure arrays (``nnx.as_pure``): the
    curvature the state holds must have the structure of the latter."""
    try:
        from flax import nnx
    except ImportError:  # pragma: no cover - flax is a dependency
        return params

    if not _holds(params, nnx.Variable):
        return params
    if hasattr(nnx, "as_pure"):
        return nnx.as_pure(params)
    return jax.tree_util.tree_map(  # Flax before 0.12.7; ``.value`` deprecated there
        lambda v: v.get_value() if hasattr(v, "get_value") else v.value, params,
        is_leaf=lambda x: isinstance(x, nnx.Variable))


def _holds(tree: Any, kind: type) -> bool:
    """Whether the pytree ``tree`` has a node of type ``kind`` (a leaf or not)."""
    def is_kind(x):
        return isinstance(x, kind)

    return any(map(is_kind, jax.tree_util.tree_leaves(tree, is_leaf=is_kind)))


def _float_dtype(params) -> Any:
    leaves = [x for x in jax.tree_util.tree_leaves(params)
              if jnp.issubdtype(jnp.result_type(x), jnp.floating)]
    return jnp.result_type(*leaves) if leaves else jnp.float32


def _zeros(shapes, params):
    """Zeros of ``jax.eval_shape``'s structs, placed as their shardings say on the mesh of
    ``params`` (a curvature built from parameters on a mesh: replicated on it, as every
    later step's is — a state on one device would give the steps' ``cond`` branches two
    placements)."""
    meshes = {getattr(leaf, "sharding", None).mesh for leaf in jax.tree_util.tree_leaves(params)
              if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding)}

    def zeros(struct):
        sharding = getattr(struct, "sharding", None)
        for mesh in meshes if isinstance(sharding, jax.sharding.NamedSharding) else ():
            if getattr(mesh, "abstract_mesh", mesh) == sharding.mesh or mesh == sharding.mesh:
                return jnp.zeros(struct.shape, struct.dtype,
                                 device=jax.sharding.NamedSharding(mesh, sharding.spec))
        return jnp.zeros(struct.shape, struct.dtype)

    return jax.tree_util.tree_map(zeros, shapes)


def _cast_like(tree, like):
    return jax.tree_util.tree_map(lambda a, b: jnp.asarray(a, jnp.result_type(b)), tree, like)


def _average(old: PMatAbstract, new: PMatAbstract, decay) -> PMatAbstract:
    """``decay·old + (1 − decay)·new`` in the representation of ``new``.

    K-FAC averages its factors (``A``, ``G``) and exact blocks separately, as kfac-jax
    does (a sum of Kronecker products is not one); every other representation uses its
    ``+`` and scalar ``*``, which must keep the representation.
    """
    if type(new) is PMatKFAC:
        mixed = jax.tree_util.tree_map(lambda a, b: decay * a + (1 - decay) * b, old, new)
    elif type(new) is PMatMixed:  # part by part: K-FAC parts by their factors
        mixed = new._with(tuple(_average(a, b, decay) for a, b in zip(old.parts, new.parts)))
    else:
        try:
            mixed = old * decay + new * (1 - decay)
        except ValueError as error:  # e.g. K-FAC blocks too large to be summed exactly
            raise _cannot_average(new, "not representable") from error
    if _shapes(mixed) != _shapes(new):
        kind = type(mixed).__name__
        raise _cannot_average(new, f"a {kind} of other shapes" if type(mixed) is type(new)
                              else f"a {kind}")
    return jax.tree_util.tree_map(lambda m, o: m.astype(o.dtype), mixed, old)


def _cannot_average(new: PMatAbstract, what: str) -> TypeError:
    name = type(new).__name__
    hint = (f" {name} averages its refitted diagonals within one eigenbasis: use it with "
            "inverse_period > 1 (the basis period)." if hasattr(new, "refit") else "")
    return TypeError(
        f"ema needs a moving average of the curvature that keeps its structure, but a "
        f"weighted sum of two {name}s is {what}.{hint} Use ema=None, or a representation "
        "whose sum keeps its structure (PMatDiag, PMatBlockDiag, PMatDense, PMatKFAC, "
        "PMatQuasiDiag, or a PMatMixed of those)")


def _static(value: Any) -> Any:
    """A concrete array as nested tuples of Python numbers (hashable: a static part of the
    loss, so that the compiled steps are reused); ``None`` and traced values as they are."""
    if value is None or isinstance(value, jax.core.Tracer):
        return value
    return np.asarray(value).tolist()


def _shapes(tree) -> tuple:
    """A pytree's structure and leaf shapes (what a state must keep from step to step)."""
    leaves, structure = jax.tree_util.tree_flatten(tree)
    return structure, tuple(jnp.shape(leaf) for leaf in leaves)


def _check_fits(held: PMatAbstract, new: PMatAbstract) -> None:
    """A new estimate must have the structure and shapes of the one the state holds."""
    if _shapes(new) != _shapes(held):
        raise ValueError(
            f"the {type(new).__name__} estimated on this batch does not fit the one the "
            "state holds (its shapes depend on the batch, e.g. PMatLowRank's rows, one per "
            "example and output). Give every batch the size of example_batch, or use "
            "curvature_period=1, inverse_period=1 and ema=None (the state then holds no "
            "curvature)")


def per_example_loss(variant: str, outputs: jax.Array, targets: jax.Array,
                     covariance: Any = None) -> jax.Array:
    """The negative log-likelihood of each example under ``variant`` (shape ``(N,)``), up to
    a constant.

    ``"classif_logits"``/``"segmentation_logits"``: softmax cross-entropy with integer
    labels (summed over positions); ``"classif_logsoftmax"``: ``-log p[y]``;
    ``"classif_binary_logits"``: sigmoid binary cross-entropy; ``"regression"``:
    ``½ (y − f)ᵀ Σ⁻¹ (y − f)`` for the ``covariance`` ``Σ`` of :func:`jaxgeom.FIM` (a
    scalar, a ``(C,)`` diagonal or a ``(C, C)`` matrix; ``None``: the identity).

    ``targets`` (checked by :func:`check_targets`): for outputs ``(N, ..., C)`` of a
    classification or segmentation variant, integer labels ``(N, ...)`` in ``[0, C)``;
    for ``"classif_binary_logits"`` and ``"regression"``, an array of the outputs' shape
    (a trailing axis of size 1 may be added or dropped), binary targets in ``[0, 1]``.

    Raises:
      ValueError: for targets of another dtype, shape or range (the range is checked where
        the targets are concrete, not traced).
    """
    n = outputs.shape[0]
    targets = check_targets(variant, outputs.shape, targets)
    if variant in ("classif_logits", "segmentation_logits"):
        losses = optax.softmax_cross_entropy_with_integer_labels(outputs, targets)
    elif variant == "classif_logsoftmax":
        losses = -jnp.take_along_axis(outputs, targets[..., None], axis=-1)[..., 0]
    elif variant == "classif_binary_logits":
        losses = optax.sigmoid_binary_cross_entropy(outputs, targets)
    else:  # regression
        residuals = (outputs - targets).reshape(n, -1)
        if covariance is not None:
            whitener = regression_whitener(covariance, residuals.shape[1], residuals.dtype)
            residuals = residuals @ whitener.T
        losses = 0.5 * residuals**2
    return losses.reshape(n, -1).sum(axis=1)


#: the variants whose targets are integer class labels (the outputs' last axis: classes)
_LABEL_VARIANTS = ("classif_logits", "classif_logsoftmax", "segmentation_logits")


def check_targets(variant: str, outputs_shape: tuple[int, ...], targets: Any) -> jax.Array:
    """``targets`` checked against ``variant`` and outputs of shape ``outputs_shape``, in
    the outputs' shape where the loss compares them entry by entry.

    - classification and segmentation (outputs ``(N, ..., C)``): integer labels of shape
      ``(N, ...)`` in ``[0, C)`` (no "ignore" label such as ``-1``: drop those examples);
    - ``"classif_binary_logits"``: targets of the outputs' shape in ``[0, 1]``;
    - ``"regression"``: targets of the outputs' shape.

    Binary and regression targets may also add or drop a trailing axis of size 1 (``(N,)``
    targets for ``(N, 1)`` outputs and vice versa: the same order of entries); any other
    shape is refused rather than reshaped (``(C, N)`` targets for ``(N, C)`` outputs would
    be scrambled). Dtypes and shapes are checked always, ranges where ``targets`` is
    concrete (not traced).

    Raises:
      ValueError: naming the targets' dtype, shape or range and what the variant needs.
    """
    if not isinstance(targets, (jax.Array, np.ndarray)):  # a list, a Python number
        targets = np.asarray(targets)
    shape = tuple(targets.shape)
    if variant in _LABEL_VARIANTS:
        classes = outputs_shape[-1]
        needed = tuple(outputs_shape[:-1])
        if not jnp.issubdtype(targets.dtype, jnp.integer):
            raise ValueError(
                f"variant {variant!r} needs integer class labels of shape {needed} for "
                f"outputs of shape {tuple(outputs_shape)}; got {targets.dtype} targets of "
                f"shape {shape}. For one-hot targets pass jnp.argmax(y, axis=-1); for soft "
                "targets pass a loss_fn of your own")
        if shape != needed:
            raise ValueError(
                f"variant {variant!r} needs class labels of shape {needed} (the outputs' "
                f"shape {tuple(outputs_shape)} without the class axis); got labels of shape "
                f"{shape}. Reshape them: y.reshape({needed})")
        _check_range(targets, 0, classes - 1, f"class labels must be in [0, {classes}) for "
                     f"{classes} classes (an 'ignore' label such as -1 is not supported: "
                     "drop those examples)")
        return targets
    if variant not in ("classif_binary_logits", "regression"):
        raise ValueError(f"no default loss for variant {variant!r}: pass loss_fn")
    outputs_shape = tuple(outputs_shape)
    if shape not in (outputs_shape, outputs_shape + (1,)) and shape + (1,) != outputs_shape:
        raise ValueError(
            f"variant {variant!r} needs targets of the outputs' shape {outputs_shape} (a "
            f"trailing axis of size 1 may be added or dropped); got targets of shape {shape}."
            " They are not reshaped: a (C, N) array for (N, C) outputs would be scrambled. "
            "Transpose or reshape them to the outputs' shape")
    if variant == "classif_binary_logits":
        _check_range(targets, 0, 1, "binary targets must be in [0, 1]")
    return targets.reshape(outputs_shape)


def _check_range(values: jax.Array, low: float, high: float, words: str) -> None:
    """``low <= values <= high`` where ``values`` is concrete (a traced array passes)."""
    if isinstance(values, jax.core.Tracer) or values.size == 0:
        return
    values = np.asarray(values)  # on the host: under a trace, jnp's min would be staged
    smallest, largest = values.min(), values.max()
    if not (low <= smallest and largest <= high):  # NaN fails too
        raise ValueError(f"{words}; got values from {smallest} to {largest}")


def _targets(batch):
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise ValueError("the loss needs labels: pass batch=(x, y)")
    return batch[1]


@dataclasses.dataclass(frozen=True)
class _PerExampleLoss:
    """``(params, batch) -> (N, 1)`` per-example losses (empirical Fisher); hashable."""

    apply_fn: Callable
    variant: str
    covariance: Any = None

    def __call__(self, params, batch):
        # outputs split over an explicit mesh axis (a last kernel sharded like FSDP's):
        # gathered, as the loss picks each example's target entry
        out, _ = gathered(self.apply_fn(params, data_lib.inputs_of(batch)))
        return per_example_loss(self.variant, out, _targets(batch), self.covariance)[:, None]

    def check_targets(self, params, data) -> Any:
        """:func:`check_targets` on whole batches, before a build that reads the loss
        example by example under a trace (where the labels' range cannot be read): every
        batch of one batch or a list of them, the first of another iterable. Returns
        ``data``, still yielding every batch."""
        if data_lib.is_single_batch(data) or isinstance(data, list):
            batches = list(data_lib.iter_batches(data))
        else:  # a one-shot iterator or a loader: read once, by the build
            first, data = data_lib.peek(data)
            batches = [first]
        for batch in batches:
            targets = _targets(batch)
            if not isinstance(targets, jax.core.Tracer):
                outputs = jax.eval_shape(self.apply_fn, params, data_lib.inputs_of(batch))
                check_targets(self.variant, getattr(outputs, "shape", ()), targets)
        return data


@dataclasses.dataclass(frozen=True)
class _MeanLoss(_PerExampleLoss):
    """``(params, batch) -> scalar`` mean negative log-likelihood of ``variant``."""

    def __call__(self, params, batch):
        return jnp.mean(super().__call__(params, batch))
