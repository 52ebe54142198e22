"""Composite layers (a layer whose `call` runs its own sublayers) inlined into a flat graph.

Scenario tests of `tf_psp.inline`: hand-written composite blocks are opened so the channel
graph sees their sublayers; blocks that cannot be opened faithfully are kept whole with
the reason. Oracle: the original model's outputs on random inputs (and, for pruning, the
pruned model's outputs, and MACs counted by `tf_psp.profile` on the original model).
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import compat, inline
from tf_psp.functional import relative_error

L = keras.layers


class ResBlock(L.Layer):
    """conv -> BN -> relu (a keras.ops call) -> conv, plus the input."""

    def __init__(self, filters, **kwargs):
        super().__init__(**kwargs)
        self.filters = filters
        self.conv1 = L.Conv2D(filters, 3, padding="same", name="conv1")
        self.bn = L.BatchNormalization(name="bn")
        self.conv2 = L.Conv2D(filters, 1, name="conv2")

    def call(self, x):
        return x + self.conv2(keras.ops.relu(self.bn(self.conv1(x))))

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


class MLP(L.Layer):
    """Dense up -> gelu -> Dense down; one Dropout object after both (as keras-hub's ViT MLP)."""

    def __init__(self, width, hidden, **kwargs):
        super().__init__(**kwargs)
        self.width, self.hidden = width, hidden
        self.up = L.Dense(hidden, activation="gelu", name="up")
        self.down = L.Dense(width, name="down")
        self.dropout = L.Dropout(0.1)

    def call(self, x):
        return self.dropout(self.down(self.dropout(self.up(x))))

    def get_config(self):
        return {**super().get_config(), "width": self.width, "hidden": self.hidden}


class Encoder(L.Layer):
    """A composite of composites: two residual MLP blocks."""

    def __init__(self, width, hidden, **kwargs):
        super().__init__(**kwargs)
        self.width, self.hidden = width, hidden
        self.blocks = [MLP(width, hidden, name=f"mlp_{k}") for k in range(2)]

    def call(self, x):
        for block in self.blocks:
            x = x + block(x)
        return x

    def get_config(self):
        return {**super().get_config(), "width": self.width, "hidden": self.hidden}


def _cnn():
    inputs = keras.Input((8, 8, 3))
    x = L.Conv2D(8, 3, padding="same", name="stem")(inputs)
    x = ResBlock(8, name="res")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(4, name="head")(x))


def _sequence_model():
    inputs = keras.Input((6, 8))
    x = L.Dense(16, name="embed")(inputs)
    x = Encoder(16, 48, name="encoder")(x)
    x = L.GlobalAveragePooling1D(name="pool")(x)
    return keras.Model(inputs, L.Dense(3, name="head")(x))


def _x(model, seed=0):
    shape = (2,) + tuple(model.inputs[0].shape[1:])
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in compat.flatten_layers(model):
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c),
                               rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])
        elif isinstance(getattr(layer, "bias", None), keras.Variable):
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))


def test_a_composite_block_is_inlined_computes_the_same_and_leaves_the_model_alone():
    model = _cnn()
    _randomize(model)
    block = model.get_layer("res")
    weights = [w.copy() for w in model.get_weights()]
    nodes = compat.node_counts(compat.sublayers(block))
    x = _x(model)
    flat = inline.inline_nested(model)
    names = [layer.name for layer in flat.layers]
    assert {"res_conv1", "res_bn", "res_conv2"} <= set(names) and "res" not in names
    assert relative_error(model(x), flat(x)) <= 1e-6
    assert compat.node_counts(compat.sublayers(block)) == nodes  # no node left behind
    for w in flat.weights:  # the flat model holds copies: changing them changes nothing
        w.assign(np.zeros(w.shape, w.dtype))
    assert all(np.array_equal(a, b) for a, b in zip(weights, model.get_weights()))


def test_composites_of_composites_are_inlined_all_the_way_down():
    model = _sequence_model()
    _randomize(model)
    flat = inline.inline_nested(model)
    names = [layer.name for layer in flat.layers]
    assert "encoder_mlp_0_up" in names and "encoder_mlp_1_down" in names, names
    assert not any(compat.sublayers(layer) for layer in flat.layers)
    # MLP's one Dropout, called after both Dense layers: one copy per call, not shared
    assert sum(type(layer) is L.Dropout for layer in flat.layers) == 4
    x = _x(model)
    assert relative_error(model(x), flat(x)) <= 1e-6


@pytest.mark.parametrize("make", [_cnn, _sequence_model])
def test_prune_to_budget_reaches_into_composite_blocks(make, tmp_path):
    model = make()
    _randomize(model)
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance="random")
    shrunk = tf_psp.strip_and_shrink(pruned)
    x = _x(model)
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    assert relative_error(model(x), pruned(x)) > 1e-6
    dense = tf_psp.profile(model)
    assert dense.uncounted == []  # the composite counted from its sublayers (oracle)
    assert dense.total_macs / tf_psp.profile(shrunk).total_macs >= 1.6
    path = str(tmp_path / "shrunk.keras")
    shrunk.save(path)
    assert relative_error(shrunk(x), keras.models.load_model(path)(x)) <= 1e-6


