"""Function space: vectors over (outputs × examples) and matrices between them.

A function-space vector ``f`` holds one value per output ``o`` and example ``n``: shape
``(K, N)``, outputs first (NNGeometry's layout). A function-space matrix (an NTK / Gram
matrix) maps such vectors to such vectors: shape ``(K, N, K, N)``, with the
``(K·N) × (K·N)`` matrix ``G[(o, n), (o', n')]`` (output-major, row-major reshape) as its
primary view: every spectral operation acts on that matrix.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._reporting import one_singular_report, warn_if_singular
from jaxgeom._serialization import register_dataclass
from jaxgeom._sharding import gathered
from jaxgeom._symmetric import spd_solve
from jaxgeom.pmat import _spectral
from jaxgeom.pmat.base import PMatAbstract, check_regul, check_shape
from jaxgeom.scaling import ArrayValued, ScalarMultiples
from jaxgeom.vector import check_real, static_order

#: how to damp each output and example on its own, which a scalar ``regul`` cannot
_PER_EXAMPLE_DAMPING = (
    "For a damping per output and example (a (K, N) array d), add it to the matrix's "
    "diagonal first: FMatDense(G.data + jnp.diag(d.ravel()).reshape(G.data.shape)).solve(f)")


class _ScalarAlgebra(ScalarMultiples, ArrayValued):
    """``+``, ``-``, unary ``-``, scalar ``*`` and ``/`` for a frozen dataclass whose one
    array field is ``data`` (same-type operands only)."""

    def _with(self, data):
        return dataclasses.replace(self, data=data)

    def _scale(self, s):
        return self._with(self.data * s)

    def __add__(self, other):
        if type(other) is not type(self):
            return self._array_operand(other, "+")
        return self._with(self.data + self._same_shape(other))

    def __sub__(self, other):
        if type(other) is not type(self):
            return self._array_operand(other, "-")
        return self._with(self.data - self._same_shape(other))

    def _same_shape(self, other):
        if self.data.shape != other.data.shape:  # not broadcast: a different N or K is a slip
            raise ValueError(f"cannot combine {type(self).__name__}s of shapes "
                             f"{tuple(self.data.shape)} and {tuple(other.data.shape)}")
        return other.data



@register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class FVector(_ScalarAlgebra):
    """A vector in function space: ``data[o, n]`` for output ``o`` and example ``n``.

    Returned by ``PFMap.jvp`` and ``FMatDense.mv``; accepted by ``PFMap.vjp``,
    ``FMatDense.mv``/``vTMv``/``solve`` (as are raw ``(K, N)`` arrays). Supports ``+``,
    ``-``, scalar ``*`` and ``/``, ``dot``/``@`` and ``norm``.

    Attributes:
      data: the ``(K, N)`` array (outputs, examples).
    """

    data: jax.Array

    ARRAY_OPERAND_FIX: ClassVar[str] = "Wrap a (K, N) array first: FVector(array)"

    def __post_init__(self):
        check_shape("FVector data", getattr(self.data, "shape", None), "(K, N)",
                    lambda s: True, 2)

    def to_dense(self) -> jax.Array:
        """The ``(K, N)`` array."""
        return self.data

    def size(self, dim: int | None = None):
        """``(K, N)``, or one of them."""
        shape = tuple(self.data.shape)
        return shape if dim is None else shape[dim]

    def dot(self, other: Any) -> jax.Array:
        """``Σ_{o,n} f[o,n] g[o,n]``."""
        return jnp.vdot(as_fvector_data(self), as_fvector_data(other, self.data.shape))

    def __matmul__(self, other: Any) -> jax.Array:
        """``f @ g``: :meth:`dot` with an ``FVector`` or a ``(K, N)`` array."""
        if isinstance(other, FVector | jax.Array | np.ndarray):
            return self.dot(other)
        return NotImplemented

    def __rmatmul__(self, other: Any) -> jax.Array:
        if isinstance(other, jax.Array | np.ndarray):
            return self.dot(other)
        return NotImplemented

    #: NumPy defers ``ndarray @ FVector`` to :meth:`__rmatmul__` instead of broadcasting
    __array_priority__ = 1000

    def norm(self, p: float = 2) -> jax.Array:
        """The ``p``-norm of the flattened ``K·N`` vector."""
        return jnp.linalg.norm(jnp.ravel(as_fvector_data(self)), ord=static_order(p))


def as_fvector_data(f: Any, shape: tuple[int, int] | None = None) -> jax.Array:
    """The ``(K, N)`` array of an ``FVector`` or an array (checked against ``shape``),
    gathered when it is split over an explicit mesh axis (examples sharded like the batch:
    the products with a replicated matrix then answer replicated)."""
    if isinstance(f, FVector):
        data = f.data
    elif isinstance(f, jax.Array | np.ndarray | list | tuple) or np.isscalar(f):
        data = jnp.asarray(f)
    else:
        raise TypeError(
            f"a function-space vector must be an FVector or an array of shape (K, N) "
            f"(outputs, examples); got a {type(f).__name__}"
            + (" (a parameter-space vector: PFMap.jvp maps it to function space)"
               if type(f).__name__ == "PVector" else ""))
    if data.ndim != 2 or (shape is not None and tuple(data.shape) != tuple(shape)):
        want = "(K, N)" if shape is None else str(tuple(shape))
        raise ValueError(
            f"a function-space vector must be an FVector or an array of shape {want} "
            f"(outputs, examples); got shape {data.shape}"
        )
    check_real(data, "function-space vector")
    return gathered(data)[0]


def _check_factorised(x: jax.Array, matrix: jax.Array, rhs: jax.Array) -> None:
    """Raise where a concrete Cholesky solve came out NaN from finite operands: ``G +
    regul·I`` is not positive definite (a Gram matrix of rank ``≤ d`` below ``K·N``, or a
    negative ``regul``). Traced, the NaN answer stays."""
    if any(isinstance(a, jax.core.Tracer) for a in (x, matrix, rhs)):
        return
    if bool(jnp.isnan(x).any()) and bool(jnp.isfinite(matrix).all() & jnp.isfinite(rhs).all()):
        raise ValueError(
            "FMatDense.solve: G + regul·I is not positive definite, its Cholesky factorisation "
            "failed (a Gram matrix is singular where K·N exceeds the number of parameters, "
            "and indefinite for regul < 0). Damp it (solve(f, regul) with regul > 0: ridge "
            "regression), or solve it by least squares: method=\"lstsq\"")


@register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class FMatDense(_ScalarAlgebra):
    """A dense function-space matrix ``G[o, n, o', n']`` (e.g. the empirical NTK).

    Built by :func:`jaxgeom.GramMatrix` as ``G[o,n,o',n'] = Σ_i J[o,n,i] J[o',n',i]``
    from the per-example Jacobian ``J`` (``(K, N, d)``). The primary view is the
    ``(K·N) × (K·N)`` matrix ``to_matrix()`` (output-major: row ``o·N + n``); ``mv``,
    ``eigh``, ``solve`` and the norms act on it.

    Costs (``m = K·N``): storage ``m²``; ``mv``/``vTMv``/``frobenius_norm`` ``m²``;
    ``trace`` ``m``; ``eigh``/``eigvalsh``/``norm(±2)``/``solve``/``slogdet`` ``m³``.

    Unlike NNGeometry (where ``mv``, ``trace``, ``+`` and ``-`` of ``FMatDense`` are broken),
    every method here is tested against the explicit matrix.

    Attributes:
      data: the ``(K, N, K, N)`` array.
    """

    data: jax.Array

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("cholesky", "eigh", "lstsq")
    ARRAY_OPERAND_FIX: ClassVar[str] = (
        "G.mv(f) multiplies a function-space vector; to add a (K, N, K, N) array, wrap it "
        "first: FMatDense(array)")

    def __post_init__(self):
        check_shape("FMatDense data", getattr(self.data, "shape", None), "(K, N, K, N)",
                    lambda s: s[:2] == s[2:], 4)

    # ------------------------------------------------------------------ views
    def size(self, dim: int | None = None):
        """``(K, N, K, N)``, or one of them."""
        shape = tuple(self.data.shape)
        return shape if dim is None else shape[dim]

    @property
    def dtype(self):
        return self.data.dtype

    def to_dense(self) -> jax.Array:
        """The ``(K, N, K, N)`` array."""
        return self.data

    def to_matrix(self) -> jax.Array:
        """The ``(K·N, K·N)`` matrix (row/column ``o·N + n``)."""
        m = self.data.shape[0] * self.data.shape[1]
        return self.data.reshape(m, m)

    def get_diag(self) -> FVector:
        """The diagonal ``G[o,n,o,n]`` as an ``(K, N)`` ``FVector``."""
        return FVector(jnp.diagonal(self.to_matrix()).reshape(self.data.shape[:2]))

    # ------------------------------------------------------------------ products
    def mv(self, f: Any) -> Any:
        """``G f`` for an ``FVector`` or a ``(K, N)`` array (answers in the same form)."""
        data = as_fvector_data(f, self.data.shape[:2])
        out = jnp.einsum("knlm,lm->kn", self.data, data)
        return FVector(out) if isinstance(f, FVector) else out

    def __matmul__(self, other: Any) -> Any:
        if isinstance(other, FMatDense):
            return NotImplemented
        return self.mv(other)

    def vTMv(self, f: Any) -> jax.Array:
        """The quadratic form ``fᵀ G f``; for the Gram matrix, ``‖Jᵀ f‖²``."""
        data = as_fvector_data(f, self.data.shape[:2])
        return jnp.vdot(data, jnp.einsum("knlm,lm->kn", self.data, data))

    # ------------------------------------------------------------------ scalars
    def trace(self) -> jax.Array:
        return _spectral.trace(self.to_matrix())

    def frobenius_norm(self) -> jax.Array:
        return jnp.linalg.norm(self.to_matrix())

    def eigvalsh(self) -> jax.Array:
        """All ``K·N`` eigenvalues, ascending."""
        return jnp.linalg.eigvalsh(self.to_matrix())

    def slogdet(self, regul: Any = 0.0) -> tuple[jax.Array, jax.Array]:
        """``(sign, log|det(G + regul·I)|)`` of the ``(K·N) × (K·N)`` matrix, from its
        eigenvalues (``m³``; NumPy's convention: ``(0, -inf)`` when singular, where the
        zero eigenvalues are exact: ``eigh``'s of a singular Gram — more outputs than
        parameters, ``K·N > d`` — are round-off of either sign, a finite log or a sign
        ``-1``, as NumPy's, and called from Python that warns; pass ``regul > 0``). With the
        NTK as a Gaussian-process kernel and noise ``σ²``, the log marginal likelihood of
        targets ``y`` is ``−½ yᵀ G.solve(y, σ²) − ½ G.logdet(σ²) − (K·N/2) log 2π``."""
        check_regul(regul, _PER_EXAMPLE_DAMPING)
        values = self.eigvalsh()
        _spectral.warn_if_round_off(values + regul, "slogdet")
        return _spectral.slogdet(values, regul)

    def logdet(self, regul: Any = 0.0) -> jax.Array:
        """``log det(G + regul·I)``: :meth:`slogdet`'s ``log|det|`` when the determinant is
        positive, ``-inf`` when it is 0, NaN when it is negative."""
        with one_singular_report(lambda: "logdet"):
            return _spectral.logdet(*self.slogdet(regul))

    #: ``None``/``"fro"``: Frobenius norm; ``2``: largest ``|λ|``; ``-2``: smallest.
    norm = PMatAbstract.norm
    _norm = PMatAbstract._norm

    # ------------------------------------------------------------------ spectral
    def eigh(self) -> tuple[jax.Array, jax.Array]:
        """``(λ ascending (K·N,), V (K·N, K·N))`` with ``to_matrix() = V diag(λ) Vᵀ``.

        Column ``i`` of ``V`` reshaped to ``(K, N)`` is an eigenvector as a function-space
        vector: ``FVector(V[:, i].reshape(K, N))``.
        """
        return _spectral.eigh(self.to_matrix())

    def solve(self, f: Any, regul: Any = 0.0, *, method: str = "cholesky") -> Any:
        """``(G + regul·I)⁻¹ f`` for an ``FVector`` or a ``(K, N)`` array.

        Kernel (ridge) regression: with targets ``y`` (``(K, N)``) on the training
        examples, ``α = G.solve(y, λ)`` gives the predictions ``G_test,train α`` (on the
        training examples, ``G.mv(α)``). ``method``: ``"cholesky"`` (default; needs
        ``G + regul·I`` positive definite), ``"eigh"`` or ``"lstsq"`` (least squares, for a
        singular ``G`` with ``regul = 0``). Called eagerly, a Cholesky solve that fails
        (``G + regul·I`` not positive definite) is a ``ValueError`` naming these fixes;
        traced, its answer is NaN.
        """
        if method not in self.SOLVE_METHODS:
            raise ValueError(
                f"unknown solve method {method!r} for FMatDense; valid methods: "
                f"{self.SOLVE_METHODS}"
            )
        check_regul(regul, _PER_EXAMPLE_DAMPING)
        data = as_fvector_data(f, self.data.shape[:2])
        matrix = self.to_matrix()
        rhs = jnp.ravel(data)
        if method == "eigh":
            evals, evecs = _spectral.eigh(matrix)
            warn_if_singular(evals + regul, "solve")  # K·N > d undamped: round-off
            x = evecs @ ((evecs.T @ rhs) / (evals + regul))
        else:
            shifted = matrix + regul * jnp.eye(matrix.shape[0], dtype=matrix.dtype)
            if method == "cholesky":
                x = spd_solve(shifted, rhs)
                _check_factorised(x, shifted, rhs)
            else:
                x = jnp.linalg.lstsq(shifted, rhs)[0]
        x = x.reshape(data.shape)
        return FVector(x) if isinstance(f, FVector) else x

    def __repr__(self) -> str:
        k, n = np.shape(self.data)[:2]
        return f"FMatDense(outputs={k}, examples={n})"
