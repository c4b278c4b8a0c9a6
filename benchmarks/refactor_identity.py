"""Proof that a behaviour-preserving change preserved behaviour: hashes of the demo's records and a tiny grid.

Runs, through the public command lines only (so the same script works before and after a package move):
  1. the data pipeline on the embedded demo phantom cohort (40 patients) at the demo's 48 px, 8 copies a slice;
  2. `python -m train` on those records: a fixed-seed `--deterministic` grid of 2 folds x 1 repeat, 1 epoch,
     alpha 0.35 (CPU op determinism makes its predictions reproducible);
and prints one sha256 per output file whose bytes are meant to be reproducible (shards, QC montages, splits,
patients.csv, predictions, metrics), plus one digest over all of them. Files holding provenance (code
version, wall time, absolute paths: dataset.json, run.json, config.json) are left out.

    python benchmarks/refactor_identity.py --work_dir=/tmp/identity_before > before.txt   # on the old commit
    python benchmarks/refactor_identity.py --work_dir=/tmp/identity_after > after.txt     # on the new one
    diff before.txt after.txt && echo identical

Takes about 2-3 minutes on 2 CPU cores.
"""

import argparse
import hashlib
import os
import subprocess
import sys

REPRODUCIBLE_SUFFIXES = (".tfrecord", ".png", ".csv")
REPRODUCIBLE_NAMES = ("splits.json", "metrics.json")


def _run(arguments: list[str], cwd: str) -> None:
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONHASHSEED="0")
  subprocess.run([sys.executable, "-m", *arguments], cwd=cwd, check=True, env=environment,
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _demo_manifest(cwd: str) -> str:
  code = "from pdx_tf import phantom; print(phantom.write_demo_cohort(phantom.demo_cohort_dir()))"
  return subprocess.run([sys.executable, "-c", code], cwd=cwd, check=True, capture_output=True,
                        text=True).stdout.strip().splitlines()[-1]


def _digests(folder: str) -> dict[str, str]:
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      if not (name.endswith(REPRODUCIBLE_SUFFIXES) or name in REPRODUCIBLE_NAMES):
        continue
      if "tensorboard" in root:  # event files carry wall-clock timestamps
        continue
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        found[os.path.relpath(path, folder)] = hashlib.sha256(handle.read()).hexdigest()
  return found


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", required=True, help="Scratch folder (created; must not hold old output).")
  parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = parser.parse_args()
  records, runs = os.path.join(args.work_dir, "records"), os.path.join(args.work_dir, "runs")
  manifest = _demo_manifest(args.repo)
  _run(["data_pipeline", f"--manifest={manifest}", f"--output_dir={records}", "--image_size=48",
        "--augment_factor=8", "--num_workers=1", "--noprogress"], args.repo)
  _run(["train", "--task=p", f"--records_dir={records}", f"--output_dir={runs}", "--num_folds=2",
        "--num_repeats=1", "--epochs=1", "--image_size=48", "--alpha=0.35", "--batch_size=64",
        "--learning_rate=0.002", "--deterministic", "--seed=3"], args.repo)
  everything = hashlib.sha256()
  for label, folder in (("records", records), ("runs", runs)):
    for relative, digest in sorted(_digests(folder).items()):
      print(f"{digest}  {label}/{relative}")
      everything.update(f"{label}/{relative}:{digest}\n".encode())
  print(f"{everything.hexdigest()}  ALL")


if __name__ == "__main__":
  main()
