"""TensorBoard logs of the grid: one logdir (`R/tensorboard`), one run per cell.

Per cell `R/tensorboard/<cell>/train` and `.../validation` hold loss, AUC and accuracy by epoch (tags
`epoch_loss`, `epoch_auc`, ...), train also the learning rate and, once, a few augmented input images. The
cell folder itself holds the HParams session (task, repeat, fold, alpha, image size, learning rate, precision,
...) with the final patient-level metrics as scalars `patient/auc`, `patient/accuracy`, `slice/auc`, so the
HParams dashboard compares every cell. `R/tensorboard` holds the experiment config (`hp.hparams_config`).

HParams need the `tensorboard` package (TF 2.21 no longer installs it); without it scalars and images are
still written and HParams are skipped with a warning.
"""

from __future__ import annotations

from typing import Any, Mapping

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pdx_tf import io_utils

PATIENT_METRICS = ("patient/auc", "patient/accuracy", "slice/auc")

try:  # TensorBoard is optional at run time: only the HParams protos come from it.
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover - depends on the environment
  hp = None


def cell_logdir(tensorboard_dir: str, cell_name: str) -> str:
  return io_utils.join(tensorboard_dir, cell_name)


def write_experiment_config(tensorboard_dir: str, hparam_names: Mapping[str, Any]) -> None:
  """Declares the hparams and metrics of the grid once (optional for the dashboard, but fixes the columns)."""
  if hp is None:
    logging.warning("tensorboard is not installed; skipping HParams (pip install tensorboard)")
    return
  with tf.summary.create_file_writer(tensorboard_dir).as_default():
    hp.hparams_config(hparams=[hp.HParam(name) for name in hparam_names],
                      metrics=[hp.Metric(name, display_name=name) for name in PATIENT_METRICS])


def write_cell_hparams(tensorboard_dir: str, cell_name: str, hparams: Mapping[str, Any],
                       metrics: Mapping[str, float | None]) -> None:
  """Writes one cell's HParams session and its final metrics (None metrics are skipped)."""
  writer = tf.summary.create_file_writer(cell_logdir(tensorboard_dir, cell_name))
  with writer.as_default():
    if hp is not None:
      hp.hparams(dict(hparams), trial_id=cell_name)
    for name, value in metrics.items():
      if value is not None and np.isfinite(value):
        tf.summary.scalar(name, float(value), step=0)
  writer.close()


def write_input_images(tensorboard_dir: str, cell_name: str, images: np.ndarray, max_outputs: int = 4) -> None:
  """A few training inputs (float 0..255 [B,S,S,3]) as images, once per cell."""
  writer = tf.summary.create_file_writer(io_utils.join(cell_logdir(tensorboard_dir, cell_name), "train"))
  with writer.as_default():
    tf.summary.image("augmented_inputs", np.asarray(images, np.float32) / 255.0, step=0, max_outputs=max_outputs)
  writer.close()


class EpochLogger(keras.callbacks.Callback):
  """Writes each epoch's train/validation logs and the learning rate (resume-safe: steps are epoch numbers)."""

  def __init__(self, tensorboard_dir: str, cell_name: str):
    super().__init__()
    logdir = cell_logdir(tensorboard_dir, cell_name)
    self._train_dir = io_utils.join(logdir, "train")
    self._validation_dir = io_utils.join(logdir, "validation")
    self._writers: dict[str, Any] = {}

  def _writer(self, folder: str):
    if folder not in self._writers:
      self._writers[folder] = tf.summary.create_file_writer(folder)
    return self._writers[folder]

  def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
    logs = dict(logs or {})
    learning_rate = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
    with self._writer(self._train_dir).as_default():
      for name, value in logs.items():
        if not name.startswith("val_") and name != "learning_rate":
          tf.summary.scalar(f"epoch_{name}", float(value), step=epoch)
      tf.summary.scalar("epoch_learning_rate", learning_rate, step=epoch)
    with self._writer(self._validation_dir).as_default():
      for name, value in logs.items():
        if name.startswith("val_"):
          tf.summary.scalar(f"epoch_{name[4:]}", float(value), step=epoch)
    for writer in self._writers.values():
      writer.flush()

  def on_train_end(self, logs: Mapping[str, Any] | None = None) -> None:
    for writer in self._writers.values():
      writer.close()
