"""Tests of pdx_tf.training.input_pipeline: dataset.json checks, the keyed pool draw, and leakage of the real datasets."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf.testing import fake_records
from pdx_tf import contracts, io_utils
from pdx_tf.data import records
from pdx_tf.errors import RecordsError
from pdx_tf.training import input_pipeline, splits

NUM_PATIENTS, SLICES, AUGMENT_FACTOR, BLOCK, SIZE = 8, 3, 8, 2, 32
NUM_BLOCKS = AUGMENT_FACTOR // BLOCK


@pytest.fixture(scope="module")
def records_dir(fake_records_dir):
  return fake_records_dir(num_patients=NUM_PATIENTS, slices_per_patient=SLICES, augment_factor=AUGMENT_FACTOR,
                          augment_block=BLOCK, image_size=SIZE)


@pytest.fixture(scope="module")
def info(records_dir):
  return contracts.load_dataset_info(records_dir, expected_image_size=SIZE, verify_hashes=True)


def _keys(dataset):
  return [(example[records.PATIENT_ID_KEY].decode(), int(example[records.SLICE_INDEX_KEY]),
           int(example[records.AUGMENTATION_INDEX_KEY])) for example in dataset.as_numpy_iterator()]


def _fingerprint64(key):
  """FarmHash Fingerprint64 of `key`, rebuilt from to_hash_bucket_fast (another op): fp mod (2^63 - 1), plus
  2^63 - 1 when the parity says fp was larger (2^63 - 1 is odd)."""
  modulus = (1 << 63) - 1
  low = int(tf.strings.to_hash_bucket_fast(key, modulus))
  parity = int(tf.strings.to_hash_bucket_fast(key, 2))
  return low if low % 2 == parity else low + modulus


def _expected_blocks(seed, repeat, patient_id, fraction):
  ranked = sorted(range(NUM_BLOCKS), key=lambda b: (_fingerprint64(f"pdx-pool/{seed}/{repeat}/{patient_id}/{b}"), b))
  count = 0 if fraction == 0 else max(1, int(fraction * NUM_BLOCKS + 0.5))
  return sorted(ranked[:count])


def test_load_dataset_info(info, records_dir):
  assert list(info.patients) == fake_records.patient_ids(NUM_PATIENTS)
  assert info.image_size == SIZE and info.covariate_names == ("site",)
  assert info.labels("p")["fake000"] == 1 and info.labels("p")["fake001"] == 0
  assert info.dataset_hash == __import__("pdx_tf.io_utils").io_utils.sha256_file(
      os.path.join(records_dir, "dataset.json"))
  assert info.shard_paths(["fake001"], "augmented") == [
      os.path.join(records_dir, f"augmented/fake001-b{block:05d}-00000.tfrecord") for block in range(NUM_BLOCKS)]


def _spy_on_opened_files(monkeypatch, opened: list) -> None:
  """Appends to `opened` every file a training dataset opens: the validation reader (tf.data.TFRecordDataset) and
  the pool's per-file streams, which input_pipeline caches (so the spy replaces the cached builder, uncached)."""
  original_reader = tf.data.TFRecordDataset
  monkeypatch.setattr(tf.data, "TFRecordDataset", lambda path, *a, **k: opened.append(path) or original_reader(
      path, *a, **k))
  monkeypatch.setattr(input_pipeline, "_record_stream", tf.data.TFRecordDataset)


def test_pool_file_streams_are_built_once_and_read_from_the_start(info):
  """The cached per-file stream gives every epoch the whole file from its first record (a dataset is read afresh
  by each iterator), so two passes over one cached stream equal two fresh readers."""
  input_pipeline._record_stream.cache_clear()
  path = info.shard_paths(["fake000"], "original")[0]
  first = input_pipeline._record_stream(path)
  assert input_pipeline._record_stream(path) is first
  fresh = [record.numpy() for record in tf.data.TFRecordDataset(path)]
  assert [record.numpy() for record in first] == fresh
  assert [record.numpy() for record in first] == fresh


def test_leakage_every_cell_reads_only_its_patients(info, monkeypatch):
  """Every example of a cell's train input is a train patient's; validation is the test patients' originals."""
  opened = []
  _spy_on_opened_files(monkeypatch, opened)
  split = splits.make_splits(info.labels("p"), task="p", num_folds=4, num_repeats=2, seed=0, repartition=True)
  for repeat_entry in split["repeats"]:
    for fold_entry in repeat_entry["folds"]:
      train_ids, test_ids = set(fold_entry["train"]), set(fold_entry["test"])
      opened.clear()
      examples = _keys(input_pipeline.train_examples(
          info, fold_entry["train"], sample_seed=0, repeat=repeat_entry["repeat"], pool_fraction=0.5))
      assert examples and {patient for patient, _, _ in examples} <= train_ids
      assert opened and not any(patient in str(path) for path in opened for patient in test_ids)
      validation = input_pipeline.load_validation(info, fold_entry["test"], "p")
      assert set(validation.patient_ids) == test_ids
      assert (validation.augmentation_indices == 0).all()
      assert len(validation.patient_ids) == len(test_ids) * SLICES


