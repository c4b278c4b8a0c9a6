"""The demo: phantom cohort -> records -> a reduced training grid -> evaluation, on a laptop CPU.

`run_demo("p")` builds (or reuses) the cached phantom cohort and its records (pdx_tf.data.pipeline), trains
DEMO_PRESET (48 px, alpha 0.35, from scratch, all 8 folds of one repeat), evaluates the grid
(pdx_tf.evaluation) and returns the paper-style table. Everything is cached: a second run skips the finished
cells and only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import tensorflow as tf
from absl import logging

from pdx_tf import contracts, io_utils
from pdx_tf.training import trainer
from pdx_tf.training.model import ModelConfig

DEMO_ROOT = "runs/demo"
# The reduced protocol, sized for the 10-minute budget on a 2-core CPU: about 7-8 minutes end to end on an idle
# 2-core machine, the phantom cohort included (benchmarks/README.md). 48 px keeps the omental cake (3-6 px) and
# runs ~1.5x faster than 64 px; batch 64 is ~2x faster per image than 16 on a CPU, and 2e-3 makes up for the
# fewer steps. Measured: task p patient AUC 0.81 mean per cell, 0.82 pooled (0.875 and 0.74 in another run: the
# demo is not deterministic), and the models use the disease: filling the lesion pixels with fat lowers the
# lesion slices' out-of-fold probability from 0.68 to 0.37 (benchmarks/localisation_benchmark.py).
# The paper's protocol is configs/paper.flags.
DEMO_PRESET: dict[str, Any] = {
    "model": ModelConfig(image_size=48, alpha=0.35, weights="none"),
    "num_folds": 8,
    "num_repeats": 1,
    "epochs": 5,
    "batch_size": 64,
    "learning_rate": 2e-3,
    "pool_fraction": 0.25,
    "aggregation": "mean",
    "top_k": 3,
    "precision": "float32",
}


def demo_train_config(task: str, records_dir: str, output_dir: str, **overrides: Any) -> trainer.TrainConfig:
  """The demo's TrainConfig (DEMO_PRESET with `overrides`)."""
  return trainer.TrainConfig(task=task, records_dir=records_dir, output_dir=output_dir,
                              **{**DEMO_PRESET, **overrides})


def run_demo(task: str = "p", root: str = DEMO_ROOT, *, progress: bool = True, **overrides: Any) -> dict[str, Any]:
  """Runs the whole demo for one task.

  Args:
    task: "p" or "sb".
    root: folder for records (root/records), runs (root/<task>) and evaluation (root/evaluation).
    progress: show pipeline progress.
    **overrides: TrainConfig fields to change from DEMO_PRESET.

  Returns:
    {"table": paper-style text or None, "summary", "records_dir", "output_dir", "tensorboard_dir",
     "evaluation_dir", "cells", "wall_time_s": {"pipeline", "training", "evaluation"}}.
  """
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel

  times = {}
  started = time.time()
  records_dir = io_utils.join(root, "records")
  pipeline.run_demo_pipeline(records_dir, progress=progress)
  times["pipeline"] = time.time() - started

  started = time.time()
  config = demo_train_config(task, records_dir, io_utils.join(root, task), **overrides)
  _set_aside_stale_run(config)
  grid_result = trainer.run_grid(config)
  times["training"] = time.time() - started

  started = time.time()
  evaluation_dir = io_utils.join(root, "evaluation", task)
  summary, table = _evaluate(config.output_dir, evaluation_dir, task)
  times["evaluation"] = time.time() - started
  return {"table": table, "summary": summary, "records_dir": records_dir, "output_dir": config.output_dir,
          "tensorboard_dir": grid_result["tensorboard_dir"], "evaluation_dir": evaluation_dir,
          "cells": grid_result["cells"], "config": dataclasses.asdict(config), "wall_time_s": times}


def _set_aside_stale_run(config: trainer.TrainConfig) -> None:
  """Renames a demo run folder made by another preset or from other records to <folder>.stale-<time>.

  The demo owns its folder, and a newer version of the demo (or of the phantom) must not stop at "holds a grid
  trained with other settings"; nothing is deleted.
  """
  folder = config.output_dir
  changed = trainer.changed_settings(config)
  if changed is None:
    return
  records_hash = contracts.load_dataset_info(config.records_dir).content_hash
  same_settings, same_records = not changed, trainer.trained_records_hash(folder) == records_hash
  if same_settings and same_records:
    return
  stale = f"{folder}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
  logging.warning("%s was trained by an older demo (other %s); moved it to %s and training afresh", folder,
                  "settings" if not same_settings else "records", stale)
  tf.io.gfile.rename(folder, stale)


def _evaluate(runs_dir: str, evaluation_dir: str, task: str) -> tuple[Any, str | None]:
  from pdx_tf import evaluation  # pylint: disable=import-outside-toplevel
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(
      runs_dir=runs_dir, output_dir=evaluation_dir, tasks=(task,), num_bootstrap=200))
  return summary, evaluation.format_paper_table(summary)
