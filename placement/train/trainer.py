"""The compact adapter trainer: apply a plan (LoRA and the other families of PEFT, or our bottlenecks), train with
AdamW, checkpoint and resume, save the adapter (PEFT's files, or ours for the families PEFT lacks).

One documented rule for every placement, so a comparison is fair: AdamW without weight decay, linear warm-up over
the first 10% of steps then linear decay to zero, gradient clipping at norm 1.0, the same data order and seed.
The trainer pays only for what it trains: the base stays frozen and the input embeddings never require grad, so
autograd records nothing below the lowest adapted layer, and logits are taken only at labelled positions.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import data as data_mod
from ..distributed import all_sum, rank_and_world
from ..errors import PlacementError
from ..families import adapters
from ..families.lora import MUTATES_BASE, variant_of
from ..measure import PeakMemory
from ..model.loss import SummedTokenLoss, token_loss
from ..model.shard import shard
from ..outputs import (TMP_MARK, disk_error, file_mode, forget, fsync_tree, make_dirs, new_dir, record, write_csv,
                      write_json, write_text)
from ..plan.formats import adapter_config_text
from ..plan.plan import Plan

CHECKPOINTS = "checkpoints"


class TrainError(PlacementError):
    """A run that cannot go on (a non-finite loss, a missing checkpoint): one line, what happened and what to do."""


@dataclass
class TrainSettings:
    # Fields with a "help" are command-line options too (placement/cli_settings.py builds them).
    steps: int = field(default=200, metadata={
        "help": "training steps (per arm in compare, per site in validate)", "range": (1, 10 ** 9)})
    lr: float = field(default=1e-3, metadata={
        "help": "peak learning rate (validate: the same for every site)", "range": (0, 10)})
    batch_size: int = field(default=8, metadata={"help": "examples per batch", "range": (1, 2 ** 16)})
    max_length: int = field(default=256, metadata={"help": "tokens per example, at most", "range": (1, 2 ** 20)})
    warmup: float = 0.1  # fraction of steps
    clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = field(default=0, metadata={  # numpy's generators take at most 2**32 - 1
        "help": "data order, lora_A draw and splits", "range": (0, 2 ** 32 - 1)})
    save_every: int = field(default=0, metadata={  # steps between checkpoints; 0 saves none
        "help": "checkpoint every N steps (0: never)", "range": (0, 10 ** 9)})
    checkpointing: bool = field(default=False, metadata={  # activations recomputed in the backward
        "help": "gradient checkpointing: less memory, one more forward"})
    fsdp: bool = False  # shard the model over the launcher's ranks with FSDP2 (model.shard)

    def __post_init__(self) -> None:
        self.check()

    def check(self, max_new_tokens: int | None = None) -> None:
        """Refuse settings that cannot train (and a generation length that generates nothing)."""
        if max_new_tokens is not None and max_new_tokens < 1:
            raise TrainError(f"--max-new-tokens {max_new_tokens} generates nothing: pass a positive number such as 32")
        if self.steps < 1:
            raise TrainError(f"--steps {self.steps} trains nothing: pass at least 1")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise TrainError(f"--lr {self.lr} is not a learning rate: pass a positive number such as 1e-3")
        if self.save_every < 0:
            raise TrainError(f"--save-every {self.save_every} is negative: pass 0 (no checkpoints) or a step count")
        if self.fsdp and self.save_every:
            raise TrainError("--save-every is not supported with --fsdp: the adapter is saved once, at the end")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup * self.steps)


@dataclass
class TrainResult:
    model: torch.nn.Module  # the PeftModel, adapters trained
    losses: list[float]
    lrs: list[float]
    seconds: list[float]  # wall time of each step run in this process
    peak_mem_mb: float
    trainable_params: int
    settings: TrainSettings
    resumed_from: int = 0
    extra: dict = field(default_factory=dict)
    initial_adapter: dict | None = None  # PiSSA and OLoRA: the adapter as applied, to save the trained difference

    @property
    def sec_per_step(self) -> float:
        """Mean step time without the first step of the process, which pays one-off allocations."""
        timed = self.seconds[1:] or self.seconds
        return sum(timed) / len(timed) if timed else float("nan")

    def curve(self) -> pd.DataFrame:
        return pd.DataFrame({"step": range(1, len(self.losses) + 1), "loss": self.losses, "lr": self.lrs})


def apply_plan(model, plan: Plan, seed: int = 0):
    """Put the plan's adapter on `model` (PEFT wraps it; our bottlenecks go in place); every random draw of the
    adapter (lora_A, a bottleneck's down-projection, virtual tokens) is fixed by `seed`."""
    plan.check(model)
    _check_variant_sites(model, plan)
    with warnings.catch_warnings():  # PEFT still calls a transformers method that now warns of its renaming
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        try:
            return adapters.attach(model, plan.adapter_config(model), seed)
        except PlacementError:
            raise
        except (ValueError, TypeError, NotImplementedError, RuntimeError) as err:
            if plan.family == "lora" and plan.variant == "lora":
                raise
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            what = f"the {plan.variant} variant" if plan.family == "lora" else f"{plan.family}"
            raise PlacementError(f"PEFT cannot apply {what} to this plan's sites ({first}): "
                                 "choose another --variant, family or sites") from err


def _check_variant_sites(model, plan: Plan) -> None:
    """Refuse what PEFT accepts but then fails on: its OLoRA init does not transpose GPT-2's Conv1D weights (the
    first forward fails on a shape mismatch); found by training every variant on each tiny architecture."""
    from transformers.pytorch_utils import Conv1D

    if plan.variant != "olora":
        return
    modules = dict(model.named_modules())
    conv = [t for t in plan.targets if isinstance(modules.get(t), Conv1D)]
    if conv:
        raise PlacementError(f"PEFT's olora init does not handle Conv1D layers such as {conv[0]}: choose another "
                             "--variant (pissa starts from W the same way and works here)")


def initial_adapter(peft_model) -> dict | None:
    """The adapter's tensors as applied, before any step, for the variants that change the base weights (PiSSA,
    OLoRA): the saved adapter is then the trained one minus this, which loads on the original base."""
    if adapters.is_ours(peft_model):
        return None
    config = peft_model.peft_config["default"]
    if config.peft_type != "LORA" or variant_of(config.to_dict()) not in MUTATES_BASE:
        return None
    return {k: v.clone() for k, v in adapters.tensors(peft_model).items()}


def _step_loss(peft_model, device, settings: TrainSettings, root=None):
    """batch -> (the loss to differentiate, the global mean token loss): the mean over the global batch's target
    tokens. On several ranks each takes its rows of the batch through DistributedDataParallel and divides its summed
    token loss by the all-reduced token count times the world size, since DDP averages the gradients over ranks:
    the sum of the ranks' gradients is then that of the global mean, as one process would compute it."""
    rank, world = rank_and_world()
    if world == 1 and root is None:
        def single(batch):
            loss = token_loss(peft_model, batch.to(device))
            return loss, float(loss.detach())
        return single
    if settings.batch_size < world:
        raise TrainError(f"--batch-size {settings.batch_size} is split over {world} ranks: pass at least {world}")
    from torch.nn.parallel import DistributedDataParallel

    # FSDP2 averages the gradients it reduce-scatters over ranks, as DDP does: the same normalisation serves both
    engine = root or DistributedDataParallel(SummedTokenLoss(peft_model),
                                             device_ids=[device] if device.type == "cuda" else None)

    def shared(batch):
        summed, tokens = engine(**vars(batch.share(rank, world).to(device)))
        total = all_sum(tokens.detach().to(torch.float64))
        value = float(all_sum(summed.detach().to(torch.float64)) / total)
        return summed * world / total.to(summed.dtype), value
    return shared


def _schedule(optimizer, settings: TrainSettings):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, settings.warmup_steps, settings.steps)


