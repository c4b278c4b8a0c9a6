"""Tests of pdx_tf.training.trainer: a smoke run with every artifact, resume, determinism and bad-input errors.

All cells use the real MobileNetV2 at 32 px, alpha 0.35, on the tiny fake dataset of tests/fake_records.py.
The trainer keeps one compiled model per process, so only the first run pays for tracing the train step.
"""

import csv
import glob
import json
import os

import keras
import pytest
import tensorflow as tf

import fake_records
from pdx_tf import io_utils
from pdx_tf.errors import PdxError, RecordsError, RunsError
from pdx_tf.training import splits, trainer
from pdx_tf.training.model import ModelConfig

SIZE = 32
TINY_MODEL = ModelConfig(image_size=SIZE, alpha=0.35)


@pytest.fixture(scope="module")
def records_dir(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("records"))
  fake_records.write_fake_records(folder, num_patients=8, slices_per_patient=3, augment_factor=4, image_size=SIZE)
  return folder


def tiny_config(records_dir, output_dir, **overrides):
  values = dict(task="p", records_dir=records_dir, output_dir=str(output_dir), model=TINY_MODEL, num_folds=2,
                num_repeats=1, epochs=1, batch_size=8, pool_fraction=0.5, deterministic=True)
  values.update(overrides)
  return trainer.TrainConfig(**values)


def _read_csv(path):
  with open(path) as handle:
    return list(csv.DictReader(handle))


