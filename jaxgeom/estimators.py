"""Randomised estimators of a matrix's trace, diagonal, Frobenius norm and spectrum from
products.

For a matrix ``M`` (d × d) known only through products — a :class:`~jaxgeom.PMatImplicit`
Fisher or Hessian, whose exact ``trace``/``get_diag`` cost ``d`` Hessian-vector products
per chunk (Hessian) or per-example gradients (Fisher) — these estimate

.. math::
   \\operatorname{tr} M = \\mathbb E[v^\\top M v], \\qquad
   \\operatorname{diag} M = \\mathbb E[v \\odot M v], \\qquad
   \\|M\\|_F^2 = \\mathbb E[\\|M v\\|^2]

with ``m`` random probe vectors ``v`` (``E[v vᵀ] = I``: Rademacher ±1 entries, or
standard normal), and Hutch++ (Meyer et al. 2021), which first takes the trace of a
low-rank sketch exactly, then Hutchinson's estimate on the rest: exact for a matrix of
rank ≤ ``m // 3`` (a low-rank Fisher ``N·K < d``), and an error ``O(1/m)`` instead of
``O(1/√m)`` for a quickly decaying spectrum. XTrace and XDiag (Epperly et al. 2024) use
every probe both in the sketch and as a Hutchinson probe (exchangeably): exact for rank
``< m/2``, and more accurate than Hutch++ for the same ``m``.

The probes are the rows of one ``(m, d)`` array and ``M`` is applied to all at once
(``M.mmap``: a ``PMatImplicit`` streams its data once for all ``m``; memory ``m·d``), so
the cost is ``m`` products of ``M`` (Hutch++: ``m`` products and a QR of ``d × m/3``).
For more probes than fit in memory, call again with other keys and average.
:func:`lanczos_eigenvalues` estimates the extreme eigenvalues (a Hessian's top one)
with ``k`` products one after the other, :func:`lanczos_eigsh` extreme eigenpairs
(eigenvalues and eigenvectors: a Hessian's top-``k`` directions), and
:func:`lanczos_spectral_density` the whole spectral density by stochastic Lanczos
quadrature (``k`` rounds of products on ``m`` probes; :func:`spectral_density_on_grid`
smooths it on a grid, :func:`spectral_density_curve` on one chosen from the spectrum).
Everything is jit-able; the same key gives the same estimate. Called eagerly on a stored
representation (any but ``PMatImplicit``), each estimator runs as one compiled program
with the matrix an argument, compiled once per structure and options (``num_samples``,
``distribution``, …), not op by op (``PMatDiag`` of 670k parameters, 2-core CPU:
``hutchinson_trace`` of 20 probes 49 → 20 ms, ``xdiag`` 208 → 131 ms). These are curvlinops'
``hutchinson_trace``, ``hutchpp_trace``, ``xtrace``, ``hutchinson_diag``, ``xdiag``,
``hutchinson_squared_fro``, ``lanczos_approximate_spectrum`` and ``eigsh`` (and matfree's
``stochtrace``, PyHessian's ``density``). :func:`restarted_lanczos_eigsh` finds the
extreme eigenpairs in bounded memory (thick restarts: ``ncv`` basis vectors however many
products, ARPACK's ``eigsh``), :func:`lobpcg_eigsh` with blocks of products (``3k``
vectors an iteration).

``M`` is any representation, or a function ``matvec(v) -> M v`` on flat ``(d,)``
vectors with ``dim=d`` given.

References:
  Hutchinson, `A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines <https://doi.org/10.1080/03610919008812866>`_, 1990.
  Bekas, Kokiopoulou & Saad, `An estimator for the diagonal of a matrix
  <https://doi.org/10.1016/j.apnum.2007.01.003>`_, 2007.
  Meyer, Musco, Musco & Woodruff, `Hutch++: optimal stochastic trace estimation
  <https://arxiv.org/abs/2010.09649>`_, 2021.
  Epperly, Tropp & Webber, `XTrace: making the most of every sample in stochastic trace
  estimation <https://arxiv.org/abs/2301.07825>`_, 2024.
  Ubaru, Chen & Saad, `Fast estimation of tr(f(A)) via stochastic Lanczos quadrature
  <https://doi.org/10.1137/16M1104974>`_, 2017.
"""

from __future__ import annotations

import dataclasses
import fractions
import functools
import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._compile import donating_jit
from jaxgeom._counter_rng import check_key
from jaxgeom._dispatch import compiled_when_eager
from jaxgeom.pmat import _spectral
from jaxgeom.pmat.base import PMatAbstract

#: the distributions of the probe entries: ±1 with probability ½ each, or N(0, 1)
DISTRIBUTIONS = ("rademacher", "normal")

Operator = PMatAbstract | Callable[[jax.Array], jax.Array]


def _one_program_when_eager(estimator: Callable) -> Callable:
    """``estimator(M, *args, **kwargs)`` as one compiled program with ``M`` an argument
    (:func:`~jaxgeom._dispatch.compiled_when_eager`: compiled once per structure and
    options) when called eagerly on a stored representation; as written otherwise: on a
    ``PMatImplicit`` or a ``matvec``, inside a trace, and with a non-integral number among
    the arguments (none of these estimators takes one: a count given as ``10.0`` is
    refused by name, not traced). A finite ``tol`` (a Python number) is checked and
    compiled in as a constant (:func:`_static_number`: one program per tolerance; the iteration
    stops inside the program, :func:`_lanczos`)."""
    compiled = compiled_when_eager(estimator)

    @functools.wraps(estimator)
    def run(M: Operator, *args: Any, **kwargs: Any) -> Any:
        # NumPy integers (a count from a config array) as Python ones: static when compiled
        args = tuple(_as_int(a) for a in args)
        kwargs = {name: _as_int(a) for name, a in kwargs.items()}
        options = dict(kwargs)
        tol = options.pop("tol", None)
        if (_one_program(M) and (tol is None or isinstance(tol, numbers.Real)
                                 and math.isfinite(tol))
                and not any(isinstance(a, numbers.Real) and not isinstance(a, numbers.Integral)
                            for a in (*args, *options.values()))):
            if tol is not None:
                options["tol"] = _static_number(_checked_tol(tol))
            return compiled(M, *args, **options)
        return estimator(M, *args, **kwargs)

    return run


def _shape_checked(products: Callable[[jax.Array], jax.Array], dim: int
                   ) -> Callable[[jax.Array], jax.Array]:
    """``products`` (a ``vmap`` of a matvec function) refusing an answer of another shape
    than its ``(m, dim)`` rows, by name (shapes are static: no cost when compiled); JAX's
    own error, from a later broadcast or product, named neither the function nor ``dim``."""

    def checked(rows: jax.Array) -> jax.Array:
        try:
            out = products(rows)
        except (TypeError, ValueError) as error:  # a shape error inside M: dim is not its d
            raise ValueError(
                f"the matvec function M failed on a ({dim},) vector (dim={dim}): is dim the "
                f"dimension of its vectors? Its error: {str(error).splitlines()[0]}"
            ) from error
        if jnp.shape(out) != rows.shape:
            raise ValueError(
                f"the matvec function M must map a ({dim},) vector to a ({dim},) vector "
                f"(dim={dim}); it answered shape {jnp.shape(out)[1:]} for shape "
                f"{rows.shape[1:]}")
        return out

    return checked


def _as_int(x: Any) -> Any:
    """A NumPy integer as a Python ``int``; anything else as it is."""
    return int(x) if isinstance(x, np.integer) else x


def _static_number(x: float) -> fractions.Fraction:
    """``x`` as a number that :func:`~jaxgeom._dispatch.compiled_when_eager` keeps static
    (part of the compilation's key, a constant in the program) where it would trace a
    ``float``: the exact fraction of the binary float, ``float()`` of which is ``x``."""
    return fractions.Fraction(x)


@_one_program_when_eager
def hutchinson_trace(M: Operator, key: jax.Array, num_samples: int = 100, *,
                     distribution: str = "rademacher", dim: int | None = None,
                     dtype: Any = None) -> jax.Array:
    """Hutchinson's estimate of ``tr M``: ``(1/m) Σⱼ vⱼᵀ M vⱼ``.

    Unbiased; its variance is ``2(‖M‖²_F − Σᵢ Mᵢᵢ²)/m`` with Rademacher probes (exact
    for a diagonal ``M``), ``2‖M‖²_F/m`` with normal ones (symmetric ``M``).

    Args:
      M: a representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (``jax.random.key(seed)`` or ``jax.random.PRNGKey(seed)``).
      num_samples: ``m``, the number of probes (and of products of ``M``), ``≥ 1``.
      distribution: ``"rademacher"`` (default) or ``"normal"``.
      dim: ``d``, for a function ``M`` only.
      dtype: the probes' dtype for a function ``M`` (default: JAX's default float);
        a representation's own otherwise.

    Returns:
      A scalar. Cost: ``m`` products of ``M``, memory ``m·d``.
    """
    products, probes = _setup(M, key, num_samples, distribution, dim, dtype, "num_samples")
    v = probes(key, num_samples)
    return jnp.sum(v * products(v)) / num_samples


@_one_program_when_eager
def hutchinson_diag(M: Operator, key: jax.Array, num_samples: int = 100, *,
                    distribution: str = "rademacher", dim: int | None = None,
                    dtype: Any = None) -> jax.Array:
    """Estimate of ``diag M`` (Bekas et al. 2007): ``(1/m) Σⱼ vⱼ ⊙ M vⱼ``, flat order.

    Unbiased; entry ``i`` has variance ``Σ_{k≠i} Mᵢₖ²/m`` with Rademacher probes (exact
    for a diagonal ``M``) and ``(Mᵢᵢ² + Σₖ Mᵢₖ²)/m`` with normal ones. Arguments as
    :func:`hutchinson_trace`.

    Returns:
      The ``(d,)`` estimate. Cost: ``m`` products of ``M``, memory ``m·d``.
    """
    products, probes = _setup(M, key, num_samples, distribution, dim, dtype, "num_samples")
    v = probes(key, num_samples)
    return jnp.mean(v * products(v), axis=0)


@_one_program_when_eager
def hutchinson_squared_frobenius(M: Operator, key: jax.Array, num_samples: int = 100, *,
                                 distribution: str = "rademacher", dim: int | None = None,
                                 dtype: Any = None) -> jax.Array:
    """Estimate of ``‖M‖²_F = tr(MᵀM)``: ``(1/m) Σⱼ ‖M vⱼ‖²`` (Hutchinson's estimator on
    ``MᵀM``; unbiased). Arguments as :func:`hutchinson_trace`; take the square root for
    an estimate of ``frobenius_norm()`` (biased low, by Jensen).

    Returns:
      A scalar. Cost: ``m`` products of ``M``, memory ``m·d``.
    """
    products, probes = _setup(M, key, num_samples, distribution, dim, dtype, "num_samples")
    return jnp.sum(products(probes(key, num_samples)) ** 2) / num_samples


@_one_program_when_eager
def hutchpp_trace(M: Operator, key: jax.Array, num_samples: int = 99, *,
                  distribution: str = "rademacher", dim: int | None = None,
                  dtype: Any = None) -> jax.Array:
    """Hutch++ (Meyer et al. 2021) estimate of ``tr M`` for a symmetric ``M``.

    With ``k = m // 3`` sketch probes ``S`` and ``ℓ = m − 2k`` Hutchinson probes ``G``
    (rows), ``Q`` an orthonormal basis of the range of ``M S``:

    .. math::  \\operatorname{tr}(Q^\\top M Q)
       + \\frac1\\ell \\operatorname{tr}\\big(G (I - QQ^\\top) M (I - QQ^\\top) G^\\top\\big)

    Unbiased; exact when ``rank M ≤ k`` (a low-rank Fisher with ``N·K ≤ k``), and for a
    spectrum that decays, far more accurate than :func:`hutchinson_trace` for the same
    ``m``. Arguments as :func:`hutchinson_trace`; ``num_samples ≥ 3``.

    Returns:
      A scalar. Cost: ``m`` products of ``M`` (in three rounds: ``M S``, ``M Q``, then the
      projected probes), a QR of ``d × k``; memory ``m·d``.
    """
    products, probes = _setup(M, key, num_samples, distribution, dim, dtype,
                              "num_samples (≥ 3 for Hutch++)", minimum=3)
    sketch_key, probe_key = jax.random.split(key)
    k = num_samples // 3
    q, _ = jnp.linalg.qr(products(probes(sketch_key, k)).T)  # (d, k)
    low_rank = _summed(q.T * products(q.T))  # tr(Qᵀ M Q)
    g = probes(probe_key, num_samples - 2 * k)
    g = g - (g @ q) @ q.T  # (I − QQᵀ) G, rows
    return low_rank + _summed(g * products(g)) / g.shape[0]


