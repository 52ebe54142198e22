"""PSP training under tf.distribute, then shrinking on the chief.

One machine, several devices (here: logical CPUs; GPUs work the same way):

    python examples/distributed_train.py --strategy mirrored --logical_cpus 2

Several machines (or processes): every worker runs the same command with its
own TF_CONFIG; worker 0 is the chief and writes the outputs:

    TF_CONFIG='{"cluster": {"worker": ["host1:12345", "host2:12345"]},
                "task": {"type": "worker", "index": 0}}' \\
        python examples/distributed_train.py --strategy multiworker --output small.keras

Nothing in tf_psp is strategy-specific: build and compile the model inside
`strategy.scope()`, feed a dataset batched with the *global* batch size, and
Keras splits each batch across replicas, scales the loss and the alpha
regularization by 1/replicas and all-reduces the gradients, so every replica
holds the same alphas (and the same pruning masks) after every step. With
MultiWorkerMirroredStrategy, Keras 3's `fit` does not work
(keras-team/keras#20585), so that path trains with a custom loop
(`train_custom_loop`) doing the same update. The
model here is small and synthetic so that the run takes seconds; it has no
BatchNormalization, whose batch statistics are per replica unless
`synchronized=True`.

`--summary FILE.json` writes this worker's final alphas, masks, per-replica
agreement and losses (used by tests/test_distributed.py).
"""

import json
import os
import sys

from absl import app, flags

FLAGS = flags.FLAGS
flags.DEFINE_enum("strategy", "mirrored", ["default", "mirrored", "multiworker"],
                  "tf.distribute strategy: none (default), MirroredStrategy over the "
                  "local devices, or MultiWorkerMirroredStrategy from TF_CONFIG.")
flags.DEFINE_integer("logical_cpus", 2, "Split the CPU into this many logical devices "
                     "(0: leave the devices as they are).")
flags.DEFINE_integer("global_batch_size", 16, "Batch size summed over all replicas.")
flags.DEFINE_integer("samples", 64, "Synthetic training samples.")
flags.DEFINE_integer("epochs", 3, "Training epochs.")
flags.DEFINE_float("learning_rate", 0.05, "SGD learning rate (momentum 0.9).")
flags.DEFINE_float("decay", 2e-2, "Weight decay lambda on alpha (paper eq. 6).")
flags.DEFINE_integer("seed", 0, "Seed of the data and the initial weights.")
flags.DEFINE_enum("coupling", "layer", ["layer", "group"],
                  "PSP alphas per layer (PSP layers) or one per channel group, shared by "
                  "its readers (tf_psp.parameterize(coupling='group')).")
flags.DEFINE_string("output", None, "Chief only: write the shrunk model here (.keras).")
flags.DEFINE_string("summary", None, "Write a JSON summary of this worker's model here.")


def configure_devices(logical_cpus):
    """Splits the CPU into logical devices; must run before TensorFlow initializes."""
    import tensorflow as tf

    if logical_cpus > 1:
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * logical_cpus)


def make_strategy(name):
    import tensorflow as tf

    if name == "mirrored":
        return tf.distribute.MirroredStrategy(
            [d.name for d in tf.config.list_logical_devices("CPU")])
    if name == "multiworker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    return tf.distribute.get_strategy()


def make_data(seed, samples):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(samples, 8, 8, 3)).astype("float32")
    y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32") + 2 * (x[..., 1].mean(axis=(1, 2)) > 0)
    return x, y.astype("int32")


