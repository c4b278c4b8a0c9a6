"""Predicts peritoneal (p) and small-bowel (sb) dissemination with exported models: one study or a cohort.

Examples:
  python -m predict --model=exports/pdx_p --model=exports/pdx_sb --dicom_dir=/data/study1 \
      --output_dir=out/study1 --patient_id=case-017
  python -m predict --model=exports/pdx_p --model=exports/pdx_sb --manifest=external/manifest.csv \
      --output_dir=out/external --gradcam_slices=0

--model is an export base path X/pdx_<task> (its highest version is used) or one version folder, once per
task. Reads each study's axial CT series and abdominal slices like the data pipeline, runs each export's
predict_patient signature and flags inputs unlike the training data (slice thickness, pixel spacing, slice
count, body size, HU histogram).

--dicom_dir: one study; prints the patient probabilities with their ensemble uncertainty and writes
config.json, prediction.json, gradcam/*.png and summary.png to --output_dir.
--manifest: every patient of a cohort CSV in the data pipeline's format (labels may be empty: unknown), in
--num_workers processes, resumable; writes patient_predictions.csv (the input of
`python -m evaluate --predictions`), failures.csv and <patient_id>/prediction.json (see
pdx_tf/serving/cohort_predict.py).

No DICOM header value (names, IDs, UIDs, dates) and no study folder reaches any output; studies are named only
by --patient_id or the manifest's patient_id. Research software: not for clinical decisions.
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.


from absl import app
from absl import flags

from pdx_tf import cli, io_utils
from pdx_tf.errors import PdxError
from pdx_tf.serving import cohort_predict
from pdx_tf.serving.predict import format_prediction, predict_study, PredictConfig

_MODEL = flags.DEFINE_multi_string("model", None, "Export folder X/pdx_<task> or X/pdx_<task>/<version>; "
                                   "repeat for the second task.", required=True)
_DICOM_DIR = flags.DEFINE_string("dicom_dir", None, "One study's DICOM folder (searched recursively).")
_MANIFEST = flags.DEFINE_string("manifest", None, "A cohort CSV (the data pipeline's format; labels may be "
                                "empty) to predict every patient of; instead of --dicom_dir.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for the outputs.", required=True)
_PATIENT_ID = flags.DEFINE_string("patient_id", "", "With --dicom_dir: optional study code written to the outputs "
                                  "(not a name).")
_GRADCAM_SLICES = flags.DEFINE_integer("gradcam_slices", 3, "Grad-CAM overlays for this many top slices a task "
                                       "(0: none; with --manifest also no summary.png).")
_GRADCAM_MODELS = flags.DEFINE_integer("gradcam_max_models", 8, "Average Grad-CAM over at most this many models.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", None, "With --manifest: patient worker processes "
                                    "(default min(CPU count, 4)).")
_PROGRESS = flags.DEFINE_boolean("progress", True, "With --manifest: show a progress bar on stderr.")
_CONFORMAL_ALPHA = flags.DEFINE_float("conformal_alpha", None, "Error rate of the conformal set given next to the"
                                      " probability (default: the export's own; 'uncertain: refer' when both"
                                      " answers are plausible).")


def _fail(message) -> None:
  cli.exit_with_error("predict", message)


def _run_cohort() -> None:
  import os  # pylint: disable=import-outside-toplevel

  workers = _NUM_WORKERS.value or max(1, min(os.cpu_count() or 1, 4))
  try:
    config = cohort_predict.CohortConfig(
        model_dirs=tuple(_MODEL.value), manifest_path=_MANIFEST.value, output_dir=_OUTPUT_DIR.value,
        num_gradcam_slices=_GRADCAM_SLICES.value, gradcam_max_models=_GRADCAM_MODELS.value, num_workers=workers,
        conformal_alpha=_CONFORMAL_ALPHA.value)
  except ValueError as error:
    _fail(str(error))
  try:
    result = cohort_predict.run_cohort(config, progress=_PROGRESS.value)
  except PdxError as error:
    _fail(str(error))
  print(result.summary())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if (_DICOM_DIR.value is None) == (_MANIFEST.value is None):
    _fail("give exactly one of --dicom_dir (one study) and --manifest (a cohort CSV)")
  if _MANIFEST.value is not None:
    if _PATIENT_ID.value:
      _fail("--patient_id is for --dicom_dir; with --manifest the manifest's patient_id names each study")
    _run_cohort()
    return
  try:
    config = PredictConfig(model_dirs=tuple(_MODEL.value), dicom_dir=_DICOM_DIR.value,
                           output_dir=_OUTPUT_DIR.value, patient_id=_PATIENT_ID.value,
                           num_gradcam_slices=_GRADCAM_SLICES.value, gradcam_max_models=_GRADCAM_MODELS.value,
                           conformal_alpha=_CONFORMAL_ALPHA.value)
  except ValueError as error:  # invalid flag values
    _fail(str(error))
  try:
    prediction = predict_study(config)  # writes config.json first
  except PdxError as error:
    _fail(str(error))
  print(format_prediction(prediction))
  print(f"Wrote {io_utils.join(config.output_dir, 'prediction.json')} and {prediction['summary_png']}, "
        "gradcam/*.png beside it")


if __name__ == "__main__":
  app.run(main)
