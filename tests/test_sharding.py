"""Builds from data sharded across devices (two host CPU devices, ``tests/conftest.py``),
against the same builds on one device.

- automatic sharding (GSPMD): arrays on a mesh of ``Auto`` axes;
- explicit sharding (``jax.make_mesh``'s default axis type): arrays whose type carries
  their sharding, eagerly and under ``jit``, with and without ``jax.set_mesh``;
- ``jax.shard_map``: each device builds from its shard, ``pmean`` gives the whole mean
  (``check_vma=False``); ``check_vma=True`` is refused with that fix.
"""

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from models import make_linen_mlp

import jaxgeom

AxisType = getattr(jax.sharding, "AxisType", None)
pytestmark = [
    pytest.mark.skipif(len(jax.devices()) < 2, reason="needs two devices (conftest gives "
                       "the CPU backend two; an accelerator run may have one)"),
    pytest.mark.skipif(AxisType is None, reason="JAX before explicit sharding (0.6)"),
]


def mesh_of(axis_type):
    return jax.make_mesh((2,), ("data",), axis_types=(axis_type,),
                         devices=jax.devices()[:2])


def dense(M):
    """``M.to_dense()`` on the host (comparisons free of any mesh)."""
    return np.asarray(M.to_dense())


def sharded(task, mesh):
    """The task's batch split over the mesh's data axis, its params replicated."""
    split, whole = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return (jax.device_put(task.params, whole),
            (jax.device_put(task.x, split), jax.device_put(task.y, split)))


def flat(v):
    return np.asarray(jax.flatten_util.ravel_pytree(v)[0])


@pytest.fixture(scope="module")
def task():
    return make_linen_mlp(n=8)  # an even number of examples: four per device


@pytest.mark.parametrize("representation", [jaxgeom.PMatKFAC, jaxgeom.PMatDense,
                                            jaxgeom.PMatLowRank])
def test_automatic_sharding(task, representation):
    params, batch = sharded(task, mesh_of(AxisType.Auto))
    expected = dense(jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), representation))
    F = jaxgeom.FIM(task.apply_fn, params, batch, representation)
    np.testing.assert_allclose(dense(F), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("representation", [jaxgeom.PMatKFAC, jaxgeom.PMatDense,
                                            jaxgeom.PMatDiag, jaxgeom.PMatLowRank,
                                            jaxgeom.PMatEKFAC, jaxgeom.PMatImplicit])
@pytest.mark.parametrize("context", [False, True], ids=["placed", "set_mesh"])
def test_explicit_sharding(task, representation, context):
    """F and F·v of a batch sharded over an explicit axis, with the caller's mesh set or
    not; the result comes back replicated on the caller's mesh."""
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)
    F1 = jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), representation)
    v = jax.tree.map(lambda a: jnp.full_like(a, 0.5), task.params)
    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        F = jaxgeom.FIM(task.apply_fn, params, batch, representation)
        Fv = flat(F.mv(v))
    np.testing.assert_allclose(dense(F), dense(F1), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(Fv, flat(F1.mv(v)), rtol=1e-10, atol=1e-12)
    leaf = jax.tree.leaves(F)[0]
    assert leaf.sharding.mesh.axis_types == (AxisType.Explicit,)
    assert leaf.sharding.is_fully_replicated


def test_explicit_sharding_with_the_arguments_named(task):
    """The wrapper finds ``params`` and ``data`` by name as well as by position (it reads
    them without binding the whole call); a missing or repeated one is Python's own
    ``TypeError``, as without the wrapper."""
    params, batch = sharded(task, mesh_of(AxisType.Explicit))
    F1 = jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), jaxgeom.PMatDense)
    F = jaxgeom.FIM(task.apply_fn, representation=jaxgeom.PMatDense, data=batch,
                    params=params)
    np.testing.assert_allclose(dense(F), dense(F1), rtol=1e-10, atol=1e-12)
    assert jax.tree.leaves(F)[0].sharding.mesh.axis_types == (AxisType.Explicit,)
    with pytest.raises(TypeError, match="'data'"):
        jaxgeom.FIM(task.apply_fn, params, representation=jaxgeom.PMatDense)
    with pytest.raises(TypeError, match="'params'"):
        jaxgeom.FIM(task.apply_fn, params, batch, jaxgeom.PMatDense, params=params)


