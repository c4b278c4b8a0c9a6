"""Compares the paper's slice model with 2.5D input, attention-MIL, both, and one backbone for both tasks, on the
demo phantom (issue 13).

  python benchmarks/model_variants.py                                     # the full comparison
  python benchmarks/model_variants.py --tasks=sb --seeds=0,1,2 --num_folds=4 --epochs=3   # a smaller one

Every variant runs at ONE compute budget: the demo preset (pdx_tf/presets.py, the demo row: 48 px, alpha 0.35, from
scratch, batch 64) with the same --epochs and --images_per_epoch, so each cell sees the same number of slice
images (MIL: bags of the same total slice count, input_pipeline.mil_train_dataset). The MIL variants start from
the finished grid of their slice variant (--mil_init_from: baseline -> MIL, 2.5D -> 2.5D+MIL), so their wall
time is reported alone and with that grid's. Per (task, variant, seed): one grid of --num_folds folds x 1 repeat;
per (task, variant): the pooled out-of-fold patient AUC of each seed, its mean, and a percentile bootstrap 95 %
CI over patients (pdx_tf.evaluation.grid_statistics.bootstrap_weights + metrics.weighted_metrics) of the AUC of
the seeds' mean patient probability; plus the wall time. The "joint" variant (`--task=p,sb`: one backbone, a head
per task) trains ONE grid per seed for both tasks (<root>/joint/s<seed>/); its wall time is that grid's, which
covers p and sb together.

Cost (2 shared CPU cores): a demo cell takes about 50 s (benchmarks/README.md: 8 cells in ~7 min), a MIL cell
about as long, so the full comparison (2 tasks x 4 variants x 3 seeds x 8 folds = 192 cells) is about 2.7 hours;
`--tasks=sb --num_folds=4` is about 40 min. Outputs: <root>/<task>/<variant>/s<seed>/ (the grids) and
<root>/model_variants.json.
"""

from __future__ import annotations

import json
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from pdx_tf import contracts, demo, io_utils, presets  # pylint: disable=wrong-import-position
from pdx_tf.evaluation import grid_statistics, metrics  # pylint: disable=wrong-import-position
from pdx_tf.training import trainer  # pylint: disable=wrong-import-position

_ROOT = flags.DEFINE_string("root", "runs/model_variants", "Where the grids and the summary go.")
_TASKS = flags.DEFINE_list("tasks", ["p", "sb"], "Tasks.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (split, pool draw, initialisation).")
_VARIANTS = flags.DEFINE_list("variants", ["baseline", "2.5d", "mil", "2.5d+mil", "joint"], "Variants to run.")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 8, "Folds (one repeat).")
_EPOCHS = flags.DEFINE_integer("epochs", 5, "Epochs of every variant (the demo's 5).")
_IMAGES_PER_EPOCH = flags.DEFINE_integer("images_per_epoch", 2048, "Slice images an epoch, every variant.")
_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 2000, "Bootstrap replicates over patients.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "Input size of every variant (default: the demo preset's);"
                                   " the demo records are built at this size (runs/demo/records-<size>px).")

# variant -> (context_slices, head, the slice variant a MIL variant starts from)
VARIANTS = {"baseline": (0, "slice", None), "2.5d": (1, "slice", None), "mil": (0, "attention_mil", "baseline"),
            "2.5d+mil": (1, "attention_mil", "2.5d"), "joint": (0, "slice", None)}
# The joint grid's wall time by seed: trained once (in the first task's loop), it serves both tasks.
_JOINT_WALL: dict[int, float] = {}


def _grid(task: str, variant: str, seed: int, records_dir: str) -> tuple[str, float]:
  context, head, start_from = VARIANTS[variant]
  if variant == "joint":
    output_dir = io_utils.join(_ROOT.value, "joint", f"s{seed}")
    if seed not in _JOINT_WALL:
      joint_model = demo.demo_train_config(contracts.JOINT_TASK, records_dir, output_dir).model
      config = demo.demo_train_config(contracts.JOINT_TASK, records_dir, output_dir, seed=seed,
                                      model=dataclasses.replace(joint_model, image_size=_image_size()),
                                      num_folds=_NUM_FOLDS.value, epochs=_EPOCHS.value,
                                      images_per_epoch=_IMAGES_PER_EPOCH.value)
      started = time.time()
      trainer.run_grid(config)
      _JOINT_WALL[seed] = time.time() - started
    return output_dir, _JOINT_WALL[seed]
  output_dir = io_utils.join(_ROOT.value, task, variant, f"s{seed}")
  preset_model = demo.demo_train_config(task, records_dir, output_dir).model
  model = dataclasses.replace(preset_model, input_channels=3 if context == 0 else 2 * context + 1, head=head,
                              image_size=_image_size())
  extra = {}
  if head == "attention_mil":
    extra = {"aggregation": trainer.MIL_AGGREGATION,
             "mil_init_from": io_utils.join(_ROOT.value, task, start_from, f"s{seed}")}
  config = demo.demo_train_config(task, records_dir, output_dir, model=model, context_slices=context, seed=seed,
                                  num_folds=_NUM_FOLDS.value, epochs=_EPOCHS.value,
                                  images_per_epoch=_IMAGES_PER_EPOCH.value, **extra)
  started = time.time()
  trainer.run_grid(config)
  return output_dir, time.time() - started


