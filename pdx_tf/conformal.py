"""Coverage-guaranteed answers: class-conditional (Mondrian) conformal prediction sets for a binary classifier.

Pure numpy; imports no stage, so training, evaluation, export and predict share one rule.

The rule (Vovk, Gammerman & Shafer, "Algorithmic Learning in a Random World", 2005, section 4.5: Mondrian
conformal predictors; split/inductive form as in Angelopoulos & Bates, "A Gentle Introduction to Conformal
Prediction", 2021, section 1 and 4.1 "class-conditional coverage"):

  * the nonconformity score of label y for a patient of probability p (the model's P(positive)) is
      s(p, 1) = 1 - p   and   s(p, 0) = p.
  * Calibration: for each class y separately, take the scores s(p_j, y) of the n_y calibration patients of TRUE
    class y, sorted ascending s_(1) <= ... <= s_(n_y). With k_y = ceil((n_y + 1)(1 - alpha)),
      q_y = s_(k_y)        if k_y <= n_y,
      q_y = +infinity      if k_y > n_y   (too few patients of class y for this alpha: y is always in the set).
    (The ceiling is taken of (n_y + 1)(1 - alpha) - 1e-9, so that 10 * 0.9 = 9.000000000000002 counts as 9.)
  * The prediction set of a new patient of probability p is {y : s(p, y) <= q_y}; so
      "negative" is in the set iff p <= q_0, and "positive" is in the set iff 1 - p <= q_1.
  * Equivalently y is in the set iff its Mondrian p-value  p_y = (1 + #{j of class y : s_j >= s(p, y)}) / (n_y + 1)
    is > alpha (`p_values`; the two forms agree, ties included).
  * Guarantee (exchangeable calibration and test patients): P(true label in set | true label = y) >= 1 - alpha
    for EACH class y, so the rare positive class gets its own guarantee.

Answers: {negative} -> "negative", {positive} -> "positive", {negative, positive} -> "uncertain" (refer), and the
empty set -> "uncertain" as well (neither label conforms: an outlier), counted apart by `is_empty`.

The out-of-fold scheme (`cross_conformal`) is cross-conformal across folds (Vovk, "Cross-conformal predictors",
Annals of Mathematics and Artificial Intelligence 74, 2015; the same out-of-fold construction as CV+ in Barber,
Candes, Ramdas & Tibshirani, "Predictive inference with the jackknife+", Annals of Statistics 49, 2021): a cell
(repeat r, fold f)'s test patients are calibrated on the out-of-fold probabilities of the OTHER folds of repeat r
(each made by a model that never trained on that patient), never on any row of a patient in the cell's own test
fold. With 8 folds, a fold is calibrated on 7/8 of the cohort instead of a few inner patients, so the per-class
quantile stays finite at alpha 0.1 on the 40-patient demo. Each calibration score comes from another fold's
model, so the guarantee is the cross-conformal one: about 1 - alpha in practice, at least 1 - 2 alpha in the
worst case (Barber et al. 2021, theorem 4); `pdx_tf.evaluation.conformal_evaluation` measures it.

Each model on its own scale (`ScoreScale`). Cross-conformal compares a fold's patients with OTHER models' scores;
when the fold models disagree on scale (measured on the 120-patient sb demo: one fold's negatives at a median
probability of 0.77, another's at 0.26; benchmarks/conformal_shift_benchmark.py), the high fold loses coverage,
the low one gains, and since the bound lies in a class's tail the mean falls below 1 - alpha (p at alpha 0.2:
negatives covered 0.70-0.75 in three grids of three). So where every cell has inner patients (scored by the
cell's model, never trained on, never in its test fold), each cell's probabilities are first put on its model's
own scale: score = sigmoid((logit(p) - m) / s), m and s the mean and SD of logit(P) over the cell's inner
patients, labels unused (a monotone map a cell: each fold's ranking and AUC are unchanged). The rule above then
runs on these scores. Without inner patients the probabilities are used as they are (`scales=None`). Six sb-demo
grids at alpha 0.1, 0.15 and 0.2: per-class coverage within 0.05 of 1 - alpha in 34 of 36 (task, alpha, grid)
cases, against 28 of 36 unscaled (18 of 18 against 12 where the folds disagreed; 16 of 18 each on three fresh grids).

The export's thresholds (`fit_thresholds` on every exported cell's out-of-fold scores: training patients of the
ensemble, each scored by a model that did not train on it, on that model's scale) apply the same rule to a new
patient's ensemble score: the mean over the models of each model's scaled patient probability.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

NEGATIVE = "negative"
POSITIVE = "positive"
UNCERTAIN = "uncertain"
ANSWERS = (NEGATIVE, POSITIVE, UNCERTAIN)
# The set of each answer, as the CSVs and the serving signature name it.
SET_NAMES = {(True, False): NEGATIVE, (False, True): POSITIVE, (True, True): "both", (False, False): "empty"}
# How far (n + 1)(1 - alpha) may overshoot an integer from rounding before the ceiling moves up.
_CEILING_TOLERANCE = 1e-9
PROBABILITY_CLIP = 1e-6  # logit's clip: keeps a saturated model's 0 or 1 finite
MIN_LOGIT_SD = 1e-3


def check_alpha(alpha: float, name: str = "conformal_alpha") -> float:
  """Returns `alpha` as a float if it is an error rate strictly between 0 and 1; raises ValueError otherwise."""
  if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (
      math.isfinite(alpha) and 0.0 < alpha < 1.0):
    raise ValueError(f"{name} must be an error rate strictly between 0 and 1 (e.g. 0.1 for 90 % coverage), got"
                     f" {alpha!r}")
  return float(alpha)


def scores(probabilities: np.ndarray, label: int) -> np.ndarray:
  """The nonconformity scores of `label` (0 or 1) for P(positive) `probabilities`: 1 - p for 1, p for 0."""
  probabilities = np.asarray(probabilities, dtype=np.float64)
  return 1.0 - probabilities if label == 1 else probabilities


def quantile_index(num_scores: int, alpha: float) -> int:
  """k = ceil((n + 1)(1 - alpha)): the 1-based rank of the calibration score that bounds the set (> n: none)."""
  return int(math.ceil((num_scores + 1) * (1.0 - alpha) - _CEILING_TOLERANCE))


def class_quantile(class_scores: np.ndarray, alpha: float) -> float:
  """q = the k-th smallest of `class_scores` with k = quantile_index(n, alpha); +inf when k > n (module doc)."""
  class_scores = np.sort(np.asarray(class_scores, dtype=np.float64))
  index = quantile_index(class_scores.size, alpha)
  return float(class_scores[index - 1]) if index <= class_scores.size else math.inf


@dataclasses.dataclass(frozen=True)
class ConformalThresholds:
  """One calibration: the per-class score bounds at error rate alpha.

  Attributes:
    alpha: the error rate (coverage 1 - alpha per class).
    negative_max_score: q_0; "negative" is in a patient's set iff p <= it. 1.0 when q_0 is infinite (always in).
    positive_max_score: q_1; "positive" is in the set iff 1 - p <= it. 1.0 when q_1 is infinite.
    num_negative, num_positive: the calibration patients of each class (n_0, n_1).
  """

  alpha: float
  negative_max_score: float
  positive_max_score: float
  num_negative: int
  num_positive: int

  def __post_init__(self):
    check_alpha(self.alpha, "alpha")
    for name in ("negative_max_score", "positive_max_score"):
      value = getattr(self, name)
      if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a score in [0, 1], got {value!r}")

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ConformalThresholds":
    """The thresholds from `to_dict`'s form; raises ValueError on a missing or malformed field."""
    try:
      return cls(alpha=float(values["alpha"]), negative_max_score=float(values["negative_max_score"]),
                 positive_max_score=float(values["positive_max_score"]), num_negative=int(values["num_negative"]),
                 num_positive=int(values["num_positive"]))
    except (KeyError, TypeError) as error:
      raise ValueError(f"conformal thresholds lack or misspell {error}") from None


