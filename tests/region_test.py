"""Tests of the abdominal z-range rule on synthetic volumes with known lungs, abdomen and thighs."""

import numpy as np
import pytest

from pdx_tf.data import region
from pdx_tf.errors import RegionError

MATRIX = 64
SPACING_MM = 6.0  # 384 mm field of view, like a real abdominal CT.
SLICE_MM = 5.0


def _ellipse(center_xy_mm, semi_axes_mm):
  coords = (np.arange(MATRIX) - (MATRIX - 1) / 2.0) * SPACING_MM
  y, x = coords[:, None], coords[None, :]
  return ((x - center_xy_mm[0]) / semi_axes_mm[0]) ** 2 + ((y - center_xy_mm[1]) / semi_axes_mm[1]) ** 2 <= 1.0


def synthetic_volume(kinds, *, body_semi_axes_mm=(150.0, 110.0), with_table=True):
  """A [Z, 64, 64] HU volume, slice 0 at the bottom; kinds[i] in {"abdomen", "lungs", "thighs", "gas"}."""
  volume = np.full((len(kinds), MATRIX, MATRIX), -1000.0, np.float32)
  for index, kind in enumerate(kinds):
    image = volume[index]
    if with_table:
      # A thin table under the body, separated by an air gap (the crop and masks must ignore it).
      image[58:60, 4:60] = 200.0
    if kind == "thighs":
      for side in (-1, 1):
        image[_ellipse((side * 80.0, 0.0), (65.0, 80.0))] = 40.0
      continue
    image[_ellipse((0.0, 0.0), body_semi_axes_mm)] = 40.0
    if kind == "lungs":
      for side in (-1, 1):
        image[_ellipse((side * 60.0, 0.0), (45.0, 70.0))] = -850.0
    elif kind == "gas":
      image[_ellipse((0.0, -30.0), (60.0, 40.0))] = -900.0
  return volume


def z_positions(count, start_mm=-300.0):
  return start_mm + SLICE_MM * np.arange(count)


def test_measures_see_lungs_thighs_and_area():
  volume = synthetic_volume(["thighs", "abdomen", "lungs"])
  measures = region.measure_slices(volume, (SPACING_MM, SPACING_MM))
  np.testing.assert_array_equal(measures.legs_split, [True, False, False])
  assert measures.lung_air_fraction[1] == 0.0
  # Two lung ellipses of 45x70 mm inside a 150x110 mm body: about 38 % of its area.
  expected_fraction = 2 * 45.0 * 70.0 / (150.0 * 110.0)
  assert abs(measures.lung_air_fraction[2] - expected_fraction) < 0.06
  expected_area_cm2 = np.pi * 15.0 * 11.0
  assert abs(measures.body_area_cm2[1] - expected_area_cm2) / expected_area_cm2 < 0.08


def test_lungs_on_top_and_thighs_at_bottom_bound_the_range():
  kinds = ["thighs"] * 3 + ["abdomen"] * 10 + ["lungs"] * 4
  z_mm = z_positions(len(kinds))
  found = region.find_abdominal_range(synthetic_volume(kinds), z_mm, (SPACING_MM, SPACING_MM))
  assert (found.top_rule, found.bottom_rule) == ("lung_bases", "thighs")
  assert found.z_min_mm == z_mm[3] and found.z_max_mm == z_mm[12]
  selected, _ = region.select_abdomen(synthetic_volume(kinds), z_mm, (SPACING_MM, SPACING_MM), min_slices=4)
  np.testing.assert_array_equal(selected.z_mm, z_mm[3:13])
  assert selected.hu.shape == (10, MATRIX, MATRIX)
  assert selected.z_range_mm == (z_mm[3], z_mm[12])
  assert selected.rule == "top=lung_bases bottom=thighs"


def test_partial_abdomen_keeps_what_it_covers():
  kinds = ["abdomen"] * 9
  z_mm = z_positions(len(kinds))
  selected, chosen = region.select_abdomen(synthetic_volume(kinds), z_mm, (SPACING_MM, SPACING_MM), min_slices=4)
  assert chosen.rule == "top=study_top bottom=study_bottom"
  np.testing.assert_array_equal(selected.z_mm, z_mm)


def test_bowel_gas_low_in_the_study_is_not_lung():
  kinds = ["abdomen"] * 6 + ["gas"] * 2 + ["abdomen"] * 2  # gas in the lower half, nothing on top
  kinds = kinds[::-1]  # slice 0 is the bottom: put the gas low
  z_mm = z_positions(len(kinds))
  found = region.find_abdominal_range(synthetic_volume(kinds), z_mm, (SPACING_MM, SPACING_MM))
  assert found.top_rule == "study_top" and found.z_max_mm == z_mm[-1]


