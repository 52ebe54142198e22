"""channels_first models on CPUs whose TensorFlow cannot run NCHW convolutions.

TensorFlow's CPU convolution kernels take NHWC tensors only; NCHW runs on the
CPU only through oneDNN, which TensorFlow enables on CPUs with AVX-512 (and
turns off with `TF_ENABLE_ONEDNN_OPTS=0`). On AVX2-only machines (many AMD
CPUs) a `channels_first` Conv2D fails with `UnimplementedError: The Conv2D op
currently only supports the NHWC tensor format on the CPU`. XLA lays tensors
out itself and runs NCHW convolutions on every CPU, so where tf_psp runs a
user's model for inference (the reference outputs of an export, a shrink
probe) it falls back to an XLA-compiled call; where it cannot (training),
the error names the layer and the limitation.
"""

import contextlib
import functools

import keras

from tf_psp import compat

_UNSUPPORTED = "only supports the NHWC tensor format"


@functools.lru_cache(maxsize=None)
def nchw_supported() -> bool:
    """Whether this backend runs channels_first convolutions on this machine (tried once).

    True on backends other than TensorFlow (JAX and PyTorch run NCHW
    everywhere) and on TensorFlow wherever an NCHW Conv2D executes.
    """
    if keras.backend.backend() != "tensorflow":
        return True
    import tensorflow as tf  # only on the TensorFlow backend

    try:
        tf.nn.conv2d(tf.zeros((1, 1, 2, 2)), tf.zeros((1, 1, 1, 1)), strides=1,
                     padding="VALID", data_format="NCHW")
    except (tf.errors.UnimplementedError, tf.errors.InvalidArgumentError):
        return False
    return True


def is_unsupported_format(error: BaseException) -> bool:
    """Whether `error` is TensorFlow refusing an NCHW op on the CPU."""
    return _UNSUPPORTED in str(error)


def channels_first_layer(model):
    """The first layer of `model` (nested layers too) with data_format='channels_first', or None."""
    for layer in [model, *compat.flatten_layers(model)]:
        if getattr(layer, "data_format", None) == "channels_first":
            return layer
    return None


def unsupported_format_error(model, what: str) -> ValueError:
    """The error to raise when TensorFlow could not run `model`'s channels_first layers.

    Args:
        model: the model (or layer) that was run.
        what: what tf_psp was doing, e.g. "export_tflite: running the model".
    """
    layer = channels_first_layer(model)
    named = (f"layer '{layer.name}' ({type(layer).__name__}) uses data_format='channels_first'"
             if layer is not None else f"model '{model.name}' runs an NCHW convolution")
    return ValueError(
        f"{what}: {named}, and TensorFlow cannot run NCHW convolutions on this CPU (its "
        "CPU kernels take NHWC only; NCHW needs oneDNN, which TensorFlow enables on "
        "AVX-512 CPUs unless TF_ENABLE_ONEDNN_OPTS=0). Rebuild the model channels_last "
        "(kernels have the same layout in both formats), or run it with "
        "KERAS_BACKEND=jax or on a GPU.")


def run_inference(model, inputs, what: str = "running the model"):
    """`model(inputs, training=False)`, through XLA where this CPU cannot run NCHW.

    Args:
        model: a Keras model or layer.
        inputs: what `model` takes.
        what: for the error message (what tf_psp was doing).

    Returns:
        The model's outputs.

    Raises:
        ValueError: naming the channels_first layer, when even the XLA call fails.
    """
    try:
        return model(inputs, training=False)
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the NCHW refusal
        if not is_unsupported_format(error):
            raise
        cause = error
    import tensorflow as tf  # the refusal comes from TensorFlow

    try:
        return tf.function(lambda x: model(x, training=False), jit_compile=True)(inputs)
    except Exception:  # noqa: BLE001 - any XLA failure: say what is wrong
        raise unsupported_format_error(model, what) from cause


@contextlib.contextmanager
def explained(model, what: str):
    """Turns TensorFlow's NCHW refusal inside the block into `unsupported_format_error`."""
    try:
        yield
    except Exception as error:  # noqa: BLE001 - re-raised unless it is the NCHW refusal
        if not is_unsupported_format(error):
            raise
        raise unsupported_format_error(model, what) from error
