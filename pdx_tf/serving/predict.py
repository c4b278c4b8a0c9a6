"""Predicts one CT study with exported models and explains it with Grad-CAM (`python -m predict`).

Steps: check the exports (`export.read_export`), read the study's abdominal slices with the pipeline's own
series choice and z-range rule (`region.load_abdomen`, with the region settings and slice spacing the export
recorded from its training records), run each export's `predict_patient` signature (the
in-graph preprocessing, ensemble and aggregation), then Grad-CAM on the highest-scoring slices with the Keras
models stored in the export (`assets.extra/models/`, see `pdx_tf.serving.export`), averaged over at most
`gradcam_max_models` of them (Grad-CAM of all 192 cells would take minutes on a CPU and changes little).

Outputs in output_dir: config.json, prediction.json, gradcam/<task>_slice<NNN>.png (model input and overlay),
summary.png (per task: slice probability along z with its uncertainty band, for attention-MIL exports the
attention weight of each slice on a second axis, and the overlays). 2.5D exports build each slice's stack from the
study's slices in order with `preprocess.preprocess_patient` (as the serving graph does); the overlays show the
centre slice. Grad-CAM of an attention-MIL export explains its instance score (`model.mil_slice_model`). Nothing read
from the DICOM headers reaches them: the study is named only by the optional user-given patient_id, and the
DICOM folder path is withheld (hospital folder names often carry names or accession numbers).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import re
from typing import Any, Mapping, Sequence

import numpy as np
import tensorflow as tf

from pdx_tf import configs, conformal, contracts, io_utils, provenance
from pdx_tf.data import input_statistics, preprocess
from pdx_tf.errors import ExportError, PdxError
from pdx_tf.serving import export, gradcam
from pdx_tf.training import heads, region_bands

PREDICTION_FORMAT = "pdx-tf-prediction"
PREDICTION_SCHEMA_VERSION = 1
_PATIENT_ID = re.compile(r"^[A-Za-z0-9._-]{0,64}$")
WITHHELD = "(withheld: folder names can carry PHI)"


@dataclasses.dataclass(frozen=True)
class PredictConfig:
  """What `python -m predict` runs.

  Attributes:
    model_dirs: exports, each X/pdx_<task> (highest version) or one version folder; one per task.
    dicom_dir: the study's DICOM folder (searched recursively).
    output_dir: where prediction.json and the images go.
    patient_id: optional identifier written to the outputs (letters, digits, '.', '_', '-'); never taken
      from the DICOM headers.
    num_gradcam_slices: Grad-CAM overlays for this many highest-scoring slices per task.
    gradcam_max_models: average Grad-CAM over at most this many of an ensemble's models.
    conformal_alpha: the conformal sets' error rate; None: the export's own (pdx_export.json "conformal"), another
      value re-fits the thresholds on the export's stored calibration scores (`conformal_answer`).
  """

  model_dirs: tuple[str, ...]
  dicom_dir: str
  output_dir: str
  patient_id: str = ""
  num_gradcam_slices: int = 3
  gradcam_max_models: int = 8
  conformal_alpha: float | None = None

  def __post_init__(self):
    if not self.model_dirs:
      raise ValueError("give at least one --model (an export folder X/pdx_p or X/pdx_sb)")
    if not self.dicom_dir or not self.output_dir:
      raise ValueError("dicom_dir and output_dir must be given")
    if not _PATIENT_ID.match(self.patient_id):
      raise ValueError("patient_id may hold only letters, digits, '.', '_' and '-' (at most 64); use a study "
                       "code, not a name")
    if not 0 <= self.num_gradcam_slices <= 32:
      raise ValueError(f"num_gradcam_slices must be in [0, 32], got {self.num_gradcam_slices}")
    if self.gradcam_max_models < 1:
      raise ValueError(f"gradcam_max_models must be at least 1, got {self.gradcam_max_models}")
    if self.conformal_alpha is not None:
      object.__setattr__(self, "conformal_alpha", conformal.check_alpha(self.conformal_alpha))


@dataclasses.dataclass
class _TaskResult:
  task: str
  version_dir: str
  metadata: dict[str, Any]
  slice_probability: np.ndarray
  slice_uncertainty: np.ndarray
  patient_probability: float
  patient_uncertainty: float
  gradcam_slices: list[int]
  images: np.ndarray  # model inputs of the Grad-CAM slices
  heatmaps: np.ndarray
  attention: np.ndarray | None = None  # [N], attention-MIL exports only
  conformal_score: float | None = None  # predict_patient_set's, exports with conformal thresholds only


def load_exports(model_dirs: Sequence[str]) -> list[tuple[str, dict[str, Any]]]:
  """(version folder, metadata) per export, checking one export per task.

  Raises:
    ExportError: if a folder is not a pdx export or two are for the same task.
  """
  exports = [export.read_export(path) for path in model_dirs]
  tasks = [metadata["task"] for _, metadata in exports]
  if len(set(tasks)) != len(tasks):
    raise ExportError(f"two --model exports for the same task ({', '.join(tasks)}); give one per task")
  order = (*export.TASKS, contracts.PCI_TASK)
  return sorted(exports, key=lambda item: order.index(item[1]["task"]))


@functools.lru_cache(maxsize=4)
def _saved_model(version_dir: str):
  """The loaded export, once per process: a cohort's patients share it (loading takes seconds)."""
  return tf.saved_model.load(version_dir)


