"""Exports trained cells as one versioned TF Serving SavedModel (`python -m export`).

Layout (TF Serving's model base path):
  X/pdx_<task>/<version>/saved_model.pb, variables/, assets.extra/pdx_export.json,
  assets.extra/models/rRR_fFF.keras (the cells' Keras models, for Grad-CAM; TF Serving ignores assets.extra)

pdx_export.json also records how the training records chose the abdominal slices (region settings, slice
spacing, from the records' dataset.json) so `predict` reads a study the same way.

The export holds one model: the ensemble of the chosen cells (mean probability, standard deviation as
uncertainty), or a single cell (uncertainty 0). Its signatures are built by `pdx_tf.serving.signatures`. A version is
written into a temporary folder beside the versions (a name TF Serving ignores: not an integer) and renamed
into place, so a half-written version is never served and an existing version is never overwritten.

Grad-CAM needs the Keras models, not the serving graph. They are re-saved into `assets.extra/models/`
(without optimizer state) and listed with their SHA-256 in pdx_export.json, so an export is self-contained:
`predict` works after the runs folder is archived or on another machine. The cost is disk: the export is about
twice the size of the weights.
"""

from __future__ import annotations

import dataclasses
import os
import re
import uuid
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from pdx_tf import configs, conformal, contracts, io_utils, provenance, settings as settings_lib
from pdx_tf.contracts import COMPLETE_STATUS, EXPORT_FORMAT, EXPORT_METADATA_FILE as METADATA_FILE, EXPORT_SCHEMA_VERSION
from pdx_tf.contracts import RUN_FILE, TASKS
from pdx_tf.data import preprocess
from pdx_tf.errors import ExportError
from pdx_tf.serving import signatures
from pdx_tf.training import aggregation, grid as training_grid, heads, model as model_lib, region_bands

METADATA_FOLDER = "assets.extra"
KERAS_MODELS_FOLDER = "models"
# The conformal alpha of an export whose cells were trained without --conformal_alpha (predict --conformal_alpha
# re-derives the sets at another alpha from the stored calibration scores).
DEFAULT_CONFORMAL_ALPHA = 0.1
_CELL_SELECTOR = re.compile(r"^r(\d+)(?:_?f(\d+))?$")  # r00_f03 or r0f3 (one cell), r00 (a repeat)


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  """What `python -m export` exports.

  Attributes:
    runs_dir: the training output (a task folder such as runs/p, or a parent holding several tasks).
    task: "p", "sb", or "p,sb" for both heads of a joint grid (`export_tasks`: one model per task).
    export_dir: X; the model goes to X/pdx_<task>/<version>/.
    cells: cell selectors, each "rRR_fFF" (one cell) or "rRR" (every fold of repeat RR), matched against
      run.json's repeat and fold; empty means every complete cell of the task.
    version: the version number to write; None means one more than the highest existing version.
  """

  runs_dir: str
  task: str
  export_dir: str
  cells: tuple[str, ...] = ()
  version: int | None = None

  def __post_init__(self):
    if self.task not in TASKS and self.task not in (contracts.JOINT_TASK, contracts.PCI_TASK):
      raise ValueError(f"task must be one of {', '.join(TASKS)}, {contracts.JOINT_TASK} or {contracts.PCI_TASK}, got"
                       f" {self.task!r}")
    if not self.runs_dir or not self.export_dir:
      raise ValueError("runs_dir and export_dir must be given")
    for selector in self.cells:
      if not _CELL_SELECTOR.match(selector):
        raise ValueError(f"cell selector {selector!r} is not understood; use rRR_fFF (e.g. r00_f03, or r0f3) or rRR "
                         "(every fold of repeat RR)")
    if self.version is not None and self.version < 1:
      raise ValueError(f"version must be a positive integer, got {self.version}")


@dataclasses.dataclass(frozen=True)
class CellRun:
  """One complete training cell, as described by its run.json."""

  folder: str
  repeat: int
  fold: int
  run_info: dict
  # run.json's preprocess, typed and checked once when read (contracts.RunInfo); None for a hand-made CellRun.
  preprocess_config: Any = None
  # run.json's region, typed once when read (contracts.RunInfo.region_settings); None when it lacks the rule.
  region_settings: Any = None

  @property
  def name(self) -> str:
    return f"r{self.repeat:02d}_f{self.fold:02d}"

  @property
  def model_path(self) -> str:
    return io_utils.join(self.folder, self.run_info.get("model_path", "model.keras"))


