"""Where a latency table is measured: a runtime, its threads and its number format.

`target(runtime, threads, quantization)` returns a `Target`, which `tf_psp.latency`
asks to convert layers (many layers side by side in one file: one conversion),
to copy converted layers at other widths, and to time layers and whole models,
interleaved, the fastest of `runs` rounds:

- `'tflite'`: LiteRT with its default XNNPACK delegate. `quantization=None`:
  float32; `'int8'`: full-integer post-training quantization calibrated on
  random inputs, int8 inputs and outputs, as
  `export.export_tflite(quantization='int8')` writes a model. Points are the
  signatures of one multi-signature file (`tflite_widths`).
- `'onnxruntime'`: ONNX Runtime's CPU execution provider with its default
  graph optimizations, float32, converted by tf2onnx. A layer is converted
  with NCHW inputs and outputs (inside a whole model tf2onnx's optimizer
  removes the transposes between layers, so a layer alone would otherwise be
  timed with two transposes it does not have); whole models as
  `export.export_onnx` writes them (NHWC inputs). One session per point
  (`onnx_widths`).

With one thread each time is the invoking thread's CPU time (both runtimes run
a one-thread call in the calling thread), which does not count the time other
processes held the core; else wall-clock time.
"""

import tempfile
import time
import warnings

import numpy as np

RUNTIMES = ("tflite", "onnxruntime")
QUANTIZATIONS = (None, "int8")
_CALIBRATION_SAMPLES = 3  # random inputs an int8 conversion is calibrated on


def target(runtime="tflite", threads=1, quantization=None):
    """The `Target` for `runtime` with `threads` threads and `quantization`.

    Raises:
        ValueError: an unknown runtime or quantization, a quantization the
            runtime has no table for, or threads not a positive integer.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r} (JAX on a GPU "
                         "is not tabulated yet).")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}.")
    if runtime == "onnxruntime" and quantization is not None:
        raise ValueError(f"quantization={quantization!r} is tabulated for runtime='tflite' "
                         "only; ONNX Runtime tables are float32.")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}.")
    cls = TFLiteTarget if runtime == "tflite" else OnnxTarget
    return cls(runtime, threads, quantization)


class Target:
    """A runtime, its threads and number format; see the module docstring.

    Attributes:
        runtime, threads, quantization: as given to `target`.
    """

    fine_alignment = False  # tables look for a width alignment finer than the quantum
    input_alignment = False  # tables tell input widths on and off the quantum apart

    def __init__(self, runtime, threads, quantization):
        self.runtime, self.threads, self.quantization = runtime, threads, quantization

    @property
    def label(self):
        """The runtime and number format in one word (`'tflite-int8'`): a cache key."""
        return self.runtime + (f"-{self.quantization}" if self.quantization else "")

    def describe(self):
        """`'tflite int8, 1 thread(s)'`."""
        kind = f" {self.quantization}" if self.quantization else ""
        return f"{self.runtime}{kind}, {self.threads} thread(s)"

    def version(self):
        """The versions of the packages that convert and run (part of every cache key)."""
        raise NotImplementedError

    def clock(self):
        """The calling thread's CPU time with one runtime thread, else wall-clock time."""
        return clock(self.threads)

    def convert_layers(self, models):
        """One converted file running each of `models` (one input, one output) on its own
        input; raises whatever the converter raises."""
        raise NotImplementedError

    def patcher(self, converted, templates):
        """A width patcher (`tflite_widths` / `onnx_widths`) over `converted` files."""
        raise NotImplementedError

    def time_copies(self, patcher, points, runs, outputs=None):
        """Fastest seconds of each `(template id, w_in, w_out)` copy, interleaved.

        Raises:
            ValueError, RuntimeError: a copy did not load or has another output width.
        """
        raise NotImplementedError

    def time_models(self, models, runs, layers=False):
        """Fastest seconds of each single-input, single-output model, interleaved;
        `layers`: the models are layers of a table (converted as `convert_layers`),
        else whole models (converted as the runtime's export writes them)."""
        raise NotImplementedError


# --- TFLite (LiteRT, XNNPACK) -------------------------------------------------------


