"""What a user can set on a model repository; None means the default, resolved here once."""
from __future__ import annotations

from dataclasses import dataclass, replace

from cfg_export.runtime.backends import BACKENDS
from cfg_export.runtime.engine import engine_profiles
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import Manifest

PLATFORMS = ("python", "onnxruntime_onnx", "tensorrt_plan")
DEFAULT_PLATFORM = "python"
DEFAULT_MAX_IMAGES = 16  # images per request
DEFAULT_MAX_ROWS = 64  # rows of one merged denoiser batch (python and onnxruntime_onnx)
DEFAULT_QUEUE_DELAY_US = 100  # how long an idle denoiser waits for more rows (a busy one takes all queued)
DEFAULT_SAMPLER_INSTANCES = 2  # sampler processes
DEFAULT_RUNS_PER_SAMPLER = 8  # sampling runs in flight in each sampler process (one thread each)
DEFAULT_DENOISER_INSTANCES = 1
DEFAULT_MAX_QUEUE = 64  # requests waiting for a sampler instance; more are refused at once
INT32_MAX = 2**31 - 1  # Triton's config fields (max_batch_size, count, max_queue_size) are int32
LIMITS = {  # the largest value of each option: processes and threads one machine can run, int32 fields
    "threads": 1024, "sampler_instances": 256, "runs_per_sampler": 1024, "denoiser_instances": 256,
    "max_rows": INT32_MAX, "max_images": INT32_MAX, "max_steps": INT32_MAX, "max_queue": INT32_MAX,
}
MAX_QUEUE_DELAY_US = 10_000_000  # 10 s: a batcher that waits longer holds every request that long


@dataclass(frozen=True)
class RepositoryOptions:
    """How `cfg-export triton` lays out the repository; None means the default.

    platform: the denoiser model's kind: python (a Python-backend model running the
    runtime's ONNX Runtime backend; what runs without Triton's ONNX Runtime and TensorRT
    backends), onnxruntime_onnx, or tensorrt_plan (the artifact's engine).
    """

    platform: str | None = None
    backend: str | None = None  # python platform: the runtime backend it opens (default auto)
    threads: int | None = None  # python platform: ONNX Runtime intra-op threads (default: one per core)
    spinning: bool | None = None  # python platform: ONNX Runtime's worker threads of every stage model spin
    # after a call (True), or of none (False, the default; README, serving: what spinning changed)
    row_batching: bool | None = None  # merge the rows of all requests in flight (default on)
    max_rows: int | None = None  # denoiser max_batch_size in rows (default 64; the engine's largest profile)
    queue_delay_us: int | None = None  # dynamic batcher max_queue_delay_microseconds (default 100)
    max_images: int | None = None  # images per request (default 16)
    max_steps: int | None = None  # sampling steps per request (default: the training timesteps T)
    sampler_instances: int | None = None  # sampler processes (default 2)
    runs_per_sampler: int | None = None  # sampling runs in flight in each (default 8): their rows merge in the process
    denoiser_instances: int | None = None  # denoiser model instances (default 1)
    max_queue: int | None = None  # requests waiting for a sampler instance (default 64)

    def __post_init__(self):
        if self.platform is not None and self.platform not in PLATFORMS:
            raise CfgExportError(f"platform: got {self.platform!r}, expected one of {', '.join(PLATFORMS)}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise CfgExportError(f"backend: got {self.backend!r}, expected one of {', '.join(BACKENDS)}")
        for name in ("threads", "max_rows", "max_images", "max_steps", "sampler_instances", "runs_per_sampler",
                     "denoiser_instances", "max_queue"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise CfgExportError(f"{name.replace('_', '-')}: got {value!r}, expected an integer >= 1")
            if value is not None and value > LIMITS[name]:
                raise CfgExportError(f"{name.replace('_', '-')}: got {value}, expected at most {LIMITS[name]}")
        if self.queue_delay_us is not None and (isinstance(self.queue_delay_us, bool) or
                                                not isinstance(self.queue_delay_us, int) or
                                                not 0 <= self.queue_delay_us <= MAX_QUEUE_DELAY_US):
            raise CfgExportError(f"queue-delay-us: got {self.queue_delay_us!r}, expected microseconds in "
                                 f"0..{MAX_QUEUE_DELAY_US}")
        if (self.platform or DEFAULT_PLATFORM) != "python":
            for name, flag in (("backend", "--backend"), ("threads", "--threads"),
                               ("spinning", "--spinning/--no-spinning")):
                if getattr(self, name) is not None:
                    raise CfgExportError(f"{flag} applies to the python platform (the runtime's backend inside "
                                         f"Triton), not {self.platform}: drop {flag}")


def spins(options: RepositoryOptions) -> bool:
    """Whether the ONNX Runtime threads of the python-platform stage models spin after a
    call: --spinning; by default none do (under many clients spinning threads take the
    cores the sampler processes need; README, serving: what spinning changed)."""
    return bool(options.spinning)


def resolve_options(options: RepositoryOptions | None, manifest: Manifest) -> RepositoryOptions:
    """Returns the options with every default filled in for the denoiser `manifest`
    (the engine's for tensorrt_plan); raises CfgExportError where they contradict it."""
    o = options or RepositoryOptions()
    platform = o.platform or DEFAULT_PLATFORM
    per_image = manifest.rows_per_image
    max_images = o.max_images or DEFAULT_MAX_IMAGES
    if platform == "tensorrt_plan":
        profiles = engine_profiles(manifest)
        largest = max((p.rows[2] for p in profiles), default=None)
        if largest is None:
            raise CfgExportError("the engine manifest lists no profiles; rebuild it with cfg-export trt")
        if o.max_rows is not None and o.max_rows > largest:
            raise CfgExportError(f"--max-rows: got {o.max_rows}, but the engine's largest profile takes {largest} "
                                 f"rows; rebuild it with a larger --max-batch, or give --max-rows {largest}")
        max_rows = o.max_rows or largest
        if o.max_images is None:
            max_images = min(max_images, max_rows // per_image)
    else:
        max_rows = o.max_rows or max(DEFAULT_MAX_ROWS, per_image * max_images)
        if max_rows > INT32_MAX:
            raise CfgExportError(f"--max-images {max_images} needs {per_image * max_images} rows per call, more than "
                                 f"a Triton batch holds ({INT32_MAX}): lower --max-images")
    if per_image * max_images > max_rows:
        raise CfgExportError(f"--max-images {max_images} needs {per_image * max_images} rows per call, more than "
                             f"--max-rows {max_rows}: raise --max-rows or lower --max-images")
    T = manifest.facts.schedule.num_train_timesteps
    if o.max_steps is not None and o.max_steps > T:
        raise CfgExportError(f"--max-steps: got {o.max_steps}, but the model has {T} training timesteps; "
                             f"give at most {T}")
    python = platform == "python"
    return replace(o, platform=platform, backend=o.backend or ("auto" if python else None),
                   spinning=o.spinning if python else None,
                   row_batching=True if o.row_batching is None else o.row_batching, max_rows=max_rows,
                   queue_delay_us=DEFAULT_QUEUE_DELAY_US if o.queue_delay_us is None else o.queue_delay_us,
                   max_images=max_images, max_steps=o.max_steps or T,
                   sampler_instances=o.sampler_instances or DEFAULT_SAMPLER_INSTANCES,
                   runs_per_sampler=o.runs_per_sampler or DEFAULT_RUNS_PER_SAMPLER,
                   denoiser_instances=o.denoiser_instances or DEFAULT_DENOISER_INSTANCES,
                   max_queue=o.max_queue or DEFAULT_MAX_QUEUE)
