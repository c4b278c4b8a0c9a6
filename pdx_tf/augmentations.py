"""The augmentations, each declared once by name: its settings, their check, its keyed draw and its transform.

Core (no TensorFlow): dataset.json's augmentation settings are typed and checked here when a hand-off is read
(`pdx_tf.settings.AugmentSettings`, built by `pdx_tf.contracts.DatasetInfo`), and the data pipeline
(pdx_tf/data/augment.py warps the HU slices with these transforms) and the training input pipeline (the 2.5D
stacks and MIL bags re-warp with them) draw the same numbers.

Every augmented copy is a pure function of (seed, patient_id, slice_index, augmentation_index): its parameters
come from a `numpy.random.Generator` built from that key.

An augmentation is one `Augmentation` in AUGMENTATIONS: its settings (AugmentConfig fields) and their check, its
keyed draw and its transform of the warp. Adding one means its AugmentConfig fields and its declaration here (last,
with opt_in=True, so existing records keep their bytes and fingerprints) and a test; the pipeline, the 2.5D stacks
of the input pipeline and dataset.json follow from the declaration.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping

import numpy as np

from pdx_tf import io_utils


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Ranges of the random augmentations (the paper: rotation, flip and scaling); one group of fields per
  augmentation in AUGMENTATIONS, which checks them.

  Attributes:
    rotation_max_deg: rotation angle drawn uniformly in [-rotation_max_deg, rotation_max_deg].
    flip_probability: probability of a left-right flip.
    scale_min: smallest zoom factor (below 1 shrinks the body).
    scale_max: largest zoom factor.
  """

  rotation_max_deg: float = 15.0
  flip_probability: float = 0.5
  scale_min: float = 0.9
  scale_max: float = 1.1

  def __post_init__(self):
    for augmentation in AUGMENTATIONS:
      augmentation.check(self)


