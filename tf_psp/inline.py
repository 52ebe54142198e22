"""Flat functional models: nested models and composite layers inlined.

The channel graph (`tf_psp.graph`) sees one node per layer call. A nested
functional or Sequential model used as a layer, and a *composite* layer (a
layer whose `call` runs its own sublayers: keras-hub's `TransformerEncoder`,
ViT encoder blocks, MobileNetV3's inverted residual blocks, EfficientNet's
(Fused)MBConv blocks) would be one opaque node that freezes every channel it
touches. `inline_nested` rebuilds the model with both opened up:

- a nested model's layers become nodes of the outer graph;
- a composite layer's `call` is run on the symbolic tensors of its call site,
  so its sublayer calls and `keras.ops` calls become nodes (Keras 3 records
  keras.ops on symbolic tensors as functional nodes). This is done on a copy
  of the layer (from its config, with its weights), and only when the copy's
  graph is the layer's function: the layer owns no weights of its own, every
  weight of it is read by a sublayer call of that graph, no concrete tensor is
  baked into it, and on random inputs it computes what the layer computes
  (relative error <= 1e-5). Otherwise the layer is kept whole and
  `kept_whole_reason` says why (the channel graph's reports quote it).

Sublayers get their block's name as a prefix unless their name starts with it
already (`transformer_layer_0` -> `transformer_layer_0_self_attention_layer`;
EfficientNet's `block2a_expand_conv` stays), so names stay unique and tell
where a layer came from; a name another layer already has gets a `_1`, `_2`
... suffix. Every layer of the result is a copy with the same weights (Lambda
layers and keras.ops calls are reused): the given model is never changed.
"""

import weakref

import keras
import numpy as np

from tf_psp import compat, registry
from tf_psp.functional import functional_view, input_name, new_layer, relative_error
from tf_psp.macs import own_weights

TOLERANCE = 1e-5  # largest relative error of an inlined composite on random inputs
_FREE_DIM = 3  # length of a None (non-batch) dimension in that check
_KEPT = weakref.WeakKeyDictionary()  # composite layer -> why it stays whole


def nested_graph(layer):
    """The functional graph of a nested functional or Sequential model, else None."""
    return compat.graph_of(layer) if isinstance(layer, keras.Model) else None


def is_composite(layer):
    """Whether `layer` is a composite layer: not a model, not registered with
    `tf_psp.register_layer`, and holding sublayers its `call` may run."""
    return (isinstance(layer, keras.layers.Layer) and not isinstance(layer, keras.Model)
            and registry.registered_class(layer) is None and bool(compat.sublayers(layer)))


def kept_whole_reason(layer):
    """Why `inline_nested` kept the composite layer `layer` whole, or None.

    The reason is remembered per layer object (and its copies) for the process,
    so a layer that cannot be inlined is traced once, not at every rebuild.
    """
    return _KEPT.get(layer)


def _to_open(layer):
    return nested_graph(layer) is not None or (is_composite(layer) and layer not in _KEPT)


def _tensor_leaves(args, kwargs):
    """The distinct symbolic tensors of one call, in a fixed order."""
    seen, leaves = set(), []
    for x in keras.tree.flatten((args, kwargs)):
        if isinstance(x, keras.KerasTensor) and id(x) not in seen:
            seen.add(id(x))
            leaves.append(x)
    return leaves


def _concrete(tensor, rng):
    """A random input like `tensor` (None dims: batch 2, others `_FREE_DIM`); integer
    and boolean tensors (token ids, masks) are ones, every position valid."""
    shape = tuple(2 if k == 0 and d is None else (_FREE_DIM if d is None else d)
                  for k, d in enumerate(tensor.shape))
    if "float" in str(tensor.dtype):
        return rng.normal(size=shape).astype(tensor.dtype)
    return np.ones(shape, dtype=tensor.dtype)


def _baked_constant(graph):
    """The first operation of `graph` given a concrete tensor argument, or None."""
    for node in compat.nodes_in_order(graph):
        if node.operation is None or node.is_input:
            continue
        for x in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
            if not isinstance(x, keras.KerasTensor) and (
                    keras.ops.is_tensor(x) or isinstance(x, (np.ndarray, keras.Variable))):
                return node.operation
    return None


def _trace(layer, args, kwargs):
    """`(functional model equal to one call of composite `layer`, None)` or `(None, why not)`.

    The model's inputs are placeholders like `_tensor_leaves(args, kwargs)`;
    its layers are `layer`'s own sublayers (`inline_nested` copies them). The
    call nodes the trace records on them are forgotten again, so `layer` is
    left as it was.
    """
    own = own_weights(layer)
    if own:
        names = ", ".join(v.path.split("/")[-1] for v in own)
        return None, f"reads weights of its own ({names}) besides its sublayers'"
    leaves = _tensor_leaves(args, kwargs)
    if any(compat.keras_mask(t) is not None for t in leaves):
        return None, "is given a Keras mask implicitly"
    holders = {id(t): keras.Input(batch_shape=t.shape, dtype=t.dtype) for t in leaves}
    p_args, p_kwargs = keras.tree.map_structure(
        lambda x: holders.get(id(x), x) if isinstance(x, keras.KerasTensor) else x,
        (args, kwargs))
    counts = compat.node_counts(compat.sublayers(layer))
    try:
        return _checked(layer, keras.Model([holders[id(t)] for t in leaves],
                                           layer.call(*p_args, **p_kwargs), name=layer.name),
                        args, kwargs)
    except Exception as e:  # noqa: BLE001  any failure keeps the layer whole
        unknown = any(d is None for t in leaves for d in t.shape[1:])
        return None, (f"cannot run on symbolic tensors ({type(e).__name__}: {str(e)[:160]})"
                      + ("; its inputs have None dimensions besides the batch (a sequence "
                         "length), which code in its call that reads shapes cannot use"
                         if unknown else ""))
    finally:
        compat.restore_node_counts(counts)