@_one_program_when_eager
def xtrace(M: Operator, key: jax.Array, num_samples: int = 100, *,
           distribution: str = "rademacher", dim: int | None = None,
           dtype: Any = None) -> jax.Array:
    """XTrace (Epperly, Tropp & Webber 2024): the exchangeable estimate of ``tr M`` for a
    symmetric ``M``, Hutch++ with every probe used both in the sketch and as a Hutchinson
    probe.

    With ``s = m / 2`` probes ``ω₁ … ω_s`` (rows of ``Ω``), ``Y = M Ω`` (columns
    ``Mωᵢ``) and ``P₍ᵢ₎`` the orthogonal projector onto the span of the ``Mωⱼ``, ``j ≠ i``
    (which does not depend on ``ωᵢ``), each probe gives an unbiased estimate

    .. math::  t_i = \\operatorname{tr}(P_{(i)} M) + \\omega_i^\\top (I - P_{(i)})
       M (I - P_{(i)}) \\omega_i

    — Hutch++ with the sketch of the other ``s − 1`` probes and the Hutchinson probe
    ``ωᵢ`` — and XTrace is their mean ``(1/s) Σᵢ tᵢ``. All ``s`` leave-one-out projectors
    come from one thin QR ``Yᵀ = Q R``: ``P₍ᵢ₎ = Q (I − sᵢsᵢᵀ) Qᵀ`` with ``sᵢ`` the
    normalised ``i``-th column of ``R⁻ᵀ`` (the direction of ``R``'s coefficient space
    orthogonal to every other column of ``R``; taken from an SVD of ``R``, so that a
    singular ``R`` — ``rank M < s`` — gives a valid one), and one more round of products
    ``M Q``. With ``distribution="normal"`` the Hutchinson term is the improved one of the
    paper: ``(I − P₍ᵢ₎)ωᵢ`` is rescaled to the norm ``√(d − s + 1)`` of the dimension of
    its space (still unbiased: it is uniform on that sphere), which makes the estimate
    exact for a multiple of the identity too.

    Unbiased; exact when ``rank M < s`` (a low-rank Fisher with ``N·K < m/2``); for a
    quickly decaying spectrum more accurate than :func:`hutchpp_trace`, which uses only
    a third of its products in its sketch and a third as Hutchinson probes, and far more
    than :func:`hutchinson_trace` for the same number of products. Arguments as
    :func:`hutchinson_trace`; ``num_samples`` even, ``2 ≤ m ≤ 2d``.

    Returns:
      A scalar. Cost: ``m`` products of ``M`` in two rounds of ``m/2`` (``M Ω``, ``M Q``),
      a QR of ``d × m/2``, ``O(d m²)`` more; memory ``m·d``.

    References:
      Epperly, Tropp & Webber, `XTrace: making the most of every sample in stochastic
      trace estimation <https://arxiv.org/abs/2301.07825>`_, SIAM J. Matrix Anal. Appl.,
      2024.
    """
    d, s, omega, y, q, z, sk, u, improved = _exchangeable(
        M, key, num_samples, distribution, dim, dtype)
    h = q.T @ z.T  # Qᵀ M Q, (s, s)
    low_rank = _spectral.trace(h) - jnp.sum(sk * (h @ sk), axis=0)  # tr(P₍ᵢ₎ M), (s,)
    w = omega.T - q @ u  # (I − P₍ᵢ₎) ωᵢ, columns (d, s)
    mw = y.T - z.T @ u  # M (I − P₍ᵢ₎) ωᵢ
    rest = _summed(w * mw, axis=0)
    if improved:
        rest = rest * (d - s + 1) / _summed(w * w, axis=0)
    return jnp.mean(low_rank + rest)


@_one_program_when_eager
def xdiag(M: Operator, key: jax.Array, num_samples: int = 100, *,
          distribution: str = "rademacher", dim: int | None = None,
          dtype: Any = None) -> jax.Array:
    """XDiag (Epperly, Tropp & Webber 2024): the exchangeable estimate of ``diag M`` for a
    symmetric ``M``, flat order.

    With the notation of :func:`xtrace`, each probe gives the unbiased estimate

    .. math::  \\operatorname{diag}(P_{(i)} M) + \\omega_i \\odot
       \\big((I - P_{(i)}) M \\omega_i\\big)

    (the diagonal of the low-rank sketch of the other probes, exactly, plus
    :func:`hutchinson_diag`'s estimate on the rest with ``ωᵢ``), and XDiag is their mean.
    Unbiased; exact when ``rank M < s = m/2``; for a quickly decaying spectrum far more
    accurate than :func:`hutchinson_diag` with the same ``m``. Arguments as
    :func:`xtrace` (``"normal"`` probes: no rescaling here).

    Returns:
      The ``(d,)`` estimate. Cost: as :func:`xtrace` — ``m`` products of ``M`` in two
      rounds, a QR of ``d × m/2``; memory ``m·d``.

    References:
      Epperly, Tropp & Webber, `XTrace: making the most of every sample in stochastic
      trace estimation <https://arxiv.org/abs/2301.07825>`_, 2024 (§5, XDiag).
    """
    d, s, omega, y, q, z, sk, u, improved = _exchangeable(
        M, key, num_samples, distribution, dim, dtype)
    low_rank = _summed(q * z.T, axis=1) - _summed((q @ sk) * (z.T @ sk), axis=1) / s
    u_y = q.T @ y.T  # Qᵀ M ωᵢ
    u_y = u_y - sk * jnp.sum(sk * u_y, axis=0)  # (I − sᵢsᵢᵀ) Qᵀ M ωᵢ
    rest = omega.T * (y.T - q @ u_y)  # ωᵢ ⊙ (I − P₍ᵢ₎) M ωᵢ, columns
    return low_rank + _summed(rest, axis=1) / s


@_one_program_when_eager
def lanczos_eigenvalues(M: Operator, key: jax.Array, num_iterations: int = 30, *,
                        dim: int | None = None, dtype: Any = None,
                        reorthogonalization: str = "full") -> jax.Array:
    """Ritz values of ``k`` Lanczos iterations on a symmetric ``M``: estimates of its
    extreme eigenvalues, from products only (PyHessian's top eigenvalue of a Hessian).

    From a normal start vector ``q₁``, Lanczos builds an orthonormal basis ``Q_k`` of the
    Krylov space ``span(q₁, Mq₁, …, M^{k−1}q₁)`` and the tridiagonal ``T = Q_kᵀ M Q_k``;
    its ``k`` eigenvalues (ascending) lie in ``[λ_min, λ_max]`` and the largest and
    smallest converge first (geometrically, at a rate set by the gaps at the ends of the
    spectrum): ``lanczos_eigenvalues(M, key)[-1]`` estimates ``M.norm(2)`` of a PSD
    matrix, which a matrix-free ``PMatImplicit`` cannot give exactly. Every new basis
    vector is reorthogonalised against all the previous ones (after the three-term
    recurrence, once, twice where that pass cancels much), so the Ritz values
    carry no spurious copies. When the Krylov space is exhausted (an invariant subspace:
    ``k`` beyond ``rank + 1`` for a low-rank Fisher, or beyond the number of distinct
    eigenvalues) the iteration goes on from a new random vector orthogonal to the basis
    (``T`` block diagonal), so every Ritz value is an eigenvalue of ``M`` restricted to a
    subspace, in ``[λ_min, λ_max]``, and ``k = d`` gives the whole spectrum, multiple
    eigenvalues with their multiplicity (a damped low-rank Fisher's ``λ``).
    :func:`lanczos_eigsh` gives the eigenvectors too.

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (the start vector).
      num_iterations: ``k ≥ 1``, the number of products of ``M`` (at most ``d``).
      dim, dtype: as :func:`hutchinson_trace`.
      reorthogonalization: ``"full"`` (default): every new Lanczos vector
        reorthogonalised against all the previous ones (orthonormal to working
        precision); ``"partial"``: only where Simon's ω-recurrence estimates that one
        would lose semi-orthogonality (``|q_iᵀq_j| > √ε``), and the next one (PROPACK's
        scheme): the Ritz values to working precision, fewer reads of the basis —
        the reorthogonalisation's cost, bandwidth-bound, that dominates where products
        are cheap beside ``d``-sized reads (a third of the passes on a separated spectrum
        in float64).

    Returns:
      The ``(k,)`` Ritz values, ascending. Cost: ``k`` products of ``M`` one after the
      other (a ``PMatImplicit`` streams its data ``k`` times), ``≈ 3 k² d`` for the
      reorthogonalisation, memory ``k·d``; one compiled step whatever ``k`` (one loop
      under ``jit``, :func:`_lanczos`).

    References:
      Lanczos, `An iteration method for the solution of the eigenvalue problem of linear
      differential and integral operators <https://doi.org/10.6028/jres.045.026>`_, 1950.
      Yao et al., `PyHessian: neural networks through the lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020.
      Simon, `The Lanczos algorithm with partial reorthogonalization
      <https://doi.org/10.1090/S0025-5718-1984-0725988-X>`_, Math. Comp. 42, 1984.
    """
    products, probes = _setup(M, key, num_iterations, "normal", dim, dtype,
                              "num_iterations")
    tridiagonal = _lanczos(products, probes(key, 1), num_iterations, "num_iterations",
                           restart=key, partial=_partial(reorthogonalization))
    return jnp.linalg.eigvalsh(tridiagonal[0])


