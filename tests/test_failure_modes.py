"""What the tool guarantees when things go wrong: it never deletes a file it did not write, a run folder holds one
run's files, checkpoints survive kills, plans train what they say, the model cache heals, and bad input is one line."""
import errno
import json
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from placement import outputs
from placement.model import load as models
from placement.train import checkpoints as checkpoints_mod
from placement.errors import PlacementError
from placement.plan import Plan, Strategy
from placement.train import TrainSettings, latest_checkpoint, train
from tiny import tiny_model, tiny_tokenizer

PROFILE = ("--data", "builtin:arithmetic", "--batches", "2", "--batch-size", "4", "--max-length", "48", "--quiet")
TRAIN = ("--data", "builtin:arithmetic", "--steps", "2", "--batch-size", "4", "--max-length", "48", "--test", "4",
         "--validation", "0", "--max-new-tokens", "3", "--quiet")


def run_record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# -- the tool never deletes a file it did not write -----------------------------------------------------------------
def test_peft_config_into_the_current_folder_keeps_every_file(invoke, profile_dir, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "set.json").write_text("[]")
    monkeypatch.chdir(tmp_path)
    result = invoke("plan", profile_dir, "--peft-config", ".")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "notes.txt").read_text() == "mine" and (tmp_path / "data" / "set.json").is_file()
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"


def test_peft_config_into_the_profile_keeps_the_profile(invoke, assert_one_line_error, profile_dir):
    before = tree(profile_dir)
    result = invoke("plan", profile_dir, "--peft-config", profile_dir)
    assert result.exit_code == 0, result.output
    after = tree(profile_dir)
    assert {k: after[k] for k in before} == before
    config = json.loads(after.pop("adapter_config.json"))
    assert config["target_modules"] == sorted(config["target_modules"])
    (profile_dir / "adapter_config.json").unlink()
    again = invoke("plan", profile_dir, "--peft-config", profile_dir)  # created above, so refused now
    assert again.exit_code == 0, again.output
    refused = invoke("plan", profile_dir, "--peft-config", profile_dir)
    assert_one_line_error(refused, "exists", "--overwrite")
    (profile_dir / "adapter_config.json").unlink()


def test_a_folder_of_someone_else_is_refused_always(invoke, assert_one_line_error, model_dir, tmp_path):
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for extra in ((), ("--overwrite",)):
        result = invoke("profile", "--model", model_dir, *PROFILE, "--out", out, *extra)
        assert_one_line_error(result, "did not write", "thesis.tex")
    assert tree(out) == {"thesis.tex": b"years of work"}


def test_rerun_refuses_then_overwrite_replaces_only_the_listed_files(invoke, assert_one_line_error, model_dir,
                                                                     tmp_path):
    out = tmp_path / "run"
    first = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert first.exit_code == 0, first.output
    record = run_record(out)
    assert record["status"] == "done" and record["tool"] == "placement"
    assert {"scores.csv", "plan.json", "heatmap.png", "convergence.png"} <= set(record["files"])
    assert set(record["files"]) == set(tree(out)) - {"run.json"}
    extra = invoke("plan", out, "--strategy", "top-k", "--k", "2", "--out", out / "top2.json")
    assert extra.exit_code == 0, extra.output
    (out / "my-empty-folder").mkdir()

    refused = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert_one_line_error(refused, "earlier run", "--overwrite")

    # a rerun without bootstrap must not leave the first run's convergence plot behind
    again = invoke("profile", "--model", model_dir, *PROFILE, "--bootstrap", "0", "--out", out, "--overwrite")
    assert again.exit_code == 0, again.output
    assert not (out / "convergence.png").exists() and not (out / "convergence.csv").exists()
    assert (out / "top2.json").is_file() and (out / "my-empty-folder").is_dir()  # others' things are left alone
    report = invoke("report", out)
    assert report.exit_code == 0, report.output
    page = (out / "report.html").read_text()
    assert "How many calibration batches" not in page
    assert "report.html" in run_record(out)["files"]


