"""The data pipeline: DICOM studies + manifest -> per-patient TFRecord shards, QC pictures and dataset.json.

For every manifest row: read the series (`pdx_tf.data.dicom`), keep the abdominal slices (`pdx_tf.data.region`), make the
original images with `preprocess.preprocess_slices` and `augment_factor` augmented copies of every slice
(`preprocess.crop_resize_hu` on the body box, `augment.random_augment_hu`, `preprocess.window_hu`), write them
as TFRecords (`pdx_tf.data.records`) and a QC montage, then a completion marker. Patients run in worker processes.
At the end, failures.csv, qc/index.html and, when nothing failed (or `allow_failures`), dataset.json, whose
presence means the dataset is complete.

Reruns: a patient whose marker matches the current config and manifest row, and whose files have the sizes
the marker records, is skipped; any other patient is cleaned and redone. dataset.json is removed at the start
of a run and rewritten at its end from the markers, so it never describes a half-updated folder.

Every output is a pure function of the inputs and the config: a rerun writes identical bytes.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import multiprocessing
import os
import shutil
import sys
import time
from typing import Iterator, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import cli, configs, contracts, io_utils, presets, provenance, settings as settings_lib
from pdx_tf.contracts import DATASET_FILE, DATASET_FORMAT, DEFAULT_MIN_SLICES
from pdx_tf.data import augment, manifest as manifest_lib, preprocess, qc, records, region, shards
from pdx_tf.data import input_statistics
from pdx_tf.data import tfds_metadata
from pdx_tf.errors import PdxError

PAPER_AUGMENT_FACTOR = 960  # The study augmented every slice about 960-fold.
# Augmented copies per block file (`pdx_tf.data.shards`): a cell's pool draw takes whole blocks, so
# --pool_fraction has a resolution of one block (2 of 960 copies at the paper's factor, i.e. 1/480), and an epoch
# smaller than the pool reads whole files (input_pipeline.epoch_shards): at 2 copies of ~40 slices a file
# (~1.7 MB at 224 px), the paper's 16,000-image epochs read about one file of each of ~199 training patients, so
# every epoch still sees every patient; blocks of 16 would read only ~25 patients an epoch.
DEFAULT_AUGMENT_BLOCK = 2
DATASET_JSON = DATASET_FILE
FAILURES_CSV = "failures.csv"
CONFIG_JSON = "config.json"
QC_INDEX = "qc/index.html"
SLICE_BATCH = 16  # Slices preprocessed together (bounds memory for large matrices).
AUGMENT_BATCH = 64  # Augmented copies warped together.
ENCODE_BATCH = 256  # Images handed to the encoding threads at a time (bounds memory).
# Fields that change how a run executes but not what it writes: left out of dataset.json (and of the
# per-patient fingerprints), so the dataset hash does not depend on parallelism or on where D lives.
EXECUTION_ONLY_FIELDS = ("output_dir", "num_workers", "allow_failures", "num_partitions", "partition_index")
# The demo's 8 copies in blocks of 2, so the demo's pool fraction (0.25) still draws 2 copies a slice.
DEMO_OUTPUT_DIR = "runs/demo/records"


def default_num_workers() -> int:
  """min(CPU count, 4): more processes rarely help, as each TF process already uses several cores."""
  return max(1, min(os.cpu_count() or 1, 4))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Everything that decides the pipeline's output (written to D/config.json and dataset.json).

  Attributes:
    manifest_path: the cohort CSV (see `pdx_tf.data.manifest`).
    output_dir: D, local or any tf.io.gfile URL.
    preprocess: image size, windows, body crop.
    augment: rotation, flip and scale ranges.
    region: parameters of the automatic abdominal range.
    augment_factor: augmented copies per slice (the paper: 960); 0 writes originals only.
    augment_block: augmented copies per block file; copies [b * augment_block + 1, (b + 1) * augment_block] of
      every slice of a patient share block b's files, the unit of the training pool draw. With augment_factor
      <= augment_block a patient has one block.
    seed: augmentation seed; each copy is keyed by (seed, patient_id, slice_index, augmentation_index).
    num_workers: patient-level worker processes; 1 runs in this process.
    allow_failures: write dataset.json (and exit 0) even if some patients failed; they are left out.
    slice_spacing_mm: average thin abdominal slices into slabs of this thickness (`pdx_tf.data.region`); a study
      already at about this spacing keeps its slices; 0 keeps every study's native slices.
    slice_thickness_mm: the automatic series choice prefers the slice thickness nearest this (see
      `pdx_tf.data.dicom.read_ct_series`); a manifest series_uid wins.
    shard_size_mb: the largest augmented shard, in MiB.
    min_slices: fewest slices accepted, in the series and in the abdominal range.
    write_qc: write the QC montages and index page.
    qc_max_slices: slices shown per montage.
    num_partitions: split the manifest's patients into this many partitions (by a stable hash of patient_id)
      to run on several machines into one output_dir; see `run_pipeline`.
    partition_index: the partition this run processes (0 <= partition_index < num_partitions).
  """

  manifest_path: str
  output_dir: str
  preprocess: preprocess.PreprocessConfig = preprocess.PreprocessConfig()
  augment: augment.AugmentConfig = augment.AugmentConfig()
  region: region.RegionConfig = region.RegionConfig()
  augment_factor: int = PAPER_AUGMENT_FACTOR
  augment_block: int = DEFAULT_AUGMENT_BLOCK
  seed: int = 0
  num_workers: int = 1
  allow_failures: bool = False
  slice_spacing_mm: float = 5.0
  slice_thickness_mm: float = 5.0  # pdx_tf.data.dicom.DEFAULT_SLICE_THICKNESS_MM (dicom is imported lazily).
  shard_size_mb: float = 150.0
  min_slices: int = DEFAULT_MIN_SLICES
  write_qc: bool = True
  qc_max_slices: int = 16
  num_partitions: int = 1
  partition_index: int = 0

  def __post_init__(self):
    if not self.manifest_path:
      raise ValueError("manifest_path is empty; pass the cohort CSV")
    if not self.output_dir:
      raise ValueError("output_dir is empty; pass the folder for the records")
    # The augmentation's checks are the typed hand-off's (what dataset.json's reader will check again).
    settings_lib.AugmentSettings(config=self.augment, augment_factor=self.augment_factor,
                                 augment_block=self.augment_block, seed=self.seed)
    if self.num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")
    if self.slice_spacing_mm is not None and not self.slice_spacing_mm >= 0:
      raise ValueError(f"slice_spacing_mm must be >= 0 (0 keeps the native slices), got {self.slice_spacing_mm}")
    if not self.slice_thickness_mm > 0:
      raise ValueError(f"slice_thickness_mm must be positive, got {self.slice_thickness_mm}")
    if not self.shard_size_mb > 0:
      raise ValueError(f"shard_size_mb must be positive, got {self.shard_size_mb}")
    if self.min_slices < 1:
      raise ValueError(f"min_slices must be >= 1, got {self.min_slices}")
    if self.qc_max_slices < 1:
      raise ValueError(f"qc_max_slices must be >= 1, got {self.qc_max_slices}")
    if self.num_partitions < 1 or not 0 <= self.partition_index < self.num_partitions:
      raise ValueError(f"need num_partitions >= 1 and 0 <= partition_index < num_partitions, got "
                       f"{self.partition_index} of {self.num_partitions}")


