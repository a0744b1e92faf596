"""Counter-based draws: the random numbers of draw ``j`` of example ``n`` as a hash of
``(n, j)`` under a key.

The Monte-Carlo Fisher draws every example's targets from its own index among all
examples seen, so the estimate does not depend on how the data are batched or chunked.
Each draw is one Threefry-2x32 hash (20 rounds; Salmon et al., *Parallel random numbers:
as easy as 1, 2, 3*, SC 2011) of the counter pair ``(n, j)`` under a per-build key,

.. math::  (b_0, b_1) = \\mathrm{threefry}_{k'}(n, j), \\qquad
           k' = \\mathrm{threefry}_{k}(\\texttt{0x6A786765}, \\texttt{0x6F6D6563}),

``k`` the two 32-bit words of the user's key (its data for a Threefry key; two words drawn
from it with ``jax.random.bits`` for another implementation), ``k'`` a key of its own for
these draws so that they do not coincide with ``jax.random``'s own counters under ``k``.

Why not ``jax.random.fold_in(key, n)`` followed by ``jax.random.uniform``: each is a
Threefry call, and JAX lowers Threefry on CPU as a rolled ``while`` loop (to keep compile
times short), which XLA:CPU cannot fuse: two loops per chunk cost ≈ 0.1 ms of a 0.5 ms
chunk step on ``bench_small``. Here the 20 rounds are plain unrolled ``uint32`` arithmetic
that fuses into the step, bit for bit the hash of ``jax.extend.random.threefry_2x32``.
Cost: ``O(draws)`` integer operations.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom._signature import dtype_is

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
#: the counters that derive this module's key from the user's ("jxge", "omec")
_DOMAIN = (np.uint32(0x6A786765), np.uint32(0x6F6D6563))


def threefry2x32(key: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (20 rounds) of the counters ``(x0, x1)`` (``uint32``, any
    broadcastable shapes) under ``key`` (``uint32[2]``): the two output words.

    Equal to ``jax.extend.random.threefry_2x32(key, concatenate([x0, x1]))`` split in two.
    """
    ks = (key[0], key[1], key[0] ^ key[1] ^ _PARITY)
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = (x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def check_key(key: object, who: str) -> None:
    """Check that ``key`` is one PRNG key: a typed key of shape ``()``
    (``jax.random.key(seed)``) or a raw ``uint32`` key array (``jax.random.PRNGKey(seed)``).

    Shapes and dtypes only, so a traced key is checked too. ``who`` names the argument in
    the message (e.g. ``"FIM_MonteCarlo's key"``).

    Raises:
      TypeError: for a seed, ``None`` or an array of another dtype.
      ValueError: for a stack of keys (``jax.random.split(key, n)``).
    """
    dtype, shape = getattr(key, "dtype", None), getattr(key, "shape", None)
    typed = dtype is not None and dtype_is(dtype, jax.dtypes.prng_key)
    if not (typed or (dtype == jnp.uint32 and len(shape) >= 1)):
        got = f"an array of dtype {dtype}" if dtype is not None else repr(key)
        raise TypeError(
            f"{who} must be a PRNG key, e.g. jax.random.key(seed) (or the raw "
            f"jax.random.PRNGKey(seed)); got {got}")
    if shape != (() if typed else shape[-1:]):
        raise ValueError(
            f"{who} must be one PRNG key; got keys of shape {shape} (a stack of keys, e.g. "
            "from jax.random.split). Pass one of them, e.g. keys[0], or build once per key")


def draw_key(key: jax.Array) -> jax.Array:
    """The ``uint32[2]`` key of the draws made under the user's ``key`` (a typed key of any
    implementation, or a raw ``uint32`` key array)."""
    words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    words = jnp.asarray(words)
    if words.shape != (2,) or words.dtype != jnp.uint32:
        words = jax.random.bits(key, (2,), jnp.uint32)
    return jnp.stack(threefry2x32(words, *_DOMAIN))


def bits(key: jax.Array, index: jax.Array, shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Two independent words of random bits per entry of ``shape`` for example ``index``:
    the hash of ``(index, j)``, ``j`` the entry's position in row-major order."""
    count = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32).reshape(shape)
    return threefry2x32(key, jnp.asarray(index).astype(jnp.uint32), count)


def uniform(key: jax.Array, index: jax.Array, shape: tuple[int, ...], dtype=jnp.float32
            ) -> jax.Array:
    """Uniforms in ``[0, 1)`` of ``shape`` for example ``index`` (as many random mantissa
    bits as ``dtype`` has: 23 in float32, 52 in float64, as ``jax.random.uniform``; 7 in
    bfloat16 and 10 in float16, so that the conversion cannot round up to 1)."""
    hi, lo = bits(key, index, shape)
    if jnp.dtype(dtype).itemsize <= 4:
        bits_kept = int(jnp.finfo(dtype).nmant)  # of float32's 23 mantissa bits
        mantissa = (hi >> np.uint32(32 - bits_kept)) << np.uint32(23 - bits_kept)
        one = jax.lax.bitcast_convert_type(mantissa | np.uint32(0x3F800000), jnp.float32)
        return (one - 1).astype(dtype)
    word = (hi.astype(jnp.uint64) << np.uint64(32)) | lo.astype(jnp.uint64)
    one = jax.lax.bitcast_convert_type((word >> np.uint64(12)) | np.uint64(0x3FF0000000000000),
                                       jnp.float64)
    return (one - 1).astype(dtype)


def normal(key: jax.Array, index: jax.Array, shape: tuple[int, ...], dtype=jnp.float32
           ) -> jax.Array:
    """Standard normals of ``shape`` for example ``index``: ``√2 erf⁻¹(u)`` for ``u``
    uniform in ``(-1, 1)``, as ``jax.random.normal``."""
    u = 2 * uniform(key, index, shape, dtype) - 1
    u = jnp.maximum(u, jnp.nextafter(jnp.asarray(-1, dtype), jnp.asarray(0, dtype)))
    return np.sqrt(2).astype(dtype) * jax.scipy.special.erfinv(u)


def rademacher(key: jax.Array, index: jax.Array, shape: tuple[int, ...], dtype=jnp.float32
               ) -> jax.Array:
    """Rademacher signs ``±1`` (each with probability ½) of ``shape`` for example
    ``index``: the top bit of each draw."""
    hi, _ = bits(key, index, shape)
    return jnp.where(hi >> np.uint32(31), 1, -1).astype(dtype)
