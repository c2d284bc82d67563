"""The `placement` command line: thin, it parses options and calls the modules."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from .errors import PlacementError
from .outputs import finite

MODEL_HELP = "smollm2-135m (embedded, no network), a hub id, a local model folder or a .gguf file"


def user_errors(fn):
    """Errors a user can cause become one line and exit 1; anything else is a bug and keeps its traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PlacementError as err:
            raise click.ClickException(str(err).splitlines()[0]) from None

    return wrapper


def model_options(fn):
    for option in reversed([
        click.option("--model", default="smollm2-135m", show_default=True, help=MODEL_HELP),
        click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"])),
        click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto"),
        click.option("--trust-remote-code", is_flag=True, help="allow the model's own code from its folder or hub repo"),
    ]):
        fn = option(fn)
    return fn


def output_options(fn):
    fn = click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary as JSON")(fn)
    return click.option("--quiet", is_flag=True, help="no progress bars")(fn)


report_option = click.option("--report", "make_report", is_flag=True, help="also write OUT/report.html")
overwrite_option = click.option("--overwrite", is_flag=True,
                                 help="replace an earlier run of placement in --out (only the files it listed)")


def _run_folder(out, overwrite: bool, **kwargs):
    """Claim --out for this run before any model loads: see placement.outputs.run_folder."""
    from .outputs import run_folder

    return run_folder(out, overwrite=overwrite, **kwargs)


def strategy_options(fn):
    from .plan import STRATEGIES

    for option in reversed([
        click.option("--strategy", default="dominant", show_default=True, type=click.Choice(STRATEGIES)),
        click.option("--k", type=int, default=None, help="sites for top-k, layers for last-k"),
        click.option("--max-params", type=int, default=None, help="trainable-parameter budget for --strategy budget"),
        click.option("--strategy-seed", type=int, default=0, show_default=True, help="seed of random-1"),
    ]):
        fn = option(fn)
    return fn


def _load(model, dtype, device, trust_remote_code, quiet):
    from . import models

    if not quiet:
        click.echo(f"loading {model} ...", err=True)
    return models.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=quiet)


def _emit(summary: dict, as_json: bool, lines: list[str]) -> None:
    if as_json:
        click.echo(json.dumps(finite(summary), indent=2, default=str))
    else:
        click.echo("\n".join(lines))


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
def sites(model, dtype, device, trust_remote_code, as_json, quiet, include_routers):
    """List the candidate adapter sites: every linear map inside the decoder blocks."""
    from .sites import find_sites

    lm, _, _ = _load(model, dtype, device, trust_remote_code, quiet=True)
    found = find_sites(lm, include_routers=include_routers)
    rows = [{"site": s.name, "layer": s.layer, "role": s.role, "d_in": s.d_in, "d_out": s.d_out} for s in found]
    lines = [f"{'site':48s} {'layer':>5s} {'role':>7s} {'d_in':>6s} {'d_out':>6s}"]
    lines += [f"{s.name:48s} {s.layer:5d} {s.role:>7s} {s.d_in:6d} {s.d_out:6d}" for s in found]
    lines.append(f"{len(found)} sites in {len({s.layer for s in found})} layers")
    _emit(rows, as_json, lines)


