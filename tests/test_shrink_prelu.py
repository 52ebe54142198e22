"""PReLU passes channels through; its alpha is sliced with them."""

import keras
import numpy as np
import pytest
from shrink_helpers import _check, _randomize, _set_alpha

import tf_psp

L = keras.layers


@pytest.mark.parametrize("shared_axes", [[1, 2], None, [1, 2, 3]],
                         ids=["channelwise", "per_position", "shared_all"])
def test_prelu_shrinks_with_its_channels(shared_axes):
    inputs = keras.Input((6, 6, 3))
    h = tf_psp.PSPConv2D(6, 3, padding="same", structure="filter", name="c1")(inputs)
    h = h - 0.5  # a dead filter leaves a negative constant: PReLU maps it
    h = L.PReLU(shared_axes=shared_axes, name="prelu")(h)
    h = tf_psp.PSPConv2D(5, 1, structure="channel", name="c2")(h)
    model = keras.Model(inputs, L.Dense(2, name="head")(L.GlobalAveragePooling2D(name="gap")(h)))
    _randomize(model)
    prelu = model.get_layer("prelu")
    prelu.alpha.assign(np.random.default_rng(3).uniform(0.1, 0.5, prelu.alpha.shape))
    _set_alpha(model.get_layer("c1"), [1, 0, 1, 1, 0, 1])
    _set_alpha(model.get_layer("c2"), [1, 1, 0, 1, 1, 1])
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    if shared_axes is None:
        # alpha varies over positions: the negative constant is not constant after
        # PReLU, so the dead filters' channels stay (c2 reads them); channel 2 goes
        expected = {"c1": 5, "prelu": 5}
    else:
        expected = {"c1": 3, "prelu": 3}  # constants folded into c2, channel 2 ignored
    shrunk, _ = _check(model, x, expected)
    alpha = shrunk.get_layer("prelu").alpha
    assert alpha.shape[-1] == (1 if shared_axes == [1, 2, 3] else expected["prelu"])
