"""Tests for pdx_tf.phantom.cohort: ground truth, anatomy, DICOM round trips, quirks, canaries and the cached cohort."""

import csv
import json
import os
import re
import time

import numpy as np
import pydicom
import pytest
from pydicom import uid as dicom_uid
from scipy import ndimage

from pdx_tf import phantom
from pdx_tf.phantom import cohort as phantom_cohort
from pdx_tf.phantom.anatomy import OMENTAL_CAKE_MIN_PCI, SMALL_BOWEL_TISSUES, TISSUE

# 64 px at 6 mm covers the same 384 mm field of view as the default 256 px at 1.5 mm, 16x fewer voxels.
TINY = phantom.PhantomConfig(num_patients=8, seed=3, matrix_size=64, pixel_spacing_mm=6.0)
SMALL = phantom.PhantomConfig(num_patients=4, seed=1, matrix_size=128, pixel_spacing_mm=3.0)
ALL_NEIGHBOURS = np.ones((3, 3, 3), bool)


def _nodules(patient):
  """The discrete nodules (nodule_mask also holds the omental cake)."""
  return patient.tissue_labels == TISSUE["nodule"]


def _cake(patient):
  return patient.tissue_labels == TISSUE["omental_cake"]


@pytest.fixture(scope="module")
def tiny_patients():
  return [phantom.generate_patient(TINY, index) for index in range(TINY.num_patients)]


@pytest.fixture(scope="module")
def small_patients():
  return [phantom.generate_patient(SMALL, index) for index in range(SMALL.num_patients)]


@pytest.fixture(scope="module")
def tiny_cohort(tmp_path_factory):
  config = phantom.PhantomConfig(num_patients=4, seed=5, matrix_size=64, pixel_spacing_mm=6.0)
  folder = str(tmp_path_factory.mktemp("cohort") / "demo")
  return config, folder, phantom.write_demo_cohort(folder, config)


# ---------------------------------------------------------------------------------------------------------------
# Config and labels


@pytest.mark.parametrize("changes, message", [
    ({"matrix_size": 64}, "field of view"),
    ({"num_patients": 0}, "num_patients"),
    ({"seed": -1}, "seed"),
    ({"slice_spacing_mm": 0.1}, "slice_spacing_mm"),
    ({"ascites_given_positive": (0.5, 0.5, 0.5)}, "summing to 1"),
    ({"site_b_fraction": 1.5}, "site_b_fraction"),
])
def test_config_rejects_bad_values(changes, message):
  with pytest.raises(ValueError, match=message):
    phantom.PhantomConfig(**changes)


def test_patient_index_out_of_range():
  with pytest.raises(ValueError, match="patient_index"):
    phantom.generate_patient(TINY, TINY.num_patients)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_labels_are_balanced_in_blocks_of_four(seed):
  labels = [phantom.patient_labels(seed, index) for index in range(12)]
  for start in range(0, 12, 4):
    block = labels[start:start + 4]
    assert sorted(block) == [(0, 0), (0, 0), (1, 0), (1, 1)]
    assert sorted(p for p, _ in block[:2]) == [0, 1]  # any even-aligned pair has both p classes
  assert all(p == 1 for p, sb in labels if sb == 1)


def test_generate_patient_is_deterministic():
  first, second = phantom.generate_patient(TINY, 1), phantom.generate_patient(TINY, 1)
  for name in ("hu", "z_mm", "nodule_mask", "small_bowel_nodule_mask", "tissue_labels"):
    np.testing.assert_array_equal(getattr(first, name), getattr(second, name))
  assert first.covariates == second.covariates
  other_seed = phantom.generate_patient(phantom.PhantomConfig(num_patients=8, seed=4, matrix_size=64,
                                                              pixel_spacing_mm=6.0), 1)
  assert not np.array_equal(first.hu, other_seed.hu) or first.hu.shape != other_seed.hu.shape


# ---------------------------------------------------------------------------------------------------------------
# Ground truth


