"""The regions oracle (issue 20): how far can the regions model go when it is told WHICH slices show each region's
disease? The ceiling the patient-label regions grid (benchmarks/regions_benchmark.py) is measured against.

  nice -n 10 python benchmarks/regions_oracle_benchmark.py --seeds=0,1,2              # 48 px, 4 folds, 6 epochs
  nice -n 10 python benchmarks/regions_oracle_benchmark.py --seeds=0 --num_folds=2 --epochs=1   # a smoke run

Oracle labels, from the phantom's masks (masks/<patient_id>.npz, aligned to the slices the pipeline keeps by z,
as benchmarks/oracle_benchmark.py aligns them): slice s is positive for region r when at least --min_voxels voxels
of peritoneal disease (`nodule_mask`: the nodules and, where the cohort has one, the omental cake) lie in region r
(`pci_region_map == r`) on that slice. These slice x region labels replace the weak supervision of `train
--task=regions`, which trains every slice on its patient's 13 labels; everything else is the regions model:
`model.build_region_model` (13 sigmoids on one MobileNetV2, alpha 0.35, weights none, the demo preset's width),
binary cross-entropy over the 13 columns, Adam 1e-3, batch 64, --epochs passes over the training patients'
slices, no augmentation (a flip or a rotation would move the lateral regions; the pipeline mirrors their labels
when it flips, this benchmark simply does not flip). Patient-level folds: one repeat of `splits.make_splits` on
label_p (--num_folds folds, split seed = the seed); Keras seeded by (seed, fold).

Scored out of fold, like regions_benchmark.py scores the patient-label grid:
- per-region AUC of the patient's region probability (the max over its slices of column r) against the patient's
  recorded region label (manifest pci_r > 0), by scikit-learn; their macro mean; small-bowel regions 9-12;
- PCI Spearman: the sum of the 13 region probabilities against the true PCI (sum of the region scores);
- the pointing game: for each held-out patient and each region truly positive, the slice whose column-r score is
  highest; a hit when that slice holds voxels of region r (`pci_region_map`); chance = the share of the patient's
  slices that hold region r. And by the stricter disease rule: a hit when the slice holds the region's DISEASE (its
  oracle label), chance = the share of the patient's slices that do (a pointer that knows only where region r
  lies along z scores on the first rule, not on this one). Also the same with the oracle's own slice labels as the score (what a perfect slice
  model would point at).

Output: a line a seed printed and one JSON line a seed (code version, machine, command, figures) appended to
--output (default benchmarks/results/regions_oracle_<date>.jsonl). Slice arrays are cached under --root.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position
from scipy import stats  # pylint: disable=wrong-import-position
from sklearn import metrics as sk_metrics  # pylint: disable=wrong-import-position

from pdx_tf import contracts, io_utils, phantom  # pylint: disable=wrong-import-position
from pdx_tf.errors import PdxError  # pylint: disable=wrong-import-position
from pdx_tf.phantom import cohort as phantom_cohort  # pylint: disable=wrong-import-position

_ROOT = flags.DEFINE_string("root", "runs/regions-oracle", "Where the cached slice arrays go.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 48, "Model input size (px).")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds (split, initialisation).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 4, "Patient-level folds (one repeat).")
_EPOCHS = flags.DEFINE_integer("epochs", 6, "Epochs over all training slices.")
_MIN_VOXELS = flags.DEFINE_integer("min_voxels", 20, "Disease voxels of a region on a slice that make it positive.")
_PHANTOM_PRESET = flags.DEFINE_string("phantom_preset", None, "A named phantom cohort (e.g. low_burden).")
_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 40, "The phantom cohort's size.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON-lines file (default benchmarks/results/regions_oracle_<date>"
                              ".jsonl).")

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
ALPHA = 0.35
_CACHE_VERSION = 1
_FOLD_KEY = 0x0AC1F
REGIONS = contracts.NUM_PCI_REGIONS


def region_map_at_slices(slice_z_mm: np.ndarray, region_map: np.ndarray, mask_z_mm: np.ndarray) -> np.ndarray:
  """int8 [N, Y, X]: the region map slice nearest each kept slice's z (-1 where none lies within the tolerance)."""
  out = np.full((len(slice_z_mm),) + region_map.shape[1:], -1, np.int8)
  for index, z in enumerate(slice_z_mm):
    nearest = int(np.argmin(np.abs(mask_z_mm - z)))
    if abs(mask_z_mm[nearest] - z) <= phantom_cohort.MASK_Z_TOLERANCE_MM:
      out[index] = region_map[nearest]
  return out


