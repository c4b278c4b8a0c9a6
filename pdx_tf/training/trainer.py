"""The training stage: the repeats x folds grid of MobileNetV2 slice classifiers for one task.

`run_grid(config)` checks the records and every selected cell, writes `R/config.json`, `R/records.json` (the
records' content hash: a grid never mixes cells trained on different records), `R/splits.json` and
`R/patients.csv`, then trains the cells of this shard one after another. Each cell is idempotent (see
pdx_tf/training/grid.py): complete cells are skipped, interrupted ones resume from their last finished epoch, because the
model and optimizer state are checkpointed atomically after every epoch (`checkpoint/model.keras` +
`progress.json`). A finished cell writes `model.keras`, `slice_predictions.csv`, `patient_predictions.csv`,
`metrics.json` and, last, `run.json` (CONTRACTS.md).

Seeds per cell: the split uses `seed`; the pool draw uses (`seed`, repeat) (input_pipeline.pool_keep); the
initialisation and the shuffle use `init = default_rng([seed, repeat, fold]).integers(2**31)`.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
import warnings
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pdx_tf import configs, contracts, io_utils, provenance
from pdx_tf.contracts import CONFIG_FILE, PATIENTS_FILE, RECORDS_FILE, RUN_SCHEMA_VERSION, TENSORBOARD_FOLDER
from pdx_tf.errors import RunsError
from pdx_tf.training import aggregation as aggregation_lib, grid, input_pipeline, splits, tensorboard
from pdx_tf.training.model import build_model, ModelConfig, resolve_weights

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# Held-out slice probabilities with a smaller spread mean the model predicts one constant (see model.py).
COLLAPSE_STD = 1e-3
# {"records_hash": contracts.DatasetInfo.content_hash, "dataset_hash": of the first run}: one grid, one
# dataset.
# Fields that differ between the machines of one grid; R/config.json stores them at their defaults.
PER_MACHINE_FIELDS = ("records_dir", "num_shards", "shard_index", "cells", "export_dir", "verify_hashes")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training grid (written to R/config.json and every run.json).

  Attributes:
    task: "p" (peritoneal dissemination) or "sb" (small-bowel dissemination).
    records_dir: the data pipeline's output (holds dataset.json).
    output_dir: R, this task's run folder (any tf.io.gfile path).
    model: the MobileNetV2 settings; `model.image_size` must equal the records' image size.
    num_folds: patient-level folds per repeat.
    num_repeats: repeats (draws of training data and initialisations; see splits.py for `repartition`).
    epochs: passes over a cell's drawn training set.
    batch_size: global batch size (split over GPUs by MirroredStrategy).
    learning_rate: Adam learning rate (constant).
    precision: auto (mixed_float16 on GPU, else float32), float32, mixed_float16 or mixed_bfloat16.
    jit_compile: compile train/predict steps with XLA.
    seed: the seed of the split, the pool draw and the initialisation.
    repartition: a new patient partition each repeat (default: one partition, new draws).
    pool_fraction: share of each training slice's augmented copies drawn into a cell's training set.
    include_originals: also train on the training patients' original slices.
    shuffle_buffer: examples in the shuffle buffer (of serialized records, before decoding).
    aggregation: slice-to-patient rule (aggregation_lib.AGGREGATIONS).
    top_k: slices averaged by `topk_mean`.
    deterministic: enable TF op determinism (reproducible on CPU; slower on GPU).
    verify_hashes: check every shard's sha256 against dataset.json before training.
    num_shards: machines sharing the grid; this one trains cells with index % num_shards == shard_index.
    shard_index: this machine's shard.
    cells: names like "r0f3" to train only those cells (empty: all cells of the shard).
    export_dir: if set, export the finished grid for TF Serving there (pdx_tf.serving.export).
  """

  task: str
  records_dir: str
  output_dir: str
  model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
  num_folds: int = 8
  num_repeats: int = 24
  epochs: int = 20
  batch_size: int = 32
  learning_rate: float = 1e-3
  precision: str = "auto"
  jit_compile: bool = False
  seed: int = 0
  repartition: bool = False
  pool_fraction: float = 0.1
  include_originals: bool = True
  shuffle_buffer: int = 4096
  aggregation: str = aggregation_lib.DEFAULT_AGGREGATION
  top_k: int = aggregation_lib.DEFAULT_TOP_K
  deterministic: bool = False
  verify_hashes: bool = False
  num_shards: int = 1
  shard_index: int = 0
  cells: tuple[str, ...] = ()
  export_dir: str = ""

  def __post_init__(self):
    contracts.check_task(self.task)
    if not self.records_dir or not self.output_dir:
      raise ValueError("records_dir and output_dir are required")
    for name in ("num_repeats", "epochs", "batch_size", "shuffle_buffer"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
    if self.num_folds < 2:
      raise ValueError(f"num_folds must be at least 2, got {self.num_folds}")
    if not self.learning_rate > 0:
      raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
    if self.precision not in PRECISIONS:
      raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
    if not 0.0 <= self.pool_fraction <= 1.0:
      raise ValueError(f"pool_fraction must be in [0, 1], got {self.pool_fraction}")
    if self.pool_fraction == 0.0 and not self.include_originals:
      raise ValueError("pool_fraction 0 without originals leaves nothing to train on")
    aggregation_lib.check_aggregation(self.aggregation, self.top_k)
    grid.shard_cells([], self.num_shards, self.shard_index)  # validates the pair
    grid.parse_cells(self.cells, self.num_repeats, self.num_folds)  # out-of-range cells fail here

  def selected_cells(self) -> list[contracts.Cell]:
    """This machine's cells: the `cells` subset (or the whole grid), then this shard's share of it."""
    chosen = (grid.parse_cells(self.cells, self.num_repeats, self.num_folds) if self.cells
              else grid.all_cells(self.num_repeats, self.num_folds))
    return grid.shard_cells(chosen, self.num_shards, self.shard_index)

  def grid_config(self) -> "TrainConfig":
    """This config with the per-machine fields at their defaults: identical on every machine of a grid."""
    return dataclasses.replace(self, records_dir="(per machine)", num_shards=1, shard_index=0, cells=(),
                               export_dir="", verify_hashes=False)


def cell_seed(seed: int, cell: contracts.Cell) -> int:
  """The initialisation and shuffle seed of a cell."""
  return int(np.random.default_rng([seed, cell[0], cell[1]]).integers(2**31))


def resolve_precision(precision: str) -> str:
  """The Keras dtype policy for `precision` ("auto": mixed_float16 if a GPU is visible, else float32)."""
  if precision == "auto":
    return "mixed_float16" if tf.config.list_physical_devices("GPU") else "float32"
  return precision


def _strategy() -> tf.distribute.Strategy:
  gpus = tf.config.list_logical_devices("GPU")
  if len(gpus) > 1:
    return tf.distribute.MirroredStrategy()
  return tf.distribute.get_strategy()


def _auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
  """ROC AUC with ties counted half (Mann-Whitney); None when only one class is present."""
  labels = np.asarray(labels).astype(bool)
  scores = np.asarray(scores, np.float64)
  positives, negatives = scores[labels], scores[~labels]
  if positives.size == 0 or negatives.size == 0:
    return None
  greater = (positives[:, None] > negatives[None, :]).sum()
  ties = (positives[:, None] == negatives[None, :]).sum()
  return float((greater + 0.5 * ties) / (positives.size * negatives.size))


# ----------------------------------------------------------------------------------------------- grid setup


def changed_settings(config: TrainConfig) -> list[str] | None:
  """The R/config.json fields an existing grid in config.output_dir has with other values; None if no grid."""
  path = io_utils.join(config.output_dir, CONFIG_FILE)
  if not io_utils.exists(path):
    return None
  existing, wanted = io_utils.read_json(path), configs.to_dict(config.grid_config())
  return sorted(key for key in set(existing) | set(wanted) if existing.get(key) != wanted.get(key))


def trained_records_hash(output_dir: str) -> str | None:
  """The records content hash R/records.json pins the grid to; None before the first run."""
  path = io_utils.join(output_dir, RECORDS_FILE)
  return io_utils.read_json(path).get("records_hash") if io_utils.exists(path) else None


def _check_or_write_config(config: TrainConfig) -> None:
  path = io_utils.join(config.output_dir, CONFIG_FILE)
  changed = changed_settings(config)
  if changed is not None:
    if changed:
      raise RunsError(f"{config.output_dir} holds a grid trained with other settings ({', '.join(changed)} differ"
                      f" from {path}); use a new --output_dir or the same settings")
    return
  io_utils.atomic_write_json(path, configs.to_dict(config.grid_config()))


def _check_or_write_records_hash(config: TrainConfig, info: contracts.DatasetInfo) -> None:
  """Refuses to add cells trained on other records to a grid: a skipped complete cell must match the new ones.

  Compares the records' content hash (shards, labels, preprocessing), not dataset.json's bytes, so a pipeline
  rerun after a code update that reuses every patient does not orphan the grid.
  """
  path = io_utils.join(config.output_dir, RECORDS_FILE)
  if io_utils.exists(path):
    existing = trained_records_hash(config.output_dir)
    if existing != info.content_hash:
      raise RunsError(f"{config.output_dir} holds a grid trained on other records (content hash "
                      f"{str(existing)[:12]}..., now {info.content_hash[:12]}...); use a new --output_dir, or "
                      "delete the old one to retrain")
    return
  io_utils.atomic_write_json(path, {"records_hash": info.content_hash, "dataset_hash": info.dataset_hash})


def _write_patients(config: TrainConfig, info: contracts.DatasetInfo) -> None:
  header = ["patient_id", "label_p", "label_sb", *info.covariate_names]
  rows = [[patient_id, entry["label_p"], entry["label_sb"],
           *[entry.get("covariates", {}).get(name, "") for name in info.covariate_names]]
          for patient_id, entry in info.patients.items()]
  io_utils.atomic_write_csv(io_utils.join(config.output_dir, PATIENTS_FILE), header, rows)


def _check_cells(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any],
                 cells: Sequence[contracts.Cell]) -> None:
  """Fails before any training if a selected cell cannot be trained (one class, no test patients)."""
  labels = info.labels(config.task)
  for cell in cells:
    train_ids, test_ids = splits.cell_patients(split, *cell)
    classes = {labels[patient_id] for patient_id in train_ids}
    if len(classes) < 2:
      raise RunsError(f"cell {contracts.cell_name(cell)}: every training patient has task {config.task} label"
                      f" {classes.pop()}, so the model cannot learn; add patients of the other class or use"
                      " fewer --num_folds")
    if not test_ids:
      raise RunsError(f"cell {contracts.cell_name(cell)} has no test patients; use fewer --num_folds")


