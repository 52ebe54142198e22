"""Recompute BatchNormalization moving statistics from data.

Why PSP needs this: a BatchNormalization after a PSP layer makes the loss
invariant to the scale of that layer's alphas, so alpha weight decay shrinks
them together, and the moving statistics (an exponential average) lag behind
the fast-changing activations. Inference then uses stale statistics and
accuracy collapses although training accuracy is fine. Recomputing the
statistics over a few batches before evaluating, shrinking or exporting fixes
that.

`recalibrate_batchnorm(model, data)` returns a copy of `model` whose moving
statistics are the population mean and (biased) variance of every
BatchNormalization input over `data`, measured in one pass with every
BatchNormalization normalizing with its batch statistics (as in training)
and all other layers in inference mode (no dropout). `RecalibrateBatchNorm`
is a callback doing the same to the model being trained, at each epoch end.

`fold_batchnorm(model)` removes the problem at its root: it returns a copy in
which every BatchNormalization directly after a linear convolution or Dense
layer is folded into that layer's kernel and bias (inference statistics), so
alphas parameterized afterwards scale what the loss sees.
"""

import keras
import numpy as np

from tf_psp import compat, nchw
from tf_psp.functional import check_model, reuses

DEFAULT_BATCH_SIZE = 32


class _RecordingBatchNormalization(keras.layers.BatchNormalization):
    """BatchNormalization that normalizes with batch statistics and records them.

    Counts, means and sums of squared deviations are merged batch by batch
    (Chan et al.'s parallel update), so the result is the population mean and
    variance over all batches, exact up to float32 round-off.
    """

    def build(self, input_shape):
        super().build(input_shape)
        shape = (input_shape[self.axis],)
        self.recorded_count = self.add_weight(
            shape=(), name="recorded_count", initializer="zeros", trainable=False, autocast=False)
        self.recorded_mean = self.add_weight(
            shape=shape, name="recorded_mean", initializer="zeros", trainable=False, autocast=False)
        self.recorded_m2 = self.add_weight(
            shape=shape, name="recorded_m2", initializer="zeros", trainable=False, autocast=False)

    def call(self, inputs, training=None, mask=None):
        ops = keras.ops
        x = ops.cast(inputs, "float32")
        mean, variance = self._moments(x, mask)
        if mask is None:
            n = ops.cast(ops.size(x), "float32") / x.shape[self.axis]
        else:
            n = ops.sum(ops.cast(mask, "float32"))
        n_old = self.recorded_count.value
        total = n_old + n
        delta = mean - self.recorded_mean.value
        self.recorded_mean.assign(self.recorded_mean.value + delta * (n / total))
        self.recorded_m2.assign(
            self.recorded_m2.value + variance * n + ops.square(delta) * (n_old * n / total))
        self.recorded_count.assign(total)
        outputs = ops.batch_normalization(
            x=x,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=ops.cast(self.beta, "float32") if self.center else None,
            scale=ops.cast(self.gamma, "float32") if self.scale else None,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)


def _batchnorm_layers(model):
    """Every BatchNormalization of `model`, nested models included, in a fixed order."""
    return [
        layer for layer in compat.flatten_layers(model)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _check_model(model):

    check_model(model)


def _prepare_data(data, batch_size, steps, where):
    """`data` as something `Model.predict` takes, plus its keyword arguments."""
    if steps is not None and (isinstance(steps, bool) or int(steps) != steps or steps < 1):
        raise ValueError(f"{where}: steps must be a positive integer or None, got {steps!r}.")
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"{where}: batch_size must be a positive integer, got {batch_size!r}.")
    if isinstance(data, tuple) and len(data) in (2, 3) and _is_array_like(data[0]):
        data = data[0]  # (x, y) or (x, y, sample_weight) as given to fit()
    if _is_array_like(data) or isinstance(data, (list, dict)):
        if steps is not None:
            limit = int(steps) * int(batch_size)
            data = keras.tree.map_structure(lambda a: a[:limit], data)
        return data, {"batch_size": int(batch_size)}
    return data, {"steps": None if steps is None else int(steps)}


def _is_array_like(value):
    return isinstance(value, np.ndarray) or (
        hasattr(value, "shape") and hasattr(value, "dtype") and not hasattr(value, "element_spec"))