def test_patient_fields(tiny_patients):
  for index, patient in enumerate(tiny_patients):
    assert patient.patient_id == f"demo-{index:03d}"
    assert re.fullmatch(r"[A-Za-z0-9._-]+", patient.patient_id)
    depth = patient.hu.shape[0]
    assert patient.hu.dtype == np.float32 and patient.hu.shape == (depth, 64, 64)
    assert 40 <= depth <= 56
    assert patient.z_mm.dtype == np.float64 and np.all(np.diff(patient.z_mm) > 0)
    np.testing.assert_allclose(np.diff(patient.z_mm), TINY.slice_spacing_mm)
    assert patient.nodule_mask.dtype == bool and patient.nodule_mask.shape == patient.hu.shape
    assert np.array_equal(patient.hu, np.round(patient.hu)) and patient.hu.min() >= -1024
    low, high = patient.abdomen_z_range_mm
    assert patient.z_mm[0] < low < high < patient.z_mm[-1]
    # Both ends lie half-way between two slices, so every slice is unambiguously in or out.
    for boundary in (low, high):
      assert np.min(np.abs(patient.z_mm - boundary)) == pytest.approx(TINY.slice_spacing_mm / 2)
    assert patient.covariates["ascites"] in ("none", "small", "large")
    assert patient.covariates["site"] in ("A", "B")
    assert isinstance(patient.covariates["pci"], int) and 0 <= patient.covariates["pci"] <= 39


def test_labels_match_masks(tiny_patients, small_patients):
  for patient in tiny_patients + small_patients:
    assert not patient.label_sb or patient.label_p
    assert not np.any(patient.small_bowel_nodule_mask & ~patient.nodule_mask)
    assert patient.nodule_mask.any() == bool(patient.label_p)
    assert patient.small_bowel_nodule_mask.any() == bool(patient.label_sb)
    assert (patient.covariates["pci"] > 0) == bool(patient.label_p)
    assert patient.covariates["nodule_count"] == len(patient.nodule_sites)
    if patient.label_p:
      assert 1 <= patient.covariates["nodule_count"] <= 8


def test_small_bowel_nodules_touch_bowel_and_others_do_not(tiny_patients, small_patients):
  for patient in tiny_patients + small_patients:
    bowel = np.isin(patient.tissue_labels, SMALL_BOWEL_TISSUES)
    components, count = ndimage.label(_nodules(patient), ALL_NEIGHBOURS)
    assert count == patient.covariates["nodule_count"]  # nodules never touch each other
    for component in range(1, count + 1):
      nodule = components == component
      touches = bool(np.any(ndimage.binary_dilation(nodule, ALL_NEIGHBOURS) & bowel))
      on_small_bowel = bool(np.any(nodule & patient.small_bowel_nodule_mask))
      assert touches == on_small_bowel, patient.patient_id
      assert not on_small_bowel or np.all(patient.small_bowel_nodule_mask[nodule])
    # The omental cake is disease but never small-bowel disease, and it touches neither bowel nor a nodule.
    cake = _cake(patient)
    assert not np.any(cake & patient.small_bowel_nodule_mask)
    assert not np.any(ndimage.binary_dilation(cake, ALL_NEIGHBOURS) & (bowel | _nodules(patient)))
    assert np.array_equal(patient.nodule_mask, _nodules(patient) | cake)


def test_nodules_are_small_and_on_a_minority_of_slices(small_patients, tiny_patients):
  for patient in small_patients + tiny_patients:
    if not patient.label_p:
      continue
    slices_with_nodule = _nodules(patient).any(axis=(1, 2))
    assert slices_with_nodule.mean() < 0.5
    components, count = ndimage.label(_nodules(patient), ALL_NEIGHBOURS)
    for component_slice in ndimage.find_objects(components):
      assert 1 <= component_slice[0].stop - component_slice[0].start <= 5
    # Nodules sit inside the abdomen, never in the chest or thighs.
    nodule_z = patient.z_mm[patient.nodule_mask.any(axis=(1, 2))]
    low, high = patient.abdomen_z_range_mm
    assert nodule_z.min() > low and nodule_z.max() < high


