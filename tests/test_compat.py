"""tf_psp.compat: every Keras internal tf_psp reads, exercised on the pinned Keras.

When a Keras upgrade moves one of them, this file fails first and names it.
"""

import keras
import pytest

from tf_psp import compat

L = keras.layers


def _model():
    i = keras.Input((4, 4, 2), name="x")
    a = L.Conv2D(3, 1, name="a")(i)
    b = L.ReLU(name="b")(a)
    inner = keras.Sequential([keras.Input((3,)), L.Dense(2, name="inner_dense")], name="inner")
    o = inner(L.GlobalAveragePooling2D(name="gap")(b))
    return keras.Model({"x": i}, [o, b], name="m"), inner


def test_pinned_keras_version():
    assert keras.__version__ == compat.KERAS_VERSION, (
        f"Keras {keras.__version__} is not the version tf_psp.compat was checked against "
        f"({compat.KERAS_VERSION}): run tests/test_compat.py, fix the accessors that fail, "
        "then update KERAS_VERSION.")


def test_graph_accessors():
    model, inner = _model()
    assert compat.is_functional(model) and compat.is_graph_model(model)
    assert compat.is_graph_model(inner) and not compat.is_graph_model(L.Dense(1))
    assert compat.graph_of(inner) is not None
    names = [n.operation.name for n in compat.nodes_in_order(model) if not n.is_input]
    assert names == ["a", "b", "gap", "inner"]
    assert set(compat.nodes_by_depth(model)) == {0, 1, 2, 3, 4}
    assert [t.name for t in compat.flat_inputs(model)] == ["x"]
    assert isinstance(compat.inputs_struct(model), dict)
    assert isinstance(compat.outputs_struct(model), list)


def test_layer_and_tensor_accessors():
    model, _ = _model()
    a, b = model.get_layer("a"), model.get_layer("b")
    assert [n.operation for n in compat.outbound_nodes(a)] == [b]
    (node,) = compat.inbound_nodes(b)
    (tensor,) = node.input_tensors
    assert compat.producer(tensor) is a
    operation, node_index, tensor_index = compat.keras_history(tensor)
    assert (operation, node_index, tensor_index) == (a, 0, 0)
    names = [layer.name for layer in compat.flatten_layers(model)]
    assert names[:5] == ["x", "a", "b", "gap", "inner"] and "inner_dense" in names
    assert tuple(compat.build_input_shape(a)) == (None, 4, 4, 2)


@pytest.mark.parametrize("use_gate", [False, True])
def test_attention_accessors(use_gate):
    mha = keras.layers.MultiHeadAttention(2, 3, use_gate=use_gate)
    mha(keras.Input((4, 5)), keras.Input((4, 5)))
    names = [d.name for d in compat.attention_projections(mha)]
    assert names == ["query", "key", "value", "attention_output"]
    gate = compat.attention_gate(mha)
    assert (gate is not None) == use_gate
    if use_gate:
        assert tuple(gate.kernel.shape) == (5, 2, 3)


def test_subclassed_model_has_no_graph():
    class Sub(keras.Model):
        def call(self, x):
            return x

    assert compat.graph_of(Sub()) is None
    with pytest.raises(AttributeError):
        compat.nodes_by_depth(Sub())


def test_sublayers_of_a_composite_layer():
    class Block(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.conv = L.Conv2D(2, 1, name="conv")
            self.inner = keras.Sequential([L.Dense(2, name="deep")], name="seq")

        def call(self, x):
            return self.inner(self.conv(x))

    block = Block()
    block(keras.ops.zeros((1, 2, 2, 3)))
    names = {layer.name for layer in compat.sublayers(block)}
    assert {"conv", "seq", "deep"} <= names and block.name not in names
    assert compat.sublayers(L.Dense(1)) == []
    assert compat.sublayers(keras.Operation()) == []  # an op node, not a layer


def test_keras_mask_of_a_symbolic_tensor():
    ids = keras.Input((5,), dtype="int32")
    assert compat.keras_mask(L.Embedding(9, 4, mask_zero=True)(ids)) is not None
    assert compat.keras_mask(L.Embedding(9, 4)(ids)) is None


def test_node_counts_are_restored_after_a_symbolic_call():
    a, b = L.Dense(3, name="a"), L.Dense(2, name="b")
    b(a(keras.Input((4,))))
    counts = compat.node_counts([a, b])
    assert [c[1:] for c in counts] == [(1, 1), (1, 0)]  # a feeds b once
    b(a(keras.Input((4,))))
    assert len(a._inbound_nodes) == 2 and len(a._outbound_nodes) == 2
    compat.restore_node_counts(counts)
    assert [c[1:] for c in compat.node_counts([a, b])] == [(1, 1), (1, 0)]


def test_callback_list_of_finds_the_running_list_and_its_order():
    found = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            found["list"] = compat.callback_list_of(self)

    first, probe = keras.callbacks.History(), Probe()
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    model.fit(keras.ops.ones((4, 2)), keras.ops.ones((4, 1)), epochs=1, verbose=0,
              callbacks=[first, probe])
    callbacks = found["list"].callbacks
    assert callbacks.index(first) < callbacks.index(probe)
    assert compat.callback_list_of(probe) is None  # outside fit()


def test_attention_output_spec_ignores_unknown_arguments_only_when_they_are_none():
    class Cached(L.MultiHeadAttention):
        def call(self, query, value, key=None, attention_mask=None, cache=None, training=None):
            return super().call(query, value, key=key, attention_mask=attention_mask)

    compat.tolerate_unused_attention_arguments()
    compat.tolerate_unused_attention_arguments()  # idempotent
    x = keras.Input((5, 8))
    layer = Cached(2, 4)
    assert layer(x, x, cache=None).shape == (None, 5, 8)  # symbolic: compute_output_spec
    with pytest.raises(TypeError, match="cache"):
        layer.compute_output_spec(x, x, cache=x)
