"""Writes a tiny fake records folder (TFRecords + dataset.json, the CONTRACTS.md layout) with pdx_tf.data.records.

Images are keyed noise; positive patients (label_p = 1) carry a bright square whose position varies with the
slice and augmentation index, so a model can learn the task. Augmented copies are laid out in blocks of
`augment_block` copies (augmented/<patient_id>-bBBBBB-00000.tfrecord); images have one channel (one window)
unless `channels=3`. Labels alternate so any stratified split of an
even number of patients has both classes in every fold.

With `pci=True` every patient also has 13 PCI region scores (`fake_pci_scores`: a p-negative patient none, a
p-positive one some of regions 0-8 and regions 9-12 exactly when label_sb), in dataset.json (the manifest's view)
and in every record, mirrored (contracts.pci_mirror) in an augmented copy whose keyed augmentation
(augment.random_parameters with dataset.json's "augment") flips it, as the data pipeline does.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import tensorflow as tf

from pdx_tf import contracts, io_utils
from pdx_tf.data import augment, records


def patient_ids(num_patients: int) -> list[str]:
  return [f"fake{index:03d}" for index in range(num_patients)]


def fake_pci_scores(patient_index: int, label_p: int, label_sb: int,
                    unrecorded: tuple[int, ...] = ()) -> list[int]:
  """A fake patient's 13 PCI scores (module docstring): region r of 0-8 scores (patient_index + r) % 4 when
  label_p; regions 9-12 score 1 + (patient_index + r) % 3 when label_p and label_sb, else 0; `unrecorded`
  regions -1."""
  scores = []
  for region in range(contracts.NUM_PCI_REGIONS):
    if region in unrecorded:
      scores.append(contracts.PCI_UNRECORDED)
    elif region in contracts.PCI_SMALL_BOWEL_REGIONS:
      scores.append(1 + (patient_index + region) % 3 if label_p and label_sb else 0)
    else:
      scores.append((patient_index + region) % 4 if label_p else 0)
  return scores


def fake_image(seed: int, patient_index: int, slice_index: int, augmentation_index: int, positive: bool,
               image_size: int, channels: int = 3) -> np.ndarray:
  rng = np.random.default_rng([seed, patient_index, slice_index, augmentation_index])
  image = rng.integers(0, 80, size=(image_size, image_size), dtype=np.int64)
  if positive:
    side = max(4, image_size // 5)
    top, left = rng.integers(0, image_size - side, size=2)
    image[top:top + side, left:left + side] = 230
  return np.repeat(image.astype(np.uint8)[..., np.newaxis], channels, axis=-1)


def write_fake_records(records_dir: str, *, num_patients: int = 8, slices_per_patient: int | list[int] = 3,
                       augment_factor: int = 4, augment_block: int = 2, image_size: int = 32, seed: int = 0,
                       label_sb_every: int = 4, schema_version: int | None = None, channels: int = 1,
                       ids: list[str] | None = None, labels_p: list[int] | None = None, pci: bool = False,
                       pci_unrecorded: dict[int, tuple[int, ...]] | None = None) -> dict[str, Any]:
  """Writes records_dir/{original,augmented}/*.tfrecord and dataset.json; returns the dataset.json dict.

  Patient i has label_p = 1 for even i (or `labels_p[i]`) and label_sb = 1 when i % label_sb_every == 0;
  covariate `site`. `slices_per_patient` may differ per patient (a list). `schema_version` overrides the
  manifest's version (to test the mismatch error). `pci`: write PCI region scores (module docstring);
  `pci_unrecorded`: patient index -> its regions left unrecorded (-1; all 13 for a patient without region labels).
  """
  augment_settings = {"rotation_max_deg": 15.0, "flip_probability": 0.5, "scale_min": 0.9, "scale_max": 1.1}
  augment_config = augment.AugmentConfig(**augment_settings)
  os.makedirs(os.path.join(records_dir, "original"), exist_ok=True)
  os.makedirs(os.path.join(records_dir, "augmented"), exist_ok=True)
  ids = ids or patient_ids(num_patients)
  slice_counts = (slices_per_patient if isinstance(slices_per_patient, list)
                  else [slices_per_patient] * len(ids))
  num_blocks = -(-augment_factor // augment_block)
  patients, shards = [], []
  for index, patient_id in enumerate(ids):
    label_p = int(index % 2 == 0) if labels_p is None else int(labels_p[index])
    label_sb = int(index % label_sb_every == 0)
    covariates = {"site": "A" if index % 3 else "B"}
    scores = (fake_pci_scores(index, label_p, label_sb, tuple((pci_unrecorded or {}).get(index, ())))
              if pci else None)
    files = [("original", None, f"original/{patient_id}.tfrecord", [0])]
    for block in range(num_blocks):
      copies = range(block * augment_block + 1, min(augment_factor, (block + 1) * augment_block) + 1)
      files.append(("augmented", block, f"augmented/{patient_id}-b{block:05d}-00000.tfrecord", copies))
    counts = {"original": 0, "augmented": 0}
    for kind, block, relative, indices in files:
      path = os.path.join(records_dir, relative)
      count = 0
      with tf.io.TFRecordWriter(path) as writer:
        for slice_index in range(slice_counts[index]):
          for augmentation_index in indices:
            image = fake_image(seed, index, slice_index, augmentation_index, bool(label_p), image_size, channels)
            image_scores = scores
            if scores is not None and augmentation_index and augment.random_parameters(
                seed, patient_id, slice_index, augmentation_index, augment_config)[1]:
              image_scores = contracts.pci_mirror(scores)  # this copy is flipped left-right
            example = records.make_example(
                records.encode_image(image), image_size=image_size, patient_id=patient_id, slice_index=slice_index,
                z_mm=5.0 * slice_index, augmentation_index=augmentation_index, label_p=label_p, label_sb=label_sb,
                covariates=covariates, pci_scores=image_scores)
            writer.write(example.SerializeToString())
            count += 1
      counts[kind] += count
      shard = {"path": relative, "patient_id": patient_id, "kind": kind, "num_examples": count,
               "num_bytes": os.path.getsize(path), "sha256": io_utils.sha256_file(path)}
      if block is not None:
        shard["block"] = block
      shards.append(shard)
    patients.append({"patient_id": patient_id, "label_p": label_p, "label_sb": label_sb, "covariates": covariates,
                     "num_slices": slice_counts[index], "z_range_mm": [0.0, 5.0 * (slice_counts[index] - 1)],
                     "original_shards": [files[0][2]], "augmented_shards": [file[2] for file in files[1:]],
                     "num_original_examples": counts["original"], "num_augmented_examples": counts["augmented"],
                     "num_augmented_blocks": num_blocks,
                     **({"pci_scores": [None if value < 0 else value for value in scores]} if pci else {})})
  manifest = {
      "format": "pdx-tf-dataset",
      "schema_version": records.SCHEMA_VERSION if schema_version is None else schema_version,
      "code_version": "test", "config": {}, "seed": seed, "augment_factor": augment_factor,
      "augment_block": augment_block,
      "preprocess": {"image_size": image_size,
                     "windows": [[40.0, 400.0]] if channels == 1 else [[40.0, 400.0], [50.0, 150.0], [-600.0, 1500.0]],
                     "body_threshold_hu": -500.0, "crop_margin_fraction": 0.04},
      "augment": augment_settings,
      "covariate_names": ["site"], "patients": patients, "shards": shards,
      "counts": {"patients": len(ids), "failed_patients": 0, "slices": sum(slice_counts),
                 "original_examples": sum(p["num_original_examples"] for p in patients),
                 "augmented_examples": sum(p["num_augmented_examples"] for p in patients), "shards": len(shards)}}
  io_utils.atomic_write_json(os.path.join(records_dir, "dataset.json"), manifest)
  return manifest
