"""A copy of the checkout's packaging inputs in a temporary folder, so builds (build/, *.egg-info, sdists) made by
tests never touch the worktree."""

import os
import shutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BINARIES = ("data_pipeline", "train", "evaluate", "export", "predict")
SOURCES = ("setup.cfg", "setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "CONTRACTS.md", "configs", "pdx_tf",
           *BINARIES)


def copy_sources(destination) -> str:
  """Copies what a build reads into `destination` (created if missing); returns it as a string."""
  os.makedirs(destination, exist_ok=True)
  for name in SOURCES:
    source = os.path.join(REPO, name)
    if os.path.isdir(source):
      shutil.copytree(source, os.path.join(destination, name), ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
      shutil.copy(source, destination)
  return str(destination)
