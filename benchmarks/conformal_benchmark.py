"""Does the conformal guarantee hold on the demo, and what does abstaining buy? (issue 22)

  python benchmarks/conformal_benchmark.py                        # task p, seeds 0,1,2, alpha 0.1 and 0.2
  python benchmarks/conformal_benchmark.py --seeds=0 --alphas=0.1 # one run
  python benchmarks/conformal_benchmark.py --preset=demo_sb --seeds=0   # the sb demo (joint grid, 120 patients)

Each seed is the demo grid `python -m train --task=p --conformal_alpha=<first alpha> --seed=<seed>` (the preset
table's demo row: 40 phantom patients, 48 px, 8 folds x 1 repeat), trained under <root>/<task>-seed<seed> on the
demo records (runs/demo/records; a complete grid is reused, the alpha changes no model), then evaluated at every
--alphas value (`evaluate --conformal_alpha=A`: the sets re-derived from the stored out-of-fold predictions, 1000
patient-bootstrap replicates). With --preset=demo_sb the grid is configs/demo_sb.flags' (p and sb, 120 patients,
96 px, 4 folds) and both tasks are read.

Figures a (task, seed, alpha): coverage overall and per class, uncertain (and empty) share, the answered
patients' accuracy against all patients' accuracy at the threshold, ECE, the pooled patient AUC. Targets (issue
22): per-class coverage within 0.05 of 1 - alpha; the answered accuracy at least 10 points above all patients' at
no more than 30 % uncertain (at the alpha's own sets, and on the risk-coverage curve at 70 % answered). The demo
grid has one repeat, so no SD over models there; instead each patient's out-of-fold probabilities from the seeds'
grids (one held-out model a seed) give an SD over models, and its AUC for "the seeds' mean is wrong at 0.5"
(`sd_over_seeds`). Prints one line per run and the means over seeds; appends one JSON line (code
version, machine, command, every figure) to --results.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds: one demo grid each.")
_ALPHAS = flags.DEFINE_list("alphas", ["0.1", "0.2"], "Conformal error rates to evaluate each grid at.")
_TASK = flags.DEFINE_string("task", "p", "The demo task (p or sb); ignored with --preset=demo_sb (p,sb).")
_PRESET = flags.DEFINE_enum("preset", "demo", ["demo", "demo_sb"], "The preset table's row to train.")
_ROOT = flags.DEFINE_string("root", "runs/conformal", "Where the grids and evaluations go.")
_RESULTS = flags.DEFINE_string("results", "benchmarks/results/conformal_benchmark.jsonl", "JSON-lines output.")
_RUNS_DIRS = flags.DEFINE_list("runs_dirs", [], "Already trained grids of --task (one a seed, e.g. the p grids of "
                                "benchmarks/regions_benchmark.py --train_preset=general): evaluated, not trained; "
                                "--seeds then only labels them.")
_NUM_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 1000, "Patient-bootstrap replicates.")

COVERAGE_TOLERANCE = 0.05
MIN_ACCURACY_GAIN = 0.10
MAX_UNCERTAIN = 0.30


def run_figures(entry: dict, auc: float | None) -> dict:
  """The benchmark's figures of one task's summary entry ("conformal" at one alpha) plus the target checks."""
  conformal = entry["conformal"]
  alpha = conformal["alpha"]
  figures = {
      "alpha": alpha, "n_rows": conformal["n_rows"],
      "coverage": conformal["coverage"]["estimate"],
      "coverage_negative": conformal["coverage_negative"]["estimate"],
      "coverage_positive": conformal["coverage_positive"]["estimate"],
      "coverage_positive_ci95": [conformal["coverage_positive"]["low"], conformal["coverage_positive"]["high"]],
      "coverage_negative_ci95": [conformal["coverage_negative"]["low"], conformal["coverage_negative"]["high"]],
      "uncertain_share": conformal["uncertain_share"]["estimate"], "empty_share": conformal["empty_share"]["estimate"],
      "answered_accuracy": conformal["answered_accuracy"]["estimate"],
      "all_accuracy": conformal["all_accuracy"]["estimate"],
      "answered_sensitivity": conformal["answered"]["sensitivity"],
      "answered_specificity": conformal["answered"]["specificity"],
      "ece": conformal["ece"]["estimate"], "patient_auc_pooled": auc,
  }
  class_coverage = [figures["coverage_negative"], figures["coverage_positive"]]
  figures["target_coverage_met"] = all(value is not None and abs(value - (1 - alpha)) <= COVERAGE_TOLERANCE
                                       for value in class_coverage)
  gain = (None if figures["answered_accuracy"] is None else figures["answered_accuracy"] - figures["all_accuracy"])
  figures["accuracy_gain"] = gain
  figures["target_abstention_met"] = bool(gain is not None and gain >= MIN_ACCURACY_GAIN
                                          and figures["uncertain_share"] <= MAX_UNCERTAIN)
  # The risk-coverage curve at 30 % abstention: the 70 % most confident (conformal confidence) answered.
  curve = conformal["risk_coverage"]["conformal"]
  at = min(range(len(curve["coverage"])), key=lambda index: abs(curve["coverage"][index] - (1 - MAX_UNCERTAIN)))
  figures["curve_accuracy_at_70pct"] = curve["selective_accuracy"][at]
  figures["curve_gain_at_70pct"] = curve["selective_accuracy"][at] - figures["all_accuracy"]
  figures["target_abstention_met_curve"] = figures["curve_gain_at_70pct"] >= MIN_ACCURACY_GAIN
  return figures


def seeds_sd_figures(probabilities_by_seed: list[dict[str, float]], labels: dict[str, int],
                     threshold: float = 0.5) -> dict | None:
  """Does the SD over held-out models rank errors? Each seed's grid holds every patient out once, so a patient
  has one out-of-fold probability a seed: the SD over seeds (ddof 1) against "the mean over seeds is wrong at
  `threshold`": its AUC and the risk-coverage curve (low SD answered first). None with fewer than 2 seeds."""
  from pdx_tf.evaluation import conformal_evaluation  # pylint: disable=import-outside-toplevel

  if len(probabilities_by_seed) < 2:
    return None
  patients = sorted(set.intersection(*(set(one) for one in probabilities_by_seed)))
  stacked = np.asarray([[one[patient] for one in probabilities_by_seed] for patient in patients])
  sds = stacked.std(axis=1, ddof=1)
  wrong = (stacked.mean(axis=1) >= threshold) != np.asarray([labels[patient] == 1 for patient in patients])
  curve = conformal_evaluation.risk_coverage(~wrong, -sds)
  return {"n_patients": len(patients), "n_seeds": len(probabilities_by_seed), "error_rate": float(wrong.mean()),
          "sd_error_auc": conformal_evaluation.weighted_auc(wrong, sds), "risk_coverage": curve}


