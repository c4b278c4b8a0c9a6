"""Tests for `python -m predict --manifest` (pdx_tf.serving.cohort_predict): a cohort with a refused study and an
unlabelled patient, resume, PHI, and the drift flags of pdx_tf.data.input_statistics."""

import csv
import dataclasses
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from pdx_tf import io_utils, phantom
from pdx_tf.data import input_statistics, manifest
from pdx_tf.errors import ExportError, ManifestError
from pdx_tf.serving import cohort_predict, export, predict
from pdx_tf.testing import fake_cells
from tests.predict_test import _header_identifiers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHANTOM = phantom.PhantomConfig(num_patients=24, matrix_size=64, pixel_spacing_mm=6.0, slice_spacing_mm=5.0,
                                scanner_quirks=False)
# Study folders named like a PACS export: the name must never reach an output or the console.
FOLDER_CANARY = "ZZFOLDER^DOE^JANE"


def _write_study(folder, config, patient_index, key):
  patient = phantom.generate_patient(config, patient_index)
  phantom.write_ct_series(str(folder), patient.hu, patient.z_mm, config.pixel_spacing_mm, key=key,
                          patient_index=patient_index)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  root = tmp_path_factory.mktemp("cohort")
  paths = fake_cells.shared_fake_exports(tmp_path_factory)
  studies = root / "studies"
  _write_study(studies / f"{FOLDER_CANARY}_1", PHANTOM, 1, key=21)
  _write_study(studies / f"{FOLDER_CANARY}_2", PHANTOM, 2, key=22)
  broken = studies / f"{FOLDER_CANARY}_3"
  broken.mkdir(parents=True)
  (broken / "ZZCANARY-ID-0003.txt").write_text("not a DICOM file")
  manifest_path = root / "manifest.csv"
  manifest_path.write_text(
      "patient_id,dicom_dir,label_p,label_sb,site\n"
      f"ext-001,studies/{FOLDER_CANARY}_1,1,0,B\n"
      f"ext-002,studies/{FOLDER_CANARY}_2,,,C\n"
      f"ext-003,studies/{FOLDER_CANARY}_3,0,0,B\n")
  models = (os.path.join(paths["export_dir"], "pdx_p", "1"), os.path.join(paths["export_dir"], "pdx_sb"))
  return {"root": root, "studies": studies, "manifest": str(manifest_path), "models": models}


def _read_csv(path):
  with open(path, encoding="utf-8", newline="") as handle:
    return list(csv.DictReader(handle))


