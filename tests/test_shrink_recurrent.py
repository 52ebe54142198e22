"""RNN units and Embedding dims as structures: Embedding -> causal Conv1D -> SimpleRNN/LSTM/GRU.

Oracle: the PSP model itself in inference mode (`strip_and_shrink` must compute
the same outputs, `conftest._shrink_and_compare`); unit counts and MACs counted by hand.
"""

import os
import tempfile

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import recurrent_layers

from conftest import _shrink_and_compare, assert_loads_the_same, randomize_weights

L = keras.layers
VOCAB, DIMS, FILTERS, UNITS, STEPS = 50, 16, 24, 20, 12


def _model(kind="LSTM", sequences=True, **options):
    inputs = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(VOCAB, DIMS, name="emb")(inputs)
    h = L.Conv1D(FILTERS, 3, padding="causal", activation="relu", name="conv")(h)
    h = getattr(L, kind)(UNITS, return_sequences=sequences, name="rnn", **options)(h)
    if sequences:
        h = L.GlobalAveragePooling1D(name="gap")(h)
    return randomize_weights(keras.Model(inputs, L.Dense(5, name="head")(h)))


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, (3, STEPS)).astype("int32")


def _zero_units(psp, units):
    rnn = psp.get_layer("rnn")
    alpha = np.ones(UNITS, "float32")
    alpha[list(units)] = 0.0
    rnn.alpha.assign(alpha)


@pytest.mark.parametrize("kind, options", [
    ("SimpleRNN", {}), ("LSTM", {}), ("GRU", {}), ("GRU", {"reset_after": False}),
    ("LSTM", {"go_backwards": True}),
])
@pytest.mark.parametrize("sequences", [True, False])
def test_dead_units_shrink_exactly(kind, options, sequences):
    model = _model(kind, sequences, **options)
    psp = tf_psp.parameterize(model, coupling="group")
    x = _ids()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(psp(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-5, atol=1e-5)
    assert isinstance(psp.get_layer("rnn"), recurrent_layers.PSP_RECURRENT[type(
        model.get_layer("rnn"))])
    _zero_units(psp, [0, 3, 7, 11])
    shrunk, report = _shrink_and_compare(psp, x, {"rnn": UNITS - 4})
    assert "heads" not in str(report)  # units are the layer's channels
    rnn = shrunk.get_layer("rnn")
    gates = {"SimpleRNN": 1, "LSTM": 4, "GRU": 3}[kind]
    assert tuple(rnn.cell.kernel.shape) == (FILTERS, gates * (UNITS - 4))
    assert tuple(rnn.cell.recurrent_kernel.shape) == (UNITS - 4, gates * (UNITS - 4))
    # the kept units' weights are the original ones (LSTM: its forget-gate block)
    if kind == "LSTM":
        keep = [j for j in range(UNITS) if j not in (0, 3, 7, 11)]
        original = keras.ops.convert_to_numpy(model.get_layer("rnn").cell.kernel)
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(rnn.cell.kernel)[:, UNITS - 4:2 * (UNITS - 4)],
            original[:, UNITS:2 * UNITS][:, keep])


def test_unread_unit_of_a_plain_model_goes_and_a_recurrently_read_one_stays():
    # no PSP: units 2 and 5 are read by no head row; unit 5 still feeds unit 1's gates
    model = _model("GRU", sequences=False)
    head = model.get_layer("head")
    kernel = np.array(keras.ops.convert_to_numpy(head.kernel))
    kernel[[2, 5]] = 0.0
    head.kernel.assign(kernel)
    cell = model.get_layer("rnn").cell
    recurrent = np.array(keras.ops.convert_to_numpy(cell.recurrent_kernel))
    recurrent[2, :] = 0.0  # nobody reads h_2
    cell.recurrent_kernel.assign(recurrent)
    _shrink_and_compare(model, _ids(1), {"rnn": UNITS - 1})  # unit 2 goes, unit 5 stays


