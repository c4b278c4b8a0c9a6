"""The export carries the cells' inner-validation threshold and calibration (pdx_tf.serving.export)."""

import os
import shutil

import pytest

from pdx_tf import io_utils
from pdx_tf.serving import export, predict
from pdx_tf.testing import fake_cells


def test_export_metadata_threshold_is_the_mean_of_the_cells_and_lists_calibration(tmp_path_factory, tmp_path):
  paths = fake_cells.shared_fake_exports(tmp_path_factory)
  default = io_utils.read_json(os.path.join(paths["p_ensemble"], "assets.extra", "pdx_export.json"))
  assert "threshold" not in default and "calibration" not in default  # cells without their own threshold
  assert predict.operating_threshold(default) == 0.5
  runs_dir = str(tmp_path / "runs")
  shutil.copytree(paths["runs_dir"], runs_dir)
  folders = [fake_cells.cell_folder(runs_dir, "p", 0, fold) for fold in (0, 1)]
  cell_settings = [(0.25, {"method": "platt", "slope": 1.5, "intercept": -0.2}),
                   (0.4, {"method": "platt", "slope": 0.8, "intercept": 0.1})]
  for folder, (threshold, calibration) in zip(folders, cell_settings):
    run = io_utils.read_json(os.path.join(folder, "run.json"))
    run.update(threshold=threshold, threshold_rule="inner_youden", calibration=calibration)
    io_utils.atomic_write_json(os.path.join(folder, "run.json"), run)
  version_dir = export.export_models(folders, str(tmp_path / "X"), "p")
  metadata = io_utils.read_json(os.path.join(version_dir, "assets.extra", "pdx_export.json"))
  assert metadata["threshold"] == pytest.approx((0.25 + 0.4) / 2)
  assert predict.operating_threshold(metadata) == pytest.approx(0.325)  # what predict's `predicted` uses
  assert metadata["threshold_rule"]["rules"] == ["inner_youden"] and metadata["threshold_rule"]["cells"] == [0.25, 0.4]
  assert [entry["parameters"] for entry in metadata["calibration"]["cells"]] == [c for _, c in cell_settings]
  assert metadata["calibration"]["methods"] == ["platt"]
