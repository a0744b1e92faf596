"""Arrays larger than the device's memory are refused before anything runs: a
``MemoryError`` naming the array, its size and the fix, at the device's memory and not a
byte below it (the memory is made small here, so that the models stay small)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from models import make_linen_mlp

import jaxgeom._memory as memory
from jaxgeom import (
    FIM,
    CrossGramMatrix,
    GramMatrix,
    Hessian,
    Jacobian,
    PMatBlockDiag,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatEye,
    PMatImplicit,
    PMatKFAC,
    PMatKFOC,
    PMatLowRank,
    PMatQuasiDiag,
)

BUILT = [PMatDense, PMatBlockDiag, PMatDiag, PMatKFAC, PMatEKFAC, PMatKFOC, PMatQuasiDiag,
         PMatLowRank, PMatImplicit]


@pytest.fixture(scope="module")
def task():
    return make_linen_mlp()


def with_memory(monkeypatch, nbytes: int) -> None:
    """Make every device report ``nbytes`` of memory."""
    monkeypatch.setattr(memory, "memory_bytes", lambda device=None: nbytes)


def untraced(task):
    """The model as a function not seen before: a build's storage is checked where its
    steps are traced, and a step traced before (when the memory was not made small) ran
    and is not traced again."""
    return lambda params, x: task.apply_fn(params, x)


def test_a_cpu_device_has_the_hosts_physical_memory():
    cpu = jax.devices("cpu")[0]
    assert memory.memory_bytes(cpu) == os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert memory.memory_bytes(cpu) > 2**28


@pytest.mark.parametrize("representation", BUILT, ids=lambda r: r.__name__)
def test_a_dense_view_larger_than_the_memory_is_refused_before_it_runs(
        task, representation, monkeypatch):
    F = FIM(task.apply_fn, task.params, task.x, representation)
    d = F.size(0)
    dense_bytes = d * d * 8  # float64
    with_memory(monkeypatch, dense_bytes)
    dense = np.asarray(F.to_dense())  # exactly the memory: allowed
    assert dense.shape == (d, d)
    with_memory(monkeypatch, dense_bytes - 1)
    message = (rf"^{representation.__name__}\.to_dense\(\) would be a \({d}, {d}\) float64 "
               rf"array, {dense_bytes / 1024:.1f} KiB, more than the {dense_bytes / 1024:.1f} "
               r"KiB of memory of cpu device 0\. Work with the matrix through its operations .*"
               r"M\.restrict\(layer_ids\)\.to_dense\(\)")
    with pytest.raises(MemoryError, match=message):
        F.to_dense()
    with pytest.raises(MemoryError, match=message):  # the shapes are known to a trace too
        jax.jit(lambda M: M.to_dense())(F)


def test_an_identity_too_large_to_densify_is_refused(task, monkeypatch):
    E = PMatEye(FIM(task.apply_fn, task.params, task.x, PMatDiag).layer_collection, 2.0)
    with_memory(monkeypatch, 8)
    with pytest.raises(MemoryError, match=r"^PMatEye\.to_dense\(\) would be a "):
        E.to_dense()
    np.testing.assert_allclose(E.trace(), 2.0 * E.size(0))  # its operations need no more


def test_a_dense_or_block_diagonal_storage_larger_than_the_memory_is_not_built(
        task, monkeypatch):
    lc = FIM(task.apply_fn, task.params, task.x, PMatDiag).layer_collection
    d = lc.numel()
    blocks = [lc.layer_numel(layer) for layer in lc.layers]
    block_bytes = 8 * sum(n * n for n in blocks)
    assert block_bytes < 8 * d * d
    with_memory(monkeypatch, block_bytes)  # the blocks fit, the dense matrix not
    B = FIM(untraced(task), task.params, task.x, PMatBlockDiag)
    assert [b.shape for b in B.blocks] == [(n, n) for n in blocks]
    fix = r"\. Build a representation of smaller storage: PMatKFAC or PMatEKFAC .*restrict\)"
    with pytest.raises(MemoryError, match=(
            rf"^PMatDense's storage would be a \({d}, {d}\) float64 array, .*{fix}")):
        FIM(untraced(task), task.params, task.x, PMatDense)
    with_memory(monkeypatch, block_bytes - 1)
    with pytest.raises(MemoryError, match=(
            rf"^PMatBlockDiag's storage would be {len(blocks)} arrays of "
            rf"{sum(n * n for n in blocks):,} float64 entries in all, .*{fix}")):
        FIM(untraced(task), task.params, task.x, PMatBlockDiag)
    K = FIM(task.apply_fn, task.params, task.x, PMatKFAC)  # Kronecker factors still fit
    assert K.trace() > 0


def test_kept_jacobian_rows_larger_than_the_memory_are_not_collected(task, monkeypatch):
    """A low-rank matrix keeps the ``(N K, d)`` rows: refused when they cannot fit."""
    L = FIM(task.apply_fn, task.params, task.x, PMatLowRank)
    rows_bytes = L.factor.size * 8
    assert L.factor.shape[0] > 1
    with_memory(monkeypatch, rows_bytes - 1)
    with pytest.raises(MemoryError, match=(
            rf"^The kept Jacobian rows of every example and output would be a "
            rf"\({L.factor.shape[0]}, {L.factor.shape[1]}\) float64 array, .* Keep the rows of "
            r"fewer examples .*a map PFMapImplicit \(no rows kept\)")):
        FIM(untraced(task), task.params, task.x, PMatLowRank)
    with_memory(monkeypatch, rows_bytes)
    np.testing.assert_allclose(FIM(untraced(task), task.params, task.x, PMatLowRank).factor,
                               L.factor)  # exactly the memory: built


@pytest.mark.parametrize("method", ["jacobian", "implicit"])
def test_an_empirical_ntk_larger_than_the_memory_is_refused(task, method, monkeypatch):
    """``(K, N, K, N)`` grows with the square of the examples: refused, eagerly and inside a
    ``jit`` (its pairs of windows scanned), the cross kernel too; at the memory, built."""
    G = GramMatrix(task.apply_fn, task.params, task.x, method=method, batch_size=3)
    k, n = G.data.shape[:2]
    gram_bytes = G.data.size * 8
    with_memory(monkeypatch, gram_bytes - 1)
    message = (rf"^The empirical NTK would be a \({k}, {n}, {k}, {n}\) float64 array, .* "
               r"It grows with the square of the examples: .*PFMapImplicit\): jvp, vjp\)")
    fn = untraced(task)
    with pytest.raises(MemoryError, match=message):
        GramMatrix(fn, task.params, task.x, method=method, batch_size=3)
    with pytest.raises(MemoryError, match=message):
        jax.jit(lambda x: GramMatrix(fn, task.params, x, method=method, batch_size=3).data)(
            task.x)
    with pytest.raises(MemoryError, match=message):
        CrossGramMatrix(fn, task.params, task.x, task.x, method=method, batch_size=3)
    with_memory(monkeypatch, gram_bytes)
    np.testing.assert_allclose(
        GramMatrix(fn, task.params, task.x, method=method, batch_size=3).data, G.data)


def test_a_dense_jacobian_larger_than_the_memory_is_refused(task, monkeypatch):
    J = Jacobian(task.apply_fn, task.params, task.x)
    with_memory(monkeypatch, J.to_dense().size * 8 - 1)
    with pytest.raises(MemoryError, match=(
            rf"^The kept Jacobian rows of every example and output would be a "
            rf"\({', '.join(map(str, J.to_dense().shape))}\) float64 array")):
        Jacobian(untraced(task), task.params, task.x)


def test_a_dense_or_block_diagonal_hessian_larger_than_the_memory_is_refused(task, monkeypatch):
    def loss(params, x):
        return jnp.mean(task.apply_fn(params, x) ** 2)

    H = Hessian(loss, task.params, task.x, PMatBlockDiag)
    d = H.size(0)
    block_entries = sum(b.size for b in H.blocks)
    with_memory(monkeypatch, 8 * block_entries)  # the blocks fit, the dense Hessian not
    for got, want in zip(Hessian(loss, task.params, task.x, PMatBlockDiag).blocks, H.blocks):
        np.testing.assert_allclose(got, want)
    fix = r"\. Build it as a PMatDiag \(d\) or a PMatImplicit .*restrict\)"
    with pytest.raises(MemoryError, match=(
            rf"^The dense Hessian would be a \({d}, {d}\) float64 array, .*{fix}")):
        Hessian(loss, task.params, task.x, PMatDense)
    with_memory(monkeypatch, 8 * block_entries - 1)
    with pytest.raises(MemoryError, match=(
            rf"^The block-diagonal Hessian would be {len(H.blocks)} arrays of "
            rf"{block_entries:,} float64 entries in all, .*{fix}")):
        Hessian(loss, task.params, task.x, PMatBlockDiag)
