"""Scalar multiplication, shared by every jaxgeom object that has it; and the refusal of
``==`` by the array-valued ones."""

from __future__ import annotations

import numbers
from typing import Any


def is_scalar(x: Any) -> bool:
    """A Python number or a 0-d array."""
    return isinstance(x, numbers.Number) or (hasattr(x, "shape") and len(x.shape) == 0)


class ScalarMultiples:
    """``s * x``, ``x * s``, ``x / s`` and ``-x`` through one method, ``_scale(s)``."""

    def _scale(self, s: Any) -> Any:
        raise NotImplementedError

    def __mul__(self, s: Any) -> Any:
        if not is_scalar(s):
            return NotImplemented
        return self._scale(s)

    __rmul__ = __mul__

    def __truediv__(self, s: Any) -> Any:
        if not is_scalar(s):
            return NotImplemented
        return self._scale(1 / s)

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
