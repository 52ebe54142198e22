"""Same seed, same data -> same alphas, same masks, same shrunk architecture.

Two training runs in two fresh processes (`keras.utils.set_random_seed` and
`tf.config.experimental.enable_op_determinism` are process-wide, and a fresh
process also proves that nothing depends on leftover state): a plain model
with seeded Keras initializers is parameterized and PSP-trained with shuffling,
dropout and a FixedSparsity constraint, then shrunk. Everything is compared
bit for bit.
"""

import json
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent

_RUN = r'''
import json, sys
import keras, numpy as np, tensorflow as tf
import tf_psp

keras.utils.set_random_seed(7)
tf.config.experimental.enable_op_determinism()
L = keras.layers
inputs = keras.Input((8, 8, 3))
x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
x = L.BatchNormalization(name="bn1")(x)
x = L.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
x = L.Dropout(0.2, name="drop")(x)
x = L.GlobalAveragePooling2D(name="gap")(x)
outputs = L.Dense(4, name="head")(x)
model = keras.Model(inputs, outputs)
psp = tf_psp.parameterize(
    model, structure=lambda layer: "filter" if layer.name == "conv1" else "channel",
    alpha_regularizer=tf_psp.regularizers.WeightDecay(0.5),
    alpha_constraint=tf_psp.regularizers.FixedSparsity(0.25))
rng = np.random.default_rng(0)
x = rng.normal(size=(96, 8, 8, 3)).astype("float32")
y = (x[..., 0].mean(axis=(1, 2)) > 0).astype("int32") + 2 * (x[..., 2].mean(axis=(1, 2)) > 0)
psp.compile(keras.optimizers.SGD(0.1, momentum=0.9),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=False)
history = psp.fit(x, y, batch_size=16, epochs=3, shuffle=True, verbose=0)
small = tf_psp.strip_and_shrink(psp)
layers = [l for l in psp.layers if tf_psp.is_psp_layer(l)]
json.dump({
    "losses": history.history["loss"],
    "alphas": {l.name: np.asarray(l.alpha.numpy()).tolist() for l in layers},
    "masks": {l.name: l.structure_mask().tolist() for l in layers},
    "architecture": [[type(l).__name__, l.name, list(l.output.shape)[1:]] for l in small.layers],
    "weights": [w.tolist() for w in small.get_weights()],
}, open(sys.argv[1], "w"))
'''


@pytest.mark.slow  # two TensorFlow subprocesses
@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="enable_op_determinism is TensorFlow's")
def test_two_runs_give_the_same_alphas_masks_and_shrunk_model(tmp_path):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    paths = [tmp_path / f"run{k}.json" for k in range(2)]
    processes = [subprocess.Popen([sys.executable, "-c", _RUN, str(p)], env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                 for p in paths]
    for process in processes:
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    first, second = (json.loads(p.read_text()) for p in paths)
    assert not all(first["masks"]["conv1"]), "the run should prune something"
    assert len(first["architecture"]) == 7 and first["architecture"][1][2][-1] < 8
    assert first["losses"] == second["losses"]
    assert first["alphas"] == second["alphas"]
    assert first["masks"] == second["masks"]
    assert first["architecture"] == second["architecture"]
    assert first["weights"] == second["weights"]
