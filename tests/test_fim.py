"""FIM, FIM_MonteCarlo and SecondMoment against float64 brute force (in PMatDense)."""

import itertools
import sys
import types
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from models import (
    ALL_TASKS,
    constant_columns,
    flat_jacobian,
    make_counted_mlp,
    make_linen_cnn,
    make_linen_mlp,
    make_plain_mlp,
    output_fisher,
    reference_fisher,
    to_float64,
)
from pmat_checks import compilations

import jaxgeom
from jaxgeom import (
    FIM,
    VARIANTS,
    FIM_MonteCarlo,
    PMatDense,
    PMatDiag,
    PMatEKFAC,
    PMatImplicit,
    PMatKFAC,
    PMatLowRank,
    PMatQuasiDiag,
    SecondMoment,
)
from jaxgeom._counter_rng import draw_key
from jaxgeom.jacobian import Hashable
from jaxgeom.pmat.mixed import PMatMixed
from jaxgeom.streaming import tree_finite
from jaxgeom.variants import (
    FisherOutputs,
    inverse_cdf,
    sample_categorical,
    softmax_cholesky_outputs,
)

TOL = dict(rtol=1e-9, atol=1e-12)


def dense(apply_fn, params, data, **kw):
    return FIM(apply_fn, params, data, PMatDense, **kw).to_dense()


# ----------------------------------------------------------------------------- exact variants
@pytest.mark.parametrize("name", sorted(ALL_TASKS))
def test_classif_logits_equals_brute_force(name):
    t = ALL_TASKS[name]()
    np.testing.assert_allclose(
        dense(t.apply_fn, t.params, (t.x, t.y)), reference_fisher(t.apply_fn, t.params, t.x),
        **TOL,
    )



def test_integer_and_boolean_leaves_have_zero_rows_and_columns():
    """Integer and boolean params leaves (a step counter and a mask the model reads, a
    counter it ignores) are constants: zero rows and columns, in either Jacobian mode and
    beside a float leaf outside any dense layer, whose captured gradients come with theirs
    (their float0 cotangents failed to concatenate with its)."""
    t = make_counted_mlp()
    ref = np.asarray(reference_fisher(t.apply_fn, t.params, t.x))
    constant = constant_columns(t.params)
    assert ref.any() and not ref[constant].any() and not ref[:, constant].any()
    for mode in ("reverse", "forward"):
        np.testing.assert_allclose(dense(t.apply_fn, t.params, (t.x, t.y), mode=mode), ref,
                                   **TOL, err_msg=mode)
    np.testing.assert_allclose(FIM(t.apply_fn, t.params, (t.x, t.y), PMatDiag).get_diag(),
                               np.diag(ref), **TOL)
    np.testing.assert_allclose(FIM(t.apply_fn, t.params, (t.x, t.y), PMatLowRank).to_dense(),
                               ref, **TOL)

def test_classif_logsoftmax_equals_logits_fisher():
    t = make_linen_mlp()

    def log_probs(p, x):
        return jax.nn.log_softmax(t.apply_fn(p, x))

    F_logsoftmax = dense(log_probs, t.params, t.x, variant="classif_logsoftmax")
    np.testing.assert_allclose(F_logsoftmax, reference_fisher(t.apply_fn, t.params, t.x), **TOL)


@pytest.mark.parametrize("single_logit", [False, True])
def test_classif_binary_logits(single_logit):
    t = make_plain_mlp()
    apply_fn = (lambda p, x: t.apply_fn(p, x)[:, 0]) if single_logit else t.apply_fn
    F = dense(apply_fn, t.params, t.x, variant="classif_binary_logits")
    ref = reference_fisher(apply_fn, t.params, t.x, "classif_binary_logits")
    np.testing.assert_allclose(F, ref, **TOL)


@pytest.mark.parametrize(
    "covariance",
    [None, 0.5, jnp.array([0.5, 1.0, 2.0, 3.0]), "matrix"],
    ids=["identity", "scalar", "diagonal", "matrix"],
)
def test_regression_with_covariance(covariance):
    t = make_plain_mlp()
    if isinstance(covariance, str):
        a = jax.random.normal(jax.random.PRNGKey(3), (4, 4))
        covariance = a @ a.T + 0.5 * jnp.eye(4)
    F = dense(t.apply_fn, t.params, t.x, variant="regression", covariance=covariance)
    ref = reference_fisher(t.apply_fn, t.params, t.x, "regression", covariance)
    np.testing.assert_allclose(F, ref, **TOL)


class SegNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Conv(3, (3, 3), padding="SAME")(nn.tanh(nn.Conv(2, (3, 3), padding="SAME")(x)))


def make_segmentation():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 4, 1))
    params = to_float64(SegNet().init(jax.random.PRNGKey(1), x)["params"])
    return (lambda p, x: SegNet().apply({"params": p}, x)), params, x


def test_segmentation_logits_sums_positions():
    apply_fn, params, x = make_segmentation()
    F = dense(apply_fn, params, x, variant="segmentation_logits")
    ref = reference_fisher(apply_fn, params, x, "segmentation_logits")
    np.testing.assert_allclose(F, ref, **TOL)


_cholesky_factor = jax.jit(jax.jacobian(softmax_cholesky_outputs))


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(-30, 30, allow_nan=False), min_size=2, max_size=7),
)
def test_softmax_cholesky_factor_squares_to_multinomial_covariance(logits):
    logits = jnp.asarray(logits, jnp.float64)
    B = _cholesky_factor(logits)
    p = jax.nn.softmax(logits)
    assert B.shape == (len(logits) - 1, len(logits))
    np.testing.assert_allclose(B.T @ B, jnp.diag(p) - jnp.outer(p, p), atol=1e-12)


def test_softmax_cholesky_factor_keeps_tiny_probabilities_in_float32():
    """Logits 45 apart: p = e⁻⁴⁵ ≈ 2.9e-20 is a float32 number, but the product of two such
    probabilities is not (it had flushed d_i to zero: 33% error in F)."""
    logits = jnp.asarray([0.0, -45.0, -45.0, -45.0], jnp.float32)
    B = np.asarray(_cholesky_factor(logits), np.float64)
    p = np.asarray(jax.nn.softmax(logits.astype(jnp.float64)))
    others = np.array([np.delete(p, i).sum() for i in range(4)])  # 1 − p_i without rounding
    covariance = np.diag(p * others) - np.outer(p, p) * (1 - np.eye(4))  # p_i(1 − p_i) exactly
    np.testing.assert_allclose(B.T @ B, covariance, rtol=1e-5, atol=1e-6 * p[1])


@pytest.mark.parametrize("dtype, logit", [(jnp.float32, 20.0), (jnp.float64, 40.0)])
def test_binary_fisher_of_a_saturated_logit_is_symmetric(dtype, logit):
    """F = σ(f)σ(−f) for one logit, the same for f and −f; 1 − σ(f) had rounded to 0 for
    large positive f."""
    def apply_fn(w, x):
        return x * w

    for f in (logit, -logit):
        F = FIM(apply_fn, jnp.ones((1,), dtype), jnp.full((1, 1), f, dtype), PMatDense,
                variant="classif_binary_logits").to_dense()
        expected = f**2 * jax.nn.sigmoid(jnp.float64(f)) * jax.nn.sigmoid(-jnp.float64(f))
        np.testing.assert_allclose(F[0, 0], expected, rtol=1e-5)


@pytest.mark.parametrize("classes", [5, 300])  # CDF as a triangular product / as a cumsum
def test_sample_categorical_draws_softmax_frequencies(classes):
    logits = jax.random.normal(jax.random.PRNGKey(0), (2, classes), jnp.float64) * 2
    logits = logits.at[:, (1, -1)].set(-jnp.inf)  # classes of probability 0
    draws = 40_000
    y = sample_categorical(draw_key(jax.random.PRNGKey(1)), 3, logits, (draws, 2))
    assert y.shape == (draws, 2) and y.dtype.kind == "i"
    p = jax.nn.softmax(logits)
    frequencies = jnp.stack([jnp.bincount(y[:, i], length=classes) for i in range(2)]) / draws
    assert float(jnp.max(frequencies[:, (1, -1)])) == 0
    binomial_std = jnp.sqrt(p * (1 - p) / draws)
    # 5 standard deviations, plus a few draws for the Poisson tail of the rarest classes
    assert bool(jnp.all(jnp.abs(frequencies - p) < 5 * binomial_std + 4 / draws))


def test_inverse_cdf_never_draws_a_masked_class_when_the_sums_round_below_one():
    logits = jax.random.normal(jax.random.PRNGKey(2), (7,), jnp.float32).at[-1].set(-jnp.inf)
    p = jax.nn.softmax(logits) * jnp.float32(1 - 2**-20)  # below 1 however XLA rounds
    assert float(jnp.sum(p)) < 1  # as float32 rounding may leave it: P(C-1) < 1
    u = jnp.array([0.0, 0.5, jnp.nextafter(jnp.float32(1), jnp.float32(0))], jnp.float32)
    drawn = inverse_cdf(p, u)
    assert drawn[0] == 0 and bool(jnp.all(p[drawn] > 0))
    assert drawn[-1] == 5  # the last class of positive probability


# ----------------------------------------------------------------------------- data handling
class _RecordedBars:
    """A stand-in for ``tqdm``: the bars made, as ``[description, total, [updates], closed]``."""

    def __init__(self):
        self.bars = []

    def tqdm(self, total=None, desc=None, unit=None):
        record = [desc, total, [], False]
        self.bars.append(record)
        return types.SimpleNamespace(update=record[2].append,
                                     close=lambda: record.__setitem__(3, True))


