"""prune(): the common job in one call, from a trained Keras model to a smaller one.

1. `parameterize(model, coupling='group', alpha_regularizer=None)`: one alpha
   per removable channel group (every pruned alpha is removable);
2. budget training: `epochs` of training with `callbacks.PruneToBudget`, which
   ranks the groups and decays only the alphas below the budget line;
3. BatchNorm statistics recalibrated on the training inputs (they lag behind
   the shrinking alphas; see the README's BatchNorm section);
4. `strip_and_shrink`: a plain Keras model within the MAC budget;
5. `fine_tune_epochs` of training of the small model, BatchNorm recalibrated
   again.

With `distill=True` or a `teacher`, steps 2 and 5 train through a
`distill.Distiller` (knowledge distillation from the teacher's soft outputs).
"""

import contextlib
import dataclasses
import time
from collections.abc import Callable

import keras
import numpy as np

from tf_psp import compat
from tf_psp.batchnorm import recalibrate_batchnorm
from tf_psp.callbacks import PruneToBudget
from tf_psp.convert import has_alphas, parameterize
from tf_psp.distill import DEFAULT_TEMPERATURE, DEFAULT_WEIGHT, Distiller, check_distillation
from tf_psp.functional import check_model, clone_with_weights
from tf_psp.latency import table_for_budget
from tf_psp.plan import budget_target
from tf_psp.profiling import profile as profile_model
from tf_psp.profiling import unknown_inputs
from tf_psp.shrink import strip, strip_and_shrink


@dataclasses.dataclass
class PruneReport:
    """What `prune` did.

    Attributes:
        keep_macs: the MAC budget (fraction of the dense MACs), or None.
        keep_latency: the latency budget (fraction of the dense latency), or None.
        kept_latency: the latency table's prediction for the result, as a
            fraction of the dense model's (None without a latency budget).
        dense_macs / shrunk_macs: MACs before and after; `kept_macs` their ratio.
        dense_params / shrunk_params: parameters before and after.
        epochs / fine_tune_epochs: as run.
        history / fine_tune_history: the `History.history` dicts of both phases.
        evaluation: `{"dense": ..., "pruned": ..., "fine_tuned": ...}` metric
            dicts on `validation_data` (empty without it).
        shrink_report: the `ShrinkReport` of `strip_and_shrink`.
        seconds: wall time.
        phase_seconds: `{phase: seconds}` of every phase, in order.
        distillation: `{"teacher", "temperature", "distill_weight"}` when
            the training distilled (the teacher's name), else None.
        input_shape: the input shape(s) the MACs were counted for (given, or
            read from `train_data` for inputs with None dimensions), else None.
    """

    keep_macs: float | None
    dense_macs: int
    shrunk_macs: int
    dense_params: int
    shrunk_params: int
    epochs: int
    fine_tune_epochs: int
    history: dict
    fine_tune_history: dict
    evaluation: dict
    shrink_report: object
    seconds: float
    keep_latency: float | None = None
    kept_latency: float | None = None
    phase_seconds: dict = dataclasses.field(default_factory=dict)
    distillation: dict | None = None
    input_shape: object = None

    @property
    def kept_macs(self):
        return self.shrunk_macs / self.dense_macs if self.dense_macs else 1.0

    def to_dict(self):
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "shrink_report"}
        data["kept_macs"] = self.kept_macs
        data["shrink_report"] = self.shrink_report.to_dict() if self.shrink_report else None
        return data

    def __str__(self):
        budget = (f"budget {self.keep_macs:.3f}" if self.keep_latency is None else
                  f"latency budget {self.keep_latency:.3f}, predicted latency "
                  f"{self.kept_latency:.3f}")
        lines = [f"prune: MACs {self.dense_macs:,} -> {self.shrunk_macs:,} (keeps "
                 f"{self.kept_macs:.3f}, {budget}); parameters "
                 f"{self.dense_params:,} -> {self.shrunk_params:,}; {self.epochs} budget "
                 f"epochs + {self.fine_tune_epochs} fine-tuning epochs, {self.seconds:.0f} s"]
        for stage, metrics in self.evaluation.items():
            text = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
            lines.append(f"  {stage:<10} {text}")
        if self.phase_seconds:
            lines.append("  time: " + ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds
                                                 in self.phase_seconds.items()))
        return "\n".join(lines)


class _Phases:
    """Times prune's phases; with `verbose`, says when each starts and how long it took."""

    def __init__(self, verbose):
        self.verbose = verbose
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name, what):
        if self.verbose:
            print(f"prune: {what}", flush=True)
        start = time.perf_counter()
        yield
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        if self.verbose:
            print(f"prune: {name} took {self.seconds[name]:.1f} s", flush=True)


