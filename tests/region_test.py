"""Tests of the abdominal z-range rule and the slabs, on synthetic volumes with known lungs, abdomen and thighs
and on the phantom (whose lung bases wrap around the liver dome)."""

import numpy as np
import pytest

from pdx_tf import phantom
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
  """A [Z, 64, 64] HU volume, slice 0 at the bottom; kinds[i] in {"abdomen", "bases", "lungs", "thighs", "gas"}.

  "bases": the upper abdomen at the diaphragm domes, soft tissue (liver, spleen) with two posterior lung-base
  crescents behind it (about 8 % of the body area); "lungs": the thorax (about 38 %).
  """
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
    elif kind == "bases":
      for side in (-1, 1):
        image[_ellipse((side * 65.0, 70.0), (40.0, 30.0)) & _ellipse((0.0, 0.0), (125.0, 88.0))] = -850.0
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
  assert (found.top_rule, found.bottom_rule) == ("diaphragm", "thighs")
  assert found.z_min_mm == z_mm[3] and found.z_max_mm == z_mm[12]
  selected, _ = region.select_abdomen(synthetic_volume(kinds), z_mm, (SPACING_MM, SPACING_MM), min_slices=4)
  np.testing.assert_array_equal(selected.z_mm, z_mm[3:13])
  assert selected.hu.shape == (10, MATRIX, MATRIX)
  assert selected.z_range_mm == (z_mm[3], z_mm[12])
  assert selected.rule == "top=diaphragm bottom=thighs"


def test_lung_bases_around_the_liver_dome_stay_in_the_abdomen():
  # Above the thighs: abdomen, then the domes with lung bases behind the liver, then the thorax. The old rule
  # (the first lung air, here thorax_air_fraction = lung_air_fraction) ended the abdomen below the bases.
  kinds = ["thighs"] * 3 + ["abdomen"] * 8 + ["bases"] * 3 + ["lungs"] * 4
  z_mm = z_positions(len(kinds))
  volume = synthetic_volume(kinds)
  found = region.find_abdominal_range(volume, z_mm, (SPACING_MM, SPACING_MM))
  assert found.top_rule == "diaphragm" and found.z_max_mm == z_mm[13] and found.z_min_mm == z_mm[3]
  old = region.find_abdominal_range(volume, z_mm, (SPACING_MM, SPACING_MM),
                                    config=region.RegionConfig(thorax_air_fraction=0.05))
  assert old.z_max_mm == z_mm[10]
  # An abdominal CT that starts at the domes (lung bases in its top slices, no thorax) keeps its top slice.
  kinds = ["thighs"] * 3 + ["abdomen"] * 8 + ["bases"] * 3
  z_mm = z_positions(len(kinds))
  found = region.find_abdominal_range(synthetic_volume(kinds), z_mm, (SPACING_MM, SPACING_MM))
  assert found.top_rule == "study_top" and found.z_max_mm == z_mm[-1]


def test_phantom_range_is_found_within_one_slice():
  """The phantom knows its range (pelvic floor to the top of the diaphragm domes, half-way between slices): the
  rule finds both ends within one slice, while the old rule (the first lung air) cuts the dome."""
  config = phantom.PhantomConfig(num_patients=4, seed=3, matrix_size=64, pixel_spacing_mm=6.0)
  for index in range(config.num_patients):
    patient = phantom.generate_patient(config, index)
    low, high = patient.abdomen_z_range_mm
    found = region.find_abdominal_range(patient.hu, patient.z_mm, (6.0, 6.0))
    assert (found.top_rule, found.bottom_rule) == ("diaphragm", "thighs")
    assert abs(found.z_max_mm - high) <= config.slice_spacing_mm and found.z_max_mm < high
    assert abs(found.z_min_mm - low) <= config.slice_spacing_mm and found.z_min_mm > low
    old = region.find_abdominal_range(patient.hu, patient.z_mm, (6.0, 6.0),
                                      config=region.RegionConfig(thorax_air_fraction=0.05))
    assert high - old.z_max_mm >= 2 * config.slice_spacing_mm, patient.patient_id


def test_thin_and_thick_scans_of_one_phantom_give_as_many_slices():
  """A 1 mm scan averaged into 5 mm slabs holds as many slices (+-1) as a 5 mm scan of the same patient."""
  counts = {}
  for spacing in (1.0, 5.0):
    config = phantom.PhantomConfig(num_patients=2, seed=3, matrix_size=64, pixel_spacing_mm=6.0,
                                   slice_spacing_mm=spacing)
    for index in range(config.num_patients):
      patient = phantom.generate_patient(config, index)
      selected, _ = region.select_abdomen(patient.hu, patient.z_mm, (6.0, 6.0), slice_spacing_mm=5.0)
      counts[spacing, index] = selected.hu.shape[0]
      if spacing == 1.0:
        assert np.allclose(np.diff(selected.z_mm), 5.0)
  for index in range(2):
    assert abs(counts[1.0, index] - counts[5.0, index]) <= 1, counts


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


