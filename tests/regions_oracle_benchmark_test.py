"""The regions oracle's label tables and pointing game (benchmarks/regions_oracle_benchmark.py), by hand."""

import numpy as np
import pytest

from benchmark_loader import load_benchmark

oracle = load_benchmark("regions_oracle_benchmark")


def test_slice_region_tables_count_disease_voxels_inside_each_region():
  region_map = np.full((3, 4, 4), -1, np.int8)
  region_map[:, :2, :] = 1          # region 1: the top half of every slice
  region_map[2, 2:, :] = 9          # region 9: the bottom half of slice 2 only
  disease = np.zeros((3, 4, 4), bool)
  disease[0, 0, :2] = True          # slice 0: 2 voxels in region 1 (exactly min_voxels)
  disease[1, 0, :1] = True          # slice 1: 1 voxel in region 1 (below min_voxels = 2)
  disease[2, 3, :] = True           # slice 2: 4 voxels in region 9
  disease[2, 3, 0] = True
  labels, present = oracle.slice_region_tables(disease, region_map, min_voxels=2)
  expected_labels = np.zeros((3, 13), np.int32)
  expected_labels[0, 1] = 1
  expected_labels[2, 9] = 1
  np.testing.assert_array_equal(labels, expected_labels)
  expected_present = np.zeros((3, 13), bool)
  expected_present[:, 1] = True
  expected_present[2, 9] = True
  np.testing.assert_array_equal(present, expected_present)


def test_pointing_counts_hits_and_chance_per_positive_region():
  # Two patients of 4 slices. Region 0 lies on slices 0-1 of each; region 5 on slices 2-3.
  slice_patient = np.repeat([0, 1], 4)
  present = np.zeros((8, 13), bool)
  for patient in (0, 1):
    present[4 * patient + np.array([0, 1]), 0] = True
    present[4 * patient + np.array([2, 3]), 5] = True
  scores = np.zeros((8, 13))
  scores[1, 0] = 0.9   # patient 0, region 0: argmax slice 1, inside (hit)
  scores[7, 5] = 0.8   # patient 1, region 5: argmax slice 3, inside (hit)
  scores[4, 0] = 0.1
  scores[6, 0] = 0.7   # patient 1, region 0: argmax slice 2, outside (miss)
  labels = np.zeros((2, 13), int)
  labels[0, 0] = 1
  labels[1, 0] = labels[1, 5] = 1
  result = oracle.pointing(scores, present, slice_patient, labels)
  assert result["n"] == 3
  assert result["hit_rate"] == pytest.approx(2 / 3)
  assert result["chance"] == pytest.approx(0.5)   # each region covers 2 of its patient's 4 slices
  assert result["ratio"] == pytest.approx(4 / 3)
  # A region with nothing to hit by the rule (no slice present) is left out, not counted as a miss.
  labels[0, 7] = 1
  assert oracle.pointing(scores, present, slice_patient, labels)["n"] == 3


def test_region_figures_match_a_hand_count():
  scores = np.zeros((4, 13), int)
  scores[:2, 0] = [1, 3]             # region 0 positive in patients 0, 1
  scores[2, 9] = 2                   # region 9 positive in patient 2
  probability = np.full((4, 13), 0.5)
  probability[:, 0] = [0.9, 0.8, 0.1, 0.2]    # region 0: perfect ranking
  probability[:, 9] = [0.6, 0.7, 0.5, 0.8]    # region 9: the positive ranks last: AUC 0
  figures = oracle.region_figures(probability, scores)
  assert figures["region_auc"][0] == pytest.approx(1.0)
  assert figures["region_auc"][9] == pytest.approx(0.0)
  assert np.isnan(figures["region_auc"][3])   # no positive: undefined, left out of the macro mean
  assert figures["macro_auc"] == pytest.approx(0.5)
  assert figures["small_bowel_macro_auc"] == pytest.approx(0.0)
  assert figures["region_n_positive"][0] == 2
