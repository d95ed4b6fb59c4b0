"""Checks of values read from JSON (config.json, manifest.json, engine.json): each returns
the value converted, or raises CfgExportError naming the field, what it holds and what
it should hold. The readers of those files call these, so that a file of the wrong
shape is refused when it is read, in one line, never later as a traceback."""
from __future__ import annotations

import math
from typing import Any, Iterable

from .errors import CfgExportError


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def expect_dict(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise CfgExportError(f"{what}: got {type(value).__name__} {_show(value)}, expected a JSON object {{...}}")
    return value


def expect_list(value: Any, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise CfgExportError(f"{what}: got {type(value).__name__} {_show(value)}, expected a JSON list [...]")
    return list(value)


def expect_str(value: Any, what: str, choices: Iterable[str] | None = None) -> str:
    if not isinstance(value, str):
        raise CfgExportError(f"{what}: got {type(value).__name__} {_show(value)}, expected a string")
    if choices is not None:
        choices = list(choices)
        if value not in choices:
            raise CfgExportError(f"{what}: got {value!r}, expected one of {', '.join(choices)}")
    return value


def expect_int(value: Any, what: str, lo: int | None = None, hi: int | None = None) -> int:
    """An integer (a float with an integral value is accepted; booleans are not)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            isinstance(value, float) and not (math.isfinite(value) and value == int(value))):
        raise CfgExportError(f"{what}: got {type(value).__name__} {_show(value)}, expected an integer")
    value = int(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"<= {hi}" if lo is None else f"in {lo}..{hi}"
        raise CfgExportError(f"{what}: got {value}, expected an integer {bounds}")
    return value


def expect_float(value: Any, what: str, lo: float | None = None, hi: float | None = None,
                 open_lo: bool = False, open_hi: bool = False) -> float:
    """A finite number within [lo, hi] (or the open ends asked for)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CfgExportError(f"{what}: got {type(value).__name__} {_show(value)}, expected a finite number")
    value = float(value)
    below = lo is not None and (value <= lo if open_lo else value < lo)
    above = hi is not None and (value >= hi if open_hi else value > hi)
    if below or above:
        left = "(" if open_lo else "["
        right = ")" if open_hi else "]"
        raise CfgExportError(f"{what}: got {value:g}, expected a number in {left}{lo if lo is not None else '-inf'}, "
                             f"{hi if hi is not None else 'inf'}{right}")
    return value


def expect_file_name(value: Any, what: str) -> str:
    """A plain file name inside the artifact folder: no folders, no '..'."""
    value = expect_str(value, what)
    if not value or "/" in value or "\\" in value or value in (".", ".."):
        raise CfgExportError(f"{what}: got {value!r}, expected a file name inside the artifact folder")
    return value


def refuse_unknown(d: dict, allowed: Iterable[str], what: str) -> None:
    unknown = sorted(set(d) - set(allowed))
    if unknown:
        raise CfgExportError(f"{what}: unknown key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))}; "
                             f"expected keys: {', '.join(sorted(allowed))}")


def require_keys(d: dict, required: Iterable[str], what: str) -> None:
    missing = [k for k in required if k not in d]
    if missing:
        raise CfgExportError(f"{what}: missing {', '.join(map(repr, missing))}")


def read_json(path, what: str | None = None):
    """Returns the parsed JSON of a file; raises CfgExportError, one line, for a file that
    cannot be read or parsed (bad bytes, bad syntax, nesting too deep to parse)."""
    import json

    try:
        return json.loads(open(path, "rb").read().decode("utf-8"))
    except OSError as exc:
        raise CfgExportError(f"{what or path}: cannot read it ({exc.strerror or exc})") from None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:100]
        raise CfgExportError(f"{what or path}: not valid JSON ({reason})") from None