def run_grid(config: TrainConfig, *,
             cell_callbacks: Callable[[contracts.Cell], Sequence[keras.callbacks.Callback]] | None = None
             ) -> dict[str, Any]:
  """Trains this machine's cells of the grid (skipping complete ones, resuming interrupted ones).

  Args:
    config: the grid settings.
    cell_callbacks: extra Keras callbacks per cell (tests use one to interrupt a cell).

  Returns:
    {"output_dir", "tensorboard_dir", "cells": {name: "complete"|"skipped"|"interrupted"}, "export": ...}

  Raises:
    RecordsError, RunsError, PdxError: one line, before training, for bad records, splits or cells.
  """
  io_utils.check_writable(config.output_dir)
  resolve_weights(config.model)  # a missing ImageNet/weights file fails now, not after the first cell starts
  info = contracts.load_dataset_info(config.records_dir, expected_image_size=config.model.image_size,
                                          verify_hashes=config.verify_hashes)
  cells = config.selected_cells()
  split = splits.make_splits(info.labels(config.task), task=config.task, num_folds=config.num_folds,
                             num_repeats=config.num_repeats, seed=config.seed, repartition=config.repartition)
  _check_cells(config, info, split, cells)
  _check_or_write_config(config)
  _check_or_write_records_hash(config, info)
  splits.write_or_verify_splits(config.output_dir, split)
  _write_patients(config, info)
  tensorboard_dir = io_utils.join(config.output_dir, TENSORBOARD_FOLDER)
  if config.shard_index == 0:
    tensorboard.write_experiment_config(tensorboard_dir, _hparams(config, (0, 0), "float32"))
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  tf.random.set_seed(config.seed)  # once per grid; op-level seeds (the shuffle's) come from each cell
  policy = resolve_precision(config.precision)
  previous_policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  statuses: dict[str, str] = {}
  try:
    strategy = _strategy()
    for number, cell in enumerate(cells, start=1):
      name = contracts.cell_name(cell)
      folder = contracts.cell_folder(config.output_dir, cell)
      if grid.is_complete(folder):
        logging.info("cell %s (%d/%d): complete, skipped", name, number, len(cells))
        statuses[name] = "skipped"
        continue
      logging.info("cell %s (%d/%d): training", name, number, len(cells))
      extra = list(cell_callbacks(cell)) if cell_callbacks else []
      statuses[name] = train_cell(config, info, split, cell, strategy=strategy, policy=policy,
                                  tensorboard_dir=tensorboard_dir, extra_callbacks=extra)
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)
  result = {"output_dir": config.output_dir, "tensorboard_dir": tensorboard_dir, "cells": statuses,
            "export": None}
  if config.export_dir:
    result["export"] = _export(config)
  return result