@dataclasses.dataclass(frozen=True)
class PipelineResult:
  """What a run did.

  Attributes:
    output_dir: D.
    dataset_json: path of dataset.json, or None when patients failed without allow_failures.
    num_patients: patients in the dataset (written now or reused).
    num_reused: of those, finished by an earlier run and skipped.
    failures: (patient_id, reason) of the failed patients, sorted.
    num_slices: abdominal slices over the dataset's patients.
    num_original_examples: original examples.
    num_augmented_examples: augmented examples.
    num_bytes: bytes of all shards.
    wall_time_s: duration of this run.
    processed_slices: slices processed by this run (not reused).
    partitioned: this run was one partition of several (no run-level files written).
  """

  output_dir: str
  dataset_json: str | None
  num_patients: int
  num_reused: int
  failures: tuple[tuple[str, str], ...]
  num_slices: int
  num_original_examples: int
  num_augmented_examples: int
  num_bytes: int
  wall_time_s: float
  processed_slices: int
  partitioned: bool = False

  @property
  def ok(self) -> bool:
    """True when the dataset was written (no failures, or failures allowed); for a partition, no failures."""
    return not self.failures if self.partitioned else self.dataset_json is not None

  def summary(self) -> str:
    """A few human lines for the end of a run."""
    rate = self.processed_slices / self.wall_time_s if self.wall_time_s > 0 else 0.0
    lines = [
        f"patients: {self.num_patients} ok ({self.num_reused} reused from an earlier run), "
        f"{len(self.failures)} failed",
        f"slices: {self.num_slices}; examples: {self.num_original_examples} original + "
        f"{self.num_augmented_examples} augmented; {self.num_bytes / shards.MEGABYTE:.1f} MiB of records",
        f"time: {self.wall_time_s:.1f} s ({rate:.1f} slices/s processed this run)",
    ]
    if self.dataset_json:
      lines.append(f"dataset: {self.dataset_json}")
    elif self.partitioned:
      lines.append("partition done; after every partition, run once without partitions to write dataset.json")
    else:
      lines.append(f"dataset.json NOT written: {len(self.failures)} patient(s) failed (see "
                   f"{io_utils.join(self.output_dir, FAILURES_CSV)}); fix them and rerun (finished patients are "
                   "skipped), or pass --allow_failures to build the dataset without them")
    return "\n".join(lines)


def _content_config(config: PipelineConfig) -> dict:
  values = configs.to_dict(config)
  for name in EXECUTION_ONLY_FIELDS:
    values.pop(name, None)
  values["augment"] = augment.settings_dict(config.augment)  # an opt-in augmentation left off changes no hash
  return values


