"""Profile a model end to end: data -> probe -> ranking -> plan, and write the profile folder.

This is the composition the CLI, the demo and the notebook share; each step stays in its own module.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from .. import data as data_mod
from ..data.examples import load_examples  # noqa: F401  (documented here: placement.profile.load_examples)
from ..distributed import rank_and_world
from ..errors import PlacementError
from ..families import family_names, get_family
from ..model.load import ModelSource
from ..model.shard import mean_loss, shard
from ..model.sites import Site, find_sites, fingerprint, num_layers
from ..outputs import atomic_path, write_csv
from ..plan.plan import Plan
from ..plan.ranking import agreement_table, concentration, heatmap_tables, rank, stability
from ..plan.strategies import Strategy, allocate_strategy
from ..probe import ProbeResult, ProbeSettings, probe
from ..probe.families import IDENTITY_FAMILIES, FamilyScoring, family_scores
from ..probe.prompts import prompt_scores
from ..probe.registry import ScoreContext, compute_scores, profile_names, ranking_names, score_names
from ..report.figures import convergence_plot, heatmap

SPECTRUM_K = 64  # the spectrum's length when a score or strategy needs it: ranks 1..64 for allocate


def csv_columns() -> list[str]:
    """scores.csv's columns, those present kept: the site, page and the ranking, then every other registered score
    in registration order."""
    return ["site", "layer", "role", "d_in", "d_out", "page", "share", "rank", "rank_lo", "rank_hi", "p_top",
            "score"] + [name for name in score_names() if name != "page"]


@dataclass
class Profile:
    result: ProbeResult
    ranked: pd.DataFrame  # one row per site, by rank
    plan: Plan
    score: str
    convergence: pd.DataFrame | None = None  # the ranking batch by batch
    families: pd.DataFrame | None = None  # other families' scores (family_scores.csv), when asked for

    def summary(self) -> dict:
        top = self.ranked.iloc[0]
        conc = self.plan.concentration
        return {
            "dominant_site": top.site, "layer": int(top.layer), "role": top.role, "share": float(top.share),
            "top1_top2_ratio": conc["top1_top2_ratio"], "effective_sites": conc["effective_sites"],
            "gini": conc["gini"], "score": self.score, "mode": self.result.settings.mode,
            "batches": self.result.batches, "tokens": self.result.tokens, "seconds": round(self.result.seconds, 2),
            "sites": len(self.ranked),
        } | ({"p_top": self.plan.stability["p_top"],
              "top_stable_after_batches": self.plan.stability["top_stable_after_batches"]}
             if self.plan.stability else {})


def model_block(model, source: ModelSource, sites: list[Site]) -> dict:
    config = model.config
    architectures = getattr(config, "architectures", None) or [type(model).__name__]
    return {
        "name": source.name, "revision": source.revision, "note": source.note,
        "architecture": architectures[0], "model_type": getattr(config, "model_type", None),
        "num_layers": num_layers(model), "num_sites": len(sites), "fingerprint": fingerprint(sites),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }


def calibration_batches(tokenizer, spec: str, *, batches: int, batch_size: int, max_length: int, seed: int,
                        examples: list | None = None):
    if examples is None:
        examples = load_examples(spec, seed)
    return data_mod.make_batches(tokenizer, examples, batch_size=batch_size, batches=batches,
                                 max_length=max_length, seed=seed)


def checked_settings(settings: ProbeSettings | None, score: str, strategy: Strategy | None,
                     bootstrap: int) -> tuple[ProbeSettings, Strategy]:
    """The probe settings and strategy, completed (the spectrum when a score or strategy needs it) and checked:
    settings that cannot work fail before the probe spends its minutes."""
    settings = settings or ProbeSettings()
    if score not in ranking_names():
        raise PlacementError(f"--score {score} is not a score to rank sites by: choose one of "
                             f"{', '.join(ranking_names())}")
    if (score == "page_opt" or (strategy is not None and strategy.name == "allocate")) and not settings.spectrum_k:
        settings = replace(settings, spectrum_k=SPECTRUM_K)  # what was asked for needs the spectrum
    settings.check()
    strategy = strategy or Strategy()
    strategy.check()
    if score in ("grad_energy", "page_opt") and settings.mode == "fast":
        raise PlacementError(f"--score {score} needs the exact probe (the fast one forms no gradient): drop --fast")
    if score == "page_opt" and settings.spectrum < settings.r:
        raise PlacementError(f"--score page_opt needs the top {settings.r} singular values: pass --spectrum-k of at "
                             f"least --r ({settings.r})")
    if bootstrap < 0:
        raise PlacementError(f"--bootstrap {bootstrap} is negative: pass 0 (no intervals) or a number of resamples")
    return settings, strategy


def run_profile(model, tokenizer, source: ModelSource, data: str, *, batches: int = 8, batch_size: int = 8,
                max_length: int = 256, settings: ProbeSettings | None = None, score: str = "page",
                strategy: Strategy | None = None, progress: bool = False, examples: list | None = None,
                bootstrap: int = 200, fsdp: bool = False, families: tuple[str, ...] = ("lora",)) -> Profile:
    """`examples` skips loading `data` again when the caller has already read it (the CLI does, to fail fast).
    `bootstrap` resamples the calibration batches that many times for rank intervals (0: none); the intervals and
    the convergence curve are those of the `page` ranking, the score every batch records."""
    settings, strategy = checked_settings(settings, score, strategy, bootstrap)  # fail before the data loads
    calib = calibration_batches(tokenizer, data, batches=batches, batch_size=batch_size,
                                max_length=max_length, seed=settings.seed, examples=examples)
    return profile_batches(model, source, calib, data=data, batch_size=batch_size, max_length=max_length,
                           settings=settings, score=score, strategy=strategy, progress=progress, bootstrap=bootstrap,
                           fsdp=fsdp, families=families)


def profile_batches(model, source: ModelSource, calib: list, *, data: str, batch_size: int, max_length: int,
                    settings: ProbeSettings, score: str = "page", strategy: Strategy | None = None,
                    progress: bool = False, bootstrap: int = 200, fsdp: bool = False,
                    families: tuple[str, ...] = ("lora",)) -> Profile:
    """Probe ready calibration batches, rank the sites and make the plan (`data` names them in the plan); `fsdp`
    shards the model over the launcher's ranks first (FSDP2). Other identity `families` are scored in the same
    forward and backward passes (in a pass of their own under checkpointing or FSDP2)."""
    settings, strategy = checked_settings(settings, score, strategy, bootstrap)
    sites = find_sites(model)
    block = model_block(model, source, sites)  # before sharding: the weights' dtype and shapes as loaded
    world = rank_and_world()[1]
    if fsdp and len(calib) % world:  # FSDP2 gathers weights in every pass: each rank must run as many passes
        raise PlacementError(f"--batches {len(calib)} does not split evenly over {world} ranks under --fsdp, "
                             f"where every rank runs the same passes: pass a multiple of {world}")
    prompts = [f for f in families if get_family(f).virtual]  # they change the forward: a pass each
    others = [f for f in families if f != "lora" and f not in prompts]
    if (others or prompts) and fsdp:
        raise PlacementError("--families beyond lora are not scored under --fsdp: profile them without it")
    shared = others and not (fsdp or settings.checkpointing)  # one pass for every identity family
    scoring = FamilyScoring(model, others, seed=settings.seed) if shared else contextlib.nullcontext()
    loss = mean_loss(shard(model)) if fsdp else None
    with scoring:
        result = probe(model, sites, calib, settings, progress=progress, loss=loss)
    result.scores = with_registered(result.scores, ScoreContext(model, sites, calib, settings, progress, loss), score)
    other_scores = scoring.frame(len(calib)) if shared else \
        family_scores(model, calib, others, seed=settings.seed) if others else None
    ranked = rank(result.scores, score)
    curve, stable = None, {}
    if bootstrap > 0:
        sites_in_order = list(result.scores["site"])
        intervals, curve, stable = stability(result.batch_page, sites_in_order, n=bootstrap, seed=settings.seed)
        ranked = ranked.merge(intervals, on="site", how="left")
    probe_block = probe_record(result, score, data, batch_size, max_length)
    site_rows = plan_rows(ranked)
    if strategy.name == "allocate":
        spectrum = None if result.spectrum is None else dict(zip(result.scores["site"], result.spectrum))
        strategy = allocate_strategy(strategy.max_params, spectrum, site_rows)
    plan = Plan.build(model=block, probe=probe_block, sites=site_rows,
                      strategy=strategy, peft=settings.lora_kwargs(), concentration=concentration(ranked),
                      stability=stable)
    if prompts:
        virtual = prompt_scores(model, calib, prompts, max_length=max_length, checkpointing=settings.checkpointing,
                                seed=settings.seed)
        other_scores = virtual if other_scores is None else pd.concat([other_scores, virtual], ignore_index=True)
    frame = family_frame(families, ranked, other_scores, settings.r) if other_scores is not None else None
    return Profile(result, ranked, plan, score, curve, frame)


def probe_record(result: ProbeResult, score: str, data: str, batch_size: int, max_length: int) -> dict:
    """The plan's `probe` block: what was measured, on what, and how long it took."""
    settings = result.settings
    return {
        "score": score, "mode": settings.mode, "draws": settings.num_draws, "r": settings.r, "alpha": settings.alpha,
        "seed": settings.seed, "batches": result.batches, "batch_size": batch_size, "max_length": max_length,
        "tokens": result.tokens, "data": data, "seconds": round(result.seconds, 2), "lora": settings.lora_kwargs(),
        "spectrum_k": settings.spectrum,
    }


