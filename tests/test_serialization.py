"""PSP models survive .keras round trips (alpha included) and export as SavedModel."""

import os

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import regularizers


def _model():
    inputs = keras.Input((8, 8, 3))
    x = tf_psp.PSPConv2D(6, 3, padding="same", structure="column", name="c",
                         alpha_regularizer=regularizers.L1(1e-3))(inputs)
    x = tf_psp.PSPDepthwiseConv2D(3, depth_multiplier=2, structure="filter", name="dw")(x)
    x = tf_psp.PSPSeparableConv2D(5, 3, structure="channel", name="sep",
                                  alpha_constraint=regularizers.FixedSparsity(0.2))(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = tf_psp.PSPDense(4, structure="layer", epsilon=0.05, name="d")(x)
    model = keras.Model(inputs, outputs)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if tf_psp.is_psp_layer(layer):
            alpha = rng.uniform(-1, 1, size=layer.alpha.shape).astype("float32")
            layer.alpha.assign(alpha)
    return model


def test_keras_round_trip_keeps_alphas_and_outputs(tmp_path):
    model = _model()
    path = str(tmp_path / "psp.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(loaded(x)),
                                  keras.ops.convert_to_numpy(model(x)))
    for layer in model.layers:
        if tf_psp.is_psp_layer(layer):
            twin = loaded.get_layer(layer.name)
            assert type(twin) is type(layer)
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(twin.alpha),
                                          keras.ops.convert_to_numpy(layer.alpha))
            assert twin.get_config() == layer.get_config()
    assert isinstance(loaded.get_layer("c").alpha_regularizer, regularizers.L1)
    assert isinstance(loaded.get_layer("sep").alpha_constraint, regularizers.FixedSparsity)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="SavedModel export needs TF")
def test_export_saved_model(tmp_path):
    import tensorflow as tf

    model = _model()
    path = str(tmp_path / "saved")
    model.export(path, verbose=False)
    assert os.path.exists(os.path.join(path, "saved_model.pb"))
    reloaded = tf.saved_model.load(path)
    x = np.random.default_rng(2).normal(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(reloaded.serve(x).numpy(), keras.ops.convert_to_numpy(model(x)),
                               rtol=1e-5, atol=1e-6)