def patient_fingerprint(config: PipelineConfig, row: manifest_lib.ManifestRow) -> str:
  """A hash of everything that decides a patient's files (config and manifest row).

  The study folder (resolved) and series override enter only through their hash, so the marker holds no path
  or UID.
  """
  values = _content_config(config)
  values.pop("manifest_path")  # Which file listed the patient does not matter; its row does.
  fields = {
      "config": values, "code_schema": records.SCHEMA_VERSION, "patient_id": row.patient_id,
      "label_p": row.label_p, "label_sb": row.label_sb, "covariates": dict(row.covariates),
      "z_min_mm": row.z_min_mm, "z_max_mm": row.z_max_mm,
      "source": io_utils.sha256_bytes(f"{row.dicom_dir}\n{row.series_uid or ''}".encode("utf-8")),
  }
  if row.pci_scores is not None:  # Only then: finished patients of cohorts without PCI columns stay reusable.
    fields["pci_scores"] = list(row.pci_scores)
  return io_utils.sha256_json(fields)


@functools.lru_cache(maxsize=8)
def _traced_preprocessing(config: preprocess.PreprocessConfig):
  """`preprocess_slices` step by step, traced once per config for any stack shape.

  Traced because the body mask's label propagation is a while loop, slow op by op eagerly; the shape-free
  signature keeps one trace for every patient (TensorFlow would otherwise retrace per matrix and block size).
  """

  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32)])
  def boxes_crops_and_originals(hu: tf.Tensor):
    return crops_and_originals(hu, preprocess.body_boxes(hu, config))

  @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32),
                                tf.TensorSpec([None, preprocess.MASK_SIZE, preprocess.MASK_SIZE], tf.bool)])
  def from_masks(hu: tf.Tensor, masks: tf.Tensor):
    return crops_and_originals(hu, preprocess.boxes_from_masks(masks, tf.shape(hu)[1], tf.shape(hu)[2], config))

  def crops_and_originals(hu, boxes):
    crops = preprocess.crop_resize_hu(hu, boxes, config.image_size)
    return boxes, crops, preprocess.window_hu(crops, config.windows)

  return boxes_crops_and_originals, from_masks


def _boxes_crops_and_originals(hu: tf.Tensor, config: preprocess.PreprocessConfig,
                               masks: np.ndarray | None = None):
  """(boxes, cropped HU, original images): `preprocess_slices` step by step, keeping its intermediates.

  The body mask is the costly part of preprocessing, and augmentation needs the same boxes and crops, so
  they are computed once; `masks` (the z-range rule's `body_masks` of these slices) skips even that.
  `pipeline_test` checks that the originals equal `preprocess.preprocess_slices`.
  """
  from_hu, from_masks = _traced_preprocessing(config)
  if masks is None:
    return from_hu(tf.cast(hu, tf.float32))
  return from_masks(tf.cast(hu, tf.float32), tf.convert_to_tensor(masks, tf.bool))


@tf.function(reduce_retracing=True)
def _window(hu: tf.Tensor, windows: tuple[tuple[float, float], ...]) -> tf.Tensor:
  # Traced: eager windowing of a batch of copies costs more than the warp itself.
  return preprocess.window_hu(hu, windows)


def image_pci_scores(row: manifest_lib.ManifestRow, config: PipelineConfig, slice_index: int,
                     augmentation_index: int) -> list[int] | None:
  """The PCI region scores one image shows: the row's (PCI_UNRECORDED where not recorded), swapped left for right
  (`contracts.pci_mirror`) when this augmented copy was flipped left-right; None when the manifest has no PCI
  columns (no feature written).

  The flip is the one `augment.random_augment_hu` applies: `augment.is_flipped` of the copy's key.
  """
  if row.pci_scores is None:
    return None
  scores = [contracts.PCI_UNRECORDED if score is None else int(score) for score in row.pci_scores]
  if augment.is_flipped(config.seed, row.patient_id, slice_index, augmentation_index, config.augment):
    scores = contracts.pci_mirror(scores)
  return scores


def _serialize(image: np.ndarray, row: manifest_lib.ManifestRow, config: PipelineConfig, slice_index: int,
               z_mm: float, augmentation_index: int) -> bytes:
  if len(config.preprocess.windows) == 1:
    # One window: the three channels are equal; store one (a third of the PNG work and bytes), readers tile it.
    image = image[..., :1]
  example = records.make_example(
      records.encode_image(image), image_size=config.preprocess.image_size, patient_id=row.patient_id,
      slice_index=slice_index, z_mm=z_mm, augmentation_index=augmentation_index, label_p=row.label_p,
      label_sb=row.label_sb, covariates=row.covariates,
      pci_scores=image_pci_scores(row, config, slice_index, augmentation_index))
  # deterministic=True sorts the feature map: otherwise its order (and the bytes) can vary between processes.
  return example.SerializeToString(deterministic=True)


