"""The `placement` command line: each command receives its settings objects (built from their dataclasses, see
`cli_settings`), claims its output folder and calls one study function; every user error is one line
(`PlacementError`)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from .cli_options import (AdapterArgs, CalibrationArgs, DataArgs, ExportArgs, LaunchArgs, ModelArgs, OutputArgs,
                          ProfileArgs, RunArgs, SiteListArgs, StrategyArgs, TrainJobArgs, launchable)
from .cli_settings import given, settings, use, user_errors
from .errors import PlacementError
from .outputs import finite, run_folder
from .plan.strategies import parse_arms
from .probe.settings import ProbeSettings
from .study.compare import CompareSettings
from .study.recommend import RecommendSettings
from .study.validate import ValidateSettings
from .train.trainer import TrainSettings

BATCHING = ("batch_size", "max_length", "seed")  # the batches' shape and order, for commands that only probe
RUN = ("out", "overwrite", "make_report")


def _load(args: ModelArgs, quiet=True):
    from .distributed import local_device
    from .model import load

    if not quiet:
        click.echo(f"loading {args.model} ...", err=True)
    return load.load(args.model, dtype=args.dtype, device=local_device(args.device),
                     trust_remote_code=args.trust_remote_code, quiet=quiet, device_map=args.device_map)


def _no_fsdp(model: ModelArgs, command: str) -> None:
    if model.fsdp:
        raise PlacementError(f"--fsdp is for profile, train and compare; {command} runs the model whole on each rank")


def _no_probe_options(calibration: CalibrationArgs) -> None:
    """--scores replaces the probe, so the options that shape the probe would be silently ignored."""
    ignored = [name for name in ("r", "alpha") if given(name)]
    if calibration.scores and ignored:
        raise PlacementError(f"--{ignored[0]} shapes the probe, which --scores replaces: the profile's plan fixes "
                             "the rank and alpha; drop it, or profile again with it")


def _emit(summary: dict, lines: list[str], output: OutputArgs) -> None:
    click.echo(json.dumps(finite(summary), indent=2, default=str) if output.as_json else "\n".join(lines))


def _finish(run: RunArgs) -> None:
    if run.make_report:
        from .report.html import write_report
        write_report(run.out)


def _log(quiet: bool):
    return (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))


def _splits(data: DataArgs, seed: int, quiet: bool):
    from .data import load_splits

    splits = load_splits(data.data, data.eval_data, data.n_test, data.n_validation, seed)
    if not quiet:
        click.echo(f"data       {len(splits[0])} training, {len(splits[1])} validation and {len(splits[2])} test "
                   f"examples ({'from ' + data.eval_data if data.eval_data else 'held out'})", err=True)
    return splits


def _comparison(run: RunArgs, model: ModelArgs, output: OutputArgs, settings: CompareSettings, *, data: str, splits,
                base, probe: ProbeSettings, batches: int, scores=None, then=None):
    """Claim the folder, load the model, run the compare study (and `then(plan)`), write the report if asked."""
    from .study.compare import run_comparison

    with run_folder(run.out, overwrite=run.overwrite, resume=run.resume) as ledger:
        if scores:
            ledger.keep(scores)  # the profile this run reads stays with it
        lm, tokenizer, source = _load(model, output.quiet)
        comparison, base = run_comparison(lm, tokenizer, source, data, splits, settings, run.out, base=base,
                                          probe_settings=probe, batches=batches, progress=not output.quiet,
                                          log=_log(output.quiet), scores_folder=scores)
        if then is not None:
            then(base)
        _finish(run)
    return comparison, base


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="placement")
def main():
    """Find where a LoRA adapter should go in a causal LM, by the gradient energy a fresh adapter would receive
    at each site (PAGE), and write a placement plan any PEFT user can apply."""


@main.command()
@settings(model=ModelArgs, listing=SiteListArgs, output=OutputArgs)
def sites(model, listing, output):
    """List the candidate adapter sites: every linear map inside the decoder blocks."""
    from .model.sites import find_sites, site_table

    found = find_sites(_load(model)[0], include_routers=listing.include_routers)
    _emit([s.to_row() for s in found], site_table(found), output)


@main.command()
@settings(model=ModelArgs, data=use(DataArgs, "data"), calibration=use(CalibrationArgs, "batches"),
          batching=use(TrainSettings, *BATCHING, "checkpointing", build=False),
          probe=use(ProbeSettings, "r", "alpha", "use_rslora", "mode", "draws", "spectrum_k"), chosen=ProfileArgs,
          strategy=use(StrategyArgs, "strategy", "k", "max_params", "strategy_seed"), run=use(RunArgs, *RUN),
          output=OutputArgs, launch=LaunchArgs)
@launchable
def profile(model, data, calibration, batching, probe, chosen, strategy, run, output, launch):
    """Probe every site on calibration batches, rank them, and write scores.csv, plan.json and heatmap.png."""
    from .data import load_examples
    from .study.profile import parse_families, run_profile, summary_lines, write_profile

    families = parse_families(chosen.families)
    examples = load_examples(data.data, batching.seed)  # read the data before the model: a bad file fails in a second
    with run_folder(run.out, overwrite=run.overwrite):
        lm, tokenizer, source = _load(model, output.quiet)
        result = run_profile(lm, tokenizer, source, data.data, batches=calibration.batches,
                             batch_size=batching.batch_size, max_length=batching.max_length, settings=probe,
                             score=chosen.score, strategy=strategy.chosen(), progress=not output.quiet,
                             examples=examples, bootstrap=chosen.bootstrap, fsdp=model.fsdp, families=tuple(families))
        write_profile(result, run.out, title=f"{source.name} on {data.data}: {chosen.score}")
        _finish(run)
    summary = result.summary() | {"out": run.out, "targets": result.plan.targets}
    _emit(summary, summary_lines(summary, result, run.out), output)


@main.command("plan")
@click.argument("source", type=click.Path())
@settings(strategy=use(StrategyArgs, strategy=None), rank=use(ProbeSettings, "r", r=None, build=False),
          adapter=AdapterArgs, export=ExportArgs, model=use(ModelArgs, "model", "trust_remote_code", model=None),
          run=use(RunArgs, "out", "overwrite", out=None), output=OutputArgs)
def plan_cmd(source, strategy, rank, adapter, export, model, run, output):
    """Make a placement plan from a profile's folder, its scores.csv, a plan file or a recommend run's folder (with
    --strategy recommended --budget P%), and write it in --format (our plan JSON, PEFT, axolotl, LLaMA-Factory,
    Spectrum); without --out or --peft-config print it."""
    from .plan.export import export as write_plan, plan_from_source, replan
    from .plan.formats import render

    if run.out and Path(run.out).is_dir():
        raise PlacementError(f"--out {run.out} is a folder: plan writes one file there; name the file")
    if export.peft_config and Path(export.peft_config).is_file():
        raise PlacementError(f"--peft-config {export.peft_config} is a file: name the folder for adapter_config.json")
    base = plan_from_source(strategy.folder_plan(source), rank.r)  # recommended: the run's plan at --budget
    new = replan(source, base, strategy.chosen()).with_variant(adapter.variant)
    if model.model:
        new.check(_load(model)[0])
    if not run.out and not export.peft_config:
        return click.echo(render(new, export.fmt), nl=False)
    _emit(*write_plan(new, run.out, export.peft_config, run.overwrite, export.fmt), output)


@main.command()
@settings(model=ModelArgs, data=use(DataArgs, "data", data=()), calibration=use(CalibrationArgs, "batches"),
          batching=use(TrainSettings, *BATCHING, build=False), top=use(StrategyArgs, "k", k=5, build=False),
          run=use(RunArgs, *RUN), output=OutputArgs, launch=LaunchArgs)
@launchable
def stability(model, data, calibration, batching, top, run, output, launch):
    """Probe one model on several tasks and say how far their site rankings agree (Spearman, Kendall, top-1, top-k)."""
    _no_fsdp(model, "stability")
    from .data import load_examples
    from .study.stability import run_stability, stability_summary, task_names

    task_names(list(data.data))
    examples = {d: load_examples(d, batching.seed) for d in data.data}  # every file is read before the model loads
    with run_folder(run.out, overwrite=run.overwrite):
        lm, tokenizer, source = _load(model, output.quiet)
        table, names, tops = run_stability(lm, tokenizer, source, examples, run.out, batches=calibration.batches,
                                           batch_size=batching.batch_size, max_length=batching.max_length,
                                           seed=batching.seed, top_k=top.k, progress=not output.quiet)
        _finish(run)
    _emit(*stability_summary(table, names, tops, data.data, run.out), output)


@main.command()
@click.argument("run_dir", type=click.Path())
@user_errors
def report(run_dir):
    """Write RUN_DIR/report.html: one self-contained page for a profile, compare, stability, validate or recommend
    folder."""
    from .report.html import write_report

    click.echo(f"wrote {write_report(run_dir)}")


@main.command("train")
@settings(job=TrainJobArgs, model=use(ModelArgs, model=None), data=DataArgs, train=TrainSettings,
          evaluation=use(CompareSettings, "max_new_tokens", build=False),
          rank=use(ProbeSettings, "r", r=None, build=False), adapter=AdapterArgs,
          run=use(RunArgs, "out", "overwrite", "resume"), output=OutputArgs, launch=LaunchArgs)
@launchable
def train_cmd(job, model, data, train, evaluation, rank, adapter, run, output, launch):
    """Train a LoRA on a plan's sites, evaluate it, and write a PEFT adapter with metrics.json and loss.csv."""
    from .plan import Plan
    from .train import checkpoint_refusal
    from .train.run import summary_lines, train_and_evaluate

    chosen = Plan.load(job.plan).with_rank(rank.r).with_variant(adapter.variant)
    train_set, _, test_set = _splits(data, train.seed, output.quiet)
    model = replace(model, model=model.model or chosen.model.get("name"))
    with run_folder(run.out, overwrite=run.overwrite, resume=run.resume, keep_on_error=("checkpoints/",),
                    refusal_hint=checkpoint_refusal(run.out)):
        lm, tokenizer, _ = _load(model, output.quiet)
        result, fitted, metrics = train_and_evaluate(
            lm, tokenizer, chosen, train_set, test_set, train, out=run.out, model_name=model.model,
            max_new_tokens=evaluation.max_new_tokens, resume=run.resume, merge=job.merge,
            progress=not output.quiet, extra={"data": data.data, "eval_data": data.eval_data})
    _emit(metrics, summary_lines(result, fitted, chosen, test_set, run.out, job.merge), output)