def test_omental_cake_follows_the_pci(tiny_patients, small_patients):
  """High-burden patients (drawn burden, the PCI the generator aims at, >= OMENTAL_CAKE_MIN_PCI) have one anterior
  cake; others and negatives none."""
  cakes = 0
  for patient in tiny_patients + small_patients:
    cake = _cake(patient)
    assert patient.covariates["omental_cake"] == bool(cake.any())
    assert bool(cake.any()) == (patient.covariates["burden"] >= OMENTAL_CAKE_MIN_PCI), patient.patient_id
    if not cake.any():
      continue
    cakes += 1
    assert ndimage.label(cake, ALL_NEIGHBOURS)[1] == 1
    # Anterior: the cake lies in front of (smaller y than) the body's centre on every slice it covers.
    rows = np.nonzero(cake)[1]
    body_rows = np.nonzero(patient.hu[cake.any(axis=(1, 2))] > -500)[1]
    assert np.median(rows) < np.median(body_rows)
    # Inside the abdomen, never in the chest or thighs.
    cake_z = patient.z_mm[cake.any(axis=(1, 2))]
    low, high = patient.abdomen_z_range_mm
    assert cake_z.min() > low and cake_z.max() < high
  assert cakes >= 2  # the fixtures hold high-burden patients, so the checks above ran


def test_small_nodule_diameter(small_patients):
  """At 3 mm pixels, each nodule is 10-25 mm wide in its largest slice."""
  for patient in small_patients:
    components, _ = ndimage.label(_nodules(patient), ALL_NEIGHBOURS)
    for label, box in enumerate(ndimage.find_objects(components), start=1):
      widest_area_mm2 = max(np.sum(components[k] == label) for k in range(box[0].start, box[0].stop)) * 9.0
      equivalent_diameter = 2 * np.sqrt(widest_area_mm2 / np.pi)
      assert 7.0 <= equivalent_diameter <= 28.0


def test_tissue_hu_is_plausible(small_patients):
  expected = {
      "air": (-1024, -950), "subcutaneous_fat": (-130, -70), "intraperitoneal_fat": (-120, -60),
      "muscle": (25, 75), "liver": (40, 85), "spleen": (45, 95), "kidney_cortex": (110, 200),
      "aorta": (140, 230), "bone_cortex": (350, 1100), "bone_marrow": (120, 300), "lung": (-920, -700),
      "gas": (-1000, -750), "small_bowel_wall": (45, 85), "small_bowel_lumen": (0, 35), "urine": (-10, 20),
      "ascites": (-5, 30), "nodule": (40, 95), "omental_cake": (35, 80), "table_core": (-400, -150),
  }
  for patient in small_patients:
    for tissue, (low, high) in expected.items():
      # Interior voxels only: edges are blurred into their neighbours (partial volume).
      mask = ndimage.binary_erosion(patient.tissue_labels == TISSUE[tissue], np.ones((1, 3, 3), bool))
      if mask.sum() < 5:
        continue
      median = float(np.median(patient.hu[mask]))
      assert low <= median <= high, (patient.patient_id, tissue, median)
    fat = patient.hu[patient.tissue_labels == TISSUE["intraperitoneal_fat"]]
    if patient.label_p:
      assert np.mean(patient.hu[patient.nodule_mask]) - np.median(fat) > 100  # visible against fat


