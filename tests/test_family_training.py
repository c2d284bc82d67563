"""Every adapter family trained as a comparison arm: the plan states what the adapter trains, the loss the trainer
minimises is PEFT's own (virtual tokens included), the saved adapter loads back (PeftModel.from_pretrained, or our
loader for bottlenecks) with the trained logits, resume is exact, and what a family cannot do is one clear line."""
import pytest
import torch
from peft import PeftModel

from placement import data as data_mod
from placement.study.compare import CompareSettings, arm_plan, parse_arms
from placement.errors import PlacementError
from placement.families import adapters, load
from placement.model.loss import token_loss
from placement.plan import Strategy
from placement.plan.strategies import check_arms
from placement.train import TrainSettings, train, write_run
from placement.train.run import train_and_evaluate
from tiny import tiny_model, tiny_tokenizer

ARMS = ["series-bn:rf4", "parallel-bn:rf4", "ia3", "prompt:len3", "prefix:len3", "llama-adapter-2:len3"]


def examples(n=12):
    return data_mod.to_examples(data_mod.arithmetic_records(n, 0))


def settings(**overrides):
    return TrainSettings(**(dict(steps=3, lr=1e-2, batch_size=4, max_length=48, seed=0) | overrides))


def family_plan(make_plan, model, label):
    base = make_plan(model, Strategy("dominant"))
    return arm_plan(parse_arms(label)[0], base, model, default_k=2)


def test_arm_sizes_parse():
    series, prefix, gates, lora = parse_arms("series-bn:rf16,prefix:len10,llama-adapter-4:len3,ffn:r32")
    assert (series.strategy, series.size, series.r) == ("series-bn", 16, None)
    assert (prefix.size, gates.k, gates.size) == (10, 4, 3)
    assert (lora.r, lora.size) == (32, None)


@pytest.mark.parametrize("spec,words", [
    ("ia3:r8", ["a LoRA rank", "ia3 takes no size"]), ("dominant:rf16", ["reduction factor", "takes :rN"]),
    ("series-bn:len4", ["virtual tokens", "takes :rfN"]), ("series-bn:rf0", ["reduction factor 0"]),
    ("prefix:len0", ["length 0"]), ("prompt+dora", ["not a LoRA"]), ("prefix-2", ["takes no count"]),
])
def test_arm_sizes_refused(spec, words):
    with pytest.raises(PlacementError) as err:
        parse_arms(spec)
    for word in words:
        assert word in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("label", ARMS)
def test_each_family_trains_saves_and_loads_back(make_plan, arch, label, tmp_path):
    model, tokenizer = tiny_model(arch, num_hidden_layers=3) if arch == "llama" else tiny_model(arch), tiny_tokenizer()
    plan = family_plan(make_plan, model, label)
    run = train(model, tokenizer, plan, examples(), settings())
    assert run.trainable_params == plan.trainable_params > 0
    batch = data_mod.collate([data_mod.render(tokenizer, e, 48) for e in examples(3)], 0)
    with torch.no_grad():
        trained = token_loss(run.model, batch)
    write_run(run, tmp_path, {"arm": label})
    fresh = tiny_model(arch, num_hidden_layers=3) if arch == "llama" else tiny_model(arch)
    if adapters.is_ours(run.model):
        loaded = load(fresh, tmp_path)
    else:
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path))
        assert loaded.active_peft_config.peft_type == run.model.active_peft_config.peft_type
    with torch.no_grad():
        assert torch.allclose(token_loss(loaded.eval(), batch), trained, atol=1e-5)


@pytest.mark.parametrize("label", ["prompt:len3", "prefix:len3"])
def test_loss_of_virtual_token_families_is_pefts_own(make_plan, label):
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    plan = family_plan(make_plan, model, label)
    peft_model = adapters.attach(model, plan.adapter_config(model), seed=3)
    batch = data_mod.collate([data_mod.render(tokenizer, e, 48) for e in examples(4)], 0)
    ours = token_loss(peft_model, batch)
    theirs = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert torch.allclose(ours, theirs, atol=1e-5)
    ours.backward()
    assert peft_model.prompt_encoder["default"].embedding.weight.grad.abs().sum() > 0  # the tokens learn


