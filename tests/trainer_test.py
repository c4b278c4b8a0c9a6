"""Tests of pdx_tf.training.trainer: a smoke run with every artifact, resume, determinism and bad-input errors.

All cells use the real MobileNetV2 at 32 px, alpha 0.35, on the tiny fake dataset of pdx_tf/testing/fake_records.py.
The trainer keeps one compiled model per process, so only the first run pays for tracing the train step.
"""

import csv
import glob
import hashlib
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn import metrics as sklearn_metrics

from pdx_tf.testing import fake_records
from pdx_tf import evaluation, io_utils
from pdx_tf.errors import PdxError, RecordsError, RunsError
from pdx_tf.training import cell_trainer, trainer
from pdx_tf.training.model import ModelConfig

SIZE = 32


def _read_csv(path):
  with open(path) as handle:
    return list(csv.DictReader(handle))


def _events(folder):
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      yield from event.summary.value


def test_smoke_run_writes_every_artifact_and_is_idempotent(records_dir, tmp_path, tiny_config):
  config = tiny_config(records_dir, tmp_path / "R")
  result = trainer.run_grid(config)
  assert result["cells"] == {"r00_f00": "complete", "r00_f01": "complete"}
  root = tmp_path / "R"
  split = json.loads((root / "splits.json").read_text())
  assert split["task"] == "p" and split["num_folds"] == 2 and split["seed"] == 0
  assert json.loads((root / "config.json").read_text())["model"]["image_size"] == SIZE
  patients = _read_csv(root / "patients.csv")
  assert [row["patient_id"] for row in patients] == fake_records.patient_ids(8)
  assert list(patients[0]) == ["patient_id", "label_p", "label_sb", "site"]
  cell_patient_aucs = []
  for fold in range(2):
    cell = root / "cells" / f"r00_f{fold:02d}"
    run = json.loads((cell / "run.json").read_text())
    assert run["status"] == "complete" and (run["repeat"], run["fold"]) == (0, fold) and run["task"] == "p"
    # The documented recipe: SHA-256 of splits.json as written (canonical JSON), recomputed with hashlib.
    assert run["split_hash"] == hashlib.sha256((root / "splits.json").read_bytes()).hexdigest()
    assert run["dataset_hash"] == io_utils.sha256_file(os.path.join(records_dir, "dataset.json"))
    assert run["records_hash"] is not None and run["records_hash"] == trainer.trained_records_hash(str(root))
    assert set(run["seeds"]) == {"split", "sample", "init"} and run["model_path"] == "model.keras"
    assert run["config"]["model"]["alpha"] == 0.35 and run["preprocess"]["image_size"] == SIZE
    assert run["images_seen"] > 0 and run["images_seen"] % 8 == 0
    assert run["aggregation"] == "topk_mean" and run["aggregation_top_k"] == 3
    test_ids = split["repeats"][0]["folds"][fold]["test"]
    slice_rows = _read_csv(cell / "slice_predictions.csv")
    assert sorted((row["patient_id"], int(row["slice_index"])) for row in slice_rows) == sorted(
        (patient, index) for patient in test_ids for index in range(3))
    patient_rows = _read_csv(cell / "patient_predictions.csv")
    assert [row["patient_id"] for row in patient_rows] == test_ids
    for row in patient_rows:  # topk_mean with k=3 over 3 slices is their mean
      mine = [float(s["probability"]) for s in slice_rows if s["patient_id"] == row["patient_id"]]
      assert float(row["probability"]) == pytest.approx(sum(mine) / 3, abs=1e-6)
      assert row["label"] == str(int(row["patient_id"][-1]) % 2 == 0 and 1 or 0)
    metrics = json.loads((cell / "metrics.json").read_text())
    assert {"patient/auc", "slice/auc", "collapsed", "history"} <= set(metrics) and len(metrics["history"]) == 1
    # The training AUCs (metrics.json, HParams, the demo's printout) equal scikit-learn on the written predictions.
    assert metrics["patient/auc"] == pytest.approx(sklearn_metrics.roc_auc_score(
        [int(row["label"]) for row in patient_rows], [float(row["probability"]) for row in patient_rows]), abs=1e-6)
    assert metrics["slice/auc"] == pytest.approx(sklearn_metrics.roc_auc_score(
        [int(row["label"]) for row in slice_rows], [float(row["probability"]) for row in slice_rows]), abs=1e-6)
    cell_patient_aucs.append(metrics["patient/auc"])
    assert keras.models.load_model(cell / "model.keras").output_shape == (None, 1)
    assert not (cell / "checkpoint").exists() and not (cell / "progress.json").exists()
  # TensorBoard: HParams session + final metrics in the cell run, scalars by epoch, the input images once.
  tensorboard = str(root / "tensorboard")
  cell_values = list(_events(os.path.join(tensorboard, "r00_f00")))
  assert any(value.metadata.plugin_data.plugin_name == "hparams" for value in cell_values)
  assert {"patient/auc", "slice/auc"} <= {value.tag for value in cell_values}
  train_tags = {value.tag for value in _events(os.path.join(tensorboard, "r00_f00", "train"))}
  assert {"epoch_loss", "epoch_auc", "epoch_learning_rate", "augmented_inputs"} <= train_tags
  validation_tags = {value.tag for value in _events(os.path.join(tensorboard, "r00_f00", "validation"))}
  assert {"epoch_loss", "epoch_auc"} <= validation_tags
  assert any(value.metadata.plugin_data.plugin_name == "hparams" for value in _events(tensorboard))
  # Rerunning skips finished cells and leaves them untouched.
  before = (root / "cells" / "r00_f00" / "run.json").read_bytes()
  assert trainer.run_grid(config)["cells"] == {"r00_f00": "skipped", "r00_f01": "skipped"}
  assert (root / "cells" / "r00_f00" / "run.json").read_bytes() == before
  # The evaluation stage reads these artifacts.
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(
      runs_dir=str(root), output_dir=str(tmp_path / "E"), tasks=("p",), num_bootstrap=0))
  assert summary["p"]["n_cells"] == 2
  assert summary["p"]["per_cell"]["auc"]["mean"] == pytest.approx(np.mean(cell_patient_aucs), abs=1e-6)


