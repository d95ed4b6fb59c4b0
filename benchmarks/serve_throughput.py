"""Images per second and request latency of the Triton repository, with and without
row batching across requests, side by side in one run.

    cfg-export onnx examples/digits/denoiser -o out/digits
    python benchmarks/serve_throughput.py out/digits --clients 1,4,16 --steps 20
    python benchmarks/serve_throughput.py --tiny-sd --clients 1,4,16 --layouts 2x8,16x1

For each sampler layout (--layouts PROCESSESxRUNS: sampler processes, and runs in flight
in each), two servers are started from the same artifact and options: one with row
batching (the runs of one sampler process merge their model calls before they leave it,
and each stage model's dynamic batcher merges the calls of the processes) and one without
(one model call per request and step, no dynamic batcher). For each number of clients,
each server in turn gets that many closed-loop clients (each sends its next request when
the last returns) for --requests requests each. A request asks for --n images of a class
chosen per request, at w=3, a seed of its own; for a pipeline artifact, of a prompt at
w=6.5 (or of a class, for DiT): text encoders, denoiser steps and the VAE decoder, all
served. --tiny-sd exports the tiny Stable Diffusion pipeline of tests/tiny_pipelines.py
(needs torch, diffusers, transformers) and runs on it. --compare-spinning adds, for each
layout, the same two servers with ONNX Runtime's threads spinning in every model
(--spinning; the writer's default is none).
Each client count runs --rounds rounds in which the servers take turns, in reversed order
every other round (a busy shared machine drifts); prints the median images/s, p50/p99
latency over all rounds' requests, denoiser rows per execution, denoiser requests (BLS
calls) per request and step, and the ratios of the median images/s. Prints the load
average, which includes these servers' own work.
Asserts nothing (speed targets live here, not in tests).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from cfg_export.runtime.artifact import Artifact
from cfg_export.serving.client import SamplerClient
from cfg_export.serving.options import RepositoryOptions, spins
from cfg_export.serving.repository import write_repository
from cfg_export.serving.server import TritonServer


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def denoiser_counts(url: str) -> tuple[int, int]:
    """(denoiser requests, denoiser executions) so far."""
    with SamplerClient(url) as client:
        stats = client.client.get_inference_statistics("denoiser")["model_stats"][0]
    return stats["inference_stats"]["success"]["count"], stats["execution_count"]


PROMPTS = ["a red car", "a photo of a cat", "the blue sky", "a green tree on the house", "a dog in the house"]


def send_one(client: SamplerClient, kind: dict, n: int, steps: int, seed: int) -> None:
    """One request of n images: classes of a one-denoiser artifact, prompts (or DiT classes) of a pipeline."""
    if kind["pipeline"] and kind["text"]:
        client.infer({"prompt": [PROMPTS[seed % len(PROMPTS)]] * n, "w": 6.5, "steps": steps, "seed": seed},
                     ["images"])
    elif kind["pipeline"]:
        client.infer({"classes": [str(seed % kind["num_classes"])] * n, "w": 3.0, "steps": steps, "seed": seed},
                     ["images"])
    else:
        client.sample(np.full(n, seed % kind["num_classes"], dtype=np.int64), 3.0, steps=steps, seed=seed)


class ModelProcessDied(RuntimeError):
    """A model process of a server died during a run."""


def run_clients(url: str, clients: int, requests: int, n: int, steps: int, kind: dict, seed0: int,
                server: TritonServer | None = None) -> dict:
    """Runs `clients` closed-loop clients of `requests` requests each; returns the figures
    (images/s, every latency, denoiser requests and executions). With `server`, stops with
    an error when one of its model processes dies (its requests would never be answered)."""
    def client_loop(index: int) -> list[float]:
        latencies = []
        with SamplerClient(url, timeout=600) as client:
            for r in range(requests):
                seed = seed0 + index * requests + r
                start = time.perf_counter()
                send_one(client, kind, n, steps, seed)
                latencies.append(time.perf_counter() - start)
        return latencies

    before = denoiser_counts(url)
    start = time.perf_counter()
    pool = ThreadPoolExecutor(clients)
    try:
        futures = [pool.submit(client_loop, index) for index in range(clients)]
        while wait(futures, timeout=1.0).not_done:
            dead = server.dead_models() if server is not None else []
            if dead:
                raise ModelProcessDied(f"the model process of {', '.join(dead)} died during the run: its requests are "
                                   f"never answered; run the benchmark again")
        latencies = [s for future in futures for s in future.result()]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # stopping the server ends clients left waiting
    wall = time.perf_counter() - start
    after = denoiser_counts(url)
    calls, executions = after[0] - before[0], after[1] - before[1]
    return {"images_per_s": clients * requests * n / wall, "latencies": latencies, "executions": executions,
            "calls": calls}


def run_rounds(servers: dict, clients: int, args, kind: dict) -> dict:
    """Alternates the servers `args.rounds` times at this client count (the first server
    goes first in even rounds, second in odd ones); returns each server's pooled figures."""
    runs = {mode: [] for mode in servers}
    for r in range(args.rounds):
        order = list(servers) if r % 2 == 0 else list(servers)[::-1]
        for mode in order:
            runs[mode].append(run_clients(servers[mode].url, clients, args.requests, args.n, args.steps, kind,
                                          seed0=1000 * clients + 100 * r, server=servers[mode]))
    pooled = {}
    for mode, results in runs.items():
        latencies = [s for f in results for s in f["latencies"]]
        calls, executions = sum(f["calls"] for f in results), sum(f["executions"] for f in results)
        pooled[mode] = {"images_per_s": statistics.median(f["images_per_s"] for f in results),
                        "rounds": [f["images_per_s"] for f in results],
                        "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                        "requests": len(latencies),
                        "rows_per_execution": 2 * args.n * args.steps * len(latencies) / max(executions, 1),
                        "calls_per_step": calls / (args.steps * len(latencies))}
    return pooled


