"""The one source of image preprocessing: body crop, resize and HU windowing, as pure TensorFlow ops.

The data pipeline, training-time checks, the SavedModel serving signatures and `predict` all call these
functions, so a slice is turned into model input by exactly the same graph everywhere. Everything is written
in TensorFlow (no numpy or Python control flow on values) so that it can live inside an exported SavedModel.

Steps for a stack of HU slices `[N, H, W]`:
1. `body_boxes`: the body is the largest connected component of `hu > body_threshold_hu` on a 128x128
   area-downsampled copy, after a 3x3 binary opening that cuts thin bridges such as the patient table's
   contact. The box is that component's bounding box plus a margin, made square (CT pixels are square), in
   normalised image coordinates. Slices with no body keep the whole image.
2. `crop_resize_hu`: bilinear sampling of the box at `SUPERSAMPLE` times the output size, then average
   pooling: an anti-aliased resize (plain bilinear sampling at 64 px would skip most pixels of a 10 mm
   nodule). Outside the image reads as air (-1000 HU).
3. `window_hu`: each (center, width) window maps HU linearly to [0, 255], clipped and rounded. A single
   window is repeated to the three channels MobileNetV2 expects; three windows give three channels.
"""

from __future__ import annotations

import tensorflow as tf

# The typed settings (PreprocessConfig, the window presets, their checks) live in the core (pdx_tf/settings.py) so
# that the hand-offs (contracts.py) hold them typed without importing this stage; re-exported here.
from pdx_tf.settings import (  # noqa: F401  pylint: disable=unused-import
    WINDOW_PRESETS, PreprocessConfig, check_context_windows, preprocess_config_from_dict)

AIR_HU = -1000.0
MASK_SIZE = 128  # The body mask is computed at this resolution, whatever the input size.
SUPERSAMPLE = 4  # Anti-aliasing factor of the resize (see module docstring).
MAX_LABEL_ITERATIONS = 4 * MASK_SIZE  # Generous bound on label propagation (path length in mask pixels).

def parse_windows(text: str) -> tuple[tuple[float, float], ...]:
  """Parses a `--window` value: a preset name (`abdomen`, `triple`) or `C:W[,C:W,C:W]` in HU.

  Raises:
    ValueError: with the accepted forms, if `text` is neither.
  """
  text = text.strip()
  if text in WINDOW_PRESETS:
    return WINDOW_PRESETS[text]
  try:
    windows = tuple(tuple(float(part) for part in item.split(":")) for item in text.split(","))
  except ValueError:
    windows = ()
  if not windows or any(len(window) != 2 for window in windows) or len(windows) not in (1, 3):
    raise ValueError(
        f"--window={text!r} is not understood; use a preset ({', '.join(WINDOW_PRESETS)}) or one or three"
        " center:width pairs in HU, e.g. 40:400 or 40:400,60:150,300:1500")
  return windows  # type: ignore[return-value]


def _as_stack(hu: tf.Tensor) -> tf.Tensor:
  hu = tf.convert_to_tensor(hu, dtype=tf.float32)
  tf.debugging.assert_rank(hu, 3, message="HU slices must be a [N, H, W] float tensor")
  return hu


def _largest_component(mask: tf.Tensor) -> tf.Tensor:
  """Largest 8-connected component of each boolean [N, M, M] mask, by max-label propagation."""
  count = tf.shape(mask)[0]
  size = tf.shape(mask)[1] * tf.shape(mask)[2]
  ids = tf.reshape(tf.range(1, size + 1, dtype=tf.float32), tf.shape(mask)[1:])
  # Slices go to the channel axis ([1, M, M, N]): max pooling runs about 4x faster on many channels than on
  # a batch of single-channel images, and propagation is most of the cost of preprocessing.
  maskf = tf.transpose(tf.cast(mask, tf.float32), [1, 2, 0])[tf.newaxis]
  labels = ids[tf.newaxis, :, :, tf.newaxis] * maskf

  def spread(current):
    return tf.nn.max_pool2d(current, ksize=3, strides=1, padding="SAME") * maskf

  def keep_going(iteration, current, previous):
    return tf.logical_and(iteration < MAX_LABEL_ITERATIONS, tf.reduce_any(tf.not_equal(current, previous)))

  def step(iteration, current, _):
    # Four spreads per convergence check: the check is the costly part on small masks.
    grown = spread(spread(spread(spread(current))))
    return iteration + 1, grown, current

  _, labels, _ = tf.while_loop(keep_going, step, (tf.constant(0), spread(labels), labels))
  labels = tf.cast(tf.transpose(labels[0], [2, 0, 1]), tf.int32)
  # Count pixels per (slice, label) with one bincount over offset labels.
  offsets = tf.range(count)[:, tf.newaxis, tf.newaxis] * (size + 1)
  counts = tf.math.bincount(tf.reshape(labels + offsets, [-1]), minlength=count * (size + 1),
                            maxlength=count * (size + 1))
  counts = tf.reshape(counts, [count, size + 1])
  counts = tf.concat([tf.zeros([count, 1], counts.dtype), counts[:, 1:]], axis=1)  # label 0 is background
  winner = tf.cast(tf.argmax(counts, axis=1), tf.int32)
  return tf.logical_and(tf.equal(labels, winner[:, tf.newaxis, tf.newaxis]), mask)


