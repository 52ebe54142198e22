"""Keras callbacks: sparsity reports (`PSPMonitor`) and budget-driven pruning (`PruneToBudget`)."""

import math

import keras
import numpy as np

from tf_psp import compat, latency_targets
from tf_psp import plan as psp_plan
from tf_psp.profiling import profile as profile_model


class _EpochOutput:
    """What a callback reports at an epoch's end: its console line and its TensorBoard values.

    - The line is printed when the next epoch begins or training ends: at
      `on_epoch_end` the progress bar's last line is not finished yet (the
      progress bar logger runs last), and a line printed then is glued to it.
    - A callback adds its values to the epoch `logs`, which `TensorBoard`
      writes out; a `TensorBoard` that runs earlier in the list has already
      written them when the values arrive, so this callback writes them to it
      itself: the event files hold the same values in either order.
    """

    _earlier_tensorboards = ()
    _pending_line = None
    _fitting = False

    def _begin_output(self):
        self._fitting = True
        self._find_earlier_tensorboards()

    def _end_output(self):
        self._flush_line()
        self._fitting = False
        self._earlier_tensorboards = ()

    def _say_after_epoch(self, line):
        self._pending_line = line
        if not self._fitting:  # a hook called by hand, outside fit(): say it now
            self._flush_line()

    def _flush_line(self):
        if self._pending_line is not None:
            print(self._pending_line, flush=True)
            self._pending_line = None

    def _find_earlier_tensorboards(self):
        callbacks = compat.callback_list_of(self)
        earlier = []
        for callback in callbacks.callbacks if callbacks is not None else ():
            if callback is self:
                break
            if isinstance(callback, keras.callbacks.TensorBoard):
                earlier.append(callback)
        self._earlier_tensorboards = earlier

    def _to_tensorboards(self, values, epoch):
        for tensorboard in self._earlier_tensorboards:
            compat.write_tensorboard_scalars(tensorboard, values, epoch)


