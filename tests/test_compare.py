"""Comparison arms on a tiny model: every arm a plan, same data for all, a table with its floor rows."""
import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from peft import PeftModel

from placement import data as data_mod
from placement.train import evaluate as ev
from placement.study.compare import TABLE_COLUMNS, Arm, CompareSettings, parse_arms, run_compare
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


@pytest.mark.slow
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
    assert rows.loc["all-linear", "lr"] == TrainSettings().lr
    on_disk = pd.read_csv(out / "comparison.csv")
    assert list(on_disk.arm) == list(table.arm)
    for name in ("comparison.md", "comparison.json", "curves.png", "base_predictions.csv"):
        assert (out / name).stat().st_size > 0
    metrics = json.loads((out / "arms" / "dominant" / "metrics.json").read_text())
    sweep = metrics["lr_sweep"]
    # a two-rate grid always has its best at an edge: one rate past it is tried and the run is flagged
    assert metrics["lr_at_edge"] is True and len(sweep) == 3
    assert {1e-3, 1e-2} < {s["lr"] for s in sweep} and ({1e-4} | {1e-1}) & {s["lr"] for s in sweep}
    assert rows.loc["dominant", "lr"] == min(sweep, key=lambda s: s["val_loss"])["lr"]
    assert rows.loc["dominant", "val_loss"] == pytest.approx(min(s["val_loss"] for s in sweep))
    # one seed: Wilson intervals over the test questions, McNemar against the first arm
    assert (rows.loc["dominant":, "exact_match_lo"] <= rows.loc["dominant":, "exact_match"]).all()
    assert pd.isna(rows.loc["dominant", "p_exact_match"]) and rows.loc["all-linear", "p_exact_match"] <= 1
    assert rows.loc["all-linear", "p_eval_loss"] <= 1 and rows.loc["base", "eval_loss_lo"] < rows.loc["base", "eval_loss"]
    predictions = pd.read_csv(out / "arms" / "all-linear" / "predictions.csv")
    assert {"correct", "loss"} <= set(predictions.columns) and predictions["loss"].notna().all()


def test_seeds_give_intervals_and_resume_keeps_finished_arms(make_plan, tmp_path):
    model, tokenizer = tiny_model("llama", num_hidden_layers=2).requires_grad_(False), tiny_tokenizer()
    base = make_plan(model, Strategy("dominant"))
    splits = data_mod.task_splits(boolean_examples(30), None, test=5, validation=3, seed=0)
    settings = CompareSettings(parse_arms("dominant,ffn"), TrainSettings(steps=2, batch_size=4, max_length=48),
                               seeds=2, max_new_tokens=4)
    first = run_compare(model, tokenizer, base, splits, settings, tmp_path, log=lambda line: None).table
    rows = first.set_index("arm")
    assert rows.loc["ffn", "seeds"] == 2 and (tmp_path / "arms" / "ffn" / "seed-1" / "metrics.json").is_file()
    # two seeds give no interval over seeds, and the table says so; the t-test over seeds is the primary test
    assert pd.isna(rows.loc["ffn", "eval_loss_lo"]) and rows.loc["ffn", "interval"] == "none"
    assert rows.loc["ffn", "p_eval_loss_test"] == "t" and rows.loc["ffn", "p_eval_loss_2_test"] == "boot"
    from placement.study.compare import formatted_table
    assert formatted_table(first).set_index("arm").loc["ffn", "held-out loss [95%]"].endswith("[none: 2 seeds]")
    kept = []
    again = run_compare(model, tokenizer, base, splits, replace(settings, resume=True), tmp_path, log=kept.append).table
    assert sum("kept from the earlier run" in line for line in kept) == 4
    pd.testing.assert_frame_equal(again.drop(columns=["sec_per_step"]), first.drop(columns=["sec_per_step"]))
    changed = []
    run_compare(model, tokenizer, base, splits, replace(settings, resume=True, train=replace(settings.train, steps=3)),
                tmp_path, log=changed.append)
    assert not any("kept" in line for line in changed)  # other settings: every arm is trained again


def test_markdown_marks_differences_that_are_not_significant():
    from placement.study.compare import formatted_table

    table = pd.DataFrame([{"arm": "a", "sites": 1, "r": 8, "trainable_params": 10, "params_pct": 1.0, "lr": 1e-3,
                           "lr_at_edge": True, "seeds": 1, "eval_loss": 1.0, "eval_loss_lo": 0.9, "eval_loss_hi": 1.1,
                           "val_loss": 1.0, "exact_match": 0.5, "exact_match_lo": 0.4, "exact_match_hi": 0.6,
                           "balanced_accuracy": None, "p_exact_match": 0.0074, "p_eval_loss": 0.3,
                           "sec_per_step": 1.0, "peak_mem_mb": 10, "train_loss_last": 1.0}])
    shown = formatted_table(table).iloc[0]
    assert shown["exact match [95%]"] == "50.0% [40.0%, 60.0%]" and shown["p exact"] == "0.0074"
    assert shown["p loss"] == "0.3 n.s." and shown["lr"] == "0.001 (edge)"
    assert formatted_table(table.assign(p_eval_loss=0.0)).iloc[0]["p loss"] == "<0.001"


