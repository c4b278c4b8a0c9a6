"""abstention_bound's ceilings, against brute force on the raw scores and a Monte Carlo binormal sample."""

import itertools
import json

import numpy as np
import pytest

from benchmark_loader import load_benchmark

bench = load_benchmark("abstention_bound")


def _brute_force_cell(labels, scores, abstain):
  """Most correct answers with exactly `abstain` rows inside a band of score VALUES (cuts between sorted values)."""
  values = np.sort(np.unique(scores))
  cuts = np.concatenate([[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]])
  best = -1
  for low, high in itertools.combinations_with_replacement(cuts, 2):
    inside = (scores > low) & (scores < high)
    if inside.sum() != abstain:
      continue
    correct = ((scores < low) & (labels == 0)).sum() + ((scores > high) & (labels == 1)).sum()
    best = max(best, int(correct))
  return best


def test_cell_best_correct_matches_every_value_band():
  rng = np.random.default_rng(3)
  for _ in range(5):
    scores = rng.permutation(np.linspace(0, 1, 11))  # distinct values: a band of values = a band of rows
    labels = rng.integers(0, 2, 11)
    best = bench.cell_best_correct(labels, scores)
    assert [int(value) for value in best] == [_brute_force_cell(labels, scores, w) for w in range(12)]


def test_oracle_bound_is_the_best_split_of_the_budget_over_cells():
  rng = np.random.default_rng(5)
  cells = [(rng.integers(0, 2, 7), rng.permutation(np.linspace(0, 1, 7))) for _ in range(2)]
  total = 14
  budget = int(np.floor(0.3 * total))  # 4 rows
  best_accuracy = 0.0
  for first, second in itertools.product(range(8), range(8)):
    if first + second > budget:
      continue
    correct = (_brute_force_cell(cells[0][0], cells[0][1], first) + _brute_force_cell(cells[1][0], cells[1][1], second))
    best_accuracy = max(best_accuracy, correct / (total - first - second))
  bound = bench.oracle_bound(cells, 0.3)
  assert bound["answered_accuracy"] == pytest.approx(best_accuracy)
  assert bound["abstained"] <= 0.3
  assert bound["rows"] == total


@pytest.mark.parametrize("auc, prevalence, positive_sd", [(0.85, 0.5, 1.0), (0.8, 0.25, 0.5)])
def test_binormal_bound_matches_a_sampled_cohort(auc, prevalence, positive_sd):
  # Independent: draw the two classes, take the best threshold's accuracy and the best band over quantile cuts.
  probit = {0.85: 1.0364333894937898, 0.8: 0.8416212335729143}[auc]  # Phi^-1(AUC), from tables
  shift = probit * np.sqrt(1 + positive_sd ** 2)
  rng = np.random.default_rng(0)
  labels = rng.random(200_000) < prevalence
  scores = np.where(labels, shift + positive_sd * rng.normal(size=labels.size), rng.normal(size=labels.size))
  assert np.mean(scores[labels][:2000, None] > scores[~labels][None, :2000]) == pytest.approx(auc, abs=0.01)
  order = np.argsort(scores)
  ordered = labels[order]
  negatives_below = np.concatenate([[0], np.cumsum(~ordered)])
  positives_above = np.concatenate([np.cumsum(ordered[::-1])[::-1], [0]])
  n = labels.size
  all_accuracy = np.max(negatives_below + positives_above) / n
  best = all_accuracy
  for width in range(0, int(0.3 * n) + 1, n // 200):
    starts = np.arange(0, n - width + 1, n // 2000)
    best = max(best, np.max(negatives_below[starts] + positives_above[starts + width]) / (n - width))
  bound = bench.binormal_bound(auc, prevalence, 0.3, positive_sd=positive_sd)
  assert bound["all_accuracy"] == pytest.approx(all_accuracy, abs=0.005)
  assert bound["answered_accuracy"] == pytest.approx(best, abs=0.005)
  assert bench.binormal_bound(auc, prevalence, 0.0, positive_sd=positive_sd)["gain"] == pytest.approx(0.0, abs=1e-9)


def test_read_evaluation_groups_rows_by_cell_and_keeps_the_conformal_answer(tmp_path):
  (tmp_path / "patient_predictions.csv").write_text(
      "task,repeat,fold,patient_id,label,probability,predicted,conformal_set,alpha\n"
      "sb,0,0,a,1,0.9,1,positive,0.1\n"
      "sb,0,0,b,0,0.2,0,negative,0.1\n"
      "sb,0,1,c,1,0.3,0,uncertain,0.1\n"
      "sb,0,1,d,,0.5,1,uncertain,0.1\n")
  (tmp_path / "summary.json").write_text(json.dumps({"sb": {"conformal": {
      "alpha": 0.1, "answered": {"accuracy": 1.0}, "uncertain_share": {"estimate": 0.25}}}}))
  tasks = bench.read_evaluation(str(tmp_path))
  sb = tasks["sb"]
  assert [list(labels) for labels, _ in sb["cells"]] == [[1, 0], [1]]  # the unlabelled row is left out
  assert sb["all_accuracy"] == pytest.approx(2 / 3)
  assert sb["conformal_answered_accuracy"] == 1.0 and sb["conformal_uncertain_share"] == 0.25


def test_nearest_threshold_refers_the_rows_closest_to_each_cells_cut():
  # Cell 1: answers cut between 0.4 and 0.6 (logit 0); cell 2: between 0.7 and 0.8. The two rows nearest their own
  # cut in SD units are referred; by hand: cell 1's logits +-0.405, +-2.197 (SD 1.58): 0.4 and 0.6 at 0.26 SD;
  # cell 2's 0.7 and 0.8 sit at 0.17 SD of their midpoint. Budget floor(0.3 * 8) = 2 rows: cell 2's pair goes.
  cells = [(np.array([0, 1, 0, 1]), np.array([0.1, 0.4, 0.6, 0.9])),
           (np.array([0, 1, 0, 1]), np.array([0.2, 0.7, 0.8, 0.95]))]
  predicted = [np.array([0, 0, 1, 1]), np.array([0, 0, 1, 1])]
  result = bench.nearest_threshold(cells, predicted, 0.3)
  # Kept: cell 1 all four (2 right: 0.1 and 0.9), cell 2's 0.2 and 0.95 (both right): 4 of 6.
  assert result["answered_accuracy"] == pytest.approx(4 / 6)
  assert result["abstained"] == pytest.approx(2 / 8)
