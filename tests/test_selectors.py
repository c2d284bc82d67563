"""Data-free selectors: KappaTune against PEFT's own ranking, Spectrum's SNR against a direct reading of its formula."""
import numpy as np
import pytest
import torch
from peft.helpers import find_kappa_target_modules

from placement.errors import PlacementError
from placement.plan.selectors import kappa_targets, snr_scores, snr_targets
from placement.model.sites import ROLES, find_sites, modules_by_name
from tiny import tiny_model


@pytest.fixture(scope="module")
def llama():
    model = tiny_model("llama", seed=1)
    return model, find_sites(model)


@pytest.fixture(scope="module")
def gpt2():
    model = tiny_model("gpt2", seed=2)
    return model, find_sites(model)


def model_order(sites):
    return {s.name: (s.layer, ROLES.index(s.role)) for s in sites}


def assert_valid_pick(names, sites, k):
    order = model_order(sites)
    assert len(names) == k == len(set(names))
    assert set(names) <= set(order)
    assert names == sorted(names, key=order.__getitem__)


def spectrum_snr(weight: np.ndarray) -> float:
    """Spectrum's `calculate_snr_for_layer`, written out again in float64 numpy."""
    s = np.linalg.svd(weight, compute_uv=False)
    q75, q25 = np.quantile(s, [0.75, 0.25])
    sigma = (q75 - q25) / 1.349
    n, m = weight.shape
    beta = n / m if n < m else m / n
    eps = sigma * np.sqrt((1 + np.sqrt(beta)) ** 2)
    signal = s[s > eps].sum()
    noise = s[s <= eps].sum() if (s <= eps).any() else 1.0
    return signal / noise / s[0]


@pytest.mark.parametrize("family", ["llama", "phi3"])
@pytest.mark.parametrize("k", [1, 3, 5])
def test_kappa_targets_match_peft_on_the_model(family, k):
    model = tiny_model(family, seed=3)
    sites = find_sites(model)
    names = kappa_targets(model, sites, k)
    assert_valid_pick(names, sites, k)

    ranked = find_kappa_target_modules(model, top_p=1.0, show_progress=False)["target_modules"]
    candidates = [name for name in ranked if name in model_order(sites)]
    assert len(candidates) == len(sites)
    assert set(names) == set(candidates[:k])


def test_kappa_targets_rank_conv1d_sites_by_peft_formula(gpt2):
    model, sites = gpt2
    # PEFT scans nn.Linear only, so on the model itself it ranks none of GPT-2's Conv1D sites.
    ranked = find_kappa_target_modules(model, top_p=1.0, show_progress=False)["target_modules"]
    assert not set(ranked) & set(model_order(sites))

    modules = modules_by_name(model, sites)
    kappa = {}
    for s in sites:
        values = torch.linalg.svdvals(modules[s.name].weight.detach().float())
        kappa[s.name] = (values[0] / (values[-1] + 1e-8)).item()
    expected = sorted(kappa, key=kappa.get)[:3]
    names = kappa_targets(model, sites, 3)
    assert_valid_pick(names, sites, 3)
    assert set(names) == set(expected)


def test_snr_scores_follow_spectrum_formula(llama, gpt2):
    for model, sites in (llama, gpt2):
        scores = snr_scores(model, sites)
        assert list(scores) == [s.name for s in sites]
        modules = modules_by_name(model, sites)
        for s in sites:
            expected = spectrum_snr(modules[s.name].weight.detach().double().numpy())
            assert scores[s.name] == pytest.approx(expected, rel=1e-3)


def test_snr_scores_prefer_low_rank_signal_over_noise():
    model = tiny_model("llama", seed=4, hidden_size=64, intermediate_size=96, num_attention_heads=4)
    sites = find_sites(model)
    modules = modules_by_name(model, sites)
    signal_site, noise_site = "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"
    shape = modules[signal_site].weight.shape
    g = torch.Generator().manual_seed(0)
    signal = torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
    signal += 0.01 * signal.std() * torch.randn(shape, generator=g)
    noise = torch.randn(shape, generator=g)
    noise *= signal.norm() / noise.norm()  # same Frobenius norm: the difference is structure, not scale
    with torch.no_grad():
        modules[signal_site].weight.copy_(signal)
        modules[noise_site].weight.copy_(noise)
    scores = snr_scores(model, sites)
    assert scores[signal_site] > 5 * scores[noise_site]


def test_snr_targets_cover_every_role_before_repeating_one(llama):
    model, sites = llama
    roles = {s.name: s.role for s in sites}
    scores = snr_scores(model, sites)
    n_roles = len(set(roles.values()))

    first_round = snr_targets(model, sites, n_roles)
    assert_valid_pick(first_round, sites, n_roles)
    assert {roles[n] for n in first_round} == set(roles.values())
    for name in first_round:
        same_role = [s.name for s in sites if s.role == roles[name]]
        assert scores[name] == max(scores[n] for n in same_role)

    partial = snr_targets(model, sites, 3)
    assert_valid_pick(partial, sites, 3)
    assert len({roles[n] for n in partial}) == 3
    assert set(partial) <= set(first_round)
    strongest = sorted(first_round, key=scores.get, reverse=True)[:3]
    assert set(partial) == set(strongest)

    more = snr_targets(model, sites, n_roles + 2)
    assert_valid_pick(more, sites, n_roles + 2)
    assert set(first_round) < set(more)
    counts = [list(map(roles.get, more)).count(role) for role in set(roles.values())]
    assert min(counts) == 1 and max(counts) == 2

    assert set(snr_targets(model, sites, len(sites))) == set(roles)


@pytest.mark.parametrize("selector", [kappa_targets, snr_targets])
def test_k_out_of_range_is_refused(llama, selector):
    model, sites = llama
    for k in (0, len(sites) + 1, -1):
        with pytest.raises(PlacementError, match=f"from 1 to {len(sites)}"):
            selector(model, sites, k)
    assert len(selector(model, sites, len(sites))) == len(sites)


def test_sites_of_another_model_are_refused(llama, gpt2):
    model, _ = llama
    _, other_sites = gpt2
    with pytest.raises(PlacementError, match="find_sites on this model"):
        snr_scores(model, other_sites)
    with pytest.raises(PlacementError, match="find_sites on this model"):
        kappa_targets(model, other_sites, 1)


def test_the_snr_selector_at_a_budget_is_spectrums_pick(llama):
    """`recommend`'s snr selector, given exactly the parameters of Spectrum's first round, plans those sites."""
    from placement.families.lora import lora_params
    from placement.plan.budget import pick

    model, sites = llama
    rows = [s.to_row() for s in sites]
    n_roles = len({s.role for s in sites})
    for k in (3, n_roles, n_roles + 2):
        spectrum = snr_targets(model, sites, k)
        by_site = {row["site"]: row for row in rows}
        budget = sum(lora_params(by_site[name], 8) for name in spectrum)
        assert pick("snr", rows, snr_scores(model, sites), budget, 8).targets == spectrum