def test_report_shows_only_the_files_its_run_listed(invoke, profile_dir, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(profile_dir, run)
    record = run_record(run)
    record["files"] = [f for f in record["files"] if not f.startswith("convergence")]
    (run / "run.json").write_text(json.dumps(record))
    invoke("report", run)
    assert "How many calibration batches" not in (run / "report.html").read_text()


def test_killed_runs_temporary_files_are_cleaned_by_the_next_run(invoke, model_dir, tmp_path):
    out = tmp_path / "run"
    first = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert first.exit_code == 0, first.output
    # a kill while writing: run.json says running and lists the temporaries it had begun
    (out / ".~placement.heatmap.png.a1b2.png").write_bytes(b"half")
    (out / ".~placement.adapter.x9").mkdir()
    (out / ".~placement.adapter.x9" / "adapter_model.safetensors").write_bytes(b"half")
    record = run_record(out)
    record.update(status="running", temporaries=[".~placement.heatmap.png.a1b2.png", ".~placement.adapter.x9"])
    (out / "run.json").write_text(json.dumps(record))
    result = invoke("profile", "--model", model_dir, *PROFILE, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert not list(out.rglob(".~placement*"))


# -- checkpoints ------------------------------------------------------------------------------------------------------
def _train_args(profile_dir, model_dir, out, *extra):
    return ("train", "--plan", profile_dir / "plan.json", "--model", model_dir, *TRAIN, "--out", out, *extra)


def test_checkpoint_replacement_keeps_a_complete_state_at_every_moment(make_plan, tmp_path, monkeypatch):
    from placement.ledger import run_folder

    tokenizer = tiny_tokenizer()
    model = tiny_model("llama")
    plan = make_plan(model, Strategy("dominant"))
    examples = _examples(12)
    settings = TrainSettings(steps=6, lr=1e-2, batch_size=4, max_length=48, save_every=2)
    out = tmp_path / "run"

    def killed_while_removing(state, ledger=None):  # the new state and the pointer are in place, the old one not gone
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints_mod, "remove_checkpoint", killed_while_removing)
    with pytest.raises(KeyboardInterrupt), run_folder(out):
        train(model, tokenizer, plan, examples, settings, out=out)
    monkeypatch.undo()
    states = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert states == ["step-0000002", "step-0000004"]
    assert latest_checkpoint(out).name == "step-0000004"
    # a pointer to a state a kill was deleting: the newest complete state is found instead
    (out / "checkpoints" / "latest").write_text("step-0000009\n")
    (out / "checkpoints" / "step-0000004" / "state.json").unlink()
    assert latest_checkpoint(out).name == "step-0000002"
    weights = out / "checkpoints" / "step-0000002" / "adapter.safetensors"
    intact = weights.read_bytes()
    weights.write_bytes(intact[:50])
    with pytest.raises(PlacementError, match="damaged"), run_folder(out, resume=True):
        train(tiny_model("llama"), tokenizer, plan, examples, settings, out=out, resume=True)
    weights.write_bytes(intact)
    with run_folder(out, resume=True):  # the incomplete step-4 the kill left is the run's own: replaced
        run = train(tiny_model("llama"), tokenizer, plan, examples, settings, out=out, resume=True)
    assert run.resumed_from == 2 and len(run.losses) == 6
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000004"]  # step 2 went
    assert (out / "checkpoints" / "step-0000004" / "state.json").is_file()


def _examples(n):
    from placement import data as data_mod

    return data_mod.to_examples(data_mod.arithmetic_records(n, 0))


def _interrupted_run(make_plan, out):
    """A dominant-site run on a tiny llama stopped by Ctrl-C after step 3, with a checkpoint at step 2."""
    plan = make_plan(tiny_model("llama"), Strategy("dominant"))
    settings = TrainSettings(steps=4, lr=1e-2, batch_size=4, max_length=48, save_every=2)

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model("llama"), tiny_tokenizer(), plan, _examples(12), settings, out=out, on_step=stop)
    return plan, settings


