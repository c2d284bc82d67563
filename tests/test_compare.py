"""Comparison arms on a tiny model: every arm a plan, same data for all, a table with its floor rows."""
import json

import pandas as pd
import pytest
import torch
from peft import PeftModel

from placement import data as data_mod
from placement import evaluate as ev
from placement.compare import TABLE_COLUMNS, Arm, CompareSettings, parse_arms, run_compare
from placement.errors import PlacementError
from placement.plan import Strategy
from placement.report import write_comparison
from placement.train import TrainSettings
from tiny import tiny_model, tiny_tokenizer


def test_parse_arms():
    arms = parse_arms("dominant, all-linear,top-4,last-2,kappa,snr-3,dominant:r64,random-1")
    assert [a.label for a in arms] == ["dominant", "all-linear", "top-4", "last-2", "kappa", "snr-3",
                                       "dominant:r64", "random-1"]
    assert arms[2] == Arm("top-4", "top-k", 4, None) and arms[3] == Arm("last-2", "last-k", 2, None)
    assert arms[5].k == 3 and arms[4].k is None and arms[6].r == 64


@pytest.mark.parametrize("spec,words", [("dominat", "unknown arm"), ("top-0", "nothing"), ("dominant,dominant", "twice"),
                                        ("dominant:r0", "rank 0"), (" , ", "no arm")])
def test_parse_arms_errors(spec, words):
    with pytest.raises(PlacementError, match=words):
        parse_arms(spec)


def boolean_examples(n):
    records = [{"instruction": f"Is {i} even?", "input": "", "output": f"the correct answer is {str(i % 2 == 0).lower()}",
                "answer": str(i % 2 == 0).lower()} for i in range(n)]
    return data_mod.to_examples(records)


@pytest.fixture(scope="module")
def compared(make_plan, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    model, tokenizer = tiny_model("llama", num_hidden_layers=3).requires_grad_(False), tiny_tokenizer()  # as load() gives it
    base = make_plan(model, Strategy("dominant"))
    splits = data_mod.task_splits(boolean_examples(40), None, test=6, validation=4, seed=0)
    settings = CompareSettings(parse_arms("dominant,all-linear,top-2:r8,kappa-2,snr-2"),
                               TrainSettings(steps=3, batch_size=4, max_length=48), lr_sweep=True,
                               sweep_arms=["dominant"], lrs=(1e-3, 1e-2), max_new_tokens=6)
    comparison = run_compare(model, tokenizer, base, splits, settings, out, log=lambda line: None)
    write_comparison(comparison, out, title="tiny")
    return out, comparison, model, splits


def test_table_rows_and_columns(compared):
    out, comparison, _, _ = compared
    table = comparison.table
    assert list(table.columns) == TABLE_COLUMNS
    assert list(table.arm) == ["base", "majority", "dominant", "all-linear", "top-2:r8", "kappa-2", "snr-2"]
    rows = table.set_index("arm")
    assert rows.loc["all-linear", "params_pct"] == pytest.approx(100)
    assert rows.loc["dominant", "sites"] == 1 and rows.loc["kappa-2", "sites"] == 2 and rows.loc["snr-2", "sites"] == 2
    assert rows.loc["dominant", "trainable_params"] < rows.loc["top-2:r8", "trainable_params"]
    assert rows.loc["majority", "balanced_accuracy"] == pytest.approx(0.5)
    assert comparison.kind == "boolean"
    assert rows.loc["dominant", "lr"] in (1e-3, 1e-2)
    assert rows.loc["all-linear", "lr"] == TrainSettings().lr
    on_disk = pd.read_csv(out / "comparison.csv")
    assert list(on_disk.arm) == list(table.arm)
    for name in ("comparison.md", "comparison.json", "curves.png", "base_predictions.csv"):
        assert (out / name).stat().st_size > 0
    sweep = json.loads((out / "arms" / "dominant" / "metrics.json").read_text())["lr_sweep"]
    assert [s["lr"] for s in sweep] == [1e-3, 1e-2]
    assert rows.loc["dominant", "val_loss"] == pytest.approx(min(s["val_loss"] for s in sweep))


def test_every_arm_sees_the_same_first_batch(compared):
    # B starts at zero, and the first step runs at learning rate 0 under warm-up: every arm's first loss is the
    # base model's loss on the first batch, which only holds if every arm trains on the same batches.
    _, comparison, _, _ = compared
    firsts = {label: losses[0] for label, losses in comparison.curves.items()}
    assert max(firsts.values()) - min(firsts.values()) < 1e-5, firsts


def test_arm_adapters_load_with_peft(compared):
    out, _, _, splits = compared
    folder = out / "arms" / "top-2-r8"
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), folder)
    assert loaded.peft_config["default"].r == 8
    assert len(loaded.peft_config["default"].target_modules) == 2
    predictions = pd.read_csv(folder / "predictions.csv")
    assert len(predictions) == len(splits[2])


