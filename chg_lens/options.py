"""Option sets declared once: a dataclass whose fields carry each option's type, default and a
one-line help, from which a public function's keyword-only options, its documentation, its
validation and the command line's flags are all derived (nanoGPT's ``GPTConfig`` is the model).

An option set subclasses :class:`OptionSet`, declares each option with :func:`option` and checks
its values in ``check()`` (a ValueError or TypeError naming the first bad one).
:func:`takes_options` turns a function that takes option sets into the public function that takes
their fields as keyword-only options: ``inspect.signature`` and ``help()`` show every option with
its default, and a call's keywords become checked option sets before the body runs.

Example::

    @dataclass
    class StepConfig(OptionSet):
        steps: int = option(100, "updates to run")

        def check(self) -> None:
            checks.positive_int("steps", self.steps)

    @takes_options(StepConfig)
    def fit(model, data, config: StepConfig):
        ...

    fit(model, data, steps=10)       # inspect.signature(fit): (model, data, *, steps: int = 100)
    fit(model, data, steps=0)        # ValueError: steps must be at least 1; got 0

This module imports no other chg_lens module: the option sets live beside the code they configure
(``chg.CHGConfig``, ``contrastive.ContrastiveConfig``, ``fitting.RunOptions``) and the command line
builds its flags from them (``cli.options.add_option_flags``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import types
import typing
from typing import Any, Callable, Mapping

HELP = "help"
PARAMETER = "parameter"


def option(default: Any, help: str, *, parameter: bool = True) -> Any:
    """A dataclass field for one option: its ``default`` and a one-line ``help``. ``parameter=False``
    marks a field the option set derives itself (not an argument of the public function)."""
    return dataclasses.field(default=default, metadata={HELP: help, PARAMETER: parameter})


def help_of(f: dataclasses.Field) -> str:
    """The one-line help of an option field."""
    return str(f.metadata.get(HELP, ""))


def option_fields(*sets: type) -> list[dataclasses.Field]:
    """The fields of ``sets`` that are options of the public function, in declaration order; a name
    declared by two sets is an error (it would be two options)."""
    out, seen = [], {}
    for cls in sets:
        for f in dataclasses.fields(cls):
            if not f.metadata.get(PARAMETER, True):
                continue
            if f.name in seen:
                raise TypeError(f"option {f.name!r} is declared by both {seen[f.name].__name__} and {cls.__name__}")
            seen[f.name] = cls
            out.append(f)
    return out


def names(*sets: type) -> list[str]:
    """The option names of ``sets``."""
    return [f.name for f in option_fields(*sets)]


def defaults(*sets: type) -> dict[str, Any]:
    """Option name -> default."""
    return {f.name: f.default for f in option_fields(*sets)}


@functools.lru_cache(maxsize=None)
def hints(cls: type) -> dict[str, Any]:
    """The evaluated type of each field of ``cls`` (its annotations may be strings)."""
    return typing.get_type_hints(cls)


def value_type(cls: type, name: str) -> type | None:
    """The one plain type an option takes besides ``None`` (``int`` for ``int | None``), else the
    type of its default; None when neither is a single plain type."""
    hint = hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)] if _is_union(hint) else [hint]
    if len(args) == 1 and isinstance(args[0], type) and typing.get_origin(args[0]) is None:
        return args[0]
    default = {f.name: f.default for f in dataclasses.fields(cls)}[name]
    return None if default is None else type(default)


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def owner(sets: tuple[type, ...], name: str) -> type:
    """The option set of ``sets`` that declares option ``name``."""
    for cls in sets:
        if name in names(cls):
            return cls
    raise KeyError(name)


class OptionSet:
    """The base of an option set (a dataclass of :func:`option` fields): ``check()`` validates,
    ``resolved()`` is the checked set with canonical values, :meth:`from_options` does both."""

    def check(self) -> None:
        """Raise a ValueError (or TypeError) naming the first bad option."""

    def resolved(self):
        """A copy with canonical values: whole numbers as ``int``, numbers as ``float`` where the
        option's type says so (``3.0`` -> ``3``); call after :meth:`check`."""
        changes = {}
        for f in dataclasses.fields(self):
            kind, v = value_type(type(self), f.name), getattr(self, f.name)
            if v is None or isinstance(v, bool):
                continue
            if kind is int and isinstance(v, numbers.Real):
                changes[f.name] = int(v)
            elif kind is float and isinstance(v, numbers.Real):
                changes[f.name] = float(v)
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_options(cls, **values: Any):
        """The set from option keywords (the rest take their defaults), checked and resolved;
        a keyword that is not an option of this set is a TypeError."""
        unknown = sorted(set(values) - set(names(cls)))
        if unknown:
            raise TypeError(f"{cls.__name__} has no option(s) {unknown}; it has {names(cls)}")
        inst = cls(**values)
        inst.check()
        return inst.resolved()


