"""The common algebra of every parameter-space matrix ``M`` (d × d).

A representation implements a few primitives on flat ``(d,)`` vectors (``_mv``, and where
cheaper than the generic route ``to_dense``, ``get_diag``, ``_solve``, …); this base class
derives the rest once, handles every accepted vector form (``PVector``, params-shaped
pytree, flat array) and the operators ``+ - * / @``, and raises a
``NotImplementedError`` naming the representations that *can* do an operation when one
cannot.

Representations are frozen dataclasses registered as pytrees: arrays are children, the
:class:`~jaxgeom.layers.LayerCollection` is static metadata, so every object can be built,
returned and consumed inside ``jax.jit``. Operations return new objects.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import inspect
from collections.abc import Callable, Sequence
from inspect import getattr_static
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import streaming
from jaxgeom._dispatch import compiled_when_eager
from jaxgeom._memory import check_fits
from jaxgeom._reindex import LeafVector
from jaxgeom._reporting import one_singular_report, vmap_reporting
from jaxgeom._serialization import register_dataclass
from jaxgeom._signature import dtype_is
from jaxgeom.jacobian import JacobianBuilder
from jaxgeom.layers import LayerCollection, check_layer_collection
from jaxgeom.pmat import _spectral
from jaxgeom.restriction import Restriction, restrict
from jaxgeom.scaling import ScalarMultiples, is_scalar
from jaxgeom.solvers import (
    cg,
    check_cg_options,
    check_neumann_options,
    minres,
    neumann,
    non_finite_residual,
)
from jaxgeom.streaming import static_field as static_field  # re-exported
from jaxgeom.vector import PVector, as_flat, as_rows, as_tree, static_order

REGISTRY: list[type] = []

# Public name of the method that implements each capability (for error messages).
_CAPABILITY_METHOD = {
    "scalar multiplication": "_scale",
    "addition": "_add_same",
}


def representation(cls: type) -> type:
    """Class decorator: frozen dataclass + pytree registration + registry entry; the
    operations named in :attr:`PMatAbstract.COMPILED_OPERATIONS` run as one compiled call
    when called eagerly (:func:`jaxgeom._dispatch.compiled_when_eager`)."""
    post_init = getattr(cls, "__post_init__", None)
    if not hasattr(post_init, "checks_layout"):  # an inherited one may be checked already
        cls.__post_init__ = _layout_checked(post_init)
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    cls = register_dataclass(cls)
    for name in getattr(cls, "COMPILED_OPERATIONS", ()):
        method = getattr(cls, name)
        setattr(cls, name, compiled_when_eager(getattr(method, "eager_method", method)))
    for name, checked in (("inv", _checked_scalars), ("pow", _checked_scalars),
                          ("pinv", _checked_scalars),
                          ("slogdet", _checked_scalars), ("logdet", _checked_scalars),
                          ("solve", _checked_solve)):
        method = getattr(cls, name)
        if not hasattr(method, "checks_scalars"):  # an inherited one may be checked already
            setattr(cls, name, checked(method))
    if not hasattr(cls.mm, "scales_by_eye"):
        cls.mm = _scaled_by_eye(cls.mm)
    if not hasattr(cls.to_dense, "checks_size"):
        cls.to_dense = _fitting_to_dense(cls.to_dense)
    REGISTRY.append(cls)
    return cls


def _layout_checked(post_init: Callable | None) -> Callable:
    """A representation's ``__post_init__`` that first checks its ``layer_collection``
    (the parameters passed in its place would fail later, as an ``AttributeError``)."""

    def checked(self):
        check_layer_collection(self.layer_collection, f"{type(self).__name__}'s layer_collection")
        if post_init is not None:
            post_init(self)

    checked.checks_layout = True
    return checked


def check_shape(what: str, shape: tuple[int, ...] | None, want: str,
                trailing: Callable[[tuple[int, ...]], bool], rank: int) -> None:
    """Refuse an array field whose last ``rank`` dimensions fail ``trailing``; leading
    dimensions are allowed: a stack of representations (``jax.vmap``'s output, a ``scan``'s
    ``ys``, ``tree_map(lambda *a: jnp.stack(a), F1, F2)``) is rebuilt from its stacked
    leaves. ``shape`` ``None``: a placeholder of JAX's pytree machinery, not checked."""
    if shape is not None and (len(shape) < rank or not trailing(tuple(shape[len(shape) - rank:]))):
        raise ValueError(f"{what} must have shape {want} (or (..., {want[1:]} when "
                         f"stacked); got {tuple(shape)}")


#: how to damp each parameter on its own, which a scalar ``regul`` cannot
PER_PARAMETER_DAMPING = (
    "For a damping per parameter, add a diagonal matrix first: (M + PMatDiag("
    "M.layer_collection, damping)).solve(v), or solve by CG with an implicit M")


def check_regul(regul: Any, per_entry: str = PER_PARAMETER_DAMPING) -> None:
    """Refuse a damping ``λ`` (of ``M + λ·I``) that is not a scalar (a vector broadcast
    against a matrix's factors or blocks would be a shape error at best, a wrong matrix at
    worst) or, where it is concrete, not finite (a NaN answer without a word). ``per_entry``:
    the sentence of the error that says how to damp entry by entry instead."""
    if not is_scalar(regul):
        raise ValueError(
            f"regul must be a scalar (the damping λ of M + λ·I); got {_described(regul)}. "
            + per_entry)
    _check_finite(regul, "regul (the damping λ of M + λ·I)")


def check_exponent(p: Any) -> None:
    """Refuse an exponent ``p`` of ``pow`` that is not a scalar or, where it is concrete,
    not finite."""
    if not is_scalar(p):
        raise ValueError(
            f"the exponent p of pow must be a scalar; got {_described(p)}. For several "
            "powers, call pow once per exponent")
    if np.iscomplexobj(p):  # a traced one too: its dtype is known
        raise TypeError(
            f"the exponent p of pow must be real; got {p!r}: jaxgeom's matrices are real "
            "symmetric and M^p of a complex p is not. Form V diag(λ^p) Vᵀ from M.eigh() "
            "yourself")
    _check_finite(p, "the exponent p of pow")


def check_threshold(x: Any, name: str) -> None:
    """Refuse a ``pinv`` threshold (``atol``, ``rtol``) that is not ``None`` or a scalar, or,
    where it is concrete, negative or NaN (``inf`` drops every eigenvalue)."""
    if x is None:
        return
    if not is_scalar(x):
        raise ValueError(f"pinv's {name} must be a scalar; got {_described(x)}")
    if not isinstance(x, jax.core.Tracer) and not np.asarray(x) >= 0:
        raise ValueError(
            f"pinv's {name} must be ≥ 0 (eigenvalues |λ| ≤ max(atol, rtol·max|λ|) are "
            f"dropped); got {x!r}")


def _check_finite(x: Any, what: str) -> None:
    """A ``ValueError`` if ``x`` is concrete and not finite (a traced value passes)."""
    if not isinstance(x, jax.core.Tracer) and not np.isfinite(np.asarray(x)):
        raise ValueError(f"{what} must be finite; got {x!r}")


