"""Cohort prediction benchmark: wall time of `python -m predict --manifest` (Grad-CAM off), target <= 120 s for the
40-patient demo cohort with the demo's 8 models on 2 CPU cores.

Full run (needs the demo's trained runs, `python -m train --task=p`, about 8 minutes, and their export):
  python -m export --runs_dir=runs/demo/p --task=p --export_dir=runs/demo/exports
  python benchmarks/predict_benchmark.py --model=runs/demo/exports/pdx_p \
      --manifest="$(python -c 'from pdx_tf.data import pipeline; print(pipeline.demo_manifest_path())')"
Small run (no training needed): fake exports (8 untrained MobileNetV2 cells, alpha 0.35, at --image_size) and
--num_patients phantom patients of the demo's kind (256 px matrix, 5 mm slices); the figure is labelled as such.
  python benchmarks/predict_benchmark.py --num_patients=4

Prints one JSON line: what was run, the wall time of the whole cohort (process start-up and export loading
included, as a user sees it) and seconds per patient.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_MODEL = flags.DEFINE_multi_string("model", None, "exports to use (default: fake 8-model exports)")
_MANIFEST = flags.DEFINE_string("manifest", None, "cohort manifest (default: --num_patients phantom patients)")
_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 4, "phantom patients for the small run")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 48, "fake models' image size (the demo's: 48)")
_NUM_MODELS = flags.DEFINE_integer("num_models", 8, "fake models in the ensemble (the demo's: 8)")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "worker processes")


def _small_setup(root: str) -> tuple[list[str], str]:
  from pdx_tf import phantom  # pylint: disable=import-outside-toplevel
  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel
  from pdx_tf.testing import fake_cells  # pylint: disable=import-outside-toplevel

  cells = tuple((0, fold) for fold in range(_NUM_MODELS.value))
  folders = fake_cells.write_fake_cells(os.path.join(root, "runs"), "p", cells=cells, image_size=_IMAGE_SIZE.value)
  model = export.export_models(folders, os.path.join(root, "X"), "p")
  config = phantom.PhantomConfig(num_patients=_NUM_PATIENTS.value)
  lines = ["patient_id,dicom_dir,label_p,label_sb"]
  for index in range(_NUM_PATIENTS.value):
    patient = phantom.generate_patient(config, index)
    folder = os.path.join(root, "studies", f"s{index}")
    phantom.write_ct_series(folder, patient.hu, patient.z_mm, config.pixel_spacing_mm, key=100 + index,
                            patient_index=index)
    lines.append(f"b{index:03d},{folder},{patient.label_p},{patient.label_sb}")
  manifest = os.path.join(root, "manifest.csv")
  with open(manifest, "w", encoding="utf-8") as handle:
    handle.write("\n".join(lines) + "\n")
  return [model], manifest


def main(argv):
  del argv
  root = tempfile.mkdtemp(prefix="predict-benchmark-")
  small = _MODEL.value is None or _MANIFEST.value is None
  models, manifest = (_small_setup(root) if small else (_MODEL.value, _MANIFEST.value))
  output_dir = os.path.join(root, "out")
  command = [sys.executable, "-m", "predict", *(f"--model={model}" for model in models), f"--manifest={manifest}",
             f"--output_dir={output_dir}", "--gradcam_slices=0", f"--num_workers={_NUM_WORKERS.value}",
             "--noprogress"]
  import subprocess  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  result = subprocess.run(command, capture_output=True, text=True, check=False,
                          cwd=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
  wall = time.perf_counter() - start
  if result.returncode != 0:
    print(result.stderr[-3000:], file=sys.stderr)
    sys.exit(1)
  with open(os.path.join(output_dir, "patient_predictions.csv"), encoding="utf-8") as handle:
    patients = len({line.split(",")[1] for line in handle.readlines()[1:]})
  print(json.dumps({
      "kind": ("SMALL: fake untrained exports, phantom patients" if small else "full: given exports and manifest"),
      "num_patients": patients, "num_models": _NUM_MODELS.value if small else None, "num_workers": _NUM_WORKERS.value,
      "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0], "wall_s": round(wall, 1),
      "s_per_patient": round(wall / max(patients, 1), 2), "output": result.stdout.strip().splitlines()}))


if __name__ == "__main__":
  app.run(main)