def task_model_dir(export_dir: str, task: str) -> str:
  """X/pdx_<task>: the base path TF Serving watches."""
  return io_utils.join(export_dir, f"pdx_{task}")


def existing_versions(model_dir: str) -> list[int]:
  """The integer version folders under a model base path, ascending (temporary folders are ignored)."""
  if not tf.io.gfile.isdir(model_dir):
    return []
  versions = []
  for name in tf.io.gfile.listdir(model_dir):
    name = name.rstrip("/")
    if name.isdigit() and tf.io.gfile.isdir(io_utils.join(model_dir, name)):
      versions.append(int(name))
  return sorted(versions)


def read_cell(folder: str) -> CellRun:
  """Reads a cell folder's run.json.

  Raises:
    ExportError: if run.json is missing, of another schema, or not complete.
  """
  path = io_utils.join(folder, RUN_FILE)
  if not tf.io.gfile.exists(path):
    raise ExportError(f"{path} is missing: the cell is not finished; train it or leave it out of --cells")
  info = contracts.read_run_info(path, ExportError)
  run_info = info.document
  return CellRun(folder=folder, repeat=int(run_info["repeat"]), fold=int(run_info["fold"]), run_info=run_info,
                 preprocess_config=info.preprocess_config, region_settings=info.region_settings)


def find_cells(runs_dir: str, task: str, selectors: Sequence[str] = ()) -> list[CellRun]:
  """The complete cells of `task` below `runs_dir`, filtered by selectors, sorted by (repeat, fold).

  Raises:
    ExportError: for a missing folder, no matching cell, a selector that matches nothing, or two complete
      run.json files for the same cell.
  """
  if not tf.io.gfile.isdir(runs_dir):
    raise ExportError(f"runs folder {runs_dir} does not exist; point --runs_dir at the training output")
  cells: dict[tuple[int, int], CellRun] = {}
  for folder, _, files in tf.io.gfile.walk(runs_dir):
    if RUN_FILE not in files or io_utils.is_temp_path(folder):
      continue
    info = io_utils.read_json(io_utils.join(folder, RUN_FILE))
    if not isinstance(info, dict) or not _serves(info.get("task"), task) or info.get("status") != COMPLETE_STATUS:
      continue  # other tasks, unfinished and failed cells are simply not candidates
    cell = read_cell(folder)
    key = (cell.repeat, cell.fold)
    if key in cells:
      raise ExportError(f"two complete run.json for task {task} cell {cell.name}: {cells[key].folder} and "
                        f"{folder}; point --runs_dir at one training output")
    cells[key] = cell
  if not cells:
    raise ExportError(f"no complete cell of task {task} below {runs_dir}; train first")
  chosen = sorted(cells.values(), key=lambda cell: (cell.repeat, cell.fold))
  if selectors:
    selected = []
    for selector in selectors:
      match = _CELL_SELECTOR.match(selector)
      if not match:
        raise ExportError(f"cell selector {selector!r} is not understood; use rRR_fFF or rRR")
      repeat = int(match.group(1))
      fold = None if match.group(2) is None else int(match.group(2))
      hits = [cell for cell in chosen if cell.repeat == repeat and (fold is None or cell.fold == fold)]
      if not hits:
        raise ExportError(f"--cells={selector} matches no complete cell of task {task} below {runs_dir}")
      selected.extend(cell for cell in hits if cell not in selected)
    chosen = sorted(selected, key=lambda cell: (cell.repeat, cell.fold))
  return chosen


def _serves(grid_task: Any, task: str) -> bool:
  """Whether a cell trained on `grid_task` has a head for `task` (a joint grid's cells have both)."""
  return grid_task == task or (grid_task == contracts.JOINT_TASK and task in TASKS)


