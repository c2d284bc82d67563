"""The command line's option groups, one per setting group (model, data, batches, training, a run folder, ...),
and the per-command bundles: `cli.py` composes them and keeps only the commands."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import click

from .errors import PlacementError
from .families.lora import VARIANTS
from .plan.formats import FORMATS
from .plan.strategies import STRATEGIES, arm_help, strategy_help


def user_errors(fn):
    """Errors a user can cause become one line and exit 1; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PlacementError as err:
            raise click.ClickException(str(err).splitlines()[0]) from None
    return wrapper


def launchable(fn):
    """Under torchrun or accelerate launch (WORLD_SIZE > 1): join the process group, run the same command on every
    rank, and let rank 0 alone write --out and print. Without a launcher the command runs as it is."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .distributed import is_main, launched, rank_outputs, start, stop

        model = kwargs.get("model")
        if not launched():
            if isinstance(model, ModelArgs) and model.fsdp:
                raise PlacementError("--fsdp shards the model over the ranks of a launcher: start the command with "
                                     "torchrun --nproc_per_node N (or accelerate launch)")
            return fn(*args, **kwargs)
        if kwargs.get("resume"):
            raise PlacementError("--resume is not supported under a launcher: resume with one process, or start "
                                 "the run again with --overwrite")
        start(model.device if isinstance(model, ModelArgs) else "cpu")
        try:
            with rank_outputs(kwargs.get("out")) as out:
                if "out" in kwargs:
                    kwargs["out"] = out
                if not is_main() and "quiet" in kwargs:
                    kwargs["quiet"] = True
                return fn(*args, **kwargs)
        finally:
            stop()
    return wrapper


def options(*decorators):
    """Several click options as one decorator, applied in the order listed."""
    def apply(fn):
        for decorator in reversed(decorators):
            fn = decorator(fn)
        return fn
    return apply


def grouped(name: str, build, *decorators):
    """A settings group: its options arrive in the command as one argument `name`, `build(**their values)`, so a
    command's signature lists groups, not every flag."""
    def probe():
        pass

    options(*decorators)(probe)
    keys = [param.name for param in probe.__click_params__]

    def apply(fn):
        @functools.wraps(fn)
        @user_errors  # building the group may refuse its values, before the command's own user_errors runs
        def wrapper(*args, **kwargs):
            kwargs[name] = build(**{key: kwargs.pop(key) for key in keys})
            return fn(*args, **kwargs)
        return options(*decorators)(wrapper)
    return apply


@dataclass(frozen=True)
class ModelArgs:
    """Which model to load and how (`--model`, `--dtype`, `--device`, `--trust-remote-code`)."""

    model: str | None
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    device_map: str | None = None
    fsdp: bool = False


def _strategy(strategy: str | None, k, max_params, strategy_seed):
    from .plan.strategies import Strategy

    if strategy is None:
        return None
    chosen = Strategy(strategy, k=k, max_params=max_params, seed=strategy_seed)
    chosen.check()
    return chosen


MODEL_HELP = ("smollm2-135m (embedded, no network), gemma3-270m (from its PyPI package), a hub id, a local model "
              "folder or a .gguf file")
DTYPES = click.Choice(["float32", "bfloat16", "float16"])


_dtype = click.option("--dtype", default="float32", show_default=True, type=DTYPES)
_device = click.option("--device", default="cpu", show_default=True, help="cpu, cuda, cuda:N or auto")
_device_map = click.option("--device-map", default=None,
                           help="auto, balanced or sequential: spread the model over the visible GPUs "
                                "(accelerate's big-model placement)")
_fsdp = click.option("--fsdp", is_flag=True,
                     help="shard the model over the ranks of torchrun / accelerate launch with FSDP2 (a model that "
                          "fits no single device)")
_trust = click.option("--trust-remote-code", is_flag=True,
                      help="allow the model's own code from its folder or hub repo")
model_options = grouped("model", ModelArgs, click.option("--model", default="smollm2-135m", show_default=True,
                                                         help=MODEL_HELP), _dtype, _device, _device_map, _fsdp, _trust)
plan_model_options = grouped("model", ModelArgs, click.option("--model", default=None,
                                                              help="default: the plan's model. " + MODEL_HELP),
                             _dtype, _device, _device_map, _fsdp, _trust)
output_options = options(
    click.option("--json", "as_json", is_flag=True, help="print a machine-readable summary as JSON"),
    click.option("--quiet", is_flag=True, help="no progress bars"))
