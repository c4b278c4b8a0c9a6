"""The model card (model_card.md): every CLAIM / TRIPOD+AI field present and equal to the fake grid's metadata."""

import glob
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fake_runs  # noqa: E402  pylint: disable=wrong-import-position

from pdx_tf import io_utils  # noqa: E402
from pdx_tf.evaluation import EvaluateConfig, evaluate_runs  # noqa: E402

# What the real trainer writes into run.json beyond the fake grid's fields (pdx_tf/training/trainer.py).
PREPROCESS = {"image_size": 48, "body_threshold_hu": -500.0, "crop_margin_fraction": 0.04}
REGION = {"region": "abdomen", "slice_spacing_mm": 5.0}
MODEL = {"image_size": 48, "alpha": 0.35, "weights": "none"}


@pytest.fixture(name="card", scope="module")
def fixture_card(tmp_path_factory):
  root = tmp_path_factory.mktemp("card")
  runs_dir = str(root / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=2, num_folds=3, num_patients=18)
  for path in glob.glob(os.path.join(runs_dir, "p", "cells", "*", "run.json")):
    run = io_utils.read_json(path)
    run.update({"preprocess": PREPROCESS, "region": REGION, "aggregation": "topk_mean", "aggregation_top_k": 3,
                "records_hash": "ab" * 32, "code_version": "git:1234abcd"})
    run["config"] = {"model": MODEL, "epochs": 7, "batch_size": 16, "pool_fraction": 0.25}
    io_utils.atomic_write_json(path, run)
  summary = evaluate_runs(EvaluateConfig(runs_dir=runs_dir, output_dir=str(root / "E"), num_bootstrap=30))
  with open(root / "E" / "model_card.md") as handle:
    return handle.read(), summary["p"], io_utils.read_json(os.path.join(runs_dir, "p", "splits.json"))


def test_card_has_every_section(card):
  text, _, _ = card
  for heading in ("# Model card (CLAIM 2024 / TRIPOD+AI)", "## Intended use", "### Data and partitions (patient "
                  "level)", "### Model and training", "### Preprocessing and augmentation", "### Ensembling rule",
                  "### Internal validation", "### Failure analysis by subgroup", "## Limitations"):
    assert heading in text, heading


def test_card_matches_the_run_metadata(card):
  text, entry, splits = card
  assert f"patient-level {splits['num_folds']}-fold cross-validation x {len(splits['repeats'])} repeats" in text
  assert f"split hash {entry['split_hash'][:12]}" in text
  assert "Development cohort (patients.csv): 18 patients, 9 positive, 9 negative" in text
  assert "covariates: ascites, pci, site" in text
  assert 'Preprocessing: body_threshold_hu=-500.0; crop_margin_fraction=0.04; image_size=48.' in text
  assert 'Region (slices read): region="abdomen"; slice_spacing_mm=5.0.' in text
  assert 'Model: alpha=0.35; image_size=48; weights="none".' in text
  assert "Training: batch_size=16; epochs=7; pool_fraction=0.25." in text
  assert "Slice to patient: `topk_mean` (top_k 3)." in text
  assert "averages the probabilities of the 6 models; a patient is positive when its probability >= 0.5" in text
  assert "Code version: git:1234abcd; records hash: abababababab." in text
  assert "Initialisation seeds: 0, 1." in text  # fake_runs: init = seed + repeat
  assert "records' dataset.json (records hash abababababab), which evaluate does not read" in text


def test_card_reports_cis_and_failures_from_the_summary(card):
  text, entry, _ = card
  interval = entry["pooled_ci95"]["auc"]
  assert (f"ROC AUC: {entry['per_repeat']['auc']['mean']:.3f} ({interval['low']:.3f}-{interval['high']:.3f})"
          in text)
  pci = entry["covariate_baselines"]["covariates"]["pci"]["auc"]
  assert f"`pci` alone (numeric, 18 patients): AUC {pci['estimate']:.3f}" in text
  worst = entry["failure_analysis"]["sensitivity"][0]
  assert f"Lowest sensitivity: {worst['covariate']} = {worst['group']} ({worst['n_patients']} patients): " \
         f"{100 * worst['sensitivity']:.1f} %" in text
