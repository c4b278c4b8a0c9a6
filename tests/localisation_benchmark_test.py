"""localisation_benchmark's regenerated targets against the masks the phantom stored (issue 23's occlusion split)."""

import os

import numpy as np

from pdx_tf import io_utils, phantom

from benchmark_loader import load_benchmark

bench = load_benchmark("localisation_benchmark")

# 8 tiny patients; seed 3 gives positives with nodules and, at PCI >= 8, an omental cake.
TINY = phantom.PhantomConfig(num_patients=8, seed=3, matrix_size=64, pixel_spacing_mm=6.0)


def test_nodules_only_and_cake_split_the_stored_disease_mask(tmp_path):
  manifest = phantom.write_demo_cohort(str(tmp_path / "cohort"), TINY)
  cohort_dir = os.path.dirname(manifest)
  rows = [row for row in io_utils.read_csv(manifest) if row["label_p"] == "1"]
  assert rows
  with_cake = 0
  for row in rows:
    stored = np.load(os.path.join(cohort_dir, "masks", f"{row['patient_id']}.npz"))
    nodules, nodule_z = bench._target_volume(cohort_dir, row, "p", "nodules_only")
    cake, cake_z = bench._target_volume(cohort_dir, row, "p", "omental_cake")
    np.testing.assert_allclose(nodule_z, stored["z_mm"])
    np.testing.assert_allclose(cake_z, stored["z_mm"])
    # The stored disease mask (nodules and cake) is exactly the union of the two, and they never overlap.
    np.testing.assert_array_equal(nodules | cake, stored["nodule_mask"])
    assert not np.any(nodules & cake)
    assert nodules.any()
    with_cake += int(cake.any())
  assert with_cake  # the split is tested on a patient that has both
