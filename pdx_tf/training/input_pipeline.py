"""tf.data input for one cell: one epoch of the training pool at a time, and the held-out originals.

The pool draw. The data pipeline lays every patient's augmented copies out in blocks (`pdx_tf.data.shards`:
block b holds copies [b * augment_block + 1, (b + 1) * augment_block] of every slice). A cell's pool is a pure
keyed function of (sample seed, repeat, patient, block): per training patient, its blocks are ranked by

    Fingerprint64("pdx-pool/<sample_seed>/<repeat>/<patient_id>/<block>")

(FarmHash, `tf.fingerprint`: stable across processes, machines and TF versions) and the first
round(pool_fraction * number of blocks) are drawn (half up, at least one when pool_fraction > 0). So
`pool_fraction` is, to one block, the share of every training slice's augmented copies that repeat r trains on,
the same in every fold of that repeat and on every rerun, with nothing stored; the fold is not part of the key,
so a patient shared by two folds of a repeat contributes the same blocks to both. The training patients'
originals (the only real images) are added unless `include_originals=False`. A cell opens only its patients'
originals files and drawn block files (`pool_files`), so the bytes it reads are the bytes it trains on
(`bytes_to_read`, `pool_size` answer from dataset.json alone).

The epoch's order, a pure function of (sample seed, repeat, epoch, shuffle seed): every pool file is opened and
the next record is taken from a file chosen by a keyed random permutation of the multiset "file f, num_examples(f)
times" (`tf.data.Dataset.choose_from_datasets`). Every file's records, the originals included, are thus spread
uniformly over the epoch, and a batch holds records of about as many patients as uniform sampling would give
(benchmarks/batch_mix_benchmark.py). A seeded local shuffle then separates records of one file that land close
together (a file holds a slice's copies next to each other). Each epoch has its own permutation; the same epoch
is the same order on every call. `images_per_epoch` keeps a keyed uniform sample of that many positions.

Validation uses only the held-out patients' ORIGINAL shards, in file order, loaded into memory once (a fold of
originals is small), so predictions line up with (patient_id, slice_index).

2.5D input (`context_slices` C > 0) and attention-MIL bags. The records hold one-channel slices, and augmented
copy a of slice s was warped with its own key (seed, patient, s, a), so the stored copies of neighbouring slices
are not geometrically consistent and cannot be stacked. Instead the stack is built at read time from the
patient's ORIGINAL slices (`load_patient_stacks`, with `preprocess.context_stack`: the function serving and
`predict` use), and the pool record (patient, s, a) drawn as now only names which stack and which augmentation:
the stack is warped with `augment.random_parameters(seed, patient, s, a)` (the records' seed and ranges), the SAME
keyed parameters for every channel. So the centre channel has the geometry of the stored copy a of slice s, and
the pool draw, the epoch order and the keys are unchanged. The warp acts on windowed pixels rather than on HU
(the records keep no HU): bilinear interpolation commutes with the linear part of the window and differs only
where neighbouring pixels straddle a window edge; the area outside reads as air's windowed value. A cell holds
its training patients' stacks in memory (uint8, (2C+1) bytes a pixel: about 1.5 GB for 10,000 224 px slices at
C=1). With C = 0 and the slice head nothing of this runs: the stored copies are decoded as before.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import contracts, io_utils
from pdx_tf.contracts import DatasetInfo
from pdx_tf.data import augment, preprocess, records
from pdx_tf.errors import RecordsError
from pdx_tf.training import region_bands

def _round_half_up(value: float) -> int:
  return int(math.floor(value + 0.5))


def block_fingerprints(keys: Sequence[str]) -> list[int]:
  """FarmHash Fingerprint64 of each key, as an unsigned int (`tf.fingerprint`, stable across TF versions)."""
  if not keys:
    return []
  digests = tf.fingerprint(tf.constant(list(keys)), method="farmhash64").numpy()
  return [int.from_bytes(bytes(digest), "little") for digest in digests]


def pool_keep(sample_seed: int, repeat: int, patient_id: str, blocks: Sequence[int], pool_fraction: float) -> list[int]:
  """The keyed pool draw of one patient (module docstring): the drawn blocks among `blocks`, sorted.

  Ranks the blocks by Fingerprint64("pdx-pool/<sample_seed>/<repeat>/<patient_id>/<block>") and keeps the first
  round(pool_fraction * len(blocks)) (half up; at least one when pool_fraction > 0).
  """
  if not 0.0 <= pool_fraction <= 1.0:
    raise ValueError(f"pool_fraction must be in [0, 1], got {pool_fraction}")
  blocks = sorted(set(int(block) for block in blocks))
  if pool_fraction == 0.0 or not blocks:
    return []
  count = min(len(blocks), max(1, _round_half_up(pool_fraction * len(blocks))))
  keys = [f"pdx-pool/{int(sample_seed)}/{int(repeat)}/{patient_id}/{block}" for block in blocks]
  ranked = sorted(zip(block_fingerprints(keys), blocks))
  return sorted(block for _, block in ranked[:count])


def _patient_shards(info: DatasetInfo) -> dict[str, list[Mapping[str, Any]]]:
  """dataset.json's shard entries by patient_id, in the order each patient lists its files."""
  by_path = {shard["path"]: shard for shard in info.document.get("shards", [])}
  result = {}
  for patient_id, entry in info.patients.items():
    result[patient_id] = [by_path[path] for field in ("original_shards", "augmented_shards")
                          for path in entry.get(field, [])]
  return result


