"""tfmot worker: magnitude-prune MobileNetV2 with tensorflow-model-optimization, export TFLite.

Runs ONLY in the separate tfmot virtual environment (benchmarks/tfmot-requirements.txt):
importing tensorflow_model_optimization sets TF_USE_LEGACY_KERAS=1 for the whole
process and it accepts tf_keras (Keras 2) models only. Started by
benchmarks/tfmot_baseline.py:

    benchmarks/.tfmot-venv/bin/python benchmarks/tfmot_worker.py \
        --out=/tmp/mnv2_tfmot50.tflite --sparsity=0.5 --input_size=224

What it does: builds tf_keras MobileNetV2 (alpha 1.0, weights=None, random
weights, fixed seed), wraps the whole model with
`tfmot.sparsity.keras.prune_low_magnitude` (ConstantSparsity(S), begin_step 0,
frequency 1), runs one epoch of a few batches of random data with the
UpdatePruningStep callback (learning rate 0, so only the masks change the
weights), strips the wrappers, checks the kernel sparsity reached, and converts
to float32 TFLite. The last line of stdout is one JSON object (sparsity, counts,
file size and gzip size of the .tflite).
"""

import gzip
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"  # tfmot sets it too; be explicit and early

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output .tflite file.")
flags.DEFINE_float("sparsity", 0.5, "ConstantSparsity target of every prunable kernel.")
flags.DEFINE_integer("input_size", 224, "Input height and width.")
flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("seed", 0, "Seed of weights and data.")
flags.DEFINE_integer("batches", 4, "Pruning steps (batches of the single epoch).")
flags.DEFINE_integer("batch_size", 4, "Batch size of the pruning steps.")
flags.mark_flag_as_required("out")


def main(argv):
    del argv
    started = time.perf_counter()
    import numpy as np
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot
    import tf_keras

    tf_keras.utils.set_random_seed(FLAGS.seed)
    size = FLAGS.input_size
    model = tf_keras.applications.MobileNetV2(
        input_shape=(size, size, 3), alpha=FLAGS.alpha, weights=None,
        classifier_activation=None)
    total_params = int(model.count_params())

    sparsity = tfmot.sparsity.keras
    schedule = sparsity.ConstantSparsity(FLAGS.sparsity, begin_step=0, frequency=1)
    pruned = sparsity.prune_low_magnitude(model, pruning_schedule=schedule)
    pruned.compile(
        optimizer=tf_keras.optimizers.SGD(learning_rate=0.0),
        loss=tf_keras.losses.MeanSquaredError(),
    )
    rng = np.random.default_rng(FLAGS.seed)
    n = FLAGS.batches * FLAGS.batch_size
    x = rng.standard_normal((n, size, size, 3)).astype(np.float32)
    y = rng.standard_normal((n,) + tuple(model.output_shape[1:])).astype(np.float32)
    pruned.fit(x, y, batch_size=FLAGS.batch_size, epochs=1, verbose=0,
               callbacks=[sparsity.UpdatePruningStep()])
    stripped = sparsity.strip_pruning(pruned)

    # Sparsity reached. tfmot 0.8.1 prunes the Conv2D and Dense kernels of MobileNetV2
    # but leaves DepthwiseConv2D kernels dense (reported apart as a check).
    kernel_total = kernel_zero = zero_all = 0
    dw_total = dw_zero = 0
    layers = 0
    for layer in stripped.layers:
        for w in layer.weights:
            zero_all += int(np.count_nonzero(w.numpy() == 0))
        if isinstance(layer, tf_keras.layers.DepthwiseConv2D):  # a Conv2D subclass
            k = layer.depthwise_kernel.numpy()
            dw_total += k.size
            dw_zero += int(np.count_nonzero(k == 0))
        elif isinstance(layer, (tf_keras.layers.Conv2D, tf_keras.layers.Dense)):
            k = layer.kernel.numpy()
            kernel_total += k.size
            kernel_zero += int(np.count_nonzero(k == 0))
            layers += 1
    kernel_sparsity = kernel_zero / kernel_total
    # Only the zeros the masks made (BatchNorm betas and means start at 0, biases too).
    param_sparsity = (kernel_zero + dw_zero) / total_params

    converter = tf.lite.TFLiteConverter.from_keras_model(stripped)
    content = converter.convert()
    out = os.path.abspath(FLAGS.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    tmp = out + ".tmp"
    with open(tmp, "wb") as f:
        f.write(content)
    os.replace(tmp, out)

    # Check the TFLite file against the stripped Keras model on one input.
    probe = rng.standard_normal((1, size, size, 3)).astype(np.float32)
    reference = stripped(probe, training=False).numpy().astype(np.float64)
    max_rel_error = None
    try:
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            interpreter = tf.lite.Interpreter(model_path=out)
        interpreter.allocate_tensors()
        interpreter.set_tensor(interpreter.get_input_details()[0]["index"], probe)
        interpreter.invoke()
        got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
        scale = float(np.abs(reference).max())
        diff = float(np.abs(reference - got.astype(np.float64)).max())
        max_rel_error = diff / scale if scale > 0 else diff
    except Exception as e:  # pylint: disable=broad-except
        print(f"tfmot_worker: TFLite check skipped: {e}", file=sys.stderr)

    result = {
        "tflite": out,
        "target_sparsity": FLAGS.sparsity,
        "kernel_sparsity": kernel_sparsity,
        "param_sparsity": param_sparsity,
        "zero_params_all": zero_all,
        "prunable_kernel_params": kernel_total,  # Conv2D + Dense kernels
        "depthwise_kernel_sparsity": dw_zero / dw_total if dw_total else None,
        "pruned_layers": layers,
        "params": total_params,
        "tflite_bytes": os.path.getsize(out),
        "tflite_gzip_bytes": len(gzip.compress(content, compresslevel=9)),
        "tflite_max_rel_error": max_rel_error,
        "pruning_steps": FLAGS.batches,
        "batch_size": FLAGS.batch_size,
        "versions": {
            "tensorflow": tf.__version__,
            "tf_keras": tf_keras.__version__,
            "tensorflow_model_optimization": tfmot.__version__,
            "numpy": np.__version__,
        },
        "TF_USE_LEGACY_KERAS": os.environ.get("TF_USE_LEGACY_KERAS"),
        "wall_s": round(time.perf_counter() - started, 1),
    }
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    app.run(main)
