"""The demo's figures over several runs: the README's main job (`python -m train --task=p`) N times, each in its
own folder, then the localisation benchmark on each, reported per run and as mean and range.

Examples:
  # The figures of benchmarks/README.md ("Demo main job"): 3 runs, about 10 minutes each on an idle 2-core box.
  python benchmarks/demo_runs.py --runs=3 --task=p --work_dir=/tmp/pdx-demo-runs \
      --output_json=/tmp/pdx-demo-runs/demo_runs.json

  # A quick check that the script works end to end (figures meaningless): 2 folds, 1 epoch, 1 run.
  python benchmarks/demo_runs.py --runs=1 --override=epochs=1 --override=num_folds=2 --work_dir=/tmp/pdx-demo-try

Each run is `pdx_tf.demo.run_demo(task, root=<work_dir>/run-<i>)` (what `python -m train --task=<task>` runs with
no --records_dir) in a fresh process, with PDX_TF_CACHE=<work_dir>/run-<i>/cache so the phantom cohort is written
afresh and the "pipeline" stage times the same work in every run (--shared_cache reuses one cache instead: then
only the first run writes the cohort). The demo is not deterministic (`--deterministic` is off for speed), which
is why its figures are reported over runs. After each run, unless --skip_localisation,
`benchmarks/localisation_benchmark.py --runs_dir=<root>/<task> --task=<task>` runs (its `run`, out-of-fold) in
another fresh process.

Figures per run, from <root>/evaluation/<task>/summary.json (pdx_tf.evaluation): wall time per stage
(pipeline, training, evaluation; localisation), the pooled out-of-fold patient AUC (pooled_ci95.auc.estimate;
one repeat, so the repeat's pooled AUC) and the mean per-cell patient AUC (per_cell.auc.mean), sensitivity,
specificity and accuracy at 0.5 (mean over cells), the mean per-cell slice AUC, the covariate baselines (each
covariate alone as the score: covariate_baselines.covariates.<column>.auc.estimate, e.g. pci and ascites), and
the Grad-CAM localisation ratio with the occlusion probabilities (as read, disease erased).

Output: a markdown table on stdout (one column per run, then mean and range); --output_json writes every run's
figures and the aggregate.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any, Mapping, Sequence

from absl import app, flags

_REPO = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_RUNS = flags.DEFINE_integer("runs", 3, "How many demo runs.")
_TASK = flags.DEFINE_enum("task", "p", ["p", "sb"], "The demo's task.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/pdx-demo-runs", "Each run goes to <work_dir>/run-<i>; a run "
                                "folder that already holds a result is reused, not rerun.")
_SKIP_LOCALISATION = flags.DEFINE_bool("skip_localisation", False, "Do not run the localisation benchmark.")
_SHARED_CACHE = flags.DEFINE_bool("shared_cache", False, "One phantom cache (<work_dir>/cache) for all runs "
                                  "instead of one per run.")
_OVERRIDE = flags.DEFINE_multi_string("override", [], "field=value: a TrainConfig field changed from the demo "
                                      "preset (value read as JSON, else as text), e.g. epochs=1, num_folds=2. "
                                      "Changes the figures: for checking the script only.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write every run's figures and the aggregate here.")

# (key in a run's figures, row label, format); the keys are run_figures' output.
ROWS: tuple[tuple[str, str, str], ...] = (
    ("wall_s.pipeline", "wall: phantom cohort + data pipeline, s", "{:.0f}"),
    ("wall_s.training", "wall: training, s", "{:.0f}"),
    ("wall_s.evaluation", "wall: evaluation, s", "{:.0f}"),
    ("wall_s.demo_process", "wall: whole demo process, s", "{:.0f}"),
    ("wall_s.localisation", "wall: localisation benchmark, s", "{:.0f}"),
    ("patient_auc.pooled", "patient AUC, pooled out-of-fold", "{:.3f}"),
    ("patient_auc.per_cell_mean", "patient AUC, mean over cells", "{:.3f}"),
    ("sensitivity.per_cell_mean", "sensitivity at 0.5, mean over cells", "{:.3f}"),
    ("specificity.per_cell_mean", "specificity at 0.5, mean over cells", "{:.3f}"),
    ("accuracy.per_cell_mean", "accuracy at 0.5, mean over cells", "{:.3f}"),
    ("slice_auc.per_cell_mean", "slice AUC, mean over cells", "{:.3f}"),
    ("baseline_auc.pci", "PCI alone as the score, AUC", "{:.3f}"),
    ("baseline_auc.ascites", "ascites grade alone as the score, AUC", "{:.3f}"),
    ("localisation.ratio", "Grad-CAM localisation ratio (1 = chance)", "{:.2f}"),
    ("localisation.probability_as_read", "disease slices' probability, as read", "{:.3f}"),
    ("localisation.probability_erased", "the same, disease filled with fat", "{:.3f}"),
)

_DEMO_SNIPPET = """
import json, sys
from pdx_tf import demo
root, task, overrides, out = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
result = demo.run_demo(task, root=root, progress=False, **overrides)
with open(out, "w", encoding="utf-8") as handle:
  json.dump({"wall_time_s": result["wall_time_s"], "evaluation_dir": result["evaluation_dir"],
             "output_dir": result["output_dir"]}, handle)
