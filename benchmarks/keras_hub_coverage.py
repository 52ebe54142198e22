"""Every keras-hub backbone class through prune_to_budget(keep_macs=0.5) + strip_and_shrink.

    nice .venv/bin/python benchmarks/keras_hub_coverage.py [--classes=BertBackbone,...] [--rerun]

Enumerates the concrete `keras_hub.models.*Backbone` classes and builds each from the
small random configuration in `CONFIGS` (no presets, no downloads; `NOT_BUILT` says why a
class has none). Each class runs in its own subprocess with a time limit (--timeout), so
one class cannot hang or crash the sweep. In it: `tf_psp.prune_to_budget(model,
keep_macs=0.5, importance="random", input_shape=...)` (None dimensions, the sequence
length, are set to --seq_len) on the model rebuilt at that input shape by
`tf_psp.inline.inline_nested(model, input_shape=...)` (a flat functional model; a
decoder block that builds its causal mask from the sequence length can only be opened
at a fixed length), then `strip_and_shrink`; dense and shrunk MACs are counted
by `tf_psp.profile` (layers it cannot count are listed), and the max relative error of the
shrunk against the pruned model is measured on random inputs (token ids for text models,
padding masks all ones but the second sample's tail). Where keep 0.5 is refused because
too little can go, the model is pruned as far as the plan allows and the refusal is
recorded. Results are cached per class in --output (JSON; --rerun re-measures) and the
table is written next to it as markdown.
"""

import datetime
import json
import os
import platform
import subprocess
import sys
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("classes", [], "Backbone classes to measure (default: every class).")
flags.DEFINE_bool("rerun", False, "Measure classes that already have a cached result.")
flags.DEFINE_integer("timeout", 600, "Seconds one class may take.")
flags.DEFINE_integer("seq_len", 16, "Length given to None (sequence) dimensions.")
flags.DEFINE_float("keep_macs", 0.5, "keep_macs of prune_to_budget.")
flags.DEFINE_float("goal", 0.55, "A class counts as pruned when shrunk/dense MACs <= this.")
flags.DEFINE_float("tolerance", 1e-4, "... and the max relative error is <= this.")
flags.DEFINE_string("output", "benchmarks/results/keras_hub_coverage.json", "JSON cache.")
flags.DEFINE_string("worker", None, "Internal: measure this one class and print JSON.")

VOCAB = 50
IMAGE = (32, 32, 3)

