"""Quality-control pictures of the pipeline: a montage per patient and an overview page.

The montage shows a coronal view of the whole series with the chosen abdominal range, and a sample of the
chosen slices (abdominal window) with the crop box each gets, under a line about the chosen series (thickness,
slice count, spacing). Titles carry only the manifest patient_id, slice indexes, z positions and that series
line: never DICOM header text (names, IDs, dates, UIDs). PNGs are written without metadata beyond matplotlib's
"Software" tag.
"""

from __future__ import annotations

import html
import io
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from pdx_tf import io_utils  # pylint: disable=wrong-import-position

DISPLAY_WINDOW_HU = (40.0, 400.0)  # Soft-tissue window for display, whatever the training windows.
MONTAGE_COLUMNS = 4


def _display(hu: np.ndarray) -> np.ndarray:
  center, width = DISPLAY_WINDOW_HU
  return np.clip((np.asarray(hu, np.float32) - (center - width / 2.0)) / width, 0.0, 1.0)


def sample_indices(count: int, max_slices: int) -> list[int]:
  """Up to `max_slices` slice indexes spread evenly over [0, count), always including both ends."""
  if count <= max_slices:
    return list(range(count))
  return sorted({int(round(value)) for value in np.linspace(0, count - 1, max_slices)})


def series_description(series: Mapping[str, Any] | None) -> str:
  """One line about the chosen series (a marker's "series" entry: thickness, slice count, spacing), or "".

  E.g. "5.0 mm slices, 43 at 5.0 mm spacing, 210 mm; automatic (nearest 5.0 mm) of 2 series".
  """
  if not series:
    return ""
  thickness = series.get("slice_thickness_mm")
  text = (f"{'?' if thickness is None else f'{float(thickness):.1f}'} mm slices, {series.get('num_slices')} at "
          f"{float(series.get('slice_spacing_mm', 0.0)):.1f} mm spacing, "
          f"{float(series.get('z_extent_mm', 0.0)):.0f} mm")
  if series.get("chosen_by") == "series_uid":
    return f"{text}; the manifest's series_uid"
  return (f"{text}; automatic (nearest {float(series.get('preferred_slice_thickness_mm', 0.0)):.1f} mm) of "
          f"{series.get('num_candidate_series')} series")


