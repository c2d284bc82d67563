"""The command line on a tiny model saved to disk: outputs, JSON summaries, and one-line errors for bad input."""
import json

import pandas as pd
import pytest
from placement.plan import Plan
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tiny_model("qwen2", num_hidden_layers=3, intermediate_size=20).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_sites_json_lists_every_site(invoke, model_dir):
    result = invoke("sites", "--model", model_dir, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert len(rows) == 3 * 7
    assert set(rows[0]) == {"site", "layer", "role", "d_in", "d_out"}
    assert rows[-1] == {"site": "model.layers.2.mlp.down_proj", "layer": 2, "role": "down", "d_in": 24, "d_out": 16}


def test_profile_writes_scores_plan_and_heatmap(profiled):
    out, summary = profiled
    scores = pd.read_csv(out / "scores.csv")
    for column in ("site", "layer", "role", "d_in", "d_out", "page", "share", "rank", "page_sampled",
                   "grad_energy", "fisher"):
        assert column in scores.columns
    assert list(scores["rank"]) == list(range(1, len(scores) + 1))
    assert scores["share"].sum() == pytest.approx(1.0)
    plan = json.loads((out / "plan.json").read_text())
    assert plan["schema"] == "placement-plan/1"
    assert plan["peft"]["target_modules"] == [scores.iloc[0]["site"]] == [summary["dominant_site"]]
    assert {"score", "mode", "draws", "r", "alpha", "seed", "batches", "batch_size", "max_length", "tokens",
            "data"} <= set(plan["probe"])
    assert plan["probe"]["r"] == 8 and plan["probe"]["alpha"] == 16 and plan["probe"]["batches"] == 2
    assert plan["model"]["fingerprint"].startswith("sha256:")
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.glob(".*"))  # no temporary files left behind
    # bootstrap over the calibration batches: an interval per site that holds its rank, and the convergence curve
    assert (scores["rank_lo"] <= scores["rank_hi"]).all() and scores["p_top"].sum() == pytest.approx(1.0)
    stability = plan["stability"]
    assert stability["bootstrap"] == 200 and 1 <= stability["top_stable_after_batches"] <= 2
    assert len(stability["convergence"]) == 2 and summary["p_top"] == stability["p_top"]
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"
    assert len(pd.read_csv(out / "convergence.csv")) == 2


def test_plan_top_k_and_peft_config(invoke, profiled, model_dir, tmp_path):
    out, _ = profiled
    result = invoke("plan", out, "--strategy", "top-k", "--k", "4", "--out", tmp_path / "top4.json",
                    "--peft-config", tmp_path / "peft", "--model", model_dir, "--json")
    assert result.exit_code == 0, result.output
    plan = Plan.load(tmp_path / "top4.json")
    scores = pd.read_csv(out / "scores.csv")
    assert set(plan.targets) == set(scores["site"][:4])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(plan.targets) and config["r"] == 8
    from_csv = invoke("plan", out / "scores.csv", "--strategy", "ffn", "--out", tmp_path / "ffn.json")
    assert from_csv.exit_code == 0, from_csv.output


def test_fast_profile_reports_page_se(invoke, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", "builtin:arithmetic", "--batches", "1",
                    "--batch-size", "2", "--fast", "--draws", "4", "--out", tmp_path / "fast", "--quiet")
    assert result.exit_code == 0, result.output
    scores = pd.read_csv(tmp_path / "fast" / "scores.csv")
    assert scores["page_se"].gt(0).all() and scores["grad_energy"].isna().all()


