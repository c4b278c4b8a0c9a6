"""Tests of the 2.5D input and the attention-MIL head (issue 13): stack building equal across the input pipeline,
the serving signature and predict; edge replication; the MIL head's shapes and masking; bad input before training.

Expected stacks are built here with plain numpy indexing, independently of `preprocess.context_stack`.
"""

import dataclasses
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf.testing import fake_records
from pdx_tf import contracts
from pdx_tf.data import preprocess
from pdx_tf.errors import RunsError
from pdx_tf.serving import predict, signatures
from pdx_tf.training import input_pipeline, model as model_lib, trainer

SIZE = 32


def numpy_stack(images, context):
  """[N, S, S] -> [N, S, S, 2C+1] by explicit loops: channel j of slice i is slice min(max(i - C + j, 0), N - 1)."""
  count = images.shape[0]
  out = np.zeros(images.shape + (2 * context + 1,), images.dtype)
  for i in range(count):
    for j in range(2 * context + 1):
      out[i, ..., j] = images[min(max(i - context + j, 0), count - 1)]
  return out


def test_context_stack_matches_numpy_and_replicates_edges():
  images = np.arange(4 * 2 * 2, dtype=np.uint8).reshape(4, 2, 2)
  got = preprocess.context_stack(tf.constant(images), 2).numpy()
  np.testing.assert_array_equal(got, numpy_stack(images, 2))
  # Edges: slice 0's first two channels are slice 0 itself, the last slice's last two are the last slice.
  np.testing.assert_array_equal(got[0, ..., 0], images[0])
  np.testing.assert_array_equal(got[0, ..., 1], images[0])
  np.testing.assert_array_equal(got[3, ..., 4], images[3])
  np.testing.assert_array_equal(got[1, ..., 2], images[1])  # the centre channel is the slice itself
  assert preprocess.context_stack(tf.constant(images), 0) is not None
  np.testing.assert_array_equal(preprocess.context_stack(tf.constant(images), 0).numpy(), images)


def test_context_needs_one_window():
  with pytest.raises(ValueError, match="one window"):
    preprocess.check_context_windows(preprocess.PreprocessConfig(windows=preprocess.WINDOW_PRESETS["triple"]), 1)


def _hu(count=5, size=40, seed=0):
  rng = np.random.default_rng(seed)
  hu = np.full((count, size, size), -1000.0, np.float32)
  hu[:, 6:34, 8:32] = rng.uniform(-100, 200, (count, 28, 24))  # a body that differs from slice to slice
  return hu


def _channel_probe(channels):
  """A model whose output depends on each channel differently: sigmoid(sum_c w_c * mean pixel of channel c)."""
  inputs = keras.Input((SIZE, SIZE, channels), name="image")
  pooled = keras.layers.GlobalAveragePooling2D()(inputs)
  outputs = keras.layers.Dense(1, activation="sigmoid", name="probability")(pooled)
  model = keras.Model(inputs, outputs)
  weights = np.linspace(-0.02, 0.03, channels).astype(np.float32)[:, None]
  model.get_layer("probability").set_weights([weights, np.zeros(1, np.float32)])
  return model, weights[:, 0]


def test_serving_and_predict_build_the_same_stack_as_numpy():
  config = preprocess.PreprocessConfig(image_size=SIZE)
  hu = _hu()
  model, weights = _channel_probe(3)
  module = signatures.PdxServingModule([model], config, "mean", 3, context_slices=1)
  served = module.serving_default(hu=tf.constant(hu))["probability"].numpy()
  one_window = preprocess.preprocess_slices(hu, config).numpy()[..., 0]
  expected_stack = numpy_stack(one_window, 1)
  means = expected_stack.astype(np.float64).mean(axis=(1, 2))
  expected = 1 / (1 + np.exp(-(means @ weights)))
  np.testing.assert_allclose(served, expected, rtol=1e-5)
  # predict_images on the numpy stacks gives the same; predict's Grad-CAM inputs are the same stacks.
  np.testing.assert_allclose(module.predict_images(image=tf.constant(expected_stack))["probability"].numpy(),
                             expected, rtol=1e-5)
  np.testing.assert_array_equal(preprocess.preprocess_patient(hu, config, 1).numpy(), expected_stack)
  np.testing.assert_array_equal(predict.viewable_images(expected_stack, 1)[..., 0], one_window)