def test_resume_refuses_another_plan_or_other_data(make_plan, tmp_path):
    tokenizer = tiny_tokenizer()
    plan, settings = _interrupted_run(make_plan, tmp_path)
    other_plan = make_plan(tiny_model("llama"), Strategy("top-k", k=3))
    with pytest.raises(PlacementError, match="another plan"):
        train(tiny_model("llama"), tokenizer, other_plan, _examples(12), settings, out=tmp_path, resume=True)
    with pytest.raises(PlacementError, match="other training data"):
        train(tiny_model("llama"), tokenizer, plan, _examples(16), settings, out=tmp_path, resume=True)


@pytest.mark.slow
def test_a_killed_training_run_resumes_and_is_never_silently_discarded(invoke, assert_one_line_error, profile_dir,
                                                                       model_dir, tmp_path):
    out = tmp_path / "train"
    args = [str(a) for a in _train_args(profile_dir, model_dir, out)]
    args[args.index("--steps") + 1] = "1000"
    child = subprocess.Popen([sys.executable, "-m", "placement.cli", *args, "--save-every", "1"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while latest_checkpoint(out) is None or latest_checkpoint(out).name < "step-0000003":
            assert child.poll() is None, child.stderr.read().decode()
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    record = run_record(out)
    assert record["status"] == "running"
    assert any(f.startswith("checkpoints/step-") for f in record["files"])

    rerun = invoke(*_train_args(profile_dir, model_dir, out, "--steps", "1000"))
    assert_one_line_error(rerun, "checkpoint", "--resume", "--overwrite")
    assert latest_checkpoint(out) is not None

    step = int(latest_checkpoint(out).name.split("-")[1])
    cut = [a for a in _train_args(profile_dir, model_dir, out)]
    cut[cut.index("--steps") + 1] = "1000"
    killed = (out / "run.json").read_bytes()
    other = invoke(*cut, "--resume", "--lr", "0.5")
    assert_one_line_error(other, "other settings", "lr")
    assert (out / "run.json").read_bytes() == killed  # a refused resume leaves the killed run's record as it was
    resumed = invoke(*cut, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    metrics = json.loads(resumed.output)
    assert metrics["resumed_from"] == step and metrics["steps"] == 1000
    record = run_record(out)
    assert record["status"] == "done" and not (out / "checkpoints").exists()
    assert set(record["files"]) == set(tree(out)) - {"run.json"}


@pytest.mark.slow
def test_overwrite_replaces_a_run_with_merged_weights(invoke, profile_dir, model_dir, tmp_path):
    out = tmp_path / "train"
    first = invoke(*_train_args(profile_dir, model_dir, out, "--merge"))
    assert first.exit_code == 0, first.output
    assert (out / "merged" / "config.json").is_file()
    second = invoke(*_train_args(profile_dir, model_dir, out, "--overwrite"))
    assert second.exit_code == 0, second.output
    assert not (out / "merged").exists()
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == \
        stat.S_IMODE((out / "metrics.json").stat().st_mode)


# -- a plan says what it trains ----------------------------------------------------------------------------------
def _edited_plan(profile_dir, tmp_path, edit) -> Path:
    data = json.loads((profile_dir / "plan.json").read_text())
    edit(data)
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["peft"].update(target_modules=".*proj"), ["target_modules", "exact module names"]),
    (lambda d: d["peft"].update(target_modules=["o_proj"]), ["target_modules", "o_proj"]),
    (lambda d: d["peft"].update(target_modules="all-linear"), ["target_modules"]),
    (lambda d: d["peft"].update(r=0), ["peft.r", "positive integer"]),
    (lambda d: d["peft"].update(r=-4), ["peft.r"]),
    (lambda d: d["peft"].update(r="8"), ["peft.r"]),
    (lambda d: d["peft"].pop("lora_alpha"), ["lora_alpha"]),
    (lambda d: d["peft"].update(lora_alpha=float("nan")), ["lora_alpha"]),
    (lambda d: d["peft"].update(lora_dropout=1.0), ["lora_dropout"]),
    (lambda d: d["peft"].update(colour="blue"), ["colour", "LoraConfig"]),
    (lambda d: d.update(targets=[]), ["targets"]),
    (lambda d: d["peft"].update(rank_pattern={d["targets"][0]: -2}), ["rank_pattern"]),
])
def test_a_hand_edited_plan_that_trains_something_else_is_refused(invoke, assert_one_line_error, profile_dir, model_dir,
                                                                  tmp_path, edit, words):
    plan = _edited_plan(profile_dir, tmp_path, edit)
    out = tmp_path / "out"
    result = invoke("train", "--plan", plan, "--model", model_dir, *TRAIN, "--out", out)
    assert_one_line_error(result, *words)
    assert not out.exists()


