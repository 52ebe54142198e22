"""`tf-psp`: profile, shrink, export and benchmark PSP models from the shell.

    tf-psp profile model.keras [--json]
    tf-psp shrink model.keras small.keras [--round-to 8] [--approximate] [--report report.json]
    tf-psp export small.keras small.tflite [--format tflite-int8 --calibration x.npy]
    tf-psp bench model.keras --compare small.keras [--threads 1 2] [--runs 50]
    tf-psp latency-table model.keras [--runtime tflite|onnxruntime] [--quantization int8]
                                     [--threads 1] [--output t.json]
    tf-psp prune model.keras --data DIR|data.npz --keep-macs 0.5 --epochs 10 -o small.keras
    tf-psp --version

Run `tf-psp COMMAND --help` for the options of a command. TensorFlow, absl,
tf2onnx and LiteRT log lines are hidden (`tf_psp.quiet`); `--verbose` shows them.
`main(argv)` returns the exit status: 0 on success, 1 when the work failed (a corrupt model file, a
failed export), 2 for a wrong command line (unknown option or format, a
missing or misnamed file). Expected errors print one line
`tf-psp: error: <what> (<file>)` to stderr, without a traceback.

TensorFlow and Keras are imported only once a command runs, so `--help` and
`--version` answer at once.
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
import zipfile

import tf_psp
from tf_psp import atomic, quiet

PROG = "tf-psp"

# CLI format name -> (export format, TFLite quantization)
EXPORT_FORMATS = {
    "saved_model": ("saved_model", None),
    "tflite": ("tflite", None),
    "tflite-fp16": ("tflite", "float16"),
    "tflite-int8": ("tflite", "int8"),
    "onnx": ("onnx", None),
}
_SUFFIX_FORMATS = {".tflite": "tflite", ".onnx": "onnx"}
_SHRINK_PROBE_BATCH = 4
_RANDOM_CALIBRATION_SAMPLES = 64
_SEED = 0


class CLIError(Exception):
    """An expected error: printed as one line, exits with `status`."""

    def __init__(self, what, path=None, status=1):
        super().__init__(what)
        self.what = what
        self.path = path
        self.status = status

    def __str__(self):
        return f"{self.what} ({self.path})" if self.path is not None else self.what


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and raise, not exit."""

    def error(self, message):
        raise CLIError(f"{message} (see '{self.prog} --help')", status=2)


# --- loading ------------------------------------------------------------------


def _check_file(path, suffixes, what="model"):
    """Raises a usage CLIError unless `path` is an existing file with a known suffix."""
    if not os.path.exists(path):
        raise CLIError(f"no such {what} file", path, status=2)
    if os.path.isdir(path):
        raise CLIError(f"expected a {what} file, got a directory", path, status=2)
    if not path.lower().endswith(tuple(suffixes)):
        raise CLIError(
            f"not a {' or '.join(suffixes)} {what} file", path, status=2
        )


def _load_keras(path, compile=False):  # pylint: disable=redefined-builtin
    """Loads a `.keras` model with the PSP layers registered."""
    _check_file(path, (".keras",))
    import keras

    from tf_psp import group_alphas, layers, regularizers  # noqa: F401  (register the classes)

    if not zipfile.is_zipfile(path):
        raise CLIError("not a valid .keras file (it is not a zip archive)", path, status=1)
    try:
        return keras.models.load_model(path, compile=compile)
    except Exception as error:  # pylint: disable=broad-except
        # Keras raises many types (BadZipFile, ValueError, TypeError, OSError)
        # for unreadable files; none of them is a bug of ours.
        raise CLIError(
            f"cannot load Keras model: {_first_line(error)}", path, status=1
        ) from error


