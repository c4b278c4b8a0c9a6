"""Grad-CAM heatmaps for the slice classifier, overlay rendering, and a localisation score.

Grad-CAM (Selvaraju et al., 2017) weights the channels of a late convolutional activation of the nested
backbone (by default `pdx_tf.training.model.gradcam_layer(image size)`: `out_relu` at 224 px, a finer layer at small
sizes, where `out_relu` is only 2x2) by the spatial mean of the gradient of the class score, sums them,
keeps the positive part and upsamples to the image. The class score here is the output layer's *logit*: the
gradient of the sigmoid vanishes for confident slices, which are exactly the ones a clinician looks at.

The backbone is a nested Keras model, and some Keras versions put dots in nested layer names, so the target is
never looked up by a path string: a sub-model from the backbone's input to [target, backbone output] is
built, the layers before the backbone (rescaling) and after it (pooling, dropout, output) are applied by hand.
That only assumes the outer model is a chain, which `pdx_tf.training.model.build_model` guarantees and this module
checks.
"""

from __future__ import annotations

from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from pdx_tf.data import preprocess
from pdx_tf.training import model as model_lib

# Overlay rendering: heat below this share of the slice's maximum is left transparent.
OVERLAY_FLOOR = 0.2
OVERLAY_OPACITY = 0.45


def _default_layer(backbone: keras.Model) -> str:
  """The deepest of model_lib.GRADCAM_LAYERS in `backbone` with a map of at least MIN_GRADCAM_MAP px a side
  (for the real MobileNetV2 this is `model_lib.gradcam_layer(image size)`), else the finest one present."""
  present = []
  for name, _ in model_lib.GRADCAM_LAYERS:
    try:
      present.append((name, backbone.get_layer(name).output.shape[1]))
    except ValueError:
      continue
  if not present:
    raise ValueError(f"backbone {backbone.name} has none of the Grad-CAM layers {model_lib.GRADCAM_LAYERS}")
  for name, side in present:
    if side is not None and side >= model_lib.MIN_GRADCAM_MAP:
      return name
  return present[-1][0]


class _GradCamParts:
  """The outer model cut at the backbone: layers before, a feature sub-model, layers after, the output."""

  def __init__(self, model: keras.Model, backbone_name: str, layer_name: str | None):
    try:
      backbone = model.get_layer(backbone_name)
      target = backbone.get_layer(layer_name or _default_layer(backbone))
    except ValueError:
      raise ValueError(f"model {model.name} has no nested layer {backbone_name}/"
                       f"{layer_name or model_lib.LAST_CONV_LAYER}; Grad-CAM needs a model built by "
                       "pdx_tf.training.model.build_model") from None
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    for layer in layers:
      if len(getattr(layer, "_inbound_nodes", ())) > 1:
        raise ValueError(f"layer {layer.name} is used more than once; Grad-CAM expects a chain model")
    position = layers.index(backbone)
    self.before = layers[:position]
    after = layers[position + 1:]
    if not after or not isinstance(after[-1], keras.layers.Dense) or after[-1].units != 1:
      raise ValueError("Grad-CAM expects the model to end in a Dense(1) output layer")
    self.after = after[:-1]
    self.output_layer = after[-1]
    self.features = keras.Model(backbone.input, [target.output, backbone.output])

  def activations_and_logits(self, images: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """(target activations [N, h, w, C], output logits [N]) in inference mode."""
    hidden = images
    for layer in self.before:
      hidden = layer(hidden, training=False)
    activations, hidden = self.features(hidden, training=False)
    for layer in self.after:
      hidden = layer(hidden, training=False)
    # The pre-activation of the output layer: the logit whose gradient does not saturate.
    logits = tf.matmul(tf.cast(hidden, tf.float32), tf.cast(self.output_layer.kernel, tf.float32))
    if self.output_layer.use_bias:
      logits = logits + tf.cast(self.output_layer.bias, tf.float32)
    return activations, tf.reshape(logits, [-1])


def grad_cam(model: keras.Model, images: np.ndarray | tf.Tensor, *,
             backbone_name: str = model_lib.BACKBONE_NAME, layer_name: str | None = None,
             batch_size: int = 16) -> np.ndarray:
  """Grad-CAM heatmaps of a slice classifier.

  Args:
    model: a classifier from `pdx_tf.training.model.build_model` (or any chain model with a nested backbone holding
      `layer_name` and a Dense(1) output).
    images: model inputs [N, S, S, 3], uint8 or float in 0..255 (what `preprocess_slices` returns).
    backbone_name: the nested backbone's layer name.
    layer_name: the backbone layer whose activations are explained; None: the deepest of
      `model_lib.GRADCAM_LAYERS` with a map of at least 7x7 (`model_lib.gradcam_layer` of the image size).
    batch_size: slices per gradient computation (bounds memory).

  Returns:
    float32 [N, S, S] in [0, 1]; each slice is divided by its own maximum (all zeros when no location
    raises the score).
  """
  images = np.asarray(images)
  if images.ndim != 4:  # [N, S, S, 3], or [N, S, S, 2C+1] 2.5D stacks
    raise ValueError(f"images must be [N, S, S, channels], got shape {images.shape}")
  height, width = images.shape[1], images.shape[2]
  parts = _GradCamParts(model, backbone_name, layer_name)
  heatmaps = []
  for start in range(0, images.shape[0], batch_size):
    batch = tf.convert_to_tensor(images[start:start + batch_size], dtype=tf.float32)
    with tf.GradientTape() as tape:
      # Watch the input so the whole chain is recorded even when the backbone's weights are frozen.
      tape.watch(batch)
      activations, logits = parts.activations_and_logits(batch)
      # Each slice's logit depends only on its own activations (inference mode), so the gradient of the sum
      # gives every slice its own gradient in one pass.
      score = tf.reduce_sum(logits)
    gradients = tape.gradient(score, activations)
    activations = tf.cast(activations, tf.float32)
    weights = tf.reduce_mean(tf.cast(gradients, tf.float32), axis=[1, 2], keepdims=True)
    cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))
    cam = tf.image.resize(cam[..., tf.newaxis], [height, width], method="bilinear")[..., 0]
    peak = tf.reduce_max(cam, axis=[1, 2], keepdims=True)
    heatmaps.append(tf.math.divide_no_nan(cam, peak).numpy())
  if not heatmaps:
    return np.zeros((0, height, width), np.float32)
  return np.clip(np.concatenate(heatmaps), 0.0, 1.0).astype(np.float32)


