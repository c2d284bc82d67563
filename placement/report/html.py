"""One self-contained `report.html` for a run folder: the answer first, then the evidence.

A run folder is what `profile`, `compare` or `stability` wrote. Images are embedded as data URIs so the file can be
mailed or attached as it is; every string that comes from a model, a file or a data set passes through
`html.escape` (tables through pandas' escaping), so a site or prompt can never inject markup.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

import pandas as pd

from ..errors import PlacementError
from ..families.lora import lora_params
from ..ledger import RUN_FILE, add_to_run, command_line, listed_files, open_ledger, read_run, versions
from ..outputs import read_table, write_json, write_text
from ..runlock import refuse_if_held
from ..plan.plan import Plan
from ..probe.registry import ranking_names
from ..study.compare import formatted_table, notes
STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1760px;color:#222;
     padding:0 1rem;line-height:1.45}
h1{font-size:1.5rem;margin-bottom:.2rem} h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd}
.answer{background:#f4f8fb;border-left:4px solid #00a0ff;padding:.8rem 1rem;font-size:1.05rem;max-width:1100px}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0} th,td{border:1px solid #ddd;padding:.25rem .5rem;
     text-align:right} th{background:#f6f6f6} td:first-child,th:first-child{text-align:left}
img{display:block;margin:.5rem 0;max-width:100%;height:auto;cursor:zoom-in} img.full{max-width:none;cursor:zoom-out} code,pre{background:#f6f6f6;padding:.1rem .3rem;font-size:.85rem}
pre{padding:.6rem;overflow-x:auto;white-space:pre-wrap} .muted{color:#666;font-size:.85rem}
"""


def record_run(out: str | Path, argv: list[str] | None = None) -> None:
    """A run record for a folder written from Python (the CLI's run folders keep their own): the command, the
    library versions and every file in the folder, for its report."""
    out = Path(out)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != RUN_FILE)
    write_json(out / RUN_FILE, {"tool": "placement", "status": "done", "command": command_line(argv),
                                "versions": versions(), "files": files})


class _Files:
    """The files of a run folder the report may show: those its run.json lists (a folder without a list, from an
    older version or written from Python, shows what exists). Files other commands left there are ignored."""

    def __init__(self, run: Path):
        self.run = run
        self.listed = listed_files(run)

    def has(self, path: Path) -> bool:
        if not path.is_file():
            return False
        if self.listed is None:
            return True
        try:
            return path.resolve().relative_to(self.run.resolve()).as_posix() in self.listed
        except ValueError:
            return False

    def csv(self, path: Path, required: set[str] = frozenset(), rerun: str = "rerun the command that wrote it"
            ) -> pd.DataFrame | None:
        return read_table(path, rerun, required) if self.has(path) else None


def _image(files: _Files, path: Path, alt: str) -> str:
    if not files.has(path):
        return ""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    # Fits the page; a click shows it at full size and another fits it again.
    return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" title="click to zoom" '
            'onclick="this.classList.toggle(\'full\')">')


