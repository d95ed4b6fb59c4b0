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


def plot_tradeoff(rows: Sequence, path: str | Path) -> Path:
    """Writes a PNG of Frechet distance and Inception Score against w (the paper's
    trade-off figure, on the reference model); returns the path."""
    plt = _pyplot()
    ws = [r.w for r in rows]
    fig, left = plt.subplots(figsize=(6, 4), dpi=120)
    fd = [r.frechet_distance for r in rows]
    left.errorbar(ws, [e.value for e in fd], yerr=[[e.value - e.low for e in fd], [e.high - e.value for e in fd]],
                  fmt="o-", color="tab:blue", capsize=3, label="Frechet distance (lower is better)")
    left.set_xlabel("guidance weight w")
    left.set_ylabel("Frechet distance (classifier features)", color="tab:blue")
    right = left.twinx()
    right.plot(ws, [r.inception_score.value for r in rows], "s--", color="tab:red", label="Inception Score analog")
    right.set_ylabel("Inception Score analog", color="tab:red")
    left.set_title("Guidance trade-off on the reference model")
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
