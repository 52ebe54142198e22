"""profile() counts composite layers with several inputs or tensor keywords, and keras-hub
transformer backbones, with nothing left uncounted.

Oracle: MACs counted by hand from the layers' definitions (one multiply-accumulate per
weight use; attention: its four projections plus heads * Tq * Tv * (key_dim + value_dim)).
"""

import keras
import pytest

import tf_psp

L = keras.layers
T, D, HEADS, KEY_DIM, MLP = 16, 32, 4, 8, 64


def _attention_macs(tq, tv, d=D, heads=HEADS, key_dim=KEY_DIM):
    # query and output projections per query position, key and value per value position
    return (2 * tq + 2 * tv) * d * heads * key_dim + heads * tq * tv * 2 * key_dim


def _mlp_macs(t, d=D, hidden=MLP):
    return 2 * t * d * hidden


class Block(L.Layer):
    """A transformer block as one custom layer: self-attention, or cross-attention on
    `memory` when given; a boolean `padding_mask` keyword as in keras-hub."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.norm = L.LayerNormalization()
        self.attention = L.MultiHeadAttention(HEADS, KEY_DIM)
        self.up = L.Dense(MLP, activation="gelu")
        self.down = L.Dense(D)

    def build(self, x_shape, memory_shape=None, padding_mask_shape=None):
        self.norm.build(x_shape)
        self.attention.build(x_shape, memory_shape or x_shape)
        self.up.build(x_shape)
        self.down.build(tuple(x_shape[:-1]) + (MLP,))

    def call(self, x, memory=None, padding_mask=None):
        n = self.norm(x)
        context = n if memory is None else memory
        attention_mask = (None if padding_mask is None
                          else keras.ops.expand_dims(padding_mask, 1))
        h = x + self.attention(query=n, value=context, attention_mask=attention_mask)
        return h + self.down(self.up(h))


class Pair(L.Layer):
    """Dense on each of two positional inputs, then their sum: a two-input composite."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = L.Dense(D)
        self.b = L.Dense(D)

    def build(self, a_shape, b_shape):
        self.a.build(a_shape)
        self.b.build(b_shape)

    def call(self, a, b):
        return self.a(a) + self.b(b)


def test_two_positional_inputs_are_counted():
    a, b = keras.Input((5, 3)), keras.Input((5, 7))
    model = keras.Model([a, b], Pair(name="pair")(a, b))
    prof = tf_psp.profile(model)
    assert prof.uncounted == []
    assert prof.total_macs == 5 * 3 * D + 5 * 7 * D


def _vit(cross=False, masked=False):
    """Hand-written ViT: patch conv, then blocks that are custom composite layers (called
    with a memory tensor and/or a mask keyword), class token taken by slicing."""
    image = keras.Input((16, 16, 3), name="image")
    inputs = [image]
    h = L.Conv2D(D, 4, strides=4, name="patches")(image)
    h = L.Reshape((T, D), name="tokens")(h)
    memory = h
    mask = None
    if masked:
        mask = keras.Input((T,), dtype="bool", name="mask")
        inputs.append(mask)
    for b in range(2):
        kwargs = {}
        if cross:
            kwargs["memory"] = memory
        if masked:
            kwargs["padding_mask"] = mask
        h = Block(name=f"block_{b}")(h, **kwargs)
    outputs = L.Dense(10, name="head")(h[:, 0, :])
    return keras.Model(inputs if masked else image, outputs, name="vit")


@pytest.mark.parametrize("cross, masked", [(False, False), (True, False), (False, True),
                                           (True, True)],
                         ids=["self", "cross", "masked", "cross_masked"])
def test_hand_written_vit_with_composite_blocks_is_counted_by_hand(cross, masked):
    model = _vit(cross, masked)
    prof = tf_psp.profile(model)
    assert prof.uncounted == []
    block = _attention_macs(T, T) + _mlp_macs(T)
    hand = T * 4 * 4 * 3 * D + 2 * block + D * 10
    assert prof.total_macs == hand
    rows = {row.name: row for row in prof.layers}
    assert rows["block_0"].macs == rows["block_1"].macs == block