def fit_thresholds(probabilities: Sequence[float], labels: Sequence[int], alpha: float) -> ConformalThresholds:
  """The Mondrian thresholds at `alpha` from calibration patients' P(positive) and true labels (module doc).

  An infinite quantile (fewer than about 1/alpha patients of a class) is stored as 1.0: every score is <= 1, so
  that class is in every set, exactly as an infinite bound says.
  """
  alpha = check_alpha(alpha, "alpha")
  probabilities = np.asarray(probabilities, dtype=np.float64)
  labels = np.asarray(labels, dtype=np.int64)
  if probabilities.shape != labels.shape:
    raise ValueError(f"{probabilities.size} probabilities but {labels.size} labels")
  bounds = [min(class_quantile(scores(probabilities[labels == label], label), alpha), 1.0) for label in (0, 1)]
  return ConformalThresholds(alpha=alpha, negative_max_score=bounds[0], positive_max_score=bounds[1],
                             num_negative=int(np.sum(labels == 0)), num_positive=int(np.sum(labels == 1)))


def prediction_sets(probabilities: Sequence[float], thresholds: ConformalThresholds) -> tuple[np.ndarray, np.ndarray]:
  """(negative in the set, positive in the set), two boolean arrays, for P(positive) `probabilities`."""
  probabilities = np.asarray(probabilities, dtype=np.float64)
  return (scores(probabilities, 0) <= thresholds.negative_max_score,
          scores(probabilities, 1) <= thresholds.positive_max_score)


