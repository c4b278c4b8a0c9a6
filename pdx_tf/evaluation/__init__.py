"""Evaluation stage: run artifacts (splits.json, run.json, predictions) -> summary.json and reports.

Public API:
  EvaluateConfig, evaluate_runs(config) -> summary dict (writes every output),
  ExternalConfig, evaluate_predictions(config) -> external-validation summary (writes every output),
  format_paper_table(summary) -> plain-text table of this run beside the paper's published values.
"""

from pdx_tf.evaluation.evaluator import evaluate_predictions, evaluate_runs, EvaluateConfig
from pdx_tf.evaluation.external import ExternalConfig
from pdx_tf.evaluation.metrics import binary_metrics, METRIC_NAMES
from pdx_tf.evaluation.report import format_paper_table, PAPER_RESULTS

__all__ = [
    "EvaluateConfig",
    "ExternalConfig",
    "METRIC_NAMES",
    "PAPER_RESULTS",
    "binary_metrics",
    "evaluate_predictions",
    "evaluate_runs",
    "format_paper_table",
]
