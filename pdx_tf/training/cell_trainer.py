"""One cell of the grid: training epoch by epoch, the atomic per-epoch checkpoint, and the cell's artifacts.

`train_cell` trains (or resumes) cell (repeat, fold) and, once its last epoch is done, writes `model.keras`,
`slice_predictions.csv`, `patient_predictions.csv`, `metrics.json` and, last, `run.json` (CONTRACTS.md).

Exact resume. Epoch e is one `model.fit(..., initial_epoch=e, epochs=e + 1)` over a dataset keyed by
(cell, epoch), and the dropout seed generators are reset to a state keyed by (cell seed, epoch) at its start,
so what epoch e sees never depends on how many epochs ran in this process. After every epoch:

  1. `checkpoint/epoch-NNNN.npz` (every model variable, then every optimizer variable: Adam's moments, its
     iteration count, a loss scale) is written to a temp name and renamed;
  2. `progress.json` naming that file is written the same way: this rename is the commit point;
  3. older checkpoint files are deleted.

A kill before step 2 leaves the previous progress.json, which names the previous checkpoint (still present):
the epoch is redone from the same state with the same inputs, none is lost or run twice. A kill after step 2
only leaves stale files, deleted on resume. A cell whose progress says every epoch is done goes straight to its
artifacts. The dropout state is reseeded at every epoch's start all the same, so what an epoch draws never depends on
a restored generator. The checkpoint is plain arrays (`save_training_state`) rather than a `.keras` file: Keras'
saver walks every layer and writes an HDF5 group per variable, 0.6-1 s a save for the demo's small model (a
sampling profile of the demo put 12 % of its Python time there, 5 saves a cell), while the same state as one .npz
takes under 0.1 s; the cell's final `model.keras` is still a Keras file. A cell interrupted by an earlier version
resumes from its `.keras` checkpoint.

Inner validation (config.inner_fraction > 0): the model fits on the cell's training patients minus its inner
patients (splits.inner_split); after training, the inner patients are predicted as the held-out ones are (original
slices, 2.5D stacks, or one bag a patient for attention-MIL) and their patient probabilities give the
operating threshold (config.threshold) and the calibration (config.calibration, pdx_tf/training/calibration.py),
both stored in run.json. A joint cell fits both per task from that task's head and stores them under run.json's
"by_task" (the inner patients are drawn on both labels' strata). With config.early_stopping_patience = K, each
epoch's inner loss (binary cross-entropy over the inner slices, or over the inner patients' bags for attention-MIL,
or model.JointLoss over the inner slices for a joint model) goes into progress.json with the best
epoch so far ("best_epoch", "best_inner_loss", "best_checkpoint": that epoch's checkpoint file, kept until the
cell is finished); after K epochs without a lower loss the cell stops ("stopped_early") and its artifacts come
from the best epoch's weights. All of it is committed with the epoch, so a resumed cell makes the same decisions
as an uninterrupted one.

Seeds: the pool draw uses (`seed`, repeat) (input_pipeline.pool_keep); the initialisation uses
`cell_seed(seed, cell)`; the shuffle and dropout of epoch e use (cell_seed, e).
"""

from __future__ import annotations

import dataclasses
import io
import math
import random
import re
import time
import warnings
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pdx_tf import contracts, io_utils, metrics as metrics_lib, provenance
from pdx_tf.contracts import TENSORBOARD_FOLDER
from pdx_tf.errors import RunsError
from pdx_tf.training import aggregation as aggregation_lib, calibration as calibration_lib, input_pipeline
from pdx_tf.training import heads, model as model_lib, regions, splits, tensorboard
from pdx_tf.training.model import build_model
from pdx_tf.training.train_config import TrainConfig

# Held-out slice probabilities with a smaller spread mean the model predicts one constant (see model.py).
COLLAPSE_STD = 1e-3
_CHECKPOINT_PATTERN = re.compile(r"^epoch-(\d{4,})\.(npz|keras)$")  # .keras: written by earlier versions


def cell_seed(seed: int, cell: contracts.Cell) -> int:
  """The initialisation seed of a cell (and the root of its per-epoch shuffle and dropout seeds)."""
  return int(np.random.default_rng([seed, cell[0], cell[1]]).integers(2**31))


def epoch_seed(init_seed: int, epoch: int) -> int:
  """The shuffle / dropout seed of one epoch of a cell: a pure function of (cell seed, epoch)."""
  return int(np.random.default_rng([init_seed, epoch, 0x5EED]).integers(2**31))


@dataclasses.dataclass(frozen=True)
class PoolKey:
  """What a cell's training pool and its epoch order are pure functions of (with the records): the pool draw's
  sample_seed (train's --seed), the cell's repeat, pool_fraction and include_originals, and the cell's shuffle seed.
  Built once, by `pool_key`, for training (epoch_dataset) and for `train --plan` (trainer.plan_grid), so the plan
  counts the pool that training draws."""
  sample_seed: int
  repeat: int
  pool_fraction: float
  include_originals: bool
  shuffle_seed: int

  def pool_arguments(self) -> dict[str, Any]:
    """Keyword arguments of input_pipeline.pool_shards, pool_size, bytes_to_read and epoch_shards."""
    return {"sample_seed": self.sample_seed, "repeat": self.repeat, "pool_fraction": self.pool_fraction,
            "include_originals": self.include_originals}

  def epoch_arguments(self, epoch: int) -> dict[str, Any]:
    """Keyword arguments of input_pipeline.train_dataset, stack_train_dataset and mil_train_dataset for `epoch`."""
    return {**self.pool_arguments(), "epoch": epoch, "shuffle_seed": self.shuffle_seed}


