"""Round trip of the TFRecord schema, eagerly and inside tf.data."""

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf.data import records
from pdx_tf.errors import RecordsError


def _example(image, **overrides):
  fields = dict(image_size=image.shape[0], patient_id="pt-007", slice_index=12, z_mm=-153.5,
                augmentation_index=3, label_p=1, label_sb=0, covariates={"ascites": "large", "pci": "17"})
  fields.update(overrides)
  return records.make_example(records.encode_image(image), **fields)


def test_round_trip_eager_keeps_every_field():
  image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  parsed = records.parse_example(_example(image).SerializeToString(), covariate_names=("ascites", "pci"))
  np.testing.assert_array_equal(parsed["image"].numpy(), image)
  assert parsed["patient_id"].numpy() == b"pt-007"
  assert parsed["slice_index"].numpy() == 12
  assert parsed["z_mm"].numpy() == pytest.approx(-153.5)
  assert parsed["augmentation_index"].numpy() == 3
  assert parsed["label_p"].numpy() == 1 and parsed["label_sb"].numpy() == 0
  assert parsed["ascites"].numpy() == b"large" and parsed["pci"].numpy() == b"17"
  assert parsed["schema_version"].numpy() == records.SCHEMA_VERSION


def test_round_trip_in_tf_data_matches_eager(tmp_path):
  rng = np.random.default_rng(1)
  images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(3)]
  path = str(tmp_path / "x.tfrecord")
  with tf.io.TFRecordWriter(path) as writer:
    for index, image in enumerate(images):
      writer.write(_example(image, slice_index=index).SerializeToString())
  dataset = tf.data.TFRecordDataset(path).map(lambda s: records.parse_example(s, ("ascites",)))
  got = list(dataset.as_numpy_iterator())
  assert [item["slice_index"] for item in got] == [0, 1, 2]
  for item, image in zip(got, images):
    np.testing.assert_array_equal(item["image"], image)
    assert item["image"].shape == (16, 16, 3)


def test_missing_covariate_parses_as_empty_string():
  image = np.zeros((16, 16, 3), np.uint8)
  parsed = records.parse_example(_example(image, covariates={}).SerializeToString(), ("site",))
  assert parsed["site"].numpy() == b""


def test_one_channel_round_trip_is_tiled_to_rgb_and_smaller():
  rng = np.random.default_rng(2)
  gray = rng.integers(0, 256, (24, 24, 1), dtype=np.uint8)
  png = records.encode_image(gray)
  assert tf.io.decode_png(png, channels=0).shape == (24, 24, 1)  # stored with one channel
  assert len(png) < len(records.encode_image(np.repeat(gray, 3, axis=-1)))
  parsed = records.parse_example(_example(gray).SerializeToString())
  np.testing.assert_array_equal(parsed["image"].numpy(), np.repeat(gray, 3, axis=-1))


def test_encode_image_rejects_wrong_dtype_or_shape():
  with pytest.raises(ValueError, match="uint8"):
    records.encode_image(np.zeros((8, 8, 3), np.float32))
  with pytest.raises(ValueError, match="uint8"):
    records.encode_image(np.zeros((8, 8), np.uint8))
  with pytest.raises(ValueError, match="uint8"):
    records.encode_image(np.zeros((8, 8, 2), np.uint8))


def test_other_schema_version_is_refused_with_instructions():
  records.check_schema_version(records.SCHEMA_VERSION, "dataset.json")
  with pytest.raises(RecordsError, match="rebuild the records"):
    records.check_schema_version(records.SCHEMA_VERSION + 1, "dataset.json")
  # Version 1 (three-channel images, no augmentation blocks) names the rebuild command, on one line.
  assert records.SCHEMA_VERSION == 2
  with pytest.raises(RecordsError, match=r"version 1.*`python -m data_pipeline --manifest=") as error:
    records.check_schema_version(1, "D/dataset.json")
  assert "\n" not in str(error.value)


def test_label_key_by_task():
  assert records.label_key("p") == "label_p" and records.label_key("sb") == "label_sb"
  with pytest.raises(ValueError):
    records.label_key("x")
