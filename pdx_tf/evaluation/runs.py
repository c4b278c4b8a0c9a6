"""Finds, reads and validates the training stage's run artifacts (the only input of evaluation).

Layout contract (produced by pdx_tf.training.trainer; files are found by walking, never by parsing folder names):
  <task_root>/splits.json    the repeats x folds patient split; its canonical-JSON SHA-256 is the split hash
  <task_root>/patients.csv   patient_id,label_p,label_sb,<covariates...>
  <any folder below task_root>/run.json                  one per cell; only status "complete" counts
                              /patient_predictions.csv   patient_id,label,probability
                              /slice_predictions.csv     patient_id,slice_index,label,probability
A joint grid (`--task=p,sb`, one model with a head per task) has one splits.json of task "p,sb" and each cell's
predictions in <cell>/p/ and <cell>/sb/ (contracts.task_folder); it is read as the two tasks p and sb, each cell's
run_info being that task's view of run.json (contracts.task_run_document: its own threshold and calibration).
Every problem raises RunsError with one line naming the file.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.errors import RunsError

from pdx_tf.contracts import (  # noqa: F401  (re-exported for readers of this module)
    COMPLETE_STATUS, PATIENT_PREDICTIONS_FILE, PATIENTS_FILE, RUN_FILE, RUN_SCHEMA_VERSION, SLICE_PREDICTIONS_FILE,
    SPLITS_FILE, TASKS, Cell, cell_name)
from pdx_tf import contracts

# Columns of patients.csv that are not covariates.
PATIENT_ID_COLUMN = "patient_id"
LABEL_COLUMNS = tuple(f"label_{task}" for task in TASKS)

@dataclasses.dataclass(frozen=True)
class CellPredictions:
  """One finished model's predictions on its held-out fold."""
  task: str
  repeat: int
  fold: int
  run_json_path: str
  run_info: Mapping[str, Any]
  patient_ids: tuple[str, ...]
  patient_labels: np.ndarray  # [patients] int 0/1
  patient_probabilities: np.ndarray  # [patients] float64
  slice_patient_ids: np.ndarray  # [slices] str
  slice_indices: np.ndarray  # [slices] int
  slice_labels: np.ndarray  # [slices] int 0/1
  slice_probabilities: np.ndarray  # [slices] float64

  @property
  def cell(self) -> Cell:
    return (self.repeat, self.fold)


@dataclasses.dataclass(frozen=True)
class TaskRuns:
  """Everything evaluation knows about one task: the split, the cohort table and the finished cells."""
  task: str
  task_root: str
  splits_path: str
  split_hash: str
  num_folds: int
  expected_cells: tuple[Cell, ...]
  test_patients: Mapping[Cell, tuple[str, ...]]
  patients: Mapping[str, Mapping[str, str]]  # patients.csv rows by patient_id
  covariate_columns: tuple[str, ...]
  cells: Mapping[Cell, CellPredictions]
  missing_cells: tuple[Cell, ...]

  @property
  def partial(self) -> bool:
    return bool(self.missing_cells)

  @property
  def repeats(self) -> tuple[int, ...]:
    return tuple(sorted({repeat for repeat, _ in self.expected_cells}))


def _fail(message: str) -> RunsError:
  return RunsError(" ".join(message.split()))  # always one line


def _find_files(runs_dir: str) -> tuple[list[str], list[str], int]:
  """(splits.json paths, run.json paths, number of files seen) below runs_dir."""
  if not tf.io.gfile.isdir(runs_dir):
    raise _fail(f"runs folder {runs_dir} does not exist or is not a folder; point --runs_dir at the training "
                "output (a task folder such as runs/p, or a parent holding several)")
  splits_paths, run_paths, file_count = [], [], 0
  for folder, _, files in tf.io.gfile.walk(runs_dir):
    for name in files:
      if io_utils.is_temp_path(name):
        continue  # leftovers of an interrupted atomic write are never artifacts
      file_count += 1
      if name == SPLITS_FILE:
        splits_paths.append(io_utils.join(folder, name))
      elif name == RUN_FILE:
        run_paths.append(io_utils.join(folder, name))
  return sorted(splits_paths), sorted(run_paths), file_count


