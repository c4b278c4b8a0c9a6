"""Tests for configs/serving/ and the documented gRPC settings (docs/deployment.md, "TF Serving"): a 60-slice
512x512 study fits the stated limits."""

import os
import re

import numpy as np
import pytest
import tensorflow as tf

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRPC_DEFAULT_MAX_RECEIVE = 4 * 1024 * 1024  # gRPC's default receive limit (client side, for the response)
SERVER_MAX_MESSAGE = 2**31 - 1  # tensorflow_model_server: ServerBuilder.SetMaxMessageSize(kint32max)


def _readme() -> str:
  """The page with the TF Serving section (moved from README.md to docs/deployment.md)."""
  with open(os.path.join(REPO_ROOT, "docs", "deployment.md"), encoding="utf-8") as handle:
    return handle.read()


def test_models_config_serves_both_tasks():
  text_format = pytest.importorskip("google.protobuf.text_format")
  model_server_config_pb2 = pytest.importorskip("tensorflow_serving.config.model_server_config_pb2")
  with open(os.path.join(REPO_ROOT, "configs", "serving", "models.config"), encoding="utf-8") as handle:
    config = text_format.Parse(handle.read(), model_server_config_pb2.ModelServerConfig())
  served = {entry.name: entry.base_path for entry in config.model_config_list.config}
  assert served == {"pdx_p": "/models/pdx_p", "pdx_sb": "/models/pdx_sb"}
  with open(os.path.join(REPO_ROOT, "configs", "serving", "batching.config"), encoding="utf-8") as handle:
    batching = handle.read()
  assert re.search(r"^max_batch_size \{ value: \d+ \}", batching, re.M)
  assert "pad_variable_length_inputs: false" in batching


def test_grpc_request_for_a_60_slice_study_fits_the_readme_limits():
  predict_pb2 = pytest.importorskip("tensorflow_serving.apis.predict_pb2")
  request = predict_pb2.PredictRequest()
  request.model_spec.name = "pdx_p"
  request.model_spec.signature_name = "predict_patient"
  hu = np.full((60, 512, 512), -1000.0, np.float32)
  request.inputs["hu"].CopyFrom(tf.make_tensor_proto(hu))
  size = request.ByteSize()
  assert size > 60 * 512 * 512 * 4 > GRPC_DEFAULT_MAX_RECEIVE  # the defaults would not do: settings are needed
  readme = _readme()
  # The client's send limit stated in the README's gRPC example, and the serving section's statement of it.
  sends = re.findall(r'"grpc\.max_send_message_length", ([0-9<> ]+)\)', readme)
  assert sends, "README's gRPC client example must set grpc.max_send_message_length"
  for limit in sends:
    limit = eval(limit, {"__builtins__": {}})  # pylint: disable=eval-used  # "1 << 30" from the README
    assert size < limit < SERVER_MAX_MESSAGE
  stated = re.search(r"gRPC request of a 60-slice 512x512 study is ([0-9.]+) MB", readme)
  assert stated and float(stated.group(1)) == pytest.approx(size / 1e6, abs=0.05)
