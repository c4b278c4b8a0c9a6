"""The cohort manifest: one CSV row per patient, validated as a whole before any work starts.

Columns (header names exact; order free):
  patient_id   pseudonymous ID, unique, [A-Za-z0-9._-]+, not starting with '.'; it names output files, so it
               must never be a hospital ID or a name. IDs that differ only in case are duplicates (they would
               collide on case-insensitive file systems).
  dicom_dir    the patient's study folder, relative to the manifest's folder or absolute (any tf.io.gfile
               URL); searched recursively. It is user input that may contain names: it is never written to
               outputs.
  label_p      1 if the patient has peritoneal dissemination, else 0.
  label_sb     1 if the patient has small-bowel dissemination, else 0. label_sb=1 needs label_p=1 (small-bowel
               disease is peritoneal disease).
  z_min_mm     optional: inferior end of the abdominal range, in the DICOM patient z coordinate (mm); empty =
               automatic (see `pdx_tf.data.region`).
  z_max_mm     optional: superior end, likewise.
  series_uid   optional: the SeriesInstanceUID to use instead of the automatic series choice.
  pci_0 ... pci_12
               optional, all 13 or none: each Peritoneal Cancer Index region's lesion-size score
               (contracts.PCI_REGION_NAMES order): 0 no disease, 1 up to 0.5 cm, 2 up to 5 cm, 3 larger or
               confluent; empty = not recorded (that region is left out of the region task's loss). A patient
               with all 13 empty still trains the patient-level tasks. Checked against the labels: label_p=0
               needs every recorded region 0; label_sb=1 needs one of 9-12 positive when all of 9-12 are
               recorded, label_sb=0 needs every recorded one of 9-12 at 0.
  pci          optional covariate (carried as a string, as before); when the pci_ columns are present it must
               be an integer 0-39 or empty, and equal the sum of the 13 scores when all 13 are recorded.
Every other column is a covariate (e.g. ascites, pci, site), carried through as a string into every record and
dataset.json for subgroup analysis.

`read_manifest` reports every problem of the file at once, one per line, each with its row number as a
spreadsheet shows it (the header is row 1, the first patient row 2).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
import re
from typing import Mapping, Sequence

import tensorflow as tf

from pdx_tf import contracts
from pdx_tf.data import records
from pdx_tf.errors import ManifestError

PATIENT_ID_COLUMN = "patient_id"
DICOM_DIR_COLUMN = "dicom_dir"
LABEL_P_COLUMN = "label_p"
LABEL_SB_COLUMN = "label_sb"
Z_MIN_COLUMN = "z_min_mm"
Z_MAX_COLUMN = "z_max_mm"
SERIES_UID_COLUMN = "series_uid"
REQUIRED_COLUMNS = (PATIENT_ID_COLUMN, DICOM_DIR_COLUMN, LABEL_P_COLUMN, LABEL_SB_COLUMN)
PCI_SCORE_COLUMNS = tuple(f"pci_{region}" for region in range(contracts.NUM_PCI_REGIONS))
PCI_TOTAL_COLUMN = "pci"  # a covariate (burden subgroups); checked against the region scores when both are given
OPTIONAL_COLUMNS = (Z_MIN_COLUMN, Z_MAX_COLUMN, SERIES_UID_COLUMN) + PCI_SCORE_COLUMNS
PCI_SCORE_PATTERN = re.compile(r"[0-3]")

PATIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_PATIENT_ID_LENGTH = 64
COVARIATE_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]+")
# Parsed records put covariates beside the schema's own keys, so these names would collide.
RESERVED_COVARIATE_NAMES = frozenset(records.feature_spec().keys())
SERIES_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_SERIES_UID_LENGTH = 64  # The DICOM UI value representation's limit.
MAX_PROBLEMS_SHOWN = 200  # A broken 5000-row file must not print 5000 lines.


@dataclasses.dataclass(frozen=True)
class ManifestRow:
  """One validated patient row.

  Attributes:
    row_number: the row as a spreadsheet shows it (header = 1).
    patient_id: pseudonymous ID (safe as a file name).
    dicom_dir: the study folder, resolved against the manifest's folder. Never write it to outputs.
    label_p: 0/1 peritoneal dissemination; None (unknown) only when read with allow_missing_labels.
    label_sb: 0/1 small-bowel dissemination; None likewise.
    z_min_mm: abdominal range override (inferior end), or None for the automatic rule.
    z_max_mm: abdominal range override (superior end), or None.
    series_uid: series override, or None for the automatic choice. PHI-ish: never write it to outputs.
    covariates: covariate name -> value string, in manifest column order.
    pci_scores: the 13 PCI region scores (0-3, None = not recorded), or None when the manifest has no PCI
      columns.
  """

  row_number: int
  patient_id: str
  dicom_dir: str
  label_p: int | None
  label_sb: int | None
  z_min_mm: float | None
  z_max_mm: float | None
  series_uid: str | None
  covariates: Mapping[str, str]
  pci_scores: tuple[int | None, ...] | None = None


@dataclasses.dataclass(frozen=True)
class Manifest:
  """A validated manifest: rows in file order, the covariate column names in file order, and whether it has the
  PCI region columns (pci_0 ... pci_12; then every row's `pci_scores` is set)."""

  path: str
  rows: tuple[ManifestRow, ...]
  covariate_names: tuple[str, ...]
  has_pci_scores: bool = False


def _is_absolute(path: str) -> bool:
  return os.path.isabs(path) or "://" in path


def resolve_dicom_dir(manifest_path: str, dicom_dir: str) -> str:
  """`dicom_dir` as written in the manifest, resolved against the manifest's folder unless absolute."""
  if _is_absolute(dicom_dir):
    return dicom_dir
  return os.path.normpath(os.path.join(os.path.dirname(manifest_path), dicom_dir))


def _parse_label(value: str, column: str, problems: list[str], where: str, allow_missing: bool = False
                 ) -> int | None:
  if value in ("0", "1"):
    return int(value)
  if allow_missing and not value:
    return None  # unknown (an external cohort to predict)
  shown = repr(value) if value else "empty"
  problems.append(f"{where}: {column} must be 0 or 1{' or empty' if allow_missing else ''}, got {shown}")
  return None


def _parse_optional_float(value: str, column: str, problems: list[str], where: str) -> float | None:
  if not value:
    return None
  try:
    number = float(value)
  except ValueError:
    number = math.nan
  if not math.isfinite(number):
    problems.append(f"{where}: {column} must be a number in mm or empty, got {value!r}")
    return None
  return number


def _parse_pci(values: Mapping[str, str], label_p: int | None, label_sb: int | None, problems: list[str],
               where: str) -> tuple[int | None, ...]:
  """A row's 13 PCI region scores (None where empty), appending one line per problem: a bad score, a `pci` total
  that is not a whole number 0-39 or not their sum (checked when all 13 are recorded), label_p=0 with a
  positive region, label_sb contradicting the small-bowel regions 9-12. Bad scores are returned as None."""
  scores: list[int | None] = []
  bad = []
  for column in PCI_SCORE_COLUMNS:
    value = values[column]
    if not value:
      scores.append(None)
    elif PCI_SCORE_PATTERN.fullmatch(value):
      scores.append(int(value))
    else:
      bad.append(f"{column}={value!r}")
      scores.append(None)
  if bad:
    problems.append(f"{where}: PCI region scores must be 0, 1, 2 or 3 (0 none, 1 up to 0.5 cm, 2 up to 5 cm, 3 "
                    f"larger or confluent) or empty (not recorded), got {', '.join(bad)}")
    return tuple(scores)
  total = values.get(PCI_TOTAL_COLUMN, "")
  if total:
    if not re.fullmatch(r"[0-9]+", total) or int(total) > contracts.NUM_PCI_REGIONS * contracts.PCI_MAX_SCORE:
      problems.append(f"{where}: pci (the total) must be a whole number 0-"
                      f"{contracts.NUM_PCI_REGIONS * contracts.PCI_MAX_SCORE} or empty, got {total!r}")
    elif None not in scores and int(total) != sum(scores):
      problems.append(f"{where}: pci is {total} but the 13 region scores pci_0 ... pci_12 sum to {sum(scores)}; "
                      "correct the total or the regions")
  positive = [f"pci_{region}" for region, score in enumerate(scores) if score]
  if label_p == 0 and positive:
    problems.append(f"{where}: label_p=0 but {', '.join(positive)} positive; a patient with disease in a region "
                    "has peritoneal dissemination (label_p=1) or the region score must be 0")
  small_bowel = [scores[region] for region in contracts.PCI_SMALL_BOWEL_REGIONS]
  small_bowel_names = ", ".join(f"pci_{region}" for region in contracts.PCI_SMALL_BOWEL_REGIONS)
  if label_sb == 1 and None not in small_bowel and not any(small_bowel):
    problems.append(f"{where}: label_sb=1 but the small-bowel regions {small_bowel_names} are all 0; small-bowel "
                    "disease lies in one of them")
  if label_sb == 0 and any(small_bowel):
    named = [f"pci_{region}" for region in contracts.PCI_SMALL_BOWEL_REGIONS if scores[region]]
    problems.append(f"{where}: label_sb=0 but small-bowel region(s) {', '.join(named)} positive; set label_sb=1 or "
                    "the region score(s) to 0")
  return tuple(scores)


def _check_patient_id(patient_id: str, problems: list[str], where: str) -> bool:
  if not patient_id:
    problems.append(f"{where}: patient_id is empty")
    return False
  if not PATIENT_ID_PATTERN.fullmatch(patient_id):
    bad = "".join(sorted({char for char in patient_id if not PATIENT_ID_PATTERN.fullmatch(char)}))
    problems.append(f"{where}: patient_id {patient_id!r} has characters other than letters, digits, '.', '_' and"
                    f" '-' ({bad!r}); it becomes a file name")
    return False
  if patient_id.startswith("."):
    problems.append(f"{where}: patient_id {patient_id!r} must not start with '.' (hidden or parent-folder name)")
    return False
  if len(patient_id) > MAX_PATIENT_ID_LENGTH:
    problems.append(f"{where}: patient_id is longer than {MAX_PATIENT_ID_LENGTH} characters")
    return False
  return True


def _check_header(header: list[str], problems: list[str]) -> list[str]:
  """Checks column names; returns the covariate columns in file order."""
  seen = set()
  for name in header:
    if name in seen:
      problems.append(f"row 1: column {name!r} appears more than once")
    seen.add(name)
  missing = [name for name in REQUIRED_COLUMNS if name not in seen]
  if missing:
    problems.append(f"row 1: missing required column(s) {', '.join(missing)}; the header must include "
                    f"{', '.join(REQUIRED_COLUMNS)}")
  present = [name for name in PCI_SCORE_COLUMNS if name in seen]
  if present and len(present) != len(PCI_SCORE_COLUMNS):
    absent = [name for name in PCI_SCORE_COLUMNS if name not in seen]
    problems.append(f"row 1: the PCI region columns come as a set: {', '.join(present)} given but "
                    f"{', '.join(absent)} missing; add all of pci_0 ... pci_{len(PCI_SCORE_COLUMNS) - 1} (leave a "
                    "cell empty where a region was not recorded) or remove them")
  covariates = []
  for name in header:
    if name in REQUIRED_COLUMNS or name in OPTIONAL_COLUMNS or name in covariates:
      continue
    if not name:
      problems.append("row 1: a column has an empty name (give it a name or delete it)")
    elif not COVARIATE_NAME_PATTERN.fullmatch(name):
      problems.append(f"row 1: covariate column {name!r} may only use letters, digits, '_', '.' and '-'")
    elif name in RESERVED_COVARIATE_NAMES:
      problems.append(f"row 1: covariate column {name!r} clashes with a record feature; rename it")
    covariates.append(name)
  return covariates


def _parse_row(row_number: int, cells: list[str], header: list[str], covariate_names: Sequence[str],
               manifest_path: str, first_row_of_id: dict[str, int], problems: list[str],
               allow_missing_labels: bool = False) -> ManifestRow | None:
  """One patient row -> ManifestRow, appending each problem (with its row number) to `problems`.

  `first_row_of_id` maps each case-folded patient_id seen so far to its row, for the duplicate check; None is
  returned only for a row whose field count does not match the header (nothing else can be read from it).
  With `allow_missing_labels`, an empty label is None (unknown); otherwise unparsable labels are reported and
  stored as 0 (the manifest is refused anyway).
  """
  where = f"row {row_number}"
  if len(cells) != len(header):
    problems.append(f"{where}: has {len(cells)} fields but the header has {len(header)} (a stray comma or an "
                    "unquoted comma inside a value?)")
    return None
  values = {name: cell.strip() for name, cell in zip(header, cells)}
  patient_id = values.get(PATIENT_ID_COLUMN, "")
  if PATIENT_ID_COLUMN in values:
    where = f"row {row_number} (patient_id {patient_id!r})" if patient_id else where
    if _check_patient_id(patient_id, problems, f"row {row_number}"):
      folded = patient_id.lower()
      if folded in first_row_of_id:
        problems.append(f"row {row_number}: patient_id {patient_id!r} duplicates row {first_row_of_id[folded]}"
                        " (IDs must be unique, ignoring case)")
      else:
        first_row_of_id[folded] = row_number
  dicom_dir = values.get(DICOM_DIR_COLUMN, "")
  if DICOM_DIR_COLUMN in values and not dicom_dir:
    problems.append(f"{where}: dicom_dir is empty")
  label_p = label_sb = None
  if LABEL_P_COLUMN in values:
    label_p = _parse_label(values[LABEL_P_COLUMN], LABEL_P_COLUMN, problems, where, allow_missing_labels)
  if LABEL_SB_COLUMN in values:
    label_sb = _parse_label(values[LABEL_SB_COLUMN], LABEL_SB_COLUMN, problems, where, allow_missing_labels)
  if label_p == 0 and label_sb == 1:
    problems.append(f"{where}: label_sb=1 with label_p=0; small-bowel dissemination is peritoneal "
                    "dissemination, so label_p must be 1")
  z_min_mm = _parse_optional_float(values.get(Z_MIN_COLUMN, ""), Z_MIN_COLUMN, problems, where)
  z_max_mm = _parse_optional_float(values.get(Z_MAX_COLUMN, ""), Z_MAX_COLUMN, problems, where)
  if z_min_mm is not None and z_max_mm is not None and z_min_mm >= z_max_mm:
    problems.append(f"{where}: z_min_mm ({z_min_mm:g}) must be below z_max_mm ({z_max_mm:g})")
  pci_scores = None
  if all(name in values for name in PCI_SCORE_COLUMNS):
    pci_scores = _parse_pci(values, label_p, label_sb, problems, where)
  series_uid = values.get(SERIES_UID_COLUMN, "") or None
  if series_uid is not None and (len(series_uid) > MAX_SERIES_UID_LENGTH
                                 or not SERIES_UID_PATTERN.fullmatch(series_uid)):
    # The value itself is not echoed: it is a DICOM UID.
    problems.append(f"{where}: series_uid is not a DICOM UID (digits and dots, at most "
                    f"{MAX_SERIES_UID_LENGTH} characters)")
  return ManifestRow(
      row_number=row_number, patient_id=patient_id,
      dicom_dir=resolve_dicom_dir(manifest_path, dicom_dir) if dicom_dir else "",
      label_p=label_p if label_p is not None or allow_missing_labels else 0,
      label_sb=label_sb if label_sb is not None or allow_missing_labels else 0,
      z_min_mm=z_min_mm, z_max_mm=z_max_mm, series_uid=series_uid,
      covariates={name: values[name] for name in covariate_names}, pci_scores=pci_scores)


def parse_manifest_text(text: str, manifest_path: str, *, allow_missing_labels: bool = False) -> Manifest:
  """Validates manifest CSV text (see the module docstring); `manifest_path` resolves relative folders.

  `allow_missing_labels` (for `predict --manifest`): an empty label_p or label_sb means unknown (None).

  Raises:
    ManifestError: listing every problem, one per line, each with its row number.
  """
  problems: list[str] = []
  if text.startswith("\ufeff"):  # Spreadsheet exports often begin with a byte-order mark.
    text = text[1:]
  reader = csv.reader(io.StringIO(text, newline=""))
  try:
    lines = list(reader)
  except csv.Error as error:
    raise ManifestError(f"manifest {manifest_path} is not valid CSV ({error})") from None
  # Rows that are entirely empty (trailing blank lines) are ignored; row numbers still count them.
  numbered = [(index + 1, line) for index, line in enumerate(lines) if any(cell.strip() for cell in line)]
  if not numbered:
    raise ManifestError(f"manifest {manifest_path} is empty; it needs a header row with "
                        f"{', '.join(REQUIRED_COLUMNS)} and one row per patient")
  header_number, header = numbered[0]
  header = [name.strip() for name in header]
  if header_number != 1:
    problems.append(f"row {header_number}: the header must be the first row")
  covariate_names = _check_header(header, problems)
  if len(numbered) == 1:
    problems.append("the manifest has a header but no patient rows")

  rows = []
  first_row_of_id: dict[str, int] = {}
  for row_number, cells in numbered[1:]:
    row = _parse_row(row_number, cells, header, covariate_names, manifest_path, first_row_of_id, problems,
                     allow_missing_labels)
    if row is not None:
      rows.append(row)

  if problems:
    shown = problems[:MAX_PROBLEMS_SHOWN]
    if len(problems) > len(shown):
      shown.append(f"... and {len(problems) - len(shown)} more problem(s)")
    error = ManifestError(f"manifest {manifest_path} has {len(problems)} problem(s); fix them all and rerun:\n"
                          + "\n".join(shown))
    error.problems = tuple(problems)  # type: ignore[attr-defined]
    raise error
  return Manifest(path=manifest_path, rows=tuple(rows), covariate_names=tuple(covariate_names),
                  has_pci_scores=all(name in header for name in PCI_SCORE_COLUMNS))


def failure_line(text: str, row: ManifestRow) -> str:
  """A patient's failure message as one line, with the row's folder and series UID withheld: both are user input
  that may carry PHI (PACS folders are named after patients). Used by every stage that reports a refused study."""
  for secret, shown in ((row.dicom_dir, "<dicom_dir>"), (row.series_uid, "<series_uid>")):
    if secret:
      text = text.replace(secret, shown)
  return " ".join(text.split())


def read_manifest(path: str, *, allow_missing_labels: bool = False) -> Manifest:
  """Reads and validates the manifest CSV at `path` (local or any tf.io.gfile URL); see `parse_manifest_text`.

  Raises:
    ManifestError: if the file is missing or unreadable, or listing every problem found in it.
  """
  if not tf.io.gfile.exists(path):
    raise ManifestError(f"manifest {path} does not exist; pass --manifest=<path to the cohort CSV>")
  try:
    with tf.io.gfile.GFile(path, "rb") as handle:
      data = handle.read()
    text = data.decode("utf-8")
  except UnicodeDecodeError:
    raise ManifestError(f"manifest {path} is not UTF-8 text; save it as UTF-8 CSV") from None
  except (tf.errors.OpError, OSError) as error:
    raise ManifestError(f"manifest {path} cannot be read ({type(error).__name__})") from None
  return parse_manifest_text(text, path, allow_missing_labels=allow_missing_labels)