def _read_json(path: str) -> Any:
  try:
    return io_utils.read_json(path)
  except ValueError as error:
    raise _fail(f"{path} is not valid JSON ({error}); re-create it with the training stage") from None


def _read_csv(path: str, required_columns: Sequence[str]) -> list[dict[str, str]]:
  if not tf.io.gfile.exists(path):
    raise _fail(f"{path} is missing; the training stage writes it next to run.json (re-run that cell)")
  rows = io_utils.read_csv(path)
  missing = [column for column in required_columns if rows and column not in rows[0]]
  if missing:
    raise _fail(f"{path} lacks the column(s) {', '.join(missing)}; expected {','.join(required_columns)}")
  return rows


def _parse_splits(path: str) -> tuple[dict[str, Any], tuple[Cell, ...], dict[Cell, tuple[str, ...]], int]:
  splits = _read_json(path)
  try:
    task = splits["task"]
    num_folds = int(splits["num_folds"])
    test_patients: dict[Cell, tuple[str, ...]] = {}
    for repeat_entry in splits["repeats"]:
      repeat = int(repeat_entry["repeat"])
      seen_in_repeat: dict[str, int] = {}
      for fold_entry in repeat_entry["folds"]:
        cell = (repeat, int(fold_entry["fold"]))
        if cell in test_patients:
          raise _fail(f"{path} lists repeat {cell[0]} fold {cell[1]} twice; regenerate the split")
        test_ids = tuple(str(patient_id) for patient_id in fold_entry["test"])
        for patient_id in test_ids:
          if patient_id in seen_in_repeat:
            raise _fail(f"{path}: patient {patient_id} is in the test set of folds {seen_in_repeat[patient_id]} "
                        f"and {cell[1]} of repeat {repeat}; regenerate the split")
          seen_in_repeat[patient_id] = cell[1]
        test_patients[cell] = test_ids
  except (KeyError, TypeError, ValueError) as error:
    if isinstance(error, RunsError):
      raise
    raise _fail(f"{path} does not follow the splits.json schema ({type(error).__name__}: {error}); "
                "regenerate it with the training stage") from None
  if task not in TASKS and task != contracts.JOINT_TASK:
    raise _fail(f"{path} has task {task!r}; expected one of {', '.join(TASKS)} or {contracts.JOINT_TASK}")
  if not test_patients:
    raise _fail(f"{path} lists no folds; regenerate the split")
  return splits, tuple(sorted(test_patients)), test_patients, num_folds


def _parse_patients(path: str) -> tuple[dict[str, dict[str, str]], tuple[str, ...]]:
  rows = _read_csv(path, (PATIENT_ID_COLUMN,) + LABEL_COLUMNS)
  patients: dict[str, dict[str, str]] = {}
  for line_number, row in enumerate(rows, start=2):
    patient_id = row[PATIENT_ID_COLUMN]
    if patient_id in patients:
      raise _fail(f"{path} line {line_number}: patient {patient_id} appears twice; keep one row per patient")
    for column in LABEL_COLUMNS:
      row[column] = str(_parse_label(row[column], path, f"{column} of patient {patient_id} (line {line_number})"))
    patients[patient_id] = row
  header = list(rows[0].keys()) if rows else []
  covariates = tuple(column for column in header if column not in (PATIENT_ID_COLUMN,) + LABEL_COLUMNS)
  return patients, covariates


def _parse_probability(text: str, path: str, where: str) -> float:
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not math.isfinite(value) or not 0.0 <= value <= 1.0:
    raise _fail(f"{path}: probability {text!r} for {where} is not a number in [0, 1]; "
                "the model produced invalid output, re-run that cell")
  return value


