"""Export Keras models to SavedModel, TFLite (LiteRT) and ONNX, verified against Keras.

Each `export_*` function writes its file (or directory) atomically, runs the
exported model on a probe batch and compares it with the Keras model, and
returns an `ExportResult`. The model itself is never modified.

Inputs of the exported TFLite and ONNX models follow `model.inputs`, and their
outputs follow `model.outputs` (the flattened output structure), so the same
list of arrays can be fed to Keras, `run_tflite` and `run_onnx`.

TensorFlow, tf2onnx, onnxruntime and ai_edge_litert are imported only when a
function needs them, so `import tf_psp` stays light.
"""

import dataclasses
import json
import os
import re
import tempfile
import warnings

import numpy as np

from tf_psp import atomic, compat, nchw, quiet, recurrent_export

FORMATS = ("saved_model", "tflite", "onnx")
TFLITE_QUANTIZATIONS = (None, "float16", "int8")

# Signature name of the flat endpoint used for TFLite conversion.
_FLAT_ENDPOINT = "serving_default"
# TFLite metadata entry holding the input names in `model.inputs` order.
# Needed for multi-input models: the converter keys signature inputs by name,
# and neither the signature nor the interpreter keeps the argument order.
TFLITE_INPUT_NAMES_METADATA = "tf_psp_input_names"
_PROBE_SEED = 0
_PROBE_BATCH = 2


@dataclasses.dataclass(frozen=True)
class ExportResult:
    """What an export wrote and how closely it matches the Keras model.

    Attributes:
        path: Path of the exported file (or SavedModel directory).
        format: One of `"saved_model"`, `"tflite"`, `"onnx"`.
        size_bytes: Size on disk (all files, for a SavedModel directory).
        max_abs_error: Largest absolute difference from the Keras outputs on
            the probe batch, over all outputs.
        max_rel_error: Largest, over outputs, of max absolute difference
            divided by max absolute Keras output (scale-free).
        quantization: for `"tflite"`, the quantization of the file (`None`
            float32, `"float16"`, `"int8"`); `format` names the container.
    """

    path: str
    format: str
    size_bytes: int
    max_abs_error: float
    max_rel_error: float
    quantization: str = None


def export(model, path, format, **kwargs):  # pylint: disable=redefined-builtin
    """Exports `model` to `path` in the given format.

    Args:
        model: A built `keras.Model` (TensorFlow backend).
        path: Output file, or directory for `"saved_model"`.
        format: One of `"saved_model"`, `"tflite"`, `"onnx"`.
        **kwargs: Passed to `export_saved_model`, `export_tflite` or
            `export_onnx`.

    Returns:
        The `ExportResult` of the chosen export function.

    Raises:
        ValueError: If `format` is not supported.
    """
    functions = {
        "saved_model": export_saved_model,
        "tflite": export_tflite,
        "onnx": export_onnx,
    }
    if format not in functions:
        raise ValueError(
            f"Unsupported export format {format!r} for '{path}': "
            f"expected one of {list(FORMATS)}."
        )
    return functions[format](model, path, **kwargs)


def export_saved_model(model, path, probe=None):
    """Exports `model` as a TensorFlow SavedModel with `model.export()`.

    The SavedModel is written into a temporary directory beside `path` and
    then moved into place; an existing directory at `path` is replaced.

    Args:
        model: A built `keras.Model` (TensorFlow backend).
        path: Output directory.
        probe: Inputs to compare the export with Keras on: an array, a list
            of arrays in `model.inputs` order, or a dict keyed by input name.
            Defaults to a seeded random-normal batch of 2.

    Returns:
        An `ExportResult`; the SavedModel's `serve` endpoint is compared.

    Raises:
        ValueError: If `model` is not a built Keras model, or `path` is an
            existing file.
    """
    import tensorflow as tf

    _check_model(model)
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(
            f"Cannot export a SavedModel to '{path}': it exists and is not a "
            "directory. Remove it or choose another path."
        )
    inputs = _probe_inputs(model, probe)
    with atomic.directory_beside(path) as tmp_dir:
        model.export(tmp_dir, format="tf_saved_model", verbose=False)
    loaded = tf.saved_model.load(path)
    outputs = _flatten(loaded.serve(_pack_inputs(model, inputs)))
    return _result(model, path, "saved_model", inputs, outputs)


