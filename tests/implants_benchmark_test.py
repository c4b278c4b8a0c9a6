"""Tests for the pure pieces of benchmarks/implants_benchmark.py and its raw-output line.

Expectations are written by hand (the AUC as the share of correctly ordered positive/negative pairs).
"""

import json
import os
import sys

import numpy as np
import pytest

from pdx_tf.errors import PdxError

from benchmark_loader import BENCHMARKS, load_benchmark

implants = load_benchmark("implants_benchmark")
sys.path.insert(0, BENCHMARKS)
import results_io  # pylint: disable=wrong-import-position


def _write_cell(folder, rows):
  os.makedirs(folder)
  with open(os.path.join(folder, "slice_predictions.csv"), "w", encoding="utf-8") as stream:
    stream.write("patient_id,slice_index,label,probability\n")
    for patient_id, index, label, probability in rows:
      stream.write(f"{patient_id},{index},{label},{probability}\n")


def test_held_out_slices_gathers_each_patients_cell(tmp_path):
  _write_cell(tmp_path / "r00_f00" / "p", [("a", 0, 1, 0.2), ("a", 1, 1, 0.9), ("b", 0, 0, 0.1)])
  _write_cell(tmp_path / "r00_f01" / "p", [("c", 0, 0, 0.4), ("c", 1, 0, 0.3), ("c", 2, 0, 0.35)])
  slices = implants.held_out_slices(str(tmp_path))
  assert sorted(slices) == ["a", "b", "c"]
  np.testing.assert_allclose(slices["a"], [0.2, 0.9])
  np.testing.assert_allclose(slices["c"], [0.4, 0.3, 0.35])


def test_a_patient_held_out_twice_is_refused(tmp_path):
  _write_cell(tmp_path / "r00_f00", [("a", 0, 1, 0.2)])
  _write_cell(tmp_path / "r01_f00", [("a", 0, 1, 0.3)])
  with pytest.raises(PdxError, match="held out by two cells"):
    implants.held_out_slices(str(tmp_path))
  with pytest.raises(PdxError, match="did not finish"):
    implants.held_out_slices(str(tmp_path / "empty"))


def test_auc_is_the_share_of_ordered_pairs_and_the_ci_brackets_it():
  labels = np.array([1, 1, 1, 0, 0, 0, 0])
  scores = np.array([0.9, 0.5, 0.3, 0.4, 0.2, 0.1, 0.5])
  # pairs (pos, neg): 0.9 beats all 4; 0.5 beats 0.4, 0.2, 0.1 and ties 0.5 (half); 0.3 beats 0.2, 0.1 -> 9.5/12
  result = implants.auc_with_ci(labels, scores, 200, 0)
  assert np.isclose(result["auc"], 9.5 / 12)
  assert result["n"] == 7 and result["positives"] == 3
  low, high = result["ci95"]
  assert 0.0 <= low <= result["auc"] <= high <= 1.0 and low < high
  assert implants.auc_with_ci(labels, scores, 0, 0)["ci95"] is None
  assert implants.auc_with_ci(labels, scores, 200, 0)["ci95"] == result["ci95"]  # keyed: the same CI


def test_settings_parse_as_json_else_text():
  assert implants.parse_settings(["image_size=96", "aggregation=topk_mean", "include_originals=true"]) == {
      "image_size": 96, "aggregation": "topk_mean", "include_originals": True}
  with pytest.raises(ValueError, match="flag=value"):
    implants.parse_settings(["image_size"])


def test_output_jsonl_line_holds_version_machine_command_and_figures(tmp_path):
  """--output_jsonl: results_io appends to the given path, NaN written as null through json_safe."""
  path = tmp_path / "results" / "x.jsonl"
  results_io.record_figures("x", results_io.json_safe({"auc": 0.5, "missing": float("nan")}), path=str(path))
  results_io.record_figures("x", results_io.json_safe({"auc": 0.6}), path=str(path))
  lines = [json.loads(line) for line in path.read_text().splitlines()]
  assert len(lines) == 2
  assert lines[0]["figures"] == {"auc": 0.5, "missing": None} and lines[1]["figures"] == {"auc": 0.6}
  assert lines[0]["machine"]["cpus"] == os.cpu_count() and lines[0]["command"].startswith("python")
  assert lines[0]["code_version"] and "T" in lines[0]["date"]
