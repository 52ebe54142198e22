"""Latency measurement: LiteRT (TFLite), ONNX Runtime and Keras, interleaved A/B.

The measurement method of tf_psp: the dense and the shrunk model are timed in
one process, alternating A/B/A/B one invocation at a time, so that slow drifts
of the machine (frequency scaling, other processes) hit both alike; medians are
reported, and the speed-up is the ratio of the medians.

A *timer* is a callable that runs a model once on a fixed input and returns
the seconds it took. `tflite_timer`, `onnx_timer` and `keras_timer` build
them; `time_tflite`, `time_onnx` and `time_keras` time one model alone, and
`interleaved` and `compare` time several together.

TensorFlow, Keras, onnxruntime and ai_edge_litert are imported only when a
function needs them.
"""

import os
import statistics
import time

import numpy as np

from tf_psp import export

DEFAULT_WARMUP = 5
DEFAULT_RUNS = 50
_PROBE_SEED = 0


# --- timers -------------------------------------------------------------------


def tflite_timer(path, probe=None, num_threads=1, cpu_time=False):
    """A timer for one LiteRT interpreter invocation of a `.tflite` file.

    The interpreter uses its default delegate (XNNPACK for float models). The
    inputs are set once; each call times `interpreter.invoke()` only.

    Args:
        path: The `.tflite` file.
        probe: Input batch: an array (single input), a list of arrays in the
            model's input order or a dict keyed by input name. None: a seeded
            random-normal batch of one, shaped like the model's inputs.
        num_threads: CPU threads of the interpreter.
        cpu_time: time the CPU time of the calling thread instead of the
            wall clock (`num_threads=1` only: the interpreter then runs in
            it): what an invocation costs without the time other processes
            held the core, i.e. its latency on a quiet machine.

    Returns:
        A callable `() -> seconds`.
    """
    if cpu_time and num_threads != 1:
        raise ValueError(f"cpu_time=True times one thread; got num_threads={num_threads}.")
    interpreter = export.litert_interpreter(path, num_threads=num_threads)
    if probe is None:
        probe = tflite_probe(path)
    elif isinstance(probe, (list, tuple)) and len(probe) > 1:
        # An interpreter keeps no input order: key the arrays by the names
        # `export_tflite` recorded, the order of `model.inputs`.
        order = export._tflite_input_order(os.fspath(path))  # pylint: disable=protected-access
        if order is None or len(order) != len(probe):
            raise ValueError(
                f"'{os.fspath(path)}' records no input order for {len(probe)} "
                "inputs: pass the probe as a dict keyed by input name."
            )
        probe = dict(zip(order, probe))
    # Sets (and quantizes) the inputs and resizes the interpreter to the probe.
    export.run_tflite(interpreter, probe)
    invoke = interpreter.invoke
    clock = time.thread_time if cpu_time else time.perf_counter

    def timer():
        start = clock()
        invoke()
        return clock() - start

    return timer


def onnx_timer(path, probe=None, threads=1, cpu_time=False):
    """A timer for one ONNX Runtime (CPU) run of an `.onnx` file.

    Args:
        path: The `.onnx` file.
        probe: Input batch: an array, a list of arrays in input order or a dict
            keyed by input name. None: a seeded random-normal batch of one.
        threads: intra-op threads of the session (inter-op: 1).
        cpu_time: time the CPU time of the calling thread instead of the
            wall clock (`threads=1` only: the session then runs in it).

    Returns:
        A callable `() -> seconds`.
    """
    import onnxruntime

    if cpu_time and threads != 1:
        raise ValueError(f"cpu_time=True times one thread; got threads={threads}.")

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = int(threads)
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        os.fspath(path), options, providers=["CPUExecutionProvider"]
    )
    inputs = session.get_inputs()
    names = [i.name for i in inputs]
    if probe is None:
        rng = np.random.default_rng(_PROBE_SEED)
        probe = [
            rng.standard_normal(_static_shape(i.shape, f"'{os.fspath(path)}' input '{i.name}'"))
            for i in inputs
        ]
    if isinstance(probe, dict):
        arrays = [probe[name] for name in names]
    elif isinstance(probe, (list, tuple)):
        arrays = list(probe)
    else:
        arrays = [probe]
    if len(arrays) != len(names):
        raise ValueError(
            f"'{os.fspath(path)}' has {len(names)} inputs {names}, got {len(arrays)} arrays."
        )
    feeds = {
        name: np.asarray(array, dtype=np.float32 if "float" in i.type else None)
        for name, array, i in zip(names, arrays, inputs)
    }

    clock = time.thread_time if cpu_time else time.perf_counter

    def timer():
        start = clock()
        session.run(None, feeds)
        return clock() - start

    return timer