def train(model, tokenizer, plan: Plan, examples: list, settings: TrainSettings, *, out: str | Path | None = None,
          resume: bool = False, progress: bool = False, on_step=None) -> TrainResult:
    """Train the plan's adapter. `model` is modified in place and returned with the adapter on it (a PeftModel for
    PEFT's families).

    With `out` and `settings.save_every`, a checkpoint (adapter, optimizer, schedule, RNG, step, and fingerprints of
    the plan and the data) is written under `out/checkpoints` every `save_every` steps; `resume` continues from the
    newest complete one and ends with the same adapter as an uninterrupted run. `on_step(step, loss)` is called
    after every step.
    """
    settings.check()
    batches = data_mod.training_batches(tokenizer, examples, steps=settings.steps, batch_size=settings.batch_size,
                                        max_length=settings.max_length, seed=settings.seed)
    peft_model = apply_plan(model, plan, settings.seed)
    initial = initial_adapter(peft_model)
    if settings.checkpointing:  # non-reentrant: blocks need no input that requires grad; the base stays frozen
        adapters.base_of(peft_model).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
    root = shard(peft_model) if settings.fsdp else None  # before the optimizer: FSDP2 swaps in sharded parameters
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = _schedule(optimizer, settings)
    losses: list[float] = []
    lrs: list[float] = []
    start = 0
    fingerprints = {"plan": plan_fingerprint(plan), "data": data_fingerprint(examples)}
    if resume:
        state = latest_checkpoint(out) if out is not None else None
        if state is None:
            raise TrainError(f"no checkpoint in {out}: run without --resume to start training")
        start, losses, lrs = load_checkpoint(state, peft_model, optimizer, schedule, settings, fingerprints)
    device = next(peft_model.parameters()).device
    step_loss = _step_loss(peft_model, device, settings, root)
    peft_model.train()
    seconds = []
    with PeakMemory(device) as peak, adapters.quiet():
        for step in tqdm(range(start, settings.steps), desc="training", disable=not progress, initial=start,
                         total=settings.steps):
            began = time.perf_counter()
            loss, value = step_loss(batches[step])
            if not math.isfinite(value):
                raise TrainError(f"the training loss is {value} at step {step + 1}: lower --lr or check the data")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, settings.clip)
            lrs.append(schedule.get_last_lr()[0])
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            seconds.append(time.perf_counter() - began)
            losses.append(value)
            done = step + 1
            if out is not None and settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                save_checkpoint(Path(out), peft_model, optimizer, schedule, done, losses, lrs, settings, fingerprints)
            if on_step is not None:
                on_step(done, value)
    peft_model.eval()
    if root is not None:  # evaluation calls the decoder and the head directly: keep the root's weights gathered
        root.unshard()
    trainable = sum(p.numel() for p in params)
    return TrainResult(peft_model, losses, lrs, seconds, peak.mib, trainable, settings, resumed_from=start,
                       initial_adapter=initial)


