"""Typed settings that travel in the hand-offs: parsed once, where a hand-off is read (pdx_tf/contracts.py).

They sit in the core, beside contracts.py, so that reading dataset.json, run.json or an export yields typed
objects without the core importing a stage; the stages that own them (pdx_tf/data/preprocess.py) re-export them.
Plain dataclasses validated in `__post_init__`, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from pdx_tf import augmentations, configs

# Fewest slices accepted, in a series and in the abdominal range (contracts.DEFAULT_MIN_SLICES).
DEFAULT_MIN_SLICES = 8

# Named windows as (center_hu, width_hu). "abdomen" is the standard soft-tissue window W400/L40.
WINDOW_PRESETS: Mapping[str, tuple[tuple[float, float], ...]] = {
    "abdomen": ((40.0, 400.0),),
    # Soft tissue, a narrow window for subtle enhancing nodules, and a wide bone/air window.
    "triple": ((40.0, 400.0), (60.0, 150.0), (300.0, 1500.0)),
}


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How HU slices become model images. Stored in dataset.json and every export.

  Attributes:
    image_size: output height and width in pixels.
    windows: one or three (center_hu, width_hu) windows.
    body_threshold_hu: voxels above this belong to the body (fat is about -100 HU, air -1000 HU).
    crop_margin_fraction: margin added around the body box on each side, as a fraction of its side.
  """

  image_size: int = 224
  windows: tuple[tuple[float, float], ...] = WINDOW_PRESETS["abdomen"]
  body_threshold_hu: float = -500.0
  crop_margin_fraction: float = 0.04

  def __post_init__(self):
    if not 16 <= self.image_size <= 1024:
      raise ValueError(f"image_size must be between 16 and 1024 pixels, got {self.image_size}")
    if len(self.windows) not in (1, 3):
      raise ValueError(f"windows must hold 1 or 3 (center, width) pairs, got {len(self.windows)}")
    for center, width in self.windows:
      if width <= 0:
        raise ValueError(f"window width must be positive, got center {center} width {width}")
    if not 0.0 <= self.crop_margin_fraction < 0.5:
      raise ValueError(f"crop_margin_fraction must be in [0, 0.5), got {self.crop_margin_fraction}")


def preprocess_config_from_dict(values: Mapping) -> PreprocessConfig:
  """Rebuilds a PreprocessConfig from its JSON form (as stored in dataset.json and exports)."""
  return configs.from_dict(PreprocessConfig, values)


def check_context_windows(config: PreprocessConfig, context_slices: int) -> None:
  """2.5D stacks adjacent slices of ONE window as the channels.

  Raises:
    ValueError: for context_slices > 0 with three windows.
  """
  if context_slices and len(config.windows) != 1:
    raise ValueError(f"--context_slices={context_slices} stacks adjacent slices of one window; these records have"
                     f" {len(config.windows)} windows: rebuild them with one --window or use --context_slices=0")


@dataclasses.dataclass(frozen=True)
class AugmentSettings:
  """The records' offline augmentation as dataset.json records it, typed and checked once where dataset.json is
  read (`contracts.DatasetInfo.augment_settings`): what the 2.5D stacks and MIL bags of training repeat.

  Attributes:
    config: each augmentation's ranges (dataset.json "augment"; checked by their declarations in
      pdx_tf/augmentations.py). An opt-in augmentation's settings absent from it are at their defaults.
    augment_factor: augmented copies a slice (0: none).
    augment_block: copies a shard block.
    seed: the augmentation key's seed (data_pipeline --augment_seed; dataset.json "seed").
  """

  config: augmentations.AugmentConfig = augmentations.AugmentConfig()
  augment_factor: int = 0
  augment_block: int = 1
  seed: int = 0

  def __post_init__(self):
    if self.augment_factor < 0:
      raise ValueError(f"augment_factor must be >= 0, got {self.augment_factor}")
    if self.augment_block < 1:
      raise ValueError(f"augment_block must be >= 1, got {self.augment_block}")
    if self.seed < 0:
      raise ValueError(f"seed must be >= 0, got {self.seed}")


def augment_settings_from_document(document: Mapping) -> AugmentSettings:
  """The typed augmentation of a dataset.json dict: its "augment" ranges and top-level augment_factor,
  augment_block and seed (absent ones at their defaults).

  Raises:
    ValueError: an unknown range name (records made by a pdx-tf with an augmentation this one lacks) or a value
      an augmentation's check refuses.
  """
  # The config class is looked up when called, so a test may stand in a subclass with a new augmentation's fields.
  config = configs.from_dict(augmentations.AugmentConfig, dict(document.get("augment") or {}))
  return AugmentSettings(config=config, augment_factor=int(document.get("augment_factor", 0) or 0),
                         augment_block=int(document.get("augment_block", 1) or 1),
                         seed=int(document.get("seed", 0) or 0))