@main.command()
@model_options
@click.option("--data", required=True, help="builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="tokens per example, at most")
@click.option("--seed", type=int, default=0, show_default=True, help="data order and PEFT's draw of lora_A")
@click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank the scores assume")
@click.option("--alpha", type=float, default=16, show_default=True, help="LoRA alpha the scores assume")
@click.option("--rslora", is_flag=True, help="score for rsLoRA scaling, alpha / sqrt(r)")
@click.option("--fast", is_flag=True, help="never form a weight-sized gradient; page is estimated over --draws")
@click.option("--draws", type=int, default=8, show_default=True, help="draws of lora_A in --fast mode")
@click.option("--score", default="page", show_default=True,
              type=click.Choice(["page", "page_sampled", "grad_energy", "fisher"]), help="ranking score")
@click.option("--checkpointing", is_flag=True, help="gradient checkpointing: less memory, one more forward")
@click.option("--bootstrap", type=int, default=200, show_default=True,
              help="resamples of the calibration batches for rank intervals (0: none)")
@strategy_options
@click.option("--out", required=True, type=click.Path(), help="folder for scores, plan and heatmap")
@overwrite_option
@report_option
@output_options
@user_errors
def profile(model, dtype, device, trust_remote_code, data, batches, batch_size, max_length, seed, rank, alpha,
            rslora, fast, draws, score, checkpointing, bootstrap, strategy, k, max_params, strategy_seed, out,
            overwrite, as_json, quiet, make_report):
    """Probe every site on calibration batches, rank them, and write scores.csv, plan.json and heatmap.png."""
    from .plan import Strategy
    from .probe import ProbeSettings
    from .profile import load_examples, run_profile, write_profile

    chosen = Strategy(strategy, k=k, max_params=max_params, seed=strategy_seed)
    chosen.check()
    settings = ProbeSettings(r=rank, alpha=alpha, seed=seed, mode="fast" if fast else "exact", draws=draws,
                             use_rslora=rslora, checkpointing=checkpointing)
    settings.check()
    examples = load_examples(data, seed)  # read the data before the model: a bad file fails in a second
    with _run_folder(out, overwrite):
        lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
        result = run_profile(lm, tokenizer, source, data, batches=batches, batch_size=batch_size,
                             max_length=max_length, settings=settings, score=score, strategy=chosen,
                             progress=not quiet, examples=examples, bootstrap=bootstrap)
        write_profile(result, out, title=f"{source.name} on {data}: {score}")
        _finish(out, make_report)
    summary = result.summary() | {"out": out, "targets": result.plan.targets}
    ratio = summary["top1_top2_ratio"]
    _emit(summary, as_json, [
        f"dominant site   {summary['dominant_site']}  (layer {summary['layer']}, role {summary['role']})",
        f"its share       {100 * summary['share']:.1f}% of {score} over {summary['sites']} sites",
        f"top-1 / top-2   {ratio:.2f}x" if math.isfinite(ratio) else "top-1 / top-2   (one site scores)",
        f"effective sites {summary['effective_sites']:.1f}   gini {summary['gini']:.2f}",
    ] + ([
        f"stability       top in {100 * summary['p_top']:.0f}% of {bootstrap} bootstrap resamples; "
        f"top site fixed from batch {summary['top_stable_after_batches']} of {summary['batches']}",
    ] if "p_top" in summary else []) + [
        f"probe           {summary['batches']} batches, {summary['tokens']} target tokens, {summary['seconds']:.1f} s ({settings.mode})",
        f"plan            {result.plan.label}: {', '.join(result.plan.targets[:4])}"
        + (" ..." if len(result.plan.targets) > 4 else ""),
        f"wrote           {out}/scores.csv, plan.json, heatmap.png",
    ])


@main.command("plan")
@click.argument("source", type=click.Path())
@strategy_options
@click.option("--r", "rank", type=int, default=None, help="LoRA rank of the plan (default: the probe's)")
@click.option("--model", "check_model", default=None, help="check the plan against this model first (" + MODEL_HELP + ")")
@click.option("--trust-remote-code", is_flag=True, help="allow the model's own code when checking --model")
@click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the plan JSON here")
@click.option("--peft-config", type=click.Path(file_okay=False), default=None,
              help="write PEFT's adapter_config.json into this folder")
@click.option("--overwrite", is_flag=True, help="replace an existing --out file or adapter_config.json")
@output_options
@user_errors
def plan_cmd(source, strategy, k, max_params, strategy_seed, rank, check_model, trust_remote_code, out, peft_config,
             overwrite, as_json, quiet):
    """Make a placement plan from a profile's folder, its scores.csv or a plan file; without --out or --peft-config
    print the plan JSON."""
    from .outputs import json_text, write_new_file
    from .plan import Plan, Strategy

    path = Path(source)
    if not path.exists():
        raise PlacementError(f"{source} not found: pass the --out folder of placement profile or a plan file")
    base = Plan.load(path.parent / "plan.json" if path.suffix == ".csv" else path)
    chosen = Strategy(strategy, k=k, max_params=max_params, seed=strategy_seed)
    chosen.check()
    if rank is not None:
        if rank < 1:
            raise PlacementError(f"--r {rank} is not a LoRA rank: pass a positive integer")
        base.peft = dict(base.peft, r=rank)
    new = base.with_strategy(chosen)
    if check_model:
        lm, _, _ = _load(check_model, "float32", "cpu", trust_remote_code, quiet=True)
        new.check(lm)
    config = _peft_config_text(new) if peft_config else None
    if out:
        write_new_file(out, json_text(new.to_json()), overwrite)
    if peft_config:
        write_new_file(Path(peft_config) / "adapter_config.json", config, overwrite)
    if not out and not peft_config:
        click.echo(json_text(new.to_json()), nl=False)
        return
    rank_of = {row["site"]: row["rank"] for row in new.sites}
    by_rank = sorted(new.targets, key=lambda t: rank_of.get(t, 0))
    summary = {"strategy": new.label, "targets": by_rank, "trainable_params": new.trainable_params,
               "out": out, "peft_config": peft_config}
    _emit(summary, as_json, [
        f"strategy   {new.label}",
        f"targets    {len(by_rank)} by rank: {', '.join(by_rank[:6])}" + (" ..." if len(by_rank) > 6 else ""),
        f"trainable  {new.trainable_params:,} LoRA parameters at r={new.peft['r']}",
    ] + ([f"wrote      {out}"] if out else []) + ([f"wrote      {peft_config}/adapter_config.json"] if peft_config else []))


def _peft_config_text(plan) -> str:
    """PEFT's own adapter_config.json for a plan, with sorted targets, naming the model as the user gave it."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        plan.lora_config().save_pretrained(tmp)
        config = json.loads((Path(tmp) / "adapter_config.json").read_text(encoding="utf-8"))
    config["target_modules"] = sorted(config.get("target_modules") or [])
    config["base_model_name_or_path"] = plan.model.get("name")
    return json.dumps(finite(config), indent=2, sort_keys=True, allow_nan=False) + "\n"


def _task_name(spec: str) -> str:
    """A short, file-safe name for a data source: the builtin's name or the file's stem."""
    name = spec.removeprefix("builtin:") if spec.startswith("builtin:") else Path(spec).stem or spec
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


@main.command()
@model_options
@click.option("--data", "datas", required=True, multiple=True, help="a task, given twice or more: same forms as profile's --data")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches per task")
@click.option("--batch-size", type=int, default=8, show_default=True)
@click.option("--max-length", type=int, default=256, show_default=True, help="tokens per example, at most")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--k", "top_k", type=int, default=5, show_default=True, help="size of the top-k sets compared")
@click.option("--out", required=True, type=click.Path())
@overwrite_option
@report_option
@output_options
@user_errors
def stability(model, dtype, device, trust_remote_code, datas, batches, batch_size, max_length, seed, top_k, out,
              overwrite, as_json, quiet, make_report):
    """Probe one model on several tasks and say how far their site rankings agree (Spearman, Kendall, top-1, top-k)."""
    from .outputs import write_csv, write_text
    from .probe import ProbeSettings
    from .profile import load_examples, run_profile, write_profile
    from .ranking import agreement_table
    from .report import agreement_matrix

    names = [_task_name(d) for d in datas]
    if len(datas) < 2 or len(set(names)) < len(names):
        raise PlacementError("stability needs two or more different --data tasks: give --data once per task")
    examples = {d: load_examples(d, seed) for d in datas}  # every file is read before the model loads
    with _run_folder(out, overwrite):
        lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
        rankings, lines = {}, []
        for name, spec in zip(names, datas):
            profile = run_profile(lm, tokenizer, source, spec, batches=batches, batch_size=batch_size,
                                  max_length=max_length, settings=ProbeSettings(seed=seed), progress=not quiet,
                                  examples=examples[spec])
            write_profile(profile, Path(out) / name, title=f"{source.name} on {spec}: page")
            rankings[name] = profile.ranked.set_index("site")["page"]
            top = profile.ranked.iloc[0]
            lines.append(f"{name:>16s}: top {top.site} ({100 * top.share:.1f}%)")
        table = agreement_table(rankings, k=top_k)
        write_csv(Path(out) / "stability.csv", table)
        write_text(Path(out) / "stability.md", table.to_markdown(index=False, floatfmt=".3f") + "\n")
        agreement_matrix(table, names, Path(out) / "stability.png", title=f"{source.name}: site rankings across tasks")
        _finish(out, make_report)
    _emit(({"tasks": dict(zip(names, datas)), "pairs": table.to_dict("records"), "out": out}), as_json,
          lines + [table.to_markdown(index=False, floatfmt=".3f"), f"wrote {out}/stability.csv, stability.md, stability.png"])


@main.command()
@click.argument("run_dir", type=click.Path())
@user_errors
def report(run_dir):
    """Write RUN_DIR/report.html: one self-contained page for a profile, compare or stability folder."""
    from .report_html import write_report

    click.echo(f"wrote {write_report(run_dir)}")


def _finish(out, make_report: bool) -> None:
    """Write a run's HTML report when asked (run.json already records the command, versions and files)."""
    from .report_html import write_report

    if make_report:
        write_report(out)


def data_split_options(fn):
    for option in reversed([
        click.option("--data", required=True, help="training data: builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set"),
        click.option("--eval-data", default=None, help="test data in the same formats (default: held out from --data)"),
        click.option("--test", "n_test", type=int, default=None,
                     help="test examples [default: 10% of the distinct prompts, at most 100]"),
        click.option("--validation", "n_validation", type=int, default=None,
                     help="validation examples, held out from the training data [default: 10%, at most 64]"),
    ]):
        fn = option(fn)
    return fn


def train_options(fn):
    for option in reversed([
        click.option("--steps", type=int, default=200, show_default=True),
        click.option("--lr", type=float, default=1e-3, show_default=True, help="peak learning rate"),
        click.option("--batch-size", type=int, default=8, show_default=True),
        click.option("--max-length", type=int, default=256, show_default=True, help="tokens per example, at most"),
        click.option("--seed", type=int, default=0, show_default=True, help="data order, lora_A draw and splits"),
        click.option("--max-new-tokens", type=int, default=32, show_default=True, help="generation length for exact match"),
    ]):
        fn = option(fn)
    return fn


def _splits(data, eval_data, n_test, n_validation, seed, quiet=False):
    from .data import task_splits
    from .profile import load_examples

    if n_test is not None and n_test < 1:
        raise PlacementError(f"--test {n_test} leaves nothing to evaluate on: pass at least 1")
    examples = load_examples(data, seed)
    held = load_examples(eval_data, seed) if eval_data else None
    train_set, val_set, test_set = task_splits(examples, held, test=n_test, validation=n_validation, seed=seed)
    if not test_set:
        raise PlacementError(f"{data} has too few distinct prompts to hold out a test example: add data or pass --eval-data")
    if not quiet:
        source = f"from {eval_data}" if eval_data else "held out"
        click.echo(f"data       {len(train_set)} training, {len(val_set)} validation and {len(test_set)} test "
                   f"examples ({source})", err=True)
    return train_set, val_set, test_set


def _check_generation(max_new_tokens: int) -> None:
    if max_new_tokens < 1:
        raise PlacementError(f"--max-new-tokens {max_new_tokens} generates nothing: pass a positive number such as 32")


@main.command("train")
@click.option("--plan", "plan_path", required=True, type=click.Path(), help="a plan.json or a profile's folder")
@click.option("--model", default=None, help="default: the plan's model. " + MODEL_HELP)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["float32", "bfloat16", "float16"]))
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--trust-remote-code", is_flag=True, help="allow the model's own code from its folder or hub repo")
@data_split_options
@train_options
@click.option("--r", "rank", type=int, default=None, help="LoRA rank (default: the plan's)")
@click.option("--save-every", type=int, default=0, show_default=True, help="checkpoint every N steps (0: never)")
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --out")
@click.option("--merge", is_flag=True, help="also write the merged model to OUT/merged")
@click.option("--out", required=True, type=click.Path(), help="adapter folder (PEFT format)")
@overwrite_option
@output_options
@user_errors
def train_cmd(plan_path, model, dtype, device, trust_remote_code, data, eval_data, n_test, n_validation, steps, lr,
              batch_size, max_length, seed, max_new_tokens, rank, save_every, resume, merge, out, overwrite, as_json,
              quiet):
    """Train a LoRA on a plan's sites, evaluate it, and write a PEFT adapter with metrics.json and loss.csv."""
    from . import evaluate as ev
    from .outputs import write_csv
    from .plan import Plan, Strategy
    from .train import TrainSettings, run_metrics, save_merged, train, write_run

    chosen = Plan.load(plan_path)
    if rank is not None:
        chosen = chosen.with_strategy(Strategy("given", targets=chosen.targets, source=chosen.label), r=rank)
    if resume and overwrite:
        raise PlacementError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                             save_every=save_every)
    settings.check()
    _check_generation(max_new_tokens)
    train_set, _, test_set = _splits(data, eval_data, n_test, n_validation, seed, quiet)
    model_name = model or chosen.model.get("name")
    with _run_folder(out, overwrite, resume=resume, keep_on_error=("checkpoints/",), refusal_hint=_checkpoint_hint(out)):
        lm, tokenizer, _ = _load(model_name, dtype, device, trust_remote_code, quiet)
        run = train(lm, tokenizer, chosen, train_set, settings, out=out, resume=resume, progress=not quiet)
        result = ev.evaluate(run.model, tokenizer, test_set, max_length=max_length, max_new_tokens=max_new_tokens,
                             progress=not quiet)
        metrics = run_metrics(run, chosen) | {"eval_loss": result.eval_loss, "exact_match": result.exact_match,
                                              "balanced_accuracy": result.balanced_accuracy,
                                              "test_examples": len(test_set), "data": data, "eval_data": eval_data}
        write_run(run, out, metrics, model_name=model_name)
        write_csv(Path(out) / "predictions.csv", ev.predictions_frame(test_set, result))
        chosen.save(Path(out) / "plan.json")
        if merge:
            save_merged(run.model, tokenizer, Path(out) / "merged")
    lines = [
        f"trained    {chosen.label}: {len(chosen.targets)} site(s), {run.trainable_params:,} parameters, "
        f"{steps} steps at lr {lr:g}, {run.sec_per_step:.2f} s/step, peak {run.peak_mem_mb:.0f} MiB",
        f"loss       {run.losses[0]:.3f} -> {run.losses[-1]:.3f} (train), {result.eval_loss:.3f} held out",
    ]
    if result.exact_match is not None:
        lines.append(f"exact      {100 * result.exact_match:.1f}% of {len(test_set)} test examples")
    else:
        lines.append(f"exact      not scored: {ev.skipped_exact_match(test_set)}; held-out loss only")
    lines.append(f"wrote      {out}/adapter_model.safetensors, adapter_config.json, metrics.json, loss.csv"
                 + (", merged/" if merge else ""))
    _emit(metrics, as_json, lines)


