"""The conformal sets in the export, the serving signature, predict, the cohort CSV and the external check."""

import csv
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import contracts, io_utils, phantom
from pdx_tf.evaluation import evaluator, external
from pdx_tf.serving import cohort_predict, export, predict
from pdx_tf.testing import fake_cells

PHANTOM = phantom.PhantomConfig(num_patients=4, matrix_size=64, pixel_spacing_mm=6.0, slice_spacing_mm=10.0,
                                scanner_quirks=False)


def _reference_bound(scores, alpha):
  ordered = sorted(scores)
  k = math.ceil((len(ordered) + 1) * (1 - alpha) - 1e-9)
  return min(ordered[k - 1], 1.0) if k <= len(ordered) else 1.0


def _write_out_of_fold(folder, rows, alpha=None):
  io_utils.atomic_write_csv(os.path.join(folder, "patient_predictions.csv"), ["patient_id", "label", "probability"],
                            [[f"pt{index:03d}-{os.path.basename(folder)}", label, f"{probability:.8f}"]
                             for index, (label, probability) in enumerate(rows)])
  if alpha is not None:
    path = os.path.join(folder, "run.json")
    document = io_utils.read_json(path)
    document["config"]["conformal_alpha"] = alpha
    io_utils.atomic_write_json(path, document)


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("conformal_export")
  runs_dir = str(root / "runs")
  folders = fake_cells.write_fake_cells(runs_dir, "p", cells=((0, 0), (0, 1)), image_size=32, top_k=3)
  rng = np.random.default_rng(5)
  calibration = {}
  for folder in folders:
    labels = rng.integers(0, 2, 30)
    probabilities = np.clip(np.where(labels == 1, 0.7, 0.3) + rng.normal(0, 0.2, labels.size), 0, 1)
    rows = list(zip(labels.tolist(), np.round(probabilities, 8).tolist()))
    _write_out_of_fold(folder, rows, alpha=0.2)
    calibration[folder] = rows
  wide = export.export_models(folders, str(root / "X"), "p")
  # Few calibration patients: the quantiles are infinite at alpha 0.2, so every set holds both labels.
  few_runs = str(root / "few")
  few = fake_cells.write_fake_cells(few_runs, "p", cells=((0, 0),), image_size=32, top_k=3)
  _write_out_of_fold(few[0], [(0, 0.1), (1, 0.9), (0, 0.3)], alpha=0.2)
  narrow = export.export_models(few, str(root / "Y"), "p")
  patient = phantom.generate_patient(PHANTOM, 1)
  study = str(root / "study")
  phantom.write_ct_series(study, patient.hu, patient.z_mm, PHANTOM.pixel_spacing_mm, key=11, patient_index=7)
  return {"root": root, "wide": wide, "narrow": narrow, "calibration": calibration, "study": study}


def test_export_stores_thresholds_from_the_out_of_fold_patients(exports):
  metadata = io_utils.read_json(os.path.join(exports["wide"], "assets.extra", "pdx_export.json"))
  entry = metadata["conformal"]
  rows = [row for rows in exports["calibration"].values() for row in rows]
  assert entry["alpha"] == 0.2 and entry["alpha_source"] == "cells"
  assert entry["negative_max_score"] == pytest.approx(_reference_bound([p for y, p in rows if y == 0], 0.2))
  assert entry["positive_max_score"] == pytest.approx(_reference_bound([1 - p for y, p in rows if y == 1], 0.2))
  assert entry["num_negative"] + entry["num_positive"] == len(rows) == len(entry["calibration_probabilities"])
  assert "predict_patient_set" in metadata["signatures"]
  assert contracts.ExportInfo.from_document(metadata, "pdx_export.json").conformal == entry


def test_the_set_signature_agrees_with_the_stored_thresholds(exports):
  loaded = tf.saved_model.load(exports["wide"])
  metadata = io_utils.read_json(os.path.join(exports["wide"], "assets.extra", "pdx_export.json"))
  entry = metadata["conformal"]
  for seed in (1, 2, 3):
    hu = tf.constant(fake_cells.fake_hu_slices(seed, 5), tf.float32)
    outputs = loaded.signatures["predict_patient_set"](hu=hu)
    plain = loaded.signatures["predict_patient"](hu=hu)
    probability = float(outputs["patient_probability"].numpy())
    assert probability == float(plain["patient_probability"].numpy())
    negative = probability <= entry["negative_max_score"]
    positive = 1 - probability <= entry["positive_max_score"]
    assert float(outputs["conformal_negative"].numpy()) == float(negative)
    assert float(outputs["conformal_positive"].numpy()) == float(positive)
    assert float(outputs["conformal_uncertain"].numpy()) == float(negative == positive)
    assert float(outputs["conformal_alpha"].numpy()) == pytest.approx(0.2)


