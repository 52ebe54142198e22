"""Training data from files, checked against a model: image folders and `.npz` arrays.

`load_training_data` reads what `tf-psp prune --data` names and returns data
that `tf_psp.prune` takes. It checks the data against the model before any
training starts, so a wrong file fails in a second with one line that names
the file and the reason, not after minutes of training.

- A folder of images, one subfolder per class (read with
  `keras.utils.image_dataset_from_directory`; images are resized to the
  model's input size and fed as floats in 0..255; integer labels in the
  sorted order of the subfolder names).
- A `.npz` file with arrays `x` (inputs) and `y` (labels), e.g. written by
  `numpy.savez("data.npz", x=inputs, y=labels)`.

`default_loss` picks a classification loss for a model that was saved
uncompiled, and says which.
"""

import dataclasses
import os

_COLOR_MODES = {1: "grayscale", 3: "rgb", 4: "rgba"}


class DataError(ValueError):
    """The data does not exist, cannot be read, or does not fit the model."""


@dataclasses.dataclass
class TrainingData:
    """Data for `tf_psp.prune`, with what was learned about it.

    Attributes:
        train: `(x, y)` arrays, or a `tf.data.Dataset` of `(x, y)` batches.
        validation: like `train`, or None.
        samples: training samples.
        labels: `"integer"`, `"one-hot"` or `"other"`.
        classes: classes seen in the labels (None for other labels).
        description: one line saying what was read.
    """

    train: object
    validation: object
    samples: int
    labels: str
    classes: int | None
    description: str


def load_training_data(path, model, batch_size=32, validation_split=0.0, seed=0):
    """Reads an image folder or a `.npz` file and checks it against `model`.

    Args:
        path: a folder of class subfolders of images, or a `.npz` file with
            arrays `x` and `y`.
        model: the one-input Keras model to train on it.
        batch_size: batch size of an image folder's dataset.
        validation_split: fraction in [0, 1) held out for validation (an
            image folder: a seeded random split; `.npz`: the last samples,
            as `keras.Model.fit` does).
        seed: shuffling and split seed of an image folder.

    Returns:
        A `TrainingData`.

    Raises:
        DataError: the data is missing, unreadable or does not fit `model`.
    """
    if not 0.0 <= validation_split < 1.0:
        raise DataError(f"the validation split must be in [0, 1), got {validation_split}")
    input_shape = _single_input_shape(model)
    if not os.path.exists(path):
        raise DataError(f"no such data file or folder ({path})")
    if os.path.isdir(path):
        return _image_folder(path, model, input_shape, batch_size, validation_split, seed)
    if not path.lower().endswith(".npz"):
        raise DataError(
            f"expected a folder of images or a .npz file with arrays x and y ({path})")
    return _npz(path, model, input_shape, validation_split)


def default_loss(model, data):
    """A loss for classification data when the model has none.

    Args:
        model: the Keras model.
        data: its `TrainingData`.

    Returns:
        `(loss, description)`: a Keras loss object and the words saying which.

    Raises:
        DataError: the labels are not class labels (pass a loss instead).
    """
    import keras

    outputs = _output_units(model)
    activation = _last_activation(model)
    if data.labels == "integer" and outputs == 1 and data.classes <= 2:
        from_logits = activation != "sigmoid"
        return (keras.losses.BinaryCrossentropy(from_logits=from_logits),
                f"binary cross-entropy (from_logits={from_logits})")
    if data.labels in ("integer", "one-hot") and outputs != 1:
        from_logits = activation != "softmax"
        kind = "sparse categorical" if data.labels == "integer" else "categorical"
        loss = (keras.losses.SparseCategoricalCrossentropy if data.labels == "integer"
                else keras.losses.CategoricalCrossentropy)(from_logits=from_logits)
        return loss, f"{kind} cross-entropy (from_logits={from_logits})"
    raise DataError(
        f"model '{model.name}' is not compiled and its labels are not class labels, "
        "so the loss is unknown: pass --loss (e.g. mse)")


# --- the two sources ------------------------------------------------------------


