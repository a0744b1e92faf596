"""``PMatKFAC``: Kronecker-factored blocks (Martens & Grosse 2015; Grosse & Martens 2016).

For a layer whose kernel ``W`` (``g_l × a_l`` as a layer matrix, see
:class:`jaxgeom.capture.KroneckerSpec`) is applied at ``T`` positions, with captured inputs
``a`` and output gradients ``g`` (:mod:`jaxgeom.capture`), the layer block of
``M = (1/N) Σₙ Jₙᵀ Jₙ`` is approximated by ``A ⊗ G`` acting on the layer matrix
``V ↦ G V A``:

- **expand** (default; NNGeometry's KFC, kfac-jax, curvlinops):
  ``A = Σ_{n,t} a aᵀ / (N T)``, ``G = Σ_{n,k,t} g gᵀ / N``;
- **reduce** (``kfac_approx="reduce"``, Eschenhagen et al. 2023, for weight sharing):
  ``A = Σₙ āₙ āₙᵀ / N`` with ``āₙ = (1/T) Σ_t aₙₜ``, ``G = Σ_{n,k} ĝ ĝᵀ / N`` with
  ``ĝ = Σ_t gₙₖₜ``.

A bias is an extra constant-1 input (last column of the layer matrix, last row/column of
``A``: the joint weight-bias block; NNGeometry's and kfac-jax's convention). With
``separate_weight_and_bias=True`` (curvlinops' default) the kernel and the bias get blocks
of their own, ``A_w ⊗ G`` and ``A_bb G = G``, nothing between them: ``A``'s bias row and
column are zero but for ``A_bb`` (:func:`separated_input_factor`), so every operation below
holds unchanged. Embeddings have a diagonal ``A`` (token frequencies,
stored as a vector; always "expand"). Both coincide with the exact block for ``T = 1``
and one example (any number of outputs: ``Σₖ (gₖ ⊗ a)(gₖ ⊗ a)ᵀ = (Σₖ gₖgₖᵀ) ⊗ aaᵀ``).

Layers without Kronecker structure. Norm scales and shifts and every other small leaf
(kind ``norm``/``other``) keep their *exact* dense block ``(1/N) Σₙ Jₙ,ₗᵀ Jₙ,ₗ`` (from
exact per-example gradients of those leaves only); ``max_dense_block`` guards against a
large one. A dense/conv/embedding kernel whose gradient is *not* one sum of outer products
``Σ_t g_t a_tᵀ`` — consumed by several operations (tied embeddings, a layer applied
twice) or a grouped convolution (:attr:`jaxgeom.layers.Layer.kronecker_obstacle`) —
raises a ``ValueError`` naming the layer, its leaves and the operations, and suggesting
``PMatMixed`` with another representation for that layer, e.g.
``FIM(..., PMatMixed, mapping={"Embed_0": PMatBlockDiag}, default=PMatKFAC)``
(:func:`check_factorable`).

Flat order: ``to_dense``/``get_diag``/``mv`` use the flat order of the parameters (the
``ravel_pytree`` order, whatever the leaf order — Flax's ``bias`` before ``kernel`` — and
kernel layout — ``(in, out)``, ``(out, in)``, ``HWIO``, ``OIHW``), i.e. NNGeometry's
``split_weight_bias=True``. :meth:`PMatKFAC.kronecker_block` gives the raw ``A ⊗ G`` in the
``(output, input [, bias])`` order of the layer matrix (NNGeometry's
``split_weight_bias=False``, ``kron(G, A)``).

Costs (``a_l``, ``g_l`` factor sizes, ``d_l = a_l g_l``; ``o`` the other layers' sizes):
build ``N K B`` plus ``N Σ T_l (a_l² + K g_l²)``, one streaming pass, memory
``Σ (a_l² + g_l²) + Σ o²`` plus one chunk's captures; ``mv`` ``Σ d_l (a_l + g_l)``; ``trace``
``Σ (a_l + g_l)``; Frobenius ``Σ (a_l² + g_l²)``; ``eigvalsh``/``norm(±2)``/``solve``/``inv``/
``pow``/``pinv`` ``Σ (a_l³ + g_l³ + d_l)`` through the factors' eigendecompositions (plus
``o³``; a factor with :attr:`Kron.rank_bounds` ``r ≤ n/4``, ``≈ 6 n² r`` through its range:
a build carries the bounds of a wide dense layer's factors summed from few examples, as
hints checked at use, :attr:`Kron.bounds_checked`); with
factored damping (``damping="pi"`` or ``"pi_one"``), ``solve`` and ``inv`` use Cholesky
factorisations instead
(``Σ (a_l³ + g_l³)/3``, several times cheaper); never a ``d × d`` matrix (except
``to_dense``). Each ``solve`` factorises anew: for many solves with one ``regul``, invert
once (``Finv = F.inv(regul)``, then ``Finv.mv(v)`` at the cost of ``mv``).

Damping: ``solve(v, regul)``, ``inv(regul)``, ``pow(p, regul)`` use exact damping
``(A ⊗ G + λI)^p = (Q_A ⊗ Q_G) (Λ_A ⊗ Λ_G + λ)^p (Q_A ⊗ Q_G)ᵀ`` by default (curvlinops'
``use_exact_damping``). The result of ``inv``/``pow`` keeps the factors' eigenbases and the
``g_l × a_l`` eigenvalues per layer (the storage of EKFAC, George et al. 2018), since it is
no longer a Kronecker product; with ``regul = 0`` it stays ``A^p ⊗ G^p``. The factored
dampings damp each factor and stay Kronecker products (:data:`FACTORED_DAMPINGS`):

- ``damping="pi"``: the π-corrected damping of Martens & Grosse (2015, §6.3),
  ``(A + π√λ I) ⊗ (G + √λ/π I)``, ``π = √((tr A / a_l) / (tr G / g_l))``
  (NNGeometry's default, ``use_pi=True``);
- ``damping="pi_one"``: the same with ``π = 1``, ``(A + √λ I) ⊗ (G + √λ I)`` (the formula
  of NNGeometry's ``use_pi=False``, whose factors are scaled otherwise — ``√K·A``,
  ``G/√K`` — so that its damped answers differ; ``"pi"`` does not depend on the split).

Both equal ``A ⊗ G + λI`` plus the cross terms ``√λ (π A ⊗ I + I ⊗ G / π)``: an
approximation of the exact damping that over-damps. Exact blocks of other layers are
damped exactly in every case.

``M1 ± M2`` is a KFAC where, layer by layer, the two share a factor (the same arrays or
equal values: ``M + M``, ``M − 0.5 M``; scaling multiplies ``A``): ``(A₁ ± A₂) ⊗ G`` or
``A ⊗ (G₁ ± G₂)``. Otherwise it is not a Kronecker product and is returned as the exact
:class:`~jaxgeom.pmat.blockdiag.PMatBlockDiag` (layer blocks ``d_l²``), for layers of at
most ``DENSE_BLOCK_LIMIT`` (4096) parameters; a larger layer raises a ``ValueError`` naming
it (``M1.to_blockdiag() + M2.to_blockdiag()`` asks for the blocks anyway). ``+`` with
another representation promotes to ``PMatDense``. ``mm`` is factor-wise
(``(A₁⊗G₁)(A₂⊗G₂) = A₁A₂ ⊗ G₁G₂``) between KFACs of the same layers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom import _host_lapack
from jaxgeom._compile import quick_jit
from jaxgeom._dispatch import compiled_when_eager
from jaxgeom._lapack import side_by_side
from jaxgeom._reindex import FlatPartition, is_transposed_block
from jaxgeom._reporting import collects_here, report_singular_when_run, warn_if_singular
from jaxgeom._serialization import register_dataclass
from jaxgeom._sorting import sort
from jaxgeom._symmetric import inverts_on_host, spd_inverses, spd_solve, symmetric_solve
from jaxgeom.capture import (
    Captured,
    CapturePlan,
    KroneckerSpec,
    all_finite,
    capture_chunk,
    check_specs,
    make_plan,
)
from jaxgeom.layers import Layer, LayerCollection
from jaxgeom.pmat import _spectral
from jaxgeom.pmat._gram import accumulate_gram, gram
from jaxgeom.pmat.base import (
    ITERATIVE_SOLVE_METHODS,
    ITERATIVE_SOLVES,
    PMatAbstract,
    check_shape,
    iterative_solve_options,
    representation,
    static_field,
)
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.dense import PMatDense
from jaxgeom.restriction import Restriction
from jaxgeom.streaming import ChunkBuilder, builder, mean

APPROXIMATIONS = ("expand", "reduce")
DAMPINGS = ("exact", "pi", "pi_one")
#: the dampings that damp each Kronecker factor (:meth:`Kron.factor_damped`), with whether
#: they scale the factors' shares by π (Martens & Grosse's correction) or take ``π = 1``
FACTORED_DAMPINGS = {"pi": True, "pi_one": False}


# ----------------------------------------------------------------------------- layer blocks
def _rotate(v: jax.Array, qg: jax.Array, qa: jax.Array | None) -> jax.Array:
    """``Q_Gᵀ V Q_A`` (``qa is None``: identity), the larger basis first.

    Both orders cost ``g a (g + a)`` flops. Done last, the large product is fused with
    what follows (the squares of ``vTMv``, the scaling of ``mv``) into one YNNPACK kernel,
    which XLA:CPU ran slower than its plain GEMM: bench_cnn's EKFAC ``vTMv`` (a
    ``(10, 4097)`` layer) took 5.3–6.0 ms that way, 3.5–4.1 ms this way; bench_resnet's
    (``(512, 2049)``) 34–35 against 25 ms (2-core Xeon).
    """
    if qa is None:
        return qg.T @ v
    if qa.shape[0] > qg.shape[0]:
        return qg.T @ (v @ qa)
    return (qg.T @ v) @ qa


@jax.jit
def _eigenvalue_products(nodes: tuple, values: tuple) -> tuple[jax.Array, ...]:
    """:meth:`Kron.eigenvalue_product` of every layer in one compiled call (eagerly, an
    outer product of each shape was a program to compile: 35–50 ms apiece at a first EKFAC
    build)."""
    return tuple(node.eigenvalue_product(v) for node, v in zip(nodes, values))


def _unrotate(v: jax.Array, qg: jax.Array, qa: jax.Array | None) -> jax.Array:
    """``Q_G V Q_Aᵀ``."""
    v = qg @ v
    return v if qa is None else v @ qa.T


def _report_failed_cholesky(operation: str, answer: Any) -> None:
    """In an eager operation's compiled call, warn (after it) of factor-damped Kronecker
    factors whose Cholesky factorisation failed — singular to working precision (undamped:
    ``regul = 0``, fewer examples than a factor's width) or indefinite —, whose part of
    ``answer`` is then NaN throughout: one element of each of its arrays read (a check of
    each factor's pivots cost as much as the π-damped solve of bench_small's small
    factors)."""
    if collects_here():
        firsts = jnp.stack([jnp.ravel(a)[0] for a in jax.tree_util.tree_leaves(answer)
                            if jnp.size(a)])
        report_singular_when_run(operation, jnp.any(jnp.isnan(firsts)))


def _inner_apart(x: jax.Array, y: jax.Array) -> jax.Array:
    """``⟨X, Y⟩`` of a matrix ``X`` and a product ``Y``, read as two row slices (all rows
    but the last, then the last).

    Reduced as one array, the product's GEMMs and the reduction were fused by XLA:CPU into
    one YNNPACK kernel, slower than the plain GEMMs it runs when the product is read
    through slices (bench_mlp KFAC ``vTMv`` 5.5–5.8 → 5.0–5.2 ms, with and without biases,
    its ``mv`` 4.7–5.0 ms; 2-core Xeon). Optimisation barriers do not keep them apart.
    """
    if x.shape[0] < 2:
        return jnp.vdot(x, y)
    return jnp.vdot(x[:-1], y[:-1]) + jnp.vdot(x[-1], y[-1])


def _factor_apply(f, x: jax.Array) -> jax.Array:
    """``f`` of a symmetric PSD factor through its eigenvalues (a vector: elementwise)."""
    if x.ndim == 1:
        return f(x)
    return _spectral.spectral_functions(f, (x,))[0]


def _per_layer(layer_ids: Sequence[str], what: str, fn: Callable, parts: Sequence) -> tuple:
    """``fn`` of each layer's part, a refusal of its eigenvalues naming the part as
    ``what`` of its layer (:func:`~jaxgeom.pmat._spectral.each_part`)."""
    return _spectral.each_part([f"{what}layer {i!r}" for i in layer_ids], fn, parts)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class Factorisation:
    """One ``eigh`` of a symmetric PSD ``matrix`` (a Kronecker factor or an exact block):
    :func:`~jaxgeom.pmat._spectral.eigh_psd` with its ``rank_bound`` (``checked``: a hint).
    What :meth:`PMatKFAC._eigen` runs side by side."""

    matrix: jax.Array
    rank_bound: int | None = dataclasses.field(default=None, metadata=dict(static=True))
    checked: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def order(self) -> int:
        """The order of the matrix LAPACK's ``eigh`` factorises (with a useful rank bound,
        the range sketch's: :func:`~jaxgeom.pmat._spectral.sketch_width`)."""
        n = self.matrix.shape[0]
        return _spectral.sketch_width(n, self.rank_bound) or n

    def eigh(self) -> tuple[jax.Array, jax.Array]:
        return _spectral.eigh_psd(self.matrix, self.rank_bound, checked=self.checked)

    def eigvalsh(self) -> jax.Array:
        """:meth:`eigh`'s eigenvalues, without its eigenvectors where no sketch takes the
        matrix (:func:`~jaxgeom.pmat._spectral.eigvalsh_psd`)."""
        return _spectral.eigvalsh_psd(self.matrix, self.rank_bound, checked=self.checked)

    @staticmethod
    def eighs(jobs: Sequence[Factorisation]) -> list[tuple[jax.Array, jax.Array]]:
        """``[f.eigh() for f in jobs]``, the full ``eigh``'s in one host call
        (:func:`~jaxgeom.pmat._spectral.eighs_psd`)."""
        return _spectral.eighs_psd(*Factorisation._fields(jobs))

    @staticmethod
    def eigvalshs(jobs: Sequence[Factorisation]) -> list[jax.Array]:
        """``[f.eigvalsh() for f in jobs]``, the full decompositions' eigenvalues in one
        host call (:func:`~jaxgeom.pmat._spectral.eigvalshs_psd`)."""
        return _spectral.eigvalshs_psd(*Factorisation._fields(jobs))

    @staticmethod
    def _fields(jobs: Sequence[Factorisation]) -> tuple[list, list, list]:
        return ([f.matrix for f in jobs], [f.rank_bound for f in jobs],
                [f.checked for f in jobs])


def _eye_like(m: jax.Array) -> jax.Array:
    return jnp.eye(m.shape[0], dtype=m.dtype)


#: what an eigendecomposition of the factors serves, for :meth:`Kron._check_symmetric`
_EIGENDECOMPOSITION = ("an eigendecomposition (eigvalsh, eigsh, pinv, logdet, norm(2), solve "
                       "and pow with exact damping)")


class RankBounds(NamedTuple):
    """Static hints about a Kronecker block's two factors (``A``'s, then ``G``'s): the
    ranks a build knows them to be at most (:attr:`Kron.rank_bounds`), or the trailing
    columns of their bases that span their ranges (:attr:`KronEigen.ranges`); ``None``:
    not known to be low. Derived from the number of examples a matrix was built from, so
    builds on data of different sizes differ in their pytree structure; the ``repr``
    (which JAX's pytree-structure errors print) names the fix,
    ``M.without_rank_bounds()``."""

    a: int | None = None
    g: int | None = None

    def __repr__(self) -> str:
        if self.a is None and self.g is None:
            return "RankBounds(none)"
        return (f"RankBounds(A: {self.a}, G: {self.g}; static hints from the number of "
                "examples built from: M.without_rank_bounds() drops them)")


def _as_rank_bounds(node: Any, name: str) -> None:
    """Normalise a frozen dataclass's static field ``name`` (a pair) to :class:`RankBounds`."""
    value = getattr(node, name)
    if type(value) is not RankBounds:
        object.__setattr__(node, name, RankBounds(*value))


@register_dataclass
@dataclasses.dataclass(frozen=True)
class Kron:
    """A layer block ``A ⊗ G``: ``V (g×a) ↦ G V Aᵀ`` (``G V A``: the factors are symmetric
    but in a product of two blocks). ``A`` is ``(a, a)`` or a diagonal ``(a,)``."""

    A: jax.Array
    G: jax.Array
    #: whether ``A`` and ``G`` are known to be symmetric: they are, but in a product of two
    #: blocks whose factors are not the same arrays (``A₁A₂`` need not be symmetric), whose
    #: eigendecompositions, solves and functions are refused (:meth:`_check_symmetric`)
    symmetric: bool = dataclasses.field(default=True, metadata=dict(static=True))
    #: ``A``'s and ``G``'s ranks are at most these (``None``: not known to be low), and
    #: :meth:`eigen` factorises their ranges only (:func:`factor_rank_bounds`). A promise
    #: about the values (EKFAC's build sets them on the factors it has just summed), unless
    #: :attr:`bounds_checked`
    rank_bounds: RankBounds = dataclasses.field(
        default=RankBounds(), metadata=dict(static=True))
    #: whether :attr:`rank_bounds` are hints that :meth:`eigen` checks, falling back to a
    #: full ``eigh`` where a range sketch missed part of the range
    #: (:func:`~jaxgeom.pmat._spectral.eigh_psd`'s ``checked``): a KFAC build's, which
    #: arithmetic on the arrays (an average of builds by ``tree_map``) may have broken
    bounds_checked: bool = dataclasses.field(default=False, metadata=dict(static=True))

    def __post_init__(self):
        _as_rank_bounds(self, "rank_bounds")

    def mv(self, v):
        """``G V Aᵀ``: the block ``kron(G, A)`` (:meth:`dense`) applied to the row-major
        ``vec(V)``; ``G V A`` for symmetric factors, but not for a product of two blocks
        (``A₁A₂ ⊗ G₁G₂``: ``G₁G₂ V (A₁A₂)ᵀ = G₁ (G₂ V A₂ᵀ) A₁ᵀ``)."""
        gv = self.G @ v
        if self.A.ndim == 1:
            return gv * self.A
        # contracting A's contiguous axis: also 3x faster on XLA:CPU than V A when V has
        # few rows (10 × 4097 by 4097²: 8 ms against 26 ms)
        return jax.lax.dot_general(gv, self.A, (((1,), (1,)), ((), ())))

    def quadratic(self, v):
        """``vec(V)ᵀ (A ⊗ G) vec(V) = ⟨V, G V Aᵀ⟩``, the product read apart from the
        reduction (:func:`_inner_apart`)."""
        return _inner_apart(v, self.mv(v))

    def transposed(self):
        """The block applied to ``Vᵀ``: ``(G V Aᵀ)ᵀ = A Vᵀ Gᵀ``, the Kronecker block with
        the factors' roles swapped."""
        if self.A.ndim == 1:
            return _OnTranspose(self)
        return Kron(self.G, self.A, self.symmetric)

    def _trace_a(self):
        return jnp.sum(self.A) if self.A.ndim == 1 else _spectral.trace(self.A)

    @property
    def _A(self):
        return jnp.diag(self.A) if self.A.ndim == 1 else self.A

    def dense(self):
        return jnp.kron(self.G, self._A)

    def diag(self):
        return jnp.outer(jnp.diag(self.G), jnp.diag(self._A))

    def trace(self):
        return _spectral.trace(self.G) * self._trace_a()

    def frobenius_sq(self):
        return jnp.sum(self.G**2) * jnp.sum(self._A**2)

    @property
    def eigh_orders(self) -> tuple[int, ...]:
        """The orders of the matrices :meth:`eigen` hands to LAPACK's ``eigh`` (a factor of
        known low rank: its range sketch's), in :meth:`factorisations`' order."""
        return tuple(f.order for f in self.factorisations())

    def factorisations(self) -> tuple[Factorisation, ...]:
        """What :meth:`eigen` factorises: ``G``, then ``A`` when it is square."""
        self._check_symmetric(_EIGENDECOMPOSITION)
        bound_a, bound_g = self.rank_bounds
        parts = ((self.G, bound_g),) + (((self.A, bound_a),) if self.A.ndim == 2 else ())
        return tuple(Factorisation(m, bound, self.bounds_checked) for m, bound in parts)

    def eigen(self, eighs: Sequence[tuple[jax.Array, jax.Array]] | None = None,
              d: jax.Array | None = None) -> KronEigen:
        """The block in its Kronecker-factored eigenbasis (:func:`~jaxgeom.pmat._spectral.
        eigh_psd` of each factor: only their ranges where :attr:`rank_bounds` are known,
        which the :class:`KronEigen` keeps as its :attr:`~KronEigen.ranges`). ``eighs``:
        the ``(λ, V)`` of :meth:`factorisations`, when computed apart
        (:meth:`PMatKFAC._eigen`: side by side); ``d``: their :meth:`eigenvalue_product`,
        when computed apart too."""
        bound_a, bound_g = self.rank_bounds
        checked = self.bounds_checked

        def width(m, bound):  # a hint's range cannot be promised to the products
            return None if checked else _spectral.range_width(m.shape[0], bound)

        if eighs is None:
            eighs = [f.eigh() for f in self.factorisations()]
        d = self.eigenvalue_product([e for e, _ in eighs]) if d is None else d
        qg = eighs[0][1]
        if self.A.ndim == 1:
            return KronEigen(None, qg, d, ranges=(None, width(self.G, bound_g)))
        return KronEigen(eighs[1][1], qg, d,
                         ranges=(width(self.A, bound_a), width(self.G, bound_g)))

    def eigenvalue_product(self, values: Sequence[jax.Array]) -> jax.Array:
        """``d = λ_G λ_Aᵀ`` (``(g, a)``) from the eigenvalues ``λ`` of
        :meth:`factorisations`; a diagonal ``A`` is its own eigenvalues."""
        return jnp.outer(values[0], self.A if self.A.ndim == 1 else values[1])

    def power(self, p):
        """``A^p ⊗ G^p`` (integer ``p ≥ 0`` by products; otherwise PSD eigenvalues)."""
        if _spectral.is_integer(p) and p >= 0:
            mp = functools.partial(jnp.linalg.matrix_power, n=int(p))
            return dataclasses.replace(
                self, A=self.A ** int(p) if self.A.ndim == 1 else mp(self.A), G=mp(self.G),
                rank_bounds=self.rank_bounds if p > 0 else (None, None))
        self._check_symmetric(f"pow({p})")
        f = functools.partial(_spectral.shifted_power, p=p)
        with _spectral.of_part("factor A"):
            a = _factor_apply(f, self.A)
        with _spectral.of_part("factor G"):
            g = _factor_apply(f, self.G)
        return Kron(a, g)

    def solve(self, v):
        """``G⁻¹ V A⁻¹`` through Cholesky factorisations (positive-definite factors, e.g.
        damped ones): ``(a³ + g³)/3`` plus ``2 a g (a + g)``, several times cheaper than
        eigendecompositions."""
        self._check_symmetric("solve")
        x = spd_solve(self.G, v)
        return x / self.A if self.A.ndim == 1 else spd_solve(self.A, x.T).T

    def inverse(self) -> Kron:
        """``A⁻¹ ⊗ G⁻¹`` of positive-definite factors (:func:`inverses`)."""
        return inverses([self])[0]

    def factor_damped(self, regul, damping: str) -> Kron:
        """The block with each factor damped (a ``damping`` of :data:`FACTORED_DAMPINGS`):
        ``(A + π√λ I) ⊗ (G + √λ/π I)``, ``λ`` = ``regul``, with

        - ``"pi"``: ``π = √((tr A / a) / (tr G / g))`` (Martens & Grosse 2015, §6.3), which
          balances the two factors' shares of the damping. A factor of trace zero (a
          layer whose outputs get no gradient, or whose inputs are all zero) makes the
          block zero and ``π`` 0 or ∞; the damped block is then ``λI``, the limit of the
          formula, written ``√λ I ⊗ √λ I`` (as kfac-jax does);
        - ``"pi_one"``: ``π = 1``, ``(A + √λ I) ⊗ (G + √λ I)``, the formula as it is for
          any factors (NNGeometry's ``use_pi=False`` on factors it scales otherwise).

        Cost ``O(a + g)`` (two traces and two diagonal updates). Positive definite for
        ``λ > 0``, so :meth:`solve` and :meth:`inverse` factorise it by Cholesky."""
        self._check_symmetric(f"damping={damping!r}")
        root = jnp.sqrt(jnp.asarray(regul, self.G.dtype))
        a, g = self.A, self.G
        if FACTORED_DAMPINGS[damping]:
            a_mean = self._trace_a() / self.A.shape[0]
            g_mean = _spectral.trace(self.G) / self.G.shape[0]
            zero = (a_mean == 0) | (g_mean == 0)
            pi = jnp.where(zero, 1, jnp.sqrt(a_mean / jnp.where(zero, 1, g_mean)))
            a, g = (jnp.where(zero, jnp.zeros_like(f), f) for f in (a, g))
        else:
            pi = 1
        eye_g = jnp.eye(g.shape[0], dtype=g.dtype)
        a = a + pi * root if a.ndim == 1 else a + pi * root * jnp.eye(
            a.shape[0], dtype=a.dtype)
        return Kron(a, g + root / pi * eye_g)

    def scale(self, s):
        return dataclasses.replace(self, A=self.A * s)

    def add(self, other, sign):
        """``A ⊗ G ± A' ⊗ G'`` when it is one Kronecker product, a factor shared (the same
        arrays, or equal concrete values): ``(A ± A') ⊗ G`` or ``A ⊗ (G ± G')``; else
        ``None``."""
        if not isinstance(other, Kron) or self.A.ndim != other.A.ndim:
            return None
        symmetric = self.symmetric and other.symmetric
        if _same_array(self.G, other.G):
            return Kron(self.A + sign * other.A, self.G, symmetric)
        if _same_array(self.A, other.A):
            return Kron(self.A, self.G + sign * other.G, symmetric)
        return None

    def mm(self, other):
        """``A₁A₂ ⊗ G₁G₂``: symmetric when the two blocks' factors are the same arrays (or
        equal values: a square), which :attr:`symmetric` records; otherwise ``A₁A₂`` and
        ``G₁G₂`` need not be symmetric (factors that do not commute)."""
        if not isinstance(other, Kron):
            return None
        same_a = self.A.ndim == 1 or _same_array(self.A, other.A)
        symmetric = self.symmetric and other.symmetric and same_a and _same_array(
            self.G, other.G)
        if self.A.ndim == other.A.ndim == 1:
            return Kron(self.A * other.A, self.G @ other.G, symmetric)
        return Kron(self._A @ other._A, self.G @ other.G, symmetric)

    def _check_symmetric(self, operation: str) -> None:
        """Refuse ``operation`` (it factorises ``A`` and ``G`` as symmetric matrices) for a
        block not known to be symmetric: a product ``A₁A₂ ⊗ G₁G₂`` of two blocks."""
        if not self.symmetric:
            raise ValueError(
                f"PMatKFAC: {operation} needs symmetric Kronecker factors; a layer's block "
                "here is the product of two blocks, A₁A₂ ⊗ G₁G₂ (F1 @ F2), whose factors need "
                "not commute, so it need not be symmetric. Its mv, vTMv, get_diag, trace, "
                "frobenius_norm and to_dense are exact. Apply the matrices in turn instead, "
                "e.g. (F1 F2)⁻¹ v = F2.solve(F1.solve(v)), or solve the dense product "
                "PMatDense.from_pmat(F1 @ F2).solve(v, method='lstsq')")


def inverses(nodes: Sequence[Kron]) -> tuple[Kron, ...]:
    """``A⁻¹ ⊗ G⁻¹`` of each block of positive-definite factors: all the square factors in
    one :func:`jaxgeom._symmetric.spd_inverses` (LAPACK's ``potri`` on a CPU for the large
    ones, in one host call, side by side where faster; else Cholesky solves), a diagonal
    ``A`` by its reciprocal. Cost ``Σ (a³ + g³)/2``."""
    for node in nodes:
        node._check_symmetric("inv")
    inverted = iter(spd_inverses([m for n in nodes for m in (n.G, n.A) if m.ndim == 2]))
    out = []
    for node in nodes:
        g = next(inverted)
        out.append(Kron(next(inverted) if node.A.ndim == 2 else 1 / node.A, g))
    return tuple(out)


@register_dataclass
@dataclasses.dataclass(frozen=True)
class KronEigen:
    """A layer block in the Kronecker-factored eigenbasis:
    ``(Q_A ⊗ Q_G) diag(d) (Q_A ⊗ Q_G)ᵀ``, ``d`` a ``(g, a)`` array (``qa = None``: identity).

    **Ranges.** A factor factorised through its range (:meth:`Kron.eigen` with
    :attr:`Kron.rank_bounds`) has a basis whose last ``r`` columns span its range and whose
    first ones span its null space, where the layer's inputs (``A``) or output gradients
    (``G``) have no component: ``d`` is then constant off the block ``d[-r_G:, -r_A:]``
    (0 for the factors' eigenvalues and for the refit on the same data; ``f(0)`` after an
    elementwise ``f``, e.g. ``1/(0 + λ)`` in a damped solve). With ``c`` that constant and
    ``Q_{·,r}``, ``d_r`` the range columns and the block of ``d`` on them,

    .. math::  M V = Q_{G,r} \\big((d_r - c) \\odot Q_{G,r}^\\top V Q_{A,r}\\big)
       Q_{A,r}^\\top + c V,

    so products rotate by the range columns only: ``g a (r_G + r_A)`` instead of
    ``g a (g + a)`` (bench_cnn's 4097-input read-out seen on 128 examples: ``r_A = 160``).
    ``d`` keeps its whole ``(g, a)`` shape (traces, norms, eigenvalues and ``dense`` read
    it as it is).
    """

    qa: jax.Array | None
    qg: jax.Array
    d: jax.Array
    #: ``(r_A, r_G)``: how many trailing columns of ``Q_A``, ``Q_G`` span their factor's
    #: range, where ``d`` may vary (``None``: the whole basis). A promise about ``d``'s
    #: values: kept by elementwise maps of ``d`` (:meth:`map`), dropped by
    #: :meth:`with_values` (a refit on new data varies everywhere)
    ranges: RankBounds = dataclasses.field(
        default=RankBounds(), metadata=dict(static=True))
    #: whether ``d`` is 0 off the ranges (else it is ``d[0, 0]`` there)
    zero_off_range: bool = dataclasses.field(default=True, metadata=dict(static=True))

    def __post_init__(self):
        _as_rank_bounds(self, "ranges")
        # without ranges the flag means nothing: one value keeps one pytree structure (a
        # damped inverse and its checkpoint, restored without ranges, compare equal)
        if self.ranges == (None, None) and not self.zero_off_range:
            object.__setattr__(self, "zero_off_range", True)

    def mv(self, v):
        if self._flip(v):
            return self.transposed().mv(v.T).T
        qa, qg, d, c = self._on_ranges()
        if c is None:
            return _unrotate(d * _rotate(v, qg, qa), qg, qa)
        return _unrotate((d - c) * _rotate(v, qg, qa), qg, qa) + c * v

    def _flip(self, v) -> bool:
        """Whether to work on ``Vᵀ`` with the swapped bases: when ``V`` is tall (``g ≥ 4a``,
        e.g. a 4097-input layer seen as its ``(a, g)`` kernel), so that the large basis
        multiplies from the right (``X Q``). XLA:CPU runs ``Qᵀ X`` for a skinny ``X`` 2-3x
        slower (a 4097² basis by ``(4097, 10)``: 25 ms against 10.5 ms)."""
        return self.qa is not None and v.shape[0] >= 4 * v.shape[1]

    def _on_ranges(self) -> tuple[jax.Array | None, jax.Array, jax.Array, jax.Array | None]:
        """``(Q_{A,r}, Q_{G,r}, d_r, c)``: the range columns, ``d``'s block on them and its
        value off them (``None``: 0, or no columns off the ranges)."""
        range_a, range_g = self.ranges
        if range_a is None and range_g is None:
            return self.qa, self.qg, self.d, None
        rows = slice(None) if range_g is None else slice(-range_g, None)
        cols = slice(None) if range_a is None else slice(-range_a, None)
        qa = None if self.qa is None else self.qa[:, cols]
        return qa, self.qg[:, rows], self.d[rows, cols], (
            None if self.zero_off_range else self.d[0, 0])

    def dense(self):
        """The ``(g a, g a)`` block, one block row ``i`` (``a`` rows) at a time:
        ``B[(i, ·), (j, ·)] = Q_A diag(Y_i[j]) Q_Aᵀ`` with ``Y_i = (Q_G ⊙ Q_G[i]) d``, written
        into the result in place (memory: the result plus ``g a r_A``; ``kron(Q_G, Q_A)``
        and its product took three ``(g a)²`` arrays). Cost ``g² a² r_A``, against
        ``(g a)³`` for the Kronecker product's; on the ranges only, ``c I`` added after."""
        qa, qg, d, c = self._on_ranges()
        g, a = self.qg.shape[0], self.d.shape[1]
        if qa is None:
            qa = jnp.eye(a, dtype=d.dtype)
        if c is not None:
            d = d - c

        def block_row(qg_i):
            y = (qg * qg_i) @ d  # (g, r_A)
            return qa @ (y.T[:, :, None] * qa.T[:, None, :]).reshape(qa.shape[1], g * a)

        out = jax.lax.map(block_row, qg).reshape(g * a, g * a)
        if c is not None:
            out = out.at[jnp.diag_indices(g * a)].add(c)
        return out

    def diag(self):
        qa, qg, d, c = self._on_ranges()
        d = d if c is None else d - c
        right = d if qa is None else d @ (qa**2).T
        out = (qg**2) @ right
        return out if c is None else out + c

    def trace(self):
        return jnp.sum(self.d)

    def frobenius_sq(self):
        return jnp.sum(self.d**2)

    #: :meth:`eigen` factorises nothing
    eigh_orders: ClassVar[tuple[int, ...]] = ()

    def factorisations(self) -> tuple[Factorisation, ...]:
        return ()

    def eigen(self, eighs: Sequence[tuple[jax.Array, jax.Array]] | None = None) -> KronEigen:
        return self

    def eigvals(self):
        return self.d.ravel()

    def with_values(self, d):
        """The block with eigenvalues ``d`` on these bases, any values: on the whole bases
        (no :attr:`ranges`)."""
        return KronEigen(self.qa, self.qg, d)

    def map(self, f: Callable[[jax.Array], jax.Array], *, keeps_zero: bool = False):
        """The block with eigenvalues ``f(d)`` for an elementwise ``f`` (the :attr:`ranges`
        kept: ``d``'s constant off them maps to one constant); ``keeps_zero``: ``f(0) = 0``."""
        return dataclasses.replace(self, d=f(self.d),
                                   zero_off_range=self.zero_off_range and keeps_zero)

    def quadratic(self, v):
        """``Σ d ⊙ (Q_Gᵀ V Q_A)²``: one rotation, half the work of ``⟨V, M V⟩`` (on the
        ranges, ``Σ (d_r − c) ⊙ (Q_{G,r}ᵀ V Q_{A,r})² + c ‖V‖²``)."""
        if self._flip(v):
            return self.transposed().quadratic(v.T)
        qa, qg, d, c = self._on_ranges()
        if c is None:
            return jnp.sum(d * _rotate(v, qg, qa) ** 2)
        return jnp.sum((d - c) * _rotate(v, qg, qa) ** 2) + c * jnp.sum(v * v)

    def transposed(self):
        """The block applied to ``Vᵀ``: the eigenbases swapped, ``d`` transposed."""
        if self.qa is None:
            return _OnTranspose(self)
        return KronEigen(self.qg, self.qa, self.d.T, self.ranges[::-1], self.zero_off_range)

    def scale(self, s):
        return self.map(lambda d: d * s, keeps_zero=True)

    def shares_basis(self, other) -> bool:
        """Whether ``other`` is a ``KronEigen`` on the same eigenbases (the same arrays,
        e.g. two functions of one matrix, or equal concrete values)."""
        return (isinstance(other, KronEigen) and _same_array(self.qa, other.qa)
                and _same_array(self.qg, other.qg))

    def add(self, other, sign):
        """The sum on a shared eigenbasis (eigenvalues add), else ``None``."""
        if not self.shares_basis(other):
            return None
        return self._combine(other, self.d + sign * other.d,
                             self.zero_off_range and other.zero_off_range)

    def mm(self, other):
        """The product on a shared eigenbasis (eigenvalues multiply), else ``None``."""
        if not self.shares_basis(other):
            return None
        return self._combine(other, self.d * other.d,
                             self.zero_off_range or other.zero_off_range)

    def _combine(self, other, d, zero_off_range: bool) -> KronEigen:
        """An elementwise function ``d`` of both blocks' values on the shared bases: on the
        wider of each factor's ranges (the whole basis where either has none)."""
        ranges = tuple(None if r is None or s is None else max(r, s)
                       for r, s in zip(self.ranges, other.ranges))
        return KronEigen(self.qa, self.qg, d, ranges,
                         zero_off_range or ranges == (None, None))


@dataclasses.dataclass(frozen=True)
class _OnTranspose:
    """A layer block applied to ``Vᵀ`` through transposes (blocks with a diagonal ``A``)."""

    node: Any

    def mv(self, v):
        return self.node.mv(v.T).T

    def solve(self, v):
        return self.node.solve(v.T).T

    def quadratic(self, v):
        return self.node.quadratic(v.T)


def _kron_eigenvectors(node: KronEigen, i: jax.Array) -> jax.Array:
    """The eigenvectors of a :class:`KronEigen` block at positions ``i`` (``(m,)``, of
    ``d.ravel()``): rows ``vec(q_{G,r} q_{A,c}ᵀ)`` (``r, c = divmod(i, a)``), the ``(g, a)``
    layer matrix in row-major order, ``(m, g a)``."""
    a = node.d.shape[1]
    r, c = i // a, i % a
    left = node.qg[:, r].T  # (m, g)
    right = (jax.nn.one_hot(c, a, dtype=node.qg.dtype) if node.qa is None
             else node.qa[:, c].T)  # (m, a)
    return (left[:, :, None] * right[:, None, :]).reshape(i.shape[0], -1)


def _same_array(x, y) -> bool:
    if x is y:
        return True
    if x is None or y is None or isinstance(x, jax.core.Tracer) or isinstance(y, jax.core.Tracer):
        return False
    return x.shape == y.shape and bool(jnp.array_equal(x, y))


# ----------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True, eq=False)
class _Layout:
    """Static split/merge of flat vectors into the ``(g, a[+1])`` layer matrices (the bias,
    if any, as last column) and the other layers' vectors, by slices, reshapes and
    transposes (:class:`~jaxgeom._reindex.FlatPartition`).

    A kernel stored input-major (Flax's ``(in, out)``, an ``HWIO`` convolution) is the
    transposed layer matrix in memory: the ``*_oriented`` methods hand such layers over as
    ``(a[+1], g)`` matrices, a free reshape (the bias appended as last row), to blocks that
    apply themselves to ``Vᵀ`` (``transposed()``): transposing 670k parameters into layer
    matrices and back costs XLA:CPU as much as the Kronecker products themselves.
    """

    matrices: tuple[np.ndarray, ...]  # (g, a[+1]) flat indices per Kronecker layer
    biased: tuple[bool, ...]
    transposed: tuple[bool, ...]  # the kernel is (a, g) in memory
    others: tuple[Layer, ...]
    other_indices: tuple[np.ndarray, ...]
    partition: FlatPartition  # per Kronecker layer its kernel [and bias], then the others

    def split_pieces(self, v):
        """Per Kronecker layer ``(kernel, bias or None)``, the kernel as its layer matrix in
        memory orientation (``(a, g)`` where ``transposed``, else ``(g, a)``); the other
        layers' vectors."""
        parts = iter(self.partition.split(v))
        return [(next(parts), next(parts) if b else None) for b in self.biased], list(parts)

    def merge_pieces(self, pairs, vecs, like=None):
        """The inverse of :meth:`split_pieces` (into the leaves of ``like`` when it is a
        :class:`~jaxgeom._reindex.LeafVector`, the vector that was split)."""
        pieces = [p for kernel, bias in pairs for p in ((kernel,) if bias is None
                                                        else (kernel, bias))]
        return self.partition.merge(pieces + list(vecs), like=like)

    def split_oriented(self, v):
        """Per Kronecker layer its matrix, ``(a[+1], g)`` where ``transposed``, else
        ``(g, a[+1])`` (the bias appended); the other layers' vectors."""
        pairs, vecs = self.split_pieces(v)
        mats = [k if b is None else jnp.concatenate([k, b[None]], 0) if t
                else jnp.concatenate([k, b[:, None]], 1)
                for (k, b), t in zip(pairs, self.transposed)]
        return mats, vecs

    def merge_oriented(self, mats, vecs, like=None):
        """The inverse of :meth:`split_oriented`."""
        pairs = [((m, None) if not biased else (m[:-1], m[-1]) if t else (m[:, :-1], m[:, -1]))
                 for m, biased, t in zip(mats, self.biased, self.transposed)]
        return self.merge_pieces(pairs, vecs, like)

    def split(self, v):
        """``(g, a[+1])`` layer matrices and the other layers' vectors."""
        mats, vecs = self.split_oriented(v)
        return [m.T if t else m for m, t in zip(mats, self.transposed)], vecs

    def merge(self, mats, vecs):
        """The inverse of :meth:`split`."""
        return self.merge_oriented([m.T if t else m for m, t in zip(mats, self.transposed)],
                                   vecs)

    def quadratic(self, nodes, v, blocks=()) -> jax.Array:
        """``Σ_layers vₗᵀ Mₗ vₗ``: each node's ``quadratic`` on its oriented matrix, the
        other layers' dense ``blocks``."""
        mats, vecs = self.split_oriented(v)
        forms = [(n.transposed() if t else n).quadratic(m)
                 for n, m, t in zip(nodes, mats, self.transposed)]
        return sum(forms) + sum(jnp.vdot(x, b @ x) for b, x in zip(blocks, vecs))

    def apply(self, nodes, method: str, v, blocks=()):
        """Each layer's ``node.method`` on its matrix of ``v`` (oriented: no transposes),
        ``blocks[i](x)`` on the other layers' vectors; the flat result."""
        mats, vecs = self.split_oriented(v)
        out = [getattr(n.transposed() if t else n, method)(m)
               for n, m, t in zip(nodes, mats, self.transposed)]
        return self.merge_oriented(out, [f(x) for f, x in zip(blocks, vecs)], like=v)

    @property
    def kron_flat(self):
        return [idx.reshape(-1) for idx in self.matrices]


@functools.lru_cache(maxsize=128)
def kronecker_layout(layer_collection: LayerCollection,
                     specs: tuple[KroneckerSpec, ...]) -> _Layout:
    """The static split/merge of flat vectors for these Kronecker layers (cached)."""
    matrices = tuple(spec.matrix_indices(layer_collection) for spec in specs)
    biased = tuple(spec.bias is not None for spec in specs)
    transposed, pieces = [], []
    for spec, m, b in zip(specs, matrices, biased):
        kernel = m[:, :-1] if b else m
        t = spec.kind != "embedding" and is_transposed_block(kernel)
        transposed.append(t)
        pieces += [kernel.T if t else kernel] + ([m[:, -1]] if b else [])
    ids = {spec.layer_id for spec in specs}
    others = tuple(layer for layer in layer_collection.layers if layer.id not in ids)
    other_indices = tuple(layer_collection.layer_indices(layer) for layer in others)
    partition = FlatPartition.of(pieces + list(other_indices), layer_collection.numel())
    return _Layout(matrices, biased, tuple(transposed), others, other_indices, partition)


def restricted_specs(specs: tuple[KroneckerSpec, ...],
                     r: Restriction) -> tuple[list[int], tuple[KroneckerSpec, ...]]:
    """The Kronecker layers of ``specs`` among the layers of the restriction ``r``: their
    positions in ``specs``, and their specs with the kernel's and bias's leaf indices in
    ``r.layer_collection`` (the position of each among the subset's leaves ``r.leaves``)."""
    position = {leaf: k for k, leaf in enumerate(r.leaves)}
    ids = {layer.id for layer in r.layer_collection}
    kept = [i for i, spec in enumerate(specs) if spec.layer_id in ids]
    return kept, tuple(dataclasses.replace(
        specs[i], kernel=position[specs[i].kernel],
        bias=None if specs[i].bias is None else position[specs[i].bias]) for i in kept)


#: the largest non-Kronecker layer, in parameters, given an exact dense block by default
#: (the builds' ``max_dense_block``), and the largest layer whose exact block a sum of
#: KFACs on different factors forms: 4096² float32 is 64 MiB
DENSE_BLOCK_LIMIT = 4096


def _layer_shape(node: Any) -> tuple[int, int] | None:
    """The ``(g, a)`` layer matrix a factor node acts on (its arrays' trailing axes: a stack
    has leading ones); ``None`` when its arrays are placeholders of JAX's pytree machinery."""
    if isinstance(node, Kron):
        g, a = getattr(node.G, "shape", None), getattr(node.A, "shape", None)
    elif isinstance(node, KronEigen):
        shape = getattr(node.d, "shape", None)
        g, a = (None, None) if shape is None else (shape[-2:-1], shape[-1:])
    else:
        return None
    if g is None or a is None or not g or not a:
        return None
    return (int(g[-1]), int(a[-1]))


# ----------------------------------------------------------------------------- representation
@representation
class PMatKFAC(PMatAbstract):
    """Kronecker-factored layer blocks, exact dense blocks for the other layers, zero
    between layers (see the module docstring for the definition, conventions and costs).

    Build with ``FIM(..., PMatKFAC)``, ``FIM_MonteCarlo`` or ``SecondMoment``; options:
    ``kfac_approx`` (``"expand"``/``"reduce"``), ``separate_weight_and_bias`` (default
    ``False``: one joint block per biased layer; ``True``: the kernel's and the bias's blocks
    apart, curvlinops' default), ``max_dense_block`` (the largest non-Kronecker layer, in
    parameters, allowed an exact dense block; default 4096).

    Attributes:
      layer_collection: the parameter layout (static).
      specs: one :class:`~jaxgeom.capture.KroneckerSpec` per Kronecker layer (static).
      factors: per Kronecker layer, a :class:`Kron` (``A``, ``G``) or, after a damped
        ``inv``/``pow``/``pinv``, a :class:`KronEigen` (eigenbases and eigenvalues).
      blocks: the exact ``(d_l, d_l)`` blocks of the other layers (ascending flat order of
        each layer's parameters), in ``layer_collection`` order.
    """

    layer_collection: LayerCollection = static_field()
    specs: tuple[KroneckerSpec, ...] = static_field(default=())
    factors: tuple[Any, ...] = ()
    blocks: tuple[jax.Array, ...] = ()

    #: products and quadratic forms of params-shaped vectors run on their leaves
    LEAFWISE: ClassVar[bool] = True

    def __post_init__(self):
        check_specs(self)

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("eigh", *ITERATIVE_SOLVE_METHODS)
    SOLVE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "eigh": ("damping",), **iterative_solve_options("damping")}
    FACTORISING_OPERATIONS: ClassVar[tuple[str, ...]] = (*PMatAbstract.FACTORISES,
                                                         "_factor_damped_inverse")

    def check_shapes(self) -> None:
        """Refuse factors or blocks of another model's shapes (a state restored into a
        target of another model, hand-made factors): they fail later, far from the cause,
        or answer silently (``trace``, ``to_dense`` of a restored KFAC). Run by Flax's
        ``from_bytes``/``from_state_dict`` (not at every construction: a jitted call's
        outputs are rebuilt each time)."""
        name = type(self).__name__
        if len(self.factors) != len(self.specs):
            raise ValueError(f"{name} has {len(self.specs)} Kronecker layers; got "
                             f"{len(self.factors)} factors")
        for spec, node in zip(self.specs, self.factors):
            want = (spec.out_features, spec.in_features + (spec.bias is not None))
            got = _layer_shape(node)
            if got is not None and got != want:
                raise ValueError(
                    f"{name}: the factors of layer {spec.layer_id!r} must act on its (g, a) = "
                    f"{want} layer matrix; got {got}. A matrix of another model? Restore a "
                    "state into a target built for the same model and layers")
        others = self._parts.others
        if len(self.blocks) != len(others):
            raise ValueError(f"{name} has {len(others)} exact blocks; got {len(self.blocks)}")
        for layer, block in zip(others, self.blocks):
            n = self.layer_collection.layer_numel(layer)
            check_shape(f"{name} block of layer {layer.id!r}", getattr(block, "shape", None),
                        f"({n}, {n})", lambda s, n=n: s == (n, n), 2)

    @property
    def _parts(self) -> _Layout:
        return kronecker_layout(self.layer_collection, self.specs)

    @property
    def dtype(self):
        """The dtype of the factors (that of the parameters when built; a matrix cast
        with ``tree_map`` or restored from a state of another precision has its arrays'),
        or the parameters' when there is none."""
        for leaf in jax.tree_util.tree_leaves(self):
            dtype = getattr(leaf, "dtype", None)
            if dtype is not None and jnp.issubdtype(dtype, jnp.inexact):
                return dtype
        return self.layer_collection.dtype

    # ------------------------------------------------------------------ access
    def _index(self, layer: Layer | str) -> int:
        layer_id = layer.id if isinstance(layer, Layer) else layer
        for i, spec in enumerate(self.specs):
            if spec.layer_id == layer_id:
                return i
        raise KeyError(
            f"{layer_id!r} is not a Kronecker-factored layer; those are "
            f"{[s.layer_id for s in self.specs]}"
        )

    def kronecker_factors(self, layer: Layer | str) -> tuple[jax.Array, jax.Array]:
        """``(A, G)`` of a Kronecker layer (``A`` with the bias as last row/column, zero
        off the diagonal when built with ``separate_weight_and_bias``; an embedding's ``A``
        is the ``(V,)`` diagonal)."""
        node = self.factors[self._index(layer)]
        if not isinstance(node, Kron):
            raise ValueError(
                f"{type(self).__name__} stores layer {self.specs[self._index(layer)].layer_id!r} "
                "in its Kronecker eigenbasis (an EKFAC, or a K-FAC after inv/pow), not as "
                "factors A ⊗ G: read kronecker_block(layer), or the factors of the K-FAC "
                "it came from")
        return node.A, node.G

    def kronecker_block(self, layer: Layer | str) -> jax.Array:
        """The raw ``kron(G, A)`` block in the layer-matrix order ``(output, input [, bias])``
        (NNGeometry's ``split_weight_bias=False``)."""
        return self.factors[self._index(layer)].dense()

    def get_block(self, layer: Layer | str) -> jax.Array:
        """The ``(d_l, d_l)`` block of any layer, in ascending flat order of its parameters."""
        layer_id = layer.id if isinstance(layer, Layer) else layer
        for other, block in zip(self._parts.others, self.blocks):
            if other.id == layer_id:
                return block
        i = self._index(layer_id)
        order = np.argsort(self._parts.kron_flat[i])
        return self.factors[i].dense()[np.ix_(order, order)]

    # ------------------------------------------------------------------ primitives
    def _mv(self, v):
        return self._parts.apply(self.factors, "mv", v,
                                 [functools.partial(jnp.matmul, b) for b in self.blocks])

    def _vTMv(self, v):
        return self._parts.quadratic(self.factors, v, self.blocks)

    def to_dense(self):
        """The ``d × d`` matrix, through the layer blocks (``PMatBlockDiag.to_dense``'s
        permutation: a scatter of each block by ``np.ix_`` took index constants of
        ``2 d_l²`` integers and peaked at 3.9× the result)."""
        return self.to_blockdiag().to_dense()

    def get_diag(self):
        return self._parts.merge([n.diag() for n in self.factors],
                                 [jnp.diag(b) for b in self.blocks])

    def trace(self):
        """``Σ_l tr(G_l) tr(A_l)`` plus the blocks' traces; the diagonals of all the square
        factors and blocks read in one pass (:func:`~jaxgeom.pmat._spectral.traces`)."""
        if not all(isinstance(n, Kron) for n in self.factors):
            return sum(n.trace() for n in self.factors) + sum(
                _spectral.trace(b) for b in self.blocks)
        square = [m for n in self.factors for m in (n.G, n.A) if m.ndim == 2]
        square_traces = iter(_spectral.traces(square + list(self.blocks)))
        total = 0.0
        for n in self.factors:
            g = next(square_traces)
            total = total + g * (next(square_traces) if n.A.ndim == 2 else jnp.sum(n.A))
        return total + sum(square_traces)

    def frobenius_norm(self):
        squares = [n.frobenius_sq() for n in self.factors] + [jnp.sum(b**2) for b in self.blocks]
        return jnp.sqrt(sum(squares))

    def _eigen(self, blocks: bool = True, work_follows: bool = False):
        """Eigendecompositions of every layer: ``KronEigen`` nodes and ``(λ, V)`` pairs of
        the exact blocks (none without ``blocks``), their ``eigh`` side by side on a CPU's
        cores when that is faster (:meth:`_factorised`, told whether ``work_follows``)."""
        grouped = self._factorised(Factorisation.eigh, Factorisation.eighs, blocks,
                                   work_follows)
        products = iter(self._eigenvalue_products([[e for e, _ in g] for g in grouped]))
        nodes = tuple(node.eigen(e, next(products)) if e else node.eigen(e)
                      for node, e in zip(self.factors, grouped))
        return nodes, tuple(e for (e,) in grouped[len(self.factors):])

    def _factorised(self, fn: Callable[[Factorisation], Any],
                    on_host: Callable[[list[Factorisation]], list], blocks: bool = True,
                    work_follows: bool = False) -> list[list]:
        """``fn`` of each layer's :meth:`~Kron.factorisations` (a list a layer: none for
        one held in its eigenbasis), then of each exact block (a list of one, none without
        ``blocks``), side by side on a CPU's cores when that is faster
        (:func:`~jaxgeom._lapack.side_by_side`, told whether ``work_follows``; inside a
        trace, all in one host call: ``on_host``)."""
        parts = [node.factorisations() for node in self.factors]  # refused unless symmetric
        parts += [(Factorisation(b),) for b in (self.blocks if blocks else ())]
        jobs = [f for group in parts for f in group]
        results = iter(side_by_side(fn, jobs, [f.order for f in jobs], work_follows=work_follows,
                                    on_host=on_host if _host_lapack.may_run(self.dtype)
                                    else None))
        return [[next(results) for _ in group] for group in parts]

    def _eigenvalue_products(self, values: Sequence[list[jax.Array]]) -> list[jax.Array]:
        """:meth:`Kron.eigenvalue_product` of each layer given its factors' eigenvalues (a
        list a layer, as :meth:`_factorised` gives them: those given none left out)."""
        layers = [(node, v) for node, v in zip(self.factors, values) if v]
        if not layers:
            return []
        return list(_eigenvalue_products(*map(tuple, zip(*layers))))

    def _eigh_orders(self, blocks: bool = True) -> list[int]:
        """The orders of the matrices :meth:`_eigen` factorises."""
        return [n for node in self.factors for n in node.eigh_orders] + (
            [b.shape[0] for b in self.blocks] if blocks else [])

    def _factorised_orders(self, operation: str, *args: Any, **kwargs: Any) -> list[int]:
        """The orders of the independent matrices that the compiled eager call
        ``operation(*args, **kwargs)`` factorises (:func:`~jaxgeom._dispatch.compiled_when_eager`
        runs them side by side when that is faster): every factor and block for
        ``eigvalsh``, ``eigsh``, ``slogdet``, ``logdet``, ``norm(±2)`` and ``solve`` — a
        factor-damped one's (``damping="pi"``/``"pi_one"``) Cholesky factorisations of
        ``G`` and ``A`` too (its triangular solves chain ``G`` then ``A`` in each layer, the
        factorisations do not: bench_mlp's π-damped ``solve`` 28.0 → 26.5 ms, and a loop of it and a
        Monte-Carlo build 63.5 → 47.5 ms, no LAPACK thread left spinning into the build).
        None for a factor-damped ``inv`` with a factor inverted on the host: that host call
        runs all its inverses side by side itself (:func:`inverses`), and leaves no
        factorisation in the program for a hold to hold. Where the ``eigh``'s go to the
        host (:meth:`_eigen`) the hold is taken all the same: the host call runs its
        chains inside it, and it keeps the program's own LAPACK calls (a range sketch's QR
        factorisations) from leaving LAPACK's threads spinning (bench_resnet's exact-damped
        ``solve`` in a ``jit``: 379–468 ms unheld, 269–334 ms held, 2-core AMD EPYC VM)."""
        if operation == "_factor_damped_inverse":
            orders = self._factor_damped_orders(args[1] if len(args) > 1 else kwargs["damping"])
            if any(inverts_on_host(n, self.dtype) for n in orders):
                return []  # the host call runs them side by side itself (spd_inverses)
            return orders
        if operation == "solve":
            method = kwargs.get("method") or self.SOLVE_METHODS[0]
            if method != "eigh":
                return []
            damping = kwargs.get("damping", "exact")
            if damping in FACTORED_DAMPINGS:
                return self._factor_damped_orders(damping)
        elif operation == "_norm":
            if (args[0] if args else kwargs.get("ord")) not in (2, -2):
                return []
        elif operation not in ("eigvalsh", "slogdet", "logdet", "eigsh"):
            return []
        return self._eigh_orders()

    def _factor_damped_orders(self, damping: str) -> list[int]:
        """The orders of the matrices a factor-damped ``solve`` or ``inv`` factorises: each
        layer's ``G`` and (not diagonal) ``A`` by Cholesky, each exact block by ``eigh``."""
        return [m.shape[0] for node in self._krons(damping) for m in (node.G, node.A)
                if m.ndim == 2] + [b.shape[0] for b in self.blocks]

    def eigvalsh(self):
        """All ``d`` eigenvalues, ascending: each layer's products ``λ_G λ_Aᵀ`` of its
        factors' eigenvalues (an EKFAC's or inverted layer's stored ``d``), and the exact
        blocks'. The factors' eigenvalues alone, without eigenvectors where no range sketch
        takes them (:meth:`Factorisation.eigvalsh`: LAPACK's ``syevd`` without eigenvectors,
        ≈ 1.4× faster), side by side as :meth:`_eigen`'s ``eigh``; then one sort of ``d``
        values (:func:`~jaxgeom._sorting.sort`). Serves :meth:`slogdet`, :meth:`logdet`
        and ``norm(±2)`` too."""
        grouped = self._factorised(Factorisation.eigvalsh, Factorisation.eigvalshs)
        k = len(self.factors)
        products = iter(self._eigenvalue_products(grouped[:k]))
        values = [next(products).ravel() if v else node.eigvals()
                  for node, v in zip(self.factors, grouped[:k])]
        return sort(jnp.concatenate(values + [v for (v,) in grouped[k:]]))

    def eigh(self):
        """Not offered: the ``d × d`` eigenvectors of a Kronecker-factored matrix are what
        it avoids forming. :meth:`eigsh` gives ``k`` eigenpairs from the factors'
        eigenbases, :meth:`eigvalsh` all ``d`` eigenvalues, and a layer's eigenbasis is
        ``jnp.linalg.eigh`` of each of its :meth:`kronecker_factors` (an EKFAC's
        ``eigenbasis(layer)``)."""
        self._unsupported(
            "eigh", "its d × d eigenvectors are what the Kronecker factors avoid forming: "
            "M.eigsh(k) gives k eigenpairs from the factors' eigenbases, M.eigvalsh() all the "
            "eigenvalues, PMatDense.from_pmat(M).eigh() the whole decomposition of a small one")

    eigh.unsupported = True  # raises only: not listed among the representations that do

    def _eigsh(self, k, which):
        """``k`` eigenpairs from the layers' Kronecker-factored eigenbases, never a ``d × d``
        matrix. A layer block ``(Q_A ⊗ Q_G) diag(d) (Q_A ⊗ Q_G)ᵀ`` (``A ⊗ G`` with
        ``d = λ_G λ_Aᵀ``, the products ``g_i a_j`` of the factors' eigenvalues; an EKFAC's
        stored diagonal) has the eigenpairs ``(d_ij, V_ij = q_{G,i} q_{A,j}ᵀ)``: the ``(g,
        a[+1])`` layer matrix ``V_ij`` (``M V = Q_G (d ⊙ Q_Gᵀ V Q_A) Q_Aᵀ``) written into
        the layer's flat indices, ``kron(q_{G,i}, q_{A,j})`` in layer-matrix order (an
        embedding's diagonal ``A``: ``q_{A,j} = e_j``); an exact block's are its own
        ``eigh``'s. The ``k`` are chosen among all ``d`` eigenvalues
        (:func:`~jaxgeom.pmat._spectral.eigenpairs_of_pieces`). Cost: the factors'
        ``eigh`` (``Σ (a_l³ + g_l³)`` plus the exact blocks'; an EKFAC: none), then
        ``O(d log k)`` and ``k d`` to write the vectors."""
        nodes, pairs = self._eigen()
        parts = self._parts
        pieces = [(idx, node.d, functools.partial(_kron_eigenvectors, node))
                  for node, idx in zip(nodes, parts.matrices)]
        pieces += [(idx, e, lambda i, q=q: q[:, i].T)
                   for (e, q), idx in zip(pairs, parts.other_indices)]
        return _spectral.eigenpairs_of_pieces(pieces, k, which, self.size(0), self.dtype)

    def _solve(self, v, regul, method, damping: str = "exact", **options):
        _check_damping(damping)
        if method in ITERATIVE_SOLVES:
            if damping != "exact":
                raise ValueError(
                    f"{method} solves (M + regul·I) x = v (damping='exact'); "
                    f"damping={damping!r} damps each Kronecker factor and is solved in closed "
                    f"form: drop method={method!r}")
            return super()._solve(v, regul, method, **options)
        if damping in FACTORED_DAMPINGS:
            nodes = [n.factor_damped(regul, damping) for n in self._krons(damping)]
            blocks = [functools.partial(symmetric_solve, b + regul * _eye_like(b))
                      for b in self.blocks]  # Cholesky (LU if indefinite), not eigh
            solved = self._parts.apply(nodes, "solve", v, blocks)
            _report_failed_cholesky("solve", solved)
            return solved
        if collects_here():  # an eager call, nothing differentiated: its eigenvalues checked
            return self._exact_solve(v, regul, checked=True)
        # through the factors' eigenbases, differentiated as a linear solve: exact also
        # where a perturbation splits a factor's repeated eigenvalue (no eigenvector
        # derivative there; _spectral.eigh). The eigenbases are computed once, outside, for
        # the solve and its transpose (a host call in each would run twice; XLA merged its
        # own eigh's), their derivative stopped: the linear solve's is dM's alone
        eigen = jax.lax.stop_gradient(self._eigen())
        return self._differentiated_as_solve(
            v, regul, lambda b: self._exact_solve(b, regul, eigen=eigen))

    def _exact_solve(self, v, regul, checked: bool = False, eigen: tuple | None = None):
        """``(M + λI)⁻¹ v`` through the factors' eigenbases and the exact blocks' (``V ((Vᵀx)
        / (λ + regul))``; ``eigen``: :meth:`_eigen`'s, when computed already); ``checked``:
        a layer singular to working precision warns
        (:func:`~jaxgeom._reporting.warn_if_singular` of its eigenvalues ``+ regul``)."""
        eigen_nodes, pairs = self._eigen() if eigen is None else eigen
        if checked:
            warn_if_singular([jnp.ravel(e.d) + regul for e in eigen_nodes]
                             + [e + regul for e, _ in pairs], "solve")
        nodes = [e.map(lambda d: 1 / (d + regul)) for e in eigen_nodes]
        blocks = [lambda x, e=e, q=q: q @ ((q.T @ x) / (e + regul)) for e, q in pairs]
        return self._parts.apply(nodes, "mv", v, blocks)

    # ------------------------------------------------------------------ functions
    def inv(self, regul: Any = 0.0, *, damping: str = "exact") -> PMatKFAC:
        """``(M + λI)⁻¹`` (exact damping, ``damping="exact"``) or the inverse of the
        factor-damped blocks, ``(A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹`` (``damping="pi"``; π = 1
        with ``damping="pi_one"``). See :meth:`pow`."""
        return self.pow(-1, regul, damping=damping)

    def pow(self, p: Any, regul: Any = 0.0, *, damping: str = "exact") -> PMatKFAC:
        """``(M + λI)^p`` for any real ``p`` (PSD for non-integer ``p``), layer by layer:
        ``A^p ⊗ G^p`` when ``regul`` is 0, the eigenbasis form with exact damping, or
        the factor-damped blocks' powers ``(A + π√λ I)^p ⊗ (G + √λ/π I)^p`` with
        ``damping="pi"`` (π of Martens & Grosse) or ``"pi_one"`` (π = 1). Exact blocks of
        other layers: ``(B + λI)^p``.

        Cost: ``Σ (a_l³ + g_l³)`` (factor ``eigh``; Cholesky for a factor-damped ``p = -1``),
        plus ``o³`` per exact block.

        Raises:
          ValueError: for a ``damping`` not in :data:`DAMPINGS`, or a factored damping of
            a matrix held in its eigenbasis (an EKFAC, a KFAC after ``inv``/``pow``).
        """
        _check_damping(damping)
        if not (_spectral.is_integer(p) and p >= 0):
            self._check_symmetric(f"pow({p})")
        factored = damping in FACTORED_DAMPINGS
        if factored and _spectral.is_integer(p) and p == -1:
            return self._factor_damped_inverse(regul, damping)
        # each part's refusal of its eigenvalues names its layer
        ids = [spec.layer_id for spec in self.specs]
        blocks = _per_layer([layer.id for layer in self._parts.others], "block of ",
                            lambda b: PMatDense(_flat(b), b).pow(p, regul).data, self.blocks)
        if factored:
            nodes = _per_layer(ids, "", lambda n: n.factor_damped(regul, damping).power(p),
                               self._krons(damping))
        elif _is_static_zero(regul) and all(isinstance(n, Kron) for n in self.factors):
            nodes = _per_layer(ids, "", lambda n: n.power(p), self.factors)
        else:
            eigen, _ = self._eigen(blocks=False)
            power = functools.partial(_spectral.power, p=p, regul=regul)
            nodes = _per_layer(ids, "Kronecker block of ", lambda n: n.map(power),
                               eigen)  # first: exact zeros refused (a ValueError)
            # each layer's eigenvalues λ_G ⊗ λ_A checked whole (a row of d would miss G's)
            _spectral.warn_if_singular_power([jnp.ravel(n.d) + regul for n in eigen], p)
        return self._with(nodes, blocks)

    @compiled_when_eager
    def _factor_damped_inverse(self, regul: Any, damping: str) -> PMatKFAC:
        """``inv(regul, damping)`` for a factored ``damping`` (``"pi"``, ``"pi_one"``): the
        damped factors' inverses (:func:`inverses`: LAPACK's ``potri`` on the host for the
        large ones, all in one host call; else Cholesky factorisations) and the exact
        blocks' ``(B + λI)⁻¹``. One compiled call when eager
        (a new matrix of new arrays: no eigenbasis to keep the identity of), its
        factorisations side by side when faster (:meth:`_factorised_orders`): bench_small's
        eager ``inv`` took 7.1 ms dispatched operation by operation."""
        blocks = tuple(PMatDense(_flat(b), b).pow(-1, regul).data for b in self.blocks)
        nodes = inverses([n.factor_damped(regul, damping) for n in self._krons(damping)])
        _report_failed_cholesky("inv", nodes)
        return self._with(nodes, blocks)

    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatKFAC:
        """Pseudo-inverse through the eigenbasis form; the threshold is relative to the
        largest eigenvalue of the whole matrix."""
        nodes, pairs = self._eigen()
        values = [n.d.ravel() for n in nodes] + [e for e, _ in pairs]
        sizes = np.cumsum([v.size for v in values])[:-1]
        inverted = jnp.split(_spectral.pinv(jnp.concatenate(values), atol, rtol), sizes)
        k = len(nodes)
        new_nodes = tuple(n.map(lambda d, w=w: w.reshape(d.shape), keeps_zero=True)
                          for n, w in zip(nodes, inverted))
        blocks = tuple(_spectral.reconstruct(w, q) for w, (_, q) in zip(inverted[k:], pairs))
        return self._with(new_nodes, blocks)

    def _check_solvable(self, regul, method):
        """An undamped exact solve divides by the stored eigenvalues of the layers held in
        their eigenbasis (an EKFAC's; a KFAC's after ``inv``/``pow``): exact zeros (an
        EKFAC's off-range values) are refused, as ``pow(-1)`` refuses them."""
        if method in ITERATIVE_SOLVES or not _spectral.is_concrete_zero(regul):
            return
        values = [n.d.ravel() for n in self.factors if isinstance(n, KronEigen)]
        if values:
            _spectral.check_solvable(jnp.concatenate(values))

    def _check_symmetric(self, operation: str) -> None:
        """Refuse ``operation`` before any of its work (``pow`` takes the exact blocks'
        powers first) when a layer's block is not known to be symmetric
        (:meth:`Kron._check_symmetric`: a product of two KFACs), its exact blocks being
        then products too."""
        for node in self.factors:
            if isinstance(node, Kron):
                node._check_symmetric(operation)

    def _krons(self, damping: str) -> tuple[Kron, ...]:
        """The layers' :class:`Kron` nodes, for a factored ``damping``; a ``ValueError``
        when the matrix holds eigenbases instead."""
        if not all(isinstance(n, Kron) for n in self.factors):
            raise ValueError(
                f"damping={damping!r} damps each of the Kronecker factors (A, G); this "
                f"{type(self).__name__} holds eigenbases with a refitted diagonal (an EKFAC, "
                "or a KFAC taken to a power), where the factors (and π) have no meaning. Use "
                "damping='exact' (the default: M + regul·I), or build a PMatKFAC for "
                "factored damping")
        return self.factors

    # ------------------------------------------------------------------ algebra
    def mm(self, other: PMatAbstract) -> PMatAbstract:
        """Factor-wise product with a ``PMatKFAC`` of the same layers: the same
        representation where the layers' factors multiply (two ``Kron``, or two
        eigen-forms on the same bases), else the exact layer blocks' products, a
        ``PMatBlockDiag`` (as for ``+``: layers of at most :data:`DENSE_BLOCK_LIMIT`
        parameters); dense with any other representation."""
        self._check_compatible(other)
        if isinstance(other, PMatKFAC):
            if other.specs == self.specs:
                nodes = tuple(a.mm(b) for a, b in zip(self.factors, other.factors))
                if all(n is not None for n in nodes):
                    blocks = tuple(a @ b for a, b in zip(self.blocks, other.blocks))
                    return self._with(nodes, blocks)
            self._check_exact_blocks(
                "product", "apply them to vectors in turn (F1.mv(F2.mv(v))) or ask for the "
                "blocks explicitly: F1.to_blockdiag() @ F2.to_blockdiag().")
            return self.to_blockdiag().mm(other.to_blockdiag())
        return super().mm(other)

    def _scale(self, s):
        return self._with(tuple(n.scale(s) for n in self.factors),
                          tuple(b * s for b in self.blocks))

    def _add_same(self, other, sign):
        """Layer by layer: one Kronecker product when the two share a factor (``F + F``,
        ``F - 0.5 F``; EKFACs on the same eigenbases), the same representation; otherwise
        (a sum of Kronecker products is not one) the exact layer blocks, a
        ``PMatBlockDiag``, for layers of at most :data:`DENSE_BLOCK_LIMIT` parameters."""
        if other.specs == self.specs:
            nodes = tuple(a.add(b, sign) for a, b in zip(self.factors, other.factors))
            if all(n is not None for n in nodes):
                return self._with(nodes, tuple(a + sign * b
                                               for a, b in zip(self.blocks, other.blocks)))
        self._check_exact_blocks(
            "sum", "average the factors instead (jax.tree_util.tree_map(lambda a, b: "
            "(a + b) / 2, F1, F2), kfac-jax's moving average: an approximation), or ask for "
            "the blocks explicitly: F1.to_blockdiag() + F2.to_blockdiag().")
        return self.to_blockdiag()._add_same(other.to_blockdiag(), sign)

    def _check_exact_blocks(self, what: str, instead: str) -> None:
        """Refuse to form the exact layer blocks of a ``what`` of two of these matrices
        that is not Kronecker-factored when a layer has more than
        :data:`DENSE_BLOCK_LIMIT` parameters, saying what to do ``instead``."""
        layout = self.layer_collection
        for layer in layout.layers:
            size = layout.layer_numel(layer)
            if size > DENSE_BLOCK_LIMIT:
                raise ValueError(
                    f"the {what} of two {type(self).__name__}s on different factors is not "
                    f"Kronecker-factored: its exact block for layer {layer.id!r} would have "
                    f"{size}² entries ({size**2 * np.dtype(self.dtype).itemsize / 2**30:.3g} "
                    f"GiB; the limit is {DENSE_BLOCK_LIMIT} parameters). Instead, {instead}"
                )

    def to_blockdiag(self) -> PMatBlockDiag:
        """The same matrix as a ``PMatBlockDiag`` (each layer block formed, ``Σ d_l²``)."""
        return PMatBlockDiag(self.layer_collection,
                             tuple(self.get_block(layer) for layer in self.layer_collection))

    def _with(self, factors, blocks):
        return type(self)(self.layer_collection, self.specs, tuple(factors), tuple(blocks))

    def _restricted(self, r: Restriction) -> PMatKFAC:
        """The factors (or eigenbases and diagonals) of the Kronecker layers of ``S`` and
        the exact blocks of its other layers, as they are (``O(1)``, no array copied):
        ``M`` is block-diagonal over layers, so its principal sub-matrix on whole layers
        is theirs."""
        kept, specs = restricted_specs(self.specs, r)
        ids = {layer.id for layer in r.layer_collection}
        blocks = tuple(b for layer, b in zip(self._parts.others, self.blocks) if layer.id in ids)
        return type(self)(r.layer_collection, specs, tuple(self.factors[i] for i in kept),
                          blocks)

    def without_rank_bounds(self) -> PMatKFAC:
        """The same matrix without its build's static rank bounds (hints to the factors'
        eigendecompositions, :attr:`Kron.rank_bounds`) and ranges (an EKFAC's products on
        the range columns, :attr:`KronEigen.ranges`: its products then rotate by the whole
        bases, as a refit's on new data do). Both depend on the number of examples."""
        nodes = tuple(n.with_values(n.d) if isinstance(n, KronEigen) else
                      dataclasses.replace(n, rank_bounds=(None, None), bounds_checked=False)
                      for n in self.factors)
        return self._with(nodes, self.blocks)

    # ------------------------------------------------------------------ construction
    @classmethod
    def accumulator(cls, layer_collection: LayerCollection, **options):
        raise TypeError(
            f"{cls.__name__} is not reduced from per-example Jacobians: it is built from "
            f"captured layer inputs and output gradients by {cls.__name__}.from_jacobians "
            "(used by FIM, FIM_MonteCarlo and SecondMoment)"
        )

    accumulator.unsupported = True

    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *, mode="auto",
                      kfac_approx="expand", separate_weight_and_bias=False,
                      max_dense_block=DENSE_BLOCK_LIMIT) -> KFACBuilder:
        """Built in one streaming pass over the captures (:class:`KFACBuilder`). ``mode``
        is accepted for a uniform signature; the capture always uses one ``vjp`` per
        example and output."""
        del mode
        if kfac_approx not in APPROXIMATIONS:
            raise ValueError(f"kfac_approx must be one of {APPROXIMATIONS}; got {kfac_approx!r}")
        if not isinstance(separate_weight_and_bias, bool):
            raise TypeError("separate_weight_and_bias must be True or False; got "
                            f"{separate_weight_and_bias!r}")
        check = functools.partial(check_blocks, layout=layout, limit=max_dense_block,
                                  representation=cls.__name__)
        return KFACBuilder(capture_plan(fn, params, example, aux, layout, check), layout,
                           approx=kfac_approx, separate=separate_weight_and_bias)


