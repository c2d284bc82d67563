"""The command line generated from the settings dataclasses: every option declared once, on one field, with that
field's default (or the command's stated one); numbers out of range, options that would be ignored and broken launch
variables are one line and write nothing."""
import socket
import time
from dataclasses import MISSING, dataclass, field, fields

import click
import pytest

from placement.cli import main
from placement.cli_settings import settings, use
from placement.probe.settings import ProbeSettings
from placement.train.trainer import TrainSettings


def _declared_default(spec, dotted):
    """What the command's default of a (dotted) field is, read from the dataclasses and the command's preset."""
    head, *rest = dotted.split(".")
    f = next(f for f in fields(spec.cls) if f.name == head)
    value = spec.preset.get(head, f.default if f.default is not MISSING else
                            f.default_factory() if f.default_factory is not MISSING else MISSING)
    owner = spec.cls
    for part in rest:
        owner = type(value)
        f = next(g for g in fields(owner) if g.name == part)
        value = getattr(value, part)
    return owner, f, value


def problems(group: click.Group) -> list[str]:
    """Every option of every command that is not one declaration of one dataclass field with that field's default."""
    found, owners = [], {}
    for name, command in group.commands.items():
        seen = set()
        for param in command.params:
            if not isinstance(param, click.Option) or param.name in ("help", "version"):
                continue
            spelled = param.opts[0]
            if spelled in seen:
                found.append(f"{name}: {spelled} twice")
            seen.add(spelled)
            origin = getattr(param, "setting", None)
            if origin is None:
                found.append(f"{name}: {spelled} is declared outside the settings dataclasses")
                continue
            cls, f, value = _declared_default(*origin)
            owner = (cls.__name__, f.name)
            if owners.setdefault(spelled, owner) != owner:
                found.append(f"{name}: {spelled} declared by {owner} and by {owners[spelled]}")
            shown = value if value is MISSING else f.metadata.get("show", lambda v: v)(value)
            if value == () and f.metadata.get("many"):
                if param.required or not param.multiple:
                    found.append(f"{name}: {spelled} is a repeatable option that may be left out, but is not")
            elif value is MISSING or value == ():
                if not param.required:
                    found.append(f"{name}: {spelled} has no default but is not required")
            elif param.default != shown:
                found.append(f"{name}: {spelled} defaults to {param.default!r}, its field to {shown!r}")
    return found


def test_every_option_is_one_field_with_its_default():
    assert problems(main) == []
    counts = {}
    for command in main.commands.values():
        for param in command.params:
            counts[param.opts[0]] = counts.get(param.opts[0], 0) + 1
    assert counts["--r"] == 6 and counts["--batches"] == 6  # used by six commands, declared by one field each


def test_the_walker_sees_a_second_declaration_and_a_changed_default():
    @dataclass(frozen=True)
    class Other:
        rank: int = field(default=8, metadata={"help": "another rank", "option": "--r"})

    bad = click.Group("bad")

    @bad.command()
    @settings(probe=use(ProbeSettings, "r"))
    def one(probe):
        pass

    @bad.command()
    @settings(other=Other)
    def two(other):
        pass

    @bad.command()
    @click.option("--steps", default=3)
    def three(steps):
        pass

    found = problems(bad)
    assert any("--r declared by" in p for p in found) and any("outside" in p for p in found)
    four = click.Command("four", params=[click.Option(["--steps"], default=5)])
    four.params[0].setting = (use(TrainSettings, "steps"), "steps")
    assert any("defaults to 5" in p for p in problems(click.Group("g", commands={"four": four})))


def test_no_command_function_takes_more_than_ten_parameters():
    import inspect

    for name, command in main.commands.items():
        target = command.callback
        while hasattr(target, "__wrapped__"):
            target = target.__wrapped__
        assert len(inspect.signature(target).parameters) <= 10, name


def test_settings_check_themselves_once_when_made():
    from placement.errors import PlacementError

    with pytest.raises(PlacementError, match="--steps 0"):
        TrainSettings(steps=0)
    with pytest.raises(PlacementError, match="--r 0"):
        ProbeSettings(r=0)


