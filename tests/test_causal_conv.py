"""PSPConv1D(padding='causal') and the shrinking of a causal TCN.

Oracles: keras.layers.Conv1D with the same weights (alpha = 1), and the PSP
model itself for the shrunk model.
"""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import _shrink_and_compare as _check
from conftest import infer as _infer
from conftest import randomize_biases_and_batchnorm as _randomize
from conftest import set_alpha as _set_alpha

L = keras.layers


@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
@pytest.mark.parametrize("dilation", [1, 3])
def test_causal_psp_conv1d_equals_keras_conv1d(dilation, data_format):
    kwargs = {"filters": 5, "kernel_size": 3, "padding": "causal", "dilation_rate": dilation,
              "data_format": data_format}
    shape = (11, 4) if data_format == "channels_last" else (4, 11)
    x = np.random.default_rng(0).normal(size=(2,) + shape).astype("float32")
    plain, psp = L.Conv1D(**kwargs), tf_psp.PSPConv1D(**kwargs)
    _infer(plain, x)  # builds both (through XLA where this CPU cannot run NCHW)
    _infer(psp, x)
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=w.shape).astype("float32") for w in plain.get_weights()]
    plain.set_weights(weights)
    psp.kernel.assign(weights[0])
    psp.bias.assign(weights[1])
    ref, out = (_infer(layer, x) for layer in (plain, psp))
    assert out.shape == ref.shape == (2,) + ((11, 5) if data_format == "channels_last" else (5, 11))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    # causal: the first output step sees only the first input step
    x2 = x.copy()
    time_axis = 1 if data_format == "channels_last" else 2
    np.moveaxis(x2, time_axis, 0)[1:] += 1.0
    first = np.take(_infer(psp, x2), 0, axis=time_axis)
    np.testing.assert_allclose(first, np.take(out, 0, axis=time_axis), rtol=1e-6)


def _tcn():
    inputs = keras.Input((16, 3))
    h = tf_psp.PSPConv1D(8, 3, padding="causal", structure="filter", name="c0")(inputs)
    h = L.ReLU(name="r0")(h)
    for d in (1, 2, 4):
        y = tf_psp.PSPConv1D(8, 3, padding="causal", dilation_rate=d, structure="filter",
                             name=f"c{d}a")(h)
        y = L.ReLU(name=f"r{d}")(y)
        y = tf_psp.PSPConv1D(8, 1, structure="channel", name=f"c{d}b")(y)
        h = L.Add(name=f"add{d}")([h, y])
    outputs = L.Dense(2, name="head")(L.GlobalAveragePooling1D(name="gap")(h))
    model = keras.Model(inputs, outputs)
    _randomize(model)
    return model


def test_causal_tcn_shrinks_exactly():
    model = _tcn()
    dead = {"c1a": {0, 3, 5}, "c2a": {1, 2}, "c4a": {7}}
    for name, chans in dead.items():
        _set_alpha(model.get_layer(name), [0 if c in chans else 1 for c in range(8)])
    x = np.random.default_rng(0).normal(size=(2, 16, 3)).astype("float32")
    # a dead causal filter outputs relu(bias), folded into the 1x1 conv after it
    shrunk, _ = _check(model, x, {"c1a": 5, "c2a": 6, "c4a": 7, "c0": 8})
    assert shrunk.get_layer("c1a").padding == "causal"
    assert tf_psp.profile(shrunk).total_macs < tf_psp.profile(model).total_macs


def test_constant_into_causal_conv_is_kept():
    # the left zero padding differs from a constant input: not foldable exactly
    inputs = keras.Input((10, 3))
    h = tf_psp.PSPConv1D(4, 1, structure="filter", name="c1")(inputs) + 1.0
    h = tf_psp.PSPConv1D(4, 3, padding="causal", structure="channel", name="c2")(h)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.Flatten(name="flat")(h)))
    _randomize(model)
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1])
    x = np.random.default_rng(0).normal(size=(2, 10, 3)).astype("float32")
    _, report = _check(model, x, {"c1": 4})
    assert "cannot fold its constant" in str(report)
