"""A training run from start to folder: train on a plan, evaluate on the test split, write the adapter with its
metrics, predictions and plan. The `train` command and every arm of `compare` end the same way, here."""
from __future__ import annotations

from pathlib import Path

from ..families import adapters
from ..outputs import write_csv
from ..plan.plan import Plan
from . import evaluate as ev
from .checkpoints import run_ledger
from .export import refuse_merge, save_merged, write_run
from .trainer import TrainResult, TrainSettings, run_metrics, train


def finish_run(run: TrainResult, plan: Plan, tokenizer, test_set: list, out: str | Path, *, eval_kwargs: dict,
               model_name: str | None, extra: dict | None = None, ledger=None) -> tuple[ev.Evaluation, dict]:
    """Evaluate a trained run on the test split and write its folder: adapter, metrics.json, loss.csv,
    predictions.csv and plan.json, each listed in the run folder's `ledger` (by default the command's)."""
    out = Path(out)
    ledger = ledger if ledger is not None else run_ledger(out)
    result = ev.evaluate(run.model, tokenizer, test_set, **eval_kwargs)
    metrics = run_metrics(run, plan) | {"eval_loss": result.eval_loss, "exact_match": result.exact_match,
                                        "balanced_accuracy": result.balanced_accuracy,
                                        "test_examples": len(test_set)} | (extra or {})
    write_run(run, out, metrics, model_name=model_name, ledger=ledger)
    write_csv(out / "predictions.csv", ev.predictions_frame(test_set, result), ledger=ledger)
    plan.save(out / "plan.json")
    return result, metrics


def summary_lines(run: TrainResult, result: ev.Evaluation, plan: Plan, test_set: list, out, merge: bool) -> list[str]:
    """What `placement train` prints: what trained, how the loss moved, the test score, what it wrote."""
    settings = run.settings
    lines = [
        f"trained    {plan.label}: {len(plan.targets)} site(s), {run.trainable_params:,} parameters, "
        f"{settings.steps} steps at lr {settings.lr:g}, {run.sec_per_step:.2f} s/step, peak {run.peak_mem_mb:.0f} MiB",
        f"loss       {run.losses[0]:.3f} -> {run.losses[-1]:.3f} (train), {result.eval_loss:.3f} held out",
    ]
    if result.exact_match is not None:
        lines.append(f"exact      {100 * result.exact_match:.1f}% of {len(test_set)} test examples")
    else:
        lines.append(f"exact      not scored: {ev.skipped_exact_match(test_set)}; held-out loss only")
    return lines + [f"wrote      {out}/adapter_model.safetensors, adapter_config.json, metrics.json, loss.csv"
                    + (", merged/" if merge else "")]


def train_and_evaluate(model, tokenizer, plan: Plan, train_set: list, test_set: list, settings: TrainSettings, *,
                       out: str | Path, model_name: str | None, max_new_tokens: int = 32, resume: bool = False,
                       merge: bool = False, progress: bool = False, extra: dict | None = None):
    """Train (checkpointing and resuming in `out`), evaluate, write the run folder; `merge` adds OUT/merged.
    Returns (TrainResult, Evaluation, metrics)."""
    if merge and not adapters.mergeable(plan.adapter_config()):
        raise refuse_merge(plan.family)
    ledger = run_ledger(out)
    run = train(model, tokenizer, plan, train_set, settings, out=out, resume=resume, progress=progress, ledger=ledger)
    eval_kwargs = dict(max_length=settings.max_length, max_new_tokens=max_new_tokens, progress=progress)
    result, metrics = finish_run(run, plan, tokenizer, test_set, out, eval_kwargs=eval_kwargs,
                                 model_name=model_name, extra=extra, ledger=ledger)
    if merge:
        save_merged(run.model, tokenizer, Path(out) / "merged", ledger=ledger)
    return run, result, metrics
