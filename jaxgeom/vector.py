"""Vectors in parameter space.

:class:`PVector` wraps a params-shaped pytree and gives it vector-space arithmetic.
Every jaxgeom method that takes a vector accepts a ``PVector``, a raw params-shaped
pytree, or a flat ``(d,)`` array in the flat order, and answers in the same form.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._differentiable import FloatLeaves, is_differentiable
from jaxgeom._dispatch import compiled_when_eager
from jaxgeom._serialization import register_dataclass
from jaxgeom._sharding import gathered
from jaxgeom.layers import LayerCollection, path_to_str, ravel_tree
from jaxgeom.scaling import ArrayValued, ScalarMultiples


@register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class PVector(ScalarMultiples, ArrayValued):
    """A vector in parameter space, stored as a params-shaped pytree.

    Supports ``+``, ``-``, unary ``-``, scalar ``*`` and ``/``, elementwise ``*``, ``/``
    (between two ``PVector`` objects) and ``**``, ``dot``/``@`` (inner product over all leaves)
    and ``norm``.

    Example:
      >>> v = PVector({"w": jnp.ones(3), "b": jnp.zeros(1)})
      >>> float(v.dot(v))
      3.0
    """

    tree: Any

    ARRAY_OPERAND_FIX: ClassVar[str] = (
        "Make the array a PVector first: PVector.from_flat(params, array) for a flat (d,) "
        "array, PVector(tree) for a params-shaped pytree (or compute on v.to_flat())")

    # --------------------------------------------------------------- conversions
    @classmethod
    def from_flat(cls, params: Any, flat: jax.Array) -> PVector:
        """The vector whose flat form (flat order of ``params``) is ``flat`` (shape ``(d,)``).

        ``params``: the parameters, or their :class:`~jaxgeom.layers.LayerCollection` (a
        matrix's ``layer_collection``)."""
        layout = (params if isinstance(params, LayerCollection)
                  else LayerCollection.from_params(params))
        if jnp.shape(flat) != (layout.numel(),):
            raise ValueError(
                f"flat vector has shape {jnp.shape(flat)}, expected ({layout.numel()},)"
            )
        return cls(layout.from_flat(jnp.asarray(flat)))

    @compiled_when_eager
    def to_flat(self) -> jax.Array:
        """The ``(d,)`` flat form, in the order of ``ravel_pytree(params)``."""
        return ravel_tree(self.tree)

    def size(self) -> int:
        return sum(int(np.size(x)) for x in jax.tree_util.tree_leaves(self.tree))

    def check_restored(self, target: PVector) -> None:
        """Refuse a vector restored (``flax.serialization.from_state_dict``/``from_bytes``)
        from the state of other parameters: Flax takes the state's leaf shapes as they are
        (and drops the state's extra keys), which gave a vector of another model."""
        mine = jax.tree_util.tree_flatten_with_path(self.tree)[0]
        for (path, x), want in zip(mine, jax.tree_util.tree_leaves(target.tree)):
            if np.shape(x) != np.shape(want):
                raise ValueError(
                    f"the restored PVector's leaf {path_to_str(path)!r} has shape "
                    f"{np.shape(x)}, but the target's has shape {np.shape(want)}: the state "
                    "is of other parameters. Restore into a PVector shaped like the saved one")

    # --------------------------------------------------------------- algebra
    @compiled_when_eager
    def _elementwise(self, other: PVector, op: Callable) -> PVector:
        """``op`` (``jnp.add``, ``jnp.multiply``, …) leaf by leaf: one compiled call when
        eager (``op`` is static)."""
        return PVector(jax.tree_util.tree_map(op, self.tree, other.tree))

    def __add__(self, other: Any) -> PVector:
        if not isinstance(other, PVector):
            return self._array_operand(other, "+")
        self._check_matches(other, "+")
        return self._elementwise(other, jnp.add)

    def __radd__(self, other: Any) -> PVector:
        # ``sum(vectors)`` starts from the integer 0
        if isinstance(other, int) and not isinstance(other, bool) and other == 0:
            return self
        return super().__radd__(other)

    def __sub__(self, other: Any) -> PVector:
        if not isinstance(other, PVector):
            return self._array_operand(other, "-")
        self._check_matches(other, "-")
        return self._elementwise(other, jnp.subtract)

    def _check_matches(self, other: PVector, op: str) -> None:
        """Refuse ``self op other`` between vectors of other parameters: another pytree
        structure (JAX's tree_map error named neither leaf), or a leaf whose shape differs
        other than by leading (stacking) axes — e.g. ``(3,)`` and ``(1,)``, which
        broadcast to a wrong vector without a word."""
        # plain flattening on the way (an eager ``v + w`` runs this at every call); the
        # paths only for the message
        mine, treedef = jax.tree_util.tree_flatten(self.tree)
        theirs, other_def = jax.tree_util.tree_flatten(other.tree)
        if other_def != treedef:
            paths = _paths(self.tree)
            other_paths = _paths(other.tree)
            missing = [p for p in paths if p not in other_paths]
            extra = [p for p in other_paths if p not in paths]
            detail = "; ".join(
                [f"leaves only on the left {missing}"] * bool(missing)
                + [f"leaves only on the right {extra}"] * bool(extra)) or (
                f"structure {other_def} instead of {treedef}")
            raise ValueError(
                f"PVector {op} PVector: the vectors are shaped like different parameters "
                f"({detail}). Build both from the same params (PVector.from_flat(params, "
                "flat) converts a flat vector)")
        for i, (x, y) in enumerate(zip(mine, theirs)):
            a, b = np.shape(x), np.shape(y)
            n = min(len(a), len(b))
            if a[len(a) - n:] != b[len(b) - n:]:
                raise ValueError(
                    f"PVector {op} PVector: the leaf {_paths(self.tree)[i]!r} has shape "
                    f"{a} on the left and {b} on the right. Build both from the same "
                    "params (PVector.from_flat(params, flat) converts a flat vector)")

    @compiled_when_eager
    def _scale(self, scalar: Any) -> PVector:
        return PVector(jax.tree_util.tree_map(lambda x: x * scalar, self.tree))

    def __mul__(self, other: Any) -> PVector:
        """``s * v`` for a scalar ``s``; ``u * w``, the elementwise (Hadamard) product
        ``(u ⊙ w)ᵢ = uᵢ wᵢ`` for a ``PVector`` ``w`` of the same parameters (checked as
        ``+``): OBD saliencies ``½ diag(F) ⊙ θ ⊙ θ``, a pruning mask ``θ ⊙ m``."""
        if isinstance(other, PVector):
            self._check_matches(other, "*")
            return self._elementwise(other, jnp.multiply)
        return super().__mul__(other)

    def __truediv__(self, other: Any) -> PVector:
        """``v / s`` for a scalar ``s``; ``u / w`` elementwise, ``uᵢ / wᵢ`` (a diagonal
        preconditioner ``g ⊘ (diag(F) + λ)``), for a ``PVector`` ``w`` of the same
        parameters."""
        if isinstance(other, PVector):
            self._check_matches(other, "/")
            return self._elementwise(other, jnp.divide)
        return super().__truediv__(other)

    def __pow__(self, exponent: Any) -> PVector:
        return PVector(jax.tree_util.tree_map(lambda x: x**exponent, self.tree))

    @compiled_when_eager
    def dot(self, other: Any) -> jax.Array:
        """Inner product ``Σ_leaves Σ x·y`` with another ``PVector``, a params-shaped pytree
        or a flat ``(d,)`` vector (checked: a leaf of another shape is named by its path)."""
        other = other.tree if isinstance(other, PVector) else other
        leaves, treedef = jax.tree_util.tree_flatten(self.tree)
        others, other_def = jax.tree_util.tree_flatten(other)
        if other_def != treedef or any(np.shape(x) != np.shape(y)
                                       for x, y in zip(leaves, others)):
            flat, _ = as_flat(other, LayerCollection.from_params(self.tree), "other vector")
            return jnp.vdot(self.to_flat(), flat)  # a flat vector; else as_flat raised
        return sum(jnp.vdot(x, y) for x, y in zip(leaves, others))

    def __matmul__(self, other: Any) -> jax.Array:
        if isinstance(other, PVector):
            return self.dot(other)
        return NotImplemented

    def norm(self, p: float = 2) -> jax.Array:
        """The ``p``-norm of the flat vector (``p = inf`` for the max-abs norm).

        ``p`` is a number (Python, NumPy or a concrete JAX scalar), fixed when compiled."""
        return _flat_norm(self.tree, static_order(p))


def static_order(p: Any) -> Any:
    """A norm's order as a hashable Python number (from a NumPy or concrete JAX scalar)."""
    if isinstance(p, (str, type(None), int, float)):
        return p
    if isinstance(p, jax.core.Tracer):
        raise TypeError(
            "a norm's order must be known when compiling: pass a Python number, not a "
            "traced value"
        )
    if np.ndim(p) != 0:
        raise ValueError(f"a norm's order must be a scalar; got shape {np.shape(p)}")
    value = np.asarray(p).item()
    return int(value) if float(value).is_integer() else value


@functools.partial(jax.jit, static_argnums=1)
def _flat_norm(tree: Any, p: float) -> jax.Array:
    return jnp.linalg.norm(ravel_tree(tree), ord=p)


def random_pvector(key: jax.Array, params: Any, dtype: Any = None) -> PVector:
    """A standard normal vector shaped like ``params`` (dtype: the leaves', or ``dtype``).

    An integer or boolean leaf of ``params`` (a constant: its derivative is zero) gets
    entries in the floating leaves' common dtype, as in a ``PVector`` made from a flat
    vector (:meth:`PVector.from_flat`)."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    floating = FloatLeaves.of(params).dtype
    new = [
        jax.random.normal(k, jnp.shape(x), dtype or (
            jnp.result_type(x) if is_differentiable(jnp.result_type(x)) else floating))
        for k, x in zip(keys, leaves)
    ]
    return PVector(jax.tree_util.tree_unflatten(treedef, new))


# ----------------------------------------------------------------------------- I/O
def as_flat(v: Any, layout: LayerCollection, what: str = "vector") -> tuple[jax.Array, Callable]:
    """Flatten any accepted vector form; return ``(flat, wrap)`` where ``wrap`` restores it.

    Accepted forms: :class:`PVector`, params-shaped pytree, flat ``(d,)`` array.
    Mismatched structures or shapes raise a ``ValueError`` that names the leaf path.
    Leaves sharded over explicit mesh axes are gathered first, and ``wrap`` puts its result
    back on their shardings (:func:`jaxgeom._sharding.gathered`).
    """
    v, restore = gathered(v)
    flat, wrap = _as_flat(v, layout, what)
    return flat, lambda result: restore(wrap(result))


def check_real(v: Any, what: str = "vector") -> None:
    """Refuse a complex vector: the matrices are real symmetric, and their products,
    quadratic forms and solves are defined on real vectors (the representations would
    answer ``vᵀMv``, ``vᴴMv`` or drop the imaginary part, each its own way)."""
    leaves = jax.tree_util.tree_leaves(v.tree if isinstance(v, PVector) else v)
    if any(getattr(getattr(leaf, "dtype", None), "kind", "") == "c" for leaf in leaves):
        raise TypeError(
            f"a complex {what}: jaxgeom's matrices act on real vectors. Apply them to the "
            "real and imaginary parts (M.mv(v.real) + 1j * M.mv(v.imag); vᴴMv = "
            "M.vTMv(v.real) + M.vTMv(v.imag))")


def _as_flat(v: Any, layout: LayerCollection, what: str) -> tuple[jax.Array, Callable]:
    check_real(v, what)
    d = layout.numel()
    if isinstance(v, PVector):
        layout.check_tree(v.tree, what)
        return _ravel(v.tree), lambda flat: PVector(_unravel(layout, flat))
    if _is_array(v) and jax.tree_util.tree_structure(v) != layout.treedef:
        if jnp.shape(v) != (d,):
            stack = (jnp.ndim(v) >= 2 and jnp.shape(v)[-1] == d)
            raise ValueError(
                f"a flat {what} must have shape ({d},) (the number of parameters); "
                f"got shape {jnp.shape(v)}" + (
                    ". For a stack of flat vectors use mmap, mapTMmap(rows, "
                    "reduction='diag') or solve, which take (..., d), or jax.vmap"
                    if stack else "")
            )
        return jnp.asarray(v), lambda flat: flat
    if _is_array(v) and jnp.shape(v) == (d,) and len(layout.shapes) == 1:
        # params is itself a single array, and v its flat form: answered flat too
        return jnp.asarray(v), lambda flat: flat
    layout.check_tree(v, what)
    return _ravel(v), functools.partial(_unravel, layout)


def product_dtype(vector_dtype: Any, computed_dtype: Any) -> Any:
    """The dtype of a matrix-free product's result: the vector's when it is floating, else
    that of the computation (an integer or boolean vector's product is not truncated)."""
    return vector_dtype if jnp.issubdtype(vector_dtype, jnp.inexact) else computed_dtype


# One compiled call each when called eagerly (the operations of ``PMatImplicit``, whose
# chunk loops stay eager), where the leaves' raveling and concatenation, or slicing, were
# one dispatch apiece; inside a trace they are inlined.
_ravel = jax.jit(ravel_tree)
_unravel = jax.jit(LayerCollection.from_flat, static_argnums=0)


def as_tree(v: Any, layout: LayerCollection,
            what: str = "vector") -> tuple[Any, Callable] | tuple[None, None]:
    """``(params-shaped tree, wrap)`` for a :class:`PVector` or a params pytree, which
    ``wrap`` restores (sharded leaves gathered as in :func:`as_flat`); ``(None, None)`` for
    a flat vector."""
    check_real(v, what)
    if isinstance(v, PVector):
        layout.check_tree(v.tree, what)
        tree, restore = gathered(v.tree)
        return tree, lambda result: PVector(restore(result))
    if _is_array(v) and (jax.tree_util.tree_structure(v) != layout.treedef
                         or len(layout.shapes) == 1):
        return None, None
    layout.check_tree(v, what)
    return gathered(v)


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def as_rows(rows: Any, layout: LayerCollection, what: str = "map") -> jax.Array:
    """A stack of flat vectors ``(..., d)`` from an array or anything with ``to_dense()``
    (e.g. a ``PFMapDense``, giving ``(outputs, examples, d)``)."""
    if hasattr(rows, "to_dense") and not _is_array(rows):
        rows = rows.to_dense()
    if isinstance(rows, (PVector, Mapping)) or (
            not _is_array(rows) and jax.tree_util.tree_structure(rows) == layout.treedef):
        # a PVector or a params-shaped pytree (stacked or not): jnp.asarray would fail
        # with JAX's "entry not a 2- or 3- tuple" or "dtype object"
        raise TypeError(
            f"a {what} must be an array of flat vectors (..., {layout.numel()}); got a "
            f"{type(rows).__name__}. For one vector use mv (which takes a PVector or a "
            "params-shaped pytree); for a stack of params-shaped vectors (leaves with a "
            "leading axis) use jax.vmap(M.mv), or flatten them first with "
            "jax.vmap(lambda tree: PVector(tree).to_flat())(stacked)")
    check_real(rows, what)
    rows, _ = gathered(jnp.asarray(rows))  # split over an explicit axis: gathered
    if rows.ndim < 1 or rows.shape[-1] != layout.numel():
        raise ValueError(
            f"a {what} must be an array of flat vectors with last axis {layout.numel()} "
            f"(the number of parameters); got shape {rows.shape}"
        )
    return rows


def _paths(tree: Any) -> list[str]:
    """The paths of ``tree``'s leaves, as the layer table writes them."""
    return [path_to_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
