"""The hand-offs between the stages: file names, schema versions, tasks, cell names and the typed manifests.

Data moves one way (CONTRACTS.md): D/dataset.json (records) -> R/ splits.json + cells/*/run.json (runs) ->
E/summary.json (evaluation) and X/pdx_<task>/<version>/assets.extra/pdx_export.json (export). Every stage reads
the manifest of the one before through this module, so a name or a version is defined once.

Cells are named one way everywhere (folders, TensorBoard runs, `--cells` of train and export): `r03_f07`;
`parse_cell_name` also accepts the short form `r3f7`. Readers take the repeat and fold from run.json, never
from a folder name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping, Sequence

from pdx_tf import conformal, io_utils, settings
from pdx_tf.errors import ExportError, PdxError, RecordsError, RunsError

TASKS = ("p", "sb")  # p: any peritoneal dissemination; sb: small-bowel dissemination.
# One grid, one backbone, both tasks (`--task=p,sb`): each cell's model has a head per task, and the cell writes
# each task's predictions in its own sub-folder (<cell>/p/, <cell>/sb/) so evaluation reads them as two tasks.
JOINT_TASK = "p,sb"
DEFAULT_MIN_SLICES = settings.DEFAULT_MIN_SLICES

# The Peritoneal Cancer Index (PCI) regions, index = region number (Jacquet & Sugarbaker): 0-8 the abdominopelvic
# regions, 9-12 the small-bowel segments. Each region's lesion-size score is 0 (none), 1 (up to 0.5 cm), 2 (up to
# 5 cm) or 3 (larger or confluent); PCI = the sum (0-39). "pci" names these everywhere: "region" already means the
# abdominal z range (pdx_tf.data.region, REGION_SETTINGS).
PCI_REGION_NAMES = ("central", "right upper", "epigastrium", "left upper", "left flank", "left lower", "pelvis",
                    "right lower", "right flank", "upper jejunum", "lower jejunum", "upper ileum", "lower ileum")
NUM_PCI_REGIONS = len(PCI_REGION_NAMES)
PCI_SMALL_BOWEL_REGIONS = (9, 10, 11, 12)  # task sb is "any of these"
PCI_MAX_SCORE = 3
PCI_UNRECORDED = -1  # a region's score where the manifest left it empty (masked out of any loss)
# A left-right mirror image of a patient swaps these regions (right upper <-> left upper, right flank <-> left
# flank, right lower <-> left lower); the others lie on the midline or follow the bowel.
PCI_LATERAL_PAIRS = ((1, 3), (8, 4), (7, 5))
PCI_TASK = "regions"  # `train --task=regions`: one probability a PCI region


def pci_mirror(scores):
  """The PCI scores of the left-right mirror image: a list with each PCI_LATERAL_PAIRS pair swapped."""
  mirrored = list(scores)
  for right, left in PCI_LATERAL_PAIRS:
    mirrored[right], mirrored[left] = scores[left], scores[right]
  return mirrored
  # fewest slices accepted, in a series and in the abdominal range

# ---------------------------------------------------------------------------------------- D: the records
DATASET_FILE = "dataset.json"  # written last by the data pipeline: its presence means the records are complete
# The TFRecord schema's version (pdx_tf/data/records.py writes it into every example and dataset.json). It lives
# here, with its check, so reading a hand-off never imports a stage (arrows point from the stages to the core).
RECORDS_SCHEMA_VERSION = 2
DATASET_FORMAT = "pdx-tf-dataset"
FAILURES_FILE = "failures.csv"

# ---------------------------------------------------------------------------------------- R: the runs
CONFIG_FILE = "config.json"  # the resolved config, next to every stage's output
RECORDS_FILE = "records.json"  # {"records_hash", "dataset_hash"}: one grid, one set of records
SPLITS_FILE = "splits.json"
PATIENTS_FILE = "patients.csv"
CELLS_FOLDER = "cells"
TENSORBOARD_FOLDER = "tensorboard"
RUN_FILE = "run.json"  # written last in a cell folder: its presence with COMPLETE_STATUS means the cell is done
RUN_SCHEMA_VERSION = 1
COMPLETE_STATUS = "complete"
PATIENT_PREDICTIONS_FILE = "patient_predictions.csv"
SLICE_PREDICTIONS_FILE = "slice_predictions.csv"
METRICS_FILE = "metrics.json"
PROGRESS_FILE = "progress.json"
CHECKPOINT_FOLDER = "checkpoint"

# ---------------------------------------------------------------------------------------- E and X
SUMMARY_FILE = "summary.json"
EXPORT_METADATA_FILE = "pdx_export.json"
EXPORT_FORMAT = "pdx-tf-export"
EXPORT_SCHEMA_VERSION = 1

Cell = tuple[int, int]  # (repeat, fold), both 0-based

_CELL_NAME = re.compile(r"^r(\d+)_?f(\d+)$")


def check_task(task: str) -> str:
  """Returns `task` if it is one of TASKS; raises ValueError naming them otherwise."""
  if task not in TASKS:
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}")
  return task


def check_training_task(task: str) -> str:
  """Returns `task` if a grid can be trained on it: one of TASKS, JOINT_TASK or PCI_TASK; raises ValueError
  otherwise."""
  if task not in TASKS and task not in (JOINT_TASK, PCI_TASK):
    raise ValueError(f"unknown task {task!r}; tasks are {', '.join(TASKS)}, {JOINT_TASK} (one backbone, two heads)"
                     f" or {PCI_TASK} (one probability a PCI region)")
  return task


def task_list(task: str) -> tuple[str, ...]:
  """The tasks a grid's task stands for: ("p",), ("sb",), ("p", "sb") for JOINT_TASK, ("regions",) for PCI_TASK."""
  return TASKS if check_training_task(task) == JOINT_TASK else (task,)


