"""What the tests share: the command line run in-process, what a user-error exit must look like, a free port for
a process group, and plans made from a synthetic ranking. conftest.py hands each out as a fixture of the same name."""
import copy
import socket

import numpy as np
import pandas as pd
import torch
from click.testing import CliRunner
from peft import LoraConfig, get_peft_model

from placement.cli import main
from placement.model.loss import token_loss
from placement.plan import Plan
from placement.plan.ranking import concentration, rank
from placement.model.sites import find_sites, fingerprint


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *words):
    """A non-zero exit with exactly one line of output, no traceback, naming each of `words`."""
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output
    for word in words:
        assert word in lines[0], lines[0]


def free_port() -> int:
    """A TCP port nobody listens on now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


R = 4
PEFT = dict(task_type="CAUSAL_LM", r=R, lora_alpha=8, lora_dropout=0.0, bias="none", init_lora_weights=True,
            use_rslora=False)


def ranked_rows(sites, scores):
    """Site rows as a profile writes them: sorted by rank, with plain Python values."""
    frame = pd.DataFrame([s.to_dict() | {"page": score} for s, score in zip(sites, scores)])
    ranked = rank(frame.rename(columns={"name": "site"}))
    rows = ranked[["site", "layer", "role", "d_in", "d_out", "score", "share", "rank"]].to_dict("records")
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()} for row in rows], ranked


def make_plan(model, strategy, scores=None, **kwargs):
    sites = find_sites(model)
    if scores is None:
        scores = np.random.default_rng(0).permutation(len(sites)) + 1.0
    rows, ranked = ranked_rows(sites, scores)
    block = {"name": "tiny", "architecture": type(model).__name__, "num_layers": max(s.layer for s in sites) + 1,
             "num_sites": len(sites), "fingerprint": fingerprint(sites)}
    return Plan.build(model=block, probe={"score": "page", "r": R}, sites=rows, strategy=strategy, peft=dict(PEFT),
                      concentration=concentration(ranked), **kwargs)


def peft_lora_b_energy(model, site, batch, r, alpha, seed, use_rslora=False):
    """||grad lora_B||^2 of a real PEFT model with one LoRA at `site`, same seed and batch."""
    model = copy.deepcopy(model)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(target_modules=[site], r=r, lora_alpha=alpha, use_rslora=use_rslora))
    peft_model.eval()
    loss = token_loss(peft_model.base_model.model, batch)
    loss.backward()
    layer = peft_model.base_model.model.get_submodule(site)
    return float(layer.lora_B["default"].weight.grad.double().pow(2).sum())
