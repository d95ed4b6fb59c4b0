"""run_bench: per-step latency of guided sampling, our runtime side by side with what
users would otherwise run.

Modes, each a full DDIM loop timed step by step after warm-up:
  stacked   one call on 2N rows [cond; null], the mix on the host (the default path)
  two-pass  two calls on N rows, cond then null (the loop people write by hand)
  unguided  N rows only (what steps outside a guidance interval cost)
  fused     a --fuse-guidance artifact: N rows and w in, the mix inside the graph
  torch     the same model in eager PyTorch in a diffusers-style loop (concatenate,
            call, chunk, mix, scheduler step), when torch and the model are given
"""
from __future__ import annotations

import importlib.metadata
import logging
import os
import platform
import resource
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cfg_export.runtime.artifact import Artifact, as_artifact
from cfg_export.runtime.backends import BACKENDS, open_backend
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import GuidanceOptions, GuidedDenoiser, mix, to_eps
from cfg_export.runtime.manifest import ConditionKind, Layout, Manifest
from cfg_export.runtime.progress import Progress
from cfg_export.runtime.samplers import sample_ddim
from cfg_export.runtime.schedule import make_timesteps

log = logging.getLogger(__name__)

MODES = ("stacked", "two-pass", "unguided", "fused", "torch")
DEFAULT_BATCHES = (1, 4, 16)
DEFAULT_STEPS = 20  # timed steps per configuration
DEFAULT_WARMUP = 3  # untimed steps before them
W = 3.0


@dataclass
class BenchRow:
    artifact: str
    precision: str
    backend: str
    mode: str
    n: int  # images
    p50_ms: float
    p90_ms: float
    p99_ms: float
    host_ms: float  # mean time per step outside the model call
    host_share: float  # host_ms / mean step time
    images_per_s: float  # n / (mean step time x 50 steps): images a 50-step sampling yields per second
    peak_rss_mb: float  # high-water mark of the process after this row


@dataclass
class BenchResult:
    rows: list[BenchRow] = field(default_factory=list)
    machine: dict = field(default_factory=dict)
    ratios: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"machine": self.machine, "rows": [asdict(r) for r in self.rows], "ratios": self.ratios}