def test_anatomy_by_level(small_patients):
  """Thighs below the pelvic floor; liver up to the diaphragm dome top, lung bases wrapping down around it; table
  never touching the body."""
  for patient in small_patients:
    labels = patient.tissue_labels
    low, high = patient.abdomen_z_range_mm
    table = np.isin(labels, [TISSUE["table_shell"], TISSUE["table_core"]])
    body = (labels != TISSUE["air"]) & ~table
    lung_slices = (labels == TISSUE["lung"]).any(axis=(1, 2))
    upper_organ_slices = np.isin(labels, [TISSUE["liver"], TISSUE["spleen"]]).any(axis=(1, 2))
    # The top of the range is the top of the domes: the highest slice with liver or spleen is just below it.
    assert patient.z_mm[np.flatnonzero(upper_organ_slices).max()] == pytest.approx(high - SMALL.slice_spacing_mm / 2)
    # Lungs fill every slice above the domes and reach down around the liver (posterior recesses), 3 slices or
    # more below the dome top, in every slice up from their lowest.
    lowest_lung = np.flatnonzero(lung_slices).min()
    assert lung_slices[lowest_lung:].all()
    assert high - patient.z_mm[lowest_lung] >= 3 * SMALL.slice_spacing_mm
    posterior = patient.tissue_labels[lowest_lung] == TISSUE["lung"]
    assert posterior.any() and np.mean(np.nonzero(posterior)[0]) > labels.shape[1] / 2  # behind (y grows backward)
    for index, z in enumerate(patient.z_mm):
      _, parts = ndimage.label(body[index])
      assert parts == (2 if z < low else 1), (patient.patient_id, index)
      # A body crop by the largest component above -500 HU excludes the table.
      components, _ = ndimage.label(patient.hu[index] > -500)
      sizes = np.bincount(components.ravel())
      sizes[0] = 0
      largest = components == np.argmax(sizes)
      assert not np.any(largest & table[index])
    abdomen = (patient.z_mm > low) & (patient.z_mm < high)
    for tissue in ("liver", "kidney_cortex", "small_bowel_wall", "bladder_wall", "colon_wall", "aorta"):
      assert (labels[abdomen] == TISSUE[tissue]).any(), tissue


def test_ascites_and_sites_vary(tiny_patients):
  grades = {patient.covariates["ascites"] for patient in tiny_patients}
  assert len(grades) >= 2
  for patient in tiny_patients:
    has_fluid = bool(np.any(patient.tissue_labels == TISSUE["ascites"]))
    assert has_fluid == (patient.covariates["ascites"] != "none")


# ---------------------------------------------------------------------------------------------------------------
# DICOM


def _volume(hu_shape=(6, 32, 32), seed=0):
  rng = np.random.default_rng(seed)
  hu = rng.integers(-1024, 2000, size=hu_shape).astype(np.float32)
  z_mm = -100.0 + 2.5 * np.arange(hu_shape[0])
  return hu, z_mm


def _read_series(paths):
  """Axial slices sorted by z, as (datasets, HU volume)."""
  datasets = [pydicom.dcmread(path) for path in paths]
  datasets = [ds for ds in datasets if "LOCALIZER" not in list(ds.ImageType)]
  datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
  volume = np.stack([pydicom.pixels.apply_rescale(ds.pixel_array, ds) for ds in datasets])
  return datasets, volume


@pytest.mark.parametrize("signed, intercept", [(True, None), (True, -1024.0), (False, None)])
def test_dicom_round_trip(tmp_path, signed, intercept):
  hu, z_mm = _volume()
  hu[0, 0, 0], hu[1, 0, 0] = -1024.0, 3071.0
  paths = phantom.write_ct_series(str(tmp_path), hu + 0.3, z_mm, 1.5, key=11, signed_pixels=signed,
                                  rescale_intercept=intercept, slice_thickness_mm=2.5)
  assert len(paths) == 6 and all(os.path.isfile(path) for path in paths)
  datasets, volume = _read_series(paths)
  assert np.max(np.abs(volume - hu)) <= 1.0
  np.testing.assert_array_equal(volume, hu)  # integer HU come back exactly
  first = datasets[0]
  assert first.file_meta.MediaStorageSOPClassUID == dicom_uid.CTImageStorage
  assert first.Modality == "CT" and list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
  assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
  assert [float(v) for v in first.PixelSpacing] == [1.5, 1.5] and float(first.SliceThickness) == 2.5
  assert first.PixelRepresentation == (1 if signed else 0)
  assert float(first.RescaleIntercept) == (intercept if intercept is not None else (0.0 if signed else -1024.0))
  assert first.RescaleType == "HU" and first.PhotometricInterpretation == "MONOCHROME2"
  assert first.BitsAllocated == 16 and first.HighBit == first.BitsStored - 1
  np.testing.assert_allclose([float(ds.ImagePositionPatient[2]) for ds in datasets], z_mm)
  assert float(first.ImagePositionPatient[0]) == pytest.approx(-15.5 * 1.5)
  assert len({ds.SOPInstanceUID for ds in datasets}) == 6
  assert len({(ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}) == 1


def test_unsigned_pixels_reject_hu_below_range(tmp_path):
  hu, z_mm = _volume()
  hu[0, 0, 0] = -1100.0
  with pytest.raises(ValueError, match="does not fit"):
    phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=1, signed_pixels=False)


