"""Tests for pdx_tf.serving.export and pdx_tf.serving.signatures: layout, versions, signatures, serving == Keras, TF Serving."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.configs import to_dict as configs_to_dict
from pdx_tf.data import preprocess
from pdx_tf.errors import ExportError
from pdx_tf.serving import export
from pdx_tf.testing import fake_cells

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
TOP_K = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  """Two fake cells of task p exported as the ensemble (version 1) and r00_f01 alone (version 2)."""
  import keras  # pylint: disable=import-outside-toplevel

  paths = fake_cells.shared_fake_exports(tmp_path_factory)
  folders = [fake_cells.cell_folder(paths["runs_dir"], "p", 0, fold) for fold in (0, 1)]
  models = [keras.saving.load_model(os.path.join(folder, "model.keras"), compile=False) for folder in folders]
  return {
      "runs_dir": paths["runs_dir"], "folders": folders, "export_dir": paths["export_dir"],
      "ensemble_dir": paths["p_ensemble"], "single_dir": paths["p_single"], "models": models,
      "ensemble": tf.saved_model.load(paths["p_ensemble"]), "single": tf.saved_model.load(paths["p_single"]),
  }


def _slices(seed=3, count=5, height=80, width=72):
  return fake_cells.fake_hu_slices(seed, count, height, width)


def _keras_probabilities(models, hu):
  """Per-model slice probabilities [M, N] from the pipeline's preprocessing and the Keras models.

  `predict` runs the model as a graph, like serving; eager calls differ by up to ~2e-5 on these deliberately
  steep fake models (oneDNN fuses ops differently in graphs), which is float noise, not a preprocessing gap.
  """
  images = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=IMAGE_SIZE))
  images = images.numpy().astype(np.float32)
  return np.stack([model.predict(images, verbose=0).reshape(-1) for model in models])


def test_layout_versions_and_metadata(exported):
  model_dir = os.path.join(exported["export_dir"], "pdx_p")
  assert exported["ensemble_dir"] == os.path.join(model_dir, "1")
  assert exported["single_dir"] == os.path.join(model_dir, "2")
  assert sorted(os.listdir(model_dir)) == ["1", "2"]  # no temporary folder left behind
  for version_dir in (exported["ensemble_dir"], exported["single_dir"]):
    assert os.path.exists(os.path.join(version_dir, "saved_model.pb"))
    assert os.path.isdir(os.path.join(version_dir, "variables"))
  metadata = io_utils.read_json(os.path.join(exported["ensemble_dir"], "assets.extra", "pdx_export.json"))
  assert metadata["format"] == "pdx-tf-export" and metadata["task"] == "p" and metadata["version"] == 1
  assert metadata["kind"] == "ensemble" and metadata["num_models"] == 2
  assert [(cell["repeat"], cell["fold"]) for cell in metadata["cells"]] == [(0, 0), (0, 1)]
  # The image size has one holder, preprocess (the top-level copy of older exports is gone).
  assert "image_size" not in metadata and metadata["preprocess"]["image_size"] == IMAGE_SIZE
  assert metadata["aggregation"] == "topk_mean" and metadata["aggregation_top_k"] == TOP_K
  # At 32 px out_relu is 1x1: the export names the layer predict explains, the first with a map >= 7x7.
  assert metadata["gradcam"] == {"backbone_layer": "mobilenetv2", "target_layer": "block_3_expand_relu"}
  for cell in metadata["cells"]:
    path = os.path.join(exported["ensemble_dir"], "assets.extra", cell["keras_model"])
    assert io_utils.sha256_file(path) == cell["sha256"]
  single = io_utils.read_json(os.path.join(exported["single_dir"], "assets.extra", "pdx_export.json"))
  assert single["kind"] == "single" and [(c["repeat"], c["fold"]) for c in single["cells"]] == [(0, 1)]
  config = io_utils.read_json(os.path.join(exported["single_dir"], "assets.extra", "config.json"))
  assert config["cells"] == ["r00_f01"] and config["task"] == "p"


def test_existing_version_is_never_overwritten(exported):
  pb_path = os.path.join(exported["ensemble_dir"], "saved_model.pb")
  before = io_utils.sha256_file(pb_path)
  with pytest.raises(ExportError, match="already exists"):
    export.export_models(exported["folders"][:1], exported["export_dir"], "p", version=1)
  assert io_utils.sha256_file(pb_path) == before
  assert sorted(os.listdir(os.path.join(exported["export_dir"], "pdx_p"))) == ["1", "2"]


def test_serving_default_equals_keras_ensemble_mean_and_std(exported):
  hu = _slices()
  outputs = exported["ensemble"].signatures["serving_default"](hu=tf.constant(hu))
  per_model = _keras_probabilities(exported["models"], hu)
  assert per_model.std(axis=0).max() > 1e-3  # the two fake models really differ
  assert outputs["probability"].dtype == tf.float32 and outputs["uncertainty"].dtype == tf.float32
  np.testing.assert_allclose(outputs["probability"].numpy(), per_model.mean(axis=0), atol=1e-5)
  np.testing.assert_allclose(outputs["uncertainty"].numpy(), per_model.std(axis=0), atol=1e-5)


def test_single_cell_matches_its_model_with_zero_uncertainty(exported):
  hu = _slices(seed=4, count=3, height=64, width=90)  # any H and W
  outputs = exported["single"].serving_default(tf.constant(hu))
  expected = _keras_probabilities(exported["models"][1:], hu)[0]
  np.testing.assert_allclose(outputs["probability"].numpy(), expected, atol=1e-5)
  np.testing.assert_array_equal(outputs["uncertainty"].numpy(), np.zeros(3, np.float32))


def test_predict_patient_aggregates_each_model_then_averages(exported):
  hu = _slices(seed=5, count=6)
  outputs = exported["ensemble"].signatures["predict_patient"](hu=tf.constant(hu))
  per_model = _keras_probabilities(exported["models"], hu)
  per_model_patient = np.sort(per_model, axis=1)[:, ::-1][:, :TOP_K].mean(axis=1)  # top-3 mean, by hand
  np.testing.assert_allclose(outputs["slice_probability"].numpy(), per_model.mean(axis=0), atol=1e-5)
  np.testing.assert_allclose(outputs["slice_uncertainty"].numpy(), per_model.std(axis=0), atol=1e-5)
  np.testing.assert_allclose(float(outputs["patient_probability"]), per_model_patient.mean(), atol=1e-5)
  np.testing.assert_allclose(float(outputs["patient_uncertainty"]), per_model_patient.std(), atol=1e-5)
  with pytest.raises(tf.errors.InvalidArgumentError, match="at least one slice"):
    exported["ensemble"].signatures["predict_patient"](hu=tf.zeros([0, 40, 40], tf.float32))


def test_predict_images_equals_serving_default_and_checks_size(exported):
  hu = _slices(seed=6, count=4)
  images = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=IMAGE_SIZE))
  from_images = exported["ensemble"].signatures["predict_images"](image=images)
  from_hu = exported["ensemble"].signatures["serving_default"](hu=tf.constant(hu))
  np.testing.assert_allclose(from_images["probability"].numpy(), from_hu["probability"].numpy(), atol=1e-6)
  with pytest.raises(tf.errors.InvalidArgumentError, match="32x32x3 pixels"):
    exported["ensemble"].signatures["predict_images"](image=tf.zeros([2, 40, 40, 3], tf.uint8))


def test_wrong_dtype_or_rank_is_rejected_at_the_signature(exported):
  loaded = exported["ensemble"]
  with pytest.raises(TypeError, match="float32"):
    loaded.serving_default(tf.zeros([2, 40, 40], tf.int32))
  with pytest.raises(TypeError, match=r"shape=\(None, None, None\)"):
    loaded.serving_default(tf.zeros([40, 40], tf.float32))
  with pytest.raises(TypeError, match="uint8"):
    loaded.predict_images(tf.zeros([1, IMAGE_SIZE, IMAGE_SIZE, 3], tf.float32))
  with pytest.raises((TypeError, tf.errors.InvalidArgumentError), match="float"):
    loaded.signatures["serving_default"](hu=tf.zeros([2, 40, 40], tf.int32))


def test_predict_request_maps_onto_serving_default(exported):
  from tensorflow_serving.apis import predict_pb2  # pylint: disable=import-outside-toplevel

  hu = _slices(seed=7, count=2)
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "pdx_p"
  request.model_spec.signature_name = "serving_default"
  request.inputs["hu"].CopyFrom(tf.make_tensor_proto(hu))
  request = predict_pb2.PredictRequest.FromString(request.SerializeToString())  # over the wire
  signature = exported["ensemble"].signatures[request.model_spec.signature_name]
  assert set(request.inputs) == set(signature.structured_input_signature[1])
  inputs = {name: tf.constant(tf.make_ndarray(proto)) for name, proto in request.inputs.items()}
  outputs = signature(**inputs)
  assert set(outputs) == {"probability", "uncertainty"}
  direct = exported["ensemble"].signatures["serving_default"](hu=tf.constant(hu))
  np.testing.assert_array_equal(outputs["probability"].numpy(), direct["probability"].numpy())
  response = predict_pb2.PredictResponse()
  for name, tensor in outputs.items():
    response.outputs[name].CopyFrom(tf.make_tensor_proto(tensor))
  np.testing.assert_array_equal(tf.make_ndarray(response.outputs["probability"]), direct["probability"].numpy())


def test_rest_json_body_maps_onto_the_signatures(exported):
  from pdx_tf.serving import signatures  # pylint: disable=import-outside-toplevel

  hu = np.round(_slices(seed=9, count=2))  # DICOM HU are whole numbers
  for signature_name, outputs in (("serving_default", {"probability", "uncertainty"}),
                                  ("predict_patient", {"slice_probability", "slice_uncertainty",
                                                       "patient_probability", "patient_uncertainty"})):
    request = json.loads(signatures.rest_predict_body({"hu": hu}, signature_name))
    assert request["signature_name"] == signature_name and set(request["inputs"]) == {"hu"}
    signature = exported["ensemble"].signatures[request["signature_name"]]
    specs = signature.structured_input_signature[1]
    tensors = {name: tf.constant(np.asarray(value, specs[name].dtype.as_numpy_dtype))
               for name, value in request["inputs"].items()}
    result = signature(**tensors)
    assert set(result) == outputs
    response = json.dumps({"outputs": {name: value.numpy().tolist() for name, value in result.items()}})
    assert json.loads(response)["outputs"]  # float32 outputs are plain JSON numbers
  direct = exported["ensemble"].signatures["serving_default"](hu=tf.constant(hu, tf.float32))
  request = json.loads(signatures.rest_predict_body({"hu": hu}))
  again = exported["ensemble"].signatures["serving_default"](hu=tf.constant(request["inputs"]["hu"], tf.float32))
  np.testing.assert_array_equal(again["probability"].numpy(), direct["probability"].numpy())
  # One 512x512 slice of whole-number HU: about 1.3-1.6 MB of JSON against 1 MB as a gRPC TensorProto.
  slice_hu = np.round(fake_cells.fake_hu_slices(1, 1, 512, 512))
  size = len(signatures.rest_predict_body({"hu": slice_hu}))
  assert 1_000_000 < size < 1_700_000, size
  assert len(tf.make_tensor_proto(slice_hu).SerializeToString()) < 1_100_000


def test_loads_in_a_fresh_process_and_saved_model_cli_lists_signatures(exported):
  hu = _slices(seed=8, count=2)
  hu_path = os.path.join(os.path.dirname(exported["export_dir"]), "hu.npy")
  np.save(hu_path, hu)
  script = (
      "import json, sys, numpy as np, tensorflow as tf\n"
      f"loaded = tf.saved_model.load({exported['ensemble_dir']!r})\n"
      f"out = loaded.signatures['serving_default'](hu=tf.constant(np.load({hu_path!r})))\n"
      "print(json.dumps({'names': sorted(loaded.signatures), 'probability': out['probability'].numpy().tolist()}))\n"
  )
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env=environment, cwd="/", check=False)  # cwd=/: no pdx_tf import needed to serve
  assert result.returncode == 0, result.stderr[-2000:]
  answer = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
  assert answer["names"] == ["predict_images", "predict_patient", "serving_default"]
  expected = exported["ensemble"].signatures["serving_default"](hu=tf.constant(hu))["probability"].numpy()
  np.testing.assert_allclose(answer["probability"], expected, atol=1e-6)

  cli = shutil.which("saved_model_cli")
  command = [cli] if cli else [sys.executable, "-m", "tensorflow.python.tools.saved_model_cli"]
  shown = subprocess.run(command + ["show", "--all", "--dir", exported["ensemble_dir"]], capture_output=True,
                         text=True, timeout=120, env=environment, check=False)
  assert shown.returncode == 0, shown.stderr[-2000:]
  for text in ("signature_def['serving_default']", "signature_def['predict_images']",
               "signature_def['predict_patient']", "inputs['hu']", "inputs['image']", "outputs['probability']",
               "outputs['uncertainty']", "outputs['patient_probability']", "outputs['slice_probability']"):
    assert text in shown.stdout, text


def test_cells_with_different_preprocessing_cannot_be_exported_together(exported, tmp_path):
  first, second = exported["folders"]
  other = str(tmp_path / "r00_f02")
  shutil.copytree(second, other)
  run = io_utils.read_json(os.path.join(other, "run.json"))
  run["fold"] = 2
  run["preprocess"]["windows"] = [[60.0, 150.0]]
  io_utils.atomic_write_json(os.path.join(other, "run.json"), run)
  with pytest.raises(ExportError, match="differ in 'preprocess'"):
    export.export_models([first, other], str(tmp_path / "X"), "p")
  assert not os.path.exists(tmp_path / "X" / "pdx_p" / "1")



@pytest.mark.parametrize("key, value", [("aggregation", "max"), ("aggregation_top_k", 5), ("head", "attention_mil"),
                                        ("context_slices", 1)])
def test_cells_with_different_patient_rules_cannot_be_exported_together(exported, tmp_path, key, value):
  first, second = exported["folders"]
  other = str(tmp_path / "r00_f02")
  shutil.copytree(second, other)
  run = io_utils.read_json(os.path.join(other, "run.json"))
  run["fold"], run[key] = 2, value
  io_utils.atomic_write_json(os.path.join(other, "run.json"), run)
  with pytest.raises(ExportError, match=f"differ in '{key}'"):
    export.export_models([first, other], str(tmp_path / "X"), "p")


def test_cell_selection_and_incomplete_cells(exported, tmp_path):
  runs_dir = str(tmp_path / "runs")
  shutil.copytree(exported["runs_dir"], runs_dir)
  assert [cell.name for cell in export.find_cells(runs_dir, "sb")] == ["r00_f00"]
  shutil.rmtree(os.path.join(runs_dir, "sb"))
  unfinished = os.path.join(runs_dir, "p", "cells", "r01_f00")
  shutil.copytree(os.path.join(runs_dir, "p", "cells", "r00_f00"), unfinished)
  run = io_utils.read_json(os.path.join(unfinished, "run.json"))
  run.update(repeat=1, status="running")
  io_utils.atomic_write_json(os.path.join(unfinished, "run.json"), run)
  assert [cell.name for cell in export.find_cells(runs_dir, "p")] == ["r00_f00", "r00_f01"]
  assert [cell.name for cell in export.find_cells(runs_dir, "p", ("r00",))] == ["r00_f00", "r00_f01"]
  assert [cell.name for cell in export.find_cells(runs_dir, "p", ("r00_f01",))] == ["r00_f01"]
  with pytest.raises(ExportError, match="matches no complete cell"):
    export.find_cells(runs_dir, "p", ("r01",))
  with pytest.raises(ExportError, match="no complete cell of task sb"):
    export.find_cells(runs_dir, "sb")
  with pytest.raises(ExportError, match="status 'running'"):
    export.export_models([unfinished], str(tmp_path / "X"), "p")


def test_region_settings_come_from_the_training_records(exported, tmp_path):
  from pdx_tf.data import region  # pylint: disable=import-outside-toplevel

  metadata = io_utils.read_json(os.path.join(exported["ensemble_dir"], "assets.extra", "pdx_export.json"))
  assert metadata["region"]["source"].startswith("pipeline defaults")  # fake cells have no records
  records_dir = str(tmp_path / "records")
  pipeline_config = {"region": dict(configs_to_dict(region.RegionConfig()), lung_air_fraction=0.1),
                     "slice_spacing_mm": 5.0, "min_slices": 6}
  io_utils.atomic_write_json(os.path.join(records_dir, "dataset.json"), {"config": pipeline_config})
  cell = export.read_cell(exported["folders"][0])
  run_info = dict(cell.run_info, config={**cell.run_info["config"], "records_dir": records_dir},
                  dataset_hash=io_utils.sha256_file(os.path.join(records_dir, "dataset.json")))
  settings = export.region_settings([export.CellRun(cell.folder, 0, 0, run_info)])
  assert settings["source"] == "training dataset.json"
  assert settings["config"]["lung_air_fraction"] == 0.1
  assert settings["slice_spacing_mm"] == 5.0 and settings["min_slices"] == 6
  stale = dict(run_info, dataset_hash="f" * 64)  # records rewritten since training: not trusted
  assert export.region_settings([export.CellRun(cell.folder, 0, 0, stale)])["source"].startswith("pipeline")
  # dataset.json rewritten by newer code around the same records (same content hash): trusted.
  from pdx_tf import contracts  # pylint: disable=import-outside-toplevel
  same_content = dict(stale, records_hash=contracts.records_content_hash({"config": pipeline_config}))
  assert export.region_settings([export.CellRun(cell.folder, 0, 0, same_content)])["source"] == (
      "training dataset.json")


def test_read_export_resolves_versions_and_rejects_other_folders(exported, tmp_path):
  model_dir = os.path.join(exported["export_dir"], "pdx_p")
  assert export.read_export(model_dir)[0] == exported["single_dir"]  # the highest version
  version_dir, metadata = export.read_export(exported["ensemble_dir"])
  assert version_dir == exported["ensemble_dir"] and metadata["num_models"] == 2
  with pytest.raises(ExportError, match="is not a pdx export"):
    export.read_export(str(tmp_path))


def test_mixed_precision_models_are_served_in_float32():
  import keras  # pylint: disable=import-outside-toplevel

  from pdx_tf import configs  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  config = model_lib.ModelConfig(image_size=IMAGE_SIZE, alpha=0.35)
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_global_policy("mixed_float16")
  try:
    mixed = model_lib.build_model(config)
  finally:
    keras.mixed_precision.set_global_policy(previous)
  assert mixed.get_layer("mobilenetv2").get_layer("Conv1").compute_dtype == "float16"
  converted = export.float32_model(mixed, {"model": configs.to_dict(config)})
  layers = converted._flatten_layers()  # pylint: disable=protected-access
  assert {layer.compute_dtype for layer in layers} == {"float32"}
  for original, copied in zip(mixed.weights, converted.weights):
    np.testing.assert_array_equal(np.asarray(original), np.asarray(copied))
  plain = model_lib.build_model(config)
  assert export.float32_model(plain, {"model": configs.to_dict(config)}) is plain


def test_binary_reports_a_bad_runs_folder_on_one_line(tmp_path):
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "export", f"--runs_dir={tmp_path / 'missing'}", "--task=p",
       f"--export_dir={tmp_path / 'X'}"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT,
      env=environment, check=False)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("export: error:")]
  assert len(errors) == 1 and "does not exist" in errors[0]


# ------------------------------------------------- serving applies the run's own (non-default) preprocessing

CUSTOM_WINDOWS = ((100.0, 60.0), (0.0, 300.0), (200.0, 800.0))  # none of them the default W400/L40
CUSTOM_MARGIN = 0.2  # default 0.04


def _rectangle_bodies(count=4, side=128):
  """HU slices [count, 128, 128]: air around one axis-aligned rectangular body with smooth soft-tissue texture.

  At 128 px the body mask needs no resize, and a single solid rectangle is its own largest component and is
  unchanged by a 3x3 opening, so the mask the model sees is exactly the rectangle (what the numpy reference
  below assumes).
  """
  rows, columns = np.mgrid[0:side, 0:side].astype(np.float64)
  slices = np.full((count, side, side), -1000.0, np.float64)
  for index in range(count):
    top, bottom, left, right = 24 + 3 * index, 100 - 2 * index, 10 + 4 * index, 116 - index
    texture = 100.0 + 180.0 * np.sin(rows / (5.0 + index)) * np.cos(columns / (7.0 + index)) + 0.5 * columns
    body = (rows >= top) & (rows <= bottom) & (columns >= left) & (columns <= right)
    slices[index][body] = texture[body]
  return slices.astype(np.float32)


def _bilinear_crop(hu, box, out_size):
  """tf.image.crop_and_resize's documented sampling of one [H, W] slice, in numpy (outside: air)."""
  height, width = hu.shape
  y_min, x_min, y_max, x_max = box
  in_y = y_min * (height - 1) + np.arange(out_size) * (y_max - y_min) * (height - 1) / (out_size - 1)
  in_x = x_min * (width - 1) + np.arange(out_size) * (x_max - x_min) * (width - 1) / (out_size - 1)
  out = np.full((out_size, out_size), -1000.0)
  valid_y = (in_y >= 0) & (in_y <= height - 1)
  valid_x = (in_x >= 0) & (in_x <= width - 1)
  y0 = np.floor(in_y[valid_y]).astype(int)
  x0 = np.floor(in_x[valid_x]).astype(int)
  y1, x1 = np.ceil(in_y[valid_y]).astype(int), np.ceil(in_x[valid_x]).astype(int)
  dy, dx = (in_y[valid_y] - y0)[:, None], (in_x[valid_x] - x0)[None, :]
  top = hu[y0][:, x0] + (hu[y0][:, x1] - hu[y0][:, x0]) * dx
  bottom = hu[y1][:, x0] + (hu[y1][:, x1] - hu[y1][:, x0]) * dx
  out[np.ix_(valid_y, valid_x)] = top + (bottom - top) * dy
  return out


