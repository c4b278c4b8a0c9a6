"""Aggregation rules: exact values computed by hand, eagerly and inside tf.function."""

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf.training import aggregation

SLICES = [0.1, 0.9, 0.2, 0.7, 0.4]


@pytest.mark.parametrize("rule, top_k, expected", [
    ("mean", 3, (0.1 + 0.9 + 0.2 + 0.7 + 0.4) / 5),
    ("max", 3, 0.9),
    ("topk_mean", 3, (0.9 + 0.7 + 0.4) / 3),
    ("topk_mean", 10, (0.1 + 0.9 + 0.2 + 0.7 + 0.4) / 5),
    ("positive_fraction", 3, 2 / 5),
])
def test_rules_give_hand_computed_values(rule, top_k, expected):
  assert aggregation.aggregate(SLICES, rule, top_k) == pytest.approx(expected, abs=1e-6)
  graph = tf.function(lambda x: aggregation.aggregate_tf(x, rule, top_k))
  assert float(graph(tf.constant(SLICES))) == pytest.approx(expected, abs=1e-6)


def test_unknown_rule_and_empty_patient_are_errors():
  with pytest.raises(ValueError, match="unknown aggregation"):
    aggregation.aggregate(SLICES, "median")
  with pytest.raises(ValueError, match="no slices"):
    aggregation.aggregate(np.array([]), "mean")
