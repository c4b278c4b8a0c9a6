"""Predicts peritoneal (p) and small-bowel (sb) dissemination for one CT study with exported models.

Example:
  python -m predict --model=exports/pdx_p --model=exports/pdx_sb --dicom_dir=/data/study1 \
      --output_dir=out/study1 --patient_id=case-017

--model is an export base path X/pdx_<task> (its highest version is used) or one version folder, once per
task. Reads the study's axial CT series and abdominal slices like the data pipeline, runs each export's
predict_patient signature, prints the patient probabilities with their ensemble uncertainty and writes
config.json, prediction.json, gradcam/*.png and summary.png to --output_dir. No DICOM header value (names, IDs,
UIDs, dates) reaches any output; the study is named only by --patient_id. Research software: not for clinical
decisions.
"""

from pdx_tf import cli  # pylint: disable=wrong-import-order
cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.


from absl import app
from absl import flags

from pdx_tf import cli, io_utils
from pdx_tf.errors import PdxError
from pdx_tf.serving.predict import format_prediction, predict_study, PredictConfig

_MODEL = flags.DEFINE_multi_string("model", None, "Export folder X/pdx_<task> or X/pdx_<task>/<version>; "
                                   "repeat for the second task.", required=True)
_DICOM_DIR = flags.DEFINE_string("dicom_dir", None, "The study's DICOM folder (searched recursively).",
                                 required=True)
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Folder for prediction.json and images.", required=True)
_PATIENT_ID = flags.DEFINE_string("patient_id", "", "Optional study code written to the outputs (not a name).")
_GRADCAM_SLICES = flags.DEFINE_integer("gradcam_slices", 3, "Grad-CAM overlays for this many top slices a task.")
_GRADCAM_MODELS = flags.DEFINE_integer("gradcam_max_models", 8, "Average Grad-CAM over at most this many models.")


def _fail(message) -> None:
  cli.exit_with_error("predict", message)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = PredictConfig(model_dirs=tuple(_MODEL.value), dicom_dir=_DICOM_DIR.value,
                           output_dir=_OUTPUT_DIR.value, patient_id=_PATIENT_ID.value,
                           num_gradcam_slices=_GRADCAM_SLICES.value, gradcam_max_models=_GRADCAM_MODELS.value)
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
