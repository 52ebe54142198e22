"""Model builders for the examples: MobileNetV2 (keras.applications) and CIFAR ResNets."""

import os

MODELS = ("mobilenetv2", "resnet")


def mobilenetv2(image_size, num_classes, alpha_width=1.0, weights=None):
    """keras.applications MobileNetV2 with a fresh `num_classes` head (logits out).

    Args:
        image_size: input height and width (>= 32).
        num_classes: classes of the new head.
        alpha_width: MobileNetV2's width multiplier.
        weights: None (random init) or a local Keras weights file of MobileNetV2
            *without* its top for this `alpha_width`, e.g.
            `mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_96_no_top.h5`.

    Returns:
        A flat functional `keras.Model` named `mobilenetv2`.

    Raises:
        ValueError: naming `--weights` if the file does not exist or does not fit.
    """
    import keras

    if weights is not None and not os.path.isfile(weights):
        raise ValueError(f"--weights={weights}: no such file.")
    try:
        base = keras.applications.MobileNetV2(
            input_shape=(image_size, image_size, 3), alpha=alpha_width, include_top=False,
            weights=weights, pooling="avg")
    except ValueError as error:
        if weights is None:
            raise
        raise ValueError(f"--weights={weights}: cannot load into MobileNetV2 "
                         f"(alpha_width {alpha_width}, no top): {error}") from error
    logits = keras.layers.Dense(num_classes, name="logits")(base.output)
    return keras.Model(base.input, logits, name="mobilenetv2")


def resnet_cifar(depth=56, num_classes=10, image_size=32, *, input_shape=None,
                 widths=(16, 32, 64), kernel_initializer="he_normal", kernel_decay=0.0,
                 name=None):
    """CIFAR ResNet (He et al. 2016): 3 stages of (depth - 2) / 6 basic blocks, 16/32/64 filters.

    Depth 56 is the paper's Fig. 3 model. Where the shape changes, the
    shortcut is a strided 1x1 convolution with BatchNormalization. The examples
    and the benchmarks (latency.py, train_step.py) all build their ResNets here.

    Args:
        depth: 6n + 2 layers: n basic blocks per stage (8, 20, 56 ...).
        num_classes: logits produced by the Dense head `logits`.
        image_size: input height and width (3 channels), unless `input_shape`.
        input_shape: one sample's shape, channels last; overrides `image_size`.
        widths: channels of the stem and of each stage.
        kernel_initializer: of every convolution (Keras's default is glorot_uniform).
        kernel_decay: L2 penalty on every convolution and Dense kernel (0: none).
        name: model name (default `resnet{depth}`).

    Returns:
        An uncompiled functional `keras.Model` whose input is named `image`.

    Raises:
        ValueError: naming `--resnet_depth` unless depth = 6n + 2.
    """
    import keras

    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"--resnet_depth={depth}: a CIFAR ResNet has depth 6n + 2 (8, 20, 56 ...).")
    blocks = (depth - 2) // 6
    L = keras.layers
    regularizer = keras.regularizers.L2(kernel_decay) if kernel_decay else None

    def conv(x, filters, kernel_size, stride, layer_name, padding="same"):
        return L.Conv2D(filters, kernel_size, strides=stride, padding=padding, use_bias=False,
                        kernel_initializer=kernel_initializer, kernel_regularizer=regularizer,
                        name=layer_name)(x)

    def block(x, filters, stride, prefix):
        y = conv(x, filters, 3, stride, f"{prefix}_conv1")
        y = L.ReLU(name=f"{prefix}_relu1")(L.BatchNormalization(name=f"{prefix}_bn1")(y))
        y = conv(y, filters, 3, 1, f"{prefix}_conv2")
        y = L.BatchNormalization(name=f"{prefix}_bn2")(y)
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = conv(x, filters, 1, stride, f"{prefix}_proj", padding="valid")
            shortcut = L.BatchNormalization(name=f"{prefix}_proj_bn")(shortcut)
        return L.ReLU(name=f"{prefix}_out")(L.Add(name=f"{prefix}_add")([y, shortcut]))

    inputs = keras.Input(input_shape or (image_size, image_size, 3), name="image")
    x = conv(inputs, widths[0], 3, 1, "stem_conv")
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    for stage, filters in enumerate(widths):
        for i in range(blocks):
            x = block(x, filters, 2 if (stage and i == 0) else 1, f"s{stage + 1}b{i + 1}")
    x = L.GlobalAveragePooling2D(name="pool")(x)
    logits = L.Dense(num_classes, kernel_regularizer=regularizer, name="logits")(x)
    return keras.Model(inputs, logits, name=name or f"resnet{depth}")
