"""Triton Python-backend model `sampler` of a one-denoiser artifact: one request is one
guided sampling run.

Copied into REPO/sampler/1/model.py by `cfg-export triton`, with bls.py beside it; it
imports the runtime copied beside it (never cfg_export, never torch). Each step's stacked
rows go to the `denoiser` model through BLS (Business Logic Scripting): the runtime's
sampler loop runs unchanged (runtime.pipeline.sample_guided) over a Backend whose _infer
is that BLS call, and Triton's dynamic batcher merges the rows of every run in flight
into shared denoiser batches. Each instance of this model (a process of its own) runs one
request at a time.

A request is checked before any step: a bad one gets an error response of one line, and
the instance goes on with the next request. A request whose client has gone away
(Triton marks it cancelled) stops at its next step.
"""
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bls import TritonModel, cancel_check, parameters, read_input, read_json, read_scalar, run_pool  # noqa: E402
from runtime.artifact import Artifact  # noqa: E402  (the runtime copied beside this file)
from runtime.errors import CfgExportError  # noqa: E402
from runtime.guidance import GuidanceOptions  # noqa: E402
from runtime.pipeline import sample_guided  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.max_images = int(params["max_images"])
        self.max_steps = int(params["max_steps"])
        self.artifact = Artifact.open(os.path.join(HERE, "artifact"))
        stage = self.artifact.stage()
        manifest = (stage.engine if params.get("engine") == "1" else stage.onnx).manifest
        self.pool, merger = run_pool(params)
        self.denoiser = TritonModel(manifest, params["denoiser_model"], merger)
        self.denoiser.__enter__()

    def execute(self, requests):
        return self.pool.submit(requests, self._sample, "sampler")

    def _sample(self, request):
        cond = read_input(request, "cond")
        if cond is None or len(cond) == 0:
            raise CfgExportError("cond: got no condition, expected one per image")
        if len(cond) > self.max_images:
            raise CfgExportError(f"cond: got {len(cond)} images, this server takes at most {self.max_images} per "
                                 f"request; send several requests")
        steps = read_scalar(request, "steps", int)
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise CfgExportError(f"steps: got {steps}, expected 1 to {self.max_steps}")
        w = read_input(request, "w")
        negative = read_input(request, "negative")
        if negative is not None and len(negative) not in (1, len(cond)):
            raise CfgExportError(f"negative: got {len(negative)} conditions, expected 1 or one per image ({len(cond)})")
        threshold = read_scalar(request, "threshold", float)
        if threshold is not None and not 0 < threshold <= 1:
            raise CfgExportError(f"threshold: got {threshold}, expected a percentile in (0, 1], e.g. 0.995")
        interval = read_input(request, "interval")
        guidance = GuidanceOptions(
            w_schedule=read_scalar(request, "w_schedule", str) or "constant",
            interval=None if interval is None else tuple(float(v) for v in interval.reshape(-1)),
            negative=negative, threshold=threshold, rescale=read_scalar(request, "guidance_rescale", float))
        result = sample_guided(self.artifact, cond, 0.0 if w is None else w, steps=steps,
                               sampler=read_scalar(request, "sampler", str),
                               spacing=read_scalar(request, "spacing", str), scheduler=read_json(request, "scheduler"),
                               seed=read_scalar(request, "seed", int), eta=read_scalar(request, "eta", float),
                               noise=read_input(request, "noise"), guidance=guidance, backend=self.denoiser,
                               progress=cancel_check(request))
        return [pb_utils.Tensor("samples", result.samples.astype(np.float32))]

    def finalize(self):
        self.denoiser.__exit__(None, None, None)