def _export(config: TrainConfig) -> str | None:
  """Exports every cell of the grid as one ensemble (pdx_tf.serving.export) once all of them are complete.

  With several shards only the machine that finds the grid complete exports; the others log and return None
  (run `python -m export` afterwards, or rerun any shard with --export_dir).
  """
  folders = [contracts.cell_folder(config.output_dir, cell) for cell in grid.all_cells(config.num_repeats, config.num_folds)]
  missing = [folder for folder in folders if not grid.is_complete(folder)]
  if missing:
    logging.warning("--export_dir: %d of %d cells are not complete yet (e.g. %s); not exporting. Rerun with"
                    " --export_dir once every shard has finished, or use `python -m export`", len(missing),
                    len(folders), missing[0])
    return None
  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel

  return export.export_models(folders, config.export_dir, config.task)


# ----------------------------------------------------------------------------------------------- one cell


def _hparams(config: TrainConfig, cell: contracts.Cell, policy: str) -> dict[str, Any]:
  return {"task": config.task, "repeat": cell[0], "fold": cell[1], "alpha": config.model.alpha,
          "image_size": config.model.image_size, "weights": config.model.weights,
          "learning_rate": config.learning_rate, "precision": policy, "epochs": config.epochs,
          "batch_size": config.batch_size, "pool_fraction": config.pool_fraction,
          "bn_momentum": config.model.resolved_bn_momentum, "aggregation": config.aggregation}