# ----------------------------------------------------------------------------- building
def capture_plan(fn, params, example, aux, layout: LayerCollection, check=None) -> CapturePlan:
    """The capture plan (:func:`jaxgeom.capture.make_plan`) for ``example``'s shapes, after
    ``check(plan)``: what every capture-based chunk builder starts from."""
    plan = make_plan(fn, params, example, aux, layout)
    if check is not None:
        check(plan)
    return plan


@builder
class CaptureBuilder(ChunkBuilder):
    """A chunk builder (:mod:`jaxgeom.streaming`) from the captured layer inputs and output
    gradients of each chunk (:func:`jaxgeom.capture.capture_chunk` with ``plan``): the
    subclasses give the chunk's statistics (sums over its examples) and the representation
    made from their means. Shared by KFAC, EKFAC, Diag and QuasiDiag."""

    plan: CapturePlan = static_field()
    layout: LayerCollection = static_field()

    fixed_example_shapes: ClassVar[bool] = True


@builder
class KFACBuilder(CaptureBuilder):
    """``(Σ aaᵀ/T, Σ ggᵀ)`` per Kronecker layer and ``Σ JᵀJ`` per other layer, per chunk
    (:func:`_chunk_terms`, added in place by :meth:`update`); their means are the factors
    and blocks of a ``PMatKFAC``."""

    approx: str = static_field(default="expand")
    #: ``separate_weight_and_bias``: the bias's cross terms in ``A`` set to zero at the end
    separate: bool = static_field(default=False)

    finalizes_traced: ClassVar[bool] = True

    def statistics(self, params, batch, mask, offset, aux):
        (terms, blocks), cap = self._terms(params, batch, mask, offset, aux)
        factors = tuple((a * s if a.ndim == 1 else gram(a) * s, gram(g)) for a, s, g in terms)
        return (factors, blocks), _all_finite(cap, factors, blocks)

    def update(self, total, params, batch, mask, offset, aux):
        """The factors' Grams added into the running total (:func:`factor_sum`: in place,
        by row blocks, for a large factor of few rows)."""
        (terms, blocks), cap = self._terms(params, batch, mask, offset, aux)
        factors = tuple((factor_sum(ta, a, s), factor_sum(tg, g))
                        for (ta, tg), (a, s, g) in zip(total[0], terms))
        blocks = tuple(t + b for t, b in zip(total[1], blocks))
        return (factors, blocks), _all_finite(cap, factors, blocks)

    def _terms(self, params, batch, mask, offset, aux):
        return _chunk_terms(params, batch, mask, offset, aux, plan=self.plan,
                            approx=self.approx, layout=self.layout)

    def finalize(self, total, stream) -> PMatKFAC:
        """The mean factors, with :func:`factor_rank_bounds` as hints
        (:attr:`Kron.bounds_checked`): the eigendecompositions of a wide layer's factors
        seen on few examples (exact-damped ``solve``/``inv``/``pow``, ``eigvalsh``) go
        through their ranges, checked."""
        factors, blocks = mean(total, stream.n)
        if self.separate:
            factors = tuple((separated_input_factor(spec, a), g)
                            for spec, (a, g) in zip(self.plan.specs, factors))
        bounds = factor_rank_bounds(self.plan, self.approx, _whole_chunks(stream),
                                    separate=self.separate)
        return PMatKFAC(self.layout, self.plan.specs, tuple(
            Kron(a, g, rank_bounds=b, bounds_checked=True)
            for (a, g), b in zip(factors, bounds)), blocks)


