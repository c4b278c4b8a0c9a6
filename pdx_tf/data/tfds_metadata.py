"""TFDS metadata for the data pipeline's output D/, so TensorFlow Datasets reads our records as they are.

Written next to dataset.json (by `pipeline.finish_run`, which both runners call), it lets a notebook open D/ with

  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory("D")
  ds = builder.as_dataset(split="original-P001+original-P002")      # two patients' original slices
  ds = builder.as_dataset(split="+".join(builder.info.metadata["original_splits"]))   # every original slice

and decodes the same tensors as `pdx_tf.data.records.parse_example` (image uint8 [S, S, 3]: a one-window PNG is
tiled to RGB by the decoder in both; covariates under "covariate" as a dict of strings; pci_scores int64 [13]
when the manifest had PCI columns).

Splits are per patient because TFDS names every file of a split from one template and a shard index, while D/
names files by patient (shards.py): `original-<name>` is original/<patient_id>.tfrecord (one shard), and
`augmented-<name>` holds augmented/<patient_id>-bBBBBB-00000.tfrecord, one shard a block (`augmented-<name>-pNNNNN`
holds part NNNNN when a block was split into parts). <name> is the patient_id with "." written "_" (TFDS split
names are [A-Za-z0-9_-]); metadata["split_patient_ids"] maps every split back to its patient_id, and patient-level
selections (the training grid's folds) stay a choice of splits, never a slice of one.

What it writes: D/dataset_info.json, D/features.json and D/metadata.json (TFDS's names), each atomically; nothing
else in D/ changes, and dataset.json (its content and hash) is untouched. It carries only what dataset.json
already holds (pseudonymous patient IDs, counts, sizes): no DICOM identifier and no path outside D/. When dataset.json is not
written (patients failed, or a partition), stale TFDS metadata is removed so it never describes other shards.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any, Mapping

from pdx_tf import io_utils
from pdx_tf.data import records

DATASET_NAME = "pdx_tf_records"
# TFDS's names: the splits and features, and the DatasetInfo.metadata (the split -> patient map).
METADATA_FILES = ("dataset_info.json", "features.json", "metadata.json")
_AUGMENTED_NAME = re.compile(r"augmented/(?P<patient>.+)-b(?P<block>\d{5})-(?P<part>\d{5})\.tfrecord")
_FILE_FORMAT = "tfrecord"


def split_name(kind: str, patient_id: str, part: int | None = None) -> str:
  """The TFDS split of a patient's `kind` ("original" or "augmented") files (part > 0: that part of each block)."""
  name = f"{kind}-{patient_id.replace('.', '_')}"
  return name if not part else f"{name}-p{part:05d}"


def _literal(text: str) -> str:
  """`text` inside a str.format template (TFDS formats file templates)."""
  return text.replace("{", "{{").replace("}", "}}")


