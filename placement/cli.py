"""The `placement` command line: each command parses its options, claims its output folder and calls one study
function; every user error is one line (`PlacementError`)."""
from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import click

from .cli_options import (ModelArgs, compare_options, demo_options, launchable, model_options, output_options,
                          plan_options, probe_options, replan_options, stability_options, train_command_options,
                          user_errors, validate_options, writes_run)
from .outputs import finite, run_folder


def _load(args: ModelArgs, quiet=True):
    from .distributed import local_device
    from .model import load

    if not quiet:
        click.echo(f"loading {args.model} ...", err=True)
    return load.load(args.model, dtype=args.dtype, device=local_device(args.device),
                     trust_remote_code=args.trust_remote_code, quiet=quiet, device_map=args.device_map)


def _no_fsdp(model: ModelArgs, command: str) -> None:
    if model.fsdp:
        from .errors import PlacementError
        raise PlacementError(f"--fsdp is for profile, train and compare; {command} runs the model whole on each rank")


def _emit(summary: dict, lines: list[str], as_json: bool) -> None:
    click.echo(json.dumps(finite(summary), indent=2, default=str) if as_json else "\n".join(lines))


def _finish(out, make_report: bool) -> None:
    if make_report:
        from .report.html import write_report
        write_report(out)


def _log(quiet: bool):
    return (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))


def _splits(data, eval_data, n_test, n_validation, seed, quiet):
    from .data import load_splits

    splits = load_splits(data, eval_data, n_test, n_validation, seed)
    if not quiet:
        click.echo(f"data       {len(splits[0])} training, {len(splits[1])} validation and {len(splits[2])} test "
                   f"examples ({'from ' + eval_data if eval_data else 'held out'})", err=True)
    return splits


def _comparison(out, overwrite, model: ModelArgs, data, splits, base, probe_settings, batches, quiet, settings,
                make_report, then=None, resume=False, scores_folder=None):
    """Claim the folder, load the model, run the compare study (and `then(plan)`), write the report if asked."""
    from .study.compare import run_comparison

    with run_folder(out, overwrite=overwrite, resume=resume) as ledger:
        if scores_folder:
            ledger.keep(scores_folder)  # the profile this run reads stays with it
        lm, tokenizer, source = _load(model, quiet)
        comparison, base = run_comparison(lm, tokenizer, source, data, splits, settings, out, base=base,
                                          probe_settings=probe_settings, batches=batches, progress=not quiet,
                                          log=_log(quiet), scores_folder=scores_folder)
        if then is not None:
            then(base)
        _finish(out, make_report)
    return comparison, base


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="placement")
def main():
    """Find where a LoRA adapter should go in a causal LM, by the gradient energy a fresh adapter would receive
    at each site (PAGE), and write a placement plan any PEFT user can apply."""


@main.command()
@model_options
@output_options
@click.option("--include-routers", is_flag=True, help="also list mixture-of-experts routers")
@user_errors
def sites(model, as_json, quiet, include_routers):
    """List the candidate adapter sites: every linear map inside the decoder blocks."""
    from .model.sites import find_sites, site_table

    found = find_sites(_load(model)[0], include_routers=include_routers)
    _emit([s.to_row() for s in found], site_table(found), as_json)


@main.command()
@probe_options
@writes_run
def profile(model, data, batches, batch_size, max_length, seed, rank, alpha, rslora, fast, draws, score, spectrum_k,
            checkpointing, bootstrap, families, strategy, out, overwrite, make_report, as_json, quiet):
    """Probe every site on calibration batches, rank them, and write scores.csv, plan.json and heatmap.png."""
    from .data import load_examples
    from .probe import ProbeSettings
    from .study.profile import parse_families, run_profile, summary_lines, write_profile

    chosen = parse_families(families)
    settings = ProbeSettings(r=rank, alpha=alpha, seed=seed, mode="fast" if fast else "exact", draws=draws,
                             use_rslora=rslora, checkpointing=checkpointing, spectrum_k=spectrum_k)
    settings.check()
    examples = load_examples(data, seed)  # read the data before the model: a bad file fails in a second
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = _load(model, quiet)
        result = run_profile(lm, tokenizer, source, data, batches=batches, batch_size=batch_size,
                             max_length=max_length, settings=settings, score=score, strategy=strategy,
                             progress=not quiet, examples=examples, bootstrap=bootstrap, fsdp=model.fsdp,
                             families=tuple(chosen))
        write_profile(result, out, title=f"{source.name} on {data}: {score}")
        _finish(out, make_report)
    summary = result.summary() | {"out": out, "targets": result.plan.targets}
    _emit(summary, summary_lines(summary, result, out), as_json)


