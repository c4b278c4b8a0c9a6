"""Tests of pdx_tf.training.splits: patient-level, stratified, complete, deterministic, race-safe splits.json."""

import collections
import copy
import hashlib
import json
import os
import subprocess
import sys

import pytest

from pdx_tf import io_utils
from pdx_tf.errors import RunsError
from pdx_tf.training import splits

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _labels(num_positive, num_negative):
  labels = {f"pos{index:02d}": 1 for index in range(num_positive)}
  labels.update({f"neg{index:02d}": 0 for index in range(num_negative)})
  return labels


@pytest.mark.parametrize("num_positive,num_negative,num_folds", [(13, 30, 8), (5, 6, 3), (20, 20, 8), (3, 9, 4)])
@pytest.mark.parametrize("repartition", [False, True])
def test_every_cell_is_leak_free_complete_and_stratified(num_positive, num_negative, num_folds, repartition):
  labels = _labels(num_positive, num_negative)
  split = splits.make_splits(labels, task="p", num_folds=num_folds, num_repeats=3, seed=7, repartition=repartition)
  assert [entry["repeat"] for entry in split["repeats"]] == [0, 1, 2]
  for repeat_entry in split["repeats"]:
    tested = collections.Counter()
    positives_per_fold, sizes = [], []
    for fold, fold_entry in enumerate(repeat_entry["folds"]):
      assert fold_entry["fold"] == fold
      train, test = set(fold_entry["train"]), set(fold_entry["test"])
      assert not train & test, "a patient is in both train and test"
      assert train | test == set(labels)
      assert fold_entry["train"] == sorted(train) and fold_entry["test"] == sorted(test)
      tested.update(test)
      positives_per_fold.append(sum(labels[patient] for patient in test))
      sizes.append(len(test))
    assert set(tested) == set(labels) and set(tested.values()) == {1}, "each patient tested exactly once"
    negatives_per_fold = [size - positive for size, positive in zip(sizes, positives_per_fold)]
    assert max(positives_per_fold) - min(positives_per_fold) <= 1
    assert max(negatives_per_fold) - min(negatives_per_fold) <= 1
    assert max(sizes) - min(sizes) <= 1


def test_partition_is_fixed_across_repeats_unless_repartition():
  labels = _labels(12, 20)
  fixed = splits.make_splits(labels, task="p", num_folds=4, num_repeats=3, seed=1)
  assert fixed["repeats"][0]["folds"] == fixed["repeats"][1]["folds"] == fixed["repeats"][2]["folds"]
  moving = splits.make_splits(labels, task="p", num_folds=4, num_repeats=3, seed=1, repartition=True)
  assert moving["repeats"][0]["folds"] == fixed["repeats"][0]["folds"]
  assert moving["repeats"][1]["folds"] != moving["repeats"][0]["folds"]


def test_deterministic_from_ids_labels_and_seed():
  labels = _labels(9, 14)
  first = splits.make_splits(labels, task="sb", num_folds=5, num_repeats=2, seed=3)
  shuffled = dict(reversed(list(labels.items())))  # input order must not matter
  assert splits.make_splits(shuffled, task="sb", num_folds=5, num_repeats=2, seed=3) == first
  assert splits.make_splits(labels, task="sb", num_folds=5, num_repeats=2, seed=4) != first
  assert first["task"] == "sb" and first["seed"] == 3 and first["num_folds"] == 5 and first["schema_version"] == 1
  assert first["repartition"] is False


def test_cell_patients_and_missing_cell():
  split = splits.make_splits(_labels(4, 4), task="p", num_folds=2, num_repeats=1, seed=0)
  train, test = splits.cell_patients(split, 0, 1)
  assert test == split["repeats"][0]["folds"][1]["test"] and train == split["repeats"][0]["folds"][1]["train"]
  with pytest.raises(RunsError, match="no repeat 1 fold 0"):
    splits.cell_patients(split, 1, 0)


def test_too_few_patients_and_bad_labels():
  with pytest.raises(RunsError, match="cannot fill 8 folds"):
    splits.make_splits(_labels(3, 3), task="p", num_folds=8, num_repeats=1, seed=0)
  with pytest.raises(RunsError, match="not 0 or 1"):
    splits.make_splits({"a": 1, "b": 2, "c": 0}, task="p", num_folds=2, num_repeats=1, seed=0)


def test_write_or_verify_is_idempotent_and_rejects_other_settings(tmp_path):
  labels = _labels(6, 6)
  split = splits.make_splits(labels, task="p", num_folds=3, num_repeats=2, seed=0)
  path = splits.write_or_verify_splits(str(tmp_path), split)
  first_bytes = open(path, "rb").read()
  assert json.loads(first_bytes) == split
  assert splits.write_or_verify_splits(str(tmp_path), split) == path  # a second machine: verified, unchanged
  assert open(path, "rb").read() == first_bytes
  assert not [name for name in os.listdir(tmp_path) if io_utils.is_temp_path(name)]
  other_seed = splits.make_splits(labels, task="p", num_folds=3, num_repeats=2, seed=1)
  with pytest.raises(RunsError, match="seed=0"):
    splits.write_or_verify_splits(str(tmp_path), other_seed)
  other_task = splits.make_splits(labels, task="sb", num_folds=3, num_repeats=2, seed=0)
  with pytest.raises(RunsError, match="task="):
    splits.write_or_verify_splits(str(tmp_path), other_task)
  other_cohort = splits.make_splits(_labels(6, 7), task="p", num_folds=3, num_repeats=2, seed=0)
  with pytest.raises(RunsError, match="differs"):
    splits.write_or_verify_splits(str(tmp_path), other_cohort)


