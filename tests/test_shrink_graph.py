"""ChannelGraph and strip_and_shrink on less common graphs: nested models,
several inputs and outputs, shared layers, keras.ops nodes, 1-D convs,
Dense on 3-D tensors, and a handler registered for a custom layer."""

import keras
import numpy as np

import tf_psp
from tf_psp import graph as psp_graph
from tf_psp.shrink import strip, strip_and_shrink

from conftest import randomize_biases_and_batchnorm, set_alpha

L = keras.layers


def _dead(n, dead):
    return [0 if i in dead else 1 for i in range(n)]


def test_nested_model_is_inlined_and_stripped(check_shrink):
    inner_in = keras.Input((6, 6, 4))
    inner = keras.Model(inner_in, tf_psp.PSPConv2D(4, 1, structure="channel", name="ic")(inner_in),
                        name="inner")
    inputs = keras.Input((6, 6, 3))
    x = tf_psp.PSPConv2D(4, 3, padding="same", structure="filter", name="c1")(inputs)
    x = inner(x)
    x = tf_psp.PSPConv2D(3, 1, structure="channel", name="c2")(x)
    outputs = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("c1"), _dead(4, {1}))
    set_alpha(inner.get_layer("ic"), _dead(4, {2}))
    set_alpha(model.get_layer("c2"), _dead(4, {0}))
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    # the nested model is inlined: c1 loses its dead filter 1 and the input 2 that
    # 'ic' ignores, 'ic' the output 0 that c2 ignores; the shrunk model is flat
    shrunk, _ = check_shrink(model, x, {"c1": 2, "ic": 3, "c2": 3})
    assert type(shrunk.get_layer("ic")) is L.Conv2D
    assert type(strip(model).get_layer("inner").get_layer("ic")) is L.Conv2D


def test_two_inputs_two_outputs_shared_layer_and_ops():
    a_in, b_in = keras.Input((8, 3), name="a"), keras.Input((8, 3), name="b")
    conv = tf_psp.PSPConv1D(6, 3, padding="same", structure="filter", name="shared")
    a = L.ReLU(name="ra")(conv(a_in))
    b = L.ReLU(name="rb")(conv(b_in))
    a = tf_psp.PSPConv1D(5, 1, structure="channel", name="ca")(a)
    b = keras.ops.relu(tf_psp.PSPConv1D(5, 1, structure="channel", name="cb")(b))
    h = tf_psp.PSPDense(4, structure="channel", name="seq_dense")(L.Add(name="add")([a, b]))
    out1 = L.GlobalAveragePooling1D(name="gap")(h)
    out2 = L.Dense(2, name="head2")(h)
    model = keras.Model({"a": a_in, "b": b_in}, [out1, out2])
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("shared"), _dead(6, {0, 1}))
    set_alpha(model.get_layer("ca"), _dead(6, {2, 3}))
    set_alpha(model.get_layer("cb"), _dead(6, {3}))
    set_alpha(model.get_layer("seq_dense"), _dead(5, {1, 4}))
    rng = np.random.default_rng(0)
    x = {"a": rng.normal(size=(2, 8, 3)).astype("float32"),
         "b": rng.normal(size=(2, 8, 3)).astype("float32")}
    before = [w.copy() for w in model.get_weights()]
    shrunk, report = strip_and_shrink(model, return_report=True)
    for ref, out in zip(model(x, training=False), shrunk(x, training=False)):
        ref, out = keras.ops.convert_to_numpy(ref), keras.ops.convert_to_numpy(out)
        assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    widths = {r["name"]: r["channels_after"] for r in report.to_dict()["layers"]}
    # the shared conv is frozen; cb's output passes an elementwise keras.ops node
    # (relu), which passes channels through: seq_dense's ignored inputs {1, 4} go
    # from both branches joined by the Add.
    assert widths["shared"] == 6 and widths["ca"] == 3 and widths["cb"] == 3
    assert "is shared" in str(report)
    for w0, w1 in zip(before, model.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_dense_on_sequences(check_shrink):
    model = keras.Sequential([
        keras.Input((5, 4)),
        tf_psp.PSPDense(8, activation="relu", structure="filter", name="d1"),
        L.LayerNormalization(name="ln"),  # mixes channels: frozen
        tf_psp.PSPDense(6, activation="relu", structure="filter", name="d2"),
        tf_psp.PSPDense(3, structure="channel", name="d3"),
    ])
    randomize_biases_and_batchnorm(model)
    set_alpha(model.get_layer("d1"), _dead(8, {0, 5}))
    set_alpha(model.get_layer("d2"), _dead(6, {1, 2, 3}))
    set_alpha(model.get_layer("d3"), _dead(6, {0}))
    x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
    _, report = check_shrink(model, x, {"d1": 8, "ln": 8, "d2": 2, "d3": 3})
    assert "'ln' (LayerNormalization)" in str(report)


class Twice(L.Layer):
    def call(self, x):
        return 2.0 * x


class TwiceHandler(psp_graph.PassThroughHandler):
    pass


def test_registering_a_handler_unfreezes_a_custom_layer(check_shrink):
    def build():
        inputs = keras.Input((6, 6, 3))
        x = tf_psp.PSPConv2D(4, 3, padding="same", name="c1")(inputs)
        x = Twice(name="twice")(x)
        outputs = tf_psp.PSPDense(2, structure="channel", name="fc")(
            L.GlobalAveragePooling2D()(x))
        model = keras.Model(inputs, outputs)
        randomize_biases_and_batchnorm(model)
        set_alpha(model.get_layer("fc"), _dead(4, {1, 2}))
        return model

    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    check_shrink(build(), x, {"c1": 4})
    psp_graph.REGISTRY[Twice] = TwiceHandler
    try:
        check_shrink(build(), x, {"c1": 2, "twice": 2})
    finally:
        del psp_graph.REGISTRY[Twice]
