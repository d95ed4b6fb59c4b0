"""export_onnx: a trained guided model -> an artifact folder (model.onnx + manifest.json)."""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

from cfg_export import __version__
from cfg_export.export.loading import LoadedModel, load_model
from cfg_export.export.memory import activation_bytes_per_row
from cfg_export.export.stage_onnx import checked_session, name_sizes
from cfg_export.runtime.errors import CfgExportError, require
from cfg_export.runtime.files import check_export_target, staged_dir
from cfg_export.runtime.validation import expect_int
from cfg_export.runtime.manifest import METADATA_KEY, ConditionKind, Layout, Manifest, TensorSpec, parse_enum

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17  # parsed by TensorRT 10.x (JetPack 6) and 11.x, and ONNX Runtime >= 1.14
MIN_OPSET = 7
MAX_STATIC_BATCH = 1024  # images of a static graph: the export traces and checks the model at 2N rows at once
# (the digits UNet at 40000 images was killed by the OS for memory); larger batches take the dynamic graph
DEFAULT_TOLERANCE = 1e-4  # max relative error of ONNX Runtime against PyTorch in the self-check
CHECK_BATCHES = (1, 5)  # images N the self-check runs a dynamic graph at


@dataclass
class CheckResult:
    batch: int  # images N
    max_abs: float
    max_rel: float  # max |onnx - torch| / max |torch|


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    seconds: float
    checks: list[CheckResult] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _tensor_specs(loaded: LoadedModel, layout: Layout, batch: int | None):
    facts = loaded.facts
    rows_name = "2N" if layout is Layout.STACKED else "N"
    if batch is None:
        rows = rows_name
    else:
        rows = 2 * batch if layout is Layout.STACKED else batch
    if facts.condition.kind is ConditionKind.CLASS:
        cond = TensorSpec("cond", (rows,), "int64")
    else:
        cond = TensorSpec("cond", (rows, *facts.condition.shape), "float32")
    inputs = [TensorSpec("sample", (rows, *facts.sample_shape), "float32"),
              TensorSpec("timestep", (rows,), facts.timestep_dtype), cond]
    if layout is Layout.FUSED:
        inputs.append(TensorSpec("w", (rows,), "float32"))
    return tuple(inputs), (TensorSpec("eps", (rows, *facts.sample_shape), "float32"),)


def example_inputs(manifest: Manifest, batch: int, seed: int = 0) -> dict:
    """Returns random numpy feeds for `batch` images: the first half of a stacked batch
    carries real labels, the second the null condition."""
    import numpy as np

    rng = np.random.default_rng(seed)
    facts = manifest.facts
    rows = batch * manifest.rows_per_image
    T = facts.schedule.num_train_timesteps
    # timesteps spread over the whole range, both ends included: a model that fails at some
    # noise levels (NaN at t = 0, say) fails the check
    timestep = np.round(np.linspace(0, T - 1, rows)).astype(facts.timestep_dtype)
    rng.shuffle(timestep)
    if facts.condition.kind is ConditionKind.CLASS:
        cond = rng.integers(0, facts.condition.num_classes, size=rows).astype(np.int64)
        if manifest.layout is Layout.STACKED:
            cond[batch:] = facts.condition.null
    else:
        cond = rng.standard_normal((rows, *facts.condition.shape)).astype(np.float32)
    feeds = {"sample": rng.standard_normal((rows, *facts.sample_shape)).astype(np.float32),
             "timestep": timestep, "cond": cond}
    if manifest.layout is Layout.FUSED:
        feeds["w"] = rng.uniform(0, 4, size=rows).astype(np.float32)
    return feeds


def _null_embedding(loaded: LoadedModel, source_dir: Path | None):
    """Returns the null embedding [L, D] float32 of an embedding condition (None for class
    labels): the one the loader read, or condition.null_file in the model folder."""
    import numpy as np

    cond = loaded.facts.condition
    if cond.kind is ConditionKind.CLASS:
        return None
    if loaded.null_embedding is not None:
        return np.asarray(loaded.null_embedding, dtype=np.float32)
    if cond.null_file is None or source_dir is None:
        raise CfgExportError("an embedding condition needs a null embedding file (condition.null_file)")
    return np.load(source_dir / cond.null_file).astype(np.float32)


