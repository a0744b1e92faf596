"""``jax.jit`` for jaxgeom's compiled steps that run the user's model.

A step that runs the model (a build's chunk step, the products of ``PMatImplicit`` and
``PFMapImplicit``, the Hessian's) spends most of its time in the model's forward and
backward passes. jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK by default. On a
2-core AVX2 CPU, XLA's own convolution kernels were faster than YNNPACK's: 2× forward and
for input gradients, 13× for weight gradients (a 3×3, 32-channel layer on 144 images of
32×32). These steps are therefore compiled with YNNPACK kept for matrix products and
reductions but not for convolutions. The option is passed per compilation
(``compiler_options``), so nothing global changes and the user's own ``jit`` calls are not
affected.

A step may ask for more options (``model_jit(..., compiler_options=...)``): the dense
and block-diagonal builds' steps ask XLA:CPU for its memory-optimised scheduler
(:data:`MEMORY_SCHEDULE`) instead of its default concurrency-optimised one, under which
the independent block products of the Gram were all live at once (bench_small: a warm
build's peak 343–359 → 260 MiB for ``PMatDense``, 157–227 → 124–138 MiB for
``PMatBlockDiag``, its bound 223).

Each option is left out when ``XLA_FLAGS`` already sets it (the user's choice wins: set it
to XLA's default to opt out) or when this jaxlib's XLA does not know it (checked once per
option, by compiling a trivial function).

On the CPU each step is also traced through
:func:`~jaxgeom._convolutions.canonical_convolutions`, which writes every plain convolution
(the model's and the transposes its derivatives make) in the layout XLA:CPU's fast kernels
take. Compiled at the top level this changes nothing; compiled inside a loop — conjugate
gradient's ``while_loop`` under ``jit``, a user's ``lax.scan`` of training steps, a
``lax.cond`` — it keeps the convolutions off XLA's generic loop nest (20–200× slower,
jax#12868).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxgeom._convolutions import canonical_convolutions

#: the XLA option, and its value: XLA's default (dots and reductions) without convolutions
CONVOLUTION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CONVOLUTION_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


#: options of a step whose independent operations should not all be live at once: XLA:CPU's
#: default scheduler, optimised for concurrency, starts every independent product as early
#: as it can, so that their results coexist; the memory-optimised one reuses their memory
MEMORY_SCHEDULE = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}


@functools.cache
def model_compile_options(extra: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any] | None:
    """The ``compiler_options`` of a step that runs the model, with the ``(name, value)``
    pairs ``extra`` (``None``: XLA's defaults): those this XLA accepts and ``XLA_FLAGS``
    does not set."""
    flags = os.environ.get("XLA_FLAGS", "")
    wanted = ((CONVOLUTION_OPTION, CONVOLUTION_VALUE), *extra)
    options = {name: value for name, value in wanted
               if name not in flags and _accepted(name, value)}
    return options or None


@functools.cache
def _accepted(name: str, value: Any) -> bool:
    """Whether this XLA compiles with the option (a trivial function, once per option)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options={name: value}).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an XLA without the option, or without options at all
        return False
    return True


class ModelJit:
    """``jax.jit(fun, **jit_kwargs)`` compiled with :func:`model_compile_options` when it
    is called at the top level, and the plain ``jax.jit`` when it is called inside another
    ``jit`` (JAX takes compile options from the outermost ``jit`` only, and refuses them on
    a nested one; the nested call is then traced twice, once per outer compilation).

    The jitted functions are made at the first use (the options need a backend, which must
    not start at import); ``lower``, ``eval_shape`` and the other attributes of a jitted
    function are the top-level one's.
    """

    def __init__(self, fun: Callable, *, compiler_options: dict[str, Any] | None = None,
                 **jit_kwargs: Any):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._extra = tuple(sorted((compiler_options or {}).items()))
        self._jit_kwargs = jit_kwargs
        self._top_level: Callable | None = None
        self._nested: Callable | None = None

    def _compiled(self) -> Callable:
        if self._top_level is None:
            self._top_level = jax.jit(self._traced(),
                                      compiler_options=model_compile_options(self._extra),
                                      **self._jit_kwargs)
        return self._top_level

    def _traced(self) -> Callable:
        """The function ``jit`` traces: on the CPU, with :func:`canonical_convolutions`
        (XLA's GPU and TPU compilers choose convolution layouts themselves)."""
        if jax.default_backend() == "cpu":
            return canonical_convolutions(self._fun)
        return self._fun

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return self._compiled()(*args, **kwargs)
        except ValueError as error:
            if "compiler_options" not in str(error):
                raise
        if self._nested is None:
            self._nested = jax.jit(self._traced(), **self._jit_kwargs)
        return self._nested(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fun", "_extra", "_jit_kwargs", "_top_level",
                                             "_nested"):
            raise AttributeError(name)
        return getattr(self._compiled(), name)


def model_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Any:
    """Decorator: :class:`ModelJit`, used like ``jax.jit`` (``static_argnums``,
    ``static_argnames``, ``donate_argnums``, …; ``compiler_options``: options added to
    :func:`model_compile_options`' own, each where this XLA takes it)."""
    if fun is None:
        return functools.partial(model_jit, **jit_kwargs)
    return ModelJit(fun, **jit_kwargs)