@functools.lru_cache(maxsize=4)
def _keras_models(version_dir: str, max_models: int) -> tuple:
  """The export's Keras models as slice classifiers for Grad-CAM (an attention-MIL model's instance scorer)."""
  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  _, metadata = export.read_export(version_dir)
  models = export.load_export_keras_models(version_dir, metadata, max_models)
  return tuple(model_lib.mil_slice_model(model) if model_lib.is_mil_model(model) else model for model in models)


def viewable_images(images: np.ndarray, context_slices: int) -> np.ndarray:
  """Model inputs as RGB for overlays: a 2.5D stack [N, S, S, 2C+1] shows its centre slice (channel C)."""
  if not context_slices:
    return images
  centre = context_slices
  return np.repeat(images[..., centre:centre + 1], 3, axis=-1)


def _predict_task(version_dir: str, metadata: dict[str, Any], hu: np.ndarray, num_gradcam_slices: int,
                  gradcam_max_models: int) -> _TaskResult:
  # An export with conformal score scales decides its set on a score that is not the patient probability: its
  # predict_patient_set gives predict_patient's outputs plus that score, in one pass. (Older exports' set
  # signature lacks the slice outputs, and their score is the probability: predict_patient.)
  functions = _saved_model(version_dir).signatures
  name = "predict_patient_set" if export.export_info(version_dir).conformal_scales is not None else "predict_patient"
  outputs = functions[name](hu=tf.constant(hu, tf.float32))
  slice_probability = outputs["slice_probability"].numpy()
  count = min(num_gradcam_slices, slice_probability.size)
  # Highest first; ties by slice index so the choice is deterministic.
  order = sorted(range(slice_probability.size), key=lambda index: (-float(slice_probability[index]), index))
  chosen = sorted(order[:count], key=lambda index: -float(slice_probability[index]))
  image_size = export.export_info(version_dir).image_size
  context_slices = int(metadata.get("context_slices", 0))
  images = np.zeros((0, image_size, image_size, preprocess.model_channels(context_slices)), np.uint8)
  heatmaps = np.zeros((0, image_size, image_size), np.float32)
  if chosen:
    preprocess_config = export.export_info(version_dir).preprocess_config
    if context_slices:  # a stack needs the slice's neighbours: build every stack, as serving does, then pick
      images = preprocess.preprocess_patient(hu, preprocess_config, context_slices).numpy()[chosen]
    else:
      images = preprocess.preprocess_slices(hu[chosen], preprocess_config).numpy()
    heatmaps = gradcam.ensemble_grad_cam(list(_keras_models(version_dir, gradcam_max_models)), images)
  return _TaskResult(
      task=metadata["task"], version_dir=version_dir, metadata=metadata, slice_probability=slice_probability,
      slice_uncertainty=outputs["slice_uncertainty"].numpy(),
      patient_probability=float(outputs["patient_probability"].numpy()),
      patient_uncertainty=float(outputs["patient_uncertainty"].numpy()),
      gradcam_slices=chosen, images=viewable_images(images, context_slices), heatmaps=heatmaps,
      attention=outputs["attention"].numpy() if "attention" in outputs else None,
      conformal_score=float(outputs["conformal_score"].numpy()) if "conformal_score" in outputs else None)


