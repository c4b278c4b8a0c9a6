"""Can a from-scratch MobileNetV2 see the phantom's small-bowel nodules at all at a given input size? (issue 13)

  python benchmarks/oracle_benchmark.py                                   # 48 and 96 px, 3 seeds x 4 folds
  python benchmarks/oracle_benchmark.py --image_sizes=48 --seeds=0 --num_folds=2 --epochs=1   # a smoke run
  # issue 23: any nodule makes a slice positive, task p, on the low-burden phantom (docs/small_implants.md)
  python benchmarks/oracle_benchmark.py --phantom_preset=low_burden --task=p --mask=nodule \
      --root=runs/oracle-low_burden-p --image_sizes=48,96 --seeds=0 --num_folds=4 --epochs=5

Options (issue 23): --phantom_preset and --num_patients pick the cached phantom cohort
(`pipeline.demo_manifest_path(num_patients, phantom_preset)`; default the demo's 40-patient cohort); --mask the
mask that makes a slice oracle-positive (small_bowel_nodule: the small-bowel nodules, the default; nodule: all
peritoneal disease, nodules and the omental cake where the cohort has one); --task the patient label that is
split on and scored (sb, the default, or p). --output_jsonl appends one JSON line (code version, machine, command,
date, figures) per run. --network=detector (issue 23) trains `detector_model` instead of the demo's MobileNetV2;
<root>/oracle.json keeps one entry a size, so give each network and supervision its own --root. --supervision (issue 23; with
--network=detector): slice, the default, trains on the oracle slice labels; pixels (phantom-only) on every
logit-map cell's label from the masks, the most a mask can teach; patient on nothing but the --task label of each
patient, whose slices make one bag pooled by the detector's log-sum-exp (multiple-instance learning: what a real
user has, so not an oracle, run here to compare at one budget and on one split). Masks then only score.

An "oracle" run: the demo preset's model (pdx_tf/presets.py, the demo row: MobileNetV2 alpha 0.35, weights none)
is trained on EXACT slice labels instead of the pipeline's weak patient labels. The label of a slice is 1 when
some model pixel is covered by a (--mask) nodule for at least --min_coverage of its area, 0 otherwise. If the
model cannot separate those slices at a size, no patient-label training at that size can learn the nodules.

Data: the demo phantom cohort (`phantom.write_demo_cohort(phantom.demo_cohort_dir())`, written if absent). Each
study is read like the pipeline reads it (`region.load_abdomen` with the demo PipelineConfig's region, slice
spacing and thickness); the cohort's `masks/<patient_id>.npz` small_bowel_nodule_mask is aligned to the kept
slices by z (like benchmarks/localisation_benchmark.py) and mapped through the same body crop and resize as the
slices (`gradcam.map_masks_to_model_grid`, each model pixel's covered fraction); the images are
`preprocess.preprocess_slices` with the demo's preprocessing (pipeline.demo_config) at each --image_sizes size.
The arrays of a size are cached in <root>/slices-<S>px.npz (keyed by the cohort's config hash and the
preprocessing), so a rerun reads no DICOM.

Training, per size, seed and fold: patient-level folds of `splits.make_splits` on label_sb (the grid's kind of
split, --num_folds folds, one repeat, split seed = the seed); `model.build_model(ModelConfig(S, alpha=0.35))`
from scratch on the training patients' slices, --epochs epochs (default 10) over every training slice, batch 64,
Adam lr 1e-3, binary cross-entropy with class-balanced sample weights (each class weighs half of an epoch: nodule
slices are rare), and a random flip and 90-degree rotation of every image each epoch (numpy, keyed by (seed,
fold, epoch)). Keras is seeded with a key of (seed, fold). Evaluated on the held-out patients with
`metrics.binary_metrics`: the slice AUC against the oracle slice labels, and the patient AUC for label_sb with the
patient score = the max of the patient's slice probabilities. Per (size, seed): the fold means and the pooled
out-of-fold AUCs; per size: their means over seeds, and the pooled AUC of the seeds' mean patient score. Also per
size: the oracle-positive slices and patients, and the nodules' size in model pixels (per positive slice, the
covered area divided by the count of nodules on the slice; its median and the equivalent diameter 2 sqrt(a/pi)).

Output: one line per (size, seed), a summary per size, and <root>/oracle.json (merged across runs of one root:
each size's entry is replaced when it is rerun). Only manifest patient_ids appear; nothing is read from inside the
DICOM but pixels and slice positions.

Cost, measured on the shared 2-core box (2026-11-30, loaded by other jobs, so noisy): reading the 40-patient
cohort's 1606 abdominal slices is 25-50 s a run (sizes share one read; a cached size reads nothing), plus about a
minute to write the cohort the first time. At 48 px, 2 folds x 1 epoch took 47 s and 2 folds x 3 epochs 68 s:
about 6.5 ms a slice image an epoch plus about 18 s a fold (building and tracing the model, predicting). At 96 px,
2 folds x 1 epoch took 60 s and x 2 epochs 53 s: the load noise hides the per-image cost, which is no more than
4x that at 48 px. So the default run (3 seeds x 4 folds, 10 epochs over ~1200 training slices) is about 20 min at
48 px and 25-70 min at 96 px.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=wrong-import-position
from absl import app, flags  # pylint: disable=wrong-import-position

from pdx_tf import io_utils, phantom  # pylint: disable=wrong-import-position
from pdx_tf.errors import PdxError  # pylint: disable=wrong-import-position

_ROOT = flags.DEFINE_string("root", "runs/oracle", "Where the cached slice arrays and oracle.json go.")
_IMAGE_SIZES = flags.DEFINE_list("image_sizes", ["48", "96"], "Model input sizes (px) to test.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (split, initialisation, augmentation).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 4, "Patient-level folds (one repeat).")
_EPOCHS = flags.DEFINE_integer("epochs", 10, "Epochs over all training slices.")
_MIN_COVERAGE = flags.DEFINE_float("min_coverage", 0.5,
                                   "A slice is oracle-positive when some model pixel is covered this much.")
_COHORT_DIR = flags.DEFINE_string("cohort_dir", None, "Demo cohort folder; default the cached phantom cohort of "
                                   "--phantom_preset and --num_patients.")
_PHANTOM_PRESET = flags.DEFINE_string("phantom_preset", None, "A named phantom cohort (pdx_tf.phantom.PHANTOM_PRESETS, "
                                      "e.g. low_burden); default the demo cohort.")
_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 40, "The phantom cohort's size (a multiple of 4).")
_MASK = flags.DEFINE_enum("mask", "small_bowel_nodule", ["small_bowel_nodule", "nodule"],
                          "Which mask makes a slice positive: small-bowel nodules, or all peritoneal disease.")
_TASK = flags.DEFINE_enum("task", "sb", ["sb", "p"], "The patient label to split on and score.")
_CONTEXT = flags.DEFINE_bool("context", False, "2.5D: each image's three channels are the slice below, the slice and "
                             "the slice above (one window; edges repeated), as `--context_slices=1` feeds the model. "
                             "A nodule is a ball and ends within a few slabs; a bowel loop is a tube and runs on.")
NETWORKS = ("mobilenet", "detector")
_NETWORK = flags.DEFINE_enum("network", "mobilenet", list(NETWORKS),
                             "mobilenet: the demo's model; detector: a small fully convolutional net at stride 4 "
                             "whose logit map is pooled by log-sum-exp (`detector_model`): a nodule of a few pixels "
                             "is not averaged away.")
SUPERVISIONS = ("slice", "pixels", "patient")
_SUPERVISION = flags.DEFINE_enum("supervision", "slice", list(SUPERVISIONS),
                                 "slice: each slice's oracle label (any network); pixels (--network=detector only, "
                                 "phantom-only): every cell of the detector's logit map learns whether a nodule "
                                 "covers it (`cell_targets`), the strongest supervision the masks can give; "
                                 "patient (--network=detector only): no mask at all, each patient's slices are one "
                                 "bag trained on the --task label (`train_and_predict_bags`), what a real user has.")
_OUTPUT_JSONL = flags.DEFINE_string("output_jsonl", None, "Also append one JSON line (code version, machine, "
                                    "command, date, figures) to this file, e.g. benchmarks/results/oracle.jsonl.")

BATCH_SIZE = 64
LEARNING_RATE = 1e-3
ALPHA = 0.35  # the demo preset's width (pdx_tf.presets.TRAIN_PRESETS["demo"]).
_FOLD_KEY = 0x0AC1E
_CACHE_VERSION = 3  # 2: the arrays carry label_p too, and the key names the mask; 3: and each pixel's coverage
# --mask -> the array of the cohort's masks/<patient_id>.npz that makes a slice positive.
MASK_ARRAYS = {"small_bowel_nodule": "small_bowel_nodule_mask", "nodule": "nodule_mask"}
TASK_LABELS = {"sb": "label_sb", "p": "label_p"}


def oracle_labels(peak_coverage: np.ndarray, min_coverage: float) -> np.ndarray:
  """int32 [N]: 1 where a slice's most-covered model pixel reaches `min_coverage`."""
  return (np.asarray(peak_coverage) >= min_coverage).astype(np.int32)


