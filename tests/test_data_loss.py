"""The tool never deletes or replaces what it did not write: a user's file or folder, put where the tool cleans or
writes (checkpoints, temporary files, arms, the report, the callback's folder), survives byte for byte; deletes go
through the run's ledger and never through a link; a live run is never replaced or continued by a second command."""
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from placement import runlock
from placement.errors import PlacementError
from placement.plan import Strategy
from placement.train import trainer as trainer_mod
from tiny import tiny_model

TRAIN = ("--data", "builtin:arithmetic", "--batch-size", "4", "--max-length", "48", "--test", "4", "--validation",
         "0", "--max-new-tokens", "2", "--quiet")
PROFILE = ("--data", "builtin:arithmetic", "--batches", "2", "--batch-size", "4", "--max-length", "48", "--quiet")
COMPARE = ("--data", "builtin:arithmetic", "--arms", "dominant", "--steps", "1", "--batch-size", "4", "--batches",
           "1", "--test", "4", "--validation", "4", "--max-new-tokens", "2", "--quiet")


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Kept(type(Path())):
    """A user's folder and what it held: `check()` asserts it is byte for byte as it was."""

    def check(self):
        assert tree(self) == self.before


@pytest.fixture
def user_folder(tmp_path):
    """A user's folder of work, outside every run folder."""
    folder = Kept(tmp_path / "thesis")
    (folder / "chapters").mkdir(parents=True)
    (folder / "thesis.tex").write_bytes(b"years of work")
    (folder / "chapters" / "one.tex").write_bytes(b"\\chapter{One}")
    (folder / "state.json").write_bytes(b'{"mine": true}')
    folder.before = tree(folder)
    return folder


@pytest.fixture(scope="module")
def plan_file(make_plan, tmp_path_factory):
    path = tmp_path_factory.mktemp("plan") / "plan.json"
    make_plan(tiny_model("llama", num_hidden_layers=3), Strategy("dominant")).save(path)
    return path


def train_args(plan_file, model_dir, out, *extra):
    return ("train", "--plan", plan_file, "--model", model_dir, *TRAIN, "--out", out, *extra)


def record(out: Path) -> dict:
    return json.loads((out / "run.json").read_text())


def interrupted_at(monkeypatch, stop: int):
    """Make the training loop stop like a Ctrl-C before step `stop` (0-based) runs."""
    real = trainer_mod._one_step

    def one_step(step_loss, batch, step, *args):
        if step == stop:
            raise KeyboardInterrupt
        return real(step_loss, batch, step, *args)
    monkeypatch.setattr(trainer_mod, "_one_step", one_step)


# -- checkpoints ------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_never_follows_a_link_among_the_checkpoints(invoke, assert_one_line_error, plan_file, model_dir,
                                                           tmp_path, monkeypatch, user_folder):
    out = tmp_path / "train"
    interrupted_at(monkeypatch, 2)
    stopped = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1"))
    assert stopped.exit_code != 0 and record(out)["status"] == "failed"
    monkeypatch.undo()
    (out / "checkpoints" / "step-0000000").symlink_to(user_folder, target_is_directory=True)
    (out / "checkpoints" / "mine").symlink_to(user_folder, target_is_directory=True)
    resumed = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    user_folder.check()
    assert (out / "checkpoints" / "step-0000000").is_symlink() and record(out)["status"] == "done"
    assert not any(n.startswith("checkpoints/") for n in record(out)["files"])


@pytest.mark.slow
def test_a_link_where_the_next_checkpoint_goes_is_refused_not_followed(invoke, assert_one_line_error, plan_file,
                                                                        model_dir, tmp_path, monkeypatch,
                                                                        user_folder):
    out = tmp_path / "train"
    interrupted_at(monkeypatch, 2)
    invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    (out / "checkpoints" / "step-0000003").symlink_to(user_folder, target_is_directory=True)
    resumed = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1", "--resume"))
    assert_one_line_error(resumed, "step-0000003")
    user_folder.check()


