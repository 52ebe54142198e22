"""keras-hub backbones through parameterize -> prune_to_budget -> strip_and_shrink.

Tiny random configurations built from the constructors (no presets, no downloads). Each
backbone is pruned to 60 % of its MACs with random importance, shrunk, and compared
with the pruned PSP model; the shrunk model is saved to .keras and loaded back. Backbones
built from composite layers (a layer whose `call` runs its own sublayers: MobileNetV3's
and EfficientNetV2's blocks, ViT's encoder, BERT's TransformerEncoder) are inlined
(`tf_psp.inline`): their sublayers' channels and attention heads are pruned like a flat
model's, and the shrunk model is one flat functional model. The slow
`test_print_the_readme_table` prints the README's keras-hub table (run it with `pytest -s`).

keras-hub is installed without its dependencies (see setup.py's `hub` extra).
"""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import compat
from tf_psp.functional import relative_error

from conftest import randomize_biases_and_batchnorm

keras_hub = pytest.importorskip(
    "keras_hub",
    reason="keras-hub is not installed: pip install -e '.[hub]' && "
    "pip install --no-deps keras-hub==0.32.0",
)
K = keras_hub.models
SHAPE = (32, 32, 3)


def _resnet_basic():
    return K.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2], block_type="basic_block",
        image_shape=SHAPE)


def _resnet_v2_bottleneck():
    return K.ResNetBackbone(
        input_conv_filters=[8], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 16],
        stackwise_num_blocks=[1, 1], stackwise_num_strides=[1, 2],
        block_type="bottleneck_block", use_pre_activation=True, image_shape=SHAPE)


def _vgg():
    return K.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16],
                         image_shape=SHAPE)


def _densenet():
    return K.DenseNetBackbone(stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=SHAPE)


def _cspnet_dark():
    return K.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=2, stackwise_depth=[1, 1],
        stackwise_strides=[1, 2], stackwise_num_filters=[16, 32], block_type="dark_block",
        stage_type="dark", image_shape=SHAPE)


def _cspnet(stage_type):
    return K.CSPNetBackbone(
        stem_filters=8, stem_kernel_size=3, stem_strides=2, stackwise_depth=[1, 1],
        stackwise_strides=[1, 2], stackwise_num_filters=[16, 32], block_type="bottleneck_block",
        stage_type=stage_type, bottle_ratio=[0.5, 0.5], block_ratio=[1.0, 1.0],
        expand_ratio=[2.0, 2.0], image_shape=SHAPE)


def _efficientnet_v1():
    return K.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4], stackwise_squeeze_and_excite_ratios=[0.25, 0.25],
        stackwise_strides=[1, 2], stackwise_block_types=["v1", "v1"],
        stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
        num_features=32, input_shape=SHAPE)


def _efficientnet_v2():
    return K.EfficientNetBackbone(
        stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2], stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
        num_features=32, input_shape=SHAPE)


def _mobilenet_v3():
    return K.MobileNetBackbone(
        stackwise_expansion=[[4], [6]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[16], [24]], stackwise_kernel_size=[[3], [5]],
        stackwise_num_strides=[[2], [1]], stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]], stackwise_padding=[[1], [2]],
        output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, last_layer_filter=32, image_shape=SHAPE)


def _vit():
    return K.ViTBackbone(image_shape=SHAPE, patch_size=8, num_layers=2, num_heads=4,
                         hidden_dim=32, mlp_dim=64)


def _bert():
    return K.BertBackbone(vocabulary_size=50, num_layers=2, num_heads=4, hidden_dim=32,
                          intermediate_dim=64, max_sequence_length=16)


def _distil_bert():
    return K.DistilBertBackbone(vocabulary_size=50, num_layers=2, num_heads=4, hidden_dim=32,
                                intermediate_dim=64, max_sequence_length=16)


def _roberta():
    return K.RobertaBackbone(vocabulary_size=50, num_layers=2, num_heads=4, hidden_dim=32,
                             intermediate_dim=64, max_sequence_length=16)


