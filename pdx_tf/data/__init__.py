"""The data stage: DICOM studies -> TFRecords (`python -m data_pipeline`).

In: the cohort manifest (`manifest.py`: one CSV row per patient, labels, covariates, the study folder) and each
patient's DICOM study. `dicom.py` picks and reads the CT series (HU), `region.py` keeps the abdominal slices,
`preprocess.py` crops, windows and resizes them (the one preprocessing path that training, serving and predict
share), `augment.py` makes the keyed augmented copies, `records.py` is the TFRecord schema and `shards.py` the
per-patient file layout. `pipeline.py` runs it all per patient (worker processes, resume, failures),
`beam_pipeline.py` runs the same per-patient work on Apache Beam into the same folder, and `qc.py` draws the QC
montages.

Out (folder D): `original/*.tfrecord`, `augmented/*.tfrecord`, `patients/<id>.json` (completion markers),
`qc/`, `failures.csv`, `config.json` and last `dataset.json`, the hand-off that training reads.
"""
