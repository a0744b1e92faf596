"""GramMatrix / FMatDense (the empirical NTK) against the explicit ``J Jᵀ``."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree
from models import (
    flat_jacobian,
    make_counted_mlp,
    make_equinox_mlp,
    make_linen_cnn,
    make_linen_embed,
    make_linen_layernorm,
    make_linen_mlp,
    make_linen_tied_embed,
    make_linen_transformer,
)

from jaxgeom import data as data_lib
from jaxgeom.fspace import FMatDense, FVector
from jaxgeom.gram import cross_gram_by_layers, gram_by_layers, gram_norm_sq
from jaxgeom.pfmap import CrossGramMatrix, GramMatrix, Jacobian, PFMapImplicit

TOL = dict(rtol=1e-9, atol=1e-11)
REGUL = 1e-2


def reference(t):
    """``G[o,n,o',n'] = Σ_i J[o,n,i] J[o',n',i]`` from per-example ``jax.jacrev``."""
    jac = np.asarray(flat_jacobian(t.apply_fn, t.params, t.x)).transpose(1, 0, 2)
    return np.einsum("knd,lmd->knlm", jac, jac), jac


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn, make_equinox_mlp])
def test_streamed_and_implicit_routes_equal_jjt(make):
    t = make()
    ref, _ = reference(t)
    k, n = ref.shape[:2]
    for method, batch_size in [("jacobian", 2), ("implicit", 3)]:
        G = GramMatrix(t.apply_fn, t.params, (t.x, t.y), batch_size=batch_size, method=method)
        assert isinstance(G, FMatDense) and G.size() == (k, n, k, n)
        np.testing.assert_allclose(G.to_dense(), ref, **TOL, err_msg=f"{method} {batch_size}")


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_integer_and_boolean_leaves_add_nothing_to_the_gram(mode):
    """Integer and boolean params leaves (read by the model, or not) are constants: both
    routes — ``"implicit"`` by ``vjp``/``jvp`` (float0 tangents in JAX) and ``"jacobian"``
    from the captured factors and rows, beside a float leaf outside any dense layer — give
    the ``J Jᵀ`` of the Jacobian with zero columns for them, as ``PFMapDense`` does."""
    t = make_counted_mlp()
    ref, jac = reference(t)
    dense = Jacobian(t.apply_fn, t.params, (t.x, t.y), mode=mode).to_dense()
    np.testing.assert_allclose(dense, jac, **TOL)
    expected = np.einsum("knd,lmd->knlm", dense, dense)
    np.testing.assert_allclose(expected, ref, **TOL)
    for method, batch_size in [("jacobian", 2), ("implicit", 3)]:
        G = GramMatrix(t.apply_fn, t.params, (t.x, t.y), batch_size=batch_size, method=method,
                       mode=mode)
        np.testing.assert_allclose(G.to_dense(), expected, **TOL, err_msg=method)


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn, make_linen_embed,
                                  make_linen_layernorm, make_linen_transformer,
                                  make_linen_tied_embed])
@pytest.mark.parametrize("keep_bytes", [None, 0])
def test_layer_by_layer_gram_equals_jjt(make, keep_bytes):
    """Dense layers by (A Aᵀ) ∘ (Γ Γᵀ), the other leaves (convolutions, embeddings,
    sequence-shared dense layers, layer norms, a tied embedding) by their rows; with every
    window's captures kept (``None``: they fit) or recomputed for each pair (``0``), over
    windows of 3 examples, the last one overlapping its predecessor."""
    t = make()
    ref, _ = reference(t)
    J = Jacobian(t.apply_fn, t.params, t.x, PFMapImplicit, batch_size=3)
    G = gram_by_layers(J, keep_bytes=keep_bytes)
    np.testing.assert_allclose(G.to_dense(), ref, **TOL)
    # ‖J Jᵀ‖²_F from the blocks of the masked chunks (the last one padded)
    np.testing.assert_allclose(gram_norm_sq(J, keep_bytes), np.sum(ref**2), **TOL)
    np.testing.assert_array_equal(G.to_dense(), G.to_dense().transpose(2, 3, 0, 1))
    # a scaled map: (s J)(s J)ᵀ = s² J Jᵀ
    np.testing.assert_allclose(gram_by_layers(-2.0 * J, keep_bytes).to_dense(), 4 * ref, **TOL)


def _scans_in(jaxpr) -> int:
    return str(jaxpr).count("scan[")


def _primitives(jaxpr) -> list[str]:
    """The top-level operations of a program, whatever its shapes."""
    return [e.primitive.name for e in jaxpr.eqns]


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn, make_linen_embed])
@pytest.mark.parametrize("keep_bytes", [None, 0, 10**9])
def test_gram_inside_jit_scans_the_pairs_of_windows(make, keep_bytes):
    """Inside a ``jit`` the pairs of windows are one ``lax.scan`` per pair of batches: ``J
    Jᵀ`` as eagerly (dense layers by their captures, convolutions and an embedding table
    of integer inputs by their rows), exactly symmetric, from one batch (windows of 2, the
    last overlapping its predecessor) and a list of two (windows of 2, and one of the
    single example of the second), the factors kept (``None``: they fit; ``10**9``) or
    recomputed for each pair (``0``); the program is the same for 4× the examples
    (unrolled, one copy of the block's program per pair, it grew with their number).
    ``‖J Jᵀ‖²_F``'s pairs (at most 4 chunks here) stay unrolled."""
    t = make()
    ref, _ = reference(t)

    def gram(params, x):
        J = Jacobian(t.apply_fn, params, x, PFMapImplicit, batch_size=2)
        return gram_by_layers(J, keep_bytes).data

    def norm_sq(params, x):
        J = Jacobian(t.apply_fn, params, x, PFMapImplicit, batch_size=2)
        return gram_norm_sq(J, keep_bytes)

    n = t.x.shape[0]
    for data in (t.x, [t.x[:n - 1], t.x[n - 1:]]):
        G = jax.jit(gram)(t.params, data)
        np.testing.assert_allclose(G, ref, **TOL)
        np.testing.assert_array_equal(G, G.transpose(2, 3, 0, 1))
        np.testing.assert_allclose(jax.jit(norm_sq)(t.params, data), np.sum(ref**2), **TOL)
    if keep_bytes is None:  # whether the factors fit depends on N
        return
    more = jnp.concatenate([t.x] * 4)
    programs = [jax.make_jaxpr(gram)(t.params, x) for x in (t.x, more)]
    assert _scans_in(programs[0]) >= 2 and _primitives(programs[0]) == _primitives(programs[1])


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn, make_linen_embed])
@pytest.mark.parametrize("keep_bytes", [10**9, 0])
@pytest.mark.parametrize("unrolled_pairs", [36, 3])
def test_norm_of_many_chunks_sums_blocks_of_groups(make, keep_bytes, unrolled_pairs,
                                                   monkeypatch):
    """More chunks than ``NORM_GROUPS`` (19 examples, chunks of one): ``‖J Jᵀ‖²_F`` from
    the blocks of 7 groups of 3 consecutive chunks (the factors kept, ``10**9``; the last
    group completed by zero factors: eagerly, every block of one shape) or of the chunks
    (none kept, ``0``), eagerly and
    inside a ``jit`` — there the pairs unrolled up to ``UNROLLED_PAIRS`` (36: the 28 pairs
    of groups) and one ``lax.scan`` beyond (3: the pairs of groups, or of chunks), whose
    program is then the same for twice the examples."""
    from jaxgeom import gram as gram_lib

    monkeypatch.setattr(gram_lib, "UNROLLED_PAIRS", unrolled_pairs)
    t = make(n=19)
    ref, _ = reference(t)

    def norm_sq(params, x):
        J = Jacobian(t.apply_fn, params, x, PFMapImplicit, batch_size=1)
        return gram_norm_sq(J, keep_bytes)

    shapes, block = set(), gram_lib._block_norm_sq

    def recorded(left, right):
        shapes.add(tuple(x.shape for x in jax.tree_util.tree_leaves((left, right))))
        return block(left, right)

    monkeypatch.setattr(gram_lib, "_block_norm_sq", recorded)
    np.testing.assert_allclose(norm_sq(t.params, t.x), np.sum(ref**2), **TOL)
    assert len(shapes) == 1  # eagerly, the groups (or chunks) of one shape: one compilation
    np.testing.assert_allclose(jax.jit(norm_sq)(t.params, t.x), np.sum(ref**2), **TOL)
    programs = [jax.make_jaxpr(norm_sq)(t.params, x) for x in (t.x, jnp.concatenate([t.x] * 2))]
    if unrolled_pairs == 3 or not keep_bytes:
        assert _primitives(programs[0]) == _primitives(programs[1])
    else:  # the 28 pairs of 7 groups unrolled, then of 8 groups (of 5 chunks): 36
        assert len(programs[0].eqns) < len(programs[1].eqns)