def _described(x: Any) -> str:
    return (f"an array of shape {tuple(x.shape)}" if hasattr(x, "shape")
            else f"a {type(x).__name__}")


def _scaled_by_eye(mm: Callable) -> Callable:
    """``mm`` with a right factor ``sI`` (:class:`~jaxgeom.pmat.eye.PMatEye`) taken as the
    scaling ``s·M`` in ``M``'s representation, as ``sI · M`` is (never the dense product)."""

    @functools.wraps(mm)
    def call(self, other):
        if getattr(other, "PROMOTION_RANK", None) == 0 != self.PROMOTION_RANK:
            return other.mm(self)
        return mm(self, other)

    call.scales_by_eye = True
    return call


#: the scalar arguments of ``inv``/``pow``/``pinv`` and their checks
_SCALAR_ARGUMENTS = {"regul": check_regul, "p": check_exponent,
                     "atol": lambda x: check_threshold(x, "atol"),
                     "rtol": lambda x: check_threshold(x, "rtol")}


def _checked_scalars(method: Callable) -> Callable:
    """``method`` (``inv``/``pow``/``pinv``/…) with its ``regul`` (:func:`check_regul`),
    exponent ``p`` (:func:`check_exponent`) and thresholds ``atol``/``rtol``
    (:func:`check_threshold`) checked; the singular matrices its blocks or factors meet
    warn once, named as called (:func:`~jaxgeom._reporting.one_singular_report`)."""
    names = list(inspect.signature(method).parameters)[1:]  # after self
    checks = [(name, names.index(name), check) for name, check in _SCALAR_ARGUMENTS.items()
              if name in names]

    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        for name, position, check in checks:
            if name in kwargs or len(args) > position:
                check(kwargs[name] if name in kwargs else args[position])

        def called() -> str:
            p = kwargs["p"] if "p" in kwargs else args[0] if args else None
            if method.__name__ != "pow" or isinstance(p, jax.core.Tracer):
                return method.__name__
            return f"pow({np.real(np.asarray(p)):g})"

        with one_singular_report(called):
            return method(self, *args, **kwargs)

    checked.checks_scalars = True
    return checked


def _fitting_to_dense(to_dense: Callable) -> Callable:
    """``to_dense`` refusing, before it runs, a ``(d, d)`` matrix larger than the device's
    memory (:func:`jaxgeom._memory.check_fits`): XLA would report it only once read, or
    abort the process when NumPy reads it."""

    @functools.wraps(to_dense)
    def checked(self):
        d = self.layer_collection.numel()
        check_fits(f"{type(self).__name__}.to_dense()", (d, d), self.dtype,
                   "Work with the matrix through its operations (mv, vTMv, solve, get_diag, "
                   "eigsh, trace), or densify the blocks of a few layers: "
                   "M.restrict(layer_ids).to_dense()")
        return to_dense(self)

    checked.checks_size = True
    return checked


def _checked_solve(solve: Callable) -> Callable:
    """``solve`` with its ``regul`` and iterative options checked before it dispatches: a
    compiled call (:func:`~jaxgeom._dispatch.compiled_when_eager`) traces Python floats,
    which a check inside it could not read. An eager Neumann solve that diverged (NaN
    from the compiled call) is an error naming the scale; an eager CG or MINRES solve whose
    residual was not finite (NaN from the compiled call, whose loop stops at a NaN
    residual) the ``FloatingPointError`` of the solver's loop from Python."""

    @functools.wraps(solve)
    def checked(self, v, regul=0.0, *, method=None, **options):
        check_regul(regul)
        method = self.SOLVE_METHODS[0] if method is None else method
        self._check_solvable(regul, method)
        if method in ("cg", "minres"):
            preconditioner = options.get("preconditioner")
            check_cg_options(
                **{k: options[k] for k in ("rtol", "atol", "maxiter") if k in options},
                preconditioner=None if isinstance(preconditioner, PMatAbstract)
                else preconditioner, name=method)
        elif method == "neumann":
            check_neumann_options(
                **{k: options[k] for k in ("scale", "num_terms") if k in options})
        out = solve(self, v, regul, method=method, **options)
        if method == "neumann":
            _check_series_converged(out)
        elif method in ("cg", "minres"):
            _check_krylov_finite(out, method)
        return out

    checked.checks_scalars = True
    return checked


def _check_krylov_finite(x: Any, method: str) -> None:
    """Raise for an eager CG/MINRES solution that is NaN: the compiled solve's answer when
    its residual was not finite (nothing under a trace, where NaN is the answer)."""
    leaves = jax.tree_util.tree_leaves(x)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return
    if not bool(_all_finite(leaves)):
        raise FloatingPointError(non_finite_residual(method, "at the end of the solve"))


#: :func:`jaxgeom.streaming.tree_finite` as one compiled call (eagerly, two dispatches a leaf)
_all_finite = jax.jit(streaming.tree_finite)


def _check_series_converged(x: Any) -> None:
    leaves = jax.tree_util.tree_leaves(x)
    if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
        return  # under a trace the answer is NaN, as an iterative solve's failure is
    if not all(bool(jnp.isfinite(leaf).all()) for leaf in leaves):
        raise ValueError(
            "solve(method='neumann'): the series diverged (its last residual is larger than "
            "the right-hand side) or the products are not finite: the scale is not below "
            "2/λ_max(M + regul), or M + regul·I is not positive definite. Pass a smaller "
            "scale=, a larger regul, or use method='minres' for an indefinite matrix")


#: the options of a conjugate-gradient or MINRES solve (:func:`jaxgeom.solvers.cg`,
#: :func:`jaxgeom.solvers.minres`)
CG_OPTIONS = ("x0", "rtol", "atol", "maxiter", "preconditioner")
#: the iterative solves of ``M + regul·I`` that every representation offers
#: (:mod:`jaxgeom.solvers`), each with its options
ITERATIVE_SOLVES: dict[str, tuple[str, ...]] = {
    "cg": CG_OPTIONS, "minres": CG_OPTIONS, "neumann": ("scale", "num_terms")}
ITERATIVE_SOLVE_METHODS = tuple(ITERATIVE_SOLVES)


def iterative_solve_options(*extra: str) -> dict[str, tuple[str, ...]]:
    """:data:`ITERATIVE_SOLVES` with ``extra`` options accepted by each (``damping``)."""
    return {method: (*options, *extra) for method, options in ITERATIVE_SOLVES.items()}


