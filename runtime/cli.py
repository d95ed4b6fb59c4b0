"""The command-line layer every verb shares, and the `sample` command.

`python -m runtime sample ...` (runtime/ copied onto a board with numpy, pillow, click
and a backend) and `cfg-export sample ...` are this same click command. Every command
takes -v/-q the same way (before or after the verb), turns CfgExportError and OS errors
into one 'Error: ...' line with exit code 1, and shows progress through ProgressBar,
which implements the library's progress(done, total) protocol. Options left unset are
passed as None: the library signatures own every default.
"""
from __future__ import annotations

import errno
import logging
import sys

import click

from .errors import CfgExportError
from .samplers import SAMPLER_CHOICES

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


# -- errors -------------------------------------------------------------------------------

def os_error_message(exc: OSError) -> str:
    """One line for an OS error: what failed, on which file, and what to do."""
    where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
    if exc.errno == errno.ENOSPC:
        return f"no space left on the device writing{where}: free some space, or write elsewhere (nothing was kept)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"permission denied{where}: choose a writable path"
    return f"{exc.strerror or exc}{where}"


def _one_line_errors(invoke, ctx):
    """Runs a click invoke, turning user errors into one 'Error: ...' line and exit code 1."""
    try:
        return invoke(ctx)
    except CfgExportError as exc:
        raise click.ClickException(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(os_error_message(exc)) from None
    except MemoryError:
        raise click.ClickException("out of memory: ask for fewer images (--n, --batch) at a time") from None


class Command(click.Command):
    """A click command whose user errors end in one 'Error: ...' line and exit code 1."""

    def invoke(self, ctx):
        return _one_line_errors(super().invoke, ctx)


class Group(click.Group):
    """A click group whose commands are Commands (see Command)."""

    command_class = Command

    def invoke(self, ctx):
        return _one_line_errors(super().invoke, ctx)


# -- -v / -q ------------------------------------------------------------------------------

def _state(ctx: click.Context) -> dict:
    return ctx.find_root().ensure_object(dict)


def _configure_logging(state: dict) -> None:
    level = logging.ERROR if state.get("quiet") else (logging.WARNING, logging.INFO, logging.DEBUG)[
        min(state.get("verbose", 0), 2)]
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    root.setLevel(level)


def _set_quiet(ctx, param, value):
    if value:
        _state(ctx)["quiet"] = True
    _configure_logging(_state(ctx))
    return value


def _set_verbose(ctx, param, value):
    if value:
        state = _state(ctx)
        state["verbose"] = max(state.get("verbose", 0), value)
    _configure_logging(_state(ctx))
    return value


def verbosity_options(f):
    """Adds -v/--verbose and -q/--quiet to a command or group (the same meaning everywhere)."""
    f = click.option("-q", "--quiet", is_flag=True, expose_value=False, is_eager=True, callback=_set_quiet,
                     help="Only errors: no progress bar, no summary lines.")(f)
    return click.option("-v", "--verbose", count=True, expose_value=False, is_eager=True, callback=_set_verbose,
                        help="More log output (-vv for debug).")(f)


def quiet() -> bool:
    ctx = click.get_current_context(silent=True)
    return bool(ctx and _state(ctx).get("quiet"))


def say(message: str) -> None:
    """Prints a result line on stdout unless -q was given."""
    if not quiet():
        click.echo(message)


def warn(message: str) -> None:
    """Prints a warning line on stderr (also with -q: it is about the result)."""
    click.echo(f"Warning: {message}", err=True)


class ProgressBar:
    """The library's progress(done, total) as a click progress bar on stderr, drawn from the
    first call (so bad input fails before any bar appears), hidden with -q."""

    def __init__(self, label: str):
        self.label, self.bar, self.done = label, None, 0
        self.hidden = quiet() or not sys.stderr.isatty()  # a log file gets no bar

    def __call__(self, done: int, total: int) -> None:
        if self.hidden:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=max(total, 1), label=self.label, file=sys.stderr)
            self.bar.__enter__()
        self.bar.length = max(total, 1)
        self.bar.update(max(done - self.done, 0))
        self.done = done

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


