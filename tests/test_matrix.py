"""Every representation × model × variant against the float64 brute-force Fisher.

Each representation stores a projection of the exact matrix ``F``: Dense, LowRank and
Implicit all of it, BlockDiag its layer blocks, Diag its diagonal. For every model of
``tests/models.py`` (Flax linen MLP/CNN/LayerNorm/Embed, NNX, Equinox, plain jnp) and
every variant, the stored matrix must equal that projection, and the operations must agree
with ``to_dense()``.
"""

import functools
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import ALL_TASKS, make_plain_mlp, reference_fisher

from jaxgeom import (
    FIM,
    FIM_MonteCarlo,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatKFOC,
    PMatLowRank,
    PMatMixed,
    PMatQuasiDiag,
    random_pvector,
)

REPRESENTATIONS = [PMatDense, PMatBlockDiag, PMatDiag, PMatLowRank, PMatImplicit]
TOL = dict(rtol=1e-8, atol=1e-11)


def project(representation, matrix, layer_collection):
    """The part of ``matrix`` that ``representation`` keeps."""
    matrix = np.asarray(matrix)
    if representation is PMatDiag:
        return np.diag(np.diag(matrix))
    if representation is PMatBlockDiag:
        mask = np.zeros(matrix.shape, bool)
        for layer in layer_collection.layers:
            idx = layer_collection.layer_indices(layer)
            mask[np.ix_(idx, idx)] = True
        return np.where(mask, matrix, 0.0)
    return matrix


@functools.cache
def task_and_reference(name):
    """Each model and its brute-force Fisher, computed once for all representations."""
    t = ALL_TASKS[name]()
    return t, np.asarray(reference_fisher(t.apply_fn, t.params, t.x))


@functools.partial(jax.jit, static_argnames="solve_kw")
def _every_operation(F, v, rhs, regul, solve_kw):
    """Each operation of ``F`` (one compiled program for all of them)."""
    return dict(dense=F.to_dense(), mv=F.mv(v).to_flat(), vTMv=F.vTMv(v), trace=F.trace(),
                diag=F.get_diag(), fro=F.frobenius_norm(),
                solve=F.solve(rhs, regul, **dict(solve_kw)))


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_every_model(name, representation):
    t, reference = task_and_reference(name)
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation, batch_size=4)
    expected = project(representation, reference, F.layer_collection)
    v = random_pvector(jax.random.PRNGKey(0), t.params)
    fv = np.asarray(v.to_flat())
    regul = 1e-2
    got = _every_operation(F, v, expected @ fv + regul * fv, regul, (
        (("rtol", 1e-12),) if representation is PMatImplicit else ()))
    np.testing.assert_allclose(got["dense"], expected, **TOL)
    np.testing.assert_allclose(got["mv"], expected @ fv, **TOL)
    np.testing.assert_allclose(got["vTMv"], fv @ expected @ fv, **TOL)
    np.testing.assert_allclose(got["trace"], np.trace(expected), **TOL)
    np.testing.assert_allclose(got["diag"], np.diag(expected), **TOL)
    np.testing.assert_allclose(got["fro"], np.linalg.norm(expected), **TOL)
    np.testing.assert_allclose(got["solve"], fv, rtol=1e-6, atol=1e-8)


def _variant_cases():
    a = jax.random.normal(jax.random.PRNGKey(3), (4, 4))
    return {
        "logits": ("classif_logits", None),
        "binary": ("classif_binary_logits", None),
        "regression": ("regression", None),
        "regression_cov": ("regression", a @ a.T + jnp.eye(4)),
    }


VARIANT_CASES = _variant_cases()
MC_KEY = jax.random.PRNGKey(7)


def _variant_kw(case):
    variant, covariance = VARIANT_CASES[case]
    return dict(variant=variant, covariance=covariance, batch_size=3)


@functools.cache
def _monte_carlo_dense(case):
    """The dense Monte-Carlo Fisher of a variant case (built once for all representations)."""
    t = make_plain_mlp()
    return np.asarray(FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, key=MC_KEY,
                                     trials=2, **_variant_kw(case)).to_dense())