@main.command("plan")
@click.argument("source", type=click.Path())
@replan_options
@plan_options
@output_options
@user_errors
def plan_cmd(source, strategy, rank, variant, fmt, check_model, trust_remote_code, out, peft_config, overwrite,
             as_json, quiet):
    """Make a placement plan from a profile's folder, its scores.csv or a plan file, and write it in --format (our
    plan JSON, PEFT, axolotl, LLaMA-Factory, Spectrum); without --out or --peft-config print it."""
    from .plan.export import export, plan_from_source, replan
    from .plan.formats import render

    new = replan(source, plan_from_source(source, rank), strategy).with_variant(variant)
    if check_model:
        new.check(_load(ModelArgs(check_model, trust_remote_code=trust_remote_code))[0])
    if not out and not peft_config:
        return click.echo(render(new, fmt), nl=False)
    _emit(*export(new, out, peft_config, overwrite, fmt), as_json)


@main.command()
@stability_options
@writes_run
def stability(model, datas, batches, batch_size, max_length, seed, top_k, out, overwrite, make_report, as_json, quiet):
    """Probe one model on several tasks and say how far their site rankings agree (Spearman, Kendall, top-1, top-k)."""
    _no_fsdp(model, "stability")
    from .data import load_examples
    from .study.stability import run_stability, stability_summary, task_names

    task_names(list(datas))
    examples = {d: load_examples(d, seed) for d in datas}  # every file is read before the model loads
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = _load(model, quiet)
        table, names, tops = run_stability(lm, tokenizer, source, examples, out, batches=batches,
                                           batch_size=batch_size, max_length=max_length, seed=seed, top_k=top_k,
                                           progress=not quiet)
        _finish(out, make_report)
    _emit(*stability_summary(table, names, tops, datas, out), as_json)


@main.command()
@click.argument("run_dir", type=click.Path())
@user_errors
def report(run_dir):
    """Write RUN_DIR/report.html: one self-contained page for a profile, compare or stability folder."""
    from .report.html import write_report

    click.echo(f"wrote {write_report(run_dir)}")


@main.command("train")
@train_command_options
@output_options
@user_errors
@launchable
def train_cmd(plan_path, model, data, eval_data, n_test, n_validation, steps, checkpointing, lr, batch_size,
              max_length, seed, max_new_tokens, rank, variant, save_every, resume, merge, out, overwrite, as_json,
              quiet):
    """Train a LoRA on a plan's sites, evaluate it, and write a PEFT adapter with metrics.json and loss.csv."""
    from .plan import Plan
    from .train import TrainSettings, checkpoint_refusal
    from .train.run import summary_lines, train_and_evaluate

    chosen = Plan.load(plan_path).with_rank(rank).with_variant(variant)
    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                             save_every=save_every, checkpointing=checkpointing, fsdp=model.fsdp)
    settings.check(max_new_tokens)
    train_set, _, test_set = _splits(data, eval_data, n_test, n_validation, seed, quiet)
    model = replace(model, model=model.model or chosen.model.get("name"))
    with run_folder(out, overwrite=overwrite, resume=resume, keep_on_error=("checkpoints/",),
                    refusal_hint=checkpoint_refusal(out)):
        lm, tokenizer, _ = _load(model, quiet)
        run, result, metrics = train_and_evaluate(
            lm, tokenizer, chosen, train_set, test_set, settings, out=out, model_name=model.model,
            max_new_tokens=max_new_tokens, resume=resume, merge=merge, progress=not quiet,
            extra={"data": data, "eval_data": eval_data})
    _emit(metrics, summary_lines(run, result, chosen, test_set, out, merge), as_json)