def pool_shards(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int, pool_fraction: float,
                include_originals: bool = True) -> list[Mapping[str, Any]]:
  """The dataset.json shard entries a cell's pool is made of: per patient (in `train_ids` order) its originals
  file (unless `include_originals=False`) and every part of its drawn blocks. Nothing is read but dataset.json.

  Raises:
    RecordsError: an augmented shard has no `block` (records older than schema version 2).
  """
  by_patient = _patient_shards(info)
  chosen = []
  for patient_id in train_ids:
    entries = by_patient[patient_id]
    augmented = [shard for shard in entries if shard.get("kind") == "augmented"]
    if any("block" not in shard for shard in augmented):
      raise RecordsError(f"{info.records_dir}/dataset.json lists augmented shards of patient {patient_id} without"
                         " a block index; rebuild the records with `python -m data_pipeline` from this version")
    drawn = set(pool_keep(sample_seed, repeat, patient_id, [shard["block"] for shard in augmented], pool_fraction))
    if include_originals:
      chosen.extend(shard for shard in entries if shard.get("kind") == "original")
    chosen.extend(shard for shard in augmented if shard["block"] in drawn)
  return chosen


def pool_files(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int, pool_fraction: float,
               include_originals: bool = True) -> list[str]:
  """Absolute paths of the files one pass over the cell's pool opens (see `pool_shards`)."""
  return [io_utils.join(info.records_dir, shard["path"]) for shard in pool_shards(
      info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
      include_originals=include_originals)]


def pool_size(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int, pool_fraction: float,
              include_originals: bool = True) -> int:
  """Images in the cell's drawn pool (originals included unless `include_originals=False`), from dataset.json."""
  return sum(int(shard["num_examples"]) for shard in pool_shards(
      info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
      include_originals=include_originals))


def bytes_to_read(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int,
                  pool_fraction: float, include_originals: bool = True, epoch: int = 0,
                  images_per_epoch: int | None = None) -> int:
  """Bytes of the shard files one epoch opens (`epoch_shards`; the whole pool by default), from dataset.json."""
  return sum(int(shard["num_bytes"]) for shard in epoch_shards(
      info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
      include_originals=include_originals, epoch=epoch, images_per_epoch=images_per_epoch))


def epoch_shards(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int,
                 pool_fraction: float, include_originals: bool = True, epoch: int = 0,
                 images_per_epoch: int | None = None) -> list[Mapping[str, Any]]:
  """The pool files one epoch opens: the whole pool, or, when `images_per_epoch` is smaller, just enough of it.

  An epoch smaller than the pool reads whole files in rounds: each round takes one more file of every training
  patient (its originals file or a drawn block part, in a keyed order per patient and epoch), patients in a keyed
  order, until the files hold `images_per_epoch` images. So an epoch reads about what it trains on (at most one
  file more) and spreads over the patients evenly, where sampling records from the whole pool would open every
  file for a small share of it. Keys: Fingerprint64("pdx-epoch/<seed>/<repeat>/<epoch>/<file path>") for files,
  ".../patient/<patient_id>" for patients; a pure function of (seed, repeat, epoch) and the records.
  """
  pool = pool_shards(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                     include_originals=include_originals)
  total = sum(int(shard["num_examples"]) for shard in pool)
  if images_per_epoch is None or int(images_per_epoch) >= total:
    return pool
  prefix = f"pdx-epoch/{int(sample_seed)}/{int(repeat)}/{int(epoch)}"
  by_patient: dict[str, list[Mapping[str, Any]]] = {}
  for shard in pool:
    by_patient.setdefault(shard["patient_id"], []).append(shard)
  for patient_id, files in by_patient.items():
    keys = block_fingerprints([f"{prefix}/{shard['path']}" for shard in files])
    ranked = sorted(zip(keys, files), key=lambda pair: (pair[0], pair[1]["path"]))
    by_patient[patient_id] = [shard for _, shard in ranked]
  patients = sorted(by_patient)
  patients = [patient for _, patient in sorted(zip(block_fingerprints([f"{prefix}/patient/{p}" for p in patients]),
                                                   patients))]
  chosen, count, round_index = [], 0, 0
  while count < int(images_per_epoch):
    for patient_id in patients:
      files = by_patient[patient_id]
      if round_index < len(files):
        chosen.append(files[round_index])
        count += int(files[round_index]["num_examples"])
        if count >= int(images_per_epoch):
          break
    round_index += 1
  return chosen


