"""The placement plan: which sites get a LoRA, why, and the ready PEFT arguments, as versioned JSON.

Every comparison arm is a plan; `strategies.py` says how each one picks its sites.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from .. import __version__
from ..errors import PlacementError
from ..families import get_family
from ..families.lora import init_problem, lora_config, lora_params, variant_of, with_variant
from ..model.sites import find_sites, fingerprint
from ..outputs import finite, write_json
from .strategies import Strategy, select

SCHEMA = "placement-plan/1"
REQUIRED = ("schema", "model", "probe", "sites", "strategy", "targets", "peft")


@dataclass
class Plan:
    """A placement plan; `to_json()` is the file format, `schema: placement-plan/1`."""
    model: dict
    probe: dict
    sites: list[dict]
    strategy: dict
    targets: list[str]
    peft: dict
    concentration: dict = field(default_factory=dict)
    stability: dict = field(default_factory=dict)
    trainable_params: int = 0
    family: str = "lora"  # the adapter family the plan applies; `peft` holds LoRA's arguments either way
    family_args: dict = field(default_factory=dict)  # the family's own size: reduction_factor, num_virtual_tokens
    provenance: dict = field(default_factory=dict)  # what chose the sites beyond the strategy (recommend's trials)
    created: str = ""
    tool_version: str = __version__
    schema: str = SCHEMA

    # -- building --------------------------------------------------------------------------------------------
    @classmethod
    def build(cls, *, model: dict, probe: dict, sites: list[dict], strategy: Strategy, peft: dict,
              concentration: dict | None = None, stability: dict | None = None,
              rank_pattern: dict | None = None) -> "Plan":
        targets = select(sites, strategy, peft["r"])
        peft = dict(peft, target_modules=targets)
        if strategy.ranks:  # PEFT's rank_pattern leaves alpha alone: alpha_pattern keeps alpha / r that of the plan
            rank_pattern = {t: int(strategy.ranks[t]) for t in targets}
            scale = peft["lora_alpha"] / peft["r"]
            peft["alpha_pattern"] = {t: _number(scale * rank) for t, rank in rank_pattern.items()}
        if rank_pattern:
            peft["rank_pattern"] = rank_pattern
        return cls(model=model, probe=probe, sites=sites, strategy=asdict(strategy) | {"label": strategy.label()},
                   targets=targets, peft=peft, concentration=concentration or {}, stability=stability or {},
                   trainable_params=_count(sites, targets, peft), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))

    def with_strategy(self, strategy: Strategy, rank_pattern: dict | None = None, r: int | None = None) -> "Plan":
        """The same probe and ranking, another choice of sites; `r` changes the rank and keeps alpha / r."""
        _lora_only(self, "a strategy", "--strategy picks LoRA sites")
        base = {k: v for k, v in self.peft.items() if k not in ("target_modules", "rank_pattern", "alpha_pattern")}
        if r is not None and r != base["r"]:
            if not isinstance(r, int) or isinstance(r, bool) or r < 1:
                raise PlacementError(f"rank {r!r} is not a LoRA rank: pass a positive integer")
            alpha = base["lora_alpha"] * r / base["r"]
            base.update(r=r, lora_alpha=int(alpha) if float(alpha).is_integer() else alpha)
        return Plan.build(model=self.model, probe=self.probe, sites=self.sites, strategy=strategy, peft=base,
                          concentration=self.concentration, stability=self.stability, rank_pattern=rank_pattern)

    # -- files -----------------------------------------------------------------------------------------------
    def to_json(self) -> dict:
        out = {"schema": self.schema}
        out.update({k: v for k, v in asdict(self).items() if k != "schema"})
        return finite(out)

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_json())

    def with_variant(self, variant: str | None) -> "Plan":
        """The same sites with a LoRA variant of PEFT (rslora, dora, pissa, olora; `lora` the plain one), recorded in
        the plan's PEFT arguments so the adapter and every export carry it (itself when `variant` is None)."""
        if variant is None:
            return self
        _lora_only(self, "a variant", "drop --variant")
        peft = with_variant(self.peft, variant)
        return replace(self, peft=peft, trainable_params=_count(self.sites, self.targets, peft))

    @property
    def variant(self) -> str:
        return variant_of(self.peft)

    def with_rank(self, r: int | None) -> "Plan":
        """The same sites at rank r, alpha / r kept (itself when r is None)."""
        if r is None or (r == self.peft.get("r") and self.family == "lora"):
            return self
        return _one_rank(self).with_strategy(Strategy("given", targets=self.targets, source=self.label), r=r)

    @property
    def dominant_site(self) -> str:
        return min(self.sites, key=lambda row: row["rank"])["site"]

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """A plan file (or a profile's folder), checked: it must train exactly its targets (`plan_problem`)."""
        path, data = read_plan(path)
        known = set(cls.__dataclass_fields__)
        plan = cls(**{k: v for k, v in data.items() if k in known})
        problem = plan_problem(plan)
        if problem:
            raise PlacementError(f"plan {path}: {problem}; fix it or regenerate it with placement plan")
        return plan

    # -- use -------------------------------------------------------------------------------------------------
    def check(self, model) -> None:
        """Refuse a model this plan was not made for: a missing site, or a different site fingerprint."""
        check_model(self, model)

    def all_linear_params(self) -> int:
        """Trainable parameters of LoRA at the plan's rank on every candidate site: the full-coverage yardstick."""
        return sum(lora_params(s, self.peft["r"]) for s in self.sites)

    def lora_config(self):
        return lora_config(self.peft)

    def adapter_config(self, model=None):  # the config its family applies it with: PEFT's, or ours
        return adapter_config(self, model)

    def with_family(self, family: str, size: int | None = None) -> "Plan":  # another module family, params counted
        return with_family(self, family, size)

    def targets_by_rank(self) -> list[str]:
        rank_of = {row["site"]: row.get("rank", 0) for row in self.sites}
        return sorted(self.targets, key=lambda t: rank_of.get(t, 0))

    @property
    def label(self) -> str:
        """The strategy's label, with the variant as a suffix when it is not the plain LoRA (dominant+dora)."""
        label = self.strategy.get("label", self.strategy.get("name", "plan"))
        variant = self.variant
        if self.family != "lora" or variant == "lora" or label.endswith(f"+{variant}"):
            return label
        return f"{label}+{variant}"