def export_tflite(model, path, quantization=None, representative_data=None, probe=None):
    """Exports `model` as a TFLite (LiteRT) flatbuffer.

    Conversion goes through a temporary SavedModel (the Keras-model route of
    the converter does not work with Keras 3). Recurrent layers (SimpleRNN,
    LSTM, GRU, also in Bidirectional) are converted unrolled when their
    sequence length is static, else the file gets a static batch of 1 (see
    `tf_psp.recurrent_export`); the model itself is not changed.

    Args:
        model: A built `keras.Model` (TensorFlow backend).
        path: Output `.tflite` file.
        quantization: `None` (float32), `"float16"` (float16 weights, float32
            inputs and outputs) or `"int8"` (full-integer post-training
            quantization; int8 inputs and outputs).
        representative_data: Calibration inputs, required for `"int8"`: an
            array (single-input model), a tuple or dict of arrays (one per
            input), or an iterable of such batches (list, generator,
            `tf.data.Dataset`; `(x, y)` pairs are accepted). Use a few hundred
            samples of real data.
        probe: Inputs to compare the export with Keras on (see
            `export_saved_model`).

    Returns:
        An `ExportResult`. For `"int8"` the probe is quantized with the input
        scale and zero point and the outputs dequantized before comparing.

    Raises:
        ValueError: If `model` is not a built Keras model, `quantization` is
            not supported, or `"int8"` is asked without `representative_data`.
    """
    _check_model(model)
    path = os.fspath(path)
    if quantization not in TFLITE_QUANTIZATIONS:
        raise ValueError(
            f"Unsupported TFLite quantization {quantization!r} for '{path}': "
            f"expected one of {list(TFLITE_QUANTIZATIONS)}."
        )
    if quantization == "int8" and representative_data is None:
        raise ValueError(
            f"int8 quantization of '{path}' needs `representative_data`: pass a "
            "few hundred samples of the model's inputs for calibration."
        )
    _check_file_target(path)
    inputs = _probe_inputs(model, probe)
    ready, batch = recurrent_export.tflite_ready(model)  # RNNs: unrolled, or batch 1
    content = _convert_tflite(ready, quantization, representative_data, batch)
    if len(model.inputs) > 1:
        content = _with_tflite_metadata(
            content, TFLITE_INPUT_NAMES_METADATA, json.dumps(_input_names(model)).encode()
        )
    atomic.write_bytes(path, content)
    if batch is None:
        outputs = run_tflite(path, inputs)
    else:  # a static batch of 1: one probe sample per invoke
        runs = [run_tflite(path, [a[k:k + 1] for a in inputs])
                for k in range(len(inputs[0]))]
        outputs = [np.concatenate(parts) for parts in zip(*runs)]
    return dataclasses.replace(
        _result(model, path, "tflite", inputs, outputs), quantization=quantization)


def export_onnx(model, path, opset=None, probe=None):
    """Exports `model` as an ONNX model with tf2onnx.

    Args:
        model: A built `keras.Model` (TensorFlow backend).
        path: Output `.onnx` file.
        opset: ONNX opset version; `None` uses tf2onnx's default.
        probe: Inputs to compare the export with Keras on (see
            `export_saved_model`).

    Returns:
        An `ExportResult`; the model is run with onnxruntime on CPU.

    Raises:
        ValueError: If `model` is not a built Keras model.
    """
    import tensorflow as tf
    import tf2onnx

    _check_model(model)
    path = os.fspath(path)
    _check_file_target(path)
    inputs = _probe_inputs(model, probe)
    specs = _input_specs(model)
    function = tf.function(_flat_call(model), input_signature=specs)
    with quiet.native_stderr_filtered():
        model_proto, _ = tf2onnx.convert.from_function(
            function, input_signature=specs, opset=opset
        )
    atomic.write_bytes(path, model_proto.SerializeToString())
    outputs = run_onnx(path, inputs)
    return _result(model, path, "onnx", inputs, outputs)


