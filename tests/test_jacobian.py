"""Jacobian maps (PFMapDense, PFMapImplicit) against per-example ``jax.jacrev``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import (
    constant_columns,
    flat_jacobian,
    make_counted_mlp,
    make_equinox_mlp,
    make_linen_cnn,
    make_linen_mlp,
)

import jaxgeom
from jaxgeom import FIM, PMatDense, PMatDiag, PMatImplicit, PVector
from jaxgeom import data as data_lib
from jaxgeom.fspace import FVector
from jaxgeom.pfmap import Jacobian, PFMapDense, PFMapImplicit

TOL = dict(rtol=1e-9, atol=1e-11)


@pytest.fixture(scope="module", params=[make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def case(request):
    return _case(request.param)


@functools.lru_cache
def _case(make):
    t = make()
    ref = np.asarray(flat_jacobian(t.apply_fn, t.params, t.x)).transpose(1, 0, 2)  # (K, N, d)
    dense = Jacobian(t.apply_fn, t.params, (t.x, t.y), batch_size=2)
    implicit = Jacobian(t.apply_fn, t.params, (t.x, t.y), PFMapImplicit, batch_size=3)
    return t, ref, dense, implicit


@pytest.fixture(scope="module")
def mlp():
    """The linen MLP's maps: the cheaper checks run on it only."""
    return _case(make_linen_mlp)


def _flat(v):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(v.tree)])


@jax.jit
def _products(maps, v, f):
    out = []
    for J in maps:
        jv = J.jvp(v)
        out.append(dict(jvp=jv, vjp=J.vjp(f), vjp_array=J.vjp(f.data), jtjv=J.vjp(jv),
                        dense=J.to_dense(), scaled=(2.5 * J).jvp(v), negated=(-J).jvp(v),
                        divided=(J / 4).vjp(f)))
    return out


@pytest.mark.parametrize("mode", ["reverse", "forward"])
@pytest.mark.parametrize("form, cuts, batch_size", [
    ("array", (), 3),        # in place; the short last chunk written over its predecessor
    ("array", (), 10),       # in place; one chunk larger than the data
    ("array", (), 7),        # in place; one exact chunk
    ("list", (4,), 2),       # in place; the last batch's short chunk overlaps
    ("list", (3,), 2),       # in place; a short chunk inside the data, no overlap
    ("iterator", (4,), 2),   # collected chunk by chunk
])
def test_dense_rows_land_output_major(mode, form, cuts, batch_size):
    """``PFMapDense`` writes each chunk's rows into the ``(K, N, d)`` result at their
    examples, in either Jacobian mode."""
    t = make_linen_mlp()
    ref = np.asarray(flat_jacobian(t.apply_fn, t.params, t.x)).transpose(1, 0, 2)
    parts = np.split(np.asarray(t.x), cuts)
    data = {"array": t.x, "list": parts, "iterator": iter(parts)}[form]
    J = Jacobian(t.apply_fn, t.params, data, batch_size=batch_size, mode=mode)
    np.testing.assert_allclose(J.to_dense(), ref, **TOL)


def test_dense_and_implicit_equal_jacrev(case):
    t, ref, dense, implicit = case
    assert isinstance(dense, PFMapDense) and dense.size() == ref.shape
    assert implicit.size() == ref.shape and implicit.size(1) == t.x.shape[0]
    np.testing.assert_allclose(dense.to_dense(), ref, **TOL)
    np.testing.assert_allclose(implicit.to_dense(), ref, **TOL)


