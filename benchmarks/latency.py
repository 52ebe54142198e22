"""Latency of dense vs shrunk models: does a MAC reduction become a speed-up?

    .venv/bin/python benchmarks/latency.py                 # full run, ~10 min on 2 cores
    .venv/bin/python benchmarks/latency.py --quick --models=tiny --output_dir=/tmp/lat

Models: MobileNetV2 (keras.applications, alpha 1.0, 224x224x3) and a CIFAR
ResNet-56 (3 stages x 9 basic blocks, 16/32/64 filters, 32x32x3, 1x1 projection
shortcuts where the shape changes). Weights are random (seed 0) and
BatchNormalization statistics are randomized to sane values (gamma in
[0.5, 1.5], beta and mean ~ N(0, 0.2), variance in [0.5, 2]) instead of the
(0, 1) defaults, so activations neither vanish nor explode.

Pruning pattern (deterministic, no training). Every model is parameterized
with `structure='channel'` (one alpha per input channel of each layer). For a
fraction `f`, the same for every layer:

- *independent*: each PSP layer zeroes the alphas of the `round(f * C_in)`
  input channels whose kernel slice has the smallest L1 norm (ties: lower
  index first). Layers reading the model input are left alone (its channels
  cannot be removed).
- *coupled*: as *independent*, except for channels of residual streams
  (channel groups tied by an `Add`). There every consumer of the stream zeroes
  the *same* channels, ranked by the sum over consumers of their kernel-slice
  L1 norms, because a residual channel can only be removed when every layer
  reading it agrees. Independent choices leave residual streams at full width.

`--patterns=auto` (the default) uses *independent* when it reaches every
target MAC reduction and *coupled* otherwise; the JSON records which.
For each target MAC reduction (25/50/75 %) and each `round_to` (1 and 8,
`strip_and_shrink(..., round_to=...)`), `f` is found by bisection on the MAC
count measured on the shrunk model (`tf_psp.profile(shrunk).total_macs`
against the dense model). Keras's width-multiplier MobileNetV2 (alpha 0.75,
0.5, same input size) is timed beside them as the hand-designed reference.

Timing (batch 1, one fixed random input): each runtime times the dense model
and every variant of a model in one interleaved run (dense, v1, v2, ..., dense,
v1, ...) and reports medians: TFLite through the LiteRT interpreter (XNNPACK)
with 1 and 2 threads, ONNX Runtime CPU with 1 thread, Keras on TensorFlow
(`tf.function`, `jit_compile=False`: XLA is slower on these CPUs; TF's default
threads), and `litert-benchmark` (1 thread; rounds of one process per model,
median of the per-process medians) when it is installed.

Reported per variant: MAC reduction (dense MACs / shrunk MACs), speed-up
(dense median / variant median), speed-up fidelity (speed-up / MAC reduction;
1.0 is ideal), parameters, file sizes, and the max relative error of the shrunk
model against the PSP model. Writes latency.json, latency.md and latency.png
to --output_dir (each written to a temporary file, then renamed).
"""

import datetime
import importlib.metadata
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

# The model zoo of the examples (examples/models.py) builds the CIFAR ResNet.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "examples"))
import models  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("models", ["mobilenetv2", "resnet56"],
                  "Models to measure: mobilenetv2, resnet56, tiny.")
flags.DEFINE_list("targets", ["0.25", "0.5", "0.75"], "Target MAC reductions (fractions).")
flags.DEFINE_list("round_to", ["1", "8"], "round_to values of strip_and_shrink.")
flags.DEFINE_list("patterns", ["auto"],
                  "Pruning patterns: auto, independent, coupled (see the module docstring).")
flags.DEFINE_list("width_multipliers", ["0.75", "0.5"],
                  "Keras MobileNetV2 alphas timed as the hand-designed reference.")
flags.DEFINE_list("runtimes", ["tflite", "onnx", "keras", "litert_benchmark"],
                  "Runtimes: tflite, onnx, keras, litert_benchmark.")
