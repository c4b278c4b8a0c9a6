"""What a phantom cohort holds, per label, from its cohort.json: ascites, cakes, nodules and their sizes, PCI, and
how many patients are positive in each PCI region (issues 20 and 23).

    python benchmarks/phantom_cohort_stats.py default      # the 40-patient demo cohort
    python benchmarks/phantom_cohort_stats.py low_burden   # the low-burden preset (docs/small_implants.md)

Writes the cohort first if it is not cached (about a minute). Prints one JSON line; deterministic.
"""
import collections, json, os, sys
from pdx_tf.data import pipeline


def main():
  preset = sys.argv[1] if len(sys.argv) > 1 else None
  manifest = pipeline.demo_manifest_path(40, preset if preset != "default" else None)
  cohort = json.load(open(os.path.join(os.path.dirname(manifest), "cohort.json")))
  patients = cohort["patients"]
  out = {"preset": preset, "cohort": os.path.basename(os.path.dirname(manifest)), "patients": len(patients)}
  for label in (0, 1):
    group = [p for p in patients if p["label_p"] == label]
    out[f"label_p={label}"] = {
        "n": len(group),
        "ascites": dict(collections.Counter(p["ascites"] for p in group)),
        "omental_cake": sum(p["omental_cake"] for p in group),
        "nodules": sum(p["nodule_count"] for p in group),
        "nodule_diameter_mm_min_max": [min([d for p in group for d in p["nodule_diameters_mm"]], default=None),
                                       max([d for p in group for d in p["nodule_diameters_mm"]], default=None)],
        "pci": sorted(p["pci"] for p in group),
    }
  out["positive_regions"] = [sum(p["pci_scores"][r] > 0 for p in patients) for r in range(13)]
  print(json.dumps(out))


if __name__ == "__main__":
  main()
