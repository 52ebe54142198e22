"""Accuracy against measured latency: PSP to a latency budget vs PSP to a MAC budget (MNIST-5k).

The budget experiment's protocol (examples/budget_front.py: the same models,
pre-trained dense models, epochs and PSP settings, its validation search's
choice for `psp_budget`), with two methods at each latency budget `k` in
`--latency_budgets`:

- `psp_latency`: `PruneToBudget(keep_latency=k)` with the model's latency
  table (TFLite/XNNPACK, 1 thread, measured on this machine);
- `psp_macs`: `PruneToBudget(keep_macs=m)`, `m` chosen so that the table
  predicts the same latency `k` for the MAC-budget selection at the start of
  training (a MAC budget matched to the same latency).

Every shrunk model and its dense model are then exported to TFLite and
timed in one interleaved run (`--measure`, medians of `--measure_runs`), so
accuracy is compared at the latency measured, not predicted. Runs are cached
in `--front_out/runs/`; results go to `--front_out/<model>.json/.md/.png`.

    python examples/latency_front.py --models=resnet8 --seeds=0,1
    python examples/latency_front.py --models=resnet8 --seeds=0,1 --measure
"""

import json
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import budget_front as bf  # noqa: E402

FLAGS = flags.FLAGS
FLAGS.set_default("models", ["resnet8"])
FLAGS.set_default("seeds", ["0", "1"])
FLAGS.set_default("pretrain_epochs", 6)  # the budget experiment's final protocol
FLAGS.set_default("epochs", 6)
FLAGS.set_default("finetune_epochs", 0)  # PSP's searched setting: no separate fine-tuning
flags.DEFINE_list("latency_budgets", ["0.7", "0.5", "0.3"], "keep_latency values.")
flags.DEFINE_string("front_out", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                              "results", "latency_front"), "Output directory.")
flags.DEFINE_boolean("measure", False, "Time every cached run's model and write the results.")
flags.DEFINE_integer("measure_runs", 100, "Interleaved timing rounds of --measure.")
flags.DEFINE_string("split", "test", "'val': the validation split (for choosing settings).")
flags.DEFINE_float("latency_exponent", None,
                   "tf_psp.plan.LATENCY_EXPONENT for psp_latency (None: the library's).")
METHODS = ("psp_latency", "psp_macs")


def _table(model_name, dense):
    import tf_psp

    return tf_psp.latency_table(dense, progress=False)


def _macs_for_latency(psp, keep, table):
    """keep_macs whose MAC-budget selection (importance 'alpha') the table predicts at `keep`."""
    import tf_psp

    plan = tf_psp.pruning_plan(psp)
    dense = table.predict_widths({})
    lo, hi = 0.01, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        try:
            units = plan.select(mid)
        except ValueError:
            lo = mid
            continue
        if plan.kept_latency(units, table) / dense > keep:
            hi = mid
        else:
            lo = mid
    return lo


def _run_path(model_name, method, keep, seed):
    exponent = ("" if FLAGS.latency_exponent is None or method != "psp_latency"
                else f"_x{FLAGS.latency_exponent:g}")
    split = "" if FLAGS.split == "test" else f"_{FLAGS.split}"
    return os.path.join(FLAGS.front_out, "runs",
                        f"{model_name}_{method}_k{keep:g}_s{seed}_p{FLAGS.pretrain_epochs}"
                        f"_e{FLAGS.epochs}_n{FLAGS.steps_per_epoch}{exponent}{split}")


def run(model_name, method, keep, seed, data):
    import keras

    import tf_psp

    base = _run_path(model_name, method, keep, seed)
    if os.path.exists(base + ".json"):
        with open(base + ".json") as f:
            return json.load(f)
    start = time.time()
    config = bf.best_config(model_name, "psp_budget", "test")
    dense = bf._pretrained(model_name, data, seed, FLAGS.split)
    table = _table(model_name, dense)
    keras.utils.set_random_seed(seed + 1000)
    psp = tf_psp.parameterize(dense, coupling="group", alpha_regularizer=None)
    finetune = int(config.get("finetune", FLAGS.finetune_epochs))
    epochs = FLAGS.epochs - finetune
    if epochs < 1:
        raise ValueError(f"--epochs={FLAGS.epochs} leaves no budget-training epoch after "
                         f"{finetune} fine-tuning epochs.")
    bf._compile(psp, bf._sgd(config["lr"], epochs, data))
    extra = {}
    if method == "psp_latency":
        budget = tf_psp.PruneToBudget(keep_latency=keep, latency_table=table,
                                      decay_until=config.get("decay_until", 0.5))
    else:
        extra["keep_macs"] = _macs_for_latency(psp, keep, table)
        budget = tf_psp.PruneToBudget(extra["keep_macs"],
                                      decay_until=config.get("decay_until", 0.5))
    bf._fit(psp, data, epochs, [budget])
    small = tf_psp.strip_and_shrink(bf._recalibrated(psp, data))
    if finetune:
        small = bf._finetune(small, data, config, finetune)
    row = {"model": model_name, "method": method, "keep_latency": keep, "seed": seed,
           "config": config, "accuracy": bf._accuracy(small, data),
           "macs_kept": tf_psp.profile(small).total_macs / tf_psp.profile(dense).total_macs,
           "predicted_latency": table.predict(small) / table.predict(dense),
           "seconds": round(time.time() - start, 1), **extra}
    os.makedirs(os.path.dirname(base), exist_ok=True)
    small.save(base + ".keras")
    dense.save(base + "_dense.keras")
    row["model_path"] = base + ".keras"
    bf._write_json(base + ".json", row)
    keras.backend.clear_session()
    print(f"{model_name} {method:<12} keep_latency {keep} seed {seed}: accuracy "
          f"{row['accuracy']:.4f}, MACs {row['macs_kept']:.3f}, predicted latency "
          f"{row['predicted_latency']:.3f} ({row['seconds']:.0f} s)", flush=True)
    return row


