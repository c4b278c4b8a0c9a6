"""The classifiers: keras.applications MobileNetV2 with one sigmoid output, per slice or per patient.

The model takes uint8-valued images (as float32 0..255, [S, S, C]) and scales them to [-1, 1] itself, so
training, Keras inference and the exported serving graph feed it the same pixels. C is 3 (the paper: one window
repeated, or three windows) or 2N+1 adjacent slices of one window (`--context_slices=N`, 2.5D). The output layer
is kept in float32 so mixed precision stays stable and TF Serving's JSON gets plain floats.

Heads:
- "slice" (the paper): Rescaling -> MobileNetV2 -> average pooling -> Dropout -> Dense(1, sigmoid), per slice;
  a fixed rule (pdx_tf.training.aggregation) makes the patient score.
- "attention_mil": the same per-slice layers inside `TimeDistributed` over a patient's bag of slices
  [B, K, S, S, C] with a mask [B, K] (bags are padded to K), gated attention pooling (Ilse et al. 2018,
  `GatedAttentionPooling`) of the slice features, then the same Dropout -> Dense(1, sigmoid) on the pooled
  feature: one patient probability, trained on the patient label. The backbone's BatchNorm layers run in
  inference mode (frozen statistics): padded slices must not enter batch statistics, and one patient's slices
  are not an i.i.d. batch. Start it from a trained slice model (`copy_slice_weights`), not from scratch.

Joint heads (`joint_heads`, the grid's `--task=p,sb`): the slice model with one Dense(1, sigmoid) per task on the
same pooled feature (`probability_p`, `probability_sb`), concatenated into the training output `probabilities`
[B, 2] (column order `JOINT_OUTPUTS`). One backbone learns both tasks, and `JointLoss` uses that small-bowel
dissemination is peritoneal dissemination: besides each task's cross-entropy it penalises P(sb) > P(p).
`task_view(model, task)` is the plain slice classifier of one task, the form export, serving and Grad-CAM take.
"""

from __future__ import annotations

import dataclasses
import os

import keras
from keras import ops

from pdx_tf.errors import PdxError
from pdx_tf.training import heads

BACKBONE_NAME = "mobilenetv2"
# The nested backbone's last activation: Grad-CAM's usual target layer (a 7x7 map at 224 px).
LAST_CONV_LAYER = "out_relu"
# Grad-CAM candidates, deepest first, with how much each downsamples the image. A map much coarser than 7x7
# cannot say where in the abdomen the model looked (out_relu is 2x2 at 64 px), so `gradcam_layer` takes the
# deepest one whose map is at least MIN_GRADCAM_MAP on a side.
GRADCAM_LAYERS: tuple[tuple[str, int], ...] = (
    ("out_relu", 32), ("block_13_expand_relu", 16), ("block_6_expand_relu", 8), ("block_3_expand_relu", 4))
MIN_GRADCAM_MAP = 7
JOINT_OUTPUTS = ("p", "sb")  # the columns of a joint model's `probabilities` output
JOINT_OUTPUT_NAME = "probabilities"
REGION_OUTPUT_NAME = "region_probabilities"  # the regions head's output [B, NUM_PCI_REGIONS]
SLICE_FEATURES_NAME = "slice_features"
ATTENTION_LAYER = "attention"
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
    input_channels: 3, or 2N+1 for 2.5D input (`preprocess.model_channels`); ImageNet weights need 3.
    head: a name in `heads.HEADS` (module docstring; pdx_tf/training/heads.py says what each provides).
    attention_units: hidden units of the gated attention (Ilse et al. use 128).
    joint_heads: one output per task, p and sb, on one backbone (module docstring); the slice head only.
  """

  image_size: int = 224
  alpha: float = 1.0
  weights: str = "none"
  dropout_rate: float = 0.2
  bn_momentum: float | None = None
  input_channels: int = 3
  head: str = heads.DEFAULT_HEAD
  attention_units: int = 128
  joint_heads: bool = False

  def __post_init__(self):
    if self.image_size < 32:
      raise ValueError(f"MobileNetV2 needs images of at least 32 px, got {self.image_size}")
    if self.alpha <= 0:
      raise ValueError(f"alpha must be positive, got {self.alpha}")
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
    if self.bn_momentum is not None and not 0.0 < self.bn_momentum < 1.0:
      raise ValueError(f"bn_momentum must be in (0, 1), got {self.bn_momentum}")
    if self.input_channels < 1:
      raise ValueError(f"input_channels must be at least 1, got {self.input_channels}")
    if self.input_channels != 3 and self.weights != "none":
      raise ValueError(f"pretrained weights ({self.weights}) take 3 channels, the 2.5D input has"
                       f" {self.input_channels}; use --context_slices=1 (3 channels) or --weights=none")
    head = heads.get(self.head)  # ValueError naming the heads
    if self.attention_units < 1:
      raise ValueError(f"attention_units must be at least 1, got {self.attention_units}")
    if self.joint_heads and not head.joint_capable:
      raise ValueError(f"joint heads (--task={JOINT_OUTPUTS[0]},{JOINT_OUTPUTS[1]}) work with the slice head only,"
                       f" not --head={self.head}; train the two tasks as separate grids")

  @classmethod
  def from_run(cls, run_config: dict, **overrides) -> "ModelConfig":
    """The ModelConfig a run trained with, from run.json's "config" dict (its "model" entry, written by
    `train_config.config_dict`), with `overrides` applied: the one place a stored model config is parsed back.
    Unknown or missing names raise ValueError (configs.from_dict)."""
    from pdx_tf import configs  # pylint: disable=import-outside-toplevel
    return configs.from_dict(cls, {**run_config.get("model", {}), **overrides})

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


def _backbone(config: ModelConfig) -> keras.Model:
  backbone = keras.applications.MobileNetV2(
      input_shape=(config.image_size, config.image_size, config.input_channels), alpha=config.alpha,
      include_top=False, weights=resolve_weights(config), pooling=None, name=BACKBONE_NAME)
  momentum = config.resolved_bn_momentum
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.momentum = momentum  # Read at call time, so this takes effect for training.
  return backbone


def build_model(config: ModelConfig) -> keras.Model:
  """Builds the classifier of `config.head`: the function its `heads.Head.builder` names (module docstring). The
  global mixed-precision policy in force when this is called applies to every layer but the output."""
  return globals()[heads.get(config.head).builder](config)


def build_slice_model(config: ModelConfig) -> keras.Model:
  """The slice classifier ("slice" head, module docstring).

  Rescaling -> MobileNetV2 (no top) -> GlobalAveragePooling -> Dropout -> Dense(1, sigmoid); input
  `image` [B, S, S, C], output [B, 1]. The backbone is a nested model named `mobilenetv2`; Grad-CAM explains its
  layer `gradcam_layer(size)`.
  """
  size, channels = config.image_size, config.input_channels
  inputs = keras.Input((size, size, channels), dtype="float32", name="image")
  scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
  features = _backbone(config)(scaled)
  pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
  dropped = keras.layers.Dropout(config.dropout_rate, name="dropout")(pooled)
  if config.joint_heads:
    heads = [keras.layers.Dense(1, activation="sigmoid", dtype="float32", name=f"probability_{task}")(dropped)
             for task in JOINT_OUTPUTS]
    outputs = keras.layers.Concatenate(axis=-1, dtype="float32", name=JOINT_OUTPUT_NAME)(heads)
    return keras.Model(inputs, outputs, name="pdx_mobilenetv2_joint")
  outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(dropped)
  return keras.Model(inputs, outputs, name="pdx_mobilenetv2")


def build_region_model(config: ModelConfig) -> keras.Model:
  """The regions head: the slice model with one sigmoid a PCI region, Dense(NUM_PCI_REGIONS) named
  `region_probabilities` on the same pooled feature; input `image` [B, S, S, C], output [B, 13] (column r =
  region r). Each column is a slice's score for "this patient has disease in region r"; a patient's region
  probability is the grid's aggregation over that column (pdx_tf/training/regions.py says why)."""
  size, channels = config.image_size, config.input_channels
  inputs = keras.Input((size, size, channels), dtype="float32", name="image")
  scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
  pooled = keras.layers.GlobalAveragePooling2D(name="pool")(_backbone(config)(scaled))
  dropped = keras.layers.Dropout(config.dropout_rate, name="dropout")(pooled)
  outputs = keras.layers.Dense(heads.REGIONS.num_outputs, activation="sigmoid", dtype="float32",
                               name=REGION_OUTPUT_NAME)(dropped)
  return keras.Model(inputs, outputs, name="pdx_mobilenetv2_regions")


def is_region_model(model: keras.Model) -> bool:
  return any(layer.name == REGION_OUTPUT_NAME for layer in model.layers)


def is_joint_model(model: keras.Model) -> bool:
  return any(layer.name == JOINT_OUTPUT_NAME for layer in model.layers)


def task_view(model: keras.Model, task: str) -> keras.Model:
  """One task's slice classifier (image -> [B, 1]) sharing a joint model's layers: the chain Rescaling ->
  backbone -> pool -> Dropout -> `probability_<task>`, which export, serving and Grad-CAM take like any slice
  model. A model without joint heads is returned as it is."""
  if not is_joint_model(model):
    return model
  if task not in JOINT_OUTPUTS:
    raise ValueError(f"a joint model has heads {', '.join(JOINT_OUTPUTS)}, not {task!r}")
  return keras.Model(model.input, model.get_layer(f"probability_{task}").output, name=f"pdx_mobilenetv2_{task}")


@keras.saving.register_keras_serializable(package="pdx_tf")
class JointLoss(keras.losses.Loss):
  """The joint model's loss on labels [B, 2] (p, sb) and probabilities [B, 2].

  loss = mean over the two tasks of the binary cross-entropy + consistency_weight x mean_B(max(0, P(sb) - P(p))^2).
  The consistency term is zero for every prediction that respects "small-bowel dissemination implies peritoneal
  dissemination", so it only moves predictions that contradict it; it needs no label, so it also teaches the sb
  head from the p head's view of a slice and back.
  """

  def __init__(self, consistency_weight: float = 1.0, name: str = "joint_loss", **kwargs):
    super().__init__(name=name, **kwargs)
    self.consistency_weight = float(consistency_weight)

  def call(self, y_true, y_pred):
    y_true = ops.cast(y_true, "float32")
    y_pred = ops.cast(y_pred, "float32")
    cross_entropy = ops.mean(keras.losses.binary_crossentropy(y_true[..., :, None], y_pred[..., :, None]), axis=-1)
    violation = ops.relu(y_pred[..., 1] - y_pred[..., 0])
    return cross_entropy + self.consistency_weight * ops.square(violation)

  def get_config(self):
    return {**super().get_config(), "consistency_weight": self.consistency_weight}


@keras.saving.register_keras_serializable(package="pdx_tf")
class GatedAttentionPooling(keras.layers.Layer):
  """Gated attention pooling over a bag (Ilse, Tomczak and Welling 2018, eq. 9) with a padding mask.

  a_k = softmax_k(w^T (tanh(V h_k) * sigmoid(U h_k))) over the real slices (mask 1); padded slices (mask 0) get
  weight exactly 0, so they change neither the weights of the others nor the pooled feature sum_k a_k h_k.
  Called on [features [B, K, F], mask [B, K]]; returns [pooled [B, F], weights float32 [B, K]].
  """

  def __init__(self, units: int = 128, **kwargs):
    super().__init__(**kwargs)
    self.units = units
    self.attention_v = keras.layers.Dense(units, activation="tanh", name="attention_v")
    self.attention_u = keras.layers.Dense(units, activation="sigmoid", name="attention_u")
    self.attention_w = keras.layers.Dense(1, name="attention_w")

  def build(self, input_shape):
    feature_shape = input_shape[0]
    self.attention_v.build(feature_shape)
    self.attention_u.build(feature_shape)
    self.attention_w.build(tuple(feature_shape[:-1]) + (self.units,))

  def call(self, inputs):
    features, mask = inputs
    scores = self.attention_w(self.attention_v(features) * self.attention_u(features))[..., 0]
    scores = ops.cast(scores, "float32")
    real = ops.cast(mask, "float32") > 0.5
    # Masked softmax: padded scores to a large negative number, then their weights to exactly 0.
    scores = ops.where(real, scores, ops.full_like(scores, -1e9))
    weights = ops.softmax(scores - ops.max(scores, axis=1, keepdims=True), axis=1)
    weights = ops.where(real, weights, ops.zeros_like(weights))
    weights = weights / ops.maximum(ops.sum(weights, axis=1, keepdims=True), 1e-12)
    pooled = ops.sum(ops.cast(weights[..., None], features.dtype) * features, axis=1)
    return pooled, weights

  def compute_output_shape(self, input_shape):
    feature_shape = input_shape[0]
    return (feature_shape[0], feature_shape[-1]), tuple(feature_shape[:-1])

  def get_config(self):
    return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="pdx_tf")
class PerSlice(keras.layers.TimeDistributed):
  """TimeDistributed over a bag of a free number of slices: [B, K, ...] -> one call on [B * K, ...] -> [B, K, F].

  Keras' TimeDistributed takes the number of steps from the static shape and mixes it up when K is unknown at
  trace time (bags of different sizes); this reshapes with the dynamic shape.
  """

  def call(self, inputs, training=None, mask=None):
    del mask
    shape = ops.shape(inputs)
    flat = ops.reshape(inputs, (-1,) + tuple(inputs.shape[2:]))
    outputs = self.layer(flat, training=training)
    return ops.reshape(outputs, (shape[0], shape[1]) + tuple(outputs.shape[1:]))


def build_mil_model(config: ModelConfig) -> keras.Model:
  """The attention-MIL classifier: inputs `bag` [B, K, S, S, C] (K free) and `mask` [B, K] (1 real, 0 padding),
  output probability [B, 1]. The per-slice layers form the nested model `slice_features` (Rescaling ->
  MobileNetV2 -> pooling); the attention layer is named `attention` (`mil_outputs` exposes its weights)."""
  size, channels = config.image_size, config.input_channels
  image = keras.Input((size, size, channels), dtype="float32", name="image")
  scaled = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(image)
  backbone = _backbone(config)
  for layer in backbone.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.trainable = False  # inference-mode BatchNorm (module docstring); convolutions stay trainable
  pooled_slice = keras.layers.GlobalAveragePooling2D(name="pool")(backbone(scaled))
  slice_features = keras.Model(image, pooled_slice, name=SLICE_FEATURES_NAME)
  bag = keras.Input((None, size, size, channels), dtype="float32", name="bag")
  mask = keras.Input((None,), dtype="float32", name="mask")
  features = PerSlice(slice_features, name="per_slice")(bag)
  dropped = keras.layers.Dropout(config.dropout_rate, name="dropout")(features)
  pooled, _ = GatedAttentionPooling(config.attention_units, name=ATTENTION_LAYER)([dropped, mask])
  outputs = keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="probability")(pooled)
  return keras.Model([bag, mask], outputs, name="pdx_mobilenetv2_mil")


def is_mil_model(model: keras.Model) -> bool:
  return any(layer.name == ATTENTION_LAYER for layer in model.layers)


def mil_outputs(model: keras.Model, bag, mask) -> dict:
  """An attention-MIL model's `probability` [B], `attention` [B, K] and per-slice `slice_probability` [B, K]
  (the output Dense applied to each slice's own feature: the instance score, for the slice curve and Grad-CAM)
  in inference mode."""
  features = model.get_layer("per_slice")(bag, training=False)
  pooled, weights = model.get_layer(ATTENTION_LAYER)([features, mask], training=False)
  dense = model.get_layer("probability")
  return {"probability": ops.reshape(ops.cast(dense(pooled), "float32"), (-1,)),
          "attention": ops.cast(weights, "float32"),
          "slice_probability": ops.cast(dense(features)[..., 0], "float32")}


def mil_slice_model(model: keras.Model) -> keras.Model:
  """A slice classifier (image [B, S, S, C] -> [B, 1]) sharing an attention-MIL model's layers: the instance
  score of `mil_outputs`, in the chain form Grad-CAM explains."""
  slice_features = model.get_layer("per_slice").layer
  image = keras.Input(slice_features.inputs[0].shape[1:], dtype="float32", name="image")
  outputs = image
  for name in ("to_unit_range", BACKBONE_NAME, "pool"):
    outputs = slice_features.get_layer(name)(outputs)
  outputs = model.get_layer("dropout")(outputs)
  outputs = model.get_layer("probability")(outputs)
  return keras.Model(image, outputs, name="pdx_mil_instance")


def copy_slice_weights(slice_model: keras.Model, mil_model: keras.Model) -> None:
  """Starts an attention-MIL model from a trained slice model: its backbone, and its output Dense as the MIL
  output layer (the pooled feature lives in the same space as a slice's feature).

  Raises:
    ValueError: if the two models' backbones differ (size, alpha, channels).
  """
  source = slice_model.get_layer(BACKBONE_NAME)
  target = mil_model.get_layer("per_slice").layer.get_layer(BACKBONE_NAME)
  if [tuple(w.shape) for w in source.weights] != [tuple(w.shape) for w in target.weights]:
    raise ValueError("the slice model's backbone differs from the MIL model's (image size, alpha or"
                     " --context_slices); use --mil_init_from with a grid trained on the same settings")
  target.set_weights(source.get_weights())
  mil_model.get_layer("probability").set_weights(slice_model.get_layer("probability").get_weights())