def test_bottleneck_resume_ends_with_the_same_adapter(make_plan, tmp_path):
    tokenizer = tiny_tokenizer()

    def adapter_after(out, stop_at=None, resume=False):
        model = tiny_model("llama")
        plan = family_plan(make_plan, model, "series-bn:rf4")

        def maybe_stop(step, loss):
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt

        run = train(model, tokenizer, plan, examples(), settings(steps=5, save_every=2), out=out, resume=resume,
                    on_step=maybe_stop)
        return adapters.tensors(run.model)

    whole = adapter_after(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        adapter_after(tmp_path / "killed", stop_at=3)
    resumed = adapter_after(tmp_path / "killed", resume=True)
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_what_a_family_cannot_do_is_refused(make_plan, tmp_path):
    with pytest.raises(PlacementError, match="LLaMA-Adapter does not support qwen2"):
        check_arms(parse_arms("llama-adapter:len4"), tiny_model("qwen2"))
    with pytest.raises(PlacementError, match="width 0"):
        check_arms(parse_arms("series-bn:rf64"), tiny_model("llama"))
    for arm, count in (("ia3-7", 6), ("parallel-bn-5", 4), ("llama-adapter-3", 2)):  # above the family's sites
        with pytest.raises(PlacementError, match=f"this model has {count}"):
            check_arms(parse_arms(arm), tiny_model("llama"))
    check_arms(parse_arms("ia3-6,parallel-bn-4,llama-adapter-2"), tiny_model("llama"))
    with pytest.raises(PlacementError, match="longer than --max-length 48"):
        CompareSettings(parse_arms("prefix:len64"), settings()).check()
    with pytest.raises(PlacementError, match="has 2"):
        family_plan(make_plan, tiny_model("llama"), "llama-adapter-5:len3")
    model = tiny_model("llama")
    plan = family_plan(make_plan, model, "series-bn:rf4")
    with pytest.raises(PlacementError, match="cannot be merged"):
        train_and_evaluate(model, tiny_tokenizer(), plan, examples(), examples(2), settings(), out=tmp_path,
                           model_name="tiny", merge=True)
    assert not any(tmp_path.iterdir())  # refused before anything is written


def test_a_family_plan_refuses_lora_options_and_applies_as_it_is(make_plan, tmp_path):
    from placement import apply

    model = tiny_model("llama")
    plan = family_plan(make_plan, model, "ia3")
    for change in (dict(r=8), dict(variant="dora")):
        with pytest.raises(PlacementError, match="not LoRA"):
            apply(model, plan, **change)
    plan.save(tmp_path / "plan.json")
    adapted = apply(model, tmp_path / "plan.json")
    assert adapted.active_peft_config.peft_type == "IA3"


@pytest.mark.slow
def test_compare_trains_other_families_on_their_own_ranking(invoke, model_dir, tmp_path):
    import json

    import pandas as pd

    out = tmp_path / "c"
    result = invoke("compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms",
                    "dominant,series-bn-2:rf4,ia3-1,prompt:len2", "--steps", "2", "--batch-size", "4",
                    "--batches", "1", "--test", "4", "--validation", "4", "--max-new-tokens", "4", "--out", out,
                    "--quiet", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["arm"]: r for r in json.loads(result.output)["rows"]}
    assert list(rows) == ["base", "dominant", "series-bn-2:rf4", "ia3-1", "prompt:len2"]
    scores = pd.read_csv(out / "profile" / "family_scores.csv")
    for family, label, k in (("series-bn", "series-bn-2-rf4", 2), ("ia3", "ia3-1", 1)):
        best = scores[scores.family == family].sort_values("page", ascending=False)["site"].head(k)
        plan = json.loads((out / "arms" / label / "plan.json").read_text())
        assert plan["family"] == family and sorted(plan["targets"]) == sorted(best)
    assert rows["ia3-1"]["sites"] == 1 and rows["prompt:len2"]["trainable_params"] == 2 * 16
    trained = invoke("train", "--plan", out / "arms" / "series-bn-2-rf4" / "plan.json", "--model", model_dir, "--data",
                     "builtin:arithmetic", "--steps", "2", "--batch-size", "4", "--test", "4", "--validation", "0",
                     "--max-new-tokens", "4", "--out", tmp_path / "t", "--quiet", "--json")
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.output)["family"] == "series-bn"
    assert json.loads((tmp_path / "t" / "adapter_config.json").read_text())["schema"] == "placement-bottleneck/1"


@pytest.mark.parametrize("arms,words", [("prefix:len300", "longer than --max-length"),
                                        ("series-bn:rf64", "width 0"), ("llama-adapter-9", "has 3")])
def test_compare_refuses_what_a_family_cannot_do_in_one_line(invoke, model_dir, tmp_path, arms, words):
    result = invoke("compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms", arms, "--batches",
                    "1", "--test", "4", "--out", tmp_path / "o", "--quiet")
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert result.exit_code != 0 and len(lines) == 1 and words in lines[0], result.output
    assert not (tmp_path / "o").exists()


def _prefix_tuned(seed=0):
    from peft import PrefixTuningConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(tiny_model("llama"), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():  # a trained prefix: far from its init, so it changes what the model says
        for p in model.prompt_encoder.parameters():
            p.copy_(3 * torch.randn_like(p))
    return model.eval()


def test_a_prefix_tuned_model_generates_with_its_prefix():
    from placement.train import evaluate as ev

    model, tokenizer = _prefix_tuned(), tiny_tokenizer()
    assert ev.drops_prefix_in_generate(model) and not ev.drops_prefix_in_generate(tiny_model("llama"))
    batch = data_mod.to_examples(data_mod.arithmetic_records(4, 0))
    input_ids, attention_mask = data_mod.left_padded_prompts(tokenizer, batch)
    with torch.no_grad():
        first = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].argmax(-1)
        without = model.get_base_model()(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1].argmax(-1)
    assert not torch.equal(first, without)  # the prefix changes the first answer token
    outputs = ev.generate(model, tokenizer, batch, max_new_tokens=3)
    assert [o[:1] for o in outputs] == [o[:1] for o in tokenizer.batch_decode(first[:, None], skip_special_tokens=True)]


def test_the_prefix_decoder_with_its_cache_gives_what_it_gives_without():
    from transformers import GenerationConfig

    from placement.train import evaluate as ev

    model, tokenizer = _prefix_tuned(1), tiny_tokenizer()
    input_ids, attention_mask = data_mod.left_padded_prompts(tokenizer, data_mod.to_examples(
        data_mod.arithmetic_records(5, 1)))
    config = GenerationConfig(max_new_tokens=6, do_sample=False, eos_token_id=ev.stop_ids(tokenizer),
                              pad_token_id=data_mod.pad_token_id(tokenizer))
    with torch.no_grad():
        cached = ev.greedy_prefix(model, input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        whole = ev.greedy_prefix(model, input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                                 use_cache=False)
    assert cached.shape[1] > input_ids.shape[1] and torch.equal(cached, whole)
