"""Charts for bench and eval (matplotlib, the `plot` extra, imported when drawing)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from cfg_export.runtime.errors import require
from cfg_export.runtime.files import staged_file


def _pyplot():
    matplotlib = require("matplotlib", "plot")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Writes the figure as PNG, whole or not at all; closes it; returns the path."""
    path = Path(path)
    with staged_file(path) as tmp:
        fig.savefig(tmp, format="png")
    _pyplot().close(fig)
    return path


def _errorbar(ax, xs, estimates, **style):
    """Draws estimates (value with low/high) at xs with their intervals as error bars."""
    return ax.errorbar(xs, [e.value for e in estimates], capsize=3,
                       yerr=[[e.value - e.low for e in estimates], [e.high - e.value for e in estimates]], **style)


def _by_strategy(rows: Sequence) -> dict[str, list]:
    """The rows grouped by strategy, in the order they first appear."""
    groups: dict[str, list] = {}
    for r in rows:
        groups.setdefault(getattr(r, "strategy", "full"), []).append(r)
    return groups


def plot_tradeoff(rows: Sequence, path: str | Path) -> Path:
    """Writes a PNG of Frechet distance (with intervals) and Inception Score against w, one
    line per strategy (the paper's trade-off figure, on the reference model); returns the path."""
    plt = _pyplot()
    fig, left = plt.subplots(figsize=(6, 4), dpi=120)
    right = left.twinx()
    for i, (name, group) in enumerate(_by_strategy(rows).items()):
        color = f"C{i}"
        ws = [r.w for r in group]
        _errorbar(left, ws, [r.frechet_distance for r in group], fmt="o-", color=color,
                  label=f"{name}: Frechet distance")
        right.plot(ws, [r.inception_score.value for r in group], "s--", color=color, alpha=0.6,
                   label=f"{name}: IS analog")
    left.set_xlabel("guidance weight w")
    left.set_ylabel("Frechet distance (classifier features, solid)")
    right.set_ylabel("Inception Score analog (dashed)")
    left.legend(fontsize=7, loc="upper left")
    left.set_title("Guidance trade-off on the reference model")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_rows(rows: Sequence, path: str | Path) -> Path:
    """Writes a PNG of Frechet distance (with intervals) against model rows per image: one
    panel per w, one curve per strategy kind (its settings joined in the order of rows),
    full guidance's interval shaded; returns the path."""
    plt = _pyplot()
    ws = sorted({r.w for r in rows})
    cols = min(3, len(ws))
    lines = -(-len(ws) // cols)
    fig, axes = plt.subplots(lines, cols, figsize=(4.2 * cols, 3.4 * lines), dpi=120, squeeze=False)
    kinds = list(dict.fromkeys(r.kind for r in rows))
    for ax, w in zip(axes.flat, ws):
        at_w = [r for r in rows if r.w == w]
        for r in at_w:
            if r.strategy == "full":
                ax.axhspan(r.frechet_distance.low, r.frechet_distance.high, color="0.85", zorder=0)
        for i, kind in enumerate(kinds):
            group = sorted((r for r in at_w if r.kind == kind), key=lambda r: r.rows_per_image)
            if group:
                _errorbar(ax, [r.rows_per_image for r in group], [r.frechet_distance for r in group],
                          fmt="o-" if kind != "full" else "D", color=f"C{i}", label=kind)
        ax.set_title(f"w = {w:g}")
        ax.set_xlabel("model rows per image")
        ax.set_ylabel("Frechet distance")
    for ax in list(axes.flat)[len(ws):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("Cost and quality of each guidance strategy (grey: full guidance's interval)")
    fig.tight_layout()
    return save_figure(fig, path)


def plot_bench(result, path: str | Path) -> Path:
    """Writes a PNG: p50 step time against N, one line per mode/backend/precision."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    series = {}
    for r in result.rows:
        series.setdefault(f"{r.mode} {r.backend} {r.precision}", []).append((r.n, r.p50_ms))
    for label, points in series.items():
        ax.plot(*zip(*sorted(points)), "o-", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("images N")
    ax.set_ylabel("p50 step time (ms)")
    ax.set_title("Guided sampling step time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