def test_cohort_with_refused_study_and_unlabelled_patient_then_resume(cohort):
  output_dir = str(cohort["root"] / "out")
  config = cohort_predict.CohortConfig(model_dirs=cohort["models"], manifest_path=cohort["manifest"],
                                       output_dir=output_dir, num_gradcam_slices=1, gradcam_max_models=1)
  result = cohort_predict.run_cohort(config, progress=False)
  assert result.computed == ("ext-001", "ext-002") and result.num_patients == 2
  rows = _read_csv(os.path.join(output_dir, "patient_predictions.csv"))
  with open(os.path.join(output_dir, "patient_predictions.csv"), encoding="utf-8") as handle:
    assert handle.readline().strip() == ("task,patient_id,label,probability,uncertainty,predicted,drift_flags,"
                                         "site")
  assert [(row["task"], row["patient_id"]) for row in rows] == [
      ("p", "ext-001"), ("p", "ext-002"), ("sb", "ext-001"), ("sb", "ext-002")]
  by_key = {(row["task"], row["patient_id"]): row for row in rows}
  assert by_key["p", "ext-001"]["label"] == "1" and by_key["sb", "ext-001"]["label"] == "0"
  assert by_key["p", "ext-002"]["label"] == "" and by_key["sb", "ext-002"]["label"] == ""  # unknown
  assert by_key["p", "ext-002"]["site"] == "C"
  for (task, patient_id), row in by_key.items():
    prediction = io_utils.read_json(os.path.join(output_dir, patient_id, "prediction.json"))
    values = prediction["tasks"][task]
    assert float(row["probability"]) == pytest.approx(values["patient_probability"], abs=1e-6)
    assert float(row["uncertainty"]) == pytest.approx(values["patient_uncertainty"], abs=1e-6)
    assert row["predicted"] == ("1" if float(row["probability"]) >= 0.5 else "0")
    assert row["drift_flags"] == ""  # the fake exports carry no training statistics: nothing to compare with
    assert len(values["gradcam"]) == 1
  # The p ensemble has 2 models, so its SD is not zero; sb is one model.
  assert float(by_key["p", "ext-001"]["uncertainty"]) > 0 and float(by_key["sb", "ext-001"]["uncertainty"]) == 0
  failures = _read_csv(os.path.join(output_dir, "failures.csv"))
  assert [row["patient_id"] for row in failures] == ["ext-003"]
  assert "\n" not in failures[0]["reason"] and "no" in failures[0]["reason"].lower()
  assert not os.path.exists(os.path.join(output_dir, "patients", "ext-003.json"))

  # Resume after a kill: one patient's marker and output gone; only that patient is redone, same bytes.
  with open(os.path.join(output_dir, "patient_predictions.csv"), "rb") as handle:
    before = handle.read()
  kept_marker = os.path.join(output_dir, "patients", "ext-001.json")
  kept_time = os.stat(kept_marker).st_mtime_ns
  os.remove(os.path.join(output_dir, "patients", "ext-002.json"))
  shutil.rmtree(os.path.join(output_dir, "ext-002"))
  again = cohort_predict.run_cohort(config, progress=False)
  assert again.computed == ("ext-002",) and again.num_patients == 2
  assert os.stat(kept_marker).st_mtime_ns == kept_time
  with open(os.path.join(output_dir, "patient_predictions.csv"), "rb") as handle:
    assert handle.read() == before
  assert os.path.exists(os.path.join(output_dir, "ext-002", "prediction.json"))

  # PHI: no header value, canary or study folder name in any output byte or file name.
  forbidden = (set(phantom.PHI_CANARIES) | {FOLDER_CANARY, "ZZFOLDER", str(cohort["studies"])}
               | _header_identifiers(str(cohort["studies"] / f"{FOLDER_CANARY}_1")))
  for folder, _, files in os.walk(output_dir):
    for name in files:
      with open(os.path.join(folder, name), "rb") as handle:
        content = handle.read()
      for value in forbidden:
        assert value.encode() not in content, f"{value!r} leaked into {name}"
        assert value not in os.path.join(folder, name)[len(output_dir):]


