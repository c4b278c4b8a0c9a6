"""regions_benchmark's rescoring of a finished grid by other aggregation rules, against hand-computed figures."""

import csv
import os

import numpy as np
import pytest

from benchmark_loader import load_benchmark

bench = load_benchmark("regions_benchmark")


def _write(path, header, rows):
  with open(path, "w", newline="", encoding="utf-8") as handle:
    writer = csv.writer(handle)
    writer.writerow(header)
    writer.writerows(rows)


def test_rescore_reaggregates_slice_scores_and_scores_them_by_hand(tmp_path):
  cell = tmp_path / "cells" / "r00_f00"
  os.makedirs(cell)
  # Four patients, two slices each. Region 0 is positive for A and B; region 9 for C only; D has none.
  slice_scores = {"A": [0.9, 0.1], "B": [0.3, 0.3], "C": [0.2, 0.25], "D": [0.6, 0.0]}
  region9 = {"A": [0.1, 0.1], "B": [0.2, 0.1], "C": [0.0, 0.6], "D": [0.0, 0.0]}
  rows = []
  for patient in "ABCD":
    for index in range(2):
      for region in range(13):
        value = slice_scores[patient][index] if region == 0 else region9[patient][index] if region == 9 else 0.5
        rows.append([patient, index, region, value])
  _write(cell / "region_slice_predictions.csv", ["patient_id", "slice_index", "region", "probability"], rows)
  labels = {"A": {0: 1}, "B": {0: 1}, "C": {9: 1}, "D": {}}
  scores = {"A": {0: 2}, "B": {0: 1}, "C": {9: 3}, "D": {}}
  _write(cell / "region_predictions.csv", ["patient_id", "region", "label", "score", "probability"],
         [[patient, region, labels[patient].get(region, 0), scores[patient].get(region, 0), 0.5]
          for patient in "ABCD" for region in range(13)])
  result = bench.rescore(str(tmp_path), ["mean", "max"])
  # Region 0, mean: positives A 0.5, B 0.3 against negatives C 0.225, D 0.3: 3.5 of 4 pairs (one tie) = 0.875.
  # Region 0, max: positives A 0.9, B 0.3 against C 0.25, D 0.6: 3 of 4 = 0.75 (the rules differ here).
  # Region 9 (small bowel): C is highest under both rules (mean 0.3, max 0.6): AUC 1.
  # Every other region has no positive and is left out (regions 10-12 too: small bowel = region 9).
  assert result["mean"]["region_auc"][0] == pytest.approx(0.875)
  assert result["max"]["region_auc"][0] == pytest.approx(0.75)
  for rule in ("mean", "max"):
    assert result[rule]["region_auc"][9] == pytest.approx(1.0)
    assert np.isnan(result[rule]["region_auc"][5])
    assert result[rule]["small_bowel_macro_auc"] == pytest.approx(1.0)
  assert result["mean"]["macro_auc"] == pytest.approx((0.875 + 1.0) / 2)
  assert result["max"]["macro_auc"] == pytest.approx((0.75 + 1.0) / 2)
  # PCI: A 2, B 1, C 3, D 0. Summed probabilities (11 regions at 0.5 each add 5.5 to all):
  # mean: A 6.1, B 5.95, C 6.025, D 5.8 -> ranks A4 C3 B2 D1 against the PCI's C4 A3 B2 D1: 1 - 6 * 2 / 60 = 0.8;
  # max:  A 6.5, B 6.0, C 6.35, D 6.1 -> ranks A4 C3 D2 B1: squared rank differences 4: 1 - 6 * 4 / 60 = 0.6.
  assert result["mean"]["pci_spearman_of_summed_probabilities"] == pytest.approx(0.8)
  assert result["max"]["pci_spearman_of_summed_probabilities"] == pytest.approx(0.6)


def test_rescore_of_a_banded_grid_reads_each_region_from_its_band(tmp_path):
  # Ten slices a patient; region 2 (epigastrium, upper row) may show on slices 6-9 only (t = i/9 >= 2/3 - 0.1).
  cell = tmp_path / "cells" / "r00_f00"
  os.makedirs(cell)
  (cell / "run.json").write_text('{"config": {"region_bands": true}}')
  # A is positive for region 2 but its column peaks on slice 0 (the pelvis: not evidence for region 2);
  # B is negative with 0.4 on its upper slices; A's upper slices are 0.6.
  column = {"A": [0.95] + [0.1] * 5 + [0.6] * 4, "B": [0.2] * 6 + [0.4] * 4}
  rows = [[patient, index, region, column[patient][index] if region == 2 else 0.5]
          for patient in "AB" for index in range(10) for region in range(13)]
  _write(cell / "region_slice_predictions.csv", ["patient_id", "slice_index", "region", "probability"], rows)
  _write(cell / "region_predictions.csv", ["patient_id", "region", "label", "score", "probability"],
         [[patient, region, int(patient == "A" and region == 2), 2 if patient == "A" and region == 2 else 0, 0.5]
          for patient in "AB" for region in range(13)])
  banded = bench.rescore(str(tmp_path), ["mean"])
  # In band, the mean of slices 6-9: A 0.6 > B 0.4, AUC 1.
  assert banded["mean"]["region_auc"][2] == pytest.approx(1.0)
  (cell / "run.json").write_text('{"config": {}}')
  column["B"] = [0.99] * 6 + [0.4] * 4  # B's lower slices now outscore A's upper ones over all slices
  rows = [[patient, index, region, column[patient][index] if region == 2 else 0.5]
          for patient in "AB" for index in range(10) for region in range(13)]
  _write(cell / "region_slice_predictions.csv", ["patient_id", "slice_index", "region", "probability"], rows)
  assert bench.rescore(str(tmp_path), ["max"])["max"]["region_auc"][2] == pytest.approx(0.0)  # 0.95 < 0.99
  (cell / "run.json").write_text('{"config": {"region_bands": true}}')
  assert bench.rescore(str(tmp_path), ["max"])["max"]["region_auc"][2] == pytest.approx(1.0)  # 0.6 > 0.4