def test_products_and_adjointness(case):
    t, ref, dense, implicit = case
    rng = np.random.default_rng(0)
    v = PVector(jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape), t.params))
    fv = _flat(v)
    f = FVector(rng.standard_normal(ref.shape[:2]))
    jv = ref @ fv
    jtf = np.einsum("knd,kn->d", ref, f.data)
    for out in _products((dense, implicit), v, f):
        assert isinstance(out["jvp"], FVector) and isinstance(out["vjp"], PVector)
        np.testing.assert_allclose(out["jvp"].data, jv, **TOL)
        np.testing.assert_allclose(_flat(out["vjp"]), jtf, **TOL)
        np.testing.assert_allclose(_flat(out["vjp_array"]), jtf, **TOL)
        np.testing.assert_allclose(out["dense"], ref, **TOL)
        # adjointness: <v, Jᵀ(Jv)> = ‖Jv‖²
        np.testing.assert_allclose(fv @ _flat(out["jtjv"]), np.sum(jv**2), **TOL)
        np.testing.assert_allclose(out["scaled"].data, 2.5 * jv, **TOL)
        np.testing.assert_allclose(out["negated"].data, -jv, **TOL)
        np.testing.assert_allclose(_flat(out["divided"]), jtf / 4, **TOL)
    # called eagerly: the implicit map's chunk loops run from Python (the last chunk of 3
    # padded), the work around them as compiled calls
    np.testing.assert_allclose(implicit.jvp(v).data, jv, **TOL)
    np.testing.assert_allclose(_flat(implicit.vjp(f)), jtf, **TOL)
    np.testing.assert_allclose(_flat((-2.0 * implicit).vjp(f.data)), -2 * jtf, **TOL)


def test_finite_differences(case):
    """``J dw ≈ f(w + dw) − f(w)`` (central differences, ``|dw| ~ 1e-6``)."""
    t, _, dense, _ = case
    rng = np.random.default_rng(1)
    dw = jax.tree_util.tree_map(lambda a: 1e-6 * rng.standard_normal(a.shape), t.params)

    def shifted(sign):
        p = jax.tree_util.tree_map(lambda a, b: a + sign * b, t.params, dw)
        return t.apply_fn(p, t.x).reshape(t.x.shape[0], -1).T

    diff = (shifted(1) - shifted(-1)) / 2
    np.testing.assert_allclose(dense.jvp(dw).data, diff, rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn])
def test_per_layer_views(make, monkeypatch):
    """``iter_by_layer`` / ``to_dense_layer`` are the columns ``J[..., layer_indices]``; the
    implicit map's (scaled, and a sum of maps at two parameter points) are streamed from
    the layer's own Jacobian, never from the whole ``(K, N, d)`` map."""
    t, ref, dense, implicit = _case(make)
    lc = dense.layer_collection
    assert len(lc.layers) >= 2
    other = jax.tree_util.tree_map(lambda a: 0.5 * a, t.params)
    ref_other = np.asarray(flat_jacobian(t.apply_fn, other, t.x)).transpose(1, 0, 2)
    at_other = Jacobian(t.apply_fn, other, (t.x, t.y), PFMapImplicit, batch_size=3)
    sum_of_two = -1.5 * implicit + at_other  # one implicit map: fn sums both points
    assert isinstance(sum_of_two, PFMapImplicit)
    monkeypatch.setattr(PFMapImplicit, "to_dense", None)  # the whole map is never formed
    for J, expected in [(dense, ref), (implicit, ref), (2.5 * implicit, 2.5 * ref),
                        (sum_of_two, -1.5 * ref + ref_other)]:
        rebuilt = np.zeros_like(expected)
        for layer, cols in J.iter_by_layer():
            idx = lc.layer_indices(layer)
            assert cols.shape == expected.shape[:2] + (len(idx),)
            rebuilt[..., idx] = cols
            np.testing.assert_allclose(J.to_dense_layer(layer.id), expected[..., idx], **TOL)
        np.testing.assert_allclose(rebuilt, expected, **TOL)