def _fresh_optimizer(optimizer, model):
    """A new optimizer instance from an instance, a string, or the model's compile config."""
    if optimizer is None:
        config = model.get_compile_config() if getattr(model, "compiled", False) else None
        if config and config.get("optimizer") is not None:
            return keras.optimizers.deserialize(config["optimizer"])
        return keras.optimizers.SGD(0.01, momentum=0.9)
    if isinstance(optimizer, keras.optimizers.Optimizer):
        return optimizer.__class__.from_config(optimizer.get_config())
    return keras.optimizers.get(optimizer)


def _compile_args(model, loss, metrics):
    config = model.get_compile_config() if getattr(model, "compiled", False) else None
    if loss is None and config:
        # the loss object itself: a compile config of loss='mse' holds a function
        # reference that keras.losses.deserialize refuses
        loss = getattr(model, "loss", None)
        if loss is None and config.get("loss"):
            loss = keras.losses.deserialize(config["loss"])
        if metrics is None:
            metrics = config.get("metrics")
    if loss is None:
        raise ValueError(
            f"prune(model '{model.name}'): pass loss= (the model is not compiled, so its "
            "loss is unknown).")
    return loss, metrics


def _fit(model, data, epochs, batch_size, callbacks, verbose):
    if epochs <= 0:
        return {}
    if isinstance(data, tuple) and len(data) == 2:
        history = model.fit(data[0], data[1], epochs=epochs, batch_size=batch_size,
                            callbacks=callbacks, verbose=verbose)
    else:
        # a tf.data set shuffles itself (Keras warns when shuffle=True meets one); a
        # PyDataset's batch order is shuffled by fit
        history = model.fit(data, epochs=epochs, callbacks=callbacks, verbose=verbose,
                            shuffle=isinstance(data, keras.utils.PyDataset))
    return dict(history.history)


def _inputs(data):
    return data[0] if isinstance(data, tuple) else data


def _data_input_shape(data, model):
    """Shapes of one sample of `data`'s inputs (its first batch), in `model`'s input order.

    Raises:
        ValueError: the inputs cannot be read from `data` (naming the model's
            inputs with unknown dimensions and asking for `input_shape`).
    """
    try:
        x = _inputs(data)
        if not isinstance(x, (np.ndarray, list, dict)) and not hasattr(x, "shape"):
            batch = data[0] if isinstance(data, keras.utils.PyDataset) else next(iter(data))
            x = batch[0] if isinstance(batch, tuple) else batch
        shapes = [tuple(int(d) for d in np.shape(a)[1:]) for a in keras.tree.flatten(x)]
    except Exception as error:  # noqa: BLE001 - any unreadable data: ask for the shape
        raise ValueError(
            f"prune: model '{model.name}' has inputs with unknown dimensions "
            f"({', '.join(unknown_inputs(model))}) and their shape could not be read from "
            f"train_data ({type(error).__name__}: {error}); pass input_shape=...") from error
    if len(shapes) != len(compat.flat_inputs(model)):
        raise ValueError(
            f"prune: model '{model.name}' has {len(compat.flat_inputs(model))} inputs but "
            f"train_data gives {len(shapes)}; pass input_shape=... (one shape per input).")
    return shapes[0] if len(shapes) == 1 else shapes


def _evaluate(model, validation_data, batch_size):
    if validation_data is None:
        return None
    if isinstance(validation_data, tuple):
        values = model.evaluate(validation_data[0], validation_data[1], batch_size=batch_size,
                                verbose=0, return_dict=True)
    else:
        values = model.evaluate(validation_data, verbose=0, return_dict=True)
    return {k: float(v) for k, v in values.items()}


