"""Training-step time: PSP-parameterized ResNet-20 vs the same plain Keras model.

    python benchmarks/train_step.py --rounds=7 --steps=10

Batch 128 of 32x32x3, CPU, `jit_compile=False` (XLA is slower on these CPUs).
Both models train side by side, interleaved A/B/A/B, and the median step time
of each is reported with their ratio. Writes JSON to --output.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags

# The model zoo of the examples (examples/models.py) builds ResNet-20.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("rounds", 7, "Interleaved A/B rounds.")
flags.DEFINE_integer("steps", 10, "Training steps timed per round and model.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_string("structure", "channel", "PSP structure.")
flags.DEFINE_string("output", "benchmarks/results/train_step.json", "Where to write JSON.")


def main(argv):
    del argv
    import keras
    import numpy as np

    import tf_psp
    from tf_psp import atomic

    keras.utils.set_random_seed(0)
    plain = models.resnet_cifar(20, kernel_initializer="glorot_uniform")
    psp = tf_psp.parameterize(plain, structure=FLAGS.structure)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(FLAGS.batch_size, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, size=(FLAGS.batch_size,))
    for model in (plain, psp):
        model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                      keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      jit_compile=False)
        model.train_on_batch(x, y)  # trace once, outside the timing
        model.train_on_batch(x, y)
    times = {"plain": [], "psp": []}
    for r in range(FLAGS.rounds):
        order = (("plain", plain), ("psp", psp))
        for name, model in order if r % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            for _ in range(FLAGS.steps):
                model.train_on_batch(x, y)
            times[name].append((time.perf_counter() - start) / FLAGS.steps)
        print(f"round {r + 1}/{FLAGS.rounds}: plain {times['plain'][-1] * 1e3:.1f} ms, "
              f"psp {times['psp'][-1] * 1e3:.1f} ms", flush=True)
    plain_ms = statistics.median(times["plain"]) * 1e3
    psp_ms = statistics.median(times["psp"]) * 1e3
    result = {
        "model": "resnet20", "batch_size": FLAGS.batch_size, "structure": FLAGS.structure,
        "backend": keras.backend.backend(), "jit_compile": False, "cpu_count": os.cpu_count(),
        "plain_step_ms_median": round(plain_ms, 2), "psp_step_ms_median": round(psp_ms, 2),
        "ratio_psp_over_plain": round(psp_ms / plain_ms, 3),
        "rounds": FLAGS.rounds, "steps_per_round": FLAGS.steps,
    }
    print(json.dumps(result, indent=2))
    atomic.write_text(FLAGS.output, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    app.run(main)