def _token_probe(model, seed=0):
    """Token ids (and segment ids) for 2 sequences of 16; the second padded after 10."""
    rng = np.random.default_rng(seed)
    mask = np.ones((2, 16), "int32")
    mask[1, 10:] = 0  # the attention mask matters
    x = {"token_ids": rng.integers(0, 50, (2, 16)).astype("int32"), "padding_mask": mask}
    if "segment_ids" in [t.name for t in model.inputs]:
        x["segment_ids"] = rng.integers(0, 2, (2, 16)).astype("int32")
    return x


def _randomize_deep(model, seed=0):
    """Random biases and BatchNorm statistics in every layer, composites' sublayers too."""
    rng = np.random.default_rng(seed)
    for layer in compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c),
                               rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])
        elif isinstance(getattr(layer, "bias", None), keras.Variable):
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))


# name -> builder, for the backbones that prune and shrink exactly (flat graphs of Keras
# layers).
FLAT = {
    "resnet_basic": _resnet_basic,
    "resnet_v2_bottleneck": _resnet_v2_bottleneck,
    "vgg": _vgg,
    "densenet": _densenet,
    "cspnet_dark": _cspnet_dark,
    "cspnet_csp": lambda: _cspnet("csp"),
    "cspnet_cs3": lambda: _cspnet("cs3"),
    "efficientnet_v1": _efficientnet_v1,
    "mobilenet_v3": _mobilenet_v3,  # composite blocks, inlined
    "efficientnet_v2": _efficientnet_v2,  # composite blocks, inlined
}
SLOW = {"resnet_basic", "resnet_v2_bottleneck", "cspnet_dark", "cspnet_csp", "cspnet_cs3"}


def _probe(model, seed=0):
    return np.random.default_rng(seed).normal(size=(2,) + SHAPE).astype("float32")


def _assert_saves_and_loads(model, x, tmp_path):
    path = str(tmp_path / "shrunk.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert relative_error(model(x), loaded(x)) <= 1e-6


@pytest.mark.parametrize("coupling", ["layer", "group"])
@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in FLAT])
def test_flat_backbone_prunes_to_budget_and_shrinks_exactly(name, coupling, tmp_path):
    model = FLAT[name]()
    _randomize_deep(model)
    psp = tf_psp.parameterize(model, coupling=coupling)
    dense = tf_psp.profile(psp).total_macs
    pruned = tf_psp.prune_to_budget(psp, 0.6, importance="random")
    shrunk = tf_psp.strip_and_shrink(pruned)
    x = _probe(model)
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    assert relative_error(model(x), psp(x)) <= 1e-5
    kept = tf_psp.profile(shrunk).total_macs / dense
    assert 0.5 <= kept <= 0.6 + 1e-9, kept
    _assert_saves_and_loads(shrunk, x, tmp_path)


def test_image_classifier_comes_back_flat_with_the_backbone_shrunk(tmp_path):
    """An ImageClassifier (a functional Task nesting the backbone) is inlined: tf_psp
    returns one flat functional model (backbone layers, pooler, predictions), shrunk."""
    classifier = K.ImageClassifier(backbone=_efficientnet_v1(), num_classes=3)
    randomize_biases_and_batchnorm(classifier.backbone)
    pruned = tf_psp.prune_to_budget(classifier, 0.6, importance="random")
    shrunk = tf_psp.strip_and_shrink(pruned)
    assert type(shrunk) is keras.Model or type(shrunk).__name__ == "Functional"
    assert not any(isinstance(layer, keras.Model) for layer in shrunk.layers)
    assert shrunk.get_layer("predictions").units == 3
    x = _probe(classifier)
    assert relative_error(classifier(x), shrunk(x)) > 0  # pruned: not the dense function
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    kept = tf_psp.profile(shrunk).total_macs / tf_psp.profile(classifier).total_macs
    assert 0.5 <= kept <= 0.6 + 1e-9
    _assert_saves_and_loads(shrunk, x, tmp_path)