class TFLiteTarget(Target):
    """LiteRT with XNNPACK, float32 or full-integer int8."""

    def version(self):
        import importlib.metadata

        return "ai-edge-litert " + importlib.metadata.version("ai-edge-litert")

    def convert_layers(self, models):
        return convert_function(models, self.quantization)

    def patcher(self, converted, templates):
        from tf_psp.tflite_widths import WidthPatcher

        return WidthPatcher(converted, templates)

    def time_copies(self, patcher, points, runs, outputs=None):
        content, keys = patcher.batch(points)
        return time_signatures(content, keys, self.threads, runs, outputs=outputs)

    def time_models(self, models, runs, layers=False):
        content, keys = None, [f"m{k}" for k in range(len(models))]
        if all(len(m.inputs) == 1 and len(m.outputs) == 1 for m in models):
            try:
                patcher = self.patcher([self.convert_layers(models)], _identity(models))
                if len(patcher.ids) == len(models):
                    content, keys = patcher.batch([(k, 0, 0) for k in range(len(models))])
            except Exception:  # noqa: BLE001 - converted the slow way below
                content = None
        if content is None:
            if self.quantization is not None:
                raise ValueError(f"could not convert {len(models)} model(s) to "
                                 f"{self.quantization} TFLite in one function")
            content, keys = convert_archive(models)
        return time_signatures(content, keys, self.threads, runs)


def _identity(models):
    """Templates that copy each model as it is (no marker widths)."""
    return {k: (0, k, {}, (1,) + tuple(int(d) for d in m.inputs[0].shape[1:]),
                int(m.outputs[0].shape[-1])) for k, m in enumerate(models)}


def convert_function(models, quantization=None):
    """One `.tflite` (bytes): a single subgraph running each of `models` (one input, one
    output each) on its own input, inputs and outputs in order.

    The converter's graph route (freeze the variables of one traced function)
    takes 2 s for MobileNetV2-224 where a SavedModel takes 15 s.
    `quantization='int8'`: full-integer, calibrated on random normal inputs,
    int8 inputs and outputs.
    """
    import logging

    import tensorflow as tf

    from tf_psp import quiet

    specs = [tf.TensorSpec((1,) + tuple(m.inputs[0].shape[1:]), tf.float32) for m in models]

    def run(*xs):
        return [m(x, training=False) for m, x in zip(models, xs)]

    concrete = tf.function(run, jit_compile=False).get_concrete_function(*specs)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete])
    if quantization == "int8":
        def dataset():
            rng = np.random.default_rng(0)
            for _ in range(_CALIBRATION_SAMPLES):
                yield [rng.standard_normal(s.shape).astype(np.float32) for s in specs]

        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = dataset
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    absl = logging.getLogger("absl")
    level = absl.level
    absl.setLevel(logging.ERROR)  # "please provide trackable_obj": the route is chosen
    try:
        with warnings.catch_warnings(), quiet.native_stderr_filtered():
            warnings.simplefilter("ignore")
            return converter.convert()
    finally:
        absl.setLevel(level)