def adapter_config(plan: Plan, model=None):
    """The config that applies the plan, as its family makes it (PEFT's, or ours); `model` fills in what the plan
    does not record."""
    family = get_family(plan.family)
    return family.config(family.kwargs(plan, model))


def _lora_only(plan: Plan, what: str, hint: str) -> None:
    if plan.family != "lora":
        raise PlacementError(f"this plan trains {plan.family}, not LoRA, so {what} means nothing to it: {hint}, or "
                             "compare the family's sizes and site counts as arms (ia3-4, series-bn:rf8, prefix:len20)")


def _one_rank(plan: Plan) -> Plan:
    """The plan, a LoRA plan with one rank, which --r may change (per-site ranks would be replaced by it)."""
    _lora_only(plan, "a rank", "drop --r")
    if plan.peft.get("rank_pattern"):
        raise PlacementError("this plan gives each site its own rank, which --r would replace: make the plan again "
                             "at another budget (allocate-P%), or drop --r")
    return plan


def family_rows(plan: Plan, family, model=None) -> list[dict]:
    """Site rows of a family's candidates: the plan's own (they are LoRA's sites, which a module family's are among),
    or the model's (the modules a virtual-token family reaches)."""
    if model is None:
        return plan.sites
    return [s.to_row() for s in family.find_sites(model)]


def with_family(plan: Plan, name: str, size: int | None = None, model=None) -> Plan:
    """The same sites with another family (IA3, a bottleneck at reduction factor `size`), its trainable parameters
    counted at `size` (the family's default when None)."""
    if name == "lora":
        return plan
    family = get_family(name)
    by_name = {row["site"]: row for row in family_rows(plan, family, model)}
    missing = [t for t in plan.targets if t not in by_name]
    if missing:
        raise PlacementError(f"{missing[0]} is not a {name} site: {name} adapts "
                             f"{', '.join(sorted({r['role'] for r in by_name.values()})) or 'no site here'}")
    args = {family.size.arg: size} if size is not None and family.size and family.size.arg else {}
    return replace(plan, family=name, family_args=args,
                   trainable_params=sum(family.params(by_name[t], size) for t in plan.targets))


def prompt_plan(plan: Plan, model, family: str, length: int, layers: int | None = None, label: str = "") -> Plan:
    """A plan of a virtual-token family (prompt, prefix, LLaMA-Adapter on the top `layers`): its targets are the
    modules it reaches (the last `layers` of them; all when None), its size the number of virtual tokens."""
    found = get_family(family)
    if length < 1:
        raise PlacementError(f"a {family} length of {length} adds no virtual token: pass :len1 or more")
    reach = [s.name for s in found.find_sites(model)]
    if layers is not None and found.count == "none":
        raise PlacementError(f"{family} reaches every layer: it takes no layer count")
    count = len(reach) if layers is None else layers
    if not 1 <= count <= len(reach):
        raise PlacementError(f"{family} on {count} layers: this model has {len(reach)}; pass 1 to {len(reach)}")
    peft = {k: v for k, v in plan.peft.items() if k not in ("rank_pattern", "alpha_pattern")}
    lora = replace(plan, targets=reach[len(reach) - count:], peft=peft | {"target_modules": reach[len(reach) - count:]},
                   strategy={"name": family, "label": label or f"{family}:len{length}"})
    return with_family(lora, family, length, model)


