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

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pdx_tf import configs, conformal, contracts, io_utils
from pdx_tf.contracts import CONFIG_FILE, PATIENTS_FILE, RECORDS_FILE, TENSORBOARD_FOLDER
from pdx_tf.data import preprocess
from pdx_tf.errors import RunsError
from pdx_tf.training import calibration as calibration_lib
from pdx_tf.training import aggregation as aggregation_lib, cell_trainer, grid, heads, input_pipeline, splits
from pdx_tf.training import regions, tensorboard
from pdx_tf.training.model import build_model, ModelConfig, resolve_weights

# The patient score of --head=attention_mil: its own attention pooling, not a fixed rule (heads.py).
MIL_AGGREGATION = heads.ATTENTION_MIL.aggregation_name
PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
# {"records_hash": contracts.DatasetInfo.content_hash, "dataset_hash": of the first run}: one grid, one
# dataset.
# Fields that differ between the machines of one grid; R/config.json stores them at their defaults.
# "export_dir" was one until the export hook moved into the binary; grids from then still list it.
PER_MACHINE_FIELDS = ("records_dir", "num_partitions", "partition_index", "cells", "export_dir", "verify_hashes")
# Opt-in fields left out of config.json / run.json at these defaults (TrainConfig's docstring).
OPT_IN_DEFAULTS = {"inner_fraction": 0.0, "threshold": 0.5, "calibration": "none", "early_stopping_patience": 0,
                   "consistency_weight": 1.0, "conformal_alpha": 0.0}
