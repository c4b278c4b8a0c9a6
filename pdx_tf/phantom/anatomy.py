"""Anatomy of the synthetic abdominal CT phantom (used by `pdx_tf.phantom.cohort`).

The phantom is painted as a uint8 tissue-label volume from simple solids: nested ellipses for the body wall,
ellipsoids for organs, unions of spheres along random paths for bowel, colon and mesenteric vessels. The label
volume is then turned into HU by a per-tissue table plus smooth texture, partial-volume blur and noise.

Coordinates are DICOM patient coordinates in millimetres: x grows towards the patient's left (image right), y
towards the back (image down), z towards the head. So the anatomy is the same at every matrix size; only the
sampling changes. All randomness comes from the `numpy.random.Generator`s passed in.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

TISSUE_NAMES = (
    "air", "table_shell", "table_core", "skin", "subcutaneous_fat", "muscle", "intraperitoneal_fat",
    "retroperitoneal_fat", "liver", "gallbladder", "spleen", "kidney_cortex", "kidney_medulla", "pancreas",
    "stomach_wall", "stomach_content", "gas", "colon_wall", "stool", "small_bowel_wall", "small_bowel_lumen",
    "mesenteric_vessel", "aorta", "vena_cava", "bone_cortex", "bone_marrow", "intervertebral_disc",
    "cerebrospinal_fluid", "bladder_wall", "urine", "uterus", "lung", "myocardium", "cardiac_blood",
    "ascites", "nodule", "omental_cake",
)
TISSUE = {name: index for index, name in enumerate(TISSUE_NAMES)}

# Mean HU (portal-venous phase, 120 kVp) and amplitude of smooth texture, per tissue. The nodule entry is a
# placeholder: each nodule gets its own HU.
_TISSUE_HU = {
    "air": (-1000, 0), "table_shell": (180, 20), "table_core": (-300, 30), "skin": (20, 10),
    "subcutaneous_fat": (-100, 8), "muscle": (50, 8), "intraperitoneal_fat": (-90, 10),
    "retroperitoneal_fat": (-95, 8), "liver": (60, 6), "gallbladder": (8, 3), "spleen": (70, 6),
    "kidney_cortex": (150, 12), "kidney_medulla": (90, 10), "pancreas": (45, 10), "stomach_wall": (60, 8),
    "stomach_content": (15, 8), "gas": (-900, 30), "colon_wall": (45, 8), "stool": (-60, 90),
    "small_bowel_wall": (66, 6), "small_bowel_lumen": (15, 6), "mesenteric_vessel": (160, 10),
    "aorta": (180, 8), "vena_cava": (140, 8), "bone_cortex": (750, 120), "bone_marrow": (200, 45),
    "intervertebral_disc": (85, 10), "cerebrospinal_fluid": (10, 4), "bladder_wall": (40, 6), "urine": (5, 3),
    "uterus": (70, 10), "lung": (-850, 35), "myocardium": (50, 8), "cardiac_blood": (160, 8),
    "ascites": (10, 4), "nodule": (70, 8), "omental_cake": (55, 10),
}
TISSUE_MEAN_HU = np.array([_TISSUE_HU[name][0] for name in TISSUE_NAMES], np.float32)
TISSUE_TEXTURE_HU = np.array([_TISSUE_HU[name][1] for name in TISSUE_NAMES], np.float32)
# Tissues whose HU comes from iodinated contrast: brighter at the lower kVp of site B (a scanner effect).
_CONTRAST_TISSUES = ("kidney_cortex", "kidney_medulla", "aorta", "vena_cava", "mesenteric_vessel",
                     "cardiac_blood", "spleen", "liver")
SMALL_BOWEL_TISSUES = (TISSUE["small_bowel_wall"], TISSUE["small_bowel_lumen"])

NODULE_DIAMETER_RANGE_MM = (12.0, 25.0)  # >= 12 mm: still 2-3 px in a 64 px body crop
NODULE_HU_RANGE = (55.0, 90.0)  # brighter than bowel wall (~66 HU) on average
NODULE_SITES = ("omentum", "mesentery", "liver_surface", "pelvis", "paracolic_gutter")
_NODULE_SITE_PROBABILITIES = (0.3, 0.2, 0.15, 0.25, 0.1)
DISEASE_TISSUES = (TISSUE["nodule"], TISSUE["omental_cake"])
# Omental cake: confluent tumour replacing the omental fat behind the anterior abdominal wall. Real advanced
# ovarian cancer has it in most high-burden patients (PCI lesion-size score 3); the phantom gives it to every
# patient with PCI >= OMENTAL_CAKE_MIN_PCI, thicker and longer as the PCI rises.
OMENTAL_CAKE_MIN_PCI = 8


def _lookup(names: Iterable[str]) -> np.ndarray:
  """A boolean table over label values, True for the named tissues (fast membership via indexing)."""
  table = np.zeros(256, bool)
  table[[TISSUE[name] for name in names]] = True
  return table


@dataclasses.dataclass(frozen=True)
class Grid:
  """Voxel-centre coordinates (mm) of a [Z, Y, X] volume."""

  z_mm: np.ndarray
  y_mm: np.ndarray
  x_mm: np.ndarray

  @property
  def shape(self) -> tuple[int, int, int]:
    return (self.z_mm.size, self.y_mm.size, self.x_mm.size)

  def box(self, center_mm: Sequence[float], half_mm: Sequence[float]) -> tuple[slice, slice, slice]:
    """Index slices covering center +- half along (x, y, z), clipped to the volume (possibly empty)."""
    def axis(values, center, half):
      return slice(int(np.searchsorted(values, center - half, "left")),
                   int(np.searchsorted(values, center + half, "right")))
    return (axis(self.z_mm, center_mm[2], half_mm[2]), axis(self.y_mm, center_mm[1], half_mm[1]),
            axis(self.x_mm, center_mm[0], half_mm[0]))

  def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Broadcastable (z, y, x) coordinate arrays of a box."""
    return (self.z_mm[box[0]][:, None, None], self.y_mm[box[1]][None, :, None], self.x_mm[box[2]][None, None, :])


def ellipsoid(grid: Grid, center_mm: Sequence[float], semi_axes_mm: Sequence[float],
              angle_rad: float = 0.0, pad_mm: Sequence[float] = (0.0, 0.0, 0.0)):
  """Squared normalised radius of an ellipsoid (rotated in the axial plane) over its bounding box.

  Returns:
    (box, q): the index box and q[z, y, x] = sum((offset / semi_axis)^2); q <= 1 is inside.
  """
  half_xy = max(semi_axes_mm[0], semi_axes_mm[1])
  box = grid.box(center_mm, (half_xy + pad_mm[0], half_xy + pad_mm[1], semi_axes_mm[2] + pad_mm[2]))
  z, y, x = grid.coords(box)
  dx, dy, dz = x - center_mm[0], y - center_mm[1], z - center_mm[2]
  cos, sin = np.cos(angle_rad), np.sin(angle_rad)
  u = (cos * dx + sin * dy) / semi_axes_mm[0]
  v = (-sin * dx + cos * dy) / semi_axes_mm[1]
  return box, u * u + v * v + (dz / semi_axes_mm[2]) ** 2


def paint(labels: np.ndarray, box, mask: np.ndarray, tissue: str, into: np.ndarray | None = None) -> None:
  """Sets `labels[box][mask]` to a tissue, only over voxels whose label is allowed by the `into` table."""
  region = labels[box]
  if into is not None:
    mask = mask & into[region]
  region[mask] = TISSUE[tissue]


def ellipse_in_slice(grid: Grid, index: int, center_xy_mm: Sequence[float], semi_axes_xy_mm: Sequence[float],
                     angle_rad: float = 0.0):
  """(box, mask) of a rotated ellipse drawn in axial slice `index` only."""
  half = max(semi_axes_xy_mm)
  box = grid.box((center_xy_mm[0], center_xy_mm[1], 0.0), (half, half, 0.0))
  box = (slice(index, index + 1),) + box[1:]
  _, y, x = grid.coords(box)
  dx, dy = x - center_xy_mm[0], y - center_xy_mm[1]
  cos, sin = np.cos(angle_rad), np.sin(angle_rad)
  u = (cos * dx + sin * dy) / semi_axes_xy_mm[0]
  v = (-sin * dx + cos * dy) / semi_axes_xy_mm[1]
  return box, u * u + v * v <= 1.0