def test_file_bytes_are_deterministic(tmp_path):
  hu, z_mm = _volume()
  first = phantom.write_ct_series(str(tmp_path / "a"), hu, z_mm, 1.5, key=5, include_localizer=True)
  second = phantom.write_ct_series(str(tmp_path / "b"), hu, z_mm, 1.5, key=5, include_localizer=True)
  assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
  for a, b in zip(first, second):
    assert open(a, "rb").read() == open(b, "rb").read()
  other = phantom.write_ct_series(str(tmp_path / "c"), hu, z_mm, 1.5, key=6)
  assert pydicom.dcmread(other[0]).StudyInstanceUID != pydicom.dcmread(first[0]).StudyInstanceUID


def test_reversed_instance_numbers_and_shuffled_names(tmp_path):
  hu, z_mm = _volume((10, 16, 16))
  paths = phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=2, reverse_instance_numbers=True)
  names = [os.path.basename(path) for path in paths]  # returned in z order
  assert all(re.fullmatch(r"[0-9a-f]{16}(\.dcm)?", name) for name in names)
  assert sorted(names) != names
  instance_numbers = [pydicom.dcmread(path).InstanceNumber for path in paths]
  assert instance_numbers == list(range(10, 0, -1))
  plain = phantom.write_ct_series(str(tmp_path / "plain"), hu, z_mm, 1.5, key=2, shuffle_file_names=False)
  assert [os.path.basename(path) for path in plain] == [f"CT{index:04d}.dcm" for index in range(10)]
  assert [pydicom.dcmread(path).InstanceNumber for path in plain] == list(range(1, 11))


def test_localizer(tmp_path):
  hu, z_mm = _volume()
  paths = phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=3, include_localizer=True)
  assert len(paths) == 7
  axial, localizer = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[-1])
  assert list(localizer.ImageType) == ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  assert [float(v) for v in localizer.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]
  assert localizer.SeriesInstanceUID != axial.SeriesInstanceUID
  assert localizer.StudyInstanceUID == axial.StudyInstanceUID
  assert localizer.SeriesNumber != axial.SeriesNumber
  assert localizer.pixel_array.shape[1] == 32 and localizer.pixel_array.shape[0] != 32


def test_pixel_padding_outside_circular_field_of_view(tmp_path):
  hu = np.full((2, 20, 20), 40.0, np.float32)
  paths = phantom.write_ct_series(str(tmp_path), hu, np.array([0.0, 5.0]), 2.0, key=4, pixel_padding_value=-2000)
  dataset = pydicom.dcmread(paths[0])
  assert dataset.PixelPaddingValue == -2000
  raw = dataset.pixel_array
  assert raw[0, 0] == -2000 and raw[10, 10] == 40 and raw[0, 10] == 40
  with pytest.raises(ValueError, match="pixel_padding_value"):
    phantom.write_ct_series(str(tmp_path), hu, np.array([0.0, 5.0]), 2.0, key=4, signed_pixels=False,
                            pixel_padding_value=-2000)


def test_phi_canaries_are_in_headers(tmp_path):
  hu, z_mm = _volume((2, 8, 8))
  paths = phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=9, include_localizer=True, patient_index=7)
  content = b"".join(open(path, "rb").read() for path in paths)
  for canary in phantom.PHI_CANARIES:
    assert canary.encode() in content, canary
    assert "ZZCANARY" in canary or canary.isdigit()
  dataset = pydicom.dcmread(paths[0])
  assert dataset.PatientID == "ZZCANARY-ID-0007" and str(dataset.PatientName).startswith("ZZCANARY^PATIENT")


