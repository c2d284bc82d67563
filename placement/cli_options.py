"""The command line's own settings (the model, the data, the run folder, the output, ...), one frozen dataclass per
group, each field the one declaration of its option (see `cli_settings`), and how a command runs under a launcher."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

from .distributed import DIST_TIMEOUT
from .errors import PlacementError
from .families import family_names
from .families.lora import VARIANTS
from .plan.formats import FORMATS
from .plan.budget import budget_label, parse_budgets
from .plan.strategies import FROM_FOLDER, STRATEGIES, kinds, strategy_help
from .probe.registry import ranking_names

MODEL_HELP = ("smollm2-135m (embedded, no network), gemma3-270m (from its PyPI package), a hub id, a local model "
              "folder or a .gguf file")
SCORE_CHOICES = tuple(ranking_names())  # what profile may rank by: every registered energy


def opt(default, help: str, **meta):
    """A field that is an option: its default, its help and the other metadata keys of `cli_settings`."""
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class ModelArgs:
    """Which model to load and how."""

    model: str | None = opt("smollm2-135m", MODEL_HELP + " (train: the plan's model unless given; plan: check the "
                                                         "plan against it first)")
    dtype: str = opt("float32", "the weights' type", choices=("float32", "bfloat16", "float16"))
    device: str = opt("cpu", "cpu, cuda, cuda:N or auto")
    trust_remote_code: bool = opt(False, "allow the model's own code from its folder or hub repo")
    device_map: str | None = opt(None, "auto, balanced or sequential: spread the model over the visible GPUs "
                                       "(accelerate's big-model placement)")
    fsdp: bool = opt(False, "shard the model over the ranks of torchrun / accelerate launch with FSDP2 (a model "
                            "that fits no single device)")


@dataclass(frozen=True)
class DataArgs:
    """The examples: training data, test data and the held-out splits."""

    data: str = field(metadata={"help": "builtin:arithmetic, a JSON/JSONL/CSV/Parquet file, or a hub data set "
                                        "(stability: one task each, given twice or more)"})
    eval_data: str | None = opt(None, "test data in the same formats (default: held out from --data)")
    n_test: int | None = opt(None, "test examples (unset: 10% of the distinct prompts, at most 100)",
                             option="--test", range=(0, 10 ** 8))
    n_validation: int | None = opt(None, "validation examples, held out from the training data (unset: 10%, at "
                                         "most 64)", option="--validation", range=(0, 10 ** 8))


@dataclass(frozen=True)
class CalibrationArgs:
    """Where the scores come from: calibration batches of the probe, or a profile given instead."""

    batches: int = opt(8, "calibration batches of the probe (stability: per task)", range=(1, 10 ** 6))
    scores: str | None = opt(None, "a profile's folder (or its plan.json) to use instead of probing", path=True)


@dataclass(frozen=True)
class ProfileArgs:
    """What profile ranks by and writes beside the ranking."""

    score: str = opt("page", "ranking score", choices=SCORE_CHOICES)
    bootstrap: int = opt(200, "resamples of the calibration batches for rank intervals (0: none)", range=(0, 10 ** 6))
    families: str = opt("lora", "comma-separated adapter families to score, of: " + ", ".join(family_names()) +
                                " (the others into family_scores.csv, a heatmap each and families.png)")

    def __post_init__(self) -> None:
        names = [n.strip() for n in self.families.split(",") if n.strip()]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise PlacementError(f"--families names {twice[0]} twice: list each family once")


@dataclass(frozen=True)
class StrategyArgs:
    """How a plan picks its sites from the ranking."""

    strategy: str | None = opt("dominant", strategy_help() + " (plan: the source plan's unless given)",
                               choices=STRATEGIES + FROM_FOLDER)
    k: int | None = opt(None, "sites for top-k, layers for last-k (stability: the size of the top-k sets compared)",
                        range=(1, 10 ** 6))
    max_params: int | None = opt(None, "trainable-parameter budget for --strategy budget (recommend: one budget "
                                       "of this many parameters instead of --budget)", range=(1, 10 ** 15))
    strategy_seed: int = opt(0, "seed of random-1", range=(0, 2 ** 32 - 1))
    budget: tuple[float, ...] | None = opt(None, "percent of all-linear LoRA's trainable parameters at the same rank "
                                                 "(recommend: comma-separated, each a budget; plan: with --strategy "
                                                 "recommended, the budget whose recommended plan to take)",
                                           parse=lambda text: tuple(parse_budgets(text)),
                                           show=lambda v: None if v is None else ",".join(map(budget_label, v)))

    def __post_init__(self) -> None:
        self.chosen()  # refuses a strategy that cannot take these details

    def folder_plan(self, source: str) -> str:
        """The plan file to start from: a strategy whose plan a run folder holds reads it at --budget."""
        kind = kinds().get(self.strategy) if self.strategy else None
        if kind is None or kind.from_folder is None:
            return source
        return str(kind.from_folder(source, budget_label(self.budget[0])))

    def chosen(self):
        """The Strategy these options name, checked; None keeps the source plan's (or the folder's)."""
        from .plan.strategies import Strategy

        from_folder = self.strategy in FROM_FOLDER
        if self.budget is not None and not from_folder:
            raise PlacementError("--budget picks a recommend run's plan: add --strategy recommended, or drop it")
        if from_folder and (self.budget is None or len(self.budget) != 1):
            raise PlacementError(f"--strategy {self.strategy} needs one --budget (e.g. 2.5%) and a recommend run's "
                                 "folder as the source")
        if self.strategy is None or from_folder:
            return None
        chosen = Strategy(self.strategy, k=self.k, max_params=self.max_params, seed=self.strategy_seed)
        chosen.check()
        return chosen


@dataclass(frozen=True)
class AdapterArgs:
    """The LoRA variant a plan's sites are trained with."""

    variant: str | None = opt(None, f"LoRA variant of PEFT on the plan's sites, one of {', '.join(VARIANTS)}: "
                                    "rslora (alpha / sqrt(r)), dora (magnitude and direction), pissa or olora (init "
                                    "from W) [default: the plan's, plain LoRA]")


