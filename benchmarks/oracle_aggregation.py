"""From an oracle run's held-out slice scores to patients: does another rule than the max do better? (issue 23)

  python benchmarks/oracle_aggregation.py --oracle_json=runs/oracle-low_burden-120-p-pixels-s1/oracle.json \
      --size=192 --output_jsonl=benchmarks/results/implants_oracle.jsonl

Reads <root>/oracle.json of `oracle_benchmark.py` (its per-seed "slice_scores", written since the pixel-supervised
runs; each slice scored by the model of the fold that held its patient out) and the cached slice arrays beside it
(<root>/slices-<S>px-nodule.npz, for each slice's patient and the patients' labels). For every seed it scores the
patients by several rules over their slices (`aggregate`): the max (oracle_benchmark's rule), the mean of the top
k (k = 2, 3, 5), the mean, and the noisy-or 1 - prod(1 - p). Prints and records the pooled patient AUC of each,
for the run's --task label; and, for the max, the AUC of each group of positive patients against all negatives,
grouped by how many of their slices are oracle-positive (NODULE_SLICE_GROUPS; the masks' count, with
oracle_benchmark's --min_coverage), and the median max of negatives and of positives. Nothing is trained.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from pdx_tf import io_utils  # pylint: disable=wrong-import-position

_ORACLE_JSON = flags.DEFINE_string("oracle_json", None, "An oracle_benchmark.py <root>/oracle.json.", required=True)
_SIZE = flags.DEFINE_integer("size", 192, "The image size (px) whose entry to read.")
_OUTPUT_JSONL = flags.DEFINE_string("output_jsonl", None, "Also append one JSON line to this file.")

RULES = ("max", "top2_mean", "top3_mean", "top5_mean", "mean", "noisy_or")
# Copies of oracle_benchmark's TASK_LABELS and cache_name rule: importing that script here would define its absl
# flags (--output_jsonl among them) twice. tests/oracle_aggregation_test.py checks that they agree.
TASK_LABELS = {"sb": "label_sb", "p": "label_p"}
NODULE_SLICE_GROUPS = ((1, 4), (5, 7), (8, 1000))  # oracle-positive slices of a positive patient, inclusive


def aggregate(slice_scores: np.ndarray, slice_patient: np.ndarray, num_patients: int, rule: str) -> np.ndarray:
  """float [num_patients]: each patient's score from its finite slice scores by `rule` (one of RULES); NaN for a
  patient with none. top<k>_mean averages the k highest (all of them when a patient has fewer)."""
  if rule not in RULES:
    raise ValueError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
  scores = np.full(num_patients, np.nan)
  for patient in range(num_patients):
    own = np.asarray(slice_scores, np.float64)[np.asarray(slice_patient) == patient]
    own = np.sort(own[np.isfinite(own)])[::-1]
    if not own.size:
      continue
    if rule == "max":
      scores[patient] = own[0]
    elif rule.startswith("top"):
      scores[patient] = own[:int(rule[3:rule.index("_")])].mean()
    elif rule == "mean":
      scores[patient] = own.mean()
    else:  # noisy_or, in logs: 1 - prod(1 - p) saturates at 1 in float64 long before the ranking does
      scores[patient] = np.log1p(-np.clip(own, 0.0, 1.0 - 1e-12)).sum() * -1.0
  return scores


def cache_path(oracle_json: str, size: int, mask: str) -> str:
  """The slice arrays oracle_benchmark cached beside `oracle_json` for `size` and `mask`: slices-<S>px.npz for the
  default mask (small_bowel_nodule), slices-<S>px-<mask>.npz otherwise."""
  name = f"slices-{size}px.npz" if mask == "small_bowel_nodule" else f"slices-{size}px-{mask}.npz"
  return os.path.join(os.path.dirname(oracle_json), name)


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel
  from pdx_tf.evaluation import metrics  # pylint: disable=import-outside-toplevel
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  entry = io_utils.read_json(_ORACLE_JSON.value)["sizes"][str(_SIZE.value)]
  task = entry["settings"]["task"]
  cache = cache_path(_ORACLE_JSON.value, _SIZE.value, entry["settings"]["mask"])
  if not os.path.exists(cache):
    raise SystemExit(f"oracle_aggregation: {cache} is missing; rerun oracle_benchmark.py with the same --root")
  with np.load(cache) as arrays:
    slice_patient, labels = arrays["slice_patient"], arrays[TASK_LABELS[task]]
    oracle_positive = arrays["peak_coverage"] >= entry["settings"]["min_coverage"]
    if [str(pid) for pid in arrays["patient_ids"]] != entry["patient_ids"]:
      raise SystemExit(f"oracle_aggregation: {cache} holds other patients than {_ORACLE_JSON.value}; rerun "
                       "oracle_benchmark.py with the same --root so that both come from one cohort")
  per_seed = []
  for seed_entry in entry["per_seed"]:
    if "slice_scores" not in seed_entry:
      raise SystemExit("oracle_aggregation: this oracle.json has no slice scores; rerun oracle_benchmark.py")
    slice_scores = np.array([np.nan if value is None else value for value in seed_entry["slice_scores"]])
    aucs = {}
    for rule in RULES:
      scores = aggregate(slice_scores, slice_patient, len(labels), rule)
      scored = np.isfinite(scores)
      aucs[rule] = float(metrics.binary_metrics(labels[scored], scores[scored])["auc"])
    maxima = aggregate(slice_scores, slice_patient, len(labels), "max")
    counts = np.bincount(slice_patient, weights=oracle_positive, minlength=len(labels))
    negatives = maxima[(labels == 0) & np.isfinite(maxima)]
    by_group = {}
    for low, high in NODULE_SLICE_GROUPS:
      group = maxima[(labels == 1) & (counts >= low) & (counts <= high) & np.isfinite(maxima)]
      if group.size and negatives.size:
        by_group[f"{low}-{high}"] = {"patients": int(group.size), "auc_max_vs_all_negatives": float(
            metrics.binary_metrics(np.r_[np.zeros(negatives.size), np.ones(group.size)],
                                   np.r_[negatives, group])["auc"])}
    per_seed.append({"seed": seed_entry["seed"], "patient_auc_pooled": aucs, "by_oracle_positive_slices": by_group,
                     "median_max_negatives": float(np.median(negatives)),
                     "median_max_positives": float(np.median(maxima[(labels == 1) & np.isfinite(maxima)]))})
    print(f"seed {seed_entry['seed']}: patient {task} AUC by rule: "
          + ", ".join(f"{rule} {auc:.3f}" for rule, auc in aucs.items()))
    print(f"  max rule by the positives' oracle-positive slices: "
          + ", ".join(f"{name} ({group['patients']} patients) {group['auc_max_vs_all_negatives']:.3f}"
                      for name, group in by_group.items())
          + f"; median max: negatives {per_seed[-1]['median_max_negatives']:.3f}, positives "
          f"{per_seed[-1]['median_max_positives']:.3f}")
  figures = {"benchmark": "oracle_aggregation", "oracle_json": _ORACLE_JSON.value, "size": _SIZE.value,
             "task": task, "settings": entry["settings"], "per_seed": per_seed}
  if _OUTPUT_JSONL.value:
    print(f"raw output: {results_io.record_figures('oracle_aggregation', figures, path=_OUTPUT_JSONL.value)}")


if __name__ == "__main__":
  app.run(main)