def pool_key(config: TrainConfig, cell: contracts.Cell) -> PoolKey:
  """The PoolKey of `cell` under `config`."""
  return PoolKey(sample_seed=config.seed, repeat=cell[0], pool_fraction=config.pool_fraction,
                 include_originals=config.include_originals, shuffle_seed=cell_seed(config.seed, cell))


def checkpoint_name(epoch: int) -> str:
  """The checkpoint file written after `epoch` epochs (1-based count)."""
  return f"epoch-{epoch:04d}.npz"


# ------------------------------------------------------------------------------------------ training inputs


def uses_stacks(config: TrainConfig) -> bool:
  """Whether training reads stacks built from the originals (2.5D or MIL) instead of the stored copies."""
  return config.context_slices > 0 or heads.get(config.model.head).bags


def epoch_dataset(config: TrainConfig, info: contracts.DatasetInfo, train_ids: Sequence[str],
                  cell: contracts.Cell, epoch: int,
                  stacks: input_pipeline.PatientStacks | None = None) -> tf.data.Dataset:
  """The (finite) batches of epoch `epoch` of a cell: a pure function of (config, cell, epoch), so a resumed
  epoch sees exactly the batches an uninterrupted run would. `stacks`: the training patients'
  `input_pipeline.load_patient_stacks` when `uses_stacks(config)`."""
  if heads.get(config.model.head).bags:
    bags_per_epoch = None
    if config.images_per_epoch:  # the same number of slice images an epoch as the slice head would see
      mean_slices = np.mean([len(input_pipeline.bag_slices(stacks.counts[patient_id], config.mil_max_slices))
                             for patient_id in train_ids])
      bags_per_epoch = max(config.mil_bags_per_batch, int(round(config.images_per_epoch / mean_slices)))
    return input_pipeline.mil_train_dataset(
        info, train_ids, stacks, **pool_key(config, cell).epoch_arguments(epoch),
        bags_per_batch=config.mil_bags_per_batch, bags_per_epoch=bags_per_epoch, max_slices=config.mil_max_slices)
  if config.context_slices:
    return input_pipeline.stack_train_dataset(
        info, train_ids, stacks, task=config.task, **pool_key(config, cell).epoch_arguments(epoch),
        batch_size=config.batch_size, images_per_epoch=config.images_per_epoch, shuffle_buffer=config.shuffle_buffer,
        deterministic=config.deterministic)
  return input_pipeline.train_dataset(
      info, train_ids, task=config.task, **pool_key(config, cell).epoch_arguments(epoch),
      batch_size=config.batch_size, images_per_epoch=config.images_per_epoch, shuffle_buffer=config.shuffle_buffer,
      deterministic=config.deterministic, drop_remainder=True, region_bands=config.region_bands)


# ------------------------------------------------------------------------------------------------ the model


def hparams(config: TrainConfig, cell: contracts.Cell, policy: str) -> dict[str, Any]:
  return {"task": config.task, "repeat": cell[0], "fold": cell[1], "alpha": config.model.alpha,
          "image_size": config.model.image_size, "weights": config.model.weights,
          "learning_rate": config.learning_rate, "precision": policy, "epochs": config.epochs,
          "batch_size": config.batch_size, "pool_fraction": config.pool_fraction,
          "bn_momentum": config.model.resolved_bn_momentum, "aggregation": config.aggregation,
          "context_slices": config.context_slices, "head": config.model.head}


def compile_model(model: keras.Model, config: TrainConfig) -> None:
  """Adam on binary cross-entropy; a joint model (two heads) on model.JointLoss, its AUC the mean of the two."""
  if config.regions:  # recorded region labels only; Keras' AUC cannot mask, so the loss is the epoch's figure
    model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=regions.RegionLoss(),
                  jit_compile=config.jit_compile)
    return
  if config.model.joint_heads:
    loss = model_lib.JointLoss(config.consistency_weight)
    auc_metric = keras.metrics.AUC(name="auc", multi_label=True, num_labels=len(config.tasks))
  else:
    loss, auc_metric = keras.losses.BinaryCrossentropy(), keras.metrics.AUC(name="auc")
  model.compile(optimizer=keras.optimizers.Adam(config.learning_rate), loss=loss,
                metrics=[auc_metric, keras.metrics.BinaryAccuracy(name="accuracy")], jit_compile=config.jit_compile)


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


def fresh_model(config: TrainConfig, policy: str, strategy: tf.distribute.Strategy, init_seed: int) -> keras.Model:
  """A compiled model with the initial weights of `build_model` under `init_seed` and a fresh optimizer."""
  key = (config.model, policy, config.learning_rate, config.jit_compile, config.consistency_weight, id(strategy))
  _seed_keras(init_seed)
  with strategy.scope():
    fresh = build_model(config.model)
    if key not in _COMPILED:
      compile_model(fresh, config)
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