def slice_arrays(hu: np.ndarray, masks: np.ndarray, config) -> dict[str, np.ndarray]:
  """Model images and nodule measures of one patient's slices at `config.image_size`.

  Args:
    hu: float32 [N, Y, X] HU.
    masks: bool [N, Y, X] nodule masks on the same grid.
    config: a preprocess.PreprocessConfig.

  Returns:
    {"images": uint8 [N, S, S, 3], "peak_coverage": float32 [N] (the most-covered model pixel's fraction),
     "area_px": float32 [N] (covered model pixels, summed fractions), "num_nodules": int32 [N] (connected
     nodules in the native mask), "coverage": uint8 [N, S, S] (each model pixel's covered fraction x 255, for
     --supervision=pixels)}.
  """
  import scipy.ndimage  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import preprocess  # pylint: disable=import-outside-toplevel
  from pdx_tf.serving import gradcam  # pylint: disable=import-outside-toplevel

  fractions = gradcam.map_masks_to_model_grid(hu, masks, config)
  flat = fractions.reshape(fractions.shape[0], -1)
  return {"images": np.asarray(preprocess.preprocess_slices(hu, config)),
          "peak_coverage": flat.max(axis=1).astype(np.float32), "area_px": flat.sum(axis=1).astype(np.float32),
          "num_nodules": np.array([scipy.ndimage.label(mask)[1] for mask in masks], np.int32),
          "coverage": np.round(fractions * 255.0).astype(np.uint8)}


