"""contracts.records_image_size: train's default --image_size is the records' own."""

import json

import pytest

from pdx_tf import contracts, io_utils
from pdx_tf.data import pipeline, preprocess
from pdx_tf.errors import RecordsError


def test_the_size_the_pipeline_recorded(tmp_path):
  config = pipeline.PipelineConfig(manifest_path="m.csv", output_dir=str(tmp_path),
                                   preprocess=preprocess.PreprocessConfig(image_size=40))
  io_utils.atomic_write_json(str(tmp_path / "dataset.json"), pipeline.build_dataset_json(config, (), [], 0))
  assert contracts.records_image_size(str(tmp_path)) == 40


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("{not json", "not valid JSON"), (json.dumps({"format": "tfds"}), "not a pdx-tf dataset"),
    (json.dumps({"format": contracts.DATASET_FORMAT, "preprocess": {}}), "lacks preprocess.image_size")])
def test_unusable_dataset_json_is_one_clear_line(tmp_path, content, message):
  if content is not None:
    (tmp_path / "dataset.json").write_text(content)
  with pytest.raises(RecordsError, match=message) as raised:
    contracts.records_image_size(str(tmp_path))
  assert "\n" not in str(raised.value)