def ensemble_grad_cam(models: Sequence[keras.Model], images: np.ndarray | tf.Tensor, *,
                      layer_name: str | None = None) -> np.ndarray:
  """The mean of the models' Grad-CAM heatmaps, rescaled so each slice's maximum is 1 (float32 [N, S, S])."""
  if not models:
    raise ValueError("ensemble_grad_cam needs at least one model")
  total = sum(grad_cam(model, images, layer_name=layer_name) for model in models)
  peak = total.max(axis=(1, 2), keepdims=True)
  return np.divide(total, peak, out=np.zeros_like(total), where=peak > 0).astype(np.float32)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, floor: float = OVERLAY_FLOOR,
            opacity: float = OVERLAY_OPACITY) -> np.ndarray:
  """Blends a heatmap [S, S] in [0, 1] onto a model image [S, S, 3] uint8 (jet colours); uint8 [S, S, 3]."""
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel

  image = np.asarray(image, np.float32)
  heatmap = np.clip(np.asarray(heatmap, np.float32), 0.0, 1.0)
  colours = colormaps["jet"](heatmap)[..., :3] * 255.0
  # Low heat stays transparent so the anatomy under it remains readable.
  alpha = np.where(heatmap >= floor, opacity * heatmap, 0.0)[..., np.newaxis]
  return np.clip(np.round((1.0 - alpha) * image + alpha * colours), 0, 255).astype(np.uint8)


def save_overlay_png(path: str, image: np.ndarray, heatmap: np.ndarray, title: str = "") -> None:
  """Writes the slice and its Grad-CAM overlay side by side as a PNG (atomically, through gfile)."""
  import io  # pylint: disable=import-outside-toplevel

  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  from pdx_tf import io_utils  # pylint: disable=import-outside-toplevel

  figure, axes = pyplot.subplots(1, 2, figsize=(6.4, 3.4), dpi=100)
  axes[0].imshow(np.asarray(image, np.uint8))
  axes[0].set_title("model input")
  axes[1].imshow(overlay(image, heatmap))
  axes[1].set_title("Grad-CAM")
  for axis in axes:
    axis.axis("off")
  if title:
    figure.suptitle(title, fontsize=9)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", bbox_inches="tight")
  pyplot.close(figure)
  io_utils.atomic_write_bytes(path, buffer.getvalue())