def _command(name, tmp_path, model_dir):
    """Each command's required options, cheapest form; the out folder that must not appear."""
    out = tmp_path / "o"
    data = ["--model", str(model_dir), "--data", "builtin:arithmetic"]
    return out, {
        "profile": ["profile", *data, "--out", out],
        "stability": ["stability", *data, "--data", "builtin:arithmetic", "--out", out],
        "train": ["train", "--plan", tmp_path / "none.json", *data, "--out", out],
        "compare": ["compare", *data, "--out", out],
        "validate": ["validate", *data, "--out", out],
        "plan": ["plan", tmp_path, "--out", out],
    }[name]


SEEDED = ["profile", "stability", "train", "compare", "validate"]


@pytest.mark.parametrize("command, args, words", [
    *[(c, ["--seed", "-1"], ["--seed -1", "out of range"]) for c in SEEDED],
    *[(c, ["--seed", str(10 ** 13)], ["--seed 10000000000000"]) for c in SEEDED],
    ("plan", ["--strategy", "random-1", "--strategy-seed", "-1"], ["--strategy-seed -1"]),
    ("profile", ["--r", "0"], ["--r 0"]),
    ("profile", ["--r", str(10 ** 9)], ["--r 1000000000"]),
    ("train", ["--r", "0"], ["--r 0"]),
    ("train", ["--lr", "1e9"], ["--lr"]),
    ("compare", ["--lr", "-1"], ["--lr"]),
    ("train", ["--steps", str(10 ** 12)], ["--steps"]),
    ("compare", ["--steps", "0"], ["--steps 0"]),
    ("profile", ["--batches", "0"], ["--batches"]),
    ("validate", ["--batches", str(10 ** 9)], ["--batches"]),
    ("profile", ["--batch-size", "0"], ["--batch-size"]),
    ("compare", ["--seeds", str(10 ** 6)], ["--seeds"]),
    ("profile", ["--dist-timeout", "0"], ["--dist-timeout"]),
    ("compare", ["--lr-grid", "1e-3,1e-2"], ["--lr-grid", "--lr-sweep"]),
    ("compare", ["--sweep-arms", "dominant", "--arms", "dominant"], ["--sweep-arms", "--lr-sweep"]),
    ("compare", ["--lr-sweep", "--validation", "4", "--lr-grid", "1e-3,0.001"], ["0.001 twice"]),
    ("compare", ["--scores", "somewhere", "--r", "16"], ["--r", "--scores"]),
    ("validate", ["--scores", "somewhere", "--r", "16"], ["--r", "--scores"]),
    ("compare", ["--scores", "somewhere", "--alpha", "32"], ["--alpha", "--scores"]),
    ("profile", ["--families", "lora,ia3,lora"], ["--families", "lora twice"]),
])
def test_numbers_out_of_range_and_ignored_options_are_one_line(invoke, assert_one_line_error, model_dir, tmp_path,
                                                               command, args, words):
    out, head = _command(command, tmp_path, model_dir)
    assert_one_line_error(invoke(*head, *args, "--quiet" if command != "plan" else "--json"), *words)
    assert not out.exists()


@pytest.mark.parametrize("env, words", [
    ({"WORLD_SIZE": "abc"}, ["WORLD_SIZE='abc'"]),
    ({"WORLD_SIZE": "2", "RANK": "one", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, ["RANK='one'"]),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "port"}, ["MASTER_PORT='port'"]),
])
def test_broken_launch_variables_are_one_line(invoke, assert_one_line_error, model_dir, tmp_path, monkeypatch, env,
                                              words):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    out, head = _command("profile", tmp_path, model_dir)
    assert_one_line_error(invoke(*head, "--quiet"), *words)
    assert not out.exists()


@pytest.mark.slow
def test_a_rank_that_never_comes_is_named_after_dist_timeout(invoke, assert_one_line_error, model_dir, tmp_path,
                                                            monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    out, head = _command("profile", tmp_path, model_dir)
    began = time.monotonic()
    result = invoke(*head, "--quiet", "--dist-timeout", "2")
    assert time.monotonic() - began < 60
    assert_one_line_error(result, "rank 0 waited 2 s", "rank 1 did not come", "--dist-timeout")
    assert not out.exists()
