"""Decoder-like composite layers inlined at a fixed input shape (`inline_nested(input_shape=)`).

A block that builds a causal mask from its input's length and batch size cannot be traced
into a functional graph while the length is None; at a fixed length it can. A
MultiHeadAttention subclass that takes extra call arguments (keras-hub's
CachedMultiHeadAttention: `cache=None`) stands as a plain MultiHeadAttention where it
computes the same. Oracle: the original model's outputs on random inputs, at two batch
sizes; for pruning, the pruned model's outputs.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import compat, functional, inline
from tf_psp.functional import relative_error

L = keras.layers
ops = keras.ops


class CachedAttention(L.MultiHeadAttention):
    """A MultiHeadAttention with a `cache` argument (None: MultiHeadAttention itself)."""

    def call(self, query, value, key=None, attention_mask=None, cache=None, training=None):
        if cache is not None:
            raise NotImplementedError("no cache in this test")
        return super().call(query, value, key=key, attention_mask=attention_mask,
                            training=training)


class DoubledAttention(CachedAttention):
    """Not the plain layer's function: must not be replaced by a plain MultiHeadAttention."""

    def call(self, query, value, key=None, attention_mask=None, cache=None, training=None):
        return 2.0 * super().call(query, value, key=key, attention_mask=attention_mask)


class CausalBlock(L.Layer):
    """Self-attention under a causal mask built from the input's batch size and length (as
    keras-hub's decoders do), then an MLP; both residual."""

    def __init__(self, width, heads, attention=CachedAttention, reshape=False, int_mask=False,
                 **kwargs):
        super().__init__(**kwargs)
        self.width, self.heads, self.reshape, self.int_mask = width, heads, reshape, int_mask
        self.attention = attention(heads, width // heads, name="attention")
        self.up = L.Dense(2 * width, activation="relu", name="up")
        self.down = L.Dense(width, name="down")

    def call(self, x):
        batch, length = ops.shape(x)[0], ops.shape(x)[1]
        i = ops.expand_dims(ops.arange(length), axis=1)
        mask = ops.broadcast_to(ops.expand_dims(i >= ops.arange(length), 0),
                                (batch, length, length))
        if self.int_mask:  # an int32 mask and a float scalar computed outside the graph
            mask = ops.cast(mask, "int32")
            x = x * ops.cast(1.0 / np.sqrt(self.width), "float32")
        y = x + self.attention(x, x, attention_mask=mask, cache=None)
        if self.reshape:  # bakes the batch size into the graph
            y = ops.reshape(ops.reshape(y, (batch, length * self.width)),
                            (batch, length, self.width))
        return y + self.down(self.up(y))


def _decoder(attention=CachedAttention, reshape=False, int_mask=False):
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = L.Embedding(20, 8, name="embed")(tokens)
    for k in range(2):
        x = CausalBlock(8, 4, attention=attention, reshape=reshape, int_mask=int_mask,
                        name=f"block_{k}")(x)
    model = keras.Model(tokens, L.Dense(5, name="head")(x))
    rng = np.random.default_rng(0)
    for layer in compat.flatten_layers(model):
        if isinstance(getattr(layer, "bias", None), keras.Variable):
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))
    return model


def _tokens(batch, seed=0):
    return np.random.default_rng(seed).integers(0, 20, (batch, 6)).astype("int32")


@pytest.mark.parametrize("int_mask", [False, True])
def test_a_causal_block_opens_at_a_fixed_length_and_computes_what_it_computed(int_mask):
    model = _decoder(int_mask=int_mask)
    kept = inline.inline_nested(model)
    assert "block_0" in [layer.name for layer in kept.layers]  # length unknown: whole
    assert "input_shape=" in inline.kept_whole_reason(model.get_layer("block_0"))
    flat = inline.inline_nested(model, input_shape=(6,))
    names = [layer.name for layer in flat.layers]
    assert "block_0" not in names and "block_1_up" in names
    assert type(flat.get_layer("block_0_attention")) is L.MultiHeadAttention  # the twin
    assert flat.inputs[0].shape == (None, 6)
    for batch in (2, 3):  # a batch size other than the traced one's
        x = _tokens(batch)
        assert relative_error(model(x), flat(x)) <= 1e-5


def test_a_causal_decoder_prunes_heads_and_units_to_half_its_macs_exactly():
    model = _decoder()
    flat = inline.inline_nested(model, input_shape=(6,))
    pruned = tf_psp.prune_to_budget(flat, keep_macs=0.5, importance="random", input_shape=(6,))
    shrunk = tf_psp.strip_and_shrink(pruned)
    x = _tokens(3)
    assert relative_error(model(x), pruned(x)) > 1e-6
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    dense = tf_psp.profile(model, input_shape=(6,)).total_macs
    assert tf_psp.profile(shrunk).total_macs <= 0.5 * dense

    def heads(m):
        return [layer.num_heads for layer in m.layers
                if isinstance(layer, L.MultiHeadAttention)]

    assert sum(heads(shrunk)) < sum(heads(flat)) == 8