def _null_tensor(loaded: LoadedModel, source_dir: Path | None):
    torch = require("torch", "export")
    cond = loaded.facts.condition
    if cond.kind is ConditionKind.CLASS:
        return torch.tensor(cond.null, dtype=torch.int64)
    return torch.from_numpy(_null_embedding(loaded, source_dir))


def _export_graph(wrapper, manifest: Manifest, path: Path, opset: int, example: dict) -> None:
    torch = require("torch", "export")
    names = [s.name for s in manifest.inputs]
    args = tuple(torch.from_numpy(example[n]) for n in names)
    dynamic_axes = None
    if manifest.batch is None:
        rows = manifest.inputs[0].shape[0]
        dynamic_axes = {s.name: {0: rows} for s in manifest.inputs + manifest.outputs}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), input_names=names, output_names=["eps"],
                              dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
    except torch.onnx.errors.UnsupportedOperatorError as exc:
        message = str(exc).splitlines()[0]
        raise CfgExportError(f"{message}; try another --opset, or replace that operator in the model") from None
    except torch.onnx.errors.OnnxExporterError as exc:
        raise CfgExportError(f"ONNX export failed at opset {opset}: {str(exc).splitlines()[0]}") from None


def _write_metadata(path: Path, manifest: Manifest) -> None:
    """Stores the manifest's facts in the ONNX metadata, and its names for every size
    of the graph's inputs and outputs (the exporter leaves some sliced sizes unnamed)."""
    onnx = require("onnx", "export")
    model = onnx.load(str(path))
    name_sizes(model, manifest)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(manifest.to_dict(with_sha=False), sort_keys=True)
    model.producer_name, model.producer_version = "cfg-export", __version__
    onnx.save(model, str(path))


def check_tolerance(tolerance) -> float:
    """Returns the self-check's tolerance (default DEFAULT_TOLERANCE); refuses what is not a
    positive finite number (NaN would accept anything)."""
    tolerance = DEFAULT_TOLERANCE if tolerance is None else tolerance
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not (
            math.isfinite(tolerance) and tolerance > 0):
        raise CfgExportError(f"--tolerance: got {tolerance!r}, expected a positive finite number (default "
                             f"{DEFAULT_TOLERANCE:g})")
    return float(tolerance)


def check_export(wrapper, manifest: Manifest, path: Path, batches=CHECK_BATCHES) -> list[CheckResult]:
    """Returns the errors of ONNX Runtime (CPU) against PyTorch on random inputs at each
    batch size, after onnx.checker has passed."""
    torch = require("torch", "export")
    import numpy as np

    session = checked_session(path, "the exported model")
    results = []
    for batch in ([manifest.batch] if manifest.batch is not None else batches):
        feeds = example_inputs(manifest, batch, seed=batch)
        (got,) = session.run(None, feeds)
        with torch.no_grad():
            want = wrapper(*(torch.from_numpy(feeds[s.name]) for s in manifest.inputs)).numpy()
        for name, values in (("PyTorch", want), ("ONNX Runtime", got)):
            if not np.all(np.isfinite(values)):
                bad = sorted({int(t) for t in feeds["timestep"][~np.isfinite(values.reshape(len(values), -1)).all(1)]})
                raise CfgExportError(f"the model's output under {name} holds NaN or infinity (N={batch}, at "
                                     f"timesteps {bad[:6]}); check the weights and the model's forward at those "
                                     f"timesteps; nothing written")
        max_abs = float(np.abs(got - want).max())
        results.append(CheckResult(batch, max_abs, max_abs / max(float(np.abs(want).max()), 1e-12)))
    return results


def export_opset(opset: int | None) -> int:
    """Returns the opset to export: DEFAULT_OPSET for None; raises CfgExportError for one
    the installed torch's TorchScript exporter does not write."""
    if opset is None:
        return DEFAULT_OPSET
    try:
        import importlib

        top = importlib.import_module("torch.onnx._constants").ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    except (ImportError, AttributeError):  # another torch: its exporter names what it refuses
        top = None
    value = expect_int(opset, "--opset", lo=MIN_OPSET)
    if top is not None and value > top:
        raise CfgExportError(f"--opset: got {value}, but this torch exports opsets {MIN_OPSET}..{top}; give at most "
                             f"{top} (default {DEFAULT_OPSET})")
    return value


