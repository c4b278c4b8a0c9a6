"""Tests of manifest validation: every problem reported at once, with its row number."""

import os

import pytest

from pdx_tf.data import manifest
from pdx_tf.errors import ManifestError


def _problems(text, path="/data/cohort/manifest.csv"):
  with pytest.raises(ManifestError) as raised:
    manifest.parse_manifest_text(text, path)
  return list(raised.value.problems), str(raised.value)


def test_valid_manifest_parses_overrides_and_covariates(tmp_path):
  path = tmp_path / "manifest.csv"
  path.write_text(
      "\ufeffpatient_id,dicom_dir,label_p,label_sb,ascites,z_min_mm,z_max_mm,series_uid,site\n"
      "P001,dicom/P001,1,1,yes,-250.5,10,1.2.3.4,A\n"
      "P002,/abs/P002,0,0,no,,,,B\n"
      "\n")
  parsed = manifest.read_manifest(str(path))
  assert parsed.covariate_names == ("ascites", "site")
  first, second = parsed.rows
  assert first.row_number == 2 and second.row_number == 3
  assert first.dicom_dir == os.path.join(str(tmp_path), "dicom", "P001")
  assert second.dicom_dir == "/abs/P002"
  assert (first.label_p, first.label_sb, first.z_min_mm, first.z_max_mm, first.series_uid) == (1, 1, -250.5, 10.0,
                                                                                                "1.2.3.4")
  assert (second.z_min_mm, second.z_max_mm, second.series_uid) == (None, None, None)
  assert dict(first.covariates) == {"ascites": "yes", "site": "A"}


def test_every_problem_is_reported_with_its_row_number():
  text = ("patient_id,dicom_dir,label_p,label_sb,pci\n"
          "P1,d1,1,1,3\n"            # row 2: fine
          "P2,d2,0,1,0\n"            # row 3: sb without p
          "p1,d3,1,0,2\n"            # row 4: duplicate of P1 ignoring case
          "bad id,d4,1,0,1\n"        # row 5: bad characters
          "P5,d5,yes,2,1\n"          # row 6: two bad labels
          "P6,,1,0,1\n"              # row 7: empty dicom_dir
          "P7,d7,1,0\n"              # row 8: too few fields
          "../x,d8,1,0,1\n")         # row 9: path characters
  problems, message = _problems(text)
  assert len(problems) == 8, problems
  assert any(p.startswith("row 3") and "label_sb=1 with label_p=0" in p for p in problems)
  assert any(p.startswith("row 4") and "duplicates row 2" in p for p in problems)
  assert any(p.startswith("row 5") and "characters" in p for p in problems)
  assert sum(p.startswith("row 6") for p in problems) == 2
  assert any(p.startswith("row 7") and "dicom_dir is empty" in p for p in problems)
  assert any(p.startswith("row 8") and "fields" in p for p in problems)
  assert any(p.startswith("row 9") for p in problems)
  # The message holds one problem a line after the summary line.
  assert message.splitlines()[0].endswith("fix them all and rerun:")
  assert len(message.splitlines()) == 1 + len(problems)


def test_missing_and_bad_columns():
  problems, _ = _problems("patient_id,label_p,image,bad name\nP1,1,x,y\n")
  assert any("missing required column(s) dicom_dir, label_sb" in p for p in problems)
  assert any("'image' clashes" in p for p in problems)
  assert any("'bad name'" in p for p in problems)
  assert all(p.startswith("row 1") for p in problems)


def test_overrides_must_parse():
  problems, _ = _problems("patient_id,dicom_dir,label_p,label_sb,z_min_mm,z_max_mm,series_uid\n"
                          "P1,d,1,0,abc,5,1.2.3\n"
                          "P2,d,1,0,10,5,\n"
                          "P3,d,1,0,,,not-a-uid\n"
                          "P4,d,1,0,nan,,\n")
  assert len(problems) == 4, problems
  assert problems[0].startswith("row 2") and "z_min_mm" in problems[0]
  assert problems[1].startswith("row 3") and "must be below" in problems[1]
  assert problems[2].startswith("row 4") and "series_uid" in problems[2] and "not-a-uid" not in problems[2]
  assert problems[3].startswith("row 5")


def test_empty_and_missing_files(tmp_path):
  with pytest.raises(ManifestError, match="empty"):
    manifest.parse_manifest_text("\n\n", "m.csv")
  with pytest.raises(ManifestError, match="no patient rows"):
    manifest.parse_manifest_text("patient_id,dicom_dir,label_p,label_sb\n", "m.csv")
  with pytest.raises(ManifestError, match="does not exist"):
    manifest.read_manifest(str(tmp_path / "nope.csv"))


def test_failure_line_withholds_the_rows_folder_and_series_and_is_one_line():
  row = manifest.ManifestRow(row_number=2, patient_id="p1", dicom_dir="/pacs/DOE_JANE_19650312",
                             label_p=1, label_sb=0, z_min_mm=None, z_max_mm=None, series_uid="1.2.840.99.7",
                             covariates={})
  line = manifest.failure_line("cannot read /pacs/DOE_JANE_19650312/x:\n  series 1.2.840.99.7   missing", row)
  assert line == "cannot read <dicom_dir>/x: series <series_uid> missing"
  bare = manifest.ManifestRow(row_number=3, patient_id="p2", dicom_dir="", label_p=0, label_sb=0, z_min_mm=None,
                              z_max_mm=None, series_uid=None, covariates={})
  assert manifest.failure_line("a\tb\n", bare) == "a b"
