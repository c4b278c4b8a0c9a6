"""Inner validation in the trainer: what fit is fed, the inner predictions, threshold, calibration, early stopping.

The real MobileNetV2 at 32 px, alpha 0.35, on pdx_tf/testing/fake_records.py (12 patients, 2 folds: 6 training patients
a cell, of which one per class is an inner patient at --inner_fraction=0.34).
"""

import csv
import fractions
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf.testing import fake_records
from inner_validation_test import _platt_by_sklearn
from pdx_tf.errors import RunsError
from pdx_tf.training import cell_trainer, trainer
from pdx_tf.training.model import ModelConfig

SIZE = 32
NUM_PATIENTS = 12
OPT_IN_KEYS = {"threshold", "threshold_rule", "calibration", "inner_validation"}


@pytest.fixture(scope="module")
def records_dir(fake_records_dir):
  return fake_records_dir(num_patients=NUM_PATIENTS, slices_per_patient=3, augment_factor=4)


@pytest.fixture(name="tiny_config", scope="session")
def first_cell_config(tiny_config):
  """The shared tiny config training only cell r0f0 unless overridden."""
  return lambda records_dir, output_dir, **overrides: tiny_config(
      records_dir, output_dir, **{"cells": ("r0f0",), **overrides})


def _read_csv(path):
  with open(path) as handle:
    return list(csv.DictReader(handle))


def _label(patient_id):
  return int(int(patient_id[-3:]) % 2 == 0)  # fake_records: even patients are positive


def _documented_inner_draw(train_ids, fraction, seed=0, repeat=0, fold=0):
  """splits.py's documented recipe, rebuilt: per class, round(f x n) from the sorted IDs in the order of
  default_rng([seed, 0x1AAE, repeat, fold, class])."""
  inner = []
  for label in (0, 1):
    members = sorted(patient for patient in train_ids if _label(patient) == label)
    order = np.random.default_rng([seed, 0x1AAE, repeat, fold, label]).permutation(len(members))
    inner += [members[position] for position in order[:int(np.floor(fraction * len(members) + 0.5))]]
  return sorted(inner)


@pytest.fixture
def fed_to_fit(monkeypatch):
  """The patient of every training image that reaches Model.fit (identified by its pixels)."""
  identities = {}
  for index, patient_id in enumerate(fake_records.patient_ids(NUM_PATIENTS)):
    for slice_index in range(3):
      for augmentation_index in range(5):
        image = fake_records.fake_image(0, index, slice_index, augmentation_index, index % 2 == 0, SIZE)
        identities[image.tobytes()] = patient_id
  fed = []
  real_fit = keras.Model.fit

  def recording_fit(self, x=None, *args, **kwargs):
    def record(images):
      fed.extend(identities[np.asarray(image).astype(np.uint8).tobytes()] for image in images.numpy())
      return images

    def tap(images, labels):
      images = tf.py_function(record, [images], tf.float32)
      return tf.ensure_shape(images, [None, SIZE, SIZE, 3]), labels

    return real_fit(self, x.map(tap), *args, **kwargs)

  monkeypatch.setattr(keras.Model, "fit", recording_fit)
  return fed


def _youden_index(labels, probabilities, threshold):
  labels, predicted = np.asarray(labels).astype(bool), np.asarray(probabilities) >= threshold
  return (fractions.Fraction(int(predicted[labels].sum()), int(labels.sum()))
          - fractions.Fraction(int(predicted[~labels].sum()), int((~labels).sum())))


