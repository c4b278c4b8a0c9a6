"""External validation (evaluate --predictions): metrics against scikit-learn, unlabelled rows, drift, errors."""

import csv
import os
import sys

import numpy as np
import pytest
from sklearn import linear_model, metrics as sk_metrics

sys.path.insert(0, os.path.dirname(__file__))
import fake_runs  # noqa: E402  pylint: disable=wrong-import-position

from pdx_tf import io_utils  # noqa: E402
from pdx_tf.errors import RunsError  # noqa: E402
from pdx_tf.evaluation import EvaluateConfig, evaluate_predictions, evaluate_runs, ExternalConfig  # noqa: E402
from pdx_tf.evaluation import external, metrics  # noqa: E402

HEADER = ("task", "patient_id", "label", "probability", "uncertainty", "predicted", "ascites", "pci", "site",
          "drift_flags")
UNLABELLED = ("pt003", "pt010")
FLAGGED = {"pt004": "slice thickness 1 mm outside training 5-5 mm", "pt007": "pixel spacing 0.3 mm;body area"}


def write_predictions(path, num_patients=30, seed=5, threshold=0.5, drop_column=None, tasks=("p", "sb")):
  """A predictions CSV in predict's format for the fake cohort: labels, two unknown, two drift-flagged."""
  rng = np.random.default_rng(seed)
  rows = []
  for task in tasks:
    for patient in fake_runs.make_patients(num_patients, seed):
      label = int(patient[f"label_{task}"])
      probability = float(np.round(1.0 / (1.0 + np.exp(-((2 * label - 1) * 1.3 + rng.normal(0, 1.4)))), 6))
      rows.append({
          "task": task, "patient_id": patient["patient_id"],
          "label": "" if patient["patient_id"] in UNLABELLED else str(label),
          "probability": repr(probability), "uncertainty": f"{rng.uniform(0, 0.2):.4f}",
          "predicted": str(int(probability >= threshold)), "ascites": patient["ascites"], "pci": patient["pci"],
          "site": patient["site"], "drift_flags": FLAGGED.get(patient["patient_id"], ""),
      })
  header = [column for column in HEADER if column != drop_column]
  io_utils.atomic_write_csv(path, header, ([row[column] for column in header] for row in rows))
  return path


def _read(path, task):
  with open(path, newline="") as handle:
    return [row for row in csv.DictReader(handle) if row["task"] == task]


@pytest.fixture(name="external_run", scope="module")
def fixture_external_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("external")
  predictions = write_predictions(str(root / "O" / "patient_predictions.csv"))
  output_dir = str(root / "E")
  summary = evaluate_predictions(ExternalConfig(predictions_path=predictions, output_dir=output_dir,
                                                num_bootstrap=200))
  return predictions, output_dir, summary


def test_metrics_equal_sklearn_on_the_csv(external_run):
  predictions, _, summary = external_run
  for task in ("p", "sb"):
    rows = [row for row in _read(predictions, task) if row["label"] != ""]
    labels = np.array([int(row["label"]) for row in rows])
    probabilities = np.array([float(row["probability"]) for row in rows])
    decided = (probabilities >= 0.5).astype(int)
    true_negative, false_positive, false_negative, true_positive = sk_metrics.confusion_matrix(
        labels, decided, labels=[0, 1]).ravel()
    entry = summary[task]
    assert entry["confusion"] == {"true_positive": true_positive, "false_positive": false_positive,
                                  "true_negative": true_negative, "false_negative": false_negative}
    values = entry["metrics"]
    assert values["auc"] == pytest.approx(sk_metrics.roc_auc_score(labels, probabilities))
    assert values["brier"] == pytest.approx(sk_metrics.brier_score_loss(labels, probabilities))
    assert values["sensitivity"] == pytest.approx(sk_metrics.recall_score(labels, decided))
    assert values["specificity"] == pytest.approx(true_negative / (true_negative + false_positive))
    assert values["accuracy"] == pytest.approx(sk_metrics.accuracy_score(labels, decided))
    assert values["balanced_accuracy"] == pytest.approx(sk_metrics.balanced_accuracy_score(labels, decided))
    assert values["ppv"] == pytest.approx(sk_metrics.precision_score(labels, decided))
    assert values["f1"] == pytest.approx(sk_metrics.f1_score(labels, decided))
    interval = entry["ci95"]["auc"]
    assert interval["low"] < values["auc"] < interval["high"] and interval["n_bootstrap_defined"] == 200


