"""Tests for the pure helpers of benchmarks/demo_runs.py, benchmarks/export_benchmark.py and
benchmarks/keras_gpu_benchmark.py (no training; one tiny measurement on the CPU).

The expectations are written out by hand from the fake inputs, not computed with the code under test.
"""

import argparse
import math
import os

import pytest

from benchmark_loader import load_benchmark

demo_runs = load_benchmark("demo_runs")
export_benchmark = load_benchmark("export_benchmark")
keras_gpu_benchmark = load_benchmark("keras_gpu_benchmark")


def _summary_entry(per_cell_auc, pooled_auc, sensitivity, pci_auc, ascites_auc):
  """A summary.json[task] entry with the keys pdx_tf.evaluation writes (only those the script reads)."""
  return {
      "per_cell": {"auc": {"mean": per_cell_auc}, "sensitivity": {"mean": sensitivity},
                   "specificity": {"mean": 0.9}, "accuracy": {"mean": 0.75}},
      "per_repeat": {"auc": {"mean": pooled_auc}},
      "pooled_ci95": {"auc": {"estimate": pooled_auc, "low": 0.6, "high": 0.95}},
      "slice_level": {"per_cell": {"auc": {"mean": 0.7}}},
      "covariate_baselines": {"model_auc": {"estimate": pooled_auc},
                              "covariates": {"pci": {"auc": {"estimate": pci_auc}},
                                             "ascites": {"auc": {"estimate": ascites_auc}}}},
  }


def test_run_figures_reads_the_evaluation_summary_keys():
  figures = demo_runs.run_figures(
      _summary_entry(0.81, 0.82, 0.604, 0.89, 0.665), {"pipeline": 46.0, "training": 416.0, "evaluation": 1.0},
      {"ratio": 1.29, "probability_as_read": 0.676, "probability_erased": 0.372, "num_slices": 445})
  assert figures == {
      "wall_s.pipeline": 46.0, "wall_s.training": 416.0, "wall_s.evaluation": 1.0,
      "patient_auc.pooled": 0.82, "patient_auc.per_cell_mean": 0.81,
      "sensitivity.per_cell_mean": 0.604, "specificity.per_cell_mean": 0.9, "accuracy.per_cell_mean": 0.75,
      "slice_auc.per_cell_mean": 0.7, "baseline_auc.pci": 0.89, "baseline_auc.ascites": 0.665,
      "localisation.ratio": 1.29, "localisation.probability_as_read": 0.676,
      "localisation.probability_erased": 0.372}


def test_run_figures_without_localisation_or_with_undefined_values_gives_none():
  entry = _summary_entry(None, 0.5, 0.0, 0.7, 0.6)  # summary.json writes an undefined AUC as null
  del entry["covariate_baselines"]["covariates"]["ascites"]
  figures = demo_runs.run_figures(entry, {"training": 10.0}, None)
  assert figures["patient_auc.per_cell_mean"] is None
  assert figures["sensitivity.per_cell_mean"] == 0.0  # zero is a value, not a missing one
  assert "baseline_auc.ascites" not in figures
  assert figures["localisation.ratio"] is None and figures["localisation.probability_erased"] is None


def test_aggregate_gives_mean_and_range_over_runs_skipping_missing_values():
  runs = [{"auc": 0.8, "ratio": 1.2, "only_first": 3.0},
          {"auc": 0.7, "ratio": None},
          {"auc": 0.9, "ratio": 0.8}]
  result = demo_runs.aggregate(runs)
  assert result["auc"]["n"] == 3
  assert result["auc"]["mean"] == pytest.approx(0.8)
  assert (result["auc"]["min"], result["auc"]["max"]) == (0.7, 0.9)
  assert result["ratio"] == {"n": 2, "mean": pytest.approx(1.0), "min": 0.8, "max": 1.2}
  assert result["only_first"] == {"n": 1, "mean": 3.0, "min": 3.0, "max": 3.0}


def test_aggregate_of_a_figure_no_run_has_is_none():
  result = demo_runs.aggregate([{"ratio": None}, {"ratio": None}])
  assert result["ratio"] == {"n": 0, "mean": None, "min": None, "max": None}


def test_markdown_table_has_one_column_per_run_then_mean_and_range():
  runs = [{"patient_auc.pooled": 0.8, "localisation.ratio": 1.25},
          {"patient_auc.pooled": 0.6, "localisation.ratio": None}]
  table = demo_runs.markdown_table(runs, demo_runs.aggregate(runs)).splitlines()
  assert table[0] == "| measure | run 1 | run 2 | mean | range |"
  assert "| patient AUC, pooled out-of-fold | 0.800 | 0.600 | 0.700 | 0.600-0.800 |" in table
  assert "| Grad-CAM localisation ratio (1 = chance) | 1.25 | - | 1.25 | 1.25-1.25 |" in table
  assert len(table) == 4  # header, rule, two figures: rows of figures no run has are left out


def test_parse_overrides_reads_json_values_and_refuses_items_without_a_value():
  assert demo_runs.parse_overrides(["epochs=1", "learning_rate=2e-3", "aggregation=max", "jit_compile=false"]) == {
      "epochs": 1, "learning_rate": 0.002, "aggregation": "max", "jit_compile": False}
  with pytest.raises(ValueError, match="field=value"):
    demo_runs.parse_overrides(["epochs"])