def test_predict_says_uncertain_refer_for_both_labels_and_rederives_at_another_alpha(exports):
  output = str(exports["root"] / "predicted")
  prediction = predict.predict_study(predict.PredictConfig(model_dirs=(exports["narrow"],), dicom_dir=exports["study"],
                                                           output_dir=output, num_gradcam_slices=0))
  answer = prediction["tasks"]["p"]["conformal"]
  assert answer["members"] == "both" and answer["set"] == "uncertain" and answer["alpha"] == 0.2
  assert "uncertain: refer" in predict.format_prediction(prediction)
  assert io_utils.read_json(os.path.join(output, "prediction.json"))["tasks"]["p"]["conformal"] == answer
  # At alpha 0.5 the 2 negatives give k = ceil(3 * 0.5) = 2: q_0 = 0.3; the positive k = 1: q_1 = 0.1.
  again = predict.predict_study(predict.PredictConfig(model_dirs=(exports["narrow"],), dicom_dir=exports["study"],
                                                      output_dir=output + "2", num_gradcam_slices=0,
                                                      conformal_alpha=0.5))
  answer = again["tasks"]["p"]["conformal"]
  probability = again["tasks"]["p"]["patient_probability"]
  assert answer["negative_max_score"] == pytest.approx(0.3) and answer["positive_max_score"] == pytest.approx(0.1)
  expected = {(True, False): "negative", (False, True): "positive", (True, True): "both", (False, False): "empty"}
  assert answer["members"] == expected[(probability <= 0.3, 1 - probability <= 0.1)]


def test_cohort_csv_carries_the_set_and_alpha(exports):
  root = exports["root"]
  manifest = root / "manifest.csv"
  manifest.write_text(f"patient_id,dicom_dir,label_p,label_sb\next-001,{exports['study']},1,0\n")
  output = str(root / "cohort")
  cohort_predict.run_cohort(cohort_predict.CohortConfig(model_dirs=(exports["narrow"],), manifest_path=str(manifest),
                                                        output_dir=output, num_gradcam_slices=0), progress=False)
  with open(os.path.join(output, "patient_predictions.csv"), newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert rows[0]["conformal_set"] == "uncertain" and rows[0]["conformal_members"] == "both"
  assert float(rows[0]["alpha"]) == 0.2


def _external_csv(path, rows):
  with open(path, "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["task", "patient_id", "label", "probability", "uncertainty", "predicted", "drift_flags",
                     "conformal_set", "conformal_members", "alpha", "site"])
    for index, (label, members) in enumerate(rows):
      answer = members if members in ("negative", "positive") else "uncertain"
      writer.writerow(["p", f"x{index:03d}", label, "0.5", "0.0", "1", "", answer, members, "0.1", "A"])


def test_external_check_flags_a_coverage_shortfall_in_one_line(tmp_path):
  rng = np.random.default_rng(0)
  # Half of the positives' sets miss the truth: coverage of positives ~0.5 against the promised 0.9.
  rows = [(1, "positive" if rng.uniform() < 0.5 else "negative") for _ in range(60)]
  rows += [(0, "negative") for _ in range(60)]
  path = str(tmp_path / "predictions.csv")
  _external_csv(path, rows)
  summary = evaluator.evaluate_predictions(external.ExternalConfig(predictions_path=path,
                                                                   output_dir=str(tmp_path / "e"), num_bootstrap=200))
  entry = summary["p"]["conformal"]
  covered = np.mean([members == "positive" for label, members in rows if label == 1])
  assert entry["coverage_positive"]["estimate"] == pytest.approx(covered)
  assert entry["shortfall"] and "SHORTFALL" in entry["message"] and "\n" not in entry["message"]
  assert "conformal_set" not in entry and "alpha" not in summary["p"].get("subgroups", {})  # not a covariate
  # A cohort whose sets cover as promised is not flagged.
  good = [(1, "positive")] * 50 + [(1, "both")] * 5 + [(0, "negative")] * 55
  _external_csv(path, good)
  summary = evaluator.evaluate_predictions(external.ExternalConfig(predictions_path=path,
                                                                   output_dir=str(tmp_path / "f"), num_bootstrap=200))
  assert not summary["p"]["conformal"]["shortfall"]
  assert summary["p"]["conformal"]["uncertain_share"]["estimate"] == pytest.approx(5 / 110)
  assert json.load(open(os.path.join(tmp_path / "f", "summary.json")))["p"]["conformal"]["alpha"] == 0.1


def test_the_set_signature_gives_each_of_the_four_sets():
  """Bounds put just either side of the patient's probability give {positive}, {negative}, both and none."""
  from pdx_tf import conformal  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import preprocess  # pylint: disable=import-outside-toplevel
  from pdx_tf.serving import signatures  # pylint: disable=import-outside-toplevel

  config = preprocess.PreprocessConfig(image_size=32)
  model = fake_cells.make_fake_model(7, 32, 0.35, config)
  hu = tf.constant(fake_cells.fake_hu_slices(4, 5), tf.float32)
  plain = signatures.PdxServingModule([model], config, "mean", 3)
  probability = float(plain.predict_patient(hu)["patient_probability"].numpy())
  step = 1e-3

  def bound(value):
    return min(max(value, 0.0), 1.0)

  cases = {(bound(probability - step), bound(1 - probability + step)): (0.0, 1.0),
           (bound(probability + step), bound(1 - probability - step)): (1.0, 0.0),
           (bound(probability + step), bound(1 - probability + step)): (1.0, 1.0),
           (bound(probability - step), bound(1 - probability - step)): (0.0, 0.0)}
  for (negative_max, positive_max), expected in cases.items():
    thresholds = conformal.ConformalThresholds(alpha=0.1, negative_max_score=negative_max,
                                               positive_max_score=positive_max, num_negative=9, num_positive=9)
    module = signatures.PdxServingModule([model], config, "mean", 3, conformal_thresholds=thresholds)
    outputs = module.predict_patient_set(hu)
    got = (float(outputs["conformal_negative"].numpy()), float(outputs["conformal_positive"].numpy()))
    assert got == expected, (probability, negative_max, positive_max)
    assert float(outputs["conformal_uncertain"].numpy()) == float(expected[0] == expected[1])