def keras_timer(model, probe):
    """A timer for one inference call of a Keras model.

    The call is a `tf.function` compiled with `jit_compile=False`: XLA is
    slower on CPUs (and Keras turns it on by default in `predict`).

    Args:
        model: A built `keras.Model` (TensorFlow backend).
        probe: Input batch as `model` takes it.

    Returns:
        A callable `() -> seconds` (includes copying the outputs to numpy).
    """
    import tensorflow as tf

    function = tf.function(lambda x: model(x, training=False), jit_compile=False)
    inputs = tf.nest.map_structure(tf.convert_to_tensor, probe)

    def timer():
        start = time.perf_counter()
        outputs = function(inputs)
        tf.nest.map_structure(lambda t: t.numpy(), outputs)
        return time.perf_counter() - start

    return timer


def tflite_probe(path, batch=1):
    """A seeded random-normal input batch shaped like a `.tflite` model's inputs.

    Args:
        path: The `.tflite` file.
        batch: Batch size (replaces the first dimension).

    Returns:
        An array for a single-input model, else a dict keyed by input name.
    """
    interpreter = export.litert_interpreter(path)
    details = interpreter.get_input_details()
    signatures = interpreter.get_signature_list()
    names = {}
    if len(signatures) == 1:
        runner = interpreter.get_signature_runner(next(iter(signatures)))
        names = {d["index"]: name for name, d in runner.get_input_details().items()}
    rng = np.random.default_rng(_PROBE_SEED)
    probe = {}
    for detail in details:
        shape = [int(d) for d in detail.get("shape_signature", detail["shape"])]
        where = f"'{os.fspath(path)}' input '{detail['name']}'"
        array = rng.standard_normal(_static_shape(shape, where, batch)).astype(np.float32)
        probe[names.get(detail["index"], detail["name"])] = array
    if len(probe) == 1:
        return next(iter(probe.values()))
    return probe


def _static_shape(shape, where, batch=1):
    shape = list(shape)
    dims = [batch] + shape[1:] if shape else []
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in dims):
        raise ValueError(
            f"{where} has shape {tuple(shape)} with unknown non-batch "
            "dimensions: pass a probe batch."
        )
    return [int(d) for d in dims]


# --- timing -------------------------------------------------------------------


def run_timer(timer, warmup=DEFAULT_WARMUP, runs=DEFAULT_RUNS):
    """Calls `timer` `warmup` times untimed, then `runs` times.

    Returns:
        The list of `runs` durations in seconds.
    """
    _check_counts(warmup, runs)
    for _ in range(warmup):
        timer()
    return [timer() for _ in range(runs)]


def time_tflite(path, probe=None, num_threads=1, warmup=DEFAULT_WARMUP, runs=DEFAULT_RUNS):
    """Times a `.tflite` file with the LiteRT interpreter (XNNPACK).

    Args:
        path: The `.tflite` file.
        probe: Input batch (see `tflite_timer`); None: random, batch of one.
        num_threads: CPU threads.
        warmup: Untimed invocations first.
        runs: Timed invocations.

    Returns:
        The list of `runs` durations in seconds.
    """
    return run_timer(tflite_timer(path, probe, num_threads), warmup, runs)


def time_onnx(path, probe=None, threads=1, warmup=DEFAULT_WARMUP, runs=DEFAULT_RUNS):
    """Times an `.onnx` file with ONNX Runtime on CPU.

    Args:
        path: The `.onnx` file.
        probe: Input batch (see `onnx_timer`); None: random, batch of one.
        threads: intra-op threads.
        warmup: Untimed runs first.
        runs: Timed runs.

    Returns:
        The list of `runs` durations in seconds.
    """
    return run_timer(onnx_timer(path, probe, threads), warmup, runs)