def task_folder(cell_folder_path: str, run_task: str, task: str) -> str:
  """Where a cell of a `run_task` grid keeps `task`'s predictions: the cell folder itself for a one-task grid,
  its `<task>/` sub-folder for a joint grid."""
  return io_utils.join(cell_folder_path, task) if run_task == JOINT_TASK else cell_folder_path


def cell_name(cell: Cell) -> str:
  """The one name of a cell: folder, TensorBoard run and messages, e.g. (3, 7) -> "r03_f07"."""
  return f"r{cell[0]:02d}_f{cell[1]:02d}"


def parse_cell_name(name: str) -> Cell | None:
  """"r03_f07" or "r3f7" -> (3, 7); None if `name` is neither form."""
  match = _CELL_NAME.match(name.strip())
  return (int(match.group(1)), int(match.group(2))) if match else None


def cell_folder(output_dir: str, cell: Cell) -> str:
  """R/cells/<cell_name>: where a cell's artifacts live."""
  return io_utils.join(output_dir, CELLS_FOLDER, cell_name(cell))


# ---------------------------------------------------------------------------------------- dataset.json


def records_content_hash(dataset: Mapping[str, Any]) -> str:
  """The content hash of a dataset.json dict (see `DatasetInfo.content_hash`)."""
  patients = dataset.get("patients", [])
  if isinstance(patients, Mapping):
    patients = list(patients.values())
  content = {
      "schema_version": dataset.get("schema_version"),
      "preprocess": dataset.get("preprocess"),
      "shards": sorted([shard["path"], shard["sha256"], shard["num_examples"]] for shard in dataset.get("shards", [])),
      # pci_scores enters only where present, so cohorts without PCI columns keep their hashes.
      "patients": sorted([entry["patient_id"], entry["label_p"], entry["label_sb"],
                          sorted(entry.get("covariates", {}).items())]
                         + ([list(entry["pci_scores"])] if entry.get("pci_scores") is not None else [])
                         for entry in patients),
  }
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What training needs from D/dataset.json (paths absolute; patients sorted by patient_id).

  Attributes:
    records_dir: the folder D.
    document: dataset.json as read (schema version, config, preprocess, patients, shards).
    dataset_hash: sha256 of dataset.json's bytes (provenance).
    covariate_names: the manifest covariates carried in every record.
    patients: each patient's entry of dataset.json, by patient_id.
    preprocess_config: the records' typed preprocessing, parsed and checked once from document["preprocess"]
      (built here when not given); `image_size` is its image size, the one holder of the records' size.
    augment_settings: the records' typed offline augmentation (ranges, copies, block, seed), parsed and checked
      once from the document (built here when not given).
    region_settings: how the records' studies were read (z-range rule, slabs, series choice), typed from the
      pipeline config once (built here when not given).
  """

  records_dir: str
  document: Mapping[str, Any]
  dataset_hash: str
  covariate_names: tuple[str, ...]
  patients: Mapping[str, Mapping[str, Any]]
  preprocess_config: settings.PreprocessConfig | None = None
  augment_settings: settings.AugmentSettings | None = None
  region_settings: settings.RegionSettings | None = None

  def __post_init__(self):
    if self.preprocess_config is None:
      object.__setattr__(self, "preprocess_config",
                         settings.preprocess_config_from_dict(self.document.get("preprocess", {})))
    if self.augment_settings is None:
      object.__setattr__(self, "augment_settings", settings.augment_settings_from_document(self.document))
    if self.region_settings is None:
      object.__setattr__(self, "region_settings", dataset_region_settings(self.document))

  @property
  def image_size(self) -> int:
    """The records' image side in pixels (preprocess_config.image_size)."""
    return self.preprocess_config.image_size

  @property
  def content_hash(self) -> str:
    """sha256 of what the records hold: every shard's path, sha256 and size, the labels and covariates, the
    preprocessing and the schema. Unlike `dataset_hash` it ignores provenance (code version, cohort path), so a
    pipeline rerun that reuses every patient after a code update keeps it."""
    return records_content_hash(self.document)

  @property
  def preprocess(self) -> dict[str, Any]:
    """The records' preprocessing settings as dataset.json holds them (what run.json copies); code that uses them
    reads the typed `preprocess_config`."""
    return dict(self.document.get("preprocess", {}))

  @property
  def augment(self) -> dict[str, Any]:
    """The records' offline augmentation as dataset.json holds it (what run.json copies); code that uses it reads
    the typed `augment_settings`."""
    keys = ("augment_factor", "augment_block", "seed")
    return {**dict(self.document.get("augment") or {}),
            **{key: self.document[key] for key in keys if key in self.document}}

  @property
  def region(self) -> dict[str, Any]:
    """The records' study-reading settings as the pipeline config holds them (what run.json copies); code that
    uses them reads the typed `region_settings`."""
    return _region_fields(self.document)

  @property
  def input_statistics(self) -> dict[str, Any] | None:
    """The training inputs' distributions (`pdx_tf.data.input_statistics.aggregate`), None for older records."""
    statistics = self.document.get("input_statistics")
    return dict(statistics) if statistics else None

  def labels(self, task: str) -> dict[str, int]:
    key = f"label_{check_task(task)}"
    return {patient_id: int(entry[key]) for patient_id, entry in self.patients.items()}

  @property
  def has_pci_scores(self) -> bool:
    """Whether the cohort manifest had PCI columns (pci_0 ... pci_12): then every patient entry has `pci_scores`."""
    return any(entry.get("pci_scores") is not None for entry in self.patients.values())

  def pci_scores(self, patient_id: str) -> tuple[int, ...] | None:
    """A patient's 13 PCI lesion-size scores (0-3, PCI_UNRECORDED where not recorded) as the manifest gave them
    (unmirrored); None when the cohort has no PCI columns."""
    scores = self.patients[patient_id].get("pci_scores")
    if scores is None:
      return None
    return tuple(PCI_UNRECORDED if value is None else int(value) for value in scores)

  def shard_paths(self, patient_ids: Sequence[str], kind: str) -> list[str]:
    """Absolute paths of the `kind` ("original"/"augmented") shards of these patients, in patient order."""
    field = f"{kind}_shards"
    paths = []
    for patient_id in patient_ids:
      paths.extend(io_utils.join(self.records_dir, relative) for relative in self.patients[patient_id][field])
    return paths

  def num_examples(self, patient_ids: Sequence[str], kind: str) -> int:
    field = f"num_{kind}_examples"
    return sum(int(self.patients[patient_id][field]) for patient_id in patient_ids)


