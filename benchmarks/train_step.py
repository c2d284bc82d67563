"""What one training step of `placement.train.train` costs, next to the loop a PEFT user would write and to the
least any step on the dominant site could cost.

Six arms, each on a fresh copy of the base model (`copy.deepcopy`) and the same batches
(`data.training_batches`, exactly the batches `train()` builds for the same settings):

  ours:dominant        `train(model, tokenizer, plan, examples, settings)`, the shipped trainer, on the plan that
  ours:all-linear      adapts the dominant site, and on `plan.with_strategy(Strategy("all-linear"))`. Per step:
                       `token_loss` forward (the LM head only at labelled positions, a block of them at a
                       time, so their logits never exist at once), backward, `clip_grad_norm_`,
                       AdamW step, schedule step, `zero_grad`.
  plain:dominant       what a PEFT user would write for the same plan: `get_peft_model(model, plan.lora_config())`
  plain:all-linear     (same seed, so the same lora_A draw), then per step
                       `model(input_ids=..., attention_mask=..., labels=...).loss` (logits over every position),
                       backward, `clip_grad_norm_`, AdamW step, the same schedule step, `zero_grad`.
  depth-bound:dominant the base model, no adapters: the same plain forward with full logits and loss, and a backward
                       cut at the dominant site's decoder layer (a forward pre-hook detaches that layer's input and
                       makes it require grad), so autograd runs from the loss down to that layer and no further, and
                       computes no weight gradient. No optimizer. A trainer of that site cannot do less work per step
                       than this unless it also takes logits at fewer positions, which `token_loss` does.
  ours-ckpt:all-linear the shipped trainer with `checkpointing=True` (`--checkpointing`): each decoder block's
                       activations are recomputed in the backward instead of kept, one more forward for less memory.

Seconds per step: each arm call runs one warm-up step and then `--steps-per-round` timed steps; a step's time is the
interval between the ends of two consecutive steps, taken after synchronising the device (on the CPU this is what
`TrainResult.seconds` records, which is printed beside it for the ours arms; on CUDA it also counts the kernels a
step queued but had not finished). Arms are interleaved within each round (ours, plain, depth bound, ...); an arm's
figure is the median over rounds of its mean timed step.

Peak memory: each arm runs again in a fresh child process (this script with `--arm`), which loads the model and
the batches, runs the arm once for one step on two examples on a throw-away copy (so lazy imports and one-time
set-up are not counted), and then measures the arm with `placement.measure.PeakMemory`: on the CPU the peak resident
set (VmHWM, reset through /proc/self/clear_refs) minus the resident set at that point, i.e. after loading; on CUDA
`torch.cuda.max_memory_allocated` minus the memory allocated at that point. It covers applying the plan, the
optimizer state and every step.

The dominant site comes from the real probe (`run_profile`, 2 batches of `--batch-size` at `--max-length`) unless
`--site NAME` names it. Training examples: the first 512 of the training split (`task_splits`, 100 test and 32
validation prompts held out), so the trainer's own tokenising stays short and out of the memory figures.

    python benchmarks/train_step.py                              # embedded SmolLM2-135M, builtin:arithmetic
    python benchmarks/train_step.py --rounds 2 --steps-per-round 1  # a quick look
    python benchmarks/train_step.py --tiny --rounds 2            # tiny random llama, seconds
    python benchmarks/train_step.py --device cuda
    python benchmarks/train_step.py --site model.layers.11.mlp.down_proj   # skip the probe
    python benchmarks/train_step.py --data ../shared/data/llm-adapters/math_data.json --max-length 256 \
        --site model.layers.11.mlp.down_proj --only all-linear                  # the memory target's workload

The last line reads
`dominant ours/plain=... all-linear ours/plain=... all-linear ours+ckpt/plain=... dominant/depth_bound=...
dominant/all-linear=...`.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

# This folder first on sys.path, so the shared helper is found however the script is started (as a file from
# anywhere, or with -m from the repository root); importing it puts the repository root on sys.path too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

import torch  # noqa: E402

from placement import data as data_mod  # noqa: E402
from placement.measure import PeakMemory  # noqa: E402
from placement.model.load import ModelSource  # noqa: E402
from placement.plan import Plan, Strategy  # noqa: E402
from placement.probe import ProbeSettings  # noqa: E402
from placement.study.profile import load_examples, model_block, run_profile  # noqa: E402
from placement.model.sites import find_blocks, find_sites, num_layers  # noqa: E402
from placement.train import TrainSettings, train  # noqa: E402

ARMS = ("ours:dominant", "plain:dominant", "depth-bound:dominant", "ours:all-linear", "plain:all-linear",
        "ours-ckpt:all-linear")
POOL = 512  # training examples handed to every arm
PROBE_BATCHES = 2

# Targets.
OURS_OVER_PLAIN = 0.85
DOMINANT_OVER_DEPTH_BOUND = 1.05
ALL_LINEAR_PEAK_OVER_PLAIN = 0.70  # stated at 256-token math records (--data math_data.json --max-length 256)

# The options a memory child needs to build the same workload as the timing run (the site is added apart: it is
# the one the parent's probe chose, which --site may not have named).
FORWARDED = ("model", "data", "steps_per_round", "batch_size", "max_length", "device", "dtype", "seed", "threads")
# (printed name, arm, arm): the ratios in the report and in the last line. OURS_VS_PLAIN are the pairs that train
# the same plan, the only ones whose peak memory is compared as well.
OURS_VS_PLAIN = (("dominant ours/plain", "ours:dominant", "plain:dominant"),
                 ("all-linear ours/plain", "ours:all-linear", "plain:all-linear"),
                 ("all-linear ours+ckpt/plain", "ours-ckpt:all-linear", "plain:all-linear"))
HEADLINE = OURS_VS_PLAIN + (("dominant/depth_bound", "ours:dominant", "depth-bound:dominant"),
                            ("dominant/all-linear", "ours:dominant", "ours:all-linear"))


# -- the workload ------------------------------------------------------------------------------------------------
@dataclass
class Workload:
    label: str
    model: torch.nn.Module  # the base, never trained on: every arm works on a copy
    tokenizer: object
    source: ModelSource
    examples: list
    device: torch.device


def build(args) -> Workload:
    device = torch.device(args.device)
    if args.tiny:
        from tiny import tiny_model, tiny_tokenizer

        model = tiny_model("llama", seed=args.seed, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=192).to(device)
        model.requires_grad_(False)
        tokenizer = tiny_tokenizer()
        source = ModelSource(name="tiny-llama", path="tests/tiny.py")
        label = "tiny llama (hidden 64, 4 layers)"
    else:
        from placement.model.load import load

        model, tokenizer, source = load(args.model, device=args.device, dtype=args.dtype)
        label = args.model
    train_split, _, _ = data_mod.task_splits(load_examples(args.data, args.seed), test=100, validation=32,
                                             seed=args.seed)
    return Workload(f"{label} ({args.data})", model.eval(), tokenizer, source, train_split[:POOL], device)


def site_plan(model, source: ModelSource, site: str) -> Plan:
    """The `dominant` plan for a site named by hand: that site ranked first, every other after it."""
    sites = find_sites(model)
    if site not in {s.name for s in sites}:
        sys.exit(f"--site {site} is not a candidate site of this model; sites look like {sites[0].name}")
    rows, rank = [], 2
    for s in sites:
        chosen = s.name == site
        rows.append(dict(site=s.name, layer=s.layer, role=s.role, d_in=s.d_in, d_out=s.d_out,
                         score=1.0 if chosen else 0.0, share=1.0 if chosen else 0.0, rank=1 if chosen else rank))
        rank += not chosen
    return Plan.build(model=model_block(model, source, sites), probe={"score": "given", "site": site}, sites=rows,
                      strategy=Strategy("dominant"), peft=ProbeSettings().lora_kwargs())


def dominant_plan(work: Workload, args) -> tuple[Plan, float | None]:
    if args.site:
        return site_plan(work.model, work.source, args.site), None
    began = time.perf_counter()
    profile = run_profile(work.model, work.tokenizer, work.source, args.data, batches=PROBE_BATCHES,
                          batch_size=args.batch_size, max_length=args.max_length, examples=work.examples)
    return profile.plan, time.perf_counter() - began


def settings_for(args, steps: int, batch_size: int | None = None) -> TrainSettings:
    return TrainSettings(steps=steps, batch_size=batch_size or args.batch_size, max_length=args.max_length,
                         seed=args.seed)


# -- the arms ----------------------------------------------------------------------------------------------------
@dataclass
class Job:
    """One arm's inputs; `model` is the arm's own copy of the base."""

    model: torch.nn.Module
    tokenizer: object
    plans: dict  # "dominant" / "all-linear" -> Plan
    examples: list
    batches: list  # training_batches for `settings`, the same list train() builds
    settings: TrainSettings
    device: torch.device


@dataclass
class ArmRun:
    step_seconds: list  # timed steps (the first, warm-up step is left out)
    losses: list
    train_seconds: list = field(default_factory=list)  # TrainResult.seconds of the timed steps (ours arms only)


def run_ours(job: Job, plan_name: str) -> ArmRun:
    clock = bench.StepClock(job.device)
    result = train(job.model, job.tokenizer, job.plans[plan_name], job.examples, job.settings, on_step=clock.tick)
    return ArmRun(clock.steps(), result.losses, result.seconds[1:])


def run_plain(job: Job, plan_name: str) -> ArmRun:
    from peft import get_peft_model
    from transformers import get_linear_schedule_with_warmup

    settings = job.settings
    torch.manual_seed(settings.seed)  # the lora_A draw train() makes for this seed
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        model = get_peft_model(job.model, job.plans[plan_name].lora_config())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, settings.warmup_span(), settings.steps)
    model.train()
    clock, losses = bench.StepClock(job.device), []
    for batch in job.batches:
        batch = batch.to(job.device)
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
        losses.append(float(loss.detach()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, settings.clip)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.tick()
    model.eval()
    return ArmRun(clock.steps(), losses)


def _cut_below(module, args, kwargs):
    """Forward pre-hook: the block's input becomes a leaf, so backward stops here and goes no deeper."""
    if args:
        return (args[0].detach().requires_grad_(True),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs, hidden_states=kwargs["hidden_states"].detach().requires_grad_(True))
    return args, kwargs


