"""Convolutions in the layout XLA:CPU's fast kernels take, wherever they are compiled.

XLA:CPU runs a convolution through its fast kernels (Eigen's, or YNNPACK's) only in the
canonical layout: input ``(batch, spatial…, feature)``, kernel ``(spatial…, in, out)``,
output ``(batch, spatial…, feature)``. At the top level of a program a compiler pass
transposes any other convolution into that layout; inside the body of a ``while`` loop or
a ``scan`` it does not (`jax#12868 <https://github.com/jax-ml/jax/issues/12868>`_), and
the convolution runs through a generic loop nest instead, 20–200× slower. The transposes
of a convolution that reverse mode makes — the kernel's gradient, ``f01b_i01o->01bf``,
and the input's, ``01oi`` — are never canonical, even for a model written in the
canonical layout. So a model's backward pass is fast in a top-level ``jit`` and crawls in
a loop: conjugate gradient under ``jit`` on a ``PMatImplicit`` of bench_cnn (a ``while``
loop of products) took 7.85 s an iteration instead of 0.25 s, a Diag build inside a user's
``lax.scan`` 7.9 s instead of 0.8 s.

:func:`canonical_convolutions` traces a function to a jaxpr and evaluates it with every
convolution of plain dimension numbers (no feature or batch grouping) rewritten as
``transpose → canonical convolution → transpose``: the same numbers, in the layout the
fast kernels take whether or not a loop surrounds it. The calls it meets (``jit``, closed
calls) are evaluated inline; the sub-jaxprs of other equations (``lax.map``/``scan`` and
``while`` bodies — the Hessian's loop of products, a model's own loops —, branches,
``checkpoint``) are rewritten in place. Top-level convolutions compile as before: the
transposes are the ones XLA's own pass would insert. Grouped convolutions
(``feature_group_count`` or ``batch_group_count`` above 1: depthwise layers and their
kernel gradients) are left as they are; XLA:CPU runs them slowly in loops too (a depthwise
kernel gradient ≈ 30×), and no transpose makes them canonical.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
from jax.extend import core as jex
from jax.extend.core import primitives as prims

from jaxgeom._discovery import bind, closed_body

#: call-like primitives whose body is evaluated inline (a call changes no numbers)
_INLINED = frozenset({prims.jit_p, prims.closed_call_p, prims.call_p})


def canonical_convolutions(fun: Callable) -> Callable:
    """``fun`` with its convolutions in XLA:CPU's canonical layout (see the module).

    The wrapper takes the same arguments (a ``jax.jit``'s static arguments pass through)
    and returns the same values; it traces ``fun`` once per call, so it belongs inside a
    ``jax.jit``, which calls it once per compilation. Cost at run time: the transposes of
    the non-canonical convolutions, which XLA fuses or would insert anyway at top level.
    """

    @functools.wraps(fun)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))
        traced = [i for i, leaf in enumerate(leaves) if isinstance(leaf, jax.core.Tracer)]

        def flat(*values):
            full = list(leaves)
            for i, value in zip(traced, values):
                full[i] = value
            call_args, call_kwargs = jax.tree_util.tree_unflatten(treedef, full)
            return fun(*call_args, **call_kwargs)

        values = [leaves[i] for i in traced]
        closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*values)
        outs = _evaluate(closed.jaxpr, closed.consts, values)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return wrapped


def _evaluate(jaxpr: jex.Jaxpr, consts: list, args: list) -> list:
    """Evaluate ``jaxpr`` as ``jax.core.eval_jaxpr`` does, with plain convolutions in the
    canonical layout: the bodies of ``jit`` and closed calls evaluated inline, the
    sub-jaxprs of other equations (loops, conditionals, ``checkpoint``, custom derivative
    rules' primal bodies) rewritten in place when they hold such a convolution."""
    env: dict = {}

    def read(var):
        return var.val if isinstance(var, jex.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        if _rewritable(eqn):
            outs = [_canonical_conv(*invals, **eqn.params)]
        elif eqn.primitive in _INLINED and (body := closed_body(eqn))[0] is not None:
            outs = _evaluate(*body, invals)
        else:
            outs = bind(eqn, invals, {name: _rewritten(v) for name, v in eqn.params.items()})
        env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]


def _rewritten(value: Any) -> Any:
    """An equation parameter with the convolutions of its sub-jaxprs rewritten: a
    ``ClosedJaxpr`` (a loop's body, a branch), a tuple of them, or an open ``Jaxpr`` without
    constants; anything else, or a sub-jaxpr without a convolution to rewrite, unchanged."""
    if type(value) is tuple and any(isinstance(v, (jex.ClosedJaxpr, jex.Jaxpr)) for v in value):
        return tuple(_rewritten(v) for v in value)  # ``cond``'s branches
    if isinstance(value, jex.ClosedJaxpr):
        if not _holds_rewritable(value.jaxpr):
            return value
        return _retraced(value.jaxpr, list(value.consts))
    if isinstance(value, jex.Jaxpr) and not value.constvars and _holds_rewritable(value):
        closed = _retraced(value, [])
        return value if closed.consts else closed.jaxpr
    return value


def _retraced(jaxpr: jex.Jaxpr, consts: list) -> jex.ClosedJaxpr:
    """``jaxpr`` evaluated by :func:`_evaluate` and traced again: the same signature (weak
    types included), its convolutions canonical."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype, weak_type=v.aval.weak_type)
             for v in jaxpr.invars]
    return jax.make_jaxpr(lambda *args: _evaluate(jaxpr, consts, list(args)))(*avals)


def _holds_rewritable(jaxpr: jex.Jaxpr) -> bool:
    """Whether ``jaxpr`` or one of its sub-jaxprs has a convolution to rewrite."""
    return any(_rewritable(eqn) or any(map(_holds_rewritable, jex.jaxprs_in_params(eqn.params)))
               for eqn in jaxpr.eqns)


def canonical_dimension_numbers(spatial: int) -> jax.lax.ConvDimensionNumbers:
    """The canonical layout of a convolution over ``spatial`` dimensions: ``NHWC``,
    ``HWIO``, ``NHWC`` (as dimension indices: batch, feature, then spatial)."""
    last = spatial + 1
    spatial_dims = tuple(range(1, last))
    return jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, last, *spatial_dims),
        rhs_spec=(last, spatial, *range(spatial)),
        out_spec=(0, last, *spatial_dims),
    )


def _rewritable(eqn: jex.JaxprEqn) -> bool:
    """Whether ``eqn`` is a convolution without feature or batch grouping, not already
    canonical."""
    if eqn.primitive is not prims.conv_general_dilated_p:
        return False
    params = eqn.params
    numbers = params["dimension_numbers"]
    spatial = len(numbers.lhs_spec) - 2
    return (params["feature_group_count"] == 1 and params["batch_group_count"] == 1
            and tuple(numbers) != tuple(canonical_dimension_numbers(spatial)))


def _canonical_conv(lhs: jax.Array, rhs: jax.Array, *, dimension_numbers, **params) -> jax.Array:
    """The convolution ``conv_general_dilated(lhs, rhs, dimension_numbers, **params)`` as
    ``transpose → canonical convolution → transpose``: the operands are permuted to
    ``(batch, spatial…, feature)`` and ``(spatial…, in, out)`` (spatial dimensions in the
    convolution's order, so the window parameters keep their meaning), the result back to
    the output layout."""
    lhs_spec, rhs_spec, out_spec = dimension_numbers
    spatial = len(lhs_spec) - 2
    lhs = jax.lax.transpose(lhs, (lhs_spec[0], *lhs_spec[2:], lhs_spec[1]))
    rhs = jax.lax.transpose(rhs, (*rhs_spec[2:], rhs_spec[1], rhs_spec[0]))
    out = prims.conv_general_dilated_p.bind(
        lhs, rhs, dimension_numbers=canonical_dimension_numbers(spatial), **params)
    # axis of the canonical result that lands at each position of the output layout
    source = {out_spec[0]: 0, out_spec[1]: spatial + 1}
    source.update({position: 1 + i for i, position in enumerate(out_spec[2:])})
    return jax.lax.transpose(out, tuple(source[p] for p in range(spatial + 2)))
