"""Dense vs PSP-shrunk MobileNetV2 on any Keras backend: the GPU benchmark (JAX).

    KERAS_BACKEND=jax python benchmarks/gpu_latency.py                  # on a GPU machine
    KERAS_BACKEND=jax python benchmarks/gpu_latency.py --quick          # smoke run on CPU

Builds MobileNetV2 (alpha 1.0, 224x224, random weights, BatchNorm statistics
randomized), parameterizes it with `structure='channel'`, and finds with
latency.py's deterministic pattern (smallest-L1 input channels, fraction `f`
bisected) the shrunk model with the target MAC reduction (`round_to=8`). Then
times `predict_on_batch` (compiled, XLA on JAX) of dense and shrunk at batch 1
and 64, interleaved A/B in one run, and reports medians, speed-up and speed-up
fidelity (speed-up / MAC reduction). Writes JSON to --output.

On the GPU machine there is no TensorFlow: carry the keras wheel and run with
`KERAS_BACKEND=jax` (see the device README); nothing here imports TensorFlow.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import latency  # noqa: E402  (pattern and model builders; defines its own flags)

FLAGS = flags.FLAGS
flags.DEFINE_float("target", 0.5, "Target MAC reduction (fraction of MACs removed).")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes to time.")
flags.DEFINE_integer("gpu_rounds", 30, "Interleaved A/B rounds per batch size.")
flags.DEFINE_string("output", "benchmarks/results/gpu_latency.json", "Where to write JSON.")


def main(argv):
    del argv
    import keras
    import numpy as np

    import tf_psp
    from tf_psp import atomic

    keras.utils.set_random_seed(0)
    size = 64 if FLAGS.quick else 224
    dense = keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=1.0, weights=None, classifier_activation=None)
    latency.randomize_batchnorm(dense, seed=0)
    psp = tf_psp.parameterize(dense, structure="channel")
    dense_macs = tf_psp.profile(psp).total_macs
    pattern = latency.Pattern(psp)
    fraction, shrunk, macs, reduction, reached = latency.search_fraction(
        pattern, FLAGS.target, coupled=False, round_to=8, dense_macs=dense_macs,
        steps=12, tolerance=0.01)
    print(f"shrunk: f={fraction:.3f}, MACs {dense_macs / 1e6:.1f} M -> {macs / 1e6:.1f} M "
          f"({dense_macs / macs:.2f}x fewer)", flush=True)
    for model in (dense, shrunk):
        model.compile(jit_compile=True)
    rounds = 3 if FLAGS.quick else FLAGS.gpu_rounds
    results = []
    for batch in (int(b) for b in FLAGS.batch_sizes):
        x = np.random.default_rng(0).normal(size=(batch, size, size, 3)).astype("float32")
        times = {"dense": [], "shrunk": []}
        for model in (dense, shrunk):
            for _ in range(3):
                model.predict_on_batch(x)  # compile and warm up
        for r in range(rounds):
            order = (("dense", dense), ("shrunk", shrunk)) if r % 2 == 0 else (
                ("shrunk", shrunk), ("dense", dense))
            for name, model in order:
                start = time.perf_counter()
                model.predict_on_batch(x)  # returns numpy: waits for the device
                times[name].append(time.perf_counter() - start)
        dense_ms = statistics.median(times["dense"]) * 1e3
        shrunk_ms = statistics.median(times["shrunk"]) * 1e3
        speedup = dense_ms / shrunk_ms
        row = {"batch_size": batch, "dense_ms": round(dense_ms, 3),
               "shrunk_ms": round(shrunk_ms, 3), "speedup": round(speedup, 3),
               "fidelity": round(speedup * macs / dense_macs, 3)}
        print(json.dumps(row), flush=True)
        results.append(row)
    report = {
        "backend": keras.backend.backend(),
        "devices": _devices(),
        "model": f"MobileNetV2 alpha 1.0, {size}x{size}",
        "dense_macs": dense_macs, "shrunk_macs": macs,
        "mac_reduction": round(dense_macs / macs, 3), "target_reached": bool(reached),
        "fraction": fraction, "round_to": 8, "rounds": rounds, "results": results,
    }
    atomic.write_text(FLAGS.output, json.dumps(report, indent=2) + "\n")
    print(f"wrote {FLAGS.output}")


def _devices():
    try:
        import jax

        return [str(d) for d in jax.devices()]
    except ImportError:
        return ["(not jax)"]


if __name__ == "__main__":
    app.run(main)