def test_nested_rnn_in_a_composite_is_counted_once():
    class Recurrent(L.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.rnn = L.Bidirectional(L.GRU(3, return_sequences=True))

        def build(self, shape):
            self.rnn.build(shape)

        def call(self, x, padding_mask=None):
            return self.rnn(x)

    x = keras.Input((7, 5))
    m = keras.Input((7,), dtype="bool")
    model = keras.Model([x, m], Recurrent(name="rec")(x, padding_mask=m))
    prof = tf_psp.profile(model)
    assert prof.uncounted == []
    assert prof.total_macs == 2 * 7 * 3 * (5 * 3 + 3 * 3)  # the Bidirectional's GRUs only


def test_reversible_embedding_in_reverse_is_a_matmul():
    keras_hub = pytest.importorskip("keras_hub")
    embedding = keras_hub.layers.ReversibleEmbedding(50, D, name="embed")
    tokens = keras.Input((T,), dtype="int32")
    h = embedding(tokens)
    logits = embedding(h, reverse=True)
    prof = tf_psp.profile(keras.Model(tokens, logits))
    assert prof.uncounted == []
    assert prof.total_macs == T * 50 * D  # the lookup counts 0, the reverse T * vocab * dim


def _bert_macs(layers, t, d, heads, intermediate):
    key_dim = d // heads
    block = (_attention_macs(t, t, d, heads, key_dim)
             + _mlp_macs(t, d, intermediate))
    return layers * block + d * d  # + the pooler on the first token


def test_bert_backbone_is_counted_by_hand_and_its_none_inputs_are_named():
    keras_hub = pytest.importorskip("keras_hub")
    model = keras_hub.models.BertBackbone(
        vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=32, intermediate_dim=64,
        max_sequence_length=16)
    with pytest.raises(ValueError, match=r"'token_ids' \(None, None\).*input_shape="):
        tf_psp.profile(model)
    prof = tf_psp.profile(model, input_shape=[(12,)] * 3)
    assert prof.uncounted == []
    assert prof.total_macs == _bert_macs(2, 12, 32, 2, 64)
    # the padding mask and token ids are fed as ones: the count does not depend on them
    assert tf_psp.profile(model, input_shape=[(16,)] * 3).total_macs == _bert_macs(
        2, 16, 32, 2, 64)


def test_keras_hub_vit_backbone_is_counted_by_hand():
    keras_hub = pytest.importorskip("keras_hub")
    model = keras_hub.models.ViTBackbone(image_shape=(32, 32, 3), patch_size=8, num_layers=2,
                                         num_heads=2, hidden_dim=16, mlp_dim=32)
    prof = tf_psp.profile(model)
    assert prof.uncounted == []
    tokens = 16 + 1  # 4 x 4 patches and the class token
    patches = 16 * 8 * 8 * 3 * 16
    block = _attention_macs(tokens, tokens, 16, 2, 8) + _mlp_macs(tokens, 16, 32)
    assert prof.total_macs == patches + 2 * block


def test_einsum_dense_counts_its_contraction():
    x = keras.Input((T, D))
    layer = L.EinsumDense("btd,dnh->btnh", output_shape=(T, HEADS, KEY_DIM), name="proj")
    prof = tf_psp.profile(keras.Model(x, layer(x)))
    assert prof.uncounted == []
    assert prof.total_macs == T * D * HEADS * KEY_DIM


class OwnAttention(L.Layer):
    """Attention written with keras.ops (as keras-hub's Gemma/Llama attention): EinsumDense
    projections, scores and weighted sums by `keras.ops.einsum` and `keras.ops.matmul`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.q = L.EinsumDense("btd,dnh->btnh", output_shape=(None, HEADS, KEY_DIM))
        self.k = L.EinsumDense("bsd,dnh->bsnh", output_shape=(None, HEADS, KEY_DIM))
        self.v = L.EinsumDense("bsd,dnh->bsnh", output_shape=(None, HEADS, KEY_DIM))
        self.o = L.EinsumDense("btnh,nhd->btd", output_shape=(None, D))

    def build(self, shape):
        for layer in (self.q, self.k, self.v):
            layer.build(shape)
        self.o.build(tuple(shape[:-1]) + (HEADS, KEY_DIM))

    def call(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        scores = keras.ops.einsum("btnh,bsnh->bnts", q, k)
        weights = keras.ops.softmax(scores, axis=-1)
        v = keras.ops.transpose(v, (0, 2, 1, 3))  # b n s h
        context = keras.ops.transpose(keras.ops.matmul(weights, v), (0, 2, 1, 3))
        position = keras.ops.einsum("i,j->ij", keras.ops.arange(4.0), keras.ops.ones(3))
        return self.o(context) + 0.0 * keras.ops.sum(position)  # an outer product: 0 MACs


def test_attention_written_with_ops_counts_scores_and_sums():
    x = keras.Input((T, D))
    prof = tf_psp.profile(keras.Model(x, OwnAttention(name="own")(x)))
    assert prof.uncounted == []
    assert prof.total_macs == _attention_macs(T, T)


class Unruled(L.Layer):
    """A sublayer with a kernel and no MAC rule."""

    def build(self, shape):
        self.kernel = self.add_weight(shape=(shape[-1], shape[-1]))

    def call(self, x):
        return x * keras.ops.sum(self.kernel)


class HalfKnown(L.Layer):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = L.Dense(D)
        self.unruled = Unruled()

    def build(self, shape):
        self.dense.build(shape)
        self.unruled.build(tuple(shape[:-1]) + (D,))

    def call(self, x):
        return self.unruled(self.dense(x))


def test_a_composite_with_a_sublayer_no_rule_counts_is_not_counted():
    x = keras.Input((T, D))
    prof = tf_psp.profile(keras.Model(x, HalfKnown(name="half")(x)))
    assert prof.uncounted == ["half"]  # rather than the Dense alone, a silent undercount


def _decoder_macs(layers, t, d, query_heads, kv_heads, head_dim, projections):
    """Grouped-query attention (keys and values per kv head) and a gated MLP of
    `projections` Dense-like kernels of d x width each (width folded into `projections`)."""
    attention = t * d * head_dim * (2 * query_heads + 2 * kv_heads)
    scores = 2 * query_heads * t * t * head_dim
    return layers * (attention + scores + t * projections)


def test_gemma_and_llama_backbones_are_counted_by_hand():
    keras_hub = pytest.importorskip("keras_hub")
    gemma = keras_hub.models.GemmaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=64, head_dim=8)
    prof = tf_psp.profile(gemma, input_shape=[(16,)] * 2)
    assert prof.uncounted == []
    # Gemma's gated MLP: gate and up d -> intermediate/2, down intermediate/2 -> d
    assert prof.total_macs == _decoder_macs(2, 16, 32, 4, 2, 8, 3 * 32 * 32)
    llama = keras_hub.models.LlamaBackbone(
        vocabulary_size=100, num_layers=2, num_query_heads=4, num_key_value_heads=2,
        hidden_dim=32, intermediate_dim=64)
    prof = tf_psp.profile(llama, input_shape=[(16,)] * 2)
    assert prof.uncounted == []
    assert prof.total_macs == _decoder_macs(2, 16, 32, 4, 2, 8, 3 * 32 * 64)
