"""examples/datasets.py: each loader reads small local data in its real format."""

import pathlib
import pickle
import sys
import tarfile

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import datasets  # noqa: E402  (examples/ is not a package)
from conftest import idx_bytes, write_fashion_mnist  # noqa: E402


def _cifar_batch(rng, n, label_offset):
    # CIFAR-10 python format: b'data' uint8 [N, 3072], R then G then B planes, row-major.
    images = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    labels = [(i + label_offset) % 10 for i in range(n)]
    batch = {b"batch_label": b"tiny batch", b"labels": labels,
             b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072),
             b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return batch, images, np.array(labels)


def _write_cifar(tmp_path, as_tarball):
    rng = np.random.default_rng(0)
    root = tmp_path / "src" / datasets.CIFAR10_DIR
    root.mkdir(parents=True)
    train_images, train_labels = [], []
    for i in range(1, 6):
        batch, images, labels = _cifar_batch(rng, 3, i)
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch, protocol=2))
        train_images.append(images)
        train_labels.append(labels)
    batch, test_images, test_labels = _cifar_batch(rng, 2, 7)
    (root / "test_batch").write_bytes(pickle.dumps(batch, protocol=2))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": []}))
    expected = ((np.concatenate(train_images), np.concatenate(train_labels)),
                (test_images, test_labels))
    if not as_tarball:
        return tmp_path / "src", expected
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    with tarfile.open(data_dir / datasets.CIFAR10_TARBALL, "w:gz") as archive:
        archive.add(root, arcname=datasets.CIFAR10_DIR)
    return data_dir, expected


@pytest.mark.parametrize("as_tarball", [True, False], ids=["tarball", "directory"])
def test_cifar10_reads_the_python_pickle_format(tmp_path, as_tarball):
    data_dir, ((x_train, y_train), (x_test, y_test)) = _write_cifar(tmp_path, as_tarball)
    train, test = datasets.load("cifar10", data_dir=str(data_dir))
    assert train.images.shape == (15, 32, 32, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.images, x_train)
    np.testing.assert_array_equal(train.labels, y_train)
    np.testing.assert_array_equal(test.images, x_test)
    np.testing.assert_array_equal(test.labels, y_test)
    assert train.num_classes == 10
    # The pipeline keeps pixel (0, 0) of image 0: RGB scaled to [-1, 1].
    x, y = next(iter(datasets.batches(test, 32, 2)))
    np.testing.assert_allclose(x.numpy()[0, 0, 0], x_test[0, 0, 0] / 127.5 - 1, atol=1e-6)
    np.testing.assert_array_equal(y.numpy(), y_test)


def test_cifar10_missing_or_bad_files_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--data_dir=.*cifar-10-python.tar.gz"):
        datasets.load("cifar10", data_dir=str(tmp_path))
    root = tmp_path / datasets.CIFAR10_DIR
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8),
                                                      b"labels": [0, 1]}))
    with pytest.raises(ValueError, match="data_batch_1.*3072"):
        datasets.load("cifar10", data_dir=str(tmp_path))


def _write_pngs(directory, classes, per_class, rng, size=(12, 10)):
    from PIL import Image

    written = {}
    for label, name in enumerate(classes):
        (directory / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, size=size + (3,), dtype=np.uint8)
            path = directory / name / f"{i}.png"
            Image.fromarray(pixels).save(path)
            written[str(path)] = (label, pixels)
    return written


def test_folder_with_train_and_val_subfolders(tmp_path):
    rng = np.random.default_rng(0)
    train_files = _write_pngs(tmp_path / "train", ["n01", "n02"], 3, rng)
    val_files = _write_pngs(tmp_path / "val", ["n01", "n02"], 2, rng)
    train, val = datasets.load("folder", data_dir=str(tmp_path))
    assert train.class_names == ["n01", "n02"] and len(train) == 6 and len(val) == 4
    for data, files in ((train, train_files), (val, val_files)):
        assert sorted(data.paths) == sorted(files)
        for path, label in zip(data.paths, data.labels):
            assert files[path][0] == label
    # Decoding and resizing: an image resized to its own size is unchanged.
    x, y = next(iter(datasets.batches(val, 12, 4)))
    assert x.shape == (4, 12, 12, 3)
    first = tf_resized(val_files[val.paths[0]][1], 12)
    np.testing.assert_allclose(x.numpy()[0], first / 127.5 - 1, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), val.labels)


def tf_resized(pixels, size):
    import tensorflow as tf

    return tf.image.resize(pixels.astype("float32"), (size, size)).numpy()


def test_folder_without_val_is_split_and_bad_dir_named(tmp_path):
    files = _write_pngs(tmp_path / "imgs", ["a", "b", "c"], 4, np.random.default_rng(1))
    train, val = datasets.load("folder", data_dir=str(tmp_path / "imgs"))
    assert len(train) + len(val) == 12 and len(val) == 2
    assert not set(train.paths) & set(val.paths)
    assert all(files[p][0] == label for p, label in zip(train.paths + val.paths,
                                                        list(train.labels) + list(val.labels)))
    with pytest.raises(ValueError, match="--data_dir"):
        datasets.load("folder", data_dir=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--dataset=folder needs --data_dir"):
        datasets.load("folder")
    with pytest.raises(ValueError, match="--dataset=imagenet"):
        datasets.load("imagenet")


def test_mnist5k_three_channels_and_resumable_shuffle():
    train, test = datasets.mnist5k()
    assert train.images.shape == (4000, 28, 28, 1) and len(test) == 1000
    small = train.take(40)
    x, _ = next(iter(datasets.batches(small, 16, 8)))
    assert x.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(x.numpy()[..., 0], x.numpy()[..., 2])
    assert -1.0 <= x.numpy().min() and x.numpy().max() <= 1.0
    # Epochs are shuffled by epoch index: resuming at epoch 1 gives the same
    # batches as epoch 1 of an uninterrupted run, and epochs differ.
    full = [y.numpy() for _, y in datasets.training_batches(small, 8, 8, 0, 0, 2, 5)]
    resumed = [y.numpy() for _, y in datasets.training_batches(small, 8, 8, 0, 1, 2, 5)]
    assert len(full) == 10 and len(resumed) == 5
    for a, b in zip(full[5:], resumed):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(full[:5], full[5:]))
    assert sorted(np.concatenate(full[:5])) == sorted(small.labels)


