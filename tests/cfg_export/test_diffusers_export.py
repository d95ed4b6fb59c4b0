"""cfg-export onnx on folders saved by diffusers: the manifest's facts, the exported graph
against the diffusers module's own forward, and every bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DiTTransformer2DModel, UNet2DConditionModel, UNet2DModel  # noqa: E402

from cfg_export.export.diffusers_models import SUPPORTED, load_diffusers  # noqa: E402
from cfg_export.runtime.errors import CfgExportError  # noqa: E402
from cfg_export.runtime.manifest import read_manifest  # noqa: E402
from tests import tiny_diffusers  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

BATCHES = (1, 3)  # images N: the stacked graph runs 2N rows


def session(directory: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(directory / "model.onnx"), providers=["CPUExecutionProvider"])


def rel_error(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


def stacked_feeds(n: int, sample_shape, cond: np.ndarray, null: np.ndarray, seed: int) -> dict:
    """[cond rows; null rows] with random samples and timesteps, as the runtime feeds them."""
    g = np.random.default_rng(seed)
    return {"sample": g.standard_normal((2 * n, *sample_shape)).astype(np.float32),
            "timestep": np.tile(g.integers(0, tiny_diffusers.NUM_TRAIN_TIMESTEPS, n), 2).astype(np.int64),
            "cond": np.concatenate([cond, null])}


# --- the manifest's facts ------------------------------------------------------------

def test_unet2d_facts_from_config_and_scheduler(diffusers_artifacts):
    m = read_manifest(diffusers_artifacts["unet2d"])
    assert m.facts.condition.to_dict() == {"kind": "class", "num_classes": 3, "null": 3}  # num_class_embeds 4
    assert m.facts.sample_shape == (3, 8, 8) and m.facts.prediction.value == "eps"
    assert m.facts.schedule.to_dict() == {"kind": "linear", "num_train_timesteps": 1000, "beta_start": 1e-4,
                                          "beta_end": 0.02}
    assert [(s.name, list(s.shape), s.dtype) for s in m.inputs] == [
        ("sample", ["2N", 3, 8, 8], "float32"), ("timestep", ["2N"], "int64"), ("cond", ["2N"], "int64")]


def test_dit_null_class_is_num_classes(diffusers_artifacts):
    m = read_manifest(diffusers_artifacts["dit"])
    assert m.facts.condition.to_dict() == {"kind": "class", "num_classes": 1000, "null": 1000}
    assert m.facts.sample_shape == (4, 8, 8) and list(m.outputs[0].shape) == ["2N", 4, 8, 8]  # sigma dropped


def test_null_embedding_is_stored_in_the_artifact(diffusers_artifacts, diffusers_folders):
    art = diffusers_artifacts["sd"]
    m = read_manifest(art)
    assert m.facts.condition.to_dict() == {"kind": "embedding", "null_file": "null_embedding.npy",
                                           "shape": [tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM]}
    assert list(m.input("cond").shape) == ["2N", tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM]
    stored = np.load(art / "null_embedding.npy")
    assert stored.dtype == np.float32
    np.testing.assert_array_equal(stored, np.load(diffusers_folders["null"]))
    assert sorted(p.name for p in art.iterdir()) == ["manifest.json", "model.onnx", "null_embedding.npy"]


def test_scheduler_prediction_type_and_defaults(tmp_path, diffusers_folders):
    folder = tmp_path / "model"
    shutil.copytree(diffusers_folders["dit"], folder)  # no scheduler beside it
    loaded = load_diffusers(folder)
    assert loaded.facts.schedule.to_dict()["beta_end"] == 0.02 and loaded.facts.prediction.value == "eps"
    assert "no scheduler folder beside" in loaded.notes[0]
    config = {**tiny_diffusers.SCHEDULER, "prediction_type": "v_prediction", "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1}
    (folder / "scheduler_config.json").write_text(json.dumps(config))
    (folder / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDIMScheduler", **config}))
    loaded = load_diffusers(folder)
    assert loaded.facts.prediction.value == "v" and loaded.facts.schedule.kind.value == "scaled_linear"
    assert loaded.facts.scheduler == {"_class_name": "DDIMScheduler", **config}  # recorded whole
    assert not loaded.notes
    with pytest.raises(CfgExportError, match="--null-class: got 0, a row inside the class table"):
        load_diffusers(folder, null_class=0)  # class 0 would be a class and the null at once
    (folder / "scheduler_config.json").write_text(json.dumps({**config, "trained_betas": [0.1, 0.2]}))
    with pytest.raises(CfgExportError, match=r"trained_betas: got 2 values, expected num_train_timesteps \(1000\)"):
        load_diffusers(folder)


def test_dit_saved_as_transformer2dmodel(tmp_path, diffusers_folders):
    """facebook/DiT-XL-2-* name the generic Transformer2DModel in their config."""
    folder = tmp_path / "dit"
    shutil.copytree(diffusers_folders["dit"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "Transformer2DModel"}))
    loaded = load_diffusers(folder)
    assert isinstance(loaded.module.model, DiTTransformer2DModel) and loaded.facts.condition.null == 1000


# --- fidelity: ONNX Runtime against the diffusers module's own forward --------------------

@pytest.fixture(scope="module")
def diffusers_modules(diffusers_folders):
    """The saved models loaded by diffusers itself (not through cfg-export's loader)."""
    return {"unet2d": UNet2DModel.from_pretrained(diffusers_folders["unet2d"] / "unet").eval(),
            "sd": UNet2DConditionModel.from_pretrained(diffusers_folders["sd"]).eval(),
            "dit": DiTTransformer2DModel.from_pretrained(diffusers_folders["dit"]).eval()}


@pytest.mark.parametrize("n", BATCHES)
@pytest.mark.parametrize("family", ["unet2d", "dit"])
def test_class_models_match_diffusers(diffusers_artifacts, diffusers_modules, family, n):
    m = read_manifest(diffusers_artifacts[family])
    labels = np.random.default_rng(n).integers(0, m.facts.condition.num_classes, n)
    feeds = stacked_feeds(n, m.facts.sample_shape, labels, np.full(n, m.facts.condition.null), seed=n)
    (got,) = session(diffusers_artifacts[family]).run(None, feeds)
    with torch.no_grad():
        out = diffusers_modules[family](torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                                        class_labels=torch.from_numpy(feeds["cond"])).sample
    want = out[:, :m.facts.sample_shape[0]].numpy()  # DiT: learned sigma channels dropped
    assert got.shape == want.shape == (2 * n, *m.facts.sample_shape)
    assert rel_error(got, want) < 1e-4


@pytest.mark.parametrize("n", BATCHES)
def test_text_conditioned_unet_matches_diffusers(diffusers_artifacts, diffusers_modules, diffusers_folders, n):
    m = read_manifest(diffusers_artifacts["sd"])
    g = np.random.default_rng(10 + n)
    prompts = g.standard_normal((n, tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM)).astype(np.float32)
    null = np.broadcast_to(np.load(diffusers_folders["null"]), prompts.shape)
    feeds = stacked_feeds(n, m.facts.sample_shape, prompts, null, seed=n)
    (got,) = session(diffusers_artifacts["sd"]).run(None, feeds)
    with torch.no_grad():
        want = diffusers_modules["sd"](torch.from_numpy(feeds["sample"]), torch.from_numpy(feeds["timestep"]),
                                       encoder_hidden_states=torch.from_numpy(feeds["cond"])).sample.numpy()
    assert got.shape == want.shape == (2 * n, 4, 8, 8)
    assert rel_error(got, want) < 1e-4


def test_fused_layout_with_a_null_embedding(tmp_path, diffusers_folders, diffusers_modules):
    """The fused graph holds the null embedding: its w mix equals diffusers' guidance_scale form."""
    from cfg_export.export.exporter import export_onnx

    export_onnx(str(diffusers_folders["sd"]), tmp_path / "fused", layout="fused",
                null_embedding=diffusers_folders["null"], check=False)  # checked against diffusers here
    n, s = 2, 4.5  # diffusers' guidance_scale s = 1 + w
    g = np.random.default_rng(3)
    x = g.standard_normal((n, 4, 8, 8)).astype(np.float32)
    t = np.array([999, 250], np.int64)
    prompts = g.standard_normal((n, tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM)).astype(np.float32)
    (got,) = session(tmp_path / "fused").run(None, {"sample": x, "timestep": t, "cond": prompts,
                                                   "w": np.full(n, s - 1, np.float32)})
    null = torch.from_numpy(np.load(diffusers_folders["null"])).expand(n, -1, -1)
    with torch.no_grad():
        unet = diffusers_modules["sd"]
        eps_c = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=torch.from_numpy(prompts)).sample
        eps_u = unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=null).sample
    assert rel_error(got, (eps_u + s * (eps_c - eps_u)).numpy()) < 1e-4


