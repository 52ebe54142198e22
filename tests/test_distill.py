"""Knowledge distillation: the loss against numpy, the Distiller with PruneToBudget, prune()."""

import keras
import numpy as np
import pytest

import tf_psp
from tf_psp import plan as psp_plan
from tf_psp.distill import Distiller, distillation_loss, outputs_are_probabilities

CLASSES = 4


def _classifier(seed, softmax=False, l2=0.0, name=None):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c1",
                            kernel_regularizer=keras.regularizers.L2(l2) if l2 else None)(inputs)
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="c2")(h)
    h = keras.layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = keras.layers.Dense(CLASSES, activation="softmax" if softmax else None,
                                 name="head")(h)
    return keras.Model(inputs, outputs, name=name or f"net{seed}")


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 6, 6, 2)).astype("float32"), (np.arange(n) % CLASSES)


def _log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _numpy_loss(t_out, s_out, y, temperature, weight, t_logits, s_logits, extra=0.0):
    """(1 - w) * CE(y, s) + w * T^2 * KL(softmax(t/T) || softmax(s/T)) + extra, in float64."""
    t = np.asarray(t_out, np.float64)
    s = np.asarray(s_out, np.float64)
    t_z = t if t_logits else np.log(t)
    s_z = s if s_logits else np.log(s)
    ce = -np.mean(_log_softmax(s_z)[np.arange(len(y)), y])
    log_t, log_s = _log_softmax(t_z / temperature), _log_softmax(s_z / temperature)
    kl = np.mean(np.sum(np.exp(log_t) * (log_t - log_s), axis=-1))
    return (1 - weight) * ce + weight * temperature ** 2 * kl + extra


@pytest.mark.parametrize("teacher_softmax,student_softmax",
                         [(False, False), (True, False), (False, True)],
                         ids=["logits", "softmax_teacher", "softmax_student"])
def test_loss_matches_numpy(teacher_softmax, student_softmax):
    teacher = _classifier(1, softmax=teacher_softmax)
    student = _classifier(2, softmax=student_softmax, l2=0.01)
    assert outputs_are_probabilities(teacher) == teacher_softmax
    x, y = _data()
    d = Distiller(student, teacher, temperature=3.0, distill_weight=0.7)
    d.compile(optimizer=keras.optimizers.SGD(0.1),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=not student_softmax))
    t_out = keras.ops.convert_to_numpy(teacher(x))
    s_out = keras.ops.convert_to_numpy(student(x))
    l2 = 0.01 * np.sum(np.square(keras.ops.convert_to_numpy(student.get_layer("c1").kernel)))
    expected = _numpy_loss(t_out, s_out, y, 3.0, 0.7, not teacher_softmax, not student_softmax,
                           extra=l2)
    got = float(keras.ops.convert_to_numpy(d.compute_loss(x, y, d(x), training=False)))
    np.testing.assert_allclose(got, expected, rtol=2e-5)
    # The training step minimizes the same loss: one full batch reports it at the
    # weights before the update, and the update moves the student, not the teacher.
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    history = d.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
    np.testing.assert_allclose(history.history["loss"][0], expected, rtol=2e-5)
    assert not np.allclose(keras.ops.convert_to_numpy(student(x)), s_out)
    for before, after in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_soft_term_alone_and_string_loss():
    teacher, student = _classifier(1), _classifier(2)
    x, y = _data()
    t_out = keras.ops.convert_to_numpy(teacher(x))
    s_out = keras.ops.convert_to_numpy(student(x))
    soft = float(keras.ops.convert_to_numpy(distillation_loss(t_out, s_out, temperature=2.0)))
    np.testing.assert_allclose(soft, _numpy_loss(t_out, s_out, y, 2.0, 1.0, True, True),
                               rtol=2e-5)
    assert float(keras.ops.convert_to_numpy(distillation_loss(t_out, t_out, 2.0))) == \
        pytest.approx(0.0, abs=1e-6)
    # A loss given by name (a function, not a Loss object) is averaged like Keras does.
    d = Distiller(student, teacher, temperature=2.0, distill_weight=0.25, from_logits=True)
    d.compile(optimizer="sgd", loss=lambda a, b: keras.losses.sparse_categorical_crossentropy(
        a, b, from_logits=True))
    got = float(keras.ops.convert_to_numpy(d.compute_loss(x, y, d(x))))
    np.testing.assert_allclose(got, _numpy_loss(t_out, s_out, y, 2.0, 0.25, True, True),
                               rtol=2e-5)


def test_softmax_outputs_are_detected():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(CLASSES, name="z")(inputs)
    as_layer = keras.Model(inputs, keras.layers.Softmax()(h))
    as_op = keras.Model(inputs, keras.ops.softmax(h))
    as_activation = keras.Model(inputs, keras.layers.Activation("softmax")(h))
    nested = keras.Model(inputs, as_layer(inputs))
    logits = keras.Model(inputs, keras.layers.ReLU()(h))
    assert all(outputs_are_probabilities(m) for m in (as_layer, as_op, as_activation, nested))
    assert not outputs_are_probabilities(logits)
    with pytest.raises(ValueError, match="sigmoid"):
        outputs_are_probabilities(keras.Model(inputs, keras.ops.sigmoid(h)))
    with pytest.raises(ValueError, match="single-output classifier, got 2 outputs"):
        outputs_are_probabilities(keras.Model(inputs, [h, h]))


