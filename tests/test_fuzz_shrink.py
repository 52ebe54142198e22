"""Property-based fuzzing of strip_and_shrink on random functional DAGs.

Hypothesis draws a *spec* (plain tuples, so a failure is a literal that can be
pasted into an `@example`): an input width, a list of operations (Conv2D,
DepthwiseConv2D, SeparableConv2D, Dense on 4-D tensors, BatchNormalization,
activations, residual Add, Add/Subtract/Average/Maximum/Minimum/Multiply of two
tensors, Concatenate, squeeze-and-excitation Multiply, pooling, zero padding,
cropping, upsampling) reading earlier tensors, a head (GlobalAveragePooling or
Flatten -> Dense, a 4-D output, or two outputs), per PSP layer a structure and
a pruning fraction, and `round_to`. The model gets random weights (BatchNorm
with non-trivial moving statistics, gamma and beta; some kernel rows zero), is
parameterized, and random alphas are set to 0 (or below epsilon). Then:

- the shrunk model's outputs equal the PSP model's (<= 1e-5 of the largest);
- its MACs (tf_psp.profile) are at most the PSP model's;
- it holds no tf_psp class; the plain and PSP models' weights are unchanged;
- (a smaller test) it converts to TFLite and runs like Keras;
- (another) the same with `parameterize(coupling='group')` and random group alphas.

Examples per run: `TF_PSP_FUZZ_EXAMPLES` (default 150; the TFLite test runs a
tenth of it, the group test a fifth, at least 8 each). Without it the run is derandomized (the
same examples every CI run); with it, pass `--hypothesis-seed=N` to explore. See FUZZING.md.
"""

import os
import tempfile

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import tf_psp

from conftest import assert_weights_unchanged, weights_snapshot

L = keras.layers

