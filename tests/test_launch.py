"""Commands launched the way users launch them: a real `torchrun --nproc_per_node 2 -m placement compare` (gloo,
CPU) on a tiny model gives the single-process profile, adapters and comparison, and only rank 0 writes and prints;
what a launcher cannot do is refused in one line. (Each command under DDP and FSDP: test_distributed.py.)"""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from helpers import free_port


def torchrun(*args, tmp, nproc=2):
    """The command under torchrun, with the ranks' temporary folders in `tmp`."""
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", TMPDIR=str(tmp))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "placement", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=540)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torchrun_compare_equals_one_process_and_only_rank_0_writes(invoke, model_dir, tmp_path):
    # 3 calibration batches over 2 ranks: uneven shares, the same sums
    compare = ["compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms", "dominant,top-2",
               "--steps", "2", "--batch-size", "4", "--max-length", "48", "--test", "4", "--validation", "2",
               "--batches", "3", "--max-new-tokens", "2", "--quiet"]
    both = torchrun(*compare, "--out", tmp_path / "two", tmp=tmp_path)
    assert both.returncode == 0, both.stderr[-3000:]
    alone = invoke(*compare, "--out", tmp_path / "one")
    assert alone.exit_code == 0, alone.output
    two, one = tmp_path / "two", tmp_path / "one"
    a, b = pd.read_csv(two / "profile" / "scores.csv"), pd.read_csv(one / "profile" / "scores.csv")
    assert list(a.site) == list(b.site)
    for column in ("page", "page_sampled", "grad_energy", "fisher"):
        np.testing.assert_allclose(a[column], b[column], rtol=1e-5, err_msg=column)
    for arm in ("dominant", "top-2"):
        x = load_file(two / "arms" / arm / "adapter_model.safetensors")
        y = load_file(one / "arms" / arm / "adapter_model.safetensors")
        assert x.keys() == y.keys()
        for key in x:
            assert torch.allclose(x[key], y[key], atol=1e-5), (arm, key)
        assert any(float(y[key].abs().max()) > 0 for key in y if "lora_B" in key)  # it trained
    a = pd.read_csv(two / "comparison.csv").set_index("arm")
    b = pd.read_csv(one / "comparison.csv").set_index("arm")
    np.testing.assert_allclose(a.loc[["dominant", "top-2"], "eval_loss"], b.loc[["dominant", "top-2"], "eval_loss"],
                               rtol=1e-5)
    assert both.stdout.count("wrote ") == 1 and f"wrote {two}/comparison.csv" in both.stdout  # rank 1 is silent
    assert not list(tmp_path.glob("placement-rank-*"))  # rank 1's private folder is gone


def test_resume_under_a_launcher_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for each rank
    result = invoke("train", "--plan", tmp_path / "missing.json", "--model", model_dir, "--data",
                    "builtin:arithmetic", "--resume", "--out", tmp_path / "o")
    assert_one_line_error(result, "--resume is not supported under a launcher")
    assert not (tmp_path / "o").exists()


def test_a_launcher_environment_without_a_rank_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path,
                                                           monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--out", tmp_path / "o")
    assert_one_line_error(result, "WORLD_SIZE is 2 but RANK is not set", "torchrun")
    assert not (tmp_path / "o").exists()


def test_fsdp_without_a_launcher_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--fsdp", "--out", tmp_path / "o")
    assert_one_line_error(result, "--fsdp", "torchrun")
    assert not (tmp_path / "o").exists()