def slice_region_tables(disease: np.ndarray, region_map: np.ndarray, min_voxels: int) -> tuple[np.ndarray, np.ndarray]:
  """(labels int32 [N, 13]: region r holds >= min_voxels disease voxels on slice s; present bool [N, 13]: slice s
  holds voxels of region r at all)."""
  labels = np.zeros((len(disease), REGIONS), np.int32)
  present = np.zeros((len(disease), REGIONS), bool)
  for region in range(REGIONS):
    inside = region_map == region
    present[:, region] = inside.any(axis=(1, 2))
    labels[:, region] = ((inside & disease).sum(axis=(1, 2)) >= min_voxels).astype(np.int32)
  return labels, present


def cohort_arrays(cohort_dir: str, root: str, image_size: int, min_voxels: int) -> dict[str, np.ndarray]:
  """Images, oracle slice x region labels, region presence and patient region labels of every readable patient,
  cached in <root>/slices-<S>px.npz (keyed by the cohort's config hash, the preprocessing and min_voxels)."""
  from pdx_tf.data import pipeline, preprocess, region  # pylint: disable=import-outside-toplevel

  pipeline_config = pipeline.demo_config(os.path.join(root, "unused-records"))
  config = dataclasses.replace(pipeline_config.preprocess, image_size=image_size)
  cohort = io_utils.read_json(os.path.join(cohort_dir, "cohort.json"))
  key = json.dumps({"version": _CACHE_VERSION, "cohort": cohort["config_hash"], "min_voxels": min_voxels,
                    "preprocess": dataclasses.asdict(config)}, sort_keys=True)
  path = os.path.join(root, f"slices-{image_size}px.npz")
  if os.path.exists(path):
    with np.load(path) as cached:
      if str(cached["cache_key"]) == key:
        return {name: cached[name] for name in cached.files if name != "cache_key"}
  parts: dict[str, list[np.ndarray]] = {name: [] for name in ("images", "labels", "present", "slice_patient")}
  patient_ids, patient_scores = [], []
  for row in io_utils.read_csv(os.path.join(cohort_dir, "manifest.csv")):
    try:
      abdomen = region.load_abdomen(os.path.join(cohort_dir, row["dicom_dir"]), config=pipeline_config.region,
                                    slice_spacing_mm=pipeline_config.slice_spacing_mm,
                                    slice_thickness_mm=pipeline_config.slice_thickness_mm,
                                    min_slices=pipeline_config.min_slices)
    except PdxError as error:
      print(f"regions_oracle: patient {row['patient_id']} left out: {' '.join(str(error).split())}", file=sys.stderr)
      continue
    with np.load(os.path.join(cohort_dir, "masks", f"{row['patient_id']}.npz")) as stored:
      mask_z = np.asarray(stored["z_mm"])
      disease = phantom.masks_at_slices(abdomen.z_mm, stored["nodule_mask"], mask_z)
      region_map = region_map_at_slices(abdomen.z_mm, stored["pci_region_map"], mask_z)
    labels, present = slice_region_tables(disease, region_map, min_voxels)
    parts["images"].append(np.asarray(preprocess.preprocess_slices(abdomen.hu, config)))
    parts["labels"].append(labels)
    parts["present"].append(present)
    parts["slice_patient"].append(np.full(len(labels), len(patient_ids), np.int32))
    patient_ids.append(row["patient_id"])
    patient_scores.append([int(float(row[f"pci_{region_index}"])) for region_index in range(REGIONS)])
  arrays = {name: np.concatenate(values) for name, values in parts.items()}
  arrays.update(patient_ids=np.array(patient_ids), patient_scores=np.array(patient_scores, np.int32))
  os.makedirs(root, exist_ok=True)
  np.savez(path, cache_key=key, **arrays)
  return arrays


