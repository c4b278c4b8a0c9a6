"""Tests for pdx_tf.data.dicom: HU conversion, slice order, series choice, compressed syntaxes and refusals."""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import sys
import types
import warnings

import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid
import pytest

from pdx_tf.data import dicom
from pdx_tf.errors import DicomError

sys.path.insert(0, os.path.dirname(__file__))
import dicom_fixtures as fx  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture
def folder(tmp_path):
  """A patient folder whose own path holds a canary: messages must never quote it."""
  path = tmp_path / f"{fx.CANARY}_patient"
  path.mkdir()
  return str(path)


def read_error(folder: str, *uids: str, **kwargs) -> str:
  """read_ct_series's DicomError message, checked to be one line and free of PHI and UIDs."""
  with pytest.raises(DicomError) as error:
    dicom.read_ct_series(folder, **kwargs)
  message = str(error.value)
  assert "\n" not in message
  for secret in fx.canary_strings(*uids):
    assert secret not in message, message
  return message


def token_of(folder: str, relative: str) -> str:
  """The expected file token of `relative` (the documented format, computed here independently)."""
  listing = sorted(os.path.relpath(os.path.join(directory, name), folder).replace(os.sep, "/")
                   for directory, _, names in os.walk(folder) for name in names)
  digest = hashlib.sha256(b"pdx-tf file token v1\0" + relative.encode("utf-8")).hexdigest()[:6]
  return f"file#{listing.index(relative):04d}-{digest}"


def real_file(name: str) -> str:
  data = pytest.importorskip("pydicom.data")
  try:
    path = data.get_testdata_file(name)
  except Exception:  # pylint: disable=broad-except  # e.g. not cached and no network.
    path = None
  if path is None:
    pytest.skip(f"{name} is not available from pydicom-data")
  return path


def write_copies(source: str, folder: str, z_mm: list[float]) -> str:
  """A series made of copies of one real file at the given positions; pixel data stays as encoded."""
  series_uid = fx.new_uid()
  for index, z in enumerate(z_mm):
    dataset = pydicom.dcmread(source)
    dataset.SeriesInstanceUID = series_uid
    dataset.SOPInstanceUID = fx.new_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    x, y, _ = dataset.ImagePositionPatient
    dataset.ImagePositionPatient = [x, y, z]
    fx.write(dataset, os.path.join(folder, f"copy{index}.dcm"))
  return series_uid


# ------------------------------------------------------------------------------------------------------
# HU conversion.


def test_signed_pixels_with_slope_intercept_and_padding(folder):
  stored = fx.pixel_stack(8, 16, 16).astype(np.int16) - 300
  stored[:, 0, :] = -2000  # Padding rows outside the reconstruction circle.
  fx.write_series(folder, pixels=stored, num_slices=8, rows=16, columns=16, rescale_slope=2.0,
                  rescale_intercept=-1000.0, extra={"PixelPaddingValue": -2000})
  series = dicom.read_ct_series(folder)
  expected = stored.astype(np.float64) * 2.0 - 1000.0
  expected[:, 0, :] = -1000.0
  np.testing.assert_array_equal(series.hu, expected.astype(np.float32))
  assert series.hu.dtype == np.float32


def test_unsigned_pixels_with_padding_range(folder):
  stored = (fx.pixel_stack(8, 16, 16) + 20).astype(np.uint16)
  stored[:, :, :3] = [[0, 5, 10]]  # Padding range 0..10 (given high to low, as the standard allows).
  fx.write_series(folder, pixels=stored, num_slices=8, rows=16, columns=16, rescale_intercept=-1024.0,
                  extra={"PixelPaddingValue": 10, "PixelPaddingRangeLimit": 0})
  series = dicom.read_ct_series(folder)
  expected = stored.astype(np.float64) - 1024.0
  expected[:, :, :3] = -1000.0
  np.testing.assert_array_equal(series.hu, expected)


@pytest.mark.parametrize("signed", [True, False])
def test_bits_stored_12_ignores_high_bits_and_sign_extends(folder, signed):
  rng = np.random.default_rng(3)
  low, high = (-2048, 2048) if signed else (0, 4096)
  values = rng.integers(low, high, size=(8, 8, 8))
  values[0, 0, :2] = [-2048, 2047] if signed else [0, 4095]
  garbage = rng.integers(0, 16, size=values.shape) << 12  # Overlay bits above BitsStored must be ignored.
  words = ((values & 0xFFF) | garbage).astype(np.uint16)
  stored = words.view(np.int16) if signed else words
  fx.write_series(folder, pixels=stored, num_slices=8, rows=8, columns=8, bits_stored=12)
  series = dicom.read_ct_series(folder)
  np.testing.assert_array_equal(series.hu, values.astype(np.float64) - 1024.0)


# ------------------------------------------------------------------------------------------------------
# Slice order and geometry.


def test_orders_by_position_not_instance_number_or_file_name(folder):
  _, stored, z_mm = fx.write_series(folder, num_slices=10, z_start_mm=-80.0, spacing_mm=2.5)
  series = dicom.read_ct_series(folder)
  np.testing.assert_array_equal(series.z_mm, z_mm)
  np.testing.assert_array_equal(series.hu, stored.astype(np.float32) - 1024.0)
  assert series.pixel_spacing_mm == (0.75, 0.8)
  assert series.slice_thickness_mm == 5.0
  assert series.num_files_skipped == 0
  assert series.warnings == ()