def prune(model: keras.Model, train_data, keep_macs: float | None = None, epochs: int = 10,
          fine_tune_epochs: int = 0, validation_data=None,
          importance: str | Callable = "alpha", optimizer=None, fine_tune_optimizer=None,
          loss=None, metrics=None, batch_size: int = 32, round_to: int = 1,
          min_keep: float = 0.1, recalibrate: bool = True, callbacks=(), verbose: int = 1,
          jit_compile="auto", keep_latency: float | None = None, latency_table=None,
          runtime: str = "tflite", threads: int = 1, teacher: keras.Model | None = None,
          distill: bool = False, temperature: float = DEFAULT_TEMPERATURE,
          distill_weight: float = DEFAULT_WEIGHT,
          from_logits: bool | None = None, input_shape=None,
          quantization: str | None = None) -> tuple[keras.Model, PruneReport]:
    """Prunes a trained model to a MAC or latency budget with PSP; returns the small plain model.

    `model` is not modified. See the module docstring for the steps.

    Args:
        model: a trained, built functional or Sequential Keras model (a PSP
            model is stripped first: its alphas are folded into the kernels).
        train_data: `(x, y)` arrays, or a `tf.data.Dataset` / `keras.utils.PyDataset`
            of `(x, y)` batches.
        keep_macs: fraction of the dense MACs the result keeps, in (0, 1]
            (default 0.5 when no `keep_latency` is given).
        epochs: budget-training epochs (the selected alphas reach 0 at half
            of them; the second half already trains the pruned network).
        fine_tune_epochs: epochs of training the shrunk model afterwards
            (default 0: the second half of `epochs` already trains the pruned
            network; in the budget experiment a separate phase with a fresh
            schedule at the full learning rate lowered accuracy; pass a
            `fine_tune_optimizer` with a lower rate when you add one).
        validation_data: like `train_data`; when given, the dense, pruned and
            fine-tuned models are evaluated on it (the report's `evaluation`).
        importance: the ranking score (see `tf_psp.plan`).
        optimizer: for budget training; None: the model's compiled optimizer
            (a fresh copy), else SGD(0.01, momentum=0.9).
        fine_tune_optimizer: for fine-tuning (None: like `optimizer`).
        loss, metrics: None: the model's compiled ones.
        batch_size: for array data.
        round_to: widths of the result are multiples of this (see
            `strip_and_shrink`); `'auto'`: the latency table's quantum.
        min_keep: never remove more than `1 - min_keep` of a channel space.
        recalibrate: recompute BatchNorm statistics on the training inputs
            after each phase.
        callbacks: more Keras callbacks for both phases.
        verbose: Keras `fit` verbosity; 1 also prints the budget progress.
        jit_compile: passed to `compile`.
        keep_latency: instead of `keep_macs`, the fraction of the dense
            model's latency on `runtime` (`'tflite'` or `'onnxruntime'`,
            `threads` threads, `quantization` None or `'int8'` for TFLite) the
            result keeps, predicted by `latency_table` (`tf_psp.latency_table`;
            None builds it, or reads it from the cache).
        teacher: distil from this model in budget training and fine-tuning
            (`tf_psp.distill.Distiller`); it is called in inference mode and
            not modified. Giving a teacher implies `distill=True`.
        distill: distil from a frozen copy of the dense input model (when no
            `teacher` is given). Loss: `(1 - distill_weight) * loss +
            distill_weight * temperature**2 * KL(teacher || student)` on
            temperature-softened softmax outputs; `callbacks` then see the
            `Distiller` (a model over the student's layers) as their model.
        temperature: the softening temperature, > 0.
        distill_weight: the weight of the distillation term, in [0, 1].
        from_logits: whether the models output logits; None reads it from
            their output layers (a softmax gives probabilities).
        input_shape: shape of one sample, batch dimension excluded (a list of
            shapes for several inputs): the MACs are counted for inputs of
            this shape (see `tf_psp.profile`). None: the model's own shapes,
            or, where an input has a None dimension besides the batch (a
            `(None, None)` token input), the shapes of the first batch of
            `train_data` (the report's `input_shape`).

    Returns:
        `(small_model, PruneReport)`: `small_model` is a compiled plain Keras
        model (no tf_psp layers) within the budget.
    """
    check_model(model)
    keep, _ = budget_target(keep_macs, keep_latency, "prune")
    keep_macs = keep if keep_latency is None else None
    for name, value in (("epochs", epochs), ("fine_tune_epochs", fine_tune_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"prune: {name} must be a non-negative integer, got {value!r}.")
    if epochs < 1:
        raise ValueError("prune: epochs must be at least 1 (the budget is reached by training).")
    distill = distill or teacher is not None
    if distill:
        check_distillation(temperature, distill_weight, "prune")
    start = time.time()
    phase = _Phases(verbose)
    loss, metrics = _compile_args(model, loss, metrics)
    evaluation = {}
    if validation_data is not None:
        with phase("dense evaluation", "evaluating the dense model on validation_data"):
            dense = keras.models.clone_model(model)
            dense.set_weights(model.get_weights())
            dense.compile(loss=loss, metrics=metrics, jit_compile=jit_compile)
            evaluation["dense"] = _evaluate(dense, validation_data, batch_size)
    plain = strip(model) if has_alphas(model) else model  # a PSP model: alphas folded in
    if input_shape is None and unknown_inputs(model):
        input_shape = _data_input_shape(train_data, model)
    latency_table, round_to = table_for_budget(plain, latency_table, keep_latency, round_to,
                                               runtime, threads, progress=bool(verbose),
                                               quantization=quantization)
    with phase("parameterize", "one alpha per removable channel group (parameterize)"):
        psp = parameterize(plain, coupling="group", alpha_regularizer=None)
    if distill and teacher is None:
        teacher = clone_with_weights(plain)  # a frozen copy: `model` is not touched
        teacher.trainable = False

    def trainer(student):  # the model `fit` trains: the student, or a Distiller over it
        if not distill:
            return student
        return Distiller(student, teacher, temperature=temperature,
                         distill_weight=distill_weight, from_logits=from_logits)

    budget_trainer = trainer(psp)
    budget_trainer.compile(optimizer=_fresh_optimizer(optimizer, model), loss=loss,
                           metrics=metrics, jit_compile=jit_compile)
    budget = PruneToBudget(keep_macs, importance=importance, min_keep=min_keep,
                           round_to=round_to, verbose=int(verbose > 0),
                           keep_latency=keep_latency, latency_table=latency_table,
                           input_shape=input_shape)
    with phase("budget training", f"budget training, {epochs} epoch(s) (the first step "
               "builds the training graph)"):
        history = _fit(budget_trainer, train_data, epochs, batch_size, [budget, *callbacks],
                       verbose)
    if recalibrate:
        with phase("BatchNorm recalibration", "recalibrating BatchNorm statistics on the "
                   "training inputs"):
            psp = recalibrate_batchnorm(psp, _inputs(train_data), batch_size=batch_size)
    with phase("shrinking", "removing the pruned channels (strip_and_shrink)"):
        small, shrink_report = strip_and_shrink(psp, round_to=round_to, return_report=True)
    small.compile(optimizer=_fresh_optimizer(fine_tune_optimizer or optimizer, model),
                  loss=loss, metrics=metrics, jit_compile=jit_compile)
    if validation_data is not None:
        with phase("pruned evaluation", "evaluating the shrunk model on validation_data"):
            evaluation["pruned"] = _evaluate(small, validation_data, batch_size)
    if fine_tune_epochs:
        fine_trainer = trainer(small)
        if fine_trainer is not small:
            fine_trainer.compile(
                optimizer=_fresh_optimizer(fine_tune_optimizer or optimizer, model),
                loss=loss, metrics=metrics, jit_compile=jit_compile)
        with phase("fine-tuning", f"fine-tuning the shrunk model, {fine_tune_epochs} "
                   "epoch(s)"):
            fine_history = _fit(fine_trainer, train_data, fine_tune_epochs, batch_size,
                                list(callbacks), verbose)
        if recalibrate:
            with phase("BatchNorm recalibration", "recalibrating the shrunk model's "
                       "BatchNorm statistics"):
                weights_model = recalibrate_batchnorm(small, _inputs(train_data),
                                                      batch_size=batch_size)
                small.set_weights(weights_model.get_weights())
        if validation_data is not None:
            with phase("fine-tuned evaluation", "evaluating the fine-tuned model"):
                evaluation["fine_tuned"] = _evaluate(small, validation_data, batch_size)
    else:
        fine_history = {}
    if small.optimizer is not None and not small.optimizer.built:
        # saved untrained, an optimizer without its slots makes load_model warn
        # ("Skipping variable loading for optimizer"): build them now
        small.optimizer.build(small.trainable_variables)
    dense_profile = profile_model(model, input_shape)
    small_profile = profile_model(small, input_shape)
    report = PruneReport(
        keep_macs=None if keep_macs is None else float(keep_macs),
        keep_latency=None if keep_latency is None else float(keep_latency),
        kept_latency=(latency_table.predict(small) / latency_table.predict_widths({})
                      if keep_latency is not None else None),
        dense_macs=dense_profile.total_macs,
        shrunk_macs=small_profile.total_macs, dense_params=dense_profile.total_params,
        shrunk_params=small_profile.total_params, epochs=epochs,
        fine_tune_epochs=fine_tune_epochs, history=history, fine_tune_history=fine_history,
        evaluation=evaluation, shrink_report=shrink_report, seconds=time.time() - start,
        phase_seconds=phase.seconds,
        distillation=({"teacher": teacher.name, "temperature": float(temperature),
                       "distill_weight": float(distill_weight)} if distill else None),
        input_shape=input_shape)
    if verbose:
        print(report)
    return small, report
