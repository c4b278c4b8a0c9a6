"""Mutation benchmark: would a test fail if a bug that matters were put into a critical module?

Each mutant is ONE small edit of one module (a comparison, an operator, a constant, a deleted call, a return
value ...). The runner copies the repository (`git ls-files`) once into a temporary folder, writes each mutant
into the copy, runs the tests named for that module there (`python -m pytest -q -x -p no:xdist
-p no:cacheprovider <tests>`, cwd = the copy, so the copy's package is the one imported: checked once per
target), and restores the file. A mutant is *killed* when a test fails (or the tests no longer import), killed
*by timeout* when they run past --timeout_factor x the unmutated tests' time, and *survives* when every test
still passes. A survivor is printed as `file:line: original -> mutant`: a bug no test notices, so either a
missing test or, after reading it, an equivalent mutant (list its key under the target's "equivalent").

  score = (killed + killed by timeout) / (mutants - equivalent-excluded)

(runner errors, e.g. pytest exit 3-5, are listed and left out of both; a mutant that breaks the import is
killed). Docstrings, logging/print statements and message text (raise, exception/warning constructors) are
not mutated; they are counted as skipped.

The project's target is >= 0.90 on every target below. The run is slow (a pytest process per mutant), so it is
run by hand, OUTSIDE CI, and its figures go in benchmarks/README.md with the command that made them:

  python benchmarks/mutation_benchmark.py --targets metrics --max_mutants_per_target 20
  python benchmarks/mutation_benchmark.py --max_mutants_per_target 60 --jobs 2 --output mutation.json
  python benchmarks/mutation_benchmark.py --list --targets pool_keying       # the mutants, without running
  python benchmarks/mutation_benchmark.py --module pdx_tf/training/grid.py --tests tests/grid_test.py   # ad hoc

The TARGETS table below is the one place that says what is mutated and which tests must kill it (or pass
--table FILE.json with the same shape). --max_mutants_per_target draws a keyed sample (sha256 of --seed and the
mutant's key, which names its function, operator and text but not its line), so reruns after unrelated edits
pick the same mutants. Dependency-free: the standard library only (ast, subprocess); no TensorFlow import here.
"""

from __future__ import annotations

import argparse
import ast
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------------------
# THE TARGET TABLE: edit here (module paths move when the package is split into sub-packages).
#   module:      file relative to the repository root.
#   tests:       pytest arguments that should kill its mutants (files, node ids, or "-k", "EXPR" pairs).
#   functions:   optional; only code inside these functions/methods (name or Class.method, nested code
#                included) is mutated. Empty: the whole module.
#   equivalent:  optional {mutant key: why}: mutants read by a human and found to behave identically;
#                they are not run and leave the score's denominator.
TARGETS: dict[str, dict[str, Any]] = {
    "splits": {  # splits and the training input: patient-level folds
        "module": "pdx_tf/training/splits.py",
        "tests": ["tests/splits_test.py", "tests/inner_validation_test.py"],
    },
    "pool_keying": {  # the keyed block draw and what a cell reads
        "module": "pdx_tf/training/input_pipeline.py",
        "tests": ["tests/input_pipeline_test.py", "tests/trainer_test.py", "-k",
                  "pool or drawn or leakage or exactly_its_training or epoch or block or opens"],
        "functions": ["pool_keep", "pool_shards", "pool_files", "pool_size", "_patient_shards", "epoch_shards",
                      "bytes_to_read"],
    },
    "metrics": {
        "module": "pdx_tf/evaluation/metrics.py",
        "tests": ["tests/evaluation_metrics_test.py"],
    },
    "training_auc": {
        "module": "pdx_tf/training/cell_trainer.py",
        "tests": ["tests/trainer_test.py", "-k", "auc"],
        "functions": ["auc"],
    },
    "export_preprocessing": {
        "module": "pdx_tf/serving/export.py",
        "tests": ["tests/export_test.py", "tests/contracts_test.py", "tests/model_variants_test.py", "-k",
                  "mil_serving or own_window or numpy_reference or "
                  "mixed_precision or region_settings or different_ or run_info or run_document or "
                  "existing_version or cell_selection"],
        "functions": ["_shared_settings", "region_settings", "float32_model", "_load_model", "export_models"],
        "equivalent": {
            "7a09728872ff": "region_settings' fallback for runs older than run.json's region: a TypeError there comes"
                            " from a malformed old dataset.json and falls back either way",
        },
    },
    "serving_preprocessing": {
        "module": "pdx_tf/serving/signatures.py",
        "tests": ["tests/export_test.py", "-k", "own_window or numpy_reference or serving_default or single_cell or "
                  "predict_patient or predict_images or wrong_dtype"],
        "functions": ["model_image_size", "PdxServingModule.__init__"],
    },
    "dicom_phi_errors": {  # PHI: file tokens and every error path of the reader
        "module": "pdx_tf/data/dicom.py",
        "tests": ["tests/dicom_paths_test.py", "tests/dicom_test.py"],
        "functions": ["_relative_path", "file_token", "list_file_tokens", "_print_paths", "_describe_counts",
                      "_tilt_error", "_check_geometry", "_check_decodable", "_why_unparseable", "_read_failure",
                      "_malformed_error"],
    },
    "pipeline_logging": {  # PHI: what the pipeline prints and writes about a failed patient
        "module": "pdx_tf/data/pipeline.py",
        "tests": ["tests/pipeline_test.py", "tests/dicom_paths_test.py", "-k", "fail or phi or path or console or "
                  "summary or canar"],
        "functions": ["_run_patient", "PipelineResult.summary"],
    },
    "joint_heads": {  # --task=p,sb: the two heads, the consistency loss, the per-task views export serves
        "module": "pdx_tf/training/model.py",
        "tests": ["tests/joint_task_test.py", "-k", "loss or views or scales"],
        "functions": ["task_view", "JointLoss.call", "JointLoss.__init__", "is_joint_model", "build_model"],
        "equivalent": {
            "f9b47034835c": "y_true[..., :, None] -> y_true[..., None]: the same indexing",
            "6b98aa4e831d": "the slice model's Dropout layer name: read by no code (MIL's is looked up, not this one)",
            "b9c13fd1c1ea": "the slice model's name: shown in summaries only",
        },
    },
    "training_resume": {
        "module": "pdx_tf/training/cell_trainer.py",
        "tests": ["tests/cell_trainer_test.py", "tests/trainer_test.py", "-k", "uncommitted or complete_progress or "
                  "reseed or resume or interrupted or load_progress or remove_other or epoch_seeds"],
        "functions": ["load_progress", "_remove_other_checkpoints", "commit_epoch", "checkpoint_name",
                      "epoch_seed", "reseed_dropout"],
        "equivalent": {
            "5a91270e1378": "epoch_seed's bound 2**31 -> 2**32: still a keyed seed; reseed_dropout reduces it mod 2**31",
            "6b23505d4f25": "reseed_dropout's modulus 2**31 -> 3**31: equal for every seed epoch_seed makes (< 2**31)",
        },
    },
}