def body_masks(hu: tf.Tensor, body_threshold_hu: float = -500.0) -> tf.Tensor:
  """Boolean [N, MASK_SIZE, MASK_SIZE] body masks (largest component after a 3x3 opening).

  Args:
    hu: float [N, H, W] slices in HU, any H and W.
    body_threshold_hu: voxels above this are candidate body.
  """
  hu = _as_stack(hu)
  small = tf.image.resize(hu[..., tf.newaxis], [MASK_SIZE, MASK_SIZE], method="area")[..., 0]
  above = tf.cast(small > body_threshold_hu, tf.float32)[..., tf.newaxis]
  eroded = -tf.nn.max_pool2d(-above, ksize=3, strides=1, padding="SAME")
  opened = tf.nn.max_pool2d(eroded, ksize=3, strides=1, padding="SAME")[..., 0] > 0.5
  return _largest_component(opened)


def body_boxes(hu: tf.Tensor, config: PreprocessConfig) -> tf.Tensor:
  """Square crop boxes [N, 4] as normalised (y_min, x_min, y_max, x_max), one per slice.

  The box may extend past the image (that part reads as air), so the body is never cut and never stretched.
  """
  hu = _as_stack(hu)
  return boxes_from_masks(body_masks(hu, config.body_threshold_hu), tf.shape(hu)[1], tf.shape(hu)[2], config)


def boxes_from_masks(masks: tf.Tensor, height_px: tf.Tensor | int, width_px: tf.Tensor | int,
                     config: PreprocessConfig) -> tf.Tensor:
  """`body_boxes` from already computed `body_masks` of [N, height_px, width_px] slices.

  For callers that have the masks anyway (the pipeline's abdominal z-range rule measures every slice's body),
  so the costly mask is computed once per slice.
  """
  masks = tf.convert_to_tensor(masks, tf.bool)
  rows = tf.reduce_any(masks, axis=2)
  columns = tf.reduce_any(masks, axis=1)
  scale = tf.cast(MASK_SIZE, tf.float32)

  def extent(occupied):
    index = tf.range(MASK_SIZE, dtype=tf.float32)[tf.newaxis]
    big = tf.constant(1e9)
    first = tf.reduce_min(tf.where(occupied, index, big), axis=1)
    last = tf.reduce_max(tf.where(occupied, index, -big), axis=1) + 1.0
    return first / scale, last / scale

  y_min, y_max = extent(rows)
  x_min, x_max = extent(columns)
  found = tf.reduce_any(rows, axis=1)
  height_px = tf.cast(height_px, tf.float32)
  width_px = tf.cast(width_px, tf.float32)
  # Square in pixels: side = the longer extent plus the margin on both sides.
  side_px = tf.maximum((y_max - y_min) * height_px, (x_max - x_min) * width_px)
  side_px = side_px * (1.0 + 2.0 * config.crop_margin_fraction)
  center_y = (y_min + y_max) / 2.0
  center_x = (x_min + x_max) / 2.0
  half_y = side_px / height_px / 2.0
  half_x = side_px / width_px / 2.0
  boxes = tf.stack([center_y - half_y, center_x - half_x, center_y + half_y, center_x + half_x], axis=1)
  whole = tf.constant([[0.0, 0.0, 1.0, 1.0]])
  return tf.where(found[:, tf.newaxis], boxes, whole)