def test_flipped_orientation_still_grows_toward_the_head(folder):
  # Columns running posterior to anterior make the cross product point to the feet; the rows come back flipped
  # into the standard orientation (first row the most anterior).
  _, stored, z_mm = fx.write_series(folder, orientation=(1, 0, 0, 0, -1, 0))
  series = dicom.read_ct_series(folder)
  np.testing.assert_array_equal(series.z_mm, z_mm)
  np.testing.assert_array_equal(series.hu, stored[:, ::-1, :].astype(np.float32) - 1024.0)


@pytest.mark.parametrize("orientation, expected", [
    ((1, 0, 0, 0, 1, 0), lambda a: a),
    ((-1, 0, 0, 0, 1, 0), lambda a: a[:, :, ::-1]),      # columns run toward the patient's right
    ((1, 0, 0, 0, -1, 0), lambda a: a[:, ::-1, :]),      # rows run toward the front
    ((-1, 0, 0, 0, -1, 0), lambda a: a[:, ::-1, ::-1]),  # both (a 180-degree in-plane rotation)
    ((0, 1, 0, 1, 0, 0), lambda a: a.transpose(0, 2, 1)),  # stored transposed
    ((0, -1, 0, 1, 0, 0), lambda a: a.transpose(0, 2, 1)[:, ::-1, :]),  # a 90-degree in-plane rotation
])
def test_axis_aligned_orientations_come_back_standard(folder, orientation, expected):
  """Each stored pixel (r, c) lies at row direction * c + column direction * r in the patient frame; the reader
  must return the array whose rows grow toward +y and columns toward +x (written out per case above)."""
  rows, columns = 6, 8  # not square: a transposed result has the other shape
  series_uid = fx.new_uid()
  stored = fx.pixel_stack(4, rows, columns)
  normal = np.cross(orientation[:3], orientation[3:])
  for index in range(4):
    fx.write(fx.make_slice(stored[index], series_uid=series_uid, position_mm=list(4.0 * index * normal),
                           orientation=orientation, instance_number=index + 1, pixel_spacing_mm=(0.7, 0.9)),
             os.path.join(folder, f"s{index}.dcm"))
  series = dicom.read_ct_series(folder, min_slices=2)
  order = np.argsort(4.0 * np.arange(4) * normal[2])
  want = expected(stored[order].astype(np.float32) - 1024.0)
  np.testing.assert_array_equal(series.hu, want)
  # Rows of the result advance along the stored column direction unless transposed.
  transposed = abs(orientation[1]) > abs(orientation[0])
  assert series.pixel_spacing_mm == ((0.9, 0.7) if transposed else (0.7, 0.9))


def test_in_plane_rotated_series_is_refused(folder):
  angle = np.radians(30.0)
  orientation = (np.cos(angle), np.sin(angle), 0.0, -np.sin(angle), np.cos(angle), 0.0)
  fx.write_series(folder, orientation=orientation)
  with pytest.raises(DicomError) as raised:
    dicom.read_ct_series(folder)
  message = str(raised.value)
  assert "rotated 30.0 degrees in the axial plane" in message and "\n" not in message


def test_slightly_oblique_series_uses_projection_on_normal(folder):
  angle = np.radians(5.0)  # Within the axial tolerance; the stack advances along its own normal.
  orientation = (1.0, 0.0, 0.0, 0.0, np.cos(angle), np.sin(angle))
  normal = np.array([0.0, -np.sin(angle), np.cos(angle)])
  series_uid = fx.new_uid()
  stored = fx.pixel_stack(8, 8, 8)
  for index in [3, 0, 7, 5, 1, 6, 2, 4]:
    position = np.array([-10.0, 20.0, 30.0]) + 4.0 * index * normal
    fx.write(fx.make_slice(stored[index], series_uid=series_uid, position_mm=position,
                           orientation=orientation, instance_number=index),
             os.path.join(folder, f"s{index}.dcm"))
  series = dicom.read_ct_series(folder)
  expected_z = np.array([-10.0, 20.0, 30.0]) @ normal + 4.0 * np.arange(8)
  np.testing.assert_allclose(series.z_mm, expected_z, atol=1e-6)
  np.testing.assert_array_equal(series.hu, stored.astype(np.float32) - 1024.0)


def test_uneven_spacing_is_a_warning(folder):
  z_mm = [0.0, 5.0, 10.0, 15.0, 25.0, 30.0, 35.0, 40.0, 45.0]
  fx.write_series(folder, z_mm=z_mm)
  series = dicom.read_ct_series(folder)
  assert series.warnings == (
      "uneven slice spacing: gap of 10.0 mm between slices 3 and 4 (median spacing 5.0 mm; slices may be "
      "missing)",)
  np.testing.assert_array_equal(series.z_mm, z_mm)


# ------------------------------------------------------------------------------------------------------
# Series choice.


