"""TFDS reads the pipeline's records: `tfds.builder_from_directory(D)` opens the original and augmented records and
decodes the same tensors as `records.parse_example`, for a real pipeline run, one-window and three-window images,
covariates and PCI scores."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import io_utils, phantom
from pdx_tf.data import pipeline, preprocess, records, tfds_metadata
from pdx_tf.testing import fake_records

tfds = pytest.importorskip("tensorflow_datasets")


def _expected(records_dir: str, paths: list[str], covariate_names) -> list[dict]:
  """parse_example over the files, in order: the reference TFDS must match."""
  return [records.parse_example(serialized, covariate_names)
          for path in paths for serialized in tf.data.TFRecordDataset(os.path.join(records_dir, path))]


def _assert_same(tfds_example: dict, expected: dict, covariate_names) -> None:
  flat = dict(tfds_example)
  covariates = flat.pop("covariate", {})
  assert sorted(covariates) == sorted(covariate_names)
  for name in covariate_names:
    flat[name] = covariates[name]
  if records.PCI_SCORES_KEY not in flat:  # written only with PCI columns; parse_example's default is all -1
    np.testing.assert_array_equal(expected.pop(records.PCI_SCORES_KEY), [-1] * records.NUM_PCI_REGIONS)
  assert sorted(flat) == sorted(expected)
  for key, value in expected.items():
    assert flat[key].dtype == value.dtype, key
    np.testing.assert_array_equal(flat[key].numpy(), value.numpy(), err_msg=key)


def _check_every_split(records_dir: str, dataset: dict) -> int:
  """Reads every split through TFDS and compares it with parse_example on the split's files; returns examples."""
  builder = tfds.builder_from_directory(records_dir)
  covariate_names = dataset["covariate_names"]
  shards = {}
  for shard in sorted(dataset["shards"], key=lambda s: s["path"]):
    shards.setdefault(shard["patient_id"], []).append(shard)
  names = set(builder.info.splits)
  metadata = builder.info.metadata
  assert names == set(metadata["original_splits"]) | set(metadata["augmented_splits"])
  total = 0
  for patient in dataset["patients"]:
    patient_id = patient["patient_id"]
    original = [s["path"] for s in shards[patient_id] if s["kind"] == "original"]
    # shards.py names sort by (block, part); TFDS reads a split's blocks in order, one split a part.
    augmented = sorted((s for s in shards[patient_id] if s["kind"] == "augmented"),
                       key=lambda s: (s["path"].rsplit("-", 1)[1], s["block"]))
    by_split = {tfds_metadata.split_name("original", patient_id): original}
    for shard in augmented:
      part = int(shard["path"].rsplit("-", 1)[1].split(".")[0])
      by_split.setdefault(tfds_metadata.split_name("augmented", patient_id, part), []).append(shard["path"])
    for split, paths in by_split.items():
      assert split in names and metadata["split_patient_ids"][split] == patient_id
      expected = _expected(records_dir, paths, covariate_names)
      read = list(builder.as_dataset(split=split, shuffle_files=False))
      assert len(read) == len(expected) == builder.info.splits[split].num_examples, split
      for tfds_example, parsed in zip(read, expected):
        _assert_same(tfds_example, parsed, covariate_names)
      total += len(read)
  assert total == dataset["counts"]["original_examples"] + dataset["counts"]["augmented_examples"]
  return total


@pytest.mark.parametrize("channels", [1, 3])
def test_tfds_decodes_the_same_tensors_as_parse_example(tmp_path, channels):
  records_dir = str(tmp_path / "D")
  dataset = fake_records.write_fake_records(records_dir, num_patients=3, slices_per_patient=[2, 3, 1],
                                            augment_factor=5, augment_block=2, channels=channels,
                                            ids=["p.1", "p-2", "P_3"])
  with open(os.path.join(records_dir, "dataset.json"), "rb") as handle:
    before = handle.read()
  tfds_metadata.update_metadata(records_dir, dataset)
  with open(os.path.join(records_dir, "dataset.json"), "rb") as handle:
    assert handle.read() == before  # dataset.json (and its hash) untouched
  assert _check_every_split(records_dir, dataset) == 6 + 6 * 5
  # "p.1" becomes split name "...-p_1"; the map gives the patient back.
  assert tfds.builder_from_directory(records_dir).info.metadata["split_patient_ids"]["original-p_1"] == "p.1"
  # No path outside D/ (the metadata names only D-relative files).
  for name in tfds_metadata.METADATA_FILES:
    with open(os.path.join(records_dir, name), encoding="utf-8") as handle:
      assert str(tmp_path) not in handle.read()


