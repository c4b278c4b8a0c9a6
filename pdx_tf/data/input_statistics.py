"""Summary statistics of a cohort's model inputs, and the drift flags of a study outside them.

Per patient (`patient_statistics`, stored in the pipeline's patient marker, never in dataset.json):
  * slice_thickness_mm: the NATIVE series' SliceThickness (its slice spacing when the header lacks it); the
    pipeline may average thin slices into 5 mm slabs, but a 1 mm reconstruction is still another input.
  * slice_spacing_mm: the native series' median slice spacing.
  * pixel_spacing_mm: the mean of the row and column spacing.
  * num_slices: abdominal slices (or slabs) the model sees.
  * body_area_cm2: per abdominal slice, the body cross-section (the filled `preprocess.body_masks`, as the
    z-range rule of `pdx_tf.data.region` measures it).
  * hu_fraction: the HU histogram of the body voxels (at the body masks' 128x128 resolution), fixed bins
    `HU_BIN_EDGES`, normalised to sum 1; values outside -1000..1000 HU go to the end bins.

Cohort (`aggregate`, dataset.json "input_statistics", copied by training into run.json and by export into
pdx_export.json): each quantity as a distribution (quantiles 1/5/50/95/99 %, min, max, count); the body area
pooled over all slices; the HU histogram as the mean of the patients' normalised histograms, with the
distribution of each training patient's distance to it (the reference for the flag). No patient's own values.

`drift_flags` compares a study's statistics with the cohort's and returns one human reason per quantity outside
it. Ranges are the training min..max widened by `RELATIVE_TOLERANCE` (scanners round spacings differently);
the HU histogram distance is the total variation distance (half the L1 distance, 0..1), flagged above
max(`HU_DISTANCE_FLOOR`, 1.5 x the training's 99th percentile distance).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from pdx_tf.data import preprocess

STATISTICS_FORMAT = "pdx-tf-input-statistics"
STATISTICS_VERSION = 1
HU_BIN_EDGES = tuple(float(edge) for edge in range(-1000, 1001, 50))  # 40 bins of 50 HU
QUANTILES = (1, 5, 50, 95, 99)
SCALAR_KEYS = ("slice_thickness_mm", "slice_spacing_mm", "pixel_spacing_mm", "num_slices")
RELATIVE_TOLERANCE = 0.1  # a spacing 10 % beyond the training range is still the same kind of input
HU_DISTANCE_FLOOR = 0.1  # a cohort of identical scanners has tiny distances; do not flag noise
_UNITS = {"slice_thickness_mm": ("slice thickness", " mm"), "slice_spacing_mm": ("slice spacing", " mm"),
          "pixel_spacing_mm": ("pixel spacing", " mm"), "num_slices": ("number of abdominal slices", ""),
          "body_area_cm2": ("median body cross-section", " cm^2")}


def _body_masks_and_small_hu(hu: np.ndarray, threshold_hu: float, masks: np.ndarray | None):
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  small = tf.image.resize(tf.constant(np.asarray(hu, np.float32))[..., tf.newaxis],
                          [preprocess.MASK_SIZE] * 2, method="area")[..., 0].numpy()
  if masks is None:
    masks = preprocess.body_masks(tf.constant(np.asarray(hu, np.float32)), threshold_hu).numpy()
  return np.asarray(masks, bool), small


def patient_statistics(abdomen: Any, choice: Any, body_threshold_hu: float = -500.0) -> dict[str, Any]:
  """One study's input statistics (see the module docstring).

  Args:
    abdomen: `pdx_tf.data.region.AbdominalRegion`, the slices the model sees.
    choice: `pdx_tf.data.dicom.SeriesChoice` of the series read (native thickness and spacing).
    body_threshold_hu: the body threshold of the masks (the region rule's).

  Returns:
    JSON-ready dict: the scalars of SCALAR_KEYS, body_area_cm2 (list per slice) and hu_fraction (per bin).
  """
  hu = np.asarray(abdomen.hu, np.float32)
  reuse = abdomen.body_masks if abdomen.body_threshold_hu == body_threshold_hu else None
  masks, small = _body_masks_and_small_hu(hu, body_threshold_hu, reuse)
  height, width = hu.shape[1:]
  row_mm, column_mm = (float(value) for value in abdomen.pixel_spacing_mm)
  mask_pixel_cm2 = (height * row_mm / preprocess.MASK_SIZE) * (width * column_mm / preprocess.MASK_SIZE) / 100.0
  areas = [float(ndimage.binary_fill_holes(mask).sum()) * mask_pixel_cm2 for mask in masks]
  body_hu = np.clip(small[masks], HU_BIN_EDGES[0], HU_BIN_EDGES[-1])
  counts, _ = np.histogram(body_hu, bins=np.asarray(HU_BIN_EDGES))
  fraction = counts / counts.sum() if counts.sum() else counts.astype(np.float64)
  spacing = float(choice.slice_spacing_mm)
  thickness = choice.slice_thickness_mm
  return {
      "slice_thickness_mm": round(float(thickness if thickness else spacing), 4),
      "slice_spacing_mm": round(spacing, 4),
      "pixel_spacing_mm": round((row_mm + column_mm) / 2.0, 4),
      "num_slices": int(hu.shape[0]),
      "body_area_cm2": [round(area, 2) for area in areas],
      "hu_fraction": [round(float(value), 6) for value in fraction],
  }


def _distribution(values: Sequence[float]) -> dict[str, Any]:
  values = np.asarray(values, np.float64)
  return {"quantiles": {str(q): round(float(np.percentile(values, q)), 4) for q in QUANTILES},
          "min": round(float(values.min()), 4), "max": round(float(values.max()), 4), "count": int(values.size)}


def hu_distance(fraction: Sequence[float], reference: Sequence[float]) -> float:
  """Total variation distance of two normalised histograms: 0 identical, 1 disjoint."""
  return 0.5 * float(np.abs(np.asarray(fraction, np.float64) - np.asarray(reference, np.float64)).sum())


def aggregate(per_patient: Sequence[Mapping[str, Any] | None]) -> dict[str, Any] | None:
  """The cohort's statistics from its patients' (entries that are None, e.g. old markers, are left out).

  Returns:
    None when no patient has statistics; else the JSON-ready cohort summary (module docstring).
  """
  patients = [entry for entry in per_patient if entry]
  if not patients:
    return None
  summary: dict[str, Any] = {"format": STATISTICS_FORMAT, "version": STATISTICS_VERSION,
                             "num_patients": len(patients)}
  for key in SCALAR_KEYS:
    summary[key] = _distribution([entry[key] for entry in patients])
  summary["body_area_cm2"] = _distribution([area for entry in patients for area in entry["body_area_cm2"]])
  mean = np.mean([entry["hu_fraction"] for entry in patients], axis=0)
  distances = [hu_distance(entry["hu_fraction"], mean) for entry in patients]
  summary["hu_histogram"] = {"bin_edges_hu": list(HU_BIN_EDGES),
                             "fraction": [round(float(value), 6) for value in mean],
                             "distance_to_mean": _distribution(distances)}
  return summary


def _outside(value: float, low: float, high: float, tolerance: float) -> bool:
  return value < low - tolerance * abs(low) or value > high + tolerance * abs(high)


def drift_flags(statistics: Mapping[str, Any], training: Mapping[str, Any] | None) -> list[str]:
  """Reasons why a study is unlike the training inputs; empty when it is like them or `training` is None.

  Args:
    statistics: `patient_statistics` of the study.
    training: `aggregate` of the training cohort (pdx_export.json "input_statistics"), or None.
  """
  if not training:
    return []
  flags = []
  for key in SCALAR_KEYS:
    reference = training.get(key)
    if not reference:
      continue
    value = float(statistics[key])
    low, high = float(reference["min"]), float(reference["max"])
    if _outside(value, low, high, RELATIVE_TOLERANCE):
      name, unit = _UNITS[key]
      flags.append(f"{name} {value:g}{unit} outside training {low:g}-{high:g}{unit}")
  reference = training.get("body_area_cm2")
  if reference and statistics.get("body_area_cm2"):
    value = float(np.median(statistics["body_area_cm2"]))
    low, high = float(reference["quantiles"]["1"]), float(reference["quantiles"]["99"])
    if _outside(value, low, high, RELATIVE_TOLERANCE):
      name, unit = _UNITS["body_area_cm2"]
      flags.append(f"{name} {value:.0f}{unit} outside training 1-99 % range {low:.0f}-{high:.0f}{unit}")
  histogram = training.get("hu_histogram")
  if histogram and list(histogram.get("bin_edges_hu", [])) == list(HU_BIN_EDGES):
    distance = hu_distance(statistics["hu_fraction"], histogram["fraction"])
    threshold = max(HU_DISTANCE_FLOOR, 1.5 * float(histogram["distance_to_mean"]["quantiles"]["99"]))
    if distance > threshold:
      flags.append(f"HU histogram of the body {distance:.2f} from training (threshold {threshold:.2f})")
  return flags
