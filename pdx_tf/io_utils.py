"""Atomic, gfile-based file helpers shared by every stage.

Every output goes through `tf.io.gfile`, so `gs://` and other TensorFlow filesystems work. Writes go to a
temporary name beside the target and are renamed into place, so a killed run never leaves a file that looks
complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import uuid
from typing import Any, Iterable, Sequence

import tensorflow as tf

TEMP_MARKER = ".tmp-"


def join(*parts: str) -> str:
  """Joins path parts, keeping URL-style prefixes such as gs:// intact."""
  return os.path.join(*parts)


def temp_path_for(path: str) -> str:
  """A unique temporary name in the same folder as `path` (same filesystem, so rename is atomic)."""
  folder, name = os.path.split(path)
  return os.path.join(folder, f"{TEMP_MARKER}{uuid.uuid4().hex[:12]}-{name}")


def is_temp_path(path: str) -> bool:
  """True for leftovers of an interrupted atomic write."""
  return os.path.basename(path).startswith(TEMP_MARKER)


def make_dirs(path: str) -> None:
  """Creates a folder and its parents (no error if it exists)."""
  tf.io.gfile.makedirs(path)


def exists(path: str) -> bool:
  return tf.io.gfile.exists(path)


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes `data` to `path` atomically: a temporary file beside it, then a rename."""
  folder = os.path.dirname(path)
  if folder:
    tf.io.gfile.makedirs(folder)
  temp = temp_path_for(path)
  with tf.io.gfile.GFile(temp, "wb") as handle:
    handle.write(data)
  tf.io.gfile.rename(temp, path, overwrite=True)


def atomic_write_text(path: str, text: str) -> None:
  """Writes UTF-8 `text` to `path` atomically."""
  atomic_write_bytes(path, text.encode("utf-8"))


def canonical_json(value: Any) -> str:
  """JSON with sorted keys and fixed separators: the form that is hashed."""
  return json.dumps(value, sort_keys=True, indent=2, ensure_ascii=True) + "\n"


def atomic_write_json(path: str, value: Any) -> None:
  """Writes `value` as canonical JSON, atomically."""
  atomic_write_text(path, canonical_json(value))


def read_json(path: str) -> Any:
  """Reads a JSON file through gfile."""
  with tf.io.gfile.GFile(path, "r") as handle:
    return json.load(handle)


def stable_key(text: str) -> int:
  """A stable 63-bit integer for a string such as a patient ID, the same in every process and on every machine
  (Python's hash() is salted per process): keys the augmentations and assigns patients to pipeline partitions."""
  return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1


def sha256_bytes(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk_bytes: int = 1 << 22) -> str:
  """The SHA-256 of a file's content, read in chunks (shards can be hundreds of MB)."""
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as handle:
    while True:
      chunk = handle.read(chunk_bytes)
      if not chunk:
        break
      digest.update(chunk)
  return digest.hexdigest()


def sha256_json(value: Any) -> str:
  """The SHA-256 of the canonical JSON form of `value`."""
  return sha256_bytes(canonical_json(value).encode("utf-8"))


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
  """Renders rows as CSV text with a header line."""
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(row)
  return buffer.getvalue()


def atomic_write_csv(path: str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
  """Writes a CSV file atomically."""
  atomic_write_text(path, csv_text(header, rows))


def read_csv(path: str) -> list[dict[str, str]]:
  """Reads a CSV file with a header into a list of dicts (all values are strings)."""
  with tf.io.gfile.GFile(path, "r") as handle:
    return list(csv.DictReader(io.StringIO(handle.read())))


def check_writable(folder: str) -> None:
  """Raises PermissionError-like PdxError early if `folder` cannot be created or written."""
  from pdx_tf.errors import PdxError  # pylint: disable=import-outside-toplevel

  try:
    tf.io.gfile.makedirs(folder)
    probe = join(folder, f"{TEMP_MARKER}write-probe-{uuid.uuid4().hex[:8]}")
    with tf.io.gfile.GFile(probe, "wb") as handle:
      handle.write(b"ok")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as error:
    raise PdxError(
        f"output folder {folder} is not writable ({type(error).__name__}); choose a folder you can write to"
    ) from None