def test_pci_scores_and_covariates_are_features_when_written(tmp_path):
  records_dir = str(tmp_path / "D")
  os.makedirs(os.path.join(records_dir, "original"))
  scores = [0, 1, 2, 3, -1, 0, 0, 1, 2, 3, 0, 1, 2]
  path = os.path.join(records_dir, "original", "a.tfrecord")
  image = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16, 1)
  with tf.io.TFRecordWriter(path) as writer:
    for slice_index in range(2):
      writer.write(records.make_example(
          records.encode_image(image + slice_index), image_size=16, patient_id="a", slice_index=slice_index,
          z_mm=2.5 * slice_index, augmentation_index=0, label_p=1, label_sb=0, covariates={"age": "61"},
          pci_scores=scores).SerializeToString())
  dataset = {"preprocess": {"image_size": 16}, "covariate_names": ["age"],
             "patients": [{"patient_id": "a", "pci_scores": scores}],
             "shards": [{"path": "original/a.tfrecord", "patient_id": "a", "kind": "original", "num_examples": 2,
                         "num_bytes": os.path.getsize(path)}],
             "counts": {"original_examples": 2, "augmented_examples": 0}}
  tfds_metadata.write_metadata(records_dir, dataset)
  builder = tfds.builder_from_directory(records_dir)
  (first, second) = list(builder.as_dataset(split="original-a", shuffle_files=False))
  np.testing.assert_array_equal(second[records.PCI_SCORES_KEY].numpy(), scores)
  assert second["covariate"]["age"].numpy() == b"61" and second[records.Z_MM_KEY].numpy() == np.float32(2.5)
  np.testing.assert_array_equal(first["image"].numpy(), np.repeat(image, 3, axis=2))
  expected = _expected(records_dir, ["original/a.tfrecord"], ["age"])
  _assert_same(second, expected[1], ["age"])


def test_a_real_pipeline_run_writes_metadata_tfds_reads_with_block_parts(tmp_path):
  manifest_path = phantom.write_demo_cohort(str(tmp_path / "cohort"), phantom.PhantomConfig(
      num_patients=2, matrix_size=64, pixel_spacing_mm=6.0))
  # Tiny shards: blocks split into parts, so TFDS reads part splits too.
  config = pipeline.PipelineConfig(
      manifest_path=manifest_path, output_dir=str(tmp_path / "D"), preprocess=preprocess.PreprocessConfig(
          image_size=32), augment_factor=2, augment_block=2, num_workers=1, shard_size_mb=0.02, qc_max_slices=2)
  result = pipeline.run_pipeline(config, progress=False)
  assert result.ok
  dataset = io_utils.read_json(result.dataset_json)
  assert any(not shard["path"].endswith("-00000.tfrecord") for shard in dataset["shards"] if shard["kind"] ==
             "augmented"), "the run should split a block into parts"
  assert _check_every_split(config.output_dir, dataset) > 0


def test_no_dataset_json_means_no_tfds_metadata(tmp_path, caplog):
  records_dir = str(tmp_path / "D")
  dataset = fake_records.write_fake_records(records_dir, num_patients=2, slices_per_patient=1, augment_factor=2)
  tfds_metadata.update_metadata(records_dir, dataset)
  assert all(os.path.exists(os.path.join(records_dir, name)) for name in tfds_metadata.METADATA_FILES)
  tfds_metadata.update_metadata(records_dir, None)  # a run whose patients failed: stale metadata goes
  assert not any(os.path.exists(os.path.join(records_dir, name)) for name in tfds_metadata.METADATA_FILES)
  # Blocks TFDS cannot name (1 without 0): one warning line, no metadata, nothing raised.
  broken = dict(dataset, shards=[dict(shard, path=shard["path"].replace("-b00000-", "-b00001-"))
                                 if shard["kind"] == "augmented" else shard for shard in dataset["shards"]])
  with caplog.at_level(logging.WARNING):
    tfds_metadata.update_metadata(records_dir, broken)
  assert "TFDS metadata not written" in caplog.text and "not numbered 0..n-1" in caplog.text
  assert not any(os.path.exists(os.path.join(records_dir, name)) for name in tfds_metadata.METADATA_FILES)