def test_batched_train_dataset_labels_and_images(info):
  dataset = input_pipeline.train_dataset(info, ["fake000", "fake001"], task="p", sample_seed=0, repeat=0,
                                         shuffle_seed=1, pool_fraction=1.0, batch_size=6)
  images, labels = [], []
  for image, label in dataset:
    images.append(image.numpy())
    labels.append(label.numpy())
  images, labels = np.concatenate(images), np.concatenate(labels)
  assert images.shape == (2 * SLICES * (AUGMENT_FACTOR + 1), SIZE, SIZE, 3) and images.dtype == np.float32
  assert labels.shape == (images.shape[0], 1)
  # One-channel records are tiled to three equal channels.
  assert (images[..., 0] == images[..., 1]).all() and (images[..., 0] == images[..., 2]).all()
  # fake000 is positive (has a 230-valued square); fake001 is negative (noise below 80).
  assert ((images.max(axis=(1, 2, 3)) > 200) == (labels[:, 0] == 1)).all()
  assert labels.sum() == SLICES * (AUGMENT_FACTOR + 1)


def _copies(blocks):
  return {block * BLOCK + offset + 1 for block in blocks for offset in range(BLOCK)}


def test_pool_draw_takes_keyed_whole_blocks_with_the_exact_fraction(info):
  ids = list(info.patients)

  def draw(**kwargs):
    return sorted(_keys(input_pipeline.train_examples(info, ids, **{"sample_seed": 0, "repeat": 0, **kwargs})))

  everything = draw(pool_fraction=1.0)
  assert len(everything) == NUM_PATIENTS * SLICES * (AUGMENT_FACTOR + 1)
  only_originals = draw(pool_fraction=0.0)
  assert only_originals == sorted((p, s, 0) for p in ids for s in range(SLICES))
  half = draw(pool_fraction=0.5)
  assert draw(pool_fraction=0.5, shuffle_seed=7, epoch=3) == half  # the pool does not depend on the order keys
  for patient_id in ids:
    expected = _expected_blocks(0, 0, patient_id, 0.5)
    assert len(expected) == NUM_BLOCKS // 2  # exactly the fraction, per patient
    copies = {key[2] for key in half if key[0] == patient_id and key[2] > 0}
    assert copies == _copies(expected)
    # Every slice has every copy of the drawn blocks.
    assert len([key for key in half if key[0] == patient_id]) == SLICES * (1 + len(_copies(expected)))
  per_patient = [tuple(_expected_blocks(0, 0, patient_id, 0.5)) for patient_id in ids]
  assert len(set(per_patient)) > 1  # patients draw different blocks
  assert draw(pool_fraction=0.5, repeat=1) != half  # another repeat: another draw
  assert draw(pool_fraction=0.5, sample_seed=1) != half
  # A small fraction still draws one block; a patient's draw does not depend on the other training patients.
  assert input_pipeline.pool_keep(0, 0, "fake003", range(NUM_BLOCKS), 0.01) == _expected_blocks(0, 0, "fake003", 0.01)
  alone = sorted(_keys(input_pipeline.train_examples(info, ["fake003"], sample_seed=0, repeat=0, pool_fraction=0.5)))
  assert alone and alone == [key for key in half if key[0] == "fake003"]
  with pytest.raises(RecordsError, match="no images"):
    input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=0.0, include_originals=False)


def test_pool_keep_matches_the_documented_formula():
  for repeat in range(3):
    for fraction in (0.1, 0.25, 0.5, 0.75, 1.0):
      assert input_pipeline.pool_keep(5, repeat, "fake001", range(NUM_BLOCKS), fraction) == _expected_blocks(
          5, repeat, "fake001", fraction)
  assert input_pipeline.pool_keep(5, 0, "fake001", range(NUM_BLOCKS), 0.0) == []


