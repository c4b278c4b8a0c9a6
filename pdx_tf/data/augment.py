"""Keyed offline augmentation: random rotation, flip and scaling of HU slices.

Every augmented copy is a pure function of (seed, patient_id, slice_index, augmentation_index): its
parameters come from a `numpy.random.Generator` built from that key, and the warp is a deterministic
TensorFlow op, so a rerun writes identical bytes and any single copy can be rebuilt on its own.

Augmentation acts on the cropped, resized HU image (before windowing), so every window sees the same warp
and the corners that rotate in read as air.

Each augmentation is declared once, by name, in pdx_tf/augmentations.py (the core: its settings, check, keyed
draw and transform); this module applies their transforms to HU slices.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pdx_tf import augmentations
from pdx_tf.data import preprocess


# The declarations live in the core (pdx_tf/augmentations.py) so that reading dataset.json types and checks the
# settings without importing this stage; they are re-exported here for the stage's callers.
AugmentConfig = augmentations.AugmentConfig
Augmentation = augmentations.Augmentation
LinearMap = augmentations.LinearMap
IDENTITY_MAP = augmentations.IDENTITY_MAP
settings_dict = augmentations.settings_dict
random_draws = augmentations.random_draws
random_parameters = augmentations.random_parameters
is_flipped = augmentations.is_flipped
transform_from_draws = augmentations.transform_from_draws
transform_vector = augmentations.transform_vector
random_transform = augmentations.random_transform


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
  transforms = [random_transform(seed, patient_id, slice_index, int(index), config, size)
                for index in augmentation_indices]
  count = len(transforms)
  if count == 0:
    return tf.zeros([0, size, size], tf.float32)
  batch = tf.repeat(hu_images[tf.newaxis, ..., tf.newaxis], count, axis=0)
  warped = tf.raw_ops.ImageProjectiveTransformV3(
      images=batch, transforms=tf.constant(transforms, tf.float32), output_shape=tf.constant([size, size]),
      fill_value=tf.constant(preprocess.AIR_HU, tf.float32), interpolation="BILINEAR", fill_mode="CONSTANT")
  return warped[..., 0]
