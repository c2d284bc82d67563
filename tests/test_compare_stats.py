"""Statistics over seeds and the arms that feed them: the crossed bootstrap by hand, the p floor, the seed-level
t-test against scipy, what two seeds can and cannot say, random arms that draw per seed, plan files as arms, and
the arm lists a comparison refuses."""
import dataclasses
import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from placement import data as data_mod
from placement.errors import PlacementError
from placement.plan import Strategy
from placement.study import stats
from placement.study.compare import CompareSettings, PlanArm, arm_plans, compare_inputs, parse_arms, run_compare
from placement.train import TrainSettings
from tiny import tiny_model, tiny_tokenizer


def test_the_crossed_bootstrap_is_the_difference_of_means_over_the_resampled_grid():
    rng = np.random.default_rng(3)
    a, b = rng.normal(0.2, 1, (3, 5)), rng.normal(0, 1, (3, 5))
    out = stats.crossed_bootstrap(a, b, n_boot=300, seed=7)
    seed_idx, question_idx = stats.crossed_draws(3, 5, n_boot=300, seed=7)
    by_hand = []
    for seeds, questions in zip(seed_idx, question_idx):  # the grid of every drawn seed and every drawn question
        cells = [(a[s, q], b[s, q]) for s in seeds for q in questions]
        by_hand.append(np.mean([x for x, _ in cells]) - np.mean([y for _, y in cells]))
    by_hand = np.array(by_hand)
    assert out["mean"] == pytest.approx((a - b).mean())
    assert [out["lo"], out["hi"]] == pytest.approx(np.percentile(by_hand, [2.5, 97.5]))
    assert out["p"] == pytest.approx(max(2 * min((by_hand <= 0).mean(), (by_hand >= 0).mean()), 1 / 301))


def test_the_bootstrap_p_is_floored_at_one_over_b_plus_one():
    a = np.ones((4, 6))
    assert stats.crossed_bootstrap(a, np.zeros((4, 6)), n_boot=999)["p"] == pytest.approx(1 / 1000)
    assert stats.paired_bootstrap(np.ones(6), np.zeros(6), n_boot=99)["p"] == pytest.approx(1 / 100)
    assert stats.crossed_bootstrap(a, a)["p"] == 1.0  # no difference at all: every resample sits on 0


def test_three_seeds_test_first_by_the_seed_level_t_test_and_name_it():
    rng = np.random.default_rng(0)
    mine, theirs = rng.random((3, 8)) > 0.4, rng.random((3, 8)) > 0.6
    out = stats.pair_tests(mine, theirs, binary=True)
    assert out["test"] == "t" and out["test2"] == "boot"
    assert out["p"] == pytest.approx(st.ttest_rel(mine.mean(axis=1), theirs.mean(axis=1)).pvalue)
    assert out["p2"] == stats.crossed_bootstrap(mine, theirs)["p"]
    diffs = mine.mean(axis=1) - theirs.mean(axis=1)
    half = st.t.ppf(0.975, 2) * diffs.std(ddof=1) / np.sqrt(3)
    assert [out["diff_lo"], out["diff_hi"]] == pytest.approx([diffs.mean() - half, diffs.mean() + half])
    many = stats.pair_tests(rng.random((5, 8)), rng.random((5, 8)), binary=False)
    assert many["test"] == "boot" and many["test2"] == "t"  # four seeds or more: the bootstrap leads


def test_two_seeds_give_a_t_test_but_no_interval_over_seeds():
    rng = np.random.default_rng(1)
    mine, theirs = rng.random((2, 6)), rng.random((2, 6))
    out = stats.pair_tests(mine, theirs, binary=False)
    assert out["test"] == "t" and np.isnan(out["diff_lo"]) and np.isnan(out["diff_hi"])
    assert stats.arm_interval(mine, [0.4, 0.5], binary=False)[2] == "none"
    one = stats.pair_tests(mine[:1] > 0.5, theirs[:1] > 0.5, binary=True)
    assert one["test"] == "McNemar" and one["test2"] == "q-boot"