def _checkpoint_hint(out):
    """The refusal for a train folder whose earlier run left a checkpoint: say how to continue it."""
    def hint(record: dict) -> str | None:
        if any(str(f).startswith("checkpoints/") for f in record.get("files", [])):
            return (f"--out {out} holds a checkpoint of an unfinished run: pass --resume to continue it, "
                    "or --overwrite to start afresh")
        return None

    return hint


def _compare_inputs(arms, splits, lr_sweep, sweep_arms, scores, max_new_tokens):
    """Everything about a comparison that can be wrong without a model, checked before any loading."""
    from .compare import parse_arms
    from .plan import Plan

    parsed = parse_arms(arms)
    _check_generation(max_new_tokens)
    if lr_sweep and not splits[1]:
        raise PlacementError("--lr-sweep needs a validation split: pass --validation N with N > 0")
    unknown = [a.strip() for a in (sweep_arms or "").split(",") if a.strip() and a.strip() not in {p.label for p in parsed}]
    if unknown:
        raise PlacementError(f"--sweep-arms names '{unknown[0]}', which is not in --arms: sweep arms of the comparison")
    return parsed, (Plan.load(scores) if scores else None)


def _compare(lm, tokenizer, source, data, splits, parsed, base, train_settings, *, rank, alpha, batches, out,
             quiet, lr_sweep=False, sweep_arms=None, max_new_tokens=32):
    """Probe (or use the given profile's plan), then train and evaluate every arm; shared by compare and the demo."""
    from .compare import CompareSettings, check_arms, run_compare
    from .probe import ProbeSettings
    from .profile import run_profile, write_profile
    from .report import write_comparison

    check_arms(parsed, lm)  # before the probe: an arm this model cannot give fails in seconds
    if base is not None:
        base.check(lm)
    else:
        probe_settings = ProbeSettings(r=rank, alpha=alpha, seed=train_settings.seed)
        probe_settings.check()
        profile = run_profile(lm, tokenizer, source, data, batches=batches, batch_size=train_settings.batch_size,
                              max_length=train_settings.max_length, settings=probe_settings, progress=not quiet,
                              examples=splits[0])
        write_profile(profile, Path(out) / "profile", title=f"{source.name} on {data}: page")
        base = profile.plan
    settings = CompareSettings(parsed, train_settings, lr_sweep=lr_sweep, max_new_tokens=max_new_tokens,
                               sweep_arms=[a.strip() for a in sweep_arms.split(",")] if sweep_arms else None)
    log = (lambda line: None) if quiet else (lambda line: click.echo(line, err=True))
    comparison = run_compare(lm, tokenizer, base, splits, settings, out, progress=not quiet, log=log)
    write_comparison(comparison, out, title=f"{source.name} on {data}")
    return comparison, base


