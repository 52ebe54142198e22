"""MAC counting rules: the multiply-accumulates of one call of a layer, from its shapes.

A rule is a function `(layer, input_shapes, output_shapes) -> MACs` (batched
shapes, batch dimension excluded from the count). The built-in rules cover
Conv1D/2D/3D, their transposes, DepthwiseConv, SeparableConv and Dense;
`tf_psp.register_layer` adds rules for other layer types (a handler's
`macs` method). A composite layer (no rule of its own, but Conv/Dense... sublayers
that its `call` runs) counts the sum of its sublayers' MACs, measured by calling
it once as its graph node does, on placeholders (`composite_macs`), plus the
`keras.ops.einsum`/`matmul`/`dot_product_attention` its own code runs (attention
scores written with ops); a weighted sublayer without a rule leaves it not counted.
"""

import inspect
import math

import keras

from tf_psp import compat, registry


def spatial(layer, shape):
    """Spatial dims of a batched `shape` given the layer's data_format."""
    if getattr(layer, "data_format", "channels_last") == "channels_first":
        return shape[2:]
    return shape[1:-1]


def _size(shape):
    return math.prod(int(d) for d in shape)


def _variable_size(variable):
    return _size(variable.shape)


def conv_macs(layer, input_shapes, output_shapes):
    # Each kernel entry is used once per output position; with groups the
    # kernel is [*k, cin/groups, cout], so this is prod(k) * cin/groups * cout.
    return _size(spatial(layer, output_shapes[0])) * _variable_size(layer.kernel)


def conv_transpose_macs(layer, input_shapes, output_shapes):
    # Each kernel entry [*k, cout, cin] is used once per *input* position.
    return _size(spatial(layer, input_shapes[0])) * _variable_size(layer.kernel)


def dense_macs(layer, input_shapes, output_shapes):
    # Dense acts on the last axis; all other non-batch axes are positions.
    return _size(output_shapes[0][1:-1]) * _variable_size(layer.kernel)


def depthwise_macs(layer, input_shapes, output_shapes):
    return _size(spatial(layer, output_shapes[0])) * _variable_size(layer.kernel)


def separable_macs(layer, input_shapes, output_shapes):
    positions = _size(spatial(layer, output_shapes[0]))
    return positions * (
        _variable_size(layer.depthwise_kernel) + _variable_size(layer.pointwise_kernel)
    )


def rnn_macs(layer, input_shapes, output_shapes):
    # Each kernel and recurrent-kernel entry is used once per time step (LSTM: 4
    # gates, GRU: 3); gate products, activations and biases are not counted.
    cell = getattr(layer, "cell", None)
    if getattr(cell, "kernel", None) is None or getattr(cell, "recurrent_kernel", None) is None:
        return None
    steps = _size(input_shapes[0][1:-1])
    return steps * (_variable_size(cell.kernel) + _variable_size(cell.recurrent_kernel))


def bidirectional_macs(layer, input_shapes, output_shapes):
    parts = []
    for sub in (layer.forward_layer, layer.backward_layer):
        rule = mac_rule(sub)
        parts.append(None if rule is None else rule(sub, input_shapes, output_shapes))
    return None if None in parts else sum(parts)


def attention_kernel_uses(layer, input_shapes, output_shapes):
    """`[(kernel, positions)]` of a MultiHeadAttention call: each kernel entry is used
    once per query position (query, output, gate) or value position (key, value)."""
    query, key, value, output = compat.attention_projections(layer)
    value_dim = int(value.kernel.shape[0])
    # `value` is the second argument; masks may follow: pick by its feature size
    value_shape = next((s for s in input_shapes[1:] if s[-1] == value_dim), input_shapes[0])
    tq, tv = _size(output_shapes[0][1:-1]), _size(value_shape[1:-1])
    gate = compat.attention_gate(layer)  # use_gate: one more projection of the query
    uses = [(query.kernel, tq), (key.kernel, tv), (value.kernel, tv), (output.kernel, tq)]
    return uses + ([(gate.kernel, tq)] if gate is not None else [])


