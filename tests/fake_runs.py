"""Writes fake training outputs in the run-artifact contract that pdx_tf.evaluation reads.

The layout is exactly what the training stage produces (see pdx_tf/evaluation/runs.py):
  <root>/<task>/splits.json, <root>/<task>/patients.csv,
  <root>/<task>/cells/rRR_fFF/{run.json, patient_predictions.csv, slice_predictions.csv, metrics.json}
Predictions are keyed random numbers (numpy Generator from (seed, task, repeat, fold)) whose separation
shrinks with ascites and PCI, so the fake report shows the paper's subgroup pattern.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np

from pdx_tf import io_utils

ASCITES_LEVELS = ("none", "small", "large")
TASK_INDEX = {"p": 0, "sb": 1}

# (task, repeat, fold, patient_id, label) -> probability; overrides the random predictions.
ProbabilityFn = Callable[[str, int, int, str, int], float]


def make_patients(num_patients: int, seed: int = 0) -> list[dict[str, str]]:
  """A cohort table: labels, ascites (none/small/large), pci (0-39) and site (A/B), as strings."""
  rng = np.random.default_rng([seed, 1000])
  rows = []
  for index in range(num_patients):
    label_p = int(index % 2 == 0)  # exactly half positive, so every fold of a stratified split has both
    label_sb = int(label_p == 1 and index % 4 == 0)
    ascites = ASCITES_LEVELS[int(rng.integers(0, 3))] if label_p else ASCITES_LEVELS[int(rng.integers(0, 2))]
    pci = int(rng.integers(1, 40)) if label_p else 0
    rows.append({
        "patient_id": f"pt{index:03d}",
        "label_p": str(label_p),
        "label_sb": str(label_sb),
        "ascites": ascites,
        "pci": str(pci),
        "site": "A" if index % 3 else "B",
    })
  return rows


def make_splits(patient_ids: Sequence[str], task: str, num_repeats: int, num_folds: int, seed: int) -> dict:
  """A repeats x folds patient split from sorted ids and keyed permutations."""
  ids = sorted(patient_ids)
  repeats = []
  for repeat in range(num_repeats):
    order = np.random.default_rng([seed, repeat]).permutation(len(ids))
    folds = []
    for fold in range(num_folds):
      test = sorted(ids[i] for i in order[fold::num_folds])
      train = sorted(set(ids) - set(test))
      folds.append({"fold": fold, "train": train, "test": test})
    repeats.append({"repeat": repeat, "folds": folds})
  return {"seed": seed, "num_folds": num_folds, "task": task, "repeats": repeats, "schema_version": 1}


def _random_probability(rng: np.random.Generator, label: int, patient: dict[str, str]) -> float:
  # Less separation with more ascites and tumour burden (the paper's finding).
  separation = 2.0 - 0.8 * ASCITES_LEVELS.index(patient["ascites"]) - 0.03 * float(patient["pci"])
  logit = (1 if label else -1) * separation + rng.normal(0.0, 1.5)
  return float(np.round(1.0 / (1.0 + np.exp(-logit)), 6))


def cell_folder(root: str, task: str, repeat: int, fold: int) -> str:
  return os.path.join(root, task, "cells", f"r{repeat:02d}_f{fold:02d}")


def write_cell(root: str, task: str, repeat: int, fold: int, split_hash: str, test_ids: Sequence[str],
               patients: dict[str, dict[str, str]], seed: int = 0, status: str = "complete",
               probability_fn: ProbabilityFn | None = None, slices_per_patient: int = 4,
               folder: str | None = None) -> str:
  """Writes one cell's artifacts; returns its folder."""
  folder = folder or cell_folder(root, task, repeat, fold)
  rng = np.random.default_rng([seed, TASK_INDEX[task], repeat, fold])
  patient_rows, slice_rows = [], []
  for patient_id in test_ids:
    label = int(patients[patient_id][f"label_{task}"])
    if probability_fn is not None:
      probability = probability_fn(task, repeat, fold, patient_id, label)
    else:
      probability = _random_probability(rng, label, patients[patient_id])
    patient_rows.append((patient_id, label, probability))
    for slice_index in range(slices_per_patient):
      slice_probability = float(np.clip(probability + rng.normal(0.0, 0.15), 0.0, 1.0).round(6))
      slice_rows.append((patient_id, 10 + slice_index, label, slice_probability))
  io_utils.atomic_write_csv(os.path.join(folder, "patient_predictions.csv"),
                            ("patient_id", "label", "probability"), patient_rows)
  io_utils.atomic_write_csv(os.path.join(folder, "slice_predictions.csv"),
                            ("patient_id", "slice_index", "label", "probability"), slice_rows)
  io_utils.atomic_write_json(os.path.join(folder, "metrics.json"), {"note": "trainer metrics (informational)"})
  io_utils.atomic_write_json(os.path.join(folder, "run.json"), {
      "schema_version": 1,
      "task": task,
      "repeat": repeat,
      "fold": fold,
      "split_hash": split_hash,
      "dataset_hash": "0" * 64,
      "seeds": {"split": seed, "init": seed + repeat, "augment": seed + fold},
      "config": {"backbone": "mobilenet_v2", "fake": True},
      "aggregation": "mean",
      "code_version": "fake",
      "wall_time_s": 1.0,
      "images_seen": 100,
      "status": status,
  })
  return folder


def write_fake_runs(root: str, tasks: Sequence[str] = ("p", "sb"), num_repeats: int = 2, num_folds: int = 3,
                    num_patients: int = 24, seed: int = 0, probability_fn: ProbabilityFn | None = None,
                    skip_cells: Sequence[tuple[str, int, int]] = ()) -> dict[str, dict]:
  """Writes a full fake grid for each task under root/<task>; returns task -> its splits dict.

  Args:
    root: the parent folder (pass root or root/<task> as --runs_dir).
    tasks: tasks to write.
    num_repeats, num_folds, num_patients: grid and cohort size.
    seed: key for the cohort, splits and predictions.
    probability_fn: fixed predictions instead of random ones.
    skip_cells: (task, repeat, fold) cells not to write (a partial grid).
  """
  patient_rows = make_patients(num_patients, seed)
  patients = {row["patient_id"]: row for row in patient_rows}
  header = list(patient_rows[0].keys())
  result = {}
  for task in tasks:
    task_root = os.path.join(root, task)
    splits = make_splits(list(patients), task, num_repeats, num_folds, seed)
    io_utils.atomic_write_json(os.path.join(task_root, "splits.json"), splits)
    io_utils.atomic_write_csv(os.path.join(task_root, "patients.csv"), header,
                              ([row[column] for column in header] for row in patient_rows))
    split_hash = io_utils.sha256_json(splits)
    for repeat_entry in splits["repeats"]:
      for fold_entry in repeat_entry["folds"]:
        repeat, fold = repeat_entry["repeat"], fold_entry["fold"]
        if (task, repeat, fold) in skip_cells:
          continue
        write_cell(root, task, repeat, fold, split_hash, fold_entry["test"], patients, seed=seed,
                   probability_fn=probability_fn)
    result[task] = splits
  return result
