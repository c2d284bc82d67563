"""Atomic writes: every file appears whole or not at all, and a full or read-only disk is one clear line.

Every file goes to a temporary name beside its target (`.~placement.NAME.XXXX`) and is renamed into place, so an
interrupted write never leaves a half-written file. Inside a run folder (`placement.ledger`) the run's ledger
decides: it lists the temporary name before the file exists (so a later run can clean up what a kill left, and only
that), refuses to replace a file it did not write, and lists the file once it is in place. A writer that holds the
ledger passes it (`ledger=`); code that runs inside a command writes into the ledger that command opened.
"""
from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import secrets
import shutil
from pathlib import Path

from .errors import PlacementError

TMP_MARK = ".~placement."  # prefix of every temporary file or folder of ours
# the run folder's names, importable from here as before: they live in `placement.ledger`
_LEDGER_NAMES = {"RUN_FILE", "TOOL", "run_folder", "read_run", "listed_files", "add_to_run", "versions",
                 "command_line", "Ledger", "RunFolder"}


def __getattr__(name):
    if name in _LEDGER_NAMES:
        from . import ledger
        return getattr(ledger, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode(path: str | Path, directory: bool = False) -> None:
    """Ordinary modes for outputs (644/755 under the usual umask): temporary files and some writers make them 600."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def disk_error(err: OSError, path: Path) -> PlacementError:
    """One line for the write errors a user can fix: a full disk, a read-only or unwritable place."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return PlacementError(f"no space left on the device writing {path}: free some space or pass another --out")
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return PlacementError(f"cannot write {path} ({os.strerror(err.errno)}): pass an --out you can write to")
    if err.errno in (errno.ENOTDIR, errno.EEXIST):
        return PlacementError(f"cannot write {path}: a file stands where a folder is needed; pass another --out")
    return PlacementError(f"cannot write {path}: {err.strerror or err}")


def make_dirs(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where a folder is needed arrives as EEXIST or ENOTDIR
        raise disk_error(err, path) from err


def _owner(path: Path, ledger):
    """The ledger that answers for `path`: the one given, else the one the running command opened for its folder
    (None outside run folders, and for `ledger=False`: the ledger's own record)."""
    if ledger is False:
        return None
    if ledger is not None:
        return ledger
    from .ledger import open_ledger
    return open_ledger(path)


def _temporary_name(path: Path, suffix: str | None) -> Path:
    return path.parent / f"{TMP_MARK}{path.name}.{secrets.token_hex(4)}{suffix if suffix is not None else path.suffix}"


def _unlink_file(tmp: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


@contextlib.contextmanager
def _abandoned_on_failure(tmp: Path, path: Path, owner, remove):
    """If the write inside fails: remove the temporary, tell the ledger, and say what a disk error means for
    `path` (any other error goes on as it is)."""
    try:
        yield
    except BaseException as err:
        remove(tmp)
        if owner is not None:
            owner.end(tmp)
        if isinstance(err, OSError) and not isinstance(err, PlacementError):
            raise disk_error(err, path) from err
        raise


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None, *, ledger=None):
    """Yield a temporary path beside `path` (same suffix, so writers pick the right format); rename on success.
    Inside a run folder the ledger lists the temporary first and the file once it is in place, and refuses to
    replace a file it did not write."""
    path = Path(path)
    owner = _owner(path, ledger)
    if owner is not None:
        owner.may_write(path)
    make_dirs(path.parent)
    tmp = _temporary_name(path, suffix)
    if owner is not None:
        owner.begin(tmp)
    with _abandoned_on_failure(tmp, path, owner, _unlink_file):
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        yield tmp
        file_mode(tmp)
        if owner is not None:
            owner.add(path)
        os.replace(tmp, path)
    if owner is not None:
        owner.end(tmp)


@contextlib.contextmanager
def staging_dir(parent: Path, name: str, *, ledger=None):
    """A temporary folder of ours under `parent` (listed in the ledger while it exists), removed at the end: where
    other libraries write files that are then placed one by one (`place`)."""
    owner = _owner(parent / name, ledger)
    make_dirs(parent)
    tmp = _temporary_name(parent / name, "")
    if owner is not None:
        owner.begin(tmp)
    try:
        tmp.mkdir()
        yield tmp
    except OSError as err:
        raise disk_error(err, parent / name) from err
    finally:
        remove_temporary_tree(tmp)
        if owner is not None:
            owner.end(tmp)


def remove_temporary_tree(tmp: Path) -> None:
    """A temporary folder this process made: rmtree removes links inside it without following them."""
    if tmp.is_symlink():
        tmp.unlink()
    elif tmp.is_dir():
        shutil.rmtree(tmp, ignore_errors=True)


def place(item: Path, target: Path, *, ledger=None) -> None:
    """Rename a finished file from a staging folder onto `target` (the ledger permitting), with ordinary modes."""
    owner = _owner(target, ledger)
    if owner is not None:
        owner.may_write(target)
    try:
        file_mode(item)  # safetensors writes 0600; outputs are ordinary files
        if owner is not None:
            owner.add(target)  # listed before the rename, as every write of ours
        os.replace(item, target)
    except OSError as err:
        raise disk_error(err, target) from err


@contextlib.contextmanager
def new_dir(path: str | Path, *, ledger=None):
    """Yield a temporary folder that becomes `path` on success, for folders written by other libraries.
    `path` must not exist: nothing is ever replaced wholesale. Every file in it is listed in the run's ledger."""
    path = Path(path)
    owner = _owner(path, ledger)
    if path.exists() or path.is_symlink():
        raise PlacementError(f"{path} already exists: pass another --out, or --overwrite to replace a run of ours")
    if owner is not None:
        owner.may_write(path)
    make_dirs(path.parent)
    tmp = _temporary_name(path, "")
    if owner is not None:
        owner.begin(tmp)
    with _abandoned_on_failure(tmp, path, owner, remove_temporary_tree):
        tmp.mkdir()
        yield tmp
        inside = sorted(tmp.rglob("*"))
        for item in [tmp, *inside]:
            file_mode(item, directory=item.is_dir())
        if owner is not None:
            owner.add(*[path / item.relative_to(tmp) for item in inside if item.is_file()])
        os.replace(tmp, path)
    if owner is not None:
        owner.end(tmp)


def fsync_tree(path: Path) -> None:
    """Flush a folder's files and the folder itself to the disk: a rename is only durable after its contents."""
    for item in sorted(path.rglob("*")) + [path]:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if item.is_dir() else 0)
        fd = os.open(item, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str, *, ledger=None) -> None:
    with atomic_path(path, ledger=ledger) as tmp:
        tmp.write_text(text, encoding="utf-8")


def finite(obj):
    """JSON-ready: NaN and infinity become null (JSON has neither), numpy scalars plain Python numbers."""
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)) and getattr(obj, "ndim", 0) == 0:
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def json_text(obj) -> str:
    return json.dumps(finite(obj), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, obj, *, ledger=None) -> None:
    write_text(path, json_text(obj), ledger=ledger)