# -- checkpoints: safetensors for tensors, JSON for the rest, no pickle ---------------------------------------------
# OUT/checkpoints/step-NNNNNNN/ holds one complete state; OUT/checkpoints/latest names the newest. A new state is
# written under a temporary name, flushed to the disk and renamed into place, then the pointer is replaced, and only
# then is the previous state deleted: a kill at any moment leaves at least one complete state that --resume finds.
POINTER = "latest"


def fingerprint(obj) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_fingerprint(plan: Plan) -> str:
    """What of a plan decides its training: the sites and arguments (and, for another family than LoRA, which)."""
    if plan.family != "lora":
        return fingerprint({"targets": sorted(plan.targets), "peft": plan.peft, "family": plan.family,
                            "family_args": plan.family_args})
    """What a checkpoint's adapter depends on: the sites and the PEFT arguments."""
    return fingerprint({"targets": sorted(plan.targets), "peft": plan.peft})


def data_fingerprint(examples: list) -> str:
    """The training examples in their order (the batches depend on nothing else but the settings)."""
    return fingerprint([data_mod.prompt_key(e) + "\x00" + str(e.response) for e in examples])


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, {"param_groups": state["param_groups"]}


def _step_dirs(folder: Path) -> list[Path]:
    """Complete checkpoint states (a state.json is written last), oldest first."""
    found = [p for p in folder.glob("step-*") if p.is_dir() and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def checkpoint_refusal(out):
    """The refusal for a folder whose earlier run left a checkpoint (a `refusal_hint` of `run_folder`): say how to
    continue it rather than only that the folder is taken."""
    def hint(record: dict) -> str | None:
        if any(str(f).startswith(CHECKPOINTS + "/") for f in record.get("files", [])):
            return (f"--out {out} holds a checkpoint of an unfinished run: pass --resume to continue it, "
                    "or --overwrite to start afresh")
        return None

    return hint


def latest_checkpoint(out: str | Path) -> Path | None:
    """The newest complete checkpoint in a run folder: the pointer's, or else the newest complete state."""
    folder = Path(out) / CHECKPOINTS
    pointer = folder / POINTER
    if pointer.is_file():
        named = folder / pointer.read_text(encoding="utf-8").strip()
        if named.name.startswith("step-") and (named / "state.json").is_file():
            return named
    states = _step_dirs(folder) if folder.is_dir() else []
    return states[-1] if states else None


def save_checkpoint(out: Path, peft_model, optimizer, schedule, step: int, losses, lrs, settings,
                    fingerprints: dict) -> Path:
    folder = Path(out) / CHECKPOINTS
    target = folder / f"step-{step:07d}"
    if target.exists():  # an incomplete state of this step, left by a kill before a resume
        remove_checkpoint(target)
    with new_dir(target) as tmp:
        save_file(adapters.tensors(peft_model), str(tmp / "adapter.safetensors"))
        tensors, groups = _optimizer_tensors(optimizer)
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "optimizer.safetensors"))
        save_file({"cpu": torch.get_rng_state()}, str(tmp / "rng.safetensors"))
        (tmp / "state.json").write_text(json.dumps({
            "step": step, "losses": losses, "lrs": lrs, "optimizer": groups, "schedule": schedule.state_dict(),
            "settings": asdict(settings), **fingerprints,
        }))
        fsync_tree(tmp)
    write_text(folder / POINTER, target.name + "\n")
    for old in sorted(p for p in folder.glob("step-*") if p.is_dir() and p != target):
        remove_checkpoint(old)
    return target