class PMatAbstract(ScalarMultiples, abc.ABC):
    """Abstract d × d matrix in parameter space (Fisher, GGN, Hessian, …).

    Subclasses implement ``_mv(v)`` on flat vectors and declare their fields; everything
    else has a generic definition here (often through ``to_dense``, which subclasses
    override where they have a cheaper route).
    """

    layer_collection: LayerCollection

    #: solve methods accepted by :meth:`solve`; the first is the default. Every
    #: representation ends it with the iterative ones (:data:`ITERATIVE_SOLVE_METHODS`)
    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ITERATIVE_SOLVE_METHODS
    #: the keyword options of each solve method (any other is refused)
    SOLVE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = ITERATIVE_SOLVES
    #: whether ``_mv``/``_vTMv`` also take a :class:`~jaxgeom._reindex.LeafVector` (and
    #: ``_mv`` then answers with one): a params-shaped vector is then never flattened
    LEAFWISE: ClassVar[bool] = False
    #: the solve methods whose ``_solve`` also takes (and answers with) a ``LeafVector``,
    #: for a representation that is :attr:`LEAFWISE`
    LEAFWISE_SOLVES: ClassVar[tuple[str, ...]] = ()
    #: the end of the TypeError for an array operand of ``+``, ``-``, ``*``, ``/`` (either
    #: side) or of ``array @ M``
    ARRAY_OPERAND_FIX: ClassVar[str] = (
        "M.mv(v) or M @ v multiplies a vector; to add a (d, d) array, wrap it first: "
        "M + PMatDense(M.layer_collection, array)")
    #: the operations that, called outside a trace, run as one compiled call instead of
    #: dispatching their array operations one by one (up to 38x faster on a CPU); those
    #: returning a representation stay eager (their arrays keep their identity, which
    #: ``mm`` and ``+`` use to recognise shared Kronecker eigenbases)
    COMPILED_OPERATIONS: ClassVar[tuple[str, ...]] = (
        "mv", "vTMv", "mmap", "mapTMmap", "quadratic_forms", "solve", "to_dense", "get_diag",
        "trace", "frobenius_norm", "eigvalsh", "_norm", "eigh", "eigsh", "slogdet", "logdet",
    )
    #: the :attr:`COMPILED_OPERATIONS` whose run time is LAPACK factorisations (Cholesky,
    #: ``eigh``, QR) with little element-wise work around them: compiled with XLA:CPU's
    #: quick fusion emitters (:func:`jaxgeom._compile.factorisation_jit`), in about half
    #: the time, for the same run time; the others with XLA's defaults
    FACTORISING_OPERATIONS: ClassVar[tuple[str, ...]] = ()
    #: the :attr:`COMPILED_OPERATIONS` that stream data through a build (``PMatImplicit``'s
    #: ``get_diag``), whose eager loop raises ``FloatingPointError`` on a non-finite chunk,
    #: mapped to the method the compiled call runs instead: the same result and the chunks'
    #: finiteness flags (:func:`jaxgeom.streaming.run_with_flags`), checked after the call;
    #: a subclass that overrides such an operation overrides its entry too
    #: (``PMatImplicitHessian``: none)
    CHECKED_OPERATIONS: ClassVar[dict[str, str]] = {}
    #: whether the operations run the model (``PMatImplicit`` replays it chunk by chunk):
    #: their eager calls are then compiled as a model step is
    #: (:func:`jaxgeom._compile.model_jit`: on the CPU, XLA's own convolution kernels)
    RUNS_MODEL: ClassVar[bool] = False
    #: :attr:`FACTORISING_OPERATIONS` of a representation that factorises its matrices,
    #: blocks or factors for every solve and spectral operation
    FACTORISES: ClassVar[tuple[str, ...]] = ("solve", "eigvalsh", "_norm", "eigh", "eigsh",
                                             "slogdet", "logdet")

    # ------------------------------------------------------------------ primitives
    @abc.abstractmethod
    def _mv(self, v: jax.Array) -> jax.Array:
        """``M v`` for a flat ``(d,)`` vector."""

    def _check_solvable(self, regul: Any, method: str) -> None:
        """Raise, before an eager solve dispatches, for a ``regul`` that ``method`` cannot
        solve with, known from the values at hand (default: none; ``PMatLowRank``: a
        division by ``shift + regul = 0``; ``PMatKFAC``/``PMatEKFAC``: stored zero
        eigenvalues undamped)."""

    def _differentiated_as_solve(self, v: jax.Array, regul, solve: Callable) -> jax.Array:
        """``solve(v)``, an answer of ``(M + regul·I) x = v`` through a factorisation (an
        ``eigh``), differentiated as that linear system (``lax.custom_linear_solve``:
        ``dx = (M + regul·I)⁻¹(dv − dM x − dregul x)``, by ``solve`` again), not through the
        factorisation, whose eigenvectors' derivative ``1/(λⱼ − λᵢ)`` is NaN or wrong where
        eigenvalues repeat. The primal work is ``solve``'s alone. In the dtype that ``v``,
        the matrix and ``regul`` promote to (a float64 ``regul`` of a float32 matrix: float64,
        as the other solves answer): the linear solve's products and answers must share
        ``v``'s, or its program does not lower."""
        dtype = jnp.result_type(v, self.dtype, regul)
        return jax.lax.custom_linear_solve(
            lambda x: (self._mv(x) + regul * x).astype(dtype), v.astype(dtype),
            lambda _, b: solve(b).astype(dtype), symmetric=True)

    def _solve(self, v: jax.Array, regul, method: str, **options) -> jax.Array:
        """``(M + regul·I)⁻¹ v`` for a flat vector; the base offers the iterative solves
        (:data:`ITERATIVE_SOLVES`): conjugate gradient, MINRES and the Neumann series,
        whose ``scale`` defaults to ``1/(‖M‖_F + |regul|)`` (``≤ 1/λ_max(M + regul·I)``:
        the series converges for any ``M ⪰ 0`` with ``regul > 0``)."""
        if method not in ITERATIVE_SOLVES:
            raise ValueError(
                f"unknown solve method {method!r} for {type(self).__name__}; valid methods: "
                f"{self.SOLVE_METHODS}"
            )

        def matvec(x):
            return self._mv(x) + regul * x

        if method == "neumann":
            scale = options.pop("scale", None)
            if scale is None:
                scale = 1 / (self.frobenius_norm() + jnp.abs(regul))
            return neumann(matvec, v, scale=scale, **options)
        preconditioner = options.pop("preconditioner", None)
        if isinstance(preconditioner, PMatAbstract):
            p, r = preconditioner, regul
            options["preconditioner"] = lambda x: p._solve(x, r, p.SOLVE_METHODS[0])
        elif preconditioner is not None:
            options["preconditioner"] = preconditioner
        return (cg if method == "cg" else minres)(matvec, v, **options)

    def _compiles_eager_calls(self) -> bool:
        """Whether the :attr:`COMPILED_OPERATIONS` compile when called eagerly (not for a
        representation whose operations stream data through compiled steps of their own)."""
        return True

    def _compiles_in_one_program(self) -> bool:
        """Whether a caller may compile the operations into one program of its own with
        XLA's default options: they compile when eager and do not run the model (whose
        programs need a model step's options, :attr:`RUNS_MODEL`)."""
        return self._compiles_eager_calls() and not self.RUNS_MODEL

    # ------------------------------------------------------------------ shapes
    @property
    def dtype(self):
        leaves = jax.tree_util.tree_leaves(self)
        return leaves[0].dtype if leaves else self.layer_collection.dtype

    def size(self, dim: int | None = None):
        """``(d, d)``, or ``d`` for ``dim`` in ``(0, 1)``."""
        d = self.layer_collection.numel()
        return (d, d) if dim is None else (d, d)[dim]

    def without_rank_bounds(self) -> PMatAbstract:
        """The same matrix without the static hints its build derived from the number of
        examples (KFAC's factor rank bounds, EKFAC's ranges: see
        :class:`~jaxgeom.pmat.kfac.PMatKFAC`): one pytree structure for builds on data of
        any size, and for an EKFAC's builds and refits, e.g. in a ``lax.cond``, a ``scan``
        carry or a ``tree_map`` over several. Here: the matrix itself."""
        return self

    # ------------------------------------------------------------------ products
    def mv(self, v: Any) -> Any:
        """``M v``. Accepts and returns a ``PVector``, a params pytree or a flat vector."""
        leaves, wrap = self._as_leaves(v)
        if leaves is not None:
            return self._from_leaves(self._mv(leaves), wrap)
        flat, wrap = as_flat(v, self.layer_collection)
        return wrap(self._mv(flat))

    def vTMv(self, v: Any) -> jax.Array:
        """The quadratic form ``vᵀ M v`` (a scalar)."""
        leaves, _ = self._as_leaves(v)
        if leaves is not None:
            return self._vTMv(leaves)
        flat, _ = as_flat(v, self.layer_collection)
        return self._vTMv(flat)

    def _as_leaves(self, v: Any):
        """``(LeafVector, wrap)`` for a ``PVector``/params pytree when the representation
        is :attr:`LEAFWISE`, else ``(None, None)``."""
        if not self.LEAFWISE:
            return None, None
        tree, wrap = as_tree(v, self.layer_collection)
        if tree is None:
            return None, None
        leaves = jax.tree_util.tree_leaves(tree)
        return LeafVector.of(leaves, self.layer_collection.offsets), wrap

    def _from_leaves(self, out: LeafVector, wrap: Callable[[Any], Any]) -> Any:
        """The vector of the kind :meth:`_as_leaves` read (``wrap``) holding ``out``."""
        layout = self.layer_collection
        return wrap(jax.tree_util.tree_unflatten(
            layout.treedef, [x.reshape(shape) for x, shape in zip(out.leaves, layout.shapes)]))

    def _vTMv(self, v: jax.Array) -> jax.Array:
        """``vᵀ M v`` for a flat vector (representations override it when cheaper than
        ``M v``)."""
        return jnp.vdot(v, self._mv(v))

    def mmap(self, rows: Any) -> jax.Array:
        """``M`` applied to each row of a stack of flat vectors ``(..., d)`` (e.g. the rows
        ``(outputs, examples, d)`` of a Jacobian map): returns the same shape."""
        rows = as_rows(rows, self.layer_collection)
        flat = rows.reshape(-1, rows.shape[-1])
        return jax.vmap(self._mv)(flat).reshape(rows.shape)

    def quadratic_forms(self, rows: Any) -> jax.Array:
        """The ``(m, m)`` matrix ``R M Rᵀ`` of every ``rᵢᵀ M rⱼ`` for the rows of an ``(m,
        d)`` stack of flat vectors ``R`` (symmetrised): ``M`` on the subspace they span, e.g.
        the quadratic model of a loss on a few directions (an optimizer's learning rate and
        momentum). Cost: :meth:`mmap` of the ``m`` rows and ``m² d``."""
        rows = stack_of_rows(rows, self.layer_collection)
        forms = rows @ self.mmap(rows).T
        return 0.5 * (forms + forms.T)

    def mapTMmap(self, rows: Any, reduction: str = "sum") -> jax.Array:
        """Quadratic forms ``rᵀ M r`` of the rows of a ``(K, N, d)`` Jacobian map.

        ``reduction="diag"`` returns the ``(K, N)`` forms ``J[o, n] M J[o, n]ᵀ``; ``"sum"``
        sums them over the outputs ``K`` and returns ``(N,)``; ``"full"`` returns, for each
        example, the ``(K, K)`` matrix of all output pairs,

        .. math::  C[n, o, o'] = \\sum_{i,j} J[o, n, i]\\, M_{ij}\\, J[o', n, j],
           \\qquad C_n = J_n M J_n^\\top,

        shape ``(N, K, K)`` (symmetrised): with ``M = Σ`` a Laplace posterior covariance,
        the linearised predictive covariance of the outputs at each input, whose diagonal
        is ``"diag"``'s forms.
        """
        if reduction not in ("sum", "diag", "full"):
            raise ValueError(f"reduction must be 'sum', 'diag' or 'full'; got {reduction!r}")
        rows = as_rows(rows, self.layer_collection)
        if reduction == "full":
            if rows.ndim != 3:
                raise ValueError("reduction='full' needs a (K, N, d) map; got shape "
                                 f"{rows.shape}")
            cov = jnp.einsum("oni,pni->nop", rows, self.mmap(rows))
            return 0.5 * (cov + jnp.swapaxes(cov, -1, -2))
        forms = jnp.sum(rows * self.mmap(rows), axis=-1)
        if reduction == "sum":
            if forms.ndim < 2:
                raise ValueError("reduction='sum' needs a (K, N, d) map; use reduction='diag'")
            return jnp.sum(forms, axis=0)
        return forms

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, PMatAbstract):
            return self.mm(other)
        if hasattr(other, "to_dense") and not isinstance(other, (jax.Array, PVector)):
            return self.mmap(other)
        return self.mv(other)

    # ------------------------------------------------------------------ dense views
    def to_dense(self) -> jax.Array:
        """The ``(d, d)`` matrix in the flat order (generic: ``d`` products)."""
        d = self.layer_collection.numel()
        return jax.vmap(self._mv)(jnp.eye(d, dtype=self.dtype)).T

    def get_diag(self) -> jax.Array:
        """The diagonal ``(d,)`` in the flat order."""
        return _spectral.diagonal(self.to_dense())

    def trace(self) -> jax.Array:
        return jnp.sum(self.get_diag())

    def frobenius_norm(self) -> jax.Array:
        return jnp.linalg.norm(self.to_dense())

    def eigvalsh(self) -> jax.Array:
        """All eigenvalues, ascending (the matrix is taken symmetric)."""
        return _spectral.eigvalsh(self.to_dense())

    def slogdet(self, regul: Any = 0.0) -> tuple[jax.Array, jax.Array]:
        """``(sign, log|det(M + regul·I)|)``, as ``numpy.linalg.slogdet``.

        .. math:: \\log|\\det(M + \\lambda I)| = \\textstyle\\sum_i \\log|\\lambda_i(M) + \\lambda|,
           \\quad \\mathrm{sign} = \\prod_i \\mathrm{sign}(\\lambda_i(M) + \\lambda)

        from the ``d`` eigenvalues of :meth:`eigvalsh`, so at its cost: ``d³`` dense,
        ``Σ d_l³`` per block, the factors' ``Σ (a_l³ + g_l³)`` for KFAC (with the exact
        damping ``A ⊗ G + λI``, never π-damping), ``d`` for diagonal ones and EKFAC,
        ``(NK)² d`` for a low-rank one (whose ``d − r`` zero eigenvalues give
        ``(d − r)·log λ``). A singular ``M + regul·I`` gives ``(0, -inf)`` where its zero
        eigenvalues are exact (a low-rank or diagonal one's); where they come out of an
        ``eigh`` (a dense, block-diagonal or Kronecker Fisher of rank below ``d``) they are
        round-off, ``±n·ε·‖M‖``, and so are the sign and the log (NaN for ``logdet`` when
        one is negative), as NumPy's ``slogdet`` of such a matrix: called from Python it
        warns (``RuntimeWarning``) when a nonzero eigenvalue ``+ regul`` is below ``10·ε``
        times the largest (not for a diagonal's, its stored entries, exact: see
        :attr:`EXACT_EIGENVALUES`). A Fisher of rank below ``d`` needs ``regul`` well above
        that (as in a Laplace posterior's ``log det(F·N + prior·I)``). Returns two
        scalars.
        """
        values = self.eigvalsh()
        if not self.EXACT_EIGENVALUES:
            _spectral.warn_if_round_off(values + regul, "slogdet")
        return _spectral.slogdet(values, regul)

    def logdet(self, regul: Any = 0.0) -> jax.Array:
        """``log det(M + regul·I)`` (a scalar): :meth:`slogdet`'s ``log|det|`` when the
        determinant is positive, ``-inf`` when it is 0 and NaN when it is negative
        (``torch.logdet``'s and curvlinops' convention). Same cost as :meth:`slogdet`."""
        return _spectral.logdet(*self.slogdet(regul))

    def norm(self, ord: Any = None) -> jax.Array:
        """``None``/``"fro"``: Frobenius norm; ``2``: largest ``|λ|``; ``-2``: smallest
        (``ord`` a Python, NumPy or concrete JAX number, fixed when compiled)."""
        ord = static_order(ord)
        if ord not in (None, "fro", 2, -2):
            raise ValueError(f"unknown norm ord {ord!r}; valid: None, 'fro', 2, -2")
        return self._norm(None if ord in (None, "fro") else int(ord))  # static when compiled

    def _norm(self, ord: int | None) -> jax.Array:
        if ord is None:
            return self.frobenius_norm()
        ev = jnp.abs(self.eigvalsh())
        return jnp.max(ev) if ord == 2 else jnp.min(ev)

    # ------------------------------------------------------------------ solves & functions
    def solve(self, v: Any, regul: Any = 0.0, *, method: str | None = None, **options) -> Any:
        """``(M + regul·I)⁻¹ v``.

        ``v`` is a vector (``PVector``, params pytree or flat ``(d,)``) or a stack of flat
        vectors ``(..., d)`` / a Jacobian map, solved row by row. ``method`` is one of
        ``SOLVE_METHODS`` (first = default), which every representation ends with the
        iterative methods on the whole matrix (:mod:`jaxgeom.solvers`): ``"cg"``
        (positive definite) and ``"minres"`` (symmetric, indefinite or singular) accept
        ``x0``, ``rtol``, ``atol``, ``maxiter`` and ``preconditioner`` (any representation,
        solved with the same ``regul``, or a callable; positive definite for MINRES);
        ``"neumann"`` (the truncated series, positive definite) ``scale`` (default
        ``1/(‖M‖_F + |regul|)``) and ``num_terms`` (default 100).

        Raises:
          ValueError: for a ``regul`` that is not a scalar or (concrete) not finite, an
            unknown ``method``, CG/MINRES tolerances or ``maxiter`` out of range
            (:func:`jaxgeom.solvers.check_cg_options`), a Neumann ``scale``/``num_terms``
            out of range, (eagerly) a Neumann series that diverged, or (eagerly) an
            undamped solve of a matrix known to be singular (``PMatLowRank`` of rank
            ``< d`` with ``shift + regul = 0``, an EKFAC's exact zero eigenvalues).
          TypeError: for an option the method does not take, or a preconditioner that is
            neither a representation nor a callable.
        """
        method = self.SOLVE_METHODS[0] if method is None else method
        if method not in self.SOLVE_METHODS:
            raise ValueError(
                f"unknown solve method {method!r} for {type(self).__name__}; valid methods: "
                f"{self.SOLVE_METHODS}"
            )
        accepted = self.SOLVE_OPTIONS.get(method, ())
        unknown = sorted(set(options) - set(accepted))
        if unknown:
            raise TypeError(
                f"{type(self).__name__}.solve(method={method!r}) takes no option "
                f"{', '.join(unknown)}; its options: {', '.join(accepted) or 'none'}")
        if _is_map(v, self.layer_collection):
            rows = as_rows(v, self.layer_collection)
            flat = rows.reshape(-1, rows.shape[-1])
            if isinstance(flat, jax.core.Tracer):
                solved = vmap_reporting(lambda r: self._solve(r, regul, method, **options))(
                    flat)
            else:  # an eager solve (PMatImplicit's CG from Python, a callable preconditioner):
                # a vmap of it would compile its loop anew at every call
                solved = (jnp.stack([self._solve(r, regul, method, **options) for r in flat])
                          if len(flat) else jnp.zeros_like(flat))
            return solved.reshape(rows.shape)
        if method in self.LEAFWISE_SOLVES and not options:
            leaves, wrap = self._as_leaves(v)
            if leaves is not None:
                return self._from_leaves(self._solve(leaves, regul, method), wrap)
        if options.get("x0") is not None:  # a warm start in any vector form, as v
            options = {**options, "x0": as_flat(options["x0"], self.layer_collection, "x0")[0]}
        flat, wrap = as_flat(v, self.layer_collection)
        return wrap(self._solve(flat, regul, method, **options))

    def inv(self, regul: Any = 0.0) -> PMatAbstract:
        """``(M + regul·I)⁻¹`` as a representation."""
        self._unsupported("inv", "use solve(v, regul) instead")

    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatAbstract:
        """Moore–Penrose pseudo-inverse (eigenvalues ``|λ| ≤ max(atol, rtol·max|λ|)``
        dropped, ``max|λ|`` over the whole matrix; by default ``rtol = d·eps`` without
        ``atol``, as ``jnp.linalg.pinv`` gives a ``d × d`` matrix, whatever the
        representation's blocks)."""
        self._unsupported("pinv")

    def pow(self, p: Any, regul: Any = 0.0) -> PMatAbstract:
        """``(M + regul·I)^p``; non-integer powers take the matrix as PSD."""
        self._unsupported("pow")

    def __pow__(self, p: Any) -> PMatAbstract:
        return self.pow(p)

    def eigh(self) -> tuple[jax.Array, jax.Array]:
        """Eigendecomposition ``(λ ascending, V)`` with ``M = V diag(λ) Vᵀ``."""
        self._unsupported("eigh")

    def eigsh(self, k: int, which: str = "LA") -> tuple[jax.Array, jax.Array]:
        """``k`` eigenpairs of the (symmetric) matrix, exactly: scipy's and curvlinops'
        ``eigsh``, PyHessian's top-``k`` eigenvectors.

        ``which`` chooses the ``k`` among the ``d`` eigenvalues: ``"LA"`` the largest
        (default; the dominant directions of a Fisher), ``"SA"`` the smallest, ``"LM"`` the
        largest in magnitude (an indefinite Hessian's, either sign). Returns ``(λ, V)``:
        ``λ`` ``(k,)`` **ascending** (scipy's order: ``λ[-1]`` is the top eigenvalue with
        ``"LA"``; ``λ[::-1]``, ``V[:, ::-1]`` for the top first) and orthonormal ``V``
        ``(d, k)``, ``M V = V diag(λ)``, columns in flat order
        (``PVector.from_flat(M.layer_collection, V[:, i])`` for a params-shaped one). An
        eigenvector is defined up to its sign, and within a repeated eigenvalue's
        eigenspace only that space is (any orthonormal basis of it; ties at the boundary of
        the ``k`` are broken arbitrarily).

        Cost: without forming ``d × d`` where the structure allows it — KFAC/EKFAC from the
        factors' (or stored) eigenbases, ``Σ (a_l³ + g_l³)`` plus ``O(k d)``;
        ``PMatBlockDiag`` ``Σ d_l³``; ``PMatQuasiDiag`` per-neuron ``eigh``,
        ``Σ g_l (a_l + 1)³``; ``PMatLowRank`` from its thin ``eigh``; ``PMatMixed`` each
        part's own ``eigsh`` of ``min(k, d_p)`` pairs, merged; diagonal ones
        ``O(d log k)`` — and otherwise (``PMatDense``) from ``to_dense()``'s ``eigh``,
        ``d³``. A matrix-free ``PMatImplicit`` raises: use
        :func:`jaxgeom.estimators.lanczos_eigsh` (Lanczos, from products only),
        :func:`jaxgeom.estimators.restarted_lanczos_eigsh` (thick restarts, bounded
        memory) or :func:`jaxgeom.estimators.lobpcg_eigsh` (blocks of products).

        Raises:
          ValueError: ``k`` not an integer in ``[1, d]``, or an unknown ``which``.
        """
        _spectral.check_eigsh_options(k, which, self.size(0))
        return self._eigsh(k, which)

    def _eigsh(self, k: int, which: str) -> tuple[jax.Array, jax.Array]:
        """:meth:`eigsh` once checked; by default from the dense matrix's ``eigh``."""
        evals, evecs = _spectral.eigh(self.to_dense())
        chosen = _spectral.select(evals, k, which)
        return evals[chosen], evecs[:, chosen]

    # ------------------------------------------------------------------ algebra
    def mm(self, other: PMatAbstract) -> PMatAbstract:
        """The matrix product ``self · other`` (dense unless a cheaper form exists)."""
        from jaxgeom.pmat.dense import PMatDense

        self._check_compatible(other)
        return PMatDense(self.layer_collection, self.to_dense() @ other.to_dense())

    def _scale(self, s: Any) -> PMatAbstract:
        self._unsupported("scalar multiplication")

    def _add_same(self, other: PMatAbstract, sign: int) -> PMatAbstract:
        self._unsupported("addition", "convert to PMatDense first")

    def __add__(self, other: Any) -> PMatAbstract:
        if not isinstance(other, PMatAbstract):
            return self._array_operand(other, "+")
        return _combine(self, other, 1)

    def __sub__(self, other: Any) -> PMatAbstract:
        if not isinstance(other, PMatAbstract):
            return self._array_operand(other, "-")
        return _combine(self, other, -1)

    def __rmatmul__(self, other: Any) -> Any:
        return self._array_operand(other, "@", reflected=True)

    # ------------------------------------------------------------------ layer subsets
    def restrict(self, layer_ids: str | Sequence[str]) -> PMatAbstract:
        """The principal sub-matrix ``M[S, S]`` on the layers ``S = layer_ids`` (one id or a
        sequence of them, as :func:`jaxgeom.restriction.restrict` takes, in any order).

        .. math::  M_S = P_S\\, M\\, P_S^\\top, \\qquad P_S \\in \\{0, 1\\}^{d_S \\times d}

        the rows and columns of ``M`` at the layers' flat positions ``R.indices`` (``R =
        restrict(M.layer_collection, layer_ids)``), on ``R.layer_collection`` (``d_S × d_S``,
        the sub-collection's flat order). Exact, and in the same representation where it
        is cheap: ``PMatDense`` (the rows and columns, ``d_S²``), ``PMatBlockDiag`` (the
        layers' blocks), ``PMatDiag`` (``d_S``), ``PMatEye`` (``O(1)``), ``PMatKFAC`` and
        ``PMatEKFAC`` (the layers' factors or eigenbases and exact blocks, ``O(1)``: no
        array is copied), ``PMatQuasiDiag`` (``d_S``), ``PMatLowRank`` (the factor's
        columns, ``r d_S``; the weights and the shift kept), ``PMatMixed`` (the parts on
        ``S``, a part that straddles ``S`` restricted in turn) and ``PMatImplicit`` (the
        same data replayed through the function of the layers' parameters alone,
        ``Restriction.apply_fn``: nothing computed). Another representation gets the
        generic route: ``M`` applied to the ``d_S`` unit vectors of ``S`` (``d_S``
        products, memory ``d_S d``), a ``PMatDense``.

        ``S`` holding every layer gives ``M`` itself (as
        :meth:`~jaxgeom.layers.LayerCollection.intersection` does). A restriction of a
        restriction is the restriction of the model: ``M1.restrict(common) +
        M2.restrict(common)`` adds matrices built on overlapping layer subsets on their
        common layers (``common = M1.layer_collection.get_common_layers(
        M2.layer_collection)``, NNGeometry's convention for such sums).

        Raises:
          KeyError: for an id that is not a layer of ``M.layer_collection``.
          ValueError: for no id or a repeated one.
        """
        r = restrict(self.layer_collection, layer_ids)
        if len(r.layer_collection.layers) == len(self.layer_collection.layers):
            return self
        return self._restricted(r)

    def _restricted(self, r: Restriction) -> PMatAbstract:
        """``M[S, S]`` for the restriction ``r`` to fewer layers than ``M``'s. Generic:
        ``M`` applied to the unit vectors ``e_i``, ``i ∈ r.indices`` (``d_S`` products),
        their rows ``S``, as a ``PMatDense``; representations override it where their
        structure gives the sub-matrix cheaply."""
        from jaxgeom.pmat.dense import PMatDense

        idx = r.indices
        units = jnp.zeros((len(idx), self.layer_collection.numel()), self.dtype)
        columns = jax.vmap(self._mv)(units.at[np.arange(len(idx)), idx].set(1))
        return PMatDense(r.layer_collection, take(columns, idx, 1).T)

    # ------------------------------------------------------------------ construction
    #: rank in the promotion order ``Eye < Diag < BlockDiag < Dense`` used by ``+``/``-``
    #: between different representations (``None``: converts to dense).
    PROMOTION_RANK: ClassVar[int | None] = None
    #: whether ``M ± x·I`` (a :class:`~jaxgeom.pmat.eye.PMatEye`) stays in this
    #: representation outside the promotion order (``from_pmat`` takes the identity)
    ABSORBS_IDENTITY: ClassVar[bool] = False
    #: whether :meth:`eigvalsh` answers stored values as they are, exact (a diagonal's
    #: entries): :meth:`slogdet` takes their logarithms without a round-off check (a
    #: factorisation's eigenvalues within ``10·ε`` of the largest warn)
    EXACT_EIGENVALUES: ClassVar[bool] = False

    @classmethod
    def from_pmat(cls, other: PMatAbstract) -> PMatAbstract:
        """Convert another representation to this one (exact conversions only; one of this
        representation is returned as it is)."""
        if type(cls._check_pmat(other)) is cls:
            return other
        raise NotImplementedError(
            f"{cls.__name__} cannot hold a {type(other).__name__} exactly (from_pmat makes "
            "exact conversions only). PMatDense.from_pmat(M) holds any matrix whose d² "
            f"entries fit; for a {cls.__name__} approximation, build it from the data "
            f"(FIM(apply_fn, params, data, {cls.__name__}))"
        )

    @classmethod
    def _check_pmat(cls, other: Any) -> PMatAbstract:
        """``other`` if it is a matrix representation; else a ``TypeError``."""
        if not isinstance(other, PMatAbstract):
            raise TypeError(
                f"{cls.__name__}.from_pmat takes a matrix representation (a PMat*); got a "
                f"{type(other).__name__}" + (
                    f": wrap an array as {cls.__name__}(layer_collection, array)"
                    if hasattr(other, "shape") else ""))
        return other

    @classmethod
    def accumulator(cls, layer_collection: LayerCollection, **options) -> Any:
        """How this representation reduces per-example Jacobians (see :mod:`jaxgeom.jacobian`)."""
        raise TypeError(
            f"{cls.__name__} is not built from data (construct it directly); representations "
            "that are: "
            + ", ".join(c.__name__ for c in REGISTRY if _buildable(c))
        )

    @classmethod
    def chunk_builder(cls, fn: Callable, params: Any, example: Any, aux: Any,
                      layout: LayerCollection, *, mode: str = "auto",
                      **options) -> streaming.ChunkBuilder:
        """How this representation is built from data, chunk by chunk
        (:mod:`jaxgeom.streaming`), for a per-example ``fn`` at ``params`` and the shapes of
        one ``example``. Default: the per-example Jacobians reduced by :meth:`accumulator`
        (:class:`~jaxgeom.jacobian.JacobianBuilder`); representations built from captured
        layer inputs and output gradients, or kept as a function, override it."""
        return JacobianBuilder.make(fn, params, example, aux,
                                    cls.accumulator(layout, **options), mode, layout)

    @classmethod
    def from_jacobians(
        cls,
        fn: Callable,
        params: Any,
        data: Any,
        *,
        layer_collection: LayerCollection,
        batch_size: int | None = None,
        mode: str = "auto",
        aux: Any = None,
        **options,
    ) -> PMatAbstract:
        """``(1/N) Σₙ Jₙᵀ Jₙ`` of a per-example function ``fn`` over ``data``: the chunks of
        ``data`` streamed through :meth:`chunk_builder` by :func:`jaxgeom.streaming.run`
        (one pass; two for EKFAC's refit)."""
        result, flags = cls._from_jacobians_with_flags(
            fn, params, data, layer_collection=layer_collection, batch_size=batch_size,
            mode=mode, aux=aux, **options)
        streaming.check_flags(flags)
        return result

    @classmethod
    def _from_jacobians_with_flags(cls, fn, params, data, *, layer_collection, batch_size,
                                   mode, aux, **options) -> tuple[PMatAbstract, list]:
        """:meth:`from_jacobians` and its chunks' finiteness flags, unchecked
        (:func:`jaxgeom.streaming.run_with_flags`: a traced caller returns them)."""
        check_precision(cls, params)

        def make(example):
            return cls.chunk_builder(fn, params, example, aux, layer_collection, mode=mode,
                                     **options)

        return streaming.run_with_flags(make, params, data, batch_size=batch_size, aux=aux)

    # ------------------------------------------------------------------ helpers
    def _check_compatible(self, other: PMatAbstract) -> None:
        """Refuse ``other`` unless it has this matrix's layout, naming what differs."""
        if other.layer_collection == self.layer_collection:
            return
        subsets = _layer_subsets(self.layer_collection, other.layer_collection)
        if subsets is not None:
            raise ValueError(
                f"{type(self).__name__} and {type(other).__name__} act on different subsets "
                f"of the model's layers: {_subset_words(*subsets)}")
        field, detail = self.layer_collection.difference(other.layer_collection)
        fix = {
            "dtypes": "build both from parameters of one dtype (cast one set: "
                      "jax.tree.map(lambda p: p.astype(jnp.float32), params))",
            "layers": "build the second on the first's layout, layer_collection="
                      "M.layer_collection (PMatEye(M.layer_collection, λ), FIM(..., "
                      "layer_collection=M.layer_collection)): one from "
                      "LayerCollection.from_params has kinds 'other' where a build from the "
                      "model (LayerCollection.from_model) has 'dense', 'conv', …",
        }.get(field, "build both for the same parameters, with layer_collection="
                     "M.layer_collection")
        raise ValueError(
            f"{type(self).__name__} and {type(other).__name__} act on different parameter "
            f"layouts: their {field} differ ({detail}). To combine them, {fix}")

    def _unsupported(self, op: str, hint: str = "") -> None:
        method = _CAPABILITY_METHOD.get(op, op)
        able = [c.__name__ for c in REGISTRY if _implements(c, method)]
        raise NotImplementedError(
            f"{type(self).__name__} does not support {op}"
            + (f" ({hint})" if hint else "")
            + (f"; representations that do: {', '.join(able)}" if able else "")
        )

    def __repr__(self) -> str:
        d = self.layer_collection.numel()
        return f"{type(self).__name__}(d={d}, layers={len(self.layer_collection)})"


