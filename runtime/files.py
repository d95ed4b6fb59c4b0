"""Files written whole or not at all: a temporary name first, a rename at the end."""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import CfgExportError

log = logging.getLogger(__name__)


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
    if target.is_dir():
        raise CfgExportError(f"{what} {target}: is a folder; give a file path")
    if suffixes is not None and target.suffix.lower() not in suffixes:
        raise CfgExportError(f"{what} {target}: expected a file name ending in {' or '.join(suffixes)} "
                             f"(the format follows the extension)")
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
def _writer_lock(target: Path) -> Iterator[None]:
    """Holds an exclusive lock on `target` for one writer: a second cfg-export process
    writing the same path gets a clear error instead of silently winning or losing. The
    lock (flock on a hidden file beside the target) dies with its process, so a killed run
    never blocks the next one; its leftover temporary files are removed here."""
    lock_path = target.parent / f".{target.name}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    except OSError as exc:
        raise CfgExportError(f"cannot write {target}: {exc.strerror}; choose another output path") from None
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # no flock (Windows): one writer is assumed
            pass
        except OSError:
            raise CfgExportError(f"another cfg-export process is writing {target} right now; wait for it to "
                                 f"finish, or write elsewhere") from None
    except BaseException:
        os.close(fd)  # not ours: the lock file stays for its holder
        raise
    try:
        for stale in target.parent.glob(f".{glob_escape(target.name)}.*"):
            if stale.suffix in (".partial", ".old"):  # a killed writer's leftovers: we hold the lock now
                log.info("removing %s, left by a writer that did not finish", stale)
                if stale.is_dir():
                    shutil.rmtree(stale, ignore_errors=True)
                else:
                    stale.unlink(missing_ok=True)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_path.unlink()
        os.close(fd)


def write_failure(target: Path, exc: OSError) -> str:
    """One line for an OS error while writing `target` (nothing of it is kept)."""
    import errno

    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno == errno.ENOSPC:
        reason = "no space left on the device"
    elif exc.errno == errno.EFBIG or "requested and" in str(exc):  # a file size limit, or numpy's short write
        reason = f"the file could not be written whole ({reason}): is the disk full, or a file size limit set?"
    return f"cannot write {target}: {reason}; nothing was kept"


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def staged_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yields a temporary path beside `target`; on success renames it to `target`,
    on any error removes it, so no half-written file is ever left at `target`."""
    target = Path(target)
    _check_parent(target)
    if target.is_dir():
        raise CfgExportError(f"cannot write {target}: it is a folder; give a file path")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CfgExportError(f"cannot write {target}: {exc.strerror}; choose another output path") from None
    with _writer_lock(target):
        try:
            fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
        except OSError as exc:
            raise CfgExportError(f"cannot write {target}: {exc.strerror}; choose another output path") from None
        os.close(fd)
        tmp = Path(tmp)
        try:
            yield tmp
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual mode
            os.replace(tmp, target)
        except OSError as exc:
            raise CfgExportError(write_failure(target, exc)) from None
        finally:
            tmp.unlink(missing_ok=True)


# files that mark a folder as written by cfg-export (an artifact, an engine, a pipeline, a repository)
MARKERS = ("manifest.json", "engine.json", "pipeline.json", "cfg-export.json")


def is_cfg_export_folder(folder: Path) -> bool:
    """True for a folder cfg-export wrote: one of MARKERS whose JSON 'format' is cfg-export's."""
    import json

    for name in MARKERS:
        path = folder / name
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except (OSError, ValueError, RecursionError):
                continue
            if isinstance(data, dict) and str(data.get("format", "")).startswith("cfg-export"):
                return True
    return False


def check_replaceable(target: Path, overwrite: bool) -> None:
    """Raises CfgExportError unless a folder may be written at `target`: it does not exist
    or is empty, or it is a cfg-export folder and `overwrite` was given."""
    if target.exists() and not target.is_dir():
        raise CfgExportError(f"cannot write {target}: it is a file; choose another output folder")
    if not target.exists() or not any(target.iterdir()):
        return
    if not overwrite:
        raise CfgExportError(f"{target} already exists and is not empty; pass --overwrite to replace it")
    if not is_cfg_export_folder(target):
        raise CfgExportError(f"{target} is not a folder written by cfg-export (no cfg-export manifest in it): "
                             f"--overwrite replaces only cfg-export output; move it away or choose another folder")


def check_export_target(source: str | os.PathLike, target: str | os.PathLike, overwrite: bool) -> None:
    """Raises CfgExportError, before any work, when writing `target` could destroy the
    source (the same folder, a folder inside it, or a folder holding it) or a folder
    cfg-export did not write, or when `target` cannot be written."""
    target = Path(target)
    src = Path(source)
    if src.exists():
        s, o = src.resolve(), target.resolve()
        if s == o or s in o.parents or o in s.parents:
            raise CfgExportError(f"-o {target}: it is or holds or lies inside the source {source}; write the "
                                 f"output to a folder of its own (the source is never overwritten)")
    check_replaceable(target, overwrite)
    check_output_dir(target, "-o")


@contextlib.contextmanager
def staged_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yields an empty temporary folder beside `target`; on success it replaces `target`
    (which must not exist, or be empty, or, with `overwrite`, be a folder cfg-export wrote),
    on any error it is removed. One writer at a time (see _writer_lock)."""
    target = Path(target)
    _check_parent(target)
    check_replaceable(target, overwrite)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CfgExportError(f"cannot write {target}: {exc.strerror}; choose another output folder") from None
    with _writer_lock(target):
        check_replaceable(target, overwrite)  # again, now that no other writer can change it
        try:
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
        except OSError as exc:
            raise CfgExportError(write_failure(target, exc)) from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
