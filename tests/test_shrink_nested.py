"""Nested models (a backbone used as a layer) are inlined before analysis.

Oracles: the PSP model itself (exactness), and the same backbone built flat with
the same alphas (the shrunk MACs must agree within 5 %).
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import graph as psp_graph

from conftest import assert_weights_unchanged, randomize_weights, weights_snapshot

L = keras.layers


def _backbone():
    return keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3), alpha=0.35)


def _nested_and_flat():
    bb = _backbone()
    i = keras.Input((32, 32, 3))
    nested = keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D(name="gap")(bb(i))))
    bb2 = _backbone()
    pooled = L.GlobalAveragePooling2D(name="gap")(bb2.output)
    flat = keras.Model(bb2.input, L.Dense(3, name="head")(pooled))
    randomize_weights(nested)
    flat.set_weights(nested.get_weights())
    return nested, flat


def _alpha_variables(model):
    out = {}
    for layer in model._flatten_layers(include_self=False):
        if tf_psp.is_psp_layer(layer):
            out[layer.name] = [layer.alpha]
        elif isinstance(layer, tf_psp.PSPGroupAlphas):
            out[layer.name] = layer.group_alphas
    return out


@pytest.mark.parametrize("coupling", ["layer", "group"])
def test_nested_backbone_shrinks_like_the_flat_one(coupling):
    nested, flat = _nested_and_flat()
    pn, pf = (tf_psp.parameterize(m, coupling=coupling) for m in (nested, flat))
    vn, vf = _alpha_variables(pn), _alpha_variables(pf)
    assert sorted(vn) == sorted(vf)
    rng = np.random.default_rng(0)
    for name in sorted(vf):
        for a, b in zip(vn[name], vf[name]):
            value = np.where(rng.random(a.shape) < 0.5, 0.0, 1.0 + rng.random(a.shape))
            a.assign(value.astype("float32"))
            b.assign(value.astype("float32"))
    before = weights_snapshot(pn)
    sn, sf = tf_psp.strip_and_shrink(pn), tf_psp.strip_and_shrink(pf)
    assert_weights_unchanged(before, pn)
    x = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(pn(x, training=False))
    out = keras.ops.convert_to_numpy(sn(x, training=False))
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    macs = [tf_psp.profile(m).total_macs for m in (nested, sn, sf)]
    assert macs[1] < macs[0] / 2  # it shrinks at all (it kept every channel before)
    assert abs(macs[1] - macs[2]) <= 0.05 * macs[2]


def test_inline_nested_leaves_the_model_alone_and_renames_clashes():
    inner_in = keras.Input((4, 4, 3))
    inner = keras.Model(inner_in, L.Conv2D(5, 1, name="conv")(inner_in), name="inner")
    seq = keras.Sequential([keras.Input((4, 4, 5)), L.ReLU(name="relu")], name="seq")
    i = keras.Input((4, 4, 3))
    model = keras.Model(i, L.Conv2D(2, 1, name="conv")(seq(inner(i))))
    randomize_weights(model)
    nodes_before = [len(layer._inbound_nodes) for layer in model._flatten_layers()]
    flat = psp_graph.inline_nested(model)
    assert [layer.name for layer in flat.layers[1:]] == ["conv", "relu", "conv_1"]
    assert [len(layer._inbound_nodes) for layer in model._flatten_layers()] == nodes_before
    x = np.random.default_rng(0).normal(size=(2, 4, 4, 3)).astype("float32")
    np.testing.assert_allclose(flat(x), model(x), rtol=1e-6)


def test_inlined_backbone_matches_nested_in_both_modes():
    # transfer learning calls the backbone with training=False; Keras 3 lets the outer
    # call's `training` win either way, so the flat model must simply behave the same
    bb_in = keras.Input((4, 4, 3))
    bb = keras.Model(bb_in, L.BatchNormalization(name="bn")(L.Conv2D(4, 1, name="conv")(bb_in)),
                     name="bb")
    i = keras.Input((4, 4, 3))
    model = keras.Model(i, L.Dense(2, name="head")(bb(i, training=False)))
    randomize_weights(model)
    flat = psp_graph.inline_nested(model)
    group = tf_psp.parameterize(model, coupling="group")
    x = np.random.default_rng(0).normal(size=(8, 4, 4, 3)).astype("float32")
    for training in (False, True):  # inference first: training calls move BN statistics
        ref = model(x, training=training)
        np.testing.assert_allclose(flat(x, training=training), ref, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(group(x, training=training), ref, rtol=1e-5, atol=1e-6)
