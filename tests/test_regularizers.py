"""Alpha regularizers and the fixed-sparsity constraint, checked by hand."""

import json

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import regularizers


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_weight_decay_value_and_gradient_match_paper():
    alpha = np.array([1.0, -2.0, 0.5], "float32")
    reg = regularizers.WeightDecay(0.1)
    assert float(_np(reg(alpha))) == pytest.approx(0.5 * 0.1 * (1 + 4 + 0.25))
    # d/dalpha 0.5*lambda*alpha^2 = lambda*alpha (paper eq. 6); finite differences:
    h = 1e-3
    bumped = alpha.copy()
    bumped[1] += h
    grad = (float(_np(reg(bumped))) - float(_np(reg(alpha)))) / h
    assert grad == pytest.approx(0.1 * -2.0, abs=1e-3)


def test_l1_value():
    alpha = np.array([[1.0, -2.0], [0.0, 0.25]], "float32")
    assert float(_np(regularizers.L1(0.3)(alpha))) == pytest.approx(0.3 * 3.25)


def test_fixed_sparsity_keeps_largest_magnitudes():
    alpha = np.array([0.1, -0.9, 0.5, -0.2, 0.7, 0.05], "float32")
    got = _np(regularizers.FixedSparsity(0.5)(alpha))
    np.testing.assert_array_equal(got, np.array([0.0, -0.9, 0.5, 0.0, 0.7, 0.0], "float32"))


def test_fixed_sparsity_keeps_ties_so_initial_ones_survive():
    alpha = np.ones((8,), "float32")
    np.testing.assert_array_equal(_np(regularizers.FixedSparsity(0.5)(alpha)), alpha)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_fixed_sparsity_rejects_bad_fraction(bad):
    with pytest.raises(ValueError, match="sparsity must be in"):
        regularizers.FixedSparsity(bad)


@pytest.mark.parametrize("cls, arg", [(regularizers.WeightDecay, -1.0), (regularizers.L1, -0.5)])
def test_negative_strength_is_rejected(cls, arg):
    with pytest.raises(ValueError, match="must be >= 0"):
        cls(arg)


@pytest.mark.parametrize("obj", [regularizers.WeightDecay(3e-4), regularizers.L1(2e-3),
                                 regularizers.FixedSparsity(0.25)])
def test_serializable(obj):
    config = keras.saving.serialize_keras_object(obj)
    json.dumps(config)
    back = keras.saving.deserialize_keras_object(config)
    assert type(back) is type(obj) and back.get_config() == obj.get_config()


def test_default_layer_regularizer_is_weight_decay_and_adds_the_loss():
    layer = tf_psp.PSPDense(3)
    layer(np.zeros((1, 4), "float32"))
    assert isinstance(layer.alpha_regularizer, regularizers.WeightDecay)
    expected = 0.5 * regularizers.DEFAULT_DECAY * 4  # four alphas at 1
    assert float(_np(layer.losses[0])) == pytest.approx(expected)


def test_fixed_sparsity_constraint_applied_in_training():
    rng = np.random.default_rng(0)
    inputs = keras.Input((8,))
    layer = tf_psp.PSPDense(2, alpha_regularizer=None,
                            alpha_constraint=regularizers.FixedSparsity(0.5), name="d")
    model = keras.Model(inputs, layer(inputs))
    model.compile(keras.optimizers.SGD(0.01), "mse", jit_compile=False)
    x = rng.normal(size=(64, 8)).astype("float32")
    model.fit(x, x[:, :2], epochs=1, batch_size=16, verbose=0)
    assert int((~layer.structure_mask()).sum()) == 4