def test_only_drawn_files_are_opened_and_sizes_come_from_dataset_json(info, monkeypatch):
  opened = []
  _spy_on_opened_files(monkeypatch, opened)
  ids = ["fake000", "fake001", "fake002"]
  examples = _keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=2, pool_fraction=0.25))
  expected_files = sorted(
      [os.path.join(info.records_dir, f"original/{p}.tfrecord") for p in ids]
      + [os.path.join(info.records_dir, f"augmented/{p}-b{b:05d}-00000.tfrecord")
         for p in ids for b in _expected_blocks(0, 2, p, 0.25)])
  assert sorted(opened) == expected_files
  assert input_pipeline.pool_size(info, ids, sample_seed=0, repeat=2, pool_fraction=0.25) == len(examples)
  assert input_pipeline.bytes_to_read(info, ids, sample_seed=0, repeat=2, pool_fraction=0.25) == sum(
      os.path.getsize(path) for path in expected_files)
  assert input_pipeline.pool_size(info, ids, sample_seed=0, repeat=2, pool_fraction=0.25,
                                  include_originals=False) == len([key for key in examples if key[2] > 0])


def test_an_epoch_smaller_than_the_pool_opens_only_what_it_trains_on(info, monkeypatch):
  """Per file: 3 slices x 2 copies = 6 images (a block) or 3 (originals). With pool_fraction 1, 8 patients hold 8 x
  (3 + 4 x 6) = 216 images; an epoch of 40 must open files holding 40 to 45 images (at most one file more), at
  least one file of every patient first (rounds over the patients), and other files in another epoch."""
  opened = []
  _spy_on_opened_files(monkeypatch, opened)
  ids = list(info.patients)
  sizes = {io_utils.join(info.records_dir, shard["path"]): int(shard["num_examples"])
           for shard in info.document["shards"]}

  def epoch(number):
    opened.clear()
    keys = _keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=1.0, epoch=number,
                                               images_per_epoch=40))
    return keys, list(opened)

  keys, files = epoch(0)
  assert len(keys) == 40 and len(set(keys)) == 40
  held = sum(sizes[path] for path in files)
  assert 40 <= held < 40 + max(sizes.values())  # reading about equals training
  assert {key[0] for key in keys} == set(ids)  # 8 patients' first files hold 3-6 images each: all are read
  assert input_pipeline.bytes_to_read(info, ids, sample_seed=0, repeat=0, pool_fraction=1.0,
                                      images_per_epoch=40) == sum(os.path.getsize(path) for path in files)
  assert epoch(0) == (keys, files)  # a pure function of the keys
  assert set(epoch(1)[1]) != set(files)  # another epoch, other files


def test_an_epochs_files_follow_the_documented_rounds(info):
  """epoch_shards rebuilt from its docstring with another hash op: each patient's files ranked by
  Fingerprint64("pdx-epoch/<seed>/<repeat>/<epoch>/<path>"), patients by ".../patient/<id>", rounds of one file a
  patient until the files hold images_per_epoch images."""
  ids = list(info.patients)
  pool = input_pipeline.pool_shards(info, ids, sample_seed=3, repeat=1, pool_fraction=0.5)
  for epoch, wanted in ((0, 25), (2, 25), (1, 60)):
    prefix = f"pdx-epoch/3/1/{epoch}"
    files = {patient: sorted((shard for shard in pool if shard["patient_id"] == patient),
                             key=lambda shard: (_fingerprint64(f"{prefix}/{shard['path']}"), shard["path"]))
             for patient in ids}
    order = sorted(ids, key=lambda patient: _fingerprint64(f"{prefix}/patient/{patient}"))
    expected, held = [], 0
    for round_index in range(max(len(group) for group in files.values())):
      for patient in order:
        if held < wanted and round_index < len(files[patient]):
          expected.append(files[patient][round_index]["path"])
          held += files[patient][round_index]["num_examples"]
    chosen = input_pipeline.epoch_shards(info, ids, sample_seed=3, repeat=1, pool_fraction=0.5, epoch=epoch,
                                         images_per_epoch=wanted)
    assert [shard["path"] for shard in chosen] == expected
  assert input_pipeline.epoch_shards(info, ids, sample_seed=3, repeat=1, pool_fraction=0.5,
                                     images_per_epoch=10**6) == pool  # an epoch as large as the pool: all of it


def test_epochs_reshuffle_and_each_epoch_reproduces(info):
  ids = list(info.patients)

  def order(epoch, shuffle_seed=1):
    return _keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=0.5, epoch=epoch,
                                               shuffle_seed=shuffle_seed))

  first = order(0)
  assert order(0) == first  # same keys, same order
  assert order(1) != first and sorted(order(1)) == sorted(first)  # another epoch: the same pool, reordered
  assert order(0, shuffle_seed=2) != first
  # The batched dataset too: two calls give the same batches.
  def labels(epoch):
    dataset = input_pipeline.train_dataset(info, ids, task="p", sample_seed=0, repeat=0, epoch=epoch, shuffle_seed=1,
                                           pool_fraction=0.5, batch_size=4)
    return np.concatenate([label.numpy()[:, 0] for _, label in dataset])
  np.testing.assert_array_equal(labels(2), labels(2))