def test_progress_bars_count_each_eager_pass_of_examples(monkeypatch):
    """Inside ``jaxgeom.progress()`` an eager build draws a bar per pass over its examples,
    advanced chunk by chunk and closed; the matrix is the one built without; a ``jit``
    draws nothing; without ``tqdm`` the block is refused with the fix."""
    recorded = _RecordedBars()
    monkeypatch.setitem(sys.modules, "tqdm", recorded)
    t = make_linen_mlp(n=7)
    data = (t.x, t.y)
    with jaxgeom.progress("Fisher"):
        kfac = jaxgeom.FIM(t.apply_fn, t.params, data, jaxgeom.PMatKFAC, batch_size=3)
        jaxgeom.FIM(t.apply_fn, t.params, data, jaxgeom.PMatEKFAC, batch_size=3)  # two passes
        jaxgeom.FIM(t.apply_fn, t.params, data, jaxgeom.PMatDiag)  # one chunk: one step
        jaxgeom.FIM(t.apply_fn, t.params, (b for b in [(t.x[:4], t.y[:4]), (t.x[4:], t.y[4:])]),
               jaxgeom.PMatDiag, batch_size=2)  # a generator: no total
        jax.jit(lambda p: jaxgeom.FIM(t.apply_fn, p, data, jaxgeom.PMatKFAC, batch_size=3).trace())(
            t.params)
    assert recorded.bars == [
        ["Fisher", 7, [3, 3, 1], True],
        ["Fisher (pass 1)", 7, [3, 3, 1], True],
        ["Fisher (pass 2)", 7, [3, 3, 1], True],
        ["Fisher", 7, [7], True],
        ["Fisher", None, [2, 2, 2, 1], True],
    ]
    jaxgeom.FIM(t.apply_fn, t.params, data, jaxgeom.PMatKFAC, batch_size=3)  # outside the block
    assert len(recorded.bars) == 5
    again = jaxgeom.FIM(t.apply_fn, t.params, data, jaxgeom.PMatKFAC, batch_size=3)
    np.testing.assert_array_equal(kfac.to_dense(), again.to_dense())
    monkeypatch.setitem(sys.modules, "tqdm", None)
    refused = pytest.raises(ImportError, match=r"tqdm, which is not installed: pip install tqdm")
    with refused, jaxgeom.progress():
        pass


def test_chunked_equals_unchunked_and_batches_equal_one_batch():
    t = make_linen_mlp(n=7)
    whole = dense(t.apply_fn, t.params, (t.x, t.y))
    chunked = dense(t.apply_fn, t.params, (t.x, t.y), batch_size=3)
    as_list = dense(t.apply_fn, t.params, [(t.x[:2], t.y[:2]), (t.x[2:], t.y[2:])])
    as_generator = dense(
        t.apply_fn, t.params, ((t.x[i : i + 3], t.y[i : i + 3]) for i in range(0, 7, 3)),
        batch_size=2,
    )
    as_numpy = dense(t.apply_fn, t.params, [(np.asarray(t.x), np.asarray(t.y))], batch_size=4)
    for other in (chunked, as_list, as_generator, as_numpy):
        np.testing.assert_allclose(other, whole, **TOL)


def test_pytree_inputs():
    t = make_plain_mlp(n=5)

    def apply_fn(p, inputs):
        return t.apply_fn(p, inputs["a"] + 2 * inputs["b"])

    x = {"a": t.x, "b": jnp.cos(t.x)}
    np.testing.assert_allclose(
        dense(apply_fn, t.params, (x,), batch_size=2),
        reference_fisher(t.apply_fn, t.params, t.x + 2 * jnp.cos(t.x)),
        **TOL,
    )


@pytest.mark.parametrize("form", ["list", "frozendict"])
def test_inputs_that_are_a_list_or_a_mapping_are_one_batch(form):
    """``x`` may be any pytree: a list ``[a, b]`` or a Flax ``FrozenDict`` inside ``(x, y)``
    is one batch's inputs, not two batches (nor the mapping's keys)."""
    from flax.core import FrozenDict

    t = make_plain_mlp(n=5)
    if form == "list":
        x = [t.x, jnp.cos(t.x)]

        def apply_fn(p, inputs):
            return t.apply_fn(p, inputs[0] + 2 * inputs[1])
    else:
        x = FrozenDict(a=t.x, b=jnp.cos(t.x))

        def apply_fn(p, inputs):
            return t.apply_fn(p, inputs["a"] + 2 * inputs["b"])

    expected = reference_fisher(t.apply_fn, t.params, t.x + 2 * jnp.cos(t.x))
    np.testing.assert_allclose(dense(apply_fn, t.params, (x, t.y)), expected, **TOL)
    J = jaxgeom.Jacobian(apply_fn, t.params, (x, t.y)).to_dense()  # (K, N, d)
    np.testing.assert_allclose(np.einsum("knd,kne->de", J, J) / 5,
                               reference_fisher(t.apply_fn, t.params, t.x + 2 * jnp.cos(t.x),
                                                variant="regression"), **TOL)


@pytest.mark.filterwarnings("ignore:shape requires ndarray:DeprecationWarning")  # Flax on a dict x
def test_a_dict_batch_of_inputs_and_labels_fails_with_the_fix():
    """A ``{'x': .., 'y': ..}`` batch is one pytree ``x`` (a dict is the inputs): the model's
    error on it (here Flax's bare ``IndexError``) carries a note naming the keys and the
    fix, ``(batch['x'], batch['y'])``; the fixed data give the reference."""
    t = make_linen_mlp()
    batch = {"x": t.x, "y": t.y}
    builds = [lambda d: FIM(t.apply_fn, t.params, d, PMatDense),
              lambda d: FIM(t.apply_fn, t.params, [d, d], PMatKFAC),
              lambda d: FIM_MonteCarlo(t.apply_fn, t.params, d, PMatDiag,
                                       key=jax.random.PRNGKey(0))]
    for build in builds:
        with pytest.raises(Exception) as info:
            build(batch)
        notes = " ".join(getattr(info.value, "__notes__", []))
        assert "keys 'x', 'y'" in notes and "(batch['x'], batch['y'])" in notes
    np.testing.assert_allclose(dense(t.apply_fn, t.params, (batch["x"], batch["y"])),
                               reference_fisher(t.apply_fn, t.params, t.x), **TOL)


def test_a_single_example_without_its_batch_axis_is_refused_with_the_fix():
    """``(x[0], y[0])``: read as a batch of ``x.shape[1]`` examples, the model's outputs
    then lack that axis; the error says to add it."""
    t = make_linen_mlp()
    for build in (lambda d: FIM(t.apply_fn, t.params, d, PMatDense),
                  lambda d: FIM_MonteCarlo(t.apply_fn, t.params, d, PMatKFAC,
                                           key=jax.random.PRNGKey(0)),
                  lambda d: SecondMoment(t.apply_fn, t.params, d[0], PMatDiag)):
        with pytest.raises(ValueError, match=r"single example.*x\[None\]"):
            build((t.x[0], t.y[0]))


def test_a_list_of_inputs_and_labels_is_refused_with_the_fix():
    """``[x, y]`` is a list, so two batches of inputs: with integer labels it is refused up
    front by every builder (was the model's error on the labels, e.g. Flax's
    ``ScopeParamShapeError``); with float targets of another shape the model's error on them
    carries a note naming the tuple ``(x, y)``."""
    t = make_linen_mlp()

    def per_example(p, b):
        return t.apply_fn(p, b[0])

    builds = [lambda d: FIM(t.apply_fn, t.params, d, PMatDense),
              lambda d: SecondMoment(per_example, t.params, d, PMatDiag),
              lambda d: jaxgeom.Hessian(lambda p, b: t.apply_fn(p, b[0]).sum(), t.params, d,
                                        PMatDense),
              lambda d: jaxgeom.Jacobian(t.apply_fn, t.params, d),
              lambda d: jaxgeom.GramMatrix(t.apply_fn, t.params, d)]
    for build in builds:
        with pytest.raises(ValueError, match=r"list of two arrays.*tuple \(x, y\)"):
            build([t.x, t.y])
    targets = jnp.ones((len(t.y), 1))
    for build in builds[0], builds[3]:
        with pytest.raises(Exception) as info:
            build([t.x, targets])
        assert "not [x, y]" in " ".join(getattr(info.value, "__notes__", []))


@pytest.mark.filterwarnings("ignore:shape requires ndarray:DeprecationWarning")  # Flax on a dict x
def test_a_tuple_of_batches_is_refused_with_the_fix():
    """A tuple is one batch ``(x, y)``: a tuple of two input batches ``(x1, x2)`` was read as
    ``x1`` with unused labels ``x2`` (the FIM of ``x1`` alone, silently), a tuple of batches
    ``((x1, y1), (x2, y2))`` failed in the model (a ``TracerArrayConversionError``). Labels
    with another number of examples than the inputs are refused; a tuple of batches of one
    size gets a note on the model's error; ``(x, None)`` and a scalar ``y`` still pass."""
    t = make_linen_mlp()
    x, y = t.x, t.y
    for data in ((x[:3], x[3:]), ((x[:3], y[:3]), (x[3:], y[3:]))):
        for build in (lambda d: FIM(t.apply_fn, t.params, d, PMatDense),
                      lambda d: jaxgeom.Jacobian(t.apply_fn, t.params, d)):
            with pytest.raises(ValueError, match=r"labels y have 4 examples.*inputs x 3.*list"):
                build(data)
    with pytest.raises(Exception) as info:
        FIM(t.apply_fn, t.params, ((x[:3], y[:3]), (x[3:6], y[3:6])), PMatDense)
    assert "pass them as a list" in " ".join(getattr(info.value, "__notes__", []))
    expected = reference_fisher(t.apply_fn, t.params, x)
    for data in ((x, None), (x, 0)):
        np.testing.assert_allclose(dense(t.apply_fn, t.params, data), expected, **TOL)