# --- composite layers -------------------------------------------------------------------


# name -> (builder, probe, input_shape): the issue-19 goal models, pruned to half their MACs.
HALF = {
    "bert": (_bert, _token_probe, [(16,)] * 3),
    "vit": (_vit, _probe, None),
    "mobilenet_v3": (_mobilenet_v3, _probe, None),
    "efficientnet_v2": (_efficientnet_v2, _probe, None),
    "distil_bert": (_distil_bert, _token_probe, [(16,)] * 2),
    "roberta": (_roberta, _token_probe, [(16,)] * 2),
}


def _query_weights(model):
    return sum(int(np.prod(w.shape)) for w in model.weights if "query" in w.path)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("distil_bert", "roberta") else n for n in HALF])
def test_composite_backbone_prunes_to_half_its_macs_and_shrinks_exactly(name, tmp_path):
    """The composite blocks are inlined, so their channels, MLP units and heads go:
    >= 1.6x fewer MACs by profile (nothing uncounted), the shrunk model computes what the
    pruned model computes, the group PSP model what the original computes."""
    make, probe, shape = HALF[name]
    model = make()
    _randomize_deep(model)
    x = probe(model)
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance="random", input_shape=shape)
    shrunk = tf_psp.strip_and_shrink(pruned)
    dense_profile = tf_psp.profile(model, input_shape=shape)
    shrunk_profile = tf_psp.profile(shrunk, input_shape=shape)
    assert dense_profile.uncounted == [] and shrunk_profile.uncounted == []
    assert dense_profile.total_macs / shrunk_profile.total_macs >= 1.6
    assert relative_error(model(x), pruned(x)) > 1e-6  # pruned: not the dense function
    assert relative_error(pruned(x), shrunk(x)) <= 1e-5
    psp = tf_psp.parameterize(model, coupling="group", alpha_regularizer=None)
    assert relative_error(model(x), psp(x)) <= 1e-5
    blocks = {"TransformerEncoder", "ViTEncoder", "ViTEncoderBlock", "MLP",
              "InvertedResidualBlock", "SqueezeAndExcite2D", "MBConvBlock", "FusedMBConvBlock"}
    assert not blocks & {type(layer).__name__ for layer in shrunk.layers}
    if name not in ("mobilenet_v3", "efficientnet_v2"):
        assert _query_weights(shrunk) < _query_weights(model)
    _assert_saves_and_loads(shrunk, x, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["bert", "vit"])
def test_shrunk_transformer_backbone_exports_to_tflite(name, tmp_path):
    """The flat shrunk model (keras.ops nodes from the inlined blocks included) converts;
    export_tflite runs the written file and compares it with Keras on the probe."""
    from tf_psp import export

    make, probe, shape = HALF[name]
    model = make()
    _randomize_deep(model)
    x = probe(model)
    pruned = tf_psp.prune_to_budget(model, keep_macs=0.5, importance="random", input_shape=shape)
    result = export.export_tflite(tf_psp.strip_and_shrink(pruned),
                                  str(tmp_path / f"{name}.tflite"), probe=x)
    assert result.max_rel_error <= 1e-5, result


def test_vit_patch_embedding_is_kept_whole_with_the_reason():
    """ViTPatchingAndEmbedding reads its class token (a weight of its own) in its call, so
    it stays one layer (its output is the LayerNorm'd residual stream, kept anyway); the
    encoder blocks are inlined with names prefixed by their block."""
    model = _vit()
    plan = tf_psp.pruning_plan(model, importance="random")
    assert any("'vit_patching_and_embedding' (ViTPatchingAndEmbedding) is a composite layer"
               in reason and "class_token" in reason for reason in plan.frozen), plan.frozen
    spaces = {u.space for u in plan.units}
    assert "heads of 'vit_encoder_transformer_block_1_mha'" in spaces, spaces
    assert "output of 'vit_encoder_transformer_block_1_mlp_dense_1'" in spaces, spaces
    # per-layer alphas: keras-hub's get_config of the patch embedding returns keys its
    # constructor rejects (num_patches); tf_psp's copy leaves them out, also when saved
    psp = tf_psp.parameterize(model)
    x = _probe(model)
    assert relative_error(model(x), psp(x)) <= 1e-5
    assert "num_patches" not in psp.get_layer("vit_patching_and_embedding").get_config()


