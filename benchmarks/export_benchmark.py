"""Export size and time per model: graph, weights and Keras copies on disk; seconds to export and to load.

Examples:
  # The paper's model shape (224 px, alpha 1.0) on fake untrained cells (pdx_tf/testing/fake_cells.py): sizes and times do
  # not depend on training, only on the architecture and the number of models.
  python benchmarks/export_benchmark.py --fake_cells --image_size=224 --alpha=1.0 --num_models=3

  # Trained cells of a runs folder (default runs/demo/p, the demo's), the first --num_models of them.
  python benchmarks/export_benchmark.py --runs_dir=runs/demo/p --task=p --num_models=8

The cells are exported twice, as 1 model and as an ensemble of --num_models (`export.export_models`, what
`python -m export` runs), so the per-model cost is the slope between the two and the fixed cost is apart from it.
Sizes are read from the --num_models export: `saved_model.pb` (the serving graph), `variables/` (weights) and
`assets.extra/models/` (the cells' Keras copies that predict uses for Grad-CAM). Load time is
`tf.saved_model.load` of each export (what TF Serving and predict do), and the Keras copies' load apart.
Printed as a markdown table; --output_json writes the figures.

Measured: see benchmarks/README.md ("Export size and time").
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any, Mapping

from absl import app, flags, logging

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_RUNS_DIR = flags.DEFINE_string("runs_dir", "runs/demo/p", "Training output folder holding the cells to export.")
_TASK = flags.DEFINE_enum("task", "p", ["p", "sb"], "Task of --runs_dir's cells.")
_FAKE_CELLS = flags.DEFINE_bool("fake_cells", False, "Write --num_models fake untrained cells (pdx_tf/testing/fake_cells.py) "
                                "at --image_size/--alpha instead of reading --runs_dir.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Fake cells' input size.")
_ALPHA = flags.DEFINE_float("alpha", 1.0, "Fake cells' MobileNetV2 width multiplier.")
_NUM_MODELS = flags.DEFINE_integer("num_models", 3, "Models in the ensemble export (>= 2).")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "Folder for the fake cells and exports (default: a temporary one).")
_LOAD_ROUNDS = flags.DEFINE_integer("load_rounds", 2, "Load each export this many times and keep the fastest (the "
                                    "first load of a process pays one-off start-up costs).")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write the figures here.")

MIB = 1024.0 * 1024.0
GRAPH_FILE, WEIGHTS_FOLDER, KERAS_FOLDER = "saved_model.pb", "variables", os.path.join("assets.extra", "models")


def folder_bytes(path: str) -> int:
  """Bytes of every file below `path` (a file's own size if `path` is a file; 0 if it does not exist)."""
  if os.path.isfile(path):
    return os.path.getsize(path)
  return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


def export_sizes(version_dir: str) -> dict[str, int]:
  """{"graph", "weights", "keras_copies", "total"}: bytes of one export version folder's parts."""
  sizes = {"graph": folder_bytes(os.path.join(version_dir, GRAPH_FILE)),
           "weights": folder_bytes(os.path.join(version_dir, WEIGHTS_FOLDER)),
           "keras_copies": folder_bytes(os.path.join(version_dir, KERAS_FOLDER))}
  sizes["total"] = folder_bytes(version_dir)
  return sizes


def per_model(single: float, ensemble: float, num_models: int) -> dict[str, float]:
  """Splits a cost measured for 1 and for `num_models` models into {"per_model", "fixed"}.

  The per-model cost is the slope (ensemble - single) / (num_models - 1); the fixed cost is what one model costs
  beyond it. Raises ValueError if num_models < 2 (no slope).
  """
  if num_models < 2:
    raise ValueError(f"--num_models must be at least 2 to separate the per-model cost, not {num_models}")
  slope = (ensemble - single) / (num_models - 1)
  return {"per_model": slope, "fixed": single - slope}


def summarize(measured: Mapping[str, Any]) -> dict[str, Any]:
  """The figures from raw measurements.

  Args:
    measured: {"num_models", "sizes_1", "sizes_k" (export_sizes of the 1- and K-model exports), "export_s_1",
      "export_s_k", "load_s_1", "load_s_k", "keras_load_s_k"}.

  Returns:
    {"num_models", "mib_per_model": {graph, weights, keras_copies, total}, "export_s": {per_model, fixed},
     "load_s": {per_model, fixed}, "export_s_mean_per_model" and "load_s_mean_per_model" (the K-model export's
     time / K, fixed cost included), "keras_load_s_per_model", "measured": the raw measurements}.
  """
  k = measured["num_models"]
  mib = {part: per_model(measured["sizes_1"][part], measured["sizes_k"][part], k)["per_model"] / MIB
         for part in ("graph", "weights", "keras_copies", "total")}
  return {"num_models": k, "mib_per_model": mib,
          "export_s": per_model(measured["export_s_1"], measured["export_s_k"], k),
          "load_s": per_model(measured["load_s_1"], measured["load_s_k"], k),
          "export_s_mean_per_model": measured["export_s_k"] / k, "load_s_mean_per_model": measured["load_s_k"] / k,
          "keras_load_s_per_model": measured["keras_load_s_k"] / k, "measured": dict(measured)}


def markdown_table(figures: Mapping[str, Any]) -> str:
  """The summary as a markdown table (one row per figure)."""
  mib, k = figures["mib_per_model"], figures["num_models"]
  sizes_k = figures["measured"]["sizes_k"]
  rows = [("graph (`saved_model.pb`), MiB per model", f"{mib['graph']:.2f}"),
          ("weights (`variables/`), MiB per model", f"{mib['weights']:.2f}"),
          ("Keras copies (`assets.extra/models/`), MiB per model", f"{mib['keras_copies']:.2f}"),
          (f"whole export of {k} models, MiB", f"{sizes_k['total'] / MIB:.1f}"),
          ("export, s per model (+ fixed s)", f"{figures['export_s']['per_model']:.2f} "
                                              f"(+ {figures['export_s']['fixed']:.2f})"),
          (f"export of {k} models / {k}, s", f"{figures['export_s_mean_per_model']:.2f}"),
          ("`tf.saved_model.load`, s per model (+ fixed s)", f"{figures['load_s']['per_model']:.2f} "
                                                             f"(+ {figures['load_s']['fixed']:.2f})"),
          (f"`tf.saved_model.load` of {k} models / {k}, s", f"{figures['load_s_mean_per_model']:.2f}"),
          ("Keras copies' load, s per model", f"{figures['keras_load_s_per_model']:.2f}")]
  return "\n".join(["| measure | value |", "|---|---:|"] + [f"| {name} | {value} |" for name, value in rows])


def _cells(work_dir: str) -> tuple[list[str], str]:
  """(cell folders, task): fake cells written to work_dir, or the first --num_models of --runs_dir."""
  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel

  if _FAKE_CELLS.value:
    from pdx_tf.testing import fake_cells  # pylint: disable=import-outside-toplevel
    cells = tuple((0, fold) for fold in range(_NUM_MODELS.value))
    return fake_cells.write_fake_cells(os.path.join(work_dir, "runs"), "p", cells=cells,
                                       image_size=_IMAGE_SIZE.value, alpha=_ALPHA.value), "p"
  found = export.find_cells(_RUNS_DIR.value, _TASK.value)[:_NUM_MODELS.value]
  if len(found) < _NUM_MODELS.value:
    raise app.UsageError(f"{_RUNS_DIR.value} has {len(found)} complete {_TASK.value} cells, fewer than "
                         f"--num_models={_NUM_MODELS.value}; lower --num_models or pass --fake_cells")
  return [cell.folder for cell in found], _TASK.value


def measure(work_dir: str) -> dict[str, Any]:
  """Exports and loads 1 and --num_models models; returns summarize()'s input."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel

  folders, task = _cells(work_dir)
  measured: dict[str, Any] = {"num_models": len(folders)}
  for label, chosen in (("1", folders[:1]), ("k", folders)):
    started = time.perf_counter()
    version_dir = export.export_models(chosen, os.path.join(work_dir, f"X{label}"), task)
    measured[f"export_s_{label}"] = time.perf_counter() - started
    measured[f"sizes_{label}"] = export_sizes(version_dir)
    load_s = []
    for _ in range(max(1, _LOAD_ROUNDS.value)):
      started = time.perf_counter()
      tf.saved_model.load(version_dir)
      load_s.append(time.perf_counter() - started)
    measured[f"load_s_{label}"] = min(load_s)
    if label == "k":
      metadata = export.read_export(version_dir)[1]
      started = time.perf_counter()
      export.load_export_keras_models(version_dir, metadata)
      measured["keras_load_s_k"] = time.perf_counter() - started
  return measured


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _NUM_MODELS.value < 2:
    raise app.UsageError("--num_models must be at least 2 (the per-model cost is the slope from 1 model)")
  from pdx_tf import cli  # pylint: disable=import-outside-toplevel
  cli.quiet_tensorflow(argv)  # TensorFlow's C++ start-up lines off the console, as in the binaries
  logging.set_verbosity(logging.WARNING)  # SavedModel saving logs every renamed input at INFO
  started = time.time()
  if _WORK_DIR.value:
    os.makedirs(_WORK_DIR.value, exist_ok=True)
    figures = summarize(measure(_WORK_DIR.value))
  else:
    with tempfile.TemporaryDirectory(prefix="pdx-export-bench-") as work_dir:
      figures = summarize(measure(work_dir))
  source = (f"{figures['num_models']} fake cells at {_IMAGE_SIZE.value} px, alpha {_ALPHA.value:g}" if _FAKE_CELLS.value
            else f"{figures['num_models']} cells of {_RUNS_DIR.value}")
  figures["source"] = source
  figures["load_average"] = os.getloadavg()[0]
  print(f"Export of {source} (1 model, then {figures['num_models']}); {time.time() - started:.0f} s in all, "
        f"load average {figures['load_average']:.1f}")
  print(markdown_table(figures))
  print(f"raw output: {results_io.record_figures('export_benchmark', figures)}")
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as handle:
      json.dump(figures, handle, indent=2)


if __name__ == "__main__":
  app.run(main)
