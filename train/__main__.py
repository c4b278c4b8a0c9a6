"""Trains the repeats x folds grid of MobileNetV2 slice classifiers for one task: `python -m train`.

Examples:
  # The demo: phantom cohort -> records -> reduced grid (48 px, alpha 0.35, 8 folds x 1 repeat) -> evaluation.
  python -m train --task=p

  # The small-bowel demo: a 120-patient phantom cohort at 96 px, one joint grid for p and sb, 4 folds (13-15 min).
  python -m train --flagfile=configs/demo_sb.flags

  # The paper's protocol (224 px, ImageNet weights, 20 epochs, 8 folds x 24 repeats, mixed precision on GPU).
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=data/records --output_dir=runs/p

  # A few cells only, or one partition of a cluster job (SLURM arrays and Kubernetes Indexed Jobs set the partition
  # from SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX/JOB_COMPLETIONS when the flags are not given).
  python -m train --task=sb --records_dir=data/records --output_dir=runs/sb --cells=r0f0,r0f1
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=gs://b/records --output_dir=gs://b/runs/p \
      --num_partitions=16 --partition_index=3

  # The budget first: cells, images, bytes read, records on disk and hours at a throughput (measured ~20 s
  # here unless --plan_images_per_s is given); trains and writes nothing.
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=data/records --output_dir=runs/p --plan

  # Fill one GPU: 3 cells of this partition at once, as 3 processes.
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=data/records --output_dir=runs/p \
      --cells_per_gpu=3

  # Beyond the paper: 2.5D input (3 adjacent slices as the channels), then attention-MIL started from that grid.
  python -m train --task=sb --records_dir=D --output_dir=runs/sb25 --context_slices=1
  python -m train --task=sb --records_dir=D --output_dir=runs/sb25mil --context_slices=1 --head=attention_mil \
      --mil_init_from=runs/sb25

  # One backbone, a head per task: one grid for p and sb, exported as X/pdx_p and X/pdx_sb.
  python -m train --task=p,sb --records_dir=D --output_dir=runs/joint --export_dir=X

  # Where the disease is: one probability a PCI region (records with pci_0 ... pci_12; docs/regions.md).
  python -m train --task=regions --records_dir=D --output_dir=runs/regions --inner_fraction=0.2 \
      --threshold=inner_youden

Rerunning skips complete cells and resumes interrupted ones after their last committed epoch (with
--deterministic on CPU, byte-identical to an uninterrupted run, even after a kill). Exit status 1 with a
one-line message for bad input (records, splits, cells, output folder). Outputs: see pdx_tf/training/trainer.py and
CONTRACTS.md (R/splits.json, R/patients.csv, R/config.json, R/cells/<cell>/..., R/tensorboard).
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.

import dataclasses
import os
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging

from pdx_tf import cli, contracts
from pdx_tf.errors import PdxError
from pdx_tf.serving import export
from pdx_tf.training import aggregation, calibration, grid, heads, trainer

_TASK = flags.DEFINE_enum("task", None, [*contracts.TASKS, contracts.JOINT_TASK, contracts.PCI_TASK],
                          "p: any peritoneal dissemination; sb: small-bowel; p,sb: one backbone with a head per task"
                          f" (one grid for both); {contracts.PCI_TASK}: one probability a PCI region (needs records"
                          " with pci_0 ... pci_12; docs/regions.md).")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "The data pipeline's output D (with dataset.json). "
                                   "Unset, together with --output_dir: run the demo.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Run folder R for this task (local or gs://). Unset, "
                                  "together with --records_dir: the demo, under runs/demo/ of this folder.")
_DEMO_PATIENTS = flags.DEFINE_integer("demo_patients", None, "The demo only (no --records_dir): patients in its "
                                      "phantom cohort, a multiple of 4 (default 40; configs/demo_sb.flags: 120).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 8, "Patient-level folds.")
_NUM_REPEATS = flags.DEFINE_integer("num_repeats", 24, "Repeats: draws of training data and initialisations.")
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Passes over each cell's drawn training set.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Model input size; default: the records' (dataset.json). "
                                   "A different size is refused.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
_WEIGHTS = flags.DEFINE_string("weights", "none", "none, imagenet (from the Keras cache) or a no-top .h5 path.")
_BN_MOMENTUM = flags.DEFINE_float("bn_momentum", None, "BatchNorm momentum; unset: 0.9 from scratch, 0.999 "
                                  "pretrained (0.999 from scratch collapses to a constant prediction).")
_DROPOUT_RATE = flags.DEFINE_float("dropout_rate", 0.2, "Dropout rate before the output layer (0: none).")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_PRECISION = flags.DEFINE_enum("precision", "auto", list(trainer.PRECISIONS),
                               "auto: mixed_float16 when a GPU is visible, else float32.")
_JIT_COMPILE = flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, the pool draw and the initialisation (the records'"
                            " augmentation key is data_pipeline's --augment_seed, another seed).")
_REPARTITION = flags.DEFINE_bool("repartition", False, "A new patient partition each repeat (default: one "
                                 "partition; repeats differ in the pool draw and initialisation).")
_POOL_FRACTION = flags.DEFINE_float("pool_fraction", 0.1, "Share of every training slice's augmented copies "
                                    "drawn (keyed by seed and repeat) into a cell's training set.")
_IMAGES_PER_EPOCH = flags.DEFINE_integer("images_per_epoch", None, "Training images an epoch (rounded down to whole"
                                       " batches; default: the cell's drawn pool).")
_INCLUDE_ORIGINALS = flags.DEFINE_bool("include_originals", True, "Also train on the training patients' "
                                       "original slices.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 4096, "Training examples in the shuffle buffer (memory:"
                                      " about buffer x one image's bytes).")
_AGGREGATION = flags.DEFINE_enum("aggregation", aggregation.DEFAULT_AGGREGATION,
                                 [*aggregation.AGGREGATIONS, trainer.MIL_AGGREGATION],
                                 f"Slice-to-patient rule ({trainer.MIL_AGGREGATION}: --head=attention_mil's own, the"
                                 " default with that head).")
_CONTEXT_SLICES = flags.DEFINE_integer("context_slices", 0, "2.5D: N > 0 feeds 2N+1 adjacent slices of one window as"
                                       " the channels (0: the paper's input).")
_HEAD = flags.DEFINE_enum("head", heads.DEFAULT_HEAD, list(heads.names()), heads.flag_help())
_MIL_INIT_FROM = flags.DEFINE_string("mil_init_from", "", "--head=attention_mil starts each cell from this finished"
                                     " slice grid R's same cell (required with --weights=none).")
_MIL_MAX_SLICES = flags.DEFINE_integer("mil_max_slices", 0, "Slices in a training bag, evenly spaced (0: all).")
_MIL_BAGS_PER_BATCH = flags.DEFINE_integer("mil_bags_per_batch", 4, "Patients (bags) a MIL training batch.")
_ATTENTION_UNITS = flags.DEFINE_integer("attention_units", 128, "With --head=attention_mil: hidden units of the"
                                        " gated attention.")
_TOP_K = flags.DEFINE_integer("top_k", aggregation.DEFAULT_TOP_K, "Slices averaged by topk_mean.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "TF op determinism (same predictions on CPU).")
_VERIFY_HASHES = flags.DEFINE_bool("verify_hashes", False, "Check every shard's sha256 before training.")
_NUM_PARTITIONS = flags.DEFINE_integer("num_partitions", None, "Machines sharing the grid (default: from SLURM or "
                                   "Kubernetes Indexed Job variables, else 1).")
_PARTITION_INDEX = flags.DEFINE_integer("partition_index", None, "This machine's partition of the cells (cell i goes to i % num_partitions).")
_CELLS = flags.DEFINE_list("cells", [], "Only these cells, e.g. r0f0,r0f1 (repeat, fold; 0-based).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "After a complete grid, export it for TF Serving"
                                   " here (unset: no export).")
_PLAN = flags.DEFINE_bool("plan", False, "Print the budget (cells, images, bytes, disk, hours) and exit.")
_PLAN_IMAGES_PER_S = flags.DEFINE_float("plan_images_per_s", None, "Throughput for --plan (default: measured for"
                                        " ~20 s with the configured model on random data).")
_CELLS_PER_GPU = flags.DEFINE_integer("cells_per_gpu", 1, "Cells of this partition trained at once, as processes"
                                      " sharing one GPU (with TF_FORCE_GPU_ALLOW_GROWTH).")
_INNER_FRACTION = flags.DEFINE_float("inner_fraction", 0.0, "Share of each class of a cell's training patients held"
                                     " out as inner patients (threshold, calibration, early stopping); 0: none.")
_THRESHOLD = flags.DEFINE_string("threshold", "0.5", "The cells' operating threshold: a probability, or"
                                 " inner_youden (Youden-optimal on the inner patients; needs --inner_fraction).")
_CALIBRATION = flags.DEFINE_enum("calibration", "none", ["none", "platt", "isotonic"], "Calibration fitted on the"
                                 " inner patients' patient probabilities (needs --inner_fraction).")
_EARLY_STOPPING_PATIENCE = flags.DEFINE_integer("early_stopping_patience", 0, "Stop a cell after this many epochs"
                                                " without a lower inner loss, keeping the best epoch (0: off).")
_CONSISTENCY_WEIGHT = flags.DEFINE_float("consistency_weight", 1.0, "With --task=p,sb: weight of the loss term"
                                         " max(0, P(sb) - P(p))^2 (small-bowel dissemination implies peritoneal).")
_CONFORMAL_ALPHA = flags.DEFINE_float("conformal_alpha", 0.0, "Error rate of the conformal prediction sets (e.g. 0.1:"
                                      " each class covered 90 % of the time; 'uncertain: refer' otherwise), derived"
                                      " by evaluate and the export; 0: none. Without --inner_fraction it sets 0.2"
                                      " (each model's score scale is fitted on its inner patients). --alpha is"
                                      " MobileNetV2's width.")
_REGION_BANDS = flags.DEFINE_bool("region_bands", True, "With --task=regions: learn and score each PCI region only"
                                  " on the slices of its band along z (upper, middle or lower third of the abdomen,"
                                  " +-0.1; small-bowel regions 9-12 on every slice). --noregion_bands: every slice"
                                  " carries the patient's 13 labels. Other tasks ignore it.")
# The flags a --cells_per_gpu parent sets itself on its children.
_CHILD_OWNED = ("num_partitions", "partition_index", "cells_per_gpu", "export_dir", "plan", "plan_images_per_s")


def _partition() -> tuple[int, int]:
  if _NUM_PARTITIONS.value is not None or _PARTITION_INDEX.value is not None:
    return (_NUM_PARTITIONS.value or 1), (_PARTITION_INDEX.value or 0)
  return grid.partition_from_environment(os.environ) or (1, 0)


# Flags that name a TrainConfig (or ModelConfig) field: the demo and a records run build their config from them
# through one path, trainer.config_from_values.
_CONFIG_FLAGS = ("task", "records_dir", "output_dir", "num_folds", "num_repeats", "epochs", "image_size", "alpha",
                 "weights", "bn_momentum", "dropout_rate", "batch_size", "learning_rate", "precision",
                 "jit_compile", "seed", "repartition", "pool_fraction", "images_per_epoch", "include_originals",
                 "shuffle_buffer", "aggregation", "top_k", "deterministic", "verify_hashes", "cells",
                 "context_slices", "head", "attention_units", "mil_init_from", "mil_max_slices",
                 "mil_bags_per_batch", "inner_fraction", "threshold", "calibration", "early_stopping_patience",
                 "consistency_weight", "conformal_alpha", "region_bands")
# Flags of a run on records that the demo (one machine, its own folders) cannot honour.
_NOT_FOR_DEMO = ("num_partitions", "partition_index", "cells_per_gpu", "plan", "plan_images_per_s", "verify_hashes")


def _flag_values() -> tuple[dict, dict]:
  """(every config flag's value, the ones given on the command line)."""
  values = {name: flags.FLAGS[name].value for name in _CONFIG_FLAGS}
  given = {name: flags.FLAGS[name].value for name in (*_CONFIG_FLAGS, *_NOT_FOR_DEMO) if flags.FLAGS[name].present}
  values["threshold"] = _threshold()  # a probability or a rule's name
  if "threshold" in given:
    given["threshold"] = values["threshold"]
  if values["task"] != contracts.PCI_TASK:
    values["region_bands"] = False  # the regions task's setting; the default True means nothing elsewhere
  own_rule = heads.get(values["head"]).aggregation_name
  if own_rule and "aggregation" not in given:
    values["aggregation"] = own_rule  # the head's own; an explicit other rule is refused
  return values, given


def _config() -> trainer.TrainConfig:
  values, _ = _flag_values()
  if values["image_size"] is None:  # the records know their size
    values["image_size"] = contracts.records_image_size(values["records_dir"])
  num_partitions, partition_index = _partition()
  return trainer.config_from_values({**values, "num_partitions": num_partitions, "partition_index": partition_index})


def _threshold() -> float | str:
  rule, value = calibration.parse_threshold(_THRESHOLD.value)
  return value if rule == "fixed" else rule


def _run_demo() -> None:
  from pdx_tf import demo, presets  # pylint: disable=import-outside-toplevel

  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel

  num_patients = presets.DEMO_PATIENTS if _DEMO_PATIENTS.value is None else _DEMO_PATIENTS.value
  try:
    pipeline.check_demo_num_patients(num_patients)
  except ValueError as error:
    raise ValueError(f"--demo_patients: {error}") from None
  values, given = _flag_values()
  values = presets.apply(presets.TRAIN_PRESETS["demo"], values, given, refused=_NOT_FOR_DEMO,
                         why="they apply to a run on records: add --records_dir and --output_dir")
  config = trainer.config_from_values(values | {"records_dir": "(demo)", "output_dir": "(demo)"})
  overrides = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)
               if field.name not in ("task", "records_dir", "output_dir")}
  result = demo.run_demo(_TASK.value, num_patients=num_patients, **overrides)
  times = result["wall_time_s"]
  print(result["table"])
  print(f"\nrecords: {result['records_dir']}\nmodels and predictions: {result['output_dir']}/cells/"
        f"\nevaluation: {result['evaluation_dir']}\nTensorBoard: tensorboard --logdir {result['tensorboard_dir']}"
        f"\ntime: pipeline {times['pipeline']:.0f} s, training {times['training']:.0f} s,"
        f" evaluation {times['evaluation']:.0f} s")
  if _EXPORT_DIR.value:
    exported = export.export_if_complete(result["output_dir"], _TASK.value, config.num_repeats,
                                  config.num_folds, _EXPORT_DIR.value)
    for version_dir in exported:
      print(f"export: {version_dir}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _TASK.value is None:
    _fail(f"--task is required (p, sb, p,sb for one model with both heads, or {contracts.PCI_TASK})")
  try:
    if _RECORDS_DIR.value is None and _OUTPUT_DIR.value is None:
      _run_demo()
      return
    if _RECORDS_DIR.value is None or _OUTPUT_DIR.value is None:
      raise ValueError("--records_dir and --output_dir go together (neither runs the demo)")
    if _DEMO_PATIENTS.present:
      raise ValueError("--demo_patients sizes the demo's phantom cohort; a run on --records_dir trains the records'"
                       " patients: drop it")
    if _CELLS_PER_GPU.value < 1:
      raise ValueError(f"--cells_per_gpu must be at least 1, got {_CELLS_PER_GPU.value}")
    if _PLAN_IMAGES_PER_S.value is not None and not _PLAN_IMAGES_PER_S.value > 0:
      raise ValueError(f"--plan_images_per_s must be positive, got {_PLAN_IMAGES_PER_S.value}")
    config = _config()
  except PdxError as error:
    _fail(error)
  except ValueError as error:  # invalid flag values, caught by the config's validation
    _fail(error)
  try:
    if _PLAN.value:
      _print_plan(config)
      return
    if _CELLS_PER_GPU.value > 1:
      _run_packed(config, _CELLS_PER_GPU.value)
    else:
      result = trainer.run_grid(config)
      counts = {}
      for status in result["cells"].values():
        counts[status] = counts.get(status, 0) + 1
      logging.info("cells: %s", ", ".join(f"{count} {status}" for status, count in sorted(counts.items()))
                   or "none")
      print(f"runs: {result['output_dir']}\nTensorBoard: tensorboard --logdir {result['tensorboard_dir']}")
    if _EXPORT_DIR.value:
      exported = export.export_if_complete(config.output_dir, config.task, config.num_repeats, config.num_folds,
                                    _EXPORT_DIR.value)
      for version_dir in exported:
        print(f"export: {version_dir}")
  except PdxError as error:
    _fail(error)
  except ValueError as error:
    _fail(error)


def _print_plan(config: trainer.TrainConfig) -> None:
  if _PLAN_IMAGES_PER_S.value is not None:
    images_per_s, source = _PLAN_IMAGES_PER_S.value, "given by --plan_images_per_s"
  else:
    images_per_s = trainer.measure_images_per_s(config)
    source = "measured on this machine (~20 s, random in-memory data, no records input: an upper bound)"
  plan = trainer.plan_grid(config, images_per_s)
  gib = 1024**3
  print(f"cells: {plan['cells_partition']} in this partition, {plan['cells_all']} in all\n"
        f"images: {plan['images_partition']} in this partition, {plan['images_all']} in all"
        f" ({min(plan['images_per_cell'].values())}-{max(plan['images_per_cell'].values())} a cell)\n"
        f"bytes to read: {plan['bytes_partition']} in this partition ({plan['bytes_partition'] / gib:.2f} GiB),"
        f" {plan['bytes_all']} in all ({plan['bytes_all'] / gib:.2f} GiB)\n"
        f"records on disk: {plan['records_bytes']} bytes ({plan['records_bytes'] / gib:.2f} GiB)\n"
        f"throughput: {images_per_s:.1f} images/s, {source}\n"
        f"hours: {plan['hours_partition']:.2f} for this partition, {plan['hours_all']:.2f} for all cells on one such device")


def _child_arguments() -> list[str]:
  """This run's command-line flags, without the ones a --cells_per_gpu parent sets for its children."""
  owned = tuple(f"--{name}" for name in _CHILD_OWNED) + tuple(f"--no{name}" for name in _CHILD_OWNED)
  return [argument for argument in sys.argv[1:] if argument.split("=", 1)[0] not in owned]


def _run_packed(config: trainer.TrainConfig, per_gpu: int) -> None:
  """Trains this partition's cells as `per_gpu` processes sharing the GPU, then waits for all of them.

  Child i of partition s (of n) is partition s + n * i of n * per_gpu: cell j goes to it iff j % (n * per_gpu) == s + n*i,
  so the children split exactly this partition's cells (j % n == s) between them.
  """
  environment = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH="true")
  children = []
  for index in range(per_gpu):
    command = [sys.executable, "-m", "train", *_child_arguments(), f"--num_partitions={config.num_partitions * per_gpu}",
               f"--partition_index={config.partition_index + config.num_partitions * index}", "--cells_per_gpu=1"]
    children.append(subprocess.Popen(command, env=environment))  # pylint: disable=consider-using-with
  codes = [child.wait() for child in children]
  failed = [index for index, code in enumerate(codes) if code != 0]
  if failed:
    _fail(f"{len(failed)} of {per_gpu} --cells_per_gpu processes failed (exit {codes[failed[0]]}; see their"
          " messages above); rerun: complete cells are skipped")
  print(f"runs: {config.output_dir} ({per_gpu} processes, all finished)")


def _fail(message) -> None:
  cli.exit_with_error("train", message)


if __name__ == "__main__":
  app.run(main)
