"""A client of the `sampler` model: one request, written like `cfg-export sample` writes.

request_samples asks a running server (cfg-export serve) for n images per condition and
writes the image grid (one row per condition) and/or the raw samples. The conditions,
weights and seed are laid out as sample_grid lays them out, so the same options give
the same images as `cfg-export sample` on the same artifact.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import check_output_file
from cfg_export.runtime.grid import DEFAULT_IMAGES_PER_CONDITION, class_rows, expand_w, read_npy, repeat_rows
from cfg_export.runtime.images import IMAGE_FORMATS, check_drawable, save_grid, save_npy
from cfg_export.runtime.pipeline_sampling import check_outputs

log = logging.getLogger(__name__)

MODEL = "sampler"
DEFAULT_TIMEOUT = 600.0  # seconds for one request (network_timeout of the HTTP client)
_TRITON_DTYPES = {np.dtype("int64"): "INT64", np.dtype("float64"): "FP64", np.dtype("float32"): "FP32",
                  np.dtype(object): "BYTES"}


@dataclass
class RequestResult:
    samples: np.ndarray  # [N, *S] float32, as the server returned them (a pipeline's: images [N, H, W, 3] in [0, 1])
    rows: int  # conditions: grid rows
    seconds: float  # wall time of the request
    written: list[tuple[Path, str]] = field(default_factory=list)
    latents: np.ndarray | None = None  # a pipeline's final latents [N, C, h, w] float32
    warnings: list[str] = field(default_factory=list)  # the server's (prompts it truncated)


def _http():
    return require("tritonclient.http", "serve")


def _server_error(url: str, exc: Exception) -> CfgExportError:
    """One line for what the client or the server raised."""
    message = exc.message() if hasattr(exc, "message") and callable(exc.message) else str(exc)
    message = (message or type(exc).__name__).strip().splitlines()[0]
    if "Connection refused" in message or isinstance(exc, ConnectionError):
        return CfgExportError(f"cannot reach a Triton server at {url} ({message}); start one with: "
                              f"cfg-export serve ARTIFACT")
    return CfgExportError(f"{url}: {message}")


def server_address(url: str) -> str:
    """Returns HOST:PORT of a server's HTTP endpoint given as HOST:PORT or http://HOST:PORT[/];
    raises CfgExportError naming the form expected (tritonclient's own refusals of a malformed
    URL are not one line)."""
    address = url.strip().removeprefix("http://").rstrip("/")
    host, colon, port = address.rpartition(":")
    ipv6 = host.startswith("[") and host.endswith("]") and len(host) > 2
    plain = host and not any(c in host for c in ":/@?# ")
    if url.strip().startswith("https://"):
        raise CfgExportError(f"URL: got {url!r}; cfg-export request speaks plain HTTP (as cfg-export serve "
                             f"listens): give HOST:PORT, e.g. 127.0.0.1:8000")
    if not colon or not (plain or ipv6) or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise CfgExportError(f"URL: got {url!r}, expected HOST:PORT of a Triton server's HTTP endpoint "
                             f"(port 1-65535), e.g. 127.0.0.1:8000 as cfg-export serve prints it")
    return address


class SamplerClient:
    """An HTTP connection to the sampler model of a server at `url` (host:port)."""

    def __init__(self, url: str, timeout: float | None = None, model: str = MODEL):
        self.url = server_address(url)
        self.model = model
        timeout = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        if not np.isfinite(timeout) or timeout <= 0:
            raise CfgExportError(f"--timeout: got {timeout:g}, expected seconds > 0")
        http = _http()
        try:
            self.client = http.InferenceServerClient(self.url, connection_timeout=min(timeout, 60.0),
                                                        network_timeout=timeout)
        except Exception as exc:  # tritonclient refuses a malformed URL with its own exception types
            raise _server_error(self.url, exc) from None
        self._parameters = None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "SamplerClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def parameters(self) -> dict:
        """Returns the sampler's parameters (condition, sample_shape, max_images, max_steps), read once."""
        if self._parameters is None:
            try:
                config = self.client.get_model_config(self.model)
            except Exception as exc:
                raise _server_error(self.url, exc) from None
            self._parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        return self._parameters

    def infer(self, values: dict, outputs: Sequence[str]) -> dict[str, np.ndarray]:
        """Returns the named outputs of one request of `values` by input name (None: not
        sent, the server's default): a str is one string, a list of str [K] strings, a dict
        one JSON object, an int [1] int64, a float [1] float64, an array as it is (ints as
        int64). Raises CfgExportError with the server's one-line message when it refuses."""
        http = _http()
        inputs = []
        for name, value in values.items():
            if value is None:
                continue
            if isinstance(value, dict):
                value = json.dumps(value)
            if isinstance(value, str):
                value = np.array([value.encode()], dtype=object)
            elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                value = np.array([v.encode() for v in value], dtype=object).reshape(len(value))
            elif not isinstance(value, np.ndarray):
                value = np.array([value], dtype=np.int64 if isinstance(value, (int, np.integer)) else np.float64)
            if value.dtype.kind in "iu":
                value = value.astype(np.int64)
            dtype = _TRITON_DTYPES.get(value.dtype)
            if dtype is None:
                raise CfgExportError(f"{name}: got {value.dtype} values, expected numbers")
            tensor = http.InferInput(name, list(value.shape), dtype)
            tensor.set_data_from_numpy(value, binary_data=True)
            inputs.append(tensor)
        try:
            result = self.client.infer(self.model, inputs,
                                       outputs=[http.InferRequestedOutput(name, binary_data=True) for name in outputs])
        except Exception as exc:
            raise _server_error(self.url, exc) from None
        return {name: result.as_numpy(name) for name in outputs}

    def sample(self, cond: np.ndarray, w=None, *, negative=None, steps: int | None = None,
               sampler: str | None = None, spacing: str | None = None, eta: float | None = None,
               seed: int | None = None, w_schedule: str | None = None,
               interval: tuple[float, float] | None = None, threshold: float | None = None,
               scheduler: dict | None = None, guidance_rescale: float | None = None,
               noise: np.ndarray | None = None) -> np.ndarray:
        """Returns the samples [N, *S] float32 of one request to a one-denoiser server: cond
        holds one condition per image (labels [N] or embeddings [N, L, D]); w one number or
        [N]; None leaves an option to the server's (sample_guided's) default. Raises
        CfgExportError with the server's one-line message when it refuses the request."""
        values = {"cond": np.asarray(cond), "w": None if w is None else np.asarray(w, dtype=np.float64).reshape(-1),
                  "negative": None if negative is None else np.asarray(negative),
                  "seed": None if seed is None else int(seed), "steps": None if steps is None else int(steps),
                  "eta": None if eta is None else float(eta), "threshold": None if threshold is None else float(threshold),
                  "sampler": sampler, "spacing": spacing, "w_schedule": w_schedule, "scheduler": scheduler,
                  "interval": None if interval is None else np.asarray(interval, dtype=np.float64),
                  "guidance_rescale": None if guidance_rescale is None else float(guidance_rescale),
                  "noise": None if noise is None else np.asarray(noise, dtype=np.float32)}
        return self.infer(values, ["samples"])["samples"]


