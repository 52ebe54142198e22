"""channels_first models on CPUs without NCHW convolutions (tf_psp.nchw).

CI runs this file twice: as is, and with TF_ENABLE_ONEDNN_OPTS=0, which takes
TensorFlow's NCHW CPU kernels away on every x86 machine, as AVX2-only CPUs
lack them. The oracles are a channels_last twin of the model and a
channels_first convolution tried directly.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import nchw

L = keras.layers


def _twins():
    """The same network channels_first and channels_last, with the same weights."""
    models = []
    for data_format, axis, shape in (("channels_first", 1, (3, 8, 8)),
                                     ("channels_last", -1, (8, 8, 3))):
        i = keras.Input(shape)
        h = L.Conv2D(6, 3, padding="same", data_format=data_format, name="c1")(i)
        h = L.BatchNormalization(axis=axis, name="bn")(h)
        h = L.ReLU(name="r")(h)
        h = L.GlobalAveragePooling2D(data_format=data_format, name="gap")(h)
        models.append(keras.Model(i, L.Dense(2, name="head")(h), name=data_format))
    rng = np.random.default_rng(0)
    models[1].set_weights([np.abs(rng.normal(size=v.shape)) + 0.5 if "variance" in v.path
                           else rng.normal(size=v.shape) for v in models[1].weights])
    models[0].set_weights(models[1].get_weights())  # kernels: the same layout in both formats
    return models


def _refusal():
    return RuntimeError("{{node Conv2D}} The Conv2D op currently only supports the NHWC "
                        "tensor format on the CPU. The op was given the format: NCHW")


def test_nchw_supported_agrees_with_a_channels_first_conv():
    x = np.zeros((1, 3, 5, 5), "float32")
    try:
        L.Conv2D(2, 3, data_format="channels_first")(x)
        ran = True
    except Exception as error:  # noqa: BLE001 - whatever TensorFlow raises here
        assert nchw.is_unsupported_format(error), error
        ran = False
    assert nchw.nchw_supported() == ran


def test_run_inference_equals_the_channels_last_twin():
    first, last = _twins()
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype("float32")
    ref = keras.ops.convert_to_numpy(last(np.transpose(x, (0, 2, 3, 1)), training=False))
    out = keras.ops.convert_to_numpy(nchw.run_inference(first, x))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_explained_names_the_layer_and_passes_other_errors():
    first, _ = _twins()
    with pytest.raises(ValueError, match=r"doing it: layer 'c1' \(Conv2D\) uses "
                                         r"data_format='channels_first'.*TF_ENABLE_ONEDNN_OPTS"):
        with nchw.explained(first, "doing it"):
            raise _refusal()
    with pytest.raises(KeyError):
        with nchw.explained(first, "doing it"):
            raise KeyError("something else")


def test_run_inference_names_the_layer_when_xla_fails_too(monkeypatch):
    first, _ = _twins()

    class Refusing(keras.Model):
        def call(self, x, training=None):
            raise _refusal()

    refusing = Refusing(name="refusing")
    with pytest.raises(ValueError, match="checking: model 'refusing' runs an NCHW convolution"):
        nchw.run_inference(refusing, np.zeros((1, 3), "float32"), "checking")
    assert nchw.channels_first_layer(first).name == "c1"
    assert nchw.channels_first_layer(_twins()[1]) is None


def test_batchnorm_recalibration_runs_or_names_the_layer():
    first, last = _twins()
    psp = tf_psp.parameterize(first)
    x = np.random.default_rng(2).normal(size=(16, 3, 8, 8)).astype("float32")
    if nchw.nchw_supported():
        new = tf_psp.recalibrate_batchnorm(psp, x)
        mean = np.array(new.get_layer("bn").moving_mean)
        conv = np.array(keras.Model(last.input, last.get_layer("c1").output)(
            np.transpose(x, (0, 2, 3, 1))))
        np.testing.assert_allclose(mean, conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(ValueError, match=r"layer 'c1' \(PSPConv2D\) uses "
                                             "data_format='channels_first'"):
            tf_psp.recalibrate_batchnorm(psp, x)


@pytest.mark.slow
def test_tflite_export_of_a_channels_first_model_is_checked_on_any_cpu(tmp_path):
    first, _ = _twins()
    result = tf_psp.export.export_tflite(first, str(tmp_path / "nchw.tflite"))
    assert result.max_rel_error <= 1e-4
