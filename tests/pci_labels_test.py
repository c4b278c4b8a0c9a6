"""PCI region labels: manifest checks, the phantom's region scores recomputed from its masks, and the scores in the
records (mirrored on flipped copies)."""

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from pdx_tf import contracts, phantom
from pdx_tf.data import manifest, pipeline, preprocess, records
from pdx_tf.data.augment import AugmentConfig
from pdx_tf.errors import ManifestError

HEADER = "patient_id,dicom_dir,label_p,label_sb," + ",".join(f"pci_{r}" for r in range(13))
# Written by hand: right upper (1) <-> left upper (3), right flank (8) <-> left flank (4), right lower (7) <-> left
# lower (5); the other regions stay.
MIRROR_BY_HAND = {0: 0, 1: 3, 2: 2, 3: 1, 4: 8, 5: 7, 6: 6, 7: 5, 8: 4, 9: 9, 10: 10, 11: 11, 12: 12}


def _row(patient_id, label_p, label_sb, scores, extra=""):
  return f"{patient_id},d/{patient_id},{label_p},{label_sb}," + ",".join(scores) + extra


def _problems(text):
  with pytest.raises(ManifestError) as raised:
    manifest.parse_manifest_text(text, "/cohort/manifest.csv")
  return list(raised.value.problems)


def test_pci_columns_parse_with_unrecorded_regions():
  text = "\n".join([
      HEADER + ",pci",
      _row("P1", 1, 1, ["0", "2", "", "0", "1", "0", "3", "", "0", "1", "", "", ""], ","),
      _row("P2", 0, 0, [""] * 13, ","),  # no region recorded: still a patient of the p and sb tasks
      _row("P3", 1, 0, ["3"] * 9 + ["0"] * 4, ",27"),
  ]) + "\n"
  parsed = manifest.parse_manifest_text(text, "/cohort/manifest.csv")
  assert parsed.has_pci_scores
  assert parsed.rows[0].pci_scores == (0, 2, None, 0, 1, 0, 3, None, 0, 1, None, None, None)
  assert parsed.rows[1].pci_scores == (None,) * 13 and parsed.rows[1].label_p == 0
  assert parsed.rows[2].pci_scores == (3,) * 9 + (0,) * 4
  assert parsed.covariate_names == ("pci",)  # the total stays a covariate; pci_0 ... pci_12 are not covariates


def test_manifest_without_pci_columns_has_none():
  parsed = manifest.parse_manifest_text("patient_id,dicom_dir,label_p,label_sb,pci\nP1,d,1,0,banana\n", "/m.csv")
  assert not parsed.has_pci_scores and parsed.rows[0].pci_scores is None
  assert parsed.rows[0].covariates == {"pci": "banana"}  # unchecked without the region columns, as before


def test_each_pci_problem_is_one_line_with_its_row():
  text = "\n".join([
      HEADER + ",pci",
      _row("P1", 1, 1, ["4", "x", "", "0", "1", "0", "3", "", "0", "1", "", "", ""], ","),  # row 2: bad values
      _row("P2", 1, 0, ["1"] * 9 + ["0"] * 4, ",10"),    # row 3: total 10, sum 9
      _row("P3", 0, 0, ["0", "2"] + [""] * 11, ","),     # row 4: label_p=0 with region 1 positive
      _row("P4", 1, 1, ["2"] + [""] * 8 + ["0"] * 4, ","),  # row 5: label_sb=1, 9-12 all recorded 0
      _row("P5", 1, 0, ["2"] + [""] * 8 + ["", "", "1", ""], ","),  # row 6: label_sb=0, region 11 positive
      _row("P6", 1, 1, ["2"] + [""] * 8 + ["0", "0", "0", ""], ","),  # row 7: fine (region 12 not recorded)
      _row("P7", 1, 0, ["2"] + [""] * 12, ",2.5"),        # row 8: total not a whole number
      _row("P8", 1, 0, ["1"] + [""] * 12, ",5"),          # row 9: fine (total unchecked: regions missing)
  ]) + "\n"
  problems = _problems(text)
  assert len(problems) == 6, problems
  assert problems[0].startswith("row 2") and "pci_0='4'" in problems[0] and "pci_1='x'" in problems[0]
  assert problems[1].startswith("row 3") and "sum to 9" in problems[1]
  assert problems[2].startswith("row 4") and "label_p=0" in problems[2] and "pci_1" in problems[2]
  assert problems[3].startswith("row 5") and "label_sb=1" in problems[3]
  assert problems[4].startswith("row 6") and "label_sb=0" in problems[4] and "pci_11" in problems[4]
  assert problems[5].startswith("row 8") and "whole number" in problems[5]


