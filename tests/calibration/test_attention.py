"""INT8 on attention models: the tests' tiny diffusers DiT (class labels) and Stable
Diffusion UNet (text-style embeddings, cross-attention), random weights. Their Linear
layers run as ONNX Runtime's integer MatMul, the attention MatMuls and the Softmax stay
float, the query/key/value projections share one quantized input, and the report
measures the implied x0 per step (what the benchmark prints for larger configs)."""
import numpy as np
import onnx
import pytest

pytest.importorskip("diffusers")

from cfg_export.calibration.nodes import sample_dependent  # noqa: E402
from cfg_export.calibration.qdq import fused_kernels, quantized_layers  # noqa: E402
from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact  # noqa: E402
from cfg_export.calibration.record import record_calibration  # noqa: E402
from cfg_export.calibration.report import measure_quality  # noqa: E402
from tests import tiny_diffusers  # noqa: E402

STEPS = 8


@pytest.fixture(scope="module")
def attention(tmp_path_factory):
    """Both models exported, calibrated (4 images, 8 DDIM steps, w=3) and quantized; the DiT
    also with SmoothQuant."""
    from cfg_export.export.exporter import export_onnx

    root = tmp_path_factory.mktemp("attention")
    null = root / "null.npy"
    np.save(null, tiny_diffusers.null_embedding())
    g = np.random.default_rng(0)
    embeddings = g.standard_normal((4, tiny_diffusers.EMBED_LEN, tiny_diffusers.EMBED_DIM)).astype(np.float32)
    out = {}
    for key, build, sub, cond, extra in (
            ("dit", tiny_diffusers.dit, "transformer", np.arange(4), {}),
            ("sd", tiny_diffusers.unet2d_condition, "unet", embeddings, {"null_embedding": null})):
        folder = tiny_diffusers.save_pipeline_folder(root / f"{key}-src", build(), sub)
        export_onnx(str(folder), root / key, **extra)
        calib = record_calibration(root / key, root / f"{key}.npz", cond=cond, w=3.0, steps=STEPS).path
        out[key] = {"fp32": root / key, "cond": cond,
                    "int8": quantize_artifact(root / key, calib, root / f"{key}-int8")}
        if key == "dit":  # SmoothQuant on the one model (each quantization costs seconds)
            out[key]["smooth"] = quantize_artifact(root / key, calib, root / f"{key}-sq",
                                                   QuantizeOptions(smoothquant=0.5))
    return out


@pytest.mark.parametrize("key", ["dit", "sd"])
def test_linear_layers_run_as_integer_matmuls(attention, key):
    result = attention[key]["int8"]
    model = onnx.load(str(result.directory / "model.onnx"))
    kernels = fused_kernels(model)
    matmuls = quantized_layers(model, ["MatMul"])
    assert matmuls and kernels["QLinearMatMul"] == len(matmuls)
    assert "QLinearSoftmax" not in kernels and kernels["Softmax"] >= 1  # the attention stays float
    consts = {t.name for t in model.graph.initializer}
    dependent = sample_dependent(model.graph, "sample")
    float_matmuls = [(i, n) for i, n in enumerate(model.graph.node) if n.op_type == "MatMul" and n.name not in matmuls]
    # float: Q K^T and (.) V, and (@embedding) the cross-attention keys and values of the text condition
    assert float_matmuls and all(not set(n.input) & consts or i not in dependent for i, n in float_matmuls)
    assert any(not set(n.input) & consts for _, n in float_matmuls)
    merged = [n for n in model.graph.node if n.name.endswith("_merged")]
    assert merged and all("to_q" in n.name or "to_k" in n.name for n in merged)  # one reader of each input


@pytest.mark.parametrize("key", ["dit", "sd"])
def test_report_measures_x0_per_step(attention, key):
    a = attention[key]
    for variant in [v for v in ("int8", "smooth") if v in a]:
        report = measure_quality(a["fp32"], a[variant].directory, cond=a["cond"], steps=STEPS, w=3.0)
        assert len(report.step_errors) == STEPS and all(np.isfinite(e.x0) for e in report.step_errors)
        assert 0 < report.max_x0_error < 10 and report.quality == {}
    if "smooth" in a:
        smoothed = a["smooth"].manifest.producer["quantization"]["smoothquant"]
        assert smoothed["layers"] > 0 and smoothed["inserted_mul"] + smoothed["folded"] > 0