"""

_LOCALISATION_SNIPPET = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("localisation_benchmark", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
result = module.run(None, sys.argv[2], sys.argv[3], None, 8, 0)
with open(sys.argv[4], "w", encoding="utf-8") as handle:
  json.dump(result, handle)
"""


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """["epochs=1", "model_name=x"] -> {"epochs": 1, "model_name": "x"}: values as JSON when they parse, else text.

  Raises ValueError for an item without "=".
  """
  overrides = {}
  for item in items:
    name, separator, text = item.partition("=")
    if not separator or not name.strip():
      raise ValueError(f"--override={item!r} is not field=value; write e.g. --override=epochs=1")
    try:
      overrides[name.strip()] = json.loads(text)
    except ValueError:
      overrides[name.strip()] = text
  return overrides


def _get(mapping: Mapping[str, Any] | None, *keys: str) -> float | None:
  """mapping[k1][k2]... as a float, or None where a key is missing or the value is null/NaN."""
  value: Any = mapping
  for key in keys:
    if not isinstance(value, Mapping) or key not in value:
      return None
    value = value[key]
  if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
    return None
  return float(value)


def run_figures(summary_entry: Mapping[str, Any], wall_s: Mapping[str, float],
                localisation: Mapping[str, Any] | None) -> dict[str, float | None]:
  """One run's figures, flat (the keys of ROWS).

  Args:
    summary_entry: summary.json[task] written by pdx_tf.evaluation.
    wall_s: stage -> seconds (pipeline, training, evaluation, demo_process and, if run, localisation).
    localisation: localisation_benchmark.run's result, or None when it was skipped.

  Returns:
    key -> value (None where the summary or the localisation does not have it).
  """
  figures: dict[str, float | None] = {f"wall_s.{stage}": float(seconds) for stage, seconds in wall_s.items()}
  figures["patient_auc.pooled"] = _get(summary_entry, "pooled_ci95", "auc", "estimate")
  figures["patient_auc.per_cell_mean"] = _get(summary_entry, "per_cell", "auc", "mean")
  for metric in ("sensitivity", "specificity", "accuracy"):
    figures[f"{metric}.per_cell_mean"] = _get(summary_entry, "per_cell", metric, "mean")
  figures["slice_auc.per_cell_mean"] = _get(summary_entry, "slice_level", "per_cell", "auc", "mean")
  covariates = (summary_entry.get("covariate_baselines") or {}).get("covariates") or {}
  for column in covariates:
    figures[f"baseline_auc.{column}"] = _get(covariates, column, "auc", "estimate")
  for key in ("ratio", "probability_as_read", "probability_erased"):
    figures[f"localisation.{key}"] = _get(localisation, key) if localisation is not None else None
  return figures


def aggregate(runs: Sequence[Mapping[str, float | None]]) -> dict[str, dict[str, Any]]:
  """Mean and range over runs of every figure.

  Args:
    runs: run_figures' outputs.

  Returns:
    key -> {"n": runs with a value, "mean", "min", "max"} (None where no run has a value), for every key of any
    run, sorted.
  """
  keys = sorted({key for run in runs for key in run})
  result = {}
  for key in keys:
    values = [run[key] for run in runs if run.get(key) is not None]
    result[key] = {"n": len(values), "mean": sum(values) / len(values) if values else None,
                   "min": min(values) if values else None, "max": max(values) if values else None}
  return result


