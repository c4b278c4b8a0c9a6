"""GPU training throughput of pdx_tf's own model through a Keras 3 backend other than TensorFlow.

Why: the GPU machine lent to this project has no TensorFlow, and TensorFlow's CUDA build (1.9 GB installed, plus
CUDA 12 libraries) cannot travel to it (64 MiB a call). It has JAX and PyTorch. `pdx_tf.training.model` is
written in Keras 3 alone (keras + keras.ops, no tf), so the very `build_model` that training calls runs there
under KERAS_BACKEND=jax. What this measures is therefore the model's GPU compute ceiling under XLA (the JAX
backend always compiles with XLA), NOT TensorFlow's: `benchmarks/gpu_benchmark.py` is the script for a GPU box
with TensorFlow, and its figures stay "not measured" until one is at hand.

  python benchmarks/keras_gpu_benchmark.py --out_dir=O [--backend=jax] [--budget_s=420]
  KERAS_BACKEND=jax python benchmarks/keras_gpu_benchmark.py --allow_cpu --image_size=32 --alpha=0.35 \
      --batch_size=4 --seconds=1 --packed=2   # proves it runs

Each measurement is its own process (a precision policy is global to a process), in this order, until the budget
is spent: batch 32 (configs/paper.flags) in float32, mixed_bfloat16 and mixed_float16; then, at the best of
those, `fit` from host memory (the batches cross PCIe as in real training), K packed processes (what
--cells_per_gpu=K gains), batch 128, batch 128 in mixed_bfloat16, the joint two-head model (--task=p,sb) and
2.5D input with 5 channels. A measurement: build, compile (Adam + binary cross-entropy + AUC + accuracy, as
cell_trainer.compile_model), two untimed steps (compilation), then `train_on_batch` on one batch already on the
device until `--seconds`. `train_on_batch` returns its logs as numbers, so it waits for every step: at small
batches that per-step wait, not the arithmetic, bounds it, and `fit` (which keeps steps in flight) is the figure
closer to real training (benchmarks/README.md, "GPU"). Out: one JSON line a measurement on stdout and in
O/keras_gpu_benchmark.jsonl. The H200 run took 7 minutes of a 15-minute device lease: XLA compiles each process's
step in 40-100 s.
"""

import argparse
import json
import os
import subprocess
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)


def _measure(args) -> dict:
  """One measurement in this process (the --child branch). Out: its JSON record."""
  import keras  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from pdx_tf.training import model as model_lib  # pylint: disable=import-outside-toplevel

  keras.mixed_precision.set_global_policy(args.precision)
  config = model_lib.ModelConfig(image_size=args.image_size, alpha=args.alpha, input_channels=args.channels,
                                 joint_heads=args.joint)
  outputs = 2 if args.joint else 1
  started = time.perf_counter()
  model = model_lib.build_model(config)
  if args.joint:
    loss = model_lib.JointLoss(1.0)
    auc = keras.metrics.AUC(name="auc", multi_label=True, num_labels=2)
  else:
    loss, auc = keras.losses.BinaryCrossentropy(), keras.metrics.AUC(name="auc")
  model.compile(optimizer=keras.optimizers.Adam(1e-4), loss=loss,
                metrics=[auc, keras.metrics.BinaryAccuracy(name="accuracy")], jit_compile=args.jit)
  rng = np.random.default_rng(0)
  shape = (args.batch_size, args.image_size, args.image_size, args.channels)
  record = {"backend": keras.backend.backend(), "precision": args.precision, "batch_size": args.batch_size,
            "image_size": args.image_size, "alpha": args.alpha, "channels": args.channels, "joint": args.joint,
            "mode": "fit" if args.fit else "train_on_batch", "jit": args.jit,
            "parameters": int(model.count_params())}
  if args.fit:
    count = args.batch_size * 64
    images = rng.uniform(0, 255, (count, *shape[1:])).astype(np.float32)
    labels = rng.integers(0, 2, (count, outputs)).astype(np.float32)
    model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0)  # compilation: not timed
    record["compile_s"] = time.perf_counter() - started
    steps, timed = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - timed < args.seconds:
      model.fit(images, labels, batch_size=args.batch_size, epochs=1, verbose=0)
      steps += count // args.batch_size
  else:
    images = keras.ops.convert_to_tensor(rng.uniform(0, 255, shape).astype(np.float32))
    labels = keras.ops.convert_to_tensor(rng.integers(0, 2, (args.batch_size, outputs)).astype(np.float32))
    for _ in range(2):
      model.train_on_batch(images, labels)  # tracing and compilation: not timed
    record["compile_s"] = time.perf_counter() - started
    steps, timed = 0, time.perf_counter()
    while steps == 0 or time.perf_counter() - timed < args.seconds:
      model.train_on_batch(images, labels)  # returns the logs as numbers: waits for the step, as fit does
      steps += 1
  elapsed = time.perf_counter() - timed
  record.update(steps=steps, seconds=elapsed, images_per_s=steps * args.batch_size / elapsed)
  if keras.backend.backend() == "jax":
    import jax  # pylint: disable=import-outside-toplevel

    device = jax.devices()[0]
    record["device"] = getattr(device, "device_kind", str(device))
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
      record["peak_gib"] = stats["peak_bytes_in_use"] / 2**30
  return record


def _child_command(args, **overrides) -> list[str]:
  switches = [f"--{flag}" for flag in ("joint", "fit") if overrides.pop(flag, False)]
  values = {"image_size": args.image_size, "alpha": args.alpha, "batch_size": args.batch_size,
            "seconds": args.seconds, "precision": "float32", "channels": 3, **overrides}
  command = [sys.executable, os.path.abspath(__file__), "--child", *(f"--{k}={v}" for k, v in values.items()),
             *switches]
  if not args.jit:
    command.append("--nojit")
  return command


