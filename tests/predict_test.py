"""Tests for pdx_tf.serving.predict and `python -m predict`: end to end on a phantom study, PHI, one-line errors."""

import json
import os
import subprocess
import sys

import pydicom
import pytest

from pdx_tf import io_utils, phantom
from pdx_tf.errors import DicomError, ExportError
from pdx_tf.serving import predict
from pdx_tf.testing import fake_cells

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PHANTOM = phantom.PhantomConfig(num_patients=4, matrix_size=64, pixel_spacing_mm=6.0, slice_spacing_mm=10.0,
                                scanner_quirks=False)


def _header_identifiers(folder: str) -> set[str]:
  """Every UID, date and canary-bearing string in a study's headers: none may reach an output."""
  values = set()
  for name in os.listdir(folder):
    dataset = pydicom.dcmread(os.path.join(folder, name), stop_before_pixels=True)
    for element in dataset.iterall():
      if element.VR in ("UI", "DA", "DT", "PN", "LO", "SH") and element.value:
        text = str(element.value)
        if element.VR == "UI" and text.startswith("1.2.840.10008."):
          continue  # standard class and transfer-syntax UIDs, not identifiers
        if len(text) >= 6 and text not in ("ORIGINAL", "PRIMARY", "AXIAL"):
          values.add(text)
  return values


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("predict")
  export_dir = fake_cells.shared_fake_exports(tmp_path_factory)["export_dir"]
  patient = phantom.generate_patient(PHANTOM, 1)
  study = str(root / "study")
  phantom.write_ct_series(study, patient.hu, patient.z_mm, PHANTOM.pixel_spacing_mm, key=11, patient_index=7,
                          include_localizer=True)
  return {"root": root, "export_dir": export_dir, "study": study}


def test_predict_end_to_end_writes_outputs_without_phi(setup):
  output_dir = str(setup["root"] / "out")
  models = (os.path.join(setup["export_dir"], "pdx_sb"), os.path.join(setup["export_dir"], "pdx_p", "1"))
  config = predict.PredictConfig(
      model_dirs=models, dicom_dir=setup["study"], output_dir=output_dir, patient_id="case-017", num_gradcam_slices=2)
  result = predict.predict_study(config)
  written = io_utils.read_json(os.path.join(output_dir, "prediction.json"))
  assert written == json.loads(json.dumps(result))
  assert written["patient_id"] == "case-017"
  assert list(written["tasks"]) == ["p", "sb"]
  p_result, sb_result = written["tasks"]["p"], written["tasks"]["sb"]
  assert p_result["model"]["num_models"] == 2 and sb_result["model"]["num_models"] == 1
  assert sb_result["patient_uncertainty"] == 0.0
  num_slices = written["region"]["num_slices"]
  assert num_slices >= 8 and len(p_result["slices"]) == num_slices
  # sb was "trained" with the max rule: the patient probability is the highest slice probability.
  assert sb_result["patient_probability"] == pytest.approx(
      max(entry["probability"] for entry in sb_result["slices"]), abs=1e-5)
  for task in ("p", "sb"):
    overlays = written["tasks"][task]["gradcam"]
    assert len(overlays) == 2
    slices = {entry["slice_index"]: entry["probability"] for entry in written["tasks"][task]["slices"]}
    assert overlays[0]["slice_index"] == max(slices, key=lambda index: (slices[index], -index))
    for overlay in overlays:
      with open(os.path.join(output_dir, overlay["png"]), "rb") as handle:
        assert handle.read(4) == b"\x89PNG"
  assert os.path.exists(os.path.join(output_dir, "summary.png"))
  config_written = io_utils.read_json(os.path.join(output_dir, "config.json"))
  assert config_written["dicom_dir"] == predict.WITHHELD
  assert "p: probability" in predict.format_prediction(result)

  forbidden = set(phantom.PHI_CANARIES) | _header_identifiers(setup["study"]) | {"ZZCANARY"}
  assert any(value.startswith("1.2.") for value in forbidden)  # the UIDs really are in the list
  for folder, _, files in os.walk(output_dir):
    for name in files:
      with open(os.path.join(folder, name), "rb") as handle:
        content = handle.read()
      for value in forbidden:
        assert value.encode() not in content, f"{value!r} leaked into {name}"
      assert not any(value in name for value in forbidden)


