"""prune_to_budget(): zero the lowest-scoring channel groups until a MAC or latency budget is met.

The budget is a fraction of the model's dense MACs (or of its latency on a
runtime, predicted by its `tf_psp.latency_table`) that the model returned by
`strip_and_shrink` may keep. Which groups go is decided by a
`tf_psp.plan.PruningPlan` (importance scores, MACs saved per group, the
keep-one-channel and `round_to` rules of the shrink); the choice is then
checked on the pruned model's own channel graph, so every selected group is
one `strip_and_shrink` really removes.
"""

import dataclasses
from collections.abc import Callable

import keras

from tf_psp import graph as psp_graph
from tf_psp.convert import has_alphas, parameterize
from tf_psp.functional import check_model
from tf_psp.latency import LatencyTable, table_for_budget
from tf_psp.plan import budget_target, pruning_plan
from tf_psp.profiling import profile as profile_model
from tf_psp.shrink import _decide, strip, strip_and_shrink


@dataclasses.dataclass
class BudgetReport:
    """What `prune_to_budget` chose.

    Attributes:
        keep_macs: the target fraction of dense MACs (None for a latency budget).
        kept_macs: the fraction `strip_and_shrink(model, round_to)` keeps
            (measured on the shrunk model when `measured` is True, else the
            plan's exact prediction).
        dense_macs: MACs of the model at full width.
        units_selected: channel groups zeroed by this call.
        units_pruned_before: groups whose alphas were already below epsilon.
        units_total: prunable channel groups of the model.
        importance: the importance used; `round_to`, `min_keep`: as used
            (`round_to='auto'` resolved to the table's quantum).
        parameterized: the input was a plain model, parameterized first with
            `coupling='group'` (alphas 1, no alpha regularizer).
        measured: `kept_macs` was measured by shrinking.
        keep_latency: the target fraction of the dense latency, or None.
        kept_latency: the fraction of the dense latency the latency table
            predicts for the shrunk model (None without a table).
        runtime, threads, quantization: where the latency table was measured.
    """

    keep_macs: float | None
    kept_macs: float
    dense_macs: int
    units_selected: int
    units_pruned_before: int
    units_total: int
    importance: str
    round_to: int
    min_keep: float
    parameterized: bool
    measured: bool
    keep_latency: float | None = None
    kept_latency: float | None = None
    runtime: str | None = None
    threads: int | None = None
    quantization: str | None = None

    def to_dict(self):
        return dataclasses.asdict(self)

    def __str__(self):
        target = (f"target {self.keep_macs:.3f}" if self.keep_macs is not None
                  else f"latency target {self.keep_latency:.3f}")
        latency = ("" if self.kept_latency is None else
                   f", predicted latency {self.kept_latency:.3f} of dense ({self.runtime}"
                   f"{' ' + self.quantization if self.quantization else ''}, "
                   f"{self.threads} thread(s))")
        return (
            f"prune_to_budget: keeps {self.kept_macs:.3f} of {self.dense_macs:,} MACs "
            f"({target}){latency}; zeroed {self.units_selected} of "
            f"{self.units_total} channel groups ({self.units_pruned_before} were already "
            f"pruned), importance {self.importance!r}, min_keep {self.min_keep}, "
            f"round_to {self.round_to}"
        )