def paint_ellipsoid(labels, grid, tissue, center_mm, semi_axes_mm, angle_rad=0.0, into=None) -> None:
  box, q = ellipsoid(grid, center_mm, semi_axes_mm, angle_rad)
  paint(labels, box, q <= 1.0, tissue, into)


@dataclasses.dataclass
class SphereUnion:
  """Signed distance (mm) to a union of spheres along paths, over a box: negative inside, valid up to a margin."""

  box: tuple[slice, slice, slice]
  distance_mm: np.ndarray   # float32 over `box`, +inf farther than the margin
  owner: np.ndarray         # int32 over `box`, index of the nearest sphere (-1 far away)
  points_mm: np.ndarray     # [N, 3] sphere centres (x, y, z)
  radii_mm: np.ndarray      # [N]

  def near(self, shape: tuple[int, int, int], distance_mm: float) -> np.ndarray:
    """A full-volume bool mask of voxels closer than `distance_mm` to the union (<= the margin)."""
    mask = np.zeros(shape, bool)
    mask[self.box] = self.distance_mm < distance_mm
    return mask


def sphere_union(grid: Grid, points_mm: np.ndarray, radii_mm: np.ndarray, margin_mm: float) -> SphereUnion:
  points_mm, radii_mm = np.asarray(points_mm, float), np.asarray(radii_mm, float)
  reach = float(radii_mm.max()) + margin_mm
  low, high = points_mm.min(axis=0) - reach, points_mm.max(axis=0) + reach
  outer = grid.box((high + low) / 2, (high - low) / 2)
  offsets = [part.start for part in outer]
  shape = tuple(part.stop - part.start for part in outer)
  distance = np.full(shape, np.inf, np.float32)
  owner = np.full(shape, -1, np.int32)
  for index, (point, radius) in enumerate(zip(points_mm, radii_mm)):
    half = radius + margin_mm
    box = grid.box(point, (half, half, half))
    z, y, x = grid.coords(box)
    signed = (np.sqrt((x - point[0]) ** 2 + (y - point[1]) ** 2 + (z - point[2]) ** 2) - radius).astype(np.float32)
    local = tuple(slice(part.start - offset, part.stop - offset) for part, offset in zip(box, offsets))
    region, region_owner = distance[local], owner[local]
    closer = signed < region
    region[closer] = signed[closer]
    region_owner[closer] = index
  return SphereUnion(outer, distance, owner, points_mm, radii_mm)


def densify_path(control_mm: np.ndarray, values: np.ndarray, step_mm: float) -> tuple[np.ndarray, np.ndarray]:
  """Points every `step_mm` along a polyline, with per-point values interpolated linearly."""
  segment = np.linalg.norm(np.diff(control_mm, axis=0), axis=1)
  arc = np.concatenate([[0.0], np.cumsum(segment)])
  samples = np.linspace(0.0, arc[-1], max(2, int(np.ceil(arc[-1] / step_mm)) + 1))
  points = np.stack([np.interp(samples, arc, control_mm[:, axis]) for axis in range(3)], axis=1)
  interpolated = np.stack([np.interp(samples, arc, values[:, column]) for column in range(values.shape[1])], 1)
  return points, interpolated


def random_walk(rng: np.random.Generator, center_mm: np.ndarray, semi_axes_mm: np.ndarray, steps: int,
                step_mm: float) -> np.ndarray:
  """A smooth random walk (bowel loop centreline) kept inside an ellipsoidal region."""
  position = center_mm + semi_axes_mm * _random_in_unit_ball(rng) * 0.8
  direction = _unit(rng.normal(size=3))
  points = [position]
  for _ in range(steps):
    direction = _unit(direction + 0.5 * rng.normal(size=3))
    outside = (position - center_mm) / semi_axes_mm
    if np.sum(outside ** 2) > 0.8:  # steer back towards the centre of the region
      direction = _unit(direction - 1.5 * _unit(outside / semi_axes_mm))
    position = position + direction * step_mm
    points.append(position)
  return np.array(points)


def _unit(vector: np.ndarray) -> np.ndarray:
  return vector / max(float(np.linalg.norm(vector)), 1e-9)


def _random_in_unit_ball(rng: np.random.Generator) -> np.ndarray:
  return _unit(rng.normal(size=3)) * rng.uniform() ** (1 / 3)


@dataclasses.dataclass(frozen=True)
class BodyShape:
  """Per-patient body geometry; every size in mm, `t` is 0 at the pelvic floor and 1 at the top of the diaphragm
  domes (`dome_mm`, the top of the abdomen: the highest level that still holds liver under the lungs)."""

  pelvic_floor_mm: float
  dome_mm: float
  half_width_mm: float      # body semi-axis along x at mid-abdomen
  half_depth_mm: float      # body semi-axis along y at mid-abdomen
  center_y_mm: float
  fat_mm: float             # subcutaneous fat thickness (lateral; 80 % of it anteriorly/posteriorly)
  muscle_mm: float          # abdominal wall muscle thickness

  def t(self, z_mm):
    return (np.asarray(z_mm, float) - self.pelvic_floor_mm) / (self.dome_mm - self.pelvic_floor_mm)

  def z(self, t):
    return self.pelvic_floor_mm + np.asarray(t, float) * (self.dome_mm - self.pelvic_floor_mm)

  def outer(self, t):
    """Body semi-axes (x, y) at level t: wider at the hips, rounder in the chest."""
    t = np.asarray(t, float)
    hips = np.exp(-(((t - 0.12) / 0.15) ** 2))
    return (self.half_width_mm * (1.0 + 0.07 * hips - 0.04 * np.clip(t - 1.0, 0.0, 1.0) * 4),
            self.half_depth_mm * (1.0 + 0.03 * hips + 0.05 * np.clip(t - 0.9, 0.0, 0.5)))

  def cavity(self, t):
    """Semi-axes (x, y) of the abdominal/thoracic cavity inside fat and muscle."""
    width, depth = self.outer(t)
    return (width - self.fat_mm - self.muscle_mm - 2.0, depth - 0.8 * self.fat_mm - self.muscle_mm - 2.0)

  def spine_y(self, t):
    """y of the vertebral body centre: just in front of the paraspinal muscles."""
    _, depth = self.cavity(t)
    return self.center_y_mm + depth / POSTERIOR_SQUASH - 45.0


POSTERIOR_SQUASH = 1.1  # the back is flatter than the belly: posterior y offsets are stretched by this


def _body_radius2(y, x, center_y, half_width, half_depth):
  dy = y - center_y
  dy = np.where(dy > 0, dy * POSTERIOR_SQUASH, dy)
  return (x / half_width) ** 2 + (dy / half_depth) ** 2


@dataclasses.dataclass
class Anatomy:
  """The painted phantom before HU rendering."""

  labels: np.ndarray                   # uint8 [Z, Y, X]
  small_bowel: SphereUnion
  small_bowel_wall_mm: np.ndarray      # [N] wall thickness of each small-bowel sphere
  mesenteric_vessels: SphereUnion
  peritoneal_wall_distance_mm: np.ndarray  # float32 [Z, Y, X] distance inside the cavity to its wall
  small_bowel_loop_ids: np.ndarray | None = None  # [N] loop of each small-bowel sphere (PCI regions 9-12)


