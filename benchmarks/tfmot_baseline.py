"""tensorflow-model-optimization baseline: unstructured sparsity vs PSP shrinking in TFLite.

    .venv/bin/python benchmarks/tfmot_baseline.py --setup     # first time: creates the tfmot venv
    .venv/bin/python benchmarks/tfmot_baseline.py              # ~4 min on 2 cores
    .venv/bin/python benchmarks/tfmot_baseline.py --quick --output_dir=/tmp/tfmot

tfmot only accepts tf_keras (Keras 2) models and importing it sets
TF_USE_LEGACY_KERAS=1 for the whole process, so it runs in its own process and
its own virtual environment (`--tfmot_venv`, default benchmarks/.tfmot-venv,
packages pinned in benchmarks/tfmot-requirements.txt). `--setup` creates that
environment when it is missing (`python -m venv` + `pip install -r`); without
it, a missing environment prints how to create it and a "skipped" JSON, and
the script exits 0.

Models (MobileNetV2, alpha 1.0, 224x224x3, random weights, seed 0):

- *dense*: keras.applications MobileNetV2 (Keras 3, this process), with the
  BatchNorm statistics randomized as in benchmarks/latency.py.
- *PSP-shrunk*: latency.py's deterministic *independent* channel pattern
  (`Pattern`, `search_fraction`), bisected to `--targets` (default 50 %) fewer
  MACs with `strip_and_shrink(round_to=--round_to)` (default 8). Its parameter
  sparsity S is the fraction of the dense model's parameters it removed.
- *tfmot, matched*: tf_keras MobileNetV2 in benchmarks/tfmot_worker.py (tfmot
  venv), `prune_low_magnitude(ConstantSparsity(s))` on the whole model, a few
  pruning steps on random data, `strip_pruning`, float32 TFLite. The kernel
  target `s = S * params / prunable kernel params`, so that the zeroed fraction
  of all parameters equals the PSP model's S (tfmot 0.8.1 prunes the Conv2D and
  Dense kernels only; MobileNetV2's DepthwiseConv2D kernels stay dense).
- *tfmot, kernel sparsity x* for each `--extra_sparsities` (default 0.5, the
  PSP.md reference figure).

The tfmot models have other random weights than the Keras 3 models (tf_keras
initializes its own); latency does not depend on the values. Their MACs are
the dense model's: TFLite runs the zeros as dense kernels.

Timing: every .tflite file (dense, PSP-shrunk, tfmot ...) in one interleaved
loop per thread count (LiteRT interpreter, XNNPACK, `--tflite_threads`, batch
1, one fixed random input; tf_psp.bench), medians; speed-up = dense median /
model median. Reported per model: parameter sparsity, MACs, .tflite size and
gzip -9 size (tfmot's documented benefit is compression), speed-ups. Writes
<name>.json and <name>.md (default tfmot.*) to --output_dir atomically.

Flags shared with benchmarks/latency.py (imported for its model and pattern
functions): --targets (first value used), --round_to (first value used),
--tflite_threads, --runs, --warmup, --bisection_steps, --tolerance, --seed,
--output_dir, --name, --work_dir, --quick. Its other flags are ignored here.
"""

import datetime
import gzip
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from absl import app, flags, logging

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import latency  # noqa: E402  (defines the shared flags; see the docstring)

FLAGS = flags.FLAGS
flags.DEFINE_string("tfmot_venv", os.path.join(HERE, ".tfmot-venv"),
                    "Virtual environment with tensorflow-model-optimization and tf_keras.")
flags.DEFINE_bool("setup", False,
                  "Create --tfmot_venv (python -m venv + pip install -r "
                  "benchmarks/tfmot-requirements.txt) when it is missing.")
flags.DEFINE_list("extra_sparsities", ["0.5"],
                  "tfmot ConstantSparsity kernel targets timed besides the matched one.")
flags.DEFINE_integer("pruning_steps", 4, "tfmot: pruning steps (batches) in the worker.")
flags.DEFINE_integer("worker_timeout", 900, "Seconds allowed to one tfmot worker.")
FLAGS.set_default("name", "tfmot")
FLAGS.set_default("targets", ["0.5"])
FLAGS.set_default("round_to", ["8"])

REQUIREMENTS = os.path.join(HERE, "tfmot-requirements.txt")
WORKER = os.path.join(HERE, "tfmot_worker.py")
log = latency.log


# --- the tfmot environment ------------------------------------------------------


