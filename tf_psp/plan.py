"""The pruning plan: which channel groups a model can lose, what each saves, and how it scores.

A *unit* is one removable channel group of `tf_psp.graph.ChannelGraph`: the
channel slots `strip_and_shrink` removes together (a filter, the BatchNorm
channel after it, every kernel row that reads it; a whole residual-stream
channel when `Add` ties several producers). For each unit the plan lists

- `reads` / `writes`: the kernel layers reading it (input channel index) and
  the producers writing it (output channel index);
- `handles`: the PSP alphas whose zeroing removes it: the group alpha of a
  `coupling='group'` model, or per-layer `channel`/`column` alphas of its
  readers, depthwise alphas on its path and `filter` alphas of its writers;
- `macs`: the MACs removing it alone saves, counting every reader and writer;
- `score`: its importance (see `IMPORTANCES`).

The plan is analysis plus a policy: `kept_macs(removed)` predicts the MACs of
`strip_and_shrink` for any set of removed units (keep-one rule and `round_to`
included), `select(keep_macs)` picks the lowest-scoring units until a MAC
budget is met, and `apply(units)` returns a copy of the model with their
alphas zeroed. With a `tf_psp.LatencyTable`, `kept_latency(units, table)`
predicts the shrunk model's latency and `select(keep_latency=..., table=...)`
meets a latency budget (units in score order, or by score per latency saved
with `LATENCY_EXPONENT`).
`tf_psp.prune_to_budget` and the budget callback build on it;
the baselines (l1-norm, Network Slimming, group lasso, random) are nothing but
other scores.

Importance scores (`importance=`), each a property of the unit's *effective*
weights (alphas folded in, as `tf_psp.strip` computes them):

- `"alpha"` (default): the L2 norm of the effective kernel rows reading the
  unit (and of the filters writing it through `filter` alphas): PSP's learned
  scale times the kernel slice it scales. Raw |alpha| is not comparable
  across layers: the split of `w = alpha * v` between alpha and `v` is free,
  and a BatchNorm after a layer makes its scale arbitrary. The effective norm
  is invariant to that split, and dividing by the mean over the unit's
  channel space (Torch-Pruning's `normalizer='mean'`) removes the scale of
  the layer, so units of different layers rank on one scale.
- `"l1"`: the l1-norm of the filters writing the unit (Li et al. 2017),
  divided by the space mean.
- `"l2"`: the L2 norm of every effective weight of the group, reading rows
  and writing filters (DepGraph's group norm), divided by the space mean.
- `"bn"`: |gamma| of the BatchNormalization after the unit (Network
  Slimming); units without one are never selected. Not normalized: Network
  Slimming's L1 penalty on gamma makes the gammas of all layers comparable.
- `"random"`: uniform random scores (`seed`).
- a callable `(unit, plain_model) -> float`: `plain_model` is `tf_psp.strip`
  of the model (alphas folded in), `unit` a `Unit`.
"""

import math
from collections.abc import Callable

import keras
import numpy as np

from tf_psp import compat, coupling
from tf_psp import graph as psp_graph
from tf_psp.functional import check_model, clone_with_weights, layers_by_name
from tf_psp.layers import is_psp_layer
from tf_psp.macs import mac_rule
from tf_psp.profiling import node_shapes, unknown_dimension_error
from tf_psp.profiling import profile as profile_model
from tf_psp.shrink import _apply_rounding, strip

IMPORTANCES = ("alpha", "l1", "l2", "bn", "random")
# select() aims at [budget - FILL_TOLERANCE, budget] of the dense MACs
FILL_TOLERANCE = 0.02
# keep_latency ranks units by score / (latency saved per channel / its mean) ** this.
# 0 (rank by importance alone, let the latency table decide how many go) was best on the
# validation split of the latency front (examples/latency_front.py, ResNet-8, MNIST-5k,
# seed 0): 97.9 / 94.9 % at latency 0.5 / 0.3, against 96.4 / 93.5 % for 1 (HALP's
# importance-per-latency ranking, which concentrates pruning in the layers the table calls
# slow) and 96.4 / 90.5 % for 0.5.
LATENCY_EXPONENT = 0.0