def _cache_key(cohort_dir: str, config, mask: str) -> str:
  cohort = io_utils.read_json(os.path.join(cohort_dir, "cohort.json"))
  return json.dumps({"version": _CACHE_VERSION, "cohort": cohort["config_hash"], "mask": mask,
                     "preprocess": dataclasses.asdict(config)}, sort_keys=True)


def cache_name(size: int, mask: str) -> str:
  """The cached arrays' file name: slices-<S>px.npz for the default mask, slices-<S>px-<mask>.npz otherwise."""
  return f"slices-{size}px.npz" if mask == "small_bowel_nodule" else f"slices-{size}px-{mask}.npz"


def cohort_arrays(cohort_dir: str, root: str, image_sizes: list[int],
                  mask: str = "small_bowel_nodule") -> dict[int, dict[str, np.ndarray]]:
  """The cohort's slice arrays per size (`slice_arrays` of the `mask` (a MASK_ARRAYS key) concatenated over
  patients, plus "slice_patient" (index into "patient_ids"), "patient_ids", "label_sb" and "label_p"), from
  <root>/`cache_name` or read from DICOM once for every size not cached. A patient that cannot be read gets one
  line and is left out."""
  if mask not in MASK_ARRAYS:
    raise ValueError(f"unknown mask {mask!r}; choose one of {', '.join(MASK_ARRAYS)}")
  from pdx_tf.data import pipeline, region  # pylint: disable=import-outside-toplevel

  pipeline_config = pipeline.demo_config(os.path.join(root, "unused-records"))
  configs = {size: dataclasses.replace(pipeline_config.preprocess, image_size=size) for size in image_sizes}
  result, missing = {}, []
  for size in image_sizes:
    path, key = os.path.join(root, cache_name(size, mask)), _cache_key(cohort_dir, configs[size], mask)
    if os.path.exists(path):
      with np.load(path) as cached:
        if str(cached["cache_key"]) == key:
          result[size] = {name: cached[name] for name in cached.files if name != "cache_key"}
          continue
    missing.append(size)
  if not missing:
    return result
  rows = io_utils.read_csv(os.path.join(cohort_dir, "manifest.csv"))
  parts = {size: [] for size in missing}
  patient_ids, labels, labels_p = [], [], []
  for row in rows:
    try:
      abdomen = region.load_abdomen(os.path.join(cohort_dir, row["dicom_dir"]), config=pipeline_config.region,
                                    slice_spacing_mm=pipeline_config.slice_spacing_mm,
                                    slice_thickness_mm=pipeline_config.slice_thickness_mm,
                                    min_slices=pipeline_config.min_slices)
    except PdxError as error:
      print(f"oracle_benchmark: patient {row['patient_id']} left out: {' '.join(str(error).split())}",
            file=sys.stderr)
      continue
    with np.load(os.path.join(cohort_dir, "masks", f"{row['patient_id']}.npz")) as stored:
      masks = phantom.masks_at_slices(abdomen.z_mm, stored[MASK_ARRAYS[mask]], np.asarray(stored["z_mm"]))
    index = len(patient_ids)
    patient_ids.append(row["patient_id"])
    labels.append(int(float(row["label_sb"])))
    labels_p.append(int(float(row["label_p"])))
    for size in missing:
      arrays = slice_arrays(abdomen.hu, masks, configs[size])
      arrays["slice_patient"] = np.full(len(abdomen.z_mm), index, np.int32)
      parts[size].append(arrays)
  if not patient_ids:
    raise PdxError(f"no patient of {cohort_dir} could be read; rewrite the cohort (delete the folder and rerun)")
  os.makedirs(root, exist_ok=True)
  for size in missing:
    arrays = {name: np.concatenate([part[name] for part in parts[size]]) for name in parts[size][0]}
    arrays.update(patient_ids=np.array(patient_ids), label_sb=np.array(labels, np.int32),
                  label_p=np.array(labels_p, np.int32))
    np.savez(os.path.join(root, cache_name(size, mask)), cache_key=_cache_key(cohort_dir, configs[size], mask),
             **arrays)
    result[size] = arrays
  return result


def context_images(images: np.ndarray, slice_patient: np.ndarray) -> np.ndarray:
  """uint8 [N, S, S, 3]: channel 0 of slices (i - 1, i, i + 1) of the same patient (the first and last slice of a
  patient repeat themselves); slices of a patient are consecutive and in z order, as `cohort_arrays` stores them."""
  gray = np.asarray(images)[..., 0]
  index = np.arange(len(gray))
  below = np.where((index > 0) & (slice_patient == np.roll(slice_patient, 1)), index - 1, index)
  above = np.where((index < len(gray) - 1) & (slice_patient == np.roll(slice_patient, -1)), index + 1, index)
  return np.stack([gray[below], gray, gray[above]], axis=-1)