@pytest.mark.parametrize("transfer_syntax", [dicom_uid.RLELossless, dicom_uid.JPEG2000Lossless,
                                             dicom_uid.ImplicitVRLittleEndian,
                                             dicom_uid.DeflatedExplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [True, False])
def test_lossless_transfer_syntaxes_round_trip(tmp_path, transfer_syntax, signed):
  hu, z_mm = _volume((2, 64, 64))  # openjpeg's default 6 resolution levels need images >= 32 px
  paths = phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=8, signed_pixels=signed,
                                  transfer_syntax_uid=transfer_syntax)
  datasets, volume = _read_series(paths)
  assert datasets[0].file_meta.TransferSyntaxUID == transfer_syntax
  np.testing.assert_array_equal(volume, hu)


def test_custom_orientation_and_description(tmp_path):
  hu, z_mm = _volume((2, 8, 8))
  tilt = (1.0, 0.0, 0.0, 0.0, 0.9659, 0.2588)  # 15 degree gantry tilt
  paths = phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=1, image_orientation_patient=tilt,
                                  series_description="CHEST", series_number=7)
  dataset = pydicom.dcmread(paths[0])
  assert [float(v) for v in dataset.ImageOrientationPatient] == list(tilt)
  assert dataset.SeriesDescription == "CHEST" and dataset.SeriesNumber == 7
  with pytest.raises(ValueError, match="6 numbers"):
    phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=1, image_orientation_patient=(1, 0, 0))
  with pytest.raises(ValueError, match="NaN"):
    phantom.write_ct_series(str(tmp_path), hu * np.nan, z_mm, 1.5, key=1)


def test_unsupported_transfer_syntax_is_a_clear_error(tmp_path):
  hu, z_mm = _volume((1, 8, 8))
  with pytest.raises(ValueError, match="cannot encode"):
    phantom.write_ct_series(str(tmp_path), hu, z_mm, 1.5, key=1, transfer_syntax_uid=dicom_uid.JPEGLosslessSV1)


# ---------------------------------------------------------------------------------------------------------------
# Demo cohort