@dataclasses.dataclass(frozen=True)
class RegionConfig:
  """Parameters of the automatic abdominal z-range rule (pdx_tf/data/region.py, its module docstring).

  Attributes:
    body_threshold_hu: voxels above this are body (the same threshold as the crop's).
    lung_air_hu: body-enclosed voxels below this are air (lung or gas).
    lung_air_fraction: a slice holds lung when enclosed air exceeds this fraction of its body area (used for the
      chest-only refusal: lungs down to the study's bottom slice).
    thorax_air_fraction: a slice is thorax proper (above the diaphragm domes) when enclosed air exceeds this
      fraction of its body area. The lung bases around the liver dome take roughly 5-25 % of an adult's body
      cross-section, the lower chest above the domes 35-55 % (less in obese patients, whose fat adds body area;
      estimates from typical anatomy, not yet measured on real series), so 30 % ends the abdomen at the domes
      without cutting the subphrenic spaces; a patient whose chest stays under it keeps extra chest slices
      rather than losing the dome.
    min_body_area_cm2: a study whose largest body cross-section is smaller has no abdomen (head, limb).
    leg_area_fraction: each of the two largest components must hold this share of their joint area to count
      as two thighs.
    min_leg_area_cm2: and at least this many cm^2 each.
  """

  body_threshold_hu: float = -500.0
  lung_air_hu: float = -400.0
  lung_air_fraction: float = 0.05
  thorax_air_fraction: float = 0.30
  min_body_area_cm2: float = 250.0
  leg_area_fraction: float = 0.25
  min_leg_area_cm2: float = 20.0

  def __post_init__(self):
    if not -1000.0 < self.lung_air_hu < 0.0:
      raise ValueError(f"lung_air_hu must be between -1000 and 0 HU, got {self.lung_air_hu}")
    if not 0.0 < self.lung_air_fraction < 1.0:
      raise ValueError(f"lung_air_fraction must be in (0, 1), got {self.lung_air_fraction}")
    if not self.lung_air_fraction <= self.thorax_air_fraction < 1.0:
      raise ValueError(f"thorax_air_fraction must be in [lung_air_fraction, 1), got {self.thorax_air_fraction}")
    if self.min_body_area_cm2 < 0.0:
      raise ValueError(f"min_body_area_cm2 must be >= 0, got {self.min_body_area_cm2}")
    if not 0.0 < self.leg_area_fraction <= 0.5:
      raise ValueError(f"leg_area_fraction must be in (0, 0.5], got {self.leg_area_fraction}")
    if self.min_leg_area_cm2 < 0.0:
      raise ValueError(f"min_leg_area_cm2 must be >= 0, got {self.min_leg_area_cm2}")


@dataclasses.dataclass(frozen=True)
class RegionSettings:
  """How a study's slices are read (series choice, abdominal z range, slabs): what `predict` must repeat of the
  training records. Typed and checked once where a hand-off is read: `DatasetInfo.region_settings` (from
  dataset.json's pipeline config), `RunInfo.region_settings` (run.json "region") and `ExportInfo.region_settings`
  (pdx_export.json "region").

  Attributes:
    config: the automatic z-range rule's parameters.
    slice_spacing_mm: the slab thickness thin slices are averaged into; None or 0 keeps the study's slices.
    slice_thickness_mm: the series choice prefers the nearest slice thickness; None: the reader's default.
    min_slices: fewest slices accepted, in the series and in the abdominal range.
  """

  config: RegionConfig = RegionConfig()
  slice_spacing_mm: float | None = None
  slice_thickness_mm: float | None = None
  min_slices: int = DEFAULT_MIN_SLICES

  def __post_init__(self):
    if self.slice_spacing_mm is not None and not self.slice_spacing_mm >= 0:
      raise ValueError(f"slice_spacing_mm must be >= 0 (0 keeps the native slices), got {self.slice_spacing_mm}")
    if self.slice_thickness_mm is not None and not self.slice_thickness_mm > 0:
      raise ValueError(f"slice_thickness_mm must be positive, got {self.slice_thickness_mm}")
    if self.min_slices < 1:
      raise ValueError(f"min_slices must be >= 1, got {self.min_slices}")

  def load_abdomen_arguments(self) -> dict[str, Any]:
    """Keyword arguments of `pdx_tf.data.region.load_abdomen` (and the series read) that repeat these settings;
    slice_thickness_mm only when recorded (the reader's default otherwise)."""
    arguments = {"config": self.config, "slice_spacing_mm": self.slice_spacing_mm, "min_slices": self.min_slices}
    if self.slice_thickness_mm:
      arguments["slice_thickness_mm"] = float(self.slice_thickness_mm)
    return arguments

  def export_dict(self) -> dict[str, Any]:
    """The export's JSON form ({"config": the rule, "slice_spacing_mm", "slice_thickness_mm", "min_slices"})."""
    return {"config": configs.to_dict(self.config), "slice_spacing_mm": self.slice_spacing_mm,
            "slice_thickness_mm": self.slice_thickness_mm, "min_slices": self.min_slices}


def region_settings_from_dict(values: Mapping) -> RegionSettings:
  """RegionSettings from either JSON form: the pipeline config's (dataset.json "config", run.json "region": the
  rule under "region") or the export's (the rule under "config", plus its "source" note, not a setting).

  Raises:
    ValueError: an unknown key or a value the checks refuse.
  """
  values = dict(values)
  values.pop("source", None)
  rule = values.pop("region", None)
  rule = values.pop("config", rule)
  unknown = sorted(set(values) - {"slice_spacing_mm", "slice_thickness_mm", "min_slices"})
  if unknown:
    raise ValueError(f"unknown region settings: {', '.join(unknown)}")
  if rule is not None and not isinstance(rule, Mapping):
    raise ValueError(f"the z-range rule's parameters must be a JSON object, got {rule!r}")
  spacing, thickness = values.get("slice_spacing_mm"), values.get("slice_thickness_mm")
  return RegionSettings(config=configs.from_dict(RegionConfig, rule or {}),
                        slice_spacing_mm=None if spacing is None else float(spacing),
                        slice_thickness_mm=None if thickness is None else float(thickness),
                        min_slices=int(values.get("min_slices", DEFAULT_MIN_SLICES)))