@main.command()
@model_options
@data_split_options
@train_options
@click.option("--arms", default="dominant,all-linear,attn-qv,ffn,last-2,random-1,top-4", show_default=True,
              help="comma-separated: dominant, all-linear, attn-qv, ffn, random-1, top-N, last-N, kappa[-N], "
                   "snr[-N], each optionally :rN")
@click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank of arms without :rN")
@click.option("--alpha", type=float, default=16, show_default=True, help="LoRA alpha at rank --r (alpha / r is kept)")
@click.option("--scores", type=click.Path(), default=None, help="a profile's folder or plan.json instead of probing")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches of the probe")
@click.option("--lr-sweep", is_flag=True, help="try 1e-4, 3e-4, 1e-3, 3e-3 per arm, keep the best validation loss")
@click.option("--sweep-arms", default=None, help="comma-separated arms to sweep (default: all)")
@click.option("--out", required=True, type=click.Path())
@overwrite_option
@report_option
@output_options
@user_errors
def compare(model, dtype, device, trust_remote_code, data, eval_data, n_test, n_validation, steps, lr, batch_size,
            max_length, seed, max_new_tokens, arms, rank, alpha, scores, batches, lr_sweep, sweep_arms, out,
            overwrite, as_json, quiet, make_report):
    """Train every arm on the same data, order, steps and seed; tabulate quality, parameters, time and memory."""
    from .probe import ProbeSettings
    from .train import TrainSettings

    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed)
    settings.check()
    if not scores:
        ProbeSettings(r=rank, alpha=alpha, seed=seed).check()
    splits = _splits(data, eval_data, n_test, n_validation, seed, quiet)
    parsed, base = _compare_inputs(arms, splits, lr_sweep, sweep_arms, scores, max_new_tokens)
    with _run_folder(out, overwrite):
        lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
        comparison, base = _compare(lm, tokenizer, source, data, splits, parsed, base, settings, rank=rank,
                                    alpha=alpha, batches=batches, out=out, quiet=quiet, lr_sweep=lr_sweep,
                                    sweep_arms=sweep_arms, max_new_tokens=max_new_tokens)
        _finish(out, make_report)
    summary = {"dominant_site": min(base.sites, key=lambda row: row["rank"])["site"], "out": out,
               "rows": comparison.table.to_dict("records")}
    _emit(summary, as_json, [comparison.markdown(), f"wrote {out}/comparison.csv, comparison.md, curves.png, arms/"])


