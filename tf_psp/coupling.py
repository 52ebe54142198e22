"""Coupling-aware PSP: one alpha per channel of each dependency group.

With the paper's per-layer alphas (`parameterize(coupling='layer')`), a
channel of a tensor with several readers (a residual stream, a concatenated
feature map) can only be removed when every reader happens to prune the same
index, which independent alphas rarely do. `parameterize(coupling='group')`
instead gives every *removable channel* of `tf_psp.graph.ChannelGraph` (the
slots `strip_and_shrink` removes together) one alpha, shared by every layer
that reads the channel: the alpha scales the channel at the input of each
reading Conv, Dense and SeparableConv. A zero alpha therefore zeroes the
channel for all of its readers, and `strip_and_shrink` removes it together
with every filter that writes it and every per-channel layer on the way
(BatchNormalization, DepthwiseConv2D ...): pruned is removable by
construction.

Why reads and not writes: a BatchNormalization after the writing conv makes
the loss invariant to a scale on that conv's filters, so a write-side alpha
would be shrunk by decay alone (and leave the BN statistics behind), never
by the loss. A read-side alpha is the paper's `channel` structure, shared.

All alphas live in one `PSPGroupAlphas` layer, one variable per *channel
space* (the channels written by one producer, or by several producers tied
by Add/Multiply, e.g. a whole residual stream). The layer is called once
before each reading layer with `index`: per channel of that input, the
position of its alpha among the concatenated group alphas, or -1 for a
frozen channel (model inputs and outputs, layers the graph does not
understand), which keeps the scale 1.

Cost-aware decay (`cost='macs'`) weights each alpha's regularizer by the MACs
its channel costs (every read and write of it, see `GroupPlan.costs`),
divided by the mean cost, so the default strength keeps its meaning and
expensive channels are pushed harder (MorphNet's FLOP regularizer, with
PSP's alphas).
"""

import math

import keras
import numpy as np

from tf_psp import (
    attention,  # noqa: F401  (registers the attention and GetItem handlers)
    compat,
)
from tf_psp import graph as psp_graph
from tf_psp import layers as psp_layers
from tf_psp import regularizers as psp_regularizers
from tf_psp.functional import clone_layer, fresh_inputs

# The layer lives in tf_psp.group_alphas; re-exported for existing imports.
from tf_psp.group_alphas import (  # noqa: F401
    COSTS,
    GROUP_KWARGS,
    PSPGroupAlphas,
    _np,
    is_group_alphas,
)
from tf_psp.macs import mac_rule

# --- planning: which channels get an alpha, and who reads them -----------------


class GroupPlan:
    """The groups of a plain model and the layers that read them.

    Attributes:
        group_sizes / group_names: per group (channel space).
        readers: reading layer name -> index list (one entry per channel of
            its input: position among the concatenated alphas, or -1).
        costs: per group, per alpha, the MACs its channel costs: every read
            (a reader's MACs / its input channels) and every write (a
            producer's MACs / its output channels).
        frozen: the `tf_psp.graph.Blocker` texts that kept channels out.
        twins: layer name -> handler, for the layers whose inner channel space
            (attention heads) gets alphas of its own: they become the PSP twin
            the handler's `psp_twin` makes.
        twin_costs: layer name -> per alpha of its twin, the MACs it costs
            (attention: the layer's MACs / heads).
    """

    def __init__(self, group_sizes, group_names, readers, costs, frozen, twins=None,
                 twin_costs=None):
        self.group_sizes = group_sizes
        self.group_names = group_names
        self.readers = readers
        self.costs = costs
        self.frozen = frozen
        self.twins = twins or {}
        self.twin_costs = twin_costs or {}

    def _cost_mean(self):
        flat = [c for group in self.costs for c in group]
        flat += [c for costs in self.twin_costs.values() for c in costs]
        mean = float(np.mean(flat)) if flat else 0.0
        return mean if mean > 0 else 1.0

    def cost_weights(self):
        """Costs divided by their mean over all alphas (mean 1), per group."""
        mean = self._cost_mean()
        return [[c / mean for c in group] for group in self.costs]

    def twin_cost_weights(self):
        """Layer name -> its twin's alpha costs over the same mean as `cost_weights`."""
        mean = self._cost_mean()
        return {name: [c / mean for c in costs] for name, costs in self.twin_costs.items()}


def _node_macs(node):
    """MACs of one call of a kernel layer, from the graph's shapes.

    A None dimension besides the batch (a sequence of unknown length) counts as
    1 position: these MACs only weigh alphas against each other (`cost='macs'`),
    and budgets count MACs at a given `input_shape` elsewhere (`tf_psp.plan`).
    """
    def known(shape):
        return shape[:1] + tuple(1 if d is None else d for d in shape[1:])

    shapes_in = [known(tuple(t.shape)) for t in node.node.input_tensors]  # not inner spaces
    shapes_out = [known(tuple(t.shape)) for t in node.node.output_tensors]
    return float(mac_rule(node.layer)(node.layer, shapes_in, shapes_out))