def _npz(path, model, input_shape, validation_split):
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            names = list(archive.files)
            missing = [k for k in ("x", "y") if k not in names]
            if missing:
                held = ", ".join(repr(n) for n in names) or "nothing"
                raise DataError(
                    f"the .npz file has no array {' or '.join(repr(m) for m in missing)} "
                    f"(it holds {held}); write it with numpy.savez(path, x=inputs, y=labels) "
                    f"({path})")
            x, y = archive["x"], archive["y"]
    except DataError:
        raise
    except Exception as error:  # pylint: disable=broad-except
        # np.load raises OSError, ValueError, BadZipFile... for unreadable files.
        text = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"cannot read the .npz file: {text} ({path})") from error
    if len(x) != len(y):
        raise DataError(f"x has {len(x)} samples but y has {len(y)} ({path})")
    if len(x) == 0:
        raise DataError(f"the .npz file holds no samples ({path})")
    _check_input_shape(x.shape[1:], input_shape, model, path)
    labels, classes = _label_kind(y)
    _check_classes(labels, classes, y.shape[1:] if labels == "one-hot" else None, model, path)
    x = x.astype(np.float32) if x.dtype != np.float32 else x
    held_out = int(round(len(x) * validation_split))
    if validation_split and not 0 < held_out < len(x):
        raise DataError(
            f"a validation split of {validation_split} leaves {len(x) - held_out} training "
            f"and {held_out} validation samples of {len(x)} ({path})")
    train = (x[: len(x) - held_out], y[: len(y) - held_out])
    validation = (x[len(x) - held_out:], y[len(y) - held_out:]) if held_out else None
    described = f"{len(train[0])} samples of shape {tuple(x.shape[1:])}"
    if validation is not None:
        described += f" + {held_out} for validation"
    return TrainingData(train, validation, len(train[0]), labels, classes,
                        f"{path}: {described}, {labels} labels")


def _image_folder(path, model, input_shape, batch_size, validation_split, seed):
    import keras

    if len(input_shape) != 3 or None in input_shape or input_shape[-1] not in _COLOR_MODES:
        raise DataError(
            f"model '{model.name}' takes inputs of shape {(None,) + input_shape}, not images "
            "of a fixed size (height, width, 1, 3 or 4 channels): pass a .npz file "
            f"({path})")
    height, width, channels = input_shape
    try:
        loaded = keras.utils.image_dataset_from_directory(
            path, labels="inferred", label_mode="int", color_mode=_COLOR_MODES[channels],
            batch_size=batch_size, image_size=(height, width), shuffle=True, seed=seed,
            validation_split=validation_split or None,
            subset="both" if validation_split else None, verbose=False)
    except ValueError as error:
        text = (str(error).strip() or type(error).__name__).splitlines()[0]
        raise DataError(f"cannot read images: {text} ({path})") from error
    train, validation = loaded if validation_split else (loaded, None)
    classes = len(train.class_names)
    samples = len(train.file_paths)
    if samples == 0:
        raise DataError(f"no images found in the class subfolders ({path})")
    _check_classes("integer", classes, None, model, path)
    described = f"{samples} images in {classes} classes, resized to {height}x{width}"
    if validation is not None:
        described += f" + {len(validation.file_paths)} for validation"
    return TrainingData(train, validation, samples, "integer", classes, f"{path}: {described}")


# --- checks ---------------------------------------------------------------------


def _single_input_shape(model):
    if len(model.inputs) != 1:
        raise DataError(
            f"model '{model.name}' has {len(model.inputs)} inputs; --data feeds one-input "
            "models (call tf_psp.prune from Python for others)")
    return tuple(model.inputs[0].shape[1:])


def _check_input_shape(shape, expected, model, path):
    if len(shape) != len(expected) or any(
            e is not None and e != s for e, s in zip(expected, shape)):
        raise DataError(
            f"x holds samples of shape {tuple(shape)}, model '{model.name}' takes "
            f"{tuple(expected)} ({path})")


def _label_kind(y):
    """`("integer", classes)`, `("one-hot", classes)` or `("other", None)`."""
    import numpy as np

    if y.size == 0 or not np.issubdtype(y.dtype, np.number):
        return "other", None
    flat = y.reshape(len(y), -1)
    if flat.shape[1] == 1 and np.all(flat == np.round(flat)) and flat.min() >= 0:
        return "integer", int(flat.max()) + 1
    if y.ndim == 2 and np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1):
        return "one-hot", y.shape[1]
    return "other", None


def _check_classes(labels, classes, one_hot_shape, model, path):
    outputs = _output_units(model)
    if outputs is None or labels == "other":
        return
    if labels == "one-hot" and one_hot_shape[-1] != outputs:
        raise DataError(
            f"y is one-hot over {one_hot_shape[-1]} classes, model '{model.name}' has "
            f"{outputs} outputs ({path})")
    if labels == "integer" and outputs > 1 and classes > outputs:
        raise DataError(
            f"the labels name {classes} classes, model '{model.name}' has {outputs} "
            f"outputs ({path})")


def _output_units(model):
    if len(model.outputs) != 1:
        return None
    return model.outputs[0].shape[-1]


def _last_activation(model):
    """'softmax', 'sigmoid' or None: the activation that ends the model."""
    layer = model.layers[-1]
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    if name in ("softmax", "sigmoid"):
        return name
    kind = type(layer).__name__.lower()
    return kind if kind in ("softmax", "sigmoid") else None