# Fields that change what evaluation and export derive from a grid, not the grid: an existing grid accepts a new
# value (its config.json keeps the first; each run.json records its own).
DERIVED_ONLY_FIELDS = ("conformal_alpha",)
# The same for the model's fields (config.json's "model").
MODEL_OPT_IN_DEFAULTS = {"joint_heads": False}


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a training grid (written to R/config.json and every run.json).

  Attributes:
    task: "p" (peritoneal dissemination), "sb" (small-bowel dissemination), "p,sb" (contracts.JOINT_TASK: one
      backbone with a head per task, `model.joint_heads`; the split is stratified on both labels) or "regions"
      (contracts.PCI_TASK: one probability a PCI region, `model.head` "regions", pdx_tf/training/regions.py; the
      split is stratified on both labels; thresholds are per region, no calibration, no 2.5D yet).
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
    images_per_epoch: training images an epoch (None: the drawn pool's size; a multiple of batch_size is used).
    include_originals: also train on the training patients' original slices.
    shuffle_buffer: examples in the shuffle buffer (of serialized records, before decoding).
    aggregation: slice-to-patient rule (aggregation_lib.AGGREGATIONS).
    top_k: slices averaged by `topk_mean`.
    deterministic: enable TF op determinism (reproducible on CPU; slower on GPU).
    verify_hashes: check every shard's sha256 against dataset.json before training.
    num_partitions: machines sharing the grid; this one trains cells with index % num_partitions == partition_index.
    partition_index: this machine's partition.
    cells: names like "r0f3" to train only those cells (empty: all cells of the partition).
    context_slices: N > 0 feeds 2N+1 adjacent slices of one window as the channels (2.5D; input_pipeline's
      docstring); `model.input_channels` must be `preprocess.model_channels(N)`. 0: the paper's input.
    mil_init_from: with a head that needs learned features (attention_mil, heads.py), a finished slice grid R
      whose same cell's model.keras starts the MIL model (backbone and output layer; model.copy_slice_weights).
    mil_max_slices: a training bag holds at most this many of a patient's slices, evenly spaced (0: all).
      Held-out and served patients always use every slice.
    mil_bags_per_batch: bags (patients) a batch in MIL training; `batch_size` stays the slice head's.
    inner_fraction: share of each class of a cell's training patients held out as inner patients (splits.py,
      `inner_split`); the model fits on the rest. 0: no inner validation (the paper's protocol).
    threshold: the cells' operating threshold: a probability, or "inner_youden" (Youden-optimal on the inner
      patients' patient probabilities; needs inner_fraction). A joint grid fits one per task, from that task's head.
    calibration: "none", "platt" or "isotonic", fitted on the inner patients' patient probabilities (per task for
      a joint grid).
    early_stopping_patience: stop after this many epochs without a lower inner loss and keep the best epoch's
      weights (0: off; needs inner_fraction). A joint grid's inner loss is model.JointLoss on the inner slices.
    consistency_weight: with task "p,sb", the weight of the loss term that penalises P(sb) > P(p)
      (model.JointLoss).
    conformal_alpha: error rate of the conformal prediction sets (pdx_tf.conformal) that `evaluate` and the export
      derive from this grid (0: none). Training itself needs nothing for them: each cell's test patients are
      calibrated on the other folds' out-of-fold patients, so no inner split is set; recorded in run.json's config.

  The four inner-validation fields, consistency_weight and model.joint_heads are written to config.json and
  run.json only when they differ from their defaults (`config_dict`), so a default grid's files are
  byte-identical to those of code without them.
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
  images_per_epoch: int | None = None
  include_originals: bool = True
  shuffle_buffer: int = 4096
  aggregation: str = aggregation_lib.DEFAULT_AGGREGATION
  top_k: int = aggregation_lib.DEFAULT_TOP_K
  deterministic: bool = False
  verify_hashes: bool = False
  num_partitions: int = 1
  partition_index: int = 0
  cells: tuple[str, ...] = ()
  context_slices: int = 0
  mil_init_from: str = ""
  mil_max_slices: int = 0
  mil_bags_per_batch: int = 4
  inner_fraction: float = 0.0
  threshold: float | str = 0.5
  calibration: str = "none"
  early_stopping_patience: int = 0
  consistency_weight: float = 1.0
  conformal_alpha: float = 0.0

  def __post_init__(self):
    contracts.check_training_task(self.task)
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
    if self.images_per_epoch is not None and self.images_per_epoch < self.batch_size:
      raise ValueError(f"images_per_epoch must be at least batch_size ({self.batch_size}), got"
                       f" {self.images_per_epoch}; unset it to use the drawn pool's size")
    if self.pool_fraction == 0.0 and not self.include_originals:
      raise ValueError("pool_fraction 0 without originals leaves nothing to train on")
    head = heads.check_task(self.model.head, self.task)
    if head.own_patient_score:
      if self.aggregation != head.aggregation_name:
        raise ValueError(f"--head={head.name} makes the patient score itself ({head.aggregation_name}); --aggregation="
                         f"{self.aggregation} does not apply: use --aggregation={head.aggregation_name} (or leave it"
                         " unset)")
    else:
      aggregation_lib.check_aggregation(self.aggregation, self.top_k)
    if self.context_slices < 0:
      raise ValueError(f"context_slices must be at least 0, got {self.context_slices}")
    if self.model.input_channels != preprocess.model_channels(self.context_slices):
      raise ValueError(f"--context_slices={self.context_slices} needs a model of"
                       f" {preprocess.model_channels(self.context_slices)} input channels, got"
                       f" {self.model.input_channels}")
    if self.mil_max_slices < 0 or self.mil_bags_per_batch < 1:
      raise ValueError(f"mil_max_slices must be >= 0 and mil_bags_per_batch >= 1, got {self.mil_max_slices} and"
                       f" {self.mil_bags_per_batch}")
    if head.needs_learned_features and not self.mil_init_from and self.model.weights == "none":
      raise ValueError(f"--head={head.name} needs learned features to start from: give --mil_init_from=<R of a"
                       " finished slice grid of the same settings> (or pretrained --weights)")
    grid.partition_cells([], self.num_partitions, self.partition_index)  # validates the pair
    grid.parse_cells(self.cells, self.num_repeats, self.num_folds)  # out-of-range cells fail here
    self._check_inner_validation()
    self._check_joint()
    if self.regions:
      if self.context_slices:
        raise ValueError(f"--task={contracts.PCI_TASK} reads each record's own region labels (mirrored in flipped"
                         " copies); 2.5D stacks are warped at read time and would need them mirrored too: use"
                         " --context_slices=0")
      if self.calibration != "none":
        raise ValueError(f"--task={contracts.PCI_TASK} fits a threshold a region, not a calibration; drop"
                         f" --calibration={self.calibration}")
    if self.conformal_alpha != 0.0:
      conformal.check_alpha(self.conformal_alpha)  # 0 (off) or an error rate in (0, 1)

  @property
  def tasks(self) -> tuple[str, ...]:
    """The tasks this grid learns: (task,), or ("p", "sb") for the joint task."""
    return contracts.task_list(self.task)

  @property
  def regions(self) -> bool:
    """Whether this grid learns the PCI regions (contracts.PCI_TASK)."""
    return self.task == contracts.PCI_TASK

  @property
  def joint(self) -> bool:
    return self.task == contracts.JOINT_TASK

  def _check_joint(self) -> None:
    if self.model.joint_heads != self.joint:
      raise ValueError(f"--task={self.task} needs a model with{'' if self.joint else 'out'} joint heads"
                       " (config_from_values sets it from the task)")
    if not self.consistency_weight >= 0:
      raise ValueError(f"consistency_weight must be at least 0, got {self.consistency_weight}")
    if not self.joint:
      return
    # The joint grid trains the slice head (single slices or 2.5D stacks); MIL's patient bags keep one task a
    # grid for now. Inner validation works per task (threshold and calibration in run.json's "by_task").
    if not heads.get(self.model.head).joint_capable:
      raise ValueError(f"--task={contracts.JOINT_TASK} trains the slice head for now; drop --head=attention_mil,"
                       " or train --task=p and --task=sb as two grids")

  def _check_inner_validation(self) -> None:
    if not 0.0 <= self.inner_fraction < 1.0:
      raise ValueError(f"inner_fraction must be in [0, 1), got {self.inner_fraction}")
    rule, _ = calibration_lib.parse_threshold(self.threshold)
    if self.calibration not in calibration_lib.CALIBRATIONS:
      raise ValueError(f"calibration must be one of {', '.join(calibration_lib.CALIBRATIONS)}, got"
                       f" {self.calibration!r}")
    if self.early_stopping_patience < 0:
      raise ValueError(f"early_stopping_patience must be at least 0 (0: off), got {self.early_stopping_patience}")
    if self.inner_fraction == 0.0:
      needs = [flag for flag, wanted in (("--threshold=inner_youden", rule == "inner_youden"),
                                         (f"--calibration={self.calibration}", self.calibration != "none"),
                                         ("--early_stopping_patience", self.early_stopping_patience > 0)) if wanted]
      if needs:
        raise ValueError(f"{needs[0]} is fitted on inner patients, and there are none; set --inner_fraction"
                         " (e.g. 0.2) or drop it")

  @property
  def threshold_rule(self) -> str:
    """"fixed" or "inner_youden"."""
    return calibration_lib.parse_threshold(self.threshold)[0]

  def selected_cells(self) -> list[contracts.Cell]:
    """This machine's cells: the `cells` subset (or the whole grid), then this partition's share of it."""
    chosen = (grid.parse_cells(self.cells, self.num_repeats, self.num_folds) if self.cells
              else grid.all_cells(self.num_repeats, self.num_folds))
    return grid.partition_cells(chosen, self.num_partitions, self.partition_index)

  def grid_config(self) -> "TrainConfig":
    """This config with the per-machine fields at their defaults: identical on every machine of a grid."""
    return dataclasses.replace(self, records_dir="(per machine)", num_partitions=1, partition_index=0, cells=(),
                               verify_hashes=False)

  def json_dict(self) -> dict[str, Any]:
    """config_dict(self): the JSON form for config.json and run.json. A method so that cell_trainer, which
    trainer imports, writes run.json without importing trainer back (no import loop)."""
    return config_dict(self)


