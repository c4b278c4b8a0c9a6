"""Tests for the pure pieces of benchmarks/oracle_benchmark.py: oracle slice labels, patient-level folds.

Tiny synthetic inputs only (the demo cohort is slow to write); expectations are computed independently with
numpy block means, or written out by hand.
"""


import numpy as np

from pdx_tf import phantom
from pdx_tf.data import preprocess

from benchmark_loader import load_benchmark

oracle = load_benchmark("oracle_benchmark")

NATIVE, MODEL = 64, 16  # a model pixel is a 4 x 4 native block when the body fills the image and no margin


def _slices_and_masks():
  """Soft tissue filling the whole image (so the body box is the image) and one nodule mask per slice."""
  hu = np.full((5, NATIVE, NATIVE), 40.0, np.float32)
  masks = np.zeros(hu.shape, bool)
  masks[0, 8:12, 8:12] = True      # one whole model pixel: coverage 1 -> positive
  masks[1, 20:23, 32:36] = True    # 3 of 4 rows of one model pixel: 0.75 -> positive
  masks[2, 40:41, 12:16] = True    # 1 of 4 rows: 0.25 -> negative
  masks[3, 30:34, 30:34] = True    # a whole pixel's area split over 4 model pixels, 0.25 each -> negative
  # slice 4: no nodule -> negative
  return hu, masks


def _block_coverage(masks):
  """Independent expectation: each model pixel's covered fraction as the mean of its 4 x 4 native block."""
  step = NATIVE // MODEL
  return masks.reshape(len(masks), MODEL, step, MODEL, step).mean(axis=(2, 4))


def test_oracle_labels_follow_the_mapped_pixel_coverage():
  hu, masks = _slices_and_masks()
  config = preprocess.PreprocessConfig(image_size=MODEL, crop_margin_fraction=0.0)
  arrays = oracle.slice_arrays(hu, masks, config)
  expected_peak = _block_coverage(masks).reshape(len(masks), -1).max(axis=1)
  np.testing.assert_allclose(expected_peak, [1.0, 0.75, 0.25, 0.25, 0.0])  # the construction itself
  np.testing.assert_allclose(arrays["peak_coverage"], expected_peak, atol=0.02)
  labels = oracle.oracle_labels(arrays["peak_coverage"], 0.5)
  np.testing.assert_array_equal(labels, (expected_peak >= 0.5).astype(int))
  np.testing.assert_array_equal(labels, [1, 1, 0, 0, 0])
  # The threshold itself counts as covered.
  np.testing.assert_array_equal(oracle.oracle_labels(np.array([0.5, 0.49, 0.51]), 0.5), [1, 0, 1])
  # A lower threshold takes in the quarter-covered slices too, never the empty one.
  np.testing.assert_array_equal(oracle.oracle_labels(arrays["peak_coverage"], 0.2), [1, 1, 1, 1, 0])
  # Nodule area in model pixels (native pixels / 16) and the nodule count of each slice.
  np.testing.assert_allclose(arrays["area_px"], masks.sum(axis=(1, 2)) / 16.0, atol=0.02)
  np.testing.assert_array_equal(arrays["num_nodules"], [1, 1, 1, 1, 0])
  assert arrays["images"].shape == (5, MODEL, MODEL, 3) and arrays["images"].dtype == np.uint8


def test_masks_are_aligned_by_slice_position():
  volume = np.zeros((4, 2, 2), bool)
  volume[2] = True
  mask_z = np.array([0.0, 5.0, 10.0, 15.0])
  aligned = phantom.masks_at_slices(np.array([10.0, 5.0, 12.5]), volume, mask_z)
  # 10 mm is mask slice 2 (nodule), 5 mm slice 1 (none), 12.5 mm matches no mask slice (empty, not the nearest).
  assert aligned[0].all() and not aligned[1].any() and not aligned[2].any()