@pytest.mark.parametrize("representation", REPRESENTATIONS, ids=lambda r: r.__name__)
@pytest.mark.parametrize("case", sorted(VARIANT_CASES))
def test_every_variant(representation, case):
    t = make_plain_mlp()
    kw = _variant_kw(case)
    F = FIM(t.apply_fn, t.params, t.x, representation, **kw)
    ref = reference_fisher(t.apply_fn, t.params, t.x, kw["variant"], kw["covariance"])
    np.testing.assert_allclose(
        F.to_dense(), project(representation, ref, F.layer_collection), **TOL
    )
    mc = FIM_MonteCarlo(t.apply_fn, t.params, t.x, representation, key=MC_KEY, trials=2, **kw)
    np.testing.assert_allclose(
        mc.to_dense(), project(representation, _monte_carlo_dense(case), F.layer_collection),
        **TOL,
    )


@pytest.mark.parametrize("representation", [PMatKFAC, PMatMixed, PMatLowRank, PMatImplicit,
                                            PMatDiag, PMatBlockDiag, PMatDense])
def test_conversion_to_its_own_representation_keeps_the_matrix(representation):
    t = make_plain_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    np.testing.assert_allclose(representation.from_pmat(F).to_dense(), F.to_dense(), **TOL)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC,
                                            PMatEKFAC, PMatQuasiDiag, PMatLowRank,
                                            PMatImplicit, PMatMixed])
def test_a_damping_per_parameter_is_refused_and_the_suggested_sum_solves(representation):
    """``regul`` is the λ of ``M + λI``: a vector is refused by ``solve``, ``inv`` and
    ``pow`` alike (it had been a shape error in most representations and ``diag(λ)`` in
    a few), and the fix the message names, ``M + PMatDiag(λ)``, solves
    ``(M + diag(λ)) x = v`` where the sum has a representation."""
    t = make_plain_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    d = F.layer_collection.numel()
    damping = jnp.linspace(0.1, 1.0, d)
    v = random_pvector(jax.random.key(4), t.params)
    with pytest.raises(ValueError, match="regul must be a scalar.*PMatDiag"):
        F.solve(v, damping)
    for operation in (lambda: F.inv(damping), lambda: F.pow(-1, damping),
                      lambda: F.pow(-1, regul=damping)):
        try:
            operation()
        except NotImplementedError:  # no inv/pow at all
            continue
        except ValueError as error:
            assert "regul must be a scalar" in str(error)
            continue
        raise AssertionError("a vector damping was accepted")
    if representation is PMatImplicit:
        return  # no sum: the message's other fix, CG on the products
    damped = F + PMatDiag(F.layer_collection, damping)
    expected = np.linalg.solve(np.asarray(F.to_dense()) + np.diag(damping), v.to_flat())
    np.testing.assert_allclose(damped.solve(v).to_flat(), expected, rtol=1e-7)


@pytest.mark.parametrize("representation", [PMatDense, PMatDiag, PMatKFAC, PMatLowRank])
def test_a_non_finite_regul_and_a_non_scalar_exponent_are_refused(representation):
    """A concrete NaN damping had given NaN answers without a word; a (2,) exponent, a
    broadcasting error or "truth value ... ambiguous"; a negative or NaN ``pinv``
    threshold is refused too."""
    t = make_plain_mlp(n=3)
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    v = jnp.ones(F.layer_collection.numel())
    with pytest.raises(ValueError, match=r"regul \(the damping λ of M \+ λ·I\) must be finite"):
        F.solve(v, float("nan"))
    with pytest.raises(ValueError, match=r"exponent p of pow must be a scalar.*shape \(2,\)"):
        F.pow(jnp.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="exponent p of pow must be finite"):
        F.pow(float("inf"))
    for p in (0.5j, jnp.asarray(1 + 0.5j)):  # had been a complex matrix, or '<' of complex
        with pytest.raises(TypeError, match="exponent p of pow must be real"):
            F.pow(p, 1.0)
    with pytest.raises(TypeError, match="exponent p of pow must be real"):
        jax.jit(lambda M, p: M.pow(p, 1.0))(F, jnp.asarray(0.5j))
    for thresholds in (dict(atol=-1.0), dict(rtol=float("nan")), dict(atol=jnp.ones(2))):
        with pytest.raises(ValueError, match=r"pinv's [ar]tol must be (≥ 0|a scalar)"):
            F.pinv(**thresholds)  # a negative atol had kept every eigenvalue, silently


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatDiag, PMatLowRank,
                                            PMatKFAC])
