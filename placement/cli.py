"""The `placement` command line: each command parses its options, claims its output folder and calls one study
function; every user error is one line (`PlacementError`)."""
from __future__ import annotations

import functools
import json
import sys
from pathlib import Path

import click

from .errors import PlacementError
from .outputs import finite, json_text, run_folder, write_new_file
from .plan.strategies import STRATEGIES, arm_help, strategy_help

MODEL_HELP = "smollm2-135m (embedded, no network), a hub id, a local model folder or a .gguf file"
DTYPES = click.Choice(["float32", "bfloat16", "float16"])


def user_errors(fn):
    """Errors a user can cause become one line and exit 1; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PlacementError as err:
            raise click.ClickException(str(err).splitlines()[0]) from None
    return wrapper


def options(*decorators):
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


model_options = options(
    click.option("--model", default="smollm2-135m", show_default=True, help=MODEL_HELP),
    click.option("--dtype", default="float32", show_default=True, type=DTYPES),
    click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto"),
    click.option("--trust-remote-code", is_flag=True, help="allow the model's own code from its folder or hub repo"))
output_options = options(
    click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary as JSON"),
    click.option("--quiet", is_flag=True, help="no progress bars"))
run_options = options(
    click.option("--out", required=True, type=click.Path(), help="output folder (a run folder, see run.json)"),
    click.option("--overwrite", is_flag=True, help="replace an earlier run of placement in --out (only its files)"),
    click.option("--report", "make_report", is_flag=True, help="also write OUT/report.html"))
strategy_options = options(
    click.option("--strategy", default="dominant", show_default=True, type=click.Choice(STRATEGIES),
                 help=strategy_help()),
    click.option("--k", type=int, default=None, help="sites for top-k, layers for last-k"),
    click.option("--max-params", type=int, default=None, help="trainable-parameter budget for --strategy budget"),
    click.option("--strategy-seed", type=int, default=0, show_default=True, help="seed of random-1"))
batch_options = options(
    click.option("--batch-size", type=int, default=8, show_default=True),
    click.option("--max-length", type=int, default=256, show_default=True, help="tokens per example, at most"),
    click.option("--seed", type=int, default=0, show_default=True, help="data order, lora_A draw and splits"))
data_split_options = options(
    click.option("--data", required=True, help="builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set"),
    click.option("--eval-data", default=None, help="test data in the same formats (default: held out from --data)"),
    click.option("--test", "n_test", type=int, default=None,
                 help="test examples [default: 10% of the distinct prompts, at most 100]"),
    click.option("--validation", "n_validation", type=int, default=None,
                 help="validation examples, held out from the training data [default: 10%, at most 64]"))
train_options = options(
    click.option("--steps", type=int, default=200, show_default=True),
    click.option("--lr", type=float, default=1e-3, show_default=True, help="peak learning rate"),
    batch_options,
    click.option("--max-new-tokens", type=int, default=32, show_default=True, help="generation length for exact match"))


def _load(model, dtype="float32", device="cpu", trust_remote_code=False, quiet=True):
    from .model import load

    if not quiet:
        click.echo(f"loading {model} ...", err=True)
    return load.load(model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, quiet=quiet)


def _emit(summary: dict, as_json: bool, lines: list[str]) -> None:
    click.echo(json.dumps(finite(summary), indent=2, default=str) if as_json else "\n".join(lines))


def _finish(out, make_report: bool) -> None:
    from .report.html import write_report

    if make_report:
        write_report(out)


def _splits(data, eval_data, n_test, n_validation, seed, quiet):
    from .data import load_splits

    splits = load_splits(data, eval_data, n_test, n_validation, seed)
    if not quiet:
        click.echo(f"data       {len(splits[0])} training, {len(splits[1])} validation and {len(splits[2])} test "
                   f"examples ({'from ' + eval_data if eval_data else 'held out'})", err=True)
    return splits


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
    from .model.sites import find_sites, site_table

    found = find_sites(_load(model, dtype, device, trust_remote_code)[0], include_routers=include_routers)
    _emit([s.to_row() for s in found], as_json, site_table(found))


@main.command()
@model_options
@click.option("--data", required=True, help="builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches")
@batch_options
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
@run_options
@output_options
@user_errors
def profile(model, dtype, device, trust_remote_code, data, batches, batch_size, max_length, seed, rank, alpha,
            rslora, fast, draws, score, checkpointing, bootstrap, strategy, k, max_params, strategy_seed, out,
            overwrite, make_report, as_json, quiet):
    """Probe every site on calibration batches, rank them, and write scores.csv, plan.json and heatmap.png."""
    from .data import load_examples
    from .plan import Strategy
    from .probe import ProbeSettings
    from .study.profile import run_profile, summary_lines, write_profile

    chosen = Strategy(strategy, k=k, max_params=max_params, seed=strategy_seed)
    chosen.check()
    settings = ProbeSettings(r=rank, alpha=alpha, seed=seed, mode="fast" if fast else "exact", draws=draws,
                             use_rslora=rslora, checkpointing=checkpointing)
    settings.check()
    examples = load_examples(data, seed)  # read the data before the model: a bad file fails in a second
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
        result = run_profile(lm, tokenizer, source, data, batches=batches, batch_size=batch_size,
                             max_length=max_length, settings=settings, score=score, strategy=chosen,
                             progress=not quiet, examples=examples, bootstrap=bootstrap)
        write_profile(result, out, title=f"{source.name} on {data}: {score}")
        _finish(out, make_report)
    summary = result.summary() | {"out": out, "targets": result.plan.targets}
    _emit(summary, as_json, summary_lines(summary, result, out))


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
    from .plan import Plan, Strategy

    chosen = Strategy(strategy, k=k, max_params=max_params, seed=strategy_seed)
    chosen.check()
    new = Plan.from_source(source, rank).with_strategy(chosen)
    if check_model:
        new.check(_load(check_model, trust_remote_code=trust_remote_code)[0])
    if out:
        write_new_file(out, json_text(new.to_json()), overwrite)
    if peft_config:
        write_new_file(Path(peft_config) / "adapter_config.json", new.peft_config_json(), overwrite)
    if not out and not peft_config:
        return click.echo(json_text(new.to_json()), nl=False)
    ranked = new.targets_by_rank()
    _emit({"strategy": new.label, "targets": ranked, "trainable_params": new.trainable_params, "out": out,
           "peft_config": peft_config}, as_json, [
        f"strategy   {new.label}",
        f"targets    {len(ranked)} by rank: {', '.join(ranked[:6])}" + (" ..." if len(ranked) > 6 else ""),
        f"trainable  {new.trainable_params:,} LoRA parameters at r={new.peft['r']}",
    ] + [f"wrote      {path}" for path in (out, peft_config and f"{peft_config}/adapter_config.json") if path])


@main.command()
@model_options
@click.option("--data", "datas", required=True, multiple=True, help="a task, given twice or more: same forms as profile's --data")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches per task")
@batch_options
@click.option("--k", "top_k", type=int, default=5, show_default=True, help="size of the top-k sets compared")
@run_options
@output_options
@user_errors
def stability(model, dtype, device, trust_remote_code, datas, batches, batch_size, max_length, seed, top_k, out,
              overwrite, make_report, as_json, quiet):
    """Probe one model on several tasks and say how far their site rankings agree (Spearman, Kendall, top-1, top-k)."""
    from .data import load_examples
    from .study.stability import run_stability, task_names

    task_names(list(datas))
    examples = {d: load_examples(d, seed) for d in datas}  # every file is read before the model loads
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
        table, names, tops = run_stability(lm, tokenizer, source, examples, out, batches=batches,
                                           batch_size=batch_size, max_length=max_length, seed=seed, top_k=top_k,
                                           progress=not quiet)
        _finish(out, make_report)
    lines = [f"{name:>16s}: top {top.site} ({100 * top.share:.1f}%)" for name, top in tops.items()]
    _emit({"tasks": dict(zip(names, datas)), "pairs": table.to_dict("records"), "out": out}, as_json,
          lines + [table.to_markdown(index=False, floatfmt=".3f"), f"wrote {out}/stability.csv, stability.md, stability.png"])


@main.command()
@click.argument("run_dir", type=click.Path())
@user_errors
def report(run_dir):
    """Write RUN_DIR/report.html: one self-contained page for a profile, compare or stability folder."""
    from .report.html import write_report

    click.echo(f"wrote {write_report(run_dir)}")


@main.command("train")
@click.option("--plan", "plan_path", required=True, type=click.Path(), help="a plan.json or a profile's folder")
@click.option("--model", default=None, help="default: the plan's model. " + MODEL_HELP)
@click.option("--dtype", default="float32", show_default=True, type=DTYPES)
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto")
@click.option("--trust-remote-code", is_flag=True, help="allow the model's own code from its folder or hub repo")
@data_split_options
@train_options
@click.option("--r", "rank", type=int, default=None, help="LoRA rank (default: the plan's)")
@click.option("--save-every", type=int, default=0, show_default=True, help="checkpoint every N steps (0: never)")
@click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --out")
@click.option("--merge", is_flag=True, help="also write the merged model to OUT/merged")
@click.option("--out", required=True, type=click.Path(), help="adapter folder (PEFT format)")
@click.option("--overwrite", is_flag=True, help="replace an earlier run of placement in --out (only its files)")
@output_options
@user_errors
def train_cmd(plan_path, model, dtype, device, trust_remote_code, data, eval_data, n_test, n_validation, steps, lr,
              batch_size, max_length, seed, max_new_tokens, rank, save_every, resume, merge, out, overwrite, as_json,
              quiet):
    """Train a LoRA on a plan's sites, evaluate it, and write a PEFT adapter with metrics.json and loss.csv."""
    from .plan import Plan
    from .train import TrainSettings, checkpoint_refusal
    from .train.run import summary_lines, train_and_evaluate

    chosen = Plan.load(plan_path).with_rank(rank)
    if resume and overwrite:
        raise PlacementError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed,
                             save_every=save_every)
    settings.check(max_new_tokens)
    train_set, _, test_set = _splits(data, eval_data, n_test, n_validation, seed, quiet)
    model_name = model or chosen.model.get("name")
    with run_folder(out, overwrite=overwrite, resume=resume, keep_on_error=("checkpoints/",),
                    refusal_hint=checkpoint_refusal(out)):
        lm, tokenizer, _ = _load(model_name, dtype, device, trust_remote_code, quiet)
        run, result, metrics = train_and_evaluate(
            lm, tokenizer, chosen, train_set, test_set, settings, out=out, model_name=model_name,
            max_new_tokens=max_new_tokens, resume=resume, merge=merge, progress=not quiet,
            extra={"data": data, "eval_data": eval_data})
    _emit(metrics, as_json, summary_lines(run, result, chosen, test_set, out, merge))


