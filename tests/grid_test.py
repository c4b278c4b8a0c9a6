"""Tests of pdx_tf.training.grid: cell enumeration, partitions, --cells parsing, partitions from the environment, completion."""

import pytest

from pdx_tf import contracts, io_utils
from pdx_tf.errors import RunsError
from pdx_tf.training import grid


def test_all_cells_repeat_major():
  assert grid.all_cells(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
  assert contracts.cell_name((3, 7)) == "r03_f07"


@pytest.mark.parametrize("num_repeats,num_folds", [(24, 8), (1, 8), (3, 5)])
def test_partitions_cover_every_cell_exactly_once(num_repeats, num_folds):
  cells = grid.all_cells(num_repeats, num_folds)
  for num_partitions in range(1, 60):
    seen = []
    for partition_index in range(num_partitions):
      mine = grid.partition_cells(cells, num_partitions, partition_index)
      assert mine == [cell for index, cell in enumerate(cells) if index % num_partitions == partition_index]
      seen.extend(mine)
    assert sorted(seen) == sorted(cells) and len(seen) == len(cells)


def test_partition_arguments_are_checked():
  with pytest.raises(ValueError, match="partition_index"):
    grid.partition_cells([], 4, 4)
  with pytest.raises(ValueError, match="num_partitions"):
    grid.partition_cells([], 0, 0)


def test_parse_cells():
  assert grid.parse_cells("r1f0, r0f2,r0f2", 2, 3) == [(0, 2), (1, 0)]
  assert grid.parse_cells(("r0f0",), 1, 2) == [(0, 0)]
  assert grid.parse_cells("", 1, 2) == []
  with pytest.raises(ValueError, match="outside the grid"):
    grid.parse_cells("r0f8", 24, 8)
  with pytest.raises(ValueError, match="outside the grid"):
    grid.parse_cells("r24f0", 24, 8)
  with pytest.raises(ValueError, match="not a cell name"):
    grid.parse_cells("r0-f1", 24, 8)
  # One cell syntax everywhere: the folder form is accepted too.
  assert grid.parse_cells("r00_f02,r1_f0", 2, 3) == [(0, 2), (1, 0)]


def test_partition_from_environment():
  assert grid.partition_from_environment({}) is None
  assert grid.partition_from_environment({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "16"}) == (16, 3)
  assert grid.partition_from_environment({"JOB_COMPLETION_INDEX": "0", "JOB_COMPLETIONS": "4"}) == (4, 0)
  with pytest.raises(ValueError, match="JOB_COMPLETIONS"):
    grid.partition_from_environment({"JOB_COMPLETION_INDEX": "2"})
  with pytest.raises(ValueError, match="not in"):
    grid.partition_from_environment({"SLURM_ARRAY_TASK_ID": "16", "SLURM_ARRAY_TASK_COUNT": "16"})
  with pytest.raises(ValueError, match="not integers"):
    grid.partition_from_environment({"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "2"})


def test_is_complete(tmp_path):
  folder = str(tmp_path / "cell")
  assert not grid.is_complete(folder)
  io_utils.atomic_write_json(io_utils.join(folder, "run.json"), {"status": "running"})
  assert not grid.is_complete(folder)
  io_utils.atomic_write_json(io_utils.join(folder, "run.json"), {"status": "complete"})
  assert grid.is_complete(folder)
  with open(io_utils.join(folder, "run.json"), "w") as handle:
    handle.write("{")
  with pytest.raises(RunsError, match="not valid JSON"):
    grid.is_complete(folder)
