"""PSPConv2DTranspose: kernel [kh, kw, out, in], alphas shaped as for a Conv2D reading
the same input. Oracles: a plain Conv2DTranspose with a hand-scaled kernel, the PSP
model itself after shrinking, and hand-counted MACs."""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import structures

from conftest import randomize_weights

L = keras.layers
CONFIG = {"filters": 4, "kernel_size": 3, "strides": 2, "padding": "same"}
SHAPES = {"channel": (3,), "filter": (4,), "column": (3, 3, 3), "layer": ()}


def _layer(structure, seed=0):
    rng = np.random.default_rng(seed)
    layer = tf_psp.PSPConv2DTranspose(**CONFIG, structure=structure,
                                      bias_initializer="random_normal")
    x = rng.normal(size=(2, 5, 5, 3)).astype("float32")
    layer(x)
    alpha = rng.uniform(0.5, 1.5, size=layer.alpha.shape).astype("float32")
    if alpha.ndim:
        alpha.flat[::2] = 0.0  # pruned structures
    layer.alpha.assign(alpha)
    return layer, x, alpha


def _hand_scaled(layer, alpha):
    kernel, bias = (np.array(keras.ops.convert_to_numpy(w)) for w in (layer.kernel, layer.bias))
    if layer.structure == "channel":
        kernel = kernel * alpha.reshape(1, 1, 1, -1)  # input channels: the last axis
    elif layer.structure == "filter":
        kernel = kernel * alpha.reshape(1, 1, -1, 1)  # output channels: axis -2
        bias = bias * alpha
    elif layer.structure == "column":
        kernel = kernel * alpha[:, :, None, :]
    else:
        kernel, bias = kernel * alpha, bias * alpha
    plain = L.Conv2DTranspose(**CONFIG)
    plain.build((None, 5, 5, 3))
    plain.set_weights([kernel, bias])
    return plain


@pytest.mark.parametrize("structure", structures.STRUCTURES)
def test_forward_equals_hand_scaled_kernel(structure):
    layer, x, alpha = _layer(structure)
    assert layer.alpha.shape == SHAPES[structure]
    expected = keras.ops.convert_to_numpy(_hand_scaled(layer, alpha)(x))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer(x)), expected, rtol=1e-5, atol=1e-5)
    to_plain = layer.to_plain()
    assert type(to_plain) is L.Conv2DTranspose
    np.testing.assert_allclose(keras.ops.convert_to_numpy(to_plain(x)), expected,
                               rtol=1e-5, atol=1e-5)


def test_alpha_one_equals_keras_layer():
    layer, x, _ = _layer("channel")
    layer.alpha.assign(np.ones(3, "float32"))
    plain = L.Conv2DTranspose(**CONFIG)
    plain.build(x.shape)
    plain.set_weights(layer.get_weights()[:-1])
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-6, atol=1e-6)


def _decoder():
    inputs = keras.Input((4, 4, 3))
    h = L.Conv2D(6, 1, name="c1")(inputs)
    h = L.ReLU(name="r1")(h)
    h = L.Conv2DTranspose(5, 3, strides=2, padding="same", name="up")(h)
    h = L.BatchNormalization(name="bn")(h)
    h = L.ReLU(name="r2")(h)
    model = keras.Model(inputs, L.Conv2D(2, 1, name="c2")(h))
    return randomize_weights(model)


@pytest.mark.parametrize("structure", ["channel", "filter"])
def test_parameterized_decoder_shrinks_exactly(structure, tmp_path):
    psp = tf_psp.parameterize(_decoder(), structure=structure)
    up = psp.get_layer("up")
    assert type(up) is tf_psp.PSPConv2DTranspose
    n = up.alpha.shape[0]
    up.alpha.assign(np.array([0.0 if i % 2 else 1.0 for i in range(n)], "float32"))
    x = np.random.default_rng(1).normal(size=(2, 4, 4, 3)).astype("float32")
    shrunk = tf_psp.strip_and_shrink(psp)
    ref, out = (keras.ops.convert_to_numpy(m(x, training=False)) for m in (psp, shrunk))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    kernel = shrunk.get_layer("up").kernel.shape  # [kh, kw, out, in]
    assert kernel[-1 if structure == "channel" else -2] == n - n // 2
    # pruned MACs, hand-counted: each kernel entry of a transposed conv is used once per
    # *input* position (4 x 4); the dead structures are n // 2 of n
    row = {r.name: r for r in tf_psp.profile(psp).layers}["up"]
    assert row.macs == 4 * 4 * 3 * 3 * 5 * 6
    assert row.pruned_macs == row.macs * (n // 2) // n
    path = tmp_path / "psp.keras"
    psp.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_array_equal(loaded.get_layer("up").alpha.numpy(), up.alpha.numpy())
    np.testing.assert_allclose(loaded(x, training=False), ref, rtol=1e-6, atol=1e-6)