def _epoch_rng(purpose: int, sample_seed: int, repeat: int, epoch: int, shuffle_seed: int,
               extra: int = 0) -> np.random.Generator:
  # One generator per (purpose, keys): the epoch's order is a pure function of its keys, not of earlier epochs.
  return np.random.default_rng([purpose, int(sample_seed), int(repeat), int(epoch), int(shuffle_seed), int(extra)])


def _parse_metadata(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  # The image stays PNG bytes until after the shuffle (decoding is the costly step, done in parallel after it).
  return records.parse_example(serialized, decode_image=False)


def _first(serialized: tf.Tensor, kept: tf.Tensor) -> tf.Tensor:
  del kept
  return serialized


def _second(serialized: tf.Tensor, kept: tf.Tensor) -> tf.Tensor:
  del serialized
  return kept


@functools.lru_cache(maxsize=8192)
def _record_stream(path: str) -> tf.data.Dataset:
  """One file's records, as a dataset built once a process.

  Building a TFRecordDataset costs about 15 ms of Python (it traces a flat_map function), and every epoch of every
  cell opens its pool files afresh: in the demo (35 patients, 2 files each, 5 epochs, 8 cells) that was 2,800
  builds, the largest Python cost after tracing the model. A dataset is a description, read from the start by
  every iterator, so one object serves every epoch and cell that opens the file.
  """
  return tf.data.TFRecordDataset(path)


def _one_pass(files: Sequence[str], counts: Sequence[int], rng: np.random.Generator) -> tf.data.Dataset:
  """Every record of `files` once, each file's records spread uniformly over the pass (keyed by `rng`)."""
  choices = rng.permutation(np.repeat(np.arange(len(files), dtype=np.int64), counts))
  streams = [_record_stream(path) if tf.executing_eagerly() else tf.data.TFRecordDataset(path) for path in files]
  return tf.data.Dataset.choose_from_datasets(streams, tf.data.Dataset.from_tensor_slices(choices),
                                              stop_on_empty_dataset=False)


def train_examples(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int,
                   pool_fraction: float, include_originals: bool = True, epoch: int = 0, shuffle_seed: int = 0,
                   images_per_epoch: int | None = None, shuffle_buffer: int = 4096, deterministic: bool = True,
                   cycle_length: int | None = None) -> tf.data.Dataset:
  """Parsed (undecoded) training examples of one epoch of one cell, in training order.

  Elements are `records.parse_example(..., decode_image=False)` dicts. Only the epoch's files are opened
  (`epoch_shards`: the training patients' originals and drawn blocks, or just enough of them for a smaller
  `images_per_epoch`). The order (module docstring) is a pure
  function of (sample_seed, repeat, epoch, shuffle_seed) and the records.

  Args:
    info, train_ids: the records and the cell's training patients.
    sample_seed, repeat, pool_fraction, include_originals: the pool draw (`pool_shards`).
    epoch, shuffle_seed: key the epoch's order.
    images_per_epoch: None for the whole pool once; otherwise that many images: a keyed uniform sample of the
      epoch's files (`epoch_shards`), or, when larger than the pool, whole passes over it plus a sample of one more.
    shuffle_buffer: size of the final local shuffle (0 or 1: none).
    deterministic: False lets the parse map run out of order.
    cycle_length: accepted for compatibility, unused (every pool file is read at once).
  """
  del cycle_length
  pool = epoch_shards(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                      include_originals=include_originals, epoch=epoch, images_per_epoch=images_per_epoch)
  files = [io_utils.join(info.records_dir, shard["path"]) for shard in pool]
  counts = [int(shard["num_examples"]) for shard in pool]
  total = sum(counts)
  if not total:
    raise RecordsError(f"the training patients of repeat {repeat} have no images in their drawn pool in"
                       f" {info.records_dir} (pool_fraction {pool_fraction}, include_originals {include_originals})")
  passes = 1 if images_per_epoch is None else max(1, -(-int(images_per_epoch) // total))
  dataset = _one_pass(files, counts, _epoch_rng(1, sample_seed, repeat, epoch, shuffle_seed, 0))
  for index in range(1, passes):
    dataset = dataset.concatenate(_one_pass(files, counts, _epoch_rng(1, sample_seed, repeat, epoch, shuffle_seed,
                                                                      index)))
  if images_per_epoch is not None and int(images_per_epoch) < passes * total:
    # Whole passes, then a keyed uniform sample of the last pass's positions (its order is already random).
    rng = _epoch_rng(2, sample_seed, repeat, epoch, shuffle_seed)
    keep = np.zeros(passes * total, bool)
    keep[:(passes - 1) * total] = True
    keep[(passes - 1) * total + rng.choice(total, int(images_per_epoch) - (passes - 1) * total, replace=False)] = True
    dataset = tf.data.Dataset.zip((dataset, tf.data.Dataset.from_tensor_slices(keep)))
    dataset = dataset.filter(_second).map(_first)
  if shuffle_buffer and shuffle_buffer > 1:
    # Records of one file come in file order (a slice's copies, then the next slice); a local shuffle separates
    # the few that the spread above puts close together.
    seed = int(_epoch_rng(3, sample_seed, repeat, epoch, shuffle_seed).integers(1 << 31))
    dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
  options = tf.data.Options()
  options.deterministic = deterministic
  dataset = dataset.map(_parse_metadata, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  return dataset.with_options(options)


def label_vector(example: Mapping[str, tf.Tensor], task: str) -> tf.Tensor:
  """A parsed record's training target, float32 [T]: [label] for "p" or "sb", [label_p, label_sb] for "p,sb",
  and for "regions" the record's 13 region labels (its PCI score > 0: 1, = 0: 0, not recorded: -1, masked out of
  the loss). The record's scores are as its image shows them (mirrored in a flipped copy), so nothing is
  mirrored here."""
  if task == contracts.PCI_TASK:
    return region_labels(example[records.PCI_SCORES_KEY])
  keys = [records.label_key(name) for name in contracts.task_list(task)]
  return tf.cast(tf.stack([tf.reshape(example[key], []) for key in keys]), tf.float32)


def region_labels(scores) -> tf.Tensor:
  """PCI scores [..., 13] (0-3, -1 unrecorded) -> float32 region labels: 1 (score > 0), 0 (score 0), -1."""
  scores = tf.cast(scores, tf.float32)
  return tf.where(scores < 0, tf.constant(-1.0), tf.cast(scores > 0, tf.float32))


def slice_counts_table(info: DatasetInfo) -> tf.lookup.StaticHashTable:
  """patient_id -> the patient's number of abdominal slices (dataset.json's num_slices; -1 for an unknown id)."""
  ids = sorted(info.patients)
  return tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
      tf.constant(ids, tf.string), tf.constant([int(info.patients[i]["num_slices"]) for i in ids], tf.int64)), -1)


def banded_region_labels(example: Mapping[str, tf.Tensor], slice_counts: tf.lookup.StaticHashTable) -> tf.Tensor:
  """`label_vector` for "regions" with `train --region_bands`: a region whose band (pdx_tf.training.region_bands)
  does not hold this slice is -1 (masked out of the loss), whatever the patient's label."""
  labels = region_labels(example[records.PCI_SCORES_KEY])
  count = slice_counts.lookup(tf.reshape(example[records.PATIENT_ID_KEY], []))
  keep = region_bands.band_mask_tf(tf.reshape(example[records.SLICE_INDEX_KEY], []), count)
  return tf.where(keep, labels, tf.constant(-1.0))


def _to_model_inputs(task: str, image_size: int, slice_counts: tf.lookup.StaticHashTable | None = None):
  def convert(example):
    # channels=3 tiles a one-channel (one-window) PNG to RGB: the model input is always [S, S, 3].
    image = tf.io.decode_png(example[records.IMAGE_KEY], channels=3)
    image = tf.cast(tf.reshape(image, [image_size, image_size, 3]), tf.float32)
    if slice_counts is not None:
      return image, banded_region_labels(example, slice_counts)
    return image, label_vector(example, task)

  return convert


def train_dataset(info: DatasetInfo, train_ids: Sequence[str], *, task: str, sample_seed: int, repeat: int,
                  shuffle_seed: int, pool_fraction: float, batch_size: int, epoch: int = 0,
                  include_originals: bool = True, images_per_epoch: int | None = None, shuffle_buffer: int = 4096,
                  deterministic: bool = True, drop_remainder: bool = True,
                  region_bands: bool = False) -> tf.data.Dataset:
  """(image float32 [B,S,S,3] in 0..255, label float32 [B,T]) batches of ONE epoch of one cell (finite); T is 1,
  or 2 for the joint task (`label_vector`), 13 for "regions" (`banded_region_labels` when `region_bands`).

  A pure function of (sample_seed, repeat, epoch, shuffle_seed) and the records (`train_examples`): calling it
  again with the same arguments yields the same batches in the same order (with `deterministic=True`); call it
  once per epoch with that epoch's number. `images_per_epoch` (None: the whole pool once) is rounded down to
  whole batches when `drop_remainder`.
  """
  if images_per_epoch is not None:
    if images_per_epoch < batch_size:
      raise ValueError(f"images_per_epoch ({images_per_epoch}) must be at least batch_size ({batch_size})")
    if drop_remainder:
      images_per_epoch = images_per_epoch // batch_size * batch_size
  dataset = train_examples(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                           include_originals=include_originals, epoch=epoch, shuffle_seed=shuffle_seed,
                           images_per_epoch=images_per_epoch, shuffle_buffer=shuffle_buffer,
                           deterministic=deterministic)
  if region_bands and task != contracts.PCI_TASK:
    raise ValueError(f"region_bands applies to --task={contracts.PCI_TASK}, not {task}")
  slice_counts = slice_counts_table(info) if region_bands else None
  dataset = dataset.map(_to_model_inputs(task, info.image_size, slice_counts), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=deterministic)
  return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class ValidationSet:
  """The held-out fold's original slices, in memory, in file order."""

  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int [N]; [N, 2] (p, sb) for the joint task; [N, 13] (1, 0, -1 unrecorded) for regions
  patient_ids: np.ndarray  # str [N]
  slice_indices: np.ndarray  # int [N]
  augmentation_indices: np.ndarray  # int [N], all 0

  def dataset(self, batch_size: int) -> tf.data.Dataset:
    images = tf.data.Dataset.from_tensor_slices(self.images).map(lambda image: tf.cast(image, tf.float32))
    labels = self.labels.astype(np.float32)
    labels = tf.data.Dataset.from_tensor_slices(labels[:, np.newaxis] if labels.ndim == 1 else labels)
    return tf.data.Dataset.zip((images, labels)).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_validation(info: DatasetInfo, test_ids: Sequence[str], task: str) -> ValidationSet:
  """Loads the ORIGINAL slices of the held-out patients (augmented files are never opened); `task` "p,sb" loads
  both labels as columns.

  Raises:
    RecordsError: if an original shard holds an augmented example or another patient's slice.
  """
  label_keys = [] if task == contracts.PCI_TASK else [records.label_key(name) for name in contracts.task_list(task)]
  images, labels, patient_ids, slice_indices, augmentation_indices = [], [], [], [], []
  for patient_id in test_ids:
    for path in info.shard_paths([patient_id], "original"):
      batches = tf.data.TFRecordDataset(path).map(records.parse_example).batch(1024)
      for batch in batches.as_numpy_iterator():
        found_ids = [value.decode("utf-8") for value in batch[records.PATIENT_ID_KEY]]
        wrong = [index for index, found in enumerate(found_ids)
                 if found != patient_id or batch[records.AUGMENTATION_INDEX_KEY][index] != 0]
        if wrong:
          index = wrong[0]
          raise RecordsError(f"{path} holds patient {found_ids[index]} augmentation"
                             f" {int(batch[records.AUGMENTATION_INDEX_KEY][index])}; original shards must hold"
                             f" only patient {patient_id}'s originals: rebuild the records")
        if batch[records.IMAGE_KEY].shape[1] != info.image_size:
          raise RecordsError(f"{path} holds {batch[records.IMAGE_KEY].shape[1]} px images, dataset.json says"
                             f" {info.image_size}; rebuild the records")
        images.append(batch[records.IMAGE_KEY])
        if task == contracts.PCI_TASK:
          labels.append(region_labels(batch[records.PCI_SCORES_KEY]).numpy())
        else:
          labels.append(batch[label_keys[0]] if task != contracts.JOINT_TASK
                        else np.stack([batch[key] for key in label_keys], axis=-1))
        patient_ids.extend(found_ids)
        slice_indices.append(batch[records.SLICE_INDEX_KEY])
        augmentation_indices.append(batch[records.AUGMENTATION_INDEX_KEY])
  if not images:
    raise RecordsError(f"the held-out patients {', '.join(test_ids)} have no original slices in {info.records_dir}")
  return ValidationSet(images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64),
                       patient_ids=np.asarray(patient_ids), slice_indices=np.concatenate(slice_indices),
                       augmentation_indices=np.concatenate(augmentation_indices))


# ------------------------------------------------------------------------------- 2.5D stacks and MIL bags


@dataclasses.dataclass(frozen=True)
class PatientStacks:
  """Some patients' original slices as model inputs (module docstring), in memory, patient by patient in slice
  order: `images[starts[p]:starts[p] + counts[p]]` are patient p's slices 0..n-1."""

  images: np.ndarray  # uint8 [M, S, S, channels]: 2C+1 adjacent slices, or the 3 stored channels when C = 0
  labels: dict[str, Any]  # the task label; for the joint task the pair (label_p, label_sb)
  starts: dict[str, int]
  counts: dict[str, int]
  context_slices: int
  seed: int
  augment_config: augment.AugmentConfig
  fill_value: float  # air (-1000 HU) after the records' window

  def rows(self, patient_id: str) -> np.ndarray:
    return np.arange(self.starts[patient_id], self.starts[patient_id] + self.counts[patient_id])


def stacks_from_validation(validation: "ValidationSet", context_slices: int) -> np.ndarray:
  """The validation images as model inputs: each patient's slices stacked by `preprocess.context_stack` in slice
  order, at the rows they hold (so predictions still line up with (patient_id, slice_index))."""
  if context_slices == 0:
    return validation.images
  out = np.zeros(validation.images.shape[:3] + (preprocess.model_channels(context_slices),), np.uint8)
  for patient_id in dict.fromkeys(validation.patient_ids.tolist()):
    rows = np.flatnonzero(validation.patient_ids == patient_id)
    rows = rows[np.argsort(validation.slice_indices[rows], kind="stable")]
    out[rows] = preprocess.context_stack(tf.constant(validation.images[rows]), context_slices).numpy()
  return out


def _fill_value(info: DatasetInfo) -> float:
  """Air (-1000 HU) after the records' first window, on the uint8 grid: what a warp's uncovered corners hold."""
  center, width = info.preprocess_config.windows[0]
  return float(np.round(np.clip((preprocess.AIR_HU - (center - width / 2.0)) / width, 0.0, 1.0) * 255.0))


def load_patient_stacks(info: DatasetInfo, patient_ids: Sequence[str], task: str,
                        context_slices: int) -> PatientStacks:
  """The patients' original slices, stacked with `preprocess.context_stack` (C > 0) or as stored (C = 0).

  The records' windows and `context_slices` were checked together where the grid config met the records
  (trainer's hand-off check, `preprocess.check_context_windows`, once a run_grid).

  Raises:
    RecordsError: as `load_validation`, or a patient whose slice indices are not 0..n-1.
  """
  validation = load_validation(info, patient_ids, task)
  images, starts, counts, labels, start = [], {}, {}, {}, 0
  for patient_id in patient_ids:
    rows = np.flatnonzero(validation.patient_ids == patient_id)
    rows = rows[np.argsort(validation.slice_indices[rows], kind="stable")]
    if not np.array_equal(validation.slice_indices[rows], np.arange(rows.size)):
      raise RecordsError(f"patient {patient_id}'s original slices in {info.records_dir} are not slices 0..n-1;"
                         " rebuild the records")
    images.append(preprocess.context_stack(tf.constant(validation.images[rows]), context_slices).numpy())
    label = validation.labels[rows[0]]
    starts[patient_id], counts[patient_id] = start, rows.size
    labels[patient_id] = int(label) if np.ndim(label) == 0 else tuple(int(value) for value in label)
    start += rows.size
  return PatientStacks(images=np.concatenate(images), labels=labels, starts=starts, counts=counts,
                       context_slices=context_slices, seed=info.augment_settings.seed,
                       augment_config=info.augment_settings.config, fill_value=_fill_value(info))


def augment_transforms(stacks: PatientStacks, patient_id: str, slice_indices: Sequence[int],
                       augmentation_index: int) -> np.ndarray:
  """float32 [len(slice_indices), 8] projective transforms: copy `augmentation_index` of each slice, keyed as the
  records' copies (`augment.random_transform`); the identity for the original (index 0)."""
  size = stacks.images.shape[1]
  if augmentation_index == 0:
    return np.tile(np.asarray([1, 0, 0, 0, 1, 0, 0, 0], np.float32), (len(slice_indices), 1))
  return np.asarray([augment.random_transform(stacks.seed, patient_id, int(slice_index), int(augmentation_index),
                                              stacks.augment_config, size)
                     for slice_index in slice_indices], np.float32)


def warp_stacks(images: tf.Tensor, transforms: tf.Tensor, fill_value: float) -> tf.Tensor:
  """Warps float [K, S, S, C] stacks, each with its own transform [K, 8] applied to all its channels; rounds to
  the uint8 grid (float32 0..255) like the stored copies."""
  images = tf.cast(images, tf.float32)
  size = tf.shape(images)[1:3]
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=images, transforms=tf.cast(transforms, tf.float32), output_shape=size,
      fill_value=tf.constant(fill_value, tf.float32), interpolation="BILINEAR", fill_mode="CONSTANT")
  return tf.round(tf.clip_by_value(warped, 0.0, 255.0))


