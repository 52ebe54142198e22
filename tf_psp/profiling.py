"""profile(): MACs, parameters and PSP sparsity per layer, counted from the Keras graph.

Costs are counted analytically from the shapes recorded in a functional or
Sequential model's graph (batch dimension excluded), so nothing is run.
MAC rules live in `tf_psp.macs`; `tf_psp.register_layer` adds one for a new
layer type.

Conventions: a MAC is one multiply-accumulate of a weight; biases,
activations, gate products and per-channel scales (BatchNormalization,
PReLU) count 0, an Embedding lookup counts 0. Convolutions count each kernel
entry once per output position (transposed ones: per input position),
SimpleRNN/LSTM/GRU each kernel and recurrent-kernel entry once per time step,
MultiHeadAttention its four projections plus heads * Tq * Tv * (key_dim +
value_dim) for the scores and the weighted sum. A layer with weights and no
rule is *not counted*: `LayerProfile.counted` is False and the table says so.

For PSP layers the profile also counts the structures whose `|alpha|` is below
`epsilon` and the MACs and parameters they zero, i.e. what this layer would
lose if those structures were physically removed. The count is local to the
layer: removing a layer's output channels also spares work in the layers that
consume them, which is not counted here (so `mac_reduction` is conservative).
The `PSPGroupAlphas` layer of a `coupling='group'` model is reported the same
way: its structures are the group alphas, its pruned MACs those its dead
alphas zero in the layers reading them.

`removability(model)` (or `profile(model, removable=True)`) measures instead
what `strip_and_shrink` removes, and how much of the zeroed MACs would stay as
zeros in the shrunk model, for per-layer and group alphas alike.
"""

import dataclasses
import inspect
import math

import keras
import numpy as np

from tf_psp import compat, coupling, structures
from tf_psp import layers as psp_layers
from tf_psp import macs as mac_rules
from tf_psp.macs import _size, _variable_size, mac_rule, spatial
from tf_psp.shrink import strip, strip_and_shrink


def _positions(layer, output_shapes):
    """Output positions of one call (for the separable pruning count)."""
    return _size(spatial(layer, output_shapes[0]))


# --- pruned cost of PSP layers ------------------------------------------------


def _pruned_costs(layer, positions, mask):
    """MACs and parameters zeroed by the dead structures of a PSP layer.

    Args:
        layer: a built PSP layer.
        positions: output positions summed over the layer's calls (MACs per
            kernel entry).
        mask: `layer.structure_mask()`, True where a structure is alive.

    Returns:
        `(pruned_macs, pruned_params)`, integers.
    """
    if isinstance(layer, keras.layers.SeparableConv2D):
        return _separable_pruned_costs(layer, positions, mask)
    if isinstance(layer, keras.layers.MultiHeadAttention):  # `positions`: its MACs
        return _heads_pruned_costs(layer, positions, mask)
    if isinstance(layer, keras.layers.RNN):  # `positions`: its MACs
        return _units_pruned_costs(layer, positions, mask)
    total, dead = mask.size, int(mask.size - np.count_nonzero(mask))
    kernel = _variable_size(layer.kernel)
    # Every structure covers the same number of kernel entries (and biases).
    pruned_kernel = kernel * dead // total
    pruned_params = pruned_kernel
    if getattr(layer, "bias", None) is not None and structures.scales_bias(layer.structure):
        pruned_params += _variable_size(layer.bias) * dead // total
    return positions * pruned_kernel, pruned_params


def _heads_pruned_costs(layer, macs, mask):
    """MACs and parameters of the dead heads of a PSP MultiHeadAttention.

    Every MAC of the layer (projections, scores, weighted sums) belongs to one
    head, and so does every parameter but the output bias.
    """
    heads, dead = mask.size, int(mask.size - np.count_nonzero(mask))
    output_bias = getattr(compat.attention_projections(layer)[3], "bias", None)
    per_head = layer.count_params() - mask.size - (
        _variable_size(output_bias) if output_bias is not None else 0)
    return macs * dead // heads, per_head * dead // heads


