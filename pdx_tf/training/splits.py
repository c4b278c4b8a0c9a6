"""Patient-level cross-validation splits: data, built once, written to `R/splits.json`, reused by every cell.

A split is a pure function of the sorted patient IDs, their task labels, the number of folds, the number of
repeats and the seed:
- Each class is shuffled on its own with `numpy.random.default_rng([seed, partition_key, class])` and dealt
  round-robin onto the folds, the dealing of class 1 continuing where class 0 stopped. So every fold's count of
  each class differs by at most 1 from every other fold's, and fold sizes differ by at most 1.
- A joint grid (`--task=p,sb`) has one split for both heads, stratified on the pair of labels: its classes are
  the strata 0 (no dissemination), 1 (peritoneal, not small-bowel) and 3 (both; `split_labels`), dealt the same
  way in that order.
- By default the partition is the same in every repeat (`partition_key` 0): the paper's 24 repeats are 24 draws
  of training data from the augmented pool with new initialisation, over one fixed patient partition. With
  `repartition=True`, repeat r uses `partition_key = r`, so each repeat is a new partition.

`splits.json` (CONTRACTS.md): {"schema_version": 1, "seed", "num_folds", "task", "repartition",
"repeats": [{"repeat", "folds": [{"fold", "train": [ids], "test": [ids]}]}]}; ID lists are sorted.

Inner validation (`inner_split`): with an inner fraction f > 0, each cell's TRAINING patients are split once more
into the patients the model fits on and the inner patients (threshold, calibration, early stopping). Per class,
round(f x the class's training patients) are taken from the sorted IDs in the order of
`numpy.random.default_rng([seed, INNER_KEY, repeat, fold, class])`; the test fold is never an input. A joint grid
draws the same way over the strata of `split_labels` (0, 1, 3), and each of its tasks must keep both of its classes
among the inner and among the fit patients (`task_labels`). The inner IDs are data: each cell's run.json lists
them ("inner_validation").
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import math

import numpy as np
import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.contracts import JOINT_TASK, PCI_TASK, SPLITS_FILE, DatasetInfo, cell_name, task_list
from pdx_tf.errors import RunsError

SPLITS_SCHEMA_VERSION = 1
# Keeps the inner draw's random stream apart from the fold partition's ([seed, partition_key, class]).
INNER_KEY = 0x1AAE


def _partition(labels: Mapping[str, int], num_folds: int, seed: int, partition_key: int) -> list[list[str]]:
  """Test patients of each fold (stratified dealing, see the module docstring)."""
  folds: list[list[str]] = [[] for _ in range(num_folds)]
  next_fold = 0
  # For 0/1 labels this is (0, 1) whichever are present: an absent class deals no one and draws nothing.
  for label in sorted(set(labels.values()) | {0, 1}):
    members = sorted(patient_id for patient_id, value in labels.items() if value == label)
    order = np.random.default_rng([seed, partition_key, label]).permutation(len(members))
    for position in order:
      folds[next_fold].append(members[int(position)])
      next_fold = (next_fold + 1) % num_folds
  return [sorted(fold) for fold in folds]


def split_labels(info: DatasetInfo, task: str) -> dict[str, int]:
  """The classes a task's split is stratified on, by patient_id: the 0/1 label of "p" or "sb", or for the joint
  task and the regions task (PCI_TASK: the small-bowel regions are the rarest, so folds keep sb patients apart
  as well as p patients) the stratum label_p + 2 x label_sb (0, 1 or 3)."""
  if task not in (JOINT_TASK, PCI_TASK):
    return info.labels(task)
  labels_p, labels_sb = info.labels("p"), info.labels("sb")
  return {patient_id: labels_p[patient_id] + 2 * labels_sb[patient_id] for patient_id in labels_p}


def make_splits(labels: Mapping[str, int], *, task: str, num_folds: int, num_repeats: int, seed: int,
                repartition: bool = False) -> dict[str, Any]:
  """Builds the splits.json dict.

  Args:
    labels: the task label (0/1) of every patient, by patient_id; for the joint task the strata of
      `split_labels` (0, 1, 2 or 3).
    task: "p", "sb" or "p,sb" (recorded, so evaluation and reruns can check it).
    num_folds: folds per repeat (at least 2, at most the number of patients).
    num_repeats: repeats (at least 1).
    seed: the split seed.
    repartition: a new partition each repeat instead of one fixed partition.

  Raises:
    RunsError: if there are fewer patients than folds or a label is not 0/1.
  """
  if num_folds < 2:
    raise ValueError(f"num_folds must be at least 2, got {num_folds}")
  if num_repeats < 1:
    raise ValueError(f"num_repeats must be at least 1, got {num_repeats}")
  allowed = (0, 1, 2, 3) if task in (JOINT_TASK, PCI_TASK) else (0, 1)
  bad = sorted(patient_id for patient_id, value in labels.items() if value not in allowed)
  if bad:
    raise RunsError(f"patient {bad[0]} has task {task} label {labels[bad[0]]!r}, not 0 or 1; fix the manifest")
  if len(labels) < num_folds:
    raise RunsError(f"{len(labels)} patients cannot fill {num_folds} folds; lower --num_folds or add patients")
  everyone = sorted(labels)
  repeats = []
  for repeat in range(num_repeats):
    test_folds = _partition(labels, num_folds, seed, repeat if repartition else 0)
    folds = []
    for fold, test in enumerate(test_folds):
      held_out = set(test)
      folds.append({"fold": fold, "train": [p for p in everyone if p not in held_out], "test": test})
    repeats.append({"repeat": repeat, "folds": folds})
  return {"schema_version": SPLITS_SCHEMA_VERSION, "seed": int(seed), "num_folds": int(num_folds), "task": task,
          "repartition": bool(repartition), "repeats": repeats}


def split_hash(splits: Mapping[str, Any]) -> str:
  """The split hash recorded in every run.json: SHA-256 of the canonical JSON."""
  return io_utils.sha256_json(splits)


def cell_patients(splits: Mapping[str, Any], repeat: int, fold: int) -> tuple[list[str], list[str]]:
  """(train patient IDs, test patient IDs) of one cell.

  Raises:
    RunsError: if splits.json has no such cell (a missing fold is an error, never a silent fallback).
  """
  for repeat_entry in splits["repeats"]:
    if int(repeat_entry["repeat"]) != repeat:
      continue
    for fold_entry in repeat_entry["folds"]:
      if int(fold_entry["fold"]) == fold:
        return list(fold_entry["train"]), list(fold_entry["test"])
  raise RunsError(f"splits.json has no repeat {repeat} fold {fold}; use --num_repeats/--num_folds that match it")


def write_or_verify_splits(output_dir: str, splits: Mapping[str, Any]) -> str:
  """Writes `output_dir/splits.json` atomically, or checks an existing one is identical. Returns the path.

  Several machines may start at once: the content is deterministic and each writes by rename, so concurrent
  writers leave the same bytes; a file that differs (other task, seed, folds or cohort) is an error.

  Raises:
    RunsError: if an existing splits.json differs from `splits`, saying which field.
  """
  path = io_utils.join(output_dir, SPLITS_FILE)
  if not io_utils.exists(path):
    io_utils.atomic_write_json(path, splits)
  try:
    existing = io_utils.read_json(path)
  except (ValueError, tf.errors.OpError) as error:
    raise RunsError(f"{path} is unreadable ({type(error).__name__}); delete it or use a new --output_dir") from None
  if existing != dict(splits):
    for field in ("task", "seed", "num_folds", "repartition"):
      if existing.get(field) != splits.get(field):
        raise RunsError(f"{path} was made with {field}={existing.get(field)!r}, this run has"
                        f" {field}={splits.get(field)!r}; use a new --output_dir or the same settings")
    raise RunsError(f"{path} differs from the split of these records and settings (other patients or"
                    " --num_repeats); use a new --output_dir for a different cohort")
  return path


def task_labels(info: DatasetInfo, task: str) -> dict[str, dict[str, int]]:
  """Each task's 0/1 labels by patient_id for a grid of `task`: {"p": ...}, {"sb": ...} or both for the joint
  task (what `inner_split` checks both sides of); {"p": ...} for the regions task (its inner patients fit a
  threshold a region, each needing both classes only where it can: pdx_tf/training/regions.py)."""
  if task == PCI_TASK:
    return {"p": info.labels("p")}
  return {one_task: info.labels(one_task) for one_task in task_list(task)}


def cell_inner_split(info: DatasetInfo, task: str, train_ids: Sequence[str], *, seed: int, repeat: int, fold: int,
                     fraction: float) -> tuple[list[str], list[str]]:
  """`inner_split` of one cell of a grid of `task`, on the classes its split is stratified on (`split_labels`) and
  checked for every task it learns (`task_labels`): (fit IDs, inner IDs). The one call training, the grid's
  pre-flight check and the plan share."""
  return inner_split(split_labels(info, task), train_ids, seed=seed, repeat=repeat, fold=fold, fraction=fraction,
                     task_labels=task_labels(info, task))


def inner_split(labels: Mapping[str, int], train_ids: Sequence[str], *, seed: int, repeat: int, fold: int,
                fraction: float, task_labels: Mapping[str, Mapping[str, int]] | None = None
                ) -> tuple[list[str], list[str]]:
  """Splits one cell's training patients into (fit IDs, inner IDs), stratified by class (module docstring).

  Args:
    labels: the classes to stratify on by patient_id (at least every training patient): the task label (0/1),
      or a joint grid's strata (`split_labels`: 0, 1, 3).
    train_ids: the cell's training patients (its test patients must not be in it).
    seed, repeat, fold: the key of the draw.
    fraction: share of each class's training patients held out as inner patients; 0 keeps everyone for fitting.
    task_labels: each task's 0/1 labels (`task_labels(info, task)`); every one must keep both classes among the
      inner and among the fit patients. None: `labels` themselves (one task).

  Returns:
    (fit IDs, inner IDs), both sorted; disjoint, and together exactly `train_ids`.

  Raises:
    ValueError: a fraction outside [0, 1).
    RunsError: one line, when the inner patients or the fit patients would miss a class of a task.
  """
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"inner_fraction must be in [0, 1), got {fraction}")
  everyone = sorted(train_ids)
  if fraction == 0.0:
    return everyone, []
  inner: list[str] = []
  # (0, 1) for one task's labels, the present strata (0, 1, 3) for a joint grid; an absent class draws no one.
  for label in sorted({labels[patient_id] for patient_id in everyone} | {0, 1}):
    members = [patient_id for patient_id in everyone if labels[patient_id] == label]
    count = int(math.floor(fraction * len(members) + 0.5))
    order = np.random.default_rng([seed, INNER_KEY, repeat, fold, label]).permutation(len(members))
    inner.extend(members[int(position)] for position in order[:count])
  held = set(inner)
  fit = [patient_id for patient_id in everyone if patient_id not in held]
  cell = cell_name((repeat, fold))
  checked = {"": labels} if task_labels is None else task_labels
  for task, values in checked.items():
    for name, group in (("inner", inner), ("fit", fit)):
      missing = sorted({0, 1} - {values[patient_id] for patient_id in group})
      if missing:
        what = f"task {task} label" if task else "task label"
        raise RunsError(f"cell {cell}: --inner_fraction={fraction:g} leaves the {name} patients without {what}"
                        f" {missing[0]} ({len(inner)} inner of {len(everyone)} training patients); choose a"
                        " fraction that keeps both classes on both sides, fewer --num_folds, or more patients")
  return fit, sorted(inner)