def test_norm_groups_are_as_large_as_one_chunks_jacobian_allows():
    """``_group_size``: enough chunks for ``NORM_GROUPS`` groups to cover them, fewer when a
    block between two groups, ``(K · size · n)²`` entries, would take more than
    ``keep_bytes`` (default: one chunk's Jacobian, ``n K d``), at least one."""
    from jaxgeom import gram as gram_lib

    t = make_linen_mlp()
    J = Jacobian(t.apply_fn, t.params, t.x, PFMapImplicit, batch_size=2)
    k, d = t.num_outputs, J.layer_collection.numel()
    factor = gram_lib.GramFactor((), (), jnp.zeros((k, 2, d)))  # chunks of n = 2
    block = (2 * k) ** 2 * 8  # the bytes of a block between two chunks
    assert gram_lib._group_size(80, factor, J, None) == min(10, int((2 * k * d) ** 0.5) // (2 * k))
    assert gram_lib._group_size(80, factor, J, 9 * block) == 3
    assert gram_lib._group_size(80, factor, J, 9 * block - 1) == 2
    assert gram_lib._group_size(80, factor, J, 0) == 1
    assert gram_lib._group_size(12, factor, J, 10**9) == 2


def test_implicit_gram_inside_jit_scans_the_windows():
    """``method="implicit"`` inside a ``jit``: the rows of each window of the left data
    (real examples, the last window overlapping its predecessor) one ``lax.scan``, the
    products over the right data scanned inside; ``J Jᵀ`` and a cross kernel as from the
    per-example Jacobians, for one batch and a list of two, the program the same for 4×
    the examples."""
    t = make_linen_cnn()
    ref, _ = reference(t)
    x = other_inputs(t, 3)
    cross_ref, _, _ = cross_reference(t, x, t.x)

    def kernels(params, data):
        G = GramMatrix(t.apply_fn, params, data, batch_size=2, method="implicit")
        K = CrossGramMatrix(t.apply_fn, params, x, data, batch_size=2, method="implicit")
        return G.data, K

    n = t.x.shape[0]
    for data in (t.x, [t.x[:n - 1], t.x[n - 1:]]):
        G, K = jax.jit(kernels)(t.params, data)
        np.testing.assert_allclose(G, ref, **TOL)
        np.testing.assert_allclose(K, cross_ref, **TOL)
    programs = [jax.make_jaxpr(kernels)(t.params, d) for d in (t.x, jnp.concatenate([t.x] * 4))]
    assert _scans_in(programs[0]) >= 2 and _primitives(programs[0]) == _primitives(programs[1])


def test_mirrored_blocks_are_copied_tile_by_tile(monkeypatch):
    """Each block's transpose is copied in tiles (``jaxgeom.gram.TILE_BYTES``), the last
    ones overlapping their predecessors: tiles of 3 × 3 examples over blocks of windows of
    5 (eagerly and inside a ``jit``) give ``J Jᵀ``, each block's mirror its transpose
    exactly (a diagonal block, the product of a window with itself, is as symmetric as the
    product makes it: to the last bit for windows of 2, not of 5)."""
    from jaxgeom import gram as gram_lib

    t = make_linen_mlp(n=11)
    ref, _ = reference(t)
    k, itemsize = t.num_outputs, np.dtype(t.x.dtype).itemsize
    monkeypatch.setattr(gram_lib, "TILE_BYTES", 9 * k * k * itemsize)
    corners, tile = gram_lib._tiles(5, 5, k, itemsize)
    assert tile == (3, 3) and corners.tolist() == [[0, 0], [0, 2], [2, 0], [2, 2]]
    jax.clear_caches()  # the block writes compiled with other tiles
    try:
        eager = GramMatrix(t.apply_fn, t.params, t.x, batch_size=5).data
        jitted = jax.jit(lambda p: GramMatrix(t.apply_fn, p, t.x, batch_size=5).data)(
            t.params)
    finally:
        jax.clear_caches()
    for G in (eager, jitted):  # windows 0-4, 5-9, 6-10: the first one's blocks mirrored
        np.testing.assert_allclose(G, ref, **TOL)
        np.testing.assert_array_equal(G[:, 5:, :, :5], G[:, :5, :, 5:].transpose(2, 3, 0, 1))


def test_gram_inside_jit_differentiates_and_maps_over_parameters():
    """The scanned pairs under ``grad`` and ``vmap`` inside a ``jit``: the gradient of
    ``‖J Jᵀ‖²_F`` and an ensemble's Grams, as of the unchunked ones eagerly."""
    t = make_linen_mlp()

    def norm_sq(params, batch_size=None):
        return jnp.sum(GramMatrix(t.apply_fn, params, t.x, batch_size=batch_size).data ** 2)

    got = jax.jit(jax.grad(lambda p: norm_sq(p, 2)))(t.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, **TOL), got,
                 jax.grad(norm_sq)(t.params))
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), t.params)
    grams = jax.jit(jax.vmap(lambda p: GramMatrix(t.apply_fn, p, t.x, batch_size=2).data))(
        stacked)
    for i in range(2):
        member = jax.tree.map(lambda a, i=i: a[i], stacked)
        np.testing.assert_allclose(grams[i], GramMatrix(t.apply_fn, member, t.x).data, **TOL)


