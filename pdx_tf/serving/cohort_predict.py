"""Predicts every patient of a cohort manifest (`python -m predict --manifest=M`): an external validation's input.

Runs like the data pipeline: each manifest row (labels may be empty: unknown) is one job in a worker process
(spawned; each loads the exports once), with a progress bar. A patient done is marked by
O/patients/<patient_id>.json, written last and atomically, holding its CSV rows and a fingerprint of the
exports and its manifest row; a rerun skips the patients whose marker matches and redoes the others, so a
killed run resumes. Outputs in O:
  config.json                 the run's settings (no manifest folder of a patient)
  patient_predictions.csv     one row per task and patient: task, patient_id, label (empty if unknown),
                              probability (ensemble mean), uncertainty (SD over models), predicted (at the
                              export's threshold, 0.5 unless pdx_export.json says "threshold"), drift_flags
                              (';'-joined reasons the inputs are unlike the training inputs, see
                              `pdx_tf.data.input_statistics`), then, when an export carries conformal
                              thresholds, conformal_set (negative, positive or uncertain), conformal_members
                              (negative, positive, both or empty) and alpha (pdx_tf.conformal; empty for a
                              task whose export has none), then the manifest's covariates
  region_predictions.csv      with a regions export only: patient_id, region (0-12), name, probability,
                              uncertainty, predicted (at the region's threshold, pdx_export.json "regions")
  failures.csv                patient_id, reason: one line per study that could not be read (file tokens,
                              never a path from inside a study)
  <patient_id>/prediction.json, gradcam/*.png, summary.png   as `predict --dicom_dir` writes them (no
                              Grad-CAM and no summary.png with num_gradcam_slices=0)
  patients/<patient_id>.json  completion markers
Rows of both CSVs are sorted, and every value is rounded, so a resumed run writes the same bytes as one run.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import sys
import time
from typing import Any, Sequence

import tensorflow as tf

from pdx_tf import configs, contracts, io_utils, provenance
from pdx_tf.data import manifest as manifest_lib
from pdx_tf.errors import PdxError
from pdx_tf.serving import predict

MARKERS_FOLDER = "patients"
# With a regions export (`--model=X/pdx_regions`): one row a patient and PCI region, beside patient_predictions.csv.
REGION_PREDICTIONS_FILE = "region_predictions.csv"
REGION_PREDICTION_COLUMNS = ("patient_id", "region", "name", "probability", "uncertainty", "predicted")
MARKER_FORMAT = "pdx-tf-cohort-prediction-marker"
PREDICTION_COLUMNS = ("task", "patient_id", "label", "probability", "uncertainty", "predicted", "drift_flags")
# After drift_flags when an export carries conformal thresholds (pdx_export.json "conformal").
CONFORMAL_COLUMNS = ("conformal_set", "conformal_members", "alpha")


@dataclasses.dataclass(frozen=True)
class CohortConfig:
  """What `python -m predict --manifest` runs.

  Attributes:
    model_dirs: exports, each X/pdx_<task> (highest version) or one version folder; one per task.
    manifest_path: the cohort CSV in the pipeline's format (`pdx_tf.data.manifest`); labels may be empty.
    output_dir: O.
    num_gradcam_slices: Grad-CAM overlays per task and patient (0: none, and no summary.png; fastest).
    gradcam_max_models: average Grad-CAM over at most this many of an ensemble's models.
    num_workers: patient-level worker processes; 1 runs in this process.
    conformal_alpha: the conformal sets' alpha (None: each export's own; predict.conformal_answer).
  """

  model_dirs: tuple[str, ...]
  manifest_path: str
  output_dir: str
  num_gradcam_slices: int = 3
  gradcam_max_models: int = 8
  num_workers: int = 1
  conformal_alpha: float | None = None

  def __post_init__(self):
    if self.conformal_alpha is not None:
      from pdx_tf import conformal  # pylint: disable=import-outside-toplevel
      object.__setattr__(self, "conformal_alpha", conformal.check_alpha(self.conformal_alpha))
    if not self.model_dirs:
      raise ValueError("give at least one --model (an export folder X/pdx_p or X/pdx_sb)")
    if not self.manifest_path or not self.output_dir:
      raise ValueError("manifest and output_dir must be given")
    if not 0 <= self.num_gradcam_slices <= 32:
      raise ValueError(f"num_gradcam_slices must be in [0, 32], got {self.num_gradcam_slices}")
    if self.gradcam_max_models < 1:
      raise ValueError(f"gradcam_max_models must be at least 1, got {self.gradcam_max_models}")
    if self.num_workers < 1:
      raise ValueError(f"num_workers must be >= 1, got {self.num_workers}")


@dataclasses.dataclass(frozen=True)
class CohortResult:
  """What a run did.

  Attributes:
    predictions_csv: path of patient_predictions.csv.
    num_patients: patients predicted (now or by an earlier run).
    computed: patient IDs predicted by this run, sorted.
    failures: (patient_id, reason), sorted.
    num_flagged: patients with at least one drift flag.
    wall_time_s: duration of this run.
  """

  predictions_csv: str
  num_patients: int
  computed: tuple[str, ...]
  failures: tuple[tuple[str, str], ...]
  num_flagged: int
  wall_time_s: float

  def summary(self) -> str:
    """A few human lines for the end of a run."""
    return (f"patients: {self.num_patients} predicted ({len(self.computed)} this run, "
            f"{self.num_patients - len(self.computed)} reused), {len(self.failures)} refused (failures.csv), "
            f"{self.num_flagged} with inputs unlike the training data (drift_flags)\n"
            f"time: {self.wall_time_s:.1f} s\npredictions: {self.predictions_csv}")


def _exports_identity(exports: Sequence[tuple[str, dict[str, Any]]]) -> list[Any]:
  # The metadata lists every model's sha256, so a re-export into another folder with the same models matches.
  return [[metadata["task"], io_utils.sha256_json(metadata)] for _, metadata in exports]


def patient_fingerprint(config: CohortConfig, exports: Sequence[tuple[str, dict[str, Any]]],
                        row: manifest_lib.ManifestRow) -> str:
  """A hash of what decides a patient's outputs: the exports, the Grad-CAM settings and the manifest row.

  The study folder and series override enter only through their hash, so the marker holds no path or UID.
  """
  return io_utils.sha256_json({
      "exports": _exports_identity(exports), "num_gradcam_slices": config.num_gradcam_slices,
      "gradcam_max_models": config.gradcam_max_models, "patient_id": row.patient_id, "label_p": row.label_p,
      "label_sb": row.label_sb, "covariates": dict(row.covariates), "z_min_mm": row.z_min_mm,
      "z_max_mm": row.z_max_mm,
      "source": io_utils.sha256_bytes(f"{row.dicom_dir}\n{row.series_uid or ''}".encode("utf-8")),
      # Only when given, so markers of runs at the exports' own alpha keep their fingerprint.
      **({"conformal_alpha": config.conformal_alpha} if config.conformal_alpha is not None else {}),
  })


def _marker_path(output_dir: str, patient_id: str) -> str:
  return io_utils.join(output_dir, MARKERS_FOLDER, f"{patient_id}.json")


def _label_text(value: int | None) -> str:
  return "" if value is None else str(int(value))


def predict_patient(row: manifest_lib.ManifestRow, config: CohortConfig,
                    exports: Sequence[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
  """Predicts one manifest row, writes O/<patient_id>/ and then its marker (last); returns the marker.

  Raises:
    PdxError (DicomError, RegionError, ...): the study cannot be read.
  """
  patient_dir = io_utils.join(config.output_dir, row.patient_id)
  if tf.io.gfile.exists(patient_dir):
    tf.io.gfile.rmtree(patient_dir)  # leftovers of a killed run (e.g. stale Grad-CAM images)
  study = predict.read_study(row.dicom_dir, exports, patient_id=row.patient_id, series_uid=row.series_uid,
                             z_min_mm=row.z_min_mm, z_max_mm=row.z_max_mm)
  prediction = predict.predict_and_write(
      exports, study, patient_dir, patient_id=row.patient_id, num_gradcam_slices=config.num_gradcam_slices,
      gradcam_max_models=config.gradcam_max_models, write_summary=config.num_gradcam_slices > 0,
      conformal_alpha=config.conformal_alpha)
  labels = {"p": row.label_p, "sb": row.label_sb}
  rows = []
  for task, values in prediction["tasks"].items():
    rows.append([task, row.patient_id, _label_text(labels[task]), f"{values['patient_probability']:.6f}",
                 f"{values['patient_uncertainty']:.6f}", str(values["predicted"]), ";".join(values["drift_flags"])]
                + (_conformal_fields(values.get("conformal")) if has_conformal(exports) else [])
                + [row.covariates[name] for name in row.covariates])
  marker = {"format": MARKER_FORMAT, "patient_id": row.patient_id,
            "fingerprint": patient_fingerprint(config, exports, row), "rows": rows,
            "code_version": provenance.code_version()}
  if prediction.get("regions"):  # a regions export: one row a region, for region_predictions.csv
    regions = prediction["regions"]
    marker["region_rows"] = [[row.patient_id, region, name, f"{value:.6f}", f"{spread:.6f}", str(decision)]
                             for region, (name, value, spread, decision) in enumerate(zip(
                                 regions["names"], regions["probabilities"], regions["uncertainty"],
                                 regions["predicted"]))]
  io_utils.atomic_write_json(_marker_path(config.output_dir, row.patient_id), marker)
  return marker


def has_conformal(exports: Sequence[tuple[str, dict[str, Any]]]) -> bool:
  """Whether the CSV has the CONFORMAL_COLUMNS: an export carries conformal thresholds."""
  return any(metadata.get("conformal") for _, metadata in exports)


def _conformal_fields(answer: dict[str, Any] | None) -> list[str]:
  """conformal_set, conformal_members, alpha of a task's prediction (empty without conformal thresholds)."""
  return [answer["set"], answer["members"], repr(float(answer["alpha"]))] if answer else ["", "", ""]


