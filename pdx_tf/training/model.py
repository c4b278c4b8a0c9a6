"""The slice classifier: keras.applications MobileNetV2 with one sigmoid output.

The model takes uint8-valued images (as float32 0..255, [S, S, 3]) and scales them to [-1, 1] itself, so
training, Keras inference and the exported serving graph feed it the same pixels. The output layer is kept
in float32 so mixed precision stays stable and TF Serving's JSON gets plain floats.
"""

from __future__ import annotations

import dataclasses
import os

import keras

from pdx_tf.errors import PdxError

BACKBONE_NAME = "mobilenetv2"
# The nested backbone's last activation: Grad-CAM's usual target layer (a 7x7 map at 224 px).
LAST_CONV_LAYER = "out_relu"
# Grad-CAM candidates, deepest first, with how much each downsamples the image. A map much coarser than 7x7
# cannot say where in the abdomen the model looked (out_relu is 2x2 at 64 px), so `gradcam_layer` takes the
# deepest one whose map is at least MIN_GRADCAM_MAP on a side.
GRADCAM_LAYERS: tuple[tuple[str, int], ...] = (
    ("out_relu", 32), ("block_13_expand_relu", 16), ("block_6_expand_relu", 8), ("block_3_expand_relu", 4))
MIN_GRADCAM_MAP = 7
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
IMAGENET_SIZES = (96, 128, 160, 192, 224)
# Keras' BatchNorm default: right for fine-tuning pretrained statistics, far too slow from scratch.
KERAS_DEFAULT_BN_MOMENTUM = 0.999
FROM_SCRATCH_BN_MOMENTUM = 0.9


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """MobileNetV2 settings.

  Attributes:
    image_size: input side in pixels.
    alpha: width multiplier (paper: 1.0).
    weights: "none", "imagenet" (from the Keras cache, never downloaded) or a path to a no-top `.h5`.
    dropout_rate: dropout before the output layer.
    bn_momentum: BatchNorm moving-average momentum; None picks 0.9 from scratch and Keras' default when
      pretrained (a from-scratch net with 0.999 keeps near-initial inference statistics on a small cohort and
      predicts one constant for every slice).
  """

  image_size: int = 224
  alpha: float = 1.0
  weights: str = "none"
  dropout_rate: float = 0.2
  bn_momentum: float | None = None

  def __post_init__(self):
    if self.image_size < 32:
      raise ValueError(f"MobileNetV2 needs images of at least 32 px, got {self.image_size}")
    if self.alpha <= 0:
      raise ValueError(f"alpha must be positive, got {self.alpha}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.bn_momentum is not None and not 0.0 < self.bn_momentum < 1.0:
      raise ValueError(f"bn_momentum must be in (0, 1), got {self.bn_momentum}")

  @property
  def resolved_bn_momentum(self) -> float:
    if self.bn_momentum is not None:
      return self.bn_momentum
    return FROM_SCRATCH_BN_MOMENTUM if self.weights == "none" else KERAS_DEFAULT_BN_MOMENTUM


def imagenet_weights_path(alpha: float, image_size: int) -> str:
  """Where Keras caches the no-top ImageNet weights for this alpha and size."""
  rows = image_size if image_size in IMAGENET_SIZES else 224
  name = f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
  cache = os.environ.get("KERAS_HOME", os.path.join(os.path.expanduser("~"), ".keras"))
  return os.path.join(cache, "models", name)


def resolve_weights(config: ModelConfig) -> str | None:
  """The weights file to load, or None for random initialisation. Never downloads.

  Raises:
    PdxError: if the ImageNet file is not in the Keras cache or the given path does not exist, saying where
      to put it (hospital machines are often offline, so a silent download attempt would just hang).
  """
  if config.weights == "none":
    return None
  if config.weights == "imagenet":
    if config.alpha not in IMAGENET_ALPHAS:
      raise PdxError(f"ImageNet weights exist only for alpha in {IMAGENET_ALPHAS}, got {config.alpha}")
    path = imagenet_weights_path(config.alpha, config.image_size)
    if not os.path.exists(path):
      raise PdxError(
          f"ImageNet weights not found at {path}; copy {os.path.basename(path)} there (from a machine with"
          " internet: keras.applications.MobileNetV2(include_top=False, weights='imagenet')), pass"
          " --weights=/path/to/file.h5, or use --weights=none")
    return path
  if not os.path.exists(config.weights):
    raise PdxError(f"weights file {config.weights} does not exist; pass a MobileNetV2 no-top .h5, imagenet or none")
  return config.weights


def gradcam_layer(image_size: int) -> str:
  """The backbone layer Grad-CAM explains at this input size: the deepest with a map >= MIN_GRADCAM_MAP px.

  out_relu at 224 px (as usual), block_13_expand_relu at 128 px, block_6_expand_relu at 64 px,
  block_3_expand_relu at 48 px.
  """
  for name, stride in GRADCAM_LAYERS:
    if -(-image_size // stride) >= MIN_GRADCAM_MAP:
      return name
  return GRADCAM_LAYERS[-1][0]


def build_model(config: ModelConfig) -> keras.Model:
  """Builds the classifier: Rescaling -> MobileNetV2 (no top, average pooling) -> Dropout -> Dense(1, sigmoid).

  The backbone is a nested model named `mobilenetv2`; Grad-CAM explains its layer `gradcam_layer(size)`. The
  global mixed-precision policy in force when this is called applies to every layer but the output.
  """
  weights = resolve_weights(config)
  inputs = keras.Input((config.image_size, config.image_size, 3), dtype="float32", name="image")
  scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
  backbone = keras.applications.MobileNetV2(
      input_shape=(config.image_size, config.image_size, 3), alpha=config.alpha, include_top=False,
      weights=weights, pooling=None, name=BACKBONE_NAME)
  momentum = config.resolved_bn_momentum
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.momentum = momentum  # Read at call time, so this takes effect for training.
  features = backbone(scaled)
  pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
  dropped = keras.layers.Dropout(config.dropout_rate, name="dropout")(pooled)
  outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(dropped)
  return keras.Model(inputs, outputs, name="pdx_mobilenetv2")
