"""The data pipeline on Apache Beam: `python -m data_pipeline ... --runner=beam`.

The same run as `pipeline.run_pipeline`, with Beam instead of local processes spreading the patients: the
DirectRunner on one machine, Dataflow, Flink or Spark on a cluster (`--beam_pipeline_options`). The driver
does the run's start and end with the plain pipeline's own functions (`pipeline.start_run`: the manifest,
config.json, the finished patients to skip; `pipeline.finish_run`: failures.csv, qc/index.html,
dataset.json); each Beam element is one patient through `pipeline._run_patient`, which writes the patient's
shards, QC montage and marker into D and reports a one-line reason instead of raising. So D is the same
folder, byte for byte, as a plain run's with the same flags, and `python -m train` reads it.

Beam's results come back to the driver through a few JSON-lines files under D/.beam-<run id>/, removed at the
end (a crashed run's leftovers are removed by the next unpartitioned Beam run).
On a cluster, D must be shared storage (gs://...) and the workers need pdx-tf installed (e.g. Dataflow's
--setup_file or a custom container).
"""

from __future__ import annotations

import json
import sys
import uuid
from typing import Sequence

import tensorflow as tf

from pdx_tf import io_utils
from pdx_tf.data import pipeline

RESULTS_NAME = "results"


def _result_line(row, config: pipeline.PipelineConfig, show_paths: bool) -> str:
  """One patient through the plain pipeline's worker entry point, as a JSON line (never raises)."""
  patient_id, marker, reason, _ = pipeline._run_patient(row, config, show_paths)  # pylint: disable=protected-access
  return json.dumps({"patient_id": patient_id, "marker": marker, "reason": reason}, sort_keys=True)


RESULTS_PREFIX = ".beam-"


def _remove_tree(folder: str) -> None:
  if tf.io.gfile.exists(folder):
    tf.io.gfile.rmtree(folder)


def _remove_leftovers(output_dir: str) -> None:
  """Removes the results folders of crashed Beam runs (only when no partition may be running)."""
  if tf.io.gfile.isdir(output_dir):
    for name in tf.io.gfile.listdir(output_dir):
      if name.rstrip("/").startswith(RESULTS_PREFIX):
        _remove_tree(io_utils.join(output_dir, name.rstrip("/")))


def run_beam_pipeline(config: pipeline.PipelineConfig, pipeline_options: Sequence[str] = (), *,
                      show_paths: bool = False) -> pipeline.PipelineResult:
  """Runs the data pipeline as an Apache Beam pipeline (see the module docstring).

  Args:
    config: the resolved configuration; `num_workers` is not used (the runner decides the parallelism).
    pipeline_options: Beam's command-line options, e.g. ["--runner=DataflowRunner", "--project=...",
      "--region=...", "--temp_location=gs://...", "--setup_file=./setup.py"]; empty: the DirectRunner.
    show_paths: as in `pipeline.run_pipeline` (console of the worker that reads the study).

  Returns:
    The `PipelineResult`, as `pipeline.run_pipeline` returns it.

  Raises:
    ImportError: apache-beam is not installed (pip install "pdx-tf[beam]").
    ManifestError, PdxError: as `pipeline.run_pipeline`.
  """
  import apache_beam as beam  # pylint: disable=import-outside-toplevel
  from apache_beam.options.pipeline_options import PipelineOptions  # pylint: disable=import-outside-toplevel

  options = PipelineOptions(list(pipeline_options))  # Bad options fail here, before any file is touched.
  plan = pipeline.start_run(config)
  if config.num_partitions == 1:
    _remove_leftovers(config.output_dir)
  new_markers: dict[str, dict] = {}
  failures: dict[str, str] = {}
  if plan.todo:
    folder = io_utils.join(config.output_dir, f"{RESULTS_PREFIX}{uuid.uuid4().hex}")
    try:
      with beam.Pipeline(options=options) as beam_pipeline:
        _ = (beam_pipeline
             | "Patients" >> beam.Create(list(plan.todo))
             # One patient is minutes of work: spread the elements over the workers one by one.
             | "Spread" >> beam.Reshuffle()
             | "Process" >> beam.Map(_result_line, config, show_paths)
             | "Report" >> beam.io.WriteToText(io_utils.join(folder, RESULTS_NAME)))
      for path in sorted(tf.io.gfile.glob(io_utils.join(folder, RESULTS_NAME) + "*")):
        with tf.io.gfile.GFile(path, "r") as handle:
          for line in handle:
            if not line.strip():
              continue
            result = json.loads(line)
            if result["marker"] is None:
              failures[result["patient_id"]] = result["reason"]
            else:
              new_markers[result["patient_id"]] = result["marker"]
    finally:
      _remove_tree(folder)
  for patient_id, reason in sorted(failures.items()):
    print(f"patient {patient_id} FAILED: {reason}", file=sys.stderr)
  return pipeline.finish_run(config, plan, new_markers, failures)
