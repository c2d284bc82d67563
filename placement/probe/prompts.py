"""Init-gradient scores of the virtual-token families (prompt, prefix, LLaMA-Adapter), from PEFT's own model: a pass
over the calibration batches with the family inserted, each rank its share of the batches (summed over ranks)."""
from __future__ import annotations

import copy

import pandas as pd
import torch

from ..distributed import all_sum, rank_and_world
from ..errors import PlacementError
from ..families.prompts import PROMPT_FAMILIES, prompt_config  # noqa: F401  (re-exported)
from ..model.sites import find_blocks


def _sites(family: str, peft_model, model, length: int) -> list[tuple[str, int, str, int, callable]]:
    """(site name, layer, role, trainable parameters, gradient -> its part) per site of the family."""
    prefix, blocks = find_blocks(model)
    hidden = model.get_input_embeddings().weight.shape[1]
    if family == "prompt":
        return [("prompt", -1, "prompt", length * hidden, lambda grads: grads["embedding"])]
    if family == "prefix":
        # PEFT lays the prefix out as (tokens, layers x 2 x key/value width), layer by layer
        per_layer = peft_model.prompt_encoder["default"].embedding.weight.shape[1] // len(blocks)
        return [(f"{prefix}.{i}.prefix", i, "prefix", length * per_layer,
                 lambda grads, i=i: grads["embedding"][:, i * per_layer:(i + 1) * per_layer])
                for i in range(len(blocks))]
    gates = [name for name, _ in peft_model.named_parameters() if name.endswith("adaption_gate")]
    out = []
    for name in gates:
        layer = int(name.split(f"{prefix}.")[1].split(".")[0]) if f"{prefix}." in name else -1
        site = name.split("base_model.model.", 1)[-1]
        out.append((site, layer, "gate", length * hidden + 1, lambda grads, n=name: grads[n]))
    return out


def prompt_scores(model, batches: list, families: list[str], length: int = 10, max_length: int | None = None,
                  checkpointing: bool = False, seed: int = 0) -> pd.DataFrame:
    """One row per (family, site): the mean over batches of the first gradient's squared norm. The virtual tokens
    are PEFT's random init after `torch.manual_seed(seed)`; the score is that of this draw."""
    if max_length is not None and length > max_length:
        raise PlacementError(f"a virtual-token length of {length} is longer than --max-length {max_length}: pass a "
                             "shorter one")
    if checkpointing and "prefix" in families:
        raise PlacementError("PEFT's prefix tuning refuses gradient checkpointing: drop --checkpointing or prefix")
    rank, world = rank_and_world()
    device = next(model.parameters()).device
    rows = []
    for family in families:
        config = prompt_config(family, length, len(find_blocks(model)[1]), model.config.model_type)
        from peft import get_peft_model

        try:
            copied = copy.deepcopy(model)
            torch.manual_seed(seed)
            peft_model = get_peft_model(copied, config).eval()
        except ValueError as err:
            raise PlacementError(f"PEFT cannot add {family} to this model: {str(err).splitlines()[0]}") from err
        sites = _sites(family, peft_model, model, length)
        energy = torch.zeros(len(sites), dtype=torch.float64)
        for batch in batches[rank::world]:
            batch = batch.to(device)
            peft_model.zero_grad(set_to_none=True)
            loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                              labels=batch.labels).loss
            loss.backward()
            grads = {name: p.grad for name, p in peft_model.named_parameters() if p.grad is not None}
            if family != "llama-adapter":
                grads["embedding"] = peft_model.prompt_encoder["default"].embedding.weight.grad
            for i, (*_, part) in enumerate(sites):
                energy[i] += float(part(grads).double().pow(2).sum())
        energy = all_sum(energy)
        for (name, layer, role, params, _), e in zip(sites, energy.tolist()):
            rows.append(dict(family=family, site=name, layer=layer, role=role, d_in=0, d_out=0, params=params,
                             page=e / len(batches)))
        del peft_model
    return pd.DataFrame(rows)