@main.command()
@click.option("--out", default="runs/demo", show_default=True, type=click.Path(),
              help="output folder; an earlier demo there is replaced")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches of the probe")
@click.option("--steps", type=int, default=60, show_default=True, help="training steps per arm")
@click.option("--test", "n_test", type=int, default=60, show_default=True, help="test examples")
@click.option("--arms", default="dominant,all-linear", show_default=True, help="arms to train and compare")
@output_options
@user_errors
def demo(out, batches, steps, n_test, arms, as_json, quiet):
    """Profile the embedded SmolLM2-135M on builtin:arithmetic, plan, train the dominant site and all-linear LoRA
    on the same data, compare them and write the report folder (no network)."""
    from .plan import Strategy
    from .train import TrainSettings

    data = "builtin:arithmetic"
    settings = TrainSettings(steps=steps, batch_size=8, max_length=64, seed=0)
    settings.check()
    splits = _splits(data, None, n_test, 32, 0, quiet)
    parsed, _ = _compare_inputs(arms, splits, False, None, None, 12)
    with _run_folder(out, overwrite=True):
        lm, tokenizer, source = _load("smollm2-135m", "float32", "cpu", False, quiet)
        comparison, base = _compare(lm, tokenizer, source, data, splits, parsed, None, settings, rank=8, alpha=16,
                                    batches=batches, out=out, quiet=quiet, max_new_tokens=12)
        base.with_strategy(Strategy("top-k", k=4)).save(Path(out) / "profile" / "top4.json")
        _finish(out, True)
    top = min(base.sites, key=lambda row: row["rank"])
    summary = {"dominant_site": top["site"], "share": top["share"], "out": out,
               "rows": comparison.table.to_dict("records")}
    _emit(summary, as_json, [
        f"dominant site {top['site']} holds {100 * top['share']:.1f}% of PAGE",
        comparison.markdown(),
        f"wrote {out}/report.html, {out}/profile (scores.csv, plan.json, top4.json, heatmap.png), {out}/arms/, "
        f"{out}/comparison.md, {out}/curves.png",
    ])


if __name__ == "__main__":
    sys.exit(main())