def take(x: jax.Array, idx: np.ndarray, axis: int = -1) -> jax.Array:
    """``x`` at the static indices ``idx`` along ``axis`` (a slice when they are a range)."""
    start = int(idx[0])
    if int(idx[-1]) - start + 1 == len(idx):
        return jax.lax.slice_in_dim(x, start, start + len(idx), axis=axis)
    return jnp.take(x, idx, axis=axis)


def _implements(cls: type, method: str) -> bool:
    """Whether ``cls`` overrides ``method`` (an override marked ``unsupported`` only raises;
    the wrappers :func:`representation` puts on every class's compiled operations are seen
    through)."""
    found, base = (_unwrapped(getattr_static(c, method, None)) for c in (cls, PMatAbstract))
    return found is not base and not getattr(found, "unsupported", False)


def _unwrapped(method: Any) -> Any:
    """The method under a :func:`~jaxgeom._dispatch.compiled_when_eager` wrapper or a
    :func:`_scalar_regul` check."""
    return inspect.unwrap(getattr(method, "eager_method", method))


def _buildable(cls: type) -> bool:
    return any(_implements(cls, m) for m in ("accumulator", "chunk_builder", "from_jacobians"))


def check_precision(cls: type, params: Any) -> None:
    """Refuse parameters in a floating type narrower than 32 bits (``bfloat16``,
    ``float16``): the build's sums over examples and chunks would be kept in it (a
    ``bfloat16`` total has 8 significant bits: once it is 256 times one chunk's share, the
    next chunks round away; a ``float16`` Kronecker factor overflows at 65504) and LAPACK
    has no factorisation in it."""
    for leaf in jax.tree_util.tree_leaves(params):
        dtype = getattr(leaf, "dtype", None)
        if dtype is not None and dtype_is(dtype, jnp.floating) and dtype.itemsize < 4:
            raise TypeError(
                f"{getattr(cls, '__name__', cls)} is built from parameters in float32 or "
                f"float64; got {jnp.dtype(dtype).name} parameters, in which the sums over "
                "examples would "
                "lose most of the curvature (and which LAPACK cannot factorise). Build from "
                "float32 copies: jax.tree.map(lambda p: p.astype(jnp.float32), params). A "
                "model that computes in bfloat16 from float32 parameters (Flax's "
                "dtype=jnp.bfloat16, param_dtype=jnp.float32) is built as it is.")