class _Checkpointer(keras.callbacks.Callback):
  """After every epoch: the model with its optimizer state (atomic rename), then progress.json."""

  def __init__(self, folder: str, progress: dict[str, Any], batch_size: int):
    super().__init__()
    self._folder = folder
    self._progress = progress
    self._batch_size = batch_size
    self._steps = 0

  def on_epoch_begin(self, epoch, logs=None):
    self._steps = 0

  def on_train_batch_end(self, batch, logs=None):
    self._steps += 1

  def on_epoch_end(self, epoch, logs=None):
    logs = {key: float(value) for key, value in (logs or {}).items()}
    if not all(math.isfinite(value) for value in logs.values()):
      raise RunsError(f"epoch {epoch} of {self._folder} gave a non-finite loss or metric ({logs}); lower"
                      " --learning_rate or use --precision=float32")
    if self._steps == 0:
      raise RunsError(f"{self._folder}: the training draw is smaller than one batch; raise --pool_fraction or"
                      " lower --batch_size")
    checkpoint_folder = io_utils.join(self._folder, contracts.CHECKPOINT_FOLDER)
    io_utils.make_dirs(checkpoint_folder)
    path = io_utils.join(checkpoint_folder, "model.keras")
    temp = io_utils.temp_path_for(path)
    self.model.save(temp)
    tf.io.gfile.rename(temp, path, overwrite=True)
    self._progress["epochs_completed"] = epoch + 1
    self._progress["images_seen"] += self._steps * self._batch_size  # batches drop the remainder: exact
    self._progress["history"].append(logs)
    io_utils.atomic_write_json(io_utils.join(self._folder, contracts.PROGRESS_FILE), self._progress)