def test_split_hash_is_the_canonical_json_hash(tmp_path):
  split = splits.make_splits(_labels(2, 2), task="p", num_folds=2, num_repeats=1, seed=0)
  # The documented recipe rebuilt with the standard library: sorted keys, indent 2, ASCII, a final newline.
  canonical = json.dumps(split, sort_keys=True, indent=2, ensure_ascii=True) + "\n"
  assert splits.split_hash(split) == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
  splits.write_or_verify_splits(str(tmp_path), split)  # what run.json's hash refers to: the file's bytes
  assert splits.split_hash(split) == hashlib.sha256((tmp_path / "splits.json").read_bytes()).hexdigest()


def test_split_hash_changes_when_one_patient_moves_and_is_stable_across_processes():
  split = splits.make_splits(_labels(4, 4), task="p", num_folds=2, num_repeats=1, seed=0)
  moved = copy.deepcopy(split)
  folds = moved["repeats"][0]["folds"]
  patient = folds[0]["test"].pop()
  folds[0]["train"].append(patient)
  folds[1]["test"].append(patient)
  folds[1]["train"].remove(patient)
  assert splits.split_hash(moved) != splits.split_hash(split)
  code = ("import json, sys; from pdx_tf.training import splits; "
          "print(splits.split_hash(json.loads(sys.stdin.read())))")
  other = subprocess.run([sys.executable, "-c", code], input=json.dumps(split), capture_output=True, text=True,
                         cwd=REPO_ROOT, check=True, timeout=120)
  assert other.stdout.strip() == splits.split_hash(split)


def _documented_partition(labels, num_folds, seed, partition_key):
  """The dealing of the module docstring, rebuilt here: each class shuffled with default_rng([seed, key, class])
  and dealt round-robin onto folds 0, 1, 2, ..., class 1 continuing where class 0 stopped."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  folds, next_fold = [[] for _ in range(num_folds)], 0
  for label in (0, 1):
    members = sorted(patient for patient, value in labels.items() if value == label)
    for position in np.random.default_rng([seed, partition_key, label]).permutation(len(members)):
      folds[next_fold].append(members[int(position)])
      next_fold = (next_fold + 1) % num_folds
  return [sorted(fold) for fold in folds]


@pytest.mark.parametrize("repartition", [False, True])
def test_folds_are_the_documented_dealing(repartition):
  labels = {f"pt{index:02d}": int(index % 3 == 0) for index in range(23)}
  split = splits.make_splits(labels, task="p", num_folds=4, num_repeats=3, seed=11, repartition=repartition)
  for repeat in range(3):
    expected = _documented_partition(labels, 4, 11, repeat if repartition else 0)
    assert [fold["test"] for fold in split["repeats"][repeat]["folds"]] == expected


def test_grid_size_limits():
  labels = {"a": 0, "b": 1, "c": 0}
  assert len(splits.make_splits(labels, task="p", num_folds=3, num_repeats=1, seed=0)["repeats"]) == 1
  with pytest.raises(ValueError, match="num_repeats must be at least 1"):
    splits.make_splits(labels, task="p", num_folds=2, num_repeats=0, seed=0)
  with pytest.raises(RunsError, match="3 patients cannot fill 4 folds"):
    splits.make_splits(labels, task="p", num_folds=4, num_repeats=1, seed=0)


@pytest.mark.parametrize("field, value", [("task", "sb"), ("seed", 5), ("num_folds", 3), ("repartition", True)])
def test_an_existing_split_names_the_field_that_differs(tmp_path, field, value):
  labels = {f"pt{index}": index % 2 for index in range(6)}
  settings = {"task": "p", "seed": 0, "num_folds": 2, "repartition": False}
  splits.write_or_verify_splits(str(tmp_path), splits.make_splits(labels, num_repeats=1, **settings))
  other = splits.make_splits(labels, num_repeats=1, **{**settings, field: value})
  with pytest.raises(RunsError, match=f"made with {field}="):
    splits.write_or_verify_splits(str(tmp_path), other)


def test_an_unreadable_split_is_one_line(tmp_path):
  (tmp_path / "splits.json").write_text("{not json")
  split = splits.make_splits({"a": 0, "b": 1}, task="p", num_folds=2, num_repeats=1, seed=0)
  with pytest.raises(RunsError, match="is unreadable"):
    splits.write_or_verify_splits(str(tmp_path), split)
