"""What every binary shares: the one-line error exit. (Flags stay in the binaries; pdx_tf never reads them.)"""

import sys
from typing import NoReturn


def exit_with_error(program: str, message: object) -> NoReturn:
  """Prints `<program>: error: <message>` on one line to stderr and exits with status 1.

  Messages are folded to one line so a log line or a cluster job's status always holds the whole reason.
  """
  print(f"{program}: error: {' '.join(str(message).split())}", file=sys.stderr)
  sys.exit(1)