def test_pci_columns_come_as_a_set():
  problems = _problems("patient_id,dicom_dir,label_p,label_sb,pci_0,pci_1\nP1,d,1,0,1,0\n")
  assert len(problems) == 1 and problems[0].startswith("row 1") and "pci_12" in problems[0], problems


# -------------------------------------------------------------------------------------------------------------
# The phantom's region scores, recomputed from the masks alone.

TINY = phantom.PhantomConfig(num_patients=8, seed=3, matrix_size=64, pixel_spacing_mm=6.0)
SMALL = phantom.PhantomConfig(num_patients=4, seed=1, matrix_size=128, pixel_spacing_mm=3.0)


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("tiny_cohort"))
  return phantom.write_demo_cohort(folder, TINY)


def _scores_from_masks(mask_file, pixel_spacing_mm):
  """The 13 PCI scores from masks/<patient_id>.npz alone: each 26-connected lesion of the disease mask scores by
  its size (largest bounding-box extent in mm: 1 up to 5, 2 up to 50, 3 above) in every region of
  pci_region_map holding one of its voxels."""
  arrays = np.load(mask_file)
  disease, region_map, z_mm = arrays["nodule_mask"], arrays["pci_region_map"], arrays["z_mm"]
  spacing = (float(np.median(np.diff(z_mm))), pixel_spacing_mm, pixel_spacing_mm)
  lesions, count = ndimage.label(disease, np.ones((3, 3, 3), bool))
  scores = [0] * 13
  for index, box in enumerate(ndimage.find_objects(lesions), start=1):
    extent_mm = max((part.stop - part.start) * step for part, step in zip(box, spacing))
    score = 1 if extent_mm <= 5.0 else 2 if extent_mm <= 50.0 else 3
    for region in np.unique(region_map[box][lesions[box] == index]):
      assert region >= 0, "a lesion voxel lies outside the abdomen's region map"
      scores[region] = max(scores[region], score)
  assert count == len(ndimage.find_objects(lesions))
  return scores


def _check_cohort(manifest_path, config):
  folder = os.path.dirname(manifest_path)
  with open(manifest_path, encoding="utf-8") as handle:
    rows = list(csv.DictReader(handle))
  assert len(rows) == config.num_patients
  for row in rows:
    written = [int(row[f"pci_{r}"]) for r in range(13)]
    derived = _scores_from_masks(os.path.join(folder, "masks", f"{row['patient_id']}.npz"), config.pixel_spacing_mm)
    assert written == derived, row["patient_id"]
    assert int(row["pci"]) == sum(derived)
    assert int(row["label_p"]) == int(any(derived))
    assert int(row["label_sb"]) == int(any(derived[r] for r in (9, 10, 11, 12)))
  manifest.read_manifest(manifest_path)  # the phantom's own manifest passes every check
  return rows


def test_phantom_scores_follow_from_the_masks(tiny_cohort):
  rows = _check_cohort(tiny_cohort, TINY)
  assert sum(int(row["label_p"]) for row in rows) == 4
  assert any(int(row["pci_9"]) or int(row["pci_10"]) or int(row["pci_11"]) or int(row["pci_12"]) for row in rows)


def test_region_map_geometry(tiny_cohort):
  """The documented grid: patient right (x < 0) holds 1, 8, 7; patient left 3, 4, 5; upper row above the middle
  row above the lower row; small-bowel regions only next to small-bowel tissue's HU; -1 outside the body."""
  folder = os.path.dirname(tiny_cohort)
  patient = phantom.generate_patient(TINY, 1)
  arrays = np.load(os.path.join(folder, "masks", f"{patient.patient_id}.npz"))
  region_map = arrays["pci_region_map"]
  np.testing.assert_array_equal(region_map, patient.pci_region_map)
  axis = (np.arange(TINY.matrix_size) - (TINY.matrix_size - 1) / 2) * TINY.pixel_spacing_mm
  x = np.broadcast_to(axis[None, None, :], region_map.shape)
  z = np.broadcast_to(arrays["z_mm"][:, None, None], region_map.shape)
  for right, left in contracts.PCI_LATERAL_PAIRS:
    assert (x[region_map == right] < 0).all() and (x[region_map == left] > 0).all()
  rows = [(1, 2, 3), (8, 0, 4), (7, 6, 5)]
  z_of = [z[np.isin(region_map, row)] for row in rows]
  assert z_of[0].min() > z_of[1].max() and z_of[1].min() > z_of[2].max()
  low, high = arrays["abdomen_z_range_mm"]
  assert (z[region_map >= 0] > low).all() and (z[region_map >= 0] < high).all()
  assert (patient.hu[region_map >= 0] > -500).mean() > 0.95  # inside the body (air outside)
  small_bowel = np.isin(patient.tissue_labels, (phantom.cohort.anatomy_lib.TISSUE["small_bowel_wall"],
                                                phantom.cohort.anatomy_lib.TISSUE["small_bowel_lumen"]))
  near_bowel = ndimage.binary_dilation(small_bowel, np.ones((3, 3, 3), bool))
  assert near_bowel[region_map >= 9].all()
  assert set(np.unique(region_map)) == set(range(-1, 13))