def attention_macs(layer, input_shapes, output_shapes):
    # Projections (attention_kernel_uses); scores and weighted sum:
    # heads * Tq * Tv * (key_dim + value_dim).
    uses = attention_kernel_uses(layer, input_shapes, output_shapes)
    (query_kernel, tq), _, (value_kernel, tv) = uses[:3]
    heads, key_dim = int(query_kernel.shape[-2]), int(query_kernel.shape[-1])
    head_value_dim = int(value_kernel.shape[-1])
    return (sum(positions * _variable_size(kernel) for kernel, positions in uses)
            + heads * tq * tv * (key_dim + head_value_dim))


def _letter_sizes(term, shape):
    """`[(index letter, size)]` of one einsum operand (`'...'` covers the middle axes)."""
    shape = tuple(shape)
    if "..." not in term:
        return list(zip(term, shape))
    head, tail = term.split("...")
    return list(zip(head, shape[:len(head)])) + list(zip(tail, shape[len(shape) - len(tail):]))


def einsum_macs(equation, output_shape, operand_shapes):
    """MACs of `einsum(equation, *operands)` for one sample: every output entry sums over
    the contracted indices (in an operand, not in the output), so `size(output) * prod(their
    sizes)`; the output's first axis (the batch) is left out. 0 without contracted indices
    (an elementwise or outer product, like gate products); None for a one-operand einsum or
    an equation without `->`."""
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    terms = inputs.split(",")
    if len(terms) < 2 or not arrow:
        return None
    sizes = dict(pair for term, shape in zip(terms, operand_shapes)
                 for pair in _letter_sizes(term, shape))
    contracted = {c for c in inputs if c.isalpha() and c not in output}
    if not contracted:
        return 0
    if any(sizes.get(c) is None for c in contracted):
        return None
    return _size(output_shape[1:]) * math.prod(int(sizes[c]) for c in contracted)


def einsum_dense_macs(layer, input_shapes, output_shapes):
    # EinsumDense: einsum(equation, input, kernel) (bias not counted)
    return einsum_macs(layer.equation, output_shapes[0],
                       [input_shapes[0], tuple(layer.kernel.shape)])


def embedding_macs(layer, input_shapes, output_shapes):
    # A lookup: 0 MACs. keras-hub's ReversibleEmbedding called with reverse=True
    # multiplies by the transposed table instead, [.., output_dim] -> [.., input_dim]
    # (same rank; a lookup adds an axis): one MAC per table entry and position.
    shape_in, shape_out = input_shapes[0], output_shapes[0]
    if (len(shape_in) == len(shape_out) and shape_in[-1] == layer.output_dim
            and shape_out[-1] == layer.input_dim):
        return _size(shape_out[1:-1]) * layer.input_dim * layer.output_dim
    return 0


def no_macs(layer, input_shapes, output_shapes):
    # Lookups (Embedding) and per-channel scales and shifts (normalizations,
    # PReLU): no multiply-accumulates by convention, like activations.
    return 0


def counted_sublayers(layer):
    """The sublayers of `layer` that have a MAC rule of their own (not composites)."""
    return [sub for sub in compat.sublayers(layer) if _own_rule(sub) is not None]


def _bound_tensors(sub, args, kwargs):
    """The tensors of one call of `sub`, in the order of its `call` signature.

    Positional and keyword arguments alike (keras-hub calls attention as
    `attention(query=x, value=x, attention_mask=m)`), so a rule reading
    `input_shapes[0]` sees the first parameter (the query).
    """
    try:
        bound = inspect.signature(sub.call).bind_partial(*args, **kwargs).arguments
        values = list(bound.values())
    except (TypeError, ValueError):  # an unusual signature: positional, then keyword order
        values = list(args) + list(kwargs.values())
    return [x for x in keras.tree.flatten(values) if hasattr(x, "shape")]


