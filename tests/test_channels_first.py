"""channels_first models: refused by name where channels are analysed, counted right elsewhere.

The channel graph reads channels on the last axis: on NCHW tensors it would see
widths as channels, keep everything and report wrong widths. Refusing is the
contract until channels_first is supported.
"""

import keras
import numpy as np
import pytest

import tf_psp

from conftest import infer as _infer

L = keras.layers


def _model():
    i = keras.Input((3, 8, 8))
    h = L.Conv2D(6, 3, padding="same", data_format="channels_first", name="c1")(i)
    h = L.BatchNormalization(axis=1, name="bn")(h)
    h = L.ReLU(name="r")(h)
    h = L.Conv2D(4, 1, data_format="channels_first", name="c2")(h)
    h = L.GlobalAveragePooling2D(data_format="channels_first", name="gap")(h)
    return keras.Model(i, L.Dense(2, name="head")(h), name="nchw")


def _psp():
    psp = tf_psp.parameterize(_model())
    psp.get_layer("c2").alpha.assign(np.array([1, 0, 1, 0, 1, 1], "float32"))
    return psp


def test_strip_and_shrink_refuses_naming_the_layer():
    with pytest.raises(ValueError,
                       match=r"layer 'c1' \(PSPConv2D\) uses data_format='channels_first'"):
        tf_psp.strip_and_shrink(_psp())


def test_group_coupling_refuses_naming_the_layer():
    with pytest.raises(ValueError, match=r"coupling='group'\): layer 'c1' .*channels_first"):
        tf_psp.parameterize(_model(), coupling="group")


def test_profile_counts_and_refuses_removability():
    psp = _psp()
    p = tf_psp.profile(psp)
    rows = {r.name: r for r in p.layers}
    assert rows["c1"].macs == 8 * 8 * 3 * 3 * 3 * 6  # positions * kernel entries
    assert rows["c2"].macs == 8 * 8 * 6 * 4
    assert rows["c2"].pruned_macs == 8 * 8 * 2 * 4  # 2 of 6 input channels dead
    with pytest.raises(ValueError, match="channels_first"):
        tf_psp.profile(psp, removable=True)


def test_layer_coupling_and_strip_work():
    psp = _psp()
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype("float32")
    plain = tf_psp.strip(psp)
    np.testing.assert_allclose(_infer(plain, x), _infer(psp, x), rtol=1e-5, atol=1e-6)
