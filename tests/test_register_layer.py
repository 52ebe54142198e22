"""The public extension API: tf_psp.register_layer with tf_psp.handlers.

Custom layers unknown to tf_psp freeze their channels; registered with a
handler, channels are removed through them, the shrunk model equals the PSP
model, and it saves and loads. Oracle: the PSP model's outputs.
"""

import keras
import numpy as np
import pytest

import tf_psp

L = keras.layers


@keras.saving.register_keras_serializable(package="test_register_layer")
class ScaledSwish(L.Layer):
    """x * sigmoid(beta * x): a custom activation without weights."""

    def __init__(self, beta=1.5, **kwargs):
        super().__init__(**kwargs)
        self.beta = beta

    def call(self, x):
        return x * keras.ops.sigmoid(self.beta * x)

    def get_config(self):
        return {**super().get_config(), "beta": self.beta}


@keras.saving.register_keras_serializable(package="test_register_layer")
class ChannelScale(L.Layer):
    """LayerScale-like: per-channel gamma and shift, width inferred from the input."""

    def build(self, input_shape):
        self.gamma = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="gamma")
        self.shift = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="shift")

    def call(self, x):
        return x * self.gamma + self.shift


@keras.saving.register_keras_serializable(package="test_register_layer")
class WidthScale(L.Layer):
    """Like ConvNeXt's LayerScale: the width is a constructor argument."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.gamma = self.add_weight(shape=(dim,), initializer="ones", name="gamma")

    def call(self, x):
        return x * self.gamma

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


def _model(custom):
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(12, 3, padding="same", name="c1")(i)
    x = custom(x)
    y = L.Conv2D(12, 1, name="c2")(x)
    x = L.Add(name="add")([x, y])
    x = L.Conv2D(10, 1, name="c3")(x)
    return keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)))


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if layer.weights:
            layer.set_weights([rng.uniform(0.3, 1.2, w.shape).astype("float32")
                               if "alpha" not in v.path else np.ones(w.shape, "float32")
                               for v, w in zip(layer.weights, layer.get_weights())])
    return model


CASES = {
    "swish": (lambda: ScaledSwish(name="custom"), tf_psp.handlers.Channelwise()),
    "scale": (lambda: ChannelScale(name="custom"),
              tf_psp.handlers.Channelwise(weights=["gamma", "shift"])),
    "width": (lambda: WidthScale(12, name="custom"),
              tf_psp.handlers.Channelwise(weights=["gamma"], width_key="dim")),
}


@pytest.fixture
def registered():
    done = []

    def register(cls, handler):
        tf_psp.register_layer(cls, handler)
        done.append(cls)

    yield register
    for cls in done:
        tf_psp.unregister_layer(cls)


def _zero_stream_reads(psp, channels):
    for name in ("c2", "c3"):  # every reader of the stream through the custom layer
        alpha = np.ones(12, "float32")
        alpha[channels] = 0
        psp.get_layer(name).alpha.assign(alpha)
    return psp


@pytest.mark.parametrize("case", sorted(CASES))
def test_unregistered_layer_keeps_channels_and_says_why(case):
    make, _ = CASES[case]
    psp = _zero_stream_reads(_randomize(tf_psp.parameterize(_model(make()))), [0, 3, 5])
    small, report = tf_psp.strip_and_shrink(psp, return_report=True)
    assert "layer 'custom'" in str(report) and "not understood" in str(report)
    assert small.get_layer("c1").filters == 12


@pytest.mark.parametrize("case", sorted(CASES))
def test_registered_layer_removes_the_same_channels(case, registered):
    make, handler = CASES[case]
    registered(type(make()), handler)
    psp = _zero_stream_reads(_randomize(tf_psp.parameterize(_model(make()))), [0, 3, 5])
    small = tf_psp.strip_and_shrink(psp)
    assert small.get_layer("c1").filters == 9
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(psp(x, training=False))
    out = keras.ops.convert_to_numpy(small(x, training=False))
    assert np.max(np.abs(ref - out)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("coupling", ["layer", "group"])
def test_registered_layer_shrinks_exactly_through_it(case, coupling, registered, tmp_path):
    make, handler = CASES[case]
    registered(type(make()), handler)
    psp = _randomize(tf_psp.parameterize(_model(make()), coupling=coupling,
                                         alpha_regularizer=None))
    pruned = tf_psp.prune_to_budget(psp, 0.5)
    small = tf_psp.strip_and_shrink(pruned)
    kept = tf_psp.profile(small).total_macs / tf_psp.profile(psp).total_macs
    assert 0.47 <= kept <= 0.5
    width = small.get_layer("c1").filters
    assert width < 12  # the stream through the custom layer lost channels
    custom = small.get_layer("custom")
    assert all(w.shape[-1] == width for w in custom.get_weights())
    x = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype("float32")
    ref = keras.ops.convert_to_numpy(pruned(x, training=False))
    out = keras.ops.convert_to_numpy(small(x, training=False))
    assert np.max(np.abs(ref - out)) <= 1e-5 * np.max(np.abs(ref))
    path = str(tmp_path / "small.keras")
    small.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)), out, rtol=1e-6,
                               atol=1e-6)


def test_constant_channels_pass_through_a_registered_activation(registered):
    registered(ScaledSwish, tf_psp.handlers.Channelwise())
    i = keras.Input((6, 6, 2))
    x = ScaledSwish(name="custom")(L.Conv2D(6, 3, padding="same", name="c1")(i))
    model = keras.Model(i, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    psp = _randomize(tf_psp.parameterize(model, structure="filter"))
    alpha = np.ones(6, "float32")
    alpha[[1, 4]] = 0  # filters 1, 4 output swish(bias): constants folded into the head
    psp.get_layer("c1").alpha.assign(alpha)
    small = tf_psp.strip_and_shrink(psp)
    assert small.get_layer("c1").filters == 4
    x = np.random.default_rng(2).normal(size=(2, 6, 6, 2)).astype("float32")
    ref = keras.ops.convert_to_numpy(psp(x, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(small(x)), ref, rtol=1e-5, atol=1e-6)


def test_subclass_with_own_call_of_a_registered_layer_is_frozen():
    class Doubled(L.ReLU):
        def call(self, x):
            return 2.0 * super().call(x)

    i = keras.Input((6, 6, 2))
    x = Doubled(name="doubled")(L.Conv2D(6, 3, padding="same", name="c1")(i))
    model = keras.Model(i, L.Dense(2, name="head")(L.GlobalAveragePooling2D()(x)))
    psp = tf_psp.parameterize(model, coupling="layer")
    psp.get_layer("head").alpha.assign(np.array([1, 0, 1, 0, 1, 1], "float32"))
    small, report = tf_psp.strip_and_shrink(psp, return_report=True)
    assert small.get_layer("c1").filters == 6
    assert "own call()" in str(report)


def test_registered_macs_are_counted(registered):
    class Mixer(L.Layer):
        def call(self, x):
            return x

    class MixerMacs(tf_psp.handlers.Frozen):
        def macs(self, layer, input_shapes, output_shapes):
            return 7 * input_shapes[0][-1]

    registered(Mixer, MixerMacs())
    i = keras.Input((4, 5))
    model = keras.Model(i, Mixer(name="mixer")(i))
    assert {r.name: r.macs for r in tf_psp.profile(model).layers}["mixer"] == 35


def test_bad_registrations():
    with pytest.raises(TypeError, match="class"):
        tf_psp.register_layer("ReLU", tf_psp.handlers.PassThrough())
    with pytest.raises(TypeError, match="lacks"):
        tf_psp.register_layer(ScaledSwish, object())


def test_wrong_weight_name_freezes_with_reason(registered):
    registered(ChannelScale, tf_psp.handlers.Channelwise(weights=["beta"]))
    psp = _randomize(tf_psp.parameterize(_model(ChannelScale(name="custom"))))
    _, report = tf_psp.strip_and_shrink(_zero_stream_reads(psp, [1, 2]), return_report=True)
    assert "no weight named 'beta'" in str(report)
