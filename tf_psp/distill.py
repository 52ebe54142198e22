"""Knowledge distillation (Hinton et al. 2015): train a pruned student on a teacher's soft outputs.

The loss of a batch is

    (1 - w) * task_loss(y, s) + w * T^2 * KL(softmax(t / T) || softmax(s / T))

with `t` and `s` the teacher's and the student's logits, `T` the temperature
and `w` the distillation weight (the `T^2` keeps the gradient scale of the
soft term independent of `T`). Models whose output layer ends in a softmax
give probabilities, not logits: their log-probabilities serve as logits
(`softmax(log(p) / T)` is the tempered distribution of `p`). Which one a model
gives is read from its output layer (`outputs_are_probabilities`), or set with
`from_logits`.

- `distillation_loss`: the soft term `T^2 * KL(...)` of one batch, in
  `keras.ops` (every backend).
- `Distiller(student, teacher)`: a `keras.Model` over the student's own
  layers whose `fit` minimizes the loss above; the student's weights are
  trained in place, and callbacks such as `tf_psp.callbacks.PruneToBudget`
  see the student's layers (the teacher is not part of the model).
"""

import keras
from keras import ops

from tf_psp import compat
from tf_psp.functional import check_model

DEFAULT_TEMPERATURE = 4.0
DEFAULT_WEIGHT = 0.5
_LOG_EPSILON = 1e-7  # probabilities are clipped before their log


def _activation_name(layer):
    """'softmax', 'sigmoid', ... for a layer or `keras.ops` node ending in an activation."""
    name = type(layer).__name__.lower()
    if name in ("softmax", "sigmoid"):  # keras.layers.Softmax, keras.ops.softmax/sigmoid nodes
        return name
    activation = getattr(layer, "activation", None)
    return getattr(activation, "__name__", None) if callable(activation) else None


def outputs_are_probabilities(model):
    """Whether `model`'s single output is a softmax (probabilities) rather than logits.

    Read from the layer producing the output (a nested model is followed to its
    own output layer): a `Softmax` layer, a `keras.ops.softmax` node, or a
    layer whose `activation` is `softmax` (`Dense(..., activation='softmax')`,
    `Activation('softmax')`), gives probabilities; any other layer is taken to
    give logits.

    Raises:
        ValueError: the output ends in a sigmoid (multi-label outputs: the
            softmax distillation term does not apply), or the model has more
            than one output.
    """
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) != 1:
        raise ValueError(
            f"model '{model.name}': distillation needs a single-output classifier, got "
            f"{len(outputs)} outputs.")
    layer = compat.producer(outputs[0])
    while isinstance(layer, keras.Model) and getattr(layer, "outputs", None):
        layer = compat.producer(layer.outputs[0])
    name = _activation_name(layer)
    if name == "sigmoid":
        raise ValueError(
            f"model '{model.name}': output layer '{layer.name}' ends in a sigmoid; "
            "distillation here matches softmax distributions over classes (pass "
            "from_logits=True if the outputs are in fact class logits).")
    return name == "softmax"


def _log_probabilities(outputs, from_logits, temperature):
    outputs = ops.cast(outputs, "float32")
    logits = outputs if from_logits else ops.log(ops.clip(outputs, _LOG_EPSILON, 1.0))
    return ops.log_softmax(logits / temperature, axis=-1)


def distillation_loss(teacher_outputs, student_outputs, temperature=DEFAULT_TEMPERATURE,
                      teacher_from_logits=True, student_from_logits=True, sample_weight=None):
    """`T^2 * KL(softmax(t / T) || softmax(s / T))`, averaged over the examples.

    Args:
        teacher_outputs, student_outputs: `[..., classes]` logits, or
            probabilities (then `*_from_logits=False`: their logs are used).
        temperature: `T` > 0; larger values soften both distributions.
        teacher_from_logits, student_from_logits: whether each output is logits.
        sample_weight: optional per-example weights `[...]` (the batch shape).

    Returns:
        A float32 scalar tensor (no gradient flows into `teacher_outputs`).
    """
    log_t = ops.stop_gradient(_log_probabilities(teacher_outputs, teacher_from_logits,
                                                 temperature))
    log_s = _log_probabilities(student_outputs, student_from_logits, temperature)
    kl = ops.sum(ops.exp(log_t) * (log_t - log_s), axis=-1)
    if sample_weight is not None:
        kl = kl * ops.cast(ops.reshape(sample_weight, ops.shape(kl)), "float32")
    return float(temperature) ** 2 * ops.mean(kl)


def _task_loss(loss, where):
    """A callable `(y, y_pred, sample_weight) -> scalar` for a Keras loss identifier."""
    if isinstance(loss, keras.losses.Loss):
        return loss
    fn = keras.losses.get(loss)
    if not callable(fn):
        raise ValueError(f"{where}: loss {loss!r} is not a Keras loss.")
    if isinstance(fn, keras.losses.Loss):
        return fn

    def mean_loss(y, y_pred, sample_weight=None):
        values = ops.cast(fn(y, y_pred), "float32")
        if sample_weight is not None:
            values = values * ops.cast(ops.reshape(sample_weight, ops.shape(values)), "float32")
        return ops.mean(values)

    return mean_loss