@pytest.mark.slow
def test_a_link_as_the_checkpoints_folder_is_never_written_or_emptied(invoke, assert_one_line_error, plan_file,
                                                                      model_dir, tmp_path, user_folder):
    out = tmp_path / "train"
    first = invoke(*train_args(plan_file, model_dir, out, "--steps", "2"))
    assert first.exit_code == 0, first.output
    (out / "checkpoints").symlink_to(user_folder, target_is_directory=True)
    again = invoke(*train_args(plan_file, model_dir, out, "--steps", "2", "--save-every", "1", "--overwrite"))
    assert_one_line_error(again, "symbolic link")
    user_folder.check()


@pytest.mark.slow
@pytest.mark.parametrize("flags", [("--overwrite",), ("--overwrite", "--save-every", "1")])
def test_overwrite_keeps_a_users_folder_under_checkpoints(invoke, plan_file, model_dir, tmp_path, flags):
    out = tmp_path / "train"
    first = invoke(*train_args(plan_file, model_dir, out, "--steps", "2"))
    assert first.exit_code == 0, first.output
    mine = out / "checkpoints" / "step-mine"
    mine.mkdir(parents=True)
    (mine / "adapter.safetensors").write_bytes(b"my own adapter")
    (mine / "state.json").write_bytes(b"{}")
    again = invoke(*train_args(plan_file, model_dir, out, "--steps", "3", *flags))
    assert again.exit_code == 0, again.output
    assert tree(mine) == {"adapter.safetensors": b"my own adapter", "state.json": b"{}"}


@pytest.mark.slow
def test_resume_keeps_a_users_folder_under_checkpoints(invoke, plan_file, model_dir, tmp_path, monkeypatch):
    out = tmp_path / "train"
    interrupted_at(monkeypatch, 2)
    invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    mine = out / "checkpoints" / "step-0000001"  # the name of a state the run already deleted
    mine.mkdir()
    (mine / "notes.txt").write_bytes(b"mine")
    resumed = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1", "--resume"))
    assert resumed.exit_code == 0, resumed.output
    assert tree(mine) == {"notes.txt": b"mine"}


# -- temporary files and arms -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_only_the_temporaries_a_run_listed_are_cleaned(invoke, model_dir, tmp_path, user_folder):
    out = tmp_path / "run"
    first = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert first.exit_code == 0, first.output
    (out / ".~placement.notes.txt").write_bytes(b"named like ours, but mine")
    (out / ".~placement.link").symlink_to(user_folder, target_is_directory=True)
    (out / ".~placement.listed").symlink_to(user_folder, target_is_directory=True)
    killed = record(out)
    killed.update(status="running", temporaries=[".~placement.listed", "../thesis"],
                  files=killed["files"] + ["../thesis/thesis.tex", str(user_folder / "state.json")])
    (out / "run.json").write_text(json.dumps(killed))
    again = invoke("profile", "--model", model_dir, *PROFILE, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (out / ".~placement.notes.txt").read_bytes() == b"named like ours, but mine"
    assert (out / ".~placement.link").is_symlink()
    assert not os.path.lexists(out / ".~placement.listed")  # a listed temporary: the link itself goes
    user_folder.check()


@pytest.mark.slow
def test_links_under_the_arms_are_neither_followed_nor_emptied(invoke, assert_one_line_error, model_dir, tmp_path,
                                                               user_folder):
    out = tmp_path / "compare"
    first = invoke("compare", "--model", model_dir, *COMPARE, "--out", out)
    assert first.exit_code == 0, first.output
    arm = out / "arms" / "dominant"
    (arm / "checkpoints").mkdir()
    (arm / "checkpoints" / "step-0000000").symlink_to(user_folder, target_is_directory=True)
    again = invoke("compare", "--model", model_dir, *COMPARE, "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert (arm / "checkpoints" / "step-0000000").is_symlink()
    user_folder.check()
    shutil.rmtree(arm)  # removes the link, not what it points at
    user_folder.check()
    arm.symlink_to(user_folder, target_is_directory=True)
    linked = invoke("compare", "--model", model_dir, *COMPARE, "--out", out, "--overwrite")
    assert_one_line_error(linked, "symbolic link")
    user_folder.check()


@pytest.mark.slow
def test_compare_with_scores_in_the_folder_it_overwrites_keeps_them(invoke, assert_one_line_error, model_dir,
                                                                    tmp_path):
    out = tmp_path / "compare"
    first = invoke("compare", "--model", model_dir, *COMPARE, "--out", out)
    assert first.exit_code == 0, first.output
    profile = tree(out / "profile")
    refused = invoke("compare", "--model", model_dir, *COMPARE, "--scores", out / "profile" / "plan.json",
                     "--arms", "kappa-999", "--overwrite", "--out", out)
    assert refused.exit_code != 0
    assert tree(out / "profile") == profile  # nothing is deleted before every check has passed
    again = invoke("compare", "--model", model_dir, *COMPARE, "--scores", out / "profile" / "plan.json",
                   "--overwrite", "--out", out)
    assert again.exit_code == 0, again.output
    assert tree(out / "profile") == profile


# -- the report and the callback --------------------------------------------------------------------------------------
def test_report_writes_only_into_a_run_of_ours_and_never_over_a_users_page(invoke, assert_one_line_error, model_dir,
                                                                          tmp_path):
    out = tmp_path / "run"
    first = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert first.exit_code == 0, first.output
    (out / "report.html").write_bytes(b"<p>my own page</p>")
    refused = invoke("report", out)
    assert_one_line_error(refused, "report.html", "did not write")
    assert (out / "report.html").read_bytes() == b"<p>my own page</p>"

    foreign = tmp_path / "not-a-run"
    foreign.mkdir()
    for name in ("scores.csv", "plan.json"):
        (foreign / name).write_bytes((out / name).read_bytes())
    before = tree(foreign)
    refused = invoke("report", foreign)
    assert_one_line_error(refused, "no run")
    assert tree(foreign) == before


def _callback_run(callback, output_dir):
    ids = torch.randint(5, 90, (2, 4, 12), generator=torch.Generator().manual_seed(0))
    loader = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x.clone()} for x in ids]
    state = SimpleNamespace(is_world_process_zero=True, global_step=0, log_history=[])
    callback.on_train_begin(SimpleNamespace(output_dir=str(output_dir)), state, None, model=tiny_model("llama"),
                            train_dataloader=loader)


