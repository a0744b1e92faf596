"""PVector algebra, flat conversions and vector-form validation."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_mlp

from jaxgeom import LayerCollection, PMatDense, PVector, random_pvector
from jaxgeom.vector import as_flat


@pytest.fixture
def params():
    return make_linen_mlp().params


def test_flat_order_is_ravel_pytree_order(params):
    v = random_pvector(jax.random.PRNGKey(0), params)
    flat, _ = jax.flatten_util.ravel_pytree(v.tree)
    np.testing.assert_array_equal(v.to_flat(), flat)
    np.testing.assert_array_equal(PVector.from_flat(params, flat).to_flat(), flat)
    assert v.size() == flat.size
    from_layout = PVector.from_flat(LayerCollection.from_params(params), flat)  # F's layout
    chex.assert_trees_all_equal(from_layout.tree, v.tree)


def test_arithmetic_matches_flat_arithmetic(params):
    k1, k2 = jax.random.split(jax.random.PRNGKey(1))
    v, w = random_pvector(k1, params), random_pvector(k2, params)
    fv, fw = v.to_flat(), w.to_flat()
    np.testing.assert_allclose((v + w).to_flat(), fv + fw)
    np.testing.assert_allclose((v - w).to_flat(), fv - fw)
    np.testing.assert_allclose(sum([v, w, v]).to_flat(), 2 * fv + fw)  # from the int 0
    with pytest.raises(TypeError):
        1 + v  # noqa: B018 - a number other than sum's 0 is not a vector
    np.testing.assert_allclose((-v).to_flat(), -fv)
    np.testing.assert_allclose((2.5 * v).to_flat(), 2.5 * fv)
    np.testing.assert_allclose((v * 2.5).to_flat(), 2.5 * fv)
    np.testing.assert_allclose((v / 4).to_flat(), fv / 4)
    np.testing.assert_allclose((v**2).to_flat(), fv**2)
    np.testing.assert_allclose(v.dot(w), fv @ fw)
    np.testing.assert_allclose(v @ w, fv @ fw)
    np.testing.assert_allclose(v.dot(w.tree), fv @ fw)
    np.testing.assert_allclose(v.norm(), np.linalg.norm(fv))
    np.testing.assert_allclose(v.norm(1), np.abs(fv).sum())
    np.testing.assert_allclose(v.norm(jnp.inf), np.abs(fv).max())


def test_elementwise_product_and_quotient(params):
    """``u * w`` and ``u / w`` between PVectors are elementwise (as ``**``): the OBD
    saliencies ``½ diag(F) ⊙ θ²`` and a pruning mask ``θ ⊙ m`` were a TypeError; another
    parameters' vector is refused as for ``+``."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    v, w = random_pvector(k1, params), random_pvector(k2, params)
    fv, fw = v.to_flat(), w.to_flat()
    np.testing.assert_allclose((v * w).to_flat(), fv * fw)
    np.testing.assert_allclose((v / w).to_flat(), fv / fw)
    np.testing.assert_allclose((0.5 * w * v**2).to_flat(), 0.5 * fw * fv**2)
    mask = PVector(jax.tree_util.tree_map(lambda a: (jnp.abs(a) > 1).astype(a.dtype), v.tree))
    np.testing.assert_allclose((v * mask).to_flat(), np.where(np.abs(fv) > 1, fv, 0))
    np.testing.assert_allclose(jax.jit(lambda a, b: a * b)(v, w).to_flat(), fv * fw)
    narrow = PVector(jax.tree_util.tree_map(lambda a: a[..., :1], w.tree))
    for op, apply in (("*", lambda a, b: a * b), ("/", lambda a, b: a / b)):
        with pytest.raises(ValueError, match=rf"PVector \{op} PVector: the leaf"):
            apply(v, narrow)


def test_pvector_is_a_pytree_under_jit(params):
    v = random_pvector(jax.random.PRNGKey(2), params)
    doubled = jax.jit(lambda u: u * 2.0)(v)
    assert isinstance(doubled, PVector)
    np.testing.assert_allclose(doubled.to_flat(), 2 * v.to_flat())


def test_as_flat_round_trips_each_form(params):
    layout = LayerCollection.from_params(params)
    v = random_pvector(jax.random.PRNGKey(3), params)
    for form in (v, v.tree, v.to_flat()):
        flat, wrap = as_flat(form, layout)
        np.testing.assert_array_equal(flat, v.to_flat())
        back = wrap(flat)
        assert type(back) is type(form)
        assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(form)