_WORKER_EXPORTS: list = []


def _init_worker(threads: int, model_dirs: tuple[str, ...]) -> None:
  # Each worker gets a share of the cores; the exports are resolved once per worker.
  tf.config.threading.set_intra_op_parallelism_threads(threads)
  tf.config.threading.set_inter_op_parallelism_threads(1)
  _WORKER_EXPORTS[:] = predict.load_exports(model_dirs)


def _run_patient(row: manifest_lib.ManifestRow, config: CohortConfig, exports=None
                 ) -> tuple[str, dict | None, str | None]:
  """Worker entry point: (patient_id, marker or None, failure reason or None). Never raises."""
  try:
    return row.patient_id, predict_patient(row, config, exports or _WORKER_EXPORTS), None
  except PdxError as error:
    reason = str(error)
    prefix = f"patient {row.patient_id}: "
    reason = reason[len(prefix):] if reason.startswith(prefix) else reason
  except Exception as error:  # pylint: disable=broad-except
    # One patient's odd file must not end the cohort's run; the reason names the exception.
    reason = f"unexpected {type(error).__name__}: {error}"
  return row.patient_id, None, manifest_lib.failure_line(reason, row)


def _run_all(todo: Sequence[manifest_lib.ManifestRow], config: CohortConfig, exports):
  """Runs the patients, yielding `_run_patient` results as they finish."""
  if config.num_workers == 1 or len(todo) <= 1:
    for row in todo:
      yield _run_patient(row, config, exports)
    return
  workers = min(config.num_workers, len(todo))
  threads = max(1, (os.cpu_count() or 1) // workers)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # spawned workers inherit it: quieter logs
  context = multiprocessing.get_context("spawn")  # TensorFlow's runtime threads do not survive fork
  version_dirs = tuple(version_dir for version_dir, _ in exports)
  with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                              initargs=(threads, version_dirs)) as pool:
    futures = {pool.submit(_run_patient, row, config): row for row in todo}
    for future in concurrent.futures.as_completed(futures):
      row = futures[future]
      try:
        yield future.result()
      except concurrent.futures.process.BrokenProcessPool:
        yield row.patient_id, None, ("a worker process died (out of memory?, or a calling script without an "
                                     "`if __name__ == \"__main__\":` guard); rerun with fewer --num_workers")
      except Exception as error:  # pylint: disable=broad-except
        yield row.patient_id, None, manifest_lib.failure_line(f"unexpected {type(error).__name__}: {error}", row)