def crop_resize_hu(hu: tf.Tensor, boxes: tf.Tensor, image_size: int) -> tf.Tensor:
  """Anti-aliased crop of each slice to its box, resized to [N, image_size, image_size] HU."""
  hu = _as_stack(hu)
  count = tf.shape(hu)[0]
  fine = tf.image.crop_and_resize(
      hu[..., tf.newaxis], boxes, tf.range(count), [image_size * SUPERSAMPLE, image_size * SUPERSAMPLE],
      method="bilinear", extrapolation_value=AIR_HU)
  return tf.nn.avg_pool2d(fine, ksize=SUPERSAMPLE, strides=SUPERSAMPLE, padding="VALID")[..., 0]


def window_hu(hu: tf.Tensor, windows: tuple[tuple[float, float], ...]) -> tf.Tensor:
  """Maps HU [N, H, W] to uint8 [N, H, W, 3] through one (repeated) or three windows."""
  hu = tf.convert_to_tensor(hu, dtype=tf.float32)
  channels = []
  for center_hu, width_hu in windows:
    low = center_hu - width_hu / 2.0
    scaled = tf.clip_by_value((hu - low) / width_hu, 0.0, 1.0) * 255.0
    channels.append(tf.cast(tf.round(scaled), tf.uint8))
  if len(channels) == 1:
    channels = channels * 3
  return tf.stack(channels, axis=-1)


def preprocess_slices(hu: tf.Tensor, config: PreprocessConfig) -> tf.Tensor:
  """Raw HU slices [N, H, W] (any H, W) to model images uint8 [N, S, S, 3]: crop, resize, window."""
  hu = _as_stack(hu)
  return window_hu(crop_resize_hu(hu, body_boxes(hu, config), config.image_size), config.windows)


# ------------------------------------------------------------------------------------------- 2.5D input


def model_channels(context_slices: int) -> int:
  """Channels of the model input: 3 (one window repeated, or three windows) without context, else 2N+1."""
  if context_slices < 0:
    raise ValueError(f"context_slices must be at least 0, got {context_slices}")
  return 3 if context_slices == 0 else 2 * context_slices + 1


def context_indices(num_slices: tf.Tensor | int, context_slices: int) -> tf.Tensor:
  """int32 [N, 2C+1]: row i lists slices i-C..i+C of an N-slice stack, clipped to [0, N-1] (edges replicate)."""
  offsets = tf.range(-context_slices, context_slices + 1, dtype=tf.int32)
  rows = tf.range(tf.cast(num_slices, tf.int32), dtype=tf.int32)[:, tf.newaxis] + offsets[tf.newaxis]
  return tf.clip_by_value(rows, 0, tf.maximum(tf.cast(num_slices, tf.int32) - 1, 0))


def context_stack(images: tf.Tensor, context_slices: int) -> tf.Tensor:
  """THE 2.5D stack builder (training, validation, serving and predict all call it).

  Args:
    images: ONE patient's one-window slices in slice order, [N, S, S] or [N, S, S, K] (channel 0 is used: a
      one-window image is stored or windowed as the same value in every channel).
    context_slices: C; 0 returns `images` unchanged.

  Returns:
    [N, S, S, 2C+1] (same dtype): channel j of slice i is slice clip(i - C + j, 0, N - 1), so the centre channel
    is slice i itself and slices past either end replicate the nearest slice.
  """
  if context_slices == 0:
    return images
  images = tf.convert_to_tensor(images)
  if images.shape.rank == 4:
    images = images[..., 0]
  gathered = tf.gather(images, context_indices(tf.shape(images)[0], context_slices))  # [N, 2C+1, S, S]
  return tf.transpose(gathered, [0, 2, 3, 1])


def preprocess_patient(hu: tf.Tensor, config: PreprocessConfig, context_slices: int = 0) -> tf.Tensor:
  """One patient's raw HU slices [N, H, W], in slice order, to model input uint8 [N, S, S, model_channels(C)].

  context_slices 0 is `preprocess_slices`; otherwise each slice's one-window image is stacked with its
  neighbours by `context_stack`. A pure transform: `config` and `context_slices` were checked together
  (`check_context_windows`) where they met, the serving module (signatures.PdxServingModule), whose export
  predict reads.
  """
  return context_stack(preprocess_slices(hu, config), context_slices)
