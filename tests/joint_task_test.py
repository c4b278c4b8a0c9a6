"""Tests of the joint grid (`--task=p,sb`): one MobileNetV2 backbone with a head per task (issue 13, item 3).

The expectations are built independently of the code under test: the loss from its formula in numpy, the labels
fit sees from the fake records' documented labels (patient i: p = 1 for even i, sb = 1 when i % 4 == 0), the
patient probabilities from the saved model and a numpy mean, the served outputs from the joint Keras model.
"""

import csv
import fractions
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import contracts
from pdx_tf.errors import RunsError
from pdx_tf.evaluation import evaluator, runs as runs_lib
from pdx_tf.serving import export, gradcam
from pdx_tf.testing import fake_records
from pdx_tf.training import model as model_lib, splits, trainer

SIZE = 32
NUM_PATIENTS = 8
INNER_NUM_PATIENTS = 16  # 2 folds: 8 training patients a cell, 2 of them with both labels (stratum 3)


def _labels(patient_id):
  index = int(patient_id[-3:])
  return int(index % 2 == 0), int(index % 4 == 0)


@pytest.fixture(scope="module")
def records_dir(fake_records_dir):
  return fake_records_dir(num_patients=NUM_PATIENTS, slices_per_patient=3, augment_factor=4)


def _config(records_dir, output_dir, **overrides):
  values = dict(task=contracts.JOINT_TASK, records_dir=records_dir, output_dir=str(output_dir), image_size=SIZE,
                alpha=0.35, num_folds=2, num_repeats=1, epochs=1, batch_size=8, pool_fraction=0.5,
                deterministic=True, aggregation="mean")
  values.update(overrides)
  return trainer.config_from_values(values)


def _bce(label, probability):
  probability = np.clip(probability, 1e-7, 1 - 1e-7)
  return -(label * np.log(probability) + (1 - label) * np.log(1 - probability))


