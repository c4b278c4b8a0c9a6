"""Beam on a real runner can start: the documented `setup_file=./setup.py` exists, and Beam's own stager builds the
package from it and stages it offline, as the DataflowRunner does before a job starts; the option names documented
for Dataflow, Flink and Spark are Beam's."""

import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from tests.source_tree import REPO, copy_sources

beam = pytest.importorskip("apache_beam")
from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402  pylint: disable=wrong-import-position
from apache_beam.runners.portability import stager as stager_lib  # noqa: E402  pylint: disable=wrong-import-position

# The files that document --beam_pipeline_options command lines.
_DOCUMENTED_IN = ("docs/deployment.md", "docs/data_pipeline.md", "data_pipeline/__main__.py")
_OPTIONS_LINE = re.compile(r"--beam_pipeline_options=(\S+)")


def _documented_option_lines() -> list[str]:
  lines = []
  for name in _DOCUMENTED_IN:
    path = os.path.join(REPO, name)
    if os.path.exists(path):
      with open(path, encoding="utf-8") as handle:
        lines += [match.group(1).rstrip("`") for match in _OPTIONS_LINE.finditer(handle.read())]
  return lines


def _as_beam_arguments(line: str) -> list[str]:
  """What data_pipeline does with --beam_pipeline_options (absl's list flag, then a `--` before each name)."""
  return [option if option.startswith("--") else f"--{option}" for option in line.split(",")]


class _LocalStager(stager_lib.Stager):
  """Beam's stager with a local folder for the staging location (the DataflowRunner's writes to GCS)."""

  def stage_artifact(self, local_path_to_artifact, artifact_name, sha256):
    os.makedirs(os.path.dirname(artifact_name), exist_ok=True)
    shutil.copyfile(local_path_to_artifact, artifact_name)

  def commit_manifest(self):
    pass


def test_every_documented_option_is_one_of_beams():
  # Importing the portable runners registers their option classes (flink_master, spark_master_url, ...).
  # pylint: disable-next=import-outside-toplevel,unused-import
  from apache_beam.runners.portability import flink_runner, spark_runner  # noqa: F401
  known = set(PipelineOptions([]).get_all_options())
  lines = _documented_option_lines()
  runners = {re.search(r"runner=(\w+)", line).group(1) for line in lines}
  assert {"DataflowRunner", "FlinkRunner", "SparkRunner"} <= runners, lines
  for line in lines:
    names = {argument[2:].split("=", 1)[0] for argument in _as_beam_arguments(line)}
    assert names <= known, (line, names - known)


def test_beams_stager_builds_and_stages_the_package_from_the_documented_setup_file(tmp_path, monkeypatch):
  (dataflow,) = [line for line in _documented_option_lines() if "runner=DataflowRunner" in line][:1]
  assert "setup_file=./setup.py" in dataflow
  checkout = copy_sources(tmp_path / "checkout")  # the stager builds in the folder of setup.py
  monkeypatch.chdir(checkout)
  staging = tmp_path / "staging"
  options = PipelineOptions(_as_beam_arguments(dataflow))
  # Offline: `python -m build --no-isolation --sdist` from ./setup.py (or `setup.py sdist` without `build`).
  _, staged = _LocalStager().create_and_stage_job_resources(
      options, temp_dir=str(tmp_path / "build"), staging_location=str(staging))
  assert stager_lib.WORKFLOW_TARBALL_FILE in staged, staged
  with tarfile.open(staging / stager_lib.WORKFLOW_TARBALL_FILE) as archive:
    names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
  for expected in ("setup.py", "setup.cfg", "pdx_tf/data/pipeline.py", "pdx_tf/console.py", "data_pipeline/__main__.py",
                   "train/__main__.py", "configs/paper.flags", "configs/serving/models.config"):
    assert expected in names, expected
  assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "runs/"))]
  # The staged sdist is what a worker installs: it builds into a wheel offline.
  wheels = tmp_path / "wheels"
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(wheels), str(staging / stager_lib.WORKFLOW_TARBALL_FILE)], check=True,
                 capture_output=True, timeout=600)
  assert [name for name in os.listdir(wheels) if name.startswith("pdx_tf-") and name.endswith(".whl")]
