"""Writes tiny fake training cells (model.keras + run.json) in the layout the trainer produces.

Each cell holds a real `pdx_tf.training.model.build_model` MobileNetV2 (alpha 0.35, 32-64 px, no pretrained weights)
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

from pdx_tf import configs, contracts, io_utils
from pdx_tf.data import preprocess
from pdx_tf.training import heads, model as model_lib

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
                    preprocess_config: preprocess.PreprocessConfig | None = None,
                    head: str = heads.DEFAULT_HEAD) -> keras.Model:
  """A build_model classifier of `head` with keyed weights and BatchNorm statistics calibrated on CT-like images."""
  preprocess_config = preprocess_config or preprocess.PreprocessConfig(image_size=image_size)
  model = model_lib.build_model(model_lib.ModelConfig(image_size=image_size, alpha=alpha, weights="none",
                                                      head=head))
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
  dense = model.layers[-1]  # the output Dense ("probability", or the regions head's 13 outputs)
  channels, outputs = dense.kernel.shape
  dense.kernel.assign(rng.normal(0.0, 3.0 / np.sqrt(channels), size=(channels, outputs)).astype(np.float32))
  dense.bias.assign(rng.normal(0.0, 0.5, size=(outputs,)).astype(np.float32))
  return model


def write_fake_region_cells(runs_dir: str, cells: Sequence[tuple[int, int]] = ((0, 0), (0, 1)), *,
                            image_size: int = 32, aggregation: str = "topk_mean", top_k: int = 3,
                            seed: int = 0, region_bands: bool = False) -> list[str]:
  """Complete cells of a regions grid, runs_dir/regions/cells/rRR_fFF/{model.keras, run.json} with keyed
  "thresholds" and "pci_scale" (pdx_tf/training/regions.py), trained with `region_bands` or not (run.json's
  config); returns their folders."""
  preprocess_config = preprocess.PreprocessConfig(image_size=image_size)
  model_config = model_lib.ModelConfig(image_size=image_size, alpha=0.35, weights="none", head=heads.REGIONS.name)
  folders = []
  for repeat, fold in cells:
    folder = cell_folder(runs_dir, contracts.PCI_TASK, repeat, fold)
    os.makedirs(folder, exist_ok=True)
    key = seed * 1000 + 500 + repeat * 10 + fold
    make_fake_model(key, image_size, 0.35, preprocess_config, head=heads.REGIONS.name).save(
        os.path.join(folder, "model.keras"))
    rng = np.random.default_rng([key, 13])
    io_utils.atomic_write_json(os.path.join(folder, "run.json"), {
        "schema_version": 1, "task": contracts.PCI_TASK, "repeat": repeat, "fold": fold, "status": "complete",
        "split_hash": "0" * 64, "dataset_hash": "1" * 64, "seeds": {"split": 0, "sample": 0, "init": 0},
        "config": {"model": configs.to_dict(model_config), **({"region_bands": True} if region_bands else {})},
        "preprocess": configs.to_dict(preprocess_config),
        "aggregation": aggregation, "aggregation_top_k": top_k, "head": heads.REGIONS.name, "code_version": "test",
        "wall_time_s": 0.0, "images_seen": 0, "model_path": "model.keras",
        "thresholds": [float(value) for value in rng.uniform(0.3, 0.7, contracts.NUM_PCI_REGIONS)],
        "threshold_rule": "inner_youden",
        "pci_scale": [float(value) for value in rng.uniform(1.0, 3.0, contracts.NUM_PCI_REGIONS)],
    })
    folders.append(folder)
  return folders


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


def _session_root(tmp_path_factory) -> str:
  """A folder shared by all pytest-xdist workers of this session (private to the session)."""
  base = tmp_path_factory.getbasetemp()
  return str(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)


def shared_fake_exports(tmp_path_factory) -> dict[str, str]:
  """Fake cells and their exports, built once per test session even under pytest-xdist.

  Layout: runs/p (cells r00_f00, r00_f01; topk_mean, k 3), runs/sb (cell r00_f00; max), X/pdx_p/1 (the p
  ensemble), X/pdx_p/2 (p cell r00_f01 alone, via ExportConfig), X/pdx_sb/1. Building takes most of these
  tests' time, so workers share it: the first builds under an exclusive lock, the others wait and reuse.
  Readers must not write into these folders.
  """
  import fcntl  # pylint: disable=import-outside-toplevel

  from pdx_tf.serving import export  # pylint: disable=import-outside-toplevel

  root = os.path.join(_session_root(tmp_path_factory), "shared-fake-exports")
  paths = {
      "root": root, "runs_dir": os.path.join(root, "runs"), "export_dir": os.path.join(root, "X"),
      "p_ensemble": os.path.join(root, "X", "pdx_p", "1"), "p_single": os.path.join(root, "X", "pdx_p", "2"),
      "sb_single": os.path.join(root, "X", "pdx_sb", "1"),
  }
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "build.lock"), "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(os.path.join(root, "done")):
      p_cells = write_fake_cells(paths["runs_dir"], "p", cells=((0, 0), (0, 1)), image_size=32, top_k=3)
      sb_cells = write_fake_cells(paths["runs_dir"], "sb", cells=((0, 0),), image_size=32, aggregation="max")
      assert export.export_models(p_cells, paths["export_dir"], "p") == paths["p_ensemble"]
      single = export.export_runs(export.ExportConfig(runs_dir=paths["runs_dir"], task="p",
                                                      export_dir=paths["export_dir"], cells=("r00_f01",)))
      assert single == paths["p_single"]
      assert export.export_models(sb_cells, paths["export_dir"], "sb") == paths["sb_single"]
      with open(os.path.join(root, "done"), "w", encoding="utf-8") as marker:
        marker.write("ok")
    fcntl.flock(lock, fcntl.LOCK_UN)
  return paths
