"""The scores that look past the first step, against PEFT and autograd."""
import copy

import pytest
import torch
from conftest import random_batch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from placement.errors import PlacementError
from placement.model.loss import token_loss
from placement.model.sites import find_sites
from placement.probe.lookahead import LookaheadSettings, lookahead_run
from placement.probe.registry import get_score

LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, bias="none", init_lora_weights=True, use_rslora=False)
SEED = 3


def _peft_copy(model, sites):
    """A real PEFT model over a copy of `model`, LoRA on every site, A drawn as the run draws it."""
    torch.manual_seed(SEED)
    return get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=[s.name for s in sites], **LORA))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_sgd_step_is_lr_times_the_lora_b_gradient_energy(family):
    model = tiny_model(family)
    sites = find_sites(model)
    batch = random_batch(0)
    lr = 0.05
    settings = LookaheadSettings(steps=1, lr=lr, optimizer="sgd", clip=None)
    result = lookahead_run(model, sites, [batch], LORA, SEED, settings)

    peft_model = _peft_copy(model, sites).eval()
    token_loss(peft_model, batch).backward()
    base = peft_model.base_model.model
    for site in sites:
        layer = base.get_submodule(site.name)
        expected = lr * float(layer.lora_B["default"].weight.grad.double().pow(2).sum())
        assert float(layer.lora_A["default"].weight.grad.abs().max()) == 0  # grad_A = 0 at B = 0
        assert result.attribution[site.name] == pytest.approx(expected, rel=1e-5, abs=1e-12)
    assert sum(result.attribution.values()) > 0


def test_one_sgd_step_is_lr_times_projected_weight_gradient():
    """a_s = lr * ||s G A^T||^2, G the base weight's gradient (B = 0 leaves the forward alone), A the run's own."""
    model = tiny_model("llama")
    sites = find_sites(model)
    batch = random_batch(1)
    lr = 0.1
    result = lookahead_run(model, sites, [batch], LORA, SEED, LookaheadSettings(steps=1, lr=lr, optimizer="sgd",
                                                                                  clip=None))
    plain = copy.deepcopy(model)
    modules = dict(plain.named_modules())
    for site in sites:
        modules[site.name].weight.requires_grad_(True)
    token_loss(plain, batch).backward()
    for site in sites:
        g = modules[site.name].weight.grad.double()  # d_out x d_in
        a_matrix, _, scale = result.adapter[site.name]
        expected = lr * float((scale * g @ a_matrix.double().T).pow(2).sum())
        assert result.attribution[site.name] == pytest.approx(expected, rel=1e-5, abs=1e-12)


def test_lora_drop_matches_a_hand_loop_over_a_peft_model():
    model = tiny_model("llama")
    sites = find_sites(model)
    batch = random_batch(2)
    result = lookahead_run(model, sites, [batch], LORA, SEED, LookaheadSettings(steps=3, lr=1e-2))

    peft_model = _peft_copy(model, sites).eval()
    base = peft_model.base_model.model
    inputs = {}
    for site in sites:
        layer = base.get_submodule(site.name)
        a_matrix, b_matrix, _ = result.adapter[site.name]
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a_matrix)
            layer.lora_B["default"].weight.copy_(b_matrix)
        layer.register_forward_hook(lambda m, args, out, name=site.name: inputs.__setitem__(name, args[0].detach()))
    with torch.no_grad():
        token_loss(peft_model, batch)
    keep = torch.zeros_like(batch.labels, dtype=torch.bool)
    keep[:, :-1] = batch.labels[:, 1:] != -100
    scale = LORA["lora_alpha"] / LORA["r"]
    for site in sites:
        a_matrix, b_matrix, _ = result.adapter[site.name]
        added = scale * inputs[site.name].double() @ a_matrix.double().T @ b_matrix.double().T
        expected = float(added.pow(2).sum(-1)[keep].mean())
        assert result.lora_drop[site.name] == pytest.approx(expected, rel=1e-6)
        assert expected > 0


def test_run_leaves_the_model_and_random_stream_alone():
    model = tiny_model("llama")
    sites = find_sites(model)
    batch = random_batch(0)
    with torch.no_grad():
        before = float(token_loss(model, batch))
    torch.manual_seed(11)
    state = torch.get_rng_state()
    result = lookahead_run(model, sites, [batch, random_batch(1)], LORA, SEED, LookaheadSettings(steps=4))
    assert torch.equal(torch.get_rng_state(), state)
    with torch.no_grad():
        assert float(token_loss(model, batch)) == before
    assert find_sites(model) == sites and not any("lora" in n for n, _ in model.named_modules())
    assert all(p.requires_grad for p in model.parameters())  # the flags as they were
    again = lookahead_run(model, sites, [batch, random_batch(1)], LORA, SEED, LookaheadSettings(steps=4))
    assert again.attribution == result.attribution and again.lora_drop == result.lora_drop
    assert len(result.losses) == 4 and result.realised < 0 and result.predicted < 0
    assert 0.2 < result.ratio < 5


def test_params_score_and_bad_settings():
    model = tiny_model("llama")
    sites = find_sites(model)

    class Ctx:
        pass
    ctx = Ctx()
    ctx.sites = sites
    assert get_score("params").compute(ctx) == {s.name: float(s.d_in + s.d_out) for s in sites}
    with pytest.raises(PlacementError, match="lookahead-steps"):
        lookahead_run(model, sites, [random_batch(0)], LORA, 0, LookaheadSettings(steps=0))


def test_recommend_computes_both_training_scores_from_one_run(monkeypatch):
    """The scores a selector reads come through the registry on one context: lookahead and lora_drop share a run
    (the one the log line reports), and equal that run's own values."""
    from placement.probe import lookahead
    from placement.study.candidates import computed_scores
    from placement.study.recommend import RecommendSettings

    model = tiny_model("llama")
    sites = find_sites(model)
    batches = [random_batch(0), random_batch(1)]
    runs = []
    real = lookahead.lookahead_run
    monkeypatch.setattr(lookahead, "lookahead_run", lambda *a, **k: runs.append(real(*a, **k)) or runs[-1])
    settings = RecommendSettings(r=4, alpha=8, seed=SEED, lookahead_steps=2, selectors=("lookahead", "lora_drop"))
    lines = []
    scores = computed_scores(["lookahead", "lora_drop", "params"], model, sites, batches, settings, lines.append)
    assert len(runs) == 1 and set(scores) == {"lookahead", "lora_drop", "params"}
    assert scores["lookahead"] == runs[0].attribution and scores["lora_drop"] == runs[0].lora_drop
    assert len(lines) == 1 and "realised" in lines[0] and f"{runs[0].realised:+.4f}" in lines[0]
    alone = real(model, sites, batches, LORA, SEED, LookaheadSettings(steps=2))
    assert alone.attribution == runs[0].attribution  # the settings reach the run: rank, alpha, seed, steps
