"""Batch-mixing benchmark: how well one epoch of `input_pipeline.train_examples` mixes patients at paper shape.

Writes a synthetic records folder with the paper's counts (227 patients, about 40 slices each, label share
--positive_share) but TINY images (8 px, a handful of distinct PNGs reused: the images do not matter here), in
the schema-2 block layout, takes the training patients of one cell of an 8-fold split (~199 patients) and reads
one epoch's metadata in training order. Reports, per batch of --batch_size:
  - distinct patients per batch (median, 5th percentile) vs uniform sampling's expectation (target median >= 24);
  - the share of single-class batches vs uniform sampling's p^B + (1-p)^B (target <= 1.5x), also at batch 4,
    where single-class batches are common enough to compare;
  - where the originals fall: their share in each tenth of the epoch (uniform: 10% each);
  - whether epoch 1's order differs from epoch 0's and epoch 0 reproduces.

  PYTHONPATH=. python benchmarks/batch_mix_benchmark.py
  PYTHONPATH=. python benchmarks/batch_mix_benchmark.py --augment_factor=32 --augment_block=16 --pool_fraction=0.5
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 227, "patients in the cohort (the paper: 227)")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 8, "folds (training patients: ~(1 - 1/folds) of the cohort)")
_MEAN_SLICES = flags.DEFINE_integer("mean_slices", 40, "mean slices per patient (drawn in [0.75, 1.25] x mean)")
_AUGMENT_FACTOR = flags.DEFINE_integer("augment_factor", 32, "augmented copies per slice")
_AUGMENT_BLOCK = flags.DEFINE_integer("augment_block", 16, "copies per block file")
_POOL_FRACTION = flags.DEFINE_float("pool_fraction", 0.5, "share of each slice's copies drawn")
_POSITIVE_SHARE = flags.DEFINE_float("positive_share", 0.7, "share of label-1 patients")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "batch size")
_SHUFFLE_BUFFER = flags.DEFINE_integer("shuffle_buffer", 4096, "local shuffle buffer (trainer default 4096)")
_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "where to write the records (default: a temp folder)")


def write_cohort(records_dir: str, *, num_patients: int, mean_slices: int, augment_factor: int, augment_block: int,
                 positive_share: float, seed: int = 0) -> None:
  """Writes a schema-2 records folder of tiny images with dataset.json (no reads of real data)."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf import io_utils  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import records  # pylint: disable=import-outside-toplevel

  rng = np.random.default_rng(seed)
  pngs = [records.encode_image(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)) for _ in range(4)]
  os.makedirs(os.path.join(records_dir, "original"), exist_ok=True)
  os.makedirs(os.path.join(records_dir, "augmented"), exist_ok=True)
  num_blocks = -(-augment_factor // augment_block)
  labels = rng.permutation(np.arange(num_patients) < round(positive_share * num_patients)).astype(int)
  patients, shards = [], []
  for index in range(num_patients):
    patient_id = f"p{index:03d}"
    slices = int(rng.integers(round(0.75 * mean_slices), round(1.25 * mean_slices) + 1))
    files = [("original", None, f"original/{patient_id}.tfrecord", [0])]
    files += [("augmented", block, f"augmented/{patient_id}-b{block:05d}-00000.tfrecord",
               range(block * augment_block + 1, min(augment_factor, (block + 1) * augment_block) + 1))
              for block in range(num_blocks)]
    for kind, block, relative, copies in files:
      path = os.path.join(records_dir, relative)
      count = 0
      with tf.io.TFRecordWriter(path) as writer:
        for slice_index in range(slices):
          for copy in copies:
            example = records.make_example(pngs[(slice_index + copy) % len(pngs)], image_size=16,
                                           patient_id=patient_id, slice_index=slice_index, z_mm=5.0 * slice_index,
                                           augmentation_index=copy, label_p=int(labels[index]), label_sb=0)
            writer.write(example.SerializeToString())
            count += 1
      shard = {"path": relative, "patient_id": patient_id, "kind": kind, "num_examples": count,
               "num_bytes": os.path.getsize(path), "sha256": ""}
      if block is not None:
        shard["block"] = block
      shards.append(shard)
    patients.append({"patient_id": patient_id, "label_p": int(labels[index]), "label_sb": 0, "covariates": {},
                     "num_slices": slices, "original_shards": [files[0][2]],
                     "augmented_shards": [file[2] for file in files[1:]], "num_original_examples": slices,
                     "num_augmented_examples": slices * augment_factor, "num_augmented_blocks": num_blocks})
  io_utils.atomic_write_json(os.path.join(records_dir, "dataset.json"), {
      "format": "pdx-tf-dataset", "schema_version": records.SCHEMA_VERSION, "preprocess": {"image_size": 16},
      "augment_factor": augment_factor, "augment_block": augment_block, "covariate_names": [],
      "patients": patients, "shards": shards})


def epoch_metadata(info, train_ids, *, epoch: int, shuffle_buffer: int):
  """(patient index, label, augmentation index) arrays of one epoch, in training order."""
  import numpy as np  # pylint: disable=import-outside-toplevel

  from pdx_tf.data import records  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import input_pipeline  # pylint: disable=import-outside-toplevel

  dataset = input_pipeline.train_examples(info, train_ids, sample_seed=0, repeat=0, epoch=epoch, shuffle_seed=1,
                                          pool_fraction=_POOL_FRACTION.value, shuffle_buffer=shuffle_buffer)
  dataset = dataset.map(lambda e: (e[records.PATIENT_ID_KEY], e[records.LABEL_P_KEY],
                                   e[records.AUGMENTATION_INDEX_KEY])).batch(65536)
  ids, labels, copies = [], [], []
  for batch_ids, batch_labels, batch_copies in dataset.as_numpy_iterator():
    ids.append(batch_ids)
    labels.append(batch_labels)
    copies.append(batch_copies)
  return np.concatenate(ids), np.concatenate(labels), np.concatenate(copies)


def mixing_report(ids, labels, copies, batch_size: int, num_train: int) -> list[str]:
  import numpy as np  # pylint: disable=import-outside-toplevel

  batches = len(ids) // batch_size
  distinct = np.array([len(set(ids[b * batch_size:(b + 1) * batch_size])) for b in range(batches)])
  expected_distinct = num_train * (1 - (1 - 1 / num_train) ** batch_size)
  lines = [f"batch {batch_size}: {batches} batches; distinct patients per batch median {np.median(distinct):.0f},"
           f" 5th percentile {np.percentile(distinct, 5):.0f}, mean {distinct.mean():.1f} (uniform sampling over"
           f" {num_train} patients: {expected_distinct:.1f})"]
  share = labels.mean()
  for size in (batch_size, 4):
    count = len(labels) // size
    sums = labels[:count * size].reshape(count, size).sum(axis=1)
    single = float(np.mean((sums == 0) | (sums == size)))
    expected = share ** size + (1 - share) ** size
    lines.append(f"batch {size}: single-class batches {single:.4%} vs uniform {expected:.4%}"
                 f" (ratio {single / expected:.2f}; positive share {share:.3f})")
  originals = np.flatnonzero(copies == 0) / len(copies)
  tenths = np.histogram(originals, bins=10, range=(0, 1))[0] / len(originals)
  lines.append("originals per tenth of the epoch: " + " ".join(f"{value:.1%}" for value in tenths)
               + f" (uniform 10% each; {len(originals)} originals of {len(copies)} images)")
  return lines


def main(argv):
  del argv
  from pdx_tf import contracts  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import input_pipeline, splits  # pylint: disable=import-outside-toplevel

  records_dir = _RECORDS_DIR.value or tempfile.mkdtemp(prefix="batch_mix_")
  if not os.path.exists(os.path.join(records_dir, "dataset.json")):
    start = time.perf_counter()
    write_cohort(records_dir, num_patients=_NUM_PATIENTS.value, mean_slices=_MEAN_SLICES.value,
                 augment_factor=_AUGMENT_FACTOR.value, augment_block=_AUGMENT_BLOCK.value,
                 positive_share=_POSITIVE_SHARE.value)
    print(f"wrote {records_dir} in {time.perf_counter() - start:.0f} s")
  info = contracts.load_dataset_info(records_dir)
  split = splits.make_splits(info.labels("p"), task="p", num_folds=_NUM_FOLDS.value, num_repeats=1, seed=0)
  train_ids, _ = splits.cell_patients(split, 0, 0)
  draw = dict(sample_seed=0, repeat=0, pool_fraction=_POOL_FRACTION.value)
  print(f"training patients: {len(train_ids)}; pool: {input_pipeline.pool_size(info, train_ids, **draw)} images"
        f" from {len(input_pipeline.pool_files(info, train_ids, **draw))} files")
  for buffer in (_SHUFFLE_BUFFER.value, 0):
    start = time.perf_counter()
    ids, labels, copies = epoch_metadata(info, train_ids, epoch=0, shuffle_buffer=buffer)
    print(f"-- shuffle_buffer {buffer} (epoch read in {time.perf_counter() - start:.1f} s)")
    for line in mixing_report(ids, labels, copies, _BATCH_SIZE.value, len(train_ids)):
      print(line)
  again, _, _ = epoch_metadata(info, train_ids, epoch=0, shuffle_buffer=_SHUFFLE_BUFFER.value)
  other, _, _ = epoch_metadata(info, train_ids, epoch=1, shuffle_buffer=_SHUFFLE_BUFFER.value)
  first, _, _ = epoch_metadata(info, train_ids, epoch=0, shuffle_buffer=_SHUFFLE_BUFFER.value)
  print(f"epoch 0 reproduces: {bool((again == first).all())}; epoch 1 differs in order: "
        f"{bool((other != first).any())}, same pool: {sorted(other.tolist()) == sorted(first.tolist())}")


if __name__ == "__main__":
  app.run(main)