def _read_write_costs(node):
    """(MACs per input channel read, MACs per output channel written)."""
    layer = node.layer
    cin = node.inputs[getattr(node.handler, "read_input", 0)].channels
    cout = node.outputs[0].channels
    if isinstance(node.handler, psp_graph.SeparableConvHandler):
        positions = math.prod(int(d) for d in node.outputs[0].tensor.shape[1:-1])
        dw = positions * math.prod(layer.depthwise_kernel.shape)
        pw = positions * math.prod(layer.pointwise_kernel.shape)
        return (dw + pw) / cin, pw / cout
    macs = _node_macs(node)
    if isinstance(node.handler, psp_graph.DepthwiseHandler):
        return macs / cin, 0.0
    return (macs / cin if cin else 0.0), macs / cout  # token ids (cin 0) are no channels


def plan_groups(model):
    """Finds the channel groups of a plain functional model and their readers.

    Returns:
        A `GroupPlan`.
    """
    graph = psp_graph.ChannelGraph(model)
    frozen_roots = {graph.group(s) for s in graph.frozen}
    live = [n for n in graph.nodes if graph.is_live(n)]
    producers = [n for n in live if n.handler.kind == "producer"]

    # Channel spaces: the units written by one producer, merged when producers share units.
    space_of = {}
    spaces_uf = psp_graph._UnionFind()  # union keeps the smallest id: the first producer
    order, names = [], {}
    for node in producers:
        if getattr(node.handler, "units_are_outputs", False):
            continue  # recurrent units: the layer's PSP twin holds their alphas
        roots = [graph.group(s) for s in node.outputs[0].slots()]
        spaces = {spaces_uf.find(space_of[r]) for r in roots if r in space_of}
        if spaces:
            target = min(spaces)
        else:
            target = spaces_uf.add(1)
            names[target] = node.name
        for s in spaces:
            spaces_uf.union(s, target)
        for r in roots:
            if r not in space_of:
                space_of[r] = target
                order.append(r)

    units = {}  # root -> (space, position in order)
    for r in order:
        if r not in frozen_roots:
            units[r] = spaces_uf.find(space_of[r])
    spaces = sorted({s for s in units.values()})
    members = {s: [r for r in order if units.get(r) == s] for s in spaces}
    offset, position = 0, {}
    for s in spaces:
        for k, r in enumerate(members[s]):
            position[r] = offset + k
        offset += len(members[s])

    costs = {r: 0.0 for r in position}
    readers = {}
    for node in live:
        handler = node.handler
        if handler.kind == "frozen" or not node.inputs or not node.outputs:
            continue
        is_depthwise = isinstance(handler, psp_graph.DepthwiseHandler)
        if handler.kind != "producer" and not is_depthwise:
            continue
        read, write = _read_write_costs(node)
        reads = node.inputs[getattr(handler, "read_input", 0)]  # an RNN: the sequence
        for s in reads.slots():
            r = graph.group(s)
            if r in costs:
                costs[r] += read
        for s in node.outputs[0].slots() if not is_depthwise else ():
            r = graph.group(s)
            if r in costs:
                costs[r] += write
        if handler.kind == "producer":
            index = [position.get(graph.group(s), -1) for s in reads.slots()]
            if any(i >= 0 for i in index):
                readers[node.name] = index

    frozen = sorted({str(b) for reasons in graph.frozen.values() for b in reasons})
    twins = {n.name: n.handler for n in live if hasattr(n.handler, "psp_twin")
             and any(graph.group(s) not in frozen_roots for s in n.inputs[0].slots())}
    twin_costs = {n.name: [_node_macs(n) / n.inputs[0].channels] * n.inputs[0].channels
                  for n in live if n.name in twins}
    return GroupPlan(
        group_sizes=[len(members[s]) for s in spaces],
        group_names=[names[s] for s in spaces],
        readers=readers,
        costs=[[costs[r] for r in members[s]] for s in spaces],
        frozen=frozen,
        twins=twins,
        twin_costs=twin_costs,
    )


# --- parameterize(coupling='group') -------------------------------------------