def test_base_model_is_left_untouched(compared):
    _, _, model, _ = compared
    assert not any("lora_" in name for name, _ in model.named_parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_mean_loss_weighs_every_token_the_same():
    model, tokenizer = tiny_model("llama"), tiny_tokenizer()
    examples = data_mod.to_examples(data_mod.arithmetic_records(5, 0))
    whole = ev.mean_loss(model, tokenizer, examples, batch_size=5, max_length=48)
    parts = [(ev.mean_loss(model, tokenizer, [e], batch_size=1, max_length=48),
              data_mod.eval_batches(tokenizer, [e], batch_size=1, max_length=48)[0].target_tokens()) for e in examples]
    assert whole == pytest.approx(sum(l * n for l, n in parts) / sum(n for _, n in parts), rel=1e-5)


def test_generation_stops_at_end_of_turn():
    tokenizer = tiny_tokenizer()
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in ev.stop_ids(tokenizer)
    model = tiny_model("llama")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():  # make the model always predict end-of-turn
        model.lm_head.weight.zero_()
        model.lm_head.weight[im_end] = 1.0
        model.model.norm.weight.fill_(1.0)
        model.model.norm.weight.add_(0)
    examples = data_mod.to_examples(data_mod.arithmetic_records(3, 0))
    outputs = ev.generate(model, tokenizer, examples, max_new_tokens=8)
    assert outputs == ["", "", ""] or all(len(o) < 8 for o in outputs)




@pytest.fixture(scope="module")
def plan_dir(invoke, model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile")
    profile = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--batches", "1", "--batch-size",
                  "4", "--out", out, "--quiet")
    assert profile.exit_code == 0, profile.output
    return out


def test_cli_train_and_compare(invoke, model_dir, plan_dir, tmp_path):
    trained = invoke("train", "--plan", plan_dir, "--model", model_dir, "--data", "builtin:arithmetic", "--steps",
                  "3", "--batch-size", "4", "--test", "4", "--validation", "0", "--max-new-tokens", "4", "--merge",
                  "--out", tmp_path / "t", "--quiet", "--json")
    assert trained.exit_code == 0, trained.output
    metrics = json.loads(trained.output)
    assert metrics["steps"] == 3 and metrics["exact_match"] is not None
    assert (tmp_path / "t" / "merged" / "config.json").is_file()
    assert not (tmp_path / "t" / "checkpoint").exists()
    compared = invoke("compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms", "dominant,attn-qv",
                   "--steps", "2", "--batch-size", "4", "--batches", "1", "--test", "4", "--validation", "4",
                   "--max-new-tokens", "4", "--out", tmp_path / "c", "--quiet", "--json")
    assert compared.exit_code == 0, compared.output
    rows = json.loads(compared.output)["rows"]
    assert [r["arm"] for r in rows] == ["base", "dominant", "attn-qv"]
    assert (tmp_path / "c" / "profile" / "heatmap.png").is_file()


@pytest.mark.parametrize("args,words", [
    (["compare", "--arms", "dominat"], "unknown arm"),
    (["compare", "--lr-sweep", "--validation", "0"], "validation"),
    (["compare", "--lr-sweep", "--sweep-arms", "kappa"], "not in --arms"),
    (["train", "--resume"], "no checkpoint"),
    (["train", "--steps", "0"], "--steps"),
])
def test_cli_bad_training_input(invoke, model_dir, plan_dir, tmp_path, args, words):
    common = ["--model", model_dir, "--data", "builtin:arithmetic", "--out", tmp_path / "o", "--quiet",
              "--test", "4", "--batch-size", "4"]
    if args[0] == "train":
        common += ["--plan", plan_dir]
    else:
        common += ["--batches", "1"]
    result = invoke(*args, *common)
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.output, result.output
