"""The token loss every stage shares: the probe differentiates it, the trainer minimises it, evaluation reports it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def token_loss(model: nn.Module, batch) -> torch.Tensor:
    """Mean cross-entropy over target tokens, with logits only where a label is: the LM head is a large share of a
    small model's cost, and positions without a label contribute nothing to the loss."""
    decoder = model.get_decoder()
    hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    targets = batch.labels[:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    softcap = getattr(model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    count = keep.sum()
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / count