def remove_checkpoint(state: Path) -> None:
    """Delete one checkpoint state of ours, file by file, and drop it from the run's list. state.json goes first, so
    a state a kill interrupts here is never taken for a complete one."""
    for item in sorted(state.rglob("*"), key=lambda p: p.name != "state.json"):
        if item.is_file():
            item.unlink()
    shutil.rmtree(state, ignore_errors=True)
    forget(state)  # everything listed under it, also what a killed run listed and had already deleted


def load_checkpoint(folder: Path, peft_model, optimizer, schedule, settings: TrainSettings, fingerprints: dict):
    run = folder.parent.parent
    try:
        state = json.loads((folder / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TrainError(f"the checkpoint {folder} is unreadable ({type(err).__name__}): "
                         "pass --overwrite to start afresh") from err
    for key, what in (("plan", "another plan"), ("data", "other training data")):
        if state.get(key) != fingerprints[key]:
            raise TrainError(f"the checkpoint in {run} was made with {what}: resume with the plan and data it was "
                             "made with, or pass --overwrite to start afresh")
    saved = {k: v for k, v in state["settings"].items() if k != "save_every"}
    asked = {k: v for k, v in asdict(settings).items() if k != "save_every"}
    if saved != asked:
        changed = sorted(k for k in asked if saved.get(k) != asked[k])
        raise TrainError(f"the checkpoint in {run} was made with other settings ({', '.join(changed)}): "
                         "resume with the same options or pass --overwrite to start afresh")
    try:
        adapter = load_file(str(folder / "adapter.safetensors"))
        flat = load_file(str(folder / "optimizer.safetensors"))
        rng = load_file(str(folder / "rng.safetensors"))["cpu"]
    except Exception as err:  # a damaged file surfaces as the reader's own error type
        raise TrainError(f"the checkpoint {folder} is damaged ({type(err).__name__}): pass --overwrite to start "
                         "afresh") from err
    adapters.load_tensors(peft_model, adapter)
    slots: dict[int, dict] = {}
    for key, value in flat.items():
        index, name = key.split(".", 1)
        slots.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["optimizer"]["param_groups"]})
    schedule.load_state_dict(state["schedule"])
    torch.set_rng_state(rng)
    return state["step"], list(state["losses"]), list(state["lrs"])


