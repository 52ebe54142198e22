"""profile(): MAC and parameter counts checked against hand-computed values."""

import json
import math

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import profile

L = keras.layers


def _plain_model():
    inp = keras.Input((10, 10, 3))
    x = L.Conv2D(4, 3, padding="valid", name="conv_valid")(inp)  # 8x8x4
    x = L.BatchNormalization(name="bn")(x)
    x = L.Conv2D(6, 3, strides=2, padding="same", name="conv_same_s2")(x)  # 4x4x6
    x = L.DepthwiseConv2D(3, depth_multiplier=2, padding="same", name="dw")(x)  # 4x4x12
    x = L.SeparableConv2D(5, 3, name="sep")(x)  # 2x2x5
    x = L.Dense(7, name="dense_4d")(x)  # 2x2x7
    x = L.Flatten(name="flat")(x)  # 28
    out = L.Dense(3, name="dense_2d")(x)
    return keras.Model(inp, out)


# MACs computed by hand: out positions * kernel h*w * cin/groups * cout.
HAND_MACS = {
    "conv_valid": 8 * 8 * 3 * 3 * 3 * 4,  # 6912
    "bn": 0,
    "conv_same_s2": 4 * 4 * 3 * 3 * 4 * 6,  # 3456
    "dw": 4 * 4 * 3 * 3 * 6 * 2,  # 1728
    "sep": 2 * 2 * 3 * 3 * 12 + 2 * 2 * 12 * 5,  # depthwise 432 + pointwise 240
    "dense_4d": 2 * 2 * 5 * 7,  # 140
    "flat": 0,
    "dense_2d": 28 * 3,  # 84
}


def test_macs_of_plain_layers_match_hand_counts():
    prof = profile(_plain_model())
    assert {row.name: row.macs for row in prof.layers} == HAND_MACS
    assert prof.total_macs == sum(HAND_MACS.values()) == 12992


def test_params_equal_count_params_and_psp_columns_are_blank():
    model = _plain_model()
    prof = profile(model)
    assert prof.total_params == model.count_params()
    assert {row.name: row.params for row in prof.layers} == {
        layer.name: layer.count_params() for layer in model.layers[1:]
    }
    assert all(not row.is_psp and row.structures_total is None for row in prof.layers)
    assert prof.sparsity == 0.0
    assert prof.pruned_macs == 0
    assert prof.mac_reduction == 1.0


def test_output_shapes_exclude_batch():
    prof = profile(_plain_model())
    shapes = {row.name: row.output_shape for row in prof.layers}
    assert shapes["conv_same_s2"] == (4, 4, 6)
    assert shapes["dense_2d"] == (3,)


@pytest.mark.parametrize(
    "input_shape, layer, hand_macs",
    [
        ((10, 2), L.Conv1D(4, 3), 8 * 3 * 2 * 4),
        ((6, 6, 4), L.Conv2D(6, 3, groups=2), 4 * 4 * 3 * 3 * 2 * 6),
        ((3, 3, 3, 1), L.Conv3D(2, 2), 2 * 2 * 2 * 2 * 2 * 2 * 1 * 2),
        ((4, 4, 3), L.Conv2DTranspose(2, 3, strides=2), 4 * 4 * 3 * 3 * 3 * 2),
        ((6, 6, 3), L.Conv2D(4, 3, dilation_rate=2), 2 * 2 * 3 * 3 * 3 * 4),
        ((3, 8, 8), L.Conv2D(4, 3, data_format="channels_first"), 6 * 6 * 3 * 3 * 3 * 4),
    ],
    ids=["conv1d", "grouped", "conv3d", "transpose", "dilated", "channels_first"],
)
def test_macs_of_other_convolutions(input_shape, layer, hand_macs):
    inp = keras.Input(input_shape)
    model = keras.Model(inp, layer(inp))
    prof = profile(model)
    assert prof.layers[0].macs == hand_macs
    assert prof.total_params == model.count_params()


def test_shared_layer_counts_macs_per_call_and_params_once():
    inp = keras.Input((5,))
    dense = L.Dense(5, name="shared")
    out = dense(dense(inp))
    model = keras.Model(inp, out)
    prof = profile(model)
    (row,) = prof.layers
    assert row.calls == 2
    assert row.macs == 2 * 5 * 5
    assert prof.total_params == model.count_params() == 30


def test_nested_model_layers_are_walked():
    sub = keras.Sequential(
        [keras.Input((4, 4, 2)), L.Conv2D(3, 1, name="inner")], name="block"
    )
    inp = keras.Input((4, 4, 2))
    x = sub(inp)
    out = L.Dense(2, name="head")(L.Flatten()(x))
    model = keras.Model(inp, out)
    prof = profile(model)
    macs = {row.name: row.macs for row in prof.layers}
    assert macs["block/inner"] == 16 * 2 * 3
    assert macs["head"] == 48 * 2
    assert prof.total_params == model.count_params()