def _is_map(v: Any, layout: LayerCollection) -> bool:
    """Whether ``v`` is a stack of flat vectors (or a Jacobian map) rather than one vector."""
    if isinstance(v, PVector):
        return False
    if hasattr(v, "to_dense") and not isinstance(v, jax.Array):
        return True
    is_array = isinstance(v, (jax.Array, np.ndarray))
    params_shaped = len(layout.shapes) == 1 and tuple(np.shape(v)) == layout.shapes[0]
    return is_array and np.ndim(v) >= 2 and np.shape(v)[-1] == layout.numel() and not (
        params_shaped
    )


def _layer_subsets(a: LayerCollection, b: LayerCollection) -> tuple | None:
    """``(union, only_a, only_b, common)`` (layer ids) when ``a`` and ``b`` are different
    layer subsets of one model (:meth:`~jaxgeom.layers.LayerCollection.union` holds
    both), else ``None``."""
    if {layer.id for layer in a.layers} == {layer.id for layer in b.layers}:
        return None
    try:
        union = a.union(b)
    except ValueError:
        return None
    common = a.get_common_layers(b)
    only = tuple(tuple(layer.id for layer in lc.layers if layer.id not in common)
                 for lc in (a, b))
    return union, *only, common


def _subset_words(union: LayerCollection, only_a: tuple, only_b: tuple,
                  common: tuple) -> str:
    """The layers each of two overlapping layer subsets holds, and how to combine them."""
    ids = [layer.id for layer in union.layers]
    return (
        f"layers {list(only_a)} only in the first, {list(only_b)} only in the second, "
        f"{list(common)} in both. A sum or product of matrices on overlapping subsets "
        "is not defined here (on the union, with zeros elsewhere, or on the common layers "
        "only, NNGeometry's convention?). Restrict both to the common layers, "
        f"M1.restrict({list(common)}) + M2.restrict({list(common)}) (their principal "
        "sub-matrices, exact and without a rebuild: NNGeometry's sum), or build both on one "
        "layout, the union "
        f"R = restrict(layer_collection, {ids}) (its layer collection is "
        "M1.layer_collection.union(M2.layer_collection)) or the common layers "
        f"R = restrict(layer_collection, {list(common)}) "
        "(M1.layer_collection.intersection(M2.layer_collection)), with FIM(R.apply_fn("
        "apply_fn, params), R.select(params), data, PMat…, layer_collection=R.layer_collection)"
        " (jaxgeom.restriction.restrict). Matrices on disjoint subsets add up to a PMatMixed")


