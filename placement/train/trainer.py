"""The compact adapter trainer: apply a plan (LoRA and the other families of PEFT, or our bottlenecks) and train it
with AdamW. Checkpoints and resume are in `checkpoints.py`, the saved adapter and run files in `export.py`.

One documented rule for every placement, so a comparison is fair: AdamW without weight decay, linear warm-up over
the first 10% of steps then linear decay to zero, gradient clipping at norm 1.0, the same data order and seed. A
learning curve from one run takes `--schedule constant` and a fixed `--warmup-steps` instead, so that the adapter at
step 40 of a long run is the one a 40-step run of the same settings ends with.
The trainer pays only for what it trains: the base stays frozen and the input embeddings never require grad, so
autograd records nothing below the lowest adapted layer, and logits are taken only at labelled positions.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import data as data_mod
from ..distributed import all_sum, rank_and_world
from ..errors import PlacementError
from ..families import adapters
from ..families.lora import MUTATES_BASE, variant_of
from ..measure import PeakMemory
from ..model.checkpointing import enable_checkpointing
from ..model.loss import SummedTokenLoss, token_loss
from ..model.shard import shard
from ..plan.plan import Plan
# the checkpoints and the adapter export live beside the loop; their names stay importable from here
from .checkpoints import (CHECKPOINTS, POINTER, TrainError, checkpoint_refusal, data_fingerprint,  # noqa: F401
                          fingerprint, latest_checkpoint, load_checkpoint, plan_fingerprint, remove_checkpoint,
                          remove_checkpoints, run_ledger, save_checkpoint)
from .export import refuse_merge, save_adapter, save_merged, write_run  # noqa: F401


def _linear(optimizer, settings: TrainSettings):
    from transformers import get_linear_schedule_with_warmup

    return get_linear_schedule_with_warmup(optimizer, settings.warmup_span(), settings.steps)


def _constant(optimizer, settings: TrainSettings):
    from transformers import get_constant_schedule_with_warmup

    return get_constant_schedule_with_warmup(optimizer, settings.warmup_span())


SCHEDULES = {"linear": _linear, "constant": _constant}  # --schedule NAME: the rate after the warm-up


@dataclass
class TrainSettings:
    # Fields with a "help" are command-line options too (placement/cli_settings.py builds them).
    steps: int = field(default=200, metadata={
        "help": "training steps (per arm in compare, per site in validate)", "range": (1, 10 ** 9)})
    lr: float = field(default=1e-3, metadata={
        "help": "peak learning rate (validate: the same for every site)", "range": (0, 10)})
    batch_size: int = field(default=8, metadata={"help": "examples per batch", "range": (1, 2 ** 16)})
    max_length: int = field(default=256, metadata={"help": "tokens per example, at most", "range": (1, 2 ** 20)})
    warmup: float = 0.1  # fraction of steps, unless warmup_steps is given
    warmup_steps: int | None = field(default=None, metadata={
        "help": "steps of linear warm-up (default: 10% of --steps)", "range": (0, 10 ** 9)})
    schedule: str = field(default="linear", metadata={
        "help": "the rate after the warm-up: linear decay to zero at the last step, or constant",
        "choices": tuple(SCHEDULES)})
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
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise TrainError(f"--warmup-steps {self.warmup_steps} leaves no step of training after it: pass fewer "
                             f"than --steps {self.steps}")
        if self.schedule not in SCHEDULES:
            raise TrainError(f"--schedule {self.schedule} is not a schedule: pass one of {', '.join(SCHEDULES)}")

    def warmup_span(self) -> int:
        """Steps of the linear warm-up: the given count, else the fraction of the run."""
        return int(self.warmup * self.steps) if self.warmup_steps is None else self.warmup_steps

    def record(self) -> dict:
        """The settings as fingerprints and checkpoints record them. The schedule options are left out at their
        defaults, so results recorded before these options existed keep their keys (and --resume keeps them)."""
        out = asdict(self)
        for name, default in (("warmup_steps", None), ("schedule", "linear")):
            if out[name] == default:
                del out[name]
        return out


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
    return SCHEDULES[settings.schedule](optimizer, settings)


def _optimiser(peft_model, settings: TrainSettings):
    """The trainable parameters, AdamW and its schedule (after sharding: FSDP2 swaps in sharded parameters)."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    return params, optimizer, _schedule(optimizer, settings)


