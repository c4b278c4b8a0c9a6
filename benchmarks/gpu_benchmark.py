"""GPU training throughput: images/s for 1 and K packed cells, fp32 vs mixed precision, XLA on/off, and the
input/compute ratio. Runs in <= 5 minutes; on a machine without a GPU it prints "no GPU: not measured" and
exits 0 (no figure is invented).

  python benchmarks/gpu_benchmark.py [--records_dir=D] [--packed=3] [--seconds=15]
  python benchmarks/gpu_benchmark.py --allow_cpu --image_size=32 --alpha=0.35 --seconds=2   # proves it runs

Compute: training steps of MobileNetV2 (224 px, alpha 1.0 by default) on random in-memory batches
(trainer.measure_images_per_s). Packed: K processes each running the same measurement at once on one GPU
(TF_FORCE_GPU_ALLOW_GROWTH=true), summed: what --cells_per_gpu=K gains. Input: images/s of one cell's real
records input (input_pipeline, decode + batch, no model) over --records_dir; input/compute > 1 means the
input keeps up with the model.
"""

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _config(args, precision, jit_compile, records_dir="D"):
  from pdx_tf.training import trainer  # pylint: disable=import-outside-toplevel
  from pdx_tf.training.model import ModelConfig  # pylint: disable=import-outside-toplevel

  return trainer.TrainConfig(task="p", records_dir=records_dir, output_dir="(benchmark)",
                             model=ModelConfig(image_size=args.image_size, alpha=args.alpha),
                             batch_size=args.batch_size, precision=precision, jit_compile=jit_compile)


def _compute(args, precision, jit_compile):
  from pdx_tf.training import trainer  # pylint: disable=import-outside-toplevel

  return trainer.measure_images_per_s(_config(args, precision, jit_compile), seconds=args.seconds, max_steps=10**6)


def _packed(args, precision, jit_compile):
  """Sum of K concurrent single-cell measurements (each a process, as --cells_per_gpu runs them)."""
  command = [sys.executable, os.path.abspath(__file__), "--child", f"--image_size={args.image_size}",
             f"--alpha={args.alpha}", f"--batch_size={args.batch_size}", f"--seconds={args.seconds}",
             f"--precision={precision}", *(["--jit"] if jit_compile else []), *(["--allow_cpu"] if args.allow_cpu else [])]
  environment = dict(os.environ, TF_FORCE_GPU_ALLOW_GROWTH="true", TF_CPP_MIN_LOG_LEVEL="3")
  children = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True)
              for _ in range(args.packed)]
  return sum(float(json.loads(child.communicate()[0].strip().splitlines()[-1])["images_per_s"]) for child in children)


def _input(args):
  from pdx_tf import contracts  # pylint: disable=import-outside-toplevel
  from pdx_tf.training import cell_trainer, splits  # pylint: disable=import-outside-toplevel

  config = _config(args, "float32", False, records_dir=args.records_dir)
  info = contracts.load_dataset_info(args.records_dir, expected_image_size=args.image_size)
  split = splits.make_splits(info.labels("p"), task="p", num_folds=8, num_repeats=1, seed=0)
  train_ids, _ = splits.cell_patients(split, 0, 0)
  dataset = cell_trainer.epoch_dataset(config, info, train_ids, (0, 0), 0)
  images, started = 0, time.perf_counter()
  for batch, _ in dataset:
    images += int(batch.shape[0])
    if time.perf_counter() - started > args.seconds:
      break
  return images / (time.perf_counter() - started)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--seconds", type=float, default=15.0, help="timed seconds per measurement")
  parser.add_argument("--packed", type=int, default=3, help="K cells packed on one GPU")
  parser.add_argument("--records_dir", default=None, help="records for the input rate (skipped if unset)")
  parser.add_argument("--allow_cpu", action="store_true", help="measure on the CPU (only to prove the script runs)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--jit", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  import tensorflow as tf  # pylint: disable=import-outside-toplevel

  gpus = tf.config.list_physical_devices("GPU")
  if args.child:
    print(json.dumps({"images_per_s": _compute(args, args.precision, args.jit)}))
    return 0
  if not gpus and not args.allow_cpu:
    print("no GPU: not measured")
    return 0
  for gpu in gpus:
    tf.config.experimental.set_memory_growth(gpu, True)  # leaves room for the packed children
  device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
  print(f"device: {device}; {args.image_size} px, alpha {args.alpha}, batch {args.batch_size}, "
        f"{args.seconds:g} s a measurement")
  results = {}
  mixed = "mixed_float16" if gpus else "mixed_bfloat16"
  for precision in ("float32", mixed):
    for jit_compile in (False, True):
      results[(precision, jit_compile, 1)] = _compute(args, precision, jit_compile)
      print(f"  1 cell   {precision:15s} XLA {'on ' if jit_compile else 'off'}: "
            f"{results[(precision, jit_compile, 1)]:9.1f} images/s", flush=True)
  best = max(results, key=results.get)
  packed = _packed(args, best[0], best[1])
  print(f"  {args.packed} cells  {best[0]:15s} XLA {'on ' if best[1] else 'off'}: {packed:9.1f} images/s (sum of"
        f" {args.packed} processes; x{packed / results[best]:.2f} over 1 cell)")
  if args.records_dir:
    rate = _input(args)
    print(f"  input (real records, one cell, no model): {rate:9.1f} images/s; input/compute ratio"
          f" {rate / results[best]:.2f} against the best single cell ({'keeps up' if rate >= results[best] else 'input-bound'})")
  else:
    print("  input/compute ratio: not measured (pass --records_dir)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
