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


def resnet_cifar(depth=56, num_classes=10, image_size=32):
    """CIFAR ResNet (He et al. 2016): 3 stages of (depth - 2) / 6 basic blocks, 16/32/64 filters.

    Depth 56 is the paper's Fig. 3 model. Where the shape changes, the
    shortcut is a strided 1x1 convolution with BatchNormalization.

    Raises:
        ValueError: naming `--resnet_depth` unless depth = 6n + 2.
    """
    import keras

    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"--resnet_depth={depth}: a CIFAR ResNet has depth 6n + 2 (8, 20, 56 ...).")
    blocks = (depth - 2) // 6
    L = keras.layers

    def block(x, filters, stride, prefix):
        y = L.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                     kernel_initializer="he_normal", name=f"{prefix}_conv1")(x)
        y = L.ReLU(name=f"{prefix}_relu1")(L.BatchNormalization(name=f"{prefix}_bn1")(y))
        y = L.Conv2D(filters, 3, padding="same", use_bias=False,
                     kernel_initializer="he_normal", name=f"{prefix}_conv2")(y)
        y = L.BatchNormalization(name=f"{prefix}_bn2")(y)
        shortcut = x
        if stride != 1 or x.shape[-1] != filters:
            shortcut = L.Conv2D(filters, 1, strides=stride, use_bias=False,
                                kernel_initializer="he_normal", name=f"{prefix}_proj")(x)
            shortcut = L.BatchNormalization(name=f"{prefix}_proj_bn")(shortcut)
        return L.ReLU(name=f"{prefix}_out")(L.Add(name=f"{prefix}_add")([y, shortcut]))

    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = L.Conv2D(16, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                 name="stem_conv")(inputs)
    x = L.ReLU(name="stem_relu")(L.BatchNormalization(name="stem_bn")(x))
    for stage, filters in enumerate((16, 32, 64)):
        for i in range(blocks):
            x = block(x, filters, 2 if (stage and i == 0) else 1, f"s{stage + 1}b{i + 1}")
    x = L.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, L.Dense(num_classes, name="logits")(x), name=f"resnet{depth}")
