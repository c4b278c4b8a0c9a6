"""Tests of `train --task=regions` (issue 20, item 3): one probability a PCI region from patient-level labels.

Expectations are independent of the code under test: region labels from the fake records' documented scores
(`fake_pci_scores`' formula, re-implemented here), flips from the keyed augmentation draw, the loss from its formula
in numpy, AUCs from scikit-learn, patient probabilities from the written slice scores with a numpy top-k mean.
"""

import csv
import json
import os

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import roc_auc_score

from pdx_tf import contracts
from pdx_tf.data import augment, records
from pdx_tf.errors import RunsError
from pdx_tf.evaluation import evaluator
from pdx_tf.testing import fake_records
from pdx_tf.training import heads, input_pipeline, model as model_lib, regions, trainer

SIZE = 32
NUM_PATIENTS = 12
UNRECORDED = {1: tuple(range(13)), 2: (3,)}  # patient 1 has no region labels; patient 2 lacks region 3


def _scores(index):
  """The fake records' documented scores (fake_records module docstring), written out again."""
  label_p, label_sb = int(index % 2 == 0), int(index % 4 == 0)
  out = []
  for region in range(13):
    if region in UNRECORDED.get(index, ()):
      out.append(-1)
    elif region >= 9:
      out.append(1 + (index + region) % 3 if label_p and label_sb else 0)
    else:
      out.append((index + region) % 4 if label_p else 0)
  return out


def _region_labels(scores):
  return [-1 if value < 0 else int(value > 0) for value in scores]


def _mirror(values):
  values = list(values)
  for right, left in ((1, 3), (8, 4), (7, 5)):
    values[right], values[left] = values[left], values[right]
  return values


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("records"))
  fake_records.write_fake_records(folder, num_patients=NUM_PATIENTS, slices_per_patient=3, augment_factor=4,
                                  image_size=SIZE, pci=True, pci_unrecorded=UNRECORDED)
  return folder


def _config(records_dir, output_dir, **overrides):
  values = dict(task=contracts.PCI_TASK, records_dir=records_dir, output_dir=str(output_dir), image_size=SIZE,
                alpha=0.35, num_folds=2, num_repeats=1, epochs=1, batch_size=8, pool_fraction=0.5,
                deterministic=True, aggregation="topk_mean", top_k=2)
  values.update(overrides)
  return trainer.config_from_values(values)


def test_the_regions_task_gets_the_regions_head_through_the_registry(records_dir, tmp_path):
  config = _config(records_dir, tmp_path / "r")
  assert config.model.head == heads.REGIONS.name and config.regions
  model = model_lib.build_model(config.model)
  assert model.output_shape == (None, contracts.NUM_PCI_REGIONS)
  with pytest.raises(ValueError, match="does not learn"):
    _config(records_dir, tmp_path / "r", head="attention_mil", aggregation=trainer.MIL_AGGREGATION,
            mil_init_from="x")
  with pytest.raises(ValueError, match="context_slices=0"):
    _config(records_dir, tmp_path / "r", context_slices=1)


def test_region_loss_masks_unrecorded_labels():
  labels = np.array([[1, 0, -1], [-1, -1, -1], [0, 1, 1]], np.float32)
  probabilities = np.array([[0.8, 0.3, 0.9], [0.1, 0.9, 0.5], [0.4, 0.6, 0.7]], np.float32)
  recorded = [(0, 0), (0, 1), (2, 0), (2, 1), (2, 2)]
  bce = [-np.log(probabilities[i, j]) if labels[i, j] == 1 else -np.log(1 - probabilities[i, j]) for i, j in recorded]
  assert float(regions.RegionLoss()(labels, probabilities)) == pytest.approx(np.mean(bce), rel=1e-5)
  assert regions.masked_cross_entropy(labels, probabilities) == pytest.approx(np.mean(bce), rel=1e-6)
  # A patient without region labels trains nothing, whatever the model says.
  assert float(regions.RegionLoss()(labels[1:2], probabilities[1:2])) == 0.0


def test_training_reads_each_records_scores_and_a_flipped_copy_has_the_mirrored_labels(records_dir):
  info = contracts.load_dataset_info(records_dir)
  ids = sorted(info.patients)
  augment_config = augment.AugmentConfig(**info.document["augment"])
  dataset = input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=1.0, shuffle_buffer=0)
  flipped_and_different = 0
  seen = 0
  for example in dataset:
    patient_id = example[records.PATIENT_ID_KEY].numpy().decode()
    slice_index = int(example[records.SLICE_INDEX_KEY].numpy())
    copy = int(example[records.AUGMENTATION_INDEX_KEY].numpy())
    expected = _region_labels(_scores(int(patient_id[-3:])))
    flipped = copy > 0 and augment.random_parameters(0, patient_id, slice_index, copy, augment_config)[1]
    if flipped:
      flipped_and_different += _mirror(expected) != expected
      expected = _mirror(expected)
    target = input_pipeline.label_vector(example, contracts.PCI_TASK).numpy()
    assert target.tolist() == expected, (patient_id, slice_index, copy, flipped)
    seen += 1
  assert seen == NUM_PATIENTS * 3 * 5 and flipped_and_different >= 5


def test_a_cohort_without_region_labels_gets_one_line(tmp_path):
  folder = str(tmp_path / "records")
  fake_records.write_fake_records(folder, num_patients=8, slices_per_patient=3, image_size=SIZE)
  with pytest.raises(RunsError, match="no PCI region scores"):
    trainer.run_grid(_config(folder, tmp_path / "r"))