def test_slabs_are_means_of_the_thin_slices_in_each_slab():
  # 1 mm slices whose values are known; a 5 mm slab's value must be the plain mean of the slices inside it.
  rng = np.random.default_rng(0)
  values = rng.uniform(-100.0, 100.0, 45)
  z_mm = 10.0 + np.arange(45, dtype=np.float64)
  volume = np.zeros((45, 4, 4), np.float32) + values.astype(np.float32)[:, None, None]
  centers = region.slab_grid(z_mm, 5.0)
  # 45 slices of 1 mm cover 45 mm: 9 slabs centred on the span's middle (32 mm), 5 slices each.
  np.testing.assert_allclose(centers, 32.0 + 5.0 * (np.arange(9) - 4))
  slabs, slab_z = region.slab_slices(volume, z_mm, centers, 5.0)
  np.testing.assert_allclose(slab_z, centers)
  for index, center in enumerate(centers):
    inside = (z_mm >= center - 2.5) & (z_mm < center + 2.5)
    assert inside.sum() == 5
    np.testing.assert_allclose(slabs[index], np.mean(values[inside]), rtol=1e-5)
  # Through select_abdomen (the rule keeps the whole study: no thorax, no thighs), the slabs replace the slices.
  # 43 slices cover 43 mm: still 9 slabs, the two end ones holding 4 slices.
  thin = synthetic_volume(["abdomen"] * 43) + values[:43].astype(np.float32)[:, None, None]
  selected, _ = region.select_abdomen(thin, z_mm[:43], (SPACING_MM, SPACING_MM), slice_spacing_mm=5.0)
  expected_z = 31.0 + 5.0 * (np.arange(9) - 4)
  np.testing.assert_allclose(selected.z_mm, expected_z)
  expected = np.stack([thin[(z_mm[:43] >= c - 2.5) & (z_mm[:43] < c + 2.5)].astype(np.float64).mean(axis=0)
                       for c in expected_z])
  np.testing.assert_allclose(selected.hu, expected, atol=1e-3)
  assert selected.body_masks is None  # averaged slices: the crop measures them again
  # A gap in the series (z 20-25 mm missing) leaves its slab out rather than inventing a slice.
  keep = (z_mm < 20.0) | (z_mm > 25.0)
  gap_slabs, gap_z = region.slab_slices(volume[keep], z_mm[keep], centers, 5.0)
  np.testing.assert_allclose(gap_z, np.delete(centers, 2))
  np.testing.assert_allclose(gap_slabs[2], np.mean(values[16:20]), rtol=1e-5)  # z 26-29 mm


@pytest.mark.parametrize("native_mm", [4.0, 5.0, 6.0])
def test_a_study_near_the_slab_thickness_keeps_its_slices(native_mm):
  kinds = ["abdomen"] * 12
  z_mm = -300.0 + native_mm * np.arange(12)
  volume = synthetic_volume(kinds) + np.arange(12, dtype=np.float32)[:, None, None]
  kept, _ = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), slice_spacing_mm=0)
  slabbed, _ = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), slice_spacing_mm=5.0)
  np.testing.assert_array_equal(slabbed.z_mm, z_mm)
  assert slabbed.hu.tobytes() == kept.hu.tobytes() == volume.tobytes()
  assert slabbed.body_masks is not None and slabbed.warnings == ()


def test_a_coarser_study_keeps_its_slices_with_a_warning():
  kinds = ["abdomen"] * 9
  volume = synthetic_volume(kinds)
  selected, _ = region.select_abdomen(volume, z_positions(9), (SPACING_MM, SPACING_MM), slice_spacing_mm=2.5,
                                      min_slices=2)
  np.testing.assert_array_equal(selected.z_mm, z_positions(9))
  assert any("coarser" in warning for warning in selected.warnings)
  with pytest.raises(ValueError, match="slice_spacing_mm"):
    region.select_abdomen(volume, z_positions(9), (SPACING_MM, SPACING_MM), slice_spacing_mm=-1.0)


def test_config_validation():
  with pytest.raises(ValueError, match="lung_air_fraction"):
    region.RegionConfig(lung_air_fraction=1.5)
  with pytest.raises(ValueError, match="thorax_air_fraction"):
    region.RegionConfig(thorax_air_fraction=0.01)


def test_selected_slices_carry_their_body_masks_for_the_crop():
  """The rule's masks of the kept slices are exactly preprocess.body_masks of them, so the pipeline's crop can
  reuse them; slabs and a range fully from the manifest carry none."""
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
  slabbed, _ = region.select_abdomen(np.repeat(volume, 5, axis=0), -300.0 + np.arange(5 * len(kinds)),
                                     (SPACING_MM, SPACING_MM), slice_spacing_mm=5.0)
  assert slabbed.body_masks is None
  z_mm = z_positions(len(kinds))
  manual, _ = region.select_abdomen(volume, z_mm, (SPACING_MM, SPACING_MM), z_min_mm=z_mm[3], z_max_mm=z_mm[12])
  assert manual.body_masks is None
