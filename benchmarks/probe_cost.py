"""What the PAGE probe costs, next to the work it cannot avoid and the work a user would otherwise write.

Five arms, each over the same list of calibration batches:

  floor  a plain forward + backward with every base weight frozen and the input embeddings requiring grad, its loss
         over every labelled position's logits at once (`bench_common.full_logits_loss`, the token loss as users
         compute it): the gradient has to reach every site, and this is the backward users run. Memory targets are
         stated against it.
  floor_chunked  the same backward through `token_loss`, which applies the LM head a block of target tokens at a
         time: the floor of anything that uses the shared loss, so the probe's peak over it is what the probe adds.
  exact  `probe(model, sites, batches, ProbeSettings())`.
  fast   `probe(..., ProbeSettings(mode="fast", draws=8))`.
  naive  what a user would write: `requires_grad` on every site's weight, one backward of `token_loss` per batch,
         ||weight.grad||^2 read at every site, grads dropped.

A further timed arm, `spectrum`, is the exact probe that also keeps each site's gradient spectrum (`--spectrum-k 64`,
what page_opt and rank allocation need, from the randomized range finder); its cost is reported as
(exact+spectrum)/exact, target at most 1.3. Another, `families`, is
the exact probe with the other identity families (IA3, series and parallel bottleneck) scored in the same passes:
(exact+families)/exact, target at most 1.15.

Two workloads on the embedded model, side by side: `short` (builtin:arithmetic, 4 batches of 8 prompts of about 44
tokens) and `long` (the `output` texts of math_data.json as plain text, packed into rows of exactly 512 tokens, 4
batches of 4, every token a target); `--tiny-only` runs a tiny random llama instead, in seconds; `--skip` leaves
timed arms out. Wall times are medians of interleaved rounds (floor, exact, fast, naive, floor, ...) after one warm-up
round. Peak memory is measured per arm in a fresh child process running this script with `--arm`: on CPU the peak
resident set (VmHWM after resetting it through /proc/self/clear_refs, or a 5 ms VmRSS sampler where that reset
does not work) minus the resident set once the model and batches are loaded and the arm has run once on two
examples (so lazy imports and one-time set-up are not counted; freed heap is trimmed before the baseline); on CUDA
`torch.cuda.max_memory_allocated` minus the memory allocated at that point.

On CPU each arm's memory is measured twice. With glibc's defaults the mmap threshold grows as large tensors are
freed, later tensors come from the heap, and freed heap stays resident: that figure counts fragmentation, depends
on the order of allocations and moves by a hundred MiB between arms that hold the same tensors. The headline
figure fixes the threshold at glibc's initial 128 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor larger than that
is its own mapping, returned when freed, and the resident set follows the live tensors. A fifth memory-only arm,
`exact_ckpt`, is the exact probe with gradient checkpointing (`--checkpointing`), which keeps block inputs instead
of activations.

    python benchmarks/probe_cost.py                 # short and long, 3 rounds
    python benchmarks/probe_cost.py --rounds 1      # a quick look
    python benchmarks/probe_cost.py --tiny-only     # seconds, no model download or cache needed
    python benchmarks/probe_cost.py --device cuda

The last line reads `short fast/floor=... exact/naive=... exact_peak/floor_peak=... spearman=... long ...`.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

# This folder first on sys.path, so the shared helper is found however the script is started (as a file from
# anywhere, or with -m from the repository root); importing it puts the repository root on sys.path too.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402

import torch  # noqa: E402

from placement.probe import ProbeSettings, probe, token_loss  # noqa: E402
from placement.model.sites import candidate_weight_bytes, find_sites, modules_by_name  # noqa: E402

ARMS = ("floor", "floor_chunked", "exact", "fast", "naive", "spectrum", "families")
MEMORY_ARMS = ("floor", "floor_chunked", "exact", "fast", "naive", "exact_ckpt")
ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "131072"}, "glibc default": {}}
TARGETS = ("tiny", "short", "long")
MATH = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "llm-adapters" / "math_data.json"
MB = bench.MB
# The options a memory child needs to build the same workload as the timing run.
FORWARDED = ("model", "data", "batches", "batch_size", "max_length", "draws", "device", "dtype", "seed", "threads",
             "tiny_hidden", "tiny_layers", "long_data", "long_length", "long_batches", "long_batch_size")
# Ratio lines: (printed name, arm, arm); HEADLINE is the part of the last line that comes from wall times.
RATIOS = (("fast/floor", "fast", "floor"), ("exact/floor", "exact", "floor"), ("exact/naive", "exact", "naive"),
          ("fast/naive", "fast", "naive"), ("naive/floor", "naive", "floor"),
          ("(exact+spectrum)/exact", "spectrum", "exact"), ("(exact+families)/exact", "families", "exact"))
HEADLINE = (("fast/floor", "fast", "floor"), ("exact/naive", "exact", "naive"))
MEMORY_RATIOS = (("exact", "floor"), ("exact_ckpt", "floor"), ("fast", "floor"), ("exact", "naive"),
                 ("floor_chunked", "floor"), ("exact", "floor_chunked"), ("exact_ckpt", "floor_chunked"),
                 ("fast", "floor_chunked"))

# Targets, checked on every workload: the floor is a plain backward, which already holds the activation gradients.
FAST_OVER_FLOOR = 1.10
EXACT_OVER_NAIVE = 1.00
EXACT_PEAK_OVER_FLOOR = 0.90
CKPT_PEAK_OVER_FLOOR = 0.45
FAST_PEAK_OVER_FLOOR = 0.90
SPECTRUM_OVER_EXACT = 1.30
MIN_SPEARMAN = 0.95


# -- what is measured --------------------------------------------------------------------------------------------
@dataclass
class Workload:
    label: str
    model: torch.nn.Module
    sites: list
    batches: list
    device: torch.device
    weight_bytes: int
    describe: str


def _backward_only(work: Workload, loss) -> None:
    """Forward + backward with a frozen base and input embeddings requiring grad; nothing is read."""
    model = work.model
    model.enable_input_require_grads()
    try:
        for batch in work.batches:
            loss(model, batch.to(work.device)).backward()
    finally:
        model.disable_input_require_grads()


def arm_floor(work: Workload, draws: int):
    _backward_only(work, bench.full_logits_loss)


def arm_floor_chunked(work: Workload, draws: int):
    _backward_only(work, token_loss)


def arm_exact(work: Workload, draws: int):
    return probe(work.model, work.sites, work.batches, ProbeSettings()).scores


def arm_fast(work: Workload, draws: int):
    return probe(work.model, work.sites, work.batches, ProbeSettings(mode="fast", draws=draws)).scores


def arm_naive(work: Workload, draws: int):
    """Every site's weight requires grad; one backward per batch; ||grad||^2 per site (the mean over batches is
    the exact probe's `grad_energy`); grads dropped before the next batch."""
    modules = modules_by_name(work.model, work.sites)
    weights = [modules[s.name].weight for s in work.sites]
    energy = torch.zeros(len(weights), dtype=torch.float64)
    for w in weights:
        w.requires_grad_(True)
    try:
        for batch in work.batches:
            token_loss(work.model, batch.to(work.device)).backward()
            for i, w in enumerate(weights):
                if w.grad is not None:
                    energy[i] += float(w.grad.double().pow(2).sum())
                    w.grad = None
    finally:
        for w in weights:
            w.grad = None
            w.requires_grad_(False)
    return energy / len(work.batches)


