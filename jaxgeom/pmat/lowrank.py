"""``PMatLowRank``: ``M = Fᵀ diag(c) F + s·I`` from a thin factor ``F`` (``r × d``,
``r ≪ d``) and an optional shift ``s``."""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._sorting import sort
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat import _spectral
from jaxgeom.pmat._gram import gram, gram_norm_sq
from jaxgeom.pmat.base import (
    ITERATIVE_SOLVE_METHODS,
    ITERATIVE_SOLVES,
    PMatAbstract,
    check_shape,
    representation,
    static_field,
    take,
)
from jaxgeom.vector import as_flat


@representation
class PMatLowRank(PMatAbstract):
    """A matrix of rank at most ``r``, plus an optional multiple of the identity:
    ``M = Fᵀ diag(c) F + s·I = Σᵢ cᵢ fᵢ fᵢᵀ + s·I``.

    Built from data, ``F`` stacks the ``r = N·K`` per-example Jacobian rows unscaled
    (``(N K, d)``, example-major) and ``coef`` is the scalar ``1/N``. ``coef`` is either a
    scalar (the same weight for every row) or a ``(r,)`` vector of per-row weights of any
    sign: scalar multiplication scales it (so ``-M`` is exact, unlike NNGeometry's ``√s``
    rescaling of the factor), ``A ± B`` concatenates the factors and the weights
    (``[F_A; F_B]``, ``[c_A; ±c_B]``), and ``pinv``/``pow`` return the thin
    eigendecomposition as a factor ``Vᵀ`` with the new eigenvalues as weights. Every
    operation below holds for weights of any sign.

    Spectral operations use the thin QR ``Fᵀ = Q R`` (``Q``: ``d × k`` orthonormal,
    ``k = min(r, d)``): ``M = Q (R diag(c) Rᵀ) Qᵀ``, so the eigenpairs of the ``k × k`` core
    ``S = R diag(c) Rᵀ`` give those of ``M``. ``S`` has the spectrum of the Gram
    ``diag(√c) F Fᵀ diag(√c)`` (for ``c ≥ 0``), but the QR route also handles signed
    weights and gives orthonormal eigenvectors for zero eigenvalues (the Gram route
    ``V = Fᵀ U Λ^{-1/2}`` divides by them).

    The shift ``s`` (default 0: built from data, ``M`` is low-rank) makes the damped
    functions of a low-rank matrix exact in the same storage: with ``M = V diag(λ) Vᵀ +
    s·I`` (``V`` the thin eigenvectors), any spectral function is

    .. math::  f(M + \\rho I) = V \\operatorname{diag}\\big(f(\\lambda + s + \\rho)
       - f(s + \\rho)\\big) V^\\top + f(s + \\rho)\\, I,

    so ``inv(ρ)``, ``pow(p, ρ)`` and ``pinv`` of a shifted or damped matrix are again a
    ``PMatLowRank`` (a Laplace posterior ``(N F + τI)^{-1}`` and its square root for
    sampling, ``pow(-0.5, τ)``, as laplax's low-rank posteriors), ``M + x·PMatEye`` adds to
    the shift, and ``s`` scales with ``M``. Every operation below accounts for it (``+ s v``,
    ``+ s d`` in the trace, the ``d − k`` eigenvalues outside ``V``'s span equal ``s``).

    Costs (``r`` rows, ``d`` parameters): storage ``r d``; build ``N K B`` (the per-example
    Jacobians) and memory ``N K d``; ``mv``/``vTMv``/``get_diag``/``trace`` ``r d``;
    ``frobenius_norm`` ``r² d`` (Gram); ``eigh``/``eigvalsh``/``norm(2)``/``pinv``/``pow``
    ``r² d + r³``; ``solve`` ``r² d + r³`` (``"woodbury"``, ``"eigh"``) or CG;
    ``to_dense`` ``r d²``.

    Attributes:
      layer_collection: the parameter layout (static).
      factor: the ``(r, d)`` rows ``F``.
      coef: the weights ``c``: a scalar or a ``(r,)`` vector.
      shift: the scalar ``s`` (default 0).
    """

    layer_collection: LayerCollection = static_field()
    factor: jax.Array = dataclasses.field(default=None)
    coef: jax.Array = dataclasses.field(default=1.0)
    shift: jax.Array = dataclasses.field(default=0.0)

    #: ``M ± PMatEye`` adds to the shift (exact) instead of forming ``M`` densely
    ABSORBS_IDENTITY: ClassVar[bool] = True

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("woodbury", "eigh", *ITERATIVE_SOLVE_METHODS)
    FACTORISING_OPERATIONS: ClassVar[tuple[str, ...]] = PMatAbstract.FACTORISES

    def __post_init__(self):
        d = self.layer_collection.numel()
        shape = getattr(self.factor, "shape", None)
        check_shape("PMatLowRank factor", shape, f"(r, {d})", lambda s: s[1] == d, 2)
        coef_shape = tuple(getattr(self.coef, "shape", ()))
        if shape is not None and coef_shape not in (tuple(shape[:-2]), tuple(shape[:-1])):
            raise ValueError(
                f"PMatLowRank coef must be a scalar or have shape ({shape[-2]},) (one weight "
                f"per row of the factor); got shape {coef_shape}"
            )
        if isinstance(self.shift, (numbers.Number, np.ndarray, np.generic)) and isinstance(
                self.factor, (jax.Array, np.ndarray)):
            # an array leaf like the others (tree_map(lambda a: a.astype(...), M) works);
            # only for a matrix being made: a tree of other leaves (vmap's in_axes from
            # tree_map(lambda _: 0, M)) keeps them as they are
            dtype = getattr(self.factor, "dtype", None)
            dtype = self.layer_collection.dtype if dtype is None else dtype
            object.__setattr__(self, "shift", jnp.asarray(self.shift, dtype))
        if tuple(getattr(self.shift, "shape", ())) not in ((), tuple(shape[:-2] if shape else ())):
            raise ValueError(
                "PMatLowRank shift must be a scalar (M = Fᵀ diag(c) F + shift·I); got shape "
                f"{tuple(self.shift.shape)}")

    @property
    def rank_bound(self) -> int:
        """``r``, the number of rows of the factor (an upper bound on the rank)."""
        return self.factor.shape[0]

    def _weights(self) -> jax.Array:
        """The ``(r,)`` row weights ``c``."""
        return jnp.broadcast_to(jnp.asarray(self.coef, self.factor.dtype), (self.rank_bound,))

    # ------------------------------------------------------------------ primitives
    def _shift(self) -> jax.Array:
        """The shift ``s`` in the factor's dtype."""
        return jnp.asarray(self.shift, self.factor.dtype)

    def _mv(self, v):
        """``Fᵀ (c ⊙ F v) + s v``: two thin products, ``2 r d``."""
        # row-major friendly
        return (self._weights() * (self.factor @ v)) @ self.factor + self._shift() * v

    def vTMv(self, v: Any) -> jax.Array:
        """``Σᵢ cᵢ (fᵢ·v)² + s‖v‖²``, one thin product (``r d``)."""
        flat, _ = as_flat(v, self.layer_collection)
        return jnp.sum(self._weights() * (self.factor @ flat) ** 2) + self._shift() * (
            flat @ flat)

    def to_dense(self):
        d = self.layer_collection.numel()
        return self._column_gram().at[jnp.arange(d), jnp.arange(d)].add(self._shift())

    def get_diag(self):
        """``Σᵢ cᵢ fᵢ² + s`` (``r d``, one fused pass over ``F``: no ``F²`` is formed)."""
        return jnp.sum(self._weights()[:, None] * self.factor * self.factor, axis=0) + \
            self._shift()

    def _low_rank_trace(self) -> jax.Array:
        """``Σᵢ cᵢ ‖fᵢ‖²``, the trace without the shift (``r d``, one pass over ``F``)."""
        return self._weights() @ jnp.sum(self.factor * self.factor, axis=1)

    def trace(self):
        """``Σᵢ cᵢ ‖fᵢ‖² + s d`` (``r d``, one pass over ``F``)."""
        return self._low_rank_trace() + self._shift() * self.layer_collection.numel()

    def frobenius_norm(self):
        """``‖M‖_F² = ‖L‖_F² + 2 s tr(L) + s² d`` for ``L = Fᵀ diag(c) F``, with
        ``‖L‖_F² = Σᵢⱼ cᵢ cⱼ (F Fᵀ)ᵢⱼ²`` through the ``r × r`` Gram (``r² d``), or
        ``c² ‖FᵀF‖_F²`` through ``L`` itself (``r d²``) when ``d < r``: the squares of
        the symmetric Gram's upper blocks, reduced as they are multiplied
        (:func:`~jaxgeom.pmat._gram.gram_norm_sq`: about 44% fewer products, no Gram
        stored). Per-row weights with ``d < r`` form ``L`` (``r d²``)."""
        r, d = self.factor.shape
        if d >= r:
            low_rank = gram_norm_sq(self.factor.T, self._weights())
        elif jnp.ndim(self.coef) == 0:
            low_rank = jnp.asarray(self.coef, self.factor.dtype) ** 2 * gram_norm_sq(
                self.factor)
        else:
            low_rank = jnp.sum(self._column_gram() ** 2)
        s = self._shift()
        return jnp.sqrt(jnp.maximum(low_rank + 2 * s * self._low_rank_trace() + s * s * d, 0))

    def _column_gram(self) -> jax.Array:
        """``L = Fᵀ diag(c) F`` (``d × d``, ``r d²``; symmetric blocks for a scalar ``c``)."""
        if jnp.ndim(self.coef) == 0:
            return jnp.asarray(self.coef, self.factor.dtype) * gram(self.factor)
        return (self.factor * self._weights()[:, None]).T @ self.factor

    def eigh(self) -> tuple[jax.Array, jax.Array]:
        """The *thin* eigendecomposition: ``λ`` ``(k,)`` ascending and orthonormal ``V``
        ``(d, k)``, ``k = min(r, d)``, with ``M = V diag(λ) Vᵀ + s (I − V Vᵀ)``.

        The other ``d − k`` eigenvalues are the shift ``s`` (0 unless set; ``eigvalsh``
        returns all ``d``). Computed from the thin QR of ``Fᵀ`` and the ``k × k`` core (see
        the class docstring).
        """
        evals, evecs = self._low_rank_eigh()
        return evals + self._shift(), evecs

    def _low_rank_eigh(self) -> tuple[jax.Array, jax.Array]:
        """The thin eigendecomposition of ``L = Fᵀ diag(c) F`` (no shift)."""
        q, r = jnp.linalg.qr(self.factor.T)
        core = (r * self._weights()) @ r.T
        evals, u = _spectral.eigh((core + core.T) / 2)
        return evals, q @ u

    def _eigsh(self, k, which):
        """``k`` eigenpairs from the thin eigendecomposition (``r² d + r³``), never ``d × d``:
        among its ``k_r`` eigenvalues and ``min(k, d − k_r)`` copies of the shift ``s``
        (the eigenvalue of the ``d − k_r``-dimensional complement of ``V``'s span: at most
        ``k`` of them can be chosen), whose eigenvectors are an orthonormal basis of part of
        that complement — fixed normal vectors projected off ``V`` (twice) and
        orthonormalised by QR, ``O(d k (k_r + k))``."""
        evals, evecs = self.eigh()
        d, thin = evecs.shape
        extra = min(k, d - thin)
        if extra:
            sketch = jax.random.normal(jax.random.key(0), (d, extra), evecs.dtype)
            for _ in range(2):
                sketch = sketch - evecs @ (evecs.T @ sketch)
            complement, _ = jnp.linalg.qr(sketch)
            evals = jnp.concatenate([evals, jnp.full((extra,), self._shift())])
            evecs = jnp.concatenate([evecs, complement], axis=1)
        chosen = _spectral.select(evals, k, which)
        return evals[chosen], evecs[:, chosen]

    def eigvalsh(self):
        """All ``d`` eigenvalues, ascending: the thin ones and ``d − k`` copies of the shift
        (zeros unless set)."""
        evals, _ = self.eigh()
        rest = jnp.full(self.layer_collection.numel() - evals.shape[0], self._shift())
        return sort(jnp.concatenate([evals, rest]))

    def _check_solvable(self, regul, method):
        """``"woodbury"`` (when ``d ≥ r``) and ``"eigh"`` divide by ``shift + regul``: 0
        (concretely) is refused, as :meth:`inv` refuses it."""
        r, d = self.factor.shape
        divides = method == "eigh" or (method == "woodbury" and d >= r)
        if divides and _spectral.is_concrete_zero(regul + self.shift):
            raise ValueError(
                f"PMatLowRank.solve(method={method!r}) needs shift + regul ≠ 0: it divides the "
                "part of v outside the factor's rows by it, where M (rank ≤ r = "
                f"{r}, d = {d}) is singular or, for r ≥ d, where v has (to round-off) "
                "nothing. Pass a damping (solve(v, regul) solves (M + regul·I) x = v), use "
                "method='cg' on a full-rank M, or pinv().mv(v) for the least-squares solution")

    def _solve(self, v, regul, method, **options):
        """Exact ``(M + ρI)⁻¹ v``, null-space component ``v_⊥/λ`` included, where
        ``λ = s + ρ`` (the shift and the damping; ``λ ≠ 0``).

        - ``"woodbury"`` (default): with ``y = F x``, ``(λI + F Fᵀ diag(c)) y = F v`` (an
          ``r × r`` system), then ``x = (v − Fᵀ (c ⊙ y)) / λ``. ``r² d + r³``. When
          ``d < r`` the ``d × d`` system ``(Fᵀ diag(c) F + λI) x = v`` is smaller and
          solved instead (``r d² + d³``).
        - ``"eigh"``: ``x = V ((Vᵀv) / (λ + Λ)) + (v − V Vᵀ v) / λ`` from :meth:`eigh`.
        - ``"cg"``: conjugate gradient (the base class).

        ``λ = 0`` divides by zero unless ``M`` has full rank (use :meth:`pinv` instead).
        """
        if method in ITERATIVE_SOLVES:
            return super()._solve(v, regul, method, **options)
        regul = regul + self._shift()
        if method == "woodbury":
            r, d = self.factor.shape
            if d < r:
                return jnp.linalg.solve(self._column_gram() + regul * jnp.eye(d, dtype=v.dtype),
                                        v)
            w = self._weights()
            system = regul * jnp.eye(self.rank_bound, dtype=v.dtype) + gram(self.factor.T) * w
            y = jnp.linalg.solve(system, self.factor @ v)
            return (v - self.factor.T @ (w * y)) / regul
        if method == "eigh":
            return self._differentiated_as_solve(v, regul - self._shift(),
                                                 lambda b: self._eigh_solve(b, regul))
        return super()._solve(v, regul - self._shift(), method, **options)  # its error

    def _eigh_solve(self, v, regul):
        """``V ((Vᵀv) / (λ + Λ)) + (v − V Vᵀ v) / λ`` (``λ``: shift and damping)."""
        evals, evecs = self._low_rank_eigh()
        coords = evecs.T @ v
        return evecs @ (coords / (evals + regul)) + (v - evecs @ coords) / regul

    # ------------------------------------------------------------------ functions
    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatLowRank:
        """``M⁺ = V diag(1/λ) Vᵀ`` over the eigenvalues ``|λ| > max(atol, rtol·max|λ|)``,
        as a thin ``PMatLowRank`` (factor ``Vᵀ``, weights ``1/λ`` or 0); with a shift
        ``s``, the ``d − k`` eigenvalues ``s`` outside ``V``'s span are thresholded alike
        and the result has the shift ``1/s`` (or 0).

        Default threshold: ``rtol = d·eps`` (``numpy.linalg.pinv``'s, on the ``d × d``
        matrix). Cost ``r² d + r³``.
        """
        return self._spectral_function(lambda x: self._pinv_values(x, atol, rtol), 0.0)

    def inv(self, regul: Any = 0.0) -> PMatLowRank:
        """``(M + regul·I)⁻¹`` as a ``PMatLowRank`` of the same rank bound: ``V diag(1/(λ + t)
        − 1/t) Vᵀ + (1/t)·I`` with ``t = s + regul`` (the class docstring's identity), so
        the inverse of a damped Fisher ``N F + τI`` (a Laplace posterior covariance) is
        exact in ``r d`` storage. Cost ``r² d + r³``.

        Raises:
          ValueError: when ``s + regul`` is (concretely) 0: ``M`` of rank ``≤ r < d`` is
            singular (use :meth:`pinv`, or a ``regul > 0``).
        """
        if _spectral.is_concrete_zero(regul + self.shift):
            raise ValueError(
                "PMatLowRank.inv needs shift + regul ≠ 0: a matrix of rank ≤ r < d is "
                "singular. Pass a damping (inv(regul) = (M + regul·I)⁻¹) or use pinv()")
        return self._spectral_function(lambda x: 1 / x, regul)

    def pow(self, p: Any, regul: Any = 0.0) -> PMatLowRank:
        """``(M + regul·I)^p`` as a ``PMatLowRank``: ``V diag(f(λ + t) − f(t)) Vᵀ +
        f(t)·I`` with ``t = s + regul`` and ``f(x) = x^p`` (the class docstring's identity).

        ``p > 0``: the matrix power (non-integer ``p`` takes ``M + regul·I`` as PSD,
        negative round-off eigenvalues clipped to 0). ``p < 0`` with ``t = 0`` (neither
        damped nor shifted: ``d − k`` eigenvalues are 0): the *pseudo*-power
        ``(M⁺)^{|p|}`` — eigenvalues below the :meth:`pinv` threshold map to 0, so
        ``pow(-1) == pinv()``. ``p < 0`` with ``t ≠ 0`` (a damped or shifted matrix, full
        rank): the inverse power, every eigenvalue ``λ + t`` and ``t`` inverted as it is,
        however small ``t`` is next to ``max λ`` (no threshold, as :meth:`inv`):
        ``pow(-0.5, τ)`` is ``(M + τI)^{-1/2}`` in float32 as in float64, e.g. to sample
        from a Laplace posterior ``N(θ*, (N F + τI)⁻¹)``; an eigenvalue ``λ + t`` of
        exactly 0 (signed weights) is a ``ValueError``, as for ``PMatDense`` (inf under
        ``jit``). ``M⁰ = I`` of an unshifted
        matrix is refused (use ``PMatEye``; a ``p`` traced under ``jit`` cannot be, and gives
        the projector on the range). Cost ``r² d + r³``.
        """
        traced = isinstance(p, jax.core.Tracer)
        if not traced and p == 0 and _spectral.is_concrete_zero(regul + self.shift):
            raise NotImplementedError(
                "PMatLowRank.pow(0) would be the identity, which is not low-rank; use PMatEye"
            )

        def power(x):
            if traced:  # the sign is known at run time only: both branches, one chosen
                x = jnp.where(p < 0, self._reciprocals(x), x)
                return _spectral.power(x, jnp.abs(p))
            if p < 0:
                if not _spectral.is_integer(p):  # checked with the exponent asked for
                    _spectral.check_nonnegative(x, p)
                if not _spectral.is_concrete_zero(x[-1]):  # an inverse power: M + tI singular?
                    with _spectral.of_part("thin eigendecomposition"):
                        _spectral._check_invertible(x[:-1], p)
                return _spectral.power(self._reciprocals(x), -p)
            return _spectral.power(x, p)

        return self._spectral_function(power, regul)

    # ------------------------------------------------------------------ algebra
    def _scale(self, s):
        return dataclasses.replace(self, coef=self.coef * s, shift=self.shift * s)

    def _add_same(self, other, sign):
        """``[F_A; F_B]`` with weights ``[c_A; sign·c_B]``: exact, rank ``r_A + r_B``."""
        # the promoted dtype: a float32 + float64 sum is not rounded to float32 (nor
        # A + B's dtype made to differ from B + A's)
        dtype = jnp.result_type(self.factor, other.factor)
        factor = jnp.concatenate([self.factor.astype(dtype), other.factor.astype(dtype)])
        coef = jnp.concatenate([self._weights().astype(dtype),
                                sign * other._weights().astype(dtype)])
        return PMatLowRank(self.layer_collection, factor, coef,
                           self._shift().astype(dtype) + sign * other._shift().astype(dtype))

    def _restricted(self, r) -> PMatLowRank:
        """``F[:, S]ᵀ diag(c) F[:, S] + s·I``: the factor's columns ``S`` (``r d_S``), the
        weights and the shift kept (the rank bound stays ``r``)."""
        return dataclasses.replace(self, layer_collection=r.layer_collection,
                                   factor=take(self.factor, r.indices, -1))

    @classmethod
    def from_pmat(cls, other: PMatAbstract) -> PMatLowRank:
        """A ``PMatLowRank`` as it is, or a scaled identity ``x·I``
        (:class:`~jaxgeom.pmat.eye.PMatEye`) as the shift ``x`` of an empty factor
        (``0 × d``): so ``M ± x·I`` is a ``PMatLowRank`` with the shift ``s ± x``."""
        from jaxgeom.pmat.eye import PMatEye

        if isinstance(cls._check_pmat(other), PMatEye) and jnp.ndim(other.scaling) == 0:
            d = other.layer_collection.numel()
            dtype = other.scaling.dtype
            return cls(other.layer_collection, jnp.zeros((0, d), dtype),
                       jnp.zeros((), dtype), other.scaling)
        return super().from_pmat(other)

    # ------------------------------------------------------------------ construction
    @classmethod
    def accumulator(cls, layer_collection: LayerCollection, **options) -> LowRankAccumulator:
        if options:
            raise TypeError(f"{cls.__name__} takes no build options; got {sorted(options)}")
        return LowRankAccumulator(layer_collection)

    # ------------------------------------------------------------------ helpers
    def _reciprocals(self, values: jax.Array) -> jax.Array:
        """``1/x`` of the values ``[λ + t, t]`` of :meth:`_spectral_function` for a negative
        power: the pseudo-inverse's (:meth:`pinv`'s threshold) when ``t = 0`` (an undamped,
        unshifted matrix: its ``d − k`` null eigenvalues and the round-off of the thin ones
        map to 0), else each value inverted as it is — ``M + tI`` is then invertible and
        ``t`` an eigenvalue set by the caller, not round-off, however small next to
        ``max λ``. (Thresholded, a damping below ``d·ε·max λ`` was dropped with the whole
        complement of the factor's rows: in float32 at ``d = 10⁶`` that is 12% of the
        largest eigenvalue, and ``pow(-0.5, τ)`` returned ``V f(Λ + τ) Vᵀ`` alone.)"""
        t = values[-1]
        pseudo = self._pinv_values(values, None, None)
        # safe denominators: the branch not taken (and an exact zero λ + t of signed
        # weights, inverted to inf) divides nothing by 0, whose derivative would be NaN
        zero = (t == 0) | (values == 0)
        inverse = jnp.where(values == 0, jnp.inf, 1 / jnp.where(zero, 1, values))
        return jnp.where(t == 0, pseudo, inverse)

    def _pinv_values(self, evals, atol, rtol):
        if atol is None and rtol is None:
            rtol = self.layer_collection.numel() * jnp.finfo(evals.dtype).eps
        return _spectral.pinv(evals, atol, rtol)

    def _spectral_function(self, f: Any, regul: Any) -> PMatLowRank:
        """``f(M + regul·I)`` for a function ``f`` of an eigenvalue array that acts entry
        by entry but may read all of them (a pseudo-inverse's threshold): with ``t = s +
        regul``, ``V diag(f(λ + t) − f(t)) Vᵀ + f(t)·I`` over the thin eigenpairs ``(λ, V)``
        of ``Fᵀ diag(c) F``; ``f`` sees ``λ + t`` and ``t`` together."""
        evals, evecs = self._low_rank_eigh()
        t = jnp.asarray(regul, evals.dtype) + self._shift()
        values = f(jnp.concatenate([evals + t, t[None]]))
        return PMatLowRank(self.layer_collection, evecs.T, values[:-1] - values[-1],
                           values[-1])


@dataclasses.dataclass(frozen=True)
class LowRankAccumulator:
    """Collects every chunk's Jacobian rows; ``F`` = all of them, ``c = 1/N``."""

    layer_collection: LayerCollection
    collects: ClassVar[bool] = True

    def init(self, dtype):
        return None

    def update(self, state, jac):  # pragma: no cover - collecting accumulators skip it
        raise NotImplementedError

    def finalize(self, chunks: list[jax.Array], n: int) -> PMatLowRank:
        factor = chunks[0] if len(chunks) == 1 else jnp.concatenate(chunks)
        return PMatLowRank(self.layer_collection, factor, jnp.asarray(1 / n, factor.dtype))