def test_interrupted_cell_resumes_at_the_next_epoch(records_dir, tmp_path, tiny_config, stop_after_first_epoch,
                                                    epoch_recorder):
  config = tiny_config(records_dir, tmp_path / "R", epochs=2, cells=("r0f1",))
  result = trainer.run_grid(config, cell_callbacks=stop_after_first_epoch)
  assert result["cells"] == {"r00_f01": "interrupted"}
  cell = tmp_path / "R" / "cells" / "r00_f01"
  progress = json.loads((cell / "progress.json").read_text())
  assert progress["epochs_completed"] == 1 and (cell / "checkpoint" / progress["checkpoint"]).exists()
  assert not (cell / "run.json").exists()
  recorder = epoch_recorder
  result = trainer.run_grid(config, cell_callbacks=lambda cell: [recorder])
  assert result["cells"] == {"r00_f01": "complete"}
  assert recorder.epochs == [1], "the rerun must continue at epoch 2 (index 1), not start over"
  metrics = json.loads((cell / "metrics.json").read_text())
  assert len(metrics["history"]) == 2 and metrics["history"][0] == progress["history"][0]
  assert metrics["images_seen"] > progress["images_seen"]
  assert (cell / "run.json").exists() and not (cell / "checkpoint").exists()


def test_same_seed_and_records_give_identical_predictions(records_dir, tmp_path, tiny_config):
  outputs = []
  for name in ("first", "second"):
    trainer.run_grid(tiny_config(records_dir, tmp_path / name, cells=("r0f0",)))
    outputs.append((tmp_path / name / "cells" / "r00_f00" / "slice_predictions.csv").read_text())
    assert (tmp_path / name / "splits.json").read_bytes() == (tmp_path / "first" / "splits.json").read_bytes()
  assert outputs[0] == outputs[1]


def _assert_nothing_trained(output_dir):
  assert not glob.glob(os.path.join(str(output_dir), "cells", "*"))


def test_records_of_another_schema_version(tmp_path, tiny_config):
  folder = str(tmp_path / "records")
  fake_records.write_fake_records(folder, num_patients=4, slices_per_patient=1, augment_factor=1, image_size=SIZE,
                                  schema_version=1)
  with pytest.raises(RecordsError, match="schema version 1"):
    trainer.run_grid(tiny_config(folder, tmp_path / "R"))
  _assert_nothing_trained(tmp_path / "R")