def run_depth_bound(job: Job, plan_name: str) -> ArmRun:
    layer = dominant_layer(job.plans[plan_name])
    block = find_blocks(job.model)[1][layer]
    handle = block.register_forward_pre_hook(_cut_below, with_kwargs=True)
    model = job.model
    model.train()
    clock, losses = bench.StepClock(job.device), []
    try:
        for batch in job.batches:
            batch = batch.to(job.device)
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            losses.append(float(loss.detach()))
            loss.backward()
            clock.tick()
    finally:
        handle.remove()
        model.eval()
    return ArmRun(clock.steps(), losses)


def run_ours_checkpointed(job: Job, plan_name: str) -> ArmRun:
    """The trainer with `--checkpointing`: each block's activations recomputed in the backward."""
    return run_ours(replace(job, settings=replace(job.settings, checkpointing=True)), plan_name)


RUNNERS = {"ours": run_ours, "plain": run_plain, "depth-bound": run_depth_bound,
           "ours-ckpt": run_ours_checkpointed}


def run_arm(arm: str, job: Job) -> ArmRun:
    kind, plan_name = arm.split(":")
    return RUNNERS[kind](job, plan_name)


def dominant_layer(plan: Plan) -> int:
    by_name = {row["site"]: row for row in plan.sites}
    return int(by_name[plan.targets[0]]["layer"])


