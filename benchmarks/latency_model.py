"""Does the latency cost model predict what a shrunk model really costs?

    .venv/bin/python benchmarks/latency_model.py                      # 3 models, ~15 min
    .venv/bin/python benchmarks/latency_model.py --models=mobilenetv2 --variants=5
    .venv/bin/python benchmarks/latency_model.py --runtime=onnxruntime   # or --quantization=int8

For each model (random weights, BatchNorm statistics randomized as in
benchmarks/latency.py): build its latency table (`tf_psp.latency_table`,
`--runtime` TFLite/XNNPACK or ONNX Runtime, `--quantization`, `--threads`),
then make `--variants` random shrunk variants:
variant `i` is `prune_to_budget(model, keep_macs=U(0.25, 0.95),
importance='random', seed=i, round_to=r)` with `r` drawn from {1, 8, 16},
then `strip_and_shrink`. Every variant and the dense model are converted for
the runtime (as the table converts whole models) and timed in one interleaved
run, as the table times: the fastest of
`--runs` rounds of the invoking thread's CPU time (`--threads=1`; wall clock
otherwise), which does not move with other work on the machine (wall-clock
medians are recorded too); the table's prediction is compared with that. Tables are
built from an empty cache (a new `--cache_dir` per run unless given); with
`--busy_during_build` another process keeps one core busy while they are. For
reference, the MAC proxy (dense latency x kept MAC fraction) is scored the same way.

Errors are |predicted - measured| / measured, for the absolute latency and
for the speed-up (the prediction relative to the table's dense prediction,
times the dense latency measured in the same run: what budgets use).
Writes latency_model.json and latency_model.md (and a predicted-vs-measured
plot, latency_model.png) to --output_dir, suffixed with the runtime unless float
TFLite (latency_model_onnxruntime.md, latency_model_tflite-int8.md).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import latency as latency_bench  # noqa: E402

FLAGS = flags.FLAGS
# --models, --runs and --output_dir are benchmarks/latency.py's flags, with other defaults.
FLAGS.set_default("models", ["mobilenetv2", "resnet56", "efficientnetb0"])
FLAGS.set_default("runs", 30)
flags.DEFINE_integer("variants", 20, "Random shrunk variants per model.")
flags.DEFINE_integer("threads", 1, "Runtime threads.")
flags.DEFINE_enum("runtime", "tflite", ["tflite", "onnxruntime"], "Runtime of the tables and "
                  "of the timed models.")
flags.DEFINE_enum("quantization", "none", ["none", "int8"], "Number format (int8: full-"
                  "integer TFLite, calibrated on random inputs).")
flags.DEFINE_string("cache_dir", None, "Latency point cache (default: a new empty one, so "
                    "the table build time is from an empty cache).")
flags.DEFINE_bool("busy_during_build", False, "Keep one core busy (a nice'd python loop in "
                  "another process) while each table is built, not while the variants are "
                  "timed: does a table built under load still predict?")


def build(name):
    import keras

    if name == "mobilenetv2":
        model = latency_bench.mobilenetv2()
    elif name == "resnet56":
        model = latency_bench.MODELS["resnet56"]()
    elif name == "efficientnetb0":
        model = keras.applications.EfficientNetB0(weights=None, input_shape=(224, 224, 3),
                                                  classifier_activation=None)
    else:
        raise ValueError(f"unknown model {name!r}")
    latency_bench.randomize_batchnorm(model, 0)
    return model


def quantization():
    return None if FLAGS.quantization == "none" else FLAGS.quantization


def result_name(name):
    """`name`, suffixed with the runtime and number format unless float TFLite."""
    from tf_psp import latency_targets

    label = latency_targets.target(FLAGS.runtime, FLAGS.threads, quantization()).label
    return name if label == "tflite" else f"{name}_{label}"


def build_table(model, cache_dir):
    import tf_psp

    return tf_psp.latency_table(model, runtime=FLAGS.runtime, threads=FLAGS.threads,
                                quantization=quantization(), cache_dir=cache_dir)


def deploy(model, stem):
    """`model` as the runtime's file (`stem` + suffix), converted as the latency table converts
    whole models (TFLite: the converter's graph route, 2 s for MobileNetV2-224 where
    `export_tflite`'s SavedModel takes 15 s; int8 calibrated on random inputs; ONNX:
    tf2onnx with NHWC inputs, as `export_onnx`); returns the path."""
    from tf_psp import atomic, latency_targets

    if FLAGS.runtime == "onnxruntime":
        path = stem + ".onnx"
        content = latency_targets.convert_onnx([model]).SerializeToString()
    else:
        path = stem + ".tflite"
        content = latency_targets.convert_function([model], quantization())
    atomic.write_bytes(path, content)
    return path


def timer(path, cpu_time=False):
    from tf_psp import bench

    if path.endswith(".onnx"):
        return bench.onnx_timer(path, threads=FLAGS.threads, cpu_time=cpu_time)
    return bench.tflite_timer(path, num_threads=FLAGS.threads, cpu_time=cpu_time)


def measure_model(name, work_dir):
    import numpy as np

    import tf_psp
    from tf_psp import bench

    model = build(name)
    log = latency_bench.log
    log(f"{name}: latency table")
    cache_dir = FLAGS.cache_dir or os.path.join(work_dir, "cache")
    busy = None
    if FLAGS.busy_during_build:
        busy = subprocess.Popen(["nice", sys.executable, "-c", "while True: pass"])
    try:
        table = build_table(model, cache_dir)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    log(f"{name}: table in {table.build_seconds:.0f} s, quantum {table.quantum}, "
        f"dense {table.dense_seconds * 1e3:.2f} ms, fixed {table.fixed_seconds * 1e3:.2f} ms")
    dense_macs = tf_psp.profile(model).total_macs
    rng = np.random.default_rng(0)
    variants = []
    dense_path = deploy(model, os.path.join(work_dir, f"{name}_dense"))
    for i in range(FLAGS.variants):
        keep = float(rng.uniform(0.25, 0.95))
        round_to = int(rng.choice([1, 8, 16]))
        try:
            pruned = tf_psp.prune_to_budget(model, keep_macs=keep, importance="random",
                                            seed=i, round_to=round_to)
        except ValueError:  # rounding to the quantum cannot go that low (ResNet-56: 16)
            round_to = 1
            pruned = tf_psp.prune_to_budget(model, keep_macs=keep, importance="random",
                                            seed=i, round_to=round_to)
        shrunk = tf_psp.strip_and_shrink(pruned, round_to=round_to)
        path = deploy(shrunk, os.path.join(work_dir, f"{name}_v{i}"))
        variants.append({"variant": i, "keep_macs_target": keep, "round_to": round_to,
                         "kept_macs": tf_psp.profile(shrunk).total_macs / dense_macs,
                         "predicted_s": table.predict(shrunk), "path": path})
        log(f"{name}: variant {i} keep {keep:.2f} round_to {round_to}")
    paths = {"dense": dense_path, **{v["variant"]: v["path"] for v in variants}}
    cpu = FLAGS.threads == 1  # the table's clock: CPU time of the invoking thread
    timers = {k: timer(p, cpu_time=cpu) for k, p in paths.items()}
    _, samples = bench.interleaved(timers, rounds=FLAGS.runs, return_samples=True)
    fastest = {k: min(v) for k, v in samples.items()}  # robust to other work, as the table
    walls = {k: timer(p) for k, p in paths.items()}
    medians = bench.interleaved(walls, rounds=FLAGS.runs)  # wall-clock medians, for the record
    dense = fastest["dense"]
    predicted_dense = table.predict(model)
    for v in variants:
        v["measured_s"] = fastest[v["variant"]]
        v["measured_wall_median_s"] = medians[v["variant"]]
        v["error"] = abs(v["predicted_s"] - v["measured_s"]) / v["measured_s"]
        # the speed-up predicted against the one measured (both relative to dense)
        v["ratio_error"] = abs(v["predicted_s"] / predicted_dense * dense
                               - v["measured_s"]) / v["measured_s"]
        v["mac_proxy_error"] = abs(dense * v["kept_macs"] - v["measured_s"]) / v["measured_s"]
        del v["path"]
    errors = [v["error"] for v in variants]
    proxy = [v["mac_proxy_error"] for v in variants]
    ratios = [v["ratio_error"] for v in variants]
    return {
        "model": name, "target": table.describe(), "table_seconds": table.build_seconds,
        "quantum": table.quantum,
        "busy_during_build": FLAGS.busy_during_build, "load_before": os.getloadavg()[0],
        "layers": len(table.layers), "dense_measured_s": dense,
        "dense_table_s": table.dense_seconds, "dense_wall_median_s": medians["dense"],
        "median_error": float(np.median(errors)), "worst_error": float(np.max(errors)),
        "ratio_median_error": float(np.median(ratios)), "ratio_worst_error": float(np.max(ratios)),
        "mac_proxy_median_error": float(np.median(proxy)),
        "mac_proxy_worst_error": float(np.max(proxy)), "variants": variants,
    }


def markdown(results):
    lines = ["| model | table build (s) | quantum | variants | median error | worst error | "
             "speed-up median error | speed-up worst error | MAC proxy median | MAC proxy worst |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['model']} | {r['table_seconds']:.0f} | {r['quantum']} | {len(r['variants'])} "
            f"| {r['median_error']:.1%} | {r['worst_error']:.1%} | "
            f"{r['ratio_median_error']:.1%} | {r['ratio_worst_error']:.1%} | "
            f"{r['mac_proxy_median_error']:.1%} | {r['mac_proxy_worst_error']:.1%} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tf_psp import atomic

    fig, ax = plt.subplots(figsize=(5, 5))
    top = 0.0
    for r in results:
        xs = [v["measured_s"] * 1e3 for v in r["variants"]]
        ys = [v["predicted_s"] * 1e3 for v in r["variants"]]
        ax.scatter(xs, ys, label=r["model"], s=14)
        top = max(top, *xs, *ys)
    ax.plot([0, top], [0, top], "k--", lw=0.8)
    ax.set_xlabel("measured latency (ms)")
    ax.set_ylabel("predicted latency (ms)")
    ax.set_title(f"latency cost model, {results[0].get('target', 'tflite, 1 thread(s)')}")
    ax.legend()
    with atomic.temp_file_beside(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def run_models(name, measure, render):
    """Measures each of --models with `measure(model, work_dir)` into `<name>.json` (saved
    after every model; models measured by an earlier run are kept) and `<name>.md`
    (`render(results)`); returns the results."""
    from tf_psp import atomic

    os.makedirs(FLAGS.output_dir, exist_ok=True)
    out_json = os.path.join(FLAGS.output_dir, f"{name}.json")
    results = []
    if os.path.exists(out_json):
        with open(out_json, encoding="utf-8") as f:
            results = [r for r in json.load(f)["results"] if r["model"] not in FLAGS.models]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix=f"{name}_") as work_dir:
        for model in FLAGS.models:
            results.append(measure(model, work_dir))
            atomic.write_bytes(out_json, json.dumps(
                {"threads": FLAGS.threads, "runtime": FLAGS.runtime,
                 "quantization": quantization(), "runs": FLAGS.runs, "results": results},
                indent=1).encode())
    atomic.write_bytes(os.path.join(FLAGS.output_dir, f"{name}.md"), render(results).encode())
    print(render(results))
    print(f"total {time.time() - started:.0f} s")
    return results


def main(argv):
    del argv
    name = result_name("latency_model")
    results = run_models(name, measure_model, markdown)
    plot(results, os.path.join(FLAGS.output_dir, f"{name}.png"))


if __name__ == "__main__":
    app.run(main)
