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


# Every word a QC montage may draw, besides the patient ID, numbers and punctuation: the fixed wording of
# pdx_tf/data/qc.py and the z-range rule names of pdx_tf/data/region.py. A new non-identifying word goes here; a
# word from a DICOM header or a study path never may.
QC_WORDS = {"abdominal", "slices", "series", "mm", "slice", "at", "spacing", "automatic", "nearest", "of", "the",
            "manifest", "s", "series_uid", "range", "z", "top", "bottom", "diaphragm", "study_top", "thighs",
            "study_bottom"}


def test_every_drawn_title_and_label_says_only_the_patient_id_and_facts(tmp_path, monkeypatch):
  """The data pipeline on a study whose folders, files and headers are full of identity (dicom_paths_test's PACS
  layout): every text artist of the rendered montage (titles, axis labels, slice labels), read before the figure
  becomes pixels, is the manifest ID plus the allowed wording, numbers and punctuation."""
  import re  # pylint: disable=import-outside-toplevel

  import matplotlib  # pylint: disable=import-outside-toplevel
  from dicom_paths_test import CANARIES, write_canary_study  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import pipeline, preprocess  # pylint: disable=import-outside-toplevel

  study = str(tmp_path / "export")
  write_canary_study(study, 0, truncate_a_slice=False)
  manifest = tmp_path / "cohort.csv"
  manifest.write_text(f"patient_id,dicom_dir,label_p,label_sb\nqc-007,{study},1,0\n")
  drawn = []
  real_savefig = matplotlib.figure.Figure.savefig

  def recording_savefig(figure, *args, **kwargs):
    drawn.extend(text.get_text() for text in figure.findobj(matplotlib.text.Text) if text.get_text())
    return real_savefig(figure, *args, **kwargs)

  monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording_savefig)
  config = pipeline.PipelineConfig(manifest_path=str(manifest), output_dir=str(tmp_path / "D"), augment_factor=0,
                                   preprocess=preprocess.PreprocessConfig(image_size=32), num_workers=1,
                                   qc_max_slices=4, min_slices=4)
  assert pipeline.run_pipeline(config, progress=False).ok
  assert any(text.startswith("qc-007: ") for text in drawn), drawn
  for text in drawn:
    for canary in CANARIES:
      assert canary not in text, text
    words = set(re.findall(r"[A-Za-z_]+", text.replace("qc-007", " ")))
    assert words <= QC_WORDS, f"{text!r} draws {sorted(words - QC_WORDS)}"