def test_explicit_sharding_streams(task):
    """A list and a generator of sharded batches: the mean over all their examples,
    Monte-Carlo targets drawn per example index as on one device."""
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)
    key = jax.random.key(7)
    for data, plain in [([batch, batch], [(task.x, task.y)] * 2),
                        (iter([batch, batch]), [(task.x, task.y)] * 2)]:
        F = jaxgeom.FIM_MonteCarlo(task.apply_fn, params, data, jaxgeom.PMatKFAC, key=key)
        F1 = jaxgeom.FIM_MonteCarlo(task.apply_fn, task.params, plain, jaxgeom.PMatKFAC,
                                    key=key)
        np.testing.assert_allclose(dense(F), dense(F1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("context", [False, True], ids=["placed", "set_mesh"])
def test_explicit_sharding_under_jit(task, context):
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)
    build = jax.jit(lambda p, b: jaxgeom.FIM(task.apply_fn, p, b, jaxgeom.PMatDense))
    with jax.set_mesh(mesh) if context else contextlib.nullcontext():
        F = build(params, batch)
    F1 = jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), jaxgeom.PMatDense)
    np.testing.assert_allclose(dense(F), dense(F1), rtol=1e-10, atol=1e-12)


def test_explicit_sharding_other_builders(task):
    """Hessian (stored and implicit), the Jacobian (stored and implicit), the Gram
    matrix and the cross kernel of sharded data."""
    params, batch = sharded(task, mesh_of(AxisType.Explicit))
    plain = (task.x, task.y)

    def loss(p, b):
        return jnp.mean(jax.nn.logsumexp(task.apply_fn(p, b[0]), axis=-1))

    for representation in (jaxgeom.PMatDense, jaxgeom.PMatImplicit):
        np.testing.assert_allclose(
            dense(jaxgeom.Hessian(loss, params, batch, representation)),
            dense(jaxgeom.Hessian(loss, task.params, plain, jaxgeom.PMatDense)),
            rtol=1e-10, atol=1e-12)
    J1 = dense(jaxgeom.Jacobian(task.apply_fn, task.params, plain))
    for representation in (jaxgeom.PFMapDense, jaxgeom.PFMapImplicit):
        J = jaxgeom.Jacobian(task.apply_fn, params, batch, representation)
        np.testing.assert_allclose(dense(J), J1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        dense(jaxgeom.GramMatrix(task.apply_fn, params, batch)),
        np.einsum("anp,bmp->anbm", J1, J1), rtol=1e-10, atol=1e-12)
    # the cross kernel: both data sets sharded, or one of them only
    for method in ("jacobian", "implicit"):
        for left, right in [(batch, batch), (plain, batch)]:
            np.testing.assert_allclose(
                np.asarray(jaxgeom.CrossGramMatrix(task.apply_fn, params, left, right,
                                                   method=method)),
                np.einsum("anp,bmp->anbm", J1, J1), rtol=1e-10, atol=1e-12, err_msg=method)


@pytest.mark.parametrize("representation", [jaxgeom.PMatKFAC, jaxgeom.PMatDense,
                                            jaxgeom.PMatDiag])
def test_shard_map_per_device_means(task, representation):
    """Each device's build is the mean over its shard; their pmean is the whole mean (for
    KFAC: the factors' means, i.e. the one-device KFAC)."""
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)

    def per_device(p, x, y):
        F = jaxgeom.FIM(task.apply_fn, p, (x, y), representation)
        return jax.tree.map(lambda a: jax.lax.pmean(a, "data"), F)

    build = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=P(), check_vma=False))
    F = build(params, *batch)
    F1 = jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), representation)
    np.testing.assert_allclose(dense(F), dense(F1), rtol=1e-10, atol=1e-12)


def test_shard_map_with_vma_checks_names_the_fix(task):
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)

    def per_device(p, x, y):
        return jaxgeom.FIM(task.apply_fn, p, (x, y), jaxgeom.PMatDiag).get_diag()

    build = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=P("data")))
    with pytest.raises(ValueError, match=r"check_vma=False.*pmean"):
        build(params, *batch)