def _one_step(step_loss, batch, step: int, params, optimizer, schedule, settings: TrainSettings):
    """One optimiser step; returns (the loss, the rate it was taken at)."""
    loss, value = step_loss(batch)
    if not math.isfinite(value):
        raise TrainError(f"the training loss is {value} at step {step + 1}: lower --lr or check the data")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, settings.clip)
    rate = schedule.get_last_lr()[0]
    optimizer.step()
    schedule.step()
    optimizer.zero_grad(set_to_none=True)
    return value, rate


def _start(out, resume: bool, ledger, peft_model, optimizer, schedule, settings, fingerprints):
    """(first step, losses, rates): from the newest checkpoint the run's ledger lists with `resume`; else from zero,
    after dropping the checkpoints of the run this one replaces (all checks have passed by now)."""
    if not resume:
        if out is not None and ledger is not None and ledger.record is not None:
            remove_checkpoints(out, ledger)
        return 0, [], []
    state = latest_checkpoint(out, ledger) if out is not None else None
    if state is None:
        raise TrainError(f"no checkpoint in {out}: run without --resume to start training")
    return load_checkpoint(state, peft_model, optimizer, schedule, settings, fingerprints)


def train(model, tokenizer, plan: Plan, examples: list, settings: TrainSettings, *, out: str | Path | None = None,
          resume: bool = False, progress: bool = False, on_step=None, ledger=None, evaluate_at=(),
          on_evaluate=None) -> TrainResult:
    """Train the plan's adapter. `model` is modified in place and returned with the adapter on it (a PeftModel for
    PEFT's families).

    With `out` and `settings.save_every`, a checkpoint (adapter, optimizer, schedule, RNG, step, and fingerprints of
    the plan and the data) is written under `out/checkpoints` every `save_every` steps, through the run folder's
    `ledger` (by default the one the command opened for `out`); `resume` continues from the newest complete one and
    ends with the same adapter as an uninterrupted run. `on_step(step, loss)` is called after every step, and
    `on_evaluate(step, model)` after each step of `evaluate_at` before the last, with the model in eval mode: a learning
    curve from one run (greedy evaluation draws no random numbers, so the run goes on as it would have).
    """
    settings.check()
    batches = data_mod.training_batches(tokenizer, examples, steps=settings.steps, batch_size=settings.batch_size,
                                        max_length=settings.max_length, seed=settings.seed)
    peft_model = apply_plan(model, plan, settings.seed)
    initial = initial_adapter(peft_model)
    if settings.checkpointing:
        enable_checkpointing(adapters.base_of(peft_model))
    root = shard(peft_model) if settings.fsdp else None  # before the optimizer: FSDP2 swaps in sharded parameters
    params, optimizer, schedule = _optimiser(peft_model, settings)
    ledger = run_ledger(out) if out is not None and ledger is None else ledger
    fingerprints = {"plan": plan_fingerprint(plan), "data": data_fingerprint(examples)}
    start, losses, lrs = _start(out, resume, ledger, peft_model, optimizer, schedule, settings, fingerprints)
    device = next(peft_model.parameters()).device
    step_loss = _step_loss(peft_model, device, settings, root)
    peft_model.train()
    seconds = []
    with PeakMemory(device) as peak, adapters.quiet():
        for step in tqdm(range(start, settings.steps), desc="training", disable=not progress, initial=start,
                         total=settings.steps):
            began = time.perf_counter()
            value, rate = _one_step(step_loss, batches[step], step, params, optimizer, schedule, settings)
            seconds.append(time.perf_counter() - began)
            losses.append(value)
            lrs.append(rate)
            done = step + 1
            if out is not None and settings.save_every and done % settings.save_every == 0 and done < settings.steps:
                save_checkpoint(Path(out), peft_model, optimizer, schedule, done, losses, lrs, settings, fingerprints,
                                ledger)
            if on_step is not None:
                on_step(done, value)
            if on_evaluate is not None and done in evaluate_at and done < settings.steps:
                peft_model.eval()
                on_evaluate(done, peft_model)
                peft_model.train()
    peft_model.eval()
    if root is not None:  # evaluation calls the decoder and the head directly: keep the root's weights gathered
        root.unshard()
    return TrainResult(peft_model, losses, lrs, seconds, peak.mib, sum(p.numel() for p in params), settings,
                       resumed_from=start, initial_adapter=initial)


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

