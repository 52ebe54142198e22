"""parameterize(): turn an existing Keras model into a PSP model."""

import dataclasses
from collections.abc import Callable, Iterable

import keras
import numpy as np

from tf_psp import compat, coupling, inline, regularizers, structures
from tf_psp import layers as psp_layers
from tf_psp.functional import check_model, clone_layer, fresh_inputs, reuses, walk_layers
from tf_psp.group_alphas import has_alphas, is_group_alphas  # noqa: F401 (re-export)
from tf_psp.macs import layer_macs


@dataclasses.dataclass
class ConversionReport:
    """What `parameterize` converted and what it left alone.

    Attributes:
        converted: names of layers replaced by their PSP twin (with
            `coupling='group'`: of the layers whose inputs the group alphas scale).
        skipped: `(name, class, reason)` for layers with weights that were not
            converted (unsupported type, or not selected).
        coupling: the `coupling` argument of `parameterize`.
    """

    converted: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)
    coupling: str = "layer"

    def __str__(self):
        if self.coupling == "group":
            lines = [f"parameterize: group alphas on the inputs of {len(self.converted)} layers"]
        else:
            lines = [f"parameterize: {len(self.converted)} layers converted to PSP"]
        for name, cls, reason in self.skipped:
            lines.append(f"  kept layer '{name}' ({cls}) as is: {reason}")
        return "\n".join(lines)


