"""Nothing lost, nothing silently wrong: the source is never overwritten, one writer at a
time, no leftovers from a killed run, a self-check that refuses non-finite output, errors
that name the cause of a NaN, full disks, memory, and bad config/manifest JSON."""
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from cfg_export.export.exporter import export_onnx
from cfg_export.runtime.cli import os_error_message
from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import _writer_lock, staged_dir, staged_file
from cfg_export.runtime.pipeline import sample_guided
from tests.conftest import DIGITS, ROOT, run_cli


def leftovers(folder):
    return [p.name for p in folder.rglob(".*") if p.suffix in (".partial", ".old", ".lock")]


@pytest.fixture
def model_folder(tmp_path):
    """A copy of the reference model folder, as a user has it."""
    folder = tmp_path / "model"
    shutil.copytree(DIGITS, folder)
    shutil.copy(ROOT / "examples" / "digits" / "nets.py", tmp_path / "nets.py")
    return folder


def digests(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# -- the source is never overwritten -------------------------------------------------------------

@pytest.mark.parametrize("target", ["model", "model/out", "."])
def test_output_that_is_holds_or_lies_in_the_source_is_refused(model_folder, tmp_path, target):
    before = digests(model_folder)
    proc = run_cli("onnx", model_folder, "-o", tmp_path / target, "--overwrite", cwd=tmp_path)
    assert proc.returncode == 1 and "the source is never overwritten" in proc.stderr, proc.stderr
    assert digests(model_folder) == before


# -- one writer at a time, and the leftovers of a killed one ---------------------------------------

def test_a_second_writer_gets_a_clear_error(tmp_path):
    target = tmp_path / "out"
    with _writer_lock(target):
        with pytest.raises(CfgExportError, match="another cfg-export process is writing .*out right now"):
            with staged_dir(target):
                pass
        with pytest.raises(CfgExportError, match="another cfg-export process is writing"):
            with staged_file(target):
                pass
    with staged_dir(target) as tmp:  # free again once the first writer is done
        (tmp / "a").write_text("x")
    assert (target / "a").read_text() == "x" and not leftovers(tmp_path)


def test_two_exports_to_one_folder_at_once(tmp_path):
    """A process holding the lock (as a running export does) makes the export refuse."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from cfg_export.runtime.files import _writer_lock
        with _writer_lock(Path({str(tmp_path / 'out')!r})):
            print("locked", flush=True)
            time.sleep(60)
    """)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "out")
        assert proc.returncode == 1 and "another cfg-export process is writing" in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
    finally:
        holder.kill()
        holder.wait()
    assert run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "out", "-q").returncode == 0  # the lock died


def test_a_killed_run_leaves_nothing_the_next_run_keeps(tmp_path):
    (tmp_path / ".out.abc123.partial").mkdir()
    (tmp_path / ".out.abc123.partial" / "model.onnx").write_bytes(b"\0" * 1000)
    (tmp_path / ".out.def456.old").mkdir()
    (tmp_path / ".grid.png.x1.partial").write_bytes(b"\0")
    (tmp_path / ".other.partial").mkdir()  # another output's: not ours to remove
    assert run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "out", "-q").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".grid.png.x1.partial",
                                                                                  ".other.partial"]


def test_sigkill_during_an_export_then_a_rerun(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "from cfg_export.cli import main; main()", "onnx",
                             str(DIGITS), "-o", str(tmp_path / "out")], cwd=ROOT, stderr=subprocess.PIPE)
    for _ in range(600):  # until the export has started writing
        if list(tmp_path.glob(".out.*.partial")) or proc.poll() is not None:
            break
        subprocess.run(["sleep", "0.05"])
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "out", "--overwrite", "-q").returncode == 0
    assert not leftovers(tmp_path)


# -- the self-check refuses what is not finite -------------------------------------------------------