def _region_summary(abdomen: Any) -> dict[str, Any]:
  return {
      "num_slices": int(abdomen.z_mm.size), "z_range_mm": [round(float(v), 3) for v in abdomen.z_range_mm],
      "rule": abdomen.rule, "pixel_spacing_mm": [float(v) for v in abdomen.pixel_spacing_mm],
      "warnings": list(abdomen.warnings),
  }


def _study_label(patient_id: str) -> str:
  return f"patient {patient_id}" if patient_id else "the study"


@dataclasses.dataclass(frozen=True)
class Study:
  """A study read for each export the way its training records were made.

  Attributes:
    regions: the abdominal slices, one per export (shared objects when the exports read studies alike).
    statistics: `input_statistics.patient_statistics` of each export's slices, in the same order.
  """

  regions: tuple[Any, ...]
  statistics: tuple[dict[str, Any], ...]


def read_study(dicom_dir: str, exports: Sequence[tuple[str, dict[str, Any]]], *, patient_id: str = "",
               series_uid: str | None = None, z_min_mm: float | None = None, z_max_mm: float | None = None) -> Study:
  """Reads a study's series and abdominal slices once per distinct region setting of `exports`.

  Raises:
    DicomError, RegionError: one line starting with the patient (or "the study"), no PHI.
  """
  from pdx_tf.data import dicom, region  # pylint: disable=import-outside-toplevel

  series_cache: dict[Any, Any] = {}
  studies: dict[str, tuple[Any, dict[str, Any]]] = {}
  regions, statistics = [], []
  for version_dir, _ in exports:
    # The export's region settings, typed and checked once when its pdx_export.json was read (contracts).
    arguments = export.export_info(version_dir).region_settings.load_abdomen_arguments()
    key = repr(sorted((name, repr(value)) for name, value in arguments.items()))
    if key not in studies:
      series_key = (arguments.get("slice_thickness_mm", 5.0), arguments["min_slices"])
      try:
        if series_key not in series_cache:
          series_cache[series_key] = dicom.read_ct_series(
              dicom_dir, series_uid, min_slices=max(2, arguments["min_slices"]), slice_thickness_mm=series_key[0])
        series = series_cache[series_key]
        abdomen, _ = region.select_abdomen(
            series.hu, series.z_mm, series.pixel_spacing_mm, z_min_mm=z_min_mm, z_max_mm=z_max_mm,
            slice_spacing_mm=arguments["slice_spacing_mm"], min_slices=arguments["min_slices"],
            config=arguments["config"], warnings=series.warnings)
      except PdxError as error:
        raise type(error)(f"{_study_label(patient_id)}: {error}") from None
      studies[key] = (abdomen, input_statistics.patient_statistics(abdomen, series.choice,
                                                                  arguments["config"].body_threshold_hu))
    regions.append(studies[key][0])
    statistics.append(studies[key][1])
  return Study(regions=tuple(regions), statistics=tuple(statistics))


