"""Builders for tiny synthetic CT DICOM files and series, written with pydicom directly.

Every header carries canary values (CANARY_STRINGS) in the places PHI lives, so tests can assert that no
message ever repeats them.
"""

from __future__ import annotations

import copy
import os
from typing import Any, Sequence

import numpy as np
import pydicom
import pydicom.uid
from pydicom.dataset import FileMetaDataset

CANARY = "ZZCANARY"
CANARY_DATE = "19010203"
# One study UID per process; series UIDs come from new_uid() and are checked per test.
STUDY_UID = pydicom.uid.generate_uid()
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def new_uid() -> str:
  return pydicom.uid.generate_uid()


def canary_strings(*uids: str) -> list[str]:
  """Strings that must never appear in a message: canaries, the canary date and the given UIDs."""
  return [CANARY, CANARY.lower(), CANARY_DATE, STUDY_UID, *uids]


def make_slice(
    pixels: np.ndarray,
    *,
    series_uid: str,
    position_mm: Sequence[float],
    orientation: Sequence[float] = AXIAL,
    series_number: int | None = 2,
    instance_number: int = 1,
    pixel_spacing_mm: Sequence[float] = (0.75, 0.8),
    slice_thickness_mm: float | None = 5.0,
    rescale_slope: float = 1.0,
    rescale_intercept: float = -1024.0,
    bits_stored: int | None = None,
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    sop_class_uid: str = pydicom.uid.CTImageStorage,
    modality: str = "CT",
    transfer_syntax_uid: str = pydicom.uid.ExplicitVRLittleEndian,
    extra: dict[str, Any] | None = None,
) -> pydicom.Dataset:
  """One single-frame CT image; `pixels` is int16 (signed) or uint16 (unsigned) stored values."""
  pixels = np.asarray(pixels)
  if pixels.dtype not in (np.int16, np.uint16):
    raise ValueError(f"pixels must be int16 or uint16, got {pixels.dtype}")
  dataset = pydicom.Dataset()
  dataset.file_meta = FileMetaDataset()
  dataset.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
  dataset.file_meta.MediaStorageSOPClassUID = sop_class_uid
  dataset.SOPInstanceUID = new_uid()
  dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
  dataset.SOPClassUID = sop_class_uid
  dataset.Modality = modality
  dataset.PatientName = f"{CANARY}^NAME"
  dataset.PatientID = f"{CANARY}-ID"
  dataset.PatientBirthDate = CANARY_DATE
  dataset.StudyDate = CANARY_DATE
  dataset.AccessionNumber = f"{CANARY}ACC"
  dataset.InstitutionName = f"{CANARY} HOSPITAL"
  dataset.ReferringPhysicianName = f"{CANARY}^DOCTOR"
  dataset.StudyInstanceUID = STUDY_UID
  dataset.SeriesInstanceUID = series_uid
  if series_number is not None:
    dataset.SeriesNumber = series_number
  dataset.InstanceNumber = instance_number
  dataset.ImageType = list(image_type)
  dataset.ImageOrientationPatient = [float(value) for value in orientation]
  dataset.ImagePositionPatient = [float(value) for value in position_mm]
  dataset.PixelSpacing = [float(value) for value in pixel_spacing_mm]
  if slice_thickness_mm is not None:
    dataset.SliceThickness = slice_thickness_mm
  dataset.RescaleSlope = rescale_slope
  dataset.RescaleIntercept = rescale_intercept
  dataset.Rows, dataset.Columns = pixels.shape[-2:]
  dataset.SamplesPerPixel = 1
  dataset.PhotometricInterpretation = "MONOCHROME2"
  dataset.BitsAllocated = 16
  dataset.BitsStored = bits_stored or 16
  dataset.HighBit = dataset.BitsStored - 1
  dataset.PixelRepresentation = 1 if pixels.dtype == np.int16 else 0
  for keyword, value in (extra or {}).items():
    setattr(dataset, keyword, value)
  dataset.PixelData = np.ascontiguousarray(pixels).tobytes()
  if transfer_syntax_uid != pydicom.uid.ExplicitVRLittleEndian:
    dataset.compress(transfer_syntax_uid)
  return dataset