# -- outputs ------------------------------------------------------------------------------------------------------
def save_adapter(peft_model, out: str | Path, model_name: str | None = None, initial: dict | None = None) -> None:
    """PEFT's own files (adapter_config.json, adapter_model.safetensors), each renamed into `out` when complete.
    adapter_config.json names the base as the user gave it (`model_name`), never a cache path of this machine, and
    lists its targets sorted, so identical runs write identical files. With `initial` (PiSSA, OLoRA), PEFT saves the
    trained adapter minus its initial value: a plain LoRA of twice the rank that loads on the original base."""
    out = Path(out)
    make_dirs(out)
    if adapters.is_ours(peft_model):  # our families: our config schema and safetensors, placement.families.load
        adapters.save_ours(peft_model, out)
        return
    staged = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}adapter.", dir=out))
    try:
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
            file_mode(item)  # safetensors writes 0600; outputs are ordinary files
            os.replace(item, out / item.name)
            record(out / item.name)
    except OSError as err:
        raise disk_error(err, out) from err
    finally:
        shutil.rmtree(staged, ignore_errors=True)


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


def save_merged(peft_model, tokenizer, out: str | Path) -> None:
    """The base with the adapter folded in, as an ordinary transformers model folder (LoRA and IA3 only)."""
    if adapters.is_ours(peft_model) or not adapters.mergeable(peft_model.active_peft_config):
        raise PlacementError("--merge folds LoRA or IA3 into the weights; this family's adapter cannot be merged: "
                             "drop --merge")
    merged = peft_model.merge_and_unload()
    with new_dir(out) as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))


def write_run(result: TrainResult, out: str | Path, metrics: dict, model_name: str | None = None) -> None:
    """The adapter, metrics.json and loss.csv; the checkpoints are dropped once the run is complete."""
    out = Path(out)
    save_adapter(result.model, out, model_name, initial=result.initial_adapter)
    write_json(out / "metrics.json", metrics)
    write_csv(out / "loss.csv", result.curve())
    folder = out / CHECKPOINTS
    if folder.is_dir():
        for state in sorted(p for p in folder.glob("step-*") if p.is_dir()):
            remove_checkpoint(state)
        with contextlib.suppress(FileNotFoundError):
            (folder / POINTER).unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()
        forget(folder)


def run_metrics(result: TrainResult, plan: Plan) -> dict:
    return {
        "arm": plan.label, "family": plan.family, "family_args": plan.family_args, "sites": len(plan.targets),
        "targets": plan.targets, "r": plan.peft["r"] if plan.family == "lora" else None,
        "lora_alpha": plan.peft["lora_alpha"] if plan.family == "lora" else None,
        "trainable_params": result.trainable_params,
        "steps": result.settings.steps, "lr": result.settings.lr, "batch_size": result.settings.batch_size,
        "train_loss_first": result.losses[0] if result.losses else None,
        "train_loss_last": result.losses[-1] if result.losses else None,
        "sec_per_step": result.sec_per_step, "peak_mem_mb": result.peak_mem_mb,
        "resumed_from": result.resumed_from, "settings": asdict(result.settings),
    }