# -- option parsing -------------------------------------------------------------------------

def parse_list(text: str | None, kind: type, option: str, example: str):
    """Returns the comma-separated values of an option as `kind` (None when not given);
    raises CfgExportError for an empty or malformed list."""
    if text is None:
        return None
    try:
        values = [kind(v.strip()) for v in text.split(",")]
    except ValueError:
        values = []
    if kind is str and any(not v for v in values):
        values = []
    if not values:
        noun = {int: "integers", float: "numbers"}.get(kind, "names")
        raise CfgExportError(f"{option}: got {text!r}, expected {noun} separated by commas, like {example}")
    return values


def parse_fields(items) -> dict:
    """Returns the scheduler config fields of --set FIELD=VALUE options: VALUE read as JSON
    (true, 3, 0.5, null, [0, 2]), else kept as a word (sigma_min)."""
    import json

    fields = {}
    for item in items or ():
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise CfgExportError(f"--set: got {item!r}, expected FIELD=VALUE, like final_sigmas_type=sigma_min")
        try:
            fields[name.strip()] = json.loads(text)
        except ValueError:
            fields[name.strip()] = text.strip()
    return fields


def backend_options(threads, no_spinning, device, cuda_graph, trt_cache, trt_fp16, trt_max_batch):
    """Returns the runtime.backends.BackendOptions of the backend flags (None when none given)."""
    from .backends import BackendOptions

    values = dict(threads=threads, spinning=False if no_spinning else None, device=device,
                  cuda_graph=True if cuda_graph else None, trt_cache=trt_cache, trt_fp16=True if trt_fp16 else None,
                  trt_max_batch=trt_max_batch)
    return BackendOptions(**values) if any(v is not None for v in values.values()) else None


def prompt_options(subject: str):
    """Adds --prompt, --prompts and --negative-prompt, their help starting with `subject`."""
    def add(f):
        f = click.option("--negative-prompt", "negative_prompts", multiple=True, metavar="TEXT",
                         help=f"{subject}: the negative prompt, one for all or one per prompt (repeatable); "
                              f"default the pipeline's null (the empty prompt, or zeros for SDXL).")(f)
        f = click.option("--prompts", "prompts_file", metavar="FILE.txt", default=None,
                         help=f"{subject}: prompts, one per line (blank lines skipped).")(f)
        return click.option("--prompt", "prompts", multiple=True, metavar="TEXT",
                            help=f"{subject}: a prompt, one image each (repeatable).")(f)
    return add


def backend_flags(f):
    """Adds --backend and the options of each backend."""
    from .backends import BACKENDS

    for decorator in reversed([
        click.option("--backend", type=click.Choice(BACKENDS), default=None,
                     help="auto (default): tensorrt for a folder holding only an engine, else onnxruntime-cuda "
                          "when available, else onnxruntime-cpu; tensorrt runs model.engine (cfg-export trt)."),
        click.option("--threads", type=click.IntRange(min=1), default=None,
                     help="ONNX Runtime intra-op threads (default: one per core)."),
        click.option("--no-spinning", is_flag=True, default=False,
                     help="ONNX Runtime: worker threads sleep after a call instead of spinning."),
        click.option("--device", type=click.IntRange(min=0), default=None, help="GPU index (default 0)."),
        click.option("--cuda-graph", is_flag=True, default=False,
                     help="tensorrt: capture and replay a CUDA graph per call shape."),
        click.option("--trt-cache", metavar="DIR", default=None,
                     help="onnxruntime-tensorrt: engine and timing cache folder (default DIR/ort-trt-cache)."),
        click.option("--trt-fp16", is_flag=True, default=False, help="onnxruntime-tensorrt: allow FP16."),
        click.option("--trt-max-batch", type=click.IntRange(min=1), default=None,
                     help="onnxruntime-tensorrt: most images N of its profile (default 16)."),
    ]):
        f = decorator(f)
    return f


# -- sample -----------------------------------------------------------------------------------

