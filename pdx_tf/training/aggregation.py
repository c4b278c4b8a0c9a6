"""Slice-to-patient aggregation rules, in TensorFlow so the serving graph uses the same code as training.

A patient's probability is derived from the probabilities of their abdominal slices:
- `mean`: the mean over slices. Stable, but dilutes disease that shows on a few slices.
- `max`: the highest slice. Sensitive to small lesions, and to a single noisy slice.
- `topk_mean` (default): the mean of the `top_k` highest slices (all slices if fewer). A compromise: nodules
  show on a minority of slices, so the top few carry the signal, and averaging a few resists one outlier.
- `positive_fraction`: the share of slices with probability >= 0.5. A vote; 0.5 then means "half the slices".
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

AGGREGATIONS = ("mean", "max", "topk_mean", "positive_fraction")
DEFAULT_AGGREGATION = "topk_mean"
DEFAULT_TOP_K = 3


def check_aggregation(rule: str, top_k: int = DEFAULT_TOP_K) -> None:
  """Raises ValueError for an unknown rule or a non-positive top_k."""
  if rule not in AGGREGATIONS:
    raise ValueError(f"unknown aggregation {rule!r}; choose one of {', '.join(AGGREGATIONS)}")
  if top_k < 1:
    raise ValueError(f"top_k must be at least 1, got {top_k}")


def aggregate_tf(probabilities: tf.Tensor, rule: str = DEFAULT_AGGREGATION, top_k: int = DEFAULT_TOP_K) -> tf.Tensor:
  """The patient probability (float32 scalar) from one patient's slice probabilities [N], N >= 1."""
  check_aggregation(rule, top_k)
  probabilities = tf.reshape(tf.cast(probabilities, tf.float32), [-1])
  if rule == "mean":
    return tf.reduce_mean(probabilities)
  if rule == "max":
    return tf.reduce_max(probabilities)
  if rule == "topk_mean":
    k = tf.minimum(tf.constant(top_k), tf.size(probabilities))
    return tf.reduce_mean(tf.math.top_k(probabilities, k=k).values)
  return tf.reduce_mean(tf.cast(probabilities >= 0.5, tf.float32))


def aggregate(probabilities: Sequence[float] | np.ndarray, rule: str = DEFAULT_AGGREGATION,
              top_k: int = DEFAULT_TOP_K) -> float:
  """`aggregate_tf` for Python callers (eager): the patient probability as a float."""
  values = np.asarray(probabilities, np.float32)
  if values.size == 0:
    raise ValueError("cannot aggregate a patient with no slices")
  return float(aggregate_tf(values, rule, top_k).numpy())
