"""How the settings dataclasses become the command line (litgpt's habit): a dataclass field whose metadata holds a
"help" is an option, and the field is its one declaration of name, default and help.

Metadata keys: "help" (the text; "{arms}" is replaced by the arm grammar), "option" (the spelling, else --field-name),
"range" ((lo, hi): a value outside is one line naming the option), "flag" (a flag that sets this value),
"choices", "path" (a file or folder), "parse" (the option's text to the field's value) and "show" (the field's value
to the option's text, for the default).

A command lists its settings groups with `settings(name=use(Class, "field", ..., field=command default))`; its
function receives one object per group, built once (so `__post_init__` checks it once). A field that another group
declares takes that option's value by name (`TrainSettings.seed` gives `ProbeSettings.seed`), so each option is
declared once however many settings read it.
"""
from __future__ import annotations

import functools
import types
from dataclasses import MISSING, Field, dataclass, fields, is_dataclass, replace

import click
from click.core import ParameterSource

from .errors import PlacementError

GIVEN = (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)


def user_errors(fn):
    """Errors a user can cause become one line and exit 1; anything else is a bug and keeps its traceback."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PlacementError as err:
            raise click.ClickException(str(err).splitlines()[0]) from None
    return wrapper


@dataclass(frozen=True)
class Use:
    """One settings group of a command: its class, which declared fields are options here (dotted for a nested
    group, "train.steps"; None: every declared field), this command's own defaults, and whether the command gets
    the built object or only the options' values (a namespace)."""

    cls: type
    names: tuple[str, ...] | None
    preset: dict
    build: bool = True

    def options(self) -> list[str]:
        if self.names is not None:
            return list(self.names)
        return [f.name for f in fields(self.cls) if "help" in f.metadata]

    def default(self, dotted: str):
        """This command's default of a (dotted) field, in the field's own form."""
        head, *rest = dotted.split(".")
        value = self.preset[head] if head in self.preset else field_default(field_of(self.cls, head))
        for part in rest:
            value = getattr(value, part)
        return value

    def declaration(self, dotted: str) -> Field:
        owner = self.cls
        for part in dotted.split(".")[:-1]:
            owner = type(self.default(part))
        return field_of(owner, dotted.split(".")[-1])


def use(cls, *names: str, build: bool = True, **preset) -> Use:
    return Use(cls, names or None, preset, build)


def field_of(cls, name: str) -> Field:
    return next(f for f in fields(cls) if f.name == name)


def field_default(f: Field):
    if f.default is not MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not MISSING else MISSING


def option_name(f: Field) -> str:
    return f.metadata.get("option") or "--" + f.name.replace("_", "-")


def shown(f: Field, value):
    """A field's value as the option's text (its default on the command line)."""
    return value if value is MISSING else f.metadata.get("show", lambda v: v)(value)


def _help(f: Field) -> str:
    text = f.metadata["help"]
    if "{arms}" in text:
        from .plan.strategies import arm_help

        text = text.replace("{arms}", arm_help())
    return text


def _type(f: Field):
    meta = f.metadata
    if "choices" in meta:
        return click.Choice(list(meta["choices"]))
    if meta.get("path"):
        return click.Path()
    kind = str(f.type).split("|")[0].strip()
    return {"int": click.INT, "float": click.FLOAT}.get(kind, click.STRING) if "show" not in meta else click.STRING


def make_option(f: Field, value, origin: tuple):
    """The click option of one field, with this command's default; the option carries its declaration."""
    kwargs = {"help": _help(f)}
    if "flag" in f.metadata:
        kwargs.update(flag_value=f.metadata["flag"], default=value)
    elif isinstance(value, bool):
        kwargs.update(is_flag=True, default=value)
    elif value == ():  # a repeatable option; required unless the field says it may be left out ("many")
        kwargs.update(multiple=True, required=not f.metadata.get("many"), type=_type(f))
    else:
        text = shown(f, value)
        kwargs.update(type=_type(f), required=text is MISSING)
        if text is not MISSING:
            kwargs.update(default=text, show_default=text is not None)
    decorator = click.option(option_name(f), f.name, **kwargs)

    def apply(fn):
        fn = decorator(fn)
        fn.__click_params__[-1].setting = origin  # what the layout test reads: (class, field, command default)
        return fn
    return apply


def given(name: str) -> bool:
    """Whether the user gave the option of this parameter name (not its default)."""
    return click.get_current_context().get_parameter_source(name) in GIVEN


def _build(cls, preset: dict, values: dict):
    """An object of `cls` from its defaults, the command's preset and every option value that names one of its
    fields; a nested settings object is remade once, from the values that name its fields."""
    kwargs = {}
    for f in fields(cls):
        if not f.init:
            continue
        if f.name in values:
            kwargs[f.name] = values[f.name]
            continue
        current = preset[f.name] if f.name in preset else field_default(f)
        if is_dataclass(current) and any(g.name in values for g in fields(current)):
            current = replace(current, **{g.name: values[g.name] for g in fields(current) if g.name in values})
        if current is not MISSING:
            kwargs[f.name] = current
    return cls(**kwargs)


def _check_range(f: Field, value) -> None:
    bounds = f.metadata.get("range")
    if bounds is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi = bounds
    if not lo <= value <= hi:
        raise PlacementError(f"{option_name(f)} {value} is out of range: pass a number from {lo:g} to {hi:g}")


def settings(**groups: Use | type):
    """A command's options, built from its settings groups; the function receives one object per group."""
    groups = {name: g if isinstance(g, Use) else use(g) for name, g in groups.items()}
    declared = [(name, g, dotted, g.declaration(dotted)) for name, g in groups.items() for dotted in g.options()]
    dests = [f.name for *_, f in declared]
    if len(set(dests)) != len(dests):
        raise TypeError(f"an option is declared twice in one command: {sorted(dests)}")

    def receive(kwargs: dict) -> dict:
        values = {}
        for _, _, _, f in declared:
            raw = kwargs.pop(f.name)
            values[f.name] = f.metadata["parse"](raw) if "parse" in f.metadata and raw is not None else raw
        built = {}
        for name, g in groups.items():
            if g.build:
                built[name] = _build(g.cls, g.preset, values)
            else:
                built[name] = types.SimpleNamespace(**{d.split(".")[-1]: values[d.split(".")[-1]] for d in g.options()})
        for _, _, _, f in declared:  # after the objects' own checks, whose messages say more
            _check_range(f, values[f.name])
        return built

    def apply(fn):
        @functools.wraps(fn)
        @user_errors
        def wrapper(*args, **kwargs):
            return fn(*args, **receive(kwargs), **kwargs)

        wrapper.settings_groups = groups
        for name, g, dotted, f in reversed(declared):
            wrapper = make_option(f, g.default(dotted), (g, dotted))(wrapper)
        return wrapper
    return apply