@click.command("sample", cls=Command, context_settings=CONTEXT)
@click.argument("artifact", metavar="DIR", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--w", "w", default=None, metavar="W[,W...]",
              help="Guidance weight: one number, one per condition (grid row), or one per image, separated by "
                   "commas (default 0).")
@click.option("--w-schedule", type=click.Choice(["constant", "linear"]), default=None,
              help="How w varies over the steps (default constant; linear: 2w(1 - t/T)).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default 50).")
@click.option("--sampler", default=None,
              help=f"Sampler: {', '.join(SAMPLER_CHOICES)} (default: the scheduler the model shipped with, as its "
                   f"manifest records it, else ddim). Switches it as diffusers' from_config does.")
@click.option("--karras/--no-karras", default=None,
              help="Karras et al. 2022 noise levels (the scheduler's use_karras_sigmas), e.g. DPM++ 2M Karras.")
@click.option("--spacing", default=None,
              help="Timestep spacing (timestep_spacing): leading, trailing, linspace, as the sampler's diffusers "
                   "scheduler reads it.")
@click.option("--steps-offset", type=int, default=None, help="The scheduler's steps_offset (Stable Diffusion: 1).")
@click.option("--set", "fields", multiple=True, metavar="FIELD=VALUE",
              help="Override one scheduler config field, by its diffusers name; VALUE is JSON or a word, e.g. "
                   "--set final_sigmas_type=sigma_min. Repeatable.")
@click.option("--eta", type=float, default=None, help="DDIM eta (default 0: deterministic).")
@click.option("--classes", default=None, metavar="0,1,...",
              help="Class labels, one grid row each (default: every class of the model).")
@click.option("--cond", metavar="FILE.npy", default=None,
              help="Embedding model: the condition, [L, D] float32 for all images or [K, L, D] (K conditions, "
                   "one grid row each).")
@click.option("--n", type=int, default=None, help="Images per class or condition (default 8).")
@click.option("--seed", type=int, default=None, help="Random seed (default 0).")
@click.option("--noise", metavar="FILE.npy", default=None,
              help="Start from this noise [N, *sample shape] instead of drawing it.")
@click.option("--negative", metavar="LABELS|FILE.npy", default=None,
              help="Negative condition in the null rows: class labels (one, or one per class), or for an "
                   "embedding model FILE.npy, [L, D] or [K, L, D] (one per condition).")
@click.option("--interval", default=None, metavar="LO,HI",
              help="Guide only at noise levels sigma in [LO, HI]; other steps run only the conditional rows "
                   "(Kynkaanniemi et al. 2024).")
@click.option("--strategy", default=None, metavar="SPEC",
              help="Run the null rows only where they help: adaptive[:GAMMA] (an image stops its null rows once "
                   "its conditional and null x0 predictions agree, cosine >= GAMMA), cache[:K][@LO..HI] (null "
                   "rows every K-th step inside noise levels LO..HI, the guidance direction reused between), "
                   "or both joined by '+', e.g. adaptive+cache:3 (default: full guidance).")
@click.option("--threshold", type=float, default=None, metavar="P",
              help="The scheduler's dynamic thresholding at percentile P in (0, 1], e.g. 0.995 (Saharia et al. "
                   "2022), up to its sample_max_value (diffusers' default 1.0; --set sample_max_value=V).")
@click.option("--guidance-rescale", type=float, default=None, metavar="PHI",
              help="Rescale the guided output towards the conditional one's standard deviation, phi in [0, 1], "
                   "e.g. 0.7 (Lin et al. 2024; diffusers' guidance_rescale).")
@prompt_options("Pipeline artifact")
@click.option("--height", type=int, default=None, help="Pipeline artifact: image height in pixels (default: "
              "the export's own size).")
@click.option("--width", type=int, default=None, help="Pipeline artifact: image width in pixels.")
@click.option("--latents", "latents_out", metavar="FILE.npy", default=None,
              help="Pipeline artifact: write the final latents [N, C, h, w] float32.")
@backend_flags
@click.option("-o", "--out", metavar="FILE.png", default=None,
              help="Image grid, one row per condition (.png, .jpg, ...: the format follows the extension).")
