"""End-to-end tests of evaluate_runs: every output file, summary.json schema, reports, TensorBoard."""

import glob
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as sklearn_metrics

sys.path.insert(0, os.path.dirname(__file__))
import fake_runs  # noqa: E402  pylint: disable=wrong-import-position

from pdx_tf import configs, io_utils  # noqa: E402
from pdx_tf.evaluation import EvaluateConfig, evaluate_runs, format_paper_table, metrics  # noqa: E402
from pdx_tf.evaluation import report  # noqa: E402

STATISTIC_KEYS = {"n", "mean", "sd", "median", "p2_5", "p97_5"}


@pytest.fixture(name="evaluated", scope="module")
def fixture_evaluated(tmp_path_factory):
  root = tmp_path_factory.mktemp("e2e")
  runs_dir, output_dir = str(root / "runs"), str(root / "evaluation")
  fake_runs.write_fake_runs(runs_dir, num_repeats=2, num_folds=3, num_patients=24)
  summary = evaluate_runs(EvaluateConfig(runs_dir=runs_dir, output_dir=output_dir, num_bootstrap=50))
  return runs_dir, output_dir, summary


def test_all_output_files_are_written(evaluated):
  _, output_dir, _ = evaluated
  for name in ("config.json", "summary.json", "patient_predictions.csv", "cell_metrics.csv", "report.md",
               "report.html", "figures/roc.png", "figures/metrics_box.png", "figures/calibration.png",
               "figures/subgroups.png", "figures/decision_curve.png"):
    assert os.path.getsize(os.path.join(output_dir, name)) > 0, name
  assert io_utils.read_json(os.path.join(output_dir, "config.json"))["num_bootstrap"] == 50


def test_summary_json_schema_and_strict_json(evaluated):
  _, output_dir, summary = evaluated
  with open(os.path.join(output_dir, "summary.json")) as handle:
    text = handle.read()
  # Strict JSON: NaN/Infinity are not JSON, undefined values must be null.
  loaded = json.loads(text, parse_constant=lambda name: pytest.fail(f"non-JSON constant {name}"))
  assert loaded == summary
  assert set(loaded) == {"p", "sb"}
  for task, entry in loaded.items():
    assert entry["task"] == task and entry["partial"] is False and entry["missing_cells"] == []
    assert entry["n_cells"] == 6 and entry["threshold"] == 0.5
    for view in ("per_cell", "per_repeat"):
      assert set(entry[view]) == set(metrics.METRIC_NAMES)
      for statistics in entry[view].values():
        assert set(statistics) == STATISTIC_KEYS
    assert set(entry["pooled_ci95"]) == set(metrics.METRIC_NAMES)
    assert set(entry["pooled_ci95"]["auc"]) == {"estimate", "low", "high", "n_bootstrap_defined"}
    assert set(entry["slice_level"]) == {"per_cell", "per_repeat"}
    assert set(entry["subgroups"]) == {"ascites", "pci", "site"}
    assert "descriptive" in entry["youden"]["note"]


