"""Bootstrap AUC: pdx-tf's vectorised weighted Mann-Whitney (pdx_tf.evaluation.metrics.weighted_metrics) against a
loop of scikit-learn's roc_auc_score with the same resampling counts as sample weights.

  python benchmarks/metrics_benchmark.py                        # 227 patients (the paper's cohort), 2000 replicates
  python benchmarks/metrics_benchmark.py --num_patients=1816 --repeats=3

It checks the two agree (max |difference| over the replicates), then times each --repeats times and prints the
median seconds and the ratio; the raw output goes to benchmarks/results/metrics_benchmark.jsonl. Why it exists:
scikit-learn is a run-time dependency now (calibration), and this says whether the hand-written AUC earns its
place (README, "Dependencies"). Times on the shared development box are inflated by its load; the ratio of two
measurements taken back to back is the figure to quote.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # pdx_tf from this checkout
from pdx_tf.evaluation import grid_statistics, metrics  # noqa: E402  pylint: disable=wrong-import-position

_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 227, "Patients (the paper's cohort: 227).")
_NUM_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 2000, "Bootstrap replicates (evaluate's default: 2000).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats of each implementation (the median is reported).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the synthetic labels and probabilities.")


def _data(num_patients: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, 2, num_patients)
  probabilities = np.round(np.clip(rng.normal(0.4 + 0.2 * labels, 0.2), 0, 1), 3)  # rounding: ties, as in practice
  return labels, probabilities


def vectorised(labels, probabilities, weights) -> np.ndarray:
  return metrics.weighted_metrics(labels, probabilities, weights)["auc"]


def sklearn_loop(labels, probabilities, weights) -> np.ndarray:
  from sklearn import metrics as sklearn_metrics  # pylint: disable=import-outside-toplevel
  return np.asarray([sklearn_metrics.roc_auc_score(labels, probabilities, sample_weight=row) for row in weights])


def _median_seconds(function, repeats: int, *args) -> float:
  times = []
  for _ in range(repeats):
    started = time.perf_counter()
    function(*args)
    times.append(time.perf_counter() - started)
  return statistics.median(times)


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  labels, probabilities = _data(_NUM_PATIENTS.value, _SEED.value)
  weights = grid_statistics.bootstrap_weights(labels.size, _NUM_BOOTSTRAP.value, _SEED.value, "p")
  difference = float(np.max(np.abs(vectorised(labels, probabilities, weights) -
                                   sklearn_loop(labels, probabilities, weights))))
  ours = _median_seconds(vectorised, _REPEATS.value, labels, probabilities, weights)
  theirs = _median_seconds(sklearn_loop, _REPEATS.value, labels, probabilities, weights)
  figures = {"num_patients": int(labels.size), "num_bootstrap": _NUM_BOOTSTRAP.value, "repeats": _REPEATS.value,
             "max_abs_difference": difference, "vectorised_s": round(ours, 4), "sklearn_loop_s": round(theirs, 4),
             "speedup": round(theirs / ours, 1), "load_average_1min": round(os.getloadavg()[0], 2)}
  print(f"bootstrap AUC, {labels.size} patients x {_NUM_BOOTSTRAP.value} replicates: vectorised {ours:.3f} s, "
        f"scikit-learn roc_auc_score loop {theirs:.3f} s (median of {_REPEATS.value}; {theirs / ours:.1f}x); "
        f"max |difference| {difference:.1e}")
  print(f"raw output: {results_io.record_figures('metrics_benchmark', figures)}")


if __name__ == "__main__":
  app.run(main)