def _compile(model: keras.Model, config: TrainConfig) -> None:
  model.compile(optimizer=keras.optimizers.Adam(config.learning_rate),
                loss=keras.losses.BinaryCrossentropy(),
                metrics=[keras.metrics.AUC(name="auc"), keras.metrics.BinaryAccuracy(name="accuracy")],
                jit_compile=config.jit_compile)


# One compiled model per process, reused by every cell with the same settings: tracing MobileNetV2's train step
# costs 15-30 s on a CPU (more than a demo cell's training), so each cell assigns fresh initial weights and the
# optimizer's initial state into the already-traced model instead of compiling a new one.
_COMPILED: dict[tuple, tuple[keras.Model, list[np.ndarray]]] = {}


def _seed_keras(seed: int) -> None:
  """Seeds Keras' weight initialisation like `keras.utils.set_random_seed`, but leaves TF's global seed alone.

  Keras draws initializer and dropout seeds from Python's `random` when a layer has no explicit seed, so
  seeding it makes `build_model` a pure function of `seed`. `tf.random.set_seed` is set once per grid in
  `run_grid` instead: it clears TF's kernel cache, which makes an already-traced model re-optimise its graph
  at its next step (about 10 s per cell on a CPU).
  """
  random.seed(seed)
  np.random.seed(seed % 2**32)
  try:  # Keras' own global seed generator (keras.random without a seed); private, so optional.
    from keras.src.backend.common import global_state  # pylint: disable=import-outside-toplevel
    from keras.src.random import seed_generator  # pylint: disable=import-outside-toplevel
    global_state.set_global_attribute(seed_generator.GLOBAL_SEED_GENERATOR, None)
    global_state.set_global_attribute("global_random_seed", seed)
  except (ImportError, AttributeError):
    pass


def _fresh_model(config: TrainConfig, policy: str, strategy: tf.distribute.Strategy, init_seed: int) -> keras.Model:
  """A compiled model with the initial weights of `build_model` under `init_seed` and a fresh optimizer."""
  key = (config.model, policy, config.learning_rate, config.jit_compile, id(strategy))
  _seed_keras(init_seed)
  with strategy.scope():
    fresh = build_model(config.model)
    if key not in _COMPILED:
      _compile(fresh, config)
      fresh.optimizer.build(fresh.trainable_variables)
      _COMPILED.clear()  # keep one model in memory
      _COMPILED[key] = (fresh, [variable.numpy() for variable in fresh.optimizer.variables])
      return fresh
    model, optimizer_state = _COMPILED[key]
    for target, source in zip(model.variables, fresh.variables, strict=True):
      target.assign(source)
    for variable, value in zip(model.optimizer.variables, optimizer_state, strict=True):
      variable.assign(value)
  return model


def _load_progress(folder: str) -> dict[str, Any] | None:
  progress_path = io_utils.join(folder, contracts.PROGRESS_FILE)
  checkpoint_path = io_utils.join(folder, contracts.CHECKPOINT_FOLDER, "model.keras")
  if io_utils.exists(progress_path) and io_utils.exists(checkpoint_path):
    return io_utils.read_json(progress_path)
  return None


