"""End-to-end tests of the data pipeline on a tiny phantom cohort (4 patients, 64 px, 32 px images)."""

import collections
import hashlib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
import tensorflow as tf
from absl import flags
from absl.testing import flagsaver

from pdx_tf import io_utils, phantom
from pdx_tf.data import manifest, pipeline, preprocess, records, region, shards

NUM_PATIENTS = 4
COVARIATES = ("ascites", "pci", "site")
PHANTOM_CONFIG = phantom.PhantomConfig(num_patients=NUM_PATIENTS, matrix_size=64, pixel_spacing_mm=6.0)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
  """(manifest path, cohort folder) of the tiny phantom cohort."""
  folder = str(tmp_path_factory.mktemp("cohort") / "cohort")
  return phantom.write_demo_cohort(folder, PHANTOM_CONFIG), folder


def _config(manifest_path, output_dir, **overrides):
  # Blocks of one copy: each patient's two copies make two blocks. 50 KB shards.
  values = dict(preprocess=preprocess.PreprocessConfig(image_size=32), augment_factor=2, augment_block=1,
                num_workers=1, shard_size_mb=0.05, qc_max_slices=4)
  values.update(overrides)
  return pipeline.PipelineConfig(manifest_path=manifest_path, output_dir=output_dir, **values)


@pytest.fixture(scope="module")
def first_run(cohort, tmp_path_factory):
  """(config, result) of a complete run on the cohort."""
  manifest_path, _ = cohort
  config = _config(manifest_path, str(tmp_path_factory.mktemp("records") / "D"))
  return config, pipeline.run_pipeline(config, progress=False)


def _files(folder):
  """Relative path -> bytes of every file under folder."""
  found = {}
  for root, _, names in os.walk(folder):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as handle:
        found[os.path.relpath(path, folder)] = handle.read()
  return found


def _raw_png(path):
  """The PNG bytes of the first record of a shard."""
  serialized = next(iter(tf.data.TFRecordDataset(path)))
  return tf.io.parse_single_example(serialized, {"image": tf.io.FixedLenFeature([], tf.string)})["image"]


def _read_shard(path):
  return [records.parse_example(serialized, COVARIATES) for serialized in tf.data.TFRecordDataset(path)]


def test_outputs_are_complete(first_run, cohort):
  config, result = first_run
  output_dir = config.output_dir
  assert result.ok and result.failures == () and result.num_patients == NUM_PATIENTS
  with open(os.path.join(output_dir, "failures.csv"), encoding="utf-8") as handle:
    assert handle.read() == "patient_id,reason\n"
  dataset = io_utils.read_json(os.path.join(output_dir, "dataset.json"))
  assert dataset["format"] == "pdx-tf-dataset" and dataset["schema_version"] == records.SCHEMA_VERSION
  assert dataset["covariate_names"] == list(COVARIATES)
  assert dataset["augment_factor"] == 2 and dataset["preprocess"]["image_size"] == 32
  assert "num_workers" not in dataset["config"] and "output_dir" not in dataset["config"]
  assert io_utils.read_json(os.path.join(output_dir, "config.json"))["num_workers"] == 1
  ids = [patient["patient_id"] for patient in dataset["patients"]]
  assert ids == sorted(ids) and len(ids) == NUM_PATIENTS
  index = open(os.path.join(output_dir, "qc", "index.html"), encoding="utf-8").read()
  for patient_id in ids:
    png = open(os.path.join(output_dir, "qc", f"{patient_id}.png"), "rb").read()
    image = tf.io.decode_png(png).numpy()
    assert image.ndim == 3 and min(image.shape[:2]) > 100 and image.std() > 10  # a real picture
    assert f"src='{patient_id}.png'" in index
  # The abdominal range found by the rule is within one slice of the phantom's truth.
  with open(os.path.join(cohort[1], "cohort.json"), encoding="utf-8") as handle:
    truth = {patient["patient_id"]: patient["abdomen_z_range_mm"] for patient in json.load(handle)["patients"]}
  for patient in dataset["patients"]:
    assert patient["z_range_rule"] == "top=diaphragm bottom=thighs"
    np.testing.assert_allclose(patient["z_range_mm"], truth[patient["patient_id"]],
                               atol=PHANTOM_CONFIG.slice_spacing_mm)