def check_distillation(temperature, distill_weight, where):
    """Raises a ValueError naming `where` unless temperature > 0 and distill_weight in [0, 1]."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not temperature > 0:
        raise ValueError(f"{where}: temperature must be a positive number, got {temperature!r}.")
    if isinstance(distill_weight, bool) or not isinstance(distill_weight, (int, float)) or \
            not 0 <= distill_weight <= 1:
        raise ValueError(f"{where}: distill_weight must be in [0, 1], got {distill_weight!r}.")


class Distiller(keras.Model):
    """Trains `student` on `(1 - w) * task_loss + w * T^2 * KL(teacher || student)`.

    A functional model over the student's own inputs, layers and outputs:
    `fit` trains the student's weights in place, `predict` gives the
    student's outputs, and callbacks see the student's layers, so
    `tf_psp.callbacks.PruneToBudget`, `PSPMonitor` and the sparse-training
    callbacks work unchanged. The teacher is called in inference mode on
    every training batch; it is not part of the model (its weights are
    neither trained nor saved) and is not modified. The student's own
    regularization losses (`student.losses`, e.g. an alpha regularizer) are
    added unweighted. Compile with the task loss (`loss=`), as the student
    would be; after training, use (or save) `student`.

        distiller = tf_psp.Distiller(psp_model, teacher=dense_model, temperature=4.0)
        distiller.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
            from_logits=True), metrics=["accuracy"])
        distiller.fit(x, y, epochs=8, callbacks=[tf_psp.PruneToBudget(keep_macs=0.3)])
        small = tf_psp.strip_and_shrink(psp_model)

    Args:
        student: the built functional or Sequential model to train.
        teacher: a `keras.Model` with the same input and number of classes
            (e.g. the dense model before pruning).
        temperature: `T` > 0 (Hinton et al. used 2-20; 4 is a common choice).
        distill_weight: `w` in [0, 1]; 0 is plain training, 1 pure distillation.
        from_logits: whether both models output logits; None (default) reads
            it from each model's output layer (`outputs_are_probabilities`).
        name: the model's name (default `'<student>_distiller'`).

    Attributes:
        student, teacher: the models given.
    """

    def __init__(self, student, teacher, temperature=DEFAULT_TEMPERATURE,
                 distill_weight=DEFAULT_WEIGHT, from_logits=None, name=None):
        check_model(student)
        if not isinstance(teacher, keras.Model):
            raise ValueError(f"Distiller: teacher must be a keras.Model, got "
                             f"{type(teacher).__name__}.")
        check_distillation(temperature, distill_weight, "Distiller")
        symbolic_teacher = compat.is_graph_model(teacher)  # a subclassed one has no outputs
        if from_logits is None:
            if not symbolic_teacher:
                raise ValueError(
                    f"Distiller: teacher '{teacher.name}' is a subclassed model, so whether it "
                    "outputs logits or probabilities cannot be read: pass from_logits.")
            student_logits = not outputs_are_probabilities(student)
            teacher_logits = not outputs_are_probabilities(teacher)
        else:
            outputs_are_probabilities(student)  # still checks the single output
            student_logits = teacher_logits = bool(from_logits)
        s_classes = student.outputs[0].shape[-1]
        t_classes = teacher.outputs[0].shape[-1] if symbolic_teacher else s_classes
        if s_classes != t_classes:
            raise ValueError(
                f"Distiller: student '{student.name}' outputs {s_classes} classes, teacher "
                f"'{teacher.name}' {t_classes}; they must predict the same classes.")
        super().__init__(inputs=compat.inputs_struct(student),
                         outputs=compat.outputs_struct(student),
                         name=name or f"{student.name}_distiller")
        # Untracked on purpose: the teacher's layers must not join this model's
        # layers (callbacks look layers up by name) nor its weights.
        object.__setattr__(self, "_student", student)
        object.__setattr__(self, "_teacher", teacher)
        self.temperature = float(temperature)
        self.distill_weight = float(distill_weight)
        self.student_from_logits = student_logits
        self.teacher_from_logits = teacher_logits
        self._task = None

    @property
    def student(self):
        return self._student

    @property
    def teacher(self):
        return self._teacher

    def save(self, filepath, *args, **kwargs):
        """Refused: a Distiller is a training wrapper; save `student` (or `save_weights`)."""
        raise ValueError(
            f"Distiller '{self.name}': save the student instead "
            f"(distiller.student.save({str(filepath)!r})); the distiller holds no weights of "
            "its own (ModelCheckpoint: save_weights_only=True saves the student's weights).")

    def compile(self, optimizer="rmsprop", loss=None, metrics=None, **kwargs):
        """Like `keras.Model.compile`; `loss` is the task loss (required)."""
        if loss is None:
            raise ValueError(
                f"Distiller '{self.name}': compile needs the task loss (loss=...), e.g. "
                "keras.losses.SparseCategoricalCrossentropy(from_logits=True).")
        self._task = _task_loss(loss, f"Distiller '{self.name}'")
        super().compile(optimizer=optimizer, loss=None, metrics=metrics, **kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The distillation loss of a batch, plus the student's regularization losses."""
        if y_pred is None:
            y_pred = self(x, training=training)
        if self._task is None:
            raise ValueError(f"Distiller '{self.name}': compile it with the task loss first.")
        total = ops.zeros((), "float32")
        if self.distill_weight < 1:
            task = ops.cast(self._task(y, y_pred, sample_weight=sample_weight), "float32")
            total = total + (1.0 - self.distill_weight) * task
        if self.distill_weight > 0:
            teacher_outputs = self._teacher(x, training=False)
            total = total + self.distill_weight * distillation_loss(
                teacher_outputs, y_pred, self.temperature, self.teacher_from_logits,
                self.student_from_logits, sample_weight)
        for extra in self.losses:
            total = total + ops.sum(ops.cast(extra, "float32"))
        return total