def patient_folds(labels: dict[str, int], num_folds: int, seed: int,
                  task: str = "sb") -> list[tuple[list[str], list[str]]]:
  """(train patient_ids, test patient_ids) per fold: one repeat of `splits.make_splits` on the task's labels."""
  from pdx_tf.training import splits  # pylint: disable=import-outside-toplevel

  split = splits.make_splits(labels, task=task, num_folds=num_folds, num_repeats=1, seed=seed)
  return [splits.cell_patients(split, 0, fold) for fold in range(num_folds)]


def slice_selection(slice_patient: np.ndarray, patient_ids: np.ndarray, chosen: list[str]) -> np.ndarray:
  """bool [N]: the slices whose patient (index into patient_ids) is in `chosen`."""
  return np.isin(np.asarray(patient_ids)[slice_patient], list(chosen))


def dihedral_augment(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """A random 90-degree rotation and left-right flip of each square image [N, S, S, C]."""
  turns, flips = rng.integers(0, 4, len(images)), rng.integers(0, 2, len(images)).astype(bool)
  out = np.empty_like(images)
  for turn in range(4):
    chosen = turns == turn
    out[chosen] = np.rot90(images[chosen], turn, axes=(1, 2))
  out[flips] = out[flips][:, :, ::-1]
  return out


def balanced_weights(labels: np.ndarray) -> np.ndarray:
  """float32 [N]: each present class weighs half of the total (N / (2 * class count) per example)."""
  labels = np.asarray(labels)
  weights = np.ones(len(labels), np.float32)
  for value in (0, 1):
    count = int((labels == value).sum())
    if count:
      weights[labels == value] = len(labels) / (2.0 * count)
  return weights


def fold_key(seed: int, fold: int) -> int:
  return int(np.random.default_rng([seed, fold, _FOLD_KEY]).integers(2**31))


DETECTOR_LAYERS = ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1), (64, 1))  # (filters, stride): 3x3 conv, BN, ReLU
DETECTOR_SHARPNESS = 5.0  # log-sum-exp's r: near the mean of the map at 0, near its max as r grows
DETECTOR_STRIDE = 4  # the product of DETECTOR_LAYERS' strides: one logit-map cell is 4 x 4 model pixels
DETECTOR_LOGITS = "detector_logits"  # the logit map's layer name (--supervision=pixels trains it directly)
# --supervision=pixels: a nodule cell's weight against a background cell's. Full balance would weigh each nodule
# cell about 5,000 times (on the 120-patient low-burden cohort at 192 px, 2,139 of 11.0 million cells hold a
# nodule) and would make every soft-tissue blob fire; the ranking (AUC) is all that is scored, so a capped weight
# is enough. One setting, not tuned.
PIXEL_POSITIVE_WEIGHT = 50.0


def cell_targets(coverage: np.ndarray, min_coverage: float, stride: int = DETECTOR_STRIDE) -> np.ndarray:
  """float32 [N, S/stride, S/stride]: 1 where some model pixel of a stride x stride cell is covered at least
  `min_coverage` (the slice label's rule, `oracle_labels`, applied to each cell). `coverage` is uint8 [N, S, S]
  (fraction x 255, as `slice_arrays` stores it); S must be a multiple of `stride`."""
  coverage = np.asarray(coverage)
  count, size = coverage.shape[0], coverage.shape[1]
  if size % stride or coverage.shape[2] != size:
    raise ValueError(f"coverage must be [N, S, S] with S a multiple of {stride}, got {coverage.shape}")
  peak = coverage.reshape(count, size // stride, stride, size // stride, stride).max(axis=(2, 4))
  return (peak.astype(np.float32) / 255.0 >= min_coverage - 1e-6).astype(np.float32)


def weighted_cell_loss(targets, logits):
  """Binary cross-entropy from logits over the map's cells, nodule cells weighted PIXEL_POSITIVE_WEIGHT."""
  import keras  # pylint: disable=import-outside-toplevel

  ops = keras.ops
  targets = ops.cast(targets, logits.dtype)
  # max(z, 0) - z y + log(1 + exp(-|z|)): the numerically stable form of BCE on a logit z.
  cross_entropy = ops.maximum(logits, 0.0) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))
  return ops.mean((1.0 + (PIXEL_POSITIVE_WEIGHT - 1.0) * targets) * cross_entropy)


