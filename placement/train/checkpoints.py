"""Checkpoints: safetensors for tensors, JSON for the rest, no pickle.

OUT/checkpoints/step-NNNNNNN/ holds one complete state; OUT/checkpoints/latest names the newest. A new state is
written under a temporary name, flushed to the disk and renamed into place, then the pointer is replaced, and only
then is the previous state deleted: a kill at any moment leaves at least one complete state that --resume finds.
Every state is written and removed through the run's ledger: the cleaner removes only the states the ledger lists
(never a folder that merely looks like one, never through a link), and --resume reads only those.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .. import data as data_mod
from ..errors import PlacementError
from ..families import adapters
from ..ledger import Ledger, open_ledger
from ..outputs import fsync_tree, new_dir, write_text
from ..plan.plan import Plan

CHECKPOINTS = "checkpoints"
POINTER = "latest"


class TrainError(PlacementError):
    """A run that cannot go on (a non-finite loss, a missing checkpoint): one line, what happened and what to do."""


def run_ledger(out: str | Path) -> Ledger:
    """The ledger of the run folder `out`: the command's, or (the Python API) one in memory that lets this process
    remove only what it wrote."""
    return open_ledger(Path(out) / CHECKPOINTS) or Ledger(Path(out))


def fingerprint(obj) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_fingerprint(plan: Plan) -> str:
    """What of a plan decides its training: the sites and arguments (and, for another family than LoRA, which)."""
    if plan.family != "lora":
        return fingerprint({"targets": sorted(plan.targets), "peft": plan.peft, "family": plan.family,
                            "family_args": plan.family_args})
    return fingerprint({"targets": sorted(plan.targets), "peft": plan.peft})


def data_fingerprint(examples: list) -> str:
    """The training examples in their order (the batches depend on nothing else but the settings)."""
    return fingerprint([data_mod.prompt_key(e) + "\x00" + str(e.response) for e in examples])


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _complete(state: Path) -> bool:
    return state.is_dir() and not state.is_symlink() and (state / "state.json").is_file()


def _states(folder: Path, ledger: Ledger | None) -> list[Path]:
    """Complete checkpoint states (a state.json is written last), oldest first: with a run folder's ledger only
    those it lists; never a link."""
    if ledger is not None and ledger.record is not None:
        names = {Path(n).parts[1] for n in ledger.listed_under(folder) if len(Path(n).parts) > 2}
        found = [folder / n for n in names if n.startswith("step-")]
    else:
        found = list(folder.glob("step-*")) if folder.is_dir() and not folder.is_symlink() else []
    return sorted((p for p in found if _complete(p)), key=lambda p: p.name)


def checkpoint_refusal(out):
    """The refusal for a folder whose earlier run left a checkpoint (a `refusal_hint` of `run_folder`): say how to
    continue it rather than only that the folder is taken."""
    def hint(record: dict) -> str | None:
        if any(str(f).startswith(CHECKPOINTS + "/") for f in record.get("files", [])):
            return (f"--out {out} holds a checkpoint of an unfinished run: pass --resume to continue it, "
                    "or --overwrite to start afresh")
        return None

    return hint


def latest_checkpoint(out: str | Path, ledger: Ledger | None = None) -> Path | None:
    """The newest complete checkpoint in a run folder: the pointer's, or else the newest complete state."""
    folder = Path(out) / CHECKPOINTS
    ledger = ledger if ledger is not None else open_ledger(folder)
    states = _states(folder, ledger)
    pointer = folder / POINTER
    if pointer.is_file() and not pointer.is_symlink():
        named = folder / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if named in states:
            return named
    return states[-1] if states else None