@pytest.mark.parametrize("args, words", [
    (["--model", "./no/such/model"], ["not found"]),
    (["--model", "no-such-alias"], ["unknown model", "smollm2-135m"]),
    (["--data", "builtin:nope"], ["unknown builtin", "arithmetic"]),
    (["--batches", "0"], ["--batches"]),
    (["--max-length", "3"], ["--max-length"]),
])
def test_profile_bad_input(invoke, assert_one_line_error, model_dir, tmp_path, args, words):
    base = {"--model": str(model_dir), "--data": "builtin:arithmetic"}
    pairs = dict(zip(args[::2], args[1::2]))
    merged = {**base, **pairs}
    flat = [x for kv in merged.items() for x in kv]
    out = tmp_path / "out"
    result = invoke("profile", *flat, "--batch-size", "2", "--out", out, "--quiet")
    assert_one_line_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("content, words", [
    ("", ["empty"]),
    ('{"question": "q", "label": 1}\n', ["question", "instruction"]),
    ("{not json\n", ["cannot read"]),
])
def test_profile_bad_data_files(invoke, assert_one_line_error, model_dir, tmp_path, content, words):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    out = tmp_path / "out"
    result = invoke("profile", "--model", model_dir, "--data", data, "--out", out, "--quiet")
    assert_one_line_error(result, *words)
    assert not out.exists()


def test_profile_missing_data_file(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("profile", "--model", model_dir, "--data", tmp_path / "none.json", "--out", tmp_path / "o")
    assert_one_line_error(result, "not found")


def test_plan_for_another_model_is_refused(invoke, assert_one_line_error, profiled, other_model_dir, tmp_path):
    out, _ = profiled
    result = invoke("plan", out, "--model", other_model_dir, "--out", tmp_path / "p.json")
    assert_one_line_error(result, "fingerprint")
    assert not (tmp_path / "p.json").exists()


def test_plan_with_missing_site_is_refused(invoke, assert_one_line_error, profiled, model_dir, tmp_path):
    out, _ = profiled
    data = json.loads((out / "plan.json").read_text())
    data["sites"][0]["site"] = "model.layers.9.mlp.down_proj"
    (tmp_path / "plan.json").write_text(json.dumps(data))
    result = invoke("plan", tmp_path, "--strategy", "dominant", "--model", model_dir, "--out", tmp_path / "p.json")
    assert_one_line_error(result, "model.layers.9.mlp.down_proj", "not in this model")
    assert not (tmp_path / "p.json").exists()


def test_corrupt_plan_is_refused(invoke, assert_one_line_error, tmp_path):
    (tmp_path / "plan.json").write_text('{"schema": "placement-plan/1", "model": ')
    result = invoke("plan", tmp_path, "--out", tmp_path / "p.json")
    assert_one_line_error(result, "not valid JSON")
    assert not (tmp_path / "p.json").exists()


def test_stability_across_tasks(invoke, model_dir, tmp_path):
    other = tmp_path / "yesno.jsonl"
    other.write_text("\n".join(json.dumps({"instruction": f"Is {i} odd?", "output": "the answer is "
                                           + str(i % 2 == 1).lower(), "answer": str(i % 2 == 1).lower()})
                               for i in range(20)))
    out = tmp_path / "stab"
    result = invoke("stability", "--model", model_dir, "--data", "builtin:arithmetic", "--data", other,
                    "--batches", "2", "--batch-size", "4", "--k", "3", "--out", out, "--quiet", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert list(summary["tasks"]) == ["arithmetic", "yesno"]
    table = pd.read_csv(out / "stability.csv")
    assert list(table.columns) == ["a", "b", "spearman", "kendall", "top1_agree", "top3_overlap"]
    assert len(table) == 1 and -1 <= table.spearman[0] <= 1 and 0 <= table.top3_overlap[0] <= 1
    assert (out / "stability.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "arithmetic" / "scores.csv").is_file() and (out / "yesno" / "plan.json").is_file()
    agreement = pd.read_csv(out / "yesno" / "score_agreement.csv")
    assert {"page", "page_sampled", "grad_energy"} <= set(agreement.a) | set(agreement.b)


def test_stability_needs_two_tasks(invoke, assert_one_line_error, model_dir, tmp_path):
    result = invoke("stability", "--model", model_dir, "--data", "builtin:arithmetic", "--out", tmp_path / "s")
    assert_one_line_error(result, "two or more")
    assert not (tmp_path / "s").exists()