def prune_to_budget(model: keras.Model, keep_macs: float | None = None,
                    importance: str | Callable = "alpha", round_to: int | str = 1,
                    min_keep: float = 0.1, seed: int = 0, return_report: bool = False,
                    measure: bool = False, keep_latency: float | None = None,
                    runtime: str = "tflite", threads: int = 1,
                    latency_table: LatencyTable | None = None, input_shape=None,
                    quantization: str | None = None,
                    ) -> keras.Model | tuple[keras.Model, "BudgetReport"]:
    """A copy of `model` whose lowest-scoring channel groups have alpha 0, within a budget.

    The budget is either MACs or latency. With `keep_macs` (default 0.5),
    `strip_and_shrink(result, round_to=round_to)` keeps at most `keep_macs`
    of the dense MACs, and as close to it as one more channel group allows
    (typically within 1 %). With `keep_latency`, the shrunk model's latency
    on `runtime` with `threads` threads, predicted by the model's latency
    table (`tf_psp.latency_table`: measured once on this machine and cached
    on disk), is at most `keep_latency` of the dense model's; channel groups
    are then taken by importance lost per latency saved. The groups are
    ranked by `importance` (see `tf_psp.plan`); a group whose alphas are
    already below epsilon counts as removed. `model` is not modified.

    Args:
        model: a PSP model (per-layer alphas of any structure, or
            `coupling='group'`), or a plain functional/Sequential model, which
            is first parameterized with `coupling='group'` and no alpha
            regularizer (its function is unchanged).
        keep_macs: fraction of the dense MACs to keep, in (0, 1] (default 0.5
            when no `keep_latency` is given).
        importance: `'alpha'` (default), `'l1'`, `'l2'`, `'bn'`, `'random'` or a
            callable `(unit, plain_model) -> float`.
        round_to: the `round_to` you will pass to `strip_and_shrink`; widths are
            rounded here, so the shrink removes exactly what is zeroed.
            `'auto'`: the width step of the runtime's kernels, read from the
            latency table (16 on AVX-512 CPUs with XNNPACK); the report gives
            the value used.
        min_keep: never remove more than `1 - min_keep` of a channel space.
        seed: seed of `importance='random'`.
        return_report: also return a `BudgetReport`.
        measure: with `return_report`, shrink the result and count its MACs
            (else the plan's prediction, which equals it).
        keep_latency: fraction of the dense latency to keep, in (0, 1].
        runtime, threads: the runtime the latency budget is for: `'tflite'`
            (LiteRT/XNNPACK) or `'onnxruntime'` (CPU), with `threads` threads.
        latency_table: a table from `tf_psp.latency_table(model, ...)`; None
            builds it (or reads it from the cache) when a latency is needed.
        input_shape: shape of one sample, batch dimension excluded (a list of
            shapes for several inputs), as for `tf_psp.profile`: the MACs are
            counted for inputs of this shape. Needed when an input has a None
            dimension besides the batch (a BERT-like `(None, None)` token
            input); without it such a model is refused, naming the inputs.
        quantization: the number format the latency budget is for: None
            (float32) or `'int8'` (full-integer TFLite; `runtime='tflite'`).

    Returns:
        The pruned copy, or `(copy, report)` with `return_report=True`.

    Raises:
        ValueError: the budget cannot be reached (the message says how far
            pruning can go and why), or an argument is invalid.
    """
    check_model(model)
    keep, _ = budget_target(keep_macs, keep_latency, "prune_to_budget")
    keep_macs = keep if keep_latency is None else None
    if round_to != "auto" and (isinstance(round_to, bool) or not isinstance(round_to, int)
                               or round_to < 1):
        raise ValueError(f"round_to must be a positive integer or 'auto', got {round_to!r}.")
    if not isinstance(min_keep, (int, float)) or not 0 <= min_keep < 1:
        raise ValueError(f"min_keep must be in [0, 1), got {min_keep!r}.")
    table, round_to = table_for_budget(model, latency_table, keep_latency, round_to,
                                       runtime, threads, quantization=quantization)
    parameterized = not has_alphas(model)
    if parameterized:
        model = parameterize(model, coupling="group", alpha_regularizer=None)
    plan = pruning_plan(model, importance=importance, seed=seed, input_shape=input_shape)
    exclude = set()
    for _ in range(8):
        units = plan.select(keep_macs, min_keep=min_keep, round_to=round_to, exclude=exclude,
                            keep_latency=keep_latency,
                            table=table if keep_latency is not None else None)
        pruned = plan.apply(units)
        missing = _not_removed(plan, pruned, units)
        if not missing:
            break
        exclude |= missing  # zeroing them does not let the shrink remove them
    else:
        raise RuntimeError(
            f"prune_to_budget: model '{model.name}': the selected channel groups could "
            "not all be removed after 8 attempts; please report this model.")
    if not return_report:
        return pruned
    kept = plan.kept_fraction(units, round_to)
    if measure:
        shrunk = strip_and_shrink(pruned, round_to=round_to)
        kept = profile_model(shrunk, input_shape).total_macs / plan.dense_macs
    kept_latency = None
    if table is not None:
        kept_latency = plan.kept_latency(units, table, round_to) / table.predict_widths({})
    report = BudgetReport(
        keep_macs=None if keep_macs is None else float(keep_macs), kept_macs=float(kept),
        dense_macs=plan.dense_macs,
        units_selected=len(units), units_pruned_before=sum(u.pruned for u in plan.units),
        units_total=len(plan.units),
        importance=importance if isinstance(importance, str) else getattr(
            importance, "__name__", "callable"),
        round_to=round_to, min_keep=float(min_keep), parameterized=parameterized,
        measured=bool(measure),
        keep_latency=None if keep_latency is None else float(keep_latency),
        kept_latency=None if kept_latency is None else float(kept_latency),
        runtime=table.runtime if table is not None else None,
        threads=table.threads if table is not None else None,
        quantization=table.quantization if table is not None else None)
    return pruned, report


def _not_removed(plan, pruned, units):
    """Selected unit indices that `strip_and_shrink` of `pruned` would keep."""
    g = psp_graph.ChannelGraph(strip(pruned))
    removable = {root for root, (ok, _, _) in _decide(g).items() if ok}
    return {i for i in units if g.group(plan.units[i].root) not in removable}