def test_a_block_that_bakes_the_batch_size_in_stays_whole():
    """Traced with a batch of one, its reshape to (1, ...) fails at other batch sizes."""
    model = _decoder(reshape=True)
    flat = inline.inline_nested(model, input_shape=(6,))
    assert "block_0" in [layer.name for layer in flat.layers]
    assert "has a traced graph that does not run" in inline.kept_whole_reason(
        model.get_layer("block_0"))
    x = _tokens(2)
    assert relative_error(model(x), flat(x)) <= 1e-5


def test_an_attention_subclass_that_computes_something_else_stays_itself():
    model = _decoder(attention=DoubledAttention)
    flat = inline.inline_nested(model, input_shape=(6,))
    assert "block_0" not in [layer.name for layer in flat.layers]
    assert type(flat.get_layer("block_0_attention")) is DoubledAttention
    x = _tokens(2)
    assert relative_error(model(x), flat(x)) <= 1e-5


def test_input_shape_that_does_not_fit_the_model_is_refused():
    model = _decoder()
    with pytest.raises(ValueError, match="gives 2 shapes for 1 inputs"):
        inline.inline_nested(model, input_shape=[(6,), (6,)])
    with pytest.raises(ValueError, match=r"input_shape \(6, 2\) does not fit input 'tokens'"):
        inline.inline_nested(model, input_shape=(6, 2))


class Passthrough(L.Layer):
    """Stateless, built from an argument it cannot serialize (as keras-hub's Identity); its
    compute_output_spec takes no `training`."""

    def __init__(self, tag, **kwargs):
        super().__init__(**kwargs)
        self.tag = tag

    def call(self, x, training=None):
        return x

    def compute_output_spec(self, inputs):
        return keras.KerasTensor(inputs.shape, dtype=inputs.dtype)


class PassthroughBlock(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.up = L.Dense(16, activation="relu", name="up")
        self.down = L.Dense(8, name="down")
        self.identity = Passthrough(object(), name="identity")  # same name in every block

    def call(self, x):
        return x + self.identity(self.down(self.up(x)))


def test_a_stateless_layer_that_cannot_serialize_is_renamed_by_a_shallow_copy():
    inputs = keras.Input((6, 8))
    x = PassthroughBlock(name="block_0")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(PassthroughBlock(name="block_1")(x)))
    with pytest.raises(NotImplementedError):
        model.get_layer("block_0").identity.get_config()
    flat = inline.inline_nested(model)
    names = [layer.name for layer in flat.layers]
    assert "block_0_identity" in names and "block_1_identity" in names
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.6, importance="random")
    shrunk = tf_psp.strip_and_shrink(pruned)
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    assert relative_error(model(x), flat(x)) <= 1e-6
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    assert tf_psp.profile(shrunk).total_macs <= 0.6 * tf_psp.profile(model).total_macs


class LossyConfig(L.Layer):
    """A block whose get_config leaves out a required argument (kept as `_head_dim`, as
    keras-hub 0.32's Qwen3Attention) and whose constructor rejects `trainable` (MiT's
    MixFFN): copies fill the first in from the attribute and leave the second out."""

    def __init__(self, width, head_dim, name=None, dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.width, self._head_dim = width, head_dim
        self.dense = L.Dense(width * head_dim, name="dense")

    def call(self, x):
        return self.dense(x)

    def get_config(self):
        return {**super().get_config(), "width": self.width}


def test_a_config_that_does_not_round_trip_is_repaired_from_the_layer():
    inputs = keras.Input((6, 8))
    x = LossyConfig(2, 4, name="block_0")(inputs)
    model = keras.Model(inputs, LossyConfig(2, 4, name="block_1")(x))
    with pytest.raises(TypeError):
        LossyConfig.from_config(model.get_layer("block_0").get_config())
    copy = functional.new_layer(model.get_layer("block_0"), name="copy")
    assert copy._head_dim == 4 and copy.name == "copy"
    flat = inline.inline_nested(model)
    assert "block_1_dense" in [layer.name for layer in flat.layers]
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    assert relative_error(model(x), flat(x)) <= 1e-6


def test_profile_knows_the_length_an_einsum_dense_copies_from_its_input():
    """EinsumDense(output_shape=(None, 2, 4)) says None for the length even on a known
    one (Keras keeps the None it was given); profile takes it from the input."""
    inputs = keras.Input((None, 8))
    outputs = L.EinsumDense("abc,cde->abde", output_shape=(None, 2, 4), name="qkv")(inputs)
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Reshape((-1, 8))(outputs)))
    rows = {row.name: row for row in tf_psp.profile(model, input_shape=(6, 8)).layers}
    assert rows["qkv"].macs == 6 * 8 * 2 * 4
    assert rows["head"].macs == 6 * 8 * 3


