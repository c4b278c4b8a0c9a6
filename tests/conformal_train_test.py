"""`train --conformal_alpha` alone is enough: the config, run.json, the log line, and evaluate re-deriving the sets."""

import dataclasses
import json
import logging
import os

import pytest

from pdx_tf import evaluation
from pdx_tf.testing import fake_records
from pdx_tf.training import trainer
from pdx_tf.training.model import ModelConfig

SIZE = 32


def test_config_takes_validates_and_records_the_alpha():
  config = trainer.config_from_values(dict(task="p", records_dir="d", output_dir="o", image_size=SIZE,
                                           conformal_alpha=0.1))
  assert config.conformal_alpha == 0.1 and config.model.alpha == 1.0  # --alpha stays MobileNetV2's width
  assert trainer.config_dict(config)["conformal_alpha"] == 0.1
  assert "conformal_alpha" not in trainer.config_dict(trainer.config_from_values(
      dict(task="p", records_dir="d", output_dir="o", image_size=SIZE)))  # a default grid's files are unchanged
  # The sets put each cell's scores on its model's scale, fitted on inner patients: the alpha alone sets them aside.
  assert config.inner_fraction == trainer.CONFORMAL_INNER_FRACTION == 0.2
  assert trainer.config_from_values(dict(task="p", records_dir="d", output_dir="o", image_size=SIZE,
                                         conformal_alpha=0.1, inner_fraction=0.3)).inner_fraction == 0.3
  for bad in (1.0, -0.1, 2):
    with pytest.raises(ValueError, match="conformal_alpha"):
      trainer.config_from_values(dict(task="p", records_dir="d", output_dir="o", image_size=SIZE,
                                      conformal_alpha=bad))


def test_a_grid_trained_with_the_alpha_is_evaluated_at_it_and_at_another(tmp_path, caplog):
  records = str(tmp_path / "records")
  fake_records.write_fake_records(records, num_patients=8, slices_per_patient=3, augment_factor=4, image_size=SIZE)
  config = trainer.TrainConfig(task="p", records_dir=records, output_dir=str(tmp_path / "runs"),
                               model=ModelConfig(image_size=SIZE, alpha=0.35), num_folds=2, num_repeats=1, epochs=1,
                               batch_size=8, pool_fraction=0.5, deterministic=True, conformal_alpha=0.3)
  # absl's logger by name: a binary run earlier in the process may have left absl's verbosity above INFO.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    trainer.run_grid(config)
  lines = [record.getMessage() for record in caplog.records if "conformal_alpha" in record.getMessage()]
  assert len(lines) == 1 and "unscaled: no inner patients" in lines[0]  # a config built without config_from_values
  for cell in ("r00_f00", "r00_f01"):
    run = json.load(open(os.path.join(config.output_dir, "cells", cell, "run.json")))
    assert run["config"]["conformal_alpha"] == 0.3
  # A rerun with another alpha reuses the grid (the alpha changes what is derived, not the models).
  trainer.run_grid(dataclasses.replace(config, conformal_alpha=0.2))
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=config.output_dir,
                                                               output_dir=str(tmp_path / "e"), num_bootstrap=0))
  assert summary["p"]["conformal"]["alpha"] == 0.3 and summary["p"]["conformal"]["n_rows"] == 8
  summary = evaluation.evaluate_runs(evaluation.EvaluateConfig(runs_dir=config.output_dir,
                                                               output_dir=str(tmp_path / "f"), num_bootstrap=0,
                                                               conformal_alpha=0.45))
  assert summary["p"]["conformal"]["alpha"] == 0.45
