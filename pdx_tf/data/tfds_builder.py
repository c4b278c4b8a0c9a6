"""A TensorFlow Datasets builder of the same images, for generation on Apache Beam runners (e.g. Dataflow).

Build (the cohort folder holds manifest.csv; its dicom_dir paths resolve against it):
  pip install -e ".[beam]"
  tfds build pdx_ct --imports=pdx_tf.data.tfds_builder --manual_dir=/data/cohort --config=paper \\
      --data_dir=gs://bucket/tfds --beam_pipeline_options="runner=DataflowRunner,project=...,region=..."

Without apache-beam installed the builder runs as a plain Python generator (one process). Every image is made
by `pdx_tf.data.pipeline.patient_images`, so a TFDS example equals the matching TFRecord of `python -m data_pipeline`
with the same settings (same preprocessing, same keyed augmentation). The output is TFDS's own layout
(one `train` split holding every patient; folds are chosen at training time), not the D/ layout with
dataset.json that `python -m train` reads; use it for analysis or with a reader written for it. Patients whose
study cannot be read are skipped with a one-line warning naming only the patient_id and the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from pdx_tf.contracts import DEFAULT_MIN_SLICES
from pdx_tf.data import manifest as manifest_lib, pipeline, preprocess, region
from pdx_tf.errors import PdxError

MANIFEST_NAME = "manifest.csv"


@dataclasses.dataclass(eq=False)
class PdxCtConfig(tfds.core.BuilderConfig):
  """Image and augmentation settings of a build (the rest are PipelineConfig defaults)."""

  image_size: int = 224
  augment_factor: int = pipeline.PAPER_AUGMENT_FACTOR
  window: str = "abdomen"
  seed: int = 0
  min_slices: int = DEFAULT_MIN_SLICES


def _pipeline_config(config: PdxCtConfig, manifest_path: str) -> pipeline.PipelineConfig:
  return pipeline.PipelineConfig(
      manifest_path=manifest_path, output_dir="unused",
      preprocess=preprocess.PreprocessConfig(image_size=config.image_size,
                                             windows=preprocess.parse_windows(config.window)),
      augment_factor=config.augment_factor, seed=config.seed, min_slices=config.min_slices)


def _patient_examples(row: manifest_lib.ManifestRow, config: pipeline.PipelineConfig
                      ) -> Iterator[tuple[str, dict[str, Any]]]:
  """(key, features) of every image of one patient; nothing (and a warning) if the study is unusable."""
  try:
    abdomen = region.load_abdomen(row.dicom_dir, series_uid=row.series_uid, z_min_mm=row.z_min_mm,
                                  z_max_mm=row.z_max_mm, slice_spacing_mm=config.slice_spacing_mm,
                                  config=config.region, min_slices=config.min_slices)
  except PdxError as error:
    logging.warning("patient %s skipped: %s", row.patient_id, " ".join(str(error).split()))
    return
  covariates = json.dumps(dict(row.covariates), sort_keys=True)
  for slice_index, z_mm, augmentation_index, image in pipeline.patient_images(abdomen, row.patient_id, config):
    yield f"{row.patient_id}/{slice_index:05d}/{augmentation_index:05d}", {
        "image": image, "patient_id": row.patient_id, "slice_index": slice_index, "z_mm": z_mm,
        "augmentation_index": augmentation_index, "label_p": row.label_p, "label_sb": row.label_sb,
        "covariates": covariates,
    }


class PdxCt(tfds.core.GeneratorBasedBuilder):
  """Abdominal CT slices (originals and keyed augmented copies) with peritoneal / small-bowel labels."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: records schema version 1 images."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      f"Put the cohort's {MANIFEST_NAME} (see pdx_tf/data/manifest.py) in --manual_dir; its dicom_dir paths are "
      "resolved against that folder (or absolute, gs:// allowed).")
  BUILDER_CONFIGS = [
      PdxCtConfig(name="paper", description="224 px, W400/L40, 960 augmented copies a slice (the study)."),
      PdxCtConfig(name="demo", description="48 px, 8 augmented copies a slice (laptop demo).", image_size=48,
                  augment_factor=8),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "patient_id": tfds.features.Text(),
            "slice_index": tfds.features.Scalar(np.int64),
            "z_mm": tfds.features.Scalar(np.float32),
            "augmentation_index": tfds.features.Scalar(np.int64),
            "label_p": tfds.features.ClassLabel(num_classes=2),
            "label_sb": tfds.features.ClassLabel(num_classes=2),
            "covariates": tfds.features.Text(doc="The manifest covariates as a JSON object of strings."),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manifest_path = os.fspath(dl_manager.manual_dir / MANIFEST_NAME)
    manifest = manifest_lib.read_manifest(manifest_path)
    return {"train": self._generate_examples(manifest.rows, _pipeline_config(self.builder_config, manifest_path))}

  def _generate_examples(self, rows, config):
    try:
      import apache_beam as beam  # pylint: disable=import-outside-toplevel
    except ImportError:
      beam = None
    if beam is None:
      return (example for row in rows for example in _patient_examples(row, config))
    # One Beam element per patient: workers read and augment patients independently.
    return beam.Create(list(rows)) | beam.FlatMap(_patient_examples, config=config)
