"""prune_to_budget and the pruning plan: budget precision, exactness, baselines' selections.

Oracles: the MACs of the shrunk model counted by `tf_psp.profile` (not by the
plan), the shrunk model's outputs against the pruned PSP model's, and numpy
argsorts of the scores each baseline is defined by.
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import plan as psp_plan

L = keras.layers


def _residual():
    i = keras.Input((12, 12, 3))
    x = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="stem")(i)))
    y = L.ReLU()(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="b1")(x)))
    y = L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="b2")(y))
    x = L.ReLU()(L.Add()([x, y]))
    x = L.Conv2D(24, 3, strides=2, padding="same", name="c3")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    return keras.Model(i, L.Dense(5, name="head")(x), name="residual")


def _concat():
    i = keras.Input((10, 10, 2))
    a = L.Conv2D(24, 3, padding="same", activation="relu", name="a")(i)
    b = L.Conv2D(16, 1, activation="relu", name="b")(i)
    x = L.Concatenate()([a, b])
    x = L.Conv2D(32, 3, padding="same", activation="relu", name="c")(x)
    return keras.Model(i, L.Dense(3, name="head")(L.Flatten()(L.MaxPooling2D(2)(x))),
                       name="concat")


def _depthwise():
    i = keras.Input((12, 12, 3))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.Conv2D(16, 3, padding="same", name="expand")(i)))
    x = L.ReLU(6.0)(L.BatchNormalization()(L.DepthwiseConv2D(3, padding="same", name="dw")(x)))
    x = L.BatchNormalization()(L.Conv2D(12, 1, name="project")(x))
    x = L.SeparableConv2D(16, 3, padding="same", activation="relu", name="sep")(x)
    return keras.Model(i, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(x)),
                       name="depthwise")


def _se():
    i = keras.Input((10, 10, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(i)
    s = L.GlobalAveragePooling2D()(x)
    s = L.Dense(8, activation="relu", name="se_reduce")(s)
    s = L.Dense(16, activation="sigmoid", name="se_expand")(s)
    x = L.Multiply()([x, L.Reshape((1, 1, 16))(s)])
    x = L.Conv2D(16, 1, activation="relu", name="c2")(x)
    return keras.Model(i, L.Dense(4, name="head")(L.GlobalAveragePooling2D()(x)), name="se")


GRAPHS = {"residual": _residual, "concat": _concat, "depthwise": _depthwise, "se": _se}


def _randomize(model, seed=0):
    """Random weights, BatchNorm statistics and alphas (so rankings are not ties)."""
    rng = np.random.default_rng(seed)
    for layer in model._flatten_layers(include_self=False):
        weights = layer.get_weights()
        if not weights:
            continue
        if isinstance(layer, L.BatchNormalization):
            n = weights[0].shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n),
                               rng.normal(0, 0.1, n), rng.uniform(0.5, 1.5, n)])
            continue
        new = []
        for w, v in zip(weights, layer.weights):
            if "alpha" in v.path:
                new.append(rng.uniform(0.2, 1.5, w.shape).astype(w.dtype))
            else:
                new.append(rng.normal(0, 0.3, w.shape).astype(w.dtype))
        layer.set_weights(new)
    return model


def _outputs(model, x):
    return np.asarray(keras.ops.convert_to_numpy(model(x, training=False)))


def _check_budget(psp, keep, round_to=1, importance="alpha", tolerance=0.03):
    before = [w.copy() for w in psp.get_weights()]
    pruned, report = tf_psp.prune_to_budget(psp, keep_macs=keep, round_to=round_to,
                                            importance=importance, return_report=True)
    for a, b in zip(before, psp.get_weights()):
        np.testing.assert_array_equal(a, b)  # input untouched
    small = tf_psp.strip_and_shrink(pruned, round_to=round_to)
    dense = tf_psp.profile(psp).total_macs
    kept = tf_psp.profile(small).total_macs / dense
    assert keep - tolerance <= kept <= keep + 1e-9, (keep, kept)
    assert report.kept_macs == pytest.approx(kept, abs=1e-9)  # the plan predicts the shrink
    x = np.random.default_rng(1).normal(size=(3,) + tuple(psp.input_shape[1:])).astype("float32")
    ref, out = _outputs(pruned, x), _outputs(small, x)
    assert np.max(np.abs(ref - out)) <= 1e-4 * max(np.max(np.abs(ref)), 1e-6)
    return kept


@pytest.mark.parametrize("graph", sorted(GRAPHS))
@pytest.mark.parametrize("coupling,structure", [("group", "channel"), ("layer", "channel"),
                                                ("layer", "column")])
def test_budget_precision_and_exactness(graph, coupling, structure):
    model = GRAPHS[graph]()
    psp = _randomize(tf_psp.parameterize(model, coupling=coupling, structure=structure,
                                         alpha_regularizer=None))
    for keep in (0.7, 0.5):
        _check_budget(psp, keep)


@pytest.mark.parametrize("graph", ["residual", "depthwise"])
def test_budget_with_round_to(graph):
    psp = _randomize(tf_psp.parameterize(GRAPHS[graph](), coupling="group",
                                         alpha_regularizer=None))
    # a 4-channel step of a 16-channel residual stream is ~20 % of the MACs: the
    # budget is an upper bound, precision is one rounded step
    kept = _check_budget(psp, 0.6, round_to=4, tolerance=0.25)
    small = tf_psp.strip_and_shrink(tf_psp.prune_to_budget(psp, 0.6, round_to=4), round_to=4)
    for layer in small.layers:
        if isinstance(layer, L.Conv2D) and layer.name != "head":
            assert layer.filters % 4 == 0 or layer.filters == GRAPHS[graph]().get_layer(
                layer.name).filters, (layer.name, layer.filters, kept)


def test_plain_model_is_parameterized_and_budget_met():
    model = _randomize(_residual())
    pruned, report = tf_psp.prune_to_budget(model, 0.5, importance="l1", return_report=True,
                                            measure=True)
    assert report.parameterized and report.measured
    assert 0.47 <= report.kept_macs <= 0.5
    assert any(tf_psp.coupling.is_group_alphas(layer) for layer in pruned.layers)


def test_filter_structure_on_pointwise_readers():
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(16, 3, padding="same", activation="relu", name="c1")(i)
    x = L.Conv2D(16, 1, activation="relu", name="c2")(x)
    x = L.Conv2D(8, 1, name="c3")(x)
    model = keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)))
    psp = _randomize(tf_psp.parameterize(model, structure="filter", alpha_regularizer=None))
    _check_budget(psp, 0.5)


def test_plan_predicts_shrink_for_random_selections():
    psp = _randomize(tf_psp.parameterize(_depthwise(), coupling="group", alpha_regularizer=None))
    plan = tf_psp.pruning_plan(psp)
    rng = np.random.default_rng(3)
    for _ in range(3):
        units = sorted(rng.choice(len(plan.units), size=len(plan.units) // 3, replace=False))
        small = tf_psp.strip_and_shrink(plan.apply(units))
        assert plan.kept_macs(units) == tf_psp.profile(small).total_macs


def test_unreachable_budget_says_why():
    psp = tf_psp.parameterize(_se(), coupling="group", alpha_regularizer=None)
    with pytest.raises(ValueError, match="cannot prune to keep_macs=0.01.*min_keep"):
        tf_psp.prune_to_budget(psp, 0.01)


@pytest.mark.parametrize("bad", [0, 1.5, -0.1, "half", True])
def test_bad_keep_macs(bad):
    with pytest.raises(ValueError, match="keep_macs"):
        tf_psp.prune_to_budget(_se(), bad)


def test_keep_macs_defaults_to_half_and_excludes_keep_latency():
    _, report = tf_psp.prune_to_budget(_se(), return_report=True)
    assert report.keep_macs == 0.5 and 0.47 <= report.kept_macs <= 0.5
    with pytest.raises(ValueError, match="not both"):
        tf_psp.prune_to_budget(_se(), keep_macs=0.5, keep_latency=0.5)


def test_bad_importance_and_round_to():
    with pytest.raises(ValueError, match="importance"):
        tf_psp.prune_to_budget(_se(), 0.5, importance="gradient")
    with pytest.raises(ValueError, match="round_to"):
        tf_psp.prune_to_budget(_se(), 0.5, round_to=0)


# --- the baselines remove what their definitions say ---------------------------


def _chain():
    """Producers whose filters are independent groups (no coupling)."""
    i = keras.Input((8, 8, 3))
    x = L.Conv2D(10, 3, padding="same", activation="relu", name="c1")(i)
    x = L.Conv2D(12, 3, padding="same", name="c2")(x)
    x = L.ReLU()(L.BatchNormalization(name="bn2")(x))
    x = L.Conv2D(8, 3, padding="same", activation="relu", name="c3")(x)
    return keras.Model(i, L.Dense(3, name="head")(L.GlobalAveragePooling2D()(x)), name="chain")


def _selected_channels(plan, units):
    out = {}
    for i in units:
        for name, c in plan.units[i].writes:
            out.setdefault(name, set()).add(c)
    return out


def test_l1_norm_selects_numpy_argsort_lowest():
    model = _randomize(_chain())
    plan = tf_psp.pruning_plan(tf_psp.parameterize(model, coupling="group",
                                                   alpha_regularizer=None), importance="l1")
    scores = []
    for name in ("c1", "c2", "c3"):
        kernel = model.get_layer(name).kernel.numpy()
        l1 = np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)
        scores += [(v / l1.mean(), name, c) for c, v in enumerate(l1)]
    n = 6
    expected = {}
    for _, name, c in sorted(scores)[:n]:
        expected.setdefault(name, set()).add(c)
    order = plan.order(min_keep=0.0)[:n]
    assert _selected_channels(plan, order) == expected


def test_bn_importance_selects_lowest_gamma_only_behind_batchnorm():
    model = _randomize(_chain())
    plan = tf_psp.pruning_plan(tf_psp.parameterize(model, coupling="group",
                                                   alpha_regularizer=None), importance="bn")
    gamma = model.get_layer("bn2").gamma.numpy()
    order = plan.order(min_keep=0.0)
    assert _selected_channels(plan, order) == {"c2": set(range(12)) - {int(np.argmax(gamma))}}
    first = _selected_channels(plan, order[:4])["c2"]
    assert first == set(np.argsort(gamma, kind="stable")[:4].tolist())


def test_random_importance_depends_on_seed_only():
    psp = tf_psp.parameterize(_randomize(_chain()), coupling="group", alpha_regularizer=None)
    a = tf_psp.pruning_plan(psp, importance="random", seed=1).select(0.5)
    b = tf_psp.pruning_plan(psp, importance="random", seed=1).select(0.5)
    c = tf_psp.pruning_plan(psp, importance="random", seed=2).select(0.5)
    assert a == b and a != c


def test_callable_importance():
    psp = tf_psp.parameterize(_randomize(_chain()), coupling="group", alpha_regularizer=None)
    # prefer removing c3's input channels (written by c2): c2's filters go first
    plan = tf_psp.pruning_plan(psp, importance=lambda u, m: 0.0 if u.space == "output of 'c2'"
                               else 1.0)
    first = plan.order(min_keep=0.5)[:3]
    assert all(plan.units[i].space == "output of 'c2'" for i in first)


def test_alpha_importance_is_invariant_to_the_alpha_kernel_split():
    model = _randomize(_chain())
    psp = _randomize(tf_psp.parameterize(model, structure="channel", alpha_regularizer=None), 4)
    plan = tf_psp.pruning_plan(psp)
    # rescale c2's alphas by 3 and its kernel by 1/3: same function, same scores
    twin = psp_plan.clone_with_weights(psp)
    layer = twin.get_layer("c2")
    layer.alpha.assign(layer.alpha.numpy() * 3.0)
    layer.kernel.assign(layer.kernel.numpy() / 3.0)
    again = tf_psp.pruning_plan(twin)
    np.testing.assert_allclose([u.score for u in plan.units], [u.score for u in again.units],
                               rtol=1e-5)