def _np(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


class Unit:
    """One removable channel group of a model (see the module docstring).

    Attributes:
        index: position in `PruningPlan.units`.
        root: the group's root slot in the plan's `ChannelGraph`.
        space: name of its channel space (the layer writing it first).
        width: channels of that space (units and frozen channels together).
        reads: `[(layer name, input channel)]` of the kernel layers reading it.
        writes: `[(layer name, output channel)]` of the producers writing it.
        handles: `[(layer name, variable key, flat alpha indices)]`: the alphas
            that zero it (`key` is `'alpha'` for a PSP layer, the group index
            for `PSPGroupAlphas`).
        macs: MACs saved by removing this unit alone.
        score: importance (lower is pruned first; inf: never selected).
        pruned: every handle is already below epsilon (shrink removes it now).
    """

    def __init__(self, index, root, space):
        self.index = index
        self.root = root
        self.space = space
        self.width = 0
        self.reads, self.writes, self.handles = [], [], []
        self.macs = 0.0
        self.score = np.inf
        self.pruned = False

    def __repr__(self):
        return (f"Unit({self.index}, space={self.space!r}, macs={self.macs:.0f}, "
                f"score={self.score:.4g}{', pruned' if self.pruned else ''})")


class _MacTerm:
    """MACs of one kernel-layer call as a function of its kept input/output channels."""

    def __init__(self, node, g, shapes=None):
        layer = node.layer
        rule = mac_rule(layer)
        if shapes is not None and id(node.node) in shapes:  # propagated from input_shape
            shapes_in, shapes_out = shapes[id(node.node)]
        else:
            shapes_in = [tuple(t.shape) for t in node.node.input_tensors]  # not inner spaces
            shapes_out = [tuple(t.shape) for t in node.node.output_tensors]
        if any(d is None for shape in shapes_in + shapes_out for d in shape[1:]):
            raise unknown_dimension_error(
                g.model, f"layer '{node.name}': shapes {shapes_in} -> {shapes_out}")
        self.name = node.name
        self.macs = float(rule(layer, shapes_in, shapes_out))
        self.roots_in = np.array([g.group(s) for s in node.inputs[0].slots()], int)
        self.roots_out = np.array([g.group(s) for s in node.outputs[0].slots()], int)
        self.kind = "bilinear"
        self.split = 0.0
        read_input = getattr(node.handler, "read_input", 0)
        if read_input:  # an RNN: T*G*u*(in + u), its units both the rows and columns
            self.roots_in = np.array([g.group(s) for s in node.inputs[read_input].slots()], int)
            recurrent = getattr(getattr(layer, "cell", None), "recurrent_kernel", None)
            kernel = getattr(getattr(layer, "cell", None), "kernel", None)
            if recurrent is not None and kernel is not None:
                self.kind = "recurrent"
                self.split = self.macs * math.prod(kernel.shape) / (
                    math.prod(kernel.shape) + math.prod(recurrent.shape))
        if isinstance(node.handler, psp_graph.DepthwiseHandler):
            self.kind = "linear"
        elif isinstance(node.handler, psp_graph.SeparableConvHandler):
            positions = self.macs / (math.prod(layer.depthwise_kernel.shape)
                                     + math.prod(layer.pointwise_kernel.shape))
            self.split = positions * math.prod(layer.depthwise_kernel.shape)
            self.kind = "separable"

    def kept_channels(self, removed_mask):
        """(kept input channels, kept output channels) of this call."""
        kin = (int(np.count_nonzero(~removed_mask[self.roots_in])) if len(self.roots_in)
               else 0)
        kout = (int(np.count_nonzero(~removed_mask[self.roots_out])) if len(self.roots_out)
                else 0)
        return kin, kout

    def kept(self, removed_mask):
        cin, cout = max(len(self.roots_in), 1), max(len(self.roots_out), 1)
        fin = np.count_nonzero(~removed_mask[self.roots_in]) / cin if len(self.roots_in) else 1.0
        fout = (np.count_nonzero(~removed_mask[self.roots_out]) / cout
                if len(self.roots_out) else 1.0)
        if self.kind == "linear":
            return self.macs * fin
        if self.kind == "recurrent":  # kernel [in, G*u] and recurrent kernel [u, G*u]
            return self.split * fin * fout + (self.macs - self.split) * fout * fout
        if self.kind == "separable":
            return self.split * fin + (self.macs - self.split) * fin * fout
        return self.macs * fin * fout


class PruningPlan:
    """The removable channel groups of a model, their MAC savings and scores.

    Build it with `pruning_plan(model, importance=...)`.

    Attributes:
        model: the model the plan was made for (not modified).
        units: list of `Unit` (candidates: not frozen, with a MAC effect).
        dense_macs: MACs of the model at full width (`tf_psp.profile`).
        frozen: `Blocker` texts of the channels no unit covers (kept, and why).
        importance: the importance the scores come from.
    """

    def __init__(self, model, units, graph, terms, dense_macs, frozen, importance):
        self.model = model
        self.units = units
        self.graph = graph
        self._terms = terms
        self.dense_macs = int(dense_macs)
        self.frozen = frozen
        self.importance = importance
        self._slots = len(graph._uf.parent)
        self._fixed = self.dense_macs - sum(t.macs for t in terms)

    # --- costs ------------------------------------------------------------------
    def _mask(self, roots):
        mask = np.zeros(self._slots, bool)
        if roots:
            mask[np.fromiter(roots, int)] = True
        return mask

    def _removed_roots(self, units, round_to=1):
        """Roots removed when `units` (indices) and the already pruned units go,
        after the keep-one-channel rule and `round_to` (shrink's own rules)."""
        removed = {self.units[i].root for i in units}
        removed |= {u.root for u in self.units if u.pruned}
        scores = {u.root: (u.score if np.isfinite(u.score) else 1e30) for u in self.units}
        _apply_rounding(self.graph, removed, scores, round_to)
        return removed

    def kept_macs(self, units=(), round_to=1):
        """MACs `strip_and_shrink(round_to=round_to)` keeps when `units` (indices) go.

        Units already pruned count as removed. The keep-one-channel rule and
        rounding re-admit units as `strip_and_shrink` does (the highest
        scores first).
        """
        mask = self._mask(self._removed_roots(units, round_to))
        return int(round(self._fixed + sum(t.kept(mask) for t in self._terms)))

    def kept_fraction(self, units=(), round_to=1):
        """`kept_macs(...) / dense_macs`."""
        return self.kept_macs(units, round_to) / self.dense_macs if self.dense_macs else 1.0

    def widths(self, units=(), round_to=1):
        """Layer name -> (kept input, kept output channels) of every kernel layer call
        when `units` (indices) go (shrink's keep-one and `round_to` rules applied)."""
        mask = self._mask(self._removed_roots(units, round_to))
        return {t.name: t.kept_channels(mask) for t in self._terms}

    def kept_latency(self, units=(), table=None, round_to=1):
        """Predicted latency (seconds) of the shrunk model when `units` go.

        Args:
            units: unit indices.
            table: a `tf_psp.LatencyTable` of this model.
            round_to: as in `kept_macs`.
        """
        if table is None:
            raise ValueError("kept_latency needs a latency table (tf_psp.latency_table).")
        return table.predict_widths(self.widths(units, round_to))

    def _cost(self, table, round_to):
        """fraction(units) -> kept fraction of the dense cost (MACs, or latency of `table`)."""
        if table is None:
            return lambda units: self.kept_fraction(units, round_to)
        dense = table.predict_widths({})
        return lambda units: self.kept_latency(units, table, round_to) / dense

    def latency_savings(self, table, round_to=1):
        """Unit index -> predicted seconds saved per channel of its space.

        The average over removing half of the space's prunable units (the
        table is a staircase: one channel alone often saves nothing).
        """
        dense = table.predict_widths({})
        by_space = {}
        for u in self.units:
            if not u.pruned:
                by_space.setdefault(u.space, []).append(u.index)
        saving = {}
        for members in by_space.values():
            half = members[:max(1, len(members) // 2)]
            saved = dense - self.kept_latency(half, table, round_to)
            for i in members:
                saving[i] = max(saved, 0.0) / len(half)
        return saving

    # --- policy -------------------------------------------------------------------
    def order(self, min_keep=0.1, exclude=(), key=None):
        """Unit indices in pruning order: lowest score first (or lowest `key(unit)`),
        already pruned units excluded, never more than `1 - min_keep` of a channel space."""
        exclude = set(exclude)
        key = key or (lambda u: u.score)
        taken, order = {}, []
        alive = {}
        for u in self.units:
            alive[u.space] = u.width
        for u in self.units:
            if u.pruned:
                alive[u.space] -= 1
        for u in sorted(self.units, key=lambda u: (key(u), u.index)):
            if u.pruned or u.index in exclude or not np.isfinite(u.score):
                continue
            floor = max(1, math.ceil(min_keep * u.width))
            if alive[u.space] - taken.get(u.space, 0) - 1 < floor:
                continue
            taken[u.space] = taken.get(u.space, 0) + 1
            order.append(u.index)
        return order

    def select(self, keep_macs=None, min_keep=0.1, round_to=1, exclude=(),
               keep_latency=None, table=None):
        """The fewest lowest-scoring units whose removal keeps <= the budget.

        Args:
            keep_macs: the MAC budget, a fraction of `dense_macs` in (0, 1].
            min_keep: never remove more than `1 - min_keep` of a channel space
                (a global ranking would otherwise empty a whole residual
                stream). At least one channel always stays.
            round_to: the `round_to` `strip_and_shrink` will be called with; the
                selection is rounded here, so it is exactly what shrink removes.
            exclude: unit indices never to select.
            keep_latency: instead of `keep_macs`, a latency budget: a fraction
                of the dense model's latency predicted by `table`. Units are
                taken in score order until the predicted latency meets it; with
                `tf_psp.plan.LATENCY_EXPONENT = 1` by score per latency saved
                (`latency_savings`, HALP's ranking), which lost accuracy on the
                validation split (see the constant).
            table: the `tf_psp.LatencyTable` of the model (with `keep_latency`).

        Returns:
            A sorted list of unit indices (after rounding: re-admitted units are
            not in it).

        Raises:
            ValueError: the budget cannot be met; the message gives the smallest
                reachable fraction and what limits it.
        """
        keep, what = budget_target(keep_macs, keep_latency, "select")
        if keep_latency is None:
            table = None
        elif table is None:
            raise ValueError("keep_latency needs a latency table (tf_psp.latency_table).")
        if table is not None and LATENCY_EXPONENT:
            saving = self.latency_savings(table, round_to)
            mean = float(np.mean(list(saving.values()))) if saving else 1.0
            mean = mean if mean > 0 else 1.0
            order = self.order(min_keep, exclude, key=lambda u: u.score / max(
                saving.get(u.index, 0.0) / mean, 1e-12) ** LATENCY_EXPONENT)
        else:  # importance order (the savings are only needed to rank by them)
            order = self.order(min_keep, exclude)
        fraction = self._cost(table, round_to)

        def kept(n):
            return fraction(order[:n])

        if kept(0) <= keep:
            return self._final(order[:0], round_to)
        if kept(len(order)) > keep:
            reachable = kept(len(order))
            raise ValueError(
                f"model '{self.model.name}': cannot prune to {what}={keep:.3g}; "
                f"at most {1 - reachable:.1%} of the "
                f"{'MACs' if table is None else 'predicted latency'} can go "
                f"(keeps {reachable:.3f}) "
                f"with min_keep={min_keep} and round_to={round_to}: {len(self.units)} "
                f"prunable channel groups, the rest frozen"
                + (f" ({'; '.join(self.frozen[:3])})" if self.frozen else "")
                + f". Lower min_keep, or raise {what}."
            )
        lo, hi = 0, len(order)  # kept(lo) > keep >= kept(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if kept(mid) <= keep:
                hi = mid
            else:
                lo = mid
        if kept(hi) >= keep - FILL_TOLERANCE:
            return self._final(order[:hi], round_to)
        return self._final(self._fill(order, lo, keep, fraction) or order[:hi], round_to)

    def _fill(self, order, lo, keep, fraction):
        """Coarse units overshoot the budget: from the last prefix above it, walk down
        the order and take the first unit that lands within FILL_TOLERANCE below the
        budget, adding the units that keep it above (a greedy knapsack fill)."""
        chosen = list(order[:lo])
        floor = keep - FILL_TOLERANCE
        for i in order[lo:]:
            k = fraction(chosen + [i])
            if k > keep:
                chosen.append(i)
            elif k >= floor:
                return chosen + [i]
        return None

    def _final(self, units, round_to):
        removed = self._removed_roots(units, round_to)
        return sorted(u.index for u in self.units if u.root in removed and not u.pruned)

    # --- surgery ------------------------------------------------------------------
    def apply(self, units):
        """A copy of the plan's model with the alphas of `units` (indices) set to 0.

        Raises:
            ValueError: a unit has no alpha (a plain model: parameterize it first).
        """
        bare = [self.units[i] for i in units if not self.units[i].handles]
        if bare:
            raise ValueError(
                f"model '{self.model.name}': {len(bare)} selected channel group(s) have no "
                f"PSP alpha (e.g. in {bare[0].space}); parameterize the model first, e.g. "
                "tf_psp.parameterize(model, coupling='group', alpha_regularizer=None)."
            )
        copy = clone_with_weights(self.model)
        zero_alphas(copy, [h for i in units for h in self.units[i].handles])
        return copy


def alpha_variable(layer, key):
    """The alpha variable a handle names: `layer.alpha`, or group `key` of a gate."""
    return layer.alpha if key == "alpha" else layer.group_alphas[key]


def zero_alphas(model, handles):
    """Sets the alpha entries of `handles` to 0, in place."""
    layers = layers_by_name(model)
    grouped = {}
    for name, key, idx in handles:
        grouped.setdefault((name, key), []).append(np.asarray(idx, int))
    for (name, key), parts in grouped.items():
        variable = alpha_variable(layers[name], key)
        value = _np(variable.value).copy()
        flat = value.reshape(-1)
        flat[np.concatenate(parts)] = 0.0
        variable.assign(flat.reshape(value.shape))


def budget_target(keep_macs, keep_latency, caller):
    """`(keep, name)` of the one budget given: `keep_latency`, or `keep_macs` (default 0.5).

    Raises:
        ValueError: both are given, or the fraction is not in (0, 1].
    """
    if keep_macs is not None and keep_latency is not None:
        raise ValueError(f"{caller}: pass keep_macs or keep_latency, not both.")
    if keep_latency is not None:
        _check_fraction(keep_latency, "keep_latency")
        return keep_latency, "keep_latency"
    keep = 0.5 if keep_macs is None else keep_macs
    _check_fraction(keep, "keep_macs")
    return keep, "keep_macs"


def _check_fraction(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)):
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}.")
    if not 0 < float(value) <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value!r}.")