def train_cell(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any], cell: contracts.Cell,
               *, strategy: tf.distribute.Strategy | None = None, policy: str = "float32",
               tensorboard_dir: str | None = None,
               extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> str:
  """Trains (or resumes) one cell and writes its artifacts; returns "complete" or "interrupted".

  "interrupted" means a callback stopped training early; the checkpoint lets the next run resume.
  """
  started = time.time()
  strategy = strategy or tf.distribute.get_strategy()
  tensorboard_dir = tensorboard_dir or io_utils.join(config.output_dir, TENSORBOARD_FOLDER)
  name = contracts.cell_name(cell)
  folder = contracts.cell_folder(config.output_dir, cell)
  io_utils.make_dirs(folder)
  train_ids, test_ids = splits.cell_patients(split, *cell)
  init_seed = cell_seed(config.seed, cell)
  progress = _load_progress(folder)
  if progress is not None and progress.get("epochs_completed", 0) >= config.epochs:
    progress = None  # an earlier run with fewer epochs; nothing sensible to resume
  model = _fresh_model(config, policy, strategy, init_seed)
  if progress is not None:
    logging.info("cell %s: resuming after epoch %d", name, progress["epochs_completed"])
    # Restores the weights and the optimizer state (Adam moments, iteration count, loss scale).
    model.load_weights(io_utils.join(folder, contracts.CHECKPOINT_FOLDER, "model.keras"))
  else:
    progress = {"epochs_completed": 0, "images_seen": 0, "history": [], "wall_time_s": 0.0}
  initial_epoch = int(progress["epochs_completed"])
  train = input_pipeline.train_dataset(
      info, train_ids, task=config.task, sample_seed=config.seed, repeat=cell[0], shuffle_seed=init_seed,
      pool_fraction=config.pool_fraction, batch_size=config.batch_size, include_originals=config.include_originals,
      shuffle_buffer=config.shuffle_buffer, deterministic=config.deterministic, drop_remainder=True)
  validation = input_pipeline.load_validation(info, test_ids, config.task)
  if initial_epoch == 0:
    for images, _ in train.take(1):
      tensorboard.write_input_images(tensorboard_dir, name, images.numpy())
  callbacks = [tensorboard.EpochLogger(tensorboard_dir, name),
               _Checkpointer(folder, progress, config.batch_size), *extra_callbacks]
  with warnings.catch_warnings():
    # One pass over the (finite, unknown-length) dataset is an epoch by design; Keras warns about both.
    warnings.filterwarnings("ignore", message=".*ran out of data.*")
    warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
    model.fit(train, epochs=config.epochs, initial_epoch=initial_epoch,
              validation_data=validation.dataset(config.batch_size), callbacks=callbacks, verbose=2)
  progress["wall_time_s"] = float(progress.get("wall_time_s", 0.0)) + time.time() - started
  if progress["epochs_completed"] < config.epochs:
    io_utils.atomic_write_json(io_utils.join(folder, contracts.PROGRESS_FILE), progress)
    logging.info("cell %s: stopped after epoch %d of %d; rerun to resume", name, progress["epochs_completed"],
                 config.epochs)
    return "interrupted"
  _finish_cell(config, info, split, cell, model, validation, progress, policy, tensorboard_dir, init_seed)
  return "complete"


