"""Does Grad-CAM look at the disease? The localisation ratio (and a lesion occlusion check) of trained models on
the demo phantom.

Example (after `python -m train --task=p` and `python -m export --runs_dir=runs/p --task=p --export_dir=exports`):
  python benchmarks/localisation_benchmark.py --model=exports/pdx_p
  python benchmarks/localisation_benchmark.py --runs_dir=runs/p --task=p --max_models=8

For every positive patient of the demo cohort (label_p, or label_sb with --task=sb), the study is read like
`predict` reads it (`region.load_abdomen`), the phantom's lesion masks (`masks/<pid>.npz`: nodule_mask for p,
small_bowel_nodule_mask for sb) are aligned by slice position and mapped through the same body crop and resize
as the slices (`gradcam.map_masks_to_model_grid`), and the models' mean Grad-CAM is computed on every slice
with lesion pixels. Printed: the share of Grad-CAM mass on lesion pixels, their share of the body area, and the
ratio of the two (`gradcam.localisation_ratio`; 1 = chance, higher = better localisation).

Also printed: the models' mean probability of those slices as read, and with the lesion pixels filled with fat
(`occlusion_probabilities`), a causal check beside Grad-CAM.

Measured (2026-11-29, demo preset of pdx_tf/demo: 48 px, 8 folds, 5 epochs; patient AUC 0.81 per cell,
0.82 pooled), out-of-fold: ratio 1.29 at block_3_expand_relu (12x12, the default at 48 px); probability 0.68 as
read, 0.37 with the disease erased. The earlier demo without the omental cake (64 px, AUC 0.56-0.69) gave 0.90
at out_relu (2x2) and 1.15 at block_13_expand_relu. See benchmarks/README.md. The Grad-CAM code itself is
checked on a model built to depend on one region (tests/gradcam_test.py), where the heat lands on that region.

With --runs_dir, each patient is explained by the models of the cells that held them out (R/splits.json), so
the numbers are out-of-fold like the evaluation's. An export's ensemble has seen every cohort patient in some
training fold, so with --model read them as in-distribution.
"""

import os
import sys
import zlib

import numpy as np
from absl import app
from absl import flags

from pdx_tf import io_utils, phantom
from pdx_tf.data import preprocess, region
from pdx_tf.errors import PdxError
from pdx_tf.serving import export, gradcam
from pdx_tf.training import model as model_lib, splits

_MODEL = flags.DEFINE_string("model", None, "An export folder (X/pdx_<task> or a version folder).")
_RUNS_DIR = flags.DEFINE_string("runs_dir", None, "Or: a training output folder (with --task).")
_TASK = flags.DEFINE_enum("task", "p", ["p", "sb"], "Task of --runs_dir (an export knows its own).")
_COHORT_DIR = flags.DEFINE_string("cohort_dir", None, "Demo cohort folder; default the cached demo cohort.")
_MAX_MODELS = flags.DEFINE_integer("max_models", 8, "Average Grad-CAM over at most this many models.")
_MAX_PATIENTS = flags.DEFINE_integer("max_patients", 0, "Use at most this many positive patients (0: all).")
_TARGET = flags.DEFINE_enum("target", "lesions", ["lesions", "ascites", "nodules_only", "omental_cake"],
                             "What to localise: the task's disease (masks/<pid>.npz: for p the nodules and the "
                             "omental cake), or, regenerated from the phantom's tissue map, ascites (what else the "
                             "models look at), the nodules alone or the omental cake alone (which of the two the "
                             "occlusion drop comes from; issue 23).")
_LAYER = flags.DEFINE_string("layer", "", "Backbone layer to explain; empty: predict's default, the deepest "
                             "with a map of at least 7x7 (pdx_tf.training.model.gradcam_layer: block_6_expand_relu at 64 "
                             "px, out_relu at 224 px). E.g. out_relu is 1/32 of the image side, "
                             "block_13_expand_relu 1/16, block_6_expand_relu 1/8.")

FILL_HU, FILL_NOISE_HU = -90.0, 10.0  # the phantom's intraperitoneal fat


def load_models(model_dir, runs_dir, task, max_models):
  """(keras models, preprocess config, task, held_out) from an export or a runs folder.

  held_out maps a patient to the indices of the models that did not train on them (from R/splits.json); it is
  None for an export, whose ensemble has seen every cohort patient.
  """
  import keras  # pylint: disable=import-outside-toplevel

  if model_dir:
    version_dir, metadata = export.read_export(model_dir)
    models = export.load_export_keras_models(version_dir, metadata, max_models)
    return models, preprocess.preprocess_config_from_dict(metadata["preprocess"]), metadata["task"], None
  cells = export.find_cells(runs_dir, task)[:max_models]
  models = [keras.saving.load_model(cell.model_path, compile=False) for cell in cells]
  split = io_utils.read_json(io_utils.join(runs_dir, splits.SPLITS_FILE))
  held_out = {}
  for index, cell in enumerate(cells):
    for patient_id in splits.cell_patients(split, cell.repeat, cell.fold)[1]:
      held_out.setdefault(patient_id, []).append(index)
  return models, preprocess.preprocess_config_from_dict(cells[0].run_info["preprocess"]), task, held_out


def _target_volume(cohort_dir, row, task, target):
  """(mask volume [Z, Y, X], its z_mm) for one patient."""
  if target == "lesions":
    masks = np.load(os.path.join(cohort_dir, "masks", f"{row['patient_id']}.npz"))
    return masks["nodule_mask" if task == "p" else "small_bowel_nodule_mask"], np.asarray(masks["z_mm"])
  from pdx_tf import configs  # pylint: disable=import-outside-toplevel
  from pdx_tf.phantom import anatomy  # pylint: disable=import-outside-toplevel

  cohort = io_utils.read_json(os.path.join(cohort_dir, "cohort.json"))
  config = configs.from_dict(phantom.PhantomConfig, cohort["config"])
  index = [entry["patient_id"] for entry in cohort["patients"]].index(row["patient_id"])
  patient = phantom.generate_patient(config, index)
  tissue = {"ascites": "ascites", "nodules_only": "nodule", "omental_cake": "omental_cake"}[target]
  return patient.tissue_labels == anatomy.TISSUE[tissue], np.asarray(patient.z_mm)