@main.command()
@settings(model=ModelArgs, data=DataArgs,
          train=use(TrainSettings, "steps", "checkpointing", "lr", "warmup_steps", "schedule", *BATCHING),
          compare=use(CompareSettings, "max_new_tokens", "arms", "plan_arms", "reference", "lr_sweep", "lrs",
                      "sweep_arms", "sweep_steps", "seeds", "eval_at", build=False),
          probe=use(ProbeSettings, "r", "alpha"), calibration=CalibrationArgs, adapter=AdapterArgs,
          run=use(RunArgs, *RUN, "resume"), output=OutputArgs, launch=LaunchArgs)
@launchable
def compare(model, data, train, compare, probe, calibration, adapter, run, output, launch):
    """Train every arm on the same data, order, steps and seed; tabulate quality, parameters, time and memory."""
    from .study.compare import compare_inputs, parse_rates

    _no_probe_options(calibration)
    splits = _splits(data, train.seed, output.quiet)
    arms, swept, base = compare_inputs(compare.arms, splits, compare.lr_sweep, compare.sweep_arms, calibration.scores,
                                       compare.max_new_tokens, adapter.variant, compare.plan_arms)
    study = CompareSettings(arms, train, lr_sweep=compare.lr_sweep, sweep_arms=swept, seeds=compare.seeds,
                               lrs=parse_rates(compare.lrs), max_new_tokens=compare.max_new_tokens,
                               sweep_steps=compare.sweep_steps, reference=compare.reference, eval_at=compare.eval_at,
                               resume=run.resume)
    comparison, base = _comparison(run, model, output, study, data=data.data, splits=splits, base=base,
                                   probe=probe, batches=calibration.batches, scores=calibration.scores)
    _emit({"dominant_site": base.dominant_site, "out": run.out, "rows": comparison.table.to_dict("records")},
          [comparison.markdown(), f"wrote {run.out}/comparison.csv, comparison.md, curves.png, arms/"], output)