def litert_interpreter(path, num_threads=1):
    """Returns an allocated LiteRT interpreter for a `.tflite` file.

    Args:
        path: The `.tflite` file.
        num_threads: CPU threads the interpreter may use.

    Returns:
        An `ai_edge_litert.interpreter.Interpreter` with tensors allocated.
    """
    from ai_edge_litert.interpreter import Interpreter

    with quiet.native_stderr_filtered():  # "Created TensorFlow Lite XNNPACK delegate"
        interpreter = Interpreter(model_path=os.fspath(path), num_threads=num_threads)
        interpreter.allocate_tensors()
    return interpreter


def run_tflite(path, inputs, num_threads=1):
    """Runs a `.tflite` model and returns its outputs as float arrays.

    int8/uint8 inputs are quantized and outputs dequantized with the tensors'
    scale and zero point, so float inputs can be fed to any model.

    Args:
        path: The `.tflite` file, or an interpreter from `litert_interpreter`.
        inputs: An array (single input), a dict keyed by input name, or a
            list of arrays in `model.inputs` order (for several inputs this
            needs a file written by `export_tflite`, which records the order;
            pass a dict when running an interpreter).
        num_threads: CPU threads, when `path` is a file.

    Returns:
        A list of numpy arrays in the model's output order (`model.outputs`
        for files written by `export_tflite`).

    Raises:
        ValueError: If the inputs do not match the model's inputs.
    """
    interpreter, order, where = path, None, "this interpreter"
    if isinstance(path, (str, os.PathLike)):
        interpreter = litert_interpreter(path, num_threads=num_threads)
        order = _tflite_input_order(path)
        where = f"'{os.fspath(path)}'"
    input_details, output_details = _tflite_io(interpreter)
    names = [name for name, _ in input_details]
    if len(names) > 1 and not isinstance(inputs, dict):
        if order is None or sorted(order) != sorted(names):
            raise ValueError(
                f"{where} has inputs {sorted(names)} in no recorded order: pass "
                "a dict keyed by input name."
            )
        by_name = dict(input_details)
        input_details = [(name, by_name[name]) for name in order]
        names = order
    arrays = _match_inputs(inputs, names, where)
    resized = False
    for (_, detail), array in zip(input_details, arrays):
        if tuple(detail["shape"]) != array.shape:
            interpreter.resize_tensor_input(detail["index"], array.shape, strict=False)
            resized = True
    if resized:
        interpreter.allocate_tensors()
    for (_, detail), array in zip(input_details, arrays):
        interpreter.set_tensor(detail["index"], _quantize(array, detail))
    interpreter.invoke()
    return [
        _dequantize(interpreter.get_tensor(detail["index"]), detail)
        for _, detail in output_details
    ]


def run_onnx(path, inputs):
    """Runs an `.onnx` model with onnxruntime on CPU.

    Args:
        path: The `.onnx` file.
        inputs: An array (single input), a list of arrays in the model's
            input order (`model.inputs`), or a dict keyed by input name.

    Returns:
        A list of numpy arrays in the model's output order.
    """
    import onnxruntime

    session = onnxruntime.InferenceSession(
        os.fspath(path), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    arrays = _match_inputs(inputs, names, os.fspath(path))
    feeds = {
        name: np.asarray(a, dtype=_onnx_dtype(i.type))
        for name, a, i in zip(names, arrays, session.get_inputs())
    }
    return [np.asarray(o) for o in session.run(None, feeds)]


# --- model inputs and outputs ---------------------------------------------


def _check_model(model):
    import keras

    if not isinstance(model, keras.Model):
        raise ValueError(
            f"Expected a keras.Model to export, got {type(model).__name__}."
        )
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"Exporting model '{model.name}' needs the TensorFlow backend, "
            f"Keras runs on '{keras.backend.backend()}'."
        )
    if not isinstance(model, keras.Sequential) and not compat.is_functional(model):
        raise ValueError(
            f"Model '{model.name}' is a subclassed keras.Model ({type(model).__name__}): "
            "it has no static graph to export with verification. Rebuild it with "
            "the functional API or Sequential (starting with keras.Input)."
        )
    try:
        model_inputs = model.inputs
    except (AttributeError, ValueError):
        model_inputs = None
    if not model_inputs or not model.built:
        raise ValueError(
            f"Model '{model.name}' has no defined inputs: build it with a "
            "keras.Input (functional model or Sequential starting with Input)."
        )


