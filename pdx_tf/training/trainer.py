"""The training stage's grid: the repeats x folds grid of MobileNetV2 slice classifiers for one task.

`run_grid(config)` checks the records and every selected cell, writes `R/config.json`, `R/records.json` (the
records' content hash: a grid never mixes cells trained on different records), `R/splits.json` and
`R/patients.csv`, then trains the cells of this partition one after another with
`cell_trainer.train_cell` (one cell: epoch-by-epoch training, atomic checkpoints, exact resume, artifacts).
Each cell is idempotent (see pdx_tf/training/grid.py): complete cells are skipped, interrupted ones resume
after their last committed epoch and give the same predictions as an uninterrupted run (cell_trainer.py).

`plan_grid(config, images_per_s)` is the budget before a run: cells, images, bytes read, records on disk and
hours at a given images/s, without training or writing anything.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pdx_tf import contracts, io_utils
from pdx_tf.contracts import CONFIG_FILE, PATIENTS_FILE, RECORDS_FILE, TENSORBOARD_FOLDER
from pdx_tf.data import preprocess
from pdx_tf.errors import RunsError
from pdx_tf.training import cell_trainer, grid, heads, input_pipeline, splits
from pdx_tf.training import regions, tensorboard
from pdx_tf.training.model import build_model, resolve_weights
# The grid's config lives in its own module, which cell_trainer imports too (no trainer <-> cell_trainer loop);
# re-exported here, where callers have always found it.
from pdx_tf.training.train_config import CONFORMAL_INNER_FRACTION, DERIVED_ONLY_FIELDS, MIL_AGGREGATION, MODEL_OPT_IN_DEFAULTS  # noqa: F401
from pdx_tf.training.train_config import OPT_IN_DEFAULTS, PER_MACHINE_FIELDS, PRECISIONS, TrainConfig  # noqa: F401
from pdx_tf.training.train_config import config_dict, config_from_values  # noqa: F401


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


# ----------------------------------------------------------------------------------------------- grid setup


def changed_settings(config: TrainConfig) -> list[str] | None:
  """The R/config.json fields an existing grid in config.output_dir has with other values; None if no grid."""
  path = io_utils.join(config.output_dir, CONFIG_FILE)
  if not io_utils.exists(path):
    return None
  existing, wanted = io_utils.read_json(path), config_dict(config.grid_config())
  # Per-machine fields are stored at their defaults; one no longer in TrainConfig is not a setting.
  keys = (set(existing) | set(wanted)) - (set(PER_MACHINE_FIELDS) - set(wanted)) - set(DERIVED_ONLY_FIELDS)
  # An opt-in field absent from either side is at its default (config_dict leaves defaults out).
  return sorted(key for key in keys
                if existing.get(key, OPT_IN_DEFAULTS.get(key)) != wanted.get(key, OPT_IN_DEFAULTS.get(key)))


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
  io_utils.atomic_write_json(path, config_dict(config.grid_config()))


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
  for cell in cells:
    train_ids, test_ids = splits.cell_patients(split, *cell)
    for task in ("p",) if config.regions else config.tasks:
      classes = {info.labels(task)[patient_id] for patient_id in train_ids}
      if len(classes) < 2:
        raise RunsError(f"cell {contracts.cell_name(cell)}: every training patient has task {task} label"
                        f" {classes.pop()}, so the model cannot learn; add patients of the other class or use"
                        " fewer --num_folds")
    if not test_ids:
      raise RunsError(f"cell {contracts.cell_name(cell)} has no test patients; use fewer --num_folds")
    if config.inner_fraction:
      # Raises a one-line RunsError when the inner or the fit patients would miss a class of a task.
      splits.cell_inner_split(info, config.task, train_ids, seed=config.seed, repeat=cell[0], fold=cell[1],
                              fraction=config.inner_fraction)


def _check_region_labels(config: TrainConfig, info: contracts.DatasetInfo) -> None:
  """Fails before any training when a regions grid's records carry no region labels, or none of one class."""
  if not config.regions:
    return
  if not info.has_pci_scores:
    raise RunsError(f"--task={contracts.PCI_TASK}: {info.records_dir}/dataset.json has no PCI region scores; add the"
                    " columns pci_0 ... pci_12 to the manifest and rebuild the records, or train --task=p / sb")
  labels = regions.patient_region_labels(info, sorted(info.patients))
  if not (labels == 1).any() or not (labels == 0).any():
    raise RunsError(f"--task={contracts.PCI_TASK}: every recorded region label in {info.records_dir} is"
                    f" {int(labels[labels >= 0][0]) if (labels >= 0).any() else 'missing'}; the model needs regions"
                    " with and without disease")