@main.command()
@settings(model=ModelArgs, data=use(DataArgs, "data", "n_validation"),
          validate=use(ValidateSettings, "sites", "train.steps", "train.lr", "step_lr", "role_sweep", "role_lr_grid",
                       "role_sweep_steps", *(f"train.{name}" for name in BATCHING)),
          probe=use(ProbeSettings, "r", "alpha", spectrum_k=64),  # validate ranks by page_opt too
          calibration=CalibrationArgs, run=use(RunArgs, *RUN), output=OutputArgs, launch=LaunchArgs)
@launchable
def validate(model, data, validate, probe, calibration, run, output, launch):
    """Train one LoRA at each of --sites sites spread over the ranking and say which score predicts the gain."""
    _no_fsdp(model, "validate")
    _no_probe_options(calibration)
    from .data import load_examples, split_examples
    from .study import validate as study

    seed = validate.train.seed
    train_set, val_set, _ = split_examples(load_examples(data.data, seed), test=0, validation=data.n_validation,
                                           seed=seed)
    given_scores = study.read_scores(calibration.scores) if calibration.scores else None
    with run_folder(run.out, overwrite=run.overwrite):
        lm, tokenizer, source = _load(model, output.quiet)
        result = study.validate_study(lm, tokenizer, source, data.data, (train_set, val_set), validate, run.out,
                                      given=given_scores, probe_settings=probe, batches=calibration.batches,
                                      progress=not output.quiet)
        _finish(run)
    _emit(*study.summary(result, run.out), output)