def test_folds_are_patient_level_and_cover_every_patient_once():
  patient_ids = np.array([f"p{index:02d}" for index in range(12)])
  labels = {pid: int(index % 3 == 0) for index, pid in enumerate(patient_ids)}
  slice_patient = np.repeat(np.arange(12), 5)
  for seed in (0, 1):
    folds = oracle.patient_folds(labels, 4, seed)
    assert len(folds) == 4
    tested = []
    for train_ids, test_ids in folds:
      assert not set(train_ids) & set(test_ids)
      assert set(train_ids) | set(test_ids) == set(patient_ids)
      train = oracle.slice_selection(slice_patient, patient_ids, train_ids)
      test = oracle.slice_selection(slice_patient, patient_ids, test_ids)
      assert not (train & test).any() and (train | test).all()
      assert set(patient_ids[slice_patient[test]]) == set(test_ids)
      assert sum(labels[pid] for pid in test_ids) == 1  # 4 positives dealt one per fold (stratified)
      tested += list(test_ids)
    assert sorted(tested) == sorted(patient_ids)


def test_patient_score_is_the_max_of_its_scored_slices():
  slice_patient = np.array([0, 0, 0, 1, 1, 2])
  slice_scores = np.array([0.1, 0.7, 0.3, np.nan, 0.2, np.nan])
  np.testing.assert_allclose(oracle.patient_scores(slice_scores, slice_patient, 3), [0.7, 0.2, np.nan])


def test_balanced_weights_give_each_class_half_the_total():
  labels = np.array([0, 0, 0, 0, 0, 0, 1, 1])
  weights = oracle.balanced_weights(labels)
  assert np.isclose(weights[labels == 0].sum(), 4.0) and np.isclose(weights[labels == 1].sum(), 4.0)


def test_dihedral_augment_keeps_each_image_a_rotation_or_flip_of_itself():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, (16, 6, 6, 3)).astype(np.uint8)
  out = oracle.dihedral_augment(images, np.random.default_rng(1))
  for original, augmented in zip(images, out):
    variants = [np.rot90(original, turn, axes=(0, 1)) for turn in range(4)]
    variants += [variant[:, ::-1] for variant in variants]
    assert any(np.array_equal(augmented, variant) for variant in variants)


def test_task_p_folds_stratify_on_the_p_label():
  """--task=p: the folds are dealt on label_p (here every third patient p-positive), not on label_sb."""
  patient_ids = [f"p{index:02d}" for index in range(12)]
  labels_p = {pid: int(index % 3 == 0) for index, pid in enumerate(patient_ids)}
  for train_ids, test_ids in oracle.patient_folds(labels_p, 4, 0, task="p"):
    assert not set(train_ids) & set(test_ids)
    assert sum(labels_p[pid] for pid in test_ids) == 1


def test_nodule_summary_counts_the_chosen_tasks_positives():
  arrays = {"peak_coverage": np.array([0.9, 0.1, 0.6, 0.0], np.float32),
            "area_px": np.array([2.0, 0.1, 4.0, 0.0], np.float32), "num_nodules": np.array([1, 1, 2, 0], np.int32),
            "slice_patient": np.array([0, 0, 1, 2], np.int32),
            "label_sb": np.array([1, 0, 0], np.int32), "label_p": np.array([1, 1, 0], np.int32)}
  summary_p = oracle.nodule_summary(arrays, 0.5, task="p")
  assert summary_p["positive_patients_label_p"] == 2 and summary_p["positive_slices"] == 2
  assert summary_p["positive_patients_oracle"] == 2  # patients 0 and 1 have a slice covered >= 0.5
  # per positive slice, area / nodules: 2.0 and 2.0 -> median 2.0 px
  assert np.isclose(summary_p["nodule_area_px_median"], 2.0)
  assert oracle.nodule_summary(arrays, 0.5)["positive_patients_label_sb"] == 1


def test_mask_option_names_the_phantom_mask_arrays_and_its_own_cache():
  # The phantom writes these arrays into masks/<patient_id>.npz (pdx_tf/phantom/cohort.py).
  assert oracle.MASK_ARRAYS == {"small_bowel_nodule": "small_bowel_nodule_mask", "nodule": "nodule_mask"}
  assert oracle.cache_name(48, "small_bowel_nodule") == "slices-48px.npz"  # earlier caches keep their name
  assert oracle.cache_name(48, "nodule") != oracle.cache_name(48, "small_bowel_nodule")
  assert oracle.TASK_LABELS == {"sb": "label_sb", "p": "label_p"}
  try:
    oracle.cohort_arrays("/nonexistent", "/nonexistent", [48], mask="cake")
  except ValueError as error:
    assert "cake" in str(error)
  else:
    raise AssertionError("an unknown mask must be refused")


