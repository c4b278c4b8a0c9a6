"""Typed settings that travel in the hand-offs: parsed once, where a hand-off is read (pdx_tf/contracts.py).

They sit in the core, beside contracts.py, so that reading dataset.json, run.json or an export yields typed
objects without the core importing a stage; the stages that own them (pdx_tf/data/preprocess.py) re-export them.
Plain dataclasses validated in `__post_init__`, no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from pdx_tf import configs

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
