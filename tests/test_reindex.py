"""Static re-indexing (``jaxgeom._reindex``): pieces of the flat axis taken and put back by
slices, reshapes and transposes, equal to the gathers they replace."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxgeom._reindex import FlatPartition, LeafVector, _Gather, _Runs, _View, regular_form

# a flat layout: an HWIO convolution kernel (3, 3, 4, 5), its bias, a Flax dense kernel
# (6, 7) and two more leaves
CONV = np.arange(180).reshape(3, 3, 4, 5)
D = 180 + 5 + 42 + 5 + 6


def _layer_pieces():
    conv_matrix = np.transpose(CONV, (3, 0, 1, 2)).reshape(5, 36)  # (out, h·w·in)
    bias = 180 + np.arange(5)
    dense_matrix = (185 + np.arange(42).reshape(6, 7)).T  # (out, in)
    rest = np.concatenate([227 + np.arange(5), 232 + np.arange(6)])
    return [conv_matrix, bias, dense_matrix, rest]


@pytest.mark.parametrize("lead", [(), (3,), (2, 3)])
def test_split_is_the_gather_and_merge_its_inverse(lead):
    x = np.random.default_rng(0).normal(size=lead + (D,))
    partition = FlatPartition.of(_layer_pieces(), D)
    assert [type(f) for f in partition.forms] == [_View, _Runs, _View, _Runs]
    parts = partition.split(jnp.asarray(x))
    for part, index in zip(parts, partition.pieces):
        np.testing.assert_array_equal(part, x[..., index])
    np.testing.assert_array_equal(partition.merge(parts), x)


def test_irregular_pieces_are_gathered():
    x = np.random.default_rng(1).normal(size=(2, D))
    order = np.random.default_rng(2).permutation(D)
    partition = FlatPartition.of([order[:100].reshape(10, 10), order[100:]], D)
    assert all(isinstance(f, _Gather) for f in partition.forms)
    parts = partition.split(jnp.asarray(x))
    for part, index in zip(parts, partition.pieces):
        np.testing.assert_array_equal(part, x[..., index])
    np.testing.assert_array_equal(partition.merge(parts), x)


def test_regular_forms():
    # a transposed block with a size-1 axis
    index = np.arange(24).reshape(2, 3, 4).transpose(2, 0, 1)[:, None]
    form = regular_form(index)
    assert isinstance(form, _View) and form.memory_shape == (2, 3, 4)
    np.testing.assert_array_equal(form.take(jnp.arange(30.0)), np.arange(30.0)[index])
    assert regular_form(np.array([4, 5, 6, 0, 1])) == _Runs(((4, 3), (0, 2)))
    assert regular_form(np.arange(12).reshape(3, 4)[:, ::-1]) is None  # reversed: no view
    assert regular_form(np.arange(12).reshape(3, 4)[:, :2]) is None  # not one run


def test_pieces_must_partition_the_flat_axis():
    with pytest.raises(ValueError, match="partition"):
        FlatPartition.of([np.arange(3), np.arange(2, 5)], 5)
    with pytest.raises(ValueError, match="partition"):
        FlatPartition.of([np.arange(3)], 5)


def test_a_vector_held_as_leaves_splits_and_merges_like_the_flat_one():
    """Pieces are taken from the leaves (a piece spanning two leaves is concatenated) and
    merged back into leaves of the same bounds."""
    x = np.random.default_rng(3).normal(size=D)
    bounds = (0, 100, 180, 185, 227, 232, D)  # one leaf boundary inside the conv kernel
    leaves = LeafVector.of([x[a:b] for a, b in zip(bounds[:-1], bounds[1:])], bounds)
    assert leaves.shape == (D,)
    for pieces in (_layer_pieces(), [np.random.default_rng(4).permutation(D)]):
        partition = FlatPartition.of(pieces, D)
        parts = partition.split(leaves)
        for part, index in zip(parts, partition.pieces):
            np.testing.assert_array_equal(part, x[index])
        merged = partition.merge(parts, like=leaves)
        assert merged.offsets == bounds
        for (a, b), leaf in zip(zip(bounds[:-1], bounds[1:]), merged.leaves):
            np.testing.assert_array_equal(leaf, x[a:b])