def _image_only(image: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
  del label
  return image


def _finish_cell(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any],
                 cell: contracts.Cell, model: keras.Model, validation: input_pipeline.ValidationSet,
                 progress: Mapping[str, Any], policy: str, tensorboard_dir: str, init_seed: int) -> None:
  """Writes model.keras, predictions, metrics.json, the HParams session and (last) run.json."""
  name = contracts.cell_name(cell)
  folder = contracts.cell_folder(config.output_dir, cell)
  model_path = io_utils.join(folder, "model.keras")
  temp = io_utils.temp_path_for(model_path)
  model.save(temp)
  tf.io.gfile.rename(temp, model_path, overwrite=True)

  probabilities = model.predict(validation.dataset(config.batch_size).map(_image_only), verbose=0)
  probabilities = probabilities.reshape(-1).astype(np.float64)
  slice_rows = [[patient_id, int(slice_index), int(label), f"{probability:.8f}"]
                for patient_id, slice_index, label, probability in
                zip(validation.patient_ids, validation.slice_indices, validation.labels, probabilities)]
  io_utils.atomic_write_csv(io_utils.join(folder, "slice_predictions.csv"),
                            ["patient_id", "slice_index", "label", "probability"], slice_rows)
  _, test_ids = splits.cell_patients(split, *cell)
  labels = info.labels(config.task)
  patient_probabilities = []
  for patient_id in test_ids:
    mine = probabilities[validation.patient_ids == patient_id]
    patient_probabilities.append(aggregation_lib.aggregate(mine, config.aggregation, config.top_k))
  patient_probabilities = np.asarray(patient_probabilities)
  patient_labels = np.asarray([labels[patient_id] for patient_id in test_ids])
  io_utils.atomic_write_csv(io_utils.join(folder, "patient_predictions.csv"), ["patient_id", "label", "probability"],
                            [[patient_id, int(label), f"{probability:.8f}"] for patient_id, label, probability
                             in zip(test_ids, patient_labels, patient_probabilities)])

  probability_std = float(np.std(probabilities))
  collapsed = probability_std < COLLAPSE_STD
  if collapsed:
    logging.warning("cell %s: held-out slice probabilities collapsed to one value (std %.2g < %g); the model"
                    " predicts a constant. From scratch, keep --bn_momentum at 0.9 (0.999 is the usual cause),"
                    " or lower --learning_rate", name, probability_std, COLLAPSE_STD)
  metrics = {
      "patient/auc": _auc(patient_labels, patient_probabilities),
      "patient/accuracy": float(np.mean((patient_probabilities >= 0.5) == patient_labels.astype(bool))),
      "slice/auc": _auc(validation.labels, probabilities),
  }
  metrics_document = {
      "task": config.task, "repeat": cell[0], "fold": cell[1], **metrics,
      "slice/probability_std": probability_std, "collapsed": collapsed,
      "num_test_patients": len(test_ids), "num_test_slices": int(probabilities.size),
      "epochs": int(progress["epochs_completed"]), "images_seen": int(progress["images_seen"]),
      "history": list(progress["history"])}
  io_utils.atomic_write_json(io_utils.join(folder, "metrics.json"), metrics_document)
  tensorboard.write_cell_hparams(tensorboard_dir, name, _hparams(config, cell, policy), metrics)

  run = {
      "schema_version": RUN_SCHEMA_VERSION, "task": config.task, "repeat": cell[0], "fold": cell[1],
      "status": contracts.COMPLETE_STATUS, "split_hash": splits.split_hash(split), "dataset_hash": info.dataset_hash,
      "records_hash": info.content_hash, "seeds": {"split": config.seed, "sample": config.seed, "init": init_seed},
      "config": configs.to_dict(config), "preprocess": info.preprocess, "region": info.region,
      "aggregation": config.aggregation, "aggregation_top_k": config.top_k,
      "code_version": provenance.code_version(), "wall_time_s": float(progress["wall_time_s"]),
      "images_seen": int(progress["images_seen"]), "model_path": "model.keras", "precision": policy}
  io_utils.atomic_write_json(io_utils.join(folder, contracts.RUN_FILE), run)
  # The resume state is no longer needed once run.json marks the cell complete.
  checkpoint_folder = io_utils.join(folder, contracts.CHECKPOINT_FOLDER)
  if io_utils.exists(checkpoint_folder):
    tf.io.gfile.rmtree(checkpoint_folder)
  progress_path = io_utils.join(folder, contracts.PROGRESS_FILE)
  if io_utils.exists(progress_path):
    tf.io.gfile.remove(progress_path)
