"""The abdominal region of a CT study: which slices count as abdomen (shared by the pipeline and predict).

`load_abdomen` reads a patient's series (`pdx_tf.data.dicom.read_ct_series`) and keeps the slices between the
pelvic floor and the top of the diaphragm domes, the range the study's models are trained on. The in-plane crop is
not done here: `pdx_tf.data.preprocess.body_boxes` crops every slice to its body when images are made.

Automatic z-range rule (used for each end the manifest does not override), computed on the body masks of
`pdx_tf.data.preprocess.body_masks` (128x128 per slice; the patient table is excluded there):
  * Body area: the body mask with its holes filled (lungs and bowel gas are holes in it), in cm^2.
  * Air fraction: the share of that filled area below `lung_air_hu` (-400 HU) outside the body mask.
  * Diaphragm domes (superior end): the abdomen reaches up to the top of the diaphragm domes, the highest slices
    that still hold liver or spleen under the lungs. Around the domes the lung bases wrap down behind and beside
    the liver and spleen (the posterior costophrenic recesses reach 3-6 cm below the dome top), so the first
    slice with any lung is NOT the end of the abdomen; the thorax proper begins where the lungs take a large
    part of the cross-section. Scanning down from the top, the first run of consecutive slices whose air
    fraction exceeds `thorax_air_fraction` (30 %) is the thorax, if the run begins in the upper half of the
    study (bowel gas lower down is never mistaken for lungs). The abdomen starts at the first slice below that
    run, so the slices with lung bases around the liver dome are kept. No such run: the study starts at or
    below the domes (as an abdominal CT does) and the range starts at the study's top slice.
  * Pelvic floor (inferior end): scanning up from the bottom, the run of consecutive slices, starting at the
    bottom slice, where the tissue above `body_threshold_hu` splits into two large components (the thighs: the
    two largest components each hold at least `leg_area_fraction` (25 %) of their joint area and at least
    `min_leg_area_cm2` (20 cm^2) each). The abdomen ends at the first slice above that run. No such run: the
    range ends at the study's bottom slice.
  * Refusals (RegionError): a study whose largest body cross-section is under `min_body_area_cm2` (250 cm^2:
    a head, neck or limb study; an adult abdomen is 400-900 cm^2); a chest-only study: scanning down from the
    top, the first run of slices with lungs (air fraction above `lung_air_fraction`, 5 %) begins in the upper
    half and reaches the study's bottom slice (the study never gets below the lung bases), or the thorax run
    does; and a range with fewer than `min_slices` slices.
  * A study that covers only part of the abdomen keeps the part it covers (with no thorax on top, or no thighs
    at the bottom, the range simply runs to the study's end).

A manifest override (`z_min_mm` / `z_max_mm`, DICOM patient z, increasing toward the head) replaces the rule
at that end; the kept slices are those inside the range (a range reaching past the study is clipped, with a
warning).

Slabs (`slice_spacing_mm`, the pipeline's default 5 mm; None or 0 keeps the native slices): thin slices are
averaged into slabs as a thick reconstruction would be, so every patient gets slices of about the same thickness
and weight in training whatever their scanner's reconstruction. The kept range is tiled by round(extent /
slice_spacing_mm) slabs centred on it (extent: from the lowest to the highest kept slice centre plus one native
spacing); each output slice is the mean of the native slices whose centres fall in its slab, at the slab's
centre. A study whose native spacing is within `SLAB_KEEP_TOLERANCE` (20 %: 4-6 mm for 5 mm slabs) of the slab
already is such a reconstruction (4.8 mm, 5 mm, or 5 mm slices every 4 mm) and keeps its slices unchanged;
averaging would mix one or two of them per slab. A coarser study keeps its slices too (thicker slices cannot be
split), with a warning.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf
from scipy import ndimage

from pdx_tf import settings
from pdx_tf.contracts import DEFAULT_MIN_SLICES
from pdx_tf.data import preprocess
from pdx_tf.errors import RegionError

# Slice positions closer than this are the same position (float round-off in headers and overrides).
Z_TOLERANCE_MM = 1e-3
# A study whose native slice spacing is within this relative distance of the slab thickness keeps its slices: a
# standard thick reconstruction (4.8, 5 or 5.5 mm; 5 mm slices every 4 mm) already is what the slabs would make,
# and averaging it would mix one or two of its slices per slab.
SLAB_KEEP_TOLERANCE = 0.2


# The rule's parameters are a hand-off setting (dataset.json, run.json and the export carry them), typed in the
# core so that reading a hand-off never imports this stage.
RegionConfig = settings.RegionConfig


@dataclasses.dataclass(frozen=True)
class SliceMeasures:
  """Per-slice measurements behind the automatic rule (for QC and tests).

  Attributes:
    body_area_cm2: float [Z] filled body area.
    lung_air_fraction: float [Z] enclosed air / filled body area (lungs, bowel gas).
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
    top_rule: what set the superior end: "diaphragm", "study_top" or "manifest".
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
    hu: float32 [Z, Y, X] HU of the kept slices (or slabs); slice index in records indexes this.
    z_mm: float64 [Z] increasing slice positions (mm, toward the head).
    pixel_spacing_mm: (row, column) spacing in mm.
    z_range_mm: (lowest, highest) z of the kept slices.
    rule: how the range was chosen, e.g. "top=diaphragm bottom=thighs" (see `AbdominalRange.rule`).
    warnings: PHI-free notes (from reading the series and from the range choice).
    body_masks: bool [Z, MASK_SIZE, MASK_SIZE] `preprocess.body_masks(hu, body_threshold_hu)` of the kept
      slices, when the rule measured them and the slices were not averaged into slabs; else None.
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
  # Scan from the top: index 0 is the top slice. A run counts only if it begins in the upper half, so bowel gas
  # lower down is never mistaken for lungs.
  air_from_top = measures.lung_air_fraction[::-1]
  lungs = _first_run(air_from_top > config.lung_air_fraction)
  thorax = _first_run(air_from_top > config.thorax_air_fraction)
  lungs = lungs if lungs is not None and lungs[0] < (count + 1) // 2 else None
  thorax = thorax if thorax is not None and thorax[0] < (count + 1) // 2 else None
  if z_max_mm is None and any(run is not None and run[1] >= count for run in (lungs, thorax)):
    raise RegionError(
        "no abdomen in the study: air-filled lungs reach its lowest slice (a chest-only CT?); use an "
        "abdominal series (series_uid) or set z_min_mm and z_max_mm in the manifest")
  top_index, top_rule = count - 1, "study_top"
  if thorax is not None:
    # The first slice below the thorax: the top of the diaphragm domes, lung bases around the liver kept.
    top_index, top_rule = count - 1 - thorax[1], "diaphragm"
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
        f"no abdomen in the study: the thighs reach z={low:.1f} mm, above the diaphragm at z={high:.1f} mm; "
        "check the series or set z_min_mm and z_max_mm in the manifest")
  return AbdominalRange(low, high, top_rule, bottom_rule, measures)


