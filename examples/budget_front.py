"""PSP to a MAC budget against the baselines, at equal budget and epochs (MNIST-5k, Fashion-MNIST).

For each model (ResNet-8, MobileNetV2 width 0.35), seed and budget
(`--budgets`, fractions of the dense MACs the final model keeps), every
method starts from the same dense model pre-trained for `--pretrain_epochs`
(Adam) and then trains for `--epochs` more (SGD, momentum 0.9, cosine decay),
so every row has the same total number of epochs:

- `psp_budget`: `parameterize(coupling='group')`, `epochs - finetune_epochs` of
  budget training with `tf_psp.PruneToBudget` (importance `'alpha'`), shrink,
  `finetune_epochs` of fine-tuning;
- `l1_norm` (Li et al. 2017): `prune_to_budget(importance='l1')` of the dense
  model, shrink, `epochs` of fine-tuning;
- `network_slimming` (Liu et al. 2017): `epochs - finetune_epochs` with
  `sparse_training.BatchNormL1`, `prune_to_budget(importance='bn')`, shrink,
  fine-tuning;
- `group_lasso` (DepGraph-style): the same with `sparse_training.GroupLasso`
  and `importance='l2'`;
- `random`: `prune_to_budget(importance='random')`, shrink, fine-tuning;
- `scratch` (Liu et al. 2019): the architecture `psp_budget` ended with (same
  model, seed and budget), freshly initialized and trained for
  `pretrain_epochs + epochs` like the dense model;
- `dense`: the dense model trained for the same epochs (keep_macs 1.0).
- `<method>_kd` (every method but dense): the same, with knowledge distillation
  from the pre-trained dense model of the seed (the same frozen teacher for
  every method) in every training phase after pre-training (`scratch_kd`: in
  both of its phases, on the architecture `psp_budget_kd` ended with);
  `tf_psp.Distiller` with the setting's `temperature` and `distill_weight`.

BatchNorm trains throughout; its statistics are recalibrated on the training
digits before every evaluation and shrink. Hyperparameters: `--search` runs
the grid `SEARCH` (three settings per method) at keep 0.3, seed 0, on a
validation split carved from the training digits (the last 800 of 4,000),
and writes `search_<model>.json`; the final runs read the best setting per
method from it. The test digits are only used by the final runs.

Every run is cached in `--out/runs/` (resumable); after each run the rows are
collected into `--out/<model>.json`, a markdown table and a plot.

`--dataset=fashion_mnist` runs the same protocol on Fashion-MNIST (Debian's
`dataset-fashion-mnist`, see examples/datasets.py): the validation split is the
last fifth of the (seeded, shuffled) training images, `--train_examples` takes a
subset of the 60,000, and every final run is evaluated on all 10,000 test
images. Every run records `dataset`, `train_examples` and `test_examples`.

    python examples/budget_front.py --models=resnet8 --search
    python examples/budget_front.py --models=resnet8 --seeds=0,1,2
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["resnet8", "mobilenetv2"], "resnet8 and/or mobilenetv2.")
flags.DEFINE_enum("dataset", "mnist5k", ["mnist5k", "fashion_mnist"],
                  "mnist5k (4,000 training / 1,000 test digits, offline) or fashion_mnist "
                  "(60,000 / 10,000; apt-get install dataset-fashion-mnist).")
flags.DEFINE_integer("train_examples", 0,
                     "Use only this many of the (shuffled) training images (0: all); the test "
                     "images are always all used.")
flags.DEFINE_string("data_dir", None, "Fashion-MNIST's directory (default: "
                    "$TF_PSP_FASHION_MNIST_DIR, else where dataset-fashion-mnist installs it).")
flags.DEFINE_list("methods", ["dense", "psp_budget", "l1_norm", "network_slimming",
                              "group_lasso", "random", "scratch"], "Methods to run.")
flags.DEFINE_list("budgets", ["0.5", "0.3", "0.15"], "keep_macs values.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (data order, initialization, pruning).")
flags.DEFINE_integer("pretrain_epochs", 8, "Dense pre-training epochs (Adam 1e-3).")
flags.DEFINE_integer("epochs", 8, "Epochs after pre-training, for every method.")
flags.DEFINE_integer("finetune_epochs", 3,
                     "Of --epochs, the fine-tuning epochs after shrinking (two-phase methods).")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_boolean("search", False, "Run the validation search instead of the final runs.")
flags.DEFINE_string("out", None, "Output directory (default: examples/results/budget for "
                    "mnist5k, examples/results/budget_<dataset> for another --dataset).")
flags.DEFINE_integer("steps_per_epoch", 0, "Use only this many batches per epoch (smoke tests).")
flags.DEFINE_integer("threads", 0, "TensorFlow intra-op threads (0: default).")
flags.DEFINE_string("search_from", None,
                    "Take the searched settings from search_<this model>.json (e.g. resnet8) "
                    "instead of the model's own search.")
flags.DEFINE_boolean("pretrain_only", False, "Only pre-train (and cache) the dense models.")
flags.DEFINE_boolean("use_defaults", False,
                     "Run the final runs with the built-in settings when --out holds no "
                     "search_<model>.json (without it, a missing search file is an error).")
flags.DEFINE_float("lr_override", 0.0,
                   "With --search_from or --use_defaults: use this learning rate for every "
                   "method (the searched model's learning rates need not transfer; 0: keep "
                   "them).")

DEFAULTS = {"lr": 0.01, "strength": 0.0}
# The settings searched per method on the validation split (keep 0.3, seed 0), in
# three rounds run one after the other (the cached runs of earlier rounds are reused):
# 1. lr 0.003/0.01/0.03 (sparse-training methods: lr 0.01, three strengths);
# 2. 0.03 was best for every method at the edge of the grid: lr 0.01/0.03/0.1 (sparse
#    training at lr 0.03); PSP: lr 0.1, and PruneToBudget's decay_until 0.5 (default 0.8);
# 3. PSP's separate fine-tuning phase (a new cosine schedule from the full learning rate)
#    lowered its accuracy (97.0 % -> 96.75 % at decay_until 0.5), so PSP also runs as
#    its callback intends: all epochs with PruneToBudget, whose last part already trains
#    the pruned network (finetune 0); every other method got as many extra settings.
# Settings per method in all: PSP 9, lr-only methods 7, sparse-training methods 8.
ROUND1 = [{"lr": 0.003}, {"lr": 0.01}, {"lr": 0.03}]
LRS = [{"lr": 0.003}, {"lr": 0.01}, {"lr": 0.02}, {"lr": 0.03}, {"lr": 0.05}, {"lr": 0.1},
       {"lr": 0.2}]
SEARCH = {
    "dense": LRS,
    "l1_norm": LRS,
    "random": LRS,
    "scratch": LRS,
    "psp_budget": ROUND1 + [
        {"lr": 0.03, "decay_until": 0.8}, {"lr": 0.1, "decay_until": 0.8},
        {"lr": 0.03, "decay_until": 0.5},
        {"lr": 0.03, "decay_until": 0.5, "finetune": 0},
        {"lr": 0.1, "decay_until": 0.5, "finetune": 0},
        {"lr": 0.03, "decay_until": 0.3, "finetune": 0}],
    "network_slimming": [{"lr": lr, "strength": s} for lr in (0.01, 0.03) for s in
                         (1e-3, 1e-2, 1e-1)] + [{"lr": 0.1, "strength": s} for s in (1e-3, 1e-2)],
    "group_lasso": [{"lr": lr, "strength": s} for lr in (0.01, 0.03) for s in
                    (1e-3, 1e-2, 1e-1)] + [{"lr": 0.1, "strength": s} for s in (1e-3, 1e-2)],
}
KD = {"temperature": 4.0, "distill_weight": 0.5}  # Hinton et al.'s loss; T ~ 2-4 in pruning work
# The distilled variants search the same settings as their methods (equal effort), with KD on.
SEARCH.update({f"{m}_kd": [dict(c, **KD) for c in SEARCH[m]] for m in list(SEARCH)
               if m != "dense"})
PSP_SCRATCH_REFERENCE = {"lr": 0.1, "decay_until": 0.8}  # the psp run scratch copies (search)
SEARCH_BUDGET = 0.3


# --- data and models --------------------------------------------------------------


DATASET_NAMES = {"mnist5k": "MNIST-5k", "fashion_mnist": "Fashion-MNIST"}


def _data_tag():
    """The data set in cache names: '' for all of MNIST-5k (the names before --dataset)."""
    if FLAGS.dataset == "mnist5k" and not FLAGS.train_examples:
        return ""
    return f"_{FLAGS.dataset}{FLAGS.train_examples or ''}"


def load_data(model_name, split):
    """`pruning_experiments.Data` of `--dataset` for the model; `split='val'`: validation
    (the last fifth of the training images; the test images are not touched)."""
    import numpy as np

    from pruning_experiments import Data
    from pruning_experiments import load_data as load_dataset

    data = load_dataset(FLAGS.dataset, FLAGS.train_examples, FLAGS.data_dir, seed=0)
    if model_name == "mobilenetv2":
        import tensorflow as tf

        def rgb32(x):  # in chunks: all of Fashion-MNIST at once would need ~1 GB more
            return np.concatenate([
                np.repeat(tf.image.resize(x[i:i + 5000], (32, 32)).numpy(), 3, axis=-1)
                for i in range(0, len(x), 5000)])

        data = Data(rgb32(data.x_train), data.y_train, rgb32(data.x_test), data.y_test,
                    data.dataset)
    return data.holdout(0.2) if split == "val" else data


def build(model_name):
    if model_name == "resnet8":
        from pruning_experiments import resnet_small

        return resnet_small((28, 28, 1), 10)
    if model_name == "mobilenetv2":
        import models

        return models.mobilenetv2(32, 10, alpha_width=0.35)
    raise ValueError(f"--models: unknown model {model_name!r}; use resnet8 or mobilenetv2.")


# --- training helpers ------------------------------------------------------------------


def _no_distillation(model):
    return model


def _distillation(dense, config):
    """`wrap(student) -> the model to fit`: a `tf_psp.Distiller` from a frozen copy of
    the pre-trained dense model when `config` has a `distill_weight`, else the student."""
    if not config.get("distill_weight"):
        return _no_distillation
    import tf_psp

    teacher = _copy(dense)
    teacher.trainable = False
    return lambda student: tf_psp.Distiller(student, teacher, temperature=config["temperature"],
                                            distill_weight=config["distill_weight"])


def _compile(model, optimizer, wrap=_no_distillation):
    """Compiles `wrap(model)` (the model itself, or a Distiller over it) and returns it."""
    import keras

    trainer = wrap(model)
    trainer.compile(optimizer=optimizer,
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"], jit_compile=False)
    return trainer


def _sgd(lr, epochs, data):
    import keras
    import numpy as np

    steps = FLAGS.steps_per_epoch or int(np.ceil(len(data.y_train) / FLAGS.batch_size))
    schedule = keras.optimizers.schedules.CosineDecay(lr, max(1, epochs * steps))
    return keras.optimizers.SGD(schedule, momentum=0.9)


def _fit(model, data, epochs, callbacks=()):
    if epochs <= 0:
        return
    x, y = data.x_train, data.y_train
    if FLAGS.steps_per_epoch:
        n = FLAGS.steps_per_epoch * FLAGS.batch_size
        x, y = x[:n], y[:n]
    model.fit(x, y, epochs=epochs, batch_size=FLAGS.batch_size, verbose=0, shuffle=True,
              callbacks=list(callbacks))


def _recalibrated(model, data):
    import tf_psp

    return tf_psp.recalibrate_batchnorm(model, data.x_train, batch_size=FLAGS.batch_size)


def _accuracy(model, data):
    import numpy as np

    logits = model.predict(data.x_test, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == data.y_test))


def _pretrained(model_name, data, seed, split):
    """The dense model pre-trained with Adam; weights cached per model, split and seed."""
    import keras

    path = os.path.join(FLAGS.out, "runs", f"pretrain_{model_name}_{split}_{seed}"
                        f"_{FLAGS.pretrain_epochs}_{FLAGS.steps_per_epoch}{_data_tag()}"
                        ".weights.h5")
    keras.utils.set_random_seed(seed)
    model = build(model_name)
    if os.path.exists(path):
        model.load_weights(path)
        return model
    _compile(model, keras.optimizers.Adam(1e-3))
    _fit(model, data, FLAGS.pretrain_epochs)
    tmp = path + ".tmp.weights.h5"
    model.save_weights(tmp)
    os.replace(tmp, path)
    return model


def _copy(model):
    import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _train_two_phase(model, data, config, callbacks, importance, keep, seed, wrap):
    """Sparse phase with `callbacks`, prune to budget with `importance`, shrink, fine-tune."""
    import tf_psp

    sparse_epochs = FLAGS.epochs - FLAGS.finetune_epochs
    _fit(_compile(model, _sgd(config["lr"], sparse_epochs, data), wrap), data, sparse_epochs,
         callbacks)
    model = _recalibrated(model, data)
    pruned = tf_psp.prune_to_budget(model, keep_macs=keep, importance=importance, seed=seed)
    return _finetune(tf_psp.strip_and_shrink(pruned), data, config, FLAGS.finetune_epochs, wrap)


def _finetune(small, data, config, epochs, wrap=_no_distillation):
    _fit(_compile(small, _sgd(config["lr"], epochs, data), wrap), data, epochs)
    return _recalibrated(small, data)


def run_method(model_name, method, keep, seed, config, data, split):
    """Trains one method from the pre-trained model; returns (final model, extra fields)."""
    import keras

    import tf_psp

    dense = _pretrained(model_name, data, seed, split)
    keras.utils.set_random_seed(seed + 1000)
    wrap = _distillation(dense, config)
    kd = "_kd" if method.endswith("_kd") else ""
    method = method.removesuffix("_kd")
    if method == "dense":
        model = _copy(dense)
        return _finetune(model, data, config, FLAGS.epochs), {}
    if method == "psp_budget":
        psp = tf_psp.parameterize(dense, coupling="group", alpha_regularizer=None)
        finetune = int(config.get("finetune", FLAGS.finetune_epochs))
        sparse_epochs = FLAGS.epochs - finetune
        trainer = _compile(psp, _sgd(config["lr"], sparse_epochs, data), wrap)
        budget = tf_psp.PruneToBudget(keep, decay_until=config.get("decay_until", 0.8))
        _fit(trainer, data, sparse_epochs, [budget])
        psp = _recalibrated(psp, data)
        small = tf_psp.strip_and_shrink(psp)
        pruned_accuracy = _accuracy(small, data)
        if finetune:
            small = _finetune(small, data, config, finetune, wrap)
        return small, {"accuracy_before_finetune": pruned_accuracy}
    if method == "l1_norm":
        small = tf_psp.strip_and_shrink(tf_psp.prune_to_budget(dense, keep, importance="l1"))
        return _finetune(small, data, config, FLAGS.epochs, wrap), {}
    if method == "random":
        small = tf_psp.strip_and_shrink(
            tf_psp.prune_to_budget(dense, keep, importance="random", seed=seed))
        return _finetune(small, data, config, FLAGS.epochs, wrap), {}
    if method == "network_slimming":
        callback = tf_psp.sparse_training.BatchNormL1(config["strength"])
        return _train_two_phase(_copy(dense), data, config, [callback], "bn", keep, seed,
                                wrap), {}
    if method == "group_lasso":
        callback = tf_psp.sparse_training.GroupLasso(config["strength"])
        return _train_two_phase(_copy(dense), data, config, [callback], "l2", keep, seed,
                                wrap), {}
    if method == "scratch":
        psp_config = (dict(DEFAULTS, **PSP_SCRATCH_REFERENCE, **(KD if kd else {}))
                      if split == "val" else best_config(model_name, "psp_budget" + kd, split))
        reference = _load_run(model_name, "psp_budget" + kd, keep, seed, split, psp_config)
        if reference is None:
            raise RuntimeError(f"scratch{kd} needs the psp_budget{kd} run of {model_name}, "
                               f"keep {keep}, seed {seed} first (--methods order).")
        shape_model = keras.saving.load_model(reference["model_path"])
        keras.utils.set_random_seed(seed)
        model = keras.models.clone_model(shape_model)  # fresh initialization
        _fit(_compile(model, keras.optimizers.Adam(1e-3), wrap), data, FLAGS.pretrain_epochs)
        return _finetune(model, data, config, FLAGS.epochs, wrap), {}
    raise ValueError(f"--methods: unknown method {method!r}.")


# --- cache and results -------------------------------------------------------------


def _key(model_name, method, keep, seed, split, config):
    cfg = "_".join(f"{k}{v:g}" for k, v in sorted(config.items()))
    return (f"{model_name}_{method}_k{keep:g}_s{seed}_{split}_{cfg}_p{FLAGS.pretrain_epochs}"
            f"_e{FLAGS.epochs}_f{FLAGS.finetune_epochs}_n{FLAGS.steps_per_epoch}{_data_tag()}")


def _load_run(model_name, method, keep, seed, split, config):
    path = os.path.join(FLAGS.out, "runs", _key(model_name, method, keep, seed, split, config)
                        + ".json")
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return None


def _write_json(path, data):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def best_config(model_name, method, split):
    """The searched setting with the best validation accuracy.

    Raises:
        ValueError: when --out holds no search file (or it has no run of
            `method`) and --use_defaults is not given.
    """
    if split == "val":
        return None
    path = os.path.join(FLAGS.out, f"search_{FLAGS.search_from or model_name}.json")
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            rows = [r for r in json.load(f)["runs"] if r["method"] == method]
    if rows:
        config = dict(max(rows, key=lambda r: (r["accuracy"], -r["config"]["lr"]))["config"])
    elif FLAGS.use_defaults:
        config = dict(DEFAULTS, **SEARCH[method][2])
    else:
        raise ValueError(
            f"{path} holds no searched setting of {method}: run the validation search first "
            "(--search), point --out or --search_from at one, or pass --use_defaults to use "
            "the built-in settings.")
    if FLAGS.lr_override and (FLAGS.search_from or not rows):
        config["lr"] = FLAGS.lr_override
    return config


def do_run(model_name, method, keep, seed, split, config, data):
    import keras

    import tf_psp

    cached = _load_run(model_name, method, keep, seed, split, config)
    if cached is not None:
        return cached
    start = time.time()
    model, extra = run_method(model_name, method, keep, seed, config, data, split)
    dense_macs = tf_psp.profile(build(model_name)).total_macs
    row = {"model": model_name, "method": method, "keep_macs": keep, "seed": seed,
           "macs_kept": tf_psp.profile(model).total_macs / dense_macs,
           "accuracy": _accuracy(model, data), "split": split, "config": config,
           "dataset": FLAGS.dataset, "train_examples": len(data.y_train),
           "test_examples": len(data.y_test),
           "seconds": round(time.time() - start, 1), **extra}
    key = _key(model_name, method, keep, seed, split, config)
    if method in ("psp_budget", "psp_budget_kd"):  # scratch(_kd) trains its architecture
        path = os.path.join(FLAGS.out, "runs", key + ".keras")
        model.save(path)
        row["model_path"] = path
    _write_json(os.path.join(FLAGS.out, "runs", key + ".json"), row)
    keras.backend.clear_session()
    print(f"{model_name} {method:<17} keep {keep:<5} seed {seed} {split} {config}: accuracy "
          f"{row['accuracy']:.4f}, MACs kept {row['macs_kept']:.3f} ({row['seconds']:.0f} s)",
          flush=True)
    return row


def _public(row):
    out = {k: row[k] for k in ("model", "method", "keep_macs", "seed", "macs_kept", "accuracy")}
    # runs cached before --dataset existed are MNIST-5k's, evaluated on its 1,000 test digits
    out["dataset"] = row.get("dataset", "mnist5k")
    out["test_examples"] = row.get("test_examples", 1000)
    if "accuracy_before_finetune" in row:
        out["accuracy_before_finetune"] = row["accuracy_before_finetune"]
    out["config"] = row["config"]
    return out


def collected_rows(model_name, search):
    """Every cached run of `model_name` under this protocol (several processes may
    write runs concurrently: the results are always rebuilt from the cache).

    Final runs: only those with each method's chosen setting (`best_config`).
    """
    import glob

    split = "val" if search else "test"
    suffix = (f"_p{FLAGS.pretrain_epochs}_e{FLAGS.epochs}_f{FLAGS.finetune_epochs}"
              f"_n{FLAGS.steps_per_epoch}{_data_tag()}.json")
    chosen = {}  # method -> its chosen setting (read once, not once per row)
    rows = []
    for path in sorted(glob.glob(os.path.join(FLAGS.out, "runs", f"{model_name}_*{suffix}"))):
        with open(path) as f:
            row = json.load(f)
        if row["split"] != split or row["method"] not in SEARCH:
            continue
        if not search:
            if row["method"] not in chosen:
                chosen[row["method"]] = best_config(model_name, row["method"], split)
            if row["config"] != chosen[row["method"]]:
                continue
        rows.append(row)
    order = {m: k for k, m in enumerate(SEARCH)}
    rows.sort(key=lambda r: (order[r["method"]], -r["keep_macs"], r["seed"]))
    return rows


def write_results(model_name, search):
    import numpy as np

    rows = collected_rows(model_name, search)
    name = f"search_{model_name}" if search else model_name
    _write_json(os.path.join(FLAGS.out, name + ".json"),
                {"protocol": {"pretrain_epochs": FLAGS.pretrain_epochs, "epochs": FLAGS.epochs,
                              "finetune_epochs": FLAGS.finetune_epochs,
                              "batch_size": FLAGS.batch_size,
                              "split": "validation" if search else "test",
                              "dataset": FLAGS.dataset,
                              "train_examples": FLAGS.train_examples or None},
                 "runs": [_public(r) for r in rows]})
    if search:
        return
    methods = [m for m in FLAGS.methods if any(r["method"] == m for r in rows)]
    budgets = sorted({r["keep_macs"] for r in rows}, reverse=True)
    lines = ["| method | " + " | ".join(f"keep {b:g}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for m in methods:
        cells = []
        for b in budgets:
            acc = [r["accuracy"] for r in rows if r["method"] == m and r["keep_macs"] == b]
            kept = [r["macs_kept"] for r in rows if r["method"] == m and r["keep_macs"] == b]
            cells.append(f"{100 * np.mean(acc):.2f} ± {100 * np.std(acc):.2f} "
                         f"(n={len(acc)}, MACs {np.mean(kept):.3f})" if acc else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    with open(os.path.join(FLAGS.out, f"{model_name}.md"), "w") as f:
        f.write(f"Test accuracy % (mean ± sd over seeds), {model_name} on "
                f"{DATASET_NAMES[FLAGS.dataset]}\n\n"
                + "\n".join(lines) + "\n")
    _plot(model_name, rows, methods)


def _plot(model_name, rows, methods):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(6, 4))
    for m in methods:
        mine = [r for r in rows if r["method"] == m]
        budgets = sorted({r["keep_macs"] for r in mine})
        xs = [np.mean([r["macs_kept"] for r in mine if r["keep_macs"] == b]) for b in budgets]
        ys = [100 * np.mean([r["accuracy"] for r in mine if r["keep_macs"] == b])
              for b in budgets]
        ax.plot(xs, ys, "o-" if len(xs) > 1 else "s", label=m)
    ax.set_xlabel("MACs kept (fraction of dense)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model_name}, {DATASET_NAMES[FLAGS.dataset]}: accuracy at a MAC budget")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    tmp = os.path.join(FLAGS.out, f"{model_name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, os.path.join(FLAGS.out, f"{model_name}.png"))
    plt.close(fig)


def main(argv):
    del argv
    if FLAGS.finetune_epochs >= FLAGS.epochs:
        raise app.UsageError("--finetune_epochs must be smaller than --epochs.")
    if FLAGS.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    if FLAGS.out is None:
        FLAGS.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                 "budget" if FLAGS.dataset == "mnist5k"
                                 else f"budget_{FLAGS.dataset}")
    os.makedirs(os.path.join(FLAGS.out, "runs"), exist_ok=True)
    if not FLAGS.search and not FLAGS.pretrain_only:
        for model_name in FLAGS.models:  # a missing search file: refused before any training
            for method in FLAGS.methods:
                try:
                    best_config(model_name, method, "test")
                except ValueError as error:
                    raise app.UsageError(str(error)) from error
    for model_name in FLAGS.models:
        split = "val" if FLAGS.search else "test"
        data = load_data(model_name, split)
        seeds = [0] if FLAGS.search else [int(s) for s in FLAGS.seeds]
        if FLAGS.pretrain_only:
            for seed in seeds:
                _pretrained(model_name, data, seed, split)
            continue
        budgets = [SEARCH_BUDGET] if FLAGS.search else [float(b) for b in FLAGS.budgets]
        jobs = []
        for seed in seeds:  # complete seed blocks first, so a partial sweep is balanced
            if "dense" in FLAGS.methods:
                jobs.append(("dense", 1.0, seed))
            jobs += [(m, keep, seed) for keep in budgets for m in FLAGS.methods if m != "dense"]
        for method, keep, seed in jobs:
            configs = ([dict(DEFAULTS, **c) for c in SEARCH[method]] if FLAGS.search
                       else [best_config(model_name, method, split)])
            for config in configs:
                do_run(model_name, method, keep, seed, split, config, data)
                write_results(model_name, FLAGS.search)


if __name__ == "__main__":
    app.run(main)