def _stack_inputs(task: str, stacks: PatientStacks):
  """(patient, slice, augmentation index) of a parsed pool record -> (its warped stack, label [T])."""
  images = tf.constant(stacks.images)
  channels = stacks.images.shape[-1]
  size = stacks.images.shape[1]
  keys = tf.constant([f"{patient_id}/{index}" for patient_id in stacks.starts for index in
                      range(stacks.counts[patient_id])])
  rows = tf.range(stacks.images.shape[0], dtype=tf.int64)
  table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(keys, rows), default_value=-1)

  def transform(patient_id, slice_index, augmentation_index):
    return augment_transforms(stacks, patient_id.decode("utf-8"), [int(slice_index)], int(augmentation_index))[0]

  def convert(example):
    patient_id = example[records.PATIENT_ID_KEY]
    slice_index = tf.cast(example[records.SLICE_INDEX_KEY], tf.int64)
    augmentation_index = tf.cast(example[records.AUGMENTATION_INDEX_KEY], tf.int64)
    row = table.lookup(tf.strings.join([patient_id, tf.strings.as_string(slice_index)], separator="/"))
    stack = tf.gather(images, tf.maximum(row, 0))[tf.newaxis]
    matrix = tf.numpy_function(transform, [patient_id, slice_index, augmentation_index], tf.float32)
    image = warp_stacks(stack, tf.reshape(matrix, [1, 8]), stacks.fill_value)[0]
    image = tf.ensure_shape(image, [size, size, channels])
    return image, label_vector(example, task)

  return convert


