"""Images per second and request latency of the Triton repository, with and without
row batching across requests, side by side in one run.

    cfg-export onnx examples/digits/denoiser -o out/digits
    python benchmarks/serve_throughput.py out/digits --clients 1,4,16 --steps 20

Two servers are started from the same artifact and options, one with the denoiser's
dynamic batching (rows of all requests in flight share one denoiser call) and one
without (one denoiser call per request and step). For each number of clients, each
server in turn gets that many closed-loop clients (each sends its next request when
the last returns) for --requests requests each; every request asks for --n images of
a class chosen per request, at w=3, a seed of its own. Each client count runs --rounds
rounds in which the two servers take turns (a busy shared machine drifts); prints the
median images/s, p50/p99 latency over all rounds' requests, denoiser rows per execution,
and the ratio of the median images/s.
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
    """Runs `clients` closed-loop clients of `requests` requests each; returns the figures
    (images/s, every latency, denoiser requests and executions)."""
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
    return {"images_per_s": clients * requests * n / wall, "latencies": latencies, "executions": executions,
            "calls": calls}


def run_rounds(servers: dict, clients: int, args, num_classes: int) -> dict:
    """Alternates the servers `args.rounds` times at this client count (the first server
    goes first in even rounds, second in odd ones); returns each server's pooled figures."""
    runs = {mode: [] for mode in servers}
    for r in range(args.rounds):
        order = list(servers) if r % 2 == 0 else list(servers)[::-1]
        for mode in order:
            runs[mode].append(run_clients(servers[mode].url, clients, args.requests, args.n, args.steps, num_classes,
                                          seed0=1000 * clients + 100 * r))
    pooled = {}
    for mode, results in runs.items():
        latencies = [s for f in results for s in f["latencies"]]
        calls, executions = sum(f["calls"] for f in results), sum(f["executions"] for f in results)
        pooled[mode] = {"images_per_s": statistics.median(f["images_per_s"] for f in results),
                        "rounds": [f["images_per_s"] for f in results],
                        "p50": percentile(latencies, 50), "p99": percentile(latencies, 99),
                        "requests": len(latencies), "rows_per_execution": 2 * args.n * calls / max(executions, 1)}
    return pooled


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="artifact folder (cfg-export onnx)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client and round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="rounds per client count; the two servers alternate within each (median images/s)")
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
        print(f"{args.artifact}: {args.rounds} rounds x {args.requests} requests per client, {args.n} image(s) of "
              f"{args.steps} DDIM steps at w=3 each; tritonserver from {servers['row batching'].binary.origin}; "
              f"queue delay {repo.options.queue_delay_us} us; {repo.options.sampler_instances} sampler instances")
        print(f"| clients | mode            | images/s (median) | p50 s  | p99 s  | rows/exec | requests |")
        print(f"|---------|-----------------|-------------------|--------|--------|-----------|----------|")
        ratios = {}
        for c in clients:
            figures = run_rounds(servers, c, args, num_classes)
            for mode, f in figures.items():
                print(f"| {c:>7} | {mode:<15} | {f['images_per_s']:17.2f} | {f['p50']:6.3f} | {f['p99']:6.3f} | "
                      f"{f['rows_per_execution']:9.1f} | {f['requests']:>8} |")
            ratios[c] = figures["row batching"]["images_per_s"] / figures["no row batching"]["images_per_s"]
        print("images/s with row batching / without: " + ", ".join(f"{r:.2f}x at {c} client{'s' * (c > 1)}"
                                                                     for c, r in ratios.items()))
    finally:
        for server in servers.values():
            server.stop()


if __name__ == "__main__":
    main()
