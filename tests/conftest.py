"""What the tests share: random weights, PSP alphas set by hand, and two oracles.

Model builders call the plain functions (`from conftest import randomize_weights`);
test bodies take the oracle that shrinks and compares as the `check_shrink` fixture.
"""

import os

import keras
import numpy as np
import pytest

from tf_psp import nchw
from tf_psp.shrink import strip_and_shrink


def pytest_report_header(config):
    """Says how channels_first tests run on this machine (never skipped for it)."""
    if nchw.nchw_supported():
        return "tf_psp: this CPU runs NCHW convolutions"
    return ("tf_psp: this CPU's TensorFlow cannot run NCHW convolutions (no oneDNN); "
            "channels_first tests run their models through XLA")


def infer(model, x):
    """`model(x, training=False)` as numpy, through XLA where this CPU cannot run NCHW."""
    return keras.ops.convert_to_numpy(nchw.run_inference(model, x))

# --- building test models -----------------------------------------------------------


def randomize_weights(model, seed=0):
    """Gives every weight random values (BatchNorm variances positive); returns the model."""
    rng = np.random.default_rng(seed)
    model.set_weights([
        np.abs(rng.normal(size=v.shape)) + 0.5 if "variance" in v.path
        else rng.normal(scale=0.3, size=v.shape)
        for v in model.weights
    ])
    return model


def randomize_biases_and_batchnorm(model, seed=0):
    """Non-trivial biases and BatchNorm statistics; kernels and alphas keep their values."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, c), rng.normal(0, 1, c),
                               rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)])
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.normal(0, 0.5, layer.bias.shape))


def set_alpha(layer, alive):
    """Sets a PSP layer's alphas: 0 where `alive` is false, distinct values above 1 elsewhere."""
    alive = np.asarray(alive, bool)
    layer.alpha.assign(np.where(alive, 1.0 + 0.1 * np.arange(alive.size).reshape(alive.shape), 0.0))


# --- oracles ------------------------------------------------------------------------


def weights_snapshot(model):
    """Copies of all of the model's weights."""
    return [np.array(w).copy() for w in model.get_weights()]


def assert_weights_unchanged(before, model):
    """Fails unless `model`'s weights equal the `weights_snapshot` taken before."""
    after = model.get_weights()
    assert len(before) == len(after)
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def assert_loads_the_same(model, x, tmp_dir):
    """Saves `model` as `.keras` in `tmp_dir`, loads it back and fails unless the loaded
    model computes what `model` computes on `x`; returns the loaded model."""
    path = os.path.join(tmp_dir, f"{model.name}.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(x)),
                               keras.ops.convert_to_numpy(model(x)), rtol=1e-6, atol=1e-6)
    return loaded


def _shrink_and_compare(model, x, expected):
    """`strip_and_shrink(model)`: same outputs, plain Keras layers, `expected` widths.

    Args:
        model: a PSP model.
        x: a probe batch.
        expected: layer name -> channels the report gives it after shrinking.

    Returns:
        `(shrunk, report)`; the PSP model's weights are checked to be untouched.
    """
    before = weights_snapshot(model)
    shrunk, report = strip_and_shrink(model, return_report=True)
    ref = keras.ops.convert_to_numpy(model(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    assert out.shape == ref.shape
    assert np.max(np.abs(out - ref)) <= 1e-5 * np.max(np.abs(ref))
    for layer in shrunk._flatten_layers(include_self=False):
        assert not type(layer).__module__.startswith("tf_psp")
    widths = {row["name"]: row["channels_after"] for row in report.to_dict()["layers"]}
    for name, width in expected.items():
        assert widths[name] == width, (name, str(report))
    assert_weights_unchanged(before, model)
    return shrunk, report


@pytest.fixture
def check_shrink():
    """`check_shrink(model, x, expected) -> (shrunk, report)`: shrinks and checks exactness."""
    return _shrink_and_compare


def idx_bytes(magic, array):
    """An IDX file's bytes: big-endian magic, one big-endian int32 per dimension, uint8 data."""
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    return header + np.asarray(array).astype(np.uint8).tobytes()


def write_fashion_mnist(directory, n_train=12, n_test=5, seed=3):
    """Writes the four Fashion-MNIST IDX `.gz` files with random 28x28 images.

    Returns:
        `{"train": (images, labels), "test": (images, labels)}` as written
        (images `[N, 28, 28]`, labels cycling through 0..9).
    """
    import gzip
    import pathlib

    rng = np.random.default_rng(seed)
    arrays = {
        "train": (rng.integers(0, 256, (n_train, 28, 28)), np.arange(n_train) % 10),
        "test": (rng.integers(0, 256, (n_test, 28, 28)), (np.arange(n_test) * 3) % 10),
    }
    names = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
             "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for split, (images_file, labels_file) in names.items():
        images, labels = arrays[split]
        with gzip.open(directory / images_file, "wb") as f:
            f.write(idx_bytes(0x00000803, images))
        with gzip.open(directory / labels_file, "wb") as f:
            f.write(idx_bytes(0x00000801, labels))
    return arrays
