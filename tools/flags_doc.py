"""Writes docs/flags.md, the flag reference of the five binaries, from their absl flag definitions.

  python tools/flags_doc.py --write     # regenerate docs/flags.md after adding or changing a flag
  python tools/flags_doc.py --check     # exit 1 if docs/flags.md differs from the flags (what the test runs)
  python tools/flags_doc.py             # print the page

Each binary is imported in its own Python process (their flags share names, e.g. --output_dir, so they cannot be
defined in one registry) and only the flags its __main__ module defines are listed, in definition order, with the
type, default (absl's text of it) and help string as `python -m <binary> --help` prints them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLAGS_MD = os.path.join(REPO, "docs", "flags.md")
BINARIES = ("data_pipeline", "train", "evaluate", "export", "predict")
REGENERATE = "python tools/flags_doc.py --write"
# Defaults computed from the machine at import: the page states the rule, so it is the same on every machine.
MACHINE_DEPENDENT_DEFAULTS = {("data_pipeline", "num_workers"): "min(CPU count, 4)"}

# Runs in the child: imports <binary>.__main__ (without running it) and prints its flags as JSON.
_DUMP = r"""
import importlib, json, sys
from absl import flags
name = sys.argv[1] + ".__main__"
module = importlib.import_module(name)
defined = flags.FLAGS.flags_by_module_dict().get(name, [])
rows = []
for flag in defined:
  values = getattr(getattr(flag, "parser", None), "enum_values", None)
  rows.append({"name": flag.name, "type": flag.flag_type(), "default": flag.default_as_str,
               "help": flag.help, "enum": list(values) if values else None,
               "boolean": bool(getattr(flag, "boolean", False))})
doc = (module.__doc__ or "").strip().split("\n", 1)[0]
print(json.dumps({"summary": doc, "flags": rows}))
"""


def _flags_of(binary: str) -> dict:
  environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
                     TF_CPP_MIN_LOG_LEVEL="3")
  completed = subprocess.run([sys.executable, "-c", _DUMP, binary], cwd=REPO, env=environment, capture_output=True,
                             text=True, timeout=600, check=False)
  if completed.returncode != 0:
    raise RuntimeError(f"importing {binary}/__main__.py failed: {completed.stderr.strip().splitlines()[-1:]}")
  return json.loads(completed.stdout.strip().splitlines()[-1])


def _cell(text: str) -> str:
  return " ".join(str(text).split()).replace("|", "\\|")


def render() -> str:
  """The text of docs/flags.md."""
  out = ["# Flag reference", "", *textwrap.wrap(
         "Generated from the binaries' absl flags by `tools/flags_doc.py`; do not edit by hand. After changing a "
         f"flag, run `{REGENERATE}` (tests/flags_doc_test.py fails while this page differs from the flags). "
         "`python -m <binary> --help` prints the same; `--helpfull` adds absl's own flags (`--verbosity`, "
         "`--flagfile`, ...). Every binary also reads flags from a file: `--flagfile=configs/paper.flags` "
         "(installed copies: `python -m pdx_tf.console` prints their folder).", width=116), ""]
  for binary in BINARIES:
    found = _flags_of(binary)
    out += [f"## `python -m {binary}` (`pdx-{binary.replace('_', '-')}`)", "", _cell(found["summary"]), "",
            "| flag | type | default | help |", "|---|---|---|---|"]
    for flag in found["flags"]:
      kind = "one of " + ", ".join(f"`{value}`" for value in flag["enum"]) if flag["enum"] else flag["type"]
      name = f"`--[no]{flag['name']}`" if flag["boolean"] else f"`--{flag['name']}`"
      default = flag["default"]
      if (binary, flag["name"]) in MACHINE_DEPENDENT_DEFAULTS:
        default = MACHINE_DEPENDENT_DEFAULTS[(binary, flag["name"])]
      elif default is None:
        default = "unset"
      else:  # absl quotes it ('2', 'abdomen'); the table's code span is quote enough
        default = default[1:-1] if len(default) >= 2 and default[0] == default[-1] == "'" else default
        default = f"`{default}`" if default else "empty"
      out.append(f"| {name} | {_cell(kind)} | {_cell(default)} | {_cell(flag['help'])} |")
    out.append("")
  return "\n".join(out)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--write", action="store_true", help=f"write {os.path.relpath(FLAGS_MD, REPO)}")
  group.add_argument("--check", action="store_true", help="exit 1 if the page differs from the flags")
  args = parser.parse_args(argv)
  text = render()
  if args.write:
    os.makedirs(os.path.dirname(FLAGS_MD), exist_ok=True)
    with open(FLAGS_MD, "w", encoding="utf-8") as handle:
      handle.write(text)
    print(f"wrote {os.path.relpath(FLAGS_MD, REPO)}")
    return 0
  if args.check:
    current = open(FLAGS_MD, encoding="utf-8").read() if os.path.exists(FLAGS_MD) else ""
    if current != text:
      print(f"docs/flags.md is out of date with the binaries' flags: run `{REGENERATE}`", file=sys.stderr)
      return 1
    return 0
  print(text)
  return 0


if __name__ == "__main__":
  sys.exit(main())