def test_embedding_dims_and_conv_channels_go_through_group_alphas():
    model = _model("LSTM")
    psp = tf_psp.parameterize(model, coupling="group")
    plan = tf_psp.pruning_plan(psp, importance="random")
    spaces = {u.space for u in plan.units}
    assert {"output of 'emb'", "output of 'conv'", "output of 'rnn'"} <= spaces
    units = [u.index for u in plan.units if u.space in ("output of 'emb'", "output of 'conv'")]
    pruned = plan.apply(units[::3])
    shrunk, report = _shrink_and_compare(pruned, _ids(2), {})
    widths = {row["name"]: row["channels_after"] for row in report.layers}
    assert widths["emb"] < DIMS and widths["conv"] < FILTERS
    assert shrunk.get_layer("rnn").cell.kernel.shape[0] == widths["conv"]


def _rnn_macs(steps, inputs, units, gates):
    return steps * (inputs + units) * gates * units


def test_profile_counts_rnn_macs_and_dead_units():
    model = _model("LSTM")
    prof = tf_psp.profile(model)
    assert prof.uncounted == []
    rows = {row.name: row for row in prof.layers}
    assert rows["rnn"].macs == _rnn_macs(STEPS, FILTERS, UNITS, 4)
    assert rows["emb"].macs == 0
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_units(psp, range(5))
    prof = tf_psp.profile(psp)
    assert prof.uncounted == []
    rows = {row.name: row for row in prof.layers}
    assert (rows["rnn"].structures_total, rows["rnn"].structures_alive) == (UNITS, UNITS - 5)
    assert rows["rnn"].pruned_macs == (_rnn_macs(STEPS, FILTERS, UNITS, 4)
                                       - _rnn_macs(STEPS, FILTERS, UNITS - 5, 4))
    shrunk = tf_psp.strip_and_shrink(psp)
    head_rows = 5 * 5  # the head's rows of the 5 removed units go too
    assert tf_psp.profile(shrunk).total_macs == (prof.total_macs - rows["rnn"].pruned_macs
                                                 - head_rows)


def test_prune_to_budget_halves_the_macs_exactly_and_saves(tmp_path):
    model = _model("LSTM")
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance="random")
    shrunk = tf_psp.strip_and_shrink(pruned)
    x = _ids(3)
    ref = keras.ops.convert_to_numpy(pruned(x))
    out = keras.ops.convert_to_numpy(shrunk(x))
    assert np.max(np.abs(out - ref)) <= 1e-4 * np.max(np.abs(ref))
    assert tf_psp.profile(model).total_macs / tf_psp.profile(shrunk).total_macs >= 1.6
    assert shrunk.get_layer("rnn").units < UNITS
    assert_loads_the_same(shrunk, x, tmp_path)


def test_psp_recurrent_twin_saves_and_loads(tmp_path):
    psp = tf_psp.parameterize(_model("GRU"), coupling="group")
    _zero_units(psp, [4])
    loaded = assert_loads_the_same(psp, _ids(4), tmp_path)
    assert isinstance(loaded.get_layer("rnn"), recurrent_layers.PSPGRU)


@pytest.mark.parametrize("options, reason", [
    ({"return_state": True}, "returns its states"),
    ({"activation": "sigmoid"}, "does not map 0 to 0"),
    ({"stateful": True}, "is stateful"),
])
def test_units_kept_with_the_reason(options, reason):
    inputs = keras.Input((STEPS, 4), batch_size=2 if options.get("stateful") else None)
    out = L.LSTM(6, name="rnn", **options)(inputs)
    out = out[0] if isinstance(out, (list, tuple)) else out
    model = randomize_weights(keras.Model(inputs, L.Dense(2, name="head")(out)))
    graph = tf_psp.graph.ChannelGraph(model)
    node = next(n for n in graph.nodes if n.name == "rnn")
    assert reason in node.frozen_reason