def test_calibration_and_covariate_baseline_equal_sklearn(external_run):
  predictions, _, summary = external_run
  rows = [row for row in _read(predictions, "p") if row["label"] != ""]
  labels = np.array([int(row["label"]) for row in rows])
  probabilities = np.array([float(row["probability"]) for row in rows])
  reference = linear_model.LogisticRegression(C=1e12, tol=1e-12, max_iter=10000).fit(
      np.log(probabilities / (1 - probabilities))[:, None], labels)
  assert summary["p"]["calibration"]["slope"] == pytest.approx(reference.coef_[0, 0], abs=1e-4)
  assert summary["p"]["calibration"]["intercept"] == pytest.approx(reference.intercept_[0], abs=1e-4)
  baselines = summary["p"]["covariate_baselines"]["covariates"]
  assert baselines["pci"]["auc"]["estimate"] == pytest.approx(
      sk_metrics.roc_auc_score(labels, [float(row["pci"]) for row in rows]))
  assert "site" not in baselines and baselines["ascites"]["kind"].startswith("ordinal")


def test_unlabelled_rows_are_counted_not_scored(external_run, tmp_path):
  predictions, _, summary = external_run
  entry = summary["p"]
  assert entry["n_rows"] == 30 and entry["n_unlabelled"] == len(UNLABELLED) and entry["n_patients"] == 28
  assert entry["predictions_only"]["n_patients"] == len(UNLABELLED)
  # Dropping the unlabelled rows from the CSV changes no metric.
  kept = [row for row in _read(predictions, "p") if row["label"] != ""]
  path = str(tmp_path / "labelled.csv")
  io_utils.atomic_write_csv(path, HEADER, ([row[column] for column in HEADER] for row in kept))
  only_labelled = evaluate_predictions(ExternalConfig(predictions_path=path, output_dir=str(tmp_path / "E"),
                                                      num_bootstrap=0))
  assert only_labelled["p"]["metrics"] == entry["metrics"] and only_labelled["p"]["n_unlabelled"] == 0


def test_drift_flagged_patients_are_reported_apart(external_run):
  predictions, output_dir, summary = external_run
  drift = summary["p"]["drift"]
  assert [item["patient_id"] for item in drift["patients"]] == sorted(FLAGGED)
  assert drift["patients"][1]["reasons"] == ["pixel spacing 0.3 mm", "body area"]
  rows = [row for row in _read(predictions, "p") if row["label"] != ""]
  flagged = [row for row in rows if row["drift_flags"]]
  rest = [row for row in rows if not row["drift_flags"]]
  for group, key in ((flagged, "metrics_flagged"), (rest, "metrics_not_flagged")):
    labels = [int(row["label"]) for row in group]
    decided = [int(float(row["probability"]) >= 0.5) for row in group]
    assert drift[key]["accuracy"] == pytest.approx(sk_metrics.accuracy_score(labels, decided)), key
  listed = io_utils.read_csv(os.path.join(output_dir, external.FLAGGED_PATIENTS_FILE))
  assert sorted((row["task"], row["patient_id"]) for row in listed) == sorted(
      (task, patient_id) for task in ("p", "sb") for patient_id in FLAGGED)
  with open(os.path.join(output_dir, "report.md")) as handle:
    text = handle.read()
  assert "Flagged patients." in text and "pt007 | 1 |" not in text  # pt007 is negative for p: label 0
  assert "| pt004 | 1 |" in text and "slice thickness 1 mm" in text


