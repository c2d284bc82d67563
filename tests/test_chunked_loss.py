"""The LM head a block of target tokens at a time equals the unchunked head: losses and gradients, float64."""
import pytest
import torch
import torch.nn.functional as F
from conftest import random_batch
from tiny import VOCAB_SIZE, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from placement.model.loss import example_losses, head_losses, token_loss

TOL = dict(rtol=1e-10, atol=1e-12)


def tiny_gemma2(softcap: float) -> torch.nn.Module:
    config = AutoConfig.for_model(
        "gemma2", vocab_size=VOCAB_SIZE, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, intermediate_size=24, head_dim=8, final_logit_softcapping=softcap,
        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # logits of order one, so that a cap of 0.5 bites
        model.get_output_embeddings().weight.mul_(30)
    return model


def reference_loss(model, batch) -> torch.Tensor:
    """The unchunked oracle: every labelled position's logits at once, soft-capped as the model's own forward."""
    targets = batch.labels[:, 1:]
    keep = targets != -100
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits, targets[keep], reduction="sum") / keep.sum()


def grads(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


MODELS = {
    "llama, untied head": lambda: tiny_model("llama"),
    "gemma, tied head": lambda: tiny_model("gemma"),
    "gpt2, tied head": lambda: tiny_model("gpt2"),
    "gemma2, soft-capped": lambda: tiny_gemma2(softcap=0.5),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_loss_and_gradients_equal_unchunked(name):
    """Every parameter's gradient (the head's weight among them, and through the hidden states all below it)."""
    model = MODELS[name]().double()
    model.requires_grad_(True)
    batch = random_batch(seed=1, batch=3, length=14)
    tokens = batch.target_tokens()
    block = 5
    assert tokens % block, "the last block must be shorter than the others"
    oracle = reference_loss(model, batch)
    want = grads(model, oracle)
    ours = token_loss(model, batch, block=block)
    got = grads(model, ours)
    torch.testing.assert_close(ours, oracle, **TOL)
    assert set(got) == set(want)
    head = model.get_output_embeddings().weight
    assert any(p is head for p in model.parameters() if p.grad is not None)
    for key in want:
        torch.testing.assert_close(got[key], want[key], **TOL, msg=key)


def test_soft_capping_is_kept():
    """The cap changes the loss at this scale, so a head that dropped it would fail the equality above."""
    batch = random_batch(seed=1)
    capped, loose = tiny_gemma2(0.5).double(), tiny_gemma2(1e6).double()
    with torch.no_grad():
        assert abs(float(token_loss(capped, batch)) - float(token_loss(loose, batch))) > 1e-2


def test_head_losses_per_token_gradients():
    """An upstream gradient that differs per token, a biased head and hidden states as the leaf."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 8, generator=g, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(8, 50, bias=True).double()
    targets = torch.randint(0, 50, (23,), generator=g)
    weights = torch.rand(23, generator=g, dtype=torch.float64)
    for cap in (None, 2.0):
        logits = head(hidden)
        logits = torch.tanh(logits / cap) * cap if cap else logits
        oracle = F.cross_entropy(logits, targets, reduction="none")
        want = torch.autograd.grad(oracle @ weights, [hidden, head.weight, head.bias])
        ours = head_losses(hidden, head, targets, cap, block=5)
        got = torch.autograd.grad(ours @ weights, [hidden, head.weight, head.bias])
        torch.testing.assert_close(ours, oracle, **TOL)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **TOL)


def test_example_losses_chunked():
    model = tiny_model("llama").double()
    batch = random_batch(seed=2, batch=4, length=16)
    with torch.no_grad():
        sums, counts = example_losses(model, batch)
        per_example = []
        for i in range(4):
            one = type(batch)(batch.input_ids[i:i + 1], batch.attention_mask[i:i + 1], batch.labels[i:i + 1])
            per_example.append(reference_loss(model, one) * one.target_tokens())
    torch.testing.assert_close(sums, torch.stack(per_example), **TOL)
    assert counts.tolist() == [int((batch.labels[i, 1:] != -100).sum()) for i in range(4)]


def test_frozen_head_probe_path_float32():
    """The probe's case: frozen weights, the input embeddings requiring grad, float32 with the default blocks."""
    model = tiny_model("llama")
    model.requires_grad_(False)
    model.enable_input_require_grads()
    batch = random_batch(seed=3)
    seen = []
    hook = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        results = []
        for loss_fn in (reference_loss, token_loss):
            loss = loss_fn(model, batch)
            results.append((loss, torch.autograd.grad(loss, seen[-1])[0]))
    finally:
        hook.remove()
        model.disable_input_require_grads()
    (want, want_grad), (got, got_grad) = results
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-5, atol=1e-4 * float(want_grad.abs().max()))
