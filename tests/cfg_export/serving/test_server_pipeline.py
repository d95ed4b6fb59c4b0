"""Pipeline artifacts through a real Triton server (nvidia-pytriton's tritonserver,
Python backend, CPU) on 127.0.0.1: prompt requests running at the same time, each with
its own prompts, negatives, w, seed, steps, sampler and size, give what `cfg-export
sample` gives on the artifact; the rows of different requests share the batches of the
denoiser and of the text encoders; bad requests get one-line errors and the server keeps
serving; DiT takes class names and indices.

Tolerance: served images and latents must equal the solo run's to within 1e-5 (absolute;
images in [0, 1], latents of order 1). The server runs the runtime's own sample_pipeline
on the same numpy, tokenizers and ONNX Runtime; only the composition of each model's
batch differs (rows of other requests beside this one's), and ONNX Runtime may pick
other kernels or blockings at other batch sizes. On this machine they are bitwise equal.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.pipeline_sampling import sample_pipeline_files
from cfg_export.serving.client import SamplerClient, send_request
from tests.cfg_export.serving.conftest import needs_tritonserver, start_server

pytestmark = needs_tritonserver

ATOL = 1e-5
# 2 sampler processes of 3 runs each: rows merge in a process and across the two in Triton's
# batchers; a long delay, so that requests started together meet in the text encoders' batches too
SERVER = dict(sampler_instances=2, runs_per_sampler=3, max_queue=8, max_images=3, queue_delay_us=30000)
REQUESTS = [  # different prompts, negatives, w, seeds, steps, samplers and sizes
    dict(prompts=["a red car"], w=6.5, seed=0, steps=6),
    dict(prompts=["a cat", "the blue sky"], negative_prompts=["blurry"], w=[2.0, 4.0], seed=5, steps=4),
    dict(prompts=["a dog on the house"], negative_prompts=["ugly"], w=3.0, seed=9, steps=8, sampler="dpmpp-2m"),
    dict(prompts=["green tree", "a photo of a car"], negative_prompts=["blurry", "ugly"], w=1.0, seed=1, steps=5,
         sampler="euler", height=12, width=20),
    dict(prompts=["a red car"], w=0.0, seed=2, steps=7, spacing="trailing", guidance_rescale=0.7),
    dict(prompts=[""], w=2.5, seed=3, steps=3, sampler="ddpm"),
]


@pytest.fixture(scope="module")
def sd_server(served_pipelines, tmp_path_factory):
    server = start_server(served_pipelines["sd"], tmp_path_factory.mktemp("triton-sd"), **SERVER)
    yield server
    server.stop()


def stats(client: SamplerClient, model: str) -> tuple[int, int]:
    """(requests that succeeded, executions) of a model so far."""
    s = client.client.get_inference_statistics(model)["model_stats"][0]
    return s["inference_stats"]["success"]["count"], s["execution_count"]


def solo(artifact, tmp_path, name, options) -> tuple[np.ndarray, np.ndarray]:
    """What `cfg-export sample PIPELINE --npy --latents` writes for the same settings (its library call)."""
    guidance = {k: options[k] for k in ("guidance_rescale",) if k in options}
    kwargs = {k: v for k, v in options.items() if k not in guidance}
    if guidance:
        from cfg_export.runtime.guidance import GuidanceOptions

        kwargs["guidance"] = GuidanceOptions(rescale=guidance["guidance_rescale"])
    sample_pipeline_files(artifact, npy=tmp_path / f"{name}-images.npy", latents=tmp_path / f"{name}-latents.npy",
                          backend="onnxruntime-cpu", **kwargs)
    return np.load(tmp_path / f"{name}-images.npy"), np.load(tmp_path / f"{name}-latents.npy")


def served(server, tmp_path, name, options) -> tuple[np.ndarray, np.ndarray]:
    send_request(server.url, npy=tmp_path / f"{name}-images.npy", latents=tmp_path / f"{name}-latents.npy",
                 timeout=120, **options)
    return np.load(tmp_path / f"{name}-images.npy"), np.load(tmp_path / f"{name}-latents.npy")


def test_concurrent_prompt_requests_equal_sample_and_share_batches(sd_server, served_pipelines, tmp_path):
    models = ("text_encoder", "denoiser", "vae_decoder")
    with SamplerClient(sd_server.url) as client:
        before = {m: stats(client, m) for m in models}
        with ThreadPoolExecutor(len(REQUESTS)) as pool:
            futures = [pool.submit(served, sd_server, tmp_path, f"served{i}", r) for i, r in enumerate(REQUESTS)]
            results = [f.result(timeout=180) for f in futures]
        after = {m: stats(client, m) for m in models}
    for i, ((images, latents), r) in enumerate(zip(results, REQUESTS)):
        want_images, want_latents = solo(served_pipelines["sd"], tmp_path, f"solo{i}", r)
        height, width = r.get("height", 16), r.get("width", 16)
        assert images.shape == want_images.shape == (len(r["prompts"]), height, width, 3)
        assert latents.shape == (len(r["prompts"]), 4, height // 2, width // 2)
        np.testing.assert_allclose(images, want_images, rtol=0, atol=ATOL, err_msg=f"request {i}: {r}")
        np.testing.assert_allclose(latents, want_latents, rtol=0, atol=ATOL, err_msg=f"request {i}: {r}")
    calls = {"text_encoder": len(REQUESTS), "denoiser": sum(r["steps"] for r in REQUESTS),
             "vae_decoder": len(REQUESTS)}  # one per run and step
    requests = {m: after[m][0] - before[m][0] for m in models}
    executions = {m: after[m][1] - before[m][1] for m in models}
    # the calls of the runs in one sampler process merge before they leave it (fewer requests
    # than calls); Triton's batchers merge those of the two processes (fewer executions)
    assert all(0 < requests[m] <= calls[m] for m in models), (requests, calls)
    assert executions["denoiser"] < calls["denoiser"], executions
    assert executions["text_encoder"] < calls["text_encoder"], executions


@pytest.mark.parametrize("values, message", [
    ({"prompt": None}, "no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE"),
    ({"prompt": []}, "no prompt given: pass --prompt TEXT (repeatable) or --prompts FILE"),
    ({"prompt": ["a"] * 4}, "prompt: got 4 images, this server takes at most 3 per request; send several requests"),
    ({"w": np.array([np.nan])}, "w: got nan, expected a finite number (NaN and infinity are refused)"),
    ({"w": np.array([1.0, 2.0])}, "w: got 2 values, expected 1 or one per image (1)"),
    ({"height": 30}, "--height: got 30, expected a multiple of 4 pixels"),
    ({"width": 64}, "--width: got 64, outside the exported range 8..32"),
    ({"steps": 0}, "steps: got 0, expected 1 to 1000"),
    ({"negative_prompt": ["x", "y"]}, "--negative-prompt: got 2, expected one for all prompts or one per prompt (1)"),
    ({"sampler": "magic"}, "sampler: got 'magic', expected one of ddim, ddpm"),
    ({"seed": -1}, "seed: got -1, expected an integer 0 <= seed < 2**63"),
    ({"scheduler": "[1]"}, "scheduler: got '[1]', expected a JSON object of scheduler config fields"),
    ({"noise": np.zeros((1, 4, 4, 4), np.float32)}, "--noise: got shape [1, 4, 4, 4], expected [1, 4, 8, 8]"),
])
def test_bad_prompt_requests_get_one_line_errors_and_the_server_keeps_serving(sd_server, served_pipelines,
                                                                              tmp_path, values, message):
    values = {"prompt": ["a red car"], "steps": 2, **values}
    with SamplerClient(sd_server.url, timeout=60) as client:
        with pytest.raises(CfgExportError) as info:
            client.infer(values, ["images"])
    assert str(info.value).startswith(f"{sd_server.url}: {message}") and "\n" not in str(info.value)
    good = dict(prompts=["a cat"], w=2.0, seed=4, steps=2)
    for got, want in zip(served(sd_server, tmp_path, "good", good), solo(served_pipelines["sd"], tmp_path, "want",
                                                                         good)):
        np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_client_refuses_options_of_the_other_kind_before_sending(sd_server, tmp_path):
    with pytest.raises(CfgExportError, match=r"--n: not an option of this server, which serves a pipeline"):
        send_request(sd_server.url, prompts=["a"], n=2, npy=tmp_path / "x.npy")
    with pytest.raises(CfgExportError, match=r"--classes: this pipeline takes prompts \(--prompt\), not class labels"):
        send_request(sd_server.url, classes=["1"], npy=tmp_path / "x.npy")
    with pytest.raises(CfgExportError, match="-o, --npy and --latents name the same file"):
        send_request(sd_server.url, prompts=["a"], npy=tmp_path / "x.npy", latents=tmp_path / "x.npy")
    assert not (tmp_path / "x.npy").exists()


def test_request_cli_gives_what_sample_cli_gives(sd_server, served_pipelines, tmp_path):
    from click.testing import CliRunner

    from cfg_export.cli import main

    def run(*args):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result.output

    args = ["--prompt", "a red car", "--prompt", "a cat", "--negative-prompt", "blurry", "--w", "6.5", "--steps", "5",
            "--seed", "11", "--height", "12", "--width", "16"]
    output = run("request", sd_server.url, *args, "-o", tmp_path / "served.png", "--npy", tmp_path / "served.npy")
    assert f"wrote {tmp_path / 'served.npy'} (images [2, 12, 16, 3] float32 in [0, 1])" in output
    run("sample", served_pipelines["sd"], *args, "--npy", tmp_path / "sampled.npy", "-q")
    np.testing.assert_allclose(np.load(tmp_path / "served.npy"), np.load(tmp_path / "sampled.npy"), rtol=0, atol=ATOL)
    assert (tmp_path / "served.png").stat().st_size > 0
    result = CliRunner().invoke(main, ["request", sd_server.url, "--prompt", "a", "--w", "nan", "--npy",
                                       str(tmp_path / "bad.npy")])
    assert result.exit_code == 1 and not (tmp_path / "bad.npy").exists()
    assert result.output.strip().splitlines()[-1] == (f"Error: {sd_server.url}: w: got nan, expected a finite number "
                                                      f"(NaN and infinity are refused)")


def test_sdxl_two_text_encoders_and_dit_class_names(served_pipelines, tmp_path_factory, tmp_path):
    """SDXL: two text encoders (pooled output, time_ids) as two models; DiT: class names
    and indices, an unknown name refused."""
    root = tmp_path_factory.mktemp("triton-sdxl")
    sdxl = dict(prompts=["a red car", "a cat"], negative_prompts=["blurry"], w=5.0, seed=3, steps=3, height=12,
                width=16)
    with start_server(served_pipelines["sdxl"], root, sampler_instances=1) as server:
        for got, want in zip(served(server, tmp_path, "sdxl", sdxl), solo(served_pipelines["sdxl"], tmp_path,
                                                                          "sdxl-solo", sdxl)):
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
        with SamplerClient(server.url) as client:
            assert stats(client, "text_encoder_2") == (1, 1)
    dit = dict(classes=["great white shark", "0", "cock"], w=[1.0, 2.0, 4.0], seed=7, steps=4)
    dit_2 = dict(classes=["goldfish"], w=0.5, seed=8, steps=6)
    # without row batching: two runs in one sampler process, each calling the models on its own
    with start_server(served_pipelines["dit"], tmp_path_factory.mktemp("triton-dit"), sampler_instances=1,
                      runs_per_sampler=2, row_batching=False) as server:
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(served, server, tmp_path, f"dit{i}", r) for i, r in enumerate((dit, dit_2))]
            results = [f.result(timeout=120) for f in futures]
        for i, (got, r) in enumerate(zip(results, (dit, dit_2))):
            for got_part, want in zip(got, solo(served_pipelines["dit"], tmp_path, f"dit-solo{i}", r)):
                np.testing.assert_allclose(got_part, want, rtol=0, atol=ATOL)
        with SamplerClient(server.url) as client:
            assert stats(client, "denoiser") == (10, 10)  # one execution per run and step
        with pytest.raises(CfgExportError, match=r"--classes: got 'unicorn', expected a class index or a class name"):
            send_request(server.url, classes=["unicorn"], npy=tmp_path / "x.npy")
        with pytest.raises(CfgExportError, match=r"--prompt: this pipeline is class-conditional \(DiT\); give "
                                                 r"--classes"):
            send_request(server.url, prompts=["a cat"], npy=tmp_path / "x.npy")
