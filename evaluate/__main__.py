"""Evaluates a finished (or, with --allow_partial, unfinished) training grid and writes the report.

Example:
  python -m evaluate --runs_dir=runs --output_dir=runs/evaluation --tasks=p,sb

Reads only run artifacts below --runs_dir (splits.json, patients.csv, run.json and predictions), writes
config.json, summary.json, patient_predictions.csv, cell_metrics.csv, report.md, report.html and figures/ to
--output_dir, TensorBoard summaries to <runs_dir>/tensorboard/evaluate, then prints the paper table.
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.


from absl import app
from absl import flags

from pdx_tf import cli, io_utils
from pdx_tf.errors import PdxError
from pdx_tf.evaluation import evaluate_runs, EvaluateConfig, format_paper_table

_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Training output: a task folder or a parent of several.",
                                required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the evaluation outputs.", required=True)
_TASKS = flags.DEFINE_list("tasks", [], "Tasks to evaluate (p, sb); empty: every task found in runs_dir.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.5, "A probability >= threshold is a positive decision.")
_ALLOW_PARTIAL = flags.DEFINE_bool("allow_partial", False,
                                   "Evaluate the cells that exist and mark the report partial.")
_NUM_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 1000, "Patient-bootstrap replicates for the 95 % CIs.")
_SEED = flags.DEFINE_integer("seed", 0, "Key of the bootstrap resampling.")


def _fail(message) -> None:
  cli.exit_with_error("evaluate", message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = EvaluateConfig(
        runs_dir=_RUNS_DIR.value,
        output_dir=_OUTPUT_DIR.value,
        tasks=tuple(_TASKS.value),
        threshold=_THRESHOLD.value,
        allow_partial=_ALLOW_PARTIAL.value,
        num_bootstrap=_NUM_BOOTSTRAP.value,
        seed=_SEED.value,
    )
  except ValueError as error:  # invalid flag values
    _fail(str(error))
  try:
    summary = evaluate_runs(config)  # also writes config.json before any work
  except PdxError as error:
    _fail(str(error))
  print(format_paper_table(summary))
  print(f"Report: {io_utils.join(config.output_dir, 'report.html')} (and report.md, summary.json)")


if __name__ == "__main__":
  app.run(main)
