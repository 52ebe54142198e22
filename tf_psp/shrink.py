"""Turn a trained PSP model into a smaller plain Keras model.

`strip(model)` replaces every PSP layer by its plain Keras twin holding the
folded weights (same widths). `strip_and_shrink(model)` then removes the
channels whose value no longer matters, using `tf_psp.graph.ChannelGraph`:

- a channel is removed when every layer reading it ignores it (zero kernel
  rows), or when it is a known constant every reader can fold into its bias
  exactly (Dense, 'valid' or 1x1 convs; a constant 0 needs no folding);
- an Add, Subtract or Average input that is constant on every channel (a
  residual branch pruned with the 'layer' structure) is removed with the
  layers feeding only it; the merge adds the constant (`Rescaling` offset);
- channels touched by layers the graph does not understand, model inputs and
  model outputs are kept, and the report says which layer kept them.

Nested functional and Sequential models (a backbone used as a layer) and
composite layers (a layer whose `call` runs its own sublayers) are inlined
first (`tf_psp.inline.inline_nested`), so channels are removed across the
nesting; an opaque node would freeze every channel it touches. The shrunk
model is therefore flat, its layers keeping their names (a composite's
sublayers prefixed with its name).

The result computes exactly what the PSP model computes in inference mode
(up to float32 round-off), unless `approximate=True` trades exactness at the
borders of padded convolutions for size and reports the measured deviation.
"""

import warnings

import keras
import numpy as np

from tf_psp import compat, coupling, nchw
from tf_psp import graph as psp_graph
from tf_psp.functional import (
    check_model,
    clone_layer,
    functional_view,
    input_name,
    layers_by_name,
    probe_inputs,
    relative_error,
)
from tf_psp.layers import is_psp_layer

# --- strip --------------------------------------------------------------------


def _clone_layer(layer):
    if is_psp_layer(layer):
        return layer.plain_class.from_config(layer.plain_config())
    return clone_layer(layer)


def strip(model: keras.Model) -> keras.Model:
    """A new plain Keras model with every PSP layer replaced by its plain twin.

    Widths are unchanged; pruned structures stay as exact zeros in the folded
    weights. The input model is not modified.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        A new Keras model of the same kind, without tf_psp layers.

    Raises:
        ValueError: `model` is not a built Sequential/functional model, or a
            PSP layer has NaN or infinite alphas (the layers are named).
    """
    check_model(model)
    _check_finite_alphas(model)
    pairs = []
    scales = coupling.reader_scales(model)

    def clone_function(layer):
        if coupling.is_group_alphas(layer):
            return layer  # dropped by call_function: its alphas fold into the readers
        new = _clone_layer(layer)
        if new is not layer:
            pairs.append((layer, new))
        return new

    def call_function(layer, *args, **kwargs):
        if coupling.is_group_alphas(layer):
            return args[0]
        return layer(*args, **kwargs)

    clone = keras.models.clone_model(
        model, clone_function=clone_function, recursive=True,
        call_function=call_function if scales else None,
    )
    for old, new in pairs:
        weights = old.folded_weights() if is_psp_layer(old) else old.get_weights()
        if old.name in scales:
            weights = coupling.fold_input_scale(
                weights, scales[old.name], transposed=isinstance(old, coupling.TRANSPOSED))
        new.set_weights(weights)
    return clone


def _check_finite_alphas(model):
    bad = []
    for layer in compat.flatten_layers(model):
        if is_psp_layer(layer):
            values = keras.ops.convert_to_numpy(layer.alpha.value)
        elif coupling.is_group_alphas(layer):
            values = layer.alphas()
        else:
            continue
        if not np.all(np.isfinite(values)):
            bad.append(layer.name)
    if bad:
        raise ValueError(
            f"PSP layers {bad} have NaN or infinite alphas; training diverged. "
            "Lower the learning rate or the alpha decay and train again."
        )


# --- report -------------------------------------------------------------------