def make_job(work: Workload, plans: dict, settings: TrainSettings, model) -> Job:
    batches = data_mod.training_batches(work.tokenizer, work.examples, steps=settings.steps,
                                        batch_size=settings.batch_size, max_length=settings.max_length,
                                        seed=settings.seed)
    return Job(model, work.tokenizer, plans, work.examples, batches, settings, work.device)


# -- peak memory, in a child process -----------------------------------------------------------------------------
def measure_arm(args) -> dict:
    """Child process: load, warm up on a throw-away copy, then run the arm once and report its peak memory."""
    work = build(args)
    dominant = site_plan(work.model, work.source, args.site)
    plans = {"dominant": dominant, "all-linear": dominant.with_strategy(Strategy("all-linear"))}
    spare = copy.deepcopy(work.model)
    run_arm(args.arm, make_job(work, plans, settings_for(args, 1, batch_size=2), spare))
    del spare
    gc.collect()
    job = make_job(work, plans, settings_for(args, args.steps_per_round + 1), work.model)
    with PeakMemory(work.device) as peak:
        run_arm(args.arm, job)
    method = "cuda max_memory_allocated" if work.device.type == "cuda" else (
        "VmHWM" if peak.exact else "lifetime VmHWM, an upper bound")
    return {"arm": args.arm, "peak_mib": peak.mib, "method": method}