def time_keras(model, probe, warmup=DEFAULT_WARMUP, runs=DEFAULT_RUNS):
    """Times inference calls of a Keras model (`tf.function`, no XLA).

    Args:
        model: A built `keras.Model`.
        probe: Input batch as `model` takes it.
        warmup: Untimed calls first (the first one traces the function).
        runs: Timed calls.

    Returns:
        The list of `runs` durations in seconds.
    """
    return run_timer(keras_timer(model, probe), max(1, warmup), runs)


def interleaved(timers, rounds=DEFAULT_RUNS, warmup=DEFAULT_WARMUP, return_samples=False):
    """Times several models alternately: A, B, A, B, ... one run at a time.

    Args:
        timers: dict name -> timer (a callable `() -> seconds`).
        rounds: timed runs of each timer.
        warmup: untimed rounds first.
        return_samples: also return the durations of every run.

    Returns:
        dict name -> median seconds; with `return_samples`, a pair
        `(medians, samples)` with samples a dict name -> list of seconds.
    """
    _check_counts(warmup, rounds)
    if not timers:
        raise ValueError("interleaved() needs at least one timer.")
    for _ in range(warmup):
        for timer in timers.values():
            timer()
    samples = {name: [] for name in timers}
    for _ in range(rounds):
        for name, timer in timers.items():
            samples[name].append(timer())
    medians = {name: statistics.median(values) for name, values in samples.items()}
    if return_samples:
        return medians, samples
    return medians


def file_timer(path, probe=None, num_threads=1):
    """A timer for a `.tflite` (LiteRT) or `.onnx` (ONNX Runtime) file."""
    if os.fspath(path).lower().endswith(".onnx"):
        return onnx_timer(path, probe, num_threads)
    return tflite_timer(path, probe, num_threads)


def compare(
    a_path,
    b_path,
    probe=None,
    num_threads=1,
    runs=DEFAULT_RUNS,
    warmup=DEFAULT_WARMUP,
):
    """Times two exported models interleaved and reports the speed-up of B over A.

    Typically A is the dense (PSP or stripped) model and B the shrunk one.

    Args:
        a_path: `.tflite` or `.onnx` file of model A.
        b_path: `.tflite` or `.onnx` file of model B.
        probe: Input batch fed to both; None: a seeded random-normal batch of
            one shaped like A's inputs.
        num_threads: CPU threads of each runtime.
        runs: timed runs of each model.
        warmup: untimed rounds first.

    Returns:
        A dict with `a`, `b` (the paths), `a_median_s`, `b_median_s`,
        `speedup` (`a_median_s / b_median_s`: above 1 when B is faster),
        `num_threads`, `runs` and `warmup`.
    """
    a_path, b_path = os.fspath(a_path), os.fspath(b_path)
    if probe is None:
        probe = _file_probe(a_path)
    timers = {
        "a": file_timer(a_path, probe, num_threads),
        "b": file_timer(b_path, probe, num_threads),
    }
    medians = interleaved(timers, rounds=runs, warmup=warmup)
    return {
        "a": a_path,
        "b": b_path,
        "a_median_s": medians["a"],
        "b_median_s": medians["b"],
        "speedup": medians["a"] / medians["b"] if medians["b"] > 0 else float("inf"),
        "num_threads": int(num_threads),
        "runs": int(runs),
        "warmup": int(warmup),
    }


def _file_probe(path):
    if path.lower().endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(_PROBE_SEED)
        probe = {
            i.name: rng.standard_normal(_static_shape(i.shape, f"'{path}' input '{i.name}'"))
            .astype(np.float32)
            for i in session.get_inputs()
        }
        return next(iter(probe.values())) if len(probe) == 1 else probe
    return tflite_probe(path)


def _check_counts(warmup, runs):
    if int(runs) < 1:
        raise ValueError(f"runs must be at least 1, got {runs}.")
    if int(warmup) < 0:
        raise ValueError(f"warmup must not be negative, got {warmup}.")
