"""Serving on NVIDIA Triton Inference Server.

A model repository (cfg-export triton) in which one request is one guided sampling run
(the `sampler` model, Python backend) and the rows of every run in flight share the
batches of the `denoiser` model through Triton's dynamic batcher. Scale-out is Triton's:
instances per GPU, replicas behind a load balancer.

    repository  writes the repository: one writer per model (stage), configs, runtime copy
    config      Triton model configs (config.pbtxt) as text, and their check
    server      finds a tritonserver (a user's own, or the nvidia-pytriton wheel's), starts
                and stops it on loopback
    client      one request to a running server, written as an image grid like `sample`
    models/     the Python-backend model files copied into the repository (they import
                the runtime copied beside them, never cfg_export or torch)
"""