run_options = options(
    click.option("--out", required=True, type=click.Path(), help="output folder (a run folder, see run.json)"),
    click.option("--overwrite", is_flag=True, help="replace an earlier run of placement in --out (only its files)"),
    click.option("--report", "make_report", is_flag=True, help="also write OUT/report.html"))
_strategy_details = (
    click.option("--k", type=int, default=None, help="sites for top-k, layers for last-k"),
    click.option("--max-params", type=int, default=None, help="trainable-parameter budget for --strategy budget"),
    click.option("--strategy-seed", type=int, default=0, show_default=True, help="seed of random-1"))
strategy_options = grouped(
    "strategy", _strategy,
    click.option("--strategy", default="dominant", show_default=True, type=click.Choice(STRATEGIES),
                 help=strategy_help()),
    *_strategy_details)
replan_options = grouped(  # plan: without --strategy the source plan keeps its own
    "strategy", _strategy,
    click.option("--strategy", default=None, type=click.Choice(STRATEGIES),
                 help=strategy_help() + " [default: the source plan's strategy]"),
    *_strategy_details)
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
    click.option("--checkpointing", is_flag=True, help="gradient checkpointing: less memory, one more forward"),
    click.option("--lr", type=float, default=1e-3, show_default=True, help="peak learning rate"),
    batch_options,
    click.option("--max-new-tokens", type=int, default=32, show_default=True, help="generation length for exact match"))

variant_option = click.option(
    "--variant", default=None,
    help=f"LoRA variant of PEFT on the plan's sites, one of {', '.join(VARIANTS)}: rslora (alpha / sqrt(r)), "
         "dora (magnitude and direction), pissa or olora (init from W) [default: the plan's, plain LoRA]")

probe_options = options(  # profile: the model, the data, the LoRA and probe the scores assume, the strategy
    model_options,
    click.option("--data", required=True, help="builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set"),
    click.option("--batches", type=int, default=8, show_default=True, help="calibration batches"),
    batch_options,
    click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank the scores assume"),
    click.option("--alpha", type=float, default=16, show_default=True, help="LoRA alpha the scores assume"),
    click.option("--rslora", is_flag=True, help="score for rsLoRA scaling, alpha / sqrt(r)"),
    click.option("--fast", is_flag=True, help="never form a weight-sized gradient; page is estimated over --draws"),
    click.option("--draws", type=int, default=8, show_default=True, help="draws of lora_A in --fast mode"),
    click.option("--score", default="page", show_default=True,
                  type=click.Choice(["page", "page_sampled", "grad_energy", "fisher", "page_opt"]), help="ranking score"),
    click.option("--spectrum-k", type=int, default=0, show_default=True,
                 help="top singular values of each site's gradient to keep (exact probe) for page_opt and rank "
                      "allocation; 64 when --score page_opt or --strategy allocate asks for them"),
    click.option("--checkpointing", is_flag=True, help="gradient checkpointing: less memory, one more forward"),
    click.option("--bootstrap", type=int, default=200, show_default=True,
                  help="resamples of the calibration batches for rank intervals (0: none)"),
    click.option("--families", default="lora", show_default=True,
                 help="comma-separated adapter families to score: lora, ia3, series-bn, parallel-bn (the others "
                      "into family_scores.csv, a heatmap each and families.png)"),
    strategy_options)

plan_options = options(  # plan: rank, model check and the files it writes
    click.option("--r", "rank", type=int, default=None, help="LoRA rank of the plan (default: the probe's)"),
    variant_option,
    click.option("--format", "fmt", default="plan", show_default=True,
                 help=f"one of {', '.join(FORMATS)}: what --out holds (or what is printed without it): our plan "
                      "JSON, PEFT's adapter_config.json, an axolotl or LLaMA-Factory config fragment, Spectrum's score JSON, or Spectrum's "
                      "unfrozen_parameters (full fine-tuning of the sites, not LoRA)"),
    click.option("--model", "check_model", default=None,
                 help="check the plan against this model first (" + MODEL_HELP + ")"),
    click.option("--trust-remote-code", is_flag=True, help="allow the model's own code when checking --model"),
    click.option("--out", type=click.Path(dir_okay=False), default=None, help="write the plan in --format here"),
    click.option("--peft-config", type=click.Path(file_okay=False), default=None,
                  help="write PEFT's adapter_config.json into this folder"),
    click.option("--overwrite", is_flag=True, help="replace an existing --out file or adapter_config.json"))