def _units_pruned_costs(layer, macs, mask):
    """MACs and parameters of the dead units of a PSP SimpleRNN/LSTM/GRU.

    A dead unit takes its columns of every gate block (kernel and recurrent
    kernel, bias) and its recurrent-kernel row: with `in` inputs and `u` units
    of which `k` live, the kernels keep `(in + k) * k / ((in + u) * u)`.
    """
    units, kept = mask.size, int(np.count_nonzero(mask))
    inputs = int(layer.cell.kernel.shape[0])
    kept_share = (inputs + kept) * kept / ((inputs + units) * units)
    weights = layer.count_params() - units
    bias = _variable_size(layer.cell.bias) if layer.cell.use_bias else 0
    pruned_params = (weights - bias) * (1 - kept_share) + bias * (units - kept) / units
    return int(round(macs * (1 - kept_share))), int(round(pruned_params))


def _group_pruned_costs(readers, mask):
    """MACs and kernel entries the dead group alphas zero in their readers."""
    table = np.concatenate([mask, [True]])  # index -1: a frozen channel, alive
    macs = params = 0
    for reader_macs, size, index in readers:
        positions = np.where(np.asarray(index) < 0, len(mask), np.asarray(index))
        dead = float(np.mean(~table[positions])) if len(positions) else 0.0
        macs += reader_macs * dead
        params += size * dead
    return int(round(macs)), int(round(params))


def _separable_pruned_costs(layer, positions, mask):
    """`_pruned_costs` for separable convs: depthwise and pointwise parts apart."""
    kh, kw, cin, m = (int(d) for d in layer.depthwise_kernel.shape)
    filters = int(layer.pointwise_kernel.shape[-1])
    bias = _variable_size(layer.bias) if layer.bias is not None else 0
    depthwise, pointwise, pruned_bias = 0, 0, 0
    if layer.structure == "channel":  # mask (cin,)
        dead_channels = cin - np.count_nonzero(mask)
        depthwise = dead_channels * kh * kw * m
    elif layer.structure == "column":  # mask (kh, kw, cin)
        depthwise = (mask.size - np.count_nonzero(mask)) * m
        dead_channels = cin - np.count_nonzero(mask.any(axis=(0, 1)))
    if layer.structure in ("channel", "column"):
        # A dead depthwise channel feeds its m rows of the pointwise kernel with zeros.
        pointwise = dead_channels * m * filters
    else:  # 'filter' (mask (filters,)) or 'layer' (scalar): pointwise side and bias
        dead = mask.size - np.count_nonzero(mask)
        pointwise = dead * cin * m * filters // mask.size
        pruned_bias = bias * dead // mask.size
        if dead == mask.size:  # nothing left to consume the depthwise output
            depthwise = kh * kw * cin * m
    return positions * int(depthwise + pointwise), int(depthwise + pointwise + pruned_bias)


# --- the profile --------------------------------------------------------------


@dataclasses.dataclass
class LayerProfile:
    """Cost of one layer (summed over its calls), and its PSP sparsity.

    Attributes:
        name: the layer's path, `'submodel/layer'` inside nested models.
        class_name: the layer's class name.
        output_shape: output shape of the layer's first call, batch dimension
            excluded (a list of shapes for several outputs).
        params: parameters of the layer (`layer.count_params()`).
        macs: multiply-accumulates of all its calls for one sample.
        calls: how often the layer is called in the model.
        structure: PSP structure, None for plain layers.
        structures_total: number of PSP structures (alpha entries), None for
            plain layers.
        structures_alive: structures with `|alpha| >= epsilon`.
        pruned_macs: MACs of the dead structures.
        pruned_params: kernel (and owned bias) entries of the dead structures.
        counted: False for a layer with weights and no MAC rule: its `macs`
            (0) are unknown, not zero.
    """

    name: str
    class_name: str
    output_shape: object
    params: int
    macs: int
    calls: int = 1
    structure: str = None
    structures_total: int = None
    structures_alive: int = None
    pruned_macs: int = 0
    pruned_params: int = 0
    counted: bool = True

    @property
    def is_psp(self):
        """True for PSP layers."""
        return self.structure is not None

    @property
    def structures_pruned(self):
        """Number of dead structures (None for plain layers)."""
        if not self.is_psp:
            return None
        return self.structures_total - self.structures_alive

    def to_dict(self):
        """The fields as a JSON-serializable dict."""
        data = dataclasses.asdict(self)
        data["structures_pruned"] = self.structures_pruned
        return data


