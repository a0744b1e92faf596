"""``jax.jit`` with jaxgeom's compile options, for the functions that need them.

Options are passed per compilation (``compiler_options``): nothing global changes, and a
user's own ``jit`` calls, and jaxgeom's functions traced inside them, are compiled with
XLA's defaults.

A step that runs the model (:func:`model_jit`: a build's chunk step, the products of
``PMatImplicit`` and ``PFMapImplicit``, the Hessian's) spends most of its time in the
model's forward and backward passes. jaxlib 0.10's XLA:CPU hands convolutions to YNNPACK
by default. On a 2-core AVX2 CPU, XLA's own convolution kernels were faster than
YNNPACK's: 2× forward and for input gradients, 13× for weight gradients (a 3×3, 32-channel
layer on 144 images of 32×32). These steps are therefore compiled with YNNPACK kept for
matrix products and reductions but not for convolutions.

A step may ask for more options (``model_jit(..., compiler_options=...)``), each kept
where this XLA takes it. (The dense and block-diagonal builds' steps once asked for
XLA:CPU's memory-optimised scheduler, under whose default the Gram's independent block
products were all live at once; they now add the blocks in a loop, which bounds that
memory under any schedule and inside a user's ``jit``, where no option applies:
:func:`~jaxgeom.pmat._gram.add_upper_gram`.)

A function whose run time is LAPACK factorisations (:func:`factorisation_jit`: the
solves, eigendecompositions and spectral norms of the dense, block-diagonal, KFAC and
low-rank representations called eagerly, EKFAC's eigendecompositions) is compiled with
XLA:CPU's direct LLVM fusion emitters (:data:`FAST_COMPILE`) instead of its MLIR-based
ones. Such a function is many small fusions around a few LAPACK calls (a KFAC π-damped
``solve`` on a 3-layer MLP: 49 loop fusions, 18 LAPACK calls), each of which the MLIR
route takes about twice as long to compile, for kernels that run as fast: that ``solve``
compiles in 248 against 519 ms, bench_mlp's in 292 against 614 ms, for the same 0.23 and
29 ms warm (2-core CPU, jaxlib 0.10; benchmarks/README.md, "Compile time"). Element-wise
work, on the other hand, ran up to 1.25× slower with the direct emitters
(``PMatQuasiDiag.solve``; ``PMatDiag.solve`` on 1.5 M parameters 1.12×), and the model
steps of a conv net 3–12% slower: everything else keeps XLA's default emitters, but for
the small programs a build runs once, around its chunks (:func:`quick_jit`: its zero
total, the layout of its result), whose compilation outweighs their run.

Each option is left out when ``XLA_FLAGS`` already sets it (the user's choice wins: set it
to XLA's default to opt out) or when this jaxlib's XLA does not know it (checked once in
a process: all of jaxgeom's options together, by compiling an empty program).

On the CPU each model step is also traced through
:func:`~jaxgeom._convolutions.canonical_convolutions`, which writes every plain convolution
(the model's and the transposes its derivatives make) in the layout XLA:CPU's fast kernels
take. Compiled at the top level this changes nothing; compiled inside a loop — conjugate
gradient's ``while_loop`` under ``jit``, a user's ``lax.scan`` of training steps, a
``lax.cond`` — it keeps the convolutions off XLA's generic loop nest (20–200× slower,
jax#12868).

Inside a user's ``jit`` nothing a build computes from the data alone is left for XLA to
evaluate at compile time (constant folding: one thread, a few hundred million
multiply-adds a second; bench_mlp's KFAC over closed-over data compiled in 6.7 s, 0.28 s
now): a builder called inside a trace puts its batch behind ``lax.optimization_barrier``
(:func:`behind_barrier`), a step called inside a trace its constant arguments (a
stored ``PMatImplicit``'s parameters and data, :func:`_constants_barred`), and an
operation staged into a ``jit`` the arrays of a matrix the ``jit`` closes over
(:func:`constants_behind_barrier`, from :mod:`jaxgeom._dispatch`).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxgeom._convolutions import canonical_convolutions

#: options of a function whose run time is LAPACK factorisations: XLA:CPU's direct LLVM
#: fusion emitters, which compile the small fusions around them in about half the time of
#: the MLIR-based default
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}

#: the XLA option, and its value: XLA's default (dots and reductions) without convolutions
CONVOLUTION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CONVOLUTION_VALUE = "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"


@functools.cache
def compile_options(wanted: tuple[tuple[str, Any], ...]) -> dict[str, Any] | None:
    """The ``compiler_options`` made of the ``(name, value)`` pairs ``wanted`` that this
    XLA accepts and ``XLA_FLAGS`` does not set (``None``: XLA's defaults)."""
    flags = os.environ.get("XLA_FLAGS", "")
    options = {name: value for name, value in wanted
               if name not in flags and _accepted(name, value)}
    return options or None


def model_compile_options(extra: tuple[tuple[str, Any], ...] = ()) -> dict[str, Any] | None:
    """The ``compiler_options`` of a step that runs the model: YNNPACK kept off
    convolutions (:data:`CONVOLUTION_OPTION`), then the pairs ``extra``."""
    return compile_options(((CONVOLUTION_OPTION, CONVOLUTION_VALUE), *extra))


def factorisation_compile_options(extra: tuple[tuple[str, Any], ...] = ()
                                  ) -> dict[str, Any] | None:
    """The ``compiler_options`` of a function whose run time is LAPACK factorisations:
    :data:`FAST_COMPILE`, then the pairs ``extra``."""
    return compile_options((*FAST_COMPILE.items(), *extra))


#: every option jaxgeom asks for, checked together (:func:`_accepted`)
OWN_OPTIONS = (*FAST_COMPILE.items(), (CONVOLUTION_OPTION, CONVOLUTION_VALUE))


@functools.cache
def _accepted(name: str, value: Any) -> bool:
    """Whether this XLA compiles with the option: jaxgeom's own options all at once (one
    compilation in a process, where this XLA knows them all), any other alone."""
    if (name, value) in OWN_OPTIONS and _compiles_with(OWN_OPTIONS):
        return True
    return _compiles_with(((name, value),))


@functools.cache
def _compiles_with(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this XLA compiles an empty program (the identity: no kernel to generate,
    ≈ 8 ms against ≈ 25 ms for ``x + 1`` on XLA:CPU) with all of ``options``."""
    try:
        jax.jit(lambda x: x, compiler_options=dict(options)).lower(np.float32(0)).compile()
    except Exception:  # noqa: BLE001 - an XLA without an option, or without options at all
        return False
    return True


class CompiledFunction:
    """``jax.jit(fun, **jit_kwargs)`` compiled with options when it is called at the top
    level — a model step's (``runs_model``: :func:`model_compile_options`, and traced
    through :func:`~jaxgeom._convolutions.canonical_convolutions` on the CPU), else a
    factorisation's (:func:`factorisation_compile_options`) — and the plain ``jax.jit``
    when it is called inside another ``jit`` (JAX takes compile options from the outermost
    ``jit`` only, and refuses them on a nested one; the nested call is then traced twice,
    once per outer compilation).

    The jitted functions are made at the first use (the options need a backend, which must
    not start at import); ``lower``, ``eval_shape`` and the other attributes of a jitted
    function are the top-level one's.
    """

    def __init__(self, fun: Callable, *, runs_model: bool = False,
                 compiler_options: dict[str, Any] | None = None, **jit_kwargs: Any):
        functools.update_wrapper(self, fun)
        self._fun = fun
        self._runs_model = runs_model
        self._extra = tuple(sorted((compiler_options or {}).items()))
        self._jit_kwargs = jit_kwargs
        self._top_level: Callable | None = None
        self._nested: dict[tuple[int, ...], Callable] = {}
        # ``donate_argnums=0`` donates: not its truth value
        self._donates = any(jit_kwargs.get(k) not in (None, ()) for k in ("donate_argnums",
                                                                          "donate_argnames"))

    def _compiled(self) -> Callable:
        if self._top_level is None:
            options = (model_compile_options if self._runs_model
                       else factorisation_compile_options)
            self._top_level = jax.jit(self._traced(), compiler_options=options(self._extra),
                                      **self._jit_kwargs)
        return self._top_level

    def _traced(self) -> Callable:
        """The function ``jit`` traces: a model step, on the CPU, with
        :func:`canonical_convolutions` (XLA's GPU and TPU compilers choose convolution
        layouts themselves)."""
        if self._runs_model and jax.default_backend() == "cpu":
            return canonical_convolutions(self._fun)
        return self._fun

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # A function that donates its buffers is checked for a trace first (eager jax.grad
        # or vmap of a build: traced arguments): the top-level call would refuse its options
        # only once the donated buffers are gone. The others try the top level first.
        if not (self._donates and any_tracer(args, kwargs)):
            try:
                return self._compiled()(*args, **kwargs)
            except ValueError as error:
                if "compiler_options" not in str(error):
                    raise
        constants = _constant_indices(jax.tree_util.tree_leaves((args, kwargs)))
        return self._nested_call(constants)(*args, **kwargs)

    def _nested_call(self, constants: tuple[int, ...]) -> Callable:
        """The function called inside a trace, its arguments' leaves ``constants`` (their
        indices) behind a barrier (:func:`_constants_barred`)."""
        if constants not in self._nested:  # without donation: a nested call's buffers are
            # the trace's (under vmap, JAX warned that the donated buffers were not usable)
            nested = {k: v for k, v in self._jit_kwargs.items() if not k.startswith("donate")}
            fun = self._traced()
            self._nested[constants] = jax.jit(
                _constants_barred(fun, constants) if constants else fun, **nested)
        return self._nested[constants]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_fun", "_runs_model", "_extra", "_jit_kwargs",
                                             "_top_level", "_nested", "_donates"):
            raise AttributeError(name)
        return getattr(self._compiled(), name)


def behind_barrier(batch: Any) -> Any:
    """``batch`` (one batch of a builder's data) with its arrays passed through
    ``lax.optimization_barrier``: what a builder called inside a trace does with its data.

    Inside a user's ``jit`` the data may be constants (closed over) or computed from
    constants (``x / 255`` of closed-over pixels): XLA would evaluate at compile time what
    the build computes from the data alone (:func:`_constants_barred`). One barrier where
    the data enter the build, in the caller's trace: a barrier inside the build's own loops
    (a conjugate gradient's ``while_loop``) would keep XLA from hoisting their
    loop-invariant work (the forward pass a Hessian-free step's products share: its step
    1.27× slower on bench_mlp). Outside ``jit`` but under ``grad`` or ``vmap`` the barrier
    runs eagerly: a copy of the batch."""
    leaves = jax.tree_util.tree_leaves(batch)
    arrays = [i for i, leaf in enumerate(leaves) if isinstance(leaf, (jax.Array, np.ndarray))]
    return _leaves_barred(batch, arrays)


def constants_behind_barrier(tree: Any) -> Any:
    """``tree`` with its concrete arrays (not tracers) passed through
    ``lax.optimization_barrier``: a stored matrix's arrays when one of its operations is
    staged into a user's ``jit`` that closes over it (:func:`_constants_barred`: XLA
    would fold what the operation computes from them alone, a low-rank factor's Gram)."""
    constants = _constant_indices(jax.tree_util.tree_leaves(tree))
    return _leaves_barred(tree, constants) if constants else tree


def _leaves_barred(tree: Any, indices: Sequence[int]) -> Any:
    """``tree`` with its leaves ``indices`` passed through one
    ``lax.optimization_barrier``."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    for i, value in zip(indices, jax.lax.optimization_barrier([leaves[i] for i in indices])):
        leaves[i] = value
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _constant_indices(leaves: list) -> tuple[int, ...]:
    """The indices of the ``leaves`` that are arrays, not tracers: inside a trace, the
    constants of the program being traced (data a user's ``jit`` closes over)."""
    return tuple(i for i, leaf in enumerate(leaves)
                 if isinstance(leaf, (jax.Array, np.ndarray))
                 and not isinstance(leaf, jax.core.Tracer))


def _constants_barred(fun: Callable, constants: tuple[int, ...]) -> Callable:
    """``fun`` with the argument leaves ``constants`` (indices in ``(args, kwargs)``) passed
    through ``lax.optimization_barrier``: the form of a step called inside a trace with
    constants among its arguments.

    XLA evaluates at compile time every computation whose operands are all constants, with
    an evaluator that runs a matrix product at a few hundred million multiply-adds a second
    on one thread. A user's ``jit`` that closes over its data (``jax.jit(lambda p: FIM(f, p,
    (x, y), PMatKFAC))``) hands the steps constants, and everything computed from the data
    alone was folded: KFAC's first-layer factor ``aᵀa`` (bench_mlp's 512 × 785 inputs: 6.2
    against 0.41 s to compile), a diagonal's ``a²``, a convolution's patches. Behind the
    barrier they are opaque to that folding, at no cost at run time (an identity on the
    buffers). Only constants: a barrier on the caller's traced values would keep XLA from
    hoisting the step's work on them out of the caller's loops (a Hessian-free training
    step's conjugate gradient recomputed the forward pass at every product: 1.27× slower)
    and from merging it with the caller's own (CSE).
    """

    @functools.wraps(fun)
    def barred(*args: Any, **kwargs: Any) -> Any:
        call_args, call_kwargs = _leaves_barred((args, kwargs), constants)
        return fun(*call_args, **call_kwargs)

    return barred


def any_tracer(*trees: Any) -> bool:
    """Whether a leaf of ``trees`` is a ``Tracer`` (the call is inside a trace)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(trees))


def staged(*trees: Any) -> bool:
    """Whether a leaf of ``trees`` is being staged into a ``jit``: a ``Tracer`` of a jaxpr
    trace, or of a ``grad``/``vmap`` trace inside one. The tracers of an eager ``grad`` or
    ``vmap`` are not: their primitives run one by one, and a loop primitive among them
    (``lax.scan``) would be compiled anew at every call (its body a new function each time),
    where nested ``jit`` calls are compiled once."""
    for leaf in jax.tree_util.tree_leaves(trees):
        if not isinstance(leaf, jax.core.Tracer):
            continue
        trace = getattr(leaf, "_trace", None)
        if trace is None:  # a JAX whose tracers do not name their trace: any trace
            return True
        while trace is not None:
            if type(trace).__name__ == "DynamicJaxprTrace":
                return True
            trace = getattr(trace, "parent_trace", None)
    return False


def model_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Any:
    """Decorator: :class:`CompiledFunction` for a step that runs the user's model, used
    like ``jax.jit`` (``static_argnums``, ``static_argnames``, ``donate_argnums``, …;
    ``compiler_options``: options added to :func:`model_compile_options`' own, each where
    this XLA takes it)."""
    if fun is None:
        return functools.partial(model_jit, **jit_kwargs)
    return CompiledFunction(fun, runs_model=True, **jit_kwargs)


def donating_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Callable:
    """``jax.jit(fun, donate_argnums=…)`` with XLA's default options, whose donation is
    dropped inside a trace (``vmap``, an outer ``jit``: the buffers are the trace's, and
    JAX would warn that they were not usable)."""
    if fun is None:
        return functools.partial(donating_jit, **jit_kwargs)
    donating = jax.jit(fun, **jit_kwargs)
    plain = jax.jit(fun, **{k: v for k, v in jit_kwargs.items() if not k.startswith("donate")})

    @functools.wraps(fun)
    def call(*args: Any, **kwargs: Any) -> Any:
        return (plain if any_tracer(args, kwargs) else donating)(*args, **kwargs)

    return call


def factorisation_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Any:
    """Decorator: :class:`CompiledFunction` for a function whose run time is LAPACK
    factorisations (:func:`factorisation_compile_options`), used like ``jax.jit``."""
    if fun is None:
        return functools.partial(factorisation_jit, **jit_kwargs)
    return CompiledFunction(fun, **jit_kwargs)


def quick_jit(fun: Callable | None = None, **jit_kwargs: Any) -> Any:
    """Decorator: :class:`CompiledFunction` for a small program around a build — its zero
    total, the layout of its result, a Gram's mirrored blocks — compiled as the
    factorisations are (:data:`FAST_COMPILE`), used like ``jax.jit``. Compiled at a first
    build and run once a build, such a program costs more to compile than to run: with
    XLA:CPU's direct emitters bench_small's QuasiDiag means compile in 0.08–0.11 against
    0.19–0.29 s, its zero total in 0.06–0.09 against 0.09–0.13 s; Dense's mirroring
    compiles in about as long and runs as fast (33–40 against 41–48 ms for 6922²).
    Not the division of a mean (:func:`~jaxgeom.streaming.mean`): it compiles as fast
    either way and runs 1.8× slower on a large total with these emitters (19 against 11 ms
    for 6922²); nor a chunk's cut (:func:`jaxgeom.data._window`, run once a chunk, its
    host time tuned)."""
    return factorisation_jit(fun, **jit_kwargs)