def map_masks_to_model_grid(hu: np.ndarray | tf.Tensor, masks: np.ndarray | tf.Tensor,
                            config: preprocess.PreprocessConfig) -> np.ndarray:
  """Maps per-slice masks [N, H, W] through the same body crop and resize as the slices; float [N, S, S].

  `crop_resize_hu` reads outside the image as air (-1000 HU) and is linear, so the mask is shifted by the air
  value, resized, and shifted back: outside the image then reads as 0, and the result is each model pixel's
  covered fraction in [0, 1].
  """
  hu = tf.convert_to_tensor(hu, tf.float32)
  boxes = preprocess.body_boxes(hu, config)
  shifted = tf.convert_to_tensor(masks, tf.float32) + preprocess.AIR_HU
  fractions = preprocess.crop_resize_hu(shifted, boxes, config.image_size) - preprocess.AIR_HU
  return np.clip(fractions.numpy(), 0.0, 1.0)


def localisation_ratio(heatmaps: np.ndarray, lesion_fractions: np.ndarray, body: np.ndarray) -> float:
  """How much more Grad-CAM mass falls on lesions than their share of the body would give by chance.

  Pooled over the slices that contain lesion pixels: (heat on lesions / heat on the body) divided by
  (lesion area / body area). 1 is chance; larger is better localisation.

  Args:
    heatmaps: float [N, S, S] Grad-CAM heatmaps.
    lesion_fractions: float [N, S, S] lesion coverage per pixel (from `map_masks_to_model_grid`).
    body: bool or float [N, S, S] body pixels on the same grid.

  Raises:
    ValueError: if no slice has lesion pixels or heat on the body.
  """
  heatmaps = np.asarray(heatmaps, np.float64)
  lesion = np.asarray(lesion_fractions, np.float64)
  body = np.asarray(body, np.float64)
  lesion = lesion * body
  has_lesion = lesion.sum(axis=(1, 2)) > 0
  if not has_lesion.any():
    raise ValueError("no slice has lesion pixels inside the body; nothing to localise")
  heat_on_body = (heatmaps * body)[has_lesion]
  if heat_on_body.sum() <= 0:
    raise ValueError("the heatmaps put no mass on the body of the lesion slices")
  mass_share = (heatmaps * lesion)[has_lesion].sum() / heat_on_body.sum()
  area_share = lesion[has_lesion].sum() / body[has_lesion].sum()
  return float(mass_share / area_share)


def localisation_arrays(models: Sequence[keras.Model], hu: np.ndarray, lesion_masks: np.ndarray,
                        config: preprocess.PreprocessConfig, batch_size: int = 32, *,
                        layer_name: str | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Grad-CAM, lesion coverage and body on the model grid, for the slices of `hu` that contain lesions.

  Args:
    models: the classifiers (their Grad-CAM is averaged, as in `predict`).
    hu: float [N, H, W] slices in HU.
    lesion_masks: bool [N, H, W] lesion pixels (e.g. the phantom's nodule_mask), aligned with `hu`.
    config: the models' preprocessing.
    batch_size: slices per step.
    layer_name: the backbone layer explained (None: as in `grad_cam`; earlier layers give finer maps).

  Returns:
    (heatmaps, lesion_fractions, body), each [K, S, S] for the K slices with lesion pixels, ready for
    `localisation_ratio`.
  """
  hu = np.asarray(hu, np.float32)
  lesion_masks = np.asarray(lesion_masks, bool)
  keep = np.flatnonzero(lesion_masks.reshape(lesion_masks.shape[0], -1).any(axis=1))
  size = config.image_size
  parts = ([], [], [])
  for start in range(0, keep.size, batch_size):
    chosen = keep[start:start + batch_size]
    images = preprocess.preprocess_slices(hu[chosen], config).numpy()
    parts[0].append(ensemble_grad_cam(models, images, layer_name=layer_name))
    parts[1].append(map_masks_to_model_grid(hu[chosen], lesion_masks[chosen], config))
    resized = preprocess.crop_resize_hu(hu[chosen], preprocess.body_boxes(hu[chosen], config), size).numpy()
    parts[2].append(resized > config.body_threshold_hu)
  if not keep.size:
    empty = np.zeros((0, size, size), np.float32)
    return empty, empty, empty.astype(bool)
  return tuple(np.concatenate(part) for part in parts)  # type: ignore[return-value]