def grid_conditions(parameters: dict, classes: Sequence[int] | None, cond, negative,
                    n: int) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Returns (cond, negative or None, rows) as sample_grid lays them out: each
    condition repeated n times. `parameters` are the sampler's (its condition kind)."""
    condition = json.loads(parameters.get("condition", "{}"))
    negatives = None
    if condition.get("kind") == "embedding":
        if classes is not None or cond is None:
            raise CfgExportError(f"this server's model takes embeddings {condition.get('shape')}: give "
                                 f"--cond FILE.npy")
        conds = read_npy(cond, "--cond") if isinstance(cond, (str, Path)) else np.asarray(cond)
        if conds.ndim == 2:
            conds = conds[None]
        if negative is not None:
            negatives = read_npy(negative, "--negative") if isinstance(negative, (str, Path)) else np.asarray(negative)
            negatives = negatives[None] if negatives.ndim == 2 else negatives
    else:
        conds, negatives = class_rows(classes, cond, negative, int(condition.get("num_classes", 0)),
                                      "this server's model")
    return repeat_rows(conds, negatives, n)


def request_samples(url: str, *, classes: Sequence[int] | None = None, cond=None, negative=None,
                    n: int | None = None, w=None, out: str | Path | None = None, npy: str | Path | None = None,
                    steps: int | None = None, sampler: str | None = None, spacing: str | None = None,
                    eta: float | None = None, seed: int | None = None, w_schedule: str | None = None,
                    interval: tuple[float, float] | None = None, threshold: float | None = None,
                    scheduler: dict | None = None, guidance_rescale: float | None = None, noise=None,
                    timeout: float | None = None) -> RequestResult:
    """Returns the samples of one request to a one-denoiser server at `url` and the files
    written: `n` images (default 8) per condition (class labels `classes`, default every
    class; or embeddings `cond`, an array or .npy path), as an image grid at `out` and/or
    the raw samples [N, ...] float32 at `npy`. The other arguments are sample_grid's
    (noise: an array or .npy path); the server checks them and refuses bad ones with one
    line (raised as CfgExportError).
    """
    import time

    if out is None and npy is None:
        raise CfgExportError("nothing to write: give -o FILE.png and/or --npy FILE.npy")
    n = DEFAULT_IMAGES_PER_CONDITION if n is None else int(n)
    if n < 1:
        raise CfgExportError(f"--n: got {n}, expected at least 1 image per condition")
    if out is not None:
        check_output_file(out, "-o", tuple(IMAGE_FORMATS))
    if npy is not None:
        check_output_file(npy, "--npy", (".npy",))
    if isinstance(noise, (str, Path)):
        noise = read_npy(noise, "--noise")
    with SamplerClient(url, timeout) as client:
        parameters = client.parameters()
        if parameters.get("kind") == "pipeline":
            raise CfgExportError(f"{client.url} serves a pipeline ({parameters.get('pipeline')}): give --prompt, or "
                                 f"--classes for a class-conditional one")
        if out is not None:
            check_drawable(tuple(json.loads(parameters.get("sample_shape", "[]"))))
        conds, negatives, rows = grid_conditions(parameters, classes, cond, negative, n)
        if noise is not None:  # checked here: Triton's own refusal of the shape names its model, not the option
            shape = [len(conds), *json.loads(parameters.get("sample_shape", "[]"))]
            if list(np.shape(noise)) != shape:
                raise CfgExportError(f"--noise: got shape {list(np.shape(noise))}, expected {shape} (N images x "
                                     f"sample shape)")
        start = time.perf_counter()
        samples = client.sample(conds, None if w is None else expand_w(w, rows, n), negative=negatives, steps=steps,
                                sampler=sampler, spacing=spacing, eta=eta, seed=seed, w_schedule=w_schedule,
                                interval=interval, threshold=threshold, scheduler=scheduler,
                                guidance_rescale=guidance_rescale, noise=noise)
        result = RequestResult(samples, rows, time.perf_counter() - start)
    if out is not None:
        save_grid(samples, rows=rows, path=out)
        result.written.append((Path(out), f"{len(conds)} image{'s' * (len(conds) != 1)}, one row per condition"))
    if npy is not None:
        save_npy(samples, npy)
        result.written.append((Path(npy), f"{list(samples.shape)} float32"))
    return result


