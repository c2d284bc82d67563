"""Run folders and their ledger: the tool deletes or replaces only files it wrote and listed.

A command that writes a folder claims it with `run_folder`, which gives the command its `Ledger`. `run.json` is
written first (`"status": "running"`, the command, the library versions) and lists every file the run writes as it
writes it, and every temporary name before the temporary exists; `run.lock` names the live process. On success the
record says `"status": "done"`, on a failure `"failed"`. What a later run may remove is exactly what a record lists:
`--overwrite` replaces an earlier run's listed files (and removes the rest of them only once the new run is done, so
nothing is deleted before every check has passed), `--resume` continues the list, a killed run's listed temporaries
are cleaned up. A path is never removed by name pattern or by walking a folder, and never through a symbolic link.
A folder holding files of anyone else is refused; a folder a live process is writing is refused always.
"""
from __future__ import annotations

import contextlib
import contextvars
import datetime as _dt
import os
from pathlib import Path

from . import runlock
from .errors import PlacementError
from .outputs import TMP_MARK, atomic_path, make_dirs, remove_temporary_tree, write_json
from .run_record import RUN_FILE, TOOL, add_to_run, command_line, listed_files, read_run, versions  # noqa: F401
# The ledger the running command opened: the atomic writes of code that runs inside the command list their files
# in it (when they lie in its folder). One per context, set and reset by `run_folder` alone.
_OPEN: contextvars.ContextVar["Ledger | None"] = contextvars.ContextVar("placement_ledger", default=None)


def open_ledger(path: str | Path) -> "Ledger | None":
    ledger = _OPEN.get()
    return ledger if ledger is not None and ledger.holds(path) else None


def _names(items) -> list[str]:
    return [str(f) for f in items] if isinstance(items, list) else []


class Listing:
    """What a run folder's record lists, and removing exactly that: never a file it does not list, never through a
    symbolic link."""

    def __init__(self, root: Path, record: dict | None = None, *, previous=(), replacing=(), created=False,
                 original: dict | None = None):
        self.root = Path(os.path.abspath(root))
        self.record = record
        self.original = original  # the record of the run this one continues, restored if this one fails at once
        self.previous = list(previous)  # files an earlier run listed that this one continues (resume)
        self.replacing = list(replacing)  # files of the run this one replaces (overwrite), removed once it is done
        self.created = created
        self.written: list[str] = []  # files this process wrote
        self.temporaries: set[str] = set()
        self.lock: dict | None = None

    # -- what is listed ----------------------------------------------------------------------------------------
    def holds(self, path: str | Path) -> bool:
        return os.path.abspath(path).startswith(str(self.root) + os.sep)

    def relative(self, path: str | Path) -> str:
        if not self.holds(path):
            raise PlacementError(f"{path} lies outside the run folder {self.root}")
        return Path(os.path.relpath(os.path.abspath(path), self.root)).as_posix()

    def lists(self, path: str | Path) -> bool:
        name = self.relative(path)
        return name in self.written or name in self.previous or name in self.replacing

    def listed_under(self, folder: str | Path) -> list[str]:
        prefix = self.relative(folder) + "/"
        return sorted({n for n in [*self.written, *self.previous, *self.replacing] if n.startswith(prefix)})

    def _save(self) -> None:
        if self.record is None:
            return
        self.record["files"] = sorted(set(self.previous) | set(self.replacing) | set(self.written))
        self.record["temporaries"] = sorted(self.temporaries)
        write_json(self.root / RUN_FILE, self.record, ledger=False)  # run.json is never in its own list

    # -- links ---------------------------------------------------------------------------------------------------
    def _through_link(self, path: Path) -> bool:
        """Whether a folder between the run folder and `path` is a symbolic link (writes and deletes stop there)."""
        parts = Path(self.relative(path)).parts[:-1]
        return any((self.root.joinpath(*parts[: i + 1])).is_symlink() for i in range(len(parts)))

    # -- removing ----------------------------------------------------------------------------------------------
    def _unlink(self, name: str) -> None:
        path = self.root / name
        if name == RUN_FILE or not self.holds(path) or self._through_link(path):
            return  # a record naming a path outside its folder (hand-edited) never deletes it
        if path.is_symlink() or path.is_file():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _forget(self, names) -> None:
        gone = set(names)
        self.written = [n for n in self.written if n not in gone]
        self.previous = [n for n in self.previous if n not in gone]
        self.replacing = [n for n in self.replacing if n not in gone]

    def _prune(self, names) -> None:
        """Remove the folders that deleting `names` left empty, up to the run folder (never other folders)."""
        folders = {parent for name in names for parent in (self.root / name).parents
                   if parent != self.root and self.holds(parent)}
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            if not self._through_link(folder) and not folder.is_symlink():
                with contextlib.suppress(OSError):
                    folder.rmdir()

    def remove(self, path: str | Path) -> None:
        """Delete a listed file, or every listed file under a folder (a checkpoint state: state.json first, so a
        state a kill interrupts is never taken for complete), then the folders this leaves empty. Files the
        ledger does not list stay, and so does any folder that still holds them."""
        name = self.relative(path)
        names = [name] if (name in self.written or name in self.previous or name in self.replacing) else []
        names += sorted(self.listed_under(path), key=lambda n: not n.endswith("/state.json"))
        for item in names:
            self._unlink(item)
        self._forget(names)
        self._prune(names + [name + "/x"])
        self._save()

    def clean_temporaries(self, names) -> None:
        """Remove the temporaries a killed run of ours listed (a file, or a folder of ours with what a library
        wrote into it); never through a link."""
        for name in _names(names):
            path = self.root / name
            if self.holds(path) and not self._through_link(path) and Path(name).name.startswith(TMP_MARK):
                if path.is_dir() and not path.is_symlink():
                    remove_temporary_tree(path)
                else:
                    self._unlink(name)