def _placeholder(shape, dtype):
    """Batch-1 input for a counting run: zeros; ones for integer or boolean inputs
    (token ids and padding masks: every position valid)."""
    shape = (1,) + tuple(shape[1:])
    if "float" in str(dtype):
        return keras.ops.zeros(shape, dtype=dtype)
    return keras.ops.ones(shape, dtype=dtype)


def own_weights(layer):
    """The weights `layer` created itself (not its sublayers')."""
    inner = {id(v) for sub in compat.sublayers(layer) for v in sub.weights}
    return [v for v in layer.weights if id(v) not in inner]


def composite_macs(layer, input_shapes, output_shapes, arguments=None):
    """MACs of a composite layer: the sum of its sublayers' MACs over one call.

    Runs `layer` once (batch 1, `training=False`) and counts every call of a
    sublayer that has a rule, with the shapes it saw (times the batch it saw,
    when the layer folds positions into the batch); a sublayer called inside
    another counted sublayer (a Bidirectional's LSTM) is counted by its parent.
    With `arguments` (the `keras.src.ops.node.NodeArguments` of the layer's
    call in a graph) the layer is called as in the graph, with every tensor
    argument replaced by a placeholder of its shape in `input_shapes`, so a
    layer with several inputs or tensor keywords
    (`TransformerEncoder(x, padding_mask=m)`) is counted; without, it is
    called on zeros of `input_shapes[0]`.
    None (not counted) when the layer is not built, has several inputs and no
    `arguments`, or fails to run.
    """
    if not layer.built:
        return None
    if arguments is not None:
        tensors = list(arguments.keras_tensors)
        if len(tensors) != len(input_shapes):
            return None
        values = {id(t): _placeholder(shape, t.dtype) for t, shape in zip(tensors, input_shapes)}
        call_args, call_kwargs = arguments.fill_in(values)
    elif len(input_shapes) == 1:
        call_args = (keras.ops.zeros((1,) + tuple(input_shapes[0][1:]),
                                     dtype=layer.compute_dtype),)
        call_kwargs = {}
    else:
        return None
    call_kwargs = {**call_kwargs, "training": False}
    subs = counted_sublayers(layer)
    covered = {id(v) for sub in subs for v in sub.weights}
    if any(id(v) not in covered for sub in compat.sublayers(layer) for v in own_weights(sub)):
        return None  # a sublayer with weights and no rule: not counted rather than a silent 0
    seen, depth, op_macs = [], [0], []

    def recording(sub, call):
        def call_and_record(*args, **kwargs):
            depth[0] += 1
            try:
                outputs = call(*args, **kwargs)
            finally:
                depth[0] -= 1
            if depth[0] == 0:
                shapes_in = [tuple(x.shape) for x in _bound_tensors(sub, args, kwargs)]
                shapes_out = [tuple(x.shape) for x in keras.tree.flatten(outputs)
                              if hasattr(x, "shape")]
                seen.append((sub, shapes_in, shapes_out))
            return outputs
        return call_and_record

    def recording_op(name, op):
        def op_and_record(*args, **kwargs):
            outputs = op(*args, **kwargs)
            if depth[0] == 0:  # not inside a counted sublayer (which counts its own)
                op_macs.append(OP_RULES[name](outputs, *args, **kwargs))
            return outputs
        return op_and_record

    own = {id(sub): sub.__dict__["call"] for sub in subs if "call" in sub.__dict__}
    for sub in subs:  # an instance attribute: Layer.__call__ looks up self.call
        sub.__dict__["call"] = recording(sub, sub.call)
    ops = {name: getattr(keras.ops, name) for name in OP_RULES}
    for name, op in ops.items():  # keras-hub attention: `from keras import ops; ops.einsum`
        setattr(keras.ops, name, recording_op(name, op))
    try:
        layer(*call_args, **call_kwargs)
    except Exception:  # noqa: BLE001 - a layer that cannot run on placeholders is not counted
        return None
    finally:
        for name, op in ops.items():
            setattr(keras.ops, name, op)
        for sub in subs:
            if id(sub) in own:
                sub.__dict__["call"] = own[id(sub)]
            else:
                sub.__dict__.pop("call", None)
    if any(macs is None for macs in op_macs):
        return None
    total = sum(op_macs)
    for sub, shapes_in, shapes_out in seen:
        macs = _own_rule(sub)(sub, shapes_in, shapes_out)
        if macs is None:
            return None
        # a sublayer may see positions folded into its batch (TimeDistributed): count them
        total += macs * int(shapes_out[0][0] or 1)
    return total


