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
    """Hessian (stored and implicit), the Jacobian (stored and implicit) and the Gram
    matrix of sharded data."""
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