flags.DEFINE_list("tflite_threads", ["1", "2"], "LiteRT interpreter thread counts.")
flags.DEFINE_integer("runs", 300, "Timed runs per model (TFLite, ONNX Runtime).")
flags.DEFINE_integer("keras_runs", 60, "Timed runs per model (Keras).")
flags.DEFINE_integer("warmup", 20, "Untimed interleaved rounds first.")
flags.DEFINE_integer("litert_rounds", 5, "litert-benchmark: processes per model.")
flags.DEFINE_integer("litert_runs", 50, "litert-benchmark: timed runs per process.")
flags.DEFINE_integer("bisection_steps", 10, "Bisection steps on the pruned fraction.")
flags.DEFINE_float("tolerance", 0.005, "Accepted |MAC reduction - target| (fraction).")
flags.DEFINE_integer("seed", 0, "Seed of weights, BN statistics and the probe.")
flags.DEFINE_string("output_dir", "benchmarks/results", "Where JSON, markdown and PNG go.")
flags.DEFINE_string("name", "latency", "Base name of the written files (<name>.json ...).")
flags.DEFINE_string("work_dir", None, "Where .tflite/.onnx files go (default: a temp dir).")
flags.DEFINE_string("render_from", None,
                    "Only re-render <name>.md and <name>.png from this JSON (no measuring).")
flags.DEFINE_bool("quick", False,
                  "Smoke-test mode: few runs, one target, short bisection, no litert-benchmark.")

GOAL_FIDELITY = 0.9  # TFLite 1 thread, 50 % fewer MACs, MobileNetV2
# Reference points from PSP.md section 3 (same 2-core machines): (MAC reduction, speed-up).
REFERENCES = {
    "tflite_1t": {
        "Keras width multiplier MobileNetV2 (PSP.md)": [(1.44, 1.29), (3.10, 2.55)],
    },
    "onnx_1t": {
        "Torch-Pruning ResNet-56 (PSP.md)": [(2.10, 0.94), (3.94, 2.42)],
        "Torch-Pruning MobileNetV2 (PSP.md)": [(1.94, 0.97), (3.44, 2.48)],
    },
}
REFERENCE_MARKERS = {
    "Keras width multiplier MobileNetV2 (PSP.md)": "P",
    "Torch-Pruning ResNet-56 (PSP.md)": "x",
    "Torch-Pruning MobileNetV2 (PSP.md)": "+",
}
RUNTIME_LABELS = {
    "tflite_1t": "TFLite 1 thread",
    "tflite_2t": "TFLite 2 threads",
    "onnx_1t": "ONNX Runtime 1 thread",
    "keras": "Keras (TF CPU)",
    "litert_benchmark_1t": "litert-benchmark 1 thread",
}


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- models -------------------------------------------------------------------


def randomize_batchnorm(model, seed):
    """Sane, non-trivial BatchNorm parameters and statistics (in place)."""
    import keras
    import numpy as np

    import tf_psp

    rng = np.random.default_rng(seed)
    for layer in tf_psp.compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0.0, 0.2, c),
                               rng.normal(0.0, 0.2, c), rng.uniform(0.5, 2.0, c)])


def mobilenetv2(alpha=1.0):
    """keras.applications MobileNetV2 at 224x224, random weights, logits out."""
    import keras

    return keras.applications.MobileNetV2(
        input_shape=(224, 224, 3), alpha=alpha, weights=None, classifier_activation=None
    )


