"""Attention heads and transformer MLP units as structures (hand-written functional ViT).

Oracle: the PSP model itself in inference mode (`strip_and_shrink` must compute
the same outputs); head and unit counts and MACs counted by hand.
"""


import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import attention_layers, graph

from conftest import _shrink_and_compare, assert_loads_the_same, randomize_weights

L = keras.layers
D, HEADS, KEY_DIM, MLP, TOKENS = 32, 4, 8, 64, 16


def _vit(select="token", blocks=2, cross=False):
    """Patch conv 4x4 -> tokens -> `blocks` x (LN, MHA, Add, LN, MLP, Add) -> select -> head."""
    inputs = keras.Input((16, 16, 3))
    h = L.Conv2D(D, 4, strides=4, name="patches")(inputs)
    h = L.Reshape((TOKENS, D), name="tokens")(h)
    memory = h
    for b in range(blocks):
        n = L.LayerNormalization(name=f"ln_{b}a")(h)
        kv = memory if cross else n
        a = L.MultiHeadAttention(HEADS, KEY_DIM, name=f"mha_{b}")(n, kv)
        h = L.Add(name=f"add_{b}a")([h, a])
        n = L.LayerNormalization(name=f"ln_{b}b")(h)
        m = L.Dense(MLP, activation="gelu", name=f"mlp_{b}_up")(n)
        m = L.Dense(D, name=f"mlp_{b}_down")(m)
        h = L.Add(name=f"add_{b}b")([h, m])
    h = h[:, 0, :] if select == "token" else L.GlobalAveragePooling1D(name="gap")(h)
    outputs = L.Dense(10, name="head")(L.LayerNormalization(name="ln_out")(h))
    model = keras.Model(inputs, outputs, name="vit")
    randomize_weights(model)
    return model


def _x(seed=0):
    return np.random.default_rng(seed).normal(size=(2, 16, 16, 3)).astype("float32")


def _gates(psp):
    return {layer.name: layer for layer in psp.layers
            if isinstance(layer, attention_layers.PSPMultiHeadAttention)}


def _zero_alphas(layer, indices):
    value = np.array(keras.ops.convert_to_numpy(layer.alpha.value))
    value[list(indices)] = 0.0
    layer.alpha.assign(value)


def _zero_group_units(psp, reader, units):
    """Zeroes the group alphas of input channels `units` of layer `reader`."""
    for name, (gate, index) in tf_psp.coupling.reader_calls(psp).items():
        if name == reader:
            positions = gate._positions(index)[list(units)]
            alphas = gate.alphas()
            alphas[positions] = 0.0
            starts = np.cumsum([0] + gate.group_sizes)
            for g, variable in enumerate(gate.group_alphas):
                variable.assign(alphas[starts[g]:starts[g + 1]])
            return
    raise AssertionError(f"{reader} reads no group alphas")


@pytest.mark.parametrize("select", ["token", "gap"])
def test_heads_and_mlp_units_shrink_exactly(select, tmp_path):
    model = _vit(select)
    psp = tf_psp.parameterize(model, coupling="group")
    x = _x()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(psp(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5)
    gates = _gates(psp)
    assert sorted(gates) == ["mha_0", "mha_1"]
    _zero_alphas(gates["mha_0"], [1, 3])
    _zero_alphas(gates["mha_1"], [0])
    _zero_group_units(psp, "mlp_0_down", range(0, 64, 2))  # 32 of 64 hidden units
    _zero_group_units(psp, "mlp_1_down", range(10))
    shrunk, report = _shrink_and_compare(psp, x, {"mlp_0_up": 32, "mlp_1_up": 54})
    assert shrunk.get_layer("mha_0").num_heads == 2
    assert shrunk.get_layer("mha_1").num_heads == 3
    rows = {row["name"]: row for row in report.layers}
    assert (rows["mha_0"]["heads_before"], rows["mha_0"]["heads_after"]) == (4, 2)
    assert "(heads 4 -> 3)" in str(report)
    assert shrunk.get_layer("mha_0").key_dim == KEY_DIM
    kernel = shrunk.get_layer("mha_0")._query_dense.kernel
    assert tuple(kernel.shape) == (D, 2, KEY_DIM)
    # the kept heads are heads 0 and 2 of the original layer
    original = model.get_layer("mha_0")._query_dense.kernel
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel),
                                  keras.ops.convert_to_numpy(original)[:, [0, 2]])
    assert_loads_the_same(shrunk, x, tmp_path)  # the saved shrunk model computes the same