def test_batches_of_another_dtype_are_refused_naming_the_dtypes():
    """The captured builds trace one example's dtypes: a later batch in float32 after a
    float64 one was refused as "the shapes [(3,)], the first ones [(3,)]"; the error names
    the dtypes. The dense build takes it, as the reference of the values cast."""
    t = make_linen_mlp()
    data = [(t.x[:3], t.y[:3]), (t.x[3:].astype(jnp.float32), t.y[3:])]
    for representation in (PMatKFAC, PMatDiag):
        with pytest.raises(ValueError, match=r"dtypes \['float32'\], the first ones "
                           r"\['float64'\].*Cast the inputs"):
            FIM(t.apply_fn, t.params, data, representation, batch_size=2)
    cast = jnp.concatenate([t.x[:3], t.x[3:].astype(jnp.float32).astype(jnp.float64)])
    np.testing.assert_allclose(dense(t.apply_fn, t.params, data),
                               reference_fisher(t.apply_fn, t.params, cast), **TOL)


def test_a_list_of_batches_is_sized_before_it_is_read():
    """FIM's inputs of a list of batches stay a list (LowRank and the Jacobian write their
    rows in place into a buffer of the known size) and a one-shot iterator stays one."""
    from jaxgeom import data as data_lib

    t = make_plain_mlp(n=5)
    batches = [(t.x[:2], t.y[:2]), (t.x[2:], t.y[2:])]
    assert data_lib.known_size(data_lib.inputs_only(batches)) == 5
    assert data_lib.known_size(data_lib.inputs_only((t.x, t.y))) == 5
    assert data_lib.known_size(data_lib.inputs_only(iter(batches))) is None
    np.testing.assert_allclose(
        FIM(t.apply_fn, t.params, batches, PMatLowRank, batch_size=2).to_dense(),
        dense(t.apply_fn, t.params, (t.x, t.y)), **TOL)


ONE_CALL = [PMatKFAC, PMatDiag, PMatQuasiDiag, PMatLowRank]
#: a mixed matrix of parts built in one call each: one call for all of them
MIXED = dict(mapping={"Dense_0": PMatKFAC, "Dense_1": PMatQuasiDiag})


@pytest.mark.parametrize("representation, options",
                         [(r, {}) for r in ONE_CALL] + [(PMatMixed, MIXED)],
                         ids=[r.__name__ for r in ONE_CALL] + ["PMatMixed"])
def test_data_of_one_chunk_are_built_in_one_compiled_call(representation, options):
    """Data read in one chunk (one batch, no ``batch_size``) are built by one compiled call,
    the chunk's statistics and their mean together, instead of three (the zero total, the
    step, the mean): the same matrix, structure and numbers, as the same batch streamed
    from an iterator (its size unknown: the streamed path), and the same numbers as the
    data cut in chunks of 4 (padded)."""
    t = make_linen_mlp(n=9)  # data of a size no other test builds on: compiled here
    jaxgeom._compile.model_compile_options()  # the options checked before, not in the block
    with compilations() as compiled:
        one = FIM(t.apply_fn, t.params, (t.x, t.y), representation, **options)
    streamed = FIM(t.apply_fn, t.params, iter([(t.x, t.y)]), representation, **options)
    assert compiled == ["_finished"]
    chex.assert_trees_all_equal_structs(one, streamed)
    chex.assert_trees_all_close(one, streamed, rtol=1e-12, atol=1e-15)
    chunked = FIM(t.apply_fn, t.params, (t.x, t.y), representation, batch_size=4, **options)
    np.testing.assert_allclose(one.to_dense(), chunked.to_dense(), **TOL)


@pytest.mark.parametrize("representation, options",
                         [(r, {}) for r in ONE_CALL if r is not PMatLowRank]
                         + [(PMatEKFAC, {}), (PMatMixed, MIXED)],
                         ids=[r.__name__ for r in ONE_CALL if r is not PMatLowRank]
                         + ["PMatEKFAC", "PMatMixed"])
def test_data_of_any_size_up_to_batch_size_share_one_compiled_call(representation, options):
    """Data of one chunk padded to ``batch_size`` (``N ≤ batch_size``) are built by one
    program whatever ``N``: the number of examples is traced in it, not compiled in (it
    was, a program per size; the arrays' padding to ``batch_size`` rows is compiled per
    size, a copy); the matrix of each size is the unpadded build's. A
    ``PMatLowRank``'s rows are of the data's size: compiled per size (not here)."""
    t = make_linen_mlp(n=12)

    def build(n):
        return FIM(t.apply_fn, t.params, data[n], representation, batch_size=16, **options)

    data = {n: (t.x[:n], t.y[:n]) for n in (5, 7, 12)}
    build(5)  # compiled for chunks of 16
    for n in (7, 12):
        with compilations() as compiled:
            padded = build(n)
        assert set(compiled) <= {"_pad_rows"}  # only the data's padding to 16 rows
        whole = FIM(t.apply_fn, t.params, (t.x[:n], t.y[:n]), representation, **options)
        np.testing.assert_allclose(padded.to_dense(), whole.to_dense(), **TOL)


#: EKFAC alone, and as a part of a mixed matrix beside a part of one pass
EKFAC_CASES = [(PMatEKFAC, {}), (PMatMixed, dict(mapping={"Dense_0": PMatEKFAC,
                                                          "Dense_1": PMatDiag}))]


@pytest.mark.parametrize("representation, options", EKFAC_CASES, ids=["EKFAC", "PMatMixed"])
def test_each_pass_over_one_chunk_is_one_compiled_call(representation, options):
    """EKFAC's two passes over data of one chunk: one compiled call each (the factors'
    mean; the refitted diagonals), none of the streamed programs (zero total, step, mean,
    the finiteness gate between passes); the same matrix as the same batch streamed from
    an iterator, whose refit holds the bases it was given."""
    t = make_linen_mlp(n=11)  # data of a size no other test builds on: compiled here
    jaxgeom._compile.model_compile_options()
    with compilations() as compiled:
        one = FIM(t.apply_fn, t.params, (t.x, t.y), representation, **options)
    assert compiled.count("_finished") == 2
    assert not {"_zeros", "_update", "mean", "_finite_or_zero"} & set(compiled)
    streamed = FIM(t.apply_fn, t.params, iter([(t.x, t.y)]), representation, **options)
    chex.assert_trees_all_equal_structs(one, streamed)
    chex.assert_trees_all_close(one, streamed, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        one.to_dense(),
        FIM(t.apply_fn, t.params, (t.x, t.y), representation, batch_size=4,
            **options).to_dense(), **TOL)


