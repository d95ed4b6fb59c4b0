"""The training noise schedule and the choice of sampling timesteps and noise levels.

Notation of Ho et al. 2020 (DDPM): beta_t is the noise added at training step t,
alpha_t = 1 - beta_t, and alphas_cumprod[t] = prod_{s<=t} alpha_s, so that
q(x_t | x_0) = N(sqrt(alphas_cumprod[t]) x_0, (1 - alphas_cumprod[t]) I).
Flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"; Esser et
al. 2024, "Scaling Rectified Flow Transformers", Stable Diffusion 3) interpolates
instead: x_s = (1 - s) x_0 + s eps, s in [0, 1], and the model is fed t = s T.

Everything here is float64; the names of the beta schedules and of the options are
those of diffusers, so a schedule reads the same in both. The functions below build
what diffusers' schedulers build in set_timesteps, which differs from one scheduler to
the next: each sampler picks the ones its scheduler uses.
"""
from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np

from .errors import CfgExportError
from .validation import expect_dict, expect_float, expect_int, expect_list, expect_str, refuse_unknown

MAX_TIMESTEPS = 100_000  # training timesteps: refuses schedules no model was trained with
MIN_ALPHA_CUMPROD = 1e-12  # below this the signal is gone and x0 = x_t / sqrt(a) blows up


class BetaSchedule(enum.Enum):
    """The kind of training schedule."""

    LINEAR = "linear"  # Ho et al. 2020: betas evenly spaced
    SCALED_LINEAR = "scaled_linear"  # Stable Diffusion: sqrt(betas) evenly spaced
    COSINE = "squaredcos_cap_v2"  # Nichol & Dhariwal 2021, betas capped at 0.999
    FLOW_MATCH = "flow_match"  # flow matching: no betas, x_s = (1 - s) x_0 + s eps


BETA_KINDS = tuple(k.value for k in BetaSchedule if k is not BetaSchedule.FLOW_MATCH)


class Spacing(enum.Enum):
    """How `steps` sampling timesteps are picked from the T training timesteps
    (the three choices of Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2). Each diffusers scheduler reads them its own
    way: make_timesteps (DDIM, DDPM, PNDM), euler_timesteps (Euler, Euler ancestral,
    Heun), solver_timesteps (DPM-Solver, UniPC)."""

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


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Returns betas rescaled so that the last timestep has zero SNR (alphas_cumprod[-1] = 0):
    Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Algorithm 1: sqrt(alphas_cumprod) shifted to end at 0 and scaled to keep its start."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    alphas_cumprod = sqrt_ab**2
    alphas = np.concatenate([alphas_cumprod[:1], alphas_cumprod[1:] / alphas_cumprod[:-1]])
    return 1.0 - alphas