def check_options(sets: tuple[type, ...], values: Mapping[str, Any], what: str, ignore: tuple[str, ...] = ()) -> None:
    """Check option keywords against ``sets`` without running anything: a name no set declares
    (except ``ignore``) is a ValueError (``"{what} does not take [...]"``), and each set checks the
    values given to it (the rest at their defaults)."""
    unknown = sorted(set(values) - set(names(*sets)) - set(ignore))
    if unknown:
        raise ValueError(f"{what} does not take {unknown}")
    for cls in sets:
        cls.from_options(**{k: v for k, v in values.items() if k in names(cls)})


def options_doc(*sets: type) -> str:
    """The ``Options`` list appended to a function's docstring: each option, its type, default and help."""
    lines = ["", "", "Options (keyword-only):", ""]
    for cls in sets:
        for f in option_fields(cls):
            kind = f.type if isinstance(f.type, str) else inspect.formatannotation(f.type)
            lines.append(f"- ``{f.name}`` ({kind}, default ``{f.default!r}``): {help_of(f)}")
    return "\n".join(lines) + "\n"


def options_table(*sets: type) -> str:
    """The options of ``sets`` as a Markdown table (option, type, default, help), for the docs::

        print(options_table(*chg_lens.chg.FIT_OPTIONS))   # the table docs/api.md shows for fit_chg
    """
    lines = ["| option | type | default | what it is |", "| --- | --- | --- | --- |"]
    for cls in sets:
        for f in option_fields(cls):
            kind = f.type if isinstance(f.type, str) else inspect.formatannotation(f.type)
            kind = " or ".join(part.strip() for part in kind.split("|"))  # a pipe would end the cell
            text = help_of(f).replace("|", " or ")
            lines.append(f"| `{f.name}` | `{kind}` | `{f.default!r}` | {text} |")
    return "\n".join(lines) + "\n"


def takes_options(*sets: type) -> Callable[[Callable], Callable]:
    """Decorator: ``fn(positional..., set_1, ..., set_n)`` becomes the public
    ``fn(positional..., *, <every option of the sets>)``.

    The signature (``inspect.signature``, ``help``) lists every option, keyword-only, with its type
    and default; the docstring gets an ``Options`` list from the help strings. A call binds its
    arguments to that signature (an unknown keyword is a TypeError naming the function), builds
    each set with :meth:`OptionSet.from_options` (checked, resolved) and calls ``fn`` with the
    positional arguments and the sets. Put ``deprecation.keyword_only`` / ``renamed`` above it.
    """

    def wrap(fn: Callable) -> Callable:
        params = list(inspect.signature(fn).parameters.values())
        positional = params[: len(params) - len(sets)]
        fields_ = option_fields(*sets)
        keyword = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default,
                                     annotation=f.type) for f in fields_]
        public = inspect.signature(fn).replace(parameters=positional + keyword)
        by_set = [(cls, names(cls)) for cls in sets]

        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any):
            try:
                bound = public.bind(*args, **kwargs)
            except TypeError as err:
                raise TypeError(f"{fn.__name__}() {err}") from None
            bound.apply_defaults()
            given = bound.arguments
            built = [cls.from_options(**{k: given[k] for k in mine if k in given}) for cls, mine in by_set]
            return fn(*(given[p.name] for p in positional), *built)

        inner.__signature__ = public
        inner.__annotations__ = {p.name: p.annotation for p in positional + keyword
                                 if p.annotation is not inspect.Parameter.empty}
        if "return" in fn.__annotations__:
            inner.__annotations__["return"] = fn.__annotations__["return"]
        inner.__doc__ = (inspect.cleandoc(fn.__doc__ or "")) + options_doc(*sets)
        inner.option_sets = sets
        return inner

    return wrap
