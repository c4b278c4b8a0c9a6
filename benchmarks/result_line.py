"""One JSON line of a benchmark's raw output: code version, machine, command, date and figures.

`append_result_line(path, figures)` appends {"code_version": `git describe --always --dirty` of this checkout,
"machine": {"platform", "cpu_count"}, "command": the process's argv joined, "date": UTC ISO time, "figures"}
to `path` (a .jsonl under benchmarks/results/), NaN written as null.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def code_version() -> str:
  """`git describe --always --dirty` of the repository holding this file ("unknown" outside git)."""
  try:
    return subprocess.run(["git", "describe", "--always", "--dirty"], cwd=_REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def _json_safe(value):
  if isinstance(value, dict):
    return {str(key): _json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(item) for item in value]
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def append_result_line(path: str, figures: dict) -> dict:
  """Appends the line to `path` (folders made as needed); returns the line's dict."""
  line = {"code_version": code_version(),
          "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
          "command": " ".join(["python"] + sys.argv), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"), "figures": _json_safe(figures)}
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "a", encoding="utf-8") as stream:
    stream.write(json.dumps(line, sort_keys=True) + "\n")
  return line
