"""`placement recommend`: the plan to follow at each budget, chosen by trials (study/recommend.py). Its options
come from the settings dataclasses as every command's do: the study's own (`RecommendSettings`), the shared groups of
`cli_options` and the probe's, and the run's trial store and workers (`RecommendJob`)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import click

from .cli_options import CalibrationArgs, DataArgs, ModelArgs, OutputArgs, RunArgs, StrategyArgs, opt
from .cli_settings import settings, use
from .errors import PlacementError
from .probe.settings import ProbeSettings
from .study.recommend import RecommendSettings
from .train.trainer import TrainSettings


@dataclass(frozen=True)
class RecommendJob:
    """Where the trials live and who works on them, and what else enters."""

    storage: str | None = opt(None, "the trial store: an Optuna database URL, e.g. postgresql://... for workers on "
                                    "several machines (default: a journal file in --out)")
    join: str | None = opt(None, "work on the trials of a running recommendation folder (RUN) instead of starting "
                                 "one", path=True)
    dry_run: bool = opt(False, "print the trial count and estimated time, then exit")
    entrants: tuple[str, ...] = field(default=(), metadata={
        "help": "a plan file (ours, or another tool's) to enter as it is, at each budget it fits (repeatable)",
        "option": "--entrant", "path": True, "many": True})


@click.command("recommend")
@settings(model=use(ModelArgs, "model", "dtype", "device", "trust_remote_code"),
          data=use(DataArgs, "data", "n_test", "n_validation", data=None),
          budget=use(StrategyArgs, "budget", "max_params", budget=(1.0, 2.5, 5.0), build=False),
          probe=use(ProbeSettings, "r", "alpha", "mode", "lookahead_steps", "lookahead_lr", build=False),
          calibration=use(CalibrationArgs, "batches", build=False),
          batching=use(TrainSettings, "batch_size", "max_length", "seed", build=False),
          study=RecommendSettings, job=RecommendJob, run=use(RunArgs, "out", "overwrite", "resume", out=None),
          output=OutputArgs)
def recommend(model, data, budget, probe, calibration, batching, study, job, run, output):
    """Train every selector's plan at every budget briefly, the best third longer with two seeds, and write the
    plan to follow at each budget (plan-P%.json), recommendation.md, trials.csv and pareto.png."""
    from .study import recommend as rec

    log = (lambda line: None) if output.quiet else (lambda line: click.echo(line, err=True))
    if job.join:
        rec.join_recommend(job.join, storage=job.storage, device=model.device, progress=not output.quiet, log=log)
        return log(f"done       the trials of {job.join} are finished")
    if not data.data:
        raise PlacementError("recommend needs --data (or --join RUN to work on a running one)")
    if not job.dry_run and not run.out:
        raise PlacementError("recommend needs --out, the run folder (or --dry-run)")
    decision = _run(rec, model, data.data, study, job, run, output, log)
    if decision is not None:
        click.echo(json.dumps(decision, indent=2, default=str) if output.as_json else
                   "\n".join(f"{b:>8s}  {d['selector']}  ({d['params']:,} parameters, validation loss "
                             f"{d['val_loss']:.4f})" for b, d in decision.items()))


def _run(rec, model: ModelArgs, data: str, study: RecommendSettings, job: RecommendJob, run: RunArgs,
         output: OutputArgs, log):
    from .cli import _load
    from .outputs import run_folder

    if job.dry_run:
        lm, tokenizer, _ = _load(model, output.quiet)
        rec.dry_run(lm, tokenizer, data, study, job.entrants, log)
        return None
    with run_folder(run.out, overwrite=run.overwrite, resume=run.resume):
        lm, tokenizer, source = _load(model, output.quiet)
        return rec.run_recommend(lm, tokenizer, source, data, study, run.out, storage=job.storage,
                                 entrants=job.entrants, resume=run.resume, progress=not output.quiet, log=log)