def test_profile_counts_the_einsum_and_matmul_nodes_an_inlined_attention_leaves():
    """Attention scores and weighted sums are keras.ops nodes of the flat graph: counted
    by hand (T x S x heads x dim per einsum), as the block they came from was counted."""
    inputs = keras.Input((6, 8))
    q = L.EinsumDense("abc,cde->abde", output_shape=(6, 2, 4), name="q")(inputs)
    k = L.EinsumDense("abc,cde->abde", output_shape=(6, 2, 4), name="k")(inputs)
    scores = ops.einsum("btnh,bsnh->bnts", q, k)
    mixed = ops.matmul(scores, ops.transpose(k, (0, 2, 1, 3)))  # [b, n, t, h]
    model = keras.Model(inputs, L.Dense(3, name="head")(L.Reshape((6, 8))(mixed)))
    rows = tf_psp.profile(model).layers
    op_macs = sorted(row.macs for row in rows if row.class_name in ("Einsum", "Matmul"))
    assert op_macs == [6 * 6 * 2 * 4, 6 * 6 * 2 * 4]
    assert tf_psp.profile(model).total_macs == 2 * 6 * 8 * 8 + 2 * 288 + 6 * 8 * 3


class _Scaled(L.Layer):
    def __init__(self, factor=1.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def call(self, x):
        return self.factor * x

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


class _Doubled(_Scaled):
    """Passes `factor` on itself, yet its config has it (LlamaRotaryEmbedding's
    `scaling_factor`): from_config gives it twice."""

    def __init__(self, **kwargs):
        super().__init__(factor=2.0, **kwargs)


def test_a_config_key_the_constructor_passes_on_itself_is_left_out_of_the_copy():
    layer = _Doubled(name="doubled")
    with pytest.raises(TypeError, match="multiple values"):
        _Doubled.from_config(layer.get_config())
    copy = functional.new_layer(layer, name="copy")
    x = np.ones((1, 3), "float32")
    assert copy.name == "copy" and np.allclose(copy(x), layer(x))


class _Norm(L.Layer):
    """Built with an argument its auto get_config cannot serialize (as keras-hub 0.32's
    Gemma RMSNormalization), with a weight; stores `factor` x epsilon as `epsilon`."""

    factor = 1

    def __init__(self, epsilon=1e-3, marker=None, **kwargs):
        super().__init__(**kwargs)
        self.epsilon = self.factor * epsilon

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.scale / ops.sqrt(ops.mean(x * x, axis=-1, keepdims=True) + self.epsilon)


class _DoubledNorm(_Norm):
    factor = 2  # its attribute is not its argument: a copy from attributes differs


class _NormBlock(L.Layer):
    def __init__(self, doubled=False, **kwargs):
        super().__init__(**kwargs)
        norm = _DoubledNorm if doubled else _Norm
        self.norm = norm(epsilon=0.5, marker=object(), name="norm")
        self.dense = L.Dense(8, name="dense")

    def call(self, x):
        return x + self.dense(self.norm(x))


def _norm_model(doubled):
    inputs = keras.Input((6, 8))
    x = _NormBlock(doubled=doubled, name="block_0")(inputs)
    return keras.Model(inputs, _NormBlock(doubled=doubled, name="block_1")(x))


def test_a_layer_whose_config_cannot_serialize_is_copied_from_its_attributes_and_checked():
    model = _norm_model(doubled=False)
    norm = model.get_layer("block_0").norm
    with pytest.raises(NotImplementedError):
        norm.get_config()
    flat = inline.inline_nested(model)
    assert {"block_0_norm", "block_1_norm"} <= {layer.name for layer in flat.layers}
    x = np.random.default_rng(0).normal(size=(2, 6, 8)).astype("float32")
    assert relative_error(model(x), flat(x)) <= 1e-6
    with pytest.raises(ValueError, match="'norm' .* a copy built from its attributes computes"):
        inline.inline_nested(_norm_model(doubled=True))  # its attribute is not its argument


class _StaleConfig(_Norm):
    """A get_config that reads an attribute the layer lacks (keras-hub 0.32 DeiTEncoder's
    `key_dim`)."""

    def get_config(self):
        return {**L.Layer.get_config(self), "key_dim": self.key_dim}


def test_a_layer_whose_get_config_fails_on_an_attribute_is_copied_from_its_attributes():
    layer = _StaleConfig(epsilon=0.25, name="stale")
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    layer(x)
    with pytest.raises(AttributeError):
        layer.get_config()
    copy = functional.new_layer(layer)
    assert copy.epsilon == 0.25 and copy.config_from_attributes
    copy(x)
    copy.set_weights(layer.get_weights())
    assert relative_error(layer(x), copy(x)) <= 1e-7


def test_profile_passes_over_op_nodes_given_a_tuple_of_tensors():
    """ops.fft((real, imag)) (keras-hub FNet) is an op node with a tuple argument: 0 MACs."""
    inputs = keras.Input((8, 4))
    real, imag = ops.fft((inputs, ops.zeros_like(inputs)))
    model = keras.Model(inputs, L.Dense(3, name="head")(real + imag))
    assert tf_psp.profile(model).total_macs == 8 * 4 * 3
