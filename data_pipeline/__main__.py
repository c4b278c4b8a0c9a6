"""Turns a cohort of abdominal CT studies into TFRecords for training: `python -m data_pipeline`.

Examples:
  # The demo: builds the synthetic phantom cohort (cached) and writes runs/demo/records with the demo
  # preset (48 px images, 8 augmented copies a slice).
  python -m data_pipeline

  # A real cohort, as in the paper (224 px, soft-tissue window, 960 augmented copies a slice).
  python -m data_pipeline --manifest=cohort/manifest.csv --output_dir=data/records

  # The records' size first (estimated from the manifest, ~45 slices a patient) against the free disk; writes
  # nothing. Every run makes this check before it starts and refuses, in one line, records that would not fit.
  python -m data_pipeline --manifest=cohort/manifest.csv --output_dir=data/records --plan

  # Quick look first: originals only, three windows, 5 mm slices, keep going past bad studies.
  python -m data_pipeline --manifest=cohort/manifest.csv --output_dir=data/check --augment_factor=0 \
      --window=triple --slice_spacing_mm=5 --allow_failures

  # Several machines: each runs one partition into a shared folder, then one gathering run.
  python -m data_pipeline --manifest=gs://b/cohort.csv --output_dir=gs://b/records --num_partitions=8 \
      --partition_index=$I        # I = 0..7, one machine each
  python -m data_pipeline --manifest=gs://b/cohort.csv --output_dir=gs://b/records   # writes dataset.json

  # Apache Beam (pip install "pdx-tf[beam]"): the same D/, byte for byte. DirectRunner here; on a cluster:
  python -m data_pipeline --manifest=gs://b/cohort.csv --output_dir=gs://b/records --runner=beam \
      --beam_pipeline_options=runner=DataflowRunner,project=P,region=R,temp_location=gs://b/tmp,setup_file=./setup.py

Rerunning into the same --output_dir skips finished patients and redoes the rest. Exit status 1 when the
manifest is invalid (every problem printed, one a line) or any patient failed (unless --allow_failures).
Outputs: original/ and augmented/ TFRecords, qc/ montages and index.html, failures.csv, config.json and,
last, dataset.json (see pdx_tf/data/pipeline.py and CONTRACTS.md).
"""

from pdx_tf import cli

cli.quiet_tensorflow()  # Before anything loads TensorFlow: no C++ start-up lines unless --verbosity >= 1.

import sys  # pylint: disable=wrong-import-position,wrong-import-order

from absl import app
from absl import flags

from pdx_tf import presets  # pylint: disable=wrong-import-position
from pdx_tf.data import augment, pipeline, preprocess
from pdx_tf.errors import ManifestError, PdxError

_DEMO = presets.PIPELINE_PRESETS["demo"]

_MANIFEST = flags.DEFINE_string("manifest", None, "Cohort CSV (patient_id,dicom_dir,label_p,label_sb[,z_min_mm,"
                                "z_max_mm,series_uid][,covariates...]). Unset: the demo phantom cohort.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Output folder D (local or gs://). Required with "
                                  f"--manifest; the demo defaults to {pipeline.DEMO_OUTPUT_DIR}.")
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 224, "Model image side in pixels (demo: "
                                   f"{_DEMO['image_size']}).")
_AUGMENT_FACTOR = flags.DEFINE_integer(
    "augment_factor", pipeline.PAPER_AUGMENT_FACTOR, "Augmented copies written per slice (the paper: "
    f"{pipeline.PAPER_AUGMENT_FACTOR}; demo: {_DEMO['augment_factor']}); 0 = originals only.")
_AUGMENT_BLOCK = flags.DEFINE_integer(
    "augment_block", pipeline.DEFAULT_AUGMENT_BLOCK, "Augmented copies of each slice per block file: the unit"
    " the training pool draws (a cell opens only its drawn blocks, so it reads what it trains on); default"
    f" {pipeline.DEFAULT_AUGMENT_BLOCK}, the demo's {_DEMO['augment_block']}.")
_WINDOW = flags.DEFINE_string("window", "abdomen", "HU window(s): abdomen (W400/L40), triple, or C:W[,C:W,C:W].")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", pipeline.default_num_workers(),
                                    "Patient worker processes (default min(CPU count, 4)); 1 runs in this process.")