def _input_names(model):
    """Names of `model.inputs`, made valid and unique as TF signature names."""
    names = []
    for i, tensor in enumerate(model.inputs):
        name = re.sub(r"[^A-Za-z0-9_.\-]", "_", getattr(tensor, "name", "") or "")
        if not name or not name[0].isalnum() or name in names:
            name = f"input_{i}"
        names.append(name)
    return names


def _input_specs(model, batch=None):
    import tensorflow as tf

    return [
        tf.TensorSpec(tuple(tensor.shape) if batch is None else (batch,) + tuple(tensor.shape[1:]),
                      tensor.dtype, name=name)
        for tensor, name in zip(model.inputs, _input_names(model))
    ]


def _pack_inputs(model, arrays):
    """Arranges flat input arrays into the structure `model` is called with."""
    import keras

    if len(arrays) == 1:
        return arrays[0]
    structure = (compat.inputs_struct(model) if compat.is_graph_model(model) else None)
    if structure is not None:
        try:
            return keras.tree.pack_sequence_as(structure, list(arrays))
        except (TypeError, ValueError):
            pass
    return list(arrays)


def _flat_call(model):
    """A function of the flat inputs returning the flat list of outputs."""

    import keras

    def call(*arrays):
        return keras.tree.flatten(model(_pack_inputs(model, list(arrays)), training=False))

    return call


def _flatten(outputs):
    """Eager outputs (any structure) as a flat list of numpy arrays."""
    import keras

    return [keras.ops.convert_to_numpy(o) for o in keras.tree.flatten(outputs)]


def _probe_inputs(model, probe):
    """Probe inputs as a list of arrays in `model.inputs` order."""
    names = _input_names(model)
    if probe is not None:
        arrays = _match_inputs(probe, names, f"model '{model.name}'")
        return [
            np.asarray(a, dtype=_numpy_dtype(t.dtype)) for a, t in zip(arrays, model.inputs)
        ]
    rng = np.random.default_rng(_PROBE_SEED)
    arrays = []
    for tensor, name in zip(model.inputs, names):
        shape = list(tensor.shape)
        if any(d is None for d in shape[1:]):
            raise ValueError(
                f"Input '{name}' of model '{model.name}' has shape {tuple(shape)} "
                "with unknown non-batch dimensions: pass a `probe` batch."
            )
        shape = [_PROBE_BATCH] + shape[1:]
        dtype = _numpy_dtype(tensor.dtype)
        if np.issubdtype(dtype, np.floating):
            arrays.append(rng.standard_normal(shape).astype(dtype))
        else:
            arrays.append(rng.integers(0, 2, size=shape).astype(dtype))
    return arrays


def _match_inputs(inputs, names, where):
    """Orders `inputs` (array, list or dict) like `names`; returns arrays."""
    if isinstance(inputs, dict):
        missing = [n for n in names if n not in inputs]
        if missing:
            raise ValueError(
                f"Inputs for {where} lack {missing}; expected keys {names}, "
                f"got {sorted(inputs)}."
            )
        arrays = [inputs[n] for n in names]
    elif isinstance(inputs, (list, tuple)):
        arrays = list(inputs)
    else:
        arrays = [inputs]
    if len(arrays) != len(names):
        raise ValueError(
            f"{where} expects {len(names)} inputs {names}, got {len(arrays)}."
        )
    return [np.asarray(a) for a in arrays]