def patient_images(abdomen: region.AbdominalRegion, patient_id: str, config: PipelineConfig,
                   boxes_out: list | None = None) -> Iterator[tuple[int, float, int, np.ndarray]]:
  """Every image of a patient: (slice_index, z_mm, augmentation_index, uint8 [S, S, C] image).

  Per block of slices: the originals (augmentation_index 0), then each slice's copies 1..augment_factor.

  Args:
    abdomen: the patient's abdominal slices.
    patient_id: manifest ID (part of every copy's key).
    config: image, augmentation and seed settings.
    boxes_out: if given, receives the crop boxes [n, 4] of each block (for QC).
  """
  indices = np.arange(1, config.augment_factor + 1)
  # The z-range rule already computed the body masks; reuse them when they were made at the crop's threshold.
  masks = (abdomen.body_masks if abdomen.body_masks is not None
           and abdomen.body_threshold_hu == config.preprocess.body_threshold_hu else None)
  for start in range(0, abdomen.hu.shape[0], SLICE_BATCH):
    block = tf.constant(abdomen.hu[start:start + SLICE_BATCH])
    boxes, crops, originals = _boxes_crops_and_originals(
        block, config.preprocess, None if masks is None else masks[start:start + SLICE_BATCH])
    if boxes_out is not None:
      boxes_out.append(boxes.numpy())
    for offset, image in enumerate(originals.numpy()):
      yield start + offset, float(abdomen.z_mm[start + offset]), 0, image
    for offset in range(crops.shape[0]):
      slice_index = start + offset
      z_mm = float(abdomen.z_mm[slice_index])
      for chunk_start in range(0, indices.size, AUGMENT_BATCH):
        chunk = indices[chunk_start:chunk_start + AUGMENT_BATCH]
        warped = augment.random_augment_hu(crops[offset], config.seed, patient_id, slice_index, chunk,
                                           config.augment)
        for augmentation_index, image in zip(chunk, _window(warped, config.preprocess.windows).numpy()):
          yield slice_index, z_mm, int(augmentation_index), image