def test_plans_are_not_shared_across_meshes(task):
    """A build on explicitly sharded data (traced under the mesh's automatic twin) and then
    builds of the same shapes under another mesh context, in a shard_map, and the implicit
    map's replay: each traces its own capture plan."""
    apply_fn = lambda p, x: task.apply_fn(p, x)  # noqa: E731 — a function no test built with
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)
    plain = (task.x, task.y)
    first = jaxgeom.FIM(apply_fn, params, batch, jaxgeom.PMatKFAC)
    with jax.set_mesh(mesh_of(AxisType.Auto)):
        other = jaxgeom.FIM(apply_fn, task.params, plain, jaxgeom.PMatKFAC)

    def per_device(p, x, y):
        F = jaxgeom.FIM(apply_fn, p, (x, y), jaxgeom.PMatKFAC)
        return jax.tree.map(lambda a: jax.lax.pmean(a, "data"), F)

    mapped = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                   out_specs=P(), check_vma=False))(params, *batch)
    implicit = jaxgeom.FIM(apply_fn, params, batch, jaxgeom.PMatImplicit)
    expected = dense(jaxgeom.FIM(task.apply_fn, task.params, plain, jaxgeom.PMatKFAC))
    for F in (first, other, mapped):
        np.testing.assert_allclose(dense(F), expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(
        dense(implicit), dense(jaxgeom.FIM(task.apply_fn, task.params, plain, jaxgeom.PMatDense)),
        rtol=1e-10, atol=1e-12)


def fully_sharded(tree, mesh):
    """``tree``'s leaves split over the data axis on their last dimension (FSDP)."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(
        mesh, P(*(None,) * (a.ndim - 1), "data"))), tree)


@pytest.mark.parametrize("representation", [jaxgeom.PMatKFAC, jaxgeom.PMatDiag,
                                            jaxgeom.PMatDense, jaxgeom.PMatImplicit])
def test_operations_on_fully_sharded_vectors(task, representation):
    """Parameters and vectors sharded like FSDP's: F·v, (F + λI)⁻¹v and vᵀFv equal the
    one-device ones, and the vectors come back sharded as they were given."""
    mesh = mesh_of(AxisType.Explicit)
    params = fully_sharded(task.params, mesh)
    _, batch = sharded(task, mesh)
    F1 = jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), representation)
    F = jaxgeom.FIM(task.apply_fn, params, batch, representation)
    v = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=a.dtype)).reshape(a.shape),
                     task.params)
    v_sharded = fully_sharded(v, mesh)
    for got, want in [(F.mv(v_sharded), F1.mv(v)),
                      (F.solve(v_sharded, regul=0.1), F1.solve(v, regul=0.1)),
                      (F.mv(jaxgeom.PVector(v_sharded)), F1.mv(v)),
                      (jax.jit(lambda M, u: M.mv(u))(F, v_sharded), F1.mv(v))]:
        got = getattr(got, "tree", got)
        np.testing.assert_allclose(host_flat(got), flat(want), rtol=1e-9, atol=1e-12)
        assert jax.tree.map(lambda a: a.sharding.spec, got) == jax.tree.map(
            lambda a: a.sharding.spec, v_sharded)
    np.testing.assert_allclose(F.vTMv(v_sharded), F1.vTMv(v), rtol=1e-10)


def host_flat(tree):
    """A sharded tree's flat vector, gathered leaf by leaf on the host."""
    return np.concatenate([np.ravel(np.asarray(a)) for a in jax.tree.leaves(tree)])


@pytest.mark.parametrize("damping", ["constant", "levenberg_marquardt"])
def test_natural_gradient_step_on_fully_sharded_parameters(task, damping):
    """One jitted K-FAC step on FSDP parameters; Levenberg–Marquardt's ratio takes the
    default loss of outputs split over the class axis and ⟨g, Δ⟩ of split leaves."""
    import optax

    from jaxgeom import optim

    mesh = mesh_of(AxisType.Explicit)

    def loss(p, b):
        return jnp.mean(jax.nn.logsumexp(task.apply_fn(p, b[0]), axis=-1))

    tx = optim.natural_gradient(
        0.1, jaxgeom.PMatKFAC, apply_fn=task.apply_fn,
        damping=optim.LevenbergMarquardt(initial=1e-2) if damping != "constant" else 1e-2)

    @jax.jit
    def step(p, state, batch):
        updates, state = tx.update(jax.grad(loss)(p, batch), state, p, batch=batch)
        return optax.apply_updates(p, updates), state

    params = fully_sharded(task.params, mesh)
    # the batch replicated: the model's own products of a batch and a kernel split over
    # the same axis are not defined under explicit sharding
    batch = jax.device_put((task.x, task.y), NamedSharding(mesh, P()))
    got, state = step(params, tx.init(params), batch)
    want, expected = step(task.params, tx.init(task.params), (task.x, task.y))
    np.testing.assert_allclose(host_flat(got), flat(want), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(state[0].rho, expected[0].rho, rtol=1e-9)


def test_ekfac_moving_average_on_sharded_data(task):
    """EK-FAC's refits between basis refreshes, averaged within one eigenbasis, on a
    sharded batch: the builder hands an argument's arrays (the basis) back as given."""
    import optax

    from jaxgeom import optim

    params, batch = sharded(task, mesh_of(AxisType.Explicit))

    def loss(p, b):
        return jnp.mean(jax.nn.logsumexp(task.apply_fn(p, b[0]), axis=-1))

    def run(p, b):
        tx = optim.natural_gradient(0.1, jaxgeom.PMatEKFAC, apply_fn=task.apply_fn,
                                    example_batch=(task.x, task.y), inverse_period=3, ema=0.8)

        @jax.jit
        def step(p, s):
            u, s = tx.update(jax.grad(loss)(p, b), s, p, batch=b)
            return optax.apply_updates(p, u), s

        s = tx.init(p)
        for _ in range(4):
            p, s = step(p, s)
        return host_flat(p)

    expected = run(task.params, (task.x, task.y))
    np.testing.assert_allclose(run(params, batch), expected, rtol=1e-9, atol=1e-12)
    # FSDP parameters (the batch replicated): the state starts replicated on the mesh, as
    # every step leaves it (a state on one device let the refit's branch hand back a
    # basis that XLA then split)
    mesh = mesh_of(AxisType.Explicit)
    replicated = jax.device_put((task.x, task.y), NamedSharding(mesh, P()))
    np.testing.assert_allclose(run(fully_sharded(task.params, mesh), replicated), expected,
                               rtol=1e-9, atol=1e-12)


def test_builds_traced_with_concrete_arrays_on_a_mesh(task):
    """A jitted build closing over parameters placed on a mesh, and the transform's init
    tracing a sharded example batch: the mesh is entered as an abstract one there."""
    from jaxgeom import optim

    params, batch = sharded(task, mesh_of(AxisType.Explicit))
    F = jax.jit(lambda b: jaxgeom.FIM(task.apply_fn, params, b, jaxgeom.PMatKFAC))(batch)
    expected = jaxgeom.FIM(task.apply_fn, task.params, (task.x, task.y), jaxgeom.PMatKFAC)
    np.testing.assert_allclose(dense(F), dense(expected), rtol=1e-10, atol=1e-12)
    tx = optim.natural_gradient(0.1, jaxgeom.PMatKFAC, apply_fn=task.apply_fn,
                                example_batch=batch, ema=0.9)
    assert type(tx.init(task.params)[0].curvature) is jaxgeom.PMatKFAC


def test_sharded_stacks_of_rows_and_function_space_vectors(task):
    """Rows split over the parameter axis or the example axis (per-example gradients of a
    sharded batch), and (K, N) vectors split over the examples: gathered for the products
    with the replicated matrices."""
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)
    plain = (task.x, task.y)
    d = flat(task.params).size
    rows = jnp.cos(jnp.arange(4 * d, dtype=jnp.float64)).reshape(4, d)
    builds = [(jaxgeom.FIM(task.apply_fn, params, batch, representation),
               jaxgeom.FIM(task.apply_fn, task.params, plain, representation))
              for representation in (jaxgeom.PMatKFAC, jaxgeom.PMatDense, jaxgeom.PMatImplicit)]
    for spec in (P(None, "data"), P("data", None)):
        rows_sharded = jax.device_put(rows, NamedSharding(mesh, spec)) if d % 2 == 0 or \
            spec == P("data", None) else rows
        for F, F1 in builds:
            for op in (lambda M, r: M.solve(r, 0.3), lambda M, r: M.mmap(r),
                       lambda M, r: M.solve(r, 0.3, method="cg")):
                np.testing.assert_allclose(np.asarray(op(F, rows_sharded)), op(F1, rows),
                                           rtol=1e-6, atol=1e-9)
    G1 = jaxgeom.GramMatrix(task.apply_fn, task.params, plain)
    G = jaxgeom.GramMatrix(task.apply_fn, params, batch)
    J1 = jaxgeom.Jacobian(task.apply_fn, task.params, plain, jaxgeom.PFMapImplicit)
    J = jaxgeom.Jacobian(task.apply_fn, params, batch, jaxgeom.PFMapImplicit)
    f1 = jnp.sin(jnp.arange(task.num_outputs * task.x.shape[0], dtype=jnp.float64)).reshape(
        task.num_outputs, -1)
    f = jax.device_put(f1, NamedSharding(mesh, P(None, "data")))
    for got, want in [(G.solve(f, 1e-2), G1.solve(f1, 1e-2)), (G.vTMv(f), G1.vTMv(f1)),
                      (jaxgeom.FVector(f).dot(f), jaxgeom.FVector(f1).dot(f1)),
                      (jaxgeom.FVector(f).norm(), jaxgeom.FVector(f1).norm()),
                      (J.vjp(f).to_flat(), J1.vjp(f1).to_flat())]:
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-8, atol=1e-11)


