"""strip_and_shrink on keras.applications models with half of every layer's alphas pruned.

Oracle: the PSP model itself (inference mode). Each shrunk model must match it,
have fewer MACs, and convert to TFLite.
"""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import randomize_biases_and_batchnorm

APPLICATIONS = {
    "MobileNetV2": lambda: keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10),
    "ResNet50": lambda: keras.applications.ResNet50(
        input_shape=(32, 32, 3), weights=None, classes=10),
    "DenseNet121": lambda: keras.applications.DenseNet121(
        input_shape=(32, 32, 3), weights=None, classes=10),
    "EfficientNetB0": lambda: keras.applications.EfficientNetB0(
        input_shape=(32, 32, 3), weights=None, classes=10),
}


def _prune_half(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if tf_psp.is_psp_layer(layer):
            alpha = np.ones(layer.alpha.shape, "float32")
            if alpha.ndim:
                alpha[rng.random(alpha.shape) < 0.5] = 0.0
                alpha.flat[rng.integers(alpha.size)] = 1.0  # never a whole layer
            layer.alpha.assign(alpha)


@pytest.mark.slow  # a sweep over keras.applications (DenseNet121 alone takes a minute)
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_application_shrinks_exactly_and_converts(name, tmp_path):
    psp = tf_psp.parameterize(APPLICATIONS[name](), structure="channel")
    randomize_biases_and_batchnorm(psp)
    _prune_half(psp)
    shrunk = tf_psp.strip_and_shrink(psp)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(psp(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    assert tf_psp.profile(shrunk).total_macs < tf_psp.profile(psp).total_macs
    assert not any(tf_psp.is_psp_layer(layer) for layer in shrunk.layers)

    from tf_psp import export

    result = export.export_tflite(shrunk, str(tmp_path / "m.tflite"), probe=x)
    assert result.max_rel_error <= 1e-4
