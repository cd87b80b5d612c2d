"""Checks of user input, in one place: every option, tensor, device and output folder a user gives
is checked here, before any long work starts, with a ``ValueError`` (or ``TypeError``) that names
the option and says what to do.

Small pure functions; fits, analyses, sweeps and the CLI all call the same ones, so an option
that a sweep's pre-submission check accepts is one the fit accepts.

Example::

    from chg_lens import checks
    lam = checks.finite_float("lam", 0.1, min=0)          # 0.1
    n = checks.positive_int("n_seeds", 1.5)              # ValueError: n_seeds must be a whole number ...
    checks.gate_tensor("base", torch.ones(2, 4), shape=(2, 4))
"""

from __future__ import annotations

import inspect
import math
import numbers
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import Tensor


# ----------------------------------------------------------------------------- numbers
def finite_float(name: str, value: Any, *, min: float | None = None, max: float | None = None,
                 min_open: bool = False) -> float:
    """``value`` as a finite float in ``[min, max]`` (``(min, max]`` with ``min_open``), else a
    ValueError naming ``name``. Booleans and strings are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number; got {value!r} ({type(value).__name__})")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number; got {v!r}")
    if min is not None and (v < min or (min_open and v == min)):
        raise ValueError(f"{name} must be {'>' if min_open else '>='} {min:g}; got {v:g}")
    if max is not None and v > max:
        raise ValueError(f"{name} must be <= {max:g}; got {v:g}")
    return v


def whole_int(name: str, value: Any, *, min: int | None = None) -> int:
    """``value`` as an int (``3`` or ``3.0``, not ``1.5``, ``True`` or ``"3"``) that is at least ``min``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a whole number; got {value!r} ({type(value).__name__})")
    if not isinstance(value, numbers.Integral):
        if not math.isfinite(float(value)) or float(value) != int(value):
            raise ValueError(f"{name} must be a whole number; got {value!r}")
    v = int(value)
    if min is not None and v < min:
        raise ValueError(f"{name} must be at least {min}; got {v}")
    return v


def positive_int(name: str, value: Any) -> int:
    """``value`` as an int >= 1 (see :func:`whole_int`)."""
    return whole_int(name, value, min=1)


# ----------------------------------------------------------------------------- tensors
def gate_tensor(name: str, gates: Any, shape: tuple[int, ...] | None = None, *, trailing: bool = False) -> Tensor:
    """``gates`` as a float tensor of finite values in [0, 1], shaped ``shape`` (or ending in
    ``shape`` when ``trailing``); a ValueError naming ``name`` otherwise."""
    try:
        t = gates if isinstance(gates, Tensor) else torch.as_tensor(gates, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name} must be a tensor of gates in [0, 1]; got {type(gates).__name__}: {err}") from None
    if t.dtype == torch.bool or not (t.is_floating_point() or t.dtype in (torch.int64, torch.int32, torch.uint8)):
        raise ValueError(f"{name} must be a float tensor of gates in [0, 1]; got dtype {t.dtype}")
    if shape is not None:
        got = tuple(t.shape)
        want = tuple(int(s) for s in shape)
        ok = got[len(got) - len(want):] == want and len(got) >= len(want) if trailing else got == want
        if not ok:
            expect = f"[..., {', '.join(map(str, want))}]" if trailing else f"[{', '.join(map(str, want))}]"
            raise ValueError(f"{name} must be shaped {expect} (layers x heads of the model); got {list(got)}")
    td = t.detach()
    if td.numel():
        finite = torch.isfinite(td)
        if not bool(finite.all()):
            bad = (~finite).nonzero()[0].tolist()
            raise ValueError(f"{name} holds {int((~finite).sum())} non-finite value(s) (first at index {bad}); "
                             "gates must be finite numbers in [0, 1]")
        lo, hi = float(td.min()), float(td.max())
        if lo < 0 or hi > 1:
            raise ValueError(f"{name} must lie in [0, 1]; got values from {lo:g} to {hi:g}")
    return t


