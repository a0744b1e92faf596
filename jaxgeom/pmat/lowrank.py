"""``PMatLowRank``: ``M = Fᵀ diag(c) F`` from a thin factor ``F`` (``r × d``, ``r ≪ d``)."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgeom.layers import LayerCollection
from jaxgeom.pmat import _spectral
from jaxgeom.pmat._gram import gram, gram_norm_sq
from jaxgeom.pmat.base import PMatAbstract, check_shape, representation, static_field
from jaxgeom.vector import as_flat


@representation
class PMatLowRank(PMatAbstract):
    """A matrix of rank at most ``r``: ``M = Fᵀ diag(c) F = Σᵢ cᵢ fᵢ fᵢᵀ``.

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

    Costs (``r`` rows, ``d`` parameters): storage ``r d``; build ``N K B`` (the per-example
    Jacobians) and memory ``N K d``; ``mv``/``vTMv``/``get_diag``/``trace`` ``r d``;
    ``frobenius_norm`` ``r² d`` (Gram); ``eigh``/``eigvalsh``/``norm(2)``/``pinv``/``pow``
    ``r² d + r³``; ``solve`` ``r² d + r³`` (``"woodbury"``, ``"eigh"``) or CG;
    ``to_dense`` ``r d²``.

    Attributes:
      layer_collection: the parameter layout (static).
      factor: the ``(r, d)`` rows ``F``.
      coef: the weights ``c``: a scalar or a ``(r,)`` vector.
    """

    layer_collection: LayerCollection = static_field()
    factor: jax.Array = dataclasses.field(default=None)
    coef: jax.Array = dataclasses.field(default=1.0)

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("woodbury", "eigh", "cg")
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

    @property
    def rank_bound(self) -> int:
        """``r``, the number of rows of the factor (an upper bound on the rank)."""
        return self.factor.shape[0]

    def _weights(self) -> jax.Array:
        """The ``(r,)`` row weights ``c``."""
        return jnp.broadcast_to(jnp.asarray(self.coef, self.factor.dtype), (self.rank_bound,))

    # ------------------------------------------------------------------ primitives
    def _mv(self, v):
        """``Fᵀ (c ⊙ F v)``: two thin products, ``2 r d``."""
        return (self._weights() * (self.factor @ v)) @ self.factor  # row-major friendly

    def vTMv(self, v: Any) -> jax.Array:
        """``Σᵢ cᵢ (fᵢ·v)²``, one thin product (``r d``)."""
        flat, _ = as_flat(v, self.layer_collection)
        return jnp.sum(self._weights() * (self.factor @ flat) ** 2)

    def to_dense(self):
        return self._column_gram()

    def get_diag(self):
        """``Σᵢ cᵢ fᵢ²`` (``r d``, one fused pass over ``F``: no ``F²`` is formed)."""
        return jnp.sum(self._weights()[:, None] * self.factor * self.factor, axis=0)

    def trace(self):
        """``Σᵢ cᵢ ‖fᵢ‖²`` (``r d``, one pass over ``F``)."""
        return self._weights() @ jnp.sum(self.factor * self.factor, axis=1)

    def frobenius_norm(self):
        """``‖M‖_F² = tr(M²) = Σᵢⱼ cᵢ cⱼ (F Fᵀ)ᵢⱼ²`` through the ``r × r`` Gram (``r² d``),
        or ``c² ‖FᵀF‖_F²`` through ``M`` itself (``r d²``) when ``d < r``: the squares of
        the symmetric Gram's upper blocks, reduced as they are multiplied
        (:func:`~jaxgeom.pmat._gram.gram_norm_sq`: about 44% fewer products, no Gram
        stored). Per-row weights with ``d < r`` form ``M`` (``r d²``)."""
        r, d = self.factor.shape
        if d >= r:
            return jnp.sqrt(jnp.maximum(gram_norm_sq(self.factor.T, self._weights()), 0))
        if jnp.ndim(self.coef) == 0:
            return jnp.abs(jnp.asarray(self.coef, self.factor.dtype)) * jnp.sqrt(
                gram_norm_sq(self.factor))
        return jnp.sqrt(jnp.sum(self._column_gram() ** 2))

    def _column_gram(self) -> jax.Array:
        """``M = Fᵀ diag(c) F`` (``d × d``, ``r d²``; symmetric blocks for a scalar ``c``)."""
        if jnp.ndim(self.coef) == 0:
            return jnp.asarray(self.coef, self.factor.dtype) * gram(self.factor)
        return (self.factor * self._weights()[:, None]).T @ self.factor

    def eigh(self) -> tuple[jax.Array, jax.Array]:
        """The *thin* eigendecomposition: ``λ`` ``(k,)`` ascending and orthonormal ``V``
        ``(d, k)``, ``k = min(r, d)``, with ``M = V diag(λ) Vᵀ``.

        The other ``d − k`` eigenvalues are 0 (``eigvalsh`` returns all ``d``). Computed
        from the thin QR of ``Fᵀ`` and the ``k × k`` core (see the class docstring).
        """
        q, r = jnp.linalg.qr(self.factor.T)
        core = (r * self._weights()) @ r.T
        evals, u = jnp.linalg.eigh((core + core.T) / 2)
        return evals, q @ u

    def eigvalsh(self):
        """All ``d`` eigenvalues, ascending: the thin ones and ``d − k`` zeros."""
        evals, _ = self.eigh()
        zeros = jnp.zeros(self.layer_collection.numel() - evals.shape[0], evals.dtype)
        return jnp.sort(jnp.concatenate([evals, zeros]))

    def _solve(self, v, regul, method, **options):
        """Exact ``(M + λI)⁻¹ v``, null-space component ``v_⊥/λ`` included (``λ ≠ 0``).

        - ``"woodbury"`` (default): with ``y = F x``, ``(λI + F Fᵀ diag(c)) y = F v`` (an
          ``r × r`` system), then ``x = (v − Fᵀ (c ⊙ y)) / λ``. ``r² d + r³``. When
          ``d < r`` the ``d × d`` system ``(Fᵀ diag(c) F + λI) x = v`` is smaller and
          solved instead (``r d² + d³``).
        - ``"eigh"``: ``x = V ((Vᵀv) / (λ + Λ)) + (v − V Vᵀ v) / λ`` from :meth:`eigh`.
        - ``"cg"``: conjugate gradient (the base class).

        ``λ = 0`` divides by zero unless ``M`` has full rank (use :meth:`pinv` instead).
        """
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
            evals, evecs = self.eigh()
            coords = evecs.T @ v
            return evecs @ (coords / (evals + regul)) + (v - evecs @ coords) / regul
        return super()._solve(v, regul, method, **options)

    # ------------------------------------------------------------------ functions
    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatLowRank:
        """``M⁺ = V diag(1/λ) Vᵀ`` over the eigenvalues ``|λ| > max(atol, rtol·max|λ|)``,
        as a thin ``PMatLowRank`` (factor ``Vᵀ``, weights ``1/λ`` or 0).

        Default threshold: ``rtol = d·eps`` (``numpy.linalg.pinv``'s, on the ``d × d``
        matrix). Cost ``r² d + r³``.
        """
        evals, evecs = self.eigh()
        return self._thin(self._pinv_values(evals, atol, rtol), evecs)

    def pow(self, p: Any, regul: Any = 0.0) -> PMatLowRank:
        """``M^p`` as a thin ``PMatLowRank`` ``V diag(λ^p) Vᵀ``.

        ``p > 0``: the matrix power (non-integer ``p`` takes ``M`` as PSD, negative
        round-off eigenvalues clipped to 0). ``p < 0``: the *pseudo*-power on the range,
        ``(M⁺)^{|p|}`` — eigenvalues below the :meth:`pinv` threshold map to 0, so
        ``pow(-1) == pinv()``. ``regul`` must be 0: ``(M + regul·I)^p`` is not low-rank
        (use ``solve(v, regul)`` or ``PMatDense.from_pmat(M).pow(p, regul)``); nor is
        ``M⁰ = I`` (refused; a ``p`` traced under ``jit`` cannot be, and gives the projector
        on the range).
        """
        if not _is_zero(regul):
            raise NotImplementedError(
                "PMatLowRank.pow supports regul=0 only: (M + regul·I)^p is not low-rank. Use "
                "solve(v, regul) for p = -1, or PMatDense.from_pmat(M).pow(p, regul)"
            )
        traced = isinstance(p, jax.core.Tracer)
        if not traced and p == 0:
            raise NotImplementedError(
                "PMatLowRank.pow(0) would be the identity, which is not low-rank; use PMatEye"
            )
        evals, evecs = self.eigh()
        if traced:  # the sign is known at run time only: both branches, one chosen
            evals = jnp.where(p < 0, self._pinv_values(evals, None, None), evals)
            return self._thin(_spectral.power(evals, jnp.abs(p)), evecs)
        if p < 0:
            evals, p = self._pinv_values(evals, None, None), -p
        return self._thin(_spectral.power(evals, p), evecs)

    # ------------------------------------------------------------------ algebra
    def _scale(self, s):
        return dataclasses.replace(self, coef=self.coef * s)

    def _add_same(self, other, sign):
        """``[F_A; F_B]`` with weights ``[c_A; sign·c_B]``: exact, rank ``r_A + r_B``."""
        # the promoted dtype: a float32 + float64 sum is not rounded to float32 (nor
        # A + B's dtype made to differ from B + A's)
        dtype = jnp.result_type(self.factor, other.factor)
        factor = jnp.concatenate([self.factor.astype(dtype), other.factor.astype(dtype)])
        coef = jnp.concatenate([self._weights().astype(dtype),
                                sign * other._weights().astype(dtype)])
        return PMatLowRank(self.layer_collection, factor, coef)

    # ------------------------------------------------------------------ construction
    @classmethod
    def accumulator(cls, layer_collection: LayerCollection, **options) -> LowRankAccumulator:
        if options:
            raise TypeError(f"{cls.__name__} takes no build options; got {sorted(options)}")
        return LowRankAccumulator(layer_collection)

    # ------------------------------------------------------------------ helpers
    def _pinv_values(self, evals, atol, rtol):
        if atol is None and rtol is None:
            rtol = self.layer_collection.numel() * jnp.finfo(evals.dtype).eps
        return _spectral.pinv(evals, atol, rtol)

    def _thin(self, evals: jax.Array, evecs: jax.Array) -> PMatLowRank:
        """``V diag(λ) Vᵀ`` as a ``PMatLowRank`` (factor ``Vᵀ``, weights ``λ``)."""
        return PMatLowRank(self.layer_collection, evecs.T, evals)


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


def _is_zero(x: Any) -> bool:
    """Whether ``x`` is (concretely) zero; a traced value cannot be checked and is not."""
    try:
        return bool(x == 0)
    except jax.errors.ConcretizationTypeError:
        return False
