"""MAC rules beyond convolutions: RNNs, attention, transposed convolutions, lookups.

Oracle: MACs counted by hand from the layer's definition (one multiply-accumulate
per weight use; biases, activations and gate products not counted).
"""

import keras
import pytest

from tf_psp import profile

L = keras.layers


def _macs(input_shape, layer, **call_kwargs):
    inp = keras.Input(input_shape)
    model = keras.Model(inp, layer(inp, **call_kwargs))
    prof = profile(model)
    assert prof.total_params == model.count_params()
    (row,) = prof.layers
    assert row.counted
    return row.macs


@pytest.mark.parametrize(
    "input_shape, layer, hand_macs",
    [
        ((7, 5), L.SimpleRNN(3), 7 * (5 * 3 + 3 * 3)),
        ((7, 5), L.LSTM(3, return_sequences=True), 7 * 4 * (5 * 3 + 3 * 3)),
        ((7, 5), L.GRU(3), 7 * 3 * (5 * 3 + 3 * 3)),
        ((7, 5), L.Bidirectional(L.LSTM(3)), 2 * 7 * 4 * (5 * 3 + 3 * 3)),
        ((7, 5), L.Bidirectional(L.GRU(3), backward_layer=L.GRU(4, go_backwards=True)),
         7 * 3 * (5 * 3 + 3 * 3) + 7 * 3 * (5 * 4 + 4 * 4)),
        ((10, 2), L.Conv1DTranspose(4, 3, strides=2), 10 * 3 * 4 * 2),
        ((4, 4, 3), L.Conv2DTranspose(2, 3, strides=2, padding="same"), 4 * 4 * 3 * 3 * 2 * 3),
        ((2, 3, 3, 2), L.Conv3DTranspose(5, 2), 2 * 3 * 3 * 2 * 2 * 2 * 5 * 2),
    ],
    ids=["simplernn", "lstm", "gru", "bidirectional", "bidirectional_mixed",
         "conv1d_t", "conv2d_t", "conv3d_t"],
)
def test_hand_counted_macs(input_shape, layer, hand_macs):
    assert _macs(input_shape, layer) == hand_macs


def test_embedding_counts_zero_macs():
    inp = keras.Input((6,), dtype="int32")
    model = keras.Model(inp, L.Embedding(50, 8, name="emb")(inp))
    (row,) = profile(model).layers
    assert row.counted and row.macs == 0 and row.params == 400


def test_multi_head_attention():
    q, v = keras.Input((5, 8)), keras.Input((7, 6))
    mha = L.MultiHeadAttention(num_heads=2, key_dim=4, value_dim=3, name="mha")
    model = keras.Model([q, v], mha(q, v))
    (row,) = profile(model).layers
    tq, tv, heads = 5, 7, 2
    hand = (tq * 8 * heads * 4          # query projection
            + tv * 6 * heads * 4        # key projection (key = value)
            + tv * 6 * heads * 3        # value projection
            + heads * tq * tv * 4       # scores
            + heads * tq * tv * 3       # weighted sum of values
            + tq * heads * 3 * 8)       # output projection back to the query dim
    assert row.macs == hand


def test_gated_attention_counts_its_gate():
    x = keras.Input((5, 8))
    plain = profile(keras.Model(x, L.MultiHeadAttention(2, 4, name="mha")(x, x))).total_macs
    gated = L.MultiHeadAttention(2, 4, use_gate=True, name="mha")
    macs = profile(keras.Model(x, gated(x, x))).total_macs
    assert macs == plain + 5 * 8 * 2 * 4  # the gate projects every query position


def test_self_attention_with_mask():
    x = keras.Input((5, 8))
    mask = keras.Input((5, 5), dtype="bool")
    mha = L.MultiHeadAttention(num_heads=1, key_dim=2, name="mha")
    model = keras.Model([x, mask], mha(x, x, attention_mask=mask))
    (row,) = profile(model).layers
    assert row.macs == 5 * 8 * 2 * 3 + 5 * 2 * 8 + 5 * 5 * (2 + 2)


class Scale(L.Layer):
    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        return x * self.w


def test_layer_with_weights_and_no_rule_is_not_counted():
    inp = keras.Input((4, 4, 3))
    x = L.Conv2D(2, 1, name="conv")(inp)
    x = Scale(name="custom")(x)
    x = L.ConvLSTM1D(2, 1, name="convlstm")(x)
    model = keras.Model(inp, L.ReLU(name="relu")(x))
    prof = profile(model)
    assert prof.uncounted == ["custom", "convlstm"]
    rows = {row.name: row for row in prof.layers}
    assert rows["relu"].counted  # no weights: 0 MACs are known
    text = str(prof)
    assert "not counted" in text and "custom, convlstm" in text
    assert prof.to_dict()["uncounted"] == ["custom", "convlstm"]
    assert prof.total_macs == 16 * 3 * 2