# class -> keyword arguments of a small random model; every value is given explicitly
# where the class has no default. Sub-model arguments are built by `_build`.
CONFIGS = {
    "AlbertBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, embedding_dim=16,
                           hidden_dim=32, intermediate_dim=64, num_groups=1,
                           num_inner_repetitions=1, max_sequence_length=16),
    "BartBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                         intermediate_dim=64, max_sequence_length=16),
    "BertBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                         intermediate_dim=64, max_sequence_length=16),
    "BloomBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                          intermediate_dim=64),
    "CSPNetBackbone": dict(stem_filters=8, stem_kernel_size=3, stem_strides=2,
                           stackwise_depth=[1, 1], stackwise_strides=[1, 2],
                           stackwise_num_filters=[16, 32], block_type="bottleneck_block",
                           stage_type="csp", bottle_ratio=[0.5, 0.5], block_ratio=[1.0, 1.0],
                           expand_ratio=[2.0, 2.0], image_shape=IMAGE),
    "DebertaV3Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                              intermediate_dim=64, max_sequence_length=16, bucket_size=8),
    "DeiTBackbone": dict(image_shape=IMAGE, patch_size=8, num_layers=2, num_heads=4,
                         hidden_dim=32, intermediate_dim=64),
    "DenseNetBackbone": dict(stackwise_num_repeats=[1, 1], growth_rate=8, image_shape=IMAGE),
    "DINOV2Backbone": dict(patch_size=8, num_layers=2, hidden_dim=32, num_heads=4,
                           intermediate_dim=64, image_shape=IMAGE,
                           position_embedding_shape=(32, 32)),
    "DINOV3Backbone": dict(patch_size=8, num_layers=2, hidden_dim=32, num_heads=4,
                           intermediate_dim=64, image_shape=IMAGE),
    "DistilBertBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                               intermediate_dim=64, max_sequence_length=16),
    "EdRecBackbone": dict(vocab_size=VOCAB, num_layers_enc=1, num_layers_dec=1, hidden_dim=32,
                          intermediate_dim=64, num_heads=4),
    "EfficientNetBackbone": dict(
        stackwise_width_coefficients=[1.0, 1.0], stackwise_depth_coefficients=[1.0, 1.0],
        stackwise_kernel_sizes=[3, 3], stackwise_num_repeats=[1, 1],
        stackwise_input_filters=[8, 8], stackwise_output_filters=[8, 16],
        stackwise_expansion_ratios=[1, 4], stackwise_squeeze_and_excite_ratios=[0.0, 0.25],
        stackwise_strides=[1, 2], stackwise_block_types=["fused", "unfused"],
        stackwise_force_input_filters=[0, 0], stackwise_nores_option=[False, False],
        num_features=32, input_shape=IMAGE),
    "ElectraBackbone": dict(vocab_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                            embedding_dim=16, intermediate_dim=64, max_sequence_length=16),
    "ESMBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                        intermediate_dim=64, max_sequence_length=16),
    "ESM2Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                         intermediate_dim=64, max_sequence_length=16),
    "FalconBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_attention_heads=4,
                           hidden_dim=32, intermediate_dim=64),
    "FNetBackbone": dict(vocabulary_size=VOCAB, num_layers=2, hidden_dim=32, intermediate_dim=64,
                         max_sequence_length=16),
    "GemmaBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                          num_key_value_heads=2, hidden_dim=32, intermediate_dim=128,
                          head_dim=8),
    "Gemma3Backbone": dict(vocabulary_size=VOCAB, image_size=16, num_layers=2,
                           num_query_heads=4, num_key_value_heads=2, hidden_dim=32,
                           intermediate_dim=64, head_dim=8),
    "GPT2Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                         intermediate_dim=64, max_sequence_length=16),
    "GPTNeoXBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                            intermediate_dim=64, max_sequence_length=16),
    "GptOssBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                           hidden_dim=32, intermediate_dim=64, num_key_value_heads=2,
                           num_experts=4, top_k=2, head_dim=8),
    "HGNetV2Backbone": dict(
        depths=[1, 1], embedding_size=16, hidden_sizes=[32, 64], stem_channels=[3, 8, 16],
        hidden_act="relu", use_learnable_affine_block=False,
        stackwise_stage_filters=[[16, 8, 32, 1, 2, 3], [32, 16, 64, 1, 2, 3]],
        apply_downsample=[False, True], use_lightweight_conv_block=[False, False],
        image_shape=IMAGE),
    "LlamaBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4, hidden_dim=32,
                          intermediate_dim=64, num_key_value_heads=2),
    "Llama3Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                           hidden_dim=32, intermediate_dim=64, num_key_value_heads=2),
    "MiTBackbone": dict(layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2],
                        layerwise_sr_ratios=[2, 1], max_drop_path_rate=0.0,
                        layerwise_patch_sizes=[7, 3], layerwise_strides=[4, 2],
                        image_shape=IMAGE, hidden_dims=[16, 32]),
    "MistralBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                            hidden_dim=32, intermediate_dim=64, num_key_value_heads=2),
    "MixtralBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                            hidden_dim=32, intermediate_dim=64, num_key_value_heads=2,
                            num_experts=4, top_k=2),
    "MobileNetBackbone": dict(
        stackwise_expansion=[[4], [6]], stackwise_num_blocks=[1, 1],
        stackwise_num_filters=[[16], [24]], stackwise_kernel_size=[[3], [5]],
        stackwise_num_strides=[[2], [1]], stackwise_se_ratio=[[None], [0.25]],
        stackwise_activation=[["relu"], ["hard_swish"]], stackwise_padding=[[1], [2]],
        output_num_filters=32, depthwise_filters=8, depthwise_stride=2,
        depthwise_residual=False, last_layer_filter=32, image_shape=IMAGE),
    "MoonshineBackbone": dict(vocabulary_size=VOCAB, filter_dim=32, encoder_num_layers=1,
                              decoder_num_layers=1, hidden_dim=32, intermediate_dim=64,
                              encoder_num_heads=4, decoder_num_heads=4),
    "OPTBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                        intermediate_dim=64, max_sequence_length=16),
    "Phi3Backbone": dict(vocabulary_size=VOCAB, num_layers=2, hidden_dim=32, intermediate_dim=64,
                         num_query_heads=4, num_key_value_heads=2),
    "QwenBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                         num_key_value_heads=2, hidden_dim=32, intermediate_dim=64),
    "Qwen2Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                          num_key_value_heads=2, hidden_dim=32, intermediate_dim=64),
    "Qwen3Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                          num_key_value_heads=2, head_dim=8, hidden_dim=32, intermediate_dim=64),
    "Qwen3MoeBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                             num_key_value_heads=2, hidden_dim=32, intermediate_dim=64,
                             moe_intermediate_dim=32, num_experts=4, head_dim=8, top_k=2),
    "QwenMoeBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                            num_key_value_heads=2, hidden_dim=32, intermediate_dim=64,
                            moe_intermediate_dim=32, shared_expert_intermediate_dim=32,
                            num_experts=4, top_k=2),
    "Qwen3_5Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                            num_key_value_heads=2, head_dim=8, hidden_dim=32,
                            intermediate_dim=64),
    "Qwen3_5MoeBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_query_heads=4,
                               num_key_value_heads=2, head_dim=8, hidden_dim=32,
                               moe_intermediate_dim=32, shared_expert_intermediate_size=32,
                               num_experts=4, top_k=2),
    "ResNetBackbone": dict(input_conv_filters=[8], input_conv_kernel_sizes=[3],
                           stackwise_num_filters=[64, 16], stackwise_num_blocks=[1, 1],
                           stackwise_num_strides=[1, 2], block_type="bottleneck_block",
                           image_shape=IMAGE),
    "RobertaBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                            intermediate_dim=64, max_sequence_length=16),
    "RoformerV2Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                               intermediate_dim=64, head_size=8),
    "RWKV7Backbone": dict(hidden_size=32, head_size=8, num_layers=2, vocabulary_size=VOCAB,
                          intermediate_dim=64, gate_lora=8, mv_lora=8, aaa_lora=8,
                          decay_lora=8),
    "SmolLMBackbone": dict(vocabulary_size=VOCAB, hidden_dim=32, intermediate_dim=64,
                           num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           attention_bias=False, attention_dropout=0.0,
                           rope_layer_enabled_list=[True, True],
                           layer_types=["attention", "attention"], mlp_bias=False,
                           layer_norm_epsilon=1e-6, max_position_embeddings=64,
                           rope_theta=10000.0, partial_rotary_factor=1.0),
    "SmolLM3Backbone": dict(vocabulary_size=VOCAB, hidden_dim=32, intermediate_dim=64,
                            num_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            attention_bias=False, attention_dropout=0.0,
                            rope_layer_enabled_list=[True, True],
                            layer_types=["attention", "attention"], mlp_bias=False,
                            layer_norm_epsilon=1e-6, max_position_embeddings=64,
                            rope_theta=10000.0, partial_rotary_factor=1.0),
    "SwinTransformerBackbone": dict(image_shape=IMAGE, embed_dim=16, depths=[2, 2],
                                    num_heads=[2, 4], window_size=4, patch_size=2),
    "T5Backbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                       intermediate_dim=64),
    "T5GemmaBackbone": dict(
        vocabulary_size=VOCAB, encoder_hidden_dim=32, encoder_intermediate_dim=64,
        encoder_num_layers=1, encoder_num_attention_heads=4, encoder_num_key_value_heads=2,
        encoder_head_dim=8, encoder_layer_types=["full_attention"], decoder_hidden_dim=32,
        decoder_intermediate_dim=64, decoder_num_layers=1, decoder_num_attention_heads=4,
        decoder_num_key_value_heads=2, decoder_head_dim=8,
        decoder_layer_types=["full_attention"]),
    "VGGBackbone": dict(stackwise_num_repeats=[1, 1], stackwise_num_filters=[8, 16],
                        image_shape=IMAGE),
    "ViTBackbone": dict(image_shape=IMAGE, patch_size=8, num_layers=2, num_heads=4,
                        hidden_dim=32, mlp_dim=64),
    "ViTDetBackbone": dict(hidden_size=32, num_layers=2, intermediate_dim=64, num_heads=4,
                           global_attention_layer_indices=[1], image_shape=IMAGE,
                           patch_size=8, num_output_channels=16, window_size=2),
    "WhisperBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                            intermediate_dim=64, num_mels=16, max_encoder_sequence_length=32,
                            max_decoder_sequence_length=16),
    "XceptionBackbone": dict(stackwise_conv_filters=[[8, 16], [32, 32]],
                             stackwise_pooling=[False, True], image_shape=IMAGE),
    "XLMRobertaBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                               intermediate_dim=64, max_sequence_length=16),
    "XLNetBackbone": dict(vocabulary_size=VOCAB, num_layers=2, num_heads=4, hidden_dim=32,
                          intermediate_dim=64),
}