@pytest.mark.parametrize("method", ["jacobian", "implicit"])
def test_centred_gram_is_that_of_the_centred_jacobian(method):
    """``centering=True``: ``J_c J_cᵀ`` with ``J_c[o, n] = J[o, n] − mean_m J[o, m]``."""
    t = make_linen_cnn()
    _, jac = reference(t)
    centred = jac - jac.mean(axis=1, keepdims=True)
    ref = np.einsum("knd,lmd->knlm", centred, centred)
    G = GramMatrix(t.apply_fn, t.params, t.x, batch_size=2, method=method, centering=True)
    np.testing.assert_allclose(G.to_dense(), ref, **TOL)
    # every row and column of each output block sums to zero
    np.testing.assert_allclose(G.to_dense().sum(axis=1), 0, atol=1e-10)


def test_forward_mode_gram_from_rows():
    t = make_linen_mlp()
    ref, _ = reference(t)
    G = GramMatrix(t.apply_fn, t.params, t.x, batch_size=3, mode="forward")
    np.testing.assert_allclose(G.to_dense(), ref, **TOL)
    J = Jacobian(t.apply_fn, t.params, t.x, PFMapImplicit, batch_size=3, mode="forward")
    np.testing.assert_allclose(gram_norm_sq(J), np.sum(ref**2), **TOL)


def test_windows_cover_every_example_with_real_ones():
    x = np.arange(12.0).reshape(6, 2)
    batches = [x[:5], x[5:5], x[5:]]  # 5, an empty batch, 1
    windows = list(data_lib.iter_windows(batches, batch_size=2))
    assert [(w.offset, w.size) for w in windows] == [(0, 2), (2, 2), (3, 2), (5, 1)]
    for w in windows:
        np.testing.assert_array_equal(w.batch, x[w.offset:w.offset + w.size])
    whole = list(data_lib.iter_windows(x))
    assert len(whole) == 1 and whole[0].size == 6
    with pytest.raises(ValueError, match="no example"):
        list(data_lib.iter_windows([x[:0]], batch_size=2))
    with pytest.raises(ValueError, match="batch_size"):
        list(data_lib.iter_windows(x, batch_size=0))


def test_batches_and_generic_function():
    t = make_linen_mlp()
    ref, _ = reference(t)
    batches = [(t.x[:2], t.y[:2]), (t.x[2:], t.y[2:])]
    G = GramMatrix(t.apply_fn, t.params, iter(batches), batch_size=3)
    np.testing.assert_allclose(G.to_dense(), ref, **TOL)
    # the output trace (neural-tangents' default trace_axes=(-1,)) through `function`
    summed = GramMatrix(None, t.params, batches,
                        function=lambda p, b: t.apply_fn(p, b[0]).sum(-1, keepdims=True))
    np.testing.assert_allclose(summed.to_dense()[0, :, 0], ref.sum(axis=(0, 2)), **TOL)


