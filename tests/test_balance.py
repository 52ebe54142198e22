"""balance_alphas: same function, alphas at the decays' equilibrium (numpy oracle)."""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import assert_weights_unchanged, weights_snapshot

L = keras.layers


def _model():
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(6, 3, padding="same", activation="relu", name="stem")(x)
    y = L.Conv2D(4, 3, padding="same", activation="relu", name="c1")(x)
    y = L.Conv2D(6, 1, name="c2")(y)
    x = L.Add(name="add")([x, y])
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = L.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, L.Dense(3, name="fc")(x))
    rng = np.random.default_rng(0)
    model.set_weights([rng.normal(size=w.shape).astype("float32") for w in model.get_weights()])
    return model


def _x():
    return np.random.default_rng(1).normal(size=(4, 8, 8, 3)).astype("float32")


def _np(x):
    return keras.ops.convert_to_numpy(x)


def test_per_layer_alphas_reach_the_equilibrium_and_keep_the_function():
    model = _model()
    psp = tf_psp.parameterize(model, structure="channel",
                              alpha_regularizer=tf_psp.regularizers.WeightDecay(0.1))
    psp.get_layer("c1").alpha.assign(np.linspace(0.5, 2.0, 6).astype("float32"))
    before = weights_snapshot(psp)
    balanced = tf_psp.balance_alphas(psp, kernel_decay=1e-3, momentum=0.9)
    assert_weights_unchanged(before, psp)
    x = _x()
    np.testing.assert_allclose(_np(balanced(x)), _np(psp(x)), rtol=1e-4, atol=1e-5)
    # Oracle: alpha_i = (kappa (1 - mu) / lambda)^(1/4) * sqrt(||w_i||), w_i the effective row.
    layer = psp.get_layer("c1")
    w = _np(layer.kernel) * _np(layer.alpha).reshape(1, 1, -1, 1)
    norms = np.sqrt(np.sum(np.square(w), axis=(0, 1, 3)))
    expected = (1e-3 * 0.1 / 0.1) ** 0.25 * np.sqrt(norms)
    np.testing.assert_allclose(_np(balanced.get_layer("c1").alpha), expected, rtol=1e-5)
    # Effective weights are unchanged.
    b = balanced.get_layer("c1")
    np.testing.assert_allclose(_np(b.kernel) * _np(b.alpha).reshape(1, 1, -1, 1), w, rtol=1e-5)


def test_group_alphas_balance_over_all_their_readers():
    model = _model()
    psp = tf_psp.parameterize(model, coupling="group", cost="macs",
                              alpha_regularizer=tf_psp.regularizers.WeightDecay(0.2))
    balanced = tf_psp.balance_alphas(psp, kernel_decay=2e-3)
    x = _x()
    np.testing.assert_allclose(_np(balanced(x)), _np(psp(x)), rtol=1e-4, atol=1e-5)
    gate = next(layer for layer in psp.layers if isinstance(layer, tf_psp.PSPGroupAlphas))
    new_gate = next(layer for layer in balanced.layers if isinstance(layer, tf_psp.PSPGroupAlphas))
    assert gate.group_names == ["stem", "c1"]
    # The stem's channels (tied by Add) are read by c1 and, through dw and pooling, by fc.
    rows = np.sum(np.square(_np(model.get_layer("c1").kernel)), axis=(0, 1, 3))
    rows += np.sum(np.square(_np(model.get_layer("fc").kernel)), axis=1)
    decay = 0.2 * np.asarray(gate.costs[0])
    expected = (2e-3 / decay) ** 0.25 * rows ** 0.25
    np.testing.assert_allclose(new_gate.alphas()[:6], expected, rtol=1e-5)
    # The copy still shares one alpha layer between its readers.
    assert len(new_gate._inbound_nodes) == 3


def test_balance_needs_weight_decay_and_positive_kernel_decay():
    psp = tf_psp.parameterize(_model(), alpha_regularizer=tf_psp.regularizers.L1(0.1))
    with pytest.raises(ValueError, match="WeightDecay"):
        tf_psp.balance_alphas(psp, kernel_decay=1e-3)
    with pytest.raises(ValueError, match="kernel_decay must be > 0"):
        tf_psp.balance_alphas(psp, kernel_decay=0.0)