def build_cluttered_folder(folder: str) -> dict[str, str]:
  """The main 10-slice series among everything a real export holds. Returns series UIDs by role."""
  uids = {}
  uids["main"], _, _ = fx.write_series(folder, subfolder="a/main", series_number=3)
  uids["short"], _, _ = fx.write_series(folder, num_slices=6, subfolder="a/short", series_number=1)
  # Same count as main but 1 mm: loses on thickness. Another 5 mm copy with a higher SeriesNumber loses too.
  uids["thin"], _, _ = fx.write_series(folder, subfolder="b/thin", slice_thickness_mm=1.0, series_number=2)
  uids["later"], _, _ = fx.write_series(folder, subfolder="b/later", series_number=9)
  # More slices, but not usable: derived secondary (with the trailing space some scanners write), sagittal,
  # multi-frame SOP class, other modality.
  uids["derived"], _, _ = fx.write_series(folder, num_slices=12, subfolder="c/derived",
                                          image_type=("DERIVED ", "SECONDARY", "AXIAL"))
  uids["sagittal"], _, _ = fx.write_series(folder, num_slices=12, subfolder="c/sagittal",
                                           orientation=(0, 1, 0, 0, 0, -1))
  uids["enhanced"], _, _ = fx.write_series(folder, num_slices=12, subfolder="c/enhanced",
                                           sop_class_uid=pydicom.uid.EnhancedCTImageStorage)
  uids["pet"], _, _ = fx.write_series(folder, num_slices=12, subfolder="c/pet", modality="PT")
  # Two-image localizer series, one-image axial "key image", secondary capture, dose report, junk files.
  uids["localizer"], _, _ = fx.write_series(folder, num_slices=2, subfolder="d", name_prefix="scout",
                                            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
  uids["single"], _, _ = fx.write_series(folder, num_slices=1, subfolder="d", name_prefix="key")
  fx.write(fx.make_slice(np.zeros((8, 8), np.int16), series_uid=fx.new_uid(), position_mm=(0, 0, 0),
                         sop_class_uid=pydicom.uid.SecondaryCaptureImageStorage),
           os.path.join(folder, "d", "capture.dcm"))
  report = fx.make_slice(np.zeros((8, 8), np.int16), series_uid=fx.new_uid(), position_mm=(0, 0, 0),
                         sop_class_uid=pydicom.uid.XRayRadiationDoseSRStorage, modality="SR")
  del report.PixelData
  fx.write(report, os.path.join(folder, "d", "dose.dcm"))
  directory = pydicom.Dataset()
  directory.file_meta = pydicom.dataset.FileMetaDataset()
  directory.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
  directory.file_meta.MediaStorageSOPInstanceUID = fx.new_uid()
  directory.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  directory.DirectoryRecordSequence = []
  directory.save_as(os.path.join(folder, "DICOMDIR"), enforce_file_format=True)
  with open(os.path.join(folder, "notes.txt"), "w") as handle:
    handle.write("not a DICOM file\n")
  return uids


def test_chooses_thickness_then_coverage_then_series_number(folder):
  uids = build_cluttered_folder(folder)
  series = dicom.read_ct_series(folder)
  assert series.series_uid == uids["main"]
  assert series.hu.shape == (10, 32, 32)
  total_files = sum(len(names) for _, _, names in os.walk(folder))
  assert series.num_files_skipped == total_files - 10
  summaries = dicom.find_ct_series(folder)
  assert [summary.series_uid for summary in summaries] == [uids[role] for role in
                                                         ("main", "later", "thin", "short")]
  assert summaries[0].num_slices == 10 and summaries[0].first_file == token_of(folder, "a/main/IM0000.dcm")
  assert summaries[0].transfer_syntax == "Explicit VR Little Endian"
  assert uids["main"] not in repr(series) and uids["main"] not in repr(summaries)


def test_series_uid_override_wins(folder):
  uids = build_cluttered_folder(folder)
  series = dicom.read_ct_series(folder, uids["short"], min_slices=5)
  assert series.series_uid == uids["short"]
  assert series.hu.shape == (6, 32, 32)


def test_series_uid_not_found(folder):
  uids = build_cluttered_folder(folder)
  missing = fx.new_uid()
  message = read_error(folder, missing, *uids.values(), series_uid=missing)
  assert message.startswith("the series_uid given in the manifest was not found; 4 candidate series")


def test_series_uid_of_unusable_series(folder):
  uids = build_cluttered_folder(folder)
  message = read_error(folder, *uids.values(), series_uid=uids["localizer"])
  assert "not usable (2 localizer)" in message


def test_too_few_slices(folder):
  uid, _, _ = fx.write_series(folder, num_slices=5, shuffle_names=False)
  message = read_error(folder, uid)
  assert message.startswith(f"{token_of(folder, 'series/IM0000.dcm')}: the chosen series has only 5 slices "
                            "(min_slices=8)")
  assert dicom.read_ct_series(folder, min_slices=5).hu.shape[0] == 5


# ------------------------------------------------------------------------------------------------------
# Compressed transfer syntaxes.


def test_rle_round_trip(folder):
  _, stored, _ = fx.write_series(folder, num_slices=8, transfer_syntax_uid=pydicom.uid.RLELossless)
  assert pydicom.dcmread(os.path.join(folder, "series", "IM0000.dcm")).file_meta.TransferSyntaxUID == (
      pydicom.uid.RLELossless)
  np.testing.assert_array_equal(dicom.read_ct_series(folder).hu, stored.astype(np.float32) - 1024.0)


def test_jpeg2000_lossless_round_trip(folder):
  _, stored, _ = fx.write_series(folder, num_slices=8, transfer_syntax_uid=pydicom.uid.JPEG2000Lossless)
  np.testing.assert_array_equal(dicom.read_ct_series(folder).hu, stored.astype(np.float32) - 1024.0)


def test_real_jpeg2000_ct_matches_its_uncompressed_twin(folder):
  compressed, uncompressed = real_file("693_J2KR.dcm"), real_file("693_UNCR.dcm")
  write_copies(compressed, folder, [47.0, 52.0])
  series = dicom.read_ct_series(folder, min_slices=2)
  twin = pydicom.dcmread(uncompressed)
  raw = np.frombuffer(twin.PixelData, dtype="<i2").reshape(twin.Rows, twin.Columns).astype(np.float64)
  expected = np.where(raw == -2000, -1000.0, raw * float(twin.RescaleSlope) + float(twin.RescaleIntercept))
  assert (raw == -2000).any()  # The file really exercises PixelPaddingValue.
  np.testing.assert_array_equal(series.hu[0], expected)
  np.testing.assert_array_equal(series.hu[1], expected)


@pytest.mark.filterwarnings("ignore::UserWarning")  # The file's UIDs are invalid; pydicom says so.
def test_real_jpeg_lossless_ct_decodes(folder):
  source = real_file("bad_sequence.dcm")  # JPEG Lossless SV1 CT with a malformed private sequence.
  write_copies(source, folder, [10.0, 15.0])
  series = dicom.read_ct_series(folder, min_slices=2)
  assert series.hu.shape == (2, 512, 512)
  # A lossless decode of this body CT: air near -1000 HU, soft tissue and bone, equal slices.
  assert -1100 <= series.hu.min() <= -900 and series.hu.max() > 500
  np.testing.assert_array_equal(series.hu[0], series.hu[1])


def test_pydicom_warnings_do_not_leak_header_values(folder, caplog):
  invalid_uid = f"1.2.{fx.CANARY}.3"  # pydicom warns "Invalid value for VR UI: '<value>'" on access.
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    fx.write_series(folder, series_uid=invalid_uid)
  caplog.set_level(logging.DEBUG)
  caplog.clear()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    series = dicom.read_ct_series(folder)
  assert series.series_uid == invalid_uid
  assert not caught
  assert not [record for record in caplog.records if fx.CANARY in record.getMessage()]


def test_undecodable_transfer_syntax(folder):
  uid, _, _ = fx.write_series(folder, num_slices=8, shuffle_names=False)
  path = os.path.join(folder, "series", "IM0003.dcm")
  dataset = pydicom.dcmread(path)
  dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no decoder exists.
  dataset.PixelData = pydicom.encaps.encapsulate([b"\x00" * 64])
  fx.write(dataset, path)
  message = read_error(folder, uid)
  assert message.startswith(
      f"{token_of(folder, 'series/IM0003.dcm')}: pixel data in 'MPEG2 Main Profile / Main Level' cannot")


def test_missing_decoder_plugin_names_the_package(folder, monkeypatch):
  uid, _, _ = fx.write_series(folder, num_slices=8, transfer_syntax_uid=pydicom.uid.JPEG2000Lossless)
  monkeypatch.setattr(dicom, "_get_decoder", lambda syntax: types.SimpleNamespace(is_available=False))
  message = read_error(folder, uid)
  assert "'JPEG 2000 Image Compression (Lossless Only)' needs a decoder plugin" in message
  assert message.endswith("run `pip install pylibjpeg pylibjpeg-openjpeg` (or `pip install python-gdcm`)")


def test_each_missing_plugin_is_named(folder, monkeypatch):
  """RLE names pylibjpeg-rle; a syntax no pylibjpeg plugin decodes (not in the table) names python-gdcm."""
  uid, _, _ = fx.write_series(folder, num_slices=8, transfer_syntax_uid=pydicom.uid.RLELossless)
  monkeypatch.setattr(dicom, "_get_decoder", lambda syntax: types.SimpleNamespace(is_available=False))
  message = read_error(folder, uid)
  assert "'RLE Lossless' needs a decoder plugin" in message
  assert message.endswith("`pip install pylibjpeg pylibjpeg-rle`")
  monkeypatch.setattr(dicom, "_PLUGIN_FOR_SYNTAX", {})
  assert read_error(folder, uid).endswith("run `pip install python-gdcm`")


# ------------------------------------------------------------------------------------------------------
# Refusals.


def test_missing_folder(folder):
  message = read_error(os.path.join(folder, "absent"))
  assert message.startswith("the DICOM folder does not exist")


def test_folder_without_dicom_files(folder):
  with open(os.path.join(folder, "readme.txt"), "w") as handle:
    handle.write("hello")
  assert read_error(folder).startswith("no DICOM files in the folder (1 file(s) checked")
  shutil.rmtree(folder)
  os.mkdir(folder)
  assert read_error(folder).startswith("no DICOM files in the folder (0 file(s) checked")


def test_no_usable_axial_series_lists_skip_reasons(folder):
  uid, _, _ = fx.write_series(folder, orientation=(0, 1, 0, 0, 0, -1))
  fx.write_series(folder, num_slices=2, subfolder="scout", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
  message = read_error(folder, uid)
  assert message == ("no usable axial CT series in the folder (12 file(s) skipped: 10 non-axial, "
                     "2 localizer); export the axial CT series")


def test_multi_frame_only(folder):
  uid, _, _ = fx.write_series(folder, num_slices=3, shuffle_names=False, extra={"NumberOfFrames": 1},
                              sop_class_uid=pydicom.uid.EnhancedCTImageStorage)
  message = read_error(folder, uid)
  assert message.startswith(
      f"{token_of(folder, 'series/IM0000.dcm')}: multi-frame (enhanced) CT files are not supported")


def test_truncated_file_of_chosen_series(folder):
  uid, _, _ = fx.write_series(folder, shuffle_names=False)
  path = os.path.join(folder, "series", "IM0004.dcm")
  with open(path, "rb") as handle:
    data = handle.read()
  with open(path, "wb") as handle:
    handle.write(data[:-500])
  message = read_error(folder, uid)
  assert message == (
      f"{token_of(folder, 'series/IM0004.dcm')}: the file is truncated: its pixel data holds 1548 of the 2048 "
      "bytes that 32x32 pixels of 16 bits need; re-export the series")


def test_unreadable_stray_file_is_skipped_and_warned(folder):
  fx.write_series(folder)
  stray = fx.make_slice(np.zeros((8, 8), np.int16), series_uid=fx.new_uid(), position_mm=(0, 0, 0))
  path = fx.write(stray, os.path.join(folder, "other", "broken.dcm"))
  with open(path, "rb") as handle:
    data = handle.read()
  with open(path, "wb") as handle:
    handle.write(data[:200])  # Preamble and file meta only.
  series = dicom.read_ct_series(folder)
  assert series.num_files_skipped == 1
  assert series.warnings == ("1 DICOM file(s) could not be read and were skipped "
                             f"(first: {token_of(folder, 'other/broken.dcm')}, header incomplete)",)


@pytest.mark.parametrize("change, expected", [
    ({"pixels": np.zeros((16, 32), np.int16)}, "image size 16x32 differs from 32x32 in"),
    ({"pixel_spacing_mm": (0.7, 0.8)}, "pixel spacing differs from"),
    ({"orientation": (1, 0, 0, 0, 0.9998, 0.02)}, "image orientation differs from"),
])
def test_inconsistent_geometry(folder, change, expected):
  uid, _, _ = fx.write_series(folder, shuffle_names=False)
  path = os.path.join(folder, "series", "IM0007.dcm")
  pixels = change.pop("pixels", np.zeros((32, 32), np.int16))
  fx.write(fx.make_slice(pixels, series_uid=uid, position_mm=(-12.5, -30.0, -165.0), **change), path)
  message = read_error(folder, uid)
  assert message.startswith(f"{token_of(folder, 'series/IM0007.dcm')}: {expected} "
                            f"{token_of(folder, 'series/IM0000.dcm')} of the same series")


def test_duplicated_positions(folder):
  uid, _, _ = fx.write_series(folder, z_mm=[0, 5, 10, 15, 15, 20, 25, 30, 35], shuffle_names=False)
  message = read_error(folder, uid)
  assert message.startswith(f"{token_of(folder, 'series/IM0004.dcm')}: same slice position as "
                            f"{token_of(folder, 'series/IM0003.dcm')} (1 duplicated")


def test_gantry_tilt_in_header(folder):
  uid, _, _ = fx.write_series(folder, extra={"GantryDetectorTilt": -12.5}, shuffle_names=False)
  message = read_error(folder, uid)
  assert message == (f"{token_of(folder, 'series/IM0000.dcm')}: gantry tilt of 12.5 degrees is not supported; "
                     "reconstruct axial "
                     "images without tilt")
  assert dicom.find_ct_series(folder)[0].gantry_tilt_degrees == -12.5
  assert read_error(folder, uid, series_uid=uid) == message


def test_gantry_tilt_from_geometry(folder):
  # Tilted image plane (20 degrees: beyond the axial tolerance) while the table moves along z.
  angle = np.radians(20.0)
  orientation = (1.0, 0.0, 0.0, 0.0, np.cos(angle), np.sin(angle))
  uid = fx.new_uid()
  for index in range(8):
    fx.write(fx.make_slice(np.zeros((8, 8), np.int16), series_uid=uid, position_mm=(0, 0, 5.0 * index),
                           orientation=orientation), os.path.join(folder, f"t{index}.dcm"))
  # GantryDetectorTilt is absent, so the image plane alone marks the series as non-axial.
  assert read_error(folder, uid).startswith(
      "no usable axial CT series in the folder (8 file(s) skipped: 8 non-axial)")
  # A 4-degree tilt is within the axial tolerance: the stack geometry gives it away.
  angle = np.radians(4.0)
  orientation = (1.0, 0.0, 0.0, 0.0, np.cos(angle), np.sin(angle))
  for index in range(8):
    fx.write(fx.make_slice(np.zeros((8, 8), np.int16), series_uid=uid, position_mm=(0, 0, 5.0 * index),
                           orientation=orientation), os.path.join(folder, f"t{index}.dcm"))
  assert read_error(folder, uid) == (f"{token_of(folder, 't0.dcm')}: gantry tilt of 4.0 degrees is not "
                                     "supported; reconstruct axial images without tilt")


def test_tilted_series_is_passed_over_for_an_untilted_one(folder):
  untilted, _, _ = fx.write_series(folder, num_slices=8, subfolder="plain")
  fx.write_series(folder, num_slices=12, subfolder="tilted", extra={"GantryDetectorTilt": 15.0})
  assert dicom.read_ct_series(folder).series_uid == untilted


def test_uid_like_file_names_are_withheld_as_tokens(folder):
  uid, _, _ = fx.write_series(folder, num_slices=5, shuffle_names=False, subfolder="1.2.840.113619.2.55.3",
                              name_prefix="1.3.12.2.1107.5.1.4.")
  message = read_error(folder, uid)
  assert message.startswith(f"{token_of(folder, '1.2.840.113619.2.55.3/1.3.12.2.1107.5.1.4.0000.dcm')}: the "
                            "chosen series has only 5 slices")
  assert "113619" not in message and "1107" not in message


def test_files_of_the_chosen_series_left_out_are_warned(folder):
  uid, _, _ = fx.write_series(folder, z_mm=[0, 5, 10, 15, 20, 25, 30, 35, 40])
  scout = fx.make_slice(np.zeros((32, 32), np.int16), series_uid=uid, position_mm=(0, 0, 0),
                        orientation=(0, 1, 0, 0, 0, -1), image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
  fx.write(scout, os.path.join(folder, "series", "scout.dcm"))
  no_position = fx.make_slice(np.zeros((32, 32), np.int16), series_uid=uid, position_mm=(0, 0, 45))
  del no_position.ImagePositionPatient
  fx.write(no_position, os.path.join(folder, "series", "noposition.dcm"))
  series = dicom.read_ct_series(folder)
  assert series.hu.shape[0] == 9 and series.num_files_skipped == 2
  assert series.warnings == (
      "2 file(s) of the chosen series were left out (1 localizer, 1 missing geometry)",)


@pytest.mark.slow
def test_reads_a_tf_gfile_url(folder):
  tf = pytest.importorskip("tensorflow")
  _, stored, _ = fx.write_series(folder, subfolder="a/b")
  url = f"ram://dicom_test_{os.getpid()}"
  for directory, _, names in os.walk(folder):
    for name in names:
      target = f"{url}/{os.path.relpath(os.path.join(directory, name), folder)}"
      tf.io.gfile.makedirs(os.path.dirname(target))
      tf.io.gfile.copy(os.path.join(directory, name), target)
  series = dicom.read_ct_series(url)
  np.testing.assert_array_equal(series.hu, stored.astype(np.float32) - 1024.0)
  assert dicom.find_ct_series(url)[0].first_file == token_of(folder, "a/b/IM0000.dcm")
  assert read_error(f"{url}/absent").startswith("the DICOM folder does not exist")


# ------------------------------------------------------------------------------------------------------
# Every transfer syntax pydicom decodes, checked against pydicom's own full decode of the same file.


def write_real_series(source: str, folder: str, num_slices: int = 3) -> list[str]:
  """Copies of one real file as an axial CT series (pixel data stays as encoded); returns their paths."""
  dataset = pydicom.dcmread(source)
  series_uid = fx.new_uid()
  return [fx.write(fx.as_axial_ct(dataset, series_uid=series_uid, position_mm=(0.0, 0.0, 5.0 * index)),
                   os.path.join(folder, "series", f"IM{index:04d}.dcm")) for index in range(num_slices)]


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name, syntax", [
    ("image_dfl.dcm", pydicom.uid.DeflatedExplicitVRLittleEndian),
    ("MR_small_RLE.dcm", pydicom.uid.RLELossless),
    ("MR_small_jpeg_ls_lossless.dcm", pydicom.uid.JPEGLSLossless),
    ("693_J2KI.dcm", pydicom.uid.JPEG2000),
    ("JPGExtended.dcm", pydicom.uid.JPEGExtended12Bit),
])
def test_real_compressed_files_decode_like_a_full_dcmread(folder, name, syntax):
  source = real_file(name)
  paths = write_real_series(source, folder)
  assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax  # Really that syntax on disk.
  expected = np.stack([pydicom.dcmread(path).pixel_array for path in paths]).astype(np.float32)
  # The copies carry the original's pixels (the full decode of the real file itself).
  np.testing.assert_array_equal(expected[0], pydicom.dcmread(source).pixel_array.reshape(expected.shape[1:]))
  series = dicom.read_ct_series(folder, min_slices=2)
  assert expected.std() > 0
  np.testing.assert_array_equal(series.hu, expected)


def test_jpeg_baseline_grayscale_decodes_like_a_full_dcmread(folder):
  image = pytest.importorskip("PIL.Image")
  ct = pydicom.dcmread(real_file("CT_small.dcm"))
  # A real CT slice, windowed to 8 bits and JPEG-compressed (baseline, process 1) by libjpeg through Pillow.
  eight_bit = np.clip((ct.pixel_array.astype(np.float64) + 160.0) / 400.0 * 255.0, 0, 255).astype(np.uint8)
  buffer = io.BytesIO()
  image.fromarray(eight_bit, mode="L").save(buffer, format="JPEG", quality=90)
  series_uid = fx.new_uid()
  paths = []
  for index in range(2):
    dataset = fx.as_axial_ct(ct, series_uid=series_uid, position_mm=(0.0, 0.0, 5.0 * index))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    dataset.PixelData = pydicom.encaps.encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    paths.append(fx.write(dataset, os.path.join(folder, f"j{index}.dcm")))
  expected = np.stack([pydicom.dcmread(path).pixel_array for path in paths]).astype(np.float32)
  assert np.abs(expected[0] - eight_bit).mean() < 3  # Lossy, but the same picture.
  np.testing.assert_array_equal(dicom.read_ct_series(folder, min_slices=2).hu, expected)


def test_truncated_compressed_file_is_called_truncated(folder):
  uid, _, _ = fx.write_series(folder, num_slices=8, transfer_syntax_uid=pydicom.uid.RLELossless,
                              shuffle_names=False)
  path = os.path.join(folder, "series", "IM0002.dcm")
  with open(path, "rb") as handle:
    data = handle.read()
  with open(path, "wb") as handle:
    handle.write(data[:-300])
  assert read_error(folder, uid) == (
      f"{token_of(folder, 'series/IM0002.dcm')}: the file holds no complete pixel data (it is truncated, or "
      "was exported without pixels); re-export the series")


def test_truncated_deflated_file_is_called_truncated(folder):
  # pydicom inflates a deflated file whole, so a truncated one fails already in the header pass: it is left out
  # with a warning that says why, and the gap it leaves is warned too.
  uid = fx.new_uid()
  stored = fx.pixel_stack(9, 32, 32)
  for index in range(9):
    dataset = fx.make_slice(stored[index], series_uid=uid, position_mm=(0.0, 0.0, 5.0 * index))
    dataset.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    fx.write(dataset, os.path.join(folder, f"d{index}.dcm"))
  with open(os.path.join(folder, "d5.dcm"), "rb") as handle:
    data = handle.read()
  with open(os.path.join(folder, "d5.dcm"), "wb") as handle:
    handle.write(data[:-40])
  series = dicom.read_ct_series(folder)
  np.testing.assert_array_equal(series.hu, np.delete(stored, 5, axis=0).astype(np.float32) - 1024.0)
  assert series.warnings[1] == (
      f"1 DICOM file(s) could not be read and were skipped (first: {token_of(folder, 'd5.dcm')}, truncated)")
  assert series.warnings[0].startswith("uneven slice spacing: gap of 10.0 mm")


def test_corrupt_compressed_pixel_data_is_called_corrupt(folder):
  uid, _, _ = fx.write_series(folder, num_slices=8, transfer_syntax_uid=pydicom.uid.JPEG2000Lossless,
                              shuffle_names=False)
  path = os.path.join(folder, "series", "IM0006.dcm")
  dataset = pydicom.dcmread(path)
  garbage = np.random.default_rng(0).integers(0, 256, size=600, dtype=np.uint8).tobytes()
  dataset.PixelData = pydicom.encaps.encapsulate([b"\xff\x4f\xff\x51" + garbage])  # J2K markers, then noise.
  fx.write(dataset, path)
  message = read_error(folder, uid)
  assert message.startswith(f"{token_of(folder, 'series/IM0006.dcm')}: pixel data in 'JPEG 2000 Image "
                            "Compression (Lossless Only)' cannot be decoded (")
  assert "the file is corrupt; re-export the series or decode it with another plugin" in message


# ------------------------------------------------------------------------------------------------------
# The standard-thickness series.


def write_thin_and_standard(folder: str) -> dict[str, str]:
  """A 1.6 mm series of 129 slices and a 4.8 mm series of 43 over the same 0-205 mm (tiny images)."""
  uids = {}
  uids["thin"], _, _ = fx.write_series(folder, z_mm=1.6 * np.arange(129), rows=4, columns=4, subfolder="thin",
                                       slice_thickness_mm=1.6, series_number=2, shuffle_names=False)
  uids["standard"], _, _ = fx.write_series(folder, z_mm=4.8 * np.arange(43), rows=4, columns=4,
                                           subfolder="standard", slice_thickness_mm=4.8, series_number=3,
                                           shuffle_names=False)
  return uids


def test_standard_thickness_series_is_chosen_by_default(folder):
  uids = write_thin_and_standard(folder)
  series = dicom.read_ct_series(folder)
  assert series.series_uid == uids["standard"] and series.hu.shape == (43, 4, 4)
  assert series.choice.to_json() == {
      "chosen_by": "automatic", "slice_thickness_mm": 4.8, "num_slices": 43,
      "slice_spacing_mm": pytest.approx(4.8), "z_extent_mm": pytest.approx(4.8 * 42),
      "preferred_slice_thickness_mm": 5.0, "num_candidate_series": 2}
  assert uids["standard"] not in repr(series.choice.to_json())


def test_thin_series_is_chosen_when_asked_for(folder):
  uids = write_thin_and_standard(folder)
  series = dicom.read_ct_series(folder, slice_thickness_mm=1.5)
  assert series.series_uid == uids["thin"] and series.hu.shape[0] == 129
  assert series.choice.slice_thickness_mm == 1.6 and series.choice.slice_spacing_mm == pytest.approx(1.6)
  assert [s.series_uid for s in dicom.find_ct_series(folder, slice_thickness_mm=1.5)] == [uids["thin"],
                                                                                        uids["standard"]]


def test_manifest_series_uid_beats_the_standard_thickness(folder):
  uids = write_thin_and_standard(folder)
  series = dicom.read_ct_series(folder, uids["thin"])
  assert series.series_uid == uids["thin"] and series.choice.chosen_by == "series_uid"


def test_same_thickness_longer_coverage_wins_over_series_number(folder):
  short, _, _ = fx.write_series(folder, num_slices=10, rows=4, columns=4, subfolder="short", series_number=1)
  long, _, _ = fx.write_series(folder, num_slices=14, rows=4, columns=4, subfolder="long", series_number=5)
  assert dicom.read_ct_series(folder).series_uid == long
  assert [s.series_uid for s in dicom.find_ct_series(folder)] == [long, short]


def test_partial_standard_series_loses_to_a_thin_one_that_covers_the_abdomen(folder):
  # A 5 mm reconstruction of 40 mm (e.g. the liver dome only) does not cover the abdomen; the 1 mm one does.
  thin, _, _ = fx.write_series(folder, z_mm=np.arange(201.0), rows=4, columns=4, subfolder="thin",
                               slice_thickness_mm=1.0, shuffle_names=False)
  fx.write_series(folder, num_slices=9, rows=4, columns=4, subfolder="partial", z_start_mm=100.0)
  series = dicom.read_ct_series(folder)
  assert series.series_uid == thin and series.choice.slice_thickness_mm == 1.0


def test_slice_thickness_must_be_positive(folder):
  with pytest.raises(ValueError, match="slice_thickness_mm must be positive"):
    dicom.read_ct_series(folder, slice_thickness_mm=0.0)


# ------------------------------------------------------------------------------------------------------
# Malformed numeric header fields are refused, never read with a default.


@pytest.mark.parametrize("keyword, raw, defect", [
    ("RescaleSlope", b"abc", "is not a number"),
    ("RescaleSlope", b"NaN", "is not a finite number"),
    ("RescaleIntercept", b"-1024\\1", "has 2 value(s), expected 1"),
    ("RescaleIntercept", b"x1024", "is not a number"),
    ("PixelSpacing", b"0.75", "has 1 value(s), expected 2"),
    ("PixelSpacing", b"0.75\\abc", "is not a number"),
    ("PixelSpacing", b"0.75\\-0.8", "is not positive"),
    ("SliceThickness", b"five", "is not a number"),
    ("SliceThickness", b"inf", "is not a finite number"),
    ("ImagePositionPatient", b"-12.5\\-30", "has 2 value(s), expected 3"),
    ("ImagePositionPatient", b"-12.5\\-30\\NaN", "is not a finite number"),
    ("ImagePositionPatient", b"-12.5\\y\\-185", "is not a number"),
])
def test_malformed_numeric_field_refuses_the_series(folder, keyword, raw, defect):
  uid, stored, z_mm = fx.write_series(folder, num_slices=8, shuffle_names=False)
  path = os.path.join(folder, "series", "IM0003.dcm")
  dataset = fx.make_slice(stored[3], series_uid=uid, position_mm=(-12.5, -30.0, z_mm[3]))
  fx.set_raw_value(dataset, keyword, raw)
  fx.write(dataset, path)
  message = read_error(folder, uid)
  assert message.startswith(f"{token_of(folder, 'series/IM0003.dcm')}: {keyword} {defect}, so the image "), message
  assert "abc" not in message and "five" not in message  # The value itself is never quoted.
  assert read_error(folder, uid, series_uid=uid) == message  # A manifest series_uid does not bypass it.


def test_malformed_field_in_another_series_does_not_stop_the_chosen_one(folder):
  chosen, stored, _ = fx.write_series(folder, num_slices=8, subfolder="standard")
  thin, _, _ = fx.write_series(folder, num_slices=8, subfolder="thin", slice_thickness_mm=1.0,
                               shuffle_names=False)
  dataset = pydicom.dcmread(os.path.join(folder, "thin", "IM0002.dcm"))
  fx.set_raw_value(dataset, "RescaleSlope", b"abc")
  fx.write(dataset, os.path.join(folder, "thin", "IM0002.dcm"))
  series = dicom.read_ct_series(folder)
  assert series.series_uid == chosen
  np.testing.assert_array_equal(series.hu, stored.astype(np.float32) - 1024.0)
  assert read_error(folder, chosen, thin, series_uid=thin).startswith(
      f"{token_of(folder, 'thin/IM0002.dcm')}: RescaleSlope is not a number")


@pytest.mark.parametrize("stored_orientation", ["mirrored", "upside_down", "transposed"])
def test_phantom_series_in_any_stored_orientation_reads_as_the_standard_one(tmp_path, stored_orientation):
  """A phantom patient written mirrored (ImageOrientationPatient -1\\0\\0\\0\\1\\0, pixels mirrored left-right) or
  otherwise re-oriented reads back as exactly the array of the standard series, which is the generator's HU with
  the patient's left on the right of the image (the liver, on the patient's right, in the left columns)."""
  from pdx_tf import phantom  # pylint: disable=import-outside-toplevel
  config = phantom.PhantomConfig(num_patients=1, matrix_size=64, pixel_spacing_mm=6.0)
  patient = phantom.generate_patient(config, 0)
  standard_dir, other_dir = str(tmp_path / "standard"), str(tmp_path / "other")
  phantom.write_ct_series(standard_dir, patient.hu, patient.z_mm, 6.0, key=7)
  paths = phantom.write_ct_series(other_dir, patient.hu, patient.z_mm, 6.0, key=7,
                                  stored_orientation=stored_orientation)
  stored = pydicom.dcmread(paths[0])
  assert [float(v) for v in stored.ImageOrientationPatient] == list(
      phantom.STORED_ORIENTATIONS[stored_orientation][0])
  assert not np.array_equal(stored.pixel_array, pydicom.dcmread(
      phantom.write_ct_series(str(tmp_path / "again"), patient.hu, patient.z_mm, 6.0, key=7)[0]).pixel_array)
  standard = dicom.read_ct_series(standard_dir)
  other = dicom.read_ct_series(other_dir)
  np.testing.assert_array_equal(standard.hu, patient.hu)
  np.testing.assert_array_equal(other.hu, standard.hu)
  np.testing.assert_array_equal(other.z_mm, standard.z_mm)
  liver = patient.tissue_labels == phantom.cohort.anatomy_lib.TISSUE["liver"]
  assert liver[..., :32].sum() > 5 * liver[..., 32:].sum()  # the patient's right is the image's left