def _parse_label(text: str, path: str, where: str) -> int:
  # Accept "1" and "1.0" alike: writers differ in how they print integers stored as floats.
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if value not in (0.0, 1.0):
    raise _fail(f"{path}: label {text!r} for {where} is not 0 or 1")
  return int(value)


def _read_cell(run_path: str, run_info: Mapping[str, Any], task_runs_fields: Mapping[str, Any]) -> CellPredictions:
  task = task_runs_fields["task"]
  patients = task_runs_fields["patients"]
  cell = (int(run_info["repeat"]), int(run_info["fold"]))
  expected_ids = task_runs_fields["test_patients"][cell]
  expected_set = set(expected_ids)
  splits_path = task_runs_fields["splits_path"]
  folder = contracts.task_folder(os.path.dirname(run_path), task_runs_fields["grid_task"], task)

  patient_path = io_utils.join(folder, PATIENT_PREDICTIONS_FILE)
  patient_rows = _read_csv(patient_path, ("patient_id", "label", "probability"))
  patient_ids, labels, probabilities = [], [], []
  seen: set[str] = set()
  for row in patient_rows:
    patient_id = row["patient_id"]
    if patient_id not in patients:
      raise _fail(f"{patient_path}: patient {patient_id} is not in {PATIENTS_FILE}; "
                  "these predictions belong to another cohort")
    if patient_id not in expected_set:
      raise _fail(f"{patient_path}: patient {patient_id} is not in the test set of repeat {cell[0]} "
                  f"fold {cell[1]} in {splits_path}; the cell was run on another split")
    if patient_id in seen:
      raise _fail(f"{patient_path}: patient {patient_id} is predicted twice; keep one row per test patient")
    seen.add(patient_id)
    where = f"patient {patient_id}"
    label = _parse_label(row["label"], patient_path, where)
    expected_label = int(patients[patient_id][f"label_{task}"])
    if label != expected_label:
      raise _fail(f"{patient_path}: label {label} for patient {patient_id} disagrees with label_{task}="
                  f"{expected_label} in {PATIENTS_FILE}; re-run the cell on the current cohort table")
    patient_ids.append(patient_id)
    labels.append(label)
    probabilities.append(_parse_probability(row["probability"], patient_path, where))
  absent = [patient_id for patient_id in expected_ids if patient_id not in seen]
  if absent:
    shown = ", ".join(absent[:5]) + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
    raise _fail(f"{patient_path} has no prediction for test patient(s) {shown} of repeat {cell[0]} "
                f"fold {cell[1]}; re-run that cell")

  slice_path = io_utils.join(folder, SLICE_PREDICTIONS_FILE)
  slice_rows = _read_csv(slice_path, ("patient_id", "slice_index", "label", "probability"))
  slice_ids, slice_indices, slice_labels, slice_probabilities = [], [], [], []
  seen_slices: set[tuple[str, int]] = set()
  for row in slice_rows:
    patient_id = row["patient_id"]
    if patient_id not in expected_set:
      raise _fail(f"{slice_path}: patient {patient_id} is not in the test set of repeat {cell[0]} "
                  f"fold {cell[1]} in {splits_path}; the cell was run on another split")
    try:
      slice_index = int(row["slice_index"])
    except ValueError:
      raise _fail(f"{slice_path}: slice_index {row['slice_index']!r} of patient {patient_id} "
                  "is not an integer") from None
    if (patient_id, slice_index) in seen_slices:
      raise _fail(f"{slice_path}: slice {slice_index} of patient {patient_id} is predicted twice")
    seen_slices.add((patient_id, slice_index))
    where = f"slice {slice_index} of patient {patient_id}"
    slice_ids.append(patient_id)
    slice_indices.append(slice_index)
    slice_labels.append(_parse_label(row["label"], slice_path, where))
    slice_probabilities.append(_parse_probability(row["probability"], slice_path, where))

  return CellPredictions(
      task=task,
      repeat=cell[0],
      fold=cell[1],
      run_json_path=run_path,
      run_info=contracts.task_run_document(run_info, task, run_path),  # a joint cell: this task's threshold
      patient_ids=tuple(patient_ids),
      patient_labels=np.asarray(labels, dtype=np.int64),
      patient_probabilities=np.asarray(probabilities, dtype=np.float64),
      slice_patient_ids=np.asarray(slice_ids, dtype=str),
      slice_indices=np.asarray(slice_indices, dtype=np.int64),
      slice_labels=np.asarray(slice_labels, dtype=np.int64),
      slice_probabilities=np.asarray(slice_probabilities, dtype=np.float64),
  )