def test_addition(mlp):
    t, ref, dense, implicit = mlp
    both = implicit + 2 * implicit
    assert isinstance(both, PFMapImplicit)  # still matrix-free
    np.testing.assert_allclose(both.to_dense(), 3 * ref, **TOL)
    np.testing.assert_allclose((implicit - implicit).to_dense(), 0 * ref, atol=1e-12)
    for mixed, factor in [(dense + implicit, 2), (implicit - 0.5 * dense, 0.5),
                          (dense - dense, 0), (dense + dense * 2, 3)]:
        assert isinstance(mixed, PFMapDense)
        np.testing.assert_allclose(mixed.to_dense(), factor * ref, **TOL)


def test_pmats_take_maps(mlp):
    """``mmap``, ``mapTMmap`` (sum and diag) and ``solve`` of every PMat accept PFMaps."""
    t, ref, dense, implicit = mlp
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense)
    reps = [F, PMatDiag(F.layer_collection, F.get_diag()),
            FIM(t.apply_fn, t.params, t.x, PMatImplicit, batch_size=4)]
    for M in reps:
        m = np.asarray(M.to_dense())
        forms = np.einsum("knd,de,kne->kn", ref, m, ref)
        for J in (dense, implicit):
            np.testing.assert_allclose(M.mmap(J), ref @ m.T, **TOL)
            np.testing.assert_allclose(M.mapTMmap(J, reduction="diag"), forms, **TOL)
            np.testing.assert_allclose(M.mapTMmap(J), forms.sum(0), **TOL)
            np.testing.assert_allclose(M @ J, ref @ m.T, **TOL)
            np.testing.assert_allclose(M.mmap(J), ref @ m.T, **TOL)
    solved = F.solve(dense, 1e-3)
    np.testing.assert_allclose(solved @ (np.asarray(F.to_dense()) + 1e-3 * np.eye(ref.shape[-1])),
                               ref, rtol=1e-6, atol=1e-8)


def test_predictive_covariance_of_every_output_pair(mlp):
    """``mapTMmap(J, reduction="full")`` is ``J_n M J_nᵀ``, ``(N, K, K)``: the linearised
    predictive covariance of a Laplace posterior ``Σ = (N F + τ I)⁻¹`` at new inputs (only
    its diagonal, ``"diag"``, was available); for a dense and a K-FAC posterior."""
    t, ref, dense, implicit = mlp
    n, tau = t.x.shape[0], 0.5
    posteriors = [(n * FIM(t.apply_fn, t.params, (t.x, t.y), rep)).inv(tau)
                  for rep in (PMatDense, jaxgeom.PMatKFAC)]
    for S in posteriors:
        s = np.asarray(S.to_dense())
        want = np.einsum("ani,ij,bnj->nab", ref, s, ref)
        for J in (dense, implicit, ref):
            cov = S.mapTMmap(J, reduction="full")
            assert cov.shape == (ref.shape[1], ref.shape[0], ref.shape[0])
            np.testing.assert_allclose(cov, want, **TOL)
            np.testing.assert_array_equal(cov, np.swapaxes(cov, 1, 2))
            np.testing.assert_allclose(np.diagonal(cov, axis1=1, axis2=2).T,
                                       S.mapTMmap(J, reduction="diag"), **TOL)
        np.testing.assert_allclose(jax.jit(lambda S, J: S.mapTMmap(J, "full"))(S, dense),
                                   want, **TOL)
    with pytest.raises(ValueError, match=r"'full' needs a \(K, N, d\) map"):
        posteriors[0].mapTMmap(ref[0], reduction="full")