@jax.jit
def _operations(G, f):
    evals, evecs = G.eigh()
    return dict(
        mv=G.mv(f), mv_array=G.mv(f.data), matmul=G @ f, vTMv=G.vTMv(f), trace=G.trace(),
        fro=G.frobenius_norm(), norm=G.norm(), norm_fro=G.norm("fro"), norm2=G.norm(2),
        norm_2=G.norm(-2), eigvalsh=G.eigvalsh(), evals=evals, evecs=evecs,
        matrix=G.to_matrix(), diag=G.get_diag(),
        solves={m: G.solve(G.mv(f) + REGUL * f, REGUL, method=m) for m in G.SOLVE_METHODS},
        sum=(G + G).to_dense(), difference=(G - 2 * G).to_dense(), scaled=(G * 1.5).data,
        divided=(G / 4).data, negated=(-G).data,
    )


def test_operations_against_the_matrix():
    t = make_linen_mlp()
    ref, jac = reference(t)
    G = GramMatrix(t.apply_fn, t.params, t.x, batch_size=4)
    k, n = ref.shape[:2]
    m = ref.reshape(k * n, k * n)
    f = FVector(np.random.default_rng(0).standard_normal((k, n)))
    out = _operations(G, f)
    gf = (m @ f.data.ravel()).reshape(k, n)
    assert isinstance(out["mv"], FVector) and isinstance(out["mv_array"], jax.Array)
    for key in ("mv", "matmul"):
        np.testing.assert_allclose(out[key].data, gf, **TOL)
    np.testing.assert_allclose(out["mv_array"], gf, **TOL)
    # vTMv(f) = ‖Jᵀ f‖²
    np.testing.assert_allclose(out["vTMv"], np.sum(np.einsum("knd,kn->d", jac, f.data) ** 2),
                               **TOL)
    np.testing.assert_allclose(out["trace"], np.trace(m), **TOL)
    for key in ("fro", "norm", "norm_fro"):
        np.testing.assert_allclose(out[key], np.linalg.norm(m), **TOL)
    eig = np.linalg.eigvalsh(m)
    np.testing.assert_allclose(out["eigvalsh"], eig, atol=1e-10)
    np.testing.assert_allclose(out["norm2"], np.abs(eig).max(), **TOL)
    np.testing.assert_allclose(out["norm_2"], np.abs(eig).min(), atol=1e-10)
    # the eigendecomposition reconstructs the (K·N) × (K·N) matrix
    v, evals = np.asarray(out["evecs"]), np.asarray(out["evals"])
    np.testing.assert_allclose((v * evals) @ v.T, m, atol=1e-10)
    np.testing.assert_allclose(out["matrix"], m, **TOL)
    np.testing.assert_allclose(out["diag"].data, np.diag(m).reshape(k, n), **TOL)
    for method, x in out["solves"].items():
        assert isinstance(x, FVector), method
        np.testing.assert_allclose(x.data, f.data, rtol=1e-6, atol=1e-8, err_msg=method)
    np.testing.assert_allclose(out["sum"], 2 * ref, **TOL)
    np.testing.assert_allclose(out["difference"], -ref, **TOL)
    for key, factor in [("scaled", 1.5), ("divided", 0.25), ("negated", -1)]:
        np.testing.assert_allclose(out[key], factor * ref, **TOL)
    with pytest.raises(ValueError, match="ord"):
        G.norm(3)
    with pytest.raises(ValueError, match="valid methods"):
        G.solve(f, method="qr")
    with pytest.raises(ValueError, match="function-space vector"):
        G.mv(np.ones((k, n + 1)))


def test_kernel_regression_interpolates():
    """With a tiny ridge, NTK regression on the training examples reproduces the targets
    (``N K ≤ d``: the Gram matrix is invertible)."""
    t = make_linen_mlp(n=5)
    G = GramMatrix(t.apply_fn, t.params, t.x)
    targets = np.asarray(jax.nn.one_hot(t.y, t.num_outputs)).T  # (K, N)
    alpha = G.solve(targets, 1e-10)
    np.testing.assert_allclose(G.mv(alpha), targets, atol=1e-6)
    np.testing.assert_allclose(G.solve(targets, 1e-10, method="eigh"), alpha, rtol=1e-4,
                               atol=1e-6)


def test_under_jit_and_errors():
    t = make_linen_mlp()
    ref, _ = reference(t)
    G = jax.jit(lambda p, x: GramMatrix(t.apply_fn, p, x, batch_size=4))(t.params, t.x)
    np.testing.assert_allclose(G.to_dense(), ref, **TOL)
    with pytest.raises(ValueError, match="valid methods"):
        GramMatrix(t.apply_fn, t.params, t.x, method="svd")
    with pytest.raises(TypeError, match="FMatDense"):
        GramMatrix(t.apply_fn, t.params, t.x, representation=FVector)
    with pytest.raises(ValueError, match=r"\(K, N, K, N\)"):
        FMatDense(jnp.zeros((2, 3, 3, 2)))


@pytest.mark.parametrize("method", ["jacobian", "implicit"])
def test_a_non_finite_input_is_named(method):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(keys[0], (6, 3)).at[4, 1].set(jnp.nan)
    params = {"W": jax.random.normal(keys[1], (3, 4)), "b": jax.random.normal(keys[2], (4,))}
    # "jacobian" names the example, "implicit" the examples its chunk's products reached
    named = r"examples \[4\]" if method == "jacobian" else r"examples \[0, 1, 2, 3, 4, 5\]"
    with pytest.raises(FloatingPointError, match=named):
        GramMatrix(lambda p, x: jnp.tanh(x @ p["W"] + p["b"]), params, x, method=method)


