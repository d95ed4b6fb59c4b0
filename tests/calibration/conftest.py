"""Calibration files and INT8 artifacts, built once per session (small N, few steps)."""
import pytest

from cfg_export.calibration.record import record_calibration

TINY_STEPS = 10  # sampler steps of the tiny model's recordings (T = 100)
DIGITS_STEPS = 10


@pytest.fixture(scope="session")
def tiny_calib(tiny_artifacts, tmp_path_factory):
    """tests.models:conv2d (stacked): 3 classes x 2 images, w=2, 10 DDIM steps, 4 recorded."""
    path = tmp_path_factory.mktemp("calib") / "tiny.npz"
    return record_calibration(tiny_artifacts / "stacked", path, n=2, w=2.0, steps=TINY_STEPS, seed=5,
                              record_steps=4)


@pytest.fixture(scope="session")
def digits_calib(digits_artifact, tmp_path_factory):
    """The reference model: 10 classes x 1 image, w=3, 10 DDIM steps, all recorded."""
    path = tmp_path_factory.mktemp("calib") / "digits.npz"
    return record_calibration(digits_artifact, path, n=1, w=3.0, steps=DIGITS_STEPS, seed=0)


@pytest.fixture(scope="session")
def digits_int8(digits_artifact, digits_calib, tmp_path_factory):
    """The reference model quantized with the default recipe."""
    from cfg_export.calibration.quantize import quantize_artifact

    return quantize_artifact(digits_artifact, digits_calib.path, tmp_path_factory.mktemp("int8") / "digits")