def test_the_context_window_check_runs_once_where_preprocessing_meets_the_models(monkeypatch):
  """check_context_windows runs where the two typed settings meet (the serving module: once an export), not again
  at every patient's preprocessing; three windows with context still fail there with the one message."""
  calls = []
  original = preprocess.check_context_windows
  monkeypatch.setattr(preprocess, "check_context_windows", lambda *args: calls.append(args) or original(*args))
  config = preprocess.PreprocessConfig(image_size=SIZE)
  model, _ = _channel_probe(3)
  module = signatures.PdxServingModule([model], config, "mean", 3, context_slices=1)
  for seed in range(2):
    module.serving_default(hu=tf.constant(_hu(seed=seed)))
  preprocess.preprocess_patient(_hu(), config, 1)  # predict's Grad-CAM inputs: the same stacks, no second check
  assert calls == [(config, 1)]
  triple = preprocess.PreprocessConfig(image_size=SIZE, windows=preprocess.WINDOW_PRESETS["triple"])
  with pytest.raises(ValueError, match="stacks adjacent slices of one window; these records have 3 windows"):
    signatures.PdxServingModule([model], triple, "mean", 3, context_slices=1)


@pytest.fixture(scope="module")
def flip_records(tmp_path_factory):
  """Fake records whose augmentation is a certain left-right flip (no rotation, no zoom): copy a of a stack must
  be the numpy stack mirrored, exactly, in every channel."""
  folder = str(tmp_path_factory.mktemp("records"))
  document = fake_records.write_fake_records(folder, num_patients=4, slices_per_patient=[3, 4, 5, 3],
                                             augment_factor=2, augment_block=1, image_size=SIZE)
  document["augment"] = {"rotation_max_deg": 0.0, "flip_probability": 1.0, "scale_min": 1.0, "scale_max": 1.0}
  import json  # pylint: disable=import-outside-toplevel
  with open(os.path.join(folder, "dataset.json"), "w") as handle:
    json.dump(document, handle)
  return folder


def test_input_pipeline_stacks_equal_numpy_and_augment_the_whole_stack_alike(flip_records):
  info = contracts.load_dataset_info(flip_records)
  ids = list(info.patients)
  stacks = input_pipeline.load_patient_stacks(info, ids, "p", 1)
  expected = {}
  for index, patient_id in enumerate(ids):
    count = stacks.counts[patient_id]
    originals = np.stack([fake_records.fake_image(0, index, s, 0, index % 2 == 0, SIZE, 1)[..., 0]
                          for s in range(count)])
    expected[patient_id] = numpy_stack(originals, 1)
    np.testing.assert_array_equal(stacks.images[stacks.rows(patient_id)], expected[patient_id])
  dataset = input_pipeline.stack_train_dataset(info, ids, stacks, task="p", sample_seed=0, repeat=0, shuffle_seed=0,
                                               pool_fraction=1.0, batch_size=1, shuffle_buffer=0)
  examples = input_pipeline.train_examples(info, ids, sample_seed=0, repeat=0, pool_fraction=1.0, shuffle_buffer=0)
  seen = 0
  for (image, _), example in zip(dataset, examples):
    patient_id = example["patient_id"].numpy().decode()
    slice_index, augmentation = int(example["slice_index"]), int(example["augmentation_index"])
    want = expected[patient_id][slice_index]
    if augmentation:
      want = want[:, ::-1]  # the same flip in every channel
    np.testing.assert_array_equal(image.numpy()[0], want.astype(np.float32))
    seen += 1
  assert seen == sum(stacks.counts.values()) * 3  # the original and two copies of every slice


def test_validation_stacks_follow_slice_order(flip_records):
  info = contracts.load_dataset_info(flip_records)
  ids = list(info.patients)[:2]
  validation = input_pipeline.load_validation(info, ids, "p")
  stacked = input_pipeline.stacks_from_validation(validation, 2)
  for patient_id in ids:
    rows = np.flatnonzero(validation.patient_ids == patient_id)
    rows = rows[np.argsort(validation.slice_indices[rows])]
    np.testing.assert_array_equal(stacked[rows], numpy_stack(validation.images[rows][..., 0], 2))


@pytest.fixture(scope="module")
def mil_model():
  return model_lib.build_model(model_lib.ModelConfig(image_size=SIZE, alpha=0.35, head="attention_mil",
                                                     attention_units=8))