# --- building a plan -------------------------------------------------------------


def _kernel_of(layer):
    """(kernel read per input channel, kernel written per output channel) as numpy."""
    handler, _ = psp_graph.handler_for(layer)
    if hasattr(handler, "read_kernels"):  # a layer with an inner space (attention heads)
        return handler.read_kernels(layer)
    if getattr(layer, "depthwise_kernel", None) is not None:
        return _np(layer.depthwise_kernel), _np(layer.pointwise_kernel)
    kernel = _np(layer.kernel)
    return kernel, kernel


def _handle_entries(layer, axis, c):
    """Flat alpha indices of PSP `layer` scaling kernel index `c` on `axis` (-2 in, -1 out)."""
    shape = tuple(layer._alpha_broadcast)
    if len(shape) < 2 or shape[axis] == 1:
        return None
    grid = np.arange(int(np.prod(shape))).reshape(shape)
    return np.take(grid, c, axis=axis).reshape(-1)


def _psp_handles(model):
    """Layer name -> PSP layer, for the per-layer PSP layers of `model`."""
    return {layer.name: layer for layer in compat.flatten_layers(model)
            if is_psp_layer(layer)}


def _gate_handles(model):
    """Reader name -> function(input channel) -> (gate name, group, local index) or None."""
    out = {}
    for name, (gate, index) in coupling.reader_calls(model).items():
        positions = gate._positions(index)
        starts = np.cumsum([0] + gate.group_sizes)

        def locate(c, gate=gate, positions=positions, starts=starts):
            p = int(positions[c])
            if p >= gate._total:
                return None
            g = int(np.searchsorted(starts, p, side="right")) - 1
            return gate.name, g, p - int(starts[g])

        out[name] = locate
    return out


