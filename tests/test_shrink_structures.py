"""strip_and_shrink with 'column' and 'layer' structures."""

import os

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp.shrink import strip_and_shrink

from conftest import randomize_biases_and_batchnorm

L = keras.layers


def test_column_structure(check_shrink):
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        L.Conv2D(5, 3, padding="same", name="c1"),
        L.ReLU(name="r1"),
        tf_psp.PSPConv2D(4, 3, padding="same", structure="column", name="c2"),
        L.GlobalAveragePooling2D(name="gap"),
        tf_psp.PSPDense(2, structure="column", name="head"),
    ])
    randomize_biases_and_batchnorm(model)
    alpha = np.ones((3, 3, 5))
    alpha[:, :, 1] = 0.0  # every column of input channel 1: removable
    alpha[0, :, 3] = 0.0  # some columns of input channel 3: kept
    alpha[1, 1, 4] = 0.005
    model.get_layer("c2").alpha.assign(alpha)
    model.get_layer("head").alpha.assign([1.0, 0.0, 1.0, 1.0])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    _, report = check_shrink(model, x, {"c1": 4, "r1": 4, "c2": 3, "gap": 3, "head": 2})
    # c2 keeps input channels 0, 2, 3, 4: 4 * 9 columns, of which channel 3's
    # first kernel row (3) and column (1, 1) of channel 4 (alpha < epsilon) are zero.
    # head ('column' = 'channel' for Dense) keeps 3 live inputs.
    expected = [{"name": "c2", "columns": 36, "zero_columns": 4, "sparsity": 4 / 36},
                {"name": "head", "columns": 3, "zero_columns": 0, "sparsity": 0.0}]
    assert report.to_dict()["column_sparsity"] == expected
    assert "4/36 columns zero (11.1 %)" in str(report)


BRANCH = ["ba", "ba_bn", "ba_relu", "bb"]


def _branch_model(merge="Add", branch_first=False, dead="ba", bb_bias=True, bb_bn=False,
                  gap_name="gap"):
    """stem -> merge([stem, branch]) -> gap -> head; the branch ba (3x3) .. bb (1x1)."""
    inputs = keras.Input((6, 6, 3))
    h = L.Conv2D(4, 3, padding="same", name="stem")(inputs)
    b = tf_psp.PSPConv2D(6, 3, padding="same", structure="layer", name="ba")(h)
    b = L.BatchNormalization(name="ba_bn")(b)
    b = L.ReLU(name="ba_relu")(b)
    b = tf_psp.PSPConv2D(4, 1, use_bias=bb_bias, structure="layer", name="bb")(b)
    if bb_bn:
        b = L.BatchNormalization(name="bb_bn")(b)
    h = getattr(L, merge)(name="merge")([b, h] if branch_first else [h, b])
    h = L.GlobalAveragePooling2D(name=gap_name)(h)
    outputs = L.Dense(2, name="head")(h)
    model = keras.Model(inputs, outputs)
    randomize_biases_and_batchnorm(model)
    model.get_layer(dead).alpha.assign(0.0)
    return model


def _check_branch_removed(check_shrink, model, branch, constant):
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    shrunk, report = check_shrink(model, x, {"stem": 4, "merge": 4, "head": 2})
    names = {layer.name for layer in shrunk.layers}
    assert not names & set(branch), names
    assert ("merge_constant" in names) == constant
    assert report.to_dict()["removed_branches"] == [
        {"merge": "merge", "layers": branch, "offset": "merge_constant" if constant else None}]
    assert f"removed branch {', '.join(branch)}" in str(report)
    return shrunk


def test_layer_structure_in_residual_branch(check_shrink, tmp_path):
    # ba's outputs are constants, so bb's (a 1x1 conv) are too: the whole
    # branch is a constant the Add adds with a Rescaling offset.
    model = _branch_model()
    shrunk = _check_branch_removed(check_shrink, model, BRANCH, constant=True)
    path = os.path.join(tmp_path, "shrunk.keras")
    shrunk.save(path)  # the per-channel Rescaling offset survives saving
    x = np.random.default_rng(1).normal(size=(2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(keras.models.load_model(path)(x), shrunk(x), rtol=1e-6, atol=1e-6)
    # Shrinking again slices the per-channel offset with the channels it carries.
    kernel = shrunk.get_layer("head").kernel.numpy()
    kernel[1] = 0.0
    shrunk.get_layer("head").kernel.assign(kernel)
    again, report = strip_and_shrink(shrunk, return_report=True)
    assert again.get_layer("merge_constant").offset.shape == (3,)
    assert not report.blocked
    np.testing.assert_allclose(again(x), shrunk(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("merge, branch_first", [
    ("Add", False), ("Subtract", False), ("Subtract", True), ("Average", True)])
def test_removed_branch_nonzero_constant(check_shrink, merge, branch_first):
    model = _branch_model(merge, branch_first, bb_bn=True)
    _check_branch_removed(check_shrink, model, BRANCH + ["bb_bn"], constant=True)


def test_removed_branch_zero_constant(check_shrink):
    # bb is pruned and has no bias: the branch is exactly 0, the Add disappears.
    model = _branch_model(dead="bb", bb_bias=False)
    shrunk = _check_branch_removed(check_shrink, model, BRANCH, constant=False)
    assert "merge" not in {layer.name for layer in shrunk.layers}


def test_constant_input_of_maximum_is_kept(check_shrink):
    model = _branch_model("Maximum")
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    _, report = check_shrink(model, x, {"stem": 4, "merge": 4, "bb": 4})
    assert report.removed_branches == []


def test_constant_layer_name_does_not_clash_with_existing_layers(check_shrink):
    model = _branch_model(gap_name="merge_constant")
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    shrunk, report = check_shrink(model, x, {"stem": 4, "merge": 4, "head": 2})
    names = {layer.name for layer in shrunk.layers}
    assert {"merge_constant", "merge_constant_1"} <= names
    assert report.to_dict()["removed_branches"][0]["offset"] == "merge_constant_1"