class Ledger(Listing):
    """What one run of a command wrote in its folder; open it with `run_folder`. `Ledger(root, record=None)` is a
    ledger kept in memory only (the Python API without a run folder): it lets a process remove what it wrote."""

    # -- writing -----------------------------------------------------------------------------------------------
    def may_write(self, path: str | Path) -> None:
        """Refuse to write through a link, or to replace a file (or folder) this run's record does not list."""
        path = Path(path)
        if self.record is None:  # in memory only: it guards what it removes, not what the caller writes
            return
        if self._through_link(path):
            raise PlacementError(f"{path} lies under a symbolic link in the run folder: placement does not write "
                                 "through links; remove the link or pass another --out")
        if os.path.lexists(path) and not (path.is_dir() and not path.is_symlink()) and not self.lists(path):
            raise PlacementError(f"{path} exists and placement did not write it: move it away or pass another --out")

    def begin(self, tmp: Path) -> None:
        """List a temporary name before it exists: what a kill leaves is then known to be ours."""
        self.may_write(tmp)
        self.temporaries.add(self.relative(tmp))
        self._save()

    def end(self, tmp: Path) -> None:
        """The temporary is gone (renamed into place, or removed)."""
        self.temporaries.discard(self.relative(tmp))
        self._save()

    def add(self, *paths: str | Path) -> None:
        """List files this run writes: before the rename that puts each in place, so that a kill between the two
        leaves no file of ours unlisted (a listed name that never arrived is harmless: removing it is a no-op)."""
        names = [self.relative(path) for path in paths]
        names = [n for n in dict.fromkeys(names) if n != RUN_FILE and n not in self.written]
        if names:
            self.written.extend(names)
            self._save()

    def keep(self, path: str | Path) -> None:
        """Adopt what the replaced run listed under `path` (a file's folder, or a folder): an input this run reads,
        such as the profile `compare --scores` uses, stays with the new run instead of going at its end."""
        folder = Path(path).parent if Path(path).is_file() else Path(path)
        if not self.holds(folder / "x"):
            return
        prefix = self.relative(folder / "x")[:-1] if folder != self.root else ""
        adopted = [n for n in self.replacing if n.startswith(prefix)]
        self.replacing = [n for n in self.replacing if n not in adopted]
        self.previous += adopted
        self._save()

    def atomic(self, path: str | Path, suffix: str | None = None):
        """`with ledger.atomic(path) as tmp:` write `tmp`; it becomes `path`, listed in this ledger."""
        return atomic_path(path, suffix, ledger=self)

    # -- the end of a run --------------------------------------------------------------------------------------
    def _close(self) -> None:
        if self.lock is not None:
            runlock.release(self.root, self.lock)
            self.lock = None

    def finish(self) -> None:
        stale = [n for n in self.replacing if n not in self.written and n not in self.previous]
        for name in stale:
            self._unlink(name)
        self._prune(stale)
        self.replacing = []
        self.record.update(status="done", finished=_now())
        self._save()
        self._close()

    def interrupted(self) -> None:
        """Ctrl-C: everything written stays listed, for --resume or --overwrite."""
        self.record.update(status="failed", error="interrupted")
        self._save()
        self._close()

    def fail(self, err: BaseException, keep: tuple[str, ...]) -> None:
        """A failure: remove what this process wrote, except files under `keep` (the training state worth
        resuming), and mark the run failed; a fresh run that leaves nothing behind removes its record and folder."""
        removed = [name for name in self.written if not name.startswith(keep)]
        for name in removed:
            self._unlink(name)
        self._forget(removed)
        self._prune(removed)
        if not self.previous and not self.written and not self.replacing:
            with contextlib.suppress(FileNotFoundError):
                (self.root / RUN_FILE).unlink()
            self._close()
            if self.created:
                with contextlib.suppress(OSError):
                    self.root.rmdir()
            return
        if self.original is not None and not self.written:  # a refused resume leaves the earlier run as it was
            self.record, self.temporaries = self.original, set(_names(self.original.get("temporaries")))
        else:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            self.record.update(status="failed", error=first)
        self._save()
        self._close()