def separated_input_factor(spec: KroneckerSpec, a: jax.Array) -> jax.Array:
    """``A`` without its weight–bias cross terms (``A[:-1, -1] = A[-1, :-1] = 0``): the layer
    block ``A ⊗ G`` becomes ``A_w ⊗ G`` on the kernel beside ``A_bb G`` on the bias, with
    nothing between them (curvlinops' ``separate_weight_and_bias=True``; ``A_bb`` is 1 with
    ``"expand"`` and ``"reduce"``: the bias block is ``G``). A layer without a bias, or an
    embedding's diagonal ``A``, is unchanged."""
    if spec.bias is None or a.ndim == 1:
        return a
    return a.at[:-1, -1].set(0).at[-1, :-1].set(0)


def _whole_chunks(stream) -> int:
    """The number of examples rounded up to whole chunks: still a bound on the factors'
    rows (padding rows are zero), and the same for data a short last chunk apart (the
    same static bounds: no new compilation)."""
    chunk = stream.batch_size
    if chunk is None:
        return stream.n
    if not isinstance(stream.n, int):  # one chunk's traced count: one whole chunk
        return chunk
    return -(-stream.n // chunk) * chunk


def factor_rank_bounds(plan: CapturePlan, approx: str, n: int, *,
                       separate: bool = False) -> list[tuple]:
    """Per Kronecker layer, :attr:`Kron.rank_bounds` of the factors summed over ``n``
    examples (where they make :meth:`Kron.eigen` cheaper): ``A`` is a Gram of ``n T`` rows
    (``n`` with ``approx="reduce"``), ``G`` of ``n K T`` (``n K``), for ``T`` positions and
    ``K`` outputs per example; an embedding's diagonal ``A`` has none. With ``separate``
    (:func:`separated_input_factor`) a biased layer's ``A`` is the kernel's Gram beside the
    bias's ``1 × 1``: one more rank."""
    outputs = plan.jaxpr.out_avals[0].shape[0]
    bounds = []
    for spec, t in zip(plan.specs, layer_positions(plan)):
        positions = 1 if approx == "reduce" else t
        inputs = spec.in_features + (spec.bias is not None)
        rows = n * positions + (separate and spec.bias is not None)
        a = None if spec.kind == "embedding" else _spectral.useful_rank_bound(inputs, rows)
        bounds.append((a, _spectral.useful_rank_bound(spec.out_features,
                                                      n * outputs * positions)))
    return bounds


def layer_positions(plan: CapturePlan) -> list[int]:
    """Per Kronecker layer, the number ``T`` of positions its kernel is applied at (a
    sequence's tokens, a convolution's output pixels; 1 for a dense layer on vectors)."""
    return [math.prod(out_shape) // spec.out_features
            for spec, out_shape in zip(plan.specs, plan.out_shapes)]


def augmented_inputs(spec: KroneckerSpec, a: jax.Array, dtype) -> jax.Array:
    """A layer's captured inputs as ``(n, T, a_l [+1])`` rows of its layer matrix: the
    constant-1 bias column appended, an embedding's row ids made one-hot."""
    if spec.kind == "embedding":
        return jax.nn.one_hot(a, spec.in_features, dtype=dtype)
    a = a.astype(dtype)
    if spec.bias is None:
        return a
    return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), dtype)], axis=-1)


