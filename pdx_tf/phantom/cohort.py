"""Deterministic synthetic abdominal CT phantoms, written as real DICOM: the project's demo and test cohort.

Each patient is a pure function of (config.seed, patient_index). `generate_patient` returns the HU volume with
ground truth (nodule masks, labels, covariates, abdominal z range); `write_ct_series` writes any volume as a DICOM
series with the quirks of real scanners; `write_demo_cohort` writes a whole cohort with `manifest.csv`, masks
and `cohort.json`, cached and written atomically.

Example:
  manifest_path = write_demo_cohort(demo_cohort_dir())   # about 15-30 s the first time, instant afterwards

Labels come in balanced blocks: every 4 consecutive patients (0-3, 4-7, ...) hold 2 p-negative patients, 1
p-positive sb-negative and 1 sb-positive patient, and any 2 consecutive patients starting at an even index hold
one negative and one positive. So even a 2-patient cohort has both p classes.

The anatomy lives in `pdx_tf.phantom.anatomy`. This module never imports TensorFlow: the cohort is a local
cache, made atomic by building it in a temporary sibling folder that is renamed into place at the end.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import time
import uuid
import zipfile
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom import uid as dicom_uid

from pdx_tf.phantom import anatomy as anatomy_lib

GENERATOR_VERSION = 2  # 2: PCI regions; cached cohorts are also keyed by the generator's source code (see config_hash)
# pci is the PCI (the sum of the 13 region scores pci_0 ... pci_12, see `anatomy.pci_region_map`).
PCI_COLUMNS = tuple(f"pci_{region}" for region in range(anatomy_lib.NUM_PCI_REGIONS))
MANIFEST_COLUMNS = ("patient_id", "dicom_dir", "label_p", "label_sb", "ascites", "pci", "site") + PCI_COLUMNS
MINIMUM_FIELD_OF_VIEW_MM = 380.0

# Every PHI-like value written into headers contains one of these strings (patient-specific values such as
# "ZZCANARY^PATIENT^0007" contain the shared stem). Tests grep every output for them.
PHI_CANARIES: tuple[str, ...] = (
    "ZZCANARY^PATIENT", "ZZCANARY-ID-", "ZZCANARY HOSPITAL", "ZZCANARY^REFERRING", "ZZCANARYACC",
    "ZZCANARY^OPERATOR", "ZZCANARY-STATION", "ZZCANARY STREET", "ZZCANARY^READER", "ZZCANARY-SN",
    "ZZCANARY PRIVATE", "19010101", "20010203",
)
_BIRTH_DATE = "19010101"
_STUDY_DATE = "20010203"
_UID_ROOT = "1.2.826.0.1.3680043.8.498."  # pydicom's root; entropy makes each UID deterministic per key

# Purposes mixed into every random key, so adding draws for one purpose never changes another.
_LABELS, _COVARIATES, _ANATOMY, _ASCITES, _NODULES, _NOISE, _QUIRKS, _FILE_NAMES, _OMENTAL_CAKE = range(9)


@dataclasses.dataclass(frozen=True)
class PhantomConfig:
  """What to generate. Sizes are in mm, so the anatomy is identical at every matrix size.

  Attributes:
    num_patients: cohort size for `write_demo_cohort`.
    seed: root of every random key.
    matrix_size: rows = columns of each axial slice.
    pixel_spacing_mm: in-plane pixel size; matrix_size * pixel_spacing_mm must be >= 380 mm (the body is up to
      ~360 mm wide), e.g. 64 px at 6 mm, 128 px at 3 mm, 256 px at 1.5 mm.
    slice_spacing_mm: distance between slice centres.
    noise_hu: typical image noise (site A ~0.9x, site B ~1.2x, +-10 % per patient).
    site_b_fraction: probability that a patient comes from the second scanner (site "B").
    ascites_given_positive: probabilities of ascites none/small/large for p-positive patients.
    ascites_given_negative: the same for p-negative patients (large ascites without nodules is a confounder).
    scanner_quirks: vary DICOM encoding across patients (unsigned pixels, reversed instance numbers,
      localizers, padding, stray files); False writes every patient plainly.
    nodule_diameter_range_mm: each nodule's largest diameter is drawn uniformly from this range (mm); above 5 mm
      (PCI lesion-size score 2 up to 50 mm).
    omental_cake: paint an omental cake for positives with a high drawn burden (`anatomy.OMENTAL_CAKE_MIN_PCI`);
      False: positives carry nodules only.
  """

  num_patients: int = 40
  seed: int = 0
  matrix_size: int = 256
  pixel_spacing_mm: float = 1.5
  slice_spacing_mm: float = 5.0
  noise_hu: float = 12.0
  site_b_fraction: float = 0.5
  ascites_given_positive: tuple[float, float, float] = (0.3, 0.35, 0.35)
  ascites_given_negative: tuple[float, float, float] = (0.7, 0.2, 0.1)
  scanner_quirks: bool = True
  nodule_diameter_range_mm: tuple[float, float] = anatomy_lib.NODULE_DIAMETER_RANGE_MM
  omental_cake: bool = True

  def __post_init__(self):
    if not isinstance(self.num_patients, int) or self.num_patients < 1:
      raise ValueError(f"num_patients must be a positive integer, got {self.num_patients!r}")
    if not isinstance(self.seed, int) or self.seed < 0:
      raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
    if not isinstance(self.matrix_size, int) or not 32 <= self.matrix_size <= 1024:
      raise ValueError(f"matrix_size must be an integer in [32, 1024], got {self.matrix_size!r}")
    if not 0.2 <= self.pixel_spacing_mm <= 12.0:
      raise ValueError(f"pixel_spacing_mm must be in [0.2, 12], got {self.pixel_spacing_mm!r}")
    field_of_view_mm = self.matrix_size * self.pixel_spacing_mm
    if field_of_view_mm < MINIMUM_FIELD_OF_VIEW_MM:
      raise ValueError(
          f"field of view matrix_size * pixel_spacing_mm = {field_of_view_mm:g} mm is too small for the phantom "
          f"body; use pixel_spacing_mm >= {MINIMUM_FIELD_OF_VIEW_MM / self.matrix_size:g} for matrix "
          f"{self.matrix_size} (e.g. 64 px at 6 mm)")
    if not 1.0 <= self.slice_spacing_mm <= 10.0:
      raise ValueError(f"slice_spacing_mm must be in [1, 10], got {self.slice_spacing_mm!r}")
    if not 0.0 <= self.noise_hu <= 100.0:
      raise ValueError(f"noise_hu must be in [0, 100], got {self.noise_hu!r}")
    if not 0.0 <= self.site_b_fraction <= 1.0:
      raise ValueError(f"site_b_fraction must be in [0, 1], got {self.site_b_fraction!r}")
    for name in ("ascites_given_positive", "ascites_given_negative"):
      probabilities = getattr(self, name)
      if (len(probabilities) != 3 or min(probabilities) < 0 or abs(sum(probabilities) - 1.0) > 1e-6):
        raise ValueError(f"{name} must be 3 probabilities (none, small, large) summing to 1, got {probabilities!r}")
      object.__setattr__(self, name, tuple(float(p) for p in probabilities))
    diameters = self.nodule_diameter_range_mm
    low_mm, high_mm = anatomy_lib.PCI_LESION_SIZE_LIMITS_MM
    if len(diameters) != 2 or not low_mm < diameters[0] <= diameters[1] <= high_mm:
      raise ValueError(f"nodule_diameter_range_mm must be (low, high) with {low_mm:g} < low <= high <= {high_mm:g} "
                       f"mm (PCI lesion-size score 2), got {diameters!r}")
    object.__setattr__(self, "nodule_diameter_range_mm", tuple(float(d) for d in diameters))
    if not isinstance(self.omental_cake, bool):
      raise ValueError(f"omental_cake must be True or False, got {self.omental_cake!r}")


# Named phantom cohorts besides the default (PhantomConfig()): PhantomConfig field overrides.
# low_burden (issue 23): positives carry only nodules of 7-20 mm largest diameter (the default: 12-25 mm), never an
# omental cake, and ascites is drawn for every patient from the negatives' distribution (none/small/large
# 0.7/0.2/0.1), so neither burden nor fluid tells a positive from a negative. Labels, nodule counts and anatomy
# follow the same keyed draws as the default cohort.
PHANTOM_PRESETS: dict[str, dict[str, Any]] = {
    "low_burden": {"nodule_diameter_range_mm": (7.0, 20.0), "omental_cake": False,
                   "ascites_given_positive": (0.7, 0.2, 0.1), "ascites_given_negative": (0.7, 0.2, 0.1)},
}


def preset_config(preset: str, **overrides: Any) -> PhantomConfig:
  """The PhantomConfig of a named preset (PHANTOM_PRESETS), with other fields overridden (e.g. num_patients)."""
  if preset not in PHANTOM_PRESETS:
    raise ValueError(f"unknown phantom preset {preset!r}; choose one of {', '.join(sorted(PHANTOM_PRESETS))}")
  return PhantomConfig(**{**PHANTOM_PRESETS[preset], **overrides})


@dataclasses.dataclass(frozen=True, eq=False)
class PhantomPatient:
  """One synthetic patient: the CT volume and its ground truth (arrays in [Z, Y, X], z ascending)."""

  patient_id: str
  hu: np.ndarray                      # float32, integer-valued HU in [-1024, 3071]
  z_mm: np.ndarray                    # float64 [Z], strictly increasing (feet -> head)
  nodule_mask: np.ndarray             # bool: all peritoneal disease (nodules and omental cake)
  small_bowel_nodule_mask: np.ndarray  # bool, subset of nodule_mask: nodules touching small bowel
  label_p: int
  label_sb: int
  covariates: dict[str, Any]          # ascites, pci, site, nodule_count, omental_cake (bool)
  abdomen_z_range_mm: tuple[float, float]  # (pelvic floor, diaphragm dome top); both half-way between slices
  pixel_spacing_mm: float
  tissue_labels: np.ndarray           # uint8, values index phantom_anatomy.TISSUE_NAMES
  nodule_sites: tuple[str, ...]       # site of each nodule, small-bowel nodules first
  # int8 [Z, Y, X] PCI region of every voxel (0-12, -1 outside the abdomen; `anatomy.pci_region_map`).
  pci_region_map: np.ndarray | None = None
  # The 13 PCI lesion-size scores (contracts.PCI_REGION_NAMES order) of the patient's own lesions; sum = pci.
  pci_scores: tuple[int, ...] = (0,) * anatomy_lib.NUM_PCI_REGIONS
  nodule_diameters_mm: tuple[float, ...] = ()  # largest diameter of each nodule (nodule_sites order)


# Masks and series share one z grid, so a read slice's mask slice is at the same z up to float rounding.
MASK_Z_TOLERANCE_MM = 0.01


def masks_at_slices(slice_z_mm: np.ndarray, mask_volume: np.ndarray, mask_z_mm: np.ndarray,
                    tolerance_mm: float = MASK_Z_TOLERANCE_MM) -> np.ndarray:
  """A cohort mask (masks/<patient_id>.npz) at the slices a reader kept: bool [N, Y, X], slice i the mask slice
  nearest to slice_z_mm[i], or empty when none lies within `tolerance_mm`.

  Args:
    slice_z_mm: [N] z of the slices kept (e.g. by `region.load_abdomen`).
    mask_volume: bool [Z, Y, X] over the patient's whole series.
    mask_z_mm: [Z] z of the mask slices.
  """
  masks = np.zeros((len(slice_z_mm),) + mask_volume.shape[1:], bool)
  for index, z in enumerate(slice_z_mm):
    nearest = int(np.argmin(np.abs(mask_z_mm - z)))
    if abs(mask_z_mm[nearest] - z) <= tolerance_mm:
      masks[index] = mask_volume[nearest]
  return masks


def patient_id_for(patient_index: int) -> str:
  return f"demo-{patient_index:03d}"


def patient_labels(seed: int, patient_index: int) -> tuple[int, int]:
  """(label_p, label_sb), balanced in blocks of four (see the module docstring)."""
  rng = np.random.default_rng([seed, patient_index // 4, _LABELS])
  positives = [(1, 0), (1, 1)] if rng.uniform() < 0.5 else [(1, 1), (1, 0)]
  block = []
  for positive in positives:
    pair = [(0, 0), positive]
    block += pair if rng.uniform() < 0.5 else pair[::-1]
  return block[patient_index % 4]


def generate_patient(config: PhantomConfig, patient_index: int) -> PhantomPatient:
  """Generates one patient deterministically from (config.seed, patient_index).

  Args:
    config: the phantom settings.
    patient_index: 0-based; must be < config.num_patients.

  Returns:
    The patient, with HU already rounded and clipped as a DICOM reader would return it.
  """
  if not 0 <= patient_index < config.num_patients:
    raise ValueError(f"patient_index must be in [0, {config.num_patients}), got {patient_index}")
  key = (config.seed, patient_index)
  label_p, label_sb = patient_labels(config.seed, patient_index)

  covariate_rng = np.random.default_rng([*key, _COVARIATES])
  site = "B" if covariate_rng.uniform() < config.site_b_fraction else "A"
  ascites = str(covariate_rng.choice(anatomy_lib.ASCITES_GRADES, p=config.ascites_given_positive if label_p
                                     else config.ascites_given_negative))
  if label_p:
    pci = int(np.clip(round(covariate_rng.gamma(2.0, 4.0)) + 2 + 4 * label_sb, 1, 39))
    count = int(np.clip(round(1 + pci / 5 + covariate_rng.normal(0.0, 0.7)), 1, 8))
    small_bowel_count = (1 + int(count >= 4 and covariate_rng.uniform() < 0.4)) if label_sb else 0
    count = max(count, small_bowel_count)
  else:
    pci, count, small_bowel_count = 0, 0, 0

  rng = np.random.default_rng([*key, _ANATOMY])
  spacing = config.slice_spacing_mm
  thigh_slices = max(1, round(rng.uniform(10.0, 15.0) / spacing))
  abdomen_slices = max(8, round(rng.uniform(170.0, 230.0) / spacing))
  chest_slices = max(2, round(rng.uniform(25.0, 35.0) / spacing))
  z_start = round(rng.uniform(-620.0, -380.0), 1)
  z_mm = np.round(z_start + spacing * np.arange(thigh_slices + abdomen_slices + chest_slices), 3)
  pelvic_floor = round(float(z_mm[thigh_slices - 1] + spacing / 2), 3)
  dome_top = round(pelvic_floor + abdomen_slices * spacing, 3)
  half_width = rng.uniform(128.0, 155.0) + (6.0 if site == "B" else 0.0)
  body = anatomy_lib.BodyShape(
      pelvic_floor_mm=pelvic_floor, dome_mm=dome_top, half_width_mm=half_width,
      half_depth_mm=half_width * rng.uniform(0.76, 0.88), center_y_mm=-15.0 + rng.uniform(-5.0, 5.0),
      fat_mm=rng.uniform(8.0, 30.0), muscle_mm=rng.uniform(8.0, 13.0))
  pixel_axis = (np.arange(config.matrix_size) - (config.matrix_size - 1) / 2) * config.pixel_spacing_mm
  grid = anatomy_lib.Grid(z_mm=z_mm, y_mm=pixel_axis, x_mm=pixel_axis)
  anatomy = anatomy_lib.paint_anatomy(rng, grid, body, has_uterus=rng.uniform() < 0.5,
                                      has_gallbladder=rng.uniform() < 0.75)
  # The PCI regions come from the anatomy before any disease (implants on a loop replace some of its wall).
  region_map = anatomy_lib.pci_region_map(grid, body, np.isin(anatomy.labels, anatomy_lib.SMALL_BOWEL_TISSUES),
                                          anatomy.small_bowel, anatomy.small_bowel_loop_ids)
  anatomy_lib.random_ascites(np.random.default_rng([*key, _ASCITES]), anatomy, grid, body, ascites)
  has_cake = config.omental_cake and anatomy_lib.omental_cake(
      np.random.default_rng([*key, _OMENTAL_CAKE]), anatomy, grid, body, pci)
  nodules = anatomy_lib.random_nodules(np.random.default_rng([*key, _NODULES]), anatomy, grid, body, count,
                                       small_bowel_count, diameter_range_mm=config.nodule_diameter_range_mm)
  scores = anatomy_lib.pci_scores(region_map, nodules,
                                  anatomy.labels == anatomy_lib.TISSUE["omental_cake"] if has_cake else None)
  noise_rng = np.random.default_rng([*key, _NOISE])
  noise_hu = config.noise_hu * (1.2 if site == "B" else 0.9) * noise_rng.uniform(0.9, 1.1)
  hu = anatomy_lib.random_hu(noise_rng, anatomy.labels, nodules, grid, noise_hu=noise_hu,
                             contrast_gain=1.1 if site == "B" else 1.0)
  nodule_mask = np.isin(anatomy.labels, anatomy_lib.DISEASE_TISSUES)
  small_bowel_nodule_mask = np.zeros_like(nodule_mask)
  for nodule in nodules:
    if nodule.on_small_bowel:
      small_bowel_nodule_mask[nodule.box] |= nodule.mask
  return PhantomPatient(
      patient_id=patient_id_for(patient_index), hu=hu, z_mm=z_mm.astype(np.float64), nodule_mask=nodule_mask,
      small_bowel_nodule_mask=small_bowel_nodule_mask, label_p=label_p, label_sb=label_sb,
      # pci: the PCI of the painted disease (sum of the region scores); burden: the drawn PCI that set the nodule
      # count and the cake.
      covariates={"ascites": ascites, "pci": int(sum(scores)), "site": site, "nodule_count": len(nodules),
                  "omental_cake": has_cake, "burden": pci},
      abdomen_z_range_mm=(pelvic_floor, dome_top), pixel_spacing_mm=config.pixel_spacing_mm,
      tissue_labels=anatomy.labels, nodule_sites=tuple(nodule.site for nodule in nodules),
      pci_region_map=region_map, pci_scores=tuple(scores),
      nodule_diameters_mm=tuple(round(2.0 * max(nodule.semi_axes_mm), 3) for nodule in nodules))


# ----------------------------------------------------------------------------------------------------------------
# DICOM


def _ds(value: float) -> str:
  """A decimal string (DS, at most 16 characters) without float noise."""
  text = f"{value:.4f}".rstrip("0").rstrip(".")
  return "0" if text in ("-0", "") else text


def _uid(*parts: Any) -> str:
  return str(dicom_uid.generate_uid(_UID_ROOT, entropy_srcs=["pdx-phantom"] + [str(part) for part in parts]))


def _add_identity(dataset: Dataset, key: int, patient_index: int) -> None:
  """Patient/study identity: every PHI-like value carries a canary from PHI_CANARIES."""
  dataset.PatientName = f"ZZCANARY^PATIENT^{patient_index:04d}"
  dataset.PatientID = f"ZZCANARY-ID-{patient_index:04d}"
  dataset.PatientBirthDate = _BIRTH_DATE
  dataset.PatientSex = "F"
  dataset.PatientAddress = "ZZCANARY STREET 1, ZZCANARY CITY"
  dataset.InstitutionName = "ZZCANARY HOSPITAL"
  dataset.InstitutionAddress = "ZZCANARY STREET 99, ZZCANARY CITY"
  dataset.ReferringPhysicianName = "ZZCANARY^REFERRING^DOCTOR"
  dataset.NameOfPhysiciansReadingStudy = "ZZCANARY^READER"
  dataset.OperatorsName = "ZZCANARY^OPERATOR"
  dataset.StationName = "ZZCANARY-STATION"
  dataset.DeviceSerialNumber = f"ZZCANARY-SN-{key % 100:02d}"
  dataset.AccessionNumber = f"ZZCANARYACC{patient_index:04d}"
  dataset.StudyID = "1"
  for prefix in ("Study", "Series", "Acquisition", "Content"):
    setattr(dataset, f"{prefix}Date", _STUDY_DATE)
    setattr(dataset, f"{prefix}Time", "101112")
  dataset.StudyInstanceUID = _uid("study", key)
  dataset.FrameOfReferenceUID = _uid("frame", key)
  dataset.StudyDescription = "CT ABDOMEN PELVIS WITH CONTRAST"
  dataset.BodyPartExamined = "ABDOMEN"
  # PHI hidden in a private block, as some scanners do.
  block = dataset.private_block(0x0019, "ZZCANARY PRIVATE", create=True)
  block.add_new(0x10, "LO", f"ZZCANARY PRIVATE ID {patient_index:04d}")


def _new_dataset(sop_instance_uid: str) -> Dataset:
  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = dicom_uid.CTImageStorage
  meta.MediaStorageSOPInstanceUID = sop_instance_uid
  meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
  meta.ImplementationClassUID = _UID_ROOT + "1"
  dataset = Dataset()
  dataset.file_meta = meta
  dataset.SOPClassUID = dicom_uid.CTImageStorage
  dataset.SOPInstanceUID = sop_instance_uid
  dataset.Modality = "CT"
  dataset.Manufacturer = "PDX PHANTOM"
  dataset.SpecificCharacterSet = "ISO_IR 100"
  return dataset


_UNCOMPRESSED = (dicom_uid.ExplicitVRLittleEndian, dicom_uid.ImplicitVRLittleEndian,
                 dicom_uid.DeflatedExplicitVRLittleEndian)


def check_transfer_syntax(transfer_syntax_uid: str) -> None:
  """Raises ValueError unless pydicom can write pixel data with this transfer syntax here."""
  if transfer_syntax_uid in _UNCOMPRESSED:
    return
  try:
    encoder = pydicom.pixels.get_encoder(transfer_syntax_uid)
  except NotImplementedError:
    encoder = None
  if encoder is None or not encoder.is_available:
    missing = "" if encoder is None else f" (missing: {', '.join(encoder.missing_dependencies)})"
    raise ValueError(
        f"pydicom cannot encode transfer syntax {dicom_uid.UID(transfer_syntax_uid).name}{missing}; use "
        "ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless or "
        "JPEG2000Lossless")


def _set_pixels(dataset: Dataset, stored: np.ndarray, transfer_syntax_uid: str) -> None:
  dataset.Rows, dataset.Columns = stored.shape
  dataset.SamplesPerPixel = 1
  dataset.PhotometricInterpretation = "MONOCHROME2"
  dataset.BitsAllocated = 16
  dataset.PixelData = stored.tobytes()
  if transfer_syntax_uid in _UNCOMPRESSED:
    dataset.file_meta.TransferSyntaxUID = transfer_syntax_uid
    return
  try:
    dataset.compress(transfer_syntax_uid, stored, generate_instance_uid=False)
  except RuntimeError as error:  # e.g. openjpeg refuses images smaller than its resolution pyramid (< 32 px)
    raise ValueError(f"cannot encode a {stored.shape[0]}x{stored.shape[1]} image as "
                     f"{dicom_uid.UID(transfer_syntax_uid).name}: {error}") from None


def _stored_pixels(hu: np.ndarray, pixel_spacing_mm: float, signed_pixels: bool, rescale_intercept: float,
                   pixel_padding_value: int | None) -> tuple[np.ndarray, float, float]:
  """HU -> stored integers (int16 or uint16), with the padding value outside the circular field of view.

  Returns (stored [Z, Y, X], x0, y0): the position in mm of the first pixel's centre, the volume centred on x = y = 0.

  Raises:
    ValueError: the HU or the padding value do not fit the pixel type.
  """
  dtype = np.int16 if signed_pixels else np.uint16
  limits = np.iinfo(dtype)
  stored = np.round(hu.astype(np.float64) - rescale_intercept)
  if stored.min() < limits.min or stored.max() > limits.max:
    raise ValueError(f"HU range [{hu.min():g}, {hu.max():g}] does not fit {dtype.__name__} pixels with "
                     f"intercept {rescale_intercept:g}; clip the HU or change signed_pixels/rescale_intercept")
  stored = stored.astype(dtype)
  rows, columns = hu.shape[1:]
  x0 = -(columns - 1) / 2 * pixel_spacing_mm
  y0 = -(rows - 1) / 2 * pixel_spacing_mm
  if pixel_padding_value is not None:
    if not limits.min <= pixel_padding_value <= limits.max:
      raise ValueError(f"pixel_padding_value {pixel_padding_value} does not fit {dtype.__name__} pixels")
    y_mm = y0 + np.arange(rows)[:, None] * pixel_spacing_mm
    x_mm = x0 + np.arange(columns)[None, :] * pixel_spacing_mm
    outside = x_mm ** 2 + y_mm ** 2 > (min(rows, columns) * pixel_spacing_mm / 2) ** 2
    stored[:, outside] = pixel_padding_value
  return stored, x0, y0


def _series_template(key: int, series_number: int, patient_index: int, series_uid: str, series_description: str,
                     image_orientation_patient: tuple[float, ...], pixel_spacing_mm: float,
                     slice_thickness_mm: float, kvp: float, bits_stored: int, signed_pixels: bool,
                     rescale_intercept: float, pixel_padding_value: int | None) -> pydicom.Dataset:
  """The attributes every slice of an axial series shares (write_ct_series sets the per-slice ones)."""
  dataset = _new_dataset(_uid("image", key, series_number, 0))
  _add_identity(dataset, key, patient_index)
  dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
  dataset.SeriesInstanceUID = series_uid
  dataset.SeriesNumber = series_number
  dataset.SeriesDescription = series_description
  dataset.AcquisitionNumber = 1
  dataset.PatientPosition = "HFS"
  dataset.ImageOrientationPatient = [_ds(value) for value in image_orientation_patient]
  dataset.PixelSpacing = [_ds(pixel_spacing_mm), _ds(pixel_spacing_mm)]
  dataset.SliceThickness = _ds(slice_thickness_mm)
  dataset.KVP = _ds(kvp)
  dataset.ConvolutionKernel = "B30f"
  dataset.BitsStored = bits_stored
  dataset.HighBit = bits_stored - 1
  dataset.PixelRepresentation = 1 if signed_pixels else 0
  dataset.RescaleIntercept = _ds(rescale_intercept)
  dataset.RescaleSlope = "1"
  dataset.RescaleType = "HU"
  dataset.WindowCenter = "40"
  dataset.WindowWidth = "400"
  if pixel_padding_value is not None:
    dataset.PixelPaddingValue = int(pixel_padding_value)
  return dataset


# How `write_ct_series` may store an axial series: (ImageOrientationPatient, transpose, flip rows, flip columns)
# from the standard orientation (rows toward the patient's back, columns toward the patient's left).
STORED_ORIENTATIONS = {
    "standard": ((1, 0, 0, 0, 1, 0), False, False, False),
    "mirrored": ((-1, 0, 0, 0, 1, 0), False, False, True),
    "upside_down": ((1, 0, 0, 0, -1, 0), False, True, False),
    "transposed": ((0, 1, 0, 1, 0, 0), True, False, False),
}


def write_ct_series(folder: str, hu: np.ndarray, z_mm: np.ndarray, pixel_spacing_mm: float, *, key: int,
                    signed_pixels: bool = True, reverse_instance_numbers: bool = False,
                    shuffle_file_names: bool = True, include_localizer: bool = False,
                    transfer_syntax_uid: str = dicom_uid.ExplicitVRLittleEndian, series_number: int = 2,
                    slice_thickness_mm: float | None = None, patient_index: int = 0,
                    rescale_intercept: float | None = None, pixel_padding_value: int | None = None,
                    kvp: float = 120.0, image_orientation_patient: tuple[float, ...] = (1, 0, 0, 0, 1, 0),
                    series_description: str = "ABDOMEN PELVIS", stored_orientation: str = "standard") -> list[str]:
  """Writes one axial CT series (and optionally a coronal localizer) as DICOM files.

  Pixel (row r, column c) of slice k sits at x = x0 + c * spacing, y = y0 + r * spacing, z = z_mm[k], with the
  volume centred on x = y = 0 (ImageOrientationPatient 1\\0\\0\\0\\1\\0). Output is deterministic for a key.

  Args:
    folder: created if missing; existing files with the same names are overwritten.
    hu: [Z, Y, X] HU; rounded to integers on writing.
    z_mm: [Z] slice positions (any order or gaps; written as given).
    pixel_spacing_mm: in-plane pixel size.
    key: seeds the UIDs and file names; use a different key per study.
    signed_pixels: PixelRepresentation 1 (int16) or 0 (uint16).
    reverse_instance_numbers: InstanceNumber decreasing with z instead of increasing.
    shuffle_file_names: random hexadecimal names (some with ".dcm") instead of CT0000.dcm... in z_mm order.
    include_localizer: also write a coronal LOCALIZER image as series 1 (or 1001 if series_number is 1).
    transfer_syntax_uid: see `check_transfer_syntax` (RLE Lossless and JPEG 2000 Lossless are compressed).
    series_number: SeriesNumber of the axial series; the series UID depends on it.
    slice_thickness_mm: SliceThickness; default the median z spacing (or 5 mm for one slice).
    patient_index: numbers the PHI canaries (PatientID ZZCANARY-ID-0007 ...).
    rescale_intercept: default -1024 for unsigned pixels and 0 for signed ones.
    pixel_padding_value: if given, pixels outside the circular field of view get this stored value, and
      PixelPaddingValue is written.
    kvp: KVP header value.
    image_orientation_patient: written as given (e.g. (1, 0, 0, 0, cos a, sin a) for a gantry tilt a, to test
      that readers reject or handle it); positions are not recomputed.
    series_description: SeriesDescription (never PHI here).
    stored_orientation: how the files store the same patient (`hu` is always given in the standard axial
      orientation, rows toward +y, columns toward +x), one of STORED_ORIENTATIONS: "standard"; "mirrored"
      (ImageOrientationPatient -1\0\0\0\1\0: columns run toward the patient's right, pixels mirrored
      left-right); "upside_down" (1\0\0\0\-1\0: rows run toward the front); "transposed" (0\1\0\1\0\0).
      ImagePositionPatient follows, so every pixel keeps its patient position. Not with a non-default
      `image_orientation_patient`.

  Returns:
    The paths written: axial slices in z_mm order, then the localizer if any.
  """
  hu = np.asarray(hu)
  z_mm = np.asarray(z_mm, np.float64)
  if hu.ndim != 3 or z_mm.shape != (hu.shape[0],) or hu.shape[0] == 0:
    raise ValueError(f"hu must be [Z, Y, X] with Z = len(z_mm) > 0, got hu {hu.shape} and z_mm {z_mm.shape}")
  if len(image_orientation_patient) != 6:
    raise ValueError(f"image_orientation_patient needs 6 numbers, got {image_orientation_patient!r}")
  if not np.all(np.isfinite(hu)):
    raise ValueError("hu contains NaN or infinite values; replace them (e.g. with -1024) before writing DICOM")
  check_transfer_syntax(transfer_syntax_uid)
  if rescale_intercept is None:
    rescale_intercept = 0.0 if signed_pixels else -1024.0
  if stored_orientation not in STORED_ORIENTATIONS:
    raise ValueError(f"stored_orientation must be one of {', '.join(STORED_ORIENTATIONS)}, got {stored_orientation!r}")
  if stored_orientation != "standard" and tuple(image_orientation_patient) != (1, 0, 0, 0, 1, 0):
    raise ValueError("give either stored_orientation or image_orientation_patient, not both")
  stored, x0, y0 = _stored_pixels(hu, pixel_spacing_mm, signed_pixels, rescale_intercept, pixel_padding_value)
  if stored_orientation != "standard":
    image_orientation_patient, transpose, flip_rows, flip_columns = STORED_ORIENTATIONS[stored_orientation]
    if flip_columns:  # The first stored column is the patient's leftmost.
      stored, x0 = stored[:, :, ::-1], -x0
    if flip_rows:  # The first stored row is the most posterior.
      stored, y0 = stored[:, ::-1, :], -y0
    if transpose:  # The first pixel stays where it was; rows now advance along x.
      stored = stored.transpose(0, 2, 1)
    stored = np.ascontiguousarray(stored)
  bits_stored = 12 if not signed_pixels and stored.max() < 4096 else 16
  if slice_thickness_mm is None:
    slice_thickness_mm = float(np.median(np.abs(np.diff(np.sort(z_mm))))) if z_mm.size > 1 else 5.0

  os.makedirs(folder, exist_ok=True)
  count = z_mm.size
  names = _file_names(key, series_number, count + 1, shuffle_file_names)
  series_uid = _uid("series", key, series_number)
  # One dataset is reused for every slice (only per-slice attributes change): building 40 attributes per file
  # through pydicom's __setattr__ costs more than writing the file.
  dataset = _series_template(key, series_number, patient_index, series_uid, series_description,
                             image_orientation_patient, pixel_spacing_mm, slice_thickness_mm, kvp, bits_stored,
                             signed_pixels, rescale_intercept, pixel_padding_value)
  paths = []
  for index in range(count):
    sop_uid = _uid("image", key, series_number, index)
    dataset.SOPInstanceUID = sop_uid
    dataset.file_meta.MediaStorageSOPInstanceUID = sop_uid
    dataset.InstanceNumber = count - index if reverse_instance_numbers else index + 1
    dataset.ImagePositionPatient = [_ds(x0), _ds(y0), _ds(z_mm[index])]
    dataset.SliceLocation = _ds(z_mm[index])
    dataset.file_meta.TransferSyntaxUID = dicom_uid.ExplicitVRLittleEndian
    _set_pixels(dataset, stored[index], transfer_syntax_uid)
    path = os.path.join(folder, names[index])
    dataset.save_as(path, enforce_file_format=True)
    paths.append(path)
  if include_localizer:
    paths.append(_write_localizer(os.path.join(folder, names[count]), hu, z_mm, pixel_spacing_mm, key=key,
                                  series_number=1 if series_number != 1 else 1001, patient_index=patient_index,
                                  x0=x0))
  return paths


def _file_names(key: int, series_number: int, count: int, shuffle: bool) -> list[str]:
  if not shuffle:
    return [f"CT{index:04d}.dcm" for index in range(count - 1)] + ["LOC0000.dcm"]
  rng = np.random.default_rng([key, series_number, _FILE_NAMES])
  with_extension = rng.uniform() < 0.5
  names = [f"{value:016x}" + (".dcm" if with_extension else "")
           for value in rng.integers(0, 2 ** 63, size=count, dtype=np.int64)]
  if len(set(names)) != count:  # 63 random bits: never happens, but names must be unique
    names = [f"{index:04d}-{name}" for index, name in enumerate(names)]
  return names


def _write_localizer(path, hu, z_mm, pixel_spacing_mm, *, key, series_number, patient_index, x0) -> str:
  """A coronal projection radiograph (scout): rows run from head to feet, columns along x."""
  order = np.argsort(z_mm)
  z_sorted = z_mm[order]
  row_spacing = 2.0 * pixel_spacing_mm
  rows = max(2, int(round((z_sorted[-1] - z_sorted[0]) / row_spacing)) + 1)
  row_z = z_sorted[-1] - row_spacing * np.arange(rows)
  nearest = order[np.clip(np.searchsorted(z_sorted, row_z), 0, z_sorted.size - 1)]
  attenuation = np.clip(np.asarray(hu, np.float32) + 1000.0, 0.0, None).mean(axis=1)  # [Z, X]
  image = np.clip(attenuation[nearest] * 4.0, 0, 4095).astype(np.uint16)
  dataset = _new_dataset(_uid("localizer", key, series_number))
  _add_identity(dataset, key, patient_index)
  dataset.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
  dataset.SeriesInstanceUID = _uid("series", key, series_number)
  dataset.SeriesNumber = series_number
  dataset.SeriesDescription = "TOPOGRAM"
  dataset.InstanceNumber = 1
  dataset.PatientPosition = "HFS"
  dataset.ImagePositionPatient = [_ds(x0), "0", _ds(z_sorted[-1])]
  dataset.ImageOrientationPatient = ["1", "0", "0", "0", "0", "-1"]
  dataset.PixelSpacing = [_ds(row_spacing), _ds(pixel_spacing_mm)]
  dataset.KVP = "120"
  dataset.BitsStored = 12
  dataset.HighBit = 11
  dataset.PixelRepresentation = 0
  dataset.RescaleIntercept = "0"
  dataset.RescaleSlope = "1"
  _set_pixels(dataset, image, dicom_uid.ExplicitVRLittleEndian)
  dataset.save_as(path, enforce_file_format=True)
  return path


# ----------------------------------------------------------------------------------------------------------------
# Demo cohort


def dicom_quirks(config: PhantomConfig, patient_index: int, site: str) -> dict[str, Any]:
  """How a patient's series is encoded in the demo cohort: site A writes signed pixels (some with a padded
  circular field of view), site B unsigned ones; other quirks are independent of the site."""
  if not config.scanner_quirks:
    return {"signed_pixels": True, "rescale_intercept": 0.0, "pixel_padding_value": None,
            "reverse_instance_numbers": False, "include_localizer": False, "stray_text_file": False,
            "transfer_syntax": "ExplicitVRLittleEndian", "kvp": 120.0}
  rng = np.random.default_rng([config.seed, patient_index, _QUIRKS])
  signed = site == "A"
  draws = rng.uniform(size=6)
  transfer_syntax = ("RLELossless" if draws[5] < 0.1 else
                     "ImplicitVRLittleEndian" if draws[5] < 0.2 else "ExplicitVRLittleEndian")
  return {
      "signed_pixels": signed,
      "rescale_intercept": (-1024.0 if draws[0] < 0.5 else 0.0) if signed else -1024.0,
      "pixel_padding_value": -2000 if signed and draws[1] < 0.5 else None,
      "reverse_instance_numbers": bool(draws[2] < 0.3),
      "include_localizer": bool(draws[3] < 0.4),
      "stray_text_file": bool(draws[4] < 0.25),
      "transfer_syntax": transfer_syntax,
      "kvp": 120.0 if site == "A" else 100.0,
  }


def _generator_source_sha256() -> str:
  """Hash of this module's and the anatomy module's source: any code change invalidates cached cohorts."""
  digest = hashlib.sha256()
  for module_file in (__file__, anatomy_lib.__file__):
    with open(module_file, "rb") as handle:
      digest.update(handle.read())
  return digest.hexdigest()


def config_hash(config: PhantomConfig) -> str:
  """SHA-256 of the config, generator version and generator source: the identity of a cohort's content."""
  text = json.dumps({"generator_version": GENERATOR_VERSION, "generator_source": _generator_source_sha256(),
                     "config": dataclasses.asdict(config)}, sort_keys=True)
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def demo_cohort_dir(config: PhantomConfig = PhantomConfig()) -> str:
  """Default cache folder of a demo cohort: $PDX_TF_CACHE (or ~/.cache/pdx_tf)/demo-cohort-<hash>."""
  base = os.environ.get("PDX_TF_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "pdx_tf")
  return os.path.join(base, f"demo-cohort-{config_hash(config)[:12]}")


def _is_complete(output_dir: str, expected_hash: str) -> bool:
  try:
    with open(os.path.join(output_dir, "cohort.json"), encoding="utf-8") as handle:
      cohort = json.load(handle)
  except (OSError, ValueError):
    return False
  if cohort.get("config_hash") != expected_hash:
    return False
  expected = ["manifest.csv"] + [path for patient in cohort.get("patients", []) for path in patient["files"]]
  return all(os.path.isfile(os.path.join(output_dir, path)) for path in expected)


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
  """An .npz archive with fixed timestamps (np.savez stamps the current time, so its bytes vary)."""
  buffer = io.BytesIO()
  with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
    for name, array in arrays.items():
      member = io.BytesIO()
      np.lib.format.write_array(member, np.asarray(array), allow_pickle=False)
      info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = zipfile.ZIP_DEFLATED
      archive.writestr(info, member.getvalue())
  return buffer.getvalue()


def _write_patient(folder: str, config: PhantomConfig, patient_index: int) -> dict[str, Any]:
  """Writes one patient's DICOM folder and masks under a cohort folder; returns its cohort.json entry."""
  patient = generate_patient(config, patient_index)
  quirks = dicom_quirks(config, patient_index, patient.covariates["site"])
  dicom_dir = os.path.join("dicom", patient.patient_id)
  paths = write_ct_series(
      os.path.join(folder, dicom_dir), patient.hu, patient.z_mm, config.pixel_spacing_mm,
      key=config.seed * 100_003 + patient_index, signed_pixels=quirks["signed_pixels"],
      reverse_instance_numbers=quirks["reverse_instance_numbers"], shuffle_file_names=True,
      include_localizer=quirks["include_localizer"],
      transfer_syntax_uid=getattr(dicom_uid, quirks["transfer_syntax"]), patient_index=patient_index,
      rescale_intercept=quirks["rescale_intercept"], pixel_padding_value=quirks["pixel_padding_value"],
      kvp=quirks["kvp"])
  files = [os.path.relpath(path, folder) for path in paths]
  if quirks["stray_text_file"]:
    with open(os.path.join(folder, dicom_dir, "notes.txt"), "w", encoding="utf-8") as handle:
      handle.write("Technologist notes: oral contrast given 60 min before the scan.\n")
    files.append(os.path.join(dicom_dir, "notes.txt"))
  mask_path = os.path.join("masks", f"{patient.patient_id}.npz")
  with open(os.path.join(folder, mask_path), "wb") as handle:
    handle.write(_npz_bytes({
        "nodule_mask": patient.nodule_mask, "small_bowel_nodule_mask": patient.small_bowel_nodule_mask,
        "z_mm": patient.z_mm, "abdomen_z_range_mm": np.array(patient.abdomen_z_range_mm, np.float64),
        "pci_region_map": patient.pci_region_map}))
  files.append(mask_path)
  return {
      "patient_id": patient.patient_id, "dicom_dir": dicom_dir, "label_p": patient.label_p,
      "label_sb": patient.label_sb, **{key: patient.covariates[key] for key in ("ascites", "pci", "site")},
      "nodule_count": patient.covariates["nodule_count"], "nodule_sites": list(patient.nodule_sites),
      "omental_cake": patient.covariates["omental_cake"], "burden": patient.covariates["burden"],
      "nodule_diameters_mm": list(patient.nodule_diameters_mm), "pci_scores": list(patient.pci_scores),
      **{column: score for column, score in zip(PCI_COLUMNS, patient.pci_scores)},
      "num_slices": int(patient.z_mm.size), "abdomen_z_range_mm": list(patient.abdomen_z_range_mm),
      "quirks": quirks, "files": sorted(files),
  }


def write_demo_cohort(output_dir: str, config: PhantomConfig = PhantomConfig(), *, progress: bool = False) -> str:
  """Writes (or finds cached) a demo cohort: DICOM folders, masks, manifest.csv and cohort.json.

  Layout: output_dir/dicom/<patient_id>/*, output_dir/masks/<patient_id>.npz (nodule_mask,
  small_bowel_nodule_mask, z_mm, abdomen_z_range_mm, pci_region_map), output_dir/manifest.csv (MANIFEST_COLUMNS,
  dicom_dir relative to the manifest's folder) and output_dir/cohort.json (config, config_hash, patients with
  covariates,
  DICOM quirks and file lists). The cohort is built in a temporary sibling folder and renamed into place, so an
  interrupted run never leaves a folder that looks complete. Local filesystems only.

  Args:
    output_dir: the cohort folder; if it holds a complete cohort of the same config it is reused at once, if
      it holds anything else it is replaced.
    config: what to generate.
    progress: print one line per patient.

  Returns:
    The path of manifest.csv.
  """
  expected_hash = config_hash(config)
  manifest_path = os.path.join(output_dir, "manifest.csv")
  if _is_complete(output_dir, expected_hash):
    return manifest_path
  output_dir = os.path.abspath(output_dir)
  parent = os.path.dirname(output_dir)
  os.makedirs(parent, exist_ok=True)
  _remove_stale_temp_dirs(parent, os.path.basename(output_dir))
  temp_dir = os.path.join(parent, f".tmp-{uuid.uuid4().hex[:12]}-{os.path.basename(output_dir)}")
  try:
    os.makedirs(os.path.join(temp_dir, "masks"))
    start = time.monotonic()
    patients = []
    for patient_index in range(config.num_patients):
      patients.append(_write_patient(temp_dir, config, patient_index))
      if progress:
        print(f"phantom: wrote {patients[-1]['patient_id']} ({patient_index + 1}/{config.num_patients}, "
              f"{time.monotonic() - start:.1f} s)", flush=True)
    rows = [",".join(str(patient[column]) for column in MANIFEST_COLUMNS) for patient in patients]
    with open(os.path.join(temp_dir, "manifest.csv"), "w", encoding="utf-8", newline="") as handle:
      handle.write("\n".join([",".join(MANIFEST_COLUMNS)] + rows) + "\n")
    cohort = {"schema_version": 1, "generator_version": GENERATOR_VERSION, "config_hash": expected_hash,
              "config": dataclasses.asdict(config), "manifest": "manifest.csv", "patients": patients}
    with open(os.path.join(temp_dir, "cohort.json"), "w", encoding="utf-8") as handle:
      handle.write(json.dumps(cohort, sort_keys=True, indent=1) + "\n")
    _move_into_place(temp_dir, output_dir, expected_hash)
  finally:
    if os.path.exists(temp_dir):
      shutil.rmtree(temp_dir, ignore_errors=True)
  return manifest_path


def _remove_stale_temp_dirs(parent: str, name: str, max_age_s: float = 3600.0) -> None:
  """Removes temporary folders of this cohort left by killed runs (recent ones may belong to a live writer)."""
  for entry in os.listdir(parent):
    path = os.path.join(parent, entry)
    if entry.startswith(".tmp-") and entry.endswith(f"-{name}") and os.path.isdir(path):
      try:
        if time.time() - os.path.getmtime(path) > max_age_s:
          shutil.rmtree(path, ignore_errors=True)
      except OSError:
        pass  # another process removed it first


def _move_into_place(temp_dir: str, output_dir: str, expected_hash: str) -> None:
  """Renames the finished cohort into place, tolerating another process that finished the same cohort first."""
  if os.path.exists(output_dir):
    if _is_complete(output_dir, expected_hash):
      return  # a concurrent writer won; ours is identical and gets removed by the caller
    shutil.rmtree(output_dir)
  try:
    os.rename(temp_dir, output_dir)
  except OSError:
    if not _is_complete(output_dir, expected_hash):
      raise
