"""The installed package: `pip install .` carries the five binaries, their console scripts and the flag files, and
`python -m train` works from a folder outside the checkout (no repository root as the working directory)."""

import email.parser
import os
import subprocess
import sys
import zipfile

import pytest

from pdx_tf import console
from tests.source_tree import BINARIES, REPO, copy_sources

SCRIPTS = {"pdx-data-pipeline": "data_pipeline", "pdx-train": "train", "pdx-evaluate": "evaluate",
           "pdx-export": "export", "pdx-predict": "predict"}


def _clean_environment() -> dict:
  """This environment without PYTHONPATH: the installed copy must stand on its own."""
  return {name: value for name, value in os.environ.items() if name not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module", name="wheel")
def _wheel(tmp_path_factory) -> str:
  """Builds the wheel offline (no build isolation: setuptools and wheel come from this environment)."""
  source = copy_sources(tmp_path_factory.mktemp("source"))
  out = tmp_path_factory.mktemp("wheel")
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                  "-w", str(out), source], check=True, cwd=str(out), capture_output=True, timeout=600)
  (wheel,) = [os.path.join(out, name) for name in os.listdir(out) if name.endswith(".whl")]
  return wheel


def test_the_wheel_carries_the_binaries_the_scripts_and_the_flag_files(wheel):
  with zipfile.ZipFile(wheel) as archive:
    names = set(archive.namelist())
    (dist_info,) = {name.split("/")[0] for name in names if name.split("/")[0].endswith(".dist-info")}
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
  for binary in BINARIES:
    assert f"{binary}/__main__.py" in names and f"{binary}/__init__.py" in names, binary
  assert "pdx_tf/console.py" in names and "pdx_tf/data/records.py" in names
  data = {name.split(".data/data/", 1)[1] for name in names if ".data/data/" in name}
  assert data == {"share/pdx-tf/configs/demo.flags", "share/pdx-tf/configs/demo_sb.flags",
                  "share/pdx-tf/configs/paper.flags", "share/pdx-tf/configs/serving/batching.config",
                  "share/pdx-tf/configs/serving/models.config"}
  # Nothing from the checkout's tests, benchmarks or runs.
  assert not [name for name in names if name.split("/")[0] in ("tests", "benchmarks", "runs", "tools")]
  for script, binary in SCRIPTS.items():
    assert f"{script} = pdx_tf.console:{binary}" in entry_points
  requirements = " ".join(metadata.get_all("Requires-Dist"))
  for package in ("tensorflow-datasets", "scikit-learn", "tensorflow<"):
    assert package in requirements
  assert metadata["Requires-Python"] == ">=3.10"


def test_each_console_function_runs_its_binary_module(monkeypatch):
  ran = []
  monkeypatch.setattr(console.runpy, "run_module", lambda name, **kwargs: ran.append((name, kwargs["run_name"])))
  for binary in BINARIES:
    getattr(console, binary)()
  assert ran == [(binary, "__main__") for binary in BINARIES]


def test_configs_dir_in_a_checkout_is_the_checkouts_configs():
  assert os.path.samefile(console.configs_dir(), os.path.join(REPO, "configs"))


@pytest.mark.slow
def test_the_installed_binaries_run_from_outside_the_checkout(wheel, tmp_path):
  venv = tmp_path / "venv"
  # --system-site-packages: TensorFlow and the other dependencies come from this environment (no network).
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  # --ignore-installed: this environment may hold an editable pdx-tf, which pip would otherwise call satisfied.
  subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
                 check=True, capture_output=True, timeout=600)
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  site = subprocess.run([python, "-c", "import train, pdx_tf; print(train.__file__); print(pdx_tf.__file__)"],
                        cwd=str(elsewhere), env=_clean_environment(), capture_output=True, text=True, check=True)
  for path in site.stdout.split():
    assert path.startswith(str(venv)), site.stdout  # the installed copy, not the checkout
  configs = subprocess.run([python, "-m", "pdx_tf.console"], cwd=str(elsewhere), env=_clean_environment(),
                           capture_output=True, text=True, check=True).stdout.strip()
  assert configs.startswith(str(venv)) and os.path.isfile(os.path.join(configs, "paper.flags")), configs
  for command in ([python, "-m", "train", "--help"], [str(venv / "bin" / "pdx-train"), "--help"]):
    completed = subprocess.run(command, cwd=str(elsewhere), env=_clean_environment(), capture_output=True,
                               text=True, timeout=300, check=False)
    assert "--records_dir" in completed.stdout and "No module named" not in completed.stderr, completed.stderr
  for binary in ("data_pipeline", "evaluate", "export", "predict"):
    completed = subprocess.run([python, "-m", binary, "--help"], cwd=str(elsewhere), env=_clean_environment(),
                               capture_output=True, text=True, timeout=300, check=False)
    assert "--output_dir" in completed.stdout or "--export_dir" in completed.stdout, (binary, completed.stderr)
  # A flag file read from the installed data files: the paper preset's --plan refuses the missing records with
  # the binary's one-line error (the flag file itself was found and parsed).
  completed = subprocess.run([python, "-m", "train", f"--flagfile={configs}/paper.flags", "--task=p",
                              "--records_dir=nonexistent", "--output_dir=out", "--plan"], cwd=str(elsewhere),
                             env=_clean_environment(), capture_output=True, text=True, timeout=300, check=False)
  assert completed.returncode == 1 and "train: error:" in completed.stderr, completed.stderr
