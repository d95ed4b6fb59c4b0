"""Triton Python-backend model `sampler` of a pipeline artifact: one request is one
prompt-to-pixels run (Stable Diffusion 1.x/2.x, SDXL: prompts; DiT: class labels or names).

Copied into REPO/sampler/1/model.py by `cfg-export triton`, with bls.py beside it; it
imports the runtime copied beside it (never cfg_export, never torch). The runtime's own
pipeline (runtime.pipeline_sampling.sample_pipeline) runs unchanged: the tokenizers run
here (the `tokenizers` package), and every model stage (text encoders, denoiser, VAE
decoder) is a model of this server, called through BLS, and the rows of every run in
flight share each stage's batches: merged in the sampler process (bls.RowMerger) and
across processes by Triton's dynamic batchers. Each instance (a process of its own) runs
up to `runs` requests at once, one thread each.

A request is checked before any model call where that is cheap (count, steps, w, size);
a bad one gets an error response of one line and the instance goes on with the next.
A request whose client has gone away (Triton marks it cancelled) stops at its next step.
"""
import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from bls import (TritonModel, cancel_check, parameters, read_input, read_json, read_scalar,  # noqa: E402
                 read_texts, run_pool)
from runtime.artifact import Artifact  # noqa: E402  (the runtime copied beside this file)
from runtime.errors import CfgExportError  # noqa: E402
from runtime.guidance import GuidanceOptions, check_w  # noqa: E402
from runtime.pipeline_sampling import check_size, is_text_pipeline, sample_pipeline  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        params = parameters(args)
        self.max_images = int(params["max_images"])
        self.max_steps = int(params["max_steps"])
        self.artifact = Artifact.open(os.path.join(HERE, "artifact"))
        self.text = is_text_pipeline(self.artifact)
        engine = params.get("engine") == "1"
        self.pool, merger = run_pool(params)
        self.models = {}
        for stage, model_name in json.loads(params["stage_models"]).items():
            s = self.artifact.stage(stage)
            manifest = (s.engine if engine and s.engine is not None else s.onnx or s.engine).manifest
            self.models[stage] = TritonModel(manifest, model_name, merger).__enter__()

    def execute(self, requests):
        return self.pool.submit(requests, self._sample, "sampler")

    def _sample(self, request):
        prompts, classes = read_texts(request, "prompt"), read_texts(request, "classes")
        given = prompts if self.text else classes
        if given is not None and len(given) > self.max_images:
            raise CfgExportError(f"{'prompt' if self.text else 'classes'}: got {len(given)} images, this server "
                                 f"takes at most {self.max_images} per request; send several requests")
        steps = read_scalar(request, "steps", int)
        if steps is not None and not 1 <= steps <= self.max_steps:
            raise CfgExportError(f"steps: got {steps}, expected 1 to {self.max_steps}")
        w = read_input(request, "w")
        if w is not None and given:
            check_w(w, len(given))
        height, width = read_scalar(request, "height", int), read_scalar(request, "width", int)
        check_size(self.artifact, height, width)
        threshold = read_scalar(request, "threshold", float)
        interval = read_input(request, "interval")
        guidance = GuidanceOptions(
            w_schedule=read_scalar(request, "w_schedule", str) or "constant",
            interval=None if interval is None else tuple(float(v) for v in interval.reshape(-1)),
            threshold=threshold, rescale=read_scalar(request, "guidance_rescale", float))
        result = sample_pipeline(self.artifact, prompts=prompts, negative_prompts=read_texts(request, "negative_prompt"),
                                 classes=classes, w=0.0 if w is None else w, steps=steps,
                                 sampler=read_scalar(request, "sampler", str),
                                 spacing=read_scalar(request, "spacing", str),
                                 scheduler=read_json(request, "scheduler"), seed=read_scalar(request, "seed", int),
                                 noise=read_input(request, "noise"), height=height, width=width, guidance=guidance,
                                 backend=self.models, progress=cancel_check(request))
        warnings = np.array([message.encode() for message in result.warnings], dtype=object)
        return [pb_utils.Tensor("images", np.ascontiguousarray(result.images, dtype=np.float32)),
                pb_utils.Tensor("latents", np.ascontiguousarray(result.latents, dtype=np.float32)),
                pb_utils.Tensor("warnings", warnings)]

    def finalize(self):
        for model in self.models.values():
            model.__exit__(None, None, None)