def test_inner_patients_are_held_out_of_fit_and_give_threshold_and_calibration(records_dir, tmp_path, fed_to_fit,
                                                                               tiny_config):
  config = tiny_config(records_dir, tmp_path / "R", inner_fraction=0.34, threshold="inner_youden",
                       calibration="platt")
  trainer.run_grid(config)
  root = tmp_path / "R"
  fold = json.loads((root / "splits.json").read_text())["repeats"][0]["folds"][0]
  train_ids, test_ids = fold["train"], fold["test"]
  cell = root / "cells" / "r00_f00"
  run = json.loads((cell / "run.json").read_text())
  inner_ids = run["inner_validation"]["patients"]
  # Splits as data: the inner patients are the documented draw over this cell's training patients only.
  assert inner_ids == _documented_inner_draw(train_ids, 0.34)
  assert set(inner_ids) < set(train_ids) and not set(inner_ids) & set(test_ids)
  assert sorted(_label(patient) for patient in inner_ids) == [0, 1], "stratified: one inner patient per class"
  assert set(fed_to_fit) == set(train_ids) - set(inner_ids), "fit must see exactly the non-inner training patients"
  # The inner patients' original slices are predicted by the final model and aggregated like the test patients.
  model = keras.models.load_model(cell / "model.keras")
  expected = []
  for patient_id in inner_ids:
    index = int(patient_id[-3:])
    images = np.stack([fake_records.fake_image(0, index, slice_index, 0, index % 2 == 0, SIZE)
                       for slice_index in range(3)]).astype(np.float32)
    expected.append(float(np.mean(model.predict(images, verbose=0))))  # topk_mean, k=3 of 3 slices: the mean
  probabilities = run["inner_validation"]["patient_probabilities"]
  np.testing.assert_allclose(probabilities, expected, atol=1e-5)
  inner_labels = [_label(patient) for patient in inner_ids]
  # The threshold: an inner probability with the largest Youden index (brute force over every inner score).
  assert run["threshold_rule"] == "inner_youden" and run["threshold"] in probabilities
  assert _youden_index(inner_labels, probabilities, run["threshold"]) == max(
      _youden_index(inner_labels, probabilities, score) for score in probabilities)
  # Platt on the inner patients, against scikit-learn; the held-out CSV gains the calibrated column.
  assert run["calibration"]["method"] == "platt"
  if np.ptp(np.log(np.divide(probabilities, np.subtract(1, probabilities)))) >= 1e-5:  # not float32 noise
    slope, intercept = _platt_by_sklearn(inner_labels, probabilities)
  else:  # a collapsed tiny model: the slope is not identifiable; Platt's smoothed targets' mean, as a logit
    slope, mean = 0.0, (1 / 3 + 2 / 3) / 2
    intercept = float(np.log(mean / (1 - mean)))
  assert run["calibration"]["slope"] == pytest.approx(slope, abs=1e-4)
  assert run["calibration"]["intercept"] == pytest.approx(intercept, abs=1e-4)
  rows = _read_csv(cell / "patient_predictions.csv")
  assert list(rows[0]) == ["patient_id", "label", "probability", "calibrated_probability"]
  assert [row["patient_id"] for row in rows] == test_ids
  for row in rows:
    p = min(max(float(row["probability"]), 1e-6), 1 - 1e-6)
    want = 1 / (1 + np.exp(-(slope * np.log(p / (1 - p)) + intercept)))
    assert float(row["calibrated_probability"]) == pytest.approx(want, abs=1e-5)
  metrics = json.loads((cell / "metrics.json").read_text())
  assert metrics["threshold"] == run["threshold"] and metrics["threshold_rule"] == "inner_youden"
  assert metrics["patient/accuracy"] == pytest.approx(np.mean(
      [(float(row["probability"]) >= run["threshold"]) == bool(int(row["label"])) for row in rows]))
  assert run["config"]["inner_fraction"] == 0.34 and run["config"]["calibration"] == "platt"
  assert json.loads((root / "config.json").read_text())["threshold"] == "inner_youden"


def _distinct_probability(patient_id):
  """A patient-keyed probability that separates the classes imperfectly and differs from patient to patient, so a
  Platt fit or a Youden threshold on one set of patients differs from that on another."""
  index = int(patient_id[-3:])
  return 0.1 + 0.04 * index + (0.3 if _label(patient_id) else 0.0) - (0.05 if index % 3 == 0 else 0.0)


