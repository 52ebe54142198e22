"""Every Keras internal tf_psp relies on, in one place.

Keras 3 has no public API for walking a functional graph's nodes, a layer's
call sites or a tensor's producer, so tf_psp reads a few private attributes.
They are all here, and `tests/test_compat.py` exercises each one on the
pinned Keras version, so a Keras release that moves one fails loudly in one
test instead of somewhere deep in `strip_and_shrink` (the kind of drift that
broke tensorflow-model-optimization on Keras 3).
"""

import inspect
import sys

import keras
from keras.src.applications import convnext as _convnext
from keras.src.models.functional import Functional
from keras.src.ops import core as _core_ops
from keras.src.ops import nn as _nn_ops
from keras.src.ops import numpy as _numpy_ops

# keras.ops classes (`h + 3.0` in a functional model is a node of
# keras.src.ops.numpy.Add) and ConvNeXt's LayerScale have no public import path.
convnext_application = _convnext
core_ops = _core_ops
nn_ops = _nn_ops
numpy_ops = _numpy_ops

KERAS_VERSION = "3.15.1"  # the version these accessors were checked against


def is_functional(model):
    """True for a functional model (including the graph behind a built Sequential)."""
    return isinstance(model, Functional)


def is_graph_model(layer):
    """True for a model with a static graph tf_psp can walk (functional or built Sequential)."""
    return graph_of(layer) is not None


def graph_of(model):
    """The Functional graph behind `model`, or None (subclassed, unbuilt Sequential, a layer)."""
    if isinstance(model, keras.Sequential):
        return getattr(model, "_functional", None)
    if isinstance(model, Functional):
        return model
    return None


def nodes_by_depth(model):
    """`{depth: [Node]}` of a functional model (depth 0: the output nodes)."""
    return graph_of(model)._nodes_by_depth


def nodes_in_order(model):
    """The call nodes of a functional (or built Sequential) model, inputs first."""
    by_depth = nodes_by_depth(model)
    for depth in sorted(by_depth, reverse=True):
        yield from by_depth[depth]


def inbound_nodes(layer):
    """The nodes where `layer` was called."""
    return list(getattr(layer, "_inbound_nodes", []))


def outbound_nodes(layer):
    """The nodes of the layers called on `layer`'s outputs."""
    return list(getattr(layer, "_outbound_nodes", []))


def keras_history(tensor):
    """`(operation, node_index, tensor_index)` that produced a symbolic tensor."""
    return tensor._keras_history


def keras_mask(tensor):
    """The Keras mask a symbolic tensor carries (Embedding(mask_zero=True) ...), or None."""
    return getattr(tensor, "_keras_mask", None)


def producer(tensor):
    """The operation (layer or op) that produced a symbolic tensor, or None."""
    history = getattr(tensor, "_keras_history", None)
    return None if history is None else history.operation


def flatten_layers(model):
    """Every layer of `model`, nested models' layers included, in a fixed order."""
    return list(model._flatten_layers(include_self=False))


def sublayers(layer):
    """Every layer tracked inside `layer` (recursively), `layer` itself excluded; [] for an
    operation that is not a layer (an op node such as `keras.ops.pad`)."""
    if not isinstance(layer, keras.layers.Layer):
        return []
    return list(layer._flatten_layers(include_self=False))


def node_counts(layers):
    """`[(layer, inbound count, outbound count)]`: what `restore_node_counts` puts back."""
    return [(layer, len(layer._inbound_nodes), len(layer._outbound_nodes)) for layer in layers]


def restore_node_counts(counts):
    """Forgets the call nodes recorded on layers since `node_counts` (Keras appends one
    to a layer and to its inputs' producers whenever it is called on symbolic tensors)."""
    for layer, inbound, outbound in counts:
        del layer._inbound_nodes[inbound:]
        del layer._outbound_nodes[outbound:]


def renamed_copy(layer, name):
    """A shallow copy of the weightless, sublayer-free `layer` named `name`, with no call
    nodes: for a layer whose config cannot round-trip (keras-hub's `Identity` is built
    from arguments it cannot serialize) but that must be renamed to stay unique."""
    if layer.weights or sublayers(layer):
        raise ValueError(f"layer '{layer.name}' has weights or sublayers: not copied shallowly")
    new = object.__new__(type(layer))  # copy.copy would go through get_config
    new.__dict__.update(layer.__dict__)
    new.__dict__.update(name=name, _inbound_nodes=[], _outbound_nodes=[])
    return new


