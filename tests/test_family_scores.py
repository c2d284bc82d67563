"""Each identity family's init-gradient score equals the energy of its parameter's first gradient in the family's own
implementation, all candidates inserted at once (they start as the identity): PEFT's IA3 `ia3_l.grad`, and our
bottleneck's `up.weight.grad`; and the bottleneck adapter round-trips through its files."""
import copy

import pytest
import torch
from peft import IA3Config, get_peft_model

from conftest import random_batch
from placement.errors import PlacementError
from placement.families import bottleneck as bn
from placement.families import ia3
from placement.model.loss import token_loss
from placement.probe.families import family_scores
from tiny import tiny_model

FAMILIES = ["llama", "gpt2", "phi3", "qwen2"]


def batches():
    return [random_batch(seed) for seed in range(2)]


@pytest.mark.parametrize("family", FAMILIES)
def test_ia3_score_is_peft_ia3_l_grad_energy(family):
    model = tiny_model(family)
    scores = family_scores(model, batches(), ["ia3"]).set_index("site")["page"]
    sites = ia3.ia3_sites(model)
    rows = [s.to_dict() | {"site": s.name} for s in sites]
    peft_model = get_peft_model(copy.deepcopy(model), ia3.ia3_config(ia3.ia3_kwargs(rows)))
    expected = {s.name: 0.0 for s in sites}
    for batch in batches():
        peft_model.zero_grad()
        token_loss(peft_model.base_model.model, batch).backward()
        for s in sites:
            grad = peft_model.base_model.model.get_submodule(s.name).ia3_l["default"].grad
            expected[s.name] += float(grad.double().pow(2).sum()) / len(batches())
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, rel=1e-4), name
    assert max(expected.values()) > 0


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("placement", ["series", "parallel"])
def test_bottleneck_score_is_the_up_projections_first_gradient_energy(family, placement):
    model = tiny_model(family)
    name = f"{placement}-bn"
    scores = family_scores(model, batches(), [name], width_factor=4, seed=3).set_index("site")
    sites = [s.name for s in bn.bottleneck_sites(model, placement)]
    adapted = bn.apply(copy.deepcopy(model), bn.BottleneckConfig(sites, placement, reduction_factor=4), seed=3)
    expected = {s: 0.0 for s in sites}
    for batch in batches():
        adapted.zero_grad()
        token_loss(adapted, batch).backward()
        for s in sites:
            grad = adapted.get_submodule(s).adapter.up.weight.grad
            expected[s] += float(grad.double().pow(2).sum()) / len(batches())
    for s, value in expected.items():
        assert scores.loc[s, "page"] == pytest.approx(value, rel=1e-4), s
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert trainable == scores["params"].sum()


def test_bottleneck_starts_as_the_identity_and_round_trips(tmp_path):
    model = tiny_model("llama")
    batch = random_batch(0)
    with torch.no_grad():
        before = model(input_ids=batch.input_ids).logits
    sites = [s.name for s in bn.bottleneck_sites(model, "series")]
    config = bn.BottleneckConfig(sites, "series", width=3, activation="tanh")
    adapted = bn.apply(copy.deepcopy(model), config, seed=1)
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=batch.input_ids).logits, before, atol=1e-6)
        for p in adapted.parameters():
            if p.requires_grad:
                p.add_(0.01 * torch.randn_like(p))
        trained = adapted(input_ids=batch.input_ids).logits
    bn.save(adapted, config, tmp_path)
    loaded = bn.load(copy.deepcopy(model), tmp_path)
    with torch.no_grad():
        assert torch.allclose(loaded(input_ids=batch.input_ids).logits, trained, atol=1e-6)
    assert not torch.allclose(trained, before)


def test_bottleneck_refusals():
    model = tiny_model("llama")
    with pytest.raises(PlacementError, match="width 0"):
        bn.apply(model, bn.BottleneckConfig(["model.layers.0.mlp.down_proj"], "series", reduction_factor=64))
    with pytest.raises(PlacementError, match="unknown adapter family"):
        family_scores(model, batches(), ["prefix-tuning"])