def convert_archive(models):
    """`(content, keys)`: one multi-signature float `.tflite`, a signature `m<k>` per
    model, through a SavedModel (slower than `convert_function`, converts more)."""
    import keras
    import tensorflow as tf

    from tf_psp import quiet

    archive = keras.export.ExportArchive()
    keys = []
    for k, model in enumerate(models):
        archive.track(model)
        key = f"m{k}"
        archive.add_endpoint(key, _endpoint(model), input_signature=[
            tf.TensorSpec((1,) + tuple(model.inputs[0].shape[1:]), tf.float32)])
        keys.append(key)
    with tempfile.TemporaryDirectory(prefix="tf_psp_latency_") as saved:
        archive.write_out(saved, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(saved, signature_keys=keys)
        with warnings.catch_warnings(), quiet.native_stderr_filtered():
            warnings.simplefilter("ignore")
            return converter.convert(), keys


def _endpoint(model):
    def call(x):
        return model(x, training=False)

    return call


def _random_input(shape, dtype, rng):
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def time_signatures(content, keys, threads, runs, warmup=3, outputs=None):
    """Fastest time (seconds) of each signature of a multi-signature `.tflite`, interleaved.

    The minimum over `runs` rounds of the target's clock: with one thread the
    CPU time of this thread, which does not count the time other processes
    held the core (on these 2 cores at load 5 the wall-clock minimum of
    MobileNetV2-224 was 14.5 ms, its CPU time 6.8 ms, as on the idle
    machine); a run that is interrupted anyway only takes longer, so the
    minimum is what the layer costs on a quiet core. `outputs`: the expected
    size of each signature's output on its last axis (checked; ValueError if not).
    """
    from ai_edge_litert.interpreter import Interpreter

    from tf_psp import compat, quiet

    with quiet.native_stderr_filtered():  # "Created TensorFlow Lite XNNPACK delegate"
        interpreter = Interpreter(model_content=content, num_threads=threads)
        runners = [interpreter.get_signature_runner(key) for key in keys]
        rng = np.random.default_rng(0)
        for runner in runners:  # the first call prepares the signature (and the delegate)
            (name, detail), = runner.get_input_details().items()
            runner(**{name: _random_input(detail["shape"], detail["dtype"], rng)})
    invokes = []
    for k, (key, runner) in enumerate(zip(keys, runners)):
        if outputs is not None:
            (out,) = runner.get_output_details().values()
            if int(out["shape"][-1]) != outputs[k]:
                raise ValueError(f"signature {key}: output width {out['shape'][-1]}, "
                                 f"expected {outputs[k]}")
        invokes.append(compat.litert_invoker(runner))
    return _interleaved(invokes, clock(threads), runs, warmup)


def clock(threads):
    """The calling thread's CPU time with one runtime thread (both runtimes then run in the
    calling thread), else wall-clock time (other threads work too)."""
    return time.thread_time if threads == 1 else time.perf_counter


def _interleaved(calls, clock, runs, warmup):
    """The fastest of `runs` timed rounds of each call, the calls interleaved.

    One call per sample, interleaved: between two calls of a layer the others
    evict its weights from the caches, as the other layers of a model do
    (repeating a layer back to back would time it hot).
    """
    for _ in range(warmup):
        for call in calls:
            call()
    samples = [[] for _ in calls]
    for _ in range(runs):
        for k, call in enumerate(calls):
            start = clock()
            call()
            samples[k].append(clock() - start)
    return [float(np.min(s)) for s in samples]


# --- ONNX Runtime -------------------------------------------------------------------


class OnnxTarget(Target):
    """ONNX Runtime, CPU execution provider, float32, converted by tf2onnx.

    Its depthwise kernel runs any multiple of 4 channels at the speed of the
    next multiple of the quantum, and other widths at half that speed: its
    tables measure that finer alignment (`latency.measure_fine_quantum`). A
    conv whose input width is not a multiple of the quantum (its NCHWc block)
    runs on another kernel: its tables have input widths on and off the
    quantum.
    """

    fine_alignment = True
    input_alignment = True

    def version(self):
        import importlib.metadata

        return ("onnxruntime " + importlib.metadata.version("onnxruntime")
                + " tf2onnx " + importlib.metadata.version("tf2onnx"))

    def convert_layers(self, models):
        return convert_onnx(models, nchw=True)

    def patcher(self, converted, templates):
        from tf_psp.onnx_widths import OnnxWidthPatcher

        return OnnxWidthPatcher(converted, templates)

    def time_copies(self, patcher, points, runs, outputs=None):
        return self._time(patcher.batch(points), runs, outputs)

    def time_models(self, models, runs, layers=False):
        patcher = self.patcher([convert_onnx(models, nchw=layers)], _identity(models))
        if len(patcher.ids) != len(models):
            raise ValueError(f"could not cut {len(models)} model(s) out of their ONNX "
                             "conversion")
        return self._time(patcher.batch([(k, 0, 0) for k in range(len(models))]), runs)

    def _time(self, blobs, runs, outputs=None, warmup=3):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # a copy that does not load is our error, said below
        rng = np.random.default_rng(0)
        calls = []
        for k, blob in enumerate(blobs):
            try:
                session = onnxruntime.InferenceSession(
                    blob, options, providers=["CPUExecutionProvider"])
                (x,) = session.get_inputs()
                feed = {x.name: _random_input(x.shape, np.float32, rng)}
                (y,) = session.run(None, feed)
            except Exception as error:  # noqa: BLE001 - ORT raises its own Fail types
                raise RuntimeError(f"ONNX point {k} did not run: {error}") from error
            if outputs is not None and outputs[k] not in y.shape[1:]:
                raise ValueError(f"ONNX point {k}: output shape {y.shape}, expected width "
                                 f"{outputs[k]}")
            calls.append(_runner(session, feed))
        return _interleaved(calls, self.clock(), runs, warmup)


def _runner(session, feed):
    return lambda: session.run(None, feed)


def convert_onnx(models, nchw=False):
    """One `onnx.ModelProto` running each of `models` on its own input `x<k>` to `y<k>`.

    `nchw`: rank-4 inputs and outputs in NCHW (a layer as it runs inside a
    converted model), else as the Keras models have them.
    """
    import tensorflow as tf
    import tf2onnx

    from tf_psp import quiet

    specs = [tf.TensorSpec((1,) + tuple(m.inputs[0].shape[1:]), tf.float32, name=f"x{k}")
             for k, m in enumerate(models)]

    def run(*xs):
        return {f"y{k}": m(x, training=False) for k, (m, x) in enumerate(zip(models, xs))}

    four = [k for k, m in enumerate(models)
            if len(m.inputs[0].shape) == 4 and len(m.outputs[0].shape) == 4]
    with warnings.catch_warnings(), quiet.native_stderr_filtered():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_function(
            tf.function(run), input_signature=specs,
            inputs_as_nchw=[f"x{k}" for k in four] if nchw else None,
            outputs_as_nchw=[f"y{k}" for k in four] if nchw else None)
    return proto
