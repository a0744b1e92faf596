"""Fisher variants as output transforms.

Every Fisher is built from the per-example Jacobian of a *transformed output* ``z``:

.. math::  F = \\frac1N \\sum_n J_{z,n}^\\top J_{z,n},

with ``z`` chosen so that :math:`J_z^\\top J_z` is the Fisher of example ``n``:

- exact variants use a square root ``B`` of the output-space Fisher, :math:`z = B f`
  with ``B`` held constant (``stop_gradient``):

  - ``classif_logits`` (softmax over the last axis): the exact Cholesky factor of the
    multinomial covariance :math:`\\mathrm{diag}(p) - pp^\\top` (Tanabe & Sagae 1992),
    ``(C-1) x C``, so ``K = C - 1``. (kfac-jax uses the symmetric ``C x C`` root
    :math:`\\mathrm{diag}(\\sqrt p) - p\\sqrt p^\\top`; one more output for the same matrix.)
  - ``classif_logsoftmax``: the model outputs log-probabilities; same factor.
  - ``classif_binary_logits``: independent sigmoids, :math:`z = f\\sqrt{p(1-p)}`, ``K = C``.
  - ``regression``: Gaussian likelihood with covariance :math:`\\Sigma = LL^\\top`
    (identity by default), :math:`z = L^{-1} f` so :math:`J_z^\\top J_z = J^\\top\\Sigma^{-1}J`.
  - ``segmentation_logits``: per-position softmax over the last axis of ``(..., C)``
    outputs; the Fisher of the product likelihood is the sum over positions, ``K = P (C-1)``.

- Monte-Carlo variants sample :math:`\\hat y \\sim p(y|x)` with an explicit key and use
  :math:`z_t = \\log p(\\hat y_t | x) / \\sqrt{T}` for ``T`` trials (segmentation: the sum
  over positions; regression: :math:`z_t = \\xi_t^\\top L^{-1} f/\\sqrt T`, :math:`\\xi \\sim
  N(0, I)`, whose expectation is :math:`J^\\top\\Sigma^{-1}J` — not NNGeometry's
  :math:`\\sigma^2 J^\\top J`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._counter_rng import draw_key, normal, rademacher, uniform
from jaxgeom.data import SINGLE_EXAMPLE_HINT

VARIANTS = (
    "classif_logits",
    "classif_binary_logits",
    "classif_logsoftmax",
    "regression",
    "segmentation_logits",
)


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; valid variants: {', '.join(VARIANTS)}")


# ----------------------------------------------------------------------------- factors
def softmax_cholesky_outputs(logits: jax.Array) -> jax.Array:
    """``B @ logits`` with ``B`` the ``(C-1) x C`` Cholesky factor of ``diag(p) - p pᵀ``.

    ``p = softmax(logits)`` is held constant. Row ``i`` of ``B`` is
    :math:`\\sqrt{d_i}\\,(e_i - \\mathbb 1_{j>i} p_j / q_i)` with :math:`q_i = \\sum_{j>i}
    p_j` and :math:`d_i = p_i q_i / (p_i + q_i)`, so that :math:`B^\\top B = \\mathrm{diag}(p)
    - pp^\\top` exactly (Tanabe & Sagae 1992).
    """
    p = jax.lax.stop_gradient(jax.nn.softmax(logits))
    # q_i = Σ_{j>i} p_j and Σ_{j>i} p_j x_j (i = 0..C-2) as products with the strictly
    # lower-triangular ones: XLA:CPU ran the two reversed cumsums as reduce-windows with
    # reversing pads, ~0.2 ms per chunk of 256 examples on bench_small. Two products, not
    # one of the stacked rows: the Jacobian's backward pass through the stack computed the
    # cotangent of p's row too (held constant) and dropped it, twice the work of the
    # product's backward (bench_small exact KFAC build 4.99 → 4.74 ms)
    below = jnp.tril(jnp.ones((p.shape[-1], p.shape[-1] - 1), p.dtype), -1)
    q = p @ below
    weighted_tail = (p * logits) @ below
    tiny = jnp.finfo(p.dtype).tiny
    centred = logits[:-1] - weighted_tail / jnp.maximum(q, tiny)
    # p_i (q_i / (p_i + q_i)), not (p_i q_i) / (p_i + q_i): the product of two small
    # probabilities underflows (float32: both below ≈ 1e-19, logits 45 apart) where d does not
    d = p[:-1] * (q / jnp.maximum(p[:-1] + q, tiny))
    return centred * jnp.sqrt(d)


#: classes up to which the CDF of a categorical is one product with triangular ones (C² per
#: row), beyond which it is a cumsum (C per row, but a reduce-window on XLA:CPU)
_TRIANGULAR_CDF_MAX_CLASSES = 256


def sample_categorical(key: jax.Array, index: jax.Array, logits: jax.Array,
                       shape: tuple[int, ...]) -> jax.Array:
    """Draws ``y ~ softmax(logits)`` over the last axis for example ``index`` by inversion:
    ``y = #{c : P(c) ≤ u}`` with one uniform ``u`` per draw and ``P`` the cumulative
    probabilities.

    ``key``: a draw key (:func:`jaxgeom._counter_rng.draw_key`); ``logits``: ``(..., C)``;
    ``shape``: ``(T, ...)``, the draws for ``T`` trials. One uniform per draw where
    ``jax.random.categorical``'s Gumbel-max takes ``C``: on a chunk of 256 examples of 10
    classes, XLA:CPU ran the draws in ~0.15 ms instead of ~0.3 ms.
    """
    p = jax.nn.softmax(logits, axis=-1)
    return inverse_cdf(p, uniform(key, index, shape, p.dtype))


def inverse_cdf(p: jax.Array, u: jax.Array) -> jax.Array:
    """The class ``k`` with ``P(k-1) ≤ u·P(C-1) < P(k)`` for probabilities ``p`` ``(..., C)``
    and uniforms ``u`` in ``[0, 1)`` (shape ``(T, ...)``); ``P`` the cumulative sums.

    ``u`` is scaled by ``P(C-1)``, which rounding may leave below 1, so the class drawn
    always has ``p_k > 0`` (never one masked with a ``-inf`` logit).
    """
    classes = p.shape[-1]
    if classes <= _TRIANGULAR_CDF_MAX_CLASSES:
        cdf = p @ jnp.triu(jnp.ones((classes, classes), p.dtype))
    else:
        cdf = jnp.cumsum(p, axis=-1)
    u = u * cdf[..., -1]
    return jnp.minimum(jnp.sum(cdf <= u[..., None], axis=-1), classes - 1)


def binary_outputs(logits: jax.Array) -> jax.Array:
    """``f·√(σ(f) σ(−f))`` per logit ``f`` (the square root held constant), with
    ``√(σ(f) σ(−f)) = 1 / (2 cosh(f/2))``: ``σ(f)(1 − σ(f))`` lost ``1 − σ(f)`` to rounding
    for ``f`` above ≈ 17 in float32 (≈ 37 in float64), a zero Fisher where ``f`` below
    ``−17`` gave the right one."""
    root = jax.lax.stop_gradient(0.5 / jnp.cosh(logits / 2))
    return jnp.ravel(logits * root)


def regression_whitener(covariance: Any, num_outputs: int, dtype: Any) -> jax.Array:
    """``L⁻¹`` for ``Σ = LLᵀ``: ``covariance`` may be None (identity), a scalar σ², a
    ``(C,)`` diagonal or a ``(C, C)`` matrix.

    A covariance that is not traced (a NumPy array, or a JAX array, also one a ``jit``
    closes over) is checked on the host whether or not the call is traced: finite, positive
    definite and, as a matrix, symmetric (a ``ValueError`` naming the fix)."""
    if covariance is None:
        return jnp.eye(num_outputs, dtype=dtype)
    traced = any(isinstance(leaf, jax.core.Tracer)
                 for leaf in jax.tree_util.tree_leaves(covariance))  # also in a list
    if traced:
        covariance = jnp.asarray(covariance)
    shape = tuple(np.shape(covariance))
    if shape not in ((), (num_outputs,), (num_outputs, num_outputs)):
        raise ValueError(
            f"covariance must be a scalar, a ({num_outputs},) diagonal or a ({num_outputs}, "
            f"{num_outputs}) matrix for {num_outputs} regression outputs; got shape {shape}")
    if not traced:
        _check_covariance(np.asarray(covariance, np.float64), covariance)
    cov = jnp.asarray(covariance, dtype)
    if cov.ndim == 0:
        whitener = jnp.eye(num_outputs, dtype=dtype) / jnp.sqrt(cov)
    elif cov.ndim == 1:
        whitener = jnp.diag(1 / jnp.sqrt(cov))
    else:
        chol = jnp.linalg.cholesky(cov)
        eye = jnp.eye(num_outputs, dtype=dtype)
        whitener = jax.scipy.linalg.solve_triangular(chol, eye, lower=True)
    if not isinstance(whitener, jax.core.Tracer) and not np.all(np.isfinite(whitener)):
        # positive definite in float64, not in the parameters' dtype
        raise ValueError(
            f"covariance is not positive definite in {np.dtype(dtype).name} (its Cholesky "
            f"factor is not finite): scale or regularise it; got {covariance!r}")
    return whitener


def _check_covariance(host: np.ndarray, covariance: Any) -> None:
    """Refuse a concrete covariance that is not a finite symmetric positive definite one:
    Cholesky reads one triangle only, so a factor ``L`` passed for ``Σ = LLᵀ`` would be
    taken for another covariance without a word; an infinite variance whitens to zero (a
    zero Fisher); a non-positive one has no ``L⁻¹`` (NaN, reported as the model's)."""
    if host.ndim == 2 and not np.allclose(host, host.T):
        raise ValueError(
            "covariance must be symmetric (Σ itself, not a factor L of Σ = LLᵀ: pass "
            f"L @ L.T); got |Σ − Σᵀ| up to {float(np.abs(host - host.T).max()):.3g}")
    if host.ndim == 2:
        positive = np.all(np.isfinite(host)) and np.linalg.eigvalsh(host)[0] > 0
    else:
        positive = np.all(np.isfinite(host)) and np.all(host > 0)
    if not positive:
        raise ValueError(
            "covariance must be positive definite and finite (a positive scalar, positive "
            f"variances, or a symmetric positive definite matrix); got {covariance!r}")


# ----------------------------------------------------------------------------- checks
def check_one_array(outputs: Any, what: str = "apply_fn") -> None:
    """Check that ``what`` returned one array (or its abstract value), not a pytree such as
    ``(outputs, aux)``."""
    if not hasattr(outputs, "shape"):
        raise ValueError(
            f"{what} must return one array of outputs; got "
            f"{jax.tree_util.tree_structure(outputs)}. For a function that returns "
            "(outputs, aux) (e.g. Flax's apply with mutable=...), pass one that returns the "
            "outputs alone: lambda p, x: f(p, x)[0]")


def check_outputs(variant: str, shape: tuple[int, ...], n: int) -> None:
    """Check that batched model outputs of ``shape`` fit ``variant`` for ``n`` examples."""
    if not shape or shape[0] != n:
        raise ValueError(
            f"apply_fn returned outputs of shape {shape} for a batch of {n} examples; "
            f"outputs must have the examples on their leading axis. {SINGLE_EXAMPLE_HINT}"
        )
    ndim = len(shape)
    if variant in ("classif_logits", "classif_logsoftmax"):
        if ndim != 2 or shape[1] < 2:
            raise ValueError(
                f"variant {variant!r} needs outputs of shape (N, C) with C >= 2 classes; got "
                f"{shape}. Use 'classif_binary_logits' for one logit per example and "
                "'segmentation_logits' for (N, ..., C) outputs."
            )
    elif variant == "segmentation_logits":
        if ndim < 3 or shape[-1] < 2:
            raise ValueError(
                f"variant 'segmentation_logits' needs outputs of shape (N, ..., C) with at "
                f"least one position axis and C >= 2 classes (classes last); got {shape}"
            )
    elif variant in ("classif_binary_logits", "regression") and ndim > 2:
        raise ValueError(
            f"variant {variant!r} needs outputs of shape (N,) or (N, C); got {shape}. "
            "Reshape the outputs in apply_fn."
        )


# ----------------------------------------------------------------------------- transforms
def _one(x: Any) -> Any:
    return jax.tree_util.tree_map(lambda a: a[None], x)


@dataclasses.dataclass(frozen=True)
class FisherOutputs:
    """Per-example transformed outputs of ``apply_fn`` for the exact Fisher.

    ``aux`` is the regression whitener ``L⁻¹`` (``None`` for the other variants).
    """

    apply_fn: Callable
    variant: str

    #: one ``(K,)`` vector per example by construction, given outputs that passed
    #: :func:`check_outputs` (the builders need not trace it again to check).
    VECTOR_OUTPUTS: ClassVar[bool] = True

    def __call__(self, params, x, index, aux):
        del index
        return self.of_outputs(self.apply_fn(params, _one(x))[0], aux)

    def of_outputs(self, out: jax.Array, aux: Any) -> jax.Array:
        """The ``(K,)`` transformed outputs of one example's model outputs ``out``."""
        if self.variant in ("classif_logits", "classif_logsoftmax"):
            return softmax_cholesky_outputs(out)
        if self.variant == "segmentation_logits":
            flat = out.reshape(-1, out.shape[-1])
            return jax.vmap(softmax_cholesky_outputs)(flat).ravel()
        if self.variant == "classif_binary_logits":
            return binary_outputs(out)
        return aux @ jnp.ravel(out)  # regression

    def of_batch(self, params: Any, x: Any, aux: Any) -> jax.Array:
        """``(N, K)``: the transformed outputs of a batch from one batched call of
        ``apply_fn`` (the call a training step's loss makes, which XLA can then share; the
        builders replay the model example by example instead)."""
        return jax.vmap(lambda out: self.of_outputs(out, aux))(self.apply_fn(params, x))


@dataclasses.dataclass(frozen=True)
class _RandomTrialOutputs:
    """Per-example outputs of ``trials`` random draws, ``(trials,)``, whose second moment
    is in expectation the example's exact Fisher. ``aux = (key, whitener)``; draw ``j`` of
    example ``index`` is the counter-based hash of ``(index, j)``
    (:mod:`jaxgeom._counter_rng`), so the draws do not depend on batching."""

    apply_fn: Callable
    variant: str
    trials: int

    VECTOR_OUTPUTS: ClassVar[bool] = True  # (trials,) per example


@dataclasses.dataclass(frozen=True)
class MonteCarloFisherOutputs(_RandomTrialOutputs):
    """Per-example scaled log-likelihoods of sampled targets, ``(trials,)``."""

    def __call__(self, params, x, index, aux):
        key, whitener = aux
        key = draw_key(key)
        out = self.apply_fn(params, _one(x))[0]
        scale = 1 / jnp.sqrt(jnp.asarray(self.trials, out.dtype))
        fixed = jax.lax.stop_gradient(out)
        if self.variant in ("classif_logits", "classif_logsoftmax", "segmentation_logits"):
            logp = jax.nn.log_softmax(out, axis=-1)
            y = sample_categorical(key, index, fixed, (self.trials,) + out.shape[:-1])
            picked = jnp.take_along_axis(logp[None], y[..., None], axis=-1)[..., 0]
            return scale * picked.reshape(self.trials, -1).sum(axis=1)
        if self.variant == "classif_binary_logits":
            y = uniform(key, index, (self.trials,) + out.shape, out.dtype) < jax.nn.sigmoid(fixed)
            logp = jnp.where(y, jax.nn.log_sigmoid(out), jax.nn.log_sigmoid(-out))
            return scale * logp.reshape(self.trials, -1).sum(axis=1)
        xi = normal(key, index, (self.trials, whitener.shape[0]), out.dtype)  # regression
        return scale * xi @ (whitener @ jnp.ravel(out))


@dataclasses.dataclass(frozen=True)
class CurvaturePropagationOutputs(_RandomTrialOutputs):
    """Per-example Rademacher combinations of the exact Fisher's outputs, ``(trials,)``:
    curvature propagation (Martens, Sutskever & Swersky 2012; kfac-jax's
    ``"fisher_curvature_prop"``).

    With ``z`` the ``K`` outputs of :class:`FisherOutputs` (``Σₖ ∇zₖ∇zₖᵀ = JᵀHJ``, the
    example's exact Fisher) and signs ``r ∈ {±1}ᴷ`` (``E[rrᵀ] = I``), ``∇(rᵀz)∇(rᵀz)ᵀ``
    has mean ``JᵀHJ``: each trial one backward pass whatever ``K``, and exact when
    ``K = 1`` (binary, two classes, one regression output).
    """

    def __call__(self, params, x, index, aux):
        key, whitener = aux
        z = FisherOutputs(self.apply_fn, self.variant)(params, x, index, whitener)
        signs = rademacher(draw_key(key), index, (self.trials, z.shape[0]), z.dtype)
        return signs @ z / jnp.sqrt(jnp.asarray(self.trials, z.dtype))


@dataclasses.dataclass(frozen=True)
class BatchedFunction:
    """Adapt a batched ``fn(params, batch) -> (N, K)`` to the per-example protocol."""

    fn: Callable

    VECTOR_OUTPUTS: ClassVar[bool] = True  # row 0 of an (N, K) array, checked when traced

    def __call__(self, params, example, index, aux):
        del index, aux
        out = self.fn(params, _one(example))
        if out.ndim != 2 or out.shape[0] != 1:
            raise ValueError(
                f"fn(params, batch) must return an array of shape (N, K); for a batch of one "
                f"example it returned shape {out.shape}"
            )
        return out[0]