def test_dataset_json_matches_the_records(first_run, cohort):
  config, result = first_run
  dataset = io_utils.read_json(os.path.join(config.output_dir, "dataset.json"))
  manifest_rows = {row["patient_id"]: row for row in io_utils.read_csv(cohort[0])}
  by_patient = {patient["patient_id"]: patient for patient in dataset["patients"]}
  examples_by_patient = collections.Counter()
  for shard in dataset["shards"]:
    path = os.path.join(config.output_dir, shard["path"])
    assert os.path.getsize(path) == shard["num_bytes"] and io_utils.sha256_file(path) == shard["sha256"]
    examples = _read_shard(path)
    assert len(examples) == shard["num_examples"]
    row = manifest_rows[shard["patient_id"]]
    assert tf.io.decode_png(_raw_png(path), channels=0).shape[-1] == 1  # one window: stored with one channel
    for example in examples:
      # Every example of a patient's shard (originals and augmented copies) belongs to that patient.
      assert example["patient_id"].numpy().decode() == shard["patient_id"]
      assert int(example["label_p"]) == int(row["label_p"]) and int(example["label_sb"]) == int(row["label_sb"])
      assert [example[name].numpy().decode() for name in COVARIATES] == [row[name] for name in COVARIATES]
      assert example["image"].shape == (32, 32, 3)  # tiled on read
      if shard["kind"] == "augmented":
        # Block b of one-copy blocks holds copy b + 1, and its name carries the block.
        assert int(example["augmentation_index"]) == shard["block"] + 1
        assert shard["path"] == shards.augmented_path(shard["patient_id"], shard["block"], 0)
    examples_by_patient[shard["patient_id"], shard["kind"]] += len(examples)
  total = collections.Counter()
  for patient_id, patient in by_patient.items():
    assert examples_by_patient[patient_id, "original"] == patient["num_original_examples"] == patient["num_slices"]
    assert examples_by_patient[patient_id, "augmented"] == patient["num_augmented_examples"] == 2 * patient[
        "num_slices"]
    assert len(patient["augmented_shards"]) == patient["num_augmented_blocks"] == 2
    originals = _read_shard(os.path.join(config.output_dir, patient["original_shards"][0]))
    assert [int(e["slice_index"]) for e in originals] == list(range(patient["num_slices"]))
    assert all(int(e["augmentation_index"]) == 0 for e in originals)
    z_values = [float(e["z_mm"]) for e in originals]
    assert z_values == sorted(z_values) and z_values[0] == pytest.approx(patient["z_range_mm"][0])
    pool = [e for path in patient["augmented_shards"] for e in _read_shard(os.path.join(config.output_dir, path))]
    keys = sorted((int(e["slice_index"]), int(e["augmentation_index"])) for e in pool)
    assert keys == [(s, a) for s in range(patient["num_slices"]) for a in (1, 2)]
    total["slices"] += patient["num_slices"]
  counts = dataset["counts"]
  assert counts["slices"] == total["slices"] == result.num_slices
  assert counts["original_examples"] == sum(v for (_, kind), v in examples_by_patient.items() if kind == "original")
  assert counts["augmented_examples"] == result.num_augmented_examples == 2 * total["slices"]
  assert counts["shards"] == len(dataset["shards"]) and counts["failed_patients"] == 0


def test_originals_are_preprocess_slices_of_load_abdomen(first_run, cohort):
  config, _ = first_run
  patient_id = "demo-001"
  abdomen = region.load_abdomen(os.path.join(cohort[1], "dicom", patient_id))
  expected = preprocess.preprocess_slices(abdomen.hu, config.preprocess).numpy()
  originals = _read_shard(os.path.join(config.output_dir, shards.original_path(patient_id)))
  np.testing.assert_array_equal(np.stack([e["image"].numpy() for e in originals]), expected)
  np.testing.assert_allclose([float(e["z_mm"]) for e in originals], abdomen.z_mm, atol=1e-3)


