"""cfg-export onnx: the artifact, its fidelity to PyTorch, and every bad input."""
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cfg_export.export.exporter import export_onnx
from cfg_export.export.loading import load_model
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.manifest import METADATA_KEY, read_manifest
from tests import models
from tests.conftest import DIGITS, run_cli


def session(directory):
    return ort.InferenceSession(str(Path(directory) / "model.onnx"), providers=["CPUExecutionProvider"])


def rel_error(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


def stacked_inputs(n, sample_shape, num_classes, null, T, seed=0):
    """[cond rows; null rows]: the first n rows carry labels, the last n the null class."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (n,), generator=g)
    return (torch.randn(2 * n, *sample_shape, generator=g), torch.randint(0, T, (2 * n,), generator=g),
            torch.cat([labels, torch.full((n,), null)]))


def test_stacked_manifest_and_metadata(tmp_path):
    result = export_onnx("tests.models:conv2d", tmp_path / "a")
    m = read_manifest(tmp_path / "a")
    assert m.layout.value == "stacked" and m.batch is None and m.opset == 17
    assert [(s.name, list(s.shape), s.dtype) for s in m.inputs] == [
        ("sample", ["2N", 2, 6, 6], "float32"), ("timestep", ["2N"], "int64"), ("cond", ["2N"], "int64")]
    assert [(s.name, list(s.shape)) for s in m.outputs] == [("eps", ["2N", 2, 6, 6])]
    assert m.facts.condition.null == 3 and m.facts.prediction.value == "eps"
    assert m.facts.schedule.num_train_timesteps == 100
    import hashlib
    assert m.model_sha256 == hashlib.sha256((tmp_path / "a" / "model.onnx").read_bytes()).hexdigest()
    proto = onnx.load(str(tmp_path / "a" / "model.onnx"))
    stored = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
    on_disk = json.loads((tmp_path / "a" / "manifest.json").read_text())
    on_disk.pop("model_sha256")
    assert stored == on_disk
    assert [c.batch for c in result.checks] == [1, 5]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json", "model.onnx"]


@pytest.mark.parametrize("factory,shape", [("conv2d", [2, 6, 6]), ("conv1d", [3, 10])])
def test_stacked_matches_torch_any_rank(tmp_path, factory, shape):
    export_onnx(f"tests.models:{factory}", tmp_path / "a")
    module, _ = getattr(models, factory)()
    for n in (1, 5):
        x, t, c = stacked_inputs(n, shape, 3, 3, 100, seed=n)
        (got,) = session(tmp_path / "a").run(None, {"sample": x.numpy(), "timestep": t.numpy(), "cond": c.numpy()})
        with torch.no_grad():
            want = module(x, t, c).numpy()
        assert got.shape == (2 * n, *shape)
        assert rel_error(got, want) < 1e-5


def test_learned_variance_is_sliced_to_eps(tmp_path):
    result = export_onnx("tests.models:learned_variance", tmp_path / "a")
    assert "sliced to eps" in result.notes[0]
    module, _ = models.learned_variance()
    x, t, c = stacked_inputs(2, [2, 6, 6], 3, 3, 100)
    (got,) = session(tmp_path / "a").run(None, {"sample": x.numpy(), "timestep": t.numpy(), "cond": c.numpy()})
    with torch.no_grad():
        want = module(x, t, c)[:, :2].numpy()
    assert got.shape == (4, 2, 6, 6) and rel_error(got, want) < 1e-5


def test_v_prediction_is_recorded(tmp_path):
    export_onnx("tests.models:v_prediction", tmp_path / "a")
    assert read_manifest(tmp_path / "a").facts.prediction.value == "v"


def test_static_batch(tmp_path):
    export_onnx("tests.models:conv2d", tmp_path / "a", batch=3)
    m = read_manifest(tmp_path / "a")
    assert m.batch == 3 and list(m.inputs[0].shape) == [6, 2, 6, 6]
    sess = session(tmp_path / "a")
    assert sess.get_inputs()[0].shape == [6, 2, 6, 6]
    x, t, c = stacked_inputs(2, [2, 6, 6], 3, 3, 100)
    with pytest.raises(Exception):
        sess.run(None, {"sample": x.numpy(), "timestep": t.numpy(), "cond": c.numpy()})


def test_fused_layout_inputs(tmp_path):
    export_onnx("tests.models:conv1d", tmp_path / "a", layout="fused")
    m = read_manifest(tmp_path / "a")
    assert [(s.name, list(s.shape)) for s in m.inputs] == [
        ("sample", ["N", 3, 10]), ("timestep", ["N"]), ("cond", ["N"]), ("w", ["N"])]


# --- the reference model ---------------------------------------------------------

@pytest.fixture(scope="module")
def digits_module():
    return load_model(str(DIGITS))


@pytest.mark.parametrize("n", [1, 5])
def test_reference_model_stacked_matches_torch(digits_artifact, digits_module, n):
    facts = digits_module.facts
    x, t, c = stacked_inputs(n, facts.sample_shape, 10, 10, 1000, seed=n)
    (got,) = session(digits_artifact).run(None, {"sample": x.numpy(), "timestep": t.numpy(), "cond": c.numpy()})
    with torch.no_grad():
        want = digits_module.module(x, t, c).numpy()
    assert rel_error(got, want) < 1e-5


@pytest.mark.parametrize("n", [1, 5])
def test_reference_model_fused_matches_the_mix(digits_fused_artifact, digits_module, n):
    """w = 0 gives the conditional half; w = 3 gives (1 + w) eps_c - w eps_u computed by hand in torch."""
    x, t, c = stacked_inputs(n, digits_module.facts.sample_shape, 10, 10, 1000, seed=10 + n)
    x, t = torch.cat([x[:n], x[:n]]), torch.cat([t[:n], t[:n]])  # the same sample in both halves
    with torch.no_grad():
        eps = digits_module.module(x, t, c).numpy().astype(np.float64)
    eps_c, eps_u = eps[:n], eps[n:]
    sess = session(digits_fused_artifact)
    for w in (0.0, 3.0):
        (got,) = sess.run(None, {"sample": x[:n].numpy(), "timestep": t[:n].numpy(), "cond": c[:n].numpy(),
                                 "w": np.full(n, w, np.float32)})
        want = (1 + w) * eps_c - w * eps_u
        assert rel_error(got, want) < 1e-5, w
    ws = np.linspace(-1, 4, n).astype(np.float32)  # one weight per image
    (got,) = sess.run(None, {"sample": x[:n].numpy(), "timestep": t[:n].numpy(), "cond": c[:n].numpy(), "w": ws})
    want = (1 + ws[:, None, None, None]) * eps_c - ws[:, None, None, None] * eps_u
    assert rel_error(got, want) < 1e-5


# --- bad input: one clear line, non-zero exit, nothing left behind -------------------

def no_partial(parent: Path):
    return not [p for p in parent.iterdir() if ".partial" in p.name]


def write_folder(tmp_path, config=None, weights=b"", raw=None):
    folder = tmp_path / "model"
    folder.mkdir()
    if raw is not None:
        (folder / "config.json").write_text(raw)
    elif config is not None:
        (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(weights)
    return folder


GUIDANCE = models.facts([2, 6, 6])


@pytest.mark.parametrize("case,expected", [
    ("missing", "no such model folder"),
    ("no_config", "no config.json"),
    ("bad_json", "not valid JSON"),
    ("bad_factory", "cannot import module 'no_such_module_xyz'"),
    ("corrupt_weights", "unreadable safetensors file"),
    ("missing_key", "missing 'guidance'"),
    ("bad_schedule", "schedule kind: got 'quadratic', expected one of linear, scaled_linear, squaredcos_cap_v2"),
])
def test_bad_model_folder(tmp_path, case, expected):
    config = {"factory": "tests.models:TinyConv", "args": {}, "guidance": GUIDANCE}
    if case == "missing":
        model = tmp_path / "nowhere"
    elif case == "no_config":
        model = write_folder(tmp_path)
    elif case == "bad_json":
        model = write_folder(tmp_path, raw="{not json")
    elif case == "bad_factory":
        model = write_folder(tmp_path, {**config, "factory": "no_such_module_xyz:build"})
    elif case == "corrupt_weights":
        model = write_folder(tmp_path, config, weights=b"garbage")
    elif case == "missing_key":
        model = write_folder(tmp_path, {"factory": config["factory"]})
    else:
        model = write_folder(tmp_path, {**config, "guidance": {**GUIDANCE, "schedule": {"kind": "quadratic"}}})
    proc = run_cli("onnx", model, "-o", tmp_path / "out")
    assert proc.returncode == 1
    assert expected in proc.stderr, proc.stderr
    assert proc.stderr.startswith("Error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


@pytest.mark.parametrize("factory,expected", [
    ("tests.models:wrong_signature", "TwoArgs.forward(x, t) does not fit: expected forward(sample, timestep, cond) -> eps"),
    ("tests.models:unsupported_op", "Exporting the operator 'aten::i0' to ONNX opset version 17 is not supported"),
    ("tests.models:only_module", "returned only a module"),
    ("tests.models:no_such_factory", "has no callable 'no_such_factory'"),
    ("tests.nowhere_xyz:build", "cannot import module 'tests.nowhere_xyz'"),
])
def test_bad_factory(tmp_path, factory, expected):
    proc = run_cli("onnx", factory, "-o", tmp_path / "out")
    assert proc.returncode == 1 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


def test_unwritable_out_dir(tmp_path):
    (tmp_path / "afile").write_text("x")
    proc = run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "afile" / "out")
    assert proc.returncode == 1 and "is a file, not a folder" in proc.stderr, proc.stderr
    assert (tmp_path / "afile").read_text() == "x"


def test_existing_out_dir_needs_overwrite_and_only_artifacts_are_replaced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = run_cli("onnx", "tests.models:conv2d", "-o", out)
    assert proc.returncode == 1 and "pass --overwrite" in proc.stderr
    proc = run_cli("onnx", "tests.models:conv2d", "-o", out, "--overwrite")  # a folder of the user's: never
    assert proc.returncode == 1 and "not a folder written by cfg-export" in proc.stderr, proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
    artifact = tmp_path / "artifact"
    assert run_cli("onnx", "tests.models:conv2d", "-o", artifact, "-q").returncode == 0
    proc = run_cli("onnx", "tests.models:conv1d", "-o", artifact, "--overwrite", "-q")  # an artifact: replaced
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in artifact.iterdir()) == ["manifest.json", "model.onnx"] and no_partial(tmp_path)
    assert json.loads((artifact / "manifest.json").read_text())["sample_shape"] == [3, 10]


def test_check_above_tolerance_writes_nothing(tmp_path):
    with pytest.raises(CfgExportError, match="max relative error .* > tolerance 1e-12"):
        export_onnx("tests.models:conv2d", tmp_path / "out", tolerance=1e-12)
    assert not (tmp_path / "out").exists() and no_partial(tmp_path)


def test_cli_prints_the_errors(tmp_path):
    proc = run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "out", "--opset", "18")
    assert proc.returncode == 0, proc.stderr
    assert "check N=1: ONNX Runtime vs PyTorch max abs error" in proc.stdout
    assert "max relative error" in proc.stdout and "check N=5" in proc.stdout
    assert read_manifest(tmp_path / "out").opset == 18


@pytest.mark.parametrize("options, message", [
    ({"batch": 10**20}, r"--batch: got 100000000000000000000 images, expected at most 1024"),  # a traceback before
    ({"batch": 1025}, r"--batch: got 1025 images, expected at most 1024 for a static graph"),  # killed by the OS
    ({"opset": 10**20}, r"--opset: got 100000000000000000000, but this torch exports opsets 7\.\.\d+"),
])
def test_a_batch_or_opset_the_export_cannot_make_is_refused_before_the_work(tmp_path, options, message):
    with pytest.raises(CfgExportError, match=message):
        export_onnx("tests.models:conv2d", tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()
