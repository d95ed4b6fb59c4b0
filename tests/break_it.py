"""A break-it run over every verb: bad inputs and faults, each through the real CLI in a
fresh process, each outcome classified.

    python tests/break_it.py [--only VERB] [--keep DIR] [-v]

Outcomes: ok (exit 0 where success was expected), clean error (non-zero exit, no
traceback, the message ends in one 'Error: ...' line, where an error was expected), and
the failures: traceback, silently wrong (exit 0 where the input is bad, or an output
that is not what was asked), data lost (a source file changed or gone), half-written
(a temporary or partial file left behind, or an output written despite the error).
Prints one line per case and the counts; exits 1 when any case failed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "denoiser"
CLASSIFIER = ROOT / "examples" / "digits" / "classifier" / "classifier.onnx"

OK, ERROR = "ok", "error"
# a folder no one may write: a read-only folder, except for root, who writes anywhere on disk
READ_ONLY = "readonly" if os.geteuid() != 0 else "/proc/cfg-export-never"


@dataclass
class Case:
    verb: str
    name: str
    argv: list  # arguments after `cfg-export` (str or callables of the work dir)
    expect: str = ERROR  # ok or error
    message: str | None = None  # a piece the error line must contain
    setup: Callable[[Path], None] | None = None  # prepares files in the work dir
    check: Callable[[Path], str | None] | None = None  # after the run: returns a failure description or None
    outputs: list = field(default_factory=list)  # paths (relative to work) that must not exist after an error
    stderr_has: str | None = None  # for an ok case: what stderr must say (a warning)
    fsize: int | None = None  # limit the size of any file the process writes (a full disk)
    runner: str = "cfg-export"  # or "python -m runtime"


@dataclass
class Outcome:
    case: Case
    kind: str  # ok, clean error, traceback, silently wrong, data lost, half-written, wrong message
    detail: str = ""
    seconds: float = 0.0


BAD_KINDS = ("traceback", "silently wrong", "data lost", "half-written", "wrong message", "unexpected error")


def digest(path: Path) -> dict:
    """sha256 of every file under path (or of the file)."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def leftovers(work: Path) -> list[str]:
    """Temporary files a writer left: *.partial, *.old, *.lock anywhere under the work dir."""
    return [str(p.relative_to(work)) for p in work.rglob(".*")
            if p.suffix in (".partial", ".old", ".lock") and "pytest" not in p.parts]


def run_case(case: Case, work: Path, protected: dict[Path, dict]) -> Outcome:
    argv = [str(a(work) if callable(a) else a) for a in case.argv]
    if case.runner == "cfg-export":
        cmd = [sys.executable, "-c", "from cfg_export.cli import main; main()", *argv]
    else:
        cmd = [sys.executable, "-m", "cfg_export.runtime", *argv]

    def limit():
        if case.fsize is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
            resource.setrlimit(resource.RLIMIT_FSIZE, (case.fsize, case.fsize))

    before = leftovers(work)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True, preexec_fn=limit, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    seconds = time.perf_counter() - start
    out = Outcome(case, "", seconds=seconds)
    stderr = proc.stderr.strip()
    last = stderr.splitlines()[-1] if stderr else ""
    for source, digests in protected.items():
        if not source.exists() or digest(source) != digests:
            out.kind, out.detail = "data lost", f"{source} changed"
            protected[source] = digest(source) if source.exists() else {}
            return out
    left = sorted(set(leftovers(work)) - set(before))
    if "Traceback" in stderr:
        out.kind, out.detail = "traceback", stderr.splitlines()[-1][:200]
    elif left:
        out.kind, out.detail = "half-written", ", ".join(left)[:200]
        for name in left:
            p = work / name
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
    elif proc.returncode == 0:
        problem = case.check(work) if case.check else None
        if case.expect == ERROR:
            out.kind, out.detail = "silently wrong", f"exit 0: {proc.stdout.strip()[-150:]}"
        elif problem:
            out.kind, out.detail = "silently wrong", problem
        elif case.stderr_has and case.stderr_has not in stderr:
            out.kind, out.detail = "silently wrong", f"no {case.stderr_has!r} on stderr"
        else:
            out.kind = OK
    else:
        written = [o for o in case.outputs if (work / o).exists()]
        if written:
            out.kind, out.detail = "half-written", f"error but wrote {', '.join(written)}"
        elif not last.startswith("Error:"):
            out.kind, out.detail = "wrong message", last[:200]
        elif case.expect == OK:
            out.kind, out.detail = "unexpected error", last[:200]
        elif case.message and case.message not in stderr:
            out.kind, out.detail = "wrong message", f"{last[:160]} (wanted: {case.message})"
        else:
            out.kind, out.detail = "clean error", last[:200]
    return out


# -- the work dir ----------------------------------------------------------------------------

def prepare(work: Path) -> dict[Path, dict]:
    """Builds what the cases use once (exports, calibration files); returns the files that
    must never change (name -> digests)."""
    sys.path.insert(0, str(ROOT))
    from cfg_export.calibration.quantize import QuantizeOptions, quantize_artifact
    from cfg_export.calibration.record import record_calibration
    from cfg_export.export.exporter import export_onnx

    shutil.copytree(DIGITS, work / "model")  # a model folder of the user's
    shutil.copy(ROOT / "examples" / "digits" / "nets.py", work / "nets.py")
    config = json.loads((work / "model" / "config.json").read_text())
    config["code_dir"] = ".."
    (work / "model" / "config.json").write_text(json.dumps(config, indent=2))
    export_onnx("tests.models:conv2d", work / "tiny")
    export_onnx("tests.models:conv2d", work / "fused", layout="fused")
    export_onnx("tests.models:conv2d", work / "static", batch=2)
    export_onnx("tests.models:conv1d", work / "audio")
    export_onnx(str(work / "model"), work / "digits")
    record_calibration(work / "tiny", work / "calib.npz", n=2, w=2.0, steps=10, record_steps=4)
    quantize_artifact(work / "tiny", work / "calib.npz", work / "int8", QuantizeOptions(keep_fp32=()))
    from cfg_export.export.pipelines import export_pipeline
    from tests import tiny_pipelines

    tiny_pipelines.save_sd(work / "sd-folder")
    export_pipeline(work / "sd-folder", work / "sd")
    tiny_pipelines.save_dit(work / "dit-folder")
    export_pipeline(work / "dit-folder", work / "dit")
    (work / "notes").mkdir()
    (work / "notes" / "mine.txt").write_text("a folder of the user's, not an artifact")
    (work / "readonly").mkdir()
    os.chmod(work / "readonly", 0o555)
    return {work / p: digest(work / p) for p in ("model", "nets.py", "notes", "tiny", "digits", "calib.npz",
                                                 "sd-folder", "sd")}


def copy_of(name: str, to: str) -> Callable[[Path], None]:
    return lambda work: shutil.copytree(work / name, work / to, dirs_exist_ok=True)


def edit_manifest(to: str, change: Callable[[dict], None], source: str = "tiny") -> Callable[[Path], None]:
    def setup(work: Path):
        shutil.rmtree(work / to, ignore_errors=True)
        shutil.copytree(work / source, work / to)
        path = work / to / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))
    return setup


def raw_manifest(to: str, text: str) -> Callable[[Path], None]:
    def setup(work: Path):
        shutil.rmtree(work / to, ignore_errors=True)
        shutil.copytree(work / "tiny", work / to)
        (work / to / "manifest.json").write_text(text)
    return setup


