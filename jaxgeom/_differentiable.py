"""Derivatives with respect to the floating-point leaves of the parameters.

A parameters pytree may hold integer or boolean leaves (a step counter, a mask) that the
model reads. They are constants: jaxgeom gives them a **zero derivative**, i.e. zero
columns in every Jacobian, zero rows and columns in every matrix, and zero entries in
every product, at their places in the flat order (whose vectors have the parameters'
common floating dtype: a flat vector, or a ``PVector`` made from one, holds such a leaf
as floating-point zeros). JAX itself refuses them (``jax.grad``/``jacrev``/``jacfwd``
raise; ``jax.jvp`` wants ``float0`` tangents and ``jax.vjp`` gives ``float0``
cotangents, which no arithmetic accepts).

:class:`FloatLeaves` is the one place where this is done, for every path that
differentiates the parameters (per-example Jacobians, the capture of layer gradients,
the matrix-free ``jvp``/``vjp`` products, Hessian-vector products): the function is
differentiated with respect to the floating leaves only, the others closed over, and
flat vectors are cut into, or assembled from, the floating leaves' pieces (zeros at the
others' places).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex

from jaxgeom.layers import concat_last


def calls_custom_vjp(jaxpr: Any) -> bool:
    """Whether a jaxpr (or one nested in it) calls a ``jax.custom_vjp`` function, which JAX
    differentiates in reverse mode only (``jax.jvp``/``jacfwd`` raise)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name.startswith("custom_vjp_call"):
            return True
        if any(calls_custom_vjp(getattr(sub, "jaxpr", sub))
               for sub in jex.jaxprs_in_params(eqn.params)):
            return True
    return False


def tangent_map(f: Callable, primals: Any, forward: bool = True) -> Callable[[Any], Any]:
    """``t ↦ J t``: the Jacobian of ``f`` at ``primals`` applied to a tangent (of the
    primals' structure). ``forward``: by ``jax.jvp`` (one forward pass per tangent, sharing
    nothing); otherwise — a function with a ``jax.custom_vjp`` inside, which JAX cannot
    differentiate in forward mode (:func:`calls_custom_vjp`) — as the transpose of its
    ``vjp`` (``u ↦ Jᵀu`` is linear: ``jax.linear_transpose`` of it is ``J``), one forward
    pass for all tangents and one transposed backward pass per tangent."""
    if forward:
        return lambda t: jax.jvp(f, (primals,), (t,))[1]
    out, vjp = jax.vjp(f, primals)
    transposed = jax.linear_transpose(vjp, out)
    return lambda t: transposed((t,))[0]


def is_differentiable(dtype: Any) -> bool:
    """Whether leaves of ``dtype`` are differentiated (floating point; complex too)."""
    return bool(jnp.issubdtype(dtype, jnp.inexact))


@dataclasses.dataclass(frozen=True, eq=False)
class FloatLeaves:
    """The parameters split into their floating-point leaves (``primals``, in leaf order:
    what is differentiated) and the others (closed over).

    Attributes:
      leaves: every leaf of the parameters, in leaf order.
      treedef: the parameters' pytree structure.
      indices: the positions of the floating leaves among ``leaves``.
    """

    leaves: list
    treedef: Any
    indices: tuple[int, ...]

    @classmethod
    def of(cls, params: Any) -> FloatLeaves:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        indices = tuple(i for i, x in enumerate(leaves) if is_differentiable(jnp.result_type(x)))
        return cls(leaves, treedef, indices)

    @property
    def primals(self) -> list:
        """The floating leaves (a list: a pytree for ``jax.jvp``/``vjp``/``grad``)."""
        return [self.leaves[i] for i in self.indices]

    @property
    def dtype(self) -> Any:
        """The floating leaves' common dtype (the default float if there is none): the
        dtype of the flat vectors :meth:`ravel` assembles."""
        dtypes = [jnp.result_type(self.leaves[i]) for i in self.indices]
        return jnp.result_type(*dtypes) if dtypes else jnp.result_type(float)

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(int(np.prod(np.shape(x), dtype=np.int64)) for x in self.leaves)

    def merge(self, primals: Sequence) -> Any:
        """The parameters with their floating leaves replaced by ``primals``."""
        leaves = list(self.leaves)
        for i, x in zip(self.indices, primals):
            leaves[i] = x
        return self.treedef.unflatten(leaves)

    def bind(self, f: Callable) -> Callable:
        """``g(primals) = f(params with primals)``: ``f`` of the parameters as a function of
        their floating leaves."""
        return lambda primals: f(self.merge(primals))

    def tangents(self, flat: jax.Array) -> list:
        """The floating leaves' pieces of a flat ``(..., d)`` vector (flat order of all the
        leaves), shaped ``(..., *leaf shape)`` and cast to each leaf's dtype; the other
        leaves' entries are dropped (their derivative is zero)."""
        lead = flat.shape[:-1]
        offsets = np.concatenate([[0], np.cumsum(self.sizes)]).astype(int)
        return [
            flat[..., offsets[i]:offsets[i + 1]].reshape(lead + np.shape(self.leaves[i]))
            .astype(jnp.result_type(self.leaves[i]))
            for i in self.indices
        ]

    def tangents_of(self, tree: Any) -> list:
        """The floating leaves' tangents from a params-shaped ``tree`` (flattened once),
        cast to each leaf's dtype; the other leaves' entries are dropped."""
        leaves = jax.tree_util.tree_leaves(tree)
        return [leaves[i].astype(jnp.result_type(self.leaves[i])) for i in self.indices]

    def ravel(self, pieces: Sequence, lead: tuple[int, ...], dtype: Any = None) -> jax.Array:
        """The flat ``(*lead, d)`` array (flat order of all the leaves) of the floating
        leaves' ``pieces`` (``(*lead, *leaf shape)`` each, in the order of ``primals``: a
        ``vjp``'s cotangents, a Jacobian's columns), zeros at the other leaves' places;
        in ``dtype`` (default: the pieces' common dtype, else :attr:`dtype`)."""
        pieces = list(pieces)
        if dtype is None:
            dtype = jnp.result_type(*pieces) if pieces else self.dtype
        lead = tuple(lead)
        by_leaf = dict(zip(self.indices, pieces))
        parts = [
            by_leaf[i].reshape(lead + (size,)).astype(dtype) if i in by_leaf
            else jnp.zeros(lead + (size,), dtype)
            for i, size in enumerate(self.sizes)
        ]
        return concat_last(parts) if parts else jnp.zeros(lead + (0,), dtype)