def test_summary_metric_keys_equal_the_cross_validation_summary(external_run, tmp_path):
  _, output_dir, summary = external_run
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=1, num_folds=2, num_patients=12)
  cv = evaluate_runs(EvaluateConfig(runs_dir=runs_dir, output_dir=str(tmp_path / "cv"), num_bootstrap=10))["p"]
  entry = summary["p"]
  assert set(entry["metrics"]) == set(cv["per_repeat"]) == set(cv["per_cell"]) == set(metrics.METRIC_NAMES)
  assert set(entry["ci95"]) == set(cv["pooled_ci95"])
  assert set(entry["ci95"]["auc"]) == set(cv["pooled_ci95"]["auc"])
  assert set(entry["covariate_baselines"]) == set(cv["covariate_baselines"])
  assert set(entry["decision_curve"]) == set(cv["decision_curve"])
  for name in ("summary.json", "report.md", "report.html", "model_card.md", "config.json", "figures/roc.png",
               "figures/calibration.png", "figures/decision_curve.png"):
    assert os.path.getsize(os.path.join(output_dir, name)) > 0, name
  assert io_utils.read_json(os.path.join(output_dir, "summary.json")) == summary


def test_runs_dir_puts_internal_figures_beside_external(tmp_path):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, num_repeats=2, num_folds=3, num_patients=24)
  predictions = write_predictions(str(tmp_path / "predictions.csv"), tasks=("p",))
  output_dir = str(tmp_path / "E")
  summary = evaluate_predictions(ExternalConfig(predictions_path=predictions, output_dir=output_dir,
                                                runs_dir=runs_dir, num_bootstrap=20))
  assert set(summary) == {"p"}
  internal = summary["p"]["internal_cross_validation"]
  assert internal["n_cells"] == 6 and set(internal["per_repeat"]) == set(metrics.METRIC_NAMES)
  with open(os.path.join(output_dir, "report.md")) as handle:
    text = handle.read()
  auc = internal["per_repeat"]["auc"]["mean"]
  assert "Internal CV, per repeat (95 % CI)" in text and f"{auc:.3f}" in text
  with open(os.path.join(output_dir, "model_card.md")) as handle:
    card = handle.read()
  assert "### Internal validation" in card and "### External validation" in card


def test_missing_column_is_one_line_naming_file_and_column(tmp_path):
  path = write_predictions(str(tmp_path / "predictions.csv"), drop_column="uncertainty")
  with pytest.raises(RunsError) as raised:
    external.read_predictions(path)
  message = str(raised.value)
  assert "\n" not in message and path in message and "lacks the column uncertainty" in message


@pytest.mark.parametrize("bad", ["1.2", "nan", "-0.1", "abc"])
def test_bad_probability_is_one_line_naming_the_row(tmp_path, bad):
  path = write_predictions(str(tmp_path / "predictions.csv"))
  with open(path) as handle:
    lines = handle.read().splitlines()
  fields = lines[5].split(",")
  fields[3] = bad
  lines[5] = ",".join(fields)
  with open(path, "w") as handle:
    handle.write("\n".join(lines) + "\n")
  with pytest.raises(RunsError) as raised:
    external.read_predictions(path)
  message = str(raised.value)
  assert "\n" not in message and f"{path} line 6 (task {fields[0]}, patient {fields[1]})" in message
  assert repr(bad) in message


def test_unknown_task_in_tasks_flag_fails_before_writing(tmp_path):
  path = write_predictions(str(tmp_path / "predictions.csv"), tasks=("p",))
  with pytest.raises(RunsError, match="no rows for task"):
    evaluate_predictions(ExternalConfig(predictions_path=path, output_dir=str(tmp_path / "E"), tasks=("sb",)))
  assert not os.path.exists(tmp_path / "E")
