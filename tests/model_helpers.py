"""Shared helpers of the tests: random weights, and proof that a model was not modified."""

import numpy as np


def randomize_weights(model, seed=0):
    """Gives every weight random values (BatchNorm variances positive); returns the model."""
    rng = np.random.default_rng(seed)
    model.set_weights([
        np.abs(rng.normal(size=v.shape)) + 0.5 if "variance" in v.path
        else rng.normal(scale=0.3, size=v.shape)
        for v in model.weights
    ])
    return model


def weights_snapshot(model):
    """Copies of all of the model's weights."""
    return [np.array(w).copy() for w in model.get_weights()]


def assert_weights_unchanged(before, model):
    """Fails unless `model`'s weights equal the `weights_snapshot` taken before."""
    after = model.get_weights()
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
