"""Per-layer vs group-coupled vs cost-aware PSP: accuracy against *removed* MACs.

    python examples/coupling_front.py                          # MNIST-5k ResNet-8 + MobileNetV2
    python examples/coupling_front.py --models=resnet_small --strengths=0.2,0.4

Variants, each trained from the same pre-trained dense model for the same
epochs over `--strengths` of alpha weight decay (the recipe of
`mobilenet_prune.py`: BatchNorm folded, alphas balanced, PSP, shrink,
fine-tune; see `_run`):

* `layer`: the paper's PSP, one alpha per input channel of every layer but
  the one reading the image (`parameterize(structure='channel')`);
* `layer_independent`: per-layer alphas only on the layers reading channels
  that can be removed one by one (`reproduce_fig3.py`'s default, see
  `pruning_experiments.independent_consumers`);
* `group`: one alpha per removable channel, shared by all of its readers
  (`parameterize(coupling='group')`);
* `group_macs`: group alphas with MAC-weighted decay (`cost='macs'`);
* `layer_fixed` / `group_fixed`: per-layer / group alphas under the
  `FixedSparsity` constraint (each alpha variable keeps its largest
  `1 - strength` fraction), no decay: the same pruned fraction for both, so
  the difference is only how much of it `strip_and_shrink` can remove.

Every model is shrunk with `tf_psp.strip_and_shrink`; what is reported is the
shrunk model's test accuracy, the MACs it *removed* (`tf_psp.profile` on the
dense and the shrunk model) and its TFLite latency (LiteRT/XNNPACK, 1 thread,
all models of one architecture timed interleaved, medians). Models:
`resnet_small` (the Fig. 3 ResNet on 28x28 MNIST-5k) and `mobilenetv2`
(keras.applications, width 0.35, MNIST-5k resized to `--image_size` RGB).

Writes `<report_name>.json`, `.md` and `.png` (default `coupling`) to `--output_dir`;
finished runs are cached in `<output_dir>/runs/`, so a rerun skips them.
"""

import io
import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "layer": ("per-layer alphas (paper)", {}),
    "layer_independent": ("per-layer alphas, independent channels only", None),
    "group": ("group alphas", {"coupling": "group", "layers": None}),
    "group_macs": ("group alphas, MAC-weighted decay",
                   {"coupling": "group", "layers": None, "cost": "macs"}),
    "layer_fixed": ("per-layer alphas, fixed sparsity", {}),
    "group_fixed": ("group alphas, fixed sparsity", {"coupling": "group", "layers": None}),
}
FIXED = ("layer_fixed", "group_fixed")  # `strength` is FixedSparsity's target
MODELS = ("resnet_small", "mobilenetv2")
MOMENTUM = 0.9

FLAGS = flags.FLAGS
flags.DEFINE_list("models", list(MODELS), f"Models to run, from {', '.join(MODELS)}.")
flags.DEFINE_list("variants", list(VARIANTS), f"Variants, from {', '.join(VARIANTS)}.")
flags.DEFINE_list("strengths", ["0.3", "1", "3", "10"], "Alpha weight decay strengths.")
flags.DEFINE_list("fixed_targets", ["0.3", "0.5", "0.7"],
                  "FixedSparsity targets of the layer_fixed and group_fixed variants.")
flags.DEFINE_string("report_name", "coupling", "Stem of the .md/.json/.png files written.")
flags.DEFINE_integer("pretrain_epochs", 10, "Epochs of dense pre-training (Adam).")
flags.DEFINE_integer("epochs", 10, "Epochs after pre-training (SGD+momentum, cosine decay), "
                     "the same for every run: PSP training plus fine-tuning, or dense training.")
flags.DEFINE_integer("finetune_epochs", 4, "Of --epochs, how many fine-tune the shrunk model.")
flags.DEFINE_float("kernel_decay", 1e-3, "Decoupled weight decay on every weight but alpha.")
flags.DEFINE_float("epsilon", 1e-2, "PSP prune threshold on |alpha|.")
flags.DEFINE_float("clipnorm", 1.0, "Global gradient-norm clipping of SGD (0: none); the "
                   "folded networks diverge in the first steps without it.")
