"""Tests of pdx_tf.data.augment's declarations: the draws and transforms by name, and what adding one costs.

The expected values are the paper's augmentation written out here independently (one numpy Generator a copy keyed
by (seed, patient, slice, copy), drawing angle, flip, then log-uniform scale; the closed-form warp about the
centre), so a declaration that drew in another order or composed its transform differently fails.
"""

import dataclasses
import math
import shutil

import numpy as np
import pytest

from pdx_tf import augmentations, io_utils, phantom
from pdx_tf.data import augment, manifest, pipeline, preprocess


def _paper_draws(seed, patient_id, slice_index, augmentation_index, config):
  generator = np.random.default_rng([seed, io_utils.stable_key(patient_id), slice_index, augmentation_index])
  angle = generator.uniform(-config.rotation_max_deg, config.rotation_max_deg)
  flip = generator.random() < config.flip_probability
  scale = math.exp(generator.uniform(math.log(config.scale_min), math.log(config.scale_max)))
  return float(angle), bool(flip), float(scale)


def _paper_transform(angle_deg, flip, scale, size):
  theta = math.radians(angle_deg)
  cos, sin = math.cos(theta), math.sin(theta)
  sign = -1.0 if flip else 1.0
  m00, m01, m10, m11 = sign * cos / scale, sign * sin / scale, -sin / scale, cos / scale
  center = (size - 1) / 2.0
  return [m00, m01, center - m00 * center - m01 * center, m10, m11, center - m10 * center - m11 * center, 0.0, 0.0]


def test_named_draws_and_transform_are_the_papers_bit_for_bit():
  config = augment.AugmentConfig(rotation_max_deg=20.0, flip_probability=0.3, scale_min=0.8, scale_max=1.2)
  flips = 0
  for patient_id in ("P001", "demo-003"):
    for slice_index in range(6):
      for copy in range(1, 40):
        angle, flip, scale = _paper_draws(5, patient_id, slice_index, copy, config)
        draws = augment.random_draws(5, patient_id, slice_index, copy, config)
        assert draws == {"rotation_deg": angle, "flip": flip, "scale": scale}
        assert augment.random_parameters(5, patient_id, slice_index, copy, config)[1] == flip
        assert augment.is_flipped(5, patient_id, slice_index, copy, config) == flip
        # Exact equality: the stored copies' bytes depend on these float64 numbers.
        assert augment.random_transform(5, patient_id, slice_index, copy, config, 48) == _paper_transform(
            angle, flip, scale, 48)
        flips += flip
  assert 0 < flips < 2 * 6 * 39 and not augment.is_flipped(5, "P001", 0, 0, config)


def test_each_declaration_checks_its_own_settings():
  assert [a.name for a in augmentations.AUGMENTATIONS] == ["rotation_deg", "flip", "scale"]
  assert {name for a in augmentations.AUGMENTATIONS for name in a.settings} == {
      field.name for field in dataclasses.fields(augment.AugmentConfig)}
  for bad, match in ((dict(rotation_max_deg=181.0), "rotation_max_deg"), (dict(flip_probability=1.5), "flip"),
                     (dict(scale_min=0.0), "scale_min")):
    with pytest.raises(ValueError, match=match):
      augment.AugmentConfig(**bad)


# A new augmentation as a user would add it: its setting (default: off), its declaration last with opt_in=True.
@dataclasses.dataclass(frozen=True)
class _WithShear(augment.AugmentConfig):
  shear_probability: float = 0.0


def _shear(linear, shear):
  m00, m01, m10, m11 = linear
  return (m00 + 0.2 * m10, m01 + 0.2 * m11, m10, m11) if shear else linear


_SHEAR = augment.Augmentation(
    "shear", ("shear_probability",), lambda config: None,
    lambda generator, config: bool(generator.random() < getattr(config, "shear_probability", 0.0)), _shear,
    opt_in=True)


@pytest.fixture
def with_shear(monkeypatch):
  monkeypatch.setattr(augmentations, "AUGMENTATIONS", augmentations.AUGMENTATIONS + (_SHEAR,))


def test_a_new_augmentation_at_its_defaults_keeps_every_copy_and_fingerprint(with_shear, tmp_path):
  del with_shear
  plain, off, on = augment.AugmentConfig(), _WithShear(), _WithShear(shear_probability=1.0)
  assert augment.settings_dict(off) == augment.settings_dict(plain) == dataclasses.asdict(plain)
  assert augment.settings_dict(on) == {**dataclasses.asdict(plain), "shear_probability": 1.0}
  for copy in range(1, 20):  # drawn after the others: the earlier draws, and an off shear's warp, are unchanged
    old = _paper_draws(0, "P", 2, copy, plain)
    assert augment.random_transform(0, "P", 2, copy, off, 32) == _paper_transform(*old, 32)
    assert augment.random_transform(0, "P", 2, copy, on, 32) != _paper_transform(*old, 32)
  row = manifest.ManifestRow(row_number=2, patient_id="P", dicom_dir=str(tmp_path), label_p=1, label_sb=0,
                             z_min_mm=None, z_max_mm=None, series_uid=None, covariates={})
  config = pipeline.PipelineConfig(manifest_path="m.csv", output_dir=str(tmp_path))
  fingerprint = pipeline.patient_fingerprint(config, row)
  assert pipeline.patient_fingerprint(dataclasses.replace(config, augment=off), row) == fingerprint
  assert pipeline.patient_fingerprint(dataclasses.replace(config, augment=on), row) != fingerprint


