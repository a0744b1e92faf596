"""``PMatQuasiDiag``: the diagonal plus each neuron's weight–bias interactions (Ollivier 2015).

For a dense or convolution layer with a bias, the parameters of output neuron ``o`` are its
weights ``w_o = W[o, :]`` (``a_l`` of them, a row of the layer matrix) and its bias
``b_o``. The quasi-diagonal matrix keeps, per neuron, the *arrow-shaped* block

.. math::  M_o = \\begin{pmatrix} \\mathrm{diag}(D_o) + \\rho_o c_o c_o^\\top & c_o \\\\
   c_o^\\top & \\beta_o \\end{pmatrix},
   \\quad D_{oi} = E[\\partial_{w_{oi}}^2], \\ \\beta_o = E[\\partial_{b_o}^2],
   \\ c_{oi} = E[\\partial_{w_{oi}} \\partial_{b_o}],

with ``ρ_o = 0`` for the matrix built from data (the quasi-diagonal of Ollivier 2015), and
the diagonal alone for every other parameter (layers without bias, embeddings, norms,
other leaves). A layer with a bias whose kernel gradient is not one ``Σ_t g_t a_tᵀ`` (a
kernel consumed by several operations, a grouped convolution:
:attr:`jaxgeom.layers.Layer.kronecker_obstacle`) raises a ``ValueError`` suggesting
``PMatMixed``; without a bias its quasi-diagonal is its diagonal, computed exactly.
``E[·]`` is ``(1/N) Σₙₖ`` over examples and outputs, as for every matrix.

Not positive semi-definite in general: ``M_o`` (``ρ_o = 0``) is PSD only where its Schur
complement ``β_o − c_oᵀ D_o⁻¹ c_o`` is ``≥ 0``, and ``c_oᵀD_o⁻¹c_o = Σᵢ E[g²aᵢ]²/E[g²aᵢ²]``
may reach ``a_l β_o`` (Cauchy–Schwarz bounds each term by ``β_o``): with few examples the
matrix has negative eigenvalues, ``logdet`` of ``M + λI`` below them is NaN and an
iterative solve needs ``"minres"`` (docs/representations.md).

The family with a per-neuron ``ρ_o`` is closed under (damped) inversion, which is why it is
stored: with ``P = diag(D) + ρ ccᵀ``, ``κ = cᵀD⁻¹c``, ``q = 1 + ρκ`` and the Schur
complement ``s = β − cᵀP⁻¹c = β − κ/q``,

.. math::  M_o^{-1} = \\begin{pmatrix} \\mathrm{diag}(D^{-1}) + \\rho' c' c'^\\top & c' \\\\
   c'^\\top & 1/s \\end{pmatrix}, \\quad c' = -\\frac{D^{-1}c}{q s},
   \\quad \\rho' = s - \\rho\\, q\\, s^2

(Sherman–Morrison for ``P⁻¹c = D⁻¹c/q``, then the block inverse). So an arrow block
(``ρ = 0``) inverts to ``ρ' = s``: *not* an arrow — the weight–weight part of the inverse
is diagonal plus rank one — but in the same family; inverting again gives ``ρ'' = 0``.
Damping adds ``λ`` to ``D`` and ``β``.

Build (``FIM``, ``FIM_MonteCarlo``, ``SecondMoment`` with ``PMatQuasiDiag``): one streaming
pass over the captured layer inputs ``a`` and output gradients ``g``
(:mod:`jaxgeom.capture`): with ``ĝ = Σ_t gₜ``, ``c = Σₙₖₜ (gₜ ⊙ ĝ) aₜᵀ`` (``N K T_l d_l``,
no per-example gradient), ``D``/``β`` as for ``PMatDiag`` (``(g²)ᵀ(a²)`` when ``T_l = 1``,
else one chunk's per-example gradients); other layers' diagonals from their exact
per-example gradients. Storage ``≈ 2d``.

Operations: ``mv``/``vTMv``/``get_diag``/``trace``/Frobenius ``d``; ``solve`` (closed-form
per-neuron Schur complement, with ``regul``) and ``inv`` ``d``;
``eigvalsh``/``norm(±2)``/``logdet`` ``s Σ_l g_l (a_l + 1) a_l`` (per-neuron
bisection on an inertia count, :mod:`~jaxgeom.pmat._arrow`; memory ``O(d)``, no block
formed); ``eigsh(k, which)`` the same bisection, ``O(d log k)`` to choose, an ``eigh`` of
the chosen eigenvalues' neuron blocks alone (``Σ_l min(k, g_l) (a_l + 1)³``) and ``k d``
for the vectors (each in its neuron's flat indices; never ``d × d``); ``to_dense`` ``d²``;
scalar ``*``; ``M1 ± M2`` is a ``PMatQuasiDiag`` when neither was inverted (``ρ = 0``), a
``PMatDense`` otherwise (a sum of two ``ρ`` terms is rank two); with another
representation, a ``PMatDense``. ``pow``/``pinv`` are not offered (a general power leaves
the family): use ``PMatDense.from_pmat(M)``, or ``inv`` for ``p = -1``.

Reference: Y. Ollivier, "Riemannian metrics for neural networks I: feedforward
networks", Information and Inference 4(2), 2015 (the quasi-diagonal metric);
NNGeometry's ``PMatQuasiDiag``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._compile import quick_jit
from jaxgeom._dispatch import compiled_when_eager
from jaxgeom._reporting import warn_if_singular
from jaxgeom._sorting import sort
from jaxgeom.capture import Captured, KroneckerSpec, capture_chunk, check_specs
from jaxgeom.layers import LayerCollection
from jaxgeom.pmat import _arrow, _spectral
from jaxgeom.pmat.base import (
    ITERATIVE_SOLVE_METHODS,
    PMatAbstract,
    check_shape,
    representation,
    static_field,
    take,
)
from jaxgeom.pmat.dense import PMatDense
from jaxgeom.pmat.kfac import (
    CaptureBuilder,
    all_finite,
    capture_plan,
    check_factorable,
    flat_diagonal,
    kronecker_layout,
    restricted_specs,
    squared_gradients,
)
from jaxgeom.streaming import builder, mean


@representation
class PMatQuasiDiag(PMatAbstract):
    """The quasi-diagonal matrix (module docstring: definition, inverse, costs).

    Attributes:
      layer_collection: the parameter layout (static).
      specs: the layers with per-neuron blocks: dense/conv layers with a bias (static).
      diag: the ``(d,)`` diagonal ``D``/``β`` part in the flat order (without the
        ``ρ c²`` term).
      cross: per layer of ``specs``, the weight–bias terms ``c`` as the layer matrix in
        the kernel's memory orientation: ``(a_l, g_l)`` for a kernel stored input-major
        (Flax's ``(in, out)``, ``HWIO``), else ``(g_l, a_l)`` (products then need no
        transposes). :meth:`cross_matrix` gives the ``(g_l, a_l)`` form.
      rho: per layer of ``specs``, ``None`` (arrow blocks, as built) or the ``(g_l,)``
        coefficients ``ρ`` of an inverse.

    Example:
      >>> F = FIM(model.apply, params, (x, y), PMatQuasiDiag)
      >>> step = F.solve(grads, regul=1e-3)   # per-neuron Schur complements, O(d)
    """

    layer_collection: LayerCollection = static_field()
    specs: tuple[KroneckerSpec, ...] = static_field(default=())
    diag: jax.Array = dataclasses.field(default=None)
    cross: tuple[jax.Array, ...] = ()
    rho: tuple[jax.Array | None, ...] = ()

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("default", *ITERATIVE_SOLVE_METHODS)

    def __post_init__(self):
        check_specs(self)

    def check_shapes(self) -> None:
        """Refuse a diagonal or weight–bias terms of another model's shapes (a state
        restored into a target of another model). Run by Flax's ``from_bytes``."""
        name = type(self).__name__
        d = self.layer_collection.numel()
        check_shape(f"{name} diag", getattr(self.diag, "shape", None), f"({d},)",
                    lambda s: s == (d,), 1)
        if len(self.cross) != len(self.specs):
            raise ValueError(f"{name} has {len(self.specs)} per-neuron layers; got "
                             f"{len(self.cross)} weight–bias terms")
        for spec, c in zip(self.specs, self.cross):
            g, a = spec.out_features, spec.in_features
            check_shape(f"{name} weight–bias terms of layer {spec.layer_id!r}",
                        getattr(c, "shape", None), f"({g}, {a})",
                        lambda s, g=g, a=a: s in ((g, a), (a, g)), 2)
    #: products, quadratic forms and the closed-form solve of params-shaped vectors run on
    #: their leaves
    LEAFWISE: ClassVar[bool] = True
    LEAFWISE_SOLVES: ClassVar[tuple[str, ...]] = ("default",)

    @property
    def _layout(self):
        """The neuron layers' ``(g_l, a_l + 1)`` matrices (bias last) and the other layers'
        vectors, split and merged by slices (the Kronecker layout of :mod:`.kfac`)."""
        return kronecker_layout(self.layer_collection, self.specs)

    @property
    def _indices(self) -> tuple[np.ndarray, ...]:
        """Per layer, the ``(g_l, a_l + 1)`` flat indices of each neuron (bias last)."""
        return self._layout.matrices

    def cross_matrix(self, i: int) -> jax.Array:
        """The ``(g_l, a_l)`` weight–bias terms of the ``i``-th layer of ``specs``."""
        return self.cross[i].T if self._layout.transposed[i] else self.cross[i]

    def _neurons(self):
        """Per layer ``(D, β, c, ρ)`` in the ``(g_l, a_l)`` orientation (``ρ`` may be
        ``None``)."""
        mats, _ = self._layout.split(self.diag)
        for i, (m, rho) in enumerate(zip(mats, self.rho)):
            yield m[:, :-1], m[:, -1], self.cross_matrix(i), rho

    # ------------------------------------------------------------------ primitives
    def _pieces(self, v, pairs, cross):
        """``v`` by neuron layer in the kernel's memory orientation (``(a, g)`` when
        transposed, else ``(g, a)``), beside the given ``(D, β)`` pieces and ``c``: per layer
        ``(w, b, D, β, c, transposed, c·w)`` (``c·w`` per neuron), and the other layers'
        pieces of ``v``."""
        layout = self._layout
        ws, xs = layout.split_pieces(v)
        layers = [(w, b, dw, db, c, t, jnp.sum(c * w, axis=_orientation(t)[0]))
                  for (w, b), (dw, db), c, t in zip(ws, pairs, cross, layout.transposed)]
        return layers, xs

    def _mv(self, v):
        return self._apply(v, *self._layout.split_pieces(self.diag), self.cross, self.rho)

    def _apply(self, v, pairs, vecs, cross, rho):
        """``M' v`` for the quasi-diagonal ``M'`` with these pieces (``(D, β)`` per neuron
        layer, the other layers' diagonals, ``c``, ``ρ``; memory orientation): no flat
        ``M'`` is formed (``solve`` applies the inverse's pieces directly)."""
        layers, xs = self._pieces(v, pairs, cross)
        out = []
        for (w, b, dw, db, c, t, cv), r in zip(layers, rho):
            along = b if r is None else b + r * cv
            out.append((dw * w + c * _orientation(t)[1](along), db * b + cv))
        return self._layout.merge_pieces(out, [d * x for x, d in zip(xs, vecs)], like=v)

    def _vTMv(self, v):
        """``Σ D w² + Σ β b² + 2 Σ b (c·w) + Σ ρ (c·w)²``: no product vector formed."""
        pairs, vecs = self._layout.split_pieces(self.diag)
        layers, xs = self._pieces(v, pairs, self.cross)
        total = sum(jnp.vdot(x, d * x) for x, d in zip(xs, vecs))
        for (w, b, dw, db, _, _, cv), rho in zip(layers, self.rho):
            total += jnp.sum(dw * w**2) + jnp.sum(db * b**2) + 2 * jnp.vdot(b, cv)
            if rho is not None:
                total += jnp.sum(rho * cv**2)
        return total

    def get_diag(self):
        if all(rho is None for rho in self.rho):
            return self.diag
        layout = self._layout
        pairs, vecs = layout.split_pieces(self.diag)
        pairs = [(w if rho is None else w + _orientation(t)[1](rho) * c**2, b)
                 for (w, b), c, rho, t in zip(pairs, self.cross, self.rho, layout.transposed)]
        return layout.merge_pieces(pairs, vecs)

    def trace(self):
        return jnp.sum(self.get_diag())

    def frobenius_norm(self):
        square = jnp.sum(self.diag**2)
        layout = self._layout
        pairs, _ = layout.split_pieces(self.diag)
        for (D, _), c, rho, t in zip(pairs, self.cross, self.rho, layout.transposed):
            square += 2 * jnp.sum(c**2)
            if rho is not None:  # ‖diag(D) + ρccᵀ‖² − ‖D‖² per neuron
                axis = _orientation(t)[0]
                square += jnp.sum(2 * rho * jnp.sum(D * c**2, axis=axis)
                                  + rho**2 * jnp.sum(c**2, axis=axis) ** 2)
        return jnp.sqrt(square)

    def _blocks(self) -> list[jax.Array]:
        """Per layer the ``(g_l, a_l + 1, a_l + 1)`` neuron blocks (bias last)."""
        return [_arrow.blocks(*neurons) for neurons in self._neurons()]

    def to_dense(self):
        out = jnp.diag(self.diag)
        for idx, block in zip(self._indices, self._blocks()):
            out = out.at[idx[:, :, None], idx[:, None, :]].set(block)
        return out

    @property
    def _alone(self) -> np.ndarray:
        """The flat indices of the lone diagonal entries (outside every neuron block)."""
        alone = np.ones(self.layer_collection.numel(), bool)
        for idx in self._indices:
            alone[idx.ravel()] = False
        return np.flatnonzero(alone)

    def eigvalsh(self):
        """Per-neuron eigenvalues and the lone diagonal entries, ascending: each neuron's
        by bisection on an inertia count (:mod:`~jaxgeom.pmat._arrow`),
        ``s Σ_l g_l (a_l + 1) a_l`` and ``O(d)`` memory, no block formed."""
        values = [self.diag[self._alone]]
        values += [v.ravel() for v in self._neuron_eigenvalues(list(self._neurons()))]
        return sort(jnp.concatenate(values))

    @staticmethod
    def _neuron_eigenvalues(neurons: list) -> list[jax.Array]:
        """Per layer, the ``(g_l, a_l + 1)`` eigenvalues of its neurons
        (:func:`~jaxgeom.pmat._arrow.arrow_eigvalsh`; ``neurons``: :meth:`_neurons`'
        pieces), the layers of one input width (and dtype, ``ρ`` or not) bisected as one
        stack of blocks: one bisection loop compiled per width, not per layer (a first
        ``eigvalsh`` of bench_small or bench_mlp, three layers of two widths, compiled in
        0.75 s instead of 1.05). The blocks are independent: the same numbers as layer by
        layer."""
        groups: dict[tuple, list[int]] = {}
        for i, (D, _, _, rho) in enumerate(neurons):
            groups.setdefault((D.shape[1], D.dtype, rho is None), []).append(i)
        values: list[Any] = [None] * len(neurons)
        for members in groups.values():
            stacked = [jnp.concatenate(parts) if parts[0] is not None else None
                       for parts in zip(*(neurons[i] for i in members))]
            found = _arrow.arrow_eigvalsh(*stacked)
            ends = np.cumsum([neurons[i][0].shape[0] for i in members])[:-1]
            for i, part in zip(members, jnp.split(found, ends)):
                values[i] = part
        return values

    def _eigsh(self, k, which):
        """``k`` eigenpairs among the neuron blocks' and the lone diagonal entries'
        (canonical vectors ``eᵢ``): every eigenvalue by bisection (:meth:`eigvalsh`), the
        ``k`` chosen (``O(d log k)``), then the vectors of the chosen ones alone, from an
        ``eigh`` of their neurons' blocks (``min(k, g_l)`` blocks per layer, an inverse's
        ``ρ ccᵀ`` included: ``min(k, g_l) (a_l + 1)³``), each written into its neuron's
        flat indices (:func:`~jaxgeom.pmat._spectral.eigenpairs_of_pieces`, ``k d``):
        never ``d × d``, nor all of a layer's ``(a_l + 1)²`` blocks when ``k < g_l``."""
        alone = self._alone
        pieces = [(alone, self.diag[alone],
                   lambda i, n=alone.size: jax.nn.one_hot(i, n, dtype=self.diag.dtype))]
        neurons = list(self._neurons())
        for idx, layer, values in zip(self._indices, neurons,
                                      self._neuron_eigenvalues(neurons)):
            # values: (g, a + 1), ascending per neuron
            pieces.append((idx, values, functools.partial(_neuron_eigenvectors, layer)))
        return _spectral.eigenpairs_of_pieces(pieces, k, which, self.size(0), self.dtype)

    def _solve(self, v, regul, method, **options):
        if method == "default":
            return self._apply(v, *self._inverse(regul, "solve"))
        return super()._solve(v, regul, method, **options)

    # ------------------------------------------------------------------ functions
    @compiled_when_eager
    def inv(self, regul: Any = 0.0) -> PMatQuasiDiag:
        """``(M + λI)⁻¹``, per neuron in closed form (module docstring), ``O(d)``. One
        compiled call when eager (no array identity to keep: bench_small 1.9 → 0.1 ms)."""
        pairs, vecs, cross, rhos = self._inverse(regul, "inv")
        return self._with(self._layout.merge_pieces(pairs, vecs), cross, rhos)

    def _inverse(self, regul, operation):
        """The pieces of ``(M + λI)⁻¹`` (as :meth:`_apply` takes them), and a warning that
        ``operation`` is round-off (:func:`~jaxgeom._reporting.warn_if_singular`) where a
        neuron's Schur complement ``s = β + λ − Σᵢ cᵢ²/(Dᵢ + λ)`` cancelled to ``≤ 10 ε``
        of its ``β + λ`` (or is ``0/0``: an input that is always 0). Divisions by the
        diagonal entries alone are exact, as a diagonal's solve: not checked."""
        layout = self._layout
        pairs, vecs = layout.split_pieces(self.diag)
        inverted, cross, rhos, pivots = [], [], [], []
        for (D, beta), c, rho, t in zip(pairs, self.cross, self.rho, layout.transposed):
            axis, col = _orientation(t)
            D, beta = D + regul, beta + regul
            u = c / D
            kappa = jnp.sum(c * u, axis=axis)
            q = 1.0 if rho is None else 1 + rho * kappa
            s = beta - kappa / q
            cross.append(-u / col(q * s))
            rhos.append(s if rho is None else s - rho * q * s**2)
            inverted.append((1 / D, 1 / s))
            pivots.append(jnp.stack([jnp.ravel(q * s), jnp.ravel(beta)], axis=-1))
        if pivots:  # (neurons, 2): each Schur complement beside its β + λ
            pivots = jnp.concatenate(pivots)
            warn_if_singular(jnp.where(jnp.isnan(pivots), 0, pivots), operation)
        return inverted, [1 / (x + regul) for x in vecs], cross, rhos

    # ------------------------------------------------------------------ algebra
    def _scale(self, s):
        rho = tuple(None if r is None else jnp.where(s == 0, 0.0, r / jnp.where(s == 0, 1, s))
                    for r in self.rho)
        return self._with(self.diag * s, [c * s for c in self.cross], rho)

    def _add_same(self, other, sign):
        if self.specs == other.specs and all(r is None for r in self.rho + other.rho):
            return self._with(self.diag + sign * other.diag,
                              [a + sign * b for a, b in zip(self.cross, other.cross)], self.rho)
        return PMatDense.from_pmat(self)._add_same(PMatDense.from_pmat(other), sign)

    def _with(self, diag, cross, rho) -> PMatQuasiDiag:
        return PMatQuasiDiag(self.layer_collection, self.specs, diag, tuple(cross), tuple(rho))

    def _restricted(self, r) -> PMatQuasiDiag:
        """The diagonal's entries ``S`` and the per-neuron terms ``c``, ``ρ`` of the
        layers of ``S`` (``d_S``): every neuron block lies within one layer."""
        kept, specs = restricted_specs(self.specs, r)
        return PMatQuasiDiag(r.layer_collection, specs, take(self.diag, r.indices, -1),
                             tuple(self.cross[i] for i in kept), tuple(self.rho[i] for i in kept))

    # ------------------------------------------------------------------ construction
    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *,
                      mode="auto") -> QuasiDiagBuilder:
        """Built in one streaming pass over the captured ``(a, g)`` (:class:`QuasiDiagBuilder`;
        ``mode`` is accepted for a uniform signature; the capture uses one ``vjp`` per
        example and output)."""
        del mode
        check = functools.partial(check_factorable, layout=layout, representation=cls.__name__,
                                  needs=_has_bias)
        return QuasiDiagBuilder(capture_plan(fn, params, example, aux, layout, check), layout)