@dataclass(frozen=True)
class NoiseSchedule:
    """A training schedule: enough facts to rebuild alphas_cumprod exactly (for flow
    matching, only the number of training timesteps)."""

    kind: BetaSchedule = BetaSchedule.LINEAR
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    trained_betas: tuple[float, ...] | None = None  # explicit betas [T], instead of kind, start and end
    rescale_betas_zero_snr: bool = False  # Lin et al. 2024: the last timestep is pure noise

    def __post_init__(self):
        if not isinstance(self.kind, BetaSchedule):
            expect_str(self.kind, "schedule kind")
        object.__setattr__(self, "kind", parse_enum(BetaSchedule, self.kind, "schedule kind"))
        object.__setattr__(self, "num_train_timesteps",
                           expect_int(self.num_train_timesteps, "schedule num_train_timesteps", lo=2, hi=MAX_TIMESTEPS))
        if not isinstance(self.rescale_betas_zero_snr, bool):
            raise CfgExportError(f"schedule rescale_betas_zero_snr: got {self.rescale_betas_zero_snr!r}, expected "
                                 f"true or false")
        if self.trained_betas is not None:
            values = self.trained_betas
            values = expect_list(values.reshape(-1).tolist() if isinstance(values, np.ndarray) else values,
                                 "schedule trained_betas")
            betas = tuple(expect_float(b, "schedule trained_betas", 0.0, 1.0, open_lo=True, open_hi=True)
                          for b in values)
            if len(betas) != self.num_train_timesteps:
                raise CfgExportError(f"schedule trained_betas: got {len(betas)} values, expected "
                                     f"num_train_timesteps ({self.num_train_timesteps}) values in (0, 1)")
            object.__setattr__(self, "trained_betas", betas)
        elif not self.is_flow:
            for name in ("beta_start", "beta_end"):
                object.__setattr__(self, name, expect_float(getattr(self, name), f"schedule {name}", 0.0, 1.0,
                                                            open_lo=True, open_hi=True))
            if self.beta_start > self.beta_end:
                raise CfgExportError(f"schedule: beta_start {self.beta_start:g} > beta_end {self.beta_end:g}; betas "
                                     f"grow with t (noise is added), so expected beta_start <= beta_end")
        if not self.is_flow:
            ac = np.cumprod(1.0 - self.betas())
            vanishes = ac[-1] <= MIN_ALPHA_CUMPROD and not self.rescale_betas_zero_snr  # zero SNR on purpose
            if not np.all(np.isfinite(ac)) or vanishes:
                raise CfgExportError(f"schedule: alphas_cumprod reaches {ac[-1]:.3g} at t={len(ac) - 1} (the signal "
                                     f"vanishes), which no sampler can divide by; use fewer timesteps or smaller "
                                     f"betas")

    @property
    def is_flow(self) -> bool:
        return self.kind is BetaSchedule.FLOW_MATCH

    def betas(self) -> np.ndarray:
        """Returns beta_t, float64 [T]; raises CfgExportError for a flow-matching schedule."""
        if self.is_flow:
            raise CfgExportError("a flow-matching schedule has no betas (x_s = (1 - s) x_0 + s eps)")
        T = self.num_train_timesteps
        if self.trained_betas is not None:
            betas = np.asarray(self.trained_betas, dtype=np.float64)
        elif self.kind is BetaSchedule.LINEAR:
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
        if self.rescale_betas_zero_snr:
            betas = rescale_zero_terminal_snr(betas)
        if not (betas.shape == (T,) and np.all(betas > 0) and np.all(betas <= 1)):
            raise CfgExportError(f"schedule: betas leave (0, 1] (min {betas.min():g}, max {betas.max():g}); "
                                 f"expected beta_start and beta_end in (0, 1)")
        return betas

    def alphas_cumprod(self) -> np.ndarray:
        """Returns alphas_cumprod[t] = prod_{s<=t} (1 - beta_s), float64 [T], decreasing
        (its last value is 0 with rescale_betas_zero_snr)."""
        alphas_cumprod = np.cumprod(1.0 - self.betas())
        if not np.all(np.diff(alphas_cumprod) < 0):
            raise CfgExportError("schedule: alphas_cumprod does not decrease; re-export with valid betas")
        return alphas_cumprod

    def to_dict(self) -> dict:
        d = {"kind": self.kind.value, "num_train_timesteps": self.num_train_timesteps,
             "beta_start": self.beta_start, "beta_end": self.beta_end}
        if self.trained_betas is not None:
            d["trained_betas"] = list(self.trained_betas)
        if self.rescale_betas_zero_snr:
            d["rescale_betas_zero_snr"] = True
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NoiseSchedule":
        d = expect_dict(d, "schedule")
        refuse_unknown(d, ("kind", "num_train_timesteps", "beta_start", "beta_end", "trained_betas",
                           "rescale_betas_zero_snr"), "schedule")
        return cls(**d)


# --- sampling timesteps ---------------------------------------------------------------------

def _check_steps(T: int, steps) -> int:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= int(steps) <= T:
        raise CfgExportError(f"steps: got {steps!r}, expected 1..{T} (the training timesteps)")
    return int(steps)


def _trailing(T: int, steps: int, start: int | None = None) -> np.ndarray:
    """round(arange(start, 0, -T / steps)): diffusers' trailing spacing, before its "- 1".
    For some step counts (61, 103, ... of T = 1000) the float stride makes arange yield
    one value too many, and diffusers then steps to the timestep -1: refused."""
    timesteps = np.arange(T if start is None else start, 0, -T / steps).round()
    if len(timesteps) > steps:
        raise CfgExportError(f"steps: {steps} trailing steps of {T} training timesteps give diffusers one "
                             f"timestep too many (ending at t = -1); use {steps - 1} or {steps + 1} steps")
    return timesteps


