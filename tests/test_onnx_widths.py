"""Copies of a converted layer at other widths (tf_psp.onnx_widths) against the oracle:
the same layer rebuilt at those widths and converted by tf2onnx."""

import keras
import numpy as np
import pytest

from tf_psp import latency, latency_targets

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                                reason="tf2onnx converts TensorFlow functions")
L = keras.layers


def _model():
    x = keras.Input((12, 12, 24))
    h = L.Conv2D(20, 3, strides=2, padding="same", activation="relu", name="conv")(x)
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.DepthwiseConv2D(3, depth_multiplier=2, padding="valid", name="dw2")(h)
    h = L.SeparableConv2D(16, 3, padding="same", name="sep")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(x, L.Dense(10, name="fc")(h))


def _structure(model):
    """Per node: (op type, its int attributes, the shapes of its initializer inputs), and
    the graph's input and output shapes."""
    from onnx import numpy_helper

    inits = {t.name: tuple(numpy_helper.to_array(t).shape) for t in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        ints = sorted((a.name, a.i) for a in node.attribute if a.type == a.INT)
        nodes.append((node.op_type, ints, [inits.get(i) for i in node.input]))
    shapes = [tuple(d.dim_value for d in v.type.tensor_type.shape.dim)
              for v in list(model.graph.input) + list(model.graph.output)]
    return nodes, shapes


def _oracle(points):
    from onnx import utils

    proto = latency_targets.convert_onnx(latency.layer_models(points), nchw=True)
    extractor = utils.Extractor(proto)
    return [extractor.extract_model([f"x{k}"], [f"y{k}"]) for k in range(len(points))]


def test_copies_match_tf2onnx():
    import onnx

    calls = {c.name: c for c in latency.kernel_calls(_model())}
    points = [(calls["conv"], 11, 20), (calls["conv"], 24, 9), (calls["dw"], 7, 7),
              (calls["dw2"], 13, 26), (calls["sep"], 9, 14), (calls["fc"], 6, 10)]
    where = latency_targets.target("onnxruntime")
    patcher = latency._templates(list(calls.values()), None, where)
    assert patcher.ids == {id(c) for c in calls.values()}
    copies = patcher.batch([(id(c), i, o) for c, i, o in points])
    for (call, cin, cout), ours, theirs in zip(points, copies, _oracle(points)):
        mine, oracle = _structure(onnx.load_from_string(ours)), _structure(theirs)
        assert mine == oracle, (call.name, cin, cout)
        assert oracle[1][-1][1] == cout  # NCHW: the oracle has the width we asked for
    # the copies load and run, one output each at the asked width
    seconds = where.time_copies(patcher, [(id(c), i, o) for c, i, o in points], 2,
                                outputs=[o for _, _, o in points])
    assert len(seconds) == len(points) and all(s > 0 for s in seconds)
    with pytest.raises(ValueError, match="expected width 99"):
        where.time_copies(patcher, [(id(calls["fc"]), 6, 10)], 1, outputs=[99])


def test_a_copy_that_does_not_fit_fails_to_load():
    """A copy whose input width does not match its weights is refused by ONNX Runtime
    (`measure_points` then converts the batch): no silent wrong timing."""
    calls = {c.name: c for c in latency.kernel_calls(_model())}
    where = latency_targets.target("onnxruntime")
    patcher = latency._templates([calls["conv"]], None, where)
    (blob,) = patcher.batch([(id(calls["conv"]), 11, 20)])
    import onnx

    model = onnx.load_from_string(blob)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 12  # 12 channels in, 11 read
    with pytest.raises((RuntimeError, ValueError)):
        where._time([model.SerializeToString()], 1)
    assert np.isfinite(where._time([blob], 1)[0])
