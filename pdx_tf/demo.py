"""The demo: phantom cohort -> records -> a reduced training grid -> evaluation, on a laptop CPU.

`run_demo("p")` builds (or reuses) the cached phantom cohort and its records (pdx_tf.pipeline), trains
DEMO_PRESET (64 px, alpha 0.35, from scratch, all 8 folds of one repeat), evaluates the grid
(pdx_tf.evaluation) and returns the paper-style table. Everything is cached: a second run skips the finished
cells and only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from pdx_tf import io_utils, training
from pdx_tf.model import ModelConfig

DEMO_ROOT = "runs/demo"
# The reduced protocol, sized for the 10-minute budget on a 2-core CPU (about 16 CPU-minutes in all: about 8
# minutes on an idle 2-core machine). Measured (benchmarks/README.md): task p patient AUC 0.69 mean per cell,
# 0.61 pooled, but driven by ascites and other non-nodule differences, not by the nodules: a from-scratch
# MobileNetV2 at 64 px does not learn the phantom's nodules from ~35 patients. The paper's protocol is
# configs/paper.flags.
DEMO_PRESET: dict[str, Any] = {
    "model": ModelConfig(image_size=64, alpha=0.35, weights="none"),
    "num_folds": 8,
    "num_repeats": 1,
    "epochs": 3,
    "batch_size": 16,
    "learning_rate": 1e-3,
    "pool_fraction": 0.25,
    "aggregation": "mean",
    "top_k": 3,
    "precision": "float32",
}


def demo_train_config(task: str, records_dir: str, output_dir: str, **overrides: Any) -> training.TrainConfig:
  """The demo's TrainConfig (DEMO_PRESET with `overrides`)."""
  return training.TrainConfig(task=task, records_dir=records_dir, output_dir=output_dir,
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
  from pdx_tf import pipeline  # pylint: disable=import-outside-toplevel

  times = {}
  started = time.time()
  records_dir = io_utils.join(root, "records")
  pipeline.run_demo_pipeline(records_dir, progress=progress)
  times["pipeline"] = time.time() - started

  started = time.time()
  config = demo_train_config(task, records_dir, io_utils.join(root, task), **overrides)
  grid_result = training.run_grid(config)
  times["training"] = time.time() - started

  started = time.time()
  evaluation_dir = io_utils.join(root, "evaluation", task)
  summary, table = _evaluate(config.output_dir, evaluation_dir, task)
  times["evaluation"] = time.time() - started
  return {"table": table, "summary": summary, "records_dir": records_dir, "output_dir": config.output_dir,
          "tensorboard_dir": grid_result["tensorboard_dir"], "evaluation_dir": evaluation_dir,
          "cells": grid_result["cells"], "config": dataclasses.asdict(config), "wall_time_s": times}


def _evaluate(runs_dir: str, evaluation_dir: str, task: str) -> tuple[Any, str | None]:
  try:
    from pdx_tf import evaluation  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None, None
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(
      runs_dir=runs_dir, output_dir=evaluation_dir, tasks=(task,), num_bootstrap=200))
  return summary, evaluation.format_paper_table(summary)