def test_mismatched_vectors_name_the_leaf(params):
    layout = LayerCollection.from_params(params)
    bad_shape = jax.tree_util.tree_map(lambda a: a, params)
    bad_shape["Dense_1"]["kernel"] = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="Dense_1/kernel"):
        as_flat(bad_shape, layout)
    missing = {"Dense_0": params["Dense_0"]}
    with pytest.raises(ValueError, match="missing leaves.*Dense_1/bias"):
        as_flat(missing, layout)
    with pytest.raises(ValueError, match=f"shape \\({layout.numel()},\\)"):
        as_flat(jnp.zeros(layout.numel() + 1), layout)
    with pytest.raises(ValueError, match="expected"):
        PVector.from_flat(params, jnp.zeros(3))


def test_single_array_params_answer_in_the_vector_form():
    """Params that are one ``(3, 2)`` array: a flat ``(6,)`` vector is answered flat, a
    ``(3, 2)`` one in that shape."""
    w = jnp.arange(6.0).reshape(3, 2)
    layout = LayerCollection.from_params(w)
    M = PMatDense(layout, jnp.diag(jnp.arange(1.0, 7.0)))
    v = jnp.ones(6)
    np.testing.assert_array_equal(M.mv(v), jnp.arange(1.0, 7.0))
    np.testing.assert_array_equal(M.mv(v.reshape(3, 2)), jnp.arange(1.0, 7.0).reshape(3, 2))
    np.testing.assert_allclose(M.solve(v, 1.0), 1 / jnp.arange(2.0, 8.0))


@pytest.mark.parametrize("order", [np.float64(1.0), jnp.asarray(1), np.int32(1)])
def test_norm_order_may_be_a_numpy_or_jax_scalar(params, order):
    v = random_pvector(jax.random.key(3), params)
    np.testing.assert_allclose(v.norm(order), np.abs(np.asarray(v.to_flat())).sum())


def test_norm_order_traced_is_refused_with_the_fix(params):
    v = random_pvector(jax.random.key(3), params)
    with pytest.raises(TypeError, match="Python number"):
        jax.jit(lambda p: v.norm(p))(1.0)


def test_equality_is_refused_with_the_fix_not_an_ambiguous_truth_value(params):
    from jaxgeom.fspace import FVector

    v = random_pvector(jax.random.key(3), params)
    with pytest.raises(TypeError, match="array_equal"):
        _ = v == v
    with pytest.raises(TypeError, match="ambiguous"):
        _ = FVector(jnp.ones((2, 3))) == FVector(jnp.ones((2, 3)))
    assert FVector(jnp.ones((2, 3))).norm(np.float32(1)) == 6


