"""Fixtures shared by the test files: tiny fake records, a tiny training config, and Keras callbacks.

Everything here is deliberately small: the real MobileNetV2 at 32 px, alpha 0.35, on pdx_tf/testing/fake_records.py
(8 patients x 3 slices x 4 augmented copies unless a test asks for more). A test file that needs other records
overrides `records_dir` locally with `fake_records_dir(...)`; one that needs other training defaults wraps
`tiny_config` in a local fixture of the same name.
"""

import os
import subprocess
import sys

import keras
import pytest

from pdx_tf.testing import fake_records
from pdx_tf.training import trainer
from pdx_tf.training.model import ModelConfig

TINY_IMAGE_SIZE = 32
TINY_MODEL = ModelConfig(image_size=TINY_IMAGE_SIZE, alpha=0.35)


@pytest.fixture(scope="session")
def fake_records_dir(tmp_path_factory):
  """A factory: (name="records", **write_fake_records overrides) -> a new folder of fake records at 32 px."""

  def write(name: str = "records", **overrides) -> str:
    folder = str(tmp_path_factory.mktemp(name))
    fake_records.write_fake_records(folder, **{"image_size": TINY_IMAGE_SIZE, **overrides})
    return folder

  return write


@pytest.fixture(scope="module")
def records_dir(fake_records_dir):
  """8 patients x 3 slices x 4 augmented copies at 32 px, written once per test module."""
  return fake_records_dir(num_patients=8, slices_per_patient=3, augment_factor=4)


@pytest.fixture(scope="session")
def tiny_config():
  """A factory: (records_dir, output_dir, **TrainConfig overrides) -> a 2-fold x 1-repeat, 1-epoch TrainConfig."""

  def build(records_dir, output_dir, **overrides) -> trainer.TrainConfig:
    values = dict(task="p", records_dir=records_dir, output_dir=str(output_dir), model=TINY_MODEL, num_folds=2,
                  num_repeats=1, epochs=1, batch_size=8, pool_fraction=0.5, deterministic=True)
    values.update(overrides)
    return trainer.TrainConfig(**values)

  return build


class StopAfterFirstEpoch(keras.callbacks.Callback):
  """Stops fit after the epoch it sees end: a cell interrupted right after a committed checkpoint."""

  def on_epoch_end(self, epoch, logs=None):
    self.model.stop_training = True


class RecordEpochs(keras.callbacks.Callback):
  """Records the index of every epoch fit begins (to see where a resumed cell starts)."""

  def __init__(self):
    super().__init__()
    self.epochs = []

  def on_epoch_begin(self, epoch, logs=None):
    self.epochs.append(epoch)


@pytest.fixture
def stop_after_first_epoch():
  """A `cell_callbacks` hook for trainer.run_grid that stops every cell after its first epoch."""
  return lambda cell: [StopAfterFirstEpoch()]


@pytest.fixture
def epoch_recorder():
  """A fresh RecordEpochs callback."""
  return RecordEpochs()


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A guard against a hung binary, not a speed check: on a loaded 2-core machine a binary's start (TensorFlow import,
# flag parsing) has taken over 120 s, and a test that checks an error message must not race it.
# PDX_TF_TEST_TIMEOUT_S overrides it.
BINARY_TIMEOUT_S = float(os.environ.get("PDX_TF_TEST_TIMEOUT_S", "1800"))


@pytest.fixture(scope="session")
def run_binary():
  """A function: (module, *args, env=None) -> CompletedProcess of `python -m module args` run in the repository.

  Text output is captured; the environment puts this checkout first on PYTHONPATH (not an installed copy).
  """

  def run(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, environment.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=BINARY_TIMEOUT_S, env=environment, check=False)

  return run