def arm_exact_ckpt(work: Workload, draws: int):
    return probe(work.model, work.sites, work.batches, ProbeSettings(checkpointing=True)).scores


def arm_spectrum(work: Workload, draws: int):
    return probe(work.model, work.sites, work.batches, ProbeSettings(spectrum_k=64)).scores


def arm_families(work: Workload, draws: int):
    """The exact LoRA probe with IA3 and both bottleneck families scored in the same passes."""
    from placement.probe.families import FamilyScoring

    with FamilyScoring(work.model, ["ia3", "series-bn", "parallel-bn"]):
        return probe(work.model, work.sites, work.batches, ProbeSettings()).scores


RUNNERS = {"families": arm_families, "floor": arm_floor, "floor_chunked": arm_floor_chunked, "exact": arm_exact,
           "fast": arm_fast, "naive": arm_naive,
           "exact_ckpt": arm_exact_ckpt, "spectrum": arm_spectrum}


# -- building the two workloads ----------------------------------------------------------------------------------
def random_batches(count: int, batch_size: int, max_length: int, vocab: int, seed: int) -> list:
    """Random token ids with ragged lengths, right padding and the first quarter of each example masked out."""
    from placement.data import collate

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        rendered = []
        for i in range(batch_size):
            n = max(4, max_length - (i % 4) * max(1, max_length // 8))
            ids = torch.randint(5, vocab, (n,), generator=g).tolist()
            prompt = n // 4
            rendered.append((ids, [-100] * prompt + ids[prompt:]))
        out.append(collate(rendered, pad_id=0))
    return out


def packed_batches(tokenizer, path: Path, count: int, batch_size: int, length: int) -> list:
    """The `output` texts of an LLM-Adapters file as plain text, joined by EOS and cut into rows of exactly `length`
    tokens: long sequences with every token a target, as in continued pre-training."""
    import json

    from placement.data import collate

    records = json.loads(path.read_text(encoding="utf-8"))
    stream: list[int] = []
    need = count * batch_size * length
    for record in records:
        stream += tokenizer(record["output"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(stream) >= need:
            break
    if len(stream) < need:
        raise SystemExit(f"{path} holds {len(stream)} tokens; {need} are needed for the long workload")
    rows = [stream[i * length:(i + 1) * length] for i in range(count * batch_size)]
    return [collate([(row, row) for row in rows[b * batch_size:(b + 1) * batch_size]], pad_id=0)
            for b in range(count)]


def _shape_text(batches: list) -> str:
    tokens = sum(int(b.attention_mask.sum()) for b in batches)
    targets = sum(b.target_tokens() for b in batches)
    widths = sorted({int(b.input_ids.shape[1]) for b in batches})
    width = str(widths[0]) if len(widths) == 1 else f"{widths[0]}-{widths[-1]}"
    return (f"{len(batches)} batches x {batches[0].input_ids.shape[0]} x {width} tokens "
            f"({tokens} tokens, {targets} target tokens)")


def build(target: str, args) -> Workload:
    device = torch.device(args.device)
    if target == "tiny":
        from tiny import VOCAB_SIZE, tiny_model

        model = tiny_model(
            "llama", seed=args.seed, hidden_size=args.tiny_hidden, num_hidden_layers=args.tiny_layers,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=args.tiny_hidden * 3,
        ).to(device)
        batches = random_batches(args.batches, args.batch_size, args.max_length, VOCAB_SIZE, args.seed)
        label = f"tiny llama (hidden {args.tiny_hidden}, {args.tiny_layers} layers)"
    else:
        from placement.model.load import load
        from placement.study.profile import calibration_batches

        model, tokenizer, _ = load(args.model, device=args.device, dtype=args.dtype)
        if target == "long":
            batches = packed_batches(tokenizer, Path(args.long_data), args.long_batches, args.long_batch_size,
                                     args.long_length)
            label = f"long: {args.model} (math_data outputs, packed to {args.long_length} tokens)"
        else:
            batches = calibration_batches(tokenizer, args.data, batches=args.batches, batch_size=args.batch_size,
                                          max_length=args.max_length, seed=args.seed)
            label = f"short: {args.model} ({args.data})"
    model.requires_grad_(False)
    model.eval()
    batches = [b.to(device) for b in batches]
    sites = find_sites(model)
    weight_bytes = candidate_weight_bytes(model, sites)
    describe = (f"{len(sites)} sites, candidate weights {weight_bytes / MB:.1f} MiB, {_shape_text(batches)}, "
                f"device {device}, {torch.get_num_threads()} threads")
    return Workload(label, model, sites, batches, device, weight_bytes, describe)


# -- peak memory, in a child process -----------------------------------------------------------------------------
def measure_arm(args) -> dict:
    """Child process: load, then run one arm once over the batches and report its peak memory above the loaded state."""
    work = build(args.target, args)
    runner = RUNNERS[args.arm]
    # One small call first, so that lazy imports and one-time initialisation are not counted as the arm's memory.
    full = work.batches
    first = full[0]
    work.batches = [type(first)(first.input_ids[:2], first.attention_mask[:2], first.labels[:2])]
    runner(work, args.draws)
    work.batches = full
    return {"arm": args.arm, "target": args.target,
            **bench.peak_above_here(work.device, lambda: runner(work, args.draws))}


def child_peak(target: str, arm: str, args, allocator: dict) -> dict:
    argv = ["--arm", arm, "--target", target] + bench.forward_options(args, FORWARDED)
    return bench.run_child(__file__, argv, f"{target}/{arm}", env=allocator)


# -- timing and comparison ---------------------------------------------------------------------------------------
@dataclass
class Outcome(bench.RoundTimes):
    work: Workload
    seconds: dict = field(default_factory=lambda: {arm: [] for arm in ARMS})  # arm -> seconds per counted round
    results: dict = field(default_factory=dict)
    peak: dict = field(default_factory=dict)  # arm -> bytes, the headline allocator setting
    peak_default: dict = field(default_factory=dict)  # arm -> bytes, glibc's default allocator (CPU only)
    peak_method: str = ""

    def median(self, arm: str) -> float:
        """nan for an arm left out with --skip."""
        return bench.RoundTimes.median(self, arm) if self.seconds.get(arm) else float("nan")

    def mem_ratio(self, a: str, b: str) -> float:
        return self.peak[a] / self.peak[b] if self.peak.get(b) and a in self.peak else float("nan")

    def spearman(self) -> float:
        from scipy.stats import spearmanr

        return float(spearmanr(self.results["fast"]["page"], self.results["exact"]["page"]).statistic)

    def top(self, arm: str) -> str:
        frame = self.results[arm]
        return str(frame["site"].iloc[int(frame["page"].to_numpy().argmax())])

    def naive_vs_exact(self) -> float:
        """Largest relative gap between the naive ||grad W||^2 and the exact probe's grad_energy over sites."""
        exact = torch.tensor(self.results["exact"]["grad_energy"].to_numpy(), dtype=torch.float64)
        naive = self.results["naive"]
        return float(((naive - exact).abs() / exact.abs().clamp(min=1e-30)).max())


def time_rounds(work: Workload, rounds: int, draws: int, log, skip=()) -> Outcome:
    out = Outcome(work)
    for round_index, arm in bench.interleaved([a for a in ARMS if a not in skip], rounds, warm_up=True):
        result, seconds = bench.timed(work.device, lambda: RUNNERS[arm](work, draws))
        if round_index:  # round 0 is the warm-up
            out.seconds[arm].append(seconds)
        if result is not None:
            out.results[arm] = result
        log(f"  {bench.round_label(round_index)} {arm:<5} {seconds:8.3f} s")
    return out


def report(out: Outcome) -> list[str]:
    floor, naive = out.median("floor"), out.median("naive")
    lines = [f"== {out.work.label}", f"   {out.work.describe}"]
    lines.append(f"   {'arm':<13}{'median s':>10}{'min s':>10}{'max s':>10}{'x floor':>9}{'x naive':>9}{'peak MiB':>10}"
                 f"{'glibc default':>14}")
    for arm in (a for a in ARMS if out.seconds[a]):
        times = out.seconds[arm]
        peak = f"{out.peak[arm] / MB:10.1f}" if arm in out.peak else f"{'-':>10}"
        default = f"{out.peak_default[arm] / MB:14.1f}" if arm in out.peak_default else f"{'-':>14}"
        lines.append(f"   {arm:<13}{out.median(arm):10.3f}{min(times):10.3f}{max(times):10.3f}"
                     f"{out.median(arm) / floor:9.2f}{out.median(arm) / naive:9.2f}{peak}{default}")
    for arm in (a for a in MEMORY_ARMS if a not in ARMS and a in out.peak):
        default = f"{out.peak_default[arm] / MB:14.1f}" if arm in out.peak_default else f"{'-':>14}"
        lines.append(f"   {arm:<13}{'(memory only)':>49}{out.peak[arm] / MB:10.1f}{default}")
    lines.append("   ratios: " + bench.figures(out.ratios(RATIOS)))
    if out.peak:
        saved = out.peak["naive"] - out.peak["exact"]
        memory = bench.figures((f"{a}/{b}", out.mem_ratio(a, b)) for a, b in MEMORY_RATIOS)
        lines.append(f"   peak memory ({out.peak_method}): {memory}; "
                     f"naive - exact = {saved / MB:.1f} MiB = {saved / out.work.weight_bytes:.2f} x candidate weights")
    lines.append(f"   fast vs exact page: spearman={out.spearman():.3f}; top site exact={out.top('exact')} "
                 f"fast={out.top('fast')}")
    lines.append(f"   naive ||grad W||^2 vs exact grad_energy: max relative gap {out.naive_vs_exact():.1e}")
    return lines


def side_by_side(outcomes: dict[str, Outcome]) -> list[str]:
    names = list(outcomes)
    rows = [("floor s", lambda o: f"{o.median('floor'):.3f}"), ("exact s", lambda o: f"{o.median('exact'):.3f}"),
            ("fast s", lambda o: f"{o.median('fast'):.3f}"), ("naive s", lambda o: f"{o.median('naive'):.3f}"),
            ("spectrum s", lambda o: f"{o.median('spectrum'):.3f}"),
            ("fast/floor", lambda o: f"{o.ratio('fast', 'floor'):.2f}"),
            ("exact/floor", lambda o: f"{o.ratio('exact', 'floor'):.2f}"),
            ("exact/naive", lambda o: f"{o.ratio('exact', 'naive'):.2f}"),
            ("peak floor MiB", lambda o: f"{o.peak['floor'] / MB:.1f}" if o.peak else "-"),
            ("peak exact MiB", lambda o: f"{o.peak['exact'] / MB:.1f}" if o.peak else "-"),
            ("peak fast MiB", lambda o: f"{o.peak['fast'] / MB:.1f}" if o.peak else "-"),
            ("peak naive MiB", lambda o: f"{o.peak['naive'] / MB:.1f}" if o.peak else "-"),
            ("peak exact/naive", lambda o: f"{o.mem_ratio('exact', 'naive'):.2f}" if o.peak else "-"),
            ("peak exact/floor", lambda o: f"{o.mem_ratio('exact', 'floor'):.2f}" if o.peak else "-"),
            ("(exact+spec)/exact", lambda o: f"{o.ratio('spectrum', 'exact'):.2f}"),
            ("peak exact_ckpt MiB", lambda o: f"{o.peak['exact_ckpt'] / MB:.1f}" if o.peak else "-"),
            ("peak floor_chunked MiB", lambda o: f"{o.peak['floor_chunked'] / MB:.1f}" if o.peak else "-"),
            ("floor_chunked/floor s", lambda o: f"{o.ratio('floor_chunked', 'floor'):.2f}"),
            ("candidate MiB", lambda o: f"{o.work.weight_bytes / MB:.1f}"),
            ("fast spearman", lambda o: f"{o.spearman():.3f}")]
    width = max(14, *(len(n) + 2 for n in names))
    lines = ["== side by side", f"   {'':<24}" + "".join(f"{n:>{width}}" for n in names)]
    for title, cell in rows:
        lines.append(f"   {title:<24}" + "".join(f"{cell(outcomes[n]):>{width}}" for n in names))
    return lines


def checks(out: Outcome) -> tuple[list[str], bool]:
    """The targets on one workload; a missed one is explained by the phase that costs what (see `why`)."""
    lines, all_ok = [], True
    items = [
        (f"fast <= {FAST_OVER_FLOOR:.2f} x floor", out.ratio("fast", "floor") <= FAST_OVER_FLOOR,
         f"{out.ratio('fast', 'floor'):.2f} x"),
        (f"exact <= {EXACT_OVER_NAIVE:.2f} x naive", out.ratio("exact", "naive") <= EXACT_OVER_NAIVE,
         f"{out.ratio('exact', 'naive'):.2f} x"),
        ("exact+families <= 1.15 x exact", _within(out.ratio("families", "exact"), 1.15),
         f"{out.ratio('families', 'exact'):.2f} x"),
        (f"exact+spectrum <= {SPECTRUM_OVER_EXACT:.2f} x exact",
         _within(out.ratio("spectrum", "exact"), SPECTRUM_OVER_EXACT), f"{out.ratio('spectrum', 'exact'):.2f} x"),
    ]
    for arm, bound in (("exact", EXACT_PEAK_OVER_FLOOR), ("exact_ckpt", CKPT_PEAK_OVER_FLOOR),
                       ("fast", FAST_PEAK_OVER_FLOOR)):
        ratio = out.mem_ratio(arm, "floor") if out.peak else float("nan")
        items.append((f"{arm} peak <= {bound:.2f} x floor peak", None if ratio != ratio else ratio <= bound,
                      f"{ratio:.2f} x"))
    items += [
        ("fast top site == exact top site", out.top("fast") == out.top("exact"), f"{out.top('fast')} / {out.top('exact')}"),
        (f"spearman >= {MIN_SPEARMAN:.2f}", out.spearman() >= MIN_SPEARMAN, f"{out.spearman():.3f}"),
    ]
    for title, ok, value in items:
        lines.append(f"target {title}: {value} -> {'SKIP' if ok is None else 'PASS' if ok else 'FAIL'}")
        all_ok = all_ok and ok is not False
    return lines + why(out), all_ok


def _within(ratio: float, bound: float) -> bool | None:
    """None (SKIP) for an arm that was not run."""
    return None if ratio != ratio else ratio <= bound


def why(out: Outcome) -> list[str]:
    """Where the time goes, as differences between arms measured side by side: what the probe adds to the plain
    backward, and what the weight-sized gradient of the naive probe costs on this workload."""
    floor = out.median("floor")
    return [f"   phases: backward {floor:.2f} s; the exact probe adds {out.median('exact') - floor:+.2f} s, the fast "
            f"one {out.median('fast') - floor:+.2f} s, the naive one {out.median('naive') - floor:+.2f} s "
            f"(its weight-sized gradients), the spectrum {out.median('spectrum') - out.median('exact'):+.2f} s, "
            f"the other families {out.median('families') - out.median('exact'):+.2f} s"]


def headline(name: str, out: Outcome) -> str:
    pairs = out.ratios(HEADLINE) + [("exact_peak/floor_peak", out.mem_ratio("exact", "floor")),
                                    ("spearman", out.spearman())]
    return f"{name} " + bench.figures(pairs)


# -- the training scores against the training they stand in for ------------------------------------------------
LOOKAHEAD_OVER_STEPS = 1.30


def lookahead_cost(work: Workload, steps: int, rounds: int, log) -> str:
    """Side by side in interleaved rounds: `lookahead` and `lora_drop` through the score registry on one context
    (one K-step LoRA run on every site, then the lora_drop forward) against K training steps of all-linear LoRA on
    the same batches (PEFT, the probe's rank and alpha, AdamW at the same rate, clipping at 1). Target: <= 1.3 x."""
    from peft import LoraConfig, get_peft_model

    from placement.probe.registry import ScoreContext, get_score

    settings = ProbeSettings(lookahead_steps=steps)

    def scores():
        ctx = ScoreContext(model=work.model, sites=work.sites, batches=work.batches, settings=settings)
        return [get_score(name).compute(ctx) for name in ("lookahead", "lora_drop")]

    def training():
        kwargs = {k: v for k, v in settings.lora_kwargs().items() if k != "task_type"}
        peft_model = get_peft_model(work.model, LoraConfig(target_modules=[s.name for s in work.sites], **kwargs))
        peft_model.eval()
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=settings.lookahead_lr)
        try:
            for step in range(steps):
                token_loss(peft_model, work.batches[step % len(work.batches)]).backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        finally:
            peft_model.unload()
            work.model.requires_grad_(False)

    runners = {"scores": scores, "training": training}
    times = {arm: [] for arm in runners}
    for round_index, arm in bench.interleaved(runners, rounds, warm_up=True):
        _, seconds = bench.timed(work.device, runners[arm])
        if round_index:
            times[arm].append(seconds)
        log(f"  {bench.round_label(round_index)} {arm:<8} {seconds:8.3f} s")
    ratio = statistics.median(times["scores"]) / statistics.median(times["training"])
    return (f"target lookahead+lora_drop <= {LOOKAHEAD_OVER_STEPS:.2f} x {steps} all-linear LoRA steps on "
            f"{work.label}: {statistics.median(times['scores']):.2f} s / {statistics.median(times['training']):.2f} s"
            f" = {ratio:.2f} x -> {'PASS' if ratio <= LOOKAHEAD_OVER_STEPS else 'FAIL'}")


# -- command line ------------------------------------------------------------------------------------------------
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="model for the embedded workload (default %(default)s)")
    p.add_argument("--data", default="builtin:arithmetic", help="calibration data for it (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds after the warm-up round (default %(default)s)")
    p.add_argument("--batches", type=int, default=4, help="calibration batches per timed call (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="examples per batch (default %(default)s)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per example at most (default %(default)s)")
    p.add_argument("--draws", type=int, default=8, help="draws of A in the fast arm (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default %(default)s)")
    p.add_argument("--dtype", default="float32", help="dtype of the embedded model (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = one per core (default)")
    p.add_argument("--tiny-hidden", type=int, default=64, help="hidden size of the tiny llama (default %(default)s)")
    p.add_argument("--tiny-layers", type=int, default=4, help="layers of the tiny llama (default %(default)s)")
    p.add_argument("--long-data", default=str(MATH), help="LLM-Adapters JSON whose outputs make the long workload")
    p.add_argument("--long-length", type=int, default=512, help="tokens per packed row (default %(default)s)")
    p.add_argument("--long-batches", type=int, default=4, help="long batches (default %(default)s)")
    p.add_argument("--long-batch-size", type=int, default=4, help="rows per long batch (default %(default)s)")
    p.add_argument("--tiny-only", action="store_true", help="only the tiny model")
    p.add_argument("--skip", nargs="+", default=[], choices=("floor_chunked", "spectrum", "families"),
                   help="timed arms to leave out, to keep a run short")
    p.add_argument("--short-only", action="store_true", help="only the short workload")
    p.add_argument("--long-only", action="store_true", help="only the long workload")
    p.add_argument("--both-allocators", action="store_true",
                   help="also measure memory under glibc's default allocator settings")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child processes")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--quiet", action="store_true", help="no per-call timing lines")
    p.add_argument("--lookahead-steps", type=int, default=0,
                   help="also time lookahead and lora_drop against this many all-linear LoRA steps (0: not)")
    p.add_argument("--arm", choices=MEMORY_ARMS, help=argparse.SUPPRESS)
    p.add_argument("--target", choices=TARGETS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if sum((args.tiny_only, args.short_only, args.long_only)) > 1:
        p.error("--tiny-only, --short-only and --long-only each leave the others out: pass one of them")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda was asked for but no CUDA device is visible")
    if args.threads < 1:
        args.threads = max(1, os.cpu_count() or 1)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    if args.arm:
        bench.report_to_parent(measure_arm(args))
        return 0
    log = bench.make_log(args.quiet)
    targets = ["tiny"] if args.tiny_only else ["short"] if args.short_only else ["long"] if args.long_only \
        else ["short", "long"]
    outcomes: dict[str, Outcome] = {}
    began = time.perf_counter()
    for target in targets:
        work = build(target, args)
        log(f"timing {work.label}: {args.rounds} rounds after a warm-up")
        out = time_rounds(work, args.rounds, args.draws, log, args.skip)
        if args.lookahead_steps:
            print(lookahead_cost(work, args.lookahead_steps, args.rounds, log), flush=True)
        work.model = None  # free it before the memory children load their own copy
        gc.collect()
        if not args.no_memory:
            allocators = ALLOCATORS if work.device.type == "cpu" else {"live": {}}
            if not args.both_allocators:
                allocators = {"live": allocators["live"]}
            for name, allocator in allocators.items():
                for arm in MEMORY_ARMS:
                    res = child_peak(target, arm, args, allocator)
                    (out.peak if name == "live" else out.peak_default)[arm] = res["peak_bytes"]
                    if name == "live":
                        out.peak_method = res["method"] + (" with a 128 KiB mmap threshold" if allocator else "")
                    log(f"  peak memory {arm:<10} {res['peak_bytes'] / MB:9.1f} MiB ({res['method']}, {name})")
        outcomes[work.label] = out

    print()
    for out in outcomes.values():
        print("\n".join(report(out)))
    if len(outcomes) > 1:
        print("\n".join(side_by_side(outcomes)))
    ok = True
    for target, out in zip(targets, outcomes.values()):
        print(f"== targets on {out.work.label}")
        lines, passed = checks(out)
        print("\n".join(lines))
        ok = ok and passed
    print(f"(benchmark took {time.perf_counter() - began:.0f} s)")
    print(" ".join(headline(t, o) for t, o in zip(targets, outcomes.values())), flush=True)
    return 1 if args.strict and not ok else 0


if __name__ == "__main__":
    sys.exit(main())