@pytest.mark.slow
def test_default_demo_cohort_scores_and_labels():
  """Every patient of the 40-patient demo cohort: scores from the masks, label_p = any region, label_sb = any of
  9-12, pci = the sum."""
  config = phantom.PhantomConfig()
  rows = _check_cohort(phantom.write_demo_cohort(phantom.demo_cohort_dir(config), config), config)
  assert len(rows) == 40


def test_low_burden_preset():
  """Positives carry only nodules in the preset's size range, no cake; ascites is drawn without the label."""
  config = phantom.preset_config("low_burden", num_patients=8, seed=3, matrix_size=64, pixel_spacing_mm=6.0)
  low, high = config.nodule_diameter_range_mm
  assert (low, high) == (7.0, 20.0) and not config.omental_cake
  assert config.ascites_given_positive == config.ascites_given_negative
  default = phantom.PhantomConfig(num_patients=8, seed=3, matrix_size=64, pixel_spacing_mm=6.0)
  cakes_in_default = 0
  for index in range(8):
    patient = phantom.generate_patient(config, index)
    reference = phantom.generate_patient(default, index)
    cakes_in_default += reference.covariates["omental_cake"]
    assert (patient.label_p, patient.label_sb) == (reference.label_p, reference.label_sb)
    assert not patient.covariates["omental_cake"]
    assert not (patient.tissue_labels == phantom.cohort.anatomy_lib.TISSUE["omental_cake"]).any()
    assert all(low <= diameter <= high for diameter in patient.nodule_diameters_mm)
    assert len(patient.nodule_diameters_mm) == patient.covariates["nodule_count"]
    assert (patient.covariates["nodule_count"] > 0) == bool(patient.label_p)
    assert max(patient.pci_scores) <= (2 if patient.label_p else 0)
  assert cakes_in_default >= 1  # the same draws give the default cohort a cake: the preset removed it


def test_low_burden_ascites_does_not_depend_on_the_label(monkeypatch):
  """Each patient's ascites grade stays the same when its label is inverted (the draw is keyed by the patient,
  not the label); in the default cohort, inverting labels changes some grades (the check can fail)."""
  kwargs = {"num_patients": 12, "seed": 5, "matrix_size": 32, "pixel_spacing_mm": 12.0, "slice_spacing_mm": 10.0}
  configs = {"low_burden": phantom.preset_config("low_burden", **kwargs), "default": phantom.PhantomConfig(**kwargs)}
  grades = {}
  for inverted in (False, True):
    if inverted:
      labels = phantom.cohort.patient_labels
      monkeypatch.setattr(phantom.cohort, "patient_labels", lambda seed, index: (1 - labels(seed, index)[0], 0))
    for name, config in configs.items():
      grades[name, inverted] = [phantom.generate_patient(config, index).covariates["ascites"] for index in range(12)]
  assert grades["low_burden", False] == grades["low_burden", True]
  assert grades["default", False] != grades["default", True]


def test_default_config_is_not_changed_by_the_preset_fields():
  assert phantom.PhantomConfig().nodule_diameter_range_mm == (12.0, 25.0)
  assert phantom.PhantomConfig().omental_cake
  with pytest.raises(ValueError, match="nodule_diameter_range_mm"):
    phantom.PhantomConfig(nodule_diameter_range_mm=(3.0, 10.0))
  with pytest.raises(ValueError, match="unknown phantom preset"):
    phantom.preset_config("tiny_burden")


# -------------------------------------------------------------------------------------------------------------
# Through the pipeline.

SCORES = ["0", "2", "", "0", "1", "0", "3", "", "1", "1", "", "", ""]  # asymmetric left/right, some unrecorded


def _custom_manifest(folder, tiny_manifest):
  """The tiny cohort's first positive sb patient and first negative, with hand-written region scores."""
  with open(tiny_manifest, encoding="utf-8") as handle:
    rows = list(csv.DictReader(handle))
  positive = next(row for row in rows if row["label_sb"] == "1")
  negative = next(row for row in rows if row["label_p"] == "0")
  base = os.path.dirname(tiny_manifest)
  lines = [HEADER + ",pci",
           _row(positive["patient_id"], 1, 1, SCORES, ",").replace(f"d/{positive['patient_id']}",
                                                                   os.path.join(base, positive["dicom_dir"])),
           _row(negative["patient_id"], 0, 0, [""] * 13, ",").replace(f"d/{negative['patient_id']}",
                                                                      os.path.join(base, negative["dicom_dir"]))]
  path = os.path.join(folder, "manifest.csv")
  with open(path, "w", encoding="utf-8") as handle:
    handle.write("\n".join(lines) + "\n")
  return path, positive["patient_id"], negative["patient_id"]


