"""The TFDS builder makes the same images as the pipeline's TFRecords (tiny phantom, no Beam)."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import io_utils, phantom, pipeline, preprocess, records

tfds = pytest.importorskip("tensorflow_datasets")
# tensorflow-datasets needs importlib_resources to build (an etils[epath] extra that pip may leave out).
pytest.importorskip("importlib_resources")
from pdx_tf import tfds_builder  # pylint: disable=wrong-import-position


def test_tfds_examples_equal_the_pipeline_records(tmp_path):
  cohort = str(tmp_path / "cohort")
  manifest_path = phantom.write_demo_cohort(
      cohort, phantom.PhantomConfig(num_patients=1, matrix_size=64, pixel_spacing_mm=6.0))
  config = tfds_builder.PdxCtConfig(name="tiny", image_size=32, augment_factor=2)
  builder = tfds_builder.PdxCt(config=config, data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=cohort))
  examples = list(tfds.as_numpy(builder.as_dataset(split="train")))

  output_dir = str(tmp_path / "D")
  result = pipeline.run_pipeline(pipeline.PipelineConfig(
      manifest_path=manifest_path, output_dir=output_dir, preprocess=preprocess.PreprocessConfig(image_size=32),
      augment_factor=2, write_qc=False), progress=False)
  dataset = io_utils.read_json(result.dataset_json)
  expected = {}
  for shard in dataset["shards"]:
    for serialized in tf.data.TFRecordDataset(os.path.join(output_dir, shard["path"])):
      example = records.parse_example(serialized, dataset["covariate_names"])
      key = (example["patient_id"].numpy().decode(), int(example["slice_index"]), int(example["augmentation_index"]))
      expected[key] = example

  assert len(examples) == len(expected) == result.num_original_examples + result.num_augmented_examples
  for example in examples:
    key = (example["patient_id"].decode(), int(example["slice_index"]), int(example["augmentation_index"]))
    reference = expected[key]
    np.testing.assert_array_equal(example["image"], reference["image"].numpy())
    assert example["label_p"] == int(reference["label_p"]) and example["label_sb"] == int(reference["label_sb"])
    assert example["z_mm"] == pytest.approx(float(reference["z_mm"]))
    covariates = json.loads(example["covariates"])
    assert covariates == {name: reference[name].numpy().decode() for name in dataset["covariate_names"]}