def reseed_dropout(model: keras.Model, seed: int) -> int:
  """Sets every SeedGenerator state of `model` (dropout) to one keyed by `seed`; returns how many it set."""
  count = 0
  for variable in model.non_trainable_variables:
    if variable.path.endswith("seed_generator_state"):
      state = np.asarray([(seed + count) % 2**31, 0]).astype(keras.backend.standardize_dtype(variable.dtype))
      variable.assign(state)
      count += 1
  return count


# ---------------------------------------------------------------------------------------------- checkpoints


def load_progress(folder: str) -> tuple[dict[str, Any], str] | None:
  """(progress, checkpoint path) of an interrupted cell, or None to start from scratch.

  Only a checkpoint named by progress.json counts: a newer file without its progress.json is an epoch that did
  not commit, so it is redone.
  """
  progress_path = io_utils.join(folder, contracts.PROGRESS_FILE)
  if not io_utils.exists(progress_path):
    return None
  try:
    progress = io_utils.read_json(progress_path)
  except ValueError:
    logging.warning("%s is not valid JSON; the cell starts over", progress_path)
    return None
  name = progress.get("checkpoint", "model.keras")  # "model.keras": the layout before per-epoch files
  checkpoint = io_utils.join(folder, contracts.CHECKPOINT_FOLDER, name)
  if progress.get("epochs_completed", 0) > 0 and not io_utils.exists(checkpoint):
    logging.warning("%s names %s, which is missing; the cell starts over", progress_path, checkpoint)
    return None
  return progress, checkpoint


def _remove_other_checkpoints(folder: str, *keep: str) -> None:
  checkpoint_folder = io_utils.join(folder, contracts.CHECKPOINT_FOLDER)
  if not io_utils.exists(checkpoint_folder):
    return
  for name in tf.io.gfile.listdir(checkpoint_folder):
    if name not in keep:
      path = io_utils.join(checkpoint_folder, name)
      if not tf.io.gfile.isdir(path):
        tf.io.gfile.remove(path)


def _training_variables(model: keras.Model) -> list:
  if not model.optimizer.built:
    model.optimizer.build(model.trainable_variables)
  return list(model.variables) + list(model.optimizer.variables)


def save_training_state(model: keras.Model, path: str) -> None:
  """Writes `path` (.npz, atomically): model.variables then model.optimizer.variables, array i as `arr_i`."""
  buffer = io.BytesIO()
  np.savez(buffer, *[variable.numpy() for variable in _training_variables(model)])
  io_utils.atomic_write_bytes(path, buffer.getvalue())


def restore_training_state(model: keras.Model, path: str) -> None:
  """Assigns a checkpoint's weights and optimizer state to `model` (built and compiled as when it was saved).

  Raises:
    RunsError: the checkpoint holds other variables (count or shapes): it was written by another model; one line.
  """
  if path.endswith(".keras"):  # a checkpoint of an earlier version
    model.load_weights(path)
    return
  with tf.io.gfile.GFile(path, "rb") as handle:
    arrays = np.load(io.BytesIO(handle.read()))
    values = [arrays[f"arr_{index}"] for index in range(len(arrays.files))]
  variables = _training_variables(model)
  shapes = [tuple(variable.shape) for variable in variables]
  if [value.shape for value in values] != shapes:
    raise RunsError(f"checkpoint {path} holds {len(values)} arrays that do not match this model's {len(variables)}"
                    " variables (another model or version wrote it); delete the cell's folder to retrain it")
  for variable, value in zip(variables, values):
    variable.assign(value)


def commit_epoch(folder: str, model: keras.Model, progress: dict[str, Any]) -> None:
  """Writes the checkpoint of `progress["epochs_completed"]`, then progress.json naming it (the commit), then
  deletes older checkpoints (module docstring)."""
  checkpoint_folder = io_utils.join(folder, contracts.CHECKPOINT_FOLDER)
  io_utils.make_dirs(checkpoint_folder)
  name = checkpoint_name(int(progress["epochs_completed"]))
  path = io_utils.join(checkpoint_folder, name)
  save_training_state(model, path)
  progress["checkpoint"] = name
  if progress.get("best_epoch") == progress["epochs_completed"]:
    progress["best_checkpoint"] = name  # early stopping: this epoch's file is kept while it stays the best
  io_utils.atomic_write_json(io_utils.join(folder, contracts.PROGRESS_FILE), progress)
  _remove_other_checkpoints(folder, name, progress.get("best_checkpoint", name))


class _EpochChecks(keras.callbacks.Callback):
  """Counts an epoch's steps and refuses a non-finite loss or an empty epoch."""

  def __init__(self, folder: str):
    super().__init__()
    self._folder = folder
    self.steps = 0
    self.logs: dict[str, float] = {}

  def on_epoch_begin(self, epoch, logs=None):
    self.steps = 0

  def on_train_batch_end(self, batch, logs=None):
    self.steps += 1

  def on_epoch_end(self, epoch, logs=None):
    self.logs = {key: float(value) for key, value in (logs or {}).items()}
    if not all(math.isfinite(value) for value in self.logs.values()):
      raise RunsError(f"epoch {epoch} of {self._folder} gave a non-finite loss or metric ({self.logs}); lower"
                      " --learning_rate or use --precision=float32")
    if self.steps == 0:
      raise RunsError(f"{self._folder}: the training draw is smaller than one batch; raise --pool_fraction or"
                      " lower --batch_size")


