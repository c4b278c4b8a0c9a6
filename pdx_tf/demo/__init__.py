"""The demo: phantom cohort -> records -> a reduced training grid -> evaluation, on a laptop CPU.

`run_demo("p")` builds (or reuses) the cached phantom cohort and its records (pdx_tf.data.pipeline), trains
the preset table's demo row (48 px, alpha 0.35, from scratch, all 8 folds of one repeat), evaluates the grid
(pdx_tf.evaluation) and returns the paper-style table. Everything is cached: a second run skips the finished
cells and only re-evaluates.

`run_demo("p,sb", num_patients=120, ...)` with the preset table's demo_sb row is the small-bowel demo
(`python -m train --flagfile=configs/demo_sb.flags`): a cohort size other than the demo's 40 works in its own
folder, runs/demo-<N>patients, so the two demos never set each other's records or runs aside.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import tensorflow as tf
from absl import logging

from pdx_tf import contracts, io_utils, presets
from pdx_tf.training import trainer

DEMO_ROOT = "runs/demo"
# The demo preset is pdx_tf.presets' "demo" row: about 8 minutes end to end on an idle 2-core machine, the
# phantom cohort included (benchmarks/README.md, with what its models learn). The paper's is configs/paper.flags.


def demo_train_config(task: str, records_dir: str, output_dir: str, **overrides: Any) -> trainer.TrainConfig:
  """The demo's TrainConfig: the preset table's demo row, then `overrides` (TrainConfig fields)."""
  config = trainer.config_from_values({"task": task, "records_dir": records_dir, "output_dir": output_dir,
                                       **presets.TRAIN_PRESETS["demo"]})
  return dataclasses.replace(config, **overrides)


def demo_root(num_patients: int = presets.DEMO_PATIENTS) -> str:
  """The demo's folder for a phantom cohort of `num_patients`: runs/demo for the demo's 40, else
  runs/demo-<N>patients."""
  return DEMO_ROOT if num_patients == presets.DEMO_PATIENTS else f"{DEMO_ROOT}-{num_patients}patients"


def records_folder(root: str, image_size: int) -> str:
  """The demo records at `image_size`: root/records at the preset's size, root/records-<size>px otherwise (so a
  demo at another size keeps the default records)."""
  default = presets.PIPELINE_PRESETS["demo"]["image_size"]
  return io_utils.join(root, "records" if image_size == default else f"records-{image_size}px")


def run_demo(task: str = "p", root: str | None = None, *, progress: bool = True,
             num_patients: int = presets.DEMO_PATIENTS, **overrides: Any) -> dict[str, Any]:
  """Runs the whole demo for one task (or both, on one backbone).

  Args:
    task: "p", "sb" or "p,sb" (the joint grid; its runs and evaluation go to root/joint and
      root/evaluation/joint).
    root: folder for records (root/records), runs (root/<task>) and evaluation (root/evaluation); default
      `demo_root(num_patients)`.
    progress: show pipeline progress.
    num_patients: the phantom cohort's size, a positive multiple of 4 (default the demo's 40; the demo_sb
      preset's 120).
    **overrides: TrainConfig fields to change from the demo preset (a `model` also sets the records' image size).

  Returns:
    {"table": paper-style text or None, "summary", "records_dir", "output_dir", "tensorboard_dir",
     "evaluation_dir", "cells", "wall_time_s": {"pipeline", "training", "evaluation"}}.
  """
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel

  pipeline.check_demo_num_patients(num_patients)  # before any work
  root = demo_root(num_patients) if root is None else root
  image_size = overrides["model"].image_size if "model" in overrides else presets.TRAIN_PRESETS["demo"]["image_size"]
  records_dir = records_folder(root, image_size)
  folder = "joint" if task == contracts.JOINT_TASK else task
  config = demo_train_config(task, records_dir, io_utils.join(root, folder), **overrides)
  times = {}
  started = time.time()
  pipeline.run_demo_pipeline(records_dir, progress=progress, image_size=image_size, num_patients=num_patients)
  times["pipeline"] = time.time() - started

  started = time.time()
  _set_aside_stale_run(config)
  grid_result = trainer.run_grid(config)
  times["training"] = time.time() - started

  started = time.time()
  evaluation_dir = io_utils.join(root, "evaluation", folder)
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
      runs_dir=runs_dir, output_dir=evaluation_dir, tasks=contracts.task_list(task), num_bootstrap=200))
  return summary, evaluation.format_paper_table(summary)
