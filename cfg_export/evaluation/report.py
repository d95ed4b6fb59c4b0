"""Writing measurement results: JSON tables and the output-path checks done before any
measuring starts (so a bad --json or --plot path fails at once, not after minutes)."""
from __future__ import annotations

import json
from pathlib import Path

from cfg_export.runtime.files import check_output_file, staged_file


def check_report_paths(json_path: str | Path | None, plot_path: str | Path | None) -> None:
    """Raises CfgExportError now for a --json or --plot path that could not be written later."""
    if json_path is not None:
        check_output_file(json_path, "--json", (".json",))
    if plot_path is not None:
        check_output_file(plot_path, "--plot", (".png",))


def write_json(data, path: str | Path) -> Path:
    """Writes `data` as indented JSON, whole or not at all; returns the path."""
    path = Path(path)
    with staged_file(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