class ShrinkReport:
    """What `strip_and_shrink` removed, per layer, and what kept channels.

    Attributes:
        layers: list of dicts `{name, class, channels_before, channels_after,
            removed}` (output channels of each layer; `removed`: the layer
            only fed a removed branch and is gone); a MultiHeadAttention's
            also has `heads_before`, `heads_after`.
        blocked: list of dicts `{layer, class, reason, space, channels}`:
            channels that were prunable somewhere (a constant, or ignored by
            a reader) but had to be kept, which layer kept them and why;
            `space` names the channel space (its first producer).
        round_to: the rounding used; `readmitted`: pruned channels kept for
            rounding, or (also with `round_to=1`) so that no channel space
            is emptied.
        removed_branches: list of dicts `{merge, layers, offset}`: merge inputs
            that were constant and removed with the layers computing them;
            `offset` names the `Rescaling` adding the constant (None if 0).
        column_sparsity: list of dicts `{name, columns, zero_columns,
            sparsity}` per kept PSP 'column' layer: zero kernel columns left
            among the columns of its kept input channels.
        approximation_error: with `approximate=True`, max |shrunk - PSP| /
            max |PSP| measured on random inputs (None if not measured);
            `approximation_note` says how it was measured or why not.
    """

    def __init__(self, layers, blocked, round_to, readmitted, removed_branches=(),
                 column_sparsity=(), approximation_error=None, approximation_note=None):
        self.layers = layers
        self.blocked = blocked
        self.round_to = round_to
        self.readmitted = readmitted
        self.removed_branches = list(removed_branches)
        self.column_sparsity = list(column_sparsity)
        self.approximation_error = approximation_error
        self.approximation_note = approximation_note

    def to_dict(self):
        return {
            "layers": [dict(x) for x in self.layers],
            "blocked": [dict(x) for x in self.blocked],
            "round_to": self.round_to,
            "readmitted": self.readmitted,
            "removed_branches": [dict(x) for x in self.removed_branches],
            "column_sparsity": [dict(x) for x in self.column_sparsity],
            "approximation_error": self.approximation_error,
            "approximation_note": self.approximation_note,
        }

    def __str__(self):
        lines = ["strip_and_shrink report", "layer                            channels"]
        for row in self.layers:
            mark = "" if row["channels_before"] == row["channels_after"] else "  (shrunk)"
            mark = "  (removed)" if row.get("removed") else mark
            if "heads_before" in row and row["heads_before"] != row["heads_after"]:
                mark += f"  (heads {row['heads_before']} -> {row['heads_after']})"
            lines.append(
                f"  {row['name']:<30} {row['channels_before']:>5} -> "
                f"{row['channels_after']:<5}{mark}"
            )
        if self.blocked:
            lines.append("kept although prunable elsewhere:")
            for row in self.blocked:
                who = f"layer '{row['layer']}' ({row['class']}) " if row["layer"] else ""
                lines.append(
                    f"  {who}{row['reason']}: keeps {row['channels']} channel(s) "
                    f"of {row['space']}"
                )
        if self.readmitted and self.round_to > 1:
            lines.append(
                f"kept {self.readmitted} pruned channel(s) to round widths to multiples of "
                f"{self.round_to} (and keep at least one channel per space)")
        elif self.readmitted:
            lines.append(
                f"kept {self.readmitted} pruned channel(s) so that every channel space "
                "keeps at least one channel")
        for row in self.removed_branches:
            how = f"adds it with '{row['offset']}'" if row["offset"] else "it is 0"
            lines.append(
                f"removed branch {', '.join(row['layers']) or '(no layers)'}: a constant "
                f"input of '{row['merge']}', {how}"
            )
        if self.column_sparsity:
            lines.append("column sparsity left in kept 'column' layers:")
            for row in self.column_sparsity:
                lines.append(
                    f"  {row['name']:<30} {row['zero_columns']}/{row['columns']} columns "
                    f"zero ({100 * row['sparsity']:.1f} %)"
                )
        if self.approximation_error is not None:
            lines.append(
                f"approximate folding: max deviation {self.approximation_error:.3g} "
                f"of the largest output ({self.approximation_note})"
            )
        elif self.approximation_note:
            lines.append(f"approximate folding: {self.approximation_note}")
        return "\n".join(lines)

    __repr__ = __str__


# --- the plan: which groups go ------------------------------------------------


def _psp_scores(model):
    """Layer name -> (structure, |alpha| as numpy) for every PSP layer, nested too."""
    scores = {}

    def visit(m):
        for layer in m.layers:
            if is_psp_layer(layer):
                alpha = np.asarray(keras.ops.convert_to_numpy(layer.alpha))
                scores[layer.name] = (layer, np.abs(alpha))
            elif hasattr(layer, "layers"):
                visit(layer)

    visit(model)
    for name, (gate, index) in coupling.reader_calls(model).items():
        scores[name] = (coupling.ReaderView(gate, index), coupling.reader_alpha(gate, index))
    return scores