def test_streams_placed_unlike_their_first_batch(task):
    """A list is looked at whole: a sharded batch after a plain one is read through the
    mesh. A generator is read batch by batch: the build has started without the mesh, and
    the sharded batch is refused with the fix."""
    _, batch = sharded(task, mesh_of(AxisType.Explicit))
    plain = (task.x, task.y)
    expected = dense(jaxgeom.FIM(task.apply_fn, task.params, [plain, plain], jaxgeom.PMatKFAC))
    F = jaxgeom.FIM(task.apply_fn, task.params, [plain, batch], jaxgeom.PMatKFAC)
    np.testing.assert_allclose(dense(F), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="Place every batch alike"):
        jaxgeom.FIM(task.apply_fn, task.params, iter([plain, batch]), jaxgeom.PMatKFAC)


def test_shard_map_monte_carlo_with_a_key_per_device(task):
    """Under shard_map each device numbers its examples from 0: with the key folded with
    the device's index, the pmean is the mean of the shards' builds under those keys."""
    mesh = mesh_of(AxisType.Explicit)
    params, batch = sharded(task, mesh)
    key = jax.random.key(3)

    def per_device(p, x, y):
        device_key = jax.random.fold_in(key, jax.lax.axis_index("data"))
        F = jaxgeom.FIM_MonteCarlo(task.apply_fn, p, (x, y), jaxgeom.PMatDense, key=device_key)
        return jax.tree.map(lambda a: jax.lax.pmean(a, "data"), F)

    F = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                              out_specs=P(), check_vma=False))(params, *batch)
    half = task.x.shape[0] // 2
    shard = [slice(0, half), slice(half, None)]
    shards = [jaxgeom.FIM_MonteCarlo(task.apply_fn, task.params, (task.x[s], task.y[s]),
                                     jaxgeom.PMatDense, key=jax.random.fold_in(key, i))
              for i, s in enumerate(shard)]
    np.testing.assert_allclose(dense(F), (dense(shards[0]) + dense(shards[1])) / 2,
                               rtol=1e-10, atol=1e-12)
    assert not np.allclose(dense(shards[0]), dense(jaxgeom.FIM_MonteCarlo(
        task.apply_fn, task.params, (task.x[shard[0]], task.y[shard[0]]), jaxgeom.PMatDense,
        key=jax.random.fold_in(key, 1))))
