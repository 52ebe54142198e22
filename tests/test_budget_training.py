"""Budget-driven training: PruneToBudget, tf_psp.prune and the sparse-training baselines.

Oracles: alphas before/after a step with a zero learning rate (only the
callback moves them), the profile of the shrunk model, numpy proximal steps.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import sparse_training

L = keras.layers


def _model():
    i = keras.Input((8, 8, 1))
    x = L.ReLU()(L.BatchNormalization(name="bn1")(L.Conv2D(16, 3, padding="same", name="c1")(i)))
    y = L.ReLU()(L.BatchNormalization(name="bn2")(L.Conv2D(16, 3, padding="same", name="c2")(x)))
    x = L.Add()([x, L.Conv2D(16, 1, name="c3")(y)])
    x = L.Conv2D(24, 3, strides=2, padding="same", activation="relu", name="c4")(x)
    return keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)), name="tiny")


def _data(n=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 8, 8, 1)).astype("float32")
    y = (x.mean(axis=(1, 2, 3)) > 0).astype("int32") + (x[:, 0, 0, 0] > 1).astype("int32")
    return x, y


def _alphas(model):
    gate = [layer for layer in model.layers if tf_psp.coupling.is_group_alphas(layer)][0]
    return gate.alphas()


def _compile(model, lr):
    model.compile(keras.optimizers.SGD(lr), "sparse_categorical_crossentropy", jit_compile=False)


def test_selective_decay_touches_only_selected_alphas():
    keras.utils.set_random_seed(0)
    psp = tf_psp.parameterize(_model(), coupling="group", alpha_regularizer=None)
    _compile(psp, 0.0)  # no gradient step: only the callback can move alphas
    x, y = _data()
    callback = tf_psp.PruneToBudget(0.5)
    before = _alphas(psp).copy()
    callback.set_model(psp)
    callback.set_params({"epochs": 10, "steps": 4, "verbose": 0})
    callback.on_train_begin()
    psp.fit(x, y, batch_size=16, epochs=1, verbose=0)  # trains without the callback
    np.testing.assert_array_equal(_alphas(psp), before)
    callback.on_train_batch_end(0)
    after = _alphas(psp)
    selected = np.zeros(len(before), bool)
    for i in callback.selected:
        for _, g, idx in callback.plan.units[i].handles:
            gate = [layer for layer in psp.layers if tf_psp.coupling.is_group_alphas(layer)][0]
            selected[sum(gate.group_sizes[:g]) + idx] = True
    assert selected.any() and not selected.all()
    np.testing.assert_array_equal(after[~selected], before[~selected])
    factor = np.exp(callback.log_shrink(1 / 40))
    np.testing.assert_allclose(after[selected], before[selected] * factor, rtol=1e-6)
    assert np.all(after[selected] < before[selected])


def test_budget_met_by_construction_after_training():
    keras.utils.set_random_seed(1)
    psp = tf_psp.parameterize(_model(), coupling="group", alpha_regularizer=None)
    _compile(psp, 0.05)
    x, y = _data()
    callback = tf_psp.PruneToBudget(0.4)
    monitor = tf_psp.PSPMonitor(keep_macs=0.4)
    history = psp.fit(x, y, batch_size=16, epochs=4, verbose=0, callbacks=[callback, monitor])
    small = tf_psp.strip_and_shrink(psp)
    kept = tf_psp.profile(small).total_macs / tf_psp.profile(_model()).total_macs
    assert 0.37 <= kept <= 0.4
    logged = history.history["psp_budget_kept_macs"]
    assert logged[-1] == pytest.approx(kept, abs=1e-6) or logged[-1] >= kept
    assert history.history["psp_budget_target"][-1] == 0.4
    assert logged[0] > logged[-1]  # the budget is approached while training


def test_schedule_reaches_final_shrink_at_decay_until():
    cb = tf_psp.PruneToBudget(0.5, decay_until=0.8, final_shrink=1e-3, power=3)
    assert cb.log_shrink(0.0) == 0.0
    assert np.exp(cb.log_shrink(0.8)) == pytest.approx(1e-3)
    assert np.exp(cb.log_shrink(0.4)) == pytest.approx(1e-3 ** 0.125)
    assert cb.log_shrink(1.0) == cb.log_shrink(0.8)


@pytest.mark.parametrize("kwargs", [{"keep_macs": 0}, {"keep_macs": 2},
                                    {"keep_macs": 0.5, "decay_until": 0},
                                    {"keep_macs": 0.5, "power": -1}])
def test_callback_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        tf_psp.PruneToBudget(**kwargs)


def test_prune_one_call_end_to_end():
    keras.utils.set_random_seed(2)
    model = _model()
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)
    x, y = _data(128)
    model.fit(x, y, epochs=2, batch_size=32, verbose=0)
    before = [w.copy() for w in model.get_weights()]
    small, report = tf_psp.prune(model, (x, y), keep_macs=0.5, epochs=2, fine_tune_epochs=1,
                                 validation_data=(x[:32], y[:32]), verbose=0)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert not any(type(layer).__module__.startswith("tf_psp") for layer in small.layers)
    assert 0.47 <= report.kept_macs <= 0.5
    assert report.shrunk_macs == tf_psp.profile(small).total_macs
    assert set(report.evaluation) == {"dense", "pruned", "fine_tuned"}
    assert "accuracy" in report.evaluation["fine_tuned"]
    assert "keeps" in str(report)
    small.predict(x[:4], verbose=0)


def test_prune_says_its_phases_and_its_result_loads_without_warning(tmp_path, capsys):
    import warnings

    keras.utils.set_random_seed(3)
    model = _model()
    model.compile(keras.optimizers.Adam(1e-2),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    x, y = _data(64)
    small, report = tf_psp.prune(model, (x, y), keep_macs=0.5, epochs=1,
                                 validation_data=(x[:32], y[:32]), verbose=1)
    out = capsys.readouterr().out
    assert list(report.phase_seconds)[:4] == ["dense evaluation", "parameterize",
                                              "budget training", "BatchNorm recalibration"]
    for name, seconds in report.phase_seconds.items():
        assert seconds >= 0 and f"prune: {name} took" in out
    assert set(report.evaluation) == {"dense", "pruned"}  # no fine-tuning, no fine_tuned row
    assert "fine_tuned" not in str(report) and "time: dense evaluation" in str(report)
    path = str(tmp_path / "small.keras")
    small.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras.models.load_model(path)
    assert not [w for w in caught if "Skipping variable loading" in str(w.message)]


def test_prune_needs_a_loss():
    with pytest.raises(ValueError, match="loss"):
        tf_psp.prune(_model(), _data(), keep_macs=0.5, epochs=1)


def test_batchnorm_l1_soft_thresholds_gamma():
    keras.utils.set_random_seed(3)
    model = _model()
    _compile(model, 0.1)
    bn = model.get_layer("bn1")
    gamma = np.linspace(-0.01, 1.0, 16).astype("float32")
    bn.gamma.assign(gamma)
    cb = sparse_training.BatchNormL1(0.05)
    cb.set_model(model)
    cb.on_train_batch_end(0)
    expected = np.sign(gamma) * np.maximum(np.abs(gamma) - 0.005, 0)
    np.testing.assert_allclose(bn.gamma.numpy(), expected, atol=1e-7)


def test_group_lasso_proximal_step_matches_numpy():
    keras.utils.set_random_seed(4)
    model = _model()
    _compile(model, 0.1)
    cb = sparse_training.GroupLasso(5.0)
    cb.set_model(model)
    cb.on_train_begin()
    w = {n: model.get_layer(n).kernel.numpy() for n in ("c1", "c2", "c3", "c4")}
    b = {n: model.get_layer(n).bias.numpy() for n in ("c1", "c2", "c3")}

    def rows(k):
        return np.sum(np.moveaxis(k, -2, 0).reshape(k.shape[-2], -1) ** 2, axis=1)

    def cols(k):
        return np.sum(k.reshape(-1, k.shape[-1]) ** 2, axis=0)

    # the residual stream: c1 and c3 write it (Add), c2 and c4 read it;
    # the channels c2 writes are read by c3 only
    stream = np.sqrt(cols(w["c1"]) + b["c1"] ** 2 + cols(w["c3"]) + b["c3"] ** 2
                     + rows(w["c2"]) + rows(w["c4"]))
    inner = np.sqrt(cols(w["c2"]) + b["c2"] ** 2 + rows(w["c3"]))
    s_stream, s_inner = (np.maximum(0, 1 - 0.5 / n) for n in (stream, inner))
    cb.on_train_batch_end(0)
    expected = w["c3"] * s_inner[:, None] * s_stream[None, :]
    np.testing.assert_allclose(model.get_layer("c3").kernel.numpy(), expected, rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(model.get_layer("c2").bias.numpy(), b["c2"] * s_inner,
                               rtol=1e-4, atol=1e-7)


def test_group_lasso_zeroes_weak_groups_that_shrink_then_removes():
    keras.utils.set_random_seed(5)
    model = _model()
    _compile(model, 0.1)
    cb = sparse_training.GroupLasso(100.0)  # threshold 10: every group is zeroed
    cb.set_model(model)
    cb.on_train_begin()
    cb.on_train_batch_end(0)
    assert np.all(model.get_layer("c2").kernel.numpy() == 0)