# In a counting run the batch is 1, so an op's whole output is one sample's (an op on
# positions alone, without a batch axis, runs once per sample too).
def _einsum_op_macs(output, equation, *operands, **kwargs):
    return einsum_macs(equation, (1,) + tuple(output.shape), [tuple(x.shape) for x in operands])


def _matmul_op_macs(output, a, b, **kwargs):
    # [..., m, k] @ [..., k, n]: k MACs per output entry
    return _size(tuple(output.shape)) * int(tuple(a.shape)[-1]) if len(a.shape) > 1 else None


def _attention_op_macs(output, query, key, value, *args, **kwargs):
    # [B, T, H, D] queries on [B, S, K, D] keys and [B, S, K, Dv] values: scores and sums
    q, k, v = tuple(query.shape), tuple(key.shape), tuple(value.shape)
    return int(q[1]) * int(k[1]) * int(q[2]) * (int(q[3]) + int(v[3]))


# keras.ops functions a composite layer's `call` may multiply with (keras-hub attention
# scores and weighted sums): op name -> (output, *args, **kwargs) -> MACs per sample
OP_RULES = {
    "einsum": _einsum_op_macs,
    "matmul": _matmul_op_macs,
    "dot_product_attention": _attention_op_macs,
}


def multiplies_activations(operation):
    """Whether `operation` is a keras.ops node `op_node_macs` counts."""
    return isinstance(operation, (compat.numpy_ops.Einsum, compat.numpy_ops.Matmul,
                                  compat.nn_ops.DotProductAttention))


def op_node_macs(operation, operand_shapes, output_shape):
    """MACs per sample of a keras.ops node of a functional graph that multiplies two
    activations (an inlined attention's einsum, matmul, dot_product_attention: no
    weights, but MACs that depend on heads and length); 0 for any other op node.
    Shapes are batched with a batch of one; None when an operand shape is unknown."""
    shapes = [tuple(s) for s in operand_shapes]
    out = tuple(output_shape)
    if any(d is None for s in shapes + [out] for d in s):
        return None
    if isinstance(operation, compat.numpy_ops.Einsum):
        return einsum_macs(operation.subscripts, out, shapes)
    if isinstance(operation, compat.numpy_ops.Matmul) and len(shapes) == 2:
        return _size(out) * int(shapes[0][-1]) if len(shapes[0]) > 1 else None
    if isinstance(operation, compat.nn_ops.DotProductAttention) and len(shapes) >= 3:
        q, k, v = shapes[:3]
        return int(q[1]) * int(k[1]) * int(q[2]) * (int(q[3]) + int(v[3]))
    return 0


def call_macs(rule, layer, input_shapes, output_shapes, arguments=None):
    """`rule(layer, input_shapes, output_shapes)`; a composite layer also gets the
    `arguments` of its call, so that it is counted with all its inputs."""
    if rule is composite_macs:
        return composite_macs(layer, input_shapes, output_shapes, arguments)
    return rule(layer, input_shapes, output_shapes)


