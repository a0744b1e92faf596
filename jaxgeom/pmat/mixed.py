"""``PMatMixed``: a representation per layer, zero between parts.

The layers are partitioned into *parts*; each part is stored in its own representation
(KFAC for dense/conv layers, BlockDiag for norms, Diag for a large embedding, …), built
on the part's parameters only, and the matrix is block-diagonal over the parts:

.. math::  M = \\mathrm{blockdiag}(M_1, \\dots, M_P), \\qquad
   M_p = \\frac1N \\sum_n J_{n,p}^\\top J_{n,p},

``J_{n,p}`` the columns of the per-example Jacobian on part ``p``'s parameters.

Restriction (:mod:`jaxgeom.restriction`). Each part is built on its restricted function
``fn_p(leaves_p, example, index, (params, aux))``, which writes the part's leaves into the
full ``params`` before calling ``fn``: every representation builds on it unchanged — the
per-example Jacobian, or the capture of layer inputs and output gradients
(:mod:`jaxgeom.capture`), is then taken with respect to the part's leaves only.
:func:`restrict` (importable from here too) makes a part's sub-:class:`LayerCollection`.

Build. :meth:`PMatMixed.chunk_builder` makes each part's own chunk builder
(:mod:`jaxgeom.streaming`) on its restricted function — per-example Jacobians of the
part's leaves, or captures with the part's own capture plan — and groups them
(:class:`MixedBuilder`): one jitted step per chunk computes every part's statistics, so the
data are streamed once for all parts, then each part is finalized.

Cost. One streaming pass over the data for all ``P`` parts: per chunk, every part's own
cost on its leaves (one forward and ``K`` backward passes per example *per part*, since each
part differentiates its own leaves; the memory of one chunk's Jacobians/captures of all
parts together, never the full per-example Jacobian of the model). Exceptions, both
inherent: EKFAC parts refit their diagonals in the eigenbasis of their finished factors,
in one more pass shared by all EKFAC parts (the data are read twice; a one-shot iterator is
kept as a list of its batches during the first read, a re-iterable one is iterated again);
``PMatImplicit`` parts keep the batches read (they replay them at every product). Nothing
else is kept: a one-shot iterator is read once. Every operation costs the sum of the parts'
costs plus ``d`` to split and merge flat vectors.

Operations combine blockwise: ``mv``, ``vTMv``, ``get_diag``, ``trace``, Frobenius,
``to_dense``, ``solve`` (each part's default method, or ``"cg"`` on the whole), ``inv``,
``pinv`` (threshold relative to the whole spectrum), ``pow``, ``eigvalsh`` and ``norm(±2)``,
``eigsh(k, which)`` (each part's ``min(k, d_p)`` eigenpairs chosen by the same ``which``,
the ``k`` chosen among them: no ``d × d`` matrix), scalar ``*``, ``restrict`` (the parts on
the layers kept, one that straddles them restricted in turn); ``solve``/``inv``/``pow``
forward KFAC's ``damping=`` to the parts that take it; ``+``/``-``/``mm`` between two
``PMatMixed`` with the same parts (layers and representations) are part-wise, otherwise
dense. An operation a part cannot do raises a ``NotImplementedError`` naming the part's
representation and layers.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from jaxgeom._differentiable import is_differentiable
from jaxgeom._reindex import FlatPartition
from jaxgeom._sorting import sort
from jaxgeom.layers import KINDS, Layer, LayerCollection
from jaxgeom.pmat import _spectral
from jaxgeom.pmat.base import (
    ITERATIVE_SOLVE_METHODS,
    ITERATIVE_SOLVES,
    PMatAbstract,
    iterative_solve_options,
    representation,
    static_field,
)
from jaxgeom.pmat.blockdiag import PMatBlockDiag
from jaxgeom.pmat.dense import PMatDense
from jaxgeom.restriction import RestrictedFunction, Restriction, restrict
from jaxgeom.streaming import BuilderGroup, ChunkBuilder, Continue, builder


# ----------------------------------------------------------------------------- restricted builds
@builder
class RestrictedBuilder(ChunkBuilder):
    """A part's chunk builder (made for ``RestrictedFunction(fn, restriction)``, the
    sub-parameters and ``aux = (params, aux)``) driven with the full ``params`` and
    ``aux``: it selects the part's leaves itself, so every part can run in one step on the
    same arguments."""

    inner: ChunkBuilder = None
    restriction: Restriction = static_field(default=None)

    @property
    def passes(self) -> int:
        return self.inner.passes

    @property
    def keeps_data(self) -> bool:
        return self.inner.keeps_data

    @property
    def fixed_example_shapes(self) -> bool:
        return self.inner.fixed_example_shapes

    @property
    def updates_in_place(self) -> bool:
        return self.inner.updates_in_place

    @property
    def finalizes_traced(self) -> bool:
        return self.inner.finalizes_traced

    @property
    def needs_static_count(self) -> bool:
        return self.inner.needs_static_count

    def _inner_args(self, params, batch, mask, offset, aux):
        """The inner builder's arguments: the sub-parameters, and ``(params, aux)``."""
        return self.restriction.select(params), batch, mask, offset, (params, aux)

    def statistics(self, *args):
        return self.inner.statistics(*self._inner_args(*args))

    def init_total(self, *args):
        return self.inner.init_total(*self._inner_args(*args))

    def update(self, total, *args):
        return self.inner.update(total, *self._inner_args(*args))

    def reduce(self, total, stats, count):
        return self.inner.reduce(total, stats, count)

    def with_examples(self, n, last_offset=None):
        return dataclasses.replace(self, inner=self.inner.with_examples(n, last_offset))

    def _inner_stream(self, stream):
        return stream._replace(params=self.restriction.select(stream.params),
                               aux=(stream.params, stream.aux))

    def finalize(self, total, stream):
        return self.inner.finalize(total, self._inner_stream(stream))

    def finish(self, result, stream):
        result = self.inner.finish(result, self._inner_stream(stream))
        if isinstance(result, Continue):
            return Continue(RestrictedBuilder(result.builder, self.restriction), result.then)
        return result