def _numpy_preprocess(slices, image_size, windows, margin, threshold_hu=-500.0, supersample=4):
  """The documented preprocessing, re-derived in numpy for rectangle bodies on a 128 px grid."""
  images = []
  for hu in slices.astype(np.float64):
    height, width = hu.shape
    body = hu > threshold_hu
    rows, columns = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    y_min, y_max = rows[0] / height, (rows[-1] + 1) / height
    x_min, x_max = columns[0] / width, (columns[-1] + 1) / width
    side_px = max((y_max - y_min) * height, (x_max - x_min) * width) * (1.0 + 2.0 * margin)
    center_y, center_x = (y_min + y_max) / 2, (x_min + x_max) / 2
    box = (center_y - side_px / height / 2, center_x - side_px / width / 2,
           center_y + side_px / height / 2, center_x + side_px / width / 2)
    fine = _bilinear_crop(hu, box, image_size * supersample)
    resized = fine.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))
    channels = [np.round(np.clip((resized - (center - width_hu / 2)) / width_hu, 0.0, 1.0) * 255.0)
                for center, width_hu in windows]
    images.append(np.stack(channels * (3 if len(channels) == 1 else 1), axis=-1))
  return np.stack(images).astype(np.uint8)


def test_export_serves_the_runs_own_window_and_crop_margin(tmp_path):
  import keras  # pylint: disable=import-outside-toplevel

  config = preprocess.PreprocessConfig(image_size=IMAGE_SIZE, windows=CUSTOM_WINDOWS,
                                       crop_margin_fraction=CUSTOM_MARGIN)
  folders = fake_cells.write_fake_cells(str(tmp_path / "runs"), "p", cells=((0, 0),), image_size=IMAGE_SIZE,
                                        preprocess_config=config)
  version_dir = export.export_models(folders, str(tmp_path / "X"), "p")
  hu = _rectangle_bodies()
  served = tf.saved_model.load(version_dir).signatures["serving_default"](hu=tf.constant(hu))["probability"].numpy()
  model = keras.saving.load_model(os.path.join(folders[0], "model.keras"), compile=False)

  def probabilities(windows, margin):
    images = _numpy_preprocess(hu, IMAGE_SIZE, windows, margin)
    return model.predict(images.astype(np.float32), verbose=0).reshape(-1)

  def logit(probability):  # the fake models are steep: compare on the logit scale, where they are not flat
    probability = np.asarray(probability, np.float64)
    return np.log(probability) - np.log1p(-probability)

  expected = probabilities(CUSTOM_WINDOWS, CUSTOM_MARGIN)
  np.testing.assert_allclose(served, expected, atol=1e-3)
  np.testing.assert_allclose(logit(served), logit(expected), atol=0.05)
  # The check can tell the run's preprocessing from the defaults, and from a default margin or window alone.
  for windows, margin in ((preprocess.WINDOW_PRESETS["abdomen"], 0.04), (CUSTOM_WINDOWS, 0.04),
                          (preprocess.WINDOW_PRESETS["abdomen"], CUSTOM_MARGIN)):
    assert np.abs(logit(probabilities(windows, margin)) - logit(served)).max() > 0.5, (windows, margin)


