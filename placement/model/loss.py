"""The token loss every stage shares: the probe differentiates it, the trainer minimises it, evaluation reports it.

The LM head is applied a block of target tokens at a time (`head_losses`): a block's logits are formed, turned into
its losses and its gradient with respect to the hidden states, and freed before the next block, so the (tokens x
vocabulary) logits, their softmax and its gradient never exist at once. With every token a target they are the
largest tensors of a small model's backward (three of them, 2.4 GB at 4096 tokens and a 49k vocabulary; Gemma 3's
vocabulary is 262k). The results equal the unchunked loss and its gradients (a test, in float64).

Why our own and not a maintained fused loss: Liger's fused linear cross-entropy is Triton, GPU only;
cut-cross-entropy's kernel is Triton too and by default skips gradient entries below a threshold, and its CPU path
is `torch.compile` of the unchunked expression (a C++ compiler at run time, a recompile per shape, and nothing that
guarantees a block at a time). Neither gives the same results on the CPU and on a GPU; this does, in plain torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Bytes of float32 logits one block may hold: at 16 MiB a block is 85 tokens of a 49k vocabulary (16 of Gemma 3's
# 262k), which still feeds the head's GEMM well, and three block-sized tensors stay far below what the rest of a
# backward holds.
BLOCK_BYTES = 16 * 2 ** 20


def block_tokens(vocab: int) -> int:
    """Target tokens per block of the head for a vocabulary of `vocab` entries."""
    return max(16, BLOCK_BYTES // (4 * vocab))


def adds_virtual_tokens(model: nn.Module) -> bool:
    """Whether `model` is a PEFT prompt or prefix tuning model: those insert their virtual tokens in their own
    forward, which calling the decoder directly would skip (LLaMA-Adapter lives inside the attention layers)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """Cross-entropy in float32 at least (half-precision logits are widened), float64 for a float64 model."""
    return torch.promote_types(dtype, torch.float32)


def _block(hidden, weight, bias, targets, softcap, grad: bool):
    """One block: (its per-token losses, d loss_t / d logits_t or None), the second in the loss dtype."""
    logits = F.linear(hidden, weight, bias)
    squash = None
    if softcap:  # Gemma 2's final-logit soft-capping: c tanh(z / c)
        squash = torch.tanh(logits / softcap)
        logits = squash * softcap
    wide = logits.to(_loss_dtype(logits.dtype))
    del logits
    lse = torch.logsumexp(wide, dim=-1)
    losses = lse - wide.gather(1, targets[:, None]).squeeze(1)
    if not grad:
        return losses, None
    dz = wide.sub_(lse[:, None]).exp_()  # the softmax, in the logits' own memory
    dz[torch.arange(len(targets), device=dz.device), targets] -= 1
    if squash is not None:
        dz.mul_(1 - squash.to(dz.dtype).square())
    return losses, dz


class _HeadLosses(torch.autograd.Function):
    """Per-token cross-entropy of the head over hidden states, a block of tokens at a time.

    d loss_t / d hidden_t depends on token t alone, so the forward forms it block by block next to the losses and
    keeps it (one tensor the size of `hidden`); the backward scales it by the incoming per-token gradient. Gradients
    of the head's weight and bias (a head being trained) mix tokens, so the backward forms them from each block's
    logits formed again."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, block):
        want_hidden = ctx.needs_input_grad[0]
        losses = torch.empty(len(targets), dtype=_loss_dtype(hidden.dtype), device=hidden.device)
        unit = torch.empty_like(hidden) if want_hidden else None
        for start in range(0, len(targets), block):
            cut = slice(start, start + block)
            losses[cut], dz = _block(hidden[cut], weight, bias, targets[cut], softcap, want_hidden)
            if want_hidden:
                torch.matmul(dz.to(hidden.dtype), weight, out=unit[cut])
            del dz
        ctx.softcap, ctx.block = softcap, block
        ctx.save_for_backward(unit, hidden if any(ctx.needs_input_grad[1:3]) else None, weight, bias, targets)
        return losses

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        unit, hidden, weight, bias, targets = ctx.saved_tensors
        grad_hidden = unit * grad[:, None].to(unit.dtype) if unit is not None else None
        grad_weight = torch.zeros_like(weight) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(bias) if bias is not None and ctx.needs_input_grad[2] else None
        if hidden is not None:
            for start in range(0, len(targets), ctx.block):
                cut = slice(start, start + ctx.block)
                _, dz = _block(hidden[cut], weight, bias, targets[cut], ctx.softcap, True)
                dz = (dz * grad[cut, None].to(dz.dtype)).to(hidden.dtype)
                if grad_weight is not None:
                    grad_weight.addmm_(dz.t(), hidden[cut])
                if grad_bias is not None:
                    grad_bias += dz.sum(dim=0)
        return grad_hidden, grad_weight, grad_bias, None, None, None


def head_losses(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, softcap: float | None = None,
                block: int | None = None) -> torch.Tensor:
    """Cross-entropy of `head(hidden)` (soft-capped when `softcap`) against `targets`, per token: hidden (N, h),
    targets (N,) -> (N,) in float32 (float64 for a float64 model), `block` tokens at a time."""
    block = block or block_tokens(head.weight.shape[0])
    return _HeadLosses.apply(hidden, head.weight, head.bias, targets, softcap or None, block)


def _softcap(model: nn.Module) -> float | None:
    return getattr(model.config, "final_logit_softcapping", None) or None


def target_losses(model: nn.Module, batch, block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of each labelled position, in order; the mask of those positions in the shifted batch)."""
    targets = batch.labels[:, 1:]
    keep = targets != -100
    if adds_virtual_tokens(model):  # the logits of the real tokens are the last T (prompt tuning prepends its own)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        logits = logits[:, -batch.input_ids.shape[1]:-1][keep]
        return F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), targets[keep], reduction="none"), keep
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    hidden, head = hidden[:, :-1][keep], model.get_output_embeddings()
    if type(head) is not nn.Linear:  # a wrapped head (a trained copy, a quantised layer): called as it is
        logits = head(hidden)
        if _softcap(model):
            logits = torch.tanh(logits / _softcap(model)) * _softcap(model)
        return F.cross_entropy(logits.to(_loss_dtype(logits.dtype)), targets[keep], reduction="none"), keep
    return head_losses(hidden, head, targets[keep], _softcap(model), block), keep


def token_loss(model: nn.Module, batch, block: int | None = None) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens."""
    losses, keep = target_losses(model, batch, block)
    return losses.sum() / keep.sum()


def example_losses(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, target-token count) per example of the batch, for per-question statistics."""
    losses, keep = target_losses(model, batch)
    per_token = torch.zeros(keep.shape, dtype=losses.dtype, device=losses.device)
    per_token[keep] = losses
    return per_token.sum(dim=1), keep.sum(dim=1)


class SummedTokenLoss(nn.Module):
    """(summed cross-entropy, target-token count) of a batch, as a module: DistributedDataParallel wraps it so the
    forward that builds the graph passes through DDP, which then averages the adapters' gradients over ranks."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor):
        from types import SimpleNamespace

        batch = SimpleNamespace(input_ids=input_ids, attention_mask=attention_mask, labels=labels)
        losses, keep = target_losses(self.model, batch)
        return losses.sum(), keep.sum()