def _owning_root(path: str, roots: Iterable[str]) -> str | None:
  """The deepest task root that contains `path`."""
  candidates = [root for root in roots if path.startswith(root.rstrip("/") + "/")]
  return max(candidates, key=len) if candidates else None


def _complete_cells(task: str, runs: Sequence[tuple[str, Any]], fields: Mapping[str, Any]
                    ) -> dict[Cell, list[tuple[str, dict[str, Any]]]]:
  """The complete cells of one task's run.json files, checked against its split; every entry of a cell kept
  (a duplicate is the caller's error). Unfinished cells are left out: they count as missing.
  """
  complete: dict[Cell, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)
  for run_path, run_info in runs:
    if not isinstance(run_info, dict):
      raise _fail(f"{run_path} is not a JSON object; re-create it with the training stage")
    schema_version = run_info.get("schema_version")
    if schema_version != RUN_SCHEMA_VERSION:
      raise _fail(f"{run_path} has schema_version {schema_version!r}; this evaluation reads version "
                  f"{RUN_SCHEMA_VERSION} (use the matching pdx_tf version)")
    if run_info.get("status") != COMPLETE_STATUS:
      continue  # an unfinished or failed cell counts as missing
    if run_info.get("task") != fields["grid_task"]:
      raise _fail(f"{run_path} is for task {run_info.get('task')!r} but sits under the {fields['grid_task']} split "
                  f"{fields['splits_path']}; move it to its own task folder")
    if run_info.get("split_hash") != fields["split_hash"]:
      raise _fail(f"{run_path} was trained on split hash {str(run_info.get('split_hash'))[:12]}... but "
                  f"{fields['splits_path']} hashes to {fields['split_hash'][:12]}...; it belongs to another "
                  "split: delete it or re-run that cell")
    try:
      cell = (int(run_info["repeat"]), int(run_info["fold"]))
    except (KeyError, TypeError, ValueError):
      raise _fail(f"{run_path} lacks integer repeat and fold fields; re-create it with the training stage") \
          from None
    if cell not in fields["test_patients"]:
      raise _fail(f"{run_path} is repeat {cell[0]} fold {cell[1]}, which {fields['splits_path']} does not "
                  "list; it belongs to another split")
    complete[cell].append((run_path, run_info))
  return complete