def _neuron_eigenvectors(neurons: tuple, i: jax.Array) -> jax.Array:
    """The ``(m, g·(a + 1))`` rows, in a layer's ``(g, a + 1)`` neuron order, of the
    eigenvectors at positions ``i`` of the layer's ``g·(a + 1)`` eigenvalues (neuron
    ``i // (a + 1)``, the ``i % (a + 1)``-th of its block's ascending eigenvalues), zero
    outside the neuron's block; ``neurons`` the layer's ``(D, β, c, ρ)``. Only the
    ``m`` chosen neurons' blocks are formed and factorised when ``m < g``."""
    g, width = neurons[0].shape[0], neurons[0].shape[1] + 1
    neuron, j = i // width, i % width
    if i.shape[0] < g:
        chosen = [None if x is None else x[neuron] for x in neurons]
        _, vectors = _spectral.eigh(_arrow.blocks(*chosen))  # (m, a + 1, a + 1)
        columns = jnp.take_along_axis(vectors, j[:, None, None], axis=2)[:, :, 0]
    else:
        _, vectors = _spectral.eigh(_arrow.blocks(*neurons))  # (g, a + 1, a + 1)
        columns = vectors[neuron, :, j]  # (m, a + 1)
    rows = jax.nn.one_hot(neuron, g, dtype=columns.dtype)[:, :, None] * columns[:, None, :]
    return rows.reshape(i.shape[0], g * width)