# Backbones built around another backbone (image_encoder=...): class -> (encoder class,
# keyword arguments beside the encoder).
RESNET_64 = dict(input_conv_filters=[64], input_conv_kernel_sizes=[3],
                 stackwise_num_filters=[64, 16, 16, 16], stackwise_num_blocks=[1, 1, 1, 1],
                 stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
                 image_shape=IMAGE)
WRAPPERS = {
    "DeepLabV3Backbone": ("ResNet64", dict(
        spatial_pyramid_pooling_key="P3", upsampling_size=2, dilation_rates=[1, 2],
        low_level_feature_key="P2", projection_filters=16, image_shape=IMAGE)),
    "RetinaNetBackbone": ("ResNet64", dict(min_level=3, max_level=4, use_p5=False,
                                           image_shape=IMAGE)),
    "SegFormerBackbone": ("MiTBackbone", dict(projection_filters=16)),
    "BASNetBackbone": ("ResNet64NoShape", dict(num_classes=2, image_shape=IMAGE)),
}

# class -> why there is no small offline configuration here.
NOT_BUILT = {
    "BLIP2Backbone": "needs a vision encoder, a Q-Former and an OPT language model built "
                     "together (multimodal, not tried in the time box)",
    "CLIPBackbone": "needs CLIPVisionEncoder + CLIPTextEncoder (multimodal, not tried yet)",
    "MetaCLIP2Backbone": "needs vision + text encoders (multimodal, not tried yet)",
    "SigLIPBackbone": "needs vision + text encoders (multimodal, not tried yet)",
    "SAMBackbone": "needs an image encoder, prompt encoder and mask decoder (not tried yet)",
    "SAM3PromptableConceptBackbone": "needs six sub-models (vision, text, geometry, DETR "
                                     "encoder/decoder, mask decoder; not tried yet)",
    "StableDiffusion3Backbone": "needs a VAE, CLIP-L, CLIP-G (and T5) sub-models (not tried)",
    "FluxBackbone": "a diffusion transformer with five inputs (not tried yet)",
    "DFineBackbone": "an object detector around an HGNetV2 backbone with 30+ arguments (not "
                     "tried yet)",
    "DepthAnythingBackbone": "needs a DINOv2 image encoder with feature outputs (not tried)",
    "PARSeqBackbone": "needs a ViT image encoder and a text decoder (not tried yet)",
    "PaliGemmaBackbone": "a ViT and a Gemma decoder in one model (not tried yet)",
    "Gemma3nBackbone": "40+ arguments with audio and vision sub-configurations (not tried)",
    "Gemma4Backbone": "40+ arguments, MoE and per-layer inputs (not tried yet)",
    "T5Gemma2Backbone": "encoder-decoder with a vision encoder slot, 30+ arguments (not "
                        "tried yet)",
    "VideoPrismBackbone": "a video model (frames x image), not tried yet",
    "MobileNetV5Backbone": "30+ per-stage list arguments (not tried yet)",
}