def model_folder(to: str, change: Callable[[dict], None] | None = None, text: str | None = None,
                 weights: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """A copy of the user's model folder with its config.json changed."""
    def setup(work: Path):
        shutil.rmtree(work / to, ignore_errors=True)
        shutil.copytree(work / "model", work / to)
        path = work / to / "config.json"
        if text is not None:
            path.write_text(text)
        elif change is not None:
            config = json.loads(path.read_text())
            change(config)
            path.write_text(json.dumps(config))
        if weights is not None:
            weights(work / to)
    return setup


def guidance(key, value):
    def change(config):
        node = config["guidance"]
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        if value is DELETE:
            node.pop(last, None)
        else:
            node[last] = value
    return change


DELETE = object()


def exists(path: str, suffix_bytes: bytes | None = None) -> Callable[[Path], str | None]:
    def check(work: Path):
        p = work / path
        if not p.exists():
            return f"{path} was not written"
        if suffix_bytes is not None and not p.read_bytes().startswith(suffix_bytes):
            return f"{path} does not hold the format its extension names"
        return None
    return check


JPEG, PNG = b"\xff\xd8", b"\x89PNG"


# -- the table -------------------------------------------------------------------------------

def cases() -> list[Case]:
    t = []
    add = t.append
    # ---- onnx: the export ----
    add(Case("onnx", "export into the model's own folder with --overwrite", ["onnx", "model", "-o", "model", "--overwrite"],
             message="is or holds or lies inside the source"))
    add(Case("onnx", "export into a folder inside the model", ["onnx", "model", "-o", "model/out"],
             message="inside the source"))
    add(Case("onnx", "export into the folder holding the model", ["onnx", "model", "-o", ".", "--overwrite"],
             message="holds"))
    add(Case("onnx", "--overwrite a folder that is not an artifact", ["onnx", "model", "-o", "notes", "--overwrite"],
             message="not a folder written by cfg-export"))
    add(Case("onnx", "a static batch too large to trace", ["onnx", "model", "-o", "o40", "--batch", "40000"],
             message="at most 1024", outputs=["o40"]))
    add(Case("onnx", "an opset torch does not export", ["onnx", "model", "-o", "o41", "--opset", "99"],
             message="--opset", outputs=["o41"]))
    add(Case("onnx", "existing artifact without --overwrite", ["onnx", "model", "-o", "digits"],
             message="pass --overwrite"))
    add(Case("onnx", "-o is a file", ["onnx", "model", "-o", "nets.py"], message="is a file"))
    add(Case("onnx", "-o in a read-only folder", ["onnx", "model", "-o", f"{READ_ONLY}/x"]))
    add(Case("onnx", "tolerance nan", ["onnx", "model", "-o", "x1", "--tolerance", "nan"], message="--tolerance",
             outputs=["x1"]))
    add(Case("onnx", "tolerance negative", ["onnx", "model", "-o", "x1", "--tolerance", "-1"], message="--tolerance",
             outputs=["x1"]))
    add(Case("onnx", "tolerance zero", ["onnx", "model", "-o", "x1", "--tolerance", "0"], message="--tolerance",
             outputs=["x1"]))
    add(Case("onnx", "tolerance inf", ["onnx", "model", "-o", "x1", "--tolerance", "inf"], message="--tolerance",
             outputs=["x1"]))
    add(Case("onnx", "no such model", ["onnx", "nowhere", "-o", "x1"], message="no such model folder"))
    add(Case("onnx", "model is a file", ["onnx", "nets.py", "-o", "x1"], message="a file, not a model folder"))
    add(Case("onnx", "bad factory string", ["onnx", "a:b:c", "-o", "x1"]))
    add(Case("onnx", "factory module missing", ["onnx", "tests.nowhere:f", "-o", "x1"], message="cannot import"))
    add(Case("onnx", "factory returns a module only", ["onnx", "tests.models:only_module", "-o", "x1"],
             message="returned only a module"))
    add(Case("onnx", "factory with a wrong signature", ["onnx", "tests.models:wrong_signature", "-o", "x1"],
             message="does not fit"))
    add(Case("onnx", "unsupported operator", ["onnx", "tests.models:unsupported_op", "-o", "x1"],
             message="not supported"))
    add(Case("onnx", "opset 6", ["onnx", "model", "-o", "x1", "--opset", "6"]))
    add(Case("onnx", "batch 0", ["onnx", "model", "-o", "x1", "--batch", "0"]))
    add(Case("onnx", "null class on a non-diffusers model", ["onnx", "model", "-o", "x1", "--null-class", "3"],
             message="apply to diffusers"))
    add(Case("onnx", "config.json is a number", ["onnx", "c1", "-o", "x1"], setup=model_folder("c1", text="42"),
             message="expected a JSON object"))
    add(Case("onnx", "config.json is a list", ["onnx", "c2", "-o", "x1"], setup=model_folder("c2", text="[1, 2]"),
             message="expected a JSON object"))
    add(Case("onnx", "config.json is not JSON", ["onnx", "c3", "-o", "x1"], setup=model_folder("c3", text="{oops"),
             message="not valid JSON"))
    add(Case("onnx", "config.json empty", ["onnx", "c4", "-o", "x1"], setup=model_folder("c4", text=""),
             message="not valid JSON"))
    add(Case("onnx", "config.json deeply nested", ["onnx", "c5", "-o", "x1"],
             setup=model_folder("c5", text="[" * 100000 + "]" * 100000)))
    add(Case("onnx", "unknown config key", ["onnx", "c6", "-o", "x1"],
             setup=model_folder("c6", change=lambda c: c.update(extra=1)), message="unknown key"))
    add(Case("onnx", "factory is a number", ["onnx", "c7", "-o", "x1"],
             setup=model_folder("c7", change=lambda c: c.update(factory=7)), message="factory"))
    add(Case("onnx", "args is a list", ["onnx", "c8", "-o", "x1"],
             setup=model_folder("c8", change=lambda c: c.update(args=[1])), message="args"))
    add(Case("onnx", "args the factory does not take", ["onnx", "c9", "-o", "x1"],
             setup=model_folder("c9", change=lambda c: c.update(args={"colour": 3})), message="does not take"))
    add(Case("onnx", "args that make the factory raise", ["onnx", "c10", "-o", "x1"],
             setup=model_folder("c10", change=lambda c: c["args"].update(base_channels=-4)), message="factory"))
    add(Case("onnx", "missing guidance", ["onnx", "c11", "-o", "x1"],
             setup=model_folder("c11", change=lambda c: c.pop("guidance")), message="guidance"))
    add(Case("onnx", "null class is a real class", ["onnx", "c12", "-o", "x1"],
             setup=model_folder("c12", guidance("condition.null", 3)), message="one of the real classes"))
    add(Case("onnx", "null class beyond the embedding table", ["onnx", "c13", "-o", "x1"],
             setup=model_folder("c13", guidance("condition.null", 50)), message="null class"))
    add(Case("onnx", "null class negative", ["onnx", "c14", "-o", "x1"],
             setup=model_folder("c14", guidance("condition.null", -1)), message="condition null"))
    add(Case("onnx", "null class a string", ["onnx", "c15", "-o", "x1"],
             setup=model_folder("c15", guidance("condition.null", "ten")), message="condition null"))
    add(Case("onnx", "num_classes zero", ["onnx", "c16", "-o", "x1"],
             setup=model_folder("c16", guidance("condition.num_classes", 0)), message="num_classes"))
    add(Case("onnx", "beta_end 2.0", ["onnx", "c17", "-o", "x1"],
             setup=model_folder("c17", guidance("schedule.beta_end", 2.0)), message="beta_end"))
    add(Case("onnx", "beta_start negative", ["onnx", "c18", "-o", "x1"],
             setup=model_folder("c18", guidance("schedule.beta_start", -0.1)), message="beta_start"))
    add(Case("onnx", "betas reversed", ["onnx", "c19", "-o", "x1"],
             setup=model_folder("c19", guidance("schedule.beta_start", 0.05)), message="beta_start"))
    add(Case("onnx", "one training timestep", ["onnx", "c20", "-o", "x1"],
             setup=model_folder("c20", guidance("schedule.num_train_timesteps", 1)), message="num_train_timesteps"))
    add(Case("onnx", "timesteps a float", ["onnx", "c21", "-o", "x1"],
             setup=model_folder("c21", guidance("schedule.num_train_timesteps", 10.5)), message="num_train_timesteps"))
    add(Case("onnx", "schedule kind unknown", ["onnx", "c22", "-o", "x1"],
             setup=model_folder("c22", guidance("schedule.kind", "quadratic")), message="schedule kind"))
    add(Case("onnx", "schedule with an unknown key", ["onnx", "c23", "-o", "x1"],
             setup=model_folder("c23", guidance("schedule.gamma", 1)), message="unknown key"))
    add(Case("onnx", "signal vanishes", ["onnx", "c24", "-o", "x1"],
             setup=model_folder("c24", guidance("schedule.beta_end", 0.9)), message="alphas_cumprod"))
    add(Case("onnx", "sample_shape with zero", ["onnx", "c25", "-o", "x1"],
             setup=model_folder("c25", guidance("sample_shape", [1, 0, 16])), message="sample_shape"))
    add(Case("onnx", "sample_shape a string", ["onnx", "c26", "-o", "x1"],
             setup=model_folder("c26", guidance("sample_shape", "1x16x16")), message="sample_shape"))
    add(Case("onnx", "sample_shape empty", ["onnx", "c27", "-o", "x1"],
             setup=model_folder("c27", guidance("sample_shape", [])), message="sample_shape"))
    add(Case("onnx", "sample_shape that the model does not take", ["onnx", "c28", "-o", "x1"],
             setup=model_folder("c28", guidance("sample_shape", [3, 16, 16]))))
    add(Case("onnx", "prediction unknown", ["onnx", "c29", "-o", "x1"],
             setup=model_folder("c29", guidance("prediction", "score")), message="prediction"))
    add(Case("onnx", "prediction a list", ["onnx", "c30", "-o", "x1"],
             setup=model_folder("c30", guidance("prediction", ["eps"])), message="prediction"))
    add(Case("onnx", "timestep dtype unknown", ["onnx", "c31", "-o", "x1"],
             setup=model_folder("c31", guidance("timestep_dtype", "int8")), message="timestep_dtype"))
    add(Case("onnx", "condition kind unknown", ["onnx", "c32", "-o", "x1"],
             setup=model_folder("c32", guidance("condition.kind", "text")), message="condition kind"))
    add(Case("onnx", "condition missing", ["onnx", "c33", "-o", "x1"],
             setup=model_folder("c33", guidance("condition", DELETE)), message="condition"))
    add(Case("onnx", "weights file missing", ["onnx", "c34", "-o", "x1"],
             setup=model_folder("c34", weights=lambda d: (d / "model.safetensors").unlink()), message="missing"))
    add(Case("onnx", "weights file truncated", ["onnx", "c35", "-o", "x1"],
             setup=model_folder("c35", weights=lambda d: (d / "model.safetensors").write_bytes(b"\0" * 100)),
             message="safetensors"))
    add(Case("onnx", "weights of another architecture", ["onnx", "c36", "-o", "x1"],
             setup=model_folder("c36", change=lambda c: c["args"].update(base_channels=16)),
             message="shape file vs module"))
    add(Case("onnx", "weights holding NaN", ["onnx", "c37", "-o", "x1"], setup=model_folder("c37", weights=_nan_weights),
             message="NaN"))
    add(Case("onnx", "weights format unknown", ["onnx", "c38", "-o", "x1"],
             setup=model_folder("c38", change=lambda c: c.update(weights="model.txt"),
                                weights=lambda d: (d / "model.txt").write_text("x")), message="unknown weights format"))
    add(Case("onnx", "weights path absolute", ["onnx", "c39", "-o", "x1"],
             setup=model_folder("c39", change=lambda c: c.update(weights="/etc/passwd")), message="weights"))
    add(Case("onnx", "full disk during the export", ["onnx", "model", "-o", "full"], fsize=300_000,
             outputs=["full"]))
    add(Case("onnx", "an export that works", ["onnx", "model", "-o", "fresh", "-q"], expect=OK,
             check=exists("fresh/manifest.json")))
    add(Case("onnx", "re-export over an artifact with --overwrite", ["onnx", "model", "-o", "fresh", "--overwrite", "-q"],
             expect=OK, check=exists("fresh/model.onnx")))
    add(Case("onnx", "unknown option", ["onnx", "model", "-o", "x1", "--fast"]))
    add(Case("onnx", "no -o", ["onnx", "model"]))
    # ---- sample ----
    add(Case("sample", "nothing to write", ["sample", "tiny"], message="nothing to write"))
    add(Case("sample", "-o names a folder", ["sample", "tiny", "-o", "notes"], message="is a folder"))
    add(Case("sample", "-o .jpg gives a JPEG", ["sample", "digits", "-o", "g.jpg", "--n", "1", "--steps", "2", "-q"],
             expect=OK, check=exists("g.jpg", JPEG)))
    add(Case("sample", "-o .png gives a PNG", ["sample", "digits", "-o", "g.png", "--n", "1", "--steps", "2", "-q"],
             expect=OK, check=exists("g.png", PNG)))
    add(Case("sample", "-o with an unknown extension", ["sample", "tiny", "-o", "g.xyz", "--steps", "2"],
             message="extension", outputs=["g.xyz"]))
    add(Case("sample", "--npy with another extension", ["sample", "tiny", "--npy", "x.png", "--steps", "2"],
             message=".npy", outputs=["x.png"]))
    add(Case("sample", "-o in a read-only folder", ["sample", "digits", "-o", f"{READ_ONLY}/g.png", "--steps", "2"]))
    add(Case("sample", "-o under a file", ["sample", "tiny", "-o", "nets.py/g.png", "--steps", "2"], message="file"))
    add(Case("sample", "-o and --npy the same file", ["sample", "tiny", "-o", "same.npy", "--npy", "same.npy"]))
    add(Case("sample", "seed -1", ["sample", "tiny", "--npy", "x.npy", "--seed", "-1"], message="seed",
             outputs=["x.npy"]))
    add(Case("sample", "seed huge", ["sample", "tiny", "--npy", "x.npy", "--seed", str(2 ** 70)], outputs=["x.npy"]))
    add(Case("sample", "steps 0", ["sample", "tiny", "--npy", "x.npy", "--steps", "0"], message="steps",
             outputs=["x.npy"]))
    add(Case("sample", "steps beyond T", ["sample", "tiny", "--npy", "x.npy", "--steps", "101"], message="steps",
             outputs=["x.npy"]))
    add(Case("sample", "steps negative", ["sample", "tiny", "--npy", "x.npy", "--steps", "-3"], outputs=["x.npy"]))
    add(Case("sample", "w nan", ["sample", "tiny", "--npy", "x.npy", "--w", "nan"], message="w", outputs=["x.npy"]))
    add(Case("sample", "w inf", ["sample", "tiny", "--npy", "x.npy", "--w", "inf"], message="w", outputs=["x.npy"]))
    add(Case("sample", "w empty", ["sample", "tiny", "--npy", "x.npy", "--w", ""], message="--w", outputs=["x.npy"]))
    add(Case("sample", "w not a number", ["sample", "tiny", "--npy", "x.npy", "--w", "strong"], message="--w",
             outputs=["x.npy"]))
    add(Case("sample", "w list of the wrong length", ["sample", "tiny", "--npy", "x.npy", "--w", "1,2"],
             message="--w", outputs=["x.npy"]))
    add(Case("sample", "w 1e30 warns", ["sample", "tiny", "--npy", "big.npy", "--w", "1e30", "--steps", "2", "--n", "1"],
             expect=OK, stderr_has="far outside the data range"))
    add(Case("sample", "w 1e30 over many steps", ["sample", "tiny", "--npy", "big2.npy", "--w", "1e30", "--steps", "20",
                                                  "--n", "1"], expect=OK, stderr_has="far outside the data range"))
    add(Case("sample", "classes out of range", ["sample", "tiny", "--npy", "x.npy", "--classes", "7"],
             message="out of range", outputs=["x.npy"]))
    add(Case("sample", "classes negative", ["sample", "tiny", "--npy", "x.npy", "--classes", "-1"],
             message="out of range", outputs=["x.npy"]))
    add(Case("sample", "classes not numbers", ["sample", "tiny", "--npy", "x.npy", "--classes", "cat"],
             message="--classes", outputs=["x.npy"]))
    add(Case("sample", "classes empty", ["sample", "tiny", "--npy", "x.npy", "--classes", ""], message="--classes",
             outputs=["x.npy"]))
    add(Case("sample", "n zero", ["sample", "tiny", "--npy", "x.npy", "--n", "0"], message="--n", outputs=["x.npy"]))
    add(Case("sample", "n enormous", ["sample", "tiny", "--npy", "x.npy", "--n", "100000000"], outputs=["x.npy"]))
    add(Case("sample", "threshold 2", ["sample", "tiny", "--npy", "x.npy", "--threshold", "2"], message="threshold",
             outputs=["x.npy"]))
    add(Case("sample", "threshold 0", ["sample", "tiny", "--npy", "x.npy", "--threshold", "0"], message="threshold",
             outputs=["x.npy"]))
    add(Case("sample", "threshold nan", ["sample", "tiny", "--npy", "x.npy", "--threshold", "nan"],
             message="threshold", outputs=["x.npy"]))
    add(Case("sample", "interval reversed", ["sample", "tiny", "--npy", "x.npy", "--interval", "5,1"],
             message="interval", outputs=["x.npy"]))
    add(Case("sample", "interval one value", ["sample", "tiny", "--npy", "x.npy", "--interval", "5"],
             message="interval", outputs=["x.npy"]))
    add(Case("sample", "interval nan", ["sample", "tiny", "--npy", "x.npy", "--interval", "nan,1"],
             message="interval", outputs=["x.npy"]))
    add(Case("sample", "eta with ddpm", ["sample", "tiny", "--npy", "x.npy", "--eta", "0.5", "--sampler", "ddpm"],
             outputs=["x.npy"]))
    add(Case("sample", "eta 2", ["sample", "tiny", "--npy", "x.npy", "--eta", "2"], outputs=["x.npy"]))
    add(Case("sample", "unknown sampler", ["sample", "tiny", "--npy", "x.npy", "--sampler", "magic"],
             message="sampler", outputs=["x.npy"]))
    add(Case("sample", "unknown spacing", ["sample", "tiny", "--npy", "x.npy", "--spacing", "random"],
             message="spacing", outputs=["x.npy"]))
    add(Case("sample", "unknown w schedule", ["sample", "tiny", "--npy", "x.npy", "--w-schedule", "cosine"],
             outputs=["x.npy"]))
    add(Case("sample", "negative class out of range", ["sample", "tiny", "--npy", "x.npy", "--negative", "9"],
             message="negative", outputs=["x.npy"]))
    add(Case("sample", "negative not a number", ["sample", "tiny", "--npy", "x.npy", "--negative", "dog"],
             message="--negative", outputs=["x.npy"]))
    add(Case("sample", "negative on the fused layout", ["sample", "fused", "--npy", "x.npy", "--negative", "1"],
             message="stacked layout", outputs=["x.npy"]))
    add(Case("sample", "cond file on a class model", ["sample", "tiny", "--npy", "x.npy", "--cond", "calib.npz"],
             message="--cond", outputs=["x.npy"]))
    add(Case("sample", "noise file missing", ["sample", "tiny", "--npy", "x.npy", "--noise", "none.npy"],
             message="--noise", outputs=["x.npy"]))
    add(Case("sample", "noise file not .npy", ["sample", "tiny", "--npy", "x.npy", "--noise", "nets.py"],
             message="--noise", outputs=["x.npy"]))
    add(Case("sample", "noise of the wrong shape", ["sample", "tiny", "--npy", "x.npy", "--noise", "n1.npy"],
             setup=_npy("n1.npy", (2, 2)), message="noise", outputs=["x.npy"]))
    add(Case("sample", "noise with NaN", ["sample", "tiny", "--npy", "x.npy", "--noise", "n2.npy", "--classes", "0",
                                          "--n", "1"], setup=_npy("n2.npy", (1, 2, 6, 6), nan=True), message="NaN",
             outputs=["x.npy"]))
    add(Case("sample", "noise of strings", ["sample", "tiny", "--npy", "x.npy", "--noise", "n3.npy", "--classes", "0",
                                            "--n", "1"], setup=_npy("n3.npy", None), message="noise",
             outputs=["x.npy"]))
    add(Case("sample", "static graph with another N", ["sample", "static", "--npy", "x.npy", "--classes", "0,1,2",
                                                      "--n", "1"], message="static", outputs=["x.npy"]))
    add(Case("sample", "image grid of a 1-D model", ["sample", "audio", "-o", "a.png"], message="cannot draw",
             outputs=["a.png"]))
    add(Case("sample", "no such artifact", ["sample", "nowhere", "--npy", "x.npy"], message="no such artifact"))
    add(Case("sample", "artifact is a file", ["sample", "nets.py", "--npy", "x.npy"], message="a file"))
    add(Case("sample", "folder without a manifest", ["sample", "notes", "--npy", "x.npy"], message="manifest.json"))
    add(Case("sample", "model file changed", ["sample", "m1", "--npy", "x.npy"],
             setup=lambda w: (copy_of("tiny", "m1")(w), (w / "m1" / "model.onnx").write_bytes(b"garbage")),
             message="does not match its manifest", outputs=["x.npy"]))
    add(Case("sample", "model file missing", ["sample", "m2", "--npy", "x.npy"],
             setup=lambda w: (copy_of("tiny", "m2")(w), (w / "m2" / "model.onnx").unlink()), message="missing",
             outputs=["x.npy"]))
    add(Case("sample", "manifest not JSON", ["sample", "m3", "--npy", "x.npy"], setup=raw_manifest("m3", "{"),
             message="corrupt manifest"))
    add(Case("sample", "manifest a number", ["sample", "m4", "--npy", "x.npy"], setup=raw_manifest("m4", "3"),
             message="manifest"))
    add(Case("sample", "manifest layout a number", ["sample", "m5", "--npy", "x.npy"],
             setup=edit_manifest("m5", lambda d: d.update(layout=3)), message="layout"))
    add(Case("sample", "manifest layout unknown", ["sample", "m6", "--npy", "x.npy"],
             setup=edit_manifest("m6", lambda d: d.update(layout="diagonal")), message="layout"))
    add(Case("sample", "manifest inputs a string", ["sample", "m7", "--npy", "x.npy"],
             setup=edit_manifest("m7", lambda d: d.update(inputs="sample")), message="inputs"))
    add(Case("sample", "manifest input dtype unknown", ["sample", "m8", "--npy", "x.npy"],
             setup=edit_manifest("m8", lambda d: d["inputs"][0].update(dtype="float128")), message="dtype"))
    add(Case("sample", "manifest shape negative", ["sample", "m9", "--npy", "x.npy"],
             setup=edit_manifest("m9", lambda d: d["inputs"][0].update(shape=["2N", -2, 6, 6])), message="shape"))
    add(Case("sample", "manifest schedule beta_end 2", ["sample", "m10", "--npy", "x.npy"],
             setup=edit_manifest("m10", lambda d: d["schedule"].update(beta_end=2.0)), message="beta_end"))
    add(Case("sample", "manifest null a real class", ["sample", "m11", "--npy", "x.npy"],
             setup=edit_manifest("m11", lambda d: d["condition"].update(null=0)), message="real classes"))
    add(Case("sample", "manifest model_file with a path", ["sample", "m12", "--npy", "x.npy"],
             setup=edit_manifest("m12", lambda d: d.update(model_file="../tiny/model.onnx")), message="model_file"))
    add(Case("sample", "manifest sha not hex", ["sample", "m13", "--npy", "x.npy"],
             setup=edit_manifest("m13", lambda d: d.update(model_sha256="xyz")), message="sha256"))
    add(Case("sample", "manifest unknown key", ["sample", "m14", "--npy", "x.npy"],
             setup=edit_manifest("m14", lambda d: d.update(colour="red")), message="unknown key"))
    add(Case("sample", "manifest format of the future", ["sample", "m15", "--npy", "x.npy"],
             setup=edit_manifest("m15", lambda d: d.update(format="cfg-export/9")), message="format"))
    add(Case("sample", "manifest batch zero", ["sample", "m16", "--npy", "x.npy"],
             setup=edit_manifest("m16", lambda d: d.update(batch=0)), message="batch"))
    add(Case("sample", "manifest sample_shape disagrees with the model", ["sample", "m17", "--npy", "x.npy"],
             setup=edit_manifest("m17", lambda d: d.update(sample_shape=[3, 6, 6])), message="manifest"))
    add(Case("sample", "manifest prediction disagrees with the model", ["sample", "m18", "--npy", "x.npy"],
             setup=edit_manifest("m18", lambda d: d.update(prediction="v")), message="manifest"))
    add(Case("sample", "backend unknown", ["sample", "tiny", "--npy", "x.npy", "--backend", "tpu"]))
    add(Case("sample", "tensorrt backend without an engine", ["sample", "tiny", "--npy", "x.npy", "--backend",
                                                              "tensorrt"], message="engine.json"))
    add(Case("sample", "cuda graph on onnxruntime", ["sample", "tiny", "--npy", "x.npy", "--cuda-graph"],
             message="--cuda-graph", outputs=["x.npy"]))
    add(Case("sample", "threads zero", ["sample", "tiny", "--npy", "x.npy", "--threads", "0"], outputs=["x.npy"]))
    add(Case("sample", "full disk writing the samples", ["sample", "tiny", "--npy", "fullx.npy", "--n", "64",
                                                         "--steps", "2"], fsize=4096, outputs=["fullx.npy"]))
    add(Case("sample", "a run that works", ["sample", "tiny", "--npy", "ok.npy", "--n", "2", "--steps", "3", "-q"],
             expect=OK, check=exists("ok.npy")))
    add(Case("sample", "runtime's own command", ["sample", "tiny", "--npy", "ok2.npy", "--steps", "2", "-q"],
             expect=OK, check=exists("ok2.npy"), runner="runtime"))
    add(Case("sample", "runtime's command, unknown option", ["sample", "tiny", "--colour"], runner="runtime"))
    # ---- schedulers ----
    add(Case("sample", "karras on ddim", ["sample", "tiny", "--npy", "x.npy", "--sampler", "ddim", "--karras"],
             outputs=["x.npy"]))
    add(Case("sample", "karras on an int64 graph", ["sample", "tiny", "--npy", "x.npy", "--sampler", "euler",
                                                    "--karras"], message="fractional timesteps", outputs=["x.npy"]))
    add(Case("sample", "flow sampler on a VP model", ["sample", "tiny", "--npy", "x.npy", "--sampler", "flow-euler"],
             outputs=["x.npy"]))
    add(Case("sample", "--set of an unknown field", ["sample", "tiny", "--npy", "x.npy", "--set", "colour=3"],
             outputs=["x.npy"]))
    add(Case("sample", "--set without =", ["sample", "tiny", "--npy", "x.npy", "--set", "steps_offset"],
             outputs=["x.npy"]))
    add(Case("sample", "--set a value diffusers cannot run", ["sample", "tiny", "--npy", "x.npy", "--sampler",
                                                              "dpmpp-2m", "--set", "algorithm_type=dpmsolver"],
             outputs=["x.npy"]))
    add(Case("sample", "steps offset past T", ["sample", "tiny", "--npy", "x.npy", "--steps-offset", "500"],
             outputs=["x.npy"]))
    add(Case("sample", "guidance rescale 2", ["sample", "tiny", "--npy", "x.npy", "--guidance-rescale", "2"],
             outputs=["x.npy"]))
    add(Case("sample", "guidance rescale nan", ["sample", "tiny", "--npy", "x.npy", "--guidance-rescale", "nan"],
             outputs=["x.npy"]))
    add(Case("sample", "every sampler runs", ["sample", "tiny", "--npy", "e.npy", "--sampler", "euler-ancestral",
                                              "--steps", "4", "--n", "1", "-q"], expect=OK, check=exists("e.npy")))
    # ---- pipelines ----
    add(Case("pipeline", "prompt on a class model", ["sample", "tiny", "--npy", "x.npy", "--prompt", "a cat"],
             message="--prompt", outputs=["x.npy"]))
    add(Case("pipeline", "classes on a text pipeline", ["sample", "sd", "--npy", "x.npy", "--classes", "1"],
             message="--classes", outputs=["x.npy"]))
    add(Case("pipeline", "prompt on DiT", ["sample", "dit", "--npy", "x.npy", "--prompt", "a cat"],
             message="--prompt", outputs=["x.npy"]))
    add(Case("pipeline", "no prompt", ["sample", "sd", "--npy", "x.npy"], message="prompt", outputs=["x.npy"]))
    add(Case("pipeline", "empty prompts file", ["sample", "sd", "--npy", "x.npy", "--prompts", "empty.txt"],
             setup=lambda w: (w / "empty.txt").write_text("\n\n"), message="no prompt", outputs=["x.npy"]))
    add(Case("pipeline", "prompts file missing", ["sample", "sd", "--npy", "x.npy", "--prompts", "none.txt"],
             message="--prompts", outputs=["x.npy"]))
    add(Case("pipeline", "height not a multiple", ["sample", "sd", "--npy", "x.npy", "--prompt", "a", "--height",
                                                   "33"], outputs=["x.npy"]))
    add(Case("pipeline", "height too large", ["sample", "sd", "--npy", "x.npy", "--prompt", "a", "--height",
                                              "4096"], outputs=["x.npy"]))
    add(Case("pipeline", "height zero", ["sample", "sd", "--npy", "x.npy", "--prompt", "a", "--height", "0"],
             outputs=["x.npy"]))
    add(Case("pipeline", "too many negatives", ["sample", "sd", "--npy", "x.npy", "--prompt", "a", "--prompt", "b",
                                                "--prompt", "c", "--negative-prompt", "x", "--negative-prompt", "y"],
             message="--negative-prompt", outputs=["x.npy"]))
    add(Case("pipeline", "unknown DiT class name", ["sample", "dit", "--npy", "x.npy", "--classes", "unicorn"],
             outputs=["x.npy"]))
    add(Case("pipeline", "--cond on a pipeline", ["sample", "sd", "--npy", "x.npy", "--prompt", "a", "--cond",
                                                  "n1.npy"], setup=_npy("n1.npy", (2, 2)), outputs=["x.npy"]))
    add(Case("pipeline", "latents and npy the same file", ["sample", "sd", "--npy", "same.npy", "--latents",
                                                           "same.npy", "--prompt", "a"], outputs=["same.npy"]))
    add(Case("pipeline", "noise of the wrong shape", ["sample", "sd", "--npy", "x.npy", "--prompt", "a", "--noise",
                                                      "n1.npy"], setup=_npy("n1.npy", (2, 2)), outputs=["x.npy"]))
    add(Case("pipeline", "tokenizer tampered", ["sample", "sd2", "--npy", "x.npy", "--prompt", "a"],
             setup=lambda w: (copy_of("sd", "sd2")(w), (w / "sd2" / "tokenizer" / "tokenizer.json").write_text("{}")),
             outputs=["x.npy"]))
    add(Case("pipeline", "a stage missing", ["sample", "sd3", "--npy", "x.npy", "--prompt", "a"],
             setup=lambda w: (copy_of("sd", "sd3")(w), shutil.rmtree(w / "sd3" / "vae_decoder")), outputs=["x.npy"]))
    add(Case("pipeline", "pipeline.json broken", ["sample", "sd4", "--npy", "x.npy", "--prompt", "a"],
             setup=lambda w: (copy_of("sd", "sd4")(w), (w / "sd4" / "pipeline.json").write_text("[")),
             outputs=["x.npy"]))
    add(Case("pipeline", "export a folder without model_index", ["onnx", "notes", "-o", "p1"]))
    add(Case("pipeline", "export a pipeline missing its vae", ["onnx", "sd-broken", "-o", "p2"],
             setup=lambda w: (shutil.copytree(w / "sd-folder", w / "sd-broken", dirs_exist_ok=True),
                              shutil.rmtree(w / "sd-broken" / "vae")), outputs=["p2"]))
    add(Case("pipeline", "export an unsupported pipeline class", ["onnx", "sd-other", "-o", "p3"],
             setup=lambda w: _pipeline_class(w, "KandinskyPipeline"), message="not supported", outputs=["p3"]))
    add(Case("pipeline", "export a pipeline into itself", ["onnx", "sd-folder", "-o", "sd-folder/out"],
             message="source"))
    add(Case("pipeline", "a prompt run that works", ["sample", "sd", "--prompt", "a red car", "--steps", "2",
                                                     "-o", "car.png", "-q"], expect=OK, check=exists("car.png", PNG)))
    add(Case("pipeline", "print-trtexec of a pipeline", ["trt", "sd", "--fp16", "--print-trtexec", "-q"], expect=OK))
    # ---- trt ----
    add(Case("trt", "no tensorrt installed: one line", ["trt", "tiny"], message="tensorrt"))
    add(Case("trt", "print-trtexec fp16", ["trt", "tiny", "--fp16", "--print-trtexec", "-q"], expect=OK))
    add(Case("trt", "int8 without ranges", ["trt", "tiny", "--int8", "--print-trtexec"], message="INT8"))
    add(Case("trt", "int8-onnx without Q/DQ", ["trt", "tiny", "--int8", "--int8-onnx", "tiny/model.onnx",
                                              "--print-trtexec"], message="QuantizeLinear"))
    add(Case("trt", "int8-onnx missing", ["trt", "tiny", "--int8", "--int8-onnx", "none.onnx", "--print-trtexec"],
             message="no such file"))
    add(Case("trt", "calibration data without a cache", ["trt", "tiny", "--int8", "--calibration-data", "calib.npz",
                                                         "--print-trtexec"], message="calibration.cache"))
    add(Case("trt", "calibration data of another model", ["trt", "digits", "--int8", "--calibration-data",
                                                          "calib.npz", "--print-trtexec"], message="recorded from"))
    add(Case("trt", "calibration data not a file", ["trt", "tiny", "--int8", "--calibration-data", "notes",
                                                    "--print-trtexec"]))
    add(Case("trt", "min batch above max", ["trt", "tiny", "--print-trtexec", "--min-batch", "8", "--max-batch", "2"],
             message="min <= opt <= max"))
    add(Case("trt", "batch zero", ["trt", "tiny", "--print-trtexec", "--max-batch", "0"], message="--max-batch"))
    add(Case("trt", "opt level 9", ["trt", "tiny", "--print-trtexec", "--opt-level", "9"], message="--opt-level"))
    add(Case("trt", "workspace zero", ["trt", "tiny", "--print-trtexec", "--workspace", "0"], message="--workspace"))
    add(Case("trt", "dla on 11.2", ["trt", "tiny", "--print-trtexec", "--dla-core", "0", "--trt-version", "11.2"],
             message="DLA"))
    add(Case("trt", "trt version nonsense", ["trt", "tiny", "--print-trtexec", "--trt-version", "ten"],
             message="TensorRT version"))
    add(Case("trt", "trt version too old", ["trt", "tiny", "--print-trtexec", "--trt-version", "7.1"],
             message="older than"))
    add(Case("trt", "keep-fp32 without fp16", ["trt", "tiny", "--print-trtexec", "--keep-fp32", "@norm"],
             message="--keep-fp32"))
    add(Case("trt", "keep-fp32 group unknown", ["trt", "tiny", "--fp16", "--print-trtexec", "--keep-fp32", "@magic"],
             message="no such group"))
    add(Case("trt", "static graph with batch options", ["trt", "static", "--print-trtexec", "--max-batch", "4"],
             message="static"))
    add(Case("trt", "interval profile on fused", ["trt", "fused", "--print-trtexec", "--interval-profile"],
             message="fused"))
    add(Case("trt", "not an artifact", ["trt", "notes", "--print-trtexec"], message="manifest.json"))
    # ---- calibrate ----
    add(Case("calibrate", "output not .npz", ["calibrate", "tiny", "-o", "c.txt"], message=".npz", outputs=["c.txt"]))
    add(Case("calibrate", "steps beyond the training timesteps", ["calibrate", "tiny", "-o", "c40.npz", "--steps",
                                                                  str(10**20)], message="--steps", outputs=["c40.npz"]))
    add(Case("calibrate", "images beyond memory", ["calibrate", "tiny", "-o", "c41.npz", "--n", str(10**20)],
             message="ask for at most", outputs=["c41.npz"]))
    add(Case("calibrate", "output is a folder", ["calibrate", "tiny", "-o", "notes"], message="folder"))
    add(Case("calibrate", "output read-only", ["calibrate", "tiny", "-o", f"{READ_ONLY}/c.npz"]))
    add(Case("calibrate", "steps 2", ["calibrate", "tiny", "-o", "c1.npz", "--steps", "2"], message="--steps",
             outputs=["c1.npz"]))
    add(Case("calibrate", "record steps 2", ["calibrate", "tiny", "-o", "c2.npz", "--record-steps", "2"],
             message="--record-steps", outputs=["c2.npz"]))
    add(Case("calibrate", "record more steps than steps", ["calibrate", "tiny", "-o", "c3.npz", "--steps", "5",
                                                           "--record-steps", "9"], outputs=["c3.npz"]))
    add(Case("calibrate", "classes out of range", ["calibrate", "tiny", "-o", "c4.npz", "--classes", "5"],
             outputs=["c4.npz"]))
    add(Case("calibrate", "n zero", ["calibrate", "tiny", "-o", "c5.npz", "--n", "0"], outputs=["c5.npz"]))
    add(Case("calibrate", "w nan", ["calibrate", "tiny", "-o", "c6.npz", "--w", "nan"], outputs=["c6.npz"]))
    add(Case("calibrate", "an INT8 artifact", ["calibrate", "int8", "-o", "c7.npz"], outputs=["c7.npz"]))
    add(Case("calibrate", "full disk", ["calibrate", "tiny", "-o", "c8.npz", "--steps", "10"], fsize=2048,
             outputs=["c8.npz"]))
    add(Case("calibrate", "a recording that works", ["calibrate", "tiny", "-o", "c9.npz", "--steps", "6", "-q"],
             expect=OK, check=exists("c9.npz")))
    # ---- quantize ----
    add(Case("quantize", "an empty --method", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q40", "--method", ""],
             message="--method", outputs=["q40"]))
    add(Case("quantize", "an empty --keep-fp32 pattern", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q41",
                                                           "--keep-fp32", ""], message="empty pattern", outputs=["q41"]))
    add(Case("quantize", "calibration of another model", ["quantize", "digits", "--calib", "calib.npz", "-o", "q1"],
             message="recorded from", outputs=["q1"]))
    add(Case("quantize", "calibration file empty", ["quantize", "tiny", "--calib", "empty.npz", "-o", "q2"],
             setup=lambda w: (w / "empty.npz").write_bytes(b""), message="empty", outputs=["q2"]))
    add(Case("quantize", "calibration file truncated", ["quantize", "tiny", "--calib", "trunc.npz", "-o", "q3"],
             setup=lambda w: (w / "trunc.npz").write_bytes((w / "calib.npz").read_bytes()[:500]),
             message="truncated", outputs=["q3"]))
    add(Case("quantize", "calibration is a plain array", ["quantize", "tiny", "--calib", "n1.npy", "-o", "q4"],
             setup=_npy("n1.npy", (2, 2)), outputs=["q4"]))
    add(Case("quantize", "classifier missing with --report", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q5",
                                                              "--report", "--classifier", "none.onnx"],
             message="--classifier", outputs=["q5"]))
    add(Case("quantize", "classifier without --report", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q6",
                                                         "--classifier", "x.onnx"], message="--report",
             outputs=["q6"]))
    add(Case("quantize", "unknown method", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q7", "--method", "best"],
             message="--method", outputs=["q7"]))
    add(Case("quantize", "unknown activation type", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q8",
                                                     "--activation-type", "int4"], outputs=["q8"]))
    add(Case("quantize", "quantize-all with keep", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q9",
                                                    "--quantize-all", "--keep-fp32", "Conv"], outputs=["q9"]))
    add(Case("quantize", "output over a user folder", ["quantize", "tiny", "--calib", "calib.npz", "-o", "notes",
                                                       "--overwrite"], message="not a folder written by cfg-export"))
    add(Case("quantize", "output is the source", ["quantize", "tiny", "--calib", "calib.npz", "-o", "tiny",
                                                  "--overwrite"], message="source"))
    add(Case("quantize", "an INT8 artifact again", ["quantize", "int8", "--calib", "calib.npz", "-o", "q10"],
             outputs=["q10"]))
    # ---- bench ----
    add(Case("bench", "fused mode on a stacked artifact", ["bench", "tiny", "--mode", "fused", "--steps", "2"],
             message="fused"))
    add(Case("bench", "unknown mode", ["bench", "tiny", "--mode", "fastest"], message="mode"))
    add(Case("bench", "batch zero", ["bench", "tiny", "--batch", "0"], message="--batch"))
    add(Case("bench", "batch not numbers", ["bench", "tiny", "--batch", "x"], message="--batch"))
    add(Case("bench", "batch 100000", ["bench", "digits", "--batch", "100000", "--steps", "2"]))
    add(Case("bench", "steps 1", ["bench", "tiny", "--steps", "1"], message="steps"))
    add(Case("bench", "warmup negative", ["bench", "tiny", "--warmup", "-1"]))
    add(Case("bench", "precision not given", ["bench", "tiny", "--precision", "int8-qdq"], message="precision"))
    add(Case("bench", "unknown backend", ["bench", "tiny", "--backend", "magic"], message="backend"))
    add(Case("bench", "json path is a folder", ["bench", "tiny", "--json", "notes"], message="--json"))
    add(Case("bench", "json path read-only", ["bench", "tiny", "--json", f"{READ_ONLY}/b.json"]))
    add(Case("bench", "plot not png", ["bench", "tiny", "--plot", "b.pdf"], message="--plot"))
    add(Case("bench", "static graph at another N", ["bench", "static", "--batch", "3", "--steps", "2"],
             message="static"))
    add(Case("bench", "a bench that works", ["bench", "tiny", "--batch", "1", "--steps", "2", "--warmup", "0",
                                             "--json", "b.json", "-q"], expect=OK, check=exists("b.json")))
    # ---- eval ----
    add(Case("eval", "steps 0", ["eval", "digits", "--steps", "0", "--per-class", "2"], message="steps"))
    add(Case("eval", "w empty", ["eval", "digits", "--w", ""], message="--w"))
    add(Case("eval", "w nan", ["eval", "digits", "--w", "nan", "--steps", "2", "--per-class", "2"], message="w"))
    add(Case("eval", "per class 1", ["eval", "digits", "--per-class", "1"], message="per class"))
    add(Case("eval", "classifier is the denoiser", ["eval", "digits", "--classifier", "digits/model.onnx",
                                                    "--steps", "2", "--per-class", "2"], message="classifier"))
    add(Case("eval", "classifier not ONNX", ["eval", "digits", "--classifier", "nets.py", "--steps", "2",
                                             "--per-class", "2"], message="classifier"))
    add(Case("eval", "reference malformed", ["eval", "digits", "--reference", "n1.npy", "--steps", "2",
                                             "--per-class", "2"], setup=_npy("n1.npy", (2, 2)), message="reference"))
    add(Case("eval", "reference not numpy", ["eval", "digits", "--reference", "nets.py", "--steps", "2",
                                             "--per-class", "2"], message="reference"))
    add(Case("eval", "an embedding or 1-D model", ["eval", "audio", "--steps", "2", "--per-class", "2"]))
    add(Case("eval", "json path is a folder", ["eval", "digits", "--json", "notes"], message="--json"))
    add(Case("eval", "seed -5", ["eval", "digits", "--seed", "-5", "--steps", "2", "--per-class", "2"],
             message="seed"))
    # ---- guidance strategies ----
    add(Case("sample", "strategy not understood", ["sample", "tiny", "--strategy", "fastest", "-o", "s1.png"],
             message="not understood", outputs=["s1.png"]))
    add(Case("sample", "adaptive threshold 2", ["sample", "tiny", "--strategy", "adaptive:2", "-o", "s2.png"],
             message="cosine", outputs=["s2.png"]))
    add(Case("sample", "cache every 0", ["sample", "tiny", "--strategy", "cache:0", "-o", "s3.png"],
             message="k >= 1", outputs=["s3.png"]))
    add(Case("sample", "cache window reversed", ["sample", "tiny", "--strategy", "cache:3@5..1", "-o", "s4.png"],
             message="LO <= HI", outputs=["s4.png"]))
    add(Case("sample", "strategy interval and --interval", ["sample", "tiny", "--strategy", "interval:0..5",
                                                            "--interval", "1,2", "-o", "s5.png"],
             message="give one of them", outputs=["s5.png"]))
    add(Case("sample", "strategy on a fused graph", ["sample", "fused", "--strategy", "cache:3", "--steps", "2",
                                                     "--npy", "s6.npy"], message="stacked layout", outputs=["s6.npy"]))
    add(Case("sample", "cached guidance that works", ["sample", "digits", "--strategy", "adaptive+cache:3", "--n", "1",
                                                      "--steps", "4", "-o", "s7.png", "-q"],
             expect=OK, check=exists("s7.png", PNG)))
    add(Case("eval", "strategy given twice", ["eval", "digits", "--strategy", "full,full", "--steps", "2",
                                              "--per-class", "2"], message="given twice"))
    # ---- INT8 options ----
    add(Case("quantize", "schedule interval reversed", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q11",
                                                        "--schedule", "500-100"], message="--schedule",
             outputs=["q11"]))
    add(Case("quantize", "smoothquant alpha 2", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q12",
                                                 "--smoothquant", "2"], outputs=["q12"]))
    add(Case("quantize", "select budget negative", ["quantize", "tiny", "--calib", "calib.npz", "-o", "q13",
                                                    "--select", "--budget", "-1"], outputs=["q13"]))
    # ---- serving ----
    add(Case("triton", "runs per sampler 0", ["triton", "tiny", "-o", "r1", "--runs-per-sampler", "0"],
             message="runs-per-sampler", outputs=["r1"]))
    add(Case("triton", "a static graph", ["triton", "static", "-o", "r2"], outputs=["r2"]))
    add(Case("triton", "sampler instances beyond a machine", ["triton", "tiny", "-o", "r40", "--sampler-instances",
                                                              str(10**20)], message="at most", outputs=["r40"]))
    add(Case("triton", "output over a user folder", ["triton", "tiny", "-o", "notes", "--overwrite"],
             message="not a folder written by cfg-export"))
    add(Case("triton", "unknown platform", ["triton", "tiny", "-o", "r3", "--platform", "magic"], outputs=["r3"]))
    add(Case("triton", "a repository that works", ["triton", "sd", "-o", "r4", "-q"], expect=OK,
             check=exists("r4/sampler/config.pbtxt")))
    add(Case("serve", "port out of range", ["serve", "tiny", "--port", "99999"], message="--port"))
    add(Case("serve", "two endpoints on one port", ["serve", "tiny", "--port", "8001"], message="one port"))
    add(Case("request", "no server there", ["request", "127.0.0.1:9", "--classes", "1", "-o", "r5.png"],
             message="cannot reach", outputs=["r5.png"]))
    add(Case("request", "nothing to write", ["request", "127.0.0.1:9", "--prompt", "a cat"],
             message="nothing to write"))
    add(Case("request", "a malformed URL", ["request", "nonsense:url::", "--classes", "1", "-o", "r7.png"],
             message="HOST:PORT", outputs=["r7.png"]))
    add(Case("request", "an https URL", ["request", "https://127.0.0.1:9", "--classes", "1", "-o", "r8.png"],
             message="plain HTTP", outputs=["r8.png"]))
    add(Case("request", "prompt and classes", ["request", "127.0.0.1:9", "--prompt", "a cat", "--classes", "1",
                                               "-o", "r6.png"], message="one kind of condition", outputs=["r6.png"]))
    return t


