"""Recurrent layers in TFLite: unrolled when the sequence length is static, else batch 1.

Keras 3 runs SimpleRNN/LSTM/GRU as a `while` loop over a TensorList whose
element shape holds the batch size; with a dynamic batch the TFLite converter
refuses it ("'tf.TensorListReserve' op requires element_shape to be static").
Two ways out were weighed against the converter's TF-ops fallback
(`SELECT_TF_OPS`), which needs the Flex delegate that the `ai_edge_litert`
interpreter does not ship, so such a file could not be verified here or run
by most LiteRT users:

- the sequence length of every recurrent layer is known: the model is cloned
  with `unroll=True` (same weights). The loop becomes plain builtin ops, the
  batch stays dynamic, and XNNPACK runs all of it. The graph grows with the
  number of steps (fine for the tens to hundreds of steps of on-device
  models);
- some sequence length is None: the model is exported with a static batch of
  1 (the loop lowers to TFLite's builtin WHILE; any sequence length can be
  fed, one sequence per invoke), and verified one probe sample at a time.
"""

import keras

from tf_psp import compat
from tf_psp.functional import clone_layer


def _recurrent_layers(model):
    """Every `keras.layers.RNN` of `model` (inside Bidirectional and nested models too)."""
    found = []
    for layer in compat.flatten_layers(model):
        if isinstance(layer, keras.layers.RNN):
            found.append(layer)
    return found


def _static_steps(layer):
    """Whether every call of `layer` has a known sequence length."""
    try:
        nodes = compat.inbound_nodes(layer)
    except (AttributeError, TypeError):
        return False
    shapes = [t.shape for node in nodes for t in node.arguments.keras_tensors[:1]]
    return bool(shapes) and all(len(s) >= 3 and s[1] is not None for s in shapes)


def _unrolled_config(config):
    """A layer config with `unroll=True` on it and on the layers it wraps."""
    config = dict(config)
    if "unroll" in config:
        config["unroll"] = True
    for key in ("layer", "backward_layer"):
        inner = config.get(key)
        if isinstance(inner, dict) and isinstance(inner.get("config"), dict):
            config[key] = dict(inner, config=_unrolled_config(inner["config"]))
    return config


def tflite_ready(model):
    """`(model to convert, static batch or None)` for the TFLite converter.

    Returns `model` itself when it has no looping recurrent layer; an
    unrolled clone (same weights) when every recurrent layer's sequence length
    is static; else `model` with a static batch of 1 to use in the signature.
    """
    looping = [layer for layer in _recurrent_layers(model) if not layer.unroll]
    if not looping:
        return model, None
    wrappers = [layer for layer in compat.flatten_layers(model)
                if isinstance(layer, keras.layers.Bidirectional)]
    calls = [layer for layer in looping
             if not any(layer in (w.forward_layer, w.backward_layer) for w in wrappers)]
    if not compat.is_graph_model(model) or not all(
            _static_steps(layer) for layer in calls + wrappers):
        return model, 1

    def clone_function(layer):
        if isinstance(layer, (keras.layers.RNN, keras.layers.Bidirectional)):
            config = _unrolled_config(layer.get_config())
            config.pop("build_config", None)
            return type(layer).from_config(config)
        return clone_layer(layer)

    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    clone.set_weights(model.get_weights())
    return clone, None
