"""The functional view of a Keras model: checks, walking, cloning and probing.

The bottom of tf_psp (above `compat` only): every module that takes a model
checks it, walks it, clones it or feeds it random probes through these.
"""

import inspect
import re

import keras
import numpy as np

from tf_psp import compat

SUBCLASSED_MESSAGE = (
    "model '{name}' is a subclassed keras.Model; its graph is "
    "Python code that tf_psp cannot rewrite. Rebuild it with the functional API "
    "or Sequential, or use the PSP layers (tf_psp.PSPConv2D, ...) directly in "
    "its __init__."
)


def check_model(model):
    """Raises a ValueError unless `model` is a built Sequential/functional model."""
    if not isinstance(model, keras.Model):
        raise ValueError(f"expected a keras.Model, got {type(model).__name__}.")
    if isinstance(model, keras.Sequential):
        if not model.built or not model.inputs:
            raise ValueError(
                f"Sequential model '{model.name}' is not built; give it a "
                "`keras.Input(shape)` first layer or call `model.build(input_shape)`."
            )
    elif not compat.is_functional(model):
        raise ValueError(SUBCLASSED_MESSAGE.format(name=model.name))


def functional_view(model):
    """A functional model over the same layers (Sequential is converted)."""
    if isinstance(model, keras.Sequential):
        if not model.built or not getattr(model, "inputs", None):
            raise ValueError(
                f"model '{model.name}': Sequential model has no defined input; "
                "build it with an `keras.Input` first."
            )
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        outputs = model.outputs[0] if len(model.outputs) == 1 else model.outputs
        return keras.Model(inputs, outputs, name=model.name)
    if not compat.is_functional(model):
        raise ValueError(
            f"model '{model.name}': only functional and Sequential models are "
            "supported (subclassed models have no static graph)."
        )
    return model