def _shared_settings(cells: Sequence[CellRun], task: str) -> dict[str, Any]:
  """Preprocess, aggregation and model settings that every chosen cell must share."""
  first = cells[0]
  for cell in cells:
    if not _serves(cell.run_info.get("task"), task):
      raise ExportError(f"cell {cell.folder} is for task {cell.run_info.get('task')!r}, not {task}")
    for key in ("task", "preprocess", "aggregation", "aggregation_top_k", "head", "context_slices"):
      if cell.run_info.get(key) != first.run_info.get(key):
        raise ExportError(f"cells {first.name} and {cell.name} differ in {key!r} ({first.run_info.get(key)} vs "
                          f"{cell.run_info.get(key)}); export cells trained on the same settings separately")
  bands = {bool(cell.run_info["config"].get("region_bands", False)) for cell in cells}
  if len(bands) > 1:
    raise ExportError("the cells differ in 'region_bands'; export cells trained on the same settings separately")
  preprocess_config = first.preprocess_config or read_cell(first.folder).preprocess_config
  rule = str(first.run_info["aggregation"])
  top_k = int(first.run_info["aggregation_top_k"])
  head = str(first.run_info.get("head", heads.DEFAULT_HEAD))
  context_slices = int(first.run_info.get("context_slices", 0))
  try:
    if not heads.get(head).own_patient_score:  # e.g. the MIL head's patient score is its own attention pooling
      aggregation.check_aggregation(rule, top_k)
  except ValueError as error:
    raise ExportError(f"{first.folder}/run.json: {error}") from None
  return {"preprocess": preprocess_config, "aggregation": rule, "aggregation_top_k": top_k,
          "model": first.run_info["config"].get("model", {}), "head": head, "context_slices": context_slices,
          "grid_task": first.run_info.get("task"), "region_bands": bands.pop()}


def float32_model(model: keras.Model, run_config: dict[str, Any]) -> keras.Model:
  """The model with float32 compute everywhere (rebuilt from its ModelConfig if it was mixed precision).

  Cells trained on a GPU use mixed_float16; served on a CPU, float16 convolutions are slow or unsupported and
  the numbers would differ from a float32 check. The variables are float32 under mixed precision anyway, so
  the weights are copied over unchanged.
  """
  policies = {layer.dtype_policy.compute_dtype for layer in model._flatten_layers()}  # pylint: disable=protected-access
  if policies <= {"float32"}:
    return model
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("float32")
  try:
    # weights none: the weights come from the trained model, not a file
    rebuilt = model_lib.build_model(model_lib.ModelConfig.from_run(run_config, weights="none"))
  finally:
    keras.mixed_precision.set_global_policy(previous)
  rebuilt.set_weights(model.get_weights())
  return rebuilt


def region_settings(cells: Sequence[CellRun]) -> dict[str, Any]:
  """How the training records chose and spaced the abdominal slices, so `predict` reads a study the same way: the
  export's JSON form of `settings.RegionSettings`, plus "source".

  run.json carries them (`region`, from the records' dataset.json at training time; typed when read). Cells
  trained before it did fall back to the training records' dataset.json (via run.json's records_dir), checked
  against the cell's dataset or records content hash; when that is not reachable either (records deleted or on
  another machine) the pipeline defaults are recorded, and said so.
  """
  for cell in cells:
    typed = cell.region_settings
    if typed is None:  # a hand-made CellRun: its run.json dict, typed by the contract's reader
      typed = contracts.run_region_settings(cell.run_info.get("region") or {})
    if typed is not None:
      return {**typed.export_dict(), "source": "run.json"}
  for cell in cells:
    records_dir = cell.run_info.get("config", {}).get("records_dir")
    if not records_dir:
      continue
    path = io_utils.join(records_dir, contracts.DATASET_FILE)
    try:
      if not tf.io.gfile.exists(path):
        continue
      dataset = io_utils.read_json(path)
      # The same records: byte-identical, or (after a pipeline rerun by newer code) the same content.
      if (io_utils.sha256_file(path) != cell.run_info.get("dataset_hash")
          and contracts.records_content_hash(dataset) != cell.run_info.get("records_hash")):
        continue
      if "region" not in (dataset.get("config") or {}):
        continue
      return {**contracts.dataset_region_settings(dataset).export_dict(), "source": "training dataset.json"}
    except (KeyError, TypeError, ValueError, tf.errors.OpError):
      continue
  return {**settings_lib.RegionSettings().export_dict(),
          "source": "pipeline defaults (the training dataset.json was not reachable at export time)"}


