"""Tests of pdx_tf.training.input_pipeline: dataset.json checks, the keyed pool draw, and leakage of the real datasets."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import fake_records
from pdx_tf import contracts
from pdx_tf.data import records
from pdx_tf.errors import RecordsError
from pdx_tf.training import input_pipeline, splits

NUM_PATIENTS, SLICES, AUGMENT_FACTOR, SIZE = 8, 3, 4, 32


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("records"))
  fake_records.write_fake_records(folder, num_patients=NUM_PATIENTS, slices_per_patient=SLICES,
                                  augment_factor=AUGMENT_FACTOR, image_size=SIZE)
  return folder


@pytest.fixture(scope="module")
def info(records_dir):
  return contracts.load_dataset_info(records_dir, expected_image_size=SIZE, verify_hashes=True)


def _keys(dataset):
  return [(example[records.PATIENT_ID_KEY].decode(), int(example[records.SLICE_INDEX_KEY]),
           int(example[records.AUGMENTATION_INDEX_KEY])) for example in dataset.as_numpy_iterator()]


def test_load_dataset_info(info, records_dir):
  assert list(info.patients) == fake_records.patient_ids(NUM_PATIENTS)
  assert info.image_size == SIZE and info.covariate_names == ("site",)
  assert info.labels("p")["fake000"] == 1 and info.labels("p")["fake001"] == 0
  assert info.dataset_hash == __import__("pdx_tf.io_utils").io_utils.sha256_file(
      os.path.join(records_dir, "dataset.json"))
  assert info.shard_paths(["fake001"], "augmented") == [os.path.join(records_dir, "augmented/fake001-00000.tfrecord")]


def test_leakage_every_cell_reads_only_its_patients(info):
  """Every example of a cell's train input is a train patient's; validation is the test patients' originals."""
  split = splits.make_splits(info.labels("p"), task="p", num_folds=4, num_repeats=2, seed=0, repartition=True)
  for repeat_entry in split["repeats"]:
    for fold_entry in repeat_entry["folds"]:
      train_ids, test_ids = set(fold_entry["train"]), set(fold_entry["test"])
      examples = _keys(input_pipeline.train_examples(
          info, fold_entry["train"], sample_seed=0, repeat=repeat_entry["repeat"], pool_fraction=0.5))
      assert examples and {patient for patient, _, _ in examples} <= train_ids
      validation = input_pipeline.load_validation(info, fold_entry["test"], "p")
      assert set(validation.patient_ids) == test_ids
      assert (validation.augmentation_indices == 0).all()
      assert len(validation.patient_ids) == len(test_ids) * SLICES
      # The files opened for training are only the training patients' shards.
      files = info.shard_paths(fold_entry["train"], "augmented") + info.shard_paths(fold_entry["train"], "original")
      assert not any(patient in path for path in files for patient in test_ids)


def test_batched_train_dataset_labels_and_images(info):
  dataset = input_pipeline.train_dataset(info, ["fake000", "fake001"], task="p", sample_seed=0, repeat=0,
                                         shuffle_seed=1, pool_fraction=1.0, batch_size=5)
  images, labels = [], []
  for image, label in dataset:
    images.append(image.numpy())
    labels.append(label.numpy())
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert images.shape == (2 * SLICES * (AUGMENT_FACTOR + 1), SIZE, SIZE, 3) and images.dtype == np.float32
  assert labels.shape == (images.shape[0], 1)
  # fake000 is positive (has a 230-valued square); fake001 is negative (noise below 80).
  assert ((images.max(axis=(1, 2, 3)) > 200) == (labels[:, 0] == 1)).all()
  assert labels.sum() == SLICES * (AUGMENT_FACTOR + 1)