@_one_program_when_eager
def lanczos_eigsh(M: Operator, key: jax.Array, k: int, *, which: str = "LA",
                  num_iterations: int | None = None, dim: int | None = None,
                  dtype: Any = None, return_residuals: bool = False, tol: float | None = None,
                  reorthogonalization: str = "full"
                  ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
    """``k`` extreme eigenpairs of a symmetric ``M`` from products only, by Lanczos: Ritz
    values and Ritz vectors (scipy's and curvlinops' ``eigsh``, PyHessian's top-``k``
    eigenvalues and eigenvectors of a Hessian).

    ``n = num_iterations`` Lanczos steps from a normal start vector (as
    :func:`lanczos_eigenvalues`, full reorthogonalisation) build an orthonormal basis
    ``Q`` (``d × n``) of the Krylov space and ``T = QᵀMQ = S Θ Sᵀ``; the Ritz pairs are
    ``(θⱼ, yⱼ = Q sⱼ)``, and the ``k`` of them that ``which`` names are returned:
    ``"LA"`` the largest (default), ``"SA"`` the smallest, ``"LM"`` the largest in
    magnitude (an indefinite Hessian's dominant directions, either sign). The extreme
    ones converge first, geometrically at a rate set by the gap to the rest of the
    spectrum; a pair has converged when its residual ``‖M yⱼ − θⱼ yⱼ‖`` is small:
    ``return_residuals=True`` gives them with no more products, as ``β_n |s_{n,j}|``
    (``M Q = Q T + r eₙᵀ`` with ``β_n = ‖r‖``, the last residual of the iteration, and
    ``s_{n,j}`` the last entry of ``sⱼ``) — scipy's and ARPACK's convergence test, exact up
    to round-off with full reorthogonalisation.
    ``n ≥ 2k`` (the default, scipy's ``ncv``: ``min(d, max(2k + 1, 20))``) is a good
    start; ``n = d`` gives exact eigenpairs. A Krylov space exhausted before ``n`` steps
    (an invariant subspace: a low-rank Fisher, ``n > rank + 1``) is continued from a new
    random vector orthogonal to it, so that every Ritz vector is a unit vector (the null
    space's eigenvalue ``0`` included, e.g. with ``"SA"``).

    For a params-shaped eigenvector, ``PVector.from_flat(params, V[:, j])`` (or a matrix's
    ``layer_collection`` for ``params``). A stored representation's exact ``k`` eigenpairs
    are :meth:`~jaxgeom.pmat.base.PMatAbstract.eigsh` (KFAC/EKFAC from their factors'
    eigenbases); this one is for ``PMatImplicit`` and any ``matvec``.

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (the start vector; with the same ``num_iterations``,
        :func:`lanczos_eigenvalues` with this key gives the same Ritz values).
      k: the number of eigenpairs, ``1 ≤ k ≤ num_iterations``.
      which: ``"LA"``, ``"SA"`` or ``"LM"``.
      num_iterations: ``n``, the number of products of ``M``, ``k ≤ n ≤ d``.
      dim, dtype: as :func:`hutchinson_trace`.
      return_residuals: also return the ``(k,)`` residual norms ``‖M vⱼ − λⱼ vⱼ‖``.
      tol: stop early once every residual is at most ``tol · max|θ|`` (the largest Ritz
        value's magnitude, an estimate of ``‖M‖₂``; scipy's ``tol`` is relative to each
        ``|λⱼ|``), checked after 7, 15, 23, 31, 47, 63, 95, … steps (at most 1.5× the
        steps needed), ``num_iterations`` steps at most; eagerly or under ``jit``
        (where the shapes stay those of ``num_iterations`` steps, the memory too, and the
        steps past the stop are skipped: the same products and pairs). Each test costs an
        ``eigh`` of the steps so far, never of ``num_iterations`` rows: a generous
        ``num_iterations`` costs memory, not time.
      reorthogonalization: as :func:`lanczos_eigenvalues`; with ``"partial"`` the Ritz
        values as accurate, the Ritz vectors orthonormal and the residual estimates right
        to ``≈ √ε`` (times ``‖M‖``) rather than ``ε``.

    Returns:
      ``(λ, V)``: the ``(k,)`` Ritz values **ascending** (scipy's order: ``λ[-1]`` is the
      top one with ``"LA"``) and the ``(d, k)`` orthonormal Ritz vectors (columns, flat
      order), each up to its sign; with ``return_residuals``, ``(λ, V, residuals)``.
      Cost: ``n`` products of ``M`` one after the other (a ``PMatImplicit`` streams its
      data ``n`` times), ``≈ 3 n² d`` for the reorthogonalisation (memory-bound reads of
      the basis: where products are cheap and ``d`` large, they dominate, and
      :func:`restarted_lanczos_eigsh` bounds them), memory ``n·d``; one
      compiled step whatever ``n`` (one loop under ``jit``, :func:`_lanczos`). Under
      ``vmap`` (several keys) call it inside a ``jit``, ``jax.jit(jax.vmap(...))``: an
      eager ``vmap`` runs each operation as a program of its own (hundreds of
      compilations).

    Raises:
      ValueError: ``k`` or ``num_iterations`` not integers with ``1 ≤ k ≤ n ≤ d``, an
        unknown ``which``, and the errors of :func:`hutchinson_trace` (``dim``, ``key``).
    """
    products, probes = _setup(M, key, k, "normal", dim, dtype, "k")
    start = probes(key, 1)
    d = start.shape[1]
    if num_iterations is None:
        num_iterations = min(d, max(2 * k + 1, 20))
    _check_count(num_iterations, "num_iterations")
    _spectral.check_eigsh_options(k, which, min(num_iterations, d),
                                  "k (at most num_iterations and d)")
    tol = _checked_tol(tol)
    partial = _partial(reorthogonalization)
    if tol is None:
        tridiagonal, blocks, residual, _ = _lanczos(
            products, start, num_iterations, "num_iterations", restart=key, return_basis=True,
            partial=partial)
        pairs = _compiled_ritz_pairs(tridiagonal, blocks, residual, k, which)
    else:  # the pairs of the test that stopped, or of all the steps
        _, blocks, _, _, (values, s, residuals) = _lanczos(
            products, start, num_iterations, "num_iterations", restart=key,
            return_basis=True, stop=_ResidualsBelow(k, which, tol), partial=partial)
        pairs = values, _compiled_ritz_vectors(blocks, s), residuals
    return pairs if return_residuals else pairs[:2]


@dataclasses.dataclass(frozen=True)
class _ResidualsBelow:
    """:func:`lanczos_eigsh`'s ``stop`` test (:func:`_lanczos`): every residual of the
    ``k`` Ritz pairs ``which`` names at most ``tol · max|θ|``. A hashable value: the
    compiled test of the steps driven from Python takes it as a static argument."""

    k: int
    which: str
    tol: float

    def __call__(self, tridiagonal: jax.Array, beta: jax.Array, rows: int
                 ) -> tuple[Any, tuple[jax.Array, jax.Array, jax.Array]]:
        """On the ``(1, j, j)`` ``T`` of the ``j`` steps taken and their last residual
        norm ``β`` ``(1,)``: whether to stop (never with fewer than ``k`` steps), and the
        pairs' ``(θ, S, residuals)`` of :func:`_chosen_ritz` (``S`` of ``rows`` rows;
        zeros with fewer than ``k`` steps)."""
        if tridiagonal.shape[-1] < self.k:
            zeros = functools.partial(jnp.zeros, dtype=tridiagonal.dtype)
            return False, (zeros(self.k), zeros((rows, self.k)), zeros(self.k))
        values, s, residuals, largest = _chosen_ritz(tridiagonal, beta, self.k, self.which,
                                                     rows)
        return jnp.all(residuals <= self.tol * largest), (values, s, residuals)


def _chosen_ritz(tridiagonal: jax.Array, residual: jax.Array, k: int, which: str, rows: int
                 ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Of the ``(1, j, j)`` tridiagonal ``T = S Θ Sᵀ`` of ``j`` Lanczos steps and their last
    residual norm ``β`` ``(1,)``: the ``k`` Ritz values ``θᵢ`` that ``which`` names
    (ascending), their ``sᵢ`` as the columns of a ``(rows, k)`` array (zero past row
    ``j``: :func:`_ritz_vectors` takes them with a basis of ``rows`` rows), their residuals
    ``β |s_{j,i}|``, and ``max|θ|`` over all ``j`` Ritz values."""
    # lax's eigh: jnp.linalg's symmetrising and checks took 15 ms to lower at each test
    s, theta = jax.lax.linalg.eigh(tridiagonal[0], symmetrize_input=False)
    j = theta.shape[0]
    # the values ascend: the k largest or smallest are a static slice (a top_k was one
    # more kernel to compile at each stop test)
    chosen = {"LA": slice(j - k, j), "SA": slice(0, k)}.get(which)
    if chosen is None:
        chosen = _spectral.select(theta, k, which)
    s = s[:, chosen]
    return (theta[chosen], jnp.pad(s, [(0, rows - s.shape[0]), (0, 0)]),
            residual[0] * jnp.abs(s[-1]), jnp.max(jnp.abs(theta)))


def _ritz_pairs(tridiagonal: jax.Array, blocks: tuple, residual: jax.Array, k: int,
                which: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k`` Ritz pairs ``which`` names of :func:`_lanczos`'s first tridiagonal and
    basis, and their residuals ``β |s_{k,j}|`` (:func:`_chosen_ritz`)."""
    values, s, residuals, _ = _chosen_ritz(tridiagonal, residual, k, which,
                                           tridiagonal.shape[-1])
    return values, _ritz_vectors(blocks, s), residuals


#: :func:`_ritz_pairs` in one program (run op by op, its dozen operations compiled one by
#: one for each shape: seconds on a first eager call)
_compiled_ritz_pairs = jax.jit(_ritz_pairs, static_argnums=(3, 4))


def restarted_lanczos_eigsh(M: Operator, key: jax.Array, k: int, *, which: str = "LA",
                            ncv: int | None = None, max_restarts: int = 100,
                            tol: float | None = None, dim: int | None = None,
                            dtype: Any = None, return_residuals: bool = False
                            ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array,
                                                                     jax.Array]:
    """``k`` extreme eigenpairs of a symmetric ``M`` by thick-restart Lanczos (Wu & Simon,
    2000; Stewart's Krylov–Schur method for a symmetric ``M``): the restarted Lanczos of
    ARPACK's and scipy's ``eigsh``, in memory ``(ncv + 1)·d`` however many products it
    takes.

    A cycle grows an orthonormal basis ``V`` (``d × ncv``, fully reorthogonalised) of
    ``span(V₀, M v, M² v, …)`` and the projection ``H = VᵀMV``, whose eigenpairs
    ``(θⱼ, V sⱼ)`` are Ritz pairs of ``M`` with ``M V = V H + r e_{ncv}ᵀ`` (``r`` the last
    residual, ``β = ‖r‖``), so that each pair's residual is ``‖M yⱼ − θⱼ yⱼ‖ = β |s_{ncv,j}|``
    (ARPACK's test, no product needed). When the ``k`` pairs ``which`` names all have
    residuals ``≤ tol · max|θ|`` the iteration stops; otherwise it restarts: the ``p = k +
    ⌊(ncv − k)/2⌋`` Ritz vectors nearest the wanted end of the spectrum become the first
    ``p`` basis vectors (``H = diag(θ)``, coupled to ``r/β`` through ``β s_{ncv,j}``) and the
    next cycle adds ``ncv − p`` products. Where :func:`lanczos_eigsh` needs a basis of as
    many vectors as products (``n·d`` memory; the products to converge grow as the gap
    shrinks), this keeps ``ncv`` vectors; a Krylov space exhausted before ``ncv`` (a
    low-rank Fisher) is continued from a random vector orthogonal to it, as there. A
    repeated eigenvalue is found once (every single-vector Krylov method's limit, ARPACK's
    too) unless the space is exhausted (``ncv = d``): for a multiple one (a Fisher's null
    space with ``"SA"``) use :func:`lobpcg_eigsh` or a stored matrix's ``eigsh``.

    A stored representation runs as one compiled program (``M`` an argument: compiled once
    per structure), whose cycles are a ``lax.while_loop`` stopping at that test, as under
    ``jit``; a ``PMatImplicit`` (whose eager products run compiled chunk steps of their
    own) or a ``matvec`` called eagerly is driven from Python: one compiled update between
    products (the basis reused in place) and the test once a cycle. Either way at most
    ``ncv + max_restarts · (ncv − p)`` products.

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (the start vector, and the vectors continuing an exhausted space).
      k: the number of eigenpairs, ``1 ≤ k < ncv``.
      which: ``"LA"`` (the largest, default), ``"SA"`` (the smallest) or ``"LM"`` (the
        largest in magnitude).
      ncv: the basis size, ``k < ncv ≤ d`` (default scipy's ``min(d, max(2k + 1, 20))``).
        Larger: fewer restarts, more memory and reorthogonalisation.
      max_restarts: the most restarts (an integer ``≥ 0``; ``0``: one cycle of ``ncv``
        products, :func:`lanczos_eigsh` with ``num_iterations = ncv``).
      tol: stop once every wanted residual is ``≤ tol · max|θ|`` (as :func:`lanczos_eigsh`;
        a number ``≥ 0``, default ``√ε`` of the dtype: ``3.5e-4`` in float32, ``1.5e-8`` in
        float64; ``0`` runs every restart).
      dim, dtype: as :func:`hutchinson_trace`.
      return_residuals: also return the ``(k,)`` residual norms ``‖M vⱼ − λⱼ vⱼ‖``.

    Returns:
      ``(λ, V)`` as :func:`lanczos_eigsh`: the ``(k,)`` Ritz values ascending and the
      ``(d, k)`` orthonormal Ritz vectors (columns, flat order), each up to its sign; with
      ``return_residuals``, ``(λ, V, residuals)``. Pairs that have not converged after
      ``max_restarts`` restarts are returned as they are, with a ``RuntimeWarning`` naming
      the largest residual when called eagerly with ``tol > 0`` (ARPACK raises
      ``ArpackNoConvergence``); under ``jit``, check ``return_residuals``. Cost per
      cycle: ``ncv − p`` products one after the other (``ncv`` the first), ``≈ 2 ncv d``
      a step for the reorthogonalisation (twice that at a cycle's first step),
      ``ncv·p·d`` for the restart's Ritz vectors and an ``ncv × ncv`` ``eigh``.

    Raises:
      ValueError: ``k``, ``ncv`` or ``max_restarts`` out of range, an unknown ``which``, a
        negative ``tol``, and the errors of :func:`hutchinson_trace` (``dim``, ``key``).

    References:
      K. Wu & H. Simon, `Thick-restart Lanczos method for large symmetric eigenvalue
      problems <https://doi.org/10.1137/S0895479898334605>`_, SIAM J. Matrix Anal. Appl. 22
      (2000).
      G. W. Stewart, `A Krylov–Schur algorithm for large eigenproblems
      <https://doi.org/10.1137/S0895479800371529>`_, SIAM J. Matrix Anal. Appl. 23 (2001).
    """
    products, probes = _setup(M, key, k, "normal", dim, dtype, "k")
    start = probes(key, 1)[0]
    d = start.shape[0]
    if ncv is None:
        ncv = min(d, max(2 * k + 1, 20))
    _check_count(ncv, "ncv")
    _check_count(max_restarts, "max_restarts", minimum=0)
    if ncv > d:
        raise ValueError(f"ncv must be at most d = {d}; got {ncv}")
    _spectral.check_eigsh_options(k, which, ncv - 1, "k", bound="ncv − 1, the basis size "
                                  "less one")
    tol = _checked_tol(tol, start.dtype)
    config = (ncv, k + (ncv - k) // 2, k, which, tol, max_restarts)
    if _one_program(M):
        *pairs, converged = _trl_of_matrix(M, start, key, config)
    else:
        *pairs, converged = _trl(products, start, key, config)
    if tol > 0 and not isinstance(converged, jax.core.Tracer) and not bool(converged):
        warnings.warn(
            f"restarted_lanczos_eigsh: the {k} eigenpairs did not converge in {max_restarts} "
            f"restarts (the largest residual ‖M v − λ v‖ is {float(jnp.max(pairs[2])):.3g}, "
            f"above tol · max|θ| with tol = {tol:g}): raise max_restarts or ncv, or loosen "
            "tol; return_residuals=True returns each pair's residual", RuntimeWarning,
            stacklevel=2)
    return tuple(pairs) if return_residuals else tuple(pairs[:2])


def _trl(products: Callable[[jax.Array], jax.Array], start: jax.Array, key: jax.Array,
         config: tuple) -> tuple[jax.Array, jax.Array, jax.Array, Any]:
    """:func:`restarted_lanczos_eigsh`'s cycles: traced, a ``lax.while_loop`` of them (each
    a ``fori_loop`` of steps); with products answering concrete arrays (a
    ``PMatImplicit``'s own compiled chunk steps, a ``matvec``), driven from Python, one
    compiled step between products and the convergence test once a cycle. Returns the
    pairs, their residuals and whether the last test passed."""
    ncv, kept, k, which, tol, max_restarts = config

    def product(q):  # one vector through the rows interface, reshapes not indexing
        return products(q.reshape(1, -1)).reshape(-1)

    state = _trl_start(start, ncv)
    w = product(state[2])
    if isinstance(w, jax.core.Tracer):
        def steps(state, first, cycle):
            return jax.lax.fori_loop(first, ncv, lambda j, state: _trl_step(
                state, product(state[2]), j, jax.random.fold_in(key, cycle)), state)

        def cycle(carry):
            state, restarts, _ = carry
            state = steps(_trl_restart(state, kept, which), kept, restarts + 1)
            return state, restarts + 1, _trl_converged(state, k, which, tol)

        state = steps(state, 0, 0)
        state, _, converged = jax.lax.while_loop(
            lambda carry: (carry[1] < max_restarts) & ~carry[2], cycle,
            (state, 0, _trl_converged(state, k, which, tol)))
    else:
        for restarts in range(max_restarts + 1):
            first = 0 if restarts == 0 else kept
            if restarts:
                state = _trl_restart_compiled(state, kept, which)
                w = product(state[2])
            cycle_key = jax.random.fold_in(key, restarts)
            for j in range(first, ncv):
                state = _trl_step_compiled(state, w if j == first else product(state[2]), j,
                                           cycle_key)
            converged = bool(_trl_converged(state, k, which, tol))
            if converged:
                break
    return (*_trl_pairs(state, k, which), converged)


@functools.partial(jax.jit, static_argnums=3)
def _trl_of_matrix(M: PMatAbstract, start: jax.Array, key: jax.Array, config: tuple
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """:func:`_trl` of a representation whose products compile (all but ``PMatImplicit``):
    one program per structure, ``M`` an argument (bench_small's ``PMatDiag``: 20 steps
    eagerly 5.2 ms, as one program 1.2 ms)."""
    return _trl(M.mmap, start, key, config)


def _trl_start(start: jax.Array, ncv: int) -> tuple:
    """The state of :func:`restarted_lanczos_eigsh` before its first step: the basis
    ``V`` (``(ncv + 1, d)`` rows, the first the normalised start vector, the others zero
    until written), ``H = VᵀMV`` ``(ncv, ncv)``, the vector to multiply next, the norm
    ``β`` of the last residual and the largest ``‖M q‖`` seen (the scale of round-off)."""
    q = start / jnp.linalg.norm(start)
    basis = jnp.zeros((ncv + 1, start.shape[0]), start.dtype).at[0].set(q)
    beta, scale = jnp.zeros((2,), start.dtype)  # two buffers: both are donated
    return basis, jnp.zeros((ncv, ncv), start.dtype), q, beta, scale


def _trl_step(state: tuple, w: jax.Array, j: Any, key: jax.Array) -> tuple:
    """Step ``j`` of a cycle given ``w = M v_j``: the three-term recurrence ``w − α v_j −
    β v_{j−1}`` (``β = 0`` at a cycle's first step, whose ``w`` also has the thick part's
    couplings), then ``w`` orthogonalised against the whole basis (a second pass where the
    first cancelled much of it, as :func:`_lanczos_step`: at a cycle's first step, or an
    exhausted space), normalised into ``v_{j+1}``, or a random unit vector orthogonal to
    the basis where it vanished (``β = 0``: an invariant subspace). Column and row ``j`` of
    ``H`` are ``w``'s coefficients on the basis (``Vᵀ M v_j``: ``α``, ``β`` and the
    passes'). The recurrence first keeps the passes' coefficients small, so that one pass
    (two reads of the basis) is enough at the other steps: memory-bound, the basis read
    four times a step took 1.8× as long."""
    basis, projection, q, beta, scale = state
    d = q.shape[0]
    w = w.astype(q.dtype)
    scale = jnp.maximum(scale, jnp.linalg.norm(w))
    alpha = q @ w
    w = w - alpha * q - beta * basis[j - 1]  # row −1 (zero) at j = 0, where β = 0 too
    coefficients = basis @ w
    once = w - coefficients @ basis

    def again():
        more = basis @ once
        return once - more @ basis, coefficients + more

    w, coefficients = jax.lax.cond(jnp.linalg.norm(once) < 0.7 * jnp.linalg.norm(w), again,
                                   lambda: (once, coefficients))
    h = coefficients[:-1].at[j].add(alpha).at[j - 1].add(jnp.where(j > 0, beta, 0))
    projection = projection.at[:, j].set(h).at[j, :].set(h)
    beta = jnp.linalg.norm(w)
    grows = _grows(beta, jnp.linalg.norm(once), scale)

    def fresh():
        v = jax.random.normal(jax.random.fold_in(key, j), (d,), q.dtype)
        for _ in range(2):
            v = v - (basis @ v) @ basis
        return v / jnp.linalg.norm(v)

    new = jax.lax.cond(grows, lambda: w / beta, fresh)
    return basis.at[j + 1].set(new), projection, new, jnp.where(grows, beta, 0), scale


def _trl_restart(state: tuple, kept: int, which: str) -> tuple:
    """The thick restart: the ``kept`` Ritz vectors ``V sⱼ`` that ``which`` prefers become
    the first basis vectors with ``H = diag(θⱼ)``, the last residual's direction the next
    one (its couplings ``β s_{ncv,j}`` are recomputed by the next step's coefficients)."""
    basis, projection, _, beta, scale = state
    theta, s = jnp.linalg.eigh(projection)
    chosen = _spectral.select(theta, kept, which)
    ritz = s[:, chosen].T @ basis[:-1]
    residual = basis[-1]
    basis = jnp.zeros_like(basis).at[:kept].set(ritz).at[kept].set(residual)
    projection = jnp.zeros_like(projection).at[jnp.arange(kept), jnp.arange(kept)].set(
        theta[chosen])
    return basis, projection, residual, jnp.zeros_like(beta), scale  # β: no recurrence


def _trl_ritz(state: tuple, k: int, which: str) -> tuple[jax.Array, ...]:
    """The ``k`` Ritz values ``which`` names (ascending), their ``s``, their residuals
    ``β |s_{ncv,j}|`` and ``max|θ|``."""
    _, projection, _, beta, _ = state
    theta, s = jnp.linalg.eigh(projection)
    chosen = _spectral.select(theta, k, which)
    return theta[chosen], s[:, chosen], beta * jnp.abs(s[-1, chosen]), jnp.max(jnp.abs(theta))


def _trl_pairs(state: tuple, k: int, which: str) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The ``k`` Ritz pairs (values ascending, ``(d, k)`` vectors) and their residuals."""
    values, s, residuals, _ = _trl_ritz(state, k, which)
    return values, state[0][:-1].T @ s, residuals


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _trl_converged(state: tuple, k: int, which: str, tol: float) -> jax.Array:
    """Every wanted residual at most ``tol · max|θ|``."""
    _, _, residuals, theta_max = _trl_ritz(state, k, which)
    return jnp.all(residuals <= tol * theta_max)


_trl_step_compiled = donating_jit(_trl_step, donate_argnums=0)
_trl_restart_compiled = donating_jit(_trl_restart, donate_argnums=0, static_argnums=(1, 2))


def lobpcg_eigsh(M: Operator, key: jax.Array, k: int, *, which: str = "LA",
                 num_iterations: int = 100, tol: float | None = None, dim: int | None = None,
                 dtype: Any = None, return_residuals: bool = False
                 ) -> tuple[jax.Array, jax.Array] | tuple[jax.Array, jax.Array, jax.Array]:
    """``k`` extreme eigenpairs of a symmetric ``M`` by LOBPCG (Knyazev, 2001): a block
    method, each iteration one product of ``M`` with a block of ``3k`` vectors (the
    iterates ``X``, their residuals ``R`` and the previous directions ``P``) and a
    Rayleigh–Ritz step on their span. Where :func:`lanczos_eigsh` takes ``n ≥ 2k``
    products one after the other, LOBPCG takes each iteration's ``3k`` at once
    (``M.mmap``: a ``PMatImplicit`` streams its data once an iteration for the whole
    block, its ``jvp``/``vjp`` batched), and its memory is ``O(k d)`` whatever the number
    of iterations (Lanczos: ``n d``). JAX's ``lobpcg_standard``
    (``jax.experimental.sparse.linalg``) does the iterations; this wraps it for any
    representation or ``matvec``, ``"SA"`` included (the top pairs of ``−M``), with one
    compiled program per matrix structure when called eagerly (a new ``matvec`` closure
    compiled anew at every call otherwise, the matrix's arrays baked in as constants).

    Convergence is linear at a rate set by the gap ``λ_k / λ_{k+1}`` (faster than a power
    iteration of the block, not than Lanczos for one vector); a pair has converged when its
    residual ``‖M vⱼ − λⱼ vⱼ‖`` is below ``tol · (|λⱼ| + ‖M vⱼ‖) / 2 ≈ tol · |λⱼ|``, and the
    iterations end when all ``k`` have (JAX's own test, ``tol_JAX · 10 · d · (…)``, is
    given ``tol_JAX = tol / (20 d)``: with JAX's default the residuals it accepts grow with
    ``d``, 26% of ``λ_max`` on a 670k-parameter float32 Fisher). In float32 the residuals
    reach ``≈ 1e-6 |λ|`` at best (measured); a smaller ``tol`` runs every iteration.

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (the ``(d, k)`` normal start block).
      k: the number of eigenpairs, ``1 ≤ k`` and ``5k < d`` (JAX's limit).
      which: ``"LA"`` (the largest, default) or ``"SA"`` (the smallest). For the largest
        in magnitude of an indefinite matrix use :func:`lanczos_eigsh` (``"LM"``).
      num_iterations: the most iterations (``≥ 1``), each ``3k`` products at most.
      tol: the relative residual of convergence, as above (a number ``≥ 0``, static;
        default ``√ε`` of the dtype: ``3.5e-4`` in float32, ``1.5e-8`` in float64).
      dim, dtype: as :func:`hutchinson_trace`.
      return_residuals: also return the ``(k,)`` residual norms ``‖M vⱼ − λⱼ vⱼ‖`` (``k``
        more products, one block).

    Returns:
      ``(λ, V)`` as :func:`lanczos_eigsh`: the ``(k,)`` eigenvalue estimates ascending and
      the ``(d, k)`` orthonormal vectors (columns, flat order), each up to its sign; with
      ``return_residuals``, ``(λ, V, residuals)``; for the zero matrix (every vector an
      eigenvector), zeros and the start block orthonormalised. Cost: per iteration ``3k``
      products in one block, ``O(d k²)`` for the orthonormalisation and a ``3k × 3k``
      ``eigh``.

    Raises:
      ValueError: ``k`` not an integer with ``1 ≤ k`` and ``5k < d``, ``num_iterations``
        not an integer ``≥ 1``, ``tol`` negative, ``which`` not ``"LA"``/``"SA"``, and the
        errors of :func:`hutchinson_trace` (``dim``, ``key``).

    Reference: A. V. Knyazev, `Toward the optimal preconditioned eigensolver: locally
    optimal block preconditioned conjugate gradient method
    <https://doi.org/10.1137/S1064827500366124>`_, SIAM J. Sci. Comput. 23 (2001).
    """
    products, probes = _setup(M, key, k, "normal", dim, dtype, "k")
    _check_count(num_iterations, "num_iterations")
    if which not in ("LA", "SA"):
        raise ValueError(f"lobpcg_eigsh takes which='LA' or 'SA'; got {which!r} (for the "
                         "largest in magnitude, 'LM', use lanczos_eigsh)")
    _checked_tol(tol)  # before drawing the probes
    start = probes(key, k)
    if 5 * k >= start.shape[1]:
        raise ValueError(f"lobpcg_eigsh needs 5k < d (JAX's lobpcg_standard); got k={k} for "
                         f"d={start.shape[1]}: use lanczos_eigsh, or a stored matrix's eigsh")
    sign = 1 if which == "LA" else -1
    d = start.shape[1]
    tol = _checked_tol(tol, start.dtype) / (20 * d)
    if isinstance(M, PMatAbstract):
        return _lobpcg(M, start, sign, num_iterations, tol, return_residuals)
    return _lobpcg_of_function(M, start, sign, num_iterations, tol, return_residuals)


def _lobpcg_body(products, start, sign, num_iterations, tol, return_residuals):
    from jax.experimental.sparse.linalg import lobpcg_standard

    def block(x):  # (d, m) -> ±M x
        return sign * products(x.T).T

    theta, vectors, _ = lobpcg_standard(block, start.T, m=num_iterations, tol=tol)
    theta, vectors = jax.lax.cond(jnp.any(jnp.isnan(theta)),
                                  functools.partial(_null_block_pairs, products),
                                  lambda *pairs: pairs[1:], start, theta, vectors)
    order = jnp.argsort(sign * theta)
    values, vectors = sign * theta[order], vectors[:, order]
    if not return_residuals:
        return values, vectors
    return values, vectors, jnp.linalg.norm(products(vectors.T).T - vectors * values, axis=0)


def _null_block_pairs(products, start, theta, vectors):
    """LOBPCG's pairs where JAX's iterations answered NaN: ``(0, Q)`` (``Q`` the start
    block orthonormalised) when ``M`` maps the start block to zero — the zero matrix, a dead
    network's Fisher: every vector an eigenvector of ``0``, whose exactly zero residuals
    JAX's iterations normalise (0/0) since its relative test never accepts them —, else
    the NaN as it was (non-finite data)."""
    null = jnp.all(products(start) == 0)
    basis = jnp.linalg.qr(start.T)[0]
    return (jnp.where(null, jnp.zeros_like(theta), theta),
            jnp.where(null, basis.astype(vectors.dtype), vectors))


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _lobpcg(M, start, sign, num_iterations, tol, return_residuals):
    """:func:`lobpcg_eigsh` of a representation: ``M`` an argument, so that an eager call
    compiles once per structure and never bakes ``M``'s arrays into the program."""
    return _lobpcg_body(M.mmap, start, sign, num_iterations, tol, return_residuals)


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4, 5))
def _lobpcg_of_function(matvec, start, sign, num_iterations, tol, return_residuals):
    """:func:`lobpcg_eigsh` of a ``matvec``: compiled once per function (not per call)."""
    return _lobpcg_body(jax.vmap(matvec), start, sign, num_iterations, tol, return_residuals)


def _nonzero_start_vectors(estimator: Callable) -> Callable:
    """``estimator(M, vectors, ...)`` with concrete ``vectors`` checked first, before a
    compiled call traces them: a zero row has no spectral measure (its Lanczos answered a
    NaN node of weight 1)."""

    @functools.wraps(estimator)
    def checked(M: Operator, vectors: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(vectors, jax.core.Tracer) and np.ndim(vectors) == 2:
            zero = np.flatnonzero(~np.any(np.asarray(vectors) != 0, axis=1))
            if zero.size:
                raise ValueError("the start vectors must be nonzero (each is normalised); "
                                 f"rows {zero.tolist()} are 0")
        return estimator(M, vectors, *args, **kwargs)

    return checked


@_nonzero_start_vectors
@_one_program_when_eager
def lanczos_quadrature(M: Operator, vectors: jax.Array, num_steps: int, *,
                       reorthogonalization: str = "full") -> tuple[jax.Array, jax.Array]:
    """Gauss quadrature of the spectral measures of a symmetric ``M`` at given vectors,
    by Lanczos: the deterministic core of :func:`lanczos_spectral_density`.

    For a unit vector ``q`` and ``M = Σₗ λₗ uₗuₗᵀ``, the spectral measure
    ``μ_q = Σₗ (uₗᵀq)² δ_{λₗ}`` has the moments ``∫ t^p dμ_q = qᵀ M^p q``. ``k`` Lanczos
    steps from ``q`` (full reorthogonalisation, as :func:`lanczos_eigenvalues`) give the
    tridiagonal ``T = V Θ Vᵀ``; the nodes ``θⱼ`` (Ritz values) and weights
    ``wⱼ = V₀ⱼ²`` (``Σⱼ wⱼ = 1``) are the ``k``-point Gauss quadrature of ``μ_q``:

    .. math::  \\sum_{j=1}^k w_j\\, \\theta_j^p = q^\\top M^p q
       \\quad\\text{for } p \\le 2k - 1,

    so ``Σⱼ wⱼ f(θⱼ) ≈ qᵀ f(M) q`` for smooth ``f``, exactly for a polynomial of degree
    ``≤ 2k − 1``, and for every ``f`` once the Krylov space of ``q`` is exhausted
    (``k = d``, or fewer for a low-rank ``M``: the nodes past it have weight ``0``).

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      vectors: the ``(m, d)`` start vectors (rows; nonzero, any norm: each is normalised),
        e.g. the ``d`` rows of the identity, for which the mean quadrature is the exact
        spectral density of ``M`` when ``num_steps = d``.
      num_steps: ``k``, ``1 ≤ k ≤ d``.
      reorthogonalization: as :func:`lanczos_eigenvalues`; ``"partial"`` gives the same
        nodes and weights to working precision with fewer passes over the basis.

    Returns:
      ``(nodes, weights)``, both ``(m, k)``: row ``i`` is the quadrature of
      ``μ_{vᵢ/‖vᵢ‖}``, nodes ascending, weights ``≥ 0`` summing to ``1``. Cost: ``k``
      rounds of products of ``M`` on all ``m`` vectors at once (``M.mmap``: a
      ``PMatImplicit`` streams its data ``k`` times in all), ``≈ 3 m k² d`` for the
      reorthogonalisation, memory ``m·k·d``.
    """
    vectors = jnp.asarray(vectors)
    if vectors.ndim != 2:
        raise ValueError(f"vectors must be an (m, d) array of rows; got shape {vectors.shape}")
    if isinstance(M, PMatAbstract) and vectors.shape[1] != M.size(0):
        raise ValueError(f"vectors have {vectors.shape[1]} columns but the matrix is "
                         f"{M.size(0)} × {M.size(0)}")
    products, _, _ = _operator(M, vectors.shape[1], vectors.dtype)
    return _gauss_quadrature(_lanczos(products, vectors, num_steps,
                                      partial=_partial(reorthogonalization)))


@_one_program_when_eager
def lanczos_spectral_density(M: Operator, key: jax.Array, *, num_steps: int,
                             num_probes: int, distribution: str = "rademacher",
                             dim: int | None = None, dtype: Any = None,
                             reorthogonalization: str = "full"
                             ) -> tuple[jax.Array, jax.Array]:
    """Stochastic Lanczos quadrature (SLQ): the spectral density of a symmetric ``M``, as
    nodes and weights, from products only (PyHessian's density, curvlinops'
    ``lanczos_approximate_spectrum``).

    The spectral density of ``M`` (eigenvalues ``λ₁ … λ_d``) is
    ``φ(t) = (1/d) Σₗ δ(t − λₗ)``; for a random probe ``v`` with ``E[v vᵀ] = I`` and
    ``q = v/‖v‖``, ``E[qᵀ f(M) q] = (1/d) tr f(M) = ∫ f φ`` (Rademacher probes:
    ``‖v‖² = d`` always; normal ones: ``q`` uniform on the sphere). Each probe's
    :func:`lanczos_quadrature` ``(θᵢⱼ, wᵢⱼ)`` estimates it, and the mean over the ``m``
    probes is the SLQ estimate

    .. math::  \\varphi(t) \\approx \\frac1m \\sum_{i=1}^m \\sum_{j=1}^k
       w_{ij}\\, \\delta(t - \\theta_{ij}), \\qquad
       \\operatorname{tr} f(M) \\approx \\frac dm \\sum_{i,j} w_{ij} f(\\theta_{ij})

    (``f = log``: a log-determinant; ``f(t) = t^p``: the moments, exact in expectation for
    ``p ≤ 2k − 1``). :func:`spectral_density_on_grid` broadens it into a smooth curve on a
    grid of yours, :func:`spectral_density_curve` on one chosen from the spectrum.

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (the probes).
      num_steps: ``k``, Lanczos steps per probe, ``1 ≤ k ≤ d`` (PyHessian's ``iter``).
      num_probes: ``m ≥ 1`` (PyHessian's ``n_v``).
      distribution, dim, dtype: as :func:`hutchinson_trace`.
      reorthogonalization: as :func:`lanczos_eigenvalues`; ``"partial"`` gives the same
        nodes and weights to working precision with fewer passes over the basis.

    Returns:
      ``(nodes, weights)``, both ``(num_probes, num_steps)``: per probe, the Ritz values
      (ascending) and their weights (``≥ 0``, summing to ``1``). Cost: ``k`` rounds of
      ``m`` products (``m·k`` products; a ``PMatImplicit`` streams its data ``k`` times),
      ``≈ 3 m k² d`` more, memory ``m·k·d``; a few compiled programs whatever ``k``.

    References:
      Ubaru, Chen & Saad, `Fast estimation of tr(f(A)) via stochastic Lanczos quadrature
      <https://doi.org/10.1137/16M1104974>`_, SIAM J. Matrix Anal. Appl., 2017.
      Lin, Saad & Yang, `Approximating spectral densities of large matrices
      <https://arxiv.org/abs/1308.5467>`_, SIAM Review, 2016.
      Ghorbani, Krishnan & Xiao, `An investigation into neural net optimization via
      Hessian eigenvalue density <https://arxiv.org/abs/1901.10159>`_, 2019.
    """
    products, probes = _setup(M, key, num_probes, distribution, dim, dtype, "num_probes")
    return _gauss_quadrature(_lanczos(products, probes(key, num_probes), num_steps,
                                      partial=_partial(reorthogonalization)))


def spectral_density_on_grid(nodes: jax.Array, weights: jax.Array, grid: jax.Array, *,
                             sigma: float) -> jax.Array:
    """The quadrature's spectral density broadened by a Gaussian of width ``sigma``, on a
    grid (PyHessian's ``density_generate``):

    .. math::  \\varphi_\\sigma(t) = \\frac{\\sum_{i,j} w_{ij}\\,
       \\mathcal N(t;\\, \\theta_{ij}, \\sigma^2)}{\\sum_{i,j} w_{ij}}

    — the mean over probes of :func:`lanczos_spectral_density`'s estimate, convolved with
    ``N(0, σ²)``. A density: ``≥ 0`` with integral ``1`` over ℝ (on a grid that extends a
    few ``σ`` beyond the extreme nodes, e.g. ``jnp.linspace(nodes.min() − 5σ,
    nodes.max() + 5σ, 1000)``, a Riemann sum of it is ``1`` to within the grid's
    resolution). ``σ`` is in the units of the eigenvalues; a spectrum spanning orders of
    magnitude is better looked at through the nodes ``log(|θ| + ε)`` (same weights) with a
    ``σ`` in log units.

    Args:
      nodes, weights: arrays of one shape (``(m, k)`` from
        :func:`lanczos_spectral_density`, or any), weights ``≥ 0``, not all ``0``.
      grid: the points ``t``, any shape.
      sigma: ``σ > 0``.

    Returns:
      The density at ``grid``, ``grid``'s shape. Cost: ``O(m·k·len(grid))``.
    """
    nodes, weights, grid = jnp.asarray(nodes), jnp.asarray(weights), jnp.asarray(grid)
    if nodes.shape != weights.shape:
        raise ValueError(f"nodes and weights must have one shape; got {nodes.shape} and "
                         f"{weights.shape}")
    if isinstance(sigma, (int, float)) and not sigma > 0:
        raise ValueError(f"sigma must be positive; got {sigma!r}")
    t = (grid[..., None] - nodes.ravel()) / sigma
    kernel = jnp.exp(-0.5 * t**2) / (sigma * jnp.sqrt(2 * jnp.pi))
    return kernel @ weights.ravel() / jnp.sum(weights)


def spectral_density_curve(nodes: jax.Array, weights: jax.Array, *, num_points: int = 1024,
                           kappa: float = 3.0, margin: float = 0.05,
                           boundaries: tuple[float, float] | None = None
                           ) -> tuple[jax.Array, jax.Array]:
    """The quadrature's spectral density on a grid chosen from the spectrum, with the
    Gaussians' width chosen from the number of Lanczos steps: Papyan's (2020) recipe,
    curvlinops' ``lanczos_approximate_spectrum``.

    The grid is ``num_points`` points evenly over ``[λ₋ − μw, λ₊ + μw]``, for
    ``(λ₋, λ₊) = boundaries`` (by default the smallest and largest node: Lanczos' extreme
    Ritz values, which converge first to ``λ_min``, ``λ_max``), ``w = λ₊ − λ₋`` and
    ``μ = margin`` (nodes all equal to one ``λ``: ``[λ₋, λ₊] = λ ± |λ|/2``, or ``± 1/2``
    at ``λ = 0``); on it, :func:`spectral_density_on_grid` with
    ``σ = h · 2/((k − 1) √(8 ln κ))``, ``h`` the half-width of the grid's interval and
    ``k`` the number of Lanczos steps (the nodes' last axis): on the spectrum rescaled to
    ``[−1, 1]``, bumps whose width at ``1/κ`` of their height is the nodes' mean spacing
    there.

    Args:
      nodes, weights: ``(m, k)`` (:func:`lanczos_spectral_density`), ``k ≥ 2``.
      num_points: the grid's size.
      kappa: ``κ > 1`` (default 3, Papyan's).
      margin: ``μ ≥ 0`` (default 0.05, Papyan's).
      boundaries: ``(λ₋, λ₊)`` with ``λ₋ < λ₊`` (e.g. from :func:`lanczos_eigsh` with
        ``"SA"`` and ``"LA"``), or ``None``.

    Returns:
      ``(grid, density)``, both ``(num_points,)``. Jit-able (``num_points`` static).

    References:
      V. Papyan, `Traces of class/cross-class structure pervade deep learning spectra
      <https://jmlr.org/papers/v21/20-933.html>`_, JMLR 2020 (Algorithm 2, §D.2).
    """
    nodes, weights = jnp.asarray(nodes), jnp.asarray(weights)
    if nodes.ndim < 1 or nodes.shape[-1] < 2:
        raise ValueError("nodes must hold k ≥ 2 Lanczos nodes on their last axis; got shape "
                         f"{nodes.shape}")
    _check_count(num_points, "num_points", 2)
    if not kappa > 1 or not margin >= 0:
        raise ValueError(f"kappa must be > 1 and margin ≥ 0; got kappa={kappa!r}, "
                         f"margin={margin!r}")
    if boundaries is not None and not any(isinstance(b, jax.core.Tracer) for b in boundaries) \
            and not float(boundaries[0]) < float(boundaries[1]):
        raise ValueError("boundaries must be (λ₋, λ₊) with λ₋ < λ₊; got "
                         f"{tuple(float(b) for b in boundaries)}")
    low, high = (jnp.min(nodes), jnp.max(nodes)) if boundaries is None else boundaries
    # a spectrum of one point (all nodes equal: a multiple of the identity) spans |λ| (1 at
    # λ = 0) around it, not a grid of width 0 and bumps of width 0 (NaN)
    point = jnp.where(high > low, 0, jnp.where(high != 0, jnp.abs(high), 1) / 2)
    low, high = low - point, high + point
    pad = margin * (high - low)
    low, high = low - pad, high + pad
    grid = jnp.linspace(low, high, num_points, dtype=nodes.dtype)
    sigma = (high - low) / 2 * 2 / ((nodes.shape[-1] - 1) * np.sqrt(8 * np.log(kappa)))
    return grid, spectral_density_on_grid(nodes, weights, grid, sigma=sigma)


# ----------------------------------------------------------------------------- helpers
def _summed(x: jax.Array, axis: int | None = None) -> jax.Array:
    """``jnp.sum(x, axis)`` (all of ``x``: ``None``) as a product with a vector of ones, for
    an ``x`` made from matrix products. XLA:CPU (jaxlib 0.10) hands a reduction to YNNPACK
    with the products before it fused in, and ran the fusion 6× slower than the parts:
    Hutch++'s ``Σ g ⊙ M g`` with ``g = G − (G Q) Qᵀ``, 7 rows of 670k (``PMatDiag``, 2-core
    CPU), 53 ms, 8.5 ms as a product."""
    if axis is None:
        return jnp.sum(_summed(x, x.ndim - 1))
    return jnp.tensordot(x, jnp.ones(x.shape[axis], x.dtype), axes=([axis], [0]))


#: the reorthogonalisations of the Lanczos estimators (:func:`_omega_step`)
REORTHOGONALIZATIONS = ("full", "partial")


def _partial(reorthogonalization: Any) -> bool:
    """Whether ``reorthogonalization`` asks for partial reorthogonalisation; refused by
    name unless one of :data:`REORTHOGONALIZATIONS`."""
    if reorthogonalization not in REORTHOGONALIZATIONS:
        raise ValueError(f"reorthogonalization must be one of {REORTHOGONALIZATIONS}; got "
                         f"{reorthogonalization!r}")
    return reorthogonalization == "partial"


def _check_count(count: Any, what: str, minimum: int = 1) -> None:
    if isinstance(count, bool) or not isinstance(count, numbers.Integral) or count < minimum:
        raise ValueError(f"{what} must be an integer ≥ {minimum}; got {count!r}")


def _checked_tol(tol: Any, dtype: Any = None) -> float | None:
    """An eigensolver's ``tol`` as a Python float (``None``: ``√ε`` of ``dtype`` when given,
    else ``None``); anything but a real number ``≥ 0`` refused."""
    if tol is None:
        return None if dtype is None else float(np.sqrt(np.finfo(dtype).eps))
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not tol >= 0:
        raise ValueError(f"tol must be a number ≥ 0; got {tol!r}")
    return float(tol)


def _operator(M: Operator, dim: int | None, dtype: Any
              ) -> tuple[Callable[[jax.Array], jax.Array], int, Any]:
    """``(products, d, dtype)``: ``M`` applied to the rows of an ``(m, d)`` array, its
    dimension and the probes' dtype; the arguments checked."""
    if isinstance(M, PMatAbstract):
        if dim is not None and dim != M.size(0):
            raise ValueError(f"dim={dim} but the matrix is {M.size(0)} × {M.size(0)}")
        products, dim, dtype = M.mmap, M.size(0), M.dtype
    elif callable(M):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or dim < 1:
            raise ValueError(
                "for a matvec function M, give the dimension d of its vectors: dim=d "
                f"(a positive integer); got {dim!r}")
        products = _shape_checked(jax.vmap(M), dim)
        dtype = jnp.result_type(float) if dtype is None else dtype  # JAX default float
    else:
        raise TypeError(
            "M must be a jaxgeom representation (a PMat*) or a function v -> M v on flat "
            f"vectors; got {type(M).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"the probes' dtype must be a real floating type; got {dtype}")
    return products, dim, dtype


def _setup(M: Operator, key: jax.Array, num_samples: Any, distribution: str,
           dim: int | None, dtype: Any, what: str, minimum: int = 1
           ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array, int], jax.Array]]:
    """``(products, probes)``: ``M`` applied to the rows of an ``(m, d)`` array, and
    ``probes(key, m)`` drawing ``m`` probe rows; the arguments checked."""
    check_key(key, "key")
    _check_count(num_samples, what, minimum)
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid: {DISTRIBUTIONS}")
    products, dim, dtype = _operator(M, dim, dtype)

    def probes(k: jax.Array, m: int) -> jax.Array:
        if distribution == "normal":
            return jax.random.normal(k, (m, dim), dtype)
        return rademacher_probes(k, (m, dim), dtype)

    return products, probes


@functools.partial(jax.jit, static_argnums=(1, 2))
def rademacher_probes(key: jax.Array, shape: tuple[int, int], dtype: Any) -> jax.Array:
    """``(m, d)`` independent signs ``±1`` (each with probability ½): the estimators'
    Rademacher probes. One random bit per sign, 32 from each 32-bit word of
    ``jax.random.bits`` (``jax.random.rademacher`` draws a whole word per sign: its
    20 × 669,706 probes took 186 ms on a 2-core CPU, these 26 ms); one compiled call,
    so that the bits are unpacked in one fused pass when called eagerly."""
    m, d = shape
    words = jax.random.bits(key, (m, -(-d // 32)), jnp.uint32)
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (2 * bits.reshape(m, -1)[:, :d].astype(dtype) - 1).astype(dtype)


def _one_program(M: Operator) -> bool:
    """Whether an estimator's steps on ``M`` run as one compiled program with ``M`` an
    argument: a representation whose products compile and do not run the model (all but
    ``PMatImplicit``, each of whose eager products is a compiled call of its own, compiled
    as a model step; a ``matvec`` closure would be compiled anew at every call)."""
    return isinstance(M, PMatAbstract) and M._compiles_in_one_program()


def _lanczos(products: Callable[[jax.Array], jax.Array], start: jax.Array,
             num_steps: Any, what: str = "num_steps", *, restart: jax.Array | None = None,
             return_basis: bool = False,
             stop: Callable[..., Any] | None = None, partial: bool = False
             ) -> jax.Array | tuple:
    """The ``(m, k, k)`` tridiagonals ``Q_kᵀ M Q_k`` of ``k`` Lanczos steps from each of
    the ``m`` rows of ``start`` at once (one product of ``M`` on ``m`` rows per step), with
    full reorthogonalisation (:func:`_lanczos_step`); a Krylov space exhausted before step
    ``k`` is not grown further (the rest of ``T`` is ``0``), or, given a ``restart`` key,
    goes on from a new normal vector orthogonal to the basis (``β = 0`` there: ``T`` block
    diagonal, an invariant subspace found; the basis stays orthonormal, so Ritz vectors
    stay unit vectors). With ``return_basis``, also the orthonormal bases ``Q_k`` as row
    blocks (:func:`_lanczos_blocks`; :func:`_ritz_vectors` combines them), the ``(m,)``
    norms ``β_k`` of the last residuals ``r = (I − Q_kᵀQ_k) M q_k``, for which
    ``M Q_kᵀ = Q_kᵀ T + r e_kᵀ``, and the number of steps taken. With ``stop`` (and
    ``return_basis``): after 7, 15, 23, 31, 47, … steps (:func:`_stop_test_steps`),
    ``stop(T, β, k)`` on the ``(m, j, j)`` tridiagonal and the residual norms of the ``j``
    steps so far answers whether to end the iteration there and what it found (a pytree
    whose shapes do not depend on ``j``: :class:`_ResidualsBelow`'s Ritz pairs), returned
    as a fifth element — the findings of the test that stopped, or of ``stop`` on all
    ``k`` steps.
    Driven from Python, a stop returns the ``j`` steps' ``T`` and residuals (the basis
    blocks whole, zero past row ``j``); traced, the steps after it are skipped
    (``lax.cond``, no product; under ``vmap`` both branches run), each test is a branch of
    a ``lax.switch`` on its own steps' ``T`` (an ``eigh`` of ``j`` rows, not ``k``: a test
    of the whole padded ``T`` made a run of at most 400 steps stopped after 63 take 26
    ms, not 7), the shapes stay those of ``k`` steps (``T``'s leading ``j × j`` block is
    that of the ``j`` steps) and ``j`` is traced.

    Every step is one function of the step index ``j`` (traced). The basis is allocated
    whole, in blocks of rows ``[0, 8), [8, 16), [16, 32), …`` (doubling), each zero until
    written; step ``j`` reads the blocks up to that of row ``j + 1`` (those past it skipped
    by ``lax.cond``) — at most ``≈ 1.35×`` the work of its ``j + 1`` rows, with no copy of
    them — and writes row ``j + 1`` into its block. Traced (under ``jit``, or an operator
    closing over traced arrays) the steps are one ``lax.fori_loop``, one step in the
    program whatever ``k``; with an operator answering concrete arrays (a
    ``PMatImplicit``, whose products run their own compiled chunk steps) they are driven
    from Python, each one call of one compiled update (:func:`_lanczos_step`, the blocks
    updated in place). Steps unrolled with growing shapes compiled anew at every step (80
    steps on a 110-parameter CNN took 14–21 s to compile under ``jit``, 12 s eagerly); a
    step program per block (a loop each) compiled 2–3× longer than this one step (2-core
    EPYC: 100 steps 2.4–3.3 against 1.0–1.5 s); warm, the same within noise, but 6–25%
    slower under ``jit`` where the products take microseconds (the per-block conditions
    and row writes).
    """
    m, d = start.shape
    _check_count(num_steps, what)
    if num_steps > d:
        raise ValueError(f"{what} must be at most d = {d}; got {num_steps}")
    # blocks, q_j, q_{j−1}, α, β, scale, the estimates of orthogonality (partial)
    state = _compiled_lanczos_start(start, num_steps, partial)
    w = products(state[1])  # M q_j for the next step; after the last one, M q_{k−1}
    tests = _stop_test_steps(num_steps) if stop is not None else ()
    running, taken, found = True, num_steps, None  # traced with ``stop``: arrays
    traced = isinstance(w, jax.core.Tracer)
    if traced and not tests:
        def advance(j, carry):
            state = _lanczos_step(carry[0], carry[1], j, restart)
            return state, products(state[1]).astype(w.dtype)

        state, w = jax.lax.fori_loop(0, num_steps - 1, advance, (state, w))
    elif traced:
        # the test after the steps done on their own T (static shapes: an eigh of 100 rows
        # took 0.6 ms, of 15 rows 27 µs), one branch of a switch each, or none (the last)
        def no_test(alphas, betas, found):
            return jnp.asarray(False), found

        branches = [functools.partial(_stop_test_after, stop, done=t) for t in tests]
        branches.append(no_test)

        def step_and_test(j, carry):
            state, w, running, taken, found = carry
            state = _lanczos_step(state, w, j, restart)
            done = j + 1
            ends, found = jax.lax.switch(
                jnp.argmax(jnp.append(jnp.asarray(tests), done) == done), branches,
                state[3], state[4], found)
            w = jax.lax.cond(ends, lambda q: w, lambda q: products(q).astype(w.dtype),
                             state[1])
            return state, w, ~ends, jnp.where(ends, done, taken), found

        def stopped(j, carry):
            return carry

        found = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(
            functools.partial(_stop_test_after, stop, done=tests[-1]), state[3], state[4],
            None)[1])
        state, w, running, taken, found = jax.lax.fori_loop(
            0, num_steps - 1, lambda j, carry: jax.lax.cond(
                carry[2], step_and_test, stopped, j, carry),
            (state, w, jnp.asarray(True), jnp.asarray(num_steps), found))
    else:
        for j in range(num_steps - 1):
            state = _lanczos_step_compiled(state, w, j, restart)
            if j + 1 in tests:
                ends, found, tridiagonal, residual = _compiled_stop_test(
                    stop, state[3], state[4], j + 1)
                if bool(ends):
                    return tridiagonal, state[0], residual, j + 1, found
            w = products(state[1])
    blocks, _, _, alphas, betas, _, _ = state
    if not traced:
        tridiagonal, residual = _compiled_last_step(state, alphas, w, return_basis)
        if stop is not None:
            found = _compiled_stop_pairs(stop, tridiagonal, residual)
    elif running is True:
        tridiagonal, residual = _last_step(state, alphas, w, return_basis)
        if stop is not None:
            found = _stop_pairs(stop, tridiagonal, residual)
    else:  # stopped under a trace after ``taken`` steps, or run to the end (``taken = k``)
        alphas, residual = jax.lax.cond(
            running, lambda alphas: _last_step(state, alphas, w, return_basis,
                                               tridiagonal=False),
            lambda alphas: (alphas, betas[:, taken - 1]), alphas)
        tridiagonal = _tridiagonal(alphas, betas[:, :-1])  # its leading taken × taken block
        found = jax.lax.cond(running, lambda: _stop_pairs(stop, tridiagonal, residual),
                             lambda: found)
    if not return_basis:
        return tridiagonal
    if stop is None:
        return tridiagonal, blocks, residual, taken
    return tridiagonal, blocks, residual, taken, found


def _stop_test_steps(num_steps: int) -> tuple[int, ...]:
    """The numbers of steps after which :func:`_lanczos` tests its ``stop``, below
    ``num_steps − 1``: those filling a block of the basis (:func:`_lanczos_blocks`: 7, 15,
    31, 63, …) and those filling half of a block of 32 rows or more (23, 47, 95, …), so
    that a run stops after at most ``1.5×`` the steps it needed (bench_small's Fisher,
    top 5 to ``10⁻³``: converged after 32 steps, stopped after 63 with the block ends
    alone, 47 now). Each test is an ``eigh`` of the steps' ``T``: ``≈ 0.1 ms`` at 31 rows,
    ``0.3 ms`` at 63, and a branch (or an eager program) compiled."""
    steps, end = [], 8
    while end // 2 < num_steps:
        if end >= 32:
            steps.append(3 * end // 4 - 1)
        steps.append(end - 1)
        end *= 2
    return tuple(t for t in steps if t < num_steps - 1)


def _lanczos_start(start: jax.Array, num_steps: int, partial: bool = False) -> tuple:
    """:func:`_lanczos`'s first state from the ``(m, d)`` start vectors: the basis blocks
    (zero but for the normalised start rows), ``q_0``, ``q_{−1} = 0``, ``α``, ``β``, the
    largest product norm so far (zero), and with ``partial`` reorthogonalisation the
    estimates ``ω`` of ``q_jᵀ q_i`` for ``q_0`` and ``q_{−1}`` and whether the next step
    must reorthogonalise (:func:`_omega_step`); ``None`` without."""
    m, d = start.shape
    dtype = start.dtype
    q = start / jnp.linalg.norm(start, axis=1, keepdims=True)
    blocks = tuple(jnp.zeros((m, high - low, d), dtype)
                   for low, high in _lanczos_blocks(num_steps))
    orthogonality = None
    if partial:
        omega = jnp.zeros((m, num_steps), dtype).at[:, 0].set(1)
        orthogonality = omega, jnp.zeros_like(omega), jnp.asarray(False)
    return ((blocks[0].at[:, 0].set(q),) + blocks[1:], q, jnp.zeros_like(q),
            jnp.zeros((m, num_steps), dtype), jnp.zeros((m, num_steps), dtype),
            jnp.zeros((m,), dtype), orthogonality)


def _last_step(state: tuple, alphas: jax.Array, w: jax.Array, return_basis: bool,
               tridiagonal: bool = True) -> tuple[jax.Array, jax.Array | None]:
    """From ``w = M q_{k−1}``: ``α_{k−1}`` (with ``tridiagonal``, the whole ``T`` instead)
    and, with ``return_basis``, the norms ``β_k`` of the last residuals ``r = (I − Q_kᵀQ_k)
    M q_{k−1}``, for which ``M Q_kᵀ = Q_kᵀ T + r e_kᵀ`` (the Ritz pairs' residuals)."""
    blocks, q, previous, _, betas, _, _ = state
    alphas = alphas.at[:, -1].set(jnp.sum(q * w, axis=1))
    residual = None
    if return_basis:
        w = w.astype(q.dtype) - alphas[:, -1:] * q - betas[:, -2:-1] * previous  # 0 if k = 1
        residual = jnp.linalg.norm(_orthogonalised(blocks, w, alphas.shape[1]), axis=1)
    return (_tridiagonal(alphas, betas[:, :-1]) if tridiagonal else alphas), residual


def _stop_test(stop: Callable, alphas: jax.Array, betas: jax.Array, done: int
               ) -> tuple[jax.Array, Any, jax.Array, jax.Array]:
    """``stop`` after ``done`` steps (whether to stop, and what it found), the tridiagonal
    ``T`` of those steps and the norms ``β`` of their last residuals."""
    tridiagonal, residual = _tridiagonal(alphas[:, :done], betas[:, :done - 1]), betas[:, done - 1]
    ends, found = stop(tridiagonal, residual, alphas.shape[1])
    return jnp.asarray(ends, bool), found, tridiagonal, residual


def _stop_test_after(stop: Callable, alphas: jax.Array, betas: jax.Array, found: Any,
                     done: int) -> tuple[jax.Array, Any]:
    """:func:`_stop_test`'s decision and findings after ``done`` steps, as a branch of
    :func:`_lanczos`'s switch (``found``, those of an earlier test, replaced)."""
    return _stop_test(stop, alphas, betas, done)[:2]


def _stop_pairs(stop: Callable, tridiagonal: jax.Array, residual: jax.Array) -> Any:
    """What ``stop`` finds on the ``T`` of all the steps (run to the end)."""
    return stop(tridiagonal, residual, tridiagonal.shape[-1])[1]


# The steps driven from Python (:func:`_lanczos`) run these in one program each: op by
# op, their few dozen small operations were compiled one by one for each shape (a first
# eager ``lanczos_eigsh`` of 200 steps: 80 programs, 4 s).
_compiled_lanczos_start = jax.jit(_lanczos_start, static_argnums=(1, 2))
_compiled_last_step = jax.jit(_last_step, static_argnums=(3, 4))
_compiled_stop_test = jax.jit(_stop_test, static_argnums=(0, 3))
_compiled_stop_pairs = jax.jit(_stop_pairs, static_argnums=0)


def _tridiagonal(alphas: jax.Array, betas: jax.Array) -> jax.Array:
    """The ``(m, k, k)`` symmetric tridiagonals of the diagonals ``alphas`` ``(m, k)`` and
    the off-diagonals ``betas`` ``(m, k − 1)``, as one elementwise selection (diagonal
    matrices padded and added were several kernels to compile, at every stop test of
    :func:`_lanczos`)."""
    k = alphas.shape[1]
    row, column = np.arange(k)[:, None], np.arange(k)[None, :]
    betas = jnp.pad(betas, [(0, 0), (0, 1)])  # betas[:, i] couples rows i and i + 1
    return jnp.where(row == column, alphas[:, :, None],
                     jnp.where(column == row + 1, betas[:, :, None],
                               jnp.where(row == column + 1, betas[:, None, :], 0)))


def _lanczos_blocks(num_steps: int) -> list[tuple[int, int]]:
    """The row blocks ``[low, high)`` of :func:`_lanczos`'s basis: 8 rows, 8, 16, 32, …
    (each as many rows as those before it), the last one cut at ``num_steps``."""
    blocks, low, high = [], 0, 8
    while low < num_steps:
        blocks.append((low, min(high, num_steps)))
        low, high = high, 2 * high
    return blocks


def _ritz_vectors(blocks: tuple, s: jax.Array) -> jax.Array:
    """``Qᵀ S`` for the first basis of :func:`_lanczos` (its row blocks) and ``S``
    ``(k, j)``: the ``(d, j)`` Ritz vectors, without concatenating the blocks."""
    rows = np.cumsum([0] + [b.shape[1] for b in blocks])
    return sum(b[0].T @ s[low:high] for b, low, high in zip(blocks, rows[:-1], rows[1:]))


#: :func:`_ritz_vectors` in one program (a basis and the pairs from the steps driven
#: from Python)
_compiled_ritz_vectors = jax.jit(_ritz_vectors)


def _lanczos_step(state: tuple, w: jax.Array, j: Any, restart: jax.Array | None) -> tuple:
    """Lanczos step ``j`` (``< k − 1``) of :func:`_lanczos` given ``w = M q_j`` (rows):
    ``α_j``; ``w − α_j q_j − β_{j−1} q_{j−1}`` (the three-term recurrence) reorthogonalised
    against the basis blocks holding rows ``0 … j`` (:func:`_orthogonalised`; the rows past
    ``j`` are zero), once, or twice where the first pass cancels much of it; ``β_j`` and
    ``q_{j+1}`` (a new random direction where the Krylov space is exhausted and ``restart``
    is given, else zero) written into row ``j + 1`` of its block. With partial
    reorthogonalisation (the state's estimates of orthogonality, :func:`_omega_step`) the
    passes run only where the estimates say that ``q_{j+1}`` would lose semi-orthogonality
    (and at the step after). ``j`` may be traced: one program for every step."""
    blocks, q, previous, alphas, betas, scale, orthogonality = state
    m, d = q.shape
    w = w.astype(q.dtype)
    scale = jnp.maximum(scale, jnp.linalg.norm(w, axis=1))
    alpha = jnp.sum(q * w, axis=1)
    alphas = alphas.at[:, j].set(alpha)
    # the three-term recurrence, then a pass against the whole basis for what round-off
    # left, and a second one only where the first cancelled much of w (Kahan–Parlett's
    # "twice is enough": an exhausted Krylov space, where w is round-off)
    beta_before = jnp.where(j > 0, betas[:, j - 1], 0)
    w = w - alpha[:, None] * q - beta_before[:, None] * previous

    def reorthogonalised(w):
        once = _orthogonalised(blocks, w, j + 1)
        again = jnp.any(jnp.linalg.norm(once, axis=1) < 0.7 * jnp.linalg.norm(w, axis=1))
        return jax.lax.cond(again, lambda: _orthogonalised(blocks, once, j + 1),
                            lambda: once), once

    if orthogonality is None:
        w, once = reorthogonalised(w)
    else:
        reorthogonalise, orthogonality = _omega_step(
            orthogonality, alphas, betas, alpha, beta_before, jnp.linalg.norm(w, axis=1),
            scale, j)
        w, once = jax.lax.cond(reorthogonalise, reorthogonalised, lambda w: (w, w), w)
    beta = jnp.linalg.norm(w, axis=1)
    grows = _grows(beta, jnp.linalg.norm(once, axis=1), scale)
    betas = betas.at[:, j].set(jnp.where(grows, beta, 0))
    w = w / jnp.where(grows, beta, 1)[:, None]
    if restart is None:
        new = jnp.where(grows[:, None], w, 0)
    else:
        def draw():
            fresh = jax.random.normal(jax.random.fold_in(restart, j), (m, d), q.dtype)
            fresh = _orthogonalised(blocks, _orthogonalised(blocks, fresh, j + 1), j + 1)
            fresh = fresh / jnp.linalg.norm(fresh, axis=1, keepdims=True)
            return jnp.where(grows[:, None], w, fresh)

        # w as it is while every row's space grows (no zeros written, no select: a step's
        # d-sized passes are its cost where products are cheap)
        new = jax.lax.cond(jnp.all(grows), lambda: w, draw)
    if orthogonality is not None:  # a new direction drawn: orthogonal to working precision
        omega, omega_previous, force = orthogonality
        orthogonality = (jnp.where(grows[:, None], omega, _fresh_omega(omega, j)),
                         omega_previous, force)
    return (_written(blocks, new, j + 1), new, q, alphas, betas, scale, orthogonality)


def _fresh_omega(omega: jax.Array, j: Any) -> jax.Array:
    """The estimates ``ω_{j+1, i}`` of a vector ``q_{j+1}`` orthogonal to ``q_0 … q_j`` to
    working precision: ``ε`` for ``i ≤ j``, ``1`` for ``i = j + 1``, ``0`` past it."""
    i = jnp.arange(omega.shape[1])
    eps = jnp.finfo(omega.dtype).eps
    return jnp.broadcast_to(jnp.where(i <= j, eps, jnp.where(i == j + 1, 1, 0)),
                            omega.shape).astype(omega.dtype)


def _omega_step(orthogonality: tuple, alphas: jax.Array, betas: jax.Array,
                alpha: jax.Array, beta_before: jax.Array, beta: jax.Array, scale: jax.Array,
                j: Any) -> tuple:
    """Simon's ω-recurrence (partial reorthogonalisation; Simon 1984, "The Lanczos
    algorithm with partial reorthogonalization", Math. Comp. 42; Larsen's PROPACK): from
    the estimates ``ω_{j,i} ≈ q_jᵀ q_i`` and ``ω_{j−1,i}`` (rows of ``(m, k)``, ``1`` at
    ``i = j`` and ``j − 1``) and the recurrence's ``α``, ``β`` (``α_j = alpha``,
    ``β_{j−1} = beta_before``, ``β_j ≈ beta``, the norm of ``w`` before any
    reorthogonalisation), those of ``q_{j+1}``: for ``i < j``

    ``β_j ω_{j+1,i} = β_i ω_{j,i+1} + (α_i − α_j) ω_{j,i} + β_{i−1} ω_{j,i−1}
    − β_{j−1} ω_{j−1,i} ± ε (β_i + β_j + ‖M‖)``,

    the round-off term's sign that of the rest (growing ``|ω|``), and ``ω_{j+1,j} =
    ε ‖M‖ / β_j``, the three-term recurrence's own round-off (``‖M‖`` estimated by the
    largest ``‖M q‖`` so far). The Lanczos vectors stay *semi-orthogonal* (``|ω| ≤ √ε``):
    ``q_{j+1}`` is reorthogonalised against the whole basis where an estimate exceeds
    ``√ε``, and ``q_{j+2}`` after it (Simon's rule: the next vector inherits the loss),
    their estimates then reset to ``ε``. Semi-orthogonality keeps ``T``'s eigenvalues
    (Ritz values, Gauss quadrature) those of an orthonormal basis of the same Krylov space
    to working precision; the Ritz vectors are orthonormal to ``≈ √ε``. One decision for
    all ``m`` rows (any of them past ``√ε``). Cost ``O(m k)``. Returns whether to
    reorthogonalise ``q_{j+1}`` and the next step's ``(ω_{j+1}, ω_j, whether to
    reorthogonalise q_{j+2})``, ``ω_{j+1}`` reset where ``q_{j+1}`` is."""
    omega, omega_previous, force = orthogonality
    dtype = omega.dtype
    eps = jnp.finfo(dtype).eps
    i = jnp.arange(omega.shape[1])
    below = i < j
    beta_before_i = jnp.pad(betas[:, :-1], [(0, 0), (1, 0)])  # β_{i−1}, β_{−1} = 0
    omega_next_i = jnp.pad(omega[:, 1:], [(0, 0), (0, 1)])  # ω_{j,i+1}
    omega_before_i = jnp.pad(omega[:, :-1], [(0, 0), (1, 0)])  # ω_{j,i−1}
    safe_beta = jnp.where(beta > 0, beta, 1)[:, None]
    recurrence = (betas * omega_next_i + (alphas - alpha[:, None]) * omega
                  + beta_before_i * omega_before_i - beta_before[:, None] * omega_previous)
    noise = eps * (betas + beta[:, None] + scale[:, None])
    estimate = (recurrence + jnp.where(recurrence >= 0, noise, -noise)) / safe_beta
    local = eps * scale[:, None] / safe_beta  # ω_{j+1,j}: the recurrence's own round-off
    new = jnp.where(below, estimate, jnp.where(i == j, local, jnp.where(i == j + 1, 1, 0)))
    reorthogonalise = force | jnp.any(jnp.where(i <= j, jnp.abs(new), 0) > jnp.sqrt(eps))
    kept = jnp.where(reorthogonalise, _fresh_omega(new, j), new)
    return reorthogonalise, (kept, omega, reorthogonalise & ~force)


def _written(blocks: tuple, new: jax.Array, row: Any) -> tuple:
    """The basis blocks with ``new`` (``(m, d)``) as row ``row`` (traced or not): each block
    rewrites one row in place, ``new`` in the block holding ``row``, its own row elsewhere
    (``m d`` per block, no copy of a block)."""
    out, low = [], 0
    for b in blocks:
        at = jnp.clip(row - low, 0, b.shape[1] - 1)
        inside = (row >= low) & (row < low + b.shape[1])
        kept = jax.lax.dynamic_index_in_dim(b, at, axis=1, keepdims=False)
        out.append(jax.lax.dynamic_update_index_in_dim(
            b, jnp.where(inside, new, kept), at, axis=1))
        low += b.shape[1]
    return tuple(out)


#: round-off's multiple of ``ε · max‖M q‖`` below which a Lanczos residual is taken for 0
_ROUND_OFF = 64


def _grows(beta: jax.Array, once: jax.Array, scale: jax.Array) -> jax.Array:
    """Whether a Lanczos step's residual (norm ``beta`` after the reorthogonalisation,
    ``once`` after its first pass; ``scale`` the largest ``‖M q‖`` so far) is a new direction,
    or round-off of an exhausted Krylov space: above ``64 ε · scale``, and not cancelled
    again by the second pass (below ``0.7 ×`` the first pass's norm: round-off lying in the
    basis, Kahan–Parlett's "twice is enough" failing). A threshold growing with ``d`` (the
    earlier ``d ε · scale``) took genuine residuals for round-off: ``0.08 · max‖M q‖`` in
    float32 at ``d = 670k``, where a Fisher's residuals fall below that after a dozen steps;
    each later step then restarted from a random vector with ``β = 0`` (and residual
    estimates of ``0``)."""
    return (beta > _ROUND_OFF * jnp.finfo(beta.dtype).eps * scale) & (beta >= 0.7 * once)


def _orthogonalised(blocks: tuple, w: jax.Array, rows: Any) -> jax.Array:
    """``w`` (rows, ``(m, d)``) with its components along the first ``rows`` rows of the
    basis ``blocks`` removed (the rows past them are zero): one classical Gram–Schmidt pass
    (two GEMVs) per block holding any of them, block after block (block modified
    Gram–Schmidt); the blocks past them left out, or for a traced ``rows`` skipped by
    ``lax.cond``. Cost ``≈ 4 m d`` times the rows of those blocks."""
    low = 0
    for b in blocks:
        def remove(w, b=b):
            return w - jnp.einsum("mjd,mj->md", b, jnp.einsum("mjd,md->mj", b, w))

        if low == 0 or (isinstance(rows, int) and low < rows):
            w = remove(w)
        elif not isinstance(rows, int):
            w = jax.lax.cond(low < rows, remove, lambda w: w, w)
        low += b.shape[1]
    return w


#: :func:`_lanczos_step` compiled for the steps driven from Python (the basis donated)
_lanczos_step_compiled = donating_jit(_lanczos_step, donate_argnums=0)


@jax.jit
def _gauss_quadrature(tridiagonal: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Nodes (eigenvalues) and weights (squared first components of the eigenvectors) of
    the ``(m, k, k)`` Lanczos tridiagonals: ``(m, k)`` each."""
    nodes, vectors = jnp.linalg.eigh(tridiagonal)
    return nodes, vectors[:, 0, :] ** 2


def _exchangeable(M: Operator, key: jax.Array, num_samples: Any, distribution: str,
                  dim: int | None, dtype: Any) -> tuple:
    """The shared part of XTrace and XDiag: ``s = m/2`` probes ``Ω`` (rows), ``Y = M Ω``
    (rows), ``Yᵀ = Q R``, ``Z = M Q`` (rows), ``S`` whose column ``i`` is the unit
    ``sᵢ`` with ``P₍ᵢ₎ = Q (I − sᵢsᵢᵀ) Qᵀ``, and ``U`` whose column ``i`` is
    ``(I − sᵢsᵢᵀ) Qᵀ ωᵢ`` (so ``(I − P₍ᵢ₎) ωᵢ = ωᵢ − Q uᵢ``)."""
    products, probes = _setup(M, key, num_samples, distribution, dim, dtype,
                              "num_samples (even, ≥ 2 for XTrace / XDiag)", minimum=2)
    s = num_samples // 2
    omega = probes(key, s)
    d = omega.shape[1]
    if num_samples % 2 or s > d:
        raise ValueError(f"num_samples must be even and at most 2·d = {2 * d} for XTrace / "
                         f"XDiag (m/2 probes, each used twice); got {num_samples}")
    y = products(omega)
    q, r = jnp.linalg.qr(y.T)  # (d, s), (s, s)
    z = products(q.T)
    # sᵢ ∝ R⁻ᵀ eᵢ = U Σ⁻¹ Vᵀ eᵢ, with Σ floored at ε·σ_max and rescaled by the smallest
    # σ: a singular R (rank M < s) gives a unit sᵢ orthogonal to the range of R.
    left, sigma, right_t = jnp.linalg.svd(r)
    floor = jnp.maximum(sigma[0] * jnp.finfo(r.dtype).eps, jnp.finfo(r.dtype).tiny)
    sigma = jnp.maximum(sigma, floor)
    sk = left @ ((sigma[-1] / sigma)[:, None] * right_t)  # columns ∝ R⁻ᵀ eᵢ
    sk = sk / jnp.linalg.norm(sk, axis=0)
    u = q.T @ omega.T
    u = u - sk * jnp.sum(sk * u, axis=0)
    return d, s, omega, y, q, z, sk, u, distribution == "normal"
