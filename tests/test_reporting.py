"""``jaxgeom._reporting.warn_if_singular``: the rule ``min ≤ 10·ε·max`` per matrix, concrete
values warning at once, traced ones answered as a flag read after the compiled call."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeom._reporting import (
    SINGULAR_RATIO,
    report_singular,
    singular_flag,
    warn_if_singular,
)


def spectrum(ratio, n=1000, dtype=np.float32):
    """``n`` eigenvalues from 1 down to ``ratio``."""
    return np.geomspace(1.0, ratio, n).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_rule_is_ten_epsilons_whatever_the_order(dtype):
    """At ``5·ε`` a solve is round-off: warned; at ``50·ε`` it is not, though ``n·ε`` (a rank
    threshold, 1000·ε here) would have called it singular."""
    eps = np.finfo(dtype).eps
    assert SINGULAR_RATIO == 10
    with pytest.warns(RuntimeWarning, match="solve of a matrix singular to working precision"):
        warn_if_singular(spectrum(5 * eps, dtype=dtype), "solve")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_if_singular(spectrum(50 * eps, dtype=dtype), "solve")
        warn_if_singular(-spectrum(50 * eps, dtype=dtype), "solve")  # magnitudes
        warn_if_singular(np.array([np.nan, 1.0, 0.0], dtype), "solve")  # a failed factor


def test_blocks_and_stacks_warn_once_when_any_is_singular():
    eps = np.finfo(np.float32).eps
    good, bad = spectrum(1e-3, 50), spectrum(eps, 50)
    with pytest.warns(RuntimeWarning) as record:
        warn_if_singular([good, bad, good], "inv")
        warn_if_singular(np.stack([good, bad]), "pow(-1)")
    assert [str(w.message).split(" of ")[0] for w in record] == ["inv", "pow(-1)"]


def test_traced_values_warn_of_nothing_and_a_compiled_flag_is_read_after():
    """Traced values stage nothing (a user's ``jit`` exports: no host callback); a compiled
    function answers :func:`singular_flag`, which :func:`report_singular` reads."""
    bad = jnp.asarray(spectrum(np.finfo(np.float32).eps))

    def check(values):
        warn_if_singular(values, "solve")
        return values.sum(), singular_flag([values])

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        jax.jit(check)(bad)
        jax.export.export(jax.jit(check))(bad)
    _, flag = jax.jit(check)(bad)
    with pytest.warns(RuntimeWarning, match="singular to working precision"):
        report_singular("solve", flag)