@pytest.mark.slow
def test_adapter_config_is_deterministic_and_names_the_model_as_given(invoke, profile_dir, model_dir, tmp_path):
    configs = []
    for name in ("a", "b"):
        plan = invoke("plan", profile_dir, "--strategy", "top-k", "--k", "5", "--out", tmp_path / f"{name}.json")
        assert plan.exit_code == 0, plan.output
        result = invoke("train", "--plan", tmp_path / f"{name}.json", "--model", model_dir, *TRAIN,
                        "--out", tmp_path / name)
        assert result.exit_code == 0, result.output
        configs.append((tmp_path / name / "adapter_config.json").read_text())
    assert configs[0] == configs[1] and "NaN" not in configs[0]
    config = json.loads(configs[0])
    assert config["target_modules"] == sorted(config["target_modules"]) and len(config["target_modules"]) == 5
    assert config["base_model_name_or_path"] == str(model_dir)


# -- checked before computing ---------------------------------------------------------------------------------------
def test_out_under_a_file_is_refused_before_the_model_loads(invoke, assert_one_line_error, tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke("profile", "--model", "./no/such/model", *PROFILE, "--out", tmp_path / "file" / "out")
    assert_one_line_error(result, "file")
    assert "model" not in result.output.split(":")[0]


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs a place even root cannot write")
def test_unwritable_out_is_refused_before_the_model_loads(invoke, assert_one_line_error):
    result = invoke("profile", "--model", "./no/such/model", *PROFILE, "--out", "/sys/placement/out")
    assert_one_line_error(result, "cannot write")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_refused(invoke, assert_one_line_error, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        result = invoke("profile", "--model", "./no/such/model", *PROFILE, "--out", parent / "out")
        assert_one_line_error(result, "cannot write")
    finally:
        parent.chmod(0o700)


def test_a_full_disk_is_one_line_and_leaves_nothing(invoke, assert_one_line_error, model_dir, tmp_path, monkeypatch):
    real = os.replace

    def full(src, dst, *args, **kwargs):
        if str(dst).endswith("heatmap.png"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(outputs.os, "replace", full)
    out = tmp_path / "out"
    result = invoke("profile", "--model", model_dir, *PROFILE, "--out", out)
    assert_one_line_error(result, "no space left")
    assert not out.exists()


# -- the model cache ------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    """A stand-in GGUF whose 'dequantising' builds a tiny model, counting how often it runs."""
    monkeypatch.setenv("PLACEMENT_CACHE", str(tmp_path / "cache"))
    calls = []

    def dequantise(gguf, quiet):
        calls.append(gguf)
        time.sleep(0.2)  # long enough for a second loader to arrive while the first holds the lock
        return tiny_model("llama"), tiny_tokenizer()

    monkeypatch.setattr(models, "_dequantise", dequantise)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF stand-in")
    return gguf, calls


def test_concurrent_first_loads_dequantise_once(fake_gguf):
    gguf, calls = fake_gguf
    found, errors = [], []

    def load():
        try:
            found.append(models.cached_gguf(gguf, "tiny"))
        except Exception as err:  # noqa: BLE001 - the test reports any failure of either thread
            errors.append(err)

    threads = [threading.Thread(target=load) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and len(found) == 2 and found[0] == found[1] and len(calls) == 1
    assert models.cache_problem(found[0]) is None


def test_a_damaged_cache_is_rebuilt_with_a_warning(fake_gguf):
    gguf, calls = fake_gguf
    target = models.cached_gguf(gguf, "tiny")
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    weights.write_bytes(bytes(data))
    assert "hash" in models.cache_problem(target)
    with pytest.warns(UserWarning, match="rebuilding"):
        assert models.cached_gguf(gguf, "tiny") == target
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    with pytest.warns(UserWarning, match="truncated"):
        models.cached_gguf(gguf, "tiny")
    assert len(calls) == 3 and models.cache_problem(target) is None
    model, _, source = models.load(str(gguf))
    assert source.path == str(target) and type(model).__name__ == "LlamaForCausalLM"


def test_orphans_of_a_killed_dequantise_are_cleaned(fake_gguf):
    gguf, _ = fake_gguf
    target = models.gguf_cache_dir(gguf, "tiny")
    orphan = target.parent / f"{target.name}.tmp-abc123"
    orphan.mkdir(parents=True)
    (orphan / "model.safetensors").write_bytes(b"x" * 1000)
    models.cached_gguf(gguf, "tiny")
    assert not orphan.exists() and target.is_dir()


def test_an_unwritable_cache_falls_back_to_the_gguf(fake_gguf, tmp_path, monkeypatch):
    gguf, calls = fake_gguf
    (tmp_path / "blocked").write_text("a file where the cache should go")
    monkeypatch.setenv("PLACEMENT_CACHE", str(tmp_path / "blocked" / "cache"))
    with pytest.warns(UserWarning, match="loading from the GGUF directly"):
        model, tokenizer, source = models.load(str(gguf), dtype="bfloat16")
    assert source.gguf_file == gguf.name and next(model.parameters()).dtype == torch.bfloat16
    assert len(calls) == 1


# -- bad input that used to end in a traceback -------------------------------------------------------------------
@pytest.mark.slow
def test_data_without_answers_trains_and_evaluates_loss_only(invoke, profile_dir, model_dir, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text("\n".join(json.dumps({"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."})
                              for i in range(40)))
    alpaca = tmp_path / "alpaca.jsonl"
    alpaca.write_text("\n".join(json.dumps({"instruction": f"Spell {i}.", "output": "digits " + str(i)})
                                for i in range(40)))
    for source in (data, alpaca):
        out = tmp_path / source.stem
        result = invoke("train", "--plan", profile_dir, "--model", model_dir, *TRAIN, "--data", source, "--out", out)
        assert result.exit_code == 0, result.output
        assert "not scored" in result.output
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["exact_match"] is None and metrics["eval_loss"] > 0
        assert len(pd.read_csv(out / "predictions.csv")) == 4
    out = tmp_path / "cmp"
    result = invoke("compare", "--model", model_dir, *TRAIN, "--data", alpaca, "--batches", "1",
                    "--arms", "dominant", "--out", out)
    assert result.exit_code == 0, result.output
    assert pd.read_csv(out / "comparison.csv")["exact_match"].isna().all()


def test_small_data_works_with_the_default_held_out_sizes(invoke, profile_dir, model_dir, tmp_path):
    data = tmp_path / "small.jsonl"
    data.write_text("\n".join(json.dumps({"instruction": f"What is {i} + 1?", "output": str(i + 1),
                                          "answer": str(i + 1)}) for i in range(32)))
    result = invoke("train", "--plan", profile_dir, "--model", model_dir, "--data", data, "--steps", "2",
                    "--batch-size", "4", "--max-length", "48", "--max-new-tokens", "3", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert "26 training, 3 validation and 3 test examples" in result.output
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["test_examples"] == 3


@pytest.mark.parametrize("distinct, expected", [(4000, (100, 64)), (32, (3, 3)), (5, (1, 1)), (2, (1, 0)),
                                                (1, (0, 0))])
def test_held_out_sizes_follow_the_data(distinct, expected):
    from placement.data import held_out_sizes

    assert held_out_sizes(distinct, None, None) == expected
    assert held_out_sizes(distinct, 7, 2) == (7, 2)


def test_a_file_that_is_not_utf8_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path):
    data = tmp_path / "latin1.jsonl"
    data.write_bytes(json.dumps({"instruction": "caf\u00e9", "output": "x"}).encode("utf-8").replace(
        b"\\u00e9", "\u00e9".encode("latin-1")))
    result = invoke("profile", "--model", model_dir, *PROFILE, "--data", data, "--out", tmp_path / "o")
    assert_one_line_error(result, "not UTF-8")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("alpha", ["0", "-1", "inf", "nan"])
def test_alpha_that_is_not_positive_and_finite(invoke, assert_one_line_error, model_dir, tmp_path, alpha):
    result = invoke("profile", "--model", model_dir, *PROFILE, "--alpha", alpha, "--out", tmp_path / "o")
    assert_one_line_error(result, "--alpha")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["train", "compare"])
def test_max_new_tokens_is_checked_before_training(invoke, assert_one_line_error, profile_dir, model_dir, tmp_path,
                                                   command):
    head = ("train", "--plan", profile_dir) if command == "train" else ("compare", "--arms", "dominant")
    result = invoke(*head, "--model", model_dir, *TRAIN, "--max-new-tokens", "0", "--out", tmp_path / "o")
    assert_one_line_error(result, "--max-new-tokens")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, content", [("scores.csv", ""), ("scores.csv", "a,b\n\x00\x01,\n"),
                                           ("run.json", ""), ("run.json", "{broken")])
def test_report_on_damaged_files_is_one_line(invoke, assert_one_line_error, profile_dir, tmp_path, name, content):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(profile_dir, run)
    (run / name).write_text(content)
    assert_one_line_error(invoke("report", run))
    assert not (run / "report.html").exists()


def test_custom_code_without_trust_remote_code_says_which_flag(invoke, assert_one_line_error, tmp_path):
    folder = tmp_path / "custom"
    folder.mkdir()
    tiny_tokenizer().save_pretrained(folder)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tiny-custom", "architectures": ["TinyCustom"],
        "auto_map": {"AutoConfig": "configuration_tiny.TinyConfig",
                     "AutoModelForCausalLM": "modeling_tiny.TinyCustom"}}))
    result = invoke("sites", "--model", folder)
    assert_one_line_error(result, "--trust-remote-code")


