"""Old keyword names that keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import sys
import warnings


def warn(message: str, *, depth: int = 0) -> None:
    """A ``DeprecationWarning`` that points at the call of the deprecated name: the first frame
    outside this module, after skipping ``depth`` more frames (``depth=1`` from inside the body of
    the deprecated function itself). The decorators' own frames never count, so a warning names the
    caller's file and line, and a chg_lens module that calls a deprecated name is the one blamed
    (an error in the tests)::

        def validate(model, data, result):
            if old_order:
                warn("validate(model, result, data) is now validate(model, data, result)", depth=1)
    """
    frame, level = sys._getframe(1), 2
    for _ in range(depth):
        frame, level = frame.f_back, level + 1
    while frame is not None and frame.f_globals.get("__name__") == __name__:
        frame, level = frame.f_back, level + 1
    warnings.warn(message, DeprecationWarning, stacklevel=level)


def renamed(**old_to_new: str):
    """Decorator: accept each old keyword as its new name, warning once per call::

        @renamed(max_rows_per_pass="rows_per_pass")
        def score_configs(model, data, configs, *, rows_per_pass=256): ...
    """

    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old}= and {new}=; {old} is the old name of {new}")
                    warn(f"{fn.__name__}({old}=...) is now {new}=...")
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner

    return wrap


def keyword_only(*old_positional: str):
    """Decorator: options that became keyword-only still work positionally for one release, with a warning.

    ``old_positional`` names the options in their old positional order, after the parameters that stay
    positional (model and data)::

        @keyword_only("n_seeds", "updates")
        def fit(model, data, *, n_seeds=10, updates=500): ...

        fit(model, data, 4, 100)  # DeprecationWarning; same as fit(model, data, n_seeds=4, updates=100)
    """

    def wrap(fn):
        import inspect

        params = inspect.signature(fn).parameters.values()
        n_positional = sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)

        @functools.wraps(fn)
        def inner(*args, **kwargs):
            extra = args[n_positional:]
            if extra:
                if len(extra) > len(old_positional):
                    raise TypeError(f"{fn.__name__}() takes at most {n_positional + len(old_positional)} "
                                    f"positional arguments but {len(args)} were given")
                names = old_positional[: len(extra)]
                for name in names:
                    if name in kwargs:
                        raise TypeError(f"{fn.__name__}() got multiple values for argument {name!r}")
                warn(f"{fn.__name__}(): passing {', '.join(names)} by position is deprecated; "
                     f"pass {names[0]}=... by keyword")
                kwargs.update(zip(names, extra))
                args = args[:n_positional]
            return fn(*args, **kwargs)

        return inner

    return wrap