def test_the_callback_never_replaces_a_users_plan(tmp_path):
    from placement.callbacks import PlacementCallback

    mine = tmp_path / "placement" / "plan.json"
    mine.parent.mkdir()
    mine.write_bytes(b'{"my": "plan"}')
    with pytest.raises(PlacementError, match="did not write"):
        _callback_run(PlacementCallback(batches=1), tmp_path)
    assert mine.read_bytes() == b'{"my": "plan"}'

    _callback_run(PlacementCallback(batches=1), tmp_path / "fresh")
    assert record(tmp_path / "fresh" / "placement")["status"] == "done"
    with pytest.raises(PlacementError, match="overwrite=True"):  # an earlier profile of the callback
        _callback_run(PlacementCallback(batches=1), tmp_path / "fresh")
    _callback_run(PlacementCallback(batches=1, overwrite=True), tmp_path / "fresh")


# -- live runs, failed runs, killed runs ------------------------------------------------------------------------------
def _lock(out: Path, pid: int) -> None:
    import socket

    (out / runlock.LOCK_FILE).write_text(json.dumps({"tool": "placement", "pid": pid, "host": socket.gethostname(),
                                                     "ticks": runlock._start_ticks(pid)}))


@pytest.mark.slow
def test_a_live_run_is_neither_replaced_nor_continued(invoke, assert_one_line_error, plan_file, model_dir,
                                                      tmp_path, monkeypatch):
    out = tmp_path / "train"
    interrupted_at(monkeypatch, 2)
    invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    live = subprocess.Popen(["sleep", "60"])
    try:
        killed = record(out) | {"status": "running"}
        (out / "run.json").write_text(json.dumps(killed))
        _lock(out, live.pid)
        before = tree(out)
        for flag in ("--overwrite", "--resume"):
            refused = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1", flag))
            assert_one_line_error(refused, "running placement", str(live.pid))
            assert tree(out) == before
    finally:
        live.kill()
        live.wait()
    resumed = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1", "--resume"))
    assert resumed.exit_code == 0, resumed.output  # the lock's process is gone: the lock is stale
    assert not (out / runlock.LOCK_FILE).exists()