def test_a_refit_on_one_chunk_keeps_the_bases_it_was_given():
    """``refit`` on data of one chunk (one compiled call) answers a matrix on the very
    arrays of the basis (a moving average of refits recognises one basis by them), with
    the diagonal refitted as streamed."""
    t = make_linen_mlp(n=11)
    basis = FIM(t.apply_fn, t.params, (t.x, t.y), PMatEKFAC, batch_size=4)
    params = jax.tree_util.tree_map(lambda p: 1.1 * p, t.params)
    one = basis.refit(t.apply_fn, params, (t.x[:6], t.y[:6]))
    streamed = basis.refit(t.apply_fn, params, iter([(t.x[:6], t.y[:6])]))
    for mine, theirs in zip(one.factors, basis.factors):
        assert mine.qg is theirs.qg and mine.qa is theirs.qa
    chex.assert_trees_all_close(one, streamed, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("representation", ONE_CALL + [PMatEKFAC], ids=lambda r: r.__name__)
def test_a_non_finite_input_of_one_chunk_is_named(representation):
    """The one-call build of one chunk still reads the chunk's finiteness flag."""
    t = make_linen_mlp(n=9)
    x = t.x.at[4, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match=r"examples 0\.\.8\b"):
        FIM(t.apply_fn, t.params, (x, t.y), representation)


def test_more_passes_compile_once_whatever_the_number_of_chunks():
    """EKFAC's second pass reads every chunk's finiteness flag: combined two at a time, a
    new number of chunks compiles nothing new."""
    t = make_linen_mlp(n=7)
    FIM(t.apply_fn, t.params, (t.x, t.y), PMatEKFAC, batch_size=1)
    with compilations() as compiled:
        FIM(t.apply_fn, t.params, [(t.x, t.y)] * 2, PMatEKFAC, batch_size=1)
    assert [name for name in compiled if "finite" in name or "stack" in name] == []


def test_forward_mode_equals_reverse_mode():
    t = make_linen_mlp()
    np.testing.assert_allclose(
        dense(t.apply_fn, t.params, t.x, mode="forward"),
        dense(t.apply_fn, t.params, t.x, mode="reverse"),
        **TOL,
    )


def test_fim_inside_jit_equals_eager():
    t = make_linen_mlp()

    @jax.jit
    def build(params, x):
        return FIM(t.apply_fn, params, (x,), PMatDense, batch_size=3)

    F = build(t.params, t.x)
    assert isinstance(F, PMatDense)
    np.testing.assert_allclose(F.to_dense(), dense(t.apply_fn, t.params, t.x), **TOL)


@pytest.mark.parametrize("representation", [
    PMatDense, jaxgeom.PMatBlockDiag, PMatDiag, PMatQuasiDiag, PMatKFAC, PMatEKFAC,
    PMatLowRank, "mixed"])
def test_chunks_inside_jit_are_one_scan_and_give_the_eager_build(representation):
    """Inside a ``jit`` the chunks of data in memory are streamed by one ``lax.scan`` (the
    step traced once, not once per chunk; a list of batches alike concatenated first):
    the exact and the Monte-Carlo Fisher (the same draws: keyed by example) equal the
    eager builds, for one batch of 11 examples in chunks of 3 (the last one padded) and
    for a list of two batches; the program, and the memory it takes besides its inputs
    and outputs (compiled for the two where it grew), do not grow with the number of
    chunks (unrolled, they grew with it: KFAC's 3.9, 14, 54 KB for 12, 48, 192 examples),
    nor with the number of batches (a scan per batch: 837 MiB of scratch for 16 batches of
    a dense build, 81 as one)."""
    t = make_linen_mlp(n=11)
    key = jax.random.PRNGKey(5)
    options = dict(batch_size=3)
    if representation == "mixed":
        representation = PMatMixed
        options["mapping"] = {"Dense_0": PMatKFAC, "Dense_1": PMatQuasiDiag}

    def builds(params, data):
        return (FIM(t.apply_fn, params, data, representation, **options),
                FIM_MonteCarlo(t.apply_fn, params, data, representation, key=key, trials=2,
                               **options))

    for data in ((t.x,), [(t.x[:8],), (t.x[8:],)]):
        jitted = jax.jit(builds)(t.params, data)
        for got, want in zip(jitted, builds(t.params, data)):
            assert type(got) is type(want)
            np.testing.assert_allclose(got.to_dense(), want.to_dense(), **TOL)

    def program(n):
        jaxpr = jax.make_jaxpr(builds)(t.params, (jnp.zeros((n, 3)),))
        return [e.primitive.name for e in jaxpr.eqns]

    def scratch_bytes(n):
        compiled = jax.jit(builds).lower(t.params, (jnp.zeros((n, 3)),)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert "scan" in program(11)
    assert program(11) == program(29)
    if representation in (PMatDense, PMatKFAC):  # two whole compilations: where it grew
        assert scratch_bytes(12) == scratch_bytes(48)

    def listed_program(batches):  # a list of batches alike: concatenated, one scan
        jaxpr = jax.make_jaxpr(builds)(t.params, [(jnp.zeros((4, 3)),)] * batches)
        return [e.primitive.name for e in jaxpr.eqns]

    assert listed_program(2) == listed_program(5)


def test_eager_grad_and_vmap_of_a_chunked_build_compile_once():
    """Under an eager ``grad`` or ``vmap`` (not inside a ``jit``) the chunks stay nested
    steps, each compiled once: a scan there is compiled again at every call (its body a
    new function each time; 1.5 s a call against 0.06 s). The gradient of the trace is
    the brute-force one."""
    t = make_plain_mlp()

    def trace(p):
        return FIM(t.apply_fn, p, t.x, PMatKFAC, variant="regression", batch_size=2).trace()

    grad, traces = jax.grad(trace), jax.vmap(trace)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), t.params)
    grad(t.params), traces(stacked)
    with compilations() as compiled:
        got = grad(t.params)
        traces(stacked)
    assert compiled == []
    want = jax.grad(lambda p: FIM(t.apply_fn, p, t.x, PMatKFAC, variant="regression").trace())(
        t.params)
    chex.assert_trees_all_close(got, want, rtol=1e-9)


@pytest.mark.parametrize("representation",
                         [PMatDiag, PMatKFAC, PMatDense, PMatLowRank, PMatImplicit])
def test_a_model_is_traced_once_per_function_and_shapes(representation):
    """Layer discovery, the output checks (the model's and the per-example function's) and
    the chunk step are traced from shapes: a second build with new parameter values calls
    the model's Python code no more; new data shapes trace it again, and the result is that
    of a fresh trace."""
    t = make_linen_mlp()
    traces = []

    def apply_fn(p, x):
        traces.append(x.shape)
        return t.apply_fn(p, x)

    first = FIM(apply_fn, t.params, t.x, representation)
    params2 = jax.tree_util.tree_map(lambda a: 1.5 * a, t.params)
    before = len(traces)
    second = FIM(apply_fn, params2, t.x, representation)
    assert len(traces) == before
    np.testing.assert_allclose(second.to_dense(),
                               FIM(t.apply_fn, params2, t.x, representation).to_dense(), **TOL)
    assert not np.allclose(first.to_dense(), second.to_dense())
    FIM(apply_fn, t.params, t.x[:3], representation)
    assert len(traces) > before


def test_a_first_build_captures_each_pass_once(monkeypatch):
    """The chunk statistics of a builder that sums them into its running total are traced
    once per pass: the shapes of its first total and its chunk step share the trace."""
    import jaxgeom.pmat.diag as diag_module
    import jaxgeom.pmat.ekfac as ekfac_module

    captures = []

    def counted(module):
        original = module.capture_chunk

        def capture_chunk(*args, **kwargs):
            captures.append(module.__name__)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, "capture_chunk", capture_chunk)

    counted(diag_module)
    counted(ekfac_module)
    t = make_linen_mlp(n=13)  # chunks of 9: shapes no other test builds, nothing traced yet
    FIM(t.apply_fn, t.params, t.x, PMatDiag, batch_size=9)
    assert captures == ["jaxgeom.pmat.diag"]
    FIM(t.apply_fn, t.params, t.x, PMatEKFAC, batch_size=9)  # its refit pass
    assert captures == ["jaxgeom.pmat.diag", "jaxgeom.pmat.ekfac"]


def test_second_moment_gives_the_empirical_fisher():
    t = make_linen_mlp()

    def losses(p, batch):
        x, y = batch
        logp = jax.nn.log_softmax(t.apply_fn(p, x))
        return -jnp.take_along_axis(logp, y[:, None], axis=1)

    M = SecondMoment(losses, t.params, (t.x, t.y), PMatDense, batch_size=4).to_dense()
    flat0, unravel = jax.flatten_util.ravel_pytree(t.params)

    def loss_n(flat, x, y):
        return losses(unravel(flat), (x[None], y[None]))[0, 0]

    g = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(flat0, t.x, t.y)
    np.testing.assert_allclose(M, g.T @ g / len(t.x), **TOL)


# ----------------------------------------------------------------------------- Monte Carlo
def _mc_error_bound(per_example_second_moments, fisher, n, trials):
    """RMS Frobenius error of the MC estimate: E‖F̂−F‖² = Σₙ(E‖gₙ‖⁴ − ‖Fₙ‖²)/(N²T)."""
    variance = sum(m4 - jnp.sum(fn**2) for m4, fn in per_example_second_moments)
    return float(jnp.sqrt(variance / (n**2 * trials)))


def _classif_moments(apply_fn, params, x):
    jac = flat_jacobian(apply_fn, params, x)
    moments = []
    for jn, out in zip(jac, apply_fn(params, x)):
        p = jax.nn.softmax(out)
        grads = (jnp.eye(len(p)) - p) @ jn  # row y: ∇ log p(y) = Jᵀ(e_y − p)
        m4 = jnp.sum(p * jnp.sum(grads**2, axis=1) ** 2)
        moments.append((m4, jn.T @ output_fisher("classif_logits", out) @ jn))
    return moments


def _regression_moments(apply_fn, params, x):
    moments = []
    for jn in flat_jacobian(apply_fn, params, x):
        a = jn @ jn.T  # ‖g‖² = ξᵀAξ, E(ξᵀAξ)² = (tr A)² + 2‖A‖²
        moments.append((jnp.trace(a) ** 2 + 2 * jnp.sum(a**2), jn.T @ jn))
    return moments


def _binary_moments(apply_fn, params, x):
    jac = flat_jacobian(apply_fn, params, x)
    moments = []
    for jn, out in zip(jac, apply_fn(params, x)):
        p = jax.nn.sigmoid(out)
        m4 = 0.0
        for y in itertools.product([0.0, 1.0], repeat=len(p)):
            y = jnp.array(y)
            prob = jnp.prod(jnp.where(y == 1, p, 1 - p))
            m4 += prob * jnp.sum(((y - p) @ jn) ** 2) ** 2
        moments.append((m4, jn.T @ output_fisher("classif_binary_logits", out) @ jn))
    return moments


@pytest.mark.parametrize(
    ("variant", "moments"),
    [
        ("classif_logits", _classif_moments),
        ("regression", _regression_moments),
        ("classif_binary_logits", _binary_moments),
    ],
)
def test_monte_carlo_converges_to_exact(variant, moments):
    t = make_plain_mlp(n=7)
    exact = reference_fisher(t.apply_fn, t.params, t.x, variant)
    n = len(t.x)
    errors = {}
    for trials in (1, 400):
        mc = FIM_MonteCarlo(
            t.apply_fn, t.params, t.x, PMatDense, key=jax.random.PRNGKey(0), variant=variant,
            trials=trials,
        ).to_dense()
        bound = _mc_error_bound(moments(t.apply_fn, t.params, t.x), exact, n, trials)
        errors[trials] = float(jnp.linalg.norm(mc - exact))
        # Markov: P(‖F̂−F‖ > 5·rms) ≤ 1/25 for each fixed key.
        assert errors[trials] < 5 * bound, (trials, errors[trials], bound)
    assert errors[400] < errors[1]


