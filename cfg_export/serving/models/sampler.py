"""Triton Python-backend model `sampler`: one request is one guided sampling run.

Copied into REPO/sampler/1/model.py by `cfg-export triton`; it imports the runtime copied
beside it (never cfg_export, never torch). Each step's stacked rows go to the `denoiser`
model through BLS (Business Logic Scripting): the runtime's sampler loop runs unchanged
(runtime.pipeline.sample_guided) over a Backend whose _infer is that BLS call, and
Triton's dynamic batcher merges the rows of every run in flight into shared denoiser
batches. Each instance of this model (a process of its own) runs one request at a time.

A request is checked before any step: a bad one gets an error response of one line, and
the instance goes on with the next request. A request whose client has gone away
(Triton marks it cancelled) stops at its next step.
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
from runtime.backends.base import Backend  # noqa: E402
from runtime.errors import CfgExportError  # noqa: E402
from runtime.guidance import GuidanceOptions  # noqa: E402
from runtime.pipeline import sample_guided  # noqa: E402

log = logging.getLogger("cfg_export.serving.sampler")


class Cancelled(Exception):
    """The client of the request has gone away."""


class DenoiserModel(Backend):
    """The `denoiser` model of this Triton server as a runtime Backend: _infer sends one
    step's rows through BLS and waits for the eps rows."""

    name = "triton"

    def __init__(self, manifest, model_name):
        super().__init__(manifest)
        self.model_name = model_name
        self.output_names = [spec.name for spec in manifest.outputs]

    def activate(self):
        pass

    def deactivate(self):
        pass

    def _infer(self, feeds):
        # a [rows] input is declared [1] per row (the config's reshape): send [rows, 1]
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(value.reshape(len(value), -1) if value.ndim == 1
                                                             else value)) for name, value in feeds.items()]
        request = pb_utils.InferenceRequest(model_name=self.model_name, requested_output_names=self.output_names,
                                            inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise CfgExportError(f"the {self.model_name} model failed: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.output_names}


def _input(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def _scalar(request, name, kind):
    """Returns the single value of an optional [1] input as `kind`, or None."""
    value = _input(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise CfgExportError(f"{name}: got {value.size} values, expected one")
    value = value.reshape(-1)[0]
    if kind is str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return kind(value)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.max_images = int(params["max_images"])
        self.max_steps = int(params["max_steps"])
        self.artifact = Artifact.open(os.path.join(HERE, "artifact"))
        stage = self.artifact.stage()
        manifest = (stage.engine if params.get("engine") == "1" else stage.onnx).manifest
        self.denoiser = DenoiserModel(manifest, params["denoiser_model"])
        self.denoiser.__enter__()

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        try:
            samples = self._sample(request)
        except Cancelled:
            code = getattr(pb_utils.TritonError, "CANCELLED", None)  # older Python backends have no error codes
            error = pb_utils.TritonError("cancelled: the client went away", *([code] if code is not None else []))
            return pb_utils.InferenceResponse(error=error)
        except CfgExportError as exc:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc)))
        except Exception as exc:  # a fault here must not take the instance down with it
            log.exception("sampler: request failed")
            first = str(exc).splitlines()[0] if str(exc) else ""
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(
                f"internal error in the sampler model ({type(exc).__name__}: {first})"))
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("samples", samples)])

    def _sample(self, request):
        cond = _input(request, "cond")
        if cond is None or len(cond) == 0:
            raise CfgExportError("cond: got no condition, expected one per image")
        if len(cond) > self.max_images:
            raise CfgExportError(f"cond: got {len(cond)} images, this server takes at most {self.max_images} per "
                                 f"request; send several requests")
        steps = _scalar(request, "steps", int)
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise CfgExportError(f"steps: got {steps}, expected 1 to {self.max_steps}")
        w = _input(request, "w")
        negative = _input(request, "negative")
        if negative is not None and len(negative) not in (1, len(cond)):
            raise CfgExportError(f"negative: got {len(negative)} conditions, expected 1 or one per image ({len(cond)})")
        threshold = _scalar(request, "threshold", float)
        if threshold is not None and not 0 < threshold <= 1:
            raise CfgExportError(f"threshold: got {threshold}, expected a percentile in (0, 1], e.g. 0.995")
        interval = _input(request, "interval")
        guidance = GuidanceOptions(
            w_schedule=_scalar(request, "w_schedule", str) or "constant",
            interval=None if interval is None else tuple(float(v) for v in interval.reshape(-1)),
            negative=negative, threshold=threshold)

        def check_cancelled(done, total):
            if request.is_cancelled():
                raise Cancelled()

        result = sample_guided(self.artifact, cond, 0.0 if w is None else w, steps=steps,
                               sampler=_scalar(request, "sampler", str), spacing=_scalar(request, "spacing", str),
                               seed=_scalar(request, "seed", int), eta=_scalar(request, "eta", float),
                               guidance=guidance, backend=self.denoiser, progress=check_cancelled)
        return result.samples.astype(np.float32)

    def finalize(self):
        self.denoiser.__exit__(None, None, None)