def child_peak(arm: str, site: str, args) -> dict:
    """Peak memory of one arm in a fresh process, which inherits this one's environment and so its allocator
    settings; --threads 0 is forwarded as it is and keeps torch's default there too."""
    argv = ["--arm", arm, "--site", site] + bench.forward_options(args, FORWARDED, flags=("tiny",))
    return bench.run_child(__file__, argv, arm)


# -- timing and report -------------------------------------------------------------------------------------------
@dataclass
class Outcome(bench.RoundTimes):
    work: Workload
    plans: dict
    layer: int
    layers: int
    probe_seconds: float | None
    seconds: dict = field(default_factory=lambda: {arm: [] for arm in ARMS})  # mean timed step per round
    train_seconds: dict = field(default_factory=lambda: {arm: [] for arm in ARMS})
    losses: dict = field(default_factory=dict)  # arm -> losses of the last round
    peak: dict = field(default_factory=dict)  # arm -> MiB
    peak_method: str = ""

    def median(self, arm: str) -> float:
        """nan for an arm left out with --only."""
        return bench.RoundTimes.median(self, arm) if self.seconds.get(arm) else float("nan")


def chosen_arms(args) -> list[str]:
    return [arm for arm in ARMS if args.only is None or arm.endswith(":" + args.only)]


def time_rounds(work: Workload, plans: dict, args, out: Outcome, log) -> None:
    settings = settings_for(args, args.steps_per_round + 1)
    # No warm-up round: every arm call warms up on its own first step, which StepClock leaves out.
    for round_index, arm in bench.interleaved(chosen_arms(args), args.rounds):
        job = make_job(work, plans, settings, copy.deepcopy(work.model))
        gc.collect()
        run = run_arm(arm, job)
        job.model = None
        del job
        gc.collect()
        mean = statistics.fmean(run.step_seconds)
        out.seconds[arm].append(mean)
        if run.train_seconds:
            out.train_seconds[arm].append(statistics.fmean(run.train_seconds))
        out.losses[arm] = run.losses
        log(f"  {bench.round_label(round_index)} {arm:<21} {mean:8.3f} s/step")


def report(out: Outcome, args) -> list[str]:
    work = out.work
    dominant, all_linear = out.plans["dominant"], out.plans["all-linear"]
    origin = f"probe, {PROBE_BATCHES} batches, {out.probe_seconds:.1f} s" if out.probe_seconds is not None else "--site"
    lines = [
        f"== {work.label}",
        f"   device {work.device}, {torch.get_num_threads()} threads; batch {args.batch_size} x at most "
        f"{args.max_length} tokens; {args.rounds} round(s) of 1 warm-up + {args.steps_per_round} timed step(s) per arm",
        f"   dominant site {dominant.targets[0]} (layer {out.layer} of {out.layers}, from the {origin}); "
        f"{dominant.trainable_params:,} LoRA parameters; all-linear: {len(all_linear.targets)} sites, "
        f"{all_linear.trainable_params:,} parameters",
        f"   {'arm':<22}{'median s':>10}{'min s':>9}{'max s':>9}{'peak MiB':>10}",
    ]
    for arm in (a for a in ARMS if out.seconds[a]):
        times = out.seconds[arm]
        peak = f"{out.peak[arm]:10.1f}" if arm in out.peak else f"{'-':>10}"
        lines.append(f"   {arm:<22}{out.median(arm):10.3f}{min(times):9.3f}{max(times):9.3f}{peak}")
    if out.peak:
        lines.append(f"   peak memory: {out.peak_method}, above the loaded model")
    ours_seconds = ", ".join(f"{arm} {statistics.median(out.train_seconds[arm]):.3f} s"
                             for arm in ARMS if out.train_seconds[arm])
    lines.append(f"   ours as train() records it (TrainResult.seconds, median over rounds): {ours_seconds}")
    for plan_name in (p for p in ("dominant", "all-linear") if f"ours:{p}" in out.losses):
        ours, plain = out.losses[f"ours:{plan_name}"], out.losses[f"plain:{plan_name}"]
        gap = max(abs(a - b) for a, b in zip(ours, plain))
        lines.append(f"   {plan_name} losses, ours vs plain, same batches and lora_A: max |difference| {gap:.1e}")
    lines.append(f"   ratios: {bench.figures(out.ratios(HEADLINE))} (dominant layer {out.layer} of {out.layers}: "
                 f"backward reaches {out.layers - out.layer} of {out.layers} layers)")
    if out.peak:
        memory = bench.figures((name, out.peak[a] / out.peak[b]) for name, a, b in OURS_VS_PLAIN if a in out.peak)
        lines.append(f"   peak memory ratios: {memory}")
    return lines


