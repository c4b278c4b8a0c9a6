"""Proof that adding the PCI region labels left the demo's images and labels alone (issue 20).

Writes (or finds cached) the default 40-patient demo phantom cohort and runs the data pipeline on it with the demo
preset (48 px, 8 copies a slice), then prints, per patient, sha256 digests of what must not change:
  dicom   every DICOM file's bytes (sorted by relative path);
  masks   the mask arrays nodule_mask, small_bowel_nodule_mask, z_mm, abdomen_z_range_mm (pci_region_map, new, is
          left out);
  labels  label_p, label_sb of the cohort manifest;
  images  every record example's PNG bytes, slice index, augmentation index, z, label_p and label_sb (the new
          pci_scores feature and the covariates, whose `pci` is now the regions' sum, are left out).

    git archive <old commit> | tar -x -C /tmp/old && (cd /tmp/old && PDX_TF_CACHE=/tmp/old_cache \\
        python /path/to/this/script --work_dir=/tmp/old_work --repo=/tmp/old) > before.txt
    PDX_TF_CACHE=/tmp/new_cache python benchmarks/pci_data_identity.py --work_dir=/tmp/new_work > after.txt
    diff before.txt after.txt && echo identical

Run it with a fresh PDX_TF_CACHE per commit (the cohort cache is keyed by the generator's source, so each commit
writes its own cohort). Takes a few minutes on 2 CPU cores.
"""

import argparse
import glob
import hashlib
import json
import os
import subprocess
import sys

_CODE = """
import sys
from pdx_tf.data import pipeline
if __name__ == "__main__":
  config = pipeline.demo_config(sys.argv[1])
  result = pipeline.run_pipeline(config, progress=False)
  assert result.ok, result.failures
  print(config.manifest_path)
"""
_MASK_ARRAYS = ("nodule_mask", "small_bowel_nodule_mask", "z_mm", "abdomen_z_range_mm")


def _digest_records(records_dir: str, repo: str) -> dict[str, str]:
  """patient_id -> sha256 over its examples' image and label bytes (run in `repo`'s code)."""
  code = """
import glob, hashlib, json, os, sys
import tensorflow as tf
from pdx_tf.data import records
folder = sys.argv[1]
names = tuple(json.load(open(os.path.join(folder, "dataset.json")))["covariate_names"])
by_patient = {}
for path in sorted(glob.glob(os.path.join(folder, "original", "*")) + glob.glob(os.path.join(folder, "augmented", "*"))):
  for raw in tf.data.TFRecordDataset(path):
    ex = records.parse_example(raw, names, decode_image=False)
    key = (int(ex["slice_index"]), int(ex["augmentation_index"]))
    by_patient.setdefault(ex["patient_id"].numpy().decode(), {})[key] = (
        hashlib.sha256(ex["image"].numpy()).hexdigest(), float(ex["z_mm"]), int(ex["label_p"]), int(ex["label_sb"]))
print(json.dumps({pid: hashlib.sha256(json.dumps(sorted(v.items())).encode()).hexdigest()
                  for pid, v in by_patient.items()}))
"""
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=repo)
  out = subprocess.run([sys.executable, "-c", code, records_dir], cwd=repo, check=True, capture_output=True,
                       text=True, env=environment).stdout
  return json.loads(out.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--work_dir", required=True, help="Scratch folder for the records (created).")
  parser.add_argument("--repo", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  args = parser.parse_args()
  import numpy as np  # pylint: disable=import-outside-toplevel

  records_dir = os.path.join(args.work_dir, "records")
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=args.repo)
  script = os.path.join(args.work_dir, "run_pipeline.py")
  os.makedirs(args.work_dir, exist_ok=True)
  with open(script, "w", encoding="utf-8") as handle:
    handle.write(_CODE)
  manifest = subprocess.run([sys.executable, script, records_dir], cwd=args.repo, check=True, capture_output=True,
                            text=True, env=environment).stdout.strip().splitlines()[-1]
  cohort = os.path.dirname(manifest)
  with open(manifest, encoding="utf-8") as handle:
    header, *rows = [line.split(",") for line in handle.read().splitlines()]
  images = _digest_records(records_dir, args.repo)
  for row in rows:
    values = dict(zip(header, row))
    patient_id = values["patient_id"]
    dicom = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(cohort, "dicom", patient_id, "**", "*"), recursive=True)):
      if os.path.isfile(path):
        with open(path, "rb") as handle:
          dicom.update(os.path.relpath(path, cohort).encode() + b"\0" + handle.read())
    arrays = np.load(os.path.join(cohort, "masks", f"{patient_id}.npz"))
    masks = hashlib.sha256(b"".join(np.ascontiguousarray(arrays[name]).tobytes() for name in _MASK_ARRAYS))
    print(f"{patient_id} dicom {dicom.hexdigest()}")
    print(f"{patient_id} masks {masks.hexdigest()}")
    print(f"{patient_id} labels {values['label_p']} {values['label_sb']}")
    print(f"{patient_id} images {images[patient_id]}")


if __name__ == "__main__":
  main()
