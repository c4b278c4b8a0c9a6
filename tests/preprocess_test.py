"""Tests of the shared preprocessing (body crop, windowing) and the keyed augmentation."""

import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import augment, preprocess

SIZE = 64


def _slice_with_table():
  """A 64x64 slice: an elliptic body (rows 12..43, columns 8..55) and a table (rows 52..54) below an air gap."""
  image = np.full((SIZE, SIZE), -1000.0, np.float32)
  rows, columns = np.mgrid[0:SIZE, 0:SIZE]
  body = ((rows - 27.5) / 16.0) ** 2 + ((columns - 31.5) / 24.0) ** 2 <= 1.0
  image[body] = 40.0
  image[52:55, 2:62] = 300.0  # the table: wider than the body, separated by 8 air rows
  return image, body


def test_body_box_excludes_the_table():
  image, body = _slice_with_table()
  config = preprocess.PreprocessConfig(image_size=32, crop_margin_fraction=0.0)
  box = preprocess.body_boxes(image[np.newaxis], config).numpy()[0]
  rows, columns = np.nonzero(body)
  # Expected box, computed independently: the body's extent, squared on its longer side (the width).
  top, bottom = rows.min() / SIZE, (rows.max() + 1) / SIZE
  left, right = columns.min() / SIZE, (columns.max() + 1) / SIZE
  side = max(bottom - top, right - left)
  center_y, center_x = (top + bottom) / 2, (left + right) / 2
  np.testing.assert_allclose(box, [center_y - side / 2, center_x - side / 2, center_y + side / 2,
                                   center_x + side / 2], atol=1.0 / SIZE)
  # The table (from row 52) is outside the box's extent in x: the box spans the body's width only.
  assert box[1] > 2.0 / SIZE and box[3] < 62.0 / SIZE
  # The crop's bottom rows show air where a box including the table would show the table.
  cropped = preprocess.crop_resize_hu(image[np.newaxis], box[np.newaxis], 32).numpy()[0]
  assert cropped.max() < 100.0  # no table HU (300) anywhere in the crop


def test_slice_without_body_keeps_the_whole_image():
  empty = np.full((2, SIZE, SIZE), -1000.0, np.float32)
  empty[1, 10:20, 10:20] = 40.0  # the second slice has a body: boxes are per slice
  boxes = preprocess.body_boxes(empty, preprocess.PreprocessConfig(image_size=32)).numpy()
  np.testing.assert_array_equal(boxes[0], [0.0, 0.0, 1.0, 1.0])
  assert not np.array_equal(boxes[1], [0.0, 0.0, 1.0, 1.0])


def test_window_exact_values():
  hu = np.array([[[-1000.0, -160.0, 0.0, 40.0, 100.0, 240.0, 3000.0]]], np.float32)
  # W400/L40: (hu + 160) / 400 * 255, clipped to [0, 255] and rounded.
  expected = np.array([0, 0, 102, 127.5, 165.75, 255, 255])
  image = preprocess.window_hu(hu, ((40.0, 400.0),)).numpy()
  assert image.dtype == np.uint8 and image.shape == (1, 1, 7, 3)
  np.testing.assert_array_equal(image[0, 0, :, 0], np.round(expected).astype(np.uint8))
  np.testing.assert_array_equal(image[..., 0], image[..., 2])  # one window repeated
  triple = preprocess.window_hu(hu, preprocess.WINDOW_PRESETS["triple"]).numpy()[0, 0]
  # Second window 60/150: (hu + 15) / 150 * 255; third 300/1500: (hu + 450) / 1500 * 255.
  np.testing.assert_array_equal(triple[:, 1], np.round(np.clip((hu[0, 0] + 15) / 150, 0, 1) * 255))
  np.testing.assert_array_equal(triple[:, 2], np.round(np.clip((hu[0, 0] + 450) / 1500, 0, 1) * 255))


def test_parse_windows():
  assert preprocess.parse_windows("abdomen") == ((40.0, 400.0),)
  assert preprocess.parse_windows("50:350") == ((50.0, 350.0),)
  with pytest.raises(ValueError, match="not understood"):
    preprocess.parse_windows("40:400,60:150")