def test_image_size_that_does_not_match_the_model(records_dir, tmp_path, tiny_config):
  with pytest.raises(RecordsError, match="32 px images but the model expects 48 px"):
    trainer.run_grid(tiny_config(records_dir, tmp_path / "R", model=ModelConfig(image_size=48, alpha=0.35)))
  _assert_nothing_trained(tmp_path / "R")


def test_fold_whose_training_labels_are_one_class(records_dir, tmp_path, tiny_config):
  # Only fake000 is sb-positive: the fold that tests it trains on negatives only.
  folder = str(tmp_path / "records")
  fake_records.write_fake_records(folder, num_patients=4, slices_per_patient=1, augment_factor=1, image_size=SIZE,
                                  label_sb_every=100)
  with pytest.raises(RunsError, match="every training patient has task sb label 0"):
    trainer.run_grid(tiny_config(folder, tmp_path / "R", task="sb"))
  _assert_nothing_trained(tmp_path / "R")


def test_cells_out_of_range():
  with pytest.raises(ValueError, match="outside the grid"):
    trainer.TrainConfig(task="p", records_dir="D", output_dir="R", num_folds=8, num_repeats=24, cells=("r0f8",))


def test_unwritable_output_dir(records_dir, tmp_path, tiny_config):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(PdxError, match="not writable"):
    trainer.run_grid(tiny_config(records_dir, blocker / "R"))


def test_output_dir_of_another_configuration(records_dir, tmp_path, tiny_config):
  root = tmp_path / "R"
  io_utils.atomic_write_json(str(root / "config.json"),
                             __import__("pdx_tf.configs").configs.to_dict(tiny_config(records_dir, root).grid_config()))
  with pytest.raises(RunsError, match="seed differ"):
    trainer.run_grid(tiny_config(records_dir, root, seed=1))
  _assert_nothing_trained(root)


def test_output_dir_trained_on_other_records(records_dir, tmp_path, tiny_config):
  root = tmp_path / "R"
  io_utils.atomic_write_json(str(root / "records.json"), {"records_hash": "0" * 64})
  with pytest.raises(RunsError, match="trained on other records"):
    trainer.run_grid(tiny_config(records_dir, root))
  _assert_nothing_trained(root)


def test_export_waits_for_a_complete_grid(records_dir, tmp_path):
  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel

  assert export.export_if_complete(str(tmp_path / "R"), "p", 1, 2, str(tmp_path / "X")) == []
  assert not (tmp_path / "X").exists()


def test_missing_imagenet_weights_fail_before_training(records_dir, tmp_path, monkeypatch, tiny_config):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
  with pytest.raises(PdxError, match="ImageNet weights not found"):
    trainer.run_grid(tiny_config(records_dir, tmp_path / "R", model=ModelConfig(image_size=SIZE, alpha=0.35,
                                                                                  weights="imagenet")))
  _assert_nothing_trained(tmp_path / "R")


def test_config_validation_and_selected_cells():
  config = trainer.TrainConfig(task="p", records_dir="D", output_dir="R", num_folds=4, num_repeats=2, num_partitions=3,
                                partition_index=1)
  assert config.selected_cells() == [(0, 1), (1, 0), (1, 3)]  # grid indices 1, 4, 7
  chosen = trainer.TrainConfig(task="p", records_dir="D", output_dir="R", num_folds=4, num_repeats=2,
                                cells=("r1f3", "r0f0"))
  assert chosen.selected_cells() == [(0, 0), (1, 3)]
  for bad in (dict(task="x"), dict(precision="float64"), dict(pool_fraction=1.5), dict(aggregation="median"),
              dict(num_folds=1), dict(partition_index=2, num_partitions=2)):
    with pytest.raises(ValueError):
      trainer.TrainConfig(**{"task": "p", "records_dir": "D", "output_dir": "R", **bad})
  has_gpu = bool(tf.config.list_physical_devices("GPU"))
  assert trainer.resolve_precision("auto") == ("mixed_float16" if has_gpu else "float32")
  assert trainer.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"