def test_mil_head_shapes_and_masking(mil_model):
  rng = np.random.default_rng(0)
  bag = rng.uniform(0, 255, (2, 5, SIZE, SIZE, 3)).astype(np.float32)
  mask = np.asarray([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.float32)
  outputs = model_lib.mil_outputs(mil_model, bag, mask)
  assert tuple(mil_model([bag, mask]).shape) == (2, 1)
  assert tuple(outputs["attention"].shape) == (2, 5) and tuple(outputs["slice_probability"].shape) == (2, 5)
  attention = np.asarray(outputs["attention"])
  np.testing.assert_array_equal(attention[0, 3:], 0.0)  # padded slices get exactly zero attention
  np.testing.assert_allclose(attention.sum(axis=1), 1.0, rtol=1e-6)
  # The padded slices' content does not change the patient's output, nor the real slices' weights.
  other = bag.copy()
  other[0, 3:] = rng.uniform(0, 255, (2, SIZE, SIZE, 3))
  changed = model_lib.mil_outputs(mil_model, other, mask)
  np.testing.assert_allclose(np.asarray(changed["probability"]), np.asarray(outputs["probability"]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(changed["attention"]), attention, rtol=1e-5, atol=1e-7)
  # A patient padded into a larger bag gives the same output as alone without padding.
  alone = model_lib.mil_outputs(mil_model, bag[:1, :3], mask[:1, :3])
  np.testing.assert_allclose(np.asarray(alone["probability"])[0], np.asarray(outputs["probability"])[0], rtol=1e-5)


def test_mil_serving_exports_attention(mil_model):
  config = preprocess.PreprocessConfig(image_size=SIZE)
  module = signatures.PdxServingModule([mil_model], config, trainer.MIL_AGGREGATION, 3)
  hu = _hu(count=4)
  outputs = module.predict_patient(hu=tf.constant(hu))
  assert outputs["attention"].shape == (4,)
  np.testing.assert_allclose(float(tf.reduce_sum(outputs["attention"])), 1.0, rtol=1e-5)
  images = preprocess.preprocess_slices(hu, config).numpy().astype(np.float32)
  direct = model_lib.mil_outputs(mil_model, images[None], np.ones((1, 4), np.float32))
  np.testing.assert_allclose(float(outputs["patient_probability"]), float(np.asarray(direct["probability"])[0]),
                             rtol=1e-5)


def test_copy_slice_weights_starts_mil_from_the_slice_backbone(mil_model):
  slice_model = model_lib.build_model(model_lib.ModelConfig(image_size=SIZE, alpha=0.35))
  model_lib.copy_slice_weights(slice_model, mil_model)
  images = np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
  # The MIL model's instance score is then the slice model's probability, slice by slice.
  np.testing.assert_allclose(model_lib.mil_slice_model(mil_model)(images).numpy(),
                             slice_model(images, training=False).numpy(), rtol=1e-5)


def _config(records_dir, output_dir, **overrides):
  values = dict(task="p", records_dir=records_dir, output_dir=str(output_dir),
                model=model_lib.ModelConfig(image_size=SIZE, alpha=0.35), num_folds=2, num_repeats=1, epochs=1,
                batch_size=4, pool_fraction=0.5, deterministic=True)
  values.update(overrides)
  return trainer.TrainConfig(**values)


def test_three_window_records_with_context_fail_at_the_grids_hand_off(fake_records_dir, tmp_path):
  triple = fake_records_dir("triple", num_patients=4, slices_per_patient=3, augment_factor=1, channels=3)
  with pytest.raises(ValueError, match="stacks adjacent slices of one window; these records have 3 windows"):
    trainer.run_grid(_config(triple, tmp_path / "t", context_slices=1,
                             model=model_lib.ModelConfig(image_size=SIZE, alpha=0.35, input_channels=3)))
  assert not (tmp_path / "t" / "cells").exists()


def test_bad_input_fails_before_training(flip_records, tmp_path):
  with pytest.raises(RunsError, match="patient fake000 has 3"):
    trainer.run_grid(_config(flip_records, tmp_path / "a", context_slices=3,
                             model=model_lib.ModelConfig(image_size=SIZE, alpha=0.35, input_channels=7)))
  assert not (tmp_path / "a" / "cells").exists()
  mil = model_lib.ModelConfig(image_size=SIZE, alpha=0.35, head="attention_mil")
  with pytest.raises(ValueError, match="--aggregation=mean does not apply"):
    _config(flip_records, tmp_path / "b", model=mil, aggregation="mean", mil_init_from="x")
  with pytest.raises(ValueError, match="learned features"):
    _config(flip_records, tmp_path / "b", model=mil, aggregation=trainer.MIL_AGGREGATION)
  with pytest.raises(ValueError, match="3 input channels"):
    _config(flip_records, tmp_path / "b", context_slices=1,
            model=dataclasses.replace(model_lib.ModelConfig(image_size=SIZE, alpha=0.35), input_channels=5))
  with pytest.raises(RunsError, match="no complete cell"):
    trainer.run_grid(_config(flip_records, tmp_path / "c", model=mil, aggregation=trainer.MIL_AGGREGATION,
                             mil_init_from=str(tmp_path / "missing")))
