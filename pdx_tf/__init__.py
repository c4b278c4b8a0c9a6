"""pdx-tf: CT-based detection of peritoneal dissemination in ovarian cancer.

Stages (data moves one way, with a manifest at every hand-off):
  DICOM cohort + manifest.csv  -> pdx_tf.pipeline  -> TFRecords + dataset.json
  TFRecords + dataset.json     -> pdx_tf.training  -> runs (splits.json, run.json, predictions)
  runs                         -> pdx_tf.evaluation -> summary.json, report.html
  runs                         -> pdx_tf.export    -> SavedModels for TF Serving
"""

__version__ = "0.1.0"
