"""Whole-or-nothing writes."""
import os
import stat

import pytest

from cfg_export.runtime.errors import CfgExportError
from cfg_export.runtime.files import staged_dir, staged_file


def test_staged_file_success_and_failure(tmp_path):
    target = tmp_path / "out.txt"
    with pytest.raises(RuntimeError):
        with staged_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert not target.exists() and os.listdir(tmp_path) == []
    with staged_file(target) as tmp:
        tmp.write_text("whole")
    assert target.read_text() == "whole" and os.listdir(tmp_path) == ["out.txt"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


MARKER = '{"format": "cfg-export/1"}'  # what makes a folder cfg-export's own (files.is_cfg_export_folder)


def test_staged_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "art"
    with staged_dir(target) as tmp:
        (tmp / "a").write_text("1")
        (tmp / "manifest.json").write_text(MARKER)
    mask = os.umask(0)
    os.umask(mask)
    assert (target / "a").read_text() == "1" and stat.S_IMODE(target.stat().st_mode) == 0o777 & ~mask
    with pytest.raises(CfgExportError, match="pass --overwrite"):
        with staged_dir(target):
            pass
    with pytest.raises(RuntimeError):
        with staged_dir(target, overwrite=True) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("interrupted")
    assert sorted(os.listdir(target)) == ["a", "manifest.json"] and sorted(os.listdir(tmp_path)) == ["art"]
    with staged_dir(target, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(os.listdir(target)) == ["b"] and sorted(os.listdir(tmp_path)) == ["art"]
    with pytest.raises(CfgExportError, match="not a folder written by cfg-export"):  # no manifest in it now
        with staged_dir(target, overwrite=True):
            pass