@click.option("--npy", metavar="FILE.npy", default=None,
              help="Raw samples [N, ...] as float32 (latents, for latent models); for a pipeline artifact the "
                   "decoded images [N, H, W, 3] in [0, 1].")
@verbosity_options
def sample(artifact, w, w_schedule, steps, sampler, karras, spacing, steps_offset, fields, eta, classes, cond, n, seed,
           noise, negative, interval, strategy, threshold, guidance_rescale, prompts, prompts_file, negative_prompts,
           height, width, latents_out, backend, threads, no_spinning, device, cuda_graph, trt_cache, trt_fp16,
           trt_max_batch, out, npy):
    """Guided sampling from an artifact folder DIR made by `cfg-export onnx`.

    Class-conditional models take --classes, embedding models (text-style, e.g. a
    Stable Diffusion UNet) take --cond FILE.npy. Guidance weight w as in Ho & Salimans
    2021: eps = (1 + w) eps_c - w eps_null (diffusers' guidance_scale = 1 + w; w = -1 is
    unconditional). Samples are written as they come out of the sampler (not clipped);
    the image grid clips them to [-1, 1].
    """
    from .artifact import Artifact
    from .grid import sample_grid

    opened = Artifact.open(artifact)
    pipeline_options = {"--prompt": prompts, "--prompts": prompts_file, "--negative-prompt": negative_prompts,
                        "--height": height, "--width": width, "--latents": latents_out}
    if opened.is_pipeline:
        for flag, value in (("--cond", cond), ("--n", n), ("--negative", negative), ("--eta", eta)):
            if value is not None:
                raise CfgExportError(f"{flag}: not an option of a pipeline artifact (use --prompt, "
                                     f"--negative-prompt, --classes)")
        guidance = guidance_options(w_schedule, interval, strategy, threshold, guidance_rescale)
        overrides = scheduler_overrides(fields, karras, steps_offset)
        _sample_pipeline(opened, prompts, prompts_file, negative_prompts, classes, w, steps, sampler, spacing,
                         overrides, seed, noise, height, width, guidance, latents_out, out, npy,
                         backend, backend_options(threads, no_spinning, device, cuda_graph, trt_cache, trt_fp16,
                                                  trt_max_batch))
        return
    given = [flag for flag, value in pipeline_options.items() if value not in (None, ())]
    if given:
        raise CfgExportError(f"{given[0]}: applies to pipeline artifacts (cfg-export onnx PIPELINE_DIR); this one "
                             f"is one denoiser: give --classes or --cond")
    if out is None and npy is None:
        raise CfgExportError("nothing to write: give -o FILE.png and/or --npy FILE.npy")
    embedding = opened.manifest.facts.condition.kind.value == "embedding"
    if negative is not None and not embedding:
        negative = parse_list(negative, int, "--negative", "3")
    guidance = guidance_options(w_schedule, interval, strategy, threshold, guidance_rescale)
    overrides = scheduler_overrides(fields, karras, steps_offset)
    with ProgressBar("sampling") as bar:
        grid = sample_grid(opened, classes=parse_list(classes, int, "--classes", "0,1,2"),
                           cond=cond, negative=negative, n=n,
                           w=parse_list(w, float, "--w", "3 or 1,2,3"), out=out, npy=npy,
                           noise=noise, guidance=guidance,
                           steps=steps, sampler=sampler, spacing=spacing, scheduler=overrides, eta=eta,
                           seed=seed, backend=backend,
                           backend_options=backend_options(threads, no_spinning, device, cuda_graph, trt_cache,
                                                           trt_fp16, trt_max_batch),
                           progress=bar)
    for message in grid.warnings:
        warn(message)
    for path, what in grid.written:
        say(f"wrote {path} ({what})")
    result = grid.result
    steps_done = len(result.step_seconds)
    total = sum(result.step_seconds)
    model = result.model_seconds
    say(f"{steps_done} steps on {result.backend} ({result.sampler}): {1e3 * total / steps_done:.2f} ms/step (model "
        f"{1e3 * model / steps_done:.2f} ms, host {1e3 * (total - model) / steps_done:.2f} ms = "
        f"{100 * result.host_share:.1f}%), total {total:.2f} s, {result.rows / len(result.samples):.1f} model "
        f"rows per image")