@pytest.mark.filterwarnings("error")  # no "donated buffers were not usable" under vmap
def test_a_stack_of_fishers_by_vmap_over_params_is_each_fisher(representation):
    """An ensemble's Fishers, built under ``jax.vmap`` over stacked params (the result is
    rebuilt from stacked leaves: the shape checks had refused them), each equal to its own
    build; the stack is a pytree like any other (``tree_map``, index with ``[i]``)."""
    t = make_plain_mlp()
    members = [t.params, jax.tree_util.tree_map(lambda a: 1.5 * a, t.params)]
    stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *members)
    build = jax.vmap(lambda p: FIM(t.apply_fn, p, (t.x, t.y), representation))
    ensemble = build(stacked)
    for i, params in enumerate(members):
        member = jax.tree_util.tree_map(lambda a, i=i: a[i], ensemble)
        alone = FIM(t.apply_fn, params, (t.x, t.y), representation)
        np.testing.assert_allclose(member.to_dense(), alone.to_dense(), **TOL)
    restacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), ensemble, ensemble)
    assert type(restacked) is representation


def test_stacks_of_eyes_and_function_space_matrices_from_scan_and_vmap():
    from jaxgeom import GramMatrix, Jacobian, PMatEye

    t = make_plain_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)
    _, eyes = jax.lax.scan(lambda c, s: (c, PMatEye(F.layer_collection, s)), 0,
                           jnp.array([1.0, 2.0]))
    np.testing.assert_allclose(eyes.scaling, [1.0, 2.0])
    G = GramMatrix(t.apply_fn, t.params, t.x)
    J = Jacobian(t.apply_fn, t.params, t.x)
    for M in (G, J):
        doubled = jax.vmap(lambda s, M=M: s * M)(jnp.array([1.0, 2.0]))
        np.testing.assert_allclose(doubled.data[1], 2 * M.data, **TOL)
    with pytest.raises(ValueError, match="PMatDiag"):  # a vector is still no scaling
        PMatEye(F.layer_collection, jnp.ones(F.layer_collection.numel()))


@pytest.mark.parametrize("representation", [PMatDense, PMatDiag, PMatKFAC, PMatEKFAC,
                                            PMatQuasiDiag, PMatImplicit])
def test_restoring_into_a_target_of_another_model_is_refused(representation):
    """A state saved from a 5-unit hidden layer restored into a 6-unit model's matrix: a
    ``ValueError`` at the restore (KFAC's answered the saved model's trace and a ``52 × 52``
    ``to_dense``; QuasiDiag's and Implicit's failed later in unrelated-looking errors)."""
    from flax import serialization

    t = make_plain_mlp()
    wider = {"w1": jnp.ones((3, 6)), "b1": jnp.zeros(6), "w2": jnp.ones((6, 4)),
             "b2": jnp.zeros(4)}
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    target = FIM(t.apply_fn, wider, (t.x, t.y), representation)
    with pytest.raises(ValueError, match="another model|must have shape"):
        serialization.from_bytes(target, serialization.to_bytes(F))


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC,
                                            PMatKFOC, PMatEKFAC, PMatQuasiDiag, PMatLowRank,
                                            PMatMixed])
def test_flax_serialization_round_trips_a_representation(representation):
    """``flax.serialization.to_bytes`` then ``from_bytes`` into a matrix of the same
    structure (built at other params, on 2 examples: the cheap target) gives the saved
    matrix back, its products too (Flax had no state for jaxgeom's objects: ``to_bytes``
    raised; the target's static hints about its values — KFAC's rank bounds, EKFAC's ranges
    from 2 examples — were kept, and EKFAC's ``mv`` was off by 100%)."""
    from flax import serialization

    t = make_plain_mlp()
    F = FIM(t.apply_fn, t.params, (t.x, t.y), representation)
    other = jax.tree_util.tree_map(lambda a: 0.5 * a, t.params)
    target = FIM(t.apply_fn, other, (t.x[:2], t.y[:2]), representation)
    restored = serialization.from_bytes(target, serialization.to_bytes(F))
    assert type(restored) is representation
    np.testing.assert_array_equal(restored.to_dense(), F.to_dense())
    v = random_pvector(jax.random.key(5), t.params)
    np.testing.assert_allclose(restored.mv(v).to_flat(), F.mv(v).to_flat(), rtol=1e-12,
                               atol=1e-15)
    back = serialization.from_bytes(v, serialization.to_bytes(2 * v))
    np.testing.assert_array_equal(back.to_flat(), 2 * v.to_flat())