def test_an_arm_the_model_cannot_give_fails_before_the_probe(invoke, assert_one_line_error, model_dir, tmp_path):
    out = tmp_path / "o"
    for arm, words in (("kappa-999", ["kappa-999", "21"]), ("last-9", ["last-9", "has 3"])):
        result = invoke("compare", "--model", model_dir, *TRAIN, "--arms", f"dominant,{arm}", "--out", out)
        assert_one_line_error(result, *words)
        assert not out.exists()


def test_a_mistyped_data_path_is_a_missing_file(invoke, assert_one_line_error, model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("profile", "--model", model_dir, *PROFILE, "--data", "data/good.jsnl", "--out", "o")
    assert_one_line_error(result, "data/good.jsnl", "not found")


# -- what a newcomer hit ------------------------------------------------------------------------------------------
def test_plan_takes_a_plan_file_previews_and_lists_targets_by_rank(invoke, assert_one_line_error, profile_dir,
                                                                   tmp_path):
    result = invoke("plan", profile_dir / "plan.json", "--strategy", "top-k", "--k", "2", "--out", tmp_path / "k2.json")
    assert result.exit_code == 0, result.output
    ranked = list(pd.read_csv(profile_dir / "scores.csv")["site"][:2])
    assert f"by rank: {ranked[0]}, {ranked[1]}" in result.output
    preview = invoke("plan", profile_dir, "--strategy", "ffn")
    assert preview.exit_code == 0 and json.loads(preview.output)["strategy"]["name"] == "ffn"
    assert_one_line_error(invoke("plan", profile_dir, "--strategy", "dominant", "--k", "3"), "--k", "dominant")
    refused = invoke("plan", profile_dir, "--strategy", "ffn", "--out", tmp_path / "k2.json")
    assert_one_line_error(refused, "exists", "--overwrite")


def test_outputs_name_no_path_of_the_machine(profile_dir):
    plan = json.loads((profile_dir / "plan.json").read_text())
    assert "path" not in plan["model"]
    assert not Plan.load(profile_dir).model.get("path")


def test_the_demo_writes_an_untracked_folder_by_default():
    from placement.cli import demo

    out = next(p for p in demo.params if p.name == "out")
    assert out.default == "runs/demo"
    ignored = (Path(__file__).parents[1] / ".gitignore").read_text().split()
    assert "runs/" in ignored


@pytest.mark.slow
def test_allocate_without_a_spectrum_or_below_one_site_is_one_line(invoke, assert_one_line_error, model_dir, profile_dir,
                                                                   tmp_path):
    fast = tmp_path / "fast"
    assert invoke("profile", "--model", model_dir, *PROFILE, "--fast", "--out", fast).exit_code == 0
    assert_one_line_error(invoke("plan", fast, "--strategy", "allocate", "--max-params", "500"), "spectrum")
    plain = profile_dir  # the exact probe keeps no spectrum unless asked
    assert_one_line_error(invoke("plan", plain, "--strategy", "allocate", "--max-params", "500"), "--spectrum-k")
    exact = tmp_path / "exact"
    assert invoke("profile", "--model", model_dir, *PROFILE, "--spectrum-k", "8", "--out", exact).exit_code == 0
    assert invoke("plan", exact, "--strategy", "allocate", "--max-params", "500").exit_code == 0
    assert_one_line_error(invoke("plan", exact, "--strategy", "allocate", "--max-params", "5"), "fits no site")
    assert_one_line_error(invoke("profile", "--model", model_dir, *PROFILE, "--fast", "--score", "page_opt",
                                 "--out", tmp_path / "o"), "page_opt", "--fast")


# -- hostile files: one line, nothing half-written --------------------------------------------------------------------
def _copy(profile_dir, tmp_path, name="copy"):
    import shutil

    folder = tmp_path / name
    shutil.copytree(profile_dir, folder)
    return folder


def _scores(folder: Path, change) -> None:
    frame = pd.read_csv(folder / "scores.csv")
    change(frame)
    frame.to_csv(folder / "scores.csv", index=False)


def _text_in_page(frame):
    frame["page"] = frame["page"].astype(object)
    frame.loc[1, "page"] = "plenty"


def _site_the_model_lacks(frame):
    frame.loc[0, "site"] = "model.layers.9.mlp.nowhere"


@pytest.mark.parametrize("change, words", [
    (_text_in_page, ("text", "page")),
    (_site_the_model_lacks, ("model.layers.9.mlp.nowhere",)),
    (lambda frame: frame.pop("page"), ("lacks the column page",)),
])
def test_a_hostile_scores_csv_is_one_line_before_the_model_loads(invoke, assert_one_line_error, profile_dir,
                                                                 model_dir, tmp_path, change, words):
    folder = _copy(profile_dir, tmp_path)
    _scores(folder, change)
    out = tmp_path / "validate"
    result = invoke("validate", "--model", model_dir, "--data", "builtin:arithmetic", "--scores", folder, "--sites",
                    "2", "--steps", "1", "--batch-size", "4", "--max-length", "48", "--quiet", "--out", out)
    assert_one_line_error(result, *words)
    assert not out.exists()


@pytest.mark.parametrize("cut", [0, 100])
def test_an_empty_or_cut_spectrum_is_one_line(invoke, assert_one_line_error, model_dir, tmp_path, cut):
    folder = tmp_path / "exact"
    assert invoke("profile", "--model", model_dir, *PROFILE, "--spectrum-k", "4", "--out", folder).exit_code == 0
    spectrum = folder / "spectrum.safetensors"
    spectrum.write_bytes(spectrum.read_bytes()[:cut])
    assert_one_line_error(invoke("plan", folder, "--strategy", "allocate", "--max-params", "5000"), "damaged")
    out = tmp_path / "compare"
    result = invoke("compare", "--model", model_dir, *TRAIN, "--arms", "allocate-50%", "--scores",
                    folder / "plan.json", "--out", out)
    assert_one_line_error(result, "spectrum.safetensors", "damaged")
    assert not out.exists()


@pytest.mark.parametrize("key, value", [("strategy", "dominant"), ("strategy", 3), ("model", "tiny"),
                                        ("model", [1]), ("family_args", [1]), ("family_args", "r8"),
                                        ("family", 3), ("sites", {})])
def test_a_plan_with_a_field_of_the_wrong_json_type_is_one_line(invoke, assert_one_line_error, profile_dir,
                                                               model_dir, tmp_path, key, value):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(json.loads((profile_dir / "plan.json").read_text()) | {key: value}))
    assert_one_line_error(invoke("plan", path), key, "must be")
    out = tmp_path / "train"
    assert_one_line_error(invoke(*_train_args(profile_dir, model_dir, out)[:2], path,
                                 *_train_args(profile_dir, model_dir, out)[3:]), key)
    assert not out.exists()