def detector_model(image_size: int, channels: int = 3):
  """A small detector for the oracle: image [B, S, S, C] uint8-range -> probability [B, 1].

  Six 3x3 conv layers (DETECTOR_LAYERS; receptive field 29 px, stride 4: a 4-10 px nodule at 192 px fills a few
  map cells), a 1x1 conv to one logit a cell, then log-sum-exp pooling over the map, (logsumexp(r z) - log n) / r
  (Pinheiro & Collobert's smooth max, r = DETECTOR_SHARPNESS), and a sigmoid. Unlike MobileNetV2's global average
  of a 3x3-6x6 map, the slice score follows its most nodule-like cells. The output bias starts at -3 (most cells
  hold no nodule)."""
  import keras  # pylint: disable=import-outside-toplevel

  inputs = keras.Input((image_size, image_size, channels))
  features = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0)(inputs)
  for filters, stride in DETECTOR_LAYERS:
    features = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False)(features)
    features = keras.layers.ReLU()(keras.layers.BatchNormalization()(features))
  logits = keras.layers.Conv2D(1, 1, bias_initializer=keras.initializers.Constant(-3.0),
                               name=DETECTOR_LOGITS)(features)
  pooled = log_sum_exp_pooling()(keras.layers.Reshape((-1,))(logits))
  return keras.Model(inputs, keras.layers.Activation("sigmoid")(pooled))


def log_sum_exp_pooling():
  """A layer [B, n] -> [B, 1]: (logsumexp(r x) - log n) / r with r = DETECTOR_SHARPNESS, the smooth max of a
  slice's map cells (`detector_model`) and of a bag's (`bag_model`)."""
  import keras  # pylint: disable=import-outside-toplevel

  return keras.layers.Lambda(lambda cells: (keras.ops.logsumexp(DETECTOR_SHARPNESS * cells, axis=1, keepdims=True)
                                            - keras.ops.log(keras.ops.cast(keras.ops.shape(cells)[1], "float32")))
                             / DETECTOR_SHARPNESS)


def train_and_predict(train_images: np.ndarray, train_labels: np.ndarray, test_images: np.ndarray, image_size: int,
                      key: int, epochs: int, network: str = "mobilenet", train_cells: np.ndarray | None = None
                      ) -> np.ndarray:
  """Trains `network` (the demo's model, or `detector_model`) from scratch on the oracle slice labels, or, given
  `train_cells` (float [N, S/4, S/4] from `cell_targets`; detector only), on every logit-map cell's label; returns
  the test slices' probabilities (the detector's pooled output either way)."""
  import keras  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  keras.utils.set_random_seed(key)
  if network == "detector":
    model = detector_model(image_size, train_images.shape[-1])
  else:
    model = model_lib.build_model(model_lib.ModelConfig(image_size=image_size, alpha=ALPHA, weights="none"))
  if train_cells is not None:
    if network != "detector":
      raise ValueError("pixel supervision needs --network=detector (MobileNetV2 has no logit map)")
    trained = keras.Model(model.inputs, model.get_layer(DETECTOR_LOGITS).output)  # shares the detector's weights
    trained.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=weighted_cell_loss)
    for epoch in range(epochs):
      # The same rng key turns and flips the images and their cell labels alike (`dihedral_augment` draws the
      # turns, then the flips, from the rng it is given).
      augmented = dihedral_augment(train_images, np.random.default_rng([key, epoch]))
      cells = dihedral_augment(train_cells[..., None], np.random.default_rng([key, epoch]))
      trained.fit(augmented.astype(np.float32), cells, batch_size=BATCH_SIZE, epochs=1, shuffle=True, verbose=0)
  else:
    model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=keras.losses.BinaryCrossentropy())
    weights = balanced_weights(train_labels)
    targets = train_labels.astype(np.float32)[:, None]
    for epoch in range(epochs):
      augmented = dihedral_augment(train_images, np.random.default_rng([key, epoch]))
      model.fit(augmented.astype(np.float32), targets, sample_weight=weights, batch_size=BATCH_SIZE, epochs=1,
                shuffle=True, verbose=0)
  probabilities = model.predict(test_images.astype(np.float32), batch_size=256, verbose=0).reshape(-1)
  keras.backend.clear_session()
  return probabilities


BAG_SLICES = 48  # a bag's length: the 120-patient low-burden cohort's studies keep 34-46 abdominal slices


def bag_indices(slice_patient: np.ndarray, patient: int, bag_slices: int | None = None) -> np.ndarray:
  """int [bag_slices] (default BAG_SLICES): the patient's slice indices in order, repeated from its first when it
  has fewer, its first `bag_slices` when it has more. Pooling by log-sum-exp, a repeated slice moves the bag's
  logit by at most log(2) / DETECTOR_SHARPNESS."""
  bag_slices = BAG_SLICES if bag_slices is None else bag_slices
  own = np.flatnonzero(np.asarray(slice_patient) == patient)
  if own.size == 0:
    raise ValueError(f"patient index {patient} has no slice")
  if own.size > bag_slices:
    print(f"oracle_benchmark: patient index {patient} has {own.size} slices; its bag keeps the first "
          f"{bag_slices}", file=sys.stderr)
  return np.resize(own, bag_slices)


