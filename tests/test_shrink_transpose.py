"""Conv*DTranspose as a producer: input and output channels prunable, kernel [*k, out, in]."""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import _shrink_and_compare as _check
from conftest import randomize_biases_and_batchnorm as _randomize
from conftest import set_alpha as _set_alpha

L = keras.layers


def _decoder(layer_cls, shape):
    inputs = keras.Input(shape)
    h = tf_psp.PSPConv2D(6, 1, structure="filter", name="c1")(inputs) if len(shape) == 3 else \
        tf_psp.PSPConv1D(6, 1, structure="filter", name="c1")(inputs)
    h = L.ReLU(name="r1")(h)
    h = layer_cls(5, 3, strides=2, padding="same", name="up")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="r2")(h)
    h = (tf_psp.PSPConv2D if len(shape) == 3 else tf_psp.PSPConv1D)(
        4, 1, structure="channel", name="c2")(h)
    model = keras.Model(inputs, h)
    _randomize(model)
    return model


@pytest.mark.parametrize("layer_cls, shape", [(L.Conv2DTranspose, (4, 4, 3)),
                                              (L.Conv1DTranspose, (6, 3))],
                         ids=["2d", "1d"])
def test_transpose_conv_shrinks_inputs_and_outputs(layer_cls, shape):
    model = _decoder(layer_cls, shape)
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1, 0, 1])  # dead filters: constant 0 after ReLU
    _set_alpha(model.get_layer("c2"), [1, 0, 1, 1, 0])  # c2 ignores 'up' outputs 1 and 4
    x = np.random.default_rng(0).normal(size=(2,) + shape).astype("float32")
    shrunk, _ = _check(model, x, {"c1": 4, "up": 3, "bn": 3, "c2": 4})
    kernel = shrunk.get_layer("up").kernel
    assert tuple(kernel.shape[-2:]) == (3, 4)  # [*k, out, in]
    assert tf_psp.profile(shrunk).total_macs < tf_psp.profile(model).total_macs


def test_nonzero_constant_into_transpose_conv_is_kept():
    inputs = keras.Input((4, 4, 3))
    h = tf_psp.PSPConv2D(4, 1, structure="filter", name="c1")(inputs) + 1.0
    h = L.Conv2DTranspose(3, 3, strides=2, padding="same", name="up")(h)
    model = keras.Model(inputs, h)
    _randomize(model)
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1])
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype("float32")
    _, report = _check(model, x, {"c1": 4})
    assert "cannot fold its constant" in str(report)


def test_group_coupling_reads_through_transpose_conv():
    model = _decoder(L.Conv2DTranspose, (4, 4, 3))
    psp = tf_psp.parameterize(tf_psp.strip(model), coupling="group")
    gate = psp.get_layer("psp_group_alphas")
    rng = np.random.default_rng(0)
    for v in gate.group_alphas:
        values = np.where(rng.random(v.shape) < 0.5, 0.0, 1.0 + rng.random(v.shape))
        v.assign(values.astype("float32"))
    x = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    shrunk = tf_psp.strip_and_shrink(psp)
    ref, out = (keras.ops.convert_to_numpy(m(x, training=False)) for m in (psp, shrunk))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert shrunk.get_layer("up").kernel.shape[-1] < 6  # some input channels of 'up' went