# --------------------------------------------------------------------------------------------------- a cell


def train_cell(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any], cell: contracts.Cell,
               *, strategy: tf.distribute.Strategy | None = None, policy: str = "float32",
               tensorboard_dir: str | None = None,
               extra_callbacks: Sequence[keras.callbacks.Callback] = ()) -> str:
  """Trains (or resumes) one cell and writes its artifacts.

  Args:
    config: the grid settings; info: the records; split: splits.make_splits' result; cell: (repeat, fold).
    strategy: the distribution strategy (default: the current one); policy: the resolved dtype policy.
    tensorboard_dir: R/tensorboard by default.
    extra_callbacks: Keras callbacks added to every epoch's fit (one that sets `model.stop_training` interrupts
      the cell after the current epoch is committed).

  Returns:
    "complete", or "interrupted" when a callback stopped training (the next run resumes).
  """
  strategy = strategy or tf.distribute.get_strategy()
  tensorboard_dir = tensorboard_dir or io_utils.join(config.output_dir, TENSORBOARD_FOLDER)
  name = contracts.cell_name(cell)
  folder = contracts.cell_folder(config.output_dir, cell)
  io_utils.make_dirs(folder)
  train_ids, test_ids = splits.cell_patients(split, *cell)
  # With inner validation off, fit_ids == train_ids (sorted) and inner_ids is empty.
  fit_ids, inner_ids = splits.cell_inner_split(info, config.task, train_ids, seed=config.seed, repeat=cell[0],
                                               fold=cell[1], fraction=config.inner_fraction)
  init_seed = cell_seed(config.seed, cell)
  resumed = load_progress(folder)
  progress = resumed[0] if resumed else None
  if progress is not None and progress.get("epochs_completed", 0) > config.epochs:
    progress = None  # an earlier run with more epochs; nothing sensible to resume
  model = fresh_model(config, policy, strategy, init_seed)
  if progress is None:
    progress = {"epochs_completed": 0, "images_seen": 0, "history": [], "wall_time_s": 0.0}
  if progress["epochs_completed"] > 0:
    logging.info("cell %s: resuming after epoch %d", name, progress["epochs_completed"])
    # Restores the weights and the optimizer state (Adam moments, iteration count, loss scale).
    restore_training_state(model, resumed[1])
  elif heads.get(config.model.head).needs_learned_features and config.mil_init_from:
    _start_from_slice_model(config, cell, model)
  # Uncommitted epochs' files go; the committed one and the best epoch's (early stopping) stay.
  _remove_other_checkpoints(folder, progress.get("checkpoint", ""), progress.get("best_checkpoint", ""))
  validation = input_pipeline.load_validation(info, test_ids, config.task)
  inner = input_pipeline.load_validation(info, inner_ids, config.task) if inner_ids else None
  stacks = input_pipeline.load_patient_stacks(info, fit_ids, config.task, config.context_slices) \
      if uses_stacks(config) else None
  validation_data = _validation_data(config, info, validation, test_ids)
  # The inner patients as the model takes them (slices, 2.5D stacks or bags), built once for every epoch.
  inner_data = _validation_data(config, info, inner, inner_ids) if inner is not None else None
  checks = _EpochChecks(folder)
  interrupted = False
  for epoch in range(int(progress["epochs_completed"]), config.epochs):
    if progress.get("stopped_early"):
      break
    train = epoch_dataset(config, info, fit_ids, cell, epoch, stacks)
    if epoch == 0:
      for images, _ in train.take(1):
        tensorboard.write_input_images(tensorboard_dir, name, _viewable(images, config.context_slices))
    reseed_dropout(model, epoch_seed(init_seed, epoch))
    epoch_started = time.time()
    # A logger per fit: EpochLogger closes its writers at the end of each fit.
    callbacks = [tensorboard.EpochLogger(tensorboard_dir, name), checks, *extra_callbacks]
    steps_before = int(model.optimizer.iterations.numpy())
    with warnings.catch_warnings():
      # One pass over the (finite, unknown-length) dataset is an epoch by design; Keras warns about both.
      warnings.filterwarnings("ignore", message=".*ran out of data.*")
      warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed.*")
      model.fit(train, epochs=epoch + 1, initial_epoch=epoch, validation_data=validation_data,
                callbacks=callbacks, verbose=2)
    # Keras 3.15's TensorFlow trainer ends an epoch of unknown length with a step whose get_next fails; the
    # optimizer's step counter, which does not wait for the data, is incremented by it all the same (no weight
    # moves). Adam's bias correction reads that counter, so it is set back to the steps really taken.
    model.optimizer.iterations.assign(steps_before + checks.steps)
    progress["epochs_completed"] = epoch + 1
    progress["images_seen"] += checks.steps * config.batch_size  # batches drop the remainder: exact
    progress["history"].append(checks.logs)
    progress["wall_time_s"] = float(progress.get("wall_time_s", 0.0)) + time.time() - epoch_started
    if config.early_stopping_patience > 0:
      _early_stopping_step(config, model, inner, inner_ids, inner_data, progress)
    commit_epoch(folder, model, progress)
    if progress.get("stopped_early"):
      logging.info("cell %s: inner loss not lower for %d epochs; stopped after epoch %d, keeping epoch %d", name,
                   config.early_stopping_patience, progress["epochs_completed"], progress["best_epoch"])
      break
    if model.stop_training and epoch + 1 < config.epochs:
      interrupted = True
      break
  if interrupted:
    logging.info("cell %s: stopped after epoch %d of %d; rerun to resume", name, progress["epochs_completed"],
                 config.epochs)
    return "interrupted"
  if progress.get("best_checkpoint"):
    restore_training_state(model, io_utils.join(folder, contracts.CHECKPOINT_FOLDER, progress["best_checkpoint"]))
  _finish_cell(config, info, split, cell, model, validation, progress, policy, tensorboard_dir, init_seed,
               inner=inner, inner_ids=inner_ids, inner_data=inner_data)
  return "complete"


