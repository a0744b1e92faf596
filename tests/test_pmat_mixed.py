"""PMatMixed: equal to its blocks (each part as the representation built on the whole model),
zero between parts; blockwise operations against ``to_dense()``; restriction, errors,
jit and chunking; ``PMatEKFACBlockDiag`` equals the Mixed of EKFAC and BlockDiag; all parts
built in one streaming pass (the data read once, twice with an EKFAC part's refit)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from models import Task, make_linen_embed, make_linen_layernorm, to_float64
from pmat_checks import (
    TOL,
    block_mask,
    check_all,
    check_combinations,
    check_eigsh,
    check_eigsh_without_dense,
    check_solve,
    factor_damped_dense,
    reference,
)

from jaxgeom import FIM, PMatBlockDiag, PMatDense, PMatDiag, PMatImplicit, PMatKFAC
from jaxgeom.jacobian import Hashable
from jaxgeom.pmat.ekfac import PMatEKFAC, PMatEKFACBlockDiag
from jaxgeom.pmat.mixed import PMatMixed, restrict
from jaxgeom.pmat.quasidiag import PMatQuasiDiag
from jaxgeom.variants import FisherOutputs

MAPPING = {"dense": PMatKFAC, "conv": PMatKFAC, "norm": PMatBlockDiag, "embedding": PMatDiag}


class ConvLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm()(nn.Conv(2, (2, 2), strides=(2, 2))(x))
        return nn.Dense(3)(jnp.tanh(x).reshape((x.shape[0], -1)))


def make_conv_layernorm(n=5):
    x = jax.random.normal(jax.random.PRNGKey(8), (n, 4, 4, 2))
    module = ConvLayerNorm()
    params = to_float64(module.init(jax.random.PRNGKey(0), x)["params"])
    return Task("conv_layernorm", lambda p, x: module.apply({"params": p}, x), params, x,
                None, 3)


@pytest.fixture(scope="module", params=[make_linen_layernorm, make_linen_embed,
                                        make_conv_layernorm])
def case(request):
    t = request.param()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping=MAPPING)
    return t, M, np.asarray(M.to_dense())


def test_equals_its_blocks(case):
    t, M, dense = case
    lc = M.layer_collection
    whole = {rep: np.asarray(FIM(t.apply_fn, t.params, t.x, rep).to_dense())
             for rep in {type(p) for p in M.parts}}
    for layer in lc.layers:
        idx = lc.layer_indices(layer)
        want = whole[MAPPING[layer.kind]][np.ix_(idx, idx)]
        np.testing.assert_allclose(dense[np.ix_(idx, idx)], want, **TOL, err_msg=layer.id)
        assert type(M.part(layer)) is MAPPING[layer.kind]
    assert not dense[~block_mask(lc)].any()


def test_operations(case):
    t, M, dense = case
    check_all(M, dense, t.params)
    check_solve(M, dense, t.params)
    check_combinations([
        (M, 2.0 * M, dense, 2 * dense, (PMatMixed, PMatMixed)),
        (M, PMatDense(M.layer_collection, dense), dense, dense, (PMatDense, PMatDense)),
    ])


def test_eigsh_from_the_parts(case):
    """``k`` eigenpairs from each part's own ``eigsh(min(k, d_p))`` (KFAC from its factors,
    BlockDiag per block, Diag one-hot), for every ``which`` and ``k`` up to ``d``, against
    ``numpy.linalg.eigh`` of ``to_dense()``, without any ``d × d`` value."""
    t, M, dense = case
    d = len(dense)
    check_eigsh(M, dense, jitted=False)  # eager; every which compiled below
    check_eigsh_without_dense(M, dense, sorted({1, 7, d // 2, d}))


def test_eigsh_kfac_quasidiag_diag_parts():
    """A KFAC, a QuasiDiag and a Diag part (each with its own ``eigsh``, no ``d × d``);
    ``k`` larger than a part (all of its pairs)."""
    t = make_linen_layernorm()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed,
            mapping={"Dense_0": PMatKFAC, "Dense_1": PMatQuasiDiag}, default=PMatDiag)
    assert [type(p) for p in M.parts] == [PMatKFAC, PMatQuasiDiag, PMatDiag]
    d = M.size(0)
    assert min(p.size(0) for p in M.parts) < d // 2
    check_eigsh_without_dense(M, np.asarray(M.to_dense()), sorted({1, 5, d // 2, d}))


def test_from_mapping_restriction_and_ekfac_block_diag():
    """Parts built by hand on restricted functions assemble to the same matrix;
    EKFAC on dense/conv + BlockDiag elsewhere == PMatEKFACBlockDiag (restricted capture)."""
    t = make_conv_layernorm()
    lc = FIM(t.apply_fn, t.params, t.x, PMatEKFACBlockDiag).layer_collection
    E = FIM(t.apply_fn, t.params, t.x, PMatEKFACBlockDiag, layer_collection=lc)
    ids = {k: tuple(lyr.id for lyr in lc.layers if (lyr.kind == "norm") == k) for k in (0, 1)}
    parts = []
    for norm, rep in [(0, PMatEKFAC), (1, PMatBlockDiag)]:
        r = restrict(lc, ids[norm])
        parts.append(FIM(r.apply_fn(t.apply_fn, t.params), r.select(t.params), t.x, rep,
                         layer_collection=r.layer_collection))
    M = PMatMixed.from_mapping(lc, parts)
    np.testing.assert_allclose(M.to_dense(), E.to_dense(), **TOL)
    with pytest.raises(ValueError, match="every layer once"):
        PMatMixed.from_mapping(lc, parts[:1])
    r = restrict(lc, ids[1])  # a part built without the restricted layer collection
    alone = FIM(r.apply_fn(t.apply_fn, t.params), r.select(t.params), t.x, PMatBlockDiag)
    with pytest.raises(ValueError, match=r"does not have.*layer_collection=restrict"):
        PMatMixed.from_mapping(lc, [parts[0], alone])
    # one id or any sequence of ids names the same restriction
    first = ids[1][0]
    assert restrict(lc, first) == restrict(lc, [first]) == restrict(lc, (first,))
    np.testing.assert_array_equal(restrict(lc, [first]).indices, lc.layer_indices(first))
    with pytest.raises(ValueError, match="distinct layer ids"):
        restrict(lc, [first, first])


def test_errors_name_the_part():
    t = make_linen_layernorm()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"Dense_*": PMatQuasiDiag})
    assert [type(p) for p in M.parts] == [PMatQuasiDiag, PMatBlockDiag]
    with pytest.raises(NotImplementedError, match=r"PMatQuasiDiag \(layers \['Dense_0'"):
        M.pow(0.5)
    with pytest.raises(ValueError, match="matches no layer"):
        FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"Conv_*": PMatKFAC})
    with pytest.raises(TypeError, match="representation class"):
        FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"dense": "kfac"})


def _three_plain_layers(first_id="w0"):
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    params = {first_id: jax.random.normal(keys[0], (3, 5)),
              "w1": jax.random.normal(keys[1], (5, 4)), "w2": jax.random.normal(keys[2], (4, 3))}

    def apply_fn(p, x):
        return jnp.tanh(jnp.tanh(x @ p[first_id]) @ p["w1"]) @ p["w2"]

    return apply_fn, params, jax.random.normal(jax.random.PRNGKey(1), (6, 3))


def test_mapping_keys_ids_then_patterns_in_order():
    """An exact id is matched as itself, also one that reads as a glob pattern (``a[1]``
    would match ``a1``); among patterns the first matching one in the mapping's order
    chooses; a pattern left with no layer (each taken by an earlier key) is refused."""
    apply_fn, params, x = _three_plain_layers("a[1]")
    M = FIM(apply_fn, params, x, PMatMixed, mapping={"a[1]": PMatDense}, default=PMatDiag)
    assert [type(M.part(i)) for i in ("a[1]", "w1", "w2")] == [PMatDense, PMatDiag, PMatDiag]
    np.testing.assert_allclose(M.part("a[1]").to_dense(),
                               FIM(apply_fn, params, x, PMatDense).to_dense()[:15, :15], **TOL)
    apply_fn, params, x = _three_plain_layers()
    M = FIM(apply_fn, params, x, PMatMixed, mapping={"w[01]": PMatKFAC, "*": PMatDense})
    assert [type(M.part(i)) for i in ("w0", "w1", "w2")] == [PMatKFAC, PMatKFAC, PMatDense]
    with pytest.raises(ValueError, match=r"'w\[01\]' chooses no layer.*\['w0', 'w1'\]"):
        FIM(apply_fn, params, x, PMatMixed, mapping={"w*": PMatDense, "w[01]": PMatKFAC})
    with pytest.raises(ValueError, match=r"'w\[0\]' chooses no layer"):
        FIM(apply_fn, params, x, PMatMixed, mapping={"w0": PMatDense, "w[0]": PMatKFAC})
    with pytest.raises(ValueError, match="'W\\*' matches no layer"):  # case-sensitive
        FIM(apply_fn, params, x, PMatMixed, mapping={"W*": PMatDense})


def test_chunks_iterators_and_jit():
    t = make_linen_layernorm(n=7)
    build = dict(mapping={"dense": PMatKFAC}, default=PMatDiag)
    ref = FIM(t.apply_fn, t.params, t.x, PMatMixed, **build).to_dense()
    one_shot = iter([(t.x[:2],), (t.x[2:],)])  # one pass for all parts
    chunked = FIM(t.apply_fn, t.params, one_shot, PMatMixed, batch_size=3, **build)
    jitted = jax.jit(lambda p, x: FIM(t.apply_fn, p, x, PMatMixed, **build))(t.params, t.x)
    for got in (chunked, jitted):
        np.testing.assert_allclose(got.to_dense(), ref, **TOL)


# ----------------------------------------------------------------------------- one pass
class FiveLayers(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.LayerNorm()(nn.Dense(5)(x)))
        x = jnp.tanh(nn.Dense(4)(x))
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


def make_five_layers(n=9):
    x = jax.random.normal(jax.random.PRNGKey(5), (n, 4))
    module = FiveLayers()
    params = to_float64(module.init(jax.random.PRNGKey(1), x)["params"])
    return Task("five_layers", lambda p, x: module.apply({"params": p}, x), params, x, None, 3)


#: one part per representation: KFAC + BlockDiag + EKFAC + Diag + Dense
FIVE = {"Dense_0": PMatKFAC, "LayerNorm_0": PMatBlockDiag, "Dense_1": PMatEKFAC,
        "Dense_2": PMatDiag, "Dense_3": PMatDense}


class Counted:
    """A re-iterable loader counting its iterations and the batches it yields."""

    def __init__(self, batches):
        self.batches, self.iterations, self.pulled = batches, 0, 0

    def __iter__(self):
        self.iterations += 1
        for b in self.batches:
            self.pulled += 1
            yield b


def counted_generator(batches, counter):
    """A one-shot generator of ``batches`` counting the batches pulled from it."""
    for b in batches:
        counter.append(1)
        yield b


@pytest.fixture(scope="module")
def five():
    t = make_five_layers()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping=FIVE)
    return t, M


def test_one_pass_equals_blocks_and_dense_reference(five):
    """Every part equals the float64 brute-force Fisher restricted to its block (BlockDiag,
    Dense: the block; Diag: its diagonal) and the representation built on the whole model
    (KFAC, EKFAC: the layer's block); zero between parts."""
    t, M = five
    lc = M.layer_collection
    ref = reference(t)
    whole = {rep: np.asarray(FIM(t.apply_fn, t.params, t.x, rep).to_dense())
             for rep in (PMatKFAC, PMatEKFAC)}
    dense = np.asarray(M.to_dense())
    for layer_id, rep in FIVE.items():
        assert type(M.part(layer_id)) is rep
        idx = lc.layer_indices(lc.layer(layer_id))
        got = dense[np.ix_(idx, idx)]
        np.testing.assert_allclose(np.asarray(M.part(layer_id).to_dense()), got, **TOL)
        if rep in whole:
            want = whole[rep][np.ix_(idx, idx)]
        elif rep is PMatDiag:
            want = np.diag(np.diag(ref[np.ix_(idx, idx)]))
        else:
            want = ref[np.ix_(idx, idx)]
        np.testing.assert_allclose(got, want, **TOL, err_msg=layer_id)
    assert not dense[~block_mask(lc)].any()
    # EKFAC's refit is not KFAC: the second pass did run
    idx = lc.layer_indices(lc.layer("Dense_1"))
    assert not np.allclose(dense[np.ix_(idx, idx)], whole[PMatKFAC][np.ix_(idx, idx)])


def test_data_read_once_chunked(five):
    """A one-shot generator of two batches (5 + 4 examples) chunked by 3 (short last
    chunks, padded and masked): exactly 2 batches are pulled from it — EKFAC's second pass
    replays the kept batches — and the result is the one-chunk build's. A re-iterable
    loader is iterated once per pass: twice with an EKFAC part (its refit), once without."""
    t, M = five
    batches = [t.x[:5], t.x[5:]]
    pulled = []
    chunked = FIM(t.apply_fn, t.params, counted_generator(batches, pulled), PMatMixed,
                  mapping=FIVE, batch_size=3)
    assert len(pulled) == len(batches)
    np.testing.assert_allclose(chunked.to_dense(), M.to_dense(), **TOL)

    fn = FisherOutputs(Hashable(t.apply_fn), "classif_logits")
    for refit, passes in [(True, 2), (False, 1)]:
        loader = Counted(batches)
        got = PMatMixed.from_jacobians(
            fn, t.params, loader, layer_collection=M.layer_collection, batch_size=3,
            mapping=FIVE, options={PMatEKFAC: {"refit": refit}})
        assert (loader.iterations, loader.pulled) == (passes, passes * len(batches))
        if refit:
            np.testing.assert_allclose(got.to_dense(), M.to_dense(), **TOL)


def test_implicit_part_keeps_the_data():
    """A ``PMatImplicit`` part keeps the batches read in the one pass (a one-shot generator
    is pulled once) and replays them: its block is the brute-force one. It has no exact
    ``eigsh``: the Mixed one raises, naming it."""
    t = make_linen_layernorm(n=7)
    pulled = []
    batches = [t.x[:4], t.x[4:]]
    M = FIM(t.apply_fn, t.params, counted_generator(batches, pulled), PMatMixed,
            mapping={"Dense_1": PMatImplicit}, default=PMatDiag, batch_size=3)
    assert len(pulled) == 2
    part = M.part("Dense_1")
    assert type(part) is PMatImplicit and len(part.data) == 2
    lc = M.layer_collection
    idx = lc.layer_indices(lc.layer("Dense_1"))
    np.testing.assert_allclose(part.to_dense(), reference(t)[np.ix_(idx, idx)], **TOL)
    # eigsh from the parts' own: the implicit one has none (Lanczos), and says so
    with pytest.raises(NotImplementedError, match=r"eigsh is not available for the part "
                       r"stored as PMatImplicit \(layers \['Dense_1'\]\).*lanczos_eigsh"):
        M.eigsh(2)


# ----------------------------------------------------------------------------- damping
def _mixed_factor_damped_dense(M, lam, damping, p=-1.0):
    """The float64 dense ``(M + λ)^p`` of a ``PMatMixed`` whose KFAC parts are factor
    damped (``factor_damped_dense``: per Kronecker layer the power of ``(A + π√λ I) ⊗
    (G + √λ/π I)``), the other parts' ``(M_p + λI)^p``, zero between parts."""
    lc = M.layer_collection
    out = np.zeros((lc.numel(), lc.numel()))
    for part in M.parts:
        dense = np.asarray(part.to_dense())
        if isinstance(part, PMatKFAC):
            block = factor_damped_dense(part, dense, lam, damping, p)
        else:
            e, q = np.linalg.eigh(dense + lam * np.eye(len(dense)))
            block = (q * e**p) @ q.T
        idx = restrict(lc, [lyr.id for lyr in part.layer_collection]).indices
        out[np.ix_(idx, idx)] = block
    return out


@pytest.mark.parametrize("damping", ["pi", "pi_one"])
def test_damping_goes_to_the_kfac_parts(damping):
    """``solve``/``inv``/``pow`` with ``damping="pi"``/``"pi_one"``: the KFAC part's
    factor-damped blocks, the BlockDiag part damped exactly; against the dense formula.
    ``"exact"`` (the default) is ``(M + λI)`` everywhere."""
    t = make_linen_layernorm()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"dense": PMatKFAC})
    assert [type(p) for p in M.parts] == [PMatKFAC, PMatBlockDiag]
    lam = 0.1
    expected = _mixed_factor_damped_dense(M, lam, damping)
    dense = np.asarray(M.to_dense())
    exact = np.linalg.inv(dense + lam * np.eye(len(dense)))
    assert not np.allclose(expected, exact, rtol=1e-3)  # the damping did reach the part
    v = np.random.default_rng(0).standard_normal(len(dense))
    np.testing.assert_allclose(M.solve(v, lam, damping=damping), expected @ v, **TOL)
    np.testing.assert_allclose(M.inv(lam, damping=damping).to_dense(), expected, **TOL)
    for p in (-1, -0.5):
        np.testing.assert_allclose(M.pow(p, lam, damping=damping).to_dense(),
                                   _mixed_factor_damped_dense(M, lam, damping, p),
                                   rtol=1e-7, atol=1e-9)
    solve = jax.jit(lambda m, x: m.solve(x, lam, damping=damping))
    np.testing.assert_allclose(solve(M, v), expected @ v, **TOL)
    for got in (M.solve(v, lam, damping="exact"), M.solve(v, lam),
                M.inv(lam, damping="exact").mv(v)):
        np.testing.assert_allclose(got, exact @ v, **TOL)