def test_cross_attention_heads_shrink_exactly():
    model = _vit("gap", blocks=1, cross=True)
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_alphas(_gates(psp)["mha_0"], [0, 1, 2])
    shrunk, _ = _shrink_and_compare(psp, _x(1), {})
    assert shrunk.get_layer("mha_0").num_heads == 1


@pytest.mark.parametrize("options, call_options, shape", [
    ({"value_dim": 3}, {}, (6, 12)),
    ({"use_bias": False}, {}, (6, 12)),
    ({"output_shape": 7}, {}, (6, 12)),
    ({"use_gate": True}, {}, (6, 12)),
    ({}, {"use_causal_mask": True}, (6, 12)),
    ({"attention_axes": (1, 2)}, {}, (3, 4, 12)),
])
def test_attention_variants_shrink_exactly(options, call_options, shape):
    if "value_dim" in options and keras.backend.backend() == "jax":
        pytest.skip("Keras 3.15.1's MultiHeadAttention itself fails on JAX when value_dim != "
                    "key_dim (cannot reshape (2, 6, 4, 1, 3) into (2, 6, 4, 5))")
    inputs = keras.Input(shape)
    h = L.Dense(12, name="pre")(inputs)
    a = L.MultiHeadAttention(4, 5, name="mha", **options)(h, h, **call_options)
    model = randomize_weights(keras.Model(inputs, L.Dense(3, name="post")(L.Flatten()(a))))
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_alphas(psp.get_layer("mha"), [1, 2])
    x = np.random.default_rng(8).normal(size=(2,) + shape).astype("float32")
    shrunk, _ = _shrink_and_compare(psp, x, {})
    assert shrunk.get_layer("mha").num_heads == 2


def test_zero_value_projection_removes_a_head_of_a_plain_model():
    # no PSP at all: a head whose value kernel and bias are zero contributes nothing
    model = _vit("token", blocks=1)
    value = model.get_layer("mha_0")._value_dense
    kernel = np.array(keras.ops.convert_to_numpy(value.kernel))
    kernel[:, 2] = 0.0
    value.kernel.assign(kernel)
    value.bias.assign(np.zeros(tuple(value.bias.shape), "float32"))
    shrunk, _ = _shrink_and_compare(model, _x(2), {})
    assert shrunk.get_layer("mha_0").num_heads == 3


def test_psp_attention_twin_saves_and_loads(tmp_path):
    psp = tf_psp.parameterize(_vit("token", blocks=1), coupling="group")
    _zero_alphas(_gates(psp)["mha_0"], [2])
    loaded = assert_loads_the_same(psp, _x(3), tmp_path)
    assert isinstance(loaded.get_layer("mha_0"), attention_layers.PSPMultiHeadAttention)


def _attention_macs(tq, tv, d, heads, key_dim, value_dim):
    projections = tq * d * heads * key_dim + tv * d * heads * (key_dim + value_dim)
    output = tq * heads * value_dim * d
    return projections + output + heads * tq * tv * (key_dim + value_dim)


