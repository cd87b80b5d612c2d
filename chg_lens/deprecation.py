"""Old keyword names that keep working for one release, with a ``DeprecationWarning``."""

from __future__ import annotations

import functools
import warnings


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
                    warnings.warn(f"{fn.__name__}({old}=...) is now {new}=...", DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return inner

    return wrap
