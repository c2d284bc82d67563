"""The arms of a comparison: read from `--arms` and `--plan-arm`, checked to be distinct, and turned into a plan for
every seed (random controls draw anew for each)."""
from __future__ import annotations

import copy
import functools
import hashlib
import re
import subprocess
from dataclasses import dataclass, field, replace
from importlib import metadata
from pathlib import Path

import pandas as pd

from ..errors import PlacementError
from ..families import lora
from ..families import get_family
from ..plan.plan import Plan, prompt_plan
from ..plan.strategies import Arm, arm_family, arm_strategy, parse_arms
from .tables import RANDOM_KINDS

_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+%:-]*")


@dataclass(frozen=True)
class PlanArm(Arm):
    """An arm that trains a plan file as it is (`--plan-arm LABEL=PATH`); its identity is the file's content."""

    path: str = ""
    digest: str = ""  # sha256 of the file's bytes
    plan: Plan | None = field(default=None, compare=False, hash=False, repr=False)
    lr: float | None = None  # without a sweep, the rate instead of --lr: a recommended plan's, as it was judged


def parse_plan_arm(spec: str) -> PlanArm:
    """`LABEL=PATH`: the plan file read and checked now, so a file that is not a plan fails before any loading."""
    label, sep, path = spec.partition("=")
    label = label.strip()
    if not sep or not path.strip() or not _LABEL.fullmatch(label):
        raise PlacementError(f"--plan-arm '{spec}' is not LABEL=PATH: write e.g. --plan-arm mine=plans/mine.json")
    file = Path(path.strip())
    if not file.is_file():
        raise PlacementError(f"--plan-arm {label}: {file} is not a file: pass a plan.json")
    try:
        plan = Plan.load(file)
    except PlacementError as err:
        raise PlacementError(f"--plan-arm {label}: {err}") from None
    except (TypeError, ValueError, AttributeError, KeyError) as err:
        raise PlacementError(f"--plan-arm {label}: {file} is not a placement plan ({type(err).__name__}): "
                             "pass a plan written by placement plan or profile") from None
    digest = "sha256:" + hashlib.sha256(file.read_bytes()).hexdigest()
    return PlanArm(label, "given", path=str(file), digest=digest, plan=plan, lr=recorded_rate(plan))


def recorded_rate(plan: Plan) -> float | None:
    """The rate a recommended plan was judged at (its provenance says so): without a sweep it is trained there."""
    provenance = plan.provenance or {}
    rate = provenance.get("lr") if provenance.get("kind") == "recommend" else None
    return float(rate) if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate > 0 else None


def arm_kind(arm: Arm) -> str:
    """What an arm is, as its folder records it (so a resumed run cannot keep another kind under one label)."""
    return "plan file" if isinstance(arm, PlanArm) else f"{arm_family(arm)}:{arm.strategy}"


def _identity(arm: Arm) -> tuple:
    """Two arms with the same identity train the same thing, whatever their spelling."""
    if isinstance(arm, PlanArm):
        return ("plan", arm.digest)
    family = arm_family(arm)
    size = arm.size or _default_size(family)
    return (arm.strategy, arm.k, arm.r, arm.percent, (arm.variant or "lora") if family == "lora" else None, size)


def _default_size(family: str) -> int | None:
    """The size an arm of `family` takes when it gives none (LoRA's rank is the comparison's --r)."""
    size = get_family(family).size
    return size.default if family != "lora" and size is not None else None


def check_distinct(arms: list[Arm]) -> None:
    """Refuse one arm listed twice under two spellings (dominant and dominant+lora), or two arms whose folders
    would be one."""
    seen, folders = {}, {}
    for arm in arms:
        other = seen.setdefault(_identity(arm), arm)
        if other is not arm:
            raise PlacementError(f"arms '{other.label}' and '{arm.label}' are the same arm written two ways: "
                                 "list it once")
        other = folders.setdefault(arm_folder(arm), arm)
        if other is not arm:
            raise PlacementError(f"arms '{other.label}' and '{arm.label}' would share the folder "
                                 f"arms/{arm_folder(arm)}: give one another label")


def arm_folder(arm: Arm) -> str:
    return arm.label.replace(":", "-")