def _export_model(steps):
    inputs = keras.Input((steps,), dtype="int32")
    h = L.Embedding(VOCAB, DIMS, name="emb")(inputs)
    h = L.Bidirectional(L.GRU(6, return_sequences=True), name="bi")(h)  # kept whole
    h = L.LSTM(UNITS, name="rnn")(h)
    return randomize_weights(keras.Model(inputs, L.Dense(5, name="head")(h)))


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite export needs TF")
@pytest.mark.parametrize("steps", [STEPS, None])
def test_recurrent_models_export_to_tflite(steps):
    # static steps: an unrolled clone (any batch); None: a static batch of 1, probed per sample
    from tf_psp import export, recurrent_export

    model = _export_model(steps)
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_units(psp, [1, 2])
    shrunk = tf_psp.strip_and_shrink(psp)
    assert shrunk.get_layer("rnn").units == UNITS - 2
    _, batch = recurrent_export.tflite_ready(shrunk)
    assert batch == (None if steps else 1)
    x = _ids(5)
    with tempfile.TemporaryDirectory() as tmp:
        result = export.export_tflite(shrunk, os.path.join(tmp, "rnn.tflite"), probe=x)
        outputs = export.run_tflite(result.path, x[:1])[0]
    assert result.max_rel_error <= 1e-5
    np.testing.assert_allclose(outputs, keras.ops.convert_to_numpy(shrunk(x[:1])),
                               rtol=1e-5, atol=1e-5)
    assert not shrunk.get_layer("rnn").unroll  # the model itself is not changed


def test_bidirectional_is_kept_with_the_reason():
    inputs = keras.Input((STEPS, 4))
    h = L.Dense(8, name="pre")(inputs)
    h = L.Bidirectional(L.GRU(6), name="bi")(h)
    model = randomize_weights(keras.Model(inputs, L.Dense(2, name="head")(h)))
    _, report = _shrink_and_compare(model, np.ones((2, STEPS, 4), "float32"), {"pre": 8})
    assert "is a Bidirectional RNN" in str(report) or not report.blocked
    assert tf_psp.profile(model).uncounted == []


def test_masked_sequences_shrink_exactly():
    # Embedding(mask_zero=True): masked steps carry the state; a dead unit stays 0
    inputs = keras.Input((STEPS,), dtype="int32")
    h = L.Embedding(VOCAB, DIMS, mask_zero=True, name="emb")(inputs)
    h = L.LSTM(UNITS, name="rnn")(h)
    model = randomize_weights(keras.Model(inputs, L.Dense(3, name="head")(h)))
    psp = tf_psp.parameterize(model, coupling="group")
    _zero_units(psp, [2, 9])
    x = _ids(6)
    x[:, -4:] = 0  # padding
    _shrink_and_compare(psp, x, {"rnn": UNITS - 2})


@pytest.mark.parametrize("importance", ["alpha", "l1", "l2"])
def test_every_weight_importance_prunes_a_recurrent_model(importance):
    model = _model("GRU")
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance=importance)
    shrunk, _ = _shrink_and_compare(pruned, _ids(7), {})
    assert tf_psp.profile(model).total_macs / tf_psp.profile(shrunk).total_macs >= 1.6


def test_balance_alphas_keeps_outputs_with_an_rnn_reading_group_alphas():
    psp = tf_psp.parameterize(_model("LSTM"), coupling="group")
    balanced = tf_psp.balance_alphas(psp, kernel_decay=1e-4)
    x = _ids(8)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(balanced(x)),
                               keras.ops.convert_to_numpy(psp(x)), rtol=1e-5, atol=1e-5)
    gate = next(layer for layer in balanced.layers if tf_psp.coupling.is_group_alphas(layer))
    assert not np.allclose(gate.alphas(), 1.0)  # it did rebalance the conv channels' alphas