def artifact_kind(artifact: Artifact) -> dict:
    """What the requests of the benchmark carry: classes, prompts (a text pipeline) or DiT classes."""
    pipeline = artifact.is_pipeline
    text = pipeline and "prompt" in artifact.pipeline
    num_classes = 0 if text else artifact.manifest.facts.condition.num_classes
    return {"pipeline": pipeline, "text": text, "num_classes": num_classes}


def tiny_sd(folder: Path) -> Path:
    """The tiny Stable Diffusion pipeline of tests/tiny_pipelines.py, exported at folder/artifact."""
    import sys
    import warnings

    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # their notes would bury the table
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cfg_export.export.pipelines import export_pipeline
    from tests import tiny_pipelines

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_pipeline(tiny_pipelines.save_sd(folder / "diffusers"), folder / "artifact")
    return folder / "artifact"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", nargs="?", help="artifact folder (cfg-export onnx)")
    parser.add_argument("--tiny-sd", action="store_true", help="export and serve the tests' tiny SD pipeline")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per client count; the servers take turns within each (median images/s)")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per request")
    parser.add_argument("--layouts", default="2x8",
                        help="sampler layouts, PROCESSESxRUNS (runs in flight per process), comma-separated: each is "
                             "served with and without row batching, e.g. 2x8,16x1")
    parser.add_argument("--queue-delay-us", type=int, default=None, help="batcher delay (default: the writer's)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of each stage model")
    parser.add_argument("--denoiser-instances", type=int, default=None, help="default: the writer's")
    parser.add_argument("--spinning", action=argparse.BooleanOptionalAction, default=None,
                        help="ONNX Runtime threads of every stage model spin after a call, or of none (the "
                             "writer's default)")
    parser.add_argument("--compare-spinning", action="store_true",
                        help="also serve each layout with spinning in every model (--spinning), side by side")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if (args.artifact is None) == (not args.tiny_sd):
        parser.error("give an artifact folder or --tiny-sd")
    layouts = [tuple(int(v) for v in layout.split("x")) for layout in args.layouts.split(",")]

    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    artifact = Artifact.open(tiny_sd(work) if args.tiny_sd else args.artifact)
    kind = artifact_kind(artifact)
    servers = {}
    try:
        variants = [(f"{p}x{r}", p, r, args.spinning) for p, r in layouts]
        if args.compare_spinning:
            variants += [(f"{p}x{r} spinning", p, r, True) for p, r in layouts]
        for name, processes, runs, spinning in variants:
            for batching in (True, False):
                mode = f"{'row batching' if batching else 'no row batching'}, {name}"
                options = RepositoryOptions(row_batching=batching, sampler_instances=processes, runs_per_sampler=runs,
                                            max_queue=max(clients), queue_delay_us=args.queue_delay_us,
                                            threads=args.threads, denoiser_instances=args.denoiser_instances,
                                            spinning=spinning)
                folder = work / mode.replace(" ", "-").replace(",", "")
                repo = write_repository(artifact, folder, options)
                first = first if servers else repo.options
                servers[mode] = TritonServer(repo.directory, log_path=folder.with_suffix(".log")).start()
                run_clients(servers[mode].url, max(clients), 1, args.n, 2, kind, 10**6,  # warm every instance
                            server=servers[mode])
        o = first
        what = "prompt" if kind["text"] else "class"
        print(f"{'tiny SD pipeline' if args.tiny_sd else args.artifact} ({', '.join(repo.models)}): {args.rounds} "
              f"rounds x {args.requests} requests per client, {args.n} image(s) of a {what}, {args.steps} steps at "
              f"w={6.5 if kind['text'] else 3} each; tritonserver from {next(iter(servers.values())).binary.origin}; "
              f"sampler layouts PROCESSESxRUNS {args.layouts}; queue delay {o.queue_delay_us} us; "
              f"{o.denoiser_instances} denoiser instance(s); ONNX Runtime threads {o.threads or 'default'}, spinning "
              f"{'in every model' if spins(o) else 'in no model'}"
              f"{' (and in every model, side by side)' if args.compare_spinning else ''}; "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start")
        width = max(len(mode) for mode in servers)
        print(f"| clients | {'server':<{width}} | images/s (median) | p50 s  | p99 s  | rows/exec | calls/step | "
              f"requests |")
        print(f"|---------|-{'-' * width}-|-------------------|--------|--------|-----------|------------|----------|")
        ratios = {}
        for c in clients:
            figures = run_rounds(servers, c, args, kind)
            for mode, f in figures.items():
                print(f"| {c:>7} | {mode:<{width}} | {f['images_per_s']:17.2f} | {f['p50']:6.3f} | {f['p99']:6.3f} | "
                      f"{f['rows_per_execution']:9.1f} | {f['calls_per_step']:10.2f} | {f['requests']:>8} |", flush=True)
            best_without = max(f["images_per_s"] for mode, f in figures.items() if mode.startswith("no "))
            ratios[c] = {name: figures[f"row batching, {name}"]["images_per_s"] /
                         figures[f"no row batching, {name}"]["images_per_s"] for name, *_ in variants}
            ratios[c]["vs best without"] = figures[next(iter(servers))]["images_per_s"] / best_without
        print("images/s with row batching / without (same layout; first layout vs the best without):")
        for c, r in ratios.items():
            print(f"  {c} client{'s' * (c > 1)}: " + ", ".join(f"{name} {value:.2f}x" for name, value in r.items()))
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
    finally:
        for server in servers.values():
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    try:
        main()
    except ModelProcessDied as exc:
        raise SystemExit(f"error: {exc}") from None
