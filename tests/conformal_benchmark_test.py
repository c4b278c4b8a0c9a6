"""Tests for the figures of benchmarks/conformal_benchmark.py (no training): hand-made summary entries."""

import pytest

from benchmark_loader import load_benchmark

conformal_benchmark = load_benchmark("conformal_benchmark")


def _entry(alpha, negative, positive, uncertain, answered, everyone, curve):
  def interval(value):
    return {"estimate": value, "low": value - 0.1, "high": value + 0.1}
  return {"conformal": {
      "alpha": alpha, "n_rows": 40, "coverage": interval((negative + positive) / 2),
      "coverage_negative": interval(negative), "coverage_positive": interval(positive),
      "uncertain_share": interval(uncertain), "empty_share": interval(0.0),
      "answered_accuracy": interval(answered), "all_accuracy": interval(everyone),
      "answered": {"sensitivity": 0.8, "specificity": 0.7}, "ece": interval(0.2),
      "risk_coverage": {"conformal": {"coverage": [1.0, 0.9, 0.8, 0.7, 0.6], "selective_accuracy": curve}}}}


def test_targets_are_checked_as_the_issue_states_them():
  figures = conformal_benchmark.run_figures(_entry(0.2, 0.85, 0.76, 0.3, 0.74, 0.625,
                                                   [0.625, 0.65, 0.7, 0.75, 0.8]), 0.74)
  assert figures["target_coverage_met"]  # |0.85 - 0.8| and |0.76 - 0.8| <= 0.05
  assert figures["accuracy_gain"] == pytest.approx(0.115) and figures["target_abstention_met"]  # 30 % uncertain
  assert figures["curve_accuracy_at_70pct"] == 0.75 and figures["curve_gain_at_70pct"] == pytest.approx(0.125)
  assert figures["target_abstention_met_curve"]
  missed = conformal_benchmark.run_figures(_entry(0.1, 0.96, 0.84, 0.31, 0.74, 0.625,
                                                  [0.625, 0.65, 0.7, 0.7, 0.8]), 0.74)
  assert not missed["target_coverage_met"]  # 0.96 is 0.06 above 0.9
  assert not missed["target_abstention_met"]  # 31 % uncertain
  assert not missed["target_abstention_met_curve"]  # 0.7 - 0.625 < 0.10


def test_sd_over_seeds_ranks_errors_as_computed_by_hand():
  labels = {"a": 1, "b": 0, "c": 1, "d": 0}
  seeds = [{"a": 0.9, "b": 0.0, "c": 0.2, "d": 0.6}, {"a": 0.9, "b": 0.45, "c": 0.6, "d": 0.9}]
  figures = conformal_benchmark.seeds_sd_figures(seeds, labels)
  # Means 0.9, 0.225, 0.4, 0.75: c (positive, 0.4) and d (negative, 0.75) are wrong at 0.5. SDs (ddof 1): a 0,
  # b 0.318, c 0.283, d 0.212: the wrong {c, d} against the right {a, b}: each beats a and loses to b: 2 / 4.
  assert figures["n_patients"] == 4 and figures["error_rate"] == 0.5
  assert figures["sd_error_auc"] == pytest.approx(0.5)
  # Ranking by SD, the curve keeps a (SD 0) first: all right at 25 % answered.
  assert figures["risk_coverage"]["selective_accuracy"][15] == 1.0
  assert conformal_benchmark.seeds_sd_figures(seeds[:1], labels) is None