def test_generic_function_and_batches():
    """``function(params, batch) -> (N, K)`` sees whole batches; iterables of batches and
    one-shot generators give the same map as one batch."""
    t = make_linen_mlp()

    def losses(p, batch):
        x, y = batch
        logp = jax.nn.log_softmax(t.apply_fn(p, x))
        return -jnp.take_along_axis(logp, y[:, None], axis=1)  # (N, 1)

    flat0, unravel = jax.flatten_util.ravel_pytree(t.params)
    ref = jax.vmap(jax.grad(lambda w, x, y: losses(unravel(w), (x[None], y[None]))[0, 0]),
                   in_axes=(None, 0, 0))(flat0, t.x, t.y)
    batches = [(t.x[:3], t.y[:3]), (t.x[3:], t.y[3:])]
    for rep, data in [(PFMapDense, (t.x, t.y)), (PFMapDense, iter(batches)),
                      (PFMapImplicit, (b for b in batches))]:
        J = Jacobian(None, t.params, data, rep, function=losses, batch_size=2)
        np.testing.assert_allclose(J.to_dense(), np.asarray(ref)[None], **TOL)
        np.testing.assert_allclose(J.to_dense(), np.asarray(ref)[None], **TOL)  # replayed


def test_multi_axis_outputs_and_linear_model():
    """``(N, P, C)`` outputs are flattened row-major to ``K = P·C``; for a model linear in
    its parameters, ``J dw = f(w + dw) − f(w)`` exactly."""
    params = {"w": np.random.default_rng(2).standard_normal((3, 6))}
    x = np.random.default_rng(3).standard_normal((5, 3))

    def apply_fn(p, x):
        return (x @ p["w"]).reshape(x.shape[0], 2, 3)

    J = Jacobian(apply_fn, params, x)
    assert J.size() == (6, 5, 18)
    dw = {"w": np.random.default_rng(4).standard_normal((3, 6))}
    shifted = apply_fn({"w": params["w"] + dw["w"]}, x) - apply_fn(params, x)
    np.testing.assert_allclose(J.jvp(dw).data, shifted.reshape(5, 6).T, **TOL)


def test_under_jit():
    t = make_linen_mlp()
    build = jax.jit(lambda p, x: Jacobian(t.apply_fn, p, x, batch_size=3))
    J = build(t.params, t.x)
    ref = np.asarray(flat_jacobian(t.apply_fn, t.params, t.x)).transpose(1, 0, 2)
    assert isinstance(J, PFMapDense)
    np.testing.assert_allclose(J.to_dense(), ref, **TOL)
    leaves, treedef = jax.tree_util.tree_flatten(J)
    assert len(leaves) == 1 and jax.tree_util.tree_unflatten(treedef, leaves).shape == ref.shape


def test_implicit_products_inside_jit_scan_the_chunks():
    """Inside a ``jit`` ``PFMapImplicit``'s ``jvp`` and ``vjp`` read their chunks by one
    ``lax.scan``: equal to the per-example Jacobians' products for one batch of 7 in
    chunks of 3 (the last padded) and for a list of two batches, and the program (and
    ``vjp``'s scratch memory) the same for 12 and 48 examples."""
    t = make_linen_mlp()
    ref = np.asarray(flat_jacobian(t.apply_fn, t.params, t.x)).transpose(1, 0, 2)
    rng = np.random.default_rng(1)
    v = PVector(jax.tree_util.tree_map(lambda a: rng.standard_normal(a.shape), t.params))
    f = rng.standard_normal(ref.shape[:2])
    products = jax.jit(lambda J, v, f: (J.jvp(v).data, J.vjp(f).to_flat()))
    for data in ((t.x, t.y), [(t.x[:5], t.y[:5]), (t.x[5:], t.y[5:])]):
        J = Jacobian(t.apply_fn, t.params, data, PFMapImplicit, batch_size=3)
        jv, jtf = (np.asarray(a) for a in products(J, v, f))
        np.testing.assert_allclose(jv, ref @ _flat(v), **TOL)
        np.testing.assert_allclose(jtf, np.einsum("knd,kn->d", ref, f), **TOL)

    def program(n):
        x = jnp.zeros((n, t.x.shape[1]))

        def both(p, x, v, f):
            J = Jacobian(t.apply_fn, p, (x,), PFMapImplicit, batch_size=3)
            return J.jvp(v).data, J.vjp(f)

        def vjp(p, x, f):
            return Jacobian(t.apply_fn, p, (x,), PFMapImplicit, batch_size=3).vjp(f)

        cotangents = jnp.zeros((ref.shape[0], n))
        primitives = [e.primitive.name for e in jax.make_jaxpr(both)(t.params, x, v,
                                                                     cotangents).eqns]
        scratch = jax.jit(vjp).lower(t.params, x, cotangents).compile().memory_analysis()
        return primitives, scratch.temp_size_in_bytes

    assert program(12)[0].count("scan") == 2
    assert program(12) == program(48)


