"""Writes tiny fake training cells (model.keras + run.json) in the layout the trainer produces.

Each cell holds a real `pdx_tf.model.build_model` MobileNetV2 (alpha 0.35, 32-64 px, no pretrained weights)
whose weights come from a keyed numpy Generator, so cells differ from each other and outputs depend on the
slice. A from-scratch MobileNetV2 at initialisation has vanishing activations (its BatchNorm statistics are
0/1), which would make every slice score 0.5; one forward pass in training mode with momentum 0 on
CT-like images sets the statistics to that batch, so activations are of order 1 and the output varies.
"""

from __future__ import annotations

import os
from typing import Sequence

import keras
import numpy as np

from pdx_tf import configs
from pdx_tf import io_utils
from pdx_tf import model as model_lib
from pdx_tf import preprocess

TASK_INDEX = {"p": 0, "sb": 1}


def fake_hu_slices(seed: int, count: int, height: int = 80, width: int = 72) -> np.ndarray:
  """CT-like HU slices float32 [count, height, width]: air, an elliptic soft-tissue body, bright spots."""
  rng = np.random.default_rng([seed, 7])
  rows, columns = np.mgrid[0:height, 0:width]
  slices = np.full((count, height, width), -1000.0, np.float32)
  for index in range(count):
    center_y = height / 2 + rng.uniform(-4, 4)
    center_x = width / 2 + rng.uniform(-4, 4)
    radius_y, radius_x = height * rng.uniform(0.3, 0.42), width * rng.uniform(0.3, 0.42)
    body = ((rows - center_y) / radius_y) ** 2 + ((columns - center_x) / radius_x) ** 2 <= 1.0
    slices[index][body] = rng.normal(30.0, 40.0, size=int(body.sum()))
    for _ in range(int(rng.integers(1, 4))):
      spot_y = int(center_y + rng.uniform(-0.5, 0.5) * radius_y)
      spot_x = int(center_x + rng.uniform(-0.5, 0.5) * radius_x)
      slices[index, spot_y - 2:spot_y + 2, spot_x - 2:spot_x + 2] = rng.uniform(100.0, 300.0)
  return slices


def make_fake_model(seed: int, image_size: int = 32, alpha: float = 0.35,
                    preprocess_config: preprocess.PreprocessConfig | None = None) -> keras.Model:
  """A build_model classifier with keyed weights and BatchNorm statistics calibrated on CT-like images."""
  preprocess_config = preprocess_config or preprocess.PreprocessConfig(image_size=image_size)
  model = model_lib.build_model(model_lib.ModelConfig(image_size=image_size, alpha=alpha, weights="none"))
  rng = np.random.default_rng([seed, 11])
  for layer in model.get_layer(model_lib.BACKBONE_NAME).layers:
    for variable in getattr(layer, "trainable_weights", ()):
      shape = tuple(variable.shape)
      if len(shape) == 4:  # conv kernels: He-normal scale, keyed
        fan_in = shape[0] * shape[1] * (shape[2] if "depthwise" not in variable.path else 1)
        variable.assign(rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape).astype(np.float32))
  images = preprocess.preprocess_slices(fake_hu_slices(seed, 16), preprocess_config).numpy().astype(np.float32)
  batch_norms = [layer for layer in model.get_layer(model_lib.BACKBONE_NAME).layers
                 if isinstance(layer, keras.layers.BatchNormalization)]
  momenta = [layer.momentum for layer in batch_norms]
  for layer in batch_norms:
    layer.momentum = 0.0
  model(images, training=True)
  for layer, momentum in zip(batch_norms, momenta):
    layer.momentum = momentum
  dense = model.get_layer("probability")
  channels = dense.kernel.shape[0]
  dense.kernel.assign(rng.normal(0.0, 3.0 / np.sqrt(channels), size=(channels, 1)).astype(np.float32))
  dense.bias.assign(rng.normal(0.0, 0.5, size=(1,)).astype(np.float32))
  return model


def cell_folder(runs_dir: str, task: str, repeat: int, fold: int) -> str:
  return os.path.join(runs_dir, task, "cells", f"r{repeat:02d}_f{fold:02d}")


def write_fake_cells(runs_dir: str, task: str = "p", cells: Sequence[tuple[int, int]] = ((0, 0), (0, 1)), *,
                     image_size: int = 32, alpha: float = 0.35,
                     preprocess_config: preprocess.PreprocessConfig | None = None,
                     aggregation: str = "topk_mean", top_k: int = 3, seed: int = 0) -> list[str]:
  """Writes complete cells runs_dir/<task>/cells/rRR_fFF/{model.keras, run.json}; returns their folders."""
  preprocess_config = preprocess_config or preprocess.PreprocessConfig(image_size=image_size)
  model_config = model_lib.ModelConfig(image_size=image_size, alpha=alpha, weights="none")
  folders = []
  for repeat, fold in cells:
    folder = cell_folder(runs_dir, task, repeat, fold)
    os.makedirs(folder, exist_ok=True)
    model = make_fake_model(seed * 1000 + TASK_INDEX[task] * 100 + repeat * 10 + fold, image_size, alpha,
                            preprocess_config)
    model.save(os.path.join(folder, "model.keras"))
    io_utils.atomic_write_json(os.path.join(folder, "run.json"), {
        "schema_version": 1, "task": task, "repeat": repeat, "fold": fold, "status": "complete",
        "split_hash": "0" * 64, "dataset_hash": "1" * 64, "seeds": {"split": 0, "sample": 0, "init": 0},
        "config": {"model": configs.to_dict(model_config)}, "preprocess": configs.to_dict(preprocess_config),
        "aggregation": aggregation, "aggregation_top_k": top_k, "code_version": "test",
        "wall_time_s": 0.0, "images_seen": 0, "model_path": "model.keras",
    })
    folders.append(folder)
  return folders