def test_not_an_export_fails_with_one_line(setup, tmp_path):
  with pytest.raises(ExportError, match="is not a pdx export"):
    predict.predict_study(predict.PredictConfig(model_dirs=(str(tmp_path),), dicom_dir=setup["study"],
                                                output_dir=str(tmp_path / "out")))
  result = subprocess.run(
      [sys.executable, "-m", "predict", f"--model={setup['study']}", f"--dicom_dir={setup['study']}",
       f"--output_dir={tmp_path / 'out2'}"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("predict: error:")]
  assert len(errors) == 1 and "is not a pdx export" in errors[0], result.stderr[-1500:]


def test_study_without_ct_fails_with_one_line(setup, tmp_path):
  study = tmp_path / "no_ct"
  study.mkdir()
  (study / "notes.txt").write_text("not a DICOM file")
  model = os.path.join(setup["export_dir"], "pdx_p")
  with pytest.raises(DicomError) as raised:
    predict.predict_study(predict.PredictConfig(model_dirs=(model,), dicom_dir=str(study),
                                                output_dir=str(tmp_path / "out"), patient_id="case-9"))
  message = str(raised.value)
  assert "\n" not in message and message.startswith("patient case-9:")
  assert not os.path.exists(tmp_path / "out" / "prediction.json")
  result = subprocess.run(
      [sys.executable, "-m", "predict", f"--model={model}", f"--dicom_dir={study}",
       f"--output_dir={tmp_path / 'out2'}"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"), check=False)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("predict: error:")]
  assert len(errors) == 1, result.stderr[-1500:]


def test_config_validation():
  with pytest.raises(ValueError, match="patient_id"):
    predict.PredictConfig(model_dirs=("x",), dicom_dir="d", output_dir="o", patient_id="Doe^John")
  with pytest.raises(ValueError, match="--model"):
    predict.PredictConfig(model_dirs=(), dicom_dir="d", output_dir="o")


def test_two_exports_of_one_task_are_refused(setup):
  model = os.path.join(setup["export_dir"], "pdx_sb")
  with pytest.raises(ExportError, match="same task"):
    predict.load_exports([model, os.path.join(model, "1")])


def test_predict_binary_prints_no_phi_and_names_no_file_after_it(setup, tmp_path):
  """The console (stdout and stderr of `python -m predict`) and the output file names carry no header value."""
  output_dir = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "predict", f"--model={os.path.join(setup['export_dir'], 'pdx_p', '1')}",
       f"--dicom_dir={setup['study']}", f"--output_dir={output_dir}", "--patient_id=case-017", "--gradcam_slices=1",
       "--gradcam_max_models=2"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
      env=dict(os.environ, PYTHONUNBUFFERED="1"), check=False)
  assert result.returncode == 0, result.stderr[-1500:]
  console = result.stdout + result.stderr
  assert "p: probability" in console  # the console really was captured (predict prints its summary)
  forbidden = set(phantom.PHI_CANARIES) | _header_identifiers(setup["study"]) | {"ZZCANARY"}
  assert any(value.startswith("1.2.") for value in forbidden)
  for value in forbidden:
    assert value not in console, f"{value!r} printed by python -m predict"
  names = [os.path.relpath(os.path.join(folder, name), output_dir)
           for folder, _, files in os.walk(output_dir) for name in files]
  assert "prediction.json" in names
  for name in names:
    assert not any(value in name for value in forbidden), name
    with open(os.path.join(output_dir, name), "rb") as handle:
      content = handle.read()
    for value in forbidden:
      assert value.encode() not in content, f"{value!r} leaked into {name}"