def answers(has_negative: np.ndarray, has_positive: np.ndarray) -> np.ndarray:
  """The answer of each set: "negative", "positive", or "uncertain" for both labels and for the empty set."""
  has_negative, has_positive = np.asarray(has_negative, bool), np.asarray(has_positive, bool)
  return np.where(has_negative & ~has_positive, NEGATIVE, np.where(has_positive & ~has_negative, POSITIVE, UNCERTAIN))


def is_empty(has_negative: np.ndarray, has_positive: np.ndarray) -> np.ndarray:
  """The empty sets (answered "uncertain" but counted apart)."""
  return ~np.asarray(has_negative, bool) & ~np.asarray(has_positive, bool)


def set_names(has_negative: np.ndarray, has_positive: np.ndarray) -> list[str]:
  """Each set by name: negative, positive, both or empty."""
  return [SET_NAMES[(bool(negative), bool(positive))] for negative, positive in zip(has_negative, has_positive)]


def p_values(probabilities: Sequence[float], calibration_probabilities: Sequence[float],
             calibration_labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """The Mondrian p-values (p_negative, p_positive) of each patient: p_y = (1 + #{j of class y: s_j >= s(p, y)})
  / (n_y + 1). A label is in the set at alpha iff its p-value is > alpha."""
  probabilities = np.asarray(probabilities, dtype=np.float64)
  calibration_probabilities = np.asarray(calibration_probabilities, dtype=np.float64)
  calibration_labels = np.asarray(calibration_labels, dtype=np.int64)
  result = []
  for label in (0, 1):
    calibration = np.sort(scores(calibration_probabilities[calibration_labels == label], label))
    # #{s_j >= s} = n - #{s_j < s}
    at_least = calibration.size - np.searchsorted(calibration, scores(probabilities, label), side="left")
    result.append((1.0 + at_least) / (calibration.size + 1.0))
  return result[0], result[1]


@dataclasses.dataclass(frozen=True)
class ScoreScale:
  """One model's probability scale (module docstring): the mean and SD of logit(P) over patients it never trained
  on (its cell's inner patients). `apply` maps probabilities to scores in (0, 1), monotone increasing."""

  logit_mean: float
  logit_sd: float

  def __post_init__(self):
    if not (math.isfinite(self.logit_mean) and math.isfinite(self.logit_sd) and self.logit_sd > 0):
      raise ValueError(f"a score scale needs a finite mean and a positive SD, got {self.logit_mean!r},"
                       f" {self.logit_sd!r}")

  @classmethod
  def fit(cls, reference_probabilities: Sequence[float]) -> "ScoreScale":
    """From at least two reference probabilities; the SD is floored at MIN_LOGIT_SD (a model that gives every
    reference patient the same probability keeps its ranking, scaled steeply)."""
    values = logit(reference_probabilities)
    if values.size < 2:
      raise ValueError(f"a score scale needs at least 2 reference patients, got {values.size}")
    return cls(logit_mean=float(values.mean()), logit_sd=max(float(values.std()), MIN_LOGIT_SD))

  def apply(self, probabilities: Sequence[float]) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-(logit(probabilities) - self.logit_mean) / self.logit_sd))

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ScoreScale":
    try:
      return cls(logit_mean=float(values["logit_mean"]), logit_sd=float(values["logit_sd"]))
    except (KeyError, TypeError) as error:
      raise ValueError(f"a score scale lacks or misspells {error}") from None


