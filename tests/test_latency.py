"""Latency tables, the latency cost model and latency budgets.

Most tests use synthetic tables (a known cost per layer and width), so they
check the budget logic against an independent oracle: the table's
prediction for the *shrunk model's own layer shapes*. One slow test measures
a real table with LiteRT.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import latency, latency_targets

L = keras.layers


def _model(seed=0):
    keras.utils.set_random_seed(seed)
    x = keras.Input((16, 16, 3))
    h = L.Conv2D(32, 3, padding="same", name="stem")(x)
    h = L.ReLU()(L.BatchNormalization(name="bn0")(h))
    h = L.DepthwiseConv2D(3, padding="same", name="dw")(h)
    h = L.Conv2D(24, 1, name="pw")(h)
    s = L.Conv2D(24, 1, name="skip")(x)
    h = L.Add()([h, s])
    h = L.Conv2D(48, 3, padding="same", activation="relu", name="expensive")(h)
    h = L.Conv2D(16, 1, activation="relu", name="cheap")(h)
    h = L.GlobalAveragePooling2D()(h)
    return keras.Model(x, L.Dense(10, name="fc")(h), name="lat_model")


def _table(model, per_mac=1e-9, quantum=4, off_penalty=1.3, weights=None):
    """A synthetic table: seconds = per_mac * weight * (MACs at those widths) + 1e-6."""
    weights = weights or {}
    layers = {}
    for call in latency.kernel_calls(tf_psp.strip(model)):
        positions = float(np.prod(call.input_shape[1:-1]))
        k = float(np.prod(getattr(call.node.layer, "kernel_size", (1,))))
        w = weights.get(call.name, 1.0)
        steps = list(latency.width_grid(call.cin if call.tied else call.cout, quantum, 4))
        top = call.cin if call.tied else call.cout
        if top % quantum:
            steps.append(latency._round_up(top, quantum))
        cins = [call.cin] if call.tied else sorted({max(1, call.cin // 2), call.cin})

        def cost(ci, co, positions=positions, k=k, w=w, tied=call.tied):
            return per_mac * w * positions * k * (ci if tied else ci * co) + 1e-6

        on = [[cost(ci, p) if not call.tied else cost(p, p) for p in steps] for ci in cins]
        off = [[v * off_penalty for v in row] for row in on]
        layers[call.name] = latency.LayerLatency(
            name=call.name, cin=call.cin, cout=call.cout, tied=call.tied, quantum=quantum,
            cins=cins, steps=[int(s) for s in steps], on=on, off=off)
    return latency.LatencyTable(model=model.name, runtime="tflite", threads=1,
                                machine="test", quantum=quantum, layers=layers,
                                dense_seconds=0.0, fixed_seconds=1e-5)


def test_layer_latency_reads_the_staircase():
    entry = latency.LayerLatency(name="c", cin=8, cout=8, tied=False, quantum=4,
                                 cins=[4, 8], steps=[4, 8], on=[[1.0, 2.0], [3.0, 4.0]],
                                 off=[[10.0, 20.0], [30.0, 40.0]])
    assert entry.seconds(8, 8) == 4.0
    assert entry.seconds(4, 4) == 1.0
    assert entry.seconds(6, 8) == pytest.approx(3.0)  # linear in the input width
    assert entry.seconds(8, 7) == 40.0  # off the quantum: the step above, off table
    assert entry.seconds(8, 3) == 30.0
    tied = latency.LayerLatency(name="d", cin=8, cout=8, tied=True, quantum=4, cins=[8],
                                steps=[4, 8], on=[[1.0, 2.0]], off=[[5.0, 6.0]])
    assert tied.seconds(4, 999) == 1.0 and tied.seconds(5, 5) == 6.0


def test_width_grid_is_on_the_quantum():
    grid = latency.width_grid(100, 16, 5)
    assert all(g % 16 == 0 for g in grid) and grid[-1] == 96 and grid[0] >= 16
    assert list(latency.width_grid(3, 4, 5)) == []


def test_plan_prediction_matches_the_shrunk_model():
    model = _model()
    table = _table(model)
    psp = tf_psp.parameterize(model, coupling="group", alpha_regularizer=None)
    plan = tf_psp.pruning_plan(psp, importance="random", seed=3)
    rng = np.random.default_rng(0)
    for round_to in (1, 4):
        units = sorted(rng.choice(len(plan.units), size=len(plan.units) // 3, replace=False))
        shrunk = tf_psp.strip_and_shrink(plan.apply(units), round_to=round_to)
        assert plan.kept_latency(units, table, round_to) == pytest.approx(
            table.predict(shrunk), rel=1e-9)
    assert table.predict(model) == pytest.approx(table.predict_widths({}))


@pytest.mark.parametrize("keep", [0.7, 0.4])
def test_keep_latency_meets_the_budget(keep):
    model = _model()
    table = _table(model)
    pruned, report = tf_psp.prune_to_budget(model, keep_latency=keep, latency_table=table,
                                            importance="l1", return_report=True)
    shrunk = tf_psp.strip_and_shrink(pruned)
    measured = table.predict(shrunk) / table.predict(model)
    assert keep - 0.05 <= measured <= keep + 1e-9
    assert report.kept_latency == pytest.approx(measured, rel=1e-9)
    assert report.keep_macs is None and report.keep_latency == keep
    assert "latency" in str(report)


def test_latency_budget_takes_units_in_score_order():
    """By default the table decides how many units go, the scores which: the selection is
    a prefix of the plan's score order (before rounding)."""
    model = _model()
    table = _table(model)
    psp = tf_psp.parameterize(model, coupling="group", alpha_regularizer=None)
    plan = tf_psp.pruning_plan(psp, importance="random", seed=4)
    selected = plan.select(keep_latency=0.5, table=table)
    order = plan.order()
    assert sorted(order[:len(selected)]) == selected


