"""Scalar multiplication, shared by every jaxgeom object that has it; the refusal of an
array operand (with the conversion to make); and the refusal of ``==`` by the
array-valued ones."""

from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np


def is_scalar(x: Any) -> bool:
    """A Python number or a 0-d array."""
    return isinstance(x, numbers.Number) or (hasattr(x, "shape") and len(x.shape) == 0)


class ScalarMultiples:
    """``s * x``, ``x * s``, ``x / s`` and ``-x`` through one method, ``_scale(s)``; an
    array of one dimension or more as the other operand of ``*``, ``/``, ``+`` or ``-`` is
    refused with :attr:`ARRAY_OPERAND_FIX`."""

    #: NumPy hands its operators to ours: ``ndarray * x`` had multiplied each entry by
    #: ``x``, an object array of scaled copies (a wrong answer without a word), and
    #: ``ndarray + x`` raised NumPy's message about concatenation
    __array_ufunc__ = None

    #: what to do instead of combining the object with an array (the TypeError's end)
    ARRAY_OPERAND_FIX = "convert the array to the object's type first"

    def _scale(self, s: Any) -> Any:
        raise NotImplementedError

    def _array_operand(self, other: Any, op: str, *, reflected: bool = False) -> Any:
        """``NotImplemented`` (Python's own TypeError follows, or the other operand's
        method runs), but a TypeError naming the fix for an array of one dimension or
        more."""
        if not isinstance(other, np.ndarray | jax.Array) or np.ndim(other) == 0:
            return NotImplemented
        name = type(self).__name__
        operands = f"array {op} {name}" if reflected else f"{name} {op} array"
        why = ("it multiplies from the left only (symmetric: vᵀM is (M v)ᵀ)" if op == "@"
               else f"arrays do not broadcast against {name} objects (only a number or a "
               "0-d array scales one)")
        raise TypeError(f"{operands}, with an array of shape {tuple(np.shape(other))}: "
                        f"{why}. {self.ARRAY_OPERAND_FIX}")

    def __mul__(self, s: Any) -> Any:
        if not is_scalar(s):
            return self._array_operand(s, "*")
        return self._scale(s)

    def __rmul__(self, s: Any) -> Any:
        if not is_scalar(s):
            return self._array_operand(s, "*", reflected=True)
        return self._scale(s)

    def __truediv__(self, s: Any) -> Any:
        if not is_scalar(s):
            return self._array_operand(s, "/")
        return self._scale(1 / s)

    def __rtruediv__(self, other: Any) -> Any:
        return self._array_operand(other, "/", reflected=True)

    def __radd__(self, other: Any) -> Any:
        return self._array_operand(other, "+", reflected=True)

    def __rsub__(self, other: Any) -> Any:
        return self._array_operand(other, "-", reflected=True)

    def __neg__(self) -> Any:
        return self._scale(-1)


class ArrayValued:
    """Refuses ``==`` (and hashing): a field-wise comparison of arrays has no single truth
    value, so ``u == v`` would raise JAX's "ambiguous truth value" from inside a dataclass."""

    def __eq__(self, other: Any) -> bool:
        name = type(self).__name__
        raise TypeError(
            f"{name} == {name} is ambiguous (it would compare arrays): compare the values, "
            "e.g. jnp.array_equal(u.to_flat(), v.to_flat()) or jnp.allclose(...) for a "
            "PVector, the .data arrays for a function-space object"
        )

    __hash__ = None  # type: ignore[assignment]
