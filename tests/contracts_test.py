"""Tests for pdx_tf.contracts: one cell syntax, tasks, and what DatasetInfo hands on to the runs."""

import pytest

from pdx_tf import contracts


@pytest.mark.parametrize("text, cell", [("r03_f07", (3, 7)), ("r3f7", (3, 7)), ("r0_f0", (0, 0)),
                                        (" r12f1 ", (12, 1)), ("r1", None), ("f1r2", None), ("r1-f2", None),
                                        ("r1_f", None), ("", None)])
def test_parse_cell_name_accepts_both_forms_only(text, cell):
  assert contracts.parse_cell_name(text) == cell


def test_cell_name_round_trips_and_names_the_folder():
  for cell in [(0, 0), (3, 7), (23, 7), (101, 12)]:
    assert contracts.parse_cell_name(contracts.cell_name(cell)) == cell
  assert contracts.cell_name((3, 7)) == "r03_f07"
  assert contracts.cell_folder("R", (3, 7)) == "R/cells/r03_f07"


def test_check_task():
  assert [contracts.check_task(task) for task in ("p", "sb")] == ["p", "sb"]
  with pytest.raises(ValueError, match="tasks are p, sb"):
    contracts.check_task("P")


def test_dataset_info_hands_on_preprocess_and_region_settings():
  document = {"preprocess": {"image_size": 48, "windows": [[40.0, 400.0]]},
              "config": {"region": {"lung_air_hu": -400.0}, "slice_spacing_mm": 5.0, "slice_thickness_mm": 5.0,
                         "min_slices": 8, "augment_factor": 8, "output_dir": "ignored"}}
  info = contracts.DatasetInfo(records_dir="D", document=document, dataset_hash="h", image_size=48,
                               covariate_names=(), patients={})
  assert info.preprocess == document["preprocess"]
  assert info.region == {"region": {"lung_air_hu": -400.0}, "slice_spacing_mm": 5.0, "slice_thickness_mm": 5.0,
                         "min_slices": 8}
