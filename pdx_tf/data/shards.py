"""Per-patient TFRecord shards and completion markers under the pipeline's output folder D.

Layout (paths relative to D; see CONTRACTS.md):
  original/<patient_id>.tfrecord                 the patient's original slices, in slice order
  augmented/<patient_id>-bBBBBB-NNNNN.tfrecord   block BBBBB of the patient's augmented copies: copies
                                                 [B * block_size + 1, (B + 1) * block_size] of every slice, in
                                                 slice order; part NNNNN of the block (a block larger than
                                                 shard_size_mb is split into several parts)
  qc/<patient_id>.png                     the patient's QC montage
  patients/<patient_id>.json              completion marker, written last: shard list, counts, hashes

Blocks make the training pool draw a choice of whole files (`pdx_tf.training.input_pipeline`): a cell opens only
its drawn blocks, so the bytes it reads are the bytes it trains on. Every augmented shard's dataset.json entry
carries its `block`.

Every file is written under a temporary name and renamed into place, so a killed run never leaves a shard that
looks complete; a patient counts as done only once its marker exists and its files have the sizes it records.
Cleaning a patient removes exactly that patient's names (an exact pattern, so patient "a" never touches the
files of patient "a-1").
"""

from __future__ import annotations

import os
import re

import tensorflow as tf

from pdx_tf import io_utils

ORIGINAL_DIR = "original"
AUGMENTED_DIR = "augmented"
QC_DIR = "qc"
MARKERS_DIR = "patients"
TFRECORD_FRAME_BYTES = 16  # length (8) + length CRC (4) + data CRC (4) around every record.
MEGABYTE = 1 << 20
_TEMP_PREFIX = re.compile(re.escape(io_utils.TEMP_MARKER) + r"[0-9a-f]{12}-")


def original_path(patient_id: str) -> str:
  """Relative path of a patient's original-slice shard."""
  return f"{ORIGINAL_DIR}/{patient_id}.tfrecord"


def augmented_path(patient_id: str, block: int, part: int = 0) -> str:
  """Relative path of part `part` of block `block` of a patient's augmented copies."""
  return f"{AUGMENTED_DIR}/{patient_id}-b{block:05d}-{part:05d}.tfrecord"


def augmentation_block(augmentation_index: int, block_size: int) -> int:
  """The block holding augmented copy `augmentation_index` (1-based): copies 1..block_size are block 0."""
  if augmentation_index < 1 or block_size < 1:
    raise ValueError(f"need augmentation_index >= 1 and block_size >= 1, got {augmentation_index}, {block_size}")
  return (augmentation_index - 1) // block_size


def qc_path(patient_id: str) -> str:
  return f"{QC_DIR}/{patient_id}.png"


def marker_path(patient_id: str) -> str:
  return f"{MARKERS_DIR}/{patient_id}.json"


def _patient_name_patterns(patient_id: str) -> dict[str, re.Pattern]:
  name = re.escape(patient_id)
  return {
      ORIGINAL_DIR: re.compile(rf"{name}\.tfrecord"),
      AUGMENTED_DIR: re.compile(rf"{name}-b\d{{5}}-\d{{5}}\.tfrecord"),
      QC_DIR: re.compile(rf"{name}\.png"),
      MARKERS_DIR: re.compile(rf"{name}\.json"),
  }


def remove_patient_files(output_dir: str, patient_id: str) -> int:
  """Deletes a patient's shards, QC image, marker and temporary leftovers; returns how many files went."""
  removed = 0
  for folder, pattern in _patient_name_patterns(patient_id).items():
    path = io_utils.join(output_dir, folder)
    if not tf.io.gfile.isdir(path):
      continue
    # Globs narrow the listing (a folder of a large cohort holds thousands of shards, and on gs:// listing
    # costs requests); patient IDs hold no glob characters. The exact pattern then decides.
    candidates = set()
    for glob in (f"{patient_id}.*", f"{patient_id}-*", f"{io_utils.TEMP_MARKER}*"):
      candidates.update(os.path.basename(found) for found in tf.io.gfile.glob(io_utils.join(path, glob)))
    for name in sorted(candidates):
      if pattern.fullmatch(_TEMP_PREFIX.sub("", name, count=1)):
        tf.io.gfile.remove(io_utils.join(path, name))
        removed += 1
  return removed


def remove_temp_files(folder: str) -> None:
  """Deletes leftovers of interrupted atomic writes directly inside `folder` (run-level files)."""
  if not tf.io.gfile.isdir(folder):
    return
  for name in tf.io.gfile.listdir(folder):
    if io_utils.is_temp_path(name):
      tf.io.gfile.remove(io_utils.join(folder, name))