def _image_size() -> int:
  return _IMAGE_SIZE.value or presets.TRAIN_PRESETS["demo"]["image_size"]


def _patient_probabilities(output_dir: str, task: str) -> dict[str, tuple[int, float]]:
  grid_task = io_utils.read_json(io_utils.join(output_dir, "config.json"))["task"]
  result = {}
  for name in sorted(os.listdir(io_utils.join(output_dir, "cells"))):
    folder = contracts.task_folder(io_utils.join(output_dir, "cells", name), grid_task, task)
    rows = io_utils.read_csv(io_utils.join(folder, "patient_predictions.csv"))
    for row in rows:
      result[row["patient_id"]] = (int(row["label"]), float(row["probability"]))
  return result


def _pooled_auc(labels: np.ndarray, probabilities: np.ndarray) -> float:
  return float(metrics.binary_metrics(labels, probabilities)["auc"])


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  del argv
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel

  records_dir = demo.records_folder(demo.DEMO_ROOT, _image_size())
  pipeline.run_demo_pipeline(records_dir, progress=False, image_size=_image_size())
  budget = {"epochs": _EPOCHS.value, "images_per_epoch": _IMAGES_PER_EPOCH.value, "num_folds": _NUM_FOLDS.value,
            "image_size": _image_size()}
  summary_path = io_utils.join(_ROOT.value, "model_variants.json")
  # Runs of other variants under the same root and budget are kept, so the table can be built in parts.
  summary = io_utils.read_json(summary_path) if io_utils.exists(summary_path) else {}
  # Summaries written before the size was a flag were at the demo preset's size.
  if summary and {"image_size": presets.TRAIN_PRESETS["demo"]["image_size"], **summary.get("budget", {})} != budget:
    summary = {}
  if not summary:
    summary = {"budget": budget, "commands": [], "results": {}}
  summary["commands"].append(" ".join(sys.argv))
  order = [variant for variant in VARIANTS if variant in _VARIANTS.value]
  for task in _TASKS.value:
    walls: dict[str, list[float]] = {}
    for variant in order:
      per_seed, wall = [], []
      for seed in (int(value) for value in _SEEDS.value):
        if VARIANTS[variant][2] and VARIANTS[variant][2] not in walls:
          raise ValueError(f"variant {variant} starts from {VARIANTS[variant][2]}: list it in --variants first")
        output_dir, seconds = _grid(task, variant, seed, records_dir)
        per_seed.append(_patient_probabilities(output_dir, task))
        wall.append(seconds)
      walls[variant] = wall
      ids = sorted(per_seed[0])
      labels = np.asarray([per_seed[0][patient][0] for patient in ids])
      seed_aucs = [_pooled_auc(labels, np.asarray([run[patient][1] for patient in ids])) for run in per_seed]
      mean_probability = np.mean([[run[patient][1] for patient in ids] for run in per_seed], axis=0)
      weights = grid_statistics.bootstrap_weights(len(ids), _BOOTSTRAP.value, 0, task)
      replicates = metrics.weighted_metrics(labels, mean_probability, weights)["auc"]
      estimate = _pooled_auc(labels, mean_probability)
      start_from = VARIANTS[variant][2]
      summary["results"][f"{task}/{variant}"] = {
          "pooled_auc_per_seed": seed_aucs, "pooled_auc_mean_over_seeds": float(np.mean(seed_aucs)),
          "pooled_auc_of_seed_mean": estimate,
          "ci95": grid_statistics.percentile_interval(estimate, np.asarray(replicates)),
          "wall_s_per_grid": float(np.mean(wall)),
          "wall_s_per_grid_with_init": float(np.mean(wall) + (np.mean(walls[start_from]) if start_from else 0.0)),
          "num_patients": len(ids), "num_positive": int(labels.sum())}
      print(task, variant, json.dumps(summary["results"][f"{task}/{variant}"]), flush=True)
      io_utils.atomic_write_json(summary_path, summary)
  print(f"raw output: {results_io.record_figures('model_variants', summary)}")


if __name__ == "__main__":
  app.run(main)
