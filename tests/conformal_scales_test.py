"""Conformal sets on each model's own scale (pdx_tf.conformal.ScoreScale): the module, evaluation, export, the set
signature and predict. Expectations come from the documented formula written out here in numpy
(score = sigmoid((logit(p) - mean) / SD), mean and SD of logit over the cell's inner patients; q_y the
ceil((n + 1)(1 - alpha))-th smallest calibration score), never from the code under test."""

import csv
import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import conformal, evaluation, io_utils, phantom
from pdx_tf.data import preprocess
from pdx_tf.serving import export, predict
from pdx_tf.testing import fake_cells
from tests import fake_runs


def _logit(p):
  p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
  return np.log(p / (1 - p))


def _scaled(p, reference):
  z = _logit(reference)
  return 1 / (1 + np.exp(-(_logit(p) - z.mean()) / z.std()))


def _bound(scores, alpha):
  ordered = sorted(scores)
  k = math.ceil((len(ordered) + 1) * (1 - alpha) - 1e-9)
  return min(ordered[k - 1], 1.0) if k <= len(ordered) else 1.0


def test_a_score_scale_by_hand():
  # logits of 0.2, 0.5, 0.8: -1.3863, 0, 1.3863; mean 0; population SD 1.3863 * sqrt(2/3) = 1.13190.
  scale = conformal.ScoreScale.fit([0.2, 0.5, 0.8])
  assert scale.logit_mean == pytest.approx(0.0, abs=1e-12) and scale.logit_sd == pytest.approx(1.131905, abs=1e-6)
  # logit(0.9) = 2.19722; / 1.13190 = 1.94118; sigmoid = 0.87448.
  assert scale.apply([0.5, 0.9]) == pytest.approx([0.5, 0.874481], abs=1e-6)
  assert conformal.ensemble_score([0.5, 0.9], [scale, scale]) == pytest.approx((0.5 + 0.874481) / 2, abs=1e-6)
  assert conformal.ensemble_score([0.5, 0.9], None) == pytest.approx(0.7)
  with pytest.raises(ValueError, match="at least 2"):
    conformal.ScoreScale.fit([0.3])
  assert conformal.ScoreScale.from_dict(scale.to_dict()) == scale


def test_scaled_cross_conformal_matches_numpy_and_restores_a_shifted_folds_coverage():
  rng = np.random.default_rng(0)
  rows, references = [], {}
  for fold, shift in ((0, 0.0), (1, 2.5), (2, -0.5)):  # fold 1's model puts everyone 2.5 logits higher
    labels = rng.integers(0, 2, 400)
    logits = np.where(labels == 1, 1.0, -1.0) + rng.normal(0, 1.0, labels.size) + shift
    rows += [(fold, f"f{fold}-{i}", int(y), float(1 / (1 + np.exp(-z))))
             for i, (y, z) in enumerate(zip(labels, logits))]
    inner_labels = rng.integers(0, 2, 40)
    inner = np.where(inner_labels == 1, 1.0, -1.0) + rng.normal(0, 1.0, 40) + shift
    references[fold] = 1 / (1 + np.exp(-inner))
  folds = np.array([r[0] for r in rows])
  labels = np.array([r[2] for r in rows])
  probabilities = np.array([r[3] for r in rows])
  scales = {(0, fold): conformal.ScoreScale.fit(reference) for fold, reference in references.items()}
  alpha = 0.2
  result = conformal.cross_conformal(np.zeros(len(rows)), folds, [r[1] for r in rows], labels, probabilities, alpha,
                                     scales)
  scores = np.concatenate([_scaled(probabilities[folds == fold], references[fold]) for fold in (0, 1, 2)])
  order = np.concatenate([np.flatnonzero(folds == fold) for fold in (0, 1, 2)])
  scaled = np.empty(len(rows))
  scaled[order] = scores
  for fold in (0, 1, 2):
    other = folds != fold
    q0 = _bound(scaled[other & (labels == 0)], alpha)
    q1 = _bound(1 - scaled[other & (labels == 1)], alpha)
    mine = folds == fold
    np.testing.assert_array_equal(result.has_negative[mine], scaled[mine] <= q0)
    np.testing.assert_array_equal(result.has_positive[mine], 1 - scaled[mine] <= q1)
  # The shifted fold: unscaled, its negatives sit above the others' bound and lose coverage; scaled, they do not.
  raw = conformal.cross_conformal(np.zeros(len(rows)), folds, [r[1] for r in rows], labels, probabilities, alpha)
  shifted_negatives = (folds == 1) & (labels == 0)
  assert raw.has_negative[shifted_negatives].mean() < 0.5
  assert result.has_negative[shifted_negatives].mean() >= 1 - alpha - 0.05
  with pytest.raises(ValueError, match="every cell"):
    conformal.cross_conformal(np.zeros(len(rows)), folds, [r[1] for r in rows], labels, probabilities, alpha,
                              {(0, 0): scales[(0, 0)]})


