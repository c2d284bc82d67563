"""The trainer on tiny models: loss falls, adapters round-trip through PEFT, resume is exact, and training pays
only for the adapted layers."""
import warnings

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from placement import data as data_mod
from placement.model.checkpointing import enable_checkpointing, is_checkpointing
from placement.plan import Strategy
from placement.train import TrainError, TrainSettings, apply_plan, save_adapter, train, write_run, run_metrics
from tiny import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def examples(n=8, seed=0):
    return data_mod.to_examples(data_mod.arithmetic_records(n, seed))


def settings(**overrides):
    base = dict(steps=6, lr=1e-2, batch_size=4, max_length=48, seed=0)
    return TrainSettings(**(base | overrides))


def test_memorisation_loss_falls(make_plan, tokenizer):
    # Larger initial weights than a pretrained-style init: with std 0.02 the head maps every hidden state to
    # near-uniform logits that no adapter inside the blocks can sharpen in a few steps.
    model = tiny_model("llama", hidden_size=32, intermediate_size=48, num_attention_heads=4, initializer_range=0.3)
    plan = make_plan(model, Strategy("all-linear"))
    run = train(model, tokenizer, plan, examples(4), settings(steps=30, lr=2e-2))
    first, last = sum(run.losses[:3]) / 3, sum(run.losses[-3:]) / 3
    assert last < 0.2 * first, (first, last)
    assert run.trainable_params == plan.trainable_params
    assert len(run.losses) == 30 and run.lrs[0] < run.lrs[3]  # warm-up, then decay
    assert run.lrs[-1] < run.lrs[3]


def test_only_adapters_train_and_nothing_below_the_lowest_adapted_layer(make_plan, tokenizer):
    model = tiny_model("llama", num_hidden_layers=3)
    plan = make_plan(model, Strategy("last-k", k=1))
    fired = []
    model.model.layers[0].register_full_backward_hook(lambda *args: fired.append(1))
    run = train(model, tokenizer, plan, examples(), settings(steps=2))
    assert not fired, "backward reached a layer below the adapted one"
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    assert not run.model.get_input_embeddings().weight.requires_grad