def train_and_predict(images: np.ndarray, labels: np.ndarray, test_images: np.ndarray, image_size: int, key: int,
                      epochs: int) -> np.ndarray:
  """The regions model trained from scratch on the oracle slice x region labels; the test slices' [M, 13] scores."""
  import keras  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  keras.utils.set_random_seed(key)
  model = model_lib.build_region_model(model_lib.ModelConfig(image_size=image_size, alpha=ALPHA, weights="none"))
  model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=keras.losses.BinaryCrossentropy())
  model.fit(images.astype(np.float32), labels.astype(np.float32), batch_size=BATCH_SIZE, epochs=epochs,
            shuffle=True, verbose=0)
  scores = model.predict(test_images.astype(np.float32), batch_size=256, verbose=0)
  keras.backend.clear_session()
  return np.asarray(scores, np.float64)


def pointing(slice_scores: np.ndarray, present: np.ndarray, slice_patient: np.ndarray,
             patient_labels: np.ndarray) -> dict[str, float]:
  """The pointing game (module docstring) over every (patient, region) with label 1 and scored slices; `present`
  [N, 13] says which slices count as hits (the region's voxels, or its disease for the stricter rule)."""
  hits, chance, count = 0, 0.0, 0
  for patient in range(len(patient_labels)):
    own = np.flatnonzero(slice_patient == patient)
    if not own.size or not np.isfinite(slice_scores[own]).all():
      continue
    for region in np.flatnonzero(patient_labels[patient] == 1):
      if not present[own, region].any():
        continue  # nothing to hit by this rule (disease below min_voxels on every slice)
      pointed = own[int(np.argmax(slice_scores[own, region]))]
      hits += int(present[pointed, region])
      chance += float(present[own, region].mean())
      count += 1
  rate, chance = (hits / count, chance / count) if count else (float("nan"), float("nan"))
  return {"n": count, "hit_rate": rate, "chance": chance, "ratio": rate / chance if count else float("nan")}


def region_figures(patient_probability: np.ndarray, patient_scores: np.ndarray) -> dict[str, object]:
  """Per-region AUC (scikit-learn), macro, small-bowel macro and PCI Spearman of [P, 13] patient probabilities."""
  labels = (patient_scores > 0).astype(int)
  aucs = [float(sk_metrics.roc_auc_score(labels[:, r], patient_probability[:, r]))
          if 0 < labels[:, r].sum() < len(labels) else float("nan") for r in range(REGIONS)]
  small_bowel = [aucs[r] for r in contracts.PCI_SMALL_BOWEL_REGIONS]
  spearman = stats.spearmanr(patient_probability.sum(axis=1), patient_scores.sum(axis=1)).statistic
  return {"region_auc": aucs, "macro_auc": float(np.nanmean(aucs)), "small_bowel_macro_auc":
          float(np.nanmean(small_bowel)), "pci_spearman": float(spearman),
          "region_n_positive": [int(value) for value in labels.sum(axis=0)]}