def _read(path):
  with open(path, newline="") as handle:
    return list(csv.DictReader(handle))


def test_a_regions_grid_writes_region_predictions_that_match_its_slice_scores(records_dir, tmp_path):
  output = tmp_path / "runs"
  config = _config(records_dir, output, inner_fraction=0.5, threshold="inner_youden", epochs=2)
  result = trainer.run_grid(config)
  assert set(result["cells"].values()) == {"complete"}
  split = json.loads((output / "splits.json").read_text())
  all_predicted_pci = {}
  for cell in ("r00_f00", "r00_f01"):
    folder = output / "cells" / cell
    run = json.loads((folder / "run.json").read_text())
    assert run["task"] == "regions" and run["head"] == "regions" and len(run["thresholds"]) == 13
    rows = _read(folder / "region_predictions.csv")
    slice_rows = _read(folder / "region_slice_predictions.csv")
    test_ids = sorted({row["patient_id"] for row in rows})
    assert len(rows) == 13 * len(test_ids)
    # No test patient among the training (or inner) patients.
    assert not set(test_ids) & set(run["inner_validation"]["patients"])
    labels = np.full((len(test_ids), 13), -1)
    probabilities = np.zeros((len(test_ids), 13))
    for row in rows:
      position, region = test_ids.index(row["patient_id"]), int(row["region"])
      labels[position, region] = -1 if row["label"] == "" else int(row["label"])
      probabilities[position, region] = float(row["probability"])
      # The patient probability: the mean of the 2 highest slice scores of that region (topk_mean, k=2).
      mine = sorted((float(r["probability"]) for r in slice_rows
                     if r["patient_id"] == row["patient_id"] and int(r["region"]) == region), reverse=True)
      assert float(row["probability"]) == pytest.approx(np.mean(mine[:2]), abs=2e-7)
    for position, patient_id in enumerate(test_ids):
      assert labels[position].tolist() == _region_labels(_scores(int(patient_id[-3:])))
    metrics = json.loads((folder / "metrics.json").read_text())
    for region in range(13):
      recorded = labels[:, region] >= 0
      if len(set(labels[recorded, region])) == 2:
        assert metrics["region_auc"][region] == pytest.approx(
            roc_auc_score(labels[recorded, region], probabilities[recorded, region]))
      else:
        assert metrics["region_auc"][region] is None
    derived = {(row["patient_id"], row["task"]): float(row["probability"])
               for row in _read(folder / "derived_predictions.csv")}
    for position, patient_id in enumerate(test_ids):
      assert derived[(patient_id, "p")] == pytest.approx(probabilities[position].max(), abs=2e-8)
      assert derived[(patient_id, "sb")] == pytest.approx(probabilities[position, 9:].max(), abs=2e-8)
    # The PCI scale: each region's mean score among the cell's training patients where it is positive.
    train_ids = split["repeats"][0]["folds"][int(cell[-2:])]["train"]
    assert not set(train_ids) & set(test_ids)
    scores = np.array([_scores(int(patient_id[-3:])) for patient_id in train_ids], float)
    for region in range(13):
      positive = scores[:, region] > 0
      if positive.any():
        assert run["pci_scale"][region] == pytest.approx(scores[positive, region].mean())
    predicted_pci = {}
    for position, patient_id in enumerate(test_ids):
      predicted_pci[patient_id] = float(probabilities[position] @ np.asarray(run["pci_scale"]))
    all_predicted_pci.update(predicted_pci)

  # Evaluation: E/region_predictions.csv, per-region AUCs (scikit-learn), the PCI and the AUC map.
  evaluation = tmp_path / "E"
  summary = evaluator.evaluate_runs(evaluator.EvaluateConfig(runs_dir=str(output), output_dir=str(evaluation),
                                                             num_bootstrap=40))["regions"]
  rows = _read(evaluation / "region_predictions.csv")
  assert list(rows[0]) == ["patient_id", "region", "label", "probability"]
  ids = sorted({row["patient_id"] for row in rows})
  assert ids == fake_records.patient_ids(NUM_PATIENTS) and len(rows) == 13 * NUM_PATIENTS
  table = {(row["patient_id"], int(row["region"])): row for row in rows}
  for region in range(13):
    expected_labels = [_region_labels(_scores(int(p[-3:])))[region] for p in ids]
    assert [int(table[(p, region)]["label"]) if table[(p, region)]["label"] else -1 for p in ids] == expected_labels
    recorded = [position for position, label in enumerate(expected_labels) if label >= 0]
    labels = [expected_labels[position] for position in recorded]
    values = [float(table[(ids[position], region)]["probability"]) for position in recorded]
    entry = summary["regions"][region]
    if len(set(labels)) == 2:
      assert entry["auc"] == pytest.approx(roc_auc_score(labels, values))
    else:
      assert entry["auc"] is None
  complete = [p for p in ids if min(_scores(int(p[-3:]))) >= 0]
  true_pci = [sum(_scores(int(p[-3:]))) for p in complete]
  assert summary["pci"]["n_patients"] == len(complete)
  assert summary["pci"]["spearman"] == pytest.approx(
      stats.spearmanr([all_predicted_pci[p] for p in complete], true_pci).statistic)
  assert summary["pci"]["mae"] == pytest.approx(
      np.mean(np.abs(np.asarray([all_predicted_pci[p] for p in complete]) - true_pci)))
  assert (evaluation / "figures" / "region_auc_map.png").stat().st_size > 1000
  assert "## Regions (PCI)" in (evaluation / "report.md").read_text()
