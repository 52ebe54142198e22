"""Exports to SavedModel, TFLite and ONNX compute what the Keras model computes."""

import os

import keras
import numpy as np
import pytest

from tf_psp import export as tf_psp_export

from conftest import assert_weights_unchanged, randomize_weights, weights_snapshot

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="export needs the TensorFlow backend",
)


def _conv_model():
    inputs = keras.Input((8, 8, 3), name="image")
    x = keras.layers.Conv2D(6, 3, padding="same", name="conv")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.ReLU(name="relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    return randomize_weights(keras.Model(inputs, outputs, name="small_conv"))


def _two_io_model(structure):
    # Input names sort opposite to their order, to catch matching by sorted name.
    vector = keras.Input((5,), name="zeta")
    image = keras.Input((4, 4, 2), name="alpha")
    a = keras.layers.Dense(3, name="d_vector")(vector)
    b = keras.layers.Dense(3, name="d_image")(keras.layers.Flatten()(image))
    total = keras.layers.Add(name="total")([a, b])
    side = keras.layers.Dense(2, name="side")(b)
    if structure == "dict":
        model = keras.Model({"alpha": image, "zeta": vector}, {"total": total, "side": side})
    else:
        model = keras.Model([vector, image], [total, side])
    return randomize_weights(model, seed=1)


def _assert_clean(directory, expected):
    """Only the exported files remain: no temporary files or directories."""
    assert sorted(os.listdir(directory)) == sorted(expected)


@pytest.fixture(scope="module")
def conv_model():
    return _conv_model()


def test_saved_model_round_trip(conv_model, tmp_path):
    before = weights_snapshot(conv_model)
    path = tmp_path / "model"
    result = tf_psp_export.export_saved_model(conv_model, path)
    assert result.format == "saved_model"
    assert result.path == str(path)
    assert result.size_bytes > 0
    assert result.max_rel_error <= 1e-5, result
    assert os.path.isfile(path / "saved_model.pb")
    _assert_clean(tmp_path, ["model"])
    assert_weights_unchanged(before, conv_model)


@pytest.mark.parametrize("quantization, tolerance", [
    (None, 1e-5),
    ("float16", 1e-2),
    ("int8", 0.1),
])
def test_tflite_round_trip(conv_model, tmp_path, quantization, tolerance):
    before = weights_snapshot(conv_model)
    path = tmp_path / "model.tflite"
    calibration = np.random.default_rng(3).normal(size=(32, 8, 8, 3)).astype("float32")
    result = tf_psp_export.export_tflite(
        conv_model, path, quantization=quantization,
        representative_data=calibration if quantization == "int8" else None,
    )
    assert result.format == "tflite"
    assert result.size_bytes == os.path.getsize(path)
    assert result.max_rel_error <= tolerance, result
    _assert_clean(tmp_path, ["model.tflite"])
    assert_weights_unchanged(before, conv_model)

    interpreter = tf_psp_export.litert_interpreter(path)
    expected_dtype = np.int8 if quantization == "int8" else np.float32
    assert interpreter.get_input_details()[0]["dtype"] == expected_dtype
    assert interpreter.get_output_details()[0]["dtype"] == expected_dtype


def test_int8_accepts_batches_with_targets(conv_model, tmp_path):
    rng = np.random.default_rng(4)

    def batches():
        for _ in range(4):
            yield rng.normal(size=(8, 8, 8, 3)).astype("float32"), np.zeros((8,))

    result = tf_psp_export.export_tflite(
        conv_model, tmp_path / "model.tflite", quantization="int8", representative_data=batches()
    )
    assert result.max_rel_error <= 0.1, result


def test_onnx_round_trip(conv_model, tmp_path):
    before = weights_snapshot(conv_model)
    path = tmp_path / "model.onnx"
    result = tf_psp_export.export_onnx(conv_model, path)
    assert result.format == "onnx"
    assert result.size_bytes == os.path.getsize(path)
    assert result.max_rel_error <= 1e-5, result
    _assert_clean(tmp_path, ["model.onnx"])
    assert_weights_unchanged(before, conv_model)


def test_given_probe_is_used(conv_model, tmp_path):
    probe = np.random.default_rng(5).normal(size=(3, 8, 8, 3)).astype("float32")
    path = tmp_path / "model.tflite"
    tf_psp_export.export_tflite(conv_model, path, probe=probe)
    (output,) = tf_psp_export.run_tflite(path, probe)
    assert output.shape == (3, 4)
    np.testing.assert_allclose(output, conv_model(probe), rtol=1e-5, atol=1e-5)


def test_existing_paths_are_replaced(conv_model, tmp_path):
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "stale.txt").write_text("old export")
    tf_psp_export.export_saved_model(conv_model, directory)
    assert not (directory / "stale.txt").exists()
    assert (directory / "saved_model.pb").exists()

    tflite = tmp_path / "model.tflite"
    tflite.write_bytes(b"not a model")
    result = tf_psp_export.export(conv_model, tflite, "tflite")
    assert result.max_rel_error <= 1e-5
    assert tflite.read_bytes() != b"not a model"
    _assert_clean(tmp_path, ["model", "model.tflite"])


