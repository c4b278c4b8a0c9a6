"""Tests for pdx_tf.evaluation.runs: reading the run artifacts and every completeness/consistency error."""

import hashlib
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import fake_runs  # noqa: E402  pylint: disable=wrong-import-position

from pdx_tf import io_utils  # noqa: E402
from pdx_tf.errors import RunsError  # noqa: E402
from pdx_tf.evaluation import runs  # noqa: E402


@pytest.fixture(name="root")
def fixture_root(tmp_path):
  fake_runs.write_fake_runs(str(tmp_path), num_repeats=2, num_folds=3, num_patients=12)
  return str(tmp_path)


def _predictions_path(root, task, repeat, fold):
  return os.path.join(fake_runs.cell_folder(root, task, repeat, fold), "patient_predictions.csv")


def _rewrite_csv(path, edit):
  rows = io_utils.read_csv(path)
  header = list(rows[0].keys())
  rows = edit(rows)
  io_utils.atomic_write_csv(path, header, ([row[column] for column in header] for row in rows))


def rows_first_patient(path):
  return io_utils.read_csv(path)[0]["patient_id"]


def _error_line(root, **kwargs):
  with pytest.raises(RunsError) as raised:
    runs.load_runs(root, **kwargs)
  message = str(raised.value)
  assert "\n" not in message
  return message


def test_reads_a_parent_folder_with_both_tasks(root):
  loaded = runs.load_runs(root)
  assert list(loaded) == ["p", "sb"]
  task_runs = loaded["p"]
  assert len(task_runs.cells) == 6 and not task_runs.partial
  assert task_runs.covariate_columns == ("ascites", "pci", "site")
  cell = task_runs.cells[(1, 2)]
  assert sorted(cell.patient_ids) == sorted(task_runs.test_patients[(1, 2)])
  assert cell.slice_labels.size == 4 * len(cell.patient_ids)


def test_reads_one_task_folder_and_respects_tasks(root):
  assert list(runs.load_runs(os.path.join(root, "sb"))) == ["sb"]
  assert list(runs.load_runs(root, tasks=("sb",))) == ["sb"]
  message = _error_line(os.path.join(root, "p"), tasks=("sb",))
  assert "task sb" in message


def test_empty_folder(tmp_path):
  message = _error_line(str(tmp_path))
  assert str(tmp_path) in message and "empty" in message


def test_missing_folder(tmp_path):
  assert str(tmp_path / "absent") in _error_line(str(tmp_path / "absent"))


def test_missing_cell_lists_the_cells(root):
  os.remove(os.path.join(fake_runs.cell_folder(root, "p", 1, 2), "run.json"))
  message = _error_line(root)
  assert "r01_f02" in message and "--allow_partial" in message and os.path.join(root, "p") in message


def test_incomplete_status_counts_as_missing(root):
  path = os.path.join(fake_runs.cell_folder(root, "p", 0, 1), "run.json")
  run_info = io_utils.read_json(path)
  run_info["status"] = "running"
  io_utils.atomic_write_json(path, run_info)
  assert "r00_f01" in _error_line(root)
  loaded = runs.load_runs(root, allow_partial=True)
  assert loaded["p"].missing_cells == ((0, 1),) and loaded["p"].partial
  assert not loaded["sb"].partial


def test_duplicate_cell_names_both_files(root):
  splits = io_utils.read_json(os.path.join(root, "p", "splits.json"))
  patients = {row["patient_id"]: row for row in io_utils.read_csv(os.path.join(root, "p", "patients.csv"))}
  copy_folder = os.path.join(root, "p", "retry", "again")
  fake_runs.write_cell(root, "p", 0, 2, io_utils.sha256_json(splits), splits["repeats"][0]["folds"][2]["test"],
                       patients, folder=copy_folder)
  message = _error_line(root)
  assert "duplicate" in message and "r00_f02" in message
  assert os.path.join(copy_folder, "run.json") in message
  assert os.path.join(fake_runs.cell_folder(root, "p", 0, 2), "run.json") in message


def test_patient_predicted_twice(root):
  path = _predictions_path(root, "p", 0, 0)
  _rewrite_csv(path, lambda rows: rows + [rows[0]])
  message = _error_line(root)
  assert path in message and "predicted twice" in message and rows_first_patient(path) in message