class ModelProfile:
    """Per-layer costs of a model and the PSP sparsity they carry.

    Built by `profile(model)`. The MAC counts are static; `refresh()` re-reads
    the PSP layers' alphas and updates the pruned counts cheaply (and, with
    `profile(model, removable=True)`, measures `removability` again, which
    runs `strip_and_shrink`).

    Attributes:
        name: the model's name.
        layers: list of `LayerProfile`, in graph order.
        removability: a `Removability` (with `removable=True`), else None.
    """

    def __init__(self, name, layers, psp_entries, kernel_rows=(), model=None, input_shape=None):
        self.name = name
        self.layers = layers
        # (LayerProfile, PSP layer, output positions over all calls); for the
        # group alphas: (row, layer, [(reader MACs, reader kernel size, index)])
        self._psp_entries = psp_entries
        self._kernel_rows = list(kernel_rows)  # (LayerProfile, layer) with a MAC rule
        self._model = model  # kept only to measure removability
        self._input_shape = input_shape
        self.removability = None
        self.refresh()

    def refresh(self):
        """Re-reads every PSP layer's alpha mask; returns `self`."""
        _check_finite(self._psp_entries)
        for row, layer, positions in self._psp_entries:
            mask = np.asarray(layer.structure_mask(), dtype=bool)
            row.structures_total = int(mask.size)
            row.structures_alive = int(np.count_nonzero(mask))
            costs = (_group_pruned_costs(positions, mask) if coupling.is_group_alphas(layer)
                     else _pruned_costs(layer, positions, mask))
            row.pruned_macs, row.pruned_params = (int(v) for v in costs)
        if self._model is not None:
            self.removability = removability(self._model, self._input_shape)
        return self

    # --- totals -------------------------------------------------------------
    @property
    def total_macs(self):
        """MACs of the model for one sample."""
        return sum(row.macs for row in self.layers)

    @property
    def total_params(self):
        """Parameters of the model (equals `model.count_params()`)."""
        return sum(row.params for row in self.layers)

    @property
    def uncounted(self):
        """Names of the layers with weights whose MACs no rule counts (not in `total_macs`)."""
        return [row.name for row in self.layers if not row.counted]

    @property
    def pruned_macs(self):
        """MACs zeroed by the dead PSP structures."""
        return sum(row.pruned_macs for row in self.layers)

    @property
    def pruned_params(self):
        """Parameters zeroed by the dead PSP structures."""
        return sum(row.pruned_params for row in self.layers)

    @property
    def structures_total(self):
        """Number of PSP structures over all PSP layers."""
        return sum(row.structures_total for row in self.layers if row.is_psp)

    @property
    def structures_pruned(self):
        """Number of dead PSP structures over all PSP layers."""
        return sum(row.structures_pruned for row in self.layers if row.is_psp)

    @property
    def sparsity(self):
        """Fraction of PSP structures that are dead (0.0 without PSP layers)."""
        total = self.structures_total
        return self.structures_pruned / total if total else 0.0

    @property
    def mac_reduction(self):
        """MAC reduction counting only the MACs the pruned structures zero, `>= 1`.

        `total_macs / (total_macs - pruned_macs)`; 1.0 for a model without
        MACs, `inf` when every MAC is pruned. This is a per-layer count, not
        what `strip_and_shrink` delivers: the shrink also spares the readers
        of removed filters (more), and keeps zeroed channels it cannot remove
        exactly (less). `profile(model, removable=True).removability`
        measures the real figure; `tf_psp.pruning_plan(model).kept_fraction()`
        predicts it without shrinking.
        """
        return _ratio(self.total_macs, self.pruned_macs)

    @property
    def param_reduction(self):
        """`total_params / (total_params - pruned_params)`, `>= 1`."""
        return _ratio(self.total_params, self.pruned_params)

    # --- reports ------------------------------------------------------------
    def to_dict(self):
        """The profile as a JSON-serializable dict (layers and totals)."""
        return {
            "name": self.name,
            "layers": [row.to_dict() for row in self.layers],
            "total_macs": self.total_macs,
            "uncounted": self.uncounted,
            "total_params": self.total_params,
            "pruned_macs": self.pruned_macs,
            "pruned_params": self.pruned_params,
            "structures_total": self.structures_total,
            "structures_pruned": self.structures_pruned,
            "sparsity": self.sparsity,
            "mac_reduction": _json_float(self.mac_reduction),
            "param_reduction": _json_float(self.param_reduction),
            "removability": None if self.removability is None else self.removability.to_dict(),
        }

    def summary(self, print_fn=print):
        """Prints the table of `str(self)` with `print_fn`."""
        print_fn(str(self))

    def __str__(self):
        header = (
            "Layer (type)",
            "Output shape",
            "Params",
            "MACs",
            "Alive/total",
            "Pruned MACs %",
        )
        rows = [header]
        for row in self.layers:
            rows.append(
                (
                    f"{row.name} ({row.class_name})",
                    _format_shape(row.output_shape),
                    f"{row.params:,}",
                    f"{row.macs:,}" if row.counted else "not counted",
                    f"{row.structures_alive}/{row.structures_total}" if row.is_psp else "",
                    _percent(row.pruned_macs, row.macs or self.total_macs) if row.is_psp else "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

        def line(cells):
            first = cells[0].ljust(widths[0])
            rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join([first] + rest).rstrip()

        rule = "-" * len(line(header))
        out = [f'Profile of model "{self.name}"', rule, line(header), rule]
        out += [line(r) for r in rows[1:]]
        out.append(rule)
        out.append(f"Total params: {self.total_params:,}")
        out.append(f"Total MACs: {self.total_macs:,}")
        if self.uncounted:
            out.append(
                f"MACs not counted (weights but no rule in tf_psp.profile.MAC_RULES): "
                f"{', '.join(self.uncounted)}"
            )
        if self.structures_total:
            out.append(
                f"PSP structures pruned: {self.structures_pruned:,}/"
                f"{self.structures_total:,} (sparsity {self.sparsity:.1%})"
            )
            out.append(
                f"Pruned MACs: {self.pruned_macs:,} "
                f"({_percent(self.pruned_macs, self.total_macs)}%), "
                f"expected MAC reduction {self.mac_reduction:.2f}x (zeroed MACs only, per "
                f"layer: not what strip_and_shrink delivers, which can be more or less"
                + (")" if self.removability is not None
                   else "; profile(model, removable=True) measures that)")
            )
            out.append(
                f"Pruned params: {self.pruned_params:,} "
                f"({_percent(self.pruned_params, self.total_params)}%)"
            )
        r = self.removability
        if r is not None:
            out.append(
                f"strip_and_shrink removes {r.removable_macs:,} MACs ({r.mac_reduction:.2f}x "
                f"fewer); {r.removable_share:.1%} of the {r.zeroed_macs:,} zeroed MACs are "
                f"removed, {r.kept_zero_macs:,} stay as zeros"
            )
        return "\n".join(out)

    def __repr__(self):
        return (
            f"<ModelProfile '{self.name}': {len(self.layers)} layers, "
            f"{self.total_macs:,} MACs, {self.total_params:,} params, "
            f"sparsity {self.sparsity:.3f}>"
        )


def _check_finite(psp_entries):
    """Raises a ValueError naming the PSP layers with NaN or infinite alphas.

    `|nan| < epsilon` is False, so a NaN alpha would count as pruned.
    """
    bad = []
    for row, layer, _ in psp_entries:
        values = layer.alphas() if coupling.is_group_alphas(layer) else np.asarray(
            keras.ops.convert_to_numpy(layer.alpha.value))
        if not np.all(np.isfinite(values)):
            bad.append(row.name)
    if bad:
        raise ValueError(
            f"profile: PSP layers {bad} have NaN or infinite alphas (training diverged), "
            "so their pruned structures cannot be counted. Lower the learning rate or "
            "the alpha decay and train again."
        )


def _ratio(total, pruned):
    if total == 0:
        return 1.0
    if pruned >= total:
        return math.inf
    return total / (total - pruned)


def _json_float(value):
    return value if math.isfinite(value) else None


def _percent(part, whole):
    return f"{100.0 * part / whole:.1f}" if whole else "0.0"


def _format_shape(shape):
    if isinstance(shape, list):
        return ", ".join(_format_shape(s) for s in shape)
    return str((None,) + tuple(shape))


# --- graph walk ---------------------------------------------------------------


_graph_of = compat.graph_of
_nodes_in_order = compat.nodes_in_order


def _shapes(tensors):
    return [tuple(t.shape) for t in tensors]


def _node_shapes(graph, input_shapes=None):
    """Yields `(node, input shapes, output shapes)` in graph order (batched shapes).

    Without `input_shapes` the shapes recorded in the graph are used; with
    them (one per model input, no batch dimension) shapes are propagated anew
    with each layer's `compute_output_spec`, which defines dimensions the
    graph left as None.
    """
    if input_shapes is None:
        for node in _nodes_in_order(graph):
            yield node, _shapes(node.input_tensors), _shapes(node.output_tensors)
        return
    if len(input_shapes) != len(compat.flat_inputs(graph)):
        raise ValueError(
            f"model '{graph.name}' has {len(compat.flat_inputs(graph))} inputs but "
            f"{len(input_shapes)} input shapes were given."
        )
    specs = {
        id(t): keras.KerasTensor((None,) + tuple(shape), dtype=t.dtype)
        for t, shape in zip(compat.flat_inputs(graph), input_shapes)
    }
    for node in _nodes_in_order(graph):
        if node.is_input or any(id(t) not in specs for t in node.input_tensors):
            continue
        args, kwargs = node.arguments.fill_in(specs)
        outputs = keras.tree.flatten(_output_spec(node.operation, args, kwargs))
        for tensor, spec in zip(node.outputs, outputs):
            specs[id(tensor)] = spec
        inputs = [specs[id(t)] for t in node.input_tensors]
        yield node, _shapes(inputs), _shapes(outputs)


def _output_spec(operation, args, kwargs):
    """`operation.compute_output_spec` of one call; `training`, `mask` and None keywords
    it does not take are left out, as `Layer.__call__` leaves them out of `call`
    (keras-hub's `Identity.compute_output_spec(inputs)` takes no `training`)."""
    parameters = inspect.signature(operation.compute_output_spec).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
        kwargs = {k: v for k, v in kwargs.items()
                  if k in parameters or (v is not None and k not in ("training", "mask"))}
    spec = operation.compute_output_spec(*args, **kwargs)
    if isinstance(operation, keras.layers.EinsumDense) and isinstance(spec, keras.KerasTensor):
        spec = _einsum_known_dims(operation.equation, args[0].shape, spec)
    return spec


def _einsum_known_dims(equation, input_shape, spec):
    """`spec` with the None dimensions an einsum copies from its input filled in: an
    EinsumDense built with `output_shape=(None, heads, dim)` (keras-hub's attention
    projections) says None for the sequence length even when its input has one."""
    inputs, output = equation.split("->")
    inputs = inputs.split(",")[0]
    if "." in inputs + output or len(output) != len(spec.shape) or len(inputs) != len(
            input_shape):
        return spec
    shape = [d if d is not None or k == 0 or letter not in inputs
             else input_shape[inputs.index(letter)]
             for k, (letter, d) in enumerate(zip(output, spec.shape))]
    return keras.KerasTensor(tuple(shape), dtype=spec.dtype)


def unknown_inputs(model):
    """`'name' (shape)` of each input of `model` with an unknown (None) dimension
    besides the batch, e.g. a token input `(None, None)`."""
    return [f"'{t.name}' {tuple(t.shape)}" for t in compat.flat_inputs(model)
            if any(d is None for d in tuple(t.shape)[1:])]


def unknown_dimension_error(model, where):
    """The ValueError for a count that needs a dimension `model` leaves as None:
    names the model inputs with None dimensions and how to give their shapes."""
    inputs = unknown_inputs(model)
    named = (f"; model '{model.name}' has inputs with unknown dimensions: {', '.join(inputs)}"
             if inputs else "")
    example = ", ".join(["(16,)"] * len(inputs))
    example = (f" (e.g. input_shape={f'[{example}]' if len(inputs) > 1 else example} for "
               "token sequences of 16)" if inputs else "")
    return ValueError(
        f"{where} has an unknown dimension, so its MACs cannot be counted{named}. Pass "
        f"input_shape=... (profile, prune_to_budget, PruneToBudget and tf_psp.prune take "
        f"it) with one fully defined shape per input, batch dimension excluded{example}."
    )


def node_shapes(model, input_shape=None):
    """`{id(node): (input shapes, output shapes)}` (batched) of the nodes of `model`'s
    own graph (nested models not entered) for inputs of `input_shape` (as for
    `profile`); None without `input_shape` (use the shapes the graph recorded)."""
    input_shapes = _input_shapes(input_shape)
    if input_shapes is None:
        return None
    return {id(node): (shapes_in, shapes_out)
            for node, shapes_in, shapes_out in _node_shapes(_graph_of(model), input_shapes)}


def _check_static(layer, path, shapes, rule_name, model=None):
    for shape in shapes:
        if any(d is None for d in shape[1:]):
            where = f"layer '{path}': {rule_name} shape {shape}"
            if model is None:
                raise ValueError(
                    f"{where} has an unknown dimension, so its MACs cannot be counted. "
                    f"Pass profile(model, input_shape=...) with a fully defined shape.")
            raise unknown_dimension_error(model, where)


def _gate_of(node):
    """(PSPGroupAlphas layer, index) when `node` reads a group-alpha output."""
    for x in node.input_tensors:
        gate, node_index, _ = compat.keras_history(x)
        if coupling.is_group_alphas(gate):
            return gate, compat.inbound_nodes(gate)[node_index].arguments.kwargs["index"]
    return None, None


def _kernel_entries(layer):
    kernels = [getattr(layer, name) for name in ("depthwise_kernel", "pointwise_kernel")
               if getattr(layer, name, None) is not None]
    cell = getattr(layer, "cell", None)
    if not kernels and getattr(layer, "kernel", None) is None and cell is not None:
        return [cell.kernel]  # an RNN reads its input through its cell's kernel
    return kernels or [layer.kernel]


def _count_op_node(node, prefix, in_shapes, out_shapes, rows):
    """Appends a row for a keras.ops node that multiplies activations (an inlined
    attention's scores and weighted sums: `tf_psp.macs.op_node_macs`); others cost 0."""
    if not mac_rules.multiplies_activations(node.operation):
        return
    symbolic = iter(in_shapes)
    operands = [(1,) + tuple(next(symbolic))[1:] if isinstance(x, keras.KerasTensor)
                else tuple(np.shape(x)) for x in node.arguments.args]
    out = (1,) + tuple(out_shapes[0])[1:] if out_shapes else ()
    macs = mac_rules.op_node_macs(node.operation, operands, out)
    if macs == 0:
        return
    name = getattr(node.operation, "name", None) or type(node.operation).__name__
    row = LayerProfile(name=f"{prefix}{name}", class_name=type(node.operation).__name__,
                       output_shape=tuple(out_shapes[0])[1:], params=0, macs=int(macs or 0),
                       calls=1)
    row.counted = macs is not None
    rows.append(row)


def _walk(model, prefix, rows, psp_entries, index, input_shapes=None, kernel_rows=None):
    """Appends rows for `model`'s layers; nested models are walked recursively.

    `input_shapes` (unbatched, one per input) overrides the recorded shapes.

    `index` maps each layer seen so far to its row, so that a shared layer
    (or a nested model called twice) adds calls and MACs to one row.
    """
    graph = _graph_of(model)
    for node, in_shapes, out_shapes in _node_shapes(graph, input_shapes):
        layer = node.operation
        if not isinstance(layer, keras.layers.Layer):
            _count_op_node(node, prefix, in_shapes, out_shapes, rows)
            continue
        if isinstance(layer, keras.layers.InputLayer):
            continue
        path = f"{prefix}{layer.name}"
        if _graph_of(layer) is not None:  # a nested model: count its layers
            inner = None if input_shapes is None else [s[1:] for s in in_shapes]
            _walk(layer, f"{path}/", rows, psp_entries, index, inner, kernel_rows)
            continue
        rule = mac_rule(layer)
        macs, positions, counted = 0, 0, not layer.weights
        if rule is mac_rules.no_macs or coupling.is_group_alphas(layer):
            counted = True  # a per-channel scale counts 0 MACs (group alphas: folded away)
        elif rule is not None:
            _check_static(layer, path, in_shapes, "input", model)
            _check_static(layer, path, out_shapes, "output", model)
            macs = mac_rules.call_macs(rule, layer, in_shapes, out_shapes, node.arguments)
            counted = macs is not None
            macs = int(macs or 0)
            # a transposed conv uses each kernel entry once per *input* position
            transposed = rule is mac_rules.conv_transpose_macs
            positions = _positions(layer, in_shapes if transposed else out_shapes)
            if isinstance(layer, (keras.layers.MultiHeadAttention, keras.layers.RNN)):
                positions = macs  # its pruned cost is a share of its MACs
            gate, gate_index = _gate_of(node)
            if gate is not None:
                size = sum(_variable_size(k) for k in _kernel_entries(layer))
                for entry in psp_entries:
                    if entry[1] is gate:
                        entry[2].append((macs, size, gate_index))
        if layer in index:
            row = index[layer]
            row.macs += macs
            row.counted = row.counted and counted
            row.calls += 1
            for entry in psp_entries:
                if entry[1] is layer and not coupling.is_group_alphas(layer):
                    entry[2] += positions
            continue
        shape = [s[1:] for s in out_shapes]
        row = LayerProfile(
            name=path,
            class_name=type(layer).__name__,
            output_shape=shape[0] if len(shape) == 1 else shape,
            params=int(layer.count_params()),
            macs=macs,
            calls=1,
        )
        if psp_layers.is_psp_layer(layer):
            row.structure = layer.structure
            psp_entries.append([row, layer, positions])
        elif coupling.is_group_alphas(layer):
            row.structure = layer.structure
            psp_entries.append([row, layer, []])
        row.counted = counted
        if rule in mac_rules.KERNEL_RULES and kernel_rows is not None:
            kernel_rows.append((row, layer, None))
        elif rule is mac_rules.attention_macs and kernel_rows is not None:
            kernel_rows.append((row, layer, mac_rules.attention_kernel_uses(
                layer, in_shapes, out_shapes)))
        index[layer] = row
        rows.append(row)


def _input_shapes(input_shape):
    """None, one shape or a list of shapes -> None or a list of tuples."""
    if input_shape is None:
        return None
    input_shape = list(input_shape)
    if all(d is None or isinstance(d, (int, np.integer)) for d in input_shape):
        return [tuple(input_shape)]
    return [tuple(shape) for shape in input_shape]


def profile(model: keras.Model, input_shape=None, removable: bool = False) -> "ModelProfile":
    """Counts MACs, parameters and PSP sparsity of every layer of `model`.

    Args:
        model: a built functional or Sequential Keras model; nested models are
            walked and their layers reported as `'submodel/layer'`.
        input_shape: shape of one sample, no batch dimension (a list of shapes
            for several inputs). Counts the model as if fed inputs of this
            shape, which defines dimensions the model leaves as None; a
            Sequential model created without a `keras.Input` is built with it
            (in place). None: use the shapes recorded in the model.
        removable: also measure what `strip_and_shrink` removes now and how
            much of the pruned MACs stay as zeros (`ModelProfile.removability`;
            costs a shrink per `refresh()`).

    Returns:
        A `ModelProfile`.

    Raises:
        ValueError: `model` is not a Keras model, is not built, has no graph
            (subclassed models), has unknown spatial dimensions, or a PSP
            layer has NaN or infinite alphas (named).
    """
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"profile() expects a keras.Model, got {type(model).__name__}. "
            f"Wrap layers in a keras.Sequential or functional model first."
        )
    if (
        isinstance(model, keras.Sequential)
        and _graph_of(model) is None
        and input_shape is not None
    ):
        model.build((None,) + tuple(input_shape))
    if _graph_of(model) is None:
        if isinstance(model, keras.Sequential):
            raise ValueError(
                f"model '{model.name}' is not built: it has no defined inputs. "
                f"Start it with keras.Input(shape=...) or pass "
                f"profile(model, input_shape=...)."
            )
        raise ValueError(
            f"model '{model.name}' ({type(model).__name__}) has no functional "
            f"graph to profile: subclassed models are not supported. Use a "
            f"functional or Sequential model."
        )
    rows, psp_entries, kernel_rows = [], [], []
    _walk(model, "", rows, psp_entries, {}, _input_shapes(input_shape), kernel_rows)
    return ModelProfile(
        model.name, rows, psp_entries, kernel_rows,
        model=model if removable else None, input_shape=input_shape,
    )


def zeroed_macs(model: keras.Model, input_shape=None) -> int:
    """MACs of a *plain* model that multiply by an exact zero weight.

    Each kernel entry is used the same number of times per sample, so a
    layer's zeroed MACs are its MACs times its fraction of zero kernel
    entries (Conv, Dense, DepthwiseConv, SeparableConv, ConvTranspose);
    MultiHeadAttention: zero entries of each projection times the positions
    it projects (a pruned head's output-kernel rows).
    """
    p = profile(model, input_shape)
    total = 0
    for row, layer, uses in p._kernel_rows:
        if uses is not None:
            total += sum(positions * int(np.sum(keras.ops.convert_to_numpy(kernel) == 0))
                         for kernel, positions in uses)
            continue
        kernels = [np.asarray(keras.ops.convert_to_numpy(k)) for k in _kernel_entries(layer)]
        entries = sum(k.size for k in kernels)
        if entries and row.macs:
            total += row.macs * sum(int(np.sum(k == 0)) for k in kernels) / entries
    return int(round(total))


@dataclasses.dataclass
class Removability:
    """How much of the pruned sparsity `strip_and_shrink` can physically remove.

    Attributes:
        total_macs: MACs of the model.
        zeroed_macs: MACs that multiply by a zero weight once the alphas are
            folded in (`tf_psp.strip`): what the pruned structures zero.
        removable_macs: MACs `strip_and_shrink` removes (`total_macs` minus
            the shrunk model's MACs). It also counts filters that nobody reads
            any more, so it can exceed `zeroed_macs`.
        kept_zero_macs: zeroed MACs still in the shrunk model: sparsity that
            is only zeroed (e.g. a channel one reader prunes and another uses).
    """

    total_macs: int
    zeroed_macs: int
    removable_macs: int
    kept_zero_macs: int

    @property
    def removable_share(self):
        """Fraction of the zeroed MACs that shrink removes (1.0 when none are zeroed)."""
        if not self.zeroed_macs:
            return 1.0
        return 1.0 - self.kept_zero_macs / self.zeroed_macs

    @property
    def mac_reduction(self):
        """`total_macs / shrunk MACs`: the MAC reduction `strip_and_shrink` gives."""
        return _ratio(self.total_macs, self.removable_macs)

    def to_dict(self):
        data = dataclasses.asdict(self)
        data["removable_share"] = self.removable_share
        data["mac_reduction"] = _json_float(self.mac_reduction)
        return data


def removability(model: keras.Model, input_shape=None, round_to: int = 1) -> "Removability":
    """Measures `Removability` of a PSP model by stripping and shrinking it.

    Args:
        model: a PSP model (per-layer or group alphas), or a plain one.
        input_shape: as for `profile`.
        round_to: passed to `strip_and_shrink`.
    """
    plain = strip(model)
    shrunk = strip_and_shrink(model, round_to=round_to)
    total = profile(plain, input_shape).total_macs
    return Removability(
        total_macs=total,
        zeroed_macs=zeroed_macs(plain, input_shape),
        removable_macs=total - profile(shrunk, input_shape).total_macs,
        kept_zero_macs=zeroed_macs(shrunk, input_shape),
    )
