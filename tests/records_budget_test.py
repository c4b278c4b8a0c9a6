"""The data pipeline refuses, before any work, records that would not fit the disk (issue 10, bad input)."""

import collections
import os

import pytest
from absl import flags
from absl.testing import flagsaver

from pdx_tf import io_utils, phantom
from pdx_tf.data import pipeline, preprocess
from pdx_tf.errors import PdxError

DiskUsage = collections.namedtuple("DiskUsage", "total used free")


@pytest.fixture(scope="module")
def manifest_path(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("cohort") / "cohort")
  config = phantom.PhantomConfig(num_patients=2, matrix_size=64, pixel_spacing_mm=6.0)
  return phantom.write_demo_cohort(folder, config)


def _config(manifest, output_dir, **overrides):
  values = dict(preprocess=preprocess.PreprocessConfig(image_size=32), augment_factor=2, augment_block=1,
                num_workers=1, write_qc=False)
  values.update(overrides)
  return pipeline.PipelineConfig(manifest_path=manifest, output_dir=output_dir, **values)


def _free(monkeypatch, free_bytes):
  seen = []

  def disk_usage(path):
    seen.append(path)
    return DiskUsage(10 * free_bytes + 1, 0, free_bytes)

  monkeypatch.setattr(pipeline.shutil, "disk_usage", disk_usage)
  return seen


def test_the_paper_estimate_is_the_measured_png_size_times_the_image_count():
  # 227 patients x 45 slices x 961 images, each a 21,018 B PNG plus 116 B of framing and features.
  assert pipeline.estimate_records_bytes(227, image_size=224, channels=1, augment_factor=960) == (
      227 * 45 * 961 * (21_018 + 116))
  # Half the side: a quarter of the PNG bytes; three windows: the three-channel PNG.
  assert pipeline.estimate_records_bytes(1, image_size=112, channels=1, augment_factor=0, slices_per_patient=1) == (
      21_018 // 4 + 116)
  assert pipeline.estimate_records_bytes(1, image_size=224, channels=3, augment_factor=0, slices_per_patient=1) == (
      67_234 + 116)


def test_a_tiny_disk_is_refused_with_one_line_before_anything_is_touched(manifest_path, tmp_path, monkeypatch):
  output_dir = tmp_path / "D"
  output_dir.mkdir()
  (output_dir / "dataset.json").write_text("{}")  # An earlier dataset must survive a refused run.
  seen = _free(monkeypatch, 1000)
  with pytest.raises(PdxError) as raised:
    pipeline.run_pipeline(_config(manifest_path, str(output_dir)), progress=False)
  message = str(raised.value)
  assert "\n" not in message and "would not fit" in message and "2 patient(s)" in message
  assert "--output_dir" in message and "--augment_factor" in message
  assert seen and os.path.samefile(seen[0], output_dir)
  assert sorted(os.listdir(output_dir)) == ["dataset.json"]  # Nothing written, nothing removed.


def test_enough_disk_proceeds(manifest_path, tmp_path, monkeypatch):
  config = _config(manifest_path, str(tmp_path / "D"))
  estimate = pipeline.estimate_records_bytes(
      2, image_size=32, channels=1, augment_factor=2, slices_per_patient=pipeline.DEFAULT_ABDOMINAL_SLICES_5MM)
  _free(monkeypatch, estimate)  # Exactly the estimate fits.
  result = pipeline.run_pipeline(config, progress=False)
  assert result.ok and result.num_patients == 2
  # The per-image estimate is within a factor 2 of what the pipeline really wrote (at 32 px).
  written = result.num_bytes / (result.num_original_examples + result.num_augmented_examples)
  per_image = pipeline.estimate_records_bytes(1, image_size=32, channels=1, augment_factor=0, slices_per_patient=1)
  assert per_image / 2 < written < per_image * 2, (written, per_image)
  assert io_utils.exists(os.path.join(config.output_dir, "dataset.json"))
  # Finished patients take no new space: a rerun into the same folder passes even on a full disk.
  _free(monkeypatch, 0)
  assert pipeline.run_pipeline(config, progress=False).num_reused == 2


def test_a_folder_not_yet_made_is_checked_on_its_nearest_parent(tmp_path, monkeypatch):
  seen = _free(monkeypatch, 10**15)
  config = _config("m.csv", str(tmp_path / "a" / "b" / "D"))
  assert pipeline.check_records_fit(config, 3) == pipeline.estimate_records_bytes(
      3, image_size=32, channels=1, augment_factor=2)
  assert seen == [str(tmp_path)]


def test_an_object_store_is_not_checked(monkeypatch):
  seen = _free(monkeypatch, 0)
  assert pipeline.check_records_fit(_config("m.csv", "gs://bucket/records"), 227) is None
  assert not seen


def test_the_binary_prints_one_line_and_exits_1(manifest_path, tmp_path, monkeypatch, capsys):
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  _free(monkeypatch, 1000)
  with flagsaver.flagsaver(manifest=manifest_path, output_dir=str(tmp_path / "D"), progress=False, num_workers=1):
    with pytest.raises(SystemExit) as raised:
      binary.main(["data_pipeline"])
  assert raised.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "would not fit" in lines[0] and "GiB free" in lines[0]


def test_the_binary_plan_prints_the_estimate_and_writes_nothing(manifest_path, tmp_path, monkeypatch, capsys):
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  _free(monkeypatch, 5 * 1024**3)
  output_dir = tmp_path / "D"
  with flagsaver.flagsaver(manifest=manifest_path, output_dir=str(output_dir), progress=False, plan=True,
                           image_size=224, augment_factor=960):
    binary.main(["data_pipeline"])
  out = capsys.readouterr().out
  # 2 patients x 45 slices x 961 images x (21,018 + 116) B = 1.70 GiB.
  expected_gib = 2 * 45 * 961 * (21_018 + 116) / 1024**3
  assert "patients: 2" in out and f"~{expected_gib:.1f} GiB estimated" in out and "5.0 GiB free" in out
  assert not output_dir.exists()


def test_the_binary_plan_refuses_a_tiny_disk_in_one_line(manifest_path, tmp_path, monkeypatch, capsys):
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  _free(monkeypatch, 1024**3)
  with flagsaver.flagsaver(manifest=manifest_path, output_dir=str(tmp_path / "D"), progress=False, plan=True,
                           image_size=224, augment_factor=960):
    with pytest.raises(SystemExit) as raised:
      binary.main(["data_pipeline"])
  assert raised.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 1 and "would not fit" in lines[0] and "1.0 GiB free" in lines[0]
