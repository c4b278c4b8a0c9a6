"""Tests for benchmarks/oracle_aggregation.py's patient rules, against values written out by hand."""

import numpy as np
import pytest

from benchmark_loader import load_benchmark

aggregation = load_benchmark("oracle_aggregation")


def test_each_rule_scores_a_patient_from_its_own_finite_slices():
  slice_scores = np.array([0.9, 0.1, 0.5, np.nan, 0.2, 0.4, np.nan])
  slice_patient = np.array([0, 0, 0, 0, 1, 1, 2])
  by_rule = {rule: aggregation.aggregate(slice_scores, slice_patient, 3, rule) for rule in aggregation.RULES}
  np.testing.assert_allclose(by_rule["max"][:2], [0.9, 0.4])
  np.testing.assert_allclose(by_rule["top2_mean"][:2], [(0.9 + 0.5) / 2, (0.4 + 0.2) / 2])
  np.testing.assert_allclose(by_rule["top3_mean"][:2], [0.5, 0.3])  # patient 1 has 2: both
  np.testing.assert_allclose(by_rule["top5_mean"][:2], [0.5, 0.3])
  np.testing.assert_allclose(by_rule["mean"][:2], [0.5, 0.3])
  # noisy-or 1 - prod(1 - p) = 1 - 0.1 * 0.9 * 0.5 = 0.955 and 1 - 0.8 * 0.6 = 0.52, recorded as -log(1 - it).
  np.testing.assert_allclose(by_rule["noisy_or"][:2], [-np.log(1 - 0.955), -np.log(1 - 0.52)])
  assert all(np.isnan(scores[2]) for scores in by_rule.values())  # no finite slice: no score
  with pytest.raises(ValueError, match="unknown rule 'median'"):
    aggregation.aggregate(slice_scores, slice_patient, 3, "median")


def test_the_copied_rules_agree_with_oracle_benchmarks():
  oracle = load_benchmark("oracle_benchmark")
  assert aggregation.TASK_LABELS == oracle.TASK_LABELS
  for mask in oracle.MASK_ARRAYS:
    assert aggregation.cache_path("/r/oracle.json", 192, mask) == f"/r/{oracle.cache_name(192, mask)}"
