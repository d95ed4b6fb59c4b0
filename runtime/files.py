"""Files written whole or not at all: a temporary name first, a rename at the end."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CfgExportError


def sha256_file(path: str | os.PathLike) -> str:
    """Returns the hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_output_file(target: str | os.PathLike, what: str, suffixes: tuple[str, ...] | None = None) -> Path:
    """Returns `target` as a Path after checking, before any work, that a file can be
    written there: not a folder, its folder creatable and writable, and (when `suffixes`
    is given) an extension of that format. Raises CfgExportError naming the problem."""
    target = Path(target)
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise CfgExportError(f"{what} {target}: expected a file name ending in {' or '.join(suffixes)} "
                             f"(the format follows the extension)")
    if target.is_dir():
        raise CfgExportError(f"{what} {target}: is a folder; give a file path")
    _check_writable_folder(target.parent, f"{what} {target}")
    return target


def check_output_dir(target: str | os.PathLike, what: str) -> Path:
    """Returns `target` as a Path after checking, before any work, that a folder can be
    written there (it may exist): not a file, and its parent creatable and writable."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise CfgExportError(f"{what} {target}: is a file; give a folder path")
    _check_writable_folder(target.parent, f"{what} {target}")
    return target


def _check_writable_folder(folder: Path, what: str) -> None:
    """The nearest existing ancestor of `folder` must be a writable folder."""
    existing = folder if str(folder) else Path(".")
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise CfgExportError(f"cannot write {what}: {existing} is a file, not a folder; choose another path")
    if existing.exists() and not os.access(existing, os.W_OK | os.X_OK):
        raise CfgExportError(f"cannot write {what}: {existing} is not writable; choose another path")


def _check_parent(target: Path) -> None:
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise CfgExportError(f"cannot write {target}: {parent} is a file, not a folder; choose another output path")


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `target`; on success renames it to `target`,
    on any error removes it, so no half-written file is ever left at `target`."""
    target = Path(target)
    _check_parent(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise CfgExportError(f"cannot write {target}: {exc.strerror}; choose another output path") from None
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; on success it replaces `target`
    (which must not exist unless `overwrite`), on any error it is removed."""
    target = Path(target)
    _check_parent(target)
    if target.exists() and not target.is_dir():
        raise CfgExportError(f"cannot write {target}: it is a file; choose another output folder")
    if target.exists() and any(target.iterdir()) and not overwrite:
        raise CfgExportError(f"{target} already exists and is not empty; pass --overwrite to replace it")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    except OSError as exc:
        raise CfgExportError(f"cannot write {target}: {exc.strerror}; choose another output folder") from None
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        old = None
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / "x")
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
