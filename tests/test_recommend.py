"""`placement recommend`: the schedule, the shared trial store, the outputs and the bad inputs."""
import json
import threading
from collections import Counter

import pandas as pd
import pytest

from placement.errors import PlacementError
from placement.plan.plan import Plan
from placement.study import trials as tq
from placement.study.recommend import RecommendSettings
from placement.study.recommend_report import decide, recommended_plan
from placement.study.rungs import schedule

FAST = ["--trial-steps", "1", "--rates", "1e-3,1e-2", "--batches", "1", "--batch-size", "2", "--max-length", "48",
        "--lookahead-steps", "1", "--selectors", "page,params,down,lookahead", "--quiet"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "sums.jsonl"
    rows = [{"instruction": f"{a}+{b}=", "output": str(a + b)} for a in range(8) for b in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _fake_value(key: dict) -> float:
    """A deterministic validation loss per key: selector s_i is better for larger i, rung 1 better than rung 0."""
    base = {"page": 3.0, "s1": 2.9, "s2": 2.8, "s3": 2.7, "s4": 3.5, "s5": 3.6}[key["selector"]]
    return base - 0.1 * (key["stage"] == "rung1") + 0.01 * key["seed"] + abs(key["lr"] - 1e-2)


def _drive(queue, entries, settings, counts, lock):
    def run(key):
        with lock:
            counts[tq.key_text(key)] += 1
        return {"val_loss": _fake_value(key), "params": entries[key["selector"], key["budget"]], "sites":
                key["selector"], "train_loss": 0.0, "seconds": 0.0}
    return tq.work(queue, lambda done: schedule(done, entries, settings), run, poll=0.05)


ENTRIES = {(s, "5%"): 100 + 10 * i for i, s in enumerate(["page", "s1", "s2", "s3", "s4", "s5"])}
SETTINGS = RecommendSettings(budget=[5.0], trial_steps=2, rates=(1e-3, 1e-2))


def test_schedule_sweeps_then_promotes_the_best_third_and_page(tmp_path):
    queue = tq.TrialQueue(str(tmp_path / "t.journal"), create=True)
    results = _drive(queue, ENTRIES, SETTINGS, Counter(), threading.Lock())
    stages = Counter((r["stage"], r["steps"]) for r in results.values())
    # sweep: page at two rates; rung 0: the five others at the sweep's rate (page's is the sweep's run)
    assert stages[("rung0", 2)] == 2 + 5
    assert {r["lr"] for r in results.values() if r["stage"] == "rung0" and r["selector"] != "page"} == {1e-2}
    longer = {(r["selector"], r["seed"]) for r in results.values() if r["stage"] == "rung1"}
    assert longer == {(s, seed) for s in ("s3", "s2", "page") for seed in (0, 1)}  # ceil(6 / 3) = 2, and page
    assert all(r["steps"] == 6 for r in results.values() if r["stage"] == "rung1")


def test_one_rung_stops_after_rung_zero_and_decides_on_it(tmp_path):
    from placement.study.recommend_report import trials_frame
    from placement.study.rungs import trial_count

    quick = RecommendSettings(budget=[5.0], trial_steps=2, rates=(1e-3, 1e-2), rungs=1)
    queue = tq.TrialQueue(str(tmp_path / "t.journal"), create=True)
    results = _drive(queue, ENTRIES, quick, Counter(), threading.Lock())
    assert {r["stage"] for r in results.values()} == {"rung0"} and len(results) == 2 + 5
    assert trial_count(ENTRIES, quick) == (7, 14)
    decision = decide(trials_frame(results, 1000))["5%"]
    assert decision["selector"] == "s3" and decision["spread"] == 0  # the best at the swept rate, one seed
    assert decision["lr"] == 1e-2  # the swept rate it was judged at, which its plan carries
    assert decision["margin_page"] == pytest.approx(0.3)  # page at its best rate, not its sweep's worst


def test_two_workers_run_no_trial_twice_and_agree_with_one(tmp_path):
    lock = threading.Lock()
    one = _drive(tq.TrialQueue(str(tmp_path / "one.journal"), create=True), ENTRIES, SETTINGS, Counter(), lock)
    counts, outs = Counter(), {}
    tq.TrialQueue(str(tmp_path / "two.journal"), create=True)

    def worker(name):
        outs[name] = _drive(tq.TrialQueue(str(tmp_path / "two.journal")), ENTRIES, SETTINGS, counts, lock)
    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counts and max(counts.values()) == 1  # no key ran twice
    strip = lambda res: {k: v["value"] for k, v in res.items()}  # noqa: E731
    assert strip(outs["a"]) == strip(outs["b"]) == strip(one)


def test_resume_runs_again_what_a_stopped_worker_left_running(tmp_path):
    url = str(tmp_path / "t.journal")
    queue = tq.TrialQueue(url, create=True)
    key = dict(stage="rung0", selector="page", budget="5%", seed=0, steps=2, lr=1e-3)
    queue.enqueue([key])
    assert queue.pop() is not None and queue.pop() is None  # taken, then the worker stops
    again = tq.TrialQueue(url)
    assert again.reset_running() == 1
    assert again.enqueue([key]) == 1
    trial = again.pop()
    again.finish(trial, 1.5, {"val_loss": 1.5})
    assert list(again.results().values())[0]["value"] == 1.5


def test_decision_prefers_fewer_parameters_within_the_spread():
    rows = []
    for selector, params, losses in (("page", 300, (2.00, 2.10)), ("small", 100, (2.08, 2.09)),
                                     ("worse", 50, (2.50, 2.60))):
        rows += [dict(stage="rung1", selector=selector, budget="5%", seed=s, params=params, val_loss=v,
                      sites=selector, lr=3e-3) for s, v in enumerate(losses)]
    d = decide(pd.DataFrame(rows))["5%"]
    assert d["selector"] == "small"  # page's mean 2.05, spread 0.10: small's 2.085 lies within it
    assert d["runner_up"] == "page" and d["margin_page"] == pytest.approx(2.05 - 2.085)


@pytest.mark.slow
def test_an_overwritten_recommendation_trains_its_trials_anew(invoke, model_dir, data_file, tmp_path):
    """The replaced run's trial store is removed before the new one opens it, so no result of the old run (here
    from another data split) is taken for one of the new run's trials."""
    out, quick = tmp_path / "rec", ["--budget", "40%", "--rungs", "1", "--selectors", "page,params"]
    first = invoke("recommend", "--model", model_dir, "--data", data_file, "--out", out, *FAST, *quick)
    assert first.exit_code == 0, first.output
    before = pd.read_csv(out / "trials.csv")
    again = invoke("recommend", "--model", model_dir, "--data", data_file, "--out", out, "--overwrite", "--seed", "1",
                   *FAST, *quick)
    assert again.exit_code == 0, again.output
    after = pd.read_csv(out / "trials.csv")
    assert len(after) == len(before) and not (after.val_loss.to_numpy() == before.val_loss.to_numpy()).any()


@pytest.mark.slow
def test_recommend_end_to_end_and_join_on_a_finished_run(invoke, model_dir, data_file, tmp_path):
    out = tmp_path / "rec"
    result = invoke("recommend", "--model", model_dir, "--data", data_file, "--budget", "20%,40%", "--out", out,
                    *FAST)
    assert result.exit_code == 0, result.output
    for name in ("recommendation.md", "trials.csv", "pareto.png", "plan-20%.json", "plan-40%.json"):
        assert (out / name).is_file(), name
    plan = recommended_plan(out, "20%")
    assert plan.strategy["name"] == "recommended" and plan.provenance["budget"] == "20%"
    assert plan.provenance["lr"] in (1e-3, 1e-2) and plan.provenance["seeds"] == [0, 1]
    assert plan.trainable_params <= 0.2 * plan.all_linear_params()
    assert Plan.load(out / "plan-40%.json").provenance["selector"] in {"page", "params", "down", "lookahead"}
    trials = pd.read_csv(out / "trials.csv")
    assert set(trials.stage) == {"rung0", "rung1"} and not trials.duplicated(
        ["stage", "selector", "budget", "seed", "steps", "lr"]).any()
    shown = invoke("plan", out, "--strategy", "recommended", "--budget", "20%", "--out", tmp_path / "p.json")
    assert shown.exit_code == 0, shown.output
    assert Plan.load(tmp_path / "p.json").targets == plan.targets
    joined = invoke("recommend", "--join", out, "--quiet")
    assert joined.exit_code == 0, joined.output
    assert len(pd.read_csv(out / "trials.csv")) == len(trials)
    reported = invoke("report", out)
    assert reported.exit_code == 0, reported.output
    page = (out / "report.html").read_text()
    assert "The plan to follow at each budget" in page and "data:image/png;base64" in page


def test_dry_run_prints_the_cost_and_writes_nothing(invoke, model_dir, data_file, tmp_path):
    out = tmp_path / "dry"
    result = invoke("recommend", "--model", model_dir, "--data", data_file, "--budget", "20%", "--out", out,
                    "--dry-run", *[a for a in FAST if a != "--quiet"])
    assert result.exit_code == 0, result.output
    assert "trials" in result.output and "min" in result.output
    assert not out.exists()


@pytest.mark.parametrize("extra, words", [
    (["--budget", "0.01%"], ["below the smallest"]),
    (["--budget", "120%"], ["120%", "100%"]),
    (["--trial-steps", "0"], ["--trial-steps 0"]),
    (["--selectors", "page,nope"], ["unknown selector nope"]),
    (["--selectors", "page_opt", "--fast"], ["page_opt", "--fast"]),
    (["--budget", "40%", "--entrant", "no-such-plan.json"], ["no-such-plan.json"]),
])
def test_bad_input_is_one_line(invoke, assert_one_line_error, model_dir, data_file, tmp_path, extra, words):
    out = tmp_path / "bad"
    args = ["recommend", "--model", model_dir, "--data", data_file, "--out", out, "--quiet"]
    result = invoke(*args, *[a for a in FAST if a != "--quiet"][:-2], *extra)
    assert_one_line_error(result, *words)
    assert not (out / "recommend.json").exists()


def test_python_entry_point_checks_its_input_before_loading(tmp_path):
    import placement

    with pytest.raises(PlacementError, match="trial-steps 0"):
        placement.recommend("no-such-model", "builtin:arithmetic", "5%", out=tmp_path / "r", trial_steps=0)
    assert not (tmp_path / "r").exists()


def test_join_and_recommended_plan_need_a_study(invoke, assert_one_line_error, tmp_path):
    assert_one_line_error(invoke("recommend", "--join", tmp_path, "--quiet"), "no recommend study")
    with pytest.raises(PlacementError, match="holds no recommendation"):
        recommended_plan(tmp_path, "5%")
    assert_one_line_error(invoke("plan", tmp_path, "--strategy", "recommended", "--budget", "5%"),
                          "holds no recommendation")


@pytest.mark.slow
def test_two_workers_on_a_tiny_model_match_one(model_dir, data_file, tmp_path):
    """Real trials: two threads pull from one journal; training is serialised (PEFT draws A from the global
    generator), the queue is not."""
    from placement.model.load import load
    from placement.study.recommend import prepare
    from placement.study.rungs import Workbench, run_trials, trial_splits

    model, tokenizer, source = load(str(model_dir))
    settings = RecommendSettings(budget=[40.0], selectors=("page", "params", "down"), trial_steps=1,
                                 rates=(1e-3, 1e-2), batches=1, batch_size=2, max_length=48)
    splits, _, _, plans = prepare(model, tokenizer, source, str(data_file), settings, log=lambda line: None)
    bench = Workbench(model, tokenizer, trial_splits(splits, settings), plans, settings)
    one = run_trials(bench, tq.TrialQueue(str(tmp_path / "one.journal"), create=True))
    lock, counts, outs = threading.Lock(), Counter(), {}

    def serialised(key):
        with lock:
            counts[tq.key_text(key)] += 1
            return Workbench.run(bench, key)
    shared = Workbench(model, tokenizer, bench.splits, plans, settings)
    shared.run = serialised
    tq.TrialQueue(str(tmp_path / "two.journal"), create=True)

    def worker(name):
        outs[name] = run_trials(shared, tq.TrialQueue(str(tmp_path / "two.journal")))
    threads = [threading.Thread(target=worker, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(counts.values()) == 1 and len(counts) == len(one)
    values = lambda res: {k: round(v["value"], 6) for k, v in res.items()}  # noqa: E731
    assert values(outs["a"]) == values(outs["b"]) == values(one)
