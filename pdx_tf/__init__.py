"""pdx-tf: CT-based detection of peritoneal dissemination in ovarian cancer.

One sub-package per stage; data moves one way, with a manifest at every hand-off (CONTRACTS.md):

  pdx_tf.data        DICOM cohort + manifest.csv  ->  D/ TFRecords + dataset.json     (python -m data_pipeline)
  pdx_tf.training    D/                           ->  R/ splits.json, cells/*/run.json (python -m train)
  pdx_tf.evaluation  R/                           ->  E/ summary.json, report.html     (python -m evaluate)
  pdx_tf.serving     R/  ->  X/ SavedModels for TF Serving (python -m export);  X/ + a study -> prediction.json
                     and Grad-CAM (python -m predict)
  pdx_tf.phantom     the synthetic demo and test cohort, written as real DICOM

The core beside them: `io_utils` (atomic writes, gfile paths), `errors` (one exception per stage, one line each),
`configs` (frozen dataclasses to and from JSON), `provenance` (code version), `cli` (the binaries' one-line
exit) and `demo` (the README's main job: every stage on the phantom). The library never reads flags.
"""

__version__ = "0.1.0"