def _start_from_slice_model(config: TrainConfig, cell: contracts.Cell, model: keras.Model) -> None:
  """Loads the same cell of the --mil_init_from slice grid into the MIL model (model.copy_slice_weights)."""
  path = io_utils.join(contracts.cell_folder(config.mil_init_from, cell), "model.keras")
  slice_model = keras.saving.load_model(path, compile=False)
  try:
    model_lib.copy_slice_weights(slice_model, model)
  except ValueError as error:
    raise RunsError(f"{path}: {error}") from None
  logging.info("cell %s: attention-MIL starts from %s", contracts.cell_name(cell), path)


def _viewable(images: tf.Tensor, context_slices: int) -> np.ndarray:
  """A batch's inputs as [B, S, S, 3] for TensorBoard: a MIL batch's first bag; a 2.5D stack's centre slice."""
  images = images[0][0] if isinstance(images, tuple) else images
  images = np.asarray(images)
  if context_slices:
    images = np.repeat(images[..., context_slices:context_slices + 1], 3, axis=-1)
  return images


def _validation_data(config: TrainConfig, info: contracts.DatasetInfo, validation: input_pipeline.ValidationSet,
                     test_ids: Sequence[str]) -> tf.data.Dataset:
  """The held-out fold as the model takes it: slices (the paper), 2.5D stacks, or one bag a patient."""
  if heads.get(config.model.head).bags:
    stacks = input_pipeline.load_patient_stacks(info, test_ids, config.task, config.context_slices)
    return input_pipeline.mil_validation_dataset(stacks, test_ids)
  if config.context_slices:
    validation = dataclasses.replace(
        validation, images=input_pipeline.stacks_from_validation(validation, config.context_slices))
  return validation.dataset(config.batch_size)