def test_numpy_reference_preprocessing_matches_the_pipeline_images():
  # The reference above must agree with the pipeline's graph on these slices (up to one grey level where a
  # value sits on a rounding edge), or the export test would compare against the wrong thing.
  hu = _rectangle_bodies()
  config = preprocess.PreprocessConfig(image_size=IMAGE_SIZE, windows=CUSTOM_WINDOWS,
                                       crop_margin_fraction=CUSTOM_MARGIN)
  graph = preprocess.preprocess_slices(hu, config).numpy().astype(np.int64)
  reference = _numpy_preprocess(hu, IMAGE_SIZE, CUSTOM_WINDOWS, CUSTOM_MARGIN).astype(np.int64)
  assert np.abs(graph - reference).max() <= 1 and np.mean(graph != reference) < 0.01


@pytest.mark.parametrize("preprocess", [{"image_size": "big"}, {"image_size": 32, "windows": "abdomen"}])
def test_a_run_with_an_unreadable_preprocess_config_is_one_line(exported, tmp_path, preprocess):
  first, _ = exported["folders"]
  cell = str(tmp_path / "r00_f00")
  shutil.copytree(first, cell)
  run = io_utils.read_json(os.path.join(cell, "run.json"))
  run["preprocess"] = preprocess
  io_utils.atomic_write_json(os.path.join(cell, "run.json"), run)
  with pytest.raises(ExportError, match="has an invalid preprocess config"):
    export.export_models([cell], str(tmp_path / "X"), "p")