@builder
class MixedBuilder(BuilderGroup):
    """Every part's :class:`RestrictedBuilder` in one :class:`~jaxgeom.streaming.BuilderGroup`
    (one jitted step per chunk for all parts); the results assemble into a ``PMatMixed``."""

    layer_collection: LayerCollection = static_field(default=None)

    def assemble(self, results):
        return PMatMixed(self.layer_collection,
                         tuple(_in_dtype(r, self.layer_collection.dtype) for r in results))


def _in_dtype(part: PMatAbstract, dtype: Any) -> PMatAbstract:
    """A part on layers of integer or boolean leaves only (constants: a zero matrix, built
    in the default float, :attr:`LayerCollection.dtype`) in the whole matrix's ``dtype``, so
    that it does not promote a float32 model's products to float64 under x64; other parts
    as they are."""
    if any(is_differentiable(d) for d in part.layer_collection.dtypes):
        return part
    return jax.tree_util.tree_map(
        lambda a: a.astype(dtype) if is_differentiable(jnp.result_type(a)) else a, part)


# ----------------------------------------------------------------------------- mapping
def assign(layer_collection: LayerCollection, mapping: Mapping[str, type] | None,
           default: type) -> dict[str, type]:
    """The representation of each layer id: an exact id key first, then the first glob
    pattern (``fnmatch``, case-sensitive, on the id) that matches, in the mapping's order,
    then the layer's kind, then ``default``. A key that is not a kind and chooses no layer
    (it matches none, or every layer it matches is taken by an id or an earlier pattern) is
    a ``ValueError``."""
    mapping = dict(mapping or {})
    for key, rep in list(mapping.items()) + [("default", default)]:
        if not (isinstance(rep, type) and issubclass(rep, PMatAbstract)):
            raise TypeError(f"mapping[{key!r}] must be a representation class; got {rep!r}")
    ids = [layer.id for layer in layer_collection.layers]
    patterns = [k for k in mapping if k not in KINDS and k not in ids]
    chosen, chosen_by = {}, {}
    for layer in layer_collection.layers:
        key = layer.id if layer.id in mapping else next(
            (p for p in patterns if fnmatch.fnmatchcase(layer.id, p)), None)
        if key is not None:
            chosen_by.setdefault(key, []).append(layer.id)
        chosen[layer.id] = mapping[key] if key is not None else mapping.get(layer.kind, default)
    for key in patterns:
        if key in chosen_by:
            continue
        matched = [i for i in ids if fnmatch.fnmatchcase(i, key)]
        if not matched:
            raise ValueError(
                f"mapping key {key!r} matches no layer id and is not a layer kind {KINDS}; "
                f"layer ids are {ids}")
        raise ValueError(
            f"mapping key {key!r} chooses no layer: the layers it matches, {matched}, are "
            "each taken by an exact id key or an earlier pattern (exact ids first, then the "
            f"first matching pattern in the mapping's order: {patterns}); reorder or narrow "
            "the patterns")
    return chosen


