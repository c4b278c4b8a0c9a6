"""Where an artifact came from: the code version, recorded in every manifest."""

from __future__ import annotations

import functools
import os
import subprocess

import pdx_tf


@functools.lru_cache(maxsize=1)
def code_version() -> str:
  """`<package version>+g<git commit>[.dirty]` when run from a git checkout, else the package version."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(pdx_tf.__file__)))
  try:
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                            text=True, timeout=5, check=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, timeout=5, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return pdx_tf.__version__
  return f"{pdx_tf.__version__}+g{commit}{'.dirty' if dirty else ''}"