def _environment(args) -> dict:
  # Each process takes GPU memory as it needs it (XLA's default grabs 75 % and the packed processes would fail).
  return dict(os.environ, KERAS_BACKEND=args.backend, XLA_PYTHON_CLIENT_PREALLOCATE="false",
              TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(filter(None, [_ROOT, os.environ.get("PYTHONPATH")])))


def _run(args, processes: int = 1, **overrides) -> list[dict]:
  """Runs `processes` copies of one measurement at once. Out: their records; an empty list when one failed."""
  children = [subprocess.Popen(_child_command(args, **dict(overrides)), env=_environment(args), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(processes)]
  records = []
  try:
    for child in children:
      try:
        stdout, stderr = child.communicate(timeout=args.child_timeout_s)
      except subprocess.TimeoutExpired:
        print(f"  timed out after {args.child_timeout_s} s: {overrides}", flush=True)
        return []
      lines = [line for line in stdout.splitlines() if line.startswith("{")]
      if child.returncode or not lines:
        print(f"  failed ({overrides}): {stderr.strip().splitlines()[-1:] or 'no output'}", flush=True)
        sys.stderr.write(stderr[-4000:])
        return []
      records.append(json.loads(lines[-1]))
    return records
  finally:
    for child in children:  # a failed or timed-out measurement leaves none of its processes on the GPU
      if child.poll() is None:
        child.kill()


def _gpu_name(backend: str) -> str | None:
  """The first GPU the backend sees, or None."""
  if backend == "jax":
    import jax  # pylint: disable=import-outside-toplevel

    gpus = [device for device in jax.devices() if device.platform == "gpu"]
    return getattr(gpus[0], "device_kind", "GPU") if gpus else None
  import torch  # pylint: disable=import-outside-toplevel

  return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--backend", default="jax", choices=("jax", "torch"))
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--alpha", type=float, default=1.0)
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--large_batch", type=int, default=128)
  parser.add_argument("--seconds", type=float, default=10.0, help="timed seconds a measurement")
  parser.add_argument("--packed", type=int, default=3, help="K processes on one GPU at once")
  parser.add_argument("--budget_s", type=float, default=420.0, help="no measurement starts after this")
  parser.add_argument("--child_timeout_s", type=float, default=240.0)
  parser.add_argument("--out_dir", default=None)
  parser.add_argument("--allow_cpu", action="store_true", help="run without a GPU (only to prove the script runs)")
  parser.add_argument("--nojit", dest="jit", action="store_false", help="no XLA (the torch backend's default)")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--precision", default="float32", help=argparse.SUPPRESS)
  parser.add_argument("--channels", type=int, default=3, help=argparse.SUPPRESS)
  parser.add_argument("--joint", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--fit", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(_measure(args)), flush=True)
    return 0
  try:
    gpu = _gpu_name(args.backend)
  except ImportError:
    print(f"keras_gpu_benchmark: backend {args.backend} is not installed here; install it or pass"
          f" --backend={'torch' if args.backend == 'jax' else 'jax'}", file=sys.stderr)
    return 2
  if gpu is None and not args.allow_cpu:
    print("no GPU: not measured")
    return 0
  started = time.perf_counter()
  log = open(os.path.join(args.out_dir, "keras_gpu_benchmark.jsonl"), "a") if args.out_dir else None

  def report(records, label):
    for record in records:
      record["label"] = label
      if log:
        log.write(json.dumps(record) + "\n")
        log.flush()
    if records:
      total = sum(r["images_per_s"] for r in records)
      first = records[0]
      print(f"{label:34s} {total:9.1f} images/s  (compile {first['compile_s']:.0f} s, {first['steps']} steps,"
            f" {first.get('peak_gib', float('nan')):.2f} GiB peak, {first.get('device', '?')})", flush=True)
    return sum(r["images_per_s"] for r in records) if records else 0.0

  def budget_left():
    return time.perf_counter() - started < args.budget_s

  print(f"{gpu or 'CPU'}: backend {args.backend}, {args.image_size} px, alpha {args.alpha},"
        f" XLA {'on' if args.jit else 'off'}, {args.seconds:g} s a measurement", flush=True)
  rates = {}
  for precision in ("float32", "mixed_bfloat16", "mixed_float16"):
    if budget_left():
      rates[precision] = report(_run(args, precision=precision), f"1 cell, batch {args.batch_size}, {precision}")
  if not any(rates.values()):
    print("no measurement succeeded")
    return 1
  best = max(rates, key=rates.get)
  plan = [(f"1 cell, fit from host memory, {best}", 1, {"precision": best, "fit": True}),
          (f"{args.packed} packed cells, {best}", args.packed, {"precision": best}),
          (f"1 cell, batch {args.large_batch}, {best}", 1, {"precision": best, "batch_size": args.large_batch}),
          (f"1 cell, batch {args.large_batch}, mixed_bfloat16", 1,
           {"precision": "mixed_bfloat16", "batch_size": args.large_batch}),
          (f"joint p,sb heads, {best}", 1, {"precision": best, "joint": True}),
          (f"2.5D 5 channels, {best}", 1, {"precision": best, "channels": 5})]
  for label, processes, overrides in plan:
    if not budget_left():
      print(f"{label:34s} skipped: budget spent", flush=True)
      continue
    total = report(_run(args, processes, **overrides), label)
    if processes > 1 and total:
      print(f"{'':34s} x{total / rates[best]:.2f} over 1 cell", flush=True)
  print(f"wall {time.perf_counter() - started:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
