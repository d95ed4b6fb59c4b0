import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "denoiser"


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an NVIDIA GPU (skipped without CUDA)")
    config.addinivalue_line("markers", "tensorrt: needs the tensorrt package (skipped without it)")


def run_cli(*args, cwd=ROOT, env=None):
    """Runs the cfg-export command in a subprocess; returns the CompletedProcess."""
    cmd = [sys.executable, "-c", "from cfg_export.cli import main; main()", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env or os.environ.copy())


def has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


@pytest.fixture(scope="session")
def digits_artifact(tmp_path_factory):
    """The reference model exported once per session (stacked, dynamic batch)."""
    from cfg_export.export.exporter import export_onnx

    out = tmp_path_factory.mktemp("digits") / "stacked"
    export_onnx(str(DIGITS), out)
    return out


@pytest.fixture(scope="session")
def digits_fused_artifact(tmp_path_factory):
    from cfg_export.export.exporter import export_onnx

    out = tmp_path_factory.mktemp("digits") / "fused"
    export_onnx(str(DIGITS), out, layout="fused")
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """tests.models:conv2d exported in both layouts and with a static batch of 2 images."""
    from cfg_export.export.exporter import export_onnx

    root = tmp_path_factory.mktemp("tiny")
    export_onnx("tests.models:conv2d", root / "stacked")
    export_onnx("tests.models:conv2d", root / "fused", layout="fused")
    export_onnx("tests.models:conv2d", root / "static2", batch=2)
    export_onnx("tests.models:conv1d", root / "audio")
    return root


def run_without(package: str, code: str) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter in which importing `package` fails."""
    import textwrap

    block = textwrap.dedent(f"""
        import importlib, pkgutil, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == {package!r} or name.startswith({package!r} + "."):
                    raise ImportError({package!r} + " is blocked for this test")
        sys.meta_path.insert(0, Block())
    """)
    return subprocess.run([sys.executable, "-c", block + textwrap.dedent(code)], cwd=ROOT,
                          capture_output=True, text=True)


# -- calibration files and INT8 artifacts, built once per session (small N, few steps) --

TINY_STEPS = 10  # sampler steps of the tiny model's recordings (T = 100)
DIGITS_STEPS = 10


@pytest.fixture(scope="session")
def tiny_calib(tiny_artifacts, tmp_path_factory):
    """tests.models:conv2d (stacked): 3 classes x 2 images, w=2, 10 DDIM steps, 4 recorded."""
    from cfg_export.calibration.record import record_calibration

    path = tmp_path_factory.mktemp("calib") / "tiny.npz"
    return record_calibration(tiny_artifacts / "stacked", path, n=2, w=2.0, steps=TINY_STEPS, seed=5,
                              record_steps=4)


@pytest.fixture(scope="session")
def digits_calib(digits_artifact, tmp_path_factory):
    """The reference model: 10 classes x 1 image, w=3, 10 DDIM steps, all recorded."""
    from cfg_export.calibration.record import record_calibration

    path = tmp_path_factory.mktemp("calib") / "digits.npz"
    return record_calibration(digits_artifact, path, n=1, w=3.0, steps=DIGITS_STEPS, seed=0)


@pytest.fixture(scope="session")
def digits_int8(digits_artifact, digits_calib, tmp_path_factory):
    """The reference model quantized with the default recipe."""
    from cfg_export.calibration.quantize import quantize_artifact

    return quantize_artifact(digits_artifact, digits_calib.path, tmp_path_factory.mktemp("int8") / "digits")