def test_patient_predictions_csv(evaluated):
  _, output_dir, summary = evaluated
  rows = io_utils.read_csv(os.path.join(output_dir, "patient_predictions.csv"))
  assert list(rows[0]) == ["task", "repeat", "fold", "patient_id", "label", "probability", "predicted"]
  assert len(rows) == 2 * 2 * 24  # tasks x repeats x patients
  for row in rows:
    assert row["predicted"] == str(int(float(row["probability"]) >= 0.5))
  # Recomputing a pooled repeat from the CSV gives the summary's per-repeat values.
  accuracies = []
  for repeat in ("0", "1"):
    selected = [row for row in rows if row["task"] == "p" and row["repeat"] == repeat]
    accuracies.append(np.mean([row["label"] == row["predicted"] for row in selected]))
  assert summary["p"]["per_repeat"]["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))


def test_cell_metrics_csv(evaluated):
  _, output_dir, summary = evaluated
  rows = io_utils.read_csv(os.path.join(output_dir, "cell_metrics.csv"))
  assert len(rows) == 2 * 6 * 2  # tasks x cells x levels
  assert set(metrics.METRIC_NAMES) <= set(rows[0])
  sensitivities = [float(row["sensitivity"]) for row in rows
                   if row["task"] == "p" and row["level"] == "patient" and row["sensitivity"] != ""]
  assert summary["p"]["per_cell"]["sensitivity"]["mean"] == pytest.approx(np.mean(sensitivities))


def test_html_report_is_self_contained(evaluated):
  _, output_dir, _ = evaluated
  with open(os.path.join(output_dir, "report.html")) as handle:
    text = handle.read()
  assert text.count('<img alt="') == 5
  assert text.count('src="data:image/png;base64,') == 5
  assert not re.search(r'(src|href)\s*=\s*["\'](?!data:)', text, flags=re.IGNORECASE)
  assert "<link" not in text and "<script" not in text and "@import" not in text
  assert "P-Model" in text and "SB-Model" in text and "68.8" in text and "PARTIAL" not in text


def test_markdown_report(evaluated):
  _, output_dir, _ = evaluated
  with open(os.path.join(output_dir, "report.md")) as handle:
    text = handle.read()
  assert "## Paper table" in text and "![roc](figures/roc.png)" in text
  assert "| SB-Model | paper (own private cohort) | 86.4 | 77.5 | 81.9 | n/a |" in text


def test_paper_table(evaluated):
  _, _, summary = evaluated
  table = format_paper_table(summary)
  lines = table.splitlines()
  assert lines[1].split() == ["Model", "Source", "Sensitivity", "%", "Specificity", "%", "Accuracy", "%", "AUC"]
  paper_p = [line for line in lines if line.startswith("P-Model") and "paper" in line][0]
  assert paper_p.split()[-4:] == ["68.8", "85.8", "77.3", "n/a"]
  ours = [line for line in lines if line.startswith("P-Model") and "this run" in line][0]
  # Expected values from the runs' own predictions, not from the summary: the per-cell mean of sensitivity,
  # specificity and accuracy at 0.5 and of scikit-learn's AUC, in percent.
  runs_dir = evaluated[0]
  per_cell = {"sensitivity": [], "specificity": [], "accuracy": [], "auc": []}
  for cell in sorted(glob.glob(os.path.join(runs_dir, "p", "cells", "*"))):
    rows = io_utils.read_csv(os.path.join(cell, "patient_predictions.csv"))
    labels = np.array([int(row["label"]) for row in rows])
    probabilities = np.array([float(row["probability"]) for row in rows])
    predicted = (probabilities >= 0.5).astype(int)
    per_cell["sensitivity"].append(np.mean(predicted[labels == 1] == 1))
    per_cell["specificity"].append(np.mean(predicted[labels == 0] == 0))
    per_cell["accuracy"].append(np.mean(predicted == labels))
    per_cell["auc"].append(sklearn_metrics.roc_auc_score(labels, probabilities))
  assert len(per_cell["auc"]) == 6
  numbers = [float(match) for match in re.findall(r"(\d+\.\d+) \(", ours)]
  assert len(numbers) == 4, ours
  for found, metric in zip(numbers, ("sensitivity", "specificity", "accuracy")):
    assert found == pytest.approx(100 * np.mean(per_cell[metric]), abs=0.051), (metric, ours)
  assert numbers[3] == pytest.approx(np.mean(per_cell["auc"]), abs=0.00051), ours  # AUC: three decimals
  interval = summary["p"]["per_cell_ci95"]["sensitivity"]
  assert f"({100 * interval['low']:.1f}-{100 * interval['high']:.1f})" in ours
  assert interval["low"] <= np.mean(per_cell["sensitivity"]) <= interval["high"]


def test_paper_table_shows_undefined_values_as_na():
  entry = {"threshold": 0.5, "n_cells": 1, "n_expected_cells": 1, "partial": False,
           "per_cell": {name: {"mean": None} for name in metrics.METRIC_NAMES}, "per_cell_ci95": {}}
  rows = report.paper_table_rows({"p": entry})
  assert rows[0][2:] == ["n/a"] * 4


def test_paper_table_caption_names_each_task_threshold_when_they_differ():
  fixed = {"threshold": 0.5}
  assert "each scored on its own held-out fold at threshold 0.5 (" in report.paper_table_caption(
      {"p": fixed, "sb": dict(fixed)})
  # A joint grid with inner validation: each head's cells fit their own Youden thresholds.
  own = {"p": {"threshold": 0.6541, "threshold_source": "cells", "threshold_rules": ["inner_youden"]},
         "sb": {"threshold": 0.2131, "threshold_source": "cells", "threshold_rules": ["inner_youden"]}}
  caption = report.paper_table_caption(own)
  assert ("held-out fold at its task's threshold (P-Model: each model's own (inner_youden, mean 0.654); SB-Model:"
          " each model's own (inner_youden, mean 0.213)) (95 %") in caption
  assert "0.5" not in caption.split("(95 %")[0]


def _events(logdir):
  files = glob.glob(os.path.join(logdir, "events.out.tfevents.*"))
  assert len(files) == 1
  for event in tf.compat.v1.train.summary_iterator(files[0]):
    for value in event.summary.value:
      yield event.step, value


def test_tensorboard_pr_curves_and_histograms(evaluated):
  runs_dir, _, _ = evaluated
  values = list(_events(os.path.join(runs_dir, "tensorboard", "evaluate")))
  pr_curves = [(step, value) for step, value in values if value.tag == "p/pr_curve/patient"]
  assert sorted(step for step, _ in pr_curves) == [0, 1]
  step, value = pr_curves[0]
  assert value.metadata.plugin_data.plugin_name == "pr_curves"
  assert value.metadata.plugin_data.content == b"\x10\xc9\x01"  # PrCurvePluginData(num_thresholds=201)
  tensor = tf.make_ndarray(value.tensor)
  assert tensor.shape == (6, 201)
  assert tensor[0, 0] + tensor[3, 0] == 12  # TP + FN at threshold 0: the 12 positives of repeat 0
  tags = {value.tag for _, value in values}
  assert {"sb/pr_curve/slice", "p/per_cell/sensitivity", "p/per_repeat/auc", "p/status"} <= tags


def test_partial_grid_is_marked_everywhere(tmp_path):
  runs_dir, output_dir = str(tmp_path / "runs"), str(tmp_path / "evaluation")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=2, num_folds=3, num_patients=24,
                            skip_cells=[("p", 1, 2)])
  summary = evaluate_runs(EvaluateConfig(runs_dir=runs_dir, output_dir=output_dir, allow_partial=True,
                                         num_bootstrap=0))
  entry = summary["p"]
  assert entry["partial"] is True and entry["n_cells"] == 5 and entry["n_expected_cells"] == 6
  assert entry["missing_cells"] == [{"repeat": 1, "fold": 2, "name": "r01_f02"}]
  assert "PARTIAL" in format_paper_table(summary)
  for name in ("report.md", "report.html"):
    with open(os.path.join(output_dir, name)) as handle:
      text = handle.read()
    assert "PARTIAL" in text and "r01_f02" in text, name
  assert io_utils.read_json(os.path.join(output_dir, "summary.json"))["p"]["partial"] is True
  status = [value for _, value in _events(os.path.join(runs_dir, "tensorboard", "evaluate"))
            if value.tag == "p/status"]
  assert b"PARTIAL" in tf.make_ndarray(status[0].tensor).item()