def test_eager_function_and_dataset_agree():
  image, _ = _slice_with_table()
  rng = np.random.default_rng(0)
  stack = np.stack([image + rng.normal(0, 20, image.shape).astype(np.float32) for _ in range(3)])
  config = preprocess.PreprocessConfig(image_size=32)
  eager = preprocess.preprocess_slices(stack, config).numpy()
  traced = tf.function(lambda hu: preprocess.preprocess_slices(hu, config))(tf.constant(stack)).numpy()
  dataset = tf.data.Dataset.from_tensor_slices(stack).batch(3).map(
      lambda hu: preprocess.preprocess_slices(hu, config))
  from_dataset = next(iter(dataset)).numpy()
  assert eager.shape == (3, 32, 32, 3) and eager.dtype == np.uint8
  np.testing.assert_array_equal(eager, traced)
  np.testing.assert_array_equal(eager, from_dataset)


def _asymmetric_image():
  image = np.full((16, 16), -1000.0, np.float32)
  image[3:6, 2:12] = 100.0
  image[6:13, 9:11] = 300.0
  return image


def test_augmentation_is_a_pure_function_of_its_key():
  image = _asymmetric_image()
  config = augment.AugmentConfig()
  first = augment.random_augment_hu(image, 7, "P001", 3, [1, 2, 3], config).numpy()
  again = augment.random_augment_hu(image, 7, "P001", 3, [1, 2, 3], config).numpy()
  assert first.tobytes() == again.tobytes()
  # A copy does not depend on which other copies are made with it.
  alone = augment.random_augment_hu(image, 7, "P001", 3, [2], config).numpy()
  np.testing.assert_array_equal(alone[0], first[1])
  for other in (augment.random_augment_hu(image, 8, "P001", 3, [1], config),
                augment.random_augment_hu(image, 7, "P002", 3, [1], config),
                augment.random_augment_hu(image, 7, "P001", 4, [1], config)):
    assert other.numpy()[0].tobytes() != first[0].tobytes()
  assert first[0].tobytes() != first[1].tobytes()


def test_flip_is_an_exact_mirror():
  image = _asymmetric_image()
  config = augment.AugmentConfig(rotation_max_deg=0.0, flip_probability=1.0, scale_min=1.0, scale_max=1.0)
  flipped = augment.random_augment_hu(image, 0, "P", 0, [1, 2], config).numpy()
  np.testing.assert_allclose(flipped[0], image[:, ::-1], atol=1e-3)
  np.testing.assert_allclose(flipped[1], image[:, ::-1], atol=1e-3)
  identity = augment.random_augment_hu(
      image, 0, "P", 0, [1], augment.AugmentConfig(rotation_max_deg=0.0, flip_probability=0.0, scale_min=1.0,
                                                   scale_max=1.0)).numpy()
  np.testing.assert_allclose(identity[0], image, atol=1e-3)


def test_rotation_by_90_degrees_turns_pixels_about_the_centre():
  image = _asymmetric_image()
  transform = augment.transform_vector(90.0, False, 1.0, 16)
  rotated = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[np.newaxis, ..., np.newaxis], transforms=tf.constant([transform], tf.float32),
      output_shape=tf.constant([16, 16]), fill_value=tf.constant(-1000.0), interpolation="BILINEAR",
      fill_mode="CONSTANT").numpy()[0, ..., 0]
  # Rotation about the exact centre maps pixel centres onto pixel centres: one of the two 90-degree turns.
  matches = [np.allclose(rotated, np.rot90(image, k), atol=1e-3) for k in (1, -1)]
  assert any(matches), "a 90-degree rotation must be a pure pixel permutation"
  # Scale 2 about the centre keeps the centre pixel value and doubles distances.
  zoom = augment.transform_vector(0.0, False, 2.0, 16)
  assert zoom[0] == pytest.approx(0.5) and zoom[2] == pytest.approx(7.5 - 0.5 * 7.5)


def test_augment_config_validation():
  with pytest.raises(ValueError, match="scale_min"):
    augment.AugmentConfig(scale_min=1.2, scale_max=1.1)