def test_mobilenet_random_alpha_mask_of_the_stem_shrinks_exactly_and_reports_the_reader(
        tmp_path):
    """Per-layer alphas reach into the inlined blocks. A random 50 % mask of the stem conv's
    filters leaves constant channels that block_0_0's 1x1 conv reads through zero padding
    and a depthwise conv (not constant at the borders): they are kept, and exact."""
    model = _mobilenet_v3()
    _randomize_deep(model)
    psp = tf_psp.parameterize(model, structure="filter")
    assert type(psp.get_layer("block_0_0_conv2")).__name__ == "PSPConv2D"
    stem = psp.get_layer("input_conv")
    alive = np.random.default_rng(0).permutation(stem.alpha.shape[0]) % 2 == 0
    stem.alpha.assign(alive.astype("float32"))
    shrunk, report = tf_psp.strip_and_shrink(psp, return_report=True)
    x = _probe(model)
    assert relative_error(psp(x), shrunk(x)) <= 1e-5
    assert relative_error(model(x), psp(x)) > 1e-6
    assert tf_psp.profile(shrunk).total_macs == tf_psp.profile(psp).total_macs
    assert any(row["layer"] == "block_0_0_conv2" and "output of 'input_conv'" in row["space"]
               for row in report.blocked), str(report)
    _assert_saves_and_loads(shrunk, x, tmp_path)


def test_profile_counts_a_keras_hub_block_as_the_sum_of_its_sublayers():
    model = _mobilenet_v3()
    rows = {row.name: row for row in tf_psp.profile(model).layers}
    block = rows["block_0_0"]  # DepthwiseConvBlock: 3x3 depthwise on 16 channels, 16 -> 8
    assert block.counted
    assert block.macs == 8 * 8 * (3 * 3 * 16 + 16 * 8)
    assert all(row.counted for row in rows.values())
    assert tf_psp.profile(model).uncounted == []


class _TwoConvs(keras.layers.Layer):
    """A composite layer: call runs conv_a twice, then conv_b and a Dense."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.conv_a = keras.layers.Conv2D(6, 3, padding="same")
        self.conv_b = keras.layers.Conv2D(4, 1)
        self.dense = keras.layers.Dense(4)

    def call(self, x):
        y = self.conv_b(keras.ops.relu(self.conv_a(x)) + self.conv_a(x))
        return y + self.dense(y)


def test_profile_counts_a_hand_written_composite_layer_per_sublayer_call():
    inputs = keras.Input((8, 8, 3))
    outputs = _TwoConvs(name="two")(inputs)
    model = keras.Model(inputs, outputs)
    row = {r.name: r for r in tf_psp.profile(model).layers}["two"]
    positions = 8 * 8
    conv_a, conv_b, dense = 3 * 3 * 3 * 6, 6 * 4, 4 * 4
    assert row.macs == positions * (2 * conv_a + conv_b + dense)  # conv_a runs twice
    assert row.counted


def test_a_wrapper_that_folds_time_into_the_batch_counts_every_step():
    inputs = keras.Input((7, 3))
    wrapped = keras.layers.TimeDistributed(keras.layers.Dense(5), name="td")
    model = keras.Model(inputs, wrapped(inputs))
    row = {r.name: r for r in tf_psp.profile(model).layers}["td"]
    assert row.counted and row.macs == 7 * 3 * 5


def test_a_composite_layer_that_cannot_run_is_listed_as_not_counted():
    class Fails(_TwoConvs):
        def call(self, x):
            if x.shape[0] == 1:  # the concrete run of profile, not the symbolic build
                raise RuntimeError("cannot run on a batch of one")
            return super().call(x)

    inputs = keras.Input((8, 8, 3))
    model = keras.Model(inputs, Fails(name="fails")(inputs))
    profile = tf_psp.profile(model)
    assert profile.uncounted == ["fails"]
    assert "fails" in str(profile)


class _ScaledConvs(_TwoConvs):
    """A composite layer that also reads a weight of its own in its call: kept whole."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")

    def call(self, x):
        return super().call(x) * self.scale