def test_run_seed_scores_patients_against_the_chosen_tasks_label(monkeypatch):
  """With a stand-in network whose slice score is the image's mean, a cohort where the bright patients are the
  p-positive ones (and sb marks others) gives patient AUC 1 for --task=p and exactly 0.5 for sb (hand-counted)."""
  num_patients = 8
  label_p = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.int32)
  label_sb = np.array([1, 0, 0, 0, 1, 0, 0, 0], np.int32)  # one bright, one dark sb-positive
  slice_patient = np.repeat(np.arange(num_patients), 2).astype(np.int32)
  brightness = np.where(label_p[slice_patient] == 1, 200, 20) + np.arange(len(slice_patient))
  arrays = {"images": np.broadcast_to(brightness[:, None, None, None], (16, 4, 4, 3)).astype(np.uint8),
            "peak_coverage": np.where(label_p[slice_patient] == 1, 1.0, 0.0).astype(np.float32),
            "slice_patient": slice_patient, "patient_ids": np.array([f"q{i}" for i in range(num_patients)]),
            "label_p": label_p, "label_sb": label_sb}
  monkeypatch.setattr(oracle, "train_and_predict",
                      lambda train_images, train_labels, test_images, *args: test_images.mean(axis=(1, 2, 3)))
  result_p = oracle.run_seed(arrays, 4, 0, 2, 1, 0.5, task="p")
  assert result_p["patient_auc_pooled"] == 1.0 and result_p["slice_auc_pooled"] == 1.0
  # sb: positives q0 (bright) and q4 (dark) against 6 negatives (3 bright, 3 dark; brightness rises with index):
  # q0 beats the dark q5-q7 (3) and none of q1-q3; q4 beats none of q1-q3 and none of q5-q7 -> 3 of 12 pairs.
  result_sb = oracle.run_seed(arrays, 4, 0, 2, 1, 0.5, task="sb")
  assert np.isclose(result_sb["patient_auc_pooled"], 3 / 12)


def test_context_images_stack_a_patients_neighbours_and_never_cross_patients():
  # Patient 0 has slices 0-2, patient 1 slices 3-4; slice i is filled with the value 10 * i.
  images = np.stack([np.full((2, 2, 3), 10 * i, np.uint8) for i in range(5)])
  stacked = oracle.context_images(images, np.array([0, 0, 0, 1, 1]))
  below_slice_above = [tuple(int(stacked[i, 0, 0, c]) for c in range(3)) for i in range(5)]
  assert below_slice_above == [(0, 0, 10), (0, 10, 20), (10, 20, 20), (30, 30, 40), (30, 40, 40)]