def test_adapter_round_trip_gives_the_same_logits(make_plan, tokenizer, tmp_path):
    model = tiny_model("llama")
    plan = make_plan(model, Strategy("top-k", k=3))
    run = train(model, tokenizer, plan, examples(), settings(steps=4))
    write_run(run, tmp_path / "adapter", run_metrics(run, plan))
    assert {"adapter_config.json", "adapter_model.safetensors", "metrics.json", "loss.csv"} <= {
        p.name for p in (tmp_path / "adapter").iterdir()}
    batch = data_mod.eval_batches(tokenizer, examples(4, seed=1), batch_size=4, max_length=48)[0]
    with torch.no_grad():
        expected = run.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loaded = PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "adapter").eval()
        found = loaded(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert torch.allclose(found, expected, atol=1e-6)
    untrained = tiny_model("llama")(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert not torch.allclose(found, untrained, atol=1e-4)


def test_gpt2_conv1d_adapter_round_trip(make_plan, tokenizer, tmp_path):
    model = tiny_model("gpt2")
    plan = make_plan(model, Strategy("dominant"))
    run = train(model, tokenizer, plan, examples(), settings(steps=3))
    save_adapter(run.model, tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model("gpt2"), tmp_path)
    state = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert len(state) == 2 and all(plan.targets[0] in k for k in state)
    assert type(loaded.base_model.model).__name__ == "GPT2LMHeadModel"


def test_resume_ends_with_the_same_adapter(make_plan, tokenizer, tmp_path):
    def adapter_after(out, stop_at=None, resume=False):
        model = tiny_model("llama")
        plan = make_plan(model, Strategy("all-linear"))

        def maybe_stop(step, loss):
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt  # a run killed mid-way

        run = train(model, tokenizer, plan, examples(12), settings(steps=7, save_every=3), out=out, resume=resume,
                    on_step=maybe_stop)
        return {k: v.clone() for k, v in run.model.state_dict().items() if "lora_" in k}, run

    whole, _ = adapter_after(tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        adapter_after(tmp_path / "killed", stop_at=5)
    assert (tmp_path / "killed" / "checkpoints" / "step-0000003" / "state.json").is_file()
    resumed, run = adapter_after(tmp_path / "killed", resume=True)
    assert run.resumed_from == 3 and len(run.losses) == 7
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert torch.equal(whole[key], resumed[key]), key


def test_resume_without_checkpoint_or_with_other_settings_is_refused(make_plan, tokenizer, tmp_path):
    model = tiny_model("llama")
    plan = make_plan(model, Strategy("dominant"))
    with pytest.raises(TrainError, match="no checkpoint"):
        train(model, tokenizer, plan, examples(), settings(), out=tmp_path, resume=True)

    def stop(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(tiny_model("llama"), tokenizer, plan, examples(), settings(steps=4, save_every=2), out=tmp_path,
              on_step=stop)
    with pytest.raises(TrainError, match="other settings.*lr"):
        train(tiny_model("llama"), tokenizer, plan, examples(), settings(steps=4, save_every=2, lr=1e-3),
              out=tmp_path, resume=True)
    with pytest.raises(TrainError, match="other settings.*schedule"):  # a changed schedule is a changed run
        train(tiny_model("llama"), tokenizer, plan, examples(), settings(steps=4, save_every=2, schedule="constant"),
              out=tmp_path, resume=True)


def test_non_finite_loss_names_the_step(make_plan, tokenizer):
    model = tiny_model("llama")
    plan = make_plan(model, Strategy("dominant"))
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(TrainError, match="at step 1"):
        train(model, tokenizer, plan, examples(), settings(steps=3))


def test_training_batches_are_deterministic_and_cycle_epochs(tokenizer):
    data = examples(10)
    one = data_mod.training_batches(tokenizer, data, steps=7, batch_size=4, max_length=48, seed=3)
    two = data_mod.training_batches(tokenizer, data, steps=7, batch_size=4, max_length=48, seed=3)
    other = data_mod.training_batches(tokenizer, data, steps=7, batch_size=4, max_length=48, seed=4)
    assert len(one) == 7 and all(b.input_ids.shape[0] == 4 for b in one)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(one, two))
    assert not all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(one, other))
    # two batches per epoch of 10: every example of an epoch at most once
    epoch = torch.cat([b.input_ids[:, :20] for b in one[:2]])
    assert len({tuple(row.tolist()) for row in epoch}) == 8


def test_task_splits_never_train_on_a_test_prompt():
    data = examples(60)
    held = data[:10] + examples(5, seed=9)
    train_set, val, test = data_mod.task_splits(data, held, test=8, validation=6, seed=0)
    keys = lambda items: {data_mod.prompt_key(e) for e in items}  # noqa: E731
    assert len(test) == 8 and len(val) == 6
    assert not keys(test) & keys(train_set) and not keys(test) & keys(val) and not keys(val) & keys(train_set)
    train_set, val, test = data_mod.task_splits(data, None, test=10, validation=5, seed=0)
    assert (len(train_set), len(val), len(test)) == (45, 5, 10)
    assert not keys(test) & keys(train_set)


def test_rank_override_keeps_alpha_over_r(make_plan):
    model = tiny_model("llama")
    plan = make_plan(model, Strategy("dominant"))
    bigger = plan.with_strategy(Strategy("dominant"), r=16)
    assert bigger.peft["r"] == 16 and bigger.peft["lora_alpha"] / 16 == plan.peft["lora_alpha"] / plan.peft["r"]
    assert bigger.trainable_params == 4 * plan.trainable_params
    model = apply_plan(tiny_model("llama"), bigger)
    assert model.peft_config["default"].r == 16


def test_a_plan_on_a_checkpointed_model_warns_of_no_renaming(make_plan):
    # transformers v5 renamed is_gradient_checkpointing; reading the old name (ours or PEFT's) warns on every run
    model = tiny_model("llama", num_hidden_layers=3)
    plan = make_plan(model, Strategy("top-k", k=3))
    enable_checkpointing(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_plan(model, plan)
    assert is_checkpointing(model)
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message)]


def test_gradient_checkpointing_trains_the_same_adapter(make_plan, tokenizer):
    plan = make_plan(tiny_model("llama", num_hidden_layers=3), Strategy("top-k", k=3))
    plain = train(tiny_model("llama", num_hidden_layers=3), tokenizer, plan, examples(), settings(steps=3))
    saved = train(tiny_model("llama", num_hidden_layers=3), tokenizer, plan, examples(),
                  settings(steps=3, checkpointing=True))
    assert is_checkpointing(saved.model.base_model.model)
    a = {k: v for k, v in plain.model.named_parameters() if v.requires_grad}
    b = {k: v for k, v in saved.model.named_parameters() if v.requires_grad}
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert plain.losses == pytest.approx(saved.losses, rel=1e-6)