def test_threshold_and_calibration_are_fitted_on_the_inner_patients_not_the_test_fold(records_dir, tmp_path,
                                                                                       monkeypatch, tiny_config):
  """The tiny model predicts a near-constant, with which a fit on the inner patients and one on the test fold agree.
  Here every patient's probability is a fixed, patient-keyed number (the trained model's own slice outputs still
  flow everywhere else), so the two fits differ and run.json must hold the inner patients' fit."""
  real = cell_trainer.held_out_probabilities

  def keyed(config, model, validation, test_ids, *args, **kwargs):
    slices, _, attention = real(config, model, validation, test_ids, *args, **kwargs)
    return slices, np.asarray([_distinct_probability(patient_id) for patient_id in test_ids]), attention

  monkeypatch.setattr(cell_trainer, "held_out_probabilities", keyed)
  config = tiny_config(records_dir, tmp_path / "R", inner_fraction=0.34, threshold="inner_youden",
                       calibration="platt")
  trainer.run_grid(config)
  root = tmp_path / "R"
  fold = json.loads((root / "splits.json").read_text())["repeats"][0]["folds"][0]
  run = json.loads((root / "cells" / "r00_f00" / "run.json").read_text())
  inner_ids = run["inner_validation"]["patients"]
  assert inner_ids == _documented_inner_draw(fold["train"], 0.34)
  fits = {}
  for name, ids in (("inner", inner_ids), ("test", fold["test"])):
    labels, probabilities = [_label(patient) for patient in ids], [_distinct_probability(patient) for patient in ids]
    fits[name] = (_platt_by_sklearn(labels, probabilities),
                  [score for score in probabilities if _youden_index(labels, probabilities, score) == max(
                      _youden_index(labels, probabilities, other) for other in probabilities)])
  (inner_slope, inner_intercept), inner_thresholds = fits["inner"]
  (test_slope, test_intercept), test_thresholds = fits["test"]
  assert abs(inner_slope - test_slope) > 0.1 and not set(inner_thresholds) & set(test_thresholds), "fits must differ"
  assert run["calibration"]["slope"] == pytest.approx(inner_slope, abs=1e-4)
  assert run["calibration"]["intercept"] == pytest.approx(inner_intercept, abs=1e-4)
  assert run["threshold"] in inner_thresholds
  assert run["inner_validation"]["patient_probabilities"] == pytest.approx(
      [_distinct_probability(patient) for patient in inner_ids])
  # The held-out CSV's calibrated column applies the inner fit to each test patient's probability.
  rows = _read_csv(root / "cells" / "r00_f00" / "patient_predictions.csv")
  assert [row["patient_id"] for row in rows] == fold["test"]
  for row in rows:
    p = _distinct_probability(row["patient_id"])
    want = 1 / (1 + np.exp(-(inner_slope * np.log(p / (1 - p)) + inner_intercept)))
    assert float(row["calibrated_probability"]) == pytest.approx(want, abs=1e-5), row


def test_default_flags_add_no_key(records_dir, tmp_path, tiny_config):
  """Inner validation off: run.json, metrics.json, config.json and the CSV header are as before (no new keys)."""
  trainer.run_grid(tiny_config(records_dir, tmp_path / "R"))
  cell = tmp_path / "R" / "cells" / "r00_f00"
  run = json.loads((cell / "run.json").read_text())
  assert not OPT_IN_KEYS & set(run)
  assert not set(trainer.OPT_IN_DEFAULTS) & set(run["config"])
  assert not set(trainer.OPT_IN_DEFAULTS) & set(json.loads((tmp_path / "R" / "config.json").read_text()))
  assert not {"threshold", "threshold_rule", "inner/patient_auc"} & set(json.loads((cell / "metrics.json").read_text()))
  assert list(_read_csv(cell / "patient_predictions.csv")[0]) == ["patient_id", "label", "probability"]


def test_fixed_threshold_without_inner_patients(records_dir, tmp_path, tiny_config):
  trainer.run_grid(tiny_config(records_dir, tmp_path / "R", threshold=0.3))
  cell = tmp_path / "R" / "cells" / "r00_f00"
  run = json.loads((cell / "run.json").read_text())
  assert (run["threshold"], run["threshold_rule"], run["calibration"], run["inner_validation"]) == (
      0.3, "fixed", None, None)
  rows = _read_csv(cell / "patient_predictions.csv")
  assert json.loads((cell / "metrics.json").read_text())["patient/accuracy"] == pytest.approx(np.mean(
      [(float(row["probability"]) >= 0.3) == bool(int(row["label"])) for row in rows]))