# The output-to-input linear map of a copy's warp about the image centre, (m00, m01, m10, m11); each augmentation
# updates it in turn, starting from the identity.
LinearMap = tuple[float, float, float, float]
IDENTITY_MAP: LinearMap = (1.0, 0.0, 0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class Augmentation:
  """One named augmentation: its settings, its keyed draw and its transform.

  Attributes:
    name: the draw's name (`random_draws`' key).
    settings: the AugmentConfig fields it reads.
    check: raises ValueError for settings it cannot use (AugmentConfig.__post_init__ calls it).
    draw: its value for one copy from that copy's generator (one generator a copy, drawn in AUGMENTATIONS order).
    transform: the linear map after this augmentation, from the map before it and the drawn value.
    opt_in: True for an augmentation added after records were first written: while its settings are at their
      defaults they are left out of dataset.json and of the patient fingerprints (`settings_dict`), so existing
      records stay valid and a rerun skips their patients. The first three are always recorded.
  """

  name: str
  settings: tuple[str, ...]
  check: Callable[[AugmentConfig], None]
  draw: Callable[[np.random.Generator, AugmentConfig], Any]
  transform: Callable[[LinearMap, Any], LinearMap]
  opt_in: bool = False


def _check_rotation(config: AugmentConfig) -> None:
  if not 0.0 <= config.rotation_max_deg <= 180.0:
    raise ValueError(f"rotation_max_deg must be in [0, 180], got {config.rotation_max_deg}")


def _rotate(linear: LinearMap, angle_deg: float) -> LinearMap:
  # The inverse rotation R^-1 = [[cos, sin], [-sin, cos]], applied on the left.
  theta = math.radians(angle_deg)
  cos, sin = math.cos(theta), math.sin(theta)
  m00, m01, m10, m11 = linear
  return (cos * m00 + sin * m10, cos * m01 + sin * m11, -sin * m00 + cos * m10, -sin * m01 + cos * m11)


def _check_flip(config: AugmentConfig) -> None:
  if not 0.0 <= config.flip_probability <= 1.0:
    raise ValueError(f"flip_probability must be in [0, 1], got {config.flip_probability}")


def _flip(linear: LinearMap, flip: bool) -> LinearMap:
  # F = diag(-1, 1) on the left: the output's column coordinate reads the mirrored input column.
  sign = -1.0 if flip else 1.0
  m00, m01, m10, m11 = linear
  return (sign * m00, sign * m01, m10, m11)


def _check_scale(config: AugmentConfig) -> None:
  if not 0.0 < config.scale_min <= config.scale_max:
    raise ValueError(f"need 0 < scale_min <= scale_max, got {config.scale_min} and {config.scale_max}")


def _scale(linear: LinearMap, scale: float) -> LinearMap:
  # Zooming the output by `scale` reads the input at 1/scale the distance from the centre.
  return tuple(value / scale for value in linear)


# Declaration order is draw order: every copy's generator draws these one after the other, so a new augmentation
# goes LAST (the copies' earlier draws, and so the existing records' bytes, stay the same) with opt_in=True.
AUGMENTATIONS: tuple[Augmentation, ...] = (
    Augmentation("rotation_deg", ("rotation_max_deg",), _check_rotation,
                 lambda generator, config: float(generator.uniform(-config.rotation_max_deg,
                                                                   config.rotation_max_deg)), _rotate),
    Augmentation("flip", ("flip_probability",), _check_flip,
                 lambda generator, config: bool(generator.random() < config.flip_probability), _flip),
    Augmentation("scale", ("scale_min", "scale_max"), _check_scale,
                 lambda generator, config: float(math.exp(generator.uniform(math.log(config.scale_min),
                                                                            math.log(config.scale_max)))), _scale),
)


def settings_dict(config: AugmentConfig) -> dict[str, Any]:
  """The settings dataset.json records and the patient fingerprints hash: every field, except the settings of an
  opt-in augmentation while all of them are at their defaults (Augmentation.opt_in)."""
  values = dataclasses.asdict(config)
  defaults = type(config)()  # a subclass adding fields (a test's new augmentation) has its own defaults
  for augmentation in AUGMENTATIONS:
    if augmentation.opt_in and all(getattr(config, name, None) == getattr(defaults, name, None)
                                   for name in augmentation.settings):
      for name in augmentation.settings:
        values.pop(name, None)
  return values


def random_draws(seed: int, patient_id: str, slice_index: int, augmentation_index: int,
                 config: AugmentConfig) -> dict[str, Any]:
  """Each augmentation's value for one augmented copy ({name: value}, AUGMENTATIONS order), from the copy's key."""
  generator = np.random.default_rng([seed, io_utils.stable_key(patient_id), slice_index, augmentation_index])
  return {augmentation.name: augmentation.draw(generator, config) for augmentation in AUGMENTATIONS}


def random_parameters(seed: int, patient_id: str, slice_index: int, augmentation_index: int,
                      config: AugmentConfig) -> tuple[Any, ...]:
  """The draws of `random_draws` as a tuple in AUGMENTATIONS order: (angle_deg, flip, scale, ...). Kept for callers
  that index it; new code reads `random_draws(...)[name]` or `is_flipped`."""
  return tuple(random_draws(seed, patient_id, slice_index, augmentation_index, config).values())


def is_flipped(seed: int, patient_id: str, slice_index: int, augmentation_index: int, config: AugmentConfig) -> bool:
  """Whether copy `augmentation_index` of the slice is mirrored left-right (False for the original, index 0)."""
  if augmentation_index == 0:
    return False
  return bool(random_draws(seed, patient_id, slice_index, augmentation_index, config)["flip"])


def transform_from_draws(draws: Mapping[str, Any], size: int) -> list[float]:
  """The 8-number projective transform mapping output pixels to input pixels about the image centre, from
  `random_draws`' values (each augmentation's transform in AUGMENTATIONS order)."""
  linear = IDENTITY_MAP
  for augmentation in AUGMENTATIONS:
    linear = augmentation.transform(linear, draws[augmentation.name])
  m00, m01, m10, m11 = linear
  center = (size - 1) / 2.0
  return [m00, m01, center - m00 * center - m01 * center, m10, m11, center - m10 * center - m11 * center, 0.0, 0.0]


def transform_vector(angle_deg: float, flip: bool, scale: float, size: int) -> list[float]:
  """`transform_from_draws` for the three original augmentations given by value."""
  return transform_from_draws({"rotation_deg": angle_deg, "flip": flip, "scale": scale}, size)


def random_transform(seed: int, patient_id: str, slice_index: int, augmentation_index: int, config: AugmentConfig,
                     size: int) -> list[float]:
  """The projective transform of one augmented copy (`random_draws`, then `transform_from_draws`)."""
  return transform_from_draws(random_draws(seed, patient_id, slice_index, augmentation_index, config), size)
