"""Tests for pdx_tf.presets: one table, the flagfiles agree with it, one override path that refuses what it ignores."""

import json
import os
import subprocess
import sys

import pytest

from pdx_tf import presets
from pdx_tf.training import trainer

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse(lines):
  """Flag lines -> {name: value}, read as absl would: --x / --nox booleans, numbers as numbers."""
  values = {}
  for line in lines:
    name, _, text = line[2:].partition("=")
    if not _:
      values[name[2:] if name.startswith("no") and name[2:] in presets.TRAIN_PRESETS["paper"] else name] = (
          not name.startswith("no") or name[2:] not in presets.TRAIN_PRESETS["paper"])
      continue
    for kind in (int, float):
      try:
        values[name] = kind(text)
        break
      except ValueError:
        continue
    else:
      values[name] = text
  return values


@pytest.mark.parametrize("name", ["paper", "demo", "demo_sb"])
def test_flagfiles_hold_the_table(name):
  with open(os.path.join(REPO_ROOT, "configs", f"{name}.flags"), encoding="utf-8") as handle:
    lines = [line.strip() for line in handle if line.strip() and not line.lstrip().startswith("#")]
  assert _parse(lines) == presets.TRAIN_PRESETS[name]
  assert _parse(presets.flag_lines(presets.TRAIN_PRESETS[name])) == presets.TRAIN_PRESETS[name]


def test_flag_lines_spell_booleans_and_numbers_as_absl_reads_them():
  assert presets.flag_lines({"include_originals": True, "deterministic": False, "learning_rate": 1e-4,
                             "image_size": 224, "weights": "imagenet"}) == [
      "--include_originals", "--nodeterministic", "--learning_rate=0.0001", "--image_size=224",
      "--weights=imagenet"]


def test_apply_takes_the_preset_then_the_given_flags():
  defaults = {"epochs": 20, "image_size": None, "seed": 0}
  assert presets.apply({"epochs": 5, "image_size": 48}, defaults, {}) == {"epochs": 5, "image_size": 48, "seed": 0}
  assert presets.apply({"epochs": 5, "image_size": 48}, defaults, {"epochs": 7}) == {
      "epochs": 7, "image_size": 48, "seed": 0}


def test_apply_refuses_what_the_run_would_ignore():
  with pytest.raises(ValueError, match=r"--num_partitions is not used here; run on records"):
    presets.apply({}, {"epochs": 1}, {"num_partitions": 2}, refused=("num_partitions",), why="run on records")
  with pytest.raises(ValueError, match="the preset sets bogus"):
    presets.apply({"bogus": 1}, {"epochs": 1}, {})


def test_every_preset_builds_a_train_config():
  for name, row in presets.TRAIN_PRESETS.items():
    training = {key: value for key, value in row.items() if key not in presets.DEMO_ONLY_FLAGS}
    config = trainer.config_from_values({"task": "p", "records_dir": "D", "output_dir": "R", **training})
    assert config.task == row.get("task", "p")
    assert config.model.image_size == row["image_size"] == presets.PIPELINE_PRESETS[name]["image_size"]
    assert config.model.alpha == row["alpha"] and config.epochs == row["epochs"]
  with pytest.raises(ValueError, match="not training settings: colour"):
    trainer.config_from_values({"task": "p", "records_dir": "D", "output_dir": "R", "colour": 1})


def test_the_demo_refuses_a_flag_it_would_ignore_before_any_work(tmp_path):
  result = subprocess.run([sys.executable, "-m", "train", "--task=p", "--num_partitions=2"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PDX_TF_CACHE=str(tmp_path)))
  errors = [line for line in result.stderr.splitlines() if line.startswith("train: error:")]
  assert result.returncode == 1 and len(errors) == 1, result.stderr[-2000:]
  assert "--num_partitions is not used here" in errors[0] and "--records_dir" in errors[0]
  assert not os.listdir(tmp_path), "nothing was built"


def test_absl_reads_the_demo_sb_flagfile_as_the_row():
  """The train binary's own flags, parsed by absl from configs/demo_sb.flags, hold the demo_sb row."""
  row = presets.TRAIN_PRESETS["demo_sb"]
  script = ("import json, sys\nfrom absl import flags\nfrom train import __main__ as binary\n"
            "flags.FLAGS(['train', '--flagfile=configs/demo_sb.flags'])\n"
            f"print(json.dumps({{name: flags.FLAGS[name].value for name in {sorted(row)!r}}}))\n")
  result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  assert json.loads(result.stdout.splitlines()[-1]) == row
  assert row["task"] == "p,sb" and row["demo_patients"] == 120 and row["image_size"] == 96
  assert presets.PIPELINE_PRESETS["demo_sb"] == {**presets.PIPELINE_PRESETS["demo"], "image_size": 96}