def input_statistics(cells: Sequence[CellRun]) -> dict[str, Any] | None:
  """The training inputs' distributions for predict's drift flags: run.json's "input_statistics" (from the
  records' dataset.json). Cells of one export share their records, so the first cell that has them speaks for
  all; None when no cell has them (records made before the pipeline computed them)."""
  for cell in cells:
    statistics = cell.run_info.get("input_statistics")
    if statistics:
      return dict(statistics)
  return None


def _load_model(cell: CellRun, image_size: int, task: str) -> keras.Model:
  """The cell's float32 classifier of `task`: its model.keras, or that task's head of a joint model."""
  if not tf.io.gfile.exists(cell.model_path):
    raise ExportError(f"{cell.model_path} is missing although run.json says complete; re-run cell {cell.name}")
  try:
    model = keras.saving.load_model(cell.model_path, compile=False)
  except Exception as error:  # pylint: disable=broad-except  # Keras raises many types for a bad file.
    raise ExportError(f"cannot load {cell.model_path} ({type(error).__name__}); re-run cell {cell.name}") \
        from None
  try:
    model = float32_model(model, cell.run_info["config"])
  except ValueError as error:
    raise ExportError(f"cannot rebuild {cell.model_path} in float32 from run.json's model config ({error}); "
                      "re-run the cell") from None
  if cell.run_info.get("task") == contracts.JOINT_TASK:
    if not model_lib.is_joint_model(model):
      raise ExportError(f"{cell.model_path} has one output, but its run.json says task {contracts.JOINT_TASK}; re-run"
                        f" cell {cell.name}")
    model = model_lib.task_view(model, task)
  size = signatures.model_image_size(model)
  if size != image_size:
    raise ExportError(f"{cell.model_path} takes {size} px images but its run.json preprocess makes "
                      f"{image_size} px; the cell is inconsistent, re-run it")
  return model


def _new_version(model_dir: str, version: int | None) -> int:
  """`version`, or one more than the highest in model_dir when None; an existing version is an error."""
  versions = existing_versions(model_dir)
  if version is None:
    return (versions[-1] + 1) if versions else 1
  if version in versions:
    raise ExportError(f"{model_dir}/{version} already exists; versions are never overwritten: omit --version "
                      f"to write {versions[-1] + 1}, or choose a new number")
  return version


def _write_metadata_models(temp_dir: str, task: str, version: int, cells: Sequence[CellRun],
                           models: Sequence[keras.Model], settings: Mapping[str, Any]) -> dict[str, Any]:
  """Saves each cell's Keras model under assets.extra/models/ and returns pdx_export.json's content."""
  preprocess_config: preprocess.PreprocessConfig = settings["preprocess"]
  cell_entries = []
  for cell, model in zip(cells, models):
    relative = f"{KERAS_MODELS_FOLDER}/{cell.name}.keras"
    path = io_utils.join(temp_dir, METADATA_FOLDER, relative)
    tf.io.gfile.makedirs(os.path.dirname(path))
    model.save(path)
    cell_entries.append({
        "repeat": cell.repeat, "fold": cell.fold, "keras_model": relative, "sha256": io_utils.sha256_file(path),
        "split_hash": cell.run_info.get("split_hash"), "dataset_hash": cell.run_info.get("dataset_hash"),
        "code_version": cell.run_info.get("code_version"),
    })
  metadata = {
      "format": EXPORT_FORMAT,
      "schema_version": EXPORT_SCHEMA_VERSION,
      "task": task,
      "version": version,
      "kind": "ensemble" if len(cells) > 1 else "single",
      "num_models": len(cells),
      "cells": cell_entries,
      "preprocess": configs.to_dict(preprocess_config),  # the image size's one holder (ExportInfo.image_size)
      "model": settings["model"],
      "aggregation": settings["aggregation"],
      "aggregation_top_k": settings["aggregation_top_k"],
      "head": settings["head"],
      "context_slices": settings["context_slices"],
      **({"trained_with_tasks": list(contracts.task_list(settings["grid_task"]))}
         if settings["grid_task"] == contracts.JOINT_TASK else {}),
      "ensemble_rule": ("slice probability = mean over models; uncertainty = population standard deviation "
                        "over models (0 for one model); patient probability = each model's aggregation of "
                        "its slice probabilities, then the mean over models"),
      "signatures": list(signatures.SIGNATURE_NAMES) + (
          [signatures.PREDICT_REGIONS] if task == contracts.PCI_TASK else []),
      "keras_models_source": (f"{METADATA_FOLDER}/{KERAS_MODELS_FOLDER}/: the cells' model.keras re-saved at "
                              "export time without optimizer state (used by predict for Grad-CAM)"),
      "gradcam": {"backbone_layer": model_lib.BACKBONE_NAME,
                  "target_layer": model_lib.gradcam_layer(preprocess_config.image_size)},
      "region": region_settings(cells),
      "input_statistics": input_statistics(cells),
      "code_version": provenance.code_version(),
  }
  metadata.update(region_point(cells, settings["region_bands"]) if task == contracts.PCI_TASK
                  else operating_point(cells, task))
  metadata["conformal"] = settings.get("conformal")
  if settings.get("conformal"):
    metadata["signatures"].append(signatures.PREDICT_PATIENT_SET)
  return metadata