def make_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing | str = Spacing.LEADING,
                   steps_offset: int = 0) -> np.ndarray:
    """Returns the sampling timesteps of DDIM, DDPM and PNDM, int64 [steps], strictly
    decreasing, in 0..T-1.

    leading:  t = k * (T // steps) + offset, k = steps-1..0 (DDIM paper, Stable Diffusion)
    trailing: t = round(T - k * T / steps) - 1, k = 0..steps-1 (starts at T-1)
    linspace: t = round(linspace(0, T-1, steps)), reversed
    """
    spacing = parse_enum(Spacing, spacing, "timestep spacing")
    T = int(num_train_timesteps)
    steps = _check_steps(T, steps)
    if spacing is Spacing.LEADING and (steps - 1) * (T // steps) + steps_offset > T - 1:
        raise CfgExportError(f"steps_offset {steps_offset} with {steps} leading steps passes the last "
                             f"training timestep {T - 1}; use fewer steps or no offset")
    if spacing is Spacing.LEADING:
        timesteps = (np.arange(steps) * (T // steps)).round()[::-1] + steps_offset
    elif spacing is Spacing.TRAILING:
        timesteps = _trailing(T, steps) - 1
    else:
        timesteps = np.linspace(0, T - 1, steps).round()[::-1]
    timesteps = timesteps.astype(np.int64)
    assert timesteps.shape == (steps,) and np.all(np.diff(timesteps) < 0), timesteps
    assert timesteps[0] <= T - 1 and timesteps[-1] >= 0
    return timesteps


def euler_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing | str,
                    steps_offset: int = 0) -> np.ndarray:
    """Returns the timesteps of the Euler-family schedulers (diffusers' Euler, Euler
    ancestral, Heun), float64 [steps] holding float32 values: those of make_timesteps,
    except linspace, which is not rounded (fractional timesteps, as np.linspace in float32)."""
    spacing = parse_enum(Spacing, spacing, "timestep spacing")
    T = int(num_train_timesteps)
    steps = _check_steps(T, steps)
    if spacing is Spacing.LINSPACE:
        return np.linspace(0, T - 1, steps, dtype=np.float32)[::-1].astype(np.float64)
    return make_timesteps(T, steps, spacing, steps_offset).astype(np.float32).astype(np.float64)


def solver_timesteps(num_train_timesteps: int, steps: int, spacing: Spacing | str, steps_offset: int = 0,
                     last_timestep: int | None = None) -> np.ndarray:
    """Returns the timesteps of the multistep solvers (diffusers' DPM-Solver and UniPC),
    int64 [steps]: steps + 1 points over 0..last_timestep - 1 (default T - 1), the last one dropped.

    linspace: round(linspace(0, last - 1, steps + 1)) reversed, without its 0
    leading:  k * (last // (steps + 1)) + offset, k = steps..1
    trailing: round(arange(last, 0, -T / steps)) - 1
    """
    spacing = parse_enum(Spacing, spacing, "timestep spacing")
    T = int(num_train_timesteps)
    steps = _check_steps(T, steps)
    last = T if last_timestep is None else int(last_timestep)
    if spacing is Spacing.LINSPACE:
        timesteps = np.linspace(0, last - 1, steps + 1).round()[::-1][:-1]
    elif spacing is Spacing.LEADING:
        timesteps = (np.arange(steps + 1) * (last // (steps + 1))).round()[::-1][:-1] + steps_offset
    else:
        timesteps = _trailing(T, steps, last) - 1
    return timesteps.astype(np.int64)


# --- noise levels ----------------------------------------------------------------------------

def vp_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Returns the noise levels sigma_t = sqrt((1 - a_t) / a_t) of a variance-preserving
    schedule, float64 [T] (Karras et al. 2022: x_t / sqrt(a_t) = x_0 + sigma_t eps)."""
    with np.errstate(divide="ignore"):
        return np.sqrt((1.0 - alphas_cumprod) / alphas_cumprod)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Returns n noise levels from sigma_max down to sigma_min, float64: Karras et al. 2022,
    "Elucidating the Design Space of Diffusion-Based Generative Models", eq. 5 (rho = 7)."""
    ramp = np.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    """Returns n noise levels evenly spaced in log sigma, from sigma_max down to sigma_min."""
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Returns the (fractional) training timesteps of noise levels `sigmas`, float64: where
    log sigma falls between neighbours of `log_sigmas` (the log of vp_sigmas, increasing
    over t = 0..T-1), linearly interpolated and clamped to 0..T-1."""
    log_sigma = np.log(np.maximum(np.asarray(sigmas, dtype=np.float64), 1e-10))
    low = np.clip(np.searchsorted(log_sigmas, log_sigma, side="right") - 1, 0, len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """Returns flow-matching noise levels shifted towards noise, shift s / (1 + (shift - 1) s)
    (Esser et al. 2024, sec. 5.3.2: the resolution-dependent shift)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift(mu: float, sigmas: np.ndarray, kind: str = "exponential") -> np.ndarray:
    """Returns flow-matching noise levels shifted by mu (dynamic shifting):
    e^mu / (e^mu + (1/s - 1)) (exponential) or mu / (mu + (1/s - 1)) (linear)."""
    m = math.exp(mu) if kind == "exponential" else mu
    return m / (m + (1 / sigmas - 1))


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096,
                    base_shift: float = 0.5, max_shift: float = 1.15) -> float:
    """Returns mu of dynamic shifting: linear in the number of image tokens, base_shift at
    base_seq_len and max_shift at max_seq_len (diffusers' SD3 and Flux pipelines)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + base_shift - m * base_seq_len