# Checked in order with isinstance, so PSP layers use their Keras parent's rule.
# A rule may return None: "not counted" (e.g. an RNN with an unusual cell).
MAC_RULES = (
    ((keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D), conv_macs),
    (
        (
            keras.layers.Conv1DTranspose,
            keras.layers.Conv2DTranspose,
            keras.layers.Conv3DTranspose,
        ),
        conv_transpose_macs,
    ),
    ((keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D), depthwise_macs),
    ((keras.layers.SeparableConv1D, keras.layers.SeparableConv2D), separable_macs),
    ((keras.layers.Dense,), dense_macs),
    ((keras.layers.EinsumDense,), einsum_dense_macs),
    ((keras.layers.SimpleRNN, keras.layers.LSTM, keras.layers.GRU), rnn_macs),
    ((keras.layers.Bidirectional,), bidirectional_macs),
    ((keras.layers.MultiHeadAttention,), attention_macs),
    ((keras.layers.Embedding,), embedding_macs),
    (
        (
            keras.layers.BatchNormalization,
            keras.layers.LayerNormalization,
            keras.layers.GroupNormalization,
            keras.layers.Normalization,
            keras.layers.PReLU,
            keras.layers.RMSNormalization,
        ),
        no_macs,
    ),
)

# keras-hub layers (matched by class name in a keras_hub module, keras-hub being
# optional) that look up or scale: 0 MACs, like Embedding and the normalizations.
KERAS_HUB_NO_MACS = frozenset({"PositionEmbedding", "RMSNormalization"})
KERAS_HUB_NORM_SUFFIXES = ("LayerNorm", "LayerNormalization", "RMSNorm")  # LlamaLayerNorm ...


# rules of layers whose kernels `zeroed_macs` reads (`_kernel_entries`)
KERNEL_RULES = (conv_macs, conv_transpose_macs, depthwise_macs, separable_macs, dense_macs)


def mac_rule(layer):
    """The MAC rule for `layer`, or None: its registered handler's `macs` method
    (`tf_psp.register_layer`; inherited by subclasses), else a built-in rule, else
    `composite_macs` when `layer` is not registered and sublayers of it have rules."""
    rule = _own_rule(layer)
    if (rule is None and registry.registered_class(layer) is None
            and not compat.is_graph_model(layer) and counted_sublayers(layer)):
        return composite_macs
    return rule


def _own_rule(layer):
    handler = registry.mac_handler(layer)
    if handler is not None:
        return handler.macs
    for classes, rule in MAC_RULES:
        if isinstance(layer, classes):
            return rule
    for cls in type(layer).__mro__:
        name = cls.__name__
        if cls.__module__.startswith("keras_hub.") and (
                name in KERAS_HUB_NO_MACS or name.endswith(KERAS_HUB_NORM_SUFFIXES)):
            return no_macs
    return None


def layer_macs(model):
    """Layer name -> MACs of all its calls in `model`, from the shapes in the graph.

    Nested models are walked; layers without a rule are left out.

    Raises:
        ValueError: a counted layer has an unknown dimension (naming it).
    """
    out = {}
    for node in compat.nodes_in_order(model):
        layer = node.operation
        if not isinstance(layer, keras.layers.Layer) or isinstance(layer, keras.layers.InputLayer):
            continue
        if compat.is_graph_model(layer):
            for name, macs in layer_macs(layer).items():
                out[name] = out.get(name, 0) + macs
            continue
        rule = mac_rule(layer)
        if rule is None:
            continue
        shapes_in = [tuple(t.shape) for t in node.input_tensors]
        shapes_out = [tuple(t.shape) for t in node.output_tensors]
        if any(d is None for shape in shapes_in + shapes_out for d in shape[1:]):
            raise ValueError(f"layer '{layer.name}': shapes {shapes_in} -> {shapes_out} have an "
                             "unknown dimension, so its MACs cannot be counted.")
        macs = call_macs(rule, layer, shapes_in, shapes_out, node.arguments)
        out[layer.name] = out.get(layer.name, 0) + (macs or 0)
    return out
