"""Tests of serving a regions grid (issue 20, item 5): the export's predict_regions signature, the region names in
pdx_export.json, predict's region CSV and PCI map. Expectations come from the cells' Keras models and a numpy top-k
mean, not from the serving code."""

import csv
import json
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import contracts
from pdx_tf.data import preprocess
from pdx_tf.serving import export, predict
from pdx_tf.testing import fake_cells

SIZE = 32
TOP_K = 3


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  root = tmp_path_factory.mktemp("regions-export")
  folders = fake_cells.write_fake_region_cells(str(root / "runs"), cells=((0, 0), (0, 1)), image_size=SIZE,
                                               top_k=TOP_K)
  version_dir = export.export_models(folders, str(root / "X"), contracts.PCI_TASK)
  return root, folders, version_dir


def _expected(folders, hu):
  """Each cell's Keras model on the preprocessed slices, each region's top-k mean, then mean / SD over cells."""
  images = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=SIZE)).numpy().astype(np.float32)
  per_model, slices = [], []
  for folder in folders:
    model = keras.saving.load_model(f"{folder}/model.keras", compile=False)
    outputs = np.asarray(model(images, training=False), np.float64)  # [N, 13]
    slices.append(outputs)
    per_model.append([np.mean(np.sort(outputs[:, region])[::-1][:TOP_K]) for region in range(13)])
  per_model = np.asarray(per_model)
  return per_model.mean(axis=0), per_model.std(axis=0), np.mean(slices, axis=0)


def test_the_export_serves_13_region_probabilities_named_in_its_metadata(exported):
  _, folders, version_dir = exported
  _, metadata = export.read_export(version_dir)
  assert metadata["task"] == "regions" and metadata["head"] == "regions"
  assert metadata["regions"]["names"] == list(contracts.PCI_REGION_NAMES)
  assert "predict_regions" in metadata["signatures"]
  runs = [json.load(open(f"{folder}/run.json")) for folder in folders]
  np.testing.assert_allclose(metadata["regions"]["thresholds"], np.mean([run["thresholds"] for run in runs], axis=0))
  hu = fake_cells.fake_hu_slices(5, 7)
  outputs = tf.saved_model.load(version_dir).signatures["predict_regions"](hu=tf.constant(hu))
  mean, spread, slices = _expected(folders, hu)
  np.testing.assert_allclose(outputs["region_probabilities"].numpy(), mean, atol=2e-5)
  np.testing.assert_allclose(outputs["region_uncertainty"].numpy(), spread, atol=2e-5)
  np.testing.assert_allclose(outputs["slice_region_probabilities"].numpy(), slices, atol=2e-5)
  assert outputs["slice_region_probabilities"].shape == (7, 13)


def test_predict_writes_each_regions_probability_and_a_pci_map(exported, tmp_path):
  _, folders, version_dir = exported
  exports = predict.load_exports([version_dir])
  hu = fake_cells.fake_hu_slices(9, 6)
  abdomen = types.SimpleNamespace(hu=hu, z_mm=np.arange(6) * 5.0, z_range_mm=(0.0, 25.0), rule="test",
                                  pixel_spacing_mm=(0.8, 0.8), warnings=())
  study = predict.Study(regions=(abdomen,), statistics=({},))
  prediction = predict.predict_and_write(exports, study, str(tmp_path), patient_id="case07", num_gradcam_slices=0)
  mean, spread, slices = _expected(folders, hu)
  with open(tmp_path / "region_probabilities.csv", newline="") as handle:
    rows = list(csv.DictReader(handle))
  assert [int(row["region"]) for row in rows] == list(range(13))
  assert [row["name"] for row in rows] == list(contracts.PCI_REGION_NAMES)
  np.testing.assert_allclose([float(row["probability"]) for row in rows], mean, atol=2e-5)
  # The evidence: each region's highest-scoring slice.
  assert [int(row["evidence_slice"]) for row in rows] == [int(np.argmax(slices[:, r])) for r in range(13)]
  _, metadata = export.read_export(version_dir)
  expected_pci = float(np.asarray(mean) @ np.asarray(metadata["regions"]["pci_scale"]))
  assert prediction["regions"]["predicted_pci"] == pytest.approx(expected_pci, abs=1e-4)
  assert prediction["regions"]["predicted"] == [int(value >= threshold) for value, threshold in
                                                zip(np.round(mean, 6), metadata["regions"]["thresholds"])]
  assert (tmp_path / "pci_map.png").stat().st_size > 1000
  assert "regions: predicted PCI" in predict.format_prediction(prediction)
