"""Tests of the head registry (issue 19, item 3): a head is declared once in pdx_tf/training/heads.py."""

import pathlib
import re

import pytest

from pdx_tf import contracts
from pdx_tf.training import heads, model as model_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_head_names_a_builder_that_exists():
  for head in heads.HEADS.values():
    assert callable(getattr(model_lib, head.builder, None)), head.name


def test_lookup_and_task_checks():
  assert heads.get("slice") is heads.SLICE
  with pytest.raises(ValueError, match="head must be one of slice, attention_mil"):
    heads.get("nope")
  assert heads.default_head("p") == "slice" and heads.default_head(contracts.JOINT_TASK) == "slice"
  with pytest.raises(ValueError, match="does not learn"):
    heads.check_task("attention_mil", contracts.JOINT_TASK)
  assert heads.ATTENTION_MIL.bags and heads.ATTENTION_MIL.own_patient_score
  assert not heads.SLICE.bags and not heads.SLICE.own_patient_score


def test_a_bad_declaration_is_refused():
  with pytest.raises(ValueError, match="input_kind"):
    heads.Head(name="x", builder="b", input_kind="voxels", patient_score=heads.AGGREGATED, evidence=(),
               serving_outputs=(), tasks=("p",), description="")
  with pytest.raises(ValueError, match="aggregation_name"):
    heads.Head(name="x", builder="b", input_kind=heads.BAGS, patient_score=heads.OWN, evidence=(),
               serving_outputs=(), tasks=("p",), description="")


def test_no_code_outside_the_registry_compares_a_head_name():
  # The defect: `head == "attention_mil"` in many files. Every head name, quoted, compared with == / !=.
  names = "|".join(re.escape(name) for name in heads.names())
  pattern = re.compile(rf"""head\S*\s*(==|!=)\s*["']({names})["']|["']({names})["']\s*(==|!=)\s*\S*head""")
  offenders = []
  for folder in ("pdx_tf", "train", "export", "predict", "evaluate", "data_pipeline"):
    for path in sorted((ROOT / folder).rglob("*.py")):
      if path.name == "heads.py":
        continue
      for number, line in enumerate(path.read_text().splitlines(), 1):
        if pattern.search(line):
          offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
  assert not offenders, "\n".join(offenders)


def test_the_head_flag_lists_the_registry():
  text = (ROOT / "train" / "__main__.py").read_text()
  assert "heads.names()" in text and "attention_mil\"]" not in text