def _check_joint_labels(config: TrainConfig, info: contracts.DatasetInfo) -> None:
  """Fails before any training when a joint grid's records lack a label or contradict "sb implies p"."""
  if not config.joint:
    return
  for patient_id, entry in info.patients.items():
    values = {task: entry.get(f"label_{task}") for task in config.tasks}
    missing = [task for task, value in values.items() if value not in (0, 1)]
    if missing:
      raise RunsError(f"--task={config.task}: patient {patient_id} has no label_{missing[0]} in"
                      f" {info.records_dir}/dataset.json; rebuild the records from a manifest with both labels")
    if values["sb"] == 1 and values["p"] == 0:
      raise RunsError(f"--task={config.task}: patient {patient_id} has label_sb 1 but label_p 0; small-bowel"
                      " dissemination is peritoneal dissemination: fix the manifest (label_p 1) and rebuild")


def _check_model_inputs(config: TrainConfig, info: contracts.DatasetInfo,
                        cells: Sequence[contracts.Cell]) -> None:
  """Fails before any training for 2.5D or MIL settings the records or the init grid cannot serve."""
  if config.context_slices:
    # Where the grid config meets the records: the one context/window check of a run_grid.
    preprocess.check_context_windows(info.preprocess_config, config.context_slices)
    for patient_id, entry in info.patients.items():
      count = int(entry.get("num_slices", 0))
      if config.context_slices >= count:
        raise RunsError(f"--context_slices={config.context_slices} needs patients of more than"
                        f" {config.context_slices} slices; patient {patient_id} has {count}: lower --context_slices")
  if heads.get(config.model.head).needs_learned_features and config.mil_init_from:
    for cell in cells:
      folder = contracts.cell_folder(config.mil_init_from, cell)
      if not grid.is_complete(folder):
        raise RunsError(f"--mil_init_from={config.mil_init_from} has no complete cell {contracts.cell_name(cell)};"
                        " train that slice grid first (same task, folds, repeats and seed)")
      run = io_utils.read_json(io_utils.join(folder, contracts.RUN_FILE))
      slice_config = run.get("config", {})
      model = slice_config.get("model", {})
      mismatched = [name for name, mine in (("task", config.task), ("num_folds", config.num_folds),
                                            ("seed", config.seed), ("context_slices", config.context_slices))
                    if slice_config.get(name, 0 if name == "context_slices" else None) != mine]
      mismatched += [f"model.{name}" for name in ("image_size", "alpha")
                     if model.get(name) != getattr(config.model, name)]
      if model.get("head", heads.DEFAULT_HEAD) != heads.DEFAULT_HEAD:  # MIL starts from the slice head
        mismatched.append("model.head")
      if mismatched:
        raise RunsError(f"--mil_init_from={config.mil_init_from} was trained with other {', '.join(mismatched)};"
                        " its cells' test patients must match this grid's: use a slice grid of the same settings")


def run_grid(config: TrainConfig, *,
             cell_callbacks: Callable[[contracts.Cell], Sequence[keras.callbacks.Callback]] | None = None
             ) -> dict[str, Any]:
  """Trains this machine's cells of the grid (skipping complete ones, resuming interrupted ones).

  Args:
    config: the grid settings.
    cell_callbacks: extra Keras callbacks per cell (tests use one to interrupt a cell).

  Returns:
    {"output_dir", "tensorboard_dir", "cells": {name: "complete"|"skipped"|"interrupted"}}

  Raises:
    RecordsError, RunsError, PdxError: one line, before training, for bad records, splits or cells.
  """
  io_utils.check_writable(config.output_dir)
  resolve_weights(config.model)  # a missing ImageNet/weights file fails now, not after the first cell starts
  info = contracts.load_dataset_info(config.records_dir, expected_image_size=config.model.image_size,
                                          verify_hashes=config.verify_hashes)
  cells = config.selected_cells()
  if config.conformal_alpha:
    scale = (f"each cell's scores on its model's own scale, fitted on its inner patients (inner_fraction"
             f" {config.inner_fraction:g}"
             + (", set by --conformal_alpha)" if config.inner_fraction == CONFORMAL_INNER_FRACTION else ")")
             if config.inner_fraction else
             "the probabilities unscaled: no inner patients to fit each model's scale on (--inner_fraction)")
    logging.info("conformal_alpha %g: each cell's test patients get a conformal set calibrated on the other %d folds'"
                 " out-of-fold patients (cross-conformal), %s; evaluate and export derive the sets, run.json records"
                 " the alpha", config.conformal_alpha, config.num_folds - 1, scale)
  _check_joint_labels(config, info)
  _check_region_labels(config, info)
  split = splits.make_splits(splits.split_labels(info, config.task), task=config.task, num_folds=config.num_folds,
                             num_repeats=config.num_repeats, seed=config.seed, repartition=config.repartition)
  _check_cells(config, info, split, cells)
  _check_model_inputs(config, info, cells)
  _check_or_write_config(config)
  _check_or_write_records_hash(config, info)
  splits.write_or_verify_splits(config.output_dir, split)
  _write_patients(config, info)
  tensorboard_dir = io_utils.join(config.output_dir, TENSORBOARD_FOLDER)
  if config.partition_index == 0:
    tensorboard.write_experiment_config(tensorboard_dir, cell_trainer.hparams(config, (0, 0), "float32"))
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
      statuses[name] = cell_trainer.train_cell(config, info, split, cell, strategy=strategy, policy=policy,
                                  tensorboard_dir=tensorboard_dir, extra_callbacks=extra)
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)
  result = {"output_dir": config.output_dir, "tensorboard_dir": tensorboard_dir, "cells": statuses}
  return result