def _first_line(error):
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _random_inputs(model, batch, seed=_SEED):
    """Seeded random-normal inputs for `model` (an array, or a list of arrays)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in model.inputs:
        shape = list(tensor.shape)[1:]
        if any(d is None for d in shape):
            raise CLIError(
                f"model '{model.name}' input '{tensor.name}' has unknown dimensions "
                f"{tuple(tensor.shape)}; cannot make a random probe"
            )
        arrays.append(rng.standard_normal([batch] + shape).astype(np.float32))
    return arrays[0] if len(arrays) == 1 else arrays


def _max_rel_error(reference, outputs):
    """Max over outputs of max|ref - out| / max|ref| (scale-free)."""
    from tf_psp.functional import relative_error

    return relative_error(reference, outputs)


def _save_keras_atomic(model, path):
    """Saves `model` to a temporary `.keras` file beside `path`, then renames it."""
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise CLIError("output directory does not exist", directory, status=1)
    with atomic.temp_file_beside(path, suffix=".keras") as tmp:
        model.save(tmp, overwrite=True)


def _write_json(path, data):
    atomic.write_text(path, json.dumps(data, indent=2) + "\n")


def _human_bytes(size):
    for unit in ("B", "KiB", "MiB"):
        if size < 1024 or unit == "MiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024.0
    return f"{size:.1f} GiB"


# --- profile ------------------------------------------------------------------


def _cmd_profile(args, out):
    from tf_psp.profiling import profile

    model = _load_keras(args.model)
    try:
        result = profile(model)
    except ValueError as error:
        raise CLIError(f"cannot profile: {_first_line(error)}", args.model) from error
    if args.json:
        print(json.dumps(result.to_dict(), indent=2), file=out)
    else:
        print(result, file=out)
    return 0


# --- shrink -------------------------------------------------------------------


def _has_psp_layers(model):
    from tf_psp.convert import has_alphas

    return has_alphas(model)


def _cmd_shrink(args, out):
    if args.round_to < 1:
        raise CLIError(f"--round-to must be a positive integer, got {args.round_to}", status=2)
    if not args.output.lower().endswith(".keras"):
        raise CLIError("the output must be a .keras file", args.output, status=2)
    try:
        from tf_psp.shrink import strip_and_shrink
    except ImportError as error:
        raise CLIError(f"shrinking is unavailable: {_first_line(error)}") from error
    from tf_psp import nchw
    from tf_psp.profiling import profile

    model = _load_keras(args.model)
    if not _has_psp_layers(model):
        raise CLIError(
            "the model has no PSP layers, so shrink has nothing to remove: prune it with "
            f"'{PROG} prune MODEL.keras --data DATA --keep-macs 0.5 -o small.keras', or train "
            "tf_psp.parameterize(model) first and shrink the trained PSP model",
            args.model, status=2)
    try:
        shrunk, report = strip_and_shrink(
            model, round_to=args.round_to, approximate=args.approximate, return_report=True
        )
        before, after = profile(model), profile(shrunk)
    except ValueError as error:
        raise CLIError(f"cannot shrink: {_first_line(error)}", args.model) from error
    probe = _random_inputs(model, _SHRINK_PROBE_BATCH)
    error = _max_rel_error(nchw.run_inference(model, probe), nchw.run_inference(shrunk, probe))
    _save_keras_atomic(shrunk, args.output)

    macs_before, macs_after = before.total_macs, after.total_macs
    reduction = macs_before / macs_after if macs_after else float("inf")
    print(report, file=out)
    print(
        f"MACs: {macs_before:,} -> {macs_after:,} ({reduction:.2f}x fewer; "
        f"the PSP profile expected {before.mac_reduction:.2f}x)",
        file=out,
    )
    print(f"Params: {before.total_params:,} -> {after.total_params:,}", file=out)
    print(
        f"Max relative error, shrunk vs PSP model on a random batch of "
        f"{_SHRINK_PROBE_BATCH}: {error:.3g}",
        file=out,
    )
    print(f"Wrote {args.output}", file=out)
    if args.report:
        _write_json(
            args.report,
            {
                "model": args.model,
                "output": args.output,
                "round_to": args.round_to,
                "approximate": args.approximate,
                "macs_before": macs_before,
                "macs_after": macs_after,
                "mac_reduction": reduction if reduction != float("inf") else None,
                "expected_mac_reduction": before.to_dict()["mac_reduction"],
                "params_before": before.total_params,
                "params_after": after.total_params,
                "max_rel_error": error if error != float("inf") else None,
                "report": report.to_dict(),
            },
        )
        print(f"Wrote {args.report}", file=out)
    return 0


# --- export -------------------------------------------------------------------


def _export_format(args):
    if args.format is not None:
        return args.format
    suffix = os.path.splitext(args.output.rstrip("/\\"))[1].lower()
    if suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[suffix]
    if suffix == "":
        return "saved_model"
    raise CLIError(
        f"cannot tell the format from the suffix '{suffix}': pass --format "
        f"({', '.join(EXPORT_FORMATS)})",
        args.output,
        status=2,
    )


def _calibration_data(args, model, err):
    import numpy as np

    if args.calibration is not None:
        _check_file(args.calibration, (".npy",), what="calibration")
        try:
            data = np.load(args.calibration, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise CLIError(
                f"cannot read calibration data: {_first_line(error)}", args.calibration
            ) from error
        if len(model.inputs) != 1:
            raise CLIError(
                f"--calibration takes one .npy array, model '{model.name}' has "
                f"{len(model.inputs)} inputs",
                args.calibration,
                status=2,
            )
        expected = tuple(model.inputs[0].shape[1:])
        if data.ndim != len(expected) + 1 or any(
            e is not None and e != d for e, d in zip(expected, data.shape[1:])
        ):
            raise CLIError(
                f"calibration array has shape {data.shape}, expected (N,) + {expected}",
                args.calibration,
                status=2,
            )
        data = data.astype(np.float32)
    else:
        print(
            f"{PROG}: warning: no --calibration data: calibrating int8 on "
            f"{_RANDOM_CALIBRATION_SAMPLES} random-normal samples; accuracy will "
            "suffer, pass a .npy of a few hundred real inputs",
            file=err,
        )
        data = _random_inputs(model, _RANDOM_CALIBRATION_SAMPLES)
        if isinstance(data, list):
            return [tuple(a[i : i + 1] for a in data) for i in range(_RANDOM_CALIBRATION_SAMPLES)]
    # One sample per calibration step.
    return [data[i : i + 1] for i in range(len(data))]


def _cmd_export(args, out, err):
    from tf_psp import export

    fmt = _export_format(args)
    kind, quantization = EXPORT_FORMATS[fmt]
    if args.calibration is not None and quantization != "int8":
        raise CLIError("--calibration is only used with --format tflite-int8", status=2)
    model = _load_keras(args.model)
    kwargs = {}
    if kind == "tflite":
        kwargs["quantization"] = quantization
        if quantization == "int8":
            kwargs["representative_data"] = _calibration_data(args, model, err)
    try:
        result = export.export(model, args.output, kind, **kwargs)
    except ValueError as error:
        raise CLIError(f"export failed: {_first_line(error)}", args.output) from error
    print(
        f"Wrote {result.path} ({fmt}, {_human_bytes(result.size_bytes)}); "
        f"vs Keras on a random batch: max abs error {result.max_abs_error:.3g}, "
        f"max rel error {result.max_rel_error:.3g}",
        file=out,
    )
    return 0


# --- bench --------------------------------------------------------------------


def _as_tflite(path, directory, name):
    """`path` itself if it is a .tflite file, else its TFLite conversion in `directory`.

    Returns:
        `(tflite_path, keras_model_or_None)`.
    """
    from tf_psp import export

    _check_file(path, (".keras", ".tflite"))
    if path.lower().endswith(".tflite"):
        return path, None
    model = _load_keras(path)
    target = os.path.join(directory, f"{name}.tflite")
    try:
        export.export_tflite(model, target)
    except ValueError as error:
        raise CLIError(f"TFLite conversion failed: {_first_line(error)}", path) from error
    return target, model


def _timer(path, probe, threads, original):
    from tf_psp import bench

    try:
        return bench.tflite_timer(path, probe, num_threads=threads)
    except (ValueError, RuntimeError) as error:
        raise CLIError(f"cannot run TFLite model: {_first_line(error)}", original) from error


def _cmd_bench(args, out):
    from tf_psp import bench

    if args.runs < 1:
        raise CLIError(f"--runs must be at least 1, got {args.runs}", status=2)
    if args.warmup < 0:
        raise CLIError(f"--warmup must not be negative, got {args.warmup}", status=2)
    _check_file(args.model, (".keras", ".tflite"))
    if args.compare is not None:
        _check_file(args.compare, (".keras", ".tflite"))
    with tempfile.TemporaryDirectory(prefix="tf_psp_bench_") as directory:
        a_path, a_model = _as_tflite(args.model, directory, "a")
        try:
            probe = bench.tflite_probe(a_path)
        except (ValueError, RuntimeError) as error:
            raise CLIError(f"cannot read TFLite model: {_first_line(error)}", args.model) from error
        b_path = b_model = None
        if args.compare is not None:
            b_path, b_model = _as_tflite(args.compare, directory, "b")
        print(
            f"LiteRT (XNNPACK), batch 1, {args.warmup} warm-up + {args.runs} timed runs"
            + (", interleaved A/B" if b_path else ""),
            file=out,
        )
        print(f"  A: {args.model}", file=out)
        if b_path:
            print(f"  B: {args.compare}", file=out)
        for threads in args.threads:
            timers = {"A": _timer(a_path, probe, threads, args.model)}
            if b_path:
                timers["B"] = _timer(b_path, probe, threads, args.compare)
            medians = bench.interleaved(timers, rounds=args.runs, warmup=args.warmup)
            line = f"threads={threads}: A median {_ms(medians['A'])}"
            if b_path:
                ratio = medians["A"] / medians["B"] if medians["B"] > 0 else float("inf")
                line += f", B median {_ms(medians['B'])}, speed-up A/B {ratio:.2f}x"
            print(line, file=out)
    if a_model is not None and b_model is not None:
        _print_macs(a_model, b_model, out)
    return 0


def _ms(seconds):
    return f"{seconds * 1e3:.4g} ms"


def _print_macs(a_model, b_model, out):
    from tf_psp.profiling import profile

    try:
        a_macs, b_macs = profile(a_model).total_macs, profile(b_model).total_macs
    except ValueError:
        return
    if b_macs:
        print(
            f"MACs: A {a_macs:,}, B {b_macs:,} (reduction {a_macs / b_macs:.2f}x; "
            "speed-up fidelity = speed-up / MAC reduction)",
            file=out,
        )


# --- latency-table ------------------------------------------------------------


def _cmd_latency_table(args, out):
    from tf_psp import latency

    if args.points < 2:
        raise CLIError(f"--points must be at least 2, got {args.points}", status=2)
    if args.runs < 1:
        raise CLIError(f"--runs must be at least 1, got {args.runs}", status=2)
    _check_runtime_arguments(args)
    model = _load_keras(args.model)
    try:
        table = latency.latency_table(model, runtime=args.runtime, threads=args.threads,
                                      points=args.points, runs=args.runs,
                                      cache_dir=args.cache_dir, refresh=args.refresh,
                                      quantization=args.quantization)
    except ValueError as error:
        raise CLIError(f"cannot build the latency table: {_first_line(error)}",
                       args.model) from error
    print(f"latency table of '{table.model}': {table.describe()}, "
          f"{len(table.layers)} kernel layers, quantum {table.quantum} (round_to='auto'), "
          f"built in {table.build_seconds:.0f} s", file=out)
    print(f"dense latency {_ms(table.dense_seconds)}; cost model: "
          f"{_ms(table.fixed_seconds)} + {table.scale:.3f} x sum of the layer tables", file=out)
    for row in table.calibration:
        print(f"  {row['model']:<16} measured {_ms(row['measured'])}, "
              f"predicted {_ms(row['predicted'])}", file=out)
    entries = sorted(table.layers.values(), key=lambda e: -e.seconds(e.cin, e.cout))
    print("slowest layers at full width (in the model):", file=out)
    for e in entries[:args.top]:
        print(f"  {e.name:<32} {e.cin:>5} -> {e.cout:<5} "
              f"{_ms(table.scale * e.seconds(e.cin, e.cout))}", file=out)
    if args.output:
        table.save(args.output)
        print(f"wrote {args.output}", file=out)
    if args.plot:
        latency.plot_table(table, args.plot)
        print(f"wrote {args.plot}", file=out)
    return 0


# --- prune --------------------------------------------------------------------


def _optimizer(args):
    """The optimizer --optimizer and --learning-rate ask for (None: prune's default)."""
    if args.optimizer is None and args.learning_rate is None:
        return None
    import keras

    if args.optimizer == "adam":
        return keras.optimizers.Adam(args.learning_rate or 1e-3)
    return keras.optimizers.SGD(args.learning_rate or 0.01, momentum=0.9)


def _cmd_prune(args, out, err):
    from tf_psp import training_data
    from tf_psp.pipeline import prune

    if args.epochs < 1:
        raise CLIError(f"--epochs must be at least 1, got {args.epochs}", status=2)
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}", status=2)
    _check_runtime_arguments(args)
    if not args.output.lower().endswith(".keras"):
        raise CLIError("the output must be a .keras file", args.output, status=2)
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.output))):
        raise CLIError("output directory does not exist",
                       os.path.dirname(os.path.abspath(args.output)), status=2)
    model = _load_keras(args.model, compile=True)
    try:
        data = training_data.load_training_data(
            args.data, model, batch_size=args.batch_size,
            validation_split=args.validation_split, seed=args.seed)
        validation = data.validation
        if args.validation_data is not None:
            if validation is not None:
                raise CLIError("pass --validation-split or --validation-data, not both", status=2)
            validation = training_data.load_training_data(
                args.validation_data, model, batch_size=args.batch_size, seed=args.seed).train
    except training_data.DataError as error:
        raise CLIError(str(error), status=2) from error
    print(data.description, file=out)
    loss, metrics = args.loss, None
    if loss is None and not getattr(model, "compiled", False):
        try:
            loss, words = training_data.default_loss(model, data)
        except training_data.DataError as error:
            raise CLIError(str(error), args.model, status=2) from error
        metrics = ["accuracy"]
        print(f"{PROG}: note: {args.model} is not compiled: training with {words}; "
              "pass --loss to choose another", file=err)
    import keras

    keras.utils.set_random_seed(args.seed)
    try:
        # prune prints its progress and its report (verbose) to stdout.
        with contextlib.redirect_stdout(out):
            small, report = prune(
                model, data.train, keep_macs=args.keep_macs, keep_latency=args.keep_latency,
                epochs=args.epochs, fine_tune_epochs=args.fine_tune_epochs,
                validation_data=validation, optimizer=_optimizer(args), loss=loss,
                metrics=metrics, batch_size=args.batch_size, round_to=args.round_to,
                runtime=args.runtime, threads=args.threads, quantization=args.quantization,
                verbose=2 if args.quiet_training else 1)
    except ValueError as error:
        raise CLIError(f"cannot prune: {_first_line(error)}", args.model) from error
    _save_keras_atomic(small, args.output)
    print(f"Wrote {args.output}", file=out)
    if args.report:
        _write_json(args.report, report.to_dict())
        print(f"Wrote {args.report}", file=out)
    return 0