def _add_inner(runs_dir, task, rng):
  """Gives every cell of a fake grid inner patients (run.json inner_validation); returns (repeat, fold) -> them."""
  references = {}
  cells_dir = os.path.join(runs_dir, task, "cells")
  for name in sorted(os.listdir(cells_dir)):
    path = os.path.join(cells_dir, name, "run.json")
    document = json.load(open(path))
    reference = np.round(rng.uniform(0.05, 0.95, 6), 6).tolist()
    document["inner_validation"] = {"fraction": 0.2, "patients": [f"inner{i}" for i in range(6)],
                                    "patient_probabilities": reference, "n_positive": 3, "n_slices": 6,
                                    "patient_auc": 0.5, "early_stopping": None}
    io_utils.atomic_write_json(path, document)
    references[(int(name[1:3]), int(name[5:7]))] = reference
  return references


def test_evaluation_scales_each_cell_by_its_inner_patients(tmp_path):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=1, num_folds=4, num_patients=48)
  references = _add_inner(runs_dir, "p", np.random.default_rng(4))
  alpha = 0.2
  output = str(tmp_path / "E")
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=runs_dir, output_dir=output,
                                                               num_bootstrap=20, conformal_alpha=alpha))
  entry = summary["p"]["conformal"]
  assert entry["scaled"] is True and "own scale" in entry["scheme"]
  rows = []
  for name in sorted(os.listdir(os.path.join(runs_dir, "p", "cells"))):
    cell = (int(name[1:3]), int(name[5:7]))
    with open(os.path.join(runs_dir, "p", "cells", name, "patient_predictions.csv"), newline="") as handle:
      for row in csv.DictReader(handle):
        rows.append((cell, row["patient_id"], int(row["label"]),
                     float(_scaled(float(row["probability"]), references[cell]))))
  expected = {}
  for cell, patient, _, score in rows:
    calibration = [r for r in rows if r[0] != cell]
    q0 = _bound([r[3] for r in calibration if r[2] == 0], alpha)
    q1 = _bound([1 - r[3] for r in calibration if r[2] == 1], alpha)
    negative, positive = score <= q0, 1 - score <= q1
    expected[(cell[1], patient)] = ("negative" if negative and not positive else
                                    "positive" if positive and not negative else "uncertain")
  with open(os.path.join(output, "patient_predictions.csv"), newline="") as handle:
    written = list(csv.DictReader(handle))
  assert len(written) == len(rows)
  assert all(row["conformal_set"] == expected[(int(row["fold"]), row["patient_id"])] for row in written)


@pytest.fixture(scope="module")
def scaled_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("scaled_export")
  folders = fake_cells.write_fake_cells(str(root / "runs"), "p", cells=((0, 0), (0, 1)), image_size=32, top_k=3)
  rng = np.random.default_rng(8)
  oof, references = {}, {}
  for position, folder in enumerate(folders):
    labels = rng.integers(0, 2, 30)
    probabilities = np.round(np.clip(np.where(labels == 1, 0.7, 0.3) + 0.15 * position
                                     + rng.normal(0, 0.2, 30), 0.01, 0.99), 8)
    io_utils.atomic_write_csv(os.path.join(folder, "patient_predictions.csv"), ["patient_id", "label", "probability"],
                              [[f"pt{i:03d}-{position}", int(y), f"{p:.8f}"] for i, (y, p) in
                               enumerate(zip(labels, probabilities))])
    document = io_utils.read_json(os.path.join(folder, "run.json"))
    references[folder] = np.round(rng.uniform(0.1, 0.9, 7), 6).tolist()
    document["config"]["conformal_alpha"] = 0.2
    document["inner_validation"] = {"fraction": 0.2, "patients": [f"in{i}" for i in range(7)],
                                    "patient_probabilities": references[folder]}
    io_utils.atomic_write_json(os.path.join(folder, "run.json"), document)
    oof[folder] = (labels, probabilities)
  version_dir = export.export_models(folders, str(root / "X"), "p")
  return {"root": root, "folders": folders, "oof": oof, "references": references, "version_dir": version_dir}


