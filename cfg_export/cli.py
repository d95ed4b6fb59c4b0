"""The `cfg-export` command: a thin click layer over the library.

Each command parses options, calls one public function and prints what it returns.
Options left unset are passed as None so that the library owns every default.
Heavy modules (torch, onnx, onnxruntime) are imported inside the commands.
"""
from __future__ import annotations

import logging

import click

from cfg_export import __version__
from cfg_export.runtime.errors import CfgExportError


class _Group(click.Group):
    """Turns CfgExportError into one 'Error: ...' line and exit code 1."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except CfgExportError as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cfg-export")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only errors.")
def main(verbose: int, quiet: bool) -> None:
    """Classifier-free-guidance diffusion models from PyTorch to ONNX Runtime and TensorRT.

    \b
    Guidance weight w follows Ho & Salimans 2021 (eq. 6):
        eps = (1 + w) * eps(z, c) - w * eps(z, null)
    diffusers' guidance_scale s is 1 + w.
    """
    click.get_current_context().obj = {"quiet": quiet}
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def say(message: str) -> None:
    """Prints a result line unless -q was given."""
    if not click.get_current_context().find_root().obj.get("quiet"):
        click.echo(message)


@main.command("onnx")
@click.argument("model")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Artifact folder to write (model.onnx + manifest.json).")
@click.option("--fuse-guidance", is_flag=True,
              help="Fused layout: inputs sample/timestep/cond/w [N]; stacking and the w mix in the graph.")
@click.option("--batch", type=click.IntRange(min=1), default=None,
              help="Static graph for N images (2N rows when stacked). Default: dynamic batch.")
@click.option("--opset", type=click.IntRange(min=7), default=None, help="ONNX opset (default 17, parsed by TensorRT 10).")
@click.option("--no-check", is_flag=True, help="Skip onnx.checker and the ONNX Runtime vs PyTorch comparison.")
@click.option("--tolerance", type=float, default=None, help="Max relative error of the check (default 1e-4).")
@click.option("--overwrite", is_flag=True, help="Replace an existing artifact folder.")
@click.option("--null-class", type=click.IntRange(min=0), default=None,
              help="diffusers class-conditional model: the null class index (default: the last row of the "
                   "class embedding table; num_classes for DiT).")
@click.option("--null-embedding", metavar="FILE.npy", default=None,
              help="diffusers UNet2DConditionModel: the null condition [L, D] (for Stable Diffusion, the empty "
                   "prompt's encoding); stored in the artifact.")
def onnx_command(model, out_dir, fuse_guidance, batch, opset, no_check, tolerance, overwrite, null_class,
                 null_embedding):
    """Export MODEL (a model folder with config.json, a folder saved by diffusers'
    save_pretrained, or 'module:factory') to ONNX.

    \b
    diffusers folders: UNet2DModel and DiTTransformer2DModel (class labels),
    UNet2DConditionModel (embeddings [L, D], needs --null-embedding); a pipeline
    folder with unet/ or transformer/; the scheduler/ folder beside the model gives
    the training schedule and prediction type.

    \b
    Stacked layout (default): one graph computes the conditional and the null
    passes together: sample [2N, ...], timestep [2N], cond [2N] -> eps [2N, ...],
    first N rows conditional, last N null.
    """
    from cfg_export.export import export_onnx

    result = export_onnx(model, out_dir, layout="fused" if fuse_guidance else "stacked", batch=batch,
                         opset=opset, check=not no_check, tolerance=tolerance, overwrite=overwrite,
                         null_class=null_class, null_embedding=null_embedding)
    for note in result.notes:
        say(f"note: {note}")
    for c in result.checks:
        say(f"check N={c.batch}: ONNX Runtime vs PyTorch max abs error {c.max_abs:.3e}, "
            f"max relative error {c.max_rel:.3e}")
    m = result.manifest
    say(f"wrote {result.directory / m.model_file} and manifest.json ({m.layout.value} layout, "
        f"opset {m.opset}, {'batch N=' + str(m.batch) if m.batch else 'dynamic batch'}) "
        f"in {result.seconds:.1f} s")


@main.command("trt")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Folder for model.engine and engine.json (default: DIR).")
@click.option("--fp16", is_flag=True, help="FP16 (TensorRT 10: builder flag; 11: an FP16-typed ONNX made here).")
@click.option("--int8", is_flag=True, help="INT8 from --int8-onnx (Q/DQ) or --calibration-data (TensorRT 10 only).")
@click.option("--int8-onnx", metavar="MODEL.onnx", default=None, help="Q/DQ model from cfg-export calibrate.")
@click.option("--calibration-data", metavar="FILE.npz", default=None,
              help="Recorded inputs (one array per input, rows first) for TensorRT 10's implicit calibrator.")
@click.option("--keep-fp32", multiple=True, metavar="PATTERN",
              help="With --fp16: keep matching nodes in FP32 (repeatable): @norm, @embedding, @first-conv, "
                   "@last-conv, an op type, or a node-name glob; 'default' adds the default list "
                   "(@norm Softmax @embedding @first-conv @last-conv), 'none' keeps nothing.")
@click.option("--strongly-typed", is_flag=True, default=None,
              help="On TensorRT 10 too, take FP16 from an FP16-typed ONNX (always so on 11).")
@click.option("--min-batch", type=int, default=None, help="Profile: fewest images N (default 1).")
@click.option("--opt-batch", type=int, default=None, help="Profile: images N to tune for (default 4).")
@click.option("--max-batch", type=int, default=None, help="Profile: most images N (default 16).")
@click.option("--interval-profile", is_flag=True, help="A second profile of N rows, for the unguided steps "
              "outside a guidance interval (stacked layout).")
@click.option("--workspace", "workspace_mib", type=int, default=None, help="Workspace limit in MiB.")
@click.option("--opt-level", "optimization_level", type=int, default=None,
              help="Builder optimization level 0..5 (TensorRT's default 3).")
@click.option("--timing-cache", metavar="FILE", default=None, help="Timing cache to read and update.")
@click.option("--dla-core", type=int, default=None, help="Jetson: build for this DLA core (GPU fallback on).")
@click.option("--no-gpu-fallback", is_flag=True, help="With --dla-core: fail on layers the DLA cannot run.")
@click.option("--hardware-compat", type=click.Choice(["none", "ampere+", "same-cc"]), default=None,
              help="Engine for other GPUs too: ampere+ (compute capability >= 8.0) or same-cc.")
@click.option("--version-compatible", is_flag=True, help="Engine for later TensorRT versions too.")
@click.option("--print-trtexec", is_flag=True, help="Print the equivalent trtexec command instead (no TensorRT "
              "needed); on the strongly typed route it writes the FP16-typed ONNX it reads.")
@click.option("--trt-version", default=None, help="With --print-trtexec: the device's TensorRT version "
              "(default: the installed one, else 10).")
def trt_command(directory, out_dir, print_trtexec, trt_version, no_gpu_fallback, keep_fp32, **options):
    """Build a TensorRT engine from the artifact DIR (made by cfg-export onnx).

    \b
    Profiles are in images N: the engine's batch is 2N rows for the stacked
    layout, N for the fused one. Writes model.engine and engine.json (TensorRT
    version, GPU, compute capability, profiles, precision, source ONNX sha256).
    """
    from cfg_export.engine_build import build_engine, prepare_trtexec
    from cfg_export.engine_plan import EngineOptions, format_command

    engine_options = EngineOptions(keep_fp32=keep_fp32 or None, gpu_fallback=False if no_gpu_fallback else None,
                                   **options)
    if print_trtexec:
        result = prepare_trtexec(directory, out_dir, trt_version, engine_options)
        if result.fp16 is not None:
            click.echo(f"# wrote {result.plan.fp16_onnx_path} ({len(result.fp16.kept)} nodes kept in FP32)")
        assumed = " (assumed: none installed; choose with --trt-version)" if result.assumed else ""
        click.echo(f"# TensorRT {result.plan.route.version}{assumed}: {result.plan.route.name}")
        click.echo(format_command(result.argv))
        return
    if trt_version is not None:
        raise CfgExportError(f"--trt-version {trt_version}: applies to --print-trtexec; a build uses the "
                             f"installed TensorRT")
    result = build_engine(directory, out_dir, engine_options)
    for note in result.notes:
        say(f"note: {note}")
    engine, plan = result.manifest.engine, result.plan
    rows = ", ".join(f"{p.rows[0]}..{p.rows[2]} (opt {p.rows[1]})" for p in plan.profiles) or "static"
    say(f"wrote {plan.engine_path} and {plan.manifest_path.name} ({plan.route.name}, TensorRT {engine['tensorrt']} "
        f"on {engine['gpu']}, compute capability {engine['compute_capability']}, rows {rows}) "
        f"in {result.seconds:.1f} s")


@main.command("sample", context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
              add_help_option=False)
@click.pass_context
def sample_command(ctx):
    """Guided sampling from an artifact (same as `python -m runtime sample`; --help for options)."""
    from cfg_export.runtime.cli import main as runtime_main

    ctx.exit(runtime_main(["sample", *ctx.args], prog="cfg-export"))


class _ProgressBar:
    """A click progress bar on stderr, opened at the first update (so bad input fails
    before any bar is drawn), hidden with -q; update(done, total) is the library's callback."""

    def __init__(self, label: str):
        self.label, self.bar, self.done = label, None, 0
        self.hidden = bool(click.get_current_context().find_root().obj.get("quiet"))

    def update(self, done: int, total: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=click.get_text_stream("stderr"),
                                         hidden=self.hidden).__enter__()
        self.bar.length = total
        self.bar.update(done - self.done)
        self.done = done

    def __enter__(self) -> "_ProgressBar":
        return self

    def __exit__(self, *exc_info) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc_info)