# ------------------------------------------------------------------------------------------------- the plan


def measure_images_per_s(config: TrainConfig, *, seconds: float = 20.0, max_steps: int = 50) -> float:
  """Training images/s of the configured model on THIS machine, from a few steps on random in-memory data.

  Compiles the model (precision, XLA as configured), runs one warm-up step, then times steps until `seconds`
  or `max_steps`. Measures compute only (no records input), so it is an upper bound for real training.
  """
  policy = resolve_precision(config.precision)
  previous_policy = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy(policy)
  try:
    with _strategy().scope():
      model = build_model(config.model)
      cell_trainer.compile_model(model, config)
    size = config.model.image_size
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (config.batch_size, size, size, config.model.input_channels)).astype(np.float32)
    labels = rng.integers(0, 2, (config.batch_size, heads.get(config.model.head).num_outputs
                                 if config.regions else len(config.tasks))).astype(np.float32)
    model.train_on_batch(images, labels)  # tracing and compilation: not timed
    steps, started = 0, time.perf_counter()
    while steps < max_steps and (steps == 0 or time.perf_counter() - started < seconds):
      model.train_on_batch(images, labels)
      steps += 1
    return steps * config.batch_size / (time.perf_counter() - started)
  finally:
    keras.mixed_precision.set_global_policy(previous_policy)


def plan_grid(config: TrainConfig, images_per_s: float) -> dict[str, Any]:
  """What the grid costs, without training or writing anything.

  Per cell: images = epochs * (images_per_epoch or the pool's size, rounded down to whole batches); bytes read =
  epochs * passes * input_pipeline.bytes_to_read, where passes = ceil(images an epoch / pool size) (an epoch
  larger than the pool goes over it again), and an epoch smaller than the pool opens only enough of its files
  (input_pipeline.epoch_shards; epoch 0's files stand for every epoch's). Records on disk: the sum of
  dataset.json's shard sizes.

  Args:
    config: the grid settings.
    images_per_s: the training throughput to convert images into hours.

  Returns:
    {"cells_partition", "cells_all", "images_partition", "images_all", "images_per_cell" {name: n}, "bytes_partition",
     "bytes_all", "records_bytes", "images_per_s", "hours_partition", "hours_all"}
  """
  if not images_per_s > 0:
    raise ValueError(f"images/s must be positive, got {images_per_s}")
  info = contracts.load_dataset_info(config.records_dir, expected_image_size=config.model.image_size)
  split = splits.make_splits(splits.split_labels(info, config.task), task=config.task, num_folds=config.num_folds,
                             num_repeats=config.num_repeats, seed=config.seed, repartition=config.repartition)
  chosen = (grid.parse_cells(config.cells, config.num_repeats, config.num_folds) if config.cells
            else grid.all_cells(config.num_repeats, config.num_folds))
  mine = set(config.selected_cells())
  images, bytes_read = {}, {}
  for cell in chosen:
    train_ids, _ = splits.cell_patients(split, *cell)
    train_ids, _ = splits.cell_inner_split(info, config.task, train_ids, seed=config.seed, repeat=cell[0],
                                           fold=cell[1], fraction=config.inner_fraction)  # what the model fits on
    keys = cell_trainer.pool_key(config, cell).pool_arguments()  # the pool training draws (epoch_dataset)
    pool = input_pipeline.pool_size(info, train_ids, **keys)
    per_epoch = config.images_per_epoch or pool
    per_epoch = per_epoch // config.batch_size * config.batch_size
    passes = max(1, -(-per_epoch // pool)) if pool else 1
    images[cell] = config.epochs * per_epoch
    bytes_read[cell] = config.epochs * passes * input_pipeline.bytes_to_read(
        info, train_ids, **keys, images_per_epoch=per_epoch if per_epoch < pool else None)
  records_bytes = sum(int(shard.get("num_bytes", 0)) for shard in info.document.get("shards", []))
  images_partition = sum(images[cell] for cell in chosen if cell in mine)
  images_all = sum(images.values())
  return {"cells_partition": len(mine), "cells_all": len(chosen), "images_partition": images_partition, "images_all": images_all,
          "images_per_cell": {contracts.cell_name(cell): images[cell] for cell in chosen},
          "bytes_partition": sum(bytes_read[cell] for cell in chosen if cell in mine),
          "bytes_all": sum(bytes_read.values()), "records_bytes": records_bytes, "images_per_s": images_per_s,
          "hours_partition": images_partition / images_per_s / 3600, "hours_all": images_all / images_per_s / 3600}