@pytest.mark.parametrize("step", ["three", 2.5, -1, 10 ** 6, None, True])
def test_a_checkpoint_whose_step_is_not_a_step_is_one_line(make_plan, tmp_path, step):
    tokenizer = tiny_tokenizer()
    plan, settings = _interrupted_run(make_plan, tmp_path)
    state = tmp_path / "checkpoints" / "step-0000002" / "state.json"
    state.write_text(json.dumps(json.loads(state.read_text()) | {"step": step}))
    with pytest.raises(PlacementError, match="damaged"):
        train(tiny_model("llama"), tokenizer, plan, _examples(12), settings, out=tmp_path, resume=True)


@pytest.fixture
def bottleneck_adapter(tmp_path):
    from placement.families import bottleneck as bn
    from placement.model.sites import find_sites

    model = tiny_model("llama")
    site = next(s for s in find_sites(model) if s.role == "down")
    config = bn.BottleneckConfig([site.name], "series", width=4)
    bn.apply(model, config)
    folder = tmp_path / "adapter"
    bn.save(model, config, folder)
    return folder


def test_a_cut_bottleneck_adapter_is_one_line(bottleneck_adapter):
    from placement.families import bottleneck as bn

    weights = bottleneck_adapter / "adapter_model.safetensors"
    for cut in (0, 60):
        weights.write_bytes(weights.read_bytes()[:cut] if cut else b"")
        with pytest.raises(PlacementError, match="empty or damaged"):
            bn.load(tiny_model("llama"), bottleneck_adapter)