@main.command()
@model_options
@data_split_options
@train_options
@click.option("--arms", default="dominant,all-linear,attn-qv,ffn,last-2,random-1,top-4", show_default=True,
              help="comma-separated: " + arm_help())
@click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank of arms without :rN")
@click.option("--alpha", type=float, default=16, show_default=True, help="LoRA alpha at rank --r (alpha / r is kept)")
@click.option("--scores", type=click.Path(), default=None, help="a profile's folder or plan.json instead of probing")
@click.option("--batches", type=int, default=8, show_default=True, help="calibration batches of the probe")
@click.option("--lr-sweep", is_flag=True, help="try 1e-4, 3e-4, 1e-3, 3e-3 per arm, keep the best validation loss")
@click.option("--sweep-arms", default=None, help="comma-separated arms to sweep (default: all)")
@run_options
@output_options
@user_errors
def compare(model, dtype, device, trust_remote_code, data, eval_data, n_test, n_validation, steps, lr, batch_size,
            max_length, seed, max_new_tokens, arms, rank, alpha, scores, batches, lr_sweep, sweep_arms, out,
            overwrite, make_report, as_json, quiet):
    """Train every arm on the same data, order, steps and seed; tabulate quality, parameters, time and memory."""
    from .probe import ProbeSettings
    from .study.compare import CompareSettings, compare_inputs, run_comparison
    from .train import TrainSettings

    settings = TrainSettings(steps=steps, lr=lr, batch_size=batch_size, max_length=max_length, seed=seed)
    settings.check(max_new_tokens)
    probe_settings = ProbeSettings(r=rank, alpha=alpha, seed=seed)
    probe_settings.check()
    splits = _splits(data, eval_data, n_test, n_validation, seed, quiet)
    parsed, swept, base = compare_inputs(arms, splits, lr_sweep, sweep_arms, scores, max_new_tokens)
    compare_settings = CompareSettings(parsed, settings, lr_sweep=lr_sweep, sweep_arms=swept,
                                       max_new_tokens=max_new_tokens)
    with run_folder(out, overwrite=overwrite):
        lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
        comparison, base = run_comparison(lm, tokenizer, source, data, splits, compare_settings, out, base=base,
                                          probe_settings=probe_settings, batches=batches, progress=not quiet,
                                          log=(lambda line: None) if quiet else (lambda line: click.echo(line, err=True)))
        _finish(out, make_report)
    _emit({"dominant_site": base.dominant_site, "out": out, "rows": comparison.table.to_dict("records")}, as_json,
          [comparison.markdown(), f"wrote {out}/comparison.csv, comparison.md, curves.png, arms/"])


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
    from .probe import ProbeSettings
    from .study.compare import CompareSettings, compare_inputs, run_comparison
    from .train import TrainSettings

    data = "builtin:arithmetic"
    settings = TrainSettings(steps=steps, batch_size=8, max_length=64, seed=0)
    settings.check()
    splits = _splits(data, None, n_test, 32, 0, quiet)
    parsed, _, _ = compare_inputs(arms, splits, False, None, None, 12)
    with run_folder(out, overwrite=True):
        lm, tokenizer, source = _load("smollm2-135m", quiet=quiet)
        comparison, base = run_comparison(lm, tokenizer, source, data, splits,
                                          CompareSettings(parsed, settings, max_new_tokens=12), out, base=None,
                                          probe_settings=ProbeSettings(), batches=batches, progress=not quiet,
                                          log=(lambda line: None) if quiet else (lambda line: click.echo(line, err=True)))
        base.with_strategy(Strategy("top-k", k=4)).save(Path(out) / "profile" / "top4.json")
        _finish(out, True)
    top = min(base.sites, key=lambda row: row["rank"])
    _emit({"dominant_site": top["site"], "share": top["share"], "out": out,
           "rows": comparison.table.to_dict("records")}, as_json, [
        f"dominant site {top['site']} holds {100 * top['share']:.1f}% of PAGE",
        comparison.markdown(),
        f"wrote {out}/report.html, {out}/profile (scores.csv, plan.json, top4.json, heatmap.png), {out}/arms/, "
        f"{out}/comparison.md, {out}/curves.png",
    ])


if __name__ == "__main__":
    sys.exit(main())
