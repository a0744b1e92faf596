"""``jaxgeom._reporting``: the singular rule ``min ≤ 10·ε·max`` per matrix, concrete values
warning at once, traced ones answered beside a compiled call's result and reported after it."""

import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeom._reporting import (
    SINGULAR_RATIO,
    one_singular_report,
    report_singular,
    report_when_run,
    reporting,
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


def test_an_operation_of_several_decompositions_warns_once_as_called():
    """The blocks or factors an operation decomposes apart report into one warning named
    as called; nested, the outermost reports; on an exception, nothing; nothing singular,
    nothing."""
    eps = np.finfo(np.float32).eps
    good, bad = spectrum(1e-3, 50), spectrum(eps, 50)
    with pytest.warns(RuntimeWarning) as record, one_singular_report(lambda: "inv"):
        warn_if_singular(bad, "pow(-1)")
        with one_singular_report(lambda: "pow(-1)"):
            warn_if_singular(bad, "pow(-1)")
            warn_if_singular(good, "pow(-1)")
    assert [str(w.message).split(" of ")[0] for w in record] == ["inv"]
    assert {w.filename for w in record} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(ZeroDivisionError), one_singular_report(lambda: "inv"):
            warn_if_singular(bad, "pow(-1)")
            _ = 1 / 0
        with one_singular_report(lambda: "inv"):
            warn_if_singular([good, good], "pow(-1)")
    with pytest.warns(RuntimeWarning, match="^solve of"):  # outside: at once, as before
        warn_if_singular(bad, "solve")


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


@pytest.mark.parametrize("method", ["cg", None])
def test_an_eager_operation_warns_from_the_values_its_program_answers(method):
    """An eager solve is one compiled call; what it warns of (a Krylov stop above the
    tolerance, a singular matrix's pivots) is answered beside the solution and warned of
    after the call, at the caller's line: its program holds no host callback (one in a
    compiled call deadlocked the suite once: the callback waiting for the GIL while other
    threads, holding it, waited to run programs)."""
    from jaxgeom import PMatDense, _dispatch
    from jaxgeom.layers import LayerCollection

    rank_one = np.outer(np.arange(1.0, 9.0), np.arange(1.0, 9.0))
    M = PMatDense(LayerCollection.from_params({"w": jnp.zeros(8)}), jnp.asarray(rank_one))
    v = jnp.asarray(np.linspace(-1.0, 1.0, 8))
    options = {} if method is None else {"method": method}
    with pytest.warns(RuntimeWarning) as caught:
        M.solve(v, **options)
    assert [w.filename for w in caught] == [__file__]
    match = "singular to working precision" if method is None else "cg: not converged"
    assert re.search(match, str(caught[0].message))

    solve = type(M).solve.__wrapped__  # the checks' wrapper around the compiled operation
    leaves, treedef = jax.tree_util.tree_flatten((M, (v, 0.0), {"method": method or "cholesky"}))
    static, traced = _dispatch._split(leaves)
    program = _dispatch._compiled_call_for(M, "solve").lower(
        solve.eager_method, treedef, static, traced, True).as_text()
    assert "callback" not in program


def test_reports_are_collected_at_the_calls_own_trace_only():
    """Inside :func:`reporting`, a traced value reported at the trace's own level is answered
    by the call and reported after it from its value; one reported inside a loop's body (a
    trace of its own, whose values cannot leave it) is dropped, not leaked; concrete values
    report at once; outside :func:`reporting` traced ones report nothing."""
    seen = []

    def record(value):
        seen.append(float(value))

    def step(x):
        with reporting() as deferred:
            y = jax.lax.fori_loop(0, 3, lambda i, x: (report_when_run(record, x[0]), 2 * x)[1],
                                  x)
            report_when_run(record, y.sum())
        return y, tuple(deferred)

    y, deferred = jax.jit(step)(jnp.ones(4))
    assert seen == [] and len(deferred) == 1
    deferred[0].run()
    assert seen == [32.0]
    report_when_run(record, np.float64(5.0))
    jax.jit(lambda x: report_when_run(record, x.sum()))(jnp.ones(2))
    assert seen == [32.0, 5.0]