def batchnorm_statistics(model, data, steps=None, batch_size=DEFAULT_BATCH_SIZE):
    """Population mean and variance of every BatchNormalization input over `data`.

    One pass over `data` in which every BatchNormalization normalizes with its
    batch statistics (as in training) and every other layer runs in inference
    mode. `model` is not modified.

    Args:
        model: a built functional or Sequential Keras model.
        data: the inputs: an array (or list/dict of arrays for several
            inputs), an `(x, y)` or `(x, y, sample_weight)` tuple of arrays,
            or a `tf.data.Dataset` / iterable of batches (`x` or `(x, y)`).
        steps: use at most this many batches (None: all of `data`; required
            for an infinite dataset).
        batch_size: batch size for array data (ignored for datasets).

    Returns:
        A list of `(layer_name, mean, variance)` numpy tuples, one per
        BatchNormalization in `compat.flatten_layers(model)` order (nested models
        included). A layer that `data` never reached has `None` statistics.

    Raises:
        ValueError: the model is not a built functional/Sequential model, a
            layer subclasses BatchNormalization, or `steps`/`batch_size` is
            invalid.
    """
    return _Recorder(model).statistics(model, data, steps, batch_size)


class _Recorder:
    """A clone of a model whose BatchNormalizations record their input statistics.

    Built (and its predict function traced) once; `statistics` copies the
    current weights of the model in, so a callback can reuse it every epoch.
    """

    def __init__(self, model):
        _check_model(model)

        def clone_function(layer):
            if reuses(layer):
                return layer  # a Lambda (cannot round-trip a config) or a keras.ops call
            if type(layer) is keras.layers.BatchNormalization:
                config = layer.get_config()
                config.pop("build_config", None)
                return _RecordingBatchNormalization.from_config(config)
            if isinstance(layer, keras.layers.BatchNormalization):
                raise ValueError(
                    f"layer '{layer.name}' ({type(layer).__name__}) subclasses "
                    "BatchNormalization; only plain BatchNormalization layers can be "
                    "recalibrated.")
            return type(layer).from_config(layer.get_config())

        self.model = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
        self.model.compile(jit_compile=False)
        self._pairs = None

    def _layer_pairs(self, model):
        """(source layer, recording layer) pairs with weights, in the same order."""
        if self._pairs is None:
            sources = [layer for layer in compat.flatten_layers(model)
                       if not isinstance(layer, keras.Model)]
            targets = [layer for layer in compat.flatten_layers(self.model)
                       if not isinstance(layer, keras.Model)]
            if [type(s).__name__ for s in sources] != [
                    "BatchNormalization" if isinstance(t, _RecordingBatchNormalization)
                    else type(t).__name__ for t in targets]:
                raise ValueError(f"model '{model.name}' changed since its recorder was built.")
            self._pairs = list(zip(sources, targets))
        return self._pairs

    def statistics(self, model, data, steps, batch_size):
        data, kwargs = _prepare_data(data, batch_size, steps, f"model '{model.name}'")
        for source, target in self._layer_pairs(model):
            for variable, value in zip(target.weights, source.weights):
                variable.assign(value.value)
            if isinstance(target, _RecordingBatchNormalization):
                for variable in (target.recorded_count, target.recorded_mean, target.recorded_m2):
                    variable.assign(keras.ops.zeros_like(variable.value))
        with nchw.explained(model, f"BatchNorm statistics of model '{model.name}'"):
            self.model.predict(data, verbose=0, **kwargs)
        result = []
        for layer in _batchnorm_layers(self.model):
            count = float(keras.ops.convert_to_numpy(layer.recorded_count.value))
            if count == 0:
                result.append((layer.name, None, None))
                continue
            mean = keras.ops.convert_to_numpy(layer.recorded_mean.value)
            variance = keras.ops.convert_to_numpy(layer.recorded_m2.value) / count
            result.append((layer.name, mean, variance))
        return result


