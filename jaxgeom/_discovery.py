"""Layer discovery: partition parameter leaves into layers by reading the model's jaxpr.

:meth:`jaxgeom.LayerCollection.from_model` calls :func:`discover_layers`, which traces
``fn(params, *args)`` with :func:`jax.make_jaxpr` and classifies every parameter leaf by
*how it is consumed*, with no module registry and no pattern templates, so Flax linen,
Flax NNX, Equinox and plain ``jnp`` code are all handled by the same ~one pass.

Algorithm (REFERENCE.md §4.4, step 1):

1. **Marks.** Walking the equations in order, each variable may carry one mark:

   - :class:`_LeafView` -- the variable is a pure *view* of parameter leaf ``i``: the
     leaf itself or the result of the view primitives of :data:`_VIEW_PRIMITIVES`
     (casts, reshapes, transposes, broadcasts, squeezes, reversals -- the flipped kernel
     of a transposed convolution --, copies, ...);
   - :class:`_OpOutput` -- a view of the output of a linear operation (``dot_general`` /
     ``conv_general_dilated`` with a leaf as weight), *before* any bias is added;
   - :class:`_Scaled` -- a value derived (through ``mul``/``sub``/``div`` and views) from
     a product with a scale leaf, i.e. the output of a normalisation's affine scale.

   Leaf views and op outputs also carry ``axes``: where their *significant* dimensions
   (those of size > 1: a leaf's own, an op's output features) lie in the view, in order,
   followed through the view primitives (``None`` once a view mixes them with others).

   Marks go through call-like sub-jaxprs (``jit``, ``remat``, ``closed_call``,
   ``custom_jvp_call``, ``custom_vjp_call``) by mapping the equation's operands onto the
   sub-jaxpr's inputs and the sub-jaxpr's outputs back onto the equation's results.
   ``scan`` consts are mapped into the body (a weight used at every step is one use);
   any other way a leaf view enters a higher-order primitive (scan carry/xs, ``while``,
   ``cond``, unknown primitives) makes the leaf ``other``.

2. **Uses.** Each equation that consumes a leaf view records a :class:`_Use` for it:

   - ``dot_general`` with exactly one leaf-view operand (whose dimensions are not
     ``dot_general`` batch dimensions) -> role ``kernel`` of a ``dense`` op;
   - ``conv_general_dilated`` with a leaf-view rhs -> ``kernel`` of a ``conv`` (a grouped
     convolution too: its op is described as ``conv_general_dilated with
     feature_group_count=G``, which :attr:`~jaxgeom.layers.Layer.kronecker_obstacle`
     reports);
   - ``gather`` from a leaf view -> ``table`` of an ``embedding``;
   - ``add`` of a leaf view to an :class:`_OpOutput` whose op has as many output features
     as the leaf has elements, the leaf's dimensions lying on the op's feature dimensions
     (``axes`` equal) -> ``bias`` of that op (a per-position offset of the same size is
     not one);
   - ``mul`` by a leaf view -> ``scale``; ``add`` of a leaf view to a :class:`_Scaled`
     value -> ``shift`` of that scale;
   - anything else (including a lone ``add`` of a leaf, a leaf returned as an output, a
     leaf on both sides of an op) -> ``other``.

3. **Resolution** (:func:`_resolve`). A leaf whose uses are all linear-op uses anchors a
   layer (``kind`` and role = those of its first use, e.g. ``embedding``/``table`` for a
   tied embedding read by a ``gather`` and then by a ``dot_general``; ``uses`` = the
   number of op sites: >1 is weight sharing such as tied embeddings; ``ops`` = the
   description of each op). A leaf whose uses are all
   ``scale`` anchors a ``norm`` layer. A leaf whose uses are all ``bias`` of ops of one
   anchored kernel (resp. all ``shift`` of one norm scale) joins that layer, provided it
   is the only such leaf and (a bias) nothing but its ``add`` reads the op's pre-bias
   output (``z = x @ W`` reused beside ``z + b`` gives ``b`` a gradient other than the
   op output's: ``_Analysis.op_reads`` counts the reads). Every other leaf -- mixed
   roles, ``other`` uses, or unused (``uses == 0``) -- is its own ``other`` layer.

4. **Ids** (:func:`_layer_ids`): the longest common prefix of the parent paths of the
   layer's leaves (``Dense_0/kernel`` + ``Dense_0/bias`` -> ``Dense_0``); when that is
   empty or shared with another layer, the anchor leaf's full path.

Uses count equation sites: a kernel used inside a ``scan`` body counts once (it is
shared over the scan's iterations the way a dense layer is shared over a sequence axis),
and a jitted function called twice counts twice. Primitives are identified by object
(``jax.extend.core.primitives``), never by printed name, and sub-jaxprs are found with
``jax.extend.core.jaxprs_in_params``.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import jax
from jax.extend import core as jex
from jax.extend.core import primitives as prims

from jaxgeom.layers import Layer

_VIEW_PRIMITIVES = frozenset(
    {
        prims.convert_element_type_p,
        prims.reshape_p,
        prims.transpose_p,
        prims.broadcast_in_dim_p,
        prims.squeeze_p,
        prims.rev_p,
        prims.copy_p,
        prims.reduce_precision_p,
        prims.device_put_p,
        prims.sharding_constraint_p,
        prims.name_p,
    }
)
"""Primitives whose result is a re-indexed / re-typed copy of their first operand."""

_CALL_PRIMITIVES = frozenset(
    {
        prims.jit_p,
        prims.remat_p,
        prims.closed_call_p,
        prims.call_p,
        prims.custom_jvp_call_p,
        prims.custom_vjp_call_p,
    }
)
"""Primitives that apply one sub-jaxpr to their operands (operand k -> sub-jaxpr input k)."""

_ADD_PRIMITIVES = frozenset({prims.add_p, prims.add_jaxvals_p})

_LINEAR_ROLES = ("kernel", "table")


# ----------------------------------------------------------------------------- marks
@dataclasses.dataclass(frozen=True)
class _LeafView:
    """The variable is a view of parameter leaf ``leaf``, whose dimensions of size > 1 lie
    on the variable's ``axes`` (``None``: not known)."""

    leaf: int
    axes: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _OpOutput:
    """The variable is a view of the (pre-bias) output of linear op number ``op``, whose
    output-feature dimensions of size > 1 lie on the variable's ``axes`` (``None``: not
    known)."""

    op: int
    axes: tuple[int, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Scaled:
    """The variable derives from a product with the scale leaf ``leaf`` (a norm output)."""

    leaf: int


_Mark = _LeafView | _OpOutput | _Scaled


@dataclasses.dataclass(frozen=True)
class _Use:
    """One consumption of a leaf: its ``role``, the op ``kind`` for linear roles, the
    ``target`` it attaches to (the op for a bias, the scale leaf for a shift) and, for
    linear roles, the description ``op`` of the operation."""

    role: str
    kind: str = "other"
    target: int | None = None
    op: str = ""


@dataclasses.dataclass(frozen=True)
class _Op:
    """A linear operation site: its weight leaf and its number of output features."""

    kernel: int
    out_features: int


@dataclasses.dataclass
class _Group:
    """A layer under construction (``anchor`` is the kernel/scale/first leaf)."""

    kind: str
    anchor: int
    members: dict[int, str]
    uses: int
    ops: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- analysis
class _Analysis:
    """Walks a jaxpr once, propagating marks and recording each leaf's uses.

    The state (uses per leaf, linear op sites) lives on the instance, one instance per
    :func:`discover_layers` call.
    """

    def __init__(self, leaf_sizes: Sequence[int]):
        self.leaf_sizes = tuple(leaf_sizes)
        self.uses: dict[int, list[_Use]] = {i: [] for i in range(len(leaf_sizes))}
        self.ops: list[_Op] = []
        #: per op, the equations (outside views and calls) that read its pre-bias output
        self.op_reads: Counter[int] = Counter()

    # ------------------------------------------------------------------ walking
    def run(self, jaxpr: jex.Jaxpr) -> None:
        """Analyse a top-level jaxpr whose first inputs are the parameter leaves."""
        n = len(self.leaf_sizes)
        in_marks = [_LeafView(i, _significant(v.aval.shape)) for i, v in
                    zip(range(n), jaxpr.invars)] + [None] * (len(jaxpr.invars) - n)
        out_marks = self.visit(jaxpr, in_marks)
        self._other(out_marks)  # a leaf returned as (a view of) an output
        self._read(out_marks)

    def visit(self, jaxpr: jex.Jaxpr, in_marks: Sequence[_Mark | None]) -> list[_Mark | None]:
        """Analyse ``jaxpr`` whose inputs carry ``in_marks``; return its outputs' marks."""
        env: dict[Any, _Mark] = {v: m for v, m in zip(jaxpr.invars, in_marks) if m is not None}
        for eqn in jaxpr.eqns:
            marks = [_lookup(env, v) for v in eqn.invars]
            if not any(marks):
                continue
            for var, mark in zip(eqn.outvars, self._equation(eqn, marks)):
                if mark is not None:
                    env[var] = mark
        return [_lookup(env, v) for v in jaxpr.outvars]

    def _equation(self, eqn: jex.JaxprEqn, marks: list[_Mark | None]) -> list[_Mark | None]:
        """Record the uses made by one equation and return the marks of its results."""
        prim = eqn.primitive
        none = [None] * len(eqn.outvars)
        if prim in _VIEW_PRIMITIVES:
            return self._view(eqn, marks)
        if prim in _CALL_PRIMITIVES and (body := _call_body(eqn)) is not None:
            return self.visit(body, marks)
        self._read(marks)
        if prim is prims.scan_p:
            self._scan(eqn, marks)
        elif prim is prims.dot_general_p:
            return self._dot_general(eqn, marks)
        elif prim is prims.conv_general_dilated_p:
            return self._conv(eqn, marks)
        elif prim is prims.gather_p:
            self._gather(marks)
        elif prim in _ADD_PRIMITIVES:
            self._add(marks)
        elif prim is prims.mul_p:
            return [self._mul(marks)]
        elif prim in (prims.sub_p, prims.div_p):
            return [self._affine(marks, numerator_only=prim is prims.div_p)]
        else:
            self._other(marks)
        return none

    # ------------------------------------------------------------------ recording
    def _record(self, mark: _Mark | None, use: _Use) -> None:
        if isinstance(mark, _LeafView):
            self.uses[mark.leaf].append(use)

    def _other(self, marks: Sequence[_Mark | None]) -> None:
        """Every leaf view among ``marks`` is consumed in an unrecognised way."""
        for mark in marks:
            self._record(mark, _Use("other"))

    def _read(self, marks: Sequence[_Mark | None]) -> None:
        """Every op output among ``marks`` is read (by an equation that is no view)."""
        self.op_reads.update(m.op for m in marks if isinstance(m, _OpOutput))

    def _new_op(self, kind: str, leaf: int, out_features: int, op: str,
                feature_axes: tuple[int, ...]) -> list[_Mark | None]:
        self.ops.append(_Op(leaf, out_features))
        self.uses[leaf].append(_Use("kernel", kind, len(self.ops) - 1, op))
        return [_OpOutput(len(self.ops) - 1, feature_axes)]

    # ------------------------------------------------------------------ primitives
    def _view(self, eqn: jex.JaxprEqn, marks: list[_Mark | None]) -> list[_Mark | None]:
        """Views pass marks through (operand k -> result k, its ``axes`` followed; extra
        operands are "other")."""
        n = len(eqn.outvars)
        if len(marks) != n:
            self._other(marks[1:])
            self._read(marks[1:])
            n = 1
        out = [m if m is None or isinstance(m, _Scaled) or n > 1 else
               dataclasses.replace(m, axes=view_axes(eqn, m.axes)) for m in marks[:n]]
        return out + [None] * (len(eqn.outvars) - n)

    def _scan(self, eqn: jex.JaxprEqn, marks: list[_Mark | None]) -> None:
        """Map scan consts into the body; leaf views in the carry, xs or ys are "other"."""
        num_consts, _ = scan_counts(eqn)
        body = eqn.params["jaxpr"].jaxpr
        self._other(marks[num_consts:])
        inner = list(marks[:num_consts]) + [None] * (len(marks) - num_consts)
        self._other(self.visit(body, inner))

    def _dot_general(self, eqn: jex.JaxprEqn, marks: list[_Mark | None]) -> list[_Mark | None]:
        (contract, batch) = eqn.params["dimension_numbers"]
        leaves = [k for k, m in enumerate(marks) if isinstance(m, _LeafView)]
        if len(leaves) != 1 or batch[leaves[0]]:
            self._other(marks)
            return [None]
        w = leaves[0]
        shape = eqn.invars[w].aval.shape
        contracted = math.prod(shape[d] for d in contract[w])
        out_features = math.prod(shape) // max(contracted, 1)
        # the output is (batch dims, lhs free dims, rhs free dims)
        lhs_free = eqn.invars[0].aval.ndim - len(contract[0]) - len(batch[0])
        first = len(batch[0]) + (lhs_free if w == 1 else 0)
        free = [d for d in range(len(shape)) if d not in contract[w]]
        axes = tuple(first + k for k, d in enumerate(free) if shape[d] > 1)
        return self._new_op("dense", marks[w].leaf, out_features, "dot_general", axes)

    def _conv(self, eqn: jex.JaxprEqn, marks: list[_Mark | None]) -> list[_Mark | None]:
        lhs, rhs = marks[:2]
        if not isinstance(rhs, _LeafView) or isinstance(lhs, _LeafView):
            self._other(marks)
            return [None]
        numbers = eqn.params["dimension_numbers"]
        features = eqn.invars[1].aval.shape[numbers.rhs_spec[0]]
        return self._new_op("conv", rhs.leaf, features, describe_conv(eqn.params),
                            (numbers.out_spec[1],) if features > 1 else ())

    def _gather(self, marks: list[_Mark | None]) -> None:
        table, indices = marks[:2]
        if isinstance(table, _LeafView) and not isinstance(indices, _LeafView):
            self._record(table, _Use("table", "embedding", op="gather"))
        else:
            self._other(marks)

    def _add(self, marks: list[_Mark | None]) -> None:
        """Bias (after a linear op), shift (after a scale) or "other"; the sum is unmarked."""
        leaves = [k for k, m in enumerate(marks) if isinstance(m, _LeafView)]
        if len(leaves) != 1:
            self._other(marks)
            return
        leaf, base = marks[leaves[0]], marks[1 - leaves[0]]
        if isinstance(base, _OpOutput) and (
            self.ops[base.op].out_features == self.leaf_sizes[leaf.leaf]
            and base.axes is not None and leaf.axes == base.axes
        ):
            self._record(leaf, _Use("bias", target=base.op))
        elif isinstance(base, _Scaled):
            self._record(leaf, _Use("shift", target=base.leaf))
        else:
            self._record(leaf, _Use("other"))

    def _mul(self, marks: list[_Mark | None]) -> _Mark | None:
        """A product with one leaf view is a scale; products keep an existing scale mark."""
        leaves = [m for m in marks if isinstance(m, _LeafView)]
        if len(leaves) > 1:
            self._other(marks)
            return None
        if leaves:
            self._record(leaves[0], _Use("scale"))
            return _Scaled(leaves[0].leaf)
        return next((m for m in marks if isinstance(m, _Scaled)), None)

    def _affine(self, marks: list[_Mark | None], numerator_only: bool) -> _Mark | None:
        """``sub``/``div`` keep a scale mark (``div`` only from its numerator)."""
        if any(isinstance(m, _LeafView) for m in marks):
            self._other(marks)
            return None
        candidates = marks[:1] if numerator_only else marks
        return next((m for m in candidates if isinstance(m, _Scaled)), None)


def _significant(shape: Sequence[int]) -> tuple[int, ...]:
    """The dimensions of ``shape`` of size > 1."""
    return tuple(d for d, size in enumerate(shape) if size > 1)


def view_axes(eqn: jex.JaxprEqn, axes: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Where the dimensions ``axes`` of a view equation's operand lie in its result
    (``None`` when the view mixes one of them with other dimensions, or reverses it)."""
    if axes is None:
        return None
    prim, params = eqn.primitive, eqn.params
    if prim is prims.transpose_p:
        return tuple(params["permutation"].index(a) for a in axes)
    if prim is prims.broadcast_in_dim_p:
        return tuple(params["broadcast_dimensions"][a] for a in axes)
    if prim is prims.squeeze_p:
        return tuple(a - sum(d < a for d in params["dimensions"]) for a in axes)
    if prim is prims.rev_p:
        return None if set(axes) & set(params["dimensions"]) else axes
    if prim is prims.reshape_p:
        if params.get("dimensions") is not None:
            return None
        before, after = eqn.invars[0].aval.shape, eqn.outvars[0].aval.shape
        # dimension a is kept if some result dimension has its size and its stride
        kept = {(math.prod(after[:j]), after[j]): j for j in range(len(after))}
        found = [kept.get((math.prod(before[:a]), before[a])) for a in axes]
        return None if None in found else tuple(found)
    return axes  # casts, copies, placement: the same array


def describe_conv(params: dict) -> str:
    """``conv_general_dilated``, with its group count when grouped (depthwise, ...): a
    grouped convolution's kernel gradient is not one outer product ``Σ_t g aᵀ``."""
    groups = [f"{name}={params[name]}" for name in ("feature_group_count", "batch_group_count")
              if params[name] > 1]
    return "conv_general_dilated" + (f" with {', '.join(groups)}" if groups else "")


def _lookup(env: dict[Any, _Mark], var: Any) -> _Mark | None:
    """The mark of an equation operand (literals carry none)."""
    return None if isinstance(var, jex.Literal) else env.get(var)


def _call_body(eqn: jex.JaxprEqn) -> jex.Jaxpr | None:
    """The single sub-jaxpr of a call-like equation, if its signature matches the call."""
    bodies = list(jex.jaxprs_in_params(eqn.params))
    if len(bodies) != 1:
        return None
    body = bodies[0]
    if len(body.invars) != len(eqn.invars) or len(body.outvars) != len(eqn.outvars):
        return None
    return body


def bind(eqn: jex.JaxprEqn, invals: list, params: dict | None = None) -> list:
    """``eqn``'s primitive applied to ``invals`` with ``params`` (default: the equation's):
    its outputs, as a list."""
    params = eqn.params if params is None else params
    out = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(params))
    return out if eqn.primitive.multiple_results else [out]


def closed_body(eqn: jex.JaxprEqn) -> tuple[jex.Jaxpr | None, list]:
    """The sub-jaxpr of a call-like equation (:func:`_call_body`) and its constants."""
    body = _call_body(eqn)
    for value in eqn.params.values():
        if isinstance(value, jex.ClosedJaxpr) and value.jaxpr is body:
            return body, list(value.consts)
    return body, []


def scan_counts(eqn: jex.JaxprEqn) -> tuple[int, int]:
    """``(num_consts, num_carry)`` of a ``scan`` equation: its operands are the consts, the
    initial carry and the ``xs``, in that order. JAX < 0.11 names the counts in the
    equation's params; later releases group the operands in a flat tree ``ft_in``."""
    if "num_consts" in eqn.params:
        return eqn.params["num_consts"], eqn.params["num_carry"]
    consts, carry, _ = eqn.params["ft_in"].update(list(range(len(eqn.invars)))).unpack()
    return len(list(consts)), len(list(carry))


# ----------------------------------------------------------------------------- resolution
def _resolve(analysis: _Analysis) -> list[_Group]:
    """Turn per-leaf uses into layers (see the module docstring, step 3)."""
    uses = analysis.uses
    groups: dict[int, _Group] = {}  # anchor leaf -> group
    for leaf, leaf_uses in uses.items():
        roles = {u.role for u in leaf_uses}
        if leaf_uses and roles <= set(_LINEAR_ROLES):
            first = leaf_uses[0]  # a tied embedding: the gather comes first
            groups[leaf] = _Group(first.kind, leaf, {leaf: first.role}, len(leaf_uses),
                                  tuple(u.op for u in leaf_uses))
        elif roles == {"scale"}:
            groups[leaf] = _Group("norm", leaf, {leaf: "scale"}, len(leaf_uses))

    # Attachments: candidate bias/shift leaves per anchor; only a unique one joins.
    attach: dict[int, list[tuple[int, str]]] = {}
    for leaf, leaf_uses in uses.items():
        roles = {u.role for u in leaf_uses}
        if roles == {"bias"}:
            if any(analysis.op_reads[u.target] != 1 for u in leaf_uses):
                continue  # the pre-bias output is read elsewhere too: not its gradient
            anchors = {analysis.ops[u.target].kernel for u in leaf_uses}
        elif roles == {"shift"}:
            anchors = {u.target for u in leaf_uses}
        else:
            continue
        (role,) = roles
        anchor = anchors.pop() if len(anchors) == 1 else None
        # a bias joins a linear layer, a shift joins a norm layer
        if anchor in groups and (groups[anchor].kind == "norm") == (role == "shift"):
            attach.setdefault(anchor, []).append((leaf, role))
    for anchor, candidates in attach.items():
        if len(candidates) == 1:
            leaf, role = candidates[0]
            groups[anchor].members[leaf] = role

    claimed = {leaf for g in groups.values() for leaf in g.members}
    for leaf, leaf_uses in uses.items():
        if leaf not in claimed:
            groups[leaf] = _Group("other", leaf, {leaf: "param"}, len(leaf_uses))
    return list(groups.values())


def _parent(path: str) -> list[str]:
    return path.split("/")[:-1]


def _layer_ids(groups: Sequence[_Group], paths: Sequence[str]) -> list[str]:
    """Common parent path of each layer's leaves; the anchor's full path when that is
    empty or ambiguous; ``path#anchor`` as a last resort for pathological key names."""
    candidates = []
    for group in groups:
        parents = [_parent(paths[i]) for i in group.members]
        common = []
        for parts in zip(*parents):
            if len(set(parts)) != 1:
                break
            common.append(parts[0])
        candidates.append("/".join(common))
    counts = Counter(candidates)
    ids, seen = [], set()
    for group, cand in zip(groups, candidates):
        layer_id = cand if cand and counts[cand] == 1 else paths[group.anchor]
        if layer_id in seen:
            layer_id = f"{layer_id}#{group.anchor}"
        seen.add(layer_id)
        ids.append(layer_id)
    return ids


# ----------------------------------------------------------------------------- entry point
def discover_layers(
    fn: Callable[..., Any], params: Any, args: Sequence[Any], paths: Sequence[str]
) -> tuple[Layer, ...]:
    """Partition the leaves of ``params`` into the layers that ``fn(params, *args)`` uses.

    Args:
      fn: the model, called as ``fn(params, *args)``; traced once with
        :func:`jax.make_jaxpr`, never executed.
      params: the parameter pytree; leaf ``i`` is ``jax.tree_util.tree_leaves(params)[i]``.
      args: example inputs (only shapes and dtypes matter; one example is enough).
      paths: the ``a/b/c`` path of each leaf, used to name layers.

    Returns:
      One :class:`~jaxgeom.layers.Layer` per layer, covering every leaf exactly once,
      with ``leaves`` ascending and ``roles`` aligned with them (order of the tuple is
      unspecified).
    """
    num_leaves = len(jax.tree_util.tree_leaves(params))
    if num_leaves != len(paths):
        raise ValueError(f"got {len(paths)} paths for {num_leaves} parameter leaves")
    jaxpr = jax.make_jaxpr(fn)(params, *args).jaxpr
    analysis = _Analysis([math.prod(v.aval.shape) for v in jaxpr.invars[:num_leaves]])
    analysis.run(jaxpr)

    groups = _resolve(analysis)
    layers = []
    for group, layer_id in zip(groups, _layer_ids(groups, paths)):
        members = sorted(group.members.items())
        layers.append(
            Layer(
                id=layer_id,
                kind=group.kind,
                leaves=tuple(leaf for leaf, _ in members),
                roles=tuple(role for _, role in members),
                uses=group.uses,
                ops=group.ops,
            )
        )
    return tuple(layers)