# The pipeline config fields that decide which slices of a study are read; run.json and the export carry them
# so `predict` reads a study as the records were made, without reaching back to the records folder.
REGION_SETTINGS = ("region", "slice_spacing_mm", "slice_thickness_mm", "min_slices")


def _region_fields(dataset: Mapping[str, Any]) -> dict[str, Any]:
  config = dataset.get("config") or {}
  return {key: config[key] for key in REGION_SETTINGS if key in config}


def dataset_region_settings(dataset: Mapping[str, Any]) -> settings.RegionSettings:
  """The typed study-reading settings of a dataset.json dict (its pipeline config's REGION_SETTINGS).

  Raises:
    ValueError: a value the checks refuse.
  """
  return settings.region_settings_from_dict(_region_fields(dataset))


def check_records_schema_version(version: int, source: str) -> None:
  """Raises RecordsError (one line, with the rebuild command) unless `version` is the version this code reads."""
  if int(version) != RECORDS_SCHEMA_VERSION:
    raise RecordsError(
        f"{source} has records schema version {version}, but this pdx-tf reads version {RECORDS_SCHEMA_VERSION};"
        " rebuild the records with this version: `python -m data_pipeline --manifest=<cohort.csv>"
        " --output_dir=<new folder>` (same flags as the first build)")


