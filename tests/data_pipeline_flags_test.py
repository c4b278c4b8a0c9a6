"""data_pipeline's --slice_thickness_mm and --show_paths: the config gets the first, no file ever sees the second."""

import dataclasses
import os

from absl import flags
from absl.testing import flagsaver

from pdx_tf import phantom
from pdx_tf.data import pipeline, preprocess

PHANTOM_CONFIG = phantom.PhantomConfig(num_patients=1, matrix_size=64, pixel_spacing_mm=6.0)
PHI_NAME = "DOE_JANE_19650312.dcm"


def _result():
  return pipeline.PipelineResult(output_dir="D", dataset_json="D/dataset.json", num_patients=1, num_reused=0,
                                 failures=(), num_slices=1, num_original_examples=1, num_augmented_examples=0,
                                 num_bytes=1, wall_time_s=1.0, processed_slices=1)


def test_flags_reach_the_config_and_the_call(monkeypatch, tmp_path):
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  calls = []
  monkeypatch.setattr(pipeline, "run_pipeline", lambda config, **kwargs: calls.append((config, kwargs)) or _result())
  with flagsaver.flagsaver(manifest="m.csv", output_dir=str(tmp_path / "D"), progress=False,
                           slice_thickness_mm=1.25, show_paths=True):
    binary.main(["data_pipeline"])
  with flagsaver.flagsaver(manifest="m.csv", output_dir=str(tmp_path / "D"), progress=False):
    binary.main(["data_pipeline"])
  (config, kwargs), (default_config, default_kwargs) = calls
  assert config.slice_thickness_mm == 1.25 and kwargs["show_paths"] is True
  assert default_config.slice_thickness_mm == 5.0 and default_kwargs["show_paths"] is False
  assert "show_paths" not in dataclasses.asdict(config)  # never part of config.json or the fingerprints


def test_augment_seed_and_its_deprecated_name(monkeypatch, tmp_path, capsys):
  """--augment_seed keys the copies (PipelineConfig.seed, dataset.json "seed"); the old --seed still works for a
  release with one warning line; the two disagreeing is a one-line error."""
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  calls = []
  monkeypatch.setattr(pipeline, "run_pipeline", lambda config, **kwargs: calls.append(config) or _result())
  common = dict(manifest="m.csv", output_dir=str(tmp_path / "D"), progress=False)
  with flagsaver.flagsaver(augment_seed=7, **common):
    binary.main(["data_pipeline"])
  assert calls[-1].seed == 7 and "deprecated" not in capsys.readouterr().err
  with flagsaver.flagsaver(seed=5, **common):
    binary.main(["data_pipeline"])
  warnings = [line for line in capsys.readouterr().err.splitlines() if "deprecated" in line]
  assert calls[-1].seed == 5 and len(warnings) == 1 and "--augment_seed" in warnings[0]
  with flagsaver.flagsaver(seed=5, augment_seed=6, **common):
    flags.FLAGS["augment_seed"].present = 1
    try:
      try:
        binary.main(["data_pipeline"])
      except SystemExit as error:
        assert error.code == 1
    finally:
      flags.FLAGS["augment_seed"].present = 0
  errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("data_pipeline: error:")]
  assert len(errors) == 1 and "disagree" in errors[0] and len(calls) == 2


def _files(folder):
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      with open(os.path.join(root, name), "rb") as handle:
        found[os.path.relpath(os.path.join(root, name), folder)] = handle.read()
  return found


def test_show_paths_prints_paths_on_the_console_only(tmp_path, capfd):
  manifest_path = phantom.write_demo_cohort(str(tmp_path / "cohort"), PHANTOM_CONFIG)
  study = next(os.path.join(root, "") for root, _, names in os.walk(tmp_path / "cohort" / "dicom") if names)
  first = sorted(name for name in os.listdir(study))[0]
  with open(os.path.join(study, first), "rb") as handle:
    data = handle.read()
  with open(os.path.join(study, PHI_NAME), "wb") as handle:  # a partial copy named after the patient
    handle.write(data[: len(data) // 3])
  config = pipeline.PipelineConfig(manifest_path=manifest_path, output_dir=str(tmp_path / "quiet"),
                                   preprocess=preprocess.PreprocessConfig(image_size=32), augment_factor=0)
  quiet = pipeline.run_pipeline(config, progress=False)
  quiet_console = capfd.readouterr()
  shown = pipeline.run_pipeline(dataclasses.replace(config, output_dir=str(tmp_path / "shown")), progress=False,
                                show_paths=True)
  shown_console = capfd.readouterr()
  # The copy repeats a slice position: the patient fails with a reason naming the copy by its token.
  assert quiet.failures == shown.failures and "file#" in quiet.failures[0][1]
  assert PHI_NAME in shown_console.err + shown_console.out
  assert PHI_NAME not in quiet_console.err + quiet_console.out
  quiet_files, shown_files = _files(tmp_path / "quiet"), _files(tmp_path / "shown")
  assert sorted(quiet_files) == sorted(shown_files)
  for name, data in shown_files.items():
    assert b"DOE_JANE" not in data, name
    if name != "config.json":  # it records output_dir
      assert data == quiet_files[name], name
  assert b"file#" in shown_files["failures.csv"]