@main.command("calibrate")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("-o", "--out", "out_path", required=True, metavar="CALIB.npz", help="Calibration file to write.")
@click.option("--sampler", default=None, help="Sampler of the recorded trajectories (default ddim).")
@click.option("--steps", type=int, default=None, help="Sampler steps (default 50).")
@click.option("--w", type=float, default=None, help="Guidance weight of the trajectories (default 3).")
@click.option("--classes", default=None, metavar="0,1,...", help="Class labels (default: every class).")
@click.option("--n", type=int, default=None, help="Images per class (default 2).")
@click.option("--seed", type=int, default=None, help="Seed of the initial noise (default 0).")
@click.option("--record-steps", type=int, default=None, metavar="K",
              help="Record K steps spread evenly over the trajectory, first and last included (default: all).")
def calibrate_command(directory, out_path, sampler, steps, w, classes, n, seed, record_steps):
    """Record INT8 calibration data: run the FP32 artifact DIR through the guided sampler
    and keep the exact stacked inputs of the model (sample, timestep, cond; conditional
    and null halves) at steps spread over the whole trajectory.

    \b
    The file holds one array per model input, rows first ([K * 2N, ...]), and a manifest
    (source model sha256, sampler, steps, w, seed, recorded steps): it is refused for
    any other model. Use it with cfg-export quantize, or cfg-export trt --calibration-data.
    """
    from cfg_export.calibration.record import record_calibration
    from cfg_export.runtime.pipeline import DEFAULT_STEPS

    try:
        labels = [int(v) for v in classes.split(",")] if classes else None
    except ValueError:
        raise CfgExportError(f"--classes: got {classes!r}, expected integers separated by commas") from None
    with _ProgressBar("recording") as bar:
        result = record_calibration(directory, out_path, classes=labels, n=n, w=w, steps=steps, sampler=sampler,
                                    seed=seed, record_steps=record_steps,
                                    callback=lambda i, t, x: bar.update(i + 1, steps or DEFAULT_STEPS))
    m = result.manifest
    say(f"wrote {result.path}: {len(m.rows)} of {m.steps} {m.sampler} steps (t={m.recorded_timesteps[0]}.."
        f"{m.recorded_timesteps[-1]}) x {m.rows[0]} rows ({m.images} images, w={m.w:g}, seed {m.seed}) "
        f"in {result.seconds:.1f} s")