def records_image_size(records_dir: str) -> int:
  """The records' image side in pixels, from `records_dir/dataset.json` (train's default --image_size).

  Raises:
    RecordsError: dataset.json is missing, unreadable, not a pdx-tf dataset or lacks the image size; one line.
  """
  path = io_utils.join(records_dir, DATASET_FILE)
  if not io_utils.exists(path):
    raise RecordsError(f"{path} not found; point --records_dir at the output of `python -m data_pipeline` (it"
                       " writes dataset.json last, so a missing file means an unfinished run)")
  try:
    document = io_utils.read_json(path)
  except ValueError as error:
    raise RecordsError(f"{path} is not valid JSON ({error}); rerun the data pipeline") from None
  if not isinstance(document, Mapping) or document.get("format") != DATASET_FORMAT:
    raise RecordsError(f"{path} is not a pdx-tf dataset manifest; point --records_dir at a data_pipeline output")
  try:
    image_size = int(document["preprocess"]["image_size"])
  except (KeyError, TypeError, ValueError):
    raise RecordsError(f"{path} lacks preprocess.image_size required by the dataset.json contract; rerun the data"
                       " pipeline") from None
  return image_size


def load_dataset_info(records_dir: str, *, expected_image_size: int | None = None,
                      verify_hashes: bool = False) -> DatasetInfo:
  """Reads and checks `records_dir/dataset.json`.

  Checks the format and schema version, that the records' image size matches the model's, that every listed
  shard exists with the recorded size in bytes (a cheap stat), and, with `verify_hashes`, its SHA-256.

  Raises:
    RecordsError: one line naming the file and what to do.
  """
  import tensorflow as tf  # pylint: disable=import-outside-toplevel  # the stat; contracts stay light to import

  path = io_utils.join(records_dir, DATASET_FILE)
  if not io_utils.exists(path):
    raise RecordsError(f"{path} not found; point --records_dir at the output of `python -m data_pipeline` (it"
                       " writes dataset.json last, so a missing file means an unfinished run)")
  try:
    document = io_utils.read_json(path)
  except ValueError as error:
    raise RecordsError(f"{path} is not valid JSON ({error}); rerun the data pipeline") from None
  if document.get("format") != DATASET_FORMAT:
    raise RecordsError(f"{path} is not a pdx-tf dataset manifest (format {document.get('format')!r})")
  check_records_schema_version(document.get("schema_version", -1), path)
  try:
    image_size = int(document["preprocess"]["image_size"])
    patients = {entry["patient_id"]: entry for entry in document["patients"]}
    shards = list(document["shards"])
  except (KeyError, TypeError) as error:
    raise RecordsError(f"{path} lacks {error} required by the dataset.json contract; rerun the data pipeline") from None
  if expected_image_size is not None and image_size != expected_image_size:
    raise RecordsError(f"{path} holds {image_size} px images but the model expects {expected_image_size} px;"
                       f" train with --image_size={image_size} or rebuild the records at {expected_image_size} px")
  if not patients:
    raise RecordsError(f"{path} lists no patients; check the data pipeline's failures.csv")
  try:
    preprocess_config = settings.preprocess_config_from_dict(document["preprocess"])
  except (ValueError, TypeError) as error:
    raise RecordsError(f"{path} has preprocess settings this code cannot use ({' '.join(str(error).split())});"
                       " rebuild the records with this version of the data pipeline") from None
  try:
    augment_settings = settings.augment_settings_from_document(document)
  except (ValueError, TypeError) as error:
    raise RecordsError(f"{path} has augmentation settings this code cannot use ({' '.join(str(error).split())});"
                       " rebuild the records with this version of the data pipeline") from None
  try:
    region_settings = dataset_region_settings(document)
  except (ValueError, TypeError) as error:
    raise RecordsError(f"{path} has region settings this code cannot use ({' '.join(str(error).split())});"
                       " rebuild the records with this version of the data pipeline") from None
  for shard in shards:
    shard_path = io_utils.join(records_dir, shard["path"])
    if not io_utils.exists(shard_path):
      raise RecordsError(f"shard {shard_path} listed in {path} is missing; copy the whole records folder")
    size = tf.io.gfile.stat(shard_path).length
    if "num_bytes" in shard and int(shard["num_bytes"]) != size:
      raise RecordsError(f"shard {shard_path} has {size} bytes, dataset.json says {shard['num_bytes']};"
                         " the copy is incomplete or the file changed: re-copy or rebuild the records")
    if verify_hashes and shard.get("sha256") and io_utils.sha256_file(shard_path) != shard["sha256"]:
      raise RecordsError(f"shard {shard_path} does not match its sha256 in dataset.json; re-copy or rebuild it")
  return DatasetInfo(records_dir=records_dir, document=document, dataset_hash=io_utils.sha256_file(path),
                     covariate_names=tuple(document.get("covariate_names", ())),
                     patients=dict(sorted(patients.items())), preprocess_config=preprocess_config,
                     augment_settings=augment_settings, region_settings=region_settings)