def paint_anatomy(rng: np.random.Generator, grid: Grid, body: BodyShape, *, has_uterus: bool,
                  has_gallbladder: bool) -> Anatomy:
  """Paints every organ except ascites and nodules into a label volume."""
  labels = np.zeros(grid.shape, np.uint8)
  # Full-volume arithmetic in float32: half the memory traffic of float64, and mm precision is plenty.
  z, y, x = (axis.astype(np.float32) for axis in grid.coords((slice(None), slice(None), slice(None))))
  t = body.t(z)
  width, depth = (value.astype(np.float32) for value in body.outer(t))
  cavity_width, cavity_depth = (value.astype(np.float32) for value in body.cavity(t))
  spine_y = body.spine_y(t).astype(np.float32)
  fat_everywhere = _lookup(["intraperitoneal_fat", "retroperitoneal_fat"])
  intraperitoneal = _lookup(["intraperitoneal_fat"])

  # Table: a curved carbon-fibre plate below the body, separated from it by an air gap.
  back_mm = body.center_y_mm + float(np.max(depth)) * 1.05 / POSTERIOR_SQUASH
  table_top = back_mm + rng.uniform(15.0, 30.0) - 20.0 * (x / 190.0) ** 2
  depth_in_table = np.broadcast_to(y - table_top, (1,) + labels.shape[1:])
  labels[:] = np.where((depth_in_table >= 0) & (depth_in_table < 12.0),
                       np.where((depth_in_table < 2.0) | (depth_in_table >= 10.0), TISSUE["table_shell"],
                                TISSUE["table_core"]), 0).astype(np.uint8)

  # Body wall: skin, subcutaneous fat, muscle, cavity (nested ellipses).
  def layer(inset_x, inset_y):
    return _body_radius2(y, x, body.center_y_mm, width - inset_x, depth - inset_y) <= 1.0
  labels[layer(0, 0)] = TISSUE["skin"]
  labels[layer(2.0, 2.0)] = TISSUE["subcutaneous_fat"]
  labels[layer(2.0 + body.fat_mm, 2.0 + 0.8 * body.fat_mm)] = TISSUE["muscle"]
  cavity_r2 = _body_radius2(y, x, body.center_y_mm, cavity_width, cavity_depth)
  cavity = cavity_r2 <= 1.0
  labels[cavity] = TISSUE["intraperitoneal_fat"]
  # The posterior peritoneum runs in front of the great vessels and kidneys, curving back into the paracolic
  # gutters at the sides, and drops back to the sacrum in the pelvis.
  retroperitoneal_line = (spine_y - 37.0 + 45.0 * (x / cavity_width) ** 2
                          + 25.0 * np.clip((0.3 - t) / 0.2, 0.0, 1.0).astype(np.float32))
  retroperitoneum = cavity & (y > retroperitoneal_line)
  labels[retroperitoneum] = TISSUE["retroperitoneal_fat"]
  # Distance to the cavity wall along the ray from the centre: r * (1/sqrt(q) - 1).
  dy = np.where(y > body.center_y_mm, (y - body.center_y_mm) * POSTERIOR_SQUASH, y - body.center_y_mm)
  radius = np.sqrt(x * x + dy * dy)
  wall_distance = np.where(cavity, radius * (1.0 / np.sqrt(np.maximum(cavity_r2, 1e-6)) - 1.0), -1.0)
  wall_distance = wall_distance.astype(np.float32)

  _paint_spine_and_pelvis(labels, grid, body)
  _paint_vessels(labels, grid, body)
  _paint_organs(rng, labels, grid, body, has_uterus=has_uterus, has_gallbladder=has_gallbladder)
  _paint_colon(rng, labels, grid, body, into=fat_everywhere)
  small_bowel, wall_mm, loop_ids = _paint_small_bowel(rng, labels, grid, body, into=intraperitoneal)
  mesenteric = _paint_mesenteric_vessels(rng, labels, grid, body, into=intraperitoneal)
  _paint_chest(rng, labels, grid, body)
  _paint_ribs(rng, labels, grid, body)
  _paint_thighs(labels, grid, body)
  return Anatomy(labels, small_bowel, wall_mm, mesenteric, wall_distance, loop_ids)


def _paint_spine_and_pelvis(labels, grid, body) -> None:
  """Vertebrae (with discs), paraspinal and psoas muscles, sacrum, iliac wings, femoral heads, pubis."""
  soft = _lookup(["retroperitoneal_fat", "intraperitoneal_fat", "muscle", "subcutaneous_fat"])
  body_tissue = _lookup(["retroperitoneal_fat", "intraperitoneal_fat", "muscle", "subcutaneous_fat", "skin"])
  for index, z in enumerate(grid.z_mm):
    t = float(body.t(z))
    if t < 0.0:
      continue
    cavity_width, cavity_depth = body.cavity(t)
    spine_y = float(body.spine_y(t))

    def ellipse(tissue, cx, cy, sx, sy, angle=0.0, into=soft):
      paint(labels, *ellipse_in_slice(grid, index, (cx, cy), (sx, sy), angle), tissue, into)

    for side in (-1, 1):
      ellipse("muscle", side * 28.0, spine_y + 36.0, 23.0, 18.0, into=body_tissue)  # erector spinae
    if t > 0.28:  # lumbar/thoracic vertebra: cortex, marrow or disc, canal, posterior arch
      disc = (z - body.pelvic_floor_mm) % 32.0 < 7.0
      ellipse("bone_cortex", 0.0, spine_y, 21.0, 16.0, into=None)
      ellipse("intervertebral_disc" if disc else "bone_marrow", 0.0, spine_y, 18.0, 13.0, into=None)
      ellipse("bone_cortex", 0.0, spine_y + 36.0, 6.0, 13.0, into=None)
      ellipse("cerebrospinal_fluid", 0.0, spine_y + 23.0, 7.0, 6.0, into=None)
    else:  # sacrum, broad and flat
      width = 48.0 * np.clip(t / 0.28, 0.3, 1.0)
      ellipse("bone_cortex", 0.0, spine_y + 12.0, width, 15.0, into=None)
      ellipse("bone_marrow", 0.0, spine_y + 12.0, width - 3.0, 12.0, into=None)
    if 0.08 < t < 0.62:  # psoas grows towards the pelvis and drifts laterally in it
      grow = float(np.clip((0.62 - t) / 0.4, 0.0, 1.0))
      radius = 8.0 + 14.0 * grow
      drift = max(0.0, 0.25 - t) * 160.0
      for side in (-1, 1):
        ellipse("muscle", side * (26.0 + radius + drift), spine_y - 6.0 - drift * 0.6, radius, radius * 0.85)
    if 0.13 < t < 0.30:  # iliac wings: thin plates from the sacrum out and forwards
      for side in (-1, 1):
        cx, cy = side * 0.66 * cavity_width, spine_y - 8.0
        angle = side * np.deg2rad(-45.0)
        ellipse("bone_cortex", cx, cy, 0.28 * cavity_width, 8.0, angle)
        ellipse("bone_marrow", cx, cy, 0.28 * cavity_width - 3.0, 5.0, angle, into=_lookup(["bone_cortex"]))
    if t < 0.13:  # femoral heads and pubic bones
      for side in (-1, 1):
        cx, cy = side * 0.72 * cavity_width, body.center_y_mm + 0.05 * cavity_depth
        ellipse("bone_cortex", cx, cy, 22.0, 22.0, into=None)
        ellipse("bone_marrow", cx, cy, 19.0, 19.0, into=None)
        if t < 0.07:
          ellipse("bone_cortex", side * 24.0, body.center_y_mm - 0.8 * cavity_depth, 22.0, 8.0, side * 0.3)


def _paint_vessels(labels, grid, body) -> None:
  """Aorta and inferior vena cava, splitting into iliac vessels in the pelvis."""
  into = _lookup(["retroperitoneal_fat", "intraperitoneal_fat", "muscle"])
  for index, z in enumerate(grid.z_mm):
    t = float(body.t(z))
    if t < 0.1:
      continue
    spine_y = float(body.spine_y(t))
    if t > 0.45:
      vessels = [("aorta", 12.0, spine_y - 25.0, 10.0, 10.0), ("vena_cava", -22.0, spine_y - 24.0, 12.0, 8.0)]
    else:
      spread = (0.45 - t) * 150.0
      vessels = [("aorta", side * (10.0 + spread), spine_y - 25.0 + spread * 0.2, 7.0, 7.0) for side in (-1, 1)]
      vessels += [("vena_cava", side * (10.0 + spread * 0.9), spine_y - 16.0 + spread * 0.2, 8.0, 7.0)
                  for side in (-1, 1)]
    for tissue, cx, cy, sx, sy in vessels:
      paint(labels, *ellipse_in_slice(grid, index, (cx, cy), (sx, sy)), tissue, into)


