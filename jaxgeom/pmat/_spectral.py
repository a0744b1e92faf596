"""Matrix functions through eigenvalues, shared by every representation with a spectrum."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from jaxgeom import _host_lapack
from jaxgeom._compile import factorisation_jit
from jaxgeom._lapack import host_call_side_by_side
from jaxgeom._reporting import called_operation, warn_if_singular

#: the part of a matrix whose eigenvalues are checked, innermost last (:func:`of_part`)
_PART = contextvars.ContextVar("jaxgeom_spectral_part", default=())


@contextlib.contextmanager
def of_part(description: str) -> Iterator[None]:
    """Inside, the refusals of eigenvalues (:func:`power`'s) name them as those of
    ``description`` of the matrix (``"layer 'fc1'"``, then ``"factor A"``: "its factor A
    of layer 'fc1'"), not as all of the matrix's: a block-diagonal or Kronecker matrix
    decomposes its parts apart."""
    token = _PART.set((*_PART.get(), description))
    try:
        yield
    finally:
        _PART.reset(token)


def each_part(descriptions: Sequence[str], fn: Callable, parts: Sequence) -> tuple:
    """``fn`` of each of ``parts`` (a block-diagonal's blocks, the Kronecker layers), a
    refusal of its eigenvalues naming it by its description (:func:`of_part`)."""
    out = []
    for description, part in zip(descriptions, parts):
        with of_part(description):
            out.append(fn(part))
    return tuple(out)


def _eigenvalues(count: int) -> str:
    """``"its 27 eigenvalues"``, or those of the part under way (:func:`of_part`)."""
    parts = _PART.get()
    return (f"its {count} eigenvalues" if not parts else
            f"the {count} eigenvalues of its {' of '.join(reversed(parts))}")


def is_integer(p) -> bool:
    """Whether ``p`` is known to be an integer: a concrete real scalar of integer value
    (Python, NumPy or JAX). A traced ``p`` is not known to be one."""
    if isinstance(p, numbers.Integral):
        return True
    if isinstance(p, jax.core.Tracer):
        return False
    try:
        value = np.asarray(p)
    except (TypeError, ValueError):
        return False
    return (value.shape == () and np.issubdtype(value.dtype, np.number)
            and np.isreal(value) and float(np.real(value)).is_integer())


def is_concrete_zero(x: Any) -> bool:
    """Whether the scalar ``x`` is concretely zero (a Python number or an array, NumPy's
    or JAX's); a traced value cannot be checked and is not."""
    try:
        return bool(x == 0)
    except jax.errors.ConcretizationTypeError:
        return False


def power(values: jax.Array, p, regul=0.0, multiplicity: int = 1) -> jax.Array:
    """``(λ + regul)^p`` of eigenvalues; for non-integer ``p`` the matrix is taken PSD
    and negative round-off eigenvalues are clipped to 0 (a traced ``p`` is checked on
    the device: an integer value keeps the signs); concrete eigenvalues below ``0`` by
    more than round-off are a ``ValueError`` (:func:`check_nonnegative`).

    A negative power of a singular matrix is infinite on its null space: called with
    concrete values, ``p < 0`` where some ``λ + regul`` is 0 (``≤ 0`` for a non-integer
    ``p``) raises a ``ValueError`` with the fixes (under ``jit`` the result is non-finite
    there). ``multiplicity``: how many eigenvalues each value stands for (a scaled
    identity's one value: ``d``), for the messages' counts."""
    shifted = values + regul
    if is_integer(p):
        _check_invertible(shifted, p, multiplicity=multiplicity)
        return shifted ** int(np.real(np.asarray(p)))
    # first: a negative eigenvalue is not a singular one
    check_nonnegative(shifted, p, multiplicity)
    _check_invertible(shifted, p, multiplicity=multiplicity)
    clipped = jnp.maximum(shifted, 0)
    if isinstance(p, jax.core.Tracer):
        # one power of a base chosen first: a power of the unclipped values taken apart
        # (NaN at negative round-off) gave NaN derivatives through the branch not taken
        return jnp.where(p == jnp.round(p), shifted, clipped) ** p
    return clipped ** p


def shifted_power(values: jax.Array, regul=0.0, *, p) -> jax.Array:
    """:func:`power` of eigenvalues from a factorisation (``eigh``), with ``regul`` second:
    ``f(λ, regul)`` for :func:`spectral_functions` (``p`` bound, static). Those of a
    singular matrix are round-off, not zeros: a negative power of them warns
    (:func:`warn_if_singular_power`)."""
    result = power(values, p, regul)
    warn_if_singular_power(values + regul, p)
    return result


def check_nonnegative(shifted: jax.Array, p, multiplicity: int = 1) -> None:
    """Refuse a fractional power of a matrix with an eigenvalue (+ regul) below ``0`` by
    more than round-off (``max(√eps, n·eps) · max|λ|``), when the values are concrete: clipped to
    ``0``, it would answer the power of another matrix (an indefinite Hessian's)."""
    if any(isinstance(x, jax.core.Tracer) for x in (shifted, p)) or not shifted.size:
        return
    values = np.asarray(shifted)
    eps = np.finfo(values.dtype).eps  # round-off of a large float32 matrix's eigh: ~ n·eps
    tol = max(np.sqrt(eps), values.size * eps) * np.max(np.abs(values))
    negative = values < -tol
    if negative.any():
        raise ValueError(
            f"pow({np.real(p):g}) of an indefinite matrix: {int(negative.sum()) * multiplicity} "
            f"of {_eigenvalues(values.size * multiplicity)} (+ regul) are negative (the smallest "
            f"{values.min():.3g}), where a fractional power is not real (e.g. a Hessian "
            "away from a minimum). Shift it (pow(p, regul) with regul ≥ −λ_min), or apply "
            "the power to |λ| from eigh()")


def warn_if_singular_power(shifted: jax.Array | Sequence[jax.Array], p) -> None:
    """A negative power of eigenvalues (``+ regul``; a sequence: the blocks of one matrix)
    singular to working precision (not exactly: :func:`_check_invertible`) warns
    (:func:`jaxgeom._reporting.warn_if_singular`)."""
    if isinstance(p, jax.core.Tracer):
        return
    value = np.asarray(p)  # on the host: jnp operations on a concrete p inside a trace trace
    if np.isreal(value) and np.real(value) < 0:
        warn_if_singular(shifted, f"pow({np.real(value):g})")


def _check_invertible(shifted: jax.Array, p, operation: str | None = None,
                      multiplicity: int = 1) -> None:
    """Refuse ``p < 0`` where some ``λ + regul`` is 0 (``p`` an integer) or ``≤ 0`` (else:
    clipped to 0 as round-off), when the values are concrete; ``operation="solve"``: a solve
    with these eigenvalues (``p = -1``)."""
    if any(isinstance(x, jax.core.Tracer) for x in (shifted, p)) or not np.isreal(p) or (
            np.real(p) >= 0):
        return
    values = np.asarray(shifted)
    singular = int(np.sum(values == 0 if is_integer(p) else values <= 0)) * multiplicity
    if singular:
        operation = operation or called_operation() or f"pow({np.real(p):g})"
        fix = {"solve": "Damp it (solve(v, regul) with regul > 0), or solve on its range: "
                        "M.pinv().mv(v)",
               "inv": "Damp it (inv(regul) with regul > 0), or take the pseudo-inverse on "
                      "its range: M.pinv()"}.get(
            operation, "Damp it (pow(p, regul) with regul > 0: (M + regul·I)^p), or take "
                       "the pseudo-power on its range: M.pinv().pow(-p)")
        raise ValueError(
            f"{operation} of a singular matrix: {singular} of "
            f"{_eigenvalues(values.size * multiplicity)} (+ regul) are "
            f"{'0' if is_integer(p) else '≤ 0 (0 up to round-off)'}, where a negative power "
            f"is infinite. {fix}")


def check_solvable(values: jax.Array) -> None:
    """Refuse an undamped solve by eigenvalues ``values`` of which one is (concretely) 0."""
    _check_invertible(values, -1, "solve")


def pinv(values: jax.Array, atol=None, rtol=None) -> jax.Array:
    """``1/λ`` for ``|λ| > max(atol, rtol·max|λ|)``, else 0.

    Defaults follow the Array API (``numpy.linalg.pinv(rtol=None)``, ``jnp.linalg.pinv``;
    not NumPy's legacy ``rcond=1e-15``): ``rtol = n·eps`` when ``atol`` is not given.
    """
    scale = jnp.max(jnp.abs(values)) if values.size else 0.0
    if rtol is None:
        rtol = 0.0 if atol is not None else values.size * jnp.finfo(values.dtype).eps
    threshold = jnp.maximum(0.0 if atol is None else atol, rtol * scale)
    keep = jnp.abs(values) > threshold
    return jnp.where(keep, 1 / jnp.where(keep, values, 1), 0)


def slogdet(values: jax.Array, regul=0.0) -> tuple[jax.Array, jax.Array]:
    """``(sign, log|det|)`` of ``M + regul·I`` from the eigenvalues ``λ`` of ``M``:
    ``sign = Π sign(λᵢ + regul)``, ``log|det| = Σ log|λᵢ + regul|`` (``numpy.linalg.slogdet``'s
    convention: a zero eigenvalue gives ``(0, -inf)``). ``values``: ``(..., n)``."""
    shifted = values + regul
    return jnp.prod(jnp.sign(shifted), axis=-1), jnp.sum(jnp.log(jnp.abs(shifted)), axis=-1)


def warn_if_round_off(shifted: jax.Array, operation: str) -> None:
    """:func:`~jaxgeom._reporting.warn_if_singular` of eigenvalues ``+ regul`` (``(..., n)``)
    that came out of a factorisation, their exact zeros left out (the log-determinant of a
    matrix with an exact zero eigenvalue is exactly ``-inf``): a nonzero one below
    ``10·ε`` times the largest is round-off (``±n·ε·‖M‖``), and so is its logarithm."""
    magnitudes = jnp.abs(shifted)
    largest = jnp.max(magnitudes, axis=-1, keepdims=True)
    warn_if_singular(jnp.where(magnitudes == 0, largest, magnitudes), operation)


def logdet(sign: jax.Array, logabsdet: jax.Array) -> jax.Array:
    """``log det`` from :func:`slogdet`: ``log|det|`` for ``sign > 0``, ``-inf`` for a
    singular matrix (``log|det|`` is then ``-inf``), NaN for a negative determinant
    (``torch.logdet``'s convention), and so are its derivatives (a product with the mask,
    not a ``where``, whose NaN branch would have a zero derivative)."""
    return logabsdet * jnp.where(sign < 0, jnp.nan, 1.0).astype(logabsdet.dtype)


def trace(m: jax.Array) -> jax.Array:
    """``Σᵢ mᵢᵢ`` of a square matrix (the sum of its eigenvalues): its diagonal, a strided
    slice, summed (:func:`traces`).

    ``jnp.trace`` compiles on XLA:CPU to a masked pass over the whole matrix, page-faulting
    through a mask as large as ``m`` (a 4097² factor: 43 ms); the diagonal alone costs 0.2 ms.
    """
    return traces([m])[0]


#: the padding a group of arrays in :func:`sums` may carry beyond its own entries
#: (entries; or as many as it has, when more): a padded entry costs a compare and a select
#: in the group's one kernel, a group more a kernel of its own (≈ 10 µs on XLA:CPU)
TRACE_PADDING = 4096

#: arrays of more entries are summed by a reduction of their own in :func:`sums`, which
#: XLA:CPU shares among the cores (a variadic one runs on one, its lanes in sequence)
SMALL_SUM = 1 << 16


def diagonal(m: jax.Array) -> jax.Array:
    """The diagonal of a square matrix as a strided slice of its flattened entries (read
    in place by a reduction it is fused into)."""
    return jax.lax.slice(m.reshape(-1), (0,), (m.size,), (m.shape[0] + 1,))


def traces(matrices: list[jax.Array]) -> jax.Array:
    """The ``(L,)`` traces of ``L`` square matrices: the :func:`sums` of their diagonals
    (one kernel for the diagonals of an MLP's KFAC factors: bench_mlp's six, 10 to 785
    entries, ≈ 25 µs, 55 µs as one reduce of the concatenated rows and a segment sum, six
    kernels, 110 µs as a sum per matrix). Cost ``Σ nᵢ`` reads, plus the padding."""
    return sums([diagonal(m) for m in matrices])


def sums(arrays: list[jax.Array]) -> jax.Array:
    """The ``(L,)`` sums of ``L`` arrays of any shapes, in as few kernels as is fast.

    Arrays of up to :data:`SMALL_SUM` entries are grouped by size, largest first, a group
    taking the next one while its padding to the group's largest stays within
    :data:`TRACE_PADDING` entries (or its own count); each group is one variadic
    ``lax.reduce`` of its zero-padded, flattened arrays, whatever produced them (a strided
    diagonal, a square) fused into it. On XLA:CPU a kernel costs ≈ 10 µs of dispatch,
    against ≈ 1 ns an entry. A larger array is summed by a reduction of its own. The sum
    is sequential within a small array (float32: ``≈ √n ε`` relative, ``n ε`` at worst,
    for entries of one sign).
    """
    if not arrays:
        return jnp.zeros((0,))
    dtype = jnp.result_type(*arrays)  # one precision per reduction
    flat = [a.reshape(-1).astype(dtype) for a in arrays]
    out: list = [None] * len(arrays)
    small = [i for i, a in enumerate(flat) if a.size <= SMALL_SUM]
    for i, a in enumerate(flat):
        if a.size > SMALL_SUM:
            out[i] = jnp.sum(a)
    for group in _padding_groups([flat[i].size for i in small]):
        group = [small[j] for j in group]
        length = flat[group[0]].size
        totals = _sums([jnp.pad(flat[i], (0, length - flat[i].size)) for i in group])
        for i, total in zip(group, totals):
            out[i] = total
    return jnp.stack(out)


def _padding_groups(lengths: list[int]) -> list[list[int]]:
    """Indices of ``lengths`` in groups, longest first, each padded to its first's length
    with at most :data:`TRACE_PADDING` entries or as many as it has."""
    groups: list[list[int]] = []
    entries = 0
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups:
            padded = (len(groups[-1]) + 1) * lengths[groups[-1][0]]
            if padded - entries - lengths[i] <= max(TRACE_PADDING, entries + lengths[i]):
                groups[-1].append(i)
                entries += lengths[i]
                continue
        groups.append([i])
        entries = lengths[i]
    return groups


@jax.custom_jvp
def _sums(vectors: list[jax.Array]) -> list[jax.Array]:
    """The sums of equally long vectors in one variadic reduction (one kernel)."""
    zeros = [jnp.zeros((), v.dtype) for v in vectors]
    return list(jax.lax.reduce(vectors, zeros, _add_each, (0,)))


def _add_each(a: tuple, b: tuple) -> tuple:
    """The reducer of :func:`_sums`: one function for every call, so that JAX traces it
    once per operands' types (a new ``lambda`` at each call was a new reduction, compiled
    anew at every eager call of a ``grad`` or ``vmap`` of a trace)."""
    return tuple(x + y for x, y in zip(a, b))


@_sums.defjvp
def _sums_jvp(primals, tangents):
    # linear: the tangents summed one by one (``lax.reduce`` of several operands has no
    # derivative rule that takes symbolic zeros, and no transpose)
    (vectors,), (dvectors,) = primals, tangents
    return _sums(vectors), [jnp.sum(t) for t in dvectors]


@jax.custom_jvp
def eigh(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(λ, V)`` of symmetric matrices ``m`` (``(..., n, n)``), as ``jnp.linalg.eigh``
    (ascending, eigenvectors in the columns), with a derivative that stays right where
    eigenvalues repeat or nearly do.

    Derivative (first-order perturbation theory): with ``E = Vᵀ Ṁ V`` **symmetrised**,
    ``λ̇ = diag(E)`` and ``V̇ = V (F ∘ E)``, ``Fᵢⱼ = 1 / (λⱼ − λᵢ)``, and ``Fᵢⱼ = 0`` where
    ``|λⱼ − λᵢ| ≤ ε max|λ|`` (tied to working precision).

    - ``jnp.linalg.eigh``'s own derivative leaves ``E`` as computed, whose round-off
      asymmetry ``Eᵢⱼ − Eⱼᵢ`` (``≈ ε‖Ṁ‖``) it multiplies by ``1/(λⱼ − λᵢ)``: over the
      near-zero eigenvalues of a rank-deficient PSD matrix (a Kronecker factor summed
      from fewer rows than its order, ``Σ xxᵀ`` of a batch narrower than the layer),
      ``F ∘ E`` is then no longer antisymmetric, and ``V f(Λ) Vᵀ`` differentiated through
      it was off by tens of percent (the gradient of ``vᵀ(A ⊗ G + λI)⁻¹v`` through a KFAC
      built on 3 examples, of an NTK's ``eigh`` solve with ``K N > d``). Symmetric, the
      pairs' terms cancel as in exact arithmetic: ``Fᵢⱼ Eᵢⱼ (f(λᵢ) − f(λⱼ))``.
    - Exactly repeated eigenvalues (a constant factor ``G = c I``, a regression layer's)
      gave ``∞ · 0 = NaN``. There, ``V``'s basis of the eigenspace is arbitrary, and
      ``F = 0`` keeps it: exact whenever ``Ṁ`` does not split the eigenvalue
      (``Eᵢⱼ = 0`` within it: a constant or ``c(θ) I`` factor, the null space of a Gram
      factor ``Σ xxᵀ``, where ``qᵢᵀ(ẋxᵀ + xẋᵀ)qⱼ = 0``). Where ``Ṁ`` splits it the
      eigenvectors are not differentiable at all; a function of the matrix still is —
      differentiate it on the matrix (:func:`spectral_functions`, a solve), not through
      its eigenvectors.

    Cost: ``eigh``'s, plus three ``n³`` products for a tangent.
    """
    return tuple(jnp.linalg.eigh(m))


@eigh.defjvp
def _eigh_jvp(primals, tangents):
    (m,), (dm,) = primals, tangents
    pair = tuple(jnp.linalg.eigh(m))
    return pair, _eigh_tangents(*pair, dm)


def _eigh_tangents(w: jax.Array, v: jax.Array, dm: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(λ̇, V̇)`` of an eigendecomposition ``m = V diag(λ) Vᵀ`` (any: LAPACK's, a
    sketch's) in the direction ``dm``, as :func:`eigh`'s derivative."""
    inner = jnp.swapaxes(v, -1, -2) @ dm @ v
    inner = (inner + jnp.swapaxes(inner, -1, -2)) / 2
    gap = w[..., None, :] - w[..., :, None]  # λⱼ − λᵢ at [i, j]
    scale = jnp.max(jnp.abs(w), axis=-1, keepdims=True)[..., None]
    tied = jnp.abs(gap) <= jnp.finfo(w.dtype).eps * scale
    f = jnp.where(tied, 0, 1 / jnp.where(tied, 1, gap))
    return jnp.diagonal(inner, axis1=-2, axis2=-1), v @ (f * inner)


def reconstruct(evals: jax.Array, evecs: jax.Array) -> jax.Array:
    """``V diag(λ) Vᵀ`` for the columns ``V`` of ``evecs``."""
    return (evecs * evals) @ evecs.T


def spectral_functions(f: Callable[..., jax.Array], matrices: Sequence[jax.Array], *args: Any
                       ) -> tuple[jax.Array, ...]:
    """``f`` of symmetric matrices through their eigenvalues: ``V diag(f(λ)) Vᵀ`` for each
    ``M = V diag(λ) Vᵀ`` of ``matrices`` (``eigh``), ``f(λ, *args)`` applied to all their
    eigenvalues at once (elementwise, but for a threshold it may take from all of them:
    :func:`pinv`'s). Cost: each matrix's ``eigh`` and one product, ``n³``.

    Derivative (Daleckii–Krein): ``d f(M)[E] = V (Φ ∘ Vᵀ E V) Vᵀ`` with the divided
    differences ``Φᵢⱼ = (f(λᵢ) − f(λⱼ)) / (λᵢ − λⱼ)``, taken as ``(f′(λᵢ) + f′(λⱼ)) / 2``
    where that is the more accurate (:func:`_divided_differences`: repeated and nearly
    repeated eigenvalues), plus ``∂f/∂args``. Through ``eigh``'s own derivative, whose
    eigenvector part has ``1/(λⱼ − λᵢ)``, repeated eigenvalues — a singular Fisher's null
    space, a Kronecker factor's ties — gave NaN or gradients off by their size; ``Φ`` is
    finite wherever ``f`` is differentiable. ``f`` may close over values, concrete (a
    power ``p``) or traced (a ``p`` or a threshold under ``grad``: hoisted into ``args`` by
    ``jax.closure_convert``, where a ``custom_jvp``'s function may not hold a tracer).
    """
    matrices = tuple(matrices)
    values = jax.ShapeDtypeStruct((sum(m.shape[-1] for m in matrices),),
                                  jnp.result_type(*matrices))
    converted, hoisted = jax.closure_convert(f, values, *args)
    if hoisted:  # f itself keeps its checks of concrete values (none apply to tracers)
        return _spectral_functions(converted, matrices, (*args, *hoisted))
    return _spectral_functions(f, matrices, args)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _spectral_functions(f, matrices, args):
    pairs = [jnp.linalg.eigh(m) for m in matrices]
    images = _split_like(f(jnp.concatenate([w for w, _ in pairs]), *args), pairs)
    return tuple(reconstruct(fw, v) for fw, (_, v) in zip(images, pairs))


def _spectral_functions_jvp(f, primals, tangents):
    """Tangents that are symbolic zeros (a matrix or an argument not differentiated) add
    no term: ``Φ`` is infinite where ``f`` is not differentiable (``λ^p`` at ``λ = 0``,
    ``p < 1``), and ``∞ · 0`` made a derivative with respect to ``p`` alone NaN."""
    (matrices, args), (d_matrices, d_args) = primals, tangents
    pairs = [jnp.linalg.eigh(m) for m in matrices]
    values = jnp.concatenate([w for w, _ in pairs])
    d_args = tuple(_instantiated(t) for t in d_args)
    images, d_images = jax.jvp(lambda *a: f(values, *a), args, d_args)
    slopes = jax.jvp(lambda x: f(x, *args), (values,), (jnp.ones_like(values),))[1]
    out, d_out = [], []
    for (w, v), fw, dfw, sw, dm in zip(pairs, *(_split_like(x, pairs)
                                                for x in (images, d_images, slopes)),
                                       d_matrices):
        inner = jnp.diag(dfw)
        if not isinstance(dm, SymbolicZero):
            inner = inner + _divided_differences(w, fw, sw) * (v.T @ ((dm + dm.T) / 2) @ v)
        out.append(reconstruct(fw, v))
        d_out.append(v @ inner @ v.T)
    return tuple(out), tuple(d_out)


_spectral_functions.defjvp(_spectral_functions_jvp, symbolic_zeros=True)


def _instantiated(tangent: Any) -> Any:
    """A tangent, a symbolic zero made an array of zeros."""
    if isinstance(tangent, SymbolicZero):
        return jnp.zeros(tangent.shape, tangent.dtype)
    return tangent


def _split_like(x: jax.Array, pairs: list) -> list[jax.Array]:
    """``x`` split as the concatenated eigenvalues of ``pairs``."""
    return jnp.split(x, np.cumsum([w.shape[0] for w, _ in pairs])[:-1])


def _divided_differences(w, fw, slopes):
    """``(f(λᵢ) − f(λⱼ)) / (λᵢ − λⱼ)`` (the secant, rounding error ``≈ ε (|fᵢ| + |fⱼ|) /
    |λᵢ − λⱼ|``) or ``(f′(λᵢ) + f′(λⱼ)) / 2`` (the mean of the tangents, error at most
    ``|f′(λᵢ) − f′(λⱼ)| / 2`` where ``f′`` is monotone between them), whichever error is
    smaller: the tangents for repeated and nearly repeated eigenvalues."""
    gap = w[:, None] - w[None, :]
    tied = gap == 0
    secant = (fw[:, None] - fw[None, :]) / jnp.where(tied, 1, gap)
    secant_error = (jnp.finfo(w.dtype).eps * (jnp.abs(fw[:, None]) + jnp.abs(fw[None, :]))
                    / jnp.where(tied, 0, jnp.abs(gap)))
    tangent = (slopes[:, None] + slopes[None, :]) / 2
    tangent_error = jnp.abs(slopes[:, None] - slopes[None, :]) / 2
    return jnp.where(tied | (tangent_error <= secant_error), tangent, secant)


#: columns of :func:`eigh_psd`'s sketch beyond the rank bound (a margin for round-off), and
#: the multiple its width is rounded up to (fewer distinct shapes to compile)
SKETCH_MARGIN, SKETCH_ROUND = 8, 32


def sketch_width(order: int, rank_bound: int | None) -> int | None:
    """The width ``k`` of :func:`eigh_psd`'s range sketch for a PSD matrix of ``order``
    with rank at most ``rank_bound``: ``rank_bound`` plus :data:`SKETCH_MARGIN`, rounded up
    to :data:`SKETCH_ROUND`. ``None`` (a full ``eigh``) when no bound is known or ``4 k >
    order``: the sketch then costs about as much as ``eigh`` (2-core Xeon: 785² of rank
    512, 79 against 27 ms; 512² of rank 120, 12 against 16 ms)."""
    if rank_bound is None:
        return None
    k = -(-(rank_bound + SKETCH_MARGIN) // SKETCH_ROUND) * SKETCH_ROUND
    return k if 4 * k <= order else None


#: the largest share of its order a factor's rank bound may be for a full ``eigh``'s range
#: to be told apart (:func:`range_width`): below it, products on the range columns alone
#: save a quarter or more of the rotations (bench_mlp's 785-input layer seen on 512
#: examples: its EKFAC quadratic form 4.0 → 3.2 ms)
RANGE_SHARE = 0.75


def range_width(order: int, rank_bound: int | None) -> int | None:
    """How many of :func:`eigh_psd`'s eigenvectors (the last ones) span the range of a PSD
    matrix of ``order`` with rank at most ``rank_bound``: the sketch's width
    (:func:`sketch_width`), or with a full ``eigh`` the bound itself when it is at most
    :data:`RANGE_SHARE` of the order; else ``None`` (no useful split)."""
    if rank_bound is None:
        return None
    k = sketch_width(order, rank_bound)
    if k is not None:
        return k
    return rank_bound if rank_bound <= RANGE_SHARE * order else None


def useful_rank_bound(order: int, rows: int) -> int | None:
    """A bound on the rank of a Gram matrix of ``order`` summed from ``rows`` rows, where
    it makes :func:`eigh_psd` cheaper or its range a useful split (:func:`range_width`;
    else ``None``): with a sketch, the largest bound of ``rows``'s sketch width (fewer
    distinct static bounds, fewer compilations)."""
    k = sketch_width(order, rows)
    return range_width(order, rows) if k is None else k - SKETCH_MARGIN


def eigh_psd(m: jax.Array, rank_bound: int | None = None, *, checked: bool = False
             ) -> tuple[jax.Array, jax.Array]:
    """``(λ, V)``: the eigendecomposition of a symmetric PSD ``m`` (``n × n``), eigenvectors
    in the columns.

    With a ``rank_bound`` ``r`` that makes it cheaper (:func:`sketch_width` ``k``), through
    ``m``'s range instead of a full ``eigh``: a Gram factor ``Σ xxᵀ`` of ``r ≪ n`` rows
    (KFAC's input factor of a wide dense layer seen on few examples) has rank at most
    ``r``. The range is sketched exactly (Halko, Martinsson & Tropp 2011, Alg. 4.1, with no
    power iteration: ``rank(m) ≤ k``):

    - ``Q = qr(m Ω)``, ``Ω`` a fixed ``(n, k)`` Gaussian (the same in every call), then
      Rayleigh–Ritz: ``Qᵀ m Q = W Λ Wᵀ``, ``U = Q W`` — ``m``'s eigenpairs on its range;
    - the complement, eigenvalue 0: the last ``n − k`` columns of the Householder
      completion ``H = I − Y T Yᵀ`` of ``U`` (``qr(U)``'s reflectors ``Y`` and their
      compact-WY ``T``, Schreiber & Van Loan 1989).

    Eigenvalues ascending as ``eigh``'s (zeros first) up to round-off; the null space's
    basis is arbitrary either way. Where a full ``eigh`` runs but the bound still splits
    the range off (:func:`range_width`), the first ``n − r`` eigenvalues are set to
    exactly 0 too (LAPACK leaves round-off there).

    ``checked``: the bound is a hint, not a promise (e.g. on a KFAC build whose factors
    may since have been averaged or summed): the sketch's result is kept only if it found
    the whole range — its Ritz pairs invariant, ``‖m U − U Λ‖_F ≤ τ ‖m‖_F``, and the trace
    left off it ``tr(m) − Σ λ ≤ τ tr(m)``, ``τ = √eps`` — else LAPACK's full ``eigh`` runs
    (``lax.cond``: one or the other). No eigenvalue is zeroed on a hint.

    Cost of the sketch ``≈ 6 n² k`` in GEMMs plus ``O(n k²)``, against ``eigh``'s ``O(n³)``
    in LAPACK: a 4097² factor of 128 rows, 0.22 against 2.7 s; 2049² of 64 rows, 40
    against 363 ms (2-core Xeon, float32; relative error of ``V diag(λ) Vᵀ`` 1.5–1.8e-6,
    LAPACK's 1.0–1.2e-6).
    """
    k = sketch_width(m.shape[0], rank_bound)
    if k is not None:
        return _eigh_sketched(m, k, checked)
    values, vectors = eigh(m)
    return _off_range_zeroed(values, rank_bound, checked), vectors


def eigvalsh_psd(m: jax.Array, rank_bound: int | None = None, *, checked: bool = False
                 ) -> jax.Array:
    """The eigenvalues of :func:`eigh_psd` without its eigenvectors where a full
    decomposition would run: :func:`eigvalsh` (LAPACK's ``syevd`` without eigenvectors
    from order :data:`EIGVALSH_ON_HOST_MIN`), the null space's round-off made 0 as
    :func:`eigh_psd` makes it; through the range sketch where it takes the matrix (its
    cost is the range's)."""
    k = sketch_width(m.shape[0], rank_bound)
    if k is not None:
        return _eigh_sketched(m, k, checked)[0]
    return _off_range_zeroed(eigvalsh(m), rank_bound, checked)


def eighs_psd(ms: Sequence[jax.Array], rank_bounds: Sequence[int | None],
              checked: Sequence[bool]) -> list[tuple[jax.Array, jax.Array]]:
    """``[eigh_psd(m, bound, checked=c) ...]`` with the full ``eigh``'s (those of the
    matrices no range sketch takes) in one host call, side by side on the CPU's cores
    where that is faster (:func:`host_eighs`)."""
    return _psd_spectra(ms, rank_bounds, checked, vectors=True)


def eigvalshs_psd(ms: Sequence[jax.Array], rank_bounds: Sequence[int | None],
                  checked: Sequence[bool]) -> list[jax.Array]:
    """``[eigvalsh_psd(m, bound, checked=c) ...]`` with the full decompositions' eigenvalues
    in one host call, side by side where faster (:func:`host_eigvalshs`)."""
    return _psd_spectra(ms, rank_bounds, checked, vectors=False)


def _psd_spectra(ms: Sequence[jax.Array], rank_bounds: Sequence[int | None],
                 checked: Sequence[bool], vectors: bool) -> list:
    """:func:`eighs_psd` (``vectors``) or :func:`eigvalshs_psd`."""
    widths = [sketch_width(m.shape[0], r) for m, r in zip(ms, rank_bounds)]
    on_host = [m for m, k in zip(ms, widths) if k is None]
    full = iter(host_eighs(on_host) if vectors else host_eigvalshs(on_host))
    out = []
    for m, k, r, c in zip(ms, widths, rank_bounds, checked):
        if k is not None:
            pair = _eigh_sketched(m, k, c)
            out.append(pair if vectors else pair[0])
        elif vectors:
            values, basis = next(full)
            out.append((_off_range_zeroed(values, r, c), basis))
        else:
            out.append(_off_range_zeroed(next(full), r, c))
    return out


def _off_range_zeroed(values: jax.Array, rank_bound: int | None, checked: bool) -> jax.Array:
    """The ascending eigenvalues of a full decomposition of a PSD matrix with a known rank
    bound (not a hint: not ``checked``), the round-off ones of its null space made exactly
    0, as the sketch's (:func:`range_width`)."""
    n = values.shape[0]
    width = range_width(n, rank_bound)
    if width is None or checked:
        return values
    return jnp.where(jnp.arange(n) < n - width, 0, values)


def host_eighs(ms: Sequence[jax.Array]) -> list[tuple[jax.Array, jax.Array]]:
    """``[eigh(m) for m in ms]`` of symmetric ``(n, n)`` matrices, each read from its upper
    triangle, in one host call: LAPACK's ``syevd`` through ``ctypes``
    (:func:`jaxgeom._host_lapack.eigh`), dealt into one chain per core with LAPACK held to
    one thread where that is faster (:func:`jaxgeom._lapack.host_side_by_side`).

    XLA:CPU runs the ``eigh``'s it compiles itself in turn, each on LAPACK's threads
    (which spin into what follows) or, held to one thread, one after the other on one
    core (2-core AMD EPYC VM, float32, ``jit``): six matrices of bench_mlp's factors'
    orders (785, four of 512–513, 10) and a product of each, 125–159 ms on LAPACK's
    threads, 128–131 ms held, 76–79 ms this way; 22 of bench_resnet's (10–2049) 1.1–1.4
    s, 0.88–1.23 s and 0.84–0.86 s. The host call also skips the transposed copies XLA makes
    for LAPACK's column-major layout: the eigenvectors come back in rows, and ``.T``
    (folded into the products that read them) gives them in the columns, as
    ``jnp.linalg.eigh``'s. Differentiable as :func:`eigh`. Cost: ``syevd``'s ``O(n³)``
    each, a copy of each matrix in and of each result out."""
    return list(_host_eighs(tuple(ms))) if ms else []


@jax.custom_jvp
def _host_eighs(ms: tuple[jax.Array, ...]) -> tuple[tuple[jax.Array, jax.Array], ...]:
    shapes = [(jax.ShapeDtypeStruct(m.shape[:1], m.dtype), jax.ShapeDtypeStruct(m.shape, m.dtype))
              for m in ms]
    pairs = host_call_side_by_side(_host_lapack.eigh, ms, tuple(shapes))
    return tuple((values, rows.T) for values, rows in pairs)


@_host_eighs.defjvp
def _host_eighs_jvp(primals, tangents):
    (ms,), (dms,) = primals, tangents
    pairs = _host_eighs(ms)
    return pairs, tuple(_eigh_tangents(*pair, dm) for pair, dm in zip(pairs, dms))


#: the smallest order whose eigenvalues alone :func:`eigvalsh` takes from the host (2-core
#: AMD EPYC VM, float32, ``jit``: ``jnp.linalg.eigvalsh`` against ``syevd`` without
#: eigenvectors 0.30 / 0.26 ms at 64², 0.79 / 0.65 at 128², 7.5 / 4.6 at 256², 69 / 50 at
#: 1000², 447 / 301 ms at 2112²)
EIGVALSH_ON_HOST_MIN = 128


def eigvalsh(m: jax.Array) -> jax.Array:
    """The eigenvalues of a symmetric ``(n, n)`` ``m``, ascending, as
    ``jnp.linalg.eigvalsh``, which computes the eigenvectors too (XLA:CPU's ``eigh``). On
    a CPU, from order :data:`EIGVALSH_ON_HOST_MIN` (float32/float64, host callbacks
    allowed), LAPACK's ``syevd`` without eigenvectors in a host callback
    (:func:`host_eigvalshs`): 1.4–1.6× faster from 256². Under ``vmap``, one host call per
    matrix."""
    if m.ndim != 2 or m.shape[0] < EIGVALSH_ON_HOST_MIN or not _host_lapack.may_run(m.dtype):
        return jnp.linalg.eigvalsh(m)
    return _host_eigvalshs((m,))[0]


def host_eigvalshs(ms: Sequence[jax.Array]) -> list[jax.Array]:
    """``[eigvalsh(m) for m in ms]`` of symmetric ``(n, n)`` matrices, each read from its
    upper triangle, in one host call: LAPACK's ``syevd`` without eigenvectors (the
    tridiagonal reduction and its QR iteration, :func:`jaxgeom._host_lapack.eigvalsh`),
    dealt into chains as :func:`host_eighs`' (bench_mlp's six KFAC factors: ≈ 1.4× faster
    than with eigenvectors). Differentiable: ``λ̇ᵢ = vᵢᵀ Ṁ vᵢ``, the eigenvectors computed
    for the tangent (:func:`host_eighs`, one ``n³`` product each)."""
    return list(_host_eigvalshs(tuple(ms))) if ms else []


@jax.custom_jvp
def _host_eigvalshs(ms: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    shapes = tuple(jax.ShapeDtypeStruct(m.shape[:1], m.dtype) for m in ms)
    return host_call_side_by_side(_host_lapack.eigvalsh, ms, shapes)


@_host_eigvalshs.defjvp
def _host_eigvalshs_jvp(primals, tangents):
    (ms,), (dms,) = primals, tangents
    pairs = _host_eighs(ms)
    return (tuple(values for values, _ in pairs),
            tuple(jnp.sum(vectors * (dm @ vectors), axis=0)  # vᵢᵀ Ṁ vᵢ
                  for (_, vectors), dm in zip(pairs, dms)))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1, 2))
def _eigh_sketched(m: jax.Array, k: int, checked: bool) -> tuple[jax.Array, jax.Array]:
    """:func:`eigh_psd` through the sketch (:func:`_eigh_on_range`; when ``checked`` and it
    missed part of the range, LAPACK's ``eigh``), differentiated as :func:`eigh` from its
    result: JAX has no derivative for the Householder completion's ``geqrf``, and the QR
    of the rank-deficient sketch ``m Ω`` would have none anyway."""
    values, vectors, captured = _eigh_on_range(m, k, checked)
    if not checked:
        return values, vectors
    return jax.lax.cond(captured, lambda m: (values, vectors),
                        lambda m: tuple(jnp.linalg.eigh(m)), m)


@_eigh_sketched.defjvp
def _eigh_sketched_jvp(k, checked, primals, tangents):
    (m,), (dm,) = primals, tangents
    pair = _eigh_sketched(m, k, checked)
    return pair, _eigh_tangents(*pair, dm)


@functools.partial(factorisation_jit, static_argnums=(1, 2))
def _eigh_on_range(m: jax.Array, k: int, checked: bool = True
                   ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """:func:`eigh_psd` through a ``k``-column sketch of the range of ``m``, and (when
    ``checked``, else ``None``) whether the sketch found the whole range."""
    n, dtype = m.shape[0], m.dtype
    sketch = jax.random.normal(jax.random.key(0), (n, k), dtype)
    q, _ = jnp.linalg.qr(m @ sketch)
    mq = m @ q
    ritz = q.T @ mq
    values, w = jnp.linalg.eigh((ritz + ritz.T) / 2)
    u = q @ w
    captured = None
    if checked:
        tol = jnp.sqrt(jnp.finfo(dtype).eps)
        invariant = jnp.linalg.norm(mq @ w - u * values) <= tol * jnp.linalg.norm(m)
        total = trace(m)
        captured = invariant & (total - jnp.sum(values) <= tol * total)
    packed, taus = jnp.linalg.qr(u, mode="raw")  # LAPACK's reflectors, ``packed`` transposed
    y = jnp.tril(packed.T, -1) + jnp.eye(n, k, dtype=dtype)
    gram = y.T @ y

    def column(i, t):  # LAPACK's larft: H₁⋯H_k = I − Y T Yᵀ, T upper triangular
        return t.at[:, i].set(-taus[i] * (t @ gram[:, i])).at[i, i].set(taus[i])

    t = jax.lax.fori_loop(0, k, column, jnp.zeros((k, k), dtype))
    complement = (jnp.eye(n, n - k, -k, dtype=dtype) - y @ (t @ y[k:].T))
    return (jnp.concatenate([jnp.zeros(n - k, dtype), values]),
            jnp.concatenate([complement, u], axis=1), captured)


# ----------------------------------------------------------------------------- k eigenpairs
#: which ``k`` eigenvalues :meth:`~jaxgeom.pmat.base.PMatAbstract.eigsh` and
#: :func:`jaxgeom.estimators.lanczos_eigsh` answer (scipy's ``eigsh`` names): the largest
#: (``"LA"``, largest algebraic), the smallest (``"SA"``) or the largest in magnitude
#: (``"LM"``: an indefinite Hessian's dominant directions, either sign)
WHICH = ("LA", "SA", "LM")


def check_eigsh_options(k, which, d: int, what: str = "k", bound: str = "d") -> None:
    """Refuse a ``k`` that is not an integer in ``[1, d]`` or an unknown ``which``
    (``bound``: what ``d`` is, in the message)."""
    if which not in WHICH:
        raise ValueError(f"unknown which={which!r}; valid: {WHICH} (largest, smallest "
                         "algebraic, largest magnitude)")
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or not 1 <= k <= d:
        raise ValueError(f"{what} must be an integer in [1, {bound} = {d}]; got {k!r}")


def select(values: jax.Array, k: int, which: str) -> jax.Array:
    """The indices of ``k`` of ``values`` (``(n,)``, any order) chosen by ``which``
    (:data:`WHICH`), ordered so that the chosen values ascend (scipy's ``eigsh`` order).
    Ties are broken by position. Jit-able (``k`` static); ``O(n log k)``."""
    if which == "SA":
        return jax.lax.top_k(-values, k)[1]  # smallest first: ascending
    if which == "LA":
        return jax.lax.top_k(values, k)[1][::-1]
    idx = jax.lax.top_k(jnp.abs(values), k)[1]
    return idx[jnp.argsort(values[idx])]


def eigenpairs_of_pieces(pieces, k: int, which: str, d: int, dtype
                         ) -> tuple[jax.Array, jax.Array]:
    """``k`` eigenpairs of a matrix that is block diagonal up to a permutation, without
    forming it: ``(λ (k,), V (d, k))``, ``λ`` ascending (:func:`select`).

    ``pieces``: per diagonal block, ``(indices, values, vectors)`` — the block's flat
    indices (a static NumPy array of ``n`` distinct entries; the pieces' together a
    permutation of ``0 … d−1``), ``m ≤ n`` of its eigenvalues, and ``vectors(i)`` giving
    the ``(j, n)`` eigenvectors (rows, in the order of ``indices``) of the eigenvalues at
    positions ``i`` (``(j,)`` integers in ``[0, m)``). A block may give all ``n`` of its
    eigenvalues, or only those of them that can be among the ``k`` chosen (its own
    ``min(k, n)`` chosen by the same ``which``: a ``PMatMixed`` part's ``eigsh``); the
    pieces must give ``k`` or more in all. A piece without indices is skipped. The ``k``
    chosen among all the values given may fall in any block (a traced choice): each
    block builds ``k`` rows, zero where the choice lies elsewhere, and one gather puts the
    concatenated rows into flat order. Cost: ``O(Σ m log k)`` to choose, ``k`` rows of
    ``vectors`` per block, memory ``2 k d``."""
    pieces = [(np.ravel(i), v, f) for i, v, f in pieces if np.size(i)]
    values = jnp.concatenate([jnp.ravel(v).astype(dtype) for _, v, _ in pieces])
    chosen = select(values, k, which)
    rows, offset = [], 0
    for indices, v, vectors in pieces:
        m = int(np.prod(jnp.shape(v)))
        if not m:  # nothing of this block chosen: zero rows
            rows.append(jnp.zeros((k, indices.size), dtype))
            continue
        local = chosen - offset
        inside = (local >= 0) & (local < m)
        block = vectors(jnp.clip(local, 0, m - 1)).astype(dtype)
        rows.append(jnp.where(inside[:, None], block, 0))
        offset += m
    order = np.concatenate([i for i, _, _ in pieces])
    if order.size != d or not np.array_equal(np.sort(order), np.arange(d)):
        raise AssertionError("the pieces' indices are not a permutation of the flat order")
    flat = jnp.concatenate(rows, axis=1)[:, np.argsort(order)]  # (k, d), flat order
    return values[chosen], flat.T
