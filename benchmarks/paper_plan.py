"""The plan of configs/paper.flags on a PAPER-SHAPED records folder, without images or disk.

Builds a records folder shaped like the paper's cohort: --num_patients patients x --slices abdominal slices x
(1 + --augment_factor) images at 224 px, one channel (one window), augmented copies in blocks of
--augment_block (one file a block: 2 copies x 40 slices x ~21 KB = ~1.7 MB, under the pipeline's 150 MiB shard
limit), labels p and sb at --positive_fraction (alternating, so every fold holds both classes). dataset.json
follows the schema-2 contract (pdx_tf/data/pipeline.py build_dataset_json, pdx_tf/testing/fake_records.py); the shard
files are SPARSE (os.truncate to their size: no disk used, no image inside). Their sizes: --png_bytes per image
(21,018 B: a 1-channel 224 px phantom slice PNG, measured) + 16 B TFRecord framing + --feature_bytes (the
example's other features). `python -m train --plan` only stats the files (verify_hashes is off by default).

Then runs, for each --images_per_s (a throughput you give: the defaults are ASSUMED; the H200 figures measured
under Keras' JAX backend are in benchmarks/README.md, "GPU", and are not TensorFlow's own):
  python -m train --flagfile=configs/paper.flags --task=p --records_dir=<folder> --output_dir=<tmp> \
      --plan --plan_images_per_s=<N>

  PYTHONPATH=. python benchmarks/paper_plan.py
  PYTHONPATH=. python benchmarks/paper_plan.py --images_per_s=500,1500,4000 --extra_flags=--images_per_epoch=8000
  PYTHONPATH=. python benchmarks/paper_plan.py --images_per_s=2496,3664,4745 --source="measured: H200, Keras JAX"
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile

from absl import app, flags

_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 227, "patients (the paper's cohort)")
_SLICES = flags.DEFINE_integer("slices", 40, "abdominal slices a patient")
_AUGMENT_FACTOR = flags.DEFINE_integer("augment_factor", 960, "augmented copies a slice")
_AUGMENT_BLOCK = flags.DEFINE_integer("augment_block", 2, "copies a block file (the pipeline's default)")
_POSITIVE_FRACTION = flags.DEFINE_float("positive_fraction", 0.5, "share of patients with label 1 (p and sb)")
_PNG_BYTES = flags.DEFINE_integer("png_bytes", 21_018, "PNG bytes of one 1-channel 224 px image (measured)")
_FEATURE_BYTES = flags.DEFINE_integer("feature_bytes", 100, "bytes of an example's other features")
_IMAGES_PER_S = flags.DEFINE_list("images_per_s", ["500", "1500", "4000"],
                                  "throughputs to plan at (ASSUMED unless --source says where they were measured)")
_SOURCE = flags.DEFINE_string("source", "ASSUMED, NOT MEASURED", "where the --images_per_s figures come from")
_TASK = flags.DEFINE_string("task", "p", "task")
_EXTRA_FLAGS = flags.DEFINE_list("extra_flags", [], "more flags for python -m train (after the flagfile)")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "where the records go (default: a temp folder, removed)")

FRAME_BYTES = 16  # TFRecord framing: length (8) + its CRC (4) + data CRC (4).
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sparse(path: str, size: int) -> None:
  with open(path, "wb") as handle:
    handle.truncate(size)  # A hole: the size a stat reports, no block on disk.


def build_paper_shaped_records(records_dir: str) -> dict:
  """Writes dataset.json and sparse shard files; returns the dataset.json dict."""
  from pdx_tf import io_utils  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import records, shards as shards_lib  # pylint: disable=import-outside-toplevel

  os.makedirs(os.path.join(records_dir, shards_lib.ORIGINAL_DIR), exist_ok=True)
  os.makedirs(os.path.join(records_dir, shards_lib.AUGMENTED_DIR), exist_ok=True)
  example_bytes = _PNG_BYTES.value + FRAME_BYTES + _FEATURE_BYTES.value
  slices, factor, block_size = _SLICES.value, _AUGMENT_FACTOR.value, _AUGMENT_BLOCK.value
  num_blocks = -(-factor // block_size)
  # Labels: the first round(fraction * n) of an alternating order are positive, spread over the cohort.
  num_positive = round(_POSITIVE_FRACTION.value * _NUM_PATIENTS.value)
  order = list(range(0, _NUM_PATIENTS.value, 2)) + list(range(1, _NUM_PATIENTS.value, 2))
  positive = set(order[:num_positive])
  patients, shard_entries = [], []
  for index in range(_NUM_PATIENTS.value):
    patient_id = f"paper{index:03d}"
    label = int(index in positive)
    entries = [{"path": shards_lib.original_path(patient_id), "kind": "original", "patient_id": patient_id,
                "num_examples": slices}]
    for block in range(num_blocks):
      copies = min(factor, (block + 1) * block_size) - block * block_size
      entries.append({"path": shards_lib.augmented_path(patient_id, block), "kind": "augmented",
                      "patient_id": patient_id, "block": block, "num_examples": slices * copies})
    for entry in entries:
      entry["num_bytes"] = entry["num_examples"] * example_bytes
      entry["sha256"] = "0" * 64  # Not checked without --verify_hashes; the files hold no records.
      _sparse(os.path.join(records_dir, entry["path"]), entry["num_bytes"])
    shard_entries.extend(entries)
    patients.append({"patient_id": patient_id, "label_p": label, "label_sb": label, "covariates": {},
                     "num_slices": slices, "z_range_mm": [0.0, 5.0 * (slices - 1)], "z_range_rule": "synthetic",
                     "warnings": [], "original_shards": [entries[0]["path"]],
                     "augmented_shards": [entry["path"] for entry in entries[1:]],
                     "num_original_examples": slices, "num_augmented_examples": slices * factor,
                     "num_augmented_blocks": num_blocks})
  shard_entries.sort(key=lambda entry: entry["path"])
  document = {
      "format": "pdx-tf-dataset", "schema_version": records.SCHEMA_VERSION, "code_version": "paper_plan",
      "config": {}, "seed": 0, "augment_factor": factor, "augment_block": block_size,
      "preprocess": {"image_size": 224, "windows": [[40.0, 400.0]], "body_threshold_hu": -500.0,
                     "crop_margin_fraction": 0.04},
      "augment": {"rotation_max_deg": 15.0, "flip_probability": 0.5, "scale_min": 0.9, "scale_max": 1.1},
      "covariate_names": [], "patients": patients, "shards": shard_entries,
      "counts": {"patients": len(patients), "failed_patients": 0, "slices": slices * len(patients),
                 "original_examples": slices * len(patients), "augmented_examples": slices * factor * len(patients),
                 "shards": len(shard_entries)}}
  io_utils.atomic_write_json(os.path.join(records_dir, "dataset.json"), document)
  return document


def main(argv):
  del argv
  work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="paper-plan-")
  try:
    records_dir = os.path.join(work_dir, "records")
    document = build_paper_shaped_records(records_dir)
    counts = document["counts"]
    stored = sum(entry["num_bytes"] for entry in document["shards"])
    used = sum(os.stat(os.path.join(root, name)).st_blocks * 512
               for root, _, names in os.walk(records_dir) for name in names)
    print(f"paper-shaped records: {counts['patients']} patients x {_SLICES.value} slices x (1 + {_AUGMENT_FACTOR.value})"
          f" images at 224 px, 1 channel, blocks of {_AUGMENT_BLOCK.value}; {counts['shards']} shard files, "
          f"{stored / 1024**3:.1f} GiB as listed, {used / 1024**2:.1f} MiB really on disk (sparse)\n")
    for images_per_s in _IMAGES_PER_S.value:
      command = [sys.executable, "-m", "train", "--flagfile=configs/paper.flags", f"--task={_TASK.value}",
                 f"--records_dir={records_dir}", f"--output_dir={os.path.join(work_dir, 'runs')}", "--plan",
                 f"--plan_images_per_s={images_per_s}", *_EXTRA_FLAGS.value]
      print(f"$ {' '.join(command[1:])}\n(throughput {images_per_s} images/s: {_SOURCE.value})")
      done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False,
                            env=dict(os.environ, PYTHONPATH=REPO))
      print(done.stdout.rstrip() or done.stderr.rstrip())
      print()
    print(json.dumps({"work_dir": work_dir}))
  finally:
    if _WORK_DIR.value is None:
      shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
