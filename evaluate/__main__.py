"""Evaluates a training grid (cross-validation) or a cohort's predictions (external validation); writes the report.

Examples:
  python -m evaluate --runs_dir=runs --output_dir=runs/evaluation --tasks=p,sb
  python -m evaluate --predictions=O/patient_predictions.csv --output_dir=E [--runs_dir=runs]

Cross-validation reads only run artifacts below --runs_dir (splits.json, patients.csv, run.json and predictions),
writes config.json, summary.json, patient_predictions.csv, cell_metrics.csv, report.md, report.html,
model_card.md and figures/ to --output_dir, TensorBoard summaries to <runs_dir>/tensorboard/evaluate, then prints
the paper table. With --predictions (the output of `python -m predict --manifest=...`) it writes the external-
validation report instead (config.json, summary.json, flagged_patients.csv, report.md, report.html, model_card.md,
figures/); --runs_dir then adds the internal cross-validation figures beside the external ones.
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.


from absl import app
from absl import flags

from pdx_tf import cli, io_utils
from pdx_tf.errors import PdxError
from pdx_tf.evaluation import evaluate_predictions, evaluate_runs, EvaluateConfig, ExternalConfig
from pdx_tf.evaluation import format_paper_table

_RUNS_DIR = flags.DEFINE_string("runs_dir", "", "Training output: a task folder or a parent of several.")
_PREDICTIONS = flags.DEFINE_string("predictions", "", "External validation: a cohort's patient_predictions.csv "
                                   "from `python -m predict --manifest=...`.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the evaluation outputs.", required=True)
_TASKS = flags.DEFINE_list("tasks", [], "Tasks to evaluate (p, sb, regions); empty: every task found.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "A probability >= threshold is a positive decision.")
_ALLOW_PARTIAL = flags.DEFINE_bool("allow_partial", False,
                                   "Evaluate the cells that exist and mark the report partial.")
_NUM_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 1000, "Patient-bootstrap replicates for the 95 % CIs.")
_SEED = flags.DEFINE_integer("seed", 0, "Key of the bootstrap resampling.")
_CONFORMAL_ALPHA = flags.DEFINE_float("conformal_alpha", None, "Error rate of the conformal sets, re-derived from"
                                      " the stored out-of-fold predictions (default: the runs' own, if trained"
                                      " with --conformal_alpha). With --predictions: the coverage check's alpha"
                                      " (default: the CSV's alpha column).")


def _fail(message) -> None:
  cli.exit_with_error("evaluate", message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not _RUNS_DIR.value and not _PREDICTIONS.value:
    _fail("give --runs_dir (cross-validation) or --predictions (external validation), or both")
  try:
    if _PREDICTIONS.value:
      config = ExternalConfig(
          predictions_path=_PREDICTIONS.value, output_dir=_OUTPUT_DIR.value, runs_dir=_RUNS_DIR.value,
          tasks=tuple(_TASKS.value), threshold=_THRESHOLD.value, num_bootstrap=_NUM_BOOTSTRAP.value,
          seed=_SEED.value, allow_partial=_ALLOW_PARTIAL.value, conformal_alpha=_CONFORMAL_ALPHA.value)
    else:
      config = EvaluateConfig(
          runs_dir=_RUNS_DIR.value, output_dir=_OUTPUT_DIR.value, tasks=tuple(_TASKS.value),
          threshold=_THRESHOLD.value, allow_partial=_ALLOW_PARTIAL.value, num_bootstrap=_NUM_BOOTSTRAP.value,
          seed=_SEED.value, conformal_alpha=_CONFORMAL_ALPHA.value)
  except ValueError as error:  # invalid flag values
    _fail(str(error))
  try:
    if _PREDICTIONS.value:
      summary = evaluate_predictions(config)
      for task, entry in summary.items():
        metrics = entry["metrics"]
        print(f"{task}: {entry['n_patients']} labelled patients, {entry['n_unlabelled']} unlabelled, "
              f"{entry['drift']['n_flagged']} flagged; AUC {metrics['auc']}, sensitivity {metrics['sensitivity']}, "
              f"specificity {metrics['specificity']}")
        if entry.get("conformal"):
          print(entry["conformal"]["message"])
    else:
      summary = evaluate_runs(config)  # also writes config.json before any work
      print(format_paper_table(summary))
      if "regions" in summary:
        regions = summary["regions"]
        print(f"regions: {regions['n_patients']} patients; macro AUC {regions['macro_auc']}, small-bowel regions"
              f" {regions['small_bowel_macro_auc']}, PCI Spearman {regions['pci']['spearman']}"
              " (region_predictions.csv, figures/region_auc_map.png)")
      for task, entry in summary.items():
        sets = entry.get("conformal") if isinstance(entry, dict) else None
        if sets:
          print(f"{task}: conformal sets at alpha {sets['alpha']:g}: coverage {sets['coverage']['estimate']:.2f}"
                f" (negatives {sets['coverage_negative']['estimate']:.2f}, positives"
                f" {sets['coverage_positive']['estimate']:.2f}), {100 * sets['uncertain_share']['estimate']:.0f} %"
                f" uncertain ({sets['n_empty']} empty sets)")
  except PdxError as error:
    _fail(str(error))
  print(f"Report: {io_utils.join(config.output_dir, 'report.html')} (and report.md, summary.json, model_card.md)")


if __name__ == "__main__":
  app.run(main)