def tiny():
    """A small residual CNN on 32x32x3 for smoke tests."""
    import keras

    L = keras.layers
    inputs = keras.Input((32, 32, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", name="c1")(inputs)
    x = L.ReLU()(L.BatchNormalization()(x))
    x = L.Conv2D(32, 3, strides=2, padding="same", name="c2")(x)
    x = L.ReLU()(L.BatchNormalization()(x))
    y = L.Conv2D(32, 3, padding="same", name="c3")(x)
    y = L.ReLU()(L.BatchNormalization()(y))
    y = L.Conv2D(32, 3, padding="same", name="c4")(y)
    x = L.ReLU()(L.Add()([x, L.BatchNormalization()(y)]))
    x = L.Conv2D(64, 1, name="c5")(x)
    x = L.GlobalAveragePooling2D()(L.ReLU()(x))
    return keras.Model(inputs, L.Dense(10, name="fc")(x), name="tiny")


MODELS = {
    "mobilenetv2": lambda: mobilenetv2(1.0),
    # glorot_uniform (Keras's default): the weights benchmarks/README.md was measured with.
    "resnet56": lambda: models.resnet_cifar(56, kernel_initializer="glorot_uniform"),
    "tiny": tiny,
}


# --- the pruning pattern --------------------------------------------------------


class Pattern:
    """Deterministic channel pruning of a PSP model at a fraction `f`.

    Holds, per PSP layer, the L1 norm of each input channel's kernel slice and,
    for the coupled pattern, the summed score of the residual group the layer
    reads (see the module docstring).
    """

    def __init__(self, psp_model):
        import keras
        import numpy as np

        import tf_psp

        self.model = psp_model
        # the public pruning plan: which channel group each input channel of a layer is
        plan = tf_psp.pruning_plan(psp_model)
        unit_of = {(name, c): u for u in plan.units for name, c in u.reads}
        self.layers = []  # (layer, l1 per input channel, space key or None)
        self.skipped = []
        sums = {}
        for layer in tf_psp.compat.flatten_layers(psp_model):
            if not tf_psp.is_psp_layer(layer):
                continue
            if layer.structure != "channel":
                raise ValueError(f"layer '{layer.name}': expected structure 'channel', "
                                 f"got {layer.structure!r}.")
            kernel = np.abs(keras.ops.convert_to_numpy(getattr(layer, layer._alpha_kernel_name)))
            units = [unit_of.get((layer.name, c)) for c in range(kernel.shape[-2])]
            if any(u is None for u in units):
                self.skipped.append(layer.name)  # reads the model input: not removable
                continue
            l1 = np.moveaxis(kernel, -2, 0).reshape(kernel.shape[-2], -1).sum(axis=1)
            # a residual stream: channels written by several producers tied by Add
            key = tuple(u.index for u in units) if all(len(u.writes) > 1 for u in units) else None
            if key is not None:
                sums[key] = sums.get(key, 0.0) + l1
            self.layers.append((layer, l1, key))
        self.group_scores = sums
        self.residual_consumers = sum(1 for _, _, key in self.layers if key is not None)

    def apply(self, fraction, coupled):
        """Sets every PSP layer's alphas: 0 for the pruned channels, 1 otherwise."""
        import numpy as np

        for layer, l1, key in self.layers:
            scores = self.group_scores[key] if (coupled and key is not None) else l1
            n = scores.size
            k = min(int(round(fraction * n)), n - 1)
            alpha = np.ones(n, np.float32)
            alpha[np.argsort(scores, kind="stable")[:k]] = 0.0
            layer.alpha.assign(alpha.reshape(layer.alpha.shape))


def shrink_at(pattern, fraction, coupled, round_to, dense_macs):
    import tf_psp

    pattern.apply(fraction, coupled)
    shrunk = tf_psp.strip_and_shrink(pattern.model, round_to=round_to)
    macs = tf_psp.profile(shrunk).total_macs
    return shrunk, macs, 1.0 - macs / dense_macs


def search_fraction(pattern, target, coupled, round_to, dense_macs, steps, tolerance):
    """Bisection on f so that the measured MAC reduction hits `target`.

    Returns (fraction, shrunk model, macs, reduction, reached).
    """
    lo, hi = 0.0, 0.99
    shrunk, macs, reduction = shrink_at(pattern, hi, coupled, round_to, dense_macs)
    best = (hi, shrunk, macs, reduction)
    if reduction < target - tolerance:
        return best + (False,)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        shrunk, macs, reduction = shrink_at(pattern, mid, coupled, round_to, dense_macs)
        if abs(reduction - target) < abs(best[3] - target):
            best = (mid, shrunk, macs, reduction)
        if abs(reduction - target) <= tolerance:
            break
        if reduction < target:
            lo = mid
        else:
            hi = mid
    return best + (abs(best[3] - target) <= tolerance,)


def max_rel_error(a, b, x):
    import keras
    import numpy as np

    ra = keras.ops.convert_to_numpy(a(x, training=False)).astype(np.float64)
    rb = keras.ops.convert_to_numpy(b(x, training=False)).astype(np.float64)
    scale = np.abs(ra).max()
    return float(np.abs(ra - rb).max() / scale) if scale > 0 else float(np.abs(ra - rb).max())


# --- timing -------------------------------------------------------------------


def litert_benchmark_path():
    candidate = os.path.join(os.path.dirname(sys.executable), "litert-benchmark")
    return candidate if os.path.exists(candidate) else shutil.which("litert-benchmark")


def time_litert_benchmark(binary, paths, rounds, runs, warmup):
    """Median (over `rounds` processes) of litert-benchmark's median, per model (s)."""
    per_model = {name: [] for name in paths}
    with tempfile.TemporaryDirectory(prefix="litert_bench_") as tmp:
        names = list(paths)
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # rotate the order
            for name in order:
                out = os.path.join(tmp, "r.json")
                subprocess.run(
                    [binary, "--model", paths[name], "--num_runs", str(runs),
                     "--warmup_runs", str(warmup), "--num_threads", "1", "--result_json", out],
                    check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
                with open(out) as f:
                    per_model[name].append(json.load(f)["latency"]["median_ms"] / 1e3)
    return {name: statistics.median(v) for name, v in per_model.items()}


def time_all(entries, probe, settings):
    """entries: name -> dict(model, tflite, onnx). Returns runtime -> name -> median s."""
    from tf_psp import bench

    results = {}
    runtimes = settings["runtimes"]
    if "tflite" in runtimes:
        for threads in settings["tflite_threads"]:
            key = f"tflite_{threads}t"
            timers = {n: bench.tflite_timer(e["tflite"], probe, num_threads=threads)
                      for n, e in entries.items()}
            results[key] = bench.interleaved(timers, rounds=settings["runs"],
                                             warmup=settings["warmup"])
            log(f"  {key}: " + _fmt_medians(results[key]))
            del timers
    if "onnx" in runtimes:
        timers = {n: bench.onnx_timer(e["onnx"], probe, threads=1) for n, e in entries.items()}
        results["onnx_1t"] = bench.interleaved(timers, rounds=settings["runs"],
                                               warmup=settings["warmup"])
        log("  onnx_1t: " + _fmt_medians(results["onnx_1t"]))
        del timers
    if "keras" in runtimes:
        timers = {n: bench.keras_timer(e["model"], probe) for n, e in entries.items()}
        results["keras"] = bench.interleaved(timers, rounds=settings["keras_runs"],
                                             warmup=max(2, settings["warmup"] // 4))
        log("  keras: " + _fmt_medians(results["keras"]))
        del timers
    binary = litert_benchmark_path()
    if "litert_benchmark" in runtimes and binary and settings["litert_rounds"] > 0:
        results["litert_benchmark_1t"] = time_litert_benchmark(
            binary, {n: e["tflite"] for n, e in entries.items()},
            settings["litert_rounds"], settings["litert_runs"], max(3, settings["warmup"] // 4))
        log("  litert_benchmark_1t: " + _fmt_medians(results["litert_benchmark_1t"]))
    return results


def _fmt_medians(medians):
    return ", ".join(f"{n} {s * 1e3:.2f} ms" for n, s in medians.items())


# --- one model ----------------------------------------------------------------


def measure_model(name, settings, work_dir):
    import keras
    import numpy as np

    import tf_psp
    from tf_psp import export

    seed = settings["seed"]
    keras.utils.set_random_seed(seed)
    dense = MODELS[name]()
    randomize_batchnorm(dense, seed)
    dense_profile = tf_psp.profile(dense)
    dense_macs = dense_profile.total_macs
    log(f"{name}: {dense_macs / 1e6:.1f} M MACs, {dense_profile.total_params / 1e6:.2f} M params")
    shape = tuple(dense.inputs[0].shape[1:])
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((1,) + shape).astype(np.float32)
    check = rng.standard_normal((2,) + shape).astype(np.float32)

    psp = tf_psp.parameterize(dense, structure="channel")
    pattern = Pattern(psp)
    patterns = list(settings["patterns"])
    if "auto" in patterns:
        _, _, top = shrink_at(pattern, 0.99, False, 1, dense_macs)
        chosen = "independent" if top >= max(settings["targets"]) - settings["tolerance"] \
            else "coupled"
        log(f"{name}: independent pattern reaches {top:.1%} at f=0.99 -> auto uses '{chosen}'")
        patterns = [chosen if p == "auto" else p for p in patterns]
        patterns = list(dict.fromkeys(patterns))

    variants = []
    entries = {"dense": {"model": dense}}
    for pattern_name in patterns:
        coupled = pattern_name == "coupled"
        for target in settings["targets"]:
            for round_to in settings["round_to"]:
                start = time.perf_counter()
                f, shrunk, macs, reduction, reached = search_fraction(
                    pattern, target, coupled, round_to, dense_macs,
                    settings["bisection_steps"], settings["tolerance"])
                pattern.apply(f, coupled)  # the PSP model of the chosen f, for the check
                error = max_rel_error(psp, shrunk, check)
                vname = f"{pattern_name[0]}{round(target * 100)}_r{round_to}"
                variants.append({
                    "name": vname, "kind": "psp", "pattern": pattern_name,
                    "target_reduction": target, "round_to": round_to,
                    "fraction": round(f, 5), "reached": bool(reached),
                    "macs": int(macs), "mac_reduction_percent": round(100 * reduction, 2),
                    "mac_reduction": dense_macs / macs,
                    "params": int(tf_psp.profile(shrunk).total_params),
                    "max_rel_error_vs_psp": error,
                })
                entries[vname] = {"model": shrunk}
                log(f"{name} {vname}: f={f:.4f}, {macs / 1e6:.1f} M MACs "
                    f"({100 * reduction:.1f} % fewer, target {100 * target:.0f} %"
                    f"{'' if reached else ', NOT reached'}), rel. error {error:.1e}, "
                    f"{time.perf_counter() - start:.1f} s")
    if name == "mobilenetv2":
        for alpha in settings["width_multipliers"]:
            keras.utils.set_random_seed(seed)
            reference = mobilenetv2(alpha)
            randomize_batchnorm(reference, seed)
            p = tf_psp.profile(reference)
            vname = f"keras_alpha{alpha:g}"
            variants.append({
                "name": vname, "kind": "width_multiplier", "alpha": alpha,
                "macs": int(p.total_macs),
                "mac_reduction_percent": round(100 * (1 - p.total_macs / dense_macs), 2),
                "mac_reduction": dense_macs / p.total_macs, "params": int(p.total_params),
            })
            entries[vname] = {"model": reference}

    sizes = {}
    for vname, entry in entries.items():
        start = time.perf_counter()
        entry["tflite"] = os.path.join(work_dir, f"{name}_{vname}.tflite")
        entry["onnx"] = os.path.join(work_dir, f"{name}_{vname}.onnx")
        t = export.export_tflite(entry["model"], entry["tflite"])
        sizes[vname] = {"tflite_bytes": t.size_bytes, "tflite_max_rel_error": t.max_rel_error}
        if "onnx" in settings["runtimes"]:
            o = export.export_onnx(entry["model"], entry["onnx"])
            sizes[vname].update(onnx_bytes=o.size_bytes, onnx_max_rel_error=o.max_rel_error)
        log(f"{name} {vname}: exported ({t.size_bytes / 1e6:.2f} MB .tflite) in "
            f"{time.perf_counter() - start:.1f} s")

    log(f"{name}: timing {len(entries)} models interleaved")
    medians = time_all(entries, probe, settings)
    for v in variants:
        v.update(sizes[v["name"]])
        v["latency"] = {}
        for runtime, m in medians.items():
            speedup = m["dense"] / m[v["name"]]
            v["latency"][runtime] = {
                "median_ms": m[v["name"]] * 1e3,
                "speedup": speedup,
                "fidelity": speedup / v["mac_reduction"],
            }
    return {
        "dense": {
            "macs": int(dense_macs), "params": int(dense_profile.total_params),
            **sizes["dense"],
            "latency_ms": {runtime: m["dense"] * 1e3 for runtime, m in medians.items()},
        },
        "input_shape": list(shape),
        "patterns": patterns,
        "skipped_layers": pattern.skipped,
        "residual_consumers": pattern.residual_consumers,
        "variants": variants,
    }


# --- reporting ----------------------------------------------------------------


def goal(results):
    """The MobileNetV2 goal: TFLite 1 thread fidelity >= 0.9 at 50 % fewer MACs."""
    model = results.get("mobilenetv2")
    if not model:
        return None
    rows = {}
    for v in model["variants"]:
        if v["kind"] == "psp" and v["target_reduction"] == 0.5 and "tflite_1t" in v["latency"]:
            rows[v["name"]] = v["latency"]["tflite_1t"]["fidelity"]
    return {
        "description": "MobileNetV2, TFLite 1 thread, 50 % fewer MACs: speed-up fidelity >= 0.9",
        "threshold": GOAL_FIDELITY,
        "fidelity": {name: round(value, 3) for name, value in rows.items()},
        "met": {name: value >= GOAL_FIDELITY for name, value in rows.items()},
    }


def markdown(results, runtimes):
    lines = []
    for name, model in results.items():
        d = model["dense"]
        dense_ms = ", ".join(f"{RUNTIME_LABELS[r]} {d['latency_ms'][r]:.2f} ms" for r in runtimes)
        lines += [
            f"### {name}: dense {d['macs'] / 1e6:.1f} M MACs, {d['params'] / 1e6:.2f} M params, "
            f"{d['tflite_bytes'] / 1e6:.2f} MB .tflite",
            "",
            f"Dense medians: {dense_ms}. Cells: speed-up (fidelity = speed-up / MAC reduction).",
            "",
            "| variant | f | MACs (M) | MAC reduction | params (M) | .tflite MB | "
            + " | ".join(RUNTIME_LABELS[r] for r in runtimes) + " |",
            "|---|---|---|---|---|---|" + "---|" * len(runtimes),
        ]
        for v in model["variants"]:
            f = f"{v['fraction']:.3f}" if "fraction" in v else "-"
            cells = []
            for r in runtimes:
                lat = v["latency"].get(r)
                cells.append(f"{lat['speedup']:.2f}x ({lat['fidelity']:.2f})" if lat else "-")
            lines.append(
                f"| {v['name']} | {f} | {v['macs'] / 1e6:.1f} | {v['mac_reduction']:.2f}x "
                f"({v['mac_reduction_percent']:.1f} %) | {v['params'] / 1e6:.2f} | "
                f"{v['tflite_bytes'] / 1e6:.2f} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(results, runtimes, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncols = min(3, len(runtimes))
    nrows = -(-len(runtimes) // ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.2 * nrows + 0.8),
                             squeeze=False)
    axes = grid.reshape(-1)
    for ax in axes[len(runtimes):]:
        ax.axis("off")
    axes = axes[: len(runtimes)]
    colors = {"mobilenetv2": "tab:blue", "resnet56": "tab:orange", "tiny": "tab:green"}
    top = 1.0
    for ax, runtime in zip(axes, runtimes):
        for name, model in results.items():
            for kind, round_to, label, marker in (
                ("psp", 1, "PSP round_to=1", "o"), ("psp", 8, "PSP round_to=8", "s"),
                ("width_multiplier", None, "Keras width multiplier", "*"),
            ):
                pts = [(v["mac_reduction"], v["latency"][runtime]["speedup"])
                       for v in model["variants"]
                       if v["kind"] == kind and v.get("round_to") == round_to
                       and runtime in v["latency"]]
                if pts:
                    xs, ys = zip(*pts)
                    top = max(top, *xs, *ys)
                    ax.plot(xs, ys, marker=marker if kind == "psp" else "*",
                            markersize=7 if kind == "psp" else 12,
                            linestyle="-" if kind == "psp" else ":",
                            color=colors.get(name, "gray"), label=f"{name} {label}")
        for label, pts in REFERENCES.get(runtime, {}).items():
            xs, ys = zip(*pts)
            ax.plot(xs, ys, REFERENCE_MARKERS.get(label, "x"), color="dimgray",
                    markersize=9, linestyle="none", label=label)
        ax.set_title(RUNTIME_LABELS[runtime])
        ax.set_xlabel("MAC reduction (dense / shrunk)")
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.plot([1, top * 1.05], [1, top * 1.05], "k--", linewidth=1, label="ideal (y = x)")
        ax.set_xlim(1, top * 1.05)
        ax.set_ylim(0.5, top * 1.05)
    for row in grid:
        row[0].set_ylabel("latency speed-up (dense / shrunk)")
    handles, labels = {}, []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in handles:
                handles[label] = h
                labels.append(label)
    fig.legend([handles[label] for label in labels], labels, loc="lower center",
               ncol=min(4, len(labels)), fontsize=8)
    legend_rows = -(-len(labels) // 4)
    fig.tight_layout(rect=(0, (0.35 + 0.22 * legend_rows) / fig.get_figheight(), 1, 1))
    from tf_psp import atomic

    with atomic.temp_file_beside(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _write_text(path, text):
    from tf_psp import atomic

    atomic.write_text(path, text)


def settings_from_flags():
    quick = FLAGS.quick
    return {
        "targets": [float(t) for t in (FLAGS.targets if not quick else ["0.5"])],
        "round_to": [int(r) for r in FLAGS.round_to],
        "patterns": list(FLAGS.patterns),
        "width_multipliers": [float(a) for a in FLAGS.width_multipliers],
        "runtimes": list(FLAGS.runtimes),
        "tflite_threads": [int(t) for t in FLAGS.tflite_threads],
        "runs": 5 if quick else FLAGS.runs,
        "keras_runs": 3 if quick else FLAGS.keras_runs,
        "warmup": 1 if quick else FLAGS.warmup,
        "litert_rounds": 0 if quick else FLAGS.litert_rounds,
        "litert_runs": FLAGS.litert_runs,
        "bisection_steps": 4 if quick else FLAGS.bisection_steps,
        "tolerance": 0.03 if quick else FLAGS.tolerance,
        "seed": FLAGS.seed,
        "quick": quick,
    }


def main(argv):
    del argv
    started = time.perf_counter()
    if FLAGS.render_from:
        with open(FLAGS.render_from) as f:
            output = json.load(f)
        output["goal"] = goal(output["models"])
        write_report(output, FLAGS.output_dir, FLAGS.name)
        return
    for name in FLAGS.models:
        if name not in MODELS:
            raise app.UsageError(f"--models: unknown model {name!r}; choose from {sorted(MODELS)}.")
    settings = settings_from_flags()
    logging.set_verbosity(logging.WARNING)  # tf2onnx logs every conversion at INFO
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import onnxruntime
    import tensorflow as tf

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "onnxruntime": onnxruntime.__version__,
        "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
        "litert_benchmark": bool(litert_benchmark_path()),
        "keras_jit_compile": False, "batch_size": 1,
        "settings": settings,
        "method": ("dense and all variants of a model timed in one interleaved run per "
                   "runtime; medians; speed-up = dense median / variant median; "
                   "fidelity = speed-up / (dense MACs / variant MACs)"),
    }
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="tf_psp_latency_")
    os.makedirs(work_dir, exist_ok=True)
    results = {}
    output = {"meta": meta, "models": results}
    try:
        for name in FLAGS.models:
            results[name] = measure_model(name, settings, work_dir)
            output["goal"] = goal(results)
            meta["wall_s"] = round(time.perf_counter() - started, 1)
            # Written after every model, so a long run leaves partial results behind.
            _write_text(os.path.join(FLAGS.output_dir, f"{FLAGS.name}.json"),
                        json.dumps(output, indent=2) + "\n")
    finally:
        if FLAGS.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    write_report(output, FLAGS.output_dir, FLAGS.name)
    log(f"done in {time.perf_counter() - started:.0f} s; wrote {FLAGS.name}.json, .md, .png "
        f"to {FLAGS.output_dir}")


def write_report(output, output_dir, name):
    """Prints the markdown table and writes <name>.md and <name>.png."""
    results = output["models"]
    runtimes = [r for r in RUNTIME_LABELS
                if all(r in m["dense"]["latency_ms"] for m in results.values())]
    table = markdown(results, runtimes)
    if output.get("goal"):
        g = output["goal"]
        table += (f"\nGoal ({g['description']}): "
                  + ", ".join(f"{n} {v:.3f} ({'met' if g['met'][n] else 'not met'})"
                              for n, v in g["fidelity"].items()) + "\n")
    print(table)
    _write_text(os.path.join(output_dir, f"{name}.md"), table)
    plot(results, runtimes, os.path.join(output_dir, f"{name}.png"))


if __name__ == "__main__":
    app.run(main)