@main.command()
@compare_options
@writes_run
def compare(model, data, eval_data, n_test, n_validation, steps, checkpointing, lr, batch_size, max_length, seed,
            max_new_tokens, arms, rank, variant, alpha, scores, batches, lr_sweep, lr_grid, sweep_arms, sweep_steps,
            seeds, resume, out, overwrite, make_report, as_json, quiet):
    """Train every arm on the same data, order, steps and seed; tabulate quality, parameters, time and memory."""
    from .probe import ProbeSettings
    from .study.compare import CompareSettings, compare_inputs, parse_rates
    from .train import TrainSettings

    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                             checkpointing=checkpointing, fsdp=model.fsdp)
    settings.check(max_new_tokens)
    probe_settings = ProbeSettings(r=rank, alpha=alpha, seed=seed)
    probe_settings.check()
    splits = _splits(data, eval_data, n_test, n_validation, seed, quiet)
    parsed, swept, base = compare_inputs(arms, splits, lr_sweep, sweep_arms, scores, max_new_tokens, variant)
    compare_settings = CompareSettings(parsed, settings, lr_sweep=lr_sweep, sweep_arms=swept, seeds=seeds,
                                       lrs=parse_rates(lr_grid), max_new_tokens=max_new_tokens,
                                       sweep_steps=sweep_steps, resume=resume)
    compare_settings.check()
    comparison, base = _comparison(out, overwrite, model, data, splits, base, probe_settings, batches, quiet,
                                   compare_settings, make_report, resume=resume, scores_folder=scores)
    _emit({"dominant_site": base.dominant_site, "out": out, "rows": comparison.table.to_dict("records")},
          [comparison.markdown(), f"wrote {out}/comparison.csv, comparison.md, curves.png, arms/"], as_json)


@main.command()
@validate_options
@writes_run
def validate(model, data, scores, sites, steps, lr, step_lr, batch_size, max_length, seed, n_validation, batches, rank,
             alpha, out, overwrite, make_report, as_json, quiet):
    """Train one LoRA at each of --sites sites spread over the ranking and say which score predicts the gain."""
    _no_fsdp(model, "validate")
    from .data import load_examples, split_examples
    from .probe import ProbeSettings
    from .study import validate as study
    from .train import TrainSettings

    settings = study.ValidateSettings(study.parse_sites(sites), TrainSettings(
        steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed), step_lr=step_lr)
    settings.check()
    probe_settings = ProbeSettings(r=rank, alpha=alpha, seed=seed, spectrum_k=64)  # validate ranks by page_opt too
    probe_settings.check()
    train_set, val_set, _ = split_examples(load_examples(data, seed), test=0, validation=n_validation, seed=seed)
    given = study.read_scores(scores) if scores else None
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = _load(model, quiet)
        result = study.validate_study(lm, tokenizer, source, data, (train_set, val_set), settings, out, given=given,
                                      probe_settings=probe_settings, batches=batches, progress=not quiet)
        _finish(out, make_report)
    _emit(*study.summary(result, out), as_json)


@main.command()
@demo_options
@output_options
@user_errors
def demo(out, batches, steps, n_test, arms, as_json, quiet):
    """Profile the embedded SmolLM2-135M on builtin:arithmetic, plan, train the dominant site and all-linear LoRA
    on the same data, compare them and write the report folder (no network)."""
    from .plan import Strategy
    from .probe import ProbeSettings
    from .study.compare import CompareSettings, compare_inputs, demo_summary
    from .train import TrainSettings

    data, settings = "builtin:arithmetic", TrainSettings(steps=steps, batch_size=8, max_length=64, seed=0)
    settings.check()
    splits = _splits(data, None, n_test, 32, 0, quiet)
    parsed, _, _ = compare_inputs(arms, splits, False, None, None, 12)
    def top4(base):
        base.with_strategy(Strategy("top-k", k=4)).save(Path(out) / "profile" / "top4.json")

    comparison, base = _comparison(out, True, ModelArgs("smollm2-135m"), data, splits, None, ProbeSettings(), batches,
                                   quiet, CompareSettings(parsed, settings, max_new_tokens=12), True, then=top4)
    _emit(*demo_summary(comparison, base, out), as_json)


if __name__ == "__main__":
    sys.exit(main())
