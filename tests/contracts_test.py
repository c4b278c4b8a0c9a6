"""Tests for pdx_tf.contracts: one cell syntax, tasks, and what DatasetInfo hands on to the runs."""

import pytest

from pdx_tf import contracts
from pdx_tf.data import preprocess


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
  info = contracts.DatasetInfo(records_dir="D", document=document, dataset_hash="h", covariate_names=(),
                               patients={})
  assert info.preprocess == document["preprocess"]
  # Parsed once, typed: image_size has one holder.
  assert info.preprocess_config == preprocess.PreprocessConfig(image_size=48, windows=((40.0, 400.0),))
  assert info.image_size == 48
  assert info.region == {"region": {"lung_air_hu": -400.0}, "slice_spacing_mm": 5.0, "slice_thickness_mm": 5.0,
                         "min_slices": 8}


def _run_fields(**changes):
  fields = {"task": "p", "repeat": 2, "fold": 5, "split_hash": "s" * 64, "config": {"epochs": 1},
            "preprocess": {"image_size": 48}, "aggregation": "mean", "aggregation_top_k": 3,
            "region": {"slice_spacing_mm": 5.0}, "code_version": "x"}
  fields.update(changes)
  return fields


def test_run_document_round_trips_through_run_info(tmp_path):
  document = contracts.run_document(_run_fields())
  assert document["schema_version"] == contracts.RUN_SCHEMA_VERSION and document["status"] == "complete"
  path = tmp_path / "run.json"
  path.write_text(__import__("json").dumps(document))
  info = contracts.read_run_info(str(path))
  assert (info.task, info.cell, info.aggregation, info.aggregation_top_k) == ("p", (2, 5), "mean", 3)
  assert info.region == {"slice_spacing_mm": 5.0} and info.document == document


@pytest.mark.parametrize("changes, message", [
    ({"task": "x"}, "malformed"), ({"repeat": "two"}, "malformed"), ({"config": None, "split_hash": None}, None)])
def test_run_info_refuses_a_malformed_document(changes, message):
  fields = _run_fields(**changes)
  if message is None:  # missing fields: named
    del fields["config"], fields["split_hash"]
    message = "lacks split_hash, config"
  with pytest.raises(contracts.RunsError, match=message):
    contracts.run_document(fields)


def test_run_info_needs_a_complete_run_of_this_schema(tmp_path):
  document = contracts.run_document(_run_fields())
  with pytest.raises(contracts.RunsError, match="not complete"):
    contracts.RunInfo.from_document({**document, "status": "running"}, "R/run.json")
  with pytest.raises(contracts.RunsError, match="not a version-1 run.json"):
    contracts.RunInfo.from_document({**document, "schema_version": 0}, "R/run.json")
  with pytest.raises(contracts.RunsError, match="is missing"):
    contracts.read_run_info(str(tmp_path / "run.json"))


def _export_document(**changes):
  document = {"format": contracts.EXPORT_FORMAT, "schema_version": contracts.EXPORT_SCHEMA_VERSION, "task": "sb",
              "version": 3, "num_models": 8, "cells": [], "preprocess": {"image_size": 48}, "image_size": 48,
              "aggregation": "mean", "aggregation_top_k": 3, "signatures": ["serving_default"]}
  document.update(changes)
  return document


def test_export_info_types_the_metadata():
  info = contracts.ExportInfo.from_document(_export_document(threshold=0.31, region={"min_slices": 8}), "X")
  assert (info.task, info.version, info.num_models, info.image_size, info.threshold) == ("sb", 3, 8, 48, 0.31)
  assert info.region == {"min_slices": 8}
  assert contracts.ExportInfo.from_document(_export_document(), "X").threshold == 0.5  # no threshold recorded


@pytest.mark.parametrize("changes, message", [({"format": "other"}, "is not a pdx-tf-export manifest"),
                                              ({"schema_version": 9}, "schema_version 9"),
                                              ({"task": "q"}, "malformed"), ({"version": "v1"}, "malformed")])
def test_export_info_refuses_other_documents(changes, message):
  with pytest.raises(contracts.ExportError, match=message):
    contracts.ExportInfo.from_document(_export_document(**changes), "X/pdx_export.json")
  document = _export_document()
  del document["signatures"]
  with pytest.raises(contracts.ExportError, match="lacks signatures"):
    contracts.ExportInfo.from_document(document, "X/pdx_export.json")
