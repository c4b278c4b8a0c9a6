"""TensorBoard summaries of the grid: PR curves, metric histograms and per-repeat scalars.

Written with tf.summary only (no tensorboard plugin code is imported to write them). PR curves use the pr_curves
plugin's tensor layout and metadata, so TensorBoard's PR-curve dashboard shows them: a float32 [6, T] tensor
(TP, FP, TN, FN, precision, recall at T evenly spaced thresholds) with SummaryMetadata plugin "pr_curves" whose
content is a serialised PrCurvePluginData{version: 0, num_thresholds: T}.

Tags (step = repeat index for per-repeat values, 0 otherwise):
  <task>/pr_curve/patient, <task>/pr_curve/slice      pooled out-of-fold predictions of each repeat
  <task>/per_repeat/<metric>                          scalar, patient level
  <task>/per_cell/<metric>                            histogram over the models, patient level
  <task>/per_cell_mean/<metric>                       scalar
  <task>/status                                      text (complete or PARTIAL with the missing cells)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.evaluation import metrics as metrics_lib
from pdx_tf.evaluation.grid_statistics import TaskEvaluation

PR_CURVE_PLUGIN_NAME = "pr_curves"
NUM_PR_THRESHOLDS = 201
EVENT_FILE_MARKER = "events.out.tfevents"


def _varint(value: int) -> bytes:
  encoded = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      encoded.append(byte | 0x80)
    else:
      encoded.append(byte)
      return bytes(encoded)


def pr_curve_metadata(display_name: str, description: str,
                      num_thresholds: int = NUM_PR_THRESHOLDS) -> tf.compat.v1.SummaryMetadata:
  """SummaryMetadata that marks a [6, num_thresholds] tensor as a pr_curves plugin summary."""
  # PrCurvePluginData: field 1 version (0, proto3 default so omitted), field 2 num_thresholds (varint, tag 0x10).
  content = b"\x10" + _varint(num_thresholds)
  metadata = tf.compat.v1.SummaryMetadata(display_name=display_name, summary_description=description)
  metadata.plugin_data.plugin_name = PR_CURVE_PLUGIN_NAME
  metadata.plugin_data.content = content
  return metadata


def write_pr_curve(tag: str, labels, probabilities, step: int, description: str = "") -> None:
  """Writes one PR curve to the default summary writer."""
  tensor = metrics_lib.pr_curve_counts(labels, probabilities, NUM_PR_THRESHOLDS)
  tf.summary.write(tag, tf.constant(tensor), step=step,
                   metadata=pr_curve_metadata(tag, description, NUM_PR_THRESHOLDS))


def _clear_old_events(logdir: str) -> None:
  """Drops event files of an earlier evaluation in this folder, so TensorBoard shows one evaluation."""
  if not tf.io.gfile.isdir(logdir):
    return
  for name in tf.io.gfile.listdir(logdir):
    if name.startswith(EVENT_FILE_MARKER):
      tf.io.gfile.remove(io_utils.join(logdir, name))


def write_tensorboard(logdir: str, evaluations: Sequence[TaskEvaluation]) -> None:
  """Writes the grid's summaries for every task to one event file in `logdir`."""
  io_utils.make_dirs(logdir)
  _clear_old_events(logdir)
  writer = tf.summary.create_file_writer(logdir)
  with writer.as_default():
    for evaluation in evaluations:
      task = evaluation.task_runs.task
      summary = evaluation.summary
      for pool in evaluation.pools:
        write_pr_curve(f"{task}/pr_curve/patient", pool.labels, pool.probabilities, step=pool.repeat,
                       description=f"task {task}, repeat {pool.repeat}: pooled out-of-fold patient predictions")
        write_pr_curve(f"{task}/pr_curve/slice", pool.slice_labels, pool.slice_probabilities, step=pool.repeat,
                       description=f"task {task}, repeat {pool.repeat}: pooled out-of-fold slice predictions")
        values = metrics_lib.binary_metrics(pool.labels, pool.probabilities, summary["threshold"])
        for metric, value in values.items():
          if np.isfinite(value):
            tf.summary.scalar(f"{task}/per_repeat/{metric}", value, step=pool.repeat)
      patient_rows = [row for row in evaluation.rows if row["level"] == "patient"]
      for metric in metrics_lib.METRIC_NAMES:
        values = np.asarray([row[metric] for row in patient_rows], dtype=np.float64)
        values = values[np.isfinite(values)]
        if values.size:
          tf.summary.histogram(f"{task}/per_cell/{metric}", values, step=0, buckets=20)
          tf.summary.scalar(f"{task}/per_cell_mean/{metric}", float(values.mean()), step=0)
      missing = ", ".join(cell["name"] for cell in summary["missing_cells"])
      status = f"PARTIAL: missing cells {missing}" if summary["partial"] else "complete"
      tf.summary.text(f"{task}/status", f"{summary['n_cells']} models; {status}", step=0)
  writer.flush()
  writer.close()
