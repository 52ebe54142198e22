"""Shared helpers of the strip_and_shrink scenario tests (tests/test_shrink_*.py)."""

import keras
import numpy as np

from tf_psp.shrink import strip_and_shrink

L = keras.layers


def _randomize(model, seed=0):
    """Non-trivial biases and BatchNorm statistics."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c),
                               rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))


def _set_alpha(layer, alive):
    alive = np.asarray(alive, bool)
    layer.alpha.assign(np.where(alive, 1.0 + 0.1 * np.arange(alive.size).reshape(alive.shape), 0.0))


def _checksum(model):
    return [w.copy() for w in model.get_weights()]


def _check(model, x, expected):
    before = _checksum(model)
    shrunk, report = strip_and_shrink(model, return_report=True)
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    assert out.shape == ref.shape
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    for layer in shrunk._flatten_layers(include_self=False):
        assert not type(layer).__module__.startswith("tf_psp")
    widths = {row["name"]: row["channels_after"] for row in report.to_dict()["layers"]}
    for name, width in expected.items():
        assert widths[name] == width, (name, str(report))
    for a, b in zip(before, _checksum(model)):
        np.testing.assert_array_equal(a, b)
    return shrunk, report
