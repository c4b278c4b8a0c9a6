"""Tests for pdx_tf.serving.gradcam: the nested-backbone Grad-CAM, overlays, mask mapping and the localisation ratio."""

import os

import keras
import matplotlib
import numpy as np
import pytest

from pdx_tf.data import preprocess
from pdx_tf.serving import gradcam
from pdx_tf.training import model as model_lib
from pdx_tf.testing import fake_cells

matplotlib.use("Agg")
SIZE = 64
RED_SQUARE = (slice(8, 24), slice(8, 24))
GREEN_SQUARE = (slice(40, 56), slice(40, 56))


def _two_channel_model(red_weight: float, green_weight: float) -> keras.Model:
  """A model with build_model's structure whose features are red and green brightness on an 8x8 grid.

  The nested backbone is named "mobilenetv2" and ends in a layer "out_relu", like the real one; the output
  depends only on the channels with a nonzero weight, so Grad-CAM must light up only their square.
  """
  inputs = keras.Input((SIZE, SIZE, 3), name="image")
  scaled = keras.layers.Rescaling(1.0 / 255.0, name="to_unit_range")(inputs)
  backbone_input = keras.Input((SIZE, SIZE, 3))
  pooled_grid = keras.layers.AveragePooling2D(pool_size=8)(backbone_input)
  channels = keras.layers.Conv2D(2, 1, use_bias=False, name="select_channels")(pooled_grid)
  features = keras.layers.ReLU(name="out_relu")(channels)
  backbone = keras.Model(backbone_input, features, name=model_lib.BACKBONE_NAME)
  hidden = backbone(scaled)
  hidden = keras.layers.GlobalAveragePooling2D(name="pool")(hidden)
  outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(hidden)
  model = keras.Model(inputs, outputs)
  select = np.zeros((1, 1, 3, 2), np.float32)
  select[0, 0, 0, 0] = 1.0  # red -> channel 0
  select[0, 0, 1, 1] = 1.0  # green -> channel 1
  backbone.get_layer("select_channels").set_weights([select])
  model.get_layer("probability").set_weights([np.array([[red_weight], [green_weight]], np.float32),
                                              np.array([-1.0], np.float32)])
  return model


def _two_squares_image() -> np.ndarray:
  image = np.zeros((1, SIZE, SIZE, 3), np.uint8)
  image[..., 2] = 120  # blue background: a channel the model ignores
  image[(0, *RED_SQUARE, 0)] = 250
  image[(0, *GREEN_SQUARE, 1)] = 250
  return image


@pytest.mark.parametrize("red_weight, green_weight, hot, cold", [
    (8.0, 0.0, RED_SQUARE, GREEN_SQUARE),
    (0.0, 8.0, GREEN_SQUARE, RED_SQUARE),
])
def test_heatmap_falls_on_the_region_the_output_depends_on(red_weight, green_weight, hot, cold):
  heatmap = gradcam.grad_cam(_two_channel_model(red_weight, green_weight), _two_squares_image())[0]
  assert heatmap.shape == (SIZE, SIZE) and heatmap.dtype == np.float32
  assert heatmap.max() == pytest.approx(1.0)
  total = heatmap.sum()
  assert heatmap[hot].sum() / total > 0.6  # the square is 6 % of the image
  assert heatmap[cold].sum() / total < 0.02
  peak_row, peak_column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
  assert hot[0].start <= peak_row < hot[0].stop and hot[1].start <= peak_column < hot[1].stop


def test_real_mobilenetv2_heatmaps_are_finite_normalised_and_shaped():
  model = fake_cells.make_fake_model(seed=1, image_size=SIZE)
  images = preprocess.preprocess_slices(fake_cells.fake_hu_slices(2, 3),
                                        preprocess.PreprocessConfig(image_size=SIZE)).numpy()
  heatmaps = gradcam.grad_cam(model, images, batch_size=2)  # two batches
  assert heatmaps.shape == (3, SIZE, SIZE) and heatmaps.dtype == np.float32
  assert np.isfinite(heatmaps).all() and heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
  for heatmap in heatmaps:
    assert heatmap.max() in (0.0, pytest.approx(1.0))
  assert np.ptp(heatmaps) > 0.1  # a 2x2 feature grid: not a constant map
  # Same model from build_model directly (no fake weights): still well-formed.
  plain = model_lib.build_model(model_lib.ModelConfig(image_size=SIZE, alpha=0.35))
  plain_maps = gradcam.grad_cam(plain, images.astype(np.float32))
  assert plain_maps.shape == (3, SIZE, SIZE) and np.isfinite(plain_maps).all()
  ensemble = gradcam.ensemble_grad_cam([model, model], images)
  np.testing.assert_allclose(ensemble, heatmaps, atol=1e-6)


@pytest.mark.parametrize("size, layer, side", [
    (224, "out_relu", 7), (128, "block_13_expand_relu", 8), (64, "block_6_expand_relu", 8),
    (48, "block_3_expand_relu", 12), (32, "block_3_expand_relu", 8)])
def test_default_layer_is_the_deepest_with_a_map_of_at_least_7(size, layer, side):
  assert model_lib.gradcam_layer(size) == layer
  if size <= 64:  # build the real backbone only at small sizes (cheap); the rule is arithmetic above that
    model = model_lib.build_model(model_lib.ModelConfig(image_size=size, alpha=0.35))
    backbone = model.get_layer(model_lib.BACKBONE_NAME)
    assert backbone.get_layer(layer).output.shape[1] == side
    assert gradcam._default_layer(backbone) == layer  # pylint: disable=protected-access


