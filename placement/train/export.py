"""What a finished training run leaves: the adapter (PEFT's files, or ours for the families PEFT lacks), the merged
model on request, metrics.json and loss.csv; the checkpoints go once the run is complete. Every file goes through
the run folder's ledger."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..errors import PlacementError
from ..families import adapters
from ..ledger import Ledger
from ..outputs import make_dirs, new_dir, place, staging_dir, write_csv, write_json
from ..plan.formats import adapter_config_text
from .checkpoints import remove_checkpoints, run_ledger


def refuse_merge(family: str) -> PlacementError:
    """The one refusal of `--merge` for an adapter that does not fold into the weights."""
    return PlacementError(f"--merge folds LoRA or IA3 into the weights; a {family} adapter cannot be merged: "
                          "drop --merge")


def save_adapter(peft_model, out: str | Path, model_name: str | None = None, initial: dict | None = None, *,
                 ledger: Ledger | None = None) -> None:
    """PEFT's own files (adapter_config.json, adapter_model.safetensors), each renamed into `out` when complete.
    adapter_config.json names the base as the user gave it (`model_name`), never a cache path of this machine, and
    lists its targets sorted, so identical runs write identical files. With `initial` (PiSSA, OLoRA), PEFT saves the
    trained adapter minus its initial value: a plain LoRA of twice the rank that loads on the original base."""
    out = Path(out)
    make_dirs(out)
    if adapters.is_ours(peft_model):  # our families: our config schema and safetensors, placement.families.load
        adapters.save_ours(peft_model, out)
        return
    ledger = ledger if ledger is not None else run_ledger(out)
    with staging_dir(out, "adapter", ledger=ledger) as staged:
        conversion = {}
        if initial is not None:
            start = staged / "initial"
            start.mkdir()
            save_file(initial, str(start / "adapter_model.safetensors"), metadata={"format": "pt"})
            conversion = {"path_initial_model_for_weight_conversion": str(start)}
        peft_model.save_pretrained(str(staged), safe_serialization=True, **conversion, **_gathered(peft_model))
        if initial is not None:
            shutil.rmtree(staged / "initial")
        local = _tidy_adapter_config(staged / "adapter_config.json", model_name)
        card = staged / "README.md"
        if local and model_name is not None and card.is_file():  # PEFT's model card names the base too
            card.write_text(card.read_text(encoding="utf-8").replace(local, model_name), encoding="utf-8")
        for item in sorted(staged.iterdir()):
            if item.is_file() and not item.is_symlink():
                place(item, out / item.name, ledger=ledger)


def _gathered(peft_model) -> dict:
    """Under FSDP2 the adapter's tensors are shards: PEFT saves them gathered (a collective: every rank calls it)."""
    state = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    if not any(hasattr(v, "full_tensor") for v in state.values()):
        return {}
    return {"state_dict": {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in state.items()}}


def _tidy_adapter_config(path: Path, model_name: str | None) -> str | None:
    """Rewrite PEFT's adapter_config.json deterministically; returns the base path PEFT had written."""
    config = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(adapter_config_text(config, model_name), encoding="utf-8")
    return config.get("base_model_name_or_path")


def save_merged(peft_model, tokenizer, out: str | Path, *, ledger: Ledger | None = None) -> None:
    """The base with the adapter folded in, as an ordinary transformers model folder (LoRA and IA3 only). An earlier
    merged folder of this run's ledger is replaced; anything else there is refused."""
    if adapters.is_ours(peft_model) or not adapters.mergeable(peft_model.active_peft_config):
        family = "bottleneck" if adapters.is_ours(peft_model) else str(peft_model.active_peft_config.peft_type).lower()
        raise refuse_merge(family)
    out = Path(out)
    ledger = ledger if ledger is not None else run_ledger(out.parent)
    if out.exists() and ledger.record is not None:
        ledger.remove(out)
    merged = peft_model.merge_and_unload()
    with new_dir(out, ledger=ledger) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))


def write_run(result, out: str | Path, metrics: dict, model_name: str | None = None, *,
              ledger: Ledger | None = None) -> None:
    """The adapter, metrics.json and loss.csv of a TrainResult; the checkpoints this run listed are dropped once
    the run is complete (a folder of anyone else under OUT/checkpoints stays)."""
    out = Path(out)
    ledger = ledger if ledger is not None else run_ledger(out)
    save_adapter(result.model, out, model_name, initial=result.initial_adapter, ledger=ledger)
    write_json(out / "metrics.json", metrics, ledger=ledger)
    write_csv(out / "loss.csv", result.curve(), ledger=ledger)
    remove_checkpoints(out, ledger)
