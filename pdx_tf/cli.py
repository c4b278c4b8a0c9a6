"""What every binary shares: the one-line error exit and quiet TensorFlow start-up. (Flags stay in the binaries;
pdx_tf never reads them, except `quiet_tensorflow`'s look at --verbosity before flags are parsed.)

This module must not import TensorFlow: `quiet_tensorflow` runs before it loads.
"""

import os
import re
import sys
import tempfile
from typing import NoReturn, Sequence

LOG_LEVEL_VARIABLE = "TF_CPP_MIN_LOG_LEVEL"
QUIET_LOG_LEVEL = "3"  # Only fatal C++ messages: level 2 still prints "failed call to cuInit" on CPU machines.
# TensorFlow's C++ start-up lines (glog format) and absl's note that precedes them.
_CPP_LOG_LINE = re.compile(r"^[IW]\d{4} \d\d:\d\d:\d\d|^WARNING: All log messages before absl::InitializeLog\(\)")
_VERBOSITY_FLAG = re.compile(r"^--?(?:verbosity|v)(?:=(.*))?$")


def exit_with_error(program: str, message: object) -> NoReturn:
  """Prints `<program>: error: <message>` on one line to stderr and exits with status 1.

  Messages are folded to one line so a log line or a cluster job's status always holds the whole reason.
  """
  print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(1)


def requested_verbosity(argv: Sequence[str]) -> int:
  """The absl --verbosity / -v value in a raw argv (flags are not parsed yet), else 0.

  Accepts `--verbosity=N`, `--verbosity N`, `-v=N` and `-v N`; a value that is not an integer counts as 0
  (absl reports it when it parses the flags).
  """
  verbosity = 0
  for position, argument in enumerate(argv):
    if argument == "--":
      break
    match = _VERBOSITY_FLAG.match(argument)
    if not match:
      continue
    value = match.group(1)
    if value is None:
      value = argv[position + 1] if position + 1 < len(argv) else ""
    try:
      verbosity = int(value)
    except ValueError:
      verbosity = 0
  return verbosity


def quiet_tensorflow(argv: Sequence[str] | None = None) -> bool:
  """Keeps TensorFlow's C++ start-up lines off the console unless --verbosity >= 1 is asked for.

  Call it at the very top of a binary, before anything imports TensorFlow. Quiet (no --verbosity >= 1 in
  `argv`, default `sys.argv[1:]`): TF_CPP_MIN_LOG_LEVEL defaults to 3, and TensorFlow is imported here with
  the lines it logs while loading (absl logs them whatever the level, before its logging is initialised)
  filtered out of stderr; anything else printed then (an import error) is passed on. Verbose:
  TF_CPP_MIN_LOG_LEVEL defaults to 0, so worker processes, which inherit the environment, are verbose too.
  A TF_CPP_MIN_LOG_LEVEL already in the environment always wins.

  Returns:
    True when TensorFlow's C++ logging is quiet (level 2 or more).
  """
  argv = sys.argv[1:] if argv is None else argv
  level = os.environ.setdefault(LOG_LEVEL_VARIABLE, "0" if requested_verbosity(argv) >= 1 else QUIET_LOG_LEVEL)
  quiet = level.strip() in ("2", "3")
  if quiet and "tensorflow" not in sys.modules:
    _import_tensorflow_filtered()
  return quiet


def _import_tensorflow_filtered() -> None:
  """Imports TensorFlow with its C++ start-up lines removed from stderr (file descriptor 2)."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      kept = [line for line in captured.read().decode("utf-8", "replace").splitlines(keepends=True)
              if not _CPP_LOG_LINE.match(line)]
      if kept:
        sys.stderr.write("".join(kept))
        sys.stderr.flush()


def init_tensorflow_worker(intra_op_threads: int, inter_op_threads: int) -> None:
  """A CPU worker process's initialiser: no GPU, quiet start-up as in the parent, then a share of the cores.

  It lives here, in a module that does not import TensorFlow, so that a spawned worker runs it before
  TensorFlow loads.
  """
  # Workers only decode and write on the CPU: hiding the GPU keeps each of them from reserving GPU memory (and
  # a CUDA context) that training on the same machine needs. It must be set before TensorFlow loads.
  os.environ["CUDA_VISIBLE_DEVICES"] = ""
  quiet_tensorflow(argv=())
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  tf.config.threading.set_intra_op_parallelism_threads(intra_op_threads)
  tf.config.threading.set_inter_op_parallelism_threads(inter_op_threads)
