"""cfg-export eval: the guidance trade-off (accuracy, IS analog, Frechet distance against w),
and what each guidance strategy costs (model rows, time) and gives at each w."""
from __future__ import annotations

import click

from cfg_export.runtime.cli import CONTEXT, Command, ProgressBar, parse_list, say, verbosity_options
from cfg_export.runtime.files import check_output_file
from cfg_export.runtime.strategies import SPELLING


def _ratio(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


@click.command("eval", cls=Command, context_settings=CONTEXT)
@click.argument("directory", type=click.Path())
@click.option("--w", "ws", default=None, metavar="0,0.1,...", help="Guidance weights (default 0,0.1,0.2,0.3,0.5,1,2,3,4).")
@click.option("--strategy", "strategies", default=None, metavar="full,adaptive,...",
              help=f"Guidance strategies to run at every w, separated by commas (default full): {SPELLING}; "
                   f"e.g. full,adaptive:0.99,cache:3,interval:0.3..5.")
@click.option("--per-class", type=int, default=None, help="Samples per class, w and strategy (default 30).")
@click.option("--steps", type=int, default=None, help="Sampling steps (default 50).")
@click.option("--sampler", default=None, help="Sampler (default ddim).")
@click.option("--seed", type=int, default=None, help="Seed of the noise, the same for every w (default 0).")
@click.option("--classifier", metavar="FILE.onnx", default=None,
              help="Classifier with outputs 'logits' and 'features' (default: the digits classifier).")
@click.option("--reference", metavar="FILE.npz", default=None,
              help="Real-data feature 'mean' and 'cov' (default: the real digits').")
@click.option("--json", "json_path", metavar="FILE.json", default=None, help="Write the table as JSON.")
@click.option("--plot", "plot_path", metavar="FILE.png", default=None,
              help="Write the trade-off chart (Frechet distance and IS against w, one line per strategy).")
@click.option("--plot-rows", "rows_plot_path", metavar="FILE.png", default=None,
              help="Write Frechet distance against model rows per image, one curve per strategy, a panel per w.")
@verbosity_options
def eval_command(directory, ws, strategies, per_class, steps, sampler, seed, classifier, reference, json_path,
                 plot_path, rows_plot_path):
    """The guidance trade-off (the paper's Table 2 shape) on a class-conditional artifact:
    class accuracy, an Inception Score analog and a Frechet distance of classifier
    features against real data, with model rows and wall time per image, for each w and
    guidance strategy. Ratios compare with full guidance at the same w; 'holds' marks a
    strategy whose Frechet distance is at or below the upper end of full guidance's
    interval and whose accuracy is at most 0.5 points lower."""
    from cfg_export.evaluation.evaluate import evaluate_guidance, rows_to_dicts
    from cfg_export.evaluation.plots import plot_rows, plot_tradeoff
    from cfg_export.evaluation.report import check_report_paths, write_json

    check_report_paths(json_path, plot_path)
    if rows_plot_path is not None:
        check_output_file(rows_plot_path, "--plot-rows", (".png",))
    strategy_list = parse_list(strategies, str, "--strategy", "full,adaptive:0.99")
    with ProgressBar("sampling and scoring") as bar:
        rows = evaluate_guidance(directory, parse_list(ws, float, "--w", "0,1,3"), strategies=strategy_list,
                                 per_class=per_class, steps=steps, sampler=sampler, seed=seed, classifier=classifier,
                                 reference=reference, progress=bar)
    width = max(len("strategy"), *(len(r.strategy) for r in rows))
    say(f"{rows[0].samples} samples per w and strategy; [95% bootstrap intervals]; ratios against full guidance")
    say(f"{'w':>5}  {'strategy':<{width}} {'rows/img':>8} {'ratio':>6} {'s/img':>7} {'ratio':>6}  "
        f"{'accuracy':<21} {'IS analog':<21} {'Frechet distance':<21} holds")
    for r in rows:
        holds = {True: "yes", False: "no", None: "-"}[r.holds_quality]
        say(f"{r.w:>5g}  {r.strategy:<{width}} {r.rows_per_image:>8.1f} {_ratio(r.rows_ratio):>6} "
            f"{r.seconds_per_image:>7.4f} {_ratio(r.seconds_ratio):>6}  {format(r.accuracy, '.3f'):<21} "
            f"{format(r.inception_score, '.3f'):<21} {format(r.frechet_distance, '.2f'):<21} {holds}")
    if json_path:
        say(f"wrote {write_json(rows_to_dicts(rows), json_path)}")
    if plot_path:
        say(f"wrote {plot_tradeoff(rows, plot_path)}")
    if rows_plot_path:
        say(f"wrote {plot_rows(rows, rows_plot_path)}")