def _decide(g):
    """Group root -> (removable, blockers, evidence).

    A group is removable when nothing freezes it and every kernel layer
    reading one of its channels either ignores it or can fold its constant.
    `evidence` marks groups some member considers dead (for the report).
    """
    evidence, blockers = {}, {}
    for key, t in g.tensors.items():
        consts = g.constants[key]
        for c in range(t.channels or 0):
            if np.isfinite(consts[c]):
                evidence[g.group(t.slot + c)] = True
    for slot, reasons in g.frozen.items():
        blockers.setdefault(g.group(slot), []).extend(reasons)
    for node in g.nodes:
        if node.handler.kind != "producer" or not g.is_live(node):
            continue  # pass-through outputs join the group; frozen ones froze it
        for k, t in enumerate(node.inputs):
            consts = g.constants[id(t.tensor)]
            for c in range(t.channels or 0):
                root = g.group(t.slot + c)
                if not node.in_needed[k][c]:
                    evidence[root] = True
                elif np.isfinite(consts[c]) and node.handler.absorbs(node, consts[c]):
                    evidence[root] = True
                else:
                    why = "reads it" if not np.isfinite(consts[c]) else "cannot fold its constant"
                    blockers.setdefault(root, []).append(psp_graph.Blocker(node, why))
    roots = {g.group(s) for t in g.tensors.values() for s in t.slots()}
    return {r: (r not in blockers, blockers.get(r, []), evidence.get(r, False)) for r in roots}


def _group_score(g, scores):
    """Group root -> importance: the smallest |alpha| of the PSP structures touching it.

    A channel is as weak as the weakest structure that prunes it (a dead
    filter feeding a live input channel is still dead).
    """
    out = {}
    for node in g.nodes:
        entry = scores.get(node.name)
        if entry is None or not g.is_live(node):
            continue
        layer, alpha = entry
        structure = layer.structure
        if structure == "filter" and not getattr(layer, "_alpha_depthwise", False):
            tensors, per = node.outputs, alpha.reshape(-1)
        elif structure == "layer":
            tensors, per = node.inputs + node.outputs, None
        elif structure == "column":
            tensors, per = node.inputs, alpha.reshape(-1, alpha.shape[-1]).max(axis=0)
        else:
            tensors, per = node.inputs, alpha.reshape(-1)
        for t in tensors:
            for c in range(t.channels or 0):
                value = float(alpha) if per is None else float(per[c]) if c < len(per) else 0.0
                root = g.group(t.slot + c)
                out[root] = min(out.get(root, np.inf), value)
    return out


def _identity_spaces(g):
    """(tensors, rounded) per channel space: tensors whose channel c are the same group.

    Only spaces holding a producer's output are rounded; spaces made by
    Concatenate or Flatten follow from the spaces they are made of.
    """
    produced = {id(t.tensor) for n in g.nodes if n.handler.kind == "producer" for t in n.outputs}
    dead = {id(t.tensor) for n in g.nodes if not g.is_live(n) for t in n.outputs}
    by_groups = {}
    for key, t in g.tensors.items():
        if t.channels and key not in dead:
            by_groups.setdefault(tuple(g.group(s) for s in t.slots()), []).append(t)
    return [(ts, any(id(t.tensor) in produced for t in ts)) for ts in by_groups.values()]