# ----------------------------------------------------------------------------- representation
def _takes_damping(part: PMatAbstract) -> bool:
    """Whether a part's default solve (and its ``inv``/``pow``) takes a ``damping``."""
    return "damping" in part.SOLVE_OPTIONS.get(part.SOLVE_METHODS[0], ())


@functools.lru_cache(maxsize=128)
def _parts(layer_collection: LayerCollection,
           layouts: tuple[LayerCollection, ...]) -> FlatPartition:
    """Each part's flat indices, split and merged by slices."""
    indices = tuple(restrict(layer_collection, tuple(lyr.id for lyr in lc.layers)).indices
                    for lc in layouts)
    return FlatPartition.of(indices, layer_collection.numel())


@representation
class PMatMixed(PMatAbstract):
    """Block-diagonal over parts of the layers, each part in its own representation
    (module docstring: restriction, costs, operations).

    Build with ``FIM(apply_fn, params, data, PMatMixed, mapping={...}, default=...)`` (also
    ``FIM_MonteCarlo``, ``SecondMoment``): ``mapping`` maps a layer kind (``"dense"``,
    ``"conv"``, ``"norm"``, ``"embedding"``, ``"other"``), a layer id or a glob pattern on
    the id to a representation class; unmatched layers get ``default`` (``PMatBlockDiag``).
    ``options={PMatKFAC: {"kfac_approx": "reduce"}}`` passes build options per
    representation. Or assemble built parts with :meth:`from_mapping`.

    Attributes:
      layer_collection: the parameter layout (static).
      parts: the sub-matrices, each on the sub-collection of its layers (:func:`restrict`).

    Example:
      >>> F = FIM(model.apply, params, (x, y), PMatMixed,
      ...         mapping={"dense": PMatKFAC, "conv": PMatKFAC, "embedding": PMatDiag})
      >>> F.solve(grads, regul=1e-3)
    """

    layer_collection: LayerCollection = dataclasses.field(metadata=dict(static=True))
    parts: tuple[PMatAbstract, ...] = ()

    SOLVE_METHODS: ClassVar[tuple[str, ...]] = ("default", *ITERATIVE_SOLVE_METHODS)
    #: ``damping`` goes to the parts that take it (:meth:`_damping_options`)
    SOLVE_OPTIONS: ClassVar[dict[str, tuple[str, ...]]] = {
        "default": ("damping",), **iterative_solve_options("damping")}

    def _compiles_eager_calls(self) -> bool:
        """Not with a part that runs the model: each part's operations compile their own
        calls then (a ``PMatImplicit``'s as model steps)."""
        return all(p._compiles_in_one_program() for p in self.parts)

    @property
    def _split(self) -> FlatPartition:
        return _parts(self.layer_collection, tuple(p.layer_collection for p in self.parts))

    def part(self, layer: Layer | str) -> PMatAbstract:
        """The sub-matrix holding a layer."""
        layer_id = layer.id if isinstance(layer, Layer) else layer
        for p in self.parts:
            if any(lyr.id == layer_id for lyr in p.layer_collection.layers):
                return p
        raise KeyError(f"no layer {layer_id!r} in {self!r}")

    def _each(self, op: str, fn: Callable[..., Any], *others: Sequence) -> list:
        """``fn(part, *others[i])`` for every part ``i``; a part that cannot raises,
        naming itself and its layers."""
        out = []
        for p, *args in zip(self.parts, *others):
            try:
                out.append(fn(p, *args))
            except NotImplementedError as err:
                ids = [lyr.id for lyr in p.layer_collection.layers]
                raise NotImplementedError(
                    f"PMatMixed: {op} is not available for the part stored as "
                    f"{type(p).__name__} (layers {ids}): {err}. Choose another "
                    "representation for these layers in the mapping."
                ) from err
        return out

    # ------------------------------------------------------------------ primitives
    def _mv(self, v):
        return self._split.merge(self._each("mv", lambda p, x: p._mv(x), self._split.split(v)))

    def get_diag(self):
        return self._split.merge(self._each("get_diag", lambda p: p.get_diag()))

    def trace(self):
        return sum(self._each("trace", lambda p: p.trace()))

    def frobenius_norm(self):
        return jnp.sqrt(sum(n**2 for n in self._each("frobenius_norm",
                                                     lambda p: p.frobenius_norm())))

    def to_dense(self):
        return self._split.block_diagonal(self._each("to_dense", lambda p: p.to_dense()))

    def eigvalsh(self):
        return sort(jnp.concatenate(self._each("eigvalsh", lambda p: p.eigvalsh())))

    def slogdet(self, regul: Any = 0.0) -> tuple[jax.Array, jax.Array]:
        """The parts' own (a block-diagonal matrix's determinant is their product), each
        checked for round-off as its representation is (a diagonal part's entries are
        exact however small)."""
        signs, logs = zip(*self._each("slogdet", lambda p: p.slogdet(regul)))
        return functools.reduce(jnp.multiply, signs), sum(logs)

    def _eigsh(self, k, which):
        """``k`` eigenpairs among the parts' own: the ``k`` chosen among all ``d``
        eigenvalues are among the union of each part's ``min(k, d_p)`` chosen by the same
        ``which`` (the largest, smallest or largest in magnitude of a union are among each
        member's), so each part answers its :meth:`eigsh` and the vectors are written into
        the part's flat indices (:func:`~jaxgeom.pmat._spectral.eigenpairs_of_pieces`).
        Cost: the parts' ``eigsh`` (a part's own ``d_p × d_p`` at most: a ``PMatDense``
        part's ``eigh``), never ``d × d``; then ``O(P k log k)`` and ``k d`` to write the
        vectors. A part that cannot (``PMatImplicit``) raises, naming itself."""
        pairs = self._each("eigsh", lambda p: p.eigsh(min(k, p.size(0)), which)
                           if p.size(0) else (jnp.zeros(0, self.dtype), None))
        pieces = [(idx, values, lambda i, q=vectors: q[:, i].T)
                  for idx, (values, vectors) in zip(self._split.pieces, pairs)]
        return _spectral.eigenpairs_of_pieces(pieces, k, which, self.size(0), self.dtype)

    def _solve(self, v, regul, method, damping: str = "exact", **options):
        """Each part's default solve of its piece of ``v``, the ``damping`` forwarded to
        the parts that take it (:meth:`_damping_options`); an iterative method
        (``"cg"``, ``"minres"``, ``"neumann"``) on the whole matrix (exact damping only)."""
        damped = self._damping_options(damping)
        if method in ITERATIVE_SOLVES:
            if damping != "exact":
                raise ValueError(
                    f"{method} solves (M + regul·I) x = v (damping='exact'); "
                    f"damping={damping!r} damps the Kronecker factors of the KFAC parts and "
                    f"is solved part by part: drop method={method!r}")
            return super()._solve(v, regul, method, **options)
        return self._split.merge(self._each(
            "solve", lambda p, x, k: p._solve(x, regul, p.SOLVE_METHODS[0], **k),
            self._split.split(v), damped))

    def _damping_options(self, damping: str) -> list[dict[str, str]]:
        """Each part's keyword arguments for a ``damping`` of ``solve``/``inv``/``pow``:
        ``{"damping": damping}`` for the parts that take one (``PMatKFAC``, ``PMatEKFAC``:
        a ``damping`` among their solve options), nothing for the others, which damp
        exactly (``M_p + regul·I``) — what ``"exact"`` (the default) means for every part.

        With ``damping="pi"`` (``(A + π√λ I) ⊗ (G + √λ/π I)`` per Kronecker layer, π of
        Martens & Grosse) or ``"pi_one"`` (π = 1), the matrix solved, inverted or taken to
        a power is the block-diagonal of each KFAC part's factor-damped blocks and the
        other parts' ``M_p + λI``.

        Raises:
          ValueError: for a ``damping`` not in ``("exact", "pi", "pi_one")``, or a
            factored one when no part takes it.
        """
        from jaxgeom.pmat.kfac import DAMPINGS

        if damping not in DAMPINGS:
            raise ValueError(f"damping must be one of {DAMPINGS}; got {damping!r}")
        takes = [_takes_damping(p) for p in self.parts]
        if damping != "exact" and not any(takes):
            kinds = sorted({type(p).__name__ for p in self.parts})
            raise ValueError(
                f"damping={damping!r} damps the Kronecker factors (A, G) of a PMatKFAC "
                f"part; this PMatMixed has none (its parts are {', '.join(kinds)}), which "
                "damp exactly, M + regul·I: drop damping, or map the dense/conv layers to "
                "PMatKFAC (mapping={'dense': PMatKFAC, 'conv': PMatKFAC})")
        return [{"damping": damping} if t else {} for t in takes]

    # ------------------------------------------------------------------ functions
    def inv(self, regul: Any = 0.0, *, damping: str = "exact") -> PMatMixed:
        """``(M + regul·I)⁻¹`` part by part; ``damping`` (``"exact"``, ``"pi"``,
        ``"pi_one"``) goes to the KFAC parts (:meth:`_damping_options`). Cost: the parts'
        inverses."""
        damped = self._damping_options(damping)
        return self._with(self._each("inv", lambda p, k: p.inv(regul, **k), damped))

    def pow(self, p: Any, regul: Any = 0.0, *, damping: str = "exact") -> PMatMixed:
        """``(M + regul·I)^p`` part by part; ``damping`` goes to the KFAC parts
        (:meth:`_damping_options`): with ``"pi"``, their factor-damped blocks' powers
        ``(A + π√λ I)^p ⊗ (G + √λ/π I)^p``. Cost: the parts' powers."""
        damped = self._damping_options(damping)
        return self._with(self._each("pow", lambda m, k: m.pow(p, regul, **k), damped))

    def pinv(self, atol: Any = None, rtol: Any = None) -> PMatMixed:
        """Pseudo-inverse of each part with one threshold ``max(atol, rtol·max|λ|)``, ``λ``
        over the whole matrix (``rtol`` defaults to ``d·eps`` without ``atol``)."""
        if rtol is None:
            rtol = 0.0 if atol is not None else self.size(0) * jnp.finfo(self.dtype).eps
        scale = jnp.max(jnp.stack(self._each("pinv", lambda m: m.norm(2))))
        threshold = jnp.maximum(0.0 if atol is None else atol, rtol * scale)
        return self._with(self._each("pinv", lambda m: m.pinv(atol=threshold, rtol=0.0)))

    # ------------------------------------------------------------------ algebra
    def _same_parts(self, other) -> bool:
        return isinstance(other, PMatMixed) and [
            (type(a), a.layer_collection) for a in self.parts
        ] == [(type(b), b.layer_collection) for b in other.parts]

    def mm(self, other: PMatAbstract) -> PMatAbstract:
        """Part-wise with a ``PMatMixed`` of the same parts, dense otherwise."""
        self._check_compatible(other)
        if self._same_parts(other):
            return self._with(self._each("mm", lambda p, q: p.mm(q), other.parts))
        return super().mm(other)

    def _scale(self, s):
        return self._with(self._each("scalar multiplication", lambda p: p * s))

    def _add_same(self, other, sign):
        if self._same_parts(other):
            return self._with(self._each(
                "addition", lambda p, q: p + q if sign > 0 else p - q, other.parts))
        return PMatDense.from_pmat(self)._add_same(PMatDense.from_pmat(other), sign)

    def _with(self, parts) -> PMatMixed:
        return PMatMixed(self.layer_collection, tuple(parts))

    def _restricted(self, r: Restriction) -> PMatMixed:
        """The parts on ``S``: a part within ``S`` as it is, a part that straddles ``S``
        restricted to its layers in ``S`` (its own :meth:`restrict`), the others dropped;
        still block-diagonal over the parts left. Cost: the parts' restrictions."""
        ids = {layer.id for layer in r.layer_collection}

        def mine(p: PMatAbstract) -> list[str]:
            return [layer.id for layer in p.layer_collection if layer.id in ids]

        parts = self._each("restrict", lambda p: p.restrict(mine(p)) if mine(p) else None)
        return PMatMixed(r.layer_collection, tuple(p for p in parts if p is not None))

    def without_rank_bounds(self) -> PMatMixed:
        return self._with(p.without_rank_bounds() for p in self.parts)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mapping(cls, layer_collection: LayerCollection,
                     parts: Sequence[PMatAbstract]) -> PMatMixed:
        """Assemble already-built sub-matrices, each on the sub-collection of its layers
        (``restrict(layer_collection, ids).layer_collection``); together they must hold
        every layer exactly once."""
        seen: list[str] = []
        for p in parts:
            ids = tuple(lyr.id for lyr in p.layer_collection.layers)
            unknown = sorted(set(ids) - {lyr.id for lyr in layer_collection.layers})
            if unknown:  # a part built on its own parameters' layout (ids "0", "1", …)
                raise ValueError(
                    f"the {type(p).__name__} part has layers {unknown} that the layer "
                    f"collection does not have ({[lyr.id for lyr in layer_collection.layers]}): "
                    "build each part with layer_collection=restrict(layer_collection, "
                    "ids).layer_collection")
            if restrict(layer_collection, ids).layer_collection != p.layer_collection:
                raise ValueError(
                    f"the {type(p).__name__} part on layers {list(ids)} is not built on "
                    "restrict(layer_collection, ids).layer_collection"
                )
            seen.extend(ids)
        want = [lyr.id for lyr in layer_collection.layers]
        if sorted(seen) != sorted(want):
            raise ValueError(f"the parts must hold every layer once: {want}; got {seen}")
        return cls(layer_collection, tuple(parts))

    @classmethod
    def chunk_builder(cls, fn, params, example, aux, layout, *, mode="auto", mapping=None,
                      default=PMatBlockDiag,
                      options: Mapping[type, dict] | None = None) -> MixedBuilder:
        """All parts built together in one streaming pass (:class:`MixedBuilder`; module
        docstring: cost): each part's own chunk builder on the restricted function, with
        its ``options[representation]``."""
        chosen = assign(layout, mapping, default)
        groups: dict[type, list[str]] = {}
        for layer_id, rep in chosen.items():
            groups.setdefault(rep, []).append(layer_id)
        parts = []
        for rep, ids in groups.items():
            r = restrict(layout, tuple(ids))
            inner = rep.chunk_builder(RestrictedFunction(fn, r), r.select(params), example,
                                      (params, aux), r.layer_collection, mode=mode,
                                      **dict((options or {}).get(rep, {})))
            parts.append(RestrictedBuilder(inner, r))
        return MixedBuilder(tuple(parts), layout)