@pytest.mark.filterwarnings("error")
def test_an_ensemble_of_grams_under_vmap_neither_warns_nor_differs():
    """The Gram's in-place block writes donate their buffer at the top level only (under
    vmap the buffers are the trace's: JAX warned that they were not usable)."""
    t = make_linen_mlp()
    stacked = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), t.params)
    G = jax.vmap(lambda p: GramMatrix(t.apply_fn, p, (t.x, t.y)).data)(stacked)
    for i in range(2):
        member = jax.tree.map(lambda a, i=i: a[i], stacked)
        np.testing.assert_allclose(G[i], GramMatrix(t.apply_fn, member, (t.x, t.y)).data,
                                   rtol=1e-10, atol=1e-12)


def test_finiteness_check_of_the_gram_matrix_reads_its_diagonal_in_place():
    """The per-example check on ``G[o,n,o,n]`` compiles to no temporary the size of ``G``
    (an einsum ``"knkn->kn"`` took more than ``G``: a Gram build peaked at 3× ``G``)."""
    from jaxgeom.pfmap import _finite_examples

    gram = jnp.arange(3 * 40 * 3 * 40, dtype=jnp.float64).reshape(3, 40, 3, 40)
    gram = gram.at[1, 7, 1, 7].set(jnp.nan)
    np.testing.assert_array_equal(_finite_examples(gram), np.arange(40) != 7)
    compiled = jax.jit(_finite_examples).lower(gram).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < gram.nbytes / 10


def test_errors_name_the_problem_and_the_fix():
    """A function returning (outputs, aux) is named (it had been "'tuple' object has no
    attribute 'shape'"); FMatDense's damping error gives a function-space fix; centering
    is a bool."""
    t = make_linen_mlp(n=3)
    with_aux = lambda p, x: (t.apply_fn(p, x), {"batch_stats": 0.0})  # noqa: E731
    for build in (Jacobian, GramMatrix):
        with pytest.raises(ValueError, match=r"apply_fn must return one array of outputs.*"
                           r"f\(p, x\)\[0\]"):
            build(with_aux, t.params, t.x)
    with pytest.raises(TypeError, match="centering must be True or False; got 'yes'"):
        GramMatrix(t.apply_fn, t.params, t.x, centering="yes")
    G = FMatDense(jnp.eye(6).reshape(2, 3, 2, 3))
    with pytest.raises(ValueError, match=r"regul must be a scalar.*FMatDense\(G.data \+ "
                       r"jnp.diag\(d.ravel\(\)\)") as error:
        G.solve(jnp.ones((2, 3)), jnp.ones((2, 3)))
    assert "PMatDiag" not in str(error.value)


def test_a_cholesky_solve_of_a_singular_gram_names_the_fixes():
    """K·N = 80 > d = 52: the NTK is singular and its default (Cholesky) solve answered NaN
    silently; eagerly it is a ValueError naming regul and lstsq, which solve it against
    numpy (traced, the answer stays NaN)."""
    t = make_linen_mlp(n=20)
    G = GramMatrix(t.apply_fn, t.params, t.x)
    m = np.asarray(G.to_matrix())
    assert np.linalg.matrix_rank(m) < m.shape[0]
    f = np.random.default_rng(0).standard_normal((t.num_outputs, 20))
    with pytest.raises(ValueError, match=r"not positive definite.*regul > 0.*lstsq"):
        G.solve(f)
    assert np.isnan(jax.jit(lambda G, f: G.solve(f))(G, f)).all()
    np.testing.assert_allclose(G.solve(f, REGUL).ravel(),
                               np.linalg.solve(m + REGUL * np.eye(len(m)), f.ravel()),
                               rtol=1e-7, atol=1e-9)
    x = G.solve(f, method="lstsq")
    np.testing.assert_allclose(m @ np.ravel(x), m @ np.linalg.lstsq(m, f.ravel())[0],
                               rtol=1e-6, atol=1e-8)
    # by eigenvalues: divided by round-off zeros, the answer is round-off: a warning
    with pytest.warns(RuntimeWarning, match=r"solve of a matrix singular to working precision"):
        G.solve(f, method="eigh")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(G.solve(f, REGUL, method="eigh").ravel(),
                                   np.linalg.solve(m + REGUL * np.eye(len(m)), f.ravel()),
                                   rtol=1e-7, atol=1e-9)


def test_function_space_vectors_products_and_their_checks():
    """``f @ g`` with an FVector or a (K, N) array on either side is ``Σ f g``; a complex
    vector is refused by name, as in parameter space."""
    f = FVector(jnp.arange(6.0).reshape(2, 3))
    g = np.linspace(-1.0, 1.0, 6).reshape(2, 3)
    want = float(np.sum(np.arange(6.0) * g.ravel()))
    for got in (f @ g, f @ jnp.asarray(g), g @ f, jnp.asarray(g) @ f, f @ FVector(g)):
        np.testing.assert_allclose(got, want, rtol=1e-14)
    G = FMatDense(jnp.eye(6).reshape(2, 3, 2, 3))
    for op in (f.dot, G.mv, G.vTMv, G.solve):
        with pytest.raises(TypeError, match="complex function-space vector"):
            op(jnp.asarray(g) * 1j)


def test_a_second_data_set_points_to_the_cross_kernel():
    """``GramMatrix(f, params, x, z)`` (a test × train kernel) was "representation must be
    FMatDense; got Array([...])", the array printed in full; it names CrossGramMatrix, whose
    numbers are the cross block of the Gram of both sets."""
    t = make_linen_mlp()
    x, z = t.x[:3], t.x[3:]
    with pytest.raises(TypeError, match=r"one data set.*CrossGramMatrix\(apply_fn, params, x, "
                       r"z\)"):
        GramMatrix(t.apply_fn, t.params, x, z)
    ref, _ = reference(t)
    np.testing.assert_allclose(CrossGramMatrix(t.apply_fn, t.params, x, z),
                               ref[:, :3, :, 3:], **TOL)