def _paint_organs(rng, labels, grid, body, *, has_uterus, has_gallbladder) -> None:
  """Liver, gallbladder, spleen, stomach, pancreas, kidneys, bladder, uterus (jittered per patient)."""
  jitter = lambda scale: rng.uniform(1.0 - scale, 1.0 + scale)  # pylint: disable=unnecessary-lambda-assignment
  abdomen_mm = body.dome_mm - body.pelvic_floor_mm
  width, depth = body.cavity(0.75)
  cy = body.center_y_mm
  solid = _lookup(["intraperitoneal_fat", "retroperitoneal_fat"])

  # Organ levels are fractions t of the pelvic floor -> diaphragm dome distance (the phantom abdomen is shorter
  # than an adult's, so everything scales with it). The liver is drawn past the dome: the diaphragm
  # (_paint_chest) trims it, so the liver's highest slice is the one just below the dome top.
  liver_top = body.dome_mm + rng.uniform(15.0, 25.0)
  liver_height = liver_top - float(body.z(rng.uniform(0.5, 0.6)))
  # Per slice, from the caudal tip (s = 0: a small right lobe against the flank) to the dome (s = 1: the whole
  # right upper quadrant and the left lobe across the midline).
  liver_width = jitter(0.08)
  for index in np.nonzero((grid.z_mm > liver_top - liver_height) & (grid.z_mm < liver_top))[0]:
    s = (grid.z_mm[index] - (liver_top - liver_height)) / liver_height
    dome = np.sqrt(max(0.0, 1.0 - ((s - 0.8) / 0.2) ** 2)) if s > 0.8 else 1.0
    taper = np.sqrt(min(1.0, s / 0.15)) * dome
    center = (-width * (0.6 - 0.3 * s), cy - depth * (0.05 + 0.1 * s))
    axes = (max(1.0, width * (0.3 + 0.42 * s) * liver_width * taper), max(1.0, depth * (0.5 + 0.35 * s) * taper))
    paint(labels, *ellipse_in_slice(grid, index, center, axes, np.deg2rad(10.0)), "liver", solid)
  if has_gallbladder:
    paint_ellipsoid(labels, grid, "gallbladder", (-0.3 * width, cy - 0.45 * depth, liver_top - 0.8 * liver_height),
                    (13.0, 16.0, 0.1 * abdomen_mm), np.deg2rad(30.0), _lookup(["liver", "intraperitoneal_fat"]))
  spleen_center = (0.62 * width, cy + 0.3 * depth, float(body.z(rng.uniform(0.83, 0.88))))
  paint_ellipsoid(labels, grid, "spleen", spleen_center, (0.2 * width * jitter(0.15), 0.4 * depth, 0.15 * abdomen_mm),
                  np.deg2rad(-40.0), solid)
  stomach_center = (0.3 * width, cy - 0.35 * depth, float(body.z(rng.uniform(0.8, 0.86))))
  stomach_axes = np.array([0.32 * width, 0.3 * depth, 0.15 * abdomen_mm]) * jitter(0.12)
  paint_ellipsoid(labels, grid, "stomach_wall", stomach_center, stomach_axes, np.deg2rad(-25.0), solid)
  box, q = ellipsoid(grid, stomach_center, stomach_axes - 4.0, np.deg2rad(-25.0))
  gas_level = stomach_center[1] - stomach_axes[1] * rng.uniform(0.2, 0.6)  # air rises to the front (supine)
  lumen = q <= 1.0
  y_box = grid.coords(box)[1]
  paint(labels, box, lumen & (y_box < gas_level), "gas", _lookup(["stomach_wall"]))
  paint(labels, box, lumen & (y_box >= gas_level), "stomach_content", _lookup(["stomach_wall"]))
  pancreas_t = rng.uniform(0.7, 0.75)
  paint_ellipsoid(labels, grid, "pancreas", (0.15 * width, float(body.spine_y(pancreas_t)) - 42.0,
                                             float(body.z(pancreas_t))),
                  (0.4 * width, 10.0, 12.0), np.deg2rad(-12.0), solid)
  for side, kidney_t in ((1, 0.68), (-1, 0.64)):
    center_z = float(body.z(kidney_t + rng.uniform(-0.03, 0.03)))
    center = (side * 62.0, float(body.spine_y(body.t(center_z))) + 4.0, center_z)
    angle = np.deg2rad(side * 35.0)
    into = _lookup(["retroperitoneal_fat", "intraperitoneal_fat", "muscle"])
    half_height = 0.19 * abdomen_mm
    paint_ellipsoid(labels, grid, "kidney_cortex", center, (26.0, 20.0, half_height), angle, into)
    paint_ellipsoid(labels, grid, "kidney_medulla", center, (16.0, 11.0, half_height * 0.7), angle,
                    _lookup(["kidney_cortex"]))
    paint_ellipsoid(labels, grid, "retroperitoneal_fat", (center[0] - side * 14.0, center[1] - 6.0, center[2]),
                    (7.0, 6.0, half_height * 0.3), 0.0, _lookup(["kidney_medulla", "kidney_cortex"]))
  pelvis_width, pelvis_depth = body.cavity(0.12)
  bladder_axes = np.array([rng.uniform(35.0, 55.0), rng.uniform(28.0, 40.0), rng.uniform(22.0, 35.0)])
  bladder_center = (0.0, cy - pelvis_depth + bladder_axes[1] + 6.0, body.z(0.02) + bladder_axes[2])
  paint_ellipsoid(labels, grid, "bladder_wall", bladder_center, bladder_axes, 0.0, solid)
  paint_ellipsoid(labels, grid, "urine", bladder_center, bladder_axes - 3.0, 0.0, _lookup(["bladder_wall"]))
  if has_uterus:
    paint_ellipsoid(labels, grid, "uterus", (rng.uniform(-10, 10), bladder_center[1] + bladder_axes[1] + 22.0,
                                             bladder_center[2] + 15.0),
                    (28.0, 20.0, 32.0), rng.uniform(-0.3, 0.3), solid)


def _paint_colon(rng, labels, grid, body, into) -> None:
  """Rectum, sigmoid, descending, transverse and ascending colon: a tube with gas on top and stool below."""
  sag = rng.uniform(0.0, 0.12)
  # (x as a fraction of the cavity width, y as a fraction of the cavity depth, t, radius mm, gas fraction)
  plan = np.array([
      (0.0, None, 0.02, 15, 0.2), (0.0, None, 0.16, 18, 0.3), (0.22, -0.25, 0.24, 14, 0.3),
      (0.05, -0.35, 0.30, 14, 0.4), (0.50, -0.05, 0.34, 15, 0.4), (0.74, 0.20, 0.45, 17, 0.4),
      (0.74, 0.25, 0.62, 18, 0.45), (0.60, -0.15, 0.76, 20, 0.5), (0.30, -0.68, 0.64 - sag, 22, 0.6),
      (-0.30, -0.68, 0.62 - sag, 22, 0.6), (-0.62, -0.25, 0.68, 22, 0.5), (-0.70, 0.15, 0.50, 24, 0.4),
      (-0.62, 0.05, 0.28, 26, 0.35)], dtype=object)
  control, values = [], []
  for fraction_x, fraction_y, t, radius, gas in plan:
    width, depth = body.cavity(t)
    y = float(body.spine_y(t)) - 24.0 if fraction_y is None else body.center_y_mm + fraction_y * depth
    control.append((fraction_x * width + rng.normal(0, 5), y + rng.normal(0, 5), float(body.z(t))))
    values.append((radius * rng.uniform(0.85, 1.1), gas * rng.uniform(0.6, 1.3)))
  points, values = densify_path(np.array(control), np.array(values), step_mm=4.0)
  union = sphere_union(grid, points, values[:, 0], margin_mm=0.0)
  region = labels[union.box]
  inside = (union.distance_mm < 0) & into[region]
  owner = np.maximum(union.owner, 0)
  y = grid.coords(union.box)[1]
  # Gas fills the front (non-dependent) part of the lumen of each segment.
  gas_line = points[owner, 1] - values[owner, 0] * (1.0 - 2.0 * values[owner, 1])
  region[inside] = TISSUE["colon_wall"]
  lumen = inside & (union.distance_mm < -3.0)
  region[lumen & (y < gas_line)] = TISSUE["gas"]
  region[lumen & (y >= gas_line)] = TISSUE["stool"]