def _disjoint_sum(a: PMatAbstract, b: PMatAbstract, sign: int) -> PMatAbstract | None:
    """``a + sign·b`` for matrices on disjoint layer subsets of one model (each zero on
    the other's layers): the block-diagonal :class:`~jaxgeom.pmat.mixed.PMatMixed` of
    the two on their union, each part kept in its representation (cost: a scaling of
    ``b`` for ``-``). ``None`` when the layouts are not disjoint subsets of one model."""
    subsets = _layer_subsets(a.layer_collection, b.layer_collection)
    if subsets is None or subsets[3]:
        return None
    from jaxgeom.pmat.mixed import PMatMixed

    for m in (a, b):
        if getattr(m, "NEEDS_REPLAY", False):
            m._unsupported("addition", "build both operands in a stored representation")
    return PMatMixed.from_mapping(subsets[0], [a, b if sign == 1 else -1.0 * b])


def _combine(a: PMatAbstract, b: PMatAbstract, sign: int) -> PMatAbstract:
    """``a + sign·b`` in the least structured representation that holds both exactly; for
    matrices on disjoint layer subsets of one model, their block-diagonal
    :class:`~jaxgeom.pmat.mixed.PMatMixed` on the union of the subsets."""
    if a.layer_collection != b.layer_collection:
        disjoint = _disjoint_sum(a, b, sign)
        if disjoint is not None:
            return disjoint
    a._check_compatible(b)
    for m in (a, b):
        if getattr(m, "NEEDS_REPLAY", False):  # never densify a matrix-free operator silently
            m._unsupported("addition", "build both operands in a stored representation")
    if type(a) is type(b):
        return a._add_same(b, sign)
    ranks = (type(a).PROMOTION_RANK, type(b).PROMOTION_RANK)
    if ranks[0] == 0 and type(b).ABSORBS_IDENTITY:  # x·I ± M: M's representation
        target = type(b)
    elif ranks[1] == 0 and type(a).ABSORBS_IDENTITY:
        target = type(a)
    elif None in ranks:
        from jaxgeom.pmat.dense import PMatDense

        target = PMatDense
    else:
        target = type(a) if ranks[0] >= ranks[1] else type(b)
    return target.from_pmat(a)._add_same(target.from_pmat(b), sign)


def stack_of_rows(rows: Any, layout: LayerCollection) -> jax.Array:
    """``rows`` as an ``(m, d)`` stack of flat vectors (:func:`~jaxgeom.vector.as_rows`),
    refused otherwise."""
    rows = as_rows(rows, layout, "stack of rows")
    if rows.ndim != 2:
        raise ValueError(f"quadratic_forms takes an (m, {layout.numel()}) stack of flat "
                         f"vectors; got shape {rows.shape} (stack params-shaped vectors "
                         "with jnp.stack of their flat forms, e.g. PVector.to_flat())")
    return rows