def _apply_rounding(g, removed, scores, round_to):
    """Re-admits pruned groups: every space keeps at least one channel, and
    producer spaces keep a multiple of `round_to` (at most their width).

    Returns how many groups were re-admitted.
    """
    readmitted = 0
    spaces = _identity_spaces(g)
    for _ in range(20):
        changed = False
        for tensors, rounded in spaces:
            t = tensors[0]
            roots = [g.group(s) for s in t.slots()]
            kept = sum(1 for r in roots if r not in removed)
            target = max(kept, 1)
            if rounded and round_to > 1:
                target = max(-(-kept // round_to) * round_to, round_to)
            target = min(target, t.channels)
            if target <= kept:
                continue
            candidates = sorted(
                {r for r in roots if r in removed}, key=lambda r: (-scores.get(r, 0.0), r)
            )
            for r in candidates[: target - kept]:
                removed.discard(r)
                readmitted += 1
                changed = True
        if not changed:
            break
    return readmitted


# --- rebuild ------------------------------------------------------------------


def _rebuild(g, keep):
    model = g.model
    tensor_map = {}
    new_inputs = []
    for t in model.inputs:
        new = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=input_name(t))
        tensor_map[id(t)] = new
        new_inputs.append(new)
    for node in g.nodes:
        if not g.is_live(node):
            continue
        keep_in = [keep[id(t.tensor)] for t in node.inputs]
        keep_out = [keep[id(t.tensor)] for t in node.outputs]
        in_consts = [g.constants[id(t.tensor)] for t in node.inputs]
        if node.dropped:
            tensors = [tensor_map[id(t.tensor)] for k, t in enumerate(node.inputs)
                       if k not in node.dropped]
            out = node.handler.call_without_dropped(node, tensors, keep_out, in_consts)
            tensor_map[id(node.node.outputs[0])] = out
            continue
        layer, weights = node.handler.rebuild(node, keep_in, keep_out, in_consts, node.in_needed)
        args, kwargs = node.node.arguments.fill_in(tensor_map)
        outputs = layer(*args, **kwargs)
        if weights is not None:
            layer.set_weights(weights)
        for old, new in zip(node.node.outputs, keras.tree.flatten(outputs)):
            tensor_map[id(old)] = new
    outputs = keras.tree.pack_sequence_as(
        compat.outputs_struct(model), [tensor_map[id(t)] for t in model.outputs]
    )
    inputs = keras.tree.pack_sequence_as(compat.inputs_struct(model), new_inputs)
    return keras.Model(inputs, outputs, name=model.name)


def strip_and_shrink(model: keras.Model, round_to: int = 1, return_report: bool = False,
                     approximate: bool = False) -> keras.Model | tuple[keras.Model, "ShrinkReport"]:
    """A new, smaller plain Keras model computing what the PSP `model` computes.

    PSP layers become their plain twins with thresholded alphas folded in;
    channels whose value no longer matters are physically removed, and the
    widths of producers and per-channel parameters (BatchNormalization,
    depthwise kernels ...) shrink with them. The input model is not modified.

    Args:
        model: a built functional or Sequential Keras model (PSP or plain).
        round_to: keep every channel space's width a multiple of this, by
            keeping the pruned channels with the largest |alpha| (never more
            than the original width). Every space keeps at least one channel.
        return_report: also return a `ShrinkReport`.
        approximate: also remove constant channels that a padded convolution
            reads (e.g. a 3x3 'same' conv), folding them into its bias as if
            there were no padding. Not exact at the borders: with
            `return_report`, the deviation from `model` is measured on
            `np.random.default_rng(0).normal` inputs of batch 4 (see
            `ShrinkReport.approximation_error`). Default False: exact.

    Returns:
        A functional `keras.Model` (flat: nested models are inlined), or
        `(model, report)` with `return_report`.

    Raises:
        ValueError: `model` is not a built functional/Sequential model, has
            non-finite alphas, or a `channels_first` layer (refused, named),
            or `round_to` is not a positive integer.
        TypeError: `approximate` is not a bool.
    """
    check_model(model)
    round_to = _positive_int(round_to, "round_to")
    if not isinstance(approximate, (bool, np.bool_)):
        raise TypeError(
            f"strip_and_shrink: approximate must be True or False, got {approximate!r}."
        )
    psp_graph.check_channels_last(model, f"strip_and_shrink(model '{model.name}')")
    _check_finite_alphas(model)
    scores = _psp_scores(model)
    g = psp_graph.ChannelGraph(strip(model), approximate=approximate)
    plan = _decide(g)
    removed = {r for r, (ok, _, _) in plan.items() if ok}
    readmitted = _apply_rounding(g, removed, _group_score(g, scores), round_to)
    keep = {
        key: np.array([c for c in range(t.channels or 0)
                       if g.group(t.slot + c) not in removed], int)
        for key, t in g.tensors.items()
    }
    shrunk = _rebuild(g, keep)
    _warn_fully_pruned(g, scores, keep)
    if not return_report:
        return shrunk
    report = _report(g, plan, keep, round_to, readmitted)
    report.column_sparsity = _column_sparsity(scores, shrunk)
    if approximate:
        report.approximation_error, report.approximation_note = _deviation(model, shrunk)
    return shrunk, report


def _positive_int(value, name):
    """`value` as an int >= 1 (integral floats too), or a ValueError naming `name`."""
    ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
    if not ok or not np.isfinite(value) or int(value) != value or value < 1:
        raise ValueError(f"strip_and_shrink: {name} must be a positive integer, got {value!r}.")
    return int(value)


def _warn_fully_pruned(g, scores, keep):
    """Warns, naming them, about live PSP layers whose every structure is pruned.

    Such a layer outputs a constant. Inside a residual branch the branch is
    removed (the layer is then not live, and nothing is said); elsewhere the
    layer stays, with the output channels exactness needs (at least one).
    """
    rows = []
    for node in g.nodes:
        entry = scores.get(node.name)
        if entry is None or not g.is_live(node) or np.any(entry[0].structure_mask()):
            continue
        t = node.outputs[0]
        kept = len(keep[id(t.tensor)])
        rows.append(f"'{node.name}' (keeps {kept} of {t.channels} output channels)")
    if rows:
        warnings.warn(
            f"strip_and_shrink: every structure of layer {', '.join(rows)} is pruned "
            "(all |alpha| < epsilon), so it outputs a constant. Only a whole residual "
            "branch can be removed exactly; this layer is kept with the fewest channels "
            "that keep the model exact. Remove the layer from the model, or train with "
            "less alpha decay.",
            UserWarning,
            stacklevel=3,
        )


def _deviation(model, shrunk):
    """(max |shrunk - model| / max |model|, note) on `probe_inputs`, or (None, why not)."""
    model = functional_view(model)
    xs, why = probe_inputs(model)
    if xs is None:
        return None, f"deviation not measured: {why}"
    what = "strip_and_shrink: measuring the deviation"
    error = relative_error(nchw.run_inference(model, xs, what),
                           nchw.run_inference(shrunk, xs, what))
    return error, "random normal inputs, seed 0, batch 4"


def _column_sparsity(scores, shrunk):
    """Zero kernel columns left in each kept PSP 'column' layer of `shrunk`."""
    kept = layers_by_name(shrunk)
    rows = []
    for name, (layer, _) in scores.items():
        if layer.structure != "column" or name not in kept:
            continue
        kernel = getattr(kept[name], layer._alpha_kernel_name)
        kernel = np.asarray(keras.ops.convert_to_numpy(kernel))
        if getattr(layer, "_alpha_transposed", False):  # [.., out, in] -> [.., in, out]
            kernel = np.swapaxes(kernel, -1, -2)
        columns = kernel.reshape(-1, kernel.shape[-1])
        zero = int(np.sum(~np.any(columns != 0, axis=1)))
        rows.append({"name": name, "columns": len(columns), "zero_columns": zero,
                     "sparsity": zero / len(columns) if len(columns) else 0.0})
    return rows


def _report(g, plan, keep, round_to, readmitted):
    layers = []
    for node in g.nodes:
        if not node.outputs or node.outputs[0].channels == 0:  # token ids, masks: no channels
            continue
        t = node.outputs[0]
        live = g.is_live(node)
        layers.append(
            {
                "name": node.name,
                "class": type(node.layer).__name__,
                "channels_before": int(t.channels or 0),
                "channels_after": int(len(keep[id(t.tensor)])) if live else 0,
                "removed": not live,
            }
        )
        if (hasattr(node.handler, "inner_spaces") and node.inputs  # attention: its heads
                and not getattr(node.handler, "units_are_outputs", False)):  # RNN: channels
            heads = node.inputs[0]
            layers[-1]["heads_before"] = int(heads.channels or 0)
            layers[-1]["heads_after"] = int(len(keep[id(heads.tensor)])) if live else 0
    removed_branches = [
        {"merge": node.name, "layers": g.dead_branch(node),
         "offset": None if _zero_offset(g, node) else node.constant_name}
        for node in g.nodes if node.dropped
    ]
    counts = {}
    for root, (ok, reasons, evidence) in plan.items():
        if ok or not evidence:
            continue
        space = g.space_name(root)
        for key in sorted({b.key() for b in reasons}):
            counts[key + (space,)] = counts.get(key + (space,), 0) + 1
    blocked = [
        {"layer": layer or None, "class": cls or None, "reason": text, "space": space,
         "channels": n}
        for (layer, cls, text, space), n in sorted(counts.items())
    ]
    return ShrinkReport(layers, blocked, round_to, readmitted, removed_branches)


def _zero_offset(g, node):
    """Whether `node`'s dropped inputs add nothing (no `Rescaling` was needed)."""
    consts = [g.constants[id(node.inputs[k].tensor)] for k in node.dropped]
    flips = type(node.layer).__name__ == "Average" or (
        type(node.layer).__name__ == "Subtract" and node.dropped == [0])
    return not flips and not any(np.any(c) for c in consts)