def _paint_small_bowel(rng, labels, grid, body, into) -> tuple[SphereUnion, np.ndarray, np.ndarray]:
  """Small-bowel loops (rings: enhancing wall, fluid lumen) in the mid and lower abdomen."""
  width, depth = body.cavity(0.35)
  abdomen_mm = body.dome_mm - body.pelvic_floor_mm
  center = np.array([0.0, body.center_y_mm - 0.3 * depth, float(body.z(0.36))])
  semi_axes = np.array([0.6 * width, 0.5 * depth, 0.23 * abdomen_mm])
  points, radii, walls, loop_ids = [], [], [], []
  for loop_index in range(int(rng.integers(12, 18))):
    collapsed = rng.uniform() < 0.15
    radius = rng.uniform(8.0, 10.0) if collapsed else rng.uniform(10.0, 14.0)
    wall = radius - 3.5 if collapsed else rng.uniform(2.5, 3.5)
    loop = random_walk(rng, center, semi_axes, int(rng.integers(16, 30)), step_mm=5.0)
    points.append(loop)
    radii.append(np.full(len(loop), radius))
    walls.append(np.full(len(loop), wall))
    loop_ids.append(np.full(len(loop), loop_index))
  points, radii, walls = np.concatenate(points), np.concatenate(radii), np.concatenate(walls)
  loop_ids = np.concatenate(loop_ids)
  # The margin keeps the distance valid near the loops: ascites spares the mesenteric fat close to bowel.
  union = sphere_union(grid, points, radii, margin_mm=7.0)
  region = labels[union.box]
  inside = (union.distance_mm < 0) & into[region]
  owner = np.maximum(union.owner, 0)
  # Where two loops press together their walls meet: mark voxels whose nearest loop differs from an in-plane
  # neighbour's as wall, so loops stay separate rings instead of merging into one lumen.
  nearest_loop = np.where(union.owner >= 0, loop_ids[owner], -1)
  between_loops = np.zeros(inside.shape, bool)
  for axis in (1, 2):
    low = [slice(None)] * 3
    high = [slice(None)] * 3
    low[axis], high[axis] = slice(None, -1), slice(1, None)
    differs = nearest_loop[tuple(low)] != nearest_loop[tuple(high)]
    between_loops[tuple(low)] |= differs
    between_loops[tuple(high)] |= differs
  wall_voxels = inside & ((union.distance_mm >= -walls[owner]) | between_loops)
  region[wall_voxels] = TISSUE["small_bowel_wall"]
  region[inside & ~wall_voxels] = TISSUE["small_bowel_lumen"]
  return union, walls, loop_ids


def _paint_mesenteric_vessels(rng, labels, grid, body, into) -> SphereUnion:
  """Thin enhancing vessels fanning out from the mesenteric root: small bright dots that are NOT nodules."""
  width, depth = body.cavity(0.42)
  root = np.array([0.02 * width, float(body.spine_y(0.6)) - 42.0, float(body.z(0.6))])
  points, radii = [], []
  for _ in range(8):
    target = np.array([rng.uniform(-0.45, 0.45) * width, body.center_y_mm - rng.uniform(0.0, 0.55) * depth,
                       float(body.z(rng.uniform(0.25, 0.6)))])
    middle = (root + target) / 2 + rng.normal(0, 12, size=3)
    path, radius = densify_path(np.stack([root, middle, target]), np.array([[3.0], [2.5], [1.8]]), step_mm=2.5)
    points.append(path)
    radii.append(radius[:, 0])
  union = sphere_union(grid, np.concatenate(points), np.concatenate(radii), margin_mm=3.0)
  region = labels[union.box]
  region[(union.distance_mm < 0) & into[region]] = TISSUE["mesenteric_vessel"]
  return union


# The diaphragm of `_paint_chest`: flat on top over the central part of the cavity (normalised radius below
# DIAPHRAGM_PLATEAU), curving down to the chest wall, deepest behind. So the lung bases wrap around the liver dome
# and the spleen as real ones do: below the dome top a rim of lung surrounds the upper abdominal organs, widest
# and lowest behind them (the posterior costophrenic recesses), while above it the lungs fill the cavity.
DIAPHRAGM_PLATEAU = 0.8
RECESS_ANTERIOR_MM = (12.0, 18.0)   # how far the lung reaches below the dome top in front (drawn per patient)
RECESS_POSTERIOR_MM = (40.0, 55.0)  # and behind


def _paint_chest(rng, labels, grid, body) -> None:
  """Lungs above the diaphragm (see DIAPHRAGM_PLATEAU) and the heart on its central part.

  Above `body.dome_mm` the lungs fill the cavity (around the heart, spine and great vessels). Below it, a voxel
  at height h under the dome top and normalised cavity radius r is lung when r > p + (1 - p) * sqrt(h / R),
  with p the plateau and R the recess depth at that angle (anterior to posterior), i.e. when it lies above a
  diaphragm surface that falls as (r - p)^2 from the plateau's rim to the chest wall.
  """
  into = _lookup(["intraperitoneal_fat", "retroperitoneal_fat", "liver", "spleen", "stomach_wall",
                  "stomach_content", "gas", "colon_wall", "stool", "pancreas", "kidney_cortex", "kidney_medulla",
                  "gallbladder"])
  anterior_mm, posterior_mm = rng.uniform(*RECESS_ANTERIOR_MM), rng.uniform(*RECESS_POSTERIOR_MM)
  y, x = grid.y_mm[:, None], grid.x_mm[None, :]
  for index in np.nonzero(grid.z_mm > body.dome_mm - posterior_mm)[0]:
    t = float(body.t(grid.z_mm[index]))
    width, depth = body.cavity(t)
    radius = np.sqrt(_body_radius2(y, x, body.center_y_mm, width, depth))
    if grid.z_mm[index] > body.dome_mm:
      lung = radius <= 1.0
    else:
      backward = np.clip((y - body.center_y_mm) * POSTERIOR_SQUASH / depth, -1.0, 1.0)
      recess_mm = anterior_mm + (posterior_mm - anterior_mm) * (1.0 + backward) / 2.0
      below = (body.dome_mm - grid.z_mm[index]) / recess_mm
      lung = (radius <= 1.0) & (below < 1.0) & (
          radius > DIAPHRAGM_PLATEAU + (1.0 - DIAPHRAGM_PLATEAU) * np.sqrt(np.clip(below, 0.0, 1.0)))
    region = labels[index]
    region[lung & into[region]] = TISSUE["lung"]
  width, depth = body.cavity(1.1)
  cy = body.center_y_mm
  # The heart rests on the central tendon, just above the dome top.
  heart_center = (0.12 * width, cy - 0.25 * depth, body.dome_mm + 73.0)
  heart_into = _lookup(["lung", "liver", "intraperitoneal_fat", "retroperitoneal_fat", "stomach_wall",
                        "stomach_content", "gas", "colon_wall", "stool"])
  paint_ellipsoid(labels, grid, "myocardium", heart_center, (0.42 * width, 0.5 * depth, 72.0), 0.5, heart_into)
  paint_ellipsoid(labels, grid, "cardiac_blood", heart_center, (0.42 * width - 11.0, 0.5 * depth - 11.0, 61.0),
                  0.5, _lookup(["myocardium"]))