def test_integer_inputs_carry_no_channels():
    """A token mask `(None, None)` int input reaches a composite block: it is read by
    keras.ops only and has no channels, so the block's units stay prunable."""

    class MaskedMLP(MLP):
        def call(self, x, padding_mask):
            keep = keras.ops.cast(keras.ops.expand_dims(padding_mask, -1), x.dtype)
            return self.down(self.up(x)) * keep

    tokens = keras.Input((None, 8), name="tokens")
    mask = keras.Input((None,), dtype="int32", name="mask")
    out = MaskedMLP(8, 32, name="mlp")(tokens, padding_mask=mask)
    model = keras.Model([tokens, mask], L.Dense(2, name="head")(out))
    shape = [(5, 8), (5,)]
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance="random",
                                    input_shape=shape)
    shrunk = tf_psp.strip_and_shrink(pruned)
    rng = np.random.default_rng(0)
    x = [rng.normal(size=(2, 5, 8)).astype("float32"), np.array([[1] * 5, [1, 1, 1, 0, 0]])]
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    assert shrunk.get_layer("mlp_up").units < 32


class _OwnWeight(MLP):
    def build(self, input_shape):
        self.gain = self.add_weight(shape=(), initializer="ones", name="gain")

    def call(self, x):
        return super().call(x) * self.gain


class _SublayerOnConstant(MLP):
    def call(self, x):
        return self.down(self.up(x)) + self.down(self.up(keras.ops.ones((1, self.width))))


class _NotSymbolic(MLP):
    """Stands in for a call written with backend functions (`tf.nn.*` on a KerasTensor)."""

    def call(self, x):
        if isinstance(x, keras.KerasTensor):
            raise TypeError("needs a backend tensor")
        return super().call(x)


class _Branches(MLP):
    def call(self, x):
        y = super().call(x)
        return y if isinstance(x, keras.KerasTensor) else 2.0 * y


@pytest.mark.parametrize("block, why", [
    (_OwnWeight, "reads weights of its own (gain)"),
    (_SublayerOnConstant, "a tensor computed outside the graph"),
    (_NotSymbolic, "cannot run on symbolic tensors (TypeError: needs a backend tensor)"),
    (_Branches, "has a traced graph that computes something else (relative error 5.0e-01)"),
])
def test_a_block_that_cannot_be_inlined_faithfully_is_kept_whole_with_the_reason(block, why):
    inputs = keras.Input((6, 8))
    x = L.Dense(8, name="embed")(inputs)
    x = block(8, 24, name="blk")(x)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Dense(8, name="mix")(x)))
    _randomize(model)
    flat = inline.inline_nested(model)
    assert "blk" in [layer.name for layer in flat.layers]
    plan = tf_psp.pruning_plan(model)
    assert any(f"'blk' ({block.__name__}) is a composite layer" in r and why in r
               for r in plan.frozen), plan.frozen
    x = _x(model)
    assert relative_error(model(x), flat(x)) <= 1e-6


def test_a_sublayer_with_weights_called_twice_stays_one_shared_layer():
    class Twice(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = L.Dense(8, name="dense")

        def call(self, x):
            return self.dense(keras.ops.relu(self.dense(x)))

    inputs = keras.Input((8,))
    model = keras.Model(inputs, L.Dense(2, name="head")(Twice(name="twice")(inputs)))
    flat = inline.inline_nested(model)
    assert [layer.name for layer in flat.layers].count("twice_dense") == 1
    x = _x(model)
    assert relative_error(model(x), flat(x)) <= 1e-6
    plan = tf_psp.pruning_plan(model)
    assert any("'twice_dense' (Dense) is shared" in r for r in plan.frozen), plan.frozen


@pytest.mark.filterwarnings("ignore:Layer 'mlp' .* does not support masking")
def test_a_block_given_a_keras_mask_is_kept_whole():
    """Keras handles a mask in `__call__` (passes it to `call`, or drops it for a layer
    that does not support masking); a flat copy would let its sublayers pass it on to the
    layers after the block, so such a block stays whole."""
    tokens = keras.Input((6,), dtype="int32")
    x = L.Embedding(20, 8, mask_zero=True, name="embed")(tokens)
    x = MLP(8, 16, name="mlp")(x)
    model = keras.Model(tokens, L.Dense(2, name="head")(L.GlobalAveragePooling1D()(x)))
    flat = inline.inline_nested(model)
    assert "mlp" in [layer.name for layer in flat.layers]
    assert inline.kept_whole_reason(model.get_layer("mlp")) == "is given a Keras mask implicitly"
    x = np.array([[1, 2, 3, 0, 0, 0], [4, 5, 6, 7, 8, 9]])
    assert relative_error(model(x), flat(x)) <= 1e-6
