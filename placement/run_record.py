"""The run record, `run.json`: what a run folder's command was, with which library versions, and which files it
wrote. `placement.ledger` keeps it while a command runs; reports and later commands read it here."""
from __future__ import annotations

import json
import platform
import sys
from pathlib import Path

from .errors import PlacementError
from .outputs import write_json

RUN_FILE = "run.json"
TOOL = "placement"


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


def add_to_run(folder: str | Path, name: str) -> None:
    """List a file another command wrote for a run (its report.html) in that run's record."""
    folder = Path(folder)
    run = read_run(folder)
    if run is None or not isinstance(run.get("files"), list) or name in run["files"]:
        return
    run["files"] = sorted(run["files"] + [name])
    write_json(folder / RUN_FILE, run, ledger=False)