# Statements whose only effect is output for a human; their mutants are message edits, not behaviour.
LOGGING_ROOTS = frozenset({"logging", "logger", "_logger", "LOGGER", "_LOGGER", "absl_logging"})
STRING_MARK = "XX"  # a mutated string constant s becomes XX{s}XX: different from s, even for ""


# ---------------------------------------------------------------------------------------------------------
# Mutants.


@dataclasses.dataclass(frozen=True)
class Mutant:
  """One single-edit variant of a module.

  Attributes:
    key: stable id (function, operator, original and mutant text, occurrence): no line number in it.
    operator: which mutation operator made it.
    function: the enclosing function's qualified name ("<module>" at top level).
    line: 1-based line of the edit in the original file.
    original: the original source text of the edited span (one line, shortened).
    mutant: the text it becomes.
    source: the whole mutated module.
  """
  key: str
  operator: str
  function: str
  line: int
  original: str
  mutant: str
  source: str = dataclasses.field(repr=False)


@dataclasses.dataclass
class _Site:
  operator: str
  node: ast.AST           # the node the operator edits in place
  anchor: ast.AST         # the node whose source span is replaced by its unparsed, edited form
  apply: Callable[[], Callable[[], None]]   # edits the tree in place, returns the undo
  function: str
  skip: str | None        # a reason to count it but not make it ("message text", "logging", "docstring")
  statement: bool = False  # the anchor is a statement (no parentheses around the replacement)
  text_node: ast.AST | None = None   # what the anchor's span becomes when the edit replaces the anchor itself


def _set(node: ast.AST, field: str, value: Any) -> Callable[[], Callable[[], None]]:
  """An edit that sets node.field = value (and its undo)."""
  def apply():
    old = getattr(node, field)
    setattr(node, field, value)
    return lambda: setattr(node, field, old)
  return apply


def _set_item(items: list, index: int, value: Any) -> Callable[[], Callable[[], None]]:
  def apply():
    old = items[index]
    items[index] = value
    return lambda: items.__setitem__(index, old)
  return apply


def _remove_item(items: list, index: int) -> Callable[[], Callable[[], None]]:
  def apply():
    old = items.pop(index)
    return lambda: items.insert(index, old)
  return apply


_COMPARE_SWAPS = {ast.Lt: ast.LtE, ast.LtE: ast.Lt, ast.Gt: ast.GtE, ast.GtE: ast.Gt, ast.Eq: ast.NotEq,
                  ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
_BINOP_SWAPS = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult, ast.FloorDiv: ast.Mult}


def _is_int(node: ast.AST) -> bool:
  return isinstance(node, ast.Constant) and type(node.value) is int  # pylint: disable=unidiomatic-typecheck


