"""Where along the patient's z axis each PCI region can show: the anatomical prior of `train --region_bands`.

The PCI's regions 0-8 are a 3x3 grid over the abdomen: upper (1 right upper, 2 epigastrium, 3 left upper),
middle (8 right flank, 0 central, 4 left flank) and lower (7 right lower, 6 pelvis, 5 left lower) rows, split
craniocaudally; an axial slice crosses one row. A slice far below the costal margin cannot show disease of the
epigastrium, so when a patient's region 2 is positive, the label says nothing about that slice's region-2 column:
with `region_bands` the regions task masks that (slice, region) entry out of the loss, as it masks a region a
surgeon did not record, and a patient's region probability aggregates only the slices of its band. Without it,
every slice of a positive patient is a positive for every diseased region, and each column learns burden (the
pointing game on the demo: the argmax slice of a region's column lies in the region no more often than chance).

Position: a slice's relative height in the patient's abdominal slices, t = index / (n - 1) (0 the lowest, 1 the
diaphragm domes; t = 0.5 for a single slice). The data pipeline resamples the abdominal range to even spacing,
sorted by patient-frame z ascending (records' slice_index, predict's and serving's slice order), so t is the
fraction of the abdomen's height. Rows are thirds of it (upper t >= 2/3, middle 1/3..2/3, lower < 1/3: the
phantom's documented geometry, pdx_tf/phantom/anatomy.py), each widened by `MARGIN` on both sides because a real
cohort's PCI lines (the costal margin, the anterior superior iliac spines) do not fall at exact thirds and the
abdominal range's ends vary with the scan. The small-bowel regions 9-12 (loops, which run from the upper to the
lower abdomen) have no band: every slice may show them.

A band holds at least one slice of any patient with n >= 2 (each is wider than 1/3); if one were ever empty, the
region would fall back to all slices rather than have no score.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from pdx_tf.contracts import NUM_PCI_REGIONS
from pdx_tf.training import aggregation

MARGIN = 0.1  # of the abdomen's height, each side of a row's third
_ROWS = {1: 0, 2: 0, 3: 0, 8: 1, 0: 1, 4: 1, 7: 2, 6: 2, 5: 2}  # region -> row (0 upper, 1 middle, 2 lower)
_ROW_THIRDS = ((2.0 / 3.0, 1.0), (1.0 / 3.0, 2.0 / 3.0), (0.0, 1.0 / 3.0))


def bands(margin: float = MARGIN) -> np.ndarray:
  """float64 [13, 2]: each region's (lowest, highest) relative position t; (-inf, inf) for regions 9-12."""
  out = np.tile(np.asarray([-np.inf, np.inf]), (NUM_PCI_REGIONS, 1))
  for region, row in _ROWS.items():
    low, high = _ROW_THIRDS[row]
    out[region] = (low - margin, high + margin)
  return out


def relative_positions(num_slices: int) -> np.ndarray:
  """float64 [n]: t of slice indices 0..n-1 (module docstring)."""
  if num_slices < 1:
    raise ValueError(f"a patient needs at least one slice, got {num_slices}")
  return np.full(1, 0.5) if num_slices == 1 else np.arange(num_slices) / (num_slices - 1)


def band_mask(slice_indices, num_slices: int, margin: float = MARGIN, limits: np.ndarray | None = None
              ) -> np.ndarray:
  """bool [len(slice_indices), 13]: whether each slice (its index among the patient's n abdominal slices) lies in
  each region's band (`limits` [13, 2], e.g. an export's stored bands; default `bands(margin)`). A column with no
  slice in band is all True (the fallback above)."""
  t = relative_positions(num_slices)[np.asarray(slice_indices, np.int64)]
  limits = bands(margin) if limits is None else np.asarray(limits, np.float64)
  keep = (t[:, None] >= limits[None, :, 0]) & (t[:, None] <= limits[None, :, 1])
  keep[:, ~keep.any(axis=0)] = True
  return keep


def limits_from_metadata(stored) -> np.ndarray:
  """[13, 2] limits from an export's "bands" list (a [low, high] pair a region, None for a region without)."""
  return np.asarray([[-np.inf, np.inf] if pair is None else [float(pair[0]), float(pair[1])] for pair in stored],
                    np.float64)


def band_mask_tf(slice_index: tf.Tensor, num_slices: tf.Tensor, margin: float = MARGIN) -> tf.Tensor:
  """`band_mask` in TensorFlow for one slice or a batch: bool [..., 13], without the fallback (a training label
  outside every slice's band is simply not learned; `aggregate_columns_tf` applies the fallback)."""
  num_slices = tf.cast(num_slices, tf.float64)
  t = tf.where(num_slices > 1.0, tf.cast(slice_index, tf.float64) / tf.maximum(num_slices - 1.0, 1.0),
               tf.constant(0.5, tf.float64))
  limits = tf.constant(bands(margin), tf.float64)
  t = t[..., tf.newaxis]
  return (t >= limits[:, 0]) & (t <= limits[:, 1])


def aggregate_columns_tf(slice_probabilities: tf.Tensor, keep: tf.Tensor, rule: str, top_k: int) -> tf.Tensor:
  """float32 [13]: each region's column of one patient's slice probabilities [N, 13] aggregated by `rule`
  (pdx_tf.training.aggregation) over the slices `keep` [N, 13] marks, or over all N where a column keeps none."""
  columns = []
  for region in range(NUM_PCI_REGIONS):
    column, mine = slice_probabilities[:, region], keep[:, region]
    column = tf.cond(tf.reduce_any(mine), lambda c=column, m=mine: tf.boolean_mask(c, m), lambda c=column: c)
    columns.append(aggregation.aggregate_tf(column, rule, top_k))
  return tf.stack(columns)