def _array_operations():
    """Each operator with the array on the left and on the right."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
           "/": lambda a, b: a / b}
    cases = [(f"array {op} x", lambda x, a, f=f: f(a, x)) for op, f in ops.items()] + [
        (f"x {op} array", lambda x, a, f=f: f(x, a)) for op, f in ops.items()]
    return [pytest.param(name, operation, id=name) for name, operation in cases]


@pytest.mark.parametrize("name,operation", _array_operations())
def test_an_array_operand_is_refused_with_the_conversion_to_make(params, name, operation):
    """An array of one dimension or more beside a jaxgeom object: a TypeError naming the
    conversion, from NumPy's and JAX's arrays alike (NumPy's ``ndarray * v`` had been an
    object array of scaled copies of ``v``, ``ndarray + FVector`` NumPy's message about
    concatenation); a 0-d array or a NumPy scalar still scales the object."""
    from jaxgeom.fspace import FMatDense, FVector
    from jaxgeom.pfmap import PFMapDense

    v = random_pvector(jax.random.key(3), params)
    lc = LayerCollection.from_params(params)
    d = lc.numel()
    objects = {
        "PVector": (v, "PVector.from_flat"),
        "FVector": (FVector(jnp.ones((2, 3))), r"FVector\(array\)"),
        "FMatDense": (FMatDense(jnp.ones((2, 3, 2, 3))), r"FMatDense\(array\)"),
        "PMatDense": (PMatDense(lc, jnp.eye(d)), r"PMatDense\(M.layer_collection, array\)"),
        "PFMapDense": (PFMapDense(lc, jnp.ones((2, 3, d))), "PFMapDense"),
    }
    for kind, (x, fix) in objects.items():
        for array in (np.ones(d), jnp.ones((2, 3))):
            written = name.replace("x", kind)
            with pytest.raises(TypeError, match=re.escape(written) + ".*" + fix):
                operation(x, array)
        for scalar in (np.float64(2.0), np.array(2.0), jnp.array(2.0)):
            if "*" in name:  # the scalar multiple, either side
                np.testing.assert_allclose(_dense(operation(x, scalar)), 2 * _dense(x))


def _dense(x):
    return x.to_flat() if isinstance(x, PVector) else x.to_dense()


def test_an_array_times_a_matrix_from_the_right_is_refused(params):
    """``M @ v`` is the product; ``v @ M`` (NumPy's or JAX's ``v``) names it instead of
    an error from inside NumPy."""
    lc = LayerCollection.from_params(params)
    M = PMatDense(lc, 2 * jnp.eye(lc.numel()))
    v = np.arange(lc.numel(), dtype=float)
    np.testing.assert_allclose(M @ v, 2 * v)
    for array in (v, jnp.asarray(v)):
        with pytest.raises(TypeError, match=r"array @ PMatDense.*M @ v"):
            _ = array @ M


def test_dot_checks_the_other_vector_and_takes_a_flat_one(params):
    """``u.dot(w)`` is the flat inner product for a ``PVector``, a params pytree or a flat
    vector; a leaf transposed or a leaf missing is named (``vdot`` paired a transposed
    kernel's entries wrongly and answered)."""
    u = random_pvector(jax.random.key(1), params)
    w = random_pvector(jax.random.key(2), params)
    want = float(u.to_flat() @ w.to_flat())
    for other in (w, w.tree, w.to_flat()):
        np.testing.assert_allclose(u.dot(other), want, rtol=1e-12)
    path, leaf = next((p, x) for p, x in jax.tree_util.tree_flatten_with_path(w.tree)[0]
                      if x.ndim == 2 and x.shape[0] != x.shape[1])
    transposed = jax.tree_util.tree_map_with_path(
        lambda p, x: x.T if p == path else x, w.tree)
    with pytest.raises(ValueError, match="has shape"):
        u.dot(transposed)
    with pytest.raises(ValueError, match="a flat other vector must have shape"):
        u.dot(w.to_flat()[:-1])


def test_complex_vectors_are_refused_with_the_fix(params):
    """Every representation's ``mv``/``vTMv``/``solve`` read vectors through one reader:
    a complex vector (flat, pytree or rows) is a ``TypeError`` that says how to apply the
    matrix to its real and imaginary parts (they answered ``vᵀMv``, ``vᴴMv`` or dropped the
    imaginary part, each representation its own way)."""
    lc = LayerCollection.from_params(params)
    M = PMatDense(lc, jnp.eye(lc.numel()))
    v = random_pvector(jax.random.key(1), params)
    complex_forms = [v.to_flat() * 1j, jax.tree_util.tree_map(lambda x: x * (1 + 1j), v.tree),
                     PVector(jax.tree_util.tree_map(lambda x: x * 1j, v.tree))]
    for form in complex_forms:
        for op in (M.mv, M.vTMv, lambda x: M.solve(x, 0.1)):
            with pytest.raises(TypeError, match=r"complex.*M.mv\(v.real\)"):
                op(form)
    with pytest.raises(TypeError, match="complex"):
        M.solve(jnp.stack([v.to_flat(), v.to_flat()]) * 1j, 0.1)


def test_adding_vectors_of_other_parameters_names_the_leaf_and_the_fix(params):
    """``u ± w`` between vectors of other parameters was JAX's tree_map error (no leaf, no
    fix) for another structure, and for a leaf of shape ``(1,)`` against ``(3,)`` a silently
    broadcast, wrong vector. Leading (stacking) axes still broadcast, as under ``vmap``."""
    v = random_pvector(jax.random.PRNGKey(5), params)
    with pytest.raises(ValueError, match="only on the left \\['Dense_1/bias'.*from_flat"):
        v + PVector({"Dense_0": v.tree["Dense_0"]})
    narrow = jax.tree_util.tree_map(lambda a: a, v.tree)
    narrow["Dense_0"]["bias"] = jnp.ones(1)
    with pytest.raises(ValueError, match="'Dense_0/bias' has shape \\(6,\\) on the left and "
                                         "\\(1,\\) on the right"):
        v - PVector(narrow)
    stacked = PVector(jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), v.tree))
    got = jax.vmap(lambda u: u.to_flat())(stacked + v)
    np.testing.assert_allclose(got, np.stack([2, 3])[:, None] * np.asarray(v.to_flat())[None])