def _mean(values):
  values = [value for value in values if value is not None]
  return float(np.mean(values)) if values else None


def main(argv):
  del argv
  from pdx_tf import demo, evaluation, presets  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import trainer  # pylint: disable=import-outside-toplevel

  alphas = [float(value) for value in _ALPHAS.value]
  seeds = [int(value) for value in _SEEDS.value]
  sb = _PRESET.value == "demo_sb"
  task = "p,sb" if sb else _TASK.value
  preset = dict(presets.TRAIN_PRESETS[_PRESET.value])
  num_patients = preset.pop("demo_patients", presets.DEMO_PATIENTS)
  preset.pop("task", None)
  image_size = preset["image_size"]
  records = demo.records_folder(demo.demo_root(num_patients), image_size)
  if not _RUNS_DIRS.value:
    pipeline.run_demo_pipeline(records, progress=False, image_size=image_size, num_patients=num_patients)
  runs = []
  probabilities_by_seed: dict[str, list[dict[str, float]]] = {}
  labels: dict[str, dict[str, int]] = {}
  if _RUNS_DIRS.value and len(_RUNS_DIRS.value) != len(seeds):
    raise app.UsageError("--runs_dirs needs one --seeds value a folder")
  for index, seed in enumerate(seeds):
    if _RUNS_DIRS.value:
      folder = _RUNS_DIRS.value[index]
    else:
      folder = os.path.join(_ROOT.value, f"demo_sb-seed{seed}" if sb else f"{task}-seed{seed}")
      config = trainer.config_from_values({"task": task, "records_dir": records, "output_dir": folder, **preset,
                                           "seed": seed, "conformal_alpha": alphas[0]})
      trainer.run_grid(config)
    for alpha in alphas:
      evaluation_dir = os.path.join(_ROOT.value, "evaluation", f"{os.path.basename(folder)}-alpha{alpha:g}")
      summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(
          runs_dir=folder, output_dir=evaluation_dir, num_bootstrap=_NUM_BOOTSTRAP.value, conformal_alpha=alpha))
      for one_task, entry in summary.items():
        figures = {"task": one_task, "seed": seed, "runs_dir": folder, "evaluation_dir": evaluation_dir,
                   **run_figures(entry, entry["pooled_ci95"]["auc"]["estimate"])}
        runs.append(figures)
        if alpha == alphas[0]:
          from pdx_tf.evaluation import runs as runs_lib  # pylint: disable=import-outside-toplevel
          task_runs = runs_lib.load_runs(folder, (one_task,))[one_task]
          seed_probabilities = {}
          for cell in task_runs.cells.values():
            for patient, label, probability in zip(cell.patient_ids, cell.patient_labels, cell.patient_probabilities):
              seed_probabilities[patient] = float(probability)
              labels.setdefault(one_task, {})[patient] = int(label)
          probabilities_by_seed.setdefault(one_task, []).append(seed_probabilities)
        print(json.dumps({key: (round(value, 4) if isinstance(value, float) else value)
                          for key, value in figures.items() if not key.endswith("_dir")}))
  means = {}
  for one_task in sorted({run["task"] for run in runs}):
    for alpha in alphas:
      chosen = [run for run in runs if run["task"] == one_task and run["alpha"] == alpha]
      means[f"{one_task}@{alpha:g}"] = {
          key: _mean([run[key] for run in chosen])
          for key in ("coverage", "coverage_negative", "coverage_positive", "uncertain_share", "empty_share",
                      "answered_accuracy", "all_accuracy", "accuracy_gain", "curve_accuracy_at_70pct",
                      "curve_gain_at_70pct", "ece", "patient_auc_pooled")}
      means[f"{one_task}@{alpha:g}"]["n_runs"] = len(chosen)
      means[f"{one_task}@{alpha:g}"]["runs_meeting_coverage_target"] = sum(run["target_coverage_met"]
                                                                           for run in chosen)
      means[f"{one_task}@{alpha:g}"]["runs_meeting_abstention_target"] = sum(run["target_abstention_met"]
                                                                            for run in chosen)
      means[f"{one_task}@{alpha:g}"]["runs_meeting_abstention_target_curve"] = sum(
          run["target_abstention_met_curve"] for run in chosen)
  sd_over_seeds = {one_task: seeds_sd_figures(values, labels[one_task])
                   for one_task, values in probabilities_by_seed.items()}
  for one_task, value in sd_over_seeds.items():
    if value:
      print(f"{one_task}: SD over {value['n_seeds']} seeds' held-out models ranks errors with AUC"
            f" {value['sd_error_auc']:.3f} ({value['n_patients']} patients, error rate {value['error_rate']:.3f})")
  for key, value in means.items():
    print(key, json.dumps({name: (round(number, 4) if isinstance(number, float) else number)
                           for name, number in value.items()}))
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  path = results_io.record_figures("conformal_benchmark", {
      "benchmark": "conformal", "preset": _PRESET.value if not _RUNS_DIRS.value else "given runs_dirs",
      "runs_dirs": _RUNS_DIRS.value, "task": task, "seeds": seeds, "alphas": alphas,
      "num_bootstrap": _NUM_BOOTSTRAP.value, "runs": runs, "means": means, "sd_over_seeds": sd_over_seeds,
  }, path=_RESULTS.value)
  print(f"appended to {path}")


if __name__ == "__main__":
  app.run(main)
