"""`placement recommend`: the plan to follow at each budget, chosen by trials (study/recommend.py)."""
from __future__ import annotations

import json

import click

from .cli_settings import user_errors
from .errors import PlacementError


def _settings(budget, max_params, selectors, trial_steps, rates, r, batches, batch_size, max_length, seed, fast,
              lookahead_steps, lookahead_lr):
    from .plan.budget import parse_budgets
    from .study.recommend import DEFAULT_SELECTORS, RecommendSettings

    names = tuple(s.strip() for s in selectors.split(",") if s.strip()) if selectors else DEFAULT_SELECTORS
    settings = RecommendSettings(
        budgets=[] if max_params else parse_budgets(budget), max_params=max_params, selectors=names,
        trial_steps=trial_steps, r=r, alpha=2 * r, fast=fast, batches=batches, batch_size=batch_size,
        max_length=max_length, seed=seed, lookahead_steps=lookahead_steps, lookahead_lr=lookahead_lr,
        **({"rates": tuple(float(x) for x in rates.split(","))} if rates else {}))
    settings.check()
    return settings


@click.command("recommend")
@click.option("--model", help="hub id, model folder, GGUF file or the embedded alias")
@click.option("--data", help="training data: builtin:NAME or a file (the split rule is compare's)")
@click.option("--budget", default="1%,2.5%,5%", show_default=True,
              help="comma-separated percents of all-linear LoRA's trainable parameters at the same rank")
@click.option("--max-params", type=int, help="one budget of this many trainable parameters instead of --budget")
@click.option("--selectors", help="comma-separated selectors (default: page, lookahead, lora_drop, snr, kappa, "
              "params, down, ffn; also page_opt, grad_energy, fisher, act_norm)")
@click.option("--entrant", "entrants", multiple=True, type=click.Path(), help="a plan file to enter as it is")
@click.option("--trial-steps", default=20, show_default=True, help="steps of a rung-0 trial (rung 1: three times)")
@click.option("--rates", help="comma-separated rates of the sweep on page's plan (default 1e-3,3e-3,1e-2)")
@click.option("--r", "r", default=8, show_default=True, help="LoRA rank (alpha = 2r) of the probe and the budgets")
@click.option("--batches", default=8, show_default=True, help="calibration batches for the probe and lookahead")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--max-length", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True, help="the data split (compare's rule) and the probe")
@click.option("--fast", is_flag=True, help="the fast probe (no page_opt)")
@click.option("--lookahead-steps", default=16, show_default=True, help="steps of the lookahead run")
@click.option("--lookahead-lr", default=3e-3, show_default=True, help="AdamW rate of the lookahead run")
@click.option("--out", type=click.Path(), help="the run folder")
@click.option("--storage", help="the trial store: an Optuna database URL (default: a journal file in --out)")
@click.option("--join", "join", type=click.Path(), help="work on the trials of a running recommendation folder")
@click.option("--dry-run", is_flag=True, help="print the trial count and estimated time, then exit")
@click.option("--overwrite", is_flag=True, help="replace an earlier run in --out")
@click.option("--resume", is_flag=True, help="continue the run in --out, keeping its finished trials")
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the decision as JSON")
@click.option("--quiet", is_flag=True, help="no progress bars or log lines")
@user_errors
def recommend_cmd(model, data, budget, max_params, selectors, entrants, trial_steps, rates, r, batches, batch_size,
                  max_length, seed, fast, lookahead_steps, lookahead_lr, out, storage, join, dry_run, overwrite,
                  resume, device, as_json, quiet):
    """Train every selector's plan at every budget briefly, the best third longer with two seeds, and write the
    plan to follow at each budget (plan-P%.json), recommendation.md, trials.csv and pareto.png."""
    from .study import recommend as rec

    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    if join:
        rec.join_recommend(join, storage=storage, device=device, progress=not quiet, log=log)
        return log(f"done       the trials of {join} are finished")
    if not model or not data:
        raise PlacementError("recommend needs --model and --data (or --join RUN to work on a running one)")
    settings = _settings(budget, max_params, selectors, trial_steps, rates, r, batches, batch_size, max_length,
                         seed, fast, lookahead_steps, lookahead_lr)
    if not dry_run and not out:
        raise PlacementError("recommend needs --out, the run folder (or --dry-run)")
    decision = _run(rec, model, data, settings, out, storage, entrants, dry_run, (overwrite, resume), device,
                    quiet, log)
    if decision is not None:
        click.echo(json.dumps(decision, indent=2, default=str) if as_json else
                   "\n".join(f"{b:>8s}  {d['selector']}  ({d['params']:,} parameters, validation loss "
                             f"{d['val_loss']:.4f})" for b, d in decision.items()))


def _run(rec, model, data, settings, out, storage, entrants, dry_run, replace, device, quiet, log):
    from .model.load import load
    from .outputs import run_folder

    if dry_run:
        lm, tokenizer, _ = load(model, device=device, quiet=quiet)
        rec.dry_run(lm, tokenizer, data, settings, entrants, log)
        return None
    overwrite, resume = replace
    with run_folder(out, overwrite=overwrite, resume=resume):
        lm, tokenizer, source = load(model, device=device, quiet=quiet)
        return rec.run_recommend(lm, tokenizer, source, data, settings, out, storage=storage, entrants=entrants,
                                 resume=resume, progress=not quiet, log=log)


def _plan_reads_recommendations(plan_command: click.Command) -> None:
    """`placement plan RUN --strategy recommended --budget P%` is `placement plan RUN/plan-P%.json`: the plan
    command's own rendering and export, on the recommendation folder's plan at that budget."""
    strategy = next(p for p in plan_command.params if p.name == "strategy")
    strategy.type = click.Choice(list(strategy.type.choices) + ["recommended"])
    strategy.help = (strategy.help or "") + "; recommended: the plan a recommend run chose at --budget"
    plan_command.params.append(click.Option(["--budget"], help="with --strategy recommended: the budget, e.g. 2.5%"))
    original = plan_command.callback

    def callback(*args, budget=None, **kwargs):
        if kwargs.get("strategy") == "recommended":
            from .study.recommend_report import recommended_plan, recommended_path

            if not budget:
                raise click.ClickException("--strategy recommended needs --budget, e.g. --budget 2.5%")
            try:
                recommended_plan(kwargs["source"], budget)
            except PlacementError as err:
                raise click.ClickException(str(err).splitlines()[0]) from None
            kwargs.update(source=str(recommended_path(kwargs["source"], budget)), strategy=None)
        elif budget:
            raise click.ClickException("--budget means nothing without --strategy recommended: drop it")
        return original(*args, **kwargs)
    plan_command.callback = callback


def register(main: click.Group) -> None:
    """Add `recommend` to the command line, and the recommended strategy to `plan`."""
    main.add_command(recommend_cmd)
    _plan_reads_recommendations(main.commands["plan"])