def _orientation(transposed: bool):
    """The neuron axis of a layer matrix in memory (``(a, g)`` when ``transposed``, else
    ``(g, a)``) as ``(the input axis, broadcast of a (g,) vector over that matrix)``."""
    return (0, lambda x: x[None]) if transposed else (1, lambda x: x[:, None])


@builder
class QuasiDiagBuilder(CaptureBuilder):
    """``Σₙₖ J²`` (layer by layer) and each neuron layer's ``Σₙₖ ∂W ⊙ ∂b`` per chunk
    (:func:`_chunk_statistics`, as ``(g_l, a_l)``); their means are ``diag`` (put in the
    flat order once) and ``cross`` (put in the kernel's memory orientation once: transposed
    in every chunk's step, XLA:CPU had copied the step's ``(n, g_l)`` weights into
    ``(g_l, n)`` for the product)."""

    finalizes_traced: ClassVar[bool] = True

    def statistics(self, params, batch, mask, offset, aux):
        return _chunk_statistics(params, batch, mask, offset, aux, plan=self.plan,
                                 layout=self.layout)

    def finalize(self, total, stream) -> PMatQuasiDiag:
        diag, cross = _means(self.plan, self.layout, total, stream.n)
        specs = tuple(s for s in self.plan.specs if _has_neurons(s))
        return PMatQuasiDiag(self.layout, specs, diag, cross, (None,) * len(specs))