def test_a_rerun_with_the_new_augmentation_off_skips_every_patient(tmp_path, monkeypatch):
  cohort = phantom.write_demo_cohort(str(tmp_path / "cohort"), phantom.PhantomConfig(
      num_patients=2, matrix_size=64, pixel_spacing_mm=6.0))
  config = pipeline.PipelineConfig(manifest_path=cohort, output_dir=str(tmp_path / "D"), augment_factor=2,
                                   augment_block=1, preprocess=preprocess.PreprocessConfig(image_size=32),
                                   num_workers=1, qc_max_slices=4)
  first = pipeline.run_pipeline(config, progress=False)
  assert first.ok and first.num_reused == 0
  shutil.copytree(config.output_dir, tmp_path / "D2")
  monkeypatch.setattr(augmentations, "AUGMENTATIONS", augmentations.AUGMENTATIONS + (_SHEAR,))
  again = pipeline.run_pipeline(dataclasses.replace(config, augment=_WithShear()), progress=False)
  assert again.ok and again.num_reused == first.num_patients == 2
  rebuilt = pipeline.run_pipeline(dataclasses.replace(config, output_dir=str(tmp_path / "D2"),
                                                      augment=_WithShear(shear_probability=1.0)), progress=False)
  assert rebuilt.ok and rebuilt.num_reused == 0


def _paper_draws_with_shear(seed, patient_id, slice_index, augmentation_index, config, shear_probability):
  """The paper's three draws, then the shear's, from the copy's one generator (written out independently)."""
  generator = np.random.default_rng([seed, io_utils.stable_key(patient_id), slice_index, augmentation_index])
  angle = generator.uniform(-config.rotation_max_deg, config.rotation_max_deg)
  flip = generator.random() < config.flip_probability
  scale = math.exp(generator.uniform(math.log(config.scale_min), math.log(config.scale_max)))
  shear = generator.random() < shear_probability
  return float(angle), bool(flip), float(scale), bool(shear)


def _sheared(transform, size):
  """The 8-number transform with the toy shear (row 0 += 0.2 row 1 of the linear part) composed last."""
  m00, m01, _, m10, m11, _, _, _ = transform
  m00, m01 = m00 + 0.2 * m10, m01 + 0.2 * m11
  center = (size - 1) / 2.0
  return [m00, m01, center - m00 * center - m01 * center, m10, m11, center - m10 * center - m11 * center, 0.0, 0.0]


def test_a_new_augmentation_reaches_training_through_the_typed_records_settings(fake_records_dir, monkeypatch):
  """A declaration and a settings field, no library edit: dataset.json's typed settings (read once by
  contracts.DatasetInfo) carry it to the training input pipeline's keyed re-warp of the 2.5D stacks and bags."""
  import json  # pylint: disable=import-outside-toplevel
  from pdx_tf import contracts  # pylint: disable=import-outside-toplevel
  from pdx_tf.errors import RecordsError  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import input_pipeline  # pylint: disable=import-outside-toplevel

  plain_dir = fake_records_dir("plain", num_patients=2, slices_per_patient=3, augment_factor=4, seed=7)
  sheared_dir = fake_records_dir("sheared", num_patients=2, slices_per_patient=3, augment_factor=4, seed=7)
  path = f"{sheared_dir}/{contracts.DATASET_FILE}"
  document = json.load(open(path))
  document["augment"]["shear_probability"] = 1.0  # what the data pipeline records for a shear that is on
  with open(path, "w") as stream:
    json.dump(document, stream)
  # This code does not know the shear yet: one RecordsError that says what to do, not a silent drop.
  with pytest.raises(RecordsError, match="augmentation settings this code cannot use.*shear_probability"):
    contracts.load_dataset_info(sheared_dir)

  monkeypatch.setattr(augmentations, "AUGMENTATIONS", augmentations.AUGMENTATIONS + (_SHEAR,))
  monkeypatch.setattr(augmentations, "AugmentConfig", _WithShear)
  paper = augment.AugmentConfig()
  for folder, shear_probability in ((plain_dir, 0.0), (sheared_dir, 1.0)):
    info = contracts.load_dataset_info(folder)
    assert info.augment_settings.config == _WithShear(shear_probability=shear_probability)
    assert (info.augment_settings.seed, info.augment_settings.augment_factor) == (7, 4)
    stacks = input_pipeline.load_patient_stacks(info, list(info.patients), "p", 0)
    for patient_id in info.patients:
      for copy in range(1, 5):
        got = input_pipeline.augment_transforms(stacks, patient_id, [0, 1, 2], copy)
        for slice_index in range(3):
          angle, flip, scale, shear = _paper_draws_with_shear(7, patient_id, slice_index, copy, paper,
                                                              shear_probability)
          expected = _paper_transform(angle, flip, scale, 32)
          assert shear == (shear_probability == 1.0)
          if shear:
            expected = _sheared(expected, 32)
          np.testing.assert_allclose(got[slice_index], np.asarray(expected, np.float32), rtol=0, atol=1e-6)