def test_bad_input():
    t = make_linen_mlp()
    with pytest.raises(TypeError, match="PFMapDense or PFMapImplicit"):
        Jacobian(t.apply_fn, t.params, t.x, PMatDense)
    J = Jacobian(t.apply_fn, t.params, t.x)
    with pytest.raises(ValueError, match="function-space vector"):
        J.vjp(np.ones((3, 7)))
    with pytest.raises(ValueError, match=r"shape \(N, K\)"):
        Jacobian(None, t.params, t.x, function=lambda p, x: t.apply_fn(p, x).T)
    with pytest.raises(ValueError, match="apply_fn"):
        Jacobian(None, t.params, t.x)


def test_last_chunk_offset():
    """Where the data's last chunk starts (in-memory data only)."""
    x = np.zeros((7, 2))
    assert data_lib.last_chunk_offset(x, 3) == 6
    assert data_lib.last_chunk_offset(x, 10) == 0
    assert data_lib.last_chunk_offset(x) == 0
    assert data_lib.last_chunk_offset([x[:3], x[3:3], x[3:]], 2) == 5
    assert data_lib.last_chunk_offset([x[:3], x[3:]]) == 3
    assert data_lib.last_chunk_offset(iter([x]), 2) is None


def test_float32_model_takes_float64_vectors():
    """A float32 model (Flax's default) with float64 vectors (x64 on): both maps give
    ``Jᵀ f`` and ``J v`` of the float32 Jacobian, promoted to float64."""
    t = make_linen_mlp()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t.params)
    x = t.x.astype(jnp.float32)
    ref = np.asarray(flat_jacobian(t.apply_fn, params, x), np.float64).transpose(1, 0, 2)
    K, N, d = ref.shape
    f = jax.random.normal(jax.random.PRNGKey(1), (K, N), jnp.float64)
    v = jax.random.normal(jax.random.PRNGKey(2), (d,), jnp.float64)
    for rep in (PFMapDense, PFMapImplicit):
        J = Jacobian(t.apply_fn, params, x, rep, batch_size=3)
        back, forward = J.vjp(f).to_flat(), J.jvp(v).data
        assert back.dtype == forward.dtype == jnp.float64
        np.testing.assert_allclose(back, np.einsum("knd,kn->d", ref, f), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(forward, ref @ np.asarray(v), rtol=1e-5, atol=1e-5)


def test_float32_parameters_on_float64_inputs_in_either_mode():
    """Flax's float32 parameters on float64 data (x64 on): forward mode's tangents take
    the outputs' float64 (a dtype error writing them into the float32 map before); both
    modes give the float32 Jacobian, and so does a low-rank Fisher built from its rows."""
    t = make_linen_mlp()
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t.params)
    x = t.x.astype(jnp.float64)
    ref = np.asarray(flat_jacobian(t.apply_fn, params, x)).transpose(1, 0, 2)
    for mode in ("forward", "reverse"):
        J = Jacobian(t.apply_fn, params, x, mode=mode, batch_size=3)
        assert J.data.dtype == jnp.float32
        np.testing.assert_allclose(J.data, ref, rtol=1e-5, atol=1e-6)
        F = FIM(t.apply_fn, params, x, jaxgeom.PMatLowRank, mode=mode)
        assert F.factor.dtype == jnp.float32


