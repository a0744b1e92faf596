"""``PMatDense``: the whole d × d matrix."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgeom._memory import check_fits
from jaxgeom._symmetric import symmetric_solve
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat import _spectral
from jaxgeom.pmat._gram import add_upper_gram, mean_of_upper_grams
from jaxgeom.pmat.base import (
    ITERATIVE_SOLVE_METHODS,
    ITERATIVE_SOLVES,
    PMatAbstract,
    check_shape,
    representation,
    static_field,
    take,
)
from jaxgeom.restriction import Restriction


@representation
class PMatDense(PMatAbstract):
    """The full matrix ``M`` (``d × d``, flat order).

    Build: ``N K B`` for the per-example Jacobians plus ``N K d²`` for ``Σ JᵀJ`` (``5/8`` of
    it for ``d ≥ 2048``: only the upper block triangle is multiplied); memory
    ``d²`` plus one chunk of Jacobians (``batch_size · K · d``).
    Operations: ``mv`` ``d²``; ``solve`` and ``inv`` ``d³`` (``"cholesky"`` by default,
    which falls back to an LU solve for an indefinite ``M + regul·I``, e.g. a Hessian;
    ``"eigh"``, ``"lstsq"``, ``"cg"``); ``eigh``/``pow``/``pinv`` ``d³``.

    Attributes:
      layer_collection: the parameter layout (static).
      data: the ``(d, d)`` matrix.
    """

    layer_collection: LayerCollection = static_field()
    data: jax.Array = dataclasses.field(default=None)

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("cholesky", "eigh", "lstsq",
                                                *ITERATIVE_SOLVE_METHODS)
    SOLVE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {"lstsq": ("rcond",),
                                                           **ITERATIVE_SOLVES}
    FACTORISING_OPERATIONS: ClassVar[tuple[str, ...]] = PMatAbstract.FACTORISES
    PROMOTION_RANK: ClassVar[int] = 3

    def __post_init__(self):
        d = self.layer_collection.numel()
        check_shape("PMatDense data", getattr(self.data, "shape", None), f"({d}, {d})",
                    lambda s: s == (d, d), 2)

    # ------------------------------------------------------------------ primitives
    def _mv(self, v):
        return self.data @ v

    def to_dense(self):
        return self.data

    def get_diag(self):
        return _spectral.diagonal(self.data)

    def frobenius_norm(self):
        return jnp.linalg.norm(self.data)

    def eigvalsh(self):
        return _spectral.eigvalsh(self.data)

    def eigh(self):
        return _spectral.eigh(self.data)

    def _shifted(self, regul):
        return self.data + regul * jnp.eye(self.data.shape[0], dtype=self.data.dtype)

    def _solve(self, v, regul, method, **options):
        if method == "cholesky":
            return symmetric_solve(self._shifted(regul), v)
        if method == "eigh":
            return self._differentiated_as_solve(v, regul, lambda b: self._eigh_solve(b, regul))
        if method == "lstsq":
            return jnp.linalg.lstsq(self._shifted(regul), v, rcond=options.get("rcond"))[0]
        return super()._solve(v, regul, method, **options)

    def _eigh_solve(self, v, regul):
        """``V ((Vᵀv) / (λ + regul))``."""
        evals, evecs = self.eigh()
        return evecs @ ((evecs.T @ v) / (evals + regul))

    # ------------------------------------------------------------------ functions
    def inv(self, regul: Any = 0.0) -> PMatDense:
        eye = jnp.eye(self.data.shape[0], dtype=self.data.dtype)
        return self._with(symmetric_solve(self._shifted(regul), eye, "inv"))

    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatDense:
        pinv = functools.partial(_spectral.pinv, atol=atol, rtol=rtol)
        return self._with(_spectral.spectral_functions(pinv, (self.data,))[0])

    def pow(self, p: Any, regul: Any = 0.0) -> PMatDense:
        if _spectral.is_integer(p) and p >= 0:
            return self._with(jnp.linalg.matrix_power(self._shifted(regul), int(p)))
        power = functools.partial(_spectral.shifted_power, p=p)
        return self._with(_spectral.spectral_functions(power, (self.data,), regul)[0])

    # ------------------------------------------------------------------ algebra
    def mm(self, other: PMatAbstract) -> PMatDense:
        self._check_compatible(other)
        return self._with(self.data @ other.to_dense())

    def _scale(self, s):
        return self._with(self.data * s)

    def _add_same(self, other, sign):
        return self._with(self.data + sign * other.data)

    def _with(self, data) -> PMatDense:
        return PMatDense(self.layer_collection, data)

    def _restricted(self, r: Restriction) -> PMatDense:
        """``data[S][:, S]`` (``d_S²``; slices where the layers' indices are contiguous)."""
        idx = r.indices
        return PMatDense(r.layer_collection, take(take(self.data, idx, -2), idx, -1))

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pmat(cls, other: PMatAbstract) -> PMatDense:
        return cls(cls._check_pmat(other).layer_collection, other.to_dense())

    @classmethod
    def accumulator(cls, layer_collection: LayerCollection, **options) -> DenseAccumulator:
        _no_options(cls, options)
        return DenseAccumulator(layer_collection)


#: what to build instead of a matrix whose storage cannot fit (:func:`check_fits`)
SMALLER_REPRESENTATIONS = (
    "Build a representation of smaller storage: PMatKFAC or PMatEKFAC (Kronecker factors, "
    "Σ a_l² + g_l² per layer), PMatDiag or PMatQuasiDiag (d), PMatLowRank (N·K rows of d), "
    "PMatImplicit (none); PMatMixed, dense only on the layers that fit; or the block of a "
    "few layers (jaxgeom.restriction.restrict)")


@dataclasses.dataclass(frozen=True)
class DenseAccumulator:
    """``Σₙ Jₙᵀ Jₙ`` over chunks, then ``/ N``."""

    layer_collection: LayerCollection

    def init(self, dtype):
        d = self.layer_collection.numel()
        check_fits("PMatDense's storage", (d, d), dtype, SMALLER_REPRESENTATIONS)
        return jnp.zeros((d, d), dtype)

    def update(self, state, pieces):
        return add_upper_gram(state, pieces)

    def finalize(self, state, n):
        return PMatDense(self.layer_collection, mean_of_upper_grams(state, n))


def _no_options(cls, options):
    if options:
        raise TypeError(f"{cls.__name__} takes no build options; got {sorted(options)}")