def test_export_sizes_sum_each_part_of_a_version_folder(tmp_path):
  version = tmp_path / "1"
  (version / "variables").mkdir(parents=True)
  (version / "assets.extra" / "models").mkdir(parents=True)
  (version / "saved_model.pb").write_bytes(b"g" * 1000)
  (version / "variables" / "variables.data-00000-of-00001").write_bytes(b"w" * 5000)
  (version / "variables" / "variables.index").write_bytes(b"i" * 24)
  (version / "assets.extra" / "models" / "r00_f00.keras").write_bytes(b"k" * 700)
  (version / "assets.extra" / "pdx_export.json").write_bytes(b"{}" * 3)
  assert export_benchmark.export_sizes(str(version)) == {
      "graph": 1000, "weights": 5024, "keras_copies": 700, "total": 1000 + 5024 + 700 + 6}


def test_per_model_is_the_slope_between_one_and_k_models():
  # 1 model: 10 s; 4 models: 19 s -> 3 s a model and 7 s fixed.
  assert export_benchmark.per_model(10.0, 19.0, 4) == {"per_model": 3.0, "fixed": 7.0}
  with pytest.raises(ValueError, match="at least 2"):
    export_benchmark.per_model(10.0, 10.0, 1)


def test_summarize_reports_mib_per_model_and_seconds():
  mib = 1024 * 1024
  measured = {"num_models": 3,
              "sizes_1": {"graph": 2 * mib, "weights": 9 * mib, "keras_copies": 9 * mib, "total": 21 * mib},
              "sizes_k": {"graph": 5 * mib, "weights": 27 * mib, "keras_copies": 27 * mib, "total": 61 * mib},
              "export_s_1": 7.0, "export_s_k": 15.0, "load_s_1": 2.0, "load_s_k": 5.0, "keras_load_s_k": 3.0}
  figures = export_benchmark.summarize(measured)
  assert figures["mib_per_model"] == {"graph": 1.5, "weights": 9.0, "keras_copies": 9.0, "total": 20.0}
  assert figures["export_s"] == {"per_model": 4.0, "fixed": 3.0}
  assert figures["load_s"] == {"per_model": 1.5, "fixed": 0.5}
  assert figures["export_s_mean_per_model"] == 5.0 and figures["load_s_mean_per_model"] == pytest.approx(5 / 3)
  assert figures["keras_load_s_per_model"] == 1.0
  assert not any(math.isnan(value) for value in figures["mib_per_model"].values())


def test_run_once_runs_the_child_only_when_its_json_is_absent(tmp_path):
  out, counter = tmp_path / "result.json", tmp_path / "runs.txt"
  child = ("import json, sys; open(sys.argv[2], 'a').write('x'); json.dump({'value': 7}, open(sys.argv[1], 'w'))")
  args = ["-c", child, str(out), str(counter)]
  first = demo_runs._run_once(str(out), args, dict(os.environ), str(tmp_path / "log"), "wall")  # pylint: disable=protected-access
  again = demo_runs._run_once(str(out), args, dict(os.environ), str(tmp_path / "log"), "wall")  # pylint: disable=protected-access
  assert first["value"] == again["value"] == 7 and first["wall"] == again["wall"] >= 0.0
  assert counter.read_text() == "x"  # the second call read the JSON and ran nothing


def _gpu_args(**values):
  defaults = {"image_size": 224, "alpha": 1.0, "batch_size": 32, "seconds": 10.0, "jit": True}
  return argparse.Namespace(**{**defaults, **values})


def test_gpu_child_command_passes_switches_bare_and_overrides_the_defaults():
  overrides = {"precision": "mixed_bfloat16", "batch_size": 128, "fit": True, "joint": True}
  command = keras_gpu_benchmark._child_command(_gpu_args(), **dict(overrides))  # pylint: disable=protected-access
  options = command[command.index("--child") + 1:]
  assert sorted(options) == sorted(["--image_size=224", "--alpha=1.0", "--batch_size=128", "--seconds=10.0",
                                    "--precision=mixed_bfloat16", "--channels=3", "--fit", "--joint"])
  plain = keras_gpu_benchmark._child_command(_gpu_args(jit=False))  # pylint: disable=protected-access
  assert "--precision=float32" in plain and "--nojit" in plain
  assert not any(option.startswith(("--fit", "--joint")) for option in plain)


def test_gpu_measure_trains_the_pdx_model_and_counts_images_per_second():
  args = _gpu_args(image_size=32, alpha=0.35, batch_size=2, seconds=0.2, jit=False, precision="float32",
                   channels=3, joint=True, fit=False)
  record = keras_gpu_benchmark._measure(args)  # pylint: disable=protected-access
  # keras.applications.MobileNetV2(alpha=0.35, include_top=False) alone holds 410,208 weights at 3 channels;
  # + 2 heads of 1,280 features + 1 bias each.
  assert record["parameters"] == 410_208 + 2 * (1_280 + 1)
  assert record["steps"] >= 1 and record["seconds"] >= 0.2
  assert record["images_per_s"] == pytest.approx(record["steps"] * 2 / record["seconds"])
  assert record["joint"] and record["mode"] == "train_on_batch"