@pytest.mark.parametrize("labels, scores", [
    ([1, 0, 1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]),  # all tied: 0.5
    ([1, 1, 0, 0, 0], [0.9, 0.4, 0.4, 0.4, 0.1]),  # a positive tied with three negatives
    ([0, 1, 1, 0, 1, 0, 0, 1], [0.2, 0.2, 0.7, 0.7, 0.3, 0.1, 0.3, 0.9]),
    ([1, 0, 0, 1], [0.8, 0.1, 0.3, 0.6]),  # no ties: 1.0
])
def test_training_auc_equals_sklearn_with_ties(labels, scores):
  assert cell_trainer.auc(np.asarray(labels), np.asarray(scores)) == pytest.approx(
      sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)


def test_training_auc_equals_sklearn_on_many_tied_scores():
  rng = np.random.default_rng([12, 5])
  labels = rng.integers(0, 2, size=300)
  scores = rng.integers(0, 6, size=300) / 5.0  # six distinct values: most pairs tie
  assert cell_trainer.auc(labels, scores) == pytest.approx(
      sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12)
  assert cell_trainer.auc(np.ones(3), np.arange(3.0)) is None


# ------------------------------------------------------------------------------------------ what fit is fed


def _image_identities(num_patients=8, slices_per_patient=3, augment_factor=4):
  """(patient_id, slice_index, augmentation_index) of every fake image, keyed by its pixels (fake_records' recipe)."""
  identities = {}
  for index, patient_id in enumerate(fake_records.patient_ids(num_patients)):
    for slice_index in range(slices_per_patient):
      for augmentation_index in range(augment_factor + 1):
        image = fake_records.fake_image(0, index, slice_index, augmentation_index, index % 2 == 0, SIZE)
        identities[image.tobytes()] = (patient_id, slice_index, augmentation_index)
  return identities


def _identify(images, identities):
  return [identities[np.asarray(image).astype(np.uint8).tobytes()] for image in images]


def _fingerprint64(key):
  """FarmHash Fingerprint64 of `key`, rebuilt from to_hash_bucket_fast (another op than the library's
  tf.fingerprint): fp mod (2^63 - 1), plus 2^63 - 1 when the parity says fp was larger (2^63 - 1 is odd)."""
  modulus = (1 << 63) - 1
  low = int(tf.strings.to_hash_bucket_fast(key, modulus))
  parity = int(tf.strings.to_hash_bucket_fast(key, 2))
  return low if low % 2 == parity else low + modulus


