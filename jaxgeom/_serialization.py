"""Pytree dataclasses that Flax can serialize.

jaxgeom's objects are frozen dataclasses registered as JAX pytrees, so ``jit``, ``vmap``,
``tree_map`` and Orbax checkpoints (which read pytrees) take them as they are. Flax's own
serialization (``flax.serialization.to_state_dict``, ``to_bytes``/``from_bytes``, the
checkpoints of a Flax ``TrainState`` holding a natural-gradient optimizer state) keeps a
registry of its own, which :func:`register_dataclass` also fills: the state of an object
is the dict of its array (non-static) fields' states, and restoring one replaces those
fields in a target of the same structure (static fields — layouts, options — come from the
target, as a Flax module's structure does). A matrix's static hints about its values (KFAC's
factor rank bounds, EKFAC's ranges: ``without_rank_bounds``) are dropped on restore: the
target's were derived from the target's values.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import serialization


def register_dataclass(cls: type) -> type:
    """Register the dataclass ``cls`` as a JAX pytree (``jax.tree_util.register_dataclass``:
    fields with ``metadata={"static": True}`` are static) and with Flax's serialization."""
    cls = jax.tree_util.register_dataclass(cls)
    fields = [f for f in dataclasses.fields(cls)
              if f.init and not f.metadata.get("static", False)]
    names = tuple(f.name for f in fields)
    # a field added later with a default (PMatLowRank's shift) is absent from the states
    # saved before it: those restore with the default, the value it stood for then (a
    # default None only stands for a required array: still refused when missing)
    defaults = {f.name: f.default for f in fields
                if f.default is not dataclasses.MISSING and f.default is not None}

    def to_state_dict(x: Any) -> dict[str, Any]:
        return {name: serialization.to_state_dict(getattr(x, name)) for name in names}

    def from_state_dict(target: Any, state: dict[str, Any]) -> Any:
        # the defaults only for a state of this class's other fields (a state of another
        # class, e.g. a PMatDense's into a PMatEye, is still refused)
        own = bool(state) and all(key in names for key in state)
        missing = [name for name in names
                   if name not in state and not (own and name in defaults)]
        if missing:
            raise ValueError(f"the state of a {cls.__name__} has no {', '.join(missing)}; "
                             f"its fields: {', '.join(state)}")
        restored = dataclasses.replace(target, **{
            name: serialization.from_state_dict(getattr(target, name), state[name], name=name)
            if name in state else defaults[name] for name in names})
        if hasattr(restored, "check_shapes"):  # arrays of another model's shapes
            restored.check_shapes()
        if hasattr(restored, "check_restored"):  # the same, where only the target knows
            restored.check_restored(target)
        # static hints that a build derived from its values (KFAC's rank bounds, EKFAC's
        # ranges) are the target's, not the state's: dropped, never trusted
        return restored.without_rank_bounds() if hasattr(restored, "without_rank_bounds") \
            else restored

    serialization.register_serialization_state(cls, to_state_dict, from_state_dict)
    return cls