def _paint_ribs(rng, labels, grid, body) -> None:
  """Rib cross-sections in the wall of the lower chest and upper abdomen, at staggered levels."""
  angles = np.deg2rad(np.concatenate([np.linspace(-160, -110, 3), np.linspace(-70, -20, 3),
                                      np.linspace(15, 75, 4), np.linspace(105, 165, 4)]))
  phases = rng.uniform(0.0, 25.0, size=angles.size)
  into = _lookup(["muscle", "subcutaneous_fat", "intraperitoneal_fat", "retroperitoneal_fat", "lung", "liver",
                  "spleen"])
  for index, z in enumerate(grid.z_mm):
    t = float(body.t(z))
    if t < 0.6:
      continue
    width, depth = body.cavity(t)
    for angle, phase in zip(angles, phases):
      # Lower ribs only reach the flanks; anterior ribs (costal margin) end higher up.
      lateral = abs(np.cos(angle))
      if t < 1.0 and lateral < 0.55 + 0.45 * (1.0 - t) / 0.4:
        continue
      if (z + phase) % 25.0 > 11.0:
        continue
      radial_x = (width + 5.0) * np.cos(angle)
      radial_y = (depth + 5.0) * np.sin(angle) / (POSTERIOR_SQUASH if np.sin(angle) > 0 else 1.0)
      paint(labels, *ellipse_in_slice(grid, index, (radial_x, body.center_y_mm + radial_y), (10.0, 4.5),
                                      angle + np.pi / 2), "bone_cortex", into)


def _paint_thighs(labels, grid, body) -> None:
  """Below the pelvic floor: two separate thighs (skin, fat, muscle, femur) and nothing between them."""
  below = np.nonzero(grid.z_mm < body.pelvic_floor_mm)[0]
  if below.size == 0:
    return
  hip_width, hip_depth = body.outer(0.1)
  thigh_x, thigh_y = 0.42 * hip_width, 0.72 * hip_depth
  keep_table = _lookup(["table_shell", "table_core"])
  for index in below:
    region = labels[index]
    region[~keep_table[region]] = TISSUE["air"]
    y, x = grid.y_mm[:, None], grid.x_mm[None, :]
    for side in (-1, 1):
      cx, cy = side * 0.5 * hip_width, body.center_y_mm + 0.05 * hip_depth
      for inset, tissue in ((0.0, "skin"), (2.0, "subcutaneous_fat"), (2.0 + 0.6 * body.fat_mm, "muscle")):
        region[((x - cx) / (thigh_x - inset)) ** 2 + ((y - cy) / (thigh_y - inset)) ** 2 <= 1.0] = TISSUE[tissue]
      femur_x, femur_y = cx - side * 0.1 * thigh_x, cy + 0.05 * thigh_y
      region[(x - femur_x) ** 2 + (y - femur_y) ** 2 <= 14.0 ** 2] = TISSUE["bone_cortex"]
      region[(x - femur_x) ** 2 + (y - femur_y) ** 2 <= 9.0 ** 2] = TISSUE["bone_marrow"]


ASCITES_GRADES = ("none", "small", "large")


def random_ascites(rng: np.random.Generator, anatomy: Anatomy, grid: Grid, body: BodyShape, grade: str) -> None:
  """Replaces intraperitoneal fat by fluid: pelvic and perihepatic pockets (small) or everywhere but the fat
  right around the bowel and mesenteric vessels (large: the loops float in fluid)."""
  if grade not in ASCITES_GRADES:
    raise ValueError(f"ascites grade {grade!r} is not one of {ASCITES_GRADES}")
  if grade == "none":
    return
  labels = anatomy.labels
  z, y, x = grid.coords((slice(None), slice(None), slice(None)))
  t = body.t(z)
  width, depth = body.cavity(t)
  fat = (labels == TISSUE["intraperitoneal_fat"]) & (t >= 0.0) & (t < 1.0)
  wall = anatomy.peritoneal_wall_distance_mm
  if grade == "small":
    rim_mm = rng.uniform(5.0, 9.0)
    perihepatic = (t > 0.6) & (x < 0.1 * width) & (wall < rim_mm)
    pelvic = (t < 0.22) & (y > body.center_y_mm - 0.1 * depth) & (wall < 3.0 * rim_mm)
    fluid = fat & (perihepatic | pelvic)
  else:
    mesentery_mm = rng.uniform(3.0, 7.0)
    near_bowel = (anatomy.small_bowel.near(labels.shape, mesentery_mm)
                  | anatomy.mesenteric_vessels.near(labels.shape, 2.0))
    fluid = fat & ~near_bowel
  labels[fluid] = TISSUE["ascites"]


@dataclasses.dataclass(frozen=True)
class Nodule:
  """One peritoneal implant: an ellipsoid of enhancing soft tissue."""

  site: str                 # one of NODULE_SITES, or "small_bowel"
  center_mm: tuple[float, float, float]
  semi_axes_mm: tuple[float, float, float]
  angle_rad: float
  hu: float
  on_small_bowel: bool
  box: tuple[slice, slice, slice]
  mask: np.ndarray          # bool, over `box`


_FREE_SPACE = ("intraperitoneal_fat", "ascites")
_ALLOWED_OVERLAP = {
    "omentum": _FREE_SPACE + ("mesenteric_vessel", "muscle"),
    "mesentery": _FREE_SPACE + ("mesenteric_vessel",),
    "liver_surface": _FREE_SPACE + ("mesenteric_vessel", "liver"),
    "pelvis": _FREE_SPACE + ("mesenteric_vessel",),
    "paracolic_gutter": _FREE_SPACE + ("mesenteric_vessel", "muscle", "colon_wall"),
    "small_bowel": _FREE_SPACE + ("mesenteric_vessel", "small_bowel_wall", "small_bowel_lumen"),
}


def random_nodules(rng: np.random.Generator, anatomy: Anatomy, grid: Grid, body: BodyShape, count: int,
                   small_bowel_count: int, max_slice_fraction: float = 0.4,
                   diameter_range_mm: tuple[float, float] = NODULE_DIAMETER_RANGE_MM) -> list[Nodule]:
  """Places and paints nodules: `small_bowel_count` touching a small-bowel loop, the rest clear of all bowel.

  Each nodule's largest diameter is drawn uniformly from `diameter_range_mm` (the other two axes are 70-100 % of
  it).

  "Touching" means 26-connected voxel adjacency between the nodule and small-bowel wall or lumen. Nodules never
  touch each other, and together they cover at most `max_slice_fraction` of the slices. Raises RuntimeError if
  a required nodule cannot be placed (a generator bug, never expected).
  """
  labels = anatomy.labels
  nodules: list[Nodule] = []
  covered_slices: set[int] = set()
  slice_budget = max(1, int(max_slice_fraction * grid.shape[0]))
  free_space = _lookup(_FREE_SPACE)
  small_bowel_table = _lookup(["small_bowel_wall", "small_bowel_lumen"])
  step_z = float(np.max(np.diff(grid.z_mm))) if grid.shape[0] > 1 else 5.0
  pad = (abs(grid.x_mm[1] - grid.x_mm[0]), abs(grid.y_mm[1] - grid.y_mm[0]), step_z)
  liver_surface = _surface_points(labels, grid, "liver")

  def attempt(on_small_bowel: bool) -> Nodule | None:
    diameter = rng.uniform(*diameter_range_mm)
    semi_axes = (diameter / 2, diameter / 2 * rng.uniform(0.75, 1.0), diameter / 2 * rng.uniform(0.7, 1.0))
    angle = rng.uniform(0.0, np.pi)
    if on_small_bowel:
      site, center = "small_bowel", _small_bowel_candidate(rng, anatomy, labels, grid, semi_axes)
    else:
      site = str(rng.choice(NODULE_SITES, p=_NODULE_SITE_PROBABILITIES))
      center = _site_candidate(rng, site, body, grid, semi_axes, liver_surface)
    if center is None:
      return None
    box, q = ellipsoid(grid, center, semi_axes, angle, pad)
    mask = q <= 1.0
    if not mask.any():
      return None
    region = labels[box]
    inside = region[mask]
    if not _lookup(_ALLOWED_OVERLAP[site])[inside].all():
      return None
    if free_space[inside].mean() < (0.4 if site in ("small_bowel", "liver_surface") else 0.6):
      return None
    ring = region[ndimage.binary_dilation(mask, np.ones((3, 3, 3), bool)) & ~mask]
    if np.isin(ring, DISEASE_TISSUES).any() or bool(small_bowel_table[ring].any()) != on_small_bowel:
      return None
    first_slice = box[0].start
    slices = {first_slice + int(k) for k in np.nonzero(mask.any(axis=(1, 2)))[0]}
    if len(covered_slices | slices) > slice_budget:
      return None
    # Keep implants inside the ground-truth abdominal range (e.g. not in the chest above the diaphragm domes),
    # so that a correct abdominal crop never cuts one off.
    slice_z = grid.z_mm[sorted(slices)]
    if slice_z[0] < body.pelvic_floor_mm or slice_z[-1] > body.dome_mm:
      return None
    covered_slices.update(slices)
    region[mask] = TISSUE["nodule"]
    return Nodule(site, tuple(float(v) for v in center), tuple(float(v) for v in semi_axes), float(angle),
                  float(rng.uniform(*NODULE_HU_RANGE)), on_small_bowel, box, mask)

  for index in range(count):
    on_small_bowel = index < small_bowel_count
    required = index == 0 or on_small_bowel
    for _ in range(400 if required else 60):
      nodule = attempt(on_small_bowel)
      if nodule is not None:
        nodules.append(nodule)
        break
    else:
      if required:
        raise RuntimeError(f"phantom bug: could not place a required nodule (small_bowel={on_small_bowel})")
  return nodules


