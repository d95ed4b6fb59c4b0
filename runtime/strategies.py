"""Guidance strategies that run the null rows only where they help.

Classifier-free guidance evaluates every image twice per step: its conditional row and
its null row. Two training-free ways to pay for fewer null rows, per image:

- Adaptive guidance (Castillo et al. 2023, "Adaptive Guidance: Training-free
  Acceleration of Conditional Diffusion Models"): once an image's conditional and null
  outputs agree, cos >= gamma, the image runs only its conditional row for the rest of
  the trajectory, and the batch shrinks from 2N rows toward N. The outputs compared are
  the clean samples x0 they imply (GuidedModel converts them with the prediction type):
  an eps model's raw outputs agree most at the highest noise (both are nearly the noise
  itself, cos > 0.9999 on the reference model) and then less and less, so on them the
  rule would stop every image at the first step; the x0 predictions start apart (cos
  about 0.9) and converge as the image forms, which is the convergence the paper's rule
  waits for. The call on which an image reaches the threshold already takes the
  conditional output (the paper mixes once more), so that gamma = -1 is exactly
  conditional-only sampling and gamma = 1 (reached only by parallel outputs) full guidance.
- A cached guidance direction (the CFG-cache of Lv et al. 2024, "FasterCache", without its
  frequency-domain split): inside a window of noise levels, the null rows run at every
  k-th model call only; in between, the guided output is out_c + w * d with d = out_c - out_u
  kept from the last call that ran them. Outside the window every call runs them.

Both combine with the guidance interval (no null rows outside it) and with each other
(an image stopped by adaptive guidance neither refreshes nor reuses a direction; the
similarity is measured on the calls that run the null rows). They count model calls,
which are steps for the one-call-per-step samplers.

`parse_strategy` reads the short spelling used by `cfg-export eval --strategy` and
`sample --strategy`: parts joined by '+', each one of
  full | interval:LO..HI | adaptive[:GAMMA] | cache[:K][@LO..HI]
e.g. 'adaptive:0.99', 'cache:3@1..20', 'interval:0.3..5+adaptive'.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from .errors import CfgExportError

# Defaults chosen from `cfg-export eval` on the reference model (docs/notes/guidance.md).
DEFAULT_ADAPTIVE = 0.99  # cosine threshold gamma
DEFAULT_CACHE_EVERY = 3  # k: the null rows run at every k-th call inside the window
DEFAULT_CACHE_INTERVAL: tuple[float, float] | None = None  # noise levels sigma of the window; None: every step

SPELLING = "full | interval:LO..HI | adaptive[:GAMMA] | cache[:K][@LO..HI], joined by '+'"


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Returns the cosine similarity [G] float64 of each row of a and b [G, *S], over all
    of a row's values, clipped to [-1, 1]; 1 where both rows are zero, 0 where one is."""
    size = int(np.prod(a.shape[1:]))
    a = a.reshape(len(a), size).astype(np.float64)
    b = b.reshape(len(b), size).astype(np.float64)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    dots = np.einsum("ij,ij->i", a, b)
    both_zero = ~a.any(1) & ~b.any(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, dots / np.where(norms > 0, norms, 1.0), np.where(both_zero, 1.0, 0.0))
    return np.clip(cos, -1.0, 1.0)


def check_adaptive(gamma) -> float:
    """Returns the adaptive threshold as a float; refuses values outside [-1, 1]."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float, np.floating, np.integer)) or \
            not -1.0 <= float(gamma) <= 1.0:
        raise CfgExportError(f"adaptive guidance: got threshold {gamma!r}, expected a cosine similarity in [-1, 1] "
                             f"(e.g. {DEFAULT_ADAPTIVE}; 1 keeps full guidance, -1 is conditional-only)")
    return float(gamma)


def check_cache_every(k) -> int:
    """Returns k as an int; refuses anything but an integer >= 1."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or int(k) < 1:
        raise CfgExportError(f"cached guidance: got every {k!r}, expected an integer k >= 1 (the null rows run at "
                             f"every k-th step of the window; 1 runs them at every step)")
    return int(k)