def test_detector_pools_its_logit_map_by_log_sum_exp():
  import keras

  keras.utils.set_random_seed(0)
  model = oracle.detector_model(32, channels=1)
  images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 1)).astype(np.float32)
  logit_layer = [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)][-1]
  logit_maps = np.asarray(keras.Model(model.inputs, logit_layer.output)(images)).reshape(3, -1)
  assert logit_maps.shape[1] == (32 // 4) ** 2  # stride 4
  r = oracle.DETECTOR_SHARPNESS
  # Independent: a stable log-sum-exp in numpy, the smooth max of Pinheiro & Collobert.
  top = logit_maps.max(axis=1, keepdims=True)
  pooled = (np.log(np.exp(r * (logit_maps - top)).sum(axis=1, keepdims=True)) + r * top
            - np.log(logit_maps.shape[1])) / r
  expected = 1 / (1 + np.exp(-pooled))
  np.testing.assert_allclose(np.asarray(model(images)), expected, rtol=1e-4, atol=1e-6)
  # It lies between the map's mean and its max, as a smooth max should.
  assert np.all(pooled[:, 0] >= logit_maps.mean(axis=1) - 1e-5) and np.all(pooled[:, 0] <= top[:, 0] + 1e-5)


def test_an_unknown_network_is_refused_before_any_work(tmp_path):
  import pytest

  with pytest.raises(ValueError, match="unknown network 'resnet'; choose one of mobilenet, detector"):
    oracle.run(str(tmp_path), [48], [0], 2, 1, 0.5, str(tmp_path / "no-cohort"), task="p", network="resnet")


def test_cell_targets_mark_each_stride_block_holding_a_covered_pixel():
  coverage = np.zeros((2, 8, 8), np.uint8)
  coverage[0, 1, 6] = 255   # cell (0, 1): fully covered pixel
  coverage[0, 5, 2] = 128   # cell (1, 0): 0.502 >= 0.5
  coverage[0, 6, 6] = 127   # cell (1, 1): 0.498 < 0.5
  coverage[1, 4, 4] = 200   # slice 1, cell (1, 1)
  targets = oracle.cell_targets(coverage, 0.5, stride=4)
  # Independent: loop over the cells by hand.
  expected = np.zeros((2, 2, 2), np.float32)
  for n in range(2):
    for i in range(2):
      for j in range(2):
        expected[n, i, j] = float(any(coverage[n, 4 * i + a, 4 * j + b] / 255.0 >= 0.5
                                      for a in range(4) for b in range(4)))
  np.testing.assert_array_equal(targets, expected)
  assert targets.tolist() == [[[0, 1], [1, 0]], [[0, 0], [0, 1]]]
  try:
    oracle.cell_targets(np.zeros((1, 6, 6), np.uint8), 0.5, stride=4)
  except ValueError as error:
    assert "multiple of 4" in str(error)
  else:
    raise AssertionError("a size that is not a multiple of the stride must be refused")


def test_the_same_key_turns_images_and_their_cell_labels_alike():
  """--supervision=pixels augments images and cell maps with two rngs of one key: the bright block stays on the
  cell that is labelled, whatever turn and flip each image drew."""
  images = np.zeros((16, 8, 8, 1), np.float32)
  cells = np.zeros((16, 2, 2), np.float32)
  for n in range(16):
    i, j = divmod(n % 4, 2)
    images[n, 4 * i:4 * i + 4, 4 * j:4 * j + 4] = 1.0
    cells[n, i, j] = 1.0
  turned = oracle.dihedral_augment(images, np.random.default_rng([3, 1]))
  turned_cells = oracle.dihedral_augment(cells[..., None], np.random.default_rng([3, 1]))[..., 0]
  block_means = turned[..., 0].reshape(16, 2, 4, 2, 4).mean(axis=(2, 4))
  np.testing.assert_array_equal(block_means, turned_cells)
  assert not np.array_equal(turned_cells, cells)  # some image did move


def test_weighted_cell_loss_is_cross_entropy_with_heavier_nodule_cells():
  logits = np.array([[[[2.0], [-1.0]], [[0.5], [-3.0]]]], np.float32)
  targets = np.array([[[[1.0], [0.0]], [[0.0], [1.0]]]], np.float32)
  probability = 1 / (1 + np.exp(-logits.astype(np.float64)))
  cross_entropy = -(targets * np.log(probability) + (1 - targets) * np.log(1 - probability))
  weights = np.where(targets == 1, oracle.PIXEL_POSITIVE_WEIGHT, 1.0)
  np.testing.assert_allclose(float(oracle.weighted_cell_loss(targets, logits)), (weights * cross_entropy).mean(),
                             rtol=1e-5)


def test_pixel_supervision_needs_the_detector(tmp_path):
  import pytest

  with pytest.raises(ValueError, match="pixels and patient need --network=detector"):
    oracle.run(str(tmp_path), [48], [0], 2, 1, 0.5, str(tmp_path / "no-cohort"), task="p", supervision="pixels")


def test_pixel_supervised_detector_learns_a_bright_block_on_noise(monkeypatch):
  """A smoke of the whole pixel-supervised path: half the 32 px images carry a 4 x 4 block 60 grey levels above
  noise of SD 20; the trained detector's pooled score ranks held-out images with a block above those without.
  Batches of 4, so that 20 epochs of 96 images (480 steps) bring batch normalisation's moving statistics (momentum
  0.99) near the data's; at 16 steps an epoch they still carried the initial variance and the held-out AUC was 0.6."""
  monkeypatch.setattr(oracle, "BATCH_SIZE", 4)
  rng = np.random.default_rng(0)
  def make(count):
    images = rng.normal(100, 20, (count, 32, 32, 1)).clip(0, 255).astype(np.float32)
    coverage = np.zeros((count, 32, 32), np.uint8)
    has_block = np.arange(count) % 2 == 0
    for n in np.flatnonzero(has_block):
      y, x = rng.integers(0, 28, 2)
      images[n, y:y + 4, x:x + 4] += 60
      coverage[n, y:y + 4, x:x + 4] = 255
    return images, coverage, has_block.astype(np.int32)
  train_images, train_coverage, train_labels = make(96)
  test_images, _, test_labels = make(32)
  scores = oracle.train_and_predict(train_images, train_labels, test_images, 32, key=1, epochs=20,
                                    network="detector", train_cells=oracle.cell_targets(train_coverage, 0.5))
  from sklearn.metrics import roc_auc_score
  assert scores.shape == (32,)
  assert roc_auc_score(test_labels, scores) > 0.9


def test_a_bag_is_the_patients_own_slices_in_order_repeated_to_its_length():
  slice_patient = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
  assert oracle.bag_indices(slice_patient, 0, bag_slices=7).tolist() == [0, 1, 2, 0, 1, 2, 0]
  assert oracle.bag_indices(slice_patient, 1, bag_slices=3).tolist() == [3, 4, 3]
  assert oracle.bag_indices(slice_patient, 2, bag_slices=4).tolist() == [5, 6, 7, 8]  # the first 4 of 5
  try:
    oracle.bag_indices(slice_patient, 3, bag_slices=4)
  except ValueError as error:
    assert "no slice" in str(error)
  else:
    raise AssertionError("a patient without slices must be refused")


def test_the_bag_pools_every_cell_of_every_slice_by_log_sum_exp():
  import keras

  keras.utils.set_random_seed(0)
  model, slice_model = oracle.bag_model(16, channels=1, bag_slices=3)
  bags = np.random.default_rng(1).uniform(0, 255, (2, 3, 16, 16, 1)).astype(np.float32)
  logit_layer = slice_model.get_layer(oracle.DETECTOR_LOGITS)
  maps = np.asarray(keras.Model(slice_model.inputs, logit_layer.output)(bags.reshape(6, 16, 16, 1)))
  cells = maps.reshape(2, -1).astype(np.float64)  # each bag's 3 slices x 4 x 4 cells
  assert cells.shape[1] == 3 * (16 // 4) ** 2
  r = oracle.DETECTOR_SHARPNESS
  top = cells.max(axis=1, keepdims=True)
  pooled = (np.log(np.exp(r * (cells - top)).sum(axis=1, keepdims=True)) + r * top - np.log(cells.shape[1])) / r
  np.testing.assert_allclose(np.asarray(model(bags)), 1 / (1 + np.exp(-pooled)), rtol=1e-4, atol=1e-6)


def test_bags_learn_which_patients_hold_a_block_from_patient_labels_alone(monkeypatch):
  """Each patient has 4 slices of noise; a positive patient's block sits on one random slice. Only the patient
  labels train; held-out positives must rank above held-out negatives, and the block's slices above the rest."""
  monkeypatch.setattr(oracle, "BAG_SLICES", 4)
  rng = np.random.default_rng(0)
  num_patients, size = 48, 16
  labels = np.arange(num_patients) % 2
  images = rng.normal(100, 20, (num_patients * 4, size, size, 1)).clip(0, 255).astype(np.float32)
  slice_patient = np.repeat(np.arange(num_patients), 4)
  block_slice = np.zeros(len(images), bool)
  for patient in np.flatnonzero(labels):
    chosen = 4 * patient + rng.integers(4)
    y, x = rng.integers(0, size - 4, 2)
    images[chosen, y:y + 4, x:x + 4] += 80
    block_slice[chosen] = True
  train, test = list(range(32)), list(range(32, 48))
  patient_scores, slice_scores = oracle.train_and_predict_bags(images, slice_patient, labels, train, test, key=3,
                                                            epochs=12)
  from sklearn.metrics import roc_auc_score
  assert np.isnan(slice_scores[:128]).all() and np.isfinite(slice_scores[128:]).all()
  assert roc_auc_score(labels[test], patient_scores) > 0.9
  assert roc_auc_score(block_slice[128:], slice_scores[128:]) > 0.9