def venv_python(venv):
    return os.path.join(venv, "bin", "python")


def setup_commands(venv):
    return [f"python -m venv {venv}",
            f"{venv_python(venv)} -m pip install -r {REQUIREMENTS}"]


def create_venv(venv):
    log(f"creating the tfmot environment in {venv} (pip install from PyPI, a few minutes)")
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    with open(os.path.join(venv, ".gitignore"), "w") as f:
        f.write("*\n")  # keep the environment out of git (Python < 3.13 does not)
    subprocess.run([venv_python(venv), "-m", "pip", "install", "-q", "--upgrade", "pip"],
                   check=False)
    subprocess.run([venv_python(venv), "-m", "pip", "install", "-q", "-r", REQUIREMENTS],
                   check=True)


def run_worker(venv, out, sparsity, settings):
    """Runs tfmot_worker.py in the tfmot venv; returns its JSON result."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    command = [venv_python(venv), WORKER, f"--out={out}", f"--sparsity={sparsity:.6f}",
               "--input_size=224", f"--seed={settings['seed']}",
               f"--batches={settings['pruning_steps']}"]
    start = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=settings["worker_timeout"])
    if proc.returncode != 0:
        raise RuntimeError(f"tfmot worker failed (rc {proc.returncode}): {' '.join(command)}\n"
                           + proc.stderr[-4000:])
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError("tfmot worker printed no JSON:\n" + proc.stdout[-2000:]
                           + proc.stderr[-2000:])
    result = json.loads(lines[-1])
    log(f"tfmot worker s={sparsity:.4f}: kernel sparsity {result['kernel_sparsity']:.4f}, "
        f"param sparsity {result['param_sparsity']:.4f}, "
        f"{result['tflite_bytes'] / 1e6:.2f} MB (.gz {result['tflite_gzip_bytes'] / 1e6:.2f} MB), "
        f"{time.perf_counter() - start:.0f} s")
    return result


# --- measuring ------------------------------------------------------------------


def gzip_size(path):
    with open(path, "rb") as f:
        return len(gzip.compress(f.read(), compresslevel=9))


def prunable_kernel_params(model):
    """Parameters of the kernels tfmot 0.8.1 prunes in MobileNetV2: Conv2D and Dense.

    Its DepthwiseConv2D kernels stay dense (the worker reports their sparsity).
    """
    import keras

    total = 0
    for layer in model._flatten_layers(include_self=False):
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            continue
        if isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            total += _numel(layer.kernel.shape)
    return total


def _numel(shape):
    n = 1
    for d in shape:
        n *= int(d)
    return n


def measure(settings, work_dir, venv):
    import keras
    import numpy as np

    import tf_psp
    from tf_psp import bench, export

    seed = settings["seed"]
    keras.utils.set_random_seed(seed)
    dense = latency.mobilenetv2(1.0)
    latency.randomize_batchnorm(dense, seed)
    profile = tf_psp.profile(dense)
    dense_macs, dense_params = int(profile.total_macs), int(profile.total_params)
    kernels = prunable_kernel_params(dense)
    log(f"dense MobileNetV2: {dense_macs / 1e6:.1f} M MACs, {dense_params / 1e6:.3f} M params "
        f"({kernels / 1e6:.3f} M in prunable kernels)")
    rng = np.random.default_rng(seed)
    probe = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
    check = rng.standard_normal((2, 224, 224, 3)).astype(np.float32)

    # PSP-shrunk at the target MAC reduction (latency.py's independent pattern).
    start = time.perf_counter()
    psp = tf_psp.parameterize(dense, structure="channel")
    pattern = latency.Pattern(psp)
    target, round_to = settings["target"], settings["round_to"]
    f, shrunk, macs, reduction, reached = latency.search_fraction(
        pattern, target, False, round_to, dense_macs, settings["bisection_steps"],
        settings["tolerance"])
    pattern.apply(f, False)
    error = latency.max_rel_error(psp, shrunk, check)
    shrunk_params = int(tf_psp.profile(shrunk).total_params)
    psp_sparsity = 1.0 - shrunk_params / dense_params
    log(f"PSP-shrunk: f={f:.4f}, {macs / 1e6:.1f} M MACs ({100 * reduction:.1f} % fewer), "
        f"{shrunk_params / 1e6:.3f} M params (param sparsity {psp_sparsity:.4f}), "
        f"rel. error vs PSP {error:.1e}, {time.perf_counter() - start:.0f} s")

    models = {}  # name -> row
    for name, model in (("dense", dense), ("psp_shrunk", shrunk)):
        path = os.path.join(work_dir, f"mobilenetv2_{name}.tflite")
        t = export.export_tflite(model, path)
        models[name] = {
            "tflite": path, "tflite_bytes": t.size_bytes, "tflite_gzip_bytes": gzip_size(path),
            "tflite_max_rel_error": t.max_rel_error,
        }
    models["dense"].update(kind="dense", macs=dense_macs, params=dense_params,
                           param_sparsity=0.0, zero_or_removed_params=0)
    models["psp_shrunk"].update(
        kind="psp", macs=int(macs), params=shrunk_params, param_sparsity=psp_sparsity,
        zero_or_removed_params=dense_params - shrunk_params, fraction=round(f, 5),
        target_mac_reduction=target, mac_reduction_reached=bool(reached), round_to=round_to,
        max_rel_error_vs_psp=error)

    # tfmot at the matched parameter sparsity, and at the extra kernel sparsities.
    matched = psp_sparsity * dense_params / kernels
    runs = [("tfmot_matched", matched)] + [
        (f"tfmot_{round(100 * s):d}", s) for s in settings["extra_sparsities"]]
    for name, s in runs:
        path = os.path.join(work_dir, f"mobilenetv2_{name}.tflite")
        r = run_worker(venv, path, s, settings)
        models[name] = {
            "kind": "tfmot", "tflite": path, "macs": dense_macs, "params": r["params"],
            "param_sparsity": r["param_sparsity"], "kernel_sparsity": r["kernel_sparsity"],
            "depthwise_kernel_sparsity": r.get("depthwise_kernel_sparsity"),
            "zero_or_removed_params": int(round(r["param_sparsity"] * r["params"])),
            "constant_sparsity": s, "tflite_bytes": r["tflite_bytes"],
            "tflite_gzip_bytes": r["tflite_gzip_bytes"],
            "tflite_max_rel_error": r["tflite_max_rel_error"], "worker": r,
        }
        if r["params"] != dense_params:
            log(f"WARNING: tf_keras MobileNetV2 has {r['params']} params, Keras 3 {dense_params}")

    # Timing: all files interleaved, per thread count.
    latencies = {}
    for threads in settings["tflite_threads"]:
        key = f"tflite_{threads}t"
        timers = {n: bench.tflite_timer(m["tflite"], probe, num_threads=threads)
                  for n, m in models.items()}
        latencies[key] = bench.interleaved(timers, rounds=settings["runs"],
                                           warmup=settings["warmup"])
        log(f"  {key}: " + ", ".join(f"{n} {v * 1e3:.2f} ms" for n, v in latencies[key].items()))
        del timers
    for name, m in models.items():
        m["mac_reduction"] = dense_macs / m["macs"]
        m["latency"] = {
            key: {"median_ms": med[name] * 1e3, "speedup": med["dense"] / med[name]}
            for key, med in latencies.items()
        }
        m["tflite"] = os.path.basename(m["tflite"])
    return {"dense_macs": dense_macs, "dense_params": dense_params,
            "prunable_kernel_params": kernels, "matched_kernel_sparsity_target": matched,
            "models": models}


# --- reporting ------------------------------------------------------------------


LABELS = {"dense": "dense", "psp_shrunk": "PSP-shrunk", "tfmot_matched": "tfmot (matched S)"}


def markdown(output):
    r = output["results"]
    keys = list(next(iter(r["models"].values()))["latency"])
    lines = [
        "### MobileNetV2 224: tfmot unstructured sparsity vs PSP shrinking (TFLite float32)",
        "",
        "LiteRT interpreter, XNNPACK, batch 1, all files interleaved in one loop per thread "
        "count, medians. Param sparsity = fraction of the dense model's "
        f"{r['dense_params'] / 1e6:.3f} M parameters zeroed (tfmot) or removed (PSP). "
        "Speed-up = dense median / model median.",
        "",
        "| model | param sparsity | Conv2D/Dense kernel sparsity | MACs (M) | .tflite MB "
        "| gzip MB | "
        + " | ".join(f"{k.split('_')[1][:-1]} thr. ms (speed-up)" for k in keys) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(keys),
    ]
    for name, m in r["models"].items():
        label = LABELS.get(name, f"tfmot ConstantSparsity({m.get('constant_sparsity', 0):g})")
        ks = f"{m['kernel_sparsity']:.3f}" if "kernel_sparsity" in m else "-"
        cells = [f"{m['latency'][k]['median_ms']:.2f} ({m['latency'][k]['speedup']:.2f}x)"
                 for k in keys]
        lines.append(
            f"| {label} | {m['param_sparsity']:.3f} | {ks} | {m['macs'] / 1e6:.1f} | "
            f"{m['tflite_bytes'] / 1e6:.2f} | {m['tflite_gzip_bytes'] / 1e6:.2f} | "
            + " | ".join(cells) + " |")
    p = r["models"]["psp_shrunk"]
    lines += [
        "",
        f"PSP-shrunk: latency.py's independent channel pattern, f={p['fraction']}, "
        f"round_to={p['round_to']}, {100 * (1 - 1 / p['mac_reduction']):.1f} % fewer MACs; "
        f"tfmot (matched S): ConstantSparsity({r['matched_kernel_sparsity_target']:.4f}) on the "
        f"{r['prunable_kernel_params'] / 1e6:.3f} M Conv2D/Dense kernel parameters, chosen so the "
        "zeroed fraction of all parameters equals PSP's removed fraction. tfmot models run "
        "dense kernels: same MACs, same file size; only gzip shrinks.",
        "",
    ]
    return "\n".join(lines)


def settings_from_flags():
    quick = FLAGS.quick
    return {
        "target": float(FLAGS.targets[0]),
        "round_to": int(FLAGS.round_to[0]),
        "extra_sparsities": [float(s) for s in FLAGS.extra_sparsities],
        "tflite_threads": [int(t) for t in FLAGS.tflite_threads],
        "runs": 5 if quick else FLAGS.runs,
        "warmup": 1 if quick else FLAGS.warmup,
        "bisection_steps": 4 if quick else FLAGS.bisection_steps,
        "tolerance": 0.03 if quick else FLAGS.tolerance,
        "pruning_steps": 2 if quick else FLAGS.pruning_steps,
        "worker_timeout": FLAGS.worker_timeout,
        "seed": FLAGS.seed,
        "quick": quick,
    }


def main(argv):
    del argv
    started = time.perf_counter()
    venv = os.path.abspath(FLAGS.tfmot_venv)
    if not os.path.exists(venv_python(venv)):
        if not FLAGS.setup:
            commands = setup_commands(venv)
            print(f"tfmot baseline skipped: no virtual environment at {venv}.\n"
                  "tensorflow-model-optimization needs its own environment (tf_keras, "
                  "TF_USE_LEGACY_KERAS=1). Create it with --setup, or by hand:\n  "
                  + "\n  ".join(commands), file=sys.stderr)
            print(json.dumps({"status": "skipped", "reason": f"no tfmot venv at {venv}",
                              "setup": commands}))
            return
        create_venv(venv)
    settings = settings_from_flags()
    logging.set_verbosity(logging.WARNING)  # TF's SavedModel writer logs at INFO
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    meta = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__,
        "ai_edge_litert": importlib.metadata.version("ai-edge-litert"),
        "tfmot_venv": os.path.relpath(venv),
        "batch_size": 1, "settings": settings,
        "method": ("dense, PSP-shrunk and tfmot .tflite files timed in one interleaved loop "
                   "per thread count (LiteRT XNNPACK); medians; speed-up = dense median / "
                   "model median"),
    }
    work_dir = FLAGS.work_dir or tempfile.mkdtemp(prefix="tf_psp_tfmot_")
    os.makedirs(work_dir, exist_ok=True)
    try:
        results = measure(settings, work_dir, venv)
    finally:
        if FLAGS.work_dir is None:
            shutil.rmtree(work_dir, ignore_errors=True)
    meta["tfmot_versions"] = next(m["worker"]["versions"] for m in results["models"].values()
                                  if m["kind"] == "tfmot")
    meta["wall_s"] = round(time.perf_counter() - started, 1)
    output = {"status": "ok", "meta": meta, "results": results}
    table = markdown(output)
    print(table)
    latency._write_text(os.path.join(FLAGS.output_dir, f"{FLAGS.name}.json"),
                        json.dumps(output, indent=2) + "\n")
    latency._write_text(os.path.join(FLAGS.output_dir, f"{FLAGS.name}.md"), table)
    log(f"done in {time.perf_counter() - started:.0f} s; wrote {FLAGS.name}.json and .md "
        f"to {FLAGS.output_dir}")


if __name__ == "__main__":
    app.run(main)