def save_checkpoint(out: Path, peft_model, optimizer, schedule, step: int, losses, lrs, settings,
                    fingerprints: dict, ledger: Ledger | None = None) -> Path:
    ledger = ledger if ledger is not None else run_ledger(out)
    folder = Path(out) / CHECKPOINTS
    target = folder / f"step-{step:07d}"
    if os.path.lexists(target):  # an incomplete state of this step, left by a kill before a resume
        remove_checkpoint(target, ledger)
    with new_dir(target, ledger=ledger) as tmp:
        save_file(adapters.tensors(peft_model), str(tmp / "adapter.safetensors"))
        tensors, groups = _optimizer_tensors(optimizer)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "losses": losses, "lrs": lrs, "optimizer": groups, "schedule": schedule.state_dict(),
            "settings": settings.record(), **fingerprints,
        }))
        fsync_tree(tmp)
    write_text(folder / POINTER, target.name + "\n", ledger=ledger)
    listed = {Path(n).parts[1] for n in ledger.listed_under(folder) if len(Path(n).parts) > 2}
    for old in sorted(folder / n for n in listed if n.startswith("step-") and n != target.name):
        remove_checkpoint(old, ledger)
    return target


def remove_checkpoint(state: Path, ledger: Ledger | None = None) -> None:
    """Delete one checkpoint state of ours: the files the ledger lists under it (state.json first, so a state a
    kill interrupts here is never taken for a complete one), and nothing else."""
    (ledger if ledger is not None else run_ledger(state.parent.parent)).remove(state)


def remove_checkpoints(out: str | Path, ledger: Ledger | None = None) -> None:
    """Every state and the pointer this run (or the run it continues or replaces) listed."""
    (ledger if ledger is not None else run_ledger(out)).remove(Path(out) / CHECKPOINTS)


def _numbers(values, length: int) -> bool:
    return (isinstance(values, list) and len(values) == length
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values))


def _read_state(folder: Path, settings) -> dict:
    """state.json, checked: a step that is a whole number within the run, one loss and rate per step."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TrainError(f"the checkpoint {folder} is unreadable ({type(err).__name__}): "
                         "pass --overwrite to start afresh") from err
    step = state.get("step") if isinstance(state, dict) else None
    if (not isinstance(step, int) or isinstance(step, bool) or not 0 < step <= settings.steps
            or not _numbers(state.get("losses"), step) or not _numbers(state.get("lrs"), step)
            or not isinstance(state.get("settings"), dict) or not isinstance(state.get("optimizer"), dict)
            or not all(math.isfinite(v) for v in state["lrs"])):
        raise TrainError(f"the checkpoint {folder} is damaged (its state.json does not describe a step of this "
                         "run): pass --overwrite to start afresh")
    return state


def load_checkpoint(folder: Path, peft_model, optimizer, schedule, settings, fingerprints: dict):
    run = folder.parent.parent
    state = _read_state(folder, settings)
    for key, what in (("plan", "another plan"), ("data", "other training data")):
        if state.get(key) != fingerprints[key]:
            raise TrainError(f"the checkpoint in {run} was made with {what}: resume with the plan and data it was "
                             "made with, or pass --overwrite to start afresh")
    saved = {k: v for k, v in state["settings"].items() if k != "save_every"}
    asked = {k: v for k, v in settings.record().items() if k != "save_every"}
    if saved != asked:
        changed = sorted(k for k in asked if saved.get(k) != asked[k])
        raise TrainError(f"the checkpoint in {run} was made with other settings ({', '.join(changed)}): "
                         "resume with the same options or pass --overwrite to start afresh")
    try:
        adapter = load_file(str(folder / "adapter.safetensors"))
        flat = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))["cpu"]
        adapters.load_tensors(peft_model, adapter)
        slots: dict[int, dict] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            slots.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": slots, "param_groups": state["optimizer"]["param_groups"]})
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(rng)
    except Exception as err:  # a damaged file surfaces as the reader's own error type
        raise TrainError(f"the checkpoint {folder} is damaged ({type(err).__name__}): pass --overwrite to start "
                         "afresh") from err
    return state["step"], list(state["losses"]), list(state["lrs"])
