"""parameterize(): PSP copies compute what the originals compute and leave them untouched."""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import assert_weights_unchanged, randomize_weights, weights_snapshot


def _close(a, b, tol):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-30)
    assert np.abs(a - b).max() / scale <= tol, np.abs(a - b).max() / scale


def _sequential():
    return keras.Sequential([
        keras.Input((10, 10, 3)),
        keras.layers.Conv2D(8, 3, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        keras.layers.DepthwiseConv2D(3, depth_multiplier=2),
        keras.layers.SeparableConv2D(6, 3),
        keras.layers.Flatten(),
        keras.layers.Dense(4),
    ])


def _residual():
    inputs = keras.Input((8, 8, 4))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Conv2D(4, 3, padding="same", name="c2")(x)
    x = keras.layers.Add()([x, inputs])
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, [keras.layers.Dense(3, name="head")(x), x])


@pytest.mark.parametrize("structure", ["channel", "filter", "column", "layer"])
@pytest.mark.parametrize("build", [_sequential, _residual])
def test_outputs_equal_and_input_untouched(build, structure):
    model = build()
    randomize_weights(model)
    before = weights_snapshot(model)
    psp = tf_psp.parameterize(model, structure=structure)
    x = np.random.default_rng(1).normal(size=(2,) + tuple(model.input_shape[1:])).astype("float32")
    for a, b in zip(keras.tree.flatten(psp(x)), keras.tree.flatten(model(x))):
        _close(a, b, 1e-6)
    assert_weights_unchanged(before, model)
    assert not any(tf_psp.is_psp_layer(layer) for layer in model.layers)
    converted = [layer for layer in psp.layers if tf_psp.is_psp_layer(layer)]
    assert converted and all(layer.structure == structure for layer in converted)
    for layer in converted:
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.alpha), 1.0)


def test_select_layers_by_name_and_predicate_and_report():
    model = _residual()
    psp, report = tf_psp.parameterize(model, layers=["c1"], return_report=True)
    assert tf_psp.is_psp_layer(psp.get_layer("c1"))
    assert not tf_psp.is_psp_layer(psp.get_layer("c2"))
    assert report.converted == ["c1"]
    assert {name for name, _, _ in report.skipped} == {"c2", "head"}
    assert "kept layer 'c2'" in str(report)
    psp2 = tf_psp.parameterize(model, layers=lambda layer: isinstance(layer, keras.layers.Dense))
    assert [layer.name for layer in psp2.layers if tf_psp.is_psp_layer(layer)] == ["head"]


def test_unsupported_layer_is_listed():
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.PReLU(name="act")(inputs)  # Conv2DTranspose has a twin now
    model = keras.Model(inputs, keras.layers.Conv2D(2, 1, name="c")(x))
    _, report = tf_psp.parameterize(model, return_report=True)
    assert ("act", "PReLU", "no PSP twin for PReLU") in report.skipped


def test_per_layer_structure_callable():
    psp = tf_psp.parameterize(
        _residual(), structure=lambda layer: "filter" if layer.name == "c1" else "channel")
    assert psp.get_layer("c1").structure == "filter" and psp.get_layer("c2").structure == "channel"


def test_mobilenetv2_small_input_equivalent():
    model = keras.applications.MobileNetV2(input_shape=(32, 32, 3), weights=None, alpha=0.35,
                                           classes=10)
    before = weights_snapshot(model)
    psp = tf_psp.parameterize(model)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
    _close(psp(x, training=False), model(x, training=False), 1e-6)
    assert_weights_unchanged(before, model)
    kinds = {type(layer).__name__ for layer in psp.layers if tf_psp.is_psp_layer(layer)}
    assert kinds == {"PSPConv2D", "PSPDepthwiseConv2D", "PSPDense"}


def test_nested_model_is_converted():
    inner_in = keras.Input((4,))
    inner = keras.Model(inner_in, keras.layers.Dense(3, name="inner_dense")(inner_in), name="inner")
    outer_in = keras.Input((4,))
    model = keras.Model(outer_in, keras.layers.Dense(2, name="outer_dense")(inner(outer_in)))
    randomize_weights(model)
    psp = tf_psp.parameterize(model)
    assert tf_psp.is_psp_layer(psp.get_layer("inner").get_layer("inner_dense"))
    x = np.ones((2, 4), "float32")
    _close(psp(x), model(x), 1e-6)


def test_lambda_layer_is_reused_not_round_tripped():
    inputs = keras.Input((4,))
    x = keras.layers.Lambda(lambda t: t * 2.0)(inputs)
    model = keras.Model(inputs, keras.layers.Dense(2)(x))
    psp = tf_psp.parameterize(model)
    x = np.ones((1, 4), "float32")
    _close(psp(x), model(x), 1e-6)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="expected a keras.Model"):
        tf_psp.parameterize(keras.layers.Dense(2))
    with pytest.raises(ValueError, match="not built"):
        tf_psp.parameterize(keras.Sequential([keras.layers.Dense(2)]))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    with pytest.raises(ValueError, match="subclassed"):
        tf_psp.parameterize(Sub())
    with pytest.raises(ValueError, match=r"no layers named \['nope'\]"):
        tf_psp.parameterize(_residual(), layers=["nope"])
    with pytest.raises(ValueError, match="unknown PSP structure"):
        tf_psp.parameterize(_residual(), structure="rows")
    with pytest.raises(TypeError, match="unknown PSP arguments"):
        tf_psp.parameterize(_residual(), alpha_regulariser=None)


def test_alpha_initializer_is_honoured():
    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(3, name="d")(inp))
    psp = tf_psp.parameterize(model, alpha_initializer=keras.initializers.Constant(0.5))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(psp.get_layer("d").alpha), 0.5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(psp.get_layer("d").kernel),
                               keras.ops.convert_to_numpy(model.get_layer("d").kernel))
