"""Timing and peak-memory machinery shared by the benchmark scripts in this folder.

Each script compares a few arms (ways of doing the same work) on one workload. Wall times come from interleaved
rounds in one process, so that drift in the machine's speed (other load, thermal limits) falls on every arm alike;
an arm's figure is the median over rounds. Peak memory comes from a fresh child process per arm (the script itself,
started with `--arm`), because a process that has already run other arms keeps their allocator state and caches and
would blur one arm's peak with the others'.

Importing this module also puts the repository root and `tests/` on sys.path, so that the scripts use the
`placement` package of this checkout (not an installed copy) and the tiny models in `tests/tiny.py`; a script must
therefore import it before anything from `placement`.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
# Ahead of site-packages, so this checkout wins over an installed `placement`.
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
# Tokenizers warn (and may deadlock) when a process that used their thread pool forks; nothing here needs the pool.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

MB = 1024 * 1024
# Prefix of the one stdout line through which a memory child hands its result back; everything else the child
# prints (library warnings, progress) is ignored.
RESULT_TAG = "BENCH_ARM_RESULT "


def make_log(quiet: bool):
    """Progress printer: flushed at once so a long run shows where it is, silent under --quiet."""

    def log(text: str) -> None:
        if not quiet:
            print(text, flush=True)

    return log


# -- the loss as users compute it -----------------------------------------------------------------------------------
def full_logits_loss(model, batch) -> torch.Tensor:
    """Mean cross-entropy over the target tokens with every labelled position's logits formed at once: the token
    loss before the LM head was applied a block at a time, and what a plain backward holds (the logits, their
    softmax and its gradient, each tokens x vocabulary). The floor that memory targets are stated against."""
    import torch.nn.functional as F

    targets = batch.labels[:, 1:]
    keep = targets != -100
    hidden = model.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                 use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return F.cross_entropy(logits.float(), targets[keep], reduction="sum") / keep.sum()


# -- timing --------------------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    """Wait for the device's queued kernels; without it a CUDA timing measures only the launch of the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, run):
    """`(run(), seconds)`, timed between device syncs after a garbage collection, so that neither work queued
    before the call nor the collection of an earlier arm's garbage lands in this call's figure."""
    gc.collect()
    sync(device)
    start = time.perf_counter()
    result = run()
    sync(device)
    return result, time.perf_counter() - start


class StepClock:
    """Stamps the end of each step of a loop; a step's time is the gap between two stamps, so whatever runs
    before the first step (set-up, the first step's own one-time costs) is not counted."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stamps: list[float] = []

    def tick(self, *_ignored) -> None:  # also usable directly as a per-step callback
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def interleaved(arms, rounds: int, warm_up: bool = False):
    """`(round_index, arm)` in the order the arms are run: every arm once per round, round after round, so that a
    slow stretch of the machine costs every arm about the same. With `warm_up`, round 0 comes first; it is meant to
    be run and not counted."""
    for round_index in range(0 if warm_up else 1, rounds + 1):
        for arm in arms:
            yield round_index, arm


def round_label(round_index: int) -> str:
    return f"round {round_index}" if round_index else "warm-up"


class RoundTimes:
    """Medians and ratios over `self.seconds` (arm -> one figure per counted round), mixed into a script's outcome
    record. Medians, not means: one round disturbed by other work on the machine should not move the figure."""

    seconds: dict

    def median(self, arm: str) -> float:
        return statistics.median(self.seconds[arm])

    def ratio(self, a: str, b: str) -> float:
        return self.median(a) / self.median(b)

    def ratios(self, spec) -> list[tuple[str, float]]:
        """`(name, median(a) / median(b))` for each `(name, a, b)` of `spec`, ready for `figures`."""
        return [(name, self.ratio(a, b)) for name, a, b in spec]


def figures(pairs) -> str:
    """`name=1.23 name=4.56 ...`: the form of the scripts' ratio lines and of their last line, which other tools
    read. Two decimals throughout; a figure that could not be measured is nan and prints as `nan`."""
    return " ".join(f"{name}={value:.2f}" for name, value in pairs)


# -- peak memory -----------------------------------------------------------------------------------------------------
def status_kb(field_name: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where there is no such file (not Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_hwm() -> bool:
    """Reset VmHWM to the current VmRSS (Linux: write 5 to clear_refs) and say whether the reset took.

    Some kernels and containers accept the write without resetting anything, hence the check against VmRSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = status_kb("VmHWM"), status_kb("VmRSS")
    return hwm is not None and rss is not None and hwm <= rss + 512


