"""Writes a tiny fake records folder (TFRecords + dataset.json, the CONTRACTS.md layout) with pdx_tf.data.records.

Images are keyed noise; positive patients (label_p = 1) carry a bright square whose position varies with the
slice and augmentation index, so a model can learn the task. Labels alternate so any stratified split of an
even number of patients has both classes in every fold.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.data import records


def patient_ids(num_patients: int) -> list[str]:
  return [f"fake{index:03d}" for index in range(num_patients)]


def fake_image(seed: int, patient_index: int, slice_index: int, augmentation_index: int, positive: bool,
               image_size: int) -> np.ndarray:
  rng = np.random.default_rng([seed, patient_index, slice_index, augmentation_index])
  image = rng.integers(0, 80, size=(image_size, image_size), dtype=np.int64)
  if positive:
    side = max(4, image_size // 5)
    top, left = rng.integers(0, image_size - side, size=2)
    image[top:top + side, left:left + side] = 230
  return np.repeat(image.astype(np.uint8)[..., np.newaxis], 3, axis=-1)


def write_fake_records(records_dir: str, *, num_patients: int = 8, slices_per_patient: int = 3,
                       augment_factor: int = 4, image_size: int = 32, seed: int = 0,
                       label_sb_every: int = 4, schema_version: int | None = None) -> dict[str, Any]:
  """Writes records_dir/{original,augmented}/*.tfrecord and dataset.json; returns the dataset.json dict.

  Patient i has label_p = 1 for even i and label_sb = 1 when i % label_sb_every == 0; covariate `site`.
  `schema_version` overrides the manifest's version (to test the mismatch error).
  """
  os.makedirs(os.path.join(records_dir, "original"), exist_ok=True)
  os.makedirs(os.path.join(records_dir, "augmented"), exist_ok=True)
  patients, shards = [], []
  for index, patient_id in enumerate(patient_ids(num_patients)):
    label_p = int(index % 2 == 0)
    label_sb = int(index % label_sb_every == 0)
    covariates = {"site": "A" if index % 3 else "B"}
    files = {"original": f"original/{patient_id}.tfrecord", "augmented": f"augmented/{patient_id}-00000.tfrecord"}
    counts = {"original": 0, "augmented": 0}
    for kind, relative in files.items():
      indices = [0] if kind == "original" else range(1, augment_factor + 1)
      path = os.path.join(records_dir, relative)
      with tf.io.TFRecordWriter(path) as writer:
        for slice_index in range(slices_per_patient):
          for augmentation_index in indices:
            image = fake_image(seed, index, slice_index, augmentation_index, bool(label_p), image_size)
            example = records.make_example(
                records.encode_image(image), image_size=image_size, patient_id=patient_id, slice_index=slice_index,
                z_mm=5.0 * slice_index, augmentation_index=augmentation_index, label_p=label_p, label_sb=label_sb,
                covariates=covariates)
            writer.write(example.SerializeToString())
            counts[kind] += 1
      shards.append({"path": relative, "patient_id": patient_id, "kind": kind, "num_examples": counts[kind],
                     "num_bytes": os.path.getsize(path), "sha256": io_utils.sha256_file(path)})
    patients.append({"patient_id": patient_id, "label_p": label_p, "label_sb": label_sb, "covariates": covariates,
                     "num_slices": slices_per_patient, "z_range_mm": [0.0, 5.0 * (slices_per_patient - 1)],
                     "original_shards": [files["original"]], "augmented_shards": [files["augmented"]],
                     "num_original_examples": counts["original"], "num_augmented_examples": counts["augmented"]})
  manifest = {
      "format": "pdx-tf-dataset",
      "schema_version": records.SCHEMA_VERSION if schema_version is None else schema_version,
      "code_version": "test", "config": {}, "seed": seed, "augment_factor": augment_factor,
      "preprocess": {"image_size": image_size, "windows": [[40.0, 400.0]], "body_threshold_hu": -500.0,
                     "crop_margin_fraction": 0.04},
      "augment": {"rotation_max_deg": 15.0, "flip_probability": 0.5, "scale_min": 0.9, "scale_max": 1.1},
      "covariate_names": ["site"], "patients": patients, "shards": shards,
      "counts": {"patients": num_patients, "failed_patients": 0, "slices": num_patients * slices_per_patient,
                 "original_examples": num_patients * slices_per_patient,
                 "augmented_examples": num_patients * slices_per_patient * augment_factor, "shards": len(shards)}}
  io_utils.atomic_write_json(os.path.join(records_dir, "dataset.json"), manifest)
  return manifest