def walk_layers(model):
    """`model.layers`, with the layers of nested models after each nested model."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from walk_layers(layer)


def layers_by_name(model):
    """Name -> layer for every layer of `model`, nested models included."""
    return {layer.name: layer for layer in compat.flatten_layers(model)}


def from_config(cls, config):
    """`cls.from_config(config)` named `config['name']`, so names stay the user's.

    Some constructors change the name they are given (keras-hub 0.32's MobileNet
    `DepthwiseConvBlock` appends `'_0'`, and names its sublayers after the result),
    so every clone would drift (`block_0_0` -> `block_0_0_0` -> ...). When the
    constructor appends a suffix that `config['name']` already ends with, the
    layer is built from the name without it, which gives back the same layer
    and sublayer names; any other change is undone by renaming the layer.

    Some `get_config`s return keys their own constructor rejects (keras-hub
    0.32: ViTPatchingAndEmbedding's `num_patches`/`num_positions`,
    ViTEncoderBlock's `key_dim`, SqueezeAndExcite2D's `spatial_dims`: values it
    derives itself; MiT's MixFFN `trainable`; LlamaRotaryEmbedding's
    `scaling_factor`, which it passes on itself: "multiple values"). Such keys
    are left out, and the copy's `get_config` leaves them out too, so the copy
    saves to `.keras` and loads back.
    """
    new = _construct(cls, config)
    name = config.get("name") if isinstance(config, dict) else None
    if not isinstance(name, str) or new.name == name:
        return new
    suffix = new.name[len(name):] if new.name.startswith(name) else ""
    if suffix and name.endswith(suffix) and len(name) > len(suffix):
        again = _construct(cls, {**config, "name": name[:-len(suffix)]})
        if again.name == name:
            return again
    new.name = name
    return new


_REJECTED = {}  # layer class -> keys its get_config returns and its constructor rejects


def _construct(cls, config):
    """`cls.from_config(config)`, without the keys the constructor says it does not take."""
    rejected = _REJECTED.get(cls, set())
    for _ in range(8):  # each failure names one more rejected key (or a set of them)
        try:
            new = cls.from_config({k: v for k, v in config.items() if k not in rejected})
            break
        except (TypeError, ValueError) as e:
            found = re.search(r"Unrecognized keyword arguments passed to \w+: \{(.*)\}",
                              str(e))
            keys = set(re.findall(r"'(\w+)':", found.group(1))) if found else set(
                re.findall(r"got (?:an unexpected|multiple values for) keyword argument "
                           r"'(\w+)'", str(e)))
            if not isinstance(config, dict) or not keys or not keys <= set(config) - rejected:
                raise
            rejected = rejected | keys
            _REJECTED[cls] = rejected
    else:
        raise ValueError(f"{cls.__name__}.from_config: too many rejected keys ({rejected})")
    if not rejected:
        return new
    own_config = new.get_config
    new.get_config = lambda: {k: v for k, v in own_config().items() if k not in rejected}
    return new


def new_layer(layer, **changes):
    """A fresh, unbuilt layer from `layer`'s config with `changes` applied (same name
    unless `name=` is changed; `from_config`)."""
    try:
        config = layer.get_config()
    except (NotImplementedError, AttributeError):  # arguments it cannot serialize (keras-hub's
        # Identity), or a get_config that reads an attribute it lacks (DeiTEncoder)
        if not layer.weights and not compat.sublayers(layer) and set(changes) <= {"name"}:
            return compat.renamed_copy(layer, changes.get("name", layer.name))  # stateless
        config = _config_from_attributes(layer)
        if config is None:
            raise
        new = from_config(type(layer), {**config, **changes})
        new.config_from_attributes = True  # callers able to check it against `layer` do
        return new
    config.pop("build_config", None)
    config.update(changes)
    for _ in range(8):
        try:
            return from_config(type(layer), config)
        except TypeError as e:
            missing = _missing_argument(layer, e, config)
            if missing is None:
                raise
            config.update(missing)
    return from_config(type(layer), config)


_PLAIN = (int, float, str, bool, type(None))


def _config_from_attributes(layer):
    """A config for `layer`, whose `get_config` cannot serialize the arguments it was
    built with (keras-hub 0.32's Gemma RMSNormalization, CachedGemmaAttention): each
    argument of its constructor read from the attribute of that name (or `_name`), where
    it is a plain value; None if an argument without a default has no such attribute.
    The copy may differ from `layer` where the attribute is not the argument: check it."""
    config = {"name": layer.name, "trainable": layer.trainable,
              "dtype": layer.dtype_policy.name}
    for name, p in inspect.signature(type(layer).__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or name in config:
            continue
        for attribute in (name, f"_{name}"):
            value = getattr(layer, attribute, None)
            if isinstance(value, _PLAIN) or (isinstance(value, (list, tuple)) and all(
                    isinstance(v, _PLAIN) for v in value)):
                if value is not None or hasattr(layer, attribute):
                    config[name] = value
                    break
        else:
            if p.default is p.empty:
                return None
    return config


def _missing_argument(layer, error, config):
    """`{name: value}` for a constructor argument `error` says is missing from `layer`'s
    config (keras-hub 0.32: Qwen3Attention's `head_dim`), read from the layer's attribute
    `name` or `_name`; None if there is none."""
    found = re.search(r"missing \d+ required (?:positional|keyword-only) arguments?: '(\w+)'",
                      str(error))
    if found is None or found.group(1) in config:
        return None
    name = found.group(1)
    for attribute in (name, f"_{name}"):
        value = getattr(layer, attribute, None)
        if isinstance(value, (int, float, str, bool, list, tuple)):
            return {name: value}
    return None


def clone_layer(layer):
    """A fresh copy of `layer` from its config; a Lambda or a keras.ops operation is reused.

    A Python lambda cannot round-trip a config safely, and an op node (`x + 3.0`)
    is stateless, so both are returned as they are. The copy has `layer`'s name
    (`from_config`).
    """
    if isinstance(layer, keras.layers.Lambda) or not isinstance(layer, keras.layers.Layer):
        return layer
    return new_layer(layer)


def input_name(tensor):
    """The name of the `InputLayer` of a model input `tensor` (what the user named it,
    or Keras's `input_layer_N`), else the tensor's name. Rebuilding a model with
    `keras.Input(name=tensor.name)` would rename an unnamed input `keras_tensor_N`."""
    layer = compat.producer(tensor)
    return layer.name if isinstance(layer, keras.layers.InputLayer) else tensor.name


def reuses(layer):
    """Whether `clone_layer` returns `layer` itself (Lambda, op node)."""
    return isinstance(layer, keras.layers.Lambda) or not isinstance(layer, keras.layers.Layer)


def fresh_inputs(model):
    """New `keras.Input`s like a functional model's inputs, with their input layers' names
    (for `keras.models.clone_model(input_tensors=...)`, which would otherwise rename an
    unnamed `input_layer` after its tensor, `keras_tensor_N`); None for a Sequential model."""
    if not compat.is_functional(model) or isinstance(model, keras.Sequential):
        return None
    return keras.tree.map_structure(
        lambda t: keras.Input(batch_shape=t.shape, dtype=t.dtype, name=input_name(t)),
        model.input)


def clone_with_weights(model):
    """A new model of the same architecture holding copies of `model`'s weights (same
    layer names: `from_config`)."""
    copy = keras.models.clone_model(
        model, input_tensors=fresh_inputs(model),
        clone_function=new_layer)
    copy.set_weights(model.get_weights())
    return copy


def probe_inputs(model, batch=4, seed=0):
    """`(inputs, None)`: random normal inputs for `model`, or `(None, why not)`.

    One `np.random.default_rng(seed).normal` array per input, in order, packed
    like the model's inputs.
    """
    model = functional_view(model)
    rng = np.random.default_rng(seed)
    xs = []
    for t in model.inputs:
        if any(d is None for d in t.shape[1:]):
            return None, f"input '{t.name}' has unknown dimensions {tuple(t.shape)}"
        if "float" not in str(t.dtype):
            return None, f"input '{t.name}' is not a float input ({t.dtype})"
        xs.append(rng.normal(size=(batch,) + tuple(t.shape[1:])).astype(t.dtype))
    return keras.tree.pack_sequence_as(compat.inputs_struct(model), xs), None


def relative_error(reference, outputs):
    """Max over outputs of max|reference - output| / max|reference| (scale-free).

    `reference` and `outputs` are tensors, arrays, or matching nests of them.
    """
    worst = 0.0
    for ref, out in zip(keras.tree.flatten(reference), keras.tree.flatten(outputs)):
        ref = np.asarray(keras.ops.convert_to_numpy(ref), dtype=np.float64)
        out = np.asarray(keras.ops.convert_to_numpy(out), dtype=np.float64)
        if ref.shape != out.shape:
            return float("inf")
        diff = float(np.abs(ref - out).max()) if ref.size else 0.0
        scale = float(np.abs(ref).max()) if ref.size else 0.0
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst
