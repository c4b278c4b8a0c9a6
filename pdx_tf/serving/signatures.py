"""The serving graph: a tf.Module whose signatures run preprocessing, the model ensemble and aggregation.

Signatures (all outputs float32, so TF Serving's REST JSON carries plain numbers):
- `serving_default(hu: float32 [N, H, W])`, raw HU slices of any size. Inside the graph:
  `preprocess.preprocess_slices` (the pipeline's body crop, resize and window; no second copy), then the
  models. Outputs `probability` [N] (mean over models) and `uncertainty` [N] (their standard deviation).
- `predict_images(image: uint8 [N, S, S, 3])`, images already at the models' size S. A wrong S fails with a
  message that names the expected size. Same outputs.
- `predict_patient(hu: float32 [N, H, W])`, one patient's abdominal slice stack. Outputs `slice_probability`
  [N], `slice_uncertainty` [N], and `patient_probability` / `patient_uncertainty` (scalars). The patient
  probability applies the training's aggregation rule (`aggregation.aggregate_tf`) to each model's slice
  probabilities, then averages over models; `patient_uncertainty` is the standard deviation of those
  per-model patient probabilities. (Aggregating the mean slice curve instead would differ for top-k and
  max rules; per-model first is what each cross-validated model was evaluated with.)

With conformal thresholds (the export's, pdx_tf.conformal), a fourth signature
- `predict_patient_set(hu: float32 [N, H, W])` returns `predict_patient`'s outputs and the patient's conformal
  set: `conformal_negative` and `conformal_positive` (1.0 if that label is in the set, else
  0.0; both = uncertain, refer), `conformal_uncertain` (1.0 for both labels or none), `conformal_alpha` and
  `conformal_score`: the patient probability, or, for an export with score scales (its cells had inner
  patients: pdx_tf.conformal.ScoreScale), the mean over models of each model's patient probability on its own
  scale. Negative is in the set iff conformal_score <= negative_max_score, positive iff 1 - conformal_score <=
  positive_max_score (the export's thresholds and scales, baked into the graph).

2.5D models (`context_slices` C > 0) take 2C+1 adjacent slices of one window as the channels: `serving_default`
and `predict_patient` treat their N slices as ONE patient's stack in slice order and build each slice's stack
with `preprocess.preprocess_patient` (the training's `preprocess.context_stack`); `predict_images` takes the
stacks themselves, uint8 [N, S, S, 2C+1]. Attention-MIL models (`head="attention_mil"`): `predict_patient`'s
patient probability is each model's attention-pooled probability (then the mean over models), and it also
outputs `attention` [N] (each slice's attention weight, mean over models; sums to 1); the slice probabilities of
every signature are the MIL model's instance scores (its output layer on each slice's own feature).

Regions models (`head="regions"`, 13 outputs a slice): every slice output has a last axis of 13 (column r = PCI
region r), `predict_patient`'s patient outputs are [13] (each region's column aggregated by the training's rule per
model, then the mean over models), and one more signature, `predict_regions(hu)`, returns the same under the names
`region_probabilities` [13], `region_uncertainty` [13] and `slice_region_probabilities` [N, 13] (the region names
are in pdx_export.json "regions").

Uncertainty is the population standard deviation over models (numpy's default, ddof=0), so a single model
reports 0. The models are called in inference mode through one shared traced function, so the SavedModel holds
each model's graph once, whatever the number of signatures.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import keras
import numpy as np
import tensorflow as tf

from pdx_tf import conformal
from pdx_tf.data import preprocess
from pdx_tf.training import aggregation, model as model_lib, region_bands as region_bands_lib

SERVING_DEFAULT = "serving_default"
PREDICT_IMAGES = "predict_images"
PREDICT_PATIENT = "predict_patient"
PREDICT_REGIONS = "predict_regions"  # regions exports only
SIGNATURE_NAMES = (SERVING_DEFAULT, PREDICT_IMAGES, PREDICT_PATIENT)
PREDICT_PATIENT_SET = "predict_patient_set"  # only with conformal thresholds


def model_outputs(model: keras.Model) -> int:
  """Output columns a slice (or bag): 1, or the number of PCI regions of a regions model."""
  return int(model.outputs[0].shape[-1])


def model_input_shape(model: keras.Model) -> tuple[int, int]:
  """(side S, channels C) of a slice classifier ([N, S, S, C]) or an attention-MIL model ([B, K, S, S, C])."""
  shape = tuple(model.inputs[0].shape)
  if model_lib.is_mil_model(model):
    shape = shape[1:]
  if len(shape) != 4 or shape[1] != shape[2]:
    raise ValueError(f"model {model.name} takes {shape}; expected square images [N, S, S, C]")
  return int(shape[1]), int(shape[3])


def model_image_size(model: keras.Model) -> int:
  """The square input side of a classifier, from its input shape."""
  return model_input_shape(model)[0]


class PdxServingModule(tf.Module):
  """Keras slice classifiers plus preprocessing and aggregation, with the three serving signatures.

  Attributes:
    model_variables: every model's variables, tracked so the SavedModel stores them (the Keras models
      themselves are not attached: only their traced graphs and variables are saved, the way
      keras.export.ExportArchive does it).
  """

  def __init__(self, models: Sequence[keras.Model], preprocess_config: preprocess.PreprocessConfig,
               aggregation_rule: str, aggregation_top_k: int, context_slices: int = 0,
               conformal_thresholds: Any = None, region_bands: bool = False, conformal_scales: Any = None):
    """Builds the signatures.

    Args:
      models: one or more classifiers from `pdx_tf.training.model.build_model`, all at `preprocess_config.image_size`.
      preprocess_config: the preprocessing the models were trained on (run.json "preprocess").
      aggregation_rule: one of `aggregation.AGGREGATIONS` (run.json "aggregation").
      aggregation_top_k: k for `topk_mean` (run.json "aggregation_top_k"); MIL models ignore both.
      context_slices: C of 2.5D models (run.json "context_slices"), 0 otherwise.
      conformal_thresholds: a pdx_tf.conformal.ConformalThresholds: adds `predict_patient_set`.
      conformal_scales: with the thresholds, one pdx_tf.conformal.ScoreScale a model (in `models`' order): the
        set is decided on the mean of each model's scaled patient probability (conformal.ensemble_score), not
        on the mean probability.
      region_bands: a regions model trained with `train --region_bands`: each region's column is aggregated over
        the slices of its band (pdx_tf.training.region_bands; `hu`'s slices are the patient's abdominal slices in
        the data pipeline's order, lowest first).

    Raises:
      ValueError: for no models, a model of another input size or channel count, mixed heads, or an unknown
        aggregation.
    """
    super().__init__(name="pdx_serving")
    if not models:
      raise ValueError("PdxServingModule needs at least one model")
    mil = model_lib.is_mil_model(models[0])
    if any(model_lib.is_mil_model(model) != mil for model in models):
      raise ValueError("the models mix slice and attention-MIL heads; export them separately")
    width = model_outputs(models[0])
    if any(model_outputs(model) != width for model in models):
      raise ValueError("the models differ in their number of outputs (regions and one-task models); export them"
                       " separately")
    if not mil:
      aggregation.check_aggregation(aggregation_rule, aggregation_top_k)
    if conformal_scales is not None and (conformal_thresholds is None or len(conformal_scales) != len(models)):
      raise ValueError(f"conformal_scales needs conformal thresholds and one scale a model ({len(models)}), got"
                       f" {len(conformal_scales)}")
    if region_bands and (mil or width != region_bands_lib.NUM_PCI_REGIONS):
      raise ValueError(f"region_bands needs a regions model ({region_bands_lib.NUM_PCI_REGIONS} outputs a slice),"
                       f" got {width} output(s)")
    preprocess.check_context_windows(preprocess_config, context_slices)
    image_size = preprocess_config.image_size
    channels = preprocess.model_channels(context_slices)
    for model in models:
      if model_input_shape(model) != (image_size, channels):
        raise ValueError(f"model {model.name} takes {model_input_shape(model)} (px, channels) but the preprocessing "
                         f"makes ({image_size}, {channels})")
    self.mil = mil
    self.num_outputs = width
    self.context_slices = context_slices
    self.model_variables = [variable for model in models for variable in model.variables]
    self.num_models = len(models)
    self.image_size = image_size
    # Closures rather than attributes, so tf.Module does not try to serialise the Keras objects.
    frozen_models = tuple(models)
    config = preprocess_config

    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, channels], tf.float32)],
                 autograph=False)
    def per_model_outputs(images):
      """{"slice": [num_models, N] slice probabilities} and, for MIL models, "patient" [num_models] and
      "attention" [num_models, N], with the N images as one bag."""
      if not mil:
        shape = [-1] if width == 1 else [-1, width]  # [N], or [N, 13] for a regions model
        return {"slice": tf.stack([tf.reshape(tf.cast(model(images, training=False), tf.float32), shape)
                                   for model in frozen_models])}
      mask = tf.ones([1, tf.shape(images)[0]], tf.float32)
      outputs = [model_lib.mil_outputs(model, images[tf.newaxis], mask) for model in frozen_models]
      return {"slice": tf.stack([output["slice_probability"][0] for output in outputs]),
              "patient": tf.stack([output["probability"][0] for output in outputs]),
              "attention": tf.stack([output["attention"][0] for output in outputs])}

    def per_model_probabilities(images):
      return per_model_outputs(images)["slice"]

    def summarise(per_model):
      return {
          "probability": tf.reduce_mean(per_model, axis=0),
          "uncertainty": tf.math.reduce_std(per_model, axis=0),
      }

    def images_from_hu(hu):
      return tf.cast(preprocess.preprocess_patient(hu, config, context_slices), tf.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="hu")])
    def serving_default(hu):
      return summarise(per_model_probabilities(images_from_hu(hu)))

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, channels], tf.uint8, name="image")])
    def predict_images(image):
      message = (f"predict_images expects uint8 images of {image_size}x{image_size}x{channels} pixels (the models' "
                 "input size); resize them, or send raw HU slices to serving_default")
      checks = [
          tf.debugging.assert_equal(tf.shape(image)[1], image_size, message=message),
          tf.debugging.assert_equal(tf.shape(image)[2], image_size, message=message),
      ]
      with tf.control_dependencies(checks):
        images = tf.ensure_shape(tf.cast(image, tf.float32), [None, image_size, image_size, channels])
      return summarise(per_model_probabilities(images))

    def patient_outputs(hu):
      """predict_patient's outputs plus "patient_probability_per_model" [num_models] (the conformal score's input)."""
      check = tf.debugging.assert_positive(
          tf.shape(hu)[0], message="predict_patient needs at least one slice of the patient")
      with tf.control_dependencies([check]):
        outputs = per_model_outputs(images_from_hu(hu))
      per_model = outputs["slice"]
      if mil:
        patient = outputs["patient"]
      elif width > 1 and region_bands:  # [models, regions]: each column over the slices of its band, per model
        count = tf.shape(per_model[0])[0]
        keep = region_bands_lib.band_mask_tf(tf.range(count), count)
        patient = tf.stack([region_bands_lib.aggregate_columns_tf(per_model[index], keep, aggregation_rule,
                                                                  aggregation_top_k)
                            for index in range(len(frozen_models))])
      elif width > 1:  # [models, regions]: each region's column aggregated per model
        patient = tf.stack([tf.stack([aggregation.aggregate_tf(per_model[index][:, column], aggregation_rule,
                                                               aggregation_top_k) for column in range(width)])
                            for index in range(len(frozen_models))])
      else:
        patient = tf.stack([aggregation.aggregate_tf(per_model[index], aggregation_rule, aggregation_top_k)
                            for index in range(len(frozen_models))])
      result = {
          "patient_probability_per_model": patient,
          "slice_probability": tf.reduce_mean(per_model, axis=0),
          "slice_uncertainty": tf.math.reduce_std(per_model, axis=0),
          "patient_probability": tf.reduce_mean(patient, axis=0) if width > 1 else tf.reduce_mean(patient),
          "patient_uncertainty": tf.math.reduce_std(patient, axis=0) if width > 1 else tf.math.reduce_std(patient),
      }
      if mil:
        result["attention"] = tf.reduce_mean(outputs["attention"], axis=0)
      return result

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="hu")])
    def predict_patient(hu):
      outputs = dict(patient_outputs(hu))
      del outputs["patient_probability_per_model"]
      return outputs

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="hu")])
    def predict_regions(hu):
      outputs = predict_patient(hu)
      return {"region_probabilities": outputs["patient_probability"],
              "region_uncertainty": outputs["patient_uncertainty"],
              "slice_region_probabilities": outputs["slice_probability"]}

    self.conformal_thresholds = conformal_thresholds
    if conformal_thresholds is not None:
      negative_max = tf.constant(conformal_thresholds.negative_max_score, tf.float64)
      positive_max = tf.constant(conformal_thresholds.positive_max_score, tf.float64)
      alpha = float(conformal_thresholds.alpha)

      if conformal_scales is not None:
        scale_means = tf.constant([scale.logit_mean for scale in conformal_scales], tf.float64)
        scale_sds = tf.constant([scale.logit_sd for scale in conformal_scales], tf.float64)

      @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.float32, name="hu")])
      def predict_patient_set(hu):
        outputs = patient_outputs(hu)
        # float64 as pdx_tf.conformal compares, so the graph and numpy agree at the bounds.
        probability = tf.cast(outputs["patient_probability"], tf.float64)
        if conformal_scales is not None:  # conformal.ensemble_score: each model on its own scale, then the mean
          per_model = tf.clip_by_value(tf.cast(outputs["patient_probability_per_model"], tf.float64),
                                       conformal.PROBABILITY_CLIP, 1.0 - conformal.PROBABILITY_CLIP)
          logits = tf.math.log(per_model / (1.0 - per_model))
          probability = tf.reduce_mean(tf.sigmoid((logits - scale_means) / scale_sds))
        negative = tf.cast(probability <= negative_max, tf.float32)
        positive = tf.cast(1.0 - probability <= positive_max, tf.float32)
        return {
            **{key: value for key, value in outputs.items() if key != "patient_probability_per_model"},
            "conformal_score": tf.cast(probability, tf.float32),
            "conformal_negative": negative, "conformal_positive": positive,
            "conformal_uncertain": tf.cast(tf.equal(negative, positive), tf.float32),
            "conformal_alpha": tf.constant(alpha, tf.float32),
        }

      self.predict_patient_set = predict_patient_set
    self.per_model_outputs = per_model_outputs
    self.serving_default = serving_default
    self.predict_images = predict_images
    self.predict_patient = predict_patient
    if width > 1:
      self.predict_regions = predict_regions

  def signatures(self) -> dict[str, tf.types.experimental.ConcreteFunction]:
    """The signature map for `tf.saved_model.save`."""
    functions = {
        SERVING_DEFAULT: self.serving_default.get_concrete_function(),
        PREDICT_IMAGES: self.predict_images.get_concrete_function(),
        PREDICT_PATIENT: self.predict_patient.get_concrete_function(),
    }
    if self.num_outputs > 1:
      functions[PREDICT_REGIONS] = self.predict_regions.get_concrete_function()
    if self.conformal_thresholds is not None:
      functions[PREDICT_PATIENT_SET] = self.predict_patient_set.get_concrete_function()
    return functions

  def signature_names(self) -> tuple[str, ...]:
    """The names `signatures` returns, in order."""
    return (SIGNATURE_NAMES + ((PREDICT_REGIONS,) if self.num_outputs > 1 else ())
            + ((PREDICT_PATIENT_SET,) if self.conformal_thresholds is not None else ()))


def rest_predict_body(inputs: Mapping[str, np.ndarray], signature_name: str = SERVING_DEFAULT) -> str:
  """The JSON body of a TF Serving REST `:predict` request, in the columnar ("inputs") format.

  The columnar format suits every signature here (predict_patient's outputs do not share a batch dimension,
  which the row format would need). Float arrays whose values are all whole numbers (HU from DICOM are) are
  written as integers, which TF Serving's JSON mapping accepts for DT_FLOAT and which is ~30 % smaller than
  "-1024.0" notation; separators are compact. A 512x512 slice is still over 1 MB: use gRPC for bulk work.
  """
  values: dict[str, Any] = {}
  for name, array in inputs.items():
    array = np.asarray(array)
    if array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.array_equal(array, np.round(array)) \
        and np.abs(array).max(initial=0.0) < 2**31:
      array = array.astype(np.int64)
    values[name] = array.tolist()
  return json.dumps({"signature_name": signature_name, "inputs": values}, separators=(",", ":"))