def token_ids(name: str, tokens: Tensor, vocab: int | None = None) -> None:
    """Token ids must be integers in ``[0, vocab)``."""
    if tokens.is_floating_point() or tokens.dtype == torch.bool or tokens.is_complex():
        raise ValueError(f"{name} must hold integer token ids; got dtype {tokens.dtype} "
                         "(float ids would be truncated silently)")
    if tokens.numel() == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0:
        where = (tokens < 0).nonzero()[0].tolist()
        raise ValueError(f"{name} holds a negative token id {lo} (first at row {where[0]}, position {where[-1]}); "
                         "ids must be >= 0")
    if vocab is not None and hi >= vocab:
        where = (tokens >= vocab).nonzero()[0].tolist()
        raise ValueError(f"{name} holds token id {hi} (first at row {where[0]}, position {where[-1]}), outside the "
                         f"model's vocabulary of {vocab}")


# ----------------------------------------------------------------------------- devices and dtypes
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def dtype(value: Any) -> torch.dtype | None:
    """``None``, a torch dtype or one of :data:`DTYPES`' names, as a torch dtype."""
    if value is None or value in (torch.float32, torch.bfloat16, torch.float16):
        return value
    if isinstance(value, str) and value.lower() in DTYPES:
        return DTYPES[value.lower()]
    raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {value!r} "
                     "(float64 is not supported: gates and scores are computed in float32)")


def device(value: Any) -> torch.device | None:
    """``None`` or a device that exists here (cpu, cuda[:i] with a visible GPU i, mps when available);
    anything else is a ValueError, never a silent run on the CPU."""
    if value is None:
        return None
    try:
        d = value if isinstance(value, torch.device) else torch.device(str(value))
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {value!r}; use cpu, cuda, cuda:N or mps") from None
    if d.type == "cpu":
        return d
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"device {value!r}: no CUDA GPU is visible here; use --device cpu")
        if d.index is not None and d.index >= n:
            raise ValueError(f"device {value!r}: only {n} CUDA GPU(s) are visible (cuda:0..cuda:{n - 1})")
        return d
    if d.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError(f"device {value!r}: MPS is not available here; use --device cpu")
        return d
    raise ValueError(f"device {value!r} is not supported; use cpu, cuda, cuda:N or mps")


# ----------------------------------------------------------------------------- call options
def call_options(fn: Callable, options: Mapping[str, Any], what: str, skip: int = 1) -> None:
    """Refuse options that ``fn`` does not take, and values whose type differs from the default's
    (an int default takes an int, a float default a number, a bool default a bool); the first
    ``skip`` parameters (the model) are not options."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    by_name = {p.name: p for p in params}
    unknown = [k for k in options if k not in by_name]
    if unknown:
        raise ValueError(f"{what} does not take {', '.join(unknown)}; it takes: {', '.join(by_name)}")
    for k, v in options.items():
        default = by_name[k].default
        if default is inspect.Parameter.empty or default is None or v is None:
            continue
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise ValueError(f"{what}: option {k} must be true or false; got {v!r}")
        elif isinstance(default, int):
            whole_int(f"{what}: option {k}", v)
        elif isinstance(default, float):
            finite_float(f"{what}: option {k}", v)
        elif isinstance(default, str) and not isinstance(v, str):
            raise ValueError(f"{what}: option {k} must be text; got {v!r}")


# ----------------------------------------------------------------------------- output folders
def output_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse an output folder that is a file, lies inside a file, is a symbolic link to nothing (or
    to a file), or cannot be written; nothing is created. A link to a folder is fine: results are
    written into the folder it points to, and the link stays. Call before loading a model or fitting."""
    p = Path(path).expanduser()
    if p.is_symlink() and not p.exists():
        raise ValueError(f"{what} {p} is a symbolic link to {os.readlink(p)}, which does not exist; create that "
                         "folder, or pass a real folder")
    if p.exists() and not p.is_dir():
        raise ValueError(f"{what} {p} is a file, not a folder; pass a folder path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"{what} {p} lies inside {probe}, which is a file; pass a folder path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {p}: {probe} is not writable; pass a folder you can write to")
    return p