def _int_value(node: ast.AST) -> int | None:
  """The value of an integer literal, including a negative one (-1 is UnaryOp(USub, 1) in the AST)."""
  if _is_int(node):
    return node.value
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub) and _is_int(node.operand):
    return -node.operand.value
  return None


def _int_node(value: int) -> ast.expr:
  return ast.Constant(value) if value >= 0 else ast.UnaryOp(ast.USub(), ast.Constant(-value))


def _plus_one(node: ast.expr) -> ast.expr:
  value = _int_value(node)
  return _int_node(value + 1) if value is not None else ast.BinOp(node, ast.Add(), ast.Constant(1))


def _is_logging_call(statement: ast.stmt) -> bool:
  if not (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Call)):
    return False
  func = statement.value.func
  if isinstance(func, ast.Name):
    return func.id == "print"
  while isinstance(func, ast.Attribute):
    func = func.value
  return isinstance(func, ast.Name) and func.id in LOGGING_ROOTS


def _is_docstring(statement: ast.stmt) -> bool:
  return (isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
          and isinstance(statement.value.value, str))


def _returns_none(function: ast.AST) -> bool:
  returns = getattr(function, "returns", None)
  return isinstance(returns, ast.Constant) and returns.value is None


def _is_message_call(node: ast.AST) -> bool:
  """A call that builds human-readable text: an exception or warning constructor, or warnings.warn."""
  if not isinstance(node, ast.Call):
    return False
  func = node.func
  name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
  return name.endswith(("Error", "Exception", "Warning")) or name == "warn"


def _replace_in_parent(parent: ast.AST, node: ast.AST, replacement: ast.AST) -> Callable[[], Callable[[], None]]:
  """An edit that puts `replacement` where `node` is among `parent`'s fields."""
  for field, value in ast.iter_fields(parent):
    if value is node:
      return _set(parent, field, replacement)
    if isinstance(value, list):
      for index, item in enumerate(value):
        if item is node:
          return _set_item(value, index, replacement)
  raise ValueError("node not found in its parent")