def parameterize(
    model: keras.Model,
    structure: str | Callable = "channel",
    layers: Iterable[str] | Callable | None = None,
    epsilon: float = psp_layers.DEFAULT_EPSILON,
    return_report: bool = False,
    coupling: str = "layer",
    cost: str | None = None,
    latency_table=None,
    **psp_kwargs,
) -> keras.Model | tuple[keras.Model, "ConversionReport"]:
    """Returns a copy of `model` whose prunable layers are PSP layers.

    Conv1D/2D/3D, Conv2DTranspose, Dense, DepthwiseConv2D and SeparableConv2D (exact classes,
    not subclasses) become their PSP twins with the same weights and
    `alpha = 1` (by default), so the new model computes what `model` computes. `model`
    itself is never changed. Nested sub-models are converted recursively.
    Composite layers (a layer whose `call` runs its own sublayers) are opened
    first where `tf_psp.inline` can trace them, so their sublayers are
    converted too; the result is then one flat functional model.

    Args:
        model: a built Sequential or functional Keras model.
        structure: PSP structure for every converted layer (`'channel'`,
            `'filter'`, `'column'` or `'layer'`), or a callable
            `layer -> structure` to choose per layer.
        layers: which layers to convert: None (all supported), an iterable of
            layer names, or a predicate `layer -> bool`.
        epsilon: pruning threshold of the new layers.
        return_report: also return a `ConversionReport`.
        coupling: `'layer'` (the paper's PSP: every converted layer owns its
            alphas) or `'group'`: one alpha per removable channel of each
            dependency group, shared by every Conv/Dense/SeparableConv that
            reads it (see `tf_psp.coupling`), so every pruned channel can be
            removed by `strip_and_shrink`. With `'group'`, `structure` must be
            `'channel'`, `layers` must be None, the layers stay plain Keras
            layers, one `PSPGroupAlphas` layer holds the alphas, and a
            Sequential model comes back as a functional one, with nested
            models inlined into one flat graph (so their channels share groups
            with the outer model's).
        cost: None, or `'macs'`: weight each alpha's regularizer by the MACs
            its structure costs, divided by the mean over all alphas (so the
            strength keeps its meaning); training then removes expensive
            structures first. Needs a `WeightDecay` or `L1` regularizer.
            `'latency'` (with `coupling='group'`): weight by the latency a
            channel saves on a runtime instead (`PruningPlan.latency_savings`
            of `latency_table`, which is built for TFLite with 1 thread when
            None).
        latency_table: the `tf_psp.LatencyTable` of `model` for `cost='latency'`.
        **psp_kwargs: further PSP layer arguments (`alpha_regularizer`,
            `alpha_constraint`, `straight_through`, `alpha_initializer`; alphas
            start at the initializer's value, so a non-default one changes
            what the model computes).

    Returns:
        The PSP model, or `(model, report)` with `return_report=True`.

    Raises:
        ValueError: the model is not a built Sequential/functional model, a
            name in `layers` does not exist, or an argument is invalid.
    """
    check_model(model)
    if not callable(structure):
        structures.validate_structure(structure)
    try:
        psp_layers.validate_epsilon(epsilon, "(every converted layer)")
    except ValueError:
        raise ValueError(
            f"parameterize(model '{model.name}'): epsilon must be a positive "
            f"finite threshold, got {epsilon!r}."
        ) from None
    unknown = set(psp_kwargs) - set(psp_layers.PSP_CONFIG_KEYS)
    if unknown:
        raise TypeError(f"parameterize: unknown PSP arguments {sorted(unknown)}.")
    if coupling not in COUPLINGS:
        raise ValueError(
            f"parameterize: coupling must be one of {COUPLINGS}, got {coupling!r}."
        )
    if cost not in (None, "macs", "latency"):
        raise ValueError(
            f"parameterize: cost must be None, 'macs' or 'latency', got {cost!r}.")
    if cost == "latency" and coupling != "group":
        raise ValueError(
            "parameterize: cost='latency' weights the alphas of coupled channel groups; "
            "use it with coupling='group'.")
    if cost == "latency":
        return _parameterize_latency(model, structure, layers, epsilon, return_report,
                                     latency_table, psp_kwargs)
    if coupling == "group":
        return _parameterize_groups(
            model, structure, layers, epsilon, return_report, cost, psp_kwargs
        )
    if any(inline.is_composite(layer) for layer in compat.flatten_layers(model)):
        model = inline.inline_nested(model)  # so a composite's sublayers get alphas too
    select = _selector(model, layers)
    costs = _layer_cost_weights(model, structure, select) if cost else None
    report = ConversionReport()
    originals = {}

    def clone_function(layer):
        if reuses(layer):
            return layer  # a Lambda (its function cannot round-trip a config) or an op node
        twin = psp_layers.PSP_TWINS.get(type(layer))
        if twin is not None and select(layer):
            chosen = structure(layer) if callable(structure) else structure
            structures.validate_structure(chosen, layer.name)
            config = layer.get_config()
            config.pop("build_config", None)
            config.update(psp_kwargs, structure=chosen, epsilon=epsilon)
            if costs is not None and layer.name in costs:
                config["alpha_regularizer"] = _weighted_regularizer(
                    psp_kwargs, costs[layer.name]
                )
            new = twin.from_config(config)
            report.converted.append(layer.name)
        else:
            if layer.weights and not psp_layers.is_psp_layer(layer):
                reason = (
                    "not selected" if twin is not None
                    else f"no PSP twin for {type(layer).__name__}"
                )
                report.skipped.append((layer.name, type(layer).__name__, reason))
            new = clone_layer(layer)
        originals[id(new)] = layer
        return new

    new_model = keras.models.clone_model(
        model, clone_function=clone_function, recursive=True, input_tensors=fresh_inputs(model)
    )
    _copy_weights(new_model, originals)
    if return_report:
        return new_model, report
    return new_model


COUPLINGS = ("layer", "group")


def _parameterize_groups(model, structure, layers, epsilon, return_report, cost, psp_kwargs):
    if structure != "channel" or layers is not None:
        raise ValueError(
            "parameterize(coupling='group') puts one alpha on each channel a "
            "layer reads; it takes structure='channel' and layers=None."
        )
    bad = set(psp_kwargs) - set(coupling.GROUP_KWARGS)
    if bad:
        raise TypeError(f"parameterize(coupling='group'): unsupported arguments {sorted(bad)}.")
    new_model, plan = coupling.parameterize_groups(model, epsilon, cost=cost, **psp_kwargs)
    if not return_report:
        return new_model
    report = ConversionReport(converted=sorted(set(plan.readers) | set(plan.twins)),
                              coupling="group")
    for layer in walk_layers(model):
        if type(layer) in psp_layers.PSP_TWINS and layer.name not in plan.readers:
            report.skipped.append(
                (layer.name, type(layer).__name__, "reads only frozen channels")
            )
    return new_model, report