def test_a_map_given_as_a_pytree_is_refused_with_the_fix(params):
    """``mmap``/``mapTMmap`` of a PVector or a (stacked) params-shaped pytree was JAX's
    "entry not a 2- or 3- tuple" or "dtype object is not a valid JAX array type"."""
    d = LayerCollection.from_params(params).numel()
    F = PMatDense(LayerCollection.from_params(params), jnp.eye(d))
    v = random_pvector(jax.random.PRNGKey(6), params)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), v.tree)
    for bad in (v, v.tree, stacked, PVector(stacked)):
        with pytest.raises(TypeError, match=f"array of flat vectors \\(..., {d}\\).*jax.vmap"):
            F.mmap(bad)
        with pytest.raises(TypeError, match="jax.vmap"):
            F.mapTMmap(bad, reduction="diag")
    rows = jax.vmap(lambda tree: PVector(tree).to_flat())(stacked)  # the fix
    np.testing.assert_allclose(F.mmap(rows), np.stack([v.to_flat()] * 2))


def test_a_stack_given_where_one_vector_is_expected_points_to_vmap(params):
    """``vTMv`` of a stack of flat rows or of a stacked params pytree named only the shape."""
    layout = LayerCollection.from_params(params)
    d = layout.numel()
    F = PMatDense(layout, jnp.eye(d))
    v = random_pvector(jax.random.PRNGKey(7), params)
    with pytest.raises(ValueError, match=f"shape \\({d},\\).*mapTMmap.*jax.vmap"):
        F.vTMv(jnp.stack([v.to_flat()] * 2))
    stacked = PVector(jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), v.tree))
    with pytest.raises(ValueError, match="'Dense_0/bias' has shape \\(2, 6\\).*jax.vmap"):
        F.vTMv(stacked)
    got = jax.vmap(F.vTMv)(stacked)  # the fix
    np.testing.assert_allclose(got, [float(v.dot(v))] * 2, rtol=1e-12)


def test_restoring_the_state_of_other_parameters_names_the_leaf(params):
    """``from_bytes`` of another model's vector gave a PVector of that model's shapes
    (Flax takes the state's arrays as they are) without a word."""
    from flax import serialization

    v = random_pvector(jax.random.PRNGKey(8), params)
    back = serialization.from_bytes(v, serialization.to_bytes(2 * v))
    np.testing.assert_allclose(back.to_flat(), 2 * np.asarray(v.to_flat()), rtol=1e-15)
    other = jax.tree_util.tree_map(lambda a: a, v.tree)
    other["Dense_0"]["kernel"] = jnp.ones((4, 6))
    with pytest.raises(ValueError, match="'Dense_0/kernel' has shape \\(4, 6\\).*\\(3, 6\\)"):
        serialization.from_bytes(v, serialization.to_bytes(PVector(other)))


def test_integer_and_boolean_leaves_are_floating_entries():
    """An integer or boolean params leaf (a constant, its derivative zero) has entries in
    the floating leaves' dtype, in a random vector as in one made from a flat vector (the
    form every product answers in); the layout of such leaves alone is floating too."""
    params = {"w": jnp.ones((2, 3), jnp.float32), "step": jnp.array(3, jnp.int32),
              "mask": jnp.array([True, False])}
    v = random_pvector(jax.random.key(0), params)
    flat = PVector.from_flat(params, jnp.arange(9.0, dtype=jnp.float32))
    for w in (v, flat):
        assert {k: (x.shape, x.dtype) for k, x in w.tree.items()} == {
            "w": ((2, 3), jnp.float32), "step": ((), jnp.float32), "mask": ((2,), jnp.float32)}
    assert np.all(v.tree["step"] != 0) and LayerCollection.from_params(params).dtype == jnp.float32
    only = LayerCollection.from_params({"step": params["step"]})
    assert jnp.issubdtype(only.dtype, jnp.floating)