def patient_arrays(cohort_dir, row, task, models, config, layer_name=None, target="lesions"):
  """Localisation arrays of one patient: the abdominal slices read from DICOM, masks aligned by z."""
  abdomen = region.load_abdomen(os.path.join(cohort_dir, row["dicom_dir"]))
  lesion_volume, mask_z = _target_volume(cohort_dir, row, task, target)
  lesions = phantom.masks_at_slices(abdomen.z_mm, lesion_volume, mask_z)
  arrays = gradcam.localisation_arrays(models, abdomen.hu, lesions, config, layer_name=layer_name)
  seed = zlib.crc32(row["patient_id"].encode("utf-8"))
  return (*arrays, *occlusion_probabilities(models, abdomen.hu, lesions, config, seed=seed))


def occlusion_probabilities(models, hu, lesions, config, seed=0):
  """Ensemble-mean probabilities of the lesion slices as read, and with their lesion pixels filled with fat.

  A causal check to go beside Grad-CAM: if the models use the lesions, erasing them (intraperitoneal fat,
  FILL_HU with the phantom's noise) must lower the slices' probabilities.
  """
  keep = lesions.reshape(lesions.shape[0], -1).any(axis=1)
  as_read = np.asarray(hu[keep], np.float32)
  filled = as_read.copy()
  erased = lesions[keep]
  filled[erased] = FILL_HU + FILL_NOISE_HU * np.random.default_rng(seed).standard_normal(int(erased.sum()))
  def probabilities(slices):
    if not slices.shape[0]:
      return np.zeros((0,), np.float32)
    images = preprocess.preprocess_slices(slices, config)
    return np.mean([np.asarray(model(images, training=False)).reshape(-1) for model in models], axis=0)
  return probabilities(as_read), probabilities(filled)


def run(model_dir, runs_dir, task, cohort_dir, max_models, max_patients, layer_name=None,
        target="lesions"):
  """Computes and prints the localisation numbers; returns them as a dict."""
  models, config, task, held_out = load_models(model_dir, runs_dir, task, max_models)
  cohort_dir = cohort_dir or phantom.demo_cohort_dir()
  if not os.path.exists(os.path.join(cohort_dir, "manifest.csv")):
    raise PdxError(f"no demo cohort at {cohort_dir}; run the demo first (python -m train --task=p) or pass "
                   "--cohort_dir=<the cohort the models were trained on> (dataset.json config.manifest_path)")
  rows = [row for row in io_utils.read_csv(os.path.join(cohort_dir, "manifest.csv"))
          if int(float(row[f"label_{task}"])) == 1]
  if max_patients:
    rows = rows[:max_patients]
  layer_name = layer_name or model_lib.gradcam_layer(config.image_size)
  if held_out is not None:
    # Each patient is explained by the models of the cells that held them out: out-of-fold, like evaluation.
    rows = [row for row in rows if held_out.get(row["patient_id"])]
    if not rows:
      raise PdxError(f"no positive patient is held out by the {len(models)} model(s) used; raise --max_models")
  collected = [patient_arrays(cohort_dir, row, task,
                              models if held_out is None else [models[i] for i in held_out[row["patient_id"]]],
                              config, layer_name, target) for row in rows]
  heatmaps, lesions, body, as_read, erased = (np.concatenate([arrays[part] for arrays in collected])
                                              for part in range(5))
  ratio = gradcam.localisation_ratio(heatmaps, lesions, body)
  lesion_on_body = lesions * body
  area_share = float(lesion_on_body.sum() / body.sum())
  result = {"task": task, "target": target, "layer": layer_name, "num_models": len(models),
            "out_of_fold": held_out is not None,
            "image_size": config.image_size,
            "num_patients": len(rows), "num_slices": int(heatmaps.shape[0]),
            "gradcam_mass_share": area_share * ratio, "lesion_area_share": area_share, "ratio": ratio,
            "probability_as_read": float(as_read.mean()), "probability_erased": float(erased.mean())}
  print(f"task {task}: {len(models)} model(s) at {config.image_size} px, Grad-CAM of {layer_name}, {len(rows)} "
        f"positive patients, {heatmaps.shape[0]} slices with {target}, "
        + ("each patient seen by the models that held it out" if held_out is not None
           else "the whole ensemble on every patient (in-distribution)"))
  print(f"Grad-CAM mass on {target} {result['gradcam_mass_share']:.3f}, their share of body area "
        f"{area_share:.3f}: localisation ratio {ratio:.2f} (1 = chance)")
  print(f"Mean probability of those slices {result['probability_as_read']:.3f} as read, "
        f"{result['probability_erased']:.3f} with those pixels filled with fat ({FILL_HU:g} HU)")
  return result


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if bool(_MODEL.value) == bool(_RUNS_DIR.value):
    raise app.UsageError("give exactly one of --model and --runs_dir")
  try:
    result = run(_MODEL.value, _RUNS_DIR.value, _TASK.value, _COHORT_DIR.value, _MAX_MODELS.value,
                 _MAX_PATIENTS.value, _LAYER.value or None, _TARGET.value)
    print(f"raw output: {results_io.record_figures('localisation_benchmark', result)}")
  except PdxError as error:
    print(f"localisation_benchmark: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