def region_point(cells: Sequence[CellRun], bands: bool = False) -> dict[str, Any]:
  """pdx_export.json's "regions" of a regions export: the region names (index = output column), each region's
  threshold (the mean of the cells' run.json "thresholds", applied to the ensemble's region probability), the
  PCI scale (the mean of the cells' "pci_scale": predicted PCI = sum of probability x scale) and "bands": each
  region's (lowest, highest) relative slice position when the grid used `region_bands` (null for 9-12 and for a
  grid without), the slices its probability and evidence come from."""
  limits = region_bands.bands() if bands else None
  thresholds = np.mean([cell.run_info["thresholds"] for cell in cells], axis=0)
  scale = np.mean([cell.run_info["pci_scale"] for cell in cells], axis=0)
  return {"regions": {
      "names": list(contracts.PCI_REGION_NAMES), "small_bowel": list(contracts.PCI_SMALL_BOWEL_REGIONS),
      "thresholds": [float(value) for value in thresholds], "pci_scale": [float(value) for value in scale],
      "threshold_rule": sorted({str(cell.run_info.get("threshold_rule", "fixed")) for cell in cells}),
      "signature": signatures.PREDICT_REGIONS,
      "bands": None if limits is None else [None if not np.isfinite(low) else [float(low), float(high)]
                                            for low, high in limits],
      "outputs": {"region_probabilities": ("[13] mean over models of each model's aggregation of that region's"
                                           " slice scores" + (" in its band" if bands else "")),
                  "region_uncertainty": "[13] their standard deviation",
                  "slice_region_probabilities": "[N, 13] mean over models"}}}


