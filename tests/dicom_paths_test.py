"""No path from inside a study reaches a message, an output file or a file name.

PACS exports name folders and files after the patient (name, birth date, MRN, study date). Here a study is laid
out that way, with a damaged file and a stray note, and read through `pdx_tf.data.dicom` and the data pipeline: the
canaries must not appear in any message, warning, log record, console line, output file or output file name.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

import pydicom
import pytest

from pdx_tf import phantom
from pdx_tf.data import dicom
from pdx_tf.errors import DicomError

NAME = "ZZCANARY_DOE_JANE"
BIRTH_DATE = "19650312"
MRN = "MRN8812345"
STUDY_DATE = "20240101"
CANARIES = (NAME, "DOE_JANE", BIRTH_DATE, MRN, STUDY_DATE)
TOKEN = re.compile(r"file#\d{4}-[0-9a-f]{6}")
PHANTOM_CONFIG = phantom.PhantomConfig(num_patients=2, matrix_size=64, pixel_spacing_mm=6.0)


def assert_no_canary(text: str | bytes, where: str) -> None:
  for canary in CANARIES:
    needle = canary.encode("utf-8") if isinstance(text, bytes) else canary
    assert needle not in text, f"{canary} in {where}"


def write_canary_study(study_dir: str, patient_index: int, *, truncate_a_slice: bool) -> list[str]:
  """A phantom patient's series in PACS-style folders and files named after the patient (header canaries too).

  The study also holds a stray note and a damaged DICOM file (file meta only) outside the series; with
  `truncate_a_slice`, one slice of the series loses the end of its pixel data. Returns the series' files.
  """
  patient = phantom.generate_patient(PHANTOM_CONFIG, patient_index)
  scratch = study_dir + ".scratch"
  written = phantom.write_ct_series(scratch, patient.hu, patient.z_mm, PHANTOM_CONFIG.pixel_spacing_mm,
                                    key=patient_index, shuffle_file_names=False, patient_index=patient_index)
  patient_folder = os.path.join(study_dir, f"{NAME}_{BIRTH_DATE}")
  series_folder = os.path.join(patient_folder, f"{STUDY_DATE}_CT_ABDOMEN_{MRN}")
  os.makedirs(series_folder)
  paths = []
  for index, source in enumerate(sorted(written)):
    dataset = pydicom.dcmread(source)
    dataset.PatientName = NAME
    dataset.PatientID = MRN
    dataset.PatientBirthDate = BIRTH_DATE
    dataset.StudyDate = STUDY_DATE
    paths.append(os.path.join(series_folder, f"{NAME}_{BIRTH_DATE}_{MRN}_{STUDY_DATE}_IM{index:04d}.dcm"))
    dataset.save_as(paths[-1], enforce_file_format=True)
  shutil.rmtree(scratch)
  with open(os.path.join(patient_folder, f"notes_{NAME}_{MRN}_{STUDY_DATE}.txt"), "w", encoding="utf-8") as handle:
    handle.write(f"{NAME} born {BIRTH_DATE}, {MRN}, scanned {STUDY_DATE}: oral contrast given.\n")
  with open(paths[0], "rb") as handle:
    head = handle.read(200)  # Preamble and file meta only: a damaged file that no header pass can use.
  with open(os.path.join(patient_folder, f"{NAME}_{BIRTH_DATE}_{MRN}_damaged.dcm"), "wb") as handle:
    handle.write(head)
  if truncate_a_slice:
    victim = paths[len(paths) // 2]
    with open(victim, "rb") as handle:
      data = handle.read()
    with open(victim, "wb") as handle:
      handle.write(data[:-1000])
  return paths


@pytest.fixture
def capture_logs(caplog):
  caplog.set_level(logging.DEBUG)
  return caplog


def test_read_ct_series_names_files_by_token_only(tmp_path, capfd, capture_logs):
  good, bad = str(tmp_path / "export_a"), str(tmp_path / "export_b")
  write_canary_study(good, 0, truncate_a_slice=False)
  write_canary_study(bad, 1, truncate_a_slice=True)
  series = dicom.read_ct_series(good)
  summaries = dicom.find_ct_series(good)
  with pytest.raises(DicomError) as error:
    dicom.read_ct_series(bad)
  texts = {"warnings": " | ".join(series.warnings), "repr": repr(series) + repr(summaries),
           "choice": repr(series.choice.to_json()), "error": str(error.value)}
  # The damaged stray file is reported (by token), the truncated slice refuses the study (by token).
  assert re.fullmatch(r"1 DICOM file\(s\) could not be read and were skipped "
                      r"\(first: file#\d{4}-[0-9a-f]{6}, header incomplete\)", texts["warnings"]), texts["warnings"]
  assert TOKEN.match(texts["error"]) and "truncated" in texts["error"], texts["error"]
  assert TOKEN.fullmatch(summaries[0].first_file)
  captured = capfd.readouterr()
  texts["console"] = captured.out + captured.err
  texts["logs"] = "\n".join(record.getMessage() for record in capture_logs.records)
  for where, text in texts.items():
    assert_no_canary(text, where)
  assert texts["console"] == ""  # Without show_paths nothing is printed at all.


def test_show_paths_prints_paths_to_the_console_only(tmp_path, capfd):
  bad = str(tmp_path / "export")
  paths = write_canary_study(bad, 1, truncate_a_slice=True)
  with pytest.raises(DicomError) as error:
    dicom.read_ct_series(bad, show_paths=True)
  assert_no_canary(str(error.value), "error")
  token = TOKEN.match(str(error.value)).group(0)
  relative = os.path.relpath(paths[len(paths) // 2], bad)
  assert capfd.readouterr().err == f"{token} is {relative}\n"
  assert (token, relative) in dicom.list_file_tokens(bad)


def test_pipeline_outputs_hold_no_path_from_inside_a_study(tmp_path, capfd, capture_logs):
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel  # TensorFlow: import it late.
  from pdx_tf.data import preprocess  # pylint: disable=import-outside-toplevel

  cohort = tmp_path / "cohort"
  write_canary_study(str(cohort / "studies" / "p1"), 0, truncate_a_slice=False)
  write_canary_study(str(cohort / "studies" / "p2"), 1, truncate_a_slice=True)
  manifest_path = str(cohort / "manifest.csv")
  with open(manifest_path, "w", encoding="utf-8") as handle:
    handle.write("patient_id,dicom_dir,label_p,label_sb\np1,studies/p1,1,0\np2,studies/p2,0,0\n")
  output_dir = str(tmp_path / "D")
  config = pipeline.PipelineConfig(
      manifest_path=manifest_path, output_dir=output_dir, preprocess=preprocess.PreprocessConfig(image_size=32),
      augment_factor=1, num_workers=1, allow_failures=True, shard_size_mb=0.05, qc_max_slices=4)
  result = pipeline.run_pipeline(config, progress=True)
  print(result.summary() if hasattr(result, "summary") else result)

  # p1 is in, with the damaged stray file as a warning; p2 failed on its truncated slice. Both name tokens.
  assert [patient_id for patient_id, _ in result.failures] == ["p2"]
  reason = result.failures[0][1]
  assert TOKEN.search(reason) and "truncated" in reason, reason
  marker = pipeline.io_utils.read_json(os.path.join(output_dir, "patients", "p1.json"))
  assert any(TOKEN.search(warning) for warning in marker["warnings"]), marker["warnings"]
  assert marker["series"]["num_slices"] > 0 and "series_uid" not in marker["series"]

  found_files = 0
  for directory, _, names in os.walk(output_dir):
    for name in names:
      path = os.path.join(directory, name)
      assert_no_canary(os.path.relpath(path, output_dir), "an output file name")
      with open(path, "rb") as handle:
        assert_no_canary(handle.read(), os.path.relpath(path, output_dir))
      found_files += 1
  assert {"failures.csv", "dataset.json", "config.json"} <= set(os.listdir(output_dir)) and found_files > 5
  captured = capfd.readouterr()
  assert_no_canary(captured.out + captured.err, "the console")
  assert_no_canary("\n".join(record.getMessage() for record in capture_logs.records), "log records")
  assert_no_canary(reason, "the failure reason")
