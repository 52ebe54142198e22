"""Mixed precision (float16, bfloat16): alpha stays float32, training works, shrunk matches."""

import keras
import numpy as np
import pytest

import tf_psp

# Policy -> max deviation of the shrunk model from the PSP model, relative to
# the largest output: both compute in the low precision, in different orders
# (measured: 1.1e-3 for float16, 2.4e-3 for bfloat16's 8-bit mantissa).
TOLERANCE = {"mixed_float16": 1e-2, "mixed_bfloat16": 2e-2}


@pytest.fixture(params=sorted(TOLERANCE))
def policy(request):
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy(previous)


def test_psp_layers_train_and_shrink_under_mixed_precision(policy):
    inputs = keras.Input((8, 8, 3))
    x = tf_psp.PSPConv2D(6, 3, padding="same", activation="relu", name="c")(inputs)
    x = tf_psp.PSPDepthwiseConv2D(3, name="dw")(x)
    x = tf_psp.PSPSeparableConv2D(4, 1, structure="filter", name="sep")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, tf_psp.PSPDense(2, dtype="float32", name="head")(x))
    psp_layers = [layer for layer in model.layers if tf_psp.is_psp_layer(layer)]
    assert all(layer.alpha.dtype == "float32" for layer in psp_layers)
    assert model.get_layer("c").compute_dtype == policy.split("_")[1]

    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 8, 8, 3)).astype("float32")
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    before = keras.ops.convert_to_numpy(model.get_layer("c").alpha.value).copy()
    model.fit(x, rng.normal(size=(16, 2)).astype("float32"), epochs=1, verbose=0)
    after = keras.ops.convert_to_numpy(model.get_layer("c").alpha.value)
    assert np.all(np.isfinite(after)) and not np.array_equal(before, after)

    model.get_layer("sep").alpha.assign(np.array([1.0, 0.0, 1.0, 0.0], "float32"))
    shrunk = tf_psp.strip_and_shrink(model)
    assert shrunk.get_layer("sep").filters == 2
    ref = keras.ops.convert_to_numpy(model(x, training=False)).astype("float32")
    out = keras.ops.convert_to_numpy(shrunk(x, training=False)).astype("float32")
    assert np.max(np.abs(out - ref)) <= TOLERANCE[policy] * np.max(np.abs(ref))
