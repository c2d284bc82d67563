"""The token loss every stage shares: the probe differentiates it, the trainer minimises it, evaluation reports it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def adds_virtual_tokens(model: nn.Module) -> bool:
    """Whether `model` is a PEFT prompt or prefix tuning model: those insert their virtual tokens in their own
    forward, which calling the decoder directly would skip (LLaMA-Adapter lives inside the attention layers)."""
    config = getattr(model, "active_peft_config", None)
    return bool(getattr(config, "is_prompt_learning", False))


def _target_logits(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits at the labelled positions, their targets, the mask of those positions in the shifted batch): the LM
    head is a large share of a small model's cost, and positions without a label contribute nothing to the loss."""
    targets = batch.labels[:, 1:]
    keep = targets != -100
    if adds_virtual_tokens(model):  # the logits of the real tokens are the last T (prompt tuning prepends its own)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits
        return logits[:, -batch.input_ids.shape[1]:-1][keep].float(), targets[keep], keep
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits.float(), targets[keep], keep


def token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens."""
    logits, targets, keep = _target_logits(model, batch)
    return F.cross_entropy(logits, targets, reduction="sum") / keep.sum()


def example_losses(model: nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, target-token count) per example of the batch, for per-question statistics."""
    logits, targets, keep = _target_logits(model, batch)
    per_token = torch.zeros(keep.shape, dtype=logits.dtype, device=logits.device)
    per_token[keep] = F.cross_entropy(logits, targets, reduction="none")
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
        logits, targets, keep = _target_logits(self.model, batch)
        return F.cross_entropy(logits, targets, reduction="sum"), keep.sum()