def test_chest_only_is_refused():
  kinds = ["lungs"] * 10
  with pytest.raises(RegionError, match="chest-only"):
    region.find_abdominal_range(synthetic_volume(kinds), z_positions(10), (SPACING_MM, SPACING_MM))


def test_head_is_refused():
  # A 16 x 19 cm head: about 240 cm^2 at its largest.
  kinds = ["abdomen"] * 8
  volume = synthetic_volume(kinds, body_semi_axes_mm=(80.0, 95.0))
  with pytest.raises(RegionError, match="head"):
    region.find_abdominal_range(volume, z_positions(8), (SPACING_MM, SPACING_MM))


def test_override_is_respected_and_clipped():
  kinds = ["thighs"] * 3 + ["abdomen"] * 10 + ["lungs"] * 4
  z_mm = z_positions(len(kinds))
  volume = synthetic_volume(kinds)
  selected, chosen = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), z_min_mm=z_mm[1],
                                           z_max_mm=z_mm[5] + 1.0, min_slices=2)
  assert chosen.rule == "top=manifest bottom=manifest"
  np.testing.assert_array_equal(selected.z_mm, z_mm[1:6])
  # One side only: the other side comes from the rule.
  selected, chosen = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), z_max_mm=z_mm[8],
                                           min_slices=2)
  assert chosen.rule == "top=manifest bottom=thighs"
  np.testing.assert_array_equal(selected.z_mm, z_mm[3:9])
  # Past the study: clipped, with a warning.
  selected, _ = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), z_min_mm=z_mm[0] - 50.0,
                                      z_max_mm=z_mm[2], min_slices=2)
  np.testing.assert_array_equal(selected.z_mm, z_mm[:3])
  assert any("reaches past" in warning for warning in selected.warnings)
  with pytest.raises(RegionError, match="does not overlap"):
    region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), z_min_mm=500.0, z_max_mm=600.0)


def test_too_few_slices_is_refused():
  kinds = ["thighs"] * 3 + ["abdomen"] * 3 + ["lungs"] * 4
  with pytest.raises(RegionError, match="min_slices=8"):
    region.select_abdomen(synthetic_volume(kinds), z_positions(len(kinds)), (SPACING_MM, SPACING_MM))


def test_resampling_interpolates_linearly_along_z():
  volume = np.zeros((4, 8, 8), np.float32) + np.array([0.0, 10.0, 20.0, 40.0], np.float32)[:, None, None]
  z_mm = np.array([0.0, 5.0, 10.0, 15.0])
  resampled = region.resample_slices(volume, z_mm, np.array([0.0, 2.5, 7.5, 12.5, 15.0]))
  np.testing.assert_allclose(resampled[:, 0, 0], [0.0, 5.0, 15.0, 30.0, 40.0])
  kinds = ["abdomen"] * 9
  selected, _ = region.select_abdomen(synthetic_volume(kinds), z_positions(9), (SPACING_MM, SPACING_MM),
                                      slice_spacing_mm=2.5, min_slices=2)
  np.testing.assert_allclose(np.diff(selected.z_mm), 2.5)
  assert selected.hu.shape[0] == 17


def test_config_validation():
  with pytest.raises(ValueError, match="lung_air_fraction"):
    region.RegionConfig(lung_air_fraction=1.5)


def test_selected_slices_carry_their_body_masks_for_the_crop():
  """The rule's masks of the kept slices are exactly preprocess.body_masks of them, so the pipeline's crop can
  reuse them; resampled slices and a range fully from the manifest carry none."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf.data import preprocess  # pylint: disable=import-outside-toplevel

  kinds = ["thighs"] * 3 + ["abdomen"] * 10 + ["gas"] * 2 + ["lungs"] * 4
  volume = synthetic_volume(kinds)
  selected, _ = region.select_abdomen(volume, z_positions(len(kinds)), (SPACING_MM, SPACING_MM))
  assert selected.body_masks is not None and selected.body_masks.shape[0] == selected.hu.shape[0]
  assert selected.body_threshold_hu == region.RegionConfig().body_threshold_hu
  np.testing.assert_array_equal(selected.body_masks, preprocess.body_masks(selected.hu).numpy())
  config = preprocess.PreprocessConfig(image_size=32)
  np.testing.assert_array_equal(
      preprocess.boxes_from_masks(selected.body_masks, MATRIX, MATRIX, config).numpy(),
      preprocess.body_boxes(tf.constant(selected.hu), config).numpy())
  resampled, _ = region.select_abdomen(volume, z_positions(len(kinds)), (SPACING_MM, SPACING_MM),
                                       slice_spacing_mm=2.5)
  assert resampled.body_masks is None
  z_mm = z_positions(len(kinds))
  manual, _ = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), z_min_mm=z_mm[3], z_max_mm=z_mm[12])
  assert manual.body_masks is None