def write_csv(path: str | Path, frame, *, ledger=None) -> None:
    with atomic_path(path, ledger=ledger) as tmp:
        frame.to_csv(tmp, index=False)


def read_table(path: str | Path, rerun: str, required: set[str] | frozenset = frozenset(),
               numeric: set[str] | frozenset = frozenset()):
    """A CSV this tool wrote, as a DataFrame; an empty, damaged or incomplete one, or text in a `numeric` column,
    is one line saying what to rerun."""
    import pandas as pd

    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise PlacementError(f"{path} is empty or damaged ({type(err).__name__}): {rerun}") from err
    if frame.empty:
        raise PlacementError(f"{path} holds no rows: {rerun}")
    missing = sorted(set(required) - set(frame.columns))
    if missing:
        raise PlacementError(f"{path} lacks the column {missing[0]}: {rerun}")
    for column in sorted(set(numeric) & set(frame.columns)):
        if not pd.api.types.is_numeric_dtype(frame[column]):
            raise PlacementError(f"{path} has text in its number column {column}: {rerun}")
    return frame


def write_new_file(path: str | Path, text: str, overwrite: bool = False) -> None:
    """A single output file named by the user: written atomically, and an existing file is replaced only with
    `overwrite` (never anything else is deleted)."""
    path = Path(path)
    if path.is_dir():
        raise PlacementError(f"{path} is a folder: pass a file name")
    if path.exists() and not overwrite:
        raise PlacementError(f"{path} exists: pass --overwrite to replace it, or another file name")
    write_text(path, text)