def _write_summary(path: str, results: Sequence[_TaskResult], regions: Sequence[Any], patient_id: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  columns = 1 + max([len(result.gradcam_slices) for result in results] + [1])
  figure, axes = pyplot.subplots(len(results), columns, figsize=(3.2 * columns, 3.4 * len(results)), dpi=100,
                                 squeeze=False)
  for row, (result, abdomen) in enumerate(zip(results, regions)):
    z_mm = np.asarray(abdomen.z_mm, np.float64)
    curve = axes[row][0]
    curve.plot(z_mm, result.slice_probability, color="tab:blue", linewidth=1.2)
    curve.fill_between(z_mm, np.clip(result.slice_probability - result.slice_uncertainty, 0, 1),
                       np.clip(result.slice_probability + result.slice_uncertainty, 0, 1), alpha=0.25,
                       color="tab:blue")
    curve.scatter(z_mm[result.gradcam_slices], result.slice_probability[result.gradcam_slices], color="tab:red",
                  zorder=3, s=14)
    curve.set_ylim(0, 1)
    curve.set_xlabel("z (mm)")
    curve.set_ylabel("slice probability")
    if result.attention is not None:
      weights = curve.twinx()
      weights.plot(z_mm, result.attention, color="tab:orange", linewidth=1.2)
      weights.set_ylim(0, max(float(np.max(result.attention)) * 1.1, 1e-6))
      weights.set_ylabel("attention (MIL)", color="tab:orange")
    curve.set_title(f"task {result.task}: {result.patient_probability:.2f} +- {result.patient_uncertainty:.2f}",
                    fontsize=9)
    for column in range(1, columns):
      axis = axes[row][column]
      axis.axis("off")
      position = column - 1
      if position < len(result.gradcam_slices):
        index = result.gradcam_slices[position]
        axis.imshow(gradcam.overlay(result.images[position], result.heatmaps[position]))
        axis.set_title(f"slice {index} (z {z_mm[index]:.0f} mm): {result.slice_probability[index]:.2f}",
                       fontsize=8)
  title = f"pdx-tf prediction for {_study_label(patient_id)} (research software, not for clinical decisions)"
  figure.suptitle(title, fontsize=10)
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png")
  pyplot.close(figure)
  io_utils.atomic_write_bytes(path, buffer.getvalue())


def predict_study(config: PredictConfig) -> dict[str, Any]:
  """Runs `python -m predict --dicom_dir`; returns what it writes to prediction.json.

  Raises:
    ExportError: a --model folder is not a pdx export.
    DicomError, RegionError: the study has no usable CT series or no abdomen (one line, no PHI).
  """
  exports = load_exports(config.model_dirs)  # fail on a bad model folder before reading the study
  io_utils.check_writable(config.output_dir)
  config_values = configs.to_dict(config)
  config_values["dicom_dir"] = WITHHELD
  io_utils.atomic_write_json(io_utils.join(config.output_dir, "config.json"), config_values)
  # Each export reads the study the way its training records did (usually one setting for both tasks).
  study = read_study(config.dicom_dir, exports, patient_id=config.patient_id)
  return predict_and_write(exports, study, config.output_dir, patient_id=config.patient_id,
                           num_gradcam_slices=config.num_gradcam_slices,
                           gradcam_max_models=config.gradcam_max_models, conformal_alpha=config.conformal_alpha)


def conformal_answer(info: contracts.ExportInfo, probability: float,
                     alpha: float | None = None, score: float | None = None) -> dict[str, Any] | None:
  """prediction.json's "conformal" of a task: the patient's set at the export's thresholds (pdx_export.json
  "conformal", typed when the export was read: `info.conformal_thresholds`), or at `alpha` re-fitted on the
  export's stored calibration scores; None for an export without. `score`: the patient's conformal score from
  the export's predict_patient_set (needed when the export has score scales: pdx_tf.conformal.ScoreScale);
  without scales the score is the patient probability.

  Returns:
    {"set": "negative" | "positive" | "uncertain", "members": "negative" | "positive" | "both" | "empty",
     "alpha", "negative_max_score", "positive_max_score"} and, for an export with score scales, "score".
  """
  thresholds = info.conformal_thresholds
  if thresholds is None:
    return None
  if alpha is not None and alpha != thresholds.alpha:
    stored = info.conformal
    try:
      calibration = stored.get("calibration_scores", stored["calibration_probabilities"])  # older exports: raw
      thresholds = conformal.fit_thresholds(calibration, stored["calibration_labels"], alpha)
    except (KeyError, ValueError) as error:
      raise ExportError(f"export {info.task} v{info.version} has a malformed \"conformal\" entry ({error});"
                        " re-export the model") from None
  scaled = info.conformal_scales is not None
  if scaled and score is None:
    raise ExportError(f"export {info.task} v{info.version} decides its conformal set on scaled scores: read the"
                      " patient's conformal_score from its predict_patient_set signature")
  value = round(score, 6) if scaled else probability
  negative, positive = conformal.prediction_sets([value], thresholds)
  return {"set": str(conformal.answers(negative, positive)[0]), "members": conformal.set_names(negative, positive)[0],
          "alpha": thresholds.alpha, "negative_max_score": thresholds.negative_max_score,
          "positive_max_score": thresholds.positive_max_score,
          **({"score": value} if scaled else {})}  # what the set was decided on, when it is not the probability


def conformal_text(answer: Mapping[str, Any] | None) -> str:
  """The console's words for a conformal answer: the set, or "uncertain: refer" (and why, for an empty set)."""
  if not answer:
    return ""
  words = {"both": "uncertain: refer (both answers plausible)",
           "empty": "uncertain: refer (neither answer fits: unlike the training patients)"}
  return f"; at alpha {answer['alpha']:g}: {words.get(answer['members'], answer['set'])}"


def operating_threshold(metadata: dict[str, Any]) -> float:
  """The export's decision threshold on the patient probability: its "threshold", else 0.5."""
  return float(metadata.get("threshold", 0.5))


def predict_and_write(exports: Sequence[tuple[str, dict[str, Any]]], study: Study, output_dir: str, *,
                      patient_id: str = "", num_gradcam_slices: int = 3, gradcam_max_models: int = 8,
                      write_summary: bool = True, conformal_alpha: float | None = None) -> dict[str, Any]:
  """Runs every export on a read study and writes prediction.json, the Grad-CAM PNGs and summary.png.

  Args:
    exports: (version folder, metadata) per task, from `load_exports`.
    study: the study read by `read_study` with the same exports.
    output_dir: the patient's output folder.
    patient_id: the manifest's or user's code ("" for none); never a header value.
    num_gradcam_slices: overlays per task (0: none).
    gradcam_max_models: Grad-CAM averaged over at most this many models.
    write_summary: also draw summary.png.
    conformal_alpha: the conformal sets' alpha (None: each export's own; `conformal_answer`).

  Returns:
    prediction.json's content: per task the patient probability, uncertainty, decision at the export's
    threshold and the drift flags (reasons the inputs are unlike the training inputs).
  """
  everything = list(zip(exports, study.regions, study.statistics))
  # A regions export answers "where" (`_predict_regions`); the others each answer one task.
  region_exports = [item for item in everything if item[0][1]["task"] == contracts.PCI_TASK]
  task_exports = [item for item in everything if item[0][1]["task"] != contracts.PCI_TASK]
  results = [_predict_task(version_dir, metadata, abdomen.hu, num_gradcam_slices, gradcam_max_models)
             for (version_dir, metadata), abdomen, _ in task_exports]
  tasks: dict[str, Any] = {}
  all_flags: list[str] = []
  for result, (_, abdomen, statistics) in zip(results, task_exports):
    z_mm = np.asarray(abdomen.z_mm, np.float64)
    overlays = []
    for position, index in enumerate(result.gradcam_slices):
      relative = f"gradcam/{result.task}_slice{index:03d}.png"
      title = (f"task {result.task}, slice {index} (z {z_mm[index]:.0f} mm): probability "
               f"{result.slice_probability[index]:.3f}")
      gradcam.save_overlay_png(io_utils.join(output_dir, relative), result.images[position],
                               result.heatmaps[position], title)
      overlays.append({"slice_index": index, "z_mm": round(float(z_mm[index]), 3), "png": relative})
    metadata = result.metadata
    threshold = operating_threshold(metadata)
    flags = input_statistics.drift_flags(statistics, metadata.get("input_statistics"))
    all_flags.extend(flag for flag in flags if flag not in all_flags)
    tasks[result.task] = {
        "patient_probability": round(result.patient_probability, 6),
        "patient_uncertainty": round(result.patient_uncertainty, 6),
        "threshold": threshold,
        "predicted": int(round(result.patient_probability, 6) >= threshold),
        "drift_flags": flags,
        "training_statistics_available": bool(metadata.get("input_statistics")),
        "model": {
            "version": metadata["version"], "kind": metadata["kind"], "num_models": metadata["num_models"],
            "aggregation": metadata["aggregation"], "aggregation_top_k": metadata["aggregation_top_k"],
            "image_size": export.export_info(result.version_dir).image_size, "code_version": metadata["code_version"],
            # Only beyond the paper's model, so a default export's prediction.json keeps its bytes.
            **({"head": metadata["head"]} if metadata.get("head", heads.DEFAULT_HEAD) != heads.DEFAULT_HEAD else {}),
            **({"context_slices": metadata["context_slices"]} if metadata.get("context_slices") else {}),
            "gradcam_models": min(gradcam_max_models, metadata["num_models"]),
        },
        "slices": [{"slice_index": index, "z_mm": round(float(z_mm[index]), 3),
                    "probability": round(float(result.slice_probability[index]), 6),
                    "uncertainty": round(float(result.slice_uncertainty[index]), 6),
                    **({} if result.attention is None else {"attention": round(float(result.attention[index]), 6)})}
                   for index in range(z_mm.size)],
        "gradcam": overlays,
        "region": _region_summary(abdomen),
    }
    answer = conformal_answer(export.export_info(result.version_dir), round(result.patient_probability, 6),
                              conformal_alpha, score=result.conformal_score)
    if answer:
      tasks[result.task]["conformal"] = answer
  summary = "summary.png" if write_summary and results else None
  if summary:
    _write_summary(io_utils.join(output_dir, summary), results, [item[1] for item in task_exports], patient_id)
  regions = None
  for (version_dir, metadata), abdomen, statistics in region_exports:
    regions = _predict_regions(version_dir, metadata, abdomen, output_dir, patient_id)
    flags = input_statistics.drift_flags(statistics, metadata.get("input_statistics"))
    regions["drift_flags"] = flags
    all_flags.extend(flag for flag in flags if flag not in all_flags)
  prediction = {
      "format": PREDICTION_FORMAT,
      "schema_version": PREDICTION_SCHEMA_VERSION,
      "patient_id": patient_id or None,
      "code_version": provenance.code_version(),
      "region": _region_summary(study.regions[0]),  # each task also lists its own (they may differ in principle)
      "drift_flags": all_flags,
      "tasks": tasks,
      "summary_png": summary,
      **({} if regions is None else {"regions": regions}),
      "note": "research software; not a medical device; not for clinical decisions",
  }
  io_utils.atomic_write_json(io_utils.join(output_dir, "prediction.json"), prediction)
  return prediction


REGION_PROBABILITIES_FILE = "region_probabilities.csv"
REGION_PROBABILITIES_HEADER = ("patient_id", "region", "name", "probability", "uncertainty", "threshold", "predicted",
                               "evidence_slice", "evidence_z_mm")
PCI_MAP_FILE = "pci_map.png"


def _predict_regions(version_dir: str, metadata: dict[str, Any], abdomen: Any, output_dir: str,
                     patient_id: str) -> dict[str, Any]:
  """A regions export on one study: its `predict_regions` signature; writes region_probabilities.csv (one row a
  region: probability, uncertainty over models, threshold, predicted, and the evidence: the slice whose score for
  that region is highest, with its z) and pci_map.png; returns prediction.json's "regions"."""
  from pdx_tf import pci_map  # pylint: disable=import-outside-toplevel  (matplotlib only when drawing)

  outputs = _saved_model(version_dir).signatures["predict_regions"](hu=tf.constant(abdomen.hu, tf.float32))
  probabilities = outputs["region_probabilities"].numpy().astype(np.float64)
  uncertainty = outputs["region_uncertainty"].numpy().astype(np.float64)
  slices = outputs["slice_region_probabilities"].numpy()
  info = metadata["regions"]
  thresholds = np.asarray(info["thresholds"], np.float64)
  predicted = [int(round(float(value), 6) >= threshold) for value, threshold in zip(probabilities, thresholds)]
  # The evidence slice of a banded export lies in the region's band (its probability comes from those slices).
  keep = (region_bands.band_mask(np.arange(slices.shape[0]), slices.shape[0],
                                 limits=region_bands.limits_from_metadata(info["bands"])) if info.get("bands")
          else np.ones(slices.shape, bool))
  evidence = [int(np.flatnonzero(keep[:, region])[np.argmax(slices[keep[:, region], region])])
              for region in range(len(info["names"]))]
  z_mm = np.asarray(abdomen.z_mm, np.float64)
  rows = [[patient_id, region, name, f"{probabilities[region]:.6f}", f"{uncertainty[region]:.6f}",
           f"{thresholds[region]:.6f}", predicted[region], evidence[region], f"{z_mm[evidence[region]]:.3f}"]
          for region, name in enumerate(info["names"])]
  io_utils.atomic_write_csv(io_utils.join(output_dir, REGION_PROBABILITIES_FILE), REGION_PROBABILITIES_HEADER, rows)
  png = pci_map.region_map_png([float(value) for value in probabilities],
                               f"PCI regions, {_study_label(patient_id)}: probability (research software)",
                               label="probability", vmin=0.0, vmax=1.0)
  io_utils.atomic_write_bytes(io_utils.join(output_dir, PCI_MAP_FILE), png)
  return {"names": list(info["names"]), "probabilities": [round(float(value), 6) for value in probabilities],
          "uncertainty": [round(float(value), 6) for value in uncertainty],
          "thresholds": [float(value) for value in thresholds], "predicted": predicted,
          "predicted_pci": round(float(probabilities @ np.asarray(info["pci_scale"], np.float64)), 6),
          "evidence_slices": evidence, "csv": REGION_PROBABILITIES_FILE, "pci_map_png": PCI_MAP_FILE,
          "model": {"version": metadata["version"], "num_models": metadata["num_models"],
                    "aggregation": metadata["aggregation"], "aggregation_top_k": metadata["aggregation_top_k"]}}


def format_prediction(prediction: dict[str, Any]) -> str:
  """The lines `python -m predict` prints: one per task."""
  lines = []
  for task, values in prediction["tasks"].items():
    model = values["model"]
    lines.append(f"{task}: probability {values['patient_probability']:.3f} +- {values['patient_uncertainty']:.3f} "
                 f"({model['kind']} of {model['num_models']} model(s), {model['aggregation']} over "
                 f"{prediction['region']['num_slices']} abdominal slices){conformal_text(values.get('conformal'))}")
  if prediction.get("regions"):
    regions = prediction["regions"]
    found = [name for name, value in zip(regions["names"], regions["predicted"]) if value]
    lines.append(f"regions: predicted PCI {regions['predicted_pci']:.1f}; above threshold: {', '.join(found) or 'none'}"
                 f" ({regions['csv']}, {regions['pci_map_png']})")
  if prediction.get("drift_flags"):
    lines.append(f"inputs unlike the training data: {'; '.join(prediction['drift_flags'])}")
  return "\n".join(lines)