def stack_train_dataset(info: DatasetInfo, train_ids: Sequence[str], stacks: PatientStacks, *, task: str,
                        sample_seed: int, repeat: int, shuffle_seed: int, pool_fraction: float, batch_size: int,
                        epoch: int = 0, include_originals: bool = True, images_per_epoch: int | None = None,
                        shuffle_buffer: int = 4096, deterministic: bool = True) -> tf.data.Dataset:
  """`train_dataset` with 2.5D stacks (module docstring): the same records in the same order, each turned into
  its patient's stack of slice s warped with the keyed parameters of copy a. float32 [B, S, S, 2C+1] batches."""
  if images_per_epoch is not None:
    images_per_epoch = images_per_epoch // batch_size * batch_size
  dataset = train_examples(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                           include_originals=include_originals, epoch=epoch, shuffle_seed=shuffle_seed,
                           images_per_epoch=images_per_epoch, shuffle_buffer=shuffle_buffer,
                           deterministic=deterministic)
  dataset = dataset.map(_stack_inputs(task, stacks), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=deterministic)
  return dataset.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def bag_slices(count: int, max_slices: int) -> np.ndarray:
  """The slices of an n-slice patient in a training bag of at most `max_slices` (0: all): evenly spaced."""
  if not max_slices or count <= max_slices:
    return np.arange(count)
  return np.unique(np.round(np.linspace(0, count - 1, max_slices)).astype(np.int64))


