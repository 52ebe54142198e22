"""input_shape= for models with None dimensions (sequence models, BERT-like token inputs):
`profile`, `prune_to_budget`, `PruneToBudget` and `tf_psp.prune` count MACs for inputs of the
given shape (prune reads it from its data); without it they refuse, naming the inputs.

Oracle: `profile` of the shrunk model at the same shape against the budget (the plan's
count must equal what the shrink delivers), MACs counted by hand, and the pruned PSP model's
outputs at sequence lengths other than the one counted.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp.functional import relative_error

L = keras.layers
LENGTH, FEATURES, HIDDEN = 12, 8, 32


def _sequence_model():
    """Per-position MLP over a sequence of unknown length, then mean over time."""
    inputs = keras.Input((None, FEATURES), name="frames")
    h = L.Dense(HIDDEN, activation="relu", name="up")(inputs)
    h = L.Dense(HIDDEN, activation="relu", name="mid")(h)
    h = L.GlobalAveragePooling1D(name="mean")(h)
    outputs = L.Dense(4, name="head")(h)
    return keras.Model(inputs, outputs, name="seq")


def _hand_macs(length, up=HIDDEN, mid=HIDDEN):
    return length * (FEATURES * up + up * mid) + mid * 4


def test_profile_counts_the_given_length_and_names_the_unknown_input():
    model = _sequence_model()
    with pytest.raises(ValueError, match=r"'frames' \(None, None, 8\).*input_shape="):
        tf_psp.profile(model)
    assert tf_psp.profile(model, input_shape=(LENGTH, FEATURES)).total_macs == _hand_macs(LENGTH)


def test_prune_to_budget_refuses_without_input_shape_naming_the_input():
    with pytest.raises(ValueError, match=r"'frames' \(None, None, 8\).*input_shape="):
        tf_psp.prune_to_budget(_sequence_model(), 0.5, importance="random")


def test_prune_to_budget_with_input_shape_meets_the_budget_at_that_shape():
    model = _sequence_model()
    shape = (LENGTH, FEATURES)
    pruned, report = tf_psp.prune_to_budget(model, 0.5, importance="random", input_shape=shape,
                                            return_report=True, measure=True)
    shrunk = tf_psp.strip_and_shrink(pruned)
    dense = tf_psp.profile(model, shape).total_macs
    kept = tf_psp.profile(shrunk, shape).total_macs / dense
    assert report.dense_macs == dense == _hand_macs(LENGTH)
    assert 0.45 <= kept <= 0.5
    assert report.kept_macs == pytest.approx(kept)
    # the hand count of the shrunk widths, at another length the model still accepts
    up, mid = shrunk.get_layer("up").units, shrunk.get_layer("mid").units
    assert tf_psp.profile(shrunk, (5, FEATURES)).total_macs == _hand_macs(5, up, mid)
    for length in (LENGTH, 5):
        x = np.random.default_rng(length).normal(size=(3, length, FEATURES)).astype("float32")
        assert relative_error(pruned(x), shrunk(x)) <= 1e-5


def test_prune_reads_the_input_shape_from_its_data():
    model = _sequence_model()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, LENGTH, FEATURES)).astype("float32")
    y = rng.integers(0, 4, size=32)
    model.compile(optimizer="sgd",
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    small, report = tf_psp.prune(model, (x, y), keep_macs=0.5, epochs=2, batch_size=16,
                                 importance="l1", verbose=0, jit_compile=False)
    assert report.input_shape == (LENGTH, FEATURES)
    assert report.dense_macs == _hand_macs(LENGTH)
    assert report.shrunk_macs == tf_psp.profile(small, (LENGTH, FEATURES)).total_macs
    assert report.kept_macs <= 0.5
