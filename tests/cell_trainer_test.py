"""Tests of pdx_tf.training.cell_trainer (exact resume), the --plan budget, --cells_per_gpu and GPU-free workers.

Tiny: the real MobileNetV2 at 32 px, alpha 0.35, on pdx_tf/testing/fake_records.py. The subprocess tests are slow.
"""

import concurrent.futures
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from pdx_tf import cli, contracts, io_utils
from pdx_tf.testing import fake_records
from pdx_tf.training import cell_trainer, input_pipeline, splits, trainer

SIZE = 32
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(name="tiny_config", scope="session")
def two_epoch_first_cell_config(tiny_config):
  """The shared tiny config at 2 epochs, training only cell r0f0 unless overridden."""
  return lambda records_dir, output_dir, **overrides: tiny_config(
      records_dir, output_dir, **{"epochs": 2, "cells": ("r0f0",), **overrides})


def _predictions(root):
  return (root / "cells" / "r00_f00" / "slice_predictions.csv").read_bytes()


@pytest.fixture(scope="module")
def uninterrupted(records_dir, tmp_path_factory, tiny_config):
  root = tmp_path_factory.mktemp("uninterrupted")
  assert trainer.run_grid(tiny_config(records_dir, root))["cells"] == {"r00_f00": "complete"}
  return _predictions(root)


def test_uncommitted_checkpoint_is_redone_once_and_predictions_match(records_dir, tmp_path, uninterrupted, tiny_config,
                                                                     stop_after_first_epoch, epoch_recorder):
  config = tiny_config(records_dir, tmp_path)
  assert trainer.run_grid(config, cell_callbacks=stop_after_first_epoch)["cells"] == {"r00_f00": "interrupted"}
  cell = tmp_path / "cells" / "r00_f00"
  progress = json.loads((cell / "progress.json").read_text())
  assert progress["epochs_completed"] == 1 and progress["checkpoint"] == "epoch-0001.npz"
  # A kill between the checkpoint's rename and progress.json: epoch 2's file exists, progress still says 1.
  (cell / "checkpoint" / "epoch-0002.npz").write_bytes((cell / "checkpoint" / "epoch-0001.npz").read_bytes())
  recorder = epoch_recorder
  assert trainer.run_grid(config, cell_callbacks=lambda cell: [recorder])["cells"] == {"r00_f00": "complete"}
  assert recorder.epochs == [1], "epoch 2 did not commit, so it runs exactly once more; epoch 1 is not repeated"
  assert _predictions(tmp_path) == uninterrupted