def fit_scales(references: Sequence[Sequence[float]]) -> list[ScoreScale] | None:
  """One ScoreScale a cell from each cell's inner patients' probabilities, in order; None (the probabilities
  are used as they are) unless every cell has at least 2. The one rule evaluation and the export share."""
  if not all(len(reference) >= 2 for reference in references):
    return None
  return [ScoreScale.fit(reference) for reference in references]


def logit(probabilities: Sequence[float]) -> np.ndarray:
  """log(p / (1 - p)) in float64, p clipped to [PROBABILITY_CLIP, 1 - PROBABILITY_CLIP]."""
  values = np.clip(np.asarray(probabilities, np.float64), PROBABILITY_CLIP, 1.0 - PROBABILITY_CLIP)
  return np.log(values / (1.0 - values))


def ensemble_score(model_probabilities: Sequence[float], scales: Sequence[ScoreScale] | None) -> float:
  """A patient's conformal score from each model's patient probability: the mean of the scaled probabilities,
  or the mean probability (the served one) without scales."""
  values = np.asarray(model_probabilities, np.float64).reshape(-1)
  if scales is None:
    return float(values.mean())
  if len(scales) != values.size:
    raise ValueError(f"{values.size} model probabilities but {len(scales)} score scales")
  return float(np.mean([scale.apply(value)[()] for scale, value in zip(scales, values)]))


@dataclasses.dataclass(frozen=True)
class CrossConformalResult:
  """The out-of-fold sets of every row (one row = one patient in one cell's test fold), in the input order.

  Attributes:
    alpha: the error rate.
    has_negative, has_positive: the sets.
    p_negative, p_positive: the Mondrian p-values (rank the answers by confidence 1 - min of the two).
    thresholds: (repeat, fold) -> that cell's ConformalThresholds.
    calibration_rows: (repeat, fold) -> the row indices its test patients were calibrated on.
  """

  alpha: float
  has_negative: np.ndarray
  has_positive: np.ndarray
  p_negative: np.ndarray
  p_positive: np.ndarray
  thresholds: Mapping[tuple[int, int], ConformalThresholds]
  calibration_rows: Mapping[tuple[int, int], np.ndarray]

  @property
  def answers(self) -> np.ndarray:
    return answers(self.has_negative, self.has_positive)

  @property
  def is_empty(self) -> np.ndarray:
    return is_empty(self.has_negative, self.has_positive)

  @property
  def confidence(self) -> np.ndarray:
    """1 - the smaller p-value: high when one label is implausible (abstain on the lowest first)."""
    return 1.0 - np.minimum(self.p_negative, self.p_positive)