def write(dataset: pydicom.Dataset, path: str) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  dataset.save_as(path, enforce_file_format=True)
  return path


def pixel_stack(num_slices: int, rows: int, columns: int, seed: int = 0) -> np.ndarray:
  """Distinct int16 stored values per slice (slice k holds values around 100 * k) so order is checkable."""
  rng = np.random.default_rng(seed)
  noise = rng.integers(0, 50, size=(num_slices, rows, columns))
  return (noise + 100 * np.arange(num_slices)[:, None, None]).astype(np.int16)


def write_series(
    folder: str,
    *,
    num_slices: int = 10,
    rows: int = 32,
    columns: int = 32,
    series_uid: str | None = None,
    z_start_mm: float = -200.0,
    spacing_mm: float = 5.0,
    z_mm: Sequence[float] | None = None,
    subfolder: str = "series",
    name_prefix: str = "IM",
    pixels: np.ndarray | None = None,
    seed: int = 0,
    shuffle_names: bool = True,
    **slice_kwargs: Any,
) -> tuple[str, np.ndarray, np.ndarray]:
  """Writes an axial series; returns (series_uid, stored pixels in z order, z_mm in z order).

  File names are assigned in a shuffled order and InstanceNumber runs head to foot (the reverse of z), so a
  reader that sorts by either gets the volume wrong.
  """
  series_uid = series_uid or new_uid()
  z_values = np.asarray(z_mm if z_mm is not None else z_start_mm + spacing_mm * np.arange(num_slices),
                        dtype=np.float64)
  num_slices = len(z_values)
  pixels = pixel_stack(num_slices, rows, columns, seed) if pixels is None else pixels
  rng = np.random.default_rng(seed + 1)
  file_order = rng.permutation(num_slices) if shuffle_names else np.arange(num_slices)
  for index in range(num_slices):
    dataset = make_slice(pixels[index], series_uid=series_uid, position_mm=(-12.5, -30.0, z_values[index]),
                         instance_number=num_slices - index, **slice_kwargs)
    write(dataset, os.path.join(folder, subfolder, f"{name_prefix}{file_order[index]:04d}.dcm"))
  return series_uid, pixels, z_values


def set_raw_value(dataset: pydicom.Dataset, keyword: str, raw: bytes) -> None:
  """Stores `raw` as the element's bytes, unchecked: how a malformed header field looks on disk."""
  from pydicom.dataelem import RawDataElement  # pylint: disable=import-outside-toplevel
  from pydicom.datadict import dictionary_VR  # pylint: disable=import-outside-toplevel
  from pydicom.tag import Tag  # pylint: disable=import-outside-toplevel

  tag = Tag(keyword)
  raw = raw + b" " if len(raw) % 2 else raw  # DICOM values have even length (padded with a space).
  element = RawDataElement(tag, dictionary_VR(tag), len(raw), raw, 0, False, True)
  dataset._dict[tag] = element  # pylint: disable=protected-access  # Setting it normally would validate it.


def as_axial_ct(source: pydicom.Dataset, *, series_uid: str, position_mm: Sequence[float]) -> pydicom.Dataset:
  """A copy of a real file relabelled as one axial CT slice; pixel data and transfer syntax stay as encoded.

  Rescale is set to the identity and padding removed, so HU equal the stored values.
  """
  dataset = copy.deepcopy(source)
  dataset.SOPClassUID = pydicom.uid.CTImageStorage
  dataset.file_meta.MediaStorageSOPClassUID = pydicom.uid.CTImageStorage
  dataset.SOPInstanceUID = new_uid()
  dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
  dataset.Modality = "CT"
  dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  dataset.SeriesInstanceUID = series_uid
  dataset.SeriesNumber = 2
  dataset.ImageOrientationPatient = list(AXIAL)
  dataset.ImagePositionPatient = [float(value) for value in position_mm]
  if "PixelSpacing" not in dataset:
    dataset.PixelSpacing = [0.75, 0.75]
  dataset.SliceThickness = 5.0
  dataset.RescaleSlope = 1
  dataset.RescaleIntercept = 0
  for keyword in ("PixelPaddingValue", "PixelPaddingRangeLimit", "GantryDetectorTilt"):
    if keyword in dataset:
      delattr(dataset, keyword)
  return dataset