def conformal_calibration(cells: Sequence[CellRun], task: str) -> dict[str, Any] | None:
  """pdx_export.json's "conformal": the Mondrian thresholds (pdx_tf.conformal) fitted on the exported cells'
  out-of-fold patient probabilities: each a training patient of the ensemble, scored by the cell that held it out
  (never by a model that trained on it). Stored with those scores (probability and label only) so that predict
  can re-derive the sets at another alpha; None when a cell has no patient_predictions.csv.

  The alpha is the cells' run.json config "conformal_alpha" (`train --conformal_alpha`), else
  DEFAULT_CONFORMAL_ALPHA. When every cell has inner patients, each cell's probabilities are put on its model's
  own scale (conformal.ScoreScale, fitted on the cell's inner patients; "scales", one a model in the export's
  model order) and the thresholds are fitted on those scores ("calibration_scores"); a new patient's score is then
  the mean over the models of each model's scaled patient probability (conformal.ensemble_score; the
  `predict_patient_set` signature computes it in the graph). Otherwise the thresholds are fitted on single
  models' probabilities and applied to the ensemble's mean (the served probability). `evaluate --predictions`
  checks the coverage on a new cohort.
  """
  probabilities, labels, cell_of_row = [], [], []
  alphas = set()
  references = []
  for position, cell in enumerate(cells):
    value = cell.run_info.get("config", {}).get("conformal_alpha")
    if value:
      alphas.add(float(value))
    path = io_utils.join(contracts.task_folder(cell.folder, str(cell.run_info.get("task")), task),
                         contracts.PATIENT_PREDICTIONS_FILE)
    if not io_utils.exists(path):
      return None
    for row in io_utils.read_csv(path):
      probabilities.append(float(row["probability"]))
      labels.append(int(row["label"]))
      cell_of_row.append(position)
    validation = contracts.task_run_document(cell.run_info, task).get("inner_validation") or {}
    references.append(validation.get("patient_probabilities") or [])
  if len(alphas) > 1:
    raise ExportError(f"the cells were trained with different --conformal_alpha ({sorted(alphas)}); export cells of"
                      " one alpha")
  source = "cells" if alphas else "default"
  alpha = alphas.pop() if alphas else DEFAULT_CONFORMAL_ALPHA
  scales = conformal.fit_scales(references)
  scores = conformal.scaled_scores(np.zeros(len(cell_of_row)), cell_of_row, probabilities,
                                   None if scales is None else {(0, position): scale
                                                                for position, scale in enumerate(scales)})
  thresholds = conformal.fit_thresholds(scores, labels, alpha)
  scheme = ("Mondrian split-conformal thresholds from the exported cells' out-of-fold patient probabilities"
            " (pdx_tf/conformal.py): negative is in the set iff score <= negative_max_score, positive iff"
            " 1 - score <= positive_max_score; ")
  scheme += ("the score is each model's patient probability on its own scale (scales, fitted on its cell's inner"
             " patients), averaged over the models" if scales is not None
             else "the score is the ensemble's patient probability")
  return {**thresholds.to_dict(), "alpha_source": source, "scheme": scheme,
          "scales": None if scales is None else [scale.to_dict() for scale in scales],
          "calibration_probabilities": [round(value, 8) for value in probabilities],
          "calibration_scores": [round(float(value), 8) for value in scores],
          "calibration_labels": labels}


def operating_point(cells: Sequence[CellRun], task: str) -> dict[str, Any]:
  """pdx_export.json's "threshold" and "calibration" of `task` from the cells' run.json (empty when no cell has
  its own); a joint grid's cells give that task's own (run.json "by_task", contracts.task_run_document).

  Ensemble rule: the threshold is the mean of the cells' thresholds (a cell without one counts 0.5), applied to
  the ensemble's patient probability (the mean of the cells' patient probabilities; predict's `predicted`).
  Calibration is per cell, fitted on that cell's inner patients: it is listed for each cell, and the ensemble's
  calibrated probability is the mean of the cells' calibrated patient probabilities
  (pdx_tf.training.calibration.apply_calibration); the serving signatures return uncalibrated probabilities.
  """
  infos = [contracts.task_run_document(cell.run_info, task, io_utils.join(cell.folder, RUN_FILE), ExportError)
           for cell in cells]
  if not any("threshold_rule" in info for info in infos):
    return {}
  thresholds = [float(info.get("threshold", 0.5)) for info in infos]
  rules = sorted({str(info.get("threshold_rule", "fixed")) for info in infos})
  result: dict[str, Any] = {
      "threshold": float(np.mean(thresholds)),
      "threshold_rule": {"rules": rules, "cells": thresholds,
                         "ensemble": "mean of the cells' thresholds, applied to the ensemble patient probability"},
  }
  calibrations = [info.get("calibration") for info in infos]
  if any(calibrations):
    result["calibration"] = {
        "methods": sorted({entry["method"] for entry in calibrations if entry}),
        "cells": [{"repeat": cell.repeat, "fold": cell.fold, "parameters": entry}
                  for cell, entry in zip(cells, calibrations)],
        "ensemble": ("mean over the cells of each cell's calibrated patient probability; not applied by the "
                     "serving signatures"),
    }
  else:
    result["calibration"] = None
  return result