def test_latency_ranking_takes_the_channels_that_cost_time(monkeypatch):
    """LATENCY_EXPONENT=1 (importance per latency saved), equal importance everywhere: a
    latency budget cuts the layer whose channels cost time; a MAC budget does not know
    that layer is slow."""
    monkeypatch.setattr(tf_psp.plan, "LATENCY_EXPONENT", 1.0)
    model = _model()
    slow = _table(model, weights={"cheap": 400.0})
    flat = lambda unit, plain: 1.0  # noqa: E731
    pruned = tf_psp.prune_to_budget(model, keep_latency=0.6, latency_table=slow,
                                    importance=flat)
    by_macs = tf_psp.prune_to_budget(model, keep_macs=0.9, importance=flat)
    lat_small = tf_psp.strip_and_shrink(pruned)
    mac_small = tf_psp.strip_and_shrink(by_macs)
    width = {m: dict((c.name, c.cout) for c in latency.kernel_calls(m))
             for m in (lat_small, mac_small)}
    assert width[lat_small]["expensive"] < 48  # the space 'cheap' reads
    assert slow.predict(lat_small) < slow.predict(mac_small)


def test_round_to_auto_takes_the_quantum():
    model = _model()
    table = _table(model, quantum=8)
    pruned, report = tf_psp.prune_to_budget(model, keep_macs=0.5, round_to="auto",
                                            latency_table=table, return_report=True)
    assert report.round_to == 8
    shrunk = tf_psp.strip_and_shrink(pruned)
    for call in latency.kernel_calls(shrunk):
        if call.name not in ("fc",):
            assert call.cout % 8 == 0, (call.name, call.cout)


def test_bad_latency_arguments():
    model = _model()
    table = _table(model)
    with pytest.raises(ValueError, match="keep_latency"):
        tf_psp.prune_to_budget(model, keep_latency=1.5, latency_table=table)
    with pytest.raises(ValueError, match="not both"):
        tf_psp.prune_to_budget(model, keep_macs=0.5, keep_latency=0.5, latency_table=table)
    with pytest.raises(ValueError, match="round_to"):
        tf_psp.prune_to_budget(model, round_to="fast")
    with pytest.raises(ValueError, match="runtime must be one of"):
        tf_psp.latency_table(model, runtime="tpu")
    with pytest.raises(ValueError, match="threads"):
        tf_psp.latency_table(model, threads=0)
    with pytest.raises(ValueError, match="cannot prune to keep_latency"):
        tf_psp.prune_to_budget(model, keep_latency=0.01, latency_table=table)
    other = keras.Sequential([keras.Input((4,)), L.Dense(3, name="other")])
    with pytest.raises(ValueError, match="does not hold"):
        table.predict(other)