def assign_batchnorm_statistics(model, statistics):
    """Writes `batchnorm_statistics` output into `model`'s BatchNormalization layers.

    This *modifies `model` in place* (a training utility, like an optimizer
    step); use `recalibrate_batchnorm` to get a recalibrated copy instead.

    Args:
        model: the model the statistics were computed on (or a clone of it).
        statistics: the list returned by `batchnorm_statistics`.

    Raises:
        ValueError: the statistics do not match the model's BatchNormalization
            layers (count, names or widths).
    """
    layers = _batchnorm_layers(model)
    if len(layers) != len(statistics):
        raise ValueError(
            f"model '{model.name}' has {len(layers)} BatchNormalization layers, "
            f"the statistics cover {len(statistics)}.")
    for layer, (name, mean, variance) in zip(layers, statistics):
        if layer.name != name:
            raise ValueError(
                f"model '{model.name}': statistics of layer '{name}' do not belong "
                f"to layer '{layer.name}'.")
        if mean is None:
            continue
        if tuple(layer.moving_mean.shape) != tuple(mean.shape):
            raise ValueError(
                f"layer '{layer.name}' has {layer.moving_mean.shape[0]} channels, "
                f"its statistics {mean.shape[0]}.")
        layer.moving_mean.assign(mean.astype(layer.moving_mean.dtype))
        layer.moving_variance.assign(variance.astype(layer.moving_variance.dtype))
        if getattr(layer, "renorm", False):
            layer.moving_stddev.assign(np.sqrt(variance).astype(layer.moving_stddev.dtype))


def recalibrate_batchnorm(model: keras.Model, data, steps: int | None = None,
                          batch_size: int = DEFAULT_BATCH_SIZE) -> keras.Model:
    """A copy of `model` with BatchNormalization statistics recomputed from `data`.

    Every BatchNormalization's `moving_mean` and `moving_variance` become the
    population mean and (biased) variance of its input over `data`, measured
    with every BatchNormalization normalizing by batch statistics (as in
    training) and all other layers in inference mode. Call it on a trained
    PSP model before evaluating, `strip_and_shrink` or exporting it. `model`
    is not modified; layers data never reached keep their statistics.

    Args:
        model: a built functional or Sequential Keras model (PSP or plain).
        data: inputs (see `batchnorm_statistics`): arrays, an `(x, y)` tuple,
            or a `tf.data.Dataset` of batches. A few hundred to a few thousand
            training samples are enough.
        steps: use at most this many batches (None: all of `data`).
        batch_size: batch size for array data. Use the training batch size:
            upstream layers normalize with statistics of batches this big.

    Returns:
        A new, uncompiled Keras model of the same architecture and weights,
        except the recomputed moving statistics.
    """
    statistics = batchnorm_statistics(model, data, steps=steps, batch_size=batch_size)
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    assign_batchnorm_statistics(copy, statistics)
    return copy


class RecalibrateBatchNorm(keras.callbacks.Callback):
    """Recomputes the trained model's BatchNormalization statistics at each epoch end.

    A training utility: it updates the moving statistics of the model being
    fit (as training steps do), so that what later callbacks, `evaluate` and
    `BackupAndRestore` see is consistent. With `validation_data`, it then
    evaluates the model and puts `val_*` metrics into the epoch logs (Keras
    computes its own validation before callbacks run, with stale statistics;
    pass validation data here instead of to `fit`). List it before callbacks
    that read the logs (`PSPMonitor`, `CSVLogger`, `TensorBoard`).

    Args:
        data: calibration inputs (see `batchnorm_statistics`).
        steps: batches used per recalibration (None: all of `data`).
        batch_size: batch size for array data.
        validation_data: `(x, y)` arrays or a dataset to evaluate on after
            recalibrating, or None.
    """

    def __init__(self, data, steps=None, batch_size=DEFAULT_BATCH_SIZE, validation_data=None):
        super().__init__()
        self.data = data
        self.steps = steps
        self.batch_size = batch_size
        self.validation_data = validation_data
        self._recorder = None

    def on_epoch_end(self, epoch, logs=None):
        if self._recorder is None:
            self._recorder = _Recorder(self.model)
        statistics = self._recorder.statistics(self.model, self.data, self.steps, self.batch_size)
        assign_batchnorm_statistics(self.model, statistics)
        if self.validation_data is None:
            return
        if isinstance(self.validation_data, tuple):
            x, y = self.validation_data[:2]
            values = self.model.evaluate(x, y, batch_size=self.batch_size, verbose=0,
                                         return_dict=True)
        else:
            values = self.model.evaluate(self.validation_data, verbose=0, return_dict=True)
        if logs is not None:
            logs.update({f"val_{name}": float(value) for name, value in values.items()})


# --- folding ------------------------------------------------------------------