# options that only one kind of server takes, by their flags
DENOISER_OPTIONS = {"cond": "--cond", "negative": "--negative", "n": "--n", "eta": "--eta"}
PIPELINE_OPTIONS = {"prompts": "--prompt", "negative_prompts": "--negative-prompt", "height": "--height",
                    "width": "--width", "latents": "--latents"}


def send_request(url: str, *, timeout: float | None = None, **options) -> RequestResult:
    """Returns the result of one request to the server at `url`, as `cfg-export sample`
    gives it on the served artifact: request_images for a pipeline server (prompts, or
    DiT's classes), request_samples for a one-denoiser server; options are theirs (None:
    the default), and an option of the other kind is refused with one line. classes may
    be strings (a DiT server takes names)."""
    if all(options.get(name) is None for name in ("out", "npy", "latents")):
        raise CfgExportError("nothing to write: give -o FILE.png and/or --npy FILE.npy (from a pipeline server also "
                             "--latents FILE.npy)")
    conditions = [flag for name, flag in (("prompts", "--prompt"), ("classes", "--classes"), ("cond", "--cond"))
                  if options.get(name) is not None]
    if len(conditions) > 1:  # no server takes two kinds of condition: refused before connecting
        raise CfgExportError(f"{' and '.join(conditions)}: give one kind of condition (--prompt for a text "
                             f"pipeline, --classes or --cond otherwise)")
    check_outputs(options.get("out"), options.get("npy"), options.get("latents"))  # before the request is sent
    with SamplerClient(url, timeout) as client:
        pipeline = client.parameters().get("kind") == "pipeline"
    given = {name: value for name, value in options.items() if value is not None}
    wrong = DENOISER_OPTIONS if pipeline else PIPELINE_OPTIONS
    for name, flag in wrong.items():
        if name in given:
            kind = "a pipeline (give --prompt, or --classes)" if pipeline else \
                "one denoiser (give --classes or --cond)"
            raise CfgExportError(f"{flag}: not an option of this server, which serves {kind}")
    if pipeline:
        from .pipeline_client import request_images

        return request_images(url, timeout=timeout, **given)
    classes = given.get("classes")
    if classes is not None:
        try:
            given["classes"] = [int(c) for c in classes]
        except (TypeError, ValueError):
            raise CfgExportError(f"--classes: got {','.join(map(str, classes))!r}, expected integers separated by "
                                 f"commas, like 0,1,2") from None
    return request_samples(url, timeout=timeout, **given)