def test_images_per_epoch_is_a_keyed_sample_of_the_pool(info):
  ids = list(info.patients)
  pool = sorted(_keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=0.5)))

  def sample(epoch):
    return _keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=0.5, epoch=epoch,
                                               images_per_epoch=40))

  first = sample(0)
  assert len(first) == 40 and len(set(first)) == 40 and set(first) <= set(pool)
  assert sample(0) == first and set(sample(1)) != set(first)
  more = _keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=0.5,
                                             images_per_epoch=len(pool) + 10))
  assert len(more) == len(pool) + 10 and set(more) == set(pool)  # two passes over the pool
  dataset = input_pipeline.train_dataset(info, ids, task="p", sample_seed=0, repeat=0, shuffle_seed=0,
                                         pool_fraction=0.5, batch_size=16, images_per_epoch=40)
  assert [int(label.shape[0]) for _, label in dataset] == [16, 16]  # rounded down to whole batches


def test_batches_mix_patients_and_originals_spread_over_the_epoch(tmp_path):
  """At small scale, with no local shuffle (as at paper scale, where the buffer is tiny next to the epoch)."""
  num_patients, slices, batch = 24, 4, 8
  folder = str(tmp_path / "mix")
  fake_records.write_fake_records(folder, num_patients=num_patients, slices_per_patient=slices, augment_factor=4,
                                  augment_block=2, image_size=16)  # PreprocessConfig's smallest size
  info = contracts.load_dataset_info(folder)
  ids = list(info.patients)
  keys = _keys(input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=0.5,
                                             shuffle_buffer=0))
  assert len(keys) == num_patients * slices * 3
  distinct = [len({key[0] for key in keys[start:start + batch]}) for start in range(0, len(keys), batch)]
  # Uniform sampling gives 24 * (1 - (23/24)^8) = 6.9 patients per batch of 8; reading file by file gives 1-2.
  assert np.median(distinct) >= 6
  positions = np.array([index for index, key in enumerate(keys) if key[2] == 0]) / len(keys)
  assert len(positions) == num_patients * slices
  # Spread over the whole epoch, not read first or last.
  assert 0.4 < positions.mean() < 0.6
  assert np.histogram(positions, bins=4, range=(0, 1))[0].min() >= 0.15 * len(positions)


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
  old = _copy_manifest(records_dir, tmp_path, lambda m: m.update(schema_version=1))
  with pytest.raises(RecordsError, match=r"schema version 1.*python -m data_pipeline --manifest") as error:
    contracts.load_dataset_info(old)
  assert "\n" not in str(error.value)


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


def _block_draws(seed, repeat, patient_ids, num_blocks, fraction):
  """bool [patients, blocks]: which blocks the library draws into repeat `repeat`'s pool."""
  draws = np.zeros((len(patient_ids), num_blocks), bool)
  for row, patient_id in enumerate(patient_ids):
    draws[row, input_pipeline.pool_keep(seed, repeat, patient_id, range(num_blocks), fraction)] = True
  return draws


def test_pool_draw_over_many_keys_differs_between_patients_and_repeats():
  """Over 200 patients x 60 blocks: every patient keeps exactly round(p x 60) blocks, and independent keys
  (neighbouring patients, the two repeats) disagree on 2p(1-p) of the blocks, as independent draws must. A key
  that dropped the patient or the repeat would make the draws identical."""
  fraction, num_blocks = 0.3, 60
  patient_ids = [f"pt{index:04d}" for index in range(200)]
  draws = {repeat: _block_draws(7, repeat, patient_ids, num_blocks, fraction) for repeat in (0, 1)}
  for draw in draws.values():
    assert np.all(draw.sum(axis=1) == 18)  # the share of each patient's copies is exact, not binomial
  disagree = 2 * fraction * (1 - fraction)
  between_patients = np.mean(draws[0][1:] != draws[0][:-1])
  between_repeats = np.mean(draws[0] != draws[1])
  assert abs(between_patients - disagree) < 0.02, between_patients
  assert abs(between_repeats - disagree) < 0.02, between_repeats
  assert len({draw.tobytes() for draw in draws[0]}) == len(patient_ids)  # no two patients share a draw
  # Every block is drawn about equally often over patients (no block is favoured by the ranking).
  per_block = draws[0].mean(axis=0)
  assert np.all(np.abs(per_block - fraction) < 5 * np.sqrt(fraction * (1 - fraction) / len(patient_ids)))


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
  remote = contracts.load_dataset_info(f"{url}/records", expected_image_size=SIZE, verify_hashes=True)
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
