"""Peak memory of the probe against the plain backward (the floor) and the naive probe, at two sequence lengths and
two batch sizes, on the embedded model, and with `--gemma` on Gemma 3 270M's long workload (a 262k vocabulary, where
the LM head dominates); then a paper estimate for 7B and 70B models on 80 GB GPUs.

Each (model, length, batch size, arm) is one fresh child process of `probe_cost.py` (the same arms: floor,
floor_chunked, exact, exact_ckpt, fast, naive) on one packed batch of the long workload (math_data.json outputs cut
into rows of exactly `length` tokens), with the live-tensor measurement (mmap threshold fixed at 128 KiB). The
figure is the peak above the loaded model: what the arm itself needs. The floor is the plain backward as users run
it, every labelled position's logits at once; the chunked floor is the same backward through the shared token loss,
which applies the LM head a block of target tokens at a time, so a probe's peak over it is what the probe itself
adds.

The estimate scales what was measured: the floor's activation bytes per token, per layer and per unit of hidden
size, and each mode's bytes over the floor in the same unit, from the largest configuration measured, to the
shapes of Llama-2-7B and -70B in bfloat16 (half the float32 bytes measured here). Weights are 2 bytes a parameter,
sharded by FSDP2 over the GPUs of one run; activations stay per GPU (each GPU runs its own share of the batches).
A GPU holds 80 GB, of which 10% is left to the allocator and the CUDA context.

    python benchmarks/probe_memory.py               # 4 configurations x 5 arms, a few minutes on 2 cores
    python benchmarks/probe_memory.py --lengths 128 --batch-sizes 2
    python benchmarks/probe_memory.py --lengths 512 --batch-sizes 8 --gemma 512 2   # and Gemma 3 270M, 512 x 2
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_common as bench  # noqa: E402
import probe_cost  # noqa: E402

ARMS = ("floor", "floor_chunked", "exact", "exact_ckpt", "fast", "naive")
TARGETS = {"exact": 0.90, "exact_ckpt": 0.45, "fast": 0.90}  # peak over the floor, at every workload
LIVE = probe_cost.ALLOCATORS["live"]
MB, GB = bench.MB, 1e9

# name: (parameters, hidden, layers, largest site d_in x d_out) of the public configs
BIG = {"Llama-2-7B": (6.74e9, 4096, 32, 11008 * 4096), "Llama-2-70B": (68.98e9, 8192, 80, 28672 * 8192)}
EMBEDDED = (576, 30)  # SmolLM2-135M: hidden, layers
GPU_BYTES = 80 * GB * 0.9


def workloads(args) -> list[tuple[str, int, int]]:
    out = [] if args.gemma_only else [(args.model, length, batch_size) for length in args.lengths
                                      for batch_size in args.batch_sizes]
    if args.gemma:
        out.append(("gemma3-270m", args.gemma[0], args.gemma[1]))
    return out


def measure(args) -> dict:
    """(model, length, batch size) -> arm -> peak bytes above the loaded model."""
    peaks = {}
    for model, length, batch_size in workloads(args):
        child = probe_cost.parse(["--long-length", str(length), "--long-batch-size", str(batch_size),
                                  "--long-batches", "1", "--threads", str(args.threads), "--model", model,
                                  "--long-data", args.long_data])
        for arm in args.arms:
            res = probe_cost.child_peak("long", arm, child, LIVE)
            peaks.setdefault((model, length, batch_size), {})[arm] = res["peak_bytes"]
            print(f"  {model} {length:>4} tokens x {batch_size}: {arm:<13} {res['peak_bytes'] / MB:9.1f} MiB",
                  flush=True)
        for arm in ARMS:  # an arm left out shows as nan
            peaks[(model, length, batch_size)].setdefault(arm, float("nan"))
    return peaks


def table(peaks: dict) -> list[str]:
    lines = ["== peak memory above the loaded model, MiB (ratio to the floor; to the chunked floor)",
             f"   {'model, tokens x batch':<28}" + "".join(f"{arm:>25}" for arm in ARMS)]
    for (model, length, batch_size), row in peaks.items():
        cells = "".join(f"{row[arm] / MB:10.1f} ({row[arm] / row['floor']:4.2f}; "
                        f"{row[arm] / row['floor_chunked']:4.2f})" for arm in ARMS)
        lines.append(f"   {f'{model}, {length} x {batch_size}':<28}{cells}")
    for arm, bound in TARGETS.items():
        worst = max(row[arm] / row["floor"] for row in peaks.values())
        lines.append(f"target {arm} peak <= {bound:.2f} x floor peak at every workload: worst {worst:.2f} x -> "
                     f"{'PASS' if worst <= bound else 'FAIL'}")
    return lines


def estimate(peaks: dict) -> list[str]:
    """Bytes per token x layer x hidden from the largest configuration, scaled to the big models in bfloat16."""
    embedded = {key: row for key, row in peaks.items() if key[0] == "smollm2-135m"}
    if not embedded:
        return []
    (_, length, batch_size), row = max(embedded.items(), key=lambda item: item[0][1] * item[0][2])
    hidden, layers = EMBEDDED
    unit = length * batch_size * layers * hidden  # token x layer x hidden units in the measured batch
    per_unit = {arm: row[arm] / unit / 2 for arm in ARMS}  # bfloat16: half the float32 bytes
    tokens = 4 * 512  # per GPU: a batch of 4 rows of 512 tokens
    lines = [f"== estimate for bfloat16 weights, {tokens} tokens per GPU (4 x 512), 80 GB GPUs (72 GB usable); "
             f"activations scaled from {length} x {batch_size} on the embedded model",
             f"   {'model':<12}{'mode':<12}{'weights GB':>11}{'activ. GB/GPU':>14}{'GPUs (FSDP2)':>14}"]
    for name, (params, big_hidden, big_layers, largest) in BIG.items():
        weights = 2 * params
        for arm in ARMS:
            activations = per_unit["floor" if arm == "naive" else arm] * tokens * big_layers * big_hidden
            if arm == "naive":  # a bfloat16 gradient the size of every site's weight (all but the embeddings)
                activations += 2 * params * 0.96
            if arm.startswith("exact"):  # G of the largest site, formed once per site in float32
                activations += 4 * largest
            gpus = next((n for n in (1, 2, 4, 8, 16, 32, 64) if weights / n + activations <= GPU_BYTES), math.inf)
            lines.append(f"   {name:<12}{arm:<12}{weights / GB:11.1f}{activations / GB:14.1f}{gpus:>14}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 512])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[2, 8])
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--gemma", type=int, nargs=2, metavar=("LENGTH", "BATCH"),
                   help="also Gemma 3 270M's long workload at LENGTH tokens x BATCH rows")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to measure (default all)")
    p.add_argument("--gemma-only", action="store_true", help="only Gemma 3 270M's workload (with --gemma)")
    p.add_argument("--long-data", default=str(probe_cost.MATH), help="LLM-Adapters JSON whose outputs are packed")
    args = p.parse_args(argv)
    args.threads = args.threads or 2
    began = time.perf_counter()
    peaks = measure(args)
    print()
    print("\n".join(table(peaks)))
    print("\n".join(estimate(peaks)))
    worst = max(row["exact"] / row["floor"] for row in peaks.values())
    ckpt = max(row["exact_ckpt"] / row["floor"] for row in peaks.values())
    print(f"(benchmark took {time.perf_counter() - began:.0f} s)")
    print(f"exact_peak/floor_peak<={worst:.2f} exact_ckpt_peak/floor_peak<={ckpt:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
