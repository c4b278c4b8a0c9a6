"""Trains the repeats x folds grid of MobileNetV2 slice classifiers for one task: `python -m train`.

Examples:
  # The demo: phantom cohort -> records -> reduced grid (48 px, alpha 0.35, 8 folds x 1 repeat) -> evaluation.
  python -m train --task=p

  # The paper's protocol (224 px, ImageNet weights, 20 epochs, 8 folds x 24 repeats, mixed precision on GPU).
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=data/records --output_dir=runs/p

  # A few cells only, or one shard of a cluster job (SLURM arrays and Kubernetes Indexed Jobs set the shard
  # from SLURM_ARRAY_TASK_ID/COUNT or JOB_COMPLETION_INDEX/JOB_COMPLETIONS when the flags are not given).
  python -m train --task=sb --records_dir=data/records --output_dir=runs/sb --cells=r0f0,r0f1
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=gs://b/records --output_dir=gs://b/runs/p \
      --num_shards=16 --shard_index=3

Rerunning skips complete cells and resumes interrupted ones from their last epoch. Exit status 1 with a
one-line message for bad input (records, splits, cells, output folder). Outputs: see pdx_tf/training/trainer.py and
CONTRACTS.md (R/splits.json, R/patients.csv, R/config.json, R/cells/<cell>/..., R/tensorboard).
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.

import os

from absl import app
from absl import flags
from absl import logging

from pdx_tf import cli
from pdx_tf.errors import PdxError
from pdx_tf.training import aggregation, grid, trainer
from pdx_tf.training.model import ModelConfig

_TASK = flags.DEFINE_enum("task", None, ["p", "sb"], "p: any peritoneal dissemination; sb: small-bowel.")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "The data pipeline's output D (with dataset.json). "
                                   "Unset, together with --output_dir: run the demo.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Run folder R for this task (local or gs://).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 8, "Patient-level folds.")
_NUM_REPEATS = flags.DEFINE_integer("num_repeats", 24, "Repeats: draws of training data and initialisations.")
_EPOCHS = flags.DEFINE_integer("epochs", 20, "Passes over each cell's drawn training set.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model input size; must equal the records' image size.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier.")
_WEIGHTS = flags.DEFINE_string("weights", "none", "none, imagenet (from the Keras cache) or a no-top .h5 path.")
_BN_MOMENTUM = flags.DEFINE_float("bn_momentum", None, "BatchNorm momentum; unset: 0.9 from scratch, 0.999 "
                                  "pretrained (0.999 from scratch collapses to a constant prediction).")
_DROPOUT_RATE = flags.DEFINE_float("dropout_rate", 0.2, "Dropout before the output layer.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "Global batch size.")
_LEARNING_RATE = flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
_PRECISION = flags.DEFINE_enum("precision", "auto", list(trainer.PRECISIONS),
                               "auto: mixed_float16 when a GPU is visible, else float32.")
_JIT_COMPILE = flags.DEFINE_bool("jit_compile", False, "Compile the train step with XLA.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the split, the pool draw and the initialisation.")
_REPARTITION = flags.DEFINE_bool("repartition", False, "A new patient partition each repeat (default: one "
                                 "partition; repeats differ in the pool draw and initialisation).")
_POOL_FRACTION = flags.DEFINE_float("pool_fraction", 0.1, "Share of every training slice's augmented copies "
                                    "drawn (keyed by seed and repeat) into a cell's training set.")
_INCLUDE_ORIGINALS = flags.DEFINE_bool("include_originals", True, "Also train on the training patients' "
                                       "original slices.")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 4096, "Shuffle buffer, in examples.")
_AGGREGATION = flags.DEFINE_enum("aggregation", aggregation.DEFAULT_AGGREGATION, list(aggregation.AGGREGATIONS),
                                 "Slice-to-patient rule.")
_TOP_K = flags.DEFINE_integer("top_k", aggregation.DEFAULT_TOP_K, "Slices averaged by topk_mean.")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "TF op determinism (same predictions on CPU).")
_VERIFY_HASHES = flags.DEFINE_bool("verify_hashes", False, "Check every shard's sha256 before training.")
_NUM_SHARDS = flags.DEFINE_integer("num_shards", None, "Machines sharing the grid (default: from SLURM or "
                                   "Kubernetes Indexed Job variables, else 1).")
_SHARD_INDEX = flags.DEFINE_integer("shard_index", None, "This machine's shard (cell i goes to i % num_shards).")
_CELLS = flags.DEFINE_list("cells", [], "Only these cells, e.g. r0f0,r0f1 (repeat, fold; 0-based).")
_EXPORT_DIR = flags.DEFINE_string("export_dir", None, "After a complete grid, export it for TF Serving here.")


def _shard() -> tuple[int, int]:
  if _NUM_SHARDS.value is not None or _SHARD_INDEX.value is not None:
    return (_NUM_SHARDS.value or 1), (_SHARD_INDEX.value or 0)
  return grid.shard_from_environment(os.environ) or (1, 0)


def _config() -> trainer.TrainConfig:
  num_shards, shard_index = _shard()
  model = ModelConfig(image_size=_IMAGE_SIZE.value, alpha=_ALPHA.value, weights=_WEIGHTS.value,
                      dropout_rate=_DROPOUT_RATE.value, bn_momentum=_BN_MOMENTUM.value)
  return trainer.TrainConfig(
      task=_TASK.value, records_dir=_RECORDS_DIR.value, output_dir=_OUTPUT_DIR.value, model=model,
      num_folds=_NUM_FOLDS.value, num_repeats=_NUM_REPEATS.value, epochs=_EPOCHS.value,
      batch_size=_BATCH_SIZE.value, learning_rate=_LEARNING_RATE.value, precision=_PRECISION.value,
      jit_compile=_JIT_COMPILE.value, seed=_SEED.value, repartition=_REPARTITION.value,
      pool_fraction=_POOL_FRACTION.value, include_originals=_INCLUDE_ORIGINALS.value,
      shuffle_buffer=_SHUFFLE_BUFFER.value, aggregation=_AGGREGATION.value, top_k=_TOP_K.value,
      deterministic=_DETERMINISTIC.value, verify_hashes=_VERIFY_HASHES.value, num_shards=num_shards,
      shard_index=shard_index, cells=tuple(_CELLS.value), export_dir=_EXPORT_DIR.value or "")


def _demo_overrides() -> dict:
  """Flags given explicitly on a demo run override the demo preset (model flags rebuild its ModelConfig)."""
  from pdx_tf import demo  # pylint: disable=import-outside-toplevel

  simple = {"num_folds": _NUM_FOLDS, "num_repeats": _NUM_REPEATS, "epochs": _EPOCHS, "batch_size": _BATCH_SIZE,
            "learning_rate": _LEARNING_RATE, "precision": _PRECISION, "jit_compile": _JIT_COMPILE, "seed": _SEED,
            "pool_fraction": _POOL_FRACTION, "aggregation": _AGGREGATION, "top_k": _TOP_K,
            "deterministic": _DETERMINISTIC, "cells": _CELLS}
  overrides = {name: (tuple(holder.value) if name == "cells" else holder.value)
               for name, holder in simple.items() if flags.FLAGS[holder.name].present}
  model_flags = {"alpha": _ALPHA, "weights": _WEIGHTS, "bn_momentum": _BN_MOMENTUM, "dropout_rate": _DROPOUT_RATE}
  changed = {name: holder.value for name, holder in model_flags.items() if flags.FLAGS[holder.name].present}
  if changed:
    import dataclasses  # pylint: disable=import-outside-toplevel
    overrides["model"] = dataclasses.replace(demo.DEMO_PRESET["model"], **changed)
  return overrides


def _run_demo() -> None:
  from pdx_tf import demo  # pylint: disable=import-outside-toplevel

  result = demo.run_demo(_TASK.value, **_demo_overrides())
  times = result["wall_time_s"]
  print(result["table"] or "(pdx_tf.evaluation is not available: no table; the runs are complete)")
  print(f"\nrecords: {result['records_dir']}\nmodels and predictions: {result['output_dir']}/cells/"
        f"\nevaluation: {result['evaluation_dir']}\nTensorBoard: tensorboard --logdir {result['tensorboard_dir']}"
        f"\ntime: pipeline {times['pipeline']:.0f} s, training {times['training']:.0f} s,"
        f" evaluation {times['evaluation']:.0f} s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _TASK.value is None:
    _fail("--task is required (p or sb)")
  try:
    if _RECORDS_DIR.value is None and _OUTPUT_DIR.value is None:
      _run_demo()
      return
    if _RECORDS_DIR.value is None or _OUTPUT_DIR.value is None:
      raise ValueError("--records_dir and --output_dir go together (neither runs the demo)")
    config = _config()
  except PdxError as error:
    _fail(error)
  except ValueError as error:  # invalid flag values, caught by the config's validation
    _fail(error)
  try:
    result = trainer.run_grid(config)
  except PdxError as error:
    _fail(error)
  counts = {}
  for status in result["cells"].values():
    counts[status] = counts.get(status, 0) + 1
  logging.info("cells: %s", ", ".join(f"{count} {status}" for status, count in sorted(counts.items())) or "none")
  print(f"runs: {result['output_dir']}\nTensorBoard: tensorboard --logdir {result['tensorboard_dir']}")
  if result["export"]:
    print(f"export: {result['export']}")


def _fail(message) -> None:
  cli.exit_with_error("train", message)


if __name__ == "__main__":
  app.run(main)
