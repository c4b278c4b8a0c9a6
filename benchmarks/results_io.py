"""Every benchmark figure keeps its raw output: one JSON line a run, appended under benchmarks/results/.

    from results_io import record_figures   # benchmarks/ is the script's own folder, so this import works
    record_figures("demo_runs", figures)     # after the script printed them

Each line is {"code_version", "machine", "command", "date", "figures"}: the pdx-tf version and git commit the
figures were measured with, the machine (host-independent: OS, CPU count, Python, TensorFlow, GPUs seen; never the
host name), the command line as typed, the UTC date, and the script's figures as it printed them. The file is
benchmarks/results/<name>.jsonl (append-only: earlier runs stay, a re-run adds a line). benchmarks/README.md
quotes these files. `--results_file` style overrides are the scripts' own; PDX_TF_RESULTS_DIR moves the folder
(tests point it at a temporary one).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shlex
import sys
from typing import Any, Mapping, Sequence

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
RESULTS_DIR_VARIABLE = "PDX_TF_RESULTS_DIR"


def machine() -> dict[str, Any]:
  """What the figures ran on: OS, CPU count and load, Python, TensorFlow and the GPUs TensorFlow sees (if loaded)."""
  info: dict[str, Any] = {"os": platform.system(), "arch": platform.machine(), "cpus": os.cpu_count(),
                          "python": platform.python_version()}
  if hasattr(os, "getloadavg"):
    info["load_average_1min"] = round(os.getloadavg()[0], 2)  # the shared development box: say how loaded it was
  tensorflow = sys.modules.get("tensorflow")  # not imported here: a benchmark that never loads TF stays light
  if tensorflow is not None:
    info["tensorflow"] = tensorflow.__version__
    info["gpus"] = [device.name for device in tensorflow.config.list_physical_devices("GPU")]
  return info


def code_version() -> str:
  """pdx-tf's `<version>+g<commit>[.dirty]` (pdx_tf.provenance), or "unknown" outside a checkout."""
  try:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from pdx_tf import provenance  # pylint: disable=import-outside-toplevel
    return provenance.code_version()
  except ImportError:
    return "unknown"
  finally:
    sys.path.pop(0)


def results_path(name: str) -> str:
  """benchmarks/results/<name>.jsonl (or under $PDX_TF_RESULTS_DIR)."""
  return os.path.join(os.environ.get(RESULTS_DIR_VARIABLE, RESULTS_DIR), f"{name}.jsonl")


def json_safe(value: Any) -> Any:
  """`value` with every non-finite float replaced by None (written as null), in nested dicts and lists."""
  if isinstance(value, Mapping):
    return {str(key): json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [json_safe(item) for item in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def record_figures(name: str, figures: Mapping[str, Any], argv: Sequence[str] | None = None,
                   path: str | None = None) -> str:
  """Appends one JSON line for this run's `figures` to results_path(name), or to `path`; returns the path.

  Args:
    name: the benchmark's name (its file name without .py, or with a suffix such as "demo_runs_sb").
    figures: what the script printed, JSON-serialisable (NaN is written as NaN, which json.loads reads; pass
      `json_safe(figures)` for null).
    argv: the command (default sys.argv: the script path and its flags).
    path: another .jsonl to append to (a script's --output_jsonl); default results_path(name).
  """
  argv = list(sys.argv if argv is None else argv)
  line = {"code_version": code_version(), "machine": machine(), "command": shlex.join(["python", *argv]),
          "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
          "figures": figures}
  path = path or results_path(name)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as handle:  # one write of one line: concurrent appends stay whole lines
    handle.write(json.dumps(line, sort_keys=True, default=str) + "\n")
  return path


def read_results(name: str) -> list[dict[str, Any]]:
  """Every recorded run of `name`, oldest first."""
  path = results_path(name)
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as handle:
    return [json.loads(line) for line in handle if line.strip()]