def omental_cake(rng: np.random.Generator, anatomy: Anatomy, grid: Grid, body: BodyShape, pci: int) -> bool:
  """Paints an omental cake for a patient with PCI >= OMENTAL_CAKE_MIN_PCI; returns whether one was painted.

  The cake is a lens of soft tissue along the anterior peritoneal wall: thicker (about 16-40 mm) and longer
  with the PCI, with a smoothly irregular inner surface. It only replaces free intraperitoneal space (fat or
  ascites) and never touches small bowel (26-connected), so that small-bowel disease stays the nodules'
  business. It is one 26-connected piece (its largest component), painted before the nodules, which never
  touch it.
  """
  if pci < OMENTAL_CAKE_MIN_PCI:
    return False
  labels = anatomy.labels
  z, y, x = (axis.astype(np.float32) for axis in grid.coords((slice(None), slice(None), slice(None))))
  t = body.t(z)
  width, depth = (value.astype(np.float32) for value in body.cavity(t))
  thickness_mm = float(np.clip(8.0 + pci, 16.0, 40.0)) * rng.uniform(0.85, 1.15)
  center_t = rng.uniform(0.45, 0.55)
  half_length_t = float(np.clip(0.2 + 0.006 * pci, 0.25, 0.4))
  half_width = rng.uniform(0.55, 0.75)
  along_z = np.clip(1.0 - ((t - center_t) / half_length_t) ** 2, 0.0, None)
  across = np.clip(1.0 - (x / (half_width * width)) ** 2, 0.0, None)
  # A few smooth bumps so the inner surface is irregular, as real cake is.
  phases = rng.uniform(0.0, 2 * np.pi, 2)
  bumps = 1.0 + 0.2 * np.sin(x / 23.0 + phases[0]) * np.cos(z / 31.0 + phases[1])
  local_thickness = thickness_mm * np.sqrt(along_z * across) * bumps
  anterior = y < body.center_y_mm - 0.2 * depth
  free = _lookup(_FREE_SPACE)[labels]
  cake = (free & anterior & (anatomy.peritoneal_wall_distance_mm >= 0)
          & (anatomy.peritoneal_wall_distance_mm < local_thickness)
          & ~ndimage.binary_dilation(np.isin(labels, SMALL_BOWEL_TISSUES), np.ones((3, 3, 3), bool)))
  components, count = ndimage.label(cake, np.ones((3, 3, 3), bool))
  if count == 0:
    return False
  sizes = np.bincount(components.ravel())[1:]
  labels[components == 1 + int(np.argmax(sizes))] = TISSUE["omental_cake"]
  return True


def _surface_points(labels: np.ndarray, grid: Grid, tissue: str) -> np.ndarray:
  """(x, y, z) of voxels of `tissue` next to intraperitoneal fat or ascites within their slice."""
  organ = labels == TISSUE[tissue]
  if not organ.any():
    return np.zeros((0, 3))
  box = tuple(slice(max(int(np.nonzero(organ.any(axis=other))[0][0]) - 1, 0),
                    int(np.nonzero(organ.any(axis=other))[0][-1]) + 2)
              for other in ((1, 2), (0, 2), (0, 1)))
  free = _lookup(_FREE_SPACE)[labels[box]]
  near_free = ndimage.binary_dilation(free, np.ones((1, 3, 3), bool))
  z_index, y_index, x_index = np.nonzero(organ[box] & near_free)
  return np.stack([grid.x_mm[x_index + box[2].start], grid.y_mm[y_index + box[1].start],
                   grid.z_mm[z_index + box[0].start]], axis=1)


def _site_candidate(rng, site, body, grid, semi_axes, liver_surface):
  """A random nodule centre for a peritoneal site (checked by the caller)."""
  if site == "liver_surface":
    if len(liver_surface) == 0:
      return None
    return liver_surface[rng.integers(len(liver_surface))]
  t_range = {"omentum": (0.3, 0.75), "mesentery": (0.3, 0.6), "pelvis": (0.04, 0.28),
             "paracolic_gutter": (0.3, 0.65)}[site]
  # Snap to a slice so the nodule is sampled by at least one slice.
  z = float(grid.z_mm[np.argmin(np.abs(grid.z_mm - float(body.z(rng.uniform(*t_range)))))])
  z += rng.uniform(-0.3, 0.3) * min(semi_axes[2], 2.5)
  width, depth = body.cavity(body.t(z))
  if site == "omentum":  # just behind the anterior abdominal wall
    x = rng.uniform(-0.6, 0.6) * width
    y = body.center_y_mm - depth * np.sqrt(1.0 - (x / width) ** 2) + semi_axes[0] + rng.uniform(0.0, 6.0)
  elif site == "mesentery":
    x, y = rng.uniform(-0.5, 0.5) * width, body.center_y_mm + rng.uniform(-0.6, 0.1) * depth
  elif site == "pelvis":
    x, y = rng.uniform(-0.45, 0.45) * width, body.center_y_mm + rng.uniform(-0.2, 0.5) * depth
  else:
    x, y = rng.choice([-1, 1]) * rng.uniform(0.72, 0.9) * width, body.center_y_mm + rng.uniform(-0.3, 0.3) * depth
  return np.array([x, y, z])


def _small_bowel_candidate(rng, anatomy, labels, grid, semi_axes):
  """A nodule centre just outside the wall of a random small-bowel loop point, so that it touches the loop."""
  union = anatomy.small_bowel
  index = int(rng.integers(len(union.points_mm)))
  point = union.points_mm[index]
  voxel = tuple(int(np.argmin(np.abs(axis - value))) for axis, value in
                ((grid.z_mm, point[2]), (grid.y_mm, point[1]), (grid.x_mm, point[0])))
  if labels[voxel] not in SMALL_BOWEL_TISSUES:
    return None  # this stretch of the loop was not painted (outside the peritoneal fat)
  neighbours = union.points_mm[max(index - 1, 0):index + 2]
  tangent = _unit(neighbours[-1] - neighbours[0])
  direction = rng.normal(size=3)
  direction = _unit(direction - np.dot(direction, tangent) * tangent)
  return point + direction * (union.radii_mm[index] + 0.55 * semi_axes[0])