def test_a_composite_layer_kept_whole_keeps_the_channels_it_reads_and_says_why():
    inputs = keras.Input((8, 8, 3))
    x = keras.layers.Conv2D(6, 3, name="c1")(inputs)
    x = keras.layers.Conv2D(3, 1, name="c2")(x)
    outputs = _ScaledConvs(name="two")(x)
    psp = tf_psp.parameterize(keras.Model(inputs, outputs), structure="filter")
    psp.get_layer("c1").alpha.assign(np.array([1, 0, 1, 0, 1, 1], "float32"))
    psp.get_layer("c2").alpha.assign(np.array([1, 0, 1], "float32"))
    shrunk, report = tf_psp.strip_and_shrink(psp, return_report=True)
    widths = {row["name"]: row["channels_after"] for row in report.layers}
    assert widths["c1"] == 4 and widths["c2"] == 3
    text = str(report)
    assert "layer 'two' (_ScaledConvs) is a composite layer" in text
    assert "(Conv2D, Dense)" in text and "reads weights of its own (scale)" in text
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 3)).astype("float32")
    assert relative_error(psp(x), shrunk(x)) <= 1e-5


@pytest.mark.slow
def test_print_the_readme_table():
    """The README's keras-hub table: `pytest -s tests/test_keras_hub.py -k readme_table`."""
    lines = ["| backbone | dense MACs | kept MACs, layer | kept MACs, group | max rel. error |",
             "|---|---|---|---|---|"]
    for name, make in FLAT.items():
        model = make()
        _randomize_deep(model)
        x = _probe(model)
        kept, errors = [], []
        for coupling in ("layer", "group"):
            psp = tf_psp.parameterize(model, coupling=coupling)
            pruned = tf_psp.prune_to_budget(psp, 0.6, importance="random")
            shrunk = tf_psp.strip_and_shrink(pruned)
            kept.append(tf_psp.profile(shrunk).total_macs / tf_psp.profile(psp).total_macs)
            errors.append(relative_error(pruned(x), shrunk(x)))
        assert max(errors) <= 1e-5
        dense = tf_psp.profile(model).total_macs
        lines.append(f"| {name} | {dense:,} | {kept[0]:.3f} | {kept[1]:.3f} | "
                     f"{max(errors):.1e} |")
    lines += ["", "| backbone (keep_macs=0.5, plain model) | dense MACs | shrunk MACs | dense / "
              "shrunk | max rel. error | heads | params |", "|---|---|---|---|---|---|---|"]
    for name, (make, probe, shape) in HALF.items():
        model = make()
        _randomize_deep(model)
        x = probe(model)
        pruned = tf_psp.prune_to_budget(model, 0.5, importance="random", input_shape=shape)
        shrunk = tf_psp.strip_and_shrink(pruned)
        dense = tf_psp.profile(model, input_shape=shape).total_macs
        small = tf_psp.profile(shrunk, input_shape=shape).total_macs

        def heads(m):
            return sum(layer.num_heads for layer in compat.flatten_layers(m)
                       if isinstance(layer, keras.layers.MultiHeadAttention))

        lines.append(f"| {name} | {dense:,} | {small:,} | {dense / small:.2f}x | "
                     f"{relative_error(pruned(x), shrunk(x)):.1e} | {heads(model)} -> "
                     f"{heads(shrunk)} | {model.count_params():,} -> {shrunk.count_params():,} |")
    print("\n".join(lines))