def test_random_arms_draw_their_sites_anew_for_each_seed(make_plan):
    model = tiny_model("llama", num_hidden_layers=3)
    base = make_plan(model, Strategy("dominant"))
    for label in ("random-1", "random-20%"):
        arm = parse_arms(label)[0]
        plans = arm_plans(arm, base, model, 4, seeds=4, base_seed=0, data_key="task-a")
        assert len({tuple(p.targets) for p in plans}) > 1, label
        again = arm_plans(arm, base, model, 4, seeds=4, base_seed=0, data_key="task-a")
        assert [p.targets for p in again] == [p.targets for p in plans]  # a draw is reproducible
        other = arm_plans(arm, base, model, 4, seeds=4, base_seed=0, data_key="task-b")
        assert [p.targets for p in other] != [p.targets for p in plans]  # and differs from task to task
    full = base.all_linear_params()
    for plan in arm_plans(parse_arms("random-20%")[0], base, model, 4, seeds=3, base_seed=0, data_key="a"):
        assert 0 < plan.trainable_params <= 0.2 * full
    fixed = arm_plans(parse_arms("top-2")[0], base, model, 4, seeds=3, base_seed=0, data_key="a")
    assert len({tuple(p.targets) for p in fixed}) == 1


def boolean_examples(n):
    records = [{"instruction": f"Is {i} even?", "input": "", "output": f"the answer is {str(i % 2 == 0).lower()}",
                "answer": str(i % 2 == 0).lower()} for i in range(n)]
    return data_mod.to_examples(records)


def test_the_reference_arm_is_trained_first_and_every_other_is_tested_against_it(make_plan, tmp_path):
    model, tokenizer = tiny_model("llama", num_hidden_layers=2).requires_grad_(False), tiny_tokenizer()
    base = make_plan(model, Strategy("dominant"))
    splits = data_mod.task_splits(boolean_examples(24), None, test=4, validation=2, seed=0)
    arms = parse_arms("dominant,top-2,all-linear")
    settings = CompareSettings(arms, TrainSettings(steps=1, batch_size=4, max_length=48), max_new_tokens=2,
                               reference="top-2")
    table = run_compare(model, tokenizer, base, splits, settings, tmp_path / "c", log=lambda line: None).table
    trained = table[table.arm.isin(["dominant", "top-2", "all-linear"])]
    assert list(trained.arm) == ["top-2", "dominant", "all-linear"]
    assert trained.p_eval_loss.isna().tolist() == [True, False, False]  # the reference is not tested against itself
    with pytest.raises(PlacementError, match="--reference top-3 is not an arm of this comparison: .*top-2"):
        dataclasses.replace(settings, reference="top-3")


def test_a_plan_file_is_an_arm_and_a_resume_refuses_another_kind_under_its_label(make_plan, tmp_path):
    model, tokenizer = tiny_model("llama", num_hidden_layers=2).requires_grad_(False), tiny_tokenizer()
    base = make_plan(model, Strategy("dominant"))
    judged = {"kind": "recommend", "lr": 0.02}  # a recommended plan trains at the rate it was judged at
    dataclasses.replace(base.with_strategy(Strategy("top-k", k=2)), provenance=judged).save(tmp_path / "mine.json")
    splits = data_mod.task_splits(boolean_examples(24), None, test=4, validation=2, seed=0)
    arms, _, _ = compare_inputs("dominant,random-1", splits, False, None, None, 4,
                                plan_arms=[f"top-2={tmp_path / 'mine.json'}"])
    assert isinstance(arms[-1], PlanArm) and arms[-1].digest.startswith("sha256:") and arms[-1].lr == 0.02
    settings = CompareSettings(arms, TrainSettings(steps=1, batch_size=4, max_length=48), seeds=2, max_new_tokens=2)
    comparison = run_compare(model, tokenizer, base, splits, settings, tmp_path / "c", log=lambda line: None)
    rows = comparison.table.set_index("arm")
    assert rows.loc["top-2", "sites"] == 2 and rows.loc["random-1", "draws"].startswith("seed 0: ")
    assert rows.loc["top-2", "lr"] == 0.02 and rows.loc["dominant", "lr"] == settings.train.lr
    metrics = json.loads((tmp_path / "c" / "arms" / "top-2" / "seed-0" / "metrics.json").read_text())
    assert metrics["arm_kind"] == "plan file" and "placement_version" in metrics and "git_commit" in metrics
    from placement.study.tables import notes
    text = notes(comparison.table)
    assert "t = seed-level paired t-test" in text and "random-1 draws its sites anew" in text
    swapped, _, _ = compare_inputs("dominant,top-2", splits, False, None, None, 4)  # top-2 now the strategy
    with pytest.raises(PlacementError, match="'top-2' was a plan file arm in the earlier run and is a lora:top-k"):
        run_compare(model, tokenizer, base, splits,
                    CompareSettings(swapped, settings.train, seeds=2, max_new_tokens=2, resume=True),
                    tmp_path / "c", log=lambda line: None)