def test_the_export_stores_each_models_scale_and_thresholds_on_scaled_scores(scaled_export):
  entry = io_utils.read_json(os.path.join(scaled_export["version_dir"], "assets.extra", "pdx_export.json"))["conformal"]
  folders = scaled_export["folders"]
  for scale, folder in zip(entry["scales"], folders):
    z = _logit(scaled_export["references"][folder])
    assert scale["logit_mean"] == pytest.approx(z.mean()) and scale["logit_sd"] == pytest.approx(z.std())
  scores = np.concatenate([_scaled(scaled_export["oof"][f][1], scaled_export["references"][f]) for f in folders])
  labels = np.concatenate([scaled_export["oof"][f][0] for f in folders])
  assert entry["calibration_scores"] == pytest.approx(scores.tolist(), abs=1e-8)
  assert entry["negative_max_score"] == pytest.approx(_bound(scores[labels == 0], 0.2))
  assert entry["positive_max_score"] == pytest.approx(_bound(1 - scores[labels == 1], 0.2))


def _model_patient_probabilities(folders, hu):
  """Each cell's Keras model on the preprocessed slices, then its top-3 mean (the fake cells' aggregation)."""
  images = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=32)).numpy().astype(np.float32)
  out = []
  for folder in folders:
    slices = np.asarray(keras.saving.load_model(f"{folder}/model.keras", compile=False)(images, training=False),
                        np.float64).reshape(-1)
    out.append(np.mean(np.sort(slices)[::-1][:3]))
  return np.asarray(out)


def test_the_set_signature_and_predict_decide_on_the_scaled_ensemble_score(scaled_export):
  entry = io_utils.read_json(os.path.join(scaled_export["version_dir"], "assets.extra", "pdx_export.json"))["conformal"]
  loaded = tf.saved_model.load(scaled_export["version_dir"])
  folders = scaled_export["folders"]
  seen = set()
  for seed in range(1, 9):
    hu = fake_cells.fake_hu_slices(seed, 5)
    outputs = loaded.signatures["predict_patient_set"](hu=tf.constant(hu, tf.float32))
    per_model = _model_patient_probabilities(folders, hu)
    expected = np.mean([_scaled(p, scaled_export["references"][f]) for p, f in zip(per_model, folders)])
    assert float(outputs["conformal_score"].numpy()) == pytest.approx(expected, abs=2e-5)
    assert float(outputs["patient_probability"].numpy()) == pytest.approx(per_model.mean(), abs=2e-5)
    negative, positive = expected <= entry["negative_max_score"], 1 - expected <= entry["positive_max_score"]
    assert float(outputs["conformal_negative"].numpy()) == float(negative)
    assert float(outputs["conformal_positive"].numpy()) == float(positive)
    assert "slice_probability" in outputs  # predict reads everything from this one pass
    seen.add(abs(expected - per_model.mean()) > 1e-3)
  assert True in seen  # the scaled score is not the probability: the test tells the two rules apart
  # predict: the answer is the set of the scaled score, and says what it was decided on.
  config = phantom.PhantomConfig(num_patients=2, matrix_size=64, pixel_spacing_mm=6.0, slice_spacing_mm=10.0,
                                 scanner_quirks=False)
  patient = phantom.generate_patient(config, 0)
  study = str(scaled_export["root"] / "study")
  phantom.write_ct_series(study, patient.hu, patient.z_mm, config.pixel_spacing_mm, key=3, patient_index=4)
  prediction = predict.predict_study(predict.PredictConfig(model_dirs=(scaled_export["version_dir"],),
                                                           dicom_dir=study, output_dir=str(scaled_export["root"] / "O"),
                                                           num_gradcam_slices=0))
  answer = prediction["tasks"]["p"]["conformal"]
  score = answer["score"]
  assert answer["members"] == {(True, False): "negative", (False, True): "positive", (True, True): "both",
                               (False, False): "empty"}[(score <= entry["negative_max_score"],
                                                         1 - score <= entry["positive_max_score"])]


def test_predict_answers_on_the_score_not_the_probability_for_a_scaled_export(scaled_export):
  info = export.export_info(scaled_export["version_dir"])
  bounds = info.conformal_thresholds
  score = bounds.negative_max_score - 0.01  # negative is in the set by the score ...
  answer = predict.conformal_answer(info, 0.999, score=score)  # ... and would not be by the probability
  assert answer["score"] == pytest.approx(round(score, 6))
  assert answer["members"] in ("negative", "both")
  with pytest.raises(predict.ExportError, match="conformal_score"):
    predict.conformal_answer(info, 0.5)
