"""Commands under torch.distributed as a launcher starts them: two CPU processes (gloo) with the environment torchrun
gives each rank (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) run the probe and the act_norm score,
`profile` and `train` under DDP and FSDP and `stability`, and give what one process gives; only rank 0 writes and
prints. Both processes are started once and run every command in turn, as a launcher would start each."""
import contextlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from conftest import random_batch
from helpers import free_port
from placement import distributed
from placement.plan import Strategy
from placement.probe import ProbeSettings, probe
from placement.probe.act_norm import act_norm_scores
from placement.probe.registry import ScoreContext
from placement.model.sites import find_sites
from tiny import tiny_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

BATCHES = 4
PROFILE = ["profile", "--data", "builtin:arithmetic", "--batch-size", "3", "--max-length", "48", "--bootstrap", "20",
           "--quiet"]
# 5 batches over 2 ranks under DDP: uneven shares, the same sums; FSDP2 needs even shares (every rank runs each pass)
ENGINES = {"ddp": ["--batches", "5"], "fsdp": ["--batches", "4", "--fsdp"]}


def _probe(model):
    return probe(model, find_sites(model), [random_batch(s) for s in range(BATCHES)], ProbeSettings(seed=1))


def _act_norm(model):
    return act_norm_scores(ScoreContext(model, find_sites(model), [random_batch(s) for s in range(3)]))


def _worker(rank: int, world: int, ports: list[int], commands: list[list[str]], folder: str) -> None:
    """One rank: the probe called directly, then each command line as `python -m placement` runs it."""
    from placement.cli import main

    torch.set_num_threads(1)
    tempfile.tempdir = folder  # where the other ranks' private output folders go, to see that none is left
    os.environ.update(MASTER_ADDR="127.0.0.1", WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["MASTER_PORT"] = str(ports[0])
    distributed.start()
    try:
        result = _probe(tiny_model("llama"))
        norms = _act_norm(tiny_model("llama"))  # three batches over two ranks: uneven shares, 2 and 1
        if rank == 0:
            result.scores.to_csv(Path(folder) / "probe.csv", index=False)
            np.save(Path(folder) / "probe.batches.npy", result.batch_page)
            pd.Series(norms).to_csv(Path(folder) / "act_norm.csv")
    finally:
        distributed.stop()
    for i, (port, args) in enumerate(zip(ports[1:], commands)):
        os.environ["MASTER_PORT"] = str(port)
        with open(Path(folder) / f"stdout-{i}-rank{rank}.txt", "w") as out, contextlib.redirect_stdout(out):
            main(args, standalone_mode=False)


@pytest.fixture(scope="module")
def launched(model_dir, make_plan, tmp_path_factory):
    """The commands run once by two ranks, and their outputs: (folder, {name: the command's arguments})."""
    folder = tmp_path_factory.mktemp("two-ranks")
    make_plan(tiny_model("llama", num_hidden_layers=3), Strategy("top-k", k=3)).save(folder / "plan.json")
    words = folder / "words.json"
    words.write_text(json.dumps([{"instruction": f"Spell {w}", "input": "", "output": " ".join(w), "answer": w}
                                 for w in ("cat", "dog", "bird", "fish", "cow", "hen", "ant", "bee")]))
    train = ["train", "--plan", folder / "plan.json", "--model", model_dir, "--data", "builtin:arithmetic",
             "--steps", "3", "--batch-size", "4", "--max-length", "48", "--lr", "1e-2", "--test", "4",
             "--max-new-tokens", "2", "--quiet"]
    commands = {f"profile-{e}": [*PROFILE, *ENGINES[e], "--model", model_dir] for e in ENGINES}
    commands |= {f"train-{e}": train + (["--fsdp"] if e == "fsdp" else []) for e in ENGINES}
    commands["stability"] = ["stability", "--model", model_dir, "--data", "builtin:arithmetic", "--data", words,
                             "--batches", "2", "--batch-size", "2", "--max-length", "48", "--quiet"]
    lines = [[str(a) for a in args] + ["--out", str(folder / name)] for name, args in commands.items()]
    ports = [free_port() for _ in range(len(lines) + 1)]
    mp.spawn(_worker, args=(2, ports, lines, str(folder)), nprocs=2, join=True)
    return folder, commands


def test_two_process_probe_matches_one_process(launched):
    folder, _ = launched
    single = _probe(tiny_model("llama"))
    both = pd.read_csv(folder / "probe.csv")
    for column in ("page", "page_sampled", "grad_energy", "fisher", "coherence"):
        np.testing.assert_allclose(both[column], single.scores[column], rtol=1e-5, err_msg=column)
    np.testing.assert_allclose(np.load(folder / "probe.batches.npy"), single.batch_page, rtol=1e-5)


def test_act_norm_over_two_processes_is_that_of_one(launched):
    folder, _ = launched
    both = pd.read_csv(folder / "act_norm.csv", index_col=0).iloc[:, 0]
    assert both.to_dict() == pytest.approx(_act_norm(tiny_model("llama")), rel=1e-6)


def one_process(invoke, args, out):
    result = invoke(*args, "--out", out)
    assert result.exit_code == 0, result.output
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_profile_equals_one_process_and_only_rank_0_writes(invoke, launched, tmp_path, engine):
    folder, commands = launched
    two = folder / f"profile-{engine}"
    args = [a for a in commands[f"profile-{engine}"] if a != "--fsdp"]
    one = one_process(invoke, args, tmp_path / "one")
    a, b = pd.read_csv(two / "scores.csv"), pd.read_csv(one / "scores.csv")
    assert list(a.site) == list(b.site)
    for column in ("page", "page_sampled", "grad_energy", "fisher"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, err_msg=column)
    index = list(commands).index(f"profile-{engine}")
    printed = [(folder / f"stdout-{index}-rank{rank}.txt").read_text() for rank in (0, 1)]
    assert printed[0].count("dominant site") == 1 and printed[1] == ""  # rank 0 prints, rank 1 is silent
    assert json.loads((two / "run.json").read_text())["status"] == "done"
    assert not list(folder.glob("placement-rank-*"))  # rank 1's private folder is gone


@pytest.mark.parametrize("engine", ENGINES)
def test_train_equals_one_process_with_the_same_global_batch(invoke, launched, tmp_path, engine):
    folder, commands = launched
    one = one_process(invoke, commands["train-ddp"], tmp_path / "one")
    two = folder / f"train-{engine}"
    a, b = load_file(two / "adapter_model.safetensors"), load_file(one / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert any(float(b[key].abs().max()) > 0 for key in b if "lora_B" in key)  # it trained
    np.testing.assert_allclose(pd.read_csv(two / "loss.csv")["loss"], pd.read_csv(one / "loss.csv")["loss"],
                               rtol=1e-5)


def test_stability_equals_one_process(invoke, launched, tmp_path):
    folder, commands = launched
    one = one_process(invoke, commands["stability"], tmp_path / "one")
    a, b = pd.read_csv(folder / "stability" / "stability.csv"), pd.read_csv(one / "stability.csv")
    pd.testing.assert_frame_equal(a, b, rtol=1e-5)