def test_pool_draw_is_keyed_and_has_the_requested_fraction(info):
  ids = list(info.patients)
  def draw(**kwargs):
    keys = _keys(input_pipeline.train_examples(info, ids, **{"sample_seed": 0, "repeat": 0, **kwargs}))
    return sorted(keys)
  everything = draw(pool_fraction=1.0)
  assert len(everything) == NUM_PATIENTS * SLICES * (AUGMENT_FACTOR + 1)
  only_originals = draw(pool_fraction=0.0)
  assert only_originals == sorted((p, s, 0) for p in ids for s in range(SLICES))
  assert draw(pool_fraction=0.0, include_originals=False) == []
  half = draw(pool_fraction=0.5)
  assert draw(pool_fraction=0.5) == half  # a pure function of the key
  augmented = [key for key in half if key[2] > 0]
  assert 0.3 < len(augmented) / (NUM_PATIENTS * SLICES * AUGMENT_FACTOR) < 0.7
  assert set(only_originals) <= set(half)
  assert draw(pool_fraction=0.5, repeat=1) != half  # another repeat: another draw
  assert draw(pool_fraction=0.5, sample_seed=1) != half
  # A patient's draw does not depend on which other patients train with it.
  alone = sorted(_keys(input_pipeline.train_examples(info, ["fake003"], sample_seed=0, repeat=0, pool_fraction=0.5)))
  assert alone == [key for key in half if key[0] == "fake003"]


def test_pool_keep_matches_the_documented_formula():
  key = "pdx-pool/5/2/fake001/7/3"
  bucket = int(tf.strings.to_hash_bucket_fast(key, input_pipeline.POOL_HASH_BUCKETS))
  for fraction in (0.1, 0.5, 0.9):
    expected = bucket < round(fraction * input_pipeline.POOL_HASH_BUCKETS)
    got = bool(input_pipeline.pool_keep(5, 2, tf.constant("fake001"), tf.constant(7, tf.int64),
                                        tf.constant(3, tf.int64), fraction))
    assert got == expected


def _copy_manifest(records_dir, tmp_path, change):
  manifest = json.load(open(os.path.join(records_dir, "dataset.json")))
  change(manifest)
  folder = tmp_path / "copy"
  folder.mkdir()
  for kind in ("original", "augmented"):
    os.symlink(os.path.join(records_dir, kind), folder / kind)
  (folder / "dataset.json").write_text(json.dumps(manifest))
  return str(folder)


def test_bad_datasets(records_dir, tmp_path):
  with pytest.raises(RecordsError, match="model expects 48 px"):
    contracts.load_dataset_info(records_dir, expected_image_size=48)
  with pytest.raises(RecordsError, match="dataset.json not found"):
    contracts.load_dataset_info(str(tmp_path))
  other = _copy_manifest(records_dir, tmp_path, lambda m: m.update(schema_version=2))
  with pytest.raises(RecordsError, match="schema version 2"):
    contracts.load_dataset_info(other)


def test_truncated_shard_and_hash_mismatch(records_dir, tmp_path):
  def shrink(manifest):
    manifest["shards"][0]["num_bytes"] += 1
  folder = _copy_manifest(records_dir, tmp_path, shrink)
  with pytest.raises(RecordsError, match="incomplete"):
    contracts.load_dataset_info(folder)


def test_hash_verification(records_dir, tmp_path):
  def corrupt(manifest):
    manifest["shards"][0]["sha256"] = "0" * 64
  folder = _copy_manifest(records_dir, tmp_path, corrupt)
  contracts.load_dataset_info(folder)  # sizes only: passes
  with pytest.raises(RecordsError, match="sha256"):
    contracts.load_dataset_info(folder, verify_hashes=True)


def test_content_hash_follows_the_records_not_their_provenance(info):
  dataset = json.loads(json.dumps(info.document))
  reference = contracts.records_content_hash(dataset)
  assert info.content_hash == reference
  # A pipeline rerun after a code update, or from another cohort path, holds the same records.
  dataset["code_version"] = "9.9.9+gdeadbeef"
  dataset.setdefault("config", {})["manifest_path"] = "/elsewhere/manifest.csv"
  assert contracts.records_content_hash(dataset) == reference
  # Other images or other labels are other records.
  changed_image = json.loads(json.dumps(dataset))
  changed_image["shards"][0]["sha256"] = "0" * 64
  assert contracts.records_content_hash(changed_image) != reference
  changed_label = json.loads(json.dumps(dataset))
  changed_label["patients"][0]["label_p"] = 1 - int(changed_label["patients"][0]["label_p"])
  assert contracts.records_content_hash(changed_label) != reference