@main.command("quantize")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--calib", required=True, metavar="CALIB.npz", help="Calibration file from cfg-export calibrate.")
@click.option("-o", "--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Folder of the INT8 artifact to write (model.onnx with Q/DQ nodes + manifest.json).")
@click.option("--method", default=None, metavar="NAME",
              help="Activation calibration: minmax, entropy or percentile (default percentile).")
@click.option("--keep-fp32", multiple=True, metavar="PATTERN",
              help="Leave matching nodes in float (repeatable): @norm, @embedding, @first-conv, @last-conv, "
                   "@full-res (convolutions at the sample's resolution), an op type, or a node-name glob; "
                   "'default' adds the default list (@norm @embedding @first-conv @last-conv Softmax).")
@click.option("--quantize-all", is_flag=True, help="Leave no node in float (every Conv/Gemm/MatMul in INT8).")
@click.option("--per-tensor", is_flag=True, help="One weight scale per tensor instead of per output channel.")
@click.option("--reduce-range", is_flag=True, help="7-bit weights (x86 CPUs without VNNI; ONNX Runtime only).")
@click.option("--activation-type", default=None, metavar="int8|uint8",
              help="int8: symmetric, for TensorRT and ONNX Runtime (default); uint8: asymmetric, ONNX Runtime only.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--report", is_flag=True, help="Measure and print the quality report against the FP32 model.")
