"""PSPMonitor: sparsity and MAC reduction in the training logs."""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp.callbacks import PSPMonitor


def _data(n=16):
    rng = np.random.default_rng(0)
    return rng.normal(size=(n, 6, 6, 4)).astype("float32"), rng.normal(size=(n, 2)).astype(
        "float32"
    )


def _psp_model():
    inp = keras.Input((6, 6, 4))
    x = tf_psp.PSPConv2D(8, 3, structure="channel", alpha_regularizer=None, name="c")(inp)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = tf_psp.PSPDense(2, structure="filter", alpha_regularizer=None, name="d")(x)
    model = keras.Model(inp, out)
    # Learning rate 0: alphas stay where the test puts them.
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    return model


def test_history_has_hand_computed_sparsity_and_reduction():
    model = _psp_model()
    model.get_layer("c").alpha.assign([0.0, 1.0, 0.0, 0.0])  # 3 of 4 channels pruned
    x, y = _data()
    history = model.fit(
        x, y, epochs=2, batch_size=8, verbose=0, callbacks=[PSPMonitor(log_pruned_macs=True)]
    )
    # 3 pruned of 4 + 2 structures.
    assert history.history["psp_sparsity"] == pytest.approx([3 / 6, 3 / 6])
    # Conv: 16 positions * 9 * 4 * 8 = 4608 MACs, 3/4 of them pruned; Dense: 16 MACs.
    total, pruned = 4608 + 16, 4608 * 3 // 4
    assert history.history["psp_pruned_macs"] == pytest.approx([pruned, pruned])
    assert history.history["psp_mac_reduction"] == pytest.approx([total / (total - pruned)] * 2)


def test_values_follow_alpha_changes_between_epochs():
    model = _psp_model()
    x, y = _data()

    class PruneAfterFirstEpoch(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                self.model.get_layer("d").alpha.assign([0.0, 1.0])

    # The pruning callback runs after the monitor, so the change shows at epoch 2.
    history = model.fit(
        x, y, epochs=2, verbose=0, callbacks=[PSPMonitor(), PruneAfterFirstEpoch()]
    )
    assert history.history["psp_sparsity"] == pytest.approx([0.0, 1 / 6])


def test_model_without_psp_layers_logs_neutral_values(capsys):
    inp = keras.Input((3,))
    model = keras.Model(inp, keras.layers.Dense(2)(inp))
    model.compile(optimizer="sgd", loss="mse")
    history = model.fit(
        np.zeros((4, 3), "float32"),
        np.zeros((4, 2), "float32"),
        epochs=1,
        verbose=0,
        callbacks=[PSPMonitor(verbose=1)],
    )
    assert history.history["psp_sparsity"] == [0.0]
    assert history.history["psp_mac_reduction"] == [1.0]
    assert "PSP sparsity 0.0%" in capsys.readouterr().out


def test_logged_sparsity_matches_trained_alphas():
    inp = keras.Input((6, 6, 4))
    conv = tf_psp.PSPConv2D(
        8, 3, alpha_regularizer=tf_psp.regularizers.WeightDecay(1.0), epsilon=0.5, name="c"
    )
    out = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(conv(inp)))
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.2), loss="mse")
    conv.alpha.assign([0.52, 0.6, 2.0, 3.0])  # strong decay pushes the small ones below 0.5
    x, y = _data()
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[PSPMonitor()])
    hand = np.mean(np.abs(keras.ops.convert_to_numpy(conv.alpha.value)) < 0.5)
    assert 0 < hand < 1
    assert history.history["psp_sparsity"][-1] == pytest.approx(hand)


def test_input_shape_for_models_with_unknown_dims():
    inp = keras.Input((None, None, 4))
    x = tf_psp.PSPConv2D(3, 1, alpha_regularizer=None, name="c")(inp)
    model = keras.Model(inp, keras.layers.GlobalAveragePooling2D()(x))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0), loss="mse")
    model.get_layer("c").alpha.assign([0.0, 1.0, 1.0, 1.0])
    monitor = PSPMonitor(input_shape=(6, 6, 4))
    x, _ = _data(8)
    history = model.fit(x, np.zeros((8, 3)), epochs=1, verbose=0, callbacks=[monitor])
    assert history.history["psp_sparsity"] == pytest.approx([0.25])
    assert history.history["psp_mac_reduction"] == pytest.approx([4 / 3])


def _event_scalars(log_dir):
    """`{tag: [(step, value)]}` of every scalar in the TensorBoard event files under `log_dir`."""
    import glob
    import os

    import tensorflow as tf

    scalars = {}
    for path in sorted(glob.glob(os.path.join(log_dir, "train", "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue  # the model's config, written once
                scalars.setdefault(value.tag, []).append(
                    (event.step, float(tf.make_ndarray(value.tensor))))
    return scalars


@pytest.mark.parametrize("tensorboard_first", [True, False])
def test_psp_values_reach_tensorboard_in_either_order(tmp_path, tensorboard_first):
    pytest.importorskip("tensorboard")
    model = _psp_model()
    model.get_layer("c").alpha.assign([0.0, 1.0, 0.0, 0.0])  # as in the first test: 3 / 6
    x, y = _data()
    board = keras.callbacks.TensorBoard(str(tmp_path))
    budget = tf_psp.callbacks.PruneToBudget(keep_macs=0.5, verbose=0)
    monitor = PSPMonitor()
    callbacks = [board, monitor, budget] if tensorboard_first else [monitor, budget, board]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=callbacks)
    scalars = _event_scalars(str(tmp_path))
    for name in ("psp_sparsity", "psp_mac_reduction", "psp_budget_kept_macs"):
        assert [s for s, _ in scalars["epoch_" + name]] == [0, 1], (name, sorted(scalars))
        np.testing.assert_allclose([v for _, v in scalars["epoch_" + name]],
                                   history.history[name], rtol=1e-6)
    assert "epoch_loss" in scalars


def test_epoch_lines_follow_the_progress_bar(capsys):
    model = _psp_model()
    x, y = _data()
    model.fit(x, y, epochs=2, batch_size=8, verbose=1, callbacks=[PSPMonitor(verbose=1)])
    lines = capsys.readouterr().out.splitlines()
    ours = [i for i, line in enumerate(lines) if "PSP sparsity" in line]
    assert [lines[i].split(":")[0] for i in ours] == ["Epoch 1", "Epoch 2"]  # never glued
    assert all("loss" in lines[i - 1] for i in ours)  # each right after its epoch's bar
