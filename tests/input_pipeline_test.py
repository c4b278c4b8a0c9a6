"""Tests of pdx_tf.training.input_pipeline: dataset.json checks, the keyed pool draw, and leakage of the real datasets."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import fake_records
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
  return input_pipeline.load_dataset_info(records_dir, expected_image_size=SIZE, verify_hashes=True)


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
    input_pipeline.load_dataset_info(records_dir, expected_image_size=48)
  with pytest.raises(RecordsError, match="dataset.json not found"):
    input_pipeline.load_dataset_info(str(tmp_path))
  other = _copy_manifest(records_dir, tmp_path, lambda m: m.update(schema_version=2))
  with pytest.raises(RecordsError, match="schema version 2"):
    input_pipeline.load_dataset_info(other)


def test_truncated_shard_and_hash_mismatch(records_dir, tmp_path):
  def shrink(manifest):
    manifest["shards"][0]["num_bytes"] += 1
  folder = _copy_manifest(records_dir, tmp_path, shrink)
  with pytest.raises(RecordsError, match="incomplete"):
    input_pipeline.load_dataset_info(folder)


def test_hash_verification(records_dir, tmp_path):
  def corrupt(manifest):
    manifest["shards"][0]["sha256"] = "0" * 64
  folder = _copy_manifest(records_dir, tmp_path, corrupt)
  input_pipeline.load_dataset_info(folder)  # sizes only: passes
  with pytest.raises(RecordsError, match="sha256"):
    input_pipeline.load_dataset_info(folder, verify_hashes=True)


def test_content_hash_follows_the_records_not_their_provenance(info):
  dataset = json.loads(json.dumps(info.manifest))
  reference = input_pipeline.records_content_hash(dataset)
  assert info.content_hash == reference
  # A pipeline rerun after a code update, or from another cohort path, holds the same records.
  dataset["code_version"] = "9.9.9+gdeadbeef"
  dataset.setdefault("config", {})["manifest_path"] = "/elsewhere/manifest.csv"
  assert input_pipeline.records_content_hash(dataset) == reference
  # Other images or other labels are other records.
  changed_image = json.loads(json.dumps(dataset))
  changed_image["shards"][0]["sha256"] = "0" * 64
  assert input_pipeline.records_content_hash(changed_image) != reference
  changed_label = json.loads(json.dumps(dataset))
  changed_label["patients"][0]["label_p"] = 1 - int(changed_label["patients"][0]["label_p"])
  assert input_pipeline.records_content_hash(changed_label) != reference


def _documented_draw(seed, repeat, patient_ids, num_slices, num_copies, fraction):
  """The pool draw rebuilt from the module docstring: bool [patients, slices, copies]."""
  keys = [f"pdx-pool/{seed}/{repeat}/{patient_id}/{slice_index}/{copy}"
          for patient_id in patient_ids for slice_index in range(num_slices) for copy in range(1, num_copies + 1)]
  buckets = tf.strings.to_hash_bucket_fast(keys, 2**30).numpy()
  return (buckets < round(fraction * 2**30)).reshape(len(patient_ids), num_slices, num_copies)


def _library_draw(seed, repeat, patient_ids, num_slices, num_copies, fraction):
  grid_patients, grid_slices, grid_copies = np.meshgrid(np.asarray(patient_ids), np.arange(num_slices),
                                                        np.arange(1, num_copies + 1), indexing="ij")
  kept = input_pipeline.pool_keep(seed, repeat, tf.constant(grid_patients.reshape(-1)),
                                  tf.constant(grid_slices.reshape(-1), tf.int64),
                                  tf.constant(grid_copies.reshape(-1), tf.int64), fraction)
  return kept.numpy().reshape(len(patient_ids), num_slices, num_copies)


def test_pool_draw_over_many_keys_differs_between_patients_and_repeats():
  fraction, num_slices, num_copies = 0.3, 40, 50
  patient_ids = [f"pt{index:04d}" for index in range(200)]
  draws = {repeat: _library_draw(7, repeat, patient_ids, num_slices, num_copies, fraction) for repeat in (0, 1)}
  # Equal, decision by decision, to the documented key and hash.
  np.testing.assert_array_equal(draws[0], _documented_draw(7, 0, patient_ids, num_slices, num_copies, fraction))
  np.testing.assert_array_equal(draws[1], _documented_draw(7, 1, patient_ids, num_slices, num_copies, fraction))
  count = draws[0].size  # 400,000 decisions
  tolerance = 5 * np.sqrt(fraction * (1 - fraction) / count)  # 5 binomial standard deviations
  for draw in draws.values():
    assert abs(draw.mean() - fraction) < tolerance
    per_patient = draw.mean(axis=(1, 2))  # 2,000 decisions a patient
    assert np.all(np.abs(per_patient - fraction) < 5 * np.sqrt(fraction * (1 - fraction) / 2000))
  # Independent draws disagree on 2p(1-p) of the decisions: between neighbouring patients and between repeats.
  disagree = 2 * fraction * (1 - fraction)
  between_patients = np.mean(draws[0][1:] != draws[0][:-1])
  between_repeats = np.mean(draws[0] != draws[1])
  assert abs(between_patients - disagree) < 0.01, between_patients
  assert abs(between_repeats - disagree) < 0.01, between_repeats
  # No two patients share a draw.
  assert len({draw.tobytes() for draw in draws[0]}) == len(patient_ids)


def _copy_to_gfile(local_folder, url_folder):
  for root, _, names in os.walk(local_folder):
    for name in names:
      relative = os.path.relpath(os.path.join(root, name), local_folder)
      target = f"{url_folder}/{relative}"
      tf.io.gfile.makedirs(os.path.dirname(target))
      tf.io.gfile.copy(os.path.join(root, name), target, overwrite=True)


def test_records_and_splits_on_a_non_local_gfile_path(records_dir, info, tmp_path):
  """The records and run files work through tf.io.gfile on a URL filesystem (TF's in-memory ram://)."""
  url = f"ram://pdx-test-{os.getpid()}-{tmp_path.name}"
  _copy_to_gfile(records_dir, f"{url}/records")
  remote = input_pipeline.load_dataset_info(f"{url}/records", expected_image_size=SIZE, verify_hashes=True)
  assert remote.content_hash == info.content_hash and remote.dataset_hash == info.dataset_hash
  assert all(path.startswith(f"{url}/records/") for path in remote.shard_paths(list(remote.patients), "augmented"))
  ids = list(info.patients)
  settings = dict(sample_seed=0, repeat=0, pool_fraction=0.5)
  assert sorted(_keys(input_pipeline.train_examples(remote, ids[:4], **settings))) == sorted(
      _keys(input_pipeline.train_examples(info, ids[:4], **settings)))
  local_validation = input_pipeline.load_validation(info, ids[4:], "p")
  remote_validation = input_pipeline.load_validation(remote, ids[4:], "p")
  np.testing.assert_array_equal(remote_validation.images, local_validation.images)
  np.testing.assert_array_equal(remote_validation.patient_ids, local_validation.patient_ids)
  # Run files: splits.json written, verified and hashed on the URL path as on a local disk.
  split = splits.make_splits(info.labels("p"), task="p", num_folds=2, num_repeats=1, seed=0)
  splits.write_or_verify_splits(f"{url}/runs", split)
  splits.write_or_verify_splits(f"{url}/runs", split)  # the second call verifies
  splits.write_or_verify_splits(str(tmp_path), split)
  with tf.io.gfile.GFile(f"{url}/runs/splits.json", "rb") as handle:
    assert handle.read() == (tmp_path / "splits.json").read_bytes()
  tf.io.gfile.rmtree(url)
