"""Shared matrix helpers (``jaxgeom.pmat._spectral``)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxgeom.pmat import _spectral


def test_traces_of_many_matrices_in_one_pass():
    """Orders below, at and above the row width, and a 1×1 matrix: each trace exact."""
    width = _spectral.TRACE_ROW
    orders = [1, 3, width - 1, width, width + 1, 2 * width + 5]
    keys = jax.random.split(jax.random.key(0), len(orders))
    matrices = [jax.random.normal(k, (n, n)) for k, n in zip(keys, orders)]
    np.testing.assert_allclose(_spectral.traces(matrices),
                               [np.trace(np.asarray(m)) for m in matrices], rtol=1e-12)
    np.testing.assert_allclose(jax.jit(_spectral.traces)(matrices),
                               [np.trace(np.asarray(m)) for m in matrices], rtol=1e-12)
    assert _spectral.traces([]).shape == (0,)


def test_trace_of_one_matrix_reads_its_diagonal():
    m = jnp.arange(16.0).reshape(4, 4)
    assert float(_spectral.trace(m)) == 0 + 5 + 10 + 15