class RssSampler:
    """VmRSS every `interval` seconds on a background thread (torch ops release the GIL, so it runs during them).

    The fallback where VmHWM cannot be reset, and a cross-check where it can: the kernel folds per-thread RSS
    counters into VmHWM with a small lag, so a short peak can show here first."""

    def __init__(self, interval: float = 0.005):
        self.interval, self.peak_kb = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self):
        while not self._stop.is_set():
            self.peak_kb = max(self.peak_kb, status_kb("VmRSS") or 0)
            time.sleep(self.interval)

    def __enter__(self):
        self.peak_kb = status_kb("VmRSS") or 0
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, status_kb("VmRSS") or 0)


def trim_heap() -> None:
    """Hand freed heap back to the OS (glibc's malloc_trim), so that memory kept from earlier work cannot absorb
    part of the next allocations and hide them from the resident set. A no-op without glibc."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_above_here(device: torch.device, run) -> dict:
    """Run `run()` once and return its peak memory above the memory in use at the call, in bytes, with how it was
    taken: on CUDA the allocator's peak (`max_memory_allocated`); on the CPU the resident set's high-water mark
    (VmHWM after a reset, or the 5 ms sampler where the reset does not take), whichever is higher.

    Freed heap is trimmed first, so the baseline is the memory actually held. Meant for a fresh child process
    whose arm has already run once on a little data, so lazy imports and one-time set-up are not counted."""
    gc.collect()
    trim_heap()
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        sync(device)
        return {"peak_bytes": torch.cuda.max_memory_allocated(device) - base, "method": "cuda_max_allocated"}
    base_kb = status_kb("VmRSS") or 0
    hwm_ok = reset_hwm()
    with RssSampler() as sampler:
        run()
    hwm_kb = status_kb("VmHWM") if hwm_ok else None
    peak_kb = max(hwm_kb or 0, sampler.peak_kb)
    return {
        "peak_bytes": (peak_kb - base_kb) * 1024,
        "method": "VmHWM" if hwm_kb is not None else "VmRSS sampled every 5 ms",
        "sampled_bytes": (sampler.peak_kb - base_kb) * 1024, "base_bytes": base_kb * 1024,
    }


# -- child processes -------------------------------------------------------------------------------------------------
def forward_options(args, names, flags=()) -> list[str]:
    """This run's values of the argparse options `names` (dests, e.g. "batch_size") and the set store_true `flags`,
    as command-line words, so that a child process builds the same workload as its parent."""
    words = []
    for name in names:
        words += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    return words + ["--" + flag.replace("_", "-") for flag in flags if getattr(args, flag)]


def report_to_parent(result: dict) -> None:
    """In a child: hand the result to `run_child` in the parent (one tagged JSON line on stdout)."""
    print(RESULT_TAG + json.dumps(result), flush=True)


def run_child(script: str | Path, argv: list[str], what: str, env: dict | None = None) -> dict:
    """Run `script argv` in a fresh Python (this interpreter, from the repository root, with `env` added to this
    process's environment) and return the dict it reported with `report_to_parent`.

    `env` is how a caller fixes the child's allocator (MALLOC_* variables must be set before the process starts);
    without it the child runs with the allocator settings this process was started with."""
    done = subprocess.run([sys.executable, str(Path(script).resolve())] + argv, capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, **(env or {})})
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
    raise RuntimeError(f"memory child for {what} failed (exit {done.returncode}): " + " | ".join(tail))
