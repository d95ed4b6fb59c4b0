"""The import graph of the installed packages, read from their source (ast): no cycle, no
import against the direction cfg_export -> calibration -> runtime, no torch under runtime
or calibration, no bare `runtime`/`calibration` module names; and the packages import
with torch blocked."""
from __future__ import annotations

import ast
import importlib
import pkgutil
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_without

PACKAGES = ("cfg_export", "cfg_export.runtime", "cfg_export.calibration")
LAYER = {"cfg_export.runtime": 0, "cfg_export.calibration": 1, "cfg_export": 2}  # may import lower or equal


def installed_modules() -> dict[str, Path]:
    """Every module of the installed packages by dotted name, with its source file."""
    modules = {}
    for package in PACKAGES:
        pkg = importlib.import_module(package)
        modules[package] = Path(pkg.__file__)
        for info in pkgutil.walk_packages(pkg.__path__, package + "."):
            spec = importlib.util.find_spec(info.name)
            modules[info.name] = Path(spec.origin)
    return modules


def imports_of(name: str, path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import statement of a module."""
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = []

    def visit(node, top: bool):
        for child in ast.iter_child_nodes(node):
            nested = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((alias.name, top, child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module
                found.append((target, top, child.lineno))
                for alias in child.names:  # `from pkg import module` imports pkg.module
                    found.append((f"{target}.{alias.name}", top, child.lineno))
            visit(child, nested)

    visit(tree, True)
    return found


def layer_of(module: str) -> str | None:
    for prefix in ("cfg_export.runtime", "cfg_export.calibration", "cfg_export"):
        if module == prefix or module.startswith(prefix + "."):
            return prefix
    return None


@pytest.fixture(scope="module")
def graph():
    modules = installed_modules()
    edges = {}
    for name, path in modules.items():
        edges[name] = [(target, top, line) for target, top, line in imports_of(name, path)]
    return modules, edges


def test_the_graph_covers_the_packages(graph):
    modules, _ = graph
    assert {"cfg_export.runtime.pipeline", "cfg_export.runtime.artifact", "cfg_export.calibration.quantize",
            "cfg_export.export.exporter", "cfg_export.cli"} <= set(modules)


def test_imports_point_one_way(graph):
    modules, edges = graph
    wrong = []
    for name, targets in edges.items():
        here = layer_of(name)
        for target, _, line in targets:
            there = layer_of(target)
            if there is not None and LAYER[there] > LAYER[here]:
                wrong.append(f"{modules[name]}:{line}: {name} ({here}) imports {target} ({there})")
    assert not wrong, "\n".join(wrong)


def test_runtime_imports_itself_relatively(graph):
    """runtime/ copied alone onto a board is the package `runtime`: an absolute
    cfg_export.* import inside it would fail there."""
    modules, edges = graph
    absolute = []
    for name, path in modules.items():
        if layer_of(name) != "cfg_export.runtime":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] in (
                    "cfg_export", "runtime", "calibration"):
                absolute.append(f"{path}:{node.lineno}: from {node.module} import ...")
            if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("cfg_export", "runtime", "calibration")
                                                    for a in node.names):
                absolute.append(f"{path}:{node.lineno}: import {', '.join(a.name for a in node.names)}")
    assert not absolute, "\n".join(absolute)


def test_no_bare_runtime_or_calibration_names(graph):
    modules, edges = graph
    bare = [f"{modules[n]}:{line}: {t}" for n, ts in edges.items() for t, _, line in ts
            if t.split(".")[0] in ("runtime", "calibration")]
    assert not bare, "\n".join(bare)


def test_no_torch_under_runtime_or_calibration(graph):
    modules, edges = graph
    torch = [f"{modules[n]}:{line}: {t}" for n, ts in edges.items() if layer_of(n) != "cfg_export"
             for t, _, line in ts if t.split(".")[0] == "torch"]
    assert not torch, "\n".join(torch)


def test_no_import_cycle_at_module_level(graph):
    """Module-level imports of the project's own modules form no cycle (a function-level
    import runs later and cannot deadlock the import)."""
    modules, edges = graph
    adjacency = {n: sorted({t for t, top, _ in ts if top and t in modules and t != n}) for n, ts in edges.items()}
    # a module imports its parent packages implicitly; those are not cycles of its own making
    adjacency = {n: [t for t in ts if not n.startswith(t + ".")] for n, ts in adjacency.items()}
    state, stack, cycles = {}, [], []

    def dfs(node):
        state[node] = 1
        stack.append(node)
        for nxt in adjacency[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for node in adjacency:
        if node not in state:
            dfs(node)
    assert not cycles, "\n".join(" -> ".join(c) for c in cycles)


def test_checker_catches_a_wrong_way_import(tmp_path):
    """The checks above can fail: a module of runtime that imports calibration is caught."""
    bad = tmp_path / "bad.py"
    bad.write_text("from cfg_export.calibration.data import read_calibration\nimport torch\n")
    targets = [t for t, _, _ in imports_of("cfg_export.runtime.bad", bad)]
    assert layer_of(targets[0]) == "cfg_export.calibration" and "torch" in targets


def test_runtime_and_calibration_import_without_torch():
    proc = run_without("torch", """
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
    proc = run_without("torch", "import torch")
    assert proc.returncode != 0 and "torch is blocked" in proc.stderr


def test_cli_without_torch_names_the_extra():
    proc = run_without("torch", """
        from cfg_export.cli import main
        assert "torch" not in sys.modules
        main(["onnx", "tests.models:conv2d", "-o", "/nonexistent/never"])
    """)
    assert proc.returncode == 1
    assert "torch is not installed" in proc.stderr and "cfg-export[export]" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runtime_folder_alone_runs_as_python_m_runtime(tiny_artifacts, tmp_path):
    """runtime/ copied alone (no cfg_export, no calibration, no torch) samples an artifact."""
    board = tmp_path / "board"
    shutil.copytree(ROOT / "runtime", board / "runtime", ignore=shutil.ignore_patterns("__pycache__"))
    code = f"""
        import runpy, sys
        sys.path[:] = [p for p in sys.path if p not in ("", {str(ROOT)!r})]
        sys.path.insert(0, {str(board)!r})
        for name in ("cfg_export", "calibration"):
            class Block:
                def find_spec(self, n, path=None, target=None, name=name):
                    if n == name or n.startswith(name + "."):
                        raise ImportError(n + " is blocked for this test")
            sys.meta_path.insert(0, Block())
        sys.argv = ["runtime", "sample", {str(tiny_artifacts / 'stacked')!r}, "--classes", "0,1", "--n", "1",
                    "--steps", "3", "--npy", {str(tmp_path / 'x.npy')!r}, "-q"]
        runpy.run_module("runtime", run_name="__main__")
    """
    proc = run_without("torch", code)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "x.npy").is_file()


def test_the_wheel_claims_no_generic_top_level_names(tmp_path):
    """pip install . puts only cfg_export (and its dist-info) at the top of site-packages."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (wheel,) = tmp_path.glob("cfg_export-*.whl")
    top = {Path(name).parts[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert {t for t in top if not t.endswith(".dist-info")} == {"cfg_export"}, top
    names = zipfile.ZipFile(wheel).namelist()
    assert "cfg_export/runtime/pipeline.py" in names and "cfg_export/calibration/quantize.py" in names