def _curvature_propagation_moments(apply_fn, params, x, variant):
    """Per example ``(E‖Bᵀr‖⁴, BᵀB)`` for the exact Fisher's output gradients ``B``
    (``K × d``) and Rademacher ``r``: with ``A = BBᵀ``, ``E(rᵀAr)² = (tr A)² + 2‖A‖² −
    2 Σₖ Aₖₖ²`` (a sign's fourth moment is 1, a normal's 3)."""
    outputs = FisherOutputs(Hashable(apply_fn), variant)
    whitener = jnp.eye(apply_fn(params, x[:1]).shape[-1]) if variant == "regression" else None
    moments = []
    for n in range(len(x)):
        jac = jax.jacrev(lambda p, n=n: outputs(p, x[n], n, whitener))(params)
        b = jnp.concatenate([j.reshape(j.shape[0], -1)
                             for j in jax.tree_util.tree_leaves(jac)], axis=1)
        a = b @ b.T
        m4 = jnp.trace(a) ** 2 + 2 * jnp.sum(a**2) - 2 * jnp.sum(jnp.diag(a) ** 2)
        moments.append((m4, b.T @ b))
    return moments


@pytest.mark.parametrize("variant", ["classif_logits", "regression", "classif_binary_logits"])
def test_curvature_propagation_converges_to_exact(variant):
    """Rademacher combinations of the exact Fisher's outputs: unbiased, each trial's error
    within the bound of its own fourth moments, shrinking with the trials; another
    estimate than sampled targets' (same key)."""
    t = make_plain_mlp(n=7)
    exact = reference_fisher(t.apply_fn, t.params, t.x, variant)
    moments = _curvature_propagation_moments(t.apply_fn, t.params, t.x, variant)
    kw = dict(key=jax.random.PRNGKey(0), variant=variant)
    errors = {}
    for trials in (1, 400):
        cp = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, trials=trials,
                            estimator="curvature_propagation", **kw).to_dense()
        bound = _mc_error_bound(moments, exact, len(t.x), trials)
        errors[trials] = float(jnp.linalg.norm(cp - exact))
        assert errors[trials] < 5 * bound, (trials, errors[trials], bound)
    assert errors[400] < errors[1]
    targets = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, trials=1, **kw).to_dense()
    assert not np.allclose(targets, exact, rtol=1e-3)


@pytest.mark.parametrize("variant, outputs", [
    ("classif_logits", 2), ("classif_binary_logits", 1), ("regression", 1)])
def test_curvature_propagation_is_exact_for_one_output(variant, outputs):
    """``K = 1`` (two classes, one logit, one regression output): ``r² = 1``, so one trial
    is the exact Fisher whatever the key, in every representation (KFAC's build too: the
    same captures) — where sampled targets are not."""
    t = make_plain_mlp(n=7)
    apply_fn = lambda p, x: t.apply_fn(p, x)[:, :outputs]  # noqa: E731
    exact = reference_fisher(apply_fn, t.params, t.x, variant)
    for key in (jax.random.PRNGKey(0), jax.random.PRNGKey(5)):
        kw = dict(key=key, variant=variant, trials=1)
        cp = FIM_MonteCarlo(apply_fn, t.params, t.x, PMatDense,
                            estimator="curvature_propagation", **kw)
        np.testing.assert_allclose(cp.to_dense(), exact, **TOL)
        kfac = FIM_MonteCarlo(apply_fn, t.params, t.x, PMatKFAC,
                              estimator="curvature_propagation", **kw)
        want = FIM(apply_fn, t.params, t.x, PMatKFAC, variant=variant)
        np.testing.assert_allclose(kfac.to_dense(), want.to_dense(), **TOL)
    targets = FIM_MonteCarlo(apply_fn, t.params, t.x, PMatDense, **kw).to_dense()
    assert not np.allclose(targets, exact, rtol=1e-3)


def test_curvature_propagation_does_not_depend_on_chunking_and_checks_its_name():
    t = make_linen_mlp(n=7)
    kw = dict(key=jax.random.PRNGKey(42), trials=2, estimator="curvature_propagation")
    whole = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, **kw).to_dense()
    chunked = FIM_MonteCarlo(t.apply_fn, t.params, [(t.x[:4],), (t.x[4:],)], PMatDense,
                             batch_size=3, **kw).to_dense()
    np.testing.assert_allclose(chunked, whole, **TOL)
    with pytest.raises(ValueError, match="unknown estimator 'rademacher'.*curvature_propagation"):
        FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, key=jax.random.PRNGKey(0),
                       estimator="rademacher")


def test_monte_carlo_does_not_depend_on_chunking_and_uses_the_key():
    t = make_linen_mlp(n=7)
    key = jax.random.PRNGKey(42)
    kw = dict(key=key, trials=2)
    whole = FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, **kw).to_dense()
    chunked = FIM_MonteCarlo(
        t.apply_fn, t.params, [(t.x[:4],), (t.x[4:],)], PMatDense, batch_size=3, **kw
    ).to_dense()
    np.testing.assert_allclose(chunked, whole, **TOL)
    other = FIM_MonteCarlo(
        t.apply_fn, t.params, t.x, PMatDense, key=jax.random.PRNGKey(1), trials=2
    ).to_dense()
    assert not np.allclose(other, whole)


@pytest.mark.parametrize("key, error, match", [
    (0, TypeError, r"a PRNG key, e.g. jax.random.key\(seed\).*got 0"),
    (None, TypeError, "a PRNG key.*got None"),
    (jnp.zeros(2), TypeError, "got an array of dtype float"),
    (jax.random.split(jax.random.PRNGKey(0), 3), ValueError, r"one PRNG key.*shape \(3, 2\)"),
    (jax.random.split(jax.random.key(0), 3), ValueError, r"one PRNG key.*shape \(3,\)"),
])
def test_monte_carlo_refuses_anything_but_one_key(key, error, match):
    t = make_plain_mlp(n=2)
    with pytest.raises(error, match="FIM_MonteCarlo's key must be .*" + match):
        FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDiag, key=key)


def test_a_function_returning_outputs_and_aux_is_named():
    """(outputs, aux), as Flax's mutable apply returns: the same message for FIM and
    SecondMoment (SecondMoment's had been "'tuple' object has no attribute 'shape'")."""
    t = make_plain_mlp(n=2)
    with pytest.raises(ValueError, match=r"^apply_fn must return one array of outputs"):
        FIM(lambda p, x: (t.apply_fn(p, x), 0.0), t.params, t.x, PMatDiag)
    with pytest.raises(ValueError, match=r"^fn\(params, batch\) must return one array"):
        SecondMoment(lambda p, b: (t.apply_fn(p, b[0]), 0.0), t.params, (t.x, t.y), PMatDiag)


def _segmentation_moments(apply_fn, params, x, samples=4000):
    """E‖gₙ‖⁴ by sampling label maps (no gradients needed: gₙ = Σ_p J_pᵀ(e_{y_p} − p_p))."""
    rng = np.random.default_rng(0)
    moments = []
    for jn, out in zip(flat_jacobian(apply_fn, params, x), apply_fn(params, x)):
        p = np.asarray(jax.nn.softmax(out.reshape(-1, out.shape[-1])))  # (P, C)
        jn = np.asarray(jn).reshape(p.shape + (-1,))  # (P, C, d)
        labels = (rng.random((samples, len(p), 1)) > np.cumsum(p, axis=1)).sum(-1)
        residual = np.eye(p.shape[1])[labels] - p  # (S, P, C)
        g = np.einsum("spc,pcd->sd", residual, jn)
        fisher_n = np.einsum("pcd,pce,pc->de", jn, jn, p) - np.einsum(
            "pcd,pc,pke,pk->de", jn, p, jn, p
        )
        moments.append((np.mean(np.sum(g**2, axis=1) ** 2), fisher_n))
    return moments


def test_monte_carlo_segmentation_converges_to_exact():
    apply_fn, params, x = make_segmentation()
    exact = reference_fisher(apply_fn, params, x, "segmentation_logits")
    trials = 100
    mc = FIM_MonteCarlo(
        apply_fn, params, x, PMatDense, key=jax.random.PRNGKey(0),
        variant="segmentation_logits", trials=trials,
    ).to_dense()
    bound = _mc_error_bound(_segmentation_moments(apply_fn, params, x), exact, len(x), trials)
    assert jnp.linalg.norm(mc - exact) < 5 * bound


def test_monte_carlo_logsoftmax_equals_logits():
    t = make_linen_mlp()
    log_probs = lambda p, x: jax.nn.log_softmax(t.apply_fn(p, x))  # noqa: E731
    kw = dict(key=jax.random.PRNGKey(5), trials=3)
    np.testing.assert_allclose(
        FIM_MonteCarlo(log_probs, t.params, t.x, PMatDense, variant="classif_logsoftmax", **kw)
        .to_dense(),
        FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, **kw).to_dense(),
        **TOL,
    )


# ----------------------------------------------------------------------------- bad input
def test_unknown_variant_lists_valid_ones():
    t = make_linen_mlp()
    with pytest.raises(ValueError, match="valid variants") as info:
        FIM(t.apply_fn, t.params, t.x, PMatDense, variant="classif")
    for v in VARIANTS:
        assert v in str(info.value)