def test_table_round_trips_through_json(tmp_path):
    table = _table(_model())
    path = tmp_path / "t.json"
    table.save(path)
    again = latency.LatencyTable.load(path)
    assert again.predict_widths({"pw": (16, 8)}) == table.predict_widths({"pw": (16, 8)})


def test_callback_meets_a_latency_budget():
    model = _model()
    table = _table(model)
    psp = tf_psp.parameterize(model, coupling="group", alpha_regularizer=None)
    psp.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse", jit_compile=False)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 16, 16, 3)), rng.normal(size=(32, 10))
    budget = tf_psp.PruneToBudget(keep_latency=0.6, latency_table=table)
    history = psp.fit(x, y, epochs=2, batch_size=16, verbose=0, callbacks=[budget])
    shrunk = tf_psp.strip_and_shrink(psp)
    assert table.predict(shrunk) / table.predict(model) <= 0.6 + 1e-9
    assert "psp_budget_kept_latency" in history.history
    with pytest.raises(ValueError, match="exactly one"):
        tf_psp.PruneToBudget()


def test_parameterize_cost_latency_weights_slow_channels():
    model = _model()
    table = _table(model, weights={"cheap": 400.0})
    psp = tf_psp.parameterize(model, coupling="group", cost="latency", latency_table=table)
    gate = next(layer for layer in psp.layers if tf_psp.group_alphas.is_group_alphas(layer))
    costs = dict(zip(gate.group_names, gate.costs))
    heavy = [np.mean(c) for name, c in costs.items() if "expensive" in name]
    light = [np.mean(c) for name, c in costs.items() if "stem" in name]
    assert heavy and light and heavy[0] > 10 * light[0]
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(psp(x), model(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="coupling='group'"):
        tf_psp.parameterize(model, cost="latency", latency_table=table)


@pytest.mark.slow
def test_measured_table_of_a_small_model(tmp_path, monkeypatch):
    model = _model()
    table = tf_psp.latency_table(model, points=2, runs=3, cache_dir=tmp_path, quantum=8,
                                 progress=False)
    names = {c.name for c in latency.kernel_calls(model)}
    assert set(table.layers) == names
    for entry in table.layers.values():
        assert np.all(np.asarray(entry.on) > 0) and np.all(np.asarray(entry.off) > 0)
    assert table.dense_seconds > 0 and len(table.calibration) >= 3
    assert table.predict_widths({}) == pytest.approx(
        table.fixed_seconds + table.scale * table.table_sum())
    # a second call reads the whole table from the cache: nothing is measured
    monkeypatch.setattr(latency, "measure_points", lambda *a, **k: pytest.fail("measured"))
    again = tf_psp.latency_table(model, points=2, runs=3, cache_dir=tmp_path, quantum=8,
                                 progress=False)
    assert again.to_dict() == table.to_dict()


def test_prune_to_a_latency_budget():
    model = _model()
    table = _table(model)
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(32, 16, 16, 3)), rng.normal(size=(32, 10))
    small, report = tf_psp.prune(model, (x, y), keep_latency=0.5, latency_table=table,
                                 epochs=2, verbose=0, jit_compile=False)
    assert table.predict(small) / table.predict(model) <= 0.5 + 1e-9
    assert report.keep_latency == 0.5 and report.keep_macs is None
    assert report.kept_latency == pytest.approx(table.predict(small) / table.predict(model))
    assert "latency budget 0.500" in str(report)
    with pytest.raises(ValueError, match="not both"):
        tf_psp.prune(model, (x, y), keep_macs=0.5, keep_latency=0.5, latency_table=table)