@click.option("--classifier", metavar="FILE.onnx", default=None,
              help="With --report: score both sample sets with this classifier (samples in, logits out).")
@click.option("--report-n", type=int, default=None, help="With --report: images per class (default 4).")
@click.option("--report-steps", type=int, default=None, help="With --report: sampler steps (default 50).")
def quantize_command(directory, calib, out_dir, method, keep_fp32, quantize_all, per_tensor, reduce_range,
                     activation_type, overwrite, report, classifier, report_n, report_steps):
    """Quantize the FP32 artifact DIR to INT8 (explicit Q/DQ, ONNX Runtime's quantization
    tools) with activation ranges from CALIB.npz; write a new artifact to OUT that ONNX
    Runtime runs on the CPU and TensorRT builds as INT8:
    cfg-export trt DIR --int8 --int8-onnx OUT/model.onnx.
    """
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact

    if quantize_all and keep_fp32:
        raise CfgExportError("--quantize-all and --keep-fp32: give one of the two")
    if not report and (classifier or report_n or report_steps):
        raise CfgExportError("--classifier, --report-n and --report-steps apply with --report: add it")
    options = QuantizeOptions(method=method, keep_fp32=() if quantize_all else (keep_fp32 or None),
                              per_channel=False if per_tensor else None, reduce_range=reduce_range or None,
                              activation_type=activation_type)
    with _ProgressBar("calibrating") as bar:
        result = quantize_artifact(directory, calib, out_dir, options, overwrite=overwrite, progress=bar.update)
    for note in result.notes:
        say(f"note: {note}")
    q = result.manifest.producer["quantization"]
    say(f"wrote {result.directory / result.manifest.model_file} and manifest.json ({result.manifest.precision}: "
        f"{len(result.quantized)} layers in INT8, {len(result.kept)} nodes left in float; {q['method']} ranges from "
        f"{q['calibration_steps']} recorded steps) in {result.seconds:.1f} s")
    if report:
        from cfg_export.calibration.report import measure_quality
        from cfg_export.runtime.pipeline import DEFAULT_STEPS

        total = report_steps or DEFAULT_STEPS
        with _ProgressBar("measuring") as bar:
            quality = measure_quality(directory, out_dir, n=report_n, steps=report_steps, classifier=classifier,
                                      callback=lambda i, t, x: bar.update(i + 1, total))
        for line in quality.lines():
            say(line)


def _write_json(data, path: str) -> None:
    import json

    from cfg_export.runtime.files import staged_file

    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    say(f"wrote {path}")