def mil_bag(stacks: PatientStacks, patient_id: str, augmentation_index: int,
            max_slices: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """One bag: float32 [K, S, S, C] (copy `augmentation_index` of each chosen slice's stack, keyed per slice as
  the records' copies) and the mask [K] of ones."""
  chosen = bag_slices(stacks.counts[patient_id], max_slices)
  images = stacks.images[stacks.rows(patient_id)[chosen]]
  if augmentation_index == 0:
    bag = images.astype(np.float32)
  else:
    bag = warp_stacks(tf.constant(images), augment_transforms(stacks, patient_id, chosen, augmentation_index),
                      stacks.fill_value).numpy()
  return bag, np.ones(len(chosen), np.float32)


def mil_pairs(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int, pool_fraction: float,
              include_originals: bool = True) -> list[tuple[str, int]]:
  """(patient, augmentation index) of every bag of a cell's pool: the originals (index 0) unless excluded, and
  every copy in the patient's drawn blocks (`pool_shards`' draw)."""
  factor, block = info.augment_settings.augment_factor, info.augment_settings.augment_block
  pairs = []
  for shard in pool_shards(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                           include_originals=include_originals):
    if shard.get("kind") == "original":
      pairs.append((shard["patient_id"], 0))
    else:
      first = int(shard["block"]) * block + 1
      pairs.extend((shard["patient_id"], index) for index in range(first, min(factor, first + block - 1) + 1))
  return list(dict.fromkeys(pairs))  # a block split into several part files lists its copies once


def mil_train_dataset(info: DatasetInfo, train_ids: Sequence[str], stacks: PatientStacks, *, sample_seed: int,
                      repeat: int, shuffle_seed: int, pool_fraction: float, bags_per_batch: int, epoch: int = 0,
                      include_originals: bool = True, bags_per_epoch: int | None = None,
                      max_slices: int = 0) -> tf.data.Dataset:
  """((bag [B, K, S, S, C], mask [B, K]), label [B, 1]) batches of one epoch of attention-MIL training.

  The bags are the pool's (patient, copy) pairs (`mil_pairs`) in a keyed permutation of (sample_seed, repeat,
  epoch, shuffle_seed); `bags_per_epoch` keeps a keyed sample (or repeats the pairs) of that many. Bags of one
  batch are padded with zero slices of mask 0 to the longest.
  """
  pairs = mil_pairs(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                    include_originals=include_originals)
  if not pairs:
    raise RecordsError(f"the training patients of repeat {repeat} have no bags in their drawn pool")
  rng = _epoch_rng(4, sample_seed, repeat, epoch, shuffle_seed)
  wanted = bags_per_epoch or len(pairs)
  order = np.concatenate([rng.permutation(len(pairs)) for _ in range(-(-wanted // len(pairs)))])[:wanted]
  order = order[:len(order) // bags_per_batch * bags_per_batch]
  size, channels = stacks.images.shape[1], stacks.images.shape[-1]

  def bags():
    for index in order:
      patient_id, augmentation_index = pairs[int(index)]
      bag, mask = mil_bag(stacks, patient_id, augmentation_index, max_slices)
      yield (bag, mask), np.asarray([stacks.labels[patient_id]], np.float32)

  signature = ((tf.TensorSpec([None, size, size, channels], tf.float32), tf.TensorSpec([None], tf.float32)),
               tf.TensorSpec([1], tf.float32))
  dataset = tf.data.Dataset.from_generator(bags, output_signature=signature)
  return dataset.padded_batch(bags_per_batch, drop_remainder=True).prefetch(2)


def mil_validation_dataset(stacks: PatientStacks, patient_ids: Sequence[str]) -> tf.data.Dataset:
  """One bag of ALL of each patient's original slices, one patient a batch, in `patient_ids` order."""

  def bags():
    for patient_id in patient_ids:
      bag, mask = mil_bag(stacks, patient_id, 0)
      yield (bag[np.newaxis], mask[np.newaxis]), np.asarray([[stacks.labels[patient_id]]], np.float32)

  size, channels = stacks.images.shape[1], stacks.images.shape[-1]
  signature = ((tf.TensorSpec([1, None, size, size, channels], tf.float32), tf.TensorSpec([1, None], tf.float32)),
               tf.TensorSpec([1, 1], tf.float32))
  return tf.data.Dataset.from_generator(bags, output_signature=signature)