def bag_model(image_size: int, channels: int = 3, bag_slices: int | None = None):
  """(bag model: [B, T, S, S, C] -> probability [B, 1], slice model: `detector_model`, [N, S, S, C] -> [N, 1]).

  The bag model runs the detector's convolutions on each of a patient's T slices and pools every logit-map cell
  of all of them by the detector's log-sum-exp: a patient is positive when some cell of some slice is. The two
  share weights, so the slice model scores slices after bag training."""
  import keras  # pylint: disable=import-outside-toplevel

  bag_slices = BAG_SLICES if bag_slices is None else bag_slices
  slice_model = detector_model(image_size, channels)
  logit_map = keras.Model(slice_model.inputs, slice_model.get_layer(DETECTOR_LOGITS).output)
  inputs = keras.Input((bag_slices, image_size, image_size, channels))
  flat = keras.layers.Reshape((-1,))(keras.layers.TimeDistributed(logit_map)(inputs))
  pooled = log_sum_exp_pooling()(flat)
  return keras.Model(inputs, keras.layers.Activation("sigmoid")(pooled)), slice_model


def train_and_predict_bags(images: np.ndarray, slice_patient: np.ndarray, labels: np.ndarray, train: list[int],
                           test: list[int], key: int, epochs: int) -> tuple[np.ndarray, np.ndarray]:
  """--supervision=patient: multiple-instance learning on patient labels alone (no mask is read).

  Trains `bag_model` on the `train` patients (indices into `labels`), one patient a step (its slices are batch
  normalisation's batch), `epochs` passes in a keyed random order, each slice turned and flipped
  (`dihedral_augment`) afresh each epoch; Adam LEARNING_RATE, binary cross-entropy on the patient's label.
  Returns (the `test` patients' bag probabilities [len(test)], the slice model's probability of every slice [N],
  NaN outside the test patients' slices)."""
  import keras  # pylint: disable=import-outside-toplevel

  keras.utils.set_random_seed(key)
  model, slice_model = bag_model(images.shape[1], images.shape[-1])
  model.compile(optimizer=keras.optimizers.Adam(LEARNING_RATE), loss=keras.losses.BinaryCrossentropy())
  bags = {patient: bag_indices(slice_patient, patient) for patient in [*train, *test]}
  targets = np.asarray(labels, np.float32)
  for epoch in range(epochs):
    rng = np.random.default_rng([key, epoch])
    for patient in rng.permutation(np.asarray(train)):
      bag = dihedral_augment(images[bags[patient]], rng).astype(np.float32)[None]
      model.train_on_batch(bag, targets[[patient]][:, None])
  patient_probability = np.array([float(np.asarray(model.predict_on_batch(
      images[bags[patient]].astype(np.float32)[None]))[0, 0]) for patient in test])
  slice_probability = np.full(len(images), np.nan)
  test_slices = np.flatnonzero(np.isin(slice_patient, test))
  slice_probability[test_slices] = slice_model.predict(images[test_slices].astype(np.float32), batch_size=128,
                                                       verbose=0).reshape(-1)
  keras.backend.clear_session()
  return patient_probability, slice_probability


def _auc(labels, scores) -> float:
  from pdx_tf.evaluation import metrics  # pylint: disable=import-outside-toplevel

  return metrics.binary_metrics(np.asarray(labels), np.asarray(scores, np.float64))["auc"]


def _nanmean(values) -> float:
  values = np.asarray(values, np.float64)
  return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def run_seed(arrays: dict[str, np.ndarray], image_size: int, seed: int, num_folds: int, epochs: int,
             min_coverage: float, task: str = "sb", network: str = "mobilenet", supervision: str = "slice") -> dict:
  """One seed's folds at one size: fold and pooled out-of-fold AUCs (patients: the `task`'s label), and each
  patient's out-of-fold score."""
  started = time.time()
  labels = oracle_labels(arrays["peak_coverage"], min_coverage)
  cells = cell_targets(arrays["coverage"], min_coverage) if supervision == "pixels" else None
  patient_ids = arrays["patient_ids"]
  patient_labels = arrays[TASK_LABELS[task]]
  labels_sb = {str(pid): int(label) for pid, label in zip(patient_ids, patient_labels)}
  slice_scores = np.full(len(labels), np.nan)
  bag_scores = np.full(len(patient_ids), np.nan)
  fold_slice_auc, fold_patient_auc, skipped = [], [], []
  for fold, (train_ids, test_ids) in enumerate(patient_folds(labels_sb, num_folds, seed, task)):
    train = slice_selection(arrays["slice_patient"], patient_ids, train_ids)
    test = slice_selection(arrays["slice_patient"], patient_ids, test_ids)
    if supervision != "patient" and not labels[train].any():
      skipped.append(fold)  # no oracle-positive slice to learn from: the fold's scores stay NaN
      continue
    test_index = [list(patient_ids).index(pid) for pid in test_ids]
    if supervision == "patient":
      train_index = [list(patient_ids).index(pid) for pid in train_ids]
      fold_bags, fold_slices = train_and_predict_bags(arrays["images"], arrays["slice_patient"], patient_labels,
                                                      train_index, test_index, fold_key(seed, fold), epochs)
      bag_scores[test_index] = fold_bags
      slice_scores[test] = fold_slices[test]
    else:
      slice_scores[test] = train_and_predict(arrays["images"][train], labels[train], arrays["images"][test],
                                             image_size, fold_key(seed, fold), epochs, network,
                                             None if cells is None else cells[train])
    fold_slice_auc.append(_auc(labels[test], slice_scores[test]))
    test_scores = (bag_scores if supervision == "patient"
                   else patient_scores(slice_scores, arrays["slice_patient"], len(patient_ids)))
    fold_patient_auc.append(_auc([labels_sb[pid] for pid in test_ids], test_scores[test_index]))
  # The patient's score: its bag's probability when the bags were trained, else the max of its slices'.
  scores = (bag_scores if supervision == "patient"
            else patient_scores(slice_scores, arrays["slice_patient"], len(patient_ids)))
  scored = np.isfinite(scores)
  scored_slices = np.isfinite(slice_scores)
  return {"seed": seed, "slice_auc_fold_mean": _nanmean(fold_slice_auc),
          "patient_auc_fold_mean": _nanmean(fold_patient_auc),
          "slice_auc_pooled": _auc(labels[scored_slices], slice_scores[scored_slices]) if scored_slices.any()
          else float("nan"),
          "patient_auc_pooled": _auc(patient_labels[scored], scores[scored]) if scored.any() else float("nan"),
          "folds_skipped": skipped, "patient_scores": [float(value) for value in scores],
          "slice_scores": [float(value) for value in slice_scores],
          "wall_s": time.time() - started}