_ALLOW_FAILURES = flags.DEFINE_bool("allow_failures", False,
                                    "Write dataset.json and exit 0 even if some patients failed (left out).")
_AUGMENT_SEED = flags.DEFINE_integer(
    "augment_seed", 0, "The augmentation key: each copy is a pure function of (augment_seed, patient_id, slice_index,"
    " copy index); stored as dataset.json's \"seed\". Not train's --seed (the split, pool draw and initialisation).")
_SEED = flags.DEFINE_integer("seed", None, "Deprecated (accepted for one release): the old name of --augment_seed.")
_SLICE_SPACING_MM = flags.DEFINE_float("slice_spacing_mm", 5.0,
                                       "Average thin abdominal slices into slabs this thick (mm), as a thick "
                                       "reconstruction; a study already near it keeps its slices; 0 keeps all.")
_SHARD_SIZE_MB = flags.DEFINE_float("shard_size_mb", 150.0, "Largest augmented shard, in MiB.")
_ROTATION_MAX_DEG = flags.DEFINE_float("rotation_max_deg", 15.0, "Rotation drawn in [-max, max] degrees.")
_FLIP_PROBABILITY = flags.DEFINE_float("flip_probability", 0.5, "Probability of a left-right flip.")
_SCALE_MIN = flags.DEFINE_float("scale_min", 0.9, "Smallest zoom factor.")
_SCALE_MAX = flags.DEFINE_float("scale_max", 1.1, "Largest zoom factor.")
_MIN_SLICES = flags.DEFINE_integer("min_slices", 8, "Fewest slices accepted in a series and its abdominal range.")
_NUM_PARTITIONS = flags.DEFINE_integer("num_partitions", 1, "Split the patients into this many partitions to "
                                       "run on several machines into one --output_dir.")
_PARTITION_INDEX = flags.DEFINE_integer("partition_index", 0, "The partition this run processes; after all "
                                        "partitions, run once without partitions to write dataset.json.")
_SLICE_THICKNESS_MM = flags.DEFINE_float("slice_thickness_mm", 5.0,
                                         "The automatic series choice prefers the slice thickness nearest this (mm);"
                                         " a manifest series_uid wins.")
_RUNNER = flags.DEFINE_enum("runner", "local", ["local", "beam"], "local: worker processes on this machine; beam: "
                            "an Apache Beam pipeline (see --beam_pipeline_options), writing the same folder.")
_BEAM_PIPELINE_OPTIONS = flags.DEFINE_list(
    "beam_pipeline_options", [], "With --runner=beam: Beam options as name=value[,name=value...], e.g. "
    "runner=DataflowRunner,project=P,region=R,temp_location=gs://b/tmp; empty: the DirectRunner.")
_SHOW_PATHS = flags.DEFINE_bool("show_paths", False, "Print the real relative path of the file tokens in DICOM "
                                "warnings and errors to the console, for local debugging; never written to a file.")
_QC = flags.DEFINE_bool("qc", True, "Write QC montages (qc/<patient_id>.png) and qc/index.html.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Show a progress bar.")
_PLAN = flags.DEFINE_bool("plan", False, "Print the records' estimated size and the free space where they go, and "
                          "exit (1 with one line when they would not fit); reads only the manifest.")


def _fail(message) -> None:
  cli.exit_with_error("data_pipeline", message)


def _augment_seed() -> int:
  """--augment_seed, or the deprecated --seed (one warning line); both with different values is an error."""
  if _SEED.value is None:
    return _AUGMENT_SEED.value
  if flags.FLAGS["augment_seed"].present and _AUGMENT_SEED.value != _SEED.value:
    raise ValueError(f"--seed={_SEED.value} and --augment_seed={_AUGMENT_SEED.value} disagree; --seed is the"
                     " deprecated name of --augment_seed: give only --augment_seed")
  print("data_pipeline: warning: --seed is deprecated and will be removed; use --augment_seed (the augmentation"
        " key; train's --seed is another seed)", file=sys.stderr)
  return _SEED.value


