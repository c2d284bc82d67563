"""The `placement` command line: thin, it parses options and calls the modules."""
from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path

import click

from .errors import PlacementError

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
        click.echo(json.dumps(summary, indent=2, default=str))
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
@strategy_options
@click.option("--out", required=True, type=click.Path(file_okay=False), help="folder for scores, plan and heatmap")
@output_options
@user_errors
def profile(model, dtype, device, trust_remote_code, data, batches, batch_size, max_length, seed, rank, alpha,
            rslora, fast, draws, score, checkpointing, strategy, k, max_params, strategy_seed, out, as_json, quiet):
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
    lm, tokenizer, source = _load(model, dtype, device, trust_remote_code, quiet)
    result = run_profile(lm, tokenizer, source, data, batches=batches, batch_size=batch_size, max_length=max_length,
                         settings=settings, score=score, strategy=chosen, progress=not quiet, examples=examples)
    write_profile(result, out, title=f"{source.name} on {data}: {score}")
    summary = result.summary() | {"out": out, "targets": result.plan.targets}
    ratio = summary["top1_top2_ratio"]
    _emit(summary, as_json, [
        f"dominant site   {summary['dominant_site']}  (layer {summary['layer']}, role {summary['role']})",
        f"its share       {100 * summary['share']:.1f}% of {score} over {summary['sites']} sites",
        f"top-1 / top-2   {ratio:.2f}x" if math.isfinite(ratio) else "top-1 / top-2   (one site scores)",
        f"effective sites {summary['effective_sites']:.1f}   gini {summary['gini']:.2f}",
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
@output_options
@user_errors
def plan_cmd(source, strategy, k, max_params, strategy_seed, rank, check_model, trust_remote_code, out, peft_config,
             as_json, quiet):
    """Make a placement plan from a profile's folder (or its scores.csv, with plan.json beside it)."""
    from .outputs import atomic_dir
    from .plan import Plan, Strategy

    path = Path(source)
    folder = path.parent if path.suffix == ".csv" else path
    if not path.exists():
        raise PlacementError(f"{source} not found: pass the --out folder of placement profile")
    base = Plan.load(folder / "plan.json")
    chosen = Strategy(strategy, k=k, max_params=max_params, seed=strategy_seed)
    if rank is not None:
        base.peft = dict(base.peft, r=rank)
    new = base.with_strategy(chosen)
    if out is None and peft_config is None:
        raise PlacementError("nothing to write: pass --out FILE.json and/or --peft-config FOLDER")
    if check_model:
        lm, _, _ = _load(check_model, "float32", "cpu", trust_remote_code, quiet=True)
        new.check(lm)
    if out:
        new.save(out)
    if peft_config:
        config = new.lora_config()
        with atomic_dir(peft_config) as tmp:
            config.save_pretrained(str(tmp))
    summary = {"strategy": new.label, "targets": new.targets, "trainable_params": new.trainable_params,
               "out": out, "peft_config": peft_config}
    _emit(summary, as_json, [
        f"strategy   {new.label}",
        f"targets    {len(new.targets)}: {', '.join(new.targets[:6])}" + (" ..." if len(new.targets) > 6 else ""),
        f"trainable  {new.trainable_params:,} LoRA parameters at r={new.peft['r']}",
    ] + ([f"wrote      {out}"] if out else []) + ([f"wrote      {peft_config}/adapter_config.json"] if peft_config else []))


@main.command()
@click.option("--out", default="reports/demo", show_default=True, type=click.Path(file_okay=False))
@click.option("--batches", type=int, default=8, show_default=True)
@output_options
@user_errors
def demo(out, batches, as_json, quiet):
    """Profile the embedded SmolLM2-135M on builtin:arithmetic and write its plan and heatmap (no network)."""
    from .plan import Strategy
    from .profile import run_profile, write_profile

    lm, tokenizer, source = _load("smollm2-135m", "float32", "cpu", False, quiet)
    result = run_profile(lm, tokenizer, source, "builtin:arithmetic", batches=batches, progress=not quiet)
    write_profile(result, out, title="smollm2-135m on builtin:arithmetic: page")
    result.plan.with_strategy(Strategy("top-k", k=4)).save(Path(out) / "top4.json")
    summary = result.summary() | {"out": out}
    _emit(summary, as_json, [
        f"dominant site {summary['dominant_site']} holds {100 * summary['share']:.1f}% of PAGE "
        f"({summary['effective_sites']:.1f} effective sites); {summary['tokens']} tokens in {summary['seconds']:.0f} s",
        f"wrote {out}/scores.csv, plan.json, top4.json, heatmap.png",
    ])


if __name__ == "__main__":
    sys.exit(main())
