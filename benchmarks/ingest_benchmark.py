"""Ingestion and record-writing throughput of the data pipeline on phantom cohorts of two sizes.

Example (about 5 minutes on a 2-core machine):
  python benchmarks/ingest_benchmark.py --cohort_sizes=8,32 --matrix_size=256 --work_dir=/tmp/pdx_bench

For each cohort size, in a fresh child process (so peak RSS is that size's own):
  * raw pydicom: `pydicom.dcmread(f).pixel_array` over every file of the cohort's studies, slices/s;
  * ingestion: `read_ct_series` + `region.select_abdomen` + `preprocess.preprocess_slices`, slices/s of the
    series read (the same files);
  * the whole pipeline (`run_pipeline`, one worker, no QC) with --augment_factor copies a slice at
    --image_size: examples/s and MiB/s of TFRecords written;
  * TFRecord writing alone: the pipeline's serialized examples rewritten with `tf.io.TFRecordWriter`;
  * peak RSS (`resource.getrusage`), which must not grow with the cohort: patients are processed one at a time.
Prints a markdown table.
"""

import json
import os
import resource
import subprocess
import sys
import time

from absl import app
from absl import flags

_COHORT_SIZES = flags.DEFINE_list("cohort_sizes", ["8", "32"], "Phantom cohort sizes to measure.")
_MATRIX_SIZE = flags.DEFINE_integer("matrix_size", 256, "Phantom matrix (pixel spacing = 384 mm / matrix).")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model image size.")
_AUGMENT_FACTOR = flags.DEFINE_integer("augment_factor", 16, "Augmented copies per slice in the pipeline run.")
_WORK_DIR = flags.DEFINE_string("work_dir", "/tmp/pdx_bench", "Scratch folder (cohorts are cached there).")
_CHILD = flags.DEFINE_integer("child", 0, "Internal: measure this cohort size and print JSON.")


