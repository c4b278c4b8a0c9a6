"""The serving stage: trained cells -> a TF Serving SavedModel (`python -m export`) -> predictions (`predict`).

In: R/cells/*/run.json and model.keras. `export.py` writes the ensemble of chosen cells as one SavedModel in TF
Serving's layout (X/pdx_<task>/<version>/) with `signatures.py`' serving graphs, which apply the data stage's
own preprocessing to raw HU; `predict.py` reads one DICOM study like the pipeline and runs an export on it;
`gradcam.py` explains its slices.

Out: X/pdx_<task>/<version>/ (saved_model.pb, variables/, assets.extra/pdx_export.json and the Keras models),
and per study prediction.json, gradcam/*.png and summary.png.
"""