def config_dict(config: TrainConfig) -> dict[str, Any]:
  """The JSON form of `config` for config.json and run.json: opt-in fields at their defaults are left out."""
  values = configs.to_dict(config)
  for fields, defaults in ((values, OPT_IN_DEFAULTS), (values.get("model", {}), MODEL_OPT_IN_DEFAULTS)):
    for name, default in defaults.items():
      if name in fields and fields[name] == default and type(fields[name]) is type(default):
        del fields[name]
  return values


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


def config_from_values(values: Mapping[str, Any]) -> TrainConfig:
  """A TrainConfig from flag-named values (the binary's flags, or a row of pdx_tf.presets.TRAIN_PRESETS).

  The model's flags (ModelConfig's fields: image_size, alpha, weights, dropout_rate, bn_momentum) build
  `model`; every other name is the TrainConfig field of the same name. The one path from flags to a config,
  shared by `python -m train` and the demo.

  Raises:
    ValueError: a name that is neither, or a value the config refuses.
  """
  fields = {field.name for field in dataclasses.fields(TrainConfig)} - {"model"}
  model_fields = {field.name for field in dataclasses.fields(ModelConfig)}
  unknown = sorted(set(values) - fields - model_fields)
  if unknown:
    raise ValueError(f"not training settings: {', '.join(unknown)}")
  values = dict(values)
  # The model's input channels follow from the 2.5D context (2N+1 slices, or 3 window channels for N = 0).
  values.setdefault("input_channels", preprocess.model_channels(values.get("context_slices", 0)))
  values.setdefault("joint_heads", values.get("task") == contracts.JOINT_TASK)
  if values.get("task") in (contracts.PCI_TASK,) and values.get("head", heads.DEFAULT_HEAD) == heads.DEFAULT_HEAD:
    values["head"] = heads.default_head(values["task"])  # the task's own head unless another is asked for
  model = ModelConfig(**{name: value for name, value in values.items() if name in model_fields})
  return TrainConfig(model=model, **{name: tuple(value) if name == "cells" else value
                                     for name, value in values.items() if name in fields})


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
    logging.info("conformal_alpha %g: each cell's test patients get a conformal set calibrated on the other %d folds'"
                 " out-of-fold patients (cross-conformal; no inner split needed, inner_fraction stays %g); evaluate"
                 " and export derive the sets, run.json records the alpha", config.conformal_alpha,
                 config.num_folds - 1, config.inner_fraction)
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