def export_models(cell_dirs: Sequence[str], export_dir: str, task: str, *, version: int | None = None,
                  config: Any = None) -> str:
  """Exports the given training cells as one SavedModel version (the trainer's `--export_dir` hook).

  Args:
    cell_dirs: cell folders, each with a complete run.json and its model.keras; one folder exports a single
      model, several an ensemble.
    export_dir: X; the version goes to X/pdx_<task>/<version>/.
    task: "p" or "sb"; every cell must be of this task.
    version: the version number; None means one more than the highest existing one.
    config: an optional config dataclass (e.g. ExportConfig) written as assets.extra/config.json.

  Returns:
    The version folder written.

  Raises:
    ExportError: for incomplete or inconsistent cells (different preprocessing, image size or aggregation),
      an existing version, or an unwritable export folder.
  """
  if task not in TASKS and task != contracts.PCI_TASK:
    raise ExportError(f"unknown task {task!r}; tasks are {', '.join(TASKS)} or {contracts.PCI_TASK}")
  if not cell_dirs:
    raise ExportError("no cells to export")
  cells = sorted((read_cell(folder) for folder in cell_dirs), key=lambda cell: (cell.repeat, cell.fold))
  names = [cell.name for cell in cells]
  if len(set(names)) != len(names):
    raise ExportError(f"the same cell is listed twice among {', '.join(names)}")
  settings = _shared_settings(cells, task)
  preprocess_config: preprocess.PreprocessConfig = settings["preprocess"]

  model_dir = task_model_dir(export_dir, task)
  io_utils.check_writable(model_dir)
  version = _new_version(model_dir, version)
  final_dir = io_utils.join(model_dir, str(version))

  models = [_load_model(cell, preprocess_config.image_size, task) for cell in cells]
  # Conformal sets are for the patient-level tasks; a regions export has none (docs/conformal.md).
  settings["conformal"] = conformal_calibration(cells, task) if task != contracts.PCI_TASK else None
  bounds = (conformal.ConformalThresholds.from_dict(settings["conformal"]) if settings["conformal"] else None)
  try:  # where the preprocessing meets the models: the context/window check happens here, once an export
    module = signatures.PdxServingModule(models, preprocess_config, settings["aggregation"],
                                      settings["aggregation_top_k"], context_slices=settings["context_slices"],
                                      conformal_thresholds=bounds, region_bands=settings["region_bands"],
                                      conformal_scales=(None if not settings["conformal"]
                                                        or settings["conformal"]["scales"] is None else
                                                        [conformal.ScoreScale.from_dict(value)
                                                         for value in settings["conformal"]["scales"]]))
  except ValueError as error:
    raise ExportError(f"{cells[0].folder}/run.json: {error}") from None
  temp_dir = io_utils.join(model_dir, f"{io_utils.TEMP_MARKER}{uuid.uuid4().hex[:12]}-{version}")
  try:
    tf.saved_model.save(module, temp_dir, signatures=module.signatures())
    metadata = _write_metadata_models(temp_dir, task, version, cells, models, settings)
    if config is not None:
      configs.write_config(io_utils.join(temp_dir, METADATA_FOLDER, "config.json"), config)
    contracts.ExportInfo.from_document(metadata, METADATA_FILE)  # the writer keeps the contract its readers check
    io_utils.atomic_write_json(io_utils.join(temp_dir, METADATA_FOLDER, METADATA_FILE), metadata)
    if tf.io.gfile.exists(final_dir):
      raise ExportError(f"{final_dir} appeared while exporting (another export?); versions are never "
                        "overwritten: run again to get the next version")
    tf.io.gfile.rename(temp_dir, final_dir, overwrite=False)
  except BaseException:
    if tf.io.gfile.exists(temp_dir):
      tf.io.gfile.rmtree(temp_dir)
    raise
  return final_dir


