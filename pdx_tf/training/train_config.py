"""The training grid's config: TrainConfig, its JSON form and the one path from flag values to it.

Its own module so that the grid runner (trainer.py) and the cell runner (cell_trainer.py) both import it and
neither imports the other back: trainer -> cell_trainer -> train_config, no loop. `trainer.TrainConfig` and the
helpers below stay importable from trainer.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pdx_tf import configs, conformal, contracts
from pdx_tf.data import preprocess
from pdx_tf.training import aggregation as aggregation_lib, calibration as calibration_lib, grid, heads
from pdx_tf.training.model import ModelConfig

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
                   "consistency_weight": 1.0, "conformal_alpha": 0.0, "region_bands": False}
# Fields that change what evaluation and export derive from a grid, not the grid: an existing grid accepts a new
# value (its config.json keeps the first; each run.json records its own).
DERIVED_ONLY_FIELDS = ("conformal_alpha",)
# The inner fraction `--conformal_alpha` sets when none is given (config_from_values).
CONFORMAL_INNER_FRACTION = 0.2
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
      derive from this grid (0: none). Each cell's test patients are calibrated on the other folds' out-of-fold
      patients, each cell's scores on its model's own scale fitted on its inner patients: through
      `config_from_values` (the binary, the demo) a conformal_alpha without an inner_fraction sets
      CONFORMAL_INNER_FRACTION; recorded in run.json's config.
    region_bands: with task "regions", learn and aggregate each region's column only on the slices of its band
      along z (pdx_tf/training/region_bands.py: a slice far from a region cannot show it); False: every slice
      carries the patient's 13 labels (the paper's weak supervision, applied per region).

  The four inner-validation fields, consistency_weight, region_bands and model.joint_heads are written to
  config.json and run.json only when they differ from their defaults (`config_dict`), so a default grid's files are
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
  region_bands: bool = False

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
      if self.region_bands and self.model.head != heads.REGIONS.name:
        raise ValueError("region_bands needs the slice-level regions head")
      if self.calibration != "none":
        raise ValueError(f"--task={contracts.PCI_TASK} fits a threshold a region, not a calibration; drop"
                         f" --calibration={self.calibration}")
    if self.region_bands and not self.regions:
      raise ValueError(f"region_bands applies to --task={contracts.PCI_TASK} only")
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
    """config_dict(self): the JSON form for config.json and run.json."""
    return config_dict(self)


def config_dict(config: TrainConfig) -> dict[str, Any]:
  """The JSON form of `config` for config.json and run.json: opt-in fields at their defaults are left out."""
  values = configs.to_dict(config)
  for fields, defaults in ((values, OPT_IN_DEFAULTS), (values.get("model", {}), MODEL_OPT_IN_DEFAULTS)):
    for name, default in defaults.items():
      if name in fields and fields[name] == default and type(fields[name]) is type(default):
        del fields[name]
  return values


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
  if values.get("conformal_alpha") and not values.get("inner_fraction"):
    # The conformal sets put each cell's scores on its model's own scale, fitted on its inner patients
    # (pdx_tf/conformal.py, ScoreScale): `--conformal_alpha` alone sets them aside. trainer.run_grid says so.
    values["inner_fraction"] = CONFORMAL_INNER_FRACTION
  # The model's input channels follow from the 2.5D context (2N+1 slices, or 3 window channels for N = 0).
  values.setdefault("input_channels", preprocess.model_channels(values.get("context_slices", 0)))
  values.setdefault("joint_heads", values.get("task") == contracts.JOINT_TASK)
  if values.get("task") in (contracts.PCI_TASK,) and values.get("head", heads.DEFAULT_HEAD) == heads.DEFAULT_HEAD:
    values["head"] = heads.default_head(values["task"])  # the task's own head unless another is asked for
  model = ModelConfig(**{name: value for name, value in values.items() if name in model_fields})
  return TrainConfig(model=model, **{name: tuple(value) if name == "cells" else value
                                     for name, value in values.items() if name in fields})