def _round_to(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'auto', got {text!r}")
    return value


def _fraction(text):
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1], got {text!r}")
    return value


def _add_prune_parser(commands, common):
    p = commands.add_parser(
        "prune",
        parents=[common],
        help="prune a trained model to a MAC or latency budget (trains with PSP)",
        description="Prune a trained .keras model to a budget with tf_psp.prune: "
        "PSP budget training on the data, then shrinking; writes a smaller plain Keras "
        "model and prints the report (MACs, parameters, accuracy before and after when "
        "there is validation data). The model's compiled loss and optimizer are used; "
        "an uncompiled model with class labels trains with cross-entropy (said on stderr).",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the trained Keras model file")
    p.add_argument("--data", required=True, metavar="DIR|FILE.npz",
                   help="a folder with one subfolder of images per class (resized to the "
                   "model's input size, pixel values 0-255), or a .npz file with arrays x "
                   "(inputs) and y (labels)")
    p.add_argument("-o", "--output", required=True, metavar="OUT.keras",
                   help="where to write the pruned model")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep-macs", type=_fraction, metavar="F",
                        help="fraction of the MACs to keep (default 0.5)")
    budget.add_argument("--keep-latency", type=_fraction, metavar="F",
                        help="fraction of the TFLite latency to keep (measures a latency "
                        "table first, cached; minutes)")
    p.add_argument("--epochs", type=int, default=10,
                   help="budget-training epochs (default: 10)")
    p.add_argument("--fine-tune-epochs", type=int, default=0,
                   help="epochs of training the shrunk model afterwards (default: 0)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    p.add_argument("--validation-split", type=float, default=0.0, metavar="F",
                   help="hold out this fraction of --data for validation (a .npz: its "
                   "last samples; a folder: a seeded random split)")
    p.add_argument("--validation-data", metavar="DIR|FILE.npz",
                   help="validation data, like --data")
    p.add_argument("--loss", help="a Keras loss name (default: the model's compiled loss; "
                   "uncompiled: cross-entropy for class labels)")
    p.add_argument("--optimizer", choices=["sgd", "adam"],
                   help="default: the model's compiled optimizer, else SGD with momentum 0.9")
    p.add_argument("--learning-rate", type=float, metavar="LR",
                   help="learning rate (default: 0.01 for SGD, 0.001 for Adam)")
    p.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                   help="keep widths multiples of N; auto: the latency table's quantum "
                   "(default: 1)")
    _add_runtime_arguments(p, "of the latency budget")
    p.add_argument("--threads", type=int, default=1,
                   help="runtime threads of the latency budget (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--report", metavar="FILE.json", help="also write the report as JSON")
    p.add_argument("--quiet-training", action="store_true",
                   help="one line per epoch instead of progress bars")