RunFolder = Ledger  # the name this object had


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _first_foreign(root: Path) -> Path | None:
    """A file under `root` placement did not write (all of them, in a folder without a run record, except a stale
    lock of ours), or None: stops at the first, however large."""
    for folder, dirs, names in os.walk(root):
        for name in names + [d for d in dirs if Path(folder, d).is_symlink()]:
            path = Path(folder) / name
            if not (path.parent == root and name == runlock.LOCK_FILE and runlock.read_lock(root) is not None):
                return path
    return None


def _claim(root: Path, out, previous: dict | None, overwrite: bool, resume: bool, refusal_hint) -> tuple[list, list]:
    """What an earlier run in the folder leaves to this one: (files continued, files to replace)."""
    if previous is None:
        foreign = _first_foreign(root)
        if foreign is not None:
            raise PlacementError(f"--out {out} holds files placement did not write "
                                 f"({foreign.relative_to(root).as_posix()}): pass a new or empty folder")
        return [], []
    files = previous.get("files")
    if not isinstance(files, list):
        raise PlacementError(f"--out {out} holds a run without a file list (an older placement): "
                             "pass a new folder, or empty this one yourself")
    if resume:
        return _names(files), []
    if overwrite or not files:  # a run that left no file (killed or failed at once) is simply replaced
        return [], _names(files)
    hint = refusal_hint(previous) if refusal_hint else None
    raise PlacementError(hint or f"--out {out} holds an earlier run ({previous.get('status', 'unknown')}): "
                                 "pass --overwrite to replace it, or another --out")


@contextlib.contextmanager
def run_folder(out: str | Path, *, overwrite: bool = False, resume: bool = False, argv: list[str] | None = None,
               keep_on_error: tuple[str, ...] = (), refusal_hint=None):
    """Claim `out` as this command's run folder and yield its Ledger: check that it can be written (before any model
    loads), refuse a folder of anyone else or one a live process writes, replace an earlier run of ours only with
    `overwrite`, continue it with `resume`. Marks the run done on success; a failure removes what this process
    wrote (except paths under `keep_on_error`) and marks it failed; Ctrl-C marks it failed and keeps its files.

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
    runlock.refuse_if_held(root, out)
    previous = read_run(root)
    continued, replacing = _claim(root, out, previous, overwrite, resume, refusal_hint)
    record = {"tool": TOOL, "status": "running", "command": command_line(argv), "versions": versions(),
              "started": _now(), "files": []}
    ledger = Ledger(root, record, previous=continued, replacing=replacing, created=created,
                    original=previous if resume else None)
    ledger.lock = runlock.acquire(root, out)
    try:
        ledger.clean_temporaries((previous or {}).get("temporaries"))
        ledger._save()
    except PlacementError:
        ledger._close()
        if created:
            with contextlib.suppress(OSError):
                root.rmdir()
        raise
    token = _OPEN.set(ledger)
    try:
        yield ledger
    except Exception as err:
        ledger.fail(err, keep_on_error)
        raise
    except BaseException:
        ledger.interrupted()
        raise
    finally:
        _OPEN.reset(token)
    ledger.finish()
