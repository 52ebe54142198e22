"""Turn a trained PSP model into a smaller plain Keras model.

`strip(model)` replaces every PSP layer by its plain Keras twin holding the
folded weights (same widths). `strip_and_shrink(model)` then removes the
channels whose value no longer matters, using `tf_psp.graph.ChannelGraph`:

- a channel is removed when every layer reading it ignores it (zero kernel
  rows), or when it is a known constant every reader can fold into its bias
  exactly (Dense, 'valid' or 1x1 convs; a constant 0 needs no folding);
- channels touched by layers the graph does not understand, model inputs and
  model outputs are kept, and the report says which layer kept them.

The result computes exactly what the PSP model computes in inference mode
(up to float32 round-off).
"""

import keras
import numpy as np

from tf_psp import graph as psp_graph
from tf_psp.convert import check_model
from tf_psp.layers import is_psp_layer

# --- strip --------------------------------------------------------------------


def _clone_layer(layer):
    if isinstance(layer, keras.layers.Lambda):
        return layer  # a Python lambda cannot round-trip through a config safely
    if not isinstance(layer, keras.layers.Layer):
        return layer  # a keras.ops operation: stateless
    if is_psp_layer(layer):
        return layer.plain_class.from_config(layer.plain_config())
    return type(layer).from_config(layer.get_config())


def strip(model):
    """A new plain Keras model with every PSP layer replaced by its plain twin.

    Widths are unchanged; pruned structures stay as exact zeros in the folded
    weights. The input model is not modified.

    Args:
        model: a built functional or Sequential Keras model.

    Returns:
        A new Keras model of the same kind, without tf_psp layers.
    """
    pairs = []

    def clone_function(layer):
        new = _clone_layer(layer)
        if new is not layer:
            pairs.append((layer, new))
        return new

    clone = keras.models.clone_model(model, clone_function=clone_function, recursive=True)
    for old, new in pairs:
        weights = old.folded_weights() if is_psp_layer(old) else old.get_weights()
        new.set_weights(weights)
    return clone


def _check_finite_alphas(model):
    bad = [layer.name for layer in model._flatten_layers(include_self=False)
           if is_psp_layer(layer) and not np.all(np.isfinite(keras.ops.convert_to_numpy(layer.alpha.value)))]
    if bad:
        raise ValueError(
            f"PSP layers {bad} have NaN or infinite alphas; training diverged. "
            "Lower the learning rate or the alpha decay and train again."
        )


# --- report -------------------------------------------------------------------


class ShrinkReport:
    """What `strip_and_shrink` removed, per layer, and what kept channels.

    Attributes:
        layers: list of dicts `{name, class, channels_before, channels_after}`
            (output channels of each layer).
        blocked: list of dicts `{layer, class, reason, space, channels}`:
            channels that were prunable somewhere (a constant, or ignored by
            a reader) but had to be kept, which layer kept them and why;
            `space` names the channel space (its first producer).
        round_to: the rounding used; `readmitted`: channels kept for rounding.
    """

    def __init__(self, layers, blocked, round_to, readmitted):
        self.layers = layers
        self.blocked = blocked
        self.round_to = round_to
        self.readmitted = readmitted

    def to_dict(self):
        return {
            "layers": [dict(x) for x in self.layers],
            "blocked": [dict(x) for x in self.blocked],
            "round_to": self.round_to,
            "readmitted": self.readmitted,
        }

    def __str__(self):
        lines = ["strip_and_shrink report", "layer                            channels"]
        for row in self.layers:
            mark = "" if row["channels_before"] == row["channels_after"] else "  (shrunk)"
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
        if self.readmitted:
            lines.append(f"kept {self.readmitted} pruned channel(s) to round widths to {self.round_to}")
        return "\n".join(lines)

    __repr__ = __str__


# --- the plan: which groups go ------------------------------------------------


def _psp_scores(model):
    """Layer name -> (structure, |alpha| as numpy) for every PSP layer, nested too."""
    scores = {}

    def visit(m):
        for layer in m.layers:
            if is_psp_layer(layer):
                scores[layer.name] = (layer, np.abs(np.asarray(keras.ops.convert_to_numpy(layer.alpha))))
            elif hasattr(layer, "layers"):
                visit(layer)

    visit(model)
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
        if node.handler.kind != "producer":
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
        if entry is None:
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
    by_groups = {}
    for key, t in g.tensors.items():
        if t.channels:
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
        new = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name)
        tensor_map[id(t)] = new
        new_inputs.append(new)
    for node in g.nodes:
        keep_in = [keep[id(t.tensor)] for t in node.inputs]
        keep_out = [keep[id(t.tensor)] for t in node.outputs]
        in_consts = [g.constants[id(t.tensor)] for t in node.inputs]
        layer, weights = node.handler.rebuild(node, keep_in, keep_out, in_consts, node.in_needed)
        args, kwargs = node.node.arguments.fill_in(tensor_map)
        outputs = layer(*args, **kwargs)
        if weights is not None:
            layer.set_weights(weights)
        for old, new in zip(node.node.outputs, keras.tree.flatten(outputs)):
            tensor_map[id(old)] = new
    outputs = keras.tree.pack_sequence_as(
        model._outputs_struct, [tensor_map[id(t)] for t in model.outputs]
    )
    inputs = keras.tree.pack_sequence_as(model._inputs_struct, new_inputs)
    return keras.Model(inputs, outputs, name=model.name)


def strip_and_shrink(model, round_to=1, return_report=False):
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

    Returns:
        A functional `keras.Model`, or `(model, report)` with `return_report`.
    """
    check_model(model)
    if isinstance(round_to, bool) or int(round_to) != round_to or round_to < 1:
        raise ValueError(f"round_to must be a positive integer, got {round_to!r}.")
    round_to = int(round_to)
    _check_finite_alphas(model)
    scores = _psp_scores(model)
    g = psp_graph.ChannelGraph(strip(model))
    plan = _decide(g)
    removed = {r for r, (ok, _, _) in plan.items() if ok}
    readmitted = _apply_rounding(g, removed, _group_score(g, scores), round_to)
    keep = {
        key: np.array([c for c in range(t.channels or 0) if g.group(t.slot + c) not in removed], int)
        for key, t in g.tensors.items()
    }
    shrunk = _rebuild(g, keep)
    if not return_report:
        return shrunk
    return shrunk, _report(g, plan, keep, round_to, readmitted)


def _report(g, plan, keep, round_to, readmitted):
    layers = []
    for node in g.nodes:
        if not node.outputs:
            continue
        t = node.outputs[0]
        layers.append(
            {
                "name": node.name,
                "class": type(node.layer).__name__,
                "channels_before": int(t.channels or 0),
                "channels_after": int(len(keep[id(t.tensor)])),
            }
        )
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
    return ShrinkReport(layers, blocked, round_to, readmitted)
