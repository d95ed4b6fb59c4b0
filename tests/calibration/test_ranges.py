"""Per-step ranges: what collect_step_ranges keeps, against percentiles computed here with
numpy on tensors read from a bare ONNX Runtime session, both halves of each recorded step
(conditional and null rows) included; the min-mean and minmax aggregations against their
definitions; and the ranges that end up in the quantized model."""
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from cfg_export.calibration.data import load_calibration
from cfg_export.calibration.quantize import QuantizeOptions, quantize_model
from cfg_export.calibration.ranges import aggregate, calibrated_tensors, collect_step_ranges

P = 99.9


@pytest.fixture(scope="module")
def tiny(tiny_artifacts, tiny_calib):
    model = onnx.load(str(tiny_artifacts / "stacked" / "model.onnx"))
    data = load_calibration(tiny_calib.path)
    tensors = calibrated_tensors(model, ["Conv"])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for name in tensors:
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    values = [dict(zip(names, session.run(None, feeds))) for feeds in data.batches()]  # per step, all 2N rows
    return model, data, tensors, values


def test_calibrated_tensors_are_the_conv_activations(tiny):
    model, _, tensors, _ = tiny
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    assert tensors[0] == "sample" and set(tensors) == {convs[0].input[0], convs[0].output[0], convs[1].input[0],
                                                       convs[1].output[0]}


def test_step_statistics_cover_both_halves_of_every_step(tiny):
    model, data, tensors, values = tiny
    ranges = collect_step_ranges(model, data, tensors, percentile=P, groups=2)
    n = data.manifest.images  # 6 images: rows 0..5 conditional, 6..11 null
    assert ranges.amax.shape == (len(tensors), data.steps, 2) and ranges.timesteps == [90, 60, 30, 0]
    cond_only_differs = False
    for k, name in enumerate(tensors):
        for s in range(data.steps):
            x = values[s][name]
            for g in range(2):
                rows = np.r_[np.arange(g, n, 2), n + np.arange(g, n, 2)]  # images g, g+2, ... and their null rows
                v = x[rows].astype(np.float64).ravel()
                assert ranges.amax[k, s, g] == pytest.approx(np.percentile(np.abs(v), P), rel=1e-6)
                assert ranges.maximum[k, s, g] == pytest.approx(v.max(), rel=1e-6)
                assert ranges.minimum[k, s, g] == pytest.approx(v.min(), rel=1e-6)
            cond_only_differs |= np.abs(x[n:]).max() > np.abs(x[:n]).max()
    assert cond_only_differs  # some ranges are set by the null rows: leaving them out would clip there


def test_aggregations_follow_their_definitions(tiny):
    model, data, tensors, values = tiny
    ranges = collect_step_ranges(model, data, tensors, percentile=P, groups=3)
    minmax = aggregate(ranges, "minmax")
    minmean = aggregate(ranges, "min-mean")
    asymmetric = aggregate(ranges, "minmax", symmetric=False)
    for k, name in enumerate(tensors):
        every = np.concatenate([values[s][name].ravel() for s in range(data.steps)]).astype(np.float64)
        assert minmax[name] == pytest.approx((-np.abs(every).max(), np.abs(every).max()), rel=1e-6)
        assert asymmetric[name] == pytest.approx((every.min(), every.max()), rel=1e-6)
        want = np.mean([ranges.amax[k, s].min() for s in range(data.steps)])  # min over batches, mean over steps
        assert minmean[name] == pytest.approx((-want, want), rel=1e-9)
        assert minmean[name][1] <= minmax[name][1]
    assert np.all(ranges.spread() >= 1)


def test_quantized_model_holds_the_ranges_of_both_halves(tiny):
    model, data, tensors, values = tiny
    qmodel = quantize_model(model, data, QuantizeOptions(method="minmax", keep_fp32=())).model
    scales = {t.name: numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    last = [n for n in model.graph.node if n.op_type == "Conv"][-1].input[0]  # depends on the condition
    q = next(n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == last)
    every = np.concatenate([values[s][last] for s in range(data.steps)])
    n = data.manifest.images
    halves = [np.concatenate([values[s][last][rows] for s in range(data.steps)])
              for rows in (slice(0, n), slice(n, None))]
    assert float(scales[q.input[1]]) == pytest.approx(np.abs(every).max() / 127, rel=1e-5)
    assert max(np.abs(h).max() for h in halves) == np.abs(every).max()
