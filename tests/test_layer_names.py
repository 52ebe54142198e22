"""Layer names stay the user's across parameterize -> strip_and_shrink -> parameterize ->
strip_and_shrink, so reports and error messages name the layers the user wrote.

Oracle: the names of the original model (every layer, sublayers of composite layers
included), read before any tf_psp call.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import compat
from tf_psp.functional import clone_with_weights, relative_error

L = keras.layers


class SuffixingBlock(L.Layer):
    """A composite layer whose constructor appends '_0' to its name and names its sublayer
    after the result, as keras-hub 0.32's MobileNet DepthwiseConvBlock does. It reads a
    weight of its own, so tf_psp keeps it whole (`tf_psp.inline`) and copies it."""

    def __init__(self, units, name=None, **kwargs):
        super().__init__(name=f"{name}_0", **kwargs)
        self.units = units
        self.dense = L.Dense(units, name=f"{self.name}_dense")

    def build(self, input_shape):
        self.dense.build(input_shape)
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x):
        return self.dense(x) * self.gain

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _model():
    image = keras.Input((8, 8, 3), name="image")
    h = L.Conv2D(8, 3, padding="same", activation="relu", name="stem")(image)
    inner_in = keras.Input((8, 8, 8))
    inner = L.Conv2D(8, 1, activation="relu", name="mix")(inner_in)
    h = keras.Model(inner_in, inner, name="stage")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    h = SuffixingBlock(6, name="block_0")(h)
    return keras.Model(image, L.Dense(3, name="head")(h), name="net")


def _names(model):
    """Input names, then every layer (nested models' and composites' sublayers included)."""
    return ([t.name for t in model.inputs],
            sorted(layer.name for layer in compat.flatten_layers(model)
                   if not isinstance(layer, (keras.Model, L.InputLayer))))


def test_a_suffixing_constructor_keeps_its_name_when_cloned():
    model = _model()
    assert model.get_layer("block_0_0").dense.name == "block_0_0_dense"
    copy = clone_with_weights(model)
    assert _names(copy) == _names(model)
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    assert relative_error(model(x), copy(x)) == 0.0


@pytest.mark.parametrize("coupling", ["layer", "group"])
def test_names_survive_two_rounds_of_parameterize_and_shrink(coupling):
    model = _model()
    expected = _names(model)
    x = model
    for _ in range(2):
        psp = tf_psp.parameterize(x, coupling=coupling)
        x = tf_psp.strip_and_shrink(psp)
        assert _names(x) == expected
        assert _names(tf_psp.strip(psp)) == expected


def test_errors_name_the_users_layers_after_two_rounds():
    x = _model()
    for _ in range(2):
        x = tf_psp.strip_and_shrink(tf_psp.parameterize(x))
    plan = tf_psp.pruning_plan(x)
    assert any("'block_0_0'" in reason for reason in plan.frozen), plan.frozen


def test_keras_hub_mobilenet_block_names_do_not_drift():
    keras_hub = pytest.importorskip("keras_hub")
    model = keras_hub.models.MobileNetBackbone(
        stackwise_expansion=[[4], [6]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[16], [24]], stackwise_kernel_size=[[3], [5]],
        stackwise_num_strides=[[2], [1]], stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]], stackwise_padding=[[1], [2]],
        output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, last_layer_filter=32, image_shape=(32, 32, 3))

    def named(m):  # top-level layers, and the sublayers keras-hub names after its blocks
        return ([layer.name for layer in m.layers],
                sorted(layer.name for layer in compat.flatten_layers(m)
                       if layer.name.startswith("block_")))

    blocks, _ = named(model)
    sublayers = [layer.name for layer in compat.flatten_layers(model)
                 if layer.name.startswith("block_") and not compat.sublayers(layer)]
    assert "block_0_0" in blocks and "block_0_0_conv1" in sublayers
    x, rounds = model, []
    for _ in range(2):
        x = tf_psp.strip_and_shrink(tf_psp.parameterize(x, coupling="layer"))
        rounds.append(named(x))
    # the blocks are inlined: their sublayers are the flat model's layers, named as
    # keras-hub named them (its unnamed ReLUs `re_lu_N` get their block's prefix)
    assert rounds[0] == rounds[1]
    flat = set(rounds[0][0])
    assert set(sublayers) <= flat and not flat & {"block_0_0", "block_1_0", "block_2_0_se"}
    assert any(name.startswith("block_0_0_re_lu") for name in flat), flat  # re_lu_N