def machine_facts() -> dict:
    """Returns CPU, cores, GPU (when nvidia-smi answers) and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = None
    if shutil.which("nvidia-smi"):
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True)
        gpu = proc.stdout.strip() or None if proc.returncode == 0 else None
    versions = {}
    for package in ("numpy", "onnxruntime", "onnxruntime-gpu", "tensorrt", "torch", "diffusers"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(), **versions}


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class TwoPassDenoiser(GuidedDenoiser):
    """The hand-written loop: the conditional rows, then the null rows, in two calls."""

    def __call__(self, x: np.ndarray, t: int, cond: np.ndarray) -> np.ndarray:
        x32 = x.astype(np.float32)
        timestep = np.full(len(x), t, dtype=self.manifest.facts.timestep_dtype)
        eps_c = self.model._run({"sample": x32, "timestep": timestep, "cond": cond})
        eps_u = self.model._run({"sample": x32, "timestep": timestep,
                                 "cond": np.ascontiguousarray(self.model.nulls["cond"])})
        return to_eps(mix(eps_c, eps_u, self.w_at(t)), x, float(self.alphas_cumprod[t]),
                      self.manifest.facts.prediction)


def _conditions(manifest: Manifest, n: int, rng: np.random.Generator) -> np.ndarray:
    cond = manifest.facts.condition
    if cond.kind is ConditionKind.CLASS:
        return (np.arange(n) % cond.num_classes).astype(np.int64)
    return rng.standard_normal((n, *cond.shape)).astype(np.float32)


def _timed_loop(denoise: Callable, x: np.ndarray, cond, alphas_cumprod: np.ndarray, steps: int,
                warmup: int, model_seconds: Callable[[], float]) -> tuple[list[float], list[float]]:
    """Runs DDIM over warmup + steps timesteps; returns per-step wall and model seconds
    for the timed steps."""
    timesteps = make_timesteps(len(alphas_cumprod), warmup + steps, "trailing")
    walls, models = [], []
    last, last_model = time.perf_counter(), model_seconds()

    def on_step(i, t, x_t):
        nonlocal last, last_model
        now, now_model = time.perf_counter(), model_seconds()
        if i >= warmup:
            walls.append(now - last)
            models.append(now_model - last_model)
        last, last_model = time.perf_counter(), model_seconds()

    sample_ddim(denoise, x, cond, alphas_cumprod, timesteps, np.random.default_rng(0), on_step)
    return walls, models


def _row(artifact, precision, backend, mode, n, walls, models) -> BenchRow:
    ms = np.asarray(walls) * 1e3
    mean = float(ms.mean())
    host = mean - 1e3 * float(np.mean(models))
    return BenchRow(artifact=str(artifact), precision=precision, backend=backend, mode=mode, n=n,
                    p50_ms=float(np.percentile(ms, 50)), p90_ms=float(np.percentile(ms, 90)),
                    p99_ms=float(np.percentile(ms, 99)), host_ms=host, host_share=host / mean,
                    images_per_s=n / (mean * 1e-3 * 50), peak_rss_mb=_peak_rss_mb())


def artifact_modes(manifest: Manifest) -> list[str]:
    """The modes an artifact can be timed in: fused for a fused graph; stacked, two-pass and
    unguided for a dynamic stacked graph; stacked only for a static one (it cannot take N rows)."""
    if manifest.layout is Layout.FUSED:
        return ["fused"]
    if manifest.batch is None:
        return ["stacked", "two-pass", "unguided"]
    return ["stacked"]


def _bench_artifact(artifact: Artifact, backend_name: str, batches, steps, warmup, modes):
    manifest, directory = artifact.manifest, artifact.directory
    ac = manifest.facts.schedule.alphas_cumprod()
    null_embedding = None
    if manifest.facts.condition.kind is ConditionKind.EMBEDDING and manifest.layout is Layout.STACKED:
        null_embedding = artifact.null_embedding()
    wanted = artifact_modes(manifest)
    with open_backend(artifact, backend_name) as backend:
        for n in batches:
            if manifest.batch is not None and n != manifest.batch:
                raise CfgExportError(f"{directory} is a static graph for N={manifest.batch} images; "
                                     f"--batch asks for {n}: bench N={manifest.batch}, or re-export without --batch")
            rng = np.random.default_rng(n)
            x = rng.standard_normal((n, *manifest.facts.sample_shape))
            cond = _conditions(manifest, n, rng)
            for mode in wanted:
                if mode not in modes:
                    continue
                options = GuidanceOptions(w=W, interval=(0.0, 0.0) if mode == "unguided" else None)
                kind = TwoPassDenoiser if mode == "two-pass" else GuidedDenoiser
                denoise = kind(backend, ac, n, options, null_embedding=null_embedding)
                walls, models = _timed_loop(denoise, x, cond, ac, steps, warmup, lambda: denoise.model_seconds)
                yield _row(directory, manifest.precision, backend.name, mode, n, walls, models)


def _bench_torch(model: str, manifest: Manifest, batches, steps, warmup):
    """The diffusers-style eager loop users write: cat, call, chunk, mix, scheduler step."""
    from cfg_export.export.loading import load_model
    from cfg_export.runtime.errors import require

    torch = require("torch", "export")
    loaded = load_model(model)
    facts = loaded.facts
    if facts.condition.kind is not ConditionKind.CLASS:
        raise CfgExportError("the PyTorch baseline supports class-conditional models")
    ac = torch.from_numpy(facts.schedule.alphas_cumprod())
    timesteps = make_timesteps(len(ac), warmup + steps, "trailing")
    for n in batches:
        g = torch.Generator().manual_seed(n)
        x = torch.randn(n, *facts.sample_shape, generator=g, dtype=torch.float32)
        labels = torch.arange(n) % facts.condition.num_classes
        cond = torch.cat([labels, torch.full((n,), facts.condition.null)])
        walls, models = [], []
        with torch.inference_mode():
            for i, t in enumerate(timesteps):
                start = time.perf_counter()
                latent = torch.cat([x, x])
                t_in = torch.full((2 * n,), int(t), dtype=getattr(torch, facts.timestep_dtype))
                call = time.perf_counter()
                eps = loaded.module(latent, t_in, cond)
                model_s = time.perf_counter() - call
                eps_c, eps_u = eps[:, : facts.sample_shape[0]].chunk(2)
                eps = eps_u + (1 + W) * (eps_c - eps_u)  # diffusers' guidance_scale = 1 + w
                a_t = ac[t]
                a_prev = ac[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0, dtype=ac.dtype)
                x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
                x = (a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps).float()
                if i >= warmup:
                    walls.append(time.perf_counter() - start)
                    models.append(model_s)
        yield _row(model, "fp32", f"torch-eager-{torch.__version__}", "torch", n, walls, models)


def _ratios(rows: Sequence[BenchRow]) -> list[str]:
    lines = []
    by_key = {(r.mode, r.n, r.backend, r.precision): r for r in rows}
    for r in rows:
        if r.mode != "stacked":
            continue
        for other in ("two-pass", "unguided", "fused"):
            o = by_key.get((other, r.n, r.backend, r.precision))
            if o:
                lines.append(f"N={r.n} {r.backend} {r.precision}: {other} / stacked step time = {o.p50_ms / r.p50_ms:.2f}")
        for o in rows:
            if o.mode == "torch" and o.n == r.n and r.precision == "fp32":
                lines.append(f"N={r.n} {r.backend}: PyTorch eager loop / ours = {o.p50_ms / r.p50_ms:.2f}x")
    return lines


def run_bench(artifacts: Sequence["Artifact | str | Path"], batches: Sequence[int] | None = None, *,
              backends: Sequence[str] | None = None, precisions: Sequence[str] | None = None,
              modes: Sequence[str] | None = None, steps: int | None = None, warmup: int | None = None,
              torch_model: str | None = None, progress: Progress | None = None) -> BenchResult:
    """Returns per-step latencies (p50/p90/p99), host share, images/s and peak memory for each
    artifact (Artifacts or folders, each opened once; its precision), backend, image count N
    and mode, plus the ratios between modes. progress(done, total) counts configurations."""
    batches = list(DEFAULT_BATCHES if batches is None else batches)
    if not batches or any(not isinstance(b, (int, np.integer)) or b < 1 for b in batches):
        raise CfgExportError(f"--batch: got {batches}, expected image counts >= 1, like 1,4,16")
    steps = DEFAULT_STEPS if steps is None else int(steps)
    warmup = DEFAULT_WARMUP if warmup is None else int(warmup)
    if steps < 2 or warmup < 0:
        raise CfgExportError(f"steps: got {steps} timed and {warmup} warm-up, expected >= 2 and >= 0")
    modes = list(MODES if modes is None else modes)
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise CfgExportError(f"mode: got {bad[0]!r}, expected one of {', '.join(MODES)}")
    from cfg_export.runtime.backends.onnxrt import cuda_available

    available = ["onnxruntime-cpu"] + (["onnxruntime-cuda"] if cuda_available() else [])
    backends = list(backends or available)
    for name in backends:
        if name not in BACKENDS or name == "auto":
            raise CfgExportError(f"backend: got {name!r}, expected one of {', '.join(b for b in BACKENDS if b != 'auto')}"
                                 f" (available here: {', '.join(available)})")
    opened = [as_artifact(a) for a in artifacts]
    have = sorted({a.manifest.precision for a in opened})
    for p in precisions or []:
        if p not in have:
            raise CfgExportError(f"precision: got {p!r}; the artifacts given have {', '.join(have)} "
                                 "(add an artifact folder of that precision, e.g. one made by cfg-export quantize)")
    chosen = [a for a in opened if not precisions or a.manifest.precision in precisions]
    planned = sum(len([m for m in artifact_modes(a.manifest) if m in modes]) for a in chosen) * len(backends)
    planned = planned * len(batches) + (len(batches) if torch_model is not None and "torch" in modes else 0)
    if planned == 0:
        kinds = ", ".join(f"{a.directory} ({', '.join(artifact_modes(a.manifest))})" for a in chosen)
        raise CfgExportError(f"--mode {','.join(modes)}: no artifact given can be timed in that mode; the artifacts "
                             f"take: {kinds} (fused needs an artifact exported with --fuse-guidance, torch needs "
                             f"--torch-model)")
    result = BenchResult(machine=machine_facts())

    def done(row: BenchRow) -> None:
        result.rows.append(row)
        log.info("%s N=%d %s %s: p50 %.2f ms", row.mode, row.n, row.backend, row.precision, row.p50_ms)
        if progress is not None:
            progress(len(result.rows), planned)

    for artifact in chosen:
        for backend in backends:
            for row in _bench_artifact(artifact, backend, batches, steps, warmup, modes):
                done(row)
    if torch_model is not None and "torch" in modes:
        for row in _bench_torch(torch_model, opened[0].manifest, batches, steps, warmup):
            done(row)
    result.ratios = _ratios(result.rows)
    return result


def format_table(result: BenchResult) -> str:
    """Returns the rows as a fixed-width text table, the machine facts and the ratios."""
    head = f"{'mode':<9} {'N':>4} {'backend':<22} {'prec':<9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} " \
           f"{'host %':>7} {'img/s':>8} {'RSS MB':>7}"
    lines = [" ".join(f"{k}={v}" for k, v in result.machine.items() if v is not None), head, "-" * len(head)]
    for r in result.rows:
        lines.append(f"{r.mode:<9} {r.n:>4} {r.backend:<22} {r.precision:<9} {r.p50_ms:>8.2f} {r.p90_ms:>8.2f} "
                     f"{r.p99_ms:>8.2f} {100 * r.host_share:>6.1f}% {r.images_per_s:>8.1f} {r.peak_rss_mb:>7.0f}")
    return "\n".join(lines + [""] + result.ratios)