@pytest.mark.parametrize("data", ["array", "list", "empty list"])
def test_function_space_builds_of_no_example_raise_the_data_error(data):
    """Data without any example: the documented ``ValueError`` (was a ``ZeroDivisionError``
    from a reshape), for the Jacobian, its implicit form, the Gram matrix both ways and
    the cross kernel on either side."""
    from jaxgeom.pfmap import CrossGramMatrix, GramMatrix

    t = make_linen_mlp()
    empty = t.x[:0]
    data = {"array": empty, "list": [empty, empty], "empty list": []}[data]
    builds = [lambda: Jacobian(t.apply_fn, t.params, data),
              lambda: Jacobian(t.apply_fn, t.params, data, PFMapImplicit).to_dense(),
              lambda: GramMatrix(t.apply_fn, t.params, data),
              lambda: GramMatrix(t.apply_fn, t.params, data, method="implicit"),
              lambda: CrossGramMatrix(t.apply_fn, t.params, data, t.x),
              lambda: CrossGramMatrix(t.apply_fn, t.params, t.x, data, method="implicit")]
    for build in builds:
        with pytest.raises(ValueError, match="no (example|batch)"):
            build()


def test_integer_vectors_are_not_truncated(mlp):
    """Jv, Jᵀf and Fv of integer vectors (one-hot, ±1 patterns) are the products of their
    float values: the matrix-free products' results take the vector's dtype only when it is
    floating."""
    t, ref, dense_map, implicit = mlp
    d = ref.shape[2]
    v = np.arange(d) % 3 - 1
    f = (np.arange(ref.shape[0] * ref.shape[1]) % 4 - 2).reshape(ref.shape[:2])
    for J in (dense_map, implicit):
        np.testing.assert_allclose(J.jvp(jnp.asarray(v)).to_dense(),
                                   np.einsum("knd,d->kn", ref, v), **TOL)
        np.testing.assert_allclose(_flat(J.vjp(jnp.asarray(f))), np.einsum("knd,kn->d", ref, f),
                                   **TOL)
    F = FIM(t.apply_fn, t.params, (t.x, t.y), PMatImplicit)
    np.testing.assert_allclose(F.mv(jnp.asarray(v)),
                               FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense).mv(v * 1.0),
                               **TOL)



@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_integer_and_boolean_leaves_have_zero_columns(mode):
    """Params holding integer and boolean leaves (a step counter and a mask the model reads,
    a counter it ignores) beside a float gain outside any dense layer: the leaves are
    constants, with zero columns in the dense map built either way, and the implicit map's
    ``jvp``/``vjp`` (which JAX would give float0 tangents and cotangents) equal the dense
    map's products, eagerly and under ``jit``, for any vector form (a raw params pytree
    with its integer leaves included); ``vjp`` gives such a leaf the dense map's float
    zeros of the leaf's shape."""
    t = make_counted_mlp()
    ref = np.asarray(flat_jacobian(t.apply_fn, t.params, t.x)).transpose(1, 0, 2)
    constant = constant_columns(t.params)
    assert constant.size == 8 and not ref[..., constant].any() and ref.any()
    dense = Jacobian(t.apply_fn, t.params, (t.x, t.y), batch_size=3, mode=mode)
    implicit = Jacobian(t.apply_fn, t.params, (t.x, t.y), PFMapImplicit, batch_size=3,
                        mode=mode)
    np.testing.assert_allclose(dense.to_dense(), ref, **TOL)
    np.testing.assert_allclose(implicit.to_dense(), ref, **TOL)
    rng = np.random.default_rng(0)
    flat = rng.standard_normal(ref.shape[2])
    f = FVector(rng.standard_normal(ref.shape[:2]))
    v = PVector.from_flat(t.params, flat)
    raw = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t.params)])
    for vector, fv in [(flat, flat), (v, flat), (v.tree, flat), (t.params, raw)]:
        expected = dense.jvp(vector).data
        np.testing.assert_allclose(expected, ref @ fv, **TOL)
        np.testing.assert_allclose(implicit.jvp(vector).data, expected, **TOL)
    back, dense_back = implicit.vjp(f), dense.vjp(f)
    np.testing.assert_allclose(dense_back.to_flat(), np.einsum("knd,kn->d", ref, f.data), **TOL)
    np.testing.assert_allclose(back.to_flat(), dense_back.to_flat(), **TOL)
    for a, b in zip(jax.tree_util.tree_leaves(back.tree),
                    jax.tree_util.tree_leaves(dense_back.tree)):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)
    assert back.tree["step"].dtype == jnp.float64 and not back.tree["mask"].any()
    for out in _products((dense, implicit), v, f):
        np.testing.assert_allclose(out["jvp"].data, ref @ flat, **TOL)
        np.testing.assert_allclose(out["vjp"].to_flat(), dense_back.to_flat(), **TOL)
        np.testing.assert_allclose(out["jtjv"].to_flat(),
                                   np.einsum("knd,kn->d", ref, ref @ flat), **TOL)
    lc = implicit.layer_collection
    for layer in lc.layers:  # the constants' own layers too: zero columns
        idx = lc.layer_indices(layer)
        np.testing.assert_allclose(implicit.to_dense_layer(layer.id), ref[..., idx], **TOL)