def test_cli_cohort_in_worker_processes_matches_and_keeps_console_clean(cohort):
  """Two spawned workers write the same CSV as one process; the console shows no PHI."""
  reference = str(cohort["root"] / "reference")
  cohort_predict.run_cohort(cohort_predict.CohortConfig(
      model_dirs=cohort["models"], manifest_path=cohort["manifest"], output_dir=reference, num_gradcam_slices=0),
      progress=False)
  output_dir = str(cohort["root"] / "cli")
  result = subprocess.run(
      [sys.executable, "-m", "predict", *(f"--model={model}" for model in cohort["models"]),
       f"--manifest={cohort['manifest']}", f"--output_dir={output_dir}", "--gradcam_slices=0", "--num_workers=2"],
      capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  console = result.stdout + result.stderr
  assert "2 predicted" in console and "1 refused" in console
  refused = [line for line in console.splitlines() if "ext-003 REFUSED" in line]
  assert len(refused) == 1
  for value in set(phantom.PHI_CANARIES) | {FOLDER_CANARY, "ZZFOLDER", str(cohort["studies"])}:
    assert value not in console
  for name in ("patient_predictions.csv", "failures.csv"):
    with open(os.path.join(reference, name), "rb") as first, open(os.path.join(output_dir, name), "rb") as second:
      assert first.read() == second.read()
  assert not os.path.exists(os.path.join(output_dir, "ext-001", "summary.png"))  # Grad-CAM off: no pictures
  assert not os.path.exists(os.path.join(output_dir, "ext-001", "gradcam"))


def test_not_an_export_and_bad_manifest_fail_with_one_line(cohort, tmp_path):
  with pytest.raises(ExportError, match="is not a pdx export"):
    cohort_predict.run_cohort(cohort_predict.CohortConfig(
        model_dirs=(str(tmp_path),), manifest_path=cohort["manifest"], output_dir=str(tmp_path / "o")))
  bad = tmp_path / "bad.csv"
  bad.write_text("patient_id,dicom_dir,label_p,label_sb\nx1,d,2,\n")
  with pytest.raises(ManifestError, match="row 2.*label_p must be 0 or 1 or empty"):
    cohort_predict.run_cohort(cohort_predict.CohortConfig(
        model_dirs=cohort["models"], manifest_path=str(bad), output_dir=str(tmp_path / "o")))
  result = subprocess.run(
      [sys.executable, "-m", "predict", f"--model={tmp_path}", f"--manifest={cohort['manifest']}",
       f"--output_dir={tmp_path / 'o2'}"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("predict: error:")]
  assert len(errors) == 1 and "is not a pdx export" in errors[0], result.stderr[-1500:]


def test_manifest_allows_empty_labels_only_when_asked():
  text = "patient_id,dicom_dir,label_p,label_sb,site\nA1,d1,,,x\nA2,d2,1,,y\n"
  parsed = manifest.parse_manifest_text(text, "/c/m.csv", allow_missing_labels=True)
  assert [(row.label_p, row.label_sb) for row in parsed.rows] == [(None, None), (1, None)]
  assert parsed.rows[0].covariates == {"site": "x"}
  with pytest.raises(ManifestError, match="label_p must be 0 or 1, got empty"):
    manifest.parse_manifest_text(text, "/c/m.csv")


def _statistics(thickness, pixel, slices=40, area=600.0, fraction=None):
  fraction = fraction if fraction is not None else np.full(40, 1 / 40)
  return {"slice_thickness_mm": thickness, "slice_spacing_mm": thickness, "pixel_spacing_mm": pixel,
          "num_slices": slices, "body_area_cm2": [area] * slices, "hu_fraction": list(fraction)}


def test_drift_flags_on_statistics():
  training = input_statistics.aggregate([_statistics(5.0, 0.7, 40 + index, 550 + 10 * index) for index in range(10)]
                                        + [None])
  assert training["num_patients"] == 10
  assert training["slice_thickness_mm"]["min"] == 5.0 and training["pixel_spacing_mm"]["max"] == 0.7
  assert training["num_slices"]["quantiles"]["50"] == pytest.approx(44.5)
  assert input_statistics.drift_flags(_statistics(5.0, 0.7, 45, 600.0), training) == []
  thin = input_statistics.drift_flags(_statistics(1.0, 0.7, 45, 600.0), training)
  assert len(thin) == 2 and thin[0] == "slice thickness 1 mm outside training 5-5 mm"
  assert thin[1] == "slice spacing 1 mm outside training 5-5 mm"
  fine = input_statistics.drift_flags(_statistics(5.0, 0.3, 45, 600.0), training)
  assert fine == ["pixel spacing 0.3 mm outside training 0.7-0.7 mm"]
  bone = np.zeros(40)
  bone[-1] = 1.0  # every body voxel at 1000 HU
  flags = input_statistics.drift_flags(_statistics(5.0, 0.7, 45, 600.0, bone), training)
  assert len(flags) == 1 and flags[0].startswith("HU histogram of the body")
  assert input_statistics.drift_flags(_statistics(1.0, 0.3), None) == []


def test_drift_flag_for_thin_slices_and_fine_pixels_end_to_end(cohort, tmp_path_factory):
  """Training at 5 mm slices and 6 mm pixels; a 1 mm-slice study and a 3 mm-pixel study are flagged (native
  thickness, although the 1 mm study is averaged into 5 mm slabs), an in-distribution study is not."""
  root = tmp_path_factory.mktemp("drift")
  exports = predict.load_exports(cohort["models"][:1])
  training = []
  for index in range(3):
    folder = root / f"train{index}"
    _write_study(folder, PHANTOM, 10 + index, key=40 + index)
    training.append(predict.read_study(str(folder), exports).statistics[0])
  summary = input_statistics.aggregate(training)
  assert summary["slice_thickness_mm"]["max"] == 5.0 and summary["pixel_spacing_mm"]["min"] == 6.0
  # An export of the same models whose metadata carries the training statistics.
  version_dir = str(root / "X" / "pdx_p" / "1")
  shutil.copytree(exports[0][0], version_dir)
  metadata_path = os.path.join(version_dir, export.METADATA_FOLDER, export.METADATA_FILE)
  metadata = io_utils.read_json(metadata_path)
  metadata["input_statistics"] = summary
  metadata["region"]["slice_spacing_mm"] = 5.0  # as the pipeline's default records: thin slices -> 5 mm slabs
  io_utils.atomic_write_json(metadata_path, metadata)

  _write_study(root / "inside", PHANTOM, 20, key=50)
  _write_study(root / "thin", dataclasses.replace(PHANTOM, slice_spacing_mm=1.0), 20, key=51)
  _write_study(root / "fine", dataclasses.replace(PHANTOM, pixel_spacing_mm=3.0, matrix_size=128), 20, key=52)
  manifest_path = root / "manifest.csv"
  manifest_path.write_text("patient_id,dicom_dir,label_p,label_sb\ninside,inside,0,0\nthin,thin,0,0\n"
                           "fine,fine,0,0\n")
  output_dir = str(root / "out")
  cohort_predict.run_cohort(cohort_predict.CohortConfig(
      model_dirs=(version_dir,), manifest_path=str(manifest_path), output_dir=output_dir, num_gradcam_slices=0),
      progress=False)
  flags = {row["patient_id"]: row["drift_flags"] for row in _read_csv(os.path.join(output_dir,
                                                                                    "patient_predictions.csv"))}
  assert flags["inside"] == ""
  assert "slice thickness 1 mm outside training 5-5 mm" in flags["thin"].split(";")
  assert "pixel spacing 3 mm outside training 6-6 mm" in flags["fine"].split(";")
  prediction = io_utils.read_json(os.path.join(output_dir, "thin", "prediction.json"))
  assert "slice thickness 1 mm outside training 5-5 mm" in prediction["tasks"]["p"]["drift_flags"]
  assert prediction["drift_flags"] == prediction["tasks"]["p"]["drift_flags"]
  assert prediction["tasks"]["p"]["region"]["num_slices"] < 236 // 2  # the thin study was averaged into slabs


def test_export_copies_input_statistics_from_run_json(tmp_path):
  folders = fake_cells.write_fake_cells(str(tmp_path / "runs"), "p", cells=((0, 0),), image_size=32)
  summary = input_statistics.aggregate([_statistics(5.0, 0.7)])
  run_path = os.path.join(folders[0], "run.json")
  run = io_utils.read_json(run_path)
  run["input_statistics"] = summary
  io_utils.atomic_write_json(run_path, run)
  version_dir = export.export_models(folders, str(tmp_path / "X"), "p")
  assert export.read_export(version_dir)[1]["input_statistics"] == summary
  run.pop("input_statistics")
  assert export.input_statistics([export.CellRun(folders[0], 0, 0, run)]) is None
