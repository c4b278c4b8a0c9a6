"""Exceptions with one-line, actionable reasons.

Library code raises these; the binaries catch `PdxError` at the top and print the message on one line.
"""


class PdxError(ValueError):
  """Base class: a user-facing problem whose message says what is wrong and what to do."""


class ManifestError(PdxError):
  """The cohort manifest CSV is invalid (the message lists every problem with its row number)."""


class DicomError(PdxError):
  """A DICOM study cannot be turned into a CT volume (the message names the file and the reason)."""


class RegionError(PdxError):
  """The abdominal region cannot be found in a CT volume (e.g. a head or chest-only study)."""


class RecordsError(PdxError):
  """TFRecords or dataset.json do not match what this code expects (schema version, hashes, counts)."""


class RunsError(PdxError):
  """Run artifacts (splits.json, run.json, predictions) are missing, duplicated or inconsistent."""


class ExportError(PdxError):
  """A model folder is not a pdx export, or an export cannot be written."""