# ---------------------------------------------------------------------------------------- run.json

# Fields every complete run.json has; the rest (provenance, region, augment, input statistics, the opt-in
# threshold, calibration and inner-validation record, head and context) travel in RunInfo.document.
RUN_REQUIRED_FIELDS = ("task", "repeat", "fold", "split_hash", "config", "preprocess", "aggregation",
                       "aggregation_top_k")
# A joint cell's run.json keeps each task's threshold, calibration and inner-validation record under this key,
# {task: {"threshold", "threshold_rule", "calibration", "inner_validation"}}; a one-task cell has them at the top.
TASK_DECISIONS_FIELD = "by_task"
TASK_DECISION_FIELDS = ("threshold", "threshold_rule", "calibration", "inner_validation")


def task_run_document(document: Mapping[str, Any], task: str, path: str = "run.json",
                      error: type[PdxError] = RunsError) -> dict[str, Any]:
  """run.json as the readers of one task see it: a joint cell's `by_task[task]` entry (threshold, calibration,
  inner-validation record) at the top level, where a one-task cell has them; a one-task run.json as it is.

  Raises:
    `error` (RunsError by default): a "by_task" without an entry for `task` (one line naming `path`).
  """
  by_task = document.get(TASK_DECISIONS_FIELD)
  if by_task is None:
    return dict(document)
  if not isinstance(by_task, Mapping) or not isinstance(by_task.get(task), Mapping):
    raise error(f"{path} has no task {task} entry under {TASK_DECISIONS_FIELD!r}; re-run that cell")
  view = {key: value for key, value in document.items() if key != TASK_DECISIONS_FIELD}
  view.update({key: by_task[task][key] for key in TASK_DECISION_FIELDS if key in by_task[task]})
  return view