# ----------------------------------------------------------------------------- cross kernel
def other_inputs(t, m):
    """``m`` inputs of ``t``'s shape, not ``t.x``'s (the left, "test", set)."""
    return jax.random.normal(jax.random.PRNGKey(11), (m, *t.x.shape[1:]), t.x.dtype)


def cross_reference(t, x_left, x_right):
    """``K[o,m,o',n] = Σ_i J_left[o,m,i] J_right[o',n,i]`` from per-example ``jax.jacrev``."""
    left = np.asarray(flat_jacobian(t.apply_fn, t.params, x_left)).transpose(1, 0, 2)
    right = np.asarray(flat_jacobian(t.apply_fn, t.params, x_right)).transpose(1, 0, 2)
    return np.einsum("omi,pni->ompn", left, right), left, right


@pytest.mark.parametrize("make, m", [(make_linen_mlp, 4), (make_linen_cnn, 3)])
@pytest.mark.parametrize("method", ["jacobian", "implicit"])
def test_cross_kernel_equals_jx_jzt(make, m, method):
    """``(K, M, K, N)`` against the brute-force ``J_x J_zᵀ``, over windows of 2 and 3
    examples (dividing neither N = 7 / 5 nor M = 4 / 3: the last windows overlap) and one
    window per batch; both orders of the sets (the layer-by-layer loop holds the side with
    fewer windows: the right one when the sets are swapped); the data as lists of batches
    with labels."""
    t = make()
    x = other_inputs(t, m)
    ref, _, _ = cross_reference(t, x, t.x)
    k, n = t.num_outputs, t.x.shape[0]
    for batch_size in (None, 2, 3):
        K = CrossGramMatrix(t.apply_fn, t.params, x, t.x, batch_size=batch_size, method=method)
        assert isinstance(K, jax.Array) and K.shape == (k, m, k, n)
        np.testing.assert_allclose(K, ref, **TOL, err_msg=f"{batch_size}")
        swapped = CrossGramMatrix(t.apply_fn, t.params, t.x, x, batch_size=batch_size,
                                  method=method)
        np.testing.assert_allclose(swapped, ref.transpose(2, 3, 0, 1), **TOL,
                                   err_msg=f"swapped {batch_size}")
    batches = [(t.x[:2], t.y[:2]), (t.x[2:], t.y[2:])]
    K = CrossGramMatrix(t.apply_fn, t.params, [x[:1], x[1:]], iter(batches), batch_size=2,
                        method=method)
    np.testing.assert_allclose(K, ref, **TOL)


@pytest.mark.parametrize("keep", ["both", "neither", "left", "right"])
def test_cross_kernel_by_layers_kept_or_recomputed(keep):
    """Every window's captures kept, recomputed for each pair, or kept on one side only (the
    loop then holds the other side's windows), on a model with dense layers and a layer
    norm (rows); a scaled pair of maps gives ``s t K``."""
    from jaxgeom.gram import _Factors

    t = make_linen_layernorm()
    x = other_inputs(t, 3)
    ref, _, _ = cross_reference(t, x, t.x)  # M = 3, N = 6
    left = Jacobian(t.apply_fn, t.params, x, PFMapImplicit, batch_size=2)
    right = Jacobian(t.apply_fn, t.params, t.x, PFMapImplicit, batch_size=4,
                     layer_collection=left.layer_collection)
    # a side is kept when (its factors' bytes per example) · (its examples) ≤ keep_bytes
    factors = _Factors(left, list(data_lib.iter_windows(left.data, 2)), None)
    per_example = sum(a.nbytes for a in jax.tree_util.tree_leaves(factors[0])) // 2
    keep_bytes = {"both": None, "neither": 0}.get(keep, 3 * per_example)  # 3 kept, 6 not
    if keep == "right":  # the sets swapped: the kept one on the right
        left, right, ref = right, left, ref.transpose(2, 3, 0, 1)
    flags = [_Factors(J, list(data_lib.iter_windows(J.data, J.batch_size)),
                      keep_bytes).kept_all() for J in (left, right)]
    assert flags == {"both": [True, True], "neither": [False, False], "left": [True, False],
                     "right": [False, True]}[keep]
    np.testing.assert_allclose(cross_gram_by_layers(left, right, keep_bytes), ref, **TOL)
    np.testing.assert_allclose(cross_gram_by_layers(right, left, keep_bytes),
                               ref.transpose(2, 3, 0, 1), **TOL)
    np.testing.assert_allclose(cross_gram_by_layers(-2.0 * left, 0.5 * right, keep_bytes),
                               -ref, **TOL)
    # inside a jit the same pairs, one lax.scan (the same side held)
    cross = jax.jit(lambda a, b: cross_gram_by_layers(a, b, keep_bytes))
    np.testing.assert_allclose(cross(left, right), ref, **TOL)
    np.testing.assert_allclose(cross(-2.0 * right, 0.5 * left), -ref.transpose(2, 3, 0, 1),
                               **TOL)
    assert _scans_in(jax.make_jaxpr(cross)(left, right)) >= 1