def check_model(plan: Plan, model) -> None:
    """Refuse a model this plan was not made for: a missing site, or a different site fingerprint."""
    names = {name for name, _ in model.named_modules()}
    absent = [t for t in plan.targets if t not in names]
    if absent:
        raise PlacementError(
            f"site {absent[0]} of the plan is not in this model: profile this model and make a new plan"
        )
    family = get_family(plan.family)
    sites = {s.name for s in family.find_sites(model)}
    stray = [t for t in plan.targets if t not in sites]
    if stray:  # an embedding or a norm would train under PEFT without a word, outside every score
        raise PlacementError(f"{stray[0]} is not a {plan.family} site of this model (placement sites lists them): "
                             "make the plan from a profile or pick its targets among the sites")
    expected = plan.model.get("fingerprint")
    found = fingerprint(find_sites(model))
    if expected and expected != found:
        raise PlacementError(
            f"this model's sites (fingerprint {found}) differ from the plan's ({expected}): "
            "the plan was made for another model; profile this one"
        )


def read_plan(path: str | Path) -> tuple[Path, dict]:
    """The JSON of a plan file (or of a profile folder's plan.json), with its schema and required keys checked."""
    path = Path(path)
    if path.is_dir():
        path = path / "plan.json"
    if not path.is_file():
        raise PlacementError(f"plan {path} not found: pass a plan.json or a profile's output folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PlacementError(f"plan {path} is not valid JSON ({err}): regenerate it with placement profile") from err
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        found = data.get("schema") if isinstance(data, dict) else type(data).__name__
        raise PlacementError(f"plan {path} has schema {found!r}, expected {SCHEMA}: "
                             "regenerate it with placement profile")
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise PlacementError(f"plan {path} lacks {', '.join(missing)}: regenerate it with placement profile")
    return path, data


def plan_problem(plan: Plan) -> str | None:
    """What makes a plan unusable, or None: it must train exactly its targets, with arguments PEFT accepts."""
    if not isinstance(plan.targets, list) or not plan.targets or not all(isinstance(t, str) for t in plan.targets):
        return "targets must be a non-empty list of site names"
    if not isinstance(plan.peft, dict):
        return "peft must be an object of LoraConfig arguments"
    for key, kind, what in (("model", dict, "an object"), ("strategy", dict, "an object"), ("probe", dict, "an object"),
                            ("family", str, "a family name"), ("family_args", dict, "an object"),
                            ("sites", list, "a list")):
        if not isinstance(getattr(plan, key), kind):
            return f"{key} must be {what}, not {type(getattr(plan, key)).__name__}"
    return peft_problem(plan.peft, plan.targets)


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _lora_fields() -> set[str]:
    from dataclasses import fields

    from peft import LoraConfig

    return {f.name for f in fields(LoraConfig)}


def peft_problem(peft: dict, targets: list[str]) -> str | None:
    """Check a plan's PEFT arguments: the adapter must land on exactly the plan's targets (no regex, short name or
    'all-linear' that would train more), with a positive integer r, a positive finite alpha, dropout in [0, 1)."""
    unknown = sorted(set(peft) - _lora_fields())
    if unknown:
        return f"peft has '{unknown[0]}', which LoraConfig does not accept"
    modules = peft.get("target_modules")
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        return ("peft.target_modules must list the exact module names of targets "
                "(a regex, a short name or 'all-linear' would train other modules than the plan says)")
    if set(modules) != set(targets) or len(modules) != len(set(modules)):
        extra = sorted(set(modules) - set(targets)) or sorted(set(targets) - set(modules))
        return (f"peft.target_modules and targets differ (at '{extra[0] if extra else 'a repeated name'}'): "
                "they must name the same sites")
    if not _positive_int(peft.get("r")):
        return f"peft.r is {peft.get('r')!r}: it must be a positive integer"
    if not _positive_number(peft.get("lora_alpha")):
        return f"peft.lora_alpha is {peft.get('lora_alpha')!r}: it must be a positive finite number"
    init = init_problem(peft.get("init_lora_weights", True))
    if init:
        return f"peft.{init}"
    dropout = peft.get("lora_dropout", 0.0)
    if not (isinstance(dropout, (int, float)) and not isinstance(dropout, bool) and 0 <= dropout < 1):
        return f"peft.lora_dropout is {dropout!r}: it must be in [0, 1)"
    for key, check in (("rank_pattern", _positive_int), ("alpha_pattern", _positive_number)):
        pattern = peft.get(key) or {}
        if not isinstance(pattern, dict):
            return f"peft.{key} must be an object of site: value"
        bad = sorted(k for k, v in pattern.items() if not check(v))
        if bad:
            return f"peft.{key} gives '{bad[0]}' the value {pattern[bad[0]]!r}: values must be positive"
        stray = sorted(set(pattern) - set(targets))
        if stray:
            return f"peft.{key} names '{stray[0]}', which is not among the targets"
    return None


def _count(sites: list[dict], targets: list[str], peft: dict) -> int:
    """Trainable parameters of the plan's adapters, each at its own rank (DoRA's magnitudes counted)."""
    by_name = {s["site"]: s for s in sites}
    return sum(lora_params(by_name[t], _rank_for(t, peft), dora=bool(peft.get("use_dora"))) for t in targets)


def _rank_for(target: str, peft: dict) -> int:
    pattern = peft.get("rank_pattern") or {}
    return int(pattern.get(target, peft["r"]))