def test_cohort_layout_and_manifest(tiny_cohort):
  config, folder, manifest_path = tiny_cohort
  assert manifest_path == os.path.join(folder, "manifest.csv")
  with open(manifest_path, newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert tuple(rows[0].keys()) == phantom.MANIFEST_COLUMNS
  assert [row["patient_id"] for row in rows] == [f"demo-{index:03d}" for index in range(4)]
  cohort = json.load(open(os.path.join(folder, "cohort.json")))
  assert cohort["config_hash"] == phantom.config_hash(config)
  assert cohort["config"]["num_patients"] == 4
  for row, entry in zip(rows, cohort["patients"]):
    patient = phantom.generate_patient(config, int(row["patient_id"][-3:]))
    assert row["dicom_dir"] == f"dicom/{row['patient_id']}"
    assert (int(row["label_p"]), int(row["label_sb"])) == (patient.label_p, patient.label_sb)
    assert (row["ascites"], int(row["pci"]), row["site"]) == (
        patient.covariates["ascites"], patient.covariates["pci"], patient.covariates["site"])
    files = os.listdir(os.path.join(folder, row["dicom_dir"]))
    expected = patient.z_mm.size + int(entry["quirks"]["include_localizer"]) + int(entry["quirks"]["stray_text_file"])
    assert len(files) == expected
    masks = np.load(os.path.join(folder, "masks", f"{row['patient_id']}.npz"))
    np.testing.assert_array_equal(masks["nodule_mask"], patient.nodule_mask)
    np.testing.assert_array_equal(masks["small_bowel_nodule_mask"], patient.small_bowel_nodule_mask)
    np.testing.assert_array_equal(masks["z_mm"], patient.z_mm)
    assert tuple(masks["abdomen_z_range_mm"]) == patient.abdomen_z_range_mm
    np.testing.assert_array_equal(masks["pci_region_map"], patient.pci_region_map)
    assert [int(row[column]) for column in phantom.PCI_COLUMNS] == list(patient.pci_scores)
    assert int(row["pci"]) == sum(patient.pci_scores)
    paths = [os.path.join(folder, row["dicom_dir"], name) for name in files if name != "notes.txt"]
    _, volume = _read_series(paths)
    padding = entry["quirks"]["pixel_padding_value"]
    inside = volume > (padding + entry["quirks"]["rescale_intercept"] if padding is not None else -np.inf)
    np.testing.assert_array_equal(volume[inside], patient.hu[inside])
  assert not [name for name in os.listdir(os.path.dirname(folder)) if name.startswith(".tmp-")]


def test_cohort_outputs_other_than_dicom_hold_no_phi(tiny_cohort):
  _, folder, _ = tiny_cohort
  for name in ["manifest.csv", "cohort.json"] + [os.path.join("masks", n) for n in os.listdir(folder + "/masks")]:
    content = open(os.path.join(folder, name), "rb").read()
    assert not any(canary.encode() in content for canary in phantom.PHI_CANARIES), name


def test_cohort_cache_hit_does_not_rewrite(tiny_cohort):
  config, folder, manifest_path = tiny_cohort
  stamps = {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in ("manifest.csv", "cohort.json")}
  start = time.monotonic()
  assert phantom.write_demo_cohort(folder, config) == manifest_path
  assert time.monotonic() - start < 0.5
  assert stamps == {name: os.stat(os.path.join(folder, name)).st_mtime_ns for name in stamps}


def test_cohort_is_byte_identical_and_regenerates_when_incomplete(tmp_path):
  config = phantom.PhantomConfig(num_patients=2, seed=2, matrix_size=64, pixel_spacing_mm=6.0)
  first, second = str(tmp_path / "first"), str(tmp_path / "second")
  phantom.write_demo_cohort(first, config)
  phantom.write_demo_cohort(second, config)
  def contents(root):
    return {os.path.relpath(os.path.join(base, name), root): open(os.path.join(base, name), "rb").read()
            for base, _, names in os.walk(root) for name in names}
  assert contents(first) == contents(second)
  # A missing file makes the cohort incomplete: it is rebuilt, not trusted.
  victim = json.load(open(os.path.join(first, "cohort.json")))["patients"][1]["files"][0]
  os.remove(os.path.join(first, victim))
  phantom.write_demo_cohort(first, config)
  assert contents(first) == contents(second)


def test_interrupted_cohort_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
  config = phantom.PhantomConfig(num_patients=2, seed=2, matrix_size=64, pixel_spacing_mm=6.0)
  original = phantom_cohort._write_patient  # pylint: disable=protected-access

  def fail_on_second(folder, config, patient_index):
    if patient_index == 1:
      raise KeyboardInterrupt
    return original(folder, config, patient_index)

  monkeypatch.setattr(phantom_cohort, "_write_patient", fail_on_second)
  with pytest.raises(KeyboardInterrupt):
    phantom.write_demo_cohort(str(tmp_path / "demo"), config)
  assert os.listdir(tmp_path) == []


def test_demo_cohort_dir_uses_cache_variable(monkeypatch, tmp_path):
  monkeypatch.setenv("PDX_TF_CACHE", str(tmp_path))
  folder = phantom.demo_cohort_dir()
  assert folder == str(tmp_path / f"demo-cohort-{phantom.config_hash(phantom.PhantomConfig())[:12]}")
  assert phantom.demo_cohort_dir(TINY) != folder


def test_demo_quirks_vary_across_the_default_cohort():
  config = phantom.PhantomConfig()
  quirks = [phantom.dicom_quirks(config, index, "A" if index % 2 else "B") for index in range(40)]
  for name in ("signed_pixels", "reverse_instance_numbers", "include_localizer", "stray_text_file"):
    assert {q[name] for q in quirks} == {True, False}, name
  assert {q["transfer_syntax"] for q in quirks} >= {"ExplicitVRLittleEndian", "RLELossless"}
  assert any(q["pixel_padding_value"] is not None for q in quirks)
  plain = phantom.dicom_quirks(phantom.PhantomConfig(scanner_quirks=False), 0, "B")
  assert plain["signed_pixels"] and not plain["include_localizer"]
