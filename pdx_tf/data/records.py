"""The TFRecord schema: feature keys, schema version and the make/parse pair.

Every example is one slice image (original or augmented) with its provenance: the manifest patient ID, the
slice's index among the patient's abdominal slices, its z position, the augmentation index (0 = original), both
task labels and the manifest covariates. Images are PNG-encoded uint8 [S, S, C]: C = 1 when the preprocessing
has one HU window (a third of the bytes of three identical channels), C = 3 for three windows. Readers decode
with `channels=3` (a one-channel PNG is tiled to RGB by the decoder), so the model input stays [S, S, 3].

Schema history: version 1 stored every image with 3 channels and one augmented file series per patient;
version 2 (this one) stores one-window images with 1 channel and lays the augmented copies out in blocks
(`pdx_tf.data.shards`). Version-1 records are refused with the rebuild command.

`parse_example` works eagerly and inside `tf.data` (graph mode); the covariate names come from dataset.json.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import contracts

# The version and its check live in contracts.py (the core), which reads dataset.json without importing a stage.
SCHEMA_VERSION = contracts.RECORDS_SCHEMA_VERSION
check_schema_version = contracts.check_records_schema_version

SCHEMA_VERSION_KEY = "schema_version"
IMAGE_KEY = "image"  # PNG bytes of a uint8 [S, S, 1] or [S, S, 3] image.
IMAGE_SIZE_KEY = "image_size"
PATIENT_ID_KEY = "patient_id"
SLICE_INDEX_KEY = "slice_index"
Z_MM_KEY = "z_mm"
AUGMENTATION_INDEX_KEY = "augmentation_index"
LABEL_P_KEY = "label_p"
LABEL_SB_KEY = "label_sb"
COVARIATE_PREFIX = "covariate/"
# int64 [13] PCI lesion-size scores of the patient (contracts.PCI_REGION_NAMES order), -1 where not recorded,
# already mirrored (contracts.pci_mirror) for an augmented copy that was flipped left-right, so every image's
# scores describe what it shows. Written only when the manifest has PCI columns (older records and cohorts
# without them parse as all -1, and their bytes are unchanged).
PCI_SCORES_KEY = "pci_scores"
NUM_PCI_REGIONS = 13  # = contracts.NUM_PCI_REGIONS (records stay free of the core's imports)

LABEL_KEYS = {"p": LABEL_P_KEY, "sb": LABEL_SB_KEY}  # one per contracts.TASKS


def label_key(task: str) -> str:
  """The label feature of a task (`p` or `sb`)."""
  if task not in LABEL_KEYS:
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(LABEL_KEYS)}")
  return LABEL_KEYS[task]


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))


def _float(value: float) -> tf.train.Feature:
  return tf.train.Feature(float_list=tf.train.FloatList(value=[float(value)]))


# zlib level 1: 3-4x faster than the default level for the same size on CT slices (measured in the ingest
# benchmark), and PNG encoding is the pipeline's main cost.
PNG_COMPRESSION = 1


def encode_image(image: np.ndarray | tf.Tensor) -> bytes:
  """PNG-encodes a uint8 [S, S, 1] (one window) or [S, S, 3] image."""
  image = tf.convert_to_tensor(image)
  if image.dtype != tf.uint8 or image.shape.rank != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(f"images must be uint8 [S, S, 1] or [S, S, 3], got {image.dtype.name} {image.shape}")
  return tf.io.encode_png(image, compression=PNG_COMPRESSION).numpy()


def make_example(image_png: bytes, *, image_size: int, patient_id: str, slice_index: int, z_mm: float,
                 augmentation_index: int, label_p: int, label_sb: int,
                 covariates: Mapping[str, str] | None = None,
                 pci_scores: Sequence[int] | None = None) -> tf.train.Example:
  """Builds one example.

  Args:
    image_png: PNG bytes of the uint8 [image_size, image_size, 1 or 3] image (see `encode_image`).
    image_size: the image's side in pixels.
    patient_id: pseudonymous manifest ID (never a DICOM identifier).
    slice_index: index among the patient's selected abdominal slices, ordered by z.
    z_mm: slice position along the patient axis.
    augmentation_index: 0 for the original, 1..N for augmented copies.
    label_p: any peritoneal dissemination (0/1).
    label_sb: small-bowel dissemination (0/1).
    covariates: manifest covariates as strings, carried through for subgroup analysis.
    pci_scores: 13 PCI lesion-size scores (0-3, -1 = not recorded) as this image shows them (mirrored for a
      flipped copy); None writes no PCI feature.
  """
  features = {
      SCHEMA_VERSION_KEY: _int(SCHEMA_VERSION),
      IMAGE_KEY: _bytes(image_png),
      IMAGE_SIZE_KEY: _int(image_size),
      PATIENT_ID_KEY: _bytes(patient_id.encode("utf-8")),
      SLICE_INDEX_KEY: _int(slice_index),
      Z_MM_KEY: _float(z_mm),
      AUGMENTATION_INDEX_KEY: _int(augmentation_index),
      LABEL_P_KEY: _int(label_p),
      LABEL_SB_KEY: _int(label_sb),
  }
  if pci_scores is not None:
    if len(pci_scores) != NUM_PCI_REGIONS:
      raise ValueError(f"pci_scores must hold {NUM_PCI_REGIONS} scores, got {len(pci_scores)}")
    features[PCI_SCORES_KEY] = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(v) for v in pci_scores]))
  for name, value in (covariates or {}).items():
    features[COVARIATE_PREFIX + name] = _bytes(str(value).encode("utf-8"))
  return tf.train.Example(features=tf.train.Features(feature=features))


def feature_spec(covariate_names: Sequence[str] = ()) -> dict[str, tf.io.FixedLenFeature]:
  """The parsing spec of the schema (covariates default to an empty string when absent)."""
  spec = {
      SCHEMA_VERSION_KEY: tf.io.FixedLenFeature([], tf.int64),
      IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
      IMAGE_SIZE_KEY: tf.io.FixedLenFeature([], tf.int64),
      PATIENT_ID_KEY: tf.io.FixedLenFeature([], tf.string),
      SLICE_INDEX_KEY: tf.io.FixedLenFeature([], tf.int64),
      Z_MM_KEY: tf.io.FixedLenFeature([], tf.float32),
      AUGMENTATION_INDEX_KEY: tf.io.FixedLenFeature([], tf.int64),
      LABEL_P_KEY: tf.io.FixedLenFeature([], tf.int64),
      LABEL_SB_KEY: tf.io.FixedLenFeature([], tf.int64),
      PCI_SCORES_KEY: tf.io.FixedLenFeature([NUM_PCI_REGIONS], tf.int64, default_value=[-1] * NUM_PCI_REGIONS),
  }
  for name in covariate_names:
    spec[COVARIATE_PREFIX + name] = tf.io.FixedLenFeature([], tf.string, default_value="")
  return spec


def parse_example(serialized: tf.Tensor | bytes, covariate_names: Sequence[str] = (),
                  decode_image: bool = True) -> dict[str, tf.Tensor]:
  """Parses one serialized example into a dict keyed by the feature keys.

  `image` is decoded to uint8 [S, S, 3] (a one-channel image is tiled; unless `decode_image=False`, which keeps the PNG bytes);
  covariates appear under their plain names. Works eagerly and in `tf.data.Dataset.map`.
  """
  parsed = tf.io.parse_single_example(serialized, feature_spec(covariate_names))
  if decode_image:
    image = tf.io.decode_png(parsed[IMAGE_KEY], channels=3)
    size = tf.cast(parsed[IMAGE_SIZE_KEY], tf.int32)
    parsed[IMAGE_KEY] = tf.reshape(image, tf.stack([size, size, 3]))
  for name in covariate_names:
    parsed[name] = parsed.pop(COVARIATE_PREFIX + name)
  return parsed