def _alpha_pruned(layers, handles):
    for name, key, idx in handles:
        layer = layers[name]
        eps = layer.epsilon
        values = np.abs(_np(alpha_variable(layer, key).value)).reshape(-1)[idx]
        if np.any(values >= eps):
            return False
    return bool(handles)


def pruning_plan(model: keras.Model, importance: str | Callable = "alpha",
                 seed: int = 0, input_shape=None) -> PruningPlan:
    """The `PruningPlan` of `model` (per-layer PSP, group PSP or plain).

    Args:
        model: a built functional or Sequential model; not modified.
        importance: `'alpha'`, `'l1'`, `'l2'`, `'bn'`, `'random'` or a callable
            `(unit, plain_model) -> float` (see the module docstring).
        seed: seed of `importance='random'`.
        input_shape: shape of one sample, batch dimension excluded (a list of
            shapes for several inputs), as for `tf_psp.profile`: needed when an
            input has a None dimension besides the batch (a `(None, None)`
            token input); the MACs are counted for inputs of this shape.

    Returns:
        A `PruningPlan`.

    Raises:
        ValueError: a MAC count needs a dimension the model leaves as None and
            no `input_shape` is given (the message names the inputs).
    """
    check_model(model)
    if not callable(importance) and importance not in IMPORTANCES:
        raise ValueError(
            f"importance must be one of {IMPORTANCES} or a callable, got {importance!r}.")
    plain = strip(model)
    g = psp_graph.ChannelGraph(plain)
    dense_macs = profile_model(model, input_shape).total_macs
    shapes = node_shapes(g.model, input_shape)
    frozen_roots = {g.group(s) for s in g.frozen}
    psp = _psp_handles(model)
    gates = _gate_handles(model)

    units, by_root = [], {}

    def unit_of(root):
        if root in frozen_roots:
            return None
        if root not in by_root:
            by_root[root] = Unit(len(units), root, g.space_name(root))
            units.append(by_root[root])
        return by_root[root]

    terms = []
    bns = {}
    for node in g.nodes:
        if not g.is_live(node):
            continue
        if isinstance(node.layer, keras.layers.BatchNormalization) and node.outputs:
            gamma = (_np(node.layer.gamma) if node.layer.scale
                     else np.ones(node.outputs[0].channels or 0))
            for c, s in enumerate(node.outputs[0].slots()):
                bns.setdefault(g.group(s), []).append(abs(float(gamma[c])))
        if mac_rule(node.layer) is None or not node.inputs or not node.outputs:
            continue
        kind = node.handler.kind
        depthwise = isinstance(node.handler, psp_graph.DepthwiseHandler)
        if kind == "frozen":
            continue
        if kind != "producer" and not depthwise:
            continue
        terms.append(_MacTerm(node, g, shapes))
        layer = psp.get(node.name)
        inner = hasattr(node.handler, "inner_spaces")  # attention heads: read and written inside
        read_input = getattr(node.handler, "read_input", 0)  # an RNN: 1, its sequence
        for c, s in enumerate(node.inputs[0].slots()):
            u = unit_of(g.group(s))
            if u is None:
                continue
            u.reads.append((node.name, c))
            if inner:
                u.writes.append((node.name, c))
            if layer is not None:
                idx = _handle_entries(layer, -2, c)
                if idx is not None:
                    u.handles.append((node.name, "alpha", idx))
            locate = gates.get(node.name)
            if locate is not None and read_input == 0:
                found = locate(c)
                if found is not None:
                    u.handles.append((found[0], found[1], np.array([found[2]])))
        locate = gates.get(node.name) if read_input else None
        for c, s in enumerate(node.inputs[read_input].slots() if locate else ()):
            u = unit_of(g.group(s))  # an RNN's sequence: gated, its kernel rows not scored
            found = locate(c) if u is not None else None
            if found is not None:
                u.handles.append((found[0], found[1], np.array([found[2]])))
        if not depthwise:
            for c, s in enumerate(node.outputs[0].slots()):
                u = unit_of(g.group(s))
                if u is None:
                    continue
                u.writes.append((node.name, c))
                if layer is not None and not layer._alpha_depthwise:
                    idx = _handle_entries(layer, -1, c)
                    if idx is not None:
                        u.handles.append((node.name, "alpha", idx))

    # widths: channels of each space's producer tensor, frozen included
    width = {}
    for key, t in g.tensors.items():
        for s in t.slots():
            r = g.group(s)
            if r in by_root:
                width[by_root[r].space] = max(width.get(by_root[r].space, 0), t.channels)
    model_layers = layers_by_name(model)
    for u in units:
        u.width = width.get(u.space, 1)
        u.pruned = _alpha_pruned(model_layers, u.handles)
    _unit_macs(units, terms, len(g._uf.parent))
    units = [u for u in units if u.macs > 0]
    for k, u in enumerate(units):
        u.index = k
    _score(units, plain, g, importance, seed, bns)
    frozen = sorted({str(b) for reasons in g.frozen.values() for b in reasons})
    return PruningPlan(model, units, g, terms, dense_macs, frozen, importance)