def load_runs(runs_dir: str, tasks: Sequence[str] = (), allow_partial: bool = False) -> dict[str, TaskRuns]:
  """Reads and validates every task's run artifacts below `runs_dir`.

  Args:
    runs_dir: a task's training folder, or a parent holding several.
    tasks: the tasks to evaluate; empty means every task with a splits.json below runs_dir.
    allow_partial: evaluate the complete cells that exist instead of failing on missing ones.

  Returns:
    Task name -> TaskRuns, in the order of TASKS.

  Raises:
    RunsError: one line naming the file, for an empty folder, a missing/duplicate cell, a patient outside
      the split or predicted twice, an invalid probability or label, or a run from another split.
  """
  splits_paths, run_paths, file_count = _find_files(runs_dir)
  if file_count == 0:
    raise _fail(f"runs folder {runs_dir} is empty; train first or point --runs_dir at the training output")
  if not splits_paths:
    raise _fail(f"no {SPLITS_FILE} below {runs_dir}; point --runs_dir at the training output folder")

  roots: dict[str, dict[str, Any]] = {}
  by_task: dict[str, str] = {}
  for splits_path in splits_paths:
    splits, expected_cells, test_patients, num_folds = _parse_splits(splits_path)
    grid_task = splits["task"]
    for task in contracts.task_list(grid_task):  # a joint grid's split serves both of its tasks
      if task in by_task:
        raise _fail(f"two {SPLITS_FILE} for task {task} below {runs_dir}: {by_task[task]} and {splits_path}; "
                    "point --runs_dir at one training output per task")
      by_task[task] = splits_path
    root = os.path.dirname(splits_path)
    roots[root] = {
        "grid_task": grid_task, "splits_path": splits_path, "split_hash": io_utils.sha256_json(splits),
        "expected_cells": expected_cells, "test_patients": test_patients, "num_folds": num_folds,
    }

  wanted = tuple(tasks) if tasks else tuple(task for task in TASKS if task in by_task)
  for task in wanted:
    if task not in TASKS:
      raise _fail(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if task not in by_task:
      found = ", ".join(sorted(by_task)) or "none"
      raise _fail(f"no {SPLITS_FILE} for task {task} below {runs_dir} (found tasks: {found}); "
                  "train that task or drop it from --tasks")

  runs_by_root: dict[str, list[tuple[str, dict[str, Any]]]] = collections.defaultdict(list)
  for run_path in run_paths:
    root = _owning_root(run_path, roots)
    if root is None:
      raise _fail(f"{run_path} is not below any folder holding a {SPLITS_FILE}; move it into its task's "
                  "training folder or delete it")
    if set(contracts.task_list(roots[root]["grid_task"])) & set(wanted):
      runs_by_root[root].append((run_path, _read_json(run_path)))

  result: dict[str, TaskRuns] = {}
  for task in wanted:
    root = os.path.dirname(by_task[task])
    fields = {**roots[root], "task": task}
    patients, covariates = _parse_patients(io_utils.join(root, PATIENTS_FILE))
    fields["patients"] = patients
    complete = _complete_cells(task, runs_by_root[root], fields)
    duplicates = {cell: entries for cell, entries in complete.items() if len(entries) > 1}
    if duplicates:
      listed = "; ".join(f"{cell_name(cell)}: " + ", ".join(path for path, _ in entries)
                         for cell, entries in sorted(duplicates.items()))
      raise _fail(f"duplicate complete cells for task {task} (keep one run.json per cell): {listed}")
    missing = tuple(cell for cell in fields["expected_cells"] if cell not in complete)
    if missing and not allow_partial:
      shown = ", ".join(cell_name(cell) for cell in missing[:20])
      more = f" and {len(missing) - 20} more" if len(missing) > 20 else ""
      raise _fail(f"task {task}: {len(missing)} of {len(fields['expected_cells'])} cells have no complete "
                  f"run.json below {root}: {shown}{more}; finish them or pass --allow_partial")
    if not complete:
      raise _fail(f"task {task}: no complete cells below {root}; train first")

    # Test sets of a repeat are disjoint (checked in _parse_splits) and each cell holds exactly its fold's
    # test patients (checked in _read_cell), so no patient can be predicted twice within a repeat.
    cells = {cell: _read_cell(entries[0][0], entries[0][1], fields) for cell, entries in sorted(complete.items())}
    result[task] = TaskRuns(
        task=task,
        task_root=root,
        splits_path=fields["splits_path"],
        split_hash=fields["split_hash"],
        num_folds=fields["num_folds"],
        expected_cells=fields["expected_cells"],
        test_patients=fields["test_patients"],
        patients=patients,
        covariate_columns=covariates,
        cells=cells,
        missing_cells=missing,
    )
  return result

