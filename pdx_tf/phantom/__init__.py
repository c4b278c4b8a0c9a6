"""The synthetic cohort: deterministic abdominal CT phantoms written as real DICOM (the demo and the tests).

`anatomy.py` paints one patient's organs, ascites, nodules and omental cake into a HU volume and builds its PCI
region map; `cohort.py` draws patients (labels, covariates, disease masks, PCI region scores) and writes series
and whole cached cohorts with manifest.csv.
Nothing here imports TensorFlow.

    from pdx_tf import phantom
    manifest_path = phantom.write_demo_cohort(phantom.demo_cohort_dir())
"""

from pdx_tf.phantom.cohort import (MANIFEST_COLUMNS, PCI_COLUMNS, PHANTOM_PRESETS, PHI_CANARIES, STORED_ORIENTATIONS,
                                   PhantomConfig, config_hash, demo_cohort_dir, dicom_quirks, generate_patient,
                                   masks_at_slices, patient_labels, preset_config, write_ct_series,
                                   write_demo_cohort)

__all__ = ["MANIFEST_COLUMNS", "PCI_COLUMNS", "PHANTOM_PRESETS", "PHI_CANARIES", "STORED_ORIENTATIONS", "PhantomConfig",
           "config_hash", "demo_cohort_dir", "dicom_quirks", "generate_patient", "masks_at_slices", "patient_labels",
           "preset_config", "write_ct_series", "write_demo_cohort"]