ABSTRACT = ("Backbone", "FeaturePyramidBackbone")


def backbone_classes():
    """Names of the concrete `keras_hub.models.*Backbone` classes, sorted."""
    import inspect

    import keras_hub

    return sorted(n for n in dir(keras_hub.models) if n.endswith("Backbone")
                  and inspect.isclass(getattr(keras_hub.models, n)) and n not in ABSTRACT)


def _build(name):
    import keras_hub

    if name.startswith("ResNet64"):  # the first stage of 64 filters wrappers require
        config = dict(RESNET_64)
        if name.endswith("NoShape"):  # BASNet refuses an encoder with an image_shape
            config["image_shape"] = (None, None, 3)
        return keras_hub.models.ResNetBackbone(**config)
    cls = getattr(keras_hub.models, name)
    if name in WRAPPERS:
        encoder, kwargs = WRAPPERS[name]
        return cls(image_encoder=_build(encoder), **kwargs)
    return cls(**CONFIGS[name])


# class -> {input name: length of its None dimensions} where --seq_len does not fit:
# Moonshine's audio goes through convolutions of 127 (stride 64), 7 (3) and 3 (2) taps,
# so 2,048 samples give 4 encoder positions, the length of its encoder padding mask.
LENGTHS = {"MoonshineBackbone": {"encoder_input_values": 2048, "encoder_padding_mask": 4}}


