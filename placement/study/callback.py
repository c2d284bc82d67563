"""Profile inside a transformers `Trainer` (or TRL's `SFTTrainer`): at the start of training, probe the base model
on a few batches of the Trainer's own train dataloader and write the profile (scores.csv, plan.json, heatmaps) to
OUTPUT_DIR/placement, beside the Trainer's checkpoints.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[PlacementCallback(batches=4)])

The probe sees the model as it is when training begins: a PeftModel is unwrapped with `get_base_model()` and each
LoRA layer counts as the site it wraps (its lora_A, lora_B and base_layer are not sites); with B still zero, its
scores are those of the bare model.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..data.batches import Batch
from ..data.examples import IGNORE
from ..errors import PlacementError
from ..ledger import run_folder
from ..model.load import ModelSource
from ..probe import ProbeSettings
from ..train.apply import unwrap
from .profile import Profile, profile_batches, write_profile

logger = logging.getLogger("placement")


def to_batch(batch: dict) -> Batch:
    """A Trainer batch (input_ids, attention_mask, labels with -100 where unscored) as the probe's Batch; without
    labels every attended token is a target, as in causal-LM collators."""
    if "input_ids" not in batch:
        raise PlacementError("the Trainer's batches have no input_ids: PlacementCallback profiles token batches of "
                             "a causal LM")
    ids = batch["input_ids"].detach().cpu()
    mask = batch.get("attention_mask")
    mask = torch.ones_like(ids) if mask is None else mask.detach().cpu()
    labels = batch.get("labels")
    labels = ids.masked_fill(mask == 0, IGNORE) if labels is None else labels.detach().cpu()
    return Batch(ids.long(), mask.long(), labels.long())


class PlacementCallback(TrainerCallback):
    """Profile the model once, at `on_train_begin`; the result is kept as `self.profile`.

    `batches` of the train dataloader are probed (exact PAGE, or `fast=True`) at LoRA rank `r` and `alpha`; the
    plan's strategy is `dominant` unless another `placement.plan.Strategy` is given. Rank 0 writes the profile
    folder and appends a `placement/*` record (dominant site, its share, top-1/top-2) to the Trainer's log history,
    which lands in trainer_state.json; the same line goes to the `placement` logger.

    The profile folder is a run folder of its own: a fresh one, or (with `overwrite=True`) one an earlier callback
    wrote, whose listed files are replaced. A folder holding anything else is refused before the probe runs.
    """

    def __init__(self, batches: int = 4, out: str = "placement", score: str = "page", strategy=None, r: int = 8,
                 alpha: float = 16.0, fast: bool = False, seed: int = 0, bootstrap: int = 0,
                 overwrite: bool = False):
        if batches < 1:
            raise PlacementError(f"batches={batches}: the callback needs at least one batch to profile")
        self.batches, self.out, self.score, self.strategy = batches, out, score, strategy
        self.settings = ProbeSettings(r=r, alpha=alpha, mode="fast" if fast else "exact", seed=seed)
        self.bootstrap, self.overwrite = bootstrap, overwrite
        self.profile: Profile | None = None
        self.folder: Path | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.profile is not None or model is None or train_dataloader is None:
            return
        with contextlib.ExitStack() as claimed:
            if state.is_world_process_zero:  # claimed before the probe: a refusal costs nothing
                self.folder = Path(args.output_dir) / self.out
                claimed.push(self._claim(self.folder).__exit__)
            name = self._probe(model, train_dataloader)
            summary = self.profile.summary()
            record = {"placement/dominant_site": summary["dominant_site"], "placement/share": summary["share"],
                      "placement/top1_top2_ratio": summary["top1_top2_ratio"], "step": state.global_step}
            if state.is_world_process_zero:
                write_profile(self.profile, self.folder, title=f"{name} on the Trainer's batches")
                state.log_history.append(record)
                logger.warning("placement: dominant site %s (%.1f%% of %s); profile in %s",
                               summary["dominant_site"], 100 * summary["share"], self.score, self.folder)

    def _claim(self, folder: Path):
        """Claim the profile's run folder; returns the entered claim (its __exit__ ends the run)."""
        claim = run_folder(folder, overwrite=self.overwrite)
        try:
            claim.__enter__()
        except PlacementError as err:
            raise PlacementError(f"PlacementCallback does not write its profile into {folder} ({err}): pass "
                                 "out= a new folder name, or overwrite=True to replace an earlier profile of "
                                 "the callback") from err
        return claim

    def _probe(self, model, train_dataloader) -> str:
        from peft import PeftModel

        base = unwrap(model)
        base = base.get_base_model() if isinstance(base, PeftModel) else base
        batches = [to_batch(b) for b in itertools.islice(train_dataloader, self.batches)]
        if not batches:
            raise PlacementError("the Trainer's train dataloader gave no batch to profile")
        name = getattr(base.config, "_name_or_path", "") or type(base).__name__
        was_training = base.training
        self.profile = profile_batches(base, ModelSource(name, name), batches, data="trainer train dataloader",
                                       batch_size=batches[0].input_ids.shape[0],
                                       max_length=batches[0].input_ids.shape[1], settings=self.settings,
                                       score=self.score, strategy=self.strategy, bootstrap=self.bootstrap)
        base.train(was_training)
        model.zero_grad(set_to_none=True)
        return name