def plan_rows(ranked: pd.DataFrame) -> list[dict]:
    """The plan's site rows: each site's place in the ranking, as plain Python values."""
    columns = [c for c in ("site", "layer", "role", "d_in", "d_out", "score", "share", "rank", "rank_lo", "rank_hi",
                           "p_top") if c in ranked.columns]
    return [{k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
            for row in ranked[columns].to_dict("records")]


def with_registered(frame: pd.DataFrame, ctx: ScoreContext, ranking: str) -> pd.DataFrame:
    """The probe's table joined with the registered scores the profile computes beside the probe (every energy,
    and the ranking score), each from its own `compute`."""
    names = profile_names(ranking)
    return frame.merge(compute_scores(ctx, names), on="site", how="left") if names else frame


def summary_lines(summary: dict, profile: Profile, out) -> list[str]:
    """What `placement profile` prints: the dominant site, how concentrated and stable the score is, the cost."""
    ratio, plan = summary["top1_top2_ratio"], profile.plan
    lines = [
        f"dominant site   {summary['dominant_site']}  (layer {summary['layer']}, role {summary['role']})",
        f"its share       {100 * summary['share']:.1f}% of {profile.score} over {summary['sites']} sites",
        f"top-1 / top-2   {ratio:.2f}x" if math.isfinite(ratio) else "top-1 / top-2   (one site scores)",
        f"effective sites {summary['effective_sites']:.1f}   gini {summary['gini']:.2f}",
    ]
    if "p_top" in summary:
        lines.append(f"stability       top in {100 * summary['p_top']:.0f}% of {plan.stability['bootstrap']} bootstrap "
                     f"resamples; top site fixed from batch {summary['top_stable_after_batches']} of "
                     f"{summary['batches']}")
    overflowed = profile.result.scores.get("nonfinite_batches")
    if overflowed is not None and overflowed.any():
        lines.append(f"warning         {int((overflowed > 0).sum())} site(s) had a non-finite gradient in "
                     f"{summary.get('dtype', 'half precision')} on some batches (scores.csv column "
                     "nonfinite_batches): their scores average the finite batches; try --dtype float32")
    return lines + [
        f"probe           {summary['batches']} batches, {summary['tokens']} target tokens, {summary['seconds']:.1f} s "
        f"({profile.result.settings.mode})",
        f"plan            {plan.label}: {', '.join(plan.targets[:4])}" + (" ..." if len(plan.targets) > 4 else ""),
        f"wrote           {out}/scores.csv, plan.json, heatmap.png",
    ]


def write_profile(profile: Profile, out: str | Path, title: str = "") -> list[Path]:
    """scores.csv, plan.json, heatmap.png (and its log-scale twin), and the per-batch scores, each atomically."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    columns = [c for c in csv_columns() if c in profile.ranked.columns]
    if "nonfinite_batches" in profile.ranked.columns and profile.ranked["nonfinite_batches"].any():
        columns.append("nonfinite_batches")  # half precision overflowed at some sites: say where
    write_csv(out / "scores.csv", profile.ranked[columns])
    profile.plan.save(out / "plan.json")
    tables = heatmap_tables(profile.ranked)
    heatmap(**tables, path=out / "heatmap.png", title=title)
    heatmap(**tables, path=out / "heatmap_log.png", title=title, log=True)
    written = [out / "score_agreement.csv"]
    by_score = {name: profile.ranked.set_index("site")[name] for name in ranking_names()
                if name in profile.ranked.columns}
    write_csv(out / "score_agreement.csv", agreement_table(by_score))
    if profile.families is not None:
        write_families(profile.families, out, title=title)
    if profile.convergence is not None:
        write_csv(out / "convergence.csv", profile.convergence)
        convergence_plot(profile.convergence, profile.plan.stability, out / "convergence.png", title=title)
        written = [out / "convergence.csv", out / "convergence.png"]
    # Per-batch page values in model site order, for bootstrap and convergence without re-probing.
    with atomic_path(out / "batch_scores.safetensors") as tmp:
        save_file({"page": torch.from_numpy(np.ascontiguousarray(profile.result.batch_page))}, str(tmp),
                  metadata={"sites": ",".join(profile.result.scores["site"])})
    if profile.result.spectrum is not None:
        # mean over batches of sigma_i(G_b)^2 per site, in model site order: what rank allocation reads
        with atomic_path(out / "spectrum.safetensors") as tmp:
            save_file({"sigma2": torch.from_numpy(np.ascontiguousarray(profile.result.spectrum))}, str(tmp),
                      metadata={"sites": ",".join(profile.result.scores["site"])})
        written.append(out / "spectrum.safetensors")
    return [out / name for name in ("scores.csv", "plan.json", "heatmap.png", "heatmap_log.png",
                                    "batch_scores.safetensors")] + written


def family_frame(families, lora: pd.DataFrame, others: pd.DataFrame, r: int) -> pd.DataFrame:
    """Every asked family's scores per site, ranked within its family (scores of different families are not on one
    scale): LoRA's rows from the profile's ranking, the others' from their probe."""
    parts = [others]
    if "lora" in families:
        rows = lora[["site", "layer", "role", "d_in", "d_out", "page"]].assign(family="lora")
        parts.insert(0, rows.assign(params=[r * (i + o) for i, o in zip(rows["d_in"], rows["d_out"])]))
    frames = [rank(rows.drop(columns=["family"]), "page").assign(family=family)
              for part in parts for family, rows in part.groupby("family", sort=False)]
    columns = ["family", "site", "layer", "role", "d_in", "d_out", "params", "page", "share", "rank"]
    return pd.concat(frames, ignore_index=True)[columns]


def write_families(frame: pd.DataFrame, out: str | Path, title: str = "") -> None:
    """family_scores.csv, a heatmap per family (heatmap_FAMILY.png) and families.png, the family-by-layer summary."""
    from ..report.figures import family_layers

    out = Path(out)
    write_csv(out / "family_scores.csv", frame)
    for family, rows in frame.groupby("family", sort=False):
        if family != "lora" and not get_family(family).virtual:  # LoRA's is heatmap.png; prompts have no modules
            heatmap(**heatmap_tables(rows), path=out / f"heatmap_{family}.png",
                    title=f"{title}: {family}" if title else family)
    family_layers(frame, out / "families.png", title=title)


def parse_families(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    known = family_names()  # read now: a family registered after import is a choice too
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise PlacementError(f"unknown adapter family '{unknown[0] if unknown else spec}': choose from "
                             f"{', '.join(known)}")
    return names
