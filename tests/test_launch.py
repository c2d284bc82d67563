"""Commands launched the way users launch them: real `torchrun --nproc_per_node 2 -m placement ...` processes
(gloo, CPU) on a tiny model give the single-process profile and adapter, and only rank 0 writes and prints."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from placement.plan import Strategy
from tiny import tiny_model

pytestmark = pytest.mark.timeout(600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, nproc=2):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={_free_port()}", "-m", "placement", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)


def single(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "placement", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=540)


PROFILE = ["profile", "--data", "builtin:arithmetic", "--batches", "5", "--batch-size", "3", "--max-length", "48",
           "--bootstrap", "20", "--quiet"]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_profile_equals_one_process_and_only_rank_0_writes(model_dir, tmp_path, engine):
    # 5 batches over 2 ranks: uneven shares, the same sums; FSDP2 needs even shares (every rank runs each pass)
    args = PROFILE + (["--batches", "4"] if engine == "fsdp" else [])  # the last --batches counts
    both = torchrun(*args, "--model", model_dir, "--out", tmp_path / "two", *(["--fsdp"] if engine == "fsdp" else []))
    assert both.returncode == 0, both.stderr[-3000:]
    one = single(*args, "--model", model_dir, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = pd.read_csv(tmp_path / "two" / "scores.csv"), pd.read_csv(tmp_path / "one" / "scores.csv")
    assert list(a.site) == list(b.site)
    for column in ("page", "page_sampled", "grad_energy", "fisher"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, err_msg=column)
    assert both.stdout.count("dominant site") == 1  # rank 0 prints, rank 1 is silent
    run = json.loads((tmp_path / "two" / "run.json").read_text())
    assert run["status"] == "done"
    assert not list(tmp_path.glob("placement-rank-*"))


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_torchrun_train_equals_one_process_with_the_same_global_batch(model_dir, make_plan, tmp_path, engine):
    plan = make_plan(tiny_model("llama", num_hidden_layers=3), Strategy("top-k", k=3))
    plan.save(tmp_path / "plan.json")
    args = ["train", "--plan", tmp_path / "plan.json", "--model", model_dir, "--data", "builtin:arithmetic",
            "--steps", "3", "--batch-size", "4", "--max-length", "48", "--lr", "1e-2", "--test", "4",
            "--max-new-tokens", "2", "--quiet"]
    both = torchrun(*args, "--out", tmp_path / "two", *(["--fsdp"] if engine == "fsdp" else []))
    assert both.returncode == 0, both.stderr[-3000:]
    one = single(*args, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "two" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key
    assert any(float(b[key].abs().max()) > 0 for key in b if "lora_B" in key)  # it trained
    losses_two = pd.read_csv(tmp_path / "two" / "loss.csv")["loss"]
    np.testing.assert_allclose(losses_two, pd.read_csv(tmp_path / "one" / "loss.csv")["loss"], rtol=1e-5)


def test_launcher_refusals_are_one_line(model_dir, tmp_path):
    result = torchrun("train", "--plan", tmp_path / "missing.json", "--model", model_dir, "--data",
                      "builtin:arithmetic", "--resume", "--out", tmp_path / "o", nproc=2)
    assert result.returncode != 0
    assert "--resume is not supported under a launcher" in result.stderr
    # each rank says it in one line; the one traceback is torchrun's own report of a failed child
    assert result.stderr.count("Traceback") <= 1 and "ChildFailedError" in result.stderr


def test_fsdp_without_a_launcher_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--fsdp", "--out", tmp_path / "o")
    assert_one_line_error(result, "--fsdp", "torchrun")
    assert not (tmp_path / "o").exists()


def test_torchrun_compare_and_stability_equal_one_process(model_dir, tmp_path):
    compare = ["compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms", "dominant,top-2",
               "--steps", "2", "--batch-size", "4", "--max-length", "48", "--test", "4", "--validation", "2",
               "--batches", "2", "--max-new-tokens", "2", "--quiet"]
    both = torchrun(*compare, "--out", tmp_path / "two")
    assert both.returncode == 0, both.stderr[-3000:]
    one = single(*compare, "--out", tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    a = pd.read_csv(tmp_path / "two" / "comparison.csv").set_index("arm")
    b = pd.read_csv(tmp_path / "one" / "comparison.csv").set_index("arm")
    np.testing.assert_allclose(a.loc[["dominant", "top-2"], "eval_loss"], b.loc[["dominant", "top-2"], "eval_loss"],
                               rtol=1e-5)
    words = tmp_path / "words.json"
    words.write_text(json.dumps([{"instruction": f"Spell {w}", "input": "", "output": " ".join(w), "answer": w}
                                 for w in ("cat", "dog", "bird", "fish", "cow", "hen", "ant", "bee")]))
    stability = ["stability", "--model", model_dir, "--data", "builtin:arithmetic", "--data", words,
                 "--batches", "2", "--batch-size", "2", "--max-length", "48", "--quiet"]
    both = torchrun(*stability, "--out", tmp_path / "s2")
    assert both.returncode == 0, both.stderr[-3000:]
    assert (tmp_path / "s2" / "stability.csv").is_file()
