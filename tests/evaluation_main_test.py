"""The evaluate binary end to end (subprocess, so its absl flags never clash with other binaries' flags)."""

import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(__file__))
import fake_runs  # noqa: E402  pylint: disable=wrong-import-position

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_binary(*flags):
  environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO_ROOT)
  return subprocess.run([sys.executable, "-m", "evaluate", *flags], cwd=REPO_ROOT, env=environment,
                        capture_output=True, text=True, timeout=120, check=False)


def test_binary_evaluates_and_prints_the_paper_table(tmp_path):
  runs_dir, output_dir = str(tmp_path / "runs"), str(tmp_path / "evaluation")
  fake_runs.write_fake_runs(runs_dir, num_repeats=2, num_folds=3, num_patients=18)
  result = _run_binary(f"--runs_dir={runs_dir}", f"--output_dir={output_dir}", "--tasks=p,sb",
                       "--num_bootstrap=20", "--threshold=0.4")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "P-Model" in result.stdout and "SB-Model" in result.stdout and "68.8" in result.stdout
  assert os.path.join(output_dir, "report.html") in result.stdout
  for name in ("config.json", "summary.json", "report.html", "report.md", "cell_metrics.csv",
               "patient_predictions.csv"):
    assert os.path.exists(os.path.join(output_dir, name)), name
  with open(os.path.join(output_dir, "config.json")) as handle:
    assert '"threshold": 0.4' in handle.read()


def test_binary_fails_with_one_line_on_bad_input(tmp_path):
  runs_dir = str(tmp_path / "runs")
  fake_runs.write_fake_runs(runs_dir, tasks=("p",), num_repeats=1, num_folds=2, num_patients=8)
  bad_file = os.path.join(fake_runs.cell_folder(runs_dir, "p", 0, 1), "patient_predictions.csv")
  with open(bad_file) as handle:
    lines = handle.read().splitlines()
  lines[1] = ",".join(lines[1].split(",")[:2] + ["nan"])
  with open(bad_file, "w") as handle:
    handle.write("\n".join(lines) + "\n")
  result = _run_binary(f"--runs_dir={runs_dir}", f"--output_dir={tmp_path / 'evaluation'}")
  assert result.returncode == 1
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("evaluate: error:")]
  assert len(error_lines) == 1 and bad_file in error_lines[0]
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "evaluation")  # inputs are checked before anything is written


def test_binary_external_validation_and_its_one_line_errors(tmp_path):
  import evaluation_external_test  # pylint: disable=import-outside-toplevel
  predictions = evaluation_external_test.write_predictions(str(tmp_path / "predictions.csv"))
  output_dir = str(tmp_path / "E")
  result = _run_binary(f"--predictions={predictions}", f"--output_dir={output_dir}", "--num_bootstrap=20")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "p: 28 labelled patients, 2 unlabelled, 2 flagged" in result.stdout
  for name in ("summary.json", "report.html", "report.md", "model_card.md", "flagged_patients.csv"):
    assert os.path.exists(os.path.join(output_dir, name)), name
  broken = evaluation_external_test.write_predictions(str(tmp_path / "broken.csv"), drop_column="predicted")
  result = _run_binary(f"--predictions={broken}", f"--output_dir={tmp_path / 'E2'}")
  error_lines = [line for line in result.stderr.splitlines() if line.startswith("evaluate: error:")]
  assert result.returncode == 1 and len(error_lines) == 1 and "Traceback" not in result.stderr
  assert broken in error_lines[0] and "column predicted" in error_lines[0]
  result = _run_binary(f"--output_dir={tmp_path / 'E3'}")
  assert result.returncode == 1 and "--runs_dir" in result.stderr and "--predictions" in result.stderr