def calibration_rows(repeats: Sequence[int], folds: Sequence[int], patient_ids: Sequence[str]
                     ) -> dict[tuple[int, int], np.ndarray]:
  """(repeat, fold) -> the rows that calibrate that cell: the rows of the same repeat's other folds, minus any
  row of a patient who is in the cell's own test fold (a patient listed twice never calibrates itself)."""
  repeats, folds = np.asarray(repeats, dtype=np.int64), np.asarray(folds, dtype=np.int64)
  patient_ids = np.asarray(patient_ids, dtype=object)
  result = {}
  for repeat, fold in sorted({(int(r), int(f)) for r, f in zip(repeats, folds)}):
    own = (repeats == repeat) & (folds == fold)
    own_patients = set(patient_ids[own].tolist())
    chosen = ((repeats == repeat) & (folds != fold)
              & np.asarray([patient not in own_patients for patient in patient_ids], dtype=bool))
    result[(repeat, fold)] = np.flatnonzero(chosen)
  return result


def cross_conformal(repeats: Sequence[int], folds: Sequence[int], patient_ids: Sequence[str],
                    labels: Sequence[int], probabilities: Sequence[float], alpha: float,
                    scales: Mapping[tuple[int, int], ScoreScale] | None = None) -> CrossConformalResult:
  """Every out-of-fold row's set at `alpha`, each cell calibrated on its repeat's other folds (module doc).

  Args:
    repeats, folds, patient_ids, labels, probabilities: one entry a row (a patient in a cell's test fold).
    alpha: the error rate.
    scales: (repeat, fold) -> that cell's model's ScoreScale, for every cell: each row's probability is put on
      its cell's scale before calibrating and answering (`scaled_scores`); None: the probabilities as they are.
  """
  alpha = check_alpha(alpha, "alpha")
  labels = np.asarray(labels, dtype=np.int64)
  repeats, folds = np.asarray(repeats, dtype=np.int64), np.asarray(folds, dtype=np.int64)
  probabilities = scaled_scores(repeats, folds, probabilities, scales)
  rows = calibration_rows(repeats, folds, patient_ids)
  has_negative = np.zeros(labels.size, bool)
  has_positive = np.zeros(labels.size, bool)
  p_negative = np.zeros(labels.size)
  p_positive = np.zeros(labels.size)
  thresholds = {}
  for cell, calibration in rows.items():
    own = np.flatnonzero((repeats == cell[0]) & (folds == cell[1]))
    thresholds[cell] = fit_thresholds(probabilities[calibration], labels[calibration], alpha)
    has_negative[own], has_positive[own] = prediction_sets(probabilities[own], thresholds[cell])
    p_negative[own], p_positive[own] = p_values(probabilities[own], probabilities[calibration], labels[calibration])
  return CrossConformalResult(alpha=alpha, has_negative=has_negative, has_positive=has_positive,
                              p_negative=p_negative, p_positive=p_positive, thresholds=thresholds,
                              calibration_rows=rows)


def scaled_scores(repeats: Sequence[int], folds: Sequence[int], probabilities: Sequence[float],
                  scales: Mapping[tuple[int, int], ScoreScale] | None) -> np.ndarray:
  """Each row's conformal score: its probability on its cell's ScoreScale, or the probability without scales."""
  probabilities = np.asarray(probabilities, dtype=np.float64)
  if scales is None:
    return probabilities
  repeats, folds = np.asarray(repeats, dtype=np.int64), np.asarray(folds, dtype=np.int64)
  out = np.empty_like(probabilities)
  for cell in {(int(r), int(f)) for r, f in zip(repeats, folds)}:
    if cell not in scales:
      raise ValueError(f"no score scale for cell r{cell[0]:02d}_f{cell[1]:02d}: give every cell's or none")
    mine = (repeats == cell[0]) & (folds == cell[1])
    out[mine] = scales[cell].apply(probabilities[mine])
  return out
