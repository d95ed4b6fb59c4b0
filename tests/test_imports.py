"""runtime/ and calibration/ never import torch; the CLI imports without torch too."""
from tests.conftest import run_without


def run(code: str):
    return run_without("torch", code)


def test_runtime_and_calibration_import_without_torch():
    proc = run("""
        names = []
        for package in ("cfg_export.runtime", "cfg_export.calibration"):
            module = importlib.import_module(package)
            names.append(package)
            for info in pkgutil.walk_packages(module.__path__, package + "."):
                if info.name != "cfg_export.runtime.__main__":
                    importlib.import_module(info.name)
                    names.append(info.name)
        assert "torch" not in sys.modules
        print(len(names), " ".join(names))
    """)
    assert proc.returncode == 0, proc.stderr
    count, names = proc.stdout.split(" ", 1)
    assert int(count) >= 10 and "cfg_export.runtime.pipeline" in names and "cfg_export.runtime.backends.onnxrt" in names


def test_blocker_really_blocks_torch():
    proc = run("import torch")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_cli_without_torch_names_the_extra():
    proc = run("""
        from cfg_export.cli import main
        assert "torch" not in sys.modules
        main(["onnx", "tests.models:conv2d", "-o", "/nonexistent/never"])
    """)
    assert proc.returncode == 1
    assert "torch is not installed" in proc.stderr and "cfg-export[export]" in proc.stderr
    assert "Traceback" not in proc.stderr