def test_a_crash_after_the_claim_marks_the_run_failed_and_a_rerun_works(invoke, model_dir, tmp_path, monkeypatch):
    from placement.study import profile as profile_mod

    out = tmp_path / "run"

    def crash(*args, **kwargs):
        raise RuntimeError("a bug")
    monkeypatch.setattr(profile_mod, "write_profile", crash)
    with pytest.raises(RuntimeError):
        invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert not out.exists() or record(out)["status"] == "failed"
    monkeypatch.undo()
    again = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert again.exit_code == 0, again.output


@pytest.mark.slow
def test_a_crash_after_a_checkpoint_says_failed_and_points_to_resume(invoke, assert_one_line_error, plan_file,
                                                                     model_dir, tmp_path, monkeypatch):
    out = tmp_path / "train"
    real = trainer_mod._one_step

    def one_step(step_loss, batch, step, *args):
        if step == 2:
            raise RuntimeError("a bug")
        return real(step_loss, batch, step, *args)
    monkeypatch.setattr(trainer_mod, "_one_step", one_step)
    with pytest.raises(RuntimeError):
        invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1"))
    monkeypatch.undo()
    assert record(out)["status"] == "failed" and not (out / runlock.LOCK_FILE).exists()
    rerun = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1"))
    assert_one_line_error(rerun, "--resume")
    resumed = invoke(*train_args(plan_file, model_dir, out, "--steps", "4", "--save-every", "1", "--resume"))
    assert resumed.exit_code == 0, resumed.output


@pytest.mark.slow
def test_a_kill_before_the_first_checkpoint_leads_to_a_rerun_that_works(invoke, assert_one_line_error, plan_file,
                                                                       model_dir, tmp_path):
    out = tmp_path / "train"
    out.mkdir()
    gone = subprocess.Popen(["true"])
    gone.wait()
    (out / "run.json").write_text(json.dumps({"tool": "placement", "status": "running", "command": ["placement"],
                                              "files": [], "temporaries": []}))
    _lock(out, gone.pid)
    resumed = invoke(*train_args(plan_file, model_dir, out, "--steps", "2", "--save-every", "1", "--resume"))
    assert_one_line_error(resumed, "no checkpoint", "without --resume")
    rerun = invoke(*train_args(plan_file, model_dir, out, "--steps", "2", "--save-every", "1"))
    assert rerun.exit_code == 0, rerun.output


def test_an_empty_cache_variable_means_the_default_cache(monkeypatch):
    from placement.model.load import cache_root

    monkeypatch.delenv("PLACEMENT_CACHE", raising=False)
    default = cache_root()
    monkeypatch.setenv("PLACEMENT_CACHE", "")
    assert cache_root() == default and cache_root().is_absolute()


@pytest.mark.parametrize("kind", ["file", "folder"])
def test_a_kill_at_the_rename_leaves_nothing_of_ours_unlisted(tmp_path, monkeypatch, kind):
    """Every file is listed in run.json before the rename that puts it in place: a kill between the two (here: at
    the rename) leaves no file the next run would refuse to remove as someone else's."""
    from placement import outputs
    from placement.ledger import run_folder

    out, rename = tmp_path / "run", os.replace
    seen = []

    def killed_at_rename(src, dst):
        if Path(dst).name == "run.json":  # the record itself is written the same way
            return rename(src, dst)
        listed = json.loads((out / "run.json").read_text())["files"]
        seen.append([Path(dst, p.relative_to(src)).relative_to(out).as_posix() for p in Path(src).rglob("*")
                     if p.is_file()]
                    if Path(src).is_dir() else [Path(dst).relative_to(out).as_posix()])
        assert all(name in listed for name in seen[-1]), (seen[-1], listed)
        rename(src, dst)
        raise KeyboardInterrupt  # the kill, just after the rename and before anything else is recorded

    monkeypatch.setattr(outputs.os, "replace", killed_at_rename)
    with pytest.raises(KeyboardInterrupt), run_folder(out):
        if kind == "file":
            outputs.write_text(out / "notes.txt", "ours")
        else:
            with outputs.new_dir(out / "state") as tmp:
                (tmp / "a.json").write_text("{}")
                (tmp / "sub").mkdir()
                (tmp / "sub" / "b.bin").write_bytes(b"x")
    monkeypatch.setattr(outputs.os, "replace", rename)
    assert seen and seen[0]
    record = json.loads((out / "run.json").read_text())
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "run.json"}
    assert on_disk and on_disk <= set(record["files"])  # everything the kill left is listed as ours