class _SiteFinder:
  """Walks a module in a fixed order and lists every mutation site, with the context that may skip it."""

  def __init__(self, functions: Sequence[str] = ()):
    self.functions = frozenset(functions)
    self.matched: set[str] = set()    # the names in `functions` that name a def or class here
    self.sites: list[_Site] = []
    self._scope: list[str] = []       # names of the enclosing classes/functions
    self._in_scope: list[bool] = []   # whether each enclosing level is (inside) a selected function
    self._functions: list[ast.AST] = []
    self._skip: str | None = None     # inherited reason: "docstring", "logging"
    self._in_message = False          # inside a raise or an exception/warning constructor
    self._fstring: ast.AST | None = None   # outermost enclosing f-string (its inner positions are unreliable)
    self._format_spec = False

  # --- bookkeeping

  def _selected(self) -> bool:
    if not self.functions:
      return True
    return bool(self._in_scope) and self._in_scope[-1]

  def _add(self, operator: str, node: ast.AST, apply, *, anchor: ast.AST | None = None, statement: bool = False,
           replacement: ast.AST | None = None, skip: str | None = None) -> None:
    if not self._selected():
      return
    anchor = anchor or node
    if self._fstring is not None and not statement:
      anchor = self._fstring
    if skip is None and self._in_message and (self._fstring is not None or (
        isinstance(node, ast.Constant) and isinstance(node.value, str))):
      skip = "message text"
    self.sites.append(_Site(operator, node, anchor, apply, ".".join(self._scope) or "<module>",
                            self._skip or skip, statement, replacement if anchor is node else None))

  # --- walking

  def visit(self, node: ast.AST, parent: ast.AST | None = None, field: str | None = None) -> None:
    if isinstance(node, ast.Module):
      self._visit_body(node.body)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      self._visit_scope(node)
    elif isinstance(node, ast.stmt):
      self._visit_statement(node)
    else:
      self._visit_expression(node, parent, field)

  def _visit_scope(self, node) -> None:
    for decorator in node.decorator_list:
      self.visit(decorator)
    is_function = not isinstance(node, ast.ClassDef)
    if is_function:
      for default in node.args.defaults + [d for d in node.args.kw_defaults if d is not None]:
        self.visit(default)
    self._scope.append(node.name)
    qualified = ".".join(self._scope)
    parent_in = bool(self._in_scope) and self._in_scope[-1]
    matches = {name for name in self.functions if qualified == name or qualified.endswith("." + name)}
    self.matched |= matches
    self._in_scope.append(parent_in or bool(matches))
    if is_function:
      self._functions.append(node)
    self._visit_body(node.body)
    if is_function:
      self._functions.pop()
    self._in_scope.pop()
    self._scope.pop()

  def _visit_body(self, body: list[ast.stmt]) -> None:
    for statement in body:
      self.visit(statement)

  def _visit_statement(self, node: ast.stmt) -> None:
    previous_skip, previous_message = self._skip, self._in_message
    if _is_docstring(node):  # a docstring, or a bare string used as a comment: no behaviour
      self._skip = self._skip or "docstring"
    if _is_logging_call(node):
      self._skip = self._skip or "logging"
    if isinstance(node, ast.Raise):
      self._in_message = True
    if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
      self._add("delete call statement", node, None, statement=True)
    if isinstance(node, ast.Return) and node.value is not None and not (
        isinstance(node.value, ast.Constant) and node.value.value is None) and not (
        self._functions and _returns_none(self._functions[-1])):
      self._add("return None", node, _set(node, "value", ast.Constant(None)), statement=True)
    if isinstance(node, ast.AugAssign) and type(node.op) in _BINOP_SWAPS:
      self._add("arithmetic swap", node, _set(node, "op", _BINOP_SWAPS[type(node.op)]()), statement=True)
    for field, value in ast.iter_fields(node):
      if field in ("annotation", "returns", "type_comment"):
        continue  # annotations do not run (from __future__ import annotations)
      self._visit_value(value, node, field)
    self._skip, self._in_message = previous_skip, previous_message

  def _visit_value(self, value: Any, parent: ast.AST, field: str) -> None:
    if isinstance(value, list):
      for item in value:
        if isinstance(item, ast.AST):
          self.visit(item, parent, field)
    elif isinstance(value, ast.AST):
      self.visit(value, parent, field)

  def _visit_expression(self, node: ast.AST, parent: ast.AST | None, field: str | None) -> None:
    # The replaced span must be an expression that can stand in parentheses: a subscript's slice or tuple
    # index cannot, so the whole subscript is replaced instead.
    anchor = parent if isinstance(parent, ast.Subscript) and field == "slice" else None
    self._mutate_expression(node, parent, anchor)
    previous_fstring, previous_spec, previous_message = self._fstring, self._format_spec, self._in_message
    if isinstance(node, ast.JoinedStr) and self._fstring is None:
      self._fstring = node
    if _is_message_call(node):
      self._in_message = True
    if isinstance(node, ast.Subscript):
      self._visit_slice(node)
    for child_field, value in ast.iter_fields(node):
      self._format_spec = previous_spec or (isinstance(node, ast.FormattedValue) and child_field == "format_spec")
      self._visit_value(value, node, child_field)
    self._fstring, self._format_spec, self._in_message = previous_fstring, previous_spec, previous_message

  def _visit_slice(self, node: ast.Subscript) -> None:
    """Off-by-one in a slice bound or an integer index (x[a:b] -> x[a + 1:b], x[-1] -> x[0], x[:, 1] ...)."""
    indices = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
    for position, index in enumerate(indices):
      if isinstance(index, ast.Slice):
        for bound in ("lower", "upper"):
          value = getattr(index, bound)
          if value is not None:
            self._add("slice off-by-one", index, _set(index, bound, _plus_one(value)), anchor=node)
      elif _int_value(index) is not None:
        edit = (_set_item(indices, position, _plus_one(index)) if isinstance(node.slice, ast.Tuple)
                else _set(node, "slice", _plus_one(index)))
        self._add("index off-by-one", index, edit, anchor=node)

  def _mutate_expression(self, node: ast.AST, parent: ast.AST | None, anchor: ast.AST | None) -> None:
    if isinstance(node, ast.Compare):
      for index, op in enumerate(node.ops):
        if type(op) in _COMPARE_SWAPS:
          self._add("comparison swap", node, _set_item(node.ops, index, _COMPARE_SWAPS[type(op)]()), anchor=anchor)
    elif isinstance(node, ast.BoolOp):
      self._add("and/or swap", node, _set(node, "op", ast.Or() if isinstance(node.op, ast.And) else ast.And()),
                anchor=anchor)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert)) and parent is not None:
      self._add("not removal", node, _replace_in_parent(parent, node, node.operand), anchor=anchor,
                replacement=node.operand)
    elif isinstance(node, ast.BinOp) and type(node.op) in _BINOP_SWAPS:
      self._add("arithmetic swap", node, _set(node, "op", _BINOP_SWAPS[type(node.op)]()), anchor=anchor)
    elif isinstance(node, ast.Constant):
      if isinstance(node.value, bool):
        self._add("True/False swap", node, _set(node, "value", not node.value), anchor=anchor)
      elif _is_int(node) and not (isinstance(parent, ast.UnaryOp) and isinstance(parent.op, ast.USub)):
        self._add("integer constant", node, _set(node, "value", {0: 1, 1: 0}.get(node.value, node.value + 1)),
                  anchor=anchor)
      elif isinstance(node.value, str) and not self._format_spec:
        self._add("string constant", node, _set(node, "value", f"{STRING_MARK}{node.value}{STRING_MARK}"),
                  anchor=anchor)
    elif isinstance(node, ast.UnaryOp) and _int_value(node) is not None and parent is not None:
      replacement = _int_node(_int_value(node) + 1)
      self._add("integer constant", node, _replace_in_parent(parent, node, replacement), anchor=anchor,
                replacement=replacement)
    if isinstance(node, (ast.List, ast.Tuple)) and isinstance(node.ctx, ast.Load) and len(node.elts) >= 2 \
        and not any(isinstance(element, ast.Starred) for element in node.elts):
      for index in range(len(node.elts)):
        self._add("remove element", node, _remove_item(node.elts, index), anchor=anchor)