class _ClosedOnExit:
  """`with writer:` closes on success and aborts (deletes the unfinished temporary files) on an error."""

  def close(self) -> None:
    raise NotImplementedError

  def abort(self) -> None:
    raise NotImplementedError

  def __enter__(self):
    return self

  def __exit__(self, error_type, error, traceback) -> None:
    if error_type is None:
      self.close()
    else:
      self.abort()


class ShardWriter(_ClosedOnExit):
  """Writes serialized examples to one or more shards of at most `max_bytes` each, atomically.

  Each shard is written to a temporary name and renamed when it is full or on `close()`. `shards` lists the
  finished shards as dicts {path, kind, patient_id, num_examples, num_bytes, sha256} (+ `block` for augmented
  shards). An augmented writer writes one block (see `BlockShardWriter` for all of a patient's blocks).
  """

  def __init__(self, output_dir: str, patient_id: str, kind: str, max_bytes: int | None = None,
               block: int | None = None):
    if kind not in ("original", "augmented"):
      raise ValueError(f"kind must be 'original' or 'augmented', got {kind!r}")
    if (kind == "augmented") != (block is not None):
      raise ValueError("augmented shards need a block index, original shards take none")
    self._block = block
    self._output_dir = output_dir
    self._patient_id = patient_id
    self._kind = kind
    self._max_bytes = max_bytes
    self._writer = None
    self._temp = None
    self._count = 0
    self._bytes = 0
    self.shards: list[dict] = []

  def _relative_path(self) -> str:
    if self._kind == "original":
      return original_path(self._patient_id)
    return augmented_path(self._patient_id, self._block, len(self.shards))

  def write(self, serialized: bytes) -> None:
    size = len(serialized) + TFRECORD_FRAME_BYTES
    if self._writer is not None and self._max_bytes is not None and self._bytes + size > self._max_bytes:
      self._finish()
    if self._writer is None:
      final = io_utils.join(self._output_dir, self._relative_path())
      io_utils.make_dirs(io_utils.join(self._output_dir, self._relative_path().split("/")[0]))
      self._temp = io_utils.temp_path_for(final)
      self._writer = tf.io.TFRecordWriter(self._temp)
    self._writer.write(serialized)
    self._count += 1
    self._bytes += size

  def _finish(self) -> None:
    self._writer.close()
    relative = self._relative_path()
    final = io_utils.join(self._output_dir, relative)
    num_bytes = tf.io.gfile.stat(self._temp).length
    digest = io_utils.sha256_file(self._temp)
    tf.io.gfile.rename(self._temp, final, overwrite=True)
    shard = {"path": relative, "patient_id": self._patient_id, "kind": self._kind,
             "num_examples": self._count, "num_bytes": int(num_bytes), "sha256": digest}
    if self._block is not None:
      shard["block"] = self._block
    self.shards.append(shard)
    self._writer, self._temp, self._count, self._bytes = None, None, 0, 0

  def close(self) -> None:
    """Finishes the open shard (if any examples were written)."""
    if self._writer is not None:
      self._finish()

  def abort(self) -> None:
    """Closes and deletes the unfinished temporary shard (finished shards are the caller's to clean)."""
    if self._writer is not None:
      self._writer.close()
      if tf.io.gfile.exists(self._temp):
        tf.io.gfile.remove(self._temp)
      self._writer, self._temp = None, None


class BlockShardWriter(_ClosedOnExit):
  """A patient's augmented copies, one `ShardWriter` per block (records of all blocks arrive interleaved).

  `shards` lists the finished shards ordered by (block, part).
  """

  def __init__(self, output_dir: str, patient_id: str, max_bytes: int | None = None):
    self._output_dir = output_dir
    self._patient_id = patient_id
    self._max_bytes = max_bytes
    self._writers: dict[int, ShardWriter] = {}

  def write(self, serialized: bytes, block: int) -> None:
    if block not in self._writers:
      self._writers[block] = ShardWriter(self._output_dir, self._patient_id, "augmented", self._max_bytes, block)
    self._writers[block].write(serialized)

  @property
  def shards(self) -> list[dict]:
    return [shard for block in sorted(self._writers) for shard in self._writers[block].shards]

  def close(self) -> None:
    for block in sorted(self._writers):
      self._writers[block].close()

  def abort(self) -> None:
    for writer in self._writers.values():
      writer.abort()


def marker_is_valid(output_dir: str, marker: dict, fingerprint: str) -> bool:
  """True when a completion marker matches `fingerprint` and every file it lists has its recorded size."""
  if marker.get("fingerprint") != fingerprint:
    return False
  try:
    for shard in marker["shards"]:
      path = io_utils.join(output_dir, shard["path"])
      if not tf.io.gfile.exists(path) or tf.io.gfile.stat(path).length != shard["num_bytes"]:
        return False
    qc = marker.get("qc_path")
    if qc and not tf.io.gfile.exists(io_utils.join(output_dir, qc)):
      return False
  except (KeyError, TypeError, tf.errors.OpError):
    return False
  return True
