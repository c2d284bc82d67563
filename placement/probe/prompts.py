"""Init-gradient scores of the virtual-token families (prompt, prefix, LLaMA-Adapter: the registered families that
score in a pass of their own), from PEFT's own model: a pass over the calibration batches with the family inserted,
each rank its share of the batches (summed over ranks). Each family says which part of the first gradient belongs
to which of its sites (`Family.parts`)."""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pandas as pd
import torch

from ..distributed import all_sum, rank_and_world
from ..errors import PlacementError
from ..families import adapters, family_names, get_family


def __getattr__(name):  # the virtual-token families, as registered when asked (a family may register late)
    if name == "PROMPT_FAMILIES":
        return family_names("virtual")
    raise AttributeError(name)


def scoring_config(model, name: str, length: int):
    """PEFT's config of family `name` at `length` virtual tokens on every site it reaches (each is scored)."""
    family = get_family(name)
    if family.parts is None:
        raise PlacementError(f"adapter family '{name}' is not scored in a pass of its own: choose from "
                             f"{', '.join(family_names('virtual'))}")
    if length < 1:
        raise PlacementError(f"a {name} length of {length} adds no virtual token: pass 1 or more")
    whole = SimpleNamespace(family=name, targets=[s.name for s in family.find_sites(model)], sites=[],
                            family_args={family.size.arg: length},
                            model={"model_type": getattr(model.config, "model_type", "")})
    return family.config(family.kwargs(whole, model))


def _energies(peft_model, parts, batches: list, device) -> torch.Tensor:
    rank, world = rank_and_world()
    energy = torch.zeros(len(parts), dtype=torch.float64)
    for batch in batches[rank::world]:
        batch = batch.to(device)
        peft_model.zero_grad(set_to_none=True)
        loss = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        loss.backward()
        for i, part in enumerate(parts):
            energy[i] += float(part.grad(peft_model).double().pow(2).sum())
    return all_sum(energy)


def prompt_scores(model, batches: list, families: list[str], length: int = 10, max_length: int | None = None,
                  checkpointing: bool = False, seed: int = 0) -> pd.DataFrame:
    """One row per (family, site): the mean over batches of the first gradient's squared norm. The virtual tokens
    are PEFT's random init after `torch.manual_seed(seed)`; the score is that of this draw."""
    if max_length is not None and length > max_length:
        raise PlacementError(f"a virtual-token length of {length} is longer than --max-length {max_length}: pass a "
                             "shorter one")
    refuses = [name for name in families if checkpointing and not get_family(name).checkpointing]
    if refuses:  # PEFT's own refusal, said before the pass
        raise PlacementError(f"PEFT's {refuses[0]} tuning refuses gradient checkpointing: drop --checkpointing or "
                             f"{refuses[0]}")
    device = next(model.parameters()).device
    rows = []
    for name in families:
        config = scoring_config(model, name, length)
        try:
            copied = copy.deepcopy(model)
            peft_model = adapters.attach(copied, config, seed).eval()
        except ValueError as err:
            raise PlacementError(f"PEFT cannot add {name} to this model: {str(err).splitlines()[0]}") from err
        parts = get_family(name).parts(peft_model, model, length)
        energy = _energies(peft_model, parts, batches, device)
        rows += [dict(family=name, site=p.site, layer=p.layer, role=p.role, d_in=0, d_out=0, params=p.params,
                      page=e / len(batches)) for p, e in zip(parts, energy.tolist())]
        del peft_model
    return pd.DataFrame(rows)
