"""cfg-export eval: the guidance trade-off (accuracy, IS analog, Frechet distance against w)."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, ProgressBar, parse_list, say, verbosity_options
from cfg_export.runtime.errors import CfgExportError


@click.command("eval", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path())
@click.option("--w", "ws", default=None, metavar="0,0.1,...", help="Guidance weights (default 0,0.1,0.2,0.3,0.5,1,2,3,4).")
@click.option("--per-class", type=int, default=None, help="Samples per class and w (default 30).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default 50).")
@click.option("--sampler", default=None, help="Sampler (default ddim).")
@click.option("--seed", type=int, default=None, help="Seed of the noise, the same for every w (default 0).")
@click.option("--classifier", metavar="FILE.onnx", default=None,
              help="Classifier with outputs 'logits' and 'features' (default: the digits classifier).")
@click.option("--reference", metavar="FILE.npz", default=None,
              help="Real-data feature 'mean' and 'cov' (default: the real digits').")
@click.option("--json", "json_path", metavar="FILE.json", default=None, help="Write the table as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png", default=None, help="Write the trade-off chart.")
@verbosity_options
def eval_command(directory, ws, per_class, steps, sampler, seed, classifier, reference, json_path, plot_path):
    """The guidance trade-off (the paper's Table 2 shape) on a class-conditional artifact:
    class accuracy, an Inception Score analog and a Frechet distance of classifier
    features against real data, for each w."""
    from cfg_export.evaluation.evaluate import evaluate_guidance, rows_to_dicts
    from cfg_export.evaluation.plots import plot_tradeoff
    from cfg_export.evaluation.report import check_report_paths, write_json

    check_report_paths(json_path, plot_path)
    with ProgressBar("sampling and scoring") as bar:
        rows = evaluate_guidance(directory, parse_list(ws, float, "--w", "0,1,3"), per_class=per_class, steps=steps,
                                 sampler=sampler, seed=seed, classifier=classifier, reference=reference,
                                 progress=bar)
    say(f"{rows[0].samples} samples per w; [95% bootstrap intervals]")
    say(f"{'w':>5}  {'accuracy':<21} {'IS analog':<21} {'Frechet distance':<21} {'rows/img':>8} {'s/img':>7}")
    for r in rows:
        say(f"{r.w:>5g}  {r.accuracy:<21.3f} {r.inception_score:<21.3f} {r.frechet_distance:<21.2f} "
            f"{r.rows_per_image:>8.1f} {r.seconds_per_image:>7.4f}")
    if json_path:
        say(f"wrote {write_json(rows_to_dicts(rows), json_path)}")
    if plot_path:
        say(f"wrote {plot_tradeoff(rows, plot_path)}")
