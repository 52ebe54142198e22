"""Shrinks models users bring (issue 13) with a random 50 % alpha mask; prints MACs and errors.

For each model and coupling ('layer', 'group'): parameterize, set a seeded random
half of every alpha vector to 0 (the rest to 1..2), strip_and_shrink, and report
the MAC reduction (tf_psp.profile) and the max relative error of the shrunk model
against the PSP model on random normal inputs (batch 2, seed 1). Weights are
random (scale 0.3, BatchNorm variances >= 0.5) so that outputs are not ~0.

    PYTHONPATH=. python benchmarks/model_coverage.py [--models mobilenet_v3_small,...]
"""

import argparse
import json

import keras
import numpy as np

import tf_psp

L = keras.layers


def _randomize(model, seed=0):
    rng = np.random.default_rng(seed)
    model.set_weights([
        np.abs(rng.normal(size=v.shape)) + 0.5 if "variance" in v.path
        else rng.normal(scale=0.3, size=v.shape)
        for v in model.weights
    ])
    return model


def mobilenet_v3_small():
    return keras.applications.MobileNetV3Small(
        input_shape=(64, 64, 3), weights=None, minimalistic=False, classes=10,
        classifier_activation=None)


def convnext_mini():
    from keras.src.applications.convnext import ConvNeXt

    return ConvNeXt(depths=[2, 2, 2, 2], projection_dims=[16, 32, 64, 128],
                    input_shape=(32, 32, 3), weights=None, classes=10,
                    classifier_activation=None, layer_scale_init_value=0.5, name="convnext_mini")


def convnext_tiny():
    return keras.applications.ConvNeXtTiny(weights=None, input_shape=(32, 32, 3), classes=10,
                                           classifier_activation=None)


def nested_mobilenet_v2():
    bb = keras.applications.MobileNetV2(include_top=False, weights=None,
                                        input_shape=(32, 32, 3), alpha=0.35)
    i = keras.Input((32, 32, 3))
    return keras.Model(i, L.Dense(3)(L.GlobalAveragePooling2D()(bb(i))), name="nested_mnv2")


def causal_tcn():
    i = keras.Input((64, 8))
    h = L.Conv1D(32, 3, padding="causal", activation="relu")(i)
    for d in (1, 2, 4, 8):
        y = L.Conv1D(32, 3, padding="causal", dilation_rate=d, activation="relu")(h)
        h = L.Add()([h, L.Conv1D(32, 1)(y)])
    return keras.Model(i, L.Dense(4)(L.GlobalAveragePooling1D()(h)), name="tcn")


MODELS = {f.__name__: f for f in (mobilenet_v3_small, convnext_mini, convnext_tiny,
                                   nested_mobilenet_v2, causal_tcn)}


def _prune_half(model, seed=0):
    rng = np.random.default_rng(seed)
    for layer in tf_psp.compat.flatten_layers(model):
        variables = ([layer.alpha] if tf_psp.is_psp_layer(layer)
                     else layer.group_alphas if isinstance(layer, tf_psp.PSPGroupAlphas) else [])
        for v in variables:
            shape = tuple(v.shape)
            alive = rng.random(shape) >= 0.5
            v.assign(np.where(alive, 1.0 + rng.random(shape), 0.0).astype("float32"))


def measure(name, coupling):
    model = _randomize(MODELS[name]())
    psp = tf_psp.parameterize(model, coupling=coupling)
    _prune_half(psp)
    shrunk = tf_psp.strip_and_shrink(psp)
    x = np.random.default_rng(1).normal(size=(2,) + tuple(model.input_shape[1:])).astype("float32")
    ref = keras.ops.convert_to_numpy(psp(x, training=False))
    out = keras.ops.convert_to_numpy(shrunk(x, training=False))
    before, after = tf_psp.profile(model).total_macs, tf_psp.profile(shrunk).total_macs
    return {"model": name, "coupling": coupling, "macs_before": before, "macs_after": after,
            "mac_reduction": before / after,
            "max_rel_error": float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--json", action="store_true", help="print JSON lines")
    args = parser.parse_args()
    for name in args.models.split(","):
        for coupling in ("layer", "group"):
            row = measure(name, coupling)
            if args.json:
                print(json.dumps(row))
            else:
                print(f"{name:<22} {coupling:<6} MACs {row['macs_before']:>10,} -> "
                      f"{row['macs_after']:>10,} ({row['mac_reduction']:.2f}x)  "
                      f"max rel error {row['max_rel_error']:.1e}")


if __name__ == "__main__":
    main()
