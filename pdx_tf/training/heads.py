"""The model heads, each declared once: what it is built by, what it reads, how it scores a patient, what it serves.

A head is one row of `HEADS`. Everything that used to compare a head's name (training, the input pipeline,
export, predict, the `--head` flag) asks this table for the property it needs instead:

- `builder`: the name of the `pdx_tf.training.model` function that builds it from a ModelConfig. A name rather
  than the function so this module imports nothing of the project (model.py validates its config against this
  table; importing model.py here would be a loop). tests/heads_test.py checks every name resolves.
- `input_kind`: SLICES (one image a sample: a slice, or its 2.5D stack when --context_slices > 0; trained on the
  stored copies or on stacks built from the originals) or BAGS (one bag of a patient's slices a sample).
- `patient_score`: AGGREGATED (the grid's fixed rule, pdx_tf.training.aggregation, over the slice scores) or
  OWN (the model's own patient output, e.g. attention pooling). A head with its own score has the fixed
  `aggregation_name` the run records (run.json "aggregation").
- `evidence`: what says where the model looked: GRADCAM (Grad-CAM of the slice classifier, predict's overlays)
  and, for MIL, ATTENTION (each slice's attention weight), or SLICE_SCORES (per-output slice scores along z: the
  regions head's argmax slice of each region, the pointing game of benchmarks/regions_benchmark.py).
- `serving_outputs`: the outputs of the export's patient signature beyond the shared ones.
- `tasks`: the training tasks (`train --task`) it learns; `default_head(task)` is the first head for a task.
- `joint_capable`: whether it can carry the joint task's two outputs (`ModelConfig.joint_heads`).
- `needs_learned_features`: cannot start from random weights (MIL: `--mil_init_from` or pretrained weights).
- `num_outputs`: its output columns a slice (or bag): 1, or NUM_PCI_REGIONS for the regions head.

Adding a head: its builder in model.py, its row here, and what is new about it in the code that reads the
properties (nothing, when it reuses the existing kinds).
"""

from __future__ import annotations

import dataclasses

from pdx_tf import contracts

SLICES = "slices"  # a sample is one slice (or its 2.5D stack)
BAGS = "bags"  # a sample is one patient's bag of slices
AGGREGATED = "aggregated"  # patient score: the grid's fixed rule over slice scores
OWN = "own"  # patient score: the model's own patient output
GRADCAM = "gradcam"
ATTENTION = "attention"
SLICE_SCORES = "slice_scores"
INPUT_KINDS = (SLICES, BAGS)
PATIENT_SCORES = (AGGREGATED, OWN)


@dataclasses.dataclass(frozen=True)
class Head:
  """One head (module docstring for each field)."""

  name: str
  builder: str
  input_kind: str
  patient_score: str
  evidence: tuple[str, ...]
  serving_outputs: tuple[str, ...]
  tasks: tuple[str, ...]
  description: str
  joint_capable: bool = False
  needs_learned_features: bool = False
  aggregation_name: str | None = None  # with patient_score OWN: the name run.json records as its "aggregation"
  num_outputs: int = 1

  def __post_init__(self):
    if self.input_kind not in INPUT_KINDS:
      raise ValueError(f"head {self.name}: input_kind must be one of {INPUT_KINDS}, got {self.input_kind!r}")
    if self.patient_score not in PATIENT_SCORES:
      raise ValueError(f"head {self.name}: patient_score must be one of {PATIENT_SCORES}, got {self.patient_score!r}")
    if (self.patient_score == OWN) != (self.aggregation_name is not None):
      raise ValueError(f"head {self.name}: a head with its own patient score names it (aggregation_name), others not")
    if self.num_outputs < 1:
      raise ValueError(f"head {self.name}: num_outputs must be at least 1")

  @property
  def bags(self) -> bool:
    """Whether a sample is a patient's bag (training, validation and the inner loss work a patient at a time)."""
    return self.input_kind == BAGS

  @property
  def own_patient_score(self) -> bool:
    return self.patient_score == OWN


SLICE = Head(
    name="slice", builder="build_slice_model", input_kind=SLICES, patient_score=AGGREGATED, evidence=(GRADCAM,),
    serving_outputs=(), tasks=(*contracts.TASKS, contracts.JOINT_TASK), joint_capable=True,
    description="the paper's slice classifier; a fixed rule (--aggregation) makes the patient score")
ATTENTION_MIL = Head(
    name="attention_mil", builder="build_mil_model", input_kind=BAGS, patient_score=OWN,
    evidence=(GRADCAM, ATTENTION), serving_outputs=("attention",), tasks=contracts.TASKS,
    needs_learned_features=True, aggregation_name="attention",
    description="gated attention over a patient's slices, trained on the patient label")
REGIONS = Head(
    name="regions", builder="build_region_model", input_kind=SLICES, patient_score=AGGREGATED,
    evidence=(SLICE_SCORES, GRADCAM), serving_outputs=("region_probabilities", "region_names"),
    tasks=(contracts.PCI_TASK,), num_outputs=contracts.NUM_PCI_REGIONS,
    description=f"one sigmoid a PCI region ({contracts.NUM_PCI_REGIONS}) on the slice model, each region's"
                " patient score by --aggregation over its slice scores (--task=regions)")

HEADS: dict[str, Head] = {head.name: head for head in (SLICE, ATTENTION_MIL, REGIONS)}
DEFAULT_HEAD = SLICE.name


def names() -> tuple[str, ...]:
  """Every head's name, in declaration order (the `--head` flag's choices)."""
  return tuple(HEADS)


def get(name: str) -> Head:
  """The head called `name`; ValueError naming the heads otherwise."""
  try:
    return HEADS[name]
  except (KeyError, TypeError):
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {name!r}") from None


def default_head(task: str) -> str:
  """The head a grid of `task` uses when --head is not given: the first head that learns it."""
  for head in HEADS.values():
    if task in head.tasks:
      return head.name
  raise ValueError(f"no head learns task {task!r}")


def check_task(name: str, task: str) -> Head:
  """The head `name` if it learns `task`; ValueError saying which head does otherwise."""
  head = get(name)
  if task not in head.tasks:
    raise ValueError(f"--head={name} does not learn --task={task}; use --head={default_head(task)} (or leave --head"
                     " unset)")
  return head


def flag_help() -> str:
  """The `--head` flag's help: each head and what it is."""
  return "; ".join(f"{head.name}: {head.description}" for head in HEADS.values()) + "."