def test_damping_without_a_kfac_part_is_refused():
    """A factored damping with no part taking it (Diag, BlockDiag) is a ``ValueError``
    saying so; ``"exact"`` is every part's own; an unknown damping, or a factored one with
    ``method="cg"``, is refused."""
    t = make_linen_layernorm()
    M = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"dense": PMatDiag})
    v = np.ones(M.size(0))
    for call in (lambda: M.solve(v, 0.1, damping="pi"), lambda: M.inv(0.1, damping="pi_one"),
                 lambda: M.pow(-0.5, 0.1, damping="pi")):
        with pytest.raises(ValueError, match=r"has none \(its parts are PMatBlockDiag, "
                                             r"PMatDiag\).*drop damping"):
            call()
    np.testing.assert_allclose(M.solve(v, 0.1, damping="exact"), M.solve(v, 0.1), **TOL)
    with pytest.raises(ValueError, match="damping must be one of"):
        M.inv(0.1, damping="tikhonov")
    K = FIM(t.apply_fn, t.params, t.x, PMatMixed, mapping={"dense": PMatKFAC})
    with pytest.raises(ValueError, match="drop method='cg'"):
        K.solve(v, 0.1, method="cg", damping="pi")


def test_a_part_of_integer_leaves_only_keeps_a_float32_model_in_float32():
    """A float32 model whose int32 counter is a layer of its own ('seen'): under x64 that
    part was built in float64 (a layout of integer leaves only has the default float), and
    every product of the whole matrix — ``mv`` of a float32 vector, ``to_dense``, ``solve``,
    ``inv`` — came out float64. The part is a zero matrix; it now has the model's dtype, and
    the numbers are the float64 model's to float32 precision."""
    from models import make_counted_mlp

    assert jax.config.jax_enable_x64
    t = make_counted_mlp()
    p32 = jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a,
        t.params)
    M = FIM(t.apply_fn, p32, (t.x.astype(jnp.float32), t.y), PMatMixed,
            mapping={"norm": PMatDiag, "dense": PMatBlockDiag}, default=PMatDense)
    assert [lyr.id for lyr in M.parts[-1].layer_collection.layers] == ["seen"]
    v = jnp.linspace(-1.0, 1.0, M.size(0), dtype=jnp.float32)
    for out in (M.to_dense(), M.mv(v), M.solve(v, 0.1), M.inv(0.1).to_dense(), M.get_diag()):
        assert out.dtype == jnp.float32
    M64 = FIM(t.apply_fn, t.params, (t.x, t.y), PMatMixed,
              mapping={"norm": PMatDiag, "dense": PMatBlockDiag}, default=PMatDense)
    np.testing.assert_allclose(M.to_dense(), M64.to_dense(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(M.solve(v, 0.1), M64.solve(v.astype(jnp.float64), 0.1),
                               rtol=1e-4, atol=1e-5)