def features(image_size: int, covariate_names: list[str], with_pci_scores: bool):
  """The TFDS FeaturesDict of the records' schema (records.feature_spec, feature for feature)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  scalar = lambda dtype: tfds.features.Tensor(shape=(), dtype=dtype)  # noqa: E731
  spec = {
      records.SCHEMA_VERSION_KEY: scalar(tf.int64),
      # Always 3 channels: TFDS decodes with the shape's channels, so a one-window PNG is tiled as parse_example does.
      records.IMAGE_KEY: tfds.features.Image(shape=(image_size, image_size, 3), encoding_format="png"),
      records.IMAGE_SIZE_KEY: scalar(tf.int64),
      records.PATIENT_ID_KEY: scalar(tf.string),
      records.SLICE_INDEX_KEY: scalar(tf.int64),
      records.Z_MM_KEY: scalar(tf.float32),
      records.AUGMENTATION_INDEX_KEY: scalar(tf.int64),
      records.LABEL_P_KEY: scalar(tf.int64),
      records.LABEL_SB_KEY: scalar(tf.int64),
  }
  if with_pci_scores:  # written only when the manifest had PCI columns; TFDS has no default for a missing feature
    spec[records.PCI_SCORES_KEY] = tfds.features.Tensor(shape=(records.NUM_PCI_REGIONS,), dtype=tf.int64)
  if covariate_names:  # nested: TFDS stores {"covariate": {"age": ...}} as the key "covariate/age", as we do
    spec[records.COVARIATE_PREFIX.rstrip("/")] = {name: scalar(tf.string) for name in covariate_names}
  return tfds.features.FeaturesDict(spec)


def _split_groups(dataset: Mapping[str, Any]) -> list[dict]:
  """[{name, patient_id, template, shard_lengths, num_bytes}] from dataset.json's shard list, sorted by name.

  Raises:
    ValueError: a patient's blocks of one part are not 0..n-1 (no TFDS template can name them).
  """
  groups: dict[str, dict] = {}
  for shard in dataset["shards"]:
    patient_id = shard["patient_id"]
    if shard["kind"] == "original":
      key, index, template = split_name("original", patient_id), 0, _literal(shard["path"])
    else:
      match = _AUGMENTED_NAME.fullmatch(shard["path"])
      if not match or match.group("patient") != patient_id:
        raise ValueError(f"patient {patient_id}: augmented shard name {shard['path']!r} is not the shards.py layout")
      part = int(match.group("part"))
      key, index = split_name("augmented", patient_id, part), int(match.group("block"))
      # TFDS writes the shard index with 5 digits (more beyond 99,999 shards), as shards.py writes the block.
      template = _literal(f"augmented/{patient_id}-b") + "{SHARD_INDEX}" + _literal(f"-{part:05d}.tfrecord")
    group = groups.setdefault(key, {"name": key, "patient_id": patient_id, "template": template, "shards": {}})
    group["shards"][index] = shard
  result = []
  for key in sorted(groups):
    group = groups[key]
    if sorted(group["shards"]) != list(range(len(group["shards"]))):
      raise ValueError(f"patient {group['patient_id']}: blocks {sorted(group['shards'])} of split {key} are not"
                       " numbered 0..n-1")
    ordered = [group["shards"][index] for index in range(len(group["shards"]))]
    result.append({"name": key, "patient_id": group["patient_id"], "template": group["template"],
                   "shard_lengths": [int(shard["num_examples"]) for shard in ordered],
                   "num_bytes": sum(int(shard["num_bytes"]) for shard in ordered)})
  return result


def write_metadata(output_dir: str, dataset: Mapping[str, Any]) -> None:
  """Writes D/dataset_info.json, features.json and metadata.json for `dataset` (the dataset.json just written to
  `output_dir`).

  Raises:
    ImportError: tensorflow-datasets is not installed.
    ValueError: the shard list cannot be described as TFDS splits (see `_split_groups`).
  """
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  groups = _split_groups(dataset)
  with_pci = any(patient.get("pci_scores") is not None for patient in dataset["patients"])
  covariate_names = list(dataset.get("covariate_names", []))
  info = tfds.core.DatasetInfo(
      builder=tfds.core.DatasetIdentity(name=DATASET_NAME, version=f"{records.SCHEMA_VERSION}.0.0",
                                        data_dir=output_dir, module_name=""),
      features=features(int(dataset["preprocess"]["image_size"]), covariate_names, with_pci),
      description=("pdx-tf records (pdx_tf/data/records.py, schema version "
                   f"{records.SCHEMA_VERSION}): one split a patient and kind (original, augmented); see "
                   "pdx_tf/data/tfds_metadata.py. dataset.json is the pipeline's own manifest."),
      metadata=tfds.core.MetadataDict(
          original_splits=[group["name"] for group in groups if group["name"].startswith("original-")],
          augmented_splits=[group["name"] for group in groups if group["name"].startswith("augmented-")],
          split_patient_ids={group["name"]: group["patient_id"] for group in groups}),
  )
  info.set_file_format(_FILE_FORMAT)
  info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=group["name"], shard_lengths=group["shard_lengths"], num_bytes=group["num_bytes"],
                          filename_template=tfds.core.ShardedFileTemplate(
                              data_dir=output_dir, template=group["template"], dataset_name=DATASET_NAME,
                              split=group["name"], filetype_suffix=_FILE_FORMAT))
      for group in groups]))
  # TFDS writes its files non-atomically: write them locally, then move each into D/ atomically (D may be gs://).
  with tempfile.TemporaryDirectory() as local:
    info.write_to_directory(local)
    for name in sorted(os.listdir(local)):
      with open(os.path.join(local, name), "rb") as handle:
        io_utils.atomic_write_bytes(io_utils.join(output_dir, name), handle.read())


def remove_metadata(output_dir: str) -> None:
  """Removes TFDS metadata from D/ (it would describe shards that are being rebuilt)."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  for name in METADATA_FILES:
    path = io_utils.join(output_dir, name)
    if tf.io.gfile.exists(path):
      tf.io.gfile.remove(path)


def update_metadata(output_dir: str, dataset: Mapping[str, Any] | None) -> None:
  """The pipeline's one call: TFDS metadata for `dataset` (just written), or none when dataset.json was not written.

  Without tensorflow-datasets, or with shards TFDS cannot describe, it logs one line and leaves no TFDS metadata:
  the records and dataset.json, which training reads, are complete either way.
  """
  remove_metadata(output_dir)
  if dataset is None:
    return
  try:
    write_metadata(output_dir, dataset)
  except ImportError as error:
    logging.warning("TFDS metadata not written (%s): pip install tensorflow-datasets, then rerun the pipeline"
                    " (finished patients are reused)", error)
  except ValueError as error:
    logging.warning("TFDS metadata not written: %s", error)