def test_errors(conv_model, tmp_path):
    with pytest.raises(ValueError, match="format 'coreml'"):
        tf_psp_export.export(conv_model, tmp_path / "m", "coreml")
    with pytest.raises(ValueError, match="quantization 'int4'"):
        tf_psp_export.export_tflite(conv_model, tmp_path / "m.tflite", quantization="int4")
    with pytest.raises(ValueError, match="representative_data"):
        tf_psp_export.export_tflite(conv_model, tmp_path / "m.tflite", quantization="int8")
    with pytest.raises(ValueError, match="keras.Model"):
        tf_psp_export.export_onnx(keras.layers.Dense(2), tmp_path / "m.onnx")
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        tf_psp_export.export_saved_model(conv_model, tmp_path / "file")
    _assert_clean(tmp_path, ["file"])


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_two_inputs_two_outputs(tmp_path, structure):
    model = _two_io_model(structure)
    rng = np.random.default_rng(6)
    # model.inputs order: [zeta, alpha] for "list", sorted keys [alpha, zeta] for "dict"
    probe = {"zeta": rng.normal(size=(3, 5)).astype("float32"),
             "alpha": rng.normal(size=(3, 4, 4, 2)).astype("float32")}
    flat = [probe[t.name] for t in model.inputs]
    expected = [np.asarray(o) for o in keras.tree.flatten(
        model(probe if structure == "dict" else flat))]
    assert [o.shape for o in expected] == [(3,) + tuple(t.shape[1:]) for t in model.outputs]

    tflite = tf_psp_export.export_tflite(model, tmp_path / "m.tflite", probe=probe)
    onnx = tf_psp_export.export_onnx(model, tmp_path / "m.onnx", probe=flat)
    assert tflite.max_rel_error <= 1e-5, tflite
    assert onnx.max_rel_error <= 1e-5, onnx
    for run, path in [(tf_psp_export.run_tflite, tflite.path), (tf_psp_export.run_onnx, onnx.path)]:
        for inputs in (flat, probe):
            outputs = run(path, inputs)
            assert len(outputs) == 2
            for out, ref in zip(outputs, expected):
                np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_interpreter_needs_named_inputs_when_several(tmp_path):
    model = _two_io_model("list")
    result = tf_psp_export.export_tflite(model, tmp_path / "m.tflite")
    interpreter = tf_psp_export.litert_interpreter(result.path)
    inputs = {"zeta": np.ones((1, 5), "float32"), "alpha": np.ones((1, 4, 4, 2), "float32")}
    expected = tf_psp_export.run_tflite(result.path, inputs)
    for out, ref in zip(tf_psp_export.run_tflite(interpreter, inputs), expected):
        np.testing.assert_array_equal(out, ref)
    with pytest.raises(ValueError, match="dict keyed by input name"):
        tf_psp_export.run_tflite(interpreter, [inputs["zeta"], inputs["alpha"]])