def test_a_model_that_emits_nan_at_some_timesteps_is_refused(tmp_path):
    with pytest.raises(CfgExportError, match=r"holds NaN or infinity .*timesteps \[0"):
        export_onnx("tests.models:nan_at_low_noise", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_weights_holding_nan_are_refused(model_folder, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model_folder / "model.safetensors"))
    name = max(sorted(tensors), key=lambda k: tensors[k].size)
    tensors[name] = tensors[name].copy()
    tensors[name].flat[:2] = np.nan
    save_file(tensors, str(model_folder / "model.safetensors"))
    proc = run_cli("onnx", model_folder, "-o", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1 and f"tensor {name!r} holds 2 NaN or infinite values" in proc.stderr, proc.stderr


@pytest.mark.parametrize("tolerance", ["nan", "inf", "-1", "0"])
def test_tolerance_must_be_positive_and_finite(tmp_path, tolerance):
    proc = run_cli("onnx", "tests.models:conv2d", "-o", tmp_path / "out", "--tolerance", tolerance)
    assert proc.returncode == 1 and "--tolerance: got" in proc.stderr and not (tmp_path / "out").exists()


def test_null_class_beyond_the_embedding_table(tmp_path):
    proc = run_cli("onnx", "tests.models:null_beyond_table", "-o", tmp_path / "out")
    assert proc.returncode == 1 and "null class 9 beyond the model's class embedding table" in proc.stderr, \
        proc.stderr


# -- NaN during sampling: which step, which rows, and why ----------------------------------------------

@pytest.fixture(scope="module")
def nan_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("nan") / "a"
    export_onnx("tests.models:nan_for_class_2", out, check=False)  # the self-check would refuse it
    return out


def test_nan_from_the_model_names_the_rows_even_at_w_zero(nan_artifact):
    with pytest.raises(CfgExportError) as info:
        sample_guided(nan_artifact, [0, 2], 0.0, steps=3)
    text = str(info.value)
    assert "conditional rows of images [1]" in text and "the guidance weight is not the cause" in text
    assert "smaller w" not in text


def test_nan_from_a_huge_w_blames_w(tiny_artifacts):
    with pytest.raises(CfgExportError, match="guidance weight is too large|try a smaller w"):
        sample_guided(tiny_artifacts / "stacked", [0, 1], 1e300, steps=10)


def test_samples_far_outside_the_data_range_are_warned_about(tiny_artifacts, tmp_path):
    proc = run_cli("sample", tiny_artifacts / "stacked", "--w", "1e6", "--steps", "3", "--n", "1",
                   "--npy", tmp_path / "x.npy")
    assert proc.returncode == 0, proc.stderr
    assert "Warning: the samples reach |x| =" in proc.stderr and "far outside the data range" in proc.stderr


# -- full disks and other OS errors -------------------------------------------------------------------

def run_with_file_limit(args, limit, cwd=ROOT):
    """cfg-export in a process that cannot write more than `limit` bytes per file (a full disk)."""
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return subprocess.run([sys.executable, "-c", "from cfg_export.cli import main; main()", *map(str, args)],
                          cwd=cwd, capture_output=True, text=True, preexec_fn=preexec)


@pytest.mark.parametrize("verb", ["onnx", "sample", "calibrate"])
def test_a_full_disk_is_one_line_and_leaves_nothing(verb, tiny_artifacts, tmp_path):
    args = {"onnx": ["onnx", DIGITS, "-o", tmp_path / "out"],
            "sample": ["sample", tiny_artifacts / "stacked", "--n", "64", "--steps", "2", "--npy", tmp_path / "x.npy"],
            "calibrate": ["calibrate", tiny_artifacts / "stacked", "-o", tmp_path / "c.npz", "--steps", "6"]}[verb]
    proc = run_with_file_limit(args, 2048)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("Error:"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_os_error_messages():
    assert "no space left on the device writing /x/y" in os_error_message(OSError(errno.ENOSPC, "No space", "/x/y"))
    assert "permission denied /z" in os_error_message(OSError(errno.EACCES, "Permission denied", "/z"))


# -- output paths before the work -------------------------------------------------------------------

@pytest.mark.parametrize("verb,args,message", [
    ("sample", ["-o", "{dir}"], "is a folder"),
    ("sample", ["-o", "{file}/g.png"], "is a file, not a folder"),
    ("sample", ["-o", "g.jpeg.txt"], "the format follows the extension"),
    ("bench", ["--json", "{dir}"], "--json"),
    ("eval", ["--json", "{file}/e.json"], "is a file, not a folder"),
    ("eval", ["--plot", "e.pdf"], "--plot"),
    ("calibrate", ["-o", "{dir}"], "is a folder"),
    ("calibrate", ["-o", "{file}/c.npz"], "is a file, not a folder"),
])
def test_output_paths_are_checked_before_the_work(digits_artifact, tmp_path, verb, args, message):
    (tmp_path / "afile").write_text("x")
    args = [a.format(dir=tmp_path, file=tmp_path / "afile") for a in args]
    proc = run_cli(verb, digits_artifact, *args, cwd=tmp_path)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders: the refusal cannot show")
def test_a_read_only_folder_is_refused_before_the_work(digits_artifact, tmp_path):
    (tmp_path / "ro").mkdir()
    os.chmod(tmp_path / "ro", 0o555)
    try:
        proc = run_cli("sample", digits_artifact, "-o", tmp_path / "ro" / "g.png")
    finally:
        os.chmod(tmp_path / "ro", 0o755)
    assert proc.returncode == 1 and "not writable" in proc.stderr


def test_quantize_report_with_a_missing_classifier_writes_nothing(tiny_artifacts, tiny_calib, tmp_path):
    proc = run_cli("quantize", tiny_artifacts / "stacked", "--calib", tiny_calib.path, "-o", tmp_path / "q",
                   "--report", "--classifier", tmp_path / "missing.onnx")
    assert proc.returncode == 1 and "--classifier" in proc.stderr and not (tmp_path / "q").exists()


# -- memory ------------------------------------------------------------------------------------------

def test_a_batch_that_cannot_fit_is_refused_with_the_estimate(digits_artifact):
    manifest = json.loads((digits_artifact / "manifest.json").read_text())
    assert manifest["activation_bytes_per_row"] > 0
    proc = run_cli("bench", digits_artifact, "--batch", "100000000", "--steps", "2")
    assert proc.returncode == 1 and "GiB" in proc.stderr and "ask for at most" in proc.stderr, proc.stderr
    proc = run_cli("sample", digits_artifact, "--n", "100000000", "--npy", "/tmp/never.npy")
    assert proc.returncode == 1 and "ask for at most" in proc.stderr, proc.stderr


def test_activation_estimate_grows_with_the_model(tiny_artifacts, digits_artifact):
    tiny = json.loads((tiny_artifacts / "stacked" / "manifest.json").read_text())["activation_bytes_per_row"]
    digits = json.loads((digits_artifact / "manifest.json").read_text())["activation_bytes_per_row"]
    # the tiny model: 8 channels of 6x6 float32 at most a few at a time; digits: 32+ channels of 16x16
    assert 8 * 36 * 4 <= tiny < 50 * 36 * 4 and digits > 20 * tiny


# -- eval's inputs --------------------------------------------------------------------------------

def test_eval_refuses_the_denoiser_as_classifier_and_a_bad_reference(digits_artifact, tmp_path):
    proc = run_cli("eval", digits_artifact, "--classifier", digits_artifact / "model.onnx", "--steps", "2")
    assert proc.returncode == 1 and "is it the denoiser?" in proc.stderr, proc.stderr
    np.save(tmp_path / "r.npy", np.zeros(3))
    proc = run_cli("eval", digits_artifact, "--reference", tmp_path / "r.npy", "--steps", "2")
    assert proc.returncode == 1 and "expected an .npz with 'mean'" in proc.stderr, proc.stderr
    for bad in (["--steps", "0"], ["--w", ""], ["--seed", "-1"]):
        proc = run_cli("eval", digits_artifact, *bad)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