def test_profile_counts_attention_and_pruned_heads():
    model = _vit("token")
    prof = tf_psp.profile(model)
    assert prof.uncounted == []
    rows = {row.name: row for row in prof.layers}
    assert rows["mha_0"].macs == _attention_macs(TOKENS, TOKENS, D, HEADS, KEY_DIM, KEY_DIM)
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_alphas(_gates(psp)["mha_1"], [0, 3])
    prof = tf_psp.profile(psp)
    assert prof.uncounted == []  # the group alphas are a per-channel scale: 0 MACs
    assert prof.total_macs == tf_psp.profile(model).total_macs
    rows = {row.name: row for row in prof.layers}
    assert rows["mha_1"].structures_total == HEADS
    assert rows["mha_1"].structures_alive == 2
    assert rows["mha_1"].pruned_macs == rows["mha_1"].macs // 2
    # removability: the two dead heads' output-kernel rows are zero weights (TOKENS queries each);
    # strip_and_shrink removes all of mha_1's MACs for those heads
    removable = tf_psp.profile(psp, removable=True).removability
    assert removable.zeroed_macs == 2 * TOKENS * KEY_DIM * D
    assert removable.removable_macs == rows["mha_1"].macs // 2
    assert removable.kept_zero_macs == 0


def test_token_selection_passes_channels():
    inputs = keras.Input((5, 8))
    h = L.Dense(6, name="d1")(inputs)
    outputs = L.Dense(3, name="d2")(h[:, 0, :])
    g = graph.ChannelGraph(keras.Model(inputs, outputs))
    select = next(n for n in g.nodes if type(n.layer).__name__ == "GetItem")
    assert not hasattr(select, "frozen_reason")
    assert [g.group(s) for s in select.inputs[0].slots()] == [
        g.group(s) for s in select.outputs[0].slots()]


def test_channels_are_removed_through_token_selection():
    inputs = keras.Input((5, 8))
    h = L.Dense(6, activation="relu", name="d1")(inputs)
    outputs = L.Dense(3, name="d2")(h[:, 0, :])
    model = randomize_weights(keras.Model(inputs, outputs))
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_group_units(psp, "d2", [1, 4])
    x = np.random.default_rng(6).normal(size=(2, 5, 8)).astype("float32")
    _shrink_and_compare(psp, x, {"d1": 4})


@pytest.mark.parametrize("index", [(slice(None), slice(None), 0), (Ellipsis, slice(0, 2))])
def test_indexing_the_channel_axis_freezes(index):
    inputs = keras.Input((5, 8))
    h = L.Dense(6, name="d1")(inputs)
    outputs = L.Dense(3, name="d2")(h[index])
    g = graph.ChannelGraph(keras.Model(inputs, outputs))
    select = next(n for n in g.nodes if type(n.layer).__name__ == "GetItem")
    assert "channel axis" in select.frozen_reason


def _scale_head(dense, head, factor, axis):
    kernel = np.array(keras.ops.convert_to_numpy(dense.kernel))
    np.moveaxis(kernel, axis, 0)[head] *= factor
    dense.kernel.assign(kernel)


@pytest.mark.parametrize("importance, weak, part", [
    ("l1", 1, "qkv"),     # l1: the weights writing a head (its query, key, value projections)
    ("l2", 1, "qkv"),
    ("alpha", 3, "out"),  # alpha: the (alpha-scaled) output rows reading it
])
def test_head_importance_reads_the_heads_weights(importance, weak, part):
    model = _vit("token", blocks=1)
    mha = model.get_layer("mha_0")
    query, key, value, output = tf_psp.compat.attention_projections(mha)
    for dense in ((query, key, value) if part == "qkv" else (output,)):
        _scale_head(dense, weak, 0.01, axis=1 if part == "qkv" else 0)
    plan = tf_psp.pruning_plan(tf_psp.parameterize(model, coupling="group"), importance)
    heads = [u for u in plan.units if u.space == "heads of 'mha_0'"]
    assert len(heads) == HEADS
    weakest = min(heads, key=lambda u: u.score)
    assert weakest.reads == [("mha_0", weak)]


@pytest.mark.parametrize("importance", ["random", "l1"])
def test_prune_to_budget_removes_heads_and_units(importance):
    model = _vit("token")
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance=importance)
    shrunk = tf_psp.strip_and_shrink(pruned)
    dense, small = tf_psp.profile(model), tf_psp.profile(shrunk)
    assert small.uncounted == []
    assert dense.total_macs / small.total_macs >= 1.6
    x = _x(4)
    ref = keras.ops.convert_to_numpy(pruned(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))

    def query_weights(m):
        return sum(int(np.prod(m.get_layer(f"mha_{b}")._query_dense.kernel.shape))
                   for b in range(2))

    assert query_weights(shrunk) < query_weights(model)