def held_out_probabilities(config: TrainConfig, model: keras.Model, validation: input_pipeline.ValidationSet,
                           test_ids: Sequence[str], validation_data: tf.data.Dataset | None = None,
                           column: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """(slice probabilities [N] in validation order, patient probabilities in test_ids order, attention [N] or None).

  Slice head: model.predict per slice, then the configured aggregation; `column`: the output column of a joint
  model (its task's head), predicted with the joint model itself so its predict function is traced once a cell.
  Attention-MIL: one bag a patient; the patient probability is the model's, the slice probability its instance
  score (`model.mil_outputs`) and the attention its weight of each slice.
  """
  if not heads.get(config.model.head).own_patient_score:
    data = validation_data if validation_data is not None else validation.dataset(config.batch_size)
    probabilities = model.predict(data.map(_image_only), verbose=0)
    if config.regions:  # [N, 13] and [P, 13]: each region's column aggregated like a task's
      probabilities = np.asarray(probabilities, np.float64)
      return probabilities, regions.patient_probabilities(
          probabilities, validation.patient_ids, test_ids, config.aggregation, config.top_k,
          slice_indices=validation.slice_indices if config.region_bands else None), None
    probabilities = (probabilities if column is None else probabilities[:, column]).reshape(-1).astype(np.float64)
    patient = np.asarray([aggregation_lib.aggregate(probabilities[validation.patient_ids == patient_id],
                                                    config.aggregation, config.top_k) for patient_id in test_ids])
    return probabilities, patient, None
  probabilities = np.zeros(validation.patient_ids.size, np.float64)
  attention = np.zeros(validation.patient_ids.size, np.float64)
  patient = []
  for ((bag, mask), _), patient_id in zip(validation_data, test_ids):
    outputs = model_lib.mil_outputs(model, bag, mask)
    rows = np.flatnonzero(validation.patient_ids == patient_id)
    rows = rows[np.argsort(validation.slice_indices[rows], kind="stable")]  # the bag is in slice order
    probabilities[rows] = np.asarray(outputs["slice_probability"])[0]
    attention[rows] = np.asarray(outputs["attention"])[0]
    patient.append(float(np.asarray(outputs["probability"])[0]))
  return probabilities, np.asarray(patient), attention


def _binary_cross_entropy(labels, probabilities) -> np.ndarray:
  """Elementwise binary cross-entropy with Keras' clipping of the probabilities to [1e-7, 1 - 1e-7]."""
  probabilities = np.clip(np.asarray(probabilities, np.float64), 1e-7, 1.0 - 1e-7)
  labels = np.asarray(labels, np.float64)
  return -(labels * np.log(probabilities) + (1.0 - labels) * np.log1p(-probabilities))


def inner_loss(config: TrainConfig, model: keras.Model, inner: input_pipeline.ValidationSet,
               inner_ids: Sequence[str], inner_data: tf.data.Dataset) -> float:
  """Mean binary cross-entropy (Keras' clipping) on the inner patients, at the unit the model is trained on: their
  original slices (or 2.5D stacks) for the slice head, one bag a patient for attention-MIL. `inner_data`: their
  `_validation_data`. A joint model's loss is its training loss, model.JointLoss, over the inner slices: the mean
  of the two tasks' cross-entropies plus consistency_weight x max(0, P(sb) - P(p))^2."""
  if config.joint:
    probabilities = np.asarray(model.predict(inner_data.map(_image_only), verbose=0), np.float64)  # [N, 2]
    violation = np.maximum(0.0, probabilities[:, 1] - probabilities[:, 0])
    per_slice = (np.mean(_binary_cross_entropy(inner.labels, probabilities), axis=-1)
                 + config.consistency_weight * violation**2)
    return float(np.mean(per_slice))
  slice_probabilities, patient_probabilities, _ = held_out_probabilities(config, model, inner, inner_ids, inner_data)
  if config.regions:
    return regions.masked_cross_entropy(inner.labels, slice_probabilities)
  if heads.get(config.model.head).bags:  # trained a bag (patient) at a time
    labels_by_patient = {patient_id: int(label) for patient_id, label in zip(inner.patient_ids, inner.labels)}
    probabilities, labels = patient_probabilities, np.asarray([labels_by_patient[p] for p in inner_ids])
  else:
    probabilities, labels = slice_probabilities, inner.labels
  return float(np.mean(_binary_cross_entropy(labels, probabilities)))


def _early_stopping_step(config: TrainConfig, model: keras.Model, inner: input_pipeline.ValidationSet,
                         inner_ids: Sequence[str], inner_data: tf.data.Dataset, progress: dict[str, Any]) -> None:
  """Records this epoch's inner loss in progress and updates the best epoch and the stop decision."""
  loss = inner_loss(config, model, inner, inner_ids, inner_data)
  completed = int(progress["epochs_completed"])
  progress["history"][-1]["inner_loss"] = loss
  if progress.get("best_inner_loss") is None or loss < progress["best_inner_loss"]:
    progress["best_epoch"], progress["best_inner_loss"] = completed, loss
  elif completed - int(progress["best_epoch"]) >= config.early_stopping_patience:
    progress["stopped_early"] = True


def _image_only(image: tf.Tensor, label: tf.Tensor) -> tf.Tensor:
  del label
  return image


def auc(labels, probabilities) -> float | None:
  """The project's one ROC AUC (pdx_tf/metrics.py: ties count one half); None when undefined."""
  value = metrics_lib.auc(np.asarray(labels), np.asarray(probabilities, np.float64))
  return None if value is None or not math.isfinite(value) else float(value)


def _inner_decisions(config: TrainConfig, model: keras.Model, inner: input_pipeline.ValidationSet | None,
                     inner_ids: Sequence[str], inner_data: tf.data.Dataset | None, labels: Mapping[str, int],
                     progress: Mapping[str, Any], column: int | None = None) -> dict[str, Any] | None:
  """One task's threshold, calibration and inner-validation record (run.json's, or a joint cell's
  run.json "by_task" entry); None when every opt-in field is at its default (then run.json has none of these keys
  and the threshold is 0.5). The inner patients' probabilities are made like the held-out ones
  (`held_out_probabilities`: the aggregation rule over slices or 2.5D stacks, or the MIL model's own patient
  probability); `column`: the task's output column of a joint model, `labels`: that task's labels."""
  if config.inner_fraction == 0.0 and config.threshold_rule == "fixed" and float(config.threshold) == 0.5:
    return None
  rule, fixed = calibration_lib.parse_threshold(config.threshold)
  if inner is None:
    return {"threshold": fixed, "threshold_rule": rule, "calibration": None, "inner_validation": None}
  slice_probabilities, probabilities, _ = held_out_probabilities(config, model, inner, inner_ids, inner_data,
                                                                 column=column)
  inner_labels = np.asarray([labels[patient_id] for patient_id in inner_ids])
  return {
      "threshold": calibration_lib.operating_threshold(rule, fixed, inner_labels, probabilities),
      "threshold_rule": rule,
      "calibration": calibration_lib.fit_calibration(config.calibration, inner_labels, probabilities),
      "inner_validation": {
          "fraction": config.inner_fraction, "patients": list(inner_ids),
          "patient_probabilities": [float(value) for value in probabilities],
          "n_positive": int(inner_labels.sum()), "n_slices": int(slice_probabilities.size),
          "patient_auc": auc(inner_labels, probabilities),
          "early_stopping": _early_stopping_record(config, progress),
      },
  }


def _early_stopping_record(config: TrainConfig, progress: Mapping[str, Any]) -> dict[str, Any] | None:
  return None if config.early_stopping_patience == 0 else {
      "patience": config.early_stopping_patience, "best_epoch": progress.get("best_epoch"),
      "best_inner_loss": progress.get("best_inner_loss"), "stopped_early": bool(progress.get("stopped_early", False)),
      "epochs_trained": int(progress["epochs_completed"])}


def _finish_region_cell(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any],
                        cell: contracts.Cell, model: keras.Model, validation: input_pipeline.ValidationSet,
                        progress: Mapping[str, Any], policy: str, tensorboard_dir: str, init_seed: int,
                        inner: input_pipeline.ValidationSet | None, inner_ids: Sequence[str],
                        inner_data: tf.data.Dataset | None) -> None:
  """`_finish_cell` of a regions cell: thresholds (one a region), PCI scale and inner record
  (regions.inner_decision), the held-out region predictions (regions.write_cell_predictions), then run.json."""
  folder = contracts.cell_folder(config.output_dir, cell)
  train_ids, test_ids = splits.cell_patients(split, *cell)
  rule, fixed = calibration_lib.parse_threshold(config.threshold)
  labels = probabilities = None
  n_slices = 0
  if inner is not None:
    slice_probabilities, probabilities, _ = held_out_probabilities(config, model, inner, inner_ids, inner_data)
    labels, n_slices = regions.patient_region_labels(info, inner_ids), slice_probabilities.shape[0]
  decision = regions.inner_decision(rule, fixed, config.inner_fraction, inner_ids, labels, probabilities, n_slices,
                                    regions.pci_scale(info, train_ids), _early_stopping_record(config, progress))
  slice_probabilities, probabilities, _ = held_out_probabilities(
      config, model, validation, test_ids, _validation_data(config, info, validation, test_ids))
  metrics = regions.write_cell_predictions(folder, info, test_ids, validation.patient_ids, validation.slice_indices,
                                           slice_probabilities, probabilities, decision, cell, progress)
  tensorboard.write_cell_hparams(tensorboard_dir, contracts.cell_name(cell), hparams(config, cell, policy), metrics)
  _write_run(config, info, split, cell, progress, policy, init_seed, {config.task: decision})