_ENV = "TF_PSP_FUZZ_EXAMPLES"
EXAMPLES = int(os.environ.get(_ENV, "150"))
settings.register_profile(
    "tf_psp_fuzz",
    deadline=None,
    database=None,  # the working tree is shared: no .hypothesis directory
    derandomize=_ENV not in os.environ,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
_PROFILE = settings.get_profile("tf_psp_fuzz")

SIZE = 8  # input height and width
ACTIVATIONS = (None, "relu", "sigmoid", "tanh", "swish", "relu6")
STRUCTURES = ("channel", "filter", "column", "layer")
PRUNE = (0.0, 0.25, 0.5, 0.75, 1.0)
MERGES = ("add", "multiply", "subtract", "average", "maximum", "minimum")
ROUND_TO = (1, 1, 2, 4)

# --- the spec strategy ------------------------------------------------------------

# Which earlier 4-D tensor an op reads: 0 the latest (modulo their count);
# mostly recent ones, so that most ops end up in the model.
_src = st.sampled_from((0, 0, 0, 0, 1, 1, 2, 3, 5))
_other = st.integers(0, 7)
_padding = st.sampled_from(("same", "valid"))
_width = st.integers(1, 8)
_psp = st.tuples(st.sampled_from(STRUCTURES), st.sampled_from(PRUNE))  # structure, prune

_OPS = {
    "conv": st.tuples(st.just("conv"), _src, _width, st.sampled_from((1, 3)), _padding,
                      st.sampled_from(ACTIVATIONS), st.booleans(), _psp,
                      st.sampled_from((1, 1, 2))),
    "dw": st.tuples(st.just("dw"), _src, st.sampled_from((1, 3)), st.integers(1, 2),
                    st.sampled_from(ACTIVATIONS), st.booleans(), _psp, _padding),
    "sep": st.tuples(st.just("sep"), _src, _width, st.sampled_from((1, 3)), st.integers(1, 2),
                     st.sampled_from(ACTIVATIONS), st.booleans(), _psp, _padding),
    "dense4": st.tuples(st.just("dense4"), _src, _width, st.sampled_from(ACTIVATIONS), _psp),
    "bn": st.tuples(st.just("bn"), _src),
    "act": st.tuples(st.just("act"), _src, st.sampled_from(ACTIVATIONS[1:])),
    "res": st.tuples(st.just("res"), _src, st.integers(1, 2), st.booleans(),
                     st.sampled_from(ACTIVATIONS), _psp),
    "merge2": st.tuples(st.just("merge2"), _src, _other, st.sampled_from(MERGES)),
    "concat": st.tuples(st.just("concat"), _src, _other),
    "se": st.tuples(st.just("se"), _src, _width, st.booleans(), _psp),
    "pool": st.tuples(st.just("pool"), _src, st.sampled_from(("max", "avg"))),
    "resize": st.tuples(st.just("resize"), _src, st.sampled_from(("pad", "crop", "upsample"))),
}
_HEADS = st.one_of(
    st.tuples(st.just("gap_dense"), _width, _psp),
    st.tuples(st.just("flatten_dense"), _width, _psp),
    st.tuples(st.just("tensor"),),
    st.tuples(st.just("two_outputs"), _width, _psp),
)


def specs(min_ops=3, max_ops=10):
    """(input channels, ops, head, seed, round_to): a random model, as plain data."""
    return st.tuples(
        st.integers(1, 4),
        st.lists(st.one_of(*_OPS.values()), min_size=min_ops, max_size=max_ops),
        _HEADS,
        st.integers(0, 2**16),
        st.sampled_from(ROUND_TO),
    )


# --- building a model from a spec ----------------------------------------------------


def _fit(padding, x, kernel):
    """'valid' only where the input is at least as large as the kernel."""
    return "same" if padding == "valid" and x.shape[1] < kernel else padding


class _Builder:
    def __init__(self):
        self.tensors = []  # 4-D tensors
        self.psp = {}  # layer name -> (structure, prune fraction)
        self.count = 0

    def name(self, kind, psp=None):
        self.count += 1
        name = f"{kind}{self.count}"
        if psp is not None:
            self.psp[name] = psp
        return name

    def pick(self, index):
        """The `index`-th latest 4-D tensor (0: the latest, so most ops chain)."""
        return self.tensors[-1 - index % len(self.tensors)]

    def conv(self, x, filters, kernel, padding, activation, use_bias, psp, strides=1):
        return L.Conv2D(filters, kernel, strides=strides, padding=_fit(padding, x, kernel),
                        activation=activation, use_bias=use_bias,
                        name=self.name("conv", psp))(x)

    def add_op(self, op):
        kind, src = op[0], self.pick(op[1])
        channels = src.shape[-1]
        if kind == "conv":
            out = self.conv(src, *op[2:])
        elif kind == "dw":
            _, _, kernel, multiplier, activation, use_bias, psp, padding = op
            out = L.DepthwiseConv2D(kernel, padding=_fit(padding, src, kernel),
                                    depth_multiplier=multiplier,
                                    activation=activation, use_bias=use_bias,
                                    name=self.name("dw", psp))(src)
        elif kind == "sep":
            _, _, filters, kernel, multiplier, activation, use_bias, psp, padding = op
            out = L.SeparableConv2D(filters, kernel, padding=_fit(padding, src, kernel),
                                    depth_multiplier=multiplier,
                                    activation=activation, use_bias=use_bias,
                                    name=self.name("sep", psp))(src)
        elif kind == "dense4":
            _, _, units, activation, psp = op
            out = L.Dense(units, activation=activation, name=self.name("dense", psp))(src)
        elif kind == "bn":
            out = L.BatchNormalization(name=self.name("bn"))(src)
        elif kind == "act":
            out = (L.ReLU(name=self.name("relu")) if op[2] == "relu"
                   else L.Activation(op[2], name=self.name("act")))(src)
        elif kind == "res":
            _, _, depth, batchnorm, activation, psp = op
            branch = src
            for k in range(depth):
                last = k == depth - 1
                branch = self.conv(branch, channels, 3, "same", None if last else activation,
                                   True, psp)  # stride 1: the Add needs the same shape
                if batchnorm:
                    branch = L.BatchNormalization(name=self.name("bn"))(branch)
            out = L.Add(name=self.name("add"))([src, branch])
        elif kind == "merge2":
            other = self.pick(op[2])
            if other.shape != src.shape:
                return
            merge = getattr(L, op[3].capitalize())
            out = merge(name=self.name(op[3]))([src, other])
        elif kind == "concat":
            other = self.pick(op[2])
            if other.shape[1:3] != src.shape[1:3]:
                return
            out = L.Concatenate(name=self.name("concat"))([src, other])
        elif kind == "se":
            _, _, units, reshape, psp = op
            s = L.GlobalAveragePooling2D(keepdims=not reshape, name=self.name("squeeze"))(src)
            if reshape:
                s = L.Dense(units, activation="relu", name=self.name("se_reduce", psp))(s)
                s = L.Dense(channels, activation="sigmoid", name=self.name("se_expand"))(s)
                s = L.Reshape((1, 1, channels), name=self.name("se_reshape"))(s)
            else:
                s = L.Conv2D(units, 1, activation="relu", name=self.name("se_reduce", psp))(s)
                s = L.Conv2D(channels, 1, activation="sigmoid", name=self.name("se_expand"))(s)
            out = L.Multiply(name=self.name("excite"))([src, s])
        elif kind == "pool":
            if src.shape[1] < 2:
                return
            pool = L.MaxPooling2D if op[2] == "max" else L.AveragePooling2D
            out = pool(2, name=self.name(f"{op[2]}pool"))(src)
        elif kind == "resize":
            if op[2] == "pad":
                out = L.ZeroPadding2D(1, name=self.name("pad"))(src)
            elif op[2] == "crop" and src.shape[1] >= 3:
                out = L.Cropping2D(1, name=self.name("crop"))(src)
            elif op[2] == "upsample" and src.shape[1] <= 4:
                out = L.UpSampling2D(2, name=self.name("upsample"))(src)
            else:
                return
        else:
            raise ValueError(f"unknown op {kind!r}")
        self.tensors.append(out)

    def head(self, head):
        """The model outputs (a tensor, or a list of two)."""
        x = self.tensors[-1]
        if head[0] == "tensor":
            return x
        units, psp = head[1], head[2]
        if head[0] == "flatten_dense":
            y = L.Flatten(name=self.name("flatten"))(x)
        else:
            y = L.GlobalAveragePooling2D(name=self.name("gap"))(x)
        y = L.Dense(units, name=self.name("head", psp))(y)
        if head[0] == "two_outputs":  # the 4-D tensor before the head is an output too
            return [y, self.tensors[-2 if len(self.tensors) > 1 else -1]]
        return y


def _randomize(model, rng):
    """Random weights; BatchNorm with non-trivial statistics (a few gammas 0).

    A fifth of the kernels get some input rows exactly zero: plain layers can
    leave channels unread too, not only pruned PSP structures.
    """
    for layer in model.layers:
        values = []
        for v in layer.weights:
            shape, path = tuple(v.shape), v.path
            if path.endswith("gamma"):
                value = rng.uniform(0.5, 1.5, shape) * np.where(rng.random(shape) < 0.1, 0, 1)
            elif path.endswith("beta") or path.endswith("bias"):
                value = rng.normal(0, 0.5, shape)
            elif path.endswith("moving_mean"):
                value = rng.normal(0, 0.5, shape)
            elif path.endswith("moving_variance"):
                value = rng.uniform(0.5, 2.0, shape)
            else:  # kernels: unit-variance outputs
                value = rng.normal(0, 1, shape) / np.sqrt(max(np.prod(shape[:-1]), 1))
                if len(shape) >= 2 and rng.random() < 0.2:
                    rows = rng.random(shape[-2]) < 0.3
                    value[..., rows, :] = 0.0
            values.append(value.astype("float32"))
        layer.set_weights(values)


_BUILDS = 0


def build(spec):
    """(plain model, PSP model with pruned alphas) for `spec`."""
    in_channels, ops, head, seed, _ = spec
    global _BUILDS
    _BUILDS += 1
    if _BUILDS % 100 == 0:  # clear_session costs ~0.2 s: not every example
        keras.backend.clear_session()
    builder = _Builder()
    inputs = keras.Input((SIZE, SIZE, in_channels), name="image")
    builder.tensors.append(inputs)
    for op in ops:
        builder.add_op(op)
    model = keras.Model(inputs, builder.head(head), name="fuzz")
    rng = np.random.default_rng(seed)
    _randomize(model, rng)
    convert = [name for name in builder.psp if name in {layer.name for layer in model.layers}]
    if not convert:
        return model, tf_psp.parameterize(model, layers=lambda layer: False)
    psp = tf_psp.parameterize(model, layers=convert,
                              structure=lambda layer: builder.psp[layer.name][0])
    for name in convert:
        layer = psp.get_layer(name)
        prune = builder.psp[name][1]
        shape = tuple(layer.alpha.shape)
        alive = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
        dead = rng.choice([0.0, 0.5 * layer.epsilon, -0.5 * layer.epsilon], shape)
        layer.alpha.assign(np.where(rng.random(shape) < prune, dead, alive).astype("float32"))
    return model, psp


def _outputs(model, x):
    return [np.asarray(keras.ops.convert_to_numpy(y), np.float64)
            for y in keras.tree.flatten(model(x, training=False))]


def _max_rel_error(reference, outputs):
    # like tf_psp.functional.relative_error, but an all-zero reference (a model
    # whose output ReLU is dead) compares on a 1e-6 scale instead of failing on
    # round-off
    worst = 0.0
    for ref, out in zip(reference, outputs):
        assert ref.shape == out.shape
        scale = max(float(np.max(np.abs(ref))), 1e-6)
        worst = max(worst, float(np.max(np.abs(ref - out))) / scale)
    return worst


def _probe(spec):
    rng = np.random.default_rng(spec[3] + 1)
    return rng.normal(size=(2, SIZE, SIZE, spec[0])).astype("float32")


def check_spec(spec):
    """Runs the properties on one spec; returns the shrunk model."""
    model, psp = build(spec)
    plain_before, psp_before = weights_snapshot(model), weights_snapshot(psp)
    shrunk = tf_psp.strip_and_shrink(psp, round_to=spec[4])
    x = _probe(spec)
    error = _max_rel_error(_outputs(psp, x), _outputs(shrunk, x))
    assert error <= 1e-5, f"shrunk differs from the PSP model by {error:.3g}"
    assert tf_psp.profile(shrunk).total_macs <= tf_psp.profile(psp).total_macs
    leftovers = [layer.name for layer in shrunk._flatten_layers(include_self=False)
                 if type(layer).__module__.startswith("tf_psp")]
    assert not leftovers
    assert_weights_unchanged(plain_before, model)
    assert_weights_unchanged(psp_before, psp)
    layers = len(psp.layers) - 1
    event(f"layers: {'1-4' if layers < 5 else '5-9' if layers < 10 else '10+'}")
    smaller = shrunk.count_params() < psp.count_params() - sum(
        int(np.prod(layer.alpha.shape)) for layer in psp.layers if tf_psp.is_psp_layer(layer))
    event(f"parameters removed: {smaller}")
    return shrunk


# --- the properties --------------------------------------------------------------------

pytestmark = [
    pytest.mark.slow,  # hundreds of generated models
    pytest.mark.filterwarnings("ignore:strip_and_shrink. every structure"),
]


# Edge cases pinned for every run (no failure of the long runs needed one, see FUZZING.md).
PINNED = [
    # a residual branch pruned by 'layer' (removed) and one by 'filter' (constant, removed)
    (3, [("conv", 0, 6, 3, "same", "relu", True, ("filter", 0.5), 1),
         ("res", 0, 2, True, "relu", ("layer", 1.0)),
         ("res", 0, 1, False, None, ("filter", 1.0))],
     ("gap_dense", 4, ("channel", 0.5)), 1, 1),
    # a fully pruned squeeze-and-excitation, strided 1x1 conv, 'valid' depthwise, Flatten head
    (2, [("conv", 0, 8, 1, "valid", "swish", True, ("filter", 0.75), 2),
         ("se", 0, 3, True, ("channel", 1.0)),
         ("dw", 0, 3, 2, "relu", True, ("filter", 0.5), "valid"),
         ("pool", 0, "avg")],
     ("flatten_dense", 3, ("channel", 0.5)), 2, 4),
    # a tensor concatenated with itself, x - x, a separable conv, two outputs, round_to 2
    (4, [("conv", 0, 5, 3, "same", None, True, ("column", 0.5), 1),
         ("concat", 0, 0),
         ("merge2", 0, 0, "subtract"),
         ("sep", 0, 6, 3, 2, "tanh", False, ("channel", 0.25), "same")],
     ("two_outputs", 2, ("filter", 0.5)), 3, 2),
]


@settings(_PROFILE, max_examples=EXAMPLES)
@given(spec=specs())
@example(spec=PINNED[0])
@example(spec=PINNED[1])
@example(spec=PINNED[2])
def test_shrunk_model_is_exact_smaller_and_plain(spec):
    check_spec(spec)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TFLite needs TensorFlow")
@settings(_PROFILE, max_examples=max(8, EXAMPLES // 10))
@given(spec=specs(min_ops=2, max_ops=6))
def test_shrunk_model_converts_to_tflite(spec):
    from tf_psp import export

    shrunk = check_spec(spec)
    with tempfile.TemporaryDirectory(prefix="tf_psp_fuzz_") as directory:
        result = export.export_tflite(shrunk, os.path.join(directory, "shrunk.tflite"),
                                      probe=_probe(spec))
    assert result.max_rel_error <= 1e-4


@settings(_PROFILE, max_examples=max(8, EXAMPLES // 5))
@given(spec=specs())
def test_group_coupled_model_shrinks_exactly(spec):
    """The same properties with `parameterize(coupling='group')` and random group alphas."""
    model, _ = build(spec)
    try:
        psp = tf_psp.parameterize(model, coupling="group")
    except ValueError as error:  # every channel frozen: nothing to parameterize
        assert "no channel that PSP can prune" in str(error)
        return
    rng = np.random.default_rng(spec[3])
    for layer in psp.layers:
        for variable in getattr(layer, "group_alphas", ()):
            shape = tuple(variable.shape)
            alive = rng.uniform(0.5, 1.5, shape) * rng.choice([-1.0, 1.0], shape)
            pruned = rng.random(shape) < rng.choice(PRUNE)
            variable.assign(np.where(pruned, 0.0, alive).astype("float32"))
    before = weights_snapshot(psp)
    shrunk = tf_psp.strip_and_shrink(psp, round_to=spec[4])
    x = _probe(spec)
    error = _max_rel_error(_outputs(psp, x), _outputs(shrunk, x))
    assert error <= 1e-5, f"shrunk differs from the PSP model by {error:.3g}"
    assert tf_psp.profile(shrunk).total_macs <= tf_psp.profile(tf_psp.strip(psp)).total_macs
    assert not [layer.name for layer in shrunk._flatten_layers(include_self=False)
                if type(layer).__module__.startswith("tf_psp")]
    assert_weights_unchanged(before, psp)