@dataclasses.dataclass(frozen=True)
class RunInfo:
  """A complete cell's run.json: what evaluation and export rely on, typed, plus the whole document.

  Attributes:
    task, repeat, fold: the cell.
    split_hash: sha256 of the splits.json it was trained on.
    preprocess: the records' preprocessing (what serving repeats).
    region: how a study's slices were chosen ({} in runs written before run.json carried it).
    aggregation, aggregation_top_k: the slice-to-patient rule.
    document: run.json as written (every field, including provenance and opt-in ones).
    preprocess_config: `preprocess` typed and checked once (built here when not given).
    region_settings: `region` typed and checked once; None where run.json does not record the rule (runs
      written before it did).
  """

  task: str
  repeat: int
  fold: int
  split_hash: str
  preprocess: Mapping[str, Any]
  region: Mapping[str, Any]
  aggregation: str
  aggregation_top_k: int
  document: Mapping[str, Any]
  preprocess_config: settings.PreprocessConfig | None = None
  region_settings: settings.RegionSettings | None = None

  def __post_init__(self):
    if self.preprocess_config is None:
      object.__setattr__(self, "preprocess_config", settings.preprocess_config_from_dict(self.preprocess))
    if self.region_settings is None:
      object.__setattr__(self, "region_settings", run_region_settings(self.region))

  @property
  def cell(self) -> Cell:
    return (self.repeat, self.fold)

  @classmethod
  def from_document(cls, document: Any, path: str, error: type[PdxError] = RunsError) -> "RunInfo":
    """Checks a parsed run.json (schema version, status complete, required fields) and types it.

    Raises:
      `error` (RunsError by default): one line naming the file and what to do.
    """
    if not isinstance(document, Mapping) or document.get("schema_version") != RUN_SCHEMA_VERSION:
      raise error(f"{path} is not a version-{RUN_SCHEMA_VERSION} run.json; re-run that cell with this code")
    if document.get("status") != COMPLETE_STATUS:
      raise error(f"{path} has status {document.get('status')!r}, not complete; finish the cell first")
    missing = [key for key in RUN_REQUIRED_FIELDS if key not in document]
    if missing:
      raise error(f"{path} lacks {', '.join(missing)}; re-create it with the training stage")
    try:
      preprocess_config = settings.preprocess_config_from_dict(document["preprocess"])
    except (TypeError, ValueError) as problem:
      raise error(f"{path} has an invalid preprocess config ({' '.join(str(problem).split())}); re-create it with"
                  " the training stage") from None
    try:
      region_settings = run_region_settings(document.get("region") or {})
    except (TypeError, ValueError) as problem:
      raise error(f"{path} has invalid region settings ({' '.join(str(problem).split())}); re-create it with"
                  " the training stage") from None
    try:
      check_training_task(document["task"])
      return cls(task=document["task"], repeat=int(document["repeat"]), fold=int(document["fold"]),
                 split_hash=str(document["split_hash"]), preprocess=dict(document["preprocess"]),
                 region=dict(document.get("region") or {}),
                 aggregation=str(document["aggregation"]), aggregation_top_k=int(document["aggregation_top_k"]),
                 document=dict(document), preprocess_config=preprocess_config, region_settings=region_settings)
    except (TypeError, ValueError) as problem:
      raise error(f"{path} has a malformed field ({problem}); re-create it with the training stage") from None


def run_region_settings(region: Mapping[str, Any]) -> settings.RegionSettings | None:
  """run.json's "region" typed: None unless it records the rule (its "region" key; older runs do not).

  Raises:
    ValueError: a value the checks refuse.
  """
  return settings.region_settings_from_dict(region) if region and "region" in region else None


def run_document(fields: Mapping[str, Any]) -> dict[str, Any]:
  """A complete run.json's content: the schema version and status, then `fields` (checked as RunInfo reads
  them, so the trainer cannot write a run.json that its readers refuse)."""
  document = {"schema_version": RUN_SCHEMA_VERSION, "status": COMPLETE_STATUS, **fields}
  RunInfo.from_document(document, "run.json (being written)")
  return document


def read_run_info(path: str, error: type[PdxError] = RunsError) -> RunInfo:
  """Reads and checks a run.json (see RunInfo.from_document); a missing or unparseable file is `error` too."""
  if not io_utils.exists(path):
    raise error(f"{path} is missing: the cell is not finished; train it or leave it out")
  try:
    document = io_utils.read_json(path)
  except ValueError:
    raise error(f"{path} is not valid JSON; re-run that cell") from None
  return RunInfo.from_document(document, path, error)


# ---------------------------------------------------------------------------------------- pdx_export.json

# The image size lives in "preprocess" only; exports written before this also stored it at the top level
# ("image_size"), which the reader still accepts when it agrees (ExportInfo.from_document).
EXPORT_REQUIRED_FIELDS = ("task", "version", "num_models", "cells", "preprocess", "aggregation",
                          "aggregation_top_k", "signatures")