_FOLDABLE = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D,
             keras.layers.DepthwiseConv2D, keras.layers.Dense)


def _foldable_pairs(model):
    """{id(producer): batchnorm} for BatchNorms folding into the layer before them."""
    pairs = {}
    for bn in model.layers:
        if type(bn) is not keras.layers.BatchNormalization or len(compat.inbound_nodes(bn)) != 1:
            continue
        tensors = compat.inbound_nodes(bn)[0].input_tensors
        if len(tensors) != 1:
            continue
        producer = compat.producer(tensors[0])
        rank = len(tensors[0].shape)
        if (type(producer) not in _FOLDABLE or len(compat.inbound_nodes(producer)) != 1
                or len(compat.outbound_nodes(producer)) != 1
                or producer.activation is not keras.activations.linear
                or bn.axis not in (-1, rank - 1) or getattr(bn, "renorm", False)):
            continue
        pairs[id(producer)] = bn
    return pairs


def fold_batchnorm(model: keras.Model) -> tuple[keras.Model, list[str]]:
    """A copy of `model` with BatchNormalizations folded into the layers before them.

    A BatchNormalization (on the last axis) whose only input is the output of
    a Conv1D/2D/3D, DepthwiseConv2D or Dense layer with linear activation,
    used by nothing else, becomes a `keras.layers.Identity` of the same name,
    and the producer gets `kernel * s` and bias `(bias - moving_mean) * s +
    beta` with `s = gamma / sqrt(moving_variance + epsilon)`. The copy
    computes what `model` computes in inference mode (float32 round-off) and
    has no batch statistics: training it changes only kernels and biases.
    Other BatchNormalizations, and layers of nested models, are left as they
    are. `model` is not modified.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        `(folded_model, names)`: the new model and the names of the folded
        BatchNormalization layers.
    """
    _check_model(model)
    pairs = _foldable_pairs(model)
    folded_names = {bn.name for bn in pairs.values()}
    originals = {}

    def clone_function(layer):
        if reuses(layer):
            return layer  # a Lambda (cannot round-trip a config) or a keras.ops call
        if layer.name in folded_names and isinstance(layer, keras.layers.BatchNormalization):
            new = keras.layers.Identity(name=layer.name)
        else:
            config = layer.get_config()
            if id(layer) in pairs:
                config.pop("build_config", None)
                config["use_bias"] = True
            new = type(layer).from_config(config)
        originals[id(new)] = layer
        return new

    def call_function(layer, *args, **kwargs):
        if isinstance(layer, keras.layers.Identity):
            kwargs.pop("mask", None)  # recorded for the BatchNormalization call
        return layer(*args, **kwargs)

    folded = keras.models.clone_model(model, clone_function=clone_function,
                                      call_function=call_function)
    for new in folded.layers:
        old = originals.get(id(new))
        if old is None or old is new or not new.weights:
            continue  # unchanged, weightless, or a folded BatchNormalization
        if id(old) not in pairs:
            new.set_weights(old.get_weights())
            continue
        new.set_weights(_folded_weights(old, pairs[id(old)]))
    return folded, sorted(folded_names)


def _folded_weights(layer, bn):
    """The kernel and bias of `layer` with `bn` (inference mode) folded in."""
    kernel = keras.ops.convert_to_numpy(layer.kernel.value).astype("float64")
    channels = bn.moving_mean.shape[0]
    bias = (keras.ops.convert_to_numpy(layer.bias.value).astype("float64")
            if layer.use_bias else np.zeros(channels))
    gamma = (keras.ops.convert_to_numpy(bn.gamma.value).astype("float64")
             if bn.scale else np.ones(channels))
    beta = (keras.ops.convert_to_numpy(bn.beta.value).astype("float64")
            if bn.center else np.zeros(channels))
    mean = keras.ops.convert_to_numpy(bn.moving_mean.value).astype("float64")
    variance = keras.ops.convert_to_numpy(bn.moving_variance.value).astype("float64")
    scale = gamma / np.sqrt(variance + bn.epsilon)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        # kernel [kh, kw, cin, m]: output channel c * m + j.
        kernel = kernel * scale.reshape(kernel.shape[-2], kernel.shape[-1])
    else:
        kernel = kernel * scale
    dtype = layer.kernel.dtype
    return [kernel.astype(dtype), ((bias - mean) * scale + beta).astype(dtype)]