def _unit_macs(units, terms, slots):
    touching = {}
    for t in terms:
        for r in set(t.roots_in.tolist()) | set(t.roots_out.tolist()):
            touching.setdefault(r, []).append(t)
    mask = np.zeros(slots, bool)
    for u in units:
        mask[u.root] = True
        u.macs = float(sum(t.macs - t.kept(mask) for t in touching.get(u.root, ())))
        mask[u.root] = False


def _score(units, plain, g, importance, seed, bns):
    layers = layers_by_name(plain)
    kernels = {}

    def kernel(name):
        if name not in kernels:
            kernels[name] = _kernel_of(layers[name])
        return kernels[name]

    def read_sq(u):
        return sum(float(np.sum(np.square(np.take(kernel(n)[0], c, axis=-2)))) for n, c in u.reads)

    def write_sq(u, handled_only):
        # writers with a filter alpha on it (a layer reading u, e.g. heads, is not one)
        readers = {n for n, _ in u.reads}
        names = {h[0] for h in u.handles if h[0] not in readers} if handled_only else None
        return sum(float(np.sum(np.square(np.take(kernel(n)[1], c, axis=-1))))
                   for n, c in u.writes if names is None or n in names)

    if callable(importance):
        for u in units:
            u.score = float(importance(u, plain))
        return
    if importance == "random":
        values = np.random.default_rng(seed).random(len(units))
        for u, v in zip(units, values):
            u.score = float(v)
        return
    if importance == "bn":
        for u in units:
            u.score = max(bns[u.root]) if u.root in bns else np.inf
        return
    for u in units:
        if importance == "alpha":
            u.score = math.sqrt(read_sq(u) + write_sq(u, handled_only=True))
        elif importance == "l2":
            u.score = math.sqrt(read_sq(u) + write_sq(u, handled_only=False))
        else:  # l1
            u.score = sum(float(np.sum(np.abs(np.take(kernel(n)[1], c, axis=-1))))
                          for n, c in u.writes) if u.writes else np.inf
    _normalize_by_space(units)


def _normalize_by_space(units):
    """Divides each finite score by the mean finite score of its channel space."""
    by_space = {}
    for u in units:
        if np.isfinite(u.score):
            by_space.setdefault(u.space, []).append(u.score)
    means = {s: float(np.mean(v)) for s, v in by_space.items()}
    for u in units:
        mean = means.get(u.space, 0.0)
        if np.isfinite(u.score) and mean > 0:
            u.score /= mean
