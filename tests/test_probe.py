"""The probe against PEFT as the oracle, against Monte Carlo, and its promises about memory and state."""
import copy

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import random_batch
from helpers import peft_lora_b_energy
from placement.probe import inputs, scores
from placement.probe import ProbeSettings, probe, token_loss
from placement.model.sites import find_sites
from tiny import FAMILIES, tiny_model


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_page_sampled_equals_peft_lora_b_grad(family, use_rslora):
    model = tiny_model(family)
    batch = random_batch(1)
    sites = find_sites(model)
    settings = ProbeSettings(r=4, alpha=8, seed=7, use_rslora=use_rslora)
    result = probe(model, sites, [batch], settings).scores.set_index("site")
    seen_roles = set()
    for site in sites:
        if site.role in seen_roles and site.layer == 0:
            continue
        seen_roles.add(site.role)
        oracle = peft_lora_b_energy(model, site.name, batch, 4, 8, 7, use_rslora)
        assert oracle > 0
        assert result.loc[site.name, "page_sampled"] == pytest.approx(oracle, rel=1e-5), site.name


@pytest.mark.slow
def test_page_is_the_mean_of_page_sampled_over_seeds():
    model = tiny_model("llama")
    batch = random_batch(2)
    sites = [s for s in find_sites(model) if s.layer == 0]
    exact = probe(model, sites, [batch], ProbeSettings(r=2, alpha=4)).scores
    draws = np.array([
        probe(model, sites, [batch], ProbeSettings(r=2, alpha=4, seed=seed)).scores["page_sampled"].to_numpy()
        for seed in range(300)
    ])
    mean, se = draws.mean(0), draws.std(0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - exact["page"].to_numpy()) < 4 * se + 1e-12)


def test_fast_mode_estimates_page_and_keeps_page_sampled_exact(batches):
    model = tiny_model("qwen2")
    sites = find_sites(model)
    exact = probe(model, sites, batches, ProbeSettings(seed=3)).scores
    fast = probe(model, sites, batches, ProbeSettings(seed=3, mode="fast", draws=64)).scores
    np.testing.assert_allclose(fast["page_sampled"], exact["page_sampled"], rtol=1e-5)
    assert fast["grad_energy"].isna().all() and (fast["page_se"] > 0).all()
    z = (fast["page"] - exact["page"]).abs() / fast["page_se"]
    assert (z < 5).all()
    rel = (fast["fisher"] - exact["fisher"]).abs() / exact["fisher"]
    assert rel.median() < 0.3