@quick_jit(static_argnums=(0, 1))
def _means(plan, layout, total, n):
    """The flat diagonal's and the cross terms' means from their sums (the cross terms
    turned into the kernel's memory orientation), in one compiled call (a build's last
    dispatch)."""
    squares, cross = total
    neurons = tuple(s for s in plan.specs if _has_neurons(s))
    cross = tuple(c.T if t else c
                  for c, t in zip(cross, kronecker_layout(layout, neurons).transposed))
    return flat_diagonal(plan, layout, squares, n), mean(cross, n)


def _has_bias(layer) -> bool:
    """Whether a layer has per-neuron weight–bias strips (which need ``Σ_t g_t a_tᵀ``)."""
    return "bias" in layer.roles


def _has_neurons(spec: KroneckerSpec) -> bool:
    return spec.kind in ("dense", "conv") and spec.bias is not None


@functools.partial(jax.jit, static_argnames=("plan", "layout"))
def _chunk_statistics(params, batch, mask, offset, aux, *, plan, layout):
    """The diagonal ``Σₙₖ J²`` (layer by layer) and each neuron layer's ``Σₙₖ ∂W ⊙ ∂b`` for one
    masked chunk, and whether everything was finite."""
    cap: Captured = capture_chunk(plan, params, batch, offset, aux, mask)
    squares, cross = squared_gradients(cap, plan, layout, cross=_has_neurons)
    return (squares, tuple(cross)), all_finite(cap, squares)