def test_patient_not_in_split(root):
  path = _predictions_path(root, "p", 0, 0)
  other_fold_patient = io_utils.read_csv(_predictions_path(root, "p", 0, 1))[0]["patient_id"]

  def swap_first(rows):
    rows[0]["patient_id"] = other_fold_patient
    rows[0]["label"] = "1" if int(other_fold_patient[2:]) % 2 == 0 else "0"  # fake cohort: even ids positive
    return rows

  _rewrite_csv(path, swap_first)
  message = _error_line(root)
  assert path in message and other_fold_patient in message and "not in the test set" in message


def test_patient_unknown_to_cohort_table(root):
  path = _predictions_path(root, "p", 1, 1)

  def rename(rows):
    rows[0]["patient_id"] = "stranger"
    return rows

  _rewrite_csv(path, rename)
  message = _error_line(root)
  assert path in message and "stranger" in message


def test_missing_test_patient(root):
  path = _predictions_path(root, "p", 0, 0)
  dropped = rows_first_patient(path)
  _rewrite_csv(path, lambda rows: rows[1:])
  message = _error_line(root)
  assert path in message and dropped in message


@pytest.mark.parametrize("bad_value", ["nan", "1.5", "-0.1", "inf", "abc"])
def test_invalid_probability(root, bad_value):
  path = _predictions_path(root, "sb", 1, 0)

  def corrupt(rows):
    rows[-1]["probability"] = bad_value
    return rows

  _rewrite_csv(path, corrupt)
  message = _error_line(root)
  assert path in message and repr(bad_value) in message


def test_invalid_slice_probability(root):
  path = os.path.join(fake_runs.cell_folder(root, "p", 0, 0), "slice_predictions.csv")

  def corrupt(rows):
    rows[3]["probability"] = "nan"
    return rows

  _rewrite_csv(path, corrupt)
  assert path in _error_line(root)


def test_label_disagreeing_with_cohort_table(root):
  path = _predictions_path(root, "p", 0, 2)

  def flip(rows):
    rows[0]["label"] = "0" if rows[0]["label"] == "1" else "1"
    return rows

  _rewrite_csv(path, flip)
  message = _error_line(root)
  assert path in message and "label_p" in message


def test_run_from_another_split_hash(root):
  path = os.path.join(fake_runs.cell_folder(root, "sb", 1, 1), "run.json")
  run_info = io_utils.read_json(path)
  run_info["split_hash"] = "f" * 64
  io_utils.atomic_write_json(path, run_info)
  message = _error_line(root)
  assert path in message and "split hash" in message


def test_split_hash_is_the_canonical_json_hash(root):
  with open(os.path.join(root, "p", "splits.json"), "rb") as handle:
    expected = hashlib.sha256(handle.read()).hexdigest()  # splits.json is written in the canonical form
  assert runs.load_runs(root)["p"].split_hash == expected


def test_two_splits_for_one_task(root):
  io_utils.atomic_write_json(os.path.join(root, "copy", "splits.json"),
                             io_utils.read_json(os.path.join(root, "p", "splits.json")))
  message = _error_line(root)
  assert "two splits.json for task p" in message


def test_run_json_for_the_wrong_task(root):
  path = os.path.join(fake_runs.cell_folder(root, "p", 0, 0), "run.json")
  run_info = io_utils.read_json(path)
  run_info["task"] = "sb"
  io_utils.atomic_write_json(path, run_info)
  assert path in _error_line(root)


def test_overlapping_test_folds_in_splits(root):
  path = os.path.join(root, "p", "splits.json")
  splits = io_utils.read_json(path)
  splits["repeats"][0]["folds"][1]["test"].append(splits["repeats"][0]["folds"][0]["test"][0])
  io_utils.atomic_write_json(path, splits)
  message = _error_line(root)
  assert path in message and "folds 0 and 1" in message



def test_float_labels_are_accepted_and_other_labels_rejected(root):
  path = _predictions_path(root, "p", 0, 0)

  def as_floats(rows):
    for row in rows:
      row["label"] = f"{float(row['label']):.1f}"
    return rows

  _rewrite_csv(path, as_floats)
  assert len(runs.load_runs(root)["p"].cells) == 6

  def invalid(rows):
    rows[0]["label"] = "2"
    return rows

  _rewrite_csv(path, invalid)
  message = _error_line(root)
  assert path in message and "'2'" in message