def parameterize_groups(model, epsilon, cost=None, cost_weights=None, **psp_kwargs):
    """Returns `(group PSP model, GroupPlan)`; see `tf_psp.parameterize`.

    `cost_weights` (per group, per alpha) replaces the weights `cost` gives.
    """
    psp = [layer.name for layer in compat.flatten_layers(model)
           if psp_layers.is_psp_layer(layer) or is_group_alphas(layer)]
    if psp:
        raise ValueError(
            f"parameterize(coupling='group') expects a plain model, but model "
            f"'{model.name}' has PSP layers {psp[:5]}; call tf_psp.strip(model) first."
        )
    if cost not in COSTS:
        raise ValueError(f"parameterize: cost must be one of {COSTS}, got {cost!r}.")
    psp_graph.check_channels_last(model, f"parameterize(model '{model.name}', coupling='group')")
    functional = psp_graph.inline_nested(model)  # nested models: flat, with the same weights
    plan = plan_groups(functional)
    if not plan.group_sizes and not plan.twins:
        raise ValueError(
            f"model '{model.name}' has no channel that PSP can prune: every "
            f"channel is frozen ({'; '.join(plan.frozen[:5])})."
        )
    taken = {layer.name for layer in compat.flatten_layers(model)}
    name, k = "psp_group_alphas", 0
    while name in taken:
        k += 1
        name = f"psp_group_alphas_{k}"
    gate = None if not plan.group_sizes else PSPGroupAlphas(
        plan.group_sizes,
        plan.group_names,
        epsilon=epsilon,
        costs=(cost_weights if cost_weights is not None
               else plan.cost_weights() if cost == "macs" else None),
        name=name,
        **psp_kwargs,
    )
    clones, originals = {}, {}
    twin_kwargs = {name: psp_kwargs for name in plan.twins}
    if cost == "macs" and cost_weights is None:
        twin_kwargs = {name: _weighted(psp_kwargs, weights)
                       for name, weights in plan.twin_cost_weights().items()}

    def clone_function(layer):
        if id(layer) not in clones:
            name = getattr(layer, "name", None)
            twin = plan.twins.get(name)
            new = (twin.psp_twin(layer, epsilon, twin_kwargs[name]) if twin is not None
                   else clone_layer(layer))  # a Lambda or a keras.ops call is reused
            clones[id(layer)] = new
            originals[id(new)] = layer
        return clones[id(layer)]

    def call_function(layer, *args, **kwargs):
        index = plan.readers.get(originals[id(layer)].name)
        if index is not None:
            args = (gate(args[0], index=index),) + tuple(args[1:])
        return layer(*args, **kwargs)

    new_model = keras.models.clone_model(
        functional, clone_function=clone_function, call_function=call_function,
        input_tensors=fresh_inputs(functional))
    for new in new_model.layers:
        old = originals.get(id(new))
        if old is not None and old is not new:
            set_weights = getattr(new, "set_plain_weights", new.set_weights)  # twins: no alpha
            set_weights(old.get_weights())
    return new_model, plan


def _weighted(psp_kwargs, weights):
    """`psp_kwargs` whose alpha regularizer is weighted per alpha (cost-aware decay)."""
    regularizer = psp_kwargs.get("alpha_regularizer", psp_layers._DEFAULT)
    if regularizer is psp_layers._DEFAULT:
        regularizer = psp_regularizers.default_alpha_regularizer()
    if regularizer is None:
        return psp_kwargs
    regularizer = psp_regularizers.with_weights(keras.regularizers.get(regularizer), weights)
    return dict(psp_kwargs, alpha_regularizer=regularizer)


# --- strip: fold the shared alphas into the readers -----------------------------


def reader_calls(model):
    """Reading layer name -> (its PSPGroupAlphas layer, index) for every gate call."""
    calls = {}
    for layer in compat.flatten_layers(model):
        for node in compat.inbound_nodes(layer):
            for x in node.input_tensors:
                gate, node_index, _ = compat.keras_history(x)
                if is_group_alphas(gate):
                    index = compat.inbound_nodes(gate)[node_index].arguments.kwargs["index"]
                    calls[layer.name] = (gate, index)
    return calls


def reader_scales(model):
    """Reading layer name -> numpy thresholded scale per input channel."""
    return {name: gate.scales(index) for name, (gate, index) in reader_calls(model).items()}


def reader_alpha(gate, index):
    """|alpha| per input channel of one reader (inf for frozen channels)."""
    table = np.concatenate([np.abs(gate.alphas()), [np.inf]])
    return table[gate._positions(index)]


class ReaderView:
    """A reader seen as a PSP layer with the `channel` structure (for shrink's report)."""

    structure = "channel"
    _alpha_depthwise = False

    def __init__(self, gate, index):
        self.gate, self.index = gate, index

    def structure_mask(self):
        return self.gate.scales(self.index) != 0


def fold_input_scale(weights, scale, transposed=False):
    """Reader `weights` with input channel `c` scaled by `scale[c]`.

    The first weight of every reader is indexed `[..., in, out]` (Conv, Dense,
    DepthwiseConv `[.., in, multiplier]`, SeparableConv's depthwise kernel),
    so one broadcast covers them all; `transposed`: `[..., out, in]`
    (Conv*DTranspose).
    """
    weights = [np.array(w) for w in weights]
    shape = (-1,) if transposed else (-1, 1)
    weights[0] = weights[0] * scale.reshape(shape).astype(weights[0].dtype)
    return weights


TRANSPOSED = (keras.layers.Conv1DTranspose, keras.layers.Conv2DTranspose,
              keras.layers.Conv3DTranspose)