def check_noise_interval(interval, what: str) -> tuple[float, float]:
    """Returns (lo, hi) as floats; refuses anything but two noise levels 0 <= lo <= hi."""
    try:
        lo, hi = (float(v) for v in interval)
    except (TypeError, ValueError):
        raise CfgExportError(f"{what}: got {interval!r}, expected two noise levels (lo, hi)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
        raise CfgExportError(f"{what}: got ({lo:g}, {hi:g}), expected 0 <= lo <= hi (noise levels sigma)")
    return lo, hi


class AdaptiveStop:
    """Per image: stops the null rows for good once cos(out_c, out_u) >= gamma."""

    def __init__(self, gamma: float, n: int):
        self.gamma = check_adaptive(gamma)
        self.stopped = np.zeros(n, dtype=bool)  # [N] images that run no more null rows
        self.stopped_at = np.full(n, -1)  # [N] the call on which each image stopped (-1: not yet)
        self.calls = 0

    def observe(self, images: np.ndarray, out_c: np.ndarray, out_u: np.ndarray) -> np.ndarray:
        """Sees the conditional and null outputs [G, *S] of the images (indices [G]) that ran
        their null rows this call; returns bool [G]: those that agree now (and stop)."""
        agree = cosine_similarity(out_c, out_u) >= self.gamma
        self.stopped[images[agree]] = True
        self.stopped_at[images[agree]] = self.calls
        return agree

    def advance(self) -> None:
        self.calls += 1


class DirectionCache:
    """The guidance direction d = out_c - out_u of each image, refreshed at every k-th call
    inside the window of noise levels and reused at the calls in between."""

    def __init__(self, every: int, interval: tuple[float, float] | None, n: int):
        self.every = check_cache_every(every)
        self.interval = None if interval is None else check_noise_interval(interval, "cache interval")
        self.direction: np.ndarray | None = None  # [N, *S] the last direction of each image
        self.fresh = np.zeros(n, dtype=bool)  # [N] images holding a direction
        self.window_calls = 0  # calls inside the window so far
        self.reused_at: list[int] = []  # the calls (0-based, of all calls) that reused the direction
        self.calls = 0

    def inside(self, sigma: float) -> bool:
        return self.interval is None or self.interval[0] <= sigma <= self.interval[1]

    def plan(self, guided: np.ndarray, sigma: float) -> np.ndarray:
        """Returns bool [N]: the guided images that reuse their direction this call instead
        of running their null rows."""
        if not self.inside(sigma):
            return np.zeros_like(guided)
        refresh = self.window_calls % self.every == 0
        self.window_calls += 1
        if refresh:
            return np.zeros_like(guided)
        return guided & self.fresh

    def store(self, images: np.ndarray, direction: np.ndarray) -> None:
        """Keeps the direction [G, *S] of the images (indices [G]) that ran their null rows."""
        if self.direction is None:
            self.direction = np.zeros((len(self.fresh), *direction.shape[1:]), dtype=np.float64)
        self.direction[images] = direction
        self.fresh[images] = True

    def advance(self, reused: bool) -> None:
        if reused:
            self.reused_at.append(self.calls)
        self.calls += 1


@dataclass(frozen=True)
class Strategy:
    """A named set of guidance options (what `GuidanceOptions` takes beside w): the guidance
    interval, adaptive guidance, the cached direction. name is its canonical spelling."""

    name: str = "full"
    interval: tuple[float, float] | None = None
    adaptive: float | None = None
    cache_every: int | None = None
    cache_interval: tuple[float, float] | None = None

    @property
    def kind(self) -> str:
        """The parts without their values ('adaptive+cache'): one curve of the eval plot."""
        return "+".join(part.split(":")[0] for part in self.name.split("+"))

    def apply(self, options):
        """Returns a copy of the GuidanceOptions `options` with this strategy's fields set
        (its guidance interval only where it has one)."""
        return replace(options, interval=self.interval if self.interval is not None else options.interval,
                       adaptive=self.adaptive, cache_every=self.cache_every, cache_interval=self.cache_interval)


def _range(text: str, part: str) -> tuple[float, float]:
    lo, sep, hi = text.partition("..")
    try:
        if not sep:
            raise ValueError
        return check_noise_interval((float(lo), float(hi)), part)
    except (ValueError, CfgExportError):
        raise CfgExportError(f"strategy part {part!r}: expected noise levels LO..HI with 0 <= LO <= HI, "
                             f"like interval:0.3..5") from None


def _number(text: str, kind: type, part: str):
    try:
        return kind(text)
    except ValueError:
        raise CfgExportError(f"strategy part {part!r}: got {text!r}, expected {'an integer' if kind is int else 'a number'}"
                             ) from None


def _fmt(lo_hi: tuple[float, float]) -> str:
    return f"{lo_hi[0]:g}..{lo_hi[1]:g}"


def parse_strategy(text: str) -> Strategy:
    """Returns the Strategy spelled `text` (see the module docstring); the values left out
    take the defaults (DEFAULT_ADAPTIVE, DEFAULT_CACHE_EVERY, DEFAULT_CACHE_INTERVAL).
    Raises CfgExportError naming the part it cannot read."""
    if not isinstance(text, str) or not text.strip():
        raise CfgExportError(f"strategy: got {text!r}, expected {SPELLING}")
    fields: dict = {}
    names, seen = [], set()
    for part in (p.strip() for p in text.split("+")):
        head, _, value = part.partition(":")
        if head in seen:
            raise CfgExportError(f"strategy {text!r}: '{head}' given twice; expected {SPELLING}")
        seen.add(head)
        if head == "full" and not value:
            fields["full"] = True
            names.append("full")
        elif head == "interval" and value:
            fields["interval"] = _range(value, part)
            names.append(f"interval:{_fmt(fields['interval'])}")
        elif head == "adaptive":
            gamma = check_adaptive(_number(value, float, part)) if value else DEFAULT_ADAPTIVE
            fields["adaptive"] = gamma
            names.append(f"adaptive:{gamma:g}")
        elif head == "cache":
            every, at, window = value.partition("@")
            k = check_cache_every(_number(every, int, part)) if every else DEFAULT_CACHE_EVERY
            fields["cache_every"] = k
            fields["cache_interval"] = _range(window, part) if at else DEFAULT_CACHE_INTERVAL
            names.append(f"cache:{k}" + (f"@{_fmt(fields['cache_interval'])}" if fields["cache_interval"] else ""))
        else:
            raise CfgExportError(f"strategy part {part!r}: not understood; expected {SPELLING}")
    if "full" in fields and len(names) > 1:
        raise CfgExportError(f"strategy {text!r}: 'full' combines with nothing; expected {SPELLING}")
    fields.pop("full", None)
    return Strategy(name="+".join(names), **fields)
