"""parameterize(coupling='group'): one alpha per channel group, shared by its readers.

Oracles: the plain model (alpha = 1), per-layer PSP alphas (gradients add up
over the readers of a channel), hand-computed MACs, and strip_and_shrink's
widths against the count of dead group alphas.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import coupling
from tf_psp.functional import relative_error
from tf_psp.profiling import profile, removability

from conftest import assert_weights_unchanged, randomize_biases_and_batchnorm, weights_snapshot

L = keras.layers


def residual_model(width=8, inner=6, blocks=2):
    """stem -> `blocks` residual blocks on one stream -> GAP -> Dense."""
    x = inp = keras.Input((8, 8, 3))
    x = L.Conv2D(width, 3, padding="same", name="stem")(x)
    x = L.BatchNormalization(name="stem_bn")(x)
    x = L.ReLU(name="stem_relu")(x)
    for b in range(blocks):
        y = L.Conv2D(inner, 3, padding="same", name=f"b{b}_c1")(x)
        y = L.BatchNormalization(name=f"b{b}_bn1")(y)
        y = L.ReLU(name=f"b{b}_relu1")(y)
        y = L.Conv2D(width, 3, padding="same", name=f"b{b}_c2")(y)
        y = L.BatchNormalization(name=f"b{b}_bn2")(y)
        x = L.ReLU(name=f"b{b}_out")(L.Add(name=f"b{b}_add")([x, y]))
    x = L.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inp, L.Dense(5, name="fc")(x))
    randomize_biases_and_batchnorm(model)
    return model


def _np(x):
    return keras.ops.convert_to_numpy(x)


def _x(shape=(4, 8, 8, 3), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _gate(model):
    return next(layer for layer in model.layers if isinstance(layer, tf_psp.PSPGroupAlphas))


def _relative(a, b):
    return relative_error(b, a)


def _random_masks(gate, seed=0, dead=0.5):
    rng = np.random.default_rng(seed)
    for variable in gate.group_alphas:
        values = rng.uniform(0.5, 1.5, variable.shape)
        values[rng.random(variable.shape) < dead] = 0.0
        variable.assign(values)


def test_one_variable_per_group_and_equal_outputs_at_init():
    model = residual_model()
    before = weights_snapshot(model)
    psp, report = tf_psp.parameterize(model, coupling="group", return_report=True)
    assert_weights_unchanged(before, model)
    gate = _gate(psp)
    # The stream (stem + both c2 outputs, tied by Add) and each block's inner space.
    assert gate.group_names == ["stem", "b0_c1", "b1_c1"]
    assert gate.group_sizes == [8, 6, 6]
    assert len(gate.trainable_variables) == 3
    # Readers: every conv/dense reading a prunable channel; the stem reads the model input.
    assert report.converted == ["b0_c1", "b0_c2", "b1_c1", "b1_c2", "fc"]
    assert [name for name, _, _ in report.skipped] == ["stem"]
    assert not any(tf_psp.is_psp_layer(layer) for layer in psp.layers)
    x = _x()
    np.testing.assert_allclose(_np(psp(x)), _np(model(x)), rtol=1e-6, atol=1e-6)


def test_group_gradient_is_the_sum_over_its_readers():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("uses tf.GradientTape")
    import tensorflow as tf

    model = residual_model()
    group = tf_psp.parameterize(model, coupling="group")
    per_layer = tf_psp.parameterize(model, structure="channel")
    x, y = _x(), np.arange(4) % 5
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with tf.GradientTape() as tape:
        g_loss = loss(y, group(x, training=False))
    gate = _gate(group)
    g_grads = [g.numpy() for g in tape.gradient(g_loss, gate.group_alphas)]
    layers = [layer for layer in per_layer.layers if tf_psp.is_psp_layer(layer)]
    with tf.GradientTape() as tape:
        l_loss = loss(y, per_layer(x, training=False))
    grads = tape.gradient(l_loss, [layer.alpha for layer in layers])
    l_grads = {layer.name: g.numpy() for layer, g in zip(layers, grads)}
    # The stream's readers are b0_c1, b1_c1 and fc; b0_c2 and b1_c2 read the inner spaces.
    stream = l_grads["b0_c1"] + l_grads["b1_c1"] + l_grads["fc"]
    np.testing.assert_allclose(g_grads[0], stream, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_grads[1], l_grads["b0_c2"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(g_grads[2], l_grads["b1_c2"], rtol=1e-4, atol=1e-6)
    assert np.all(g_grads[0] != 0)


def test_a_group_alpha_scales_its_channel_in_every_reader():
    model = residual_model()
    psp = tf_psp.parameterize(model, coupling="group")
    gate = _gate(psp)
    stream = gate.group_alphas[0]
    values = np.ones(8, "float32")
    values[3], values[5] = 0.5, 0.0  # 0 is below epsilon: pruned
    stream.assign(values)
    plain = tf_psp.strip(psp)
    assert not any(isinstance(layer, tf_psp.PSPGroupAlphas) for layer in plain.layers)
    expected_scale = np.where(values >= 1e-2, values, 0.0)
    for name in ("b0_c1", "b1_c1", "fc"):  # every reader of the stream
        kernel = _np(plain.get_layer(name).kernel)
        original = _np(model.get_layer(name).kernel)
        np.testing.assert_allclose(kernel, original * expected_scale.reshape(-1, 1), rtol=1e-6)
    for name in ("stem", "b0_c2", "b1_c2"):  # writers are not scaled
        np.testing.assert_array_equal(_np(plain.get_layer(name).kernel),
                                      _np(model.get_layer(name).kernel))
    x = _x()
    np.testing.assert_allclose(_np(plain(x)), _np(psp(x)), rtol=1e-5, atol=1e-5)


def test_pruning_a_group_alpha_removes_the_channel_everywhere():
    model = residual_model()
    psp = tf_psp.parameterize(model, coupling="group")
    gate = _gate(psp)
    gate.group_alphas[0].assign(np.array([1, 1, 0, 1, 1, 0, 1, 1], "float32"))
    shrunk = tf_psp.strip_and_shrink(psp)
    widths = {layer.name: layer.kernel.shape[-1]
              for layer in shrunk.layers if hasattr(layer, "kernel")}
    # Every writer of the stream loses filters 2 and 5, every reader the rows.
    assert widths["stem"] == widths["b0_c2"] == widths["b1_c2"] == 6
    assert shrunk.get_layer("b0_c1").kernel.shape[-2] == 6
    assert shrunk.get_layer("fc").kernel.shape[0] == 6
    assert shrunk.get_layer("stem_bn").gamma.shape[0] == 6
    x = _x()
    ref = _np(psp(x))
    assert _relative(_np(shrunk(x)), ref) <= 1e-5


@pytest.mark.parametrize("seed", [0, 1])
def test_random_group_masks_on_resnet_are_exact_and_fully_removable(seed):
    model = residual_model(blocks=3)
    psp = tf_psp.parameterize(model, coupling="group")
    gate = _gate(psp)
    _random_masks(gate, seed)
    before = weights_snapshot(psp)
    shrunk = tf_psp.strip_and_shrink(psp)
    assert_weights_unchanged(before, psp)
    x = _x(seed=seed)
    assert _relative(_np(shrunk(x)), _np(psp(x))) <= 1e-5
    mask = gate.structure_mask()
    sizes = np.cumsum([0] + gate.group_sizes)
    alive = [int(mask[a:b].sum()) for a, b in zip(sizes[:-1], sizes[1:])]
    assert shrunk.get_layer("stem").kernel.shape[-1] == alive[0]
    for b in range(3):
        assert shrunk.get_layer(f"b{b}_c1").kernel.shape[-1] == alive[1 + b]
    r = removability(psp)
    assert r.kept_zero_macs == 0 and r.removable_share == 1.0
    assert r.removable_macs >= r.zeroed_macs > 0


def test_mobilenetv2_random_group_masks_are_exact_and_fully_removable():
    model = keras.applications.MobileNetV2(
        input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=7
    )
    randomize_biases_and_batchnorm(model, seed=3)
    psp = tf_psp.parameterize(model, coupling="group")
    gate = _gate(psp)
    _random_masks(gate, seed=4, dead=0.4)
    shrunk = tf_psp.strip_and_shrink(psp)
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    assert _relative(_np(shrunk(x)), _np(psp(x))) <= 1e-5
    r = removability(psp)
    assert r.kept_zero_macs == 0
    assert r.mac_reduction > 1.5
    assert not any(type(layer).__module__.startswith("tf_psp") for layer in shrunk.layers)


def test_per_layer_alphas_leave_zeros_that_group_alphas_remove():
    model = residual_model()
    per_layer = tf_psp.parameterize(model, structure="channel")
    # Only one of the three readers of stream channel 0 prunes it.
    alpha = np.ones(8, "float32")
    alpha[0] = 0.0
    per_layer.get_layer("b0_c1").alpha.assign(alpha)
    r = removability(per_layer)
    assert r.removable_macs == 0
    expected = 3 * 3 * 1 * 6 * 64  # b0_c1's zeroed input row, at 8x8 positions
    assert r.zeroed_macs == r.kept_zero_macs == expected
    assert r.removable_share == 0.0


def test_cost_weights_equal_hand_computed_macs():
    inp = keras.Input((6, 6, 2))
    x = L.Conv2D(4, 3, padding="valid", name="c1")(inp)  # 4x4 out: 16*9*2*4 = 1152 MACs
    x = L.ReLU()(x)
    x = L.DepthwiseConv2D(3, padding="same", name="dw")(x)  # 16*9*4 = 576 MACs
    x = L.Conv2D(3, 1, name="c2")(x)  # 16*4*3 = 192 MACs
    x = L.Flatten()(x)
    out = L.Dense(2, name="fc")(x)  # 48*2 = 96 MACs
    model = keras.Model(inp, out)
    plan = coupling.plan_groups(model)
    assert plan.group_names == ["c1", "c2"]
    # c1's channel: written by c1 (1152/4), read by dw (576/4) and c2 (192/4).
    # c2's channel: written by c2 (192/3), read at 16 positions by fc (96/48 each).
    np.testing.assert_allclose(plan.costs[0], [288 + 144 + 48] * 4)
    np.testing.assert_allclose(plan.costs[1], [64 + 32] * 3)
    weights = np.concatenate(plan.cost_weights())
    np.testing.assert_allclose(weights.mean(), 1.0)
    psp = tf_psp.parameterize(
        model, coupling="group", cost="macs", alpha_regularizer=tf_psp.regularizers.WeightDecay(0.1)
    )
    _gate(psp).group_alphas[0].assign(np.full(4, 2.0, "float32"))
    mean = (4 * 480 + 3 * 96) / 7
    expected = 0.5 * 0.1 * (4 * 480 / mean * 4.0 + 3 * 96 / mean * 1.0)
    np.testing.assert_allclose(float(sum(psp.losses)), expected, rtol=1e-5)


def test_cost_aware_decay_for_per_layer_alphas():
    model = residual_model()
    psp = tf_psp.parameterize(
        model, structure="channel", cost="macs",
        alpha_regularizer=tf_psp.regularizers.WeightDecay(1.0),
    )
    macs = {row.name: row.macs for row in profile(model).layers}
    per = {name: macs[name] / n for name, n in
           [("stem", 3), ("b0_c1", 8), ("b0_c2", 6), ("b1_c1", 8), ("b1_c2", 6), ("fc", 8)]}
    counts = {"stem": 3, "b0_c1": 8, "b0_c2": 6, "b1_c1": 8, "b1_c2": 6, "fc": 8}
    mean = sum(per[k] * counts[k] for k in per) / sum(counts.values())
    for name in per:
        weights = psp.get_layer(name).alpha_regularizer.weights
        np.testing.assert_allclose(weights, [per[name] / mean] * counts[name], rtol=1e-6)


def test_group_model_saves_and_loads(tmp_path):
    model = residual_model()
    psp = tf_psp.parameterize(model, coupling="group", cost="macs")
    _random_masks(_gate(psp), seed=5, dead=0.3)
    path = str(tmp_path / "group.keras")
    psp.save(path)
    loaded = keras.models.load_model(path)
    gate = _gate(loaded)
    np.testing.assert_array_equal(gate.alphas(), _gate(psp).alphas())
    assert gate.costs == _gate(psp).costs
    x = _x()
    np.testing.assert_allclose(_np(loaded(x)), _np(psp(x)), rtol=1e-6, atol=1e-6)
    # The loaded gate is still one layer shared by all readers.
    assert len(gate._inbound_nodes) == 5


def test_group_alphas_train_and_decay():
    model = residual_model()
    psp = tf_psp.parameterize(
        model, coupling="group", alpha_regularizer=tf_psp.regularizers.WeightDecay(0.5)
    )
    psp.compile(optimizer=keras.optimizers.SGD(0.1),
                loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = _x((32, 8, 8, 3))
    y = np.arange(32) % 5
    start = _gate(psp).alphas()
    psp.fit(x, y, epochs=3, batch_size=16, verbose=0)
    end = _gate(psp).alphas()
    assert np.all(np.isfinite(end))
    assert np.linalg.norm(end) < np.linalg.norm(start)  # decay shrinks the alphas


def test_profile_and_monitor_report_group_sparsity():
    model = residual_model()
    psp = tf_psp.parameterize(model, coupling="group")
    gate = _gate(psp)
    gate.group_alphas[1].assign(np.array([0, 1, 1, 1, 1, 1], "float32"))
    p = profile(psp, removable=True)
    row = next(r for r in p.layers if r.class_name == "PSPGroupAlphas")
    assert (row.structures_total, row.structures_alive) == (20, 19)
    # b0_c2 reads 6 channels of block 0's inner space; one is zero.
    assert row.pruned_macs == round(3 * 3 * 6 * 8 * 64 / 6)
    # Removing it also removes b0_c1's filter: both MACs shares go.
    assert p.removability.removable_macs == 3 * 3 * 8 * 64 * 2
    assert p.removability.removable_share == 1.0
    monitor = tf_psp.PSPMonitor(removable=True)
    monitor.set_model(psp)
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs["psp_sparsity"] == pytest.approx(1 / 20)
    assert logs["psp_removable_share"] == 1.0
    assert logs["psp_removable_mac_reduction"] == pytest.approx(
        p.total_macs / (p.total_macs - 3 * 3 * 8 * 64 * 2)
    )


def test_round_to_readmits_group_channels_by_alpha():
    model = residual_model()
    psp = tf_psp.parameterize(model, coupling="group")
    gate = _gate(psp)
    gate.group_alphas[0].assign(np.array([1, 1, 1, 1, 1, 0.005, 0.001, 0], "float32"))
    shrunk = tf_psp.strip_and_shrink(psp, round_to=4)
    assert shrunk.get_layer("stem").kernel.shape[-1] == 8
    x = _x()
    assert _relative(_np(shrunk(x)), _np(psp(x))) <= 1e-5


@pytest.mark.parametrize(
    "kwargs, error, text",
    [
        ({"coupling": "channel"}, ValueError, "coupling must be one of"),
        ({"coupling": "group", "structure": "filter"}, ValueError, "structure='channel'"),
        ({"coupling": "group", "layers": ["fc"]}, ValueError, "layers=None"),
        ({"coupling": "group", "cost": "flops"}, ValueError, "cost must be"),
        ({"coupling": "group", "alpha_regularizer": keras.regularizers.L2(1e-3), "cost": "macs"},
         ValueError, "WeightDecay or L1"),
    ],
)
def test_bad_group_arguments(kwargs, error, text):
    with pytest.raises(error, match=text):
        tf_psp.parameterize(residual_model(), **kwargs)


def test_group_coupling_refuses_psp_models_and_all_frozen_models():
    psp = tf_psp.parameterize(residual_model())
    with pytest.raises(ValueError, match="call tf_psp.strip"):
        tf_psp.parameterize(psp, coupling="group")
    inp = keras.Input((4,))
    frozen = keras.Model(inp, L.Dense(3, name="only")(inp))  # reads the input, writes the output
    with pytest.raises(ValueError, match="no channel that PSP can prune"):
        tf_psp.parameterize(frozen, coupling="group")


@pytest.mark.parametrize("index", [[3, 4, 5, 6], [6, 5, -1, 0, 8, 2], [-1, -1], [7, 8, 0, 1, 2]])
def test_group_alphas_call_scales_by_a_numpy_table(index):
    # groups of 3, 4 and 2 alphas; an index reads whole groups, pieces, several, or none (-1)
    from tf_psp.group_alphas import PSPGroupAlphas

    gate = PSPGroupAlphas([3, 4, 2], epsilon=0.05, alpha_regularizer=None)
    gate.build()
    alphas = np.array([0.5, 0.01, 2.0, 1.5, -0.03, 0.7, 3.0, 0.2, -1.1], "float32")
    for variable, part in zip(gate.group_alphas, np.split(alphas, [3, 7])):
        variable.assign(part)
    table = np.append(np.where(np.abs(alphas) >= 0.05, alphas, 0.0), 1.0)
    x = np.random.default_rng(0).normal(size=(2, 5, len(index))).astype("float32")
    out = keras.ops.convert_to_numpy(gate(x, index=np.array(index)))
    np.testing.assert_allclose(out, x * table[np.array(index)], rtol=1e-6)
