"""Entry points: Fisher information matrices and second moments of any function.

All builders compute :math:`M = \\frac1N\\sum_n J_n^\\top J_n` for the per-example Jacobian
``J_n`` of some per-example output vector, and store ``M`` in the requested
representation. ``N`` is the number of examples actually seen.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import data as data_lib
from jaxgeom._counter_rng import check_key
from jaxgeom._sharding import accepts_sharded_data
from jaxgeom._signature import abstract, signature
from jaxgeom.jacobian import Hashable
from jaxgeom.layers import LayerCollection, check_layer_collection
from jaxgeom.pmat.base import REGISTRY, PMatAbstract
from jaxgeom.variants import (
    BatchedFunction,
    CurvaturePropagationOutputs,
    FisherOutputs,
    MonteCarloFisherOutputs,
    check_one_array,
    check_outputs,
    check_variant,
    regression_whitener,
)


@accepts_sharded_data
def FIM(
    apply_fn: Callable,
    params: Any,
    data: Any,
    representation: type[PMatAbstract],
    *,
    variant: str = "classif_logits",
    covariance: Any = None,
    batch_size: int | None = None,
    layer_collection: LayerCollection | None = None,
    mode: str = "auto",
    **options: Any,
) -> PMatAbstract:
    """The exact Fisher information matrix of ``apply_fn`` over ``data``.

    .. math::  F = \\frac1N \\sum_n \\mathbb E_{y\\sim p(y|x_n)}
       [\\nabla_\\theta \\log p(y|x_n) \\nabla_\\theta \\log p(y|x_n)^\\top]
       = \\frac1N \\sum_n J_n^\\top H_n J_n,

    with the expectation over ``y`` taken in closed form through a square root of the
    output-space Fisher ``H_n`` (see :mod:`jaxgeom.variants`).

    Args:
      apply_fn: ``apply_fn(params, x) -> outputs``, batched: ``(N, C)`` for
        classification and regression, ``(N, ..., C)`` for segmentation.
      params: any pytree of arrays. Integer or boolean leaves (a step counter, a mask)
        are constants: their rows and columns are zero.
      data: one batch ``(x, y)`` / ``(x,)`` / ``x``, or an iterable of batches (list,
        generator, loader). ``y`` is not used.
      representation: a representation class, e.g. ``PMatDense``, ``PMatDiag``.
      variant: one of :data:`jaxgeom.variants.VARIANTS`.
      covariance: for ``"regression"``: the output covariance Σ (scalar, ``(C,)``
        diagonal or ``(C, C)``); identity by default.
      batch_size: process data in chunks of this many examples (peak memory: one chunk of
        per-example Jacobians, ``batch_size · K · d``); ``None``: one chunk per batch.
      layer_collection: the parameter layout; discovered from ``apply_fn`` by default
        (traced once per ``apply_fn`` and shapes and cached, like ``jax.jit``'s traces:
        pass a new function, or ``layer_collection``, if the same one changes its
        architecture).
      mode: ``"reverse"`` (one backward per output), ``"forward"`` (one forward per
        parameter) or ``"auto"`` (the cheaper).
      **options: passed to the representation's builder.

    Returns:
      The Fisher in ``representation``. Works inside ``jax.jit`` on a single batch.

    Example:
      >>> F = FIM(model.apply, variables, (x, y), PMatDiag, variant="classif_logits")
      >>> F.trace()
    """
    _refuse_peer_options(options, "FIM")
    data, whitener, layer_collection = _model_front_end(apply_fn, params, data, variant,
                                                        covariance, layer_collection)
    fn = FisherOutputs(Hashable(apply_fn), variant)
    return _build(
        fn, params, _inputs_only(data, representation), representation,
        layer_collection=layer_collection, batch_size=batch_size, mode=mode, aux=whitener,
        **options,
    )


#: the Monte-Carlo Fisher's estimators (:func:`FIM_MonteCarlo`): gradients of sampled
#: targets' log-likelihoods, or of random sign combinations of the exact Fisher's outputs
MONTE_CARLO_ESTIMATORS = ("targets", "curvature_propagation")


@accepts_sharded_data
def FIM_MonteCarlo(
    apply_fn: Callable,
    params: Any,
    data: Any,
    representation: type[PMatAbstract],
    *,
    key: jax.Array,
    variant: str = "classif_logits",
    trials: int = 1,
    estimator: str = "targets",
    covariance: Any = None,
    batch_size: int | None = None,
    layer_collection: LayerCollection | None = None,
    mode: str = "auto",
    **options: Any,
) -> PMatAbstract:
    """The Monte-Carlo Fisher: targets sampled from the model, ``trials`` per example.

    .. math::  \\hat F = \\frac1N \\sum_n \\frac1T \\sum_{t=1}^T
       \\nabla\\log p(\\hat y_{nt}|x_n)\\nabla\\log p(\\hat y_{nt}|x_n)^\\top,
       \\quad \\hat y_{nt} \\sim p(y|x_n),

    an unbiased estimate of :func:`FIM` with ``K = trials`` outputs per example (cheaper
    than the exact Fisher when ``trials < C - 1``). Example ``n`` (counted over all
    batches) samples from the Threefry hash of the counters ``(n, draw)`` under ``key``
    (:mod:`jaxgeom._counter_rng`), so the result does not depend on how the data are
    batched or chunked. Inside ``jax.shard_map`` each device counts its own examples from
    0: give each device its own key, ``jax.random.fold_in(key, jax.lax.axis_index(axis))``
    (docs/conventions.md, "Several devices").

    ``estimator="curvature_propagation"`` (Martens, Sutskever & Swersky 2012; kfac-jax's
    ``"fisher_curvature_prop"``) draws random signs instead of targets: per trial the
    gradient of ``rᵀz``, ``z`` the exact Fisher's ``K`` outputs (``Σₖ ∇zₖ∇zₖᵀ = JᵀHJ``,
    :func:`FIM`) and ``r ∈ {±1}ᴷ``; also unbiased (``E[rrᵀ] = I``), also one backward pass
    a trial, and exact for one output (``K = 1``: binary, two classes, one regression
    output), where sampled targets are not
    (:class:`~jaxgeom.variants.CurvaturePropagationOutputs`).

    Args are those of :func:`FIM`, plus ``key`` (one PRNG key: ``jax.random.key(seed)``
    or ``jax.random.PRNGKey(seed)``; a seed, ``None`` or a stack of keys is refused),
    ``trials`` and ``estimator`` (``"targets"``, the default, or
    ``"curvature_propagation"``).

    References:
      J. Martens, I. Sutskever, K. Swersky, `Estimating the Hessian by back-propagating
      curvature <https://arxiv.org/abs/1206.6464>`_, ICML 2012.
    """
    if isinstance(trials, (bool, np.bool_)) or int(trials) != trials or trials < 1:
        raise ValueError(f"trials must be a positive integer; got {trials!r}")
    if estimator not in MONTE_CARLO_ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; valid: {MONTE_CARLO_ESTIMATORS} "
                         "(sampled targets, random signs on the exact Fisher's outputs)")
    check_key(key, "FIM_MonteCarlo's key")
    _refuse_peer_options(options, "FIM_MonteCarlo")
    data, whitener, layer_collection = _model_front_end(apply_fn, params, data, variant,
                                                        covariance, layer_collection)
    outputs = (MonteCarloFisherOutputs if estimator == "targets"
               else CurvaturePropagationOutputs)
    fn = outputs(Hashable(apply_fn), variant, int(trials))
    return _build(
        fn, params, _inputs_only(data, representation), representation,
        layer_collection=layer_collection, batch_size=batch_size, mode=mode,
        aux=(key if isinstance(key, jax.Array) else jnp.asarray(key), whitener), **options,
    )


@accepts_sharded_data
def SecondMoment(
    fn: Callable,
    params: Any,
    data: Any,
    representation: type[PMatAbstract],
    *,
    batch_size: int | None = None,
    layer_collection: LayerCollection | None = None,
    mode: str = "auto",
    **options: Any,
) -> PMatAbstract:
    """The second moment :math:`M = \\frac1N \\sum_n J_n^\\top J_n` of any function.

    ``fn(params, batch) -> (N, K)`` is batched and must treat examples independently;
    ``J_n`` is the ``(K, d)`` Jacobian of row ``n``. Every Fisher is a special case;
    others include:

    - **empirical Fisher** (gradient second moment, "EF"): ``K = 1`` with the per-example
      loss, ``fn = lambda p, b: -log_softmax(apply_fn(p, b[0]))[arange(N), b[1]][:, None]``
      gives :math:`\\frac1N\\sum_n \\nabla\\ell_n\\nabla\\ell_n^\\top`;
    - **GGN of a custom loss**: ``fn`` returns :math:`L_n^\\top f(x_n)` for a square root
      :math:`L_nL_n^\\top` of the loss Hessian (held constant with ``stop_gradient``).

    ``batch`` is whatever ``data`` yields (both ``x`` and ``y``).
    """
    first, data = data_lib.peek(data)
    check_rows(fn, params, first)
    layer_collection = layers_for(fn, params, first, layer_collection)
    if isinstance(representation, type) and getattr(representation, "NEEDS_REPLAY", False):
        data = list(data_lib.iter_batches(data))
    return _build(
        BatchedFunction(Hashable(fn)), params, data, representation,
        layer_collection=layer_collection, batch_size=batch_size, mode=mode, aux=None,
        **options,
    )


# ----------------------------------------------------------------------------- helpers
def _build(fn, params, data, representation, **kwargs) -> PMatAbstract:
    if not (isinstance(representation, type) and issubclass(representation, PMatAbstract)):
        raise TypeError(
            f"representation must be a representation class such as "
            f"{', '.join(c.__name__ for c in REGISTRY)}; got {representation!r}"
        )
    return representation.from_jacobians(fn, params, data, **kwargs)


def check_rows(fn, params, batch) -> None:
    """Check that a batched ``fn(params, batch)`` returns one row per example, ``(N, K)``."""
    n = data_lib.num_examples(batch)
    out = _output_shape(fn, params, batch)
    check_one_array(out, "fn(params, batch)")
    if len(out.shape) != 2 or out.shape[0] != n:
        raise ValueError(
            f"fn(params, batch) must return an array of shape (N, K) = ({n}, K) for a batch "
            f"of {n} examples; got shape {out.shape}"
            + (f". {data_lib.SINGLE_EXAMPLE_HINT}" if out.shape[:1] != (n,) else "")
        )


#: NNGeometry's keyword arguments of ``FIM``/``FIM_MonteCarlo`` that jaxgeom has not:
#: what to do instead (they would reach the representation's builder, whose error would
#: name only the representation)
_PEER_OPTIONS = {
    "function": "the Fisher's outputs are apply_fn's; for the second moment of any other "
                "function (NNGeometry's function=, e.g. the empirical Fisher) use "
                "SecondMoment(fn, params, data, representation) with a batched "
                "fn(params, batch) -> (N, K)",
    "device": "JAX computes where the arrays are: place params and data with "
              "jax.device_put (or jax.default_device)",
    "verbose": "builds print nothing; time a build with jax.block_until_ready",
    "examples": "pass the data (one batch or an iterable of batches) as the third argument",
    "loader": "pass the data (one batch or an iterable of batches) as the third argument",
    "model": "pass apply_fn(params, x) and params (e.g. model.apply and "
             "variables['params'])",
}


def _refuse_peer_options(options: dict, who: str) -> None:
    """A ``TypeError`` saying what to do for an NNGeometry keyword jaxgeom does not take."""
    for name in options:
        if name in _PEER_OPTIONS:
            raise TypeError(f"{who} takes no {name}= (an NNGeometry argument): "
                            f"{_PEER_OPTIONS[name]}")


def _model_front_end(apply_fn, params, data, variant, covariance, layer_collection):
    """What :func:`FIM` and :func:`FIM_MonteCarlo` check and find before their build:
    ``data`` (still yielding its first batch), the variant's output whitener and the layer
    collection. The checks and the discovery depend on the signatures of ``params`` and of
    the inputs only (:func:`_model_facts`, cached): each is taken once a build."""
    check_variant(variant)
    if layer_collection is not None:
        check_layer_collection(layer_collection).check_params(params)
    first, data = data_lib.peek(data, require_examples=True)
    inputs = data_lib.inputs_of(first)
    data_lib.num_examples(inputs, "inputs x")  # on the leaves themselves: names Python lists
    try:
        out_shape, layers = _model_facts(Hashable(apply_fn), variant, signature(params),
                                         signature(inputs), layer_collection is None)
    except Exception as error:
        data_lib.explain_inputs(error, inputs)
        raise
    whitener = _whitener(variant, covariance, out_shape, params)
    return data, whitener, layer_collection or layers


@functools.lru_cache(maxsize=32)
def _model_facts(apply_fn: Hashable, variant: str, params_sig, inputs_sig, discover: bool):
    """The model's output shape, checked against ``variant``, and its layers when
    ``discover`` — from the signatures of the parameters and of a batch of inputs (errors
    are not cached: a bad batch is checked again at every call)."""
    n = data_lib.num_examples(abstract(inputs_sig), "inputs x")
    if n == 0:
        raise ValueError("the first batch contains no example")
    out = _traced(apply_fn, params_sig, inputs_sig, "output")
    check_one_array(out)
    check_outputs(variant, tuple(out.shape), n)
    return tuple(out.shape), _layers_of(apply_fn, params_sig, inputs_sig) if discover else None


def _whitener(variant, covariance, out_shape, params):
    if variant != "regression":
        if covariance is not None:
            raise ValueError(f"covariance is only used by variant 'regression', not {variant!r}")
        return None
    num_outputs = 1 if len(out_shape) == 1 else out_shape[1]
    dtype = LayerCollection.from_params(params).dtype
    return regression_whitener(covariance, num_outputs, dtype)


def layers_for(fn, params, args, layer_collection: LayerCollection | None, *,
               whole_batch: bool = False) -> LayerCollection:
    """``layer_collection`` checked against ``params``, or the layers discovered from
    ``fn(params, args)`` when it is ``None``: traced on one example of ``args``, or on all
    of them (``whole_batch``: a function whose examples interact, e.g. a pairwise loss)."""
    if layer_collection is None:
        return _layers(fn, params, args, whole_batch)
    check_layer_collection(layer_collection).check_params(params)
    return layer_collection


def _layers(fn, params, args, whole_batch: bool = False) -> LayerCollection:
    """The layers of ``fn(params, args)`` (traced once per function and signature)."""
    return _layers_of(Hashable(fn), signature(params), signature(args), whole_batch)


def _layers_of(fn: Hashable, params_sig, args_sig, whole_batch: bool = False) -> LayerCollection:
    # shapes only: slicing the data here would compile a slice per new batch shape
    treedef, leaves = args_sig
    if not whole_batch:
        args_sig = treedef, tuple(((1, *shape[1:]), dtype) for shape, dtype in leaves)
    return _traced(fn, params_sig, args_sig, "layers")


def _output_shape(fn, params, args):
    """``jax.eval_shape(fn, params, args)``, traced once per function and signature."""
    return _traced(Hashable(fn), signature(params), signature(args), "output")


@functools.lru_cache(maxsize=32)
def _traced(fn: Hashable, params: tuple, args: tuple, what: str):
    """The model's layers (``"layers"``) or output shape (``"output"``) from abstract
    ``params`` and ``args`` signatures: a build traces its model once per function and
    shapes, as ``jax.jit`` does (tracing costs milliseconds, more than a small model's
    whole Monte-Carlo build). The cache keeps the last 32 functions alive, with what they
    close over."""
    if what == "layers":
        return LayerCollection.from_model(fn.fn, abstract(params), abstract(args))
    return jax.eval_shape(fn.fn, abstract(params), abstract(args))


def _inputs_only(data, representation):
    """The inputs ``x`` of every batch; materialised when the representation replays data."""
    replays = isinstance(representation, type) and getattr(representation, "NEEDS_REPLAY", False)
    return data_lib.inputs_only(data, materialise=replays)
