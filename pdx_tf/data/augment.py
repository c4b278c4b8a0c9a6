"""Keyed offline augmentation: random rotation, flip and scaling of HU slices.

Every augmented copy is a pure function of (seed, patient_id, slice_index, augmentation_index): its
parameters come from a `numpy.random.Generator` built from that key, and the warp is a deterministic
TensorFlow op, so a rerun writes identical bytes and any single copy can be rebuilt on its own.

Augmentation acts on the cropped, resized HU image (before windowing), so every window sees the same warp
and the corners that rotate in read as air.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.data import preprocess


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the random augmentations (the paper: rotation, flip and scaling).

  Attributes:
    rotation_max_deg: rotation angle drawn uniformly in [-rotation_max_deg, rotation_max_deg].
    flip_probability: probability of a left-right flip.
    scale_min: smallest zoom factor (below 1 shrinks the body).
    scale_max: largest zoom factor.
  """

  rotation_max_deg: float = 15.0
  flip_probability: float = 0.5
  scale_min: float = 0.9
  scale_max: float = 1.1

  def __post_init__(self):
    if not 0.0 <= self.rotation_max_deg <= 180.0:
      raise ValueError(f"rotation_max_deg must be in [0, 180], got {self.rotation_max_deg}")
    if not 0.0 <= self.flip_probability <= 1.0:
      raise ValueError(f"flip_probability must be in [0, 1], got {self.flip_probability}")
    if not 0.0 < self.scale_min <= self.scale_max:
      raise ValueError(f"need 0 < scale_min <= scale_max, got {self.scale_min} and {self.scale_max}")


def random_parameters(seed: int, patient_id: str, slice_index: int, augmentation_index: int,
                      config: AugmentConfig) -> tuple[float, bool, float]:
  """Draws (angle_deg, flip, scale) for one augmented copy from its own key."""
  generator = np.random.default_rng([seed, io_utils.stable_key(patient_id), slice_index, augmentation_index])
  angle_deg = float(generator.uniform(-config.rotation_max_deg, config.rotation_max_deg))
  flip = bool(generator.random() < config.flip_probability)
  scale = float(math.exp(generator.uniform(math.log(config.scale_min), math.log(config.scale_max))))
  return angle_deg, flip, scale


def transform_vector(angle_deg: float, flip: bool, scale: float, size: int) -> list[float]:
  """The 8-number projective transform mapping output pixels to input pixels (about the image centre)."""
  theta = math.radians(angle_deg)
  cos, sin = math.cos(theta), math.sin(theta)
  # Forward map: output = c + scale * R @ F @ (input - c); invert it: input = c + F @ R^-1 @ (output - c) / scale.
  flip_sign = -1.0 if flip else 1.0
  m00, m01 = flip_sign * cos / scale, flip_sign * sin / scale
  m10, m11 = -sin / scale, cos / scale
  center = (size - 1) / 2.0
  return [m00, m01, center - m00 * center - m01 * center, m10, m11, center - m10 * center - m11 * center, 0.0, 0.0]


def random_augment_hu(hu_images: tf.Tensor, seed: int, patient_id: str, slice_index: int,
                      augmentation_indices: list[int] | np.ndarray, config: AugmentConfig) -> tf.Tensor:
  """Augmented copies of one cropped HU slice.

  Args:
    hu_images: float [S, S] HU image of one slice (the output of `preprocess.crop_resize_hu`).
    seed: the cohort's augmentation seed.
    patient_id: manifest patient ID (part of the key).
    slice_index: the slice's index within the patient's abdominal slices (part of the key).
    augmentation_indices: which copies to make (1..N; 0 is the original and is never augmented).
    config: augmentation ranges.

  Returns:
    float [len(augmentation_indices), S, S] HU images.
  """
  hu_images = tf.convert_to_tensor(hu_images, tf.float32)
  size = int(hu_images.shape[-1])
  transforms = [transform_vector(*random_parameters(seed, patient_id, slice_index, int(index), config), size)
                for index in augmentation_indices]
  count = len(transforms)
  if count == 0:
    return tf.zeros([0, size, size], tf.float32)
  batch = tf.repeat(hu_images[tf.newaxis, ..., tf.newaxis], count, axis=0)
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=batch, transforms=tf.constant(transforms, tf.float32), output_shape=tf.constant([size, size]),
      fill_value=tf.constant(preprocess.AIR_HU, tf.float32), interpolation="BILINEAR", fill_mode="CONSTANT")
  return warped[..., 0]
