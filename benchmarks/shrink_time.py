"""Wall time of `tf_psp.strip_and_shrink` on ImageNet-size models.

    .venv/bin/python benchmarks/shrink_time.py --repeats=3

MobileNetV2 and ResNet50 (keras.applications, 224x224x3, random weights) are
parameterized with `structure='channel'`; each PSP layer then has a seeded
random half of its alphas set to zero (layers reading the model input are left
alone). Only `strip_and_shrink` is timed (model building, `parameterize` and
the TensorFlow import are not); the median of --repeats calls is reported.
Goals: MobileNetV2 < 3 s, ResNet50 < 10 s. Writes JSON to --output.
"""

import datetime
import json
import os
import platform
import statistics
import time

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mobilenetv2", "resnet50"], "Models: mobilenetv2, resnet50.")
flags.DEFINE_integer("repeats", 3, "Timed strip_and_shrink calls per model.")
flags.DEFINE_integer("round_to", 1, "round_to of strip_and_shrink.")
flags.DEFINE_float("fraction", 0.5, "Fraction of each layer's alphas set to zero.")
flags.DEFINE_integer("seed", 0, "Seed of the weights and of the zeroed alphas.")
flags.DEFINE_string("output", "benchmarks/results/shrink_time.json", "Where to write JSON.")

GOALS_S = {"mobilenetv2": 3.0, "resnet50": 10.0}


def build(name):
    import keras

    if name == "mobilenetv2":
        return keras.applications.MobileNetV2(input_shape=(224, 224, 3), weights=None)
    if name == "resnet50":
        return keras.applications.ResNet50(input_shape=(224, 224, 3), weights=None)
    raise app.UsageError(f"--models: unknown model {name!r}; choose mobilenetv2 or resnet50.")


def zero_alphas(psp, fraction, seed):
    """Zeroes a seeded random `fraction` of each PSP layer's alphas; returns how many."""
    import keras
    import numpy as np

    import tf_psp

    rng = np.random.default_rng(seed)
    first = {id(layer) for node_input in psp.inputs
             for layer in _readers(psp, node_input)}
    zeroed = 0
    for layer in tf_psp.compat.flatten_layers(psp):
        if not tf_psp.is_psp_layer(layer) or id(layer) in first:
            continue
        alpha = np.ones(layer.alpha.shape, np.float32).reshape(-1)
        k = int(round(fraction * alpha.size))
        alpha[rng.permutation(alpha.size)[:k]] = 0.0
        layer.alpha.assign(keras.ops.reshape(alpha, layer.alpha.shape))
        zeroed += k
    return zeroed


def _readers(model, tensor):
    """Layers called directly on `tensor`."""
    import tf_psp
    readers = []
    for layer in model.layers:
        for node in tf_psp.compat.inbound_nodes(layer):
            if any(t is tensor for t in node.arguments.keras_tensors):
                readers.append(layer)
    return readers


def measure(name):
    import keras

    import tf_psp

    keras.utils.set_random_seed(FLAGS.seed)
    dense = build(name)
    psp = tf_psp.parameterize(dense, structure="channel")
    zeroed = zero_alphas(psp, FLAGS.fraction, FLAGS.seed)
    times = []
    for i in range(FLAGS.repeats):
        start = time.perf_counter()
        shrunk = tf_psp.strip_and_shrink(psp, round_to=FLAGS.round_to)
        times.append(time.perf_counter() - start)
        print(f"{name}: strip_and_shrink call {i + 1}/{FLAGS.repeats}: {times[-1]:.2f} s",
              flush=True)
    dense_profile, shrunk_profile = tf_psp.profile(dense), tf_psp.profile(shrunk)
    median = statistics.median(times)
    return {
        "layers": len(dense.layers),
        "psp_layers": sum(1 for layer in psp.layers if tf_psp.is_psp_layer(layer)),
        "alphas_zeroed": zeroed,
        "dense_macs": int(dense_profile.total_macs),
        "shrunk_macs": int(shrunk_profile.total_macs),
        "dense_params": int(dense_profile.total_params),
        "shrunk_params": int(shrunk_profile.total_params),
        "times_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "goal_s": GOALS_S[name],
        "goal_met": median < GOALS_S[name],
    }


def main(argv):
    del argv
    import keras
    import tensorflow as tf

    results = {name: measure(name) for name in FLAGS.models}
    output = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(), "machine": platform.processor() or platform.machine(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "structure": "channel", "fraction_zeroed": FLAGS.fraction,
        "round_to": FLAGS.round_to, "repeats": FLAGS.repeats,
        "models": results,
    }
    print("| model | layers | PSP layers | MACs dense -> shrunk (M) "
          "| strip_and_shrink median | goal |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['layers']} | {r['psp_layers']} | {r['dense_macs'] / 1e6:.0f} -> "
              f"{r['shrunk_macs'] / 1e6:.0f} | {r['median_s']:.2f} s | < {r['goal_s']:g} s "
              f"({'met' if r['goal_met'] else 'NOT met'}) |")
    from tf_psp import atomic

    atomic.write_text(FLAGS.output, json.dumps(output, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