def test_profile_scores_the_families_it_is_asked_for(invoke, model_dir, tmp_path):
    import pandas as pd

    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--batches", "2",
                    "--batch-size", "2", "--max-length", "48", "--families", "lora,ia3,parallel-bn,prefix", "--quiet",
                    "--out", tmp_path / "p")
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(tmp_path / "p" / "family_scores.csv")
    assert list(frame["family"].unique()) == ["lora", "ia3", "parallel-bn", "prefix"]
    for family, rows in frame.groupby("family"):
        assert sorted(rows["rank"]) == list(range(1, len(rows) + 1))
        assert rows["share"].sum() == pytest.approx(1.0)
    assert {"heatmap_ia3.png", "heatmap_parallel-bn.png", "families.png"} <= {p.name for p in (tmp_path / "p").iterdir()}


def test_unknown_family_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--families", "lora,adalora",
                    "--out", tmp_path / "p")
    assert_one_line_error(result, "adalora", "ia3")
    assert not (tmp_path / "p").exists()


def test_identity_families_ride_along_the_lora_probe_with_the_same_scores():
    from placement.model.load import ModelSource
    from placement.probe import ProbeSettings
    from placement.study.profile import profile_batches

    model = tiny_model("llama")
    shared = profile_batches(model, ModelSource("m", "m"), batches(), data="x", batch_size=3, max_length=12,
                             settings=ProbeSettings(), bootstrap=0, families=("lora", "ia3", "parallel-bn"))
    alone = family_scores(model, batches(), ["ia3", "parallel-bn"]).set_index(["family", "site"])["page"]
    both = shared.families.set_index(["family", "site"])["page"]
    for key, value in alone.items():
        assert both[key] == pytest.approx(value, rel=1e-6), key
    lora = shared.families[shared.families["family"] == "lora"].set_index("site")["page"]
    assert lora.to_dict() == pytest.approx(shared.ranked.set_index("site")["page"].to_dict())


def test_virtual_token_families_score_peft_own_first_gradients():
    from peft import AdaptionPromptConfig, PrefixTuningConfig, get_peft_model

    from placement.probe.prompts import prompt_scores

    model = tiny_model("llama")
    scores = prompt_scores(model, batches(), ["prompt", "prefix", "llama-adapter"], length=3)
    prefix = scores[scores.family == "prefix"]
    assert list(prefix["layer"]) == [0, 1]
    copied = copy.deepcopy(model)
    torch.manual_seed(0)  # the virtual tokens' init, as prompt_scores draws it
    peft_model = get_peft_model(copied, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))
    total = 0.0
    for batch in batches():
        peft_model.zero_grad()
        peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
        total += float(peft_model.prompt_encoder["default"].embedding.weight.grad.double().pow(2).sum())
    assert prefix["page"].sum() == pytest.approx(total / 2, rel=1e-5)  # the layers' slices partition the prefix
    copied = copy.deepcopy(model)
    torch.manual_seed(0)
    gated = get_peft_model(copied, AdaptionPromptConfig(task_type="CAUSAL_LM", adapter_len=3, adapter_layers=2))
    gates = {}
    for batch in batches():
        gated.zero_grad()
        gated(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss.backward()
        for name, p in gated.named_parameters():
            if name.endswith("adaption_gate"):
                gates[name] = gates.get(name, 0.0) + float(p.grad.double().pow(2).sum()) / 2
            if name.endswith("adaption_prompt"):
                assert p.grad is None or not p.grad.any()  # behind a zero gate the prompt gets no gradient
    ours = scores[scores.family == "llama-adapter"]["page"].tolist()
    assert ours == pytest.approx(list(gates.values()), rel=1e-5) and min(ours) > 0


def test_virtual_token_refusals():
    from placement.probe.prompts import prompt_scores

    with pytest.raises(PlacementError, match="does not support qwen2"):
        prompt_scores(tiny_model("qwen2"), batches(), ["llama-adapter"])
    with pytest.raises(PlacementError, match="longer than --max-length"):
        prompt_scores(tiny_model("llama"), batches(), ["prompt"], length=20, max_length=12)
    with pytest.raises(PlacementError, match="no virtual token"):
        prompt_scores(tiny_model("llama"), batches(), ["prefix"], length=0)
