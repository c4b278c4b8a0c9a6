"""The data pipeline on Apache Beam (DirectRunner): the same D/ as the plain run, failures and resume alike."""

import dataclasses
import os
import shutil

import pytest
from absl import flags
from absl.testing import flagsaver

from pdx_tf import contracts, io_utils, phantom
from pdx_tf.data import pipeline, preprocess, shards

beam = pytest.importorskip("apache_beam", reason="apache-beam is not installed (pip install -e '.[test]')")
from pdx_tf.data import beam_pipeline  # pylint: disable=wrong-import-position

PHANTOM_CONFIG = phantom.PhantomConfig(num_patients=3, matrix_size=64, pixel_spacing_mm=6.0)
BROKEN = "broken-001"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """(manifest with the 3 phantom patients and one whose folder holds no DICOM, folder)."""
  folder = str(tmp_path_factory.mktemp("cohort") / "cohort")
  manifest_path = phantom.write_demo_cohort(folder, PHANTOM_CONFIG)
  os.makedirs(os.path.join(folder, "empty"))
  with open(os.path.join(folder, "empty", "note.txt"), "w", encoding="utf-8") as handle:
    handle.write("not a DICOM file\n")
  lines = open(manifest_path, encoding="utf-8").read().splitlines()
  broken_row = lines[1].split(",")
  broken_row[0], broken_row[1] = BROKEN, "empty"
  with_broken = os.path.join(folder, "with_broken.csv")
  with open(with_broken, "w", encoding="utf-8") as handle:
    handle.write("\n".join(lines + [",".join(broken_row)]) + "\n")
  return manifest_path, with_broken


def _config(manifest_path, output_dir, **overrides):
  values = dict(preprocess=preprocess.PreprocessConfig(image_size=32), augment_factor=2, num_workers=1,
                shard_size_mb=0.05, qc_max_slices=4)
  values.update(overrides)
  return pipeline.PipelineConfig(manifest_path=manifest_path, output_dir=output_dir, **values)


def _files(folder):
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        found[os.path.relpath(path, folder)] = handle.read()
  return found


@pytest.fixture(scope="module")
def plain_and_beam(cohort, tmp_path_factory):
  """(plain config, plain result, beam config, beam result) on the good cohort."""
  root = tmp_path_factory.mktemp("runs")
  plain = _config(cohort[0], str(root / "plain"))
  on_beam = dataclasses.replace(plain, output_dir=str(root / "beam"))
  return plain, pipeline.run_pipeline(plain, progress=False), on_beam, beam_pipeline.run_beam_pipeline(on_beam)


def test_beam_writes_the_plain_runs_folder_byte_for_byte(plain_and_beam):
  plain, plain_result, on_beam, beam_result = plain_and_beam
  assert plain_result.ok and beam_result.ok and beam_result.num_patients == 3 and beam_result.num_reused == 0
  plain_files, beam_files = _files(plain.output_dir), _files(on_beam.output_dir)
  assert sorted(plain_files) == sorted(beam_files)  # no leftover of Beam's results folder either
  assert sum(name.endswith(".tfrecord") for name in plain_files) >= 6
  for name, data in plain_files.items():
    if name != "config.json":  # the one file that records output_dir
      assert beam_files[name] == data, name
  plain_config = io_utils.read_json(os.path.join(plain.output_dir, "config.json"))
  beam_config = io_utils.read_json(os.path.join(on_beam.output_dir, "config.json"))
  assert beam_config.pop("output_dir") == on_beam.output_dir
  plain_config.pop("output_dir")
  assert beam_config == plain_config
  assert (beam_result.num_slices, beam_result.num_bytes) == (plain_result.num_slices, plain_result.num_bytes)


def test_training_reads_the_beam_folder(plain_and_beam):
  plain, _, on_beam, _ = plain_and_beam
  info = contracts.load_dataset_info(on_beam.output_dir, expected_image_size=32, verify_hashes=True)
  plain_info = contracts.load_dataset_info(plain.output_dir)
  assert len(info.patients) == 3 and info.content_hash == plain_info.content_hash
  assert all(os.path.exists(path) for path in info.shard_paths(list(info.patients), "augmented"))