def _line_offsets(source: str) -> list[int]:
  offsets, total = [0], 0
  for line in source.splitlines(keepends=True):
    total += len(line.encode("utf-8"))
    offsets.append(total)
  return offsets


def _span(source_bytes: bytes, offsets: list[int], node: ast.AST) -> tuple[int, int]:
  """Byte offsets of a node's source span (ast positions are UTF-8 byte columns)."""
  return (offsets[node.lineno - 1] + node.col_offset, offsets[node.end_lineno - 1] + node.end_col_offset)


def _one_line(text: str, limit: int = 110) -> str:
  text = " ".join(text.split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _dump(tree: ast.AST) -> str:
  return ast.dump(tree, include_attributes=False)


@dataclasses.dataclass
class MutantSet:
  """All mutants of one module and what was left out.

  Attributes:
    mutants: the valid mutants, in file order.
    skipped: {reason: count} of mutation sites counted but not made (docstring, logging, message text).
    invalid: sites whose edit did not give the expected module (a runner bug; should be 0).
    duplicates: edits that gave the original module, or one another mutant already gave.
    unmatched: names in `functions` that no function or class of the module has (a stale target table).
  """
  mutants: list[Mutant]
  skipped: dict[str, int]
  invalid: list[str]
  duplicates: int
  unmatched: list[str] = dataclasses.field(default_factory=list)


def make_mutants(source: str, functions: Sequence[str] = ()) -> MutantSet:
  """Every single-edit mutant of a module's source.

  Args:
    source: the module's text.
    functions: restrict to code inside these functions/methods (name or Class.method); empty: everything.

  Returns:
    A MutantSet. Each mutant's source parses to exactly the edited tree (checked: the text edit is replaced
    only in the edited span, so the rest of the file, comments included, is byte-identical).
  """
  tree = ast.parse(source)
  original_dump = _dump(tree)
  finder = _SiteFinder(functions)
  finder.visit(tree)
  source_bytes = source.encode("utf-8")
  offsets = _line_offsets(source)
  skipped: collections.Counter = collections.Counter()
  invalid: list[str] = []
  seen = {original_dump}
  made: list[tuple[_Site, str, str, str]] = []
  duplicates = 0
  for site in finder.sites:
    if site.skip:
      skipped[site.skip] += 1
      continue
    start, end = _span(source_bytes, offsets, site.anchor)
    original = source_bytes[start:end].decode("utf-8")
    if site.operator == "delete call statement":
      replacement, undo = "pass", None
      body = _containing_body(tree, site.node)
      position = body.index(site.node)
      body[position] = ast.Pass()
      expected = _dump(tree)
      body[position] = site.node
    else:
      undo = site.apply()
      try:
        replacement = ast.unparse(site.text_node or site.anchor)
        expected = _dump(tree)
      finally:
        undo()
      if not site.statement:
        replacement = f"({replacement})"
    mutated = (source_bytes[:start] + replacement.encode("utf-8") + source_bytes[end:]).decode("utf-8")
    where = f"line {site.anchor.lineno} {site.operator}: {_one_line(original)} -> {_one_line(replacement)}"
    try:
      mutated_dump = _dump(ast.parse(mutated))
    except SyntaxError:
      invalid.append(where + " (does not parse)")
      continue
    if mutated_dump != expected:
      invalid.append(where + " (the text edit does not give the intended tree)")
      continue
    if mutated_dump in seen:
      duplicates += 1
      continue
    seen.add(mutated_dump)
    made.append((site, original, replacement, mutated))
  mutants, occurrences = [], collections.Counter()
  for site, original, replacement, mutated in made:
    identity = (site.function, site.operator, _one_line(original, 10_000), replacement)
    occurrences[identity] += 1
    key = hashlib.sha256("|".join([*identity, str(occurrences[identity])]).encode()).hexdigest()[:12]
    mutants.append(Mutant(key=key, operator=site.operator, function=site.function, line=site.anchor.lineno,
                          original=_one_line(original), mutant=_one_line(replacement), source=mutated))
  return MutantSet(mutants=mutants, skipped=dict(skipped), invalid=invalid, duplicates=duplicates,
                   unmatched=sorted(set(functions) - finder.matched))


def _containing_body(tree: ast.AST, statement: ast.stmt) -> list[ast.stmt]:
  for node in ast.walk(tree):
    for _, value in ast.iter_fields(node):
      if isinstance(value, list) and any(item is statement for item in value):
        return value
  raise ValueError("statement not found in its module")


def sample(mutants: Sequence[Mutant], count: int | None, seed: int) -> list[Mutant]:
  """A keyed sample of `count` mutants (all when None), in file order: the same keys give the same picks."""
  if count is None or count >= len(mutants):
    return list(mutants)
  ranked = sorted(mutants, key=lambda m: hashlib.sha256(f"{seed}:{m.key}".encode()).hexdigest())
  chosen = {m.key for m in ranked[:count]}
  return [m for m in mutants if m.key in chosen]


# ---------------------------------------------------------------------------------------------------------
# Running.


def copy_repository(repo_root: str, destination: str) -> None:
  """Copies the tracked files plus untracked, not ignored ones (`git ls-files -co --exclude-standard`)."""
  listed = subprocess.run(["git", "ls-files", "-z", "-c", "-o", "--exclude-standard"], cwd=repo_root,
                          check=True, capture_output=True).stdout.decode("utf-8").split("\0")
  for relative in filter(None, listed):
    source = os.path.join(repo_root, relative)
    if not os.path.isfile(source):
      continue  # deleted in the work tree but still in the index
    target = os.path.join(destination, relative)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(source, target)


def _environment(copy_root: str) -> dict[str, str]:
  env = dict(os.environ)
  # The copy's package first, whatever is installed; and no .pyc: a same-size mutant written within the
  # same second as the previous one would otherwise be served the previous mutant's cached bytecode.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [copy_root, env.get("PYTHONPATH")]))
  env["PYTHONDONTWRITEBYTECODE"] = "1"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def imported_package_file(copy_root: str, package: str) -> str:
  """The file `import <package>` loads in a process started like the test runs (cwd = the copy)."""
  result = subprocess.run([sys.executable, "-c", f"import {package}; print({package}.__file__)"], cwd=copy_root,
                          env=_environment(copy_root), capture_output=True, text=True, timeout=600, check=False)
  if result.returncode != 0:
    raise RuntimeError(f"`import {package}` fails in the copy: {result.stderr.strip().splitlines()[-1:]}")
  return result.stdout.strip().splitlines()[-1]


def pytest_command(tests: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-p", "no:cacheprovider", *tests]


def run_tests(copy_root: str, tests: Sequence[str], timeout_s: float | None) -> tuple[str, float, str]:
  """Runs the tests in the copy: ("passed" | "failed" | "timeout" | "error:<rc>", seconds, output tail)."""
  start = time.perf_counter()
  # A session of its own, so a timeout ends pytest's children (pipeline workers) too.
  process = subprocess.Popen(pytest_command(tests), cwd=copy_root, env=_environment(copy_root),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    output, _ = process.communicate(timeout=timeout_s)
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, signal.SIGKILL)
    output, _ = process.communicate()
    return "timeout", time.perf_counter() - start, output.decode("utf-8", "replace")[-2000:]
  seconds = time.perf_counter() - start
  text = output.decode("utf-8", "replace")[-4000:]
  # pytest exit codes: 0 passed, 1 tests failed, 2 interrupted (a collection error: the mutant broke the
  # import, which counts as killed), 3 internal error, 4 usage error, 5 no tests collected.
  status = {0: "passed", 1: "failed", 2: "failed"}.get(process.returncode, f"error:{process.returncode}")
  return status, seconds, text


def _first_failure(output: str) -> str | None:
  for line in output.splitlines():
    if line.startswith(("FAILED ", "ERROR ")):
      return _one_line(line, 200)
  return None


@dataclasses.dataclass(frozen=True)
class Target:
  name: str
  module: str
  tests: tuple[str, ...]
  functions: tuple[str, ...] = ()
  equivalent: tuple[tuple[str, str], ...] = ()

  @staticmethod
  def from_dict(name: str, values: dict[str, Any]) -> "Target":
    unknown = set(values) - {"module", "tests", "functions", "equivalent"}
    if unknown or "module" not in values or not values.get("tests"):
      raise ValueError(f"target {name!r} needs 'module' and 'tests' (optional 'functions', 'equivalent'); "
                       f"unknown keys: {sorted(unknown)}")
    return Target(name=name, module=values["module"], tests=tuple(values["tests"]),
                  functions=tuple(values.get("functions", ())),
                  equivalent=tuple(sorted(dict(values.get("equivalent", {})).items())))


def run_target(target: Target, *, repo_root: str, copies: Sequence[str], max_mutants: int | None, seed: int,
               timeout_factor: float, min_timeout_s: float, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Mutates one module and runs its tests against every sampled mutant; returns the target's report."""
  module_path = os.path.join(repo_root, target.module)
  with open(module_path, encoding="utf-8") as file:
    original_source = file.read()
  found = make_mutants(original_source, target.functions)
  if found.unmatched:
    raise ValueError(f"target {target.name}: {target.module} has no function {', '.join(found.unmatched)}; "
                     "update its 'functions' in the TARGETS table")
  chosen = sample(found.mutants, max_mutants, seed)
  equivalent = dict(target.equivalent)
  to_run = [mutant for mutant in chosen if mutant.key not in equivalent]
  report: dict[str, Any] = {
      "module": target.module, "tests": list(target.tests), "functions": list(target.functions),
      "mutants_found": len(found.mutants), "mutants": len(chosen), "skipped": found.skipped,
      "invalid": found.invalid, "duplicates": found.duplicates,
      "equivalent_excluded": sorted(key for key in equivalent if key in {m.key for m in chosen}),
  }
  package = target.module.split("/")[0]
  imported = imported_package_file(copies[0], package)
  report["imported_package_file"] = imported
  log(f"[{target.name}] {package}.__file__ in the copy: {imported}")
  if not os.path.realpath(imported).startswith(os.path.realpath(copies[0]) + os.sep):
    raise RuntimeError(f"the tests would import {package} from {imported}, not from the copy {copies[0]}; "
                       "uninstall the non-editable install or fix PYTHONPATH")
  status, baseline_s, output = run_tests(copies[0], target.tests, None)
  if status != "passed":
    raise RuntimeError(f"[{target.name}] the unmutated tests do not pass ({status}); fix them first:\n"
                       f"{output[-1500:]}")
  timeout_s = max(timeout_factor * baseline_s, min_timeout_s)
  report.update(baseline_s=round(baseline_s, 2), timeout_s=round(timeout_s, 2))
  log(f"[{target.name}] {len(chosen)} of {len(found.mutants)} mutants ({len(to_run)} to run); tests "
      f"{baseline_s:.1f} s unmutated, timeout {timeout_s:.1f} s")

  free: queue.Queue = queue.Queue()
  for root in copies:
    free.put(root)

  def run_one(mutant: Mutant) -> dict[str, Any]:
    root = free.get()
    path = os.path.join(root, target.module)
    try:
      with open(path, "w", encoding="utf-8") as file:
        file.write(mutant.source)
      status, seconds, output = run_tests(root, target.tests, timeout_s)
    finally:
      with open(path, "w", encoding="utf-8") as file:
        file.write(original_source)
      free.put(root)
    result = {"status": {"failed": "killed", "passed": "survived"}.get(status, status), "seconds": round(seconds, 2)}
    if status == "failed":
      result["killed_by"] = _first_failure(output)
    elif status.startswith("error"):
      result["output_tail"] = output[-1500:]
    return result

  results = []
  with concurrent.futures.ThreadPoolExecutor(max_workers=len(copies)) as pool:
    futures = {pool.submit(run_one, mutant): mutant for mutant in to_run}
    for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
      mutant = futures[future]
      outcome = future.result()
      log(f"[{target.name}] {done}/{len(to_run)} {outcome['status']:8s} {target.module}:{mutant.line} "
          f"{mutant.operator}")
      results.append({**{k: v for k, v in dataclasses.asdict(mutant).items() if k != "source"}, **outcome})
  results.sort(key=lambda r: (r["line"], r["key"]))
  counts = collections.Counter(r["status"] for r in results)
  killed, timeouts, survived = counts["killed"], counts["timeout"], counts["survived"]
  errors = sum(count for status, count in counts.items() if status.startswith("error"))
  denominator = len(chosen) - len(report["equivalent_excluded"]) - errors
  report.update(killed=killed, timeouts=timeouts, survived=survived, errors=errors,
                score=round((killed + timeouts) / denominator, 4) if denominator else None,
                survivors=[f"{target.module}:{r['line']}: {r['original']} -> {r['mutant']}  [{r['operator']}, "
                           f"key {r['key']}]" for r in results if r["status"] == "survived"],
                results=results)
  return report


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--targets", default="", help="comma-separated target names (default: all)")
  parser.add_argument("--table", help="a JSON file {name: {module, tests, functions?, equivalent?}} used "
                                      "instead of the built-in TARGETS table")
  parser.add_argument("--module", help="an ad-hoc target: module path relative to the repository root")
  parser.add_argument("--tests", help="the ad-hoc target's pytest arguments (split like a shell line)")
  parser.add_argument("--functions", default="", help="the ad-hoc target's functions (comma-separated)")
  parser.add_argument("--max_mutants_per_target", type=int, default=None, help="keyed sample size (default all)")
  parser.add_argument("--seed", type=int, default=0, help="sampling seed")
  parser.add_argument("--jobs", type=int, default=1, help="mutants run at once (one repository copy each)")
  parser.add_argument("--timeout_factor", type=float, default=3.0, help="timeout = factor x unmutated time")
  parser.add_argument("--min_timeout_s", type=float, default=10.0, help="floor for the timeout (start-up noise)")
  parser.add_argument("--output", help="write everything (every mutant and its outcome) to this JSON file")
  parser.add_argument("--list", action="store_true", help="print the mutants without running anything")
  parser.add_argument("--repo_root", default=REPO_ROOT, help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def _targets(args: argparse.Namespace) -> list[Target]:
  import shlex  # pylint: disable=import-outside-toplevel
  if args.module:
    if not args.tests:
      raise SystemExit("--module needs --tests (the pytest arguments that should kill its mutants)")
    name = os.path.splitext(os.path.basename(args.module))[0]
    return [Target(name=name, module=args.module, tests=tuple(shlex.split(args.tests)),
                   functions=tuple(filter(None, args.functions.split(","))))]
  table = TARGETS
  if args.table:
    with open(args.table, encoding="utf-8") as file:
      table = json.load(file)
  names = [name for name in args.targets.split(",") if name] or list(table)
  unknown = [name for name in names if name not in table]
  if unknown:
    raise SystemExit(f"unknown target(s) {', '.join(unknown)}; targets are {', '.join(table)}")
  return [Target.from_dict(name, table[name]) for name in names]


def main(argv: Sequence[str] | None = None) -> int:
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  args = _parse_args(sys.argv[1:] if argv is None else argv)
  targets = _targets(args)
  if args.list:
    for target in targets:
      with open(os.path.join(args.repo_root, target.module), encoding="utf-8") as file:
        found = make_mutants(file.read(), target.functions)
      chosen = sample(found.mutants, args.max_mutants_per_target, args.seed)
      print(f"== {target.name}: {len(chosen)} of {len(found.mutants)} mutants of {target.module}; skipped "
            f"{found.skipped or 'none'}; {found.duplicates} duplicate edits; {len(found.invalid)} invalid")
      for mutant in chosen:
        print(f"{target.module}:{mutant.line}: {mutant.original} -> {mutant.mutant}  [{mutant.operator}, "
              f"{mutant.function}, key {mutant.key}]")
      for problem in found.invalid:
        print(f"INVALID {problem}")
      for name in found.unmatched:
        print(f"UNKNOWN FUNCTION {name} (not in {target.module}; update the TARGETS table)")
    return 0

  started = time.perf_counter()
  reports: dict[str, Any] = {}
  with tempfile.TemporaryDirectory(prefix="pdx-mutation-") as temp:
    copies = []
    for index in range(max(1, args.jobs)):
      root = os.path.join(temp, f"copy{index}")
      copy_repository(args.repo_root, root)
      copies.append(root)
    for target in targets:
      reports[target.name] = run_target(
          target, repo_root=args.repo_root, copies=copies, max_mutants=args.max_mutants_per_target,
          seed=args.seed, timeout_factor=args.timeout_factor, min_timeout_s=args.min_timeout_s)
  wall_s = time.perf_counter() - started

  print("\n== mutation score (killed incl. timeouts / (mutants - equivalent-excluded - runner errors))")
  print(f"{'target':24s} {'mutants':>7s} {'killed':>6s} {'timeout':>7s} {'survived':>8s} {'equiv':>5s} "
        f"{'errors':>6s} {'score':>6s}  skipped")
  for name, report in reports.items():
    score = "n/a" if report["score"] is None else f"{report['score']:.2f}"
    print(f"{name:24s} {report['mutants']:7d} {report['killed']:6d} {report['timeouts']:7d} "
          f"{report['survived']:8d} {len(report['equivalent_excluded']):5d} {report['errors']:6d} {score:>6s}  "
          f"{report['skipped'] or '-'}")
  for name, report in reports.items():
    for survivor in report["survivors"]:
      print(f"SURVIVED {survivor}")
  print(f"wall time {wall_s:.0f} s")
  summary = {"command": ["python", "benchmarks/mutation_benchmark.py", *(sys.argv[1:] if argv is None else argv)],
             "seed": args.seed, "max_mutants_per_target": args.max_mutants_per_target, "jobs": args.jobs,
             "timeout_factor": args.timeout_factor, "wall_s": round(wall_s, 1), "targets": reports}
  # The raw line keeps the scores and survivors; --output keeps every mutant's outcome as well.
  scores = {name: {key: report[key] for key in ("mutants", "killed", "timeouts", "survived", "errors", "score",
                                                 "survivors")} for name, report in reports.items()}
  print(f"raw output: {results_io.record_figures('mutation_benchmark', dict(summary, targets=scores))}")
  if args.output:
    with open(args.output, "w", encoding="utf-8") as file:
      json.dump(summary, file, indent=2)
    print(f"wrote {args.output}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