@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn])
def test_cross_kernel_of_a_set_with_itself_is_its_gram(make):
    """``CrossGramMatrix(f, θ, x, x) == GramMatrix(f, θ, x).data``, centred or not, by both
    methods (the cross loop computes both triangles, the square one mirrors one)."""
    t = make()
    for method, batch_size, centering in [("jacobian", 2, False), ("implicit", 3, False),
                                          ("jacobian", 3, True), ("implicit", 2, True)]:
        G = GramMatrix(t.apply_fn, t.params, t.x, batch_size=batch_size, method=method,
                       centering=centering)
        K = CrossGramMatrix(t.apply_fn, t.params, t.x, t.x, batch_size=batch_size,
                            method=method, centering=centering)
        np.testing.assert_allclose(K, G.data, **TOL, err_msg=f"{method} {centering}")


@pytest.mark.parametrize("method", ["jacobian", "implicit"])
def test_centred_cross_kernel_is_that_of_the_centred_jacobians(method):
    """``centering=True``: each Jacobian centred over its own set, ``C_M K C_N``."""
    t = make_linen_cnn()
    x = other_inputs(t, 4)
    _, left, right = cross_reference(t, x, t.x)
    left, right = left - left.mean(axis=1, keepdims=True), right - right.mean(axis=1,
                                                                             keepdims=True)
    K = CrossGramMatrix(t.apply_fn, t.params, x, t.x, batch_size=3, method=method,
                        centering=True)
    np.testing.assert_allclose(K, np.einsum("omi,pni->ompn", left, right), **TOL)


def test_ntk_kernel_regression_prediction():
    """NTK (ridge) regression: the mean at new inputs ``K(X*, X) (K(X, X) + λI)⁻¹ y`` from
    ``CrossGramMatrix`` and ``GramMatrix.solve`` against brute-force Jacobians; with ``λ →
    0`` and ``N K ≤ d`` it is the linearised model's least-norm fit, ``J* Jᵀ (J Jᵀ)⁻¹ y``,
    whose prediction at the training inputs reproduces ``y``."""
    t = make_linen_mlp(n=5)
    x_test = other_inputs(t, 6)
    _, jx, jz = cross_reference(t, x_test, t.x)
    k, n = t.num_outputs, t.x.shape[0]
    y = np.asarray(jax.nn.one_hot(t.y, k)).T  # (K, N)
    G = GramMatrix(t.apply_fn, t.params, t.x, batch_size=2)
    for method in ("jacobian", "implicit"):
        K = CrossGramMatrix(t.apply_fn, t.params, x_test, t.x, batch_size=4, method=method)
        for regul in (1e-2, 1e-10):
            mean = jnp.einsum("ompn,pn->om", K, G.solve(y, regul))
            jz_m, jx_m = jz.reshape(k * n, -1), jx.reshape(k * 6, -1)
            ref = jx_m @ jz_m.T @ np.linalg.solve(jz_m @ jz_m.T + regul * np.eye(k * n),
                                                  y.ravel())
            np.testing.assert_allclose(mean.ravel(), ref, rtol=1e-6, atol=1e-8,
                                       err_msg=f"{method} {regul}")
    train = CrossGramMatrix(t.apply_fn, t.params, t.x, t.x)
    np.testing.assert_allclose(jnp.einsum("ompn,pn->om", train, G.solve(y, 1e-10)), y,
                               atol=1e-6)


def test_cross_kernel_under_jit_function_and_errors():
    t = make_linen_mlp()
    x = other_inputs(t, 3)
    ref, _, _ = cross_reference(t, x, t.x)
    K = jax.jit(lambda p, a, b: CrossGramMatrix(t.apply_fn, p, a, b, batch_size=2))(
        t.params, x, t.x)
    np.testing.assert_allclose(K, ref, **TOL)
    # the output trace through `function`, which receives the batches, labels included
    summed = CrossGramMatrix(None, t.params, (x, t.y[:3]), (t.x, t.y),
                             function=lambda p, b: t.apply_fn(p, b[0]).sum(-1, keepdims=True))
    np.testing.assert_allclose(summed[0, :, 0], ref.sum(axis=(0, 2)), **TOL)
    with pytest.raises(ValueError, match="valid methods"):
        CrossGramMatrix(t.apply_fn, t.params, x, t.x, method="svd")
    with pytest.raises(TypeError, match="centering must be True or False"):
        CrossGramMatrix(t.apply_fn, t.params, x, t.x, centering=1)
    # outputs of another width on each set
    per_input = lambda p, v: (v[..., None] * p["w"]).reshape(v.shape[0], -1)  # noqa: E731
    params = {"w": jnp.arange(1.0, 3.0)}
    for method in ("jacobian", "implicit"):
        with pytest.raises(ValueError, match="4 and 6 outputs per example"):
            CrossGramMatrix(per_input, params, jnp.ones((2, 2)), jnp.ones((3, 3)),
                            method=method)


def _pooled_sequence_model():
    """A dense layer over the positions of a sequence, mean-pooled, then a read-out: one
    position (``T = 1``) or several, the same parameters."""
    rng = np.random.default_rng(0)
    params = {"l1": {"kernel": jnp.asarray(rng.normal(size=(2, 2))),
                     "bias": jnp.asarray(rng.normal(size=2))},
              "l2": {"kernel": jnp.asarray(rng.normal(size=(2, 2))),
                     "bias": jnp.asarray(rng.normal(size=2))}}

    def apply_fn(p, x):  # (N, T, 2) -> (N, 2)
        h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"]).mean(1)
        return h @ p["l2"]["kernel"] + p["l2"]["bias"]

    return apply_fn, params, rng