@main.command()
@settings(run=use(RunArgs, "out", out="runs/demo", overwrite=True, make_report=True),
          calibration=use(CalibrationArgs, "batches"), train=use(TrainSettings, "steps", steps=40, max_length=64),
          data=use(DataArgs, "n_test", data="builtin:arithmetic", n_test=60, n_validation=32),
          compare=use(CompareSettings, "arms", arms=parse_arms("dominant,all-linear"), build=False),
          recommend=use(RecommendSettings, "trial_steps", trial_steps=6, build=False),
          probe=use(ProbeSettings, "lookahead_steps", lookahead_steps=8, build=False), output=OutputArgs)
def demo(run, calibration, train, data, compare, recommend, probe, output):
    """On the embedded SmolLM2-135M and builtin:arithmetic: a quick recommendation at 5% of all-linear LoRA's
    parameters, then the recommended plan, the dominant site and all-linear LoRA trained on the same data and
    compared on held-out questions, with the report (no network); an earlier demo in --out is replaced."""
    from .plan import Strategy
    from .study.compare import compare_inputs, demo_summary
    from .study.demo import quick_recommendation, recommendation_lines, run_demo

    splits = _splits(data, train.seed, output.quiet)
    arms, _, _ = compare_inputs(compare.arms, splits, False, None, None, 12)
    study = CompareSettings(arms, train, max_new_tokens=12)
    quick = quick_recommendation(study, data.n_test, data.n_validation, calibration.batches, recommend.trial_steps,
                                 probe.lookahead_steps)
    with run_folder(run.out, overwrite=run.overwrite):
        lm, tokenizer, source = _load(ModelArgs(), output.quiet)
        comparison, base, chosen = run_demo(lm, tokenizer, source, data.data, splits, study, quick, run.out,
                                            progress=not output.quiet, log=_log(output.quiet))
        base.with_strategy(Strategy("top-k", k=4)).save(Path(run.out) / "profile" / "top4.json")
        _finish(run)
    summary, lines = demo_summary(comparison, base, run.out)
    _emit(summary | {"recommended": chosen}, recommendation_lines(chosen) + lines, output)


from .cli_recommend import recommend  # noqa: E402  (its own module: the recommend study's command)

main.add_command(recommend)


if __name__ == "__main__":
    sys.exit(main())
