"""The PCI region diagram, coloured by one value a region: evaluate's AUC map and predict's per-patient map.

The diagram as a surgeon draws it (the patient's right on the viewer's left): regions 0-8 in a 3 x 3 grid (1 right
upper, 2 epigastrium, 3 left upper; 8 right flank, 0 central, 4 left flank; 7 right lower, 6 pelvis, 5 left
lower), the small-bowel segments 9-12 stacked beside it. Titles are the caller's: a patient code at most.
"""

from __future__ import annotations

import io
from typing import Sequence

from pdx_tf.contracts import PCI_SMALL_BOWEL_REGIONS

# (row, column) of each region's box.
MAP_POSITIONS = {1: (0, 0), 2: (0, 1), 3: (0, 2), 8: (1, 0), 0: (1, 1), 4: (1, 2), 7: (2, 0), 6: (2, 1), 5: (2, 2),
                 9: (0, 3.3), 10: (0.75, 3.3), 11: (1.5, 3.3), 12: (2.25, 3.3)}


def region_map_png(values: Sequence[float | None], title: str, label: str = "AUC", vmin: float = 0.5,
                   vmax: float = 1.0) -> bytes:
  """The 13-region PCI map (MAP_POSITIONS) with each region coloured by its value (grey: None), as PNG bytes."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=import-outside-toplevel

  figure, axes = pyplot.subplots(figsize=(6.0, 3.6), dpi=100)
  colormap = matplotlib.colormaps["viridis"]
  for region, (row, column) in MAP_POSITIONS.items():
    small = region in PCI_SMALL_BOWEL_REGIONS
    width, height = (1.4, 0.7) if small else (1.0, 1.0)
    value = values[region]
    colour = "#cccccc" if value is None else colormap((min(max(value, vmin), vmax) - vmin) / (vmax - vmin))
    axes.add_patch(matplotlib.patches.Rectangle((column, -row - height), width, height, facecolor=colour,
                                                edgecolor="black"))
    text = "n/a" if value is None else f"{value:.2f}"
    axes.text(column + width / 2, -row - height / 2, f"{region}\n{text}", ha="center", va="center", fontsize=8,
              color="white" if value is not None and value < (vmin + vmax) / 2 else "black")
  axes.set_xlim(-0.1, 4.8)
  axes.set_ylim(-3.1, 0.1)
  axes.set_aspect("equal")
  axes.axis("off")
  axes.set_title(title, fontsize=9)
  mappable = matplotlib.cm.ScalarMappable(norm=matplotlib.colors.Normalize(vmin, vmax), cmap=colormap)
  figure.colorbar(mappable, ax=axes, fraction=0.04, label=label)
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", bbox_inches="tight")
  pyplot.close(figure)
  return buffer.getvalue()
