"""sample_guided and `python -m runtime sample` on real exported artifacts."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import GuidanceOptions
from cfg_export.runtime.pipeline import sample_guided
from tests.conftest import ROOT


def run_runtime(*args):
    return subprocess.run([sys.executable, "-m", "runtime", "sample", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm", "dpmpp-2m"])
def test_stacked_and_fused_give_the_same_samples(tiny_artifacts, sampler):
    labels, w = [0, 1, 2, 1], [0.0, 1.0, 3.0, -2.0]
    a = sample_guided(tiny_artifacts / "stacked", labels, w, steps=10, sampler=sampler, seed=3)
    b = sample_guided(tiny_artifacts / "fused", labels, w, steps=10, sampler=sampler, seed=3)
    assert a.samples.shape == (4, 2, 6, 6) and a.samples.dtype == np.float32
    np.testing.assert_allclose(a.samples, b.samples, rtol=1e-4, atol=1e-4)


def test_seed_and_noise_reproducibility(tiny_artifacts):
    run = lambda **kw: sample_guided(tiny_artifacts / "stacked", [0, 1], 2.0, steps=8, sampler="ddpm", **kw).samples
    np.testing.assert_array_equal(run(seed=1), run(seed=1))
    assert not np.allclose(run(seed=1), run(seed=2))
    noise = np.random.default_rng(9).standard_normal((2, 2, 6, 6))
    ddim = lambda seed: sample_guided(tiny_artifacts / "stacked", [0, 1], 2.0, steps=8, noise=noise, seed=seed).samples
    np.testing.assert_array_equal(ddim(0), ddim(5))  # DDIM eta=0 from given noise: the seed does not matter


def test_w_minus_one_is_unconditional(tiny_artifacts):
    """w = -1 leaves only the null rows: the labels no longer matter."""
    noise = np.random.default_rng(0).standard_normal((2, 2, 6, 6))
    a = sample_guided(tiny_artifacts / "stacked", [0, 0], -1.0, steps=5, noise=noise).samples
    b = sample_guided(tiny_artifacts / "stacked", [1, 2], -1.0, steps=5, noise=noise).samples
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_guidance_interval_halves_the_rows(tiny_artifacts):
    rows = []
    sample_guided(tiny_artifacts / "stacked", [0, 1, 2], 2.0, steps=20, guidance=GuidanceOptions(interval=(0.0, 1.0)),
                  record=lambda feeds: rows.append(len(feeds["sample"])))
    assert set(rows) == {3, 6} and rows[0] == 3  # high noise first: outside the interval


def test_static_batch(tiny_artifacts):
    assert sample_guided(tiny_artifacts / "static2", [0, 1], 1.0, steps=3).samples.shape == (2, 2, 6, 6)
    with pytest.raises(CfgExportError, match="the graph is static for N=2 images; got 3"):
        sample_guided(tiny_artifacts / "static2", [0, 1, 2], 1.0, steps=3)


def test_nan_during_sampling_names_the_step(tiny_artifacts):
    with pytest.raises(CfgExportError, match=r"ddim: NaN or Inf in the sample at step \d+/10"):
        sample_guided(tiny_artifacts / "stacked", [0, 1], 1e300, steps=10)


@pytest.mark.parametrize("kwargs,message", [
    ({"labels": [0, 5]}, "class 5 out of range: the model has classes 0..2 (null class 3)"),
    ({"w": float("nan")}, "w: got nan, expected a finite number"),
    ({"steps": 0}, "steps: got 0, expected 1..100"),
    ({"steps": 101}, "steps: got 101, expected 1..100"),
    ({"noise": np.zeros((3, 2, 6, 6))}, "noise: got shape [3, 2, 6, 6], expected [2, 2, 6, 6]"),
    ({"sampler": "euler-a"}, "sampler: got 'euler-a', expected one of ddim, ddpm, pndm, euler,"),
    ({"backend": "tpu"}, "backend: got 'tpu', expected one of auto, onnxruntime-cpu"),
    ({"eta": 0.5, "sampler": "ddpm"}, "eta applies to the ddim sampler only"),
])
def test_bad_input(tiny_artifacts, kwargs, message):
    kwargs = {"labels": [0, 1], "w": 1.0, **kwargs}
    with pytest.raises(CfgExportError) as info:
        sample_guided(tiny_artifacts / "stacked", kwargs.pop("labels"), kwargs.pop("w"), **kwargs)
    assert message in str(info.value)


def copy_artifact(src, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_refuses_a_changed_model_file(tiny_artifacts, tmp_path):
    art = copy_artifact(tiny_artifacts / "stacked", tmp_path)
    shutil.copyfile(tiny_artifacts / "fused" / "model.onnx", art / "model.onnx")
    with pytest.raises(CfgExportError, match="does not match its manifest: sha256"):
        sample_guided(art, [0], 1.0, steps=2)


def test_refuses_a_manifest_that_differs_from_the_model(tiny_artifacts, tmp_path):
    art = copy_artifact(tiny_artifacts / "stacked", tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["prediction"] = "v"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CfgExportError, match="prediction: model file says 'eps', manifest says 'v'"):
        sample_guided(art, [0], 1.0, steps=2)
    manifest["prediction"] = "eps"
    manifest["inputs"][0]["shape"] = ["2N", 2, 7, 7]
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CfgExportError, match=r"input 'sample': model shape \['2N', 2, 6, 6\], manifest says"):
        sample_guided(art, [0], 1.0, steps=2)


@pytest.mark.parametrize("damage,message", [
    ("no_dir", "no such artifact folder"),
    ("no_manifest", "no manifest.json in it"),
    ("corrupt_manifest", "corrupt manifest"),
    ("no_model", "model.onnx: missing"),
])
def test_broken_artifact(tiny_artifacts, tmp_path, damage, message):
    art = copy_artifact(tiny_artifacts / "stacked", tmp_path)
    if damage == "no_dir":
        art = tmp_path / "nothing"
    elif damage == "no_manifest":
        (art / "manifest.json").unlink()
    elif damage == "corrupt_manifest":
        (art / "manifest.json").write_text('{"format": "cfg-')
    else:
        (art / "model.onnx").unlink()
    proc = run_runtime(art, "--npy", tmp_path / "x.npy")
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: ") and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.npy").exists()


def test_cli_writes_grid_and_npy(tiny_artifacts, tmp_path):
    proc = run_runtime(tiny_artifacts / "stacked", "--w", "3", "--steps", "5", "--classes", "0,2", "--n", "3",
                       "--npy", tmp_path / "s.npy")
    assert proc.returncode == 0, proc.stderr
    samples = np.load(tmp_path / "s.npy")
    assert samples.shape == (6, 2, 6, 6) and samples.dtype == np.float32
    assert "5 steps on onnxruntime-cpu" in proc.stdout and "host" in proc.stdout
    want = sample_guided(tiny_artifacts / "stacked", [0, 0, 0, 2, 2, 2], 3.0, steps=5).samples
    np.testing.assert_array_equal(samples, want)


def test_cli_non_image_samples(tiny_artifacts, tmp_path):
    proc = run_runtime(tiny_artifacts / "audio", "--steps", "3", "-o", tmp_path / "g.png")
    assert proc.returncode == 1 and "cannot draw samples of shape [3, 10]" in proc.stderr
    assert "--npy" in proc.stderr and not (tmp_path / "g.png").exists()
    proc = run_runtime(tiny_artifacts / "audio", "--steps", "3", "--n", "2", "--npy", tmp_path / "a.npy")
    assert proc.returncode == 0 and np.load(tmp_path / "a.npy").shape == (6, 3, 10)


@pytest.mark.parametrize("args,message", [
    (["--noise", "missing.npy"], "--noise missing.npy: cannot read it as .npy"),
    (["--n", "0"], "--n: got 0, expected at least 1"),
    (["--interval", "1"], "--interval: got '1', expected two noise levels"),
    ([], "nothing to write"),
])
def test_cli_bad_input(tiny_artifacts, tmp_path, args, message):
    out = [] if not args else ["--npy", tmp_path / "x.npy"]
    proc = run_runtime(tiny_artifacts / "stacked", *args, *out)
    assert proc.returncode == 1 and message in proc.stderr, proc.stderr


def test_cli_asks_for_classes_when_there_are_many(tmp_path):
    from cfg_export.export.exporter import export_onnx

    export_onnx("tests.models:many_classes", tmp_path / "a", check=False)
    proc = run_runtime(tmp_path / "a", "--steps", "2", "--npy", tmp_path / "x.npy")
    assert proc.returncode == 1 and "this model has 40 classes: pick the grid rows with --classes" in proc.stderr
    proc = run_runtime(tmp_path / "a", "--steps", "2", "--classes", "39", "--n", "1", "--npy", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
