"""The abdominal region of a CT study: which slices count as abdomen (shared by the pipeline and predict).

`load_abdomen` reads a patient's series (`pdx_tf.data.dicom.read_ct_series`) and keeps the slices between the
pelvic floor and the lung bases, the range the study's models were trained on. The in-plane crop is not done
here: `pdx_tf.data.preprocess.body_boxes` crops every slice to its body when images are made.

Automatic z-range rule (used for each end the manifest does not override), computed on the body masks of
`pdx_tf.data.preprocess.body_masks` (128x128 per slice; the patient table is excluded there):
  * Body area: the body mask with its holes filled (lungs and bowel gas are holes in it), in cm^2.
  * Lung air fraction: the share of that filled area below `lung_air_hu` (-400 HU) outside the body mask.
  * Lung bases (superior end): scanning down from the top, the first run of consecutive slices whose lung air
    fraction exceeds `lung_air_fraction` (5 %) is the lungs, if the run begins in the upper half of the study
    (bowel gas lower down is never mistaken for lungs). The abdomen starts at the first slice below that run.
    No such run: the study starts below the lungs and the range starts at the study's top slice.
  * Pelvic floor (inferior end): scanning up from the bottom, the run of consecutive slices, starting at the
    bottom slice, where the tissue above `body_threshold_hu` splits into two large components (the thighs: the
    two largest components each hold at least `leg_area_fraction` (25 %) of their joint area and at least
    `min_leg_area_cm2` (20 cm^2) each). The abdomen ends at the first slice above that run. No such run: the
    range ends at the study's bottom slice.
  * Refusals (RegionError): a study whose largest body cross-section is under `min_body_area_cm2` (250 cm^2:
    a head, neck or limb study; an adult abdomen is 400-900 cm^2), a study whose lung run reaches its bottom
    slice (chest only: lungs in every slice below the top), and a range with fewer than `min_slices` slices.
  * A study that covers only part of the abdomen keeps the part it covers (with no lungs on top, or no thighs
    at the bottom, the range simply runs to the study's end).

A manifest override (`z_min_mm` / `z_max_mm`, DICOM patient z, increasing toward the head) replaces the rule
at that end; the kept slices are those inside the range (a range reaching past the study is clipped, with a
warning). Optional resampling to `slice_spacing_mm` interpolates linearly along z between the study's slices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from scipy import ndimage

from pdx_tf.data import preprocess
from pdx_tf.errors import RegionError

# Slice positions closer than this are the same position (float round-off in headers and overrides).
Z_TOLERANCE_MM = 1e-3


@dataclasses.dataclass(frozen=True)
class RegionConfig:
  """Parameters of the automatic abdominal z-range rule (see the module docstring).

  Attributes:
    body_threshold_hu: voxels above this are body (the same threshold as the crop's).
    lung_air_hu: body-enclosed voxels below this are air (lung or gas).
    lung_air_fraction: a slice is a lung slice when enclosed air exceeds this fraction of its body area.
    min_body_area_cm2: a study whose largest body cross-section is smaller has no abdomen (head, limb).
    leg_area_fraction: each of the two largest components must hold this share of their joint area to count
      as two thighs.
    min_leg_area_cm2: and at least this many cm^2 each.
  """

  body_threshold_hu: float = -500.0
  lung_air_hu: float = -400.0
  lung_air_fraction: float = 0.05
  min_body_area_cm2: float = 250.0
  leg_area_fraction: float = 0.25
  min_leg_area_cm2: float = 20.0

  def __post_init__(self):
    if not -1000.0 < self.lung_air_hu < 0.0:
      raise ValueError(f"lung_air_hu must be between -1000 and 0 HU, got {self.lung_air_hu}")
    if not 0.0 < self.lung_air_fraction < 1.0:
      raise ValueError(f"lung_air_fraction must be in (0, 1), got {self.lung_air_fraction}")
    if self.min_body_area_cm2 < 0.0:
      raise ValueError(f"min_body_area_cm2 must be >= 0, got {self.min_body_area_cm2}")
    if not 0.0 < self.leg_area_fraction <= 0.5:
      raise ValueError(f"leg_area_fraction must be in (0, 0.5], got {self.leg_area_fraction}")
    if self.min_leg_area_cm2 < 0.0:
      raise ValueError(f"min_leg_area_cm2 must be >= 0, got {self.min_leg_area_cm2}")


@dataclasses.dataclass(frozen=True)
class SliceMeasures:
  """Per-slice measurements behind the automatic rule (for QC and tests).

  Attributes:
    body_area_cm2: float [Z] filled body area.
    lung_air_fraction: float [Z] enclosed air / filled body area.
    legs_split: bool [Z] the body is split into two thighs.
    body_masks: bool [Z, MASK_SIZE, MASK_SIZE] `preprocess.body_masks` of every slice (at the rule's
      threshold), so the crop need not compute them again.
  """

  body_area_cm2: np.ndarray
  lung_air_fraction: np.ndarray
  legs_split: np.ndarray
  body_masks: np.ndarray


@dataclasses.dataclass(frozen=True)
class AbdominalRange:
  """The chosen z-range of a study.

  Attributes:
    z_min_mm: inferior end (z of the lowest kept slice of the original series, or the override).
    z_max_mm: superior end.
    top_rule: what set the superior end: "lung_bases", "study_top" or "manifest".
    bottom_rule: what set the inferior end: "thighs", "study_bottom" or "manifest".
    measures: the per-slice measurements (None when both ends come from the manifest).
  """

  z_min_mm: float
  z_max_mm: float
  top_rule: str
  bottom_rule: str
  measures: SliceMeasures | None

  @property
  def rule(self) -> str:
    return f"top={self.top_rule} bottom={self.bottom_rule}"


@dataclasses.dataclass(frozen=True)
class AbdominalRegion:
  """The abdominal slices of one study (the contract shared by the pipeline and predict).

  Attributes:
    hu: float32 [Z, Y, X] HU of the kept (possibly resampled) slices; slice index in records indexes this.
    z_mm: float64 [Z] increasing slice positions (mm, toward the head).
    pixel_spacing_mm: (row, column) spacing in mm.
    z_range_mm: (lowest, highest) z of the kept slices.
    rule: how the range was chosen, e.g. "top=lung_bases bottom=thighs" (see `AbdominalRange.rule`).
    warnings: PHI-free notes (from reading the series and from the range choice).
    body_masks: bool [Z, MASK_SIZE, MASK_SIZE] `preprocess.body_masks(hu, body_threshold_hu)` of the kept
      slices, when the rule measured them and the slices were not resampled; else None.
    body_threshold_hu: the threshold `body_masks` used.
  """

  hu: np.ndarray
  z_mm: np.ndarray
  pixel_spacing_mm: tuple[float, float]
  z_range_mm: tuple[float, float]
  rule: str
  warnings: tuple[str, ...]
  body_masks: np.ndarray | None = None
  body_threshold_hu: float | None = None


def measure_slices(hu: np.ndarray, pixel_spacing_mm: tuple[float, float],
                   config: RegionConfig = RegionConfig(), batch_size: int = 64) -> SliceMeasures:
  """Body area, enclosed-air fraction and thigh split of every slice of a [Z, Y, X] HU volume."""
  hu = np.asarray(hu, np.float32)
  count, height, width = hu.shape
  mask_pixel_cm2 = (height * pixel_spacing_mm[0] / preprocess.MASK_SIZE) * (
      width * pixel_spacing_mm[1] / preprocess.MASK_SIZE) / 100.0
  areas, fractions, splits, masks = [], [], [], []
  for start in range(0, count, batch_size):
    block = tf.constant(hu[start:start + batch_size])
    bodies = _body_masks(block, config.body_threshold_hu).numpy()
    masks.append(bodies)
    # The same area downsampling body_masks uses, so the air test sees the same pixels as the mask.
    small = tf.image.resize(block[..., tf.newaxis], [preprocess.MASK_SIZE] * 2, method="area")[..., 0].numpy()
    for body, image in zip(bodies, small):
      filled = ndimage.binary_fill_holes(body)
      area = float(filled.sum())
      air = float((filled & ~body & (image < config.lung_air_hu)).sum())
      areas.append(area * mask_pixel_cm2)
      fractions.append(air / area if area > 0 else 0.0)
      splits.append(_legs_split(image, config, mask_pixel_cm2))
  body_masks = (np.concatenate(masks) if masks
                else np.zeros((0, preprocess.MASK_SIZE, preprocess.MASK_SIZE), bool))
  return SliceMeasures(np.asarray(areas, np.float64), np.asarray(fractions, np.float64), np.asarray(splits, bool),
                       body_masks)


@tf.function(reduce_retracing=True)
def _body_masks(hu: tf.Tensor, body_threshold_hu: float) -> tf.Tensor:
  # Traced once: preprocess.body_masks' label propagation is a while loop, slow op by op in eager mode.
  return preprocess.body_masks(hu, body_threshold_hu)


def _legs_split(image: np.ndarray, config: RegionConfig, mask_pixel_cm2: float) -> bool:
  """True when the above-threshold tissue of a 128x128 slice has two large components (the thighs).

  body_masks keeps only the largest component, so the second one is found here with the same threshold and
  3x3 opening (which cuts the table's thin contact with the body).
  """
  opened = ndimage.binary_opening(image > config.body_threshold_hu, structure=np.ones((3, 3), bool))
  labels, count = ndimage.label(opened, structure=np.ones((3, 3), bool))
  if count < 2:
    return False
  sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
  first, second = float(sizes[0]), float(sizes[1])
  return (second >= config.leg_area_fraction * (first + second)
          and second * mask_pixel_cm2 >= config.min_leg_area_cm2)


def _first_run(flags: np.ndarray) -> tuple[int, int] | None:
  """(start, stop) of the first run of True values, or None."""
  indices = np.flatnonzero(flags)
  if indices.size == 0:
    return None
  start = int(indices[0])
  stop = start
  while stop < flags.size and flags[stop]:
    stop += 1
  return start, stop


def find_abdominal_range(hu: np.ndarray, z_mm: np.ndarray, pixel_spacing_mm: tuple[float, float], *,
                         z_min_mm: float | None = None, z_max_mm: float | None = None,
                         config: RegionConfig = RegionConfig()) -> AbdominalRange:
  """Chooses the abdominal z-range of a study (rule in the module docstring).

  Args:
    hu: float [Z, Y, X] HU, slices ordered by increasing z.
    z_mm: [Z] increasing slice positions (mm, toward the head).
    pixel_spacing_mm: (row, column) spacing.
    z_min_mm: manifest override of the inferior end, or None for the rule.
    z_max_mm: manifest override of the superior end, or None.
    config: rule parameters.

  Raises:
    RegionError: head/limb study, chest-only study, or an automatic end that leaves no abdomen.
  """
  z_mm = np.asarray(z_mm, np.float64)
  if z_min_mm is not None and z_max_mm is not None:
    return AbdominalRange(float(z_min_mm), float(z_max_mm), "manifest", "manifest", None)
  measures = measure_slices(hu, pixel_spacing_mm, config)
  largest_cm2 = float(measures.body_area_cm2.max()) if measures.body_area_cm2.size else 0.0
  if largest_cm2 < config.min_body_area_cm2:
    raise RegionError(
        f"no abdomen in the study: its largest body cross-section is {largest_cm2:.0f} cm^2, under "
        f"{config.min_body_area_cm2:.0f} cm^2 (a head, neck or limb CT?); check the series or set z_min_mm and "
        "z_max_mm in the manifest")
  count = z_mm.size
  # Scan from the top: index 0 is the top slice.
  lungs_from_top = (measures.lung_air_fraction > config.lung_air_fraction)[::-1]
  top_index, top_rule = count - 1, "study_top"
  run = _first_run(lungs_from_top)
  if run is not None and run[0] < (count + 1) // 2:
    if run[1] >= count and z_max_mm is None:
      raise RegionError(
          "no abdomen in the study: air-filled lungs reach its lowest slice (a chest-only CT?); use an "
          "abdominal series (series_uid) or set z_min_mm and z_max_mm in the manifest")
    top_index, top_rule = count - 1 - run[1], "lung_bases"
  bottom_index, bottom_rule = 0, "study_bottom"
  if measures.legs_split[0]:
    run = _first_run(measures.legs_split)
    bottom_index, bottom_rule = run[1], "thighs"
  if z_max_mm is not None:
    top_index, top_rule = None, "manifest"
  if z_min_mm is not None:
    bottom_index, bottom_rule = None, "manifest"
  low = float(z_min_mm) if bottom_index is None else float(z_mm[min(bottom_index, count - 1)])
  high = float(z_max_mm) if top_index is None else float(z_mm[top_index])
  if (top_index is not None and bottom_index is not None and bottom_index > top_index) or low > high:
    raise RegionError(
        f"no abdomen in the study: the thighs reach z={low:.1f} mm, above the lung bases at z={high:.1f} mm; "
        "check the series or set z_min_mm and z_max_mm in the manifest")
  return AbdominalRange(low, high, top_rule, bottom_rule, measures)


def resample_slices(hu: np.ndarray, z_mm: np.ndarray, new_z_mm: np.ndarray) -> np.ndarray:
  """Linear interpolation of a [Z, Y, X] volume along z at `new_z_mm` (inside [z_mm[0], z_mm[-1]])."""
  z_mm = np.asarray(z_mm, np.float64)
  new_z_mm = np.asarray(new_z_mm, np.float64)
  upper = np.clip(np.searchsorted(z_mm, new_z_mm, side="left"), 1, z_mm.size - 1)
  lower = upper - 1
  weight = (new_z_mm - z_mm[lower]) / (z_mm[upper] - z_mm[lower])
  weight = np.clip(weight, 0.0, 1.0)[:, None, None]
  hu = np.asarray(hu, np.float32)
  return ((1.0 - weight) * hu[lower] + weight * hu[upper]).astype(np.float32)


def select_abdomen(hu: np.ndarray, z_mm: np.ndarray, pixel_spacing_mm: tuple[float, float], *,
                   z_min_mm: float | None = None, z_max_mm: float | None = None,
                   slice_spacing_mm: float | None = None, min_slices: int = 8,
                   config: RegionConfig = RegionConfig(),
                   warnings: tuple[str, ...] = ()) -> tuple[AbdominalRegion, AbdominalRange]:
  """The abdominal slices of an already-read volume (the part of `load_abdomen` after reading).

  Returns:
    (region, chosen range with its per-slice measures).

  Raises:
    RegionError: see `find_abdominal_range`; also when the range holds fewer than `min_slices` slices or does
      not overlap the study.
  """
  if slice_spacing_mm is not None and slice_spacing_mm <= 0:
    raise ValueError(f"slice_spacing_mm must be positive, got {slice_spacing_mm}")
  z_mm = np.asarray(z_mm, np.float64)
  chosen = find_abdominal_range(hu, z_mm, pixel_spacing_mm, z_min_mm=z_min_mm, z_max_mm=z_max_mm, config=config)
  notes = list(warnings)
  low, high = chosen.z_min_mm, chosen.z_max_mm
  if high < z_mm[0] - Z_TOLERANCE_MM or low > z_mm[-1] + Z_TOLERANCE_MM:
    raise RegionError(
        f"the manifest's z range [{low:.1f}, {high:.1f}] mm does not overlap the study's "
        f"[{z_mm[0]:.1f}, {z_mm[-1]:.1f}] mm; fix z_min_mm/z_max_mm (DICOM patient z, increasing toward the head)")
  if low < z_mm[0] - Z_TOLERANCE_MM or high > z_mm[-1] + Z_TOLERANCE_MM:
    notes.append(f"the manifest's z range [{low:.1f}, {high:.1f}] mm reaches past the study "
                 f"[{z_mm[0]:.1f}, {z_mm[-1]:.1f}] mm; kept the overlap")
  low, high = max(low, float(z_mm[0])), min(high, float(z_mm[-1]))
  kept_masks = None
  if slice_spacing_mm is None:
    keep = (z_mm >= low - Z_TOLERANCE_MM) & (z_mm <= high + Z_TOLERANCE_MM)
    new_z = z_mm[keep]
    new_hu = np.asarray(hu[keep], np.float32)
    if chosen.measures is not None:
      kept_masks = chosen.measures.body_masks[keep]
  else:
    steps = int(np.floor((high - low) / slice_spacing_mm + Z_TOLERANCE_MM)) + 1
    new_z = low + slice_spacing_mm * np.arange(steps, dtype=np.float64)
    new_hu = resample_slices(hu, z_mm, new_z) if z_mm.size > 1 else np.asarray(hu, np.float32)[:steps]
  if new_z.size < min_slices:
    raise RegionError(
        f"only {new_z.size} abdominal slice(s) in z [{low:.1f}, {high:.1f}] mm ({chosen.rule}), fewer than "
        f"min_slices={min_slices}; check the series or the manifest's z range, or lower --min_slices")
  region = AbdominalRegion(hu=new_hu, z_mm=new_z, pixel_spacing_mm=tuple(float(v) for v in pixel_spacing_mm),
                           z_range_mm=(float(new_z[0]), float(new_z[-1])), rule=chosen.rule, warnings=tuple(notes),
                           body_masks=kept_masks,
                           body_threshold_hu=None if kept_masks is None else config.body_threshold_hu)
  return region, chosen


def load_abdomen(folder: str, *, series_uid: str | None = None, z_min_mm: float | None = None,
                 z_max_mm: float | None = None, slice_spacing_mm: float | None = None,
                 config: RegionConfig = RegionConfig(), min_slices: int = 8, slice_thickness_mm: float = 5.0,
                 show_paths: bool = False) -> AbdominalRegion:
  """Reads a study folder and returns its abdominal slices.

  Args:
    folder: the patient's DICOM folder (searched recursively; local or tf.io.gfile URL).
    series_uid: series override (else `read_ct_series` chooses).
    z_min_mm: inferior end override (DICOM patient z), else the automatic rule.
    z_max_mm: superior end override, else the automatic rule.
    slice_spacing_mm: resample to this spacing along z (linear), or keep the study's slices.
    config: parameters of the automatic rule.
    min_slices: fewest slices accepted, both in the series and in the abdominal range.
    slice_thickness_mm: the automatic series choice prefers the nearest slice thickness (see `read_ct_series`).
    show_paths: print the real paths of file tokens in DICOM warnings or errors to the console (debugging).

  Raises:
    DicomError: the series cannot be read (see `pdx_tf.data.dicom.read_ct_series`).
    RegionError: no abdomen (head or chest-only study), or too few abdominal slices.
  """
  from pdx_tf.data import dicom  # pylint: disable=import-outside-toplevel

  series = dicom.read_ct_series(folder, series_uid, min_slices=max(2, min_slices),
                                slice_thickness_mm=slice_thickness_mm, show_paths=show_paths)
  region, _ = select_abdomen(series.hu, series.z_mm, series.pixel_spacing_mm, z_min_mm=z_min_mm,
                             z_max_mm=z_max_mm, slice_spacing_mm=slice_spacing_mm, min_slices=min_slices,
                             config=config, warnings=series.warnings)
  return region