@pytest.mark.parametrize("hidden, grams_kept", [(16, False), (96, True)])
def test_exact_aggregates_match_a_direct_computation(batches, hidden, grams_kept, monkeypatch):
    """page = mean_b s^2 r/(3 d_in) ||G_b||^2 with G_b from autograd on the weights themselves, for every site of a
    block (q, k and v share an input, gate and up another), whether the probe keeps x or its token Grams."""
    model = tiny_model("llama", hidden_size=hidden, intermediate_size=hidden * 3 // 2)
    sites = [s for s in find_sites(model) if s.layer == 1]
    decisions = []  # for each settled input of the exact probe: were its token Grams kept rather than x?
    settle = inputs.Input.settle

    def recording(self, layout):
        kept_x = self.source is not None
        settle(self, layout)
        if layout is not None and kept_x:
            decisions.append(self.grams is not None)
    monkeypatch.setattr(inputs.Input, "settle", recording)
    result = probe(model, sites, batches, ProbeSettings(r=4, alpha=8)).scores.set_index("site")
    assert grams_kept in decisions
    weights = {s.name: model.get_submodule(s.name).weight for s in sites}
    energies = {name: [] for name in weights}
    fisher = dict.fromkeys(weights, 0.0)
    examples = 0

    def gradients(batch):
        for w in weights.values():
            w.grad = None
        token_loss(model, batch).backward()
        return {name: w.grad.double() for name, w in weights.items()}

    for w in weights.values():
        w.requires_grad_(True)
    for batch in batches:
        for name, grad in gradients(batch).items():
            energies[name].append(float(grad.pow(2).sum()))
        for i in range(batch.input_ids.shape[0]):  # per-example gradient of the example's own mean loss
            one = type(batch)(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.labels[i:i + 1])
            for name, grad in gradients(one).items():
                fisher[name] += float(grad.pow(2).sum())
            examples += 1
    for w in weights.values():
        w.requires_grad_(False)
        w.grad = None
    for site in sites:
        row, factor = result.loc[site.name], scores.expected_factor(4, 8, site.d_in)
        assert row["grad_energy"] == pytest.approx(np.mean(energies[site.name]), rel=1e-5), site.name
        assert row["page"] == pytest.approx(factor * np.mean(energies[site.name]), rel=1e-5), site.name
        assert row["fisher"] == pytest.approx(factor * fisher[site.name] / examples, rel=1e-4), site.name
        assert 0 < row["coherence"] <= 1


def test_probe_leaves_base_frozen_and_gradient_free(batches):
    model = tiny_model("gpt2")
    model.train()
    model.requires_grad_(False)
    probe(model, find_sites(model), batches)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert model.training  # the caller's mode is restored, and the input-grad hook removed
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad is False
    model.requires_grad_(True)  # a caller's trainable flags are restored, and still no weight gradient is formed
    probe(model, find_sites(model), batches)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_probe_is_deterministic_and_leaves_the_rng_alone(batches):
    model = tiny_model("mistral")
    sites = find_sites(model)
    torch.manual_seed(123)
    first = probe(model, sites, batches, ProbeSettings(seed=5)).scores
    after = torch.rand(1)
    torch.manual_seed(123)
    second = probe(model, sites, batches, ProbeSettings(seed=5)).scores
    assert torch.equal(after, torch.rand(1))
    assert first.equals(second)


def test_gradient_checkpointing_keeps_the_scores(batches):
    model = tiny_model("llama")
    sites = find_sites(model)
    plain = probe(model, sites, batches).scores
    checkpointed = probe(model, sites, batches, ProbeSettings(checkpointing=True)).scores
    for col in ("page", "page_sampled", "grad_energy", "fisher"):
        np.testing.assert_allclose(checkpointed[col], plain[col], rtol=1e-5)


def test_token_loss_matches_transformers_loss():
    for family in FAMILIES:
        model = tiny_model(family)
        batch = random_batch(4)
        ours = token_loss(model, batch)
        theirs = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        assert float(ours) == pytest.approx(float(theirs), rel=1e-5), family


def test_unsupported_init_is_refused():
    from placement.errors import PlacementError

    with pytest.raises(PlacementError, match="init_lora_weights"):
        ProbeSettings(init_lora_weights="gaussian").check()


def _page_opt_oracle(model, site, batch, r, alpha):
    """||grad lora_B||^2 of a real PEFT LoRA whose lora_A is V_r^T / sqrt(3), V_r the top-r right singular vectors of
    dL/dW in nn.Linear layout (a GPT-2 Conv1D gradient transposed first)."""
    from transformers.pytorch_utils import Conv1D

    probe_model = copy.deepcopy(model)
    module = probe_model.get_submodule(site)
    module.weight.requires_grad_(True)
    token_loss(probe_model, batch).backward()
    grad = module.weight.grad.double()
    grad = grad.t() if isinstance(module, Conv1D) else grad
    top = torch.linalg.svd(grad, full_matrices=False).Vh[:r]
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(target_modules=[site], r=r, lora_alpha=alpha))
    layer = peft_model.base_model.model.get_submodule(site)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_((top / 3 ** 0.5).float())
    token_loss(peft_model.base_model.model, batch).backward()
    return float(layer.lora_B["default"].weight.grad.double().pow(2).sum())


@pytest.mark.parametrize("family", ["llama", "phi3", "gpt2"])
def test_page_opt_equals_peft_with_a_on_the_top_singular_subspace(family):
    model, batch = tiny_model(family), random_batch(1)
    sites = find_sites(model)
    result = probe(model, sites, [batch], ProbeSettings(r=4, alpha=8, spectrum_k=8)).scores.set_index("site")
    for site in sites[:3] + sites[-2:]:
        oracle = _page_opt_oracle(model, site.name, batch, 4, 8)
        assert oracle > 0 and result.loc[site.name, "page_opt"] == pytest.approx(oracle, rel=1e-4), site.name
        assert result.loc[site.name, "page_opt"] >= result.loc[site.name, "page"]


def test_spectrum_is_the_mean_of_each_batchs_and_the_fast_probe_keeps_none(batches):
    model = tiny_model("qwen2")
    sites = find_sites(model)[:4]
    both = probe(model, sites, batches[:2], ProbeSettings(spectrum_k=6))
    each = [probe(model, sites, [b], ProbeSettings(spectrum_k=6)).spectrum for b in batches[:2]]
    np.testing.assert_allclose(both.spectrum, (each[0] + each[1]) / 2, rtol=1e-6)
    assert both.spectrum.shape == (4, 6) and (np.diff(both.spectrum, axis=1) <= 1e-12).all()  # descending
    fast = probe(model, sites, batches[:2], ProbeSettings(mode="fast", spectrum_k=6))
    assert fast.spectrum is None and fast.scores["page_opt"].isna().all()
