"""The installed front door: the `pdx-*` console scripts and where the flag files are.

`pip install .` installs the five binaries as packages (`python -m train` works from any folder) and, as console
scripts, `pdx-data-pipeline`, `pdx-train`, `pdx-evaluate`, `pdx-export` and `pdx-predict`: each runs the binary's
`__main__` exactly as `python -m <binary>` does (same flags, same exit status). The flag files (configs/*.flags)
and TF Serving configs are installed as data files under <prefix>/share/pdx-tf/configs/:

  python -m pdx_tf.console           # prints that folder (or the checkout's configs/ when run from a checkout)
  pdx-train --flagfile="$(python -m pdx_tf.console)/paper.flags" --task=p --records_dir=D --output_dir=R

Nothing here reads flags (the binaries do); this module does not import TensorFlow.
"""

from __future__ import annotations

import os
import runpy
import sys
import sysconfig

BINARIES = ("data_pipeline", "train", "evaluate", "export", "predict")
CONFIGS_SUBDIR = os.path.join("share", "pdx-tf", "configs")


def configs_dir() -> str:
  """The folder holding demo.flags, demo_sb.flags, paper.flags and serving/.

  Returns:
    <prefix>/share/pdx-tf/configs of this Python's installation when the package installed it there, else the
    checkout's configs/ (a source tree or an editable install).

  Raises:
    FileNotFoundError: neither exists (an install that dropped its data files).
  """
  checkout = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
  candidates = [os.path.join(sysconfig.get_path("data"), CONFIGS_SUBDIR), os.path.join(sys.prefix, CONFIGS_SUBDIR),
                checkout]
  for candidate in candidates:
    if os.path.isfile(os.path.join(candidate, "paper.flags")):
      return candidate
  raise FileNotFoundError("pdx-tf's flag files are not installed (looked in " + ", ".join(candidates) +
                          "): reinstall with `pip install .` from a checkout, or use the checkout's configs/")


def _run(binary: str) -> None:
  """Runs `python -m <binary>` in this process (sys.argv is passed on as it is)."""
  runpy.run_module(binary, run_name="__main__", alter_sys=True)


def data_pipeline() -> None:
  """`pdx-data-pipeline`: `python -m data_pipeline`."""
  _run("data_pipeline")


def train() -> None:
  """`pdx-train`: `python -m train`."""
  _run("train")


def evaluate() -> None:
  """`pdx-evaluate`: `python -m evaluate`."""
  _run("evaluate")


def export() -> None:
  """`pdx-export`: `python -m export`."""
  _run("export")


def predict() -> None:
  """`pdx-predict`: `python -m predict`."""
  _run("predict")


if __name__ == "__main__":
  print(configs_dir())