def export_if_complete(output_dir: str, task: str, num_repeats: int, num_folds: int, export_dir: str) -> list[str]:
  """Exports every cell of the grid as one ensemble per task (`export_models`; a joint grid's `task` "p,sb" gives
  X/pdx_p and X/pdx_sb): `python -m train --export_dir` once all of them are complete. Returns the version
  folders written, none while cells are missing.

  With several shards only the machine that finds the grid complete exports; the others log and return []
  (run `python -m export` afterwards, or rerun any shard with --export_dir).
  """
  folders = [contracts.cell_folder(output_dir, cell) for cell in training_grid.all_cells(num_repeats, num_folds)]
  missing = [folder for folder in folders if not training_grid.is_complete(folder)]
  if missing:
    logging.warning("--export_dir: %d of %d cells are not complete yet (e.g. %s); not exporting. Rerun with"
                    " --export_dir once every shard has finished, or use `python -m export`", len(missing),
                    len(folders), missing[0])
    return []
  return [export_models(folders, export_dir, one_task) for one_task in contracts.task_list(task)]


def export_runs(config: ExportConfig) -> str:
  """`python -m export`: finds the chosen cells and exports them; returns the version folder."""
  cells = find_cells(config.runs_dir, config.task, config.cells)
  return export_models([cell.folder for cell in cells], config.export_dir, config.task, version=config.version,
                       config=config)


def export_tasks(config: ExportConfig) -> list[str]:
  """`python -m export`: `export_runs` for each task of config.task (both heads of a joint grid for "p,sb")."""
  return [export_runs(dataclasses.replace(config, task=task)) for task in contracts.task_list(config.task)]


def read_export(path: str) -> tuple[str, dict[str, Any]]:
  """Resolves a model path to (version folder, pdx_export.json contents).

  Args:
    path: a model base path X/pdx_<task> (its highest version is taken) or one version folder.

  Raises:
    ExportError: if the folder is not a pdx export (one line saying what was expected).
  """
  if not tf.io.gfile.isdir(path):
    raise ExportError(f"model folder {path} does not exist; pass X/pdx_<task> or X/pdx_<task>/<version> "
                      "written by python -m export")
  version_dir = path
  if not tf.io.gfile.exists(io_utils.join(path, "saved_model.pb")):
    versions = existing_versions(path)
    if not versions:
      raise ExportError(f"{path} is not a pdx export (no saved_model.pb and no integer version folder); pass "
                        "X/pdx_<task> or one of its version folders written by python -m export")
    version_dir = io_utils.join(path, str(versions[-1]))
  metadata_path = io_utils.join(version_dir, METADATA_FOLDER, METADATA_FILE)
  if not tf.io.gfile.exists(io_utils.join(version_dir, "saved_model.pb")) or \
      not tf.io.gfile.exists(metadata_path):
    raise ExportError(f"{version_dir} is not a pdx export (saved_model.pb or {METADATA_FOLDER}/{METADATA_FILE} "
                      "missing); export it with python -m export")
  try:
    metadata = io_utils.read_json(metadata_path)
  except ValueError:
    raise ExportError(f"{metadata_path} is not valid JSON; re-export the model") from None
  info = contracts.ExportInfo.from_document(metadata, metadata_path)
  _EXPORT_INFOS[version_dir] = info
  return version_dir, dict(info.document)


# The typed pdx_export.json of every export `read_export` checked in this process, by version folder: callers
# that carry the document as a dict ask `export_info` for the typed settings instead of parsing them again.
_EXPORT_INFOS: dict[str, contracts.ExportInfo] = {}


def export_info(version_dir: str) -> contracts.ExportInfo:
  """The typed pdx_export.json of a version folder (`read_export`'s check, done once a process)."""
  if version_dir not in _EXPORT_INFOS:
    read_export(version_dir)
  return _EXPORT_INFOS[version_dir]


def load_export_keras_models(version_dir: str, metadata: dict[str, Any], max_models: int | None = None
                             ) -> list[keras.Model]:
  """Loads the Keras models stored in an export (for Grad-CAM), the first `max_models` cells in order."""
  entries = metadata["cells"][:max_models] if max_models else metadata["cells"]
  models = []
  for entry in entries:
    path = io_utils.join(version_dir, METADATA_FOLDER, entry["keras_model"])
    if not tf.io.gfile.exists(path):
      raise ExportError(f"{path} is missing from the export; re-export the model")
    models.append(keras.saving.load_model(path, compile=False))
  return models