def _finish_cell(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any],
                 cell: contracts.Cell, model: keras.Model, validation: input_pipeline.ValidationSet,
                 progress: Mapping[str, Any], policy: str, tensorboard_dir: str, init_seed: int, *,
                 inner: input_pipeline.ValidationSet | None = None, inner_ids: Sequence[str] = (),
                 inner_data: tf.data.Dataset | None = None) -> None:
  """Writes model.keras, each task's predictions and metrics.json, the HParams session and (last) run.json.

  With inner validation, the inner patients' patient probabilities give the threshold and the calibration
  (module docstring); the held-out patient_predictions.csv gains `calibrated_probability` when calibrating.
  A joint grid's cell writes each task's predictions and metrics.json in its `<task>/` sub-folder
  (contracts.task_folder), from that task's output column.
  """
  name = contracts.cell_name(cell)
  folder = contracts.cell_folder(config.output_dir, cell)
  model_path = io_utils.join(folder, "model.keras")
  temp = io_utils.temp_path_for(model_path)
  model.save(temp)
  tf.io.gfile.rename(temp, model_path, overwrite=True)
  if config.regions:
    _finish_region_cell(config, info, split, cell, model, validation, progress, policy, tensorboard_dir, init_seed,
                        inner, inner_ids, inner_data)
    return

  _, test_ids = splits.cell_patients(split, *cell)
  # Each task's threshold, calibration and inner record, from its own head's inner patient probabilities.
  decisions = {task: _inner_decisions(config, model, inner, inner_ids, inner_data, info.labels(task), progress,
                                      column=index if config.joint else None)
               for index, task in enumerate(config.tasks)}
  board_metrics: dict[str, float | None] = {}
  for index, task in enumerate(config.tasks):
    task_validation = validation if not config.joint else dataclasses.replace(validation,
                                                                              labels=validation.labels[:, index])
    metrics = _write_task_predictions(config, info, task, contracts.task_folder(folder, config.task, task), model,
                                      index if config.joint else None, task_validation, cell, test_ids, progress,
                                      decisions[task])
    board_metrics.update(metrics if not config.joint else {f"{task}/{key}": value for key, value in metrics.items()})
  tensorboard.write_cell_hparams(tensorboard_dir, name, hparams(config, cell, policy), board_metrics)
  _write_run(config, info, split, cell, progress, policy, init_seed, decisions)