def _read(paths):
  spec = records.feature_spec()
  return [tf.io.parse_single_example(raw, spec) for raw in tf.data.TFRecordDataset(paths)]


def test_records_carry_scores_and_flipped_copies_mirror_them(tmp_path, tiny_cohort):
  """No rotation, no scaling: every augmented copy is its original or the original mirrored left-right, which
  the test sees in the pixels; mirrored copies must carry the mirrored scores (mirror written by hand)."""
  manifest_path, positive, negative = _custom_manifest(str(tmp_path), tiny_cohort)
  config = pipeline.PipelineConfig(
      manifest_path=manifest_path, output_dir=str(tmp_path / "records"), augment_factor=6, augment_block=2,
      preprocess=preprocess.PreprocessConfig(image_size=32),
      augment=AugmentConfig(rotation_max_deg=0.0, scale_min=1.0, scale_max=1.0, flip_probability=0.5),
      write_qc=False, min_slices=2)
  result = pipeline.run_pipeline(config, progress=False)
  assert result.ok, result.failures
  with open(result.dataset_json, encoding="utf-8") as handle:
    dataset = json.load(handle)
  entries = {entry["patient_id"]: entry for entry in dataset["patients"]}
  expected = [int(s) if s else None for s in SCORES]
  assert entries[positive]["pci_scores"] == expected
  assert entries[negative]["pci_scores"] == [None] * 13
  as_record = [-1 if s is None else s for s in expected]
  mirrored = [as_record[MIRROR_BY_HAND[r]] for r in range(13)]
  assert mirrored != as_record
  info = contracts.load_dataset_info(str(tmp_path / "records"))
  assert info.has_pci_scores and info.pci_scores(positive) == tuple(as_record)
  folder = str(tmp_path / "records")
  originals = {}
  for example in _read([os.path.join(folder, p) for p in entries[positive]["original_shards"]]):
    originals[int(example["slice_index"])] = tf.io.decode_png(example["image"]).numpy()
    assert example["pci_scores"].numpy().tolist() == as_record
  flipped = kept = 0
  for example in _read([os.path.join(folder, p) for p in entries[positive]["augmented_shards"]]):
    image = tf.io.decode_png(example["image"]).numpy().astype(int)
    original = originals[int(example["slice_index"])].astype(int)
    as_is, as_mirror = np.abs(image - original).mean(), np.abs(image - original[:, ::-1]).mean()
    assert min(as_is, as_mirror) < 0.5 < max(as_is, as_mirror)
    is_flipped = as_mirror < as_is
    assert example["pci_scores"].numpy().tolist() == (mirrored if is_flipped else as_record)
    flipped += is_flipped
    kept += not is_flipped
  assert flipped > 5 and kept > 5
  for example in _read([os.path.join(folder, p) for p in entries[negative]["augmented_shards"]]):
    assert example["pci_scores"].numpy().tolist() == [-1] * 13


def _old_content_hash(dataset):
  """records_content_hash as it was before PCI scores (written out here)."""
  content = {
      "schema_version": dataset.get("schema_version"), "preprocess": dataset.get("preprocess"),
      "shards": sorted([s["path"], s["sha256"], s["num_examples"]] for s in dataset.get("shards", [])),
      "patients": sorted([e["patient_id"], e["label_p"], e["label_sb"], sorted(e.get("covariates", {}).items())]
                         for e in dataset["patients"]),
  }
  return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def test_content_hash_changes_only_with_pci_scores():
  patient = {"patient_id": "a", "label_p": 1, "label_sb": 0, "covariates": {"site": "A"}}
  dataset = {"schema_version": 3, "preprocess": {"image_size": 32},
             "shards": [{"path": "x", "sha256": "0" * 64, "num_examples": 3}], "patients": [patient]}
  assert contracts.records_content_hash(dataset) == _old_content_hash(dataset)
  with_scores = {**dataset, "patients": [{**patient, "pci_scores": [0] * 12 + [None]}]}
  other_scores = {**dataset, "patients": [{**patient, "pci_scores": [0] * 12 + [1]}]}
  assert len({contracts.records_content_hash(d) for d in (dataset, with_scores, other_scores)}) == 3
