"""cfg-export triton / serve / request: a Triton model repository, a server on loopback, a client."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, parse_list, prompt_options, say, verbosity_options
from cfg_export.runtime.errors import CfgExportError
from cfg_export.serving.options import PLATFORMS


def repository_flags(f):
    """Adds the options of the repository (RepositoryOptions) shared by `triton` and `serve`."""
    from cfg_export.runtime.backends import BACKENDS

    for decorator in reversed([
        click.option("--platform", type=click.Choice(PLATFORMS), default=None,
                     help="The denoiser model: python (default; the runtime's ONNX Runtime backend in a Python "
                          "model, what runs without Triton's own backends), onnxruntime_onnx, or tensorrt_plan "
                          "(the artifact's engine)."),
        click.option("--backend", type=click.Choice(BACKENDS), default=None,
                     help="python platform: the runtime backend the denoiser opens (default auto)."),
        click.option("--threads", type=int, default=None,
                     help="python platform: ONNX Runtime threads (default: one per core)."),
        click.option("--spinning/--no-spinning", default=None,
                     help="python platform: ONNX Runtime threads of every model spin after a call (a little faster "
                          "under light load), or of none (default; faster under many clients)."),
        click.option("--max-images", type=int, default=None, help="Images per request (default 16)."),
        click.option("--max-steps", type=int, default=None, help="Steps per request (default: the model's T)."),
        click.option("--max-rows", type=int, default=None,
                     help="Rows of one merged denoiser batch (default 64; tensorrt_plan: the largest profile)."),
        click.option("--queue-delay-us", type=int, default=None,
                     help="How long the batcher waits for more rows, in microseconds (default 100)."),
        click.option("--sampler-instances", type=int, default=None, help="Sampler processes (default 2)."),
        click.option("--runs-per-sampler", type=int, default=None,
                     help="Sampling runs in flight in each sampler process, one thread each; their rows merge before "
                          "they leave the process (default 8)."),
        click.option("--denoiser-instances", type=int, default=None, help="Denoiser model instances (default 1)."),
        click.option("--max-queue", type=int, default=None,
                     help="Requests waiting for a sampler instance; more are refused at once (default 64)."),
        click.option("--no-row-batching", is_flag=True, default=False,
                     help="Do not merge the rows of different requests (one model call per request and step)."),
    ]):
        f = decorator(f)
    return f


def repository_options(platform, backend, threads, spinning, max_images, max_steps, max_rows, queue_delay_us,
                       sampler_instances, runs_per_sampler, denoiser_instances, max_queue, no_row_batching):
    from cfg_export.serving.options import RepositoryOptions

    return RepositoryOptions(platform=platform, backend=backend, threads=threads, spinning=spinning,
                             max_images=max_images,
                             max_steps=max_steps, max_rows=max_rows, queue_delay_us=queue_delay_us,
                             sampler_instances=sampler_instances, runs_per_sampler=runs_per_sampler,
                             denoiser_instances=denoiser_instances,
                             max_queue=max_queue, row_batching=False if no_row_batching else None)


@click.command("triton", cls=Command, context_settings=CONTEXT)
@click.argument("artifact", metavar="DIR", type=click.Path())
@click.option("-o", "--out", metavar="REPO", required=True, type=click.Path(), help="Model repository folder.")
@click.option("--overwrite", is_flag=True, help="Replace REPO if it exists.")
@repository_flags
@verbosity_options
def triton_command(artifact, out, overwrite, **flags):
    """A Triton Inference Server model repository for the artifact DIR: `sampler` (one
    request = one guided sampling run, Python backend) and `denoiser` (the stacked model,
    whose rows from all requests in flight share batches through Triton's dynamic batcher).

    \b
    Example: cfg-export triton out/digits -o out/digits-triton
             tritonserver --model-repository out/digits-triton
    """
    from cfg_export.serving.repository import write_repository

    repository = write_repository(artifact, out, repository_options(**flags), overwrite=overwrite)
    options = repository.options
    say(f"wrote {repository.directory} (models {', '.join(repository.models)}; denoiser {options.platform}, "
        f"up to {options.max_rows} rows per batch{'' if options.row_batching else ', no row batching'}; "
        f"{options.sampler_instances} sampler instances x {options.runs_per_sampler} runs)")


WATCH_INTERVAL_S = 1.0  # how often serve checks that every model process is alive


def watch(server) -> int:
    """Waits for the server to exit and returns its exit code. A model process that dies
    (Triton's Python backend leaves the requests routed to it waiting forever) restarts
    the server on the same ports, with one line on stderr; the requests in flight fail."""
    import subprocess

    while True:
        try:
            return server.process.wait(timeout=WATCH_INTERVAL_S)
        except subprocess.TimeoutExpired:
            pass
        dead = server.dead_models()
        if dead:
            click.echo(f"error: the model process of {', '.join(dead)} died; restarting tritonserver (the requests in "
                       f"flight fail, clients may resend them)", err=True)
            server.restart()
            say(f"serving again at http://{server.url}")


@click.command("serve", cls=Command, context_settings=CONTEXT)
@click.argument("artifact", metavar="DIR", type=click.Path())
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="HTTP port on 127.0.0.1 (default 8000).")
@click.option("--grpc-port", type=click.IntRange(1, 65535), default=None, help="gRPC port on 127.0.0.1 (default 8001).")
@click.option("--metrics-port", type=click.IntRange(1, 65535), default=None, help="Prometheus metrics port on 127.0.0.1 (default 8002).")
@click.option("--repository", metavar="REPO", default=None, type=click.Path(),
              help="Write the repository here and keep it (default: a temporary folder).")
@click.option("--overwrite", is_flag=True, help="Replace REPO if it exists.")
@click.option("--log", "log_path", metavar="FILE", default=None, type=click.Path(dir_okay=False),
              help="The server's log (default: a temporary file).")
@repository_flags
@verbosity_options
def serve_command(artifact, port, grpc_port, metrics_port, repository, overwrite, log_path, **flags):
    """Serve the artifact DIR on 127.0.0.1 with Triton until Ctrl-C: the repository of
    `cfg-export triton`, and a tritonserver (one on PATH, else the nvidia-pytriton wheel's:
    pip install 'cfg-export[serve]'). A model process that dies restarts the server on the
    same ports (the requests in flight fail).

    \b
    Example: cfg-export serve out/digits --port 8000
             cfg-export request 127.0.0.1:8000 --classes 3 --w 3 -o three.png
    """
    import signal

    from cfg_export.serving.server import serve_artifact

    from cfg_export.serving.server import DEFAULT_GRPC_PORT, DEFAULT_METRICS_PORT, DEFAULT_PORT

    endpoints = [("--port", DEFAULT_PORT if port is None else port),
                 ("--grpc-port", DEFAULT_GRPC_PORT if grpc_port is None else grpc_port),
                 ("--metrics-port", DEFAULT_METRICS_PORT if metrics_port is None else metrics_port)]
    ports = [value for _, value in endpoints]
    if len(set(ports)) != len(ports):
        raise CfgExportError(f"{', '.join(f'{flag} {value}' for flag, value in endpoints)}: two endpoints on one "
                             f"port; give each its own")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops the server as Ctrl-C does
    server = serve_artifact(artifact, repository, repository_options(**flags), port=port, grpc_port=grpc_port,
                            metrics_port=metrics_port, log_path=log_path, overwrite=overwrite)
    try:
        say(f"serving {artifact} at http://{server.url} (gRPC {server.grpc_url}, metrics {server.metrics_url}); "
            f"tritonserver from {server.binary.origin}; Ctrl-C stops it")
        code = watch(server)
        if code:
            raise CfgExportError(f"tritonserver stopped with exit code {code}")
    except KeyboardInterrupt:
        say("stopping")
    finally:
        server.stop()


@click.command("request", cls=Command, context_settings=CONTEXT)
@click.argument("url", metavar="URL")
@prompt_options("Pipeline server")
@click.option("--classes", default=None, metavar="0,1,...",
              help="Class labels, one grid row each (default: every class of the model); a DiT pipeline server "
                   "also takes class names, one image each.")
@click.option("--cond", metavar="FILE.npy", default=None,
              help="Embedding model: the condition, [L, D] or [K, L, D] (one grid row each).")
@click.option("--n", type=int, default=None, help="Images per class or condition (default 8; one-denoiser server).")
@click.option("--w", "w", default=None, metavar="W[,W...]",
              help="Guidance weight: one number, one per condition, or one per image (default 0).")
@click.option("--w-schedule", type=click.Choice(["constant", "linear"]), default=None,
              help="How w varies over the steps (default constant).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default 50).")
@click.option("--sampler", default=None, help="Sampler (default: the scheduler the model shipped with, else ddim).")
@click.option("--karras/--no-karras", default=None, help="Karras et al. 2022 noise levels (use_karras_sigmas).")
@click.option("--spacing", default=None, help="Timestep spacing: leading, trailing, linspace.")
@click.option("--steps-offset", type=int, default=None, help="The scheduler's steps_offset.")
@click.option("--set", "fields", multiple=True, metavar="FIELD=VALUE",
              help="Override one scheduler config field, by its diffusers name (repeatable).")
@click.option("--eta", type=float, default=None, help="DDIM eta (default 0; one-denoiser server).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--noise", metavar="FILE.npy", default=None, help="Start from this noise instead of drawing it.")
@click.option("--negative", metavar="LABELS|FILE.npy", default=None,
              help="One-denoiser server: negative condition in the null rows: class labels, or FILE.npy for an "
                   "embedding model.")
@click.option("--interval", default=None, metavar="LO,HI", help="Guide only at noise levels sigma in [LO, HI].")
@click.option("--threshold", type=float, default=None, metavar="P", help="Dynamic thresholding percentile.")
@click.option("--guidance-rescale", type=float, default=None, metavar="PHI",
              help="Rescale the guided output towards the conditional one's std, phi in [0, 1].")
@click.option("--height", type=int, default=None, help="Pipeline server: image height in pixels (default: the "
              "export's own size).")
@click.option("--width", type=int, default=None, help="Pipeline server: image width in pixels.")
@click.option("--timeout", type=float, default=None, help="Seconds to wait for the images (default 600).")
@click.option("-o", "--out", metavar="FILE.png", default=None, help="Image grid, one row per condition.")
@click.option("--npy", metavar="FILE.npy", default=None,
              help="Raw samples [N, ...] as float32; from a pipeline server the decoded images [N, H, W, 3] in [0, 1].")
@click.option("--latents", metavar="FILE.npy", default=None,
              help="Pipeline server: the final latents [N, C, h, w] float32.")
@verbosity_options
def request_command(url, prompts, prompts_file, negative_prompts, classes, cond, n, w, w_schedule, steps, sampler,
                    karras, spacing, steps_offset, fields, eta, seed, noise, negative, interval, threshold,
                    guidance_rescale, height, width, timeout, out, npy, latents):
    """Ask a server at URL (host:port, from cfg-export serve) for images: the options and
    the images are those of `cfg-export sample` on the same artifact (a pipeline's:
    --prompt, or --classes for DiT).

    \b
    Example: cfg-export request 127.0.0.1:8000 --classes 3 --w 3 -o three.png
             cfg-export request 127.0.0.1:8000 --prompt "a red car" --w 6.5 --steps 20 -o car.png
    """
    from cfg_export.runtime.cli import read_prompts, scheduler_overrides, warn
    from cfg_export.serving.client import send_request

    interval_values = parse_list(interval, float, "--interval", "0.3,5")
    if interval_values is not None and len(interval_values) != 2:
        raise CfgExportError(f"--interval: got {interval!r}, expected two noise levels LO,HI")
    if negative is not None and not negative.endswith(".npy"):
        negative = parse_list(negative, int, "--negative", "3")
    result = send_request(url, prompts=read_prompts(prompts, prompts_file),
                          negative_prompts=list(negative_prompts) or None,
                          classes=parse_list(classes, str, "--classes", "0,1,2"), cond=cond, negative=negative, n=n,
                          w=parse_list(w, float, "--w", "3 or 1,2,3"), steps=steps, sampler=sampler, spacing=spacing,
                          scheduler=scheduler_overrides(fields, karras, steps_offset), eta=eta, seed=seed,
                          noise=noise, w_schedule=w_schedule,
                          interval=tuple(interval_values) if interval_values else None, threshold=threshold,
                          guidance_rescale=guidance_rescale, height=height, width=width, out=out, npy=npy,
                          latents=latents, timeout=timeout)
    for message in result.warnings:
        warn(message)
    for path, what in result.written:
        say(f"wrote {path} ({what})")
    say(f"{len(result.samples)} image{'s' * (len(result.samples) != 1)} in {result.seconds:.2f} s")
