"""Read-ratio benchmark: bytes a cell reads vs bytes of the images it trains on, and 1- vs 3-channel records.

Part 1 builds tiny records with the data pipeline on the phantom (--num_patients patients, --image_size px,
--augment_factor copies in blocks of --augment_block), then reads one epoch of one cell (all patients but one
train) at --pool_fraction through `input_pipeline.train_examples`, counting the files actually opened (a
wrapper around tf.data.TFRecordDataset) and their sizes, and the framed bytes of the records it yields.
Target: bytes read / bytes trained <= 1.25. It also prints what the schema-1 layout (one augmented file series
per patient, a per-record draw) would have read for the same pool: every augmented file of the training patients.

Part 2 encodes one phantom slice at 224 px: one window stored with 3 channels (schema 1), one window with
1 channel (schema 2) and three windows (3 channels); PNG size, encode and decode (to RGB) time.

  PYTHONPATH=. python benchmarks/read_ratio_benchmark.py
  PYTHONPATH=. python benchmarks/read_ratio_benchmark.py --pool_fraction=0.2 --augment_block=8
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

_NUM_PATIENTS = flags.DEFINE_integer("num_patients", 6, "phantom patients")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 32, "record image size (part 1)")
_AUGMENT_FACTOR = flags.DEFINE_integer("augment_factor", 40, "augmented copies per slice")
_AUGMENT_BLOCK = flags.DEFINE_integer("augment_block", 4, "copies per block file")
_POOL_FRACTION = flags.DEFINE_float("pool_fraction", 0.1, "pool draw")
_WORK_DIR = flags.DEFINE_string("work_dir", None, "where the cohort and records go (default: a temp folder)")
_REPEATS = flags.DEFINE_integer("repeats", 50, "encode/decode repetitions (part 2)")

TFRECORD_FRAME_BYTES = 16


def read_ratio(work_dir: str) -> None:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf import contracts, phantom  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import pipeline, preprocess  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import input_pipeline  # pylint: disable=import-outside-toplevel

  start = time.perf_counter()
  manifest = phantom.write_demo_cohort(os.path.join(work_dir, "cohort"),
                                       phantom.PhantomConfig(num_patients=_NUM_PATIENTS.value))
  config = pipeline.PipelineConfig(
      manifest_path=manifest, output_dir=os.path.join(work_dir, "records"),
      preprocess=preprocess.PreprocessConfig(image_size=_IMAGE_SIZE.value), augment_factor=_AUGMENT_FACTOR.value,
      augment_block=_AUGMENT_BLOCK.value, write_qc=False)
  result = pipeline.run_pipeline(config, progress=False)
  print(f"records: {result.num_patients} patients, {result.num_original_examples} originals +"
        f" {result.num_augmented_examples} copies, {result.num_bytes / 2**20:.1f} MiB"
        f" (built in {time.perf_counter() - start:.0f} s)")
  info = contracts.load_dataset_info(config.output_dir)
  train_ids = list(info.patients)[1:]
  opened = []
  reader = tf.data.TFRecordDataset

  def counting_reader(path, *args, **kwargs):
    opened.append(path)
    return reader(path, *args, **kwargs)

  tf.data.TFRecordDataset = counting_reader
  try:
    examples = input_pipeline.train_examples(info, train_ids, sample_seed=0, repeat=0, shuffle_seed=0,
                                             pool_fraction=_POOL_FRACTION.value)
    count = sum(1 for _ in examples.as_numpy_iterator())  # images trained in the epoch
  finally:
    tf.data.TFRecordDataset = reader
  # Framed bytes of the records in the opened files; all of them are trained on when count matches.
  trained = sum(len(serialized) + TFRECORD_FRAME_BYTES for path in opened for serialized in reader(path).as_numpy_iterator())
  records_in_opened = sum(1 for path in opened for _ in reader(path))
  read = sum(os.path.getsize(path) for path in opened)
  planned = input_pipeline.bytes_to_read(info, train_ids, sample_seed=0, repeat=0, pool_fraction=_POOL_FRACTION.value)
  v1_read = sum(int(shard["num_bytes"]) for shard in info.document["shards"] if shard["patient_id"] in train_ids)
  print(f"pool_fraction {_POOL_FRACTION.value}: {len(opened)} files opened, {read} bytes read"
        f" (bytes_to_read says {planned}); {count} images trained of {records_in_opened} records in those files,"
        f" {trained} framed record bytes")
  print(f"read ratio (bytes read / bytes of images trained): {read / trained:.3f}  (target <= 1.25)")
  print(f"schema-1 layout (every file of the training patients read, ~pool_fraction of the copies kept):"
        f" {v1_read} bytes, ratio {v1_read / trained:.2f}")


def channel_figures() -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf import phantom  # pylint: disable=import-outside-toplevel
  from pdx_tf.data import preprocess, records  # pylint: disable=import-outside-toplevel

  patient = phantom.generate_patient(phantom.PhantomConfig(num_patients=1), 0)
  low, high = patient.abdomen_z_range_mm
  index = int(np.argmin(np.abs(patient.z_mm - (low + high) / 2)))
  hu = patient.hu[index:index + 1]
  one = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=224)).numpy()[0]
  three_windows = ((40.0, 400.0), (50.0, 150.0), (-600.0, 1500.0))
  three = preprocess.preprocess_slices(hu, preprocess.PreprocessConfig(image_size=224,
                                                                       windows=three_windows)).numpy()[0]
  cases = {"1 window, 3 channels (schema 1)": one, "1 window, 1 channel (schema 2)": one[..., :1],
           "3 windows, 3 channels": three}
  for name, image in cases.items():
    png = records.encode_image(image)
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
      records.encode_image(image)
    encode_ms = (time.perf_counter() - start) / _REPEATS.value * 1e3
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
      decoded = tf.io.decode_png(png, channels=3)
    decode_ms = (time.perf_counter() - start) / _REPEATS.value * 1e3
    assert decoded.shape == (224, 224, 3)
    print(f"224 px {name}: {len(png)} bytes PNG, encode {encode_ms:.2f} ms, decode to RGB {decode_ms:.2f} ms")


def main(argv):
  del argv
  work_dir = _WORK_DIR.value or tempfile.mkdtemp(prefix="read_ratio_")
  read_ratio(work_dir)
  channel_figures()


if __name__ == "__main__":
  app.run(main)
