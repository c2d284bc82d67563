"""Does the placement depend on the task? Profile one model on several tasks and compare their site rankings."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..errors import PlacementError
from ..outputs import write_csv, write_text
from ..plan.ranking import agreement_table
from ..probe import ProbeSettings
from ..report.figures import agreement_matrix
from .profile import run_profile, write_profile


def task_name(spec: str) -> str:
    """A short, file-safe name for a data source: the builtin's name or the file's stem."""
    name = spec.removeprefix("builtin:") if spec.startswith("builtin:") else Path(spec).stem or spec
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def task_names(datas: list[str]) -> list[str]:
    names = [task_name(d) for d in datas]
    if len(datas) < 2 or len(set(names)) < len(names):
        raise PlacementError("stability needs two or more different --data tasks: give --data once per task")
    return names


def stability_summary(table: pd.DataFrame, names: list[str], tops: dict, datas, out) -> tuple[dict, list[str]]:
    """What `placement stability` prints, and its JSON form."""
    lines = [f"{name:>16s}: top {top.site} ({100 * top.share:.1f}%)" for name, top in tops.items()]
    lines += [table.to_markdown(index=False, floatfmt=".3f"), f"wrote {out}/stability.csv, stability.md, stability.png"]
    return {"tasks": dict(zip(names, datas)), "pairs": table.to_dict("records"), "out": out}, lines


def run_stability(model, tokenizer, source, examples: dict[str, list], out: str | Path, *, batches: int,
                  batch_size: int, max_length: int, seed: int, top_k: int, progress: bool = False):
    """A profile per task under OUT/<task>, then stability.csv/.md and the matrix stability.png.
    `examples` maps each data source to its examples, read before the model loaded. Returns (table, names, tops)."""
    names = task_names(list(examples))
    rankings, tops = {}, {}
    for name, (spec, items) in zip(names, examples.items()):
        profile = run_profile(model, tokenizer, source, spec, batches=batches, batch_size=batch_size,
                              max_length=max_length, settings=ProbeSettings(seed=seed), progress=progress,
                              examples=items)
        write_profile(profile, Path(out) / name, title=f"{source.name} on {spec}: page")
        rankings[name] = profile.ranked.set_index("site")["page"]
        tops[name] = profile.ranked.iloc[0]
    table: pd.DataFrame = agreement_table(rankings, k=top_k)
    write_csv(Path(out) / "stability.csv", table)
    write_text(Path(out) / "stability.md", table.to_markdown(index=False, floatfmt=".3f") + "\n")
    agreement_matrix(table, names, Path(out) / "stability.png", title=f"{source.name}: site rankings across tasks")
    return table, names, tops
