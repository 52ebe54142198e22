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

import inspect
import weakref

import keras
import numpy as np

from tf_psp import compat, registry
from tf_psp.functional import from_config, functional_view, input_name, new_layer, relative_error
from tf_psp.macs import own_weights

TOLERANCE = 1e-5  # largest relative error of an inlined composite on random inputs
_FREE_DIM = 3  # length of a None (non-batch) dimension in that check
compat.tolerate_unused_attention_arguments()  # keras-hub decoders call MHA with cache=None
_KEPT = weakref.WeakKeyDictionary()  # composite layer -> why it stays whole
_UNSIZED = weakref.WeakKeyDictionary()  # ... why it stays whole while lengths are unknown


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
    so a layer that cannot be inlined is traced once, not at every rebuild. A
    layer that could not be traced because its inputs had unknown dimensions
    besides the batch (a sequence length) is traced again when a model gives it
    inputs of known shape (`inline_nested(model, input_shape=...)`).
    """
    return _KEPT.get(layer) or _UNSIZED.get(layer)


def _sized(tensors):
    """Whether every dimension of `tensors` but the batch is known."""
    return all(d is not None for t in tensors for d in t.shape[1:])


def _to_open(layer, sized=False):
    return nested_graph(layer) is not None or (
        is_composite(layer) and layer not in _KEPT and (sized or layer not in _UNSIZED))


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
    """The first operation of `graph` given a concrete float tensor argument, or None.

    A float tensor computed outside the graph may be a function of weights,
    which shrinking slices on their channel axes, so it would be left stale; a
    boolean or integer one is a mask computed from shapes (a causal or
    sliding-window mask), and a float scalar (a softmax scale computed from a
    head size) has no channel axis: the flat graph carries those as constants.
    """
    for node in compat.nodes_in_order(graph):
        if node.operation is None or node.is_input:
            continue
        for x in keras.tree.flatten((node.arguments.args, node.arguments.kwargs)):
            if not isinstance(x, keras.KerasTensor) and (
                    keras.ops.is_tensor(x) or isinstance(x, (np.ndarray, keras.Variable))
            ) and "float" in keras.backend.standardize_dtype(x.dtype) and int(
                np.prod(x.shape)) != 1:
                return node.operation
    return None


def _traced_model(layer, leaves, args, kwargs, batch=None):
    """The functional model of one symbolic `layer.call` on placeholders like `leaves`,
    with batch size `batch` (None: unknown)."""
    holders = {id(t): keras.Input(batch_shape=(batch,) + tuple(t.shape[1:]), dtype=t.dtype)
               for t in leaves}
    p_args, p_kwargs = keras.tree.map_structure(
        lambda x: holders.get(id(x), x) if isinstance(x, keras.KerasTensor) else x,
        (args, kwargs))
    return keras.Model([holders[id(t)] for t in leaves], layer.call(*p_args, **p_kwargs),
                       name=layer.name)


def _unbatched(graph, name):
    """`graph` (traced with a batch of one) re-run on placeholders of unknown batch size:
    ops given a constant built for the batch of one (a causal mask) broadcast it."""
    holders = [keras.Input(batch_shape=(None,) + tuple(t.shape[1:]), dtype=t.dtype)
               for t in compat.flat_inputs(graph)]
    outputs = compat.run_through_graph(graph, holders, lambda op: op,
                                       lambda op, *args, **kwargs: op(*args, **kwargs))
    return keras.Model(holders, outputs, name=name)


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
    counts = compat.node_counts(compat.sublayers(layer))
    try:
        # code that reads the batch size (a causal mask broadcast to it, a reshape) needs
        # a number: where the unknown batch size fails, trace with a batch of one, then
        # give the graph an unknown batch size again (a constant built for the batch of
        # one broadcasts; anything else that baked it in fails the check)
        for batch in (None, 1) if _sized(leaves) else (None,):
            try:
                graph = _traced_model(layer, leaves, args, kwargs, batch=batch)
                if batch is not None:
                    graph = _unbatched(graph, layer.name)
            except Exception as e:  # noqa: BLE001  any failure keeps the layer whole
                reason = (f"cannot run on symbolic tensors ({type(e).__name__}: "
                          f"{str(e)[:160]})" + ("" if _sized(leaves) else
                          "; its inputs have None dimensions besides the batch (a sequence "
                          "length), which code in its call that reads shapes cannot use: "
                          "pass input_shape= (inline_nested) to trace it at a fixed length"))
            else:
                graph, reason = _checked(layer, graph, args, kwargs)
                if graph is not None:
                    return graph, None
        return None, reason  # the batch of one's, where both were tried
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


def _input_shapes(model, input_shape):
    """`input_shape` as one tuple per input of `model` (None if not given), checked."""
    if input_shape is None:
        return None
    shapes = list(input_shape)
    if all(d is None or isinstance(d, (int, np.integer)) for d in shapes):
        shapes = [shapes]
    shapes = [tuple(None if d is None else int(d) for d in shape) for shape in shapes]
    if len(shapes) != len(model.inputs):
        raise ValueError(f"model '{model.name}': input_shape gives {len(shapes)} shapes for "
                         f"{len(model.inputs)} inputs.")
    for t, shape in zip(model.inputs, shapes):
        if len(shape) != len(t.shape) - 1 or any(
                d is not None and s is not None and d != s for d, s in zip(t.shape[1:], shape)):
            raise ValueError(f"model '{model.name}': input_shape {shape} does not fit input "
                             f"'{input_name(t)}' of shape {tuple(t.shape[1:])} (batch left out).")
    return shapes


def _attention_twin(layer, name):
    """A plain `MultiHeadAttention` from the config of `layer`, a subclass of it with a
    call of its own and no weights of its own, else None (the caller checks that it
    computes what `layer` computes where it is called)."""
    if (not isinstance(layer, keras.layers.MultiHeadAttention)
            or type(layer) is keras.layers.MultiHeadAttention
            or registry.registered_class(layer) is not keras.layers.MultiHeadAttention
            or own_weights(layer)):
        return None
    config = layer.get_config()
    config.pop("build_config", None)
    config["name"] = name
    try:
        return from_config(keras.layers.MultiHeadAttention, config)
    except Exception:  # noqa: BLE001  its config has keys of its own
        return None


def _known_arguments(layer, kwargs):
    """`kwargs` less the None-valued ones `layer.call` does not take."""
    known = inspect.signature(layer.call).parameters
    return {k: v for k, v in kwargs.items() if k in known or v is not None}


def _same_function(a, b, args, kwargs):
    """Whether layer `b`, given `a`'s weights, computes what `a` computes on random inputs
    like `args` (the None arguments `b` does not take are left out)."""
    rng = np.random.default_rng(0)
    values = {id(t): _concrete(t, rng) for t in _tensor_leaves(args, kwargs)}
    c_args, c_kwargs = keras.tree.map_structure(
        lambda x: values.get(id(x), x) if isinstance(x, keras.KerasTensor) else x,
        (args, kwargs))
    try:
        b(*c_args, **_known_arguments(b, c_kwargs))  # builds b
        b.set_weights(a.get_weights())
        error = relative_error(a(*c_args, **c_kwargs),
                               b(*c_args, **_known_arguments(b, c_kwargs)))
    except Exception:  # noqa: BLE001
        return False
    return error <= TOLERANCE


def inline_nested(model, input_shape=None):
    """A flat functional model: nested models and composite layers inlined.

    A backbone used as a layer (`bb(i)`) or a composite block is one opaque
    node to the channel graph, which would freeze every channel it touches.
    Inlined, their layers are ordinary nodes of one graph, so channels are
    coupled and removed across them (see the module docstring for which
    composite layers are inlined and how sublayers are named). When something
    is inlined, every layer is a copy with the same weights (Lambda layers and
    keras.ops calls are reused), so `model` is left untouched. Subclassed
    models stay opaque nodes. Returns `model`'s functional view when there is
    nothing to inline and no `input_shape`.

    Args:
        model: a built functional or Sequential model.
        input_shape: shape of one sample, no batch dimension (a list of shapes
            for several inputs, in `model.inputs` order), or None: the inputs'
            own shapes. Given, the result takes inputs of this shape only; a
            composite layer whose call reads its inputs' length (a decoder
            building its causal mask) can be inlined at this length.

    Raises:
        ValueError: `input_shape` does not match `model`'s inputs.
    """
    model = functional_view(model)
    shapes = _input_shapes(model, input_shape)
    sized = _sized(model.inputs) or shapes is not None
    if shapes is None and not any(_to_open(layer, sized) for layer in model.layers):
        return model
    taken = {layer.name for layer in compat.flatten_layers(model)}
    used, cache, copies, names = set(), {}, [], {}  # names: id(sublayer) -> prefixed name
    twins = {}  # id(plain MultiHeadAttention standing for a subclass) -> the subclass layer
    same = set()  # ids of twins (and rebuilt copies) checked to compute what they replace
    rebuilt = {}  # id(copy built from a layer's attributes) -> that layer

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
                    twin = _attention_twin(op, name)
                    new = new_layer(op, name=name) if twin is None else twin
                    if twin is not None:
                        twins[id(twin)] = op
                    copies.append((op, new))
                    if getattr(new, "config_from_attributes", False):
                        rebuilt[id(new)] = op
                except Exception:  # noqa: BLE001  a config that cannot round-trip
                    if name == op.name:
                        new = op  # reused as is (stateless or not, it is the same layer)
                    elif not op.weights and not compat.sublayers(op):
                        new = compat.renamed_copy(op, name)  # stateless: a shallow copy
                    else:
                        raise ValueError(
                            f"layer '{op.name}' ({type(op).__name__}) cannot be copied from "
                            f"its config, so it cannot be renamed '{name}' to stay "
                            "unique in the flat model") from None
                for kept in (_KEPT, _UNSIZED):
                    if op in kept:
                        kept[new] = kept[op]
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
            if op in _KEPT:
                graph, reason = None, _KEPT[op]
            elif op in _UNSIZED and not _sized(_tensor_leaves(args, kwargs)):
                graph, reason = None, _UNSIZED[op]
            else:
                graph, reason = _trace(op, args, kwargs)
            if graph is not None:
                prefix = names.get(id(op), op.name)
                for sub in compat.sublayers(op):
                    if not sub.name.startswith(prefix):
                        names[id(sub)] = f"{prefix}_{sub.name}"  # the innermost block wins
                leaves = _tensor_leaves(args, kwargs)
                return compat.run_through_graph(graph, leaves, operation_fn, call_fn)
            (_KEPT if _sized(_tensor_leaves(args, kwargs)) else _UNSIZED)[op] = reason
            return checked_call(copy_of(op), args, kwargs)
        if id(op) in twins:  # a plain MultiHeadAttention for a subclass: is it the same?
            original = twins[id(op)]
            if id(op) in same or _same_function(original, op, args, kwargs):
                same.add(id(op))
                return op(*args, **_known_arguments(op, kwargs))
            del twins[id(op)]  # it is not: a copy of the subclass after all
            op = new_layer(original, name=op.name)
            cache[id(original)] = op
            copies[:] = [(o, op if o is original else n) for o, n in copies]
        return checked_call(op, args, kwargs)

    def checked_call(op, args, kwargs):
        """`op(*args, **kwargs)`; a copy rebuilt from its original's attributes (its
        config cannot serialize) must first compute what the original computes."""
        if id(op) in rebuilt and id(op) not in same:
            original = rebuilt[id(op)]
            if not _same_function(original, op, args, kwargs):
                raise ValueError(
                    f"layer '{original.name}' ({type(original).__name__}): its get_config "
                    "cannot serialize the arguments it was built with, and a copy built "
                    "from its attributes computes something else, so it cannot be copied "
                    "into the flat model")
            same.add(id(op))
        outputs = op(*args, **kwargs)
        if not isinstance(op, keras.layers.Layer) and not any(
                t.sparse for t in _tensor_leaves(args, kwargs)):
            # an op given a concrete tensor (`x * ops.sqrt(d)`) reads it as sparse, as
            # it has no `sparse` attribute (Keras 3.15), and calls its output sparse
            for t in keras.tree.flatten(outputs):
                if isinstance(t, keras.KerasTensor):
                    compat.mark_dense(t)
        return outputs

    inputs = [keras.Input(batch_shape=t.shape if shapes is None else (t.shape[0],) + shape,
                          dtype=t.dtype, name=input_name(t))
              for t, shape in zip(model.inputs, shapes or [None] * len(model.inputs))]
    outputs = compat.run_through_graph(model, inputs, operation_fn, call_fn)
    flat = keras.Model(keras.tree.pack_sequence_as(compat.inputs_struct(model), inputs), outputs,
                       name=model.name)
    for old, new in copies:
        new.set_weights(old.get_weights())
    return flat