def _shapes(model, seq_len):
    """One unbatched shape per model input, None dimensions set to `seq_len` (or the
    input's length in `LENGTHS`)."""
    lengths = LENGTHS.get(type(model).__name__, {})
    return [tuple(lengths.get(t.name, seq_len) if d is None else d for d in t.shape[1:])
            for t in model.inputs]


def _probe(model, shapes, seed=0):
    """Random inputs (a list in `model.inputs` order, or the dict the model takes): token
    ids in [0, VOCAB), segment ids 0/1, masks all ones but the second sample's last
    quarter, normal floats."""
    import numpy as np

    rng = np.random.default_rng(seed)
    values = []
    for t, shape in zip(model.inputs, shapes):
        shape = (2,) + shape
        name = t.name.lower()
        if "float" in str(t.dtype):
            values.append(rng.normal(size=shape).astype(t.dtype))
        elif "mask" in name:
            mask = np.ones(shape, t.dtype)
            if len(shape) == 2:
                mask[1, shape[1] - max(1, shape[1] // 4):] = 0
            values.append(mask)
        else:
            high = 2 if "segment" in name else VOCAB
            values.append(rng.integers(0, high, shape).astype(t.dtype))
    if isinstance(model.input, dict):  # keras-hub backbones take a dict of named inputs
        index = {id(t): k for k, t in enumerate(model.inputs)}
        return {key: values[index[id(t)]] for key, t in model.input.items()}
    return values


def _widths(model):
    """Attention heads, Dense/EinsumDense output units and conv filters, summed."""
    import keras

    from tf_psp import compat

    heads = units = filters = 0
    for layer in compat.flatten_layers(model):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            heads += layer.num_heads
        elif isinstance(layer, keras.layers.Dense):
            units += layer.units
        elif isinstance(layer, keras.layers.EinsumDense):
            units += int(layer.kernel.shape[-1])
        elif hasattr(layer, "filters") and isinstance(getattr(layer, "filters"), int):
            filters += layer.filters
    return {"heads": heads, "units": units, "filters": filters}


def measure(name, seq_len, keep_macs):
    """The result row of one class (see the module docstring)."""
    import re

    import tf_psp
    from tf_psp.functional import relative_error
    from tf_psp.inline import inline_nested

    row = {"class": name}
    start = time.perf_counter()
    try:
        model = _build(name)
    except Exception as e:  # noqa: BLE001  recorded, not raised
        row.update(status="does not build", reason=_first_line(e))
        return row
    shapes = _shapes(model, seq_len)
    x = _probe(model, shapes)
    row["params"] = int(model.count_params())
    try:
        dense = tf_psp.profile(model, input_shape=shapes)
        row.update(dense_macs=int(dense.total_macs), uncounted_dense=list(dense.uncounted))
        # flat, at the fixed length: decoders that build a causal mask from it open up
        flat = inline_nested(model, input_shape=shapes)
        row["flat_vs_dense"] = float(relative_error(model(x, training=False),
                                                    flat(x, training=False)))
        try:
            pruned = tf_psp.prune_to_budget(flat, keep_macs=keep_macs, importance="random",
                                            input_shape=shapes)
        except ValueError as e:
            reachable = re.search(r"\(keeps ([0-9.]+)\)", str(e))
            if reachable is None:
                raise
            row["refused"] = _first_line(e)
            pruned = tf_psp.prune_to_budget(flat, keep_macs=min(1.0, float(
                reachable.group(1)) + 1e-3), importance="random", input_shape=shapes)
        shrunk = tf_psp.strip_and_shrink(pruned)
        small = tf_psp.profile(shrunk, input_shape=shapes)
        if not dense.total_macs:
            raise ValueError("profile counts 0 MACs: every layer with weights is uncounted")
        reference = pruned(x, training=False)
        out = shrunk(x, training=False)
        row.update(shrunk_macs=int(small.total_macs), uncounted_shrunk=list(small.uncounted),
                   ratio=small.total_macs / dense.total_macs,
                   max_rel_error=float(relative_error(reference, out)),
                   pruned_vs_dense=float(relative_error(model(x, training=False), reference)),
                   shrunk_params=int(shrunk.count_params()),
                   widths_dense=_widths(model),
                   widths_shrunk=_widths(shrunk), status="measured")
    except Exception as e:  # noqa: BLE001
        row.update(status="error", reason=f"{type(e).__name__}: {_first_line(e)}")
        row["reason"] = _why_frozen(str(e)) or row["reason"]
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _why_frozen(message):
    """The composite layer a "no channel that PSP can prune" error names first and why it
    was kept whole (the informative part of a long message), else None."""
    import re

    if "no channel that PSP can prune" not in message:
        return None
    found = re.search(r"layer '[^']+' \((\w+)\) is a composite layer whose call runs its own "
                      r"sublayers \([^)]*\), kept whole because (.*?)(?:, so the channels|$)",
                      message, re.S)
    if found is None:
        return None
    because = " ".join(found.group(2).split())
    return f"nothing prunable: {found.group(1)} kept whole because {because}"[:300]


def _first_line(error):
    text = str(error).strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


def _run_one(name):
    """Measures `name` in a subprocess with the time limit; returns its row."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=root)
    command = [sys.executable, __file__, f"--worker={name}", f"--seq_len={FLAGS.seq_len}",
               f"--keep_macs={FLAGS.keep_macs}"]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=FLAGS.timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"class": name, "status": "timeout",
                "reason": f"took over {FLAGS.timeout} s", "seconds": FLAGS.timeout}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
    return {"class": name, "status": "crashed", "reason": tail[:300],
            "seconds": round(time.perf_counter() - start, 1)}


def _exact(row):
    return (row.get("status") == "measured" and row["ratio"] <= FLAGS.goal
            and row["max_rel_error"] <= FLAGS.tolerance
            and row.get("flat_vs_dense", 0.0) <= FLAGS.tolerance and not row["uncounted_dense"]
            and not row["uncounted_shrunk"])


def _removed(row):
    a, b = row["widths_dense"], row["widths_shrunk"]
    parts = [f"{what} {a[what]} -> {b[what]}" for what in ("heads", "units", "filters")
             if a[what] != b[what]]
    return ", ".join(parts) or "nothing"


def table(rows):
    """The markdown table of `rows` (one per class) with the counts above it."""
    measured = [r for r in rows if r.get("status") == "measured"]
    built = [r for r in rows if r.get("status") not in ("no config", "does not build")]
    exact = [r for r in rows if _exact(r)]
    lines = [
        f"{len(rows)} concrete backbone classes; {len(built)} build from a small random "
        f"config; {len(measured)} prune and shrink; **{len(exact)} reach <= {FLAGS.goal} of "
        f"their MACs exactly** (max rel. error <= {FLAGS.tolerance:g}, nothing uncounted) at "
        f"keep_macs={FLAGS.keep_macs}, importance='random'.", "",
        "| backbone | dense MACs | shrunk / dense | max rel. error | removed (sums over the "
        "model) | note |", "|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("status") == "measured":
            uncounted = sorted(set(r["uncounted_dense"]) | set(r["uncounted_shrunk"]))
            note = r.get("refused", "")
            if note:
                note = "keep 0.5 refused: " + note.split("; ", 1)[-1][:160]
            if uncounted:
                note = (note + "; " if note else "") + "uncounted: " + ", ".join(uncounted[:3])
            lines.append(f"| {r['class']} | {r['dense_macs']:,} | "
                         f"{'**' if _exact(r) else ''}{r['ratio']:.3f}"
                         f"{'**' if _exact(r) else ''} | {r['max_rel_error']:.1e} | "
                         f"{_removed(r)} | {note.replace('|', '/')} |")
        else:
            lines.append(f"| {r['class']} | | | | | {r['status']}: "
                         f"{r.get('reason', '').replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    if FLAGS.worker:
        row = measure(FLAGS.worker, FLAGS.seq_len, FLAGS.keep_macs)
        print(json.dumps(row), flush=True)
        return
    from tf_psp.atomic import write_text

    cache = {}
    if os.path.exists(FLAGS.output):
        with open(FLAGS.output) as f:
            cache = {r["class"]: r for r in json.load(f)["rows"]}
    names = backbone_classes()
    unknown = set(FLAGS.classes) - set(names)
    if unknown:
        raise app.UsageError(f"--classes: not keras-hub backbone classes: {sorted(unknown)}")
    for name in FLAGS.classes or names:
        if name in cache and not FLAGS.rerun:
            continue
        if name not in CONFIGS and name not in WRAPPERS:
            cache[name] = {"class": name, "status": "no config",
                           "reason": NOT_BUILT.get(name, "no small config written yet")}
        else:
            cache[name] = _run_one(name)
        r = cache[name]
        print(f"{name:<30} {r['status']:<14} "
              + (f"{r['ratio']:.3f} err {r['max_rel_error']:.1e}" if r["status"] == "measured"
                 else r.get("reason", ""))[:150], flush=True)
        rows = [cache[n] for n in names if n in cache]
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(),
                "cpus": os.cpu_count(), "keep_macs": FLAGS.keep_macs, "seq_len": FLAGS.seq_len}
        write_text(FLAGS.output, json.dumps({"meta": meta, "rows": rows}, indent=1))
        write_text(os.path.splitext(FLAGS.output)[0] + ".md", table(rows))
    print(table([cache[n] for n in names if n in cache]))


if __name__ == "__main__":
    app.run(main)