def test_a_bottleneck_adapter_for_other_widths_or_modules_is_one_line(bottleneck_adapter):
    from placement.families import bottleneck as bn

    with pytest.raises(PlacementError, match="shape"):
        bn.load(tiny_model("llama", hidden_size=48, intermediate_size=96), bottleneck_adapter)
    config = bottleneck_adapter / "adapter_config.json"
    for targets in (["model.layers.0.mlp.nowhere"], ["model.embed_tokens"], "model.layers.0.mlp.down_proj"):
        config.write_text(json.dumps(json.loads(config.read_text()) | {"targets": targets}))
        with pytest.raises(PlacementError, match="no sites of this model"):
            bn.load(tiny_model("llama"), bottleneck_adapter)


@pytest.mark.slow
def test_a_megabyte_evaluation_record_is_cut_to_the_models_context():
    from placement import data as data_mod
    from placement.train import evaluate as ev

    tokenizer = tiny_tokenizer()
    records = data_mod.arithmetic_records(3, 0)
    records[0] = dict(records[0], instruction="x " * 500_000 + records[0]["instruction"])
    examples = data_mod.to_examples(records)
    assert len(examples[0].prompt[-1]["content"]) > 1_000_000
    began = time.perf_counter()
    result = ev.evaluate(tiny_model("llama"), tokenizer, examples, max_length=48, max_new_tokens=2)
    assert len(result.outputs) == 3 and len(result.losses) == 3
    assert time.perf_counter() - began < 120
