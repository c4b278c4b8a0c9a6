"""Does the patient-label model find small implants? The demo's training on the low-burden phantom (issue 23).

  # the baseline: the demo preset (48 px, alpha 0.35, 5 epochs, mean aggregation) on the 40-patient cohort
  python benchmarks/implants_benchmark.py --name=demo48 --output_jsonl=benchmarks/results/implants.jsonl
  # a candidate: 96 px (records at 96 px are written once under <root>/records-96px)
  python benchmarks/implants_benchmark.py --name=demo96 --set=image_size=96 \
      --output_jsonl=benchmarks/results/implants.jsonl

What runs: `pipeline.run_demo_pipeline(<root>/records-<S>px, phantom_preset=--phantom_preset,
num_patients=--num_patients, image_size=S)` (the demo's pipeline on the cached phantom cohort), then
`trainer.run_grid` with the preset table's demo row (pdx_tf.presets.TRAIN_PRESETS["demo"]) for task p, changed by
each --set=flag=value (a `python -m train` flag name, value read as JSON, else text), into <root>/<name>. Nothing
but patient labels trains (the cohort's masks are not read).

Figures: every patient is held out once (one repeat), so each patient's held-out slice probabilities
(slice_predictions.csv of the cell that tested them) are re-aggregated here by each --aggregations rule (the same
`aggregation.aggregate` as training and serving; the rule is applied after training, so one trained grid scores
every rule: the rule the grid was trained with only matters for the MIL head). Per rule: the pooled out-of-fold
patient AUC of label_p (scikit-learn's roc_auc_score) with a 95 % percentile CI from --num_bootstrap patient
resamples (keyed by --seed; a resample with one class is drawn again). For context, the same AUC with the
manifest's PCI and ascites grade as the score (on this cohort PCI gives the label away by construction: a
negative's PCI is 0; ascites should be at chance). Wall times are printed; on the shared machine they are not
speeds.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from pdx_tf import io_utils, presets  # pylint: disable=wrong-import-position
from pdx_tf.errors import PdxError  # pylint: disable=wrong-import-position

_ROOT = flags.DEFINE_string("root", "runs/implants", "Records (records-<S>px) and runs (<name>) go here.")
_NAME = flags.DEFINE_string("name", "demo48", "The run's folder under --root and its name in the output.")
_PHANTOM_PRESET = flags.DEFINE_string("phantom_preset", "low_burden", "The phantom cohort (pdx_tf.phantom."
                                      "PHANTOM_PRESETS); 'default' for the demo cohort.")
_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 40, "The phantom cohort's size (a multiple of 4).")
_SET = flags.DEFINE_multi_string("set", [], "flag=value changed from the demo preset (a `python -m train` flag, "
                                 "e.g. image_size=96, aggregation=topk_mean, num_folds=4).")
_AGGREGATIONS = flags.DEFINE_list("aggregations", ["mean", "topk_mean", "max"],
                                  "Rules re-applied to the held-out slice probabilities.")
_TOP_K = flags.DEFINE_integer("top_k", 3, "k of topk_mean.")
_NUM_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 1000, "Patient resamples for the CIs.")
_SEED = flags.DEFINE_integer("seed", 0, "Key of the bootstrap.")
_OUTPUT_JSONL = flags.DEFINE_string("output_jsonl", None, "Append the JSON line (code version, machine, command, "
                                    "date, figures) here instead of benchmarks/results/implants_benchmark.jsonl.")

TASK = "p"
ASCITES_GRADES = {"none": 0, "small": 1, "large": 2}


def parse_settings(items: list[str]) -> dict:
  """["image_size=96", "aggregation=topk_mean"] -> {"image_size": 96, "aggregation": "topk_mean"}."""
  values = {}
  for item in items:
    name, separator, text = item.partition("=")
    if not separator or not name:
      raise ValueError(f"--set={item!r} is not flag=value, e.g. --set=image_size=96")
    try:
      values[name] = json.loads(text)
    except json.JSONDecodeError:
      values[name] = text
  return values


def held_out_slices(runs_dir: str) -> dict[str, np.ndarray]:
  """patient_id -> float64 [slices] of held-out probabilities, from every cell's slice_predictions.csv.

  Raises:
    PdxError: no cell has predictions, or a patient is held out by two cells (the grid has more than one repeat).
  """
  result: dict[str, list[float]] = {}
  owner: dict[str, str] = {}
  paths = sorted(glob.glob(os.path.join(runs_dir, "**", "slice_predictions.csv"), recursive=True))
  if not paths:
    raise PdxError(f"no slice_predictions.csv under {runs_dir}: the grid did not finish")
  for path in paths:
    with open(path, newline="", encoding="utf-8") as stream:
      rows = list(csv.DictReader(stream))
    for patient_id in {row["patient_id"] for row in rows}:
      if patient_id in owner:
        raise PdxError(f"patient {patient_id} is held out by two cells ({owner[patient_id]} and {path}); "
                       "this benchmark expects one repeat")
      owner[patient_id] = path
    for row in rows:
      result.setdefault(row["patient_id"], []).append(float(row["probability"]))
  return {patient_id: np.asarray(values, np.float64) for patient_id, values in result.items()}


def auc_with_ci(labels: np.ndarray, scores: np.ndarray, num_bootstrap: int, seed: int) -> dict:
  """{"auc", "ci95": [low, high] or None, "n", "positives"}: scikit-learn AUC, patient-bootstrap percentile CI."""
  from sklearn import metrics  # pylint: disable=import-outside-toplevel

  labels, scores = np.asarray(labels), np.asarray(scores, np.float64)
  result = {"auc": float(metrics.roc_auc_score(labels, scores)), "ci95": None, "n": int(len(labels)),
            "positives": int(labels.sum())}
  if num_bootstrap > 0:
    rng = np.random.default_rng([seed, 0x1A9])
    values = []
    while len(values) < num_bootstrap:
      chosen = rng.integers(0, len(labels), len(labels))
      if labels[chosen].min() != labels[chosen].max():
        values.append(metrics.roc_auc_score(labels[chosen], scores[chosen]))
    result["ci95"] = [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]
  return result


def _manifest_rows(num_patients: int, phantom_preset: str | None) -> list[dict]:
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel
  return io_utils.read_csv(pipeline.demo_manifest_path(num_patients, phantom_preset))


def run(root: str, name: str, phantom_preset: str | None, num_patients: int, settings: dict,
        aggregations: list[str], top_k: int, num_bootstrap: int, seed: int) -> dict:
  """Pipeline, grid and figures (module docstring); returns the figures."""
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import aggregation, trainer  # pylint: disable=import-outside-toplevel

  for rule in aggregations:
    aggregation.check_aggregation(rule, top_k)
  values = {**presets.TRAIN_PRESETS["demo"], **settings}
  image_size = int(values["image_size"])
  records_dir = os.path.join(root, f"records-{image_size}px")
  wall = {}
  started = time.time()
  pipeline.run_demo_pipeline(records_dir, progress=False, num_patients=num_patients, phantom_preset=phantom_preset,
                             image_size=image_size)
  wall["pipeline_s"] = time.time() - started
  config = trainer.config_from_values({"task": TASK, "records_dir": records_dir,
                                       "output_dir": os.path.join(root, name), **values})
  started = time.time()
  trainer.run_grid(config)
  wall["training_s"] = time.time() - started

  rows = {row["patient_id"]: row for row in _manifest_rows(num_patients, phantom_preset)}
  slices = held_out_slices(config.output_dir)
  patient_ids = sorted(slices)
  labels = np.array([int(float(rows[pid]["label_p"])) for pid in patient_ids])
  figures = {"name": name, "phantom_preset": phantom_preset, "num_patients": num_patients, "task": TASK,
             "settings": {key: value for key, value in values.items()}, "patients_scored": len(patient_ids),
             "wall_s_loaded_machine": wall, "aggregations": {}, "covariates": {}}
  for rule in aggregations:
    scores = np.array([aggregation.aggregate(slices[pid], rule, top_k) for pid in patient_ids])
    figures["aggregations"][rule] = auc_with_ci(labels, scores, num_bootstrap, seed)
  figures["covariates"]["pci"] = auc_with_ci(labels, np.array([float(rows[pid]["pci"]) for pid in patient_ids]),
                                             num_bootstrap, seed)
  figures["covariates"]["ascites"] = auc_with_ci(
      labels, np.array([ASCITES_GRADES.get(rows[pid]["ascites"], -1) for pid in patient_ids], np.float64),
      num_bootstrap, seed)
  for group in ("aggregations", "covariates"):
    for rule, entry in figures[group].items():
      ci = entry["ci95"]
      print(f"{name}: {group[:-1]} {rule}: pooled patient p AUC {entry['auc']:.3f}"
            + (f" (95 % CI {ci[0]:.3f}-{ci[1]:.3f})" if ci else "") + f", {entry['n']} patients")
  print(f"{name}: wall (loaded machine) pipeline {wall['pipeline_s']:.0f} s, training {wall['training_s']:.0f} s")
  return figures


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    preset = None if _PHANTOM_PRESET.value == "default" else _PHANTOM_PRESET.value
    figures = run(_ROOT.value, _NAME.value, preset, _NUM_PATIENTS.value, parse_settings(_SET.value),
                  _AGGREGATIONS.value, _TOP_K.value, _NUM_BOOTSTRAP.value, _SEED.value)
  except (PdxError, ValueError) as error:
    print(f"implants_benchmark: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(1)
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  path = results_io.record_figures("implants_benchmark", results_io.json_safe({"benchmark": "implants", **figures}),
                                   path=_OUTPUT_JSONL.value)
  print(f"raw output: {path}")


if __name__ == "__main__":
  app.run(main)
