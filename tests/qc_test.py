"""Tests of the QC montage and overview page."""

import numpy as np
import tensorflow as tf

from pdx_tf.data import qc


def _volume(count=12, size=48):
  hu = np.full((count, size, size), -1000.0, np.float32)
  hu[:, 10:38, 6:42] = 40.0
  return hu, -100.0 + 5.0 * np.arange(count)


def test_sample_indices_spread_and_keep_the_ends():
  assert qc.sample_indices(5, 16) == [0, 1, 2, 3, 4]
  picked = qc.sample_indices(40, 4)
  assert picked[0] == 0 and picked[-1] == 39 and len(picked) == 4
  assert picked == sorted(set(picked))


def test_montage_is_a_readable_png_with_the_boxes_drawn():
  hu, z_mm = _volume()
  boxes = np.tile(np.array([[10 / 48, 6 / 48, 38 / 48, 42 / 48]], np.float32), (8, 1))
  png = qc.render_patient_montage("P001", hu, z_mm, (8.0, 8.0), hu[2:10], z_mm[2:10], boxes, (z_mm[2], z_mm[9]),
                                  "top=study_top bottom=study_bottom", max_slices=8)
  image = tf.io.decode_png(png, channels=3).numpy()
  assert image.shape[0] > 100 and image.shape[1] > 200
  # The crop boxes are drawn in lime green: pure green pixels exist in the picture.
  green = (image[..., 1] > 200) & (image[..., 0] < 100) & (image[..., 2] < 100)
  assert green.sum() > 50
  assert b"tEXt" not in png or b"Software" not in png  # no metadata text beyond the picture


def test_index_page_lists_patients_and_escaped_failures(tmp_path):
  marker = {"patient_id": "P001", "label_p": 1, "label_sb": 0, "num_slices": 8, "z_range_mm": [-90.0, -55.0],
            "z_range_rule": "top=lung_bases bottom=thighs", "num_original_examples": 8,
            "num_augmented_examples": 16, "qc_path": "qc/P001.png"}
  path = tmp_path / "qc" / "index.html"
  qc.write_index_html(str(path), [marker], [("P002", "bad <file> & more")])
  text = path.read_text()
  assert "src='P001.png'" in text and "-90.0 .. -55.0" in text
  assert "bad &lt;file&gt; &amp; more" in text and "1 patient(s) written, 1 failed" in text


SERIES = {"chosen_by": "automatic", "slice_thickness_mm": 5.0, "num_slices": 43, "slice_spacing_mm": 4.8,
          "z_extent_mm": 201.6, "preferred_slice_thickness_mm": 5.0, "num_candidate_series": 2}


def test_series_description_names_thickness_count_and_spacing():
  assert qc.series_description(SERIES) == ("5.0 mm slices, 43 at 4.8 mm spacing, 202 mm; automatic (nearest 5.0 mm)"
                                           " of 2 series")
  override = dict(SERIES, chosen_by="series_uid", slice_thickness_mm=None)
  assert qc.series_description(override) == "? mm slices, 43 at 4.8 mm spacing, 202 mm; the manifest's series_uid"
  assert qc.series_description(None) == ""


def test_montage_shows_the_series_and_marks_the_range():
  hu, z_mm = _volume()
  boxes = np.tile(np.array([[10 / 48, 6 / 48, 38 / 48, 42 / 48]], np.float32), (8, 1))

  def render(z_range, series):
    png = qc.render_patient_montage("P001", hu, z_mm, (8.0, 8.0), hu[2:10], z_mm[2:10], boxes, z_range, "rule",
                                    max_slices=8, series=series)
    return tf.io.decode_png(png, channels=3).numpy().astype(int)

  plain, with_series = render((z_mm[2], z_mm[9]), None), render((z_mm[2], z_mm[9]), SERIES)
  assert plain.shape == with_series.shape and (plain != with_series).any()  # the series line is drawn
  # The chosen range is drawn in yellow on the coronal view: moving it changes the left panel.
  moved = render((z_mm[4], z_mm[9]), None)
  changed_columns = np.nonzero((plain != moved).any(axis=(0, 2)))[0]
  assert changed_columns.size and changed_columns.max() < plain.shape[1] // 2
  yellow = (moved[..., 0] > 200) & (moved[..., 1] > 200) & (moved[..., 2] < 80)
  assert yellow[:, :plain.shape[1] // 3].sum() > 20


def test_index_page_shows_the_chosen_series(tmp_path):
  marker = {"patient_id": "P001", "label_p": 1, "label_sb": 0, "num_slices": 8, "z_range_mm": [-90.0, -55.0],
            "z_range_rule": "top=domes bottom=thighs", "num_original_examples": 8, "num_augmented_examples": 16,
            "qc_path": "qc/P001.png", "series": SERIES}
  path = tmp_path / "qc" / "index.html"
  qc.write_index_html(str(path), [marker], [])
  text = path.read_text()
  assert "<th>series</th>" in text and "<td>5.0 mm slices, 43 at 4.8 mm spacing" in text