def test_grad_cam_rejects_models_without_the_backbone():
  inputs = keras.Input((SIZE, SIZE, 3))
  outputs = keras.layers.Dense(1)(keras.layers.GlobalAveragePooling2D()(inputs))
  with pytest.raises(ValueError, match="mobilenetv2/out_relu"):
    gradcam.grad_cam(keras.Model(inputs, outputs), np.zeros((1, SIZE, SIZE, 3), np.uint8))


def test_overlay_and_png(tmp_path):
  image = np.full((SIZE, SIZE, 3), 100, np.uint8)
  heatmap = np.zeros((SIZE, SIZE), np.float32)
  heatmap[RED_SQUARE] = 1.0
  blended = gradcam.overlay(image, heatmap)
  assert blended.dtype == np.uint8 and blended.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(blended[50, 50], image[50, 50])  # no heat: untouched
  assert not np.array_equal(blended[10, 10], image[10, 10])
  path = os.path.join(tmp_path, "overlay.png")
  gradcam.save_overlay_png(path, image, heatmap, title="test")
  with open(path, "rb") as handle:
    assert handle.read(8) == b"\x89PNG\r\n\x1a\n"


def test_localisation_ratio_by_hand():
  body = np.zeros((2, 4, 5), bool)
  body[:, :, :] = True  # 20 body pixels a slice
  lesion = np.zeros((2, 4, 5), np.float32)
  lesion[0, 1, 1:3] = 1.0  # 2 lesion pixels on slice 0; slice 1 has none and is left out
  on_lesion = lesion.copy()
  assert gradcam.localisation_ratio(on_lesion, lesion, body) == pytest.approx((2 / 2) / (2 / 20))
  uniform = np.ones((2, 4, 5), np.float32)
  assert gradcam.localisation_ratio(uniform, lesion, body) == pytest.approx(1.0)
  half = uniform.copy()
  half[0, 1, 1] = 0.0  # heat 19 on the body, 1 on the lesion
  assert gradcam.localisation_ratio(half, lesion, body) == pytest.approx((1 / 19) / (2 / 20))
  with pytest.raises(ValueError, match="no slice has lesion"):
    gradcam.localisation_ratio(uniform, np.zeros_like(lesion), body)


def test_masks_follow_the_slice_crop_and_resize():
  hu = fake_cells.fake_hu_slices(9, 2, 96, 80)
  mask = np.zeros(hu.shape, np.float32)
  mask[:, 40:52, 30:44] = 1.0
  hu[mask > 0] = 1000.0  # make the masked block visible in HU, so the image itself locates it
  config = preprocess.PreprocessConfig(image_size=SIZE)
  mapped = gradcam.map_masks_to_model_grid(hu, mask, config)
  assert mapped.shape == (2, SIZE, SIZE) and mapped.min() >= 0.0 and mapped.max() <= 1.0
  resized_hu = preprocess.crop_resize_hu(hu, preprocess.body_boxes(hu, config), SIZE).numpy()
  bright = resized_hu > 600.0
  overlap = np.logical_and(mapped > 0.5, bright).sum() / np.logical_or(mapped > 0.5, bright).sum()
  assert overlap > 0.8
  # Covered area is preserved up to the resize scale: the box side in pixels maps to SIZE.
  assert mapped.sum() > 0


@pytest.mark.slow
def test_demo_models_use_the_disease_pixels(tmp_path_factory):
  """Trains the demo grid (8 folds at 48 px; about 8 minutes on 2 cores, instant when cached) and checks that the
  models use the phantom's disease: filling the disease pixels with fat lowers the slices' probability. Set
  PDX_TF_DEMO_ROOT to a folder (e.g. runs/demo) to reuse a finished demo.

  What holds over runs (benchmarks/README.md, the demo's 3-run table, earlier code): the probability drops from
  0.60-0.66 as read to 0.37-0.39 erased in every run (drops of 0.23-0.27), so the test asks for 0.1. The Grad-CAM
  localisation ratio does NOT hold: 0.86-1.29 over five runs, at chance at 48 px, so it is computed but not
  asserted (the Grad-CAM code itself is tested above on models built to look at one region).
  """
  import sys  # pylint: disable=import-outside-toplevel

  from pdx_tf import demo  # pylint: disable=import-outside-toplevel
  from pdx_tf import phantom  # pylint: disable=import-outside-toplevel

  root = os.environ.get("PDX_TF_DEMO_ROOT") or str(tmp_path_factory.mktemp("demo"))
  result = demo.run_demo("p", root=root, progress=False)
  sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
  import localisation_benchmark  # pylint: disable=import-outside-toplevel

  numbers = localisation_benchmark.run(None, result["output_dir"], "p", phantom.demo_cohort_dir(), 8, 0)
  assert numbers["num_slices"] > 0 and np.isfinite(numbers["ratio"])
  assert numbers["probability_erased"] < numbers["probability_as_read"] - 0.1, numbers


def test_ensemble_averages_the_maps_of_distinct_models():
  # Two models that look at different squares: the ensemble map must light up both, as the mean of the two
  # single-model maps (computed here one model at a time) renormalised to a peak of 1.
  red, green = _two_channel_model(8.0, 0.0), _two_channel_model(0.0, 8.0)
  image = _two_squares_image()
  red_map, green_map = gradcam.grad_cam(red, image), gradcam.grad_cam(green, image)
  assert not np.allclose(red_map, green_map, atol=0.1)  # the two models really differ
  mean = (red_map + green_map) / 2.0
  expected = mean / mean.max(axis=(1, 2), keepdims=True)
  ensemble = gradcam.ensemble_grad_cam([red, green], image)
  np.testing.assert_allclose(ensemble, expected, atol=1e-5)
  for square in (RED_SQUARE, GREEN_SQUARE):
    assert ensemble[0][square].mean() > 0.3  # both models' regions are hot