def _measure(num_patients: int) -> dict:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import pydicom  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf.data import dicom, manifest, pipeline, preprocess, region
  from pdx_tf import phantom  # pylint: disable=import-outside-toplevel

  matrix = _MATRIX_SIZE.value
  cohort_config = phantom.PhantomConfig(num_patients=num_patients, matrix_size=matrix,
                                        pixel_spacing_mm=max(1.5, 384.0 / matrix), scanner_quirks=False)
  cohort_dir = os.path.join(_WORK_DIR.value, f"cohort-{num_patients}-{matrix}")
  manifest_path = phantom.write_demo_cohort(cohort_dir, cohort_config)
  rows = manifest.read_manifest(manifest_path).rows

  files = [os.path.join(root, name) for row in rows for root, _, names in os.walk(row.dicom_dir)
           for name in names]
  start = time.perf_counter()
  raw_slices = 0
  for path in files:
    try:
      _ = pydicom.dcmread(path).pixel_array
      raw_slices += 1
    except Exception:  # pylint: disable=broad-except
      pass  # stray non-image files
  raw_seconds = time.perf_counter() - start

  config = preprocess.PreprocessConfig(image_size=_IMAGE_SIZE.value)
  preprocess_fn = tf.function(lambda hu: preprocess.preprocess_slices(hu, config), reduce_retracing=True)
  preprocess_fn(tf.zeros([2, matrix, matrix]))  # trace outside the timing
  start = time.perf_counter()
  series_slices = abdominal_slices = 0
  for row in rows:
    series = dicom.read_ct_series(row.dicom_dir)
    abdomen, _ = region.select_abdomen(series.hu, series.z_mm, series.pixel_spacing_mm)
    for begin in range(0, abdomen.hu.shape[0], pipeline.SLICE_BATCH):
      preprocess_fn(tf.constant(abdomen.hu[begin:begin + pipeline.SLICE_BATCH])).numpy()
    series_slices += series.hu.shape[0]
    abdominal_slices += abdomen.hu.shape[0]
  ingest_seconds = time.perf_counter() - start

  output_dir = os.path.join(_WORK_DIR.value, f"records-{num_patients}-{matrix}-{os.getpid()}")
  result = pipeline.run_pipeline(pipeline.PipelineConfig(
      manifest_path=manifest_path, output_dir=output_dir, preprocess=config, augment_factor=_AUGMENT_FACTOR.value,
      num_workers=1, write_qc=False), progress=False)
  examples = result.num_original_examples + result.num_augmented_examples

  shard_paths = [os.path.join(root, name) for root, _, names in os.walk(os.path.join(output_dir, "augmented"))
                 for name in names]
  serialized = [record.numpy() for path in shard_paths[:4] for record in tf.data.TFRecordDataset(path)]
  rewrite = os.path.join(output_dir, "rewrite.tfrecord")
  start = time.perf_counter()
  written_bytes = 0
  with tf.io.TFRecordWriter(rewrite) as writer:
    for _ in range(max(1, 20000 // max(1, len(serialized)))):
      for record in serialized:
        writer.write(record)
        written_bytes += len(record) + 16
  write_seconds = time.perf_counter() - start
  written = written_bytes // (int(np.mean([len(r) for r in serialized])) + 16)
  # PNG encoding dominates the pipeline: records.encode_image (zlib default level) against level 1.
  from pdx_tf.data import records  # pylint: disable=import-outside-toplevel
  images = [tf.io.decode_png(tf.io.parse_single_example(record, {"image": tf.io.FixedLenFeature([], tf.string)})
                             ["image"]).numpy() for record in serialized[:50]]
  start = time.perf_counter()
  default_bytes = sum(len(records.encode_image(image)) for image in images)
  png_default_ms = (time.perf_counter() - start) / len(images) * 1000
  start = time.perf_counter()
  fast_bytes = sum(len(tf.io.encode_png(image, compression=1).numpy()) for image in images)
  png_fast_ms = (time.perf_counter() - start) / len(images) * 1000
  subprocess.run(["rm", "-rf", output_dir], check=False)
  return {
      "patients": num_patients, "raw_slices": raw_slices, "raw_per_s": raw_slices / raw_seconds,
      "series_slices": series_slices, "abdominal_slices": abdominal_slices,
      "ingest_per_s": series_slices / ingest_seconds,
      "pipeline_examples_per_s": examples / result.wall_time_s,
      "pipeline_mib_per_s": result.num_bytes / 2**20 / result.wall_time_s,
      "pipeline_examples": examples, "pipeline_seconds": result.wall_time_s,
      "write_examples_per_s": written / write_seconds, "write_mib_per_s": written_bytes / 2**20 / write_seconds,
      "png_default_ms": png_default_ms, "png_level1_ms": png_fast_ms,
      "png_level1_size_ratio": fast_bytes / default_bytes,
      "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
  }


def main(argv):
  del argv
  if _CHILD.value:
    print("RESULT " + json.dumps(_measure(_CHILD.value)))
    return
  results = []
  for size in _COHORT_SIZES.value:
    command = [sys.executable, os.path.abspath(__file__), f"--child={int(size)}",
               f"--matrix_size={_MATRIX_SIZE.value}", f"--image_size={_IMAGE_SIZE.value}",
               f"--augment_factor={_AUGMENT_FACTOR.value}", f"--work_dir={_WORK_DIR.value}"]
    output = subprocess.run(command, check=True, capture_output=True, text=True,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}).stdout
    results.append(json.loads(next(line for line in output.splitlines() if line.startswith("RESULT "))[7:]))
  print(f"matrix {_MATRIX_SIZE.value}, image {_IMAGE_SIZE.value} px, augment_factor {_AUGMENT_FACTOR.value}, "
        f"{os.cpu_count()} CPUs\n")
  print("| patients | slices read (abdominal) | pydicom pixel_array slices/s | ingest slices/s "
        "(read_ct_series + region + preprocess) | pipeline examples/s | pipeline MiB/s | TFRecord write "
        "examples/s | TFRecord write MiB/s | PNG ms/image (default / level 1, size ratio) | peak RSS MiB |")
  print("|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|")
  for r in results:
    print(f"| {r['patients']} | {r['series_slices']} ({r['abdominal_slices']}) | {r['raw_per_s']:.0f} | "
          f"{r['ingest_per_s']:.1f} | {r['pipeline_examples_per_s']:.0f} | {r['pipeline_mib_per_s']:.2f} | "
          f"{r['write_examples_per_s']:.0f} | {r['write_mib_per_s']:.0f} | {r['png_default_ms']:.1f} / "
          f"{r['png_level1_ms']:.1f} ({r['png_level1_size_ratio']:.2f}) | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  app.run(main)
