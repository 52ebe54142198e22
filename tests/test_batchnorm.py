"""recalibrate_batchnorm: moving statistics equal numpy statistics of the BN inputs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_psp

from conftest import assert_weights_unchanged, randomize_weights, weights_snapshot


def _conv_bn_model(psp=False):
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.Dropout(0.5)(x)
    x = keras.layers.Conv2D(5, 1, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="head")(x))
    model = randomize_weights(model, seed=1)
    return tf_psp.parameterize(model) if psp else model


def _data(n=50, seed=0):
    # A large offset and scale: a naive E[x^2] - E[x]^2 would lose digits.
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(n, 6, 6, 3)) * 3.0 + 5.0).astype("float32")


def _bn_input(model, name, x):
    """The input of BN layer `name` for `x`, all layers in inference mode."""
    layer = model.get_layer(name)
    return keras.Model(model.inputs[0], layer.input)(x, training=False).numpy().astype("float64")


def _assert_stats(model, name, x):
    values = _bn_input(model, name, x).reshape(-1, model.get_layer(name).moving_mean.shape[0])
    layer = model.get_layer(name)
    np.testing.assert_allclose(layer.moving_mean.numpy(), values.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), values.var(0), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("psp", [False, True], ids=["plain", "psp"])
def test_first_batchnorm_gets_population_statistics_over_uneven_batches(psp):
    model = _conv_bn_model(psp)
    x = _data(50)
    before = weights_snapshot(model)
    # batches 16, 16, 16, 2: a mean of batch statistics would be wrong.
    new = tf_psp.recalibrate_batchnorm(model, x, batch_size=16)
    assert_weights_unchanged(before, model)
    assert new is not model
    _assert_stats(new, "bn1", x)


def test_single_batch_makes_every_batchnorm_consistent_in_inference():
    # With one batch, upstream BNs normalize with exactly the recomputed
    # statistics, so each BN's input in inference mode is what was measured.
    model = _conv_bn_model()
    x = _data(40)
    new = tf_psp.recalibrate_batchnorm(model, (x, np.zeros(40, "int32")), batch_size=40)
    for name in ("bn1", "bn2"):
        _assert_stats(new, name, x)
    # Everything else is copied unchanged.
    for old, fresh in zip(model.weights, new.weights):
        if "moving" not in old.path:
            np.testing.assert_array_equal(old.numpy(), fresh.numpy())


def test_steps_limit_the_data_and_datasets_work():
    model = _conv_bn_model()
    x = _data(64)
    dataset = tf.data.Dataset.from_tensor_slices((x, np.zeros(64, "int32"))).batch(16)
    from_dataset = tf_psp.recalibrate_batchnorm(model, dataset, steps=2)
    _assert_stats(from_dataset, "bn1", x[:32])
    from_arrays = tf_psp.recalibrate_batchnorm(model, x, steps=2, batch_size=16)
    np.testing.assert_allclose(from_arrays.get_layer("bn1").moving_mean.numpy(),
                               from_dataset.get_layer("bn1").moving_mean.numpy(), rtol=1e-6)


def test_nested_model_and_bad_arguments():
    inner = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4, name="d"),
                              keras.layers.BatchNormalization(name="inner_bn")], name="inner")
    inputs = keras.Input((5,))
    model = keras.Model(inputs, keras.layers.Dense(2)(inner(inputs)))
    x = np.random.default_rng(0).normal(size=(30, 5)).astype("float32") + 2
    new = tf_psp.recalibrate_batchnorm(model, x, batch_size=30)
    bn = new.get_layer("inner").get_layer("inner_bn")
    values = x @ inner.get_layer("d").kernel.numpy() + inner.get_layer("d").bias.numpy()
    np.testing.assert_allclose(bn.moving_mean.numpy(), values.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.moving_variance.numpy(), values.var(0), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="steps"):
        tf_psp.recalibrate_batchnorm(model, x, steps=0)
    with pytest.raises(ValueError, match="keras.Model"):
        tf_psp.recalibrate_batchnorm(object(), x)


def test_callback_updates_statistics_and_logs_validation():
    model = _conv_bn_model()
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(
        from_logits=True), metrics=["accuracy"], jit_compile=False)
    x, y = _data(32), np.random.default_rng(1).integers(0, 3, 32)
    history = model.fit(
        x, y, epochs=2, batch_size=32, verbose=0,
        callbacks=[tf_psp.RecalibrateBatchNorm(x, batch_size=32, validation_data=(x, y))])
    assert "val_accuracy" in history.history
    _assert_stats(model, "bn1", x)


def test_fold_batchnorm_matches_inference_and_removes_batch_statistics():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, padding="same", use_bias=False, name="c1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    y = keras.layers.Conv2D(12, 1, activation="relu", name="c2")(x)
    y = keras.layers.BatchNormalization(name="bn3")(y)  # after an activation: kept
    x = keras.layers.Add()([x, y])
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(4, name="d")(x)
    x = keras.layers.BatchNormalization(name="bn4")(x)
    model = randomize_weights(keras.Model(inputs, x))
    before = weights_snapshot(model)
    folded, names = tf_psp.fold_batchnorm(model)
    assert_weights_unchanged(before, model)
    assert names == ["bn1", "bn2", "bn4"]
    assert isinstance(folded.get_layer("bn1"), keras.layers.Identity)
    assert isinstance(folded.get_layer("bn3"), keras.layers.BatchNormalization)
    x = np.random.default_rng(0).normal(size=(5, 8, 8, 3)).astype("float32")
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(folded(x, training=False).numpy(), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
    # The folded model parameterizes and shrinks like any plain model.
    psp = tf_psp.parameterize(folded)
    np.testing.assert_allclose(psp(x, training=False).numpy(), expected, rtol=1e-4,
                               atol=1e-4 * np.abs(expected).max())
