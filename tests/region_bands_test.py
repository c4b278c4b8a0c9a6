"""Tests of `train --region_bands` (pdx_tf/training/region_bands.py): each PCI region learnt and scored on the
slices of its band along z.

Expectations are written out by hand from the documented rule (rows are thirds of the abdomen's height, widened by
0.1 each side; t = index / (n - 1); regions 9-12 everywhere), never from the code under test: for 10 slices,
t = i / 9, so the upper row (t >= 0.567) is slices 6-9, the middle (0.233 <= t <= 0.767) slices 3-6 and the lower
(t <= 0.433) slices 0-3.
"""

import csv
import types
import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import contracts
from pdx_tf.data import preprocess, records
from pdx_tf.serving import export, predict
from pdx_tf.testing import fake_cells, fake_records
from pdx_tf.training import input_pipeline, region_bands, regions, trainer

SLICES = 10
UPPER, MIDDLE, LOWER, EVERYWHERE = {6, 7, 8, 9}, {3, 4, 5, 6}, {0, 1, 2, 3}, set(range(SLICES))
# region -> the slices of a 10-slice patient in its band (PCI: 1-3 upper, 8/0/4 middle, 7/6/5 lower, 9-12 loops)
HAND_BANDS = {1: UPPER, 2: UPPER, 3: UPPER, 8: MIDDLE, 0: MIDDLE, 4: MIDDLE, 7: LOWER, 6: LOWER, 5: LOWER,
              9: EVERYWHERE, 10: EVERYWHERE, 11: EVERYWHERE, 12: EVERYWHERE}
SIZE = 32
TOP_K = 2


def _hand_mask(num_slices=SLICES):
  assert num_slices == SLICES
  return np.array([[index in HAND_BANDS[region] for region in range(13)] for index in range(SLICES)])


def test_band_mask_matches_the_documented_thirds_in_numpy_and_tensorflow():
  np.testing.assert_array_equal(region_bands.band_mask(np.arange(SLICES), SLICES), _hand_mask())
  np.testing.assert_array_equal(region_bands.band_mask_tf(tf.range(SLICES), SLICES).numpy(), _hand_mask())
  # A subset of a patient's slices, in any order, keeps each slice's own row.
  np.testing.assert_array_equal(region_bands.band_mask([9, 0, 4], SLICES), _hand_mask()[[9, 0, 4]])
  # One slice (t = 0.5): in no upper or lower band, so those columns fall back to the slice rather than be empty.
  assert region_bands.band_mask([0], 1).all()
  assert region_bands.band_mask_tf(tf.constant([0]), 1).numpy()[0].tolist() == [
      region in (0, 4, 8, 9, 10, 11, 12) for region in range(13)]


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("records"))
  fake_records.write_fake_records(folder, num_patients=8, slices_per_patient=SLICES, augment_factor=2,
                                  image_size=SIZE, pci=True)
  return folder


def test_training_labels_outside_a_regions_band_are_masked(records_dir):
  info = contracts.load_dataset_info(records_dir)
  ids = sorted(info.patients)
  table = input_pipeline.slice_counts_table(info)
  seen = masked_positive = 0
  for example in input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=1.0,
                                               shuffle_buffer=0):
    index = int(example[records.SLICE_INDEX_KEY].numpy())
    unbanded = input_pipeline.label_vector(example, contracts.PCI_TASK).numpy()
    banded = input_pipeline.banded_region_labels(example, table).numpy()
    expected = [unbanded[region] if index in HAND_BANDS[region] else -1.0 for region in range(13)]
    assert banded.tolist() == expected, (index, unbanded.tolist())
    masked_positive += int(sum(unbanded[region] == 1 and index not in HAND_BANDS[region] for region in range(13)))
    seen += 1
  assert seen == 8 * SLICES * 3 and masked_positive > 20
  # train_dataset(region_bands=True) trains on exactly those labels: count the masked entries of one epoch.
  dataset = input_pipeline.train_dataset(info, ids, task=contracts.PCI_TASK, sample_seed=0, repeat=0, shuffle_seed=0,
                                         pool_fraction=1.0, batch_size=8, drop_remainder=False, region_bands=True)
  labels = np.concatenate([label.numpy() for _, label in dataset])
  unrecorded_by_design = 0  # fake_records records every region of every patient
  out_of_band = sum(SLICES - len(HAND_BANDS[region]) for region in range(13)) * 8 * 3
  assert int((labels < 0).sum()) == out_of_band + unrecorded_by_design
  with pytest.raises(ValueError, match="region_bands applies"):
    input_pipeline.train_dataset(info, ids, task="p", sample_seed=0, repeat=0, shuffle_seed=0, pool_fraction=1.0,
                                 batch_size=8, region_bands=True)