def inputs_struct(model):
    """The nested structure (list, dict ...) of a functional model's inputs."""
    return graph_of(model)._inputs_struct


def outputs_struct(model):
    """The nested structure of a functional model's outputs."""
    return graph_of(model)._outputs_struct


def build_input_shape(layer):
    """The input shape `layer` was built with (None if unbuilt)."""
    return getattr(layer, "_build_shapes_dict", {}).get("input_shape")


def flat_inputs(model):
    """The input tensors of a functional model, flattened, in order."""
    return list(graph_of(model)._inputs)


def run_through_graph(model, inputs, operation_fn, call_fn):
    """Re-runs a functional model's graph on `inputs`, mapping each operation.

    `operation_fn(op) -> op'` picks the operation to call, `call_fn(op, *args,
    **kwargs)` calls it (Keras's own `clone_model` machinery).
    """
    return graph_of(model)._run_through_graph(inputs, operation_fn=operation_fn,
                                              call_fn=call_fn)


def attention_projections(layer):
    """The query, key, value and output EinsumDense layers of a MultiHeadAttention."""
    return layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense


def attention_gate(layer):
    """The gate EinsumDense of a MultiHeadAttention built with `use_gate=True`, else None."""
    return layer._gate_dense if getattr(layer, "_use_gate", False) else None


def sync_training_state(model):
    """Makes the variables of a model being fit hold their current values.

    The JAX trainer keeps the training state outside the variables between
    steps; a callback that reads or assigns variables in `on_train_batch_end`
    must sync it first (the next step then starts from the variables). No-op
    on the other backends.
    """
    sync = getattr(model, "jax_state_sync", None)
    if sync is not None:
        sync()


def callback_list_of(callback, max_depth=8):
    """The `keras.callbacks.CallbackList` now calling `callback`, or None.

    A callback is not told which others run beside it; the list calling one
    of its hooks is a local (`self`) of a calling frame. Call from a hook.
    """
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            break
        owner = frame.f_locals.get("self")
        if isinstance(owner, keras.callbacks.CallbackList) and any(
                c is callback for c in owner.callbacks):
            return owner
        frame = frame.f_back
    return None


def write_tensorboard_scalars(tensorboard, scalars, epoch):
    """Writes `{name: value}` to a TensorBoard callback's training run as it writes epoch logs
    (`epoch_<name>` at step `epoch`); call between its `on_train_begin` and `on_train_end`."""
    with tensorboard._train_writer.as_default():
        for name, value in scalars.items():
            tensorboard.summary.scalar(f"epoch_{name}", value, step=epoch)


def litert_invoker(runner):
    """A callable that runs one signature of a LiteRT interpreter on the inputs it holds.

    `SignatureRunner.__call__` copies the inputs in and the outputs out on
    every call, which costs more than a small layer takes; the interpreter's
    wrapper runs the signature's subgraph alone. Falls back to the runner's
    call without inputs when the private wrapper is gone.
    """
    wrapper = getattr(runner, "_interpreter_wrapper", None)
    index = getattr(runner, "_subgraph_index", None)
    if wrapper is None or index is None:
        return runner
    return lambda: wrapper.Invoke(index)


def tolerate_unused_attention_arguments():
    """Lets `MultiHeadAttention.compute_output_spec` ignore keyword arguments it does not
    know when they are None.

    Subclasses add call arguments (keras-hub's `CachedMultiHeadAttention`: `cache`,
    `cache_update_index`) without overriding `compute_output_spec`, so calling them
    on symbolic tensors, as tracing a decoder block does, fails with "unexpected
    keyword argument 'cache'" even when the argument is None (no cache: the output is
    MultiHeadAttention's). A non-None unknown argument still fails as before.
    Idempotent; patches `keras.layers.MultiHeadAttention` for the process.
    """
    cls = keras.layers.MultiHeadAttention
    original = cls.compute_output_spec
    if getattr(original, "tolerates_unused_arguments", False):
        return
    known = set(inspect.signature(original).parameters)

    def compute_output_spec(self, *args, **kwargs):
        kwargs = {k: v for k, v in kwargs.items() if k in known or v is not None}
        return original(self, *args, **kwargs)

    compute_output_spec.tolerates_unused_arguments = True
    compute_output_spec.__doc__ = original.__doc__
    cls.compute_output_spec = compute_output_spec


def mark_dense(tensor):
    """Marks the symbolic `tensor` dense (`KerasTensor.sparse` is read-only)."""
    tensor._sparse = False