@pytest.mark.parametrize(
    ("variant", "outputs"),
    [
        ("classif_logits", lambda o: o[:, 0]),
        ("classif_logits", lambda o: o[:, :1]),
        ("segmentation_logits", lambda o: o),
        ("regression", lambda o: o[:, :, None, None]),
        ("classif_logits", lambda o: o[:3]),
    ],
)
def test_outputs_that_do_not_fit_the_variant(variant, outputs):
    t = make_linen_mlp()
    with pytest.raises(ValueError, match="shape"):
        FIM(lambda p, x: outputs(t.apply_fn(p, x)), t.params, t.x, PMatDense, variant=variant)


@pytest.mark.parametrize("representation", [PMatDense, PMatImplicit])
def test_empty_data(representation):
    t = make_linen_mlp()
    with pytest.raises(ValueError, match="no batch"):
        FIM(t.apply_fn, t.params, [], representation)
    with pytest.raises(ValueError, match="no example"):
        FIM(t.apply_fn, t.params, t.x[:0], representation)
    with pytest.raises(ValueError, match="the data contains no example"):  # not "first batch"
        FIM(t.apply_fn, t.params, [t.x[:0], t.x[:0]], representation)
    with pytest.raises(ValueError, match=r"leaf \[0\]\[0\] is a scalar.*np.asarray"):
        FIM(t.apply_fn, t.params, (np.asarray(t.x).tolist(), t.y), representation)
    for batch_size in (0, True, 2.0, "4"):
        with pytest.raises(ValueError, match="batch_size must be a positive integer"):
            FIM(t.apply_fn, t.params, t.x, representation, batch_size=batch_size)


class _Unhashable:
    """A per-example function that cannot be a cache key (``__eq__`` without ``__hash__``)."""

    def __init__(self, fn):
        self.fn = fn

    def __eq__(self, other):
        return isinstance(other, _Unhashable) and other.fn is self.fn

    def __call__(self, *args):
        return self.fn(*args)


@pytest.mark.parametrize("representation", [PMatKFAC, PMatDense, PMatImplicit])
def test_an_unhashable_per_example_function_is_built_uncached(representation):
    """The capture plan and the output count are cached on the function: one that cannot
    be hashed is traced afresh, and gives the same matrix."""
    t = make_linen_mlp()
    # the same matrix from the public API: the outputs' Jacobians, whitened by I
    regression = FIM(t.apply_fn, t.params, t.x, representation, variant="regression",
                     batch_size=3)

    def per_example(p, x, index, aux):
        return t.apply_fn(p, x[None])[0]

    def build(fn):
        return representation.from_jacobians(
            fn, t.params, t.x, layer_collection=regression.layer_collection, batch_size=3
        ).to_dense()

    with pytest.raises(TypeError):
        hash(_Unhashable(per_example))
    np.testing.assert_allclose(build(_Unhashable(per_example)), build(per_example), **TOL)
    np.testing.assert_allclose(build(per_example), regression.to_dense(), **TOL)


def test_non_finite_outputs():
    t = make_plain_mlp()
    params = dict(t.params, b2=t.params["b2"].at[0].set(jnp.nan))
    with pytest.raises(FloatingPointError, match="non-finite"):
        FIM(t.apply_fn, params, t.x, PMatDense, batch_size=3)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
@pytest.mark.parametrize("where", ["huge", "ints", "small"])
def test_tree_finite_flags_one_non_finite_entry_and_never_overflows(bad, where):
    """``tree_finite`` (the chunks' flags) is ``all(isfinite(x))`` over every leaf: a leaf
    of float32 maxima (whose sum overflows) is finite, integer and empty leaves are, and
    one non-finite entry anywhere is not — eagerly and inside a ``jit``."""
    big = jnp.finfo(jnp.float32).max
    tree = {"huge": jnp.full((1000,), big, jnp.float32), "ints": jnp.arange(3),
            "empty": jnp.zeros((0, 4)), "small": jnp.ones((2, 3), jnp.float64)}
    for check in (tree_finite, jax.jit(tree_finite)):
        assert bool(check(tree))
        leaf = tree[where].astype(jnp.float32) if where == "ints" else tree[where]
        bad_tree = dict(tree, **{where: leaf.reshape(-1).at[1].set(bad).reshape(leaf.shape)})
        assert not bool(check(bad_tree))


BUILT_FROM_DATA = ["PMatDense", "PMatBlockDiag", "PMatDiag", "PMatKFAC", "PMatEKFAC",
                   "PMatQuasiDiag", "PMatLowRank"]


@pytest.mark.parametrize("representation", BUILT_FROM_DATA)
@pytest.mark.parametrize("make", [make_linen_mlp, make_linen_cnn], ids=["mlp", "cnn"])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_a_non_finite_input_names_its_chunk(representation, make, bad):
    """One non-finite input entry of the last example, in the short (padded) last chunk;
    an infinity may saturate a tanh, leaving the outputs finite: the first layer's
    gradient ``g ⊗ a`` (``0 · inf``) is not, and the build must say so."""
    t = make()
    n = t.x.shape[0]
    x = t.x.at[(n - 1,) + (0,) * (t.x.ndim - 1)].set(bad)
    last = (n - 1) // 3 * 3
    with pytest.raises(FloatingPointError, match=rf"examples {last}\.\.{n - 1}\b"):
        FIM(t.apply_fn, t.params, x, getattr(jaxgeom, representation), batch_size=3)
    with pytest.raises(FloatingPointError, match="non-finite"):
        FIM_MonteCarlo(t.apply_fn, t.params, x, getattr(jaxgeom, representation),
                       key=jax.random.PRNGKey(0), batch_size=3)


@pytest.mark.parametrize("representation", [PMatDense, PMatLowRank], ids=lambda r: r.__name__)
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_a_non_finite_input_names_its_chunk_in_forward_mode(representation, bad):
    """Forward mode reads the chunk's Jacobian and outputs for its flag (not captures)."""
    t = make_linen_mlp(n=9)
    x = t.x.at[7, 0].set(bad)
    with pytest.raises(FloatingPointError, match=r"examples 6\.\.8\b"):
        FIM(t.apply_fn, t.params, x, representation, mode="forward", batch_size=3)


@pytest.mark.parametrize("batch_size", [None, 3, 2], ids=["one-chunk", "3+3+3", "2+2+2+2+1"])
@pytest.mark.parametrize("where", [1, 7], ids=["first-chunk", "a-later-chunk"])
def test_the_flags_taken_out_of_a_trace_name_the_first_non_finite_chunk(batch_size, where,
                                                                        monkeypatch):
    """Inside a ``jit`` the chunks' flags of a build (one chunk, or a scan over chunks) are
    dropped unless the caller returns them (``run_with_flags``), as ``PMatImplicit``'s
    compiled ``get_diag`` does; checked on the host they raise the eager loop's error,
    naming the first non-finite chunk (an infinity follows it in the last example)."""
    t = make_linen_mlp(n=9)
    x = t.x.at[where, 0].set(jnp.nan).at[8, 0].set(jnp.inf)
    F = FIM(t.apply_fn, t.params, x, PMatImplicit, batch_size=batch_size)
    with pytest.raises(FloatingPointError) as compiled:
        F.get_diag()
    monkeypatch.setattr(PMatImplicit, "_compiles_eager_calls", lambda self: False)
    with pytest.raises(FloatingPointError) as eager:
        F.get_diag()
    assert str(compiled.value) == str(eager.value)
    first = 0 if batch_size is None else where // batch_size * batch_size
    last = 8 if batch_size is None else min(first + batch_size, 9) - 1
    assert f"examples {first}..{last}:" in str(eager.value)
    assert np.isnan(jax.jit(lambda F: F.trace())(F))  # inside a plain jit: no check


def _record_calls(monkeypatch, owner, name, events, label):
    """Patch ``owner.name`` to append ``label(*args)`` to ``events`` before each call."""
    original = getattr(owner, name)

    def recorded(*args, **kwargs):
        events.append(label(*args))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)


def _record_flag_reads(monkeypatch, events):
    """Record the offset of each chunk whose finiteness flag the host reads."""
    from jaxgeom import streaming

    _record_calls(monkeypatch, streaming, "check_finite", events,
                  lambda finite, offset, count: offset)


def test_a_pass_that_another_follows_is_not_waited_for(monkeypatch):
    """EKFAC's two passes: the chunks' finiteness flags (read on the host, which waits for
    the device) are all read after the second pass is dispatched, so that the factors'
    eigendecompositions in between are dispatched while the first pass computes."""
    from jaxgeom import streaming

    t = make_linen_mlp()
    events = []
    _record_calls(monkeypatch, streaming, "_reduce", events,
                  lambda builder, *args: type(builder).__name__)
    _record_flag_reads(monkeypatch, events)
    F = FIM(t.apply_fn, t.params, t.x, PMatEKFAC, batch_size=3)
    # 7 examples in chunks of 3: offsets 0, 3, 6 in each pass
    assert events == ["EKFACBuilder", "RefitBuilder", 0, 3, 6, 0, 3, 6]
    np.testing.assert_allclose(
        F.to_dense(), FIM(t.apply_fn, t.params, t.x, PMatEKFAC).to_dense(), **TOL)