def test_patient_probabilities_aggregate_each_region_over_its_band():
  rng = np.random.default_rng(3)
  scores = rng.uniform(0, 1, (2 * SLICES, 13))
  patient_ids = np.array(["b"] * SLICES + ["a"] * SLICES)
  order = rng.permutation(2 * SLICES)  # the validation order need not be slice order
  indices = np.tile(np.arange(SLICES), 2)
  got = regions.patient_probabilities(scores[order], patient_ids[order], ["a", "b"], "topk_mean", TOP_K,
                                      slice_indices=indices[order])
  for row, patient in enumerate(["a", "b"]):
    mine = scores[patient_ids == patient]  # rows in slice order 0..9
    for region in range(13):
      kept = sorted((mine[index, region] for index in HAND_BANDS[region]), reverse=True)
      assert got[row, region] == pytest.approx(np.mean(kept[:TOP_K]))
  # Without slice indices every slice counts (the paper's rule per region).
  plain = regions.patient_probabilities(scores, patient_ids, ["a"], "max", TOP_K)
  np.testing.assert_allclose(plain[0], scores[SLICES:].max(axis=0))


def test_train_config_refuses_bands_outside_the_regions_task(records_dir, tmp_path):
  values = dict(task="p", records_dir=records_dir, output_dir=str(tmp_path), image_size=SIZE, alpha=0.35,
                region_bands=True)
  with pytest.raises(ValueError, match="region_bands applies"):
    trainer.config_from_values(values)


def _read(path):
  with open(path, newline="") as handle:
    return list(csv.DictReader(handle))


def test_a_banded_regions_grid_scores_each_region_from_its_bands_slices(records_dir, tmp_path):
  output = tmp_path / "runs"
  config = trainer.config_from_values(dict(
      task=contracts.PCI_TASK, records_dir=records_dir, output_dir=str(output), image_size=SIZE, alpha=0.35,
      num_folds=2, num_repeats=1, epochs=3, batch_size=8, learning_rate=0.01, pool_fraction=0.5,
      deterministic=True, aggregation="topk_mean", top_k=TOP_K, region_bands=True))
  assert set(trainer.run_grid(config)["cells"].values()) == {"complete"}
  for cell in ("r00_f00", "r00_f01"):
    folder = output / "cells" / cell
    assert json.loads((folder / "run.json").read_text())["config"]["region_bands"] is True
    slices = {}
    for row in _read(folder / "region_slice_predictions.csv"):
      slices.setdefault(row["patient_id"], np.zeros((SLICES, 13)))[int(row["slice_index"]), int(row["region"])] = (
          float(row["probability"]))
    differs = 0
    for row in _read(folder / "region_predictions.csv"):
      column = slices[row["patient_id"]][:, int(row["region"])]
      in_band = sorted((column[index] for index in HAND_BANDS[int(row["region"])]), reverse=True)
      assert float(row["probability"]) == pytest.approx(np.mean(in_band[:TOP_K]), abs=2e-7)
      differs += abs(np.mean(in_band[:TOP_K]) - np.mean(sorted(column, reverse=True)[:TOP_K])) > 1e-6
    assert differs > 0  # the band changed some patient's score: the test can tell the two rules apart


@pytest.fixture(scope="module")
def banded_export(tmp_path_factory):
  root = tmp_path_factory.mktemp("banded-export")
  folders = fake_cells.write_fake_region_cells(str(root / "runs"), image_size=SIZE, top_k=TOP_K, region_bands=True)
  return folders, export.export_models(folders, str(root / "X"), contracts.PCI_TASK)


def test_the_export_serves_each_region_from_its_band_and_predict_points_inside_it(banded_export, tmp_path):
  folders, version_dir = banded_export
  _, metadata = export.read_export(version_dir)
  assert metadata["regions"]["bands"][2] == pytest.approx([2 / 3 - 0.1, 1.1])
  assert metadata["regions"]["bands"][6] == pytest.approx([-0.1, 1 / 3 + 0.1])
  assert metadata["regions"]["bands"][9] is None
  hu = fake_cells.fake_hu_slices(4, SLICES)
  images = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=SIZE)).numpy()
  per_model, slice_scores = [], []
  for folder in folders:
    outputs = np.asarray(keras.saving.load_model(f"{folder}/model.keras", compile=False)(images, training=False))
    slice_scores.append(outputs)
    per_model.append([np.mean(sorted((outputs[index, region] for index in HAND_BANDS[region]), reverse=True)[:TOP_K])
                      for region in range(13)])
  served = tf.saved_model.load(version_dir).signatures["predict_regions"](hu=tf.constant(hu))
  np.testing.assert_allclose(served["region_probabilities"].numpy(), np.mean(per_model, axis=0), atol=2e-5)
  # predict: the evidence slice of each region is its band's highest slice.
  abdomen = types.SimpleNamespace(hu=hu, z_mm=np.arange(SLICES) * 5.0, z_range_mm=(0.0, 45.0), rule="test",
                                          pixel_spacing_mm=(0.8, 0.8), warnings=())
  predict.predict_and_write(predict.load_exports([version_dir]), predict.Study(regions=(abdomen,), statistics=({},)),
                            str(tmp_path), patient_id="case01", num_gradcam_slices=0)
  mean_slices = np.mean(slice_scores, axis=0)
  for row in _read(tmp_path / "region_probabilities.csv"):
    region = int(row["region"])
    band = sorted(HAND_BANDS[region])
    assert int(row["evidence_slice"]) == band[int(np.argmax(mean_slices[band, region]))]
