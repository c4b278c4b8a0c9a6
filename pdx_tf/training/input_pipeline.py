"""tf.data input for one cell: the training draw from the augmented pool, and the held-out originals.

Training reads only the training patients' shards (dataset.json lists each patient's files, so the held-out
patients' files are never opened), interleaved in parallel. Each augmented example enters a cell's training
set by a keyed draw, a pure function of (sample seed, repeat, patient, slice, augmentation index):

    keep  <=>  Fingerprint64("pdx-pool/<sample_seed>/<repeat>/<patient_id>/<slice_index>/<augmentation_index>")
               mod 2**30  <  pool_fraction * 2**30

(`tf.strings.to_hash_bucket_fast`, FarmHash Fingerprint64: stable across processes, machines and TF versions).
So repeat r of the grid trains on its own ~pool_fraction share of every training slice's augmented copies,
the same share in every fold of that repeat and on every rerun, with no state to store. The fold is not part
of the key, so patients shared by two folds of a repeat contribute the same copies to both. The originals
(augmentation index 0) of the training patients are always added unless `include_originals=False`: they are
the only real images in the pool. The training set is then shuffled (seeded), decoded, batched and prefetched.

Validation uses only the held-out patients' ORIGINAL shards, in file order, loaded into memory once (a fold of
originals is small), so predictions line up with (patient_id, slice_index).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
import tensorflow as tf

from pdx_tf.contracts import DatasetInfo
from pdx_tf.data import records
from pdx_tf.errors import RecordsError

POOL_HASH_BUCKETS = 1 << 30


def pool_keep(sample_seed: int, repeat: int, patient_id: tf.Tensor, slice_index: tf.Tensor,
              augmentation_index: tf.Tensor, pool_fraction: float) -> tf.Tensor:
  """The keyed pool draw (module docstring): bool, True if this augmented copy is in repeat `repeat`'s draw."""
  key = tf.strings.join([
      f"pdx-pool/{int(sample_seed)}/{int(repeat)}", patient_id,
      tf.strings.as_string(slice_index), tf.strings.as_string(augmentation_index)], separator="/")
  bucket = tf.strings.to_hash_bucket_fast(key, POOL_HASH_BUCKETS)
  return bucket < int(round(pool_fraction * POOL_HASH_BUCKETS))


def _parse_metadata(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  # The image stays PNG bytes until after the draw and the shuffle: decoding discarded copies would waste CPU.
  return records.parse_example(serialized, decode_image=False)


def train_examples(info: DatasetInfo, train_ids: Sequence[str], *, sample_seed: int, repeat: int,
                   pool_fraction: float, include_originals: bool = True, deterministic: bool = True,
                   cycle_length: int = 8) -> tf.data.Dataset:
  """Parsed (undecoded) training examples of one cell: the keyed pool draw plus the originals, unshuffled.

  Elements are `records.parse_example(..., decode_image=False)` dicts; only `train_ids`' files are read.
  """
  if not 0.0 <= pool_fraction <= 1.0:
    raise ValueError(f"pool_fraction must be in [0, 1], got {pool_fraction}")
  augmented = info.shard_paths(train_ids, "augmented")
  originals = info.shard_paths(train_ids, "original") if include_originals else []
  files = augmented + originals
  if not files:
    raise RecordsError(f"the training patients of repeat {repeat} have no shards in {info.records_dir}")
  options = tf.data.Options()
  options.deterministic = deterministic
  dataset = tf.data.Dataset.from_tensor_slices(files)
  dataset = dataset.interleave(tf.data.TFRecordDataset, cycle_length=min(cycle_length, len(files)),
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
  dataset = dataset.map(_parse_metadata, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)

  def keep(example):
    is_original = tf.equal(example[records.AUGMENTATION_INDEX_KEY], 0)
    drawn = pool_keep(sample_seed, repeat, example[records.PATIENT_ID_KEY], example[records.SLICE_INDEX_KEY],
                      example[records.AUGMENTATION_INDEX_KEY], pool_fraction)
    return tf.logical_or(tf.logical_and(is_original, include_originals), tf.logical_and(~is_original, drawn))

  return dataset.filter(keep).with_options(options)


def _to_model_inputs(task: str, image_size: int):
  label_key = records.label_key(task)

  def convert(example):
    image = tf.io.decode_png(example[records.IMAGE_KEY], channels=3)
    image = tf.cast(tf.reshape(image, [image_size, image_size, 3]), tf.float32)
    return image, tf.cast(tf.reshape(example[label_key], [1]), tf.float32)

  return convert


def train_dataset(info: DatasetInfo, train_ids: Sequence[str], *, task: str, sample_seed: int, repeat: int,
                  shuffle_seed: int, pool_fraction: float, batch_size: int, include_originals: bool = True,
                  shuffle_buffer: int = 4096, deterministic: bool = True,
                  drop_remainder: bool = False) -> tf.data.Dataset:
  """(image float32 [B,S,S,3] in 0..255, label float32 [B,1]) batches of one cell's training draw.

  The shuffle is seeded and reshuffles each epoch; one pass over the dataset is one epoch. With
  `deterministic=False` the interleave may yield records out of order (faster when files are slow).
  """
  dataset = train_examples(info, train_ids, sample_seed=sample_seed, repeat=repeat, pool_fraction=pool_fraction,
                           include_originals=include_originals, deterministic=deterministic)
  dataset = dataset.shuffle(shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
  dataset = dataset.map(_to_model_inputs(task, info.image_size), num_parallel_calls=tf.data.AUTOTUNE,
                        deterministic=deterministic)
  return dataset.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


@dataclasses.dataclass(frozen=True)
class ValidationSet:
  """The held-out fold's original slices, in memory, in file order."""

  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int [N]
  patient_ids: np.ndarray  # str [N]
  slice_indices: np.ndarray  # int [N]
  augmentation_indices: np.ndarray  # int [N], all 0

  def dataset(self, batch_size: int) -> tf.data.Dataset:
    images = tf.data.Dataset.from_tensor_slices(self.images).map(lambda image: tf.cast(image, tf.float32))
    labels = tf.data.Dataset.from_tensor_slices(self.labels.astype(np.float32)[:, np.newaxis])
    return tf.data.Dataset.zip((images, labels)).batch(batch_size).prefetch(tf.data.AUTOTUNE)


def load_validation(info: DatasetInfo, test_ids: Sequence[str], task: str) -> ValidationSet:
  """Loads the ORIGINAL slices of the held-out patients (augmented files are never opened).

  Raises:
    RecordsError: if an original shard holds an augmented example or another patient's slice.
  """
  label_key = records.label_key(task)
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
        labels.append(batch[label_key])
        patient_ids.extend(found_ids)
        slice_indices.append(batch[records.SLICE_INDEX_KEY])
        augmentation_indices.append(batch[records.AUGMENTATION_INDEX_KEY])
  if not images:
    raise RecordsError(f"the held-out patients {', '.join(test_ids)} have no original slices in {info.records_dir}")
  return ValidationSet(images=np.concatenate(images), labels=np.concatenate(labels).astype(np.int64),
                       patient_ids=np.asarray(patient_ids), slice_indices=np.concatenate(slice_indices),
                       augmentation_indices=np.concatenate(augmentation_indices))