def test_a_single_pass_is_finalized_before_its_flags_are_read(monkeypatch):
    """A build of one pass dispatches its ``finalize`` (the means) before the host waits
    for the chunks' finiteness flags, and a non-finite chunk still raises, naming it."""
    from jaxgeom.pmat.kfac import KFACBuilder

    t = make_linen_mlp()
    events = []
    _record_calls(monkeypatch, KFACBuilder, "finalize", events, lambda *args: "finalize")
    _record_flag_reads(monkeypatch, events)
    F = FIM(t.apply_fn, t.params, t.x, PMatKFAC, batch_size=3)
    assert events == ["finalize", 0, 3, 6]
    np.testing.assert_allclose(
        F.to_dense(), FIM(t.apply_fn, t.params, t.x, PMatKFAC).to_dense(), **TOL)
    events.clear()
    with pytest.raises(FloatingPointError, match=r"examples 3\.\.5\b"):
        FIM(t.apply_fn, t.params, t.x.at[4, 0].set(jnp.nan), PMatKFAC, batch_size=3)
    assert events == ["finalize", 0, 3]


def test_a_non_finite_first_pass_hands_on_zeros_and_names_its_chunk(monkeypatch):
    """The factors of a first pass with a non-finite chunk reach ``eigh`` as zeros (LAPACK
    never sees a NaN), and the error, raised once the flags are read, names the chunk."""
    from jaxgeom.pmat import kfac

    t = make_linen_mlp()
    x = t.x.at[4, 0].set(jnp.nan)
    factorised = []
    side_by_side = kfac.side_by_side

    def recorded(fn, jobs, orders, **options):
        factorised.extend(np.asarray(job.matrix) for job in jobs)
        return side_by_side(fn, jobs, orders, **options)

    monkeypatch.setattr(kfac, "side_by_side", recorded)
    with pytest.raises(FloatingPointError, match=r"examples 3\.\.5\b"):
        FIM(t.apply_fn, t.params, x, PMatEKFAC, batch_size=3)
    assert factorised and all(np.array_equal(m, np.zeros_like(m)) for m in factorised)


def test_a_first_pass_total_is_zeroed_only_for_builders_of_more_passes():
    """``finite_or_zero``: a builder of two passes (EKFAC's: its ``finalize`` factorises
    the total) reads zeros for a non-finite first pass; one of a single pass (e.g. a Dense
    member of the same group) its total unchanged (no pass over a large total)."""
    from jaxgeom.streaming import BuilderGroup, ChunkBuilder, _finite_or_zero, builder

    @builder
    class OnePass(ChunkBuilder):
        pass

    @builder
    class TwoPasses(ChunkBuilder):
        passes = 2

    group = BuilderGroup((TwoPasses(), OnePass()))

    def total():  # a fresh copy each time: the total is donated
        return ({"factors": jnp.arange(3.0)}, {"sum": jnp.full((2, 2), jnp.nan)})

    chex.assert_trees_all_equal(_finite_or_zero(group, jnp.bool_(True), total()), total())
    zeroed, kept = _finite_or_zero(group, jnp.bool_(False), total())
    chex.assert_trees_all_equal(zeroed, {"factors": jnp.zeros(3)})
    chex.assert_trees_all_equal(kept, total()[1])


@pytest.mark.parametrize("representation", BUILT_FROM_DATA)
def test_a_non_finite_parameter_is_reported(representation):
    t = make_linen_mlp()
    hidden = jax.tree_util.tree_map(lambda a: a, t.params)
    hidden["Dense_0"]["kernel"] = hidden["Dense_0"]["kernel"].at[0, 0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        FIM(t.apply_fn, hidden, t.x, getattr(jaxgeom, representation), batch_size=3)
    # regression's gradients do not depend on the outputs: a NaN output bias leaves them
    # finite, and the outputs themselves must be read
    last = jax.tree_util.tree_map(lambda a: a, t.params)
    last["Dense_1"]["bias"] = last["Dense_1"]["bias"].at[0].set(jnp.nan)
    with pytest.raises(FloatingPointError, match="non-finite"):
        FIM(t.apply_fn, last, t.x, getattr(jaxgeom, representation), variant="regression",
            batch_size=3)


def test_signatures_are_the_shapes_and_dtypes_jax_traces_with():
    """The cache key of a build's tracing work: equal for every kind of leaf JAX would trace
    with the same shape and dtype (arrays, key arrays, host arrays, their abstract values,
    tracers), different when a shape or a dtype differs."""
    from jaxgeom._signature import signature

    x = jnp.arange(6.0).reshape(2, 3)
    key = jax.random.key(0)
    tree = {"x": x, "key": key, "host": np.ones(4, np.float32)}
    shapes = jax.eval_shape(lambda t: t, tree)
    traced = []
    for _ in range(2):  # the second time through the classes learnt on the first
        assert signature(tree) == signature(shapes)
        jax.jit(lambda t: traced.append(signature(t)))(tree)
        assert traced[-1] == signature(shapes)
        assert signature(dict(tree, x=x[:1])) != signature(tree)
        assert signature(dict(tree, x=x.astype(jnp.int32))) != signature(tree)
        assert signature(dict(tree, key=jax.random.split(key))) != signature(tree)


def test_builders_of_different_classes_never_share_a_cache_key():
    """Diag and QuasiDiag builders hold the same capture plan and layout: their tree
    structures (the key of the cached shapes of a chunk's statistics) must still differ,
    or one would answer with the other's statistics."""
    from jaxgeom._signature import signature
    from jaxgeom.pmat.diag import DiagBuilder
    from jaxgeom.pmat.quasidiag import QuasiDiagBuilder

    t = make_linen_mlp()
    FIM(t.apply_fn, t.params, t.x, PMatDiag, batch_size=3)  # same plan, cached, for both
    diag = DiagBuilder(plan="plan", layout="layout")
    assert signature(diag) == signature(DiagBuilder(plan="plan", layout="layout"))
    assert signature(diag) != signature(QuasiDiagBuilder(plan="plan", layout="layout"))
    quasi = FIM(t.apply_fn, t.params, t.x, jaxgeom.PMatQuasiDiag, batch_size=3)
    np.testing.assert_allclose(quasi.get_diag(),
                               FIM(t.apply_fn, t.params, t.x, PMatDiag).get_diag(), **TOL)


def test_other_bad_arguments():
    t = make_plain_mlp()
    with pytest.raises(ValueError, match="covariance"):
        FIM(t.apply_fn, t.params, t.x, PMatDense, covariance=2.0)
    with pytest.raises(ValueError, match="covariance must be"):
        FIM(t.apply_fn, t.params, t.x, PMatDense, variant="regression", covariance=jnp.ones(3))
    with pytest.raises(ValueError, match="trials"):
        FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, key=jax.random.PRNGKey(0), trials=0)
    with pytest.raises(ValueError, match="trials"):  # a flag, not a count
        FIM_MonteCarlo(t.apply_fn, t.params, t.x, PMatDense, key=jax.random.PRNGKey(0), trials=True)
    with pytest.raises(ValueError, match="batch_size"):
        FIM(t.apply_fn, t.params, t.x, PMatDense, batch_size=0)
    with pytest.raises(ValueError, match="valid modes"):
        FIM(t.apply_fn, t.params, t.x, PMatDense, mode="sideways")
    with pytest.raises(TypeError, match="representation class"):
        FIM(t.apply_fn, t.params, t.x, "dense")
    with pytest.raises(ValueError, match=r"""disagree .*\['a'\]": \d+, "\['b'\]": 2"""):
        FIM(lambda p, x: t.apply_fn(p, x["a"]), t.params, ({"a": t.x, "b": t.x[:2]},), PMatDense)
    with pytest.raises(ValueError, match=r"leaf \['b'\] is a scalar"):
        FIM(lambda p, x: t.apply_fn(p, x["a"]), t.params, ({"a": t.x, "b": 1.0},), PMatDense)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        SecondMoment(lambda p, b: t.apply_fn(p, b[0])[:, 0], t.params, (t.x,), PMatDense)


@pytest.mark.parametrize("representation", [PMatDense, PMatKFAC, PMatDiag])
def test_no_recompilation_for_new_param_values_or_a_short_last_batch(representation):
    """A build with new parameter values compiles nothing; data whose last batch is shorter
    (chunks padded and masked) compiles only the tiny chunk-cutting functions of
    :mod:`jaxgeom.data` for the new batch shapes, never the chunk step."""
    t = make_linen_mlp(n=7)
    FIM(t.apply_fn, t.params, t.x, representation, batch_size=3)  # chunks of 3, 3, 1 (padded)
    moved = jax.tree_util.tree_map(lambda a: a + 0.1, t.params)
    with compilations() as compiled:
        FIM(t.apply_fn, moved, t.x, representation, batch_size=3)
    assert compiled == []
    batches = [t.x[:5], t.x[5:]]
    with compilations() as compiled:
        FIM(t.apply_fn, moved, batches, representation, batch_size=3)
    assert set(compiled) <= {"_window", "_pad_rows"} and len(compiled) <= 2, compiled


@pytest.mark.parametrize("representation", [PMatDense, PMatKFAC])
def test_empty_batches_are_skipped_first_ones_too(representation):
    t = make_linen_mlp()
    want = FIM(t.apply_fn, t.params, (t.x, t.y), representation).to_dense()
    empty = (t.x[:0], t.y[:0])
    for data in ([empty, (t.x, t.y)],
                 iter([empty, empty, (t.x[:3], t.y[:3]), (t.x[3:], t.y[3:])])):
        got = FIM(t.apply_fn, t.params, data, representation).to_dense()
        np.testing.assert_allclose(got, want, **TOL)