def _numpy_dtype(dtype):
    return np.dtype(getattr(dtype, "as_numpy_dtype", dtype))


def _onnx_dtype(onnx_type):
    types = {
        "tensor(float)": np.float32,
        "tensor(float16)": np.float16,
        "tensor(double)": np.float64,
        "tensor(int32)": np.int32,
        "tensor(int64)": np.int64,
        "tensor(int8)": np.int8,
        "tensor(uint8)": np.uint8,
        "tensor(bool)": np.bool_,
    }
    return types.get(onnx_type, np.float32)


def _result(model, path, format, inputs, outputs):  # pylint: disable=redefined-builtin
    reference = _flatten(nchw.run_inference(model, _pack_inputs(model, inputs),
                                            f"checking '{path}': running model '{model.name}'"))
    if len(reference) != len(outputs):
        raise ValueError(
            f"Exported '{path}' returns {len(outputs)} outputs, model "
            f"'{model.name}' returns {len(reference)}."
        )
    max_abs = max_rel = 0.0
    for ref, out in zip(reference, outputs):
        ref = np.asarray(ref, dtype=np.float64)
        out = np.asarray(out, dtype=np.float64)
        if ref.shape != out.shape:
            raise ValueError(
                f"Exported '{path}' returns an output of shape {out.shape}, "
                f"model '{model.name}' returns {ref.shape}."
            )
        diff = float(np.abs(ref - out).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / scale if scale > 0 else (0.0 if diff == 0 else np.inf))
    return ExportResult(
        path=path,
        format=format,
        size_bytes=_size_bytes(path),
        max_abs_error=max_abs,
        max_rel_error=max_rel,
    )


# --- TFLite ---------------------------------------------------------------


