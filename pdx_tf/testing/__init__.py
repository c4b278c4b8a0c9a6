"""Fakes shared by the tests and the benchmarks: tiny records and trained-looking cells, written by pdx_tf itself.

`fake_records.write_fake_records` writes a records folder D (TFRecords + dataset.json, the current schema) of
keyed noise images in which positive patients carry a bright square; `fake_cells.write_fake_cells` writes
complete cell folders (run.json, model.keras, predictions) with small untrained MobileNetV2 models, and
`fake_cells.shared_fake_exports` builds their exports once per test session. Nothing here is used in training.
"""
