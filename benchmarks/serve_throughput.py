"""Images per second and request latency of the Triton repository, with and without
row batching across requests, side by side in one run.

    cfg-export onnx examples/digits/denoiser -o out/digits
    python benchmarks/serve_throughput.py out/digits --clients 1,4,16 --steps 20

Two servers are started from the same artifact and options, one with the denoiser's
dynamic batching (rows of all requests in flight share one denoiser call) and one
without (one denoiser call per request and step). For each number of clients, each
server in turn gets that many closed-loop clients (each sends its next request when
the last returns) for --requests requests each; every request asks for --n images of
a class chosen per request, at w=3, a seed of its own. Prints images/s, p50/p99
latency, denoiser executions per denoiser request, and the ratio of images/s.
Asserts nothing (speed targets live here, not in tests).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from cfg_export.runtime.artifact import Artifact
from cfg_export.serving.client import SamplerClient
from cfg_export.serving.options import RepositoryOptions
from cfg_export.serving.repository import write_repository
from cfg_export.serving.server import TritonServer


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def denoiser_counts(url: str) -> tuple[int, int]:
    """(denoiser requests, denoiser executions) so far."""
    with SamplerClient(url) as client:
        stats = client.client.get_inference_statistics("denoiser")["model_stats"][0]
    return stats["inference_stats"]["success"]["count"], stats["execution_count"]


def run_clients(url: str, clients: int, requests: int, n: int, steps: int, num_classes: int,
                seed0: int) -> dict:
    """Runs `clients` closed-loop clients of `requests` requests each; returns the figures."""
    def client_loop(index: int) -> list[float]:
        latencies = []
        with SamplerClient(url, timeout=600) as client:
            for r in range(requests):
                seed = seed0 + index * requests + r
                start = time.perf_counter()
                client.sample(np.full(n, seed % num_classes, dtype=np.int64), 3.0, steps=steps, seed=seed)
                latencies.append(time.perf_counter() - start)
        return latencies

    before = denoiser_counts(url)
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = [s for run in pool.map(client_loop, range(clients)) for s in run]
    wall = time.perf_counter() - start
    after = denoiser_counts(url)
    calls, executions = after[0] - before[0], after[1] - before[1]
    return {"images_per_s": clients * requests * n / wall, "p50": percentile(latencies, 50),
            "p99": percentile(latencies, 99), "requests": len(latencies), "wall": wall,
            "rows_per_execution": calls / max(executions, 1), "executions": executions, "calls": calls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="artifact folder (cfg-export onnx)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--n", type=int, default=1, help="images per request")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps per request")
    parser.add_argument("--queue-delay-us", type=int, default=None, help="batcher delay (default: the writer's)")
    parser.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads of the denoiser")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    artifact = Artifact.open(args.artifact)
    num_classes = artifact.manifest.facts.condition.num_classes
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    modes = {"row batching": True, "no row batching": False}
    servers = {}
    try:
        for mode, batching in modes.items():
            options = RepositoryOptions(row_batching=batching, sampler_instances=max(clients),
                                        max_queue=max(clients), queue_delay_us=args.queue_delay_us,
                                        threads=args.threads)
            repo = write_repository(artifact, work / mode.replace(" ", "-"), options)
            servers[mode] = TritonServer(repo.directory, log_path=work / f"{mode.replace(' ', '-')}.log").start()
            run_clients(servers[mode].url, max(clients), 1, args.n, 2, num_classes, 10**6)  # warm every instance
        print(f"{args.artifact}: {args.requests} requests per client, {args.n} image(s) of {args.steps} DDIM steps "
              f"at w=3 each; tritonserver from {servers['row batching'].binary.origin}; queue delay "
              f"{repo.options.queue_delay_us} us")
        print(f"{'clients':>7} | {'mode':<15} | {'images/s':>8} | {'p50 s':>7} | {'p99 s':>7} | "
              f"{'rows/exec':>9} | requests")
        ratios = {}
        for c in clients:
            figures = {}
            for mode in modes:  # side by side: the two servers take turns at each client count
                figures[mode] = f = run_clients(servers[mode].url, c, args.requests, args.n, args.steps, num_classes,
                                                seed0=1000 * c)
                print(f"{c:>7} | {mode:<15} | {f['images_per_s']:8.2f} | {f['p50']:7.3f} | {f['p99']:7.3f} | "
                      f"{2 * args.n * f['rows_per_execution']:9.1f} | {f['requests']}")
            ratios[c] = figures["row batching"]["images_per_s"] / figures["no row batching"]["images_per_s"]
        print("images/s with row batching / without: " + ", ".join(f"{r:.2f}x at {c} client{'s' * (c > 1)}"
                                                                     for c, r in ratios.items()))
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
