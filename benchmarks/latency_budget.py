"""Latency budgets against MAC budgets: which one gives the speed it promises?

    .venv/bin/python benchmarks/latency_budget.py                 # MobileNetV2-224, ~10 min
    .venv/bin/python benchmarks/latency_budget.py --models=resnet56 --importances=l1

For each model (random weights, BatchNorm statistics randomized as in
benchmarks/latency.py), importance (`random`: the issue's check, any alphas
must work; `l1`) and `keep_latency` in `--keep_latency`, and for `round_to`
1 and `'auto'` (the table's quantum):

- `latency`: `prune_to_budget(keep_latency=k, ...)` (groups taken by
  importance lost per predicted latency saved);
- `macs_equal_macs`: `prune_to_budget(keep_macs=<the MACs `latency` kept>)`;
- `macs_equal_latency`: `prune_to_budget(keep_macs=m)` with `m` bisected so
  that the table predicts the same latency `k` (what a user of MAC budgets
  would have to guess).

All shrunk models and the dense one are converted for `--runtime` (TFLite/XNNPACK,
`--quantization` int8, or ONNX Runtime; as latency_model.py converts them) and
timed in one interleaved run (`--threads`, medians of `--runs`; with one thread
the invoking thread's CPU time, which other work on the machine does not add to).
Writes latency_budget.json and latency_budget.md to --output_dir (suffixed with
the runtime unless float TFLite).

    .venv/bin/python benchmarks/latency_budget.py --runtime=onnxruntime --importances=random
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import latency_model  # noqa: E402

import latency as latency_bench  # noqa: E402

FLAGS = flags.FLAGS
FLAGS.set_default("models", ["mobilenetv2"])
FLAGS.set_default("runs", 40)
flags.DEFINE_list("keep_latency", ["0.7", "0.5", "0.3"], "Latency budgets.")
flags.DEFINE_list("importances", ["random", "l1"], "Importances.")


def _macs_for_latency(model, keep, importance, round_to, table, seed):
    """keep_macs whose MAC-budget selection the table predicts at latency `keep`."""
    import tf_psp

    psp = tf_psp.parameterize(model, coupling="group", alpha_regularizer=None)
    plan = tf_psp.pruning_plan(psp, importance=importance, seed=seed)
    dense = table.predict_widths({})
    lo, hi = 0.01, 1.0
    for _ in range(14):
        mid = (lo + hi) / 2
        try:
            units = plan.select(mid, round_to=round_to)
        except ValueError:
            lo = mid
            continue
        if plan.kept_latency(units, table, round_to) / dense > keep:
            hi = mid
        else:
            lo = mid
    return lo


def measure_model(name, work_dir):
    import tf_psp
    from tf_psp import bench

    log = latency_bench.log
    model = latency_model.build(name)
    table = latency_model.build_table(model, FLAGS.cache_dir)
    log(f"{name}: table ready (quantum {table.quantum})")
    dense_macs = tf_psp.profile(model).total_macs
    rows = []
    dense_path = latency_model.deploy(model, os.path.join(work_dir, f"{name}_dense"))
    for importance in FLAGS.importances:
        for keep in [float(k) for k in FLAGS.keep_latency]:
            for round_to in (1, "auto"):
                pruned, report = tf_psp.prune_to_budget(
                    model, keep_latency=keep, importance=importance, round_to=round_to,
                    latency_table=table, return_report=True)
                r = report.round_to
                variants = {"latency": pruned}
                variants["macs_equal_macs"] = tf_psp.prune_to_budget(
                    model, keep_macs=report.kept_macs, importance=importance, round_to=r)
                m = _macs_for_latency(model, keep, importance, r, table, 0)
                variants["macs_equal_latency"] = tf_psp.prune_to_budget(
                    model, keep_macs=m, importance=importance, round_to=r)
                for method, variant in variants.items():
                    shrunk = tf_psp.strip_and_shrink(variant, round_to=r)
                    path = latency_model.deploy(shrunk, os.path.join(work_dir,
                                                                     f"{name}_{len(rows)}"))
                    rows.append({
                        "model": name, "importance": importance, "keep_latency": keep,
                        "round_to": r, "method": method,
                        "kept_macs": tf_psp.profile(shrunk).total_macs / dense_macs,
                        "predicted_latency": table.predict(shrunk) / table.predict(model),
                        "path": path})
                log(f"{name}: {importance} keep_latency {keep} round_to {r}")
    cpu = FLAGS.threads == 1  # CPU time of the invoking thread: other work does not add to it
    timers = {"dense": latency_model.timer(dense_path, cpu_time=cpu)}
    for k, row in enumerate(rows):
        timers[k] = latency_model.timer(row["path"], cpu_time=cpu)
    medians = bench.interleaved(timers, rounds=FLAGS.runs)
    for k, row in enumerate(rows):
        row["measured_latency"] = medians[k] / medians["dense"]
        row["speedup"] = medians["dense"] / medians[k]
        del row["path"]
    return {"model": name, "target": table.describe(), "dense_ms": medians["dense"] * 1e3,
            "quantum": table.quantum, "rows": rows}


def markdown(results):
    lines = ["| model | importance | keep_latency | round_to | method | kept MACs | "
             "predicted latency | measured latency | speed-up |",
             "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for r in result["rows"]:
            lines.append(
                f"| {r['model']} | {r['importance']} | {r['keep_latency']} | {r['round_to']} "
                f"| {r['method']} | {r['kept_macs']:.3f} | {r['predicted_latency']:.3f} | "
                f"{r['measured_latency']:.3f} | {r['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv):
    del argv
    latency_model.run_models(latency_model.result_name("latency_budget"), measure_model,
                             markdown)


if __name__ == "__main__":
    app.run(main)