def test_cross_kernel_between_sequences_of_one_and_of_several_positions():
    """A dense layer that sees one position in one set (its input Gram) and three in the
    other (its gradient rows): both sides' factors are rows, which pair up. The layer-wise
    factors had been paired across layers (K = F = H = 2: shapes that fit), off by 7 in
    entries of 6, or crashed in the other order."""
    apply_fn, params, rng = _pooled_sequence_model()
    one, three = (jnp.asarray(rng.normal(size=(n, t, 2))) for n, t in ((4, 1), (5, 3)))

    def jacobian(x):
        return np.asarray(flat_jacobian(apply_fn, params, x)).transpose(1, 0, 2)

    want = np.einsum("knd,lmd->knlm", jacobian(one), jacobian(three))
    for method in ("jacobian", "implicit"):
        np.testing.assert_allclose(CrossGramMatrix(apply_fn, params, one, three,
                                                   method=method), want, **TOL)
        np.testing.assert_allclose(CrossGramMatrix(apply_fn, params, three, one,
                                                   method=method),
                                   want.transpose(2, 3, 0, 1), **TOL)
    jitted = jax.jit(lambda p, a, b: CrossGramMatrix(apply_fn, p, a, b, batch_size=2))
    np.testing.assert_allclose(jitted(params, one, three), want, **TOL)


def test_a_gram_of_batches_of_other_example_shapes():
    """The layer-by-layer Gram captures every window with one example's plan: batches of
    other example shapes are refused by name (a broadcasting error inside the capture
    before); the implicit method and forward mode (each chunk's Jacobian rows) take them."""
    apply_fn, params, rng = _pooled_sequence_model()
    batches = [jnp.asarray(rng.normal(size=(3, 1, 2))), jnp.asarray(rng.normal(size=(2, 3, 2)))]
    jac = np.concatenate([np.asarray(flat_jacobian(apply_fn, params, b)) for b in batches])
    jac = jac.transpose(1, 0, 2)
    want = np.einsum("knd,lmd->knlm", jac, jac)
    for options in (dict(method="implicit"), dict(mode="forward")):  # no capture plan
        np.testing.assert_allclose(GramMatrix(apply_fn, params, batches, **options).data,
                                   want, **TOL)
    for data in (batches, batches[::-1]):
        with pytest.raises(ValueError, match=r"one shape.*\(1, 2\).*method='implicit'|"
                                             r"one shape.*\(3, 2\).*method='implicit'"):
            GramMatrix(apply_fn, params, data)


@pytest.mark.parametrize("method", ["jacobian", "implicit"])
def test_a_non_finite_input_of_either_set_is_named(method):
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    x = jax.random.normal(keys[0], (4, 3)).at[1, 0].set(jnp.nan)
    z = jax.random.normal(keys[3], (6, 3)).at[2, 1].set(jnp.inf)
    params = {"W": jax.random.normal(keys[1], (3, 4)), "b": jax.random.normal(keys[2], (4,))}
    f = lambda p, v: jnp.tanh(v @ p["W"] + p["b"])  # noqa: E731
    # "implicit" names the left examples its chunk's products reached (chunks of 2)
    left = r"\[1\]" if method == "jacobian" else r"\[0, 1\]"
    with pytest.raises(FloatingPointError, match=rf"examples {left} of data_left and \[2\] "
                       r"of data_right"):
        CrossGramMatrix(f, params, x, z, method=method, batch_size=2)
    with pytest.raises(FloatingPointError, match=r"examples \[2\] of data_right:"):
        CrossGramMatrix(f, params, jnp.nan_to_num(x), z, method=method, batch_size=2)
    # every row non-finite (a non-finite parameter): neither set's examples can be named
    nan_params = {**params, "b": params["b"] * jnp.nan}
    with pytest.raises(FloatingPointError, match="every example of data_left and of "
                       "data_right"):
        CrossGramMatrix(f, nan_params, jnp.nan_to_num(x), z, method=method)


def test_finiteness_check_of_the_cross_kernel_makes_no_copy():
    """The per-row and per-column counts of finite entries of the ``(K, M, K, N)`` kernel
    are compiled without a temporary of the kernel's size (as reductions over its axes,
    XLA:CPU stored the boolean mask or its integer counts whole)."""
    from jaxgeom.pfmap import _finite_counts

    kernel = jnp.ones((3, 40, 3, 50)).at[1, 7, 2, 9].set(jnp.nan)
    rows, columns = _finite_counts(kernel)
    np.testing.assert_array_equal(rows, 450 - (np.arange(40) == 7))
    np.testing.assert_array_equal(columns, 360 - (np.arange(50) == 9))
    compiled = jax.jit(_finite_counts).lower(kernel).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < kernel.nbytes / 10


def test_an_eigh_solve_of_a_singular_gram_differentiates_as_the_cholesky_solve():
    """K·N = 80 > d = 52: the NTK's null space has 28 near-zero eigenvalues, over which
    ``jnp.linalg.eigh``'s derivative scaled round-off by ``1/(λⱼ − λᵢ)``: ``d/dθ`` of
    ``fᵀ(G + λI)⁻¹f`` by the ``eigh`` solve was off by its size (forward and reverse apart),
    now the Cholesky solve's."""
    t = make_linen_mlp(n=20)
    flat, unravel = ravel_pytree(t.params)
    rng = np.random.default_rng(1)
    f = jnp.asarray(rng.standard_normal((t.num_outputs, 20)))
    u = jnp.asarray(rng.standard_normal(flat.size))

    @jax.jit
    def energies(q):
        G = GramMatrix(t.apply_fn, unravel(q), t.x)
        return jnp.stack([jnp.vdot(f, G.solve(f, REGUL, method=m)) for m in ("cholesky", "eigh")])

    want, got = jax.jvp(energies, (flat,), (u,))[1]
    np.testing.assert_allclose(got, want, rtol=1e-7)
    np.testing.assert_allclose(jax.jacrev(energies)(flat)[1] @ u, want, rtol=1e-7)