def test_function_space_vectors_are_checked(mlp):
    t, ref, J, _ = mlp
    K, N = ref.shape[:2]
    with pytest.raises(ValueError, match=r"FVector data must have shape \(K, N\)"):
        FVector(jnp.ones(N))
    with pytest.raises(ValueError, match="cannot combine FVectors"):
        FVector(jnp.ones((K, N))) + FVector(jnp.ones((1, N)))
    with pytest.raises(TypeError, match="got a PVector.*jvp"):
        J.vjp(PVector(t.params))
    G = jaxgeom.GramMatrix(t.apply_fn, t.params, (t.x, t.y))
    with pytest.raises(ValueError, match="cannot combine FMatDenses"):
        G - jaxgeom.FMatDense(G.data[:, :2, :, :2])
    with pytest.raises(ValueError, match="regul must be a scalar"):
        G.solve(jnp.ones((K, N)), jnp.ones(K * N))


@pytest.mark.filterwarnings("ignore:shape requires ndarray:DeprecationWarning")  # Flax on a dict x
def test_a_single_example_or_a_dict_batch_fails_with_the_fix():
    """One example without its batch axis: the FIM's message with the fix (was ``(N, K) =
    (3, K) ... got (4, 1)``, about a function the user never wrote); a ``{'x', 'y'}`` dict
    batch: the model's error with a note naming the fix."""
    t = make_linen_mlp()
    for build in (Jacobian, jaxgeom.GramMatrix):
        with pytest.raises(ValueError, match=r"leading axis.*single example.*x\[None\]"):
            build(t.apply_fn, t.params, (t.x[0], t.y[0]))
        with pytest.raises(Exception) as info:
            build(t.apply_fn, t.params, {"x": t.x, "y": t.y})
        assert "(batch['x'], batch['y'])" in " ".join(getattr(info.value, "__notes__", []))
    with pytest.raises(ValueError, match=r"single example.*x\[None\]"):
        Jacobian(None, t.params, t.x[0], function=t.apply_fn)
    with pytest.raises(ValueError, match=r"leading axis.*single example.*x\[None\]"):
        jaxgeom.CrossGramMatrix(t.apply_fn, t.params, t.x, (t.x[0], t.y[0]))


def test_scalar_outputs_are_refused_with_the_fim_message():
    t = make_linen_mlp()

    def summed(p, x):
        return t.apply_fn(p, x).sum()

    for build in (Jacobian, jaxgeom.GramMatrix,
                  lambda f, p, d: jaxgeom.CrossGramMatrix(f, p, d, d)):
        with pytest.raises(ValueError, match="examples on their leading axis"):
            build(summed, t.params, (t.x, t.y))
