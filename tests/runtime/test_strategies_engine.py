"""The strategies on engines: the profiles cover every row count they produce, and
adaptive guidance through the tensorrt backend (tests/fake_tensorrt.py: the wiring, run
on ONNX Runtime CPU) gives the samples ONNX Runtime gives."""
import shutil
import sys

import numpy as np
import pytest

from cfg_export.build.builder import build_engine
from cfg_export.build.plan import EngineOptions
from cfg_export.build.profiles import make_profiles
from cfg_export.runtime.artifact import Artifact
from cfg_export.runtime.backends import device_memory
from cfg_export.runtime.backends import trt as trt_backend
from cfg_export.runtime.engine import pick_profile
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.guidance import GuidanceOptions
from cfg_export.runtime.pipeline import sample_guided
from cfg_export.runtime.trt_versions import DeviceInfo
from tests import fake_tensorrt
from tests.fake_tensorrt import FakeCuda


@pytest.mark.parametrize("lo, opt, hi", [(1, 4, 16), (2, 4, 8), (5, 6, 6), (8, 8, 8), (3, 3, 4)])
def test_interval_profile_leaves_no_row_count_uncovered(tiny_artifacts, lo, opt, hi):
    """With N in [min, max] images, a stacked call has N + G rows, 0 <= G <= N: every count
    from min to 2 max must fall in some profile."""
    manifest = Artifact.open(tiny_artifacts / "stacked").manifest
    profiles = make_profiles(manifest, lo, opt, hi, interval=True)
    for n in range(lo, hi + 1):
        for rows in range(n, 2 * n + 1):
            assert any(p.covers(rows) for p in profiles), (n, rows, [p.rows for p in profiles])
            pick_profile(profiles, rows)
    assert profiles[0].rows == (2 * lo, 2 * opt, 2 * hi)  # full guidance keeps its own tuned profile
    assert len(make_profiles(manifest, lo, opt, hi)) == 1


@pytest.fixture
def fake_trt(monkeypatch):
    cuda = FakeCuda(DeviceInfo("Fake GPU", "8.6"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.make_module("10.3.0.30"))
    monkeypatch.setattr(device_memory, "open_cuda", lambda device=0: cuda)
    monkeypatch.setattr(trt_backend, "open_cuda", lambda device=0: cuda)
    fake_tensorrt.CALLS.clear()
    return cuda


def test_adaptive_guidance_through_the_engine(fake_trt, tiny_artifacts, tmp_path):
    artifact = shutil.copytree(tiny_artifacts / "stacked", tmp_path / "tiny")
    build_engine(artifact, None, EngineOptions(min_batch=3, opt_batch=4, max_batch=4))  # rows 6..8 only
    guidance = GuidanceOptions(adaptive=0.999, cache_every=2)
    with pytest.raises(CfgExportError, match=r"engine: this guidance makes calls of 3, 4, 5 rows for N=3 images, "
                                             r"outside its profiles \(rows 6..8\); rebuild it with "
                                             r"--interval-profile"):
        sample_guided(artifact, [0, 1, 2], w=2.0, steps=8, guidance=guidance, backend="tensorrt")
    build_engine(artifact, None, EngineOptions(min_batch=3, opt_batch=4, max_batch=4, interval_profile=True))
    want = sample_guided(artifact, [0, 1, 2], w=2.0, steps=8, seed=3, guidance=guidance, backend="onnxruntime-cpu")
    fake_tensorrt.CALLS.clear()
    got = sample_guided(artifact, [0, 1, 2], w=2.0, steps=8, seed=3, guidance=guidance, backend="tensorrt")
    np.testing.assert_array_equal(got.samples, want.samples)
    assert got.rows == want.rows < 8 * 6
    rows = {rows for call, _, rows in (c for c in fake_tensorrt.CALLS if c[0] == "execute")}
    assert len(rows) > 1 and rows <= set(range(3, 7))