@dataclasses.dataclass(frozen=True)
class ExportInfo:
  """An export's assets.extra/pdx_export.json, typed: what predict and serving clients rely on.

  Attributes:
    task, version: the model's task and version number.
    num_models: the cells in the ensemble.
    preprocess: the training records' preprocessing (the serving graph applies it); `image_size` is its size.
    aggregation, aggregation_top_k: the slice-to-patient rule.
    region: how `predict` reads a study ({} for exports that do not record it).
    threshold: the operating threshold (0.5 unless the cells carried their own).
    document: pdx_export.json as written.
    preprocess_config: `preprocess` typed and checked once (built here when not given).
    region_settings: `region` typed and checked once (the pipeline defaults for an export without it).
    conformal_thresholds: the "conformal" entry's thresholds, typed and checked once; None for an export without.
    conformal_scales: the "conformal" entry's score scales (one pdx_tf.conformal.ScoreScale a model), typed once;
      None for an export without (its sets are decided on the patient probability).
  """

  task: str
  version: int
  num_models: int
  preprocess: Mapping[str, Any]
  aggregation: str
  aggregation_top_k: int
  region: Mapping[str, Any]
  threshold: float
  document: Mapping[str, Any]
  preprocess_config: settings.PreprocessConfig | None = None
  region_settings: settings.RegionSettings | None = None
  conformal_thresholds: conformal.ConformalThresholds | None = None
  conformal_scales: tuple[conformal.ScoreScale, ...] | None = None

  def __post_init__(self):
    if self.preprocess_config is None:
      object.__setattr__(self, "preprocess_config", settings.preprocess_config_from_dict(self.preprocess))
    if self.region_settings is None:
      object.__setattr__(self, "region_settings", settings.region_settings_from_dict(self.region))
    if self.conformal_thresholds is None and self.document.get("conformal"):
      object.__setattr__(self, "conformal_thresholds",
                         conformal.ConformalThresholds.from_dict(self.document["conformal"]))
    if self.conformal_scales is None and (self.document.get("conformal") or {}).get("scales"):
      object.__setattr__(self, "conformal_scales", tuple(
          conformal.ScoreScale.from_dict(value) for value in self.document["conformal"]["scales"]))

  @property
  def image_size(self) -> int:
    """The models' image side in pixels (preprocess_config.image_size, its one holder)."""
    return self.preprocess_config.image_size

  @classmethod
  def from_document(cls, document: Any, path: str, error: type[PdxError] = ExportError) -> "ExportInfo":
    """Checks a parsed pdx_export.json (format, schema version, required fields) and types it.

    Raises:
      `error` (ExportError by default): one line naming the file and what to do.
    """
    if not isinstance(document, Mapping) or document.get("format") != EXPORT_FORMAT:
      raise error(f"{path} is not a {EXPORT_FORMAT} manifest; re-export the model")
    if document.get("schema_version") != EXPORT_SCHEMA_VERSION:
      raise error(f"{path} has schema_version {document.get('schema_version')!r}; this code reads version "
                  f"{EXPORT_SCHEMA_VERSION}")
    missing = [key for key in EXPORT_REQUIRED_FIELDS if key not in document]
    if missing:
      raise error(f"{path} lacks {', '.join(missing)}; re-export the model")
    try:
      task = document["task"] if document["task"] == PCI_TASK else check_task(document["task"])
      info = cls(task=task, version=int(document["version"]),
                 num_models=int(document["num_models"]), preprocess=dict(document["preprocess"]),
                 aggregation=str(document["aggregation"]),
                 aggregation_top_k=int(document["aggregation_top_k"]), region=dict(document.get("region") or {}),
                 threshold=float(document.get("threshold", 0.5)), document=dict(document))
    except (TypeError, ValueError) as problem:
      raise error(f"{path} has a malformed field ({' '.join(str(problem).split())}); re-export the model") from None
    legacy_size = document.get("image_size")  # exports written before the size had one holder
    if legacy_size is not None and legacy_size != info.image_size:
      raise error(f"{path} says image_size {legacy_size} but its preprocess says {info.image_size}; re-export the"
                  " model")
    return info

  @property
  def conformal(self) -> Mapping[str, Any] | None:
    """The conformal thresholds and their calibration scores (pdx_tf.conformal; docs/conformal.md); None for an
    export without them."""
    return self.document.get("conformal") or None