def test_failures_and_resume_behave_as_in_the_plain_run(plain_and_beam, cohort, tmp_path):
  plain, *_ = plain_and_beam
  # Start from the finished good patients: the broken one fails, the others are reused untouched.
  output_dir = str(tmp_path / "D")
  shutil.copytree(plain.output_dir, output_dir)
  config = _config(cohort[1], output_dir)
  before = {name: os.stat(os.path.join(output_dir, name)).st_mtime_ns for name in _files(output_dir)
            if name.endswith(".tfrecord")}
  result = beam_pipeline.run_beam_pipeline(config)
  assert not result.ok and result.dataset_json is None and result.num_reused == 3
  assert [patient_id for patient_id, _ in result.failures] == [BROKEN]
  assert not os.path.exists(os.path.join(output_dir, "dataset.json"))
  for name, stamp in before.items():
    assert os.stat(os.path.join(output_dir, name)).st_mtime_ns == stamp, f"{name} was rewritten"
  # The plain run on the same input reports the same failure, word for word.
  plain_dir = str(tmp_path / "plain")
  shutil.copytree(plain.output_dir, plain_dir)
  plain_result = pipeline.run_pipeline(dataclasses.replace(config, output_dir=plain_dir), progress=False)
  assert plain_result.failures == result.failures
  assert (open(os.path.join(plain_dir, "failures.csv"), encoding="utf-8").read()
          == open(os.path.join(output_dir, "failures.csv"), encoding="utf-8").read())
  # allow_failures writes dataset.json without the broken patient; every good patient is reused again.
  allowed = beam_pipeline.run_beam_pipeline(dataclasses.replace(config, allow_failures=True))
  assert allowed.ok and allowed.num_reused == 3 and allowed.num_patients == 3
  dataset = io_utils.read_json(os.path.join(output_dir, "dataset.json"))
  assert BROKEN not in [patient["patient_id"] for patient in dataset["patients"]]
  assert dataset["counts"]["failed_patients"] == 1
  # A lost marker: only that patient is redone, to the same bytes.
  victim = dataset["patients"][0]["patient_id"]
  os.remove(os.path.join(output_dir, shards.marker_path(victim)))
  redone = beam_pipeline.run_beam_pipeline(dataclasses.replace(config, allow_failures=True))
  assert redone.num_reused == 2 and redone.processed_slices == dataset["patients"][0]["num_slices"]
  assert io_utils.read_json(os.path.join(output_dir, "dataset.json")) == dataset
  assert not [name for name in os.listdir(output_dir) if name.startswith(beam_pipeline.RESULTS_PREFIX)]


def test_binary_runs_beam_and_exits_1_on_failure(cohort, tmp_path, monkeypatch, capsys):
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  seen = []
  real = beam_pipeline.run_beam_pipeline
  monkeypatch.setattr(beam_pipeline, "run_beam_pipeline",
                      lambda config, options, **kwargs: seen.append(options) or real(config, options, **kwargs))
  output_dir = str(tmp_path / "D")
  with flagsaver.flagsaver(manifest=cohort[1], output_dir=output_dir, runner="beam", image_size=32,
                           augment_factor=0, progress=False, beam_pipeline_options=["runner=DirectRunner"]):
    with pytest.raises(SystemExit) as raised:
      binary.main(["data_pipeline"])
  assert raised.value.code == 1 and seen == [["--runner=DirectRunner"]]
  err = capsys.readouterr().err
  assert f"patient {BROKEN} FAILED:" in err
  assert not os.path.exists(os.path.join(output_dir, "dataset.json"))
  with flagsaver.flagsaver(manifest=cohort[0], output_dir=output_dir, beam_pipeline_options=["runner=DirectRunner"]):
    with pytest.raises(SystemExit) as raised:
      binary.main(["data_pipeline"])
  assert raised.value.code == 1 and "needs --runner=beam" in capsys.readouterr().err
