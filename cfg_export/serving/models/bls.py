"""What the sampler models of the repository share: the models of this server as runtime
Backends called through BLS (Business Logic Scripting), reading a request's optional
inputs, and the one-line error responses.

Copied beside the sampler's model.py; it imports only numpy, Triton's
triton_python_backend_utils and the runtime copied beside it.
"""
import json
import logging

import numpy as np
import triton_python_backend_utils as pb_utils

from runtime.backends.base import Backend
from runtime.errors import CfgExportError

log = logging.getLogger("cfg_export.serving.bls")


class Cancelled(Exception):
    """The client of the request has gone away."""


class TritonModel(Backend):
    """A model of this Triton server as a runtime Backend: _infer sends the rows through
    BLS and waits for the outputs. The model's dynamic batcher merges the rows of every
    run in flight into shared batches."""

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


def parameters(args) -> dict:
    """The string parameters of the model's config, by key."""
    config = json.loads(args["model_config"])
    return {key: value["string_value"] for key, value in config.get("parameters", {}).items()}


def read_input(request, name):
    """The input `name` of the request as a numpy array, or None when it was not sent."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def read_scalar(request, name, kind):
    """Returns the single value of an optional [1] input as `kind`, or None."""
    value = read_input(request, name)
    if value is None:
        return None
    if value.size != 1:
        raise CfgExportError(f"{name}: got {value.size} values, expected one")
    value = value.reshape(-1)[0]
    if kind is str:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return kind(value)


def read_texts(request, name):
    """Returns the strings of an optional BYTES input [K] as a list, or None."""
    value = read_input(request, name)
    if value is None:
        return None
    return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in value.reshape(-1)]


def read_json(request, name):
    """Returns the dict of an optional JSON input (one string), or None."""
    text = read_scalar(request, name, str)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CfgExportError(f"{name}: got {text[:80]!r}, expected a JSON object ({exc})") from None
    if not isinstance(value, dict):
        raise CfgExportError(f"{name}: got {text[:80]!r}, expected a JSON object of scheduler config fields")
    return value


def cancel_check(request):
    """A progress(done, total) callback that stops the run once the client has gone away."""
    def check(done, total):
        if request.is_cancelled():
            raise Cancelled()
    return check


def respond(request, run, what):
    """Returns the response of one request: run(request) -> output tensors, or one error
    line (a CfgExportError's message, a cancelled client, or an internal fault named)."""
    try:
        tensors = run(request)
    except Cancelled:
        code = getattr(pb_utils.TritonError, "CANCELLED", None)  # older Python backends have no error codes
        error = pb_utils.TritonError("cancelled: the client went away", *([code] if code is not None else []))
        return pb_utils.InferenceResponse(error=error)
    except CfgExportError as exc:
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc).splitlines()[0]))
    except Exception as exc:  # a fault here must not take the instance down with it
        log.exception("%s: request failed", what)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(
            f"internal error in the {what} model ({type(exc).__name__}: {first})"))
    return pb_utils.InferenceResponse(output_tensors=tensors)