def _nanmean_rows(values: np.ndarray) -> np.ndarray:
  """Column means over the finite rows (NaN where a column has none), without numpy's empty-slice warning."""
  finite = np.isfinite(values)
  counts = finite.sum(axis=0)
  sums = np.where(finite, values, 0.0).sum(axis=0)
  return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def _json_safe(value):
  """NaN -> None (strict JSON), recursively."""
  if isinstance(value, dict):
    return {key: _json_safe(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_json_safe(item) for item in value]
  if isinstance(value, float) and not np.isfinite(value):
    return None
  return value


def patient_scores(slice_scores: np.ndarray, slice_patient: np.ndarray, num_patients: int) -> np.ndarray:
  """[P]: the max of each patient's slice scores (NaN for a patient with no scored slice)."""
  scores = np.full(num_patients, np.nan)
  for index in range(num_patients):
    own = slice_scores[slice_patient == index]
    own = own[np.isfinite(own)]
    if own.size:
      scores[index] = own.max()
  return scores


def nodule_summary(arrays: dict[str, np.ndarray], min_coverage: float, task: str = "sb") -> dict:
  """Counts of oracle-positive slices and patients, and the nodules' size in model pixels on those slices."""
  labels = oracle_labels(arrays["peak_coverage"], min_coverage)
  positive = labels == 1
  per_nodule = arrays["area_px"][positive] / np.maximum(arrays["num_nodules"][positive], 1)
  area = float(np.median(per_nodule)) if per_nodule.size else float("nan")
  with_pixels = arrays["num_nodules"] > 0
  return {"num_slices": int(len(labels)), "positive_slices": int(positive.sum()),
          "slices_with_nodule_pixels": int(with_pixels.sum()),
          "positive_patients_oracle": int(len(np.unique(arrays["slice_patient"][positive]))),
          f"positive_patients_{TASK_LABELS[task]}": int(arrays[TASK_LABELS[task]].sum()),
          "num_patients": int(len(arrays["label_sb"])),
          "nodule_area_px_median": area, "nodule_diameter_px_median": float(2.0 * np.sqrt(area / np.pi)),
          "peak_coverage_median_on_nodule_slices": float(np.median(arrays["peak_coverage"][with_pixels]))
          if with_pixels.any() else float("nan")}


def run(root: str, image_sizes: list[int], seeds: list[int], num_folds: int, epochs: int, min_coverage: float,
        cohort_dir: str | None, *, phantom_preset: str | None = None, num_patients: int = 40,
        mask: str = "small_bowel_nodule", task: str = "sb", context: bool = False,
        network: str = "mobilenet", supervision: str = "slice") -> dict:
  """Runs every size and seed; prints the lines and writes <root>/oracle.json; returns its dict."""
  if task not in TASK_LABELS:
    raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASK_LABELS)}")
  if network not in NETWORKS:  # else an unknown name would quietly train MobileNetV2
    raise ValueError(f"unknown network {network!r}; choose one of {', '.join(NETWORKS)}")
  if supervision not in SUPERVISIONS or (supervision != "slice" and network != "detector"):
    raise ValueError(f"supervision {supervision!r} with network {network!r}: choose one of "
                     f"{', '.join(SUPERVISIONS)}; pixels and patient need --network=detector (they train its "
                     "logit map)")
  if cohort_dir is None:
    from pdx_tf.data import pipeline  # pylint: disable=import-outside-toplevel
    cohort_dir = os.path.dirname(pipeline.demo_manifest_path(num_patients, phantom_preset))
  started = time.time()
  all_arrays = cohort_arrays(cohort_dir, root, image_sizes, mask)
  print(f"cohort slices ready for {', '.join(map(str, image_sizes))} px in {time.time() - started:.0f} s")
  output_path = os.path.join(root, "oracle.json")
  result = io_utils.read_json(output_path) if os.path.exists(output_path) else {"sizes": {}}
  settings = {"num_folds": num_folds, "epochs": epochs, "min_coverage": min_coverage, "batch_size": BATCH_SIZE,
              "learning_rate": LEARNING_RATE, "alpha": ALPHA, "seeds": seeds, "mask": mask, "task": task,
              "phantom_preset": phantom_preset, "context": context, "network": network,
              "supervision": supervision,
              "cohort_config_hash": io_utils.read_json(os.path.join(cohort_dir, "cohort.json"))["config_hash"]}
  for size in image_sizes:
    arrays = all_arrays[size]
    if context:
      arrays = {**arrays, "images": context_images(arrays["images"], arrays["slice_patient"])}
    size_started = time.time()
    nodules = nodule_summary(arrays, min_coverage, task)
    per_seed = []
    for seed in seeds:
      entry = run_seed(arrays, size, seed, num_folds, epochs, min_coverage, task, network, supervision)
      per_seed.append(entry)
      print(f"{size} px seed {seed}: slice AUC {entry['slice_auc_pooled']:.3f} pooled "
            f"({entry['slice_auc_fold_mean']:.3f} fold mean), patient {task} AUC {entry['patient_auc_pooled']:.3f} "
            f"pooled ({entry['patient_auc_fold_mean']:.3f} fold mean), {entry['wall_s']:.0f} s"
            + (f", folds without positive training slices: {entry['folds_skipped']}" if entry["folds_skipped"]
               else ""))
    mean_scores = _nanmean_rows(np.array([entry["patient_scores"] for entry in per_seed], np.float64))
    scored = np.isfinite(mean_scores)
    summary = {"slice_auc_mean_over_seeds": _nanmean([entry["slice_auc_pooled"] for entry in per_seed]),
               "patient_auc_mean_over_seeds": _nanmean([entry["patient_auc_pooled"] for entry in per_seed]),
               "patient_auc_pooled_seed_mean_score": _auc(arrays[TASK_LABELS[task]][scored], mean_scores[scored])
               if scored.any() else float("nan"),
               "wall_s": time.time() - size_started}
    print(f"{size} px summary over {len(seeds)} seed(s): slice AUC {summary['slice_auc_mean_over_seeds']:.3f}, "
          f"patient {task} AUC {summary['patient_auc_mean_over_seeds']:.3f} (pooled, seeds' mean score "
          f"{summary['patient_auc_pooled_seed_mean_score']:.3f}); {nodules['positive_slices']} oracle-positive of "
          f"{nodules['num_slices']} slices ({nodules['slices_with_nodule_pixels']} with nodule pixels), "
          f"{nodules['positive_patients_oracle']} patients ({TASK_LABELS[task]}: "
          f"{nodules['positive_patients_' + TASK_LABELS[task]]} of "
          f"{nodules['num_patients']}); nodule {nodules['nodule_area_px_median']:.2f} px median "
          f"(diameter {nodules['nodule_diameter_px_median']:.2f} px, peak coverage "
          f"{nodules['peak_coverage_median_on_nodule_slices']:.2f}); wall {summary['wall_s']:.0f} s")
    result["sizes"][str(size)] = {"settings": settings, "nodules": nodules, "summary": summary,
                                  "per_seed": per_seed, "patient_ids": [str(pid) for pid in arrays["patient_ids"]]}
    io_utils.atomic_write_json(output_path, _json_safe(result))  # after each size: a long run keeps its sizes
  return result


