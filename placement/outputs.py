"""Outputs that survive kills and reruns, and a tool that never deletes a file it did not write.

Every file goes to a temporary name beside its target (`.~placement.NAME.XXXX`) and is renamed into place, so an
interrupted run never leaves a half-written file; temporary names carry a mark of ours, so the next run into the
folder can clean them up without touching anyone else's files.

A command that writes a folder opens it as a *run folder*: `run.json` is written first (`"status": "running"`, the
command, the library versions) and lists every file the run writes as it writes it; on success it is rewritten with
`"status": "done"`. The list is what makes reruns safe: into a folder that holds an earlier run of ours,
`--overwrite` deletes exactly the files that run listed (for a killed run, what it wrote so far) and nothing else;
without `--overwrite` the command refuses; a folder holding files of anyone else is refused always.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

from .errors import PlacementError

RUN_FILE = "run.json"
TMP_MARK = ".~placement."  # prefix of every temporary file or folder of ours
TOOL = "placement"
_ACTIVE: list["RunFolder"] = []  # open run folders, innermost last: written files are recorded in the innermost


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


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None):
    """Yield a temporary path beside `path` (same suffix, so writers pick the right format); rename on success.
    The file is recorded in the open run folder that contains it. A full or read-only disk is one clear line."""
    path = Path(path)
    make_dirs(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_MARK}{path.name}.", suffix=suffix or path.suffix, dir=path.parent)
    except OSError as err:
        raise disk_error(err, path) from err
    os.close(fd)
    try:
        yield Path(tmp)
        file_mode(tmp)
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(err, OSError) and not isinstance(err, PlacementError):
            raise disk_error(err, path) from err
        raise
    record(path)


@contextlib.contextmanager
def new_dir(path: str | Path):
    """Yield a temporary folder that becomes `path` on success, for folders written by other libraries.
    `path` must not exist: nothing is ever replaced wholesale. Every file in it is recorded in the open run."""
    path = Path(path)
    if path.exists():
        raise PlacementError(f"{path} already exists: pass another --out, or --overwrite to replace a run of ours")
    make_dirs(path.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}{path.name}.", dir=path.parent))
    try:
        yield tmp
        for item in [tmp, *tmp.rglob("*")]:
            file_mode(item, directory=item.is_dir())
        os.replace(tmp, path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError) and not isinstance(err, PlacementError):
            raise disk_error(err, path) from err
        raise
    for item in sorted(path.rglob("*")):
        if item.is_file():
            record(item)


def fsync_tree(path: Path) -> None:
    """Flush a folder's files and the folder itself to the disk: a rename is only durable after its contents."""
    for item in sorted(path.rglob("*")) + [path]:
        flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if item.is_dir() else 0)
        fd = os.open(item, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
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


def write_json(path: str | Path, obj) -> None:
    write_text(path, json_text(obj))


def write_csv(path: str | Path, frame) -> None:
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def read_table(path: str | Path, rerun: str, required: set[str] | frozenset = frozenset()):
    """A CSV this tool wrote, as a DataFrame; an empty, damaged or incomplete one is one line saying what to rerun."""
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


def clean_temporaries(root: Path) -> None:
    """Remove temporary files and folders a killed run of ours left under `root` (recognised by TMP_MARK)."""
    for item in sorted(root.rglob(f"{TMP_MARK}*"), key=lambda p: len(p.parts), reverse=True):
        if item.is_dir() and not item.is_symlink():
            shutil.rmtree(item, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                item.unlink()


# -- run folders -------------------------------------------------------------------------------------------------
def versions() -> dict:
    import peft
    import torch
    import transformers

    from . import __version__

    return {"placement": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__}


def command_line(argv: list[str] | None = None) -> list[str]:
    argv = list(sys.argv if argv is None else argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return argv


def read_run(folder: str | Path) -> dict | None:
    """The run record of a folder: None when there is none; a clear error when it is not one of ours."""
    path = Path(folder) / RUN_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise PlacementError(f"{path} is not a readable run record ({type(err).__name__}): "
                             "pass a folder written by placement") from err
    if not isinstance(record, dict) or not isinstance(record.get("command", []), list):
        raise PlacementError(f"{path} is not a run record of placement: pass a folder written by placement")
    return record


def listed_files(folder: str | Path) -> set[str] | None:
    """The files a run folder's record lists (relative paths), or None for a folder without a file list."""
    record = read_run(folder)
    if record is None or not isinstance(record.get("files"), list):
        return None
    return {str(f) for f in record["files"]} | {RUN_FILE}


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _innermost_run(path: Path) -> "RunFolder | None":
    return next((run for run in reversed(_ACTIVE) if _inside(path, run.root)), None)


def record(path: str | Path) -> None:
    """Note a file just written in the innermost open run folder that contains it (no-op outside runs)."""
    run = _innermost_run(Path(path))
    if run is not None:
        run.add(Path(path))


def forget(path: str | Path) -> None:
    """Drop a file this run deleted (an old checkpoint), or everything under a folder, from the open run's list."""
    run = _innermost_run(Path(path))
    if run is not None:
        run.remove(Path(path))


def add_to_run(folder: str | Path, name: str) -> None:
    """List a file another command wrote for a run (its report.html) in that run's record."""
    folder = Path(folder)
    run = read_run(folder)
    if run is None or not isinstance(run.get("files"), list) or name in run["files"]:
        return
    run["files"] = sorted(run["files"] + [name])
    write_json(folder / RUN_FILE, run)


class RunFolder:
    """A folder one command run owns; open it with `run_folder`."""

    def __init__(self, root: Path, record: dict, previous: list[str], created: bool, original: dict | None = None):
        self.root = root
        self.record = record
        self.original = original  # the record of the run this one continues, restored if this one fails at once
        self.previous = previous  # files an earlier run listed that this one continues (resume)
        self.created = created
        self.written: list[str] = []  # files this process wrote

    def _save(self) -> None:
        self.record["files"] = sorted(set(self.previous) | set(self.written))
        write_json(self.root / RUN_FILE, self.record)  # run.json itself is never in its own list

    def relative(self, path: Path) -> str:
        return path.resolve().relative_to(self.root.resolve()).as_posix()

    def add(self, path: Path) -> None:
        name = self.relative(path)
        if name != RUN_FILE and name not in self.written:
            self.written.append(name)
            self._save()

    def remove(self, path: Path) -> None:
        """Drop a file, or everything listed under a folder, from the list."""
        name = self.relative(path)
        gone = lambda n: n == name or n.startswith(name + "/")  # noqa: E731
        self.written = [n for n in self.written if not gone(n)]
        self.previous = [n for n in self.previous if not gone(n)]
        self._save()

    def finish(self) -> None:
        self.record.update(status="done", finished=_now())
        self._save()

    def fail(self, err: BaseException, keep: tuple[str, ...]) -> None:
        """A user-caused failure: remove what this process wrote, except files under `keep` (the training state
        worth resuming); a fresh run that leaves nothing behind removes its record and its folder too."""
        removed = [name for name in self.written if not name.startswith(keep)]
        for name in removed:
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
            self.written.remove(name)
        _prune_empty(self.root, removed)
        if not self.previous and not self.written:
            with contextlib.suppress(FileNotFoundError):
                (self.root / RUN_FILE).unlink()
            if self.created:
                with contextlib.suppress(OSError):
                    self.root.rmdir()
            return
        if self.original is not None and not self.written:  # a refused resume leaves the earlier run as it was
            self.record = self.original
            self._save()
            return
        self.record.update(status="failed", error=str(err).splitlines()[0] if str(err) else type(err).__name__)
        self._save()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _prune_empty(root: Path, names: list[str]) -> None:
    """Remove the folders that deleting `names` left empty, up to `root` (never other empty folders)."""
    folders = {parent for name in names for parent in (root / name).parents if _inside(parent, root) and parent != root}
    for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _first_foreign(root: Path) -> Path | None:
    """A file under `root` that is not a temporary file of ours, or None: stops at the first, however large."""
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if TMP_MARK not in path.relative_to(root).as_posix():
                return path
    return None


def delete_listed(root: Path, names: list[str]) -> None:
    """Delete exactly the files a run of ours listed, then the folders that this leaves empty."""
    for name in names:
        path = root / name
        if name != RUN_FILE and (path.is_file() or path.is_symlink()) and _inside(path.parent, root):
            path.unlink()
    _prune_empty(root, names)


@contextlib.contextmanager
def run_folder(out: str | Path, *, overwrite: bool = False, resume: bool = False, argv: list[str] | None = None,
               keep_on_error: tuple[str, ...] = (), refusal_hint=None):
    """Open `out` as this command's run folder: check that it can be written (before any model loads), refuse a
    folder of anyone else, replace an earlier run of ours only with `overwrite` (deleting only what it listed),
    continue it with `resume`. Yields the RunFolder; marks it done on success. A PlacementError removes what this
    process wrote (except paths under `keep_on_error`); a crash or a kill leaves the record saying `running`.

    `refusal_hint(record) -> str | None` may give a more specific refusal for an earlier run (e.g. its checkpoint)."""
    root = Path(out)
    if resume and overwrite:
        raise PlacementError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    if root.exists() and not root.is_dir():
        raise PlacementError(f"--out {out} is a file: pass a folder")
    created = not root.exists()
    make_dirs(root)
    if not os.access(root, os.W_OK | os.X_OK):
        raise PlacementError(f"cannot write into {out} (permission denied): pass an --out you can write to")
    previous = read_run(root)
    continued: list[str] = []
    if previous is None:
        foreign = _first_foreign(root)
        if foreign is not None:
            raise PlacementError(f"--out {out} holds files placement did not write "
                                 f"({foreign.relative_to(root).as_posix()}): pass a new or empty folder")
    else:
        files = previous.get("files")
        if not isinstance(files, list):
            raise PlacementError(f"--out {out} holds a run without a file list (an older placement): "
                                 "pass a new folder, or empty this one yourself")
        if resume:
            continued = [str(f) for f in files]
        elif overwrite:
            delete_listed(root, [str(f) for f in files])
        else:
            hint = refusal_hint(previous) if refusal_hint else None
            raise PlacementError(hint or f"--out {out} holds an earlier run ({previous.get('status', 'unknown')}): "
                                         "pass --overwrite to replace it, or another --out")
    clean_temporaries(root)
    record_ = {"tool": TOOL, "status": "running", "command": command_line(argv), "versions": versions(),
               "started": _now(), "files": []}
    run = RunFolder(root, record_, continued, created, original=previous if resume else None)
    try:
        run._save()
    except PlacementError:
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    _ACTIVE.append(run)
    try:
        yield run
    except PlacementError as err:
        run.fail(err, keep_on_error)
        raise
    finally:
        _ACTIVE.remove(run)
    run.finish()