stability_options = options(  # stability: the model and the tasks
    model_options,
    click.option("--data", "datas", required=True, multiple=True,
                 help="a task, given twice or more: same forms as profile's --data"),
    click.option("--batches", type=int, default=8, show_default=True, help="calibration batches per task"),
    batch_options,
    click.option("--k", "top_k", type=int, default=5, show_default=True, help="size of the top-k sets compared"))

train_command_options = options(  # train: the plan, the model, the data, the run
    click.option("--plan", "plan_path", required=True, type=click.Path(), help="a plan.json or a profile's folder"),
    plan_model_options,
    data_split_options,
    train_options,
    click.option("--r", "rank", type=int, default=None, help="LoRA rank (default: the plan's)"),
    variant_option,
    click.option("--save-every", type=int, default=0, show_default=True, help="checkpoint every N steps (0: never)"),
    click.option("--resume", is_flag=True, help="continue from the newest checkpoint in --out"),
    click.option("--merge", is_flag=True, help="also write the merged model to OUT/merged"),
    click.option("--out", required=True, type=click.Path(), help="adapter folder (PEFT format)"),
    click.option("--overwrite", is_flag=True, help="replace an earlier run of placement in --out (only its files)"))

compare_options = options(  # compare: the model, data and training, the arms and how they are made
    model_options,
    data_split_options,
    train_options,
    click.option("--arms", default="dominant,all-linear,attn-qv,ffn,last-2,random-1,top-4", show_default=True,
                  help="comma-separated: " + arm_help()),
    click.option("--plan-arm", "plan_arms", multiple=True, metavar="LABEL=PATH",
                 help="a plan file trained as one more arm, named LABEL (repeatable)"),
    click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank of arms without :rN"),
    variant_option,
    click.option("--alpha", type=float, default=16, show_default=True,
                 help="LoRA alpha at rank --r (alpha / r is kept)"),
    click.option("--scores", type=click.Path(), default=None,
                 help="a profile's folder or plan.json instead of probing"),
    click.option("--batches", type=int, default=8, show_default=True, help="calibration batches of the probe"),
    click.option("--lr-sweep", is_flag=True,
                 help="sweep 1e-4 .. 1e-2 per arm on seed 0 by validation loss (one step past an edge)"),
    click.option("--lr-grid", default=None, help="comma-separated rates for --lr-sweep instead of 1e-4 .. 1e-2"),
    click.option("--sweep-arms", default=None, help="comma-separated arms to sweep (default: all)"),
    click.option("--sweep-steps", type=int, default=None, help="steps of each sweep run (default: --steps)"),
    click.option("--seeds", type=int, default=1, show_default=True,
                 help="seeds per arm (data order and lora_A); intervals over seeds, else over test questions"),
    click.option("--resume", is_flag=True, help="keep the arms an earlier run into --out finished with these settings"))

demo_options = options(  # demo: its few knobs
    click.option("--out", default="runs/demo", show_default=True, type=click.Path(),
                  help="output folder; an earlier demo there is replaced"),
    click.option("--batches", type=int, default=8, show_default=True, help="calibration batches of the probe"),
    click.option("--steps", type=int, default=60, show_default=True, help="training steps per arm"),
    click.option("--test", "n_test", type=int, default=60, show_default=True, help="test examples"),
    click.option("--arms", default="dominant,all-linear", show_default=True, help="arms to train and compare"))
validate_options = options(  # validate: the model, the data, the sites, their training and first step
    model_options,
    click.option("--data", required=True, help="builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set"),
    click.option("--scores", type=click.Path(), default=None, help="a profile's folder to reuse instead of probing"),
    click.option("--sites", default="24", show_default=True, help="sites to train, spread over the ranking, or 'all'"),
    click.option("--steps", type=int, default=60, show_default=True, help="training steps per site"),
    click.option("--lr", type=float, default=1e-3, show_default=True, help="one learning rate for every site"),
    click.option("--step-lr", type=float, default=1e-4, show_default=True,
                 help="learning rate of the first-step drops (SGD and AdamW on B alone)"),
    batch_options,
    click.option("--validation", "n_validation", type=int, default=None,
                 help="validation examples held out from --data [default: 10%, at most 64]"),
    click.option("--batches", type=int, default=8, show_default=True, help="calibration batches of the probe"),
    click.option("--r", "rank", type=int, default=8, show_default=True, help="LoRA rank of every site"),
    click.option("--alpha", type=float, default=16, show_default=True, help="LoRA alpha"))

# every command that writes a run folder ends its decorators so; user_errors innermost
writes_run = options(run_options, output_options, user_errors, launchable)