def main(argv):
  import results_io  # pylint: disable=import-outside-toplevel  (benchmarks/: the raw output, one JSON line a run)
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    result = run(_ROOT.value, [int(size) for size in _IMAGE_SIZES.value], [int(seed) for seed in _SEEDS.value],
                 _NUM_FOLDS.value, _EPOCHS.value, _MIN_COVERAGE.value, _COHORT_DIR.value,
                 phantom_preset=_PHANTOM_PRESET.value, num_patients=_NUM_PATIENTS.value, mask=_MASK.value,
                 task=_TASK.value, context=_CONTEXT.value, network=_NETWORK.value,
                 supervision=_SUPERVISION.value)
    print(f"raw output: {results_io.record_figures('oracle_benchmark', _json_safe(result))}")
    if _OUTPUT_JSONL.value:
      sizes = {size: {key: value for key, value in entry.items() if key != "patient_ids"}
               for size, entry in result["sizes"].items() if size in _IMAGE_SIZES.value}
      for entry in sizes.values():  # per-patient scores stay in <root>/oracle.json
        entry["per_seed"] = [{key: value for key, value in seed.items() if key not in ("patient_scores", "slice_scores")}
                             for seed in entry["per_seed"]]
      results_io.record_figures("oracle_benchmark", results_io.json_safe(
          {"benchmark": "oracle", "num_patients": _NUM_PATIENTS.value, "sizes": sizes}), path=_OUTPUT_JSONL.value)
  except (PdxError, ValueError) as error:
    print(f"oracle_benchmark: error: {' '.join(str(error).split())}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