class PSPMonitor(_EpochOutput, keras.callbacks.Callback):
    """Adds the model's PSP sparsity and expected MAC reduction to the epoch logs.

    At each epoch end it writes into `logs` (so the values appear in the
    progress bar, in `History.history` and in a `TensorBoard` callback, listed
    before or after this one):

    - `psp_sparsity`: fraction of PSP structures with `|alpha| < epsilon`;
    - `psp_mac_reduction`: `total MACs / (total MACs - pruned MACs)`, the
      expected reduction if the pruned structures are removed (see
      `tf_psp.profile`);
    - `psp_pruned_macs` (with `log_pruned_macs=True`): the pruned MACs;
    - with `removable=True` (costs one `strip_and_shrink` per epoch):
      `psp_removable_mac_reduction`, the MAC reduction `strip_and_shrink`
      actually gives now, and `psp_removable_share`, the fraction of the
      zeroed MACs it removes (the rest stays as zeros: with per-layer alphas,
      a channel one reader prunes and another uses; see
      `tf_psp.profiling.Removability`).

    The per-layer MAC counts are computed once when training begins; each
    epoch only the alpha masks are re-read. A model without PSP layers logs
    sparsity 0.0 and reduction 1.0.

    - with `keep_macs` (a MAC budget, as for `PruneToBudget`):
      `psp_budget_kept_macs`, the fraction of the dense MACs
      `strip_and_shrink` would keep now, and `psp_budget_target`.

    Args:
        verbose: 1 prints a one-line summary per epoch, 0 is silent.
        log_pruned_macs: also log `psp_pruned_macs`.
        input_shape: passed to `tf_psp.profiling.profile`; needed only when the
            model's input shape has unknown spatial dimensions.
        removable: also log what `strip_and_shrink` removes (see above).
        keep_macs: log the budget progress against this target (None: off).

    Attributes:
        profile: the `tf_psp.profiling.ModelProfile` of the last epoch (None
            before training starts).
    """

    def __init__(self, verbose=0, log_pruned_macs=False, input_shape=None, removable=False,
                  keep_macs=None):
        super().__init__()
        if keep_macs is not None:
            psp_plan._check_fraction(keep_macs, "keep_macs")
        self.keep_macs = keep_macs
        self.verbose = verbose
        self.log_pruned_macs = log_pruned_macs
        self.input_shape = input_shape
        self.removable = bool(removable)
        self.profile = None

    def _profile(self):
        return profile_model(self.model, input_shape=self.input_shape, removable=self.removable)

    def on_train_begin(self, logs=None):
        self.profile = self._profile()
        self._begin_output()

    def on_epoch_begin(self, epoch, logs=None):
        self._flush_line()

    def on_train_end(self, logs=None):
        self._end_output()

    def on_epoch_end(self, epoch, logs=None):
        if self.profile is None:  # used outside fit(): profile lazily
            self.profile = self._profile()
        values = self.current_values()
        if logs is not None:
            logs.update(values)
        self._to_tensorboards(values, epoch)
        if self.verbose:
            p = self.profile
            self._say_after_epoch(
                f"Epoch {epoch + 1}: PSP sparsity {p.sparsity:.1%} "
                f"({p.structures_pruned}/{p.structures_total} structures), "
                f"pruned MACs {p.pruned_macs:,}/{p.total_macs:,}, "
                f"expected MAC reduction {p.mac_reduction:.2f}x"
                + (
                    f", removable {p.removability.mac_reduction:.2f}x "
                    f"({p.removability.removable_share:.0%} of zeroed MACs)"
                    if p.removability is not None else ""
                )
                + (
                    f", budget: keeps {self._budget_kept:.3f} of the MACs "
                    f"(target {self.keep_macs:.3f})" if self.keep_macs is not None else ""
                )
            )

    def current_values(self):
        """Re-reads the alpha masks; returns the dict of values logged per epoch."""
        self.profile.refresh()
        values = {
            "psp_sparsity": float(self.profile.sparsity),
            "psp_mac_reduction": float(self.profile.mac_reduction),
        }
        if self.log_pruned_macs:
            values["psp_pruned_macs"] = float(self.profile.pruned_macs)
        r = self.profile.removability
        if r is not None:
            values["psp_removable_mac_reduction"] = float(r.mac_reduction)
            values["psp_removable_share"] = float(r.removable_share)
        if self.keep_macs is not None:
            self._budget_kept = psp_plan.pruning_plan(
                self.model, input_shape=self.input_shape).kept_fraction()
            values["psp_budget_kept_macs"] = float(self._budget_kept)
            values["psp_budget_target"] = float(self.keep_macs)
        return values