def squared_gradient_sum(a: jax.Array, g: jax.Array,
                         inputs_of: Callable[[jax.Array], jax.Array] | None = None,
                         weights: jax.Array | None = None) -> Any:
    """``Σₙₖ 𝒢ₙₖ²`` (elementwise square, ``(g_l, a_l)``) of the per-example gradients
    ``𝒢ₙₖ = Σ_t gₙₖₜ aₙₜᵀ``, from inputs ``(n, T, a_l)`` and output gradients
    ``(n, K, T, g_l)`` — in any basis.

    With ``inputs_of``, ``a`` holds per-example *sources* ``(n, ...)`` and
    ``inputs_of(a[i])`` is example ``i``'s ``(T, a_l)`` inputs (:attr:`Captured.sources`):
    formed inside the loop over examples, in cache (a convolution's patches), never for the
    whole chunk. With ``weights`` ``(n, K, g_l)``, also ``Σₙₖ 𝒢ₙₖ ⊙ wₙₖ`` (``w`` broadcast
    along the inputs; returned second).

    ``T = 1``: the contraction ``(g²)ᵀ(a²)``, cost ``n K g_l + n g_l a_l``, no per-example
    gradient formed; ``T > 1``: the per-example gradients, one example at a time, or a few
    when ``K`` is small (:data:`BLOCK_ROWS`; ``max(K, BLOCK_ROWS) g_l a_l`` memory,
    ``n K T g_l a_l`` time: a chunk's ``(n, K, g_l, a_l)`` would be formed and reduced
    several times slower on CPU, 300 against 25 ms for a 128-channel 3×3 convolution at 8×8,
    16 examples, K = 9).
    """
    if g.shape[2] == 1:
        a = a if inputs_of is None else jax.vmap(inputs_of)(a)
        squares = jnp.einsum("ng,na->ga", jnp.sum(g[:, :, 0] ** 2, axis=1), a[:, 0] ** 2)
        if weights is None:
            return squares
        return squares, jnp.einsum("nkg,nkg,na->ga", g[:, :, 0], weights, a[:, 0])
    inputs_of = inputs_of or (lambda x: x)
    n, k = g.shape[:2]
    block = max(b for b in range(1, n + 1) if n % b == 0 and b * k <= max(k, BLOCK_ROWS))

    def gradients(step):  # the step's per-example, per-output gradients (rows, g_l, a_l)
        if block == 1:
            return jnp.einsum("ktg,ta->kga", step[1], inputs_of(step[0]))
        grad = jnp.einsum("bktg,bta->bkga", step[1], jax.vmap(inputs_of)(step[0]))
        return grad.reshape((block * k,) + grad.shape[2:])

    def add_step(totals, step):
        grad = gradients(step)
        terms = (_sum_leading(grad**2),)
        if weights is not None:
            terms += (_sum_leading(grad * step[2].reshape(-1, step[2].shape[-1])[:, :, None]),)
        return tuple(t + x for t, x in zip(totals, terms)), None

    inputs = jax.eval_shape(inputs_of, jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
    # the inputs' dtype, not the sources': a float64 source (data) cast to float32 parameters
    zero = jnp.zeros((g.shape[-1], inputs.shape[-1]), jnp.result_type(inputs.dtype, g.dtype))
    steps = (a, g) if weights is None else (a, g, weights)
    if block > 1:
        steps = jax.tree_util.tree_map(lambda x: x.reshape((n // block, block) + x.shape[1:]),
                                       steps)
    totals = jax.lax.scan(add_step, (zero,) * (1 + (weights is not None)), steps)[0]
    return totals[0] if weights is None else totals


#: :func:`squared_gradient_sum` forms the gradients of several examples at once, up to
#: this many (example, output) rows, where an example has fewer outputs: XLA:CPU threads the
#: batched product over them (bench_resnet Diag Monte Carlo, K = 1: 228–239 → 203–216 ms
#: with 4). With more outputs it takes one example at a time (a block of one example was
#: 7–12% slower batched than as the plain product)
BLOCK_ROWS = 4


#: up to this many terms, :func:`_sum_leading` adds the slices (one fused pass).
UNROLLED_SUM = 16


def _sum_leading(x: jax.Array) -> jax.Array:
    """``Σᵢ x[i]``. XLA:CPU reduces a short leading axis of a large array slowly (``(16,
    1152, 1152)``: 250 ms against 5 ms for the sum of the 16 slices, fused in one pass)."""
    if x.shape[0] > UNROLLED_SUM:
        return jnp.sum(x, axis=0)
    return functools.reduce(operator.add, [x[i] for i in range(x.shape[0])])


def squared_layer_gradients(spec: KroneckerSpec, source: jax.Array,
                            inputs_of: Callable[[jax.Array], jax.Array], g: jax.Array,
                            dtype, with_cross: bool = False) -> Any:
    """:func:`squared_gradient_sum` of a layer's augmented inputs (``(g_l, a_l [+1])``),
    from its captured ``source`` and ``inputs_of`` (:attr:`Captured.sources`).

    With ``T > 1`` positions the inputs are formed one example at a time from their
    source (a convolution's patches, in cache), and the bias column ``Σₙₖ (Σ_t gₙₖₜ)²`` is
    summed apart rather than through a copy of the inputs with a column of ones.
    ``with_cross`` (a dense or conv layer): also the kernel's ``Σₙₖ 𝒢ₙₖ ⊙ Σ_t gₙₖₜ``
    ``(g_l, a_l)`` from the same per-example gradients (returned second).
    """
    if g.shape[2] == 1 or spec.kind == "embedding":
        a = jax.vmap(inputs_of)(source)
        squares = squared_gradient_sum(augmented_inputs(spec, a, dtype), g)
        if not with_cross:
            return squares
        if g.shape[2] == 1:  # Σₙ (Σₖ gₙₖ²) aₙᵀ: the K outputs summed before the product
            # (XLA:CPU transposed the (n, K, g) gradients to reduce over K inside it)
            return squares, jnp.einsum("ng,na->ga", jnp.sum(g[:, :, 0] ** 2, axis=1),
                                       a[:, 0].astype(dtype))
        return squares, jnp.einsum("nktg,nkg,nta->ga", g, g.sum(axis=2), a.astype(dtype))
    sums = jnp.sum(g, axis=2)
    kernel = squared_gradient_sum(source, g, lambda s: inputs_of(s).astype(dtype),
                                  sums if with_cross else None)
    kernel, cross = kernel if with_cross else (kernel, None)
    if spec.bias is not None:
        kernel = jnp.concatenate([kernel, jnp.sum(sums**2, axis=(0, 1))[:, None]], axis=1)
    return (kernel, cross) if with_cross else kernel


def squared_gradients(cap: Captured, plan: CapturePlan, layout: LayerCollection,
                      cross: Callable[[KroneckerSpec], bool] | None = None) -> Any:
    """``Σₙₖ (∂zₙₖ/∂θ)²`` for one chunk captured with its mask — the diagonal of the
    chunk's ``Σ JᵀJ`` — layer by layer: a ``(g_l, a_l [+1])`` layer matrix per Kronecker layer
    (:func:`squared_gradient_sum`, no per-example gradient when ``T = 1``) and a vector per
    other layer (exact per-example gradients). :func:`flat_diagonal` puts them in the flat
    order; summing chunks in this form and ordering once saves a ``d``-sized gather per chunk.

    With ``cross`` (a predicate on the specs), also, for each layer it selects, the
    ``(g_l, a_l)`` cross sums of :func:`squared_layer_gradients`: returns
    ``((squares, others), crosses)``.
    """
    dtype = layout.dtype
    squares, crosses = [], []
    for i, (spec, source, g) in enumerate(zip(plan.specs, cap.sources,
                                              layer_grads(cap, dtype))):
        wanted = cross is not None and cross(spec)
        out = squared_layer_gradients(spec, source, plan.inputs_from(i), g, dtype, wanted)
        squares.append(out[0] if wanted else out)
        crosses += [out[1]] if wanted else []
    others = [jnp.sum(grads**2, axis=0) for grads in other_gradients(cap, plan, layout)]
    return (squares, others) if cross is None else ((squares, others), crosses)


@quick_jit(static_argnums=(0, 1))
def flat_diagonal(plan: CapturePlan, layout: LayerCollection, squares, n: Any) -> jax.Array:
    """The flat-order diagonal from the layer form of :func:`squared_gradients`, divided by
    ``n`` (a build's sums: their mean), in one compiled call (eagerly, its slices and
    transposes dispatch one by one; the division is fused into the merge's writes)."""
    return kronecker_layout(layout, plan.specs).merge(*squares) / n


def layer_grads(cap: Captured, dtype) -> tuple[jax.Array, ...]:
    """Each captured layer's output gradients ``(n, K, T, g_l)`` in ``dtype`` (zero for
    padding: the chunk is captured with its mask)."""
    return tuple(g.astype(dtype) for g in cap.grads)


def other_gradients(cap: Captured, plan: CapturePlan,
                    layout: LayerCollection) -> list[jax.Array]:
    """Per non-Kronecker layer, its exact per-example gradients ``(n·K, d_l)`` (ascending
    flat order; zero for padding: the chunk is captured with its mask)."""
    other = cap.other.astype(layout.dtype)
    return [other[..., idx].reshape(-1, len(idx)) for idx in _other_columns(plan, layout)]


def _check_damping(damping: Any) -> None:
    """Refuse a ``damping`` not in :data:`DAMPINGS` (NNGeometry's ``use_pi`` flag is not
    one: ``use_pi=True`` is ``damping="pi"``, ``use_pi=False``'s formula ``"pi_one"``)."""
    if not isinstance(damping, str) or damping not in DAMPINGS:
        hint = (" (NNGeometry's use_pi=True is damping='pi'; use_pi=False's formula is "
                "damping='pi_one', on factors that NNGeometry scales otherwise)"
                if isinstance(damping, bool) else "")
        raise ValueError(
            f"damping must be one of {DAMPINGS}: 'exact' (M + λI), 'pi' ((A + π√λI) ⊗ "
            f"(G + √λ/π I)), 'pi_one' ((A + √λI) ⊗ (G + √λI)); got {damping!r}{hint}")


def _is_static_zero(x) -> bool:
    return isinstance(x, (int, float)) and x == 0


def _flat(block) -> LayerCollection:
    return LayerCollection.from_params(jax.ShapeDtypeStruct((block.shape[0],), block.dtype))


def check_factorable(plan: CapturePlan, layout: LayerCollection, representation: str,
                     needs=None) -> None:
    """Refuse the dense/conv/embedding layers whose block is not of the form ``A ⊗ G``.

    ``plan.unfactored`` lists them (a kernel consumed by several operations, a grouped
    convolution, ...; :attr:`jaxgeom.layers.Layer.kronecker_obstacle`). A Kronecker
    representation would silently give such a layer another structure, so this raises a
    ``ValueError`` naming the layer, its leaves and the operations, and the fix: give that
    layer another representation with ``PMatMixed``. ``needs(layer)`` restricts the check
    to the layers whose structure the representation uses (default: all of them).
    """
    for layer_id, reason in plan.unfactored:
        layer = layout.layer(layer_id)
        if needs is not None and not needs(layer):
            continue
        leaves = ", ".join(layout.paths[i] for i in layer.leaves)
        raise ValueError(
            f"{representation} cannot represent layer {layer_id!r} ({leaves}; kind "
            f"{layer.kind!r}): {reason}, so its per-example kernel gradient is not one sum of "
            "outer products Σ_t g_t a_tᵀ and its block has no Kronecker structure. Give this "
            "layer another representation with PMatMixed, e.g. "
            f"FIM(..., PMatMixed, mapping={{{layer_id!r}: PMatBlockDiag}}, "
            f"default={representation}) (or PMatDiag for a large layer)."
        )


def check_blocks(plan: CapturePlan, layout: LayerCollection, limit: float,
                 representation: str) -> None:
    """:func:`check_factorable`, then refuse an exact dense block (a norm, an other leaf)
    of more than ``limit`` parameters."""
    check_factorable(plan, layout, representation)
    ids = {s.layer_id for s in plan.specs}
    for layer in layout.layers:
        size = layout.layer_numel(layer)
        if layer.id not in ids and size > limit:
            raise ValueError(
                f"layer {layer.id!r} ({', '.join(layout.paths[i] for i in layer.leaves)}; "
                f"of kind {layer.kind!r}) is not Kronecker-factored, and its exact dense block "
                f"would have {size}² entries (max_dense_block={limit}). Use PMatMixed with "
                "another representation for it (e.g. PMatDiag), or raise max_dense_block."
            )


@functools.partial(jax.jit, static_argnames=("plan", "approx", "layout"))
def _chunk_terms(params, batch, mask, offset, aux, *, plan, approx, layout):
    """What one masked chunk adds to the factors, per Kronecker layer ``(a, 1/T, g)``: the
    rows whose Grams are ``Σ aaᵀ`` and ``Σ ggᵀ`` (:func:`factor_sum`; an embedding's ``a``:
    its diagonal ``Σ aaᵀ``, row counts), and ``Σ JᵀJ`` per other layer; and the capture
    (for :func:`_all_finite`)."""
    cap: Captured = capture_chunk(plan, params, batch, offset, aux, mask)
    dtype = layout.dtype
    mask = mask.astype(dtype)
    terms = []
    for spec, a, g in zip(plan.specs, cap.inputs, layer_grads(cap, dtype)):
        t = g.shape[2]
        if spec.kind == "embedding":
            ids = jnp.where(a >= 0, a, spec.in_features)
            weights = jnp.broadcast_to(mask[:, None], ids.shape)
            a = jnp.zeros(spec.in_features, dtype).at[ids].add(weights, mode="drop")
        else:
            a = augmented_inputs(spec, a, dtype) * mask[:, None, None]
            if approx == "reduce":
                a, g, t = a.mean(axis=1, keepdims=True), g.sum(axis=2, keepdims=True), 1
            a = a.reshape(-1, a.shape[-1])
        terms.append((a, 1 / t, g.reshape(-1, g.shape[-1])))
    blocks = tuple(gram(b) for b in other_gradients(cap, plan, layout))
    return (tuple(terms), blocks), cap


def _all_finite(cap: Captured, factors: tuple, blocks: tuple) -> jax.Array:
    """Whether a chunk's capture was finite, read from the diagonals of the Grams it was
    summed into (``Σ x²`` of each captured column: :func:`~jaxgeom.capture.all_finite`),
    a chunk's own or a running total's (finite before it, else already flagged): no pass
    over the captured rows of its own (≈ 6% of bench_small's KFAC build)."""
    diagonals = [f if f.ndim == 1 else jnp.diagonal(f) for pair in factors for f in pair]
    return all_finite(cap, diagonals + [b.diagonal() for b in blocks])


def factor_sum(total: jax.Array, rows: jax.Array, scale: Any = 1) -> jax.Array:
    """``total + scale · Σ xxᵀ`` over the ``rows`` of a :func:`_chunk_terms` term (a
    vector: a diagonal factor, added as it is)."""
    if rows.ndim == 1:
        return total + rows * scale
    return accumulate_gram(total, rows, scale)


def _other_columns(plan: CapturePlan, layout: LayerCollection) -> list[np.ndarray]:
    """For each non-Kronecker layer, its columns in the captured ``other`` gradients."""
    starts, pos = {}, 0
    for leaf in plan.other_leaves:
        starts[leaf] = pos
        pos += layout.sizes[leaf]
    ids = {s.layer_id for s in plan.specs}
    return [
        np.concatenate([starts[i] + np.arange(layout.sizes[i]) for i in layer.leaves])
        for layer in layout.layers if layer.id not in ids
    ]
