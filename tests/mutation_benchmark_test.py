"""Tests for benchmarks/mutation_benchmark.py: its operators, skip rules, sampling, and one run on a toy repo.

No TensorFlow here: the mutants are of small modules written by the tests, and the end-to-end run uses a toy
package in a temporary git repository.
"""

import importlib.util
import os
import subprocess
import sys

import pytest

_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "mutation_benchmark.py")


def _load_runner():
  spec = importlib.util.spec_from_file_location("mutation_benchmark", _SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules["mutation_benchmark"] = module  # dataclasses look the module up by name
  spec.loader.exec_module(module)
  return module


runner = _load_runner()


def _sources(source, operator, functions=()):
  return {mutant.source for mutant in runner.make_mutants(source, functions).mutants if mutant.operator == operator}


# (operator, module, one mutant it must make, written out by hand)
_OPERATOR_CASES = [
    ("comparison swap", "def f(a, b):\n  return a < b\n", "def f(a, b):\n  return (a <= b)\n"),
    ("comparison swap", "y = a >= b\n", "y = (a > b)\n"),
    ("comparison swap", "y = a == b\n", "y = (a != b)\n"),
    ("comparison swap", "y = a in b\n", "y = (a not in b)\n"),
    ("and/or swap", "y = a and b\n", "y = (a or b)\n"),
    ("and/or swap", "y = a or b\n", "y = (a and b)\n"),
    ("not removal", "y = not a\n", "y = (a)\n"),
    ("not removal", "y = ~a & b\n", "y = (a) & b\n"),
    ("arithmetic swap", "y = a + b\n", "y = (a - b)\n"),
    ("arithmetic swap", "y = a * b\n", "y = (a / b)\n"),
    ("arithmetic swap", "y = a / b\n", "y = (a * b)\n"),
    ("arithmetic swap", "y += a\n", "y -= a\n"),
    ("integer constant", "y = 0\n", "y = (1)\n"),
    ("integer constant", "y = 1\n", "y = (0)\n"),
    ("integer constant", "y = 7\n", "y = (8)\n"),
    ("integer constant", "y = -1\n", "y = (0)\n"),
    ("string constant", "y = 'key'\n", "y = ('XXkeyXX')\n"),
    ("string constant", "y = ''\n", "y = ('XXXX')\n"),
    ("True/False swap", "y = True\n", "y = (False)\n"),
    ("True/False swap", "y = f(a, strict=False)\n", "y = f(a, strict=(True))\n"),
    ("return None", "def f(a):\n  return a + 1\n", "def f(a):\n  return None\n"),
    ("delete call statement", "def f(m):\n  m.load_weights('w')  # why\n  return m\n",
     "def f(m):\n  pass  # why\n  return m\n"),
    ("remove element", "y = [a, b, c]\n", "y = ([a, c])\n"),
    ("remove element", "y = (a, b)\n", "y = ((b,))\n"),
    ("slice off-by-one", "y = x[1:n]\n", "y = (x[1:n + 1])\n"),
    ("slice off-by-one", "y = x[1:n]\n", "y = (x[2:n])\n"),
    ("slice off-by-one", "y = x[:-1]\n", "y = (x[:0])\n"),
    ("index off-by-one", "y = x[0]\n", "y = (x[1])\n"),
    ("index off-by-one", "y = x[-1]\n", "y = (x[0])\n"),
    ("index off-by-one", "y = x[:, 2]\n", "y = (x[:, 3])\n"),
]


@pytest.mark.parametrize("operator,source,expected", _OPERATOR_CASES)
def test_each_operator_makes_the_single_edit_written_out(operator, source, expected):
  assert expected in _sources(source, operator)


def test_the_rest_of_the_file_is_left_byte_identical():
  source = "import os  # keep me\n\n\ndef f(a):\n  # a comment\n  return a < 3  # and me\n"
  mutant = next(m for m in runner.make_mutants(source).mutants if m.operator == "comparison swap")
  assert mutant.source == "import os  # keep me\n\n\ndef f(a):\n  # a comment\n  return (a <= 3)  # and me\n"
  assert (mutant.line, mutant.original, mutant.mutant) == (6, "a < 3", "(a <= 3)")


def test_docstrings_logging_and_raise_messages_are_counted_not_mutated():
  source = '''"""Module docstring."""
import logging


def check(age: int) -> None:
  """Function docstring."""
  logging.info("checking %d", age)
  print("age", age)
  if age < 0:
    raise ValueError(f"age {age} is negative; pass a positive age")
'''
  found = runner.make_mutants(source)
  # Two docstrings; delete + string in each of the two output statements; the f-string's two text parts.
  assert found.skipped == {"docstring": 2, "logging": 4, "message text": 2}
  assert sorted(m.mutant for m in found.mutants) == ["(1)", "(age <= 0)"]


def test_messages_built_outside_a_raise_are_message_text_too():
  source = "def error(path):\n  return OSError(f'cannot read {path}; re-copy it')\n"
  found = runner.make_mutants(source)
  assert found.skipped == {"message text": 2}
  assert [m.operator for m in found.mutants] == ["return None"]


def test_return_none_skips_functions_that_return_none():
  source = "def f() -> None:\n  return g()\n\n\ndef h():\n  return None\n"
  assert not _sources(source, "return None")


def test_annotations_and_format_specs_are_not_mutated():
  source = "def f(x: 'Tensor', y: list[int] = [1, 2]) -> 'Tensor':\n  return f'{x:.2f} of {y}'\n"
  mutants = runner.make_mutants(source).mutants
  texts = [m.mutant for m in mutants]
  assert "(f'{x:.2f}XX of XX{y}')" in texts     # the text part is mutated ...
  assert not any("XX.2f" in text or "XXTensor" in text for text in texts)   # ... the spec and annotations not
  assert "([2])" in texts and "([1])" in texts   # a default value is code that runs


def test_functions_restrict_mutations_to_their_bodies_nested_code_included():
  source = '''
LIMIT = 3


class Box:
  def area(self):
    def scale(value):
      return value * 2
    return scale(self.width) + 1

  def volume(self):
    return self.width * 3


def area(x):
  return x + 1
'''
  mutants = runner.make_mutants(source, ["Box.area"]).mutants
  assert mutants
  assert {m.function for m in mutants} == {"Box.area", "Box.area.scale"}
  plain = runner.make_mutants(source, ["area"]).mutants
  assert {m.function for m in plain} == {"Box.area", "Box.area.scale", "area"}


def test_every_mutant_of_a_project_module_parses_and_differs_from_the_original():
  with open(os.path.join(runner.REPO_ROOT, "pdx_tf", "training", "splits.py"), encoding="utf-8") as file:
    source = file.read()
  found = runner.make_mutants(source)
  assert not found.invalid
  assert len(found.mutants) > 30
  assert len({m.source for m in found.mutants}) == len(found.mutants)
  for mutant in found.mutants:
    compile(mutant.source, "splits.py", "exec")
    assert mutant.source != source


def test_keys_do_not_depend_on_line_numbers_and_the_sample_is_keyed():
  source = "def f(a, b):\n  return [a + b, a * b, a < b, 'x', 0]\n"
  moved = "# a new comment\n\n" + source
  keys = [m.key for m in runner.make_mutants(source).mutants]
  assert keys == [m.key for m in runner.make_mutants(moved).mutants]
  assert len(set(keys)) == len(keys)
  mutants = runner.make_mutants(source).mutants
  picked = [m.key for m in runner.sample(mutants, 4, seed=0)]
  assert len(picked) == 4
  assert {m.key for m in runner.sample(list(reversed(mutants)), 4, seed=0)} == set(picked)   # not by position
  assert [m.key for m in runner.sample(mutants, None, seed=0)] == keys
  other_seeds = {tuple(m.key for m in runner.sample(mutants, 4, seed=seed)) for seed in range(1, 6)}
  assert other_seeds - {tuple(picked)}   # the seed changes the draw


_TOY_MODULE = '''def is_adult(age):
  return age >= 18


def double(x):
  return x * 2
'''

_TOY_TEST = '''from toy import calc


def test_is_adult():  # misses the boundary, 18
  assert calc.is_adult(30)
  assert not calc.is_adult(17)


def test_double():
  assert calc.double(3) == 6
'''


def _toy_repository(tmp_path, test_text):
  repo = tmp_path / "repo"
  (repo / "toy").mkdir(parents=True)
  (repo / "tests").mkdir()
  (repo / "toy" / "__init__.py").write_text("")
  (repo / "toy" / "calc.py").write_text(_TOY_MODULE)
  (repo / "tests" / "calc_test.py").write_text(test_text)
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  copy = tmp_path / "copy"
  runner.copy_repository(str(repo), str(copy))
  return repo, copy


def test_run_on_a_toy_repository_kills_survives_and_excludes_the_equivalent(tmp_path):
  repo, copy = _toy_repository(tmp_path, _TOY_TEST)
  # Say the boundary mutant is equivalent (it is not; this checks the exclusion, not the judgement).
  boundary = next(m.key for m in runner.make_mutants(_TOY_MODULE).mutants if m.mutant == "(age > 18)")
  target = runner.Target(name="toy", module="toy/calc.py", tests=("tests/calc_test.py",),
                         equivalent=((boundary, "test of the exclusion"),))
  report = runner.run_target(target, repo_root=str(repo), copies=[str(copy)], max_mutants=None, seed=0,
                             timeout_factor=3.0, min_timeout_s=60.0, log=lambda line: None)

  assert report["imported_package_file"] == str(copy / "toy" / "__init__.py")
  outcomes = {(r["line"], r["mutant"]): r["status"] for r in report["results"]}
  assert outcomes == {
      (2, "return None"): "killed", (2, "(19)"): "survived",   # is_adult(18) is never asked
      (6, "return None"): "killed", (6, "(x / 2)"): "killed", (6, "(3)"): "killed",
  }
  assert report["equivalent_excluded"] == [boundary]
  assert (report["mutants"], report["killed"], report["timeouts"], report["survived"]) == (6, 4, 0, 1)
  assert report["score"] == pytest.approx(4 / 5)
  assert report["survivors"][0].startswith("toy/calc.py:2: 18 -> (19)")
  first = next(r for r in report["results"] if (r["line"], r["mutant"]) == (2, "return None"))
  assert first["killed_by"].startswith("FAILED tests/calc_test.py::test_is_adult")
  assert (copy / "toy" / "calc.py").read_text() == _TOY_MODULE   # restored after every mutant


def test_a_test_run_past_its_timeout_is_stopped_with_its_children(tmp_path):
  hang = ("import subprocess, sys, time\n\n\ndef test_hangs():\n"
          "  subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n  time.sleep(600)\n")
  _, copy = _toy_repository(tmp_path, hang)
  status, seconds, _ = runner.run_tests(str(copy), ["tests/calc_test.py"], timeout_s=2.0)
  assert status == "timeout"
  assert seconds < 30


def test_a_function_name_the_module_lacks_is_reported():
  found = runner.make_mutants("def f(a):\n  return a + 1\n", ["f", "renamed_away"])
  assert found.unmatched == ["renamed_away"]
  assert found.mutants