@pytest.mark.parametrize("arms, plan_arms, words", [
    ("dominant,dominant+lora", (), "same arm written two ways"),
    ("series-bn,series-bn:rf16", (), "same arm written two ways"),
    ("dominant:r4:r8", (), "rank twice"),
    ("dominant", ("nolabel",), "not LABEL=PATH"),
    ("dominant", ("x=missing.json",), "not a file"),
])
def test_arm_lists_a_comparison_refuses(arms, plan_arms, words, tmp_path):
    with pytest.raises(PlacementError, match=words):
        compare_inputs(arms, ([], [], []), False, None, None, 4, plan_arms=plan_arms)


def test_a_plan_arm_that_is_not_a_plan_or_is_for_another_model_is_one_line(make_plan, tmp_path):
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(PlacementError, match="--plan-arm x: plan .* schema"):
        compare_inputs("dominant", ([], [], []), False, None, None, 4, plan_arms=[f"x={tmp_path / 'notes.json'}"])
    (tmp_path / "a.json").write_text(json.dumps({"hello": 1}))
    other = make_plan(tiny_model("llama", num_hidden_layers=4), Strategy("top-k", k=2))
    other.save(tmp_path / "other.json")
    model = tiny_model("llama", num_hidden_layers=2)
    arm = compare_inputs("dominant", ([], [], []), False, None, None, 4,
                         plan_arms=[f"o={tmp_path / 'other.json'}"])[0][-1]
    with pytest.raises(PlacementError, match="--plan-arm o: .* is for another model"):
        arm_plans(arm, make_plan(model, Strategy("dominant")), model, 4, seeds=1, base_seed=0, data_key="")


@pytest.mark.parametrize("arm", ["ia3-", "parallel-bn-"])
def test_a_family_arm_asking_for_more_sites_than_the_family_has_is_refused(arm):
    from placement.families import get_family
    from placement.plan.strategies import check_arms

    model = tiny_model("llama", num_hidden_layers=2)
    family = "ia3" if arm == "ia3-" else "parallel-bn"
    count = len(get_family(family).find_sites(model))
    check_arms(parse_arms(f"{arm}{count}"), model)
    with pytest.raises(PlacementError, match=f"{count + 1} {family} sites, but this model has {count}"):
        check_arms(parse_arms(f"{arm}{count + 1}"), model)


def test_the_table_names_the_test_behind_every_p():
    from placement.study.compare import formatted_table

    table = pd.DataFrame([{"arm": "a", "sites": 1, "r": 8, "trainable_params": 10, "params_pct": 1.0, "lr": 1e-3,
                           "seeds": 3, "eval_loss": 1.0, "val_loss": 1.0, "exact_match": 0.5, "balanced_accuracy": None,
                           "p_exact_match": 0.15, "p_exact_match_test": "t", "p_exact_match_2": 0.0005,
                           "p_exact_match_2_test": "boot", "sec_per_step": 1.0, "peak_mem_mb": 10}])
    shown = formatted_table(table).iloc[0]
    assert shown["p exact"] == "0.15 n.s. (t)" and shown["p exact (2nd)"] == "<0.001 (boot)"


def test_the_command_line_takes_plan_arms_and_refuses_a_file_that_is_no_plan(invoke, model_dir, tmp_path,
                                                                             assert_one_line_error):
    (tmp_path / "notes.json").write_text("[1, 2]")
    result = invoke("compare", "--model", model_dir, "--data", "builtin:arithmetic", "--arms", "dominant",
                    "--plan-arm", f"mine={tmp_path / 'notes.json'}", "--out", tmp_path / "o", "--quiet")
    assert_one_line_error(result, "--plan-arm mine", "schema")
    assert not (tmp_path / "o").exists()


def test_a_resumed_arm_that_ran_with_other_code_says_so():
    from placement.study.compare import ArmRun, _kept, code_record
    from placement.study.tables import code_note

    now = code_record()
    old = ArmRun({"placement_version": "0.0.1", "git_commit": "abc"}, pd.DataFrame(), [])
    said = []
    _kept(parse_arms("dominant")[0], 0, old, said.append)
    assert "it ran with placement 0.0.1, commit abc; this run is" in said[0]
    _kept(parse_arms("dominant")[0], 1, ArmRun(dict(now), pd.DataFrame(), []), said.append)
    assert said[1] == "dominant, seed 1: kept from the earlier run"
    arms = pd.DataFrame({"arm": ["a", "b"], "placement_version": ["0.0.1", "0.2"], "git_commit": ["abc", "def"]})
    assert code_note(arms) == ("The arms ran with different code (a resumed run): a with placement 0.0.1 (commit abc); "
                               "b with placement 0.2 (commit def).")