SINGULAR_OPERATIONS = {"inv": lambda M, v: M.inv(), "pow": lambda M, v: M.pow(-1),
                       "solve": lambda M, v: M.solve(v)}


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatKFAC])
@pytest.mark.parametrize("name", list(SINGULAR_OPERATIONS))
def test_an_undamped_inverse_of_a_numerically_singular_fisher_warns(representation, name):
    """A Fisher of fewer examples than parameters is singular; its eigenvalues, pivots or
    Kronecker factors' eigenvalues there are round-off, not exact zeros, so an inverse
    answered entries of ``‖v‖/(ε‖M‖)`` (10¹⁰–10¹⁸) without a word: eagerly it warns, as
    SciPy's solve does — also the solve, one compiled call answering the flag beside its
    solution (it did not check) —, once, at the caller's line; damped it is silent and exact;
    inside a user's ``jit`` nothing is staged (``jax.export`` takes the program: no host
    callback)."""
    t = make_plain_mlp(n=2)
    F = FIM(t.apply_fn, t.params, t.x, representation)
    dense = np.asarray(F.to_dense())
    assert np.linalg.matrix_rank(dense) < len(dense)
    v = np.ones(len(dense))
    with pytest.warns(RuntimeWarning, match=r"singular to working precision.*regul > 0") as w:
        SINGULAR_OPERATIONS[name](F, v)
    assert {record.filename for record in w} == {__file__}
    # once, named as called: not once a block or a Kronecker factor, nor "pow(-1)" for inv
    called = {"inv": "inv", "pow": "pow(-1)", "solve": "solve"}[name]
    assert [str(r.message).split(" of a matrix")[0] for r in w] == [called]
    damped = dense + 0.1 * np.eye(len(dense))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(F.solve(v, 0.1), np.linalg.solve(damped, v), rtol=1e-8)
        jax.export.export(jax.jit(lambda F, v: F.solve(v)))(F, v)


@pytest.mark.parametrize("name", ["inv", "solve"])
def test_a_quasi_diagonal_fisher_with_a_dead_parameter_warns_when_inverted(name):
    """An input that is always 0 leaves its weights' Fisher entries and their neurons'
    cross terms exactly 0: the quasi-diagonal's Schur complements ``0/0`` (NaN) had come
    without a word, where the other representations warn of a singular matrix (its
    pivots, as a Cholesky factor's, are checked). Now the same warning, eagerly, for the
    solve and the inverse; damped, silent and exact. (A diagonal's ``v / λ`` is exact to
    an ulp whatever its condition: ``inf`` where ``λ + regul = 0``, no warning.)"""
    t = make_plain_mlp(n=6)
    x = t.x.at[:, 0].set(0.0)
    F = FIM(t.apply_fn, t.params, x, PMatQuasiDiag)
    dense = np.asarray(F.to_dense())
    assert np.sum(np.all(dense == 0, axis=0)) == 5  # the 5 weights of input 0
    v = np.ones(len(dense))
    with pytest.warns(RuntimeWarning, match=rf"^{name} of a matrix singular to working "):
        SINGULAR_OPERATIONS[name](F, v)
    damped = dense + 0.1 * np.eye(len(dense))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(F.solve(v, 0.1), np.linalg.solve(damped, v), rtol=1e-8)
        np.testing.assert_allclose(F.inv(0.1).to_dense(), np.linalg.inv(damped), rtol=1e-8,
                                   atol=1e-12)