@pytest.mark.slow
def test_every_arm_sees_the_same_first_batch(compared):
    # B starts at zero, and the first step runs at learning rate 0 under warm-up: every arm's first loss is the
    # base model's loss on the first batch, which only holds if every arm trains on the same batches.
    _, comparison, _, _ = compared
    firsts = {label: losses[0] for label, losses in comparison.curves.items()}
    assert max(firsts.values()) - min(firsts.values()) < 1e-5, firsts


@pytest.mark.slow
def test_arm_adapters_load_with_peft(compared):
    out, _, _, splits = compared
    folder = out / "arms" / "top-2-r8"
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), folder)
    assert loaded.peft_config["default"].r == 8
    assert len(loaded.peft_config["default"].target_modules) == 2
    predictions = pd.read_csv(folder / "predictions.csv")
    assert len(predictions) == len(splits[2])


@pytest.mark.slow
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




@pytest.mark.slow
def test_cli_train_and_compare(invoke, model_dir, profile_dir, tmp_path):
    trained = invoke("train", "--plan", profile_dir, "--model", model_dir, "--data", "builtin:arithmetic", "--steps",
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


@pytest.mark.slow
def test_the_sweep_tries_the_rates_of_lr_grid(invoke, model_dir, tmp_path):
    swept = invoke("compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms", "dominant",
                   "--lr-sweep", "--lr-grid", "2e-3,2e-2", "--sweep-steps", "1", "--steps", "1", "--batch-size", "4",
                   "--batches", "1", "--test", "4", "--validation", "4", "--max-new-tokens", "2",
                   "--out", tmp_path / "c", "--quiet")
    assert swept.exit_code == 0, swept.output
    metrics = json.loads((tmp_path / "c" / "arms" / "dominant" / "metrics.json").read_text())
    assert [r["lr"] for r in metrics["lr_sweep"]][:2] == [2e-3, 2e-2] and metrics["lr"] in {2e-4, 2e-3, 2e-2, 2e-1}


@pytest.mark.parametrize("args,words", [
    (["compare", "--arms", "dominat"], "unknown arm"),
    (["compare", "--lr-sweep", "--validation", "0"], "validation"),
    (["compare", "--lr-sweep", "--sweep-arms", "kappa"], "not in --arms"),
    (["compare", "--lr-sweep", "--lr-grid", "1e-3,-1e-2"], "every rate must be positive"),
    (["compare", "--lr-sweep", "--lr-grid", "fast"], "not a comma-separated list"),
    (["compare", "--seeds", "0"], "--seeds 0"),
    (["compare", "--arms", "dominant,ffn", "--reference", "ffm"], "--reference ffm is not an arm"),
    (["train", "--resume"], "no checkpoint"),
    (["train", "--steps", "0"], "--steps"),
])
def test_cli_bad_training_input(invoke, model_dir, profile_dir, tmp_path, args, words):
    common = ["--model", model_dir, "--data", "builtin:arithmetic", "--out", tmp_path / "o", "--quiet",
              "--test", "4", "--batch-size", "4"]
    if args[0] == "train":
        common += ["--plan", profile_dir]
    else:
        common += ["--batches", "1"]
    result = invoke(*args, *common)
    assert result.exit_code != 0
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in result.output, result.output


@pytest.mark.parametrize("arm, words", [("budget", ["budget-P%"]), ("top-4%", ["no percentage"]),
                                        ("dominant-3", ["takes no count"]), ("top-2.5", ["whole number"]),
                                        ("budget-200%", ["at most 100%"]), ("dominant+vera", ["unknown LoRA variant", "+dora"]),
                                        ("dominant:len10", [":len", "virtual tokens"])])
def test_the_arm_grammar_refuses_what_an_arm_cannot_take(arm, words):
    with pytest.raises(PlacementError) as err:
        parse_arms(arm)
    assert all(word in str(err.value) for word in words)


def test_budget_arms_spend_a_share_of_all_linear_at_their_rank(make_plan):
    from placement.study.compare import arm_plan

    model = tiny_model("llama")
    base = make_plan(model, Strategy("dominant"))
    for label, r in (("budget-10%", base.peft["r"]), ("budget-10%:r2", 2)):
        arm = parse_arms(label)[0]
        plan = arm_plan(arm, base, model, default_k=4)
        full = base.with_strategy(Strategy("all-linear"), r=r).trainable_params
        assert plan.peft["r"] == r and 0 < plan.trainable_params <= 0.10 * full
        assert plan.trainable_params > 0.10 * full - max(s["d_in"] + s["d_out"] for s in base.sites) * r


def test_allocate_arms_spend_their_share_by_the_spectrum(make_plan):
    from placement.study.compare import arm_plan
    from placement.probe import ProbeSettings, probe
    from placement.model.sites import find_sites
    from conftest import random_batch

    model = tiny_model("llama")
    base = make_plan(model, Strategy("dominant"))
    result = probe(model, find_sites(model), [random_batch(0)], ProbeSettings(r=base.peft["r"], spectrum_k=16))
    spectrum = dict(zip(result.scores["site"], result.spectrum))
    plan = arm_plan(parse_arms("allocate-10%")[0], base, model, default_k=4, spectrum=spectrum)
    full = base.with_strategy(Strategy("all-linear")).trainable_params
    assert plan.label == "allocate-10%" and 0 < plan.trainable_params <= 0.10 * full
    assert set(plan.peft["rank_pattern"]) == set(plan.targets)
    with pytest.raises(PlacementError, match="spectrum"):
        arm_plan(parse_arms("allocate-10%")[0], base, model, default_k=4, spectrum=None)


def test_variant_arms_train_their_variant_and_the_table_says_where_the_ranking_came_from(make_plan, tmp_path):
    from placement.study.compare import compare_inputs

    model, tokenizer = tiny_model("llama", num_hidden_layers=3).requires_grad_(False), tiny_tokenizer()
    base = make_plan(model, Strategy("dominant"))
    splits = data_mod.task_splits(boolean_examples(24), None, test=4, validation=2, seed=0)
    arms, _, _ = compare_inputs("dominant,dominant+dora,top-2", splits, False, None, None, 4, variant="rslora")
    assert [a.label for a in arms] == ["dominant+rslora", "dominant+dora", "top-2+rslora"]
    settings = CompareSettings(arms, TrainSettings(steps=2, batch_size=4, max_length=48), max_new_tokens=4)
    comparison = run_compare(model, tokenizer, base, splits, settings, tmp_path, log=lambda line: None)
    write_comparison(comparison, tmp_path)
    dora = json.loads((tmp_path / "arms" / "dominant+dora" / "adapter_config.json").read_text())
    rslora = json.loads((tmp_path / "arms" / "dominant+rslora" / "adapter_config.json").read_text())
    assert dora["use_dora"] and not dora["use_rslora"] and rslora["use_rslora"] and not rslora["use_dora"]
    rows = comparison.table.set_index("arm")
    assert rows.loc["dominant+dora", "trainable_params"] == rows.loc["dominant+rslora", "trainable_params"] + \
        base.sites[0]["d_out"]
    assert "default init" in (tmp_path / "comparison.md").read_text()


def test_an_ia3_arm_trains_peft_ia3_on_the_same_data(make_plan, tmp_path):
    from peft import PeftModel

    model, tokenizer = tiny_model("llama", num_hidden_layers=3).requires_grad_(False), tiny_tokenizer()
    base = make_plan(model, Strategy("dominant"))
    splits = data_mod.task_splits(boolean_examples(24), None, test=4, validation=2, seed=0)
    settings = CompareSettings(parse_arms("dominant,ia3"), TrainSettings(steps=2, batch_size=4, max_length=48),
                               max_new_tokens=4)
    comparison = run_compare(model, tokenizer, base, splits, settings, tmp_path, log=lambda line: None)
    rows = comparison.table.set_index("arm")
    ia3_sites = [s for s in base.sites if s["role"] in ("k", "v", "down")]
    assert rows.loc["ia3", "sites"] == len(ia3_sites)
    assert rows.loc["ia3", "trainable_params"] == sum(s["d_out"] if s["role"] != "down" else s["d_in"]
                                                     for s in ia3_sites)
    config = json.loads((tmp_path / "arms" / "ia3" / "adapter_config.json").read_text())
    assert config["peft_type"] == "IA3"
    loaded = PeftModel.from_pretrained(tiny_model("llama", num_hidden_layers=3), tmp_path / "arms" / "ia3")
    assert sum(p.numel() for n, p in loaded.named_parameters() if "ia3_l" in n) == rows.loc["ia3", "trainable_params"]
    with pytest.raises(PlacementError, match="not a LoRA"):
        parse_arms("ia3+dora")


def test_an_interval_over_few_seeds_stays_within_what_the_measure_can_take():
    from placement.study.stats import arm_interval

    grid = np.zeros((3, 4))
    lo, hi, method = arm_interval(grid, [0.0, 0.01, 0.33], binary=True, top=1.0)
    assert method == "t" and lo == 0.0 and 0.33 < hi <= 1.0
    lo, hi, _ = arm_interval(grid, [0.2, 0.21, 2.9], binary=False)
    assert lo == 0.0 and hi > 2.9
    lo, _, _ = arm_interval(grid, [0.3, 0.31, 0.32], binary=True, top=1.0)
    assert lo == pytest.approx(0.31 - 4.303 * 0.01 / 3**0.5, abs=1e-3)


def test_a_learning_curve_from_one_run_matches_the_shorter_run_and_resumes(make_plan, tmp_path):
    """--eval-at: each run is evaluated part-way. Under a constant rate after a fixed warm-up the adapter at step 2
    of a 4-step run is the adapter a 2-step run ends with, so their test results agree question by question."""
    model, tokenizer = tiny_model("llama", num_hidden_layers=2).requires_grad_(False), tiny_tokenizer()
    base = make_plan(model, Strategy("dominant"))
    splits = data_mod.task_splits(boolean_examples(30), None, test=5, validation=3, seed=0)
    train = TrainSettings(steps=4, batch_size=4, max_length=48, lr=3e-2, warmup_steps=1, schedule="constant")
    settings = CompareSettings(parse_arms("ffn"), train, seeds=2, max_new_tokens=4, eval_at=(2,))
    long = run_compare(model, tokenizer, base, splits, settings, tmp_path / "long", log=lambda line: None)
    short = run_compare(model, tokenizer, base, splits, replace(settings, eval_at=None, train=replace(train, steps=2)),
                        tmp_path / "short", log=lambda line: None)
    curve = long.steps.set_index("step")
    assert list(curve.index) == [2, 4] and set(long.steps["arm"]) == {"ffn"} and (curve["seeds"] == 2).all()
    at_two = short.table.set_index("arm").loc["ffn"]
    assert curve.loc[2, "eval_loss"] == pytest.approx(at_two["eval_loss"], rel=1e-5)
    assert curve.loc[4, "eval_loss"] == pytest.approx(long.table.set_index("arm").loc["ffn", "eval_loss"])
    assert curve.loc[4, "eval_loss"] != pytest.approx(curve.loc[2, "eval_loss"])
    for seed in (0, 1):
        mid = pd.read_csv(tmp_path / "long" / "arms" / "ffn" / f"seed-{seed}" / "predictions-step-2.csv")
        end = pd.read_csv(tmp_path / "short" / "arms" / "ffn" / f"seed-{seed}" / "predictions.csv")
        assert list(mid["output"].astype(str)) == list(end["output"].astype(str))
        np.testing.assert_allclose(mid["loss"], end["loss"], rtol=1e-5)
    write_comparison(long, tmp_path / "long", title="tiny")
    assert (tmp_path / "long" / "steps.png").stat().st_size > 0
    assert list(pd.read_csv(tmp_path / "long" / "steps.csv")["step"]) == [2, 4]
    from placement.report.html import build
    assert "Quality against training steps" in build(tmp_path / "long")
    write_comparison(short, tmp_path / "short", title="tiny")
    assert "Quality against training steps" not in build(tmp_path / "short")
    assert not (tmp_path / "short" / "steps.csv").exists()
    kept = []
    again = run_compare(model, tokenizer, base, splits, replace(settings, resume=True), tmp_path / "long",
                        log=kept.append)
    assert sum("kept from the earlier run" in line for line in kept) == 2
    pd.testing.assert_frame_equal(again.steps, long.steps)


def test_the_constant_schedule_holds_the_rate_after_its_warm_up(make_plan):
    from placement.train import train

    model, tokenizer = tiny_model("llama", num_hidden_layers=2).requires_grad_(False), tiny_tokenizer()
    plan = make_plan(model, Strategy("dominant"))
    examples = boolean_examples(16)
    run = train(model, tokenizer, plan, examples, TrainSettings(steps=5, batch_size=4, max_length=48, lr=1e-2,
                                                                warmup_steps=2, schedule="constant"))
    assert run.lrs == pytest.approx([0.0, 5e-3, 1e-2, 1e-2, 1e-2])
    assert TrainSettings(steps=40).record() == TrainSettings(steps=40, warmup_steps=None, schedule="linear").record()
    assert "schedule" not in TrainSettings().record() and TrainSettings(schedule="constant").record()["schedule"]
