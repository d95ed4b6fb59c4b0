"""select_layers and the float-time profile it weighs sensitivity against: the profile
covers every convolution of the reference model (NCHWc-rewritten ones mapped back), the
sensitivities are the implied-x0 errors recomputed here from bare sessions and the DDIM
equation, and the greedy loop stops where its budget says."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest

from cfg_export.calibration.data import load_calibration
from cfg_export.calibration.quantize import QuantizeOptions, quantize_model
from cfg_export.calibration.selection import layer_float_times, select_layers
from cfg_export.calibration.sensitivity import evaluation_feeds, load_source
from cfg_export.runtime.errors import CfgExportError

T, W = 100, 2.0  # tests.models, tiny_calib


def test_float_times_cover_every_convolution(digits_artifact, digits_calib):
    model = onnx.load(str(digits_artifact / "model.onnx"))
    feeds = next(load_calibration(digits_calib.path).batches([5]))
    times = layer_float_times(model, feeds, runs=3)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert len(convs) == 35 and all(times.get(name, 0) > 0 for name in convs)


def x0_error(model, feeds) -> float:
    """Largest relative error of the implied x0 of `model` against FP32 over `feeds`, written here."""
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T, dtype=np.float64))
    errors = []
    for f in feeds:
        n = len(f["sample"]) // 2
        t = int(f["timestep"][0])
        x = f["sample"][:n].astype(np.float64)
        x0 = []
        for m in model:
            eps = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, f)[0]
            eps = eps.astype(np.float64)
            guided = (1 + W) * eps[:n] - W * eps[n:]
            x0.append((x - np.sqrt(1 - abar[t]) * guided) / np.sqrt(abar[t]))
        errors.append(np.linalg.norm(x0[1] - x0[0]) / np.linalg.norm(x0[0]))
    return max(errors)


def test_selection_weighs_sensitivity_against_cost(tiny_artifacts, tiny_calib):
    everything = select_layers(tiny_artifacts / "stacked", tiny_calib.path, QuantizeOptions(method="minmax"),
                               budget=0.99, eval_steps=4)
    names = [c.node for c in everything.candidates]
    # the last convolution writes the graph output: ONNX Runtime cannot fuse it, so it is no candidate
    assert len(names) == 1 and everything.kept == [] and everything.history[0][0] == ""  # all INT8 fits the budget
    ratios = [c.ratio for c in everything.candidates]
    assert ratios == sorted(ratios, reverse=True) and all(c.float_ms > 0 for c in everything.candidates)
    model, _, data = load_source(tiny_artifacts / "stacked", tiny_calib.path)
    feeds = evaluation_feeds(data, 4)
    for c in everything.candidates:
        alone = quantize_model(model, data, QuantizeOptions(method="minmax"), nodes_to_quantize=[c.node]).model
        assert c.sensitivity == pytest.approx(x0_error([model, alone], feeds), rel=1e-6)
    strict = select_layers(tiny_artifacts / "stacked", tiny_calib.path, QuantizeOptions(method="minmax"),
                           budget=1e-9, eval_steps=4)
    assert strict.kept == names and max(strict.x0) == 0  # every layer sent back to float, in ratio order
    assert [h[0] for h in strict.history] == ["", *names] and strict.keep_fp32[-1:] == names
    assert "kept in float: 1 of 1 candidates" in "\n".join(strict.lines())
    with pytest.raises(CfgExportError, match=r"--budget: got 2.0, expected a relative x0 error in \(0, 1\)"):
        select_layers(tiny_artifacts / "stacked", tiny_calib.path, budget=2.0)