def _table(frame: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    return frame.to_html(index=False, escape=True, border=0, float_format=floatfmt.format, na_rep="")


def _profile_dir(run: Path, files: _Files) -> Path | None:
    for candidate in (run, run / "profile"):
        if files.has(candidate / "plan.json") and files.has(candidate / "scores.csv"):
            return candidate
    return None


def _answer(plan: Plan, scores: pd.DataFrame, comparison: pd.DataFrame | None) -> str:
    top = scores.sort_values("rank").iloc[0]
    all_linear = plan.all_linear_params()
    one = lora_params({"d_in": int(top.d_in), "d_out": int(top.d_out)}, int(plan.peft["r"]))
    stability = plan.stability
    sure = (f"It stays on top in {100 * stability['p_top']:.0f}% of {stability['bootstrap']} bootstrap resamples "
            f"of the calibration batches (rank interval {stability['top_rank_interval'][0]}-"
            f"{stability['top_rank_interval'][1]}), and is fixed from batch {stability['top_stable_after_batches']} of "
            f"{stability['batches']}." if stability.get("p_top") is not None else "No bootstrap was run.")
    conc = plan.concentration
    text = (f"Dominant site: <b>{html.escape(str(top.site))}</b> (layer {int(top.layer)}, role "
            f"{html.escape(str(top.role))}), {100 * top.share:.1f}% of {html.escape(str(plan.probe.get('score')))} "
            f"over {len(scores)} sites; top-1/top-2 {conc.get('top1_top2_ratio', float('nan')):.2f}x, "
            f"{conc.get('effective_sites', float('nan')):.1f} effective sites. {sure} "
            f"A rank-{plan.peft['r']} LoRA there trains {one:,} parameters, {100 * one / all_linear:.2f}% of "
            f"LoRA on every linear layer ({all_linear:,}).")
    if comparison is not None and len(comparison):
        rows = comparison.set_index("arm")
        metric = "exact_match" if rows["exact_match"].notna().any() else "eval_loss"
        if "dominant" in rows.index and "all-linear" in rows.index:
            d, a = rows.loc["dominant", metric], rows.loc["all-linear", metric]
            shown = (lambda v: f"{100 * v:.1f}%") if metric == "exact_match" else (lambda v: f"{v:.3f}")
            untrained = (f", the untrained model {shown(rows.loc['base', metric])}"
                         if "base" in rows.index and pd.notna(rows.loc["base", metric]) else "")
            text += (f" Trained: dominant {shown(d)} against all-linear {shown(a)}{untrained} "
                     f"({'exact match' if metric == 'exact_match' else 'held-out loss'}).")
    return f'<p class="answer">{text}</p>'


def _validation(files: _Files, run: Path):
    """The validate study's result, when the folder holds one."""
    from ..study.validate import Validation

    sites, scores = files.csv(run / "validation.csv"), files.csv(run / "validation_scores.csv")
    if sites is None or scores is None:
        return None
    return Validation(sites, scores, base_val_loss=float("nan"))  # the verdict needs only the two tables


def _profile_section(files, profile: Path, comparison) -> tuple[str, list[str]]:
    """The report's title and its profile part: the answer, the heatmaps, the margins and the top sites."""
    plan = Plan.load(profile / "plan.json")
    scores = files.csv(profile / "scores.csv", {"site", "layer", "role", "d_in", "d_out", "share", "rank"},
                       "rerun placement profile")
    model = plan.model
    parts = [_answer(plan, scores, comparison), "<h2>Where the score sits: layers x roles</h2>",
             _image(files, profile / "heatmap.png", "share of the score per layer and role"),
             _image(files, profile / "heatmap_log.png", "the same on a log colour scale")]
    margins = scores.groupby("role")["share"].sum().sort_values(ascending=False).rename("share").reset_index()
    parts.append("<h2>Role margins</h2>" + _table(margins))
    columns = [c for c in ("rank", "site", "layer", "role", "share", "rank_lo", "rank_hi", "p_top",
                           *ranking_names()) if c in scores.columns and scores[c].notna().any()]
    parts.append("<h2>Top 20 sites, with bootstrap rank intervals</h2>" + _table(scores[columns].head(20)))
    if files.has(profile / "convergence.png"):
        parts.append("<h2>How many calibration batches</h2>" + _image(files, profile / "convergence.png", "convergence"))
    agreement = files.csv(profile / "score_agreement.csv")
    if agreement is not None:
        parts.append("<h2>Does the choice of score matter</h2>" + _table(agreement, "{:.3f}"))
    parts.append(f'<p class="muted">model: {html.escape(json.dumps(model))}</p>')
    return f"{model.get('name')} on {plan.probe.get('data')}", parts


def _recommendation(files, run: Path) -> str | None:
    """The recommend part: its own text (the winner per budget and its margins) and the Pareto figure."""
    if not files.has(run / "recommendation.md"):
        return None
    text = (run / "recommendation.md").read_text(encoding="utf-8", errors="replace")
    return ("<h2>The plan to follow at each budget</h2><pre>" + html.escape(text) + "</pre>"
            + _image(files, run / "pareto.png", "validation loss against trainable parameters, a line per selector"))


def _later_sections(files, run: Path, validation, stability, comparison) -> list[str]:
    parts = []
    if validation is not None:
        parts.append("<h2>Does the score predict what training achieves?</h2>"
                     f'<p class="answer">{html.escape(validation.verdict())}</p>'
                     + _table(validation.correlations, "{:.3f}")
                     + _image(files, run / "validation.png", "each score against the realised gain"))
    if stability is not None:
        parts.append("<h2>Across tasks</h2>" + _image(files, run / "stability.png", "rank agreement across tasks")
                     + _table(stability, "{:.3f}"))
    if comparison is not None:
        parts.append("<h2>Training the placements</h2>" + _table(formatted_table(comparison))
                     + "".join(f"<p>{html.escape(n)}</p>" for n in notes(comparison).split("\n\n") if n)
                     + _image(files, run / "curves.png", "training loss per arm and quality against cost"))
        if files.has(run / "steps.png"):
            parts.append("<h2>Quality against training steps</h2>"
                         + _image(files, run / "steps.png", "exact match at each evaluated step, a line per arm"))
    info = read_run(run)
    if info is not None:
        parts.append("<h2>Made by</h2><pre>" + html.escape(" ".join(map(str, info.get("command", [])))) + "</pre>"
                     + _table(pd.DataFrame([info.get("versions", {})])))
    return parts


def build(run: str | Path) -> str:
    run = Path(run)
    if not run.is_dir():
        raise PlacementError(f"{run} is not a folder: pass the --out folder of profile, compare, stability, validate "
                             "or recommend")
    files = _Files(run)
    profile = _profile_dir(run, files)
    comparison = files.csv(run / "comparison.csv")
    stability = files.csv(run / "stability.csv")
    validation = _validation(files, run)
    recommendation = _recommendation(files, run)
    if all(part is None for part in (profile, comparison, stability, validation, recommendation)):
        raise PlacementError(f"{run} holds no profile, comparison, stability, validation or recommendation results: "
                             "pass a run folder")
    title, parts = "placement report", []
    if profile is not None:
        title, parts = _profile_section(files, profile, comparison)
    parts = [recommendation, *parts] + _later_sections(files, run, validation, stability, comparison)
    body = "\n".join(p for p in parts if p)
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n")


def write_report(run: str | Path) -> Path:
    """RUN/report.html. Inside the command that writes the run, through its ledger; later, only into a folder of a
    finished run of ours, replacing only a report.html that run lists (a file of anyone else is never replaced)."""
    run = Path(run)
    path = run / "report.html"
    page = build(run)  # read everything first: a damaged file fails before anything is written
    if open_ledger(path) is not None:
        write_text(path, page)
        return path
    if read_run(run) is None:
        raise PlacementError(f"{run} holds no run of placement (no {RUN_FILE}): pass a folder written by profile, "
                             "compare, validate or stability")
    refuse_if_held(run, run)
    listed = listed_files(run)
    if (path.exists() or path.is_symlink()) and (listed is None or path.name not in listed or path.is_symlink()):
        raise PlacementError(f"{path} exists and placement did not write it: move it away to write the report")
    write_text(path, page)
    add_to_run(run, path.name)  # a report made later belongs to the run it shows
    return path
