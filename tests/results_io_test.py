"""benchmarks/results_io.py: one JSON line a run, and every figure-printing benchmark script writes one."""

import json
import os
import re

import pytest

from benchmark_loader import BENCHMARKS, load_benchmark

results_io = load_benchmark("results_io")

# The scripts that print figures quoted in benchmarks/README.md.
SCRIPTS = ("demo_runs", "export_benchmark", "mutation_benchmark", "oracle_benchmark", "localisation_benchmark",
           "model_variants", "budget_benchmark", "metrics_benchmark", "implants_benchmark",
           "conformal_benchmark", "regions_benchmark", "regions_oracle_benchmark")


def test_record_figures_appends_one_line_a_run(tmp_path, monkeypatch):
  monkeypatch.setenv(results_io.RESULTS_DIR_VARIABLE, str(tmp_path))
  first = results_io.record_figures("toy", {"auc": 0.75, "runs": [1, 2]}, argv=["benchmarks/toy.py", "--runs=2"])
  second = results_io.record_figures("toy", {"auc": float("nan")}, argv=["benchmarks/toy.py"])
  assert first == second == os.path.join(str(tmp_path), "toy.jsonl")
  with open(first, encoding="utf-8") as handle:
    lines = handle.read().splitlines()
  assert len(lines) == 2
  record = json.loads(lines[0])
  assert set(record) == {"code_version", "machine", "command", "date", "figures"}
  assert record["figures"] == {"auc": 0.75, "runs": [1, 2]}
  assert record["command"] == "python benchmarks/toy.py --runs=2"
  assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["date"])
  assert record["code_version"].startswith("0.1.0")  # pdx-tf's version (+ the checkout's commit)
  assert record["machine"]["cpus"] == os.cpu_count() and "node" not in record["machine"]  # no host name
  assert results_io.read_results("toy")[1]["figures"]["auc"] != results_io.read_results("toy")[1]["figures"]["auc"]


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_figure_script_records_its_figures(name):
  with open(os.path.join(BENCHMARKS, f"{name}.py"), encoding="utf-8") as handle:
    source = handle.read()
  main = source[source.index("\ndef main("):]
  assert "import results_io" in main and "results_io.record_figures(" in main, name


def test_committed_results_are_json_lines_with_the_fields():
  folder = os.path.join(BENCHMARKS, "results")
  for name in sorted(os.listdir(folder)):
    if not name.endswith(".jsonl") or name.startswith("keras_gpu_"):  # keras_gpu_*: the GPU script's own format
      continue
    with open(os.path.join(folder, name), encoding="utf-8") as handle:
      for line in handle:
        record = json.loads(line)
        assert {"code_version", "machine", "command", "date", "figures"} <= set(record), name