@main.command("bench")
@click.argument("directories", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--batch", "batches", default=None, metavar="1,4,16", help="Image counts N (default 1,4,16).")
@click.option("--backend", "backends", default=None, metavar="NAME,...",
              help="Backends (default: every one available here).")
@click.option("--precision", "precisions", default=None, metavar="fp32,int8-qdq,...",
              help="Only artifacts of these precisions (default: all given).")
@click.option("--mode", "modes", default=None, metavar="MODE,...",
              help="stacked, two-pass, unguided, fused, torch (default: all that apply).")
@click.option("--steps", type=int, default=None, help="Timed steps per configuration (default 20).")
@click.option("--warmup", type=int, default=None, help="Untimed steps first (default 3).")
@click.option("--torch-model", metavar="MODEL", default=None,
              help="Also time MODEL (model folder or module:factory) in eager PyTorch, diffusers-style loop.")
@click.option("--json", "json_path", metavar="FILE.json", default=None, help="Write the results as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png", default=None, help="Write a chart of step time against N.")
def bench_command(directories, batches, backends, precisions, modes, steps, warmup, torch_model, json_path, plot_path):
    """Per-step latency (p50/p90/p99), images/s, host share and peak memory of guided
    sampling for each artifact in DIRECTORIES (give a fused or an INT8 artifact too to
    compare), N in --batch, backend and mode, with the ratios between modes.

    \b
    Example: cfg-export bench out/digits out/digits-fused --batch 1,4,16 --torch-model examples/digits/denoiser
    """
    from cfg_export.bench import format_table, parse_batches, run_bench
    from cfg_export.plots import plot_bench

    split = lambda text: [v.strip() for v in text.split(",") if v.strip()] if text else None
    result = run_bench(directories, parse_batches(batches) if batches else None, backends=split(backends),
                       precisions=split(precisions), modes=split(modes), steps=steps, warmup=warmup,
                       torch_model=torch_model, progress=lambda line: click.echo(line, err=True))
    say(format_table(result))
    if json_path:
        _write_json(result.to_dict(), json_path)
    if plot_path:
        say(f"wrote {plot_bench(result, plot_path)}")


@main.command("eval")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--w", "ws", default=None, metavar="0,0.1,...", help="Guidance weights (default 0,0.1,0.2,0.3,0.5,1,2,3,4).")
@click.option("--per-class", type=int, default=None, help="Samples per class and w (default 30).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default 50).")
@click.option("--sampler", default=None, help="Sampler (default ddim).")
@click.option("--seed", type=int, default=0, help="Seed of the noise, the same for every w.")
@click.option("--classifier", metavar="FILE.onnx", default=None,
              help="Classifier with outputs 'logits' and 'features' (default: the digits classifier).")
@click.option("--reference", metavar="FILE.npz", default=None,
              help="Real-data feature 'mean' and 'cov' (default: the real digits').")
@click.option("--json", "json_path", metavar="FILE.json", default=None, help="Write the table as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png", default=None, help="Write the trade-off chart.")
def eval_command(directory, ws, per_class, steps, sampler, seed, classifier, reference, json_path, plot_path):
    """The guidance trade-off (the paper's Table 2 shape) on a class-conditional artifact:
    class accuracy, an Inception Score analog and a Frechet distance of classifier
    features against real data, for each w."""
    from cfg_export.evaluate import evaluate_guidance, rows_to_dicts
    from cfg_export.plots import plot_tradeoff

    try:
        weights = [float(v) for v in ws.split(",")] if ws else None
    except ValueError:
        raise CfgExportError(f"--w: got {ws!r}, expected numbers separated by commas") from None
    with click.progressbar(length=100, label="sampling and scoring", file=None) as bar:
        done = [0]

        def progress(fraction):
            bar.update(int(100 * fraction) - done[0])
            done[0] = int(100 * fraction)
        rows = evaluate_guidance(directory, weights, per_class=per_class, steps=steps, sampler=sampler, seed=seed,
                                 classifier=classifier, reference=reference, progress=progress)
    say(f"{'w':>5} {'accuracy':>9} {'IS analog':>10} {'Frechet':>9}  ({rows[0].samples} samples per w)")
    for r in rows:
        say(f"{r.w:>5g} {r.accuracy:>9.3f} {r.inception_score:>10.3f} {r.frechet_distance:>9.2f}")
    if json_path:
        _write_json(rows_to_dicts(rows), json_path)
    if plot_path:
        say(f"wrote {plot_tradeoff(rows, plot_path)}")
