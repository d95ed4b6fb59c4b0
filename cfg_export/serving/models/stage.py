"""Triton Python-backend model of one stage (the denoiser, a text encoder, the VAE
decoder): the stage's model file over the runtime's backend.

Copied into REPO/<stage>/1/model.py by `cfg-export triton --platform python`; it imports
the runtime copied beside it (never cfg_export, never torch) and runs the one-model
artifact in artifact/ with the runtime's ONNX Runtime backend. Triton's dynamic batcher
hands it the requests of several sampling runs at once: their rows are concatenated
along the batch axis, run in one call, and split back, one response per request.
"""
import json
import logging
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from runtime.artifact import Artifact  # noqa: E402  (the runtime copied beside this file)
from runtime.backends import BackendOptions, open_backend  # noqa: E402
from runtime.errors import CfgExportError  # noqa: E402

log = logging.getLogger("cfg_export.serving.stage")


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config.get("name", "stage")
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(params["threads"]) if "threads" in params else None
        spinning = {"1": True, "0": False}.get(params.get("spinning", ""))
        artifact = Artifact.open(os.path.join(HERE, "artifact"))  # one stage, as a one-model artifact
        options = BackendOptions(threads=threads, spinning=spinning) if threads or spinning is not None else None
        self.backend = open_backend(artifact, params.get("backend", "auto"), options)
        self.backend.__enter__()
        self.inputs = self.backend.manifest.inputs
        self.outputs = [spec.name for spec in self.backend.manifest.outputs]

    def execute(self, requests):
        try:
            arrays = {spec.name: [pb_utils.get_input_tensor_by_name(r, spec.name).as_numpy() for r in requests]
                      for spec in self.inputs}
            sizes = [len(a) for a in arrays[self.inputs[0].name]]
            feeds = {}
            for spec in self.inputs:
                value = arrays[spec.name][0] if len(requests) == 1 else np.concatenate(arrays[spec.name])
                feeds[spec.name] = value.reshape(-1) if len(spec.shape) == 1 else value  # [rows, 1] -> [rows]
            outputs = self.backend.infer(feeds)
        except CfgExportError as exc:
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc))) for _ in requests]
        except Exception as exc:
            log.exception("%s: batch failed", self.name)
            error = pb_utils.TritonError(f"internal error in the {self.name} model ({type(exc).__name__}: {exc})")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum([0, *sizes])
        return [pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(name, np.ascontiguousarray(outputs[name][lo:hi])) for name in self.outputs])
            for lo, hi in zip(bounds[:-1], bounds[1:])]

    def finalize(self):
        self.backend.__exit__(None, None, None)
