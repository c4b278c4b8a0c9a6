"""Reads one patient's axial CT series from a folder of DICOM files into Hounsfield units.

The folder is walked once and every file's header is read without its pixels. Files that are not part of a
usable axial CT series are skipped and counted: non-DICOM files, DICOMDIR, objects without images (dose
reports, structured reports, presentation states), secondary captures and screen saves, localizers,
multi-frame objects, other modalities and non-axial (sagittal, coronal, oblique) images. The remaining files
are grouped by series, one series is chosen, and only its pixels are decoded.

Messages never quote a header value (names, IDs, dates, UIDs, institution) nor any part of a path inside the
study: PACS exports name folders and files after the patient (`DOE_JANE_19650312/20240101_CT/IM0001`). A file
is named by a token, `file#0007-3fa9c1`: its position in the study's sorted file listing and the first 6 hex
digits of sha256(FILE_TOKEN_KEY + its path relative to the study, "/"-separated). Callers prefix the manifest's
`patient_id`. With `show_paths=True` the real relative path of every token that a warning or error mentions is
printed to stderr (the console) only; it never enters a message, a warning or a returned field.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import os
import re
import sys
import warnings as warnings_module
import zlib
from typing import Any, BinaryIO, Iterator, Sequence

import numpy as np
import pydicom
import pydicom.errors
import pydicom.pixels
import pydicom.uid

from pdx_tf.contracts import DEFAULT_MIN_SLICES
from pdx_tf.errors import DicomError

# Images whose slice normal is within this angle of the patient z axis count as axial.
AXIAL_TOLERANCE_DEGREES = 10.0
# A stack whose slices advance at more than this angle to their own normal was acquired with gantry tilt.
STACK_TILT_TOLERANCE_DEGREES = 0.5
# Nonzero GantryDetectorTilt below this is treated as a rounding artefact ("-0.0", "0.001").
HEADER_TILT_TOLERANCE_DEGREES = 0.01
# The standard axial reconstruction a 2D slice method is built on; the automatic choice prefers the nearest.
DEFAULT_SLICE_THICKNESS_MM = 5.0
# A series "covers the abdomen" for the automatic choice when its z extent is at least this fraction of the
# longest series' (a partial reconstruction, e.g. of the liver only, is chosen only if nothing else is).
MIN_COVERAGE_FRACTION = 0.5
# Fixed (public) key of the file tokens: a token maps back to its file only with the study folder at hand.
FILE_TOKEN_KEY = b"pdx-tf file token v1\0"
# A file token as it appears in messages (for `show_paths`).
FILE_TOKEN_PATTERN = re.compile(r"file#\d{4,}-[0-9a-f]{6}")
# A gap larger than this multiple of the median slice spacing means missing slices: warn, don't refuse.
UNEVEN_SPACING_FACTOR = 1.5
# Slices closer than this along the normal are the same position imaged twice.
DUPLICATE_POSITION_TOLERANCE_MM = 0.01
# Rows and columns count as aligned with the patient's axes when the row direction's in-plane angle is within this
# of a multiple of 90 degrees; a larger in-plane rotation is refused (the reader only flips and transposes).
IN_PLANE_ROTATION_TOLERANCE_DEGREES = 1.0
# Relative tolerance for pixel spacing and absolute tolerance for orientation cosines within a series.
GEOMETRY_TOLERANCE = 1e-4
# Padding pixels (outside the reconstruction circle) become air.
PADDING_HU = -1000.0

_CT_IMAGE_STORAGE = pydicom.uid.CTImageStorage
_MULTI_FRAME_CT_SOP_CLASSES = frozenset({
    pydicom.uid.EnhancedCTImageStorage,
    pydicom.uid.LegacyConvertedEnhancedCTImageStorage,
})
_SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"

# Skip reasons, used for counts in error messages.
_NOT_DICOM = "not DICOM"
_UNREADABLE = "unreadable DICOM"
_DICOMDIR = "DICOMDIR"
_NOT_CT = "other modality"
_NOT_CT_IMAGE = "not a CT image object"
_SECONDARY = "secondary capture or derived"
_LOCALIZER = "localizer"
_MULTI_FRAME = "multi-frame"
_NOT_GRAYSCALE = "not grayscale"
_MISSING_GEOMETRY = "missing geometry"
_NON_AXIAL = "non-axial"
_SINGLE_IMAGE = "single-image series"
_MALFORMED = "malformed header"

# What to `pip install` for a compressed syntax pydicom cannot decode here: its pylibjpeg plugin, or GDCM.
_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg` (or `pip install python-gdcm`)"
_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg` (or `pip install python-gdcm`)"
_PLUGIN_FOR_SYNTAX = {
    pydicom.uid.JPEGBaseline8Bit: _LIBJPEG,
    pydicom.uid.JPEGExtended12Bit: _LIBJPEG,
    pydicom.uid.JPEGLossless: _LIBJPEG,
    pydicom.uid.JPEGLosslessSV1: _LIBJPEG,
    pydicom.uid.JPEGLSLossless: _LIBJPEG,
    pydicom.uid.JPEGLSNearLossless: _LIBJPEG,
    pydicom.uid.JPEG2000Lossless: _OPENJPEG,
    pydicom.uid.JPEG2000: _OPENJPEG,
    pydicom.uid.HTJ2KLossless: "pylibjpeg pylibjpeg-openjpeg`",
    pydicom.uid.HTJ2KLosslessRPCL: "pylibjpeg pylibjpeg-openjpeg`",
    pydicom.uid.HTJ2K: "pylibjpeg pylibjpeg-openjpeg`",
    pydicom.uid.RLELossless: "pylibjpeg pylibjpeg-rle`",
}
# pydicom's fast pixel reader parses the raw file and cannot inflate these: read them with dcmread.
_FULL_READ_SYNTAXES = frozenset({pydicom.uid.DeflatedExplicitVRLittleEndian})


@dataclasses.dataclass(frozen=True)
class CtSeries:
  """One axial CT series in Hounsfield units, slices ordered along the slice normal.

  Attributes:
    hu: float32 [Z, Y, X] Hounsfield units in the standard axial display orientation whatever the files store:
      row index growing toward the patient's posterior (+y of the DICOM patient frame), column index toward the
      patient's left (+x), as ImageOrientationPatient (1,0,0,0,1,0) stores them; other axis-aligned
      orientations are flipped and/or transposed into it (`canonical_axes`). Padding pixels are -1000 HU.
    z_mm: float64 [Z], strictly increasing: each slice's ImagePositionPatient projected on the slice normal,
      with the normal's sign chosen so that z_mm grows toward the patient's head (for the usual orientation
      (1,0,0,0,1,0) this is the patient z coordinate).
    pixel_spacing_mm: (row spacing, column spacing) in mm of `hu` (swapped from the header when transposed).
    series_uid: SeriesInstanceUID. PHI-ish: use it only to re-read the series; never write it to outputs.
    slice_thickness_mm: the most common SliceThickness of the series, None if absent.
    num_files_skipped: files walked that are not in this series (non-DICOM, non-CT, other series, ...).
    warnings: PHI-free notes about problems that did not prevent reading (uneven spacing, unreadable files);
      files are named by token.
    choice: what was chosen and why, without any UID (for the patient marker).
  """
  hu: np.ndarray
  z_mm: np.ndarray
  pixel_spacing_mm: tuple[float, float]
  series_uid: str = dataclasses.field(repr=False)  # Kept out of repr so logging the object leaks no UID.
  slice_thickness_mm: float | None
  num_files_skipped: int
  warnings: tuple[str, ...]
  choice: SeriesChoice


@dataclasses.dataclass(frozen=True)
class SeriesChoice:
  """Which series `read_ct_series` read, described without identifiers (safe to write to outputs).

  Attributes:
    chosen_by: "series_uid" (the manifest's override) or "automatic".
    slice_thickness_mm: the series' most common SliceThickness, None if absent.
    num_slices: slices read.
    slice_spacing_mm: median distance between neighbouring slices along the normal.
    z_extent_mm: distance from the lowest to the highest slice.
    preferred_slice_thickness_mm: the thickness the automatic choice preferred.
    num_candidate_series: untilted axial CT series found in the study.
  """
  chosen_by: str
  slice_thickness_mm: float | None
  num_slices: int
  slice_spacing_mm: float
  z_extent_mm: float
  preferred_slice_thickness_mm: float
  num_candidate_series: int

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SeriesSummary:
  """A candidate axial CT series, as seen from the headers alone (for listing and debugging).

  Attributes:
    series_uid: SeriesInstanceUID (PHI-ish: show it on a console if you must, never write it to outputs).
    series_number: SeriesNumber, None if absent.
    num_slices: number of single-frame axial CT images in the series.
    slice_thickness_mm: the most common SliceThickness, None if absent.
    slice_spacing_mm: median distance between neighbouring slices along the slice normal.
    z_extent_mm: distance from the lowest to the highest slice along the normal (the series' coverage).
    rows: Rows of the first file.
    columns: Columns of the first file.
    pixel_spacing_mm: (row, column) PixelSpacing of the first file.
    transfer_syntax: name of the first file's transfer syntax (e.g. "JPEG 2000 Image Compression").
    gantry_tilt_degrees: 0.0, or the tilt that makes this series unusable.
    first_file: token (see `file_token`) of the series' first file in path order; never the path.
  """
  series_uid: str = dataclasses.field(repr=False)  # Kept out of repr so logging the object leaks no UID.
  series_number: int | None
  num_slices: int
  slice_thickness_mm: float | None
  slice_spacing_mm: float
  z_extent_mm: float
  rows: int
  columns: int
  pixel_spacing_mm: tuple[float, float]
  transfer_syntax: str
  gantry_tilt_degrees: float
  first_file: str


@dataclasses.dataclass(frozen=True)
class _Header:
  """What the series choice and geometry checks need from one file's header."""
  path: str
  token: str  # The file token: messages name the file by it, never by its path.
  series_uid: str
  series_number: int | None
  rows: int
  columns: int
  pixel_spacing_mm: tuple[float, float]
  orientation: tuple[float, ...]
  position_mm: tuple[float, float, float]
  slice_thickness_mm: float | None
  header_tilt_degrees: float
  transfer_syntax_uid: str
  # Kept from the header pass so the pixel pass reads nothing but pixel data.
  rescale_slope: float
  rescale_intercept: float
  padding_value: int | None
  padding_range_limit: int | None
  bits_allocated: int
  uses_modality_lut: bool


@dataclasses.dataclass
class _Scan:
  """The result of reading every header in a folder."""
  num_files: int
  headers_by_series: dict[str, list[_Header]]
  skip_counts: collections.Counter
  skip_counts_by_series: dict[str, collections.Counter]
  unreadable_files: list[str]  # Tokens, each with why it could not be read.
  multi_frame_files: list[str]  # Tokens.
  malformed_by_series: dict[str, list["_Malformed"]]
  paths_by_token: dict[str, str]  # For show_paths only: printed to the console, never put in a message.


# ---------------------------------------------------------------------------------------------------------
# File access: plain local paths, or any tf.io.gfile filesystem (gs://, ...) when the folder is a URL.


def _is_url(path: str) -> bool:
  return "://" in path


def _walk_files(folder: str) -> list[str]:
  """All files under `folder`, recursively, sorted so the walk order is reproducible."""
  paths = []
  if _is_url(folder):
    import tensorflow as tf  # Imported only for URLs: it is slow to import and local paths don't need it.
    for directory, _, names in tf.io.gfile.walk(folder):
      paths.extend(os.path.join(directory, name) for name in names)
  else:
    for directory, subfolders, names in os.walk(folder):
      subfolders.sort()
      paths.extend(os.path.join(directory, name) for name in names)
  return sorted(paths)


def _folder_exists(folder: str) -> bool:
  if _is_url(folder):
    import tensorflow as tf
    return tf.io.gfile.isdir(folder)
  return os.path.isdir(folder)


def _open(path: str) -> BinaryIO | str:
  """Something pydicom.dcmread accepts: the path itself locally, a GFile for URLs."""
  if _is_url(path):
    import tensorflow as tf
    return tf.io.gfile.GFile(path, "rb")
  return path


class _DropAll(logging.Filter):

  def filter(self, record: logging.LogRecord) -> bool:
    return False


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
  """Silences pydicom's warnings and log records while we read.

  pydicom quotes offending header values in them (e.g. "Invalid value for VR UI: '<the UID>'"), which would
  carry UIDs and names into logs. Problems that matter surface as our own PHI-free warnings or errors.
  """
  logger = logging.getLogger("pydicom")
  drop_all = _DropAll()
  logger.addFilter(drop_all)
  try:
    with warnings_module.catch_warnings():
      warnings_module.simplefilter("ignore")
      yield
  finally:
    logger.removeFilter(drop_all)


def _read(path: str, **kwargs: Any) -> pydicom.Dataset:
  source = _open(path)
  if isinstance(source, str):
    return pydicom.dcmread(source, **kwargs)
  with source:
    return pydicom.dcmread(source, **kwargs)


def _relative_path(folder: str, path: str) -> str:
  """`path` relative to `folder`, "/"-separated (the text a token hashes; never put it in a message)."""
  relative = os.path.relpath(path, folder) if not _is_url(folder) else path[len(folder):].lstrip("/")
  return relative.replace(os.sep, "/")


def file_token(position: int, relative_path: str) -> str:
  """The non-identifying name of a file in messages, e.g. `file#0007-3fa9c1`.

  Args:
    position: the file's index in the study's sorted listing of all files (DICOM or not).
    relative_path: its path relative to the study folder, "/"-separated.

  Returns:
    "file#" + the position (at least 4 digits) + "-" + the first 6 hex digits of
    sha256(FILE_TOKEN_KEY + relative_path). It holds no text of the path; with the study folder at hand
    (`list_file_tokens`) it maps back to its file.
  """
  digest = hashlib.sha256(FILE_TOKEN_KEY + relative_path.encode("utf-8")).hexdigest()[:6]
  return f"file#{position:04d}-{digest}"


def list_file_tokens(folder: str) -> list[tuple[str, str]]:
  """(token, relative path) of every file under `folder`, for a console `--show_paths`; never write it out."""
  return [(file_token(index, _relative_path(folder, path)), _relative_path(folder, path))
          for index, path in enumerate(_walk_files(folder))]


def _print_paths(text: str, paths_by_token: dict[str, str]) -> None:
  """Prints the relative path of each token in `text` to stderr: the console only, never a log or file."""
  for token in dict.fromkeys(FILE_TOKEN_PATTERN.findall(text)):
    if token in paths_by_token:
      print(f"{token} is {paths_by_token[token]}", file=sys.stderr)


# ---------------------------------------------------------------------------------------------------------
# Header pass.


def _int_or_none(value: Any) -> int | None:
  try:
    return int(value)
  except (TypeError, ValueError):
    return None


def _slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
  """Unit normal of the image plane, signed to point toward the head (+z) so z_mm grows head-ward."""
  row = np.asarray(orientation[:3], dtype=np.float64)
  column = np.asarray(orientation[3:], dtype=np.float64)
  normal = np.cross(row, column)
  length = np.linalg.norm(normal)
  if length < 1e-6:
    return normal
  normal /= length
  return -normal if normal[2] < 0 else normal


def canonical_axes(orientation: Sequence[float]) -> tuple[bool, bool, bool] | None:
  """How to bring stored pixels into the standard axial orientation (rows toward +y, columns toward +x).

  Args:
    orientation: ImageOrientationPatient: the row direction (the way the column index grows) then the column
      direction (the way the row index grows), as cosines in the patient frame.

  Returns:
    (transpose, flip_rows, flip_columns), applied in that order to a [Z, rows, columns] stack; None when the
    rows are rotated in the axial plane by more than IN_PLANE_ROTATION_TOLERANCE_DEGREES from the patient axes
    (an oblique in-plane orientation, refused by the reader).
  """
  row = np.asarray(orientation[:3], dtype=np.float64)
  column = np.asarray(orientation[3:], dtype=np.float64)
  angle = math.degrees(math.atan2(row[1], row[0]))
  off_axis = abs(angle - 90.0 * round(angle / 90.0))
  if off_axis > IN_PLANE_ROTATION_TOLERANCE_DEGREES:
    return None
  if abs(row[0]) >= abs(row[1]):  # the column index runs along x: no transpose
    return False, bool(column[1] < 0), bool(row[0] < 0)
  # The column index runs along y: after transposing, rows advance along `row` and columns along `column`.
  return True, bool(row[1] < 0), bool(column[0] < 0)


def _in_plane_rotation_degrees(orientation: Sequence[float]) -> float:
  return math.degrees(math.atan2(orientation[1], orientation[0]))


def _angle_to_z_degrees(normal: np.ndarray) -> float:
  return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def _classify(dataset: pydicom.Dataset) -> str | None:
  """Why this file is not a slice of an axial CT series, or None if it may be one."""
  meta = getattr(dataset, "file_meta", None)
  media_class = str(meta.get("MediaStorageSOPClassUID", "")) if meta is not None else ""
  if media_class == _MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in dataset:
    return _DICOMDIR
  sop_class = str(dataset.get("SOPClassUID", "")) or media_class
  if not sop_class or "SeriesInstanceUID" not in dataset:
    return _UNREADABLE  # Every composite object has these; a header without them is truncated or broken.
  modality = str(dataset.get("Modality", "CT")).upper()
  if modality != "CT":
    return _NOT_CT
  if sop_class.startswith(_SECONDARY_CAPTURE_PREFIX):
    return _SECONDARY
  if sop_class in _MULTI_FRAME_CT_SOP_CLASSES:
    return _MULTI_FRAME
  if sop_class != _CT_IMAGE_STORAGE:
    return _NOT_CT_IMAGE
  image_type = dataset.get("ImageType") or []
  # A single-valued ImageType is a plain string: iterating it would give characters.
  if isinstance(image_type, str):
    image_type = [image_type]
  image_type = [str(value).strip().upper() for value in image_type]  # Some scanners pad with spaces.
  if "LOCALIZER" in image_type:
    return _LOCALIZER
  if "SCREEN SAVE" in image_type or (
      len(image_type) >= 2 and image_type[0] == "DERIVED" and image_type[1] == "SECONDARY"):
    return _SECONDARY
  if (_int_or_none(dataset.get("NumberOfFrames")) or 1) > 1:
    return _MULTI_FRAME
  if (_int_or_none(dataset.get("SamplesPerPixel")) or 1) != 1:
    return _NOT_GRAYSCALE
  return None


def _numbers(dataset: pydicom.Dataset, keyword: str, count: int) -> tuple[float, ...] | str | None:
  """A numeric header field: its `count` finite values, None when absent or empty, else what is wrong with it.

  The defect never quotes the value (a malformed field may hold anything); counts are fine to quote.
  """
  if keyword not in dataset:
    return None
  try:
    value = dataset[keyword].value
  except Exception:  # pylint: disable=broad-except  # pydicom converts on access and may refuse.
    return "cannot be parsed"
  if value is None or (isinstance(value, (str, bytes)) and not value.strip()):
    return None
  # A single value is a str/number (pydicom keeps an invalid DS as its text); several come as a MultiValue.
  values = [value] if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) else list(value)
  if len(values) != count:
    return f"has {len(values)} value(s), expected {count}"
  try:
    floats = tuple(float(item) for item in values)
  except (TypeError, ValueError):
    return "is not a number"
  if not all(math.isfinite(item) for item in floats):
    return "is not a finite number"
  return floats


@dataclasses.dataclass(frozen=True)
class _Malformed:
  """A CT image whose numeric header field is present but unusable: refused, never read with a default."""
  token: str
  field: str
  defect: str

  def error(self) -> DicomError:
    return DicomError(
        f"{self.token}: {self.field} {self.defect}, so the image cannot be placed or converted to HU; fix the "
        "header or re-export the series (or pick another series with series_uid)")


def _header_from_dataset(token: str, path: str, dataset: pydicom.Dataset) -> _Header | _Malformed | str:
  """A _Header, a _Malformed numeric field, or the skip reason for a CT image without geometry or not axial."""
  fields = {keyword: _numbers(dataset, keyword, count) for keyword, count in (
      ("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2), ("SliceThickness", 1),
      ("RescaleSlope", 1), ("RescaleIntercept", 1), ("GantryDetectorTilt", 1))}
  rows = _int_or_none(dataset.get("Rows"))
  columns = _int_or_none(dataset.get("Columns"))
  if (fields["ImageOrientationPatient"] is None or fields["ImagePositionPatient"] is None
      or fields["PixelSpacing"] is None or not rows or not columns):
    return _MISSING_GEOMETRY
  for keyword, value in fields.items():
    if isinstance(value, str):
      return _Malformed(token, keyword, value)
  if min(fields["PixelSpacing"]) <= 0:
    return _Malformed(token, "PixelSpacing", "is not positive")
  thickness = fields["SliceThickness"]
  if thickness is not None and thickness[0] <= 0:
    return _Malformed(token, "SliceThickness", "is not positive")
  orientation = fields["ImageOrientationPatient"]
  normal = _slice_normal(orientation)
  if np.linalg.norm(normal) < 0.5:
    return _Malformed(token, "ImageOrientationPatient", "has parallel row and column directions")
  header_tilt = fields["GantryDetectorTilt"][0] if fields["GantryDetectorTilt"] else 0.0
  # A tilted acquisition keeps its tilted plane, so allow the tilt on top of the axial tolerance here and
  # refuse it later with a clear reason instead of calling it "non-axial".
  allowed = AXIAL_TOLERANCE_DEGREES + (abs(header_tilt) + 1.0
                                       if abs(header_tilt) >= HEADER_TILT_TOLERANCE_DEGREES else 0.0)
  if _angle_to_z_degrees(normal) > allowed:
    return _NON_AXIAL
  meta = getattr(dataset, "file_meta", None)
  slope, intercept, spacing = fields["RescaleSlope"], fields["RescaleIntercept"], fields["PixelSpacing"]
  return _Header(
      path=path,
      token=token,
      series_uid=str(dataset.SeriesInstanceUID),
      series_number=_int_or_none(dataset.get("SeriesNumber")),
      rows=rows,
      columns=columns,
      pixel_spacing_mm=(spacing[0], spacing[1]),
      orientation=orientation,
      position_mm=fields["ImagePositionPatient"],
      slice_thickness_mm=thickness[0] if thickness else None,
      header_tilt_degrees=header_tilt,
      transfer_syntax_uid=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
      # Absent (not malformed) rescale values: identity, as for CT written without them; present ones must parse.
      rescale_slope=slope[0] if slope else 1.0,
      rescale_intercept=intercept[0] if intercept else 0.0,
      padding_value=_int_or_none(dataset.get("PixelPaddingValue")),
      padding_range_limit=_int_or_none(dataset.get("PixelPaddingRangeLimit")),
      bits_allocated=_int_or_none(dataset.get("BitsAllocated")) or 16,
      uses_modality_lut="RescaleSlope" not in dataset and "ModalityLUTSequence" in dataset,
  )


def _scan(folder: str) -> _Scan:
  """Reads every header under `folder` (no pixels) and groups the usable CT images by series."""
  if not _folder_exists(folder):
    raise DicomError("the DICOM folder does not exist or is not a folder; check the path in the manifest")
  paths = _walk_files(folder)
  scan = _Scan(num_files=len(paths), headers_by_series=collections.defaultdict(list),
               skip_counts=collections.Counter(),
               skip_counts_by_series=collections.defaultdict(collections.Counter),
               unreadable_files=[], multi_frame_files=[],
               malformed_by_series=collections.defaultdict(list), paths_by_token={})
  with _quiet_pydicom():
    for index, path in enumerate(paths):
      token = file_token(index, _relative_path(folder, path))
      scan.paths_by_token[token] = _relative_path(folder, path)
      _scan_file(token, path, scan)
  # Single images (a lone scout, a key image) are not a series we can use.
  for series_uid in [uid for uid, headers in scan.headers_by_series.items() if len(headers) == 1]:
    scan.skip_counts[_SINGLE_IMAGE] += 1
    scan.skip_counts_by_series[series_uid][_SINGLE_IMAGE] += 1
    del scan.headers_by_series[series_uid]
  return scan


def _scan_file(token: str, path: str, scan: _Scan) -> None:
  """Reads one header (no pixels) and files it under its series or under a skip reason."""
  try:
    dataset = _read(path, stop_before_pixels=True)
  except pydicom.errors.InvalidDicomError:
    scan.skip_counts[_NOT_DICOM] += 1
    return
  except Exception as error:  # pylint: disable=broad-except  # A broken stray file must not stop the patient.
    scan.skip_counts[_UNREADABLE] += 1
    scan.unreadable_files.append(f"{token}, {_why_unparseable(error)}")
    return
  reason = _classify(dataset)
  series_uid = str(dataset.get("SeriesInstanceUID") or "")
  if reason is None:
    header = _header_from_dataset(token, path, dataset)
    if isinstance(header, _Header):
      scan.headers_by_series[header.series_uid].append(header)
      return
    if isinstance(header, _Malformed):
      scan.malformed_by_series[series_uid].append(header)
      reason = _MALFORMED
    else:
      reason = header
  scan.skip_counts[reason] += 1
  if reason == _UNREADABLE:
    scan.unreadable_files.append(f"{token}, header incomplete")
  if reason == _MULTI_FRAME:
    scan.multi_frame_files.append(token)
  if series_uid:
    scan.skip_counts_by_series[series_uid][reason] += 1


# ---------------------------------------------------------------------------------------------------------
# Series choice and geometry.


def _most_common_thickness(headers: list[_Header]) -> float | None:
  values = [round(h.slice_thickness_mm, 3) for h in headers if h.slice_thickness_mm is not None]
  if not values:
    return None
  return collections.Counter(values).most_common(1)[0][0]


def _stack_tilt_degrees(headers: list[_Header]) -> float:
  """Angle between the slice normal and the direction the stack advances (0 for an untilted stack)."""
  normal = _slice_normal(headers[0].orientation)
  positions = np.asarray([h.position_mm for h in headers], dtype=np.float64)
  along = positions @ normal
  first, last = positions[np.argmin(along)], positions[np.argmax(along)]
  step = last - first
  step_along = float(step @ normal)
  if abs(step_along) < DUPLICATE_POSITION_TOLERANCE_MM:
    return 0.0
  across = float(np.linalg.norm(step - step_along * normal))
  return math.degrees(math.atan2(across, abs(step_along)))


def _series_tilt_degrees(headers: list[_Header]) -> float:
  """GantryDetectorTilt if any slice records one, else the tilt seen in the geometry (0.0 if none)."""
  header_tilts = [h.header_tilt_degrees for h in headers
                  if abs(h.header_tilt_degrees) >= HEADER_TILT_TOLERANCE_DEGREES]
  if header_tilts:
    return header_tilts[0]
  stack_tilt = _stack_tilt_degrees(headers)
  return stack_tilt if stack_tilt > STACK_TILT_TOLERANCE_DEGREES else 0.0


def _z_along_normal(headers: list[_Header]) -> np.ndarray:
  return np.asarray([h.position_mm for h in headers], dtype=np.float64) @ _slice_normal(headers[0].orientation)


def _summarize(series_uid: str, headers: list[_Header]) -> SeriesSummary:
  headers = sorted(headers, key=lambda h: h.path)
  first = headers[0]
  syntax = pydicom.uid.UID(first.transfer_syntax_uid)
  z_mm = np.sort(_z_along_normal(headers))
  return SeriesSummary(
      series_uid=series_uid,
      series_number=first.series_number,
      num_slices=len(headers),
      slice_thickness_mm=_most_common_thickness(headers),
      slice_spacing_mm=float(np.median(np.diff(z_mm))),
      z_extent_mm=float(z_mm[-1] - z_mm[0]),
      rows=first.rows,
      columns=first.columns,
      pixel_spacing_mm=first.pixel_spacing_mm,
      transfer_syntax=_syntax_name(syntax),
      gantry_tilt_degrees=_series_tilt_degrees(headers),
      first_file=first.token,
  )


def _summaries(scan: _Scan, slice_thickness_mm: float, min_slices: int) -> list[SeriesSummary]:
  """The candidate series, best first: the automatic choice is the first untilted one.

  Order: untilted; then those that cover the abdomen (z extent at least MIN_COVERAGE_FRACTION of the longest
  untilted series') with at least `min_slices` slices; among these the slice thickness nearest
  `slice_thickness_mm`, then the longest z extent, then the lowest SeriesNumber, then the first file token.
  """
  summaries = [_summarize(uid, headers) for uid, headers in scan.headers_by_series.items()]
  longest = max((s.z_extent_mm for s in summaries if s.gantry_tilt_degrees == 0.0), default=0.0)

  def key(summary: SeriesSummary) -> tuple:
    partial = summary.z_extent_mm < MIN_COVERAGE_FRACTION * longest or summary.num_slices < min_slices
    # Rounded so that float noise in the header (4.8 vs 4.8000001) does not decide between series.
    thickness_distance = (round(abs(summary.slice_thickness_mm - slice_thickness_mm), 3)
                          if summary.slice_thickness_mm is not None else math.inf)
    series_number = summary.series_number if summary.series_number is not None else math.inf
    return (summary.gantry_tilt_degrees != 0.0, partial, thickness_distance, -round(summary.z_extent_mm, 3),
            series_number, summary.first_file)

  return sorted(summaries, key=key)


def _describe_counts(counts: collections.Counter) -> str:
  ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
  return ", ".join(f"{count} {reason}" for reason, count in ordered)


def _tilt_error(headers: list[_Header], tilt_degrees: float) -> DicomError:
  return DicomError(
      f"{headers[0].token}: gantry tilt of {abs(tilt_degrees):.1f} degrees is not supported; "
      "reconstruct axial images without tilt")


def _check_geometry(headers: list[_Header], min_slices: int) -> None:
  """Refuses a series whose slices do not form one regular axial stack (sizes, spacing, orientation)."""
  first = headers[0]
  for header in headers[1:]:
    if (header.rows, header.columns) != (first.rows, first.columns):
      raise DicomError(
          f"{header.token}: image size {header.rows}x{header.columns} differs from "
          f"{first.rows}x{first.columns} in {first.token} of the same series; "
          "re-export the series or pick another with series_uid")
    if not np.allclose(header.pixel_spacing_mm, first.pixel_spacing_mm, rtol=GEOMETRY_TOLERANCE, atol=0):
      raise DicomError(
          f"{header.token}: pixel spacing differs from {first.token} of the same series; "
          "re-export the series or pick another with series_uid")
    if not np.allclose(header.orientation, first.orientation, rtol=0, atol=GEOMETRY_TOLERANCE):
      raise DicomError(
          f"{header.token}: image orientation differs from {first.token} of the same series; "
          "re-export the series or pick another with series_uid")
  if len(headers) < min_slices:
    raise DicomError(
        f"{first.token}: the chosen series has only {len(headers)} slices (min_slices={min_slices}); "
        "export the complete axial series")
  tilt_degrees = _series_tilt_degrees(headers)
  if tilt_degrees != 0.0:
    raise _tilt_error(headers, tilt_degrees)


def _order_slices(headers: list[_Header]) -> tuple[list[_Header], np.ndarray]:
  """Sorts slices by position along the slice normal (never by InstanceNumber or file name)."""
  normal = _slice_normal(headers[0].orientation)
  z_mm = np.asarray([h.position_mm for h in headers], dtype=np.float64) @ normal
  order = np.argsort(z_mm, kind="stable")
  ordered = [headers[i] for i in order]
  z_mm = z_mm[order]
  gaps = np.diff(z_mm)
  duplicates = np.flatnonzero(gaps < DUPLICATE_POSITION_TOLERANCE_MM)
  if duplicates.size:
    index = int(duplicates[0])
    raise DicomError(
        f"{ordered[index + 1].token}: same slice position as {ordered[index].token} "
        f"({duplicates.size} duplicated position(s) in the series); the series mixes two acquisitions, "
        "re-export it or pick another with series_uid")
  return ordered, z_mm


def _spacing_warnings(z_mm: np.ndarray) -> list[str]:
  gaps = np.diff(z_mm)
  if gaps.size < 2:
    return []
  median_gap = float(np.median(gaps))
  largest = int(np.argmax(gaps))
  if gaps[largest] > UNEVEN_SPACING_FACTOR * median_gap:
    return [f"uneven slice spacing: gap of {gaps[largest]:.1f} mm between slices {largest} and "
            f"{largest + 1} (median spacing {median_gap:.1f} mm; slices may be missing)"]
  return []


# ---------------------------------------------------------------------------------------------------------
# Pixel pass.


def _syntax_name(syntax: pydicom.uid.UID) -> str:
  # Private syntaxes have no name and would otherwise print as their UID.
  return syntax.name if syntax.is_transfer_syntax else "an unrecognised (private) transfer syntax"


def _get_decoder(syntax: pydicom.uid.UID) -> Any:
  """pydicom's decoder for `syntax` (a seam for tests that simulate a missing plugin)."""
  return pydicom.pixels.get_decoder(syntax)


def _check_decodable(header: _Header) -> None:
  """Refuses, before any pixel is read, a transfer syntax that this installation cannot decode."""
  syntax = pydicom.uid.UID(header.transfer_syntax_uid)
  if not syntax:
    raise DicomError(f"{header.token}: the file has no transfer syntax; re-export the series")
  if header.rescale_slope == 0.0:
    raise DicomError(
        f"{header.token}: RescaleSlope is 0, so no HU can be computed; re-export the series")
  if header.uses_modality_lut:
    raise DicomError(
        f"{header.token}: uses a Modality LUT instead of RescaleSlope/RescaleIntercept, which is not "
        "supported; re-export the series with rescale values")
  if not syntax.is_compressed:
    return
  name = _syntax_name(syntax)
  try:
    decoder = _get_decoder(syntax)
  except NotImplementedError:
    raise DicomError(
        f"{header.token}: pixel data in '{name}' cannot be decoded by pydicom; re-export the series "
        "uncompressed (e.g. `gdcmconv --raw` or `dcmdjpeg`)") from None
  if not decoder.is_available:
    plugin = _PLUGIN_FOR_SYNTAX.get(syntax, "python-gdcm`")
    raise DicomError(
        f"{header.token}: pixel data in '{name}' needs a decoder plugin that is not installed; "
        f"run `pip install {plugin}")


def _padding_mask(header: _Header, raw: np.ndarray) -> np.ndarray | None:
  """Pixels equal to PixelPaddingValue (or within the padding range), compared on stored values."""
  padding, limit = header.padding_value, header.padding_range_limit
  if padding is None:
    return None
  if np.issubdtype(raw.dtype, np.signedinteger):
    # With implicit VR the US-or-SS value may come back unsigned; reinterpret it as the signed stored value.
    bits = header.bits_allocated
    wrap = lambda value: value - (1 << bits) if value >= 1 << (bits - 1) else value
    padding = wrap(padding)
    limit = wrap(limit) if limit is not None else None
  if limit is None:
    return raw == padding
  low, high = min(padding, limit), max(padding, limit)
  return (raw >= low) & (raw <= high)


def _fast_pixels(path: str) -> np.ndarray:
  source = _open(path)
  try:
    # Given a path, pydicom reads only the pixel-related elements: the header was converted in the first pass.
    return pydicom.pixels.pixel_array(source)
  finally:
    if not isinstance(source, str):
      source.close()


def _why_unparseable(error: Exception) -> str:
  """"truncated" or "corrupt (<exception type>)" for an error of pydicom.dcmread (never its text: PHI)."""
  if isinstance(error, EOFError) or (isinstance(error, zlib.error) and "truncated" in str(error)):
    return "truncated"
  return f"corrupt ({type(error).__name__})"


def _read_failure(header: _Header, error: Exception) -> DicomError:
  """What is wrong with a file that pydicom cannot parse in full (the header pass read its header)."""
  if _why_unparseable(error) == "truncated":
    return DicomError(f"{header.token}: the file is truncated (it ends inside its data); re-export the series")
  return DicomError(
      f"{header.token}: the file cannot be parsed ({type(error).__name__}) and is corrupt; re-export the series")


def _full_pixels(header: _Header) -> np.ndarray:
  """Pixels through a full `dcmread`, and on failure the reason: truncated, corrupt or not decodable here."""
  syntax = pydicom.uid.UID(header.transfer_syntax_uid)
  try:
    dataset = _read(header.path)
  except Exception as error:  # pylint: disable=broad-except
    raise _read_failure(header, error) from None
  if "PixelData" not in dataset:
    # pydicom drops a pixel data element that the file ends inside of (a header pass never reads it).
    raise DicomError(f"{header.token}: the file holds no complete pixel data (it is truncated, or was exported "
                     "without pixels); re-export the series")
  if not syntax.is_compressed:
    expected = header.rows * header.columns * header.bits_allocated // 8
    actual = len(dataset.PixelData)
    if actual < expected:
      raise DicomError(
          f"{header.token}: the file is truncated: its pixel data holds {actual} of the {expected} bytes that "
          f"{header.rows}x{header.columns} pixels of {header.bits_allocated} bits need; re-export the series")
  try:
    return dataset.pixel_array
  except Exception as error:  # pylint: disable=broad-except
    name = _syntax_name(syntax)
    other = " or decode it with another plugin (`pip install python-gdcm`)" if syntax.is_compressed else ""
    raise DicomError(
        f"{header.token}: pixel data in '{name}' cannot be decoded ({type(error).__name__}): the file is corrupt; "
        f"re-export the series{other}") from None


def _decode_slice(header: _Header, out: np.ndarray) -> None:
  """Reads one file's pixels once and writes its HU into `out` (float32 [Y, X]).

  The fast path reads only the pixel elements; where it fails (deflated files, odd encodings) a full `dcmread`
  decodes the file, and where that fails too the error says what is wrong.
  """
  raw = None
  if pydicom.uid.UID(header.transfer_syntax_uid) not in _FULL_READ_SYNTAXES:
    try:
      raw = _fast_pixels(header.path)
    except Exception:  # pylint: disable=broad-except  # The full read below decides, and explains failures.
      raw = None
  if raw is None:
    raw = _full_pixels(header)
  if raw.shape != out.shape:
    raise DicomError(
        f"{header.token}: decoded pixels have shape {raw.shape}, expected {out.shape} (multi-frame "
        "or inconsistent header); multi-frame files are not supported, export single-frame CT images")
  # Writing into the preallocated volume, cast and rescale fused, avoids float temporaries per slice.
  if header.rescale_slope == 1.0:
    np.add(raw, np.float32(header.rescale_intercept), out=out, dtype=np.float32)
  else:
    np.multiply(raw, np.float32(header.rescale_slope), out=out, dtype=np.float32)
    out += np.float32(header.rescale_intercept)
  mask = _padding_mask(header, raw)
  if mask is not None:
    out[mask] = PADDING_HU


# ---------------------------------------------------------------------------------------------------------
# Public API.


def find_ct_series(folder: str, *, slice_thickness_mm: float = DEFAULT_SLICE_THICKNESS_MM, min_slices: int = DEFAULT_MIN_SLICES,
                   show_paths: bool = False) -> list[SeriesSummary]:
  """Lists the axial CT series under `folder`, best first (the order `read_ct_series` chooses by).

  Only headers are read. Series with gantry tilt are listed last (with `gantry_tilt_degrees` set) because
  `read_ct_series` refuses them.

  Args:
    folder: a local folder (or a tf.io.gfile URL) holding one patient's DICOM files, in any layout.
    slice_thickness_mm: the preferred slice thickness (see `read_ct_series`).
    min_slices: series with fewer slices are listed after those with enough.
    show_paths: print the relative path of each summary's `first_file` token to stderr (console only).

  Returns:
    One SeriesSummary per series of at least two single-frame axial CT images; empty if there is none.

  Raises:
    DicomError: the folder does not exist.
  """
  scan = _scan(folder)
  summaries = _summaries(scan, slice_thickness_mm, min_slices)
  if show_paths:
    _print_paths(" ".join(summary.first_file for summary in summaries), scan.paths_by_token)
  return summaries


def read_ct_series(folder: str, series_uid: str | None = None, *, min_slices: int = DEFAULT_MIN_SLICES,
                   slice_thickness_mm: float = DEFAULT_SLICE_THICKNESS_MM, show_paths: bool = False) -> CtSeries:
  """Reads one axial CT series from a folder of DICOM files into a Hounsfield-unit volume.

  Series choice: if `series_uid` is given, that series. Otherwise, among the untilted single-frame axial CT
  series that cover the abdomen (at least `min_slices` slices and a z extent of at least MIN_COVERAGE_FRACTION
  of the longest series'; if none does, all series), the one whose slice thickness is nearest
  `slice_thickness_mm`, then the longest z extent, then the lowest SeriesNumber (then the first file token,
  for determinism). Clinical exports usually hold a thin and a standard reconstruction of the same range; the
  standard one is what a 2D slice method is built on, at a third of the records.

  Slices are ordered by ImagePositionPatient projected on the slice normal (see `CtSeries.z_mm`), never by
  InstanceNumber or file name. Pixels come back in the standard axial orientation (`CtSeries.hu`) whatever
  axis-aligned ImageOrientationPatient the files use, so left and right are the patient's. HU = stored value *
  RescaleSlope + RescaleIntercept, except that pixels matching PixelPaddingValue (or lying in the
  PixelPaddingRangeLimit range) on the stored values become -1000 HU. Only the chosen series' pixels are read,
  each file once; every transfer syntax pydicom decodes is
  read (deflated files through a full `dcmread`).

  Args:
    folder: a local folder (or a tf.io.gfile URL) holding one patient's DICOM files, in any layout.
    series_uid: the SeriesInstanceUID to read instead of the automatic choice.
    min_slices: refuse series with fewer slices than this (at least 2).
    slice_thickness_mm: the preferred slice thickness of the automatic choice (positive).
    show_paths: print the relative path of every file token in the warnings or the error to stderr. For local
      debugging: the console only, never a message, log record or returned field.

  Returns:
    The CtSeries. Uneven slice spacing and unreadable stray files are reported in `warnings`; files are named
    by token (`file_token`), never by path.

  Raises:
    DicomError: with a one-line, PHI-free reason naming the file token, when the folder is missing or holds no
      usable axial CT series, `series_uid` is not found, the series has too few slices, inconsistent
      geometry, rows rotated in the axial plane (not along the patient's axes), duplicated positions, gantry
      tilt or a malformed numeric header field (RescaleSlope, RescaleIntercept, PixelSpacing, SliceThickness,
      ImagePositionPatient, ...), is multi-frame, or a file of
      it is truncated, corrupt or in a transfer syntax that cannot be decoded here.
    ValueError: min_slices < 2 or slice_thickness_mm <= 0.
  """
  if min_slices < 2:
    raise ValueError(f"min_slices must be at least 2, got {min_slices}")
  if not slice_thickness_mm > 0:
    raise ValueError(f"slice_thickness_mm must be positive, got {slice_thickness_mm}")
  scan = _scan(folder)
  try:
    series = _read_scanned(scan, series_uid, min_slices, slice_thickness_mm)
  except DicomError as error:
    if show_paths:
      _print_paths(str(error), scan.paths_by_token)
    raise
  if show_paths:
    _print_paths(" ".join(series.warnings), scan.paths_by_token)
  return series


def _malformed_error(scan: _Scan, series_uid: str) -> DicomError:
  return min(scan.malformed_by_series[series_uid], key=lambda malformed: malformed.token).error()


def _read_scanned(scan: _Scan, series_uid: str | None, min_slices: int, slice_thickness_mm: float) -> CtSeries:
  """`read_ct_series` after the header pass."""
  summaries = _summaries(scan, slice_thickness_mm, min_slices)
  if scan.num_files == 0 or scan.skip_counts[_NOT_DICOM] == scan.num_files:
    raise DicomError(
        f"no DICOM files in the folder ({scan.num_files} file(s) checked; DICOM files need the 128-byte "
        "preamble and 'DICM' prefix); check the path in the manifest")

  usable = [summary for summary in summaries if summary.gantry_tilt_degrees == 0.0]
  if series_uid is not None:
    if series_uid in scan.malformed_by_series:
      raise _malformed_error(scan, series_uid)
    if series_uid not in scan.headers_by_series:
      if series_uid in scan.skip_counts_by_series:
        raise DicomError(
            "the series_uid given in the manifest names a series that is not usable "
            f"({_describe_counts(scan.skip_counts_by_series[series_uid])}); {len(summaries)} candidate "
            "series found, list them with find_ct_series")
      raise DicomError(
          f"the series_uid given in the manifest was not found; {len(summaries)} candidate series found, "
          "list them with find_ct_series")
    chosen_uid = series_uid
  else:
    if not usable:
      if summaries:  # Only tilted series: say so rather than "nothing found".
        tilted = summaries[0]
        raise _tilt_error(scan.headers_by_series[tilted.series_uid], tilted.gantry_tilt_degrees)
      if scan.malformed_by_series:  # Say which field is malformed rather than "nothing found".
        raise _malformed_error(scan, min(scan.malformed_by_series,
                                         key=lambda uid: min(m.token for m in scan.malformed_by_series[uid])))
      if scan.multi_frame_files:
        raise DicomError(
            f"{scan.multi_frame_files[0]}: multi-frame (enhanced) CT files are not supported and no "
            "single-frame axial CT series was found; export the series as single-frame CT Image Storage")
      raise DicomError(
          f"no usable axial CT series in the folder ({scan.num_files} file(s) skipped: "
          f"{_describe_counts(scan.skip_counts)}); export the axial CT series")
    chosen_uid = usable[0].series_uid
    if chosen_uid in scan.malformed_by_series:  # Refuse the series rather than read it with a slice missing.
      raise _malformed_error(scan, chosen_uid)

  headers = sorted(scan.headers_by_series[chosen_uid], key=lambda h: h.path)
  _check_geometry(headers, min_slices)
  axes = canonical_axes(headers[0].orientation)
  if axes is None:
    raise DicomError(
        f"{headers[0].token}: image rows are rotated {_in_plane_rotation_degrees(headers[0].orientation):.1f} "
        "degrees in the axial plane (ImageOrientationPatient); only orientations whose rows and columns follow "
        "the patient's left-right and front-back axes are supported; reformat the series to standard axial")
  ordered, z_mm = _order_slices(headers)
  for header in ordered:
    _check_decodable(header)

  hu = np.empty((len(ordered), ordered[0].rows, ordered[0].columns), dtype=np.float32)
  with _quiet_pydicom():
    for index, header in enumerate(ordered):
      _decode_slice(header, hu[index])
  pixel_spacing_mm = ordered[0].pixel_spacing_mm
  transpose, flip_rows, flip_columns = axes
  if transpose or flip_rows or flip_columns:  # The standard orientation keeps its array (and bytes) untouched.
    if transpose:
      hu = hu.transpose(0, 2, 1)
      pixel_spacing_mm = (pixel_spacing_mm[1], pixel_spacing_mm[0])
    hu = np.ascontiguousarray(hu[:, ::-1 if flip_rows else 1, ::-1 if flip_columns else 1])

  warnings = _spacing_warnings(z_mm)
  skipped_of_chosen = scan.skip_counts_by_series.get(chosen_uid)
  if skipped_of_chosen:
    warnings.append(
        f"{sum(skipped_of_chosen.values())} file(s) of the chosen series were left out "
        f"({_describe_counts(skipped_of_chosen)})")
  if scan.unreadable_files:
    warnings.append(
        f"{len(scan.unreadable_files)} DICOM file(s) could not be read and were skipped "
        f"(first: {scan.unreadable_files[0]})")
  thickness = _most_common_thickness(ordered)
  choice = SeriesChoice(
      chosen_by="series_uid" if series_uid is not None else "automatic",
      slice_thickness_mm=thickness,
      num_slices=len(ordered),
      slice_spacing_mm=float(np.median(np.diff(z_mm))),
      z_extent_mm=float(z_mm[-1] - z_mm[0]),
      preferred_slice_thickness_mm=float(slice_thickness_mm),
      num_candidate_series=len(usable),
  )
  return CtSeries(
      hu=hu,
      z_mm=z_mm,
      pixel_spacing_mm=pixel_spacing_mm,
      series_uid=chosen_uid,
      slice_thickness_mm=thickness,
      num_files_skipped=scan.num_files - len(ordered),
      warnings=tuple(warnings),
      choice=choice,
  )