def _assert_identical_outputs(config, second):
  """Runs `second` (as given, then once more to gather, if partitioned); its folder must equal the first's."""
  result = pipeline.run_pipeline(second, progress=False)
  assert result.ok and result.num_reused == 0
  if second.num_partitions > 1:
    for index in range(1, second.num_partitions):
      assert pipeline.run_pipeline(dataclass_replace(second, partition_index=index), progress=False).ok
    assert not os.path.exists(os.path.join(second.output_dir, "dataset.json"))
    gathered = pipeline.run_pipeline(dataclass_replace(second, num_partitions=1, partition_index=0),
                                     progress=False)
    assert gathered.ok and gathered.num_reused == NUM_PATIENTS
  first_files, second_files = _files(config.output_dir), _files(second.output_dir)
  assert sorted(first_files) == sorted(second_files)
  for name in first_files:
    if name != "config.json":  # the only file that records num_workers and output_dir
      assert first_files[name] == second_files[name], name


def test_a_rerun_in_two_partitions_writes_identical_bytes(first_run, tmp_path):
  config, _ = first_run
  _assert_identical_outputs(config, dataclass_replace(config, output_dir=str(tmp_path / "D2"), num_partitions=2))


def test_two_workers_write_identical_bytes(tmp_path):
  """Two spawned worker processes give the bytes one process gives (a 2-patient cohort keeps this fast)."""
  small = phantom.PhantomConfig(num_patients=2, matrix_size=64, pixel_spacing_mm=6.0)
  manifest_path = phantom.write_demo_cohort(str(tmp_path / "cohort"), small)
  config = _config(manifest_path, str(tmp_path / "D1"), augment_factor=1, qc_max_slices=2)
  assert pipeline.run_pipeline(config, progress=False).ok
  _assert_identical_outputs(config, dataclass_replace(config, output_dir=str(tmp_path / "D2"), num_workers=2))


def dataclass_replace(config, **changes):
  import dataclasses  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(config, **changes)