def test_config_is_validated():
  with pytest.raises(ValueError, match="threshold"):
    EvaluateConfig(runs_dir="r", output_dir="e", threshold=1.0)
  with pytest.raises(ValueError, match="unknown task"):
    EvaluateConfig(runs_dir="r", output_dir="e", tasks=("q",))
  with pytest.raises(ValueError, match="num_bootstrap"):
    EvaluateConfig(runs_dir="r", output_dir="e", num_bootstrap=-1)
  with pytest.raises(ValueError, match="unknown EvaluateConfig keys"):
    configs.from_dict(EvaluateConfig, {"runs_dir": "r", "output_dir": "e", "bootstrap": 3})
  config = EvaluateConfig(runs_dir="r", output_dir="e", tasks=["p"])
  assert config.tasks == ("p",) and configs.from_dict(EvaluateConfig, configs.to_dict(config)) == config
  assert not math.isnan(config.threshold)


def test_grid_clinical_sections_match_an_independent_computation(evaluated):
  runs_dir, output_dir, summary = evaluated
  from sklearn import metrics as sk_metrics  # pylint: disable=import-outside-toplevel
  rows = io_utils.read_csv(os.path.join(output_dir, "patient_predictions.csv"))
  patients = {row["patient_id"]: row for row in io_utils.read_csv(os.path.join(runs_dir, "p", "patients.csv"))}
  entry = summary["p"]
  # Covariate baseline: PCI alone as the score over every evaluated patient, as sklearn computes it.
  ids = sorted(patients)
  expected_pci = sk_metrics.roc_auc_score([int(patients[p]["label_p"]) for p in ids],
                                          [float(patients[p]["pci"]) for p in ids])
  baselines = entry["covariate_baselines"]
  assert baselines["covariates"]["pci"]["auc"]["estimate"] == pytest.approx(expected_pci)
  assert baselines["covariates"]["ascites"]["kind"].startswith("ordinal (none < small")
  assert "site" not in baselines["covariates"]
  assert baselines["model_auc"] == entry["pooled_ci95"]["auc"]
  # Decision curve at 0.2: net benefit of each repeat's pooled predictions, averaged.
  values = []
  for repeat in ("0", "1"):
    selected = [row for row in rows if row["task"] == "p" and row["repeat"] == repeat]
    treated = [row for row in selected if float(row["probability"]) >= 0.2]
    true_positive = sum(row["label"] == "1" for row in treated)
    false_positive = len(treated) - true_positive
    values.append(true_positive / len(selected) - false_positive / len(selected) * 0.25)
  row = next(item for item in entry["decision_curve"]["table"] if item["threshold"] == 0.2)
  assert row["model"] == pytest.approx(np.mean(values))
  assert set(entry["calibration"]["slope"]) == STATISTIC_KEYS and entry["calibration"]["slope"]["n"] == 2
  assert set(entry["failure_analysis"]) == {"sensitivity", "specificity"}
  with open(os.path.join(output_dir, "report.md")) as handle:
    text = handle.read()
  assert "Covariate baselines" in text and "pci alone" in text and "Decision curve at selected" in text
  assert "Calibration slope" in text and "![decision_curve](figures/decision_curve.png)" in text
