"""The presets: the paper's protocol, the 10-minute demo and the sb demo, in one table for the pipeline and training.

Each preset maps flag names (the binaries' flags, without `--`) to values. The binaries apply a preset and
then every flag given on the command line, through `apply` below, and refuse a flag the run would ignore, so
what is printed in config.json is what ran. `configs/<name>.flags` hold the same values for use with
`--flagfile`; `tests/presets_test.py` checks they agree with this table.

    paper: 224 px, ImageNet MobileNetV2, 20 epochs, 8 folds x 24 repeats, ~960 augmented copies a slice.
    demo:  the phantom cohort at 48 px, alpha 0.35 from scratch, 5 epochs, 8 folds x 1 repeat, 8 copies a slice;
           about 8 minutes on 2 CPU cores (benchmarks/README.md).
    demo_sb: the small-bowel demo: a 3x larger phantom cohort (120 patients) at 96 px, one joint grid for p and
           sb (--task=p,sb), 4 folds x 1 repeat, 5 epochs of 4,096 images, each head's threshold fitted on
           inner patients (Youden); `python -m train
           --flagfile=configs/demo_sb.flags`. It exists because the 40-patient demo cannot show sb: even an oracle
           with exact slice labels barely learns its 38 nodule slices (slice AUC 0.57-0.60), while on 120 patients
           it reaches 0.77 at 96 px and the weak-label grids sb 0.72-0.75 (benchmarks/README.md).
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

# The demo phantom cohort's size (patients; pdx_tf.phantom.PhantomConfig's default). A demo row may set its own
# with the train binary's --demo_patients, a flag of the demo path only (not a TrainConfig field).
DEMO_PATIENTS = 40
DEMO_ONLY_FLAGS = ("demo_patients",)

# The data pipeline: image size and augmentation. The demo's small blocks keep its pool fraction of 0.25 a
# draw of 2 of its 8 copies (a block is the draw's resolution, pdx_tf/training/input_pipeline.py).
PIPELINE_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"image_size": 224, "augment_factor": 960, "augment_block": 2},
    "demo": {"image_size": 48, "augment_factor": 8, "augment_block": 2},
    "demo_sb": {"image_size": 96, "augment_factor": 8, "augment_block": 2},
}

# Training. Settings the paper does not state and the paper preset chooses: Adam 1e-4 (fine-tuning ImageNet
# weights), batch 32, 10 % of each slice's copies drawn per repeat, the originals included, top-3-mean
# aggregation, and an epoch of 16,000 images (see configs/paper.flags for the budget it keeps).
# The demo: 48 px keeps the omental cake (3-6 px) and runs ~1.5x faster than 64 px; batch 64 is ~2x faster per
# image than 16 on a CPU, and 2e-3 makes up for the fewer steps.
TRAIN_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"image_size": 224, "alpha": 1.0, "weights": "imagenet", "epochs": 20, "num_folds": 8,
              "num_repeats": 24, "batch_size": 32, "learning_rate": 1e-4, "pool_fraction": 0.1,
              "images_per_epoch": 16000, "include_originals": True, "precision": "auto",
              "aggregation": "topk_mean", "top_k": 3, "seed": 0},
    "demo": {"image_size": 48, "alpha": 0.35, "weights": "none", "num_folds": 8, "num_repeats": 1, "epochs": 5,
             "batch_size": 64, "learning_rate": 2e-3, "pool_fraction": 0.25, "precision": "float32",
             "aggregation": "mean", "top_k": 3},
    # The demo row at 96 px on 120 patients, as measured in benchmarks/README.md ("The grid on the 3x larger
    # phantom cohort"): 4 folds (30 test patients a fold, 7-8 sb-positive) and epochs of 4,096 images (about
    # the 40-patient demo's epoch, so 3x the patients do not cost 3x the training); the joint task because one
    # grid gives both p and sb at the cost of one. Each head's operating threshold is Youden's on a fifth of the
    # cell's training patients: at 0.5 the sb head, 1 positive in 4, found a third of the sb patients.
    "demo_sb": {"task": "p,sb", "demo_patients": 120, "image_size": 96, "alpha": 0.35, "weights": "none",
                "num_folds": 4, "num_repeats": 1, "epochs": 5, "batch_size": 64, "learning_rate": 2e-3,
                "pool_fraction": 0.25, "images_per_epoch": 4096, "precision": "float32", "aggregation": "mean",
                "top_k": 3, "inner_fraction": 0.2, "threshold": "inner_youden"},
}


def apply(preset: Mapping[str, Any], defaults: Mapping[str, Any], given: Mapping[str, Any],
          refused: Iterable[str] = (), why: str = "") -> dict[str, Any]:
  """The values a run uses: `defaults`, then the preset, then the flags given explicitly (which win).

  Args:
    preset: flag name -> value (a row of PIPELINE_PRESETS or TRAIN_PRESETS).
    defaults: every flag the run reads -> its default.
    given: the flags set on the command line -> their values.
    refused: flags this kind of run would ignore; giving one is an error rather than silently dropped.
    why: the end of that error's sentence (what to do instead).

  Raises:
    ValueError: a given flag is refused, or the preset names a flag the run does not read.
  """
  unknown = sorted(set(preset) - set(defaults))
  if unknown:
    raise ValueError(f"the preset sets {', '.join(unknown)}, which this binary does not read")
  ignored = sorted(set(given) & set(refused))
  if ignored:
    raise ValueError(f"--{', --'.join(ignored)} {'is' if len(ignored) == 1 else 'are'} not used here; {why}")
  return {**defaults, **preset, **given}


def flag_lines(values: Mapping[str, Any]) -> list[str]:
  """`--name=value` lines of a flagfile (`--name` / `--noname` for booleans), in the table's order."""
  lines = []
  for name, value in values.items():
    if isinstance(value, bool):
      lines.append(f"--{name}" if value else f"--no{name}")
    else:
      lines.append(f"--{name}={value:g}" if isinstance(value, float) else f"--{name}={value}")
  return lines
