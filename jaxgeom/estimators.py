"""Randomised estimators of a matrix's trace, diagonal and Frobenius norm from products.

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
``O(1/√m)`` for a quickly decaying spectrum.

The probes are the rows of one ``(m, d)`` array and ``M`` is applied to all at once
(``M.mmap``: a ``PMatImplicit`` streams its data once for all ``m``; memory ``m·d``), so
the cost is ``m`` products of ``M`` (Hutch++: ``m`` products and a QR of ``d × m/3``).
For more probes than fit in memory, call again with other keys and average.
:func:`lanczos_eigenvalues` estimates the extreme eigenvalues (a Hessian's top one)
with ``k`` products one after the other. Everything
is jit-able; the same key gives the same estimate. These are curvlinops'
``hutchinson_trace``, ``hutchpp_trace``, ``hutchinson_diag`` and
``hutchinson_squared_fro`` (and matfree's ``stochtrace``).

``M`` is any representation, or a function ``matvec(v) -> M v`` on flat ``(d,)``
vectors with ``dim=d`` given.

References:
  Hutchinson, `A stochastic estimator of the trace of the influence matrix for Laplacian
  smoothing splines <https://doi.org/10.1080/03610919008812866>`_, 1990.
  Bekas, Kokiopoulou & Saad, `An estimator for the diagonal of a matrix
  <https://doi.org/10.1016/j.apnum.2007.01.003>`_, 2007.
  Meyer, Musco, Musco & Woodruff, `Hutch++: optimal stochastic trace estimation
  <https://arxiv.org/abs/2010.09649>`_, 2021.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxgeom._counter_rng import check_key
from jaxgeom.pmat.base import PMatAbstract

#: the distributions of the probe entries: ±1 with probability ½ each, or N(0, 1)
DISTRIBUTIONS = ("rademacher", "normal")

Operator = PMatAbstract | Callable[[jax.Array], jax.Array]


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
    low_rank = jnp.sum(q.T * products(q.T))  # tr(Qᵀ M Q)
    g = probes(probe_key, num_samples - 2 * k)
    g = g - (g @ q) @ q.T  # (I − QQᵀ) G, rows
    return low_rank + jnp.sum(g * products(g)) / g.shape[0]


def lanczos_eigenvalues(M: Operator, key: jax.Array, num_iterations: int = 30, *,
                        dim: int | None = None, dtype: Any = None) -> jax.Array:
    """Ritz values of ``k`` Lanczos iterations on a symmetric ``M``: estimates of its
    extreme eigenvalues, from products only (PyHessian's top eigenvalue of a Hessian).

    From a normal start vector ``q₁``, Lanczos builds an orthonormal basis ``Q_k`` of the
    Krylov space ``span(q₁, Mq₁, …, M^{k−1}q₁)`` and the tridiagonal ``T = Q_kᵀ M Q_k``;
    its ``k`` eigenvalues (ascending) lie in ``[λ_min, λ_max]`` and the largest and
    smallest converge first (geometrically, at a rate set by the gaps at the ends of the
    spectrum): ``lanczos_eigenvalues(M, key)[-1]`` estimates ``M.norm(2)`` of a PSD
    matrix, which a matrix-free ``PMatImplicit`` cannot give exactly. Every new basis
    vector is reorthogonalised against all the previous ones (twice), so the Ritz values
    carry no spurious copies. When the Krylov space is exhausted (``k`` beyond ``rank + 1``
    for a low-rank Fisher) the iteration stops growing it and the remaining Ritz values
    are ``0`` — eigenvalues of such a singular ``M`` — so ``k = d`` gives the whole
    spectrum of a matrix of rank below ``d``.

    Args:
      M: a symmetric representation, or ``matvec(v) -> M v`` on flat ``(d,)`` vectors.
      key: one PRNG key (the start vector).
      num_iterations: ``k ≥ 1``, the number of products of ``M`` (at most ``d``).
      dim, dtype: as :func:`hutchinson_trace`.

    Returns:
      The ``(k,)`` Ritz values, ascending. Cost: ``k`` products of ``M`` one after the
      other (a ``PMatImplicit`` streams its data ``k`` times), ``O(k² d)`` for the
      reorthogonalisation, memory ``k·d``; under ``jit`` the ``k`` steps are unrolled.

    References:
      Lanczos, `An iteration method for the solution of the eigenvalue problem of linear
      differential and integral operators <https://doi.org/10.6028/jres.045.026>`_, 1950.
      Yao et al., `PyHessian: neural networks through the lens of the Hessian
      <https://arxiv.org/abs/1912.07145>`_, 2020.
    """
    products, probes = _setup(M, key, num_iterations, "normal", dim, dtype,
                              "num_iterations")
    start = probes(key, 1)
    d = start.shape[1]
    if num_iterations > d:
        raise ValueError(f"num_iterations must be at most d = {d}; got {num_iterations}")
    eps = jnp.finfo(start.dtype).eps
    basis = start / jnp.linalg.norm(start)  # (j, d): the orthonormal q's so far
    alphas, betas, scale = [], [], jnp.zeros((), start.dtype)
    for j in range(num_iterations):
        w = products(basis[j:j + 1])[0]
        scale = jnp.maximum(scale, jnp.linalg.norm(w))
        alphas.append(jnp.vdot(basis[j], w))
        for _ in range(2):  # full reorthogonalisation, twice ("twice is enough")
            w = w - basis.T @ (basis @ w)
        if j == num_iterations - 1:
            break
        beta = jnp.linalg.norm(w)
        grows = beta > d * eps * scale  # else: the Krylov space is exhausted
        betas.append(jnp.where(grows, beta, 0))
        basis = jnp.concatenate([basis, jnp.where(grows, w / jnp.where(grows, beta, 1), 0)[None]])
    tridiagonal = jnp.diag(jnp.stack(alphas))
    if betas:
        off = jnp.stack(betas)
        tridiagonal = tridiagonal + jnp.diag(off, 1) + jnp.diag(off, -1)
    return jnp.linalg.eigvalsh(tridiagonal)


# ----------------------------------------------------------------------------- helpers
def _setup(M: Operator, key: jax.Array, num_samples: Any, distribution: str,
           dim: int | None, dtype: Any, what: str, minimum: int = 1
           ) -> tuple[Callable[[jax.Array], jax.Array], Callable[[jax.Array, int], jax.Array]]:
    """``(products, probes)``: ``M`` applied to the rows of an ``(m, d)`` array, and
    ``probes(key, m)`` drawing ``m`` probe rows; the arguments checked."""
    check_key(key, "key")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or (
            num_samples < minimum):
        raise ValueError(f"{what} must be an integer ≥ {minimum}; got {num_samples!r}")
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {distribution!r}; valid: {DISTRIBUTIONS}")
    if isinstance(M, PMatAbstract):
        if dim is not None and dim != M.size(0):
            raise ValueError(f"dim={dim} but the matrix is {M.size(0)} × {M.size(0)}")
        products, dim, dtype = M.mmap, M.size(0), M.dtype
    elif callable(M):
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(
                "for a matvec function M, give the dimension d of its vectors: dim=d "
                f"(a positive integer); got {dim!r}")
        products = jax.vmap(M)
        dtype = jnp.dtype(float) if dtype is None else dtype
    else:
        raise TypeError(
            "M must be a jaxgeom representation (a PMat*) or a function v -> M v on flat "
            f"vectors; got {type(M).__name__}")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"the probes' dtype must be a real floating type; got {dtype}")

    def probes(k: jax.Array, m: int) -> jax.Array:
        if distribution == "normal":
            return jax.random.normal(k, (m, dim), dtype)
        return jax.random.rademacher(k, (m, dim), dtype)

    return products, probes