def markdown_table(runs: Sequence[Mapping[str, float | None]], summary: Mapping[str, Mapping[str, Any]]) -> str:
  """Rows of ROWS (and any other figure found), one column per run, then mean and range."""
  def show(value, style):
    return "-" if value is None else style.format(value)

  known = {key for key, _, _ in ROWS}
  extra = [(key, key, "{:.3f}") for key in summary if key not in known]
  header = ["measure"] + [f"run {index + 1}" for index in range(len(runs))] + ["mean", "range"]
  lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
  for key, label, style in list(ROWS) + extra:
    if key not in summary:
      continue
    entry = summary[key]
    spread = ("-" if entry["min"] is None else f"{show(entry['min'], style)}-{show(entry['max'], style)}")
    cells = [show(run.get(key), style) for run in runs] + [show(entry["mean"], style), spread]
    lines.append(f"| {label} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _python(args: Sequence[str], env: Mapping[str, str], log_path: str) -> float:
  """Runs `python <args>` from the repository root, output to log_path; returns its wall seconds."""
  started = time.time()
  with open(log_path, "w", encoding="utf-8") as log:
    completed = subprocess.run([sys.executable, *args], cwd=_REPO, env=dict(env), stdout=log,
                               stderr=subprocess.STDOUT, check=False)
  if completed.returncode:
    raise RuntimeError(f"{' '.join(args[:2])} failed (exit {completed.returncode}); see {log_path}")
  return time.time() - started


def _run_once(json_path: str, args: Sequence[str], env: Mapping[str, str], log_path: str,
              seconds_key: str) -> dict[str, Any]:
  """The JSON a `python <args>` child writes to json_path, with its wall seconds under `seconds_key`; the child
  runs only when json_path is absent, so a rerun of the benchmark resumes after its finished steps."""
  if not os.path.exists(json_path):
    seconds = _python(args, env, log_path)
    with open(json_path, encoding="utf-8") as handle:
      result = json.load(handle)
    result[seconds_key] = seconds
    with open(json_path, "w", encoding="utf-8") as handle:
      json.dump(result, handle)
  with open(json_path, encoding="utf-8") as handle:
    return json.load(handle)


def one_run(root: str, task: str, overrides: Mapping[str, Any], cache_dir: str,
            skip_localisation: bool) -> dict[str, float | None]:
  """Runs (or reuses) the demo in `root`, then the localisation benchmark; returns run_figures' result."""
  os.makedirs(root, exist_ok=True)
  env = {**os.environ, "PDX_TF_CACHE": cache_dir, "PYTHONPATH": _REPO}
  demo_json, localisation_json = os.path.join(root, "demo_result.json"), os.path.join(root, "localisation.json")
  demo_result = _run_once(demo_json, ["-c", _DEMO_SNIPPET, root, task, json.dumps(dict(overrides)), demo_json], env,
                          os.path.join(root, "demo.log"), "demo_process_s")
  wall_s = {**demo_result["wall_time_s"], "demo_process": demo_result["demo_process_s"]}
  localisation = None
  if not skip_localisation:
    script = os.path.join(_REPO, "benchmarks", "localisation_benchmark.py")
    args = ["-c", _LOCALISATION_SNIPPET, script, demo_result["output_dir"], task, localisation_json]
    localisation = _run_once(localisation_json, args, env, os.path.join(root, "localisation.log"), "wall_s")
    wall_s["localisation"] = localisation["wall_s"]
  with open(os.path.join(demo_result["evaluation_dir"], "summary.json"), encoding="utf-8") as handle:
    summary = json.load(handle)
  return run_figures(summary[task], wall_s, localisation)


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _RUNS.value < 1:
    raise app.UsageError("--runs must be at least 1")
  try:
    overrides = parse_overrides(_OVERRIDE.value)
  except ValueError as error:
    raise app.UsageError(str(error)) from None
  work_dir = os.path.abspath(_WORK_DIR.value)
  runs = []
  for index in range(_RUNS.value):
    root = os.path.join(work_dir, f"run-{index + 1}")
    cache_dir = os.path.join(work_dir, "cache") if _SHARED_CACHE.value else os.path.join(root, "cache")
    started = time.time()
    print(f"run {index + 1} of {_RUNS.value} in {root} ...", flush=True)
    try:
      runs.append(one_run(root, _TASK.value, overrides, cache_dir, _SKIP_LOCALISATION.value))
    except RuntimeError as error:
      print(f"demo_runs: error: {error}", file=sys.stderr)
      sys.exit(1)
    print(f"run {index + 1} done in {time.time() - started:.0f} s", flush=True)
  summary = aggregate(runs)
  print(f"\nDemo task {_TASK.value}, {len(runs)} run(s)" + (f", overrides {overrides}" if overrides else "")
        + f"; load average now {os.getloadavg()[0]:.1f}")
  print(markdown_table(runs, summary))
  figures = {"task": _TASK.value, "overrides": overrides, "runs": runs, "aggregate": summary}
  print(f"raw output: {results_io.record_figures(f'demo_runs_{_TASK.value}', figures)}")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as handle:
      json.dump(figures, handle, indent=2)


if __name__ == "__main__":
  app.run(main)