def measure(model_name, rows):
    """Measured latency of every run's model relative to its dense model, one interleaved run."""
    import tempfile

    import keras

    from tf_psp import bench, export

    with tempfile.TemporaryDirectory(prefix="latency_front_") as tmp:
        timers = {}
        for k, row in enumerate(rows):
            for tag, path in (("small", row["model_path"]),
                              ("dense", row["model_path"][:-6] + "_dense.keras")):
                key = (k, tag) if tag == "small" else ("dense", row["seed"])
                if key in timers:
                    continue
                out = os.path.join(tmp, f"{k}_{tag}.tflite")
                export.export_tflite(keras.saving.load_model(path), out)
                timers[key] = bench.tflite_timer(out)
        medians = bench.interleaved(timers, rounds=FLAGS.measure_runs)
    for k, row in enumerate(rows):
        row["measured_latency"] = medians[(k, "small")] / medians[("dense", row["seed"])]
    return rows


def write_results(model_name, rows):
    import numpy as np

    from tf_psp import atomic

    lines = ["| keep_latency | method | seeds | accuracy (mean) | kept MACs | predicted latency | "
             "measured latency |", "|---|---|---|---|---|---|---|"]
    summary = []
    for keep in sorted({r["keep_latency"] for r in rows}, reverse=True):
        for method in METHODS:
            group = [r for r in rows if r["keep_latency"] == keep and r["method"] == method]
            if not group:
                continue
            s = {"keep_latency": keep, "method": method, "seeds": len(group),
                 **{f: float(np.mean([r[f] for r in group])) for f in (
                     "accuracy", "macs_kept", "predicted_latency", "measured_latency")}}
            summary.append(s)
            lines.append(f"| {keep} | {method} | {s['seeds']} | {s['accuracy']:.2%} | "
                         f"{s['macs_kept']:.3f} | {s['predicted_latency']:.3f} | "
                         f"{s['measured_latency']:.3f} |")
    os.makedirs(FLAGS.front_out, exist_ok=True)
    base = os.path.join(FLAGS.front_out, model_name)
    atomic.write_bytes(base + ".json", json.dumps(
        {"protocol": {"pretrain_epochs": FLAGS.pretrain_epochs, "epochs": FLAGS.epochs,
                      "runtime": "tflite", "threads": 1},
         "summary": summary,
         "runs": [{k: v for k, v in r.items() if k != "model_path"} for r in rows]},
        indent=1).encode())
    atomic.write_bytes(base + ".md", ("\n".join(lines) + "\n").encode())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for method, marker in zip(METHODS, "os"):
        pts = [r for r in rows if r["method"] == method]
        ax.scatter([r["measured_latency"] for r in pts], [r["accuracy"] * 100 for r in pts],
                   marker=marker, label=method)
    ax.set_xlabel("measured latency / dense (TFLite, 1 thread)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model_name}, MNIST-5k")
    ax.legend()
    with atomic.temp_file_beside(base + ".png", suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    print("\n".join(lines))


def main(argv):
    del argv
    if FLAGS.threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.threads)
    os.makedirs(os.path.join(FLAGS.out, "runs"), exist_ok=True)
    for model_name in FLAGS.models:
        data = bf.load_data(model_name, FLAGS.split)
        if FLAGS.latency_exponent is not None:
            import tf_psp

            tf_psp.plan.LATENCY_EXPONENT = FLAGS.latency_exponent
        rows = [run(model_name, method, float(keep), int(seed), data)
                for seed in FLAGS.seeds for keep in FLAGS.latency_budgets for method in METHODS]
        if FLAGS.measure:
            write_results(model_name, measure(model_name, rows))


if __name__ == "__main__":
    app.run(main)
