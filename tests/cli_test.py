"""Quiet binaries: no TensorFlow C++ start-up lines on the console unless --verbosity >= 1."""

import os
import re
import subprocess
import sys

import pytest

from pdx_tf import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOISE = re.compile(r"^[IWE]\d{4} |cuInit|oneDNN", re.MULTILINE)


def _run(args, **kwargs):
  env = {name: value for name, value in os.environ.items() if name != cli.LOG_LEVEL_VARIABLE}
  completed = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True,
                             timeout=300, check=False, **kwargs)
  return completed.returncode, completed.stdout + completed.stderr


@pytest.mark.parametrize("argv, expected", [
    ([], 0), (["--verbosity=1"], 1), (["-v", "2"], 2), (["--v=-1"], -1), (["--verbosity", "x"], 0),
    (["--verbosityx=3"], 0), (["--", "--verbosity=1"], 0), (["--output_dir=D", "-v=1"], 1)])
def test_requested_verbosity_reads_the_raw_argv(argv, expected):
  assert cli.requested_verbosity(argv) == expected


def test_a_binary_prints_no_tensorflow_start_up_lines():
  code, output = _run(["-m", "evaluate", "--runs_dir=/nonexistent/runs", "--output_dir=/nonexistent/out"])
  assert code == 1 and "evaluate: error:" in output  # it ran past TensorFlow's import and failed cleanly
  assert not NOISE.search(output), output


def test_verbosity_brings_the_start_up_lines_back():
  # The same call with --verbosity=1: TensorFlow's own start-up lines (at least the oneDNN or CUDA notice).
  code, output = _run(["-m", "evaluate", "--runs_dir=/nonexistent/runs", "--output_dir=/nonexistent/out",
                       "--verbosity=1"])
  assert code == 1 and NOISE.search(output), output


def test_spawned_workers_start_quietly():
  # A library caller with no TF_CPP_MIN_LOG_LEVEL that never loads TensorFlow itself: the worker initialiser
  # runs before the worker's task loads TensorFlow and runs an op.
  script = (
      "import concurrent.futures, multiprocessing, sys\n"
      "from pdx_tf import cli\n"
      "if __name__ == '__main__':\n"
      "  context = multiprocessing.get_context('spawn')\n"
      "  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context, initializer=cli.init_tensorflow_worker,"
      " initargs=(1, 1)) as pool:\n"
      "    pool.submit(exec, 'import tensorflow as tf; print(int(tf.reduce_sum(tf.constant([1, 2]))))').result()\n"
      "  print('tensorflow loaded:', 'tensorflow' in sys.modules)\n")
  code, output = _run(["-c", script])
  assert code == 0 and "3\n" in output and "tensorflow loaded: False" in output, output
  assert not NOISE.search(output), output