def _events(folder):
  for path in glob.glob(os.path.join(folder, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      yield from event.summary.value


def test_smoke_run_writes_every_artifact_and_is_idempotent(records_dir, tmp_path):
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
  for fold in range(2):
    cell = root / "cells" / f"r00_f{fold:02d}"
    run = json.loads((cell / "run.json").read_text())
    assert run["status"] == "complete" and (run["repeat"], run["fold"]) == (0, fold) and run["task"] == "p"
    assert run["split_hash"] == splits.split_hash(split)
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
  evaluation = pytest.importorskip("pdx_tf.evaluation")
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(
      runs_dir=str(root), output_dir=str(tmp_path / "E"), tasks=("p",), num_bootstrap=0))
  assert summary


class _StopAfterFirstEpoch(keras.callbacks.Callback):

  def on_epoch_end(self, epoch, logs=None):
    self.model.stop_training = True


class _RecordEpochs(keras.callbacks.Callback):

  def __init__(self):
    super().__init__()
    self.epochs = []

  def on_epoch_begin(self, epoch, logs=None):
    self.epochs.append(epoch)


def test_interrupted_cell_resumes_at_the_next_epoch(records_dir, tmp_path):
  config = tiny_config(records_dir, tmp_path / "R", epochs=2, cells=("r0f1",))
  result = trainer.run_grid(config, cell_callbacks=lambda cell: [_StopAfterFirstEpoch()])
  assert result["cells"] == {"r00_f01": "interrupted"}
  cell = tmp_path / "R" / "cells" / "r00_f01"
  progress = json.loads((cell / "progress.json").read_text())
  assert progress["epochs_completed"] == 1 and (cell / "checkpoint" / progress["checkpoint"]).exists()
  assert not (cell / "run.json").exists()
  recorder = _RecordEpochs()
  result = trainer.run_grid(config, cell_callbacks=lambda cell: [recorder])
  assert result["cells"] == {"r00_f01": "complete"}
  assert recorder.epochs == [1], "the rerun must continue at epoch 2 (index 1), not start over"
  metrics = json.loads((cell / "metrics.json").read_text())
  assert len(metrics["history"]) == 2 and metrics["history"][0] == progress["history"][0]
  assert metrics["images_seen"] > progress["images_seen"]
  assert (cell / "run.json").exists() and not (cell / "checkpoint").exists()


def test_same_seed_and_records_give_identical_predictions(records_dir, tmp_path):
  outputs = []
  for name in ("first", "second"):
    trainer.run_grid(tiny_config(records_dir, tmp_path / name, cells=("r0f0",)))
    outputs.append((tmp_path / name / "cells" / "r00_f00" / "slice_predictions.csv").read_text())
    assert (tmp_path / name / "splits.json").read_bytes() == (tmp_path / "first" / "splits.json").read_bytes()
  assert outputs[0] == outputs[1]


def _assert_nothing_trained(output_dir):
  assert not glob.glob(os.path.join(str(output_dir), "cells", "*"))


def test_records_of_another_schema_version(tmp_path):
  folder = str(tmp_path / "records")
  fake_records.write_fake_records(folder, num_patients=4, slices_per_patient=1, augment_factor=1, image_size=SIZE,
                                  schema_version=2)
  with pytest.raises(RecordsError, match="schema version 2"):
    trainer.run_grid(tiny_config(folder, tmp_path / "R"))
  _assert_nothing_trained(tmp_path / "R")


def test_image_size_that_does_not_match_the_model(records_dir, tmp_path):
  with pytest.raises(RecordsError, match="32 px images but the model expects 48 px"):
    trainer.run_grid(tiny_config(records_dir, tmp_path / "R", model=ModelConfig(image_size=48, alpha=0.35)))
  _assert_nothing_trained(tmp_path / "R")


def test_fold_whose_training_labels_are_one_class(records_dir, tmp_path):
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


def test_unwritable_output_dir(records_dir, tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(PdxError, match="not writable"):
    trainer.run_grid(tiny_config(records_dir, blocker / "R"))


def test_output_dir_of_another_configuration(records_dir, tmp_path):
  root = tmp_path / "R"
  io_utils.atomic_write_json(str(root / "config.json"),
                             __import__("pdx_tf.configs").configs.to_dict(tiny_config(records_dir, root).grid_config()))
  with pytest.raises(RunsError, match="seed differ"):
    trainer.run_grid(tiny_config(records_dir, root, seed=1))
  _assert_nothing_trained(root)


def test_output_dir_trained_on_other_records(records_dir, tmp_path):
  root = tmp_path / "R"
  io_utils.atomic_write_json(str(root / "records.json"), {"records_hash": "0" * 64})
  with pytest.raises(RunsError, match="trained on other records"):
    trainer.run_grid(tiny_config(records_dir, root))
  _assert_nothing_trained(root)


def test_export_waits_for_a_complete_grid(records_dir, tmp_path):
  from train import __main__ as train_main  # pylint: disable=import-outside-toplevel

  assert train_main.export_if_complete(str(tmp_path / "R"), "p", 1, 2, str(tmp_path / "X")) is None
  assert not (tmp_path / "X").exists()


def test_missing_imagenet_weights_fail_before_training(records_dir, tmp_path, monkeypatch):
  monkeypatch.setenv("KERAS_HOME", str(tmp_path / "empty_keras_home"))
  with pytest.raises(PdxError, match="ImageNet weights not found"):
    trainer.run_grid(tiny_config(records_dir, tmp_path / "R", model=ModelConfig(image_size=SIZE, alpha=0.35,
                                                                                  weights="imagenet")))
  _assert_nothing_trained(tmp_path / "R")


def test_config_validation_and_selected_cells():
  config = trainer.TrainConfig(task="p", records_dir="D", output_dir="R", num_folds=4, num_repeats=2, num_shards=3,
                                shard_index=1)
  assert config.selected_cells() == [(0, 1), (1, 0), (1, 3)]  # grid indices 1, 4, 7
  chosen = trainer.TrainConfig(task="p", records_dir="D", output_dir="R", num_folds=4, num_repeats=2,
                                cells=("r1f3", "r0f0"))
  assert chosen.selected_cells() == [(0, 0), (1, 3)]
  for bad in (dict(task="x"), dict(precision="float64"), dict(pool_fraction=1.5), dict(aggregation="median"),
              dict(num_folds=1), dict(shard_index=2, num_shards=2)):
    with pytest.raises(ValueError):
      trainer.TrainConfig(**{"task": "p", "records_dir": "D", "output_dir": "R", **bad})
  has_gpu = bool(tf.config.list_physical_devices("GPU"))
  assert trainer.resolve_precision("auto") == ("mixed_float16" if has_gpu else "float32")
  assert trainer.resolve_precision("mixed_bfloat16") == "mixed_bfloat16"
