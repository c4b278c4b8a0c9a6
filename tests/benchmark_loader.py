"""Imports a script of benchmarks/ as a module, for tests of its helper functions."""

import importlib.util
import os
import sys

from absl import flags

BENCHMARKS = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))


def load_benchmark(name):
  """Imports benchmarks/<name>.py, then takes its flags off absl's global registry so the next script (with
  flags of the same names, e.g. --task) can be imported too; the helpers tested read no flags."""
  if BENCHMARKS not in sys.path:  # the scripts import their sibling results_io, as when run from benchmarks/
    sys.path.insert(0, BENCHMARKS)
  before = set(flags.FLAGS)
  spec = importlib.util.spec_from_file_location(name, os.path.join(BENCHMARKS, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  for flag_name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, flag_name)
  return module