def _write_task_predictions(config: TrainConfig, info: contracts.DatasetInfo, task: str, folder: str,
                            model: keras.Model, column: int | None, validation: input_pipeline.ValidationSet,
                            cell: contracts.Cell, test_ids: Sequence[str], progress: Mapping[str, Any],
                            decision: Mapping[str, Any] | None) -> dict[str, float | None]:
  """One task's slice_predictions.csv, patient_predictions.csv and metrics.json in `folder`, from `model` (its
  output `column` for a joint model) on the held-out slices with that task's labels; returns the TensorBoard
  metrics."""
  name = contracts.cell_name(cell)
  probabilities, patient_probabilities, attention = held_out_probabilities(
      config, model, validation, test_ids, _validation_data(config, info, validation, test_ids), column=column)
  slice_rows = [[patient_id, int(slice_index), int(label), f"{probability:.8f}"]
                for patient_id, slice_index, label, probability in
                zip(validation.patient_ids, validation.slice_indices, validation.labels, probabilities)]
  io_utils.atomic_write_csv(io_utils.join(folder, "slice_predictions.csv"),
                            ["patient_id", "slice_index", "label", "probability"], slice_rows)
  if attention is not None:
    io_utils.atomic_write_csv(io_utils.join(folder, "slice_attention.csv"), ["patient_id", "slice_index", "attention"],
                              [[patient_id, int(slice_index), f"{weight:.8f}"] for patient_id, slice_index, weight
                               in zip(validation.patient_ids, validation.slice_indices, attention)])
  labels = info.labels(task)
  patient_labels = np.asarray([labels[patient_id] for patient_id in test_ids])
  header = ["patient_id", "label", "probability"]
  rows = [[patient_id, int(label), f"{probability:.8f}"] for patient_id, label, probability
          in zip(test_ids, patient_labels, patient_probabilities)]
  if decision and decision["calibration"]:
    header.append("calibrated_probability")
    calibrated = calibration_lib.apply_calibration(decision["calibration"], patient_probabilities)
    for row, value in zip(rows, calibrated):
      row.append(f"{value:.8f}")
  io_utils.atomic_write_csv(io_utils.join(folder, "patient_predictions.csv"), header, rows)
  threshold = decision["threshold"] if decision else 0.5

  probability_std = float(np.std(probabilities))
  collapsed = probability_std < COLLAPSE_STD
  if collapsed:
    logging.warning("cell %s: held-out slice probabilities collapsed to one value (std %.2g < %g); the model"
                    " predicts a constant. From scratch, keep --bn_momentum at 0.9 (0.999 is the usual cause),"
                    " or lower --learning_rate", name, probability_std, COLLAPSE_STD)
  metrics = {
      "patient/auc": auc(patient_labels, patient_probabilities),
      "patient/accuracy": float(np.mean((patient_probabilities >= threshold) == patient_labels.astype(bool))),
      "slice/auc": auc(validation.labels, probabilities),
  }
  metrics_document = {
      "task": task, "repeat": cell[0], "fold": cell[1], **metrics,
      "slice/probability_std": probability_std, "collapsed": collapsed,
      "num_test_patients": len(test_ids), "num_test_slices": int(probabilities.size),
      "epochs": int(progress["epochs_completed"]), "images_seen": int(progress["images_seen"]),
      "history": list(progress["history"])}
  if decision:
    metrics_document.update({"threshold": threshold, "threshold_rule": decision["threshold_rule"]})
    if decision["inner_validation"]:
      metrics_document["inner/patient_auc"] = decision["inner_validation"]["patient_auc"]
  io_utils.atomic_write_json(io_utils.join(folder, "metrics.json"), metrics_document)
  return metrics


def _write_run(config: TrainConfig, info: contracts.DatasetInfo, split: Mapping[str, Any], cell: contracts.Cell,
               progress: Mapping[str, Any], policy: str, init_seed: int,
               decisions: Mapping[str, Mapping[str, Any] | None]) -> None:
  """run.json, the commit of a cell, then the resume state goes. `decisions`: each task's `_inner_decisions`; a
  one-task cell's go to run.json's top level, a joint cell's under "by_task" (contracts.TASK_DECISIONS_FIELD)."""
  folder = contracts.cell_folder(config.output_dir, cell)
  run = {
      "task": config.task, "repeat": cell[0], "fold": cell[1],
      "split_hash": splits.split_hash(split), "dataset_hash": info.dataset_hash,
      "records_hash": info.content_hash, "seeds": {"split": config.seed, "sample": config.seed, "init": init_seed},
      "config": config.json_dict(), "preprocess": info.preprocess, "region": info.region,
      "augment": info.augment, "input_statistics": info.input_statistics,
      "aggregation": config.aggregation, "aggregation_top_k": config.top_k,
      "head": config.model.head, "context_slices": config.context_slices,
      "code_version": provenance.code_version(), "wall_time_s": float(progress["wall_time_s"]),
      "images_seen": int(progress["images_seen"]), "model_path": "model.keras", "precision": policy}
  if config.joint:
    # Each task's predictions are in contracts.task_folder(cell, task): derived, so not written here.
    run.update({"tasks": list(config.tasks), "consistency_weight": config.consistency_weight})
  if not config.joint and decisions[config.task]:
    run.update(decisions[config.task])
  if config.joint and any(decisions.values()):
    run[contracts.TASK_DECISIONS_FIELD] = {task: dict(decision) for task, decision in decisions.items()}
  io_utils.atomic_write_json(io_utils.join(folder, contracts.RUN_FILE), contracts.run_document(run))
  # The resume state is no longer needed once run.json marks the cell complete.
  checkpoint_folder = io_utils.join(folder, contracts.CHECKPOINT_FOLDER)
  if io_utils.exists(checkpoint_folder):
    tf.io.gfile.rmtree(checkpoint_folder)
  progress_path = io_utils.join(folder, contracts.PROGRESS_FILE)
  if io_utils.exists(progress_path):
    tf.io.gfile.remove(progress_path)