def _parameterize_latency(model, structure, layers, epsilon, return_report, table,
                          psp_kwargs):
    """Group PSP whose alpha regularizer weights are the latency each channel saves."""
    from tf_psp.latency import latency_table
    from tf_psp.plan import pruning_plan

    first = _parameterize_groups(model, structure, layers, epsilon, False, None, psp_kwargs)
    if table is None:
        table = latency_table(model)
    plan = pruning_plan(first)
    savings = plan.latency_savings(table)
    gate = next(layer for layer in compat.flatten_layers(first) if is_group_alphas(layer))
    weights = [np.full(size, np.nan) for size in gate.group_sizes]
    for u in plan.units:
        for name, key, idx in u.handles:
            if name == gate.name:
                weights[key][np.asarray(idx, int)] = savings.get(u.index, np.nan)
    known = np.concatenate([w[np.isfinite(w)] for w in weights])
    mean = float(known.mean()) if known.size and known.mean() > 0 else 1.0
    weights = [[float(v / mean) if np.isfinite(v) else 1.0 for v in w] for w in weights]
    psp_kwargs = dict(psp_kwargs)
    if "alpha_regularizer" not in psp_kwargs:
        psp_kwargs["alpha_regularizer"] = regularizers.default_alpha_regularizer()
    new_model, group_plan = coupling.parameterize_groups(model, epsilon, cost="macs",
                                                         cost_weights=weights, **psp_kwargs)
    if not return_report:
        return new_model
    return new_model, ConversionReport(converted=sorted(group_plan.readers), coupling="group")


def _layer_cost_weights(model, structure, select):
    """Per convertible layer name: its MACs per structure / the mean over all structures."""
    per_structure = {}
    macs = layer_macs(model)
    for layer in walk_layers(model):
        layer_cost = macs.get(layer.name, 0)
        twin = psp_layers.PSP_TWINS.get(type(layer))
        if twin is None or not select(layer) or not layer_cost:
            continue
        chosen = structure(layer) if callable(structure) else structure
        depthwise = isinstance(layer, (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D))
        kernel = layer.kernel
        if isinstance(layer, keras.layers.SeparableConv2D):
            depthwise = chosen in ("channel", "column")
            kernel = layer.depthwise_kernel if depthwise else layer.pointwise_kernel
        shape = tuple(kernel.shape)
        if getattr(twin, "_alpha_transposed", False):  # [.., out, in]
            shape = shape[:-2] + (shape[-1], shape[-2])
        count = int(np.prod(structures.alpha_shape(chosen, shape, depthwise)))
        per_structure[layer.name] = (layer_cost / count, count)
    total = sum(c for _, c in per_structure.values())
    mean = sum(m * c for m, c in per_structure.values()) / total if total else 1.0
    return {name: [m / mean] * c for name, (m, c) in per_structure.items()}


def _weighted_regularizer(psp_kwargs, weights):
    regularizer = psp_kwargs.get("alpha_regularizer", psp_layers._DEFAULT)
    if regularizer is psp_layers._DEFAULT:
        regularizer = regularizers.default_alpha_regularizer()
    return regularizers.with_weights(keras.regularizers.get(regularizer), weights)


def _selector(model, layers):
    if layers is None:
        return lambda layer: True
    if callable(layers):
        return layers
    if isinstance(layers, str):
        layers = [layers]
    names = set(layers)
    present = {layer.name for layer in walk_layers(model)}
    missing = sorted(names - present)
    if missing:
        raise ValueError(
            f"parameterize: model '{model.name}' has no layers named {missing}."
        )
    return lambda layer: layer.name in names


def _copy_weights(new_model, originals):
    for new in walk_layers(new_model):
        old = originals.get(id(new))
        if old is None or old is new or isinstance(new, keras.Model):
            continue
        if psp_layers.is_psp_layer(new) and not psp_layers.is_psp_layer(old):
            # kernel and bias; alpha keeps its `alpha_initializer` value (default 1)
            for variable, value in zip(new.weights, old.get_weights()):
                variable.assign(value)
        else:
            new.set_weights(old.get_weights())
