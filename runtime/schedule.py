"""The training noise schedule (betas, alphas_cumprod) and the choice of sampling timesteps.

Notation of Ho et al. 2020 (DDPM): beta_t is the noise added at training step t,
alpha_t = 1 - beta_t, and alphas_cumprod[t] = prod_{s<=t} alpha_s, so that
q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I).
Everything here is float64; the names of the beta schedules are those of diffusers,
so a schedule reads the same in both.
"""
from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass

import numpy as np

from .errors import CfgExportError
from .validation import expect_dict, expect_float, expect_int, expect_str, refuse_unknown

MAX_TIMESTEPS = 100_000  # training timesteps: refuses schedules no model was trained with
MIN_ALPHA_CUMPROD = 1e-12  # below this the signal is gone and x0 = x_t / sqrt(a) blows up


class BetaSchedule(enum.Enum):
    LINEAR = "linear"  # Ho et al. 2020: betas evenly spaced
    SCALED_LINEAR = "scaled_linear"  # Stable Diffusion: sqrt(betas) evenly spaced
    COSINE = "squaredcos_cap_v2"  # Nichol & Dhariwal 2021, betas capped at 0.999


class Spacing(enum.Enum):
    """How `steps` sampling timesteps are picked from the T training timesteps
    (the three choices of Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2)."""

    LEADING = "leading"
    TRAILING = "trailing"
    LINSPACE = "linspace"


def parse_enum(enum_type: type[enum.Enum], value, what: str):
    """Returns enum_type(value), or raises CfgExportError listing the allowed values."""
    if isinstance(value, enum_type):
        return value
    allowed = [m.value for m in enum_type]
    if value not in allowed:
        raise CfgExportError(f"{what}: got {value!r}, expected one of {', '.join(allowed)}")
    return enum_type(value)


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete training schedule: enough facts to rebuild alphas_cumprod exactly."""

    kind: BetaSchedule = BetaSchedule.LINEAR
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    def __post_init__(self):
        if not isinstance(self.kind, BetaSchedule):
            expect_str(self.kind, "schedule kind")
        object.__setattr__(self, "kind", parse_enum(BetaSchedule, self.kind, "schedule kind"))
        object.__setattr__(self, "num_train_timesteps",
                           expect_int(self.num_train_timesteps, "schedule num_train_timesteps", lo=2, hi=MAX_TIMESTEPS))
        for name in ("beta_start", "beta_end"):
            object.__setattr__(self, name, expect_float(getattr(self, name), f"schedule {name}", 0.0, 1.0,
                                                        open_lo=True, open_hi=True))
        if self.beta_start > self.beta_end:
            raise CfgExportError(f"schedule: beta_start {self.beta_start:g} > beta_end {self.beta_end:g}; betas grow "
                                 f"with t (noise is added), so expected beta_start <= beta_end")
        ac = np.cumprod(1.0 - self.betas())
        if not (np.all(np.isfinite(ac)) and ac[-1] > MIN_ALPHA_CUMPROD):
            raise CfgExportError(f"schedule: alphas_cumprod reaches {ac[-1]:.3g} at t={len(ac) - 1} (the signal "
                                 f"vanishes), which no sampler can divide by; use fewer timesteps or smaller betas")

    def betas(self) -> np.ndarray:
        """Returns beta_t, float64 [T]."""
        T = self.num_train_timesteps
        if self.kind is BetaSchedule.LINEAR:
            betas = np.linspace(self.beta_start, self.beta_end, T, dtype=np.float64)
        elif self.kind is BetaSchedule.SCALED_LINEAR:
            betas = np.linspace(self.beta_start**0.5, self.beta_end**0.5, T, dtype=np.float64) ** 2
        else:
            def alpha_bar(t: float) -> float:
                return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = np.array(
                [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), 0.999) for i in range(T)],
                dtype=np.float64,
            )
        if not (betas.shape == (T,) and np.all(betas > 0) and np.all(betas < 1)):
            raise CfgExportError(f"schedule: betas leave (0, 1) (min {betas.min():g}, max {betas.max():g}); "
                                 f"expected beta_start and beta_end in (0, 1)")
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        """Returns alphas_cumprod[t] = prod_{s<=t} (1 - beta_s), float64 [T], decreasing."""
        alphas_cumprod = np.cumprod(1.0 - self.betas())
        if not np.all(np.diff(alphas_cumprod) < 0):
            raise CfgExportError("schedule: alphas_cumprod does not decrease; re-export with valid betas")
        return alphas_cumprod

    def to_dict(self) -> dict:
        d = asdict(self)
        d["kind"] = self.kind.value
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        d = expect_dict(d, "schedule")
        refuse_unknown(d, ("kind", "num_train_timesteps", "beta_start", "beta_end"), "schedule")
        return cls(**d)


def make_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing | str = Spacing.LEADING,
                   steps_offset: int = 0) -> np.ndarray:
    """Returns the sampling timesteps, int64 [steps], strictly decreasing, in 0..T-1.

    leading:  t = k * (T // steps) + offset, k = steps-1..0 (DDIM paper, Stable Diffusion)
    trailing: t = round(T - k * T / steps) - 1, k = 0..steps-1 (starts at T-1)
    linspace: t = round(linspace(0, T-1, steps)), reversed
    """
    spacing = parse_enum(Spacing, spacing, "timestep spacing")
    T = int(num_train_timesteps)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= int(steps) <= T:
        raise CfgExportError(f"steps: got {steps!r}, expected 1..{T} (the training timesteps)")
    steps = int(steps)
    if spacing is Spacing.LEADING and (steps - 1) * (T // steps) + steps_offset > T - 1:
        raise CfgExportError(f"steps_offset {steps_offset} with {steps} leading steps passes the last "
                             f"training timestep {T - 1}; use fewer steps or no offset")
    if spacing is Spacing.LEADING:
        timesteps = (np.arange(steps) * (T // steps)).round()[::-1] + steps_offset
    elif spacing is Spacing.TRAILING:
        timesteps = np.round(np.arange(T, 0, -T / steps))[:steps] - 1  # arange can overshoot by one
    else:
        timesteps = np.linspace(0, T - 1, steps).round()[::-1]
    timesteps = timesteps.astype(np.int64)
    assert timesteps.shape == (steps,) and np.all(np.diff(timesteps) < 0), timesteps
    assert timesteps[0] <= T - 1 and timesteps[-1] >= 0
    return timesteps