def _convert_tflite(model, quantization, representative_data, batch=None):
    """Converts `model` to a TFLite flatbuffer (bytes); `batch`: a static batch size."""
    import keras
    import tensorflow as tf

    specs = _input_specs(model, batch)
    with tempfile.TemporaryDirectory(prefix="tf_psp_export_") as saved_model:
        archive = keras.export.ExportArchive()
        archive.track(model)
        archive.add_endpoint(_FLAT_ENDPOINT, _flat_call(model), input_signature=specs)
        archive.write_out(saved_model, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(
            saved_model, signature_keys=[_FLAT_ENDPOINT]
        )
        if quantization == "float16":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.target_spec.supported_types = [tf.float16]
        elif quantization == "int8":
            names = [spec.name for spec in specs]
            dtypes = [_numpy_dtype(spec.dtype) for spec in specs]

            def dataset():
                for arrays in _calibration_batches(representative_data, names):
                    arrays = [np.asarray(a, dtype=d) for a, d in zip(arrays, dtypes)]
                    starts = range(0, len(arrays[0]), batch) if batch else [None]
                    for k in starts:  # a static batch: calibrate sample by sample
                        part = arrays if k is None else [a[k:k + batch] for a in arrays]
                        yield dict(zip(names, part))

            converter.optimizations = [tf.lite.Optimize.DEFAULT]
            converter.representative_dataset = dataset
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
            converter.inference_input_type = tf.int8
            converter.inference_output_type = tf.int8
        with warnings.catch_warnings(), quiet.native_stderr_filtered():
            # The calibrator uses tf.lite.Interpreter internally; we do not.
            warnings.filterwarnings("ignore", message=r"(?s).*tf\.lite\.Interpreter is deprecated")
            return converter.convert()


def _calibration_batches(data, names):
    """Yields lists of arrays (one per input) from `representative_data`."""
    if isinstance(data, (np.ndarray, dict, tuple)) or hasattr(data, "numpy"):
        batches = [data]
    else:
        batches = data
    count = 0
    for batch in batches:
        yield _calibration_inputs(batch, names)
        count += 1
    if count == 0:
        raise ValueError("`representative_data` for int8 quantization is empty.")


def _calibration_inputs(batch, names):
    """One calibration batch as arrays in input order; drops `(x, y)` targets."""
    if isinstance(batch, dict):
        return _match_inputs(batch, names, "representative_data")
    if isinstance(batch, (list, tuple)):
        flat = all(not isinstance(b, (list, tuple, dict)) for b in batch)
        if not (flat and len(batch) == len(names)):
            return _calibration_inputs(batch[0], names)
    return _match_inputs(batch, names, "representative_data")


def _tflite_io(interpreter):
    """(name, detail) pairs for inputs and outputs in the exported order.

    Inputs are named by the signature (the interpreter's order is arbitrary);
    outputs follow the signature's `output_<i>` names, since the
    interpreter's own output order is not the model's.
    """
    inputs = [(d["name"], d) for d in interpreter.get_input_details()]
    outputs = [(d["name"], d) for d in interpreter.get_output_details()]
    signatures = interpreter.get_signature_list()
    if len(signatures) != 1:
        return inputs, outputs
    runner = interpreter.get_signature_runner(next(iter(signatures)))
    by_index = {d["index"]: name for name, d in runner.get_input_details().items()}
    inputs = [(by_index.get(d["index"], name), d) for name, d in inputs]
    signature_outputs = runner.get_output_details()
    index_details = {d["index"]: d for d in interpreter.get_output_details()}
    outputs = [
        (name, index_details.get(d["index"], d))
        for name, d in sorted(signature_outputs.items(), key=lambda item: _output_key(item[0]))
    ]
    return inputs, outputs


def _output_key(name):
    match = re.fullmatch(r"output_(\d+)", name)
    return (0, int(match.group(1)), "") if match else (1, 0, name)


def _with_tflite_metadata(content, name, data):
    """Returns the flatbuffer `content` with a metadata entry `name` added."""
    from tensorflow.lite.python import schema_py_generated as schema
    from tensorflow.lite.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(content))
    buffer = schema.BufferT()
    buffer.data = np.frombuffer(data, dtype=np.uint8)
    model.buffers.append(buffer)
    metadata = schema.MetadataT()
    metadata.name = name
    metadata.buffer = len(model.buffers) - 1
    model.metadata = (model.metadata or []) + [metadata]
    return flatbuffer_utils.convert_object_to_bytearray(model)


def _tflite_input_order(path):
    """Input names in `model.inputs` order recorded by `export_tflite`, or None."""
    from ai_edge_litert import schema_py_generated as schema

    with open(path, "rb") as f:
        content = bytearray(f.read())
    model = schema.Model.GetRootAs(content, 0)
    for i in range(model.MetadataLength()):
        metadata = model.Metadata(i)
        if metadata.Name() == TFLITE_INPUT_NAMES_METADATA.encode():
            buffer = model.Buffers(metadata.Buffer())
            data = buffer.DataAsNumpy()
            if buffer.Offset() > 1:
                data = content[buffer.Offset(): buffer.Offset() + buffer.Size()]
            return json.loads(bytes(data).decode())
    return None


def _quantize(array, detail):
    dtype = np.dtype(detail["dtype"])
    scale, zero_point = detail["quantization"]
    if np.issubdtype(dtype, np.integer) and scale and np.issubdtype(array.dtype, np.floating):
        info = np.iinfo(dtype)
        array = np.clip(np.round(array / scale + zero_point), info.min, info.max)
    return np.asarray(array, dtype=dtype)


def _dequantize(array, detail):
    scale, zero_point = detail["quantization"]
    if np.issubdtype(array.dtype, np.integer) and scale:
        return (array.astype(np.float32) - zero_point) * np.float32(scale)
    return np.array(array)


# --- atomic writes --------------------------------------------------------


def _check_file_target(path):
    if os.path.isdir(path):
        raise ValueError(f"Cannot write '{path}': it is a directory.")


def _size_bytes(path):
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(root, f))
            for root, _, files in os.walk(path)
            for f in files
        )
    return os.path.getsize(path)
