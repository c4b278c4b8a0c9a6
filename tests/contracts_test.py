"""Tests for pdx_tf.contracts: one cell syntax, tasks, and what DatasetInfo hands on to the runs."""

import pytest

from pdx_tf import augmentations, conformal, contracts, settings
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
  # Typed once: the study-reading settings and the augmentation (absent: the defaults, no copies).
  assert info.region_settings == settings.RegionSettings(config=settings.RegionConfig(lung_air_hu=-400.0),
                                                         slice_spacing_mm=5.0, slice_thickness_mm=5.0, min_slices=8)
  assert info.augment_settings == settings.AugmentSettings()


def test_dataset_info_types_the_augmentation_once():
  document = {"preprocess": {"image_size": 48}, "augment_factor": 8, "augment_block": 2, "seed": 3,
              "augment": {"rotation_max_deg": 20.0, "flip_probability": 0.3, "scale_min": 0.8, "scale_max": 1.2}}
  info = contracts.DatasetInfo(records_dir="D", document=document, dataset_hash="h", covariate_names=(),
                               patients={})
  assert info.augment_settings == settings.AugmentSettings(
      config=augmentations.AugmentConfig(rotation_max_deg=20.0, flip_probability=0.3, scale_min=0.8,
                                         scale_max=1.2), augment_factor=8, augment_block=2, seed=3)
  assert info.augment == {**document["augment"], "augment_factor": 8, "augment_block": 2, "seed": 3}
  for bad in ({"rotation_max_deg": 200.0}, {"shear": 0.1}):
    with pytest.raises(ValueError, match="rotation_max_deg|unknown AugmentConfig keys: shear"):
      settings.augment_settings_from_document({**document, "augment": bad})
  with pytest.raises(ValueError, match="augment_block must be >= 1"):
    settings.augment_settings_from_document({**document, "augment_block": -1})


def test_load_dataset_info_refuses_unusable_augmentation_or_region_settings(fake_records_dir):
  import json  # pylint: disable=import-outside-toplevel

  folder = fake_records_dir(num_patients=2, slices_per_patient=1, augment_factor=1)
  path = f"{folder}/{contracts.DATASET_FILE}"
  original = json.load(open(path))
  for key, value, message in (("augment", {"flip_probability": 2.0}, "augmentation settings this code cannot use"),
                              ("config", {"region": {"leg_area_fraction": 0.9}, "min_slices": 8},
                               "region settings this code cannot use")):
    with open(path, "w") as stream:
      json.dump({**original, key: value}, stream)
    with pytest.raises(contracts.RecordsError, match=message):
      contracts.load_dataset_info(folder)


def _run_fields(**changes):
  fields = {"task": "p", "repeat": 2, "fold": 5, "split_hash": "s" * 64, "config": {"epochs": 1},
            "preprocess": {"image_size": 48}, "aggregation": "mean", "aggregation_top_k": 3,
            "region": {"slice_spacing_mm": 5.0}, "code_version": "x"}
  fields.update(changes)
  return fields


def test_run_info_types_the_region_settings_once():
  recorded = {"region": {"min_body_area_cm2": 300.0}, "slice_spacing_mm": 0.0, "slice_thickness_mm": 5.0,
              "min_slices": 4}
  info = contracts.RunInfo.from_document(contracts.run_document(_run_fields(region=recorded)), "R/run.json")
  assert info.region_settings == settings.RegionSettings(
      config=settings.RegionConfig(min_body_area_cm2=300.0), slice_spacing_mm=0.0, slice_thickness_mm=5.0,
      min_slices=4)
  # A run.json without the rule (written before run.json carried it): no typed settings, export falls back.
  assert contracts.RunInfo.from_document(contracts.run_document(_run_fields()), "R/run.json").region_settings is None
  with pytest.raises(contracts.RunsError, match="R/run.json has invalid region settings"):
    contracts.RunInfo.from_document({"schema_version": contracts.RUN_SCHEMA_VERSION, "status": "complete",
                                     **_run_fields(region={**recorded, "min_slices": 0})}, "R/run.json")


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
              "version": 3, "num_models": 8, "cells": [], "preprocess": {"image_size": 48},
              "aggregation": "mean", "aggregation_top_k": 3, "signatures": ["serving_default"]}
  document.update(changes)
  return document


def test_export_info_types_the_metadata():
  info = contracts.ExportInfo.from_document(_export_document(threshold=0.31, region={"min_slices": 8}), "X")
  assert (info.task, info.version, info.num_models, info.image_size, info.threshold) == ("sb", 3, 8, 48, 0.31)
  assert info.region == {"min_slices": 8}
  assert info.region_settings == settings.RegionSettings(min_slices=8)
  assert contracts.ExportInfo.from_document(_export_document(), "X").threshold == 0.5  # no threshold recorded


def test_export_info_reads_the_image_size_from_preprocess_and_old_exports_too():
  # An export written before the size had one holder: image_size at the top level as well (equal).
  old = _export_document(image_size=48)
  assert contracts.ExportInfo.from_document(old, "X").image_size == 48
  with pytest.raises(contracts.ExportError, match="image_size 64 but its preprocess says 48"):
    contracts.ExportInfo.from_document(_export_document(image_size=64), "X/pdx_export.json")
  assert "image_size" not in contracts.EXPORT_REQUIRED_FIELDS


def test_export_info_types_the_region_settings_once():
  region = {"config": {"lung_air_fraction": 0.1}, "slice_spacing_mm": 5.0, "slice_thickness_mm": 2.5,
            "min_slices": 6, "source": "run.json"}
  info = contracts.ExportInfo.from_document(_export_document(region=region), "X")
  assert info.region_settings == settings.RegionSettings(config=settings.RegionConfig(lung_air_fraction=0.1),
                                                         slice_spacing_mm=5.0, slice_thickness_mm=2.5, min_slices=6)
  assert info.region_settings.load_abdomen_arguments() == {
      "config": settings.RegionConfig(lung_air_fraction=0.1), "slice_spacing_mm": 5.0, "min_slices": 6,
      "slice_thickness_mm": 2.5}
  # An export without region settings reads studies with the pipeline's defaults; no thickness: the reader's.
  assert contracts.ExportInfo.from_document(_export_document(), "X").region_settings.load_abdomen_arguments() == {
      "config": settings.RegionConfig(), "slice_spacing_mm": None, "min_slices": 8}
  for bad in ({**region, "min_slices": 0}, {**region, "config": {"lung_air_hu": 5.0}}, {**region, "spacing": 1}):
    with pytest.raises(contracts.ExportError, match="X/pdx_export.json has a malformed field"):
      contracts.ExportInfo.from_document(_export_document(region=bad), "X/pdx_export.json")


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


def test_export_info_types_the_conformal_thresholds_once():
  stored = {"alpha": 0.1, "negative_max_score": 0.7, "positive_max_score": 0.6, "num_negative": 20,
            "num_positive": 12, "calibration_probabilities": [0.1, 0.9], "calibration_labels": [0, 1]}
  info = contracts.ExportInfo.from_document(_export_document(conformal=stored), "X")
  assert info.conformal_thresholds == conformal.ConformalThresholds(alpha=0.1, negative_max_score=0.7,
                                                                    positive_max_score=0.6, num_negative=20,
                                                                    num_positive=12)
  assert contracts.ExportInfo.from_document(_export_document(), "X").conformal_thresholds is None
  with pytest.raises(contracts.ExportError, match="X/pdx_export.json has a malformed field.*negative_max_score"):
    contracts.ExportInfo.from_document(_export_document(conformal={"alpha": 0.1}), "X/pdx_export.json")