@pytest.mark.parametrize("covariance", [
    -1.0, np.inf, jnp.array([1.0, -1.0, 1.0, 1.0]), np.array([1.0, np.inf, 1.0, 1.0]),
    jnp.kron(jnp.array([[1.0, 2.0], [2.0, 1.0]]), jnp.eye(2)),  # eigenvalues 3 and -1
], ids=["negative scalar", "infinite scalar", "negative variance", "infinite variance",
        "indefinite matrix"])
@pytest.mark.parametrize("in_jit", [False, True], ids=["eager", "in a jit"])
def test_a_covariance_that_is_not_positive_definite(covariance, in_jit):
    """Also inside a ``jit`` that closes over it (an infinite variance whitens to a zero
    Fisher, a negative one to NaN)."""
    t = make_plain_mlp()
    build = lambda p: FIM(t.apply_fn, p, t.x, PMatDense, variant="regression",  # noqa: E731
                          covariance=covariance).to_dense()
    with pytest.raises(ValueError, match="covariance must be positive definite"):
        (jax.jit(build) if in_jit else build)(t.params)


def test_a_covariance_closed_over_by_a_jit():
    """A concrete (C, C) covariance (a JAX array, which the jit does not trace) is checked
    on the host and used as a constant; a traced one is used as it is."""
    t = make_linen_mlp()
    C = t.apply_fn(t.params, t.x).shape[-1]
    root = np.tril(np.ones((C, C))) + np.eye(C)
    covariance = jnp.asarray(root @ root.T)
    want = reference_fisher(t.apply_fn, t.params, t.x, variant="regression",
                            covariance=covariance)

    def build(params, cov):
        return FIM(t.apply_fn, params, (t.x, t.y), PMatDense, variant="regression",
                   covariance=cov).to_dense()

    np.testing.assert_allclose(jax.jit(lambda p: build(p, covariance))(t.params), want, **TOL)
    np.testing.assert_allclose(jax.jit(build)(t.params, covariance), want, **TOL)
    with pytest.raises(ValueError, match=r"symmetric.*L @ L.T"):
        jax.jit(lambda p: build(p, root))(t.params)
    # variances as a list holding traced values (learned noise levels)
    variances = np.arange(1.0, C + 1.0)
    want = reference_fisher(t.apply_fn, t.params, t.x, variant="regression",
                            covariance=variances)
    listed = jax.jit(lambda p, s: build(p, [s * v for v in variances]))(t.params, 1.0)
    np.testing.assert_allclose(listed, want, **TOL)


def test_a_covariance_that_is_not_symmetric_is_refused():
    """A factor L passed for Σ = LLᵀ: Cholesky reads one triangle, so it would be taken
    for another covariance."""
    t = make_linen_mlp()
    C = t.apply_fn(t.params, t.x).shape[-1]
    L = np.tril(np.ones((C, C))) + np.eye(C)
    with pytest.raises(ValueError, match=r"symmetric.*L @ L.T"):
        FIM(t.apply_fn, t.params, (t.x, t.y), PMatDense, variant="regression", covariance=L)
    np.testing.assert_allclose(
        dense(t.apply_fn, t.params, (t.x, t.y), variant="regression", covariance=L @ L.T),
        reference_fisher(t.apply_fn, t.params, t.x, variant="regression",
                         covariance=L @ L.T), **TOL)


def test_a_layer_collection_of_other_parameters_is_refused():
    t, other = make_plain_mlp(), make_linen_mlp()
    wrong = jaxgeom.LayerCollection.from_model(other.apply_fn, other.params, other.x)
    fn = lambda p, b: t.apply_fn(p, b)  # noqa: E731
    builds = [
        lambda: FIM(t.apply_fn, t.params, t.x, PMatDiag, layer_collection=wrong),
        lambda: SecondMoment(fn, t.params, t.x, PMatDense, layer_collection=wrong),
        lambda: jaxgeom.Hessian(lambda p, b: jnp.sum(t.apply_fn(p, b) ** 2), t.params, t.x,
                                PMatDense, layer_collection=wrong),
        lambda: jaxgeom.Jacobian(t.apply_fn, t.params, t.x, layer_collection=wrong),
    ]
    for build in builds:
        with pytest.raises(ValueError, match="layer_collection was made for other parameters"):
            build()


def test_examples_of_varying_shapes():
    """Sequences of two lengths in two batches: the Jacobian-based builds give the mean
    weighted by the examples; the capture-based ones, made for one shape, say so."""
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"W": jax.random.normal(keys[0], (3, 4)), "b": jax.random.normal(keys[1], (4,))}

    def apply_fn(p, x):  # (N, T, 3) -> (N, 4)
        return jnp.tanh(x @ p["W"] + p["b"]).mean(1)

    long, short = jax.random.normal(keys[2], (3, 5, 3)), jax.random.normal(keys[3], (2, 2, 3))
    for rep in (PMatDense, jaxgeom.PMatBlockDiag, PMatLowRank):
        got = FIM(apply_fn, params, [long, short], rep).to_dense()
        want = (3 * FIM(apply_fn, params, long, rep).to_dense()
                + 2 * FIM(apply_fn, params, short, rep).to_dense()) / 5
        np.testing.assert_allclose(got, want, **TOL)
    for rep in (PMatDiag, PMatKFAC, PMatEKFAC, jaxgeom.PMatQuasiDiag):
        with pytest.raises(ValueError, match=r"from 3 on have the shapes \[\(2, 3\)\]"):
            FIM(apply_fn, params, [long, short], rep)


@pytest.mark.parametrize("representation", [PMatDense, PMatDiag, PMatImplicit])
def test_gradient_of_a_build_eager_and_under_jit(representation):
    """``∇θ tr F(θ)`` through a build: eager ``jax.grad`` (whose steps cannot donate
    their buffers) and ``jit(grad)`` both equal the gradient of the brute-force trace.
    (Regression: its output covariance is constant; the softmax one is held constant in
    a build, ``stop_gradient``.)"""
    t = make_plain_mlp()

    def trace(p, rep):
        return FIM(t.apply_fn, p, t.x, rep, variant="regression").trace()

    want = jax.grad(lambda p: jnp.trace(reference_fisher(t.apply_fn, p, t.x, "regression")))(
        t.params)
    for grad in (jax.grad(trace), jax.jit(jax.grad(trace), static_argnums=1)):
        chex.assert_trees_all_close(grad(t.params, representation), want, rtol=1e-9)


@pytest.mark.parametrize("half", [jnp.bfloat16, jnp.float16])
def test_half_precision_parameters_are_refused_with_the_fix(half):
    """A build whose sums over examples would be kept in 8 or 11 significant bits (and
    whose factorisations LAPACK does not have) names the dtype and the float32 copy."""
    t = make_plain_mlp()
    params = jax.tree.map(lambda p: p.astype(half), t.params)
    fn = lambda p, b: t.apply_fn(p, b)  # noqa: E731
    builds = [
        lambda: FIM(t.apply_fn, params, (t.x, t.y), PMatDiag),
        lambda: FIM(t.apply_fn, params, (t.x, t.y), jaxgeom.PMatKFAC),
        lambda: FIM(t.apply_fn, params, (t.x, t.y), PMatImplicit),  # was accepted
        lambda: jaxgeom.FIM_MonteCarlo(t.apply_fn, params, (t.x, t.y), PMatDense,
                                       key=jax.random.PRNGKey(0)),
        lambda: SecondMoment(fn, params, t.x, PMatDense),
        lambda: jaxgeom.Hessian(lambda p, b: jnp.sum(t.apply_fn(p, b) ** 2), params, t.x,
                                PMatDense),
        # the function-space builds sum over parameters in their dtype too (were accepted)
        lambda: jaxgeom.Jacobian(t.apply_fn, params, t.x),
        lambda: jaxgeom.GramMatrix(t.apply_fn, params, t.x),
        lambda: jaxgeom.CrossGramMatrix(t.apply_fn, params, t.x, t.x),
    ]
    for build in builds:
        with pytest.raises(TypeError, match=rf"{jnp.dtype(half).name}.*astype\(jnp.float32\)"):
            build()


def test_a_model_computing_in_bfloat16_from_float32_parameters():
    """Mixed precision (Flax's dtype=bfloat16, param_dtype=float32): the float32 matrix
    of the bfloat16 computation, within bfloat16's resolution of the float32 one."""

    class MLP(nn.Module):
        dtype: Any = jnp.float32

        @nn.compact
        def __call__(self, x):
            x = nn.tanh(nn.Dense(8, dtype=self.dtype, param_dtype=jnp.float32)(x))
            return nn.Dense(3, dtype=self.dtype, param_dtype=jnp.float32)(x)

    x = jax.random.normal(jax.random.PRNGKey(1), (64, 4), jnp.float32)
    y = jax.random.randint(jax.random.PRNGKey(2), (64,), 0, 3)
    params = MLP().init(jax.random.PRNGKey(0), x)["params"]
    for rep in (PMatDiag, jaxgeom.PMatKFAC, PMatDense):
        half = FIM(lambda p, x: MLP(jnp.bfloat16).apply({"params": p}, x), params, (x, y), rep,
                   batch_size=8)
        full = FIM(lambda p, x: MLP().apply({"params": p}, x), params, (x, y), rep)
        assert half.to_dense().dtype == jnp.float32
        np.testing.assert_allclose(half.to_dense(), full.to_dense(), rtol=0.05,
                                   atol=0.05 * float(jnp.max(jnp.abs(full.to_dense()))))