def random_hu(rng: np.random.Generator, labels: np.ndarray, nodules: Sequence[Nodule], grid: Grid, *,
              noise_hu: float, contrast_gain: float) -> np.ndarray:
  """Renders HU: per-tissue mean (jittered per patient) + smooth texture, partial-volume blur, then noise.

  Returns float32 [Z, Y, X] integer-valued HU clipped to the 12-bit CT range [-1024, 3071], so that what a
  DICOM reader gets back equals this array exactly.
  """
  pixel_mm = abs(float(grid.x_mm[1] - grid.x_mm[0]))
  means = TISSUE_MEAN_HU + rng.normal(0.0, 4.0, TISSUE_MEAN_HU.shape).astype(np.float32)
  means[TISSUE["air"]] = -1000.0
  for name in _CONTRAST_TISSUES:
    means[TISSUE[name]] = 40.0 + (means[TISSUE[name]] - 40.0) * contrast_gain
  # Texture has a ~2 mm correlation length: draw it on a coarser grid (cheaper) and repeat it up.
  factor = max(1, int(3.0 // pixel_mm))
  depth, rows, columns = labels.shape
  coarse_shape = (depth, -(-rows // factor), -(-columns // factor))
  texture = ndimage.gaussian_filter(rng.standard_normal(coarse_shape, dtype=np.float32),
                                    sigma=(0.0, 2.0 / pixel_mm / factor, 2.0 / pixel_mm / factor), truncate=3.0)
  texture /= max(float(texture.std()), 1e-6)
  if factor > 1:
    texture = texture.repeat(factor, axis=1).repeat(factor, axis=2)[:, :rows, :columns]
  hu = means[labels] + TISSUE_TEXTURE_HU[labels] * texture
  for nodule in nodules:
    region, region_texture = hu[nodule.box], texture[nodule.box]
    region[nodule.mask] = nodule.hu + 8.0 * region_texture[nodule.mask]
  hu = ndimage.gaussian_filter(hu, sigma=(0.0, 0.8 / pixel_mm, 0.8 / pixel_mm), truncate=2.5)
  hu += noise_hu * rng.standard_normal(labels.shape, dtype=np.float32)
  return np.clip(np.round(hu), -1024.0, 3071.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# PCI regions (contracts.PCI_REGION_NAMES), built from each patient's own anatomy.
#
# Regions 0-8, the abdominopelvic 3x3 grid: the abdomen (inside the body outline, between the pelvic floor and the
# top of the diaphragm domes) split into upper / middle / lower thirds of that z range (t >= 2/3, 1/3 <= t < 2/3,
# t < 1/3) and into patient-right / centre / patient-left thirds of the peritoneal cavity's width at each level
# (x < -w/3, |x| <= w/3, x > w/3, with w the cavity's half-width at that z; x grows towards the patient's left).
# Regions 9-12, the small bowel: its loops (the voxels painted small-bowel wall or lumen before any disease, plus
# the one-voxel layer touching them, 26-connected, so that an implant on a loop's serosa lies in it) take the
# segment of their loop. Loops are ordered from proximal to distal by their centreline's mean (x + z) in mm
# (the jejunum lies in the left upper abdomen, the ileum in the right lower) and split into four consecutive
# groups as equal as possible (np.array_split): upper jejunum (9), lower jejunum (10), upper ileum (11), lower
# ileum (12). A voxel of that layer takes its nearest loop's segment and wins over the 3x3 grid.
#
# A patient's score for a region is the lesion-size score of the largest lesion with at least one voxel in it
# (a lesion spanning regions counts in each): 1 up to 5 mm, 2 up to 50 mm, 3 larger or confluent (the omental
# cake). A nodule's size is its largest diameter.
PCI_OUTSIDE = -1  # pci_region_map outside the abdomen
PCI_GRID = ((1, 2, 3), (8, 0, 4), (7, 6, 5))  # rows upper/middle/lower x columns patient right/centre/left
PCI_SMALL_BOWEL_SEGMENTS = (9, 10, 11, 12)  # proximal to distal
PCI_LESION_SIZE_LIMITS_MM = (5.0, 50.0)  # score 1 up to 5 mm, 2 up to 50 mm, 3 above (or confluent)
NUM_PCI_REGIONS = 13


def pci_lesion_score(diameter_mm: float, confluent: bool = False) -> int:
  """The PCI lesion-size score (1-3) of one lesion of this largest diameter."""
  if confluent or diameter_mm > PCI_LESION_SIZE_LIMITS_MM[1]:
    return 3
  return 2 if diameter_mm > PCI_LESION_SIZE_LIMITS_MM[0] else 1


def small_bowel_loop_segments(small_bowel: SphereUnion, loop_ids: np.ndarray) -> dict[int, int]:
  """Loop id -> PCI small-bowel region (9-12) by the documented proximal-to-distal rule (see above)."""
  loops = np.unique(loop_ids)
  points = small_bowel.points_mm
  keys = np.array([np.mean(points[loop_ids == loop][:, 0] + points[loop_ids == loop][:, 2]) for loop in loops])
  order = loops[np.argsort(-keys, kind="stable")]  # most proximal (left upper) first
  return {int(loop): PCI_SMALL_BOWEL_SEGMENTS[group] for group, part in enumerate(np.array_split(order, 4))
          for loop in part}


def pci_region_map(grid: Grid, body: BodyShape, small_bowel_tissue: np.ndarray, small_bowel: SphereUnion,
                   loop_ids: np.ndarray) -> np.ndarray:
  """The PCI region of every voxel (see above): int8 [Z, Y, X], 0-12, PCI_OUTSIDE outside the abdomen.

  Args:
    grid, body: the patient's voxel grid and body shape.
    small_bowel_tissue: bool [Z, Y, X], the small-bowel wall and lumen as painted before any disease.
    small_bowel, loop_ids: the small-bowel sphere union and each sphere's loop.
  """
  z, y, x = (axis.astype(np.float32) for axis in grid.coords((slice(None), slice(None), slice(None))))
  t = body.t(z)
  width, depth = (value.astype(np.float32) for value in body.outer(t))
  inside_body = _body_radius2(y, x, body.center_y_mm, width, depth) <= 1.0
  abdomen = inside_body & (t >= 0.0) & (t < 1.0)
  third = (body.cavity(t)[0] / 3.0).astype(np.float32)
  row = np.where(t >= 2.0 / 3.0, 0, np.where(t >= 1.0 / 3.0, 1, 2))
  column = np.where(x < -third, 0, np.where(x > third, 2, 1))
  regions = np.asarray(PCI_GRID, np.int8)[np.broadcast_to(row, abdomen.shape), np.broadcast_to(column, abdomen.shape)]
  region_map = np.where(abdomen, regions, PCI_OUTSIDE).astype(np.int8)
  layer = ndimage.binary_dilation(small_bowel_tissue, np.ones((3, 3, 3), bool)) & abdomen
  if not layer.any():
    return region_map
  segment_of_loop = small_bowel_loop_segments(small_bowel, loop_ids)
  segments = np.array([segment_of_loop[int(loop)] for loop in loop_ids], np.int8)
  # Bowel voxels take their nearest sphere's loop (inside the union the owner is always set); the layer around
  # them takes the segment of its nearest bowel voxel (in mm).
  segment_volume = np.zeros(small_bowel_tissue.shape, np.int8)
  tissue_in_box = small_bowel_tissue[small_bowel.box]
  segment_volume[small_bowel.box][tissue_in_box] = segments[small_bowel.owner[tissue_in_box]]
  box = tuple(slice(int(np.nonzero(layer.any(axis=other))[0][0]), int(np.nonzero(layer.any(axis=other))[0][-1]) + 1)
              for other in ((1, 2), (0, 2), (0, 1)))
  spacing = [float(np.min(np.diff(axis))) if axis.size > 1 else 1.0 for axis in (grid.z_mm, grid.y_mm, grid.x_mm)]
  _, nearest = ndimage.distance_transform_edt(~small_bowel_tissue[box], sampling=spacing, return_indices=True)
  nearest_segment = segment_volume[box][tuple(nearest)]
  region_map[box][layer[box]] = nearest_segment[layer[box]]
  return region_map


def pci_scores(region_map: np.ndarray, nodules: Sequence[Nodule], cake_mask: np.ndarray | None) -> list[int]:
  """A patient's 13 PCI scores from the generator's own lesions (the tests recompute them from the masks).

  Each nodule scores `pci_lesion_score(its largest diameter)` in every region holding one of its voxels; the
  omental cake (confluent) scores 3 in every region it touches.
  """
  scores = [0] * NUM_PCI_REGIONS
  lesions = [(np.unique(region_map[nodule.box][nodule.mask]), pci_lesion_score(2.0 * max(nodule.semi_axes_mm)))
             for nodule in nodules]
  if cake_mask is not None and cake_mask.any():
    lesions.append((np.unique(region_map[cake_mask]), pci_lesion_score(0.0, confluent=True)))
  for regions, score in lesions:
    for region in regions:
      if region != PCI_OUTSIDE:
        scores[int(region)] = max(scores[int(region)], score)
  return scores