def test_old_tables_and_points_are_not_reused(tmp_path):
    data = _table(_model()).to_dict()
    data["version"] = 1  # measured before tables were timed as minima
    with pytest.raises(ValueError, match="version 1"):
        latency.LatencyTable.from_dict(data)
    cache = latency._Cache(tmp_path, "tflite", 1, "cpu")
    assert f"-v{latency.TABLE_VERSION}-" in cache.path and latency.TABLE_VERSION >= 2


def test_the_progress_line_comes_before_any_measuring(monkeypatch, capsys, tmp_path):
    def stop(*args, **kwargs):
        raise RuntimeError("stopped before measuring")

    monkeypatch.setattr(latency, "kernel_calls", stop)
    with pytest.raises(RuntimeError, match="stopped"):
        tf_psp.latency_table(_model(), cache_dir=tmp_path, progress=True)
    assert "latency_table: model 'lat_model' on tflite, 1 thread(s)" in capsys.readouterr().err


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="exports to TFLite need the TensorFlow backend")
def test_one_thread_is_timed_by_its_cpu_time(tmp_path):
    """Time the core was taken away (here: a sleep) does not count with one thread."""
    import time

    from tf_psp import bench, export

    clock = latency_targets.target(threads=1).clock()
    start = clock()
    time.sleep(0.05)
    assert clock() - start < 0.01
    assert latency_targets.target(threads=2).clock() is time.perf_counter
    x = keras.Input((4,))
    path = str(tmp_path / "m.tflite")
    export.export_tflite(keras.Model(x, L.Dense(3)(x)), path)
    timer = bench.tflite_timer(path, cpu_time=True)
    assert all(0 < timer() < 0.05 for _ in range(3))
    with pytest.raises(ValueError, match="one thread"):
        bench.tflite_timer(path, num_threads=2, cpu_time=True)


def test_a_fine_alignment_reads_the_next_step():
    """ONNX Runtime's depthwise kernel: a multiple of 4 costs what the next multiple of the
    quantum costs, other widths what the width below a step costs."""
    on, off = [[1.0, 2.0, 3.0]], [[5.0, 6.0, 7.0]]
    entry = latency.LayerLatency(name="dw", cin=48, cout=48, tied=True, quantum=16, cins=[48],
                                 steps=[16, 32, 48], on=on, off=off, fine=4)
    assert entry.seconds(44, 44) == 3.0 and entry.seconds(36, 36) == 3.0
    assert entry.seconds(46, 46) == 7.0 and entry.seconds(31, 31) == 6.0
    assert entry.seconds(32, 32) == 2.0
    coarse = latency.LayerLatency(name="dw", cin=48, cout=48, tied=True, quantum=16,
                                  cins=[48], steps=[16, 32, 48], on=on, off=off)
    assert coarse.seconds(44, 44) == 7.0  # without it: the slow path
    assert latency.LayerLatency(**{k: v for k, v in coarse.__dict__.items()}).fine == 0


def test_input_widths_off_the_quantum_read_their_own_tables():
    """ONNX Runtime runs a conv whose input width is not a multiple of the quantum on another
    kernel: such input widths read the tables measured one below a multiple of the quantum."""
    entry = latency.LayerLatency(
        name="pw", cin=64, cout=32, tied=False, quantum=16, cins=[32, 64], steps=[16, 32],
        on=[[1.0, 2.0], [3.0, 4.0]], off=[[1.5, 2.5], [3.5, 4.5]],
        off_cins=[31, 63], off_in_on=[[10.0, 20.0], [30.0, 40.0]],
        off_in_off=[[15.0, 25.0], [35.0, 45.0]])
    assert entry.seconds(64, 32) == 4.0 and entry.seconds(48, 32) == 3.0  # aligned input
    assert entry.seconds(63, 32) == 40.0 and entry.seconds(47, 32) == 30.0  # interpolated
    assert entry.seconds(47, 31) == 35.0  # input and output off the quantum
    assert entry.seconds(12, 16) == 1.0  # below one quantum: the aligned tables
