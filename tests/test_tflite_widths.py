"""Copies of a converted layer at other widths (tf_psp.tflite_widths) against the oracle:
the same layer rebuilt and converted at those widths by the TFLite converter."""

import keras
import numpy as np
import pytest

from tf_psp import latency, latency_targets
from tf_psp.tflite_widths import choose_markers

L = keras.layers


def _structure(content, key):
    """Per op of signature `key`: (builtin code, input shapes, output shapes)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(bytearray(content), 0))
    sig = next(s for s in model.signatureDefs if s.signatureKey.decode() == key)
    graph = model.subgraphs[sig.subgraphIndex]

    def shape(t):
        if t < 0:
            return None
        tensor = graph.tensors[t]
        q = tensor.quantization
        scales = 0 if q is None or q.scale is None else len(q.scale)
        return tuple(int(d) for d in tensor.shape) + (tensor.type, scales)

    return [(model.operatorCodes[op.opcodeIndex].builtinCode,
             [shape(int(t)) for t in op.inputs], [shape(int(t)) for t in op.outputs])
            for op in graph.operators]


def _model():
    x = keras.Input((12, 12, 24))
    h = L.Conv2D(20, 3, strides=2, padding="same", activation="relu", name="conv")(x)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", name="dw2")(h)
    h = L.SeparableConv2D(16, 3, padding="same", name="sep")(h)
    h = L.Conv2DTranspose(12, 2, strides=2, name="up")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(x, L.Dense(10, name="fc")(h))


def _converted(points, quantization):
    """The oracle: each point's layer converted by the TFLite converter at its widths."""
    models = latency.layer_models(points)
    if quantization is None:
        return latency_targets.convert_archive(models)
    content = latency_targets.convert_function(models, quantization)  # one subgraph
    where = latency_targets.target(quantization=quantization)
    return where.patcher([content], latency_targets._identity(models)).batch(  # split only
        [(k, 0, 0) for k in range(len(models))])


def _check_copies(points, quantization=None):
    calls = list({id(c): c for c, _, _ in points}.values())
    patcher = latency._templates(calls, None, latency_targets.target(quantization=quantization))
    assert patcher.ids == {id(c) for c in calls}
    copied, keys = patcher.batch([(id(c), i, o) for c, i, o in points])
    converted, converted_keys = _converted(points, quantization)
    for (call, cin, cout), key, other in zip(points, keys, converted_keys):
        ours, theirs = _structure(copied, key), _structure(converted, other)
        assert ours == theirs, (call.name, cin, cout)
        assert theirs[-1][2][0][-3] == cout  # the oracle has the width we asked for
    # the copies run, one output each at the asked width
    seconds = latency_targets.time_signatures(copied, keys, 1, 2,
                                              outputs=[o for _, _, o in points])
    assert all(s > 0 for s in seconds)
    with pytest.raises(ValueError, match="output width"):
        latency_targets.time_signatures(copied, keys[:1], 1, 1, outputs=[99])


def test_copies_match_the_converter():
    calls = {c.name: c for c in latency.kernel_calls(_model())}
    assert set(calls) == {"conv", "dw", "dw2", "sep", "up", "fc"}
    _check_copies([(calls["conv"], 11, 20), (calls["dw2"], 13, 26)])


def test_int8_copies_match_the_converter():
    """Int8 weights, int32 biases and one quantization scale per output channel at the new
    width, as the converter's own full-integer conversion at that width has them."""
    calls = {c.name: c for c in latency.kernel_calls(_model())}
    _check_copies([(calls["conv"], 11, 20), (calls["dw2"], 13, 26), (calls["fc"], 6, 10)],
                  quantization="int8")


@pytest.mark.slow
def test_copies_of_every_kernel_layer_match_the_converter():
    calls = {c.name: c for c in latency.kernel_calls(_model())}
    _check_copies([(calls["conv"], 24, 9), (calls["conv"], 11, 20), (calls["dw"], 7, 7),
                   (calls["dw2"], 13, 26), (calls["sep"], 9, 14), (calls["up"], 16, 5),
                   (calls["fc"], 6, 10)])


def test_markers_avoid_the_other_dimensions():
    assert choose_markers(64, 64, {56, 3}) == (64, 63)
    assert choose_markers(56, 57, {56, 3}) == (55, 57)
    c_in, c_out = choose_markers(32, 64, {32, 3}, multipliers=(2,), tied=True)
    assert (c_in, c_out) == (31, 62)
    c_in, c_out = choose_markers(20, 40, {40}, multipliers=(1, 2))
    assert c_out not in {c_in, 2 * c_in, 40}
    assert choose_markers(3, 32, {224, 3}) is None  # no input width above 4
    assert choose_markers(8, 8, set(range(5, 9))) is None


def test_a_layer_without_markers_is_converted_per_width(tmp_path):
    x = keras.Input((6, 6, 3))
    model = keras.Model(x, L.Conv2D(8, 3, name="stem")(x))
    (call,) = latency.kernel_calls(model)
    patcher = latency._templates([call], None, latency_targets.target())
    assert not patcher.ids
    seconds = latency.measure_points([(call, 3, 8), (call, 3, 7)], runs=2, cache_dir=tmp_path,
                                     progress=False)
    assert len(seconds) == 2 and all(s > 0 for s in seconds)


def test_load_warns_once_in_our_words(monkeypatch):
    import warnings

    monkeypatch.setattr(latency, "_warned", [])
    with pytest.warns(RuntimeWarning, match="other programs held this core 70% of the time"):
        latency._check_share(3.0, 10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        latency._check_share(2.0, 10.0)  # said once
        monkeypatch.setattr(latency, "_warned", [])
        latency._check_share(6.0, 10.0)  # a core of our own for most of it
        latency._check_share(0.1, 0.5)  # too short to tell
    assert np.isclose(latency.SHARE_WARNING, 0.5)