def _checked(layer, graph, args, kwargs):
    """`(graph, None)` when `graph` computes what `layer` computes, else `(None, why not)`."""
    read = {id(w) for sub in graph.layers for w in sub.weights}
    unread = [sub.name for sub in compat.sublayers(layer)
              if any(id(w) not in read for w in sub.weights)]
    if unread:
        return None, (f"does not run sublayer '{unread[0]}' on its inputs (it calls it on "
                      "constants, or not at all)")
    baked = _baked_constant(graph)
    if baked is not None:
        return None, (f"gives '{getattr(baked, 'name', type(baked).__name__)}' a tensor "
                      "computed outside the graph")
    rng = np.random.default_rng(0)
    leaves = _tensor_leaves(args, kwargs)
    values = {id(t): _concrete(t, rng) for t in leaves}
    c_args, c_kwargs = keras.tree.map_structure(
        lambda x: values.get(id(x), x) if isinstance(x, keras.KerasTensor) else x,
        (args, kwargs))
    try:
        expected = layer(*c_args, **c_kwargs)
        error = relative_error(expected, graph([values[id(t)] for t in leaves], training=False))
    except Exception as e:  # noqa: BLE001
        return None, f"has a traced graph that does not run ({type(e).__name__}: {str(e)[:160]})"
    if not error <= TOLERANCE:
        return None, f"has a traced graph that computes something else (relative error {error:.1e})"
    return graph, None


def inline_nested(model):
    """A flat functional model: nested models and composite layers inlined.

    A backbone used as a layer (`bb(i)`) or a composite block is one opaque
    node to the channel graph, which would freeze every channel it touches.
    Inlined, their layers are ordinary nodes of one graph, so channels are
    coupled and removed across them (see the module docstring for which
    composite layers are inlined and how sublayers are named). When something
    is inlined, every layer is a copy with the same weights (Lambda layers and
    keras.ops calls are reused), so `model` is left untouched. Subclassed
    models stay opaque nodes. Returns `model`'s functional view when there is
    nothing to inline.
    """
    model = functional_view(model)
    if not any(_to_open(layer) for layer in model.layers):
        return model
    taken = {layer.name for layer in compat.flatten_layers(model)}
    used, cache, copies, names = set(), {}, [], {}  # names: id(sublayer) -> prefixed name

    def copy_of(op, again=False):
        """The copy of `op` in the flat model; `again`: one more copy (another call)."""
        if again or id(op) not in cache:
            new = op
            if isinstance(op, keras.layers.Layer) and not isinstance(op, keras.layers.Lambda):
                name = names.get(id(op), op.name)
                if name in used:
                    k = 1
                    while f"{name}_{k}" in taken:
                        k += 1
                    name = f"{name}_{k}"
                    taken.add(name)
                try:
                    new = new_layer(op, name=name)
                    copies.append((op, new))
                except Exception:  # noqa: BLE001  a config that cannot round-trip
                    if name != op.name:
                        raise ValueError(
                            f"layer '{op.name}' ({type(op).__name__}) cannot be copied from "
                            f"its config, so it cannot be renamed '{name}' to stay "
                            "unique in the flat model") from None
                    new = op  # reused as is (stateless or not, it is the same layer)
                if op in _KEPT:
                    _KEPT[new] = _KEPT[op]
            used.add(getattr(new, "name", None))
            cache.setdefault(id(op), new)
            return new
        return cache[id(op)]

    def operation_fn(op):
        if nested_graph(op) is not None or is_composite(op):
            return op  # opened (or copied) by call_fn
        if id(op) in names and id(op) in cache and not op.weights:
            # a weightless sublayer a block calls twice (MLP's one Dropout after both
            # Dense): one copy per call, so the flat graph does not see a shared layer
            try:
                return copy_of(op, again=True)
            except ValueError:  # it cannot be copied: shared, as in the block
                return cache[id(op)]
        return copy_of(op)

    def call_fn(op, *args, **kwargs):
        inner = nested_graph(op)
        if inner is not None:
            return compat.run_through_graph(inner, args[0], operation_fn, call_fn)
        if is_composite(op):
            graph, reason = (None, _KEPT[op]) if op in _KEPT else _trace(op, args, kwargs)
            if graph is not None:
                prefix = names.get(id(op), op.name)
                for sub in compat.sublayers(op):
                    if not sub.name.startswith(prefix):
                        names[id(sub)] = f"{prefix}_{sub.name}"  # the innermost block wins
                leaves = _tensor_leaves(args, kwargs)
                return compat.run_through_graph(graph, leaves, operation_fn, call_fn)
            _KEPT[op] = reason
            return copy_of(op)(*args, **kwargs)
        return op(*args, **kwargs)

    inputs = [keras.Input(batch_shape=t.shape, dtype=t.dtype, name=input_name(t))
              for t in model.inputs]
    outputs = compat.run_through_graph(model, inputs, operation_fn, call_fn)
    flat = keras.Model(keras.tree.pack_sequence_as(compat.inputs_struct(model), inputs), outputs,
                       name=model.name)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return flat
