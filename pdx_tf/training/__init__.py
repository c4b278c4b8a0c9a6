"""The training stage: TFRecords -> the repeats x folds grid of MobileNetV2 slice classifiers (`python -m train`).

In: D/dataset.json and its shards. `splits.py` makes the patient-level folds (splits.json), `grid.py` names the
cells (repeat, fold), their folders and each machine's share, `input_pipeline.py` reads a cell's keyed training
draw and its held-out originals, `model.py` builds MobileNetV2, `aggregation.py` turns slice probabilities into a
patient's (the rule run.json records and serving applies), `tensorboard.py` logs, and `trainer.py` runs the grid.

Out (folder R): `config.json`, `records.json`, `splits.json`, `patients.csv`, `cells/rRR_fFF/` (model.keras,
predictions, metrics.json and last run.json) and `tensorboard/`: the hand-off that evaluation and export read.
"""