def _read_marker(output_dir: str, patient_id: str) -> dict | None:
  path = _marker_path(output_dir, patient_id)
  if not tf.io.gfile.exists(path):
    return None
  try:
    marker = io_utils.read_json(path)
  except (ValueError, tf.errors.OpError):
    return None
  return marker if isinstance(marker, dict) and marker.get("format") == MARKER_FORMAT else None


def run_cohort(config: CohortConfig, *, progress: bool = True) -> CohortResult:
  """Predicts the manifest's patients (see the module docstring).

  Raises:
    ExportError: a --model folder is not a pdx export (before any patient is read).
    ManifestError: the manifest is invalid (every problem listed).
    PdxError: the output folder cannot be written.
  """
  start = time.perf_counter()
  exports = predict.load_exports(config.model_dirs)
  manifest = manifest_lib.read_manifest(config.manifest_path, allow_missing_labels=True)
  io_utils.check_writable(config.output_dir)
  configs.write_config(io_utils.join(config.output_dir, contracts.CONFIG_FILE), config)

  markers: dict[str, dict] = {}
  todo = []
  columns = list(PREDICTION_COLUMNS) + (list(CONFORMAL_COLUMNS) if has_conformal(exports) else [])
  for row in manifest.rows:
    marker = _read_marker(config.output_dir, row.patient_id)
    # A marker of older code (rows without the conformal columns) is redone.
    if (marker is not None and marker.get("fingerprint") == patient_fingerprint(config, exports, row)
        and all(len(values) == len(columns) + len(row.covariates) for values in marker["rows"])):
      markers[row.patient_id] = marker
    else:
      todo.append(row)
  failures: dict[str, str] = {}
  computed = []
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  with tqdm(total=len(todo), desc="patients", unit="patient", disable=not progress or not todo) as bar:
    for patient_id, marker, reason in _run_all(todo, config, exports):
      if marker is None:
        failures[patient_id] = reason
        tqdm.write(f"patient {patient_id} REFUSED: {reason}", file=sys.stderr)
      else:
        markers[patient_id] = marker
        computed.append(patient_id)
      bar.update(1)

  rows = sorted((row for marker in markers.values() for row in marker["rows"]),
                key=lambda values: (values[0], values[1]))
  header = columns + list(manifest.covariate_names)
  predictions_csv = io_utils.join(config.output_dir, contracts.PATIENT_PREDICTIONS_FILE)
  io_utils.atomic_write_csv(predictions_csv, header, rows)
  failure_rows = sorted(failures.items())
  io_utils.atomic_write_csv(io_utils.join(config.output_dir, contracts.FAILURES_FILE), ["patient_id", "reason"],
                            failure_rows)
  region_rows = sorted((row for marker in markers.values() for row in marker.get("region_rows", ())),
                       key=lambda values: (values[0], values[1]))
  if region_rows:
    io_utils.atomic_write_csv(io_utils.join(config.output_dir, REGION_PREDICTIONS_FILE), REGION_PREDICTION_COLUMNS,
                              region_rows)
  flagged = {values[1] for values in rows if values[6]}
  return CohortResult(predictions_csv=predictions_csv, num_patients=len(markers), computed=tuple(sorted(computed)),
                      failures=tuple(failure_rows), num_flagged=len(flagged),
                      wall_time_s=time.perf_counter() - start)
