"""Size of one 512x512 HU slice in a TF Serving REST request (JSON) vs a gRPC TensorProto.

  python benchmarks/json_size.py
"""

import json

import numpy as np
import tensorflow as tf

from pdx_tf import phantom
from pdx_tf.serving.signatures import rest_predict_body


def main():
  patient = phantom.generate_patient(phantom.PhantomConfig(num_patients=1, matrix_size=512, pixel_spacing_mm=0.75), 0)
  hu = patient.hu[len(patient.hu) // 2][np.newaxis].astype(np.float32)  # [1, 512, 512], whole-number HU
  sizes = {
      "REST JSON, rest_predict_body (integer HU, compact)": len(rest_predict_body({"hu": hu})),
      "REST JSON, floats (json.dumps of float values)": len(json.dumps({"inputs": {"hu": hu.tolist()}})),
      "REST JSON, non-integer HU (after resampling)": len(rest_predict_body({"hu": hu + 0.37})),
      "gRPC TensorProto": len(tf.make_tensor_proto(hu).SerializeToString()),
  }
  print("| encoding of one 512x512 slice | MB |\n|---|---:|")
  for name, size in sizes.items():
    print(f"| {name} | {size / 1e6:.2f} |")


if __name__ == "__main__":
  main()