def checks(out: Outcome) -> tuple[list[str], bool]:
    items = [
        (f"dominant ours <= {OURS_OVER_PLAIN:.2f} x plain", out.ratio("ours:dominant", "plain:dominant"),
         OURS_OVER_PLAIN),
        (f"all-linear ours <= {OURS_OVER_PLAIN:.2f} x plain", out.ratio("ours:all-linear", "plain:all-linear"),
         OURS_OVER_PLAIN),
        (f"dominant ours <= {DOMINANT_OVER_DEPTH_BOUND:.2f} x depth bound",
         out.ratio("ours:dominant", "depth-bound:dominant"), DOMINANT_OVER_DEPTH_BOUND),
    ]
    for arm, how in (("ours:all-linear", ""), ("ours-ckpt:all-linear", " with --checkpointing")):
        if arm in out.peak:
            items.append((f"all-linear ours{how} peak <= {ALL_LINEAR_PEAK_OVER_PLAIN:.2f} x plain peak",
                          out.peak[arm] / out.peak["plain:all-linear"], ALL_LINEAR_PEAK_OVER_PLAIN))
    items.append(("all-linear ours with --checkpointing <= 1.00 x plain (the memory target's speed)",
                  out.ratio("ours-ckpt:all-linear", "plain:all-linear"), 1.0))
    lines, ok = [], True
    for title, value, limit in items:
        if value != value:  # an arm left out
            lines.append(f"target {title}: not measured -> SKIP")
            continue
        passed = value <= limit
        ok = ok and passed
        lines.append(f"target {title}: {value:.2f} x -> {'PASS' if passed else 'FAIL'}")
    return lines, ok


# -- command line ------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model to train (default %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="a tiny random llama from tests/tiny.py instead, for a smoke run")
    p.add_argument("--data", default="builtin:arithmetic", help="training data (default %(default)s)")
    p.add_argument("--site", help="the dominant site, which skips the probe")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (default %(default)s)")
    p.add_argument("--steps-per-round", type=int, default=3,
                   help="timed steps per arm per round, after one warm-up step (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per step (default %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example at most (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--dtype", default="float32", help="dtype of the model (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0,
                   help="torch CPU threads; 0 keeps torch's default, which follows OMP_NUM_THREADS")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--only", choices=("dominant", "all-linear"), help="only the arms of this plan")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--quiet", action="store_true", help="no per-round timing lines")
    p.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1 or args.steps_per_round < 1:
        p.error("--rounds and --steps-per-round must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA device is visible")
    if args.arm and not args.site:
        p.error("--arm needs --site")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arm:
        bench.report_to_parent(measure_arm(args))
        return 0
    log = bench.make_log(args.quiet)
    began = time.perf_counter()
    work = build(args)
    dominant, probe_seconds = dominant_plan(work, args)
    plans = {"dominant": dominant, "all-linear": dominant.with_strategy(Strategy("all-linear"))}
    out = Outcome(work, plans, dominant_layer(dominant), num_layers(work.model), probe_seconds)
    log(f"dominant site {dominant.targets[0]}; timing {len(chosen_arms(args))} arms, {args.rounds} rounds")
    time_rounds(work, plans, args, out, log)
    work.model = None  # free it before the memory children load their own copy
    gc.collect()
    if not args.no_memory:
        for arm in chosen_arms(args):
            res = child_peak(arm, dominant.targets[0], args)
            out.peak[arm], out.peak_method = res["peak_mib"], res["method"]
            log(f"  peak memory {arm:<21} {res['peak_mib']:9.1f} MiB")

    print()
    print("\n".join(report(out, args)))
    lines, ok = checks(out)
    print(f"== targets (benchmark took {time.perf_counter() - began:.0f} s)")
    print("\n".join(lines))
    print(bench.figures(out.ratios(HEADLINE)), flush=True)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