# --- bad input: one clear line, exit 1, nothing written ------------------------------------

def no_partial(parent: Path) -> bool:
    return not [p for p in parent.iterdir() if ".partial" in p.name]


def config_folder(tmp_path: Path, config: dict) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def bad_null(tmp_path: Path, shape) -> Path:
    path = tmp_path / "null.npy"
    np.save(path, np.zeros(shape, np.float32))
    return path


def bad_model(tmp_path: Path, folders: dict, case: str) -> tuple:
    """Returns (MODEL, extra CLI options) of a bad-input case."""
    if case == "unsupported":
        return config_folder(tmp_path, {"_class_name": "AutoencoderKL", "_diffusers_version": "0.42.1"}), []
    if case == "unconditional":
        return config_folder(tmp_path, {"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3}), []
    if case == "sdxl":
        return config_folder(tmp_path, {"_class_name": "UNet2DConditionModel", "addition_embed_type": "text_time",
                                        "cross_attention_dim": 16, "sample_size": 8, "in_channels": 4}), []
    if case == "empty_pipeline":
        folder = config_folder(tmp_path, {})
        (folder / "config.json").rename(folder / "model_index.json")
        return folder, []
    nulls = {"wrong_null_shape": bad_null(tmp_path, (5, 8)), "unreadable_null": tmp_path / "missing.npy",
             "null_class_for_embeddings": folders["null"]}
    if case in ("no_null_embedding", *nulls):
        options = ["--null-embedding", nulls[case]] if case in nulls else []
        return folders["sd"], options + (["--null-class", 0] if case == "null_class_for_embeddings" else [])
    if case == "null_class_range":
        return folders["unet2d"], ["--null-class", 4]
    if case == "null_embedding_for_labels":
        return folders["unet2d"], ["--null-embedding", folders["null"]]
    return "tests.models:conv2d", ["--null-class", 0]  # null_class_not_diffusers


BAD_INPUT = {
    "unsupported": "diffusers class AutoencoderKL is not supported; supported: " + ", ".join(SUPPORTED),
    "no_null_embedding": "needs the null condition: pass --null-embedding FILE.npy, an [L, 16] embedding",
    "wrong_null_shape": "got float32 of shape [5, 8], expected a float array [L, 16]",
    "unconditional": "UNet2DModel without a class embedding table",
    "sdxl": "addition_embed_type='text_time' needs conditions beyond encoder_hidden_states",
    "empty_pipeline": "a diffusers pipeline folder without a model: expected unet/config.json or "
                      "transformer/config.json",
    "unreadable_null": "cannot read it as .npy",
    "null_class_range": "--null-class: got 4, expected a class index 0..3 (the model has 4 class embeddings)",
    "null_embedding_for_labels": "--null-embedding: UNet2DModel takes class labels; use --null-class",
    "null_class_for_embeddings": "--null-class: UNet2DConditionModel takes embeddings",
    "null_class_not_diffusers": "--null-class and --null-embedding apply to diffusers model folders",
}
CLI_CASES = ("unsupported", "no_null_embedding", "wrong_null_shape")  # the rest through the library: faster


@pytest.mark.parametrize("case", CLI_CASES)
def test_bad_diffusers_input_cli(tmp_path, diffusers_folders, case):
    model, options = bad_model(tmp_path, diffusers_folders, case)
    proc = run_cli("onnx", model, "-o", tmp_path / "out", *options)
    assert proc.returncode == 1, proc.stderr
    assert BAD_INPUT[case] in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


@pytest.mark.parametrize("case", [c for c in BAD_INPUT if c not in CLI_CASES])
def test_bad_diffusers_input(tmp_path, diffusers_folders, case):
    from cfg_export.export.exporter import export_onnx

    model, options = bad_model(tmp_path, diffusers_folders, case)
    kwargs = dict(zip([o.lstrip("-").replace("-", "_") for o in options[::2]], options[1::2]))
    with pytest.raises(CfgExportError) as info:
        export_onnx(str(model), tmp_path / "out", **kwargs)
    assert BAD_INPUT[case] in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


def test_cli_exports_a_diffusers_folder(tmp_path, diffusers_folders):
    proc = run_cli("onnx", diffusers_folders["sd"], "-o", tmp_path / "out", "--null-embedding",
                   diffusers_folders["null"], "--no-check")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert "wrote" in proc.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "null_embedding.npy"), np.load(diffusers_folders["null"]))