@pytest.mark.parametrize("representation", [PMatDense, PMatBlockDiag, PMatKFAC])
def test_a_fractional_power_of_a_singular_fisher_names_the_part_whose_eigenvalues_vanish(
        representation):
    """``pow(-1/2)`` of a Fisher of fewer examples than parameters is infinite on its null
    space: refused, counting the eigenvalues of the part decomposed (the layer's block, the
    layer's Kronecker factor), not as if they were the whole matrix's."""
    t = make_plain_mlp(n=2)
    F = FIM(t.apply_fn, t.params, t.x, representation)
    with pytest.raises(ValueError, match=r"^pow\(-0.5\) of a singular matrix: ") as error:
        F.pow(-0.5)
    count, part = re.match(r".*: (\d+) of (.*) \(\+ regul\) are ≤ 0", str(error.value)).groups()
    lc = F.layer_collection
    if representation is PMatDense:
        assert part == f"its {lc.numel()} eigenvalues"
        return
    size, kind, layer = re.fullmatch(r"the (\d+) eigenvalues of its (block|factor [AG]) of "
                                     r"layer '(.+)'", part).groups()
    spec = next((s for s in getattr(F, "specs", ()) if s.layer_id == layer), None)
    want = {"block": lambda: lc.layer_numel(layer),
            "factor A": lambda: spec.in_features + (spec.bias is not None),
            "factor G": lambda: spec.out_features}[kind]()
    assert int(size) == want and 0 < int(count) <= int(size)


@pytest.mark.parametrize("representation", [
    PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC, PMatKFOC, PMatQuasiDiag,
    PMatLowRank, PMatImplicit])
def test_float32_matrices_answer_what_float64_ones_do(representation):
    """Built from float32 parameters and data, every operation answers the float64
    build's numbers to float32 precision (a damping of 1% of the mean eigenvalue: the
    problems are conditioned to ~10³): a float32 path that drops or rounds what float64
    keeps (a threshold scaled by ``d·ε``, a float32 accumulation) shows here."""
    t = make_plain_mlp(n=40)
    to32 = functools.partial(jax.tree_util.tree_map, lambda a: a.astype(jnp.float32))
    F32 = FIM(t.apply_fn, to32(t.params), t.x.astype(jnp.float32), representation)
    F64 = FIM(t.apply_fn, t.params, t.x, representation)
    regul = 1e-2 * float(F64.trace()) / F64.size(0)
    v = np.linspace(-1.0, 1.0, F64.size(0))
    operations = {"mv": lambda M, v: M.mv(v), "vTMv": lambda M, v: M.vTMv(v),
                  "trace": lambda M, v: M.trace(), "norm": lambda M, v: M.frobenius_norm(),
                  "solve": lambda M, v: M.solve(v, regul)}
    if representation is not PMatImplicit:
        operations["logdet"] = lambda M, v: M.logdet(regul)
        operations["inv"] = lambda M, v: M.inv(regul).mv(v)
    if representation not in (PMatImplicit, PMatQuasiDiag):
        operations["pow"] = lambda M, v: M.pow(-0.5, regul).mv(v)
    for name, operation in operations.items():
        got = np.asarray(operation(F32, v.astype(np.float32)))
        want = np.asarray(operation(F64, v))
        assert got.dtype == np.float32, name
        assert np.linalg.norm(got - want) <= 1e-4 * np.linalg.norm(want), name


@pytest.mark.parametrize("representation", [PMatDense, PMatKFAC])
def test_a_damped_float32_fisher_solves_without_a_singular_warning(representation):
    """Damped at 10⁻³ of its mean eigenvalue (conditions of 10³–10⁴ in a layer), a float32
    Fisher's solve is accurate to ~10⁻⁴ and does not warn: the test is ``min ≤ 10·ε·max``,
    not a rank threshold ``n·ε`` (which a damped float32 KFAC layer of a few thousand
    parameters crossed)."""
    t = make_plain_mlp(n=40)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t.params)
    x = t.x.astype(jnp.float32)
    F = FIM(t.apply_fn, params, x, representation)
    exact = FIM(t.apply_fn, t.params, t.x, representation)
    regul = 1e-3 * float(F.trace()) / F.size(0)
    v = np.linspace(-1.0, 1.0, F.size(0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = np.asarray(F.solve(v.astype(np.float32), regul), np.float64)
        want = np.asarray(exact.solve(v, regul))
    assert np.linalg.norm(got - want) <= 1e-3 * np.linalg.norm(want)