class PruneToBudget(_EpochOutput, keras.callbacks.Callback):
    """Budget-driven PSP: a growing decay on the alphas of the groups below the budget line.

    While a PSP model trains, the channel groups are ranked with a
    `tf_psp.plan.PruningPlan` (`importance`), and the lowest-scoring ones whose
    removal meets `keep_macs` are *selected*. After every training step only
    the selected alphas are multiplied by a factor below 1; all other alphas
    train freely (use `alpha_regularizer=None` when parameterizing). At
    progress `p` of training (steps done / all steps) the selected alphas have
    been shrunk by `final_shrink ** ((p / decay_until) ** power)` in all:

    - `power=3` keeps the early decay gentle (shrunk by ~5 % at a tenth of
      the ramp), so the network can move work away from the selected
      channels and the ranking, recomputed at every epoch start while
      `p < reselect_until`, can still change (Selective Weight Decay, GReg);
    - by `p = decay_until` the selected alphas are `final_shrink` (1e-3) of
      their value, below any sensible epsilon; from then on they are held at
      exactly 0, so the rest of training fine-tunes the pruned network;
    - at the end of training they are 0, and the budget is met by
      construction (a final plan check zeroes more groups if alphas that were
      pruned at selection time grew back).

    The schedule is defined by the fraction of training, not by step counts
    or a decay strength, so the defaults carry over between models and
    schedule lengths. `decay_until=0.5` (half the run decays, half trains
    the pruned network) was chosen on a validation split against 0.8 and 0.3
    (examples/README.md, budget experiment). The callback logs `psp_budget_kept_macs` (the fraction
    of the dense MACs `strip_and_shrink` keeps at the epoch end; the
    selected groups count once their alphas fall below epsilon) and
    `psp_budget_target`.

    With `keep_latency` instead of `keep_macs`, the budget is a fraction of
    the dense model's latency predicted by `latency_table` (see
    `tf_psp.latency_table`; built at the start of training when None), the
    groups are taken by importance lost per latency saved, and the callback
    also logs `psp_budget_kept_latency`.

    Args:
        keep_macs: fraction of the dense MACs the shrunk model keeps, in (0, 1].
        importance: ranking score (see `tf_psp.plan`), default `'alpha'`.
        min_keep: never select more than `1 - min_keep` of a channel space.
        round_to: the `round_to` you will pass to `strip_and_shrink`; `'auto'`:
            the latency table's quantum.
        reselect_until: re-rank at epoch starts while progress is below this.
        decay_until: progress at which the selected alphas reach
            `final_shrink` and are then held at 0.
        final_shrink: total shrink factor reached at `decay_until`.
        power: shape of the ramp (larger: gentler start).
        verbose: 1 prints one line per selection and per epoch.
        keep_latency: a latency budget instead of `keep_macs`, in (0, 1].
        latency_table: the model's `tf_psp.LatencyTable`.
        runtime, threads, quantization: of the table built when `latency_table`
            is None (`'tflite'` float32 or `'int8'`, or `'onnxruntime'`).
        input_shape: shape of one sample (a list for several inputs), batch
            excluded, for models with None dimensions (see `tf_psp.profile`).

    Attributes:
        selected: unit indices of the current selection (in `plan.units`).
        plan: the `PruningPlan` of the last selection.
    """

    def __init__(self, keep_macs=None, importance="alpha", min_keep=0.1, round_to=1,
                 reselect_until=0.5, decay_until=0.5, final_shrink=1e-3, power=3.0,
                 verbose=0, keep_latency=None, latency_table=None, runtime="tflite",
                 threads=1, input_shape=None, quantization=None):
        super().__init__()
        latency_targets.target(runtime, threads, quantization)  # a bad one fails here
        if (keep_macs is None) == (keep_latency is None):
            raise ValueError("PruneToBudget: pass exactly one of keep_macs and keep_latency.")
        if keep_macs is not None:
            psp_plan._check_fraction(keep_macs, "keep_macs")
        else:
            psp_plan._check_fraction(keep_latency, "keep_latency")
        if round_to == "auto" and keep_latency is None and latency_table is None:
            raise ValueError("PruneToBudget: round_to='auto' needs a latency budget or table.")
        for name, value in (("reselect_until", reselect_until), ("decay_until", decay_until),
                            ("final_shrink", final_shrink)):
            if not 0 < float(value) <= 1:
                raise ValueError(f"PruneToBudget: {name} must be in (0, 1], got {value!r}.")
        if not float(power) > 0:
            raise ValueError(f"PruneToBudget: power must be positive, got {power!r}.")
        self.keep_macs = None if keep_macs is None else float(keep_macs)
        self.keep_latency = None if keep_latency is None else float(keep_latency)
        self.latency_table = latency_table
        self.runtime, self.threads, self.quantization = runtime, threads, quantization
        self.input_shape = input_shape
        self.importance = importance
        self.min_keep = min_keep
        self.round_to = round_to
        self.reselect_until = float(reselect_until)
        self.decay_until = float(decay_until)
        self.final_shrink = float(final_shrink)
        self.power = float(power)
        self.verbose = verbose
        self.plan = None
        self.selected = []
        self._masks = []
        self._scale_function = None
        self._step = 0
        self._total = None

    # --- schedule ---------------------------------------------------------------
    def log_shrink(self, progress):
        """Natural log of the total shrink the selected alphas have had at `progress`."""
        ramp = min(max(progress, 0.0) / self.decay_until, 1.0)
        return math.log(self.final_shrink) * ramp ** self.power

    def _progress(self, step):
        return step / self._total if self._total else 0.0

    # --- selection --------------------------------------------------------------
    @property
    def _target(self):
        return self.keep_macs if self.keep_macs is not None else self.keep_latency

    def _select_from(self, plan):
        return plan.select(self.keep_macs, min_keep=self.min_keep, round_to=self.round_to,
                           keep_latency=self.keep_latency,
                           table=self.latency_table if self.keep_latency is not None else None)

    def _select(self):
        self.plan = psp_plan.pruning_plan(self.model, importance=self.importance,
                                          input_shape=self.input_shape)
        self.selected = self._select_from(self.plan)
        layers = psp_plan.layers_by_name(self.model)
        masks = {}
        for i in self.selected:
            for name, key, idx in self.plan.units[i].handles:
                variable = psp_plan.alpha_variable(layers[name], key)
                if id(variable) not in masks:
                    masks[id(variable)] = (variable, np.zeros(int(np.prod(variable.shape)), bool))
                masks[id(variable)][1][idx] = True
        self._masks = [(v, m.reshape(tuple(v.shape))) for v, m in masks.values()]
        self._scale_function = None  # the masks changed
        if self.verbose:
            kept = self.plan.kept_fraction(self.selected, self.round_to)
            print(f"PruneToBudget: selected {len(self.selected)} of {len(self.plan.units)} "
                  f"channel groups (shrunk model keeps {kept:.3f} of the MACs, "
                  f"target {self._target:.3f})")

    def _scale(self, factor):
        if not self._masks:
            return
        compat.sync_training_state(self.model)
        if keras.backend.backend() != "tensorflow":
            for variable, mask in self._masks:
                variable.assign(variable.value * np.where(mask, factor, 1.0).astype("float32"))
            return
        if self._scale_function is None:
            # one graph call per step instead of two eager ops per masked variable
            # (a MobileNetV2 has ~100 of them: several ms per step)
            import tensorflow as tf

            masks = [(v, tf.constant(m)) for v, m in self._masks]

            @tf.function(jit_compile=False, autograph=False)
            def scale(factor):
                for variable, mask in masks:
                    variable.assign(variable * tf.where(mask, factor, 1.0))

            self._scale_function = scale
        self._scale_function(np.float32(factor))

    # --- Keras hooks ------------------------------------------------------------
    def on_train_begin(self, logs=None):
        epochs, steps = self.params.get("epochs"), self.params.get("steps")
        self._total = epochs * steps if epochs and steps else None
        self._step = 0
        self._begin_output()
        from tf_psp.latency import table_for_budget

        self.latency_table, self.round_to = table_for_budget(
            self.model, self.latency_table, self.keep_latency, self.round_to, self.runtime,
            self.threads, quantization=self.quantization)
        self._select()

    def on_epoch_begin(self, epoch, logs=None):
        self._flush_line()
        if self.params.get("steps"):  # also right when fit resumes (BackupAndRestore)
            self._step = epoch * self.params["steps"]
        if self._total is None and epoch == 1:  # unknown length: learnt from epoch 1
            self._total = self._step * self.params.get("epochs", 1)
        if epoch and self._progress(self._step) < self.reselect_until:
            self._select()

    def on_train_batch_end(self, batch, logs=None):
        before = self._progress(self._step)
        self._step += 1
        after = self._progress(self._step)
        if self._total is None:
            return  # first epoch of a data set of unknown length: no decay yet
        if after >= self.decay_until:
            self._scale(0.0)
        else:
            self._scale(math.exp(self.log_shrink(after) - self.log_shrink(before)))

    def on_epoch_end(self, epoch, logs=None):
        plan = psp_plan.pruning_plan(self.model, input_shape=self.input_shape)
        kept = plan.kept_fraction(round_to=self.round_to)
        latency = None
        if self.keep_latency is not None:
            latency = (plan.kept_latency((), self.latency_table, self.round_to)
                       / self.latency_table.predict_widths({}))
        values = {"psp_budget_kept_macs": float(kept), "psp_budget_target": self._target}
        if latency is not None:
            values["psp_budget_kept_latency"] = float(latency)
        if logs is not None:
            logs.update(values)
        self._to_tensorboards(values, epoch)
        if self.verbose:
            what = (f"{kept:.3f} of the MACs" if latency is None
                    else f"{latency:.3f} of the latency ({kept:.3f} of the MACs)")
            self._say_after_epoch(f"Epoch {epoch + 1}: budget: shrunk model keeps {what} "
                                  f"(target {self._target:.3f})")

    def on_train_end(self, logs=None):
        self._end_output()
        self._scale(0.0)
        final = psp_plan.pruning_plan(self.model, importance=self.importance,
                                      input_shape=self.input_shape)
        extra = self._select_from(final)
        if extra:
            psp_plan.zero_alphas(self.model, [h for i in extra for h in final.units[i].handles])