def with_default_variant(arms: list[Arm], variant: str | None) -> list[Arm]:
    """`--variant` for the arms that name none, written into their labels (dominant -> dominant+dora)."""
    if variant is None:
        return arms
    lora.check_variant(variant)
    lora_arms = [a for a in arms if arm_family(a) == "lora"]
    if variant == "lora":
        return [replace(a, variant=a.variant or "lora") if a in lora_arms else a for a in arms]
    return [replace(a, variant=variant, label=f"{a.label}+{variant}") if a in lora_arms and not a.variant else a
            for a in arms]


def read_arms(arms: str, variant: str | None = None, plan_arms=()) -> list[Arm]:
    """`--arms` with `--variant` applied, then every `--plan-arm`; one arm twice is refused."""
    parsed = with_default_variant(parse_arms(arms), variant) + [parse_plan_arm(s) for s in plan_arms or ()]
    check_distinct(parsed)
    return parsed


def draw_seed(base_seed: int, seed: int, data_key: str) -> int:
    """The seed of a random arm's draw for training seed `seed`: a fresh draw per seed and per training set."""
    digest = hashlib.sha256(f"{base_seed}:{seed}:{data_key}".encode()).hexdigest()
    return int(digest[:8], 16)


def arm_plan(arm: Arm, base: Plan, model, default_k: int, seed: int = 0, spectrum: dict | None = None,
             family_ranking: dict[str, list[str]] | None = None) -> Plan:
    if isinstance(arm, PlanArm):
        try:
            arm.plan.check(model)
        except PlacementError as err:
            raise PlacementError(f"--plan-arm {arm.label}: {arm.path} is for another model ({err})") from None
        plan = copy.deepcopy(arm.plan)
        plan.strategy["label"] = arm.label
        return plan
    family = arm_family(arm)
    if get_family(family).virtual:  # no linear sites to pick: the family reaches the embedding or whole blocks
        return prompt_plan(base, model, family, arm.size or _default_size(family), arm.k, label=arm.label)
    r = arm.r or base.peft["r"]
    full = sum(lora.lora_params(site, r) for site in base.sites)  # all-linear at the arm's rank: budgets' yardstick
    strategy = arm_strategy(arm, model, default_k, seed, all_linear_params=full, spectrum=spectrum, rows=base.sites,
                            family_ranking=family_ranking)
    plan = base.with_strategy(strategy, r=arm.r).with_variant(arm.variant).with_family(family, arm.size)
    plan.strategy["label"] = arm.label
    return plan


def arm_plans(arm: Arm, base: Plan, model, default_k: int, seeds: int, base_seed: int, data_key: str,
              **kwargs) -> list[Plan]:
    """The plan of every seed: one plan for all, except a random arm, which draws its sites anew for each seed
    (so its spread over seeds is a spread over draws)."""
    if arm.strategy not in RANDOM_KINDS or isinstance(arm, PlanArm):
        return [arm_plan(arm, base, model, default_k, base_seed, **kwargs)] * seeds
    return [arm_plan(arm, base, model, default_k, draw_seed(base_seed, k, data_key), **kwargs) for k in range(seeds)]


@functools.lru_cache(maxsize=1)
def code_record() -> dict:
    """The package version and git commit this process runs (None where unknown), recorded by every arm."""
    try:
        version = metadata.version("placement")
    except metadata.PackageNotFoundError:
        version = None
    here = Path(__file__).resolve().parent
    def git(*args) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10)

    try:  # a commit only when this very file is tracked (an installed copy inside another repository is not)
        tracked = git("ls-files", "--error-unmatch", Path(__file__).name).returncode == 0
        commit = (git("rev-parse", "--short=12", "HEAD").stdout.strip() or None) if tracked else None
        dirty = bool(commit) and bool(git("status", "--porcelain", "--untracked-files=no").stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, False
    return {"placement_version": version, "git_commit": commit and (commit + ("+dirty" if dirty else ""))}


def family_rankings(frame: pd.DataFrame) -> dict[str, list[str]]:
    """family -> its sites, best first by the family's own init-gradient score (family_scores.csv's rows)."""
    return {family: list(rows.sort_values("page", ascending=False, kind="stable")["site"])
            for family, rows in frame.groupby("family", sort=False)}


def read_family_ranking(folder: Path) -> dict[str, list[str]] | None:
    """A profile folder's family rankings (family_scores.csv), or None when it scored LoRA alone."""
    path = Path(folder) / "family_scores.csv"
    return family_rankings(pd.read_csv(path)) if path.is_file() else None
