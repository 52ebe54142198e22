"""The user route: shrunk model -> SavedModel -> the `tflite_convert` script -> LiteRT.

`tflite_convert --keras_model_file` does not work with Keras 3; the route that
works is `--saved_model_dir` on a SavedModel written by `model.export()`
(`tf_psp.export.export_saved_model`). This test runs the console script the
way a user would and checks the result against Keras.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import export as tf_psp_export

from conftest import randomize_weights

TFLITE_CONVERT = os.path.join(os.path.dirname(sys.executable), "tflite_convert")

pytestmark = [
    pytest.mark.slow,  # runs the tflite_convert script in a subprocess
    pytest.mark.skipif(
        keras.backend.backend() != "tensorflow",
        reason="tflite_convert needs the TensorFlow backend",
    ),
    pytest.mark.skipif(
        not os.path.exists(TFLITE_CONVERT),
        reason=f"the tflite_convert console script is not installed next to "
        f"{sys.executable} (it ships with the tensorflow wheel)",
    ),
]


def _psp_model():
    inputs = keras.Input((10, 10, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU(name="relu1")(x)
    x = keras.layers.Conv2D(12, 3, name="c2")(x)
    x = keras.layers.ReLU(name="relu2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(5, name="fc")(x)
    model = keras.Model(inputs, outputs, name="convert_me")
    randomize_weights(model)
    psp = tf_psp.parameterize(model, structure="channel")
    for name in ("c2", "fc"):
        layer = psp.get_layer(name)
        alpha = np.array(layer.alpha.numpy())
        alpha.reshape(-1)[: alpha.size // 2] = 0.5 * layer.epsilon
        layer.alpha.assign(alpha)
    return psp


def _plain_model(psp):
    """The shrunk model, or the stripped one while `tf_psp.shrink` is missing."""
    try:
        from tf_psp.shrink import strip_and_shrink
    except ImportError:
        return _strip_by_hand(psp), False
    return strip_and_shrink(psp), True


def _strip_by_hand(psp):
    clones = []

    def clone_function(layer):
        if tf_psp.is_psp_layer(layer):
            new = layer.plain_class.from_config(layer.plain_config())
        else:
            new = type(layer).from_config(layer.get_config())
        clones.append((layer, new))
        return new

    plain = keras.models.clone_model(psp, clone_function=clone_function)
    for old, new in clones:
        new.set_weights(old.folded_weights() if tf_psp.is_psp_layer(old) else old.get_weights())
    return plain


def test_tflite_convert_script_on_a_shrunk_model(tmp_path):
    psp = _psp_model()
    plain, shrunk = _plain_model(psp)
    assert not any(tf_psp.is_psp_layer(layer) for layer in plain.layers)
    if shrunk:
        assert plain.get_layer("c2").filters < 12

    saved_model = str(tmp_path / "saved_model")
    result = tf_psp_export.export_saved_model(plain, saved_model)
    assert result.max_rel_error <= 1e-5

    tflite = str(tmp_path / "m.tflite")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    process = subprocess.run(
        [TFLITE_CONVERT, f"--saved_model_dir={saved_model}", f"--output_file={tflite}"],
        capture_output=True, text=True, timeout=300, env=env,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    assert os.path.getsize(tflite) > 0

    x = np.random.default_rng(1).normal(size=(2, 10, 10, 3)).astype(np.float32)
    (output,) = tf_psp_export.run_tflite(tflite, x)
    for reference_model in (plain, psp):
        reference = keras.ops.convert_to_numpy(reference_model(x, training=False))
        assert output.shape == reference.shape
        error = np.abs(output - reference).max() / np.abs(reference).max()
        assert error <= 1e-5, f"{reference_model.name}: relative error {error:.3g}"