@pytest.mark.slow
def test_shrunk_vit_exports_to_tflite(tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TFLite export needs the TensorFlow backend")
    from tf_psp import export

    model = _vit("token")
    dense = export.export_tflite(model, tmp_path / "dense.tflite", probe=_x(5))
    assert dense.max_rel_error <= 1e-4, dense
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance="random")
    shrunk = tf_psp.strip_and_shrink(pruned)
    small = export.export_tflite(shrunk, tmp_path / "shrunk.tflite", probe=_x(5))
    assert small.max_rel_error <= 1e-4, small
    assert small.size_bytes < dense.size_bytes


def test_head_alphas_train_and_are_decayed():
    psp = tf_psp.parameterize(_vit("token", blocks=1), coupling="group")
    mha = _gates(psp)["mha_0"]
    assert mha.losses  # the default alpha regularizer (weight decay) applies to the head alphas
    rng = np.random.default_rng(7)
    x, y = rng.normal(size=(32, 16, 16, 3)).astype("float32"), rng.integers(0, 10, 32)
    psp.compile(keras.optimizers.SGD(0.05), "sparse_categorical_crossentropy", jit_compile=False)
    before = np.array(keras.ops.convert_to_numpy(mha.alpha.value))
    psp.fit(x, y, epochs=1, batch_size=16, verbose=0)
    after = keras.ops.convert_to_numpy(mha.alpha.value)
    assert np.all(after != before)


def test_balance_alphas_balances_heads_and_keeps_outputs():
    psp = tf_psp.parameterize(_vit("token", blocks=1), coupling="group")
    mha = _gates(psp)["mha_0"]
    _zero_alphas(mha, [1])
    balanced = tf_psp.balance_alphas(psp, kernel_decay=5e-4)
    x = _x(9)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(balanced(x)),
                               keras.ops.convert_to_numpy(psp(x)), rtol=1e-4, atol=1e-5)
    alpha = keras.ops.convert_to_numpy(balanced.get_layer("mha_0").alpha.value)
    kernel = keras.ops.convert_to_numpy(mha.head_output_kernel)
    norms = np.sqrt(np.sum(np.square(kernel), axis=(1, 2)))
    # alpha_h = (kappa / lambda)**(1/4) * sqrt(||alpha_h * W_h||): alpha_h**2 / ||W_h|| is one
    # constant over the live heads (alpha was 1), and a pruned head stays at the floor
    assert alpha[1] <= 1e-5
    ratio = alpha[[0, 2, 3]] ** 2 / norms[[0, 2, 3]]
    np.testing.assert_allclose(ratio, ratio[0], rtol=1e-4)


def test_mac_weighted_decay_covers_head_alphas():
    model = _vit("token", blocks=1)
    psp = tf_psp.parameterize(model, coupling="group", cost="macs")
    mha = _gates(psp)["mha_0"]
    gate = next(layer for layer in psp.layers if tf_psp.coupling.is_group_alphas(layer))
    head_weights = mha.alpha_regularizer.get_config()["weights"]
    group_weights = [w for group in gate.costs for w in group]
    assert len(head_weights) == HEADS
    # every head costs the layer's MACs / heads; all weights together have mean 1
    assert np.allclose(head_weights, head_weights[0])
    np.testing.assert_allclose(np.mean(head_weights + group_weights), 1.0, rtol=1e-6)
    mha_macs = _attention_macs(TOKENS, TOKENS, D, HEADS, KEY_DIM, KEY_DIM)
    unit_macs = 2 * TOKENS * D  # an MLP unit: one row of mlp_up and one of mlp_down per token
    mlp = [w for w in group_weights if w > 0]
    np.testing.assert_allclose(head_weights[0] / mlp[0], mha_macs / HEADS / unit_macs, rtol=1e-6)
