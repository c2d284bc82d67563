"""The registry of scores: its rules, every list of score names derived from it, act_norm against a hand loop, and a
score registered from outside the package reaching scores.csv and the report."""
import pandas as pd
import pytest
import torch

import placement
from placement.errors import PlacementError
from placement.model.sites import find_sites, modules_by_name
from placement.probe import ProbeSettings, probe
from placement.probe.act_norm import act_norm_scores
from placement.probe.registry import (SCORES, Score, ScoreContext, compute_scores, get_score, profile_names,
                                      ranking_names, register_score, score_names)
from tiny import tiny_model


@pytest.fixture
def scratch_score():
    """Registers scores for one test and takes them out again."""
    added = []

    def add(score):
        added.append(score.name)
        return placement.register_score(score)

    yield add
    for name in added:
        SCORES.pop(name, None)


def test_the_registry_refuses_duplicates_and_names_the_known_scores(scratch_score):
    with pytest.raises(PlacementError, match="registered already"):
        register_score(Score("page", "again", "probe"))
    with pytest.raises(PlacementError) as err:
        get_score("no_such_score")
    assert "page" in str(err.value) and "act_norm" in str(err.value)
    with pytest.raises(PlacementError, match="needs"):
        Score("x", "x", "gpu")
    with pytest.raises(PlacementError, match="compute"):
        Score("x", "x", "weights")  # nothing computes it
    with pytest.raises(PlacementError, match="lower is better"):
        Score("x", "x", "weights", lambda ctx: {}, higher_is_better=False)
    scratch_score(Score("zeros", "zero everywhere", "forward", lambda ctx: {s.name: 0.0 for s in ctx.sites}))
    assert "zeros" in score_names("forward") and "zeros" not in score_names("weights")
    assert score_names()[0] == "page" and "zeros" in ranking_names() and "zeros" in profile_names()


def test_the_built_in_scores_are_registered_with_their_needs():
    assert {"page", "page_sampled", "grad_energy", "fisher", "page_opt", "coherence", "page_se"} <= \
        set(score_names("probe"))
    assert set(score_names("weights")) >= {"kappa", "snr", "params"} and "act_norm" in score_names("forward")
    assert not get_score("kappa").higher_is_better and not get_score("params").energy
    assert all(SCORES[n].help and "\n" not in SCORES[n].help for n in SCORES)
    # order-only figures are not rankings: they are computed where used, not in every profile
    assert {"kappa", "snr", "params", "coherence"}.isdisjoint(ranking_names())
    # training scores (a run of their own) only when they rank
    assert profile_names("page") == [n for n in ranking_names() if SCORES[n].needs not in ("probe", "training")]
    assert "lookahead" in profile_names("lookahead") and "lora_drop" not in profile_names("lookahead")


def test_every_probe_score_is_a_column_the_probe_writes(batches):
    model = tiny_model("llama")
    result = probe(model, find_sites(model), batches[:1], ProbeSettings(spectrum_k=8))
    assert set(score_names("probe")) <= set(result.scores.columns)


def test_the_lists_of_score_names_follow_the_registry(scratch_score):
    from placement.cli import main
    from placement.study import profile, validate

    scratch_score(Score("width", "d_out", "weights", lambda ctx: {s.name: float(s.d_out) for s in ctx.sites}))
    assert "width" in profile.csv_columns() and "act_norm" in profile.csv_columns()
    assert "width" in validate.site_columns() and "act_norm" in validate.energy_scores()
    assert validate.weight_scores() == ["kappa", "snr"]
    choices = next(p for p in main.commands["profile"].params if p.name == "score").type.choices
    assert list(choices) == [n for n in ranking_names() if n != "width"]  # built before this test registered one


def test_weight_scores_match_their_formulas():
    model = tiny_model("llama")
    sites = find_sites(model)
    frame = compute_scores(ScoreContext(model, sites), ["kappa", "params"])
    weight = modules_by_name(model, sites)[sites[0].name].weight.detach().float()
    s = torch.linalg.svdvals(weight)
    assert frame["kappa"].iloc[0] == pytest.approx(float(s[0] / (s[-1] + 1e-8)), rel=1e-5)
    assert list(frame["params"]) == [s.d_in + s.d_out for s in sites]


def test_act_norm_equals_a_hand_loop_over_one_batch(batches):
    model = tiny_model("llama", initializer_range=0.3)
    sites = find_sites(model)
    batch = batches[0]
    assert (batch.attention_mask == 0).any() and (batch.labels[:, 1:] == -100).any()  # padding and prompts to skip
    got = act_norm_scores(ScoreContext(model, sites, [batch]))

    inputs = {}
    modules = modules_by_name(model, sites)
    handles = [modules[s.name].register_forward_pre_hook(
        lambda module, args, name=s.name: inputs.__setitem__(name, args[0].detach())) for s in sites]
    with torch.no_grad():
        hidden = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    for site in sites:
        x = inputs[site.name]
        if site.role in ("q", "k", "v"):  # an independent path to the attention's input: the block's own norm
            block = model.model.layers[site.layer]
            x = block.input_layernorm(hidden[site.layer]).detach()
        total, count = 0.0, 0
        for i in range(batch.labels.shape[0]):
            for t in range(batch.labels.shape[1] - 1):
                if batch.labels[i, t + 1] != -100:  # position t predicts a target token
                    total += float((x[i, t].double() ** 2).sum())
                    count += 1
        assert got[site.name] == pytest.approx(total / count, rel=1e-5), site.name
    assert len(set(got.values())) > 1


def test_a_score_registered_outside_reaches_scores_csv_validate_and_the_report(scratch_score, invoke, model_dir,
                                                                               tmp_path):
    from placement.report.html import build

    scratch_score(Score("width", "the site's output width", "weights",
                        lambda ctx: {s.name: float(s.d_out) for s in ctx.sites}))
    out = tmp_path / "profile"
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--batches", "2",
                    "--batch-size", "4", "--bootstrap", "0", "--score", "act_norm", "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(out / "scores.csv")
    assert list(scores["width"]) == list(scores["d_out"].astype(float))
    assert (scores["act_norm"] > 0).all() and scores["act_norm"].is_monotonic_decreasing  # ranked by it
    assert {"kappa", "snr"}.isdisjoint(scores.columns)  # order-only figures stay out of every profile
    agreement = pd.read_csv(out / "score_agreement.csv")
    assert {"act_norm", "width"} <= set(agreement["a"]) | set(agreement["b"])
    page = build(out)
    assert "<th>act_norm</th>" in page and "<th>width</th>" in page