# --- pruned counts of PSP layers ------------------------------------------------


def _single(layer, input_shape):
    inp = keras.Input(input_shape)
    return keras.Model(inp, layer(inp))


def _column_alpha():
    """Column alpha (3, 3, 4): all of channel 0 and one column of channel 1 dead."""
    alpha = np.ones((3, 3, 4))
    alpha[:, :, 0] = 0.0
    alpha[1, 1, 1] = 0.0
    return alpha


# Each case: layer, input shape, alpha to assign, hand (MACs, pruned MACs, pruned params).
PSP_CASES = {
    # PSPConv2D(8, 3) on 6x6x4 -> 4x4x8: 16*9*4*8 = 4608 MACs, kernel 288, bias 8.
    "conv_channel": (
        lambda: tf_psp.PSPConv2D(8, 3, structure="channel", alpha_regularizer=None),
        (6, 6, 4),
        np.array([0.0, 0.0, 1.0, 1.0]),
        (4608, 4608 // 2, 9 * 2 * 8),
    ),
    "conv_filter": (
        lambda: tf_psp.PSPConv2D(8, 3, structure="filter", alpha_regularizer=None),
        (6, 6, 4),
        np.array([0, 1, 1, 1, 0, 1, 1, 1], dtype="float32"),
        (4608, 16 * 9 * 4 * 2, 9 * 4 * 2 + 2),  # kernel columns + their 2 biases
    ),
    "conv_column": (
        lambda: tf_psp.PSPConv2D(8, 3, structure="column", alpha_regularizer=None),
        (6, 6, 4),
        np.concatenate([np.zeros((1, 3, 4)), np.ones((2, 3, 4))]),  # top kernel row
        (4608, 16 * 12 * 8, 12 * 8),
    ),
    "conv_layer": (
        lambda: tf_psp.PSPConv2D(8, 3, structure="layer", alpha_regularizer=None),
        (6, 6, 4),
        np.array(0.0),
        (4608, 4608, 288 + 8),
    ),
    # PSPDense(6) on a 2x3x4 tensor: 6 positions * 4 * 6 = 144 MACs.
    "dense_4d_channel": (
        lambda: tf_psp.PSPDense(6, structure="channel", alpha_regularizer=None),
        (2, 3, 4),
        np.array([1.0, 0.0, 1.0, 1.0]),
        (144, 6 * 1 * 6, 6),
    ),
    # PSPDepthwiseConv2D(3, m=2) on 6x6x4 -> 4x4x8: 16*9*4*2 = 1152 MACs.
    "depthwise_filter": (
        lambda: tf_psp.PSPDepthwiseConv2D(
            3, depth_multiplier=2, structure="filter", alpha_regularizer=None
        ),
        (6, 6, 4),
        np.array([1.0, 0.0, 1.0, 1.0]),
        (1152, 16 * 9 * 2, 9 * 2 + 2),  # channel 1's 2 kernels + its 2 biases
    ),
    # PSPSeparableConv2D(5, 3, m=2) on 6x6x4 -> 4x4x5:
    # depthwise 16*9*4*2 = 1152, pointwise 16*8*5 = 640.
    "separable_channel": (
        lambda: tf_psp.PSPSeparableConv2D(
            5, 3, depth_multiplier=2, structure="channel", alpha_regularizer=None
        ),
        (6, 6, 4),
        np.array([1.0, 0.0, 1.0, 1.0]),
        # channel 1: 2 depthwise kernels (18 weights) + 2 pointwise rows (10 weights)
        (1152 + 640, 16 * (18 + 10), 18 + 10),
    ),
    "separable_column": (
        lambda: tf_psp.PSPSeparableConv2D(
            5, 3, depth_multiplier=2, structure="column", alpha_regularizer=None
        ),
        (6, 6, 4),
        _column_alpha(),
        # 10 dead columns * m=2 depthwise weights; channel 0 is dead entirely,
        # so its 2 pointwise rows (2 * 5 weights) go too.
        (1152 + 640, 16 * (20 + 10), 20 + 10),
    ),
    "separable_filter": (
        lambda: tf_psp.PSPSeparableConv2D(
            5, 3, depth_multiplier=2, structure="filter", alpha_regularizer=None
        ),
        (6, 6, 4),
        np.array([1.0, 0.0, 1.0, 0.0, 1.0]),
        (1152 + 640, 16 * 8 * 2, 8 * 2 + 2),
    ),
}


@pytest.mark.parametrize("case", sorted(PSP_CASES))
def test_pruned_macs_and_params_match_hand_counts(case):
    make_layer, input_shape, alpha, (macs, pruned_macs, pruned_params) = PSP_CASES[case]
    model = _single(make_layer(), input_shape)
    layer = model.layers[-1]
    layer.alpha.assign(alpha.astype("float32"))
    prof = profile(model)
    (row,) = prof.layers
    assert row.macs == macs
    assert row.pruned_macs == pruned_macs
    assert row.pruned_params == pruned_params
    assert row.structures_total == alpha.size
    assert row.structures_pruned == alpha.size - np.count_nonzero(alpha)
    assert prof.total_params == model.count_params()


def test_totals_sparsity_and_reduction():
    inp = keras.Input((6, 6, 4))
    conv = tf_psp.PSPConv2D(8, 3, structure="channel", alpha_regularizer=None, name="c")
    x = conv(inp)  # 4608 MACs
    x = L.Flatten()(x)  # 128
    out = tf_psp.PSPDense(2, structure="filter", alpha_regularizer=None, name="d")(x)
    model = keras.Model(inp, out)  # Dense: 256 MACs
    conv.alpha.assign([0.0, 0.0, 1.0, 1.0])
    prof = profile(model)
    assert prof.total_macs == 4608 + 256
    assert prof.pruned_macs == 2304
    assert prof.sparsity == pytest.approx(2 / (4 + 2))
    assert prof.mac_reduction == pytest.approx(4864 / (4864 - 2304))
    assert prof.mac_reduction >= 1.0


def test_epsilon_threshold_and_refresh():
    layer = tf_psp.PSPConv2D(2, 1, epsilon=0.1, alpha_regularizer=None)
    model = _single(layer, (3, 3, 4))
    prof = profile(model)
    assert prof.sparsity == 0.0
    layer.alpha.assign([0.05, -0.05, 0.1, -2.0])  # |alpha| < 0.1 is pruned
    assert prof.refresh().sparsity == 0.5
    assert prof.pruned_macs == 9 * 2 * 2


def test_all_pruned_reduction_is_infinite_and_json_safe():
    layer = tf_psp.PSPDense(2, structure="layer", alpha_regularizer=None)
    model = _single(layer, (3,))
    layer.alpha.assign(0.0)
    prof = profile(model)
    assert math.isinf(prof.mac_reduction)
    assert json.loads(json.dumps(prof.to_dict()))["mac_reduction"] is None


def test_str_and_to_dict():
    model = _plain_model()
    prof = profile(model)
    text = str(prof)
    for name in HAND_MACS:
        assert name in text
    assert "12,992" in text and "Pruned MACs %" in text
    data = json.loads(json.dumps(prof.to_dict()))
    assert data["total_macs"] == 12992
    assert [row["name"] for row in data["layers"]] == list(HAND_MACS)


def test_str_shows_psp_columns():
    layer = tf_psp.PSPConv2D(8, 3, alpha_regularizer=None, name="pspc")
    model = _single(layer, (6, 6, 4))
    layer.alpha.assign([0.0, 0.0, 1.0, 1.0])
    text = str(profile(model))
    assert "2/4" in text and "50.0" in text and "pspc (PSPConv2D)" in text


def test_unbuilt_sequential_raises_or_builds_with_input_shape():
    model = keras.Sequential([L.Dense(3)])
    with pytest.raises(ValueError, match="not built"):
        profile(model)
    prof = profile(model, input_shape=(4,))
    assert prof.total_macs == 12


def test_non_model_and_subclassed_model_raise():
    with pytest.raises(ValueError, match="keras.Model"):
        profile(L.Dense(3))

    class Sub(keras.Model):
        def __init__(self):
            super().__init__()
            self.d = L.Dense(2)

        def call(self, x):
            return self.d(x)

    model = Sub()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(ValueError, match="subclassed"):
        profile(model)


def test_unknown_spatial_dims_raise():
    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, L.Conv2D(2, 3, name="dyn")(inp))
    with pytest.raises(ValueError, match="'dyn'"):
        profile(model)


def test_input_shape_defines_unknown_dims_also_in_nested_models():
    sub_in = keras.Input((None, None, 2))
    sub = keras.Model(sub_in, L.Conv2D(3, 1, name="inner")(sub_in), name="block")
    inp = keras.Input((None, None, 2))
    x = L.Conv2D(2, 3, padding="same", name="outer")(inp)
    out = L.GlobalAveragePooling2D()(sub(x))
    model = keras.Model(inp, out)
    prof = profile(model, input_shape=(5, 4, 2))
    macs = {row.name: row.macs for row in prof.layers}
    assert macs["outer"] == 5 * 4 * 3 * 3 * 2 * 2
    assert macs["block/inner"] == 5 * 4 * 2 * 3
    assert prof.layers[0].output_shape == (5, 4, 2)