def write_patient_records(abdomen: region.AbdominalRegion, row: manifest_lib.ManifestRow, config: PipelineConfig,
                          original_writer: shards.ShardWriter,
                          augmented_writer: shards.BlockShardWriter) -> np.ndarray:
  """Writes a patient's original and augmented examples; returns the crop boxes [N, 4] (for QC).

  Augmented copy a goes to block `shards.augmentation_block(a, config.augment_block)`; one-window images are
  stored with one channel (`_serialize`).
  """
  all_boxes: list[np.ndarray] = []

  def serialize(item):
    slice_index, z_mm, augmentation_index, image = item
    return augmentation_index, _serialize(image, row, config, slice_index, z_mm, augmentation_index)

  def flush(pending):
    # pool.map keeps the order, so the shards' bytes do not depend on the thread count.
    for augmentation_index, serialized in pool.map(serialize, pending):
      if augmentation_index == 0:
        original_writer.write(serialized)
      else:
        augmented_writer.write(serialized, shards.augmentation_block(augmentation_index, config.augment_block))
    pending.clear()

  # PNG encoding dominates the cost and runs outside the GIL: a few threads per worker process.
  threads = max(1, (os.cpu_count() or 1) // config.num_workers)
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    pending: list = []
    for item in patient_images(abdomen, row.patient_id, config, all_boxes):
      pending.append(item)
      if len(pending) >= ENCODE_BATCH:
        flush(pending)
    flush(pending)
  return np.concatenate(all_boxes) if all_boxes else np.zeros([0, 4], np.float32)


def process_patient(row: manifest_lib.ManifestRow, config: PipelineConfig, *, show_paths: bool = False) -> dict:
  """Builds one patient's shards, QC montage and marker (cleaning any earlier partial output first).

  `show_paths` prints the real relative path of every file token in the patient's DICOM warnings or error to
  the console (local debugging); it changes no file.

  Returns:
    The completion marker (also written to D/patients/<patient_id>.json, last).

  Raises:
    PdxError (DicomError, RegionError, ...) for bad input; anything else is a bug or an environment problem.
  """
  from pdx_tf.data import dicom  # pylint: disable=import-outside-toplevel

  output_dir = config.output_dir
  shards.remove_patient_files(output_dir, row.patient_id)
  series = dicom.read_ct_series(row.dicom_dir, row.series_uid, min_slices=max(2, config.min_slices),
                                slice_thickness_mm=config.slice_thickness_mm, show_paths=show_paths)
  abdomen, _ = region.select_abdomen(
      series.hu, series.z_mm, series.pixel_spacing_mm, z_min_mm=row.z_min_mm, z_max_mm=row.z_max_mm,
      slice_spacing_mm=config.slice_spacing_mm, min_slices=config.min_slices, config=config.region,
      warnings=series.warnings)
  original_writer = shards.ShardWriter(output_dir, row.patient_id, "original")
  augmented_writer = shards.BlockShardWriter(output_dir, row.patient_id,
                                             max_bytes=int(config.shard_size_mb * shards.MEGABYTE))
  with original_writer, augmented_writer:
    boxes = write_patient_records(abdomen, row, config, original_writer, augmented_writer)
  qc_relative = None
  if config.write_qc:
    qc_relative = shards.qc_path(row.patient_id)
    png = qc.render_patient_montage(row.patient_id, series.hu, series.z_mm, series.pixel_spacing_mm, abdomen.hu,
                                    abdomen.z_mm, boxes, abdomen.z_range_mm, abdomen.rule, config.qc_max_slices,
                                    series=series.choice.to_json())
    io_utils.atomic_write_bytes(io_utils.join(output_dir, qc_relative), png)
  all_shards = original_writer.shards + augmented_writer.shards
  marker = {
      "patient_id": row.patient_id,
      "fingerprint": patient_fingerprint(config, row),
      "label_p": row.label_p,
      "label_sb": row.label_sb,
      "covariates": dict(row.covariates),
      **({} if row.pci_scores is None else {"pci_scores": list(row.pci_scores)}),
      "num_slices": int(abdomen.hu.shape[0]),
      "z_range_mm": [float(abdomen.z_range_mm[0]), float(abdomen.z_range_mm[1])],
      "z_range_rule": abdomen.rule,
      "series": series.choice.to_json(),  # Thickness, slice count, spacing of the chosen series; no UID.
      "warnings": list(abdomen.warnings),
      "input_statistics": input_statistics.patient_statistics(abdomen, series.choice, config.region.body_threshold_hu),
      "original_shards": [shard["path"] for shard in original_writer.shards],
      "augmented_shards": [shard["path"] for shard in augmented_writer.shards],
      "num_original_examples": sum(shard["num_examples"] for shard in original_writer.shards),
      "num_augmented_examples": sum(shard["num_examples"] for shard in augmented_writer.shards),
      "num_augmented_blocks": len({shard["block"] for shard in augmented_writer.shards}),
      "shards": all_shards,
      "qc_path": qc_relative,
      "code_version": provenance.code_version(),
  }
  io_utils.atomic_write_json(io_utils.join(output_dir, shards.marker_path(row.patient_id)), marker)
  return marker


def _run_patient(row: manifest_lib.ManifestRow, config: PipelineConfig,
                 show_paths: bool = False) -> tuple[str, dict | None, str | None, float]:
  """Worker entry point: (patient_id, marker or None, failure reason or None, seconds). Never raises."""
  start = time.perf_counter()
  try:
    marker = process_patient(row, config, show_paths=show_paths)
    return row.patient_id, marker, None, time.perf_counter() - start
  except PdxError as error:
    reason = manifest_lib.failure_line(str(error), row)
  except Exception as error:  # pylint: disable=broad-except
    # One patient's bug or odd file must not end the cohort's run; the reason names the exception.
    reason = manifest_lib.failure_line(f"unexpected {type(error).__name__}: {error}", row)
  try:
    shards.remove_patient_files(config.output_dir, row.patient_id)
  except (tf.errors.OpError, OSError):
    pass  # Leftovers are cleaned again on the next run.
  return row.patient_id, None, reason, time.perf_counter() - start


def _read_marker(output_dir: str, patient_id: str) -> dict | None:
  path = io_utils.join(output_dir, shards.marker_path(patient_id))
  if not tf.io.gfile.exists(path):
    return None
  try:
    return io_utils.read_json(path)
  except (ValueError, tf.errors.OpError):
    return None


def _run_all(todo: Sequence[manifest_lib.ManifestRow], config: PipelineConfig, show_paths: bool = False):
  """Runs the patients, yielding `_run_patient` results as they finish."""
  if config.num_workers == 1 or len(todo) <= 1:
    for row in todo:
      yield _run_patient(row, config, show_paths)
    return
  workers = min(config.num_workers, len(todo))
  threads = max(1, (os.cpu_count() or 1) // workers)
  # "spawn": TensorFlow's runtime threads do not survive fork. The initialiser (TensorFlow-free module) runs
  # before the worker loads TensorFlow: quiet start-up unless the parent asked for verbosity, and each worker
  # gets a share of the cores instead of every process using all of them.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=cli.init_tensorflow_worker,
                                              initargs=(threads, 2)) as pool:
    futures = {pool.submit(_run_patient, row, config, show_paths): row for row in todo}
    for future in concurrent.futures.as_completed(futures):
      row = futures[future]
      try:
        yield future.result()
      except concurrent.futures.process.BrokenProcessPool:
        yield row.patient_id, None, (
            "a worker process died (out of memory?, or a calling script without an `if __name__ == "
            "\"__main__\":` guard, which spawned workers need); rerun with fewer --num_workers"), 0.0
      except Exception as error:  # pylint: disable=broad-except
        yield row.patient_id, None, manifest_lib.failure_line(f"unexpected {type(error).__name__}: {error}", row), 0.0


def build_dataset_json(config: PipelineConfig, covariate_names: Sequence[str], markers: Sequence[dict],
                       num_failed: int) -> dict:
  """The dataset manifest (CONTRACTS.md, stage 1) from the completion markers."""
  markers = sorted(markers, key=lambda marker: marker["patient_id"])
  patients = [{key: marker[key] for key in (
      "patient_id", "label_p", "label_sb", "covariates", "num_slices", "z_range_mm", "z_range_rule", "warnings",
      "original_shards", "augmented_shards", "num_original_examples", "num_augmented_examples",
      "num_augmented_blocks")}
              for marker in markers]
  for entry, marker in zip(patients, markers):
    if "pci_scores" in marker:  # 13 int-or-null, only for a manifest with PCI columns (CONTRACTS.md)
      entry["pci_scores"] = marker["pci_scores"]
  all_shards = sorted((shard for marker in markers for shard in marker["shards"]), key=lambda s: s["path"])
  return {
      "format": DATASET_FORMAT,
      "schema_version": records.SCHEMA_VERSION,
      "code_version": provenance.code_version(),
      "config": _content_config(config),
      "preprocess": configs.to_dict(config.preprocess),
      "augment": augment.settings_dict(config.augment),
      "augment_factor": config.augment_factor,
      "augment_block": config.augment_block,
      "seed": config.seed,
      "covariate_names": list(covariate_names),
      "patients": patients,
      "shards": all_shards,
      # The cohort's input distributions (no patient's values), for predict's drift flags via run.json and export.
      "input_statistics": input_statistics.aggregate([marker.get("input_statistics") for marker in markers]),
      "counts": {
          "patients": len(patients),
          "failed_patients": num_failed,
          "slices": sum(p["num_slices"] for p in patients),
          "original_examples": sum(p["num_original_examples"] for p in patients),
          "augmented_examples": sum(p["num_augmented_examples"] for p in patients),
          "shards": len(all_shards),
      },
  }


def run_pipeline(config: PipelineConfig, *, progress: bool = True, show_paths: bool = False) -> PipelineResult:
  """Runs the data pipeline (see the module docstring).

  Args:
    config: the resolved configuration.
    progress: show a progress bar on stderr (failed patients are always reported there, one line each).
    show_paths: print the real relative path of file tokens in DICOM warnings and errors to the console
      (local debugging; never into a file, so it is no part of the config).

  Returns:
    What was written; `result.ok` is False when patients failed and `allow_failures` is off (then
    dataset.json is not written).

  Several machines: run partitions `partition_index` = 0..K-1 of `num_partitions` = K (same config otherwise)
  into one shared output_dir (e.g. gs://...); each writes only its patients' files and markers, and no
  run-level file. Then one ordinary run (num_partitions=1) reuses every finished patient, retries failed ones
  and writes failures.csv, qc/index.html and dataset.json.

  Raises:
    ManifestError: the manifest is invalid (every problem listed).
    PdxError: the output folder cannot be written.
  """
  plan = start_run(config)
  new_markers: dict[str, dict] = {}
  failures: dict[str, str] = {}
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  with tqdm(total=len(plan.todo), desc="patients", unit="patient", disable=not progress or not plan.todo) as bar:
    for patient_id, marker, reason, _ in _run_all(plan.todo, config, show_paths):
      if marker is None:
        failures[patient_id] = reason
        tqdm.write(f"patient {patient_id} FAILED: {reason}", file=sys.stderr)
      else:
        new_markers[patient_id] = marker
      bar.update(1)
  return finish_run(config, plan, new_markers, failures)


# The records' size before any DICOM is read (`estimate_records_bytes`). Measured PNG bytes of one phantom
# abdominal slice at 224 px (pdx_tf.data.records.encode_image, the default compression): one window stored as
# one channel 21,018 B, three windows 67,234 B; PNG bytes grow about with the pixel count (size**2).
PNG_BYTES_224 = {1: 21_018, 3: 67_234}
# Per example besides the PNG: 16 B of TFRecord framing and ~100 B of the other features (ids, labels, z).
EXAMPLE_OVERHEAD_BYTES = 116
# Slice counts are known only after reading the DICOM series: ~45 abdominal slices at 5 mm (about 22 cm from
# the diaphragm to the pelvic floor). Thinner --slice_spacing_mm scales it up (0 keeps native slices: 1 mm).
DEFAULT_ABDOMINAL_SLICES_5MM = 45


def estimate_records_bytes(num_patients: int, *, image_size: int, channels: int, augment_factor: int,
                           slices_per_patient: int = DEFAULT_ABDOMINAL_SLICES_5MM) -> int:
  """Estimated bytes of the records of `num_patients` patients (originals and augmented copies).

  Args:
    num_patients: patients still to write.
    image_size: the images' side in pixels.
    channels: 1 (one window) or 3 (three windows).
    augment_factor: augmented copies per slice.
    slices_per_patient: abdominal slices per patient (unknown before reading DICOM; see
      DEFAULT_ABDOMINAL_SLICES_5MM).

  Returns:
    patients x slices x (1 + augment_factor) x (PNG bytes at that size and channel count + per-example overhead).
  """
  png_bytes = PNG_BYTES_224[channels] * (image_size / 224) ** 2
  images = num_patients * slices_per_patient * (1 + augment_factor)
  return int(images * (png_bytes + EXAMPLE_OVERHEAD_BYTES))


def estimated_slices_per_patient(config: PipelineConfig) -> int:
  """Abdominal slices a patient before reading DICOM: 45 at 5 mm, scaled by 5 / slice_spacing_mm (0: 1 mm)."""
  spacing = config.slice_spacing_mm if config.slice_spacing_mm and config.slice_spacing_mm > 0 else 1.0
  return max(1, round(DEFAULT_ABDOMINAL_SLICES_5MM * 5.0 / max(spacing, 1.0)))


def partition_rows(config: PipelineConfig,
                   manifest: manifest_lib.Manifest | None = None) -> list[manifest_lib.ManifestRow]:
  """The manifest rows this run processes (its partition's; all with num_partitions = 1).

  Raises:
    ManifestError: the manifest is invalid (every problem listed).
  """
  manifest = manifest or manifest_lib.read_manifest(config.manifest_path)
  return [row for row in manifest.rows
          if io_utils.stable_key(row.patient_id) % config.num_partitions == config.partition_index]


def records_budget(config: PipelineConfig, num_patients: int) -> tuple[int, int | None]:
  """(estimated bytes of `num_patients` patients' records, free bytes where they go or None for gs:// and URLs).

  The free space is that of the output folder's filesystem (its nearest existing parent when not made yet);
  object stores have no fixed free space, so None.
  """
  estimate = estimate_records_bytes(num_patients, image_size=config.preprocess.image_size,
                                    channels=len(config.preprocess.windows), augment_factor=config.augment_factor,
                                    slices_per_patient=estimated_slices_per_patient(config))
  if "://" in config.output_dir:
    return estimate, None
  folder = os.path.abspath(config.output_dir)
  while not os.path.exists(folder):  # The nearest existing parent holds the filesystem it will be on.
    folder = os.path.dirname(folder)
  return estimate, shutil.disk_usage(folder).free


def check_records_fit(config: PipelineConfig, num_patients: int) -> int | None:
  """Refuses, before any work, records that would not fit the free space of the output folder's filesystem.

  Args:
    config: the run's config (output folder, image size, windows, augment_factor, slice spacing).
    num_patients: patients this run will write (finished ones already take their space).

  Returns:
    The estimate in bytes, or None for a non-local output folder (gs:// and other URLs: not checked).

  Raises:
    PdxError: the estimate exceeds the free space (one line: estimate, free space, what to do).
  """
  estimate, free = records_budget(config, num_patients)
  if free is None:
    return None
  if estimate > free:
    gib = 1024**3
    raise PdxError(
        f"the records would not fit: ~{estimate / gib:.1f} GiB estimated for {num_patients} patient(s) "
        f"(~{estimated_slices_per_patient(config)} slices x {1 + config.augment_factor} images x "
        f"{config.preprocess.image_size} px), {free / gib:.1f} GiB free under {config.output_dir}; "
        "free space, choose another --output_dir or lower --augment_factor")
  return estimate


@dataclasses.dataclass(frozen=True)
class RunPlan:
  """The start of a run (`start_run`): what is left to do, for any runner (processes here, Beam elsewhere).

  Attributes:
    manifest: the cohort.
    rows: this run's rows (this partition's, with `num_partitions` > 1).
    reused: completion markers of the patients an earlier run finished (valid for this config and row).
    todo: the rows to process, in manifest order.
    start_time: `time.perf_counter()` at the start.
  """

  manifest: manifest_lib.Manifest
  rows: tuple[manifest_lib.ManifestRow, ...]
  reused: dict
  todo: tuple[manifest_lib.ManifestRow, ...]
  start_time: float


def start_run(config: PipelineConfig) -> RunPlan:
  """Reads the manifest, finds the finished patients, checks the rest fit the disk, removes dataset.json and
  writes config.json.

  Raises:
    ManifestError: the manifest is invalid (every problem listed).
    PdxError: the output folder cannot be written, or the records would not fit its free space.
  """
  start = time.perf_counter()
  manifest = manifest_lib.read_manifest(config.manifest_path)
  output_dir = config.output_dir
  partitioned = config.num_partitions > 1
  io_utils.check_writable(output_dir)
  rows = partition_rows(config, manifest)
  reused: dict[str, dict] = {}
  todo = []
  for row in rows:
    marker = _read_marker(output_dir, row.patient_id)
    if marker is not None and shards.marker_is_valid(output_dir, marker, patient_fingerprint(config, row)):
      reused[row.patient_id] = marker
    else:
      todo.append(row)
  check_records_fit(config, len(todo))  # Before anything is removed or written.
  try:
    tf.io.gfile.remove(io_utils.join(output_dir, DATASET_JSON))  # Its presence must mean "complete".
  except tf.errors.NotFoundError:
    pass
  if not partitioned:  # Other partitions may be writing run-level files right now.
    shards.remove_temp_files(output_dir)
    configs.write_config(io_utils.join(output_dir, CONFIG_JSON), config)
  stale = sorted(pid for pid, marker in reused.items() if marker.get("code_version") != provenance.code_version())
  if stale:
    # Reuse is keyed on config and manifest row, not on code: say so when the code has moved on.
    print(f"note: {len(stale)} finished patient(s) were written by other code versions (e.g. {stale[0]}) and are "
          "reused; delete their patients/<patient_id>.json to rebuild them", file=sys.stderr)
  return RunPlan(manifest=manifest, rows=tuple(rows), reused=reused, todo=tuple(todo), start_time=start)


def finish_run(config: PipelineConfig, plan: RunPlan, new_markers: dict, failures: dict) -> PipelineResult:
  """Ends a run: failures.csv, qc/index.html and (no failures, or allowed) dataset.json; none for a partition.

  Args:
    config: the run's config.
    plan: `start_run`'s plan.
    new_markers: patient_id -> completion marker of the patients processed by this run.
    failures: patient_id -> one-line reason of the patients that failed in this run.
  """
  output_dir = config.output_dir
  partitioned = config.num_partitions > 1
  markers = {**plan.reused, **new_markers}
  failure_rows = sorted(failures.items())
  ordered = [markers[row.patient_id] for row in sorted(plan.rows, key=lambda r: r.patient_id)
             if row.patient_id in markers]
  if not partitioned:
    io_utils.atomic_write_csv(io_utils.join(output_dir, FAILURES_CSV), ["patient_id", "reason"], failure_rows)
    if config.write_qc:
      qc.write_index_html(io_utils.join(output_dir, QC_INDEX), ordered, failure_rows)
  written = None
  if not partitioned and (not failures or config.allow_failures):
    dataset_path = io_utils.join(output_dir, DATASET_JSON)
    dataset = build_dataset_json(config, plan.manifest.covariate_names, ordered, len(failures))
    io_utils.atomic_write_json(dataset_path, dataset)
    written = dataset_path
  # TFDS metadata beside dataset.json (tfds.builder_from_directory(D) reads the records), none without it.
  tfds_metadata.update_metadata(output_dir, dataset if written else None)
  return PipelineResult(
      output_dir=output_dir, dataset_json=written, num_patients=len(ordered), num_reused=len(plan.reused),
      failures=tuple(failure_rows), num_slices=sum(m["num_slices"] for m in ordered),
      num_original_examples=sum(m["num_original_examples"] for m in ordered),
      num_augmented_examples=sum(m["num_augmented_examples"] for m in ordered),
      num_bytes=sum(shard["num_bytes"] for m in ordered for shard in m["shards"]),
      wall_time_s=time.perf_counter() - plan.start_time,
      processed_slices=sum(m["num_slices"] for m in new_markers.values()), partitioned=partitioned)


def demo_manifest_path(num_patients: int = presets.DEMO_PATIENTS, phantom_preset: str | None = None) -> str:
  """The manifest of the cached demo phantom cohort, written first if needed (about a minute for 40 patients).

  Args:
    num_patients: the cohort's size: a positive multiple of 4, so its prevalence is exactly the demo's (half
      p-positive, a quarter sb-positive; the phantom balances labels in blocks of 4). Patient i is the same in
      every size (keyed by the phantom seed and i), and one size and seed give the same cohort bytes; the
      default is the demo's 40-patient cohort, unchanged.
    phantom_preset: a named phantom cohort (`phantom.PHANTOM_PRESETS`, e.g. "low_burden"); None: the default.

  Returns:
    The path of its manifest.csv, under $PDX_TF_CACHE (or ~/.cache/pdx_tf), one folder a size.

  Raises:
    ValueError: `num_patients` is not a positive multiple of 4.
  """
  from pdx_tf import phantom  # pylint: disable=import-outside-toplevel

  check_demo_num_patients(num_patients)
  config = (phantom.preset_config(phantom_preset, num_patients=num_patients) if phantom_preset is not None
            else phantom.PhantomConfig(num_patients=num_patients))
  return phantom.write_demo_cohort(phantom.demo_cohort_dir(config), config)


def check_demo_num_patients(num_patients: int) -> None:
  """Raises ValueError unless `num_patients` is a demo cohort size: a positive multiple of 4."""
  if isinstance(num_patients, bool) or not isinstance(num_patients, int) or num_patients < 4 or num_patients % 4:
    raise ValueError(f"the demo cohort's size must be a positive multiple of 4 (the phantom balances its labels in"
                     f" blocks of 4 patients), got {num_patients!r}; e.g. 40 (the demo) or 120 (the sb preset)")


def demo_config(output_dir: str = DEMO_OUTPUT_DIR, *, num_patients: int = presets.DEMO_PATIENTS,
                phantom_preset: str | None = None, **overrides) -> PipelineConfig:
  """The demo preset on the cached phantom cohort (writing the cohort first if needed).

  Args:
    output_dir: where the records go.
    num_patients: the phantom cohort's size (see `demo_manifest_path`; default the demo's 40).
    phantom_preset: a named phantom cohort (see `demo_manifest_path`); None: the default demo cohort.
    **overrides: PipelineConfig fields to change; `image_size` sets the preprocess image size.
  """
  manifest_path = demo_manifest_path(num_patients, phantom_preset)
  preset = presets.PIPELINE_PRESETS["demo"]
  image_size = overrides.pop("image_size", preset["image_size"])
  values = {"augment_factor": preset["augment_factor"], "augment_block": preset["augment_block"],
            "num_workers": default_num_workers(), **overrides}
  if "preprocess" not in values:
    values["preprocess"] = preprocess.PreprocessConfig(image_size=image_size)
  return PipelineConfig(manifest_path=manifest_path, output_dir=output_dir, **values)


def run_demo_pipeline(output_dir: str = DEMO_OUTPUT_DIR, *, progress: bool = True,
                      num_patients: int = presets.DEMO_PATIENTS, phantom_preset: str | None = None,
                      **overrides) -> PipelineResult:
  """Builds (or reuses) the demo phantom cohort and runs the pipeline on it with the demo preset.

  A finished demo dataset is reused: every patient is skipped and dataset.json rewritten identically.

  Args:
    output_dir: where the records go (default runs/demo/records).
    progress: show progress on stderr.
    num_patients: the phantom cohort's size (default the demo's 40; the sb preset's 120).
    phantom_preset: a named phantom cohort (e.g. "low_burden", see `pdx_tf.phantom.PHANTOM_PRESETS`).
    **overrides: PipelineConfig fields (and `image_size`) to change from the demo preset
      (pdx_tf.presets.PIPELINE_PRESETS["demo"]: 48 px, 8 copies a slice in blocks of 2).
  """
  return run_pipeline(demo_config(output_dir, num_patients=num_patients, phantom_preset=phantom_preset, **overrides),
                      progress=progress)