def _documented_pool_keep(seed, repeat, patient_id, augmentation_index, fraction, augment_factor=4, block=2):
  """input_pipeline's documented draw, rebuilt here: a patient's blocks of `block` copies ranked by
  Fingerprint64("pdx-pool/<seed>/<repeat>/<patient_id>/<block>"), the first round(fraction x blocks) kept."""
  num_blocks = -(-augment_factor // block)
  ranked = sorted(range(num_blocks), key=lambda b: (_fingerprint64(f"pdx-pool/{seed}/{repeat}/{patient_id}/{b}"), b))
  kept = ranked[:max(1, int(fraction * num_blocks + 0.5))]
  return (augmentation_index - 1) // block in kept


@pytest.fixture
def fed_to_fit(monkeypatch):
  """Records every training batch that reaches Model.fit (as the model consumes it) and the validation data."""
  fed = {"train": [], "validation": []}
  real_fit = keras.Model.fit

  def recording_fit(self, x=None, *args, validation_data=None, **kwargs):
    def record(images):
      fed["train"].extend(images.numpy())
      return images

    def tap(images, labels):
      images = tf.py_function(record, [images], tf.float32)
      return tf.ensure_shape(images, [None, SIZE, SIZE, 3]), labels

    for images, labels in validation_data:
      fed["validation"].extend(zip(images.numpy(), labels.numpy()[:, 0]))
    return real_fit(self, x.map(tap), *args, validation_data=validation_data, **kwargs)

  monkeypatch.setattr(keras.Model, "fit", recording_fit)
  return fed


def test_a_cell_trains_on_exactly_its_training_patients_draw(records_dir, tmp_path, fed_to_fit, tiny_config):
  config = tiny_config(records_dir, tmp_path / "R", cells=("r0f0",))
  trainer.run_grid(config)
  split = json.loads((tmp_path / "R" / "splits.json").read_text())
  train_ids = split["repeats"][0]["folds"][0]["train"]
  test_ids = split["repeats"][0]["folds"][0]["test"]
  assert not set(train_ids) & set(test_ids) and len(train_ids) + len(test_ids) == 8
  identities = _image_identities()
  fed = _identify(fed_to_fit["train"], identities)
  # Expected: the training patients' originals plus their augmented copies that the documented key draws.
  expected = {(patient_id, slice_index, augmentation_index)
              for patient_id in train_ids for slice_index in range(3) for augmentation_index in range(5)
              if augmentation_index == 0 or _documented_pool_keep(0, 0, patient_id, augmentation_index,
                                                                   config.pool_fraction)}
  assert {identity[0] for identity in fed} == set(train_ids), "fit saw a patient outside the cell's train list"
  assert len(fed) == len(set(fed)) and set(fed) <= expected
  assert len(fed) == len(expected) // config.batch_size * config.batch_size  # only the remainder is dropped
  # Validation: exactly the held-out patients' original slices, with their own labels.
  validation = [(identity, int(label)) for identity, label in
                zip(_identify([image for image, _ in fed_to_fit["validation"]], identities),
                    [label for _, label in fed_to_fit["validation"]])]
  assert sorted(identity for identity, _ in validation) == sorted(
      (patient_id, slice_index, 0) for patient_id in test_ids for slice_index in range(3))
  for (patient_id, _, _), label in validation:
    assert label == int(int(patient_id[-3:]) % 2 == 0)


# ------------------------------------------------------------------------------------------------ resume


def _final_weights(folder):
  return keras.models.load_model(os.path.join(folder, "model.keras")).get_weights()


def test_resume_restores_weights_and_optimizer_state(records_dir, tmp_path, tiny_config, stop_after_first_epoch):
  # shuffle_buffer=1 keeps the example order the same in every epoch, so a resumed epoch 2 sees the very batches
  # an uninterrupted epoch 2 sees; then only restored weights AND Adam moments give the same final model.
  # Dropout is off: its seed generator's state is not part of the checkpoint (load_weights leaves it at its
  # initial value), so with dropout a resumed epoch would draw other masks than an uninterrupted one.
  settings = dict(epochs=2, cells=("r0f0",), shuffle_buffer=1,
                  model=ModelConfig(image_size=SIZE, alpha=0.35, dropout_rate=0.0))
  straight = tiny_config(records_dir, tmp_path / "straight", **settings)
  trainer.run_grid(straight)
  resumed = tiny_config(records_dir, tmp_path / "resumed", **settings)
  assert trainer.run_grid(resumed, cell_callbacks=stop_after_first_epoch)["cells"] == {
      "r00_f00": "interrupted"}
  assert trainer.run_grid(resumed)["cells"] == {"r00_f00": "complete"}
  cell = os.path.join("cells", "r00_f00")
  expected, found = _final_weights(tmp_path / "straight" / cell), _final_weights(tmp_path / "resumed" / cell)
  assert len(expected) == len(found)
  for want, got in zip(expected, found):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  assert ((tmp_path / "resumed" / cell / "slice_predictions.csv").read_text()
          == (tmp_path / "straight" / cell / "slice_predictions.csv").read_text())


def test_a_runs_model_config_is_parsed_back_in_one_place():
  """ModelConfig.from_run reads what train_config.config_dict wrote, with overrides, and refuses unknown names."""
  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  written = trainer.config_dict(trainer.config_from_values(
      {"task": "p", "records_dir": "d", "output_dir": "o", "image_size": 40, "alpha": 0.5, "weights": "imagenet",
       "dropout_rate": 0.1}))
  parsed = model_lib.ModelConfig.from_run(written, weights="none")
  assert (parsed.image_size, parsed.alpha, parsed.weights, parsed.dropout_rate) == (40, 0.5, "none", 0.1)
  assert model_lib.ModelConfig.from_run(written).weights == "imagenet"
  with pytest.raises(ValueError, match="colour"):
    model_lib.ModelConfig.from_run({"model": {**written["model"], "colour": 1}})