def export_onnx(model: str, out_dir: str | Path, layout: Layout | str | None = None,
                batch: int | None = None, opset: int | None = None, check: bool = True,
                tolerance: float | None = None, overwrite: bool = False, null_class: int | None = None,
                null_embedding: str | Path | None = None) -> ExportResult:
    """Returns what was written: `out_dir/model.onnx` and `out_dir/manifest.json` for MODEL
    (a model folder or 'module:factory').

    layout 'stacked' (default): sample [2N, *S], timestep [2N], cond [2N] -> eps [2N, *S].
    layout 'fused': sample [N, *S], timestep [N], cond [N], w [N] -> guided eps [N, *S].
    batch: images N of a static graph; None for a dynamic batch. Unless check is False,
    the model is validated by onnx.checker and ONNX Runtime against PyTorch, and a
    relative error above `tolerance` raises CfgExportError (nothing is written then).
    null_class, null_embedding (a .npy [L, D]): the null condition of a diffusers model
    folder (see cfg_export.export.diffusers_models); the null embedding is stored in the artifact.
    """
    layout = parse_enum(Layout, layout or Layout.STACKED, "layout")
    opset = export_opset(opset)
    tolerance = check_tolerance(tolerance)
    if batch is not None and expect_int(batch, "--batch", lo=1) > MAX_STATIC_BATCH:
        raise CfgExportError(f"--batch: got {batch} images, expected at most {MAX_STATIC_BATCH} for a static graph "
                             f"(the export runs the model at 2N rows at once); leave --batch out for a dynamic "
                             f"batch, which samples any number of images")
    check_export_target(model, out_dir, overwrite)
    torch = require("torch", "export")
    from cfg_export.export import wrappers

    start = time.perf_counter()
    loaded = load_model(model, null_class=null_class, null_embedding=null_embedding)
    wrappers.check_signature(loaded.module)
    inputs, outputs = _tensor_specs(loaded, layout, batch)
    versions = {"cfg_export": __version__, "torch": torch.__version__, "onnx": require("onnx", "export").__version__}
    manifest = Manifest(facts=loaded.facts, layout=layout, inputs=inputs, outputs=outputs,
                        batch=batch, opset=opset, producer=versions)
    probe = example_inputs(manifest if layout is Layout.STACKED else
                           Manifest(loaded.facts, Layout.STACKED, inputs, outputs), batch or 1)
    note = wrappers.check_output_shape(loaded.module, loaded.facts, tuple(
        torch.from_numpy(probe[k]) for k in ("sample", "timestep", "cond")))
    source_dir = Path(model) if Path(model).is_dir() else None
    if layout is Layout.STACKED:
        wrapper = wrappers.StackedDenoiser(loaded.module, loaded.facts).eval()
    else:
        wrapper = wrappers.FusedGuidance(loaded.module, loaded.facts, _null_tensor(loaded, source_dir)).eval()
    result = ExportResult(Path(out_dir), manifest, 0.0, notes=[*loaded.notes, *([note] if note else [])])
    with staged_dir(out_dir, overwrite=overwrite) as tmp:
        path = tmp / manifest.model_file
        log.info("exporting %s (%s layout, opset %d) to %s", model, layout.value, opset, out_dir)
        _export_graph(wrapper, manifest, path, opset, example_inputs(manifest, batch or 2))
        manifest = replace(manifest, activation_bytes_per_row=activation_bytes_per_row(path))
        _write_metadata(path, manifest)
        if loaded.facts.condition.null_file:
            import numpy as np

            with open(tmp / loaded.facts.condition.null_file, "wb") as f:
                np.save(f, _null_embedding(loaded, source_dir))
        if check:
            result.checks = check_export(wrapper, manifest, path)
            worst = max(c.max_rel for c in result.checks)
            if not math.isfinite(worst) or worst > tolerance:
                raise CfgExportError(f"ONNX Runtime differs from PyTorch: max relative error {worst:.2e} > "
                                     f"tolerance {tolerance:.0e}; nothing written (pass --tolerance or --no-check)")
        result.manifest = manifest.with_sha(tmp)
        result.manifest.write(tmp)
    result.seconds = time.perf_counter() - start
    return result