def test_fashion_mnist_reads_idx_files_and_shuffles_training_only(tmp_path):
    arrays = write_fashion_mnist(tmp_path / "fm")
    (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(str(tmp_path / "fm"),
                                                                       seed=5)
    assert x_train.shape == (12, 28, 28, 1) and x_train.dtype == np.float32
    assert y_train.dtype == np.int32 and x_test.shape == (5, 28, 28, 1)
    # The test images keep the file's order; every one is returned.
    np.testing.assert_allclose(x_test[..., 0], arrays["test"][0] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y_test, arrays["test"][1])
    # The training images are a seeded permutation of the file's, labels following them.
    order = np.random.default_rng(5).permutation(12)
    np.testing.assert_allclose(x_train[..., 0], arrays["train"][0][order] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y_train, arrays["train"][1][order])
    # A subset is the first shuffled images; the test set stays whole.
    (x_sub, y_sub), (x_t, _) = datasets.load_fashion_mnist(str(tmp_path / "fm"), seed=5,
                                                           train_examples=4)
    np.testing.assert_array_equal(y_sub, y_train[:4])
    assert len(x_t) == 5
    train, test = datasets.load("fashion_mnist", data_dir=str(tmp_path / "fm"), seed=5)
    assert train.images.dtype == np.uint8 and train.num_classes == 10 and len(test) == 5
    np.testing.assert_array_equal(train.images[..., 0], arrays["train"][0][order])


def test_fashion_mnist_directory_from_environment(tmp_path, monkeypatch):
    write_fashion_mnist(tmp_path / "env")
    monkeypatch.setenv(datasets.FASHION_MNIST_ENV, str(tmp_path / "env"))
    (x_train, _), _ = datasets.load_fashion_mnist()
    assert len(x_train) == 12


def test_fashion_mnist_missing_files_name_the_apt_package(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        datasets.load_fashion_mnist(str(tmp_path))


def test_fashion_mnist_corrupt_files_are_named(tmp_path):
    import gzip

    directory = tmp_path / "fm"
    write_fashion_mnist(directory)
    images_file, labels_file = datasets.FASHION_MNIST_FILES["train"]
    # Labels where images belong: wrong magic number.
    (directory / images_file).write_bytes((directory / labels_file).read_bytes())
    with pytest.raises(ValueError, match=r"train-images.*magic number 0x00000801, expected "
                                         r"0x00000803"):
        datasets.load_fashion_mnist(str(directory))
    # A truncated file: the header promises more bytes than it holds.
    data = idx_bytes(0x00000803, np.zeros((12, 28, 28)))
    with gzip.open(directory / images_file, "wb") as f:
        f.write(data[:-10])
    with pytest.raises(ValueError, match=r"train-images.*truncated or corrupt"):
        datasets.load_fashion_mnist(str(directory))
    # Not gzip at all.
    (directory / images_file).write_bytes(data)
    with pytest.raises(ValueError, match="not a readable gzip file"):
        datasets.load_fashion_mnist(str(directory))
    # Images and labels disagree in number.
    with gzip.open(directory / images_file, "wb") as f:
        f.write(idx_bytes(0x00000803, np.zeros((11, 28, 28))))
    with pytest.raises(ValueError, match="11 images but 12 labels"):
        datasets.load_fashion_mnist(str(directory))


def test_experiment_data_validation_comes_from_training_images(tmp_path):
    import pruning_experiments

    arrays = write_fashion_mnist(tmp_path / "fm", n_train=50, n_test=20)
    data = pruning_experiments.load_data("fashion_mnist", train_examples=40,
                                         data_dir=str(tmp_path / "fm"))
    assert data.dataset == "fashion_mnist" and data.x_train.shape == (40, 28, 28, 1)
    np.testing.assert_allclose(data.x_test[..., 0], arrays["test"][0] / 255.0, atol=1e-7)
    val = data.holdout(0.2)
    assert len(val.y_train) == 32 and len(val.y_test) == 8 and val.dataset == "fashion_mnist"
    train_pixels = {img.tobytes() for img in arrays["train"][0].astype(np.uint8)}
    test_pixels = {img.tobytes() for img in arrays["test"][0].astype(np.uint8)}
    for image in np.rint(val.x_test[..., 0] * 255).astype(np.uint8):
        assert image.tobytes() in train_pixels and image.tobytes() not in test_pixels
    with pytest.raises(ValueError, match="--train_examples=60: fashion_mnist has 50"):
        pruning_experiments.load_data("fashion_mnist", 60, str(tmp_path / "fm"))
    with pytest.raises(ValueError, match="--dataset=cifar"):
        pruning_experiments.load_data("cifar")