def _dying_checkpoint_writes(monkeypatch, die_at: int) -> list:
  """Makes the `die_at`-th file write of a checkpoint (.npz) write half its bytes and raise, as a kill or a full disk
  would leave it, whatever name the file is written under; returns the list of names written."""
  real_gfile = tf.io.gfile.GFile
  written = []

  class DyingGFile(real_gfile):  # pylint: disable=too-few-public-methods

    def write(self, data):
      if "w" in self.mode and str(self.name).endswith(".npz"):
        written.append(str(self.name))
        if len(written) == die_at:
          super().write(data[:len(data) // 2])
          raise OSError("disk full (simulated)")
      return super().write(data)

  monkeypatch.setattr(tf.io.gfile, "GFile", DyingGFile)
  return written


def test_no_final_named_checkpoint_is_ever_partial(records_dir, tmp_path, uninterrupted, monkeypatch, tiny_config):
  """A checkpoint save that dies half-way (half the bytes written, then an error) must leave only a temp name
  behind: every final-named checkpoint loads whole, progress.json names a complete one, and the rerun ends on the
  uninterrupted predictions. Writing the checkpoint in place would leave a truncated epoch-0002.npz."""
  config = tiny_config(records_dir, tmp_path)
  with monkeypatch.context() as patch:
    written = _dying_checkpoint_writes(patch, die_at=2)  # epoch 2's checkpoint: epoch 1's is committed
    with pytest.raises(OSError, match="simulated"):
      trainer.run_grid(config)
  assert len(written) == 2
  cell = tmp_path / "cells" / "r00_f00"
  final_named = [path for path in (cell / "checkpoint").iterdir() if not io_utils.is_temp_path(str(path))]
  assert [path.name for path in final_named] == ["epoch-0001.npz"]
  for path in final_named:
    with np.load(path) as arrays:  # raises on a truncated archive
      assert all(arrays[name].size >= 0 for name in arrays.files)
  assert json.loads((cell / "progress.json").read_text())["checkpoint"] == "epoch-0001.npz"
  assert trainer.run_grid(config)["cells"] == {"r00_f00": "complete"}
  keras.models.load_model(cell / "model.keras")
  assert _predictions(tmp_path) == uninterrupted


def test_complete_progress_without_run_json_trains_nothing(records_dir, tmp_path, uninterrupted, monkeypatch,
                                                           tiny_config):
  config = tiny_config(records_dir, tmp_path)

  def killed(*args, **kwargs):
    raise KeyboardInterrupt("killed after the last epoch's commit")

  with monkeypatch.context() as patch:
    patch.setattr(cell_trainer, "_finish_cell", killed)
    with pytest.raises(KeyboardInterrupt):
      trainer.run_grid(config)
  cell = tmp_path / "cells" / "r00_f00"
  assert json.loads((cell / "progress.json").read_text())["epochs_completed"] == 2
  assert not (cell / "run.json").exists()

  def no_training(*args, **kwargs):
    raise AssertionError("a cell whose every epoch is committed must not train again")

  monkeypatch.setattr(keras.Model, "fit", no_training)
  assert trainer.run_grid(config)["cells"] == {"r00_f00": "complete"}
  assert _predictions(tmp_path) == uninterrupted


def test_adam_counts_the_steps_really_taken(records_dir, tmp_path, tiny_config):
  """The saved optimizer's step counter (Adam's bias correction reads it) equals the batches the cell's epochs
  hold, counted here by iterating each epoch's dataset: Keras' TensorFlow trainer adds one step to it at the end
  of every epoch of unknown length, which cell_trainer takes back."""
  config = tiny_config(records_dir, tmp_path / "R", epochs=3)
  assert trainer.run_grid(config)["cells"] == {"r00_f00": "complete"}
  info = contracts.load_dataset_info(records_dir)
  split = json.loads((tmp_path / "R" / "splits.json").read_text())
  train_ids, _ = splits.cell_patients(split, 0, 0)
  batches = sum(sum(1 for _ in cell_trainer.epoch_dataset(config, info, train_ids, (0, 0), epoch))
                for epoch in range(3))
  model = keras.saving.load_model(tmp_path / "R" / "cells" / "r00_f00" / "model.keras")
  assert batches >= 3 and int(model.optimizer.iterations.numpy()) == batches


def test_reseed_dropout_is_keyed_by_the_seed():
  inputs = keras.Input((4,))
  model = keras.Model(inputs, keras.layers.Dropout(0.5)(inputs))
  assert cell_trainer.reseed_dropout(model, 7) == 1
  first = model(np.ones((1, 64), np.float32)[:, :4], training=True).numpy()
  model(np.ones((1, 4), np.float32), training=True)  # advances the state
  cell_trainer.reseed_dropout(model, 7)
  np.testing.assert_array_equal(model(np.ones((1, 4), np.float32), training=True).numpy(), first)


def _train_command(records_dir, output_dir, *extra):
  return [sys.executable, "-m", "train", "--task=p", f"--records_dir={records_dir}", f"--output_dir={output_dir}",
          f"--image_size={SIZE}", "--alpha=0.35", "--num_folds=2", "--num_repeats=1", "--batch_size=8",
          "--pool_fraction=0.5", "--deterministic", *extra]


def _environment():
  return dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")


@pytest.mark.slow
def test_sigkill_mid_cell_then_rerun_gives_identical_predictions(records_dir, tmp_path):
  command = ["--epochs=3", "--cells=r0f0"]
  subprocess.run(_train_command(records_dir, tmp_path / "A", *command), check=True, cwd=REPO_ROOT,
                 env=_environment(), capture_output=True, timeout=600)
  killed = tmp_path / "B"
  progress = killed / "cells" / "r00_f00" / "progress.json"
  process = subprocess.Popen(_train_command(records_dir, killed, *command), cwd=REPO_ROOT, env=_environment(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and process.poll() is None:
    if progress.exists() and json.loads(progress.read_text())["epochs_completed"] >= 1:
      break
    time.sleep(0.05)
  assert process.poll() is None, "the run ended before it could be killed mid-cell"
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "cells" / "r00_f00" / "run.json").exists()
  subprocess.run(_train_command(records_dir, killed, *command), check=True, cwd=REPO_ROOT, env=_environment(),
                 capture_output=True, timeout=600)
  assert _predictions(killed) == _predictions(tmp_path / "A")


@pytest.mark.slow
def test_cells_per_gpu_runs_every_cell_of_the_shard(records_dir, tmp_path):
  result = subprocess.run(_train_command(records_dir, tmp_path, "--epochs=1", "--num_repeats=2",
                                         "--num_partitions=2", "--partition_index=1", "--cells_per_gpu=2"),
                          cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-2000:]
  # Shard 1 of 2 of a 2 x 2 grid (cells numbered repeat-major): cells 1 and 3, what a --cells_per_gpu=1 run trains.
  expected = {"r00_f01", "r01_f01"}
  found = {name for name in os.listdir(tmp_path / "cells") if (tmp_path / "cells" / name / "run.json").exists()}
  assert found == expected
  assert os.listdir(tmp_path / "cells") == sorted(expected) or set(os.listdir(tmp_path / "cells")) == expected


def test_plan_numbers_match_dataset_json(records_dir, tmp_path, tiny_config):
  config = tiny_config(records_dir, tmp_path, cells=(), num_repeats=3, num_partitions=2, partition_index=1, epochs=3,
                       images_per_epoch=20)
  plan = trainer.plan_grid(config, images_per_s=10.0)
  with open(os.path.join(records_dir, "dataset.json")) as handle:
    document = json.load(handle)
  per_cell = 3 * 16  # 3 epochs x 20 images rounded down to whole batches of 8
  assert plan["cells_all"] == 6 and plan["cells_partition"] == 3
  assert plan["images_all"] == 6 * per_cell and plan["images_partition"] == 3 * per_cell
  assert plan["records_bytes"] == sum(os.path.getsize(os.path.join(records_dir, shard["path"]))
                                      for shard in document["shards"])
  assert plan["hours_all"] == pytest.approx(6 * per_cell / 10.0 / 3600)
  # Bytes read: at most every training patient's shards once per pass, and more than nothing.
  split = splits.make_splits({entry["patient_id"]: entry["label_p"] for entry in document["patients"]}, task="p",
                             num_folds=2, num_repeats=3, seed=0)
  sizes = {shard["patient_id"]: 0 for shard in document["shards"]}
  for shard in document["shards"]:
    sizes[shard["patient_id"]] += shard["num_bytes"]
  info = contracts.load_dataset_info(records_dir)
  pool = {cell: input_pipeline.pool_size(info, splits.cell_patients(split, *cell)[0], sample_seed=0, repeat=cell[0],
                                         pool_fraction=0.5)
          for cell in [(r, f) for r in range(3) for f in range(2)]}
  ceiling = sum(3 * -(-16 // pool[cell]) * sum(sizes[p] for p in splits.cell_patients(split, *cell)[0])
                for cell in pool)
  assert 0 < plan["bytes_all"] <= ceiling
  assert not os.path.exists(tmp_path / "config.json"), "--plan writes nothing"


def test_plan_binary_and_bad_flags_fail_on_one_line(records_dir, tmp_path):
  result = subprocess.run(_train_command(records_dir, tmp_path / "R", "--epochs=3", "--images_per_epoch=20",
                                         "--plan", "--plan_images_per_s=10"),
                          cwd=REPO_ROOT, env=_environment(), capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert "cells: 2 in this partition, 2 in all" in result.stdout and "images: 96 in this partition" in result.stdout
  assert "given by --plan_images_per_s" in result.stdout and not (tmp_path / "R").exists()
  for bad, word in (("--pool_fraction=1.5", "pool_fraction"), ("--images_per_epoch=4", "images_per_epoch"),
                    ("--cells_per_gpu=0", "cells_per_gpu")):
    result = subprocess.run(_train_command(records_dir, tmp_path / "R", bad), cwd=REPO_ROOT, env=_environment(),
                            capture_output=True, text=True, timeout=300)
    errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
    assert result.returncode == 1 and len(errors) == 1 and word in errors[0], result.stderr[-1000:]
    assert not (tmp_path / "R").exists()


def test_pipeline_workers_see_no_gpu():
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=cli.init_tensorflow_worker,
                                              initargs=(1, 1)) as pool:
    assert pool.submit(os.getenv, "CUDA_VISIBLE_DEVICES").result(timeout=300) == ""
    assert pool.submit(tf.config.get_visible_devices, "GPU").result(timeout=300) == []


def test_load_progress_only_trusts_a_committed_checkpoint(tmp_path):
  folder = tmp_path / "cell"
  assert cell_trainer.load_progress(str(folder)) is None  # nothing yet: start from scratch
  (folder / "checkpoint").mkdir(parents=True)
  progress = {"epochs_completed": 1, "checkpoint": cell_trainer.checkpoint_name(1), "history": []}
  (folder / "progress.json").write_text(json.dumps(progress))
  assert cell_trainer.load_progress(str(folder)) is None  # it names epoch 1's file, which is missing
  (folder / "checkpoint" / "epoch-0001.npz").write_bytes(b"weights")
  assert cell_trainer.load_progress(str(folder)) == (progress, str(folder / "checkpoint" / "epoch-0001.npz"))
  (folder / "progress.json").write_text("{broken")
  assert cell_trainer.load_progress(str(folder)) is None  # unreadable: start over, never crash


def test_remove_other_checkpoints_keeps_the_named_ones(tmp_path):
  checkpoint = tmp_path / "checkpoint"
  checkpoint.mkdir()
  for name in ("epoch-0001.keras", "epoch-0002.keras", "epoch-0003.keras", ".tmp-abc-epoch-0004.keras"):
    (checkpoint / name).write_bytes(b"x")
  cell_trainer._remove_other_checkpoints(str(tmp_path), "epoch-0003.keras", "epoch-0001.keras")  # pylint: disable=protected-access
  assert sorted(os.listdir(checkpoint)) == ["epoch-0001.keras", "epoch-0003.keras"]
  assert cell_trainer.checkpoint_name(12) == "epoch-0012.npz"


def test_epoch_seeds_are_keyed_by_cell_and_epoch():
  seeds = {(init, epoch): cell_trainer.epoch_seed(init, epoch) for init in (1, 2, 3) for epoch in (0, 1, 2)}
  assert len(set(seeds.values())) == len(seeds)  # every (cell, epoch) its own dropout and shuffle seed
  assert all(0 <= seed < 2**31 for seed in seeds.values())
  assert cell_trainer.epoch_seed(2, 1) == seeds[(2, 1)]


def _trained_tiny_model(seed):
  model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="hidden"),
                            keras.layers.BatchNormalization(name="norm"), keras.layers.Dense(1, name="out")])
  model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  rng = np.random.default_rng(seed)
  model.fit(rng.normal(size=(16, 4)), rng.normal(size=(16, 1)), epochs=2, verbose=0)
  return model


def _state(model):
  return [np.array(variable.numpy()) for variable in list(model.variables) + list(model.optimizer.variables)]


@pytest.mark.parametrize("suffix", [".npz", ".keras"])
def test_checkpoint_restores_weights_moments_and_step_count(tmp_path, suffix):
  """A restored model equals the saved one in every weight, BatchNorm statistic and Adam variable (the .npz
  checkpoint, and a .keras checkpoint of an earlier version), and the next step moves both alike."""
  saved = _trained_tiny_model(0)
  path = str(tmp_path / f"epoch-0002{suffix}")
  if suffix == ".npz":
    cell_trainer.save_training_state(saved, path)
  else:
    saved.save(path)
  restored = _trained_tiny_model(1)  # same architecture, other weights and optimizer state
  assert any(not np.array_equal(a, b) for a, b in zip(_state(saved), _state(restored)))
  cell_trainer.restore_training_state(restored, path)
  for expected, actual in zip(_state(saved), _state(restored), strict=True):
    np.testing.assert_array_equal(actual, expected)
  assert int(restored.optimizer.iterations.numpy()) == int(saved.optimizer.iterations.numpy()) == 2
  x, y = np.ones((4, 4)), np.zeros((4, 1))
  saved.train_on_batch(x, y)
  restored.train_on_batch(x, y)
  for expected, actual in zip(_state(saved), _state(restored), strict=True):
    np.testing.assert_array_equal(actual, expected)


def test_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
  path = str(tmp_path / "epoch-0001.npz")
  cell_trainer.save_training_state(_trained_tiny_model(0), path)
  other = keras.Sequential([keras.Input((4,)), keras.layers.Dense(5), keras.layers.Dense(1)])
  other.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
  with pytest.raises(cell_trainer.RunsError, match="do not match") as caught:
    cell_trainer.restore_training_state(other, path)
  assert "\n" not in str(caught.value)
