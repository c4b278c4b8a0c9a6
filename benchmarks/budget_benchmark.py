"""Budget benchmark: how patient AUC moves with --images_per_epoch, on the phantom at CPU scale.

The evidence for configs/paper.flags' --images_per_epoch: train the demo preset (pdx_tf/presets.py
TRAIN_PRESETS["demo"]: 48 px, alpha 0.35 from scratch, 5 epochs, batch 64, pool fraction 0.25) on the demo
records with an epoch of --fractions of the drawn pool (1.0 = unset: the whole pool), on --folds of the 8 folds
of repeat 0 (the same patient partition for every setting), --deterministic, for each --seeds. Each run is
evaluated with `python -m evaluate --allow_partial` (pooled patient AUC over the trained folds' test patients,
patient-bootstrap 95 % CI), and timed. Runs one training process at a time.

The records: `python -m data_pipeline --output_dir=<records>` (no --manifest: the demo phantom cohort at the
demo preset). Pass them with --records_dir, or leave it unset to build them under --work_dir.

  PYTHONPATH=. python benchmarks/budget_benchmark.py --records_dir=/tmp/budget/records --work_dir=/tmp/budget
  PYTHONPATH=. python benchmarks/budget_benchmark.py --fractions=1,0.5,0.25 --folds=4 --seeds=0,1
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "demo records (default: built under --work_dir)")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "where runs go (default: a temp folder)")
_FRACTIONS = flags.DEFINE_list("fractions", ["1", "0.5", "0.25"], "images_per_epoch as shares of the mean pool")
_FOLDS = flags.DEFINE_integer("folds", 4, "folds of repeat 0 trained (of the preset's 8)")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "seeds (split, pool draw, initialisation)")
_TASK = flags.DEFINE_string("task", "p", "task")
_NUM_BOOTSTRAP = flags.DEFINE_integer("num_bootstrap", 1000, "bootstrap replicates of the CI")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command: list[str]) -> float:
  started = time.perf_counter()
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                        env=dict(os.environ, PYTHONPATH=REPO))
  if done.returncode != 0:
    raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
  return time.perf_counter() - started


def _preset_flags() -> list[str]:
  from pdx_tf import presets  # pylint: disable=import-outside-toplevel
  return [line for line in presets.flag_lines(presets.TRAIN_PRESETS["demo"]) if not line.startswith("--num_repeats")]


def pool_sizes(records_dir: str, seed: int, cells: list[tuple[int, int]]) -> list[int]:
  """The drawn pool of each cell at the demo preset (what an unset --images_per_epoch trains on)."""
  from pdx_tf import contracts, presets  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import input_pipeline, splits  # pylint: disable=import-outside-toplevel
  preset = presets.TRAIN_PRESETS["demo"]
  info = contracts.load_dataset_info(records_dir)
  split = splits.make_splits(info.labels(_TASK.value), task=_TASK.value, num_folds=preset["num_folds"],
                             num_repeats=1, seed=seed)
  return [input_pipeline.pool_size(info, splits.cell_patients(split, *cell)[0], sample_seed=seed, repeat=cell[0],
                                   pool_fraction=preset["pool_fraction"]) for cell in cells]


def _auc(summary: dict) -> dict:
  """Pooled patient AUC with its bootstrap 95 % CI, the per-cell mean and the slice-level per-cell mean."""
  entry = summary[_TASK.value]
  pooled = entry["pooled_ci95"]["auc"]
  return {"pooled_patient_auc": pooled["estimate"], "ci95": [pooled["low"], pooled["high"]],
          "per_cell_patient_auc_mean": entry["per_cell"]["auc"]["mean"],
          "per_cell_slice_auc_mean": entry["slice_level"]["per_cell"]["auc"]["mean"]}


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  del argv
  work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="budget-")
  records_dir = _RECORDS_DIR.value or os.path.join(work_dir, "records")
  if _RECORDS_DIR.value is None and not os.path.exists(os.path.join(records_dir, "dataset.json")):
    _run([sys.executable, "-m", "data_pipeline", f"--output_dir={records_dir}", "--noprogress"])
  cells = [(0, fold) for fold in range(_FOLDS.value)]
  cell_names = ",".join(f"r{repeat}f{fold}" for repeat, fold in cells)
  batch = 64
  rows = []
  for seed in [int(value) for value in _SEEDS.value]:
    pools = pool_sizes(records_dir, seed, cells)
    mean_pool = sum(pools) / len(pools)
    for fraction in [float(value) for value in _FRACTIONS.value]:
      budget = None if fraction >= 1 else int(fraction * mean_pool) // batch * batch
      name = f"seed{seed}-ipe{budget or 'pool'}"
      output_dir = os.path.join(work_dir, "runs", name)
      command = [sys.executable, "-m", "train", f"--task={_TASK.value}", f"--records_dir={records_dir}",
                 f"--output_dir={output_dir}", *_preset_flags(), "--num_repeats=1", f"--seed={seed}",
                 f"--cells={cell_names}", "--deterministic"]
      if budget is not None:
        command.append(f"--images_per_epoch={budget}")
      load_before = os.getloadavg()[0]
      train_s = _run(command)
      evaluation_dir = os.path.join(work_dir, "evaluation", name)
      _run([sys.executable, "-m", "evaluate", f"--runs_dir={output_dir}", f"--output_dir={evaluation_dir}",
            "--allow_partial", f"--tasks={_TASK.value}", f"--num_bootstrap={_NUM_BOOTSTRAP.value}"])
      with open(os.path.join(evaluation_dir, "summary.json"), encoding="utf-8") as handle:
        aucs = _auc(json.load(handle))
      row = {"seed": seed, "fraction": fraction, "images_per_epoch": budget or f"pool ({min(pools)}-{max(pools)})",
             "train_wall_s": round(train_s, 1), "load_1min_before": round(load_before, 2),
             "load_1min_after": round(os.getloadavg()[0], 2), "auc": aucs}
      rows.append(row)
      print(json.dumps(row), flush=True)
  figures = {"command": " ".join(sys.argv), "cells": cell_names, "preset": _preset_flags(), "rows": rows}
  print(json.dumps(figures, indent=1))
  print(f"raw output: {results_io.record_figures('budget_benchmark', figures)}")


if __name__ == "__main__":
  app.run(main)