def test_resume_redoes_only_the_broken_patient(first_run, tmp_path, monkeypatch):
  config, _ = first_run
  output_dir = str(tmp_path / "D")
  shutil.copytree(config.output_dir, output_dir)
  config = dataclass_replace(config, output_dir=output_dir)
  reference = _files(output_dir)
  victim = "demo-002"

  def stamps():
    return {name: os.stat(os.path.join(output_dir, name)).st_mtime_ns for name in reference
            if os.path.exists(os.path.join(output_dir, name))}

  # 1. A crash inside one patient (after its shards were written) fails that patient only and leaves none of
  #    its files behind; the other patients are reused.
  real_render = pipeline.qc.render_patient_montage

  def render(patient_id, *args, **kwargs):
    if patient_id == victim:
      raise RuntimeError("simulated crash")
    return real_render(patient_id, *args, **kwargs)

  os.remove(os.path.join(output_dir, shards.marker_path(victim)))
  before = stamps()
  monkeypatch.setattr(pipeline.qc, "render_patient_montage", render)
  result = pipeline.run_pipeline(config, progress=False)
  assert not result.ok and result.dataset_json is None and result.num_reused == NUM_PATIENTS - 1
  assert result.failures == ((victim, "unexpected RuntimeError: simulated crash"),)
  assert not os.path.exists(os.path.join(output_dir, "dataset.json"))
  assert not any(victim in name for name in _files(output_dir) if not name.endswith((".csv", ".html")))
  monkeypatch.setattr(pipeline.qc, "render_patient_montage", real_render)

  # 2. A killed write: a truncated shard, a temp shard and no marker. The rerun redoes only that patient.
  for name, data in reference.items():
    if victim in name and not name.startswith(("patients", "qc/index")):
      with open(os.path.join(output_dir, name), "wb") as handle:
        handle.write(data[: len(data) // 2])
  temp_shard = os.path.join(output_dir, "augmented", f"{io_utils.TEMP_MARKER}0123456789ab-{victim}-b00000-00000.tfrecord")
  with open(temp_shard, "wb") as handle:
    handle.write(b"partial")
  result = pipeline.run_pipeline(config, progress=False)
  assert result.ok and result.num_reused == NUM_PATIENTS - 1 and result.failures == ()
  assert not os.path.exists(temp_shard)
  after_files, after_stamps = _files(output_dir), stamps()
  for name, data in reference.items():
    if name != "config.json":  # it records output_dir
      assert after_files[name] == data, name  # the redone patient's files are identical again
    if victim not in name and name.startswith(("original", "augmented", "patients", "qc/demo")):
      assert after_stamps[name] == before[name], f"{name} was rewritten"


def test_remove_patient_files_touches_only_that_patient(tmp_path):
  names = ["original/a.tfrecord", "original/a-1.tfrecord", "augmented/a-b00000-00000.tfrecord",
           "augmented/a-1-b00000-00000.tfrecord",
           f"augmented/{io_utils.TEMP_MARKER}0123456789ab-a-b00001-00000.tfrecord",
           "qc/a.png", "qc/a-1.png", "patients/a.json", "patients/a-1.json", "augmented/ab-b00000-00000.tfrecord"]
  for name in names:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
  assert shards.remove_patient_files(str(tmp_path), "a") == 5
  assert sorted(_files(str(tmp_path))) == sorted(
      ["original/a-1.tfrecord", "augmented/a-1-b00000-00000.tfrecord", "qc/a-1.png", "patients/a-1.json",
       "augmented/ab-b00000-00000.tfrecord"])


def _failing_manifest(cohort, first_config):
  """A manifest with the cohort's rows plus a truncated study and a missing folder (beside manifest.csv)."""
  manifest_path, folder = cohort
  broken = os.path.join(folder, "dicom", "broken-study")
  if not os.path.exists(broken):
    shutil.copytree(os.path.join(folder, "dicom", "demo-000"), broken)
    axial = []
    for name in sorted(os.listdir(broken)):
      try:
        dataset = pydicom.dcmread(os.path.join(broken, name), stop_before_pixels=True)
      except Exception:  # pylint: disable=broad-except
        continue  # stray non-DICOM files
      if "LOCALIZER" not in list(dataset.get("ImageType", [])):
        axial.append(name)
    victim = os.path.join(broken, axial[len(axial) // 2])
    with open(victim, "rb") as handle:
      data = handle.read()
    with open(victim, "wb") as handle:
      handle.write(data[: len(data) // 2])
    with open(os.path.join(folder, "broken-study-victim.txt"), "w", encoding="utf-8") as handle:
      handle.write(os.path.basename(victim))  # later calls (other tests) reuse the study and need the name
  with open(os.path.join(folder, "broken-study-victim.txt"), encoding="utf-8") as handle:
    victim = handle.read()
  with open(manifest_path, encoding="utf-8") as handle:
    text = handle.read()
  unrecorded = "," * 13  # the phantom's manifest has the 13 PCI region columns: not recorded here
  text += (f"broken,dicom/broken-study,1,0,none,3,A{unrecorded}\n"
           f"missing,dicom/no-such-folder,0,0,none,0,B{unrecorded}\n")
  path = os.path.join(folder, "manifest-with-failures.csv")
  with open(path, "w", encoding="utf-8") as handle:
    handle.write(text)
  # The file's token: its position in the study's sorted listing and a keyed hash of its relative path.
  listing = sorted(os.listdir(broken))
  name = os.path.basename(victim)
  digest = hashlib.sha256(b"pdx-tf file token v1\0" + name.encode("utf-8")).hexdigest()[:6]
  return path, f"file#{listing.index(name):04d}-{digest}"


def _phi_strings(cohort_folder):
  """PHI canaries, the DICOM UIDs of the cohort and the manifest's folder names: none may reach outputs."""
  found = set(phantom.PHI_CANARIES)
  for root, _, names in os.walk(os.path.join(cohort_folder, "dicom")):
    for name in names:
      try:
        dataset = pydicom.dcmread(os.path.join(root, name), stop_before_pixels=True)
      except Exception:  # pylint: disable=broad-except
        continue
      for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
        if keyword in dataset:
          found.add(str(dataset.data_element(keyword).value))
  found.update({"dicom/demo-000", "broken-study", "no-such-folder"})
  return sorted(found)


def test_failures_are_reported_and_other_patients_kept(first_run, cohort, tmp_path):
  first_config, _ = first_run
  manifest_path, truncated_token = _failing_manifest(cohort, first_config)
  output_dir = str(tmp_path / "D")
  shutil.copytree(first_config.output_dir, output_dir)  # same studies: the 4 good patients are reused
  config = dataclass_replace(first_config, manifest_path=manifest_path, output_dir=output_dir)
  result = pipeline.run_pipeline(config, progress=False)
  assert not result.ok and result.num_reused == NUM_PATIENTS and result.num_patients == NUM_PATIENTS
  reasons = dict(result.failures)
  assert sorted(reasons) == ["broken", "missing"]
  assert "\n" not in "".join(reasons.values())
  assert "truncated" in reasons["broken"] or "corrupt" in reasons["broken"], reasons["broken"]
  assert reasons["broken"].startswith(truncated_token + ": ")  # names the file by token, never by path
  assert "exist" in reasons["missing"] or "missing" in reasons["missing"], reasons["missing"]
  failures = io_utils.read_csv(os.path.join(output_dir, "failures.csv"))
  assert [row["patient_id"] for row in failures] == ["broken", "missing"]
  assert "broken" in open(os.path.join(output_dir, "qc", "index.html"), encoding="utf-8").read()
  assert not os.path.exists(os.path.join(output_dir, "dataset.json"))

  # The binary: exit status 1 with failures, 0 with --allow_failures (which writes dataset.json).
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  common = dict(manifest=manifest_path, output_dir=output_dir, image_size=32, augment_factor=2, num_workers=1,
                shard_size_mb=0.05, progress=False)
  # qc_max_slices is not a flag; the binary's default (16) changes the fingerprint, so pass a config match:
  # instead compare through the library below and use the binary only for exit codes on a fresh folder.
  binary_dir = str(tmp_path / "B")
  with flagsaver.flagsaver(**{**common, "output_dir": binary_dir, "augment_factor": 0, "qc": False}):
    with pytest.raises(SystemExit) as raised:
      binary.main(["data_pipeline"])
    assert raised.value.code == 1
  with flagsaver.flagsaver(**{**common, "output_dir": binary_dir, "augment_factor": 0, "qc": False,
                              "allow_failures": True}):
    binary.main(["data_pipeline"])  # returns: exit status 0
  dataset = io_utils.read_json(os.path.join(binary_dir, "dataset.json"))
  assert dataset["counts"]["failed_patients"] == 2 and dataset["counts"]["patients"] == NUM_PATIENTS

  result = pipeline.run_pipeline(dataclass_replace(config, allow_failures=True), progress=False)
  assert result.ok and len(result.failures) == 2

  # No PHI in any byte of either output folder (records, PNGs, JSON, CSV, HTML).
  canaries = [text.encode("utf-8") for text in _phi_strings(cohort[1])]
  for folder in (output_dir, binary_dir, first_config.output_dir):
    for name, data in _files(folder).items():
      for canary in canaries:
        assert canary not in data, f"{canary!r} found in {name}"


def test_block_writer_splits_a_large_block_into_parts_and_keeps_blocks_apart(tmp_path):
  record = b"r" * 100  # 116 bytes framed: three fit in 400 bytes, the fourth opens a new part
  with shards.BlockShardWriter(str(tmp_path), "p1", max_bytes=400) as writer:
    for index in range(5):
      writer.write(record, block=1)
      writer.write(record, block=0)
  written = writer.shards
  assert [(shard["block"], shard["path"], shard["num_examples"]) for shard in written] == [
      (0, "augmented/p1-b00000-00000.tfrecord", 3), (0, "augmented/p1-b00000-00001.tfrecord", 2),
      (1, "augmented/p1-b00001-00000.tfrecord", 3), (1, "augmented/p1-b00001-00001.tfrecord", 2)]
  for shard in written:
    assert os.path.getsize(tmp_path / shard["path"]) == shard["num_bytes"]
    assert len(list(tf.data.TFRecordDataset(str(tmp_path / shard["path"])))) == shard["num_examples"]
  assert shards.augmentation_block(1, 16) == 0 and shards.augmentation_block(16, 16) == 0
  assert shards.augmentation_block(17, 16) == 1


def test_invalid_manifest_lists_every_problem(tmp_path, capsys):
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  manifest_path = tmp_path / "manifest.csv"
  manifest_path.write_text("patient_id,dicom_dir,label_p,label_sb\nP1,d,0,1\nP1,d,2,0\n")
  with flagsaver.flagsaver(manifest=str(manifest_path), output_dir=str(tmp_path / "D"), progress=False):
    with pytest.raises(SystemExit) as raised:
      binary.main(["data_pipeline"])
  assert raised.value.code == 1
  lines = capsys.readouterr().err.strip().splitlines()
  assert len(lines) == 4 and "3 problem(s)" in lines[0]
  assert lines[1].startswith("row 2") and lines[2].startswith("row 3") and lines[3].startswith("row 3")


def test_demo_preset(monkeypatch, cohort, tmp_path):
  sizes = []
  monkeypatch.setattr(pipeline, "demo_manifest_path",
                      lambda num_patients=40, phantom_preset=None: sizes.append(num_patients) or cohort[0])
  config = pipeline.demo_config(str(tmp_path / "demo"))
  assert config.preprocess.image_size == 48 and config.augment_factor == 8
  assert config.manifest_path == cohort[0] and sizes == [40]
  pipeline.demo_config(str(tmp_path / "demo_sb"), num_patients=120, image_size=96)
  assert sizes == [40, 120]
  from data_pipeline import __main__ as binary  # pylint: disable=import-outside-toplevel
  flags.FLAGS.mark_as_parsed()
  seen = []
  monkeypatch.setattr(pipeline, "run_pipeline", lambda config, **_: seen.append(config) or _fake_result())
  with flagsaver.flagsaver(output_dir=str(tmp_path / "demo"), progress=False):
    binary.main(["data_pipeline"])
  assert seen[0].preprocess.image_size == 48 and seen[0].augment_factor == 8
  assert seen[0].manifest_path == cohort[0]


def _tree_digest(folder):
  """sha256 over every file's relative path and bytes under folder."""
  digest = hashlib.sha256()
  for name, data in sorted(_files(folder).items()):
    digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
  return digest.hexdigest()


def test_demo_cohort_of_another_size_has_its_patients_and_prevalence(monkeypatch, tmp_path):
  """demo_manifest_path(8): 8 patients, 4 p-positive, 2 sb-positive (sb only with p); the same bytes again."""
  digests = []
  for cache in ("a", "b"):
    monkeypatch.setenv("PDX_TF_CACHE", str(tmp_path / cache))
    manifest_path = pipeline.demo_manifest_path(8)
    assert manifest_path.startswith(str(tmp_path / cache))
    with open(manifest_path, encoding="utf-8") as handle:
      rows = [line.split(",") for line in handle.read().splitlines()[1:]]
    assert [row[0] for row in rows] == [f"demo-{index:03d}" for index in range(8)]
    label_p, label_sb = [int(row[2]) for row in rows], [int(row[3]) for row in rows]
    assert sum(label_p) == 4 and sum(label_sb) == 2
    assert all(p == 1 for p, sb in zip(label_p, label_sb) if sb == 1)
    digests.append(_tree_digest(os.path.dirname(manifest_path)))
  assert digests[0] == digests[1]


def test_the_default_demo_cohort_is_the_one_it_always_was(monkeypatch, tmp_path):
  """The default asks the phantom for exactly the cohort the demo wrote before it had a size: PhantomConfig()
  in phantom.demo_cohort_dir() (a one-off check compared the 40-patient cohort's 2,015 files, byte for byte)."""
  monkeypatch.setenv("PDX_TF_CACHE", str(tmp_path))
  calls = []
  monkeypatch.setattr(phantom, "write_demo_cohort", lambda folder, config: calls.append((folder, config)) or "M")
  assert pipeline.demo_manifest_path() == "M"
  assert calls == [(phantom.demo_cohort_dir(), phantom.PhantomConfig())]
  assert phantom.demo_cohort_dir(phantom.PhantomConfig(num_patients=120)) != calls[0][0]
  assert pipeline.demo_manifest_path(40, "low_burden") == "M"
  low_burden = phantom.PhantomConfig(num_patients=40, nodule_diameter_range_mm=(7.0, 20.0), omental_cake=False,
                                     ascites_given_positive=(0.7, 0.2, 0.1), ascites_given_negative=(0.7, 0.2, 0.1))
  assert calls[1] == (phantom.demo_cohort_dir(low_burden), low_burden) and calls[1][0] != calls[0][0]


@pytest.mark.parametrize("size", [0, -4, 10, 4.0, True])
def test_a_bad_demo_cohort_size_is_refused_before_anything_is_written(monkeypatch, tmp_path, size):
  monkeypatch.setenv("PDX_TF_CACHE", str(tmp_path))
  with pytest.raises(ValueError, match=r"must be a positive multiple of 4 .* got "):
    pipeline.demo_manifest_path(size)
  assert not os.listdir(tmp_path)


def _fake_result():
  return pipeline.PipelineResult(output_dir="D", dataset_json="D/dataset.json", num_patients=1, num_reused=0,
                                 failures=(), num_slices=1, num_original_examples=1, num_augmented_examples=0,
                                 num_bytes=1, wall_time_s=1.0, processed_slices=1)


def test_config_validation():
  with pytest.raises(ValueError, match="augment_factor"):
    pipeline.PipelineConfig(manifest_path="m.csv", output_dir="D", augment_factor=-1)
  with pytest.raises(ValueError, match="num_workers"):
    pipeline.PipelineConfig(manifest_path="m.csv", output_dir="D", num_workers=0)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_binary_console_and_file_names_carry_no_phi_with_two_workers(first_run, cohort, tmp_path):
  """`python -m data_pipeline` with two worker processes, good and failing patients: neither its console (stdout
  and stderr of the binary and its spawned workers) nor any output file name or content holds PHI."""
  first_config, _ = first_run
  manifest_path, _ = _failing_manifest(cohort, first_config)
  output_dir = tmp_path / "D"
  result = subprocess.run(
      [sys.executable, "-m", "data_pipeline", f"--manifest={manifest_path}", f"--output_dir={output_dir}",
       "--image_size=32", "--augment_factor=1", "--num_workers=2", "--shard_size_mb=0.05", "--allow_failures"],
      capture_output=True, text=True, timeout=600, cwd=REPO_ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"),
      check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  console = result.stdout + result.stderr
  assert "broken" in console and "missing" in console  # the failure lines really were captured
  phi = _phi_strings(cohort[1])
  assert any(value.count(".") > 3 for value in phi)  # the DICOM UIDs are in the list
  for value in phi:
    assert value not in console, f"{value!r} printed by python -m data_pipeline"
  files = _files(str(output_dir))
  assert "dataset.json" in files and any(name.startswith("qc") for name in files)
  for name, data in files.items():
    for value in phi:
      assert value not in name, f"{value!r} in the file name {name}"
      assert value.encode("utf-8") not in data, f"{value!r} found in {name}"


def test_run_summary_lines():
  """The console summary of a run, written out by hand for three outcomes."""
  common = dict(output_dir="D", num_patients=3, num_reused=1, num_slices=120, num_original_examples=120,
                num_augmented_examples=960, num_bytes=3 * 2**20, wall_time_s=4.0, processed_slices=80)
  done = pipeline.PipelineResult(dataset_json="D/dataset.json", failures=(), **common)
  assert done.summary().splitlines() == [
      "patients: 3 ok (1 reused from an earlier run), 0 failed",
      "slices: 120; examples: 120 original + 960 augmented; 3.0 MiB of records",
      "time: 4.0 s (20.0 slices/s processed this run)",
      "dataset: D/dataset.json"]
  failed = pipeline.PipelineResult(dataset_json=None, failures=(("p9", "why"),), **common)
  assert failed.summary().splitlines()[-1] == (
      "dataset.json NOT written: 1 patient(s) failed (see D/failures.csv); fix them and rerun (finished patients"
      " are skipped), or pass --allow_failures to build the dataset without them")
  assert failed.summary().splitlines()[0] == "patients: 3 ok (1 reused from an earlier run), 1 failed"
  partition = pipeline.PipelineResult(dataset_json=None, failures=(), partitioned=True,
                                      **{**common, "wall_time_s": 0.0})
  assert partition.summary().splitlines()[2:] == [
      "time: 0.0 s (0.0 slices/s processed this run)",
      "partition done; after every partition, run once without partitions to write dataset.json"]


def test_an_unexpected_error_is_one_line_naming_its_type(monkeypatch, tmp_path):
  row = manifest.ManifestRow(row_number=2, patient_id="p1", dicom_dir=str(tmp_path / "DOE_JANE"), label_p=1,
                             label_sb=0, z_min_mm=None, z_max_mm=None, series_uid=None, covariates={})

  def broken(*args, **kwargs):
    raise RuntimeError(f"boom in {tmp_path / 'DOE_JANE'}\nsecond line")

  monkeypatch.setattr(pipeline, "process_patient", broken)
  config = pipeline.PipelineConfig(manifest_path=str(tmp_path / "m.csv"), output_dir=str(tmp_path / "D"))
  patient_id, marker, reason, _ = pipeline._run_patient(row, config)  # pylint: disable=protected-access
  assert (patient_id, marker) == ("p1", None)
  assert reason == "unexpected RuntimeError: boom in <dicom_dir> second line"