def _check_runtime_arguments(args):
    if args.quantization is not None and args.runtime != "tflite":
        raise CLIError(f"--quantization {args.quantization} is tabulated for runtime='tflite' "
                       f"only, not --runtime {args.runtime}", status=2)


def _add_runtime_arguments(p, what):
    # Literal choices (tf_psp.latency_targets.RUNTIMES): --help imports nothing heavy.
    p.add_argument("--runtime", choices=["tflite", "onnxruntime"], default="tflite",
                   help=f"runtime {what}: tflite (LiteRT/XNNPACK) or onnxruntime (CPU) "
                   "(default: tflite)")
    p.add_argument("--quantization", choices=["int8"], default=None,
                   help="int8: full-integer TFLite, as `tf-psp export --format tflite-int8` "
                   "writes it (default: float32)")


# --- the parser ---------------------------------------------------------------


def _thread_counts(text):
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        counts = []
    if not counts or any(c < 1 for c in counts):
        raise argparse.ArgumentTypeError(
            f"expected positive thread counts like 1 or 1,2, got {text!r}"
        )
    return counts


def build_parser():
    """The `tf-psp` argument parser."""
    parser = _Parser(
        prog=PROG,
        description="Parameterized Structured Pruning (PSP) tools for Keras 3 models.",
        epilog="Run 'tf-psp COMMAND --help' for the options of a command.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {tf_psp.__version__}")
    verbose_help = ("show TensorFlow, absl, tf2onnx and LiteRT log lines (hidden by "
                    "default)")
    parser.add_argument("--verbose", action="store_true", help=verbose_help)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose_help)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    commands.required = True

    p = commands.add_parser(
        "profile",
        parents=[common],
        help="print MACs, parameters and PSP sparsity per layer",
        description="Print the MACs, parameters and PSP sparsity of every layer "
        "of a .keras model, and the MAC reduction that shrinking it can reach.",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the Keras model file")
    p.add_argument("--json", action="store_true", help="print the profile as JSON")

    p = commands.add_parser(
        "shrink",
        parents=[common],
        help="remove the pruned structures: a smaller plain Keras model",
        description="Strip the PSP layers of a .keras model and physically remove "
        "the pruned channels (tf_psp.shrink.strip_and_shrink). The output is a plain "
        "Keras model (no tf_psp classes) computing what the PSP model computes in "
        "inference mode; the command measures this on a random batch and prints the "
        "MAC reduction.",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the PSP model file")
    p.add_argument("output", metavar="OUT.keras", help="where to write the shrunk model")
    p.add_argument(
        "--round-to",
        type=int,
        default=1,
        metavar="N",
        help="keep every channel width a multiple of N (keeps the pruned channels "
        "with the largest |alpha|; default 1: no rounding). 8 or 16 often runs faster.",
    )
    p.add_argument(
        "--approximate",
        action="store_true",
        help="also remove constant channels that padded convs cannot absorb exactly "
        "(folds them as if there were no padding; the deviation is measured and printed)",
    )
    p.add_argument(
        "--report",
        metavar="FILE.json",
        help="also write the shrink report, MACs and error as JSON",
    )

    p = commands.add_parser(
        "export",
        parents=[common],
        help="export to SavedModel, TFLite (float32, float16, int8) or ONNX",
        description="Export a .keras model and check the export against Keras on a "
        "random batch (tf_psp.export).",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the Keras model file")
    p.add_argument(
        "output",
        metavar="OUT",
        help="output file (.tflite, .onnx) or SavedModel directory",
    )
    p.add_argument(
        "--format",
        choices=list(EXPORT_FORMATS),
        help="export format; default: from the suffix of OUT (.tflite -> tflite, "
        ".onnx -> onnx, none -> saved_model)",
    )
    p.add_argument(
        "--calibration",
        metavar="FILE.npy",
        help="tflite-int8 only: calibration inputs, an array of shape (N, ...input "
        "shape); default: random-normal data (with a warning)",
    )

    p = commands.add_parser(
        "bench",
        parents=[common],
        help="time a model (or two, interleaved) with LiteRT/XNNPACK",
        description="Convert MODEL (and OTHER) to TFLite in a temporary directory and "
        "time them with the LiteRT interpreter (XNNPACK), batch 1, alternating A/B one "
        "run at a time. Prints the medians and the speed-up A/B (above 1: B is faster).",
    )
    p.add_argument("model", metavar="MODEL", help="model A: a .keras or .tflite file")
    p.add_argument(
        "--compare", metavar="OTHER", help="model B (.keras or .tflite), e.g. the shrunk model"
    )
    p.add_argument(
        "--threads",
        type=_thread_counts,
        default=[1],
        metavar="N[,N...]",
        help="interpreter threads; a comma-separated list times each, e.g. 1,2 "
        "(default: 1)",
    )
    p.add_argument("--runs", type=int, default=50, help="timed runs per model (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default: 5)")

    p = commands.add_parser(
        "latency-table",
        parents=[common],
        help="measure the per-layer latency table of a model (for latency budgets)",
        description="Measure how long every kernel layer of a .keras model takes at a "
        "grid of input and output widths on a runtime (tf_psp.latency_table), fit the "
        "latency cost model on whole shrunk models, and print it. Points are cached on "
        "disk ($TF_PSP_CACHE or ~/.cache/tf_psp), so a second run is instant.",
    )
    p.add_argument("model", metavar="MODEL.keras", help="the Keras model file")
    _add_runtime_arguments(p, "to measure on")
    p.add_argument("--threads", type=int, default=1, help="runtime threads (default: 1)")
    p.add_argument("--points", type=int, default=5,
                   help="grid points per width axis (default: 5)")
    p.add_argument("--runs", type=int, default=15,
                   help="timing rounds per point (default: 15, as tf_psp.latency_table, so "
                   "the CLI and prune(keep_latency=...) share cached tables)")
    p.add_argument("--output", metavar="FILE.json", help="write the table as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="plot latency vs width per layer")
    p.add_argument("--cache-dir", help="cache directory (default: $TF_PSP_CACHE/latency)")
    p.add_argument("--refresh", action="store_true", help="measure again, ignore the cache")
    p.add_argument("--top", type=int, default=10, help="slowest layers to list (default: 10)")

    _add_prune_parser(commands, common)
    return parser


def main(argv=None, out=None, err=None):
    """Runs `tf-psp` with `argv` (default: `sys.argv[1:]`).

    Args:
        argv: the arguments, without the program name.
        out: stream for results (default: stdout).
        err: stream for errors and warnings (default: stderr).

    Returns:
        The exit status: 0 success, 1 failure, 2 wrong usage.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.verbose:
            quiet.show_library_logs()  # before a command loads TensorFlow
        if args.command == "profile":
            return _cmd_profile(args, out)
        if args.command == "shrink":
            return _cmd_shrink(args, out)
        if args.command == "export":
            return _cmd_export(args, out, err)
        if args.command == "latency-table":
            return _cmd_latency_table(args, out)
        if args.command == "prune":
            return _cmd_prune(args, out, err)
        return _cmd_bench(args, out)
    except CLIError as error:
        print(f"{PROG}: error: {error}", file=err)
        return error.status
    except SystemExit as exit_:  # --help, --version
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=err)
        return 130
    except OSError as error:
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        print(f"{PROG}: error: {error.strerror or error}{where}", file=err)
        return 1


if __name__ == "__main__":
    sys.exit(main())