@dataclass(frozen=True)
class TrainJobArgs:
    """What train trains from and also writes."""

    plan: str = field(metadata={"help": "a plan.json or a profile's folder", "path": True})
    merge: bool = opt(False, "also write the merged model to OUT/merged")


@dataclass(frozen=True)
class ExportArgs:
    """What plan writes."""

    fmt: str = opt("plan", f"one of {', '.join(FORMATS)}: what --out holds (or what is printed without it): our "
                           "plan JSON, PEFT's adapter_config.json, an axolotl or LLaMA-Factory config fragment, "
                           "Spectrum's score JSON, or Spectrum's unfrozen_parameters (full fine-tuning of the sites, "
                           "not LoRA)", option="--format")
    peft_config: str | None = opt(None, "write PEFT's adapter_config.json into this folder", path=True)


@dataclass(frozen=True)
class RunArgs:
    """The run folder a command writes."""

    out: str = field(metadata={"help": "output folder (a run folder, see run.json; train: the PEFT adapter; plan: "
                                       "the file in --format)", "path": True})
    overwrite: bool = opt(False, "replace an earlier run of placement in --out (only its files; plan: the --out "
                                 "file or adapter_config.json)")
    make_report: bool = opt(False, "also write OUT/report.html", option="--report")
    resume: bool = opt(False, "continue the run in --out: train from its newest checkpoint; compare keeping the "
                              "arms it finished with these settings")


@dataclass(frozen=True)
class OutputArgs:
    """What the command prints."""

    as_json: bool = opt(False, "print a machine-readable summary as JSON", option="--json")
    quiet: bool = opt(False, "no progress bars")


@dataclass(frozen=True)
class SiteListArgs:
    include_routers: bool = opt(False, "also list mixture-of-experts routers")


@dataclass(frozen=True)
class LaunchArgs:
    """How long the ranks of a launcher wait for each other."""

    dist_timeout: float = opt(DIST_TIMEOUT, "seconds a rank of torchrun / accelerate launch waits for the others "
                                            "(at the start and at each exchange) before it stops, naming the missing",
                              range=(1, 7 * 24 * 3600))


def launchable(fn):
    """Under torchrun or accelerate launch (WORLD_SIZE > 1): join the process group, run the same command on every
    rank, and let rank 0 alone write --out and print. Without a launcher the command runs as it is."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from .distributed import is_main, launched, rank_outputs, start, stop

        model, run, output = kwargs.get("model"), kwargs["run"], kwargs["output"]
        if not launched():
            if model is not None and model.fsdp:
                raise PlacementError("--fsdp shards the model over the ranks of a launcher: start the command with "
                                     "torchrun --nproc_per_node N (or accelerate launch)")
            return fn(*args, **kwargs)
        if run.resume:
            raise PlacementError("--resume is not supported under a launcher: resume with one process, or start "
                                 "the run again with --overwrite")
        start(model.device if model is not None else "cpu", timeout=kwargs["launch"].dist_timeout)
        try:
            with rank_outputs(run.out) as out:
                kwargs["run"] = replace(run, out=out)
                if not is_main():
                    kwargs["output"] = replace(output, quiet=True)
                return fn(*args, **kwargs)
        finally:
            stop()
    return wrapper