def guidance_options(w_schedule, interval, strategy, threshold, guidance_rescale):
    """The GuidanceOptions of --w-schedule, --interval, --strategy, --threshold, --guidance-rescale."""
    from .guidance import GuidanceOptions

    interval_values = parse_list(interval, float, "--interval", "0.3,5")
    if interval_values is not None and len(interval_values) != 2:
        raise CfgExportError(f"--interval: got {interval!r}, expected two noise levels LO,HI")
    guidance = GuidanceOptions(w_schedule=w_schedule or "constant",
                               interval=tuple(interval_values) if interval_values else None, threshold=threshold,
                               rescale=guidance_rescale)
    if strategy is None:
        return guidance
    from .strategies import parse_strategy

    spec = parse_strategy(strategy)
    if spec.interval is not None and interval_values is not None:
        raise CfgExportError(f"--strategy {strategy} holds a guidance interval and --interval gives another; "
                             f"give one of them")
    return spec.apply(guidance)


def scheduler_overrides(fields, karras, steps_offset) -> dict | None:
    """The scheduler config fields --set, --karras and --steps-offset override (None: none)."""
    overrides = parse_fields(fields)
    for name, value in (("use_karras_sigmas", karras), ("steps_offset", steps_offset)):
        if value is not None:
            overrides[name] = value
    return overrides or None


def read_prompts(prompts: tuple[str, ...], prompts_file: str | None) -> list[str] | None:
    """Returns the prompts of --prompt and --prompts FILE (one per line), None when neither is given."""
    if prompts_file is None:
        return list(prompts) if prompts else None
    try:
        lines = open(prompts_file, encoding="utf-8").read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CfgExportError(f"--prompts {prompts_file}: cannot read it as text ({exc})") from None
    found = [line.strip() for line in lines if line.strip()]
    if not found:
        raise CfgExportError(f"--prompts {prompts_file}: holds no prompt; expected one prompt per line")
    return list(prompts) + found


def _sample_pipeline(opened, prompts, prompts_file, negative_prompts, classes, w, steps, sampler, spacing, overrides,
                     seed, noise, height, width, guidance, latents_out, out, npy, backend, options) -> None:
    """`sample` on a pipeline artifact: prompts (or classes) to images."""
    from .grid import read_npy
    from .pipeline_sampling import sample_pipeline_files

    w_values = parse_list(w, float, "--w", "6.5 (or one per image)")
    with ProgressBar("sampling") as bar:
        result = sample_pipeline_files(
            opened, out=out, npy=npy, latents=latents_out, prompts=read_prompts(prompts, prompts_file),
            negative_prompts=list(negative_prompts) or None,
            classes=parse_list(classes, str, "--classes", "207,goldfish"), w=0.0 if w_values is None else w_values[0] if len(w_values) == 1 else w_values,
            steps=steps, sampler=sampler, spacing=spacing, scheduler=overrides, seed=seed,
            noise=read_npy(noise, "--noise") if noise is not None else None, height=height, width=width,
            guidance=guidance, backend=backend, backend_options=options, progress=bar)
    for message in result.warnings:
        warn(message)
    for path, what in result.written:
        say(f"wrote {path} ({what})")
    steps_done = len(result.step_seconds)
    times = ", ".join(f"{stage} {seconds:.3f} s" for stage, seconds in result.stage_seconds.items())
    say(f"{steps_done} steps on {result.backend}: {sum(result.step_seconds):.2f} s; model time per stage: {times}")


@click.group(cls=Group, context_settings=CONTEXT)
@verbosity_options
def main():
    """Torch-free classifier-free-guidance sampling (the runtime of cfg-export)."""


main.add_command(sample)


def run(argv: list[str] | None = None, prog: str = "python -m runtime") -> int:
    """Runs `main` like a console script; returns the exit code."""
    try:
        main.main(args=argv, prog_name=prog, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    return 0