def run_seed(arrays: dict[str, np.ndarray], image_size: int, seed: int, num_folds: int, epochs: int) -> dict:
  from pdx_tf.training import splits  # pylint: disable=import-outside-toplevel

  started = time.time()
  patient_ids = [str(value) for value in arrays["patient_ids"]]
  patient_labels = (arrays["patient_scores"] > 0).astype(int)
  split = splits.make_splits({pid: int(patient_labels[i].any()) for i, pid in enumerate(patient_ids)}, task="p",
                             num_folds=num_folds, num_repeats=1, seed=seed)
  slice_scores = np.full(arrays["labels"].shape, np.nan)
  for fold in range(num_folds):
    train_ids, test_ids = splits.cell_patients(split, 0, fold)
    assert not set(train_ids) & set(test_ids)  # patient-level: a patient is in one side of a cell only
    in_train = np.isin(np.asarray(patient_ids)[arrays["slice_patient"]], list(train_ids))
    in_test = np.isin(np.asarray(patient_ids)[arrays["slice_patient"]], list(test_ids))
    key = int(np.random.default_rng([seed, fold, _FOLD_KEY]).integers(2**31))
    slice_scores[in_test] = train_and_predict(arrays["images"][in_train], arrays["labels"][in_train],
                                              arrays["images"][in_test], image_size, key, epochs)
  patient_probability = np.stack([slice_scores[arrays["slice_patient"] == p].max(axis=0)
                                  for p in range(len(patient_ids))])
  figures = region_figures(patient_probability, arrays["patient_scores"])
  flat_labels, flat_scores = arrays["labels"].reshape(-1), slice_scores.reshape(-1)
  figures.update(
      slice_auc=float(sk_metrics.roc_auc_score(flat_labels, flat_scores)),
      pointing=pointing(slice_scores, arrays["present"], arrays["slice_patient"], patient_labels),
      pointing_disease=pointing(slice_scores, arrays["labels"].astype(bool), arrays["slice_patient"],
                                patient_labels),
      pointing_oracle_labels=pointing(arrays["labels"] + 1e-3 * np.random.default_rng(seed).random(
          arrays["labels"].shape), arrays["present"], arrays["slice_patient"], patient_labels),
      p_from_regions_auc=float(sk_metrics.roc_auc_score(patient_labels.any(axis=1),
                                                        patient_probability.max(axis=1))),
      wall_s=time.time() - started)
  return figures


def main(argv):
  del argv
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel

  cohort_dir = os.path.dirname(pipeline.demo_manifest_path(_NUM_PATIENTS.value, _PHANTOM_PRESET.value))
  root = os.path.join(_ROOT.value, f"{_PHANTOM_PRESET.value or 'demo'}-{_NUM_PATIENTS.value}patients")
  arrays = cohort_arrays(cohort_dir, root, _IMAGE_SIZE.value, _MIN_VOXELS.value)
  output = _OUTPUT.value or os.path.join("benchmarks", "results",
                                         f"regions_oracle_{datetime.date.today().isoformat()}.jsonl")
  positives = arrays["labels"].sum(axis=0)
  for seed in (int(value) for value in _SEEDS.value):
    figures = run_seed(arrays, _IMAGE_SIZE.value, seed, _NUM_FOLDS.value, _EPOCHS.value)
    results_io.record_figures("regions_oracle", results_io.json_safe({
        "benchmark": "regions_oracle", "seed": seed,
        "settings": {"image_size": _IMAGE_SIZE.value, "num_folds": _NUM_FOLDS.value, "epochs": _EPOCHS.value,
                     "min_voxels": _MIN_VOXELS.value, "alpha": ALPHA, "batch_size": BATCH_SIZE,
                     "learning_rate": LEARNING_RATE, "phantom_preset": _PHANTOM_PRESET.value or "default",
                     "patients": int(len(arrays["patient_ids"]))},
        "slices": int(len(arrays["labels"])), "oracle_positive_slices_per_region": positives.tolist(),
        **figures}), path=output)
    print(f"seed {seed}: macro AUC {figures['macro_auc']:.3f}, small bowel {figures['small_bowel_macro_auc']:.3f}, "
          f"PCI Spearman {figures['pci_spearman']:.3f}, slice AUC {figures['slice_auc']:.3f}, pointing "
          f"{figures['pointing']['hit_rate']:.3f} / {figures['pointing']['chance']:.3f} = "
          f"{figures['pointing']['ratio']:.2f} (oracle labels: {figures['pointing_oracle_labels']['ratio']:.2f}); "
          f"disease rule {figures['pointing_disease']['hit_rate']:.3f} / {figures['pointing_disease']['chance']:.3f} = "
          f"{figures['pointing_disease']['ratio']:.2f}, "
          f"{figures['wall_s']:.0f} s", flush=True)


if __name__ == "__main__":
  app.run(main)
