"""cfg-export bench: per-step latency of guided sampling, side by side."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, ProgressBar, parse_list, say, verbosity_options


@click.command("bench", cls=Command, context_settings=CONTEXT)
@click.argument("directories", nargs=-1, required=True, type=click.Path())
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
@verbosity_options
def bench_command(directories, batches, backends, precisions, modes, steps, warmup, torch_model, json_path, plot_path):
    """Per-step latency (p50/p90/p99), images/s, host share and peak memory of guided
    sampling for each artifact in DIRECTORIES (give a fused or an INT8 artifact too to
    compare), N in --batch, backend and mode, with the ratios between modes.

    \b
    Example: cfg-export bench out/digits out/digits-fused --batch 1,4,16 --torch-model examples/digits/denoiser
    """
    from cfg_export.evaluation.bench import format_table, run_bench
    from cfg_export.evaluation.report import check_report_paths, write_json
    from cfg_export.evaluation.plots import plot_bench

    check_report_paths(json_path, plot_path)
    with ProgressBar("benchmarking") as bar:
        result = run_bench(directories, parse_list(batches, int, "--batch", "1,4,16"),
                           backends=parse_list(backends, str, "--backend", "onnxruntime-cpu"),
                           precisions=parse_list(precisions, str, "--precision", "fp32,int8-qdq"),
                           modes=parse_list(modes, str, "--mode", "stacked,two-pass"), steps=steps, warmup=warmup,
                           torch_model=torch_model, progress=bar)
    say(format_table(result))
    if json_path:
        say(f"wrote {write_json(result.to_dict(), json_path)}")
    if plot_path:
        say(f"wrote {plot_bench(result, plot_path)}")