def build_model(seed, decay, coupling="layer"):
    """A small PSP CNN with seeded initial weights (the same in every process)."""
    import keras

    import tf_psp

    regularizer = tf_psp.regularizers.WeightDecay(decay)
    if coupling == "group":
        inputs = keras.Input((8, 8, 3))
        x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
        y = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
        x = keras.layers.Add(name="add")([x, y])
        x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
        plain = keras.Model(inputs, keras.layers.Dense(4, name="head")(x))
        model = tf_psp.parameterize(plain, coupling="group", alpha_regularizer=regularizer)
        return _seed_weights(model, seed)
    inputs = keras.Input((8, 8, 3))
    x = tf_psp.PSPConv2D(8, 3, padding="same", activation="relu", structure="filter",
                         alpha_regularizer=regularizer, name="conv1")(inputs)
    x = tf_psp.PSPConv2D(8, 3, padding="same", activation="relu", structure="channel",
                         alpha_regularizer=regularizer, name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = tf_psp.PSPDense(4, structure="channel", alpha_regularizer=regularizer,
                              name="head")(x)
    return _seed_weights(keras.Model(inputs, outputs, name="distributed_psp"), seed)


def _seed_weights(model, seed):
    """Alphas 1, kernels and biases seeded normal (the same in every process)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    model.set_weights([
        np.ones(w.shape, "float32") if "alpha" in w.path
        else (rng.normal(size=w.shape) / np.sqrt(max(np.prod(w.shape[:-1]), 1))).astype("float32")
        for w in model.weights
    ])
    return model


def train(strategy, x, y, epochs, global_batch_size, learning_rate, decay, seed,
          coupling="layer"):
    """Builds, compiles and fits the PSP model under `strategy`; returns (model, losses)."""
    import keras
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = dataset.with_options(options)
    with strategy.scope():
        model = build_model(seed, decay, coupling)
        model.compile(
            optimizer=keras.optimizers.SGD(learning_rate, momentum=0.9),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            jit_compile=False,
        )
    history = model.fit(dataset, epochs=epochs, shuffle=False, verbose=0)
    return model, [float(v) for v in history.history["loss"]]


def train_custom_loop(strategy, x, y, epochs, global_batch_size, learning_rate, decay, seed,
                      coupling="layer"):
    """Like `train`, with a custom loop (`strategy.run` in a `tf.function`).

    Keras 3's `fit` fails under MultiWorkerMirroredStrategy
    (keras-team/keras#20585: `PerReplica` reaches a tensor conversion), so
    multi-worker training uses this loop, the one TensorFlow documents for it.
    Each replica's loss is its share of the global-batch mean plus
    `1/replicas` of the alpha regularization; the optimizer all-reduces
    (sums) the gradients, so this is the same update as `fit` on one device.
    """
    import keras
    import tensorflow as tf

    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(global_batch_size)
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    dataset = strategy.experimental_distribute_dataset(dataset.with_options(options))
    with strategy.scope():
        model = build_model(seed, decay, coupling)
        optimizer = keras.optimizers.SGD(learning_rate, momentum=0.9)
        optimizer.build(model.trainable_variables)
        cross_entropy = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None)

    def replica_step(xb, yb):
        with tf.GradientTape() as tape:
            per_example = cross_entropy(yb, model(xb, training=True))
            loss = tf.nn.compute_average_loss(per_example, global_batch_size=global_batch_size)
            loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
        gradients = tape.gradient(loss, model.trainable_variables)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables))
        return loss

    @tf.function
    def step(xb, yb):
        losses = strategy.run(replica_step, args=(xb, yb))
        return strategy.reduce("SUM", losses, axis=None)

    history = []
    for _ in range(epochs):
        total, batches = 0.0, 0
        for xb, yb in dataset:
            total += float(step(xb, yb))
            batches += 1
        history.append(total / batches)
    return model, history


def replica_values(strategy, variable):
    """The value of `variable` on every local replica (numpy arrays)."""
    import numpy as np

    return [np.asarray(v) for v in strategy.experimental_local_results(variable.value)]


def alpha_variables(model):
    """Name -> (alpha variable, epsilon): per PSP layer, or per group of the group alphas."""
    import tf_psp

    found = {}
    for layer in model.layers:
        if tf_psp.is_psp_layer(layer):
            found[layer.name] = (layer.alpha, layer.epsilon)
        elif isinstance(layer, tf_psp.PSPGroupAlphas):
            for variable in layer.group_alphas:
                found[variable.name] = (variable, layer.epsilon)
    return found


def summarize(model, strategy, losses):
    """JSON-able facts: alphas, masks, per-replica agreement, losses, regularization."""
    import keras
    import numpy as np

    alphas = alpha_variables(model)
    replicas = {name: replica_values(strategy, v) for name, (v, _) in alphas.items()}
    values = {name: np.asarray(v.numpy()) for name, (v, _) in alphas.items()}
    return {
        "replicas": int(strategy.num_replicas_in_sync),
        "losses": losses,
        "alphas": {name: v.tolist() for name, v in values.items()},
        "masks": {name: (np.abs(values[name]) >= eps).tolist()
                  for name, (_, eps) in alphas.items()},
        "epsilons": {name: eps for name, (_, eps) in alphas.items()},
        "replica_alpha_spread": max(
            float(np.max(np.abs(v - values[0]))) for values in replicas.values() for v in values),
        "replica_count": {name: len(values) for name, values in replicas.items()},
        "regularization_loss": float(sum(
            float(keras.ops.convert_to_numpy(loss)) for loss in model.losses)),
        "kernels": {layer.name: np.asarray(layer.kernel.numpy()).tolist()
                    for layer in model.layers if getattr(layer, "kernel", None) is not None},
    }


def is_chief():
    """Whether this process writes the outputs: the 'chief' task, else worker 0."""
    config = json.loads(os.environ.get("TF_CONFIG") or "{}")
    task = config.get("task", {})
    if "chief" in config.get("cluster", {}):
        return task.get("type") == "chief"
    return task.get("index", 0) == 0


def main(argv):
    del argv
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))
    configure_devices(FLAGS.logical_cpus)
    import keras

    import tf_psp
    from tf_psp import atomic

    keras.utils.set_random_seed(FLAGS.seed)
    strategy = make_strategy(FLAGS.strategy)
    x, y = make_data(FLAGS.seed, FLAGS.samples)
    loop = train_custom_loop if FLAGS.strategy == "multiworker" else train
    model, losses = loop(strategy, x, y, FLAGS.epochs, FLAGS.global_batch_size,
                         FLAGS.learning_rate, FLAGS.decay, FLAGS.seed, FLAGS.coupling)
    summary = summarize(model, strategy, losses)
    print(f"{strategy.num_replicas_in_sync} replicas ({type(strategy).__name__}); "
          f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; alphas agree across replicas to "
          f"{summary['replica_alpha_spread']:.1e}")
    if FLAGS.summary:
        atomic.write_text(FLAGS.summary, json.dumps(summary))
    if FLAGS.output and is_chief():
        shrunk = tf_psp.strip_and_shrink(model)
        with atomic.temp_file_beside(FLAGS.output, suffix=".keras") as tmp:
            shrunk.save(tmp)
        print(f"wrote {FLAGS.output}: {tf_psp.profile(model).total_macs:,} -> "
              f"{tf_psp.profile(shrunk).total_macs:,} MACs")


if __name__ == "__main__":
    app.run(main)