def render_patient_montage(patient_id: str, series_hu: np.ndarray, series_z_mm: np.ndarray,
                           pixel_spacing_mm: Sequence[float], slices_hu: np.ndarray, slices_z_mm: np.ndarray,
                           boxes: np.ndarray, z_range_mm: Sequence[float], rule: str,
                           max_slices: int = 16, series: Mapping[str, Any] | None = None) -> bytes:
  """PNG bytes of one patient's QC montage.

  Args:
    patient_id: manifest ID (the only identity shown).
    series_hu: float [Z, Y, X] the whole series (for the coronal overview).
    series_z_mm: [Z] its slice positions.
    pixel_spacing_mm: (row, column) spacing.
    slices_hu: float [N, Y, X] the chosen abdominal slices.
    slices_z_mm: [N] their positions.
    boxes: [N, 4] normalised (y_min, x_min, y_max, x_max) crop boxes of the chosen slices.
    z_range_mm: (low, high) abdominal range.
    rule: how the range was chosen.
    max_slices: most slices shown.
    series: the chosen series (the marker's "series" entry), shown under the title.
  """
  chosen = sample_indices(len(slices_hu), max_slices)
  columns = min(MONTAGE_COLUMNS, len(chosen))
  rows = max(1, int(np.ceil(len(chosen) / MONTAGE_COLUMNS)))
  height, width = slices_hu.shape[1:]
  # One mosaic image and two axes: a grid of axes per slice is several times slower to draw.
  mosaic = np.zeros((rows * height, columns * width), np.float32)
  for panel, index in enumerate(chosen):
    row, column = divmod(panel, MONTAGE_COLUMNS)
    mosaic[row * height:(row + 1) * height, column * width:(column + 1) * width] = _display(slices_hu[index])
  figure, (coronal_axes, mosaic_axes) = plt.subplots(
      1, 2, figsize=(2.0 * (columns + 2), 2.0 * rows + 0.8), dpi=72,
      gridspec_kw={"width_ratios": [2, columns]})
  series_hu = np.asarray(series_hu)
  # Coronal view through the middle row, head up; extent in mm keeps the anatomy's proportions.
  coronal = series_hu[::-1, series_hu.shape[1] // 2, :]
  width_mm = series_hu.shape[2] * pixel_spacing_mm[1]
  low_z, high_z = float(series_z_mm[0]), float(series_z_mm[-1])
  coronal_axes.imshow(_display(coronal), cmap="gray", vmin=0, vmax=1, aspect="auto", interpolation="nearest",
                      extent=(0.0, width_mm, low_z, high_z) if high_z > low_z else None)
  for z_value in z_range_mm:
    coronal_axes.axhline(z_value, color="yellow", linewidth=1.5)
  for z_value in np.asarray(slices_z_mm)[chosen]:
    coronal_axes.axhline(z_value, color="cyan", linewidth=0.5, alpha=0.6)
  coronal_axes.set_xticks([])
  coronal_axes.set_ylabel("z (mm)")
  coronal_axes.set_title(f"range {z_range_mm[0]:.0f}..{z_range_mm[1]:.0f} mm\n{rule}", fontsize=8)
  mosaic_axes.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
  for panel, index in enumerate(chosen):
    row, column = divmod(panel, MONTAGE_COLUMNS)
    left, top = column * width, row * height
    y_min, x_min, y_max, x_max = (float(value) for value in boxes[index])
    # Clip the drawn box to its tile (it may extend past the image, which then reads as air).
    x0, x1 = np.clip([x_min * width, x_max * width], 0, width)
    y0, y1 = np.clip([y_min * height, y_max * height], 0, height)
    # Normalised coordinates map to pixel edges: pixel i spans [i - 0.5, i + 0.5] in imshow coordinates.
    mosaic_axes.add_patch(matplotlib.patches.Rectangle(
        (left + x0 - 0.5, top + y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="lime", linewidth=1.0))
    mosaic_axes.text(left + 1, top + 1, f"#{index} z={float(slices_z_mm[index]):.1f}", color="yellow",
                     fontsize=7, va="top")
  mosaic_axes.axis("off")
  about_series = series_description(series)
  figure.suptitle(f"{patient_id}: {len(slices_hu)} abdominal slices" + (f"\nseries: {about_series}" if about_series
                                                                          else ""), fontsize=10)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", metadata={"Software": None})
  plt.close(figure)
  return buffer.getvalue()


def write_index_html(path: str, patients: Sequence[dict], failures: Sequence[tuple[str, str]]) -> None:
  """Writes the overview page: a thumbnail and counts per patient, then the failures.

  Args:
    path: where to write (D/qc/index.html); thumbnails are referenced relative to it.
    patients: completion markers (dicts with patient_id, labels, num_slices, counts, z_range_mm, rule and
      the chosen series).
    failures: (patient_id, reason) pairs.
  """
  escape = html.escape
  lines = ["<!doctype html>", "<html><head><meta charset='utf-8'><title>pdx-tf data QC</title>",
           "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
           "td,th{border:1px solid #ccc;padding:4px;vertical-align:top}img{width:480px}</style></head><body>",
           f"<h1>pdx-tf data QC</h1><p>{len(patients)} patient(s) written, {len(failures)} failed.</p>"]
  if failures:
    lines.append("<h2>Failures</h2><table><tr><th>patient_id</th><th>reason</th></tr>")
    lines += [f"<tr><td>{escape(pid)}</td><td>{escape(reason)}</td></tr>" for pid, reason in failures]
    lines.append("</table>")
  lines.append("<h2>Patients</h2><table><tr><th>patient_id</th><th>label_p</th><th>label_sb</th><th>slices</th>"
               "<th>series</th><th>z range (mm)</th><th>rule</th><th>original</th><th>augmented</th><th>notes</th>"
               "<th>montage</th></tr>")
  for marker in patients:
    pid = escape(marker["patient_id"])
    low, high = marker["z_range_mm"]
    image = (f"<a href='{pid}.png'><img src='{pid}.png' alt='{pid}' loading='lazy'></a>"
             if marker.get("qc_path") else "")
    lines.append(
        f"<tr><td>{pid}</td><td>{marker['label_p']}</td><td>{marker['label_sb']}</td>"
        f"<td>{marker['num_slices']}</td><td>{escape(series_description(marker.get('series')))}</td>"
        f"<td>{low:.1f} .. {high:.1f}</td><td>{escape(marker['z_range_rule'])}</td>"
        f"<td>{marker['num_original_examples']}</td><td>{marker['num_augmented_examples']}</td>"
        f"<td>{escape('; '.join(marker.get('warnings', [])))}</td><td>{image}</td></tr>")
  lines.append("</table></body></html>")
  io_utils.atomic_write_text(path, "\n".join(lines) + "\n")
