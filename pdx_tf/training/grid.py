"""The cross-validation grid: cells (repeat, fold), their folders, each machine's partition of the cells and resume state.

Cells are numbered repeat-major: cell (r, f) has index r * num_folds + f, and goes to partition
index % num_partitions. Every cell is idempotent: a folder with run.json status "complete" is skipped, one with
progress.json resumes after its last finished epoch, anything else starts from scratch.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from pdx_tf import io_utils
from pdx_tf.contracts import Cell, COMPLETE_STATUS, parse_cell_name, RUN_FILE
from pdx_tf.errors import RunsError


def all_cells(num_repeats: int, num_folds: int) -> list[Cell]:
  """Every cell in index order (repeat-major)."""
  return [(repeat, fold) for repeat in range(num_repeats) for fold in range(num_folds)]


def partition_cells(cells: Sequence[Cell], num_partitions: int, partition_index: int) -> list[Cell]:
  """The cells of one partition (machine): position i of `cells` goes to partition i % num_partitions."""
  if num_partitions < 1:
    raise ValueError(f"num_partitions must be at least 1, got {num_partitions}")
  if not 0 <= partition_index < num_partitions:
    raise ValueError(f"partition_index must be in [0, {num_partitions}), got {partition_index}")
  return [cell for index, cell in enumerate(cells) if index % num_partitions == partition_index]


def parse_cells(text: str | Sequence[str], num_repeats: int, num_folds: int) -> list[Cell]:
  """Parses `--cells=r00_f00,r0f1` (either cell-name form) into cells, in grid order, without duplicates.

  Raises:
    ValueError: for a malformed name or a cell outside the grid.
  """
  names = text.split(",") if isinstance(text, str) else list(text)
  chosen = set()
  for name in (item.strip() for item in names):
    if not name:
      continue
    cell = parse_cell_name(name)
    if cell is None:
      raise ValueError(f"--cells entry {name!r} is not a cell name like r00_f03 or r0f3 (repeat, fold; 0-based)")
    repeat, fold = cell
    if repeat >= num_repeats or fold >= num_folds:
      raise ValueError(f"--cells entry {name!r} is outside the grid of {num_repeats} repeats x {num_folds} folds"
                       f" (repeats 0..{num_repeats - 1}, folds 0..{num_folds - 1})")
    chosen.add((repeat, fold))
  return [cell for cell in all_cells(num_repeats, num_folds) if cell in chosen]


def partition_from_environment(environ: Mapping[str, str]) -> tuple[int, int] | None:
  """(num_partitions, partition_index) from a SLURM job array or a Kubernetes Indexed Job, else None.

  SLURM: SLURM_ARRAY_TASK_COUNT and SLURM_ARRAY_TASK_ID (an array submitted as --array=0-(N-1)).
  Kubernetes: JOB_COMPLETION_INDEX (set by an Indexed Job) and JOB_COMPLETIONS, which the Job spec must set
  to its `completions` count (Kubernetes does not export it itself).

  Raises:
    ValueError: if only one of a pair is set, or the values are not a valid index/count.
  """
  for index_name, count_name in (("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"),
                                 ("JOB_COMPLETION_INDEX", "JOB_COMPLETIONS")):
    index_text, count_text = environ.get(index_name), environ.get(count_name)
    if index_text is None and count_text is None:
      continue
    if index_text is None or count_text is None:
      missing = count_name if count_text is None else index_name
      raise ValueError(f"{index_name if index_text is not None else count_name} is set but {missing} is not;"
                       f" set both, or pass --num_partitions and --partition_index")
    try:
      index, count = int(index_text), int(count_text)
    except ValueError:
      raise ValueError(f"{index_name}={index_text!r} / {count_name}={count_text!r} are not integers") from None
    if not 0 <= index < count:
      raise ValueError(f"{index_name}={index} is not in [0, {count_name}={count}); a SLURM array must be"
                       " numbered 0..N-1")
    return count, index
  return None


def is_complete(folder: str) -> bool:
  """True if the cell folder holds a run.json with status complete."""
  path = io_utils.join(folder, RUN_FILE)
  if not io_utils.exists(path):
    return False
  try:
    return io_utils.read_json(path).get("status") == COMPLETE_STATUS
  except ValueError:
    raise RunsError(f"{path} is not valid JSON; delete the cell folder {folder} and rerun") from None