def slab_grid(z_mm: np.ndarray, slab_mm: float) -> np.ndarray:
  """Centres of the slabs that tile a run of slices (see the module docstring).

  Args:
    z_mm: [Z] increasing positions of the slices to tile (Z >= 1).
    slab_mm: slab thickness.

  Returns:
    float64 [N] slab centres, N = max(1, round(extent / slab_mm)), centred on the slices' span, where extent is
    the span of the centres plus one median native spacing (the slices' own coverage).
  """
  z_mm = np.asarray(z_mm, np.float64)
  native_mm = float(np.median(np.diff(z_mm))) if z_mm.size > 1 else slab_mm
  extent = float(z_mm[-1] - z_mm[0]) + native_mm
  count = max(1, int(np.floor(extent / slab_mm + 0.5)))
  middle = (float(z_mm[0]) + float(z_mm[-1])) / 2.0
  return middle + slab_mm * (np.arange(count, dtype=np.float64) - (count - 1) / 2.0)


def slab_slices(hu: np.ndarray, z_mm: np.ndarray, centers_mm: np.ndarray,
                slab_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """Averages the slices of a [Z, Y, X] volume into slabs, as a thick reconstruction would.

  Args:
    hu: float [Z, Y, X] HU, slices ordered by increasing z.
    z_mm: [Z] increasing slice positions.
    centers_mm: [N] increasing slab centres (e.g. from `slab_grid`).
    slab_mm: slab thickness; slab i is [centers_mm[i] - slab_mm / 2, centers_mm[i] + slab_mm / 2).

  Returns:
    (float32 [M, Y, X] mean HU of the slices whose centres fall in each non-empty slab, float64 [M] the centres
    of those slabs); empty slabs (a gap in the series) are left out.
  """
  z_mm = np.asarray(z_mm, np.float64)
  centers_mm = np.asarray(centers_mm, np.float64)
  # Half-open slabs: a slice exactly on a boundary belongs to the upper slab only; the tolerance absorbs header
  # round-off so that such a slice is not sent to either side at random.
  lower = np.searchsorted(z_mm, centers_mm - slab_mm / 2.0 - Z_TOLERANCE_MM, side="left")
  upper = np.searchsorted(z_mm, centers_mm + slab_mm / 2.0 - Z_TOLERANCE_MM, side="left")
  slabs, kept = [], []
  for center, first, stop in zip(centers_mm, lower, upper):
    if stop > first:
      slabs.append(np.mean(np.asarray(hu[first:stop], np.float64), axis=0).astype(np.float32))
      kept.append(center)
  if not slabs:
    return np.zeros((0,) + tuple(np.shape(hu)[1:]), np.float32), np.zeros((0,), np.float64)
  return np.stack(slabs), np.asarray(kept, np.float64)


def select_abdomen(hu: np.ndarray, z_mm: np.ndarray, pixel_spacing_mm: tuple[float, float], *,
                   z_min_mm: float | None = None, z_max_mm: float | None = None,
                   slice_spacing_mm: float | None = None, min_slices: int = DEFAULT_MIN_SLICES,
                   config: RegionConfig = RegionConfig(),
                   warnings: tuple[str, ...] = ()) -> tuple[AbdominalRegion, AbdominalRange]:
  """The abdominal slices of an already-read volume (the part of `load_abdomen` after reading).

  Returns:
    (region, chosen range with its per-slice measures).

  Raises:
    RegionError: see `find_abdominal_range`; also when the range holds fewer than `min_slices` slices or does
      not overlap the study.
  """
  if slice_spacing_mm is not None and slice_spacing_mm < 0:
    raise ValueError(f"slice_spacing_mm must be positive, or 0 or None to keep the native slices, got "
                     f"{slice_spacing_mm}")
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
  keep = (z_mm >= low - Z_TOLERANCE_MM) & (z_mm <= high + Z_TOLERANCE_MM)
  new_z = z_mm[keep]
  native_mm = float(np.median(np.diff(z_mm))) if z_mm.size > 1 else None
  slabs = bool(slice_spacing_mm) and native_mm is not None and new_z.size > 0 and (
      native_mm < slice_spacing_mm * (1.0 - SLAB_KEEP_TOLERANCE))
  if slice_spacing_mm and native_mm is not None and native_mm > slice_spacing_mm * (1.0 + SLAB_KEEP_TOLERANCE):
    notes.append(f"the native slice spacing {native_mm:.2f} mm is coarser than slice_spacing_mm="
                 f"{slice_spacing_mm:g}; kept the native slices")
  kept_masks = None
  if slabs:
    new_hu, new_z = slab_slices(np.asarray(hu)[keep], new_z, slab_grid(new_z, slice_spacing_mm), slice_spacing_mm)
    # Drop the grid arithmetic's float noise (1e-4 mm is far below any slice spacing).
    new_z = np.round(new_z, 4)
  else:
    new_hu = np.asarray(hu[keep], np.float32)
    if chosen.measures is not None:
      kept_masks = chosen.measures.body_masks[keep]
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
                 config: RegionConfig = RegionConfig(), min_slices: int = DEFAULT_MIN_SLICES, slice_thickness_mm: float = 5.0,
                 show_paths: bool = False) -> AbdominalRegion:
  """Reads a study folder and returns its abdominal slices.

  Args:
    folder: the patient's DICOM folder (searched recursively; local or tf.io.gfile URL).
    series_uid: series override (else `read_ct_series` chooses).
    z_min_mm: inferior end override (DICOM patient z), else the automatic rule.
    z_max_mm: superior end override, else the automatic rule.
    slice_spacing_mm: average thin slices into slabs of this thickness (module docstring); None or 0 keeps the
      study's slices.
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