def _config() -> pipeline.PipelineConfig:
  demo = _MANIFEST.value is None
  if not demo and _OUTPUT_DIR.value is None:
    raise ValueError("--output_dir is required with --manifest")
  flagged = {"image_size": _IMAGE_SIZE.value, "augment_factor": _AUGMENT_FACTOR.value,
             "augment_block": _AUGMENT_BLOCK.value}
  given = {name: value for name, value in flagged.items() if flags.FLAGS[name].present}
  # The demo preset, then the flags given explicitly (the one override path of pdx_tf.presets).
  values = presets.apply(_DEMO if demo else {}, flagged, given)
  image_size, augment_factor, augment_block = values["image_size"], values["augment_factor"], values["augment_block"]
  return pipeline.PipelineConfig(
      manifest_path=pipeline.demo_manifest_path() if demo else _MANIFEST.value,
      output_dir=_OUTPUT_DIR.value or pipeline.DEMO_OUTPUT_DIR,
      preprocess=preprocess.PreprocessConfig(image_size=image_size,
                                             windows=preprocess.parse_windows(_WINDOW.value)),
      augment=augment.AugmentConfig(rotation_max_deg=_ROTATION_MAX_DEG.value,
                                    flip_probability=_FLIP_PROBABILITY.value, scale_min=_SCALE_MIN.value,
                                    scale_max=_SCALE_MAX.value),
      augment_factor=augment_factor,
      augment_block=augment_block,
      seed=_augment_seed(),
      num_workers=_NUM_WORKERS.value,
      allow_failures=_ALLOW_FAILURES.value,
      slice_spacing_mm=_SLICE_SPACING_MM.value,
      slice_thickness_mm=_SLICE_THICKNESS_MM.value,
      shard_size_mb=_SHARD_SIZE_MB.value,
      min_slices=_MIN_SLICES.value,
      write_qc=_QC.value,
      num_partitions=_NUM_PARTITIONS.value,
      partition_index=_PARTITION_INDEX.value,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    config = _config()
  except ValueError as error:  # invalid flag values (PdxError is a ValueError too)
    _fail(str(error))
  if _BEAM_PIPELINE_OPTIONS.value and _RUNNER.value != "beam":
    _fail("--beam_pipeline_options needs --runner=beam")
  if _PLAN.value:
    _print_plan(config)
    return
  try:
    if _RUNNER.value == "beam":
      try:
        from pdx_tf.data import beam_pipeline  # pylint: disable=import-outside-toplevel
        import apache_beam  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
      except ImportError as error:
        _fail(f"--runner=beam needs apache-beam ({error}); pip install \"pdx-tf[beam]\"")
      options = [option if option.startswith("--") else f"--{option}" for option in _BEAM_PIPELINE_OPTIONS.value]
      result = beam_pipeline.run_beam_pipeline(config, options, show_paths=_SHOW_PATHS.value)
    else:
      result = pipeline.run_pipeline(config, progress=_PROGRESS.value, show_paths=_SHOW_PATHS.value)
  except ManifestError as error:
    print(f"data_pipeline: error: {error}", file=sys.stderr)  # One problem a line.
    sys.exit(1)
  except PdxError as error:
    _fail(str(error))
  print(result.summary())
  if not result.ok:
    sys.exit(1)


def _print_plan(config: pipeline.PipelineConfig) -> None:
  try:
    rows = pipeline.partition_rows(config)
    estimate, free = pipeline.records_budget(config, len(rows))
    pipeline.check_records_fit(config, len(rows))
  except ManifestError as error:
    print(f"data_pipeline: error: {error}", file=sys.stderr)  # One problem a line.
    sys.exit(1)
  except PdxError as error:
    _fail(str(error))
  gib = 1024**3
  where = (f"{free / gib:.1f} GiB free under {config.output_dir}" if free is not None
           else f"free space not checked ({config.output_dir} is not a local folder)")
  print(f"patients: {len(rows)}\nrecords: ~{estimate / gib:.1f} GiB estimated (~"
        f"{pipeline.estimated_slices_per_patient(config)} abdominal slices a patient x {1 + config.augment_factor}"
        f" images x {config.preprocess.image_size} px, {len(config.preprocess.windows)} channel(s); slice counts are"
        f" known only after reading the DICOM)\n{where}")


if __name__ == "__main__":
  app.run(main)