def test_joint_loss_is_both_cross_entropies_plus_the_consistency_penalty():
  labels = np.array([[1, 0], [0, 0], [1, 1]], np.float32)
  probabilities = np.array([[0.7, 0.2], [0.1, 0.4], [0.6, 0.9]], np.float32)
  expected = np.mean([(_bce(l[0], p[0]) + _bce(l[1], p[1])) / 2 + 2.5 * max(0.0, p[1] - p[0]) ** 2
                      for l, p in zip(labels, probabilities)])
  assert float(model_lib.JointLoss(2.5)(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
  # Predictions that respect "sb implies p" pay nothing beyond the cross-entropy.
  consistent = np.array([[0.7, 0.2], [0.5, 0.4]], np.float32)
  assert float(model_lib.JointLoss(100.0)(labels[:2], consistent)) == pytest.approx(
      float(model_lib.JointLoss(0.0)(labels[:2], consistent)), rel=1e-6)


def test_task_views_are_the_joint_columns_and_plain_slice_classifiers():
  joint = model_lib.build_model(model_lib.ModelConfig(image_size=SIZE, alpha=0.35, joint_heads=True))
  images = np.random.default_rng(0).uniform(0, 255, (4, SIZE, SIZE, 3)).astype(np.float32)
  outputs = joint(images, training=False).numpy()
  assert outputs.shape == (4, 2)
  for column, task in enumerate(model_lib.JOINT_OUTPUTS):
    view = model_lib.task_view(joint, task)
    np.testing.assert_allclose(view(images, training=False).numpy()[:, 0], outputs[:, column], rtol=1e-6)
    # The same weights in a separately built one-task model: Grad-CAM sees the view as that model.
    single = model_lib.build_model(model_lib.ModelConfig(image_size=SIZE, alpha=0.35))
    single.get_layer(model_lib.BACKBONE_NAME).set_weights(joint.get_layer(model_lib.BACKBONE_NAME).get_weights())
    single.get_layer("probability").set_weights(joint.get_layer(f"probability_{task}").get_weights())
    np.testing.assert_allclose(gradcam.grad_cam(view, images), gradcam.grad_cam(single, images), atol=1e-5)
  with pytest.raises(ValueError, match="heads p, sb"):
    model_lib.task_view(joint, "x")
  with pytest.raises(ValueError, match="slice head only"):
    model_lib.ModelConfig(image_size=SIZE, head="attention_mil", joint_heads=True)


@pytest.mark.parametrize("settings", [{}, {"joint_heads": True}, {"head": "attention_mil"}])
def test_every_model_scales_uint8_pixels_to_minus_one_one(settings):
  """MobileNetV2's input range (ImageNet weights expect [-1, 1]): pixel v enters the backbone as v / 127.5 - 1."""
  model = model_lib.build_model(model_lib.ModelConfig(image_size=SIZE, alpha=0.35, **settings))
  holder = model.get_layer("per_slice").layer if settings.get("head") else model
  scaling = holder.get_layer("to_unit_range")
  pixels = np.array([[0.0, 127.5, 255.0, 51.0]], np.float32)
  np.testing.assert_allclose(np.asarray(scaling(pixels)), pixels / 127.5 - 1.0, atol=1e-6)
  assert holder.layers.index(scaling) < holder.layers.index(holder.get_layer(model_lib.BACKBONE_NAME))


def test_joint_split_is_stratified_on_both_labels():
  labels_p = {f"q{i:03d}": int(i % 3 != 0) for i in range(40)}
  labels_sb = {patient: int(labels_p[patient] and int(patient[1:]) % 2 == 0) for patient in labels_p}

  class Info:
    def labels(self, task):
      return labels_p if task == "p" else labels_sb

  strata = splits.split_labels(Info(), contracts.JOINT_TASK)
  assert strata == {patient: labels_p[patient] + 2 * labels_sb[patient] for patient in labels_p}
  split = splits.make_splits(strata, task=contracts.JOINT_TASK, num_folds=4, num_repeats=1, seed=3)
  for stratum in (0, 1, 3):
    counts = [sum(strata[patient] == stratum for patient in fold["test"]) for fold in split["repeats"][0]["folds"]]
    assert max(counts) - min(counts) <= 1, (stratum, counts)
  for fold in split["repeats"][0]["folds"]:
    assert not set(fold["train"]) & set(fold["test"])


@pytest.fixture
def fed_labels(monkeypatch):
  """Per Model.fit call (one epoch of one cell), the (patient, label row) pairs of its training batches."""
  fed = []
  real_fit = keras.Model.fit
  identities = {}
  for index, patient_id in enumerate(fake_records.patient_ids(INNER_NUM_PATIENTS)):
    for slice_index in range(3):
      for augmentation_index in range(5):
        image = fake_records.fake_image(0, index, slice_index, augmentation_index, index % 2 == 0, SIZE)
        identities[image.tobytes()] = patient_id

  def recording_fit(self, x=None, *args, **kwargs):
    fed.append([])
    for images, labels in x:
      # A slice's image repeats one window in its 3 channels; a 2.5D stack's centre channel is its own slice.
      centres = [np.repeat(image[..., image.shape[-1] // 2:image.shape[-1] // 2 + 1], 3, axis=-1)
                 for image in images.numpy().astype(np.uint8)]
      fed[-1].extend(zip((identities[centre.tobytes()] for centre in centres), labels.numpy().tolist()))
    return real_fit(self, x, *args, **kwargs)

  monkeypatch.setattr(keras.Model, "fit", recording_fit)
  return fed


def test_joint_grid_trains_both_heads_and_evaluation_and_export_read_both(records_dir, tmp_path, fed_labels):
  config = _config(records_dir, tmp_path / "R")
  assert config.model.joint_heads and config.tasks == ("p", "sb")
  assert trainer.run_grid(config)["cells"] == {"r00_f00": "complete", "r00_f01": "complete"}
  root = tmp_path / "R"
  split = json.loads((root / "splits.json").read_text())
  assert split["task"] == contracts.JOINT_TASK
  assert len(fed_labels) == 2  # one epoch of each cell, in cell order
  for fold, fed in zip(split["repeats"][0]["folds"], fed_labels):
    fold_name = contracts.cell_name((0, fold["fold"]))
    assert not set(fold["train"]) & set(fold["test"])
    # fit saw only the cell's training patients, each slice with both labels: [label_p, label_sb].
    assert fed and {patient for patient, _ in fed} == set(fold["train"])
    assert all(row == list(map(float, _labels(patient))) for patient, row in fed)
    run = json.loads((root / "cells" / fold_name / "run.json").read_text())
    assert run["task"] == contracts.JOINT_TASK and run["tasks"] == ["p", "sb"]
    # Each head's patient probability: the mean of that column of the saved model over the patient's slices.
    joint = keras.saving.load_model(root / "cells" / fold_name / "model.keras", compile=False)
    for column, task in enumerate(("p", "sb")):
      with open(root / "cells" / fold_name / task / "patient_predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
      assert sorted(row["patient_id"] for row in rows) == sorted(fold["test"])
      for row in rows:
        index = int(row["patient_id"][-3:])
        images = np.stack([fake_records.fake_image(0, index, s, 0, index % 2 == 0, SIZE) for s in range(3)])
        images = np.repeat(images[..., :1] if images.ndim == 4 else images[..., None], 3, axis=-1)
        expected = joint(images.astype(np.float32), training=False).numpy()[:, column].mean()
        assert float(row["probability"]) == pytest.approx(float(expected), abs=1e-5)
        assert int(row["label"]) == _labels(row["patient_id"])[column]

  loaded = runs_lib.load_runs(str(root))
  assert sorted(loaded) == ["p", "sb"]
  assert loaded["p"].split_hash == loaded["sb"].split_hash == splits.split_hash(split)
  summary = evaluator.evaluate_runs(evaluator.EvaluateConfig(runs_dir=str(root), output_dir=str(tmp_path / "E"),
                                                             num_bootstrap=20))
  assert sorted(summary) == ["p", "sb"]
  card = (tmp_path / "E" / "model_card.md").read_text()
  assert "one backbone shared by tasks p, sb" in card and "1 x max(0, P(sb) - P(p))^2" in card

  # Export serves both heads: X/pdx_p and X/pdx_sb, each the ensemble's column of the joint models.
  version_dirs = export.export_if_complete(str(root), contracts.JOINT_TASK, 1, 2, str(tmp_path / "X"))
  assert [os.path.basename(os.path.dirname(path)) for path in version_dirs] == ["pdx_p", "pdx_sb"]
  models = [keras.saving.load_model(root / "cells" / contracts.cell_name((0, fold)) / "model.keras", compile=False)
            for fold in (0, 1)]
  images = np.random.default_rng(1).integers(0, 256, (5, SIZE, SIZE, 3)).astype(np.uint8)
  per_model = np.stack([model(images.astype(np.float32), training=False).numpy() for model in models])
  for column, version_dir in enumerate(version_dirs):
    served = tf.saved_model.load(version_dir).signatures["predict_images"](image=tf.constant(images))
    np.testing.assert_allclose(served["probability"].numpy(), per_model[:, :, column].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(served["uncertainty"].numpy(), per_model[:, :, column].std(axis=0), atol=1e-5)
    _, metadata = export.read_export(version_dir)
    assert metadata["trained_with_tasks"] == ["p", "sb"]
    # The stored Keras models (predict's Grad-CAM) are that task's plain slice classifiers.
    stored = export.load_export_keras_models(version_dir, metadata, max_models=1)[0]
    np.testing.assert_allclose(stored(images.astype(np.float32), training=False).numpy()[:, 0],
                               per_model[0, :, column], atol=1e-5)


def test_joint_grid_on_2p5d_stacks(records_dir, tmp_path, fed_labels):
  from model_variants_test import numpy_stack  # pylint: disable=import-outside-toplevel

  # Originals only (pool_fraction 0): a drawn copy's stack is warped, so the pixels would not name its patient.
  config = _config(records_dir, tmp_path / "R", context_slices=1, cells=("r0f0",), pool_fraction=0.0)
  assert config.model.input_channels == 3 and config.model.joint_heads
  trainer.run_grid(config)
  fold = json.loads((tmp_path / "R" / "splits.json").read_text())["repeats"][0]["folds"][0]
  # fit saw stacks of the training patients with both labels (identified by the stack's centre slice).
  assert len(fed_labels) == 1 and {patient for patient, _ in fed_labels[0]} == set(fold["train"])
  assert all(row == list(map(float, _labels(patient))) for patient, row in fed_labels[0])
  cell = tmp_path / "R" / "cells" / "r00_f00"
  joint = keras.saving.load_model(cell / "model.keras", compile=False)
  for column, task in enumerate(("p", "sb")):
    with open(cell / task / "patient_predictions.csv") as handle:
      rows = {row["patient_id"]: float(row["probability"]) for row in csv.DictReader(handle)}
    assert sorted(rows) == sorted(fold["test"])
    for patient_id, probability in rows.items():
      index = int(patient_id[-3:])
      window = np.stack([fake_records.fake_image(0, index, s, 0, index % 2 == 0, SIZE, 1)[..., 0] for s in range(3)])
      stacks = numpy_stack(window, 1).astype(np.float32)
      assert probability == pytest.approx(float(joint(stacks, training=False).numpy()[:, column].mean()), abs=1e-5)


@pytest.fixture(scope="module")
def inner_records_dir(fake_records_dir):
  return fake_records_dir("inner_records", num_patients=INNER_NUM_PATIENTS, slices_per_patient=3, augment_factor=4)


def _documented_inner_draw_on_strata(train_ids, fraction, seed=0, repeat=0, fold=0):
  """splits.py's documented recipe on a joint grid's strata (label_p + 2 label_sb: 0, 1, 3): per stratum,
  round(f x n) from the sorted IDs in the order of default_rng([seed, 0x1AAE, repeat, fold, stratum])."""
  inner = []
  for stratum in (0, 1, 3):
    members = sorted(patient for patient in train_ids if _labels(patient)[0] + 2 * _labels(patient)[1] == stratum)
    order = np.random.default_rng([seed, 0x1AAE, repeat, fold, stratum]).permutation(len(members))
    inner += [members[position] for position in order[:int(np.floor(fraction * len(members) + 0.5))]]
  return sorted(inner)


def _youden_by_brute_force(labels, probabilities):
  """The observed score with the largest exact Youden index (sensitivity + specificity - 1) as `>=` threshold,
  ties to the highest score (the documented rule of metrics.youden_threshold)."""
  labels = np.asarray(labels).astype(bool)
  best = None
  for score in sorted(set(probabilities), reverse=True):
    predicted = np.asarray(probabilities) >= score
    index = (fractions.Fraction(int(predicted[labels].sum()), int(labels.sum()))
             - fractions.Fraction(int(predicted[~labels].sum()), int((~labels).sum())))
    if best is None or index > best[0]:
      best = (index, score)
  return best[1]


def _platt_by_sklearn_standardized(labels, probabilities):
  """(slope, intercept) of Platt scaling by unpenalised scikit-learn LogisticRegression (the smoothed targets as
  sample weights of duplicated rows) on the standardised logits, mapped back: a tiny model's inner probabilities
  can differ only in their 7th digit, where the raw logits would leave the solver ill-conditioned."""
  from sklearn import linear_model  # pylint: disable=import-outside-toplevel

  labels = np.asarray(labels)
  positives, negatives = labels.sum(), labels.size - labels.sum()
  targets = np.where(labels == 1, (positives + 1) / (positives + 2), 1 / (negatives + 2))
  clipped = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1 - 1e-7)
  logits = np.log(clipped) - np.log1p(-clipped)
  mean, scale = logits.mean(), logits.std()
  features = ((logits - mean) / scale)[:, None]
  model = linear_model.LogisticRegression(C=np.inf, tol=1e-12, max_iter=100000)
  model.fit(np.vstack([features, features]), np.r_[np.ones(labels.size), np.zeros(labels.size)],
            sample_weight=np.r_[targets, 1 - targets])
  slope = float(model.coef_[0, 0]) / scale
  return slope, float(model.intercept_[0]) - slope * mean


def test_joint_grid_with_inner_validation_fits_threshold_and_calibration_per_task(inner_records_dir, tmp_path,
                                                                                  fed_labels):
  config = _config(inner_records_dir, tmp_path / "R", cells=("r0f0",), epochs=2, inner_fraction=0.34,
                   threshold="inner_youden", calibration="platt", early_stopping_patience=2, consistency_weight=0.5)
  assert trainer.run_grid(config)["cells"] == {"r00_f00": "complete"}
  root = tmp_path / "R"
  fold = json.loads((root / "splits.json").read_text())["repeats"][0]["folds"][0]
  train_ids, test_ids = fold["train"], fold["test"]
  cell = root / "cells" / "r00_f00"
  run = json.loads((cell / "run.json").read_text())
  assert sorted(run["by_task"]) == ["p", "sb"]
  assert not {"threshold", "threshold_rule", "calibration", "inner_validation"} & set(run), "per task only"
  inner_ids = run["by_task"]["p"]["inner_validation"]["patients"]
  assert run["by_task"]["sb"]["inner_validation"]["patients"] == inner_ids
  # The inner patients: the documented draw on both labels' strata, training patients only, never a test patient;
  # each task has both classes among them; fit saw exactly the other training patients, in every epoch.
  assert inner_ids == _documented_inner_draw_on_strata(train_ids, 0.34)
  assert set(inner_ids) < set(train_ids) and not set(inner_ids) & set(test_ids)
  for column in (0, 1):
    assert sorted({_labels(patient)[column] for patient in inner_ids}) == [0, 1]
  assert fed_labels and all({patient for patient, _ in fed} == set(train_ids) - set(inner_ids) for fed in fed_labels)

  joint = keras.saving.load_model(cell / "model.keras", compile=False)
  per_slice = {}
  for patient in inner_ids:
    index = int(patient[-3:])
    images = np.stack([fake_records.fake_image(0, index, s, 0, index % 2 == 0, SIZE) for s in range(3)])
    per_slice[patient] = joint(images.astype(np.float32), training=False).numpy()  # [3 slices, (p, sb)]
  thresholds = {}
  for column, task in enumerate(("p", "sb")):
    decision = run["by_task"][task]
    probabilities = decision["inner_validation"]["patient_probabilities"]
    # That head's column of the saved model, averaged over the patient's slices (aggregation "mean").
    np.testing.assert_allclose(probabilities, [per_slice[p][:, column].mean() for p in inner_ids], atol=1e-5)
    labels = [_labels(patient)[column] for patient in inner_ids]
    assert decision["threshold_rule"] == "inner_youden"
    assert decision["threshold"] == pytest.approx(_youden_by_brute_force(labels, probabilities), abs=1e-7)
    thresholds[task] = decision["threshold"]
    assert decision["calibration"]["method"] == "platt"
    if np.ptp(np.log(np.divide(probabilities, np.subtract(1, probabilities)))) >= 1e-5:  # not float32 noise
      slope, intercept = _platt_by_sklearn_standardized(labels, probabilities)
    else:  # a collapsed head: the slope is not identifiable; Platt's smoothed targets' mean, as a logit
      positives, negatives = sum(labels), len(labels) - sum(labels)
      mean = np.mean([(positives + 1) / (positives + 2) if label else 1 / (negatives + 2) for label in labels])
      slope, intercept = 0.0, float(np.log(mean / (1 - mean)))
    assert decision["calibration"]["slope"] == pytest.approx(slope, rel=1e-5, abs=1e-4)
    assert decision["calibration"]["intercept"] == pytest.approx(intercept, rel=1e-5, abs=1e-4)
    # The task's folder: metrics.json at its own threshold, the held-out CSV with its own calibration.
    metrics = json.loads((cell / task / "metrics.json").read_text())
    assert (metrics["threshold"], metrics["threshold_rule"]) == (decision["threshold"], "inner_youden")
    with open(cell / task / "patient_predictions.csv") as handle:
      rows = list(csv.DictReader(handle))
    assert sorted(row["patient_id"] for row in rows) == sorted(test_ids)
    for row in rows:
      probability = min(max(float(row["probability"]), 1e-6), 1 - 1e-6)
      expected = 1 / (1 + np.exp(-(slope * np.log(probability / (1 - probability)) + intercept)))
      # The CSV rounds the probability to 8 decimals; a steep fit amplifies that by d(calibrated)/d(probability).
      rounding = 5e-9 * expected * (1 - expected) * abs(slope) / (probability * (1 - probability))
      assert float(row["calibrated_probability"]) == pytest.approx(expected, abs=1e-5 + 2 * rounding)
  assert thresholds["p"] != thresholds["sb"], "the two heads' thresholds must differ for this test to tell them apart"

  # Early stopping on the inner JointLoss: the kept epoch's loss is the formula over the inner slices of model.keras.
  stopping = run["by_task"]["p"]["inner_validation"]["early_stopping"]
  assert run["by_task"]["sb"]["inner_validation"]["early_stopping"] == stopping
  history = json.loads((cell / "p" / "metrics.json").read_text())["history"]
  outputs = np.concatenate([per_slice[patient] for patient in inner_ids])
  truth = np.asarray([_labels(patient) for patient in inner_ids for _ in range(3)], np.float64)
  joint_loss = np.mean([(_bce(t[0], o[0]) + _bce(t[1], o[1])) / 2 + 0.5 * max(0.0, o[1] - o[0]) ** 2
                        for t, o in zip(truth, outputs.astype(np.float64))])
  assert history[stopping["best_epoch"] - 1]["inner_loss"] == pytest.approx(joint_loss, rel=1e-4)

  # Evaluation decides each task at its own cells' thresholds; each task's export carries its own.
  summary = evaluator.evaluate_runs(evaluator.EvaluateConfig(runs_dir=str(root), output_dir=str(tmp_path / "E"),
                                                             num_bootstrap=20, allow_partial=True))
  for task in ("p", "sb"):
    assert summary[task]["threshold_source"] == "cells"
    assert summary[task]["threshold"] == pytest.approx(thresholds[task])
    version_dir = export.export_models([str(cell)], str(tmp_path / "X"), task)
    _, metadata = export.read_export(version_dir)
    assert metadata["threshold"] == pytest.approx(thresholds[task])
    assert metadata["calibration"]["cells"][0]["parameters"] == run["by_task"][task]["calibration"]


def test_single_task_config_files_do_not_change():
  config = trainer.config_from_values(dict(task="p", records_dir="d", output_dir="o", image_size=SIZE))
  written = trainer.config_dict(config)
  assert "joint_heads" not in written["model"] and "consistency_weight" not in written
  joint = trainer.config_dict(trainer.config_from_values(dict(task="p,sb", records_dir="d", output_dir="o",
                                                              image_size=SIZE)))
  assert joint["model"]["joint_heads"] is True and joint["task"] == "p,sb"


def test_bad_joint_input_is_one_line_before_training(records_dir, tmp_path):
  with pytest.raises(ValueError, match="slice head only"):
    _config(records_dir, tmp_path / "a", head="attention_mil", aggregation=trainer.MIL_AGGREGATION, mil_init_from="x")
  # Each cell's 4 training patients: 2 of stratum 0, 1 with p only, 1 with both labels. Half of every stratum takes
  # both p positives into the inner patients: one line, naming the task whose class the fit patients miss.
  with pytest.raises(RunsError, match="r00_f00: --inner_fraction=0.5 leaves the fit patients without task p label 1"
                     ) as error:
    trainer.run_grid(_config(records_dir, tmp_path / "a", inner_fraction=0.5, threshold="inner_youden"))
  assert "\n" not in str(error.value) and not (tmp_path / "a" / "cells").exists()
  # Records whose labels break "sb implies p", and records lacking a label.
  contradicting = str(tmp_path / "contradicting")
  fake_records.write_fake_records(contradicting, num_patients=NUM_PATIENTS, slices_per_patient=3, augment_factor=2,
                                  image_size=SIZE, labels_p=[0] + [1, 0] * 3 + [1])
  with pytest.raises(RunsError, match="patient fake000 has label_sb 1 but label_p 0"):
    trainer.run_grid(_config(contradicting, tmp_path / "b"))
  unlabelled = str(tmp_path / "unlabelled")
  fake_records.write_fake_records(unlabelled, num_patients=NUM_PATIENTS, slices_per_patient=3, augment_factor=2,
                                  image_size=SIZE)
  path = os.path.join(unlabelled, contracts.DATASET_FILE)
  document = json.loads(open(path).read())
  del document["patients"][0]["label_sb"]  # the patient list's first entry: fake000
  with open(path, "w") as handle:
    json.dump(document, handle)
  with pytest.raises(RunsError, match="patient fake000 has no label_sb") as error:
    trainer.run_grid(_config(unlabelled, tmp_path / "c"))
  assert "\n" not in str(error.value)
  assert not (tmp_path / "b" / "cells").exists() and not (tmp_path / "c" / "cells").exists()


def test_train_and_export_binaries_take_the_joint_task(records_dir, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
  result = subprocess.run(
      [sys.executable, "-m", "train", "--task=p,sb", f"--records_dir={records_dir}", f"--output_dir={tmp_path / 'R'}",
       "--alpha=0.35", "--num_folds=2", "--num_repeats=1", "--epochs=1", "--batch_size=8", "--pool_fraction=0.5",
       "--consistency_weight=0.5", f"--export_dir={tmp_path / 'X'}"],
      cwd=repo, env=environment, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert f"export: {tmp_path / 'X' / 'pdx_p' / '1'}" in result.stdout
  assert f"export: {tmp_path / 'X' / 'pdx_sb' / '1'}" in result.stdout
  assert json.loads((tmp_path / "R" / "config.json").read_text())["consistency_weight"] == 0.5
  result = subprocess.run([sys.executable, "-m", "export", f"--runs_dir={tmp_path / 'R'}", "--task=p,sb",
                           f"--export_dir={tmp_path / 'X'}"], cwd=repo, env=environment, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.split() == ["Exported", str(tmp_path / "X" / "pdx_p" / "2"),
                                   "Exported", str(tmp_path / "X" / "pdx_sb" / "2")]


def test_task_run_document_is_one_task_view_of_a_joint_run():
  one_task = {"task": "p", "repeat": 0, "fold": 1, "threshold": 0.3, "threshold_rule": "fixed"}
  assert contracts.task_run_document(one_task, "p") == one_task
  entries = {task: {"threshold": value, "threshold_rule": "inner_youden", "calibration": None,
                    "inner_validation": {"patients": ["a"]}} for task, value in (("p", 0.4), ("sb", 0.2))}
  joint = {"task": "p,sb", "repeat": 0, "fold": 1, "tasks": ["p", "sb"], "by_task": entries}
  for task in ("p", "sb"):
    assert contracts.task_run_document(joint, task) == {"task": "p,sb", "repeat": 0, "fold": 1, "tasks": ["p", "sb"],
                                                        **entries[task]}
  with pytest.raises(RunsError, match="cells/r00_f01/run.json has no task sb entry under 'by_task'") as error:
    contracts.task_run_document({**joint, "by_task": {"p": entries["p"]}}, "sb", "cells/r00_f01/run.json")
  assert "\n" not in str(error.value)