flags.DEFINE_float("lr", 0.01, "Initial SGD learning rate.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_list("widths", ["16", "32", "64"], "Channels of the three ResNet stages.")
flags.DEFINE_integer("image_size", 32, "MobileNetV2 input size (MNIST is resized).")
flags.DEFINE_float("alpha_width", 0.35, "MobileNetV2 width multiplier.")
flags.DEFINE_integer("steps_per_epoch", 0, "Use only this many batches per epoch (0: all; tests).")
flags.DEFINE_integer("latency_rounds", 50, "Interleaved TFLite timing rounds (0: skip).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "coupling"), "Where the figures go.")


def load_data(model_name):
    """MNIST-5k as a `pruning_experiments.Data`, resized to RGB for MobileNetV2."""
    import keras
    import numpy as np

    import datasets
    from pruning_experiments import Data

    (x_train, y_train), (x_test, y_test) = datasets.load_mnist5k(seed=FLAGS.seed)
    if model_name == "mobilenetv2":
        size = (FLAGS.image_size, FLAGS.image_size)

        def rgb(x):
            x = np.asarray(keras.ops.convert_to_numpy(keras.ops.image.resize(x, size)))
            return np.repeat(x, 3, axis=-1).astype("float32")

        x_train, x_test = rgb(x_train), rgb(x_test)
    return Data(x_train, y_train, x_test, y_test)


def builder(model_name, num_classes):
    import models
    import pruning_experiments as pe

    if model_name == "resnet_small":
        widths = tuple(int(w) for w in FLAGS.widths)
        return lambda: pe.resnet_small(num_classes=num_classes, widths=widths)
    return lambda: models.mobilenetv2(FLAGS.image_size, num_classes, FLAGS.alpha_width)


def _steps():
    return FLAGS.steps_per_epoch or None


def _pretrained(model_name, build, data, runs_dir):
    import keras

    import pruning_experiments as pe

    path = os.path.join(runs_dir, f"{model_name}_pretrained.keras")
    if os.path.exists(path):
        return keras.models.load_model(path)
    print(f"{model_name}: pre-training", flush=True)
    model = pe.pretrain(build, data, epochs=FLAGS.pretrain_epochs, seed=FLAGS.seed,
                        batch_size=FLAGS.batch_size, steps_per_epoch=_steps())
    # keras.applications' BatchNorms use momentum 0.999: after a short run their moving
    # statistics are still near their initial values, so measure them.
    import tf_psp

    model = tf_psp.recalibrate_batchnorm(model, data.x_train[:2048], batch_size=FLAGS.batch_size)
    _save_model(model, path)
    return model


def _save_model(model, path):
    from tf_psp import atomic

    with atomic.temp_file_beside(path, suffix=".keras") as tmp:
        model.save(tmp)


def _train(model, data, optimizer, epochs, label, callbacks=()):
    """Compiles and fits `model` for `epochs`, one progress line per epoch."""
    import pruning_experiments as pe

    pe._fit(model, data, optimizer, epochs=epochs, batch_size=FLAGS.batch_size, label=label,
            verbose=1, steps_per_epoch=_steps(), callbacks=callbacks)


def _sgd(epochs, data):
    """SGD + momentum, cosine decay to 0, decoupled kernel decay (alphas excluded)."""
    import keras

    steps = FLAGS.steps_per_epoch or -(-len(data.y_train) // FLAGS.batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(FLAGS.lr, max(1, epochs * steps))
    optimizer = keras.optimizers.SGD(schedule, momentum=MOMENTUM, weight_decay=FLAGS.kernel_decay,
                                     global_clipnorm=FLAGS.clipnorm or None)
    optimizer.exclude_from_weight_decay(var_names=["alpha"])
    return optimizer


def _without_kernel_regularizers(model):
    """A copy without L2 kernel regularizers: the optimizer's decoupled decay replaces them
    (on folded kernels, whose scale BatchNorm no longer fixes, they would count twice)."""
    import keras

    config = model.get_config()
    for layer in config["layers"]:
        if layer["config"].get("kernel_regularizer") is not None:
            layer["config"]["kernel_regularizer"] = None
    copy = keras.Model.from_config(config)
    copy.set_weights(model.get_weights())
    return copy


def _run(model_name, variant, strength, build, data, pretrained, runs_dir):
    """One run, cached as JSON plus its shrunk model.

    The recipe (`examples/mobilenet_prune.py`'s): BatchNorm folded into the
    convolutions (`tf_psp.fold_batchnorm`), alphas and kernels balanced
    (`tf_psp.balance_alphas`), SGD + momentum with decoupled kernel decay and
    L2 decay `strength` on alpha for `--epochs - --finetune_epochs` epochs,
    `strip_and_shrink`, then fine-tuning of the shrunk model. The dense
    baseline is the folded model trained for all `--epochs` the same way.
    """
    import keras

    import tf_psp
    from tf_psp import atomic

    import pruning_experiments as pe

    stem = os.path.join(runs_dir, f"{model_name}_{variant}_{strength:g}")
    if os.path.exists(stem + ".json"):
        print(f"{model_name} {variant} {strength:g}: done before, skipped", flush=True)
        with open(stem + ".json") as f:
            return json.load(f)
    print(f"{model_name} {variant} {strength:g}: running", flush=True)
    start = time.time()
    keras.utils.set_random_seed(FLAGS.seed)
    folded = _without_kernel_regularizers(tf_psp.fold_batchnorm(pretrained)[0])
    if variant == "dense":
        _train(folded, data, _sgd(FLAGS.epochs, data), FLAGS.epochs, "dense")
        result = pe.measure(folded, pretrained, data, shrink=False)
    else:
        kwargs = dict(VARIANTS[variant][1] or {})
        if variant in ("layer", "layer_fixed"):
            kwargs["layers"] = pe._skip_model_inputs(folded)
        elif variant == "layer_independent":
            kwargs["layers"] = pe.independent_consumers(pretrained)
        if variant in FIXED:
            psp = tf_psp.parameterize(
                folded, structure="channel", epsilon=FLAGS.epsilon, alpha_regularizer=None,
                alpha_constraint=tf_psp.regularizers.FixedSparsity(strength), **kwargs)
        else:
            psp = tf_psp.parameterize(
                folded, structure="channel", epsilon=FLAGS.epsilon,
                alpha_regularizer=tf_psp.regularizers.WeightDecay(strength), **kwargs)
            psp = tf_psp.balance_alphas(psp, kernel_decay=FLAGS.kernel_decay, momentum=MOMENTUM)
        epochs = FLAGS.epochs - FLAGS.finetune_epochs
        _train(psp, data, _sgd(epochs, data), epochs, f"{variant} {strength:g}",
               callbacks=[tf_psp.PSPMonitor()])
        removability = tf_psp.removability(psp)
        psp_accuracy = pe.evaluate(psp, data)
        shrunk = tf_psp.strip_and_shrink(psp)
        deviation = pe.measure(psp, pretrained, data)["max_deviation"]
        _save_model(shrunk, stem + ".keras")
        if FLAGS.finetune_epochs:
            _train(shrunk, data, _sgd(FLAGS.finetune_epochs, data), FLAGS.finetune_epochs,
                   f"{variant} {strength:g} fine-tune")
        result = pe.measure(shrunk, pretrained, data, shrink=False)
        result.update(psp_accuracy=psp_accuracy, max_deviation=deviation,
                      sparsity=float(tf_psp.profile(psp).sparsity),
                      removable_share=removability.removable_share,
                      kept_zero_macs=removability.kept_zero_macs)
    result.update(model=model_name, variant=variant, strength=strength,
                  train_seconds=time.time() - start)
    atomic.write_text(stem + ".json", json.dumps(result, indent=1))
    return result


def _latencies(model_name, results, pretrained, runs_dir):
    """TFLite median latency (ms) per run label, all timed interleaved."""
    import keras

    import tf_psp
    from tf_psp import bench, export

    if not FLAGS.latency_rounds:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"dense": os.path.join(tmp, "dense.tflite")}
        # the dense reference has its BatchNorms folded too, like every shrunk model
        export.export_tflite(tf_psp.fold_batchnorm(pretrained)[0], paths["dense"])
        for r in results:
            if r["variant"] == "dense":
                continue
            label = f"{r['variant']}_{r['strength']:g}"
            model = keras.models.load_model(
                os.path.join(runs_dir, f"{model_name}_{label}.keras"))
            paths[label] = os.path.join(tmp, f"{label}.tflite")
            export.export_tflite(model, paths[label])
        timers = {name: bench.tflite_timer(path, num_threads=1) for name, path in paths.items()}
        medians = bench.interleaved(timers, rounds=FLAGS.latency_rounds, warmup=5)
    return {name: seconds * 1e3 for name, seconds in medians.items()}


def frontier(results, variant, accuracy_floor):
    """Largest removed-MAC fraction of `variant` with accuracy >= `accuracy_floor`."""
    best = [r["mac_reduction"] for r in results
            if r["variant"] == variant and r["accuracy"] >= accuracy_floor - 1e-9]
    return max(best, default=0.0)


def summarize(results, dense):
    """Per variant: removed MACs at accuracy >= dense - 0.5/1.0 pp, and the ratio to `layer`."""
    out = {}
    for tolerance in (0.005, 0.01):
        row = {v: frontier(results, v, dense["accuracy"] - tolerance) for v in VARIANTS}
        best_layer = max(row["layer"], row["layer_independent"])
        for v in ("group", "group_macs"):
            row[f"{v}_vs_layer"] = row[v] / best_layer if best_layer else None
        row["group_fixed_vs_layer_fixed"] = (
            row["group_fixed"] / row["layer_fixed"] if row["layer_fixed"] else None)
        out[f"loss<={tolerance * 100:g}pp"] = row
    return out


def markdown(model_name, results, dense, latency, summary):
    lines = [f"### {model_name}", "",
             f"Dense (same epochs): accuracy {dense['accuracy']:.4f}, "
             f"{dense['macs_dense']:,} MACs"
             + (f", TFLite {latency['dense']:.3f} ms" if latency else "") + ".", "",
             "| variant | decay (fixed: target) | accuracy | removed MACs | MAC speed-up "
             "| removable share | TFLite ms | speed-up |", "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (list(VARIANTS).index(r["variant"]), r["strength"])):
        ms = latency.get(f"{r['variant']}_{r['strength']:g}")
        timing = "| |" if ms is None else f"| {ms:.3f} | {latency['dense'] / ms:.2f}x |"
        lines.append(
            f"| {VARIANTS[r['variant']][0]} | {r['strength']:g} | {r['accuracy']:.4f} "
            f"| {r['mac_reduction']:.1%} | {r['speedup_macs']:.2f}x | {r['removable_share']:.1%} "
            + timing)
    lines += ["", "Removed MACs at equal accuracy (best run within the accuracy loss; the "
              "ratios are against the better per-layer variant):", "",
              "| accuracy loss | per-layer | per-layer, independent | group | group + MACs "
              "| group / per-layer | group+MACs / per-layer |", "|---|---|---|---|---|---|---|"]
    for key, row in summary.items():
        ratio = lambda v: "n/a" if v is None else f"{v:.2f}x"  # noqa: E731
        lines.append(f"| {key} | {row['layer']:.1%} | {row['layer_independent']:.1%} "
                     f"| {row['group']:.1%} | {row['group_macs']:.1%} "
                     f"| {ratio(row['group_vs_layer'])} | {ratio(row['group_macs_vs_layer'])} |")
    if any(r["variant"] in FIXED for r in results):
        lines += ["", "Fixed sparsity (the same targets for both), removed MACs at equal accuracy:",
                  "", "| accuracy loss | per-layer | group | group / per-layer |",
                  "|---|---|---|---|"]
        for key, row in summary.items():
            lines.append(f"| {key} | {row['layer_fixed']:.1%} | {row['group_fixed']:.1%} "
                         f"| {ratio(row['group_fixed_vs_layer_fixed'])} |")
    return "\n".join(lines) + "\n"


def plot(all_results, dense_by_model):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(all_results)
    fig, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for ax, name in zip(axes[0], names):
        for variant, (label, _) in VARIANTS.items():
            runs = sorted((r for r in all_results[name] if r["variant"] == variant),
                          key=lambda r: r["mac_reduction"])
            if runs:
                ax.plot([100 * r["mac_reduction"] for r in runs],
                        [100 * r["accuracy"] for r in runs], "o-", label=label)
        ax.axhline(100 * dense_by_model[name]["accuracy"], color="gray", ls="--",
                   label="dense, same epochs")
        ax.set_xlabel("MACs removed by strip_and_shrink (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{name} on MNIST-5k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()


def main(argv):
    del argv
    for name in FLAGS.models:
        if name not in MODELS:
            raise app.UsageError(f"--models: unknown model {name!r}; expected {MODELS}.")
    for name in FLAGS.variants:
        if name not in VARIANTS:
            raise app.UsageError(
                f"--variants: unknown variant {name!r}; expected {list(VARIANTS)}.")
    if not 0 <= FLAGS.finetune_epochs < FLAGS.epochs:
        raise app.UsageError(f"--finetune_epochs must be in [0, --epochs={FLAGS.epochs}), "
                             f"got {FLAGS.finetune_epochs}.")
    from tf_psp import atomic

    start = time.time()
    runs_dir = os.path.join(FLAGS.output_dir, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    all_results, dense_by_model, report = {}, {}, {}
    sections = []
    for name in FLAGS.models:
        data = load_data(name)
        build = builder(name, data.num_classes)
        pretrained = _pretrained(name, build, data, runs_dir)
        dense = _run(name, "dense", 0.0, build, data, pretrained, runs_dir)
        results = [_run(name, v, float(s), build, data, pretrained, runs_dir)
                   for v in FLAGS.variants
                   for s in (FLAGS.fixed_targets if v in FIXED else FLAGS.strengths)]
        latency = _latencies(name, results, pretrained, runs_dir)
        summary = summarize(results, dense)
        all_results[name], dense_by_model[name] = results, dense
        report[name] = {"dense": dense, "runs": results, "tflite_ms": latency, "summary": summary}
        sections.append(markdown(name, results, dense, latency, summary))
        print(sections[-1], flush=True)
    wall = time.time() - start
    command = "python examples/coupling_front.py " + " ".join(sys.argv[1:])
    text = (f"## Per-layer vs group vs cost-aware PSP\n\n`{command.strip()}` "
            f"({wall / 60:.0f} min here, 2 CPU cores)\n\n" + "\n".join(sections))
    atomic.write_text(os.path.join(FLAGS.output_dir, f"{FLAGS.report_name}.md"), text)
    report["flags"] = {f: FLAGS[f].value for f in (
        "strengths", "fixed_targets", "widths", "finetune_epochs", "kernel_decay", "epsilon",
        "clipnorm", "pretrain_epochs", "epochs", "lr", "batch_size", "image_size", "alpha_width",
        "steps_per_epoch", "seed")}
    atomic.write_text(os.path.join(FLAGS.output_dir, f"{FLAGS.report_name}.json"),
                      json.dumps(report, indent=1, default=float))
    atomic.write_bytes(os.path.join(FLAGS.output_dir, f"{FLAGS.report_name}.png"),
                       plot(all_results, dense_by_model))
    print(f"wrote {FLAGS.report_name}.md/.json/.png to {FLAGS.output_dir} in {wall:.0f} s")


if __name__ == "__main__":
    app.run(main)