def test_early_stopping_keeps_the_best_epoch_and_resumes_exactly(records_dir, tmp_path, tiny_config,
                                                                 stop_after_first_epoch):
  settings = dict(epochs=4, inner_fraction=0.34, early_stopping_patience=1, learning_rate=0.02)
  straight = tiny_config(records_dir, tmp_path / "straight", **settings)
  trainer.run_grid(straight)
  resumed = tiny_config(records_dir, tmp_path / "resumed", **settings)
  assert trainer.run_grid(resumed, cell_callbacks=stop_after_first_epoch)["cells"] == {
      "r00_f00": "interrupted"}
  progress = json.loads((tmp_path / "resumed" / "cells" / "r00_f00" / "progress.json").read_text())
  assert progress["best_epoch"] == 1 and progress["best_checkpoint"] == progress["checkpoint"]
  assert progress["best_inner_loss"] == progress["history"][0]["inner_loss"]
  assert trainer.run_grid(resumed)["cells"] == {"r00_f00": "complete"}
  cell = os.path.join("cells", "r00_f00")
  for name in ("slice_predictions.csv", "patient_predictions.csv"):
    assert (tmp_path / "resumed" / cell / name).read_text() == (tmp_path / "straight" / cell / name).read_text()
  metrics = json.loads((tmp_path / "straight" / cell / "metrics.json").read_text())
  losses = [entry["inner_loss"] for entry in metrics["history"]]
  stopping = json.loads((tmp_path / "straight" / cell / "run.json").read_text())["inner_validation"]["early_stopping"]
  best = int(np.argmin(losses)) + 1  # the first lowest loss
  assert stopping["best_epoch"] == best and stopping["best_inner_loss"] == losses[best - 1]
  # Patience 1: training stops at the first epoch that is not better than the one before it.
  first_worse = next((epoch for epoch in range(2, len(losses) + 2)
                      if epoch <= 4 and losses[epoch - 1] >= min(losses[:epoch - 1])), None)
  assert stopping["epochs_trained"] == (first_worse if first_worse else 4) == len(losses)
  assert stopping["stopped_early"] == (len(losses) < 4 or losses[-1] >= min(losses[:-1]))
  # The artifacts come from the best epoch: model.keras's inner loss is the best one.
  model = keras.models.load_model(tmp_path / "straight" / cell / "model.keras")
  run = json.loads((tmp_path / "straight" / cell / "run.json").read_text())
  images, labels = [], []
  for patient_id in run["inner_validation"]["patients"]:
    index = int(patient_id[-3:])
    for slice_index in range(3):
      images.append(fake_records.fake_image(0, index, slice_index, 0, index % 2 == 0, SIZE))
      labels.append(_label(patient_id))
  predicted = np.clip(model.predict(np.stack(images).astype(np.float32), verbose=0).reshape(-1), 1e-7, 1 - 1e-7)
  labels = np.asarray(labels)
  loss = -np.mean(labels * np.log(predicted) + (1 - labels) * np.log(1 - predicted))
  assert loss == pytest.approx(losses[best - 1], rel=1e-4)


def test_bad_inner_settings_fail_on_one_line_before_training(records_dir, tmp_path, tiny_config):
  for overrides in (dict(threshold="inner_youden"), dict(calibration="isotonic"), dict(early_stopping_patience=2)):
    with pytest.raises(ValueError, match="--inner_fraction") as error:
      tiny_config(records_dir, tmp_path / "R", **overrides)
    assert "\n" not in str(error.value)
  with pytest.raises(ValueError, match="inner_youden"):
    tiny_config(records_dir, tmp_path / "R", threshold="youden")
  # 0.1 of 3 patients a class rounds to no inner patient: one line, before any cell folder exists.
  with pytest.raises(RunsError, match="inner patients without") as error:
    trainer.run_grid(tiny_config(records_dir, tmp_path / "R", inner_fraction=0.1))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "R" / "cells").exists()


def _fake_one_window(patient_id):
  """The patient's original slices as one window [N, S, S] (fake_records' pixels)."""
  index = int(patient_id[-3:])
  return np.stack([fake_records.fake_image(0, index, slice_index, 0, index % 2 == 0, SIZE, 1)[..., 0]
                   for slice_index in range(3)])


def _bce(labels, probabilities):
  probabilities = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1 - 1e-7)
  labels = np.asarray(labels, np.float64)
  return float(-np.mean(labels * np.log(probabilities) + (1 - labels) * np.log(1 - probabilities)))