def _pipeline_class(work: Path, name: str) -> None:
    shutil.copytree(work / "sd-folder", work / "sd-other", dirs_exist_ok=True)
    index = json.loads((work / "sd-other" / "model_index.json").read_text())
    index["_class_name"] = name
    (work / "sd-other" / "model_index.json").write_text(json.dumps(index))


def _nan_weights(folder: Path) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    name = next(iter(tensors))
    tensors[name] = tensors[name].copy()
    tensors[name].flat[0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))


def _npy(name: str, shape, nan: bool = False) -> Callable[[Path], None]:
    import numpy as np

    def setup(work: Path):
        if shape is None:
            np.save(work / name, np.array(["a", "b"]))
            return
        a = np.zeros(shape, np.float32)
        if nan:
            a.flat[0] = np.nan
        np.save(work / name, a)
    return setup


def main() -> int:
    parser = argparse.ArgumentParser(description=textwrap.dedent(__doc__).splitlines()[0])
    parser.add_argument("--only", default=None, help="run only the cases of this verb")
    parser.add_argument("--keep", default=None, help="work in this folder and keep it")
    parser.add_argument("-v", "--verbose", action="store_true", help="print the error line of every case")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="cfg-export-break-it."))
    work.mkdir(parents=True, exist_ok=True)
    table = [c for c in cases() if args.only in (None, c.verb)]
    print(f"preparing {work} ...", flush=True)
    protected = prepare(work)
    outcomes = []
    try:
        for k, case in enumerate(table, 1):
            if case.setup is not None:
                case.setup(work)
            outcome = run_case(case, work, protected)
            outcomes.append(outcome)
            bad = outcome.kind in BAD_KINDS
            if bad or args.verbose:
                print(f"{k:3d} {'FAIL' if bad else 'ok  '} {case.verb:9s} {case.name:50s} {outcome.kind}: "
                      f"{outcome.detail}", flush=True)
    finally:
        os.chmod(work / "readonly", 0o755)
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    counts = {}
    for o in outcomes:
        counts[o.kind] = counts.get(o.kind, 0) + 1
    print(f"\n{len(outcomes)} cases over {len({c.verb for c in table})} verbs in "
          f"{sum(o.seconds for o in outcomes):.0f} s:")
    for kind in ("ok", "clean error", *BAD_KINDS):
        print(f"  {kind:17s} {counts.get(kind, 0)}")
    return 1 if any(o.kind in BAD_KINDS for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
