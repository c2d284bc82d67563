"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for a model that fits no single device: each decoder block is one
shard group and a root module holding the embeddings, the final norm and the LM head is another, so tied embeddings
stay in one group. The root is `SummedTokenLoss`: every forward goes through it, as FSDP2's hooks need (the probe and
the trainer call the decoder and the head directly otherwise). The probe never needs W: its hooks see each site's
input and output gradient, which FSDP2 leaves as ordinary tensors.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import PlacementError
from .loss import SummedTokenLoss
from .sites import find_blocks


def shard(model: nn.Module) -> SummedTokenLoss:
    """Shard `model` in place over the process group's ranks; returns the root that computes the summed loss."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if not dist.is_initialized():
        raise PlacementError("--fsdp shards the model over the ranks of a launcher: start the command with "
                             "torchrun --nproc_per_node N (or accelerate launch)")
    for block in find_blocks(model)[1]:
        fully_shard(block)
    root = SummedTokenLoss(model)
    fully_shard(root)
    return root


def mean_loss(root: SummedTokenLoss):
    """batch -> mean token loss through the sharded root (the probe's `loss`)."""
    def loss(batch):
        summed, tokens = root(batch.input_ids, batch.attention_mask, batch.labels)
        return summed / tokens.clamp(min=1).to(summed.dtype)
    return loss


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A module's state with every DTensor shard gathered (on every rank: a collective)."""
    out = {}
    for name, value in module.state_dict().items():
        out[name] = value.full_tensor() if hasattr(value, "full_tensor") else value
    return out