def test_inner_validation_predicts_2p5d_stacks_like_the_test_patients(records_dir, tmp_path, tiny_config):
  from model_variants_test import numpy_stack  # pylint: disable=import-outside-toplevel

  config = tiny_config(records_dir, tmp_path / "R", context_slices=1, inner_fraction=0.34,
                       threshold="inner_youden", calibration="platt", early_stopping_patience=2, epochs=2)
  trainer.run_grid(config)
  cell, run, inner_ids, model = _finished_cell(tmp_path / "R")
  # Each inner slice as its numpy 2.5D stack (edges replicated), the patient score the mean of its 3 slices.
  per_slice = {patient: model.predict(numpy_stack(_fake_one_window(patient), 1).astype(np.float32), verbose=0)[:, 0]
               for patient in inner_ids}
  np.testing.assert_allclose(run["inner_validation"]["patient_probabilities"],
                             [float(np.mean(per_slice[patient])) for patient in inner_ids], atol=1e-5)
  assert run["inner_validation"]["n_slices"] == 6
  # The early-stopping loss of the kept epoch: cross-entropy over the inner stacks' slice predictions.
  history = json.loads((cell / "metrics.json").read_text())["history"]
  kept = run["inner_validation"]["early_stopping"]["best_epoch"]
  labels = [_label(patient) for patient in inner_ids for _ in range(3)]
  assert history[kept - 1]["inner_loss"] == pytest.approx(
      _bce(labels, np.concatenate([per_slice[patient] for patient in inner_ids])), rel=1e-4)


def test_inner_validation_predicts_mil_bags_like_the_test_patients(records_dir, tmp_path, tiny_config):
  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  trainer.run_grid(tiny_config(records_dir, tmp_path / "slice"))
  mil = ModelConfig(image_size=SIZE, alpha=0.35, head="attention_mil", attention_units=8)
  config = tiny_config(records_dir, tmp_path / "R", model=mil, aggregation=trainer.MIL_AGGREGATION,
                       mil_init_from=str(tmp_path / "slice"), inner_fraction=0.34, threshold="inner_youden",
                       early_stopping_patience=2, epochs=2)
  trainer.run_grid(config)
  cell, run, inner_ids, model = _finished_cell(tmp_path / "R")
  # One bag a patient: its 3 original slices in slice order, no padding; the patient score is the model's own.
  expected = []
  for patient in inner_ids:
    bag = np.repeat(_fake_one_window(patient)[..., None], 3, axis=-1)[None].astype(np.float32)
    expected.append(float(model([bag, np.ones((1, 3), np.float32)], training=False).numpy()[0, 0]))
  np.testing.assert_allclose(run["inner_validation"]["patient_probabilities"], expected, atol=1e-5)
  assert run["threshold"] in run["inner_validation"]["patient_probabilities"]
  history = json.loads((cell / "metrics.json").read_text())["history"]
  kept = run["inner_validation"]["early_stopping"]["best_epoch"]
  # MIL's inner loss is over patients (its training unit), not slices.
  assert history[kept - 1]["inner_loss"] == pytest.approx(_bce([_label(p) for p in inner_ids], expected), rel=1e-4)
  assert model_lib.is_mil_model(model)
  # The MIL grid through export: its head and inner threshold travel, and predict_patient returns the model's own
  # patient probability and attention (one bag of the patient's slices).
  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel

  version_dir = export.export_models([str(cell)], str(tmp_path / "X"), "p")
  _, metadata = export.read_export(version_dir)
  assert metadata["head"] == "attention_mil" and metadata["threshold"] == pytest.approx(run["threshold"])
  patient = inner_ids[0]
  hu = (_fake_one_window(patient).astype(np.float32) - 80.0) * 3.0  # any HU stack: compare served with Keras
  served = tf.saved_model.load(version_dir).signatures["predict_patient"](hu=tf.constant(hu))
  from pdx_tf.data import preprocess  # pylint: disable=import-outside-toplevel
  images = preprocess.preprocess_slices(hu, preprocess.preprocess_config_from_dict(run["preprocess"])).numpy()
  outputs = model_lib.mil_outputs(model, images[None].astype(np.float32), np.ones((1, 3), np.float32))
  assert float(served["patient_probability"]) == pytest.approx(float(outputs["probability"][0]), abs=1e-5)
  np.testing.assert_allclose(served["attention"].numpy(), np.asarray(outputs["attention"])[0], atol=1e-5)


def _finished_cell(root):
  """(cell folder, run.json, inner patient IDs, model) of cell r00_f00; checks the inner patients are 2 and
  none of them is a test patient."""
  cell = root / "cells" / "r00_f00"
  run = json.loads((cell / "run.json").read_text())
  inner_ids = run["inner_validation"]["patients"]
  test_ids = [row["patient_id"] for row in _read_csv(cell / "patient_predictions.csv")]
  assert len(inner_ids) == 2 and not set(inner_ids) & set(test_ids)
  return cell, run, inner_ids, keras.models.load_model(cell / "model.keras")