def test_bad_arguments_are_named():
    teacher, student = _classifier(1), _classifier(2)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        Distiller(student, teacher, temperature=0)
    with pytest.raises(ValueError, match=r"distill_weight must be in \[0, 1\]"):
        Distiller(student, teacher, distill_weight=1.5)
    other = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Flatten(),
                              keras.layers.Dense(CLASSES + 1)], name="wide")
    with pytest.raises(ValueError, match="'wide' 5"):
        Distiller(student, other)
    sigmoid = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Flatten(),
                                keras.layers.Dense(CLASSES, activation="sigmoid", name="out")],
                               name="multilabel")
    with pytest.raises(ValueError, match="'out' ends in a sigmoid"):
        Distiller(student, sigmoid)
    d = Distiller(student, teacher)
    with pytest.raises(ValueError, match="compile needs the task loss"):
        d.compile(optimizer="sgd")
    class Subclassed(keras.Model):
        def __init__(self, inner):
            super().__init__(name="subclassed")
            self.inner = inner

        def call(self, x):
            return self.inner(x)

    with pytest.raises(ValueError, match="'subclassed' is a subclassed model.*from_logits"):
        Distiller(student, Subclassed(teacher))
    x, y = _data(4)
    d_sub = Distiller(student, Subclassed(teacher), from_logits=True, distill_weight=1.0)
    d_sub.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    t_out, s_out = (keras.ops.convert_to_numpy(m(x)) for m in (teacher, student))
    np.testing.assert_allclose(
        float(keras.ops.convert_to_numpy(d_sub.compute_loss(x, y, d_sub(x)))),
        _numpy_loss(t_out, s_out, y, 4.0, 1.0, True, True), rtol=2e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"save the student instead \(distiller.student.save"):
        d.save("distiller.keras")


def test_prune_to_budget_callback_trains_the_student_through_a_distiller():
    teacher = _classifier(1)
    psp = tf_psp.parameterize(teacher, coupling="group", alpha_regularizer=None)
    d = Distiller(psp, teacher)
    # The callbacks see the student's layers and only them (not the teacher's).
    assert sorted(psp_plan.layers_by_name(d)) == sorted(psp_plan.layers_by_name(psp))
    assert len(psp_plan.pruning_plan(d).units) == len(psp_plan.pruning_plan(psp).units)
    assert {id(v) for v in d.trainable_variables} == {id(v) for v in psp.trainable_variables}
    d.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x, y = _data(32)
    teacher_weights = [w.copy() for w in teacher.get_weights()]
    d.fit(x, y, batch_size=8, epochs=2, verbose=0,
          callbacks=[tf_psp.PruneToBudget(keep_macs=0.5)])
    small = tf_psp.strip_and_shrink(psp)
    kept = tf_psp.profile(small).total_macs / tf_psp.profile(teacher).total_macs
    assert 0.4 <= kept <= 0.5
    for before, after in zip(teacher_weights, teacher.get_weights()):
        np.testing.assert_array_equal(before, after)


def _one_step_loss(model, x, y, **kwargs):
    _, report = tf_psp.prune(model, (x, y), keep_macs=0.5, epochs=1, batch_size=len(x),
                             loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                             optimizer=keras.optimizers.SGD(0.01), verbose=0, **kwargs)
    return report


def test_prune_distill_uses_a_frozen_copy_of_the_input_model():
    model = _classifier(3)
    x, y = _data(16)
    before = [w.copy() for w in model.get_weights()]
    s_out = keras.ops.convert_to_numpy(model(x))
    # One full-batch step: the loss is measured before any update, when the PSP
    # student still computes the dense model's function.
    plain_report = _one_step_loss(model, x, y)
    assert plain_report.distillation is None
    plain = plain_report.history["loss"][0]
    np.testing.assert_allclose(plain, _numpy_loss(s_out, s_out, y, 4.0, 0.0, True, True),
                               rtol=2e-5)
    # distill=True: the teacher is the dense model itself, so the soft term is 0.
    own = _one_step_loss(model, x, y, distill=True, distill_weight=0.5, fine_tune_epochs=1)
    np.testing.assert_allclose(own.history["loss"][0], 0.5 * plain, rtol=2e-5)
    assert np.isfinite(own.fine_tune_history["loss"][0])
    assert own.distillation == {"teacher": model.name, "temperature": 4.0,
                                "distill_weight": 0.5}
    assert own.to_dict()["distillation"]["distill_weight"] == 0.5
    # teacher=: that model's soft outputs.
    teacher = _classifier(4)
    t_out = keras.ops.convert_to_numpy(teacher(x))
    other = _one_step_loss(model, x, y, teacher=teacher, temperature=2.0, distill_weight=0.5)
    np.testing.assert_allclose(other.history["loss"][0],
                               _numpy_loss(t_out, s_out, y, 2.0, 0.5, True, True), rtol=2e-5)
    # Neither the input model nor the teacher was changed.
    for b, a in zip(before, model.get_weights()):
        np.testing.assert_array_equal(b, a)
    assert model.trainable and teacher.trainable
    with pytest.raises(ValueError, match="prune: temperature"):
        _one_step_loss(model, x, y, distill=True, temperature=-1.0)
