"""Input-pipeline benchmark: training images/s from TFRecords vs the same model on in-memory tensors.

Trains one cell's model for a fixed number of steps twice in the same process: (a) fed by
`pdx_tf.training.input_pipeline.train_dataset` (interleaved reads, keyed pool draw, shuffle, PNG decode, batch,
prefetch) and (b) fed by the same number of images already decoded in memory. The ratio (a)/(b) says how much
the input pipeline slows training (target >= 0.9). With no --records_dir it writes a fake dataset first.

  python benchmarks/input_benchmark.py --image_size=64 --alpha=0.35 --batch_size=32 --steps=60
  # The demo's records (48 px; --image_size defaults to the records' size, as in `python -m train`):
  python benchmarks/input_benchmark.py --records_dir=runs/demo/records --image_size=48 --alpha=0.35 \
      --steps=60 --batch_size=32 --rounds=3

Each cell epoch's dataset is `train_dataset(..., epoch=0)`, repeated: the throughput of one epoch's pipeline (the
trainer builds the next epoch's, keyed by its number, the same way).
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags


_RECORDS_DIR = flags.DEFINE_string("records_dir", None, "records to read (default: a fake dataset)")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", None, "image size (must match the records); default: the records' "
                                   "(dataset.json), 64 for the fake dataset")
_ALPHA = flags.DEFINE_float("alpha", 0.35, "MobileNetV2 width")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 32, "batch size")
_STEPS = flags.DEFINE_integer("steps", 60, "timed training steps per mode")
_WARMUP_STEPS = flags.DEFINE_integer("warmup_steps", 5, "untimed steps before timing")
_POOL_FRACTION = flags.DEFINE_float("pool_fraction", 1.0, "pool draw")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "alternating timed rounds per input (median reported)")
_DETERMINISTIC = flags.DEFINE_bool("deterministic", False, "deterministic tf.data order")


def main(argv):
  del argv
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  from pdx_tf import contracts  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import cell_trainer, input_pipeline, trainer  # pylint: disable=import-outside-toplevel
  from pdx_tf.training.model import ModelConfig, build_model  # pylint: disable=import-outside-toplevel

  records_dir = _RECORDS_DIR.value
  image_size = _IMAGE_SIZE.value or (contracts.records_image_size(records_dir) if records_dir else 64)
  if records_dir is None:
    from pdx_tf.testing import fake_records  # pylint: disable=import-outside-toplevel

    records_dir = os.path.join(tempfile.mkdtemp(), "records")
    fake_records.write_fake_records(records_dir, num_patients=16, slices_per_patient=20, augment_factor=16,
                                    image_size=image_size)
  info = contracts.load_dataset_info(records_dir, expected_image_size=image_size)
  train_ids = list(info.patients)[: max(2, len(info.patients) * 7 // 8)]
  batch_size, steps, warmup = _BATCH_SIZE.value, _STEPS.value, _WARMUP_STEPS.value
  records = input_pipeline.train_dataset(
      info, train_ids, task="p", sample_seed=0, repeat=0, shuffle_seed=0, pool_fraction=_POOL_FRACTION.value,
      batch_size=batch_size, epoch=0, deterministic=_DETERMINISTIC.value, drop_remainder=True).repeat()
  images, labels = [], []
  for image, label in records.take(steps + warmup):
    images.append(image.numpy())
    labels.append(label.numpy())
  memory = tf.data.Dataset.from_tensor_slices((np.concatenate(images), np.concatenate(labels)))
  memory = memory.batch(batch_size, drop_remainder=True).cache().repeat().prefetch(tf.data.AUTOTUNE)

  model = build_model(ModelConfig(image_size=image_size, alpha=_ALPHA.value, weights="none"))
  config = trainer.TrainConfig(task="p", records_dir="x", output_dir="x")
  cell_trainer.compile_model(model, config)
  # Alternate the two inputs for several rounds and keep the median: on a shared machine one timing can be
  # off by 2x; images per CPU-second (this process's CPU time) is the steadier number there.
  timings = {"in-memory tensors": [], "tfrecords (input_pipeline)": []}
  for _ in range(_ROUNDS.value):
    for name, dataset in (("in-memory tensors", memory), ("tfrecords (input_pipeline)", records)):
      model.fit(dataset, steps_per_epoch=warmup, epochs=1, verbose=0)
      cpu_start, start = time.process_time(), time.perf_counter()
      model.fit(dataset, steps_per_epoch=steps, epochs=1, verbose=0)
      wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
      timings[name].append((steps * batch_size / wall, steps * batch_size / cpu))
  results = {name: tuple(float(np.median([t[i] for t in values])) for i in range(2))
             for name, values in timings.items()}
  baseline = results["in-memory tensors"]
  print(f"\nimage_size={image_size} alpha={_ALPHA.value} batch_size={batch_size} steps={steps}"
        f" rounds={_ROUNDS.value} cpus={os.cpu_count()} records={records_dir}")
  print("| input | images/s (wall, median) | images per CPU-second | ratio (wall) | ratio (CPU) |")
  print("|---|---|---|---|---|")
  for name, (per_wall, per_cpu) in results.items():
    print(f"| {name} | {per_wall:.1f} | {per_cpu:.1f} | {per_wall / baseline[0]:.2f} | {per_cpu / baseline[1]:.2f} |")
  keras.backend.clear_session()


if __name__ == "__main__":
  app.run(main)
